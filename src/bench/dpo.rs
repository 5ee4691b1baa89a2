//! `host bench`: times a DPO training step on one model and one batch in several
//! configurations, side by side in one run, and prints ratios. Each configuration runs in
//! its own child process (`host bench --child NAME`) so its peak RSS is its own, and the
//! rounds are interleaved. When Python with torch is given or found, PyTorch's DPO step on
//! the same weights and batch (bench/torch_dpo_step.py, eager and torch.compile, logits
//! only from the first completion column on as prefhost forms them) runs
//! beside them, with prefhost's allocator settings; a failed PyTorch run, or first-step
//! log-probs that differ from prefhost's, fails the bench.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use serde_json::json;

use burn::module::Module;

use super::{ModelPreset, find_python_with_torch, median, pair_tokens, train_dpo, write_torch_batch};
use crate::data::{TextTokenizer, Truncation, load_examples};
use crate::model::{Llama, RandomInit, save_model};
use crate::train::reference;

/// One timed configuration.
struct Config {
    name: &'static str,
    data: &'static str,
    /// "model", or "model_large_vocab" (the same model with a 32k vocabulary).
    model: &'static str,
    rust_loss: bool,
    prefix_sharing: bool,
    precomputed_ref: bool,
    logits_chunk: Option<usize>,
    /// LoRA r=16 on every projection; the reference is the frozen base (no copy).
    lora: bool,
    /// burn's op-by-op autodiff instead of prefhost's fused ops (PREFHOST_UNFUSED=1).
    unfused: bool,
    /// Each decoder layer recomputed in the backward pass (`gradient_checkpointing`).
    gradient_checkpointing: bool,
}

const PLAIN: Config = Config {
    name: "",
    data: "metamath",
    model: "model",
    rust_loss: false,
    prefix_sharing: false,
    precomputed_ref: false,
    logits_chunk: None,
    lora: false,
    unfused: false,
    gradient_checkpointing: false,
};

const CONFIGS: [Config; 16] = [
    Config { name: "metamath/script-loss", ..PLAIN },
    Config { name: "metamath/rust-loss", rust_loss: true, ..PLAIN },
    Config { name: "metamath/unfused", unfused: true, ..PLAIN },
    Config { name: "metamath/prefix-sharing", prefix_sharing: true, ..PLAIN },
    Config { name: "metamath/precomputed-ref", precomputed_ref: true, ..PLAIN },
    Config { name: "metamath/prefix+precomputed", prefix_sharing: true, precomputed_ref: true, ..PLAIN },
    Config { name: "long-prompt/script-loss", data: "long_prompt", ..PLAIN },
    Config { name: "long-prompt/prefix-sharing", data: "long_prompt", prefix_sharing: true, ..PLAIN },
    Config { name: "long-prompt/unfused", data: "long_prompt", unfused: true, ..PLAIN },
    Config { name: "vocab-32k/full-logits", model: "model_large_vocab", ..PLAIN },
    Config { name: "vocab-32k/chunked-logits", model: "model_large_vocab", logits_chunk: Some(128), ..PLAIN },
    Config { name: "vocab-32k/unfused", model: "model_large_vocab", unfused: true, ..PLAIN },
    // Memory of LoRA against full fine-tuning with its resident reference copy.
    Config { name: "memory/full+resident-ref", ..PLAIN },
    Config { name: "memory/lora-r16", lora: true, ..PLAIN },
    Config { name: "memory-32k/full+resident-ref", model: "model_large_vocab", logits_chunk: Some(128), ..PLAIN },
    Config { name: "memory-32k/lora-r16", model: "model_large_vocab", logits_chunk: Some(128), lora: true, ..PLAIN },
];

/// The large-vocabulary variant: where full-vocabulary logits dominate memory.
const LARGE_VOCAB: usize = 32768;

/// `--size smollm-135m`: full fine-tuning and LoRA, with and without gradient
/// checkpointing, on 512-token sequences, and full fine-tuning on 1024-token ones.
/// "prefix-sharing" is full fine-tuning with each pair's prompt computed once
/// (`prefix_sharing: true`): the same log-probs from less work, which PyTorch's peer
/// (transformers and TRL have no such option) does not do.
const REAL: Config = Config { data: "seq512", ..PLAIN };
const REAL_SIZE_CONFIGS: [Config; 7] = [
    Config { name: "135m-512/full", ..REAL },
    Config { name: "135m-512/prefix-sharing", prefix_sharing: true, ..REAL },
    Config { name: "135m-512/full+gc", gradient_checkpointing: true, ..REAL },
    Config { name: "135m-512/lora-r16", lora: true, ..REAL },
    Config { name: "135m-512/lora-r16+gc", lora: true, gradient_checkpointing: true, ..REAL },
    Config { name: "135m-1024/full", data: "seq1024", ..REAL },
    Config { name: "135m-1024/full+gc", data: "seq1024", gradient_checkpointing: true, ..REAL },
];

