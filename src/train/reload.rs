//! Hot reload: the running script version and the one before it, an edited version checked
//! before it replaces the running one, and script calls that go back to the previous
//! version when the new one fails on real data.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use burn::tensor::Device;
use rhai::{Dynamic, INT, Map};
use serde_json::json;

use super::checkpoint::{relative, save_rejected_sources, save_sources, write_train_config};
use super::config::TrainConfig;
use super::loss_call::{LossBatch, loss_params, read_loss_output};
use super::metrics::MetricsLog;
use super::trainer::config_of;
use crate::console;
use crate::script::random::loss_call_seed;
use crate::script::{ScriptHost, ScriptVersion, ScriptWatcher};

/// The script of a run: the version in use, the one before it (to fall back to), and the
/// watcher that notices edits of any file it loaded.
pub struct Scripts {
    /// The version the next call goes to.
    pub current: ScriptVersion,
    /// The version the last reload replaced, until a failing call goes back to it.
    previous: Option<ScriptVersion>,
    /// The script's path, loaded again on each edit.
    path: PathBuf,
    watcher: Option<ScriptWatcher>,
    /// Reloads swapped in so far.
    pub reloads: usize,
}

/// Where a script call happens: the step, the config (a fallback puts the previous
/// version's hot fields back), and the log that records a failure.
pub struct CallSite<'a> {
    pub step: usize,
    pub config: &'a mut TrainConfig,
    pub log: &'a mut MetricsLog,
}

/// What the dry run of an edited loss takes from the running training.
pub struct DryRun<'a> {
    pub device: &'a Device,
    pub total_steps: usize,
    pub loss_state: &'a Map,
}

impl Scripts {
    /// `current`, loaded from `path`; nothing watched yet.
    pub fn new(current: ScriptVersion, path: &Path) -> Self {
        Self { current, previous: None, path: path.to_path_buf(), watcher: None, reloads: 0 }
    }

    /// Starts watching the files of the current version.
    pub fn watch(&mut self) -> Result<()> {
        self.watcher = Some(ScriptWatcher::new(&files_of(&self.current))?);
        Ok(())
    }

    /// After an edit: a version that passes [`try_reload`] replaces the running one (its hot
    /// fields applied, restart fields reported and ignored); one that fails is reported and
    /// the run goes on with the running version.
    pub fn reload_if_edited(
        &mut self,
        host: &mut ScriptHost,
        at: CallSite,
        dry_run: DryRun,
        run_dir: &Path,
    ) -> Result<()> {
        let Some(watcher) = self.watcher.as_mut() else { return Ok(()) };
        let changed = watcher.poll();
        if changed.is_empty() {
            return Ok(());
        }
        let CallSite { step, config, log } = at;
        let shown: Vec<String> = changed.iter().map(|p| relative(p)).collect();
        match try_reload(host, &self.path, config, &dry_run) {
            Ok((version, new_config)) => {
                let ignored = config.restart_changes(&new_config);
                if !ignored.is_empty() {
                    console::line(&format!(
                        "notice: {} changed in the script; these need a restart and are ignored",
                        ignored.join(", ")
                    ));
                    log.event(step, "restart_needed", json!({"fields": ignored}))?;
                }
                let heldout_changed = config.heldout != new_config.heldout;
                config.apply_hot(&new_config);
                if heldout_changed {
                    super::identity::RunIdentity::record_heldout(run_dir, config)?;
                }
                console::line(&format!("reloaded {} at step {step}", shown.join(", ")));
                log.event(step, "reload", json!({"files": shown}))?;
                save_sources(run_dir, step, &version)?;
                write_train_config(run_dir, &version, config.arm.as_deref(), Some(dry_run.total_steps), step)?;
                self.watcher = Some(ScriptWatcher::new(&files_of(&version))?);
                self.previous = Some(std::mem::replace(&mut self.current, version));
                self.reloads += 1;
            }
            Err(error) => {
                console::line(&format!(
                    "reload of {} at step {step} failed, keeping the running version:\n{error}",
                    shown.join(", ")
                ));
                log.event(step, "reload_failed", json!({"files": shown, "error": error}))?;
                save_rejected_sources(run_dir, step, &self.current)?;
            }
        }
        Ok(())
    }

