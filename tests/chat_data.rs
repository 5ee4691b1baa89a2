//! Conversational preference rows, rendered with the model's chat template
//! (tokenizer_config.json): TRL's conversational format, ultrafeedback_binarized's whole
//! conversations and orca_dpo_pairs' {system, question, chosen, rejected} give the prompt
//! and completions TRL would train on; bad rows are named by file:line.

mod common;

use prefhost::data::{TextTokenizer, Truncation, load_examples, load_unpaired_examples};

const LIMITS: Truncation = Truncation { max_length: 256, max_prompt_length: 128 };

const TEMPLATE: &str = "{{ bos_token }}{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('unknown role ' + m['role']) }}{% endif %}<|{{ m['role'] }}|>\n{{ m['content'].strip() }}<|end|>\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}";

/// The shipped tokenizer with a chat template beside it.
fn tokenizer(dir: &std::path::Path) -> TextTokenizer {
    std::fs::copy(common::repo().join("models/tiny-math/tokenizer.json"), dir.join("tokenizer.json")).unwrap();
    let config =
        serde_json::json!({ "chat_template": TEMPLATE, "bos_token": { "content": "<s>" }, "eos_token": "</s>" });
    std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
    TextTokenizer::load(&dir.join("tokenizer.json"), Some(1), Some(2)).unwrap()
}

fn msg(role: &str, content: &str) -> serde_json::Value {
    serde_json::json!({ "role": role, "content": content })
}

#[test]
fn every_conversational_layout_renders_like_trl() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(dir.path());
    let rows = [
        // TRL's conversational format: prompt and completions as message lists.
        serde_json::json!({ "prompt": [msg("user", "What is 2+2?")], "chosen": [msg("assistant", "4")], "rejected": [msg("assistant", "5")] }),
        // ultrafeedback_binarized: whole conversations, plus fields TRL ignores.
        serde_json::json!({ "prompt": "What is 2+2?", "prompt_id": "x1", "score_chosen": 9.0,
            "chosen": [msg("user", "What is 2+2?"), msg("assistant", "4")], "rejected": [msg("user", "What is 2+2?"), msg("assistant", "5")] }),
        // orca_dpo_pairs
        serde_json::json!({ "system": "Be brief.", "question": "What is 2+2?", "chosen": "4", "rejected": "5" }),
    ];
    let data = dir.path().join("chat.jsonl");
    std::fs::write(&data, rows.iter().map(|r| format!("{r}\n")).collect::<String>()).unwrap();
    let (examples, _) = load_examples(&data, &tok, true, LIMITS, false).unwrap();

    let prompt = "<s><|user|>\nWhat is 2+2?<|end|>\n<|assistant|>\n";
    let with_system = "<s><|system|>\nBe brief.<|end|>\n<|user|>\nWhat is 2+2?<|end|>\n<|assistant|>\n";
    for (example, expected_prompt) in examples.iter().zip([prompt, prompt, with_system]) {
        // The template writes BOS itself, so the tokenizer adds no special tokens to it.
        assert_eq!(example.prompt, tok.encode_templated_prompt(expected_prompt).unwrap());
        assert_eq!(example.chosen, tok.encode_completion("4<|end|>\n").unwrap());
        assert_eq!(example.rejected, tok.encode_completion("5<|end|>\n").unwrap());
    }
}

#[test]
fn conversational_unpaired_rows_render_like_trl() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(dir.path());
    let rows = [
        serde_json::json!({ "prompt": [msg("user", "What is 2+2?")], "completion": [msg("assistant", "4")], "label": true }),
        serde_json::json!({ "prompt": [msg("user", "What is 2+2?")], "completion": [msg("assistant", "5")], "label": false }),
        serde_json::json!({ "prompt": [msg("user", "What is 2+2?")], "completion": [msg("assistant", "5")], "label": false, "score": 1 }),
    ];
    let data = dir.path().join("kto.jsonl");
    std::fs::write(&data, rows.iter().map(|r| format!("{r}\n")).collect::<String>()).unwrap();
    let err = format!("{:#}", load_unpaired_examples(&data, &tok, LIMITS, false, false).unwrap_err());
    assert!(err.contains("kto.jsonl:3") && err.contains("`score`"), "{err}");
    std::fs::write(&data, rows[..2].iter().map(|r| format!("{r}\n")).collect::<String>()).unwrap();
    let (examples, _) = load_unpaired_examples(&data, &tok, LIMITS, false, false).unwrap();
    let prompt = tok.encode_templated_prompt("<s><|user|>\nWhat is 2+2?<|end|>\n<|assistant|>\n").unwrap();
    for (example, (answer, label)) in examples.iter().zip([("4", true), ("5", false)]) {
        assert_eq!(example.prompt, prompt);
        assert_eq!(example.chosen, tok.encode_completion(&format!("{answer}<|end|>\n")).unwrap());
        assert_eq!(example.label, Some(label));
    }
    // Paired conversational rows split the same way with unpair.
    let pair = serde_json::json!({ "prompt": [msg("user", "What is 2+2?")], "chosen": [msg("assistant", "4")], "rejected": [msg("assistant", "5")] });
    std::fs::write(&data, format!("{pair}\n")).unwrap();
    let (split, _) = load_unpaired_examples(&data, &tok, LIMITS, false, true).unwrap();
    assert_eq!(split.len(), 2);
    assert_eq!((split[0].chosen.clone(), split[0].label), (examples[0].chosen.clone(), Some(true)));
    assert_eq!((split[1].chosen.clone(), split[1].label), (examples[1].chosen.clone(), Some(false)));
}

