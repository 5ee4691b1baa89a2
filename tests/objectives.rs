//! The objectives added beside DPO, trained end to end on the shipped model and data:
//! γ-PO (both variants), AMaPO, robust DPO, POET with DPO and SimPO, and KTO on unpaired
//! rows. Each trains (TRL's metrics logged, the reward margin widens), a run killed with
//! SIGKILL resumes to the same metrics (γ-PO's queue and KTO's batches included), and bad
//! unpaired data or config is refused naming the file and line or the field. Also LoRR's
//! mechanics: `replay` and the resets `on_step` schedules.

mod common;
use common::*;

/// An experiment script: `imports`, `fn loss(b, p) { body }`, and the small shipped config.
fn script(imports: &str, body: &str, config: &str) -> String {
    format!("{imports}\nfn loss(b, p) {{ {body} }}\ntrain({});\n", small_config(config))
}

fn mean_of(lines: &[serde_json::Value], key: &str) -> f64 {
    let values: Vec<f64> = lines.iter().map(|l| l[key].as_f64().unwrap_or_else(|| panic!("no {key} in {l}"))).collect();
    values.iter().sum::<f64>() / values.len() as f64
}

struct Objective {
    name: &'static str,
    imports: &'static str,
    body: &'static str,
    config: &'static str,
    /// Adaptive-margin losses need not fall: their margins grow as the gaps spread.
    loss_falls: bool,
    metrics: &'static [&'static str],
}

const PAIRED_METRICS: &[&str] = &[
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "grad_norm",
    "learning_rate",
];

const OBJECTIVES: &[Objective] = &[
    Objective {
        name: "gamma_po simpo",
        imports: "import \"losses/gamma_po\" as gamma_po;",
        body: "gamma_po::loss(b, p)",
        config: "params: #{ beta: 2.5, gamma_beta_ratio: 0.15, tau: 10.0 },",
        loss_falls: true,
        metrics: PAIRED_METRICS,
    },
    Objective {
        name: "gamma_po dpo",
        imports: "import \"losses/gamma_po\" as gamma_po;",
        body: "gamma_po::loss(b, p)",
        config: "params: #{ variant: \"dpo\", beta: 0.3, gamma_beta_ratio: 0.5, tau: 1.0 },",
        loss_falls: true,
        metrics: PAIRED_METRICS,
    },
    Objective {
        name: "amapo",
        imports: "import \"losses/amapo\" as amapo;",
        body: "amapo::loss(b, p)",
        config: "params: #{ beta: 2.0 },",
        loss_falls: false,
        metrics: PAIRED_METRICS,
    },
    Objective {
        name: "robust dpo",
        imports: "import \"losses/robust_dpo\" as robust_dpo;",
        body: "robust_dpo::loss(b, p)",
        config: "params: #{ beta: 0.3, label_smoothing: 0.1 },",
        loss_falls: true,
        metrics: PAIRED_METRICS,
    },
    Objective {
        name: "poet + dpo",
        imports: "import \"losses/dpo\" as dpo;\nimport \"transforms/poet\" as poet;",
        body: "dpo::loss(poet::truncate(b), p)",
        config: "params: #{ beta: 0.3 },",
        loss_falls: true,
        metrics: PAIRED_METRICS,
    },
    Objective {
        name: "poet + simpo",
        imports: "import \"losses/simpo\" as simpo;\nimport \"transforms/poet\" as poet;",
        body: "simpo::loss(poet::truncate(b), p)",
        config: "params: #{ beta: 2.0, gamma_beta_ratio: 0.5 },",
        loss_falls: true,
        metrics: PAIRED_METRICS,
    },
    Objective {
        name: "kto",
        imports: "import \"losses/kto\" as kto;",
        body: "kto::loss(b, p)",
        config: "mode: \"unpaired\", unpair: true, params: #{ beta: 0.5 },",
        loss_falls: true,
        metrics: &[
            "loss",
            "kl",
            "rewards/chosen",
            "rewards/rejected",
            "rewards/margins",
            "logps/chosen",
            "logps/rejected",
            "grad_norm",
            "learning_rate",
        ],
    },
];

#[test]
fn each_objective_trains_on_the_shipped_data() {
    let sb = Sandbox::new();
    for objective in OBJECTIVES {
        let config = format!("max_steps: 24, lr: 2e-4, seed: 5, {}", objective.config);
        let path = sb.write("scripts/exp.rhai", &script(objective.imports, objective.body, &config));
        let run = sb.path(&format!("run-{}", objective.name.replace(' ', "-")));
        let out = run_host(&["run", path.to_str().unwrap(), "--no-watch", "--run-dir", run.to_str().unwrap()]);
        assert!(out.status.success(), "{}: {}", objective.name, text(&out));
        let lines = loss_lines(&run);
        assert_eq!(lines.len(), 24, "{}", objective.name);
        for key in objective.metrics {
            assert!(
                lines.iter().all(|l| l[key].as_f64().is_some_and(f64::is_finite)),
                "{}: {key} missing or not finite",
                objective.name
            );
        }
        let (first, last) = (&lines[..6], &lines[18..]);
        let (margin_before, margin_after) = (mean_of(first, "rewards/margins"), mean_of(last, "rewards/margins"));
        assert!(margin_after > margin_before, "{}: rewards/margins {margin_before} -> {margin_after}", objective.name);
        if objective.loss_falls {
            let (before, after) = (mean_of(first, "loss"), mean_of(last, "loss"));
            assert!(after < before, "{}: loss {before} -> {after}", objective.name);
        }
    }
}

