//! What an experiment leaves behind for people: PNG plots and tables, TensorBoard event files.

pub mod plot;
pub mod tensorboard;

pub use plot::{Chart, Series, histogram_png, line_chart_png};
