//! Comparisons: `compare: [...]` in train(config) trains each arm from the same start
//! (same model, seed and data order) in its own sub-folder, then writes a report — the
//! held-out accuracy table and plots of the metrics that tell the arms apart.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::checkpoint;
use super::config::TrainConfig;
use super::evaluate::EvalResult;
use super::lock::RunLock;
use super::trainer::{Interrupt, RunOptions, RunSummary, StartWith, config_of, train_one_locked};
use crate::console;
use crate::report::{Chart, Series, line_chart_png};
use crate::script::ScriptHost;

/// Written into an arm's folder when it has finished, so a resumed comparison skips it.
const ARM_RESULT: &str = "arm_result.json";

/// The plots of a comparison: (file, metric, title, y label).
const PLOTS: &[(&str, &str, &str, &str)] = &[
    ("logp_chosen_vs_ref.png", "logps/chosen_minus_ref", "log p(chosen) - log p_ref(chosen)", "nats per completion"),
    (
        "token_delta_after_diff.png",
        "diagnostics/token_delta_after_diff",
        "per-token log-prob change after the first differing token (chosen)",
        "nats per token",
    ),
    ("reward_margins.png", "rewards/margins", "rewards/margins", "beta * margin"),
];

#[derive(Serialize, Deserialize)]
struct ArmResult {
    name: String,
    steps: usize,
    eval_before: Option<EvalResult>,
    eval_after: Option<EvalResult>,
    final_checkpoint: Option<PathBuf>,
}

pub fn run_comparison(
    host: &mut ScriptHost,
    options: RunOptions,
    config: TrainConfig,
    interrupt: &Interrupt,
) -> Result<RunSummary> {
    // The comparison's own folder has one writer too (the report, results.json, the
    // arms' bookkeeping); held until the comparison returns.
    let _lock;
    let run_dir = match &options.resume {
        Some(dir) => {
            _lock = RunLock::acquire(dir)?;
            dir.clone()
        }
        None => {
            let dir = super::trainer::run_folder_for(&options, &config);
            if dir.exists() {
                bail!(
                    "{}: run folder already exists; continue it with --resume, or choose another with --run-dir",
                    dir.display()
                );
            }
            std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
            _lock = RunLock::acquire(&dir)?;
            checkpoint::write_run_info(&dir, &options.script, None)?;
            checkpoint::write_train_config(
                &dir,
                &host.load(&options.script).map_err(|e| anyhow::anyhow!("{e}"))?,
                None,
                None,
                0,
            )?;
            dir
        }
    };
    let names: Vec<&str> = config.compare.iter().map(|a| a.name.as_str()).collect();
    console::line(&format!("comparison {}: arms {} from the same start", run_dir.display(), names.join(", ")));

    let mut results: Vec<ArmResult> = Vec::new();
    let mut reloads = 0;
    for (i, arm) in config.compare.iter().enumerate() {
        let arm_dir = run_dir.join(&arm.name);
        if let Ok(text) = std::fs::read_to_string(arm_dir.join(ARM_RESULT)) {
            let done: ArmResult = serde_json::from_str(&text)
                .with_context(|| format!("{}: corrupt", arm_dir.join(ARM_RESULT).display()))?;
            console::line(&format!("arm {}: already finished ({} steps)", arm.name, done.steps));
            results.push(done);
            continue;
        }
        // An arm that started but has no checkpoint yet starts over; one with a checkpoint resumes.
        // Damaged checkpoints count as checkpoints: the resume then refuses, naming them,
        // rather than the arm's folder being cleared. The arm's lock comes first (an arm
        // folder can be resumed on its own), then a save a crash interrupted is tidied,
        // so that a checkpoint it left moved aside counts. The resume checks the
        // checkpoints against their manifests, once.
        let mut arm_lock = None;
        let mut resume = false;
        if arm_dir.is_dir() {
            let lock = RunLock::acquire(&arm_dir)?;
            checkpoint::tidy_interrupted_saves(&arm_dir)?;
            resume = checkpoint::has_checkpoint_folder(&arm_dir);
            if resume {
                arm_lock = Some(lock);
            } else {
                std::fs::remove_dir_all(&arm_dir).with_context(|| format!("cannot clear {}", arm_dir.display()))?;
                lock.removed_with_folder();
            }
        }
        console::line(&format!("---- arm {} ({}/{}): loss fn {}", arm.name, i + 1, names.len(), arm.loss_fn));
        let version = host.load(&options.script).map_err(|e| anyhow::anyhow!("{e}"))?;
        let arm_config = config_of(&version, Some(&arm.name))?;
        let arm_options =
            RunOptions { run_dir: Some(arm_dir.clone()), resume: resume.then(|| arm_dir.clone()), ..options.clone() };
        // Every arm starts from the same model, so the starting accuracy is measured once.
        let with =
            StartWith { eval_before: i == 0, held: arm_lock, interrupt: interrupt.clone(), rust_dpo_loss: false };
        let summary = train_one_locked(host, arm_options, version, arm_config, with)?;
        reloads += summary.reloads;
        if summary.interrupted {
            console::line(&format!(
                "comparison interrupted in arm {}; continue with: host run --resume {}",
                arm.name,
                run_dir.display()
            ));
            return Ok(RunSummary { run_dir, ..summary });
        }
        let eval_before =
            if i == 0 { summary.eval_before.clone() } else { results.first().and_then(|r| r.eval_before.clone()) };
        let result = ArmResult {
            name: arm.name.clone(),
            steps: summary.steps,
            eval_before,
            eval_after: summary.eval.clone(),
            final_checkpoint: summary.final_checkpoint.clone(),
        };
        write_whole(&arm_dir.join(ARM_RESULT), &serde_json::to_vec_pretty(&result)?)?;
        results.push(result);
    }
    write_report(&run_dir, &config, &results)?;
    let steps = results.iter().map(|r| r.steps).sum();
    Ok(RunSummary {
        run_dir,
        steps,
        reloads,
        interrupted: false,
        eval: None,
        eval_before: None,
        final_checkpoint: None,
        step_seconds: Vec::new(),
        loss_call_seconds: Vec::new(),
    })
}

