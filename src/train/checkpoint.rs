//! Checkpoints a run can be resumed from: the policy in HF format plus the optimizer
//! state and everything that decides what happens next (step, data order and position,
//! RNG, the loss plugin's state), written to a staging folder and renamed into place.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burn::tensor::Device;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::optimizer::ModelAdamW;
use crate::model::weights::{ADAPTER_CONFIG, ExtraFile, interrupted_save_of, recover_folder, verify_manifest};
use crate::model::{Llama, LoraConfig, MixedPrecision, load_model, read_adapter};
use crate::rng::SplitMix64;
use crate::script::ScriptVersion;

pub const STATE_FILE: &str = "trainer_state.json";
pub const OPTIMIZER_FILE: &str = "optimizer.bpk";
pub const RUN_FILE: &str = "run.json";
/// The script and plugin sources in use when the checkpoint was written (path → text).
pub const SOURCES_FILE: &str = "script_sources.json";

#[derive(Serialize, Deserialize)]
pub struct TrainerState {
    /// Steps completed.
    pub step: usize,
    pub epoch: usize,
    pub cursor: usize,
    pub order: Vec<usize>,
    pub rng: SplitMix64,
    /// `params.state` of the loss (plain values only).
    pub loss_state: serde_json::Value,
    pub skipped_steps: usize,
    /// With `replay` > 1: the rows of each micro-batch of the batch being replayed.
    #[serde(default)]
    pub replayed: Vec<Vec<usize>>,
    /// With `online`: the round whose pairs the run was training on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub online_round: Option<RoundMark>,
}

/// Where in the online rounds a checkpoint was made: the round and how many pairs it had
/// (checked against `online/round-NNNN.pairs.jsonl` on resume).
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq)]
pub struct RoundMark {
    pub round: usize,
    pub pairs: usize,
}

/// What `--resume` needs to know about a run folder.
#[derive(Serialize, Deserialize)]
pub struct RunInfo {
    pub script: PathBuf,
    /// The comparison arm this folder trains (a sub-folder of the comparison's run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arm: Option<String>,
}

pub fn write_run_info(run_dir: &Path, script: &Path, arm: Option<&str>) -> Result<()> {
    let info = RunInfo {
        script: script.canonicalize().unwrap_or_else(|_| script.to_path_buf()),
        arm: arm.map(str::to_string),
    };
    std::fs::write(run_dir.join(RUN_FILE), serde_json::to_string_pretty(&info)? + "\n")
        .with_context(|| format!("writing {}", run_dir.join(RUN_FILE).display()))
}

pub fn read_run_info(run_dir: &Path) -> Result<RunInfo> {
    let path = run_dir.join(RUN_FILE);
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("{}: not a prefhost run folder", path.display()))?;
    serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}:{}:{}: {e}", path.display(), e.line(), e.column()))
}

/// The checkpoint with the most steps (`checkpoint-N/` holding a trainer state) whose
/// files match its manifest. Staging folders of interrupted saves start with a dot and
/// are never picked. What a crash during a save left is tidied first: a checkpoint it
/// left moved aside while being replaced is put back, so that one is found too.
pub fn latest_checkpoint(run_dir: &Path) -> Result<(usize, PathBuf)> {
    tidy_interrupted_saves(run_dir)?;
    let mut found: Vec<(usize, PathBuf)> =
        checkpoint_folders(run_dir)?.into_iter().filter(|(_, path)| path.join(STATE_FILE).is_file()).collect();
    if found.is_empty() {
        bail!("{}: no checkpoint to resume from (checkpoints are written every save_every steps)", run_dir.display());
    }
    // Newest first; one whose files do not match its manifest (damaged after it was
    // written) is passed over for the one before. It stays until the run saves that
    // step again, which replaces it.
    found.sort_by_key(|f| std::cmp::Reverse(f.0));
    let mut damaged = Vec::new();
    for (step, path) in found {
        match verify_manifest(&path) {
            Ok(_) => {
                if !damaged.is_empty() {
                    crate::console::line(&format!("note: falling back to {}: {}", path.display(), damaged.join("; ")));
                }
                return Ok((step, path));
            }
            Err(e) => damaged.push(format!("{} is damaged ({e:#})", path.display())),
        }
    }
    bail!("{}: every checkpoint is damaged:\n  {}", run_dir.display(), damaged.join("\n  "))
}

