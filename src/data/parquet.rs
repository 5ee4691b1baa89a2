//! Parquet rows (as Hugging Face datasets are published), read into the same JSON form
//! as JSONL rows so one set of checks applies to both. Row N is counted from 1.

use std::path::Path;

use anyhow::{Context, Result};
use parquet::file::reader::SerializedFileReader;

use super::pairs::RawRow;

pub fn read_parquet_rows(path: &Path) -> Result<Vec<RawRow>> {
    let file = std::fs::File::open(path).with_context(|| format!("{}: cannot read data", path.display()))?;
    let reader = SerializedFileReader::new(file)
        .map_err(|e| anyhow::anyhow!("{}: not a readable Parquet file: {e}", path.display()))?;
    let mut rows = Vec::new();
    for (i, row) in reader.into_iter().enumerate() {
        // A damaged page fails the whole file: what follows it cannot be trusted either.
        let row = row.map_err(|e| anyhow::anyhow!("{}: row {}: corrupt Parquet data: {e}", path.display(), i + 1))?;
        rows.push(RawRow {
            at: format!("{}: row {}", path.display(), i + 1),
            line: i + 1,
            value: Ok(row.to_json_value()),
        });
    }
    Ok(rows)
}
