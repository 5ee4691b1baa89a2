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
    /// Biases on q/k/v/o (llama's `attention_bias`; qwen2 always has q/k/v biases).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub attention_bias: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub mlp_bias: bool,
    /// HF's rope_scaling map (linear and llama3 are supported).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<serde_json::Value>,
    /// Mistral: each token attends to at most this many tokens (itself included).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<usize>,
    /// Qwen2: whether `sliding_window` is used at all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_sliding_window: Option<bool>,
}

/// How RoPE frequencies are rescaled for long contexts (HF's rope_scaling).
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor`.
    Linear { factor: f64 },
    /// Llama 3.1: low frequencies divided by `factor`, high ones kept, a smooth blend between.
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max_positions: f64 },
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
        if !["llama", "mistral", "qwen2"].contains(&self.model_type.as_str()) {
            bail!("model_type \"{}\" is not supported (supported: llama, mistral, qwen2)", self.model_type);
        }
        self.rope_scaling()?;
        if self.model_type == "qwen2" && self.use_sliding_window == Some(true) {
            bail!("use_sliding_window: qwen2's per-layer sliding window is not supported");
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

    /// q/k/v biases: qwen2 always, llama and mistral when `attention_bias` says so.
    pub fn qkv_bias(&self) -> bool {
        self.model_type == "qwen2" || self.attention_bias
    }

    /// o_proj bias: only llama's `attention_bias` adds it (qwen2's o_proj has none).
    pub fn o_bias(&self) -> bool {
        self.model_type != "qwen2" && self.attention_bias
    }

    /// The attention window, when the model uses one.
    pub fn attention_window(&self) -> Option<usize> {
        match self.model_type.as_str() {
            "mistral" => self.sliding_window,
            _ => None,
        }
    }

    pub fn rope_scaling(&self) -> Result<RopeScaling> {
        let Some(map) = self.rope_scaling.as_ref().filter(|v| !v.is_null()) else { return Ok(RopeScaling::None) };
        let kind = map.get("rope_type").or_else(|| map.get("type")).and_then(|v| v.as_str()).unwrap_or("default");
        let num = |key: &str| -> Result<f64> {
            map.get(key).and_then(|v| v.as_f64()).with_context(|| format!("rope_scaling.{key}: missing or not a number"))
        };
        match kind {
            "default" => Ok(RopeScaling::None),
            "linear" => Ok(RopeScaling::Linear { factor: num("factor")? }),
            "llama3" => Ok(RopeScaling::Llama3 {
                factor: num("factor")?,
                low_freq_factor: num("low_freq_factor")?,
                high_freq_factor: num("high_freq_factor")?,
                original_max_positions: num("original_max_position_embeddings")?,
            }),
            other => bail!("rope_scaling.rope_type \"{other}\" is not supported (supported: linear, llama3)"),
        }
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