/// Puts back a checkpoint a crash during a save left moved aside, and removes staging
/// folders. Only the run's writer may do this (it holds the run's lock): another run's
/// save in progress looks the same.
pub fn tidy_interrupted_saves(run_dir: &Path) -> Result<()> {
    for entry in std::fs::read_dir(run_dir).with_context(|| format!("cannot read {}", run_dir.display()))? {
        let name = entry?.file_name();
        let name = name.to_str().unwrap_or_default();
        if let Some(checkpoint) = interrupted_save_of(name).filter(|n| n.starts_with("checkpoint-")) {
            recover_folder(&run_dir.join(checkpoint))?;
        }
    }
    Ok(())
}

/// Every `checkpoint-N/` folder in `run_dir` (complete or not), by step.
pub fn checkpoint_folders(run_dir: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(run_dir).with_context(|| format!("cannot read {}", run_dir.display()))? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if let Some(step) =
            name.strip_prefix("checkpoint-").and_then(|s| s.parse::<usize>().ok()).filter(|_| path.is_dir())
        {
            found.push((step, path));
        }
    }
    found.sort();
    Ok(found)
}

/// Whether `run_dir` holds a `checkpoint-N/` with a trainer state, sound or not.
pub fn has_checkpoint_folder(run_dir: &Path) -> bool {
    checkpoint_folders(run_dir).is_ok_and(|found| found.iter().any(|(_, path)| path.join(STATE_FILE).is_file()))
}

/// One checkpoint as `host verify` finds it.
pub enum Verdict {
    /// Every file matches the manifest.
    Sound,
    /// Written before checkpoints carried a manifest: nothing to check against.
    NoManifest,
    /// The first file that is missing or differs, and how.
    Damaged(String),
}

/// Each checkpoint folder with its verdict, and the staging folders found beside them.
pub type RunVerdicts = (Vec<(PathBuf, Verdict)>, Vec<PathBuf>);

/// Checks every checkpoint of `run_dir` against its manifest, without changing anything
/// (a save in progress, or one a crash interrupted, is listed apart: `side`).
pub fn verify_run(run_dir: &Path) -> Result<RunVerdicts> {
    let mut verdicts = Vec::new();
    for (_, path) in checkpoint_folders(run_dir)? {
        let verdict = match verify_manifest(&path) {
            Ok(true) => Verdict::Sound,
            Ok(false) => Verdict::NoManifest,
            Err(e) => Verdict::Damaged(format!("{e:#}")),
        };
        verdicts.push((path, verdict));
    }
    let mut side = Vec::new();
    for entry in std::fs::read_dir(run_dir).with_context(|| format!("cannot read {}", run_dir.display()))? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if interrupted_save_of(name).is_some_and(|n| n.starts_with("checkpoint-")) {
            side.push(path);
        }
    }
    side.sort();
    Ok((verdicts, side))
}

