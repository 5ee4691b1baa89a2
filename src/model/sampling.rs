//! Sampling one token from the last position's logits, on the host CPU, so every backend
//! samples alike: transformers' warpers in generate's order (temperature, then top-k, then
//! top-p, each keeping at least one token), softmax, and an inverse-CDF draw from a
//! counter-based uniform that depends only on (seed, prompt, sample, step). A sample is thus
//! the same whatever the batch it was decoded in, and a resumed run can repeat it.

use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};

use super::config::TokenIds;
use crate::data::TextTokenizer;
use crate::data::chat::messages;
use crate::data::pairs::read_rows;

/// How each token is chosen. `temperature` 0 is greedy decoding (the first highest logit).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplingSettings {
    pub temperature: f32,
    /// Keep the `top_k` highest logits (ties with the k-th kept too); 0 = off.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p`; 1 = off.
    pub top_p: f32,
    pub max_new_tokens: usize,
    pub seed: u64,
}

impl Default for SamplingSettings {
    fn default() -> Self {
        Self { temperature: 1.0, top_k: 0, top_p: 1.0, max_new_tokens: 256, seed: 0 }
    }
}

impl SamplingSettings {
    /// Refuses settings transformers would refuse, naming the flag.
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            bail!("--temperature must be a finite number >= 0 (0 = greedy), got {}", self.temperature);
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            bail!("--top-p must be in (0, 1], got {}", self.top_p);
        }
        if self.max_new_tokens == 0 {
            bail!("--max-new-tokens must be at least 1");
        }
        Ok(())
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    /// The next token of one row from its logits [vocab]: greedy, or a draw at `uniform` in [0, 1).
    pub fn choose(&self, logits: &[f32], uniform: f64) -> Result<u32> {
        if logits.iter().any(|x| x.is_nan()) {
            bail!("the model's logits hold NaN");
        }
        if self.is_greedy() {
            return Ok(argmax(logits));
        }
        let mut scores = logits.to_vec();
        self.warp(&mut scores);
        draw(&softmax(&scores), uniform)
    }

    /// Temperature, top-k, top-p in transformers' order; filtered scores become -inf.
    pub fn warp(&self, scores: &mut [f32]) {
        if self.temperature != 1.0 {
            scores.iter_mut().for_each(|s| *s /= self.temperature);
        }
        if self.top_k != 0 {
            top_k_filter(scores, self.top_k);
        }
        if self.top_p < 1.0 {
            top_p_filter(scores, self.top_p);
        }
    }
}

/// The index of the first highest value, as torch.argmax.
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    best as u32
}

/// transformers' TopKLogitsWarper: scores below the k-th highest become -inf, so ties with
/// the k-th are all kept; k larger than the vocabulary keeps everything.
pub fn top_k_filter(scores: &mut [f32], top_k: usize) {
    let k = top_k.max(1).min(scores.len());
    if k == scores.len() {
        return;
    }
    let mut sorted = scores.to_vec();
    // Descending; the k-th value is the threshold.
    let (_, kth, _) = sorted.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
    let threshold = *kth;
    scores.iter_mut().filter(|s| **s < threshold).for_each(|s| *s = f32::NEG_INFINITY);
}

/// transformers' TopPLogitsWarper: sort ascending, and drop the tokens whose cumulative
/// probability stays at or below 1 - top_p; the most likely token is always kept
/// (min_tokens_to_keep = 1). Equal scores sort by index (a stable sort), so of tied tokens
/// at the cut the lower indices go first.
pub fn top_p_filter(scores: &mut [f32], top_p: f32) {
    // Tokens already filtered out (-inf) add nothing to the cumulative sum, so only the
    // others are sorted (after top-k, a few dozen of the whole vocabulary).
    let mut order: Vec<usize> = (0..scores.len()).filter(|&i| scores[i] > f32::NEG_INFINITY).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    let sorted: Vec<f32> = order.iter().map(|&i| scores[i]).collect();
    let probs = softmax(&sorted);
    let cut = 1.0 - top_p as f64;
    let mut cumulative = 0.0;
    // Every position but the last (the most likely token) may be removed.
    for (&index, p) in order.iter().zip(&probs).take(order.len().saturating_sub(1)) {
        cumulative += p;
        if cumulative > cut {
            break;
        }
        scores[index] = f32::NEG_INFINITY;
    }
}

/// Probabilities of the scores (-inf → 0), in f64.
pub fn softmax(scores: &[f32]) -> Vec<f64> {
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let exp: Vec<f64> = scores.iter().map(|&s| (s as f64 - max).exp()).collect();
    let total: f64 = exp.iter().sum();
    exp.into_iter().map(|e| e / total).collect()
}

/// The token whose cumulative probability first exceeds `uniform` (in [0, 1)) of the total;
/// a token of probability 0 is never drawn.
pub fn draw(probs: &[f64], uniform: f64) -> Result<u32> {
    let total: f64 = probs.iter().sum();
    if !(total.is_finite() && total > 0.0) {
        bail!("no token has a finite, positive probability");
    }
    let target = uniform * total;
    let mut cumulative = 0.0;
    let mut last_possible = 0;
    for (i, &p) in probs.iter().enumerate() {
        if p > 0.0 {
            cumulative += p;
            last_possible = i;
            if cumulative > target {
                return Ok(i as u32);
            }
        }
    }
    // Rounding left the sum just under the target: the last token that could be drawn.
    Ok(last_possible as u32)
}

