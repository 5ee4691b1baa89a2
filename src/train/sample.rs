//! `host sample`: `n` seeded samples of every prompt of a file, written as JSONL.

use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::data::TextTokenizer;
use crate::data::prompts::load_prompts;
use crate::model::sampling::{SamplingSettings, stop_ids};

/// What `host sample` does: `n` samples of every prompt in `prompts`, written to `out`.
pub struct SampleJob<'a> {
    pub model_dir: &'a Path,
    pub prompts: &'a Path,
    pub out: &'a Path,
    pub n: usize,
    pub settings: SamplingSettings,
    pub batch_size: usize,
    pub backend: &'a str,
    pub prompt_special_tokens: bool,
}

/// One line of `host sample`'s output.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct SampleLine {
    pub prompt_index: usize,
    pub sample_index: usize,
    pub prompt: serde_json::Value,
    pub completion: String,
    /// The new tokens, without the stop token.
    pub completion_ids: Vec<u32>,
    /// Whether the completion ended at an EOS id (else at --max-new-tokens or the model's last position).
    pub eos: bool,
}

/// What a finished `host sample` reports.
pub struct SampleSummary {
    pub samples: usize,
    pub new_tokens: usize,
    pub seconds: f64,
}

/// Checks the flags, loads the model and prompts, samples, and writes the JSONL atomically
/// (a temp file renamed into place), so a failure leaves no output file.
pub fn run_sample_job(job: &SampleJob) -> Result<SampleSummary> {
    if job.n == 0 {
        bail!("--n must be at least 1");
    }
    if job.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    job.settings.validate()?;
    if job.out.canonicalize().ok().is_some_and(|o| job.prompts.canonicalize().ok() == Some(o)) {
        bail!("{}: --out would overwrite the prompts", job.out.display());
    }
    let device = crate::backend::backend_device(job.backend).context("--backend")?;
    let (config, model) = crate::model::load_frozen_model(job.model_dir, &device)?;
    let mut tokenizer =
        TextTokenizer::load_with(&job.model_dir.join("tokenizer.json"), &config.eos_ids(), config.pad_token_id)?;
    tokenizer.prompt_special_tokens = job.prompt_special_tokens;
    let eos = stop_ids(job.model_dir, &tokenizer)?;
    let prompts = load_prompts(job.prompts, &tokenizer, model.max_positions())?;
    let tokens: Vec<Vec<u32>> = prompts.iter().map(|p| p.tokens.clone()).collect();
    let started = std::time::Instant::now();
    let samples = crate::model::generate::sample(&model, &tokens, job.n, &job.settings, &eos, job.batch_size)?;
    let seconds = started.elapsed().as_secs_f64();
    let lines: Vec<SampleLine> = samples
        .into_iter()
        .map(|s| SampleLine {
            prompt_index: s.prompt,
            sample_index: s.sample,
            prompt: prompts[s.prompt].prompt.clone(),
            completion: tokenizer.decode(&s.completion.tokens),
            completion_ids: s.completion.tokens,
            eos: s.completion.eos,
        })
        .collect();
    super::reference::write_jsonl(None, &lines, job.out)?;
    Ok(SampleSummary {
        samples: lines.len(),
        new_tokens: lines.iter().map(|l| l.completion_ids.len() + usize::from(l.eos)).sum(),
        seconds,
    })
}
