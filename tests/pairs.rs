//! `host pairs`: MetaMath-style and multiple-choice pairs from labelled rows, with the
//! edit-distance statistics; unusable rows are skipped, counted and named by file:line.

mod common;

use common::{run_host, text};

fn stats(out: &std::path::Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(out.with_extension("stats.json")).unwrap()).unwrap()
}

#[test]
fn metamath_pairs_differ_in_one_intermediate_result() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("pairs.jsonl");
    let o = run_host(&[
        "pairs",
        "--from",
        "data/arithmetic/sft.jsonl",
        "--style",
        "metamath",
        "--out",
        out.to_str().unwrap(),
        "--tokenizer",
        "data/arithmetic/tokenizer.json",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let rows = common::read_lines(&out);
    assert_eq!(rows.len(), 4000);
    for row in &rows[..200] {
        let (c, r) = (row["chosen"].as_str().unwrap(), row["rejected"].as_str().unwrap());
        assert_ne!(c, r);
        let tail = |s: &str| s[s.rfind("The answer is").unwrap()..].to_string();
        assert_eq!(tail(c), tail(r), "final answer kept");
        let differing = c.split(' ').zip(r.split(' ')).filter(|(a, b)| a != b).count();
        assert_eq!(differing, 1, "{c} / {r}");
    }
    let s = stats(&out);
    assert_eq!(s["edit_distance"]["unit"], "tokens");
    let mean = s["edit_distance"]["mean"].as_f64().unwrap();
    assert!(mean > 0.0 && mean < 0.2, "a one-number edit is a small distance: {mean}");
    let counted: u64 =
        s["edit_distance"]["histogram"].as_array().unwrap().iter().map(|b| b["pairs"].as_u64().unwrap()).sum();
    assert_eq!(counted, 4000);
    assert!(out.with_extension("edit_distance.png").is_file());
}

#[test]
fn choice_pairs_pair_the_answer_with_each_wrong_choice() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("mc.jsonl");
    std::fs::write(
        &input,
        concat!(
            "{\"question\": \"2+2?\", \"choices\": [\"3\", \"4\", \"5\"], \"answer\": 1}\n",
            "{\"question\": \"Q\", \"choices\": {\"text\": [\"a\", \"b\"], \"label\": [\"A\", \"B\"]}, \"answerKey\": \"B\"}\n",
            "{\"ctx\": \"He opens the door\", \"endings\": [\"and walks in.\", \"and flies.\"], \"label\": \"0\"}\n",
            "{\"question\": \"no answer\", \"choices\": [\"a\", \"b\"]}\n",
            "{broken\n",
        ),
    )
    .unwrap();
    let out = dir.path().join("pairs.jsonl");
    let o =
        run_host(&["pairs", "--from", input.to_str().unwrap(), "--style", "choice", "--out", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let rows = common::read_lines(&out);
    assert_eq!(rows.len(), 4);
    assert_eq!((rows[0]["chosen"].as_str(), rows[0]["rejected"].as_str()), (Some(" 4"), Some(" 3")));
    assert_eq!(rows[2]["chosen"].as_str(), Some(" b"));
    assert_eq!(rows[3]["prompt"].as_str(), Some("He opens the door"));
    // The two bad rows are counted and named.
    let report = text(&o);
    assert!(report.contains("mc.jsonl:4") && report.contains("mc.jsonl:5"), "{report}");
    let s = stats(&out);
    assert_eq!((s["rows"].as_u64(), s["pairs"].as_u64()), (Some(5), Some(4)));
    assert_eq!(s["skipped"]["malformed JSON"]["count"].as_u64(), Some(1));
}

#[test]
fn no_usable_rows_is_an_error_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("rows.jsonl");
    std::fs::write(&input, "{\"prompt\": \"Q\", \"completion\": \"no results here\"}\n").unwrap();
    let out = dir.path().join("pairs.jsonl");
    let o =
        run_host(&["pairs", "--from", input.to_str().unwrap(), "--style", "metamath", "--out", out.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(text(&o).contains("rows.jsonl:1") && text(&o).contains("no intermediate result"), "{}", text(&o));
    assert!(!out.exists() && !out.with_extension("stats.json").exists());
    // The output may not be the input.
    let o = run_host(&[
        "pairs",
        "--from",
        input.to_str().unwrap(),
        "--style",
        "metamath",
        "--out",
        input.to_str().unwrap(),
    ]);
    assert!(!o.status.success() && text(&o).contains("overwrite the input"), "{}", text(&o));
}
