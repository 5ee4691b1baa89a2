//! `host dashboard --diff REPORT.json`: `host diff` reports, checked once at start and
//! served as read (without `per_row`, which the page does not show and can be large).

use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::train::diff::DiffReport;

/// Past this size a file is refused rather than read into memory.
const MAX_BYTES: u64 = 64 << 20;

/// Reads `path` as a `host diff` report; anything else is an error naming the file.
pub fn load(path: &Path) -> Result<Value> {
    let shown = path.display();
    let size = std::fs::metadata(path).with_context(|| format!("{shown}: cannot read the diff report"))?.len();
    if size > MAX_BYTES {
        bail!("{shown}: {size} bytes; a diff report over {MAX_BYTES} bytes is not served");
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("{shown}: cannot read the diff report"))?;
    let mut report: Value =
        serde_json::from_str(&text).with_context(|| format!("{shown}: not JSON, so not a host diff report"))?;
    // The shape is the one `host diff` writes: its own type reads it back.
    if let Err(what) = DiffReport::deserialize(&report) {
        bail!("{shown}: not a host diff report ({what})");
    }
    let object = report.as_object_mut().expect("checked");
    object.remove("per_row");
    object.insert("file".into(), json!(shown.to_string()));
    Ok(report)
}
