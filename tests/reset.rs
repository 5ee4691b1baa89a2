//! Resets toward the initial weights (src/train/reset.rs) on the shipped model:
//! θ ← α·θ + (1 − α)·θ₀ exactly, for the selected modules only.

mod common;

use burn::tensor::Device;
use prefhost::model::weights::hf_tensors;
use prefhost::model::{Llama, LlamaConfig, RandomInit, load_model};
use prefhost::train::reset::{ResetRequest, shrink_toward_initial};

#[test]
fn shrink_moves_the_selected_modules_only_and_exactly() {
    let device = Device::flex().autodiff();
    let dir = common::repo().join("models/tiny-math");
    let (config, initial) = load_model(&dir, &device).unwrap();
    let trained = Llama::build(
        &LlamaConfig::from_file(&dir.join("config.json")).unwrap(),
        &mut RandomInit { std: 0.05 },
        &device,
    )
    .unwrap();
    let request = ResetRequest { factor: 0.25, modules: vec!["down_proj".into()] };
    let (blended, moved) = shrink_toward_initial(trained.clone(), &initial, &request);
    assert_eq!(moved, config.num_hidden_layers, "one down_proj weight per layer");
    let (a, b, c) = (hf_tensors(&trained), hf_tensors(&initial), hf_tensors(&blended));
    for (name, (_, got)) in &c {
        let (theta, start) = (&a[name].1, &b[name].1);
        if name.contains("down_proj") {
            for ((g, t), s) in got.iter().zip(theta).zip(start) {
                assert!((g - (0.25 * t + 0.75 * s)).abs() <= 1e-6 * (1.0 + s.abs()), "{name}: {g} vs {t}, {s}");
            }
        } else {
            assert_eq!(got, theta, "{name} must not move");
        }
    }
    // A blended weight is still a trainable parameter.
    let weight = blended.layers[0].mlp.down_proj.base.weight.val();
    let grads = weight.clone().sum().backward();
    assert!(weight.grad(&grads).is_some());
}