/// `host verify RUN_DIR`: one line per checkpoint of the run folder and, for a
/// comparison, of each arm's folder; true when none is damaged (a checkpoint without a
/// manifest is reported unchecked, not damaged).
pub fn verify_report(run_dir: &Path) -> Result<(Vec<String>, bool)> {
    read_run_info(run_dir)?;
    let mut folders = vec![run_dir.to_path_buf()];
    let mut arms: Vec<PathBuf> = std::fs::read_dir(run_dir)
        .with_context(|| format!("cannot read {}", run_dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join(RUN_FILE).is_file())
        .collect();
    arms.sort();
    folders.extend(arms);
    let (mut lines, mut sound) = (Vec::new(), true);
    for folder in &folders {
        let (verdicts, side) = verify_run(folder)?;
        if verdicts.is_empty() {
            lines.push(format!("{}: no checkpoints", folder.display()));
        }
        for (path, verdict) in verdicts {
            lines.push(match verdict {
                Verdict::Sound => format!("{}: ok", path.display()),
                Verdict::NoManifest => {
                    format!("{}: no manifest, unchecked (written before checkpoints carried one)", path.display())
                }
                Verdict::Damaged(why) => {
                    sound = false;
                    format!("{}: damaged: {why}", path.display())
                }
            });
        }
        for path in side {
            lines.push(format!(
                "{}: left by a save that was interrupted or is in progress (not a checkpoint; --resume tidies it)",
                path.display()
            ));
        }
    }
    Ok((lines, sound))
}

pub fn read_state(dir: &Path) -> Result<TrainerState> {
    let path = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}:{}:{}: {e}", path.display(), e.line(), e.column()))
}

/// Keeps only the metric lines up to `step`, so a resumed run's log reads as one run.
pub fn truncate_metrics(path: &Path, step: usize) -> Result<()> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let kept: String = text
        .lines()
        .filter(|line| {
            serde_json::from_str::<serde_json::Value>(line)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s as usize <= step)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    let tmp = path.with_extension("jsonl.tmp");
    std::fs::write(&tmp, kept).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))?;
    Ok(())
}

