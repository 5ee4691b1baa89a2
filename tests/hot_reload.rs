//! Editing the loss while `host run` trains: a good edit is used from the next step, a
//! broken edit (compile error, then run-time error) is reported with file:line and the
//! run goes on with the previous version, and a fix is picked up again.

mod common;
use common::*;

use std::io::Read;
use std::path::Path;

/// Starts `host run` (watching, as users run it) in the background.
fn start_run(script: &Path, run_dir: &Path, stdout: std::process::Stdio) -> KillOnDrop {
    KillOnDrop(
        host()
            .args(["run", script.to_str().unwrap(), "--run-dir", run_dir.to_str().unwrap()])
            .stdout(stdout)
            .spawn()
            .unwrap(),
    )
}

fn script(loss_body: &str, beta: &str) -> String {
    format!(
        "import \"losses/dpo\" as dpo;\n\nfn loss(batch, params) {{\n{loss_body}\n}}\n\ntrain({});\n",
        small_config(&format!("max_steps: 4000, params: #{{ beta: {beta} }},"))
    )
}

fn events<'a>(lines: &'a [serde_json::Value], name: &str) -> Vec<&'a serde_json::Value> {
    lines.iter().filter(|l| l["event"] == name).collect()
}

fn last_step(lines: &[serde_json::Value]) -> u64 {
    lines.iter().filter(|l| l.get("loss").is_some()).filter_map(|l| l["step"].as_u64()).max().unwrap_or(0)
}

#[test]
fn edits_during_a_run_are_applied_or_rejected_without_stopping_it() {
    let sb = Sandbox::new();
    let path = sb.write("scripts/exp.rhai", &script("    dpo::loss(batch, params)", "0.1"));
    let run_dir = sb.path("run");
    let mut child = start_run(&path, &run_dir, std::process::Stdio::piped());
    let metrics = run_dir.join("metrics.jsonl");
    wait_for(&metrics, "first steps", |l| last_step(l) >= 3);

    // 1. A good edit: a new metric appears after the reload, and the reload is recorded.
    sb.write(
        "scripts/exp.rhai",
        &script("    let out = dpo::loss(batch, params);\n    out.metrics = #{ edited: 1.0 };\n    out", "0.1"),
    );
    let lines = wait_for(&metrics, "the good edit", |l| l.iter().any(|x| x.get("edited").is_some()));
    let reload = events(&lines, "reload");
    assert_eq!(reload.len(), 1, "{lines:?}");
    assert!(reload[0]["files"][0].as_str().unwrap().ends_with("exp.rhai"));
    let reload_step = reload[0]["step"].as_u64().unwrap();
    assert!(lines.iter().filter(|x| x.get("edited").is_some()).all(|x| x["step"].as_u64().unwrap() > reload_step));

    // 2. A compile error: rejected with file:line, training continues.
    sb.write("scripts/exp.rhai", &script("    let out = dpo::loss(batch params);\n    out", "0.1"));
    let lines = wait_for(&metrics, "the broken edit", |l| !events(l, "reload_failed").is_empty());
    let failed = events(&lines, "reload_failed")[0];
    let error = failed["error"].as_str().unwrap();
    assert!(error.contains("exp.rhai:4:"), "{error}");
    let step_at_failure = failed["step"].as_u64().unwrap();
    wait_for(&metrics, "steps after the broken edit", |l| last_step(l) >= step_at_failure + 3);

    // 3. A loss that compiles but fails when run (missing field): also rejected.
    sb.write("scripts/exp.rhai", &script("    batch.no_such_field * 2.0", "0.1"));
    let lines = wait_for(&metrics, "the failing edit", |l| events(l, "reload_failed").len() >= 2);
    let error = events(&lines, "reload_failed")[1]["error"].as_str().unwrap().to_string();
    assert!(error.contains("exp.rhai:4:"), "{error}");

    // 4. The fix, with a hot hyper-parameter change: picked up again.
    sb.write(
        "scripts/exp.rhai",
        &script("    let out = dpo::loss(batch, params);\n    out.metrics = #{ fixed: params.beta };\n    out", "0.5"),
    );
    let lines = wait_for(&metrics, "the fix", |l| l.iter().any(|x| x.get("fixed").is_some()));
    assert_eq!(events(&lines, "reload").len(), 2, "{lines:?}");
    let fixed = lines.iter().find(|x| x.get("fixed").is_some()).unwrap();
    assert!((fixed["fixed"].as_f64().unwrap() - 0.5).abs() < 1e-9);

    assert!(child.0.try_wait().unwrap().is_none(), "the run must still be going");
    child.0.kill().unwrap();
    let mut stdout = String::new();
    child.0.stdout.take().unwrap().read_to_string(&mut stdout).unwrap();
    assert!(stdout.contains("reloaded") && stdout.contains("exp.rhai at step"), "{stdout}");
    assert!(stdout.contains("keeping the running version"), "{stdout}");
    // The sources of every version used are kept in the run folder.
    let versions = std::fs::read_dir(run_dir.join("sources")).unwrap().count();
    assert_eq!(versions, 3);
}

