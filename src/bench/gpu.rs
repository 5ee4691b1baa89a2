//! `host bench-gpu`: a DPO training step on a random-init model of a real size (Qwen2-0.5B
//! or Llama-3.2-1B architecture) and a batch of real sequence lengths, on a GPU backend,
//! beside a PyTorch eager step on the same weights and batch (bench/torch_dpo_step.py
//! --device cuda), in one command. Reports step time, tokens/s, peak GPU memory and MFU.
//!
//! Peak GPU memory is what `nvidia-smi` shows in use on the device while each side runs
//! (sampled every 100 ms, minus what was in use before it started), so both sides are
//! measured the same way, caching allocators and CUDA context included. PyTorch's own
//! `max_memory_allocated` is reported beside it.
//!
//! MFU counts the matrix products of a DPO step with a resident reference: the policy's
//! forward and backward (3 forwards) plus the reference's forward, i.e. per token
//! 4 · (2 · linear params + 4 · layers · seq · attention width) FLOPs (PaLM's convention,
//! attention counted over the whole sequence), against the GPU's dense bf16 peak.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::{ModelPreset, median, pair_tokens, train_dpo, write_torch_batch};
use crate::data::{TextTokenizer, Truncation, load_examples};
use crate::model::{Llama, RandomInit, save_model};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
pub enum Arch {
    /// Qwen2-0.5B: hidden 896, 24 layers, 14 heads (2 KV), vocab 151,936, tied embeddings.
    #[value(name = "qwen2-0.5b")]
    Qwen2_0_5b,
    /// Llama-3.2-1B: hidden 2048, 16 layers, 32 heads (8 KV), vocab 128,256, tied (no RoPE scaling).
    #[value(name = "llama-1b")]
    Llama1b,
    /// A 2-layer model, to check the command end to end on a CPU.
    Tiny,
}

impl Arch {
    fn preset(self) -> ModelPreset {
        match self {
            Arch::Qwen2_0_5b => super::QWEN2_0_5B,
            Arch::Llama1b => super::LLAMA_1B,
            Arch::Tiny => super::QWEN2_TINY,
        }
    }
}

/// What the parent hands its prefhost child, as settings.json in the output folder.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct GpuBenchOptions {
    pub out: PathBuf,
    pub backend: String,
    pub arch: Arch,
    /// Preference pairs per step (each is two sequences).
    pub pairs: usize,
    pub prompt_len: usize,
    pub completion_len: usize,
    pub steps: usize,
    pub warmup: usize,
    /// "bf16" or "no", for both sides (PyTorch: torch.autocast).
    pub mixed_precision: String,
    pub python: Option<String>,
    /// Device for the PyTorch side ("cuda"; "cpu" for a dry run).
    pub torch_device: String,
    /// Dense bf16 peak of the GPU in TFLOPS, when its name is not one we know.
    pub peak_tflops: Option<f64>,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
struct SideResult {
    name: String,
    step_seconds: Vec<f64>,
    tokens_per_step: usize,
    /// nvidia-smi: most memory in use during the run, minus the use before it.
    #[serde(default)]
    peak_gpu_mb: Option<f64>,
    /// PyTorch only: torch.cuda.max_memory_allocated.
    #[serde(default)]
    torch_allocated_mb: Option<f64>,
    /// First-step loss (both start from the same weights and batch).
    first_loss: Option<f64>,
}

