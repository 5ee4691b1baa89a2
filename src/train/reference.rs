//! Reference log-probs computed once and reused (TRL's precompute_ref_log_probs): `host
//! logps` writes one JSON line per data row; a run with `ref_logps` reads them instead of
//! keeping a second, frozen model in memory and running it every step. A large data set can
//! be split over machines (`--shard K/N`), each shard file headed by what it covers and what
//! it was computed from, and merged into the one-pass file (`--merge`).

use std::collections::HashMap;
use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burn::tensor::{Device, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use super::logps::{packed_pair_logps, token_logps};
use crate::data::packed::PackedLayout;
use crate::data::{Example, collate_pairs};
use crate::files::{hash_file, hex};
use crate::model::Llama;
use crate::tensor::values;

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
pub fn compute_ref_rows(
    model: &Llama,
    examples: &[Example],
    pad_id: u32,
    batch_size: usize,
    prefix_sharing: bool,
    device: &Device,
) -> Vec<RefRow> {
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
    write_jsonl(None, rows, out)
}

/// JSONL, optionally headed by a shard header, written to a temp file beside `out`, fsynced
/// and renamed into place: a crash leaves the old file or none, never a half-written one.
pub(crate) fn write_jsonl<'a, R: Serialize + 'a>(
    header: Option<&ShardHeader>,
    rows: impl IntoIterator<Item = &'a R>,
    out: &Path,
) -> Result<()> {
    let mut name = out.file_name().with_context(|| format!("{}: not a file name", out.display()))?.to_os_string();
    name.push(".partial");
    let tmp = out.with_file_name(name);
    let write = || -> Result<()> {
        let mut file = std::io::BufWriter::new(
            std::fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?,
        );
        if let Some(header) = header {
            serde_json::to_writer(&mut file, &serde_json::json!({ SHARD_KEY: header }))?;
            file.write_all(b"\n")?;
        }
        for row in rows {
            serde_json::to_writer(&mut file, row)?;
            file.write_all(b"\n")?;
        }
        file.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        std::fs::rename(&tmp, out).with_context(|| format!("cannot write {}", out.display()))
    };
    let written = write();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp); // a failed write leaves no partial file either
    }
    written.with_context(|| format!("{}: not written", out.display()))
}

/// The key of a shard file's first line.
const SHARD_KEY: &str = "host_logps_shard";

/// Part `index` of `count` of a data file's batches (0-based, as `host logps --shard K/N`).
/// Shards are contiguous runs of whole batches, so each batch holds the same rows as in one
/// pass, is computed the same way, and the merged shards equal the one-pass file byte for byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl std::str::FromStr for Shard {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("--shard takes K/N with 0 <= K < N (shard K of N, counted from 0), got \"{s}\"");
        let (k, n) = s.split_once('/').ok_or_else(bad)?;
        let (index, count): (usize, usize) =
            (k.trim().parse().map_err(|_| bad())?, n.trim().parse().map_err(|_| bad())?);
        if index >= count {
            return Err(bad());
        }
        Ok(Self { index, count })
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl Shard {
    /// The rows this shard covers: batches ⌊K·b/N⌋ .. ⌊(K+1)·b/N⌋ of the b batches of
    /// `batch_size` rows (a shard may be empty when there are fewer batches than shards).
    pub fn rows(&self, rows: usize, batch_size: usize) -> Range<usize> {
        let batch_size = batch_size.max(1);
        let batches = rows.div_ceil(batch_size);
        let batch_at = |k: usize| k * batches / self.count;
        (batch_at(self.index) * batch_size).min(rows)..(batch_at(self.index + 1) * batch_size).min(rows)
    }
}

