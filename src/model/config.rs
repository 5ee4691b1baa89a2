//! Llama-family architecture settings, read from a Hugging Face `config.json`: llama,
//! mistral, qwen2, qwen3 (per-head q/k norms) and gemma2 (scaled embeddings, (1 + w) norms
//! around attention and MLP, GeGLU, soft-capped scores and logits, alternating sliding
//! window layers).

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
    /// One id, or several (Llama 3.1 and Gemma 2 instruct models list every turn end).
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
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
    /// transformers 5's layout: rope_theta, rope_type and the scaling fields in one map.
    /// Read into `rope_theta` and `rope_scaling` when the file is loaded; checkpoints are
    /// written in the 4.x layout, which both 4.x and 5.x read.
    #[serde(default, skip_serializing)]
    pub rope_parameters: Option<serde_json::Value>,
    /// Mistral: each token attends to at most this many tokens (itself included).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<usize>,
    /// Qwen2: whether `sliding_window` is used at all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_sliding_window: Option<bool>,
    /// Each layer's attention: "full_attention", or "sliding_attention" (gemma2's
    /// alternating window layers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer_types: Option<Vec<String>>,
    /// Gemma 2's MLP activation ("gelu_pytorch_tanh").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hidden_activation: Option<String>,
    /// Gemma 2: scores are scaled by query_pre_attn_scalar^-1/2 instead of head_dim^-1/2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query_pre_attn_scalar: Option<f64>,
    /// Gemma 2: scores become c·tanh(scores / c) before the softmax.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attn_logit_softcapping: Option<f64>,
    /// Gemma 2: logits become c·tanh(logits / c).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_logit_softcapping: Option<f64>,
}

/// The families prefhost implements, each as transformers computes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
    Gemma2,
}

impl Family {
    pub const NAMES: [&'static str; 5] = ["llama", "mistral", "qwen2", "qwen3", "gemma2"];

    fn parse(model_type: &str) -> Option<Self> {
        Some(match model_type {
            "llama" => Self::Llama,
            "mistral" => Self::Mistral,
            "qwen2" => Self::Qwen2,
            "qwen3" => Self::Qwen3,
            "gemma2" => Self::Gemma2,
            _ => return None,
        })
    }

    /// transformers' class for a saved config.json's `architectures`.
    pub fn architecture(self) -> &'static str {
        match self {
            Self::Llama => "LlamaForCausalLM",
            Self::Mistral => "MistralForCausalLM",
            Self::Qwen2 => "Qwen2ForCausalLM",
            Self::Qwen3 => "Qwen3ForCausalLM",
            Self::Gemma2 => "Gemma2ForCausalLM",
        }
    }
}

/// A token id field that may hold one id or a list.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    pub fn ids(&self) -> Vec<u32> {
        match self {
            Self::One(id) => vec![*id],
            Self::Many(ids) => ids.clone(),
        }
    }
}

