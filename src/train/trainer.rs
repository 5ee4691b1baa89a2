//! The training loop. Read top to bottom: set-up, then for each step: pick up script
//! edits, compute the loss through the script, backward, clip, AdamW, log, save.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, bail};
use burn::optim::{GradientsAccumulator, GradientsParams, ModuleOptimizer};
use burn::prelude::Module;
use burn::tensor::{Device, Tensor};
use rhai::{Dynamic, INT, Map};
use serde_json::json;

use super::backend::backend_device;
use super::checkpoint::{self, OPTIMIZER_FILE, SOURCES_FILE, STATE_FILE, TrainerState};
use super::config::{Init, Mode, TrainConfig};
use super::console;
use super::evaluate::{EvalResult, evaluate, load_eval_rows};
use super::grads::{clip_global_norm, norms_by_name};
use super::lock::RunLock;
use super::chunked::ChunkedHead;
use super::logps::{batch_logps, row_sums};
use crate::script::random::loss_call_seed;
use super::loss_call::{LossOutput, loss_params, put1, put2, read_loss_output, rust_dpo_loss};
use super::optimizer::FusedAdamW;
use super::metrics::{MetricsLog, Throughput, format_line};
use super::reference::PrecomputedReference;
use super::reset::{requested_reset, shrink_toward_initial};
use crate::data::packed::PackedLayout;
use super::memory::{self, BatchShape, Estimate};
use crate::data::{Example, LoadReport, TextTokenizer, Truncation, collate_pairs, collate_sft, collate_unpaired, load_examples, load_unpaired_examples};
use crate::model::weights::{ADAPTER_CONFIG, ExtraFile, recover_folder};
use crate::model::{Llama, LlamaConfig, RandomInit, load_frozen_model, load_model, read_adapter, save_adapter, save_model, save_model_with};
use crate::rng::SplitMix64;
use crate::script::{ScriptHost, ScriptTensor, ScriptVersion, ScriptWatcher, set_script_device};

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

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// A write past the file-size limit (`ulimit -f`) then fails with EFBIG, which a save or
/// the metrics log reports and survives like a full disk, instead of SIGXFSZ killing the
/// process mid-write.
fn ignore_file_size_signal() {
    // SAFETY: installs the SIG_IGN disposition for one signal; no handler code runs.
    unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
}

/// Ctrl-C asks the loop to save a checkpoint and stop at the next step boundary.
fn install_interrupt_handler() {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        let _ = ctrlc::set_handler(|| INTERRUPTED.store(true, Ordering::SeqCst));
    });
}

struct Trainer {
    config: TrainConfig,
    device: Device,
    /// Always Some between steps; the update takes it out so that the optimizer holds the
    /// only handle on the weights and can update them in place (a second handle would make
    /// it copy every parameter first).
    policy: Option<Llama>,
    /// The frozen reference: a resident copy of the starting model, the policy's own frozen
    /// weights (LoRA), or log-probs read from `ref_logps`. None in SFT mode.
    reference: Option<Reference>,
    model_config: LlamaConfig,
    tokenizer: TextTokenizer,
    examples: Vec<Example>,
    order: Vec<usize>,
    cursor: usize,
    epoch: usize,
    rng: SplitMix64,
    total_steps: usize,
    loss_state: Map,
    skipped_steps: usize,
    restored_step: usize,
    /// Data rows left out by skip_bad_rows: (file:line, reason).
    skipped_rows: Vec<(String, String)>,
    /// Row indices of each micro-batch of the current batch (what `replay` trains again).
    replayed: Vec<Vec<usize>>,
    /// With LoRA: the adapters' initial values, what a reset moves them back toward.
    initial_adapters: Option<std::collections::BTreeMap<String, (Vec<usize>, Vec<f32>)>>,
    /// The preflight's estimate of the run's peak memory.
    memory: Estimate,
}

enum Reference {
    Resident(Llama),
    /// LoRA: the policy with its adapters left out (no second model in memory).
    FrozenBase,
    Precomputed(PrecomputedReference),
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
        return super::compare::run_comparison(host, options, config);
    }
    train_one(host, options, version, config, true)
}

/// The script version's train(config), narrowed to one comparison arm when `arm` is set.
pub fn config_of(version: &ScriptVersion, arm: Option<&str>) -> Result<TrainConfig> {
    let map = version.config.clone().with_context(|| format!("{}: the script never called train(config)", version.display_path()))?;
    TrainConfig::from_map(map).and_then(|c| c.arm_named(arm)).with_context(|| version.display_path())
}

/// One training run into its own run folder. `eval_before`: also score the starting
/// model when the config has `heldout` (a comparison scores it once for all arms).
pub fn train_one(host: &mut ScriptHost, options: RunOptions, version: ScriptVersion, config: TrainConfig, eval_before: bool) -> Result<RunSummary> {
    train_one_locked(host, options, version, config, eval_before, None)
}

