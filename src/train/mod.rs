//! Training: run config, log-probs, the loss boundary, gradients, metrics, the loop.

pub mod checkpoint;
pub mod chunked;
pub mod compare;
pub mod config;
pub mod console;
pub mod evaluate;
pub mod grads;
pub mod logps;
pub mod loss_call;
pub mod metrics;
pub mod reference;
pub mod trainer;

pub use config::TrainConfig;
pub use trainer::{RunOptions, RunSummary, backend_device, run};