#[test]
fn restart_only_fields_are_ignored_with_a_notice() {
    let sb = Sandbox::new();
    let path = sb.write("scripts/exp.rhai", &script("    dpo::loss(batch, params)", "0.1"));
    let run_dir = sb.path("run");
    let mut child = start_run(&path, &run_dir, std::process::Stdio::null());
    let metrics = run_dir.join("metrics.jsonl");
    wait_for(&metrics, "first steps", |l| last_step(l) >= 2);
    let edited = script("    dpo::loss(batch, params)", "0.1").replace("batch_size: 8", "batch_size: 2");
    sb.write("scripts/exp.rhai", &edited);
    let lines = wait_for(&metrics, "the notice", |l| !events(l, "restart_needed").is_empty());
    let notice = events(&lines, "restart_needed")[0];
    assert_eq!(notice["fields"], serde_json::json!(["batch_size"]));
    assert!(child.0.try_wait().unwrap().is_none(), "the run must still be going");
}

#[test]
fn a_version_that_fails_after_its_dry_run_is_replaced_by_the_previous_one() {
    let sb = Sandbox::new();
    let body = "    let out = dpo::loss(batch, params);\n    out.metrics = #{ beta: params.beta };\n    out";
    let path = sb.write("scripts/exp.rhai", &script(body, "0.1"));
    let run_dir = sb.path("run");
    let _child = start_run(&path, &run_dir, std::process::Stdio::null());
    let metrics = run_dir.join("metrics.jsonl");
    wait_for(&metrics, "first steps", |l| last_step(l) >= 2);
    // lr(0, total) passes the dry run; the next real step throws. Its params (beta 0.7)
    // must not outlive it.
    let failing = script(body, "0.7").replace(
        "train(",
        "fn lr(step, total) {\n    if step > 0 { throw \"schedule broke\"; }\n    1e-4\n}\n\ntrain(",
    );
    sb.write("scripts/exp.rhai", &failing);
    let lines = wait_for(&metrics, "the fallback", |l| !events(l, "lr_failed").is_empty());
    let failed = events(&lines, "lr_failed")[0].clone();
    assert!(failed["error"].as_str().unwrap().contains("schedule broke"), "{failed}");
    let at = failed["step"].as_u64().unwrap();
    let lines = wait_for(&metrics, "steps after the fallback", |l| last_step(l) >= at + 3);
    let after: Vec<_> =
        lines.iter().filter(|l| l.get("loss").is_some() && l["step"].as_u64().unwrap() > at + 1).collect();
    assert!(
        !after.is_empty() && after.iter().all(|l| l["beta"].as_f64() == Some(0.1)),
        "the previous version and its beta must be back: {after:?}"
    );
}

/// Every kind of script fault the issue lists, introduced by an edit while the run trains:
/// each is rejected with the file and line, and training goes on with the running version.
#[test]
fn faulty_loss_edits_are_each_rejected_with_file_and_line() {
    let sb = Sandbox::new();
    let good = script("    dpo::loss(batch, params)", "0.1");
    let path = sb.write("scripts/exp.rhai", &good);
    let run_dir = sb.path("run");
    let child = start_run(&path, &run_dir, std::process::Stdio::null());
    let metrics = run_dir.join("metrics.jsonl");
    wait_for(&metrics, "first steps", |l| last_step(l) >= 2);

    let recursion = good
        .replace("fn loss(", "fn deeper(n) {\n    deeper(n + 1)\n}\n\nfn loss(")
        .replace("    dpo::loss(batch, params)", "    deeper(0)");
    let faults = [
        (
            "non-scalar loss",
            script("    batch.chosen_logps - batch.rejected_logps", "0.1"),
            "exp.rhai:3: in loss()",
            "must be a scalar",
        ),
        (
            "no gradient",
            script("    detach(dpo::loss(batch, params).loss)", "0.1"),
            "exp.rhai:3: in loss()",
            "no gradient",
        ),
        ("wrong type", script("    \"a string\"", "0.1"), "exp.rhai:3: in loss()", "got string"),
        ("infinite loop", script("    loop { }", "0.1"), "exp.rhai:3: in loss()", "endless loop"),
        ("recursion", recursion, "exp.rhai:7: in loss()", "stack overflow"),
    ];
    for (i, (what, source, at, message)) in faults.iter().enumerate() {
        sb.write("scripts/exp.rhai", source);
        let lines = wait_for(&metrics, what, |l| events(l, "reload_failed").len() > i);
        let failed = events(&lines, "reload_failed")[i].clone();
        let error = failed["error"].as_str().unwrap().to_lowercase();
        assert!(error.contains(at) && error.contains(message), "{what}: {error}");
        let step = failed["step"].as_u64().unwrap();
        let lines = wait_for(&metrics, &format!("steps after the {what} edit"), |l| last_step(l) >= step + 2);
        assert!(events(&lines, "loss_failed").is_empty(), "{what}: the running version must stay in use: {lines:?}");
    }
    let mut child = child;
    assert!(child.0.try_wait().unwrap().is_none(), "the run must still be going");
}

