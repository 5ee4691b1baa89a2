//! Command line: `host run | check | test | data`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Result, bail};
use clap::{Parser, Subcommand};

use crate::data::build_pairs::{PairStyle, build_pairs, check_output, edit_distances, write_pairs};
use crate::script::testing::{TestReport, run_test_file};
use crate::script::{Limits, ScriptEngine, ScriptHost, find_plugins_dir};
use crate::train::{RunOptions, TrainConfig};

#[derive(Parser)]
#[command(name = "host", version, about = "prefhost: preference optimisation with objectives in Rhai scripts")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train as the experiment script says; edits to the script or its plugins are
    /// picked up at the next step.
    Run {
        /// The experiment script (with --resume: defaults to the one the run started with).
        script: Option<PathBuf>,
        /// Continue a run folder from its latest checkpoint (after a crash, kill or Ctrl-C).
        #[arg(long, conflicts_with = "run_dir")]
        resume: Option<PathBuf>,
        /// With --resume: go on although the data, model weights, tokenizer or ref_logps
        /// differ from what the run started with (the data order and position are kept).
        #[arg(long, requires = "resume")]
        resume_anyway: bool,
        /// Do not watch the script and plugins for edits.
        #[arg(long)]
        no_watch: bool,
        /// Plugins folder (default: the nearest plugins/ above the script, else ./plugins).
        #[arg(long)]
        plugins: Option<PathBuf>,
        /// Run folder (default: <output_dir>/<name>-<UTC time>); must not exist.
        #[arg(long)]
        run_dir: Option<PathBuf>,
        /// Override the number of steps.
        #[arg(long)]
        max_steps: Option<usize>,
        /// Script operation limit per call (stops runaway loops).
        #[arg(long, default_value_t = Limits::default().max_operations)]
        max_operations: u64,
        /// Print the run's estimated peak memory and what is available, then stop (exit 1
        /// if it would not fit); loads no weights and writes nothing.
        #[arg(long, conflicts_with = "resume")]
        dry_run: bool,
        /// Serve a live page of the run while it trains: 127.0.0.1:8765 unless ADDR is given
        /// (PORT, or HOST:PORT; port 0 picks a free one). Put it after SCRIPT, or write --dashboard=ADDR.
        #[arg(long, value_name = "ADDR", num_args = 0..=1, default_missing_value = "", conflicts_with = "dry_run")]
        dashboard: Option<String>,
    },
    /// A live page of run folders, finished or running, side by side (read-only): charts of
    /// every metric with reloads and failures marked, comparison arms overlaid, held-out
    /// evaluations, the config, progress; and `host diff` reports (--diff). Serves until
    /// stopped (Ctrl-C).
    Dashboard {
        #[arg(value_name = "RUN_DIR", required_unless_present = "diff")]
        run_dirs: Vec<PathBuf>,
        /// A `host diff --out` report to show as a "what training changed" card (repeatable).
        #[arg(long, value_name = "REPORT.json")]
        diff: Vec<PathBuf>,
        /// Where to listen: PORT or HOST:PORT (default 127.0.0.1:8765; port 0 picks a free
        /// one). An address beyond loopback lets anyone who reaches it read the runs.
        #[arg(long, value_name = "ADDR")]
        addr: Option<String>,
    },
    /// Compile scripts and every plugin they import, check their config; no training.
    Check {
        #[arg(required = true)]
        scripts: Vec<PathBuf>,
        #[arg(long)]
        plugins: Option<PathBuf>,
    },
    /// Run every `fn test_*()` in Rhai test files.
    Test {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        #[arg(long)]
        plugins: Option<PathBuf>,
    },
    /// Build preference pairs from labelled data (MetaMath-style corrupted intermediate
    /// result, or multiple-choice correct vs each wrong choice), with edit-distance statistics.
    Pairs {
        /// Labelled JSONL rows.
        #[arg(long)]
        from: PathBuf,
        #[arg(long, value_enum)]
        style: PairStyle,
        /// Output JSONL; the statistics go to <out>.stats.json and <out>.edit_distance.png.
        #[arg(long)]
        out: PathBuf,
        /// Measure edit distance in this tokenizer's tokens (default: characters).
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        #[arg(long, default_value_t = 7)]
        seed: u64,
        #[arg(long, default_value_t = 20)]
        bins: usize,
    },
    /// Reference log-probs of every pair in a data file, for a run's `ref_logps`
    /// (one JSON line per row: summed and per-token log-probs, token counts); or one shard
    /// of them (--shard K/N), or the merge of every shard's file (--merge).
    Logps {
        /// Hugging Face model folder (the reference).
        #[arg(long, required_unless_present = "merge")]
        model: Option<PathBuf>,
        /// Preference rows (JSONL or Parquet), as the run will read them.
        #[arg(long, required_unless_present = "merge")]
        data: Option<PathBuf>,
        #[arg(long)]
        out: PathBuf,
        /// Must match the run's settings.
        #[command(flatten)]
        pairs: PairsFlags,
        /// Where to compute: cpu, or tch-cpu, tch-cuda, cuda when built with their feature.
        #[arg(long, default_value = "cpu")]
        backend: String,
        /// Only shard K of N (counted from 0): a contiguous run of whole batches; the file
        /// records the shard and the data, model and settings it was computed from.
        #[arg(long)]
        shard: Option<crate::train::reference::Shard>,
        /// Merge the files of shards 0/N .. N-1/N (any order) into the one-pass file at --out.
        #[arg(long, num_args = 1.., conflicts_with_all = ["model", "data", "shard", "backend", "batch_size", "max_length", "max_prompt_length", "prompt_special_tokens", "chat_template"])]
        merge: Vec<PathBuf>,
    },
    /// What training changed: per-token log-prob differences between two model folders
    /// (e.g. before and after DPO) on preference data; the largest changes and the mean
    /// change by position relative to the first chosen/rejected difference.
    Diff {
        /// Model folder A (e.g. the starting model).
        model_a: PathBuf,
        /// Model folder B (e.g. a checkpoint); the difference is B − A.
        model_b: PathBuf,
        /// Preference rows (JSONL or Parquet).
        #[arg(long)]
        data: PathBuf,
        /// Where to write the whole report as JSON (per-row token changes included).
        #[arg(long)]
        out: Option<PathBuf>,
        /// How many of the most-changed tokens to list.
        #[arg(long, default_value_t = 20)]
        top: usize,
        #[command(flatten)]
        pairs: PairsFlags,
    },
    /// Sample completions of every prompt from a model (KV cache, batched): seeded, so the
    /// same flags give the same samples; one JSON line per sample.
    Sample {
        /// Hugging Face model folder.
        #[arg(long)]
        model: PathBuf,
        /// JSONL or Parquet rows with a `prompt` (a string, or a list of messages for the chat template).
        #[arg(long)]
        prompts: PathBuf,
        /// Samples per prompt.
        #[arg(long)]
        n: usize,
        #[command(flatten)]
        sampling: SamplingFlags,
        /// Rows decoded together (samples of prompts of equal token length).
        #[arg(long, default_value_t = 16)]
        batch_size: usize,
        /// Where to compute: cpu, or tch-cpu, tch-cuda, cuda when built with their feature.
        #[arg(long, default_value = "cpu")]
        backend: String,
        /// Whether plain-text prompts get the tokenizer's special tokens (as training's prompts).
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        prompt_special_tokens: bool,
        /// Output JSONL: prompt_index, sample_index, prompt, completion, completion_ids, eos.
        #[arg(long)]
        out: PathBuf,
    },
    /// Time `host sample`'s generation against transformers' `generate` on the same model,
    /// prompts and settings, in interleaved rounds (new tokens/s; see BENCHMARKS.md).
    BenchSample {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        prompts: PathBuf,
        #[arg(long, default_value_t = 4)]
        n: usize,
        #[command(flatten)]
        sampling: SamplingFlags,
        #[arg(long, default_value_t = 16)]
        batch_size: usize,
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Python with torch and transformers (default: $PREFHOST_PYTHON or python3).
        #[arg(long)]
        python: Option<String>,
        /// The dtype transformers loads the weights in: auto (the checkpoint's), float32, bfloat16.
        #[arg(long, default_value = "auto")]
        torch_dtype: String,
        /// CPU threads per side (default: all).
        #[arg(long)]
        threads: Option<usize>,
        /// Folder for the report (default runs/bench-sample-<time>).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Internal: time prefhost's side once in this process.
        #[arg(long, hide = true)]
        child: bool,
    },
    /// Fold LoRA adapters (a PEFT folder, e.g. a LoRA run's checkpoint) into their base
    /// model's weights and write a plain Hugging Face model folder.
    Merge {
        /// Adapter folder (adapter_config.json, adapter_model.safetensors).
        #[arg(long)]
        adapter: PathBuf,
        /// Base model folder (default: the adapter's base_model_name_or_path).
        #[arg(long)]
        base: Option<PathBuf>,
        /// Output model folder; must not exist.
        #[arg(long)]
        out: PathBuf,
    },
    /// Time a DPO step in several configurations side by side (script vs Rust loss,
    /// prefix sharing, precomputed reference, PyTorch eager when torch is found).
    Bench {
        /// Folder for the model, data, runs and bench.md (default runs/bench-<time>).
        #[arg(long)]
        out: Option<PathBuf>,
        #[arg(long, value_enum, default_value = "m10")]
        size: crate::bench::dpo::ModelSize,
        #[arg(long, default_value_t = 10)]
        steps: usize,
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        #[arg(long, default_value_t = 8)]
        batch_size: usize,
        /// Python with torch for the PyTorch rows (default: $PREFHOST_PYTHON or python3, when
        /// either imports torch). A failed PyTorch run or a log-prob mismatch fails the bench.
        #[arg(long)]
        python: Option<String>,
        /// Leave the PyTorch rows out.
        #[arg(long, conflicts_with = "python")]
        no_pytorch: bool,
        /// Run only the configurations whose name starts with this, or with one of several
        /// comma-separated prefixes (e.g. vocab-32k; the PyTorch rows run when their name
        /// matches too, e.g. metamath, or 135m-512/full,135m-512/pytorch-eager).
        #[arg(long)]
        only: Option<String>,
        /// Internal: run one configuration in this process.
        #[arg(long, hide = true)]
        child: Option<String>,
        #[arg(long, hide = true, default_value_t = 0)]
        round: usize,
    },
    /// Time a DPO step on a GPU backend on a real-size random-init model, beside PyTorch eager
    /// on the same weights and batch: tokens/s, peak GPU memory, MFU (see BENCHMARKS.md).
    BenchGpu {
        /// Folder for the model, batch, runs and bench-gpu.md (default runs/bench-gpu-<time>).
        #[arg(long)]
        out: Option<PathBuf>,
        /// prefhost's backend: cuda or tch-cuda (cpu, tch-cpu for a dry run).
        #[arg(long, default_value = "cuda")]
        backend: String,
        #[arg(long, value_enum, default_value = "qwen2-0.5b")]
        arch: crate::bench::gpu::Arch,
        /// Preference pairs per step (two sequences each).
        #[arg(long, default_value_t = 8)]
        pairs: usize,
        #[arg(long, default_value_t = 256)]
        prompt_len: usize,
        #[arg(long, default_value_t = 256)]
        completion_len: usize,
        #[arg(long, default_value_t = 10)]
        steps: usize,
        #[arg(long, default_value_t = 3)]
        warmup: usize,
        /// "bf16" or "no", for both sides.
        #[arg(long, default_value = "bf16")]
        mixed_precision: String,
        /// Python with torch (default python3).
        #[arg(long)]
        python: Option<String>,
        /// The PyTorch side's device.
        #[arg(long, default_value = "cuda")]
        torch_device: String,
        /// The GPU's dense bf16 peak in TFLOPS, for MFU on a GPU not in the built-in list.
        #[arg(long)]
        peak_tflops: Option<f64>,
        /// Internal: run the prefhost side in this process.
        #[arg(long, hide = true)]
        child: bool,
    },
    /// Check every checkpoint of a run folder (and of a comparison's arms) against its
    /// manifest: one line each, ok or damaged (which file, what differs); exit 1 if any is damaged.
    Verify { run_dir: PathBuf },
    /// Generate the arithmetic word-problem corpus (and its tokenizer).
    Data {
        /// Output folder.
        #[arg(long, default_value = "data/arithmetic")]
        out: PathBuf,
        #[arg(long, default_value_t = 4000)]
        sft_rows: usize,
        #[arg(long, default_value_t = 1200)]
        pair_rows: usize,
        #[arg(long, default_value_t = 200)]
        eval_rows: usize,
        #[arg(long, default_value_t = 7)]
        seed: u64,
        /// Also train a BPE tokenizer.json of this size on the SFT rows.
        #[arg(long)]
        tokenizer_vocab: Option<usize>,
    },
}

