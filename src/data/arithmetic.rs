//! A small arithmetic word-problem corpus with worked answers, generated (no download),
//! and DPOP-style pairs built from it the way Smaug's MetaMath pairs were: the rejected
//! answer is the chosen one with one intermediate result corrupted, final answer kept,
//! so the pair differs by a token or two.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use serde_json::json;

use crate::rng::SplitMix64;

const NAMES: &[&str] = &["Sam", "Ana", "Lee", "Mia", "Tom", "Zoe", "Raj", "Eva", "Ben", "Ivy"];
const ITEMS: &[&str] = &["apples", "marbles", "books", "coins", "cards", "pens", "shells", "stamps"];

/// One problem: the question, the worked steps as (expression, result), the answer.
pub struct Problem {
    pub question: String,
    pub steps: Vec<(String, i64)>,
    pub answer: i64,
}

impl Problem {
    pub fn prompt(&self) -> String {
        format!("Question: {}\nAnswer:", self.question)
    }

    /// The worked answer; `corrupt` replaces the result of step `i` by `value` only where
    /// it is first stated, as in Smaug's MetaMath pairs.
    pub fn worked(&self, corrupt: Option<(usize, i64)>) -> String {
        let mut out = String::new();
        for (i, (expr, result)) in self.steps.iter().enumerate() {
            let shown = match corrupt {
                Some((j, v)) if j == i => v,
                _ => *result,
            };
            out.push_str(&format!(" {expr} = {shown}."));
        }
        out.push_str(&format!(" The answer is {}.", self.answer));
        out
    }
}

pub fn problem(rng: &mut SplitMix64) -> Problem {
    let name = *rng.pick(NAMES);
    let item = *rng.pick(ITEMS);
    match rng.range(0, 2) {
        0 => {
            let (a, b) = (rng.range(2, 9), rng.range(2, 9));
            let c = rng.range(1, a * b - 1);
            Problem {
                question: format!(
                    "{name} has {a} bags with {b} {item} in each bag. {name} gives away {c} {item}. How many {item} does {name} have now?"
                ),
                steps: vec![(format!("{a} * {b}"), a * b), (format!("{} - {c}", a * b), a * b - c)],
                answer: a * b - c,
            }
        }
        1 => {
            let (a, b, c) = (rng.range(2, 30), rng.range(2, 9), rng.range(2, 9));
            Problem {
                question: format!(
                    "{name} has {a} {item} and buys {b} boxes with {c} {item} each. How many {item} does {name} have?"
                ),
                steps: vec![(format!("{b} * {c}"), b * c), (format!("{a} + {}", b * c), a + b * c)],
                answer: a + b * c,
            }
        }
        _ => {
            let c = rng.range(2, 6);
            let total = c * rng.range(2, 9);
            let a = rng.range(1, total - 1);
            let b = total - a;
            Problem {
                question: format!(
                    "{name} has {a} {item} and finds {b} more. {name} shares them equally among {c} friends. How many {item} does each friend get?"
                ),
                steps: vec![(format!("{a} + {b}"), total), (format!("{total} / {c}"), total / c)],
                answer: total / c,
            }
        }
    }
}

/// A wrong value for an intermediate result: close to the right one, never equal.
fn corrupted_value(rng: &mut SplitMix64, right: i64) -> i64 {
    loop {
        let v = right + rng.range(-5, 5);
        if v != right && v >= 0 {
            return v;
        }
    }
}

/// Writes sft.jsonl (prompt → worked answer), pairs.jsonl (chosen vs one corrupted
/// intermediate result), eval.jsonl (held-out prompt + answer) and choices.jsonl
/// (multiple choice).
pub fn write_corpus(dir: &Path, sft_rows: usize, pair_rows: usize, eval_rows: usize, seed: u64) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut rng = SplitMix64::new(seed);
    let mut write =
        |name: &str, rows: usize, make: &mut dyn FnMut(&mut SplitMix64) -> serde_json::Value| -> Result<()> {
            let path = dir.join(name);
            let tmp = dir.join(format!(".{name}.tmp"));
            let mut out = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
            for _ in 0..rows {
                writeln!(out, "{}", make(&mut rng))?;
            }
            out.flush()?;
            drop(out);
            std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))
        };
    write("sft.jsonl", sft_rows, &mut |rng| {
        let p = problem(rng);
        json!({"prompt": p.prompt(), "completion": p.worked(None)})
    })?;
    write("pairs.jsonl", pair_rows, &mut |rng| {
        let p = problem(rng);
        let step = rng.range(0, p.steps.len() as i64 - 2) as usize;
        let wrong = corrupted_value(rng, p.steps[step].1);
        json!({"prompt": p.prompt(), "chosen": p.worked(None), "rejected": p.worked(Some((step, wrong)))})
    })?;
    write("eval.jsonl", eval_rows, &mut |rng| {
        let p = problem(rng);
        json!({"prompt": p.prompt(), "completion": p.worked(None), "answer": p.answer})
    })?;
    // Multiple-choice rows (ARC-like: the answer among three near misses), for `host pairs --style choice`.
    write("choices.jsonl", eval_rows, &mut |rng| {
        let p = problem(rng);
        let mut choices = vec![p.answer];
        while choices.len() < 4 {
            let wrong = corrupted_value(rng, p.answer);
            if !choices.contains(&wrong) {
                choices.push(wrong);
            }
        }
        let shift = rng.range(0, 3) as usize;
        choices.rotate_left(shift);
        let answer = (4 - shift) % 4;
        json!({"question": p.question, "choices": choices.iter().map(|c| c.to_string()).collect::<Vec<_>>(), "answer": answer})
    })?;
    Ok(())
}

/// Trains a byte-level BPE tokenizer on the SFT corpus, with `<s>` added before prompts
/// (the tokenizer's special-token rule) and `</s>` as EOS.
pub fn train_tokenizer(corpus: &Path, vocab_size: usize, out: &Path) -> Result<()> {
    use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::processors::template::TemplateProcessing;
    use tokenizers::{
        AddedToken, DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper, TokenizerImpl,
    };

    let specials = ["<s>", "</s>", "<pad>"];
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(specials.iter().map(|s| AddedToken::from(*s, true)).collect())
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut tokenizer: TokenizerImpl<
        BPE,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    > = TokenizerImpl::new(BPE::default());
    tokenizer.with_pre_tokenizer(Some(PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true))));
    tokenizer.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevel::default())));

    // Train on the text the model will see: prompts and completions.
    let text = std::fs::read_to_string(corpus).with_context(|| format!("{}: cannot read", corpus.display()))?;
    let plain = corpus.with_extension("txt.tmp");
    let mut lines = String::new();
    for row in text.lines() {
        let v: serde_json::Value = serde_json::from_str(row)?;
        lines.push_str(v["prompt"].as_str().unwrap_or_default());
        lines.push_str(v["completion"].as_str().unwrap_or_default());
        lines.push('\n');
    }
    std::fs::write(&plain, lines)?;
    let trained = tokenizer.train_from_files(&mut trainer, vec![plain.display().to_string()]);
    std::fs::remove_file(&plain)?;
    trained.map_err(|e| anyhow::anyhow!("training tokenizer: {e}"))?;

    let bos = tokenizer.token_to_id("<s>").context("<s> missing")?;
    let post = TemplateProcessing::builder()
        .try_single("<s> $A")
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .special_tokens(vec![("<s>", bos)])
        .build()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    tokenizer.with_post_processor(Some(PostProcessorWrapper::Template(post)));
    tokenizer.save(out, true).map_err(|e| anyhow::anyhow!("saving {}: {e}", out.display()))?;
    Ok(())
}
