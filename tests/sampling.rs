//! Sampling: the warpers on hand-built distributions, the draw against its distribution
//! (chi-square), greedy = temperature 0 = top_k 1, seeded repeats, transformers' greedy
//! `generate` (tests/fixtures/make_sampling_fixtures.py), its repetition penalty
//! (make_repetition_fixtures.py), generation_config.json's defaults, and `host sample`'s bad inputs.

mod common;

use std::collections::BTreeSet;
use std::path::Path;

use prefhost::backend::backend_device;
use prefhost::data::TextTokenizer;
use prefhost::model::generate::{Sample, greedy, sample};
use prefhost::model::sampling::{SamplingSettings, penalize_repeats, stop_ids, top_k_filter, top_p_filter, uniform};
use prefhost::model::{Llama, load_frozen_model};

fn kept(scores: &[f32]) -> BTreeSet<usize> {
    scores.iter().enumerate().filter(|(_, s)| s.is_finite()).map(|(i, _)| i).collect()
}

fn set(items: &[usize]) -> BTreeSet<usize> {
    items.iter().copied().collect()
}

fn log_probs(probs: &[f64]) -> Vec<f32> {
    probs.iter().map(|p| p.ln() as f32).collect()
}

fn top_p(scores: &[f32], p: f32) -> BTreeSet<usize> {
    let mut scores = scores.to_vec();
    top_p_filter(&mut scores, p);
    kept(&scores)
}

fn top_k(scores: &[f32], k: usize) -> BTreeSet<usize> {
    let mut scores = scores.to_vec();
    top_k_filter(&mut scores, k);
    kept(&scores)
}

#[test]
fn top_p_keeps_the_smallest_set_that_reaches_p() {
    let logits = log_probs(&[0.05, 0.4, 0.1, 0.3, 0.15]);
    // 0.4 + 0.3 = 0.7 falls short of 0.75, so 0.15 joins.
    assert_eq!(top_p(&logits, 0.75), set(&[1, 3, 4]));
    assert_eq!(top_p(&logits, 0.65), set(&[1, 3]));
    assert_eq!(top_p(&logits, 0.35), set(&[1]));
    // The most likely token is always kept (min_tokens_to_keep = 1).
    assert_eq!(top_p(&logits, 0.01), set(&[1]));
    assert_eq!(top_p(&logits, 1.0), set(&[0, 1, 2, 3, 4]));
    assert_eq!(top_p(&logits, 0.9), set(&[1, 2, 3, 4]));
    assert_eq!(top_p(&logits, 0.97), set(&[0, 1, 2, 3, 4]), "0.05 is more than 1 - 0.97");
    // Ties at the cut: sorted by index (stable), the lower indices are dropped first.
    assert_eq!(top_p(&[1.0; 4], 0.5), set(&[2, 3]));
    // Filtered tokens (-inf) carry no probability.
    let mut filtered = logits.clone();
    filtered[1] = f32::NEG_INFINITY;
    // What is left renormalises to {0: 1/12, 2: 1/6, 3: 1/2, 4: 1/4}.
    assert_eq!(top_p(&filtered, 0.6), set(&[3, 4]));
}

#[test]
fn top_k_keeps_the_k_highest_and_their_ties() {
    let logits = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0];
    assert_eq!(top_k(&logits, 3), set(&[4, 5, 7]));
    assert_eq!(top_k(&logits, 1), set(&[5]));
    assert_eq!(top_k(&logits, 8), (0..8).collect());
    assert_eq!(top_k(&logits, 50), (0..8).collect());
    // Ties with the k-th value are all kept, as transformers' `scores < kth` keeps them.
    assert_eq!(top_k(&[2.0, 5.0, 5.0, 1.0], 1), set(&[1, 2]));
    assert_eq!(top_k(&logits, 6), set(&[0, 2, 4, 5, 6, 7]));
    assert_eq!(top_k(&logits, 7), (0..8).collect(), "the two 1.0s tie for 7th place");
}

