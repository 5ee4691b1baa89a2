//! Hugging Face checkpoints of each supported family (llama, mistral with its sliding
//! window, qwen2 with q/k/v biases and tied embeddings, llama3 and linear RoPE scaling):
//! prefhost's completion log-probs must match what transformers computed for the same
//! weights and tokens (tests/fixtures/make_hf_fixtures.py wrote them) within 1e-4, also
//! from checkpoints stored in bf16 and f16.

mod common;
use common::FixtureRow;

use std::path::PathBuf;

use burn::tensor::Device;
use prefhost::data::packed::PackedLayout;
use prefhost::data::{Example, collate_pairs};
use prefhost::model::{load_model, save_model, values};
use prefhost::train::logps::{packed_pair_logps, token_logps};

const FAMILIES: [&str; 7] = ["llama", "llama_rope_scaled_tied", "llama_linear_rope", "mistral", "qwen2", "qwen2_f16", "llama_bf16"];

fn fixture(name: &str) -> PathBuf {
    common::repo().join("tests/fixtures/hf").join(name)
}

fn expected(name: &str) -> Vec<FixtureRow> {
    common::fixture_rows(&fixture(name))
}

fn prefhost_logps(dir: &std::path::Path, rows: &[FixtureRow]) -> Vec<Vec<f32>> {
    let device = Device::default();
    let (_, model) = load_model(dir, &device).unwrap();
    common::completion_logps(&model, rows, &device)
}

#[test]
fn completion_log_probs_match_transformers_for_every_family() {
    for name in FAMILIES {
        let rows = expected(name);
        let ours = prefhost_logps(&fixture(name), &rows);
        for (row, got) in rows.iter().zip(&ours) {
            let (token_logps, logps) = (row.floats("token_logps"), row.fields["logps"].as_f64().unwrap());
            assert_eq!(got.len(), token_logps.len(), "{name}");
            let worst = got.iter().zip(&token_logps).map(|(a, b)| (*a as f64 - b).abs()).fold(0.0, f64::max);
            assert!(worst < 1e-4, "{name}: per-token log-probs differ by {worst}");
            let sum: f64 = got.iter().map(|&x| x as f64).sum();
            assert!((sum - logps).abs() < 1e-4 * (1.0 + logps.abs()), "{name}: {sum} vs {logps}");
        }
    }
}

/// The same checkpoints saved by transformers 5.24 (config.json with `rope_parameters`
/// instead of `rope_theta`/`rope_scaling`; log-probs computed by 5.24, with a 120-token
/// row that crosses the fused attention's 64-query blocks).
const FAMILIES_5: [&str; 5] = ["llama", "llama_rope_scaled_tied", "llama_linear_rope", "mistral", "qwen2"];

#[test]
fn transformers_5_checkpoints_load_with_their_rope_parameters() {
    for name in FAMILIES_5 {
        let dir = common::repo().join("tests/fixtures/hf5").join(name);
        let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
        assert!(config.get("rope_parameters").is_some() && config.get("rope_theta").is_none(), "{name}: a 5.x layout");
        let rows = common::fixture_rows(&dir);
        assert!(rows.iter().any(|r| r.ids.len() > 64), "{name}: a row longer than one attention block");
        for (row, got) in rows.iter().zip(prefhost_logps(&dir, &rows)) {
            let worst = got.iter().zip(row.floats("token_logps")).map(|(a, b)| (*a as f64 - b).abs()).fold(0.0, f64::max);
            assert!(worst < 2e-5, "{name}: per-token log-probs differ from transformers 5 by {worst}");
        }
        // The 4.x checkpoint of the same weights reads the same RoPE.
        let (four, _) = load_model(&fixture(name), &Device::default()).unwrap();
        let (five, _) = load_model(&dir, &Device::default()).unwrap();
        assert_eq!((five.rope_theta, five.rope_scaling().unwrap()), (four.rope_theta, four.rope_scaling().unwrap()), "{name}");
    }
}

