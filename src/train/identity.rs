//! What a run was made from: fingerprints of its data file, held-out evaluation data,
//! model weights, model config, tokenizer files and `ref_logps`, recorded in `identity.json` when the run starts, so
//! that `--resume` onto edited data or another model is refused instead of silently
//! training on other inputs in the same order.

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use sha2::Digest;

use super::config::{Init, TrainConfig};
use crate::files::hex;

pub const IDENTITY_FILE: &str = "identity.json";
/// The role of the held-out evaluation data (`heldout.data`).
const HELDOUT: &str = "heldout data";

/// Weight files up to this size are hashed whole; larger ones by their header and
/// `SAMPLES` evenly spaced chunks, so that a multi-GB model takes milliseconds, not minutes.
const CHUNK: u64 = 64 * 1024;
const SAMPLES: u64 = 64;

/// One input file: its size and a SHA-256 (of all of it, or of a sample: `sampled`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Fingerprint {
    /// The path as the config gave it (for messages; identity is size + hash).
    pub path: String,
    pub size: u64,
    pub sha256: String,
    /// The hash covers the safetensors header, the size and a fixed sample of the bytes.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub sampled: bool,
}

/// Input role ("data", "weights model.safetensors", "tokenizer tokenizer.json", ...) →
/// its fingerprint. A BTreeMap so the file reads the same each time.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RunIdentity {
    pub inputs: BTreeMap<String, Fingerprint>,
}

/// The whole file: data files, configs and tokenizers are small to medium, and SHA-256
/// takes a few seconds per GB, little next to tokenizing the data, which a run start
/// does anyway.
pub fn whole(path: &Path) -> Result<Fingerprint> {
    let (size, sha256) = crate::files::sha256_file(path)?;
    Ok(Fingerprint { path: path.display().to_string(), size, sha256, sampled: false })
}

/// A safetensors file: hashed whole when small; otherwise its size, its header (every
/// tensor's name, dtype, shape and offsets) and `SAMPLES` chunks of `CHUNK` bytes at
/// evenly spaced offsets. A change confined to unsampled bytes goes unseen: a fine-tune
/// or another model changes the header or nearly every chunk, which is what this is for.
fn weights(path: &Path) -> Result<Fingerprint> {
    let handle = std::fs::File::open(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let size = handle.metadata().with_context(|| format!("{}: cannot read", path.display()))?.len();
    if size <= CHUNK * SAMPLES {
        return whole(path);
    }
    let mut hasher = sha2::Sha256::default();
    hasher.update(size.to_le_bytes());
    let mut len_bytes = [0u8; 8];
    handle
        .read_exact_at(&mut len_bytes, 0)
        .with_context(|| format!("{}: cannot read its header length", path.display()))?;
    let header_len = u64::from_le_bytes(len_bytes).min(size - 8);
    let mut header = vec![0u8; header_len as usize];
    handle.read_exact_at(&mut header, 8).with_context(|| format!("{}: cannot read its header", path.display()))?;
    hasher.update(len_bytes);
    hasher.update(&header);
    let mut chunk = vec![0u8; CHUNK as usize];
    for k in 0..SAMPLES {
        let at = k * (size - CHUNK) / (SAMPLES - 1);
        handle
            .read_exact_at(&mut chunk, at)
            .with_context(|| format!("{}: cannot read bytes at {at}", path.display()))?;
        hasher.update(&chunk);
    }
    Ok(Fingerprint { path: path.display().to_string(), size, sha256: hex(hasher), sampled: true })
}

impl RunIdentity {
    /// Fingerprints the inputs `config` names, as they are now.
    pub fn of(config: &TrainConfig) -> Result<Self> {
        let mut inputs = BTreeMap::new();
        match &config.online {
            Some(online) => insert_data(&mut inputs, "online prompts", Path::new(&online.prompts))?,
            None => insert_data(&mut inputs, "data", Path::new(&config.data))?,
        }
        if let Some(heldout) = &config.heldout {
            insert_data(&mut inputs, HELDOUT, Path::new(&heldout.data))?;
        }
        let model = Path::new(&config.model);
        inputs.insert("model config.json".to_string(), whole(&model.join("config.json"))?);
        for name in std::iter::once("tokenizer.json".to_string()).chain(crate::data::tokenizer::side_files(model)?) {
            if !model.join(&name).is_file() {
                continue; // tokenizer.json itself: loading the tokenizer names it
            }
            inputs.insert(format!("tokenizer {name}"), whole(&model.join(&name))?);
        }
        // A random init reads no weights, so they are no part of the run.
        if config.init == Init::Pretrained {
            for name in sorted_files(model, |n| n.ends_with(".safetensors") || n == "model.safetensors.index.json")? {
                let path = model.join(&name);
                let print = if name.ends_with(".safetensors") { weights(&path)? } else { whole(&path)? };
                inputs.insert(format!("weights {name}"), print);
            }
        }
        if let Some(path) = &config.ref_logps {
            inputs.insert("ref_logps".to_string(), whole(Path::new(path))?);
        }
        Ok(Self { inputs })
    }

    /// Records the held-out data `config` names now in place of what the run recorded
    /// (a reload changed `heldout`, a field that may change during a run), so that the
    /// next resume compares against what the run goes on with.
    pub fn record_heldout(run_dir: &Path, config: &TrainConfig) -> Result<()> {
        let Some(mut recorded) = Self::read(run_dir)? else { return Ok(()) };
        recorded.inputs.retain(|role, _| role != HELDOUT && !role.starts_with(&format!("{HELDOUT} ")));
        if let Some(heldout) = &config.heldout {
            insert_data(&mut recorded.inputs, HELDOUT, Path::new(&heldout.data))?;
        }
        recorded.write(run_dir)
    }

    pub fn write(&self, run_dir: &Path) -> Result<()> {
        let path = run_dir.join(IDENTITY_FILE);
        let tmp = run_dir.join(format!(".{IDENTITY_FILE}.tmp"));
        std::fs::write(&tmp, serde_json::to_string_pretty(self)? + "\n")
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))
    }

    /// None for a run folder made before fingerprints were recorded.
    pub fn read(run_dir: &Path) -> Result<Option<Self>> {
        let path = run_dir.join(IDENTITY_FILE);
        if !path.exists() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path).with_context(|| format!("{}: cannot read", path.display()))?;
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| anyhow::anyhow!("{}:{}:{}: {e}", path.display(), e.line(), e.column()))
    }

    /// One line per input that differs from `recorded`: what it is, its path, and which
    /// part of its fingerprint changed.
    pub fn changes_from(&self, recorded: &Self) -> Vec<String> {
        let mut changes = Vec::new();
        for (role, was) in &recorded.inputs {
            match self.inputs.get(role) {
                None => changes.push(format!("{role} ({}): the run had it, it is gone now", was.path)),
                Some(now) if now.path != was.path && (now.size != was.size || now.sha256 != was.sha256) => changes
                    .push(format!(
                        "{role}: was {} ({} bytes, sha256 {}), now {} ({} bytes, sha256 {})",
                        was.path,
                        was.size,
                        short(&was.sha256),
                        now.path,
                        now.size,
                        short(&now.sha256)
                    )),
                Some(now) if now.size != was.size => {
                    changes.push(format!("{role} ({}): size {} bytes, was {}", now.path, now.size, was.size))
                }
                Some(now) if now.sha256 != was.sha256 => changes.push(format!(
                    "{role} ({}): sha256{} {}, was {}",
                    now.path,
                    if now.sampled { " of header + sample" } else { "" },
                    short(&now.sha256),
                    short(&was.sha256)
                )),
                Some(_) => {}
            }
        }
        for (role, now) in &self.inputs {
            if !recorded.inputs.contains_key(role) {
                changes.push(format!("{role} ({}): new, the run did not have it", now.path));
            }
        }
        changes
    }
}

