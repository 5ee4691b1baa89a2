//! LoRA: adapters in PEFT's layout give the log-probs PEFT computed (on, disabled, and
//! merged into the weights); only the adapters take gradients; a LoRA run starts exactly
//! at its reference, checkpoints adapters only, resumes step for step (dropout included),
//! and `host merge` writes a plain model; bad settings are refused by field.

mod common;
use common::*;

use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::optim::GradientsParams;
use burn::tensor::Device;
use prefhost::data::batch::collate;
use prefhost::model::{LoraConfig, load_adapter_model, load_model, save_model};
use prefhost::train::logps::token_logps;

fn fixture(name: &str) -> PathBuf {
    repo().join("tests/fixtures/hf").join(name)
}

fn expected() -> Vec<FixtureRow> {
    fixture_rows(&fixture("llama_lora"))
}

fn worst(got: &[Vec<f32>], want: impl Fn(usize) -> Vec<f64>) -> f64 {
    got.iter().enumerate().flat_map(|(i, g)| g.iter().zip(want(i)).map(|(a, b)| (*a as f64 - b).abs()).collect::<Vec<_>>()).fold(0.0, f64::max)
}

#[test]
fn peft_adapters_match_peft_on_disabled_and_merged() {
    let device = Device::default();
    let rows = expected();
    let (config, model, base) = load_adapter_model(&fixture("llama_lora"), Some(&fixture("llama")), &device).unwrap();
    assert_eq!(base, fixture("llama"));
    let on = completion_logps(&model, &rows, &device);
    let d = worst(&on, |i| rows[i].floats("token_logps"));
    assert!(d < 1e-4, "adapters on: {d} from PEFT");
    // The adapters must matter, or this test would prove nothing.
    let shift = worst(&on, |i| rows[i].floats("base_token_logps"));
    assert!(shift > 1e-2, "adapters barely change the log-probs ({shift})");

    let off = completion_logps(&model.clone().without_adapters(), &rows, &device);
    let d = worst(&off, |i| rows[i].floats("base_token_logps"));
    assert!(d < 1e-4, "adapters disabled: {d} from PEFT's disable_adapter()");

    let dir = tempfile::tempdir().unwrap();
    save_model(&model, &config, &repo().join("models/tiny-math/tokenizer.json"), &dir.path().join("merged")).unwrap();
    let (_, merged) = load_model(&dir.path().join("merged"), &device).unwrap();
    assert!(!merged.has_adapters());
    let d = worst(&completion_logps(&merged, &rows, &device), |i| rows[i].floats("token_logps"));
    assert!(d < 1e-4, "merged: {d} from PEFT");
}

#[test]
fn fresh_adapters_change_nothing_and_only_they_take_gradients() {
    let device = Device::default().autodiff();
    let rows = expected();
    let (_, base) = load_model(&fixture("llama"), &device).unwrap();
    let lora: LoraConfig = serde_json::from_value(serde_json::json!({"r": 3, "lora_alpha": 6, "target_modules": ["q_proj", "up_proj"]})).unwrap();
    let model = base.clone().with_lora(&lora, &device).unwrap();
    assert_eq!(completion_logps(&model, &rows, &device), completion_logps(&base, &rows, &device), "B starts at zero");

    let layers = model.layers.len();
    let (d, inter, q_out) = (32, 64, 32);
    let adapter_params = layers * (3 * (d + q_out) + 3 * (d + inter));
    assert_eq!(model.num_trainable_params(), adapter_params);
    assert_eq!(model.num_params(), base.num_params() + adapter_params);

    let seqs: Vec<(&[u32], &[u32])> = rows.iter().map(|r| (&r.ids[..r.prompt_length], &r.ids[r.prompt_length..])).collect();
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
    let out = run_host(&["run", path.to_str().unwrap(), "--no-watch", "--run-dir", split.to_str().unwrap(), "--max-steps", "4"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = run_host(&["run", "--resume", split.to_str().unwrap(), "--no-watch", "--max-steps", "8"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(loss_lines(&whole), loss_lines(&split), "the resumed LoRA run must reproduce the uninterrupted one");

    // Merge-and-save: a plain model with the adapters folded in.
    let merged = sb.path("merged");
    let out = run_host(&["merge", "--adapter", ckpt.to_str().unwrap(), "--out", merged.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let device = Device::default();
    let rows: Vec<FixtureRow> = (0..3).map(|i| FixtureRow { ids: (5..25 + i).collect(), prompt_length: 6, fields: serde_json::Value::Null }).collect();
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
    let plain_script = sb.write("scripts/plain.rhai", &script(8, "").replace("lora: #{ r: 4, lora_alpha: 8, lora_dropout: 0.1, target_modules: \"all-linear\" },", ""));
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
    ];
    for (i, (setting, message)) in cases.iter().enumerate() {
        let body = format!("fn loss(b, p) {{ b.chosen_logps.mean() }}\ntrain({});\n", small_config(setting));
        let path = sb.write(&format!("scripts/bad{i}.rhai"), &body);
        let out = run_host(&["check", path.to_str().unwrap()]);
        assert!(!out.status.success(), "{setting} was accepted");
        assert!(text(&out).contains(message) && text(&out).contains(&format!("bad{i}.rhai")), "{setting}: {}", text(&out));
    }
}
