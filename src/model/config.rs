//! Llama-family architecture settings, read from a Hugging Face `config.json`.

use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

fn default_rms_eps() -> f64 {
    1e-6
}
fn default_rope_theta() -> f64 {
    10000.0
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct LlamaConfig {
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "default_rms_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default)]
    pub max_position_embeddings: Option<usize>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<u32>,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
}

impl LlamaConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
        let config: Self = serde_json::from_str(&text).map_err(|e| {
            anyhow::anyhow!("{}:{}:{}: {e}", path.display(), e.line(), e.column())
        })?;
        config.validate().with_context(|| format!("{}: invalid model config", path.display()))?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<()> {
        if self.model_type != "llama" {
            bail!("model_type \"{}\" is not supported (supported: llama)", self.model_type);
        }
        if self.num_attention_heads == 0 || self.hidden_size % self.num_attention_heads != 0 && self.head_dim.is_none() {
            bail!("hidden_size {} is not divisible by num_attention_heads {}", self.hidden_size, self.num_attention_heads);
        }
        if self.num_attention_heads % self.kv_heads() != 0 {
            bail!("num_attention_heads {} is not a multiple of num_key_value_heads {}", self.num_attention_heads, self.kv_heads());
        }
        if self.head_dim() % 2 != 0 {
            bail!("head_dim {} must be even for rotary embeddings", self.head_dim());
        }
        Ok(())
    }

    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    pub fn max_positions(&self) -> usize {
        self.max_position_embeddings.unwrap_or(2048)
    }
}
