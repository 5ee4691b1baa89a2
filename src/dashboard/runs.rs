//! The run folders a dashboard shows, read and never written: each metrics.jsonl followed
//! from where it was last read, a comparison's arms, the config, the sources of every
//! script version. Every file is opened by a name the server composed (never one a client
//! sent), and what was opened must lie inside the run folder once symlinks are resolved.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use serde_json::{Value, json};

use crate::train::checkpoint::{CONFIG_FILE, REJECTED_SOURCES_DIR, RUN_FILE, SOURCES_DIR};
use crate::train::lock::{LOCK_FILE, names_a_live_holder};

/// The largest file (other than metrics.jsonl, which is read in pieces) the server reads.
const MAX_FILE: u64 = 4 << 20;
/// metrics.jsonl bytes read per refresh; the rest comes at the next one.
const MAX_READ: u64 = 16 << 20;
/// Lines per `/api/metrics` answer; the page asks again for more.
pub const PAGE_LINES: usize = 5000;
/// Files of one script version listed at most, and how deep its folders go.
const MAX_SOURCE_FILES: usize = 256;
const MAX_SOURCE_DEPTH: usize = 12;
/// A run folder's files are looked at again at most this often, however many pages ask.
const REFRESH_EVERY: Duration = Duration::from_millis(250);

/// One run folder given to the dashboard (a run, one arm of a comparison, or a comparison).
pub struct RunFolder {
    /// As given on the command line (shown on the page).
    pub label: String,
    given: PathBuf,
    /// The folder with symlinks resolved, once it exists (a run being started may not yet).
    root: OnceLock<PathBuf>,
    state: Mutex<FolderState>,
}

#[derive(Default)]
struct FolderState {
    refreshed: Option<Instant>,
    /// "" for the folder's own metrics.jsonl, an arm's name for each arm's.
    tails: BTreeMap<String, Tail>,
    /// A fingerprint of everything but the metrics (config, arms, versions, lock, results).
    info_stamp: u64,
}

/// metrics.jsonl as read so far: whole lines only, each a JSON object.
#[derive(Default)]
pub struct Tail {
    /// (device, inode) of the file read: another file (a resume rewrites it) starts over.
    file: Option<(u64, u64)>,
    offset: u64,
    /// Bumped whenever the lines read so far stop being a prefix of the file.
    pub generation: u64,
    pub lines: Vec<Box<str>>,
}

impl Tail {
    /// Reads what was appended to `file` since the last call; starts over when the file was
    /// replaced or cut.
    fn follow(&mut self, file: &mut File) -> std::io::Result<()> {
        use std::os::unix::fs::MetadataExt;
        let meta = file.metadata()?;
        let id = (meta.dev(), meta.ino());
        if self.file != Some(id) || meta.len() < self.offset {
            if self.file.is_some() {
                self.generation += 1;
            }
            *self = Tail { file: Some(id), generation: self.generation, ..Tail::default() };
        }
        if meta.len() == self.offset {
            return Ok(());
        }
        file.seek(SeekFrom::Start(self.offset))?;
        let mut bytes = Vec::new();
        file.take(MAX_READ).read_to_end(&mut bytes)?;
        // Only whole lines: a line being written is read once it ends.
        let Some(end) = bytes.iter().rposition(|&b| b == b'\n') else { return Ok(()) };
        for line in bytes[..=end].split(|&b| b == b'\n') {
            if let Some(kept) = keep_line(line) {
                self.lines.push(kept.into_boxed_str());
            }
        }
        self.offset += end as u64 + 1;
        Ok(())
    }
}

/// A metrics.jsonl line as the page gets it: a JSON object, as written; the large
/// `param_grad_norms` events without their norms. Anything else is left out.
fn keep_line(line: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(line).ok()?.trim();
    let value: Value = serde_json::from_str(text).ok()?;
    let object = value.as_object()?;
    if object.get("event").and_then(Value::as_str) == Some("param_grad_norms") {
        return Some(json!({"step": object.get("step"), "event": "param_grad_norms"}).to_string());
    }
    Some(text.to_string())
}

/// A name the server may join to a run folder path: one plain component.
fn plain_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\\', '\0'])
}

