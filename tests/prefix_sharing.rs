//! Prefix sharing computes each pair's prompt (and the completions' common prefix) once,
//! in one packed row, and chunked logits never hold the whole [rows, length, vocab]
//! logits; the log-probs each gives must equal the plain computation, values and gradients.

mod common;

use burn::tensor::Device;
use prefhost::data::packed::PackedLayout;
use prefhost::data::{Example, TextTokenizer, Truncation, collate_pairs, load_examples};
use prefhost::model::load_model;
use prefhost::tensor::values;
use prefhost::train::logps::{packed_pair_logps, token_logps};

fn examples() -> Vec<Example> {
    let root = common::repo();
    let tok = TextTokenizer::load(&root.join("models/tiny-math/tokenizer.json"), Some(1), Some(2)).unwrap();
    let limits = Truncation { max_length: 256, max_prompt_length: 128 };
    let (mut rows, _) = load_examples(&root.join("data/arithmetic/pairs.jsonl"), &tok, true, limits, false).unwrap();
    rows.truncate(6);
    // Edge cases: identical completions, a rejected answer that is a prefix of the chosen
    // one, different lengths, and a pair with nothing in common after the prompt.
    let mut same = rows[0].clone();
    same.rejected = same.chosen.clone();
    let mut prefix = rows[1].clone();
    prefix.rejected = prefix.chosen[..prefix.chosen.len() / 2].to_vec();
    let mut disjoint = rows[2].clone();
    disjoint.rejected = disjoint.chosen.iter().rev().copied().collect();
    rows.extend([same, prefix, disjoint]);
    rows
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn packed_log_probs_equal_the_plain_ones() {
    let device = Device::default();
    let (_, model) = load_model(&common::repo().join("models/tiny-math"), &device).unwrap();
    let rows = examples();
    let refs: Vec<&Example> = rows.iter().collect();
    let plain_batch = collate_pairs(&refs, 2, &device);
    let plain = values(token_logps(&model, &plain_batch));
    for share_completion_prefix in [false, true] {
        let layout = PackedLayout::new(&refs, 2, share_completion_prefix);
        let packed = values(packed_pair_logps(&model, &layout, plain_batch.mask.clone()));
        let diff = max_diff(&plain, &packed);
        assert!(diff < 2e-5, "share_completion_prefix {share_completion_prefix}: max difference {diff}");
        // Fewer tokens computed than the 2B plain rows hold.
        let plain_tokens: usize = rows.iter().map(|e| 2 * e.prompt.len() + e.chosen.len() + e.rejected.len()).sum();
        assert!(layout.real_tokens < plain_tokens);
    }
    // The shipped pairs differ late in the completion, so sharing the completion prefix
    // saves more than sharing the prompt alone.
    assert!(PackedLayout::new(&refs, 2, true).real_tokens < PackedLayout::new(&refs, 2, false).real_tokens);
}

#[test]
fn packed_and_chunked_give_the_same_values_and_gradients() {
    let device = Device::default().autodiff();
    let (_, model) = load_model(&common::repo().join("models/tiny-math"), &device).unwrap();
    let rows = examples();
    let refs: Vec<&Example> = rows.iter().collect();
    let batch = collate_pairs(&refs, 2, &device);
    let layout = PackedLayout::new(&refs, 2, true);
    // (values, gradient of one attention weight, gradient of lm_head) for one way of computing.
    let params = [model.layers[1].self_attn.q_proj.base.weight.id, model.lm_head.as_ref().unwrap().weight.id];
    let run = |packed: Option<&PackedLayout>, chunk: Option<usize>| {
        let (vals, mut grads) = common::weighted_logps_and_grads(&model, &batch, packed, chunk, &params);
        let lm = grads.pop().unwrap();
        (vals, grads.pop().unwrap(), lm)
    };
    let (plain, plain_q, plain_lm) = run(None, None);
    for (packed, chunk) in [(Some(&layout), None), (None, Some(7)), (None, Some(1000)), (Some(&layout), Some(13))] {
        let (vals, q, lm) = run(packed, chunk);
        let what = format!("packed {} chunk {chunk:?}", packed.is_some());
        assert!(max_diff(&plain, &vals) < 2e-5, "{what}: values differ by {}", max_diff(&plain, &vals));
        for (name, a, b) in [("q_proj", &plain_q, &q), ("lm_head", &plain_lm, &lm)] {
            let scale = a.iter().map(|g| g.abs()).fold(0.0, f32::max);
            assert!(scale > 0.0, "{name}: no gradient");
            assert!(
                max_diff(a, b) < 1e-4 * scale.max(1.0),
                "{what}: {name} gradient differs by {} (largest {scale})",
                max_diff(a, b)
            );
        }
    }
}

/// Every way of computing log-probs forms logits, and the last layer's output, only from
/// the batch's first completion column on; the values and gradients must be those of the
/// logits at every position, with prompts of different lengths in one batch (so the rows'
/// completions start in different columns, and some prompt positions of the longer prompts
/// are projected), with and without each layer recomputed in the backward pass.
#[test]
fn logits_from_the_first_completion_column_equal_all_logits() {
    use burn::tensor::activation::log_softmax;
    let device = Device::default().autodiff();
    let (_, model) = load_model(&common::repo().join("models/tiny-math"), &device).unwrap();
    let rows = examples();
    let refs: Vec<&Example> = rows.iter().collect();
    let batch = collate_pairs(&refs, 2, &device);
    let shortest = rows.iter().map(|e| e.prompt.len()).min().unwrap();
    assert_eq!(batch.first_target, shortest - 1);
    assert!(rows.iter().any(|e| e.prompt.len() > shortest), "the rows' prompts must differ in length");
    let last = model.layers.last().unwrap();
    let params = [
        model.layers[0].mlp.gate_proj.base.weight.id,
        model.lm_head.as_ref().unwrap().weight.id,
        // The last layer: keys from every column, output projection and MLP from the first
        // completion column on.
        last.self_attn.k_proj.base.weight.id,
        last.self_attn.o_proj.base.weight.id,
        last.mlp.down_proj.base.weight.id,
    ];
    // All positions' logits, as transformers computes them without logits_to_keep.
    let [n, w] = batch.mask.dims();
    let ramp: Vec<f32> = (0..n * w).map(|i| 1.0 + (i % 5) as f32 * 0.25).collect();
    let weights = burn::tensor::Tensor::<1>::from_floats(ramp.as_slice(), &device).reshape([n, w]);
    let logp = log_softmax(model.forward(batch.inputs.clone()), 2);
    let all = logp.gather(2, batch.targets.clone().unsqueeze_dim::<3>(2)).reshape([n, w]) * batch.mask.clone();
    let all_values = values(all.clone());
    let grads = burn::optim::GradientsParams::from_grads((all * weights).sum().backward(), &model);
    let all_grads: Vec<Vec<f32>> = params.iter().map(|id| values(grads.get::<2>(*id).unwrap())).collect();
    let layout = PackedLayout::new(&refs, 2, true);
    let mut recomputing = model.clone();
    recomputing.recompute_layers = true;
    let ways = [(None, None), (Some(&layout), None), (None, Some(7)), (Some(&layout), Some(13))];
    for (model, (packed, chunk)) in ways.iter().map(|w| (&model, *w)).chain(ways.iter().map(|w| (&recomputing, *w))) {
        let (vals, grads) = common::weighted_logps_and_grads(model, &batch, packed, chunk, &params);
        let what = format!("packed {} chunk {chunk:?} recomputed {}", packed.is_some(), model.recompute_layers);
        assert!(max_diff(&all_values, &vals) < 2e-5, "{what}: values differ by {}", max_diff(&all_values, &vals));
        for (i, (a, b)) in all_grads.iter().zip(&grads).enumerate() {
            let scale = a.iter().map(|g| g.abs()).fold(0.0, f32::max);
            assert!(
                scale > 0.0 && max_diff(a, b) < 1e-4 * scale.max(1.0),
                "{what}: gradient of parameter {i} differs by {} (largest {scale})",
                max_diff(a, b)
            );
        }
    }
}