/// The parent: model, batch, then prefhost (a child process) and PyTorch, each watched by nvidia-smi.
pub fn run(opts: &GpuBenchOptions) -> Result<String> {
    let root = std::env::current_dir()?;
    let tokenizer_json = root.join("models/tiny-math/tokenizer.json");
    let sft = root.join("data/arithmetic/sft.jsonl");
    for needed in [&tokenizer_json, &sft, &root.join("bench/torch_dpo_step.py")] {
        if !needed.is_file() {
            bail!("{}: missing; run host bench-gpu from the repository root", needed.display());
        }
    }
    crate::model::MixedPrecision::parse(&opts.mixed_precision)?;
    crate::backend::backend_device(&opts.backend)?;
    if opts.out.exists() {
        bail!("{}: already exists; choose another --out", opts.out.display());
    }
    std::fs::create_dir_all(&opts.out)?;
    std::fs::write(opts.out.join("settings.json"), serde_json::to_string_pretty(opts)?)?;

    eprintln!("writing a random-init {:?} model and the batch to {}", opts.arch, opts.out.display());
    let config = opts.arch.preset().config();
    let cpu = crate::backend::backend_device("cpu")?;
    cpu.seed(1);
    let model = Llama::build(&config, &mut RandomInit { std: 0.02 }, &cpu)?;
    let linear_params = linear_params(&model);
    save_model(&model, &config, &tokenizer_json, &opts.out.join("model"))?;
    drop(model);
    write_pairs(&sft, &opts.out.join("pairs.jsonl"), opts)?;
    let tokenizer = TextTokenizer::load(&tokenizer_json, Some(1), Some(2))?;
    let (examples, _) = load_examples(&opts.out.join("pairs.jsonl"), &tokenizer, true, limits(opts), false)?;
    write_torch_batch(&examples, tokenizer.pad_id, &opts.out.join("batch.json"))?;
    let seq = examples.iter().map(|e| e.prompt.len() + e.chosen.len().max(e.rejected.len())).max().unwrap_or(0);

    let mut results = Vec::new();
    let exe = std::env::current_exe()?;
    eprintln!("prefhost: backend {}, mixed_precision {}", opts.backend, opts.mixed_precision);
    let child = Command::new(&exe)
        .args(["bench-gpu", "--child", "--out"])
        .arg(&opts.out)
        .stdout(std::process::Stdio::null())
        .spawn()?;
    let peak = watch_gpu_memory(child, "prefhost")?;
    let mut prefhost: SideResult = serde_json::from_str(
        &std::fs::read_to_string(opts.out.join("prefhost.json")).context("the prefhost child wrote no result")?,
    )?;
    prefhost.peak_gpu_mb = peak;
    results.push(prefhost);

    let python = opts.python.clone().unwrap_or_else(|| "python3".into());
    eprintln!("PyTorch eager ({python}, device {})", opts.torch_device);
    let mut cmd = Command::new(&python);
    cmd.arg(root.join("bench/torch_dpo_step.py"))
        .args([
            "--model",
            &opts.out.join("model").display().to_string(),
            "--batch",
            &opts.out.join("batch.json").display().to_string(),
        ])
        .args([
            "--steps",
            &opts.steps.to_string(),
            "--warmup",
            &opts.warmup.to_string(),
            "--device",
            &opts.torch_device,
        ])
        .stdout(std::fs::File::create(opts.out.join("pytorch.json"))?);
    if opts.mixed_precision == "bf16" {
        cmd.arg("--bf16");
    }
    let torch_run =
        cmd.spawn().with_context(|| format!("running {python}")).and_then(|child| watch_gpu_memory(child, "PyTorch"));
    match torch_run {
        Ok(peak) => {
            let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(opts.out.join("pytorch.json"))?)?;
            results.push(SideResult {
                name: format!(
                    "PyTorch {} eager{}",
                    v["torch"].as_str().unwrap_or("?"),
                    if opts.mixed_precision == "bf16" { " + autocast bf16" } else { "" }
                ),
                step_seconds: serde_json::from_value(v["step_seconds"].clone())?,
                tokens_per_step: v["tokens_per_step"].as_u64().unwrap_or(0) as usize,
                peak_gpu_mb: peak,
                torch_allocated_mb: v["peak_gpu_allocated_mb"].as_f64(),
                first_loss: v["first_step"]["loss"].as_f64(),
            });
        }
        Err(e) => eprintln!("PyTorch side skipped: {e:#}"),
    }

    let gpu = gpu_name();
    let peak_flops = opts.peak_tflops.or_else(|| gpu.as_deref().and_then(known_bf16_peak_tflops)).map(|t| t * 1e12);
    let report = render(
        opts,
        &results,
        gpu.as_deref(),
        peak_flops,
        linear_params,
        config.num_hidden_layers,
        config.num_attention_heads * config.head_dim(),
        seq,
    );
    std::fs::write(opts.out.join("bench-gpu.md"), &report)?;
    std::fs::write(
        opts.out.join("bench-gpu.json"),
        serde_json::to_string_pretty(&json!({"results": results, "gpu": gpu, "linear_params": linear_params}))?,
    )?;
    Ok(report)
}