/// The metric lines (not events) of a run's metrics.jsonl.
pub fn read_metric_lines(path: &Path) -> Result<Vec<serde_json::Map<String, Value>>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| match v {
            Value::Object(m) if !m.contains_key("event") => Some(m),
            _ => None,
        })
        .collect())
}

fn write_report(run_dir: &Path, config: &TrainConfig, results: &[ArmResult]) -> Result<()> {
    let mut lines_by_arm = Vec::new();
    for r in results {
        lines_by_arm.push((r.name.clone(), read_metric_lines(&run_dir.join(&r.name).join("metrics.jsonl"))?));
    }
    let mut written = Vec::new();
    for (file, metric, title, y_label) in PLOTS {
        let series: Vec<Series> = lines_by_arm
            .iter()
            .map(|(name, lines)| {
                // Each plotted metric is 0 at step 0, where the policy is the reference.
                let logged = lines.iter().filter_map(|m| Some((m.get("step")?.as_f64()?, m.get(*metric)?.as_f64()?)));
                Series { label: name.clone(), points: std::iter::once((0.0, 0.0)).chain(logged).collect() }
            })
            .filter(|s| s.points.len() > 1)
            .collect();
        if series.is_empty() {
            continue;
        }
        let chart = Chart {
            title: title.to_string(),
            x_label: "step".into(),
            y_label: y_label.to_string(),
            series,
            zero_line: true,
        };
        line_chart_png(&chart, &run_dir.join(file))?;
        written.push(*file);
    }

    // The table: held-out accuracy and where each arm ended.
    let last =
        |lines: &[serde_json::Map<String, Value>], key: &str| lines.iter().rev().find_map(|m| m.get(key)?.as_f64());
    let accuracy = |e: &Option<EvalResult>| {
        e.as_ref().map_or("-".to_string(), |e| format!("{:.1}% ({}/{})", 100.0 * e.accuracy, e.correct, e.total))
    };
    let number = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.3}"));
    let mut md = String::from(
        "| model | held-out accuracy (greedy) | log p(chosen) − ref, last log step | rewards/margins | rewards/accuracies | token change after first difference |\n|---|---|---|---|---|---|\n",
    );
    let before = results.first().and_then(|r| r.eval_before.clone());
    md.push_str(&format!("| before training | {} | 0 | - | - | 0 |\n", accuracy(&before)));
    for (r, (_, lines)) in results.iter().zip(&lines_by_arm) {
        md.push_str(&format!(
            "| after {} ({} steps) | {} | {} | {} | {} | {} |\n",
            r.name,
            r.steps,
            accuracy(&r.eval_after),
            number(last(lines, "logps/chosen_minus_ref")),
            number(last(lines, "rewards/margins")),
            number(last(lines, "rewards/accuracies")),
            number(last(lines, "diagnostics/token_delta_after_diff")),
        ));
    }
    let report = format!(
        "# Comparison: {}\n\nArms trained from the same start ({}, seed {}, data {}).\n\n{md}\n{}\n",
        config.name.clone().unwrap_or_default(),
        config.model,
        config.seed,
        config.data,
        written.iter().map(|f| format!("![{f}]({f})")).collect::<Vec<_>>().join("\n"),
    );
    write_whole(&run_dir.join("report.md"), report.as_bytes())?;
    let json_results: Vec<Value> = results
        .iter()
        .zip(&lines_by_arm)
        .map(|(r, (_, lines))| json!({"name": r.name, "steps": r.steps, "eval_after": r.eval_after, "last_metrics": lines.last()}))
        .collect();
    write_whole(
        &run_dir.join("results.json"),
        &serde_json::to_vec_pretty(&json!({"eval_before": before, "arms": json_results}))?,
    )?;
    console::line(&format!("report: {}\n{md}", run_dir.join("report.md").display()));
    Ok(())
}

/// Writes `path` through a hidden temporary beside it and a rename, so that a full disk
/// leaves the previous version (or none), never a cut-short file.
fn write_whole(path: &Path, bytes: &[u8]) -> Result<()> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    let written = std::fs::write(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.with_context(|| format!("writing {}", path.display()))
}
