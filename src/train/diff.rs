//! `host diff MODEL_A MODEL_B --data FILE`: what training changed, token by token. Each
//! completion token's log-prob under both models (as the reference log-probs are computed),
//! the difference B − A, the tokens that moved most with their context, and the mean change
//! by position relative to the first token where chosen and rejected differ — where DPO's
//! failure mode shows on low edit-distance pairs. A token-level form of model diffing
//! (Boughorbel et al. 2025, "Beyond the Leaderboard", on a SimPO-tuned Gemma-2-9B).

use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use super::reference::{RefRow, compute_ref_rows, frozen_model_and_pairs};
use crate::data::{Example, TextTokenizer, Truncation};

/// Offsets from the first difference shown one by one; the rest are pooled.
const OFFSETS: std::ops::RangeInclusive<i64> = -4..=8;

pub struct DiffJob<'a> {
    pub model_a: &'a Path,
    pub model_b: &'a Path,
    pub data: &'a Path,
    pub batch_size: usize,
    pub limits: Truncation,
    pub prompt_special_tokens: bool,
    pub chat_template: Option<&'a str>,
    /// How many of the most-changed tokens to list.
    pub top: usize,
}

/// Per-token log-prob changes of one data row's completions.
#[derive(Serialize, Deserialize)]
pub struct RowDiff {
    pub line: usize,
    /// Index (in completion tokens) of the first token where chosen and rejected differ.
    pub first_difference: Option<usize>,
    /// B − A for each completion token (EOS included).
    pub chosen: Vec<f32>,
    pub rejected: Vec<f32>,
}

/// The mean change of the tokens at one offset from the first difference.
#[derive(Serialize, Deserialize)]
pub struct PositionSummary {
    /// "-4" .. "8", or "earlier" / "later" for the pooled rest.
    pub offset: String,
    pub chosen_mean: Option<f64>,
    pub chosen_tokens: usize,
    pub rejected_mean: Option<f64>,
    pub rejected_tokens: usize,
}

/// One of the tokens that moved most.
#[derive(Serialize, Deserialize)]
pub struct TokenChange {
    pub line: usize,
    /// "chosen" or "rejected".
    pub completion: String,
    pub position: usize,
    pub token: String,
    /// Up to 8 tokens before it (prompt included), decoded.
    pub context: String,
    pub logp_a: f32,
    pub logp_b: f32,
    pub delta: f32,
}

/// What `host diff` writes; `host dashboard --diff` reads it back.
#[derive(Serialize, Deserialize)]
pub struct DiffReport {
    pub model_a: String,
    pub model_b: String,
    pub data: String,
    pub rows: usize,
    /// Mean over rows of the summed completion log-prob change, chosen and rejected.
    pub mean_chosen_change: f64,
    pub mean_rejected_change: f64,
    pub by_position: Vec<PositionSummary>,
    pub largest: Vec<TokenChange>,
    pub per_row: Vec<RowDiff>,
}

/// Scores `data` under both models and compares. The models must share a tokenizer.
pub fn diff(job: &DiffJob) -> Result<DiffReport> {
    let (tokenizer_a, tokenizer_b) = (job.model_a.join("tokenizer.json"), job.model_b.join("tokenizer.json"));
    let read = |p: &Path| std::fs::read(p).with_context(|| format!("{}: cannot read", p.display()));
    if read(&tokenizer_a)? != read(&tokenizer_b)? {
        bail!("{} and {} differ: token-level changes need one tokenizer", tokenizer_a.display(), tokenizer_b.display());
    }
    let device = crate::backend::backend_device("cpu")?;
    let score = |dir: &Path| {
        frozen_model_and_pairs(dir, job.data, job.limits, job.prompt_special_tokens, job.chat_template, &device)
    };
    let (model_a, tokenizer, examples) = score(job.model_a)?;
    let rows_a = compute_ref_rows(&model_a, &examples, tokenizer.pad_id, job.batch_size, true, &device);
    drop(model_a);
    let (model_b, _, examples_b) = score(job.model_b)?;
    // One tokenizer, but each config.json decides the EOS appended and caps max_length by
    // its position limit: the rows are compared as tokenized, not assumed equal.
    let same = |x: &Example, y: &Example| (&x.prompt, &x.chosen, &x.rejected) == (&y.prompt, &y.chosen, &y.rejected);
    if examples_b.len() != examples.len() || !examples.iter().zip(&examples_b).all(|(x, y)| same(x, y)) {
        bail!(
            "{}: the rows tokenize differently under {}'s and {}'s config.json (their EOS ids or position limits differ; a lower --max-length may help)",
            job.data.display(),
            job.model_a.display(),
            job.model_b.display()
        );
    }
    let rows_b = compute_ref_rows(&model_b, &examples, tokenizer.pad_id, job.batch_size, true, &device);
    let per_row: Vec<RowDiff> =
        examples.iter().zip(rows_a.iter().zip(&rows_b)).map(|(e, (a, b))| row_diff(e, a, b)).collect();
    let n = per_row.len().max(1) as f64;
    Ok(DiffReport {
        model_a: job.model_a.display().to_string(),
        model_b: job.model_b.display().to_string(),
        data: job.data.display().to_string(),
        rows: per_row.len(),
        mean_chosen_change: per_row.iter().map(|r| r.chosen.iter().map(|&d| d as f64).sum::<f64>()).sum::<f64>() / n,
        mean_rejected_change: per_row.iter().map(|r| r.rejected.iter().map(|&d| d as f64).sum::<f64>()).sum::<f64>()
            / n,
        by_position: by_position(&per_row),
        largest: largest(&examples, &rows_a, &rows_b, &tokenizer, job.top),
        per_row,
    })
}

