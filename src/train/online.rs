//! Online rounds (`online: #{ ... }` in the config), after TRL's OnlineDPOTrainer: at the
//! first step of each round the current policy samples `samples_per_prompt` completions of
//! the round's prompts, the script's reward scores them (hot-reloaded like the loss, and
//! falling back to the previous script version when it fails), and each prompt whose best
//! and worst scores differ gives one pair, best as chosen and worst as rejected. The round's
//! pairs are what the sampler serves for `every` steps; the reference stays the starting
//! model.
//!
//! A round is a pure function of (run seed, round, policy at the round's start): its prompts
//! come from a seeded shuffle of the prompts file and token t of sample k of the round's
//! prompt i is drawn with `uniform(round seed, i, k, t)`. Its samples and pairs are written
//! to `RUN_DIR/online/round-NNNN.{samples,pairs}.jsonl` (each to a `.partial` file renamed
//! into place) before it trains, so a run resumed from a checkpoint in the middle of a round
//! reads that round's pairs back instead of sampling from a policy that has moved on.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::config::{OnlineConfig, TrainConfig};
use super::metrics::MetricsLog;
use super::reload::{CallSite, Scripts};
use crate::console;
use crate::data::prompts::{PromptRow, load_prompts};
use crate::data::{Example, TextTokenizer, Truncation};
use crate::model::Llama;
use crate::model::generate::sample;
use crate::model::sampling::{SamplingSettings, stop_ids};
use crate::rng::SplitMix64;
use crate::script::ScriptHost;
use crate::script::reward::{Sample, score};

/// Rows decoded together while sampling (rows of equal prompt length share a KV cache).
const DECODE_BATCH: usize = 64;

/// The prompts of an online run and how its rounds sample them.
pub struct Online {
    pub config: OnlineConfig,
    prompts: Vec<PromptRow>,
    /// Each prompt as the reward sees it: the text as written, or for a list of messages
    /// the rendered template (decoded).
    prompt_texts: Vec<String>,
    /// Ids that end a sample (the tokenizer's, config.json's, generation_config.json's).
    stop_ids: Vec<u32>,
    eos_id: u32,
    /// Prompts per round: every × batch_size × grad_accum unless set.
    per_round: usize,
    seed: u64,
    max_length: usize,
}

/// One sampled completion with its reward, as `round-NNNN.samples.jsonl` holds it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct ScoredSample {
    /// The prompt's index in the prompts file (0-based).
    pub prompt_index: usize,
    pub sample_index: usize,
    pub completion: String,
    /// The new tokens, without the stop token.
    pub completion_ids: Vec<u32>,
    /// Whether it ended at an EOS id.
    pub eos: bool,
    /// What the reward returned (none when the reward failed for the round).
    pub reward: Option<f64>,
    /// The reward less missing_eos_penalty when the sample has no EOS: what pairs are built from.
    pub score: Option<f64>,
}

/// One training pair of a round, as `round-NNNN.pairs.jsonl` holds it; the ids are what
/// the loss sees (a completion that ended at EOS keeps it, as training rows end with EOS).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct RoundPair {
    pub prompt_index: usize,
    pub chosen_sample: usize,
    pub rejected_sample: usize,
    pub chosen_score: f64,
    pub rejected_score: f64,
    pub chosen: String,
    pub rejected: String,
    pub prompt_ids: Vec<u32>,
    pub chosen_ids: Vec<u32>,
    pub rejected_ids: Vec<u32>,
}

/// A round's summary: the event `online_round` and the metrics it adds.
pub struct RoundStats {
    pub prompts: usize,
    pub samples: usize,
    pub pairs: usize,
    /// Mean reward over the samples (none when the reward failed).
    pub reward_mean: Option<f64>,
    /// Mean score (reward less the missing-EOS penalty): TRL's objective/scores.
    pub scores_mean: Option<f64>,
    /// Mean chosen − rejected score over the pairs: TRL's objective/scores_margin.
    pub scores_margin: Option<f64>,
    /// Share of samples that ended at EOS: TRL's val/contain_eos_token.
    pub contain_eos: f64,
}

