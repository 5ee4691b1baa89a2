//! ARCHITECTURE.md's arrows, checked on the sources: a run flows script → train →
//! model / data → tensor, so no lower layer names a higher one.

use std::path::{Path, PathBuf};

mod common;

/// Every .rs file under `dir`.
fn sources(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(sources(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
    files
}

/// Lines of the files under `src/{layer}` that name `crate::{higher}`, as "file:line".
fn uses_of(layer: &str, higher: &str) -> Vec<String> {
    let needle = format!("crate::{higher}");
    let mut found = Vec::new();
    for file in sources(&common::repo().join("src").join(layer)) {
        for (i, line) in std::fs::read_to_string(&file).unwrap().lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            let at = code.find(&needle);
            if at.is_some_and(|at| !code[at + needle.len()..].starts_with(|c: char| c.is_alphanumeric() || c == '_')) {
                found.push(format!("{}:{}", file.display(), i + 1));
            }
        }
    }
    found
}

#[test]
fn lower_layers_do_not_name_higher_ones() {
    let rules = [
        ("script", &["train", "cli", "bench", "dashboard"][..]),
        ("model", &["train", "script", "cli", "bench", "dashboard"][..]),
        ("data", &["train", "script", "cli", "bench", "dashboard"][..]),
        ("kernels", &["train", "script", "model", "data", "cli", "bench", "dashboard"][..]),
        ("report", &["train", "script", "model", "data", "cli", "bench", "dashboard"][..]),
        ("train", &["cli", "bench", "dashboard"][..]),
    ];
    let mut broken = Vec::new();
    for (layer, higher) in rules {
        for h in higher {
            broken.extend(uses_of(layer, h).into_iter().map(|at| format!("{at}: src/{layer} names crate::{h}")));
        }
    }
    assert!(broken.is_empty(), "imports against ARCHITECTURE.md's layers:\n{}", broken.join("\n"));
}

#[test]
fn the_check_sees_an_import() {
    // The scan itself: src/train does name crate::model (a lower layer), so it must find it.
    assert!(!uses_of("train", "model").is_empty());
}