impl RunFolder {
    /// A folder `host dashboard` was given: it must be a run folder (hold run.json).
    pub fn existing(path: &Path) -> Result<Self> {
        if !path.is_dir() {
            bail!("{}: no such run folder", path.display());
        }
        if !path.join(RUN_FILE).is_file() {
            bail!(
                "{}: not a prefhost run folder (it has no {RUN_FILE}; give a folder that `host run` wrote)",
                path.display()
            );
        }
        let folder = Self::pending(path);
        folder.root().ok_or_else(|| anyhow::anyhow!("{}: cannot resolve the folder's path", path.display()))?;
        Ok(folder)
    }

    /// The folder of a run that is starting: shown once it exists.
    pub fn pending(path: &Path) -> Self {
        Self {
            label: path.display().to_string(),
            given: path.to_path_buf(),
            root: OnceLock::new(),
            state: Mutex::new(FolderState::default()),
        }
    }

    pub fn root(&self) -> Option<&Path> {
        if let Some(root) = self.root.get() {
            return Some(root);
        }
        let canonical = self.given.canonicalize().ok().filter(|p| p.is_dir())?;
        Some(self.root.get_or_init(|| canonical))
    }

    /// Opens `rel` (components the server chose) under the folder, refusing anything that is
    /// not a regular file inside it after symlinks are resolved. The check is made on the
    /// file actually opened, so a symlink swapped in meanwhile is caught too. FIFOs and
    /// devices are never waited on.
    fn open(&self, rel: &[&str]) -> Option<File> {
        let root = self.root()?;
        if !rel.iter().all(|c| plain_name(c)) {
            return None;
        }
        let path = rel.iter().fold(root.to_path_buf(), |p, c| p.join(c));
        use std::os::unix::fs::OpenOptionsExt;
        let file =
            std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY).open(&path).ok()?;
        if !file.metadata().ok()?.is_file() || !inside(&file, &path, root) {
            return None;
        }
        Some(file)
    }

    /// A small file's text (at most MAX_FILE bytes), as [`open`] allows it.
    fn read(&self, rel: &[&str]) -> Option<String> {
        let file = self.open(rel)?;
        let mut bytes = Vec::new();
        file.take(MAX_FILE).read_to_end(&mut bytes).ok()?;
        Some(String::from_utf8_lossy(&bytes).into_owned())
    }

    fn read_json(&self, rel: &[&str]) -> Value {
        self.read(rel).and_then(|t| serde_json::from_str(&t).ok()).unwrap_or(Value::Null)
    }

    /// The entries of a folder inside the run folder: (name, is a folder), symlinks left out.
    fn list(&self, rel: &[&str]) -> Vec<(String, bool)> {
        let Some(root) = self.root() else { return Vec::new() };
        if !rel.iter().all(|c| plain_name(c)) {
            return Vec::new();
        }
        let path = rel.iter().fold(root.to_path_buf(), |p, c| p.join(c));
        let Ok(dir) = File::open(&path) else { return Vec::new() };
        if !inside(&dir, &path, root) {
            return Vec::new();
        }
        // Listed through the descriptor checked above, not the path again.
        use std::os::fd::AsRawFd;
        let Ok(entries) =
            std::fs::read_dir(format!("/proc/self/fd/{}", dir.as_raw_fd())).or_else(|_| std::fs::read_dir(&path))
        else {
            return Vec::new();
        };
        let mut found: Vec<(String, bool)> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let kind = e.file_type().ok()?;
                let name = e.file_name().into_string().ok()?;
                (plain_name(&name) && !kind.is_symlink()).then_some((name, kind.is_dir()))
            })
            .collect();
        found.sort();
        found
    }

    /// The comparison arms: sub-folders holding run.json, in the config's order when known.
    fn arms(&self, config: &Value) -> Vec<String> {
        let mut found: Vec<String> = self
            .list(&[])
            .into_iter()
            .filter(|(n, dir)| *dir && !n.starts_with('.'))
            .map(|(n, _)| n)
            .filter(|n| self.open(&[n, RUN_FILE]).is_some())
            .collect();
        if let Some(order) = config["config"]["compare"].as_array() {
            let rank = |n: &String| order.iter().position(|a| a["name"].as_str() == Some(n)).unwrap_or(usize::MAX);
            found.sort_by_key(rank);
        }
        found
    }

    /// Reads what is new in each metrics.jsonl (at most every REFRESH_EVERY).
    fn refresh(&self, state: &mut FolderState) {
        if state.refreshed.is_some_and(|t| t.elapsed() < REFRESH_EVERY) {
            return;
        }
        state.refreshed = Some(Instant::now());
        let config = self.read_json(&[CONFIG_FILE]);
        let arms = self.arms(&config);
        let mut sources: Vec<String> = Vec::new();
        if self.open(&["metrics.jsonl"]).is_some() || (arms.is_empty() && !is_comparison(&config)) {
            sources.push(String::new());
        }
        sources.extend(arms.iter().cloned());
        for name in &sources {
            let tail = state.tails.entry(name.clone()).or_default();
            let rel: Vec<&str> = if name.is_empty() { vec!["metrics.jsonl"] } else { vec![name, "metrics.jsonl"] };
            if let Some(mut file) = self.open(&rel) {
                let _ = tail.follow(&mut file);
            }
        }
        state.tails.retain(|name, _| sources.contains(name));
        state.info_stamp = self.info_stamp(&sources);
    }

    /// Sizes and times of what `info` reads, hashed: it changes when the info does.
    fn info_stamp(&self, sources: &[String]) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        let stat = |rel: &[&str], h: &mut std::collections::hash_map::DefaultHasher| {
            if let Some(meta) = self.open(rel).and_then(|f| f.metadata().ok()) {
                use std::os::unix::fs::MetadataExt;
                (meta.len(), meta.mtime(), meta.mtime_nsec()).hash(h);
            } else {
                0u8.hash(h);
            }
        };
        for file in [CONFIG_FILE, "results.json", LOCK_FILE, "memory.json"] {
            stat(&[file], &mut h);
        }
        for source in sources.iter().filter(|s| !s.is_empty()) {
            source.hash(&mut h);
            for file in [CONFIG_FILE, LOCK_FILE] {
                stat(&[source, file], &mut h);
            }
            self.list(&[source, SOURCES_DIR]).hash(&mut h);
            self.list(&[source, REJECTED_SOURCES_DIR]).hash(&mut h);
        }
        self.list(&[SOURCES_DIR]).hash(&mut h);
        self.list(&[REJECTED_SOURCES_DIR]).hash(&mut h);
        h.finish()
    }

    /// Each source's (generation, lines) and the info fingerprint, after a refresh: what
    /// the event stream compares to tell the page what changed.
    pub fn stamps(&self) -> Value {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        self.refresh(&mut state);
        let sources: serde_json::Map<String, Value> =
            state.tails.iter().map(|(k, t)| (k.clone(), json!([t.generation, t.lines.len()]))).collect();
        json!({"info": state.info_stamp.to_string(), "sources": sources})
    }

    /// Lines `from..` of a source's metrics (at most PAGE_LINES), as a JSON text; when
    /// `generation` is not the current one, from the start.
    pub fn metrics(&self, source: &str, generation: Option<u64>, from: usize) -> Option<String> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        self.refresh(&mut state);
        let tail = state.tails.get(source)?;
        let from = if generation == Some(tail.generation) { from.min(tail.lines.len()) } else { 0 };
        let to = (from + PAGE_LINES).min(tail.lines.len());
        let mut out = format!(
            "{{\"generation\":{},\"from\":{from},\"more\":{},\"lines\":[",
            tail.generation,
            to < tail.lines.len()
        );
        for (i, line) in tail.lines[from..to].iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(line);
        }
        out.push_str("]}");
        Some(out)
    }

    /// Everything but the metrics: kind, status, config, arms, versions, results.
    pub fn info(&self) -> Value {
        let sources: Vec<String> = {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            self.refresh(&mut state);
            state.tails.keys().cloned().collect()
        };
        if self.root().is_none() {
            return json!({"label": self.label, "kind": "waiting", "status": "waiting", "sources": []});
        }
        let config = self.read_json(&[CONFIG_FILE]);
        let comparison = sources.iter().any(|s| !s.is_empty()) || is_comparison(&config);
        let live = |rel: &[&str]| self.read(rel).is_some_and(|t| names_a_live_holder(&t));
        let running = live(&[LOCK_FILE]);
        let arm_names: Vec<String> = config["config"]["compare"]
            .as_array()
            .map(|a| a.iter().filter_map(|x| x["name"].as_str().map(str::to_string)).collect())
            .unwrap_or_default();
        let described: Vec<Value> = sources
            .iter()
            .map(|name| {
                let rel = |file: &'static str| -> Vec<&str> {
                    if name.is_empty() { vec![file] } else { vec![name.as_str(), file] }
                };
                let arm_config = self.read_json(&rel(CONFIG_FILE));
                let finished = self.open(&rel("arm_result.json")).is_some();
                json!({
                    "name": name,
                    "total_steps": arm_config["total_steps"],
                    "running": live(&rel(LOCK_FILE)),
                    "finished": finished,
                    "versions": self.versions(name, SOURCES_DIR),
                    "rejected": self.versions(name, REJECTED_SOURCES_DIR),
                    "config": if name.is_empty() { Value::Null } else { arm_config["config"].clone() },
                })
            })
            .collect();
        json!({
            "label": self.label,
            "path": self.root().map(|p| p.display().to_string()),
            "kind": if comparison { "comparison" } else { "run" },
            "running": running,
            "config": config,
            "arms": arm_names,
            "sources": described,
            "results": self.read_json(&["results.json"]),
            "memory": self.read_json(&["memory.json"]),
        })
    }

    /// The steps of a source's script versions (`sources/step-N/`) or rejected ones.
    fn versions(&self, source: &str, dir: &str) -> Vec<usize> {
        let rel: Vec<&str> = if source.is_empty() { vec![dir] } else { vec![source, dir] };
        let mut steps: Vec<usize> = self
            .list(&rel)
            .into_iter()
            .filter(|(_, d)| *d)
            .filter_map(|(n, _)| n.strip_prefix("step-")?.parse().ok())
            .collect();
        steps.sort();
        steps
    }

    /// Whether `source` is one of this folder's sources now.
    pub fn has_source(&self, source: &str) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        self.refresh(&mut state);
        state.tails.contains_key(source)
    }

    /// The files of version folder `dir/step-N` of `source`: relative path → text.
    fn version_files(&self, source: &str, dir: &str, step: usize) -> BTreeMap<String, String> {
        let step_dir = format!("step-{step:06}");
        let mut base: Vec<String> = Vec::new();
        if !source.is_empty() {
            base.push(source.to_string());
        }
        base.extend([dir.to_string(), step_dir]);
        let mut files = BTreeMap::new();
        let mut pending: Vec<(Vec<String>, usize)> = vec![(Vec::new(), 0)];
        while let Some((sub, depth)) = pending.pop() {
            let rel: Vec<String> = base.iter().chain(&sub).cloned().collect();
            let rel_refs: Vec<&str> = rel.iter().map(String::as_str).collect();
            for (name, is_dir) in self.list(&rel_refs) {
                if files.len() >= MAX_SOURCE_FILES {
                    break;
                }
                let mut path = sub.clone();
                path.push(name);
                if is_dir {
                    if depth < MAX_SOURCE_DEPTH {
                        pending.push((path, depth + 1));
                    }
                    continue;
                }
                let full: Vec<&str> = rel_refs.iter().copied().chain(path.last().map(String::as_str)).collect();
                if let Some(text) = self.read(&full) {
                    files.insert(path.join("/"), text);
                }
            }
        }
        files
    }

    /// The source diff behind an event marker: the version the event concerns against the
    /// one before it. reload and restart_needed: the version swapped in at that step;
    /// loss_failed and lr_failed: the version that failed (the one in use then);
    /// reload_failed: the rejected edit, against the version that kept running.
    pub fn event_diff(&self, source: &str, event: &str, step: usize) -> Option<Value> {
        let versions = self.versions(source, SOURCES_DIR);
        let at_or_before = |s: usize| versions.iter().rev().copied().find(|&v| v <= s);
        let before = |s: usize| versions.iter().rev().copied().find(|&v| v < s);
        let (this, this_dir, previous) = match event {
            "reload" | "restart_needed" | "loss_failed" | "lr_failed" => {
                let this = at_or_before(step)?;
                (this, SOURCES_DIR, before(this))
            }
            "reload_failed" => {
                let rejected = self.versions(source, REJECTED_SOURCES_DIR);
                if !rejected.contains(&step) {
                    return Some(
                        json!({"event": event, "step": step, "note": "the sources of this rejected edit were not kept (a run from before prefhost kept them)", "files": []}),
                    );
                }
                (step, REJECTED_SOURCES_DIR, at_or_before(step))
            }
            _ => return None,
        };
        let new = self.version_files(source, this_dir, this);
        let old = previous.map(|p| self.version_files(source, SOURCES_DIR, p)).unwrap_or_default();
        let mut paths: Vec<&String> = new.keys().chain(old.keys()).collect();
        paths.sort();
        paths.dedup();
        let files: Vec<Value> = paths
            .into_iter()
            .map(|path| {
                let (a, b) = (old.get(path), new.get(path));
                let status = match (a, b) {
                    (None, Some(_)) if previous.is_some() => "added",
                    (None, Some(_)) => "first version",
                    (Some(_), None) => "removed",
                    (Some(a), Some(b)) if a == b => "unchanged",
                    _ => "changed",
                };
                let diff = super::diff::unified(a.map_or("", String::as_str), b.map_or("", String::as_str), 3);
                json!({"path": path, "status": status, "diff": diff})
            })
            .collect();
        Some(json!({
            "event": event,
            "step": step,
            "version": {"step": this, "rejected": this_dir == REJECTED_SOURCES_DIR},
            "previous": previous,
            "files": files,
        }))
    }
}

