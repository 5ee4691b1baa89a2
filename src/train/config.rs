//! The map a script passes to `train(config)`, checked field by field.

use crate::model::MixedPrecision;
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
    /// Rows {prompt, completion, label} (KTO, TRL's unpaired format); policy vs frozen
    /// reference, plus each row's prompt with another row's completion for the KL term.
    Unpaired,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "lowercase")]
pub enum Init {
    /// Load model.safetensors from the model folder.
    Pretrained,
    /// Random weights from the folder's config.json (for training a model from scratch).
    Random,
}

fn mixed_precision<'de, D: serde::Deserializer<'de>>(d: D) -> Result<MixedPrecision, D::Error> {
    match serde_json::Value::deserialize(d)? {
        serde_json::Value::String(value) => MixedPrecision::parse(&value).map_err(serde::de::Error::custom),
        other => Err(serde::de::Error::custom(format!("mixed_precision must be \"no\" or \"bf16\", got {other}"))),
    }
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
    /// Training rows (JSONL or Parquet); none with `online`, whose rounds make the pairs.
    #[serde(default)]
    pub data: String,
    #[serde(default = "d_backend")]
    pub backend: String,
    /// "bf16": weight products in bf16 with f32 master weights (accelerate's
    /// `mixed_precision`, torch.autocast); "no" (the default): everything in f32.
    #[serde(default, deserialize_with = "mixed_precision")]
    pub mixed_precision: MixedPrecision,
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
    /// Plain-text prompts get the tokenizer's special tokens (e.g. BOS), as TRL before 0.12
    /// and from 0.29 and the SimPO-family repositories do; false: none, as TRL 0.12 to 0.28.
    #[serde(default = "d_true")]
    pub prompt_special_tokens: bool,
    /// The tokenizer folder's named chat template for conversational rows (a file in
    /// `additional_chat_templates/`, or an entry of tokenizer_config.json's list), as
    /// transformers' `apply_chat_template(chat_template=NAME)`; unset: the default one.
    #[serde(default)]
    pub chat_template: Option<String>,
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
    /// Also log each parameter's gradient norm (before clipping, by checkpoint name) at
    /// every logged step, as a "param_grad_norms" event.
    #[serde(default)]
    pub log_param_grad_norms: bool,
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
    /// Leave out (and list) data rows that cannot be used instead of stopping.
    #[serde(default)]
    pub skip_bad_rows: bool,
    /// Train each batch this many times in a row (LoRR's replay number) before drawing the
    /// next; every replay is a full step (forward, backward, update).
    #[serde(default = "d_one")]
    pub replay: usize,
    /// In mode "unpaired": split preference rows into a desirable and an undesirable row,
    /// as TRL's unpair_preference_dataset does (without it they are errors).
    #[serde(default)]
    pub unpair: bool,
    /// Compute each pair's prompt and the completions' common prefix once (one packed
    /// row per pair); the log-probs equal the plain path's.
    #[serde(default)]
    pub prefix_sharing: bool,
    /// Compute the vocabulary projection and log-softmax this many positions at a time,
    /// so the full [rows, length, vocab] logits never exist at once (none: all at once).
    #[serde(default)]
    pub logits_chunk_size: Option<usize>,
    /// Recompute each decoder layer's activations in the backward pass instead of keeping
    /// them (transformers' name); the gradients equal those without it.
    #[serde(default)]
    pub gradient_checkpointing: bool,
    /// Reference log-probs written by `host logps` for this data, used instead of a
    /// resident reference model.
    #[serde(default)]
    pub ref_logps: Option<String>,
    /// Train LoRA adapters on the frozen model instead of all its weights (PEFT's fields:
    /// r, lora_alpha, lora_dropout, target_modules, use_rslora). The reference is the
    /// same model with its adapters left out.
    #[serde(default)]
    pub lora: Option<crate::model::LoraConfig>,
    /// Held-out answer accuracy by greedy generation, before and after training
    /// (`heldout`, since `eval` is a reserved word in Rhai).
    #[serde(default)]
    pub heldout: Option<EvalConfig>,
    #[serde(skip)]
    pub params: Map,
    /// Online rounds: pairs sampled from the current policy and scored by the script's reward.
    #[serde(skip)]
    pub online: Option<OnlineConfig>,
    /// Arms of a comparison (`compare: [...]`), each trained from the same start.
    #[serde(skip)]
    pub compare: Vec<Arm>,
    /// The script function used as the loss ("loss" unless an arm names another).
    #[serde(skip, default = "d_loss_fn")]
    pub loss_fn: String,
    /// Set when this config is one arm of a comparison.
    #[serde(skip)]
    pub arm: Option<String>,
}