/// `train_one`, with the lock of the folder `options.resume` names when the caller holds
/// it already (a comparison, which took it before looking into the arm's folder).
pub fn train_one_locked(host: &mut ScriptHost, options: RunOptions, version: ScriptVersion, config: TrainConfig, eval_before: bool, held: Option<RunLock>) -> Result<RunSummary> {
    // ---- set-up: script, config, model, data, run folder
    ignore_file_size_signal();
    let mut current = version;
    let mut previous: Option<ScriptVersion> = None;
    require_loss(&current, &config.loss_fn)?;
    // Held until this function returns (a result, an error or Ctrl-C): one writer per folder.
    let mut _lock = match (held, &options.resume) {
        (Some(lock), _) => Some(lock),
        (None, Some(run_dir)) => Some(RunLock::acquire(run_dir)?),
        (None, None) => None,
    };
    // Before any weight is loaded: a resume onto other inputs is refused at once.
    let (changed_inputs, inputs_now) = match &options.resume {
        Some(run_dir) => super::identity::check_resume(run_dir, &config, options.resume_anyway)?,
        None => (Vec::new(), None),
    };
    let mut trainer = Trainer::new(config, options.max_steps)?;
    set_script_device(trainer.device.clone());

    let c = &trainer.config;
    let mut optimizer = FusedAdamW::new(c.adam_beta1, c.adam_beta2, c.adam_epsilon, c.weight_decay).for_model(trainer.policy());
    let metrics_path;
    let (run_dir, start, mut log) = match &options.resume {
        Some(run_dir) => {
            let (_, ckpt) = checkpoint::latest_checkpoint(run_dir)?;
            let state = checkpoint::read_state(&ckpt)?;
            optimizer = trainer.restore(&ckpt, state, optimizer)?;
            let start = trainer.restored_step;
            if start > trainer.total_steps {
                bail!("{}: the checkpoint is at step {start}, past the {} steps asked for (max_steps or --max-steps)", ckpt.display(), trainer.total_steps);
            }
            if let Some(now) = inputs_now.filter(|_| !changed_inputs.is_empty()) {
                now.write(run_dir)?;
            }
            metrics_path = run_dir.join("metrics.jsonl");
            checkpoint::truncate_metrics(&metrics_path, start)?;
            console::line(&format!("resuming {} from {} (step {start})", run_dir.display(), ckpt.display()));
            (run_dir.clone(), start, MetricsLog::append(&metrics_path)?.with_tensorboard(tensorboard_writer(run_dir, Some(start + 1))?))
        }
        None => {
            let name = trainer.config.name.clone().unwrap_or_else(|| stem(&options.script));
            let run_dir = options.run_dir.clone().unwrap_or_else(|| Path::new(&trainer.config.output_dir).join(format!("{name}-{}", timestamp())));
            if run_dir.exists() {
                bail!("{}: run folder already exists; continue it with --resume, or choose another with --run-dir", run_dir.display());
            }
            // After the loaders checked the inputs, so that their errors come first.
            let identity = super::identity::RunIdentity::of(&trainer.config)?;
            std::fs::create_dir_all(&run_dir).with_context(|| format!("cannot create {}", run_dir.display()))?;
            _lock = Some(RunLock::acquire(&run_dir)?);
            checkpoint::write_run_info(&run_dir, &options.script, trainer.config.arm.as_deref())?;
            identity.write(&run_dir)?;
            metrics_path = run_dir.join("metrics.jsonl");
            let log = MetricsLog::create(&metrics_path)?.with_tensorboard(tensorboard_writer(&run_dir, None)?);
            (run_dir, 0, log)
        }
    };
    save_sources(&run_dir, start, &current)?;
    if !changed_inputs.is_empty() {
        console::line(&format!("notice: resuming anyway onto changed inputs:\n  {}", changed_inputs.join("\n  ")));
        log.event(start, "resumed_anyway", json!({"changed": changed_inputs}))?;
    }
    if !trainer.skipped_rows.is_empty() && start == 0 {
        let first: Vec<String> = trainer.skipped_rows.iter().take(20).map(|(at, why)| format!("{at}: {why}")).collect();
        log.event(0, "data_rows_skipped", json!({"count": trainer.skipped_rows.len(), "first": first}))?;
    }
    let mut watcher = if options.watch { Some(ScriptWatcher::new(&files_of(&current))?) } else { None };
    install_interrupt_handler();
    let total = trainer.total_steps;
    console::line(&format!(
        "prefhost: {} | {} rows | {} steps | model {} ({}) | run folder {}",
        current.display_path(), trainer.examples.len(), total, trainer.config.model, trainer.describe_params(), run_dir.display()
    ));
    let mut before = None;
    if eval_before && start == 0 {
        before = trainer.evaluate()?;
        if let Some(result) = &before {
            console::line(&format!("eval before training: accuracy {:.3} ({}/{})", result.accuracy, result.correct, result.total));
            log.event(0, "eval", json!({"accuracy": result.accuracy, "correct": result.correct, "total": result.total}))?;
        }
    }
    console::start_bar(total as u64, trainer.config.progress);
    let mut reloads = 0;
    let mut nonfinite_in_a_row = 0;
    let mut step_seconds = Vec::with_capacity(total - start);
    let mut throughput = Throughput::default();
    let mut loss_call_seconds = Vec::with_capacity(total - start);

    for step in start..total {
        if INTERRUPTED.load(Ordering::SeqCst) {
            console::finish_bar();
            let dir = trainer.save_checkpoint(&run_dir, step, &optimizer, &current)?;
            console::line(&format!("interrupted at step {step}; checkpoint {}; continue with: host run --resume {}", dir.display(), run_dir.display()));
            return Ok(RunSummary { run_dir, steps: step, reloads, interrupted: true, eval: None, eval_before: before, final_checkpoint: Some(dir), step_seconds, loss_call_seconds });
        }

        // ---- hot reload: a new version is swapped in only if it compiles and its loss runs
        if let Some(w) = watcher.as_mut() {
            let changed = w.poll();
            if !changed.is_empty() {
                let shown: Vec<String> = changed.iter().map(|p| relative(p)).collect();
                match try_reload(host, &options.script, &trainer) {
                    Ok((version, new_config)) => {
                        let ignored = trainer.config.restart_changes(&new_config);
                        if !ignored.is_empty() {
                            console::line(&format!("notice: {} changed in the script; these need a restart and are ignored", ignored.join(", ")));
                            log.event(step, "restart_needed", json!({"fields": ignored}))?;
                        }
                        let heldout_changed = trainer.config.heldout != new_config.heldout;
                        trainer.config.apply_hot(&new_config);
                        if heldout_changed {
                            super::identity::RunIdentity::record_heldout(&run_dir, &trainer.config)?;
                        }
                        console::line(&format!("reloaded {} at step {step}", shown.join(", ")));
                        log.event(step, "reload", json!({"files": shown}))?;
                        save_sources(&run_dir, step, &version)?;
                        *w = ScriptWatcher::new(&files_of(&version))?;
                        previous = Some(std::mem::replace(&mut current, version));
                        reloads += 1;
                    }
                    Err(error) => {
                        console::line(&format!("reload of {} at step {step} failed, keeping the running version:\n{error}", shown.join(", ")));
                        log.event(step, "reload_failed", json!({"files": shown, "error": error}))?;
                    }
                }
            }
        }

        // ---- the script's on_step hook: a reset of chosen weights toward their initial values
        if current.has_fn("on_step", 2) {
            trainer.on_step(host, &current, step, &mut log)?;
        }

        // ---- random draws (LoRA dropout) seeded by step, so a resumed run makes the same ones
        trainer.device.seed(trainer.config.seed ^ (step as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));

        // ---- learning rate: the script's lr(step, total) or the config's constant
        let step_start = std::time::Instant::now();
        let lr = with_fallback(&mut current, &mut previous, &mut trainer.config, &mut log, step, "lr", |version, config| {
            script_lr(host, version, step, total, config.lr)
        })?;

        // ---- forward + backward over grad_accum micro-batches (gradient_checkpointing may
        // have been switched by a reload)
        trainer.policy.as_mut().expect("the policy is in place between steps").recompute_layers = trainer.config.gradient_checkpointing;
        let mut accumulator = GradientsAccumulator::<Llama>::new();
        let mut outputs = Vec::with_capacity(trainer.config.grad_accum);
        // The loss state each micro-batch returns is the next one's input (γ-PO's queue grows
        // per forward, as in its reference); it is kept only if the step's update is applied.
        let mut step_state = trainer.loss_state.clone();
        let (mut step_samples, mut step_tokens) = (0, 0);
        for micro in 0..trainer.config.grad_accum {
            let examples = trainer.batch_for(step, micro);
            step_samples += examples.len();
            step_tokens += examples.iter().map(row_tokens).sum::<usize>();
            let mut config = trainer.config.clone();
            let call = LossCall { step, micro_batch: micro, state: &step_state };
            let mut output = with_fallback(&mut current, &mut previous, &mut config, &mut log, step, "loss", |version, config| {
                trainer.loss(host, version, config, &examples, &call)
            })?;
            trainer.config = config;
            if let Some(state) = output.loss.state.clone() {
                step_state = state;
            }
            let scaled = output.loss.loss.clone().div_scalar(trainer.config.grad_accum as f64);
            let grads = match output.head.take() {
                Some(head) => head.gradients(&scaled.backward(), trainer.policy()),
                None => GradientsParams::from_grads(scaled.backward(), trainer.policy()),
            };
            accumulator.accumulate(trainer.policy(), grads);
            outputs.push(output);
        }
        let mut grads = accumulator.grads();
        let logs_now = (step + 1) % trainer.config.log_every == 0 || step + 1 == total;
        if trainer.config.log_param_grad_norms && logs_now {
            log.event(step + 1, "param_grad_norms", json!(norms_by_name(trainer.policy(), &grads)))?;
        }
        let norm = clip_global_norm(trainer.policy(), &mut grads, trainer.config.max_grad_norm);

        // ---- a NaN/inf loss or gradient: skip the update; too many in a row end the run
        if !norm.is_finite() || outputs.iter().any(|o| !o.loss_value.is_finite()) {
            trainer.skipped_steps += 1;
            nonfinite_in_a_row += 1;
            let losses: Vec<String> = outputs.iter().map(|o| o.loss_value.to_string()).collect();
            console::line(&format!("step {}: non-finite loss [{}] or grad_norm {norm}; update skipped ({nonfinite_in_a_row} in a row)", step + 1, losses.join(", ")));
            log.event(step + 1, "nonfinite_skipped", json!({"losses": losses, "grad_norm": norm.to_string(), "in_a_row": nonfinite_in_a_row}))?;
            if nonfinite_in_a_row >= trainer.config.max_nonfinite_steps {
                console::finish_bar();
                bail!(
                    "stopping: {nonfinite_in_a_row} steps in a row had a non-finite loss or gradient (max_nonfinite_steps); the last checkpoint in {} is intact",
                    run_dir.display()
                );
            }
            continue;
        }
        nonfinite_in_a_row = 0;
        trainer.loss_state = step_state;
        for output in &outputs {
            trainer.record(&mut log, output);
        }
        throughput.step(step_samples, step_tokens, outputs.iter().map(|o| o.loss_value).sum::<f64>() / outputs.len().max(1) as f64);
        let policy = trainer.policy.take().expect("the policy is in place between steps");
        trainer.policy = Some(optimizer.step(lr, policy, grads));
        step_seconds.push(step_start.elapsed().as_secs_f64());
        loss_call_seconds.push(outputs.iter().map(|o| o.loss_call_seconds).sum());
        log.add("grad_norm", norm);
        log.add("learning_rate", lr);

        // ---- log, hooks, checkpoints
        let done = step + 1;
        console::advance(String::new());
        if done % trainer.config.log_every == 0 || done == total {
            throughput.add_interval_rates(&mut log);
            let means = log.flush(done, trainer.epoch_progress())?;
            console::line(&format_line(done, total, &means));
            if current.has_fn("on_log", 2) {
                let map: Map = means.iter().map(|(k, v)| (k.as_str().into(), Dynamic::from_float(*v))).collect();
                if let Err(e) = host.call(&current, "on_log", vec![Dynamic::from_int(done as INT), Dynamic::from_map(map)]) {
                    console::line(&format!("on_log hook failed (run goes on):\n{e}"));
                }
            }
        }
        if trainer.config.save_every.is_some_and(|n| n > 0 && done % n == 0 && done != total) {
            trainer.save_checkpoint(&run_dir, done, &optimizer, &current)?;
        }
    }
    console::finish_bar();
    let final_dir = trainer.save_checkpoint(&run_dir, total, &optimizer, &current)?;
    // The preflight's estimate beside what the run took (its checkpoint saves included).
    if let Some(peak) = memory::peak_rss_bytes() {
        console::line(&format!("peak memory {:.0} MB (estimated {:.0} MB)", peak / 1048576.0, trainer.memory.total() / 1048576.0));
        trainer.memory.write_report(&run_dir.join("memory.json"), peak)?;
    }
    if let Some(target) = trainer.config.save_model_to.clone() {
        save_model(&trainer.policy().valid(), &trainer.model_config, &trainer.tokenizer.path, Path::new(&target))?;
        console::line(&format!("model written to {target}"));
    }
    if trainer.skipped_steps > 0 {
        console::line(&format!("{} step(s) skipped for non-finite values", trainer.skipped_steps));
    }
    let eval = trainer.evaluate()?;
    if let Some(result) = &eval {
        console::line(&format!("eval after training: accuracy {:.3} ({}/{})", result.accuracy, result.correct, result.total));
        log.event(total, "eval", json!({"accuracy": result.accuracy, "correct": result.correct, "total": result.total}))?;
    }
    let summary = throughput.summary();
    console::line(&format!("train summary: {}", summary.iter().map(|(k, v)| format!("{k}={v:.4}")).collect::<Vec<_>>().join("  ")));
    log.event(total, "train_summary", json!(summary))?;
    console::line(&format!("done: {total} steps, checkpoint {}", final_dir.display()));
    Ok(RunSummary { run_dir, steps: total, reloads, interrupted: false, eval, eval_before: before, final_checkpoint: Some(final_dir), step_seconds, loss_call_seconds })
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

/// Runs `call` with the current script version; if it fails and an earlier version is
/// kept, goes back to that version (and its hot config) and runs it there. Only a failure
/// with nothing to go back to ends the run.
fn with_fallback<T>(
    current: &mut ScriptVersion,
    previous: &mut Option<ScriptVersion>,
    config: &mut TrainConfig,
    log: &mut MetricsLog,
    step: usize,
    what: &str,
    mut call: impl FnMut(&ScriptVersion, &TrainConfig) -> Result<T, String>,
) -> Result<T> {
    let error = match call(current, config) {
        Ok(value) => return Ok(value),
        Err(error) => error,
    };
    let Some(good) = previous.take() else {
        bail!("{what} failed at step {step}:\n{error}");
    };
    console::line(&format!("{what} failed at step {step}, going back to the previous version:\n{error}"));
    log.event(step, &format!("{what}_failed"), json!({"error": error}))?;
    if good.config.is_some() {
        config.apply_hot(&config_of(&good, config.arm.as_deref())?);
    }
    *current = good;
    call(current, config).map_err(|e| anyhow::anyhow!("{what} failed at step {step} with the previous version too:\n{e}"))
}

/// The script's `lr(step, total)`, or the config's constant when it defines none.
fn script_lr(host: &ScriptHost, version: &ScriptVersion, step: usize, total: usize, constant: f64) -> Result<f64, String> {
    if !version.has_fn("lr", 2) {
        return Ok(constant);
    }
    let value = host.call(version, "lr", vec![Dynamic::from_int(step as INT), Dynamic::from_int(total as INT)]).map_err(|e| e.to_string())?;
    match number(&value) {
        Ok(lr) if lr.is_finite() && lr >= 0.0 => Ok(lr),
        _ => Err(format!("{}: lr({step}, {total}) returned {value:?}; expected a non-negative number", version.fn_location("lr"))),
    }
}

/// Compiles the edited script, parses its config, and runs its loss on a small synthetic
/// batch, so a version that would fail is rejected before it replaces the running one.
fn try_reload(host: &mut ScriptHost, script: &Path, trainer: &Trainer) -> Result<(ScriptVersion, TrainConfig), String> {
    let version = host.load(script).map_err(|e| e.to_string())?;
    let config = config_of(&version, trainer.config.arm.as_deref()).map_err(|e| format!("{e:#}"))?;
    require_loss(&version, &config.loss_fn).map_err(|e| e.to_string())?;
    let batch = synthetic_batch(&trainer.device, &trainer.config.mode);
    let params = loss_params(&config.params, 0, trainer.total_steps, &trainer.loss_state, loss_call_seed(trainer.config.seed, 0, 0));
    let value = host.call(&version, &config.loss_fn, vec![Dynamic::from_map(batch), Dynamic::from_map(params)]).map_err(|e| e.to_string())?;
    let out = read_loss_output(value, 2).map_err(|e| format!("{}: {e}", version.fn_location(&config.loss_fn)))?;
    let dry_loss = crate::model::values(out.loss)[0];
    if !dry_loss.is_finite() {
        return Err(format!("{}: gave {dry_loss} on the check batch", version.fn_location(&config.loss_fn)));
    }
    script_lr(host, &version, 0, trainer.total_steps, config.lr)?;
    Ok((version, config))
}

/// The loss function exists, and every hook the script defines has the parameters the
/// host calls it with (a hook with other parameters would silently never run).
fn require_loss(version: &ScriptVersion, name: &str) -> Result<()> {
    if !version.has_fn(name, 2) {
        bail!("{}: the script defines no fn {name}(batch, params)", version.display_path());
    }
    for (hook, call) in [("lr", "lr(step, total)"), ("on_log", "on_log(step, metrics)"), ("on_step", "on_step(step, total)")] {
        if version.fn_names().any(|n| n == hook) && !version.has_fn(hook, 2) {
            bail!("{}: fn {hook} has other parameters than the host calls it with: {call}", version.fn_location(hook));
        }
    }
    Ok(())
}

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
        let mut tokenizer = TextTokenizer::load_with(&model_dir.join("tokenizer.json"), &model_config.eos_ids(), model_config.pad_token_id)?;
        tokenizer.prompt_special_tokens = config.prompt_special_tokens;
        if let Some(name) = &config.chat_template {
            tokenizer.use_chat_template(name)?;
        }
        if tokenizer.vocab_size() > model_config.vocab_size {
            bail!("{}: tokenizer has {} tokens, the model's vocab_size is {}", model_dir.display(), tokenizer.vocab_size(), model_config.vocab_size);
        }
        let limits = Truncation { max_length: config.max_length.min(model_config.max_positions()), max_prompt_length: config.max_prompt_length };
        let data = Path::new(&config.data);
        let (examples, report) = match config.mode {
            Mode::Unpaired => load_unpaired_examples(data, &tokenizer, limits, config.skip_bad_rows, config.unpair)?,
            _ => load_examples(data, &tokenizer, config.mode == Mode::Preference, limits, config.skip_bad_rows)?,
        };
        let batch = BatchShape::worst(config, &examples);
        // Frozen copies keep the checkpoint's dtype; the headers say which (and are checked).
        let stored = match config.init {
            Init::Pretrained => crate::model::weights::SafetensorsWeights::open(&model_dir)?.stored_bytes_per_element(),
            Init::Random => 4.0,
        };
        let memory = if preflight { memory::preflight(&model_config, config, batch, stored)? } else { memory::estimate(&model_config, config, batch, stored) };
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
        version.display_path(), plan.examples.len(), plan.batch.rows, plan.batch.length, plan.memory.describe()
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
        Init::Pretrained => load_frozen_model(Path::new(&config.model), &device.clone().without_autodiff())?.1.with_precision(config.mixed_precision),
        Init::Random => policy.valid(),
    })
}