    /// Runs `call` with the current version; if it fails and an earlier version is kept,
    /// goes back to that version (and its hot config) and runs it there. Only a failure
    /// with nothing to go back to ends the run.
    pub fn call_with_fallback<T>(
        &mut self,
        at: CallSite,
        what: &str,
        mut call: impl FnMut(&ScriptVersion, &TrainConfig) -> Result<T, String>,
    ) -> Result<T> {
        let CallSite { step, config, log } = at;
        let error = match call(&self.current, config) {
            Ok(value) => return Ok(value),
            Err(error) => error,
        };
        let Some(good) = self.previous.take() else {
            bail!("{what} failed at step {step}:\n{error}");
        };
        console::line(&format!("{what} failed at step {step}, going back to the previous version:\n{error}"));
        log.event(step, &format!("{what}_failed"), json!({"error": error}))?;
        if good.config.is_some() {
            config.apply_hot(&config_of(&good, config.arm.as_deref())?);
        }
        self.current = good;
        call(&self.current, config)
            .map_err(|e| anyhow::anyhow!("{what} failed at step {step} with the previous version too:\n{e}"))
    }
}

/// Compiles the edited script, parses its config, and runs its loss on a small synthetic
/// batch, so a version that would fail is rejected before it replaces the running one.
fn try_reload(
    host: &mut ScriptHost,
    script: &Path,
    running: &TrainConfig,
    dry_run: &DryRun,
) -> Result<(ScriptVersion, TrainConfig), String> {
    let version = host.load(script).map_err(|e| e.to_string())?;
    let config = config_of(&version, running.arm.as_deref()).map_err(|e| format!("{e:#}"))?;
    require_loss(&version, &config.loss_fn).map_err(|e| e.to_string())?;
    require_reward(&version, &config).map_err(|e| e.to_string())?;
    let batch = LossBatch::synthetic(dry_run.device, &running.mode).into_map();
    let params =
        loss_params(&config.params, 0, dry_run.total_steps, dry_run.loss_state, loss_call_seed(running.seed, 0, 0));
    let value = host
        .call(&version, &config.loss_fn, vec![Dynamic::from_map(batch), Dynamic::from_map(params)])
        .map_err(|e| e.to_string())?;
    let out = read_loss_output(value, 2).map_err(|e| format!("{}: {e}", version.fn_location(&config.loss_fn)))?;
    let dry_loss = crate::tensor::values(out.loss)[0];
    if !dry_loss.is_finite() {
        return Err(format!("{}: gave {dry_loss} on the check batch", version.fn_location(&config.loss_fn)));
    }
    script_lr(host, &version, 0, dry_run.total_steps, config.lr)?;
    Ok((version, config))
}

/// The script's `lr(step, total)`, or the config's constant when it defines none.
pub fn script_lr(
    host: &ScriptHost,
    version: &ScriptVersion,
    step: usize,
    total: usize,
    constant: f64,
) -> Result<f64, String> {
    if !version.has_fn("lr", 2) {
        return Ok(constant);
    }
    let value = host
        .call(version, "lr", vec![Dynamic::from_int(step as INT), Dynamic::from_int(total as INT)])
        .map_err(|e| e.to_string())?;
    match number(&value) {
        Ok(lr) if lr.is_finite() && lr >= 0.0 => Ok(lr),
        _ => Err(format!(
            "{}: lr({step}, {total}) returned {value:?}; expected a non-negative number",
            version.fn_location("lr")
        )),
    }
}

/// The loss function exists, and every hook the script defines has the parameters the
/// host calls it with (a hook with other parameters would silently never run).
pub fn require_loss(version: &ScriptVersion, name: &str) -> Result<()> {
    if !version.has_fn(name, 2) {
        bail!("{}: the script defines no fn {name}(batch, params)", version.display_path());
    }
    for (hook, call) in
        [("lr", "lr(step, total)"), ("on_log", "on_log(step, metrics)"), ("on_step", "on_step(step, total)")]
    {
        if version.fn_names().any(|n| n == hook) && !version.has_fn(hook, 2) {
            bail!("{}: fn {hook} has other parameters than the host calls it with: {call}", version.fn_location(hook));
        }
    }
    Ok(())
}

/// An online run scores its samples with the script's reward: the script must define one.
pub fn require_reward(version: &ScriptVersion, config: &TrainConfig) -> Result<()> {
    if config.online.is_some() && !crate::script::reward::defines_reward(version) {
        bail!(
            "{}: online needs a reward: define fn reward(prompt, completion, row), fn reward(prompt, completion) or fn rewards(prompts, completions, rows)",
            version.display_path()
        );
    }
    Ok(())
}

fn number(v: &Dynamic) -> Result<f64> {
    v.as_float().or_else(|_| v.as_int().map(|i| i as f64)).map_err(|t| anyhow::anyhow!("got {t}"))
}

fn files_of(version: &ScriptVersion) -> Vec<PathBuf> {
    version.sources.iter().map(|(p, _)| p.clone()).collect()
}
