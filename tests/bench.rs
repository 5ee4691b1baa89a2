//! `host bench` runs every configuration through the real trainer and reports timings,
//! memory and ratios (a smoke run on a tiny model: this checks the harness, not speed).

mod common;
use common::*;

#[test]
fn bench_times_every_configuration_and_reports_ratios() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bench");
    let args = ["bench", "--size", "tiny", "--steps", "1", "--warmup", "0", "--rounds", "1", "--python", "/nonexistent/python", "--out", out.to_str().unwrap()];
    let run = run_host(&args);
    assert!(run.status.success(), "{}", text(&run));
    let report = std::fs::read_to_string(out.join("bench.md")).unwrap();
    for name in ["metamath/script-loss", "metamath/rust-loss", "metamath/unfused", "long-prompt/unfused", "metamath/prefix-sharing", "metamath/precomputed-ref", "long-prompt/script-loss", "long-prompt/prefix-sharing", "memory/full+resident-ref", "memory/lora-r16"] {
        assert!(report.contains(&format!("| {name} |")), "{name} missing:\n{report}");
    }
    for ratio in ["script overhead", "fused ops vs burn's op-by-op autodiff speed-up, MetaMath-style", "prefix sharing speed-up, MetaMath-style", "prefix sharing speed-up, long-prompt", "precomputed vs resident reference", "LoRA (r=16, all projections) vs full fine-tuning"] {
        assert!(report.contains(ratio), "{ratio} missing:\n{report}");
    }
    let results: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("bench.json")).unwrap()).unwrap();
    for r in results["results"].as_array().unwrap() {
        assert_eq!(r["step_seconds"].as_array().unwrap().len(), 1, "{r}");
        assert!(r["peak_rss_mb"].as_f64().unwrap() > 1.0, "{r}");
    }
    // The same output folder is never overwritten.
    let again = run_host(&args);
    assert!(!again.status.success() && text(&again).contains("already exists"), "{}", text(&again));
}

#[test]
fn bench_gpu_dry_run_on_cpu_gives_exact_lengths_and_refuses_bad_settings() {
    // The GPU benchmark's harness, on the CPU with the tiny architecture and no PyTorch.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("gpu");
    let args = ["bench-gpu", "--arch", "tiny", "--backend", "cpu", "--pairs", "2", "--prompt-len", "24", "--completion-len", "16",
                "--steps", "2", "--warmup", "1", "--python", "/nonexistent/python", "--out", out.to_str().unwrap()];
    let run = run_host(&args);
    assert!(run.status.success(), "{}", text(&run));
    let report = std::fs::read_to_string(out.join("bench-gpu.md")).unwrap();
    assert!(report.contains("| prefhost cpu + bf16 |"), "{report}");
    let results: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("bench-gpu.json")).unwrap()).unwrap();
    let prefhost = &results["results"][0];
    // Truncation gives every pair exactly prompt + completion tokens, in both sequences.
    assert_eq!(prefhost["tokens_per_step"], 2 * 2 * (24 + 16), "{prefhost}");
    assert_eq!(prefhost["step_seconds"].as_array().unwrap().len(), 2, "{prefhost}");
    assert!((prefhost["first_loss"].as_f64().unwrap() - std::f64::consts::LN_2).abs() < 1e-4, "{prefhost}");

    for (bad, says) in [(["--mixed-precision", "fp16"], "loss scaling"), (["--backend", "tpu"], "unknown backend")] {
        let run = run_host(&["bench-gpu", "--arch", "tiny", bad[0], bad[1], "--out", dir.path().join("bad").to_str().unwrap()]);
        assert!(!run.status.success() && text(&run).contains(says), "{}", text(&run));
        assert!(!dir.path().join("bad").exists(), "a refused run left its folder");
    }
}