/// Tokenizer folders as transformers 4.57 and 5.24 save them: the template in
/// chat_template.jinja, none in tokenizer_config.json. prefhost must render what their
/// apply_chat_template rendered (tests/fixtures/make_chat_fixtures.py --saved).
#[test]
fn chat_templates_saved_by_transformers_4_and_5_are_read() {
    for version in ["tf4", "tf5"] {
        let dir = common::repo().join("tests/fixtures/chat_saved").join(version);
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer_config.json")).unwrap()).unwrap();
        assert!(
            config.get("chat_template").is_none() && dir.join("chat_template.jinja").is_file(),
            "{version}: the template is in its own file"
        );
        let tok = TextTokenizer::load(&dir.join("tokenizer.json"), Some(1), Some(2)).unwrap();
        let chat = tok.chat.as_ref().unwrap_or_else(|| panic!("{version}: chat_template.jinja was not read"));
        let expected: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
        for case in expected["cases"].as_array().unwrap() {
            let messages: Vec<prefhost::data::chat::Message> =
                serde_json::from_value(case["messages"].clone()).unwrap();
            let got = chat.render(&messages, case["add_generation_prompt"].as_bool().unwrap()).unwrap();
            assert_eq!(got, case["expected"].as_str().unwrap(), "{version}");
        }
    }
    // Two different templates in one folder: refused, naming both files.
    let dir = tempfile::tempdir().unwrap();
    let _ = tokenizer(dir.path());
    std::fs::write(dir.path().join("chat_template.jinja"), "{{ messages[0]['content'] }}").unwrap();
    let err = format!("{:#}", TextTokenizer::load(&dir.path().join("tokenizer.json"), Some(1), Some(2)).err().unwrap());
    assert!(
        err.contains("tokenizer_config.json") && err.contains("chat_template.jinja") && err.contains("different"),
        "{err}"
    );
}

#[test]
fn bad_conversational_rows_are_named_by_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(dir.path());
    let good = serde_json::json!({ "prompt": [msg("user", "Hi")], "chosen": [msg("assistant", "a")], "rejected": [msg("assistant", "b")] });
    let cases = [
        (
            serde_json::json!({ "prompt": [msg("user", "Hi")], "chosen": [{ "role": "assistant" }], "rejected": [msg("assistant", "b")] }),
            "`chosen[0]` has no string `content`",
        ),
        (
            serde_json::json!({ "prompt": [msg("robot", "Hi")], "chosen": [msg("assistant", "a")], "rejected": [msg("assistant", "b")] }),
            "unknown role robot",
        ),
        (
            serde_json::json!({ "chosen": [msg("user", "x"), msg("assistant", "a")], "rejected": [msg("user", "y"), msg("assistant", "b")] }),
            "share no prompt messages",
        ),
        (serde_json::json!({ "question": "Q", "chosen": "a" }), "missing string field `rejected`"),
    ];
    for (bad, message) in cases {
        let data = dir.path().join("bad.jsonl");
        std::fs::write(&data, format!("{good}\n{bad}\n")).unwrap();
        let err = format!("{:#}", load_examples(&data, &tok, true, LIMITS, false).unwrap_err());
        assert!(err.contains("bad.jsonl:2") && err.contains(message), "{err}");
    }
    // Without a chat template, conversational rows cannot be rendered: say where it is missing.
    std::fs::remove_file(dir.path().join("tokenizer_config.json")).unwrap();
    let plain = TextTokenizer::load(&dir.path().join("tokenizer.json"), Some(1), Some(2)).unwrap();
    let data = dir.path().join("conv.jsonl");
    std::fs::write(&data, format!("{good}\n")).unwrap();
    let err = format!("{:#}", load_examples(&data, &plain, true, LIMITS, false).unwrap_err());
    assert!(err.contains("conv.jsonl:1") && err.contains("tokenizer_config.json has no chat_template"), "{err}");
}