/// Logits run through transformers' own Temperature, TopK and TopP warpers in generate()'s
/// order (tests/fixtures/make_warper_fixtures.py): the same tokens kept, with the same
/// scores, ties at the top and lower down included (which of several tokens tied at the
/// top-p cut go is left to torch's unstable sort there: only their number must agree).
#[test]
fn warpers_keep_what_transformers_keeps() {
    let fixture: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(common::repo().join("tests/fixtures/sampling/warpers.json")).unwrap(),
    )
    .unwrap();
    let cases = fixture["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 35);
    for case in cases {
        let settings = SamplingSettings {
            temperature: case["temperature"].as_f64().unwrap() as f32,
            top_k: case["top_k"].as_u64().unwrap() as usize,
            top_p: case["top_p"].as_f64().unwrap() as f32,
            ..SamplingSettings::default()
        };
        let mut scores: Vec<f32> =
            case["logits"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
        settings.warp(&mut scores);
        let want: Vec<usize> = case["kept"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
        let what =
            format!("t {} k {} p {} on {:?}", settings.temperature, settings.top_k, settings.top_p, case["logits"]);
        let (got, want_set) = (kept(&scores), set(&want));
        // Tokens tied at the top-p cut: transformers sorts with torch.sort, not stable, so
        // which of them it drops is the sort's implementation detail (here prefhost drops
        // lower indices first). The count must agree, and only tied tokens may differ.
        let differing: Vec<usize> = got.symmetric_difference(&want_set).copied().collect();
        let logits: Vec<f64> = case["logits"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        assert_eq!(got.len(), want_set.len(), "{what}: kept {got:?}, transformers {want_set:?}");
        assert!(
            differing.iter().all(|&i| logits[i] == logits[differing[0]]),
            "{what}: kept {got:?}, transformers {want_set:?}"
        );
        for &i in got.intersection(&want_set) {
            let expected = case["scores"][i].as_f64().unwrap() as f32;
            assert!(
                (scores[i] - expected).abs() <= 1e-6 * (1.0 + expected.abs()),
                "{what}: token {i} {} vs {expected}",
                scores[i]
            );
        }
    }
}

#[test]
fn warpers_run_in_transformers_order() {
    let logits = log_probs(&[0.5, 0.3, 0.2]);
    let warped = |temperature: f32, top_k: usize, top_p: f32| {
        let mut scores = logits.clone();
        SamplingSettings { temperature, top_k, top_p, ..SamplingSettings::default() }.warp(&mut scores);
        kept(&scores)
    };
    assert_eq!(warped(1.0, 0, 0.75), set(&[0, 1]));
    // Temperature first: at T = 10 the three are nearly equal, so top_p 0.75 keeps them all.
    assert_eq!(warped(10.0, 0, 0.75), set(&[0, 1, 2]));
    // top_k before top_p: top_k 2 leaves {0.625, 0.375}, and then top_p 0.6 keeps only the
    // first; top_p first would have kept two.
    assert_eq!(warped(1.0, 2, 0.6), set(&[0]));
}

/// Chi-square statistic of `counts` against `probs` (both over the same tokens).
fn chi_square(counts: &[usize], probs: &[f64]) -> f64 {
    let total: usize = counts.iter().sum();
    counts.iter().zip(probs).map(|(&c, &p)| (c as f64 - total as f64 * p).powi(2) / (total as f64 * p)).sum()
}

#[test]
fn draws_follow_the_warped_distribution() {
    let logits: Vec<f32> = vec![0.3, -1.2, 2.0, 0.9, -0.4, 1.5, -2.5, 0.0];
    let settings = SamplingSettings { temperature: 0.8, top_k: 6, seed: 11, ..SamplingSettings::default() };
    // The expected distribution, computed here from the definitions: softmax(logits / T)
    // over the six highest logits (-2.5 and -1.2 dropped).
    let dropped = [1usize, 6];
    let weights: Vec<f64> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| if dropped.contains(&i) { 0.0 } else { (l as f64 / 0.8).exp() })
        .collect();
    let total: f64 = weights.iter().sum();
    let expected: Vec<f64> = weights.iter().map(|w| w / total).collect();
    let draws = 40_000;
    let mut counts = vec![0usize; logits.len()];
    for k in 0..draws {
        counts[settings.choose(&logits, &[], uniform(settings.seed, 3, k, 0)).unwrap() as usize] += 1;
    }
    for i in dropped {
        assert_eq!(counts[i], 0, "token {i} was filtered out by top_k but drawn");
    }
    let kept: Vec<usize> = (0..logits.len()).filter(|i| !dropped.contains(i)).collect();
    let statistic = chi_square(
        &kept.iter().map(|&i| counts[i]).collect::<Vec<_>>(),
        &kept.iter().map(|&i| expected[i]).collect::<Vec<_>>(),
    );
    // 5 degrees of freedom: P(χ² > 20.52) = 0.001.
    assert!(statistic < 20.52, "chi-square {statistic:.2} for counts {counts:?} against {expected:?}");
    // The same check must reject a distribution the draws do not follow (plain softmax, T = 1).
    let plain: Vec<f64> = {
        let w: Vec<f64> = kept.iter().map(|&i| (logits[i] as f64).exp()).collect();
        let t: f64 = w.iter().sum();
        w.iter().map(|x| x / t).collect()
    };
    assert!(chi_square(&kept.iter().map(|&i| counts[i]).collect::<Vec<_>>(), &plain) > 20.52);
}

#[test]
fn uniforms_depend_on_every_counter() {
    let base = uniform(1, 2, 3, 4);
    assert!((0.0..1.0).contains(&base));
    assert_eq!(base, uniform(1, 2, 3, 4));
    for other in
        [uniform(0, 2, 3, 4), uniform(1, 0, 3, 4), uniform(1, 2, 0, 4), uniform(1, 2, 3, 0), uniform(1, 3, 2, 4)]
    {
        assert_ne!(base, other);
    }
}

struct TinyMath {
    model: Llama,
    prompts: Vec<Vec<u32>>,
    eos: Vec<u32>,
}

fn tiny_math(rows: usize) -> TinyMath {
    let dir = common::repo().join("models/tiny-math");
    let (config, model) = load_frozen_model(&dir, &backend_device("cpu").unwrap()).unwrap();
    let tokenizer =
        TextTokenizer::load_with(&dir.join("tokenizer.json"), &config.eos_ids(), config.pad_token_id).unwrap();
    let text = std::fs::read_to_string(common::repo().join("data/arithmetic/eval.jsonl")).unwrap();
    let prompts = text
        .lines()
        .take(rows)
        .map(|line| {
            let row: serde_json::Value = serde_json::from_str(line).unwrap();
            tokenizer.encode_prompt(row["prompt"].as_str().unwrap()).unwrap()
        })
        .collect();
    TinyMath { model, prompts, eos: stop_ids(&dir, &tokenizer).unwrap() }
}

fn tokens_of(samples: &[Sample]) -> Vec<Vec<u32>> {
    samples.iter().map(|s| s.completion.tokens.clone()).collect()
}

#[test]
fn temperature_zero_and_top_k_one_are_greedy() {
    let tm = tiny_math(12);
    let lengths: BTreeSet<usize> = tm.prompts.iter().map(Vec::len).collect();
    assert!(lengths.len() > 2, "prompts of several lengths, so several groups: {lengths:?}");
    let expected = greedy(&tm.model, &tm.prompts, 48, &tm.eos, 64);
    let settings = SamplingSettings { max_new_tokens: 48, ..SamplingSettings::default() };
    let at_zero =
        sample(&tm.model, &tm.prompts, 1, &SamplingSettings { temperature: 0.0, ..settings }, &tm.eos, 5).unwrap();
    assert_eq!(tokens_of(&at_zero), expected);
    // top_k 1 at any temperature leaves only the argmax to draw (no ties in these logits).
    let top1 = sample(
        &tm.model,
        &tm.prompts,
        2,
        &SamplingSettings { temperature: 1.7, top_k: 1, seed: 9, ..settings },
        &tm.eos,
        7,
    )
    .unwrap();
    let doubled: Vec<Vec<u32>> = expected.iter().flat_map(|t| [t.clone(), t.clone()]).collect();
    assert_eq!(tokens_of(&top1), doubled);
    assert!(top1.iter().all(|s| s.completion.eos), "the trained model ends its answers");
}

#[test]
fn a_seed_repeats_whatever_the_batching_and_other_seeds_differ() {
    let tm = tiny_math(6);
    let settings = SamplingSettings {
        temperature: 1.0,
        top_p: 0.95,
        top_k: 50,
        max_new_tokens: 40,
        seed: 5,
        ..SamplingSettings::default()
    };
    let run = |settings: &SamplingSettings, batch: usize| {
        sample(&tm.model, &tm.prompts, 4, settings, &tm.eos, batch).unwrap()
    };
    let first = run(&settings, 16);
    assert_eq!(first.len(), 24);
    assert_eq!(first, run(&settings, 16));
    // Each row's draws depend only on (seed, prompt, sample, step): other groupings agree.
    assert_eq!(first, run(&settings, 1));
    assert_eq!(first, run(&settings, 3));
    let distinct: BTreeSet<Vec<u32>> = tokens_of(&first).into_iter().collect();
    assert!(
        distinct.len() > 6,
        "samples at T = 1 should differ between samples of a prompt: {} distinct",
        distinct.len()
    );
    let other = run(&SamplingSettings { seed: 6, ..settings }, 16);
    assert_ne!(tokens_of(&first), tokens_of(&other));
}

#[derive(serde::Deserialize)]
struct GreedyFixture {
    cases: std::collections::BTreeMap<String, GreedyCase>,
}

#[derive(serde::Deserialize)]
struct GreedyCase {
    model: String,
    max_new_tokens: usize,
    prompts: Option<Vec<String>>,
    rows: Vec<GreedyRow>,
}

#[derive(serde::Deserialize)]
struct GreedyRow {
    prompt_ids: Vec<u32>,
    completion_ids: Vec<u32>,
    eos: bool,
}

#[test]
fn greedy_matches_transformers_generate() {
    let text = std::fs::read_to_string(common::repo().join("tests/fixtures/sampling/greedy.json")).unwrap();
    let fixture: GreedyFixture = serde_json::from_str(&text).unwrap();
    assert!(fixture.cases.len() >= 4);
    for (name, case) in &fixture.cases {
        let dir = common::repo().join(&case.model);
        let (config, model) = load_frozen_model(&dir, &backend_device("cpu").unwrap()).unwrap();
        let mut eos = config.eos_ids();
        if let Some(texts) = &case.prompts {
            // Text prompts go through the tokenizer as `host sample` tokenizes them.
            let tokenizer = TextTokenizer::load_with(&dir.join("tokenizer.json"), &eos, config.pad_token_id).unwrap();
            eos = stop_ids(&dir, &tokenizer).unwrap();
            for (text, row) in texts.iter().zip(&case.rows) {
                assert_eq!(tokenizer.encode_prompt(text).unwrap(), row.prompt_ids, "{name}: prompt tokens");
            }
        }
        let prompts: Vec<Vec<u32>> = case.rows.iter().map(|r| r.prompt_ids.clone()).collect();
        let settings =
            SamplingSettings { temperature: 0.0, max_new_tokens: case.max_new_tokens, ..SamplingSettings::default() };
        let got = sample(&model, &prompts, 1, &settings, &eos, 8).unwrap();
        for (i, (row, s)) in case.rows.iter().zip(&got).enumerate() {
            assert_eq!(s.completion.tokens, row.completion_ids, "{name}: prompt {i}");
            assert_eq!(s.completion.eos, row.eos, "{name}: prompt {i}: ended at EOS");
        }
    }
}

// ---- `host sample` ----

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

fn sample_cli(prompts: &str, out: &str, extra: &[&str]) -> std::process::Output {
    let mut args =
        vec!["sample", "--model", "models/tiny-math", "--prompts", prompts, "--out", out, "--max-new-tokens", "24"];
    args.extend_from_slice(extra);
    common::run_host(&args)
}

#[test]
fn host_sample_writes_one_line_per_sample_and_repeats() {
    let dir = tempfile::tempdir().unwrap();
    let messages = r#"{"prompt": "Question: Ana has 3 apples and finds 4 more. How many apples does Ana have?\nAnswer:", "answer": 7}
{"prompt": "Question: Tom has 9 cards and gives away 2. How many cards does Tom have?\nAnswer:"}
"#;
    let prompts = write(dir.path(), "prompts.jsonl", messages);
    let outs: Vec<String> = (0..3).map(|i| dir.path().join(format!("out{i}.jsonl")).display().to_string()).collect();
    for (out, seed) in outs.iter().zip(["3", "3", "4"]) {
        let result = sample_cli(
            &prompts,
            out,
            &[
                "--n",
                "3",
                "--temperature",
                "0.9",
                "--top-p",
                "0.9",
                "--top-k",
                "40",
                "--seed",
                seed,
                "--batch-size",
                "2",
            ],
        );
        assert!(result.status.success(), "{}", common::text(&result));
    }
    let read = |path: &str| std::fs::read_to_string(path).unwrap();
    assert_eq!(read(&outs[0]), read(&outs[1]));
    assert_ne!(read(&outs[0]), read(&outs[2]));
    let lines: Vec<serde_json::Value> = read(&outs[0]).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 6);
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(line["prompt_index"], i / 3);
        assert_eq!(line["sample_index"], i % 3);
        assert!(line["prompt"].as_str().unwrap().starts_with("Question:"));
        let ids = line["completion_ids"].as_array().unwrap();
        assert!(!ids.is_empty() && ids.len() <= 24);
        assert!(!line["completion"].as_str().unwrap().is_empty());
        assert!(line["eos"].is_boolean());
    }
}