impl Online {
    /// Loads and tokenizes the prompts file (errors name it and the row), cutting each prompt
    /// to max_prompt_length (its end kept, as training rows are cut).
    pub fn load(
        config: &TrainConfig,
        tokenizer: &TextTokenizer,
        max_positions: usize,
        limits: Truncation,
    ) -> Result<Self> {
        let online = config.online.clone().context("online rounds need an online config")?;
        let path = Path::new(&online.prompts);
        let mut prompts = load_prompts(path, tokenizer, max_positions).context("online.prompts")?;
        for row in &mut prompts {
            if row.tokens.len() > limits.max_prompt_length {
                row.tokens.drain(..row.tokens.len() - limits.max_prompt_length);
            }
            if row.tokens.len() >= limits.max_length {
                bail!("online.prompts: {}: the prompt alone fills max_length {}", row.at, limits.max_length);
            }
        }
        let prompt_texts = prompts
            .iter()
            .map(|p| p.prompt.as_str().map_or_else(|| tokenizer.decode(&p.tokens), str::to_string))
            .collect();
        let stop_ids = stop_ids(Path::new(&config.model), tokenizer)?;
        let per_round = online.prompts_per_round.unwrap_or(online.every * config.batch_size * config.grad_accum);
        Ok(Self {
            config: online,
            prompts,
            prompt_texts,
            stop_ids,
            eos_id: tokenizer.eos_id,
            per_round,
            seed: config.seed,
            max_length: limits.max_length,
        })
    }

    /// Prompts in the prompts file.
    pub fn prompt_count(&self) -> usize {
        self.prompts.len()
    }

    /// Whether a round starts at `step`.
    pub fn starts_round(&self, step: usize) -> bool {
        step.is_multiple_of(self.config.every)
    }

    /// The round `step` belongs to.
    pub fn round_of(&self, step: usize) -> usize {
        step / self.config.every
    }

    /// Indices into the prompts file of round `round`'s prompts: positions round·K to
    /// (round + 1)·K of a sequence of shuffles of the file (one per pass, seeded by the run's
    /// seed), so the rounds go through the prompts before any comes again.
    pub fn round_prompts(&self, round: usize) -> Vec<usize> {
        let n = self.prompts.len();
        let mut rng = SplitMix64::new(self.seed ^ 0x6f6e_6c69_6e65_0000);
        let mut order: Vec<usize> = (0..n).collect();
        rng.shuffle(&mut order);
        let start = round * self.per_round;
        for _ in 0..start / n {
            rng.shuffle(&mut order);
        }
        let mut picked = Vec::with_capacity(self.per_round);
        let mut at = start % n;
        while picked.len() < self.per_round {
            if at == n {
                rng.shuffle(&mut order);
                at = 0;
            }
            picked.push(order[at]);
            at += 1;
        }
        picked
    }

    /// The seed of round `round`'s draws: SplitMix64 of (run seed, round).
    pub fn round_seed(&self, round: usize) -> u64 {
        SplitMix64::new(self.seed ^ (round as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)).next_u64()
    }

