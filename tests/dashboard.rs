//! The live page (`host run --dashboard`, `host dashboard RUN_DIR...`): in headless Chromium
//! it follows a running run and marks a reload within a few steps, and shows finished runs
//! and a comparison side by side; bad input is refused clearly; the server reads nothing
//! outside its run folders and changes nothing; hostile or vanishing clients never hold up
//! training.

mod common;
use common::*;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

// ---------------------------------------------------------------- processes and HTTP

/// A `host` process whose output is collected (so it never blocks on a full pipe), killed
/// when the test ends.
struct Host {
    child: Child,
    output: Arc<Mutex<String>>,
}

impl Host {
    fn start(args: &[&str]) -> Self {
        let mut child = host().args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("host starts");
        let output = Arc::new(Mutex::new(String::new()));
        for stream in
            [Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>, Box::new(child.stderr.take().unwrap())]
        {
            let output = output.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    output.lock().unwrap().push_str(&(line + "\n"));
                }
            });
        }
        Self { child, output }
    }

    fn output(&self) -> String {
        self.output.lock().unwrap().clone()
    }

    /// The address of the URL the dashboard printed.
    fn dashboard_addr(&mut self) -> SocketAddr {
        let start = Instant::now();
        loop {
            let out = self.output();
            if let Some(at) = out.find("http://") {
                let rest = &out[at + 7..];
                let addr = &rest[..rest.find('/').unwrap()];
                return addr.parse().unwrap_or_else(|e| panic!("{addr}: {e}"));
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("host ended ({status}) without a dashboard URL:\n{out}");
            }
            assert!(start.elapsed() < Duration::from_secs(120), "no dashboard URL printed:\n{out}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn wait(mut self) -> (std::process::ExitStatus, String) {
        let status = self.child.wait().unwrap();
        std::thread::sleep(Duration::from_millis(100));
        (status, self.output())
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends `request` as it is and returns the whole answer (the server closes after one).
fn raw(addr: SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    stream.write_all(request).unwrap();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

/// GET `target`: (status, body).
fn get(addr: SocketAddr, target: &str) -> (u16, String) {
    let answer = raw(addr, format!("GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\n\r\n", addr.port()).as_bytes());
    split(&answer)
}

fn split(answer: &str) -> (u16, String) {
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {answer:?}"));
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_string();
    (status, body)
}

fn get_json(addr: SocketAddr, target: &str) -> Value {
    let (status, body) = get(addr, target);
    assert_eq!(status, 200, "{target}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{target}: {e}: {body}"))
}

fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn last_step(run_dir: &Path) -> u64 {
    loss_lines(run_dir).iter().filter_map(|l| l["step"].as_u64()).max().unwrap_or(0)
}

/// Where the tests leave screenshots: target/test-artifacts/.
fn artifact(name: &str) -> PathBuf {
    let dir = repo().join("target").join("test-artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

// ---------------------------------------------------------------- WebDriver

/// Headless Chromium driven through chromedriver's WebDriver HTTP API.
struct Browser {
    driver: Child,
    port: u16,
    session: String,
    _profile: tempfile::TempDir,
}

impl Browser {
    fn open(browser: &str, driver: &str) -> Self {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let driver = std::process::Command::new(driver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let profile = tempfile::tempdir().unwrap();
        let mut me = Self { driver, port, session: String::new(), _profile: profile };
        wait_for("chromedriver", Duration::from_secs(30), || {
            me.call("GET", "/status", None).is_some_and(|v| v["ready"] == true)
        });
        let caps = json!({"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {"binary": browser_path(browser), "args": [
            "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
            format!("--user-data-dir={}", me._profile.path().display()), "--window-size=1400,1000",
        ]}}}});
        let created = me.call("POST", "/session", Some(caps)).expect("a WebDriver session");
        me.session = created["sessionId"].as_str().unwrap_or_else(|| panic!("no session: {created}")).to_string();
        me
    }

    /// One WebDriver command; its `value`, or None when chromedriver is not answering.
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Option<Value> {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).ok()?;
        // chromedriver keeps the connection open: read the head, then Content-Length bytes.
        let mut answer = Vec::new();
        let mut byte = [0u8; 1];
        while !answer.ends_with(b"\r\n\r\n") {
            if stream.read(&mut byte).ok()? == 0 {
                return None;
            }
            answer.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&answer).to_ascii_lowercase();
        let length: usize =
            head.lines().find_map(|l| l.strip_prefix("content-length:")).and_then(|v| v.trim().parse().ok())?;
        let mut body = vec![0u8; length];
        stream.read_exact(&mut body).ok()?;
        let value: Value = serde_json::from_slice(&body).ok()?;
        Some(value["value"].clone())
    }

    fn session_call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let value = self
            .call(method, &format!("/session/{}{path}", self.session), body)
            .unwrap_or_else(|| panic!("WebDriver {path}: no answer"));
        if let Some(error) = value.get("error") {
            panic!("WebDriver {path}: {error}: {}", value["message"]);
        }
        value
    }

    fn goto(&self, url: &str) {
        self.session_call("POST", "/url", Some(json!({"url": url})));
    }

    fn resize(&self, width: u32, height: u32) {
        self.session_call("POST", "/window/rect", Some(json!({"width": width, "height": height})));
    }

    /// Runs `script` (a function body) in the page and returns what it returns.
    fn js(&self, script: &str) -> Value {
        self.session_call("POST", "/execute/sync", Some(json!({"script": script, "args": []})))
    }

    /// Polls `script` until it returns true.
    fn wait_js(&self, what: &str, limit: Duration, script: &str) {
        wait_for(what, limit, || self.js(script) == Value::Bool(true));
    }

    /// Saves a PNG screenshot of the window to `path`.
    fn screenshot(&self, path: &Path) {
        let data = self.session_call("GET", "/screenshot", None);
        let png = base64_decode(data.as_str().expect("base64 PNG"));
        assert!(png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000, "a screenshot of a drawn page");
        std::fs::write(path, png).unwrap();
        println!("screenshot: {}", path.display());
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = self.call("DELETE", &format!("/session/{}", self.session), None);
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// The browser's full path (chromedriver wants a binary path).
fn browser_path(browser: &str) -> String {
    if browser.contains('/') {
        return browser.to_string();
    }
    let out = std::process::Command::new("sh").args(["-c", &format!("command -v {browser}")]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn base64_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let clean: Vec<u8> = text.bytes().filter(|c| !c.is_ascii_whitespace() && *c != b'=').collect();
    let mut out = Vec::with_capacity(clean.len() * 3 / 4);
    for chunk in clean.chunks(4) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, &c)| n | (value(c) as u32) << (18 - 6 * i));
        out.extend_from_slice(&n.to_be_bytes()[1..chunk.len()]);
    }
    out
}