/// Two pairs (or rows) of made-up log-probs with a gradient path, shaped like a real batch.
fn synthetic_batch(device: &Device, mode: &Mode) -> Map {
    let token = |vals: [f32; 6]| Tensor::<1>::from_floats(vals, device).reshape([2, 3]).require_grad();
    let mask = Tensor::<1>::from_floats([1.0, 1.0, 0.0, 1.0, 1.0, 1.0], device).reshape([2, 3]);
    let chosen = token([-0.5, -1.0, 0.0, -0.2, -0.7, -1.1]);
    let rejected = token([-0.9, -1.4, 0.0, -0.6, -0.3, -2.0]);
    let ref_chosen = chosen.clone().detach() - 0.1;
    let ref_rejected = rejected.clone().detach() + 0.1;
    let lengths = Tensor::<1>::from_floats([2.0, 3.0], device);
    let mut map = Map::new();
    map.insert("batch_size".into(), Dynamic::from_int(2));
    if *mode == Mode::Unpaired {
        put1(&mut map, "labels", Tensor::<1>::from_floats([1.0, 0.0], device));
        put1(&mut map, "kl_logps", row_sums(rejected.detach()));
        put1(&mut map, "ref_kl_logps", row_sums(ref_rejected));
        fill_sequences(&mut map, "completion", chosen, mask, ref_chosen, lengths);
        return map;
    }
    let nll = row_sums(chosen.clone()).sum().neg() / 5.0;
    fill_sequences(&mut map, "chosen", chosen, mask.clone(), ref_chosen, lengths.clone());
    if *mode == Mode::Preference {
        fill_sequences(&mut map, "rejected", rejected, mask, ref_rejected, lengths);
    }
    put1(&mut map, "chosen_nll", nll);
    map
}