/// Runs `host sample` expecting failure: the message must hold `needle`, and no output
/// file (nor a temp file beside it) may be left.
fn assert_refused(dir: &Path, prompts: &str, extra: &[&str], needle: &str) {
    let out = dir.join("out.jsonl");
    let result = sample_cli(prompts, &out.display().to_string(), extra);
    let text = common::text(&result);
    assert!(!result.status.success(), "{extra:?} succeeded: {text}");
    assert!(text.contains(needle), "{extra:?}: expected {needle:?} in: {text}");
    let left: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("out"))
        .collect();
    assert!(left.is_empty(), "{extra:?} left {left:?}");
}

#[test]
fn host_sample_refuses_bad_input_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let good = write(dir.path(), "good.jsonl", "{\"prompt\": \"Question: Ana has 3 apples.\\nAnswer:\"}\n");
    assert_refused(dir.path(), &good, &["--n", "0"], "--n must be at least 1");
    assert_refused(dir.path(), &good, &["--n", "2", "--temperature=-0.5"], "--temperature");
    assert_refused(dir.path(), &good, &["--n", "2", "--top-p", "0"], "--top-p must be in (0, 1]");
    assert_refused(dir.path(), &good, &["--n", "2", "--top-p", "1.5"], "--top-p must be in (0, 1]");
    assert_refused(dir.path(), &good, &["--n", "2", "--max-new-tokens", "0"], "--max-new-tokens");
    assert_refused(dir.path(), &good, &["--n", "2", "--batch-size", "0"], "--batch-size");
    assert_refused(dir.path(), &good, &["--n", "2", "--backend", "tpu"], "unknown backend \"tpu\"");
    let empty = write(dir.path(), "empty.jsonl", "\n\n");
    assert_refused(dir.path(), &empty, &["--n", "2"], "empty.jsonl: no prompts");
    let no_prompt =
        write(dir.path(), "no_prompt.jsonl", "{\"prompt\": \"Question:\"}\n{\"question\": \"Question:\"}\n");
    assert_refused(dir.path(), &no_prompt, &["--n", "2"], "no_prompt.jsonl:2: missing field `prompt`");
    let bad_json = write(dir.path(), "bad_json.jsonl", "{\"prompt\": \"Question:\"}\n\n{\"prompt\": \n");
    assert_refused(dir.path(), &bad_json, &["--n", "2"], "bad_json.jsonl:3:");
    let number = write(dir.path(), "number.jsonl", "{\"prompt\": 7}\n");
    assert_refused(
        dir.path(),
        &number,
        &["--n", "2"],
        "number.jsonl:1: missing field `prompt` (a string or a list of messages)",
    );
    // tiny-math has no chat template, so a conversational prompt cannot be rendered.
    let chat = write(dir.path(), "chat.jsonl", "{\"prompt\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n");
    assert_refused(dir.path(), &chat, &["--n", "2"], "chat.jsonl:1: the prompt is a list of messages");
    let missing = dir.path().join("missing.jsonl").display().to_string();
    assert_refused(dir.path(), &missing, &["--n", "2"], "missing.jsonl");
}

