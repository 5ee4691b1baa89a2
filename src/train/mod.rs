//! Training: run config, log-probs, the loss boundary, gradients, metrics, the loop.

pub mod checkpoint;
pub mod chunked;
pub mod compare;
pub mod config;
pub mod diff;
pub mod evaluate;
pub mod grads;
pub mod identity;
pub mod interrupt;
pub mod lock;
pub mod logps;
pub mod loss_call;
pub mod memory;
pub mod metrics;
pub mod online;
pub mod optimizer;
pub mod reference;
pub mod reload;
pub mod reset;
pub mod sample;
pub mod sampler;
pub mod setup;
pub mod trainer;

pub use config::TrainConfig;
pub use trainer::{RunOptions, RunSummary, run};
