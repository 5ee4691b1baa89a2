//! `host pairs`: preference pairs built from labelled data the way Smaug's were.
//! - MetaMath style: a worked answer vs the same answer with one intermediate result
//!   corrupted (the final answer kept), so the pair differs by a token or two.
//! - Multiple choice (ARC / HellaSwag style): the correct choice vs each wrong choice.
//!
//! Rows that cannot be used are skipped, counted by reason, and named by file:line.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::Serialize;
use serde_json::{Value, json};

use super::pairs::{NOT_UTF8, normalised_levenshtein, read_rows};
use crate::rng::SplitMix64;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PairStyle {
    /// {prompt|query, completion|response}: corrupt one intermediate "= result".
    Metamath,
    /// {question, choices, answer} (also ARC's and HellaSwag's layouts): correct vs each wrong choice.
    Choice,
}

pub struct Pair {
    pub prompt: String,
    pub chosen: String,
    pub rejected: String,
}

#[derive(Default, Serialize)]
pub struct BuildReport {
    pub rows: usize,
    pub pairs: usize,
    /// Skipped rows by reason, with the first few locations.
    pub skipped: BTreeMap<String, Vec<String>>,
}

impl BuildReport {
    fn skip(&mut self, reason: &str, at: String) {
        let places = self.skipped.entry(reason.to_string()).or_default();
        places.push(at);
    }

    pub fn skipped_count(&self) -> usize {
        self.skipped.values().map(Vec::len).sum()
    }
}

/// Reads JSONL or Parquet rows and builds pairs in `style`; unusable rows are skipped and reported.
pub fn build_pairs(path: &Path, style: PairStyle, seed: u64) -> Result<(Vec<Pair>, BuildReport)> {
    let mut rng = SplitMix64::new(seed);
    let mut pairs = Vec::new();
    let mut report = BuildReport::default();
    for raw in read_rows(path)? {
        report.rows += 1;
        let row = match raw.value {
            Ok(v @ Value::Object(_)) => v,
            Ok(_) => {
                report.skip("not a JSON object", raw.at);
                continue;
            }
            Err(e) if e == NOT_UTF8 => {
                report.skip(NOT_UTF8, raw.at);
                continue;
            }
            Err(e) => {
                report.skip("malformed JSON", format!("{} ({e})", raw.at));
                continue;
            }
        };
        let built = match style {
            PairStyle::Metamath => metamath_pair(&row, &mut rng).map(|p| vec![p]),
            PairStyle::Choice => choice_pairs(&row),
        };
        match built {
            Ok(new) => pairs.extend(new),
            Err(reason) => report.skip(&reason, raw.at),
        }
    }
    report.pairs = pairs.len();
    Ok((pairs, report))
}

fn text_field<'a>(row: &'a Value, names: &[&str]) -> Result<&'a str, String> {
    for name in names {
        if let Some(v) = row.get(*name) {
            return match v.as_str() {
                Some(s) if !s.trim().is_empty() => Ok(s),
                Some(_) => Err(format!("empty `{name}`")),
                None => Err(format!("`{name}` is not a string")),
            };
        }
    }
    Err(format!("missing field `{}`", names.join("` or `")))
}

/// A worked answer with one intermediate result (a number right after "= ") replaced by
/// a nearby wrong value. Results in the final-answer sentence are never touched.
fn metamath_pair(row: &Value, rng: &mut SplitMix64) -> Result<Pair, String> {
    let prompt = text_field(row, &["prompt", "query"])?;
    let completion = text_field(row, &["completion", "response"])?;
    let final_at = completion.rfind("The answer is").unwrap_or(completion.len());
    let candidates: Vec<(usize, usize)> = intermediate_results(&completion[..final_at]);
    if candidates.is_empty() {
        return Err("no intermediate result to corrupt".into());
    }
    let (start, end) = candidates[rng.range(0, candidates.len() as i64 - 1) as usize];
    let wrong = corrupt_number(&completion[start..end], rng);
    let rejected = format!("{}{wrong}{}", &completion[..start], &completion[end..]);
    Ok(Pair { prompt: prompt.to_string(), chosen: completion.to_string(), rejected })
}

/// Byte ranges of the numbers stated as results ("= 42", "= 3.5", "= -7").
pub fn intermediate_results(text: &str) -> Vec<(usize, usize)> {
    let bytes = text.as_bytes();
    let mut found = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'=' {
            let mut start = i + 1;
            while start < bytes.len() && bytes[start] == b' ' {
                start += 1;
            }
            let mut end = start;
            if end < bytes.len() && bytes[end] == b'-' {
                end += 1;
            }
            let digits_from = end;
            while end < bytes.len()
                && (bytes[end].is_ascii_digit()
                    || (bytes[end] == b'.' && end + 1 < bytes.len() && bytes[end + 1].is_ascii_digit()))
            {
                end += 1;
            }
            if end > digits_from {
                found.push((start, end));
                i = end;
                continue;
            }
        }
        i += 1;
    }
    found
}