// ---------------------------------------------------------------- scripts

fn dpo_script(body: &str, extra: &str) -> String {
    format!(
        "import \"losses/dpo\" as dpo;\n\nfn loss(batch, params) {{\n{body}\n}}\n\ntrain({});\n",
        small_config(&format!("params: #{{ beta: 0.1 }}, {extra}"))
    )
}

/// The number the page's JS expression gives, as u64.
fn page_number(browser: &Browser, expr: &str) -> u64 {
    browser.js(&format!("return Number({expr}) || 0;")).as_u64().unwrap_or(0)
}

// ---------------------------------------------------------------- the browser tests

#[test]
fn the_live_page_follows_a_run_and_marks_reloads_with_their_diff() {
    let Some((chromium, driver)) = chromium_with_driver() else { return };
    let sb = Sandbox::new();
    let good = dpo_script("    dpo::loss(batch, params)", "max_steps: 4000,");
    let script = sb.write("scripts/exp.rhai", &good);
    let run_dir = sb.path("run");
    let mut run =
        Host::start(&["run", script.to_str().unwrap(), "--run-dir", run_dir.to_str().unwrap(), "--dashboard", "0"]);
    let addr = run.dashboard_addr();
    assert!(
        addr.ip().is_loopback() && !run.output().contains("warning"),
        "a port alone is served on 127.0.0.1, without a warning: {}",
        run.output()
    );
    let browser = Browser::open(&chromium, &driver);
    browser.goto(&format!("http://{addr}/"));

    // The loss chart fills while the run trains.
    browser.wait_js("the loss chart's first points", Duration::from_secs(240), "const c = document.querySelector('section.chart[data-metric=\"loss\"]'); return !!c && Number(c.dataset.points) >= 3;");
    assert_eq!(browser.js("return document.body.dataset.live;"), "1", "the page is connected to the event stream");
    let shown = page_number(&browser, "document.querySelector('section.chart[data-metric=\"loss\"]').dataset.points");
    wait_for("more points on the page", Duration::from_secs(120), || {
        page_number(&browser, "document.querySelector('section.chart[data-metric=\"loss\"]').dataset.points") > shown
    });

    // An edit: a reload marker appears on every chart within a few steps.
    sb.write(
        "scripts/exp.rhai",
        &dpo_script(
            "    let out = dpo::loss(batch, params);\n    out.metrics = #{ edited: 1.0 };\n    out",
            "max_steps: 4000,",
        ),
    );
    browser.wait_js(
        "a reload marker",
        Duration::from_secs(120),
        "return document.querySelectorAll('.marker[data-event=\"reload\"]').length > 0;",
    );
    let page_step = last_step(&run_dir);
    let reload_step = read_lines(&run_dir.join("metrics.jsonl"))
        .iter()
        .find(|l| l["event"] == "reload")
        .expect("a reload event")["step"]
        .as_u64()
        .unwrap();
    println!("the reload marker was on the page {} step(s) after the reload", page_step.saturating_sub(reload_step));
    assert!(page_step <= reload_step + 25, "the marker came {} steps after the reload", page_step - reload_step);
    let counts = browser.js("const all = [...document.querySelectorAll('section.chart')]; return [all.length, all.filter(c => c.querySelector('.marker[data-event=\"reload\"]')).length];");
    let (charts, marked) = (counts[0].as_u64().unwrap(), counts[1].as_u64().unwrap());
    assert!(charts >= 10 && marked == charts, "the marker is on every chart ({marked} of {charts})");
    browser.wait_js(
        "the script's new metric",
        Duration::from_secs(60),
        "return !!document.querySelector('section.chart[data-metric=\"edited\"]');",
    );

    // A click on the marker shows that version's diff against the one before.
    browser.js("document.querySelector('.marker[data-event=\"reload\"]').dispatchEvent(new MouseEvent('click', {bubbles: true})); return true;");
    browser.wait_js(
        "the reload's diff",
        Duration::from_secs(30),
        "return document.getElementById('diff').dataset.state === 'loaded';",
    );
    let diff = browser.js("return document.getElementById('diff-body').innerText;").as_str().unwrap().to_string();
    assert!(
        diff.contains("+    out.metrics = #{ edited: 1.0 };") && diff.contains("-    dpo::loss(batch, params)"),
        "{diff}"
    );
    assert!(diff.contains("scripts/exp.rhai") || diff.contains("exp.rhai"), "{diff}");
    browser.screenshot(&artifact("dashboard-live-diff.png"));
    browser.js("document.getElementById('diff-close').click(); return true;");

    // A broken edit: a reload_failed marker, whose click shows the error and the rejected edit.
    sb.write("scripts/exp.rhai", &dpo_script("    let out = dpo::loss(batch params);\n    out", "max_steps: 4000,"));
    browser.wait_js(
        "a reload_failed marker",
        Duration::from_secs(120),
        "return document.querySelectorAll('.marker[data-event=\"reload_failed\"]').length > 0;",
    );
    browser.js("document.querySelector('.marker[data-event=\"reload_failed\"]').dispatchEvent(new MouseEvent('click', {bubbles: true})); return true;");
    browser.wait_js(
        "the rejected edit's diff",
        Duration::from_secs(30),
        "return document.getElementById('diff').dataset.state === 'loaded';",
    );
    let diff = browser.js("return document.getElementById('diff-body').innerText;").as_str().unwrap().to_string();
    assert!(
        diff.contains("exp.rhai:")
            && diff.contains("+    let out = dpo::loss(batch params);")
            && diff.contains("rejected edit"),
        "{diff}"
    );
    browser.js("document.getElementById('diff-close').click(); return true;");

    // The page as it looks while training (the artifact).
    browser.resize(1400, 1500);
    std::thread::sleep(Duration::from_millis(800));
    browser.screenshot(&artifact("dashboard-live.png"));
    assert!(run.child.try_wait().unwrap().is_none(), "the run must still be training:\n{}", run.output());
    assert!(run.output().contains(&format!("dashboard: http://{addr}/")), "{}", run.output());
}

