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

impl Example {
    /// Index of the first completion token where chosen and rejected differ.
    pub fn first_difference(&self) -> Option<usize> {
        let shared = self.chosen.iter().zip(&self.rejected).take_while(|(a, b)| a == b).count();
        (shared < self.chosen.len().max(self.rejected.len())).then_some(shared)
    }

    /// Token-level Levenshtein distance between the completions over the longer length:
    /// 0 for identical completions, small for Smaug-style one-number edits.
    pub fn normalised_edit_distance(&self) -> f64 {
        normalised_levenshtein(&self.chosen, &self.rejected)
    }
}

/// Levenshtein distance over the longer length: 0 for equal sequences, 1 for disjoint ones.
pub fn normalised_levenshtein<T: PartialEq>(a: &[T], b: &[T]) -> f64 {
    let longest = a.len().max(b.len());
    if longest == 0 {
        return 0.0;
    }
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, x) in a.iter().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, y) in b.iter().enumerate() {
            let substitution = diagonal + usize::from(x != y);
            diagonal = row[j + 1];
            row[j + 1] = substitution.min(row[j] + 1).min(row[j + 1] + 1);
        }
    }
    row[b.len()] as f64 / longest as f64
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

#[cfg(test)]
mod tests {
    use super::Example;

    fn pair(chosen: &[u32], rejected: &[u32]) -> Example {
        Example { prompt: vec![0], chosen: chosen.to_vec(), rejected: rejected.to_vec(), line: 1 }
    }

    #[test]
    fn one_substituted_token() {
        // " 6 * 5 = 30." vs " 6 * 5 = 33.": one token of six differs, at index 4.
        let e = pair(&[10, 11, 12, 13, 30, 14], &[10, 11, 12, 13, 33, 14]);
        assert_eq!(e.first_difference(), Some(4));
        assert!((e.normalised_edit_distance() - 1.0 / 6.0).abs() < 1e-12);
    }

    #[test]
    fn insertions_deletions_and_identity() {
        let e = pair(&[1, 2, 3, 4], &[1, 3, 4]);
        assert_eq!(e.first_difference(), Some(1));
        assert!((e.normalised_edit_distance() - 0.25).abs() < 1e-12);
        let e = pair(&[1, 2], &[1, 2, 3]);
        assert_eq!(e.first_difference(), Some(2));
        assert!((e.normalised_edit_distance() - 1.0 / 3.0).abs() < 1e-12);
        let e = pair(&[5, 6], &[5, 6]);
        assert_eq!(e.first_difference(), None);
        assert_eq!(e.normalised_edit_distance(), 0.0);
        // "kitten" -> "sitting": the classic distance 3, over 7 tokens.
        let e = pair(&[11, 9, 20, 20, 5, 14], &[19, 9, 20, 20, 9, 14, 7]);
        assert!((e.normalised_edit_distance() - 3.0 / 7.0).abs() < 1e-12);
    }
}