#[test]
fn gamma_po_resumes_with_its_queue_and_grows_it_per_micro_batch() {
    let sb = Sandbox::new();
    let config = "max_steps: 10, seed: 9, save_every: 4, grad_accum: 2, params: #{ beta: 2.5, gamma_beta_ratio: 0.15, tau: 10.0 },";
    let run = assert_resume_reproduces(
        &sb,
        "gamma",
        &script("import \"losses/gamma_po\" as gamma_po;", "gamma_po::loss(b, p)", config),
        10,
        4,
    );
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("checkpoint-10/trainer_state.json")).unwrap()).unwrap();
    // 8 initial draws, then 8 gaps from each of 2 micro-batches per step.
    assert_eq!(state["loss_state"]["queue"].as_array().map(Vec::len), Some(8 + 10 * 2 * 8), "{}", state["loss_state"]);
}

#[test]
fn each_objective_resumes_after_sigkill_to_the_same_metrics() {
    let sb = Sandbox::new();
    for (i, objective) in OBJECTIVES.iter().enumerate() {
        let config = format!("max_steps: 8, seed: 4, save_every: 4, {}", objective.config);
        assert_resume_reproduces(
            &sb,
            &format!("objective{i}"),
            &script(objective.imports, objective.body, &config),
            8,
            4,
        );
    }
}