/// chosen_/rejected_ fields: summed and per-token log-probs, masks, lengths, reference.
fn fill_sequences(map: &mut Map, side: &str, tokens: Tensor<2>, mask: Tensor<2>, reference: Tensor<2>, lengths: Tensor<1>) {
    put1(map, &format!("{side}_logps"), row_sums(tokens.clone()));
    put1(map, &format!("ref_{side}_logps"), row_sums(reference.clone()));
    put2(map, &format!("{side}_token_logps"), tokens);
    put2(map, &format!("ref_{side}_token_logps"), reference);
    put2(map, &format!("{side}_mask"), mask);
    put1(map, &format!("{side}_lengths"), lengths);
}

/// Which loss call this is: the step, the micro-batch within it, and the loss state it
/// starts from.
struct LossCall<'a> {
    step: usize,
    micro_batch: usize,
    state: &'a Map,
}

struct StepResult {
    loss: LossOutput,
    loss_value: f64,
    chosen_logps: Vec<f32>,
    rejected_logps: Vec<f32>,
    ref_chosen: Vec<f32>,
    /// Host-computed diagnostics of the DPO failure mode (preference mode only).
    diagnostics: Vec<(&'static str, f64)>,
    /// Set when the logits were computed in chunks: it turns the loss's gradients into
    /// the model's.
    head: Option<ChunkedHead>,
    /// Wall time of the loss call alone (the script's, or Rust's for the bench).
    loss_call_seconds: f64,
}

impl Trainer {
    fn policy(&self) -> &Llama {
        self.policy.as_ref().expect("the policy is in place between steps")
    }

