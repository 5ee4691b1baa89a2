//! What a run is built from, before its first step: the plan (model config, tokenizer,
//! tokenized data, memory estimate), the starting policy and the frozen reference.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use burn::prelude::Module;
use burn::tensor::Device;

use super::config::{Init, Mode, TrainConfig};
use super::memory::{self, BatchShape, Estimate};
use super::trainer::config_of;
use crate::data::{Example, LoadReport, TextTokenizer, Truncation, load_examples, load_unpaired_examples};
use crate::model::{Llama, LlamaConfig, RandomInit, load_frozen_model, load_model};
use crate::script::ScriptHost;

/// What a run is made of before any weight is loaded: the model's config, the tokenizer
/// and the tokenized data, and the memory estimate for its largest batch.
pub struct RunPlan {
    pub model_config: LlamaConfig,
    pub tokenizer: TextTokenizer,
    pub examples: Vec<Example>,
    pub report: LoadReport,
    pub memory: Estimate,
    pub batch: BatchShape,
    /// The lengths rows were cut to (max_length no longer than the model's positions).
    pub limits: Truncation,
    /// The checkpoint's bytes per parameter as stored.
    pub stored: f64,
}

impl RunPlan {
    /// With `preflight`, a run that would not fit in the memory available is an error.
    pub fn new(config: &TrainConfig, preflight: bool) -> Result<Self> {
        let model_dir = PathBuf::from(&config.model);
        let model_config = LlamaConfig::from_file(&model_dir.join("config.json"))?;
        let mut tokenizer = TextTokenizer::load_with(
            &model_dir.join("tokenizer.json"),
            &model_config.eos_ids(),
            model_config.pad_token_id,
        )?;
        tokenizer.prompt_special_tokens = config.prompt_special_tokens;
        if let Some(name) = &config.chat_template {
            tokenizer.use_chat_template(name)?;
        }
        if tokenizer.vocab_size() > model_config.vocab_size {
            bail!(
                "{}: tokenizer has {} tokens, the model's vocab_size is {}",
                model_dir.display(),
                tokenizer.vocab_size(),
                model_config.vocab_size
            );
        }
        let limits = Truncation {
            max_length: config.max_length.min(model_config.max_positions()),
            max_prompt_length: config.max_prompt_length,
        };
        let data = Path::new(&config.data);
        let (examples, report) = match config.mode {
            // Online rounds make their pairs as the run goes (src/train/online.rs).
            _ if config.online.is_some() => (Vec::new(), LoadReport::default()),
            Mode::Unpaired => load_unpaired_examples(data, &tokenizer, limits, config.skip_bad_rows, config.unpair)?,
            _ => load_examples(data, &tokenizer, config.mode == Mode::Preference, limits, config.skip_bad_rows)?,
        };
        let batch = match &config.online {
            Some(online) => BatchShape::online(config, online.max_new_tokens + 1, limits),
            None => BatchShape::worst(config, &examples),
        };
        // Frozen copies keep the checkpoint's dtype; the headers say which (and are checked).
        let stored = match config.init {
            Init::Pretrained => crate::model::weights::SafetensorsWeights::open(&model_dir)?.stored_bytes_per_element(),
            Init::Random => 4.0,
        };
        let memory = if preflight {
            memory::preflight(&model_config, config, batch, stored)?
        } else {
            memory::estimate(&model_config, config, batch, stored)
        };
        Ok(Self { model_config, tokenizer, examples, report, memory, batch, limits, stored })
    }
}

/// `host run --dry-run`: the run's memory estimate and what is available, without
/// loading the model or writing anything. Err when it would not fit.
pub fn dry_run(host: &mut ScriptHost, script: &Path) -> Result<()> {
    let version = host.load(script).map_err(|e| anyhow::anyhow!("{e}"))?;
    let config = config_of(&version, None)?;
    let plan = RunPlan::new(&config, false)?;
    println!(
        "{}: {} rows; largest batch {} rows of {} tokens; estimated peak memory:\n{}",
        version.display_path(),
        plan.examples.len(),
        plan.batch.rows,
        plan.batch.length,
        plan.memory.describe()
    );
    match memory::available_bytes() {
        Some(available) => println!("available: {:.0} MB (MemAvailable or the cgroup's limit)", available / 1048576.0),
        None => println!("available: unknown (no /proc/meminfo or cgroup limit to read)"),
    }
    memory::preflight(&plan.model_config, &config, plan.batch, plan.stored).map(|_| ())
}

/// The starting policy: the model folder's weights (or a seeded random init), LoRA
/// adapters with their seeded initial values, and the mixed-precision setting. Seeds the
/// device first, so building it again gives the same weights.
pub fn build_policy(config: &TrainConfig, device: &Device) -> Result<(LlamaConfig, Llama)> {
    crate::model::seed_model_draws(device, config.seed);
    let model_dir = PathBuf::from(&config.model);
    let (model_config, mut policy) = match config.init {
        // A LoRA base never trains: its matrices stay in the checkpoint's dtype.
        Init::Pretrained if config.lora.is_some() => load_frozen_model(&model_dir, device)?,
        Init::Pretrained => load_model(&model_dir, device)?,
        Init::Random => {
            let mc = LlamaConfig::from_file(&model_dir.join("config.json"))?;
            let model = Llama::build(&mc, &mut RandomInit { std: 0.02 }, device)?;
            (mc, model)
        }
    };
    if let Some(lora) = &config.lora {
        policy = policy.with_lora(lora, device)?;
        if let Some(dir) = &lora.init_adapter {
            policy = policy.with_adapters_from(Path::new(dir), lora, device)?;
        }
    }
    // The resident and frozen-base references inherit it: TRL's reference forward runs under the same autocast.
    Ok((model_config, policy.with_precision(config.mixed_precision)))
}

/// The frozen reference kept beside a fully trained policy (no LoRA, no `ref_logps`), on
/// the plain device: the checkpoint's weights in their stored dtype rather than the
/// policy's f32 copy, which the first update would leave behind as a second f32 model. A
/// random init has no stored form; its reference is the policy's starting weights.
pub fn resident_reference(config: &TrainConfig, policy: &Llama, device: &Device) -> Result<Llama> {
    Ok(match config.init {
        Init::Pretrained => load_frozen_model(Path::new(&config.model), &device.clone().without_autodiff())?
            .1
            .with_precision(config.mixed_precision),
        Init::Random => policy.valid(),
    })
}