/// `--size qwen2-0.5b`: full fine-tuning and LoRA, with and without gradient
/// checkpointing, on 512-token sequences.
const QWEN2_CONFIGS: [Config; 4] = [
    Config { name: "0.5b-512/full", ..REAL },
    Config { name: "0.5b-512/full+gc", gradient_checkpointing: true, ..REAL },
    Config { name: "0.5b-512/lora-r16", lora: true, ..REAL },
    Config { name: "0.5b-512/lora-r16+gc", lora: true, gradient_checkpointing: true, ..REAL },
];

/// The PyTorch rows beside the real-size configurations: (row, data, gradient
/// checkpointing, LoRA).
const QWEN2_TORCH: [(&str, &str, bool, bool); 4] = [
    ("0.5b-512/pytorch-eager", "seq512", false, false),
    ("0.5b-512/pytorch-eager+gc", "seq512", true, false),
    ("0.5b-512/pytorch-lora-r16", "seq512", false, true),
    ("0.5b-512/pytorch-lora-r16+gc", "seq512", true, true),
];
const REAL_SIZE_TORCH: [(&str, &str, bool, bool); 6] = [
    ("135m-512/pytorch-eager", "seq512", false, false),
    ("135m-512/pytorch-eager+gc", "seq512", true, false),
    ("135m-512/pytorch-lora-r16", "seq512", false, true),
    ("135m-512/pytorch-lora-r16+gc", "seq512", true, true),
    ("135m-1024/pytorch-eager", "seq1024", false, false),
    ("135m-1024/pytorch-eager+gc", "seq1024", true, false),
];

/// Tokens per sequence (prompt and completion) of the real-size data sets.
const REAL_SIZE_LENGTHS: [(&str, usize); 2] = [("seq512", 512), ("seq1024", 1024)];

pub struct BenchOptions {
    pub out: PathBuf,
    pub size: ModelSize,
    pub steps: usize,
    pub warmup: usize,
    pub rounds: usize,
    pub batch_size: usize,
    /// Python with torch for the PyTorch rows; when given, any failure there is an error.
    pub python: Option<String>,
    /// Leave the PyTorch rows out even when a Python with torch is found.
    pub no_pytorch: bool,
    /// Run only the configurations whose name starts with one of these comma-separated
    /// prefixes.
    pub only: Option<String>,
}

/// How far PyTorch's first-step log-probs (summed per sequence) may be from prefhost's:
/// relative 1e-5, at least 1e-4 (f32 on both sides; 3e-5 is typical at ~100 tokens).
const LOGPS_RELATIVE_TOLERANCE: f64 = 1e-5;
const LOGPS_ABSOLUTE_TOLERANCE: f64 = 1e-4;

/// One PyTorch row: bench/torch_dpo_step.py on a data set's batch, with its options.
struct TorchRow {
    name: String,
    data: &'static str,
    compile: bool,
    gradient_checkpointing: bool,
    lora: bool,
}

