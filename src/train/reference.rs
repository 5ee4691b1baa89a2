//! Reference log-probs computed once and reused (TRL's precompute_ref_log_probs): `host
//! logps` writes one JSON line per data row; a run with `ref_logps` reads them instead of
//! keeping a second, frozen model in memory and running it every step.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result, bail};
use burn::tensor::{Device, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use super::logps::{packed_pair_logps, token_logps};
use crate::data::packed::PackedLayout;
use crate::data::{Example, collate_pairs};
use crate::model::{Llama, values};

/// One data row's reference log-probs (completion tokens only).
#[derive(Serialize, Deserialize)]
pub struct RefRow {
    /// The data file's line (row for Parquet) this belongs to.
    pub line: usize,
    /// The prompt's token count: the reference saw the completions after this many tokens.
    pub prompt_tokens: usize,
    pub chosen_logps: f32,
    pub rejected_logps: f32,
    pub chosen_tokens: usize,
    pub rejected_tokens: usize,
    pub chosen_token_logps: Vec<f32>,
    pub rejected_token_logps: Vec<f32>,
}

/// Per-token log-probs of each example's completions under `model`, batch by batch.
pub fn compute_ref_rows(model: &Llama, examples: &[Example], pad_id: u32, batch_size: usize, prefix_sharing: bool, device: &Device) -> Vec<RefRow> {
    let mut rows = Vec::with_capacity(examples.len());
    for chunk in examples.chunks(batch_size.max(1)) {
        let refs: Vec<&Example> = chunk.iter().collect();
        let batch = collate_pairs(&refs, pad_id, device);
        let tokens = if prefix_sharing {
            packed_pair_logps(model, &PackedLayout::new(&refs, pad_id, true), batch.mask.clone())
        } else {
            token_logps(model, &batch)
        };
        let [_, width] = tokens.dims();
        let flat = values(tokens);
        let b = chunk.len();
        let completion = |row: usize, e: &Example, len: usize| {
            let start = row * width + e.prompt.len() - 1;
            flat[start..start + len].to_vec()
        };
        for (i, e) in chunk.iter().enumerate() {
            let chosen = completion(i, e, e.chosen.len());
            let rejected = completion(b + i, e, e.rejected.len());
            rows.push(RefRow {
                line: e.line,
                prompt_tokens: e.prompt.len(),
                chosen_logps: chosen.iter().sum(),
                rejected_logps: rejected.iter().sum(),
                chosen_tokens: chosen.len(),
                rejected_tokens: rejected.len(),
                chosen_token_logps: chosen,
                rejected_token_logps: rejected,
            });
        }
    }
    rows
}

/// Writes the rows as JSONL, atomically (a temp file renamed into place).
pub fn write_ref_rows(rows: &[RefRow], out: &Path) -> Result<()> {
    let tmp = out.with_extension("jsonl.partial");
    let mut file = std::io::BufWriter::new(std::fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?);
    for row in rows {
        serde_json::to_writer(&mut file, row)?;
        file.write_all(b"\n")?;
    }
    file.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    std::fs::rename(&tmp, out).with_context(|| format!("cannot write {}", out.display()))
}

/// Reference log-probs read from a `host logps` file, checked against the training rows.
pub struct PrecomputedReference {
    rows: HashMap<usize, RefRow>,
}

impl PrecomputedReference {
    pub fn load(path: &Path, examples: &[Example]) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read ref_logps", path.display()))?;
        let mut rows = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let row: RefRow = serde_json::from_str(line).map_err(|e| anyhow::anyhow!("{}:{}: {e}", path.display(), i + 1))?;
            if row.chosen_token_logps.len() != row.chosen_tokens || row.rejected_token_logps.len() != row.rejected_tokens {
                bail!("{}:{}: token counts and per-token log-probs disagree", path.display(), i + 1);
            }
            rows.insert(row.line, row);
        }
        for e in examples {
            let Some(row) = rows.get(&e.line) else {
                bail!("{}: no reference log-probs for data row {} (run host logps on the same data)", path.display(), e.line);
            };
            if row.prompt_tokens != e.prompt.len() {
                bail!(
                    "{}: data row {} has a {}-token prompt, the file {} (written with another tokenizer, max_prompt_length or prompt_special_tokens?)",
                    path.display(), e.line, e.prompt.len(), row.prompt_tokens
                );
            }
            if row.chosen_tokens != e.chosen.len() || row.rejected_tokens != e.rejected.len() {
                bail!(
                    "{}: data row {} has {}/{} chosen/rejected tokens, the file {}/{} (written for another tokenizer or max_length?)",
                    path.display(), e.line, e.chosen.len(), e.rejected.len(), row.chosen_tokens, row.rejected_tokens
                );
            }
        }
        Ok(Self { rows })
    }

    /// [2B, W] per-token reference log-probs laid out as `collate_pairs` lays out the batch.
    pub fn token_logps(&self, examples: &[&Example], width: usize, device: &Device) -> Tensor<2> {
        let b = examples.len();
        let mut out = vec![0f32; 2 * b * width];
        for (i, e) in examples.iter().enumerate() {
            let row = &self.rows[&e.line];
            let start = e.prompt.len() - 1;
            out[i * width + start..][..row.chosen_tokens].copy_from_slice(&row.chosen_token_logps);
            out[(b + i) * width + start..][..row.rejected_tokens].copy_from_slice(&row.rejected_token_logps);
        }
        Tensor::from_data(TensorData::new(out, [2 * b, width]), device)
    }
}

/// `host logps`: loads the model and data as a run would, computes the reference
/// log-probs of every pair, and writes them to `out`. Returns the number of rows.
pub fn precompute(model_dir: &Path, data: &Path, out: &Path, batch_size: usize, limits: crate::data::Truncation, prompt_special_tokens: bool, device: &Device) -> Result<usize> {
    if out.canonicalize().ok().is_some_and(|o| data.canonicalize().ok() == Some(o)) {
        bail!("{}: the output would overwrite the data", out.display());
    }
    let (config, model) = crate::model::load_frozen_model(model_dir, device)?;
    let mut tokenizer = crate::data::TextTokenizer::load_with(&model_dir.join("tokenizer.json"), &config.eos_ids(), config.pad_token_id)?;
    tokenizer.prompt_special_tokens = prompt_special_tokens;
    let limits = crate::data::Truncation { max_length: limits.max_length.min(config.max_positions()), ..limits };
    let (examples, _) = crate::data::load_examples(data, &tokenizer, true, limits, false)?;
    let rows = compute_ref_rows(&model, &examples, tokenizer.pad_id, batch_size, true, device);
    write_ref_rows(&rows, out)?;
    Ok(rows.len())
}