/// A different number of the same form: integers move by 1-5 (staying non-negative when
/// they were), decimals change in their last digit.
fn corrupt_number(number: &str, rng: &mut SplitMix64) -> String {
    if let Some(dot) = number.find('.') {
        let decimals = number.len() - dot - 1;
        let value: f64 = number.parse().unwrap_or(0.0);
        let unit = 10f64.powi(-(decimals as i32));
        let offset = rng.range(1, 5) as f64 * if rng.range(0, 1) == 0 { -1.0 } else { 1.0 };
        let wrong =
            if value + offset * unit < 0.0 && value >= 0.0 { value - offset * unit } else { value + offset * unit };
        return format!("{wrong:.decimals$}");
    }
    let value: i64 = number.parse().unwrap_or(0);
    loop {
        let wrong = value + rng.range(-5, 5);
        if wrong != value && (wrong >= 0 || value < 0) {
            return wrong.to_string();
        }
    }
}

/// The correct choice vs each wrong one. Layouts: {question, choices: [..], answer:
/// index | label | text}; ARC {question, choices: {text: [..], label: [..]}, answerKey};
/// HellaSwag {ctx, endings: [..], label}.
fn choice_pairs(row: &Value) -> Result<Vec<Pair>, String> {
    let (prompt, choices, labels, answer) = if let Some(endings) = row.get("endings") {
        let ctx = text_field(row, &["ctx", "context"])?;
        (
            ctx.to_string(),
            string_list(endings, "endings")?,
            Vec::new(),
            row.get("label").cloned().ok_or("missing field `label`")?,
        )
    } else {
        let question = text_field(row, &["question"])?;
        let raw = row.get("choices").ok_or("missing field `choices`")?;
        let (choices, labels) = match raw {
            Value::Object(m) => {
                let texts = string_list(m.get("text").ok_or("`choices` has no `text` list")?, "choices.text")?;
                let labels = string_list(m.get("label").ok_or("`choices` has no `label` list")?, "choices.label")?;
                (texts, labels)
            }
            list => (string_list(list, "choices")?, Vec::new()),
        };
        let answer = row
            .get("answer")
            .or_else(|| row.get("answerKey"))
            .cloned()
            .ok_or("missing field `answer` (or `answerKey`)")?;
        (format!("Question: {question}\nAnswer:"), choices, labels, answer)
    };
    if choices.len() < 2 {
        return Err("fewer than two choices".into());
    }
    let correct = match &answer {
        Value::Number(n) => n.as_u64().map(|i| i as usize).ok_or("`answer` is not a choice index")?,
        Value::String(s) => {
            if let Some(i) = labels.iter().position(|l| l == s) {
                i
            } else if let Ok(i) = s.parse::<usize>() {
                i
            } else if s.len() == 1 && s.as_bytes()[0].is_ascii_uppercase() {
                (s.as_bytes()[0] - b'A') as usize
            } else {
                choices.iter().position(|c| c == s).ok_or("`answer` names no choice")?
            }
        }
        _ => return Err("`answer` must be an index, a label or the choice's text".into()),
    };
    if correct >= choices.len() {
        return Err(format!("answer {correct} is out of range for {} choices", choices.len()));
    }
    let completion = |c: &str| format!(" {}", c.trim());
    Ok(choices
        .iter()
        .enumerate()
        .filter(|(i, c)| *i != correct && c.trim() != choices[correct].trim())
        .map(|(_, wrong)| Pair {
            prompt: prompt.clone(),
            chosen: completion(&choices[correct]),
            rejected: completion(wrong),
        })
        .collect())
}

fn string_list(value: &Value, name: &str) -> Result<Vec<String>, String> {
    let list = value.as_array().ok_or(format!("`{name}` is not a list"))?;
    list.iter().map(|v| v.as_str().map(str::to_string).ok_or(format!("`{name}` holds a non-string"))).collect()
}

/// Normalised edit distance of each pair's completions, in tokens when a tokenizer is
/// given, else in characters.
pub fn edit_distances(pairs: &[Pair], tokenizer: Option<&tokenizers::Tokenizer>) -> Result<Vec<f64>> {
    pairs
        .iter()
        .map(|p| match tokenizer {
            Some(t) => {
                let ids = |s: &str| {
                    t.encode(s, false).map(|e| e.get_ids().to_vec()).map_err(|e| anyhow::anyhow!("tokenizing: {e}"))
                };
                Ok(normalised_levenshtein(&ids(&p.chosen)?, &ids(&p.rejected)?))
            }
            None => {
                let chars = |s: &str| s.chars().collect::<Vec<_>>();
                Ok(normalised_levenshtein(&chars(&p.chosen), &chars(&p.rejected)))
            }
        })
        .collect()
}

