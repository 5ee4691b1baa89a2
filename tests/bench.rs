//! `host bench` runs every configuration through the real trainer and reports timings,
//! memory and ratios (a smoke run on a tiny model: this checks the harness, not speed).

mod common;
use common::*;

#[test]
fn bench_times_every_configuration_and_reports_ratios() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bench");
    let args = [
        "bench",
        "--size",
        "tiny",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--rounds",
        "1",
        "--no-pytorch",
        "--out",
        out.to_str().unwrap(),
    ];
    let run = run_host(&args);
    assert!(run.status.success(), "{}", text(&run));
    let report = std::fs::read_to_string(out.join("bench.md")).unwrap();
    for name in [
        "metamath/script-loss",
        "metamath/rust-loss",
        "metamath/unfused",
        "long-prompt/unfused",
        "metamath/prefix-sharing",
        "metamath/precomputed-ref",
        "long-prompt/script-loss",
        "long-prompt/prefix-sharing",
        "memory/full+resident-ref",
        "memory/lora-r16",
    ] {
        assert!(report.contains(&format!("| {name} |")), "{name} missing:\n{report}");
    }
    for ratio in [
        "script overhead",
        "fused ops vs burn's op-by-op autodiff speed-up, MetaMath-style",
        "prefix sharing speed-up, MetaMath-style",
        "prefix sharing speed-up, long-prompt",
        "precomputed vs resident reference",
        "LoRA (r=16, all projections) vs full fine-tuning",
    ] {
        assert!(report.contains(ratio), "{ratio} missing:\n{report}");
    }
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("bench.json")).unwrap()).unwrap();
    for r in results["results"].as_array().unwrap() {
        assert_eq!(r["step_seconds"].as_array().unwrap().len(), 1, "{r}");
        assert!(r["peak_rss_mb"].as_f64().unwrap() > 1.0, "{r}");
    }
    // The same output folder is never overwritten.
    let again = run_host(&args);
    assert!(!again.status.success() && text(&again).contains("already exists"), "{}", text(&again));
}

/// A Python that is missing, fails, or computes other log-probs than prefhost's fails
/// `host bench` instead of losing its row (`--only metamath/pytorch`: the PyTorch rows only).
#[test]
fn a_failed_or_disagreeing_pytorch_peer_fails_the_bench() {
    let dir = tempfile::tempdir().unwrap();
    let fake = |name: &str, body: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        path.to_str().unwrap().to_string()
    };
    let report = r#"{"torch": "fake", "threads": 1, "step_seconds": [0.1], "tokens_per_step": 10, "peak_rss_mb": 1, "baseline_rss_mb": 1, "params": 1, "first_step": {"chosen_logps": [-1.0, -1.0], "rejected_logps": [-1.0, -1.0]}}"#;
    let peers = [
        (
            "missing",
            dir.path().join("no-such-python").to_str().unwrap().to_string(),
            "PyTorch row metamath/pytorch-eager",
        ),
        ("crashing", fake("crashing", "echo 'Traceback: boom' >&2; exit 3"), "Traceback: boom"),
        ("disagreeing", fake("disagreeing", &format!("echo '{report}'")), "not the same computation"),
    ];
    for (what, python, says) in peers {
        let out = dir.path().join(format!("{what}-bench"));
        let args = [
            "bench",
            "--size",
            "tiny",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--rounds",
            "1",
            "--batch-size",
            "2",
            "--only",
            "metamath/pytorch",
            "--python",
            &python,
            "--out",
            out.to_str().unwrap(),
        ];
        let run = run_host(&args);
        assert!(!run.status.success(), "{what}: the bench succeeded:\n{}", text(&run));
        assert!(text(&run).contains(says), "{what}: {}", text(&run));
    }
}

/// The PyTorch peer for real (bench/torch_dpo_step.py, eager and torch.compile) when a
/// Python with torch is at hand ($PREFHOST_PYTHON, else python3); CI installs one.
#[test]
fn the_pytorch_peer_runs_and_agrees_with_prefhost() {
    let Some(python) = python_with("torch") else { return };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bench");
    let args = [
        "bench",
        "--size",
        "tiny",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--rounds",
        "1",
        "--batch-size",
        "2",
        "--only",
        "metamath/pytorch",
        "--python",
        &python,
        "--out",
        out.to_str().unwrap(),
    ];
    let run = run_host(&args);
    assert!(run.status.success(), "{}", text(&run));
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("bench.json")).unwrap()).unwrap();
    let rows = results["results"].as_array().unwrap();
    for peer in ["metamath/pytorch-eager", "metamath/pytorch-compile"] {
        let row = rows
            .iter()
            .find(|r| r["name"].as_str().unwrap().starts_with(peer))
            .unwrap_or_else(|| panic!("no {peer} row: {results}"));
        assert_eq!(row["step_seconds"].as_array().unwrap().len(), 2, "{row}");
        assert!(row["logps_max_diff_vs_prefhost"].as_f64().unwrap() < 1e-4, "{row}");
        assert!(
            row["baseline_rss_mb"].as_f64().unwrap() > 1.0
                && row["peak_rss_mb"].as_f64().unwrap() >= row["baseline_rss_mb"].as_f64().unwrap(),
            "{row}"
        );
    }
}

#[test]
fn bench_gpu_dry_run_on_cpu_gives_exact_lengths_and_refuses_bad_settings() {
    // The GPU benchmark's harness, on the CPU with the tiny architecture and no PyTorch.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("gpu");
    let args = [
        "bench-gpu",
        "--arch",
        "tiny",
        "--backend",
        "cpu",
        "--pairs",
        "2",
        "--prompt-len",
        "24",
        "--completion-len",
        "16",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--python",
        "/nonexistent/python",
        "--out",
        out.to_str().unwrap(),
    ];
    let run = run_host(&args);
    assert!(run.status.success(), "{}", text(&run));
    let report = std::fs::read_to_string(out.join("bench-gpu.md")).unwrap();
    assert!(report.contains("| prefhost cpu + bf16 |"), "{report}");
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("bench-gpu.json")).unwrap()).unwrap();
    let prefhost = &results["results"][0];
    // Truncation gives every pair exactly prompt + completion tokens, in both sequences.
    assert_eq!(prefhost["tokens_per_step"], 2 * 2 * (24 + 16), "{prefhost}");
    assert_eq!(prefhost["step_seconds"].as_array().unwrap().len(), 2, "{prefhost}");
    assert!((prefhost["first_loss"].as_f64().unwrap() - std::f64::consts::LN_2).abs() < 1e-4, "{prefhost}");

    for (bad, says) in [(["--mixed-precision", "fp16"], "loss scaling"), (["--backend", "tpu"], "unknown backend")] {
        let run = run_host(&[
            "bench-gpu",
            "--arch",
            "tiny",
            bad[0],
            bad[1],
            "--out",
            dir.path().join("bad").to_str().unwrap(),
        ]);
        assert!(!run.status.success() && text(&run).contains(says), "{}", text(&run));
        assert!(!dir.path().join("bad").exists(), "a refused run left its folder");
    }
}