#[test]
fn finished_runs_and_a_comparison_show_side_by_side() {
    let Some((chromium, driver)) = chromium_with_driver() else { return };
    let sb = Sandbox::new();
    // A comparison of two arms, with a held-out evaluation before and after.
    let compare = format!(
        "import \"losses/dpo\" as dpo;\nimport \"losses/dpop\" as dpop;\n\nfn dpo_loss(b, p) {{ dpo::loss(b, p) }}\nfn dpop_loss(b, p) {{ dpop::loss(b, p) }}\n\ntrain({});\n",
        small_config(
            "max_steps: 6, params: #{ beta: 0.1 }, heldout: #{ data: \"data/arithmetic/eval.jsonl\", rows: 4, max_new_tokens: 8 }, compare: [#{ name: \"dpo\", loss: \"dpo_loss\" }, #{ name: \"dpop\", loss: \"dpop_loss\", params: #{ lambda: 50.0 } }],"
        )
    );
    let compare_script = sb.write("scripts/cmp.rhai", &compare);
    let plain_script = sb.write("scripts/plain.rhai", &dpo_script("    dpo::loss(batch, params)", "max_steps: 6,"));
    let (cmp_dir, plain_dir) = (sb.path("cmp"), sb.path("plain"));
    for (script, dir) in [(&compare_script, &cmp_dir), (&plain_script, &plain_dir)] {
        let out = run_host(&["run", script.to_str().unwrap(), "--no-watch", "--run-dir", dir.to_str().unwrap()]);
        assert!(out.status.success(), "{}", text(&out));
    }
    let mut page =
        Host::start(&["dashboard", cmp_dir.to_str().unwrap(), plain_dir.to_str().unwrap(), "--addr", "127.0.0.1:0"]);
    let addr = page.dashboard_addr();
    let browser = Browser::open(&chromium, &driver);
    browser.resize(1400, 1500);
    browser.goto(&format!("http://{addr}/"));
    // Both arms and the plain run in one loss chart.
    browser.wait_js("three series in the loss chart", Duration::from_secs(60), "const c = document.querySelector('section.chart[data-metric=\"loss\"]'); return !!c && c.dataset.series === '3' && Number(c.dataset.points) === 18;");
    for metric in [
        "rewards/margins",
        "logps/chosen_minus_ref",
        "diagnostics/token_delta_after_diff",
        "grad_norm",
        "learning_rate",
    ] {
        let series = browser.js(&format!("const c = document.querySelector('section.chart[data-metric=\"{metric}\"]'); return c ? c.dataset.series : null;"));
        assert_eq!(series, "3", "{metric}");
    }
    // Finished, with full progress, config, and the held-out table (before, and after per arm).
    let statuses = browser.js("return [...document.querySelectorAll('.card')].map(c => c.dataset.status);");
    assert_eq!(statuses, json!(["finished", "finished"]));
    let progress = browser.js("return [...document.querySelectorAll('.card .progress .row')].map(r => r.innerText.replace(/\\s+/g, ' ').trim());");
    assert_eq!(progress, json!(["dpo 6 / 6", "dpop 6 / 6", "steps 6 / 6"]), "{progress}");
    assert_eq!(page_number(&browser, "document.querySelectorAll('.card details.config').length"), 2);
    let config = browser
        .js("return document.querySelector('.card details.config pre').textContent;")
        .as_str()
        .unwrap()
        .to_string();
    assert!(config.contains("\"compare\"") && config.contains("dpop_loss"), "{config}");
    let evals = browser.js(
        "return [...document.querySelectorAll('#evals tr[data-source]')].map(r => [...r.cells].map(c => c.innerText));",
    );
    let rows = evals.as_array().unwrap();
    assert_eq!(rows.len(), 2, "{evals}");
    for row in rows {
        assert!(row[1].as_str().unwrap().contains("/4)") && row[2].as_str().unwrap().contains("/4)"), "{evals}");
    }
    browser.screenshot(&artifact("dashboard-finished.png"));
    assert!(page.child.try_wait().unwrap().is_none(), "{}", page.output());
}

