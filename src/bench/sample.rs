//! `host bench-sample`: new tokens per second of prefhost's sampling (`host sample`'s
//! code path) against transformers' `generate` on the same model, prompts and settings,
//! side by side in interleaved rounds. Both sides decode the same groups of rows (each
//! prompt repeated `n` times, grouped by prompt length as prefhost groups them, so neither
//! pads), after one short warm-up generation; only the generation is timed. Each round
//! runs each side in a fresh process: prefhost as `host bench-sample --child`, PyTorch as
//! bench/torch_generate.py. A failed PyTorch run fails the bench.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use super::{find_python_with_torch, median};
use crate::data::TextTokenizer;
use crate::data::prompts::load_prompts;
use crate::model::generate::{groups_by_length, sample};
use crate::model::sampling::{SamplingSettings, stop_ids};

pub struct SampleBenchOptions {
    pub model: PathBuf,
    pub prompts: PathBuf,
    pub n: usize,
    pub settings: SamplingSettings,
    pub batch_size: usize,
    pub rounds: usize,
    /// Python with torch and transformers (default: $PREFHOST_PYTHON or python3).
    pub python: Option<String>,
    /// The dtype transformers loads the weights in ("auto": the checkpoint's, as prefhost keeps them).
    pub torch_dtype: String,
    /// CPU threads for each side (rayon's pool for prefhost, torch.set_num_threads for PyTorch).
    pub threads: usize,
    /// Folder for the groups file and bench-sample.md.
    pub out: PathBuf,
}

/// One timed generation: new tokens (up to and including each row's EOS) and seconds.
#[derive(Serialize, Deserialize, Clone, Copy, Debug)]
pub struct GenerationTiming {
    pub new_tokens: usize,
    pub seconds: f64,
}

impl GenerationTiming {
    fn tokens_per_second(&self) -> f64 {
        self.new_tokens as f64 / self.seconds
    }
}

/// The token ids of rows decoded together.
type RowGroup = Vec<Vec<u32>>;

/// The rows both sides decode: every prompt's tokens `n` times, in prefhost's groups.
fn row_groups(opts: &SampleBenchOptions) -> Result<(Vec<Vec<u32>>, Vec<RowGroup>)> {
    let config = crate::model::LlamaConfig::from_file(&opts.model.join("config.json"))?;
    let tokenizer =
        TextTokenizer::load_with(&opts.model.join("tokenizer.json"), &config.eos_ids(), config.pad_token_id)?;
    let prompts: Vec<Vec<u32>> =
        load_prompts(&opts.prompts, &tokenizer, config.max_positions())?.into_iter().map(|p| p.tokens).collect();
    let rows: Vec<&[u32]> = prompts.iter().flat_map(|p| std::iter::repeat_n(p.as_slice(), opts.n)).collect();
    let groups = groups_by_length(&rows, opts.batch_size)
        .into_iter()
        .map(|g| g.into_iter().map(|i| rows[i].to_vec()).collect())
        .collect();
    Ok((prompts, groups))
}

/// The child: loads the model on the CPU, warms up, and times `sample` over every prompt.
pub fn run_child(opts: &SampleBenchOptions) -> Result<GenerationTiming> {
    let device = crate::backend::backend_device("cpu")?;
    let (config, model) = crate::model::load_frozen_model(&opts.model, &device)?;
    let tokenizer =
        TextTokenizer::load_with(&opts.model.join("tokenizer.json"), &config.eos_ids(), config.pad_token_id)?;
    let eos = stop_ids(&opts.model, &tokenizer)?;
    let (prompts, _) = row_groups(opts)?;
    let warm_up = SamplingSettings { max_new_tokens: 2, ..opts.settings };
    sample(&model, &prompts[..1], 1, &warm_up, &eos, 1)?;
    let started = std::time::Instant::now();
    let samples = sample(&model, &prompts, opts.n, &opts.settings, &eos, opts.batch_size)?;
    let seconds = started.elapsed().as_secs_f64();
    let new_tokens = samples.iter().map(|s| s.completion.tokens.len() + usize::from(s.completion.eos)).sum();
    Ok(GenerationTiming { new_tokens, seconds })
}

