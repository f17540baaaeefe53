//! The dashboard in a real headless browser: Debian's `chromium`, driven by
//! `chromedriver` over its W3C WebDriver HTTP API (plain HTTP/1.1 from this test, no
//! client library).
//!
//! Real processes on loopback: `serin control-plane` (with `--ui` and
//! `--admin-token-file`), `serin upstream` v1 and v2 (v2 answers 20% 503s), and a
//! `serin sidecar --control-plane …` that reports its per-version load. A bounded
//! request loop goes through the sidecar; the test counts what answered. Then the
//! page must show both versions with figures that agree with what the client saw and
//! with `serin ctl load`, and the rollback button must be refused without the token
//! (401, shown on the page, nothing changed) and work with it (v2 at 0%, ACKed by the
//! sidecar).
//!
//! Skipped only when `SERIN_SKIP_BROWSER=1`; otherwise a missing `chromium` or
//! `chromedriver` fails with what to install. Every wait is bounded; nothing asserts
//! timings. A screenshot is saved as `$TMPDIR/serin-dashboard.png`.

mod process_support;

use process_support::{
    PAYMENT_FQDN, Proc, TempDir, addr_field, fields, payment_mesh_yaml, spawn_sidecar, start_upstream,
};

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(30);
/// How long the load reports may take to show on the page.
const FIGURES_WAIT: Duration = Duration::from_secs(40);
const TOKEN: &str = "browser-test-admin-token-42";
const REQUESTS: usize = 200;

// ---- processes --------------------------------------------------------------------

// ---- plain HTTP/1.1 -----------------------------------------------------------------

/// A response: status and body (chunked bodies decoded).
#[derive(Debug)]
struct Reply {
    status: u16,
    body: String,
}

fn dechunk(mut body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(end) = body.windows(2).position(|w| w == b"\r\n") else { return out };
        let size = std::str::from_utf8(&body[..end]).ok().and_then(|s| usize::from_str_radix(s.trim(), 16).ok());
        let Some(size) = size.filter(|s| *s > 0) else { return out };
        let start = end + 2;
        let Some(chunk) = body.get(start..start + size) else { return out };
        out.extend_from_slice(chunk);
        body = body.get(start + size + 2..).unwrap_or_default();
    }
}