// ---- repetition penalty and generation_config.json ----

fn repetition_fixture() -> serde_json::Value {
    serde_json::from_str(
        &std::fs::read_to_string(common::repo().join("tests/fixtures/sampling/repetition.json")).unwrap(),
    )
    .unwrap()
}

/// transformers' RepetitionPenaltyLogitsProcessor then its warpers: the same scores kept.
#[test]
fn repetition_penalty_matches_transformers_processor() {
    let fixture = repetition_fixture();
    let cases = fixture["processor"].as_array().unwrap();
    assert_eq!(cases.len(), 8);
    let floats = |v: &serde_json::Value| -> Vec<f32> {
        v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
    };
    for case in cases {
        let settings = SamplingSettings {
            temperature: case["temperature"].as_f64().unwrap() as f32,
            top_k: case["top_k"].as_u64().unwrap() as usize,
            top_p: case["top_p"].as_f64().unwrap() as f32,
            repetition_penalty: case["repetition_penalty"].as_f64().unwrap() as f32,
            ..SamplingSettings::default()
        };
        let seen: Vec<u32> = case["seen"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        let mut scores = floats(&case["logits"]);
        penalize_repeats(&mut scores, &seen, settings.repetition_penalty);
        settings.warp(&mut scores);
        for (i, want) in case["scores"].as_array().unwrap().iter().enumerate() {
            match want.as_f64() {
                None => assert_eq!(scores[i], f32::NEG_INFINITY, "{settings:?}: token {i} should be filtered"),
                Some(want) => assert!(
                    (scores[i] as f64 - want).abs() <= 1e-6 * (1.0 + want.abs()),
                    "{settings:?}: token {i}: {} vs {want}",
                    scores[i]
                ),
            }
        }
    }
}

#[test]
fn greedy_with_repetition_penalty_matches_transformers_generate() {
    let fixture = repetition_fixture();
    let case = &fixture["greedy"];
    let dir = common::repo().join(case["model"].as_str().unwrap());
    let (config, model) = load_frozen_model(&dir, &backend_device("cpu").unwrap()).unwrap();
    let tokenizer =
        TextTokenizer::load_with(&dir.join("tokenizer.json"), &config.eos_ids(), config.pad_token_id).unwrap();
    let eos = stop_ids(&dir, &tokenizer).unwrap();
    let rows = case["rows"].as_array().unwrap();
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
    };
    let prompts: Vec<Vec<u32>> = rows.iter().map(|r| ids(&r["prompt_ids"])).collect();
    let settings = SamplingSettings {
        temperature: 0.0,
        repetition_penalty: case["repetition_penalty"].as_f64().unwrap() as f32,
        max_new_tokens: case["max_new_tokens"].as_u64().unwrap() as usize,
        ..SamplingSettings::default()
    };
    let got = sample(&model, &prompts, 1, &settings, &eos, 4).unwrap();
    for (i, (row, s)) in rows.iter().zip(&got).enumerate() {
        assert_eq!(s.completion.tokens, ids(&row["completion_ids"]), "prompt {i}");
        assert_eq!(s.completion.eos, row["eos"].as_bool().unwrap(), "prompt {i}: ended at EOS");
    }
    // The penalty is what the fixture tests: without it, some of these rows decode otherwise.
    let plain =
        sample(&model, &prompts, 1, &SamplingSettings { repetition_penalty: 1.0, ..settings }, &eos, 4).unwrap();
    assert!(plain.iter().zip(&got).any(|(a, b)| a.completion != b.completion));
}