/// How `host sample` and `host bench-sample` choose tokens. As transformers' `generate`:
/// a flag not given takes the model folder's generation_config.json value, else
/// transformers' default.
#[derive(clap::Args)]
struct SamplingFlags {
    /// 0 = greedy decoding [default: generation_config.json's, greedy if its do_sample is false, else 1]
    #[arg(long)]
    temperature: Option<f32>,
    /// Nucleus sampling: keep the most likely tokens up to this probability, 1 = off [default: generation_config.json's, else 1]
    #[arg(long)]
    top_p: Option<f32>,
    /// Keep the k most likely tokens, 0 = off [default: generation_config.json's, else 50]
    #[arg(long)]
    top_k: Option<usize>,
    /// Divide (multiply, if negative) the logits of tokens already in the row, 1 = off [default: generation_config.json's, else 1]
    #[arg(long)]
    repetition_penalty: Option<f32>,
    /// Read no sampling settings from generation_config.json (transformers' defaults instead)
    #[arg(long)]
    no_generation_config: bool,
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

impl SamplingFlags {
    /// The settings for `model_dir`, and where each came from, for the console.
    fn settings(&self, model_dir: &Path) -> Result<(crate::model::sampling::SamplingSettings, String)> {
        use crate::model::sampling::{GenerationDefaults, SamplingSettings, generation_defaults};
        let file =
            if self.no_generation_config { GenerationDefaults::default() } else { generation_defaults(model_dir)? };
        let mut sources = Vec::new();
        fn pick<T: std::fmt::Display + Copy>(
            sources: &mut Vec<String>,
            name: &str,
            flag: Option<T>,
            in_file: Option<T>,
            default: T,
        ) -> T {
            let (value, source) = match (flag, in_file) {
                (Some(v), _) => (v, "flag"),
                (None, Some(v)) => (v, "generation_config.json"),
                (None, None) => (default, "transformers' default"),
            };
            sources.push(format!("{name} {value} ({source})"));
            value
        }
        // generate samples only with do_sample; otherwise it is greedy, whatever the temperature.
        let file_temperature = if file.do_sample == Some(false) { Some(0.0) } else { file.temperature };
        let temperature = pick(&mut sources, "temperature", self.temperature, file_temperature, 1.0);
        let top_k = pick(&mut sources, "top_k", self.top_k, file.top_k, 50);
        let top_p = pick(&mut sources, "top_p", self.top_p, file.top_p, 1.0);
        let repetition_penalty =
            pick(&mut sources, "repetition_penalty", self.repetition_penalty, file.repetition_penalty, 1.0);
        let settings = SamplingSettings {
            temperature,
            top_k,
            top_p,
            repetition_penalty,
            max_new_tokens: self.max_new_tokens,
            seed: self.seed,
        };
        Ok((settings, sources.join(", ")))
    }
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match dispatch(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn host_for(script: &Path, plugins: Option<&Path>, limits: &Limits) -> Result<ScriptHost> {
    let dir = find_plugins_dir(script, plugins)?;
    Ok(ScriptHost::new(ScriptEngine::new(&dir, limits)))
}

fn dispatch(command: Command) -> Result<ExitCode> {
    crate::failpoint::check()?;
    match command {
        Command::Run {
            script,
            resume,
            resume_anyway,
            no_watch,
            plugins,
            run_dir,
            max_steps,
            max_operations,
            dry_run,
            dashboard,
        } => {
            let script = match (script, &resume) {
                (Some(script), _) => script,
                (None, Some(dir)) => crate::train::checkpoint::read_run_info(dir)?.script,
                (None, None) => match dashboard.as_deref() {
                    Some(taken) if Path::new(taken).is_file() => {
                        bail!(
                            "--dashboard took {taken:?} as its address; put --dashboard after the script, or write --dashboard=ADDR"
                        )
                    }
                    _ => bail!("give a script, or --resume RUN_DIR"),
                },
            };
            let limits = Limits { max_operations, ..Limits::default() };
            let mut host = host_for(&script, plugins.as_deref(), &limits)?;
            if dry_run {
                crate::train::trainer::dry_run(&mut host, &script)?;
                return Ok(ExitCode::SUCCESS);
            }
            let mut options = RunOptions { script, watch: !no_watch, run_dir, max_steps, resume, resume_anyway };
            // Served from threads of its own while the run trains; gone when the run ends.
            let _dashboard = match &dashboard {
                Some(addr) => Some(start_run_dashboard(&mut host, &mut options, addr)?),
                None => None,
            };
            let summary = crate::train::run(&mut host, options)?;
            // 130 = stopped by SIGINT, as shells report it; the checkpoint is written.
            Ok(if summary.interrupted { ExitCode::from(130) } else { ExitCode::SUCCESS })
        }
        Command::Check { scripts, plugins } => {
            let mut failed = 0;
            for script in &scripts {
                match check(script, plugins.as_deref()) {
                    Ok(summary) => println!("ok   {summary}"),
                    Err(e) => {
                        eprintln!("{e:#}");
                        failed += 1;
                    }
                }
            }
            if failed > 0 {
                bail!("{failed} of {} script(s) failed the check", scripts.len());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Test { files, plugins } => {
            let mut report = TestReport { passed: 0, failed: Vec::new() };
            for file in &files {
                let mut host = host_for(file, plugins.as_deref(), &Limits::default())?;
                run_test_file(&mut host, file, &mut report);
            }
            println!("{} passed, {} failed", report.passed, report.failed.len());
            Ok(if report.failed.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        Command::Logps { model, data, out, pairs, backend, shard, merge } => {
            use crate::train::reference::{LogpsJob, merge_shards, precompute};
            if !merge.is_empty() {
                let rows = merge_shards(&merge, &out)?;
                println!("merged {} shards ({rows} rows) into {}", merge.len(), out.display());
                return Ok(ExitCode::SUCCESS);
            }
            let (Some(model), Some(data)) = (model, data) else {
                bail!("give --model and --data, or --merge SHARD...")
            };
            let job = LogpsJob {
                model_dir: &model,
                data: &data,
                out: &out,
                batch_size: pairs.batch_size,
                limits: pairs.limits(),
                prompt_special_tokens: pairs.prompt_special_tokens,
                chat_template: pairs.chat_template.as_deref(),
                backend: &backend,
                shard,
            };
            let rows = precompute(&job)?;
            let part = shard.map(|s| format!(" (shard {s})")).unwrap_or_default();
            println!("wrote reference log-probs of {rows} rows{part} to {} (backend {backend})", out.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Diff { model_a, model_b, data, out, top, pairs } => {
            use crate::train::diff::{DiffJob, diff};
            let job = DiffJob {
                model_a: &model_a,
                model_b: &model_b,
                data: &data,
                batch_size: pairs.batch_size,
                limits: pairs.limits(),
                prompt_special_tokens: pairs.prompt_special_tokens,
                chat_template: pairs.chat_template.as_deref(),
                top,
            };
            let report = diff(&job)?;
            println!("{}", report.describe(10));
            if let Some(out) = out {
                report.write(&out)?;
                println!("report written to {}", out.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Sample { model, prompts, n, sampling, batch_size, backend, prompt_special_tokens, out } => {
            use crate::train::sample::{SampleJob, run_sample_job};
            let (settings, sources) = sampling.settings(&model)?;
            eprintln!("sampling: {sources}");
            let job = SampleJob {
                model_dir: &model,
                prompts: &prompts,
                out: &out,
                n,
                settings,
                batch_size,
                backend: &backend,
                prompt_special_tokens,
            };
            let done = run_sample_job(&job)?;
            println!(
                "wrote {} samples ({} new tokens, {:.1} tokens/s) to {} (backend {backend})",
                done.samples,
                done.new_tokens,
                done.new_tokens as f64 / done.seconds.max(1e-9),
                out.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::BenchSample {
            model,
            prompts,
            n,
            sampling,
            batch_size,
            rounds,
            python,
            torch_dtype,
            threads,
            out,
            child,
        } => {
            let out = out.unwrap_or_else(|| PathBuf::from(format!("runs/bench-sample-{}", crate::clock::timestamp())));
            let (settings, sources) = sampling.settings(&model)?;
            eprintln!("sampling: {sources}");
            let threads = threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
            let opts = crate::bench::sample::SampleBenchOptions {
                model,
                prompts,
                n,
                settings,
                batch_size,
                rounds,
                python,
                torch_dtype,
                threads,
                out,
            };
            if child {
                println!("{}", serde_json::to_string(&crate::bench::sample::run_child(&opts)?)?);
            } else {
                // The child gets this command's own flags (out included, so it is the same run).
                let mut args: Vec<String> = std::env::args().skip_while(|a| a != "bench-sample").skip(1).collect();
                if !args.iter().any(|a| a == "--out" || a.starts_with("--out=")) {
                    args.extend(["--out".to_string(), opts.out.display().to_string()]);
                }
                println!("{}", crate::bench::sample::run(&opts, &args)?);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Merge { adapter, base, out } => {
            if out.exists() {
                bail!("{}: already exists; choose another --out", out.display());
            }
            let device = crate::backend::backend_device("cpu")?;
            let (config, model, base) = crate::model::load_adapter_model(&adapter, base.as_deref(), &device)?;
            crate::model::save_model(&model, &config, &base.join("tokenizer.json"), &out)?;
            println!("merged {} into {} and wrote {}", adapter.display(), base.display(), out.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench { out, size, steps, warmup, rounds, batch_size, python, no_pytorch, only, child, round } => {
            let out = out.unwrap_or_else(|| PathBuf::from(format!("runs/bench-{}", crate::clock::timestamp())));
            match child {
                Some(name) => crate::bench::dpo::run_child(&name, &out, steps, warmup, round)?,
                None => {
                    crate::bench::dpo::run_bench(&crate::bench::dpo::BenchOptions {
                        out,
                        size,
                        steps,
                        warmup,
                        rounds: rounds.max(1),
                        batch_size,
                        python,
                        no_pytorch,
                        only,
                    })?;
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::BenchGpu {
            out,
            backend,
            arch,
            pairs,
            prompt_len,
            completion_len,
            steps,
            warmup,
            mixed_precision,
            python,
            torch_device,
            peak_tflops,
            child,
        } => {
            let out = out.unwrap_or_else(|| PathBuf::from(format!("runs/bench-gpu-{}", crate::clock::timestamp())));
            if child {
                crate::bench::gpu::run_child(&out)?;
            } else {
                let opts = crate::bench::gpu::GpuBenchOptions {
                    out,
                    backend,
                    arch,
                    pairs,
                    prompt_len,
                    completion_len,
                    steps,
                    warmup,
                    mixed_precision,
                    python,
                    torch_device,
                    peak_tflops,
                };
                println!("{}", crate::bench::gpu::run(&opts)?);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Dashboard { run_dirs, diff, addr } => {
            crate::dashboard::serve_folders(&run_dirs, &diff, addr.as_deref())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Verify { run_dir } => {
            let (lines, sound) = crate::train::checkpoint::verify_report(&run_dir)?;
            println!("{}", lines.join("\n"));
            Ok(if sound { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        Command::Pairs { from, style, out, tokenizer, seed, bins } => {
            pairs(&from, style, &out, tokenizer.as_deref(), seed, bins)
        }
        Command::Data { out, sft_rows, pair_rows, eval_rows, seed, tokenizer_vocab } => {
            crate::data::arithmetic::write_corpus(&out, sft_rows, pair_rows, eval_rows, seed)?;
            println!("wrote {}/{{sft,pairs,eval,choices}}.jsonl", out.display());
            if let Some(vocab) = tokenizer_vocab {
                let path = out.join("tokenizer.json");
                crate::data::arithmetic::train_tokenizer(&out.join("sft.jsonl"), vocab, &path)?;
                println!("wrote {}", path.display());
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `host run --dashboard`: the run folder is decided first (a new run's default name is
/// fixed here, so the page follows the folder the run then creates), and the page is served
/// before training starts, so a port in use stops the command before anything is written.
fn start_run_dashboard(
    host: &mut ScriptHost,
    options: &mut RunOptions,
    addr: &str,
) -> Result<crate::dashboard::Dashboard> {
    let parsed = crate::dashboard::parse_address(Some(addr));
    let addr = match parsed {
        Ok(addr) => addr,
        Err(_) if Path::new(addr).is_file() => {
            bail!(
                "--dashboard took {addr:?} as its address; put --dashboard after the script, or write --dashboard=ADDR"
            )
        }
        Err(e) => return Err(e),
    };
    let dir = match (&options.resume, &options.run_dir) {
        (Some(dir), _) | (None, Some(dir)) => dir.clone(),
        (None, None) => {
            let version = host.load(&options.script).map_err(|e| anyhow::anyhow!("{e}"))?;
            let config = crate::train::trainer::config_of(&version, None)?;
            let dir = crate::train::trainer::run_folder_for(options, &config);
            options.run_dir = Some(dir.clone());
            dir
        }
    };
    let dashboard = crate::dashboard::start(addr, vec![crate::dashboard::RunFolder::pending(&dir)], Vec::new())?;
    println!(
        "dashboard: {} (read-only; run folder {}; served while this run lasts, later with: host dashboard {})",
        dashboard.url,
        dir.display(),
        dir.display()
    );
    Ok(dashboard)
}

/// Compiles the script and its plugins, evaluates its top level and checks the config.
fn check(script: &Path, plugins: Option<&Path>) -> Result<String> {
    let mut host = host_for(script, plugins, &Limits::default())?;
    let version = host.load(script).map_err(|e| anyhow::anyhow!("{e}"))?;
    let files = version.sources.len();
    match version.config.clone() {
        Some(map) => {
            let config =
                TrainConfig::from_map(map).map_err(|e| anyhow::anyhow!("{}: {e:#}", version.display_path()))?;
            let mut loss_fns: Vec<String> = config.compare.iter().map(|arm| arm.loss_fn.clone()).collect();
            if loss_fns.is_empty() {
                loss_fns.push(config.loss_fn.clone());
            }
            for name in &loss_fns {
                if !version.has_fn(name, 2) {
                    bail!("{}: the script defines no fn {name}(batch, params)", version.display_path());
                }
            }
            crate::train::reload::require_reward(&version, &config)?;
            crate::backend::backend_device(&config.backend)
                .map_err(|e| anyhow::anyhow!("{}: {e}", version.display_path()))?;
            Ok(format!(
                "{} ({files} file(s) compiled, mode {:?}, backend {})",
                version.display_path(),
                config.mode,
                config.backend
            ))
        }
        None => Ok(format!("{} ({files} file(s) compiled; no train() call)", version.display_path())),
    }
}

fn pairs(
    from: &Path,
    style: PairStyle,
    out: &Path,
    tokenizer: Option<&Path>,
    seed: u64,
    bins: usize,
) -> Result<ExitCode> {
    check_output(out, from)?;
    let tokenizer = match tokenizer {
        Some(path) => Some(
            tokenizers::Tokenizer::from_file(path)
                .map_err(|e| anyhow::anyhow!("{}: invalid tokenizer: {e}", path.display()))?,
        ),
        None => None,
    };
    let (pairs, report) = build_pairs(from, style, seed)?;
    for (reason, places) in &report.skipped {
        let shown: Vec<&str> = places.iter().take(3).map(String::as_str).collect();
        eprintln!("skipped {} row(s): {reason} (e.g. {})", places.len(), shown.join(", "));
    }
    if pairs.is_empty() {
        bail!("{}: no pairs could be built from {} row(s)", from.display(), report.rows);
    }
    let distances = edit_distances(&pairs, tokenizer.as_ref())?;
    let unit = if tokenizer.is_some() { "tokens" } else { "characters" };
    let stats = write_pairs(out, &pairs, &distances, unit, bins, &report)?;
    let plot = out.with_extension("edit_distance.png");
    crate::report::histogram_png(
        &format!("normalised edit distance ({unit}), {} pairs", pairs.len()),
        "chosen vs rejected",
        &distances,
        bins,
        &plot,
    )?;
    let ed = &stats["edit_distance"];
    println!(
        "wrote {} pairs from {} rows to {} ({} skipped)\nnormalised edit distance ({unit}): mean {:.3}, median {:.3}, p10 {:.3}, p90 {:.3}\nstats: {}  histogram: {}",
        pairs.len(),
        report.rows,
        out.display(),
        report.skipped_count(),
        ed["mean"].as_f64().unwrap_or(0.0),
        ed["median"].as_f64().unwrap_or(0.0),
        ed["p10"].as_f64().unwrap_or(0.0),
        ed["p90"].as_f64().unwrap_or(0.0),
        out.with_extension("stats.json").display(),
        plot.display(),
    );
    Ok(ExitCode::SUCCESS)
}

/// How `host logps` and `host diff` read and batch preference rows (a run's settings).
#[derive(clap::Args)]
struct PairsFlags {
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// The run's max_length and max_prompt_length.
    #[arg(long, default_value_t = 256)]
    max_length: usize,
    #[arg(long, default_value_t = 128)]
    max_prompt_length: usize,
    /// The run's prompt_special_tokens.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    prompt_special_tokens: bool,
    /// The run's chat_template (a named template of the tokenizer folder).
    #[arg(long)]
    chat_template: Option<String>,
}

impl PairsFlags {
    fn limits(&self) -> crate::data::Truncation {
        crate::data::Truncation { max_length: self.max_length, max_prompt_length: self.max_prompt_length }
    }
}
