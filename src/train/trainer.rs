//! The training loop. Read `train_one_locked` top to bottom: set-up, then for each step:
//! pick up script edits, compute the loss through the script, backward, clip, AdamW, log,
//! save. The [`Learner`] owns what a step changes: the policy, AdamW's state, the data
//! position and the loss plugin's state.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::prelude::Module;
use burn::tensor::{Device, Tensor};
use rhai::{Dynamic, INT, Map};
use serde_json::json;

use super::checkpoint::{self, TrainerState, save_sources};
use super::config::{Mode, TrainConfig};
use super::evaluate::{EvalResult, evaluate, load_eval_rows};
use super::grads::{clip_factor, global_norm, norms_by_name};
use super::identity::RunIdentity;
use super::lock::RunLock;
use super::logps::{HeadBackward, batch_logps, row_sums};
use super::loss_call::{BatchRows, LossBatch, LossOutput, Sequences, loss_params, read_loss_output, rust_dpo_loss};
use super::memory::{self, Estimate};
use super::metrics::{BatchLogps, MetricsLog, Throughput, failure_mode_diagnostics, format_line, record_loss_call};
use super::online::{Online, read_round_pairs};
use super::optimizer::{FusedAdamW, ModelAdamW};
use super::reference::PrecomputedReference;
use super::reload::{CallSite, DryRun, Scripts, require_loss, require_reward, script_lr};
use super::reset::{requested_reset, shrink_toward_initial};
use super::sampler::Sampler;
use crate::backend::backend_device;
use crate::console;
use crate::data::packed::PackedLayout;
use crate::data::{Example, TextTokenizer, collate_pairs, collate_sft, collate_unpaired};
use crate::model::{Llama, LlamaConfig, save_adapter, save_model, save_model_with};
use crate::script::random::loss_call_seed;
use crate::script::{ScriptHost, ScriptVersion, set_script_device};

pub use super::interrupt::Interrupt;
pub use super::setup::{RunPlan, build_policy, dry_run, resident_reference};

#[derive(Clone)]
pub struct RunOptions {
    pub script: PathBuf,
    pub watch: bool,
    pub run_dir: Option<PathBuf>,
    pub max_steps: Option<usize>,
    /// Continue this run folder from its latest checkpoint.
    pub resume: Option<PathBuf>,
    /// With `resume`: go on even if the data, model, tokenizer or ref_logps changed.
    pub resume_anyway: bool,
}

pub struct RunSummary {
    pub run_dir: PathBuf,
    pub steps: usize,
    pub reloads: usize,
    /// Stopped by Ctrl-C after saving a checkpoint.
    pub interrupted: bool,
    /// Held-out accuracy of the trained model, when the config has `heldout`.
    pub eval: Option<EvalResult>,
    /// ... and of the starting model, when asked for.
    pub eval_before: Option<EvalResult>,
    pub final_checkpoint: Option<PathBuf>,
    /// Wall time of each step run here (forward, loss, backward, clip, update).
    pub step_seconds: Vec<f64>,
    /// ... and of the loss calls within it.
    pub loss_call_seconds: Vec<f64>,
}

/// What a run starts with besides its options, script and config.
pub struct StartWith {
    /// Also score the starting model when the config has `heldout` (a comparison scores
    /// it once for all arms).
    pub eval_before: bool,
    /// The lock of the folder `options.resume` names, when the caller holds it already (a
    /// comparison, which took it before looking into the arm's folder).
    pub held: Option<RunLock>,
    /// Asks the loop to save a checkpoint and stop at the next step boundary.
    pub interrupt: Interrupt,
    /// DPO computed in Rust instead of calling the script's loss: `host bench` measures the
    /// step without the script this way.
    pub rust_dpo_loss: bool,
}

/// A write past the file-size limit (`ulimit -f`) then fails with EFBIG, which a save or
/// the metrics log reports and survives like a full disk, instead of SIGXFSZ killing the
/// process mid-write.
fn ignore_file_size_signal() {
    // SAFETY: installs the SIG_IGN disposition for one signal; no handler code runs.
    unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
}

/// Trains as the script says: one run, or each arm of its `compare` list in turn.
pub fn run(host: &mut ScriptHost, options: RunOptions) -> Result<RunSummary> {
    let arm = match &options.resume {
        Some(dir) => checkpoint::read_run_info(dir)?.arm,
        None => None,
    };
    let version = host.load(&options.script).map_err(|e| anyhow::anyhow!("{e}"))?;
    let config = config_of(&version, arm.as_deref())?;
    if !config.compare.is_empty() && arm.is_none() {
        return super::compare::run_comparison(host, options, config, &Interrupt::ctrl_c());
    }
    train_one(host, options, version, config, true)
}

/// The script version's train(config), narrowed to one comparison arm when `arm` is set.
pub fn config_of(version: &ScriptVersion, arm: Option<&str>) -> Result<TrainConfig> {
    let map = version
        .config
        .clone()
        .with_context(|| format!("{}: the script never called train(config)", version.display_path()))?;
    TrainConfig::from_map(map).and_then(|c| c.arm_named(arm)).with_context(|| version.display_path())
}

/// One training run into its own run folder, stopped by Ctrl-C. `eval_before`: also score
/// the starting model when the config has `heldout`.
pub fn train_one(
    host: &mut ScriptHost,
    options: RunOptions,
    version: ScriptVersion,
    config: TrainConfig,
    eval_before: bool,
) -> Result<RunSummary> {
    train_one_locked(
        host,
        options,
        version,
        config,
        StartWith { eval_before, held: None, interrupt: Interrupt::ctrl_c(), rust_dpo_loss: false },
    )
}

