//! `host test`: runs every `fn test_*()` in Rhai test files, so plugins can be unit-tested
//! in pure Rhai with object-map batches. Test files (only they) may also call
//! `load_json("relative/path.json")` to read reference numbers a fixture script wrote.

use std::path::{Path, PathBuf};

use rhai::{Dynamic, EvalAltResult};

use super::program::ScriptHost;

pub struct TestReport {
    pub passed: usize,
    pub failed: Vec<String>,
}

pub fn run_test_file(host: &mut ScriptHost, file: &Path, report: &mut TestReport) {
    let dir = file.parent().map(Path::to_path_buf).unwrap_or_default();
    host.scripts.engine.register_fn("load_json", move |path: &str| load_json(&dir, path));
    let version = match host.load(file) {
        Ok(v) => v,
        Err(e) => {
            println!("FAIL {} (does not load)\n{e}", file.display());
            report.failed.push(file.display().to_string());
            return;
        }
    };
    let tests: Vec<String> = version.fn_names().filter(|n| n.starts_with("test_")).map(str::to_string).collect();
    if tests.is_empty() {
        println!("FAIL {}: no fn test_*() found", file.display());
        report.failed.push(file.display().to_string());
    }
    for name in tests {
        let id = format!("{}::{name}", file.display());
        match host.call(&version, &name, Vec::new()) {
            Ok(_) => {
                println!("ok   {id}");
                report.passed += 1;
            }
            Err(e) => {
                println!("FAIL {id}\n  {e}");
                report.failed.push(id);
            }
        }
    }
}

/// `load_json(path)`: a JSON file, relative to the test file's folder, as Rhai values.
fn load_json(dir: &Path, path: &str) -> Result<Dynamic, Box<EvalAltResult>> {
    let file: PathBuf = dir.join(path);
    let fail = |e: String| -> Box<EvalAltResult> { format!("load_json({path}): {}: {e}", file.display()).into() };
    let text = std::fs::read_to_string(&file).map_err(|e| fail(e.to_string()))?;
    let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| fail(e.to_string()))?;
    rhai::serde::to_dynamic(value).map_err(|e| fail(e.to_string()))
}
