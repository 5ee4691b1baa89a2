//! `host test`: runs every `fn test_*()` in Rhai test files, so plugins can be unit-tested
//! in pure Rhai with object-map batches.

use std::path::Path;

use super::program::ScriptHost;

pub struct TestReport {
    pub passed: usize,
    pub failed: Vec<String>,
}

pub fn run_test_file(host: &mut ScriptHost, file: &Path, report: &mut TestReport) {
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
