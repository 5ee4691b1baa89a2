//! prefhost's one-pass AdamW (src/train/optimizer.rs) against burn's AdamW: the same
//! weights bit for bit over several steps, on the fused CPU path and on the op-by-op
//! fallback (also with a clip's factor folded into the update), through the whole-module
//! optimizer too; a parameter shared elsewhere is not changed under its other owner;
//! optimizer states load across the two (checkpoints).

use burn::nn::{Linear, LinearConfig};
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::{Device, Distribution, Tensor, TensorData};
use prefhost::tensor::values;
use prefhost::train::optimizer::FusedAdamW;

const BETAS: (f64, f64) = (0.9, 0.999);
const EPS: f64 = 1e-8;

fn burn_config(weight_decay: f64) -> AdamWConfig {
    AdamWConfig::new()
        .with_beta_1(BETAS.0 as f32)
        .with_beta_2(BETAS.1 as f32)
        .with_epsilon(EPS as f32)
        .with_weight_decay(weight_decay as f32)
}

fn burn_adamw(weight_decay: f64) -> burn::optim::AdamW {
    burn_config(weight_decay).build()
}

fn ours(weight_decay: f64) -> FusedAdamW {
    FusedAdamW::new(BETAS.0, BETAS.1, EPS, weight_decay)
}

/// Runs `steps` updates of both optimizers from the same start and gradients.
fn compare(device: &Device, shape: [usize; 2], weight_decay: f64, transposed: bool) {
    let start = Tensor::<2>::random(shape, Distribution::Normal(0.0, 1.0), device);
    let start = if transposed { start.transpose() } else { start };
    let (burn_opt, our_opt) = (burn_adamw(weight_decay), ours(weight_decay));
    let (mut a, mut b) = (start.clone(), start.clone());
    let (mut sa, mut sb) = (None, None);
    // A clipped run: burn on gradients scaled first, ours scaling as it reads them.
    let (mut clipped_a, mut clipped_b) = (start.clone(), start.clone());
    let (mut clipped_sa, mut clipped_sb) = (None, None);
    for step in 0..5 {
        let grad = Tensor::<2>::random(a.dims(), Distribution::Normal(0.0, 0.1 * (step + 1) as f64), device);
        let lr = 1e-3 / (step + 1) as f64;
        let clip = 0.3 + 0.1 * step as f64;
        (clipped_a, clipped_sa) = burn_opt.step(lr, clipped_a, grad.clone().mul_scalar(clip), clipped_sa);
        (clipped_b, clipped_sb) = our_opt.step_scaled(lr, clipped_b, grad.clone(), clip, clipped_sb);
        assert_eq!(
            values(clipped_a.clone()),
            values(clipped_b.clone()),
            "{shape:?} wd {weight_decay}: clipped weights differ after step {}",
            step + 1
        );
        (a, sa) = burn_opt.step(lr, a, grad.clone(), sa);
        (b, sb) = our_opt.step(lr, b, grad, sb);
        assert_eq!(
            values(a.clone()),
            values(b.clone()),
            "{shape:?} wd {weight_decay}: weights differ after step {}",
            step + 1
        );
        let (ma, mb) = (sa.as_ref().unwrap(), sb.as_ref().unwrap());
        assert_eq!(ma.momentum.time, mb.momentum.time);
        assert_eq!(values(ma.momentum.moment_1.clone()), values(mb.momentum.moment_1.clone()), "first moments differ");
        assert_eq!(values(ma.momentum.moment_2.clone()), values(mb.momentum.moment_2.clone()), "second moments differ");
    }
    assert_ne!(values(start), values(b.clone()), "the weights never moved");
    assert_ne!(values(clipped_b), values(b), "the clip changed nothing");
}

#[test]
fn one_pass_update_equals_burns_adamw_bit_for_bit() {
    let cpu = Device::default();
    for wd in [0.0, 0.01] {
        compare(&cpu, [37, 53], wd, false);
        compare(&cpu, [300, 1000], wd, false); // several rayon chunks
        compare(&cpu, [20, 30], wd, true); // a strided view as the parameter
    }
}