/// One training run into its own run folder: set-up, then the step loop.
pub fn train_one_locked(
    host: &mut ScriptHost,
    options: RunOptions,
    version: ScriptVersion,
    config: TrainConfig,
    with: StartWith,
) -> Result<RunSummary> {
    // ---- set-up: script, config, model, data, run folder
    ignore_file_size_signal();
    require_loss(&version, &config.loss_fn)?;
    require_reward(&version, &config)?;
    let mut scripts = Scripts::new(version, &options.script);
    // Held until this function returns (a result, an error or Ctrl-C): one writer per folder.
    let mut _lock = match (with.held, &options.resume) {
        (Some(lock), _) => Some(lock),
        (None, Some(run_dir)) => Some(RunLock::acquire(run_dir)?),
        (None, None) => None,
    };
    // Before any weight is loaded: a resume onto other inputs is refused at once.
    let (changed_inputs, inputs_now) = match &options.resume {
        Some(run_dir) => super::identity::check_resume(run_dir, &config, options.resume_anyway)?,
        None => (Vec::new(), None),
    };
    let mut learner = Learner::new(config, options.max_steps, with.rust_dpo_loss)?;
    set_script_device(learner.device.clone());
    let (run_dir, start, mut log) = match &options.resume {
        Some(run_dir) => {
            let (start, ckpt) = learner.resume(run_dir)?;
            if let Some(now) = inputs_now.filter(|_| !changed_inputs.is_empty()) {
                now.write(run_dir)?;
            }
            let metrics_path = run_dir.join("metrics.jsonl");
            checkpoint::truncate_metrics(&metrics_path, start)?;
            console::line(&format!("resuming {} from {} (step {start})", run_dir.display(), ckpt.display()));
            (
                run_dir.clone(),
                start,
                MetricsLog::append(&metrics_path)?.with_tensorboard(tensorboard_writer(run_dir, Some(start + 1))?),
            )
        }
        None => {
            let (run_dir, identity) = new_run_folder(&options, &learner.config)?;
            _lock = Some(RunLock::acquire(&run_dir)?);
            checkpoint::write_run_info(&run_dir, &options.script, learner.config.arm.as_deref())?;
            identity.write(&run_dir)?;
            let log = MetricsLog::create(&run_dir.join("metrics.jsonl"))?
                .with_tensorboard(tensorboard_writer(&run_dir, None)?);
            (run_dir, 0, log)
        }
    };
    save_sources(&run_dir, start, &scripts.current)?;
    checkpoint::write_train_config(
        &run_dir,
        &scripts.current,
        learner.config.arm.as_deref(),
        Some(learner.total_steps),
        start,
    )?;
    if !changed_inputs.is_empty() {
        console::line(&format!("notice: resuming anyway onto changed inputs:\n  {}", changed_inputs.join("\n  ")));
        log.event(start, "resumed_anyway", json!({"changed": changed_inputs}))?;
    }
    if !learner.skipped_rows.is_empty() && start == 0 {
        let first: Vec<String> = learner.skipped_rows.iter().take(20).map(|(at, why)| format!("{at}: {why}")).collect();
        log.event(0, "data_rows_skipped", json!({"count": learner.skipped_rows.len(), "first": first}))?;
    }
    if options.watch {
        scripts.watch()?;
    }
    let interrupt = with.interrupt;
    interrupt.listen();
    let total = learner.total_steps;
    console::line(&format!(
        "prefhost: {} | {} | {} steps | model {} ({}) | run folder {}",
        scripts.current.display_path(),
        learner.describe_data(),
        total,
        learner.config.model,
        learner.describe_params(),
        run_dir.display()
    ));
    let before = if with.eval_before && start == 0 { learner.evaluate_into(&mut log, 0, "before")? } else { None };
    console::start_bar(total as u64, learner.config.progress);
    let mut nonfinite_in_a_row = 0;
    let mut step_seconds = Vec::with_capacity(total - start);
    let mut throughput = Throughput::default();
    let mut loss_call_seconds = Vec::with_capacity(total - start);

    for step in start..total {
        // ---- Ctrl-C (or the caller's interrupt): save and stop at this step boundary
        if interrupt.requested() {
            console::finish_bar();
            let dir = learner.save_checkpoint(&run_dir, step, &scripts.current)?;
            console::line(&format!(
                "interrupted at step {step}; checkpoint {}; continue with: host run --resume {}",
                dir.display(),
                run_dir.display()
            ));
            let reloads = scripts.reloads;
            return Ok(RunSummary {
                run_dir,
                steps: step,
                reloads,
                interrupted: true,
                eval: None,
                eval_before: before,
                final_checkpoint: Some(dir),
                step_seconds,
                loss_call_seconds,
            });
        }

        // ---- hot reload: a new version is swapped in only if it compiles and its loss runs
        let at = CallSite { step, config: &mut learner.config, log: &mut log };
        let dry_run = DryRun { device: &learner.device, total_steps: total, loss_state: &learner.loss_state };
        scripts.reload_if_edited(host, at, dry_run, &run_dir)?;

        // ---- the script's on_step hook: a reset of chosen weights toward their initial values
        if scripts.current.has_fn("on_step", 2) {
            learner.on_step(host, &scripts.current, step, &mut log)?;
        }

        // ---- online: a round's first step samples from the current policy, scores, pairs
        learner.start_round_if_due(host, &mut scripts, &mut log, step, &run_dir)?;
        if learner.online.is_some() && learner.examples.is_empty() {
            // No prompt of this round gave a usable pair: nothing to train until the next one.
            console::advance(String::new());
            learner.save_if_due(&run_dir, step + 1, &scripts.current)?;
            continue;
        }

        // ---- random draws (LoRA dropout) seeded by step, so a resumed run makes the same ones
        learner.device.seed(learner.config.seed ^ (step as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));

        // ---- learning rate: the script's lr(step, total) or the config's constant
        let step_start = std::time::Instant::now();
        let at = CallSite { step, config: &mut learner.config, log: &mut log };
        let lr =
            scripts.call_with_fallback(at, "lr", |version, config| script_lr(host, version, step, total, config.lr))?;

        // ---- forward + backward over grad_accum micro-batches, then the global norm (the clip is AdamW's)
        let micro = learner.forward_backward(host, &mut scripts, &mut log, step)?;
        let grads = micro.grads;
        if learner.config.log_param_grad_norms && logs_at(step + 1, total, &learner.config) {
            log.event(step + 1, "param_grad_norms", json!(norms_by_name(learner.policy(), &grads)))?;
        }
        let norm = global_norm(learner.policy(), &grads);

        // ---- a NaN/inf loss or gradient: skip the update; too many in a row end the run
        if !norm.is_finite() || micro.outputs.iter().any(|o| !o.loss_value.is_finite()) {
            learner.skipped_steps += 1;
            nonfinite_in_a_row += 1;
            let losses: Vec<String> = micro.outputs.iter().map(|o| o.loss_value.to_string()).collect();
            console::line(&format!(
                "step {}: non-finite loss [{}] or grad_norm {norm}; update skipped ({nonfinite_in_a_row} in a row)",
                step + 1,
                losses.join(", ")
            ));
            log.event(
                step + 1,
                "nonfinite_skipped",
                json!({"losses": losses, "grad_norm": norm.to_string(), "in_a_row": nonfinite_in_a_row}),
            )?;
            if nonfinite_in_a_row >= learner.config.max_nonfinite_steps {
                console::finish_bar();
                bail!(
                    "stopping: {nonfinite_in_a_row} steps in a row had a non-finite loss or gradient (max_nonfinite_steps); the last checkpoint in {} is intact",
                    run_dir.display()
                );
            }
            continue;
        }

        // ---- the update: AdamW, and the loss state the step's calls left
        nonfinite_in_a_row = 0;
        learner.loss_state = micro.loss_state;
        for output in &micro.outputs {
            record_loss_call(&mut log, output.loss_value, &output.loss, &output.logps);
        }
        let mean_loss = micro.outputs.iter().map(|o| o.loss_value).sum::<f64>() / micro.outputs.len().max(1) as f64;
        throughput.step(micro.samples, micro.tokens, mean_loss);
        learner.update(lr, grads, clip_factor(norm, learner.config.max_grad_norm));
        step_seconds.push(step_start.elapsed().as_secs_f64());
        loss_call_seconds.push(micro.outputs.iter().map(|o| o.loss_call_seconds).sum());
        log.add("grad_norm", norm);
        log.add("learning_rate", lr);

        // ---- log, hooks, checkpoints
        let done = step + 1;
        console::advance(String::new());
        if logs_at(done, total, &learner.config) {
            throughput.add_interval_rates(&mut log);
            let means = log.flush(done, learner.sampler.epoch_progress())?;
            console::line(&format_line(done, total, &means));
            call_on_log(host, &scripts.current, done, &means);
        }
        learner.save_if_due(&run_dir, done, &scripts.current)?;
    }

    // ---- the end: final checkpoint, memory report, model, held-out accuracy, summary
    console::finish_bar();
    let final_dir = learner.save_checkpoint(&run_dir, total, &scripts.current)?;
    // The preflight's estimate beside what the run took (its checkpoint saves included).
    if let Some(peak) = memory::peak_rss_bytes() {
        console::line(&format!(
            "peak memory {:.0} MB (estimated {:.0} MB)",
            peak / 1048576.0,
            learner.memory.total() / 1048576.0
        ));
        learner.memory.write_report(&run_dir.join("memory.json"), peak)?;
    }
    if let Some(target) = learner.config.save_model_to.clone() {
        save_model(&learner.policy().valid(), &learner.model_config, &learner.tokenizer.path, Path::new(&target))?;
        console::line(&format!("model written to {target}"));
    }
    if learner.skipped_steps > 0 {
        console::line(&format!("{} step(s) skipped for non-finite values", learner.skipped_steps));
    }
    let eval = learner.evaluate_into(&mut log, total, "after")?;
    let summary = throughput.summary();
    console::line(&format!(
        "train summary: {}",
        summary.iter().map(|(k, v)| format!("{k}={v:.4}")).collect::<Vec<_>>().join("  ")
    ));
    log.event(total, "train_summary", json!(summary))?;
    console::line(&format!("done: {total} steps, checkpoint {}", final_dir.display()));
    let reloads = scripts.reloads;
    Ok(RunSummary {
        run_dir,
        steps: total,
        reloads,
        interrupted: false,
        eval,
        eval_before: before,
        final_checkpoint: Some(final_dir),
        step_seconds,
        loss_call_seconds,
    })
}

