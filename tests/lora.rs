//! LoRA: adapters in PEFT's layout give the log-probs PEFT computed (on, disabled, and
//! merged into the weights), rsLoRA's scaling included; fresh A is distributed as PEFT
//! initialises it; only the adapters take gradients; a LoRA run starts exactly
//! at its reference, checkpoints adapters only, resumes step for step (dropout included),
//! and `host merge` writes a plain model; bad settings are refused by field.

mod common;
use common::*;

use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::optim::GradientsParams;
use burn::tensor::Device;
use prefhost::data::batch::collate;
use prefhost::model::{LoraConfig, load_adapter_model, load_model, read_adapter, save_model};
use prefhost::train::logps::token_logps;

fn fixture(name: &str) -> PathBuf {
    repo().join("tests/fixtures/hf").join(name)
}

fn expected() -> Vec<FixtureRow> {
    fixture_rows(&fixture("llama_lora"))
}

/// prefhost against PEFT, per token. Measured worst: 4.8e-7 with the adapters on and
/// disabled, 1.4e-6 merged (llama_lora, PEFT 0.17.1); 9.5e-7 on and disabled (llama_rslora,
/// PEFT 0.21.2). As tests/hf_fixtures.rs's TOLERANCE, with room for other CPUs.
const PEFT_TOLERANCE: f64 = 5e-6;

fn worst(got: &[Vec<f32>], want: impl Fn(usize) -> Vec<f64>) -> f64 {
    got.iter()
        .enumerate()
        .flat_map(|(i, g)| g.iter().zip(want(i)).map(|(a, b)| (*a as f64 - b).abs()).collect::<Vec<_>>())
        .fold(0.0, f64::max)
}

#[test]
fn peft_adapters_match_peft_on_disabled_and_merged() {
    let device = Device::default();
    let rows = expected();
    let (config, model, base) = load_adapter_model(&fixture("llama_lora"), Some(&fixture("llama")), &device).unwrap();
    assert_eq!(base, fixture("llama"));
    let on = completion_logps(&model, &rows, &device);
    let d = worst(&on, |i| rows[i].floats("token_logps"));
    assert!(d < PEFT_TOLERANCE, "adapters on: {d:e} from PEFT");
    // The adapters must matter, or this test would prove nothing.
    let shift = worst(&on, |i| rows[i].floats("base_token_logps"));
    assert!(shift > 1e-2, "adapters barely change the log-probs ({shift})");

    let off = completion_logps(&model.clone().without_adapters(), &rows, &device);
    let d = worst(&off, |i| rows[i].floats("base_token_logps"));
    assert!(d < PEFT_TOLERANCE, "adapters disabled: {d:e} from PEFT's disable_adapter()");

    let dir = tempfile::tempdir().unwrap();
    save_model(&model, &config, &repo().join("models/tiny-math/tokenizer.json"), &dir.path().join("merged")).unwrap();
    let (_, merged) = load_model(&dir.path().join("merged"), &device).unwrap();
    assert!(!merged.has_adapters());
    let d = worst(&completion_logps(&merged, &rows, &device), |i| rows[i].floats("token_logps"));
    assert!(d < PEFT_TOLERANCE, "merged: {d:e} from PEFT");
}

#[test]
fn fresh_adapters_change_nothing_and_only_they_take_gradients() {
    let device = Device::default().autodiff();
    let rows = expected();
    let (_, base) = load_model(&fixture("llama"), &device).unwrap();
    let lora: LoraConfig =
        serde_json::from_value(serde_json::json!({"r": 3, "lora_alpha": 6, "target_modules": ["q_proj", "up_proj"]}))
            .unwrap();
    let model = base.clone().with_lora(&lora, &device).unwrap();
    assert_eq!(completion_logps(&model, &rows, &device), completion_logps(&base, &rows, &device), "B starts at zero");

    let layers = model.layers.len();
    let (d, inter, q_out) = (32, 64, 32);
    let adapter_params = layers * (3 * (d + q_out) + 3 * (d + inter));
    assert_eq!(model.num_trainable_params(), adapter_params);
    assert_eq!(model.num_params(), base.num_params() + adapter_params);

    let seqs: Vec<(&[u32], &[u32])> =
        rows.iter().map(|r| (&r.ids[..r.prompt_length], &r.ids[r.prompt_length..])).collect();
    let loss = token_logps(&model, &collate(&seqs, 2, &device)).sum().neg();
    let grads = GradientsParams::from_grads(loss.backward(), &model);
    assert_eq!(grads.len(), 2 * 2 * layers, "A and B of q_proj and up_proj in each layer, nothing else");
    let layer = &model.layers[0];
    let q = layer.self_attn.q_proj.lora.as_ref().unwrap();
    assert!(grads.get::<2>(q.b.id).is_some() && grads.get::<2>(q.a.id).is_some());
    assert!(grads.get::<2>(layer.self_attn.q_proj.base.weight.id).is_none(), "the base stays frozen");
}