fn d_loss_fn() -> String {
    "loss".into()
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EvalConfig {
    /// JSONL rows {"prompt", "answer"}.
    pub data: String,
    #[serde(default = "d_max_new_tokens")]
    pub max_new_tokens: usize,
    /// Use only the first N rows.
    #[serde(default)]
    pub rows: Option<usize>,
}

fn d_max_new_tokens() -> usize {
    64
}

/// `online: #{ prompts, samples_per_prompt, ... }`: each round samples completions of the
/// round's prompts from the current policy, scores them with the script's reward and
/// trains on best-vs-worst pairs. Defaults follow TRL's OnlineDPOConfig where it has the
/// field (temperature 0.9, top_p 1, max_new_tokens 64, two samples a prompt, a round every step).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OnlineConfig {
    /// JSONL or Parquet rows with a `prompt` (text or a list of messages), as `host sample`
    /// reads them; the whole row is handed to the reward (e.g. its `answer`).
    pub prompts: String,
    #[serde(default = "d_samples_per_prompt")]
    pub samples_per_prompt: usize,
    #[serde(default = "d_temperature")]
    pub temperature: f64,
    #[serde(default = "d_top_p")]
    pub top_p: f64,
    /// 0 = off (transformers' generate defaults to 50; TRL's OnlineDPOConfig to off).
    #[serde(default)]
    pub top_k: usize,
    #[serde(default = "d_max_new_tokens")]
    pub max_new_tokens: usize,
    /// Steps each round trains before the next round samples.
    #[serde(default = "d_one")]
    pub every: usize,
    /// Prompts sampled per round [every × batch_size × grad_accum: one pair per row trained].
    #[serde(default)]
    pub prompts_per_round: Option<usize>,
    /// How a prompt's scored samples become a pair: "best_vs_worst" (the only way so far).
    #[serde(default = "d_pairs")]
    pub pairs: String,
    /// Subtracted from the score of a completion that did not end with EOS (TRL's
    /// missing_eos_penalty); none: no penalty.
    #[serde(default)]
    pub missing_eos_penalty: Option<f64>,
}

fn d_samples_per_prompt() -> usize {
    2
}
fn d_temperature() -> f64 {
    0.9
}
fn d_top_p() -> f64 {
    1.0
}
fn d_pairs() -> String {
    "best_vs_worst".into()
}

impl OnlineConfig {
    fn from_dynamic(value: Dynamic) -> Result<Self> {
        if !value.is_map() {
            return Err(anyhow!("train(config): online must be a map, got {}", value.type_name()));
        }
        rhai::serde::from_dynamic(&value).map_err(|e| {
            let text = e.to_string();
            let text = text.split(" (line").next().unwrap_or(&text);
            anyhow!("train(config): online: {}", text.strip_prefix("Syntax error: ").unwrap_or(text))
        })
    }

    fn validate(&self) -> Result<()> {
        let at = "train(config): online";
        if self.prompts.is_empty() {
            return Err(anyhow!("{at}.prompts must name a prompts file"));
        }
        if self.samples_per_prompt < 2 {
            return Err(anyhow!(
                "{at}.samples_per_prompt must be at least 2 (a pair needs two samples), got {}",
                self.samples_per_prompt
            ));
        }
        for (field, value) in [
            ("every", self.every),
            ("max_new_tokens", self.max_new_tokens),
            ("prompts_per_round", self.prompts_per_round.unwrap_or(1)),
        ] {
            if value == 0 {
                return Err(anyhow!("{at}.{field} must be at least 1"));
            }
        }
        // Greedy samples of one prompt are all the same: no pair could differ.
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return Err(anyhow!("{at}.temperature must be a finite number > 0, got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(anyhow!("{at}.top_p must be in (0, 1], got {}", self.top_p));
        }
        if self.pairs != "best_vs_worst" {
            return Err(anyhow!("{at}.pairs must be \"best_vs_worst\", got \"{}\"", self.pairs));
        }
        if self.missing_eos_penalty.is_some_and(|p| !p.is_finite()) {
            return Err(anyhow!("{at}.missing_eos_penalty must be a finite number"));
        }
        Ok(())
    }
}

/// One arm of a comparison: its name (a sub-folder of the run), the loss function it
/// calls, and params that override the shared ones.
#[derive(Clone, Debug)]
pub struct Arm {
    pub name: String,
    pub loss_fn: String,
    pub params: Map,
}

impl TrainConfig {
    pub fn from_map(mut map: Map) -> Result<Self> {
        let params = match map.remove("params") {
            None => Map::new(),
            Some(p) => p.try_cast::<Map>().ok_or_else(|| anyhow!("config.params must be a map"))?,
        };
        check_reserved(&params, "train(config): params")?;
        let compare = match map.remove("compare") {
            None => Vec::new(),
            Some(list) => parse_arms(list)?,
        };
        let online = map.remove("online").map(OnlineConfig::from_dynamic).transpose()?;
        let mut config: Self = rhai::serde::from_dynamic(&Dynamic::from_map(map)).map_err(|e| {
            let text = e.to_string();
            anyhow!("train(config): {}", text.split(" (line").next().unwrap_or(&text))
        })?;
        config.params = params;
        config.compare = compare;
        config.online = online;
        config.validate()?;
        Ok(config)
    }