fn row_diff(example: &Example, a: &RefRow, b: &RefRow) -> RowDiff {
    let delta = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(a, b)| b - a).collect();
    RowDiff {
        line: example.line,
        first_difference: example.first_difference(),
        chosen: delta(&a.chosen_token_logps, &b.chosen_token_logps),
        rejected: delta(&a.rejected_token_logps, &b.rejected_token_logps),
    }
}

/// The bucket of completion token `position` in a row whose completions first differ at
/// `first`: its offset if within `OFFSETS`, else "earlier"/"later".
pub fn offset_bucket(position: usize, first: usize) -> String {
    let offset = position as i64 - first as i64;
    if offset < *OFFSETS.start() {
        "earlier".into()
    } else if offset > *OFFSETS.end() {
        "later".into()
    } else {
        offset.to_string()
    }
}

fn by_position(rows: &[RowDiff]) -> Vec<PositionSummary> {
    let mut names = vec!["earlier".to_string()];
    names.extend(OFFSETS.map(|o| o.to_string()));
    names.push("later".into());
    let mean = |sum: f64, count: usize| (count > 0).then(|| sum / count as f64);
    names
        .into_iter()
        .map(|name| {
            let (mut sums, mut counts) = ([0.0f64; 2], [0usize; 2]);
            for row in rows {
                let Some(first) = row.first_difference else { continue };
                for (side, deltas) in [&row.chosen, &row.rejected].into_iter().enumerate() {
                    for (position, &d) in deltas.iter().enumerate() {
                        if offset_bucket(position, first) == name {
                            sums[side] += d as f64;
                            counts[side] += 1;
                        }
                    }
                }
            }
            PositionSummary {
                chosen_mean: mean(sums[0], counts[0]),
                chosen_tokens: counts[0],
                rejected_mean: mean(sums[1], counts[1]),
                rejected_tokens: counts[1],
                offset: name,
            }
        })
        .collect()
}

fn largest(
    examples: &[Example],
    rows_a: &[RefRow],
    rows_b: &[RefRow],
    tokenizer: &TextTokenizer,
    top: usize,
) -> Vec<TokenChange> {
    let mut all: Vec<(f32, usize, bool, usize)> = Vec::new(); // (|delta|, row, chosen?, position)
    for (i, (a, b)) in rows_a.iter().zip(rows_b).enumerate() {
        for (chosen, (ta, tb)) in [
            (true, (&a.chosen_token_logps, &b.chosen_token_logps)),
            (false, (&a.rejected_token_logps, &b.rejected_token_logps)),
        ] {
            all.extend(ta.iter().zip(tb).enumerate().map(|(p, (x, y))| ((y - x).abs(), i, chosen, p)));
        }
    }
    // Largest first; ties in data order, so the list is the same run to run.
    all.sort_by(|x, y| y.0.total_cmp(&x.0).then((x.1, !x.2, x.3).cmp(&(y.1, !y.2, y.3))));
    all.into_iter()
        .take(top)
        .map(|(_, i, chosen, position)| {
            let e = &examples[i];
            let completion = if chosen { &e.chosen } else { &e.rejected };
            let (a, b) = if chosen {
                (&rows_a[i].chosen_token_logps, &rows_b[i].chosen_token_logps)
            } else {
                (&rows_a[i].rejected_token_logps, &rows_b[i].rejected_token_logps)
            };
            let sequence: Vec<u32> = e.prompt.iter().chain(completion.iter()).copied().collect();
            let at = e.prompt.len() + position;
            TokenChange {
                line: e.line,
                completion: if chosen { "chosen" } else { "rejected" }.to_string(),
                position,
                token: tokenizer.decode(&sequence[at..at + 1]),
                context: tokenizer.decode(&sequence[at.saturating_sub(8)..at]),
                logp_a: a[position],
                logp_b: b[position],
                delta: b[position] - a[position],
            }
        })
        .collect()
}

impl DiffReport {
    /// Writes the report as JSON to a temp file beside `out`, then renames it into place.
    pub fn write(&self, out: &Path) -> Result<()> {
        let tmp = out.with_extension("json.partial");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, out).with_context(|| format!("cannot rename {} to {}", tmp.display(), out.display()))
    }

    /// The summary for the console: the mean changes, by position, and the top tokens.
    pub fn describe(&self, shown: usize) -> String {
        let mut text = format!(
            "{} rows of {}: summed log-prob change B − A, mean over rows: chosen {:+.4}, rejected {:+.4}\n\nby offset from the first chosen/rejected difference (mean per token):\n",
            self.rows, self.data, self.mean_chosen_change, self.mean_rejected_change
        );
        let show = |m: Option<f64>| m.map(|v| format!("{v:+.4}")).unwrap_or_else(|| "-".into());
        for p in &self.by_position {
            text += &format!(
                "  {:>7}  chosen {:>8} ({:>5} tokens)  rejected {:>8} ({:>5} tokens)\n",
                p.offset,
                show(p.chosen_mean),
                p.chosen_tokens,
                show(p.rejected_mean),
                p.rejected_tokens
            );
        }
        text += "\nlargest changes:\n";
        for t in self.largest.iter().take(shown) {
            text += &format!(
                "  line {:>5} {:<8} token {:>3} {:?} after {:?}: {:+.4} ({:.4} → {:.4})\n",
                t.line, t.completion, t.position, t.token, t.context, t.delta, t.logp_a, t.logp_b
            );
        }
        text
    }
}