/// What every shard of one sharded `host logps` run shares: shards that differ in any of it
/// are not parts of one file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LogpsSource {
    /// Preference rows loaded from the data file.
    pub data_rows: usize,
    pub data_sha256: String,
    /// Over the model folder's config, tokenizer, chat template and weight files.
    pub model_sha256: String,
    pub batch_size: usize,
    pub max_length: usize,
    pub max_prompt_length: usize,
    pub prompt_special_tokens: bool,
    /// The named chat template conversational rows were rendered with (none: the default).
    #[serde(default)]
    pub chat_template: Option<String>,
    pub backend: String,
}

/// A shard file's first line: which shard it is, the rows it holds, and its source.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ShardHeader {
    pub shard: Shard,
    /// Data rows [first_row, end_row) in load order.
    pub first_row: usize,
    pub end_row: usize,
    /// The data and model paths as given (for messages; identity is in `source`).
    pub data: String,
    pub model: String,
    pub source: LogpsSource,
}

fn file_sha256(path: &Path) -> Result<String> {
    let mut hasher = sha2::Sha256::default();
    hash_file(&mut hasher, path)?;
    Ok(hex(hasher))
}

/// The model folder's files that decide the log-probs (config, tokenizer, chat templates,
/// weights), by name and content: the same folder copied to other machines hashes the same.
fn model_sha256(dir: &Path) -> Result<String> {
    use sha2::Digest;
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .with_context(|| format!("{}: cannot list the model folder", dir.display()))?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.ends_with(".json") || n.ends_with(".jinja") || n.ends_with(".safetensors"))
        .collect();
    names.extend(crate::data::tokenizer::side_files(dir)?.into_iter().filter(|n| n.contains('/')));
    names.sort();
    let mut hasher = sha2::Sha256::default();
    for name in names {
        hasher.update(name.as_bytes());
        hasher.update([0]);
        hash_file(&mut hasher, &dir.join(&name))?;
    }
    Ok(hex(hasher))
}

/// One shard file read back: its header and rows.
struct ShardFile {
    path: PathBuf,
    header: ShardHeader,
    rows: Vec<RefRow>,
}

fn read_shard(path: &Path) -> Result<ShardFile> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let mut lines = text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty());
    let header = lines
        .next()
        .and_then(|(_, l)| serde_json::from_str::<serde_json::Value>(l).ok())
        .and_then(|mut v| v.get_mut(SHARD_KEY).map(serde_json::Value::take));
    let Some(header) = header else {
        bail!(
            "{}:1: not a shard file (no {SHARD_KEY} header; write shards with host logps --shard K/N)",
            path.display()
        );
    };
    let header: ShardHeader =
        serde_json::from_value(header).map_err(|e| anyhow::anyhow!("{}:1: {SHARD_KEY}: {e}", path.display()))?;
    let rows: Vec<RefRow> = lines
        .map(|(i, l)| serde_json::from_str(l).map_err(|e| anyhow::anyhow!("{}:{}: {e}", path.display(), i + 1)))
        .collect::<Result<_>>()?;
    let want = header.shard.rows(header.source.data_rows, header.source.batch_size);
    if (header.first_row..header.end_row) != want {
        bail!(
            "{}:1: rows {}..{} in the header, but shard {} of {} rows in batches of {} covers rows {}..{}",
            path.display(),
            header.first_row,
            header.end_row,
            header.shard,
            header.source.data_rows,
            header.source.batch_size,
            want.start,
            want.end
        );
    }
    if rows.len() != want.len() {
        bail!(
            "{}: holds {} rows, its header says {} (rows {}..{})",
            path.display(),
            rows.len(),
            want.len(),
            want.start,
            want.end
        );
    }
    Ok(ShardFile { path: path.to_path_buf(), header, rows })
}