/// Whether `done` steps end a log interval (or the run).
fn logs_at(done: usize, total: usize, config: &TrainConfig) -> bool {
    done.is_multiple_of(config.log_every) || done == total
}

/// The folder a new run writes into: `--run-dir`, or `output_dir/NAME-TIMESTAMP`; created
/// here, and refused if it exists; with the fingerprints of its inputs, taken before the
/// folder is made (after the loaders checked the inputs, so that their errors come first).
fn new_run_folder(options: &RunOptions, config: &TrainConfig) -> Result<(PathBuf, RunIdentity)> {
    let run_dir = run_folder_for(options, config);
    if run_dir.exists() {
        bail!(
            "{}: run folder already exists; continue it with --resume, or choose another with --run-dir",
            run_dir.display()
        );
    }
    let identity = RunIdentity::of(config)?;
    std::fs::create_dir_all(&run_dir).with_context(|| format!("cannot create {}", run_dir.display()))?;
    Ok((run_dir, identity))
}

/// The folder a new run (or comparison) of `options` writes into: `--run-dir`, or
/// `output_dir/NAME-TIMESTAMP` (NAME: the config's `name`, else the script's file name).
pub fn run_folder_for(options: &RunOptions, config: &TrainConfig) -> PathBuf {
    let name = config.name.clone().unwrap_or_else(|| stem(&options.script));
    options
        .run_dir
        .clone()
        .unwrap_or_else(|| Path::new(&config.output_dir).join(format!("{name}-{}", crate::clock::timestamp())))
}