/// The PyTorch rows of a bench: eager and torch.compile on both data sets, or at real size
/// eager with and without LoRA and gradient checkpointing.
fn torch_rows(size: ModelSize) -> Vec<TorchRow> {
    let real_size: &[(&str, &str, bool, bool)] = match size {
        ModelSize::Smollm135m => &REAL_SIZE_TORCH,
        ModelSize::Qwen2_0_5b => &QWEN2_TORCH,
        ModelSize::M10 | ModelSize::Tiny => &[],
    };
    if !real_size.is_empty() {
        return real_size
            .iter()
            .map(|&(name, data, gradient_checkpointing, lora)| TorchRow {
                name: name.to_string(),
                data,
                compile: false,
                gradient_checkpointing,
                lora,
            })
            .collect();
    }
    let mut rows = Vec::new();
    for data in ["metamath", "long_prompt"] {
        for (peer, compile) in [("pytorch-eager", false), ("pytorch-compile", true)] {
            rows.push(TorchRow {
                name: format!("{}/{peer}", data.replace('_', "-")),
                data,
                compile,
                gradient_checkpointing: false,
                lora: false,
            });
        }
    }
    rows
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ModelSize {
    /// ~10M parameters (the issue's yardstick for script overhead).
    M10,
    /// ~0.2M parameters, for a quick check that the bench runs.
    Tiny,
    /// SmolLM2-135M's shape (30 layers, hidden 576, 9 query / 3 KV heads, 49,152-token
    /// vocabulary, tied embeddings), random init: full fine-tuning and LoRA r=16, gradient
    /// checkpointing on and off, 512- and 1024-token sequences (batch 2 pairs recommended).
    #[value(name = "smollm-135m")]
    Smollm135m,
    /// Qwen2-0.5B's shape (24 layers, hidden 896, 14 query / 2 KV heads with q/k/v biases,
    /// 151,936-token vocabulary, tied embeddings), random init: full fine-tuning and LoRA
    /// r=16, gradient checkpointing on and off, 512-token sequences (about 13 GB at full
    /// fine-tuning).
    #[value(name = "qwen2-0.5b")]
    Qwen2_0_5b,
}

/// What a child (or the PyTorch script) reports.
#[derive(Serialize, Deserialize, Clone)]
pub struct Timing {
    pub name: String,
    pub step_seconds: Vec<f64>,
    /// The median step of each round, in round order (min–max shows the spread between rounds).
    #[serde(default)]
    pub round_medians: Vec<f64>,
    /// Time inside the loss call of each step (prefhost configurations only).
    #[serde(default)]
    pub loss_call_seconds: Vec<f64>,
    pub tokens_per_step: usize,
    pub peak_rss_mb: f64,
    /// PyTorch only: resident memory with torch imported and both models loaded, before
    /// the first step (the runtime's share of its peak).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline_rss_mb: Option<f64>,
    pub params: usize,
    /// PyTorch only: largest |log p| difference from prefhost's on the first step
    /// (same weights, same batch): the check that both compute the same thing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logps_max_diff_vs_prefhost: Option<f64>,
}

impl Timing {
    fn median(&self) -> f64 {
        median(&self.step_seconds)
    }
}

impl ModelSize {
    /// The model shape; the small ones take the bench tokenizer's vocabulary (`vocab`).
    fn preset(self, vocab: usize) -> ModelPreset {
        match self {
            ModelSize::M10 => super::M10.with_vocab(vocab),
            ModelSize::Tiny => super::TINY.with_vocab(vocab),
            ModelSize::Smollm135m => super::SMOLLM_135M,
            ModelSize::Qwen2_0_5b => super::QWEN2_0_5B,
        }
    }

    /// Random-init real-size shapes, on long sequences and beside PyTorch's eager step.
    fn is_real_size(self) -> bool {
        matches!(self, ModelSize::Smollm135m | ModelSize::Qwen2_0_5b)
    }
}

const LIMITS: Truncation = Truncation { max_length: 1024, max_prompt_length: 896 };

/// The real-size data sets' prompts are longer than their sequences and cut from the left
/// (as TRL does) to the length less 32 tokens, the room the completions take.
fn limits(data: &str) -> Truncation {
    match REAL_SIZE_LENGTHS.iter().find(|(name, _)| *name == data) {
        Some(&(_, length)) => Truncation { max_length: length, max_prompt_length: length - 32 },
        None => LIMITS,
    }
}

fn configs(size: ModelSize) -> &'static [Config] {
    match size {
        ModelSize::Smollm135m => &REAL_SIZE_CONFIGS,
        ModelSize::Qwen2_0_5b => &QWEN2_CONFIGS,
        ModelSize::M10 | ModelSize::Tiny => &CONFIGS,
    }
}

/// Whether `--only` (comma-separated name prefixes; none: every row) selects the row `name`.
fn selected(only: Option<&str>, name: &str) -> bool {
    only.is_none_or(|only| only.split(',').any(|prefix| name.starts_with(prefix.trim())))
}

