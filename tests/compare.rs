//! `compare: [...]` runs: every arm trains from the same start, the held-out accuracy is
//! measured before and after, and the report (table, plots, results.json) is written.

mod common;
use common::*;

fn compare_script(arms: &str) -> String {
    format!(
        "import \"losses/dpo\" as dpo;\nimport \"losses/dpop\" as dpop;\nfn dpo_loss(b, p) {{ dpo::loss(b, p) }}\nfn dpop_loss(b, p) {{ dpop::loss(b, p) }}\ntrain({});\n",
        small_config(&format!(
            "name: \"cmp\", max_steps: 3, seed: 5, params: #{{ beta: 0.1 }}, compare: [{arms}],
             heldout: #{{ data: \"data/arithmetic/eval.jsonl\", rows: 6, max_new_tokens: 24 }},"
        ))
    )
}

#[test]
fn arms_start_from_the_same_state_and_the_report_is_written() {
    let sb = Sandbox::new();
    // DPOP with lambda 0 is DPO: identical losses at every step prove the same start,
    // the same batches and that an arm's params override the shared ones.
    let script = sb.write(
        "scripts/cmp.rhai",
        &compare_script("#{ name: \"dpo\", loss: \"dpo_loss\" }, #{ name: \"dpop0\", loss: \"dpop_loss\", params: #{ lambda: 0.0 } }, #{ name: \"dpop\", loss: \"dpop_loss\", params: #{ lambda: 50.0 } }"),
    );
    let run_dir = sb.path("runs/cmp");
    let out = run_host(&["run", script.to_str().unwrap(), "--no-watch", "--run-dir", run_dir.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let losses = |arm: &str| -> Vec<f64> {
        read_lines(&run_dir.join(arm).join("metrics.jsonl")).iter().filter_map(|l| l["loss"].as_f64()).collect()
    };
    let (dpo, dpop0, dpop) = (losses("dpo"), losses("dpop0"), losses("dpop"));
    assert_eq!(dpo.len(), 3);
    for (a, b) in dpo.iter().zip(&dpop0) {
        assert!((a - b).abs() < 1e-6, "dpo {dpo:?} vs dpop with lambda 0 {dpop0:?}");
    }
    assert!(
        dpo.iter().zip(&dpop).skip(1).any(|(a, b)| (a - b).abs() > 1e-4),
        "lambda 50 must change the loss: {dpop:?}"
    );

    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("results.json")).unwrap()).unwrap();
    assert_eq!(results["eval_before"]["total"].as_u64(), Some(6));
    assert_eq!(results["arms"].as_array().unwrap().len(), 3);
    let accuracy = results["arms"][2]["eval_after"]["accuracy"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&accuracy));
    let report = std::fs::read_to_string(run_dir.join("report.md")).unwrap();
    assert!(report.contains("| before training |") && report.contains("| after dpop (3 steps) |"), "{report}");
    for png in ["logp_chosen_vs_ref.png", "token_delta_after_diff.png", "reward_margins.png"] {
        let bytes = std::fs::read(run_dir.join(png)).unwrap();
        assert_eq!(&bytes[1..4], b"PNG", "{png}");
    }

    // `host verify` checks each arm's checkpoints.
    let verify = run_host(&["verify", run_dir.to_str().unwrap()]);
    let lines: Vec<String> = String::from_utf8_lossy(&verify.stdout).lines().map(str::to_string).collect();
    let expected: Vec<String> = std::iter::once(format!("{}: no checkpoints", run_dir.display()))
        .chain(
            ["dpo", "dpop", "dpop0"]
                .iter()
                .map(|arm| format!("{}: ok", run_dir.join(arm).join("checkpoint-3").display())),
        )
        .collect();
    assert!(verify.status.success() && lines == expected, "{}", text(&verify));

    // Resuming a finished comparison trains nothing again and rewrites the report.
    let again = run_host(&["run", "--resume", run_dir.to_str().unwrap(), "--no-watch"]);
    assert!(again.status.success(), "{}", text(&again));
    assert_eq!(text(&again).matches("already finished").count(), 3, "{}", text(&again));
    assert_eq!(losses("dpo").len(), 3);
}

#[test]
fn a_bad_compare_list_is_refused_naming_the_field() {
    let sb = Sandbox::new();
    for (arms, expected) in [
        (
            "#{ name: \"a\", loss: \"dpo_loss\" }, #{ name: \"b\", loss: \"no_such_loss\" }",
            "no fn no_such_loss(batch, params)",
        ),
        ("#{ name: \"a\" }, #{ name: \"a\" }", "compare[1].name \"a\" is used twice"),
        ("#{ name: \"a\", los: \"x\" }, #{ name: \"b\" }", "compare[0]: unknown field `los`"),
        ("#{ name: \"../up\" }, #{ name: \"b\" }", "must be letters, digits"),
    ] {
        let script = sb.write("scripts/bad.rhai", &compare_script(arms));
        let out = run_host(&["check", script.to_str().unwrap()]);
        assert!(!out.status.success(), "{arms}");
        assert!(text(&out).contains(expected), "{arms}: {}", text(&out));
    }
}