/// The script's `on_log(step, metrics)` hook, when it has one; a failure is reported and
/// the run goes on.
fn call_on_log(
    host: &ScriptHost,
    version: &ScriptVersion,
    done: usize,
    means: &std::collections::BTreeMap<String, f64>,
) {
    if !version.has_fn("on_log", 2) {
        return;
    }
    let map: Map = means.iter().map(|(k, v)| (k.as_str().into(), Dynamic::from_float(*v))).collect();
    if let Err(e) = host.call(version, "on_log", vec![Dynamic::from_int(done as INT), Dynamic::from_map(map)]) {
        console::line(&format!("on_log hook failed (run goes on):\n{e}"));
    }
}

/// The tokens a row puts through the policy: the prompt with each completion (no padding).
fn row_tokens(example: &Example) -> usize {
    let rejected = if example.rejected.is_empty() { 0 } else { example.prompt.len() + example.rejected.len() };
    example.prompt.len() + example.chosen.len() + rejected
}

/// A new TensorBoard events file in `RUN_DIR/tb/`; a resumed run's starts with SessionLog START
/// at the first step it runs, so TensorBoard drops what the interrupted run logged from there on.
fn tensorboard_writer(run_dir: &Path, resumed_at: Option<usize>) -> Result<crate::report::tensorboard::EventWriter> {
    crate::report::tensorboard::EventWriter::create(&run_dir.join("tb"), &super::lock::hostname(), resumed_at)
}

fn stem(path: &Path) -> String {
    path.file_stem().and_then(|s| s.to_str()).unwrap_or("run").to_string()
}

/// Owns what the steps change and read: the policy and AdamW's state, the frozen
/// reference, the data with its sampler, and the loss plugin's state.
struct Learner {
    config: TrainConfig,
    device: Device,
    /// Always Some between steps; the update takes it out so that the optimizer holds the
    /// only handle on the weights and can update them in place (a second handle would make
    /// it copy every parameter first).
    policy: Option<Llama>,
    /// AdamW with transformers' Trainer's decay groups, and its moments.
    optimizer: ModelAdamW,
    /// The frozen reference: a resident copy of the starting model, the policy's own frozen
    /// weights (LoRA), or log-probs read from `ref_logps`. None in SFT mode.
    reference: Option<Reference>,
    model_config: LlamaConfig,
    tokenizer: TextTokenizer,
    examples: Vec<Example>,
    /// Which rows each micro-batch trains on.
    sampler: Sampler,
    total_steps: usize,
    /// `params.state` of the loss as of the last applied update.
    loss_state: Map,
    /// Steps whose update was skipped for a non-finite loss or gradient.
    skipped_steps: usize,
    /// Data rows left out by skip_bad_rows: (file:line, reason).
    skipped_rows: Vec<(String, String)>,
    /// With LoRA: the adapters' initial values, what a reset moves them back toward.
    initial_adapters: Option<crate::model::weights::NamedTensors>,
    /// The preflight's estimate of the run's peak memory.
    memory: Estimate,
    /// See `StartWith::rust_dpo_loss`.
    rust_dpo_loss: bool,
    /// With `online`: the prompts and how rounds sample them.
    online: Option<Online>,
    /// With `online`: the round whose pairs `examples` holds.
    round: Option<usize>,
}

// Built once per run: the size difference between variants costs nothing worth a Box.
#[allow(clippy::large_enum_variant)]
enum Reference {
    Resident(Llama),
    /// LoRA: the policy with its adapters left out (no second model in memory).
    FrozenBase,
    Precomputed(PrecomputedReference),
}

/// Which loss call this is: the step, the micro-batch within it, and the loss state it
/// starts from.
struct LossCall<'a> {
    step: usize,
    micro_batch: usize,
    state: &'a Map,
}

/// One loss call's result.
struct StepResult {
    loss: LossOutput,
    loss_value: f64,
    /// The log-probs the loss saw, for the metrics.
    logps: BatchLogps,
    /// Set when the logits were computed in chunks: it turns the loss's gradients into
    /// the model's.
    head: Option<HeadBackward>,
    /// Wall time of the loss call alone (the script's, or Rust's for the bench).
    loss_call_seconds: f64,
}

/// A step's micro-batches, forward and backward.
struct MicroBatches {
    grads: GradientsParams,
    outputs: Vec<StepResult>,
    /// The loss state the last call returned: kept only if the update is applied.
    loss_state: Map,
    /// Rows and their tokens (no padding), for the throughput.
    samples: usize,
    tokens: usize,
}

impl Learner {
    fn policy(&self) -> &Llama {
        self.policy.as_ref().expect("the policy is in place between steps")
    }