// ---------------------------------------------------------------- host diff reports

/// A `host diff` report: tiny-math against itself after 4 DPO steps, on 12 pairs.
fn diff_report(sb: &Sandbox) -> PathBuf {
    let trained = trained_tiny_model(sb);
    let data = arithmetic_pairs(sb, 12);
    let report = sb.path("diff.json");
    let base = repo().join("models/tiny-math");
    let out = host_diff(&base, &trained, &data, &report, 7);
    assert!(out.status.success(), "{}", text(&out));
    report
}

#[test]
fn diff_reports_are_checked_served_and_shown_as_a_card() {
    let sb = Sandbox::new();
    let report_path = diff_report(&sb);
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&report_path).unwrap()).unwrap();
    // A copy whose context is markup: the page must show it as text.
    let mut hostile = report.clone();
    hostile["largest"][0]["context"] = json!("<b id=\"injected\">bold</b>");
    let hostile_path = sb.write("hostile.json", &hostile.to_string());

    // Files that are not reports are refused, naming the file.
    let run_dir = sb.path("run");
    for (name, body, why) in [
        ("other.json", "{\"model_a\": \"x\", \"rows\": 3}", "not a host diff report"),
        ("metrics.json", "[1, 2]", "not a host diff report"),
        ("broken.json", "{\"model_a\": ", "not JSON"),
    ] {
        let bad = sb.write(name, body);
        let out = run_host(&[
            "dashboard",
            run_dir.to_str().unwrap(),
            "--diff",
            report_path.to_str().unwrap(),
            "--diff",
            bad.to_str().unwrap(),
            "--addr",
            "127.0.0.1:0",
        ]);
        assert!(!out.status.success());
        assert!(text(&out).contains(&format!("{}: {why}", bad.display())), "{}", text(&out));
    }
    let missing = sb.path("missing.json");
    let out = run_host(&["dashboard", "--diff", missing.to_str().unwrap(), "--addr", "127.0.0.1:0"]);
    assert!(!out.status.success() && text(&out).contains(&missing.display().to_string()), "{}", text(&out));
    let out = run_host(&["dashboard", "--addr", "127.0.0.1:0"]);
    assert!(!out.status.success(), "{}", text(&out));

    // Reports alone (no run folder) are served by one fixed route, as checked at start.
    let mut page = Host::start(&[
        "dashboard",
        "--diff",
        report_path.to_str().unwrap(),
        "--diff",
        hostile_path.to_str().unwrap(),
        "--addr",
        "127.0.0.1:0",
    ]);
    let addr = page.dashboard_addr();
    let served = get_json(addr, "/api/model-diffs");
    let reports = served["reports"].as_array().unwrap();
    assert_eq!(reports.len(), 2);
    assert_eq!(reports[0]["by_position"], report["by_position"]);
    assert_eq!(reports[0]["largest"], report["largest"]);
    assert!(reports[0].get("per_row").is_none(), "per_row is not served");
    // Whatever the client adds, the route serves those reports and nothing else.
    let secret = sb.write("secret.json", "{\"secret\": 1}");
    for target in
        [format!("/api/model-diffs?path={}", secret.display()), "/api/model-diffs?report=../secret.json".to_string()]
    {
        assert_eq!(get_json(addr, &target), served, "{target}");
    }
    for target in ["/api/model-diffs/0", "/api/model-diffs/../../secret.json", "/diff.json", "/api/model-diffs.json"] {
        let (status, body) = get(addr, target);
        assert_eq!(status, 404, "{target}: {body}");
        assert!(!body.contains("secret"), "{target}: {body}");
    }

    let Some((chromium, driver)) = chromium_with_driver() else { return };
    let browser = Browser::open(&chromium, &driver);
    browser.resize(1400, 1600);
    browser.goto(&format!("http://{addr}/"));
    browser.wait_js(
        "two diff cards",
        Duration::from_secs(60),
        "return document.querySelectorAll('#model-diffs .card.model-diff').length === 2;",
    );
    let card = "document.querySelector('#model-diffs .card[data-report=\"0\"]')";
    let rows = page_number(&browser, &format!("{card}.querySelectorAll('table.by-offset tr[data-offset]').length"));
    assert_eq!(rows as usize, report["by_position"].as_array().unwrap().len());
    assert_eq!(rows, 15, "earlier, -4..=8, later");
    let bars = page_number(&browser, &format!("{card}.querySelectorAll('.offset-chart svg rect').length"));
    assert!(bars > 0, "the bar chart is drawn");
    let top = browser.js(&format!("const r = {card}.querySelectorAll('table.largest tr')[1]; return [r.querySelector('.token').textContent, r.querySelector('.before').textContent, r.cells[0].textContent];"));
    let first = &report["largest"][0];
    assert_eq!(top, json!([first["token"], first["context"], first["line"].to_string()]), "{top}");
    let largest = page_number(&browser, &format!("{card}.querySelectorAll('table.largest tr').length - 1"));
    assert_eq!(largest, 7);
    let head = browser.js(&format!("return {card}.innerText;"));
    let head = head.as_str().unwrap();
    for want in
        [report["model_a"].as_str().unwrap(), report["model_b"].as_str().unwrap(), report["data"].as_str().unwrap()]
    {
        assert!(head.contains(want), "{want} in {head}");
    }
    // The markup in the hostile copy is text on the page, not an element.
    let hostile_shown = browser.js("const c = document.querySelector('#model-diffs .card[data-report=\"1\"] table.largest tr:nth-child(2) .before'); return [c.textContent, document.querySelectorAll('#injected').length];");
    assert_eq!(hostile_shown, json!(["<b id=\"injected\">bold</b>", 0]));
    browser.screenshot(&artifact("dashboard-model-diff.png"));
    assert!(page.child.try_wait().unwrap().is_none(), "{}", page.output());
}

