//! Qwen3 (per-head q/k norms, head_dim apart from hidden/heads) and Gemma 2 (√hidden
//! embeddings, (1 + w) norms around attention and MLP, GeGLU, query_pre_attn_scalar,
//! soft-capped scores and logits, alternating sliding-window layers, tied embeddings):
//! log-probs against transformers 4.57 and 5.24 (tests/fixtures/make_hf_fixtures.py; their
//! training steps against PyTorch are in tests/training_step.rs), a save/load round trip,
//! packed rows and chunked logits equal to the plain path (values and gradients), and
//! configs that would be computed otherwise refused by key.

mod common;

use burn::tensor::Device;
use prefhost::data::packed::PackedLayout;
use prefhost::data::{Example, collate_pairs};
use prefhost::model::{LlamaConfig, load_model, save_model};

const NEW_FAMILIES: [&str; 2] = ["qwen3", "gemma2"];
const CHUNK_FAMILIES: [&str; 4] = ["qwen3", "llama_rope_scaled_tied", "qwen2", "gemma2"];

#[test]
fn log_probs_match_transformers_4_and_5() {
    for set in ["hf", "hf5"] {
        for name in NEW_FAMILIES {
            let dir = common::repo().join("tests/fixtures").join(set).join(name);
            let rows = common::fixture_rows(&dir);
            let device = Device::default();
            let (_, model) = load_model(&dir, &device).unwrap();
            for (row, got) in rows.iter().zip(common::completion_logps(&model, &rows, &device)) {
                let want = row.floats("token_logps");
                assert_eq!(got.len(), want.len());
                // Measured: 1e-6 (qwen3) and 3.4e-6 (gemma2, through tanh caps and GELU).
                let worst = got.iter().zip(&want).map(|(a, b)| (*a as f64 - b).abs()).fold(0.0, f64::max);
                assert!(worst < 1e-5, "{set}/{name}, {} tokens: per-token log-probs differ by {worst}", row.ids.len());
            }
        }
    }
}

#[test]
fn a_saved_model_loads_back_with_the_same_config_weights_and_log_probs() {
    for name in NEW_FAMILIES {
        let dir = common::repo().join("tests/fixtures/hf5").join(name);
        let device = Device::default();
        let (config, model) = load_model(&dir, &device).unwrap();
        let out = tempfile::tempdir().unwrap();
        let saved = out.path().join("saved");
        save_model(&model, &config, &common::repo().join("tests/fixtures/train/llama/tokenizer.json"), &saved).unwrap();
        let (again_config, again) = load_model(&saved, &device).unwrap();
        assert_eq!(config.layer_types, again_config.layer_types, "{name}");
        assert_eq!(
            (
                config.query_pre_attn_scalar,
                config.attn_logit_softcapping,
                config.final_logit_softcapping,
                config.sliding_window,
                config.head_dim
            ),
            (
                again_config.query_pre_attn_scalar,
                again_config.attn_logit_softcapping,
                again_config.final_logit_softcapping,
                again_config.sliding_window,
                again_config.head_dim
            ),
            "{name}"
        );
        // Gemma2's norms are written back as stored (w, not the applied 1 + w).
        let original = safetensors_values(&dir.join("model.safetensors"));
        let written = safetensors_values(&saved.join("model.safetensors"));
        assert_eq!(original.keys().collect::<Vec<_>>(), written.keys().collect::<Vec<_>>(), "{name}");
        for (key, values) in &original {
            assert_eq!(values, &written[key], "{name}: {key}");
        }
        let rows = common::fixture_rows(&dir);
        assert_eq!(
            common::completion_logps(&model, &rows, &device),
            common::completion_logps(&again, &rows, &device),
            "{name}"
        );
    }
}

fn safetensors_values(path: &std::path::Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors().into_iter().map(|(k, v)| (k, v.data().to_vec())).collect()
}