/// Interleaved rounds of both sides; writes and returns the report.
pub fn run(opts: &SampleBenchOptions, child_args: &[String]) -> Result<String> {
    opts.settings.validate()?;
    if opts.n == 0 || opts.batch_size == 0 || opts.rounds == 0 || opts.threads == 0 {
        bail!("--n, --batch-size, --rounds and --threads must be at least 1");
    }
    let python = opts
        .python
        .clone()
        .or_else(find_python_with_torch)
        .context("no Python with torch found: set --python or PREFHOST_PYTHON")?;
    std::fs::create_dir_all(&opts.out).with_context(|| format!("creating {}", opts.out.display()))?;
    let (prompts, groups) = row_groups(opts)?;
    let groups_file = opts.out.join("groups.json");
    std::fs::write(&groups_file, serde_json::to_string(&groups)?)?;
    let exe = std::env::current_exe()?;
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    let mut torch_version = String::new();
    for round in 0..opts.rounds {
        eprintln!("round {}/{}: prefhost", round + 1, opts.rounds);
        let out = Command::new(&exe)
            .arg("bench-sample")
            .args(child_args)
            .arg("--child")
            .env("RAYON_NUM_THREADS", opts.threads.to_string())
            .output()?;
        if !out.status.success() {
            bail!("prefhost child: {}", String::from_utf8_lossy(&out.stderr));
        }
        ours.push(
            serde_json::from_slice::<GenerationTiming>(&out.stdout)
                .context("prefhost child: output is not a timing")?,
        );
        eprintln!("round {}/{}: transformers", round + 1, opts.rounds);
        let (timing, version) = run_torch(&python, opts, &groups_file)?;
        theirs.push(timing);
        torch_version = version;
    }
    let rate = |t: &[GenerationTiming]| median(&t.iter().map(GenerationTiming::tokens_per_second).collect::<Vec<_>>());
    let ratios: Vec<f64> =
        ours.iter().zip(&theirs).map(|(a, b)| a.tokens_per_second() / b.tokens_per_second()).collect();
    let s = &opts.settings;
    let mut report = format!(
        "host bench-sample: {} on {} ({} prompts x {} samples, {} groups of up to {} rows), temperature {}, top_k {}, top_p {}, repetition_penalty {}, max_new_tokens {}, {} interleaved rounds, {} CPU threads per side\n\n",
        opts.model.display(),
        opts.prompts.display(),
        prompts.len(),
        opts.n,
        groups.len(),
        opts.batch_size,
        s.temperature,
        s.top_k,
        s.top_p,
        s.repetition_penalty,
        s.max_new_tokens,
        opts.rounds,
        opts.threads
    );
    report.push_str("| side | median new tokens/s | per round | new tokens per round |\n|---|---|---|---|\n");
    for (name, timings) in [
        ("prefhost (cpu)".to_string(), &ours),
        (format!("transformers generate ({torch_version}, dtype {})", opts.torch_dtype), &theirs),
    ] {
        let per_round: Vec<String> = timings.iter().map(|t| format!("{:.0}", t.tokens_per_second())).collect();
        let tokens: Vec<String> = timings.iter().map(|t| t.new_tokens.to_string()).collect();
        report.push_str(&format!(
            "| {name} | {:.0} | {} | {} |\n",
            rate(timings),
            per_round.join(", "),
            tokens.join(", ")
        ));
    }
    let (lo, hi) = ratios.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), &r| (l.min(r), h.max(r)));
    report.push_str(&format!(
        "\nprefhost / transformers tokens/s: median of per-round ratios {:.2} (min {lo:.2}, max {hi:.2})\n",
        median(&ratios)
    ));
    std::fs::write(opts.out.join("bench-sample.md"), &report)?;
    Ok(report)
}

/// One round of bench/torch_generate.py: its timing and its torch/transformers versions.
fn run_torch(python: &str, opts: &SampleBenchOptions, groups: &Path) -> Result<(GenerationTiming, String)> {
    let script = std::env::current_dir()?.join("bench/torch_generate.py");
    let s = &opts.settings;
    let out = Command::new(python)
        .arg(&script)
        .arg("--model")
        .arg(&opts.model)
        .arg("--groups")
        .arg(groups)
        .args([
            "--temperature",
            &s.temperature.to_string(),
            "--top-k",
            &s.top_k.to_string(),
            "--top-p",
            &s.top_p.to_string(),
        ])
        .args(["--repetition-penalty", &s.repetition_penalty.to_string()])
        .args([
            "--max-new-tokens",
            &s.max_new_tokens.to_string(),
            "--seed",
            &s.seed.to_string(),
            "--dtype",
            &opts.torch_dtype,
        ])
        .args(["--threads", &opts.threads.to_string()])
        .env("OMP_NUM_THREADS", opts.threads.to_string())
        // The allocator settings prefhost gives itself (src/allocator.rs).
        .env("GLIBC_TUNABLES", crate::allocator::glibc_tunables())
        .output()
        .with_context(|| format!("running {python} {}", script.display()))?;
    if !out.status.success() {
        bail!("{}: {}", script.display(), String::from_utf8_lossy(&out.stderr));
    }
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).with_context(|| format!("{}: output is not JSON", script.display()))?;
    let timing: GenerationTiming = serde_json::from_value(v.clone())
        .with_context(|| format!("{}: no new_tokens/seconds in its output", script.display()))?;
    Ok((
        timing,
        format!(
            "transformers {}, torch {}, {} threads",
            v["transformers"].as_str().unwrap_or("?"),
            v["torch"].as_str().unwrap_or("?"),
            v["threads"]
        ),
    ))
}