#[test]
fn real_chat_templates_render_exactly_as_transformers_does() {
    // tests/fixtures/make_chat_fixtures.py rendered these with transformers.
    let cases: Vec<serde_json::Value> = serde_json::from_str(
        &std::fs::read_to_string(common::repo().join("tests/fixtures/chat_templates.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cases.len(), 12);
    let dir = tempfile::tempdir().unwrap();
    for case in &cases {
        let config = serde_json::json!({ "chat_template": case["template"], "bos_token": case["bos_token"], "eos_token": case["eos_token"] });
        std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).unwrap();
        let template =
            prefhost::data::chat::ChatTemplate::load(&dir.path().join("tokenizer_config.json"), None).unwrap().unwrap();
        let messages: Vec<prefhost::data::chat::Message> =
            prefhost::data::chat::messages(&case["messages"], "messages").unwrap();
        let got = template.render(&messages, case["add_generation_prompt"].as_bool().unwrap()).unwrap();
        assert_eq!(
            got,
            case["expected"].as_str().unwrap(),
            "{} (generation prompt {})",
            case["name"],
            case["add_generation_prompt"]
        );
    }
}

#[test]
fn saved_models_keep_the_chat_template() {
    let dir = tempfile::tempdir().unwrap();
    tokenizer(dir.path());
    let device = burn::tensor::Device::default();
    let (config, model) = prefhost::model::load_model(&common::repo().join("models/tiny-math"), &device).unwrap();
    let out = dir.path().join("saved");
    prefhost::model::save_model(&model, &config, &dir.path().join("tokenizer.json"), &out).unwrap();
    let reloaded = TextTokenizer::load(&out.join("tokenizer.json"), Some(1), Some(2)).unwrap();
    let messages = [prefhost::data::chat::Message { role: "user".into(), content: "Hi".into() }];
    assert_eq!(
        reloaded.chat.expect("the template is saved").render(&messages, true).unwrap(),
        "<s><|user|>\nHi<|end|>\n<|assistant|>\n"
    );

    // A transformers 5 tokenizer folder: its chat_template.jinja travels with the model too.
    let five = common::repo().join("tests/fixtures/chat_saved/tf5/tokenizer.json");
    let out = dir.path().join("saved5");
    prefhost::model::save_model(&model, &config, &five, &out).unwrap();
    let reloaded = TextTokenizer::load(&out.join("tokenizer.json"), Some(1), Some(2)).unwrap();
    assert!(out.join("chat_template.jinja").is_file() && reloaded.chat.is_some());

    // Named templates travel too, in their folder.
    let named = common::repo().join("tests/fixtures/chat_saved/tf5_named/tokenizer.json");
    let out = dir.path().join("saved_named");
    prefhost::model::save_model(&model, &config, &named, &out).unwrap();
    assert!(
        out.join("additional_chat_templates/chatml.jinja").is_file()
            && out.join("additional_chat_templates/zephyr.jinja").is_file()
    );
    let mut reloaded = TextTokenizer::load(&out.join("tokenizer.json"), Some(1), Some(2)).unwrap();
    reloaded.use_chat_template("chatml").unwrap();
    assert_eq!(
        reloaded.chat.unwrap().render(&messages, true).unwrap(),
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
}

/// Tokenizer folders holding several named templates, as transformers 4.57 and 5.24 save
/// them ("default" in chat_template.jinja, the others in additional_chat_templates/), and
/// one with no default. prefhost must render what their apply_chat_template(chat_template=
/// NAME) rendered (tests/fixtures/make_chat_fixtures.py --saved-named).
#[test]
fn named_chat_templates_render_as_transformers_does() {
    for version in ["tf4_named", "tf5_named", "tf5_named_no_default"] {
        let dir = common::repo().join("tests/fixtures/chat_saved").join(version);
        assert!(
            dir.join("additional_chat_templates/chatml.jinja").is_file(),
            "{version}: named templates in their own folder"
        );
        let expected: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
        let cases = expected["cases"].as_array().unwrap();
        assert_eq!(cases.len(), if version.ends_with("no_default") { 8 } else { 16 }, "{version}");
        for case in cases {
            let mut tok = TextTokenizer::load(&dir.join("tokenizer.json"), Some(1), Some(2)).unwrap();
            if let Some(name) = case["template"].as_str() {
                tok.use_chat_template(name).unwrap();
            }
            let chat = tok.chat.as_ref().unwrap_or_else(|| panic!("{version}: no template for {}", case["template"]));
            let messages: Vec<prefhost::data::chat::Message> =
                serde_json::from_value(case["messages"].clone()).unwrap();
            let got = chat.render(&messages, case["add_generation_prompt"].as_bool().unwrap()).unwrap();
            assert_eq!(got, case["expected"].as_str().unwrap(), "{version}, template {}", case["template"]);
        }
        // A name the folder lacks: an error naming the setting and the names it has.
        let mut tok = TextTokenizer::load(&dir.join("tokenizer.json"), Some(1), Some(2)).unwrap();
        let err = format!("{:#}", tok.use_chat_template("tool_use").unwrap_err());
        assert!(
            err.contains("chat_template") && err.contains("\"tool_use\"") && err.contains("chatml, zephyr"),
            "{err}"
        );
    }
    // No default: plain rows load, a conversational row is refused as transformers refuses
    // it, naming the templates there are and the setting that chooses one.
    let dir = common::repo().join("tests/fixtures/chat_saved/tf5_named_no_default");
    let tok = TextTokenizer::load(&dir.join("tokenizer.json"), Some(1), Some(2)).unwrap();
    assert!(tok.chat.is_none());
    let rows = tempfile::tempdir().unwrap();
    let data = rows.path().join("conv.jsonl");
    let row = serde_json::json!({ "prompt": [msg("user", "Hi")], "chosen": [msg("assistant", "a")], "rejected": [msg("assistant", "b")] });
    std::fs::write(&data, format!("{row}\n")).unwrap();
    let err = format!("{:#}", load_examples(&data, &tok, true, LIMITS, false).unwrap_err());
    assert!(
        err.contains("conv.jsonl:1")
            && err.contains("chatml, zephyr")
            && err.contains("no default")
            && err.contains("`chat_template`"),
        "{err}"
    );
}

/// The same name from two places with different text is refused, naming both; tokenizer
/// config lists name their templates too.
#[test]
fn named_templates_from_two_places_must_agree() {
    let dir = tempfile::tempdir().unwrap();
    let _ = tokenizer(dir.path());
    let list = serde_json::json!({ "chat_template": [{ "name": "default", "template": TEMPLATE }, { "name": "short", "template": "{{ messages[0]['content'] }}" }], "eos_token": "</s>" });
    std::fs::write(dir.path().join("tokenizer_config.json"), list.to_string()).unwrap();
    let mut tok = TextTokenizer::load(&dir.path().join("tokenizer.json"), Some(1), Some(2)).unwrap();
    tok.use_chat_template("short").unwrap();
    let hi = [prefhost::data::chat::Message { role: "user".into(), content: "Hi".into() }];
    assert_eq!(tok.chat.as_ref().unwrap().render(&hi, false).unwrap(), "Hi");
    std::fs::create_dir(dir.path().join("additional_chat_templates")).unwrap();
    std::fs::write(dir.path().join("additional_chat_templates/short.jinja"), "{{ messages[0]['role'] }}").unwrap();
    let err = format!("{:#}", TextTokenizer::load(&dir.path().join("tokenizer.json"), Some(1), Some(2)).err().unwrap());
    assert!(
        err.contains("tokenizer_config.json")
            && err.contains("short.jinja")
            && err.contains("different")
            && err.contains("\"short\""),
        "{err}"
    );
    // The same text twice is one template.
    std::fs::write(dir.path().join("additional_chat_templates/short.jinja"), "{{ messages[0]['content'] }}").unwrap();
    assert!(TextTokenizer::load(&dir.path().join("tokenizer.json"), Some(1), Some(2)).is_ok());
}

/// `chat_template: NAME` in a run renders conversational rows with that named template:
/// the metrics equal a run whose folder holds the same text as its default template, and
/// differ from another name's. The named files travel into checkpoints (under the
/// manifest) and belong to the run's identity: edited, a resume is refused. An unknown
/// name stops the run before anything is written.
#[test]
fn a_run_renders_with_the_named_template() {
    let sb = common::Sandbox::new();
    let named = common::repo().join("tests/fixtures/chat_saved/tf5_named");
    let model_with = |name: &str, default_template: Option<&str>| {
        let model = sb.path(name);
        common::copy_dir(&common::repo().join("models/tiny-math"), &model);
        for file in ["tokenizer_config.json", "chat_template.jinja"] {
            std::fs::copy(named.join(file), model.join(file)).unwrap();
        }
        common::copy_dir(&named.join("additional_chat_templates"), &model.join("additional_chat_templates"));
        if let Some(template) = default_template {
            std::fs::copy(named.join("additional_chat_templates").join(template), model.join("chat_template.jinja"))
                .unwrap();
        }
        model
    };
    let (model, chatml_as_default) = (model_with("model", None), model_with("model_chatml", Some("chatml.jinja")));
    let rows: Vec<String> = (1..=4)
        .map(|n| serde_json::json!({ "prompt": [msg("user", &format!("{n}+{n}="))], "chosen": [msg("assistant", &format!("{}", 2 * n))], "rejected": [msg("assistant", &format!("{}", 2 * n + 1))] }).to_string())
        .collect();
    let data = sb.write("conv.jsonl", &(rows.join("\n") + "\n"));
    let run = |model: &std::path::Path, template: Option<&str>, dir: &str| {
        let choice = template.map(|t| format!("chat_template: \"{t}\",")).unwrap_or_default();
        let script = format!(
            "import \"losses/dpo\" as dpo;\nfn loss(b, p) {{ dpo::loss(b, p) }}\ntrain(#{{ model: \"{}\", data: \"{}\", batch_size: 2, max_steps: 2, save_every: 2, seed: 3, log_every: 1, progress: false, params: #{{ beta: 0.1 }}, {choice} }});\n",
            model.display(),
            data.display()
        );
        let path = sb.write(&format!("scripts/{dir}.rhai"), &script);
        let out_dir = sb.path(dir);
        (
            common::run_host(&["run", path.to_str().unwrap(), "--no-watch", "--run-dir", out_dir.to_str().unwrap()]),
            out_dir,
        )
    };
    let logps = |dir: &std::path::Path| -> Vec<f64> {
        common::loss_lines(dir).iter().map(|l| l["logps/chosen"].as_f64().unwrap()).collect()
    };

    let (out, chatml) = run(&model, Some("chatml"), "chatml");
    assert!(out.status.success(), "{}", common::text(&out));
    let (out, default) = run(&chatml_as_default, None, "default");
    assert!(out.status.success(), "{}", common::text(&out));
    let (out, zephyr) = run(&model, Some("zephyr"), "zephyr");
    assert!(out.status.success(), "{}", common::text(&out));
    assert_eq!(logps(&chatml), logps(&default), "the named template renders as the same text as a default");
    assert_ne!(logps(&chatml)[0], logps(&zephyr)[0], "another name, other prompts");

    let saved = chatml.join("checkpoint-2");
    assert!(saved.join("additional_chat_templates/chatml.jinja").is_file());
    let manifest = std::fs::read_to_string(saved.join("manifest.json")).unwrap();
    assert!(manifest.contains("\"additional_chat_templates/chatml.jinja\""), "{manifest}");
    let zephyr_file = saved.join("additional_chat_templates/zephyr.jinja");
    let kept = std::fs::read(&zephyr_file).unwrap();
    std::fs::write(&zephyr_file, "edited").unwrap();
    let err = format!("{:#}", prefhost::model::weights::verify_manifest(&saved).unwrap_err());
    assert!(err.contains("zephyr.jinja"), "the manifest covers the named templates: {err}");
    std::fs::write(&zephyr_file, kept).unwrap();
    assert!(prefhost::model::weights::verify_manifest(&saved).unwrap());

    // The named template edited in the model folder: the resume is refused, naming it.
    std::fs::write(model.join("additional_chat_templates/chatml.jinja"), "{{ messages[0]['content'] }}").unwrap();
    let out = common::run_host(&["run", "--resume", chatml.to_str().unwrap(), "--no-watch", "--max-steps", "3"]);
    assert!(
        !out.status.success() && common::text(&out).contains("additional_chat_templates/chatml.jinja"),
        "{}",
        common::text(&out)
    );

    let (out, dir) = run(&model, Some("nope"), "nope");
    let said = common::text(&out);
    assert!(
        !out.status.success()
            && said.contains("chat_template")
            && said.contains("\"nope\"")
            && said.contains("chatml, zephyr"),
        "{said}"
    );
    assert!(!dir.exists(), "nothing written for an unknown template");
}