// ---------------------------------------------------------------- bad input

/// A run folder as the trainer leaves it, written by hand: run.json, metrics, config and
/// two script versions.
fn fake_run(dir: &Path) {
    std::fs::create_dir_all(dir.join("sources/step-000000/scripts")).unwrap();
    std::fs::create_dir_all(dir.join("sources/step-000005/scripts")).unwrap();
    std::fs::write(dir.join("run.json"), "{\"script\": \"scripts/exp.rhai\"}\n").unwrap();
    std::fs::write(
        dir.join("train_config.json"),
        "{\"step\": 0, \"arm\": null, \"total_steps\": 10, \"config\": {\"model\": \"m\", \"max_steps\": 10}}",
    )
    .unwrap();
    std::fs::write(dir.join("sources/step-000000/scripts/exp.rhai"), "fn loss(b, p) {\n    a\n}\n").unwrap();
    std::fs::write(dir.join("sources/step-000005/scripts/exp.rhai"), "fn loss(b, p) {\n    b\n}\n").unwrap();
    let mut lines = String::new();
    for step in 1..=10 {
        lines.push_str(&format!("{{\"step\":{step},\"epoch\":0.1,\"loss\":{}}}\n", 1.0 / step as f64));
        if step == 5 {
            lines.push_str("{\"step\":5,\"event\":\"reload\",\"files\":[\"scripts/exp.rhai\"]}\n");
        }
    }
    std::fs::write(dir.join("metrics.jsonl"), lines).unwrap();
}

#[test]
fn bad_input_is_refused_with_clear_errors() {
    let sb = Sandbox::new();
    let run_dir = sb.path("run");
    fake_run(&run_dir);

    // A port in use: `host dashboard` and `host run --dashboard` both say so, and the run
    // writes nothing.
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let out = run_host(&["dashboard", run_dir.to_str().unwrap(), "--addr", &format!("127.0.0.1:{port}")]);
    assert!(!out.status.success());
    assert!(text(&out).contains(&format!("127.0.0.1:{port} is in use")), "{}", text(&out));
    let script = sb.write("scripts/exp.rhai", &dpo_script("    dpo::loss(batch, params)", "max_steps: 3,"));
    let new_dir = sb.path("never");
    let out = run_host(&[
        "run",
        script.to_str().unwrap(),
        "--run-dir",
        new_dir.to_str().unwrap(),
        "--dashboard",
        &port.to_string(),
    ]);
    assert!(!out.status.success());
    assert!(text(&out).contains(&format!("127.0.0.1:{port} is in use")), "{}", text(&out));
    assert!(!new_dir.exists(), "nothing is written when the page cannot be served");
    drop(taken);

    // Folders that are not run folders are named.
    let plain = sb.path("scripts");
    let out = run_host(&["dashboard", run_dir.to_str().unwrap(), plain.to_str().unwrap(), "--addr", "127.0.0.1:0"]);
    assert!(!out.status.success());
    assert!(text(&out).contains(&format!("{}: not a prefhost run folder", plain.display())), "{}", text(&out));
    let missing = sb.path("no-such-run");
    let out = run_host(&["dashboard", missing.to_str().unwrap(), "--addr", "127.0.0.1:0"]);
    assert!(text(&out).contains(&format!("{}: no such run folder", missing.display())), "{}", text(&out));
    // A malformed address, and --dashboard that took the script for its address.
    let out = run_host(&["dashboard", run_dir.to_str().unwrap(), "--addr", "nowhere:port"]);
    assert!(!out.status.success() && text(&out).contains("dashboard address"), "{}", text(&out));
    let out = run_host(&["run", "--dashboard", script.to_str().unwrap()]);
    assert!(!out.status.success() && text(&out).contains("put --dashboard after the script"), "{}", text(&out));
}

