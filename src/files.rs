//! File hashing shared by every layer: run identities, checkpoint manifests, reference
//! log-prob files.

use std::io::Read;
use std::path::Path;

use anyhow::{Context, Result};
use sha2::Digest;

/// The digest as lowercase hex.
pub fn hex(hasher: sha2::Sha256) -> String {
    hasher.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Feeds a whole file to `hasher`, 1 MiB at a time; returns its size in bytes.
pub fn hash_file(hasher: &mut sha2::Sha256, path: &Path) -> Result<u64> {
    let mut file = std::fs::File::open(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let mut buffer = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buffer).with_context(|| format!("{}: cannot read", path.display()))?;
        if n == 0 {
            return Ok(size);
        }
        size += n as u64;
        hasher.update(&buffer[..n]);
    }
}

/// A whole file's size in bytes and SHA-256 (lowercase hex).
pub fn sha256_file(path: &Path) -> Result<(u64, String)> {
    let mut hasher = sha2::Sha256::default();
    let size = hash_file(&mut hasher, path)?;
    Ok((size, hex(hasher)))
}
