//! Runs the pure-Rhai plugin tests in tests/plugins/ (each `fn test_*()`), the same way
//! `host test tests/plugins/*.rhai` does.

mod common;
use common::*;

#[test]
fn rhai_plugin_tests_pass() {
    let mut files: Vec<String> = std::fs::read_dir(repo().join("tests/plugins"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "rhai"))
        .map(|p| p.display().to_string())
        .collect();
    files.sort();
    assert!(files.len() >= 10, "expected a test file per plugin, found {files:?}");
    let mut args = vec!["test"];
    args.extend(files.iter().map(String::as_str));
    let out = run_host(&args);
    let report = text(&out);
    assert!(out.status.success(), "{report}");
    assert!(report.contains(" 0 failed"), "{report}");
}

#[test]
fn a_failing_rhai_test_fails_the_run() {
    let sb = Sandbox::new();
    let file = sb.write("tests/fails.rhai", "fn test_wrong() { assert_close(1.0, 2.0, 1e-6); }\n");
    let out = run_host(&["test", file.to_str().unwrap(), "--plugins", sb.path("plugins").to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(text(&out).contains("0 passed, 1 failed"), "{}", text(&out));
}

/// The committed reference numbers (tests/fixtures/losses/*.json) are what the fixture
/// script computes: a rerun with --check must give the same files byte for byte.
#[test]
fn loss_fixtures_are_what_their_script_computes() {
    let script = repo().join("tests/fixtures/make_loss_fixtures.py");
    let out = match std::process::Command::new("python3").arg(&script).arg("--check").output() {
        Ok(out) => out,
        // CI has Python; elsewhere the check is skipped with a note.
        Err(e) if std::env::var_os("CI").is_none() => {
            eprintln!("skipped: python3 is not available ({e}); run {} --check by hand", script.display());
            return;
        }
        Err(e) => panic!("python3 is needed to check the loss fixtures: {e}"),
    };
    assert!(out.status.success(), "{}", text(&out));
}