    /// Samples round `round` from `policy` (plain device), scores it with the script's
    /// reward, builds its pairs, writes its files and logs it. A reward that fails with no
    /// earlier version to go back to leaves the round without pairs; the run goes on.
    pub fn run_round(
        &self,
        policy: &Llama,
        tokenizer: &TextTokenizer,
        host: &ScriptHost,
        scripts: &mut Scripts,
        at: CallSite,
        run_dir: &Path,
    ) -> Result<(Vec<Example>, RoundStats)> {
        let CallSite { step, config, log } = at;
        let round = self.round_of(step);
        let picked = self.round_prompts(round);
        let tokens: Vec<Vec<u32>> = picked.iter().map(|&i| self.prompts[i].tokens.clone()).collect();
        let settings = SamplingSettings {
            temperature: self.config.temperature as f32,
            top_k: self.config.top_k,
            top_p: self.config.top_p as f32,
            // As TRL's online DPO, whose generation config sets no repetition penalty.
            repetition_penalty: 1.0,
            max_new_tokens: self.config.max_new_tokens,
            seed: self.round_seed(round),
        };
        let n = self.config.samples_per_prompt;
        let drawn = sample(policy, &tokens, n, &settings, &self.stop_ids, DECODE_BATCH)
            .with_context(|| format!("online round {round}: sampling"))?;
        let mut samples: Vec<ScoredSample> = drawn
            .into_iter()
            .map(|s| ScoredSample {
                prompt_index: picked[s.prompt],
                sample_index: s.sample,
                completion: tokenizer.decode(&s.completion.tokens),
                completion_ids: s.completion.tokens,
                eos: s.completion.eos,
                reward: None,
                score: None,
            })
            .collect();
        let to_score: Vec<Sample> = samples
            .iter()
            .map(|s| Sample {
                prompt: &self.prompt_texts[s.prompt_index],
                completion: &s.completion,
                row: &self.prompts[s.prompt_index].row,
            })
            .collect();
        let rewards = scripts.call_with_fallback(CallSite { step, config, log: &mut *log }, "reward", |version, _| {
            score(host, version, &to_score).map_err(|e| e.to_string())
        });
        match rewards {
            Ok(rewards) => {
                let penalty = self.config.missing_eos_penalty.unwrap_or(0.0);
                for (s, reward) in samples.iter_mut().zip(rewards) {
                    s.reward = Some(reward);
                    // TRL's missing_eos_penalty: taken off the score of a completion without EOS.
                    s.score = Some(if s.eos { reward } else { reward - penalty });
                }
            }
            Err(error) => {
                console::line(&format!(
                    "online round {round} at step {step}: no rewards, the round trains nothing (run goes on):\n{error:#}"
                ));
                log.event(step, "reward_failed", json!({"round": round, "error": format!("{error:#}")}))?;
            }
        }
        let pairs = self.best_vs_worst(&samples, n);
        let folder = run_dir.join("online");
        std::fs::create_dir_all(&folder).with_context(|| format!("cannot create {}", folder.display()))?;
        super::reference::write_jsonl(None, &samples, &round_file(run_dir, round, "samples"))?;
        super::reference::write_jsonl(None, &pairs, &round_file(run_dir, round, "pairs"))?;
        let stats = round_stats(&samples, &pairs, picked.len());
        Ok((pairs.iter().map(example).collect(), stats))
    }

    /// One pair per prompt: its highest-scoring sample as chosen, its lowest as rejected (the
    /// first of equal ones); a prompt whose samples all score the same gives none. TRL pairs
    /// its two samples as first ≥ second, so a tie there still makes a pair; with an
    /// exact-answer reward a tie says nothing about which is better.
    fn best_vs_worst(&self, samples: &[ScoredSample], n: usize) -> Vec<RoundPair> {
        let mut pairs = Vec::new();
        for group in samples.chunks(n) {
            let scored = group.iter().enumerate().filter_map(|(i, s)| s.score.map(|x| (i, x)));
            // Strict comparisons keep the first of equal scores.
            let best = scored.clone().reduce(|a, b| if b.1 > a.1 { b } else { a });
            let worst = scored.reduce(|a, b| if b.1 < a.1 { b } else { a });
            let (Some((best, high)), Some((worst, low))) = (best, worst) else { continue };
            if high == low {
                continue;
            }
            let (chosen, rejected) = (&group[best], &group[worst]);
            let prompt_ids = self.prompts[chosen.prompt_index].tokens.clone();
            let room = self.max_length - prompt_ids.len();
            let target = |s: &ScoredSample| {
                let mut ids = s.completion_ids.clone();
                if s.eos {
                    ids.push(self.eos_id);
                }
                ids.truncate(room);
                ids
            };
            pairs.push(RoundPair {
                prompt_index: chosen.prompt_index,
                chosen_sample: chosen.sample_index,
                rejected_sample: rejected.sample_index,
                chosen_score: high,
                rejected_score: low,
                chosen: chosen.completion.clone(),
                rejected: rejected.completion.clone(),
                chosen_ids: target(chosen),
                rejected_ids: target(rejected),
                prompt_ids,
            });
        }
        pairs
    }
}

