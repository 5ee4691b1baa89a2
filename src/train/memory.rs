//! Memory preflight: before any weight is loaded, an estimate of a run's peak resident
//! memory from the model's shape, the longest batch the data can make and the settings,
//! checked against what this machine (or its cgroup) has available. A run that would not
//! fit stops with the estimate and the settings that would fit, instead of being killed
//! part-way; `host run --dry-run` prints the estimate.
//!
//! The estimate counts what the CPU default (burn-flex with the fused ops) keeps alive at
//! the peak of a step: weights, the reference, gradients (twice with accumulation), AdamW's
//! two moments, one micro-batch's activations (or with gradient checkpointing each layer's
//! input plus one layer's), the logits of the policy and the reference, and the runtime.
//! It is checked against measured peak RSS in tests/memory.rs and BENCHMARKS.md.

use anyhow::{Result, bail};

use super::config::{Mode, TrainConfig};
use crate::data::Example;
use crate::model::LlamaConfig;

const F32: f64 = 4.0;
const MB: f64 = 1024.0 * 1024.0;

/// The binary, its allocator arenas, tokenizer and data (a run of a 0.1M-parameter model
/// peaks at about 20 MB).
const RUNTIME_BYTES: f64 = 30.0 * MB;

/// The shape of the largest micro-batch: sequences per forward pass and their padded length.
#[derive(Clone, Copy, Debug)]
pub struct BatchShape {
    pub rows: usize,
    pub length: usize,
    /// Packed rows (prefix sharing): attention over the whole row, not the causal half.
    pub packed: bool,
    /// Positions per row whose logits are formed: from the shortest prompt's last token on
    /// (see `logps::token_logps`).
    pub predicted: usize,
}

impl BatchShape {
    /// The worst batch the data can make: `batch_size` rows (pairs count twice, or once
    /// packed) all as long as the longest.
    pub fn worst(config: &TrainConfig, examples: &[Example]) -> Self {
        let longest = |e: &Example| e.prompt.len() + e.chosen.len().max(e.rejected.len());
        let packed_length = |e: &Example| {
            let common = e.chosen.iter().zip(&e.rejected).take_while(|(a, b)| a == b).count();
            e.prompt.len() + e.chosen.len() + e.rejected.len() - common
        };
        let packed = config.prefix_sharing && config.mode == Mode::Preference;
        let length = examples.iter().map(if packed { packed_length } else { longest }).max().unwrap_or(1);
        let rows = match config.mode {
            Mode::Preference if !packed => 2 * config.batch_size,
            // Unpaired rows bring as many KL rows (mismatched completions).
            Mode::Unpaired => 2 * config.batch_size,
            _ => config.batch_size,
        };
        let shortest_prompt = examples.iter().map(|e| e.prompt.len()).min().unwrap_or(1);
        Self { rows, length, packed, predicted: length.saturating_sub(shortest_prompt.saturating_sub(1)).max(1) }
    }

    /// The worst batch of online pairs: prompts as long as max_prompt_length and both
    /// completions `completion` tokens, within max_length.
    pub fn online(config: &TrainConfig, completion: usize, limits: crate::data::Truncation) -> Self {
        let packed = config.prefix_sharing;
        let length =
            if packed { limits.max_prompt_length + 2 * completion } else { limits.max_prompt_length + completion };
        let rows = if packed { config.batch_size } else { 2 * config.batch_size };
        let length = length.min(if packed { 2 * limits.max_length } else { limits.max_length });
        // Prompts may be short: every position may be predicted.
        Self { rows, length, packed, predicted: length }
    }
}

/// A run's estimated peak, by part.
#[derive(Clone, Debug)]
pub struct Estimate {
    pub parts: Vec<(&'static str, f64)>,
}

impl Estimate {
    pub fn total(&self) -> f64 {
        self.parts.iter().map(|(_, b)| b).sum()
    }

    /// `memory.json` of a finished run: the measured peak beside the estimate and its parts.
    pub fn write_report(&self, path: &std::path::Path, peak_bytes: f64) -> Result<()> {
        let parts: serde_json::Map<String, serde_json::Value> =
            self.parts.iter().map(|(part, bytes)| (part.to_string(), serde_json::json!(bytes / MB))).collect();
        let report = serde_json::json!({ "peak_rss_mb": peak_bytes / MB, "estimated_mb": self.total() / MB, "estimated_parts_mb": parts });
        std::fs::write(path, serde_json::to_string_pretty(&report)? + "\n")
            .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))
    }

    /// One line per part, in MB.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        for (part, bytes) in &self.parts {
            out.push_str(&format!("  {part:<34} {:>9.0} MB\n", bytes / MB));
        }
        out.push_str(&format!("  {:<34} {:>9.0} MB", "total", self.total() / MB));
        out
    }
}