fn script(steps: usize, extra: &str) -> String {
    format!(
        "import \"losses/dpo\" as dpo;\nfn loss(b, p) {{ dpo::loss(b, p) }}\ntrain({});\n",
        small_config(&format!(
            "max_steps: {steps}, seed: 3, save_every: 4, lr: 2e-3, params: #{{ beta: 0.1 }},
             lora: #{{ r: 4, lora_alpha: 8, lora_dropout: 0.1, target_modules: \"all-linear\" }}, {extra}"
        ))
    )
}

fn loss_lines(dir: &Path) -> Vec<serde_json::Value> {
    read_lines(&dir.join("metrics.jsonl")).into_iter().filter(|l| l.get("loss").is_some()).collect()
}

#[test]
fn lora_run_starts_at_its_reference_checkpoints_adapters_resumes_and_merges() {
    let sb = Sandbox::new();
    let path = sb.write("scripts/lora.rhai", &script(8, ""));
    let (whole, split) = (sb.path("whole"), sb.path("split"));
    let out = run_host(&["run", path.to_str().unwrap(), "--no-watch", "--run-dir", whole.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("trainable (LoRA r=4"), "{}", text(&out));

    let lines = loss_lines(&whole);
    assert_eq!(lines.len(), 8);
    // B = 0: the policy is its reference at step 1, so DPO's loss is exactly ln 2.
    let first = lines[0]["loss"].as_f64().unwrap();
    assert!((first - std::f64::consts::LN_2).abs() < 1e-5, "step 1 loss {first}");
    assert!(lines[0]["rewards/margins"].as_f64().unwrap().abs() < 1e-6);
    assert!(lines[7]["rewards/margins"].as_f64().unwrap() > 0.0, "the adapters learned nothing: {:?}", lines[7]);

    let ckpt = whole.join("checkpoint-8");
    for file in ["adapter_config.json", "adapter_model.safetensors", "optimizer.bpk", "tokenizer.json"] {
        assert!(ckpt.join(file).is_file(), "{file} missing");
    }
    assert!(!ckpt.join("model.safetensors").exists(), "a LoRA checkpoint holds the adapters only");

    // Stopped at step 4 and resumed: the same steps, dropout masks included.
    let out = run_host(&[
        "run",
        path.to_str().unwrap(),
        "--no-watch",
        "--run-dir",
        split.to_str().unwrap(),
        "--max-steps",
        "4",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let out = run_host(&["run", "--resume", split.to_str().unwrap(), "--no-watch", "--max-steps", "8"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(loss_lines(&whole), loss_lines(&split), "the resumed LoRA run must reproduce the uninterrupted one");

    // Merge-and-save: a plain model with the adapters folded in.
    let merged = sb.path("merged");
    let out = run_host(&["merge", "--adapter", ckpt.to_str().unwrap(), "--out", merged.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let device = Device::default();
    let rows: Vec<FixtureRow> = (0..3)
        .map(|i| FixtureRow { ids: (5..25 + i).collect(), prompt_length: 6, fields: serde_json::Value::Null })
        .collect();
    let (_, with_adapters, _) = load_adapter_model(&ckpt, None, &device).unwrap();
    let (_, plain) = load_model(&merged, &device).unwrap();
    let (_, base) = load_model(&repo().join("models/tiny-math"), &device).unwrap();
    let (a, b) = (completion_logps(&with_adapters, &rows, &device), completion_logps(&plain, &rows, &device));
    let d = worst(&a, |i| b[i].iter().map(|&x| x as f64).collect());
    assert!(d < 1e-4, "merged vs adapters: {d}");
    let moved = worst(&a, |i| completion_logps(&base, &rows, &device)[i].iter().map(|&x| x as f64).collect());
    assert!(moved > 1e-4, "the trained adapters did not change the model");
    let out = run_host(&["merge", "--adapter", ckpt.to_str().unwrap(), "--out", merged.to_str().unwrap()]);
    assert!(!out.status.success() && text(&out).contains("already exists"), "{}", text(&out));

    // A full-model run cannot resume a LoRA checkpoint, and says why.
    let plain_script = sb.write(
        "scripts/plain.rhai",
        &script(8, "")
            .replace("lora: #{ r: 4, lora_alpha: 8, lora_dropout: 0.1, target_modules: \"all-linear\" },", ""),
    );
    std::fs::write(split.join("run.json"), serde_json::json!({"script": plain_script}).to_string()).unwrap();
    let out = run_host(&["run", "--resume", split.to_str().unwrap(), "--no-watch", "--max-steps", "12"]);
    assert!(!out.status.success() && text(&out).contains("no lora setting"), "{}", text(&out));
}

#[test]
fn bad_lora_settings_are_refused_by_field() {
    let sb = Sandbox::new();
    let cases = [
        ("lora: #{ target_modules: [\"q_proj\", \"attn\"] }", "lora.target_modules: unknown module \"attn\""),
        ("lora: #{ r: 0 }", "lora.r must be at least 1"),
        ("lora: #{ lora_dropout: 1.5 }", "lora.lora_dropout must be in [0, 1)"),
        ("lora: #{ rank: 8 }", "unknown field `rank`"),
        ("lora: #{ target_modules: [] }", "lora.target_modules: no modules named"),
        (
            "lora: #{ lora_dropout: 0.1 }, gradient_checkpointing: true",
            "gradient_checkpointing needs lora.lora_dropout 0",
        ),
    ];
    for (i, (setting, message)) in cases.iter().enumerate() {
        let body = format!("fn loss(b, p) {{ b.chosen_logps.mean() }}\ntrain({});\n", small_config(setting));
        let path = sb.write(&format!("scripts/bad{i}.rhai"), &body);
        let out = run_host(&["check", path.to_str().unwrap()]);
        assert!(!out.status.success(), "{setting} was accepted");
        assert!(
            text(&out).contains(message) && text(&out).contains(&format!("bad{i}.rhai")),
            "{setting}: {}",
            text(&out)
        );
    }
}

fn rslora_fixture() -> PathBuf {
    repo().join("tests/fixtures/hf5_more/llama_rslora")
}

fn hf5_llama() -> PathBuf {
    repo().join("tests/fixtures/hf5/llama")
}

/// rsLoRA: PEFT 0.21's adapter with `use_rslora` (all seven projections, r 4, alpha 8)
/// scales by alpha/√r = 4 where plain LoRA's alpha/r is 2: prefhost's scale is PEFT's, and
/// its log-probs PEFT's; read as plain LoRA they would be far off.
#[test]
fn rslora_adapters_scale_and_compute_like_peft() {
    let device = Device::default();
    let dir = rslora_fixture();
    let rows = fixture_rows(&dir);
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let peft_scaling = expected["peft_scaling"].as_f64().unwrap();
    let (_, model, _) = load_adapter_model(&dir, Some(&hf5_llama()), &device).unwrap();
    let adapters: Vec<f64> = model
        .projections()
        .iter()
        .map(|(path, _, p)| p.lora.as_ref().unwrap_or_else(|| panic!("{path}: no adapter")).scale)
        .collect();
    assert_eq!(adapters.len(), 14);
    assert!(adapters.iter().all(|&s| s == peft_scaling), "scales {adapters:?}, PEFT's {peft_scaling}");

    let d = worst(&completion_logps(&model, &rows, &device), |i| rows[i].floats("token_logps"));
    assert!(d < PEFT_TOLERANCE, "rsLoRA adapters on: {d:e} from PEFT");
    let d = worst(&completion_logps(&model.without_adapters(), &rows, &device), |i| rows[i].floats("base_token_logps"));
    assert!(d < PEFT_TOLERANCE, "adapters disabled: {d:e} from PEFT");

    let mut files = read_adapter(&dir).unwrap();
    assert!(files.lora.use_rslora);
    files.lora.use_rslora = false;
    let (_, base) = load_model(&hf5_llama(), &device).unwrap();
    let plain = base.with_lora(&files.lora, &device).unwrap().set_adapters(&mut files.tensors, &device).unwrap();
    let off = worst(&completion_logps(&plain, &rows, &device), |i| rows[i].floats("token_logps"));
    assert!(off > 1e-2, "the scaling barely matters ({off:e}): this fixture would not catch a wrong one");
}

/// Fresh adapters start A as PEFT does: kaiming_uniform_(a = √5), i.e. U(−1/√in, 1/√in).
/// Seeds cannot match across frameworks, so the distributions are compared: prefhost's A
/// and PEFT's (the rsLoRA fixture's lora_A, left as PEFT initialised it), each times √in,
/// must lie in [−1, 1], reach near ±1 in every module (a bound from fan_out, 1/√64 where
/// 1/√32 is right, would not), have mean 0 and variance 1/3 within 4 standard errors, and
/// be one distribution by a two-sample Kolmogorov–Smirnov test at α = 0.001.
#[test]
fn fresh_adapter_a_is_distributed_as_peft_initialises_it() {
    let device = Device::default();
    device.seed(11);
    let files = read_adapter(&rslora_fixture()).unwrap();
    let (_, base) = load_model(&hf5_llama(), &device).unwrap();
    let model = base.with_lora(&files.lora, &device).unwrap();
    let ours = model.adapter_tensors();
    assert!(
        ours.iter().filter(|(k, _)| k.ends_with("lora_B.weight")).all(|(_, (_, v))| v.iter().all(|&x| x == 0.0)),
        "B starts at zero"
    );
    // Each module's lora_A ([r, in]) times √in, pooled.
    let scaled = |tensors: &std::collections::BTreeMap<String, (Vec<usize>, Vec<f32>)>, who: &str| -> Vec<f64> {
        let mut all = Vec::new();
        for (name, (shape, values)) in tensors.iter().filter(|(k, _)| k.ends_with("lora_A.weight")) {
            let root = (shape[1] as f64).sqrt();
            let x: Vec<f64> = values.iter().map(|&v| v as f64 * root).collect();
            let top = x.iter().fold(0.0f64, |m, v| m.max(v.abs()));
            assert!(top <= 1.0 + 1e-6 && top > 0.9, "{who} {name} ({shape:?}): max |A|·√in = {top}");
            all.extend(x);
        }
        all
    };
    let (mut ours, mut peft) = (scaled(&ours, "prefhost"), scaled(&files.tensors, "PEFT"));
    assert_eq!(ours.len(), 2048);
    assert_eq!(peft.len(), ours.len());
    for (who, x) in [("prefhost", &ours), ("PEFT", &peft)] {
        let n = x.len() as f64;
        let mean = x.iter().sum::<f64>() / n;
        let var = x.iter().map(|v| v * v).sum::<f64>() / n;
        // U(−1, 1): variance 1/3; the mean's standard error √(1/3n), the second moment's √(4/45n).
        assert!(mean.abs() < 4.0 * (1.0 / (3.0 * n)).sqrt(), "{who}: mean {mean}");
        assert!((var - 1.0 / 3.0).abs() < 4.0 * (4.0 / (45.0 * n)).sqrt(), "{who}: variance {var}, not 1/3");
    }
    ours.sort_by(f64::total_cmp);
    peft.sort_by(f64::total_cmp);
    let (n, m) = (ours.len(), peft.len());
    let (mut i, mut j, mut ks) = (0, 0, 0.0f64);
    while i < n && j < m {
        let x = ours[i].min(peft[j]);
        while i < n && ours[i] <= x {
            i += 1;
        }
        while j < m && peft[j] <= x {
            j += 1;
        }
        ks = ks.max((i as f64 / n as f64 - j as f64 / m as f64).abs());
    }
    let critical = 1.95 * ((n + m) as f64 / (n * m) as f64).sqrt();
    assert!(ks < critical, "prefhost's A and PEFT's differ in distribution: KS {ks:.4} ≥ {critical:.4}");
}

/// An adapter_config.json field that turns on a variant prefhost does not implement is
/// refused by name, including fields PEFT 0.21 added (activated LoRA, block-diagonal LoRA,
/// Arrow routing) and fields a later PEFT may add; PEFT's own files load.
#[test]
fn adapter_variants_prefhost_does_not_implement_are_refused_by_field() {
    let source = rslora_fixture();
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(source.join("adapter_config.json")).unwrap()).unwrap();
    let cases = [
        ("alora_invocation_tokens", serde_json::json!([5, 6])),
        ("use_bdlora", serde_json::json!({ "target_modules_bd_a": ["q_proj"], "nblocks": 2 })),
        ("arrow_config", serde_json::json!({ "top_k": 2 })),
        ("use_dora", serde_json::json!(true)),
        ("init_lora_weights", serde_json::json!("pissa")),
        ("layers_to_transform", serde_json::json!([0])),
        ("a_field_from_a_later_peft", serde_json::json!(1)),
    ];
    for (key, value) in cases {
        let dir = tempfile::tempdir().unwrap();
        let mut edited = config.clone();
        edited[key] = value;
        std::fs::write(dir.path().join("adapter_config.json"), edited.to_string()).unwrap();
        std::fs::copy(source.join("adapter_model.safetensors"), dir.path().join("adapter_model.safetensors")).unwrap();
        let err = format!("{:#}", read_adapter(dir.path()).err().unwrap_or_else(|| panic!("{key} was accepted")));
        assert!(err.contains("adapter_config.json") && err.contains(&format!("\"{key}\"")), "{key}: {err}");
    }
    for dir in [source, fixture("llama_lora"), repo().join("tests/fixtures/train/llama_lora/init_adapter")] {
        read_adapter(&dir).unwrap_or_else(|e| panic!("{}: {e:#}", dir.display()));
    }
}
