//! The memory preflight: `host run --dry-run` prints the estimate and writes nothing; a
//! run that cannot fit stops before loading anything, naming settings that would fit; a
//! finished run reports its peak beside the estimate, which must be within a quarter of it.

mod common;
use common::*;

use std::path::{Path, PathBuf};

/// A model folder (config.json + the fixture's tokenizer) for `init: "random"`.
fn random_model(sb: &Sandbox, name: &str, config: serde_json::Value) -> PathBuf {
    let dir = sb.path(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    std::fs::copy(repo().join("tests/fixtures/train/llama/tokenizer.json"), dir.join("tokenizer.json")).unwrap();
    dir
}

fn script(sb: &Sandbox, label: &str, model: &Path, settings: &str) -> PathBuf {
    let data = repo().join("tests/fixtures/train/llama/pairs.jsonl");
    sb.write(
        &format!("scripts/{label}.rhai"),
        &format!(
            "import \"losses/dpo\" as dpo;\nfn loss(b, p) {{ dpo::loss(b, p) }}\ntrain(#{{ model: \"{}\", init: \"random\", data: \"{}\", batch_size: 4, max_steps: 2, progress: false, {settings} }});\n",
            model.display(),
            data.display()
        ),
    )
}

fn llama(hidden: usize, layers: usize, inter: usize, heads: usize, vocab: usize) -> serde_json::Value {
    serde_json::json!({
        "model_type": "llama", "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": inter,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": heads,
        "max_position_embeddings": 256, "tie_word_embeddings": false, "eos_token_id": 1, "pad_token_id": 2
    })
}

#[test]
fn dry_run_prints_the_estimate_and_writes_nothing() {
    let sb = Sandbox::new();
    let model = random_model(&sb, "small", llama(64, 2, 128, 4, 120));
    let path = script(&sb, "small", &model, "");
    let out = run_host(&["run", "--dry-run", path.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    for part in ["weights", "reference copy", "AdamW moments", "activations", "logits", "total", "available:"] {
        assert!(text(&out).contains(part), "no {part} in:\n{}", text(&out));
    }
    assert!(!sb.path("runs").exists(), "a dry run wrote a run folder");
}

/// 13.7T parameters: no machine here holds them, and the refusal comes before any
/// allocation (a build would take hours or be killed).
#[test]
fn a_run_that_cannot_fit_stops_before_loading_and_names_what_would_lower_it() {
    let sb = Sandbox::new();
    let model = random_model(&sb, "huge", llama(65536, 200, 262144, 512, 256000));
    let path = script(&sb, "huge", &model, "");
    for args in [vec!["run", path.to_str().unwrap(), "--no-watch"], vec!["run", "--dry-run", path.to_str().unwrap()]] {
        let started = std::time::Instant::now();
        let out = run_host(&args);
        assert!(!out.status.success(), "{args:?} went ahead");
        let message = text(&out);
        for expected in [
            "huge",
            "pairs.jsonl",
            "needs about",
            "are available",
            "weights",
            "Settings that lower it",
            "gradient_checkpointing: true",
            "lora: #{ r: 16",
            "batch_size: 2, grad_accum: 2",
        ] {
            assert!(message.contains(expected), "{args:?}: no {expected:?} in:\n{message}");
        }
        assert!(started.elapsed().as_secs() < 60, "{args:?} took {:?}", started.elapsed());
    }
    assert!(!sb.path("runs").exists(), "a refused run wrote a run folder");
}

/// Full fine-tuning, with gradient checkpointing, and LoRA on a model whose 32k-token
/// vocabulary makes weights, optimizer state and logits the bulk of the peak: each run's
/// measured peak RSS (its memory.json) within 25 % of the preflight's estimate.
#[test]
fn the_estimate_is_within_a_quarter_of_the_measured_peak() {
    let sb = Sandbox::new();
    let model = random_model(&sb, "wide", llama(256, 2, 512, 4, 32000));
    for (label, settings) in [
        ("full", ""),
        ("checkpointed", "gradient_checkpointing: true,"),
        ("lora", "lora: #{ r: 8, target_modules: \"all-linear\" },"),
    ] {
        let path = script(&sb, label, &model, settings);
        let dir = sb.path(&format!("runs/{label}"));
        let out = run_host(&["run", path.to_str().unwrap(), "--no-watch", "--run-dir", dir.to_str().unwrap()]);
        assert!(out.status.success(), "{label}: {}", text(&out));
        let memory: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("memory.json")).unwrap()).unwrap();
        let (peak, estimate) = (memory["peak_rss_mb"].as_f64().unwrap(), memory["estimated_mb"].as_f64().unwrap());
        eprintln!("{label}: peak {peak:.0} MB, estimated {estimate:.0} MB");
        assert!((estimate - peak).abs() <= 0.25 * peak, "{label}: estimated {estimate:.0} MB, measured {peak:.0} MB");
    }
}