// ---------------------------------------------------------------- security

/// Every file under `dir` (symlinks not followed): path → (bytes, modification time).
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>, Option<std::time::SystemTime>)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let meta = std::fs::symlink_metadata(entry.path()).unwrap();
        if meta.is_dir() {
            found.extend(snapshot(&entry.path()));
        } else if meta.is_symlink() {
            found.push((
                entry.path(),
                std::fs::read_link(entry.path()).unwrap().into_os_string().into_encoded_bytes(),
                None,
            ));
        } else {
            found.push((entry.path(), std::fs::read(entry.path()).unwrap(), meta.modified().ok()));
        }
    }
    found.sort();
    found
}

#[test]
fn nothing_outside_the_run_folders_is_served_and_nothing_changes() {
    let sb = Sandbox::new();
    let run_dir = sb.path("run");
    fake_run(&run_dir);
    // Beside the run folder: secrets, and a run folder that must not be reached from it.
    const SECRET: &str = "TOP-SECRET-0451";
    let outside = sb.path("outside");
    std::fs::create_dir_all(outside.join("step-000009/scripts")).unwrap();
    std::fs::write(outside.join("secret.txt"), SECRET).unwrap();
    std::fs::write(outside.join("step-000009/scripts/exp.rhai"), SECRET).unwrap();
    fake_run(&outside.join("other-run"));
    std::fs::write(
        outside.join("other-run/metrics.jsonl"),
        format!("{{\"step\":1,\"loss\":1.0,\"secret\":\"{SECRET}\"}}\n"),
    )
    .unwrap();
    // Symlinks out of the run folder, at each place the server reads.
    let link = |target: &Path, at: &str| std::os::unix::fs::symlink(target, run_dir.join(at)).unwrap();
    link(&outside.join("secret.txt"), "results.json");
    link(&outside.join("secret.txt"), "memory.json");
    link(&outside.join("secret.txt"), "sources/step-000005/scripts/plugin.rhai");
    link(&outside.join("step-000009"), "sources/step-000009");
    link(&outside.join("other-run"), "armx");
    std::os::unix::fs::symlink(&outside, run_dir.join("rejected_sources")).unwrap();
    let (before_run, before_outside) = (snapshot(&run_dir), snapshot(&outside));

    let mut page = Host::start(&["dashboard", run_dir.to_str().unwrap(), "--addr", "127.0.0.1:0"]);
    let addr = page.dashboard_addr();
    let abs = outside.join("secret.txt").display().to_string();
    let targets = [
        "/../../../../etc/passwd".to_string(),
        "/%2e%2e/%2e%2e/%2e%2e/etc/passwd".into(),
        "/%2E%2E%2F%2E%2E%2Fetc%2Fpasswd".into(),
        "/..%2f..%2fetc%2fpasswd".into(),
        "//etc/passwd".into(),
        "/etc/passwd".into(),
        abs.clone(),
        format!("/{abs}"),
        "/app.js/../../Cargo.toml".into(),
        "/./metrics.jsonl".into(),
        "/metrics.jsonl".into(),
        "/run.json".into(),
        "/sources/step-000000/scripts/exp.rhai".into(),
        "/api/metrics?run=0&source=..".into(),
        "/api/metrics?run=0&source=%2e%2e".into(),
        "/api/metrics?run=0&source=..%2foutside%2fother-run".into(),
        format!("/api/metrics?run=0&source={abs}"),
        "/api/metrics?run=0&source=armx".into(),
        "/api/metrics?run=1".into(),
        "/api/metrics?run=-1".into(),
        "/api/info?run=0".into(),
        "/api/info?run=%2e%2e".into(),
        "/api/diff?run=0&source=&event=reload&step=9".into(),
        "/api/diff?run=0&source=&event=reload&step=5".into(),
        "/api/diff?run=0&source=&event=reload_failed&step=9".into(),
        "/api/diff?run=0&source=&event=reload&step=..%2f..%2fetc".into(),
        "/api/diff?run=0&source=armx&event=reload&step=5".into(),
        "/api/diff?run=0&source=&event=..%2fsecret&step=5".into(),
    ];
    for target in &targets {
        let (status, body) = get(addr, target);
        assert!(!body.contains(SECRET) && !body.contains("root:x:0:0"), "{target} leaked: {body}");
        assert!(matches!(status, 200 | 400 | 404), "{target}: {status}");
    }
    // Absolute-form targets are refused, whatever they name.
    for target in ["http://127.0.0.1/etc/passwd", "file:///etc/passwd", "*"] {
        let answer = raw(addr, format!("GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").as_bytes());
        assert_eq!(split(&answer).0, 400, "{target}: {answer}");
    }
    // What is served: the run's own lines, its versions (the symlinked one left out), no arms.
    let info = get_json(addr, "/api/info?run=0");
    assert_eq!(info["sources"].as_array().unwrap().len(), 1, "{info}");
    assert_eq!(info["sources"][0]["versions"], json!([0, 5]), "{info}");
    assert_eq!(info["results"], Value::Null);
    let metrics = get_json(addr, "/api/metrics?run=0&source=");
    assert_eq!(metrics["lines"].as_array().unwrap().len(), 11);
    let diff = get_json(addr, "/api/diff?run=0&source=&event=reload&step=5");
    assert_eq!(diff["files"].as_array().unwrap().len(), 1, "the symlinked plugin is not listed: {diff}");
    assert_eq!(diff["files"][0]["diff"], "@@ -1,3 +1,3 @@\n fn loss(b, p) {\n-    a\n+    b\n }\n");

    // Only GET and HEAD; every other method is 405, on every route.
    for method in ["POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT", "PROPFIND"] {
        for target in ["/", "/api/info?run=0", "/api/metrics?run=0", "/api/stream"] {
            let answer = raw(
                addr,
                format!("{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\n\r\nhello").as_bytes(),
            );
            assert_eq!(split(&answer).0, 405, "{method} {target}: {answer}");
            assert!(answer.contains("Allow: GET, HEAD"), "{answer}");
        }
    }
    let head = raw(addr, b"HEAD /api/info?run=0 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
    assert!(head.starts_with("HTTP/1.1 200") && head.ends_with("\r\n\r\n"), "HEAD answers headers only: {head}");
    // A page elsewhere cannot reach it by a name that resolves to 127.0.0.1 (DNS rebinding).
    let answer = raw(addr, b"GET /api/info?run=0 HTTP/1.1\r\nHost: attacker.example:8765\r\n\r\n");
    assert_eq!(split(&answer).0, 403, "{answer}");
    let answer = raw(addr, format!("GET / HTTP/1.1\r\nHost: localhost:{}\r\n\r\n", addr.port() + 1).as_bytes());
    assert_eq!(split(&answer).0, 200, "any port: an ssh tunnel's local port may differ");
    // The page itself comes from the binary and allows nothing from elsewhere.
    let page_html = raw(addr, b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
    assert!(
        page_html.contains("Content-Security-Policy: default-src 'self'") && !page_html.contains("https://"),
        "{page_html}"
    );
    let (_, js) = get(addr, "/app.js");
    assert!(!js.contains("https://") && !js.contains("method: 'POST'"), "the page loads nothing from elsewhere");

    assert_eq!(snapshot(&run_dir), before_run, "the run folder is unchanged");
    assert_eq!(snapshot(&outside), before_outside);
    assert!(page.child.try_wait().unwrap().is_none(), "{}", page.output());
}

#[test]
fn garbage_in_run_folder_files_never_breaks_the_server() {
    let sb = Sandbox::new();
    let run_dir = sb.path("run");
    fake_run(&run_dir);
    let mut rng = prefhost::rng::SplitMix64::new(11);
    let mut junk = |n: usize| (0..n).map(|_| (rng.next_u64() & 0xff) as u8).collect::<Vec<u8>>();
    let mut lines = std::fs::read(run_dir.join("metrics.jsonl")).unwrap();
    lines.extend(junk(3000));
    lines.extend(
        b"\n[1,2]\n\"text\"\n{\"step\": \"x\", \"loss\": null}\n{\"event\": 5}\n{\"step\":11,\"loss\":1e308}\n",
    );
    std::fs::write(run_dir.join("metrics.jsonl"), lines).unwrap();
    std::fs::write(run_dir.join("train_config.json"), junk(500)).unwrap();
    std::fs::write(run_dir.join("results.json"), "{\"arms\": 7").unwrap();
    std::fs::write(run_dir.join("run.lock"), junk(40)).unwrap();
    std::fs::create_dir_all(run_dir.join("sources/step-notanumber")).unwrap();
    std::fs::write(run_dir.join("sources/step-000005/scripts/bin.rhai"), junk(2000)).unwrap();
    // A FIFO where a file is expected is never waited on.
    let fifo = std::ffi::CString::new(run_dir.join("memory.json").to_str().unwrap()).unwrap();
    // SAFETY: a path string that outlives the call.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);

    let mut page = Host::start(&["dashboard", run_dir.to_str().unwrap(), "--addr", "127.0.0.1:0"]);
    let addr = page.dashboard_addr();
    let info = get_json(addr, "/api/info?run=0");
    assert_eq!(info["kind"], "run");
    assert_eq!(info["running"], false, "a malformed lock is not a live run");
    let metrics = get_json(addr, "/api/metrics?run=0&source=");
    assert!(metrics["lines"].as_array().unwrap().len() >= 11, "{metrics}");
    get_json(addr, "/api/diff?run=0&source=&event=reload&step=5");
    get_json(addr, "/api/diff?run=0&source=&event=loss_failed&step=7");
    assert!(page.child.try_wait().unwrap().is_none(), "{}", page.output());
}

#[test]
fn an_address_beyond_loopback_is_served_with_a_warning() {
    let sb = Sandbox::new();
    let run_dir = sb.path("run");
    fake_run(&run_dir);
    let mut page = Host::start(&["dashboard", run_dir.to_str().unwrap(), "--addr", "0.0.0.0:0"]);
    let addr = page.dashboard_addr();
    wait_for("the warning", Duration::from_secs(10), || page.output().contains("anyone who can reach"));
    assert!(page.output().contains("ssh -L"), "{}", page.output());
    // Asked for by another name (the machine's), it answers: the user chose to share it.
    let answer = raw(addr, b"GET /api/runs HTTP/1.1\r\nHost: gpu-box.example:8765\r\n\r\n");
    assert_eq!(split(&answer).0, 200, "{answer}");
}

// ---------------------------------------------------------------- training is never held up

/// The process's threads (Linux).
fn threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task")).map(|d| d.count()).unwrap_or(0)
}

#[test]
fn hostile_clients_cannot_stall_training() {
    let sb = Sandbox::new();
    let script = sb.write("scripts/exp.rhai", &dpo_script("    dpo::loss(batch, params)", "max_steps: 4000,"));
    let run_dir = sb.path("run");
    let mut run = Host::start(&[
        "run",
        script.to_str().unwrap(),
        "--no-watch",
        "--run-dir",
        run_dir.to_str().unwrap(),
        "--dashboard",
        "127.0.0.1:0",
    ]);
    let addr = run.dashboard_addr();
    wait_for("first steps", Duration::from_secs(240), || last_step(&run_dir) >= 2);
    let baseline = threads(run.pid());
    // Its pace without attackers, over as long as the attack will last.
    const WINDOW: Duration = Duration::from_secs(12);
    let before_start = last_step(&run_dir);
    std::thread::sleep(WINDOW);
    let before = last_step(&run_dir) - before_start;

    // Many connections that send nothing, a slow sender, a huge header, and live pages that
    // never read what they are sent.
    let mut idle: Vec<TcpStream> = (0..300).filter_map(|_| TcpStream::connect(addr).ok()).collect();
    let mut drip = TcpStream::connect(addr).unwrap();
    let mut streams: Vec<TcpStream> = (0..20)
        .filter_map(|_| {
            let mut s = TcpStream::connect(addr).ok()?;
            s.write_all(b"GET /api/stream HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
            Some(s)
        })
        .collect();
    let huge = std::thread::spawn(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut request = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Junk: ".to_vec();
        request.extend(std::iter::repeat_n(b'a', 1 << 20));
        let _ = s.write_all(&request);
        let mut answer = Vec::new();
        let _ = s.read_to_end(&mut answer);
        String::from_utf8_lossy(&answer).into_owned()
    });
    let attack_start_step = last_step(&run_dir);
    let start = Instant::now();
    let mut most_threads = 0;
    while start.elapsed() < WINDOW {
        let _ = drip.write_all(b"G");
        most_threads = most_threads.max(threads(run.pid()));
        std::thread::sleep(Duration::from_millis(300));
    }
    // Training went on, and the server's threads stayed within its connection limit.
    // (The pace is compared, not an absolute rate: the machine may be shared.)
    let during = last_step(&run_dir) - attack_start_step;
    println!("steps in {WINDOW:?}: {before} before the attack, {during} during it");
    assert!(during >= 2 && during * 3 >= before, "training advanced {during} steps under attack, {before} before it");
    assert!(most_threads <= baseline + 32 + 2, "threads: {baseline} before, {most_threads} under attack");
    let answer = huge.join().unwrap();
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 431") || answer.starts_with("HTTP/1.1 503"),
        "{}",
        &answer[..answer.len().min(200)]
    );
    // Once the attackers go, the page is served again.
    idle.clear();
    streams.clear();
    drop(drip);
    wait_for("the server to answer again", Duration::from_secs(30), || get(addr, "/api/runs").0 == 200);
    assert!(run.child.try_wait().unwrap().is_none(), "the run must still be training:\n{}", run.output());
}