fn http(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Reply {
    let mut stream = TcpStream::connect_timeout(&addr, WAIT).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    stream.set_read_timeout(Some(WAIT)).expect("timeout");
    let mut head = format!("{method} {path} HTTP/1.1\r\nconnection: close\r\n");
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        head.push_str(&format!("host: {addr}\r\n"));
    }
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        head.push_str(&format!("content-type: application/json\r\ncontent-length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).expect("write");
    stream.write_all(body.as_bytes()).expect("write");
    // Read by Content-Length when given: chromedriver keeps the connection open.
    let mut raw = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    let (head, body) = loop {
        let n = stream.read(&mut buf).unwrap_or_else(|e| panic!("read {method} {path}: {e}"));
        raw.extend_from_slice(&buf[..n]);
        let split = raw.windows(4).position(|w| w == b"\r\n\r\n");
        if let Some(split) = split {
            let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok());
            if let Some(length) = length {
                while raw.len() < split + 4 + length {
                    let n = stream.read(&mut buf).unwrap_or_else(|e| panic!("read {method} {path}: {e}"));
                    assert!(n > 0, "{method} {path}: the connection closed inside the body");
                    raw.extend_from_slice(&buf[..n]);
                }
                break (head, raw[split + 4..split + 4 + length].to_vec());
            }
            let chunked = head.contains("transfer-encoding: chunked");
            if n == 0 || (chunked && raw.ends_with(b"\r\n0\r\n\r\n")) {
                let rest = raw[split + 4..].to_vec();
                let body = if chunked { dechunk(&rest) } else { rest };
                break (head, body);
            }
        } else if n == 0 {
            panic!("{method} {path}: the connection closed before the headers");
        }
    };
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    Reply { status, body: String::from_utf8_lossy(&body).into_owned() }
}

// ---- WebDriver ------------------------------------------------------------------------

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A chromedriver process and one browser session; both end on drop.
struct Browser {
    driver: SocketAddr,
    session: String,
    _process: Proc,
    _profile: TempDir,
}

impl Browser {
    fn start(chromium: &Path, chromedriver: &Path) -> Browser {
        // Port 0: chromedriver binds a free port itself and names it on stdout (a
        // port probed here first could be taken by another test before it binds).
        let process = Proc::spawn(chromedriver, &["--port=0"], "chromedriver");
        let deadline = Instant::now() + WAIT;
        let port = loop {
            let started = process.stdout_lines().iter().find_map(|l| {
                l.split_once("started successfully on port ").and_then(|(_, p)| p.trim_end_matches('.').parse().ok())
            });
            if let Some(port) = started.filter(|&p: &u16| p != 0) {
                break port;
            }
            assert!(
                Instant::now() < deadline,
                "chromedriver named no port within {WAIT:?}:\n{}\n{}",
                process.stdout_lines().join("\n"),
                process.stderr_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        let driver = SocketAddr::from(([127, 0, 0, 1], port));
        loop {
            if TcpStream::connect(driver).is_ok() {
                let status = http(driver, "GET", "/status", &[], "");
                let ready: Value = serde_json::from_str(&status.body).unwrap_or(Value::Null);
                if ready["value"]["ready"] == true {
                    break;
                }
            }
            assert!(Instant::now() < deadline, "chromedriver not ready within {WAIT:?}:\n{}", process.stderr_text());
            std::thread::sleep(Duration::from_millis(100));
        }
        let profile = TempDir::new("dashboard-chromium");
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium.to_string_lossy(),
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--no-first-run", "--disable-extensions", "--window-size=1280,1000",
                    format!("--user-data-dir={}", profile.path().display()),
                ],
            },
        }}});
        let reply = http(driver, "POST", "/session", &[], &caps.to_string());
        let answer: Value = serde_json::from_str(&reply.body).unwrap_or(Value::Null);
        let session = answer["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no WebDriver session ({}): {}", reply.status, reply.body))
            .to_string();
        Browser { driver, session, _process: process, _profile: profile }
    }

    fn call(&self, method: &str, path: &str, body: Value) -> Value {
        let body = if method == "POST" { body.to_string() } else { String::new() };
        let reply = http(self.driver, method, &format!("/session/{}{path}", self.session), &[], &body);
        let answer: Value = serde_json::from_str(&reply.body).unwrap_or(Value::Null);
        assert_eq!(reply.status, 200, "WebDriver {method} {path}: {}", reply.body);
        answer["value"].clone()
    }

    fn goto(&self, url: &str) {
        self.call("POST", "/url", json!({ "url": url }));
    }

    /// Runs `script` (a function body) in the page and returns its value.
    fn script(&self, script: &str) -> Value {
        self.call("POST", "/execute/sync", json!({ "script": script, "args": [] }))
    }

    fn find(&self, css: &str) -> String {
        let found = self.call("POST", "/element", json!({ "using": "css selector", "value": css }));
        found[ELEMENT].as_str().unwrap_or_else(|| panic!("no element {css}: {found}")).to_string()
    }

    fn click(&self, css: &str) {
        let id = self.find(css);
        self.call("POST", &format!("/element/{id}/click"), json!({}));
    }

    fn type_into(&self, css: &str, text: &str) {
        let id = self.find(css);
        self.call("POST", &format!("/element/{id}/value"), json!({ "text": text }));
    }

    /// Saves a PNG of the page.
    fn screenshot(&self, path: &Path) {
        let png = self.call("GET", "/screenshot", Value::Null);
        let bytes = base64_decode(png.as_str().unwrap_or_default());
        std::fs::write(path, bytes).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    }

    /// Polls `script` until `done` accepts its value (bounded by `wait`).
    fn wait_for(&self, what: &str, wait: Duration, script: &str, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + wait;
        loop {
            let value = self.script(script);
            if done(&value) {
                return value;
            }
            assert!(Instant::now() < deadline, "{what}: not within {wait:?}; the page shows {value}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = std::panic::catch_unwind(|| {
            http(self.driver, "DELETE", &format!("/session/{}", self.session), &[], "");
        });
    }
}

