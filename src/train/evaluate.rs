//! Held-out answer accuracy by greedy generation: the model completes each prompt and the
//! answer after the last "The answer is" (MetaMath/GSM8K style) is compared with the
//! row's `answer`.

use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::data::TextTokenizer;
use crate::model::Llama;
use crate::model::generate::greedy;

/// One held-out question: the prompt as the model sees it and the expected answer.
pub struct EvalRow {
    pub prompt: String,
    pub answer: String,
    pub line: usize,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EvalResult {
    pub correct: usize,
    pub total: usize,
    pub accuracy: f64,
    /// A few (prompt, generated text, expected answer) for reading.
    pub samples: Vec<(String, String, String)>,
}

/// JSONL or Parquet rows {"prompt": str, "answer": number or str, ...}; other fields are ignored.
pub fn load_eval_rows(path: &Path, limit: Option<usize>) -> Result<Vec<EvalRow>> {
    let mut rows = Vec::new();
    for raw in crate::data::pairs::read_rows(path)? {
        let at = raw.at;
        let value = raw.value.map_err(|e| anyhow::anyhow!("{at}: {e}"))?;
        let prompt = value
            .get("prompt")
            .and_then(|p| p.as_str())
            .with_context(|| format!("{at}: missing string field `prompt`"))?;
        let answer = match value.get("answer") {
            Some(serde_json::Value::String(s)) => s.trim().to_string(),
            Some(serde_json::Value::Number(n)) => n.to_string(),
            _ => bail!("{at}: missing field `answer` (a number or a string)"),
        };
        rows.push(EvalRow { prompt: prompt.to_string(), answer, line: raw.line });
        if limit.is_some_and(|n| rows.len() >= n) {
            break;
        }
    }
    if rows.is_empty() {
        bail!("{}: no eval rows", path.display());
    }
    Ok(rows)
}

/// The answer stated after the last "The answer is" ("The answer is: 42." → "42").
pub fn extract_answer(text: &str) -> Option<String> {
    let at = text.rfind("The answer is")?;
    let rest = text[at + "The answer is".len()..].trim_start_matches([':', ' ']);
    let word = rest.split_whitespace().next()?.trim_end_matches(['.', ',', '!']);
    (!word.is_empty()).then(|| word.replace(',', ""))
}

/// Equal as numbers when both parse (so "7.0" matches 7), else as text.
pub fn same_answer(got: &str, expected: &str) -> bool {
    match (got.parse::<f64>(), expected.parse::<f64>()) {
        (Ok(a), Ok(b)) => (a - b).abs() < 1e-9,
        _ => got == expected,
    }
}

/// Greedy-decodes every prompt with `model` (plain device) and scores the answers.
pub fn evaluate(
    model: &Llama,
    tokenizer: &TextTokenizer,
    rows: &[EvalRow],
    max_new_tokens: usize,
) -> Result<EvalResult> {
    let mut prompts = Vec::with_capacity(rows.len());
    for row in rows {
        prompts.push(tokenizer.encode_prompt(&row.prompt).with_context(|| format!("eval row at line {}", row.line))?);
    }
    let generated = greedy(model, &prompts, max_new_tokens, &tokenizer.stop_ids, 64);
    let mut correct = 0;
    let mut samples = Vec::new();
    for (row, tokens) in rows.iter().zip(&generated) {
        let text = tokenizer.decode(tokens);
        if extract_answer(&text).is_some_and(|got| same_answer(&got, &row.answer)) {
            correct += 1;
        }
        if samples.len() < 3 {
            samples.push((row.prompt.clone(), text, row.answer.clone()));
        }
    }
    let total = rows.len();
    Ok(EvalResult { correct, total, accuracy: correct as f64 / total as f64, samples })
}

#[cfg(test)]
mod tests {
    use super::{extract_answer, same_answer};

    #[test]
    fn answers_are_read_after_the_last_marker() {
        assert_eq!(extract_answer(" 6 * 5 = 30. 30 - 15 = 15. The answer is 15.").as_deref(), Some("15"));
        assert_eq!(extract_answer("The answer is 3. The answer is: 1,200.").as_deref(), Some("1200"));
        assert_eq!(extract_answer(" 6 * 5 = 30."), None);
        assert_eq!(extract_answer("The answer is "), None);
        assert!(same_answer("7.0", "7"));
        assert!(!same_answer("17", "7"));
        assert!(same_answer("B", "B"));
    }
}
