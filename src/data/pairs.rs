//! Training rows from JSONL or Parquet. Preference rows: {"prompt", "chosen", "rejected"};
//! SFT rows: {"prompt", "completion"}; unpaired rows (KTO): {"prompt", "completion", "label"}. Rows are tokenized once, truncated like TRL (prompt
//! keeps its end, completions keep their start), and every unusable row is named by
//! file:line (Parquet: file: row N).

use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::Deserialize;

use super::tokenizer::TextTokenizer;

/// One tokenized example. For SFT and unpaired rows `rejected` is empty and `chosen` holds
/// the completion; unpaired rows carry their label (true = desirable).
#[derive(Clone, Debug)]
pub struct Example {
    pub prompt: Vec<u32>,
    pub chosen: Vec<u32>,
    pub rejected: Vec<u32>,
    pub line: usize,
    pub label: Option<bool>,
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
    /// Rows left out (with `skip_bad_rows`): where, and why.
    pub skipped: Vec<(String, String)>,
    /// Plain-text rows whose prompt and completion tokenize differently as one text (see
    /// `TextTokenizer::splits_at_boundary`): the first few places, and how many.
    pub merged_at_boundary: Vec<String>,
    pub merged_at_boundary_count: usize,
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UnpairedRow {
    prompt: String,
    completion: String,
    #[allow(dead_code)] // read (and checked) before this row is parsed; listed so the field is known
    label: bool,
}

pub const NOT_UTF8: &str = "not valid UTF-8";

/// One raw row and where it came from ("file:line" for JSONL, "file: row N" for Parquet).
pub struct RawRow {
    pub at: String,
    pub line: usize,
    pub value: Result<serde_json::Value, String>,
}

/// The rows of a JSONL or Parquet file (by extension), parsed but not yet checked.
pub fn read_rows(path: &Path) -> Result<Vec<RawRow>> {
    let is_parquet = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("parquet"));
    if is_parquet {
        return super::parquet::read_parquet_rows(path);
    }
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read data", path.display()))?;
    let mut rows = Vec::new();
    for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        if raw.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let at = format!("{}:{}", path.display(), i + 1);
        let value = match std::str::from_utf8(raw) {
            Err(_) => Err(NOT_UTF8.to_string()),
            Ok(text) => serde_json::from_str(text).map_err(|e| e.to_string()),
        };
        rows.push(RawRow { at, line: i + 1, value });
    }
    Ok(rows)
}

/// Loads and tokenizes every row. A row that cannot be used stops the load with its
/// file:line, or, with `skip_bad_rows`, is left out and listed in the report.
pub fn load_examples(
    path: &Path,
    tokenizer: &TextTokenizer,
    preference: bool,
    limits: Truncation,
    skip_bad_rows: bool,
) -> Result<(Vec<Example>, LoadReport)> {
    load_with(path, skip_bad_rows, |value, line, report| {
        example_from_row(value, line, tokenizer, preference, limits, report).map(|e| vec![e])
    })
}

/// Unpaired rows for KTO: {prompt, completion, label}. With `unpair`, a preference row
/// (plain or conversational) becomes a desirable row with its chosen completion and an
/// undesirable one with its rejected completion, as TRL's `unpair_preference_dataset`
/// does; without it a preference row is an error, so a paired file is never read as
/// something else by accident.
pub fn load_unpaired_examples(
    path: &Path,
    tokenizer: &TextTokenizer,
    limits: Truncation,
    skip_bad_rows: bool,
    unpair: bool,
) -> Result<(Vec<Example>, LoadReport)> {
    load_with(path, skip_bad_rows, |value, line, report| {
        let value = value?;
        if let Some(label) = value.get("label") {
            if !label.is_boolean() {
                return Err(format!("`label` must be true (desirable) or false (undesirable), got {label}"));
            }
            let label = label.as_bool();
            let (prompt, completion, templated) = if value.get("prompt").is_some_and(|p| p.is_array()) {
                let (prompt, completion) = chat_unpaired_row(&value, tokenizer)?;
                (prompt, completion, true)
            } else {
                let row: UnpairedRow = serde_json::from_value(value).map_err(|e| e.to_string())?;
                (row.prompt, row.completion, false)
            };
            let mut example = tokenize_row(&prompt, &completion, None, templated, line, tokenizer, limits, report)?;
            example.label = label;
            return Ok(vec![example]);
        }
        if value.get("rejected").is_none() {
            return Err("an unpaired row needs `prompt`, `completion` and `label` (true = desirable)".into());
        }
        if !unpair {
            return Err("a preference row {prompt, chosen, rejected} in mode \"unpaired\": set `unpair: true` in the config to split each pair into a desirable and an undesirable row (TRL's unpair_preference_dataset)".into());
        }
        // Split first, then tokenize and truncate each row on its own, as TRL does.
        let (prompt, chosen, rejected, templated) = row_texts(value, tokenizer, true)?;
        let rejected = rejected.expect("preference rows have a rejected completion");
        let mut rows = Vec::with_capacity(2);
        for (completion, label) in [(chosen, true), (rejected, false)] {
            let mut example = tokenize_row(&prompt, &completion, None, templated, line, tokenizer, limits, report)?;
            example.label = Some(label);
            rows.push(example);
        }
        Ok(rows)
    })
}