/// Checks the inputs `config` names against what the run in `run_dir` recorded. Err,
/// naming each change and the ways on, unless `anyway`; then the changes are returned for
/// the log with the new fingerprints, which the caller records once the checkpoint is
/// restored (the run goes on with these inputs, so the next resume compares against
/// them). A run folder without `identity.json` (made before it existed) resumes unchecked.
pub fn check_resume(run_dir: &Path, config: &TrainConfig, anyway: bool) -> Result<(Vec<String>, Option<RunIdentity>)> {
    let Some(recorded) = RunIdentity::read(run_dir)? else {
        crate::console::line(&format!(
            "note: {} has no {IDENTITY_FILE} (an older run folder); the data and model are not checked",
            run_dir.display()
        ));
        return Ok((Vec::new(), None));
    };
    let now = RunIdentity::of(config)?;
    let changes = now.changes_from(&recorded);
    if !changes.is_empty() && !anyway {
        bail!(
            "{}: the run's inputs changed since it started:\n  {}\nresume anyway with --resume-anyway (the data order and position are kept, onto the new inputs), or start a new run",
            run_dir.join(IDENTITY_FILE).display(),
            changes.join("\n  ")
        );
    }
    Ok((changes, Some(now)))
}

/// A data file as `role`, or each file of a data folder (parquet shards) as `role NAME`.
fn insert_data(inputs: &mut BTreeMap<String, Fingerprint>, role: &str, data: &Path) -> Result<()> {
    if data.is_dir() {
        for name in sorted_files(data, |_| true)? {
            inputs.insert(format!("{role} {name}"), whole(&data.join(&name))?);
        }
    } else {
        inputs.insert(role.to_string(), whole(data)?);
    }
    Ok(())
}

/// The first 12 characters (a hash read from a damaged file may be anything).
fn short(sha: &str) -> &str {
    sha.char_indices().nth(12).map_or(sha, |(end, _)| &sha[..end])
}

fn sorted_files(dir: &Path, keep: impl Fn(&str) -> bool) -> Result<Vec<String>> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .with_context(|| format!("{}: cannot list", dir.display()))?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| keep(n))
        .collect();
    names.sort();
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_weights_are_sampled_and_a_changed_chunk_is_seen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.safetensors");
        let header = br#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#;
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header);
        bytes.resize((CHUNK * SAMPLES * 3) as usize, 7);
        std::fs::write(&path, &bytes).unwrap();
        let a = weights(&path).unwrap();
        assert!(a.sampled && a.size == bytes.len() as u64);
        // The last chunk is always sampled: a change there is seen.
        let last = bytes.len() - 1;
        bytes[last] = 8;
        std::fs::write(&path, &bytes).unwrap();
        let b = weights(&path).unwrap();
        assert_ne!(a.sha256, b.sha256);
    }
}