fn limits(opts: &GpuBenchOptions) -> Truncation {
    Truncation { max_length: opts.prompt_len + opts.completion_len, max_prompt_length: opts.prompt_len }
}

/// Pairs whose prompt and completions are longer than the limits, so that truncation
/// gives every pair exactly `prompt_len` and `completion_len` tokens. The rejected
/// completion is the chosen one with its first number changed (Smaug-style).
fn write_pairs(sft: &Path, out: &Path, opts: &GpuBenchOptions) -> Result<()> {
    let rows: Vec<serde_json::Value> =
        std::fs::read_to_string(sft)?.lines().map(serde_json::from_str).collect::<Result<_, _>>()?;
    if rows.is_empty() {
        bail!("{}: no rows", sft.display());
    }
    // The shipped tokenizer makes at least one token of about every 3 characters.
    let text = |start: usize, tokens: usize| -> String {
        let mut s = String::new();
        let mut i = start;
        while s.len() < tokens * 4 {
            let r = &rows[i % rows.len()];
            s.push_str(&format!(
                "{}{}\n\n",
                r["prompt"].as_str().unwrap_or(""),
                r["completion"].as_str().unwrap_or("")
            ));
            i += 1;
        }
        s
    };
    let mut lines = String::new();
    for p in 0..opts.pairs {
        let chosen = text(p * 7 + 3, opts.completion_len);
        let at = chosen.find(|c: char| c.is_ascii_digit()).context("the SFT rows have no digits")?;
        let digit = chosen.as_bytes()[at] - b'0';
        let rejected = format!("{}{}{}", &chosen[..at], (digit + 1) % 10, &chosen[at + 1..]);
        lines.push_str(&format!(
            "{}\n",
            json!({"prompt": text(p * 7, opts.prompt_len), "chosen": chosen, "rejected": rejected})
        ));
    }
    Ok(std::fs::write(out, lines)?)
}

/// Parameters in matrix products: every projection and the vocabulary head.
fn linear_params(model: &Llama) -> usize {
    let projections: usize =
        model.projections().iter().map(|(_, _, p)| p.base.weight.val().shape().num_elements()).sum();
    projections + model.head_weight().shape().num_elements()
}

