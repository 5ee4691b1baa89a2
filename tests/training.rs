//! Whole runs of `host run` on the shipped model: metrics, determinism, checkpoints, and
//! script faults that stop a run before it starts.

mod common;
use common::*;

fn run(sb: &Sandbox, name: &str, source: &str) -> (std::process::Output, std::path::PathBuf) {
    let path = sb.write(&format!("scripts/{name}.rhai"), source);
    let run_dir = sb.path(&format!("runs/{name}"));
    let out = run_host(&["run", path.to_str().unwrap(), "--no-watch", "--run-dir", run_dir.to_str().unwrap()]);
    (out, run_dir)
}

fn dpo_script(steps: usize) -> String {
    format!(
        "import \"losses/dpo\" as dpo;\nfn loss(b, p) {{ dpo::loss(b, p) }}\nfn on_log(step, m) {{ print(`hook step=${{step}} loss=${{m.loss}}`); }}\ntrain({});\n",
        small_config(&format!("max_steps: {steps}, seed: 3, params: #{{ beta: 0.1 }},"))
    )
}

#[test]
fn a_dpo_run_logs_trl_metrics_and_saves_a_loadable_checkpoint() {
    let sb = Sandbox::new();
    let (out, run_dir) = run(&sb, "dpo", &dpo_script(12));
    assert!(out.status.success(), "{}", text(&out));
    let lines = loss_lines(&run_dir);
    assert_eq!(lines.len(), 12);
    assert!(text(&out).contains("hook step=12 loss="), "on_log hook not called: {}", text(&out));
    for key in [
        "loss",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
        "grad_norm",
        "learning_rate",
    ] {
        assert!(lines.iter().all(|l| l[key].is_number()), "missing {key}: {:?}", lines[0]);
    }
    // Step 1 starts at the reference: DPO loss is ln 2 and the rewards are zero.
    assert!((lines[0]["loss"].as_f64().unwrap() - std::f64::consts::LN_2).abs() < 1e-4, "{:?}", lines[0]);
    assert!(lines[0]["rewards/margins"].as_f64().unwrap().abs() < 1e-4);
    // Failure-mode diagnostics: zero change against the reference at the start, and the
    // shipped pairs differ by about one token in a completion of ~20.
    for key in
        ["diagnostics/token_delta_before_diff", "diagnostics/token_delta_at_diff", "diagnostics/token_delta_after_diff"]
    {
        assert!(lines[0][key].as_f64().unwrap().abs() < 1e-4, "{key}: {:?}", lines[0]);
    }
    let distance = lines[0]["diagnostics/edit_distance"].as_f64().unwrap();
    assert!(distance > 0.0 && distance < 0.2, "edit distance {distance}");
    assert!(lines.iter().all(|l| (0.0..=1.0).contains(&l["diagnostics/chosen_fell_share"].as_f64().unwrap())));
    // Training widens the margin and lowers the loss (first vs last four steps).
    let mean = |rows: &[serde_json::Value], key: &str| {
        rows.iter().map(|l| l[key].as_f64().unwrap()).sum::<f64>() / rows.len() as f64
    };
    assert!(
        mean(&lines[8..], "rewards/margins") > mean(&lines[..4], "rewards/margins") + 0.02,
        "margins did not grow: {lines:?}"
    );
    assert!(mean(&lines[8..], "loss") < std::f64::consts::LN_2 - 0.01, "loss did not fall: {lines:?}");

    let ckpt = run_dir.join("checkpoint-12");
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert!(ckpt.join(f).is_file(), "missing {f}");
    }
    let device = burn::tensor::Device::flex();
    let (_, model) = prefhost::model::load_model(&ckpt, &device).expect("checkpoint loads back");
    assert_eq!(model.layers.len(), 4);
}