/// The parent: model, data, reference file, then every configuration in each round.
pub fn run_bench(opts: &BenchOptions) -> Result<Vec<Timing>> {
    let root = std::env::current_dir()?;
    let tokenizer_json = root.join("models/tiny-math/tokenizer.json");
    let pairs = root.join("data/arithmetic/pairs.jsonl");
    let sft = root.join("data/arithmetic/sft.jsonl");
    for needed in [&tokenizer_json, &pairs, &sft] {
        if !needed.is_file() {
            bail!("{}: missing; run host bench from the repository root", needed.display());
        }
    }
    if opts.out.exists() {
        bail!("{}: already exists; choose another --out", opts.out.display());
    }
    std::fs::create_dir_all(&opts.out)?;
    let device = crate::backend::backend_device("cpu")?;
    device.seed(1);

    let tokenizer = TextTokenizer::load(&tokenizer_json, Some(1), Some(2))?;
    let config = opts.size.preset(tokenizer.vocab_size()).config();
    let model = Llama::build(&config, &mut RandomInit { std: 0.02 }, &device)?;
    let model_dir = opts.out.join("model");
    save_model(&model, &config, &tokenizer_json, &model_dir)?;
    drop(model);
    let real_size = opts.size.is_real_size();
    let data_sets: Vec<&str> = if real_size {
        // The data sets this size's configurations read.
        let used = |name: &str| configs(opts.size).iter().any(|c| c.data == name);
        for (name, length) in REAL_SIZE_LENGTHS.into_iter().filter(|(name, _)| used(name)) {
            write_long_data(
                &tokenizer,
                &pairs,
                &sft,
                &opts.out.join(format!("{name}.jsonl")),
                length,
                opts.batch_size,
            )?;
        }
        REAL_SIZE_LENGTHS.iter().map(|(name, _)| *name).filter(|name| used(name)).collect()
    } else {
        let large = opts.size.preset(LARGE_VOCAB).config();
        save_model(
            &Llama::build(&large, &mut RandomInit { std: 0.02 }, &device)?,
            &large,
            &tokenizer_json,
            &opts.out.join("model_large_vocab"),
        )?;
        write_data(&pairs, &sft, &opts.out, opts.batch_size)?;
        vec!["metamath", "long_prompt"]
    };
    for data in &data_sets {
        let file = opts.out.join(format!("{data}.jsonl"));
        let out = opts.out.join(format!("{data}.ref.jsonl"));
        reference::precompute(&reference::LogpsJob {
            model_dir: &model_dir,
            data: &file,
            out: &out,
            batch_size: opts.batch_size,
            limits: limits(data),
            prompt_special_tokens: true,
            chat_template: None,
            backend: "cpu",
            shard: None,
        })?;
        let (examples, _) = load_examples(&file, &tokenizer, true, limits(data), false)?;
        write_torch_batch(&examples, tokenizer.pad_id, &opts.out.join(format!("{data}.batch.json")))?;
    }

    let exe = std::env::current_exe()?;
    let python = if opts.no_pytorch { None } else { opts.python.clone().or_else(find_python_with_torch) };
    let mut results: Vec<Timing> = Vec::new();
    for round in 0..opts.rounds {
        for config in configs(opts.size).iter().filter(|c| selected(opts.only.as_deref(), c.name)) {
            eprintln!("round {}/{}: {}", round + 1, opts.rounds, config.name);
            let status = Command::new(&exe)
                .args(["bench", "--child", config.name, "--out"])
                .arg(&opts.out)
                .args([
                    "--steps",
                    &opts.steps.to_string(),
                    "--warmup",
                    &opts.warmup.to_string(),
                    "--round",
                    &round.to_string(),
                ])
                .env("PREFHOST_UNFUSED", if config.unfused { "1" } else { "0" })
                .stdout(std::process::Stdio::null())
                .status()?;
            if !status.success() {
                bail!("bench configuration {} failed ({status})", config.name);
            }
            let file = result_file(&opts.out, config.name, round);
            merge(&mut results, serde_json::from_str(&std::fs::read_to_string(&file)?)?);
        }
        if let Some(python) = python.as_ref() {
            for row in torch_rows(opts.size) {
                if !selected(opts.only.as_deref(), &row.name) {
                    continue;
                }
                eprintln!("round {}/{}: {}", round + 1, opts.rounds, row.name);
                let timing = run_torch(python, &model_dir, &opts.out, opts, &row).with_context(|| {
                    format!("PyTorch row {} (leave the PyTorch rows out with --no-pytorch)", row.name)
                })?;
                merge(&mut results, timing);
            }
        }
    }
    if python.is_none() && !opts.no_pytorch {
        eprintln!("no Python with torch found (set --python); the PyTorch rows were not run");
    }
    let report = render(&results, opts);
    std::fs::write(opts.out.join("bench.json"), serde_json::to_string_pretty(&json!({"results": results}))?)?;
    std::fs::write(opts.out.join("bench.md"), &report)?;
    println!("{report}");
    Ok(results)
}

fn merge(results: &mut Vec<Timing>, t: Timing) {
    match results.iter_mut().find(|r| r.name == t.name) {
        Some(r) => {
            r.step_seconds.extend(t.step_seconds);
            r.round_medians.extend(t.round_medians);
            r.loss_call_seconds.extend(t.loss_call_seconds);
            r.peak_rss_mb = r.peak_rss_mb.max(t.peak_rss_mb);
        }
        None => results.push(t),
    }
}

fn result_file(out: &Path, name: &str, round: usize) -> PathBuf {
    out.join(format!("{}.round{round}.json", name.replace('/', "_")))
}