/// `RUN_DIR/online/round-NNNN.{kind}.jsonl`.
pub fn round_file(run_dir: &Path, round: usize, kind: &str) -> PathBuf {
    run_dir.join("online").join(format!("round-{round:04}.{kind}.jsonl"))
}

/// The pairs of round `round` as its file holds them (a resume in the middle of a round).
pub fn read_round_pairs(run_dir: &Path, round: usize) -> Result<Vec<Example>> {
    let path = round_file(run_dir, round, "pairs");
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!("{}: cannot read the pairs of round {round}, which the checkpoint is in the middle of", path.display())
    })?;
    text.lines()
        .enumerate()
        .map(|(i, line)| {
            serde_json::from_str::<RoundPair>(line)
                .map(|p| example(&p))
                .map_err(|e| anyhow!("{}:{}: {e}", path.display(), i + 1))
        })
        .collect()
}

fn example(pair: &RoundPair) -> Example {
    Example {
        prompt: pair.prompt_ids.clone(),
        chosen: pair.chosen_ids.clone(),
        rejected: pair.rejected_ids.clone(),
        line: pair.prompt_index + 1,
        label: None,
    }
}

fn round_stats(samples: &[ScoredSample], pairs: &[RoundPair], prompts: usize) -> RoundStats {
    let mean = |values: Vec<f64>| (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64);
    RoundStats {
        prompts,
        samples: samples.len(),
        pairs: pairs.len(),
        reward_mean: mean(samples.iter().filter_map(|s| s.reward).collect()),
        scores_mean: mean(samples.iter().filter_map(|s| s.score).collect()),
        scores_margin: mean(pairs.iter().map(|p| p.chosen_score - p.rejected_score).collect()),
        contain_eos: samples.iter().filter(|s| s.eos).count() as f64 / samples.len().max(1) as f64,
    }
}

impl RoundStats {
    /// Adds the round's metrics to the log interval it starts in (TRL's names where TRL
    /// logs the same quantity) and logs an `online_round` event at the first step it trains.
    pub fn log(&self, log: &mut MetricsLog, round: usize, step: usize) -> Result<()> {
        let usable = self.pairs as f64 / self.prompts.max(1) as f64;
        log.add("online/usable_pairs", usable);
        log.add("val/contain_eos_token", self.contain_eos);
        for (name, value) in [
            ("online/reward_mean", self.reward_mean),
            ("objective/scores", self.scores_mean),
            ("objective/scores_margin", self.scores_margin),
        ] {
            if let Some(value) = value {
                log.add(name, value);
            }
        }
        console::line(&format!(
            "online round {round}: {} prompts, {} samples, reward mean {}, {} pairs ({:.0}% of prompts)",
            self.prompts,
            self.samples,
            self.reward_mean.map_or("-".to_string(), |r| format!("{r:.3}")),
            self.pairs,
            100.0 * usable
        ));
        log.event(
            step + 1,
            "online_round",
            json!({
                "round": round, "prompts": self.prompts, "samples": self.samples, "pairs": self.pairs,
                "online/reward_mean": self.reward_mean, "online/usable_pairs": usable, "objective/scores": self.scores_mean,
                "objective/scores_margin": self.scores_margin, "val/contain_eos_token": self.contain_eos,
            }),
        )
    }
}
