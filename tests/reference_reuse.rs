//! The speed and memory options must not change what is trained: runs with prefix
//! sharing, with chunked logits, and reading reference log-probs written by `host logps`
//! log the same metrics as the plain run with a resident reference (up to float rounding).

mod common;
use common::*;

fn script(extra: &str) -> String {
    format!(
        "import \"losses/dpo\" as dpo;\nfn loss(b, p) {{ dpo::loss(b, p) }}\ntrain({});\n",
        small_config(&format!("max_steps: 6, seed: 5, params: #{{ beta: 0.1 }}, {extra}"))
    )
}

fn metrics_of(sb: &Sandbox, name: &str, extra: &str) -> Vec<serde_json::Value> {
    let path = sb.write(&format!("scripts/{name}.rhai"), &script(extra));
    let run_dir = sb.path(&format!("runs/{name}"));
    let out = run_host(&["run", path.to_str().unwrap(), "--no-watch", "--run-dir", run_dir.to_str().unwrap()]);
    assert!(out.status.success(), "{name}: {}", text(&out));
    common::loss_lines(&run_dir)
}

fn assert_same_training(a: &[serde_json::Value], b: &[serde_json::Value], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    for (x, y) in a.iter().zip(b) {
        for key in [
            "loss",
            "rewards/margins",
            "logps/chosen",
            "logps/rejected",
            "grad_norm",
            "diagnostics/token_delta_after_diff",
        ] {
            let (x, y) = (x[key].as_f64().unwrap(), y[key].as_f64().unwrap());
            assert!((x - y).abs() <= 1e-4 * (1.0 + x.abs()), "{what}: {key} {x} vs {y} at step {}", a[0]["step"]);
        }
    }
}

#[test]
fn prefix_sharing_and_precomputed_reference_train_the_same_model() {
    let sb = Sandbox::new();
    let plain = metrics_of(&sb, "plain", "");

    let shared = metrics_of(&sb, "shared", "prefix_sharing: true,");
    assert_same_training(&plain, &shared, "prefix sharing");
    let chunked = metrics_of(&sb, "chunked", "prefix_sharing: true, logits_chunk_size: 32,");
    assert_same_training(&plain, &chunked, "chunked logits");

    let refs = sb.path("ref_logps.jsonl");
    let out = run_host(&[
        "logps",
        "--model",
        "models/tiny-math",
        "--data",
        "data/arithmetic/pairs.jsonl",
        "--out",
        refs.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let rows = read_lines(&refs);
    assert_eq!(rows.len(), 1200);
    assert!(rows.iter().all(|r| r["chosen_token_logps"].as_array().unwrap().len() == r["chosen_tokens"].as_u64().unwrap() as usize));
    let reused = metrics_of(&sb, "reused", &format!("ref_logps: \"{}\",", refs.display()));
    assert_same_training(&plain, &reused, "precomputed reference");
}

#[test]
fn a_reference_file_for_other_data_is_refused() {
    let sb = Sandbox::new();
    let refs = sb.write("ref.jsonl", "{\"line\": 1, \"prompt_tokens\": 3, \"chosen_logps\": -1.0, \"rejected_logps\": -2.0, \"chosen_tokens\": 1, \"rejected_tokens\": 1, \"chosen_token_logps\": [-1.0], \"rejected_token_logps\": [-2.0]}\n");
    let path = sb.write("scripts/r.rhai", &script(&format!("ref_logps: \"{}\",", refs.display())));
    let out =
        run_host(&["run", path.to_str().unwrap(), "--no-watch", "--run-dir", sb.path("runs/r").to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(text(&out).contains("ref.jsonl: data row 1 has"), "{}", text(&out));
    assert!(!sb.path("runs/r").exists(), "nothing is written when the reference file does not fit");
}
