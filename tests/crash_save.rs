//! A crash during a checkpoint save itself. The process is aborted at each named point of
//! the save (the PREFHOST_FAILPOINT hook) and SIGKILLed at seeded random moments around
//! it; every time, the run folder's latest checkpoint is a complete one that loads, no
//! half-written `checkpoint-N` is taken, and `--resume` reproduces the uninterrupted run.

mod common;
use common::*;

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use burn::tensor::Device;
use prefhost::model::{load_adapter_model, load_model};
use prefhost::train::checkpoint::{latest_checkpoint, read_state};

const SIGABRT: i32 = 6;
const SIGKILL: i32 = 9;
/// A checkpoint after each of 3 steps: the crashes hit the second save (checkpoint-2).
const STEPS: usize = 3;
const FILES: [&str; 6] = [
    "model.safetensors",
    "config.json",
    "tokenizer.json",
    "trainer_state.json",
    "optimizer.bpk",
    "script_sources.json",
];

/// Two rows a step: these tests' time goes into steps (in debug builds, ~1 s each at 8 rows).
fn script(steps: usize, extra: &str) -> String {
    let config =
        small_config(&format!("max_steps: {steps}, seed: 3, save_every: 1, params: #{{ beta: 0.1 }}, {extra}"));
    format!(
        "import \"losses/dpo\" as dpo;\nfn loss(b, p) {{ dpo::loss(b, p) }}\ntrain({});\n",
        config.replace("batch_size: 8", "batch_size: 2")
    )
}

const LORA: &str = "lr: 2e-3, lora: #{ r: 4, lora_alpha: 8, lora_dropout: 0.1, target_modules: \"all-linear\" },";

/// `host run` on a new run folder (or `--resume` it), aborting at `failpoint` if given.
fn start(args: &[&str], failpoint: Option<&str>) -> Child {
    let mut cmd = host();
    cmd.args(args).arg("--no-watch").stdout(Stdio::null()).stderr(Stdio::piped());
    if let Some(point) = failpoint {
        cmd.env(prefhost::failpoint::VAR, point);
    }
    cmd.spawn().unwrap()
}

fn run_whole(sb: &Sandbox, script_path: &Path, name: &str) -> PathBuf {
    let dir = sb.path(name);
    let out = run_host(&["run", script_path.to_str().unwrap(), "--no-watch", "--run-dir", dir.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(loss_lines(&dir).len(), STEPS);
    dir
}

/// Runs until the failpoint aborts it, and checks it did.
fn crash_at(args: &[&str], failpoint: &str) {
    let out = start(args, Some(failpoint)).wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.signal(), Some(SIGABRT), "{failpoint}: the run was not aborted: {stderr}");
    assert!(stderr.contains(&format!("aborting at {failpoint}")), "{failpoint}: {stderr}");
}

fn hidden(dir: &Path) -> Vec<String> {
    let names = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned());
    names.filter(|n| n.starts_with('.')).collect()
}

/// The latest checkpoint is `checkpoint-{step}`, complete, and loads.
fn assert_latest_loads(dir: &Path, step: usize, lora: bool, what: &str) {
    let (found, ckpt) = latest_checkpoint(dir).unwrap_or_else(|e| panic!("{what}: {e:#}"));
    assert_eq!(found, step, "{what}: latest checkpoint");
    assert_eq!(read_state(&ckpt).unwrap().step, step, "{what}");
    assert!(
        ckpt.join("optimizer.bpk").is_file() && ckpt.join("script_sources.json").is_file(),
        "{what}: {} is incomplete",
        ckpt.display()
    );
    let device = Device::default();
    if lora {
        load_adapter_model(&ckpt, Some(&repo().join("models/tiny-math")), &device)
            .unwrap_or_else(|e| panic!("{what}: {e:#}"));
    } else {
        load_model(&ckpt, &device).unwrap_or_else(|e| panic!("{what}: {e:#}"));
    }
}

