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
    let sources: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(killed.join("checkpoint-16/script_sources.json")).unwrap())
            .unwrap();
    let texts: Vec<&str> = sources.as_object().unwrap().values().filter_map(|v| v.as_str()).collect();
    assert!(
        texts.iter().any(|t| t.contains("dpo::loss(b, p)")) && texts.iter().any(|t| t.contains("fn margin(batch)")),
        "{sources}"
    );
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
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("checkpoint-6/trainer_state.json")).unwrap()).unwrap();
    assert_eq!(state["loss_state"]["seen"], serde_json::json!([0, 0, 1, 1, 3, 3, 4, 4, 5, 5]));

    // From step 5 on every loss is NaN: three in a row stop the run; checkpoint-4 stays.
    let always =
        "    let out = dpo::loss(b, p);\n    if p.step >= 4 { out.loss = out.loss * tensor(0.0) / 0.0; }\n    out";
    let path = sb.write("scripts/always.rhai", &script(20, always, "max_nonfinite_steps: 3,"));
    let dir = sb.path("always");
    let out = run_host(&["run", path.to_str().unwrap(), "--no-watch", "--run-dir", dir.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(text(&out).contains("3 steps in a row") && text(&out).contains("last checkpoint"), "{}", text(&out));
    assert!(dir.join("checkpoint-4/model.safetensors").is_file());
    assert!(!dir.join("checkpoint-8").exists() && !dir.join("checkpoint-20").exists());
}

/// A run of 4000 steps into `run/`, in the background (stopped by the test).
fn start_long_run(sb: &Sandbox) -> (std::process::Child, std::path::PathBuf) {
    let path = sb.write("scripts/exp.rhai", &script(4000, "    dpo::loss(b, p)", ""));
    let dir = sb.path("run");
    let child = host()
        .args(["run", path.to_str().unwrap(), "--no-watch", "--run-dir", dir.to_str().unwrap()])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    (child, dir)
}

#[test]
fn ctrl_c_saves_a_checkpoint_and_the_run_can_continue() {
    let sb = Sandbox::new();
    let (mut child, dir) = start_long_run(&sb);
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

/// `--resume` checks the run's inputs against the fingerprints recorded when it started:
/// edited data, edited held-out data and changed weights are refused, naming the file; `--resume-anyway` goes
/// on (and records the new inputs); a moved but identical model folder, and an older run
/// folder without fingerprints, resume as before.
#[test]
fn resume_refuses_changed_data_or_model_unless_asked_to_go_on() {
    let sb = Sandbox::new();
    copy_dir(&repo().join("models/tiny-math"), &sb.path("model"));
    let data = sb.path("data/pairs.jsonl");
    std::fs::create_dir_all(data.parent().unwrap()).unwrap();
    let original = std::fs::read_to_string(repo().join("data/arithmetic/pairs.jsonl")).unwrap();
    std::fs::write(&data, &original).unwrap();
    let model = sb.path("model");
    let heldout = sb.path("data/eval.jsonl");
    let heldout_rows = std::fs::read_to_string(repo().join("data/arithmetic/eval.jsonl")).unwrap();
    std::fs::write(&heldout, &heldout_rows).unwrap();
    let config = |model: &str| {
        small_config(&format!("seed: 3, save_every: 1, params: #{{ beta: 0.1 }}, heldout: #{{ data: \"{}\", rows: 2, max_new_tokens: 4 }},", heldout.display()))
            .replace("models/tiny-math", model)
            .replace("data/arithmetic/pairs.jsonl", data.to_str().unwrap())
    };
    let write_script = |model: &str| {
        sb.write(
            "scripts/exp.rhai",
            &format!("import \"losses/dpo\" as dpo;\nfn loss(b, p) {{ dpo::loss(b, p) }}\ntrain({});\n", config(model)),
        )
    };
    let path = write_script(model.to_str().unwrap());
    let dir = sb.path("run");
    let run = |args: &[&str]| {
        let mut all = vec!["run", "--resume", dir.to_str().unwrap(), "--no-watch"];
        all.extend_from_slice(args);
        run_host(&all)
    };
    let out = run_host(&[
        "run",
        path.to_str().unwrap(),
        "--no-watch",
        "--run-dir",
        dir.to_str().unwrap(),
        "--max-steps",
        "2",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let identity: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("identity.json")).unwrap()).unwrap();
    for role in ["data", "heldout data", "model config.json", "tokenizer tokenizer.json", "weights model.safetensors"] {
        assert!(identity["inputs"][role]["sha256"].as_str().is_some_and(|s| s.len() == 64), "{role}: {identity}");
    }

    // Unchanged: resumes.
    let out = run(&["--max-steps", "3"]);
    assert!(out.status.success() && text(&out).contains("resuming"), "{}", text(&out));

    // Edited data (two rows swapped: same size, same row count): refused, nothing written.
    let mut lines: Vec<&str> = original.lines().collect();
    lines.swap(0, 1);
    std::fs::write(&data, lines.join("\n") + "\n").unwrap();
    let out = run(&["--max-steps", "4"]);
    let said = text(&out);
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains(&format!("data ({}): sha256", data.display()))
            && said.contains("--resume-anyway")
            && said.contains("new run"),
        "{said}"
    );
    assert!(!said.contains("weights"), "only the data changed: {said}");
    assert_eq!(loss_lines(&dir).len(), 3);
    assert!(!dir.join("checkpoint-4").exists());
    std::fs::write(&data, &original).unwrap();

    // Edited held-out rows (the evaluation before and after would score other questions): refused.
    std::fs::write(&heldout, heldout_rows.replacen("\"answer\"", "\"answer\" ", 1)).unwrap();
    let out = run(&["--max-steps", "4"]);
    let said = text(&out);
    assert!(!out.status.success() && said.contains(&format!("heldout data ({}): size", heldout.display())), "{said}");
    assert!(!said.contains("\n  data ("), "only the held-out data changed: {said}");
    assert_eq!(loss_lines(&dir).len(), 3);
    std::fs::write(&heldout, &heldout_rows).unwrap();

    // Other weights (one mantissa bit of the last value): refused, naming the weights file.
    let weights = model.join("model.safetensors");
    let mut bytes = std::fs::read(&weights).unwrap();
    let at = bytes.len() - 4;
    bytes[at] ^= 1;
    std::fs::write(&weights, &bytes).unwrap();
    let out = run(&["--max-steps", "4"]);
    assert!(
        !out.status.success() && text(&out).contains(&format!("weights model.safetensors ({})", weights.display())),
        "{}",
        text(&out)
    );
    assert_eq!(loss_lines(&dir).len(), 3);

    // --resume-anyway goes on, logs what changed, and records the new inputs.
    let out = run(&["--max-steps", "4", "--resume-anyway"]);
    assert!(out.status.success() && text(&out).contains("resuming anyway"), "{}", text(&out));
    assert_eq!(loss_lines(&dir).len(), 4);
    let events = read_lines(&dir.join("metrics.jsonl"));
    assert!(
        events.iter().any(|l| l["event"] == "resumed_anyway" && l["changed"].to_string().contains("model.safetensors")),
        "{events:?}"
    );
    let out = run(&["--max-steps", "5"]);
    assert!(out.status.success(), "{}", text(&out));

    // The same model in another folder is the same model.
    let moved = sb.path("moved-model");
    copy_dir(&model, &moved);
    write_script(moved.to_str().unwrap());
    let out = run(&["--max-steps", "6"]);
    assert!(out.status.success(), "{}", text(&out));

    // A run folder from before fingerprints were recorded resumes unchecked, with a note.
    std::fs::remove_file(dir.join("identity.json")).unwrap();
    let out = run(&["--max-steps", "7"]);
    assert!(out.status.success() && text(&out).contains("no identity.json"), "{}", text(&out));
    assert_eq!(loss_lines(&dir).len(), 7);
}

/// One writer per run folder: `run.lock` held by a live process refuses a second
/// `--resume` with its PID (and one of another host names that host); a lock whose PID is
/// gone is taken over; the lock is removed when a run ends, with success or an error.
#[test]
fn a_second_writer_is_refused_and_a_stale_lock_is_taken_over() {
    let sb = Sandbox::new();
    let path = sb.write("scripts/exp.rhai", &script(2, "    dpo::loss(b, p)", ""));
    let dir = sb.path("run");
    let lock = dir.join(prefhost::train::lock::LOCK_FILE);
    let out = run_host(&["run", path.to_str().unwrap(), "--no-watch", "--run-dir", dir.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(!lock.exists(), "the lock outlived the run");
    let resume =
        |steps: &str| run_host(&["run", "--resume", dir.to_str().unwrap(), "--no-watch", "--max-steps", steps]);
    let host = prefhost::train::lock::hostname();

    // Held by a live process (this test): refused with its PID, nothing written.
    let me = std::process::id();
    std::fs::write(&lock, format!("{{\"pid\": {me}, \"host\": \"{host}\"}}\n")).unwrap();
    let out = resume("3");
    assert!(
        !out.status.success() && text(&out).contains(&format!("run.lock: held by PID {me} on this host")),
        "{}",
        text(&out)
    );
    assert_eq!(loss_lines(&dir).len(), 2);
    assert!(lock.exists(), "a refused run removed the holder's lock");

    // Held on another host: refused, naming it.
    std::fs::write(&lock, "{\"pid\": 1, \"host\": \"elsewhere.example\"}\n").unwrap();
    let out = resume("3");
    assert!(!out.status.success() && text(&out).contains("held by PID 1 on host elsewhere.example"), "{}", text(&out));

    // A cut-short lock: refused, naming the file.
    std::fs::write(&lock, "").unwrap();
    let out = resume("3");
    assert!(!out.status.success() && text(&out).contains("run.lock: a lock file that is not"), "{}", text(&out));

    // Stale (no such PID on this host): taken over with a note; the run goes on and
    // removes the lock when it ends.
    std::fs::write(&lock, format!("{{\"pid\": 999999999, \"host\": \"{host}\"}}\n")).unwrap();
    let out = resume("3");
    assert!(out.status.success() && text(&out).contains("taking over a stale lock of PID 999999999"), "{}", text(&out));
    assert_eq!(loss_lines(&dir).len(), 3);
    assert!(!lock.exists());

    // An error exit (fewer steps than the checkpoint has) removes it too.
    let out = resume("1");
    assert!(!out.status.success() && text(&out).contains("past the 1 steps"), "{}", text(&out));
    assert!(!lock.exists(), "the lock outlived a failed run");
}

/// While a run writes, a second `--resume` of its folder is refused with the first's PID.
#[test]
fn a_resume_of_a_running_run_is_refused_with_its_pid() {
    let sb = Sandbox::new();
    let (mut child, dir) = start_long_run(&sb);
    wait_until("the first checkpoint", || dir.join("checkpoint-4/trainer_state.json").is_file());
    let out = run_host(&["run", "--resume", dir.to_str().unwrap(), "--no-watch"]);
    let said = text(&out);
    let _ = std::process::Command::new("kill").args(["-INT", &child.id().to_string()]).status();
    let status = child.wait().unwrap();
    assert!(!out.status.success() && said.contains(&format!("held by PID {} on this host", child.id())), "{said}");
    assert_eq!(status.code(), Some(130), "the first run went on and stopped at Ctrl-C");
    assert!(!dir.join(prefhost::train::lock::LOCK_FILE).exists(), "Ctrl-C left the lock");
}

/// Each checkpoint has a manifest (size and SHA-256 of each file); a latest checkpoint
/// damaged after it was written (a flipped byte, a truncated file) is passed over for the
/// previous good one, and the resumed run's metrics are those of the undamaged run.
#[test]
fn a_damaged_latest_checkpoint_falls_back_to_the_previous_one() {
    let sb = Sandbox::new();
    let path = sb.write("scripts/exp.rhai", &script(8, "    dpo::loss(b, p)", ""));
    let dir = sb.path("run");
    let out = run_host(&["run", path.to_str().unwrap(), "--no-watch", "--run-dir", dir.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let whole = loss_lines(&dir);
    assert_eq!(whole.len(), 8);
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("checkpoint-8/manifest.json")).unwrap()).unwrap();
    for file in [
        "model.safetensors",
        "optimizer.bpk",
        "trainer_state.json",
        "script_sources.json",
        "config.json",
        "tokenizer.json",
    ] {
        assert!(manifest["files"][file]["size"].as_u64().is_some(), "{file}: {manifest}");
    }

    // One flipped byte in the middle of the weights.
    let weights = dir.join("checkpoint-8/model.safetensors");
    let mut bytes = std::fs::read(&weights).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x10;
    std::fs::write(&weights, &bytes).unwrap();
    let out = run_host(&["run", "--resume", dir.to_str().unwrap(), "--no-watch"]);
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains("falling back to") && said.contains("checkpoint-4") && said.contains("model.safetensors: sha256"),
        "{said}"
    );
    assert_eq!(loss_lines(&dir), whole, "the run resumed from checkpoint-4 must reproduce steps 5-8");
    assert!(
        prefhost::model::weights::verify_manifest(&dir.join("checkpoint-8")).unwrap(),
        "checkpoint-8 was saved again"
    );

    // A truncated optimizer state.
    let optimizer = dir.join("checkpoint-8/optimizer.bpk");
    let len = std::fs::metadata(&optimizer).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&optimizer).unwrap().set_len(len / 2).unwrap();
    let out = run_host(&["run", "--resume", dir.to_str().unwrap(), "--no-watch"]);
    let said = text(&out);
    assert!(out.status.success() && said.contains("optimizer.bpk") && said.contains("truncated?"), "{said}");
    assert_eq!(loss_lines(&dir), whole);

    // Every checkpoint damaged: refused, naming each.
    for step in [4, 8] {
        std::fs::write(dir.join(format!("checkpoint-{step}/config.json")), "{}").unwrap();
    }
    let out = run_host(&["run", "--resume", dir.to_str().unwrap(), "--no-watch"]);
    let said = text(&out);
    assert!(
        !out.status.success()
            && said.contains("every checkpoint is damaged")
            && said.contains("checkpoint-4/config.json"),
        "{said}"
    );
}

/// `host verify RUN_DIR`: one line per checkpoint, ok or damaged (which file, what
/// differs), exit 0 only when none is damaged; a checkpoint without a manifest (written
/// before manifests existed) is reported unchecked. Nothing in the folder is changed.
#[test]
fn host_verify_names_each_damaged_checkpoint_and_file() {
    let sb = Sandbox::new();
    let path = sb.write("scripts/exp.rhai", &script(8, "    dpo::loss(b, p)", ""));
    let dir = sb.path("run");
    let out = run_host(&["run", path.to_str().unwrap(), "--no-watch", "--run-dir", dir.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let verify = || {
        let out = run_host(&["verify", dir.to_str().unwrap()]);
        let lines: Vec<String> = String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect();
        (out.status.success(), lines, text(&out))
    };
    let (c4, c8) = (dir.join("checkpoint-4"), dir.join("checkpoint-8"));

    let (ok, lines, said) = verify();
    assert!(ok, "{said}");
    assert_eq!(lines, [format!("{}: ok", c4.display()), format!("{}: ok", c8.display())], "{said}");

    // A flipped byte in checkpoint-8's weights.
    let weights = c8.join("model.safetensors");
    let original = std::fs::read(&weights).unwrap();
    let mut bytes = original.clone();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(&weights, &bytes).unwrap();
    let (ok, lines, said) = verify();
    assert!(!ok, "{said}");
    assert_eq!(lines[0], format!("{}: ok", c4.display()));
    assert!(
        lines[1].starts_with(&format!("{}: damaged: {}: sha256 ", c8.display(), weights.display()))
            && lines[1].contains("the manifest says"),
        "{said}"
    );

    // And checkpoint-4's optimizer state cut short.
    let optimizer = c4.join("optimizer.bpk");
    let len = std::fs::metadata(&optimizer).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&optimizer).unwrap().set_len(len - 1).unwrap();
    let (ok, lines, said) = verify();
    assert!(!ok && lines.len() == 2, "{said}");
    assert_eq!(
        lines[0],
        format!(
            "{}: damaged: {}: {} bytes, the manifest says {len} (truncated?)",
            c4.display(),
            optimizer.display(),
            len - 1
        ),
        "{said}"
    );

    // Checkpoint-4 without a manifest (as before manifests): unchecked, not damaged.
    std::fs::remove_file(c4.join("manifest.json")).unwrap();
    std::fs::write(&weights, &original).unwrap();
    let (ok, lines, said) = verify();
    assert!(ok, "{said}");
    assert_eq!(
        lines,
        [
            format!("{}: no manifest, unchecked (written before checkpoints carried one)", c4.display()),
            format!("{}: ok", c8.display())
        ],
        "{said}"
    );

    // A staging folder a crash left is listed, not taken for a checkpoint, and left alone.
    std::fs::create_dir(dir.join(".checkpoint-12.tmp")).unwrap();
    let (ok, lines, said) = verify();
    assert!(ok && lines.len() == 3 && lines[2].contains(".checkpoint-12.tmp: left by a save"), "{said}");
    assert!(dir.join(".checkpoint-12.tmp").is_dir());

    // Not a run folder: refused.
    let out = run_host(&["verify", sb.path("scripts").to_str().unwrap()]);
    assert!(!out.status.success() && text(&out).contains("not a prefhost run folder"), "{}", text(&out));
}

/// A reload that points `heldout` at another file records it in identity.json, so that the
/// run resumes onto it (the script now names it) rather than being refused as changed.
#[test]
fn a_reload_of_heldout_is_recorded_and_the_run_resumes() {
    let sb = Sandbox::new();
    let rows = std::fs::read_to_string(repo().join("data/arithmetic/eval.jsonl")).unwrap();
    let (first, second) = (sb.path("data/eval-a.jsonl"), sb.path("data/eval-b.jsonl"));
    std::fs::create_dir_all(first.parent().unwrap()).unwrap();
    std::fs::write(&first, &rows).unwrap();
    std::fs::write(&second, rows.lines().rev().collect::<Vec<_>>().join("\n") + "\n").unwrap();
    let with_heldout = |file: &std::path::Path| {
        script(
            4000,
            "    dpo::loss(b, p)",
            &format!("heldout: #{{ data: \"{}\", rows: 2, max_new_tokens: 4 }},", file.display()),
        )
    };
    let path = sb.write("scripts/exp.rhai", &with_heldout(&first));
    let dir = sb.path("run");
    let mut child = host()
        .args(["run", path.to_str().unwrap(), "--run-dir", dir.to_str().unwrap()])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    wait_until("a few steps", || loss_lines(&dir).len() >= 2);
    sb.write("scripts/exp.rhai", &with_heldout(&second));
    wait_until("the reload", || read_lines(&dir.join("metrics.jsonl")).iter().any(|l| l["event"] == "reload"));
    let _ = std::process::Command::new("kill").args(["-INT", &child.id().to_string()]).status();
    assert_eq!(child.wait().unwrap().code(), Some(130));
    let identity: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("identity.json")).unwrap()).unwrap();
    assert_eq!(identity["inputs"]["heldout data"]["path"], second.display().to_string(), "{identity}");

    let step = loss_lines(&dir).len();
    let out =
        run_host(&["run", "--resume", dir.to_str().unwrap(), "--no-watch", "--max-steps", &(step + 1).to_string()]);
    assert!(out.status.success() && text(&out).contains("resuming"), "{}", text(&out));
}
