//! A disk that fills up: `host run` under a file-size limit (`prlimit --fsize`, util-linux),
//! so that a write past it fails with EFBIG as a full disk fails with ENOSPC (the host
//! ignores SIGXFSZ, so the write returns the error instead of the signal killing it). A
//! checkpoint save that fails leaves the earlier checkpoints intact and the run stops,
//! naming the checkpoint and the OS error; `--resume` without the limit reproduces the
//! uninterrupted run. A metrics line that fails is taken back whole.

mod common;
use common::*;

use std::path::{Path, PathBuf};
use std::process::Output;

/// `host ARGS` with every file it writes limited to `bytes`.
fn run_limited(bytes: u64, args: &[&str]) -> Output {
    let found = std::process::Command::new("prlimit").arg("--version").output();
    assert!(found.is_ok_and(|o| o.status.success()), "these tests need prlimit (util-linux) on PATH");
    std::process::Command::new("prlimit")
        .arg(format!("--fsize={bytes}"))
        .arg(host_binary())
        .args(args)
        .current_dir(repo())
        .output()
        .expect("prlimit runs")
}

/// Every file under `dir`, with its size.
fn files(dir: &Path) -> Vec<(PathBuf, u64)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_dir() {
            found.extend(files(&entry.path()));
        } else {
            found.push((entry.path(), entry.metadata().unwrap().len()));
        }
    }
    found
}

/// Every line of metrics.jsonl parses and the file ends with a newline (no torn line).
fn assert_parses_line_by_line(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(
        text.is_empty() || text.ends_with('\n'),
        "{}: ends in a torn line: {:?}",
        path.display(),
        &text[text.len().saturating_sub(80)..]
    );
    for (i, line) in text.lines().enumerate() {
        serde_json::from_str::<serde_json::Value>(line)
            .unwrap_or_else(|e| panic!("{}:{}: {e}: {line}", path.display(), i + 1));
    }
    text
}