/// A uniform number in [0, 1) that is a pure function of (seed, prompt, sample, step):
/// SplitMix64's finaliser chained over the counters (a counter-based generator).
pub fn uniform(seed: u64, prompt: usize, sample: usize, step: usize) -> f64 {
    fn mix(mut z: u64) -> u64 {
        z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    let mut h = mix(seed);
    for counter in [prompt, sample, step] {
        h = mix(h ^ counter as u64);
    }
    (h >> 11) as f64 / (1u64 << 53) as f64
}

/// The ids that end a completion: the tokenizer's (its EOS and config.json's eos_token_id,
/// as evaluation stops) and generation_config.json's eos_token_id, which transformers'
/// generate stops at.
pub fn stop_ids(model_dir: &Path, tokenizer: &TextTokenizer) -> Result<Vec<u32>> {
    #[derive(Deserialize)]
    struct GenerationConfig {
        #[serde(default)]
        eos_token_id: Option<TokenIds>,
    }
    let mut ids = tokenizer.stop_ids.clone();
    let path = model_dir.join("generation_config.json");
    if let Ok(text) = std::fs::read_to_string(&path) {
        let config: GenerationConfig = serde_json::from_str(&text).map_err(|e| anyhow!("{}:{}:{}: {e}", path.display(), e.line(), e.column()))?;
        for id in config.eos_token_id.map_or_else(Vec::new, |ids| ids.ids()) {
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
    }
    Ok(ids)
}

/// One prompt of a prompts file: as written (a string or a list of messages), its tokens,
/// and where it was read.
pub struct PromptRow {
    pub prompt: serde_json::Value,
    /// The whole row (all its fields), e.g. for a reward that reads its `answer`.
    pub row: serde_json::Value,
    pub tokens: Vec<u32>,
    pub at: String,
}

/// The `prompt` of every row of a JSONL or Parquet file (other fields are ignored, so a
/// pairs or eval file serves): a string gets the tokenizer's special tokens as training's
/// prompts do, a list of messages is rendered by the chat template with the generation prompt.
pub fn load_prompts(path: &Path, tokenizer: &TextTokenizer, max_positions: usize) -> Result<Vec<PromptRow>> {
    let mut rows = Vec::new();
    for raw in read_rows(path)? {
        let at = raw.at;
        let value = raw.value.map_err(|e| anyhow!("{at}: {e}"))?;
        let tokens = match value.get("prompt") {
            Some(serde_json::Value::String(text)) => tokenizer.encode_prompt(text),
            Some(list @ serde_json::Value::Array(_)) => {
                let messages = messages(list, "prompt").map_err(|e| anyhow!("{at}: {e}"))?;
                let template = tokenizer.chat.as_ref().with_context(|| {
                    format!("{at}: the prompt is a list of messages, but {} has no chat_template", tokenizer.path.with_file_name("tokenizer_config.json").display())
                })?;
                let text = template.render(&messages, true).map_err(|e| anyhow!("{at}: {e}"))?;
                tokenizer.encode_templated_prompt(&text)
            }
            _ => bail!("{at}: missing field `prompt` (a string or a list of messages)"),
        }
        .with_context(|| at.clone())?;
        if tokens.is_empty() {
            bail!("{at}: the prompt has no tokens");
        }
        if tokens.len() >= max_positions {
            bail!("{at}: the prompt has {} tokens, which leaves no room before the model's {max_positions} positions end", tokens.len());
        }
        rows.push(PromptRow { prompt: value["prompt"].clone(), tokens, at, row: value });
    }
    if rows.is_empty() {
        bail!("{}: no prompts", path.display());
    }
    Ok(rows)
}

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
    let device = crate::train::backend_device(job.backend).context("--backend")?;
    let (config, model) = crate::model::load_frozen_model(job.model_dir, &device)?;
    let mut tokenizer = TextTokenizer::load_with(&job.model_dir.join("tokenizer.json"), &config.eos_ids(), config.pad_token_id)?;
    tokenizer.prompt_special_tokens = job.prompt_special_tokens;
    let eos = stop_ids(job.model_dir, &tokenizer)?;
    let prompts = load_prompts(job.prompts, &tokenizer, model.max_positions())?;
    let tokens: Vec<Vec<u32>> = prompts.iter().map(|p| p.tokens.clone()).collect();
    let started = std::time::Instant::now();
    let samples = super::generate::sample(&model, &tokens, job.n, &job.settings, &eos, job.batch_size)?;
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
    crate::train::reference::write_jsonl(None, &lines, job.out)?;
    Ok(SampleSummary { samples: lines.len(), new_tokens: lines.iter().map(|l| l.completion_ids.len() + usize::from(l.eos)).sum(), seconds })
}
