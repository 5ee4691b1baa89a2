//! Frozen weights in their stored dtype: a LoRA base and a resident reference keep a
//! bf16/f16 checkpoint's matrices as bf16/f16 (trainable weights stay f32), give the same
//! log-probs and adapter gradients as f32 copies of them, and bad checkpoint files are
//! refused naming the file and the tensor.

mod common;
use common::*;

use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::tensor::{DType, Device};
use prefhost::data::batch::collate;
use prefhost::model::{Llama, MixedPrecision, load_frozen_model, load_model};
use prefhost::train::TrainConfig;
use prefhost::train::trainer::{build_policy, resident_reference};
use safetensors::Dtype;

fn fixture(name: &str) -> PathBuf {
    repo().join("tests/fixtures/hf").join(name)
}

fn train_config(model: &Path, extra: &str) -> TrainConfig {
    let text = format!(
        "#{{ model: {:?}, data: {:?}, {extra} }}",
        model.display().to_string(),
        repo().join("data/arithmetic/pairs.jsonl").display().to_string()
    );
    TrainConfig::from_map(rhai::Engine::new().eval::<rhai::Map>(&text).unwrap()).unwrap()
}

/// The dtype of every matrix a LoRA base or reference could keep stored, by HF name.
fn matrix_dtypes(model: &Llama) -> Vec<(String, DType)> {
    let mut out = vec![("model.embed_tokens.weight".to_string(), model.embed_tokens.weight.val().dtype())];
    out.extend(
        model.projections().into_iter().map(|(path, _, p)| (format!("{path}.weight"), p.base.weight.val().dtype())),
    );
    if let Some(head) = &model.lm_head {
        out.push(("lm_head.weight".to_string(), head.weight.val().dtype()));
    }
    out
}

fn norm_and_adapter_dtypes(model: &Llama) -> Vec<DType> {
    let mut out = vec![model.norm.weight.val().dtype()];
    for layer in &model.layers {
        out.extend(layer.norm_names().into_iter().map(|(_, n)| n.weight.val().dtype()));
    }
    for (_, _, p) in model.projections() {
        if let Some(a) = &p.lora {
            out.extend([a.a.val().dtype(), a.b.val().dtype()]);
        }
    }
    out
}

fn assert_all(model: &Llama, want: DType, what: &str) {
    for (name, dtype) in matrix_dtypes(model) {
        assert_eq!(dtype, want, "{what}: {name}");
    }
}

#[test]
fn frozen_weights_keep_the_checkpoint_dtype_and_trainable_ones_are_f32() {
    let device = Device::default().autodiff();
    for (name, stored) in [("llama_bf16", DType::BF16), ("qwen2_f16", DType::F16)] {
        // LoRA: the base, and so the reference (the base without adapters), stays stored.
        let config = train_config(&fixture(name), "lora: #{ r: 4, target_modules: \"all-linear\" }");
        let (_, policy) = build_policy(&config, &device).unwrap();
        assert_all(&policy, stored, &format!("{name}: LoRA base"));
        assert_all(&policy.valid().without_adapters(), stored, &format!("{name}: LoRA reference"));
        assert!(
            norm_and_adapter_dtypes(&policy).iter().all(|d| *d == DType::F32),
            "{name}: norms and adapters are f32"
        );
        assert!(policy.projections().iter().all(|(_, _, p)| p.lora.as_ref().unwrap().a.val().is_require_grad()));

        // Full fine-tuning: the policy's weights are f32 masters, its resident reference stored.
        let config = train_config(&fixture(name), "");
        let (_, policy) = build_policy(&config, &device).unwrap();
        assert_all(&policy, DType::F32, &format!("{name}: fully trained policy"));
        assert_all(
            &resident_reference(&config, &policy, &device).unwrap(),
            stored,
            &format!("{name}: resident reference"),
        );
    }
    // An f32 checkpoint stays f32 everywhere.
    let config = train_config(&repo().join("models/tiny-math"), "lora: #{ r: 4 }");
    assert_all(&build_policy(&config, &device).unwrap().1, DType::F32, "tiny-math LoRA base");
}

/// A copy of an f32 fixture with every tensor rounded to bf16: a tied-embeddings bf16
/// checkpoint (the vocabulary projection reads the stored embeddings).
fn bf16_copy(name: &str) -> tempfile::TempDir {
    let copy = tempfile::tempdir().unwrap();
    copy_dir(&fixture(name), copy.path());
    rewrite(&copy.path().join("model.safetensors"), |_, dtype, shape, bytes| {
        assert_eq!(dtype, Dtype::F32);
        let halves = bytes
            .chunks_exact(4)
            .flat_map(|b| half::bf16::from_f32(f32::from_le_bytes(b.try_into().unwrap())).to_le_bytes())
            .collect();
        Some((Dtype::BF16, shape, halves))
    });
    copy
}