/// The objectives from papers reload like any loss: a γ-PO edit keeps its queue (the pool
/// goes on growing), and switching the loss to AMaPO, robust DPO, then DPO with POET,
/// takes effect at the next step; so does an edit of a KTO run's β.
#[test]
fn new_objectives_reload_and_gamma_po_keeps_its_queue() {
    let sb = Sandbox::new();
    let source = |body: &str, params: &str| {
        format!(
            "import \"losses/gamma_po\" as gamma_po;\nimport \"losses/amapo\" as amapo;\nimport \"losses/robust_dpo\" as robust_dpo;\n\nfn loss(b, p) {{ {body} }}\n\ntrain({});\n",
            small_config(&format!("max_steps: 4000, params: #{{ {params} }},"))
        )
    };
    let path = sb.write("scripts/exp.rhai", &source("gamma_po::loss(b, p)", "beta: 2.5, tau: 10.0"));
    let run_dir = sb.path("run");
    let mut child = start_run(&path, &run_dir, std::process::Stdio::null());
    let metrics = run_dir.join("metrics.jsonl");
    wait_for(&metrics, "first steps", |l| last_step(l) >= 3);

    sb.write("scripts/exp.rhai", &source("gamma_po::loss(b, p)", "beta: 2.5, tau: 5.0"));
    let lines = wait_for(&metrics, "the τ edit", |l| {
        events(l, "reload").len() == 1 && last_step(l) > events(l, "reload")[0]["step"].as_u64().unwrap() + 1
    });
    let pool: Vec<f64> =
        lines.iter().filter(|l| l.get("loss").is_some()).map(|l| l["gamma_po/pool_size"].as_f64().unwrap()).collect();
    assert!(pool.len() >= 5, "{pool:?}");
    // 8 initial draws + 8 gaps per step, drawn up to pool_size 256.
    assert!(
        pool.windows(2).all(|w| w[1] == (w[0] + 8.0).min(256.0)),
        "the queue grows by a batch each step across the reload: {pool:?}"
    );

    sb.write("scripts/exp.rhai", &source("amapo::loss(b, p)", "beta: 2.0"));
    let lines = wait_for(&metrics, "AMaPO", |l| l.iter().any(|x| x.get("loss/margin").is_some()));
    assert_eq!(events(&lines, "reload").len(), 2);

    sb.write("scripts/exp.rhai", &source("robust_dpo::loss(b, p)", "beta: 0.1, label_smoothing: 0.2"));
    wait_for(&metrics, "robust DPO", |l| {
        events(l, "reload").len() == 3 && last_step(l) > events(l, "reload")[2]["step"].as_u64().unwrap()
    });

    sb.write(
        "scripts/exp.rhai",
        &source("dpo::loss(poet::truncate(b), p)", "beta: 0.1").replace(
            "import \"losses/amapo\"",
            "import \"losses/dpo\" as dpo;\nimport \"transforms/poet\" as poet;\nimport \"losses/amapo\"",
        ),
    );
    wait_for(&metrics, "POET", |l| {
        events(l, "reload").len() == 4 && last_step(l) > events(l, "reload")[3]["step"].as_u64().unwrap()
    });
    assert!(events(&read_lines(&metrics), "reload_failed").is_empty());
    assert!(child.0.try_wait().unwrap().is_none(), "the run must still be going");
    drop(child);

    // KTO (mode "unpaired"): an edit of β takes effect without a restart.
    let kto = |beta: &str| {
        format!(
            "import \"losses/kto\" as kto;\nfn loss(b, p) {{ let out = kto::loss(b, p); out.metrics.beta = p.beta; out }}\ntrain({});\n",
            small_config(&format!("max_steps: 4000, mode: \"unpaired\", unpair: true, params: #{{ beta: {beta} }},"))
        )
    };
    let path = sb.write("scripts/kto.rhai", &kto("0.1"));
    let run_dir = sb.path("run-kto");
    let mut child = start_run(&path, &run_dir, std::process::Stdio::null());
    let metrics = run_dir.join("metrics.jsonl");
    wait_for(&metrics, "KTO steps", |l| last_step(l) >= 2);
    sb.write("scripts/kto.rhai", &kto("0.3"));
    wait_for(&metrics, "KTO with β 0.3", |l| l.iter().any(|x| x["beta"].as_f64() == Some(0.3)));
    assert!(child.0.try_wait().unwrap().is_none(), "the run must still be going");
}
