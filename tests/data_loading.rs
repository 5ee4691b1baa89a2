//! Training data: Parquet rows load exactly like the same rows in JSONL; bad rows stop
//! the load naming file:line, or with skip_bad_rows are left out, listed and counted.

mod common;

use std::path::Path;
use std::sync::Arc;

use parquet::data_type::{BoolType, ByteArray, ByteArrayType};
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::parser::parse_message_type;
use prefhost::data::{TextTokenizer, Truncation, load_examples, load_unpaired_examples};

fn tokenizer() -> TextTokenizer {
    TextTokenizer::load(&common::repo().join("models/tiny-math/tokenizer.json"), Some(1), Some(2)).unwrap()
}

const LIMITS: Truncation = Truncation { max_length: 256, max_prompt_length: 128 };

/// Writes string columns to a Parquet file (snappy-compressed, as HF datasets are).
fn write_parquet(path: &Path, columns: &[(&str, Vec<String>)]) {
    write_parquet_with_labels(path, columns, None);
}

/// The same, plus a boolean `label` column (KTO's unpaired rows) when given.
fn write_parquet_with_labels(path: &Path, columns: &[(&str, Vec<String>)], labels: Option<&[bool]>) {
    let mut fields: Vec<String> =
        columns.iter().map(|(name, _)| format!("REQUIRED BYTE_ARRAY {name} (UTF8);")).collect();
    if labels.is_some() {
        fields.push("REQUIRED BOOLEAN label;".into());
    }
    let schema = Arc::new(parse_message_type(&format!("message rows {{ {} }}", fields.join(" "))).unwrap());
    let props = Arc::new(WriterProperties::builder().set_compression(parquet::basic::Compression::SNAPPY).build());
    let mut writer = SerializedFileWriter::new(std::fs::File::create(path).unwrap(), schema, props).unwrap();
    let mut group = writer.next_row_group().unwrap();
    for (_, values) in columns {
        let mut column = group.next_column().unwrap().unwrap();
        let data: Vec<ByteArray> = values.iter().map(|v| ByteArray::from(v.as_str())).collect();
        column.typed::<ByteArrayType>().write_batch(&data, None, None).unwrap();
        column.close().unwrap();
    }
    if let Some(labels) = labels {
        let mut column = group.next_column().unwrap().unwrap();
        column.typed::<BoolType>().write_batch(labels, None, None).unwrap();
        column.close().unwrap();
    }
    group.close().unwrap();
    writer.close().unwrap();
}

#[test]
fn parquet_rows_load_like_the_same_jsonl_rows() {
    let jsonl = common::repo().join("data/arithmetic/pairs.jsonl");
    let rows: Vec<serde_json::Value> = common::read_lines(&jsonl).into_iter().take(50).collect();
    let column = |key: &str| rows.iter().map(|r| r[key].as_str().unwrap().to_string()).collect::<Vec<_>>();
    let dir = tempfile::tempdir().unwrap();
    let parquet = dir.path().join("pairs.parquet");
    write_parquet(
        &parquet,
        &[("prompt", column("prompt")), ("chosen", column("chosen")), ("rejected", column("rejected"))],
    );
    let small_jsonl = dir.path().join("pairs.jsonl");
    std::fs::write(&small_jsonl, rows.iter().map(|r| format!("{r}\n")).collect::<String>()).unwrap();

    let tok = tokenizer();
    let (from_parquet, _) = load_examples(&parquet, &tok, true, LIMITS, false).unwrap();
    let (from_jsonl, _) = load_examples(&small_jsonl, &tok, true, LIMITS, false).unwrap();
    assert_eq!(from_parquet.len(), 50);
    for (a, b) in from_parquet.iter().zip(&from_jsonl) {
        assert_eq!((&a.prompt, &a.chosen, &a.rejected, a.line), (&b.prompt, &b.chosen, &b.rejected, b.line));
    }

    // A row with a missing column is named by its row number.
    let partial = dir.path().join("partial.parquet");
    write_parquet(&partial, &[("prompt", vec!["Q".into()]), ("chosen", vec!["A".into()])]);
    let err = format!("{:#}", load_examples(&partial, &tok, true, LIMITS, false).unwrap_err());
    assert!(err.contains("partial.parquet: row 1") && err.contains("rejected"), "{err}");

    // Truncated and corrupt files are refused with the file's name, never a panic.
    let bytes = std::fs::read(&parquet).unwrap();
    for (name, damaged) in [
        ("cut.parquet", bytes[..bytes.len() / 2].to_vec()),
        ("zeros.parquet", {
            let mut b = bytes.clone();
            let mid = b.len() / 3;
            b[mid..mid + 64].fill(0);
            b
        }),
    ] {
        let path = dir.path().join(name);
        std::fs::write(&path, damaged).unwrap();
        let result =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| load_examples(&path, &tok, true, LIMITS, false)));
        let err = format!("{:#}", result.expect("no panic").expect_err(name));
        assert!(err.contains(name), "{err}");
    }
}

