//! A testing hook for crash safety: `PREFHOST_FAILPOINT=FOLDER:POINT` makes the process
//! abort (no unwinding, no cleanup, as a crash or SIGKILL would) when the save of the
//! folder named FOLDER (e.g. `checkpoint-4`) reaches POINT:
//!
//! - `file:NAME`: NAME (e.g. `optimizer.bpk`) has been written to the staging folder;
//! - `staged`: every file is written and fsynced, nothing renamed yet;
//! - `moved-aside`: a folder being replaced has been moved aside, the new one is not in place;
//! - `renamed`: the new folder is in place; the parent is not yet fsynced nor the old folder removed.
//!
//! tests/crash_save.rs uses it to show that a crash at each of these points leaves a run
//! that resumes. Unset, it costs one atomic load per point.

use std::path::Path;
use std::sync::OnceLock;

use anyhow::{Result, bail};

pub const VAR: &str = "PREFHOST_FAILPOINT";
const POINTS: &str = "file:NAME, staged, moved-aside, renamed";

/// (folder, point) from the environment, read once.
fn armed() -> &'static Result<Option<(String, String)>, String> {
    static ARMED: OnceLock<Result<Option<(String, String)>, String>> = OnceLock::new();
    ARMED.get_or_init(|| match std::env::var(VAR) {
        Err(_) => Ok(None),
        Ok(value) => parse(&value).map(Some).map_err(|why| format!("{VAR}={value:?}: {why}")),
    })
}

fn parse(value: &str) -> Result<(String, String), String> {
    let (folder, point) = value.split_once(':').unwrap_or_default();
    let known = matches!(point, "staged" | "moved-aside" | "renamed")
        || point.strip_prefix("file:").is_some_and(|f| !f.is_empty());
    if folder.is_empty() || !known {
        return Err(format!("expected FOLDER:POINT, POINT one of {POINTS}"));
    }
    Ok((folder.to_string(), point.to_string()))
}

/// Refuses a malformed value up front, rather than at the first save.
pub fn check() -> Result<()> {
    match armed() {
        Err(why) => bail!("{why}"),
        Ok(_) => Ok(()),
    }
}

/// Aborts the process if the failpoint names this point of the save of `folder`.
pub fn hit(folder: &Path, point: &str) -> Result<()> {
    stop_if(folder, |at| at == point)
}

/// `hit` for the point `file:NAME`.
pub fn file_written(folder: &Path, name: &str) -> Result<()> {
    stop_if(folder, |at| at.strip_prefix("file:") == Some(name))
}

fn stop_if(folder: &Path, is_point: impl Fn(&str) -> bool) -> Result<()> {
    match armed() {
        Ok(None) => Ok(()),
        Err(why) => bail!("{why}"),
        Ok(Some((name, at))) => {
            if folder.file_name().is_some_and(|n| n == name.as_str()) && is_point(at) {
                eprintln!("{VAR}: aborting at {name}:{at}");
                std::process::abort();
            }
            Ok(())
        }
    }
}