/// Parameter counts of a model: all of them, and those that train under `config`.
fn parameters(model: &LlamaConfig, config: &TrainConfig) -> (f64, f64) {
    let (d, heads, kv, hd, inter) =
        (model.hidden_size, model.num_attention_heads, model.kv_heads(), model.head_dim(), model.intermediate_size);
    let projections = [
        ("q_proj", d, heads * hd),
        ("k_proj", d, kv * hd),
        ("v_proj", d, kv * hd),
        ("o_proj", heads * hd, d),
        ("gate_proj", d, inter),
        ("up_proj", d, inter),
        ("down_proj", inter, d),
    ];
    let mut layer: usize = projections.iter().map(|(_, i, o)| i * o).sum();
    layer += if model.family() == crate::model::config::Family::Gemma2 { 4 * d } else { 2 * d };
    if model.family() == crate::model::config::Family::Qwen3 {
        layer += 2 * hd;
    }
    if model.qkv_bias() {
        layer += (heads + 2 * kv) * hd;
    }
    if model.o_bias() {
        layer += d;
    }
    if model.mlp_bias {
        layer += 2 * inter + d;
    }
    let embeddings = model.vocab_size * d * if model.tie_word_embeddings { 1 } else { 2 };
    let all = (model.num_hidden_layers * layer + embeddings + d) as f64;
    let trainable = match &config.lora {
        None => all,
        Some(lora) => {
            let targets = lora.modules().unwrap_or_default();
            let per_layer: usize = projections
                .iter()
                .filter(|(name, _, _)| targets.iter().any(|t| t == name))
                .map(|(_, i, o)| lora.r * (i + o))
                .sum();
            (model.num_hidden_layers * per_layer) as f64
        }
    };
    (all, trainable)
}

/// Floats one decoder layer keeps for the backward pass of one micro-batch: the layer's
/// input, queries/keys/values after RoPE, attention output, the residual, the MLP's gate
/// and up; each norm's output unless every projection after it is plain (f32, no bias, no
/// adapter), which then forms it again in its backward (`fused::normed_matmul`); and the
/// activation silu(gate)·up unless SwiGLU and a plain down projection run as one op that
/// recomputes it (`fused::swiglu_matmul`). (Attention probabilities are not kept either:
/// see `attention_probabilities`.)
fn layer_activations(model: &LlamaConfig, config: &TrainConfig, batch: BatchShape) -> f64 {
    let (d, heads, kv, hd, inter) =
        (model.hidden_size, model.num_attention_heads, model.kv_heads(), model.head_dim(), model.intermediate_size);
    let adapted = |names: &[&str]| {
        config.lora.as_ref().is_some_and(|l| l.modules().unwrap_or_default().iter().any(|m| names.contains(m)))
    };
    let unmixed = config.mixed_precision == crate::model::MixedPrecision::No;
    let product_recomputed = model.family() != crate::model::config::Family::Gemma2
        && !model.mlp_bias
        && !adapted(&["down_proj"])
        && unmixed;
    let mlp = if product_recomputed { 2 * inter } else { 3 * inter };
    let attention_norm_kept = model.qkv_bias() || adapted(&["q_proj", "k_proj", "v_proj"]) || !unmixed;
    let mlp_norm_kept = model.mlp_bias || adapted(&["gate_proj", "up_proj"]) || !unmixed;
    let norms = usize::from(attention_norm_kept) + usize::from(mlp_norm_kept);
    let tokens = (batch.rows * batch.length) as f64;
    ((2 + norms) * d + 2 * heads * hd + 2 * kv * hd + mlp) as f64 * tokens
}

/// Floats of one layer's attention probabilities, which its backward computes again and
/// holds while it runs: [rows, heads, s, s].
fn attention_probabilities(model: &LlamaConfig, batch: BatchShape) -> f64 {
    let s = batch.length as f64;
    (batch.rows * model.num_attention_heads) as f64 * s * s
}

/// The estimate for `config` on `model` with its worst micro-batch. `stored` is the
/// checkpoint's bytes per parameter as stored (2 for bf16): frozen copies (a LoRA base, a
/// resident reference) keep that dtype.
pub fn estimate(model: &LlamaConfig, config: &TrainConfig, batch: BatchShape, stored: f64) -> Estimate {
    let (all, trainable) = parameters(model, config);
    let weights = if config.lora.is_some() { all * stored + trainable * F32 } else { all * F32 };
    let layers = model.num_hidden_layers as f64;
    let tokens = (batch.rows * batch.length) as f64;
    let layer = layer_activations(model, config, batch) * F32;
    let probabilities = attention_probabilities(model, batch) * F32;
    let activations = if config.gradient_checkpointing {
        // Every layer's input, plus one layer recomputed and its gradients.
        layers * tokens * model.hidden_size as f64 * F32 + 2.0 * layer + probabilities
    } else {
        layers * layer + probabilities
    };
    // The policy's logits and, at once, the reference's logits or the policy's logits'
    // gradient, at the predicted positions; chunked, one chunk of positions at a time.
    let predicted = (batch.rows * batch.predicted) as f64;
    let positions = config.logits_chunk().map_or(predicted, |chunk| (batch.rows * chunk.min(batch.predicted)) as f64);
    let logits = 2.0 * positions * model.vocab_size as f64 * F32;
    let resident_reference = config.mode != Mode::Sft && config.ref_logps.is_none() && config.lora.is_none();
    let gradients = if config.grad_accum > 1 { 2.0 } else { 1.0 } * trainable * F32;
    Estimate {
        parts: vec![
            ("weights", weights),
            ("reference copy", if resident_reference { all * stored } else { 0.0 }),
            ("gradients", gradients),
            ("AdamW moments", 2.0 * trainable * F32),
            (if config.gradient_checkpointing { "activations (checkpointed)" } else { "activations" }, activations),
            ("logits", logits),
            ("runtime", RUNTIME_BYTES),
        ],
    }
}

