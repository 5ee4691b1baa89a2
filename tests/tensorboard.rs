//! TensorBoard event files and throughput: every logged scalar of metrics.jsonl is in
//! `RUN_DIR/tb/events.out.tfevents.*` (record framing and CRCs checked on read), events are
//! text summaries, a resumed run's file makes TensorBoard drop the interrupted run's points
//! past its checkpoint; TensorBoard's own reader sees the same values where the Python
//! package is installed (CI installs it). Throughput is HF Trainer's names and arithmetic.

mod common;
use common::*;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use prefhost::report::tensorboard::{Event, read_events};

/// Batches of 4 rows, 2 micro-batches a step, logged every `log_every` steps.
fn script(steps: usize, log_every: usize, extra: &str) -> String {
    let config = small_config(&format!(
        "max_steps: {steps}, seed: 3, grad_accum: 2, save_every: 4, params: #{{ beta: 0.1 }}, {extra}"
    ));
    let config = config
        .replace("batch_size: 8,", "batch_size: 4,")
        .replace("log_every: 1,", &format!("log_every: {log_every},"));
    format!("import \"losses/dpo\" as dpo;\nfn loss(b, p) {{ dpo::loss(b, p) }}\ntrain({config});\n")
}

/// metrics.jsonl as written (wall-clock values included).
fn raw_lines(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap().lines().map(parse_exactly).collect()
}

/// A metrics line with each number read by Rust's correctly rounded `f64::from_str`:
/// serde_json's default float parsing can land one ulp off (it read 0.21340220421552658 as
/// …655), which flips the f32 a TensorBoard scalar holds when the value sits on an f32
/// rounding midpoint, as means of f32 values can. (Event lines stay as serde_json reads
/// them: they are compared with TensorBoard's text of them, which serde_json reads too.)
fn parse_exactly(line: &str) -> serde_json::Value {
    let mut value: serde_json::Value = serde_json::from_str(line).unwrap();
    if value.get("event").is_some() {
        return value;
    }
    for (key, v) in value.as_object_mut().unwrap() {
        if !v.is_f64() {
            continue;
        }
        let at = line.find(&format!("{}:", serde_json::to_string(key).unwrap())).unwrap() + key.len() + 3;
        let text = &line[at..][..line[at..].find([',', '}']).unwrap()];
        *v = serde_json::json!(text.parse::<f64>().unwrap());
    }
    value
}

fn event_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir.join("tb")).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    assert!(
        files.iter().all(|f| f.file_name().unwrap().to_str().unwrap().starts_with("events.out.tfevents.")),
        "{files:?}"
    );
    files
}

type ByStepAndTag<T> = BTreeMap<(i64, String), T>;

/// (step, tag) → value of every scalar, and (step, tag) → text of every text summary, after
/// TensorBoard's rule for a SessionLog START at step s: points of earlier files at steps ≥ s
/// are dropped.
fn tensorboard_view(files: &[PathBuf]) -> (ByStepAndTag<f32>, ByStepAndTag<String>) {
    let (mut scalars, mut texts) = (BTreeMap::new(), BTreeMap::new());
    for file in files {
        for event in read_events(file).unwrap() {
            if let Some(start) = event.session_log.as_ref().filter(|s| s.status == 1).map(|_| event.step) {
                scalars.retain(|(step, _): &(i64, String), _| *step < start);
                texts.retain(|(step, _): &(i64, String), _| *step < start);
            }
            for value in event.summary.iter().flat_map(|s| &s.value) {
                match (&value.simple_value, &value.tensor) {
                    (Some(v), _) => {
                        scalars.insert((event.step, value.tag.clone()), *v);
                    }
                    (None, Some(tensor)) => {
                        assert_eq!(value.metadata.as_ref().unwrap().plugin_data.as_ref().unwrap().plugin_name, "text");
                        texts.insert(
                            (event.step, value.tag.clone()),
                            String::from_utf8(tensor.string_val[0].clone()).unwrap(),
                        );
                    }
                    _ => panic!("{}: a value with neither a scalar nor a tensor: {value:?}", file.display()),
                }
            }
        }
    }
    (scalars, texts)
}