#[test]
fn op_by_op_fallback_equals_burns_adamw() {
    // Tensors on the autodiff device are not burn-flex primitives: the fallback runs.
    compare(&Device::default().autodiff(), [37, 53], 0.01, false);
}

#[test]
fn a_shared_parameter_keeps_its_values_for_its_other_owner() {
    let cpu = Device::default();
    let param = Tensor::<2>::random([64, 64], Distribution::Normal(0.0, 1.0), &cpu);
    let kept = values(param.clone());
    let other_owner = param.clone();
    let grad = Tensor::<2>::ones([64, 64], &cpu);
    let (updated, state) = ours(0.01).step(1e-2, param, grad.clone(), None);
    assert_eq!(values(other_owner.clone()), kept, "the update wrote into a buffer another tensor holds");
    assert_ne!(values(updated.clone()), kept);
    // The state's moments are shared with nobody here, and a second step still works.
    let moment = state.as_ref().unwrap().momentum.moment_1.clone();
    let moment_before = values(moment.clone());
    let (_, state) = ours(0.01).step(1e-2, updated, grad, state);
    assert_eq!(values(moment), moment_before, "a moment held elsewhere was changed in place");
    assert_eq!(state.unwrap().momentum.time, 2);
}

fn train(optimizer: &mut burn::optim::ModuleOptimizer, model: Linear, device: &Device, steps: usize) -> Linear {
    let mut model = model;
    for step in 0..steps {
        // Fixed inputs (no RNG): both optimizers see the same gradients.
        let x: Vec<f32> = (0..8 * 16).map(|i| ((i * 7 + step * 13) % 23) as f32 / 11.0 - 1.0).collect();
        let x = Tensor::<2>::from_data(TensorData::new(x, [8, 16]), device);
        let loss = model.forward(x).powi_scalar(2).mean().mul_scalar((step + 1) as f64);
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optimizer.step(1e-2, model, grads);
    }
    model
}

#[test]
fn module_optimizer_and_checkpoints_match_burns_adamw() {
    let device = Device::default().autodiff();
    let model = LinearConfig::new(16, 12).init(&device);
    let weights = |m: &Linear| values(m.weight.val().inner());

    let mut burns = burn_config(0.01).init();
    let mut ours_opt = ours(0.01).init();
    let a = train(&mut burns, model.clone(), &device, 3);
    let b = train(&mut ours_opt, model.clone(), &device, 3);
    assert_eq!(weights(&a), weights(&b), "whole-module steps differ");

    // A state saved by either optimizer resumes in the other (same record layout).
    let saved = ours_opt.into_bytes().expect("save");
    let mut resumed_in_burn = burn_config(0.01).init().from_bytes(saved).expect("burn loads our state");
    let saved = burns.into_bytes().expect("save");
    let mut resumed_in_ours = ours(0.01).init().from_bytes(saved).expect("we load burn's state");
    let a = train(&mut resumed_in_burn, b.clone(), &device, 2);
    let b = train(&mut resumed_in_ours, b, &device, 2);
    assert_eq!(weights(&a), weights(&b), "steps after a resume differ");
}

/// Trains `steps` steps of a tiny Llama with `step`, on fixed token rows.
fn train_llama(
    mut model: prefhost::model::Llama,
    device: &Device,
    steps: usize,
    mut step: impl FnMut(prefhost::model::Llama, GradientsParams) -> prefhost::model::Llama,
) -> prefhost::model::Llama {
    for s in 0..steps {
        let ids: Vec<i64> = (0..2 * 6).map(|i| ((i * 5 + s * 3) % 50) as i64).collect();
        let ids = Tensor::<2, burn::tensor::Int>::from_data(TensorData::new(ids, [2, 6]), device);
        let loss = model.forward(ids).powi_scalar(2).mean().mul_scalar((s + 1) as f64);
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = step(model, grads);
    }
    model
}

