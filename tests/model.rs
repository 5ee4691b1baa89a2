//! The Llama model: causal (a later token never changes an earlier prediction), and a
//! save/load round trip through HF-format safetensors reproduces the log-probs.

use burn::tensor::{Device, Int, Tensor, TensorData};
use prefhost::model::{Llama, LlamaConfig, RandomInit, load_model, save_model};
use prefhost::tensor::values;

fn tiny_config() -> LlamaConfig {
    serde_json::from_value(serde_json::json!({
        "model_type": "llama", "vocab_size": 50, "hidden_size": 32, "intermediate_size": 48,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 64, "tie_word_embeddings": false
    }))
    .unwrap()
}

/// A random model saved in HF layout to `<temp dir>/ckpt`.
fn saved_model(config: &LlamaConfig, device: &Device) -> (Llama, tempfile::TempDir) {
    let model = Llama::build(config, &mut RandomInit { std: 0.2 }, device).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let tokenizer = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny-math-init/tokenizer.json");
    save_model(&model, config, &tokenizer, &dir.path().join("ckpt")).unwrap();
    (model, dir)
}

fn tokens(ids: &[i64], device: &Device) -> Tensor<2, Int> {
    Tensor::from_data(TensorData::new(ids.to_vec(), [1, ids.len()]), device)
}

#[test]
fn later_tokens_do_not_change_earlier_logits() {
    let device = Device::flex();
    device.seed(5);
    let model = Llama::build(&tiny_config(), &mut RandomInit { std: 0.2 }, &device).unwrap();
    let a = values(model.forward(tokens(&[3, 7, 11, 19, 23], &device)).narrow(1, 0, 3));
    let b = values(model.forward(tokens(&[3, 7, 11, 42, 1], &device)).narrow(1, 0, 3));
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() < 1e-5, "{x} vs {y}");
    }
    let c = values(model.forward(tokens(&[3, 7, 12, 19, 23], &device)).narrow(1, 2, 1));
    let a3 = values(model.forward(tokens(&[3, 7, 11, 19, 23], &device)).narrow(1, 2, 1));
    assert!(c.iter().zip(&a3).any(|(x, y)| (x - y).abs() > 1e-4), "position 2 must see its own token");
}

#[test]
fn hf_checkpoint_round_trip_reproduces_logits() {
    let device = Device::flex();
    device.seed(9);
    let config = tiny_config();
    let (model, dir) = saved_model(&config, &device);
    let target = dir.path().join("ckpt");
    let (loaded_config, loaded) = load_model(&target, &device).unwrap();
    assert_eq!(loaded_config, config);
    let ids = [1, 2, 3, 4, 5, 6];
    assert_eq!(values(model.forward(tokens(&ids, &device))), values(loaded.forward(tokens(&ids, &device))));
}

#[test]
fn mismatched_checkpoint_shapes_are_named() {
    let device = Device::flex();
    let config = tiny_config();
    let (_, dir) = saved_model(&config, &device);
    let target = dir.path().join("ckpt");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(target.join("config.json")).unwrap()).unwrap();
    json["intermediate_size"] = serde_json::json!(64);
    std::fs::write(target.join("config.json"), json.to_string()).unwrap();
    let err = format!("{:#}", load_model(&target, &device).unwrap_err());
    assert!(
        err.contains("model.layers.0.mlp.gate_proj.weight") && err.contains("[48, 32]") && err.contains("[64, 32]"),
        "{err}"
    );
}