    /// The config one arm of a comparison trains with.
    pub fn for_arm(&self, arm: &Arm) -> TrainConfig {
        let mut config = self.clone();
        config.compare = Vec::new();
        config.name = Some(arm.name.clone());
        config.loss_fn = arm.loss_fn.clone();
        config.arm = Some(arm.name.clone());
        for (k, v) in &arm.params {
            config.params.insert(k.clone(), v.clone());
        }
        config
    }

    /// This config for the named arm, or itself when `arm` is None.
    pub fn arm_named(&self, arm: Option<&str>) -> Result<TrainConfig> {
        match arm {
            None => Ok(self.clone()),
            Some(name) => {
                let found = self
                    .compare
                    .iter()
                    .find(|a| a.name == name)
                    .ok_or_else(|| anyhow!("train(config): compare has no arm named \"{name}\""))?;
                Ok(self.for_arm(found))
            }
        }
    }

    pub(crate) fn validate(&self) -> Result<()> {
        let positive = [
            ("batch_size", self.batch_size),
            ("grad_accum", self.grad_accum),
            ("replay", self.replay),
            ("epochs", self.epochs),
            ("log_every", self.log_every),
            ("max_length", self.max_length),
        ];
        for (field, value) in positive {
            if value == 0 {
                return Err(anyhow!("train(config): {field} must be at least 1"));
            }
        }
        if self.heldout.as_ref().is_some_and(|e| e.max_new_tokens == 0) {
            return Err(anyhow!("train(config): heldout.max_new_tokens must be at least 1"));
        }
        if let Some(lora) = &self.lora {
            lora.validate("train(config): lora")?;
            // The recomputed forward would draw a second, different dropout mask.
            if self.gradient_checkpointing && lora.lora_dropout > 0.0 {
                return Err(anyhow!(
                    "train(config): gradient_checkpointing needs lora.lora_dropout 0 (got {}): the recomputed layers would draw different dropout masks",
                    lora.lora_dropout
                ));
            }
        }
        if !(self.lr.is_finite() && self.lr >= 0.0) {
            return Err(anyhow!("train(config): lr must be a non-negative number, got {}", self.lr));
        }
        if self.unpair && self.mode != Mode::Unpaired {
            return Err(anyhow!("train(config): unpair applies to mode \"unpaired\" only"));
        }
        match &self.online {
            None if self.data.is_empty() => return Err(anyhow!("train(config): missing field `data`")),
            None => {}
            Some(online) => self.validate_online(online)?,
        }
        if self.mode == Mode::Unpaired {
            // The KL rows pair each prompt with another row's completion: one row has none.
            if self.batch_size < 2 {
                return Err(anyhow!(
                    "train(config): batch_size must be at least 2 in mode \"unpaired\" (the KL term pairs each row's prompt with another row's completion)"
                ));
            }
            let pair_only = [
                ("prefix_sharing", self.prefix_sharing),
                ("ref_logps", self.ref_logps.is_some()),
                ("compare", !self.compare.is_empty()),
            ];
            if let Some((field, _)) = pair_only.iter().find(|(_, set)| *set) {
                return Err(anyhow!("train(config): {field} is not supported in mode \"unpaired\""));
            }
        }
        Ok(())
    }