/// An arm whose only checkpoint is damaged is not cleared and started over: the resume
/// of the comparison is refused, naming the damaged file, and the arm's folder is kept.
#[test]
fn an_arm_with_only_damaged_checkpoints_is_refused_not_cleared() {
    let sb = Sandbox::new();
    let script = sb.write(
        "scripts/cmp.rhai",
        &compare_script("#{ name: \"a\", loss: \"dpo_loss\" }, #{ name: \"b\", loss: \"dpop_loss\" }"),
    );
    let run_dir = sb.path("runs/cmp");
    let out = run_host(&["run", script.to_str().unwrap(), "--no-watch", "--run-dir", run_dir.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    // Arm b as a crash before its end would leave it: no result yet, its checkpoint damaged.
    std::fs::remove_file(run_dir.join("b/arm_result.json")).unwrap();
    let damaged = run_dir.join("b/checkpoint-3/config.json");
    std::fs::write(&damaged, "{}").unwrap();
    let out = run_host(&["run", "--resume", run_dir.to_str().unwrap(), "--no-watch"]);
    assert!(
        !out.status.success()
            && text(&out).contains("every checkpoint is damaged")
            && text(&out).contains("checkpoint-3/config.json"),
        "{}",
        text(&out)
    );
    assert_eq!(std::fs::read_to_string(&damaged).unwrap(), "{}", "the arm's checkpoint was replaced");
}

/// One writer per comparison: `host run --resume` of a comparison whose folder's lock is
/// held by a live process is refused with its PID; so is one whose unfinished arm's
/// folder is held (an arm can be resumed on its own), and the arm's folder is then left
/// as it is: the save that the holder may have in progress is not tidied away.
#[test]
fn a_comparison_and_its_arms_have_one_writer_each() {
    let sb = Sandbox::new();
    let script = sb.write(
        "scripts/cmp.rhai",
        &compare_script("#{ name: \"a\", loss: \"dpo_loss\" }, #{ name: \"b\", loss: \"dpop_loss\" }"),
    );
    let run_dir = sb.path("runs/cmp");
    let out = run_host(&["run", script.to_str().unwrap(), "--no-watch", "--run-dir", run_dir.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(!run_dir.join("run.lock").exists(), "the comparison's lock outlived it");
    let me = std::process::id();
    let held = format!("{{\"pid\": {me}, \"host\": \"{}\"}}\n", prefhost::train::lock::hostname());
    let resume = || run_host(&["run", "--resume", run_dir.to_str().unwrap(), "--no-watch"]);

    std::fs::write(run_dir.join("run.lock"), &held).unwrap();
    let out = resume();
    assert!(
        !out.status.success()
            && text(&out).contains(&format!("{}: held by PID {me}", run_dir.join("run.lock").display())),
        "{}",
        text(&out)
    );
    assert!(!text(&out).contains("already finished"), "refused before looking at the arms: {}", text(&out));
    std::fs::remove_file(run_dir.join("run.lock")).unwrap();

    // Arm b unfinished, with a save in progress by the holder of its lock.
    std::fs::remove_file(run_dir.join("b/arm_result.json")).unwrap();
    let staging = run_dir.join("b/.checkpoint-4.tmp");
    std::fs::create_dir(&staging).unwrap();
    std::fs::write(run_dir.join("b/run.lock"), &held).unwrap();
    let out = resume();
    assert!(
        !out.status.success()
            && text(&out).contains(&format!("{}: held by PID {me}", run_dir.join("b/run.lock").display())),
        "{}",
        text(&out)
    );
    assert!(staging.is_dir(), "the holder's save in progress was tidied away");
    assert!(!run_dir.join("run.lock").exists(), "the refused comparison left its lock");

    // Once the holder is gone, the resume tidies the arm and finishes it from its checkpoint.
    std::fs::remove_file(run_dir.join("b/run.lock")).unwrap();
    let out = resume();
    assert!(
        out.status.success()
            && text(&out).contains("arm a: already finished")
            && text(&out).contains("checkpoint-3 (step 3)"),
        "{}",
        text(&out)
    );
    assert!(!staging.exists() && run_dir.join("b/arm_result.json").is_file());
}