/// A "Key:   N kB" line of a /proc file, in bytes.
fn proc_kb(path: &str, key: &str) -> Option<f64> {
    let text = std::fs::read_to_string(path).ok()?;
    let line = text.lines().find(|l| l.strip_prefix(key).is_some_and(|rest| rest.starts_with(':')))?;
    line.split_whitespace().nth(1)?.parse::<f64>().ok().map(|kb| kb * 1024.0)
}

/// This process's peak resident memory so far (VmHWM), in bytes.
pub fn peak_rss_bytes() -> Option<f64> {
    proc_kb("/proc/self/status", "VmHWM")
}

/// Bytes this process may still use: the smaller of MemAvailable and the cgroup's limit
/// less its usage (None when neither can be read).
pub fn available_bytes() -> Option<f64> {
    let read = |path: &str| std::fs::read_to_string(path).ok().and_then(|s| s.trim().parse::<f64>().ok());
    let headroom = |limit: &str, usage: &str| Some(read(limit)? - read(usage)?);
    // cgroup v2, then v1 (whose "no limit" is a huge number, which min() ignores).
    let cgroup = headroom("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current").or_else(|| {
        headroom("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")
    });
    match (proc_kb("/proc/meminfo", "MemAvailable"), cgroup) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Settings that lower the estimate, each with its estimate (those that fit first).
fn alternatives(model: &LlamaConfig, config: &TrainConfig, batch: BatchShape, stored: f64) -> Vec<(String, f64)> {
    let mut out = Vec::new();
    // Only settings the config accepts (e.g. no checkpointing with LoRA dropout).
    let mut try_with = |label: String, changed: TrainConfig, batch: BatchShape| {
        if changed.validate().is_ok() {
            out.push((label, estimate(model, &changed, batch, stored).total()));
        }
    };
    if !config.gradient_checkpointing {
        try_with(
            "gradient_checkpointing: true".into(),
            TrainConfig { gradient_checkpointing: true, ..config.clone() },
            batch,
        );
    }
    if config.lora.is_none() {
        let lora: crate::model::LoraConfig =
            serde_json::from_value(serde_json::json!({ "r": 16, "lora_alpha": 32, "target_modules": "all-linear" }))
                .expect("a valid LoRA config");
        try_with(
            "lora: #{ r: 16, lora_alpha: 32, target_modules: \"all-linear\" }".into(),
            TrainConfig { lora: Some(lora), ..config.clone() },
            batch,
        );
    }
    if config.mode != Mode::Sft && config.ref_logps.is_none() && config.lora.is_none() {
        try_with(
            "ref_logps (reference log-probs from `host logps`)".into(),
            TrainConfig { ref_logps: Some(String::new()), ..config.clone() },
            batch,
        );
    }
    if config.logits_chunk().is_none() {
        try_with(
            "logits_chunk_size: 128".into(),
            TrainConfig { logits_chunk_size: Some(128), ..config.clone() },
            batch,
        );
    }
    if config.batch_size > 1 {
        let smaller = config.batch_size / 2;
        let accum = config.grad_accum * config.batch_size.div_ceil(smaller);
        let rows = batch.rows * smaller / config.batch_size;
        try_with(
            format!("batch_size: {smaller}, grad_accum: {accum}"),
            TrainConfig { batch_size: smaller, grad_accum: accum, ..config.clone() },
            BatchShape { rows, ..batch },
        );
    }
    out.sort_by(|a, b| a.1.total_cmp(&b.1));
    out
}

/// Stops a run whose estimate exceeds the memory available, naming what would fit.
pub fn preflight(model: &LlamaConfig, config: &TrainConfig, batch: BatchShape, stored: f64) -> Result<Estimate> {
    let estimate = estimate(model, config, batch, stored);
    let Some(available) = available_bytes() else { return Ok(estimate) };
    if estimate.total() <= available {
        return Ok(estimate);
    }
    let mut options = String::new();
    for (label, bytes) in alternatives(model, config, batch, stored) {
        let verdict = if bytes <= available { "fits" } else { "still too much" };
        options.push_str(&format!("\n  {label}: {:.0} MB ({verdict})", bytes / MB));
    }
    bail!(
        "training {} on {} needs about {:.0} MB at its peak and {:.0} MB are available (MemAvailable or the cgroup's limit); \
         stopping before loading the model. Estimate for batches of {} rows of {} tokens:\n{}\nSettings that lower it:{options}",
        config.model,
        config.data,
        estimate.total() / MB,
        available / MB,
        batch.rows,
        batch.length,
        estimate.describe()
    )
}