fn base64_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    };
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0);
    for v in text.bytes().filter_map(value) {
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

fn which(name: &str, env: &str) -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(env) {
        return Some(PathBuf::from(path)).filter(|p| p.is_file());
    }
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join(name)).find(|p| p.is_file())
}

// ---- what the page shows -----------------------------------------------------------------

/// The payment card's version rows, as text: `{version: {field: text}}`.
const ROWS: &str = r#"
const card = document.querySelector('[data-service="payment.default.svc.cluster.local"]');
if (!card) return null;
const rows = {};
for (const tr of card.querySelectorAll('tr[data-version]')) {
  const row = {};
  for (const td of tr.querySelectorAll('[data-field]')) row[td.dataset.field] = td.textContent;
  rows[tr.dataset.version] = row;
}
rows.charts = card.querySelectorAll('svg[data-chart] polyline').length;
return rows;
"#;

const RESULT: &str = r#"
const out = document.querySelector('[data-service="payment.default.svc.cluster.local"] [data-role="result"]');
return out ? out.textContent : null;
"#;

fn number(text: &str) -> f64 {
    let t = text.trim().trim_end_matches('%').trim_end_matches("ms").trim();
    t.parse().unwrap_or_else(|_| panic!("not a number: {text:?}"))
}

/// `serin ctl load payment --window 15m`: version → its row's cells.
fn ctl_load(control_plane: SocketAddr) -> BTreeMap<String, Vec<String>> {
    let out = Command::new(env!("CARGO_BIN_EXE_serin"))
        .args(["ctl", "--control-plane", &control_plane.to_string(), "load", "payment", "--window", "15m"])
        .env("NO_COLOR", "1")
        .output()
        .expect("run serin ctl load");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "serin ctl load: {}{text}", String::from_utf8_lossy(&out.stderr));
    text.lines()
        .filter(|l| l.starts_with(PAYMENT_FQDN))
        .map(|l| {
            let cells: Vec<String> = l.split_whitespace().map(str::to_string).collect();
            (cells[1].clone(), cells)
        })
        .collect()
}

fn weights(ui: SocketAddr) -> Value {
    let reply = http(ui, "GET", "/api/overview", &[], "");
    let overview: Value = serde_json::from_str(&reply.body).expect("overview JSON");
    overview["services"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["service"] == PAYMENT_FQDN))
        .map(|s| s["weights"].clone())
        .unwrap_or(Value::Null)
}

