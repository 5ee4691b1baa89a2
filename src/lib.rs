//! prefhost: preference optimisation of language models, with objectives in Rhai.
//!
//! Data flows one way: script (Rhai) → host API (`script`) → trainer (`train`) → burn
//! (`model`), with `data` feeding the trainer.

pub mod allocator;
pub mod bench;
pub mod bench_gpu;
pub mod bench_sample;
pub mod cli;
pub mod clock;
pub mod dashboard;
pub mod data;
pub mod failpoint;
pub mod kernels;
pub mod model;
pub mod report;
pub mod rng;
pub mod script;
pub mod train;