/// One batch of MetaMath-style pairs (the shipped ones), and the same pairs behind a long
/// few-shot prompt (worked examples), the case prompt sharing is for.
fn write_data(pairs: &Path, sft: &Path, out: &Path, batch: usize) -> Result<()> {
    let rows: Vec<serde_json::Value> =
        std::fs::read_to_string(pairs)?.lines().take(batch).map(serde_json::from_str).collect::<Result<_, _>>()?;
    let shots: Vec<serde_json::Value> =
        std::fs::read_to_string(sft)?.lines().take(3).map(serde_json::from_str).collect::<Result<_, _>>()?;
    let few_shot: String = shots
        .iter()
        .map(|s| format!("{}{}\n\n", s["prompt"].as_str().unwrap_or(""), s["completion"].as_str().unwrap_or("")))
        .collect();
    let mut short = String::new();
    let mut long = String::new();
    for row in &rows {
        short.push_str(&format!("{row}\n"));
        let mut with_shots = row.clone();
        with_shots["prompt"] = json!(format!("{few_shot}{}", row["prompt"].as_str().unwrap_or("")));
        long.push_str(&format!("{with_shots}\n"));
    }
    std::fs::write(out.join("metamath.jsonl"), short)?;
    std::fs::write(out.join("long_prompt.jsonl"), long)?;
    Ok(())
}

/// `batch` pairs behind a few-shot prompt of worked examples longer than `length` tokens
/// (`limits` cuts it to fit).
fn write_long_data(
    tokenizer: &TextTokenizer,
    pairs: &Path,
    sft: &Path,
    out: &Path,
    length: usize,
    batch: usize,
) -> Result<()> {
    let rows: Vec<serde_json::Value> =
        std::fs::read_to_string(pairs)?.lines().take(batch).map(serde_json::from_str).collect::<Result<_, _>>()?;
    let shots: Vec<String> = std::fs::read_to_string(sft)?
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).map(|s| {
                format!("{}{}\n\n", s["prompt"].as_str().unwrap_or(""), s["completion"].as_str().unwrap_or(""))
            })
        })
        .collect::<Result<_, _>>()?;
    let mut text = String::new();
    for row in &rows {
        let mut prompt = row["prompt"].as_str().unwrap_or("").to_string();
        for shot in shots.iter().cycle().take(10_000) {
            if tokenizer.encode_prompt(&prompt)?.len() > length {
                break;
            }
            prompt = format!("{shot}{prompt}");
        }
        let mut with_shots = row.clone();
        with_shots["prompt"] = json!(prompt);
        text.push_str(&format!("{with_shots}\n"));
    }
    std::fs::write(out, text)?;
    Ok(())
}

/// The child: trains `warmup + steps` steps of one configuration through the real
/// trainer (script host, reload checks, metrics) and writes its timings.
pub fn run_child(name: &str, out: &Path, steps: usize, warmup: usize, round: usize) -> Result<()> {
    let config = CONFIGS
        .iter()
        .chain(&REAL_SIZE_CONFIGS)
        .chain(&QWEN2_CONFIGS)
        .find(|c| c.name == name)
        .with_context(|| format!("no bench configuration {name}"))?;
    let data = out.join(format!("{}.jsonl", config.data));
    let limits = limits(config.data);
    let chunk = config.logits_chunk.map_or(String::new(), |n| format!(" logits_chunk_size: {n},"));
    let ref_logps = if config.precomputed_ref {
        format!("ref_logps: \"{}\",", out.join(format!("{}.ref.jsonl", config.data)).display())
    } else {
        String::new()
    };
    let lora = if config.lora { "lora: #{ r: 16, lora_alpha: 32, target_modules: \"all-linear\" }," } else { "" };
    let batch = std::fs::read_to_string(&data)?.lines().count();
    let fields = format!(
        "model: \"{}\", data: \"{}\", batch_size: {batch},\n  max_length: {}, max_prompt_length: {}, lr: 1e-4, max_grad_norm: 1.0,\n  log_every: 1000, progress: false, seed: 1, prefix_sharing: {}, gradient_checkpointing: {}, {ref_logps}{chunk}{lora}",
        out.join(config.model).display(),
        data.display(),
        limits.max_length,
        limits.max_prompt_length,
        config.prefix_sharing,
        config.gradient_checkpointing
    );
    let script_path = out.join(format!("{}.rhai", name.replace('/', "_")));
    let run_dir = out.join("runs").join(format!("{}-round{round}", name.replace('/', "_")));
    let summary = train_dpo(&fields, &script_path, &run_dir, warmup + steps, config.rust_loss)?;
    // The run's metrics stay; its checkpoints (weights and AdamW state, ~100 MB each on the
    // 34.6M model) would fill the disk over a full bench.
    for entry in std::fs::read_dir(&run_dir)? {
        let path = entry?.path();
        if path.file_name().is_some_and(|n| n.to_string_lossy().starts_with("checkpoint-")) {
            std::fs::remove_dir_all(&path)?;
        }
    }
    let (examples, _) = load_examples(
        &data,
        &TextTokenizer::load(&out.join("model/tokenizer.json"), Some(1), Some(2))?,
        true,
        limits,
        false,
    )?;
    let step_seconds = summary.step_seconds[warmup.min(summary.step_seconds.len())..].to_vec();
    let timing = Timing {
        name: name.to_string(),
        round_medians: vec![median(&step_seconds)],
        step_seconds,
        loss_call_seconds: summary.loss_call_seconds[warmup.min(summary.loss_call_seconds.len())..].to_vec(),
        tokens_per_step: pair_tokens(&examples),
        peak_rss_mb: peak_rss_mb(),
        baseline_rss_mb: None,
        params: crate::model::load_model(&out.join(config.model), &crate::backend::backend_device("cpu")?)?
            .1
            .num_params(),
        logps_max_diff_vs_prefhost: None,
    };
    std::fs::write(result_file(out, name, round), serde_json::to_string(&timing)?)?;
    Ok(())
}

