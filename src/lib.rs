//! prefhost: preference optimisation of language models, with objectives in Rhai.
//!
//! Data flows one way: script (Rhai) → host API (`script`) → trainer (`train`) → burn
//! (`model`), with `data` feeding the trainer.

pub mod allocator;
pub mod backend;
pub mod bench;
pub mod cli;
pub mod clock;
pub mod console;
pub mod dashboard;
pub mod data;
pub mod failpoint;
pub mod files;
pub mod kernels;
pub mod model;
pub mod report;
pub mod rng;
pub mod script;
pub mod tensor;
pub mod train;