/// Writes the pairs as JSONL (atomically) and `<out>.stats.json` with the edit-distance
/// statistics and histogram; returns the stats.
pub fn write_pairs(
    out: &Path,
    pairs: &[Pair],
    distances: &[f64],
    unit: &str,
    bins: usize,
    report: &BuildReport,
) -> Result<Value> {
    let tmp = out.with_extension("jsonl.tmp");
    let mut file = std::io::BufWriter::new(
        std::fs::File::create(&tmp).with_context(|| format!("cannot write {}", tmp.display()))?,
    );
    for p in pairs {
        writeln!(file, "{}", json!({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}))?;
    }
    file.flush()?;
    drop(file);
    std::fs::rename(&tmp, out).with_context(|| format!("writing {}", out.display()))?;

    let mut sorted = distances.to_vec();
    sorted.sort_by(f64::total_cmp);
    let quantile = |q: f64| sorted.get(((sorted.len() - 1) as f64 * q).round() as usize).copied().unwrap_or(0.0);
    let histogram: Vec<Value> = crate::report::plot::histogram(distances, bins)
        .into_iter()
        .map(|(lo, hi, count)| json!({"from": lo, "to": hi, "pairs": count}))
        .collect();
    let stats = json!({
        "pairs": pairs.len(),
        "rows": report.rows,
        "skipped": report.skipped.iter().map(|(k, v)| (k.clone(), json!({"count": v.len(), "first": v.iter().take(5).collect::<Vec<_>>()}))).collect::<serde_json::Map<_, _>>(),
        "edit_distance": {
            "unit": unit,
            "mean": distances.iter().sum::<f64>() / distances.len().max(1) as f64,
            "median": quantile(0.5),
            "p10": quantile(0.1),
            "p90": quantile(0.9),
            "min": sorted.first(),
            "max": sorted.last(),
            "histogram": histogram,
        },
    });
    let stats_path = out.with_extension("stats.json");
    std::fs::write(&stats_path, serde_json::to_vec_pretty(&stats)?)
        .with_context(|| format!("writing {}", stats_path.display()))?;
    Ok(stats)
}

/// Checks that an output path is usable before any work is done.
pub fn check_output(out: &Path, input: &Path) -> Result<()> {
    if out.canonicalize().ok().is_some_and(|o| input.canonicalize().ok() == Some(o)) {
        bail!("{}: the output would overwrite the input", out.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intermediate_results_exclude_nothing_but_non_numbers() {
        let text = " 6 * 5 = 30. 30 - 15 = 15.5. x = y. = -3";
        let found: Vec<&str> = intermediate_results(text).into_iter().map(|(a, b)| &text[a..b]).collect();
        assert_eq!(found, vec!["30", "15.5", "-3"]);
    }

    #[test]
    fn metamath_pairs_keep_the_final_answer() {
        let row = json!({"query": "Q", "response": "2 * 3 = 6. 6 + 1 = 7. The answer is: 7"});
        let mut rng = SplitMix64::new(1);
        for _ in 0..50 {
            let pair = metamath_pair(&row, &mut rng).unwrap();
            assert_ne!(pair.rejected, pair.chosen);
            assert!(pair.rejected.ends_with("The answer is: 7"), "{}", pair.rejected);
            // Exactly one number changed.
            let (c, r) = (pair.chosen.split(' ').collect::<Vec<_>>(), pair.rejected.split(' ').collect::<Vec<_>>());
            assert_eq!(c.iter().zip(&r).filter(|(a, b)| a != b).count(), 1);
        }
        let none = json!({"prompt": "Q", "completion": "The answer is 7"});
        assert_eq!(metamath_pair(&none, &mut rng).err().unwrap(), "no intermediate result to corrupt");
    }

    #[test]
    fn choice_layouts() {
        let generic = json!({"question": "2+2?", "choices": ["3", "4", "5"], "answer": 1});
        let pairs = choice_pairs(&generic).unwrap();
        assert_eq!(pairs.len(), 2);
        assert!(pairs.iter().all(|p| p.chosen == " 4" && p.prompt == "Question: 2+2?\nAnswer:"));
        let arc = json!({"question": "Q", "choices": {"text": ["a", "b", "c", "d"], "label": ["A", "B", "C", "D"]}, "answerKey": "C"});
        let pairs = choice_pairs(&arc).unwrap();
        assert_eq!((pairs.len(), pairs[0].chosen.as_str()), (3, " c"));
        let hellaswag = json!({"ctx": "He opens the door", "endings": ["and walks in.", "x", "y", "z"], "label": "0"});
        let pairs = choice_pairs(&hellaswag).unwrap();
        assert_eq!(
            (pairs.len(), pairs[0].prompt.as_str(), pairs[0].chosen.as_str()),
            (3, "He opens the door", " and walks in.")
        );
        assert!(choice_pairs(&json!({"question": "Q", "choices": ["a", "b"], "answer": 5})).is_err());
        assert!(choice_pairs(&json!({"question": "Q", "choices": ["a"], "answer": 0})).is_err());
    }
}