#[test]
fn unpaired_rows_are_read_and_bad_input_is_named() {
    let sb = Sandbox::new();
    let run = |name: &str, config: &str| {
        let body = format!(
            "import \"losses/kto\" as kto;\nfn loss(b, p) {{ kto::loss(b, p) }}\ntrain(#{{ model: \"models/tiny-math\", progress: false, log_every: 1, max_steps: 3, {config} }});\n"
        );
        let path = sb.write(&format!("scripts/{name}.rhai"), &body);
        let out = run_host(&[
            "run",
            path.to_str().unwrap(),
            "--no-watch",
            "--run-dir",
            sb.path(&format!("run-{name}")).to_str().unwrap(),
        ]);
        (out.status.success(), text(&out))
    };
    let rows = |name: &str, lines: &[&str]| sb.write(name, &(lines.join("\n") + "\n")).display().to_string();
    let good = [
        r#"{"prompt": "Question: 2 + 3 = ?\nAnswer:", "completion": " 5", "label": true}"#,
        r#"{"prompt": "Question: 2 + 3 = ?\nAnswer:", "completion": " 6", "label": false}"#,
        r#"{"prompt": "Question: 4 + 4 = ?\nAnswer:", "completion": " 8", "label": true}"#,
    ];

    // TRL's unpaired rows train.
    let data = rows("rows.jsonl", &good);
    let (ok, out) = run("good", &format!("mode: \"unpaired\", data: \"{data}\", batch_size: 2"));
    assert!(ok, "{out}");
    assert_eq!(loss_lines(&sb.path("run-good")).len(), 3);

    // A label that is not a boolean, and an SFT row: the file and line are named.
    let bad = rows("bad.jsonl", &[good[0], r#"{"prompt": "Q", "completion": " 1", "label": "yes"}"#]);
    let (ok, out) = run("bad-label", &format!("mode: \"unpaired\", data: \"{bad}\", batch_size: 2"));
    assert!(!ok && out.contains("bad.jsonl:2") && out.contains("label"), "{out}");
    let sft = rows("sft.jsonl", &[good[0], r#"{"prompt": "Q", "completion": " 1"}"#]);
    let (ok, out) = run("sft-row", &format!("mode: \"unpaired\", data: \"{sft}\", batch_size: 2"));
    assert!(!ok && out.contains("sft.jsonl:2") && out.contains("label"), "{out}");

    // A paired file without the split is refused naming the field that allows it.
    let (ok, out) = run("paired", "mode: \"unpaired\", data: \"data/arithmetic/pairs.jsonl\", batch_size: 2");
    assert!(!ok && out.contains("pairs.jsonl:1") && out.contains("unpair: true"), "{out}");

    // Config that cannot work in this mode, and KTO on pairs.
    let pairs = "data: \"data/arithmetic/pairs.jsonl\"";
    for (config, expected) in [
        (format!("mode: \"unpaired\", unpair: true, {pairs}, batch_size: 1"), "batch_size"),
        (format!("mode: \"unpaired\", unpair: true, {pairs}, batch_size: 2, prefix_sharing: true"), "prefix_sharing"),
        (format!("{pairs}, batch_size: 2, unpair: true"), "unpair"),
        (format!("{pairs}, batch_size: 2"), "mode: \"unpaired\""),
    ] {
        let (ok, out) = run("config", &config);
        assert!(!ok && out.contains(expected), "{config}: expected an error naming {expected}, got {out}");
    }
}

/// DPO with `replay: 4` and an `on_step` reset; `extra` is added to the config.
fn replay_script(on_step: &str, extra: &str) -> String {
    format!(
        "import \"losses/dpo\" as dpo;\nfn loss(b, p) {{ dpo::loss(b, p) }}\nfn on_step(step, total) {{ {on_step} }}\ntrain({});\n",
        small_config(&format!("max_steps: 8, lr: 5e-4, seed: 5, replay: 4, params: #{{ beta: 0.3 }}, {extra}"))
    )
}

#[test]
fn replay_trains_each_batch_again_and_a_full_reset_restores_the_start() {
    let sb = Sandbox::new();
    for (name, extra) in [("full", ""), ("lora", "lora: #{ r: 4, lora_alpha: 8 },")] {
        let path = sb.write(
            &format!("scripts/{name}.rhai"),
            &replay_script("if step == 2 { #{ reset: #{ factor: 0.0 } } }", extra),
        );
        let run = sb.path(&format!("run-{name}"));
        let out = run_host(&["run", path.to_str().unwrap(), "--no-watch", "--run-dir", run.to_str().unwrap()]);
        assert!(out.status.success(), "{}", text(&out));
        let lines = loss_lines(&run);
        let at = |i: usize, key: &str| lines[i][key].as_f64().unwrap();
        // Steps 1-4 train one batch; step 3 starts from the initial weights again, so its
        // forward is step 1's exactly.
        assert_eq!(at(2, "loss"), at(0, "loss"), "{name}");
        assert_eq!(at(2, "logps/chosen"), at(0, "logps/chosen"), "{name}");
        assert!((at(0, "loss") - std::f64::consts::LN_2).abs() < 1e-6, "{name}: policy = reference at the start");
        assert_ne!(
            at(1, "logps/chosen"),
            at(0, "logps/chosen"),
            "{name}: step 2 trains the batch again after an update"
        );
        // Step 5 is a new batch: its rewards start from a trained policy on other rows.
        assert_ne!(at(4, "logps/rejected"), at(3, "logps/rejected"), "{name}");
        let events = read_lines(&run.join("metrics.jsonl"));
        let reset: Vec<_> = events.iter().filter(|l| l["event"] == "reset").collect();
        assert_eq!(reset.len(), 1, "{name}: {events:?}");
        assert_eq!(reset[0]["step"], 2);
        assert!(reset[0]["parameters"].as_u64().unwrap() > 0, "{name}: {}", reset[0]);
    }
}

#[test]
fn a_run_with_replay_and_resets_resumes_mid_group() {
    let sb = Sandbox::new();
    // Checkpoints at steps 3 and 6 fall inside groups of 4 replays.
    let script = replay_script(
        "if step % 3 == 1 { #{ reset: #{ factor: 0.5, modules: [\"down_proj\", \"up_proj\"] } } }",
        "save_every: 3,",
    );
    assert_resume_reproduces(&sb, "replay", &script, 8, 3);
}

#[test]
fn a_bad_reset_is_reported_and_the_run_goes_on() {
    let sb = Sandbox::new();
    let path = sb.write("scripts/bad.rhai", &replay_script("if step == 1 { #{ reset: #{ factor: 2.0 } } }", ""));
    let run = sb.path("run");
    let out = run_host(&["run", path.to_str().unwrap(), "--no-watch", "--run-dir", run.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("reset.factor must be in [0, 1]") && text(&out).contains("bad.rhai"), "{}", text(&out));
    let events = read_lines(&run.join("metrics.jsonl"));
    assert!(events.iter().any(|l| l["event"] == "on_step_failed" && l["step"] == 1), "{events:?}");
    assert!(!events.iter().any(|l| l["event"] == "reset"));
    assert_eq!(loss_lines(&run).len(), 8);

    // With LoRA the embeddings do not train: a reset of them moves nothing and says so.
    let path = sb.write(
        "scripts/frozen.rhai",
        &replay_script(
            "if step == 1 { #{ reset: #{ factor: 0.5, modules: [\"embed_tokens\"] } } }",
            "lora: #{ r: 4 },",
        ),
    );
    let run = sb.path("run-frozen");
    let out = run_host(&["run", path.to_str().unwrap(), "--no-watch", "--run-dir", run.to_str().unwrap()]);
    assert!(out.status.success() && text(&out).contains("selects no trainable parameter"), "{}", text(&out));

    // A hook with other parameters than the host passes would never run: refused up front.
    let path =
        sb.write("scripts/arity.rhai", &replay_script("", "").replace("fn on_step(step, total)", "fn on_step(step)"));
    let out =
        run_host(&["run", path.to_str().unwrap(), "--no-watch", "--run-dir", sb.path("run-arity").to_str().unwrap()]);
    assert!(
        !out.status.success() && text(&out).contains("on_step(step, total)") && text(&out).contains("arity.rhai"),
        "{}",
        text(&out)
    );
}