/// Peak resident memory of this process (VmHWM), in MB.
fn peak_rss_mb() -> f64 {
    crate::train::memory::peak_rss_bytes().map_or(f64::NAN, |bytes| bytes / 1048576.0)
}

/// One round of a PyTorch peer; its first-step log-probs must be prefhost's (`reference`:
/// the `host logps` file of the same rows under the same starting weights).
fn run_torch(python: &str, model: &Path, out: &Path, opts: &BenchOptions, row: &TorchRow) -> Result<Timing> {
    let (batch, reference, name) =
        (out.join(format!("{}.batch.json", row.data)), out.join(format!("{}.ref.jsonl", row.data)), &row.name);
    let script = std::env::current_dir()?.join("bench/torch_dpo_step.py");
    let mut command = Command::new(python);
    command
        .arg(&script)
        .arg("--model")
        .arg(model)
        .arg("--batch")
        .arg(&batch)
        .args(["--steps", &opts.steps.to_string(), "--warmup", &opts.warmup.max(1).to_string()])
        // The same work as prefhost: logits only from the first completion column on.
        .arg("--logits-to-keep")
        // The allocator settings prefhost gives itself (src/allocator.rs).
        .env("GLIBC_TUNABLES", crate::allocator::glibc_tunables());
    if row.compile {
        command.arg("--compile");
    }
    if row.gradient_checkpointing {
        command.arg("--gradient-checkpointing");
    }
    if row.lora {
        command.args(["--lora-r", "16", "--lora-alpha", "32"]);
    }
    let out = command.output().with_context(|| format!("running {python} {}", script.display()))?;
    if !out.status.success() {
        bail!("{}: {}", script.display(), String::from_utf8_lossy(&out.stderr));
    }
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).with_context(|| format!("{}: output is not JSON", script.display()))?;
    // prefhost's log-probs of the same rows under the same (starting) weights.
    let ours: Vec<f64> = std::fs::read_to_string(&reference)?
        .lines()
        .map(|l| serde_json::from_str::<reference::RefRow>(l).map(|r| [r.chosen_logps as f64, r.rejected_logps as f64]))
        .collect::<Result<Vec<_>, _>>()?
        .concat();
    let theirs: Vec<f64> = ["chosen_logps", "rejected_logps"]
        .iter()
        .flat_map(|k| v["first_step"][*k].as_array().cloned().unwrap_or_default())
        .filter_map(|x| x.as_f64())
        .collect();
    if theirs.len() != ours.len() {
        bail!("{}: first-step log-probs of {} sequences, prefhost has {}", script.display(), theirs.len(), ours.len());
    }
    let b = theirs.len() / 2;
    let ours_ordered: Vec<f64> = (0..b).map(|i| ours[2 * i]).chain((0..b).map(|i| ours[2 * i + 1])).collect();
    for (i, (a, t)) in ours_ordered.iter().zip(&theirs).enumerate() {
        if (a - t).abs() > LOGPS_RELATIVE_TOLERANCE * a.abs() + LOGPS_ABSOLUTE_TOLERANCE {
            let which =
                if i < b { format!("chosen of pair {}", i + 1) } else { format!("rejected of pair {}", i - b + 1) };
            bail!(
                "{}: first-step log-prob of the {which} is {t}, prefhost's {a}: not the same computation",
                script.display()
            );
        }
    }
    let logps_diff = ours_ordered.iter().zip(&theirs).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
    let seconds: Vec<f64> =
        v["step_seconds"].as_array().map(|a| a.iter().filter_map(|x| x.as_f64()).collect()).unwrap_or_default();
    if seconds.len() != opts.steps {
        bail!("{}: {} timed steps reported, {} asked for", script.display(), seconds.len(), opts.steps);
    }
    Ok(Timing {
        name: format!("{name} (torch {}, {} threads)", v["torch"].as_str().unwrap_or("?"), v["threads"]),
        round_medians: vec![median(&seconds)],
        step_seconds: seconds,
        loss_call_seconds: Vec::new(),
        tokens_per_step: v["tokens_per_step"].as_u64().unwrap_or(0) as usize,
        peak_rss_mb: v["peak_rss_mb"].as_f64().unwrap_or(f64::NAN),
        baseline_rss_mb: v["baseline_rss_mb"].as_f64(),
        params: v["params"].as_u64().unwrap_or(0) as usize,
        logps_max_diff_vs_prefhost: Some(logps_diff),
    })
}