    fn new(config: TrainConfig, max_steps_override: Option<usize>, rust_dpo_loss: bool) -> Result<Self> {
        let train_device = backend_device(&config.backend)?.autodiff();
        let RunPlan { tokenizer, examples, report, memory, limits, model_config, .. } = RunPlan::new(&config, true)?;
        let online = config
            .online
            .is_some()
            .then(|| Online::load(&config, &tokenizer, model_config.max_positions(), limits))
            .transpose()?;
        let (model_config, policy) = build_policy(&config, &train_device)?;
        if report.truncated > 0 {
            console::line(&format!(
                "note: {} of {} rows truncated to max_length {}",
                report.truncated, report.rows, limits.max_length
            ));
        }
        if report.merged_at_boundary_count > 0 {
            console::line(&format!(
                "note: in {} row(s) of {} ({}{}) the prompt and a completion tokenize differently as one text; prefhost tokenizes them apart, as TRL 0.12 to 0.28 does (TRL before 0.12 and from 0.29 tokenize the joined text)",
                report.merged_at_boundary_count,
                config.data,
                report.merged_at_boundary.join(", "),
                if report.merged_at_boundary_count > report.merged_at_boundary.len() { ", ..." } else { "" }
            ));
        }
        if !report.skipped.is_empty() {
            console::line(&format!(
                "note: {} row(s) of {} left out (skip_bad_rows):",
                report.skipped.len(),
                config.data
            ));
            for (at, reason) in report.skipped.iter().take(10) {
                console::line(&format!("  {at}: {reason}"));
            }
        }
        let reference = match (&config.ref_logps, config.mode != Mode::Sft) {
            (_, false) => None,
            (Some(path), true) => Some(Reference::Precomputed(PrecomputedReference::load(Path::new(path), &examples)?)),
            (None, true) if config.lora.is_some() => Some(Reference::FrozenBase),
            (None, true) => Some(Reference::Resident(resident_reference(&config, &policy, &train_device)?)),
        };
        let per_step = config.batch_size * config.grad_accum;
        let total_steps = max_steps_override
            .or(config.max_steps)
            .unwrap_or(config.epochs * examples.len().div_ceil(per_step) * config.replay);
        let sampler = Sampler::new(examples.len(), config.seed, config.batch_size, config.replay);
        let initial_adapters = config.lora.is_some().then(|| policy.adapter_tensors());
        let optimizer = new_optimizer(&config, &policy);
        Ok(Self {
            config,
            device: train_device,
            policy: Some(policy),
            optimizer,
            reference,
            model_config,
            tokenizer,
            examples,
            sampler,
            total_steps,
            loss_state: Map::new(),
            skipped_steps: 0,
            skipped_rows: report.skipped,
            initial_adapters,
            memory,
            rust_dpo_loss,
            online,
            round: None,
        })
    }

    /// "N rows", or with `online` the prompts its rounds sample.
    fn describe_data(&self) -> String {
        match &self.online {
            Some(online) => format!(
                "online: {} prompts, {} samples each, a round every {} steps",
                online.prompt_count(),
                online.config.samples_per_prompt,
                online.config.every
            ),
            None => format!("{} rows", self.examples.len()),
        }
    }

    /// "N params", or with LoRA "N params, M trainable (LoRA r=…)".
    fn describe_params(&self) -> String {
        let total = self.policy().num_params();
        match &self.config.lora {
            None => format!("{total} params"),
            Some(lora) => format!(
                "{total} params, {} trainable (LoRA r={} on {})",
                self.policy().num_trainable_params(),
                lora.r,
                lora.modules().unwrap_or_default().join(",")
            ),
        }
    }

    /// With `online`, at the first step of a round: the round's samples, rewards and pairs
    /// from the current policy; its pairs become the rows the sampler serves.
    fn start_round_if_due(
        &mut self,
        host: &ScriptHost,
        scripts: &mut Scripts,
        log: &mut MetricsLog,
        step: usize,
        run_dir: &Path,
    ) -> Result<()> {
        let Some(online) = self.online.as_ref().filter(|o| o.starts_round(step)) else { return Ok(()) };
        let round = online.round_of(step);
        let policy = self.policy.as_ref().expect("the policy is in place between steps").valid();
        let at = CallSite { step, config: &mut self.config, log: &mut *log };
        let (pairs, stats) = online.run_round(&policy, &self.tokenizer, host, scripts, at, run_dir)?;
        stats.log(log, round, step)?;
        self.sampler = Sampler::new(pairs.len(), online.round_seed(round), self.config.batch_size, self.config.replay);
        self.examples = pairs;
        self.round = Some(round);
        Ok(())
    }

    /// A checkpoint after `done` steps when save_every asks for one (the last step's is
    /// saved at the end).
    fn save_if_due(&self, run_dir: &Path, done: usize, script: &ScriptVersion) -> Result<()> {
        if self.config.save_every.is_some_and(|n| n > 0 && done.is_multiple_of(n) && done != self.total_steps) {
            self.save_checkpoint(run_dir, done, script)?;
        }
        Ok(())
    }

    /// Micro-batch `micro` of `step`: its rows as the sampler picks them.
    fn batch_for(&mut self, step: usize, micro: usize) -> Vec<Example> {
        self.sampler.rows_for(step, micro).iter().map(|&i| self.examples[i].clone()).collect()
    }

    /// Calls the script's `on_step(step, total)` and applies the reset it asks for. A failing
    /// hook or a bad request is reported and logged; the run goes on without the reset.
    fn on_step(&mut self, host: &ScriptHost, version: &ScriptVersion, step: usize, log: &mut MetricsLog) -> Result<()> {
        let asked = host
            .call(version, "on_step", vec![Dynamic::from_int(step as INT), Dynamic::from_int(self.total_steps as INT)])
            .map_err(|e| e.to_string())
            .and_then(|value| requested_reset(&value).map_err(|e| format!("{}: {e}", version.fn_location("on_step"))));
        match asked {
            Ok(None) => Ok(()),
            Ok(Some(request)) => {
                let initial = self.initial_policy()?;
                let policy = self.policy.take().expect("the policy is in place between steps");
                let (policy, moved) = shrink_toward_initial(policy, &initial, &request);
                self.policy = Some(policy);
                if moved == 0 {
                    let error = format!(
                        "{}: reset.modules {:?} selects no trainable parameter (with LoRA only adapter targets train)",
                        version.fn_location("on_step"),
                        request.modules
                    );
                    console::line(&format!("on_step at step {step}: nothing reset:\n{error}"));
                    return log.event(step, "on_step_failed", json!({"error": error}));
                }
                console::line(&format!(
                    "step {step}: reset {moved} parameter tensors of {} toward their initial values (factor {})",
                    request.modules.join(", "),
                    request.factor
                ));
                log.event(step, "reset", request.describe(moved))
            }
            Err(error) => {
                console::line(&format!("on_step hook failed at step {step} (run goes on, nothing reset):\n{error}"));
                log.event(step, "on_step_failed", json!({"error": error}))
            }
        }
    }