/// Rewrites a safetensors file tensor by tensor: `edit` returns the new dtype, shape and
/// bytes (None keeps the tensor as it is).
fn rewrite(
    file: &Path,
    mut edit: impl FnMut(&str, Dtype, Vec<usize>, Vec<u8>) -> Option<(Dtype, Vec<usize>, Vec<u8>)>,
) {
    let bytes = std::fs::read(file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(name, v)| {
            let (dtype, shape, data) = edit(&name, v.dtype(), v.shape().to_vec(), v.data().to_vec()).unwrap_or((
                v.dtype(),
                v.shape().to_vec(),
                v.data().to_vec(),
            ));
            (name, dtype, shape, data)
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.clone(), safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, file).unwrap();
}

/// bf16/f16 → f32 is exact and the products see the same values in the same layout, so the
/// stored-dtype model computes what the f32 copy did. Measured: identical, bit for bit
/// (0 relative difference) in every case below; the bound is the one the change promises.
#[test]
fn lora_and_reference_logps_equal_those_of_f32_copies() {
    const BOUND: f64 = 1e-6;
    let tied = bf16_copy("llama_rope_scaled_tied");
    let cases: [(&str, PathBuf); 3] = [
        ("llama_bf16", fixture("llama_bf16")),
        ("qwen2_f16", fixture("qwen2_f16")),
        ("tied bf16", tied.path().to_path_buf()),
    ];
    let device = Device::default().autodiff();
    let plain = Device::default();
    let rows = fixture_rows(&fixture("llama_bf16"));
    let seqs: Vec<(&[u32], &[u32])> =
        rows.iter().map(|r| (&r.ids[..r.prompt_length], &r.ids[r.prompt_length..])).collect();
    let mut worst: f64 = 0.0;
    for (name, dir) in &cases {
        for precision in [MixedPrecision::No, MixedPrecision::Bf16] {
            let copies = lora_model(dir, false, precision, &device);
            let stored = lora_model(dir, true, precision, &device);
            assert!(
                matrix_dtypes(&stored).iter().all(|(_, d)| *d != DType::F32),
                "{name}: the stored model keeps 16-bit matrices"
            );
            let ids = adapter_ids(&copies);
            assert_eq!(ids, adapter_ids(&stored));
            for chunk in [None, Some(5)] {
                let batch = collate(&seqs, 2, &device);
                let (want, want_grads) = weighted_logps_and_grads(&copies, &batch, None, chunk, &ids);
                let (got, got_grads) = weighted_logps_and_grads(&stored, &batch, None, chunk, &ids);
                let at = format!("{name}, {precision:?}, chunk {chunk:?}");
                let d = max_relative(&got, &want);
                assert!(d <= BOUND, "{at}: LoRA log-probs differ by {d:e} (relative)");
                worst = worst.max(d);
                for (g, w) in got_grads.iter().zip(&want_grads) {
                    let d = max_relative(g, w);
                    assert!(d <= BOUND, "{at}: adapter gradients differ by {d:e} (relative)");
                    worst = worst.max(d);
                }
            }
            // Merging for save_model_to / host merge: the same f32 weights.
            assert!(
                prefhost::model::weights::hf_tensors(&stored.valid())
                    == prefhost::model::weights::hf_tensors(&copies.valid()),
                "{name}: merged weights differ"
            );
            // The LoRA reference (adapters left out) and a full fine-tune's resident
            // reference, on the plain device as the trainer runs them.
            let shift = max_relative(
                &completion_logps(&copies.valid(), &rows, &plain).concat(),
                &completion_logps(&copies.valid().without_adapters(), &rows, &plain).concat(),
            );
            assert!(
                shift > 1e-3,
                "{name}: the adapters must change the log-probs ({shift:e}) or the LoRA comparison proves little"
            );
            let reference = |model: &Llama| completion_logps(&model.valid().without_adapters(), &rows, &plain).concat();
            let d = max_relative(&reference(&stored), &reference(&copies));
            assert!(d <= BOUND, "{name}, {precision:?}: reference log-probs differ by {d:e}");
            let resident = load_frozen_model(dir, &plain).unwrap().1.with_precision(precision);
            let f32_resident = load_model(dir, &plain).unwrap().1.with_precision(precision);
            let d = max_relative(
                &completion_logps(&resident, &rows, &plain).concat(),
                &completion_logps(&f32_resident, &rows, &plain).concat(),
            );
            assert!(d <= BOUND, "{name}, {precision:?}: resident reference log-probs differ by {d:e}");
            worst = worst.max(d);
        }
    }
    println!("worst relative difference, stored dtype vs f32 copies: {worst:e}");
}

fn load_error(dir: &Path) -> String {
    // Both ways of loading read the same headers and bytes.
    let frozen =
        format!("{:#}", load_frozen_model(dir, &Device::default()).expect_err("a bad checkpoint must be an error"));
    let f32 = format!("{:#}", load_model(dir, &Device::default()).expect_err("a bad checkpoint must be an error"));
    assert_eq!(frozen, f32);
    frozen
}

#[test]
fn bad_checkpoint_files_are_refused_naming_file_and_tensor() {
    let copy = |name: &str| {
        let dir = tempfile::tempdir().unwrap();
        copy_dir(&fixture(name), dir.path());
        dir
    };
    let file_of = |dir: &tempfile::TempDir| dir.path().join("model.safetensors");

    // Truncated: the tensor whose data runs past the end is named.
    let dir = copy("llama_bf16");
    let bytes = std::fs::read(file_of(&dir)).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let last = meta.tensors().into_iter().max_by_key(|(_, info)| info.data_offsets.1).unwrap().0;
    std::fs::write(file_of(&dir), &bytes[..bytes.len() - 10]).unwrap();
    let err = load_error(dir.path());
    assert!(
        err.contains(&file_of(&dir).display().to_string())
            && err.contains(&format!("\"{last}\""))
            && err.contains("truncated"),
        "{err}"
    );

    // Cut inside the header.
    std::fs::write(file_of(&dir), &bytes[..20]).unwrap();
    let err = load_error(dir.path());
    assert!(
        err.contains(&file_of(&dir).display().to_string()) && err.contains("not a valid safetensors file"),
        "{err}"
    );

    // A tensor of another shape than the config gives (same bytes).
    let key = "model.layers.1.self_attn.q_proj.weight";
    let dir = copy("llama_bf16");
    rewrite(&file_of(&dir), |name, dtype, _, bytes| (name == key).then(|| (dtype, vec![16, 64], bytes)));
    let err = load_error(dir.path());
    assert!(
        err.contains(&file_of(&dir).display().to_string()) && err.contains(key) && err.contains("[16, 64]"),
        "{err}"
    );

    // A dtype prefhost does not read.
    let key = "model.layers.0.mlp.up_proj.weight";
    let dir = copy("llama_bf16");
    rewrite(&file_of(&dir), |name, _, shape, bytes| {
        (name == key).then(|| {
            (
                Dtype::F64,
                shape,
                bytes
                    .chunks_exact(2)
                    .flat_map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f64().to_le_bytes())
                    .collect(),
            )
        })
    });
    let err = load_error(dir.path());
    assert!(err.contains(&file_of(&dir).display().to_string()) && err.contains(key) && err.contains("F64"), "{err}");

    // A header whose shape does not fit the tensor's bytes (the data offsets stay).
    let dir = copy("llama_bf16");
    let key = "model.norm.weight";
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    header[key]["shape"] = serde_json::json!([64]);
    let mut text = header.to_string().into_bytes();
    while !text.len().is_multiple_of(8) {
        text.push(b' ');
    }
    let mut edited = (text.len() as u64).to_le_bytes().to_vec();
    edited.extend(text);
    edited.extend(&bytes[8 + n..]);
    std::fs::write(file_of(&dir), edited).unwrap();
    let err = load_error(dir.path());
    assert!(
        err.contains(&file_of(&dir).display().to_string()) && err.contains(key) && err.contains("needs 128 bytes"),
        "{err}"
    );
}

/// From the command line: a truncated checkpoint stops `host logps` with the file and
/// tensor named, a non-zero exit, and no output file.
#[test]
fn host_logps_on_a_truncated_checkpoint_fails_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    copy_dir(&repo().join("models/tiny-math"), &model);
    let file = model.join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
    let out = dir.path().join("ref.jsonl");
    let result = run_host(&[
        "logps",
        "--model",
        model.to_str().unwrap(),
        "--data",
        "data/arithmetic/pairs.jsonl",
        "--out",
        out.to_str().unwrap(),
    ]);
    let message = text(&result);
    assert!(!result.status.success(), "{message}");
    assert!(
        message.contains(&file.display().to_string()) && message.contains("tensor \"") && message.contains("truncated"),
        "{message}"
    );
    assert!(
        std::fs::read_dir(dir.path()).unwrap().all(|e| e.unwrap().file_name() == "model"),
        "nothing written beside the model"
    );
}