#[test]
fn browsers_coming_and_going_never_disturb_training() {
    let sb = Sandbox::new();
    let script = sb.write("scripts/exp.rhai", &dpo_script("    dpo::loss(batch, params)", "max_steps: 24,"));
    let (with_page, without) = (sb.path("with-page"), sb.path("without"));
    let run = Host::start(&[
        "run",
        script.to_str().unwrap(),
        "--no-watch",
        "--run-dir",
        with_page.to_str().unwrap(),
        "--dashboard",
        "127.0.0.1:0",
    ]);
    let mut run = run;
    let addr = run.dashboard_addr();
    // Pages that open the stream and vanish mid-answer, again and again while it trains.
    let mut visits = 0;
    while run.child.try_wait().unwrap().is_none() && visits < 200 {
        if let Ok(mut s) = TcpStream::connect(addr) {
            let target = if visits % 2 == 0 { "/api/stream" } else { "/api/metrics?run=0&source=" };
            let _ = s.write_all(format!("GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").as_bytes());
            let mut first = [0u8; 64];
            let _ = s.read(&mut first);
            drop(s);
        }
        visits += 1;
        std::thread::sleep(Duration::from_millis(30));
    }
    let (status, output) = run.wait();
    assert!(status.success(), "{output}");
    assert!(!output.contains("panicked"), "{output}");
    // The run is the one trained without a page, step for step.
    let out = run_host(&["run", script.to_str().unwrap(), "--no-watch", "--run-dir", without.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(loss_lines(&with_page).len(), 24);
    assert_eq!(read_lines(&with_page.join("metrics.jsonl")), read_lines(&without.join("metrics.jsonl")));
}