    /// The policy as this run built it at the start (same weights, same LoRA initial draws).
    /// With LoRA only the adapters train, so it is the policy with its initial adapters
    /// (the frozen base shared); otherwise the model is built again.
    fn initial_policy(&self) -> Result<Llama> {
        match &self.initial_adapters {
            Some(adapters) => self.policy().clone().set_adapters(&mut adapters.clone(), &self.device),
            None => Ok(build_policy(&self.config, &self.device)?.1),
        }
    }

    /// Forward and backward over the step's grad_accum micro-batches, each through the
    /// script's loss (falling back to the previous script version if it fails). The loss
    /// state each micro-batch returns is the next one's input (γ-PO's queue grows per
    /// forward, as in its reference).
    fn forward_backward(
        &mut self,
        host: &ScriptHost,
        scripts: &mut Scripts,
        log: &mut MetricsLog,
        step: usize,
    ) -> Result<MicroBatches> {
        // gradient_checkpointing may have been switched by a reload.
        self.policy.as_mut().expect("the policy is in place between steps").recompute_layers =
            self.config.gradient_checkpointing;
        let mut accumulator = GradientsAccumulator::<Llama>::new();
        let mut outputs = Vec::with_capacity(self.config.grad_accum);
        let mut loss_state = self.loss_state.clone();
        let (mut samples, mut tokens) = (0, 0);
        for micro in 0..self.config.grad_accum {
            let examples = self.batch_for(step, micro);
            samples += examples.len();
            tokens += examples.iter().map(row_tokens).sum::<usize>();
            // The closure reads the learner, so the config a fallback may change is a copy.
            let mut config = self.config.clone();
            let call = LossCall { step, micro_batch: micro, state: &loss_state };
            let at = CallSite { step, config: &mut config, log: &mut *log };
            let mut output = scripts
                .call_with_fallback(at, "loss", |version, config| self.loss(host, version, config, &examples, &call))?;
            self.config = config;
            if let Some(state) = output.loss.state.clone() {
                loss_state = state;
            }
            let scaled = output.loss.loss.clone().div_scalar(self.config.grad_accum as f64);
            let grads = match output.head.take() {
                Some(head) => head.gradients(scaled.backward(), self.policy()),
                None => GradientsParams::from_grads(scaled.backward(), self.policy()),
            };
            accumulator.accumulate(self.policy(), grads);
            outputs.push(output);
        }
        Ok(MicroBatches { grads: accumulator.grads(), outputs, loss_state, samples, tokens })
    }

    /// AdamW on the policy, in place, each gradient first multiplied by `grad_scale` (the clip).
    fn update(&mut self, lr: f64, grads: GradientsParams, grad_scale: f64) {
        let policy = self.policy.take().expect("the policy is in place between steps");
        self.policy = Some(self.optimizer.step(lr, policy, grads, grad_scale));
    }

    /// Forward passes, the batch, and the script's loss.
    fn loss(
        &self,
        host: &ScriptHost,
        version: &ScriptVersion,
        config: &TrainConfig,
        examples: &[Example],
        call: &LossCall,
    ) -> Result<StepResult, String> {
        let (batch, head) = self.loss_batch(examples, config);
        let logps = logps_for_metrics(&batch, examples);
        let seed = loss_call_seed(config.seed, call.step, call.micro_batch);
        let params = loss_params(&config.params, call.step, self.total_steps, call.state, seed);
        let b = batch.batch_size;
        let pairs = matches!(batch.rows, BatchRows::Pairs { .. });
        let map = batch.into_map();
        let call_start = std::time::Instant::now();
        let mut loss = if self.rust_dpo_loss {
            rust_dpo_loss(&map, config.beta())?
        } else {
            let value = host
                .call(version, &config.loss_fn, vec![Dynamic::from_map(map), Dynamic::from_map(params)])
                .map_err(|e| e.to_string())?;
            read_loss_output(value, b).map_err(|e| format!("{}: {e}", version.fn_location(&config.loss_fn)))?
        };
        let loss_call_seconds = call_start.elapsed().as_secs_f64();
        if pairs && loss.chosen_rewards.is_none() {
            // Losses that report no rewards get DPO's implicit reward β·(logp − ref logp).
            let beta = config.beta() as f32;
            let reward = |p: &[f32], r: &[f32]| p.iter().zip(r).map(|(p, r)| beta * (p - r)).collect::<Vec<_>>();
            loss.chosen_rewards = Some(reward(&logps.chosen, &logps.ref_chosen));
            loss.rejected_rewards = Some(reward(&logps.rejected, &logps.ref_rejected));
        }
        let loss_value = crate::tensor::values(loss.loss.clone())[0] as f64;
        Ok(StepResult { loss, loss_value, logps, head, loss_call_seconds })
    }