/// Every tensor (name → param id, shape, bytes), scalar and metadata entry of a burnpack file.
type PackContents = (
    std::collections::BTreeMap<String, (Option<u64>, Vec<usize>, Vec<u8>)>,
    std::collections::BTreeMap<String, burn_pack::Scalar>,
    std::collections::BTreeMap<String, String>,
);

fn pack_contents(path: &std::path::Path) -> PackContents {
    let reader = burn_pack::Reader::from_file(path).unwrap();
    let (scalars, metadata) = (reader.scalars().clone(), reader.metadata().clone());
    let tensors = reader
        .into_tensors()
        .unwrap()
        .into_iter()
        .map(|t| {
            let (name, _, shape, id, bytes) = t.into_parts().unwrap();
            (name, (id, shape.to_vec(), bytes.to_vec()))
        })
        .collect();
    (tensors, scalars, metadata)
}

/// The trainer's whole-model AdamW (moments owned, saved a tensor at a time) against burn's
/// ModuleOptimizer running the same update: the same weights, a file with the same tensors,
/// scalars and paths, and each one resumes from the other's file.
#[test]
fn model_adamw_matches_burns_module_optimizer_and_its_files() {
    use burn::module::Module;
    use prefhost::model::{Llama, LlamaConfig, RandomInit};
    use prefhost::train::optimizer::ModelAdamW;
    let device = Device::flex().autodiff();
    let config: LlamaConfig = serde_json::from_value(serde_json::json!({
        "model_type": "llama", "vocab_size": 50, "hidden_size": 16, "intermediate_size": 24,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 64, "tie_word_embeddings": false
    }))
    .unwrap();
    let model = Llama::build(&config, &mut RandomInit { std: 0.2 }, &device).unwrap();
    let weights = |m: &Llama| prefhost::model::weights::hf_tensors(&m.valid());

    let mut burns = ours(0.01).for_model(&model);
    let mut owned = ModelAdamW::for_model(ours(0.01), &model);
    let a = train_llama(model.clone(), &device, 3, |m, g| burns.step(1e-2, m, g));
    let b = train_llama(model.clone(), &device, 3, |m, g| owned.step(1e-2, m, g, 1.0));
    assert!(weights(&a) == weights(&b), "whole-model steps differ");
    assert!(weights(&a) != weights(&model), "the weights never moved");

    let dir = tempfile::tempdir().unwrap();
    let (burn_file, owned_file) = (dir.path().join("burn.bpk"), dir.path().join("owned.bpk"));
    burns.save(&burn_file).unwrap();
    owned.save(&owned_file).unwrap();
    let (theirs, ours_contents) = (pack_contents(&burn_file), pack_contents(&owned_file));
    assert_eq!(theirs.0.len(), 2 * model.parameter_names().len(), "two moments per parameter");
    assert!(theirs.0 == ours_contents.0, "the files' tensors differ");
    assert_eq!(theirs.1, ours_contents.1, "the files' scalars differ");
    assert_eq!(theirs.2, ours_contents.2, "the files' paths differ");

    // Each resumes from the other's file and takes the same next steps.
    let cpu = Device::flex();
    let mut burn_resumed = ours(0.01).for_model(&model).load(&owned_file).unwrap();
    let mut owned_resumed = ModelAdamW::for_model(ours(0.01), &model).load(&burn_file, &cpu).unwrap();
    let a = train_llama(b.clone(), &device, 2, |m, g| burn_resumed.step(1e-2, m, g));
    let c = train_llama(b.clone(), &device, 2, |m, g| owned_resumed.step(1e-2, m, g, 1.0));
    let d = train_llama(b, &device, 2, |m, g| owned.step(1e-2, m, g, 1.0));
    assert!(weights(&a) == weights(&c), "steps after resuming from burn's file differ");
    assert!(weights(&c) == weights(&d), "a resumed run differs from the uninterrupted one");
}