/// How RoPE frequencies are rescaled for long contexts (HF's rope_scaling).
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor`.
    Linear {
        factor: f64,
    },
    /// Llama 3.1: low frequencies divided by `factor`, high ones kept, a smooth blend between.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_positions: f64,
    },
}

impl LlamaConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
        let mut config: Self = serde_json::from_str(&text)
            .map_err(|e| anyhow::anyhow!("{}:{}:{}: {e}", path.display(), e.line(), e.column()))?;
        let raw: serde_json::Value = serde_json::from_str(&text)?;
        if let Some(family) = Family::parse(&config.model_type) {
            config.fill_family_defaults(family, &raw);
        }
        refuse_unsupported_keys(&raw, Family::parse(&config.model_type))
            .with_context(|| format!("{}: invalid model config", path.display()))?;
        config.read_rope_parameters(&raw).with_context(|| format!("{}: invalid model config", path.display()))?;
        config.validate().with_context(|| format!("{}: invalid model config", path.display()))?;
        Ok(config)
    }

    /// Moves transformers 5's `rope_parameters` into `rope_theta` and `rope_scaling`. A file
    /// that also sets the 4.x keys to something else is refused: which one applies would be
    /// a guess.
    fn read_rope_parameters(&mut self, raw: &serde_json::Value) -> Result<()> {
        let Some(params) = self.rope_parameters.take().filter(|v| !v.is_null()) else { return Ok(()) };
        let map = params.as_object().context("rope_parameters: expected a map")?;
        if !map.contains_key("rope_type") && !map.contains_key("rope_theta") {
            bail!(
                "rope_parameters: per-layer-type rope settings ({}) are not supported",
                map.keys().cloned().collect::<Vec<_>>().join(", ")
            );
        }
        let theta = map
            .get("rope_theta")
            .and_then(|v| v.as_f64())
            .context("rope_parameters.rope_theta: missing or not a number")?;
        if let Some(top) = raw.get("rope_theta").filter(|v| !v.is_null())
            && top.as_f64() != Some(theta)
        {
            bail!("rope_theta ({top}) and rope_parameters.rope_theta ({theta}) disagree");
        }
        if raw.get("rope_scaling").is_some_and(|v| !v.is_null()) {
            bail!("rope_scaling and rope_parameters are both set; a config has one or the other");
        }
        self.rope_theta = theta;
        self.rope_scaling = Some(params.clone());
        Ok(())
    }

    /// What transformers' config class fills in when a key is absent and prefhost's
    /// defaults would differ (gemma2's softcaps, scalar, window pattern, tied head).
    fn fill_family_defaults(&mut self, family: Family, raw: &serde_json::Value) {
        if family != Family::Gemma2 {
            return;
        }
        let absent = |key: &str| raw.get(key).is_none();
        if absent("query_pre_attn_scalar") {
            self.query_pre_attn_scalar = Some(256.0);
        }
        if absent("attn_logit_softcapping") {
            self.attn_logit_softcapping = Some(50.0);
        }
        if absent("final_logit_softcapping") {
            self.final_logit_softcapping = Some(30.0);
        }
        if absent("sliding_window") {
            self.sliding_window = Some(4096);
        }
        if absent("tie_word_embeddings") {
            self.tie_word_embeddings = true;
        }
        if absent("hidden_activation") {
            self.hidden_activation = Some("gelu_pytorch_tanh".into());
        }
        if self.layer_types.is_none() {
            // Gemma2Config: even layers slide, odd ones see everything.
            self.layer_types = Some(
                (0..self.num_hidden_layers)
                    .map(|i| if i % 2 == 0 { "sliding_attention" } else { "full_attention" }.to_string())
                    .collect(),
            );
        }
    }

    pub fn family(&self) -> Family {
        Family::parse(&self.model_type).expect("validated when the config was read")
    }

    pub fn validate(&self) -> Result<()> {
        let Some(family) = Family::parse(&self.model_type) else {
            bail!("model_type \"{}\" is not supported (supported: {})", self.model_type, Family::NAMES.join(", "));
        };
        self.rope_scaling()?;
        if matches!(family, Family::Qwen2 | Family::Qwen3) && self.use_sliding_window == Some(true) {
            bail!("use_sliding_window: {}'s per-layer sliding window is not supported", self.model_type);
        }
        if let Some(types) = &self.layer_types {
            if types.len() != self.num_hidden_layers {
                bail!("layer_types: {} entries for {} layers", types.len(), self.num_hidden_layers);
            }
            let sliding_allowed = family == Family::Gemma2;
            if let Some(other) = types
                .iter()
                .find(|t| !(t.as_str() == "full_attention" || sliding_allowed && t.as_str() == "sliding_attention"))
            {
                bail!(
                    "layer_types: \"{other}\" layers are not supported for {} (only \"full_attention\"{}{})",
                    self.model_type,
                    if sliding_allowed { " and \"sliding_attention\"" } else { "" },
                    if family == Family::Mistral { "; mistral's sliding_window applies to every layer" } else { "" }
                );
            }
            if sliding_allowed && types.iter().any(|t| t == "sliding_attention") && self.sliding_window.is_none() {
                bail!("layer_types: sliding_attention layers need a sliding_window");
            }
        }
        let gemma_only = [
            ("query_pre_attn_scalar", self.query_pre_attn_scalar),
            ("attn_logit_softcapping", self.attn_logit_softcapping),
            ("final_logit_softcapping", self.final_logit_softcapping),
        ];
        if family != Family::Gemma2 {
            if let Some((key, _)) = gemma_only.iter().find(|(_, v)| v.is_some()) {
                bail!("{key}: not part of a {} model (gemma2 only)", self.model_type);
            }
        } else {
            if let Some((key, v)) = gemma_only.iter().find(|(_, v)| v.is_some_and(|x| !(x.is_finite() && x > 0.0))) {
                bail!("{key}: {v:?} must be a positive number");
            }
            if self.hidden_activation.as_deref() != Some("gelu_pytorch_tanh") {
                bail!(
                    "hidden_activation: {:?} is not supported (gemma2's \"gelu_pytorch_tanh\")",
                    self.hidden_activation
                );
            }
        }
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads) && self.head_dim.is_none()
        {
            bail!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden_size,
                self.num_attention_heads
            );
        }
        if !self.num_attention_heads.is_multiple_of(self.kv_heads()) {
            bail!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads,
                self.kv_heads()
            );
        }
        if !self.head_dim().is_multiple_of(2) {
            bail!("head_dim {} must be even for rotary embeddings", self.head_dim());
        }
        Ok(())
    }

    /// q/k/v biases: qwen2 always, the others when `attention_bias` says so.
    pub fn qkv_bias(&self) -> bool {
        self.model_type == "qwen2" || self.attention_bias
    }

    /// o_proj bias: `attention_bias` adds it, except in qwen2 (whose o_proj has none).
    pub fn o_bias(&self) -> bool {
        self.model_type != "qwen2" && self.attention_bias
    }

    /// Layer `layer`'s attention window, when it has one: mistral's on every layer,
    /// gemma2's on its "sliding_attention" layers.
    pub fn attention_window(&self, layer: usize) -> Option<usize> {
        match self.family() {
            Family::Mistral => self.sliding_window,
            Family::Gemma2 => {
                self.layer_types.as_ref().filter(|t| t[layer] == "sliding_attention").and(self.sliding_window)
            }
            _ => None,
        }
    }

    pub fn rope_scaling(&self) -> Result<RopeScaling> {
        let Some(map) = self.rope_scaling.as_ref().filter(|v| !v.is_null()) else { return Ok(RopeScaling::None) };
        // The same fields arrive as 4.x's rope_scaling or inside 5.x's rope_parameters.
        let at = if map.get("rope_theta").is_some() { "rope_parameters" } else { "rope_scaling" };
        let kind = map.get("rope_type").or_else(|| map.get("type")).and_then(|v| v.as_str()).unwrap_or("default");
        let num = |key: &str| -> Result<f64> {
            map.get(key).and_then(|v| v.as_f64()).with_context(|| format!("{at}.{key}: missing or not a number"))
        };
        // A field the rope type does not read would change transformers' frequencies
        // (e.g. partial_rotary_factor) or be a typo: refused, never ignored.
        let fields: &[&str] = match kind {
            "default" => &[],
            "linear" => &["factor"],
            "llama3" => &["factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"],
            other => bail!("{at}.rope_type \"{other}\" is not supported (supported: default, linear, llama3)"),
        };
        if let Some(key) = map.as_object().and_then(|o| {
            o.keys()
                .find(|k| !["rope_type", "type", "rope_theta"].contains(&k.as_str()) && !fields.contains(&k.as_str()))
        }) {
            bail!(
                "{at}.{key}: not supported with rope_type \"{kind}\" (it reads {})",
                if fields.is_empty() { "no other field".to_string() } else { fields.join(", ") }
            );
        }
        Ok(match kind {
            "linear" => RopeScaling::Linear { factor: num("factor")? },
            "llama3" => RopeScaling::Llama3 {
                factor: num("factor")?,
                low_freq_factor: num("low_freq_factor")?,
                high_freq_factor: num("high_freq_factor")?,
                original_max_positions: num("original_max_position_embeddings")?,
            },
            _ => RopeScaling::None,
        })
    }

    /// config.json's EOS ids (none, one or several).
    pub fn eos_ids(&self) -> Vec<u32> {
        self.eos_token_id.as_ref().map_or_else(Vec::new, TokenIds::ids)
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

/// Keys that transformers' llama, mistral and qwen2 configs read and that would change the
/// computation in a way prefhost does not implement: refused with the key named, never
/// ignored. (Keys transformers itself does not read for these families change nothing
/// there either; dropout settings are off in training, as TRL's disable_dropout does.)
fn refuse_unsupported_keys(raw: &serde_json::Value, family: Option<Family>) -> Result<()> {
    let get = |key: &str| raw.get(key).filter(|v| !v.is_null());
    // Gemma 2's MLP reads hidden_activation; transformers 4.x also wrote a matching hidden_act.
    let activation = if family == Some(Family::Gemma2) { "gelu_pytorch_tanh" } else { "silu" };
    if let Some(act) = get("hidden_act")
        && act.as_str() != Some(activation)
    {
        bail!("hidden_act: {act} is not supported (\"{activation}\" for this family)");
    }
    if family != Some(Family::Gemma2) && get("hidden_activation").is_some() {
        bail!("hidden_activation: not part of this family (gemma2 only)");
    }
    if get("quantization_config").is_some() {
        bail!("quantization_config: quantized checkpoints are not supported");
    }
    if get("use_bidirectional_attention").is_some_and(|v| v != &serde_json::json!(false)) {
        bail!("use_bidirectional_attention: only causal attention is supported");
    }
    if let Some(factor) = get("partial_rotary_factor")
        && factor.as_f64() != Some(1.0)
    {
        bail!("partial_rotary_factor: {factor} is not supported (RoPE on the whole head)");
    }
    Ok(())
}