/// models/tiny-math copied with a generation_config.json holding `generation`.
fn model_with_generation_config(dir: &Path, generation: &str) -> String {
    let model = dir.join("model");
    std::fs::create_dir_all(&model).unwrap();
    for name in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(common::repo().join("models/tiny-math").join(name), model.join(name)).unwrap();
    }
    std::fs::write(model.join("generation_config.json"), generation).unwrap();
    model.display().to_string()
}

fn sample_with_model(model: &str, prompts: &str, out: &str, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "sample",
        "--model",
        model,
        "--prompts",
        prompts,
        "--out",
        out,
        "--max-new-tokens",
        "24",
        "--n",
        "3",
        "--seed",
        "9",
    ];
    args.extend_from_slice(extra);
    common::run_host(&args)
}

#[test]
fn host_sample_takes_generation_config_defaults_as_generate_does() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = write(
        dir.path(),
        "prompts.jsonl",
        "{\"prompt\": \"Question: Ana has 3 apples and finds 4 more. How many apples does Ana have?\\nAnswer:\"}\n",
    );
    let out = |name: &str| dir.path().join(name).display().to_string();
    let read = |name: &str| std::fs::read_to_string(dir.path().join(name)).unwrap();
    let model = model_with_generation_config(
        dir.path(),
        r#"{"do_sample": true, "temperature": 1.7, "top_k": 20, "top_p": 0.9, "repetition_penalty": 1.2, "eos_token_id": 1, "transformers_version": "5.24.0"}"#,
    );
    // The file's values as defaults ...
    let from_file = sample_with_model(&model, &prompts, &out("file.jsonl"), &[]);
    assert!(from_file.status.success(), "{}", common::text(&from_file));
    assert!(
        common::text(&from_file).contains("temperature 1.7 (generation_config.json)"),
        "{}",
        common::text(&from_file)
    );
    // ... are the same draws as the same values given as flags to a model without the file.
    let flags = ["--temperature", "1.7", "--top-k", "20", "--top-p", "0.9", "--repetition-penalty", "1.2"];
    let explicit = sample_with_model("models/tiny-math", &prompts, &out("flags.jsonl"), &flags);
    assert!(explicit.status.success(), "{}", common::text(&explicit));
    assert_eq!(read("file.jsonl"), read("flags.jsonl"));
    // A flag wins over the file; --no-generation-config reads none of it (transformers' top_k 50).
    let overridden = sample_with_model(&model, &prompts, &out("override.jsonl"), &["--temperature", "0"]);
    assert!(common::text(&overridden).contains("temperature 0 (flag)"), "{}", common::text(&overridden));
    let ignored = sample_with_model(&model, &prompts, &out("ignored.jsonl"), &["--no-generation-config"]);
    assert!(common::text(&ignored).contains("top_k 50 (transformers' default)"), "{}", common::text(&ignored));
    let defaults = sample_with_model("models/tiny-math", &prompts, &out("defaults.jsonl"), &["--top-k", "50"]);
    assert!(ignored.status.success() && defaults.status.success());
    assert_eq!(read("ignored.jsonl"), read("defaults.jsonl"));
    // do_sample false: greedy, as generate, whatever the file's temperature.
    let greedy_model =
        model_with_generation_config(&dir.path().join("g"), r#"{"do_sample": false, "temperature": 0.6}"#);
    let from_greedy = sample_with_model(&greedy_model, &prompts, &out("greedy_file.jsonl"), &[]);
    let greedy_flag =
        sample_with_model("models/tiny-math", &prompts, &out("greedy_flag.jsonl"), &["--temperature", "0"]);
    assert!(from_greedy.status.success() && greedy_flag.status.success(), "{}", common::text(&from_greedy));
    assert_eq!(read("greedy_file.jsonl"), read("greedy_flag.jsonl"));
}

