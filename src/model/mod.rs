//! Llama-family decoder in burn, one file per block (after tracel-ai/models llama-burn).

pub mod attention;
pub mod block;
pub mod checkpoint;
pub mod config;
pub mod fused;
pub mod generate;
pub mod llama;
pub mod lora;
pub mod mlp;
pub mod norm;
pub mod precision;
pub mod rope;
pub mod sampling;
pub mod weights;

pub use config::LlamaConfig;

pub use llama::{Llama, RandomInit, WeightSource, seed_model_draws};
pub use lora::LoraConfig;
pub use precision::MixedPrecision;
pub use weights::{
    load_adapter_model, load_frozen_model, load_model, read_adapter, save_adapter, save_model, save_model_with,
};