/// Pairs from the fixture rows: long enough for gemma2's window (6) to mask keys, with a
/// shared completion prefix so packed rows share it.
fn pairs(dir: &std::path::Path) -> Vec<Example> {
    common::fixture_rows(dir)
        .iter()
        .enumerate()
        .map(|(line, r)| {
            let (prompt, completion) = r.ids.split_at(r.prompt_length);
            let mut rejected = completion.to_vec();
            let last = rejected.len() - 1;
            rejected[last] = 3 + (rejected[last] + 1) % 90;
            Example { prompt: prompt.to_vec(), chosen: completion.to_vec(), rejected, line, label: None }
        })
        .collect()
}

#[test]
fn packed_rows_and_chunked_logits_give_the_plain_values_and_gradients() {
    for name in CHUNK_FAMILIES {
        let dir = common::repo().join("tests/fixtures/hf5").join(name);
        let device = Device::default().autodiff();
        let (_, model) = load_model(&dir, &device).unwrap();
        let rows = pairs(&dir);
        let refs: Vec<&Example> = rows.iter().collect();
        let batch = collate_pairs(&refs, 2, &device);
        let layout = PackedLayout::new(&refs, 2, true);
        let params = [model.layers[0].self_attn.q_proj.base.weight.id, model.embed_tokens.weight.id];
        let run = |packed: Option<&PackedLayout>, chunk: Option<usize>| {
            let (vals, mut grads) = common::weighted_logps_and_grads(&model, &batch, packed, chunk, &params);
            let embed = grads.pop().unwrap();
            (vals, grads.pop().unwrap(), embed)
        };
        let (plain, plain_q, plain_embed) = run(None, None);
        for (packed, chunk) in [(Some(&layout), None), (None, Some(7)), (Some(&layout), Some(13))] {
            let (vals, q, embed) = run(packed, chunk);
            let what = format!("{name}: packed {} chunk {chunk:?}", packed.is_some());
            let diff = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
            assert!(diff(&plain, &vals) < 2e-5, "{what}: values differ by {}", diff(&plain, &vals));
            for (param, a, b) in [
                ("q_proj", &plain_q, &q),
                ("embed_tokens (tied in llama_rope_scaled_tied, qwen2, gemma2)", &plain_embed, &embed),
            ] {
                let scale = a.iter().map(|g| g.abs()).fold(0.0, f32::max);
                assert!(scale > 0.0, "{what}: no {param} gradient");
                assert!(
                    diff(a, b) < 1e-4 * scale.max(1.0),
                    "{what}: {param} gradient differs by {} (largest {scale})",
                    diff(a, b)
                );
            }
        }
    }
}

#[test]
fn configs_that_would_compute_something_else_are_refused_by_key() {
    let base = |name: &str| -> serde_json::Value {
        serde_json::from_str(
            &std::fs::read_to_string(common::repo().join("tests/fixtures/hf5").join(name).join("config.json")).unwrap(),
        )
        .unwrap()
    };
    type Edit = Box<dyn Fn(&mut serde_json::Value)>;
    let cases: Vec<(&str, Edit, &str)> = vec![
        ("gemma2", Box::new(|c| c["hidden_activation"] = "gelu".into()), "hidden_activation"),
        ("gemma2", Box::new(|c| c["layer_types"][1] = "chunked_attention".into()), "layer_types"),
        ("gemma2", Box::new(|c| c["use_bidirectional_attention"] = true.into()), "use_bidirectional_attention"),
        ("gemma2", Box::new(|c| c["final_logit_softcapping"] = (-1.0).into()), "final_logit_softcapping"),
        ("qwen3", Box::new(|c| c["use_sliding_window"] = true.into()), "use_sliding_window"),
        ("qwen3", Box::new(|c| c["attn_logit_softcapping"] = 50.0.into()), "attn_logit_softcapping"),
        ("qwen3", Box::new(|c| c["layer_types"][0] = "sliding_attention".into()), "layer_types"),
    ];
    for (family, edit, key) in cases {
        let mut config = base(family);
        edit(&mut config);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(&path, config.to_string()).unwrap();
        let err = format!("{:#}", LlamaConfig::from_file(&path).unwrap_err());
        assert!(err.contains("config.json") && err.contains(key), "{family}, {key}: {err}");
    }
}
