//! Online rounds (src/train/online.rs): each round samples from the current policy, scores
//! with the script's reward, pairs best against worst (ties skipped, TRL's missing-EOS
//! penalty), writes its files and trains on them; a failing reward leaves the round empty
//! and the run goes on; a crash in the middle of a round and `--resume` repeat the
//! uninterrupted run; bad settings are refused naming the field.

mod common;
use common::*;

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;

const SIGABRT: i32 = 6;

/// The demonstration's reward: the answer the pair's chosen completion states is the right one.
const REWARD: &str =
    "fn reward(prompt, completion, row) { exact::reward(prompt, completion, #{ answer: exact::answer(row.chosen) }) }";

/// An online DPO script on the shipped model and the pairs file's prompts: `reward` and
/// `online` fields are the test's.
fn script(reward: &str, online: &str, extra: &str) -> String {
    format!(
        r#"import "losses/dpo" as dpo;
import "rewards/exact_answer" as exact;
fn loss(b, p) {{ dpo::loss(b, p) }}
{reward}
train(#{{
    model: "models/tiny-math",
    batch_size: 2,
    log_every: 1,
    progress: false,
    seed: 5,
    lr: 1e-4,
    params: #{{ beta: 0.3 }},
    online: #{{ prompts: "data/arithmetic/pairs.jsonl", samples_per_prompt: 4, temperature: 2.0, top_p: 0.75, top_k: 50, max_new_tokens: 40, {online} }},
    {extra}
}});
"#
    )
}

fn run(sb: &Sandbox, name: &str, source: &str) -> (std::process::Output, std::path::PathBuf) {
    let path = sb.write(&format!("scripts/{name}.rhai"), source);
    let dir = sb.path(name);
    (run_host(&["run", path.to_str().unwrap(), "--no-watch", "--run-dir", dir.to_str().unwrap()]), dir)
}

fn events(dir: &Path, name: &str) -> Vec<serde_json::Value> {
    read_lines(&dir.join("metrics.jsonl")).into_iter().filter(|l| l["event"] == name).collect()
}

fn round_lines(dir: &Path, round: usize, kind: &str) -> Vec<serde_json::Value> {
    read_lines(&dir.join(format!("online/round-{round:04}.{kind}.jsonl")))
}