/// 12 steps, a checkpoint every 4. From the fifth step on, the loss keeps 900 000 numbers
/// in its state (about 10 MB as JSON), so checkpoint-8's trainer_state.json is larger than any file written before
/// it: a limit between the two fails that save and nothing earlier.
#[test]
fn a_checkpoint_save_past_the_limit_keeps_the_last_checkpoint_and_resume_reproduces_the_run() {
    let sb = Sandbox::new();
    let body = "    let out = dpo::loss(b, p);\n    if p.step >= 4 {\n        let pad = [];\n        pad.pad(900000, 1.5);\n        out.state = #{ pad: pad };\n    }\n    out";
    let path = sb.write(
        "scripts/exp.rhai",
        &format!(
            "import \"losses/dpo\" as dpo;\nfn loss(b, p) {{\n{body}\n}}\ntrain({});\n",
            small_config("max_steps: 12, seed: 3, save_every: 4, params: #{ beta: 0.1 },")
        ),
    );
    let (whole, full) = (sb.path("whole"), sb.path("full"));
    let out = run_host(&["run", path.to_str().unwrap(), "--no-watch", "--run-dir", whole.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let big_state = whole.join("checkpoint-8/trainer_state.json");
    let written_before: u64 = files(&whole)
        .into_iter()
        .filter(|(p, _)| {
            !p.ends_with("checkpoint-8/trainer_state.json") && !p.ends_with("checkpoint-12/trainer_state.json")
        })
        .map(|(_, size)| size)
        .max()
        .unwrap();
    let limit = written_before + 4096;
    assert!(
        std::fs::metadata(&big_state).unwrap().len() > limit,
        "the test's premise: checkpoint-8's state is the first file over the limit"
    );

    let out = run_limited(limit, &["run", path.to_str().unwrap(), "--no-watch", "--run-dir", full.to_str().unwrap()]);
    let said = text(&out);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(
        said.contains("checkpoint-8: the checkpoint could not be saved") && said.contains("trainer_state.json"),
        "{said}"
    );
    assert!(said.contains("File too large (os error 27)"), "the OS error: {said}");
    assert!(said.contains(&format!("host run --resume {}", full.display())), "{said}");
    // Nothing half-written stays: no checkpoint-8, no staging folder taking up space.
    assert!(!full.join("checkpoint-8").exists());
    let left: Vec<String> =
        std::fs::read_dir(&full).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert!(!left.iter().any(|n| n.starts_with(".checkpoint")), "{left:?}");
    assert!(!full.join(prefhost::train::lock::LOCK_FILE).exists(), "the lock outlived the failed run");
    // The earlier checkpoint verifies and is the one a resume takes.
    assert!(prefhost::model::weights::verify_manifest(&full.join("checkpoint-4")).unwrap());
    let verify = run_host(&["verify", full.to_str().unwrap()]);
    assert!(verify.status.success() && text(&verify).contains("checkpoint-4: ok"), "{}", text(&verify));
    assert_parses_line_by_line(&full.join("metrics.jsonl"));
    assert_eq!(loss_lines(&full), loss_lines(&whole)[..8], "the steps run before the failed save were logged");

    let out = run_host(&["run", "--resume", full.to_str().unwrap(), "--no-watch"]);
    assert!(out.status.success() && text(&out).contains("checkpoint-4 (step 4)"), "{}", text(&out));
    assert_parses_line_by_line(&full.join("metrics.jsonl"));
    assert_eq!(loss_lines(&full), loss_lines(&whole), "the resumed run must reproduce the uninterrupted one");
}

/// No checkpoint before the end; the limit falls in the middle of a metrics line, so the
/// write puts part of the line down and then fails. The part is taken back: the log ends
/// with the last whole line, and the run stops naming metrics.jsonl and the OS error.
#[test]
fn a_metrics_line_past_the_limit_is_taken_back_whole() {
    let sb = Sandbox::new();
    let path = sb.write(
        "scripts/exp.rhai",
        &format!(
            "import \"losses/dpo\" as dpo;\nfn loss(b, p) {{ dpo::loss(b, p) }}\ntrain({});\n",
            small_config("max_steps: 12, seed: 3, save_every: 100, params: #{ beta: 0.1 },")
        ),
    );
    let (whole, full) = (sb.path("whole"), sb.path("full"));
    let out = run_host(&["run", path.to_str().unwrap(), "--no-watch", "--run-dir", whole.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    // The largest file the run writes before its metrics grow (identity.json, sources...).
    let others = files(&whole)
        .into_iter()
        .filter(|(p, _)| {
            !p.starts_with(whole.join("checkpoint-12")) && !p.ends_with("metrics.jsonl") && !p.ends_with("memory.json")
        })
        .map(|(_, size)| size)
        .max()
        .unwrap();
    let log = std::fs::read_to_string(whole.join("metrics.jsonl")).unwrap();
    let ends: Vec<u64> = log.match_indices('\n').map(|(i, _)| i as u64 + 1).collect();
    // The first line that starts past every other file's size: the limit cuts it in half.
    let k = ends.iter().position(|&end| end > others).expect("the log outgrows the other files") + 1;
    assert!(k + 1 < ends.len(), "{ends:?} vs {others}");
    let (kept, limit) = (ends[k - 1], ends[k - 1] + (ends[k] - ends[k - 1]) / 2);

    let out = run_limited(limit, &["run", path.to_str().unwrap(), "--no-watch", "--run-dir", full.to_str().unwrap()]);
    let said = text(&out);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(
        said.contains(&format!(
            "{}: cannot write a metrics line (the log was cut back to its last whole line)",
            full.join("metrics.jsonl").display()
        )),
        "{said}"
    );
    assert!(said.contains("File too large (os error 27)"), "{said}");
    let text_now = assert_parses_line_by_line(&full.join("metrics.jsonl"));
    // Throughput values are wall-clock, so this run's lines differ from the uninterrupted
    // run's by a few bytes: the cut is checked against the limit, the content without them.
    // Not taken back, the file would be exactly `limit` bytes and end inside a line.
    let longest_line = ends.windows(2).map(|w| w[1] - w[0]).max().unwrap();
    let now = text_now.len() as u64;
    assert!(
        text_now.ends_with('\n') && now < limit,
        "the part of the line that fitted was not taken back ({now} bytes, limit {limit})"
    );
    assert!(
        limit - now <= longest_line + 32,
        "stopped at the line that crossed the limit ({now} bytes kept of {limit}; about {kept} expected)"
    );
    let (lines_now, lines_whole) = (read_lines(&full.join("metrics.jsonl")), read_lines(&whole.join("metrics.jsonl")));
    assert!(
        !lines_now.is_empty() && lines_now[..] == lines_whole[..lines_now.len()],
        "the lines before it are the uninterrupted run's"
    );
}