#[test]
fn config_keys_that_change_the_maths_are_refused_with_file_and_key() {
    let base: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(common::repo().join("tests/fixtures/hf5/llama_rope_scaled_tied/config.json")).unwrap()).unwrap();
    let cases: [(&str, serde_json::Value, &str); 9] = [
        ("rope_parameters", serde_json::json!({ "rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0, "original_max_position_embeddings": 16 }), "rope_parameters.rope_type \"yarn\""),
        ("rope_parameters", serde_json::json!({ "rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5 }), "rope_parameters.partial_rotary_factor"),
        ("rope_parameters", serde_json::json!({ "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0 }), "rope_parameters.low_freq_factor"),
        ("rope_parameters", serde_json::json!({ "rope_type": "default" }), "rope_parameters.rope_theta"),
        ("rope_parameters", serde_json::json!({ "full_attention": { "rope_type": "default", "rope_theta": 1e4 } }), "per-layer-type"),
        ("rope_theta", serde_json::json!(10000.0), "disagree"),
        ("hidden_act", serde_json::json!("gelu"), "hidden_act"),
        ("quantization_config", serde_json::json!({ "quant_method": "bitsandbytes" }), "quantization_config"),
        ("layer_types", serde_json::json!(["full_attention", "sliding_attention"]), "layer_types"),
    ];
    for (key, value, expected) in cases {
        let dir = tempfile::tempdir().unwrap();
        let mut config = base.clone();
        config[key] = value;
        std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
        let err = format!("{:#}", prefhost::model::LlamaConfig::from_file(&dir.path().join("config.json")).unwrap_err());
        assert!(err.contains("config.json") && err.contains(expected), "{key}: expected an error naming {expected}, got {err}");
    }
}

#[test]
fn saved_checkpoints_of_every_family_load_back_the_same() {
    let tokenizer = common::repo().join("models/tiny-math/tokenizer.json");
    for name in FAMILIES {
        let rows = expected(name);
        let (config, model) = load_model(&fixture(name), &Device::default()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        save_model(&model, &config, &tokenizer, &dir.path().join("m")).unwrap();
        assert_eq!(prefhost_logps(&dir.path().join("m"), &rows), prefhost_logps(&fixture(name), &rows), "{name}");
        let saved: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.path().join("m/config.json")).unwrap()).unwrap();
        let original: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture(name).join("config.json")).unwrap()).unwrap();
        assert_eq!(saved["architectures"], original["architectures"], "{name}");
    }
}

#[test]
fn sliding_window_holds_in_packed_rows_and_decoding() {
    // Mistral's window (12) is shorter than these sequences: the packed path must apply
    // it by position, and cached decoding must match recomputing from scratch.
    let device = Device::default();
    let (_, model) = load_model(&fixture("mistral"), &device).unwrap();
    let rows = expected("mistral");
    let examples: Vec<Example> = rows
        .iter()
        .map(|r| {
            let chosen = r.ids[r.prompt_length..].to_vec();
            let mut rejected = chosen.clone();
            let last = rejected.len() - 1;
            rejected[last / 2] = 3 + (rejected[last / 2] + 1) % 90;
            Example { prompt: r.ids[..r.prompt_length].to_vec(), chosen, rejected, line: 1, label: None }
        })
        .collect();
    let refs: Vec<&Example> = examples.iter().collect();
    let batch = collate_pairs(&refs, 2, &device);
    let plain = values(token_logps(&model, &batch));
    let packed = values(packed_pair_logps(&model, &PackedLayout::new(&refs, 2, true), batch.mask.clone()));
    let worst = plain.iter().zip(&packed).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
    assert!(worst < 2e-5, "packed vs plain differ by {worst}");

    let prompt = rows[2].ids[..3].to_vec();
    let generated = prefhost::model::generate::greedy(&model, &[prompt.clone()], 24, &[], 1);
    let mut sequence: Vec<i64> = prompt.iter().map(|&t| t as i64).collect();
    for _ in 0..24 {
        let n = sequence.len();
        let tokens = burn::tensor::Tensor::<2, burn::tensor::Int>::from_data(burn::tensor::TensorData::new(sequence.clone(), [1, n]), &device);
        let next = model.forward(tokens).narrow(1, n - 1, 1).reshape([1, 96]).argmax(1);
        sequence.push(next.into_data().iter::<i64>().next().unwrap());
    }
    let expected: Vec<u32> = sequence[3..].iter().map(|&t| t as u32).collect();
    assert_eq!(generated[0], expected);
}