/// The smallest and largest value.
fn min_max(values: &[f64]) -> (f64, f64) {
    values.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| (lo.min(v), hi.max(v)))
}

/// The table and the ratios: medians of all timed steps, and for each ratio the median of
/// the per-round ratios with their min–max (rounds are interleaved, so each round's pair of
/// medians was measured under the same conditions).
fn render(results: &[Timing], opts: &BenchOptions) -> String {
    let by_prefix = |name: &str| results.iter().find(|r| r.name.starts_with(name));
    let mut out = format!(
        "host bench: batch {} pairs, {} timed steps x {} interleaved rounds per configuration (after {} warm-up), {} CPU threads\n\n",
        opts.batch_size,
        opts.steps,
        opts.rounds,
        opts.warmup,
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    out.push_str("| configuration | params | median step (ms) | round medians, min–max (ms) | tokens/s | peak RSS (MB) | RSS before step 1 (MB) |\n|---|---|---|---|---|---|---|\n");
    for r in results {
        let (m, (lo, hi)) = (r.median(), min_max(&r.round_medians));
        let baseline = r.baseline_rss_mb.map_or("–".to_string(), |b| format!("{b:.0}"));
        out.push_str(&format!(
            "| {} | {:.2}M | {:.1} | {:.1}–{:.1} | {:.0} | {:.0} | {baseline} |\n",
            r.name,
            r.params as f64 / 1e6,
            m * 1e3,
            lo * 1e3,
            hi * 1e3,
            r.tokens_per_step as f64 / m,
            r.peak_rss_mb
        ));
    }
    out.push_str("\nRatios (median of the per-round ratios, min–max over rounds):\n");
    let ratio = |label: &str, a: &str, b: &str, out: &mut String| {
        if let (Some(x), Some(y)) = (by_prefix(a), by_prefix(b)) {
            let per_round: Vec<f64> = x.round_medians.iter().zip(&y.round_medians).map(|(x, y)| x / y).collect();
            let (lo, hi) = min_max(&per_round);
            out.push_str(&format!("- {label}: {:.3}x ({lo:.3}–{hi:.3}x)\n", median(&per_round)));
        }
    };
    let find = |name: &str| results.iter().find(|r| r.name == name);
    let rss = |name: &str| find(name).map(|r| r.peak_rss_mb);
    if let (Some(script), Some(rust)) = (find("metamath/script-loss"), find("metamath/rust-loss")) {
        let (in_script, in_rust) = (median(&script.loss_call_seconds), median(&rust.loss_call_seconds));
        out.push_str(&format!(
            "- script overhead: the Rhai loss call takes {:.3} ms, the same loss in Rust {:.3} ms: {:.3}% of the {:.0} ms step (whole steps: {:+.2}%, run-to-run noise)\n",
            in_script * 1e3, in_rust * 1e3, (in_script - in_rust) / script.median() * 100.0, script.median() * 1e3,
            (script.median() - rust.median()) / script.median() * 100.0
        ));
    }
    for (what, group) in [
        ("MetaMath-style", "metamath/script-loss"),
        ("long prompt", "long-prompt/script-loss"),
        ("32k vocabulary", "vocab-32k/full-logits"),
    ] {
        let unfused = format!("{}/unfused", group.split('/').next().unwrap_or(""));
        ratio(&format!("fused ops vs burn's op-by-op autodiff speed-up, {what}"), &unfused, group, &mut out);
        if let (Some(u), Some(f)) = (rss(&unfused), rss(group)) {
            out.push_str(&format!("- fused ops vs op-by-op peak RSS, {what}: {:.3}x\n", f / u));
        }
    }
    ratio("prefix sharing speed-up, MetaMath-style pairs", "metamath/script-loss", "metamath/prefix-sharing", &mut out);
    ratio(
        "prefix sharing speed-up, long-prompt pairs",
        "long-prompt/script-loss",
        "long-prompt/prefix-sharing",
        &mut out,
    );
    ratio("precomputed vs resident reference speed-up", "metamath/script-loss", "metamath/precomputed-ref", &mut out);
    ratio(
        "prefix sharing + precomputed reference speed-up",
        "metamath/script-loss",
        "metamath/prefix+precomputed",
        &mut out,
    );
    ratio(
        "chunked vs full logits speed-up, 32k vocabulary",
        "vocab-32k/full-logits",
        "vocab-32k/chunked-logits",
        &mut out,
    );
    if let (Some(full), Some(chunked)) = (rss("vocab-32k/full-logits"), rss("vocab-32k/chunked-logits")) {
        out.push_str(&format!(
            "- chunked vs full logits peak RSS, 32k vocabulary: {:.3}x ({:.0} MB less)\n",
            chunked / full,
            full - chunked
        ));
    }
    for (what, full, lora) in [
        ("", "memory/full+resident-ref", "memory/lora-r16"),
        (", 32k vocabulary, chunked logits", "memory-32k/full+resident-ref", "memory-32k/lora-r16"),
    ] {
        if let (Some(f), Some(l)) = (rss(full), rss(lora)) {
            out.push_str(&format!("- LoRA (r=16, all projections) vs full fine-tuning with a resident reference copy, peak RSS{what}: {:.3}x ({:.0} MB less)\n", l / f, f - l));
        }
        ratio(&format!("LoRA vs full fine-tuning speed-up{what}"), full, lora, &mut out);
    }
    for r in results.iter().filter_map(|r| r.logps_max_diff_vs_prefhost.map(|d| (&r.name, d))) {
        out.push_str(&format!("- {}: first-step log-probs differ from prefhost's by at most {:.2e}\n", r.0, r.1));
    }
    for group in ["135m-512", "135m-1024", "0.5b-512"] {
        for (ours, theirs) in [
            ("full", "pytorch-eager"),
            ("full+gc", "pytorch-eager+gc"),
            ("lora-r16", "pytorch-lora-r16"),
            ("lora-r16+gc", "pytorch-lora-r16+gc"),
            ("prefix-sharing", "pytorch-eager"),
        ] {
            let (ours, theirs) = (format!("{group}/{ours}"), format!("{group}/{theirs}"));
            ratio(
                &format!("{ours} vs {theirs} speed (PyTorch time / prefhost time)"),
                &format!("{theirs} "),
                &ours,
                &mut out,
            );
            if let (Some(t), Some(o)) = (by_prefix(&format!("{theirs} ")), find(&ours)) {
                out.push_str(&format!(
                    "- {ours} vs {theirs} peak RSS: {:.3}x ({:.0} vs {:.0} MB)\n",
                    o.peak_rss_mb / t.peak_rss_mb,
                    o.peak_rss_mb,
                    t.peak_rss_mb
                ));
            }
        }
        for who in ["full", "lora-r16", "pytorch-eager", "pytorch-lora-r16"] {
            let (plain, checkpointed) = (format!("{group}/{who} "), format!("{group}/{who}+gc "));
            let pick = |n: &str| results.iter().find(|r| format!("{} ", r.name).starts_with(n));
            if let (Some(p), Some(c)) = (pick(&plain), pick(&checkpointed)) {
                let per_round: Vec<f64> = p.round_medians.iter().zip(&c.round_medians).map(|(p, c)| c / p).collect();
                out.push_str(&format!(
                    "- gradient checkpointing, {}: peak RSS {:.3}x ({:.0} -> {:.0} MB), step time {:.3}x\n",
                    plain.trim(),
                    c.peak_rss_mb / p.peak_rss_mb,
                    p.peak_rss_mb,
                    c.peak_rss_mb,
                    median(&per_round)
                ));
            }
        }
    }
    for (what, group) in [("MetaMath-style", "metamath"), ("long prompt", "long-prompt")] {
        for peer in ["eager", "compile"] {
            let label = format!("prefhost vs PyTorch {peer}, {what} (PyTorch time / prefhost time)");
            ratio(&label, &format!("{group}/pytorch-{peer}"), &format!("{group}/script-loss"), &mut out);
            if let (Some(torch), Some(ours)) =
                (by_prefix(&format!("{group}/pytorch-{peer}")), by_prefix(&format!("{group}/script-loss")))
            {
                out.push_str(&format!(
                    "- prefhost vs PyTorch {peer} peak RSS, {what}: {:.3}x ({:.0} vs {:.0} MB; PyTorch holds {:.0} MB before its first step)\n",
                    ours.peak_rss_mb / torch.peak_rss_mb, ours.peak_rss_mb, torch.peak_rss_mb, torch.baseline_rss_mb.unwrap_or(f64::NAN)
                ));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::selected;

    #[test]
    fn only_selects_rows_by_any_of_its_comma_separated_prefixes() {
        let only = Some("135m-512/full, 135m-512/pytorch-eager");
        for name in ["135m-512/full", "135m-512/full+gc", "135m-512/pytorch-eager", "135m-512/pytorch-eager+gc"] {
            assert!(selected(only, name), "{name}");
        }
        for name in ["135m-512/lora-r16", "135m-512/prefix-sharing", "135m-1024/full", "135m-512/pytorch-lora-r16"] {
            assert!(!selected(only, name), "{name}");
        }
        assert!(selected(None, "135m-512/lora-r16"));
        assert!(selected(Some("metamath"), "metamath/pytorch-eager"));
    }
}
