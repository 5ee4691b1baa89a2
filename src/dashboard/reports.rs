//! `host dashboard --diff REPORT.json`: `host diff` reports, checked once at start and
//! served as read (without `per_row`, which the page does not show and can be large).

use std::path::Path;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

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
    check(&report).map_err(|what| anyhow::anyhow!("{shown}: not a host diff report ({what})"))?;
    let object = report.as_object_mut().expect("checked");
    object.remove("per_row");
    object.insert("file".into(), json!(shown.to_string()));
    Ok(report)
}

/// The fields the page reads, with their types: what `train::diff::DiffReport` writes.
fn check(report: &Value) -> Result<(), String> {
    let has = |v: &Value, key: &str, ok: fn(&Value) -> bool, kind: &str| {
        if v.get(key).is_some_and(ok) { Ok(()) } else { Err(format!("no {kind} \"{key}\"")) }
    };
    let number_or_null = |v: &Value| v.is_number() || v.is_null();
    if !report.is_object() {
        return Err("not an object".into());
    }
    for key in ["model_a", "model_b", "data"] {
        has(report, key, Value::is_string, "string")?;
    }
    for key in ["rows", "mean_chosen_change", "mean_rejected_change"] {
        has(report, key, Value::is_number, "number")?;
    }
    for (key, fields) in [
        ("by_position", &["offset", "chosen_mean", "chosen_tokens", "rejected_mean", "rejected_tokens"][..]),
        ("largest", &["line", "completion", "position", "token", "context", "logp_a", "logp_b", "delta"][..]),
    ] {
        let list = report.get(key).and_then(Value::as_array).ok_or_else(|| format!("no list \"{key}\""))?;
        for (i, item) in list.iter().enumerate() {
            for &field in fields {
                let ok = match field {
                    "offset" | "completion" | "token" | "context" => item.get(field).is_some_and(Value::is_string),
                    "chosen_mean" | "rejected_mean" => item.get(field).is_some_and(number_or_null),
                    _ => item.get(field).is_some_and(Value::is_number),
                };
                if !ok {
                    return Err(format!("{key}[{i}] has no valid \"{field}\""));
                }
            }
        }
    }
    Ok(())
}