/// Waits for the child, sampling the device's used memory every 100 ms; returns the most
/// seen minus what was in use before (None without nvidia-smi).
fn watch_gpu_memory(mut child: Child, what: &str) -> Result<Option<f64>> {
    let before = gpu_memory_used_mb();
    let mut most = before;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if let (Some(now), Some(m)) = (gpu_memory_used_mb(), most.as_mut()) {
            *m = m.max(now);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(match (before, most) {
        (Some(b), Some(m)) => Some(m - b),
        _ => None,
    })
}

fn nvidia_smi(query: &str) -> Option<String> {
    let out = Command::new("nvidia-smi")
        .args([&format!("--query-gpu={query}"), "--format=csv,noheader,nounits", "--id=0"])
        .output()
        .ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn gpu_memory_used_mb() -> Option<f64> {
    nvidia_smi("memory.used")?.parse().ok()
}

fn gpu_name() -> Option<String> {
    nvidia_smi("name")
}

/// Dense bf16 tensor-core peaks from NVIDIA's data sheets.
fn known_bf16_peak_tflops(name: &str) -> Option<f64> {
    let n = name.to_ascii_uppercase();
    if n.contains("H200") || (n.contains("H100") && (n.contains("SXM") || n.contains("HBM3"))) {
        Some(989.4)
    } else if n.contains("H100") && n.contains("NVL") {
        Some(835.0)
    } else if n.contains("H100") {
        Some(756.0) // PCIe
    } else if n.contains("A100") {
        Some(312.0)
    } else {
        None
    }
}

#[allow(clippy::too_many_arguments)]
fn render(
    opts: &GpuBenchOptions,
    results: &[SideResult],
    gpu: Option<&str>,
    peak_flops: Option<f64>,
    linear: usize,
    layers: usize,
    attn_width: usize,
    seq: usize,
) -> String {
    let flops_per_token = 4.0 * (2.0 * linear as f64 + 4.0 * layers as f64 * seq as f64 * attn_width as f64);
    let mut out = format!(
        "GPU: {}\nmodel: {:?} random init, {:.1}M parameters in matrix products; batch: {} pairs, prompt {} + completion {} tokens; mixed_precision {}; {} timed steps after {} warm-up\n\n",
        gpu.unwrap_or("(no nvidia-smi)"),
        opts.arch,
        linear as f64 / 1e6,
        opts.pairs,
        opts.prompt_len,
        opts.completion_len,
        opts.mixed_precision,
        opts.steps,
        opts.warmup
    );
    out.push_str("| side | median step (ms) | tokens/s | peak GPU memory (MB, nvidia-smi) | MFU | first-step loss |\n|---|---|---|---|---|---|\n");
    for r in results {
        let step = median(&r.step_seconds);
        let mfu = peak_flops
            .map_or("?".into(), |p| format!("{:.1} %", 100.0 * flops_per_token * r.tokens_per_step as f64 / step / p));
        let mem = match (r.peak_gpu_mb, r.torch_allocated_mb) {
            (Some(m), Some(a)) => format!("{m:.0} (allocated {a:.0})"),
            (Some(m), None) => format!("{m:.0}"),
            (None, Some(a)) => format!("? (allocated {a:.0})"),
            (None, None) => "?".into(),
        };
        out.push_str(&format!(
            "| {} | {:.1} | {:.0} | {mem} | {mfu} | {} |\n",
            r.name,
            step * 1e3,
            r.tokens_per_step as f64 / step,
            r.first_loss.map_or("?".into(), |l| format!("{l:.4}"))
        ));
    }
    if let [a, b] = results {
        out.push_str(&format!(
            "\nprefhost vs PyTorch, tokens/s: **{:.2}×**\n",
            median(&b.step_seconds) / median(&a.step_seconds)
        ));
    }
    out
}

/// The prefhost side, in its own process: trains warmup + steps through the real trainer.
pub fn run_child(out: &Path) -> Result<()> {
    let opts: GpuBenchOptions = serde_json::from_str(&std::fs::read_to_string(out.join("settings.json"))?)?;
    let data = out.join("pairs.jsonl");
    let fields = format!(
        "model: \"{}\", data: \"{}\", backend: \"{}\", mixed_precision: \"{}\",\n  batch_size: {}, max_length: {}, max_prompt_length: {}, lr: 1e-6, max_grad_norm: 1.0,\n  log_every: 1, progress: false, seed: 1,",
        out.join("model").display(),
        data.display(),
        opts.backend,
        opts.mixed_precision,
        opts.pairs,
        opts.prompt_len + opts.completion_len,
        opts.prompt_len
    );
    let run_dir = out.join("run");
    let summary = train_dpo(&fields, &out.join("prefhost.rhai"), &run_dir, opts.warmup + opts.steps, false)?;
    let (examples, _) = load_examples(
        &data,
        &TextTokenizer::load(&out.join("model/tokenizer.json"), Some(1), Some(2))?,
        true,
        limits(&opts),
        false,
    )?;
    let first_loss = std::fs::read_to_string(run_dir.join("metrics.jsonl"))?
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find_map(|l| l.get("loss").and_then(|v| v.as_f64()));
    let result = SideResult {
        name: format!("prefhost {} {}", opts.backend, if opts.mixed_precision == "bf16" { "+ bf16" } else { "f32" }),
        step_seconds: summary.step_seconds[opts.warmup.min(summary.step_seconds.len())..].to_vec(),
        tokens_per_step: pair_tokens(&examples),
        peak_gpu_mb: None,
        torch_allocated_mb: None,
        first_loss,
    };
    std::fs::write(out.join("prefhost.json"), serde_json::to_string(&result)?)?;
    Ok(())
}