    /// The batch a loss sees for `examples`: the policy's log-probs (with gradient) and the
    /// reference's, by mode; and the chunked head when the logits were computed in chunks.
    fn loss_batch(&self, examples: &[Example], config: &TrainConfig) -> (LossBatch, Option<HeadBackward>) {
        let refs: Vec<&Example> = examples.iter().collect();
        let b = examples.len();
        let pad = self.tokenizer.pad_id;
        let chunk = config.logits_chunk();
        let Some(reference) = &self.reference else {
            // SFT: the targets alone.
            let batch = collate_sft(&refs, pad, &self.device);
            let (tokens, head) = batch_logps(self.policy(), &batch, None, chunk);
            let lengths = Tensor::<1>::from_floats(batch.lengths.as_slice(), &self.device);
            let count: f32 = batch.lengths.iter().sum();
            let chosen = Sequences::new(tokens.clone(), batch.mask.clone(), lengths, None);
            let chosen_nll = tokens.sum().neg() / count.max(1.0);
            return (LossBatch { batch_size: b, rows: BatchRows::Sft { chosen, chosen_nll } }, head);
        };
        if config.mode == Mode::Unpaired {
            return self.unpaired_batch(&refs, config);
        }
        let batch = collate_pairs(&refs, pad, &self.device);
        let packed = config.prefix_sharing.then(|| PackedLayout::new(&refs, pad, true));
        let (tokens, head) = batch_logps(self.policy(), &batch, packed.as_ref(), chunk);
        let plain = self.device.clone().without_autodiff();
        let ref_tokens = match reference {
            Reference::Resident(model) => {
                batch_logps(model, &collate_pairs(&refs, pad, &plain), packed.as_ref(), chunk).0
            }
            Reference::FrozenBase => {
                let base = self.policy().valid().without_adapters();
                batch_logps(&base, &collate_pairs(&refs, pad, &plain), packed.as_ref(), chunk).0
            }
            Reference::Precomputed(rows) => rows.token_logps(&refs, batch.mask.dims()[1], &plain),
        }
        .autodiff();
        // Chosen rows first, then rejected: [2B, W] halves.
        let lengths = Tensor::<1>::from_floats(batch.lengths.as_slice(), &self.device);
        let half = |t: Tensor<2>, i: usize| t.narrow(0, i * b, b);
        let chosen = Sequences::new(
            half(tokens.clone(), 0),
            half(batch.mask.clone(), 0),
            lengths.clone().narrow(0, 0, b),
            Some(half(ref_tokens.clone(), 0)),
        );
        let rejected = Sequences::new(
            half(tokens.clone(), 1),
            half(batch.mask.clone(), 1),
            lengths.narrow(0, b, b),
            Some(half(ref_tokens, 1)),
        );
        let count: f32 = batch.lengths[..b].iter().sum();
        let chosen_nll = half(tokens, 0).sum().neg() / count.max(1.0);
        (LossBatch { batch_size: b, rows: BatchRows::Pairs { chosen, rejected, chosen_nll } }, head)
    }

    /// The unpaired (KTO) batch: the completions (policy with gradient, reference),
    /// `labels` (1 = desirable), and the summed log-probs of the KL rows under the policy and
    /// the reference, without gradient (TRL computes them under no_grad).
    fn unpaired_batch(&self, refs: &[&Example], config: &TrainConfig) -> (LossBatch, Option<HeadBackward>) {
        let pad = self.tokenizer.pad_id;
        let chunk = config.logits_chunk();
        let plain = self.device.clone().without_autodiff();
        let (batch, _) = collate_unpaired(refs, pad, &self.device);
        let (rows, kl_rows) = collate_unpaired(refs, pad, &plain);
        let (tokens, head) = batch_logps(self.policy(), &batch, None, chunk);
        let frozen_base;
        let reference = match &self.reference {
            Some(Reference::Resident(model)) => model,
            Some(Reference::FrozenBase) => {
                frozen_base = self.policy().valid().without_adapters();
                &frozen_base
            }
            _ => unreachable!("mode unpaired has a model reference (the config refuses ref_logps)"),
        };
        let ref_tokens = batch_logps(reference, &rows, None, chunk).0.autodiff();
        let kl_logps = row_sums(batch_logps(&self.policy().valid(), &kl_rows, None, chunk).0).autodiff();
        let ref_kl_logps = row_sums(batch_logps(reference, &kl_rows, None, chunk).0).autodiff();
        let labels: Vec<f32> = refs.iter().map(|e| if e.label == Some(true) { 1.0 } else { 0.0 }).collect();
        let lengths = Tensor::<1>::from_floats(batch.lengths.as_slice(), &self.device);
        let completion = Sequences::new(tokens, batch.mask.clone(), lengths, Some(ref_tokens));
        let labels = Tensor::<1>::from_floats(labels.as_slice(), &self.device);
        (
            LossBatch {
                batch_size: refs.len(),
                rows: BatchRows::Unpaired { completion, labels, kl_logps, ref_kl_logps },
            },
            head,
        )
    }

    /// Held-out accuracy of the current policy, when the config has `heldout`, printed and
    /// logged at `step` as the accuracy `when` ("before" or "after") training.
    fn evaluate_into(&self, log: &mut MetricsLog, step: usize, when: &str) -> Result<Option<EvalResult>> {
        let Some(eval) = &self.config.heldout else { return Ok(None) };
        let rows = load_eval_rows(Path::new(&eval.data), eval.rows)?;
        let result = evaluate(&self.policy().valid(), &self.tokenizer, &rows, eval.max_new_tokens)?;
        console::line(&format!(
            "eval {when} training: accuracy {:.3} ({}/{})",
            result.accuracy, result.correct, result.total
        ));
        log.event(
            step,
            "eval",
            json!({"accuracy": result.accuracy, "correct": result.correct, "total": result.total}),
        )?;
        Ok(Some(result))
    }

    /// What decides the next step, as a checkpoint keeps it.
    fn trainer_state(&self, step: usize) -> Result<TrainerState> {
        Ok(TrainerState {
            step,
            epoch: self.sampler.epoch,
            cursor: self.sampler.cursor,
            order: self.sampler.order.clone(),
            rng: self.sampler.rng.clone(),
            loss_state: serde_json::to_value(Dynamic::from_map(self.loss_state.clone()))
                .context("the loss state must hold plain values (numbers, strings, arrays, maps) to be saved")?,
            skipped_steps: self.skipped_steps,
            replayed: self.sampler.replayed.clone(),
            online_round: self.round.map(|round| checkpoint::RoundMark { round, pairs: self.examples.len() }),
        })
    }

