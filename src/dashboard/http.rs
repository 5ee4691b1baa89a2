//! A small, bounded HTTP/1.1 server on std::net: one request per connection, GET and HEAD
//! only, a fixed route table (no file serving), limits on connections, header size and
//! time. It runs on its own threads at low priority and only reads files, so no client —
//! slow, stuck, hostile or gone — can hold up the training loop.

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The bounds every connection lives within.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Connections served at once; more are answered 503 and closed at once.
    pub max_connections: usize,
    /// Of those, event streams (each a browser tab); more are answered 503.
    pub max_streams: usize,
    /// The request line and headers together; more is answered 431.
    pub max_header_bytes: usize,
    /// The whole request head must arrive within this (slow senders are dropped).
    pub header_timeout: Duration,
    /// A write that makes no progress for this long ends the connection.
    pub write_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 32,
            max_streams: 8,
            max_header_bytes: 8 * 1024,
            header_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(10),
        }
    }
}

/// A parsed request: only what the routes need.
#[derive(Debug, PartialEq)]
pub struct Request {
    pub head_only: bool,
    /// The path, exactly as sent (never decoded: routes match it literally).
    pub path: String,
    /// Query pairs, percent-decoded.
    pub query: Vec<(String, String)>,
}

impl Request {
    pub fn param(&self, key: &str) -> Option<&str> {
        self.query.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

impl Response {
    pub fn new(status: u16, content_type: &'static str, body: impl Into<Vec<u8>>) -> Self {
        Self { status, content_type, body: body.into() }
    }

    pub fn text(status: u16, body: &str) -> Self {
        Self::new(status, "text/plain; charset=utf-8", format!("{body}\n"))
    }

    pub fn json(value: &serde_json::Value) -> Self {
        Self::new(200, "application/json", value.to_string())
    }
}

/// Writes an event stream to the client until it goes or the stream ends.
pub type StreamWriter = Box<dyn FnOnce(&mut dyn Write) -> io::Result<()> + Send>;

/// What a route returns: a whole response, or an event stream.
pub enum Reply {
    Whole(Response),
    Stream(StreamWriter),
}

/// The application behind the server: maps a request to a reply. Reads only.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, request: &Request) -> Reply;
}

/// Why a request head was not accepted.
#[derive(Debug, PartialEq)]
pub enum Refusal {
    TooLarge,
    BadRequest(&'static str),
    Method,
    Version,
}

/// Parses a request head (request line and headers, without the blank line). `check_host`
/// decides whether a Host header value is acceptable.
pub fn parse_head(head: &[u8], check_host: impl Fn(&str) -> bool) -> Result<Request, Refusal> {
    let head = std::str::from_utf8(head).map_err(|_| Refusal::BadRequest("the request head is not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Refusal::BadRequest("malformed request line"));
    };
    if version != "HTTP/1.1" && version != "HTTP/1.0" {
        return Err(Refusal::Version);
    }
    let head_only = match method {
        "GET" => false,
        "HEAD" => true,
        _ => return Err(Refusal::Method),
    };
    let mut hosts = 0;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Err(Refusal::BadRequest("malformed header line"));
        };
        if name.eq_ignore_ascii_case("host") {
            hosts += 1;
            if !check_host(value.trim()) {
                return Err(Refusal::BadRequest(
                    "this Host is not served (the dashboard answers requests for its own address only)",
                ));
            }
        }
    }
    if hosts > 1 {
        return Err(Refusal::BadRequest("more than one Host header"));
    }
    // Origin form only: "/path?query". No absolute form, no "*".
    if !target.starts_with('/') || target.starts_with("//") {
        return Err(Refusal::BadRequest("the request target must be a path starting with one /"));
    }
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut pairs = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let (Some(k), Some(v)) = (percent_decode(k), percent_decode(v)) else {
            return Err(Refusal::BadRequest("malformed percent-encoding in the query"));
        };
        pairs.push((k, v));
    }
    Ok(Request { head_only, path: path.to_string(), query: pairs })
}

