//! Rewards in the experiment script (src/script/reward.rs): the three accepted forms, and
//! what a reward returns checked before use — a string, NaN, a throw or a batch of the
//! wrong length is an error naming file:line. plugins/rewards/exact_answer.rhai reads
//! answers exactly as the held-out evaluation does (src/train/evaluate.rs), on generated
//! texts.

mod common;
use common::*;

use prefhost::script::reward::{Sample, defines_reward, score};
use prefhost::script::{Limits, ScriptEngine, ScriptHost, ScriptVersion};
use prefhost::train::evaluate::{extract_answer, same_answer};

fn load(sb: &Sandbox, name: &str, source: &str) -> (ScriptHost, ScriptVersion) {
    let path = sb.write(&format!("scripts/{name}.rhai"), source);
    let mut host = ScriptHost::new(ScriptEngine::new(&sb.path("plugins"), &Limits::default()));
    let version = host.load(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
    (host, version)
}

fn samples<'a>(completions: &'a [String], rows: &'a [serde_json::Value]) -> Vec<Sample<'a>> {
    completions.iter().zip(rows).map(|(c, r)| Sample { prompt: "What is 2+2?", completion: c, row: r }).collect()
}

/// SplitMix64, for the generated texts.
fn next(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[test]
fn exact_answer_reads_answers_as_the_evaluation_does() {
    let sb = Sandbox::new();
    let (host, version) = load(
        &sb,
        "exact",
        "import \"rewards/exact_answer\" as exact;\nfn reward(prompt, completion, row) { exact::reward(prompt, completion, row) }\n",
    );
    assert!(defines_reward(&version));
    // Texts built from the pieces answers are made of, the marker among them.
    let pieces = [
        "The answer is",
        "The answer is:",
        " ",
        "  ",
        "\n",
        "\t",
        ":",
        ".",
        ",",
        "!",
        "7",
        "15",
        "1,200",
        "7.0",
        "-3",
        "x",
        "B",
        "so",
        "1e3",
        "0.5",
    ];
    let stated = ["7", "15", "1,200", "7.0", "-3", "x", "B", "1e3", "0.5", "", "1,000.", "15!"];
    let gaps = ["", " ", ":", " :", "  ", "\n", ": ", "\t"];
    let answers = ["7", "15", "1200", "-3", "B", "1000", "0.5", "x"];
    let mut state = 11;
    let mut pick = |list: &[&'static str]| list[(next(&mut state) % list.len() as u64) as usize];
    let (mut completions, mut rows, mut expected) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..3000 {
        // Random pieces, then most of the time a stated answer, then random pieces again.
        let mut text = String::new();
        for _ in 0..(pick(&["0", "1", "2", "3"]).parse::<usize>().unwrap()) {
            text += pick(&pieces);
        }
        if pick(&["a", "a", "a", "-"]) == "a" {
            text += &format!("The answer is{}{}", pick(&gaps), pick(&stated));
        }
        for _ in 0..(pick(&["0", "0", "1", "2"]).parse::<usize>().unwrap()) {
            text += pick(&pieces);
        }
        let answer = pick(&answers);
        let hit = extract_answer(&text).is_some_and(|got| same_answer(&got, answer));
        expected.push(if hit { 1.0 } else { 0.0 });
        completions.push(text);
        rows.push(serde_json::json!({ "prompt": "What is 2+2?", "answer": answer }));
    }
    let got = score(&host, &version, &samples(&completions, &rows)).unwrap();
    let hits = expected.iter().filter(|&&e| e == 1.0).count();
    assert!((100..2900).contains(&hits), "the generated texts should both hit and miss: {hits}");
    for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
        assert_eq!(
            g, e,
            "{:?} with answer {}: the plugin says {g}, the evaluation {e}",
            completions[i], rows[i]["answer"]
        );
    }
    // A numeric answer in the row counts as its text.
    let rows = [serde_json::json!({ "answer": 1200 })];
    assert_eq!(score(&host, &version, &samples(&["The answer is 1,200.".to_string()], &rows)).unwrap(), [1.0]);
}

#[test]
fn every_form_of_reward_is_called_with_its_samples() {
    let sb = Sandbox::new();
    let completions = ["ab".to_string(), "abcd".to_string()];
    let rows = [serde_json::json!({ "weight": 2 }), serde_json::json!({ "weight": 3 })];
    let cases = [
        ("with_row", "fn reward(prompt, completion, row) { completion.len() * row.weight }", [4.0, 12.0]),
        ("two_args", "fn reward(prompt, completion) { completion.len() + prompt.len() / 100.0 }", [2.12, 4.12]),
        (
            "batched",
            "fn rewards(prompts, completions, rows) { let out = []; for i in 0..completions.len() { out.push(completions[i].len() - rows[i].weight); } out }",
            [0.0, 1.0],
        ),
    ];
    for (name, source, want) in cases {
        let (host, version) = load(&sb, name, source);
        let got = score(&host, &version, &samples(&completions, &rows)).unwrap();
        assert_eq!(got.len(), 2);
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-12, "{name}: {got:?} vs {want:?}");
        }
    }
    let (host, version) = load(&sb, "none", "fn loss(b, p) { 0.0 }");
    assert!(!defines_reward(&version));
    let err = score(&host, &version, &samples(&completions, &rows)).unwrap_err().to_string();
    assert!(err.contains("none.rhai") && err.contains("no reward"), "{err}");
}

#[test]
fn a_bad_reward_is_an_error_naming_file_and_line() {
    let sb = Sandbox::new();
    let completions = ["ab".to_string(), "abcd".to_string()];
    let rows = [serde_json::json!({}), serde_json::json!({})];
    let cases = [
        (
            "string",
            "fn loss(b, p) { 0.0 }\nfn reward(prompt, completion) {\n    \"good\"\n}",
            "string.rhai:2",
            "returned string, expected a number",
        ),
        (
            "nan",
            "\nfn reward(prompt, completion) { if completion.len() > 2 { 0.0 / 0.0 } else { 1.0 } }",
            "nan.rhai:2",
            "sample 1 returned NaN, expected a finite number",
        ),
        (
            "throws",
            "fn reward(prompt, completion) {\n    if completion.len() > 2 { throw \"too long\"; }\n    1.0\n}",
            "throws.rhai:2",
            "too long",
        ),
        (
            "short",
            "fn rewards(prompts, completions, rows) {\n    [1.0]\n}",
            "short.rhai:1",
            "returned 1 values for 2 samples",
        ),
        (
            "not_array",
            "fn rewards(prompts, completions, rows) { 1.0 }",
            "not_array.rhai:1",
            "expected an array of numbers",
        ),
        (
            "bad_item",
            "fn rewards(prompts, completions, rows) { [1.0, \"x\"] }",
            "bad_item.rhai:1",
            "rewards()[1] returned string",
        ),
    ];
    for (name, source, at, message) in cases {
        let (host, version) = load(&sb, name, source);
        let err = score(&host, &version, &samples(&completions, &rows)).unwrap_err().to_string();
        assert!(err.contains(at) && err.contains(message), "{name}: {err}");
    }
    // The exact-answer plugin refuses rows without an answer, naming its line.
    let (host, version) = load(
        &sb,
        "exact",
        "import \"rewards/exact_answer\" as exact;\nfn reward(prompt, completion, row) { exact::reward(prompt, completion, row) }\n",
    );
    let err = score(&host, &version, &samples(&completions, &rows)).unwrap_err().to_string();
    assert!(err.contains("exact_answer.rhai") && err.contains("no `answer` field"), "{err}");
}
