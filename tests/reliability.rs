//! Runs that survive: resume after SIGKILL reproduces the uninterrupted run, NaN/inf
//! steps are skipped (and too many in a row stop the run with its checkpoint intact),
//! and Ctrl-C saves a checkpoint and exits.

mod common;
use common::*;

use std::process::Stdio;

fn script(steps: usize, loss_body: &str, extra: &str) -> String {
    format!(
        "import \"losses/dpo\" as dpo;\nfn loss(b, p) {{\n{loss_body}\n}}\ntrain({});\n",
        small_config(&format!("max_steps: {steps}, seed: 3, save_every: 4, params: #{{ beta: 0.1 }}, {extra}"))
    )
}

#[test]
fn resume_after_sigkill_reproduces_the_uninterrupted_run() {
    let sb = Sandbox::new();
    let killed = assert_resume_reproduces(&sb, "exp", &script(16, "    dpo::loss(b, p)", ""), 16, 4);
    assert!(killed.join("checkpoint-16/optimizer.bpk").is_file());
    let sources: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(killed.join("checkpoint-16/script_sources.json")).unwrap()).unwrap();
    let texts: Vec<&str> = sources.as_object().unwrap().values().filter_map(|v| v.as_str()).collect();
    assert!(texts.iter().any(|t| t.contains("dpo::loss(b, p)")) && texts.iter().any(|t| t.contains("fn margin(batch)")), "{sources}");
}

#[test]
fn nonfinite_steps_are_skipped_and_too_many_in_a_row_stop_the_run() {
    let sb = Sandbox::new();
    // One NaN step: skipped, counted, the run completes. The loss records each call in its
    // state: both micro-batches of a step chain, and the skipped step's calls are dropped.
    let once = "    let out = dpo::loss(b, p);\n    let seen = if \"seen\" in p.state { p.state.seen } else { [] };\n    seen.push(p.step);\n    out.state = #{ seen: seen };\n    if p.step == 2 { out.loss = out.loss + log(tensor(-1.0)); }\n    out";
    let path = sb.write("scripts/once.rhai", &script(6, once, "grad_accum: 2,"));
    let dir = sb.path("once");
    let out = run_host(&["run", path.to_str().unwrap(), "--no-watch", "--run-dir", dir.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let lines = read_lines(&dir.join("metrics.jsonl"));
    let skipped: Vec<_> = lines.iter().filter(|l| l["event"] == "nonfinite_skipped").collect();
    assert_eq!(skipped.len(), 1, "{lines:?}");
    assert_eq!(skipped[0]["step"], 3);
    assert!(lines.iter().filter(|l| l.get("loss").is_some()).all(|l| l["loss"].as_f64().unwrap().is_finite()));
    assert!(text(&out).contains("1 step(s) skipped"), "{}", text(&out));
    let state: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("checkpoint-6/trainer_state.json")).unwrap()).unwrap();
    assert_eq!(state["loss_state"]["seen"], serde_json::json!([0, 0, 1, 1, 3, 3, 4, 4, 5, 5]));

    // From step 5 on every loss is NaN: three in a row stop the run; checkpoint-4 stays.
    let always = "    let out = dpo::loss(b, p);\n    if p.step >= 4 { out.loss = out.loss * tensor(0.0) / 0.0; }\n    out";
    let path = sb.write("scripts/always.rhai", &script(20, always, "max_nonfinite_steps: 3,"));
    let dir = sb.path("always");
    let out = run_host(&["run", path.to_str().unwrap(), "--no-watch", "--run-dir", dir.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(text(&out).contains("3 steps in a row") && text(&out).contains("last checkpoint"), "{}", text(&out));
    assert!(dir.join("checkpoint-4/model.safetensors").is_file());
    assert!(!dir.join("checkpoint-8").exists() && !dir.join("checkpoint-20").exists());
}

#[test]
fn ctrl_c_saves_a_checkpoint_and_the_run_can_continue() {
    let sb = Sandbox::new();
    let path = sb.write("scripts/exp.rhai", &script(4000, "    dpo::loss(b, p)", ""));
    let dir = sb.path("run");
    let mut child = host()
        .args(["run", path.to_str().unwrap(), "--no-watch", "--run-dir", dir.to_str().unwrap()])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    wait_until("a few steps", || loss_lines(&dir).len() >= 3);
    let sent = std::process::Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(sent.success());
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "Ctrl-C exits with 130 after saving");
    let (_, ckpt) = prefhost::train::checkpoint::latest_checkpoint(&dir).unwrap();
    let step = prefhost::train::checkpoint::read_state(&ckpt).unwrap().step;
    assert!(step >= 3, "checkpoint at step {step}");

    let target = (step + 2).to_string();
    let out = run_host(&["run", "--resume", dir.to_str().unwrap(), "--no-watch", "--max-steps", &target]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(loss_lines(&dir).len(), step + 2);

    // Fewer steps than the checkpoint has: refused, the log kept.
    let out = run_host(&["run", "--resume", dir.to_str().unwrap(), "--no-watch", "--max-steps", "2"]);
    let want = format!("checkpoint-{}: the checkpoint is at step {}, past the 2 steps asked for", step + 2, step + 2);
    assert!(!out.status.success() && text(&out).contains(&want), "{}", text(&out));
    assert_eq!(loss_lines(&dir).len(), step + 2);
}