/// `host logps --merge`: checks that `shards` are every shard of one sharded run, once each,
/// and writes their rows in data order to `out`, exactly as the one-pass `host logps` would
/// have written them. Returns the number of rows.
pub fn merge_shards(shards: &[PathBuf], out: &Path) -> Result<usize> {
    for shard in shards {
        if out.canonicalize().ok().is_some_and(|o| shard.canonicalize().ok() == Some(o)) {
            bail!("{}: the output would overwrite a shard", out.display());
        }
    }
    let files: Vec<ShardFile> = shards.iter().map(|p| read_shard(p)).collect::<Result<_>>()?;
    let Some(first) = files.first() else { bail!("host logps --merge: no shard files given") };
    let count = first.header.shard.count;
    let fields = |h: &ShardHeader| -> serde_json::Map<String, serde_json::Value> {
        let mut map = match serde_json::to_value(&h.source) {
            Ok(serde_json::Value::Object(map)) => map,
            _ => unreachable!("LogpsSource serialises to a map"),
        };
        map.insert("shard count".into(), h.shard.count.into());
        map
    };
    let reference = fields(&first.header);
    let mut by_index: Vec<Option<&ShardFile>> = vec![None; count];
    for file in &files {
        for (key, value) in fields(&file.header) {
            if reference[&key] != value {
                bail!(
                    "{}: {key} is {value}, but {}'s is {} (shards of different data or settings; rerun them alike)",
                    file.path.display(),
                    first.path.display(),
                    reference[&key]
                );
            }
        }
        let slot = &mut by_index[file.header.shard.index];
        if let Some(earlier) = slot {
            bail!(
                "{} and {} are both shard {} (overlapping shards; give each shard once)",
                earlier.path.display(),
                file.path.display(),
                file.header.shard
            );
        }
        *slot = Some(file);
    }
    let missing: Vec<String> = (0..count).filter(|k| by_index[*k].is_none()).map(|k| format!("{k}/{count}")).collect();
    if !missing.is_empty() {
        bail!(
            "shard {} missing: {} file(s) given ({}) of {count}",
            missing.join(", "),
            files.len(),
            files.iter().map(|f| format!("{} is {}", f.path.display(), f.header.shard)).collect::<Vec<_>>().join(", ")
        );
    }
    let rows: Vec<&RefRow> = by_index.iter().flatten().flat_map(|f| &f.rows).collect();
    write_jsonl(None, rows.iter().copied(), out)?;
    Ok(rows.len())
}

/// Reference log-probs read from a `host logps` file, checked against the training rows.
pub struct PrecomputedReference {
    rows: HashMap<usize, RefRow>,
}