    /// Writes `checkpoint-{step}`: the policy (HF layout, or with LoRA the adapters in
    /// PEFT's layout, the base being config.model), optimizer state, trainer state and the
    /// sources of the script version in use.
    fn save_checkpoint(&self, run_dir: &Path, step: usize, script: &ScriptVersion) -> Result<PathBuf> {
        let state = self.trainer_state(step)?;
        checkpoint::save(run_dir, &state, &self.optimizer, script, |dir, extra| match &self.config.lora {
            Some(lora) => {
                save_adapter(&self.policy().valid(), lora, &self.config.model, &self.tokenizer.path, dir, extra)
            }
            None => save_model_with(&self.policy().valid(), &self.model_config, &self.tokenizer.path, dir, extra),
        })
    }

    /// Puts back the policy, optimizer, data position, RNG and loss state of the run's
    /// latest sound checkpoint; returns its step and folder. The reference stays the model the config
    /// names, as in the original run.
    fn resume(&mut self, run_dir: &Path) -> Result<(usize, PathBuf)> {
        let (_, ckpt) = checkpoint::latest_checkpoint(run_dir)?;
        let state = checkpoint::read_state(&ckpt)?;
        match &self.online {
            None => self.sampler.restore(&ckpt, &state)?,
            // At a round's start the next step samples a new round; in its middle, the
            // round's pairs are read back, since the policy that sampled them has moved on.
            Some(online) if !online.starts_round(state.step) => {
                let round = online.round_of(state.step);
                let pairs = read_round_pairs(run_dir, round)?;
                if state.online_round != Some(checkpoint::RoundMark { round, pairs: pairs.len() }) {
                    bail!(
                        "{}: the checkpoint was made in round {round} with other pairs than online/ holds ({:?} vs {} pairs)",
                        ckpt.display(),
                        state.online_round,
                        pairs.len()
                    );
                }
                self.sampler =
                    Sampler::new(pairs.len(), online.round_seed(round), self.config.batch_size, self.config.replay);
                self.sampler.restore(&ckpt, &state)?;
                self.examples = pairs;
                self.round = Some(round);
            }
            Some(_) => {}
        }
        let policy = checkpoint::restore_policy(
            &ckpt,
            self.policy(),
            self.config.lora.as_ref(),
            self.config.mixed_precision,
            &self.device,
        )?;
        self.optimizer = checkpoint::restore_optimizer(
            &ckpt,
            new_optimizer(&self.config, &policy),
            &self.device.clone().without_autodiff(),
        )?;
        self.policy = Some(policy);
        self.skipped_steps = state.skipped_steps;
        let loss_state: Dynamic = serde_json::from_value(state.loss_state).context("loss state in the checkpoint")?;
        self.loss_state = loss_state.try_cast::<Map>().unwrap_or_default();
        let start = state.step;
        if start > self.total_steps {
            bail!(
                "{}: the checkpoint is at step {start}, past the {} steps asked for (max_steps or --max-steps)",
                ckpt.display(),
                self.total_steps
            );
        }
        Ok((start, ckpt))
    }
}

/// AdamW as transformers' Trainer builds it for `policy` (no decay on biases and norms).
fn new_optimizer(config: &TrainConfig, policy: &Llama) -> ModelAdamW {
    let adamw = FusedAdamW::new(config.adam_beta1, config.adam_beta2, config.adam_epsilon, config.weight_decay);
    ModelAdamW::for_model(adamw, policy)
}

/// The summed log-probs the loss will see, read before the call (the batch moves into it),
/// and with pairs the DPOP diagnostics.
fn logps_for_metrics(batch: &LossBatch, examples: &[Example]) -> BatchLogps {
    let row_values = |t: &Tensor<1>| crate::tensor::values(t.clone());
    let reference = |s: &Sequences| s.reference.as_ref().map(|(logps, _)| row_values(logps)).unwrap_or_default();
    match &batch.rows {
        BatchRows::Sft { chosen, .. } => BatchLogps {
            chosen: row_values(&chosen.logps),
            rejected: Vec::new(),
            ref_chosen: Vec::new(),
            ref_rejected: Vec::new(),
            diagnostics: Vec::new(),
        },
        BatchRows::Pairs { chosen, rejected, .. } => {
            let (chosen_logps, ref_chosen) = (row_values(&chosen.logps), reference(chosen));
            let width = chosen.mask.dims()[1];
            let tokens = |t: &Tensor<2>| crate::tensor::values(t.clone());
            let ref_tokens = chosen.reference.as_ref().map(|(_, t)| tokens(t)).unwrap_or_default();
            let diagnostics = failure_mode_diagnostics(
                examples,
                &tokens(&chosen.token_logps),
                &ref_tokens,
                width,
                &chosen_logps,
                &ref_chosen,
            );
            BatchLogps {
                chosen: chosen_logps,
                rejected: row_values(&rejected.logps),
                ref_chosen,
                ref_rejected: reference(rejected),
                diagnostics,
            }
        }
        BatchRows::Unpaired { completion, .. } => {
            // TRL's KTO logs logps/chosen over the desirable rows, logps/rejected over the others.
            let (logps, ref_logps) = (row_values(&completion.logps), reference(completion));
            let desirable: Vec<bool> = examples.iter().map(|e| e.label == Some(true)).collect();
            let pick = |v: &[f32], want: bool| {
                v.iter().zip(&desirable).filter(|(_, d)| **d == want).map(|(x, _)| *x).collect::<Vec<f32>>()
            };
            let (chosen, rejected, ref_chosen) = (pick(&logps, true), pick(&logps, false), pick(&ref_logps, true));
            BatchLogps { chosen, rejected, ref_chosen, ref_rejected: Vec::new(), diagnostics: Vec::new() }
        }
    }
}