#[test]
fn the_dashboard_shows_both_versions_and_its_rollback_button_needs_the_token() {
    if std::env::var("SERIN_SKIP_BROWSER").is_ok_and(|v| v == "1") {
        eprintln!("SERIN_SKIP_BROWSER=1: the browser test is skipped");
        return;
    }
    let hint = "install Debian's `chromium` and `chromium-driver` (apt-get install -y chromium chromium-driver), \
                or set SERIN_CHROMIUM / SERIN_CHROMEDRIVER to their paths, or SERIN_SKIP_BROWSER=1 to skip this test";
    let chromium = which("chromium", "SERIN_CHROMIUM")
        .unwrap_or_else(|| panic!("no chromium (on PATH or at $SERIN_CHROMIUM): {hint}"));
    let chromedriver = which("chromedriver", "SERIN_CHROMEDRIVER")
        .unwrap_or_else(|| panic!("no chromedriver (on PATH or at $SERIN_CHROMEDRIVER): {hint}"));

    // The mesh: two upstreams, the control plane, one sidecar taking its config from it.
    let tmp = TempDir::new("dashboard-browser");
    let (_v1, v1) = start_upstream("v1", &[]);
    let (_v2, v2) = start_upstream("v2", &["--error-rate", "0.2"]);
    let config = tmp.path().join("config");
    std::fs::create_dir_all(&config).expect("config dir");
    std::fs::write(config.join("payment.yaml"), payment_mesh_yaml(v1, v2)).expect("config");
    let token_file = tmp.path().join("admin.token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).expect("token");
    let (config_arg, state_arg) =
        (config.to_string_lossy().into_owned(), tmp.path().join("state").to_string_lossy().into_owned());
    let token_arg = token_file.to_string_lossy().into_owned();
    let mut cp = Proc::serin(
        &[
            "control-plane",
            "--config-dir",
            &config_arg,
            "--state-dir",
            &state_arg,
            "--listen",
            "127.0.0.1:0",
            "--monitoring",
            "127.0.0.1:0",
            "--ui",
            "127.0.0.1:0",
            "--admin-token-file",
            &token_arg,
        ],
        "control-plane",
    );
    let listen = addr_field(&fields(&cp.wait_stderr("control plane ready")), "listen");
    let ui = addr_field(&fields(&cp.wait_stderr("dashboard on http://")), "ui");
    let listen_arg = listen.to_string();
    let (sidecar, bound) =
        spawn_sidecar(&["--control-plane", &listen_arg, "--node-id", "frontend-1", "--no-access-log"]);
    let (outbound, admin) = (addr_field(&bound, "outbound"), addr_field(&bound, "admin"));
    let deadline = Instant::now() + WAIT;
    while http(admin, "GET", "/ready", &[], "").status != 200 {
        assert!(Instant::now() < deadline, "the sidecar got no config within {WAIT:?}:\n{}", sidecar.stderr_text());
        std::thread::sleep(Duration::from_millis(100));
    }

    // A bounded request loop through the sidecar; count who answered what.
    let mut seen: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for _ in 0..REQUESTS {
        // Spread over a few seconds, so that the charts have more than one point.
        std::thread::sleep(Duration::from_millis(10));
        let reply = http(outbound, "GET", "/", &[("host", "payment")], "");
        let version = match reply.status {
            200 => serde_json::from_str::<Value>(&reply.body)
                .ok()
                .and_then(|b| b["version"].as_str().map(str::to_string))
                .unwrap_or_else(|| panic!("an answer without a version: {}", reply.body)),
            // v1 answers no errors, retries are off: a 503 is v2's.
            503 => "v2".to_string(),
            other => panic!("unexpected status {other}: {}", reply.body),
        };
        let entry = seen.entry(version).or_default();
        entry.0 += 1;
        entry.1 += u64::from(reply.status == 503);
    }
    let (v1_requests, v1_errors) = seen.get("v1").copied().unwrap_or_default();
    let (v2_requests, v2_errors) = seen.get("v2").copied().unwrap_or_default();
    assert!(v1_requests > 0 && v2_requests > 0, "both versions answer: {seen:?}");
    assert_eq!(v1_errors, 0, "{seen:?}");

    // The page: both versions, with the figures the client saw once the reports are in.
    let browser = Browser::start(&chromium, &chromedriver);
    // Figures over the whole history (15 minutes), as `serin ctl load --window 15m`, so
    // that a slow machine does not see the first requests leave the window.
    browser.goto(&format!("http://{ui}/?window=900"));
    let shows = |rows: &Value, v: &str, n: u64| rows[v]["requests"].as_str() == Some(n.to_string().as_str());
    let rows = browser.wait_for("the load reports on the page", FIGURES_WAIT, ROWS, |r| {
        shows(r, "v1", v1_requests) && shows(r, "v2", v2_requests)
    });
    let success = |requests: u64, errors: u64| 100.0 * (requests - errors) as f64 / requests as f64;
    assert_eq!(rows["v1"]["success"], format!("{:.1}%", success(v1_requests, v1_errors)), "{rows}");
    assert_eq!(rows["v2"]["success"], format!("{:.1}%", success(v2_requests, v2_errors)), "{rows}");
    let share = 100.0 * v2_requests as f64 / (v1_requests + v2_requests) as f64;
    assert_eq!(rows["v2"]["share"], format!("{share:.1}%"), "{rows}");
    assert_eq!(rows["v1"]["weight"], "50%", "{rows}");
    assert_eq!(rows["v2"]["weight"], "50%", "{rows}");
    assert!(rows["charts"].as_u64().is_some_and(|n| n >= 8), "a line per version in each chart: {rows}");

    // …and agree with the control plane's own figures (`serin ctl load`).
    let ctl = ctl_load(listen);
    for v in ["v1", "v2"] {
        let cells = ctl.get(v).unwrap_or_else(|| panic!("no {v} in serin ctl load: {ctl:?}"));
        let page = &rows[v];
        let text = |f: &str| page[f].as_str().unwrap_or_default().to_string();
        assert_eq!(cells[7], text("requests"), "{v}: ctl {cells:?}, page {page}");
        assert!((number(&cells[3]) - number(&text("share"))).abs() < 0.06, "{v}: ctl {cells:?}, page {page}");
        assert!((number(&cells[4]) - number(&text("success"))).abs() < 0.06, "{v}: ctl {cells:?}, page {page}");
        assert!((number(&cells[5]) - number(&text("p50"))).abs() < 0.06, "{v}: ctl {cells:?}, page {page}");
        assert!((number(&cells[6]) - number(&text("p99"))).abs() < 0.06, "{v}: ctl {cells:?}, page {page}");
    }
    let shot = std::env::temp_dir().join("serin-dashboard.png");
    browser.screenshot(&shot);
    eprintln!("dashboard screenshot: {}", shot.display());

    // Rollback without the token: refused, the page says so, nothing changes.
    browser.click("[data-service=\"payment.default.svc.cluster.local\"] [data-role=\"rollback\"]");
    browser.click("[data-service=\"payment.default.svc.cluster.local\"] [data-role=\"rollback\"]");
    let refused = browser.wait_for("the refusal on the page", WAIT, RESULT, |t| {
        t.as_str().is_some_and(|t| t.starts_with("refused (401)"))
    });
    assert!(refused.as_str().is_some_and(|t| t.contains("admin token")), "{refused}");
    assert_eq!(weights(ui), json!({"v1": 50, "v2": 50}), "nothing changed without the token");

    // With the token: rolled back, confirmed by the sidecar, shown on the page.
    browser.type_into("#token", TOKEN);
    browser.click("#token-use");
    browser.click("[data-service=\"payment.default.svc.cluster.local\"] [data-role=\"rollback\"]");
    browser.click("[data-service=\"payment.default.svc.cluster.local\"] [data-role=\"rollback\"]");
    let done = browser.wait_for("the rollback on the page", WAIT, RESULT, |t| {
        t.as_str().is_some_and(|t| t.contains("v1=100 v2=0") || t.starts_with("refused"))
    });
    let done = done.as_str().unwrap_or_default().to_string();
    assert!(done.contains("v1=100 v2=0") && done.contains("ACKed by 1 of 1 sidecar(s)"), "{done}");
    assert_eq!(weights(ui), json!({"v1": 100, "v2": 0}));
    browser.wait_for("the new weights on the page", WAIT, ROWS, |r| {
        r["v1"]["weight"] == "100%" && r["v2"]["weight"] == "0%"
    });
    let shown = browser.script("return document.getElementById('token-state').textContent;");
    assert_eq!(shown, "token set (this tab only)");

    // Every request after the rollback goes to v1.
    for _ in 0..20 {
        let reply = http(outbound, "GET", "/", &[("host", "payment")], "");
        assert_eq!(reply.status, 200, "{}", reply.body);
        let body: Value = serde_json::from_str(&reply.body).unwrap_or(Value::Null);
        assert_eq!(body["version"], "v1", "{}", reply.body);
    }
    drop(browser);
    drop(cp);
}