impl PrecomputedReference {
    pub fn load(path: &Path, examples: &[Example]) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("{}: cannot read ref_logps", path.display()))?;
        let mut rows = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            if let Some(header) = serde_json::from_str::<serde_json::Value>(line)
                .ok()
                .and_then(|v| v.get(SHARD_KEY).map(|h| h["shard"].clone()))
            {
                bail!(
                    "{}:{}: this is one shard ({}/{}) of a sharded host logps run; merge all of them first: host logps --merge SHARD... --out FILE",
                    path.display(),
                    i + 1,
                    header["index"],
                    header["count"]
                );
            }
            let row: RefRow =
                serde_json::from_str(line).map_err(|e| anyhow::anyhow!("{}:{}: {e}", path.display(), i + 1))?;
            if row.chosen_token_logps.len() != row.chosen_tokens
                || row.rejected_token_logps.len() != row.rejected_tokens
            {
                bail!("{}:{}: token counts and per-token log-probs disagree", path.display(), i + 1);
            }
            rows.insert(row.line, row);
        }
        for e in examples {
            let Some(row) = rows.get(&e.line) else {
                bail!(
                    "{}: no reference log-probs for data row {} (run host logps on the same data)",
                    path.display(),
                    e.line
                );
            };
            if row.prompt_tokens != e.prompt.len() {
                bail!(
                    "{}: data row {} has a {}-token prompt, the file {} (written with another tokenizer, max_prompt_length or prompt_special_tokens?)",
                    path.display(),
                    e.line,
                    e.prompt.len(),
                    row.prompt_tokens
                );
            }
            if row.chosen_tokens != e.chosen.len() || row.rejected_tokens != e.rejected.len() {
                bail!(
                    "{}: data row {} has {}/{} chosen/rejected tokens, the file {}/{} (written for another tokenizer or max_length?)",
                    path.display(),
                    e.line,
                    e.chosen.len(),
                    e.rejected.len(),
                    row.chosen_tokens,
                    row.rejected_tokens
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

/// What `host logps` computes: the reference model, the data as a run will read it, and
/// optionally one shard of it.
pub struct LogpsJob<'a> {
    pub model_dir: &'a Path,
    pub data: &'a Path,
    pub out: &'a Path,
    pub batch_size: usize,
    pub limits: crate::data::Truncation,
    pub prompt_special_tokens: bool,
    /// A named chat template of the tokenizer folder (none: its default).
    pub chat_template: Option<&'a str>,
    pub backend: &'a str,
    pub shard: Option<Shard>,
}

/// A model folder loaded frozen (weights in their stored dtype), its tokenizer, and the
/// preference rows of `data` as a run with these settings reads them.
pub(crate) fn frozen_model_and_pairs(
    model_dir: &Path,
    data: &Path,
    limits: crate::data::Truncation,
    prompt_special_tokens: bool,
    chat_template: Option<&str>,
    device: &Device,
) -> Result<(Llama, crate::data::TextTokenizer, Vec<Example>)> {
    let (config, model) = crate::model::load_frozen_model(model_dir, device)?;
    let mut tokenizer = crate::data::TextTokenizer::load_with(
        &model_dir.join("tokenizer.json"),
        &config.eos_ids(),
        config.pad_token_id,
    )?;
    tokenizer.prompt_special_tokens = prompt_special_tokens;
    if let Some(name) = chat_template {
        tokenizer.use_chat_template(name)?;
    }
    let limits = crate::data::Truncation { max_length: limits.max_length.min(config.max_positions()), ..limits };
    let (examples, _) = crate::data::load_examples(data, &tokenizer, true, limits, false)?;
    Ok((model, tokenizer, examples))
}

/// `host logps`: loads the model and data as a run would, computes the reference
/// log-probs of every pair (or of one shard's pairs), and writes them to `out`. Returns the
/// number of rows written.
pub fn precompute(job: &LogpsJob) -> Result<usize> {
    let (model_dir, data, out) = (job.model_dir, job.data, job.out);
    if out.canonicalize().ok().is_some_and(|o| data.canonicalize().ok() == Some(o)) {
        bail!("{}: the output would overwrite the data", out.display());
    }
    let device = crate::backend::backend_device(job.backend)?;
    let (model, tokenizer, examples) =
        frozen_model_and_pairs(model_dir, data, job.limits, job.prompt_special_tokens, job.chat_template, &device)?;
    let Some(shard) = job.shard else {
        let rows = compute_ref_rows(&model, &examples, tokenizer.pad_id, job.batch_size, true, &device);
        write_ref_rows(&rows, out)?;
        return Ok(rows.len());
    };
    let source = LogpsSource {
        data_rows: examples.len(),
        data_sha256: file_sha256(data)?,
        model_sha256: model_sha256(model_dir)?,
        batch_size: job.batch_size.max(1),
        max_length: job.limits.max_length,
        max_prompt_length: job.limits.max_prompt_length,
        prompt_special_tokens: job.prompt_special_tokens,
        chat_template: job.chat_template.map(str::to_string),
        backend: job.backend.to_string(),
    };
    let range = shard.rows(examples.len(), source.batch_size);
    let rows = compute_ref_rows(&model, &examples[range.clone()], tokenizer.pad_id, source.batch_size, true, &device);
    let header = ShardHeader {
        shard,
        first_row: range.start,
        end_row: range.end,
        data: data.display().to_string(),
        model: model_dir.display().to_string(),
        source,
    };
    write_jsonl(Some(&header), &rows, out)?;
    Ok(rows.len())
}
