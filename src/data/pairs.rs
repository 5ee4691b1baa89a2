//! JSONL training rows. Preference rows: {"prompt", "chosen", "rejected"}; SFT rows:
//! {"prompt", "completion"}. Rows are tokenized once, truncated like TRL (prompt keeps
//! its end, completions keep their start), and every unusable row is named by file:line.

use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::Deserialize;

use super::tokenizer::TextTokenizer;

/// One tokenized example. For SFT rows `rejected` is empty.
#[derive(Clone, Debug)]
pub struct Example {
    pub prompt: Vec<u32>,
    pub chosen: Vec<u32>,
    pub rejected: Vec<u32>,
    pub line: usize,
}

#[derive(Clone, Copy, Debug)]
pub struct Truncation {
    pub max_length: usize,
    pub max_prompt_length: usize,
}

#[derive(Debug, Default)]
pub struct LoadReport {
    pub rows: usize,
    pub truncated: usize,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PreferenceRow {
    prompt: String,
    chosen: String,
    rejected: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SftRow {
    prompt: String,
    completion: String,
}

pub fn load_examples(path: &Path, tokenizer: &TextTokenizer, preference: bool, limits: Truncation) -> Result<(Vec<Example>, LoadReport)> {
    let text = std::fs::read(path).with_context(|| format!("{}: cannot read data", path.display()))?;
    let text = String::from_utf8(text).map_err(|e| {
        let line = 1 + e.as_bytes()[..e.utf8_error().valid_up_to()].iter().filter(|&&b| b == b'\n').count();
        anyhow::anyhow!("{}:{line}: not valid UTF-8", path.display())
    })?;
    let mut examples = Vec::new();
    let mut report = LoadReport::default();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        if raw.trim().is_empty() {
            continue;
        }
        let at = || format!("{}:{line}", path.display());
        let (prompt, chosen, rejected) = if preference {
            let row: PreferenceRow = serde_json::from_str(raw).map_err(|e| anyhow::anyhow!("{}: {e}", at()))?;
            (row.prompt, row.chosen, Some(row.rejected))
        } else {
            let row: SftRow = serde_json::from_str(raw).map_err(|e| anyhow::anyhow!("{}: {e}", at()))?;
            (row.prompt, row.completion, None)
        };
        if chosen.is_empty() || rejected.as_deref() == Some("") {
            bail!("{}: empty completion", at());
        }
        let mut prompt = tokenizer.encode_prompt(&prompt).with_context(at)?;
        let mut chosen = tokenizer.encode_completion(&chosen).with_context(at)?;
        let mut rejected = match rejected {
            Some(r) => tokenizer.encode_completion(&r).with_context(at)?,
            None => Vec::new(),
        };
        let longest = chosen.len().max(rejected.len());
        if prompt.len() + longest > limits.max_length {
            report.truncated += 1;
            if prompt.len() > limits.max_prompt_length {
                prompt.drain(..prompt.len() - limits.max_prompt_length);
            }
            let room = limits.max_length.saturating_sub(prompt.len());
            if room == 0 {
                bail!("{}: the prompt alone fills max_length {}", at(), limits.max_length);
            }
            chosen.truncate(room);
            rejected.truncate(room);
        }
        examples.push(Example { prompt, chosen, rejected, line });
        report.rows += 1;
    }
    if examples.is_empty() {
        bail!("{}: no rows", path.display());
    }
    Ok((examples, report))
}