/// Writes `checkpoint-{state.step}` in `run_dir` through a staging folder renamed into
/// place: the policy by `write_policy` (HF layout, or a LoRA run's adapters), the optimizer
/// state, the trainer state and the sources of the script version in use.
pub fn save(
    run_dir: &Path,
    state: &TrainerState,
    optimizer: &ModelAdamW,
    script: &ScriptVersion,
    write_policy: impl Fn(&Path, &[ExtraFile]) -> Result<()>,
) -> Result<PathBuf> {
    let state_json = serde_json::to_vec_pretty(state)?;
    let sources: serde_json::Map<String, serde_json::Value> =
        script.sources.iter().map(|(path, text)| (relative(path), json!(text))).collect();
    let sources_json = serde_json::to_vec_pretty(&sources)?;
    let dir = run_dir.join(format!("checkpoint-{}", state.step));
    // AdamW's moments (twice the trainable weights) stream to the file tensor by tensor.
    let write_optimizer = |path: &Path| optimizer.save(path);
    let (write_state, write_sources) =
        (|path: &Path| Ok(std::fs::write(path, &state_json)?), |path: &Path| Ok(std::fs::write(path, &sources_json)?));
    let extra = [
        ExtraFile { name: STATE_FILE, write: &write_state },
        ExtraFile { name: OPTIMIZER_FILE, write: &write_optimizer },
        ExtraFile { name: SOURCES_FILE, write: &write_sources },
    ];
    write_policy(&dir, &extra).or_else(|error| {
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

/// The policy of checkpoint `ckpt`: a LoRA run's adapters set into `policy` (rank and
/// targets must be the script's), or the full model's weights with `precision`.
pub fn restore_policy(
    ckpt: &Path,
    policy: &Llama,
    lora: Option<&LoraConfig>,
    precision: MixedPrecision,
    device: &Device,
) -> Result<Llama> {
    let is_adapter = ckpt.join(ADAPTER_CONFIG).is_file();
    match lora {
        Some(lora) => {
            if !is_adapter {
                bail!(
                    "{}: a full-model checkpoint, but the script trains LoRA adapters; resume needs the same lora setting",
                    ckpt.display()
                );
            }
            let mut files = read_adapter(ckpt)?;
            if files.lora.r != lora.r || files.lora.modules()? != lora.modules()? {
                bail!(
                    "{}: adapters of rank {} on {:?}, the script asks for rank {} on {:?}; resume needs the same lora setting",
                    ckpt.display(),
                    files.lora.r,
                    files.lora.modules()?,
                    lora.r,
                    lora.modules()?
                );
            }
            policy.clone().set_adapters(&mut files.tensors, device).with_context(|| ckpt.display().to_string())
        }
        None if is_adapter => bail!(
            "{}: a LoRA adapter checkpoint, but the script has no lora setting; resume needs the same lora setting",
            ckpt.display()
        ),
        None => Ok(load_model(ckpt, device)?.1.with_precision(precision)),
    }
}

/// `optimizer` with the moments checkpoint `ckpt` saved.
pub fn restore_optimizer(ckpt: &Path, optimizer: ModelAdamW, device: &Device) -> Result<ModelAdamW> {
    optimizer.load(&ckpt.join(OPTIMIZER_FILE), device)
}

/// Copies the exact sources a run used (at start and after each reload) into the run folder.
pub fn save_sources(run_dir: &Path, step: usize, version: &ScriptVersion) -> Result<()> {
    let dir = run_dir.join(SOURCES_DIR).join(format!("step-{step:06}"));
    for (path, text) in &version.sources {
        let target = dir.join(relative(path));
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
        }
        std::fs::write(&target, text).with_context(|| format!("writing {}", target.display()))?;
    }
    Ok(())
}

/// Copies the sources of a version an edit tried and a reload rejected (as they are on
/// disk now: the running version's files, read again) into `rejected_sources/step-N/`, so
/// the edit that failed can be looked at beside its error (`host dashboard`).
pub fn save_rejected_sources(run_dir: &Path, step: usize, running: &ScriptVersion) -> Result<()> {
    let dir = run_dir.join(REJECTED_SOURCES_DIR).join(format!("step-{step:06}"));
    for (path, _) in &running.sources {
        // A file the edit removed is left out: the error names what is missing.
        let Ok(text) = std::fs::read_to_string(path) else { continue };
        let target = dir.join(relative(path));
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
        }
        std::fs::write(&target, text).with_context(|| format!("writing {}", target.display()))?;
    }
    Ok(())
}

/// The sources of every version a run used, by the step it took over (`step-NNNNNN/`).
pub const SOURCES_DIR: &str = "sources";
/// The sources of versions a reload rejected, by the step of the attempt.
pub const REJECTED_SOURCES_DIR: &str = "rejected_sources";
/// What the run's script asked for: its `train(config)` map as the version in use has it,
/// the arm, and the steps the run takes; rewritten after each reload.
pub const CONFIG_FILE: &str = "train_config.json";

/// Writes `RUN_DIR/train_config.json` (through a temporary file and a rename, so a reader
/// never sees half of it): the script's `train(config)` map, as JSON, at `step`.
pub fn write_train_config(
    run_dir: &Path,
    version: &ScriptVersion,
    arm: Option<&str>,
    total_steps: Option<usize>,
    step: usize,
) -> Result<()> {
    let config = version.config.clone().map(|map| {
        serde_json::to_value(rhai::Dynamic::from_map(map))
            .unwrap_or_else(|e| json!(format!("(not representable as JSON: {e})")))
    });
    let value = json!({"step": step, "arm": arm, "total_steps": total_steps, "script": relative(&version.path), "config": config});
    let path = run_dir.join(CONFIG_FILE);
    let tmp = run_dir.join(format!("{CONFIG_FILE}.tmp"));
    std::fs::write(&tmp, serde_json::to_vec_pretty(&value)?)
        .and_then(|()| std::fs::rename(&tmp, &path))
        .with_context(|| format!("writing {}", path.display()))
}

/// The path relative to the working directory, or without its root when it lies
/// elsewhere, so it can always be placed inside the run folder.
pub fn relative(path: &Path) -> String {
    let cwd = std::env::current_dir().unwrap_or_default();
    let abs = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let rel = abs
        .strip_prefix(&cwd)
        .map(Path::to_path_buf)
        .unwrap_or_else(|_| abs.components().filter(|c| matches!(c, std::path::Component::Normal(_))).collect());
    rel.display().to_string()
}