/// `--resume` continues from `checkpoint-{step}`, leaves no staging or moved-aside folder,
/// and ends with the uninterrupted run's metrics.
fn assert_resume_reproduces(dir: &Path, step: usize, whole: &Path, what: &str) {
    let out = run_host(&["run", "--resume", dir.to_str().unwrap(), "--no-watch"]);
    assert!(out.status.success(), "{what}: {}", text(&out));
    let from = format!("from {}", dir.join(format!("checkpoint-{step}")).display());
    assert!(text(&out).contains(&from), "{what}: expected a resume {from}: {}", text(&out));
    assert_eq!(hidden(dir), Vec::<String>::new(), "{what}");
    assert_eq!(loss_lines(whole), loss_lines(dir), "{what}: the resumed run must reproduce the uninterrupted one");
}

#[test]
fn a_crash_at_each_point_of_a_save_keeps_the_previous_checkpoint() {
    let sb = Sandbox::new();
    let path = sb.write("scripts/exp.rhai", &script(STEPS, ""));
    let whole = run_whole(&sb, &path, "whole");
    let points = FILES.iter().map(|f| format!("file:{f}")).chain(["staged".to_string(), "renamed".to_string()]);
    for (i, point) in points.enumerate() {
        let failpoint = format!("checkpoint-2:{point}");
        let dir = sb.path(&format!("crash-{i}"));
        crash_at(&["run", path.to_str().unwrap(), "--run-dir", dir.to_str().unwrap()], &failpoint);
        if point == "renamed" {
            // In place, so complete: the crash costs nothing.
            assert_latest_loads(&dir, 2, false, &failpoint);
            assert_resume_reproduces(&dir, 2, &whole, &failpoint);
            continue;
        }
        // Died mid-save: the files so far lie in the hidden staging folder only.
        assert!(!dir.join("checkpoint-2").exists(), "{failpoint}: a half-written checkpoint-2 is in place");
        let staging = dir.join(".checkpoint-2.tmp");
        let written = FILES.iter().position(|f| point == format!("file:{f}")).map_or(FILES.len(), |at| at + 1);
        for (k, file) in FILES.iter().enumerate() {
            assert_eq!(staging.join(file).is_file(), k < written, "{failpoint}: {file} in staging");
        }
        assert_latest_loads(&dir, 1, false, &failpoint);
        assert_resume_reproduces(&dir, 1, &whole, &failpoint);
    }
}

#[test]
fn a_crash_inside_a_lora_save_keeps_the_previous_adapters() {
    let sb = Sandbox::new();
    let path = sb.write("scripts/lora.rhai", &script(STEPS, LORA));
    let whole = run_whole(&sb, &path, "whole");
    for (point, kept) in [("file:adapter_model.safetensors", 1), ("staged", 1), ("renamed", 2)] {
        let failpoint = format!("checkpoint-2:{point}");
        let dir = sb.path(&format!("crash-{}", point.replace(':', "-")));
        crash_at(&["run", path.to_str().unwrap(), "--run-dir", dir.to_str().unwrap()], &failpoint);
        assert_latest_loads(&dir, kept, true, &failpoint);
        assert_resume_reproduces(&dir, kept, &whole, &failpoint);
    }
}

/// Resuming a finished run saves its last checkpoint again, replacing it in place (as
/// does Ctrl-C right after a save): a crash in between must not lose it.
#[test]
fn a_crash_while_a_checkpoint_is_replaced_keeps_it() {
    let sb = Sandbox::new();
    let path = sb.write("scripts/exp.rhai", &script(STEPS, ""));
    let whole = run_whole(&sb, &path, "whole");
    for point in ["file:optimizer.bpk", "staged", "moved-aside", "renamed"] {
        let failpoint = format!("checkpoint-{STEPS}:{point}");
        let dir = sb.path(&format!("again-{}", point.replace(':', "-")));
        copy_dir(&whole, &dir);
        crash_at(&["run", "--resume", dir.to_str().unwrap()], &failpoint);
        if point == "moved-aside" {
            // The window this test is for: the checkpoint only under its hidden name.
            assert!(
                !dir.join(format!("checkpoint-{STEPS}")).exists()
                    && dir.join(format!(".checkpoint-{STEPS}.old/trainer_state.json")).is_file(),
                "{failpoint}: {:?}",
                hidden(&dir)
            );
        }
        assert_latest_loads(&dir, STEPS, false, &failpoint);
        assert_eq!(hidden(&dir), Vec::<String>::new(), "{failpoint}: latest_checkpoint tidies what the crash left");
        assert_resume_reproduces(&dir, STEPS, &whole, &failpoint);
    }
}