/// Whether a train_config.json is a comparison's own (its arms have `arm` set).
fn is_comparison(config: &Value) -> bool {
    config["config"]["compare"].is_array() && config["arm"].is_null()
}

/// Whether the open `file` (opened by `path`) lies inside `root`: the path the kernel
/// opened, read back from /proc, or else the canonical path.
fn inside(file: &File, path: &Path, root: &Path) -> bool {
    use std::os::fd::AsRawFd;
    let real = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd())).or_else(|_| path.canonicalize());
    real.is_ok_and(|real| real.starts_with(root))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tail_reads_whole_lines_and_starts_over_when_the_file_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        std::fs::write(&path, "{\"step\":1,\"loss\":0.5}\n{\"step\":2,").unwrap();
        let mut tail = Tail::default();
        tail.follow(&mut File::open(&path).unwrap()).unwrap();
        assert_eq!(tail.lines.len(), 1);
        // The rest of the line arrives, then junk and a huge event.
        let mut f = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
        std::io::Write::write_all(
            &mut f,
            b"\"loss\":0.4}\nnot json\n{\"step\":2,\"event\":\"param_grad_norms\",\"w\":1.0}\n",
        )
        .unwrap();
        tail.follow(&mut File::open(&path).unwrap()).unwrap();
        assert_eq!(tail.lines.len(), 3);
        assert_eq!(&*tail.lines[2], "{\"event\":\"param_grad_norms\",\"step\":2}");
        assert_eq!(tail.generation, 0);
        // A resume rewrites the file through a rename: read again from the start.
        let tmp = dir.path().join("tmp");
        std::fs::write(&tmp, "{\"step\":1,\"loss\":0.5}\n").unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        tail.follow(&mut File::open(&path).unwrap()).unwrap();
        assert_eq!((tail.generation, tail.lines.len()), (1, 1));
    }

    #[test]
    fn files_outside_the_folder_are_never_opened() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), "secret").unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(RUN_FILE), "{}").unwrap();
        std::fs::write(dir.path().join("inner"), "inner").unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret"), dir.path().join("metrics.jsonl")).unwrap();
        std::os::unix::fs::symlink(dir.path().join("inner"), dir.path().join("results.json")).unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join(SOURCES_DIR)).unwrap();
        let folder = RunFolder::existing(dir.path()).unwrap();
        assert!(folder.read(&["metrics.jsonl"]).is_none(), "a symlink out is refused");
        assert_eq!(folder.read(&["results.json"]).as_deref(), Some("inner"), "a symlink that stays inside is followed");
        assert!(folder.list(&[SOURCES_DIR]).is_empty());
        assert!(folder.read(&[SOURCES_DIR, "secret"]).is_none());
        for bad in [&["..", "secret"][..], &["/etc/passwd"], &["a/../../secret"], &[""], &["."]] {
            assert!(folder.read(bad).is_none(), "{bad:?}");
        }
        assert!(
            RunFolder::existing(outside.path())
                .err()
                .expect("refused")
                .to_string()
                .contains("not a prefhost run folder")
        );
    }
}