/// Reads every row of `path` through `parse`, which gives the examples of one row.
fn load_with(
    path: &Path,
    skip_bad_rows: bool,
    mut parse: impl FnMut(Result<serde_json::Value, String>, usize, &mut LoadReport) -> Result<Vec<Example>, String>,
) -> Result<(Vec<Example>, LoadReport)> {
    let mut examples = Vec::new();
    let mut report = LoadReport::default();
    for row in read_rows(path)? {
        match parse(row.value, row.line, &mut report) {
            Ok(parsed) => {
                examples.extend(parsed);
                report.rows += 1;
            }
            Err(reason) if skip_bad_rows => report.skipped.push((row.at, reason)),
            Err(reason) => bail!("{}: {reason}", row.at),
        }
    }
    if examples.is_empty() {
        match report.skipped.first() {
            Some((at, reason)) => {
                bail!("{}: no usable rows ({} skipped; first: {at}: {reason})", path.display(), report.skipped.len())
            }
            None => bail!("{}: no rows", path.display()),
        }
    }
    Ok((examples, report))
}

fn example_from_row(
    value: Result<serde_json::Value, String>,
    line: usize,
    tokenizer: &TextTokenizer,
    preference: bool,
    limits: Truncation,
    report: &mut LoadReport,
) -> Result<Example, String> {
    let (prompt, chosen, rejected, templated) = row_texts(value?, tokenizer, preference)?;
    tokenize_row(&prompt, &chosen, rejected.as_deref(), templated, line, tokenizer, limits, report)
}

/// A row's (prompt, chosen or completion, rejected, rendered by the chat template) texts.
fn row_texts(
    value: serde_json::Value,
    tokenizer: &TextTokenizer,
    preference: bool,
) -> Result<(String, String, Option<String>, bool), String> {
    Ok(if preference && is_chat_row(&value) {
        let (prompt, chosen, rejected) = chat_row(&value, tokenizer)?;
        (prompt, chosen, Some(rejected), true)
    } else if preference {
        let row: PreferenceRow = serde_json::from_value(value).map_err(|e| e.to_string())?;
        (row.prompt, row.chosen, Some(row.rejected), false)
    } else {
        let row: SftRow = serde_json::from_value(value).map_err(|e| e.to_string())?;
        (row.prompt, row.completion, None, false)
    })
}

/// Tokenizes one row's texts and truncates them like TRL.
#[allow(clippy::too_many_arguments)]
fn tokenize_row(
    prompt: &str,
    chosen: &str,
    rejected: Option<&str>,
    templated: bool,
    line: usize,
    tokenizer: &TextTokenizer,
    limits: Truncation,
    report: &mut LoadReport,
) -> Result<Example, String> {
    if chosen.is_empty() || rejected == Some("") {
        return Err("empty completion".into());
    }
    let text = |e: anyhow::Error| format!("{e:#}");
    if !templated && !tokenizer.splits_at_boundary(prompt, std::iter::once(chosen).chain(rejected)).map_err(text)? {
        report.merged_at_boundary_count += 1;
        if report.merged_at_boundary.len() < 5 {
            report.merged_at_boundary.push(format!("line {line}"));
        }
    }
    let mut prompt =
        if templated { tokenizer.encode_templated_prompt(prompt) } else { tokenizer.encode_prompt(prompt) }
            .map_err(text)?;
    let mut chosen = tokenizer.encode_completion(chosen).map_err(text)?;
    let mut rejected = match rejected {
        Some(r) => tokenizer.encode_completion(r).map_err(text)?,
        None => Vec::new(),
    };
    let longest = chosen.len().max(rejected.len());
    if prompt.len() + longest > limits.max_length {
        if prompt.len() > limits.max_prompt_length {
            prompt.drain(..prompt.len() - limits.max_prompt_length);
        }
        let room = limits.max_length.saturating_sub(prompt.len());
        if room == 0 {
            return Err(format!("the prompt alone fills max_length {}", limits.max_length));
        }
        chosen.truncate(room);
        rejected.truncate(room);
        report.truncated += 1;
    }
    Ok(Example { prompt, chosen, rejected, line, label: None })
}

