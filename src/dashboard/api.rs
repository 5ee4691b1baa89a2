//! The dashboard's routes: the page (embedded in the binary) and a JSON API over the run
//! folders. A fixed table; no route takes a path from the client.

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::http::{Handler, Reply, Request, Response};
use super::runs::RunFolder;

const INDEX_HTML: &str = include_str!("page/index.html");
const APP_JS: &str = include_str!("page/app.js");
const STYLE_CSS: &str = include_str!("page/style.css");

/// The events drawn as markers, whose click shows a source diff.
pub const MARKER_EVENTS: &[&str] = &["reload", "reload_failed", "loss_failed", "lr_failed", "restart_needed"];

/// How often a live page's stream looks for changes, sends a keep-alive, and how long one
/// stream lasts before the browser is asked to reconnect.
const STREAM_POLL: Duration = Duration::from_millis(500);
const STREAM_PING: Duration = Duration::from_secs(15);
const STREAM_LIFETIME: Duration = Duration::from_secs(30 * 60);

pub struct Api {
    pub folders: Vec<RunFolder>,
    /// `host diff` reports given with `--diff`, checked at start.
    pub diffs: Vec<Value>,
}

impl Api {
    fn folder(&self, request: &Request) -> Result<&RunFolder, Response> {
        let index: usize = request
            .param("run")
            .and_then(|r| r.parse().ok())
            .ok_or_else(|| Response::text(400, "run: give the index of a run (0, 1, ...)"))?;
        self.folders.get(index).ok_or_else(|| Response::text(404, "no such run"))
    }

    /// `source`: "" for the run folder's own metrics, or an arm's name as the info lists it.
    fn source<'a>(folder: &RunFolder, request: &'a Request) -> Result<&'a str, Response> {
        let source = request.param("source").unwrap_or("");
        if folder.has_source(source) { Ok(source) } else { Err(Response::text(404, "no such source in this run")) }
    }

    fn route(self: &Arc<Self>, request: &Request) -> Result<Reply, Response> {
        let whole = |r: Response| Ok(Reply::Whole(r));
        match request.path.as_str() {
            "/" | "/index.html" => whole(Response::new(200, "text/html; charset=utf-8", INDEX_HTML)),
            "/app.js" => whole(Response::new(200, "text/javascript; charset=utf-8", APP_JS)),
            "/style.css" => whole(Response::new(200, "text/css; charset=utf-8", STYLE_CSS)),
            "/api/runs" => {
                let runs: Vec<Value> =
                    self.folders.iter().enumerate().map(|(i, f)| json!({"index": i, "label": f.label})).collect();
                whole(Response::json(&json!({"runs": runs, "markers": MARKER_EVENTS})))
            }
            "/api/model-diffs" => whole(Response::json(&json!({"reports": self.diffs}))),
            "/api/info" => whole(Response::json(&self.folder(request)?.info())),
            "/api/metrics" => {
                let folder = self.folder(request)?;
                let source = Self::source(folder, request)?;
                let generation = request.param("generation").and_then(|g| g.parse().ok());
                let from = request
                    .param("from")
                    .map_or(Ok(0), str::parse)
                    .map_err(|_| Response::text(400, "from: a line number"))?;
                let body =
                    folder.metrics(source, generation, from).ok_or_else(|| Response::text(404, "no such source"))?;
                whole(Response::new(200, "application/json", body))
            }
            "/api/diff" => {
                let folder = self.folder(request)?;
                let source = Self::source(folder, request)?;
                let step = request
                    .param("step")
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| Response::text(400, "step: a step number"))?;
                let event = request
                    .param("event")
                    .filter(|e| MARKER_EVENTS.contains(e))
                    .ok_or_else(|| Response::text(400, "event: one of the marker events"))?;
                let diff = folder
                    .event_diff(source, event, step)
                    .ok_or_else(|| Response::text(404, "no script version at that step"))?;
                whole(Response::json(&diff))
            }
            "/api/stream" => {
                let api = self.clone();
                Ok(Reply::Stream(Box::new(move |out: &mut dyn Write| api.stream(out))))
            }
            _ => Err(Response::text(404, "not found")),
        }
    }

    /// Server-sent events: `change` with every run's stamps whenever one changes, a comment
    /// as keep-alive. Ends when the client goes (a write fails) or after STREAM_LIFETIME.
    fn stream(&self, out: &mut dyn Write) -> std::io::Result<()> {
        out.write_all(b"retry: 2000\n\n")?;
        let started = Instant::now();
        let mut last_sent = String::new();
        let mut last_write = Instant::now();
        while started.elapsed() < STREAM_LIFETIME {
            let stamps: Vec<Value> = self.folders.iter().map(RunFolder::stamps).collect();
            let data = json!({"runs": stamps}).to_string();
            if data != last_sent {
                out.write_all(format!("event: change\ndata: {data}\n\n").as_bytes())?;
                out.flush()?;
                last_sent = data;
                last_write = Instant::now();
            } else if last_write.elapsed() >= STREAM_PING {
                out.write_all(b": keep-alive\n\n")?;
                out.flush()?;
                last_write = Instant::now();
            }
            std::thread::sleep(STREAM_POLL);
        }
        Ok(())
    }
}

/// The handler the server calls: the API behind an Arc, so that a stream can keep it.
pub struct Shared(pub Arc<Api>);

impl Handler for Shared {
    fn handle(&self, request: &Request) -> Reply {
        match self.0.route(request) {
            Ok(reply) => reply,
            Err(response) => Reply::Whole(response),
        }
    }
}