/// Every number of every step line, and every event line, as TensorBoard holds them.
fn assert_same_as_metrics(dir: &Path, scalars: &BTreeMap<(i64, String), f32>, texts: &BTreeMap<(i64, String), String>) {
    let mut expected_scalars = 0;
    for line in raw_lines(dir) {
        let step = line["step"].as_i64().unwrap();
        if let Some(event) = line["event"].as_str() {
            let text = texts.get(&(step, format!("events/{event}"))).unwrap_or_else(|| panic!("no text for {line}"));
            let shown: serde_json::Value =
                serde_json::from_str(text.trim_start_matches("```\n").trim_end_matches("\n```")).unwrap();
            assert_eq!(shown, line);
            continue;
        }
        for (key, value) in line.as_object().unwrap() {
            if key == "step" || key == "epoch" {
                continue;
            }
            let got = scalars.get(&(step, key.clone())).unwrap_or_else(|| panic!("step {step}: no scalar {key}"));
            assert_eq!(*got, value.as_f64().unwrap() as f32, "step {step} {key}");
            expected_scalars += 1;
        }
    }
    assert_eq!(scalars.len(), expected_scalars, "TensorBoard holds scalars metrics.jsonl does not");
}

#[test]
fn every_logged_scalar_and_event_is_in_the_event_files() {
    let sb = Sandbox::new();
    let path = sb.write("scripts/tb.rhai", &script(6, 1, "log_param_grad_norms: true,"));
    let dir = sb.path("run");
    let out = run_host(&["run", path.to_str().unwrap(), "--no-watch", "--run-dir", dir.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let files = event_files(&dir);
    assert_eq!(files.len(), 1);
    let events: Vec<Event> = read_events(&files[0]).unwrap();
    assert_eq!(events[0].file_version.as_deref(), Some("brain.Event:2"));
    let (scalars, texts) = tensorboard_view(&files);
    assert_same_as_metrics(&dir, &scalars, &texts);
    assert!(
        texts.contains_key(&(6, "events/train_summary".to_string()))
            && texts.contains_key(&(1, "events/param_grad_norms".to_string())),
        "{:?}",
        texts.keys()
    );

    // The framing is checked: a flipped byte in a record's data, and a cut-off record, are
    // errors naming the file and the record's offset.
    let bytes = std::fs::read(&files[0]).unwrap();
    let first_record = 12 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize + 4;
    let mut flipped = bytes.clone();
    flipped[first_record + 20] ^= 0x10;
    std::fs::write(&files[0], &flipped).unwrap();
    let err = format!("{:#}", read_events(&files[0]).unwrap_err());
    assert!(err.contains(&format!("record at byte {first_record}")) && err.contains("CRC"), "{err}");
    std::fs::write(&files[0], &bytes[..bytes.len() - 3]).unwrap();
    let err = format!("{:#}", read_events(&files[0]).unwrap_err());
    assert!(err.contains("cut short"), "{err}");
}

/// Samples are rows, steps optimizer steps (HF Trainer's train_samples_per_second and
/// train_steps_per_second): per interval their ratio is the rows per step; tokens per
/// sample lie within the data's row sizes; the summary's train_loss is the mean step loss.
#[test]
fn throughput_is_logged_per_interval_and_summed_up_at_the_end() {
    let sb = Sandbox::new();
    let path = sb.write("scripts/tp.rhai", &script(6, 2, ""));
    let dir = sb.path("run");
    let out = run_host(&["run", path.to_str().unwrap(), "--no-watch", "--run-dir", dir.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("train_samples_per_second=") && text(&out).contains("train summary: "),
        "{}",
        text(&out)
    );
    let lines = raw_lines(&dir);
    let steps: Vec<&serde_json::Value> = lines.iter().filter(|l| l.get("loss").is_some()).collect();
    assert_eq!(steps.len(), 3);
    // A row's tokens: prompt + chosen and prompt + rejected, as the run loads them.
    let tokenizer =
        prefhost::data::TextTokenizer::load(&repo().join("models/tiny-math/tokenizer.json"), Some(1), Some(2)).unwrap();
    let limits = prefhost::data::Truncation { max_length: 256, max_prompt_length: 128 };
    let (rows, _) =
        prefhost::data::load_examples(&repo().join("data/arithmetic/pairs.jsonl"), &tokenizer, true, limits, false)
            .unwrap();
    let sizes: Vec<usize> = rows.iter().map(|r| 2 * r.prompt.len() + r.chosen.len() + r.rejected.len()).collect();
    let (fewest, most) = (*sizes.iter().min().unwrap(), *sizes.iter().max().unwrap());
    assert!(fewest < most);
    for line in &steps {
        let rate = |k: &str| line[k].as_f64().unwrap_or_else(|| panic!("no {k} in {line}"));
        assert!(rate("train_steps_per_second") > 0.0);
        let rows_per_step = rate("train_samples_per_second") / rate("train_steps_per_second");
        assert!((rows_per_step - 8.0).abs() < 1e-9, "batch 4 × accumulation 2: {rows_per_step}");
        let tokens_per_row = rate("train_tokens_per_second") / rate("train_samples_per_second");
        assert!(
            (fewest as f64..=most as f64).contains(&tokens_per_row),
            "{tokens_per_row} tokens a row, the data's rows hold {fewest} to {most}"
        );
    }
    let summary = lines.iter().find(|l| l["event"] == "train_summary").expect("a train_summary line");
    assert_eq!(summary["step"], 6);
    assert!(summary["train_runtime"].as_f64().unwrap() > 0.0);
    let samples_per_step =
        summary["train_samples_per_second"].as_f64().unwrap() / summary["train_steps_per_second"].as_f64().unwrap();
    assert!((samples_per_step - 8.0).abs() < 1e-9, "{summary}");
    // With log_every 2 each line's loss is the mean of two steps: their mean is the run's.
    let mean_loss = steps.iter().map(|l| l["loss"].as_f64().unwrap()).sum::<f64>() / 3.0;
    assert!((summary["train_loss"].as_f64().unwrap() - mean_loss).abs() < 1e-12, "{summary} vs {mean_loss}");
}

/// A run killed after a checkpoint and resumed: the resumed file starts with SessionLog
/// START at its first step; with TensorBoard's rule the two files hold metrics.jsonl's
/// values exactly once. TensorBoard's own reader agrees.
#[test]
fn a_resumed_run_reads_back_as_one_run() {
    let sb = Sandbox::new();
    let dir = assert_resume_reproduces(&sb, "tb", &script(16, 1, ""), 16, 4);
    let files = event_files(&dir);
    assert_eq!(files.len(), 2, "{files:?}");
    let resumed = read_events(&files[1]).unwrap();
    let start = resumed[1].session_log.as_ref().map(|s| (s.status, resumed[1].step));
    let lines = loss_lines(&dir);
    let first_resumed_step = start.expect("SessionLog START after the file version").1;
    assert_eq!(start.unwrap().0, 1);
    assert!(first_resumed_step % 4 == 1 && first_resumed_step > 1, "resumed after a checkpoint: {first_resumed_step}");
    let (scalars, texts) = tensorboard_view(&files);
    assert_same_as_metrics(&dir, &scalars, &texts);
    assert_eq!(scalars.keys().filter(|(_, tag)| tag == "loss").count(), lines.len());

    // TensorBoard's EventAccumulator, where installed.
    let Some(python) = python_with("tensorboard") else { return };
    let out = std::process::Command::new(&python)
        .arg(repo().join("tests/fixtures/read_tfevents.py"))
        .arg(dir.join("tb"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let read: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut seen = BTreeMap::new();
    for (tag, points) in read["scalars"].as_object().unwrap() {
        for point in points.as_array().unwrap() {
            let previous = seen.insert((point[0].as_i64().unwrap(), tag.clone()), point[1].as_f64().unwrap() as f32);
            assert!(previous.is_none(), "TensorBoard shows step {} of {tag} twice", point[0]);
        }
    }
    assert_eq!(seen, scalars, "TensorBoard's reader and metrics.jsonl");
    let summary = &read["texts"]["events/train_summary"][0];
    assert_eq!(summary[0], 16);
    assert!(summary[1].as_str().unwrap().contains("train_runtime"), "{summary}");
}