#[test]
fn generation_config_keys_that_change_sampling_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = write(dir.path(), "prompts.jsonl", "{\"prompt\": \"Question: Ana has 3 apples.\\nAnswer:\"}\n");
    for (i, (generation, needle)) in [
        (r#"{"no_repeat_ngram_size": 3}"#, "generation_config.json: no_repeat_ngram_size = 3: changes which tokens"),
        (r#"{"min_p": 0.05, "do_sample": true}"#, "generation_config.json: min_p = 0.05"),
        (r#"{"num_beams": 4}"#, "generation_config.json: num_beams = 4"),
        (r#"{"suppress_tokens": [7]}"#, "generation_config.json: suppress_tokens = [7]"),
        (
            r#"{"sampling_magic": 1}"#,
            "generation_config.json: sampling_magic: not a generation_config.json key prefhost knows",
        ),
        (r#"{"temperature": "hot"}"#, "generation_config.json: temperature: expected a number"),
        (r#"{"top_k": 5,"#, "generation_config.json:1:"),
    ]
    .into_iter()
    .enumerate()
    {
        let case = dir.path().join(format!("case{i}"));
        let model = model_with_generation_config(&case, generation);
        let out = case.join("out.jsonl");
        let result = sample_with_model(&model, &prompts, &out.display().to_string(), &[]);
        assert!(!result.status.success(), "{generation} was accepted");
        assert!(
            common::text(&result).contains(needle),
            "{generation}: expected {needle:?} in {}",
            common::text(&result)
        );
        assert!(!out.exists(), "{generation}: output written");
    }
    // Neutral values of the same keys, and keys that change nothing, pass; so does any file
    // with --no-generation-config.
    let neutral = model_with_generation_config(
        &dir.path().join("neutral"),
        r#"{"no_repeat_ngram_size": 0, "num_beams": 1, "min_p": null, "max_length": 20, "use_cache": true, "bos_token_id": 0}"#,
    );
    let ok = sample_with_model(&neutral, &prompts, &dir.path().join("neutral.jsonl").display().to_string(), &[]);
    assert!(ok.status.success(), "{}", common::text(&ok));
    let refused = model_with_generation_config(&dir.path().join("skip"), r#"{"no_repeat_ngram_size": 3}"#);
    let skipped = sample_with_model(
        &refused,
        &prompts,
        &dir.path().join("skip.jsonl").display().to_string(),
        &["--no-generation-config"],
    );
    assert!(skipped.status.success(), "{}", common::text(&skipped));
    let zero = sample_with_model(
        "models/tiny-math",
        &prompts,
        &dir.path().join("zero.jsonl").display().to_string(),
        &["--repetition-penalty", "0"],
    );
    assert!(!zero.status.success() && common::text(&zero).contains("--repetition-penalty must be a finite number > 0"));
}