#[test]
fn each_round_pairs_its_best_and_worst_samples_and_logs_them() {
    let sb = Sandbox::new();
    // 22 new tokens: about what an answer takes, so some samples miss EOS and pay the penalty.
    let source = script(REWARD, "every: 2, missing_eos_penalty: 0.25", "max_steps: 6,")
        .replace("max_new_tokens: 40", "max_new_tokens: 22");
    let (out, dir) = run(&sb, "online", &source);
    assert!(out.status.success(), "{}", text(&out));
    let rounds = events(&dir, "online_round");
    assert_eq!(rounds.len(), 3, "{rounds:?}");
    let (mut pairs_seen, mut ties_seen, mut eos_missing) = (0, 0, 0);
    for (round, event) in rounds.iter().enumerate() {
        assert_eq!(event["round"], round);
        assert_eq!(event["step"], 2 * round + 1, "logged at the first step the round trains");
        let samples = round_lines(&dir, round, "samples");
        let pairs = round_lines(&dir, round, "pairs");
        // every × batch_size prompts, samples_per_prompt each.
        assert_eq!(samples.len(), 4 * 4);
        let mut by_prompt: BTreeMap<u64, Vec<&serde_json::Value>> = BTreeMap::new();
        for s in &samples {
            let (reward, score) = (s["reward"].as_f64().unwrap(), s["score"].as_f64().unwrap());
            let eos = s["eos"].as_bool().unwrap();
            eos_missing += usize::from(!eos);
            assert_eq!(score, if eos { reward } else { reward - 0.25 }, "TRL's missing_eos_penalty: {s}");
            by_prompt.entry(s["prompt_index"].as_u64().unwrap()).or_default().push(s);
        }
        assert_eq!(by_prompt.len(), 4);
        for (prompt, group) in &by_prompt {
            let scores: Vec<f64> = group.iter().map(|s| s["score"].as_f64().unwrap()).collect();
            let (high, low) =
                (scores.iter().cloned().fold(f64::MIN, f64::max), scores.iter().cloned().fold(f64::MAX, f64::min));
            let pair = pairs.iter().find(|p| p["prompt_index"] == *prompt);
            if high == low {
                ties_seen += 1;
                assert!(pair.is_none(), "prompt {prompt}: its samples tie, yet it has a pair");
                continue;
            }
            let pair = pair.unwrap_or_else(|| panic!("prompt {prompt}: scores {scores:?} but no pair"));
            pairs_seen += 1;
            let sample = |k: &str| group.iter().find(|s| s["sample_index"] == pair[k]).unwrap();
            let (chosen, rejected) = (sample("chosen_sample"), sample("rejected_sample"));
            assert_eq!((pair["chosen_score"].as_f64().unwrap(), pair["rejected_score"].as_f64().unwrap()), (high, low));
            assert_eq!((&chosen["score"], &rejected["score"]), (&pair["chosen_score"], &pair["rejected_score"]));
            // The loss sees the sampled ids, with EOS when the sample stopped at it.
            for (side, s) in [("chosen_ids", chosen), ("rejected_ids", rejected)] {
                let mut ids: Vec<u64> =
                    s["completion_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
                if s["eos"] == true {
                    ids.push(1);
                }
                let got: Vec<u64> = pair[side].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
                assert_eq!(got, ids, "{side} of prompt {prompt}");
            }
        }
        assert_eq!(
            pairs.len(),
            by_prompt.len() - by_prompt.values().filter(|g| g.iter().all(|s| s["score"] == g[0]["score"])).count()
        );
        let mean = samples.iter().map(|s| s["reward"].as_f64().unwrap()).sum::<f64>() / samples.len() as f64;
        assert!((event["online/reward_mean"].as_f64().unwrap() - mean).abs() < 1e-12);
        assert_eq!(event["online/usable_pairs"].as_f64().unwrap(), pairs.len() as f64 / 4.0);
    }
    assert!(
        pairs_seen > 0 && ties_seen > 0,
        "the rounds should both make pairs and skip ties: {pairs_seen} pairs, {ties_seen} ties"
    );
    assert!(eos_missing > 0, "some samples should miss EOS");
    // Metrics of the steps a round starts carry its summary.
    let lines = loss_lines(&dir);
    assert_eq!(lines.len(), 6);
    for (step, line) in lines.iter().enumerate() {
        assert_eq!(line.get("online/reward_mean").is_some(), step % 2 == 0, "{line}");
    }
}

#[test]
fn a_reward_that_fails_is_rejected_with_its_line_and_the_run_goes_on() {
    let sb = Sandbox::new();
    let broken = [
        ("string", "fn reward(prompt, completion, row) {\n    \"high\"\n}", 4, "returned string"),
        ("nan", "fn reward(prompt, completion, row) {\n    0.0 / 0.0\n}", 4, "returned NaN"),
        ("throws", "fn reward(prompt, completion, row) {\n    throw \"no judge\";\n}", 5, "no judge"),
    ];
    for (name, reward, line, says) in broken {
        let (out, dir) = run(&sb, name, &script(reward, "every: 2", "max_steps: 4,"));
        assert!(out.status.success(), "{name}: the run must go on: {}", text(&out));
        let failed = events(&dir, "reward_failed");
        assert_eq!(failed.len(), 2, "{name}: one per round: {failed:?}");
        let error = failed[0]["error"].as_str().unwrap();
        assert!(error.contains(&format!("{name}.rhai:{line}")), "{name}: the reward's file:line: {error}");
        assert!(error.contains(says), "{name}: {error}");
        // Nothing to train on: no update, no pairs; every sample kept, unscored.
        assert_eq!(loss_lines(&dir).len(), 0, "{name}");
        assert!(round_lines(&dir, 0, "pairs").is_empty());
        assert!(round_lines(&dir, 1, "samples").iter().all(|s| s["reward"].is_null()));
        assert!(dir.join("checkpoint-4/trainer_state.json").is_file(), "{name}");
    }
}

/// Runs `source` whole, and again crashed (SIGABRT, no clean-up, as kill -9) right after
/// `checkpoint-{crash_at}` is in place, then resumed: the metrics and round files must match.
fn assert_crash_and_resume_repeat(sb: &Sandbox, name: &str, source: &str, crash_at: usize) {
    let path = sb.write(&format!("scripts/{name}.rhai"), source);
    let (whole, crashed) = (sb.path(&format!("{name}-whole")), sb.path(&format!("{name}-crashed")));
    let out = run_host(&["run", path.to_str().unwrap(), "--no-watch", "--run-dir", whole.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let out = host()
        .args(["run", path.to_str().unwrap(), "--no-watch", "--run-dir", crashed.to_str().unwrap()])
        .env(prefhost::failpoint::VAR, format!("checkpoint-{crash_at}:renamed"))
        .output()
        .unwrap();
    assert_eq!(out.status.signal(), Some(SIGABRT), "{}", text(&out));
    let out = run_host(&["run", "--resume", crashed.to_str().unwrap(), "--no-watch"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains(&format!("checkpoint-{crash_at}")), "{}", text(&out));
    let steps_and_rounds = |dir: &Path| -> Vec<serde_json::Value> {
        read_lines(&dir.join("metrics.jsonl"))
            .into_iter()
            .filter(|l| l.get("loss").is_some() || l["event"] == "online_round")
            .collect()
    };
    let (a, b) = (steps_and_rounds(&whole), steps_and_rounds(&crashed));
    assert!(a.iter().filter(|l| l.get("loss").is_some()).count() == 9, "{a:?}");
    assert_eq!(a, b, "{name}: the resumed run must repeat the uninterrupted one");
    for round in 0..3 {
        for kind in ["samples", "pairs"] {
            assert_eq!(
                round_lines(&whole, round, kind),
                round_lines(&crashed, round, kind),
                "{name}: round {round} {kind}"
            );
        }
    }
}

#[test]
fn a_crash_in_the_middle_of_a_round_resumes_as_the_uninterrupted_run() {
    let sb = Sandbox::new();
    let source = script(REWARD, "every: 3", "max_steps: 9, save_every: 1,");
    // Step 5 is the middle of round 1 (steps 3 to 5): its pairs are read back.
    assert_crash_and_resume_repeat(&sb, "middle", &source, 5);
    // Step 6 ends round 1: round 2 is sampled again from the checkpoint's policy.
    assert_crash_and_resume_repeat(&sb, "boundary", &source, 6);
}

#[test]
fn bad_online_settings_are_refused_naming_the_field() {
    let sb = Sandbox::new();
    sb.write("data/empty.jsonl", "");
    sb.write("data/no_prompt.jsonl", "{\"question\": \"2 + 2?\"}\n");
    let empty = sb.path("data/empty.jsonl");
    let no_prompt = sb.path("data/no_prompt.jsonl");
    let with_prompts = |file: &Path| {
        script(REWARD, "", "max_steps: 2,")
            .replace("\"data/arithmetic/pairs.jsonl\"", &format!("{:?}", file.display().to_string()))
    };
    let cases = [
        (
            "unknown",
            script(REWARD, "temprature: 1.0", "max_steps: 2,"),
            "online: unknown field `temprature`".to_string(),
        ),
        (
            "zero_n",
            script(REWARD, "samples_per_prompt: 0", "max_steps: 2,").replace("samples_per_prompt: 4, ", ""),
            "online.samples_per_prompt must be at least 2".to_string(),
        ),
        ("zero_every", script(REWARD, "every: 0", "max_steps: 2,"), "online.every must be at least 1".to_string()),
        (
            "zero_tokens",
            script(REWARD, "", "max_steps: 2,").replace("max_new_tokens: 40", "max_new_tokens: 0"),
            "online.max_new_tokens must be at least 1".to_string(),
        ),
        (
            "greedy",
            script(REWARD, "", "max_steps: 2,").replace("temperature: 2.0", "temperature: 0.0"),
            "online.temperature must be a finite number > 0".to_string(),
        ),
        (
            "pairs",
            script(REWARD, "pairs: \"all\"", "max_steps: 2,"),
            "online.pairs must be \"best_vs_worst\"".to_string(),
        ),
        (
            "ref_logps",
            script(REWARD, "", "max_steps: 2, ref_logps: \"ref.jsonl\","),
            "ref_logps cannot be used with online".to_string(),
        ),
        (
            "with_data",
            script(REWARD, "", "max_steps: 2, data: \"data/arithmetic/pairs.jsonl\","),
            "data and online are both set".to_string(),
        ),
        ("steps", script(REWARD, "", ""), "online needs max_steps".to_string()),
        ("no_reward", script("", "", "max_steps: 2,"), "online needs a reward".to_string()),
        ("empty", with_prompts(&empty), format!("{}: no prompts", empty.display())),
        ("no_prompt", with_prompts(&no_prompt), format!("{}:1: missing field `prompt`", no_prompt.display())),
    ];
    for (name, source, says) in cases {
        let (out, dir) = run(&sb, name, &source);
        assert!(!out.status.success(), "{name}: accepted");
        assert!(text(&out).contains(&says), "{name}: expected {says:?} in:\n{}", text(&out));
        assert!(!dir.exists(), "{name}: a refused run leaves no run folder");
        // `host check` reads the config too (not the prompts file).
        if !["empty", "no_prompt"].contains(&name) {
            let out = run_host(&["check", sb.path(&format!("scripts/{name}.rhai")).to_str().unwrap()]);
            assert!(!out.status.success() && text(&out).contains(&says), "host check {name}: {}", text(&out));
        }
    }
}

#[test]
fn a_reward_edit_that_fails_goes_back_to_the_previous_reward() {
    let sb = Sandbox::new();
    let path = sb.write("scripts/edited.rhai", &script(REWARD, "every: 2", "max_steps: 4000,"));
    let dir = sb.path("edited");
    // Watching, as users run it.
    let _run = KillOnDrop(
        host()
            .args(["run", path.to_str().unwrap(), "--run-dir", dir.to_str().unwrap()])
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let metrics = dir.join("metrics.jsonl");
    let rounds = |l: &[serde_json::Value]| l.iter().filter(|x| x["event"] == "online_round").count();
    wait_for(&metrics, "the first rounds", |l| rounds(l) >= 2);
    // Compiles and defines a reward, so the reload takes it; it fails on the next round's samples.
    sb.write(
        "scripts/edited.rhai",
        &script("fn reward(prompt, completion, row) {\n    \"high\"\n}", "every: 2", "max_steps: 4000,"),
    );
    let lines = wait_for(&metrics, "the failing reward", |l| l.iter().any(|x| x["event"] == "reward_failed"));
    let failed = lines.iter().find(|x| x["event"] == "reward_failed").unwrap();
    assert!(failed["error"].as_str().unwrap().contains("edited.rhai:4"), "{failed}");
    assert!(
        lines.iter().any(|x| x["event"] == "reload" && x["step"].as_u64() <= failed["step"].as_u64()),
        "the edit was reloaded first"
    );
    // That round and the next are scored by the previous version, and training goes on.
    let after = failed["step"].as_u64().unwrap();
    let lines = wait_for(&metrics, "the next rounds", |l| {
        l.iter().filter(|x| x["event"] == "online_round" && x["step"].as_u64().unwrap() > after).count() >= 2
    });
    for round in lines.iter().filter(|x| x["event"] == "online_round" && x["step"].as_u64().unwrap() > after) {
        assert!(round["online/reward_mean"].is_number(), "{round}");
    }
    assert!(lines.iter().any(|x| x.get("loss").is_some() && x["step"].as_u64().unwrap() > after + 1));
}
