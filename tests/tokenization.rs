//! How a row becomes token ids, against TRL's own rules (tests/fixtures/
//! make_tokenization_fixture.py restates three generations of DPOTrainer's tokenization
//! and wrote their ids for the shipped tokenizer):
//! - `prompt_special_tokens: false` gives exactly TRL 0.12–0.28's `tokenize_row` ids;
//! - `true` (the default) gives TRL ≤ 0.11's (the SimPO-family repositories') and TRL ≥
//!   0.29's ids wherever the prompt and completion split cleanly when joined; the rows where
//!   they merge are counted and reported at load, and there the ids do differ.

mod common;
use common::*;

use prefhost::data::{Example, LoadReport, TextTokenizer, Truncation, load_examples};
use serde_json::Value;

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn load(prompt_special_tokens: bool) -> (Vec<Example>, LoadReport) {
    let mut tokenizer = TextTokenizer::load(&repo().join("models/tiny-math/tokenizer.json"), Some(1), None).unwrap();
    tokenizer.prompt_special_tokens = prompt_special_tokens;
    let limits = Truncation { max_length: 1024, max_prompt_length: 1024 };
    load_examples(&repo().join("tests/fixtures/tokenization/rows.jsonl"), &tokenizer, true, limits, false).unwrap()
}

fn expected() -> Vec<Value> {
    let text = std::fs::read_to_string(repo().join("tests/fixtures/tokenization/expected.json")).unwrap();
    serde_json::from_str::<Value>(&text).unwrap()["rows"].as_array().unwrap().clone()
}

#[test]
fn without_prompt_special_tokens_rows_tokenize_as_trl_0_12_to_0_28() {
    let (examples, _) = load(false);
    let rows = expected();
    assert_eq!(examples.len(), rows.len());
    for (i, (e, row)) in examples.iter().zip(&rows).enumerate() {
        let trl = &row["trl_0_12_to_0_28"];
        assert_eq!(
            (&e.prompt, &e.chosen, &e.rejected),
            (&ids(&trl["prompt"]), &ids(&trl["chosen"]), &ids(&trl["rejected"])),
            "row {}",
            i + 1
        );
    }
}

#[test]
fn with_prompt_special_tokens_rows_tokenize_as_trl_0_11_and_0_29_where_the_boundary_is_clean() {
    let (examples, report) = load(true);
    let rows = expected();
    let mut merged = 0;
    for (i, (e, row)) in examples.iter().zip(&rows).enumerate() {
        let (old, new) = (&row["trl_0_11"], &row["trl_0_29"]);
        let ours = (e.prompt.clone(), e.chosen.clone(), e.rejected.clone());
        let clean = row["splits_at_boundary"].as_object().unwrap().values().all(|v| v == true);
        if clean {
            assert_eq!(ids(&old["prompt_chosen"]), ids(&old["prompt_rejected"]), "row {}", i + 1);
            assert_eq!(
                ours,
                (ids(&old["prompt_chosen"]), ids(&old["chosen"]), ids(&old["rejected"])),
                "row {}: TRL 0.11",
                i + 1
            );
            assert_eq!(
                ours,
                (ids(&new["prompt"]), ids(&new["chosen"]), ids(&new["rejected"])),
                "row {}: TRL 0.29",
                i + 1
            );
        } else {
            merged += 1;
            assert_ne!(ours.1, ids(&old["chosen"]), "row {}: a merged boundary gives other ids", i + 1);
        }
    }
    assert!(merged > 0, "the fixture has a row whose boundary merges");
    assert_eq!(report.merged_at_boundary_count, merged, "{:?}", report.merged_at_boundary);
}

#[test]
fn the_choice_reaches_a_run_and_a_reference_file_written_with_the_other_is_refused() {
    let sb = Sandbox::new();
    let data = "tests/fixtures/tokenization/rows.jsonl";
    let refs = sb.path("ref.jsonl");
    let out = run_host(&["logps", "--model", "models/tiny-math", "--data", data, "--out", refs.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let script = |extra: &str| {
        format!(
            "import \"losses/dpo\" as dpo;\nfn loss(b, p) {{ dpo::loss(b, p) }}\ntrain(#{{ model: \"models/tiny-math\", data: \"{data}\", batch_size: 2, max_steps: 1, progress: false, {extra} }});\n"
        )
    };
    let path = sb.write("scripts/ok.rhai", &script(&format!("ref_logps: \"{}\",", refs.display())));
    let out =
        run_host(&["run", path.to_str().unwrap(), "--no-watch", "--run-dir", sb.path("runs/ok").to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("note: in 1 row(s) of tests/fixtures/tokenization/rows.jsonl (line 5) the prompt and a completion tokenize differently"), "{}", text(&out));
    let path = sb.write(
        "scripts/other.rhai",
        &script(&format!("prompt_special_tokens: false, ref_logps: \"{}\",", refs.display())),
    );
    let out =
        run_host(&["run", path.to_str().unwrap(), "--no-watch", "--run-dir", sb.path("runs/other").to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(text(&out).contains("ref.jsonl: data row 1 has a 64-token prompt, the file 65"), "{}", text(&out));
}

/// config.json's eos_token_id may list several ids (Llama 3.1, Gemma 2 instruct): the EOS
/// appended to completions is the tokenizer's eos_token, which must be listed; generation
/// stops at any listed id; with several ids and no eos_token the load stops.
#[test]
fn a_list_of_eos_ids_takes_the_tokenizers_eos_token_and_never_guesses() {
    let dir = tempfile::tempdir().unwrap();
    let tokenizer = dir.path().join("tokenizer.json");
    std::fs::copy(repo().join("models/tiny-math/tokenizer.json"), &tokenizer).unwrap();
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(repo().join("models/tiny-math/config.json")).unwrap()).unwrap();
    config["eos_token_id"] = serde_json::json!([1, 5]);
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    let model_config = prefhost::model::LlamaConfig::from_file(&dir.path().join("config.json")).unwrap();
    assert_eq!(model_config.eos_ids(), vec![1, 5]);

    let err = TextTokenizer::load_with(&tokenizer, &model_config.eos_ids(), None)
        .err()
        .expect("two EOS ids and no eos_token");
    assert!(format!("{err:#}").contains("eos_token_id lists [1, 5]"), "{err:#}");

    std::fs::write(dir.path().join("tokenizer_config.json"), r#"{"eos_token": "</s>"}"#).unwrap();
    let tok = TextTokenizer::load_with(&tokenizer, &model_config.eos_ids(), None).unwrap();
    assert_eq!((tok.eos_id, tok.stop_ids.clone()), (1, vec![1, 5]));
    assert_eq!(tok.encode_completion("1").unwrap().last(), Some(&1));

    let err = TextTokenizer::load_with(&tokenizer, &[4, 5], None).err().expect("eos_token not among the ids");
    assert!(format!("{err:#}").contains("tokenizer_config.json: eos_token is token 1"), "{err:#}");
}