/// `%XX` and `+` decoded; None for a malformed escape or a result that is not UTF-8.
fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// Whether a Host header names this machine's loopback by an IP literal or "localhost"
/// (with any port: an ssh tunnel's local port differs from the served one). A name that a
/// web page could resolve to 127.0.0.1 (DNS rebinding) is refused.
pub fn is_local_host(value: &str) -> bool {
    let host = if let Some(rest) = value.strip_prefix('[') {
        match rest.split_once(']') {
            Some((inside, tail)) if tail.is_empty() || tail.starts_with(':') => inside,
            _ => return false,
        }
    } else {
        value.rsplit_once(':').map_or(value, |(h, _)| h)
    };
    host.eq_ignore_ascii_case("localhost") || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// The listening server; its threads end with the process.
pub struct Server {
    pub addr: SocketAddr,
}

/// Counts a connection (or stream) while it lives; the count drops when it ends, even by a panic.
struct Slot(Arc<AtomicUsize>);

impl Slot {
    fn take(counter: &Arc<AtomicUsize>, max: usize) -> Option<Self> {
        counter
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| (n < max).then_some(n + 1))
            .ok()
            .map(|_| Self(counter.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Starts serving `handler` on `listener` (already bound) from a thread of its own.
/// `loopback_only`: requests must name a loopback Host (see [`is_local_host`]).
pub fn serve(
    listener: TcpListener,
    handler: Arc<dyn Handler>,
    limits: Limits,
    loopback_only: bool,
) -> io::Result<Server> {
    let addr = listener.local_addr()?;
    let connections = Arc::new(AtomicUsize::new(0));
    let streams = Arc::new(AtomicUsize::new(0));
    std::thread::Builder::new().name("dashboard-accept".into()).spawn(move || {
        lower_priority();
        for stream in listener.incoming() {
            let stream = match stream {
                Ok(stream) => stream,
                // Out of descriptors or memory, or a connection reset before accept: wait a
                // little rather than spin, then go on.
                Err(_) => {
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
            };
            let Some(slot) = Slot::take(&connections, limits.max_connections) else {
                refuse_busy(stream);
                continue;
            };
            let (handler, limits, streams) = (handler.clone(), limits.clone(), streams.clone());
            let spawned =
                std::thread::Builder::new().name("dashboard-conn".into()).stack_size(256 * 1024).spawn(move || {
                    lower_priority();
                    let _slot = slot;
                    let _ = handle_connection(stream, handler.as_ref(), &limits, &streams, loopback_only);
                });
            // No thread to be had: the connection (moved into the closure) is dropped, closed.
            drop(spawned);
        }
    })?;
    Ok(Server { addr })
}

/// The dashboard's threads yield to training: nice 10 (Linux sets niceness per thread).
fn lower_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: changes this thread's scheduling priority only; no memory is touched.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, 10);
    }
}

/// Over the connection limit: a 503, written without waiting, and the connection closed.
fn refuse_busy(stream: TcpStream) {
    let _ = stream.set_nonblocking(true);
    let mut stream = stream;
    let _ = stream
        .write(b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nRetry-After: 2\r\nContent-Length: 0\r\n\r\n");
}

fn handle_connection(
    mut stream: TcpStream,
    handler: &dyn Handler,
    limits: &Limits,
    streams: &Arc<AtomicUsize>,
    loopback_only: bool,
) -> io::Result<()> {
    stream.set_nodelay(true)?;
    stream.set_write_timeout(Some(limits.write_timeout))?;
    let head = match read_head(&mut stream, limits) {
        Ok(head) => head,
        Err(Refusal::TooLarge) => {
            return write_response(&mut stream, &Response::text(431, "request header fields too large"), false);
        }
        Err(_) => return write_response(&mut stream, &Response::text(408, "request timeout"), false),
    };
    let request = match parse_head(&head, |host| !loopback_only || is_local_host(host)) {
        Ok(request) => request,
        Err(Refusal::Method) => {
            return write_response(
                &mut stream,
                &Response::text(405, "method not allowed: the dashboard is read-only (GET and HEAD only)"),
                false,
            );
        }
        Err(Refusal::Version) => {
            return write_response(&mut stream, &Response::text(505, "HTTP version not supported"), false);
        }
        Err(Refusal::BadRequest(why)) => {
            let status = if why.starts_with("this Host") { 403 } else { 400 };
            return write_response(&mut stream, &Response::text(status, why), false);
        }
        Err(Refusal::TooLarge) => {
            return write_response(&mut stream, &Response::text(431, "request header fields too large"), false);
        }
    };
    match handler.handle(&request) {
        Reply::Whole(response) => write_response(&mut stream, &response, request.head_only),
        Reply::Stream(run) => {
            let Some(_stream_slot) = Slot::take(streams, limits.max_streams) else {
                return write_response(
                    &mut stream,
                    &Response::text(503, "too many live pages are open; close one"),
                    false,
                );
            };
            stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\nConnection: close\r\n\r\n")?;
            if request.head_only {
                return Ok(());
            }
            run(&mut stream)
        }
    }
}

/// Reads up to the blank line that ends the head, within the size and time limits.
fn read_head(stream: &mut TcpStream, limits: &Limits) -> Result<Vec<u8>, Refusal> {
    let deadline = Instant::now() + limits.header_timeout;
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    loop {
        let left = deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or(Refusal::BadRequest("timeout"))?;
        stream.set_read_timeout(Some(left)).map_err(|_| Refusal::BadRequest("socket"))?;
        let n = stream.read(&mut chunk).map_err(|_| Refusal::BadRequest("timeout"))?;
        if n == 0 {
            return Err(Refusal::BadRequest("closed"));
        }
        let from = head.len().saturating_sub(3);
        head.extend_from_slice(&chunk[..n]);
        if let Some(end) = head[from..].windows(4).position(|w| w == b"\r\n\r\n") {
            let end = from + end;
            if end > limits.max_header_bytes {
                return Err(Refusal::TooLarge);
            }
            head.truncate(end);
            return Ok(head);
        }
        if head.len() > limits.max_header_bytes {
            return Err(Refusal::TooLarge);
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "Error",
    }
}

fn write_response(stream: &mut TcpStream, response: &Response, head_only: bool) -> io::Result<()> {
    let allow = if response.status == 405 { "Allow: GET, HEAD\r\n" } else { "" };
    let head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\nX-Frame-Options: DENY\r\nReferrer-Policy: no-referrer\r\nContent-Security-Policy: default-src 'self'; img-src 'self' data:; frame-ancestors 'none'\r\n{allow}Connection: close\r\n\r\n",
        response.status,
        reason(response.status),
        response.content_type,
        response.body.len()
    );
    stream.write_all(head.as_bytes())?;
    if !head_only {
        stream.write_all(&response.body)?;
    }
    stream.flush()?;
    // Nothing more is read: say so, so that the client sees the end of the response.
    let _ = stream.shutdown(std::net::Shutdown::Write);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(head: &str) -> Result<Request, Refusal> {
        parse_head(head.as_bytes(), is_local_host)
    }

    #[test]
    fn only_get_and_head_in_origin_form_are_accepted() {
        let r = parse("GET /api/metrics?run=0&arm=d%70o&from=3 HTTP/1.1\r\nHost: 127.0.0.1:8765").unwrap();
        assert_eq!(r.path, "/api/metrics");
        assert_eq!(r.param("arm"), Some("dpo"));
        assert_eq!(r.param("from"), Some("3"));
        assert!(parse("HEAD / HTTP/1.0").unwrap().head_only);
        for method in ["POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE", "get"] {
            assert_eq!(parse(&format!("{method} / HTTP/1.1")), Err(Refusal::Method), "{method}");
        }
        assert_eq!(parse("GET / HTTP/2.0"), Err(Refusal::Version));
        for target in ["http://127.0.0.1/etc/passwd", "*", "//etc/passwd", "etc/passwd", ""] {
            assert!(matches!(parse(&format!("GET {target} HTTP/1.1")), Err(Refusal::BadRequest(_))), "{target}");
        }
        assert!(matches!(parse("GET /?a=%zz HTTP/1.1"), Err(Refusal::BadRequest(_))));
        assert!(matches!(parse("GET / HTTP/1.1 extra"), Err(Refusal::BadRequest(_))));
        // The path is never decoded: "%2e%2e" stays as sent and matches no route.
        assert_eq!(parse("GET /%2e%2e/%2e%2e/etc/passwd HTTP/1.1").unwrap().path, "/%2e%2e/%2e%2e/etc/passwd");
    }

    #[test]
    fn hosts_other_than_loopback_literals_are_refused() {
        for ok in ["127.0.0.1:8765", "localhost:9000", "LOCALHOST", "[::1]:8765", "127.0.0.2", "[::1]"] {
            assert!(is_local_host(ok), "{ok}");
        }
        for bad in [
            "evil.example:8765",
            "evil.example",
            "10.0.0.1:80",
            "[::1]x",
            "127.0.0.1.evil.example:80",
            "localhost.evil:1",
        ] {
            assert!(!is_local_host(bad), "{bad}");
        }
        assert!(matches!(parse("GET / HTTP/1.1\r\nHost: evil.example:8765"), Err(Refusal::BadRequest(_))));
        assert!(matches!(parse("GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: 127.0.0.1"), Err(Refusal::BadRequest(_))));
    }
}