#[test]
fn unpaired_parquet_rows_load_like_the_same_jsonl_rows() {
    let pairs: Vec<serde_json::Value> =
        common::read_lines(&common::repo().join("data/arithmetic/pairs.jsonl")).into_iter().take(20).collect();
    let rows: Vec<(String, String, bool)> = pairs
        .iter()
        .enumerate()
        .map(|(i, r)| {
            (
                r["prompt"].as_str().unwrap().to_string(),
                r[if i % 3 == 0 { "rejected" } else { "chosen" }].as_str().unwrap().to_string(),
                i % 3 != 0,
            )
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let parquet = dir.path().join("kto.parquet");
    let labels: Vec<bool> = rows.iter().map(|r| r.2).collect();
    write_parquet_with_labels(
        &parquet,
        &[
            ("prompt", rows.iter().map(|r| r.0.clone()).collect()),
            ("completion", rows.iter().map(|r| r.1.clone()).collect()),
        ],
        Some(&labels),
    );
    let jsonl = dir.path().join("kto.jsonl");
    let lines: String = rows
        .iter()
        .map(|(p, c, l)| format!("{}\n", serde_json::json!({ "prompt": p, "completion": c, "label": l })))
        .collect();
    std::fs::write(&jsonl, lines).unwrap();

    let tok = tokenizer();
    let (from_parquet, _) = load_unpaired_examples(&parquet, &tok, LIMITS, false, false).unwrap();
    let (from_jsonl, _) = load_unpaired_examples(&jsonl, &tok, LIMITS, false, false).unwrap();
    assert_eq!(from_parquet.len(), 20);
    for (a, b) in from_parquet.iter().zip(&from_jsonl) {
        assert_eq!((&a.prompt, &a.chosen, a.label, a.line), (&b.prompt, &b.chosen, b.label, b.line));
    }
    assert_eq!(from_parquet.iter().filter(|e| e.label == Some(false)).count(), 7);
}

#[test]
fn bad_rows_stop_the_load_or_are_skipped_and_listed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rows.jsonl");
    let good = r#"{"prompt": "Question: 1+1?\nAnswer:", "chosen": " 2", "rejected": " 3"}"#;
    let mut bytes = Vec::new();
    for line in [
        good,
        "{not json",
        r#"{"prompt": "Q", "chosen": "A"}"#,
        good,
        r#"{"prompt": "Q", "chosen": "", "rejected": "B"}"#,
    ] {
        bytes.extend_from_slice(line.as_bytes());
        bytes.push(b'\n');
    }
    bytes.extend([0xff, 0xfe, b'\n']);
    std::fs::write(&path, &bytes).unwrap();
    let tok = tokenizer();

    let err = format!("{:#}", load_examples(&path, &tok, true, LIMITS, false).unwrap_err());
    assert!(err.contains("rows.jsonl:2"), "strict loading names the first bad row: {err}");

    let (examples, report) = load_examples(&path, &tok, true, LIMITS, true).unwrap();
    assert_eq!(examples.len(), 2);
    let lines: Vec<&str> = report.skipped.iter().map(|(at, _)| at.rsplit(':').next().unwrap()).collect();
    assert_eq!(lines, vec!["2", "3", "5", "6"]);
    assert!(
        report.skipped[1].1.contains("rejected")
            && report.skipped[2].1.contains("empty")
            && report.skipped[3].1.contains("UTF-8"),
        "{:?}",
        report.skipped
    );
}

#[test]
fn a_run_with_skip_bad_rows_reports_what_it_left_out() {
    let sb = common::Sandbox::new();
    let mut data = std::fs::read_to_string(common::repo().join("data/arithmetic/pairs.jsonl")).unwrap();
    data.push_str("{\"prompt\": \"Q\"}\n");
    let data_path = sb.write("data.jsonl", &data);
    let source = format!(
        "import \"losses/dpo\" as dpo;\nfn loss(b, p) {{ dpo::loss(b, p) }}\ntrain(#{{ model: \"models/tiny-math\", data: \"{}\", max_steps: 1, progress: false, skip_bad_rows: true }});\n",
        data_path.display()
    );
    let script = sb.write("scripts/skip.rhai", &source);
    let run_dir = sb.path("runs/skip");
    let out =
        common::run_host(&["run", script.to_str().unwrap(), "--no-watch", "--run-dir", run_dir.to_str().unwrap()]);
    assert!(out.status.success(), "{}", common::text(&out));
    assert!(
        common::text(&out).contains("1 row(s) of") && common::text(&out).contains("data.jsonl:1201"),
        "{}",
        common::text(&out)
    );
    let events = common::read_lines(&run_dir.join("metrics.jsonl"));
    let skipped = events.iter().find(|e| e["event"] == "data_rows_skipped").expect("a data_rows_skipped event");
    assert_eq!(skipped["count"].as_u64(), Some(1));
}

#[test]
fn pairs_and_heldout_rows_are_read_from_parquet_too() {
    let dir = tempfile::tempdir().unwrap();
    let sft = std::fs::read_to_string(common::repo().join("data/arithmetic/sft.jsonl")).unwrap();
    let rows: Vec<serde_json::Value> = sft.lines().take(50).map(|l| serde_json::from_str(l).unwrap()).collect();
    let column = |key: &str| rows.iter().map(|r| r[key].as_str().unwrap().to_string()).collect::<Vec<_>>();
    let parquet = dir.path().join("metamath.parquet");
    write_parquet(&parquet, &[("query", column("prompt")), ("response", column("completion"))]);

    let (pairs, report) =
        prefhost::data::build_pairs::build_pairs(&parquet, prefhost::data::build_pairs::PairStyle::Metamath, 7)
            .unwrap();
    assert_eq!(report.rows, 50);
    assert_eq!(pairs.len() + report.skipped_count(), 50);
    assert!(pairs.len() >= 45, "only {} of 50 rows gave pairs", pairs.len());
    for (pair, row) in pairs.iter().zip(&rows) {
        assert_eq!(pair.prompt, row["prompt"].as_str().unwrap());
        assert_ne!(pair.chosen, pair.rejected);
    }

    let eval = dir.path().join("eval.parquet");
    write_parquet(&eval, &[("prompt", vec!["Q1".into(), "Q2".into()]), ("answer", vec!["4".into(), "7".into()])]);
    let heldout = prefhost::train::evaluate::load_eval_rows(&eval, None).unwrap();
    assert_eq!(heldout.iter().map(|r| r.answer.as_str()).collect::<Vec<_>>(), ["4", "7"]);
    assert_eq!(heldout[1].line, 2);
}