/// Rows that need the chat template: message lists (ultrafeedback_binarized, TRL's
/// conversational format) or orca_dpo_pairs' {system, question, chosen, rejected}.
fn is_chat_row(row: &serde_json::Value) -> bool {
    row.get("question").is_some() || row.get("chosen").is_some_and(|c| c.is_array())
}

/// (prompt, chosen, rejected) text as the chat template renders them. Other fields of
/// these datasets (ids, scores) are ignored, as TRL ignores them.
fn chat_row(row: &serde_json::Value, tokenizer: &TextTokenizer) -> Result<(String, String, String), String> {
    use super::chat::{Message, messages};
    let template = chat_template(tokenizer)?;
    let text_field = |key: &str| row.get(key).and_then(|v| v.as_str()).map(str::to_string);
    let (prompt, chosen, rejected) = if let Some(question) = text_field("question") {
        // orca_dpo_pairs: an optional system message, the question, two answers.
        let mut prompt = Vec::new();
        if let Some(system) = text_field("system").filter(|s| !s.trim().is_empty()) {
            prompt.push(Message { role: "system".into(), content: system });
        }
        prompt.push(Message { role: "user".into(), content: question });
        let answer = |key: &str| {
            text_field(key)
                .map(|content| vec![Message { role: "assistant".into(), content }])
                .ok_or_else(|| format!("missing string field `{key}`"))
        };
        (prompt, answer("chosen")?, answer("rejected")?)
    } else {
        let chosen = messages(row.get("chosen").unwrap_or(&serde_json::Value::Null), "chosen")?;
        let rejected = messages(row.get("rejected").ok_or("missing field `rejected`")?, "rejected")?;
        match row.get("prompt") {
            Some(p @ serde_json::Value::Array(_)) => (messages(p, "prompt")?, chosen, rejected),
            // ultrafeedback_binarized: whole conversations; the prompt is what they share.
            _ => {
                let shared = chosen.iter().zip(&rejected).take_while(|(a, b)| a == b).count();
                if shared == 0 {
                    return Err("chosen and rejected conversations share no prompt messages".into());
                }
                (chosen[..shared].to_vec(), chosen[shared..].to_vec(), rejected[shared..].to_vec())
            }
        }
    };
    if chosen.is_empty() || rejected.is_empty() {
        return Err("empty completion".into());
    }
    let (prompt_text, completions) = template.prompt_and_completions(&prompt, &[&chosen, &rejected])?;
    let [chosen_text, rejected_text]: [String; 2] = completions.try_into().expect("two completions");
    Ok((prompt_text, chosen_text, rejected_text))
}

fn chat_template(tokenizer: &TextTokenizer) -> Result<&super::chat::ChatTemplate, String> {
    tokenizer.chat.as_ref().ok_or_else(|| {
        let config = tokenizer.path.with_file_name("tokenizer_config.json");
        let named = super::chat::template_names(&config);
        if named.is_empty() {
            format!("this row is conversational, but {} has no chat_template (nor is there a chat_template.jinja beside it)", config.display())
        } else {
            // transformers refuses this too: several named templates and none called "default".
            format!("this row is conversational, and {} has named chat templates ({}) but no default; choose one with `chat_template`", config.parent().unwrap_or(&config).display(), named.join(", "))
        }
    })
}

/// (prompt, completion) text of TRL's conversational unpaired row
/// {"prompt": [messages], "completion": [messages], "label"}, as the chat template renders
/// them: the prompt with the generation prompt, the completion as what it adds after that.
fn chat_unpaired_row(row: &serde_json::Value, tokenizer: &TextTokenizer) -> Result<(String, String), String> {
    use super::chat::messages;
    if let Some(extra) =
        row.as_object().and_then(|o| o.keys().find(|k| !["prompt", "completion", "label"].contains(&k.as_str())))
    {
        return Err(format!("unknown field `{extra}`, expected `prompt`, `completion`, `label`"));
    }
    let template = chat_template(tokenizer)?;
    let prompt = messages(row.get("prompt").unwrap_or(&serde_json::Value::Null), "prompt")?;
    let completion = messages(row.get("completion").ok_or("missing field `completion`")?, "completion")?;
    if completion.is_empty() {
        return Err("empty completion".into());
    }
    let (prompt_text, completions) = template.prompt_and_completions(&prompt, &[&completion])?;
    Ok((prompt_text, completions.into_iter().next().expect("one completion rendered")))
}

#[cfg(test)]
mod tests {
    use super::Example;

    fn pair(chosen: &[u32], rejected: &[u32]) -> Example {
        Example { prompt: vec![0], chosen: chosen.to_vec(), rejected: rejected.to_vec(), line: 1, label: None }
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
