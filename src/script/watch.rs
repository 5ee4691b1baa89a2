//! Watches the script and its plugins. Editors often save by writing a new file and
//! renaming it, so the folders are watched and events filtered by file name.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

use anyhow::Result;
use notify::{RecursiveMode, Watcher};

pub struct ScriptWatcher {
    _watcher: notify::RecommendedWatcher,
    events: Receiver<PathBuf>,
    files: HashSet<PathBuf>,
    pending: Vec<PathBuf>,
    last_event: Option<Instant>,
}

/// Quiet period after the last event before a reload, so half-saved files are not read.
const DEBOUNCE: Duration = Duration::from_millis(150);

fn canonical(p: &Path) -> PathBuf {
    p.canonicalize().unwrap_or_else(|_| p.to_path_buf())
}

impl ScriptWatcher {
    pub fn new(files: &[PathBuf]) -> Result<Self> {
        let (tx, events) = channel();
        let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            if let Ok(event) = res {
                if event.kind.is_access() {
                    return;
                }
                for path in event.paths {
                    let _ = tx.send(path);
                }
            }
        })?;
        let mut dirs = HashSet::new();
        for f in files {
            if let Some(dir) = canonical(f).parent()
                && dirs.insert(dir.to_path_buf())
            {
                watcher.watch(dir, RecursiveMode::NonRecursive)?;
            }
        }
        Ok(Self {
            _watcher: watcher,
            events,
            files: files.iter().map(|f| canonical(f)).collect(),
            pending: Vec::new(),
            last_event: None,
        })
    }

    /// Changed files, once writes have settled; empty when nothing changed.
    pub fn poll(&mut self) -> Vec<PathBuf> {
        while let Ok(path) = self.events.try_recv() {
            let path = canonical(&path);
            if self.files.contains(&path) {
                if !self.pending.contains(&path) {
                    self.pending.push(path);
                }
                self.last_event = Some(Instant::now());
            }
        }
        match self.last_event {
            Some(t) if t.elapsed() >= DEBOUNCE => {
                self.last_event = None;
                std::mem::take(&mut self.pending)
            }
            _ => Vec::new(),
        }
    }
}
