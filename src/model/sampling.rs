//! Sampling one token from the last position's logits, on the host CPU, so every backend
//! samples alike: transformers' warpers in generate's order (temperature, then top-k, then
//! top-p, each keeping at least one token), softmax, and an inverse-CDF draw from a
//! counter-based uniform that depends only on (seed, prompt, sample, step). A sample is thus
//! the same whatever the batch it was decoded in, and a resumed run can repeat it.

use std::path::Path;

use anyhow::{Result, anyhow, bail};
use serde::Deserialize;

use super::config::TokenIds;
use crate::data::TextTokenizer;

/// How each token is chosen. `temperature` 0 is greedy decoding (the first highest logit).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplingSettings {
    pub temperature: f32,
    /// Keep the `top_k` highest logits (ties with the k-th kept too); 0 = off.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p`; 1 = off.
    pub top_p: f32,
    /// transformers' repetition penalty (CTRL's): the logit of every token already in the
    /// row (prompt included) is divided by it if positive, multiplied if negative; 1 = off.
    /// Applied before the warpers, in greedy decoding too, as generate does.
    pub repetition_penalty: f32,
    pub max_new_tokens: usize,
    pub seed: u64,
}

impl Default for SamplingSettings {
    fn default() -> Self {
        Self { temperature: 1.0, top_k: 0, top_p: 1.0, repetition_penalty: 1.0, max_new_tokens: 256, seed: 0 }
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
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            bail!("--repetition-penalty must be a finite number > 0 (1 = off), got {}", self.repetition_penalty);
        }
        if self.max_new_tokens == 0 {
            bail!("--max-new-tokens must be at least 1");
        }
        Ok(())
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    /// The next token of one row from its logits [vocab], `seen` being the row's tokens so
    /// far (prompt and completion): greedy, or a draw at `uniform` in [0, 1).
    pub fn choose(&self, logits: &[f32], seen: &[u32], uniform: f64) -> Result<u32> {
        if logits.iter().any(|x| x.is_nan()) {
            bail!("the model's logits hold NaN");
        }
        let mut scores = logits.to_vec();
        penalize_repeats(&mut scores, seen, self.repetition_penalty);
        if self.is_greedy() {
            return Ok(argmax(&scores));
        }
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

/// transformers' RepetitionPenaltyLogitsProcessor: each distinct token of `seen` has its
/// score divided by `penalty` when positive and multiplied by it otherwise.
pub fn penalize_repeats(scores: &mut [f32], seen: &[u32], penalty: f32) {
    if penalty == 1.0 {
        return;
    }
    // Distinct tokens only: a repeated one is penalised once. The row's tokens are far fewer
    // than the vocabulary, so sorting them is cheaper than marking the vocabulary.
    let mut distinct = seen.to_vec();
    distinct.sort_unstable();
    distinct.dedup();
    for token in distinct {
        if let Some(score) = scores.get_mut(token as usize) {
            *score = if *score < 0.0 { *score * penalty } else { *score / penalty };
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
        let config: GenerationConfig =
            serde_json::from_str(&text).map_err(|e| anyhow!("{}:{}:{}: {e}", path.display(), e.line(), e.column()))?;
        for id in config.eos_token_id.map_or_else(Vec::new, |ids| ids.ids()) {
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
    }
    Ok(ids)
}

/// What a model folder's generation_config.json says about choosing tokens: the defaults
/// transformers' `generate` takes for whatever its caller does not pass.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GenerationDefaults {
    pub do_sample: Option<bool>,
    pub temperature: Option<f32>,
    pub top_k: Option<usize>,
    pub top_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
}

/// Keys of generation_config.json that do not change which tokens are drawn (ids, lengths,
/// the output's form, caching), so they may be left to transformers.
const GENERATION_KEYS_WITHOUT_EFFECT: &[&str] = &[
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "decoder_start_token_id",
    "transformers_version",
    "_from_model_config",
    "max_length",
    "max_new_tokens",
    "num_return_sequences",
    "use_cache",
    "cache_implementation",
    "cache_config",
    "return_dict_in_generate",
    "output_scores",
    "output_logits",
    "output_attentions",
    "output_hidden_states",
    "trust_remote_code",
    "is_assistant",
    "num_assistant_tokens",
    "num_assistant_tokens_schedule",
    "assistant_confidence_threshold",
    "assistant_early_exit",
    "assistant_ensemble_weight",
    "assistant_lookbehind",
    "target_lookbehind",
    "max_matching_ngram_size",
    "speculation_type",
    "use_mtp",
    "compile_config",
    "disable_compile",
    "continuous_batching_config",
    "low_memory",
    "max_cache_len",
    "prefill_chunk_size",
    // Beam search only, which `num_beams` > 1 would ask for (refused).
    "length_penalty",
    "early_stopping",
    "diversity_penalty",
];

/// Reads generation_config.json's sampling defaults (none when the file is absent).
/// A key that would change the choice of tokens and is not implemented here, with a value
/// that is not transformers' neutral one (e.g. `no_repeat_ngram_size: 3`, `min_p: 0.1`,
/// `num_beams: 4`), is an error naming the file and the key, as is a key not known at all.
pub fn generation_defaults(model_dir: &Path) -> Result<GenerationDefaults> {
    let path = model_dir.join("generation_config.json");
    let Ok(text) = std::fs::read_to_string(&path) else { return Ok(GenerationDefaults::default()) };
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| anyhow!("{}:{}:{}: {e}", path.display(), e.line(), e.column()))?;
    let object = value.as_object().ok_or_else(|| anyhow!("{}: not a JSON object", path.display()))?;
    let mut found = GenerationDefaults::default();
    let number = |key: &str, v: &serde_json::Value| {
        v.as_f64().ok_or_else(|| anyhow!("{}: {key}: expected a number, got {v}", path.display()))
    };
    for (key, v) in object {
        let neutral = match key.as_str() {
            "do_sample" => {
                found.do_sample = Some(
                    v.as_bool()
                        .ok_or_else(|| anyhow!("{}: do_sample: expected true or false, got {v}", path.display()))?,
                );
                continue;
            }
            "temperature" if !v.is_null() => {
                found.temperature = Some(number(key, v)? as f32);
                continue;
            }
            "top_k" if !v.is_null() => {
                found.top_k = Some(
                    v.as_u64()
                        .ok_or_else(|| anyhow!("{}: top_k: expected a whole number >= 0, got {v}", path.display()))?
                        as usize,
                );
                continue;
            }
            "top_p" if !v.is_null() => {
                found.top_p = Some(number(key, v)? as f32);
                continue;
            }
            "repetition_penalty" if !v.is_null() => {
                found.repetition_penalty = Some(number(key, v)? as f32);
                continue;
            }
            k if GENERATION_KEYS_WITHOUT_EFFECT.contains(&k) => true,
            // Each as transformers' _get_logits_processor / beam search leaves it off.
            "num_beams" | "num_beam_groups" => v.is_null() || v.as_u64() == Some(1),
            "typical_p" => v.is_null() || v.as_f64() == Some(1.0),
            "epsilon_cutoff"
            | "eta_cutoff"
            | "penalty_alpha"
            | "no_repeat_ngram_size"
            | "encoder_no_repeat_ngram_size"
            | "min_length" => v.is_null() || v.as_f64() == Some(0.0),
            "guidance_scale" | "encoder_repetition_penalty" => v.is_null() || v.as_f64() == Some(1.0),
            "renormalize_logits" | "remove_invalid_values" => v.is_null() || v.as_bool() == Some(false),
            "temperature"
            | "top_k"
            | "top_p"
            | "repetition_penalty"
            | "min_p"
            | "top_h"
            | "min_new_tokens"
            | "bad_words_ids"
            | "force_words_ids"
            | "suppress_tokens"
            | "begin_suppress_tokens"
            | "sequence_bias"
            | "forced_bos_token_id"
            | "forced_eos_token_id"
            | "exponential_decay_length_penalty"
            | "watermarking_config"
            | "stop_strings"
            | "constraints"
            | "dola_layers"
            | "max_time"
            | "token_healing"
            | "prompt_lookup_num_tokens" => v.is_null(),
            _ => bail!(
                "{}: {key}: not a generation_config.json key prefhost knows, so it cannot tell whether it changes sampling \
                 (--no-generation-config reads none of the file's settings)",
                path.display()
            ),
        };
        if !neutral {
            bail!(
                "{}: {key} = {v}: changes which tokens transformers' generate draws, and prefhost does not implement it \
                 (--no-generation-config reads none of the file's settings)",
                path.display()
            );
        }
    }
    Ok(found)
}