#[test]
fn same_seed_gives_identical_metrics() {
    let sb = Sandbox::new();
    let (a, dir_a) = run(&sb, "a", &dpo_script(4));
    let (b, dir_b) = run(&sb, "b", &dpo_script(4));
    assert!(a.status.success() && b.status.success(), "{}{}", text(&a), text(&b));
    let (la, lb) = (read_lines(&dir_a.join("metrics.jsonl")), read_lines(&dir_b.join("metrics.jsonl")));
    assert_eq!(la, lb);
}

#[test]
fn a_loss_that_fails_at_the_first_step_stops_with_file_and_line() {
    let sb = Sandbox::new();
    let source = format!(
        "fn loss(b, p) {{\n    let i = 0;\n    loop {{ i += 1; }}\n}}\ntrain({});\n",
        small_config("max_steps: 2,")
    );
    let (out, run_dir) = run(&sb, "runaway", &source);
    assert!(!out.status.success());
    let msg = text(&out);
    assert!(msg.contains("runaway.rhai:1:") && msg.to_lowercase().contains("too many operations"), "{msg}");
    assert!(!run_dir.join("checkpoint-2").exists());

    let source = format!("fn loss(b, p) {{\n    b.chosen_logps\n}}\ntrain({});\n", small_config("max_steps: 2,"));
    let (out, _) = run(&sb, "vector", &source);
    assert!(!out.status.success());
    assert!(text(&out).contains("scalar"), "{}", text(&out));

    let source =
        format!("fn loss(b, p) {{\n    detach(mean(b.chosen_logps))\n}}\ntrain({});\n", small_config("max_steps: 2,"));
    let (out, _) = run(&sb, "detached", &source);
    assert!(!out.status.success());
    assert!(text(&out).contains("no gradient"), "{}", text(&out));
}

#[test]
fn an_existing_run_folder_is_never_overwritten() {
    let sb = Sandbox::new();
    std::fs::create_dir_all(sb.path("runs/dpo")).unwrap();
    let (out, _) = run(&sb, "dpo", &dpo_script(1));
    assert!(!out.status.success());
    assert!(text(&out).contains("already exists"), "{}", text(&out));
}

#[test]
fn bad_data_rows_are_named_by_file_and_line() {
    let sb = Sandbox::new();
    let data = sb.write(
        "bad.jsonl",
        "{\"prompt\": \"a\", \"chosen\": \"b\", \"rejected\": \"c\"}\n{\"prompt\": \"a\", \"chosen\": \"b\"}\n",
    );
    let source = format!(
        "fn loss(b, p) {{ b.chosen_nll }}\ntrain({});\n",
        small_config(&format!("max_steps: 1, data: \"{}\",", data.display()))
            .replace("    data: \"data/arithmetic/pairs.jsonl\",\n", "")
    );
    let (out, _) = run(&sb, "baddata", &source);
    assert!(!out.status.success());
    assert!(text(&out).contains("bad.jsonl:2:"), "{}", text(&out));
}

#[test]
fn gradient_accumulation_matches_one_large_batch() {
    // Two micro-batches of 4 see the same 8 pairs as one batch of 8, and the loss is a mean
    // over pairs, so the update (and everything after it) must agree up to float rounding.
    let sb = Sandbox::new();
    let script =
        |extra: &str| dpo_script(3).replace("seed: 3,", &format!("seed: 3, {extra}")).replace("batch_size: 8,\n", "");
    let (a, dir_a) = run(&sb, "big", &script("batch_size: 8, grad_accum: 1,"));
    let (b, dir_b) = run(&sb, "accum", &script("batch_size: 4, grad_accum: 2,"));
    assert!(a.status.success() && b.status.success(), "{}{}", text(&a), text(&b));
    let (la, lb) = (loss_lines(&dir_a), loss_lines(&dir_b));
    assert_eq!(la.len(), 3);
    for (x, y) in la.iter().zip(&lb) {
        for key in ["loss", "grad_norm", "rewards/margins", "logps/chosen"] {
            let (x, y) = (x[key].as_f64().unwrap(), y[key].as_f64().unwrap());
            assert!((x - y).abs() < 1e-3 * (1.0 + x.abs()), "{key}: {x} vs {y}");
        }
    }
}
