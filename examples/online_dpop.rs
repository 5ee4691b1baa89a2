//! Online DPOP against offline DPOP on the arithmetic task (README, "Online DPOP against
//! offline DPOP"): trains scripts/online_dpop.rhai and scripts/offline_dpop.rhai (same model,
//! loss, schedule and number of updates), scores the greedy held-out accuracy of the starting
//! model and of every checkpoint (one per online round) on the 200 rows of
//! data/arithmetic/eval.jsonl, and writes `results.md`, `results.json` and
//! `online_dpop.png` (accuracy of both runs and the online rounds' mean reward, by step).
//!
//!     cargo run --release --example online_dpop [OUT_DIR [ONLINE_SCRIPT OFFLINE_SCRIPT]]
//!
//! OUT_DIR defaults to runs/online-vs-offline-<time>; the scripts to the two above (others,
//! e.g. with another learning rate, must keep their checkpoints every round).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use burn::tensor::Device;
use prefhost::data::TextTokenizer;
use prefhost::report::{Chart, Series, line_chart_png};
use prefhost::script::{Limits, ScriptEngine, ScriptHost};
use prefhost::train::checkpoint::checkpoint_folders;
use prefhost::train::evaluate::{evaluate, load_eval_rows};
use prefhost::train::{RunOptions, run};

const EVAL: &str = "data/arithmetic/eval.jsonl";
const MAX_NEW_TOKENS: usize = 64;

/// Greedy held-out accuracy of the model folder `dir`.
fn accuracy(dir: &Path) -> Result<f64> {
    let device = Device::default();
    let (config, model) = prefhost::model::load_model(dir, &device)?;
    let tokenizer = TextTokenizer::load_with(&dir.join("tokenizer.json"), &config.eos_ids(), config.pad_token_id)?;
    let rows = load_eval_rows(Path::new(EVAL), None)?;
    Ok(evaluate(&model, &tokenizer, &rows, MAX_NEW_TOKENS)?.accuracy)
}

/// Trains `script` into `dir`, then (step, accuracy) of the starting model and each checkpoint.
fn train_and_score(script: &str, dir: &Path) -> Result<Vec<(usize, f64)>> {
    let mut host = ScriptHost::new(ScriptEngine::new(Path::new("plugins"), &Limits::default()));
    let options = RunOptions {
        script: PathBuf::from(script),
        watch: false,
        run_dir: Some(dir.to_path_buf()),
        max_steps: None,
        resume: None,
        resume_anyway: false,
    };
    run(&mut host, options)?;
    let mut scored = vec![(0, accuracy(Path::new("models/tiny-math"))?)];
    for (step, ckpt) in checkpoint_folders(dir)? {
        scored.push((step, accuracy(&ckpt)?));
    }
    Ok(scored)
}

/// (first step the round trained, its mean reward) of each `online_round` event of a run.
fn round_rewards(dir: &Path) -> Result<Vec<(usize, f64)>> {
    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).context("metrics.jsonl")?;
    let lines = text.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok());
    Ok(lines
        .filter(|l| l["event"] == "online_round")
        .filter_map(|l| Some((l["step"].as_u64()? as usize - 1, l["online/reward_mean"].as_f64()?)))
        .collect())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let out = args
        .first()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(format!("runs/online-vs-offline-{}", prefhost::clock::timestamp())));
    let online_script = args.get(1).map_or("scripts/online_dpop.rhai", String::as_str);
    let offline_script = args.get(2).map_or("scripts/offline_dpop.rhai", String::as_str);
    std::fs::create_dir_all(&out)?;
    let started = std::time::Instant::now();
    let online = train_and_score(online_script, &out.join("online"))?;
    let offline = train_and_score(offline_script, &out.join("offline"))?;
    let rewards = round_rewards(&out.join("online"))?;
    let seconds = started.elapsed().as_secs_f64();

    let mut table =
        String::from("| step | online accuracy | offline accuracy | online round's mean reward |\n|---|---|---|---|\n");
    for ((step, on), (_, off)) in online.iter().zip(&offline) {
        let reward = rewards.iter().find(|(s, _)| s == step).map_or("".to_string(), |(_, r)| format!("{r:.3}"));
        table += &format!("| {step} | {on:.3} | {off:.3} | {reward} |\n");
    }
    std::fs::write(out.join("results.md"), format!("{table}\n{seconds:.0} s in all\n"))?;
    let json = serde_json::json!({ "online_accuracy": online, "offline_accuracy": offline, "online_reward_mean": rewards, "seconds": seconds });
    std::fs::write(out.join("results.json"), serde_json::to_string_pretty(&json)?)?;
    let points = |v: &[(usize, f64)]| v.iter().map(|&(s, y)| (s as f64, y)).collect();
    let chart = Chart {
        title: "online vs offline DPOP, tiny-math".into(),
        x_label: "step".into(),
        y_label: "held-out accuracy / mean reward".into(),
        series: vec![
            Series { label: "online accuracy".into(), points: points(&online) },
            Series { label: "offline accuracy".into(), points: points(&offline) },
            Series { label: "online reward".into(), points: points(&rewards) },
        ],
        zero_line: true,
    };
    line_chart_png(&chart, &out.join("online_dpop.png"))?;
    println!("{table}\n{seconds:.0} s; written to {}", out.display());
    Ok(())
}