#[test]
fn truncated_weights_broken_config_and_missing_tokenizer_are_named() {
    let device = Device::flex();
    let config = tiny_config();
    let (_, dir) = saved_model(&config, &device);
    let target = dir.path().join("ckpt");

    // A checkpoint cut off mid-write.
    let weights = target.join("model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    let err = format!("{:#}", load_model(&target, &device).unwrap_err());
    assert!(err.contains("model.safetensors") && err.contains("not a valid safetensors file"), "{err}");

    // config.json that is not JSON: file, line and column.
    std::fs::write(target.join("config.json"), "{\n  \"model_type\": \"llama\",\n  oops\n}").unwrap();
    let err = format!("{:#}", load_model(&target, &device).unwrap_err());
    assert!(err.contains("config.json:3:"), "{err}");

    // An unsupported architecture is refused by name.
    std::fs::write(
        target.join("config.json"),
        serde_json::json!({"model_type": "gpt2", "vocab_size": 5, "hidden_size": 4,
        "intermediate_size": 4, "num_hidden_layers": 1, "num_attention_heads": 1})
        .to_string(),
    )
    .unwrap();
    let err = format!("{:#}", load_model(&target, &device).unwrap_err());
    assert!(err.contains("model_type \"gpt2\"") && err.contains("llama, mistral, qwen2"), "{err}");

    // So is a RoPE scaling this build does not implement, by its field.
    std::fs::write(
        target.join("config.json"),
        serde_json::json!({"model_type": "llama", "vocab_size": 5, "hidden_size": 4,
        "intermediate_size": 4, "num_hidden_layers": 1, "num_attention_heads": 1,
        "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
        .to_string(),
    )
    .unwrap();
    let err = format!("{:#}", load_model(&target, &device).unwrap_err());
    assert!(err.contains("config.json") && err.contains("rope_scaling.rope_type \"yarn\""), "{err}");

    let missing = dir.path().join("nothing/tokenizer.json");
    let err = prefhost::data::TextTokenizer::load(&missing, None, None).err().expect("missing tokenizer is an error");
    assert!(format!("{err:#}").contains("nothing/tokenizer.json"), "{err:#}");
}

/// Greedy decoding with the KV cache picks the same tokens as recomputing the whole
/// sequence at every step (the cache's positions and attention are right).
#[test]
fn cached_greedy_decoding_matches_full_recomputation() {
    let device = Device::flex();
    device.seed(9);
    let model = Llama::build(&tiny_config(), &mut RandomInit { std: 0.3 }, &device).unwrap();
    let prompts = vec![vec![3u32, 7, 11], vec![5, 2, 9], vec![8, 8, 1, 4], vec![6]];
    let steps = 12;
    let cached = prefhost::model::generate::greedy(&model, &prompts, steps, &[], 2);
    for (prompt, got) in prompts.iter().zip(&cached) {
        let mut sequence: Vec<i64> = prompt.iter().map(|&t| t as i64).collect();
        for _ in 0..steps {
            let logits = model.forward(tokens(&sequence, &device));
            let last = logits.narrow(1, sequence.len() - 1, 1).reshape([1, 50]).argmax(1);
            sequence.push(last.into_data().iter::<i64>().next().unwrap());
        }
        let expected: Vec<u32> = sequence[prompt.len()..].iter().map(|&t| t as u32).collect();
        assert_eq!(got, &expected, "prompt {prompt:?}");
    }
    // Stops at EOS (not included) and never runs past the model's positions.
    let eos = cached[0][2];
    let stopped = prefhost::model::generate::greedy(&model, &prompts[..1], steps, &[eos], 8);
    assert_eq!(stopped[0], cached[0][..cached[0].iter().position(|&t| t == eos).unwrap()].to_vec());
    let long = prefhost::model::generate::greedy(&model, &[vec![1; 60]], 100, &[], 8);
    assert_eq!(long[0].len(), 4);
}

/// Per-layer gradient checkpointing: each layer is run again in the backward pass, and
/// every parameter's gradient equals the one from kept activations.
#[test]
fn recomputed_layers_give_the_same_gradients() {
    use burn::module::{Module, ModuleVisitor, Param};
    use burn::tensor::{Distribution, Gradients};
    struct Grads<'a>(&'a Gradients, Vec<Vec<f32>>);
    impl ModuleVisitor for Grads<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            self.1.push(param.val().grad(self.0).map(values).expect("every parameter has a gradient"));
        }
    }
    let device = Device::flex().autodiff();
    device.seed(3);
    let mut model = Llama::build(&tiny_config(), &mut RandomInit { std: 0.2 }, &device).unwrap();
    let ids =
        Tensor::<2, Int>::from_data(TensorData::new(vec![3i64, 7, 11, 19, 23, 5, 9, 2, 4, 8, 16, 31], [2, 6]), &device);
    let weights = Tensor::<3>::random([2, 6, 50], Distribution::Normal(0.0, 1.0), &device);
    let gradients = |model: &Llama| {
        let grads = (model.forward(ids.clone()) * weights.clone()).sum().backward();
        let mut visitor = Grads(&grads, Vec::new());
        model.visit(&mut visitor);
        visitor.1
    };
    let kept = gradients(&model);
    model.recompute_layers = true;
    let before = prefhost::model::checkpoint::layers_recomputed();
    let recomputed = gradients(&model);
    assert_eq!(prefhost::model::checkpoint::layers_recomputed() - before, 2, "one recomputation per layer");
    assert_eq!(kept.len(), recomputed.len());
    for (a, b) in kept.iter().zip(&recomputed) {
        let scale = a.iter().fold(0f32, |m, v| m.max(v.abs()));
        let worst = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(worst <= 1e-6 * scale.max(1e-3), "gradient differs by {worst} (largest element {scale})");
    }
}
