//! `host check`: compile errors are reported as file:line:col with a non-zero exit,
//! including errors inside imported plugins; good scripts pass.

mod common;
use common::*;

#[test]
fn shipped_scripts_pass_the_check() {
    let mut scripts: Vec<String> = std::fs::read_dir(repo().join("scripts"))
        .unwrap()
        .map(|e| format!("scripts/{}", e.unwrap().file_name().to_string_lossy()))
        .filter(|p| p.ends_with(".rhai"))
        .collect();
    scripts.sort();
    assert!(scripts.len() >= 4, "{scripts:?}");
    let mut args = vec!["check"];
    args.extend(scripts.iter().map(String::as_str));
    let out = run_host(&args);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(text(&out).matches("ok ").count(), scripts.len(), "{}", text(&out));
}

#[test]
fn syntax_error_in_script_names_file_line_and_column() {
    let sb = Sandbox::new();
    let script = sb.write("scripts/bad.rhai", "fn loss(batch, params) {\n    let x = ;\n}\ntrain(#{});\n");
    let out = run_host(&["check", script.to_str().unwrap()]);
    assert!(!out.status.success());
    let msg = text(&out);
    assert!(msg.contains(&format!("{}:2:13", script.display())), "{msg}");
}

#[test]
fn error_inside_an_imported_plugin_names_the_plugin_file() {
    let sb = Sandbox::new();
    sb.write("plugins/losses/broken.rhai", "fn loss(batch, params) {\n    batch.chosen_logps +\n}\n");
    let script = sb.write(
        "scripts/uses_broken.rhai",
        "import \"losses/broken\" as broken;\nfn loss(b, p) { broken::loss(b, p) }\n",
    );
    let out = run_host(&["check", script.to_str().unwrap()]);
    assert!(!out.status.success());
    let msg = text(&out);
    assert!(msg.contains("broken.rhai:3:1"), "{msg}");
    assert!(msg.contains("uses_broken.rhai:1"), "{msg}");
}

#[test]
fn missing_plugin_and_escaping_import_are_errors() {
    let sb = Sandbox::new();
    let script = sb.write("scripts/missing.rhai", "import \"losses/nope\" as nope;\n");
    let out = run_host(&["check", script.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(text(&out).contains("losses/nope"), "{}", text(&out));

    let script = sb.write("scripts/escape.rhai", "import \"../scripts/escape\" as x;\n");
    let out = run_host(&["check", script.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(text(&out).contains("inside the plugins folder"), "{}", text(&out));
}

#[test]
fn bad_config_field_and_missing_loss_are_reported() {
    let sb = Sandbox::new();
    let script = sb.write(
        "scripts/typo.rhai",
        &format!("fn loss(b, p) {{ b.chosen_nll }}\ntrain({});\n", small_config("bta: 0.1,")),
    );
    let out = run_host(&["check", script.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(text(&out).contains("bta"), "{}", text(&out));

    let script = sb.write("scripts/noloss.rhai", &format!("train({});\n", small_config("")));
    let out = run_host(&["check", script.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(text(&out).contains("no fn loss"), "{}", text(&out));

    let script = sb.write(
        "scripts/backend.rhai",
        &format!("fn loss(b, p) {{ b.chosen_nll }}\ntrain({});\n", small_config("backend: \"tpu\",")),
    );
    let out = run_host(&["check", script.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(text(&out).contains("unknown backend \"tpu\""), "{}", text(&out));
}
