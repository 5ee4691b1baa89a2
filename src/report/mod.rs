//! What an experiment leaves behind for people: PNG plots and tables.

pub mod font;
pub mod plot;

pub use plot::{Chart, Series, histogram_png, line_chart_png};