    fn new(config: TrainConfig, max_steps_override: Option<usize>) -> Result<Self> {
        let train_device = backend_device(&config.backend)?.autodiff();
        let RunPlan { tokenizer, examples, report, memory, limits, .. } = RunPlan::new(&config, true)?;
        let (model_config, policy) = build_policy(&config, &train_device)?;
        if report.truncated > 0 {
            console::line(&format!("note: {} of {} rows truncated to max_length {}", report.truncated, report.rows, limits.max_length));
        }
        if report.merged_at_boundary_count > 0 {
            console::line(&format!(
                "note: in {} row(s) of {} ({}{}) the prompt and a completion tokenize differently as one text; prefhost tokenizes them apart, as TRL 0.12 to 0.28 does (TRL before 0.12 and from 0.29 tokenize the joined text)",
                report.merged_at_boundary_count, config.data, report.merged_at_boundary.join(", "), if report.merged_at_boundary_count > report.merged_at_boundary.len() { ", ..." } else { "" }
            ));
        }
        if !report.skipped.is_empty() {
            console::line(&format!("note: {} row(s) of {} left out (skip_bad_rows):", report.skipped.len(), config.data));
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
        let total_steps = max_steps_override.or(config.max_steps).unwrap_or(config.epochs * examples.len().div_ceil(per_step) * config.replay);
        let mut rng = SplitMix64::new(config.seed);
        let mut order: Vec<usize> = (0..examples.len()).collect();
        rng.shuffle(&mut order);
        let initial_adapters = config.lora.is_some().then(|| policy.adapter_tensors());
        Ok(Self {
            config, device: train_device, policy: Some(policy), reference, model_config, tokenizer, examples, order,
            cursor: 0, epoch: 0, rng, total_steps, loss_state: Map::new(), skipped_steps: 0, restored_step: 0, skipped_rows: report.skipped,
            replayed: Vec::new(),
            initial_adapters,
            memory,
        })
    }

    /// "N params", or with LoRA "N params, M trainable (LoRA r=…)".
    fn describe_params(&self) -> String {
        let total = self.policy().num_params();
        match &self.config.lora {
            None => format!("{total} params"),
            Some(lora) => format!("{total} params, {} trainable (LoRA r={} on {})", self.policy().num_trainable_params(), lora.r, lora.modules().unwrap_or_default().join(",")),
        }
    }

    /// Micro-batch `micro` of `step`: the next batch_size rows in shuffled order
    /// (reshuffling at each epoch), or with `replay` k the rows this micro-batch had at the
    /// first step of its group of k.
    fn batch_for(&mut self, step: usize, micro: usize) -> Vec<Example> {
        let fresh = step % self.config.replay == 0 || self.replayed.len() <= micro;
        if fresh {
            let rows = self.next_rows();
            self.replayed.truncate(micro);
            self.replayed.push(rows);
        }
        self.replayed[micro].iter().map(|&i| self.examples[i].clone()).collect()
    }

    /// Indices of the next batch_size rows in shuffled order, reshuffling at each epoch.
    fn next_rows(&mut self) -> Vec<usize> {
        let mut rows = Vec::with_capacity(self.config.batch_size);
        while rows.len() < self.config.batch_size {
            if self.cursor == self.order.len() {
                self.cursor = 0;
                self.epoch += 1;
                self.rng.shuffle(&mut self.order);
            }
            rows.push(self.order[self.cursor]);
            self.cursor += 1;
        }
        rows
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
                    let error = format!("{}: reset.modules {:?} selects no trainable parameter (with LoRA only adapter targets train)", version.fn_location("on_step"), request.modules);
                    console::line(&format!("on_step at step {step}: nothing reset:\n{error}"));
                    return log.event(step, "on_step_failed", json!({"error": error}));
                }
                console::line(&format!("step {step}: reset {moved} parameter tensors of {} toward their initial values (factor {})", request.modules.join(", "), request.factor));
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

    fn epoch_progress(&self) -> f64 {
        self.epoch as f64 + self.cursor as f64 / self.order.len() as f64
    }

    /// Forward passes, the batch map, and the script's loss.
    fn loss(&self, host: &ScriptHost, version: &ScriptVersion, config: &TrainConfig, examples: &[Example], call: &LossCall) -> Result<StepResult, String> {
        let refs: Vec<&Example> = examples.iter().collect();
        let b = examples.len();
        let pad = self.tokenizer.pad_id;
        let mut map = Map::new();
        let head;
        let rejected = match &self.reference {
            Some(_) if config.mode == Mode::Unpaired => {
                head = self.fill_unpaired(&mut map, &refs, config);
                false
            }
            Some(reference) => {
                let batch = collate_pairs(&refs, pad, &self.device);
                let packed = config.prefix_sharing.then(|| PackedLayout::new(&refs, pad, true));
                let chunk = config.logits_chunk();
                let (tokens, chunked) = batch_logps(self.policy(), &batch, packed.as_ref(), chunk);
                head = chunked;
                let plain = self.device.clone().without_autodiff();
                let ref_tokens = match reference {
                    Reference::Resident(model) => batch_logps(model, &collate_pairs(&refs, pad, &plain), packed.as_ref(), chunk).0,
                    Reference::FrozenBase => {
                        let base = self.policy().valid().without_adapters();
                        batch_logps(&base, &collate_pairs(&refs, pad, &plain), packed.as_ref(), chunk).0
                    }
                    Reference::Precomputed(rows) => rows.token_logps(&refs, batch.mask.dims()[1], &plain),
                }
                .autodiff();
                let lengths = Tensor::<1>::from_floats(batch.lengths.as_slice(), &self.device);
                let half = |t: Tensor<2>, i: usize| t.narrow(0, i * b, b);
                fill_sequences(&mut map, "chosen", half(tokens.clone(), 0), half(batch.mask.clone(), 0), half(ref_tokens.clone(), 0), lengths.clone().narrow(0, 0, b));
                fill_sequences(&mut map, "rejected", half(tokens.clone(), 1), half(batch.mask.clone(), 1), half(ref_tokens, 1), lengths.narrow(0, b, b));
                let chosen_tokens = half(tokens, 0);
                let count: f32 = batch.lengths[..b].iter().sum();
                put1(&mut map, "chosen_nll", chosen_tokens.sum().neg() / count.max(1.0));
                true
            }
            None => {
                let batch = collate_sft(&refs, pad, &self.device);
                let (tokens, chunked) = batch_logps(self.policy(), &batch, None, config.logits_chunk());
                head = chunked;
                let lengths = Tensor::<1>::from_floats(batch.lengths.as_slice(), &self.device);
                let count: f32 = batch.lengths.iter().sum();
                put1(&mut map, "chosen_logps", row_sums(tokens.clone()));
                put2(&mut map, "chosen_token_logps", tokens.clone());
                put2(&mut map, "chosen_mask", batch.mask.clone());
                put1(&mut map, "chosen_lengths", lengths);
                put1(&mut map, "chosen_nll", tokens.sum().neg() / count.max(1.0));
                false
            }
        };
        map.insert("batch_size".into(), Dynamic::from_int(b as INT));
        let values = |name: &str| map.get(name).map(|v| v.clone().cast::<ScriptTensor>().values()).unwrap_or_default();
        let (mut chosen_logps, mut rejected_logps) = (values("chosen_logps"), values("rejected_logps"));
        let (mut ref_chosen, ref_rejected) = (values("ref_chosen_logps"), values("ref_rejected_logps"));
        if config.mode == Mode::Unpaired {
            // TRL's KTO logs logps/chosen over the desirable rows, logps/rejected over the others.
            let (logps, ref_logps) = (values("completion_logps"), values("ref_completion_logps"));
            let desirable: Vec<bool> = examples.iter().map(|e| e.label == Some(true)).collect();
            let pick = |v: &[f32], want: bool| v.iter().zip(&desirable).filter(|(_, d)| **d == want).map(|(x, _)| *x).collect::<Vec<f32>>();
            (chosen_logps, rejected_logps, ref_chosen) = (pick(&logps, true), pick(&logps, false), pick(&ref_logps, true));
        }
        let diagnostics = if rejected {
            let width = map.get("chosen_mask").map_or(0, |m| m.clone().cast::<ScriptTensor>().shape()[1]);
            failure_mode_diagnostics(examples, &values("chosen_token_logps"), &values("ref_chosen_token_logps"), width, &chosen_logps, &ref_chosen)
        } else {
            Vec::new()
        };
        let seed = loss_call_seed(config.seed, call.step, call.micro_batch);
        let params = loss_params(&config.params, call.step, self.total_steps, call.state, seed);
        let call_start = std::time::Instant::now();
        let mut loss = if config.rust_dpo_loss {
            rust_dpo_loss(&map, config.beta())?
        } else {
            let value = host
                .call(version, &config.loss_fn, vec![Dynamic::from_map(map), Dynamic::from_map(params)])
                .map_err(|e| e.to_string())?;
            read_loss_output(value, b).map_err(|e| format!("{}: {e}", version.fn_location(&config.loss_fn)))?
        };
        let loss_call_seconds = call_start.elapsed().as_secs_f64();
        if rejected && loss.chosen_rewards.is_none() {
            // Losses that report no rewards get DPO's implicit reward β·(logp − ref logp).
            let beta = config.beta() as f32;
            let reward = |p: &[f32], r: &[f32]| p.iter().zip(r).map(|(p, r)| beta * (p - r)).collect::<Vec<_>>();
            loss.chosen_rewards = Some(reward(&chosen_logps, &ref_chosen));
            loss.rejected_rewards = Some(reward(&rejected_logps, &ref_rejected));
        }
        let loss_value = crate::model::values(loss.loss.clone())[0] as f64;
        Ok(StepResult { loss, loss_value, chosen_logps, rejected_logps, ref_chosen, diagnostics, head, loss_call_seconds })
    }

    /// The unpaired (KTO) batch map: `completion_*` fields (policy with gradient, reference),
    /// `labels` (1 = desirable), and the summed log-probs of the KL rows under the policy and
    /// the reference, without gradient (TRL computes them under no_grad).
    fn fill_unpaired(&self, map: &mut Map, refs: &[&Example], config: &TrainConfig) -> Option<ChunkedHead> {
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
        let kl = row_sums(batch_logps(&self.policy().valid(), &kl_rows, None, chunk).0).autodiff();
        let ref_kl = row_sums(batch_logps(reference, &kl_rows, None, chunk).0).autodiff();
        let labels: Vec<f32> = refs.iter().map(|e| if e.label == Some(true) { 1.0 } else { 0.0 }).collect();
        let lengths = Tensor::<1>::from_floats(batch.lengths.as_slice(), &self.device);
        fill_sequences(map, "completion", tokens, batch.mask.clone(), ref_tokens, lengths);
        put1(map, "labels", Tensor::<1>::from_floats(labels.as_slice(), &self.device));
        put1(map, "kl_logps", kl);
        put1(map, "ref_kl_logps", ref_kl);
        head
    }

    /// Held-out accuracy of the current policy, when the config has `heldout`.
    fn evaluate(&self) -> Result<Option<EvalResult>> {
        let Some(eval) = &self.config.heldout else { return Ok(None) };
        let rows = load_eval_rows(Path::new(&eval.data), eval.rows)?;
        evaluate(&self.policy().valid(), &self.tokenizer, &rows, eval.max_new_tokens).map(Some)
    }

    fn record(&self, log: &mut MetricsLog, out: &StepResult) {
        let mean = |v: &[f32]| v.iter().map(|x| *x as f64).sum::<f64>() / v.len().max(1) as f64;
        log.add("loss", out.loss_value);
        if let (Some(c), Some(r)) = (&out.loss.chosen_rewards, &out.loss.rejected_rewards) {
            log.add("rewards/chosen", mean(c));
            log.add("rewards/rejected", mean(r));
            let wins: Vec<f32> = c.iter().zip(r).map(|(c, r)| if c > r { 1.0 } else { 0.0 }).collect();
            log.add("rewards/accuracies", mean(&wins));
            let margins: Vec<f32> = c.iter().zip(r).map(|(c, r)| c - r).collect();
            log.add("rewards/margins", mean(&margins));
        }
        if !out.chosen_logps.is_empty() {
            log.add("logps/chosen", mean(&out.chosen_logps));
        }
        if !out.rejected_logps.is_empty() {
            log.add("logps/rejected", mean(&out.rejected_logps));
        }
        if !out.rejected_logps.is_empty() && !out.chosen_logps.is_empty() {
            // How far the policy's log p(chosen) moved from the reference: DPO's failure mode.
            let delta: Vec<f32> = out.chosen_logps.iter().zip(&out.ref_chosen).map(|(p, r)| p - r).collect();
            log.add("logps/chosen_minus_ref", mean(&delta));
        }
        for (k, v) in &out.diagnostics {
            log.add(k, *v);
        }
        for (k, v) in &out.loss.metrics {
            log.add(k, *v);
        }
    }

    /// Writes `checkpoint-{step}`: the policy (HF layout), optimizer state, trainer state
    /// and the sources of the script version in use.
    fn save_checkpoint(&self, run_dir: &Path, step: usize, optimizer: &ModuleOptimizer, script: &ScriptVersion) -> Result<PathBuf> {
        let state = TrainerState {
            step,
            epoch: self.epoch,
            cursor: self.cursor,
            order: self.order.clone(),
            rng: self.rng.clone(),
            loss_state: serde_json::to_value(Dynamic::from_map(self.loss_state.clone()))
                .context("the loss state must hold plain values (numbers, strings, arrays, maps) to be saved")?,
            skipped_steps: self.skipped_steps,
            replayed: self.replayed.clone(),
        };
        let state_json = serde_json::to_vec_pretty(&state)?;
        let sources: serde_json::Map<String, serde_json::Value> =
            script.sources.iter().map(|(path, text)| (relative(path), json!(text))).collect();
        let sources_json = serde_json::to_vec_pretty(&sources)?;
        let dir = run_dir.join(format!("checkpoint-{step}"));
        self.write_checkpoint(&dir, &state_json, &sources_json, optimizer).or_else(|error| {
            // A full disk (ENOSPC, EFBIG, EIO): the half-written staging folder goes (it
            // holds space the user needs back) and a checkpoint moved aside to be replaced
            // comes back; the earlier checkpoints were never touched. The run stops rather
            // than train on with nothing saved: the space is not coming back by itself.
            let tidied = recover_folder(&dir).err().map_or(String::new(), |e| format!(" (tidying it failed too: {e:#})"));
            Err(error).with_context(|| {
                format!(
                    "{}: the checkpoint could not be saved{tidied}; the earlier checkpoints are intact and the run stops: free space, then continue with: host run --resume {}",
                    dir.display(), run_dir.display()
                )
            })
        })?;
        Ok(dir)
    }

    /// The files of `save_checkpoint`, through a staging folder renamed into place.
    fn write_checkpoint(&self, dir: &Path, state_json: &[u8], sources_json: &[u8], optimizer: &ModuleOptimizer) -> Result<()> {
        // AdamW's moments (twice the trainable weights) stream to the file tensor by tensor.
        let write_optimizer = |path: &Path| optimizer.save(path).map_err(|e| anyhow::anyhow!("saving the optimizer state: {e:?}"));
        let (write_state, write_sources) = (|path: &Path| Ok(std::fs::write(path, state_json)?), |path: &Path| Ok(std::fs::write(path, sources_json)?));
        let extra = [
            ExtraFile { name: STATE_FILE, write: &write_state },
            ExtraFile { name: OPTIMIZER_FILE, write: &write_optimizer },
            ExtraFile { name: SOURCES_FILE, write: &write_sources },
        ];
        match &self.config.lora {
            // LoRA checkpoints hold the adapters only (PEFT's layout); the base is config.model.
            Some(lora) => save_adapter(&self.policy().valid(), lora, &self.config.model, &self.tokenizer.path, dir, &extra),
            None => save_model_with(&self.policy().valid(), &self.model_config, &self.tokenizer.path, dir, &extra),
        }
    }

    /// Puts back the policy, optimizer, data position, RNG and loss state of a checkpoint.
    /// The reference stays the model the config names, as in the original run.
    fn restore(&mut self, ckpt: &Path, state: TrainerState, optimizer: ModuleOptimizer) -> Result<ModuleOptimizer> {
        if state.order.len() != self.examples.len() || state.order.iter().any(|&i| i >= self.examples.len()) {
            bail!("{}: the data has {} rows, the checkpoint was made with {}; resume needs the same data", ckpt.display(), self.examples.len(), state.order.len());
        }
        let is_adapter = ckpt.join(ADAPTER_CONFIG).is_file();
        match &self.config.lora {
            Some(lora) => {
                if !is_adapter {
                    bail!("{}: a full-model checkpoint, but the script trains LoRA adapters; resume needs the same lora setting", ckpt.display());
                }
                let mut files = read_adapter(ckpt)?;
                if files.lora.r != lora.r || files.lora.modules()? != lora.modules()? {
                    bail!("{}: adapters of rank {} on {:?}, the script asks for rank {} on {:?}; resume needs the same lora setting", ckpt.display(), files.lora.r, files.lora.modules()?, lora.r, lora.modules()?);
                }
                self.policy = Some(self.policy().clone().set_adapters(&mut files.tensors, &self.device).with_context(|| ckpt.display().to_string())?);
            }
            None if is_adapter => bail!("{}: a LoRA adapter checkpoint, but the script has no lora setting; resume needs the same lora setting", ckpt.display()),
            None => self.policy = Some(load_model(ckpt, &self.device)?.1.with_precision(self.config.mixed_precision)),
        }
        let bytes = std::fs::read(ckpt.join(OPTIMIZER_FILE)).with_context(|| format!("cannot read {}", ckpt.join(OPTIMIZER_FILE).display()))?;
        let optimizer = optimizer
            .from_bytes(burn::tensor::Bytes::from_bytes_vec(bytes))
            .map_err(|e| anyhow::anyhow!("{}: corrupt optimizer state: {e:?}", ckpt.join(OPTIMIZER_FILE).display()))?;
        self.epoch = state.epoch;
        self.cursor = state.cursor;
        self.order = state.order;
        self.rng = state.rng;
        self.skipped_steps = state.skipped_steps;
        if state.replayed.iter().flatten().any(|&i| i >= self.examples.len()) {
            bail!("{}: the replayed batch names rows the data does not have; resume needs the same data", ckpt.display());
        }
        self.replayed = state.replayed;
        self.restored_step = state.step;
        let loss_state: Dynamic = serde_json::from_value(state.loss_state).context("loss state in the checkpoint")?;
        self.loss_state = loss_state.try_cast::<Map>().unwrap_or_default();
        Ok(optimizer)
    }
}

/// What the DPOP paper looks at: does log p(chosen) fall below the reference, and do the
/// chosen tokens at and after the first token where the pair differs lose probability?
/// `policy`/`reference` are the chosen rows' per-token log-probs ([B, width], flattened).
fn failure_mode_diagnostics(
    examples: &[Example],
    policy: &[f32],
    reference: &[f32],
    width: usize,
    chosen_logps: &[f32],
    ref_chosen: &[f32],
) -> Vec<(&'static str, f64)> {
    let b = examples.len() as f64;
    let fell = chosen_logps.iter().zip(ref_chosen).filter(|(p, r)| p < r).count() as f64 / b;
    let (mut before, mut at, mut after) = (Vec::new(), Vec::new(), Vec::new());
    for (row, example) in examples.iter().enumerate() {
        let Some(first) = example.first_difference() else { continue };
        // Completion token j of this row is predicted at position prompt_len - 1 + j.
        let start = row * width + example.prompt.len() - 1;
        for j in 0..example.chosen.len() {
            let delta = (policy[start + j] - reference[start + j]) as f64;
            match j.cmp(&first) {
                std::cmp::Ordering::Less => before.push(delta),
                std::cmp::Ordering::Equal => at.push(delta),
                std::cmp::Ordering::Greater => after.push(delta),
            }
        }
    }
    let mean = |v: &[f64]| if v.is_empty() { 0.0 } else { v.iter().sum::<f64>() / v.len() as f64 };
    let distance = examples.iter().map(Example::normalised_edit_distance).sum::<f64>() / b;
    vec![
        ("diagnostics/chosen_fell_share", fell),
        ("diagnostics/token_delta_before_diff", mean(&before)),
        ("diagnostics/token_delta_at_diff", mean(&at)),
        ("diagnostics/token_delta_after_diff", mean(&after)),
        ("diagnostics/edit_distance", distance),
    ]
}

fn number(v: &Dynamic) -> Result<f64> {
    v.as_float().or_else(|_| v.as_int().map(|i| i as f64)).map_err(|t| anyhow::anyhow!("got {t}"))
}

fn files_of(version: &ScriptVersion) -> Vec<PathBuf> {
    version.sources.iter().map(|(p, _)| p.clone()).collect()
}

/// Copies the exact sources a run used (at start and after each reload) into the run folder.
fn save_sources(run_dir: &Path, step: usize, version: &ScriptVersion) -> Result<()> {
    let dir = run_dir.join("sources").join(format!("step-{step:06}"));
    for (path, text) in &version.sources {
        let target = dir.join(relative(path));
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
        }
        std::fs::write(&target, text).with_context(|| format!("writing {}", target.display()))?;
    }
    Ok(())
}

/// The path relative to the working directory, or without its root when it lies
/// elsewhere, so it can always be placed inside the run folder.
fn relative(path: &Path) -> String {
    let cwd = std::env::current_dir().unwrap_or_default();
    let abs = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let rel = abs.strip_prefix(&cwd).map(Path::to_path_buf).unwrap_or_else(|_| {
        abs.components().filter(|c| matches!(c, std::path::Component::Normal(_))).collect()
    });
    rel.display().to_string()
}

fn stem(path: &Path) -> String {
    path.file_stem().and_then(|s| s.to_str()).unwrap_or("run").to_string()
}

/// UTC `YYYYMMDD-HHMMSS` for run folder names.
pub fn timestamp() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let (days, rem) = (secs / 86400, secs % 86400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days as i64 + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    format!("{y:04}{m:02}{d:02}-{:02}{:02}{:02}", rem / 3600, rem % 3600 / 60, rem % 60)
}
