//! Benchmarks, each measured side by side with its PyTorch peer in one run:
//! `host bench` (dpo.rs: the training step on CPU), `host bench-gpu` (gpu.rs: the step on a
//! GPU backend) and `host bench-sample` (sample.rs: generation). This file holds what they
//! share: the named model shapes, the DPO script a child trains, medians, the peer's batch.

pub mod dpo;
pub mod gpu;
pub mod sample;

use std::path::Path;
use std::process::Command;

use anyhow::Result;
use serde_json::json;

use crate::data::Example;
use crate::model::LlamaConfig;
use crate::script::{Limits, ScriptEngine, ScriptHost, find_plugins_dir};
use crate::train::interrupt::Interrupt;
use crate::train::trainer::{self, StartWith};
use crate::train::{RunOptions, RunSummary};

/// A model shape a benchmark builds with random weights. Fields are config.json's keys, so a
/// preset reads like the model card's config; `config()` goes through the same parser.
#[derive(Clone, Copy, Debug)]
pub struct ModelPreset {
    pub model_type: &'static str,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub tie_word_embeddings: bool,
}

impl ModelPreset {
    /// This shape as a model config, with token ids bos 0, eos 1, pad 2 (the benches'
    /// tokenizers put them there).
    pub fn config(&self) -> LlamaConfig {
        serde_json::from_value(json!({
            "model_type": self.model_type, "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
            "max_position_embeddings": self.max_position_embeddings, "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta, "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2
        }))
        .expect("a preset is a valid config")
    }

    /// The same shape with another vocabulary size (the bench's tokenizer's, or a large one).
    pub const fn with_vocab(self, vocab_size: usize) -> Self {
        Self { vocab_size, ..self }
    }
}

/// ~0.2M parameters: checks that a bench runs end to end.
pub const TINY: ModelPreset = ModelPreset {
    model_type: "llama",
    vocab_size: 4096,
    hidden_size: 64,
    intermediate_size: 128,
    num_hidden_layers: 2,
    num_attention_heads: 4,
    num_key_value_heads: 2,
    max_position_embeddings: 1024,
    rms_norm_eps: 1e-6,
    rope_theta: 10000.0,
    tie_word_embeddings: false,
};
/// ~10M parameters: the yardstick for the script's overhead.
pub const M10: ModelPreset =
    ModelPreset { hidden_size: 384, intermediate_size: 1024, num_hidden_layers: 6, num_attention_heads: 6, ..TINY };
/// SmolLM2-135M: 30 layers, hidden 576, 9 query / 3 KV heads, 49,152-token vocabulary, tied.
pub const SMOLLM_135M: ModelPreset = ModelPreset {
    model_type: "llama",
    vocab_size: 49152,
    hidden_size: 576,
    intermediate_size: 1536,
    num_hidden_layers: 30,
    num_attention_heads: 9,
    num_key_value_heads: 3,
    max_position_embeddings: 2048,
    rms_norm_eps: 1e-5,
    rope_theta: 100000.0,
    tie_word_embeddings: true,
};
/// Qwen2-0.5B: hidden 896, 24 layers, 14 heads (2 KV), vocab 151,936, tied.
pub const QWEN2_0_5B: ModelPreset = ModelPreset {
    model_type: "qwen2",
    vocab_size: 151936,
    hidden_size: 896,
    intermediate_size: 4864,
    num_hidden_layers: 24,
    num_attention_heads: 14,
    num_key_value_heads: 2,
    max_position_embeddings: 4096,
    rms_norm_eps: 1e-6,
    rope_theta: 1000000.0,
    tie_word_embeddings: true,
};
/// Llama-3.2-1B's shape: hidden 2048, 16 layers, 32 heads (8 KV), vocab 128,256, tied (no RoPE scaling).
pub const LLAMA_1B: ModelPreset = ModelPreset {
    model_type: "llama",
    vocab_size: 128256,
    hidden_size: 2048,
    intermediate_size: 8192,
    num_hidden_layers: 16,
    num_attention_heads: 32,
    num_key_value_heads: 8,
    max_position_embeddings: 4096,
    rms_norm_eps: 1e-6,
    rope_theta: 500000.0,
    tie_word_embeddings: true,
};
/// A 2-layer qwen2: checks `host bench-gpu` end to end on a CPU.
pub const QWEN2_TINY: ModelPreset = ModelPreset {
    vocab_size: 4096,
    hidden_size: 64,
    intermediate_size: 128,
    num_hidden_layers: 2,
    num_attention_heads: 4,
    num_key_value_heads: 2,
    rope_theta: 10000.0,
    ..QWEN2_0_5B
};

/// The middle value (the mean of the two middle ones of an even count); NaN for none.
pub fn median(values: &[f64]) -> f64 {
    let mut s = values.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

/// `$PREFHOST_PYTHON`, else `python3`, whichever first imports torch.
pub fn find_python_with_torch() -> Option<String> {
    let candidates = [std::env::var("PREFHOST_PYTHON").ok(), Some("python3".to_string())];
    candidates.into_iter().flatten().find(|py| {
        Command::new(py)
            .args(["-c", "import torch"])
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

/// The batch bench/torch_dpo_step.py trains on: the same token ids prefhost trains on.
pub fn write_torch_batch(examples: &[Example], pad_id: u32, path: &Path) -> Result<()> {
    let batch = json!({
        "pad_id": pad_id,
        "prompt": examples.iter().map(|e| &e.prompt).collect::<Vec<_>>(),
        "chosen": examples.iter().map(|e| &e.chosen).collect::<Vec<_>>(),
        "rejected": examples.iter().map(|e| &e.rejected).collect::<Vec<_>>(),
    });
    Ok(std::fs::write(path, batch.to_string())?)
}

/// Tokens of both sequences of every pair: the work a step does, whatever the layout.
pub fn pair_tokens(examples: &[Example]) -> usize {
    examples.iter().map(|e| 2 * e.prompt.len() + e.chosen.len() + e.rejected.len()).sum()
}

/// Trains `max_steps` steps of DPO (β = 0.1, plugins/losses/dpo.rhai) through the real
/// trainer (script host, reload checks, metrics): `train_fields` are the config's other
/// fields ("model: ..., data: ..., "), the script is written to `script_path`.
pub fn train_dpo(
    train_fields: &str,
    script_path: &Path,
    run_dir: &Path,
    max_steps: usize,
    rust_dpo_loss: bool,
) -> Result<RunSummary> {
    let script = format!(
        "import \"losses/dpo\" as dpo;\nfn loss(batch, params) {{ dpo::loss(batch, params) }}\ntrain(#{{\n  {train_fields}\n  params: #{{ beta: 0.1 }},\n}});\n"
    );
    std::fs::write(script_path, script)?;
    let plugins = find_plugins_dir(&std::env::current_dir()?.join("scripts/smaug.rhai"), None)?;
    let mut host = ScriptHost::new(ScriptEngine::new(&plugins, &Limits::default()));
    let version = host.load(script_path).map_err(|e| anyhow::anyhow!("{e}"))?;
    let config = trainer::config_of(&version, None)?;
    let options = RunOptions {
        script: script_path.to_path_buf(),
        watch: false,
        run_dir: Some(run_dir.to_path_buf()),
        max_steps: Some(max_steps),
        resume: None,
        resume_anyway: false,
    };
    let with = StartWith { eval_before: false, held: None, interrupt: Interrupt::ctrl_c(), rust_dpo_loss };
    trainer::train_one_locked(&mut host, options, version, config, with)
}
