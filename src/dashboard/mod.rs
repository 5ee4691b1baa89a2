//! The live page: `host run SCRIPT --dashboard [ADDR]` and `host dashboard RUN_DIR...`.
//! A local web page of one or more run folders (charts of every metric with the script's
//! reloads and failures marked, comparison arms overlaid, held-out evaluations, the
//! config, progress) that updates while training. Read-only: it reads the files the
//! trainer writes and changes nothing; everything is served from the binary.
//!
//! `http.rs` is the bounded server (own threads, limits on connections, header size and
//! time), `api.rs` its fixed routes, `runs.rs` the run folders as read (inside the folders
//! only), `diff.rs` the source diffs behind the event markers, `reports.rs` the `host diff`
//! reports shown with `--diff`, `page/` the page itself.

mod api;
pub mod diff;
pub mod http;
mod reports;
mod runs;

use serde_json::Value;
use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};

pub use runs::RunFolder;

/// The port when none is given.
pub const DEFAULT_PORT: u16 = 8765;

/// A dashboard being served: where, and whether to anyone beyond this machine.
pub struct Dashboard {
    pub addr: SocketAddr,
    pub url: String,
}

/// Reads `--dashboard`'s or `--addr`'s value: none (127.0.0.1 and the default port), a
/// port (on 127.0.0.1), or HOST:PORT (port 0: any free one).
pub fn parse_address(text: Option<&str>) -> Result<SocketAddr> {
    let text = text.map(str::trim).filter(|t| !t.is_empty());
    let Some(text) = text else { return Ok(SocketAddr::from(([127, 0, 0, 1], DEFAULT_PORT))) };
    if let Ok(port) = text.parse::<u16>() {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    let found = text.to_socket_addrs().with_context(|| {
        format!("dashboard address {text:?}: expected PORT or HOST:PORT (e.g. 127.0.0.1:{DEFAULT_PORT})")
    })?;
    let addrs: Vec<SocketAddr> = found.collect();
    // localhost may resolve to ::1 and 127.0.0.1: IPv4 first, as the URL printed uses it.
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
        .with_context(|| format!("dashboard address {text:?} resolves to nothing"))
}

/// Binds `addr` and serves `folders` (and `host diff` reports, checked) from the server's own threads; the page's URL is in
/// the result. A port in use is an error saying so. An address beyond loopback is served
/// with a warning: anyone who can reach it can read the runs.
pub fn start(addr: SocketAddr, folders: Vec<RunFolder>, diffs: Vec<Value>) -> Result<Dashboard> {
    let listener = TcpListener::bind(addr).map_err(|e| match e.kind() {
        std::io::ErrorKind::AddrInUse => anyhow::anyhow!(
            "dashboard: {addr} is in use (another dashboard, or another program, listens there); give another port, e.g. --dashboard 127.0.0.1:{} (0 picks a free one)",
            addr.port().wrapping_add(1)
        ),
        std::io::ErrorKind::AddrNotAvailable => anyhow::anyhow!("dashboard: {addr} is not an address of this machine"),
        _ => anyhow::anyhow!("dashboard: cannot listen on {addr}: {e}"),
    })?;
    let loopback = addr.ip().is_loopback();
    if !loopback {
        eprintln!(
            "warning: the dashboard listens on {addr}, beyond this machine's loopback: anyone who can reach that address can read these runs (metrics, config, script sources). To keep it private, leave the address out (127.0.0.1) and reach it through ssh -L."
        );
    }
    let api = Arc::new(api::Api { folders, diffs });
    let server = http::serve(listener, Arc::new(api::Shared(api)), http::Limits::default(), loopback)?;
    let shown = if server.addr.ip().is_unspecified() {
        SocketAddr::new([127, 0, 0, 1].into(), server.addr.port())
    } else {
        server.addr
    };
    Ok(Dashboard { addr: server.addr, url: format!("http://{shown}/") })
}

/// `host dashboard RUN_DIR... [--diff REPORT.json]... [--addr ADDR]`: serves the folders
/// and reports until the process is stopped.
pub fn serve_folders(dirs: &[PathBuf], diff_reports: &[PathBuf], addr: Option<&str>) -> Result<()> {
    if dirs.is_empty() && diff_reports.is_empty() {
        bail!("give one or more run folders, or --diff REPORT.json");
    }
    let diffs = diff_reports.iter().map(|p| reports::load(p)).collect::<Result<Vec<_>>>()?;
    let mut folders = Vec::new();
    let mut seen = Vec::new();
    for dir in dirs {
        let folder = RunFolder::existing(dir)?;
        let root = folder.root().map(|p| p.to_path_buf());
        if seen.contains(&root) {
            continue;
        }
        seen.push(root);
        folders.push(folder);
    }
    let (count, reports) = (folders.len(), diffs.len());
    let dashboard = start(parse_address(addr)?, folders, diffs)?;
    println!(
        "dashboard of {count} run folder(s) and {reports} diff report(s): {} (read-only; Ctrl-C stops it)",
        dashboard.url
    );
    loop {
        std::thread::park();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_default_to_loopback() {
        assert_eq!(parse_address(None).unwrap(), SocketAddr::from(([127, 0, 0, 1], DEFAULT_PORT)));
        assert_eq!(parse_address(Some("")).unwrap(), SocketAddr::from(([127, 0, 0, 1], DEFAULT_PORT)));
        assert_eq!(parse_address(Some("9000")).unwrap(), SocketAddr::from(([127, 0, 0, 1], 9000)));
        assert_eq!(parse_address(Some("0.0.0.0:80")).unwrap(), SocketAddr::from(([0, 0, 0, 0], 80)));
        assert_eq!(parse_address(Some("[::1]:81")).unwrap(), "[::1]:81".parse().unwrap());
        assert!(parse_address(Some("localhost:82")).unwrap().ip().is_loopback());
        for bad in ["nowhere", "1.2.3.4", "127.0.0.1:99999", "host:port"] {
            assert!(parse_address(Some(bad)).is_err(), "{bad}");
        }
    }
}