    /// What an online run needs besides valid `online` fields: pairs to train and the
    /// starting model as its reference.
    fn validate_online(&self, online: &OnlineConfig) -> Result<()> {
        online.validate()?;
        if !self.data.is_empty() {
            return Err(anyhow!(
                "train(config): data and online are both set; an online run trains on the pairs its rounds sample from online.prompts"
            ));
        }
        if self.mode != Mode::Preference {
            return Err(anyhow!("train(config): online needs mode \"preference\" (its rounds build pairs)"));
        }
        // Precomputed reference log-probs belong to a fixed data file; online pairs are new each round.
        let refused = [("ref_logps", self.ref_logps.is_some()), ("compare", !self.compare.is_empty())];
        if let Some((field, _)) = refused.iter().find(|(_, set)| *set) {
            return Err(anyhow!(
                "train(config): {field} cannot be used with online (its pairs are sampled during the run)"
            ));
        }
        if self.max_steps.is_none() {
            return Err(anyhow!("train(config): online needs max_steps (a round trains online.every steps)"));
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
        check!(
            name,
            mode,
            model,
            init,
            data,
            backend,
            mixed_precision,
            seed,
            batch_size,
            grad_accum,
            epochs,
            max_steps,
            max_length,
            max_prompt_length,
            prompt_special_tokens,
            chat_template,
            skip_bad_rows,
            unpair,
            replay,
            ref_logps,
            lora,
            online,
            max_nonfinite_steps,
            weight_decay,
            adam_beta1,
            adam_beta2,
            adam_epsilon,
            output_dir,
            save_model_to
        );
        changed
    }

    /// Takes the fields that may change during a run from `newer`.
    /// (`heldout` is read when it is used.)
    pub fn apply_hot(&mut self, newer: &TrainConfig) {
        self.lr = newer.lr;
        self.max_grad_norm = newer.max_grad_norm;
        self.log_every = newer.log_every;
        self.log_param_grad_norms = newer.log_param_grad_norms;
        self.save_every = newer.save_every;
        self.params = newer.params.clone();
        self.progress = newer.progress;
        self.loss_fn = newer.loss_fn.clone();
        self.heldout = newer.heldout.clone();
        self.prefix_sharing = newer.prefix_sharing;
        self.logits_chunk_size = newer.logits_chunk_size;
        self.gradient_checkpointing = newer.gradient_checkpointing;
    }

    /// Positions per logits chunk, when chunking is on (0 means off, like none).
    pub fn logits_chunk(&self) -> Option<usize> {
        self.logits_chunk_size.filter(|&n| n > 0)
    }

    pub fn beta(&self) -> f64 {
        self.params
            .get("beta")
            .and_then(|b| b.as_float().ok().or_else(|| b.as_int().ok().map(|i| i as f64)))
            .unwrap_or(0.1)
    }
}

/// `compare: [#{ name: "dpo", loss: "dpo_loss", params: #{...} }, ...]`
fn parse_arms(list: Dynamic) -> Result<Vec<Arm>> {
    let list =
        list.try_cast::<rhai::Array>().ok_or_else(|| anyhow!("train(config): compare must be an array of maps"))?;
    let mut arms: Vec<Arm> = Vec::new();
    for (i, item) in list.into_iter().enumerate() {
        let at = format!("train(config): compare[{i}]");
        let mut map = item.try_cast::<Map>().ok_or_else(|| anyhow!("{at} must be a map with name, loss, params"))?;
        let text = |map: &mut Map, key: &str| -> Result<Option<String>> {
            match map.remove(key) {
                None => Ok(None),
                Some(v) => v.into_string().map(Some).map_err(|t| anyhow!("{at}.{key} must be a string, got {t}")),
            }
        };
        let name = text(&mut map, "name")?.ok_or_else(|| anyhow!("{at} needs a name"))?;
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            return Err(anyhow!("{at}.name \"{name}\" must be letters, digits, - or _ (it names a folder)"));
        }
        if arms.iter().any(|a| a.name == name) {
            return Err(anyhow!("{at}.name \"{name}\" is used twice"));
        }
        let loss_fn = text(&mut map, "loss")?.unwrap_or_else(d_loss_fn);
        let params = match map.remove("params") {
            None => Map::new(),
            Some(p) => p.try_cast::<Map>().ok_or_else(|| anyhow!("{at}.params must be a map"))?,
        };
        check_reserved(&params, &format!("{at}.params"))?;
        if let Some(key) = map.keys().next() {
            return Err(anyhow!("{at}: unknown field `{key}` (expected name, loss, params)"));
        }
        arms.push(Arm { name, loss_fn, params });
    }
    if arms.len() == 1 {
        return Err(anyhow!("train(config): compare needs at least two arms"));
    }
    Ok(arms)
}

/// The host sets these keys of the loss's `params` on every call; a config that set them
/// would be silently overwritten.
fn check_reserved(params: &Map, at: &str) -> Result<()> {
    for key in crate::train::loss_call::RESERVED_PARAMS {
        if params.contains_key(key) {
            return Err(anyhow!(
                "{at}.{key}: reserved (the host sets {} on every loss call)",
                crate::train::loss_call::RESERVED_PARAMS.join(", ")
            ));
        }
    }
    Ok(())
}
