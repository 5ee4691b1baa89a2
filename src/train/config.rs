//! The map a script passes to `train(config)`, checked field by field.

use anyhow::{Result, anyhow};
use rhai::{Dynamic, Map};
use serde::Deserialize;

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Pairs {prompt, chosen, rejected}; policy vs frozen reference.
    Preference,
    /// Rows {prompt, completion}; no reference.
    Sft,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "lowercase")]
pub enum Init {
    /// Load model.safetensors from the model folder.
    Pretrained,
    /// Random weights from the folder's config.json (for training a model from scratch).
    Random,
}

macro_rules! defaults {
    ($($name:ident: $ty:ty = $value:expr;)*) => { $( fn $name() -> $ty { $value } )* };
}
defaults! {
    d_mode: Mode = Mode::Preference;
    d_init: Init = Init::Pretrained;
    d_backend: String = "cpu".into();
    d_seed: u64 = 42;
    d_batch: usize = 8;
    d_one: usize = 1;
    d_max_length: usize = 256;
    d_max_prompt: usize = 128;
    d_lr: f64 = 1e-4;
    d_zero: f64 = 0.0;
    d_clip: f64 = 1.0;
    d_beta1: f64 = 0.9;
    d_beta2: f64 = 0.999;
    d_eps: f64 = 1e-8;
    d_log_every: usize = 10;
    d_output: String = "runs".into();
    d_true: bool = true;
    d_nonfinite: usize = 5;
    d_save_every: Option<usize> = Some(500);
}

/// Run settings. `params` (loss hyper-parameters) is kept as a Rhai map and handed to
/// the loss as it is.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default = "d_mode")]
    pub mode: Mode,
    /// Hugging Face model folder (config.json, tokenizer.json, model.safetensors).
    pub model: String,
    #[serde(default = "d_init")]
    pub init: Init,
    /// Training rows (JSONL).
    pub data: String,
    #[serde(default = "d_backend")]
    pub backend: String,
    #[serde(default = "d_seed")]
    pub seed: u64,
    #[serde(default = "d_batch")]
    pub batch_size: usize,
    #[serde(default = "d_one")]
    pub grad_accum: usize,
    #[serde(default = "d_one")]
    pub epochs: usize,
    #[serde(default)]
    pub max_steps: Option<usize>,
    #[serde(default = "d_max_length")]
    pub max_length: usize,
    #[serde(default = "d_max_prompt")]
    pub max_prompt_length: usize,
    /// Learning rate when the script defines no `lr(step, total)`.
    #[serde(default = "d_lr")]
    pub lr: f64,
    #[serde(default = "d_zero")]
    pub weight_decay: f64,
    /// Global gradient-norm clip (TRL's max_grad_norm); 0 disables it.
    #[serde(default = "d_clip")]
    pub max_grad_norm: f64,
    #[serde(default = "d_beta1")]
    pub adam_beta1: f64,
    #[serde(default = "d_beta2")]
    pub adam_beta2: f64,
    #[serde(default = "d_eps")]
    pub adam_epsilon: f64,
    #[serde(default = "d_log_every")]
    pub log_every: usize,
    /// Save a resumable checkpoint every N steps (the final one is always saved).
    #[serde(default = "d_save_every")]
    pub save_every: Option<usize>,
    #[serde(default = "d_output")]
    pub output_dir: String,
    /// Also write the final model to this folder (HF layout), e.g. to ship it.
    #[serde(default)]
    pub save_model_to: Option<String>,
    /// Steps in a row with a non-finite loss or gradient before the run stops.
    #[serde(default = "d_nonfinite")]
    pub max_nonfinite_steps: usize,
    /// Show a progress bar (off automatically when stdout is not a terminal).
    #[serde(default = "d_true")]
    pub progress: bool,
    #[serde(skip)]
    pub params: Map,
}

impl TrainConfig {
    pub fn from_map(mut map: Map) -> Result<Self> {
        let params = match map.remove("params") {
            None => Map::new(),
            Some(p) => p.try_cast::<Map>().ok_or_else(|| anyhow!("config.params must be a map"))?,
        };
        let mut config: Self = rhai::serde::from_dynamic(&Dynamic::from_map(map)).map_err(|e| {
            let text = e.to_string();
            anyhow!("train(config): {}", text.split(" (line").next().unwrap_or(&text))
        })?;
        config.params = params;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<()> {
        let positive = [("batch_size", self.batch_size), ("grad_accum", self.grad_accum), ("epochs", self.epochs), ("log_every", self.log_every), ("max_length", self.max_length)];
        for (field, value) in positive {
            if value == 0 {
                return Err(anyhow!("train(config): {field} must be at least 1"));
            }
        }
        if !(self.lr.is_finite() && self.lr >= 0.0) {
            return Err(anyhow!("train(config): lr must be a non-negative number, got {}", self.lr));
        }
        Ok(())
    }

    /// Names of fields that differ from `other` and need a restart to take effect.
    pub fn restart_changes(&self, other: &TrainConfig) -> Vec<&'static str> {
        let mut changed = Vec::new();
        macro_rules! check {
            ($($f:ident),*) => { $( if self.$f != other.$f { changed.push(stringify!($f)); } )* };
        }
        // AdamW's settings are fixed when the optimizer is built, so they need a restart too.
        check!(name, mode, model, init, data, backend, seed, batch_size, grad_accum, epochs, max_steps,
               max_length, max_prompt_length, max_nonfinite_steps, weight_decay, adam_beta1, adam_beta2, adam_epsilon, output_dir, save_model_to);
        changed
    }

    /// Takes the fields that may change during a run from `newer`.
    pub fn apply_hot(&mut self, newer: &TrainConfig) {
        self.lr = newer.lr;
        self.max_grad_norm = newer.max_grad_norm;
        self.log_every = newer.log_every;
        self.save_every = newer.save_every;
        self.params = newer.params.clone();
        self.progress = newer.progress;
    }

    pub fn beta(&self) -> f64 {
        self.params.get("beta").and_then(|b| b.as_float().ok().or_else(|| b.as_int().ok().map(|i| i as f64))).unwrap_or(0.1)
    }
}