/// SplitMix64, for the seeded kill delays.
fn next(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Polls every millisecond until `cond` holds (the run ends first: panics).
fn wait_for(child: &mut Child, what: &str, cond: impl Fn() -> bool) -> Instant {
    while !cond() {
        assert!(child.try_wait().unwrap().is_none(), "the run ended before {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
    Instant::now()
}

fn logged_step(dir: &Path, step: usize) -> bool {
    loss_lines(dir).iter().any(|l| l["step"] == step)
}

#[test]
fn sigkill_at_random_moments_of_a_save_keeps_a_checkpoint_that_resumes() {
    // Two steps after the save that is killed, so the run is still going at the latest kill.
    const STEPS: usize = 4;
    let sb = Sandbox::new();
    let path = sb.write("scripts/exp.rhai", &script(STEPS, ""));
    let spawn = |dir: &Path| start(&["run", path.to_str().unwrap(), "--run-dir", dir.to_str().unwrap()], None);

    // The uninterrupted run, timed: the save of checkpoint-2 starts right after step 2 is
    // logged and ends when the folder is in place.
    let whole = sb.path("whole");
    let mut child = spawn(&whole);
    let logged = wait_for(&mut child, "step 2", || logged_step(&whole, 2));
    let saved = wait_for(&mut child, "checkpoint-2", || whole.join("checkpoint-2").is_dir());
    assert!(child.wait().unwrap().success());
    assert_eq!(loss_lines(&whole).len(), STEPS);
    let save = saved - logged;

    // Kills from 0.2 ms after the log line to twice the save's time (at most 150 ms),
    // log-uniform: a save takes 10-400 ms here depending on build and load, and most
    // kills should land inside one.
    let span = (2.0 * save.as_secs_f64().min(0.075) / 0.0002).max(10.0).ln();
    let mut state = 22;
    let (mut before, mut during, mut after) = (0, 0, 0);
    for i in 0..10 {
        let delay =
            Duration::from_secs_f64(0.0002 * (span * (next(&mut state) >> 11) as f64 / (1u64 << 53) as f64).exp());
        let dir = sb.path(&format!("kill-{i}"));
        let mut child = spawn(&dir);
        wait_for(&mut child, "step 2", || logged_step(&dir, 2));
        std::thread::sleep(delay);
        child.kill().unwrap();
        let what = format!("kill {i} at {delay:?} after step 2 was logged (save took {save:?})");
        assert_eq!(child.wait().unwrap().signal(), Some(SIGKILL), "{what}: the run ended first");
        // A checkpoint-2 in place must be complete; otherwise checkpoint-1 is the latest. (A
        // fast build may even have finished step 3 and its save before a late kill.)
        let kept = if dir.join("checkpoint-3").exists() {
            after += 1;
            3
        } else if dir.join("checkpoint-2").exists() {
            after += 1;
            2
        } else {
            if dir.join(".checkpoint-2.tmp").exists() {
                during += 1
            } else {
                before += 1
            }
            1
        };
        assert_latest_loads(&dir, kept, false, &what);
        assert_resume_reproduces(&dir, kept, &whole, &what);
    }
    eprintln!(
        "save of checkpoint-2: {save:?}; killed before it wrote a file {before}, while staging {during}, after the rename {after}"
    );
    assert!(
        during > 0,
        "no kill landed while the save was writing ({before} before, {after} after): the window missed it"
    );
}

#[test]
fn a_malformed_failpoint_is_refused_before_anything_runs() {
    let out = host()
        .args(["run", "scripts/none.rhai"])
        .env(prefhost::failpoint::VAR, "checkpoint-2:midway")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        text(&out).contains(
            "PREFHOST_FAILPOINT=\"checkpoint-2:midway\": expected FOLDER:POINT, POINT one of file:NAME, staged"
        ),
        "{}",
        text(&out)
    );
}
