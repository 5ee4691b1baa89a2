//! One writer per run folder: `run.lock`, created with O_EXCL and holding the writer's
//! PID and host, is held while a run writes into the folder and removed when it ends
//! (normally, with an error or after Ctrl-C). A lock left by a crashed run on this host
//! (its PID no longer alive) is taken over; one held by a live process, or by another
//! host (whose processes cannot be checked from here), is refused.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

pub const LOCK_FILE: &str = "run.lock";

#[derive(Debug, Serialize, Deserialize)]
pub struct LockInfo {
    pub pid: u32,
    pub host: String,
}

/// Held for as long as the run writes; dropping it removes the lock file.
pub struct RunLock {
    path: PathBuf,
}

pub fn hostname() -> String {
    let mut buffer = [0u8; 256];
    // SAFETY: the buffer outlives the call and its length is passed.
    let rc = unsafe { libc::gethostname(buffer.as_mut_ptr().cast(), buffer.len()) };
    if rc != 0 {
        return "unknown".to_string();
    }
    let end = buffer.iter().position(|&b| b == 0).unwrap_or(buffer.len());
    String::from_utf8_lossy(&buffer[..end]).into_owned()
}

/// Whether a process with this PID exists on this host (EPERM: it exists, owned by another user).
fn alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else { return false };
    if pid <= 0 {
        return false;
    }
    // SAFETY: signal 0 only checks that the process exists; nothing is sent.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

impl RunLock {
    pub fn acquire(run_dir: &Path) -> Result<Self> {
        let path = run_dir.join(LOCK_FILE);
        let me = LockInfo { pid: std::process::id(), host: hostname() };
        // Twice at most: once more after taking over a stale lock.
        for _ in 0..2 {
            match std::fs::OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(mut file) => {
                    let lock = Self { path: path.clone() };
                    file.write_all((serde_json::to_string(&me)? + "\n").as_bytes())
                        .and_then(|()| file.sync_all())
                        .with_context(|| format!("writing {}", path.display()))?;
                    return Ok(lock);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => {
                    return Err(e).with_context(|| format!("{}: cannot create the run folder's lock", path.display()));
                }
            }
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let Ok(holder) = serde_json::from_str::<LockInfo>(&text) else {
                // Empty or cut short: a writer between creating and filling it, or one that
                // crashed there; which, cannot be told, so a person decides.
                bail!(
                    "{}: a lock file that is not {{\"pid\", \"host\"}} ({:?}); if no run is writing into this folder, delete it",
                    path.display(),
                    text.trim()
                );
            };
            if holder.host != me.host {
                bail!(
                    "{}: held by PID {} on host {}; only one run writes into a run folder at a time (if that run is gone, delete the lock file)",
                    path.display(),
                    holder.pid,
                    holder.host
                );
            }
            if alive(holder.pid) {
                bail!(
                    "{}: held by PID {} on this host, which is running; only one run writes into a run folder at a time",
                    path.display(),
                    holder.pid
                );
            }
            crate::console::line(&format!(
                "note: {}: taking over a stale lock of PID {} (no longer running)",
                path.display(),
                holder.pid
            ));
            std::fs::remove_file(&path).with_context(|| format!("{}: cannot remove the stale lock", path.display()))?;
        }
        bail!("{}: another run took the lock while a stale one was replaced", path.display())
    }
}

/// Whether a lock file's text names a live holder: a process running on this host, or one
/// of another host (which cannot be checked from here). Empty or malformed: not held.
pub fn names_a_live_holder(lock_text: &str) -> bool {
    let Ok(holder) = serde_json::from_str::<LockInfo>(lock_text) else { return false };
    holder.host != hostname() || alive(holder.pid)
}

impl RunLock {
    /// For a holder that removed the whole run folder, lock file included: nothing is
    /// left to remove (and a lock a later run creates there is not this one).
    pub fn removed_with_folder(mut self) {
        self.path = PathBuf::new();
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        if self.path.as_os_str().is_empty() {
            return;
        }
        let _ = std::fs::remove_file(&self.path);
    }
}
