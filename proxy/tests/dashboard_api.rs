//! The control plane's dashboard over real HTTP on loopback: the dashboard server in
//! process over a real `ControlPlane` and `Store` (load figures recorded into the
//! control plane's own aggregator), and once as the real `serin control-plane`
//! process. Checks the overview's JSON shape and figures, the headers, 404/405, the
//! admin token's 403/401/200 paths, bad JSON (400, naming the problem), an oversized
//! body (413) and an unknown service (404, named).
//!
//! Every wait is bounded; nothing asserts timings.

mod process_support;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use process_support::{TempDir, addr_field, fields, strip_ansi};
use serde_json::Value;
use serin::dashboard::{AdminToken, Dashboard, DashboardBackend};
use serin_control_api::pb;
use serin_control_api::server::{ControlPlane, ServerOptions, Store, parse_documents};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

const WAIT: Duration = Duration::from_secs(20);
const TOKEN: &str = "dashboard-test-token-0123456789";
const FQDN: &str = "payment.default.svc.cluster.local";

/// `payment`: two endpoints (v1, v2), their subsets, a 90/10 split.
const PAYMENT: &str = r#"apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: payment
  namespace: default
spec:
  hosts: [payment.default.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports:
  - number: 8080
    name: http
    protocol: HTTP
  endpoints:
  - address: 127.0.0.1
    ports: {http: 9001}
    labels: {app: payment, version: v1}
  - address: 127.0.0.1
    ports: {http: 9002}
    labels: {app: payment, version: v2}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: payment
  namespace: default
spec:
  host: payment
  subsets:
  - name: v1
    labels: {version: v1}
  - name: v2
    labels: {version: v2}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: payment
  namespace: default
spec:
  hosts: [payment.default.svc.cluster.local]
  http:
  - route:
    - destination: {host: payment.default.svc.cluster.local, subset: v1}
      weight: 90
    - destination: {host: payment.default.svc.cluster.local, subset: v2}
      weight: 10
"#;

/// A dashboard served in process over a real control plane.
struct Served {
    addr: SocketAddr,
    plane: ControlPlane,
    _stop: watch::Sender<bool>,
}

async fn serve(token: Option<&str>) -> Served {
    let docs = parse_documents(PAYMENT).expect("documents");
    let store = Arc::new(Store::from_documents(docs).expect("store"));
    let plane = ControlPlane::new(store, ServerOptions::default());
    let token = token.map(|t| AdminToken::new(t).expect("token"));
    let backend: Arc<dyn DashboardBackend> = Arc::new(plane.clone());
    let dashboard = Arc::new(Dashboard::new(backend, token));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, stop_rx) = watch::channel(false);
    tokio::spawn(serin::dashboard::serve(listener, dashboard, stop_rx));
    Served { addr, plane, _stop: stop }
}

/// A response: status, lower-cased headers, body.
#[derive(Debug)]
struct Reply {
    status: u16,
    headers: BTreeMap<String, String>,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
    fn header(&self, name: &str) -> &str {
        self.headers.get(name).map_or("", String::as_str)
    }
}

/// One HTTP/1.1 request over a new connection (`connection: close`), bounded.
async fn http(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Reply {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let mut head = format!("{method} {path} HTTP/1.1\r\nconnection: close\r\n");
        if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
            head.push_str(&format!("host: {addr}\r\n"));
        }
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        if method == "POST" || !body.is_empty() {
            head.push_str(&format!("content-length: {}\r\n", body.len()));
        }
        head.push_str("\r\n");
        stream.write_all(head.as_bytes()).await.expect("write head");
        stream.write_all(body).await.expect("write body");
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.expect("read");
        raw
    };
    let raw = tokio::time::timeout(WAIT, exchange).await.expect("answer within the wait");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines.next().and_then(|l| l.split_whitespace().nth(1)).and_then(|s| s.parse().ok()).unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Reply { status, headers, body: body.to_string() }
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// One second of load: `ok` 2xx and `errors` 5xx answers of `version`, all in the
/// 1–5 ms bucket.
fn report(version: &str, ok: u64, errors: u64) -> pb::LoadReport {
    pb::LoadReport {
        interval_ms: 1000,
        loads: vec![pb::VersionLoad {
            service: FQDN.to_string(),
            version: version.to_string(),
            status_2xx: ok,
            status_5xx: errors,
            duration_buckets: vec![0, 0, ok + errors],
            duration_sum_ms: 3.0 * (ok + errors) as f64,
            ..Default::default()
        }],
    }
}

fn version<'a>(service: &'a Value, name: &str) -> &'a Value {
    service["versions"]
        .as_array()
        .and_then(|vs| vs.iter().find(|v| v["version"] == name))
        .unwrap_or_else(|| panic!("no version {name} in {service}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_overview_has_every_service_version_figures_series_and_sidecars() {
    let served = serve(None).await;
    served.plane.load().record("frontend-1", &report("v1", 90, 0));
    served.plane.load().record("frontend-1", &report("v2", 8, 2));

    let reply = http(served.addr, "GET", "/api/overview", &[], b"").await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.header("content-type"), "application/json");
    assert_eq!(reply.header("cache-control"), "no-store");
    assert!(reply.header("content-security-policy").contains("default-src 'none'"), "{reply:?}");
    let overview = reply.json();
    assert_eq!(overview["writes_enabled"], false);
    assert_eq!(overview["window_s"], 60);
    assert_eq!(overview["sidecars"], Value::Array(vec![]));
    assert!(overview["versions"]["routes"].is_string(), "{overview}");
    let services = overview["services"].as_array().expect("services");
    assert_eq!(services.len(), 1, "{overview}");
    let payment = &services[0];
    assert_eq!(payment["service"], FQDN);
    assert_eq!(payment["name"], "payment");
    assert_eq!(payment["subsets"], serde_json::json!(["v1", "v2"]));
    assert_eq!(payment["weights"], serde_json::json!({"v1": 90, "v2": 10}));
    assert_eq!(payment["canary"], Value::Null);

    let v1 = version(payment, "v1");
    let v2 = version(payment, "v2");
    assert_eq!(v1["requests"], 90);
    assert_eq!(v2["requests"], 10);
    assert_eq!(v2["errors"], 2);
    assert_eq!(v1["success_percent"], 100.0);
    assert_eq!(v2["success_percent"], 80.0);
    assert_eq!(v1["share_percent"], 90.0);
    assert_eq!(v2["share_percent"], 10.0);
    assert_eq!(v1["reporters"], 1);
    assert!(v1["p50_ms"].as_f64().is_some_and(|p| p > 1.0 && p <= 5.0), "{v1}");
    assert!(v2["p99_ms"].as_f64().is_some_and(|p| p > 1.0 && p <= 5.0), "{v2}");
    let len = overview["series_len"].as_u64().expect("series_len") as usize;
    assert_eq!(len, 300);
    for v in [v1, v2] {
        for key in ["rps", "share", "success", "p50", "p99"] {
            assert_eq!(v["series"][key].as_array().map(Vec::len), Some(len), "{key} of {v}");
        }
    }
    let requests: f64 = v2["series"]["rps"].as_array().expect("rps").iter().filter_map(Value::as_f64).sum();
    assert_eq!(requests, 10.0, "{v2}");
    let success: Vec<f64> =
        v2["series"]["success"].as_array().expect("success").iter().filter_map(Value::as_f64).collect();
    assert_eq!(success, vec![80.0], "{v2}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_headers_and_wrong_paths_or_methods() {
    let served = serve(None).await;
    let page = http(served.addr, "GET", "/", &[], b"").await;
    assert_eq!(page.status, 200);
    assert!(page.header("content-type").starts_with("text/html"), "{page:?}");
    assert!(page.body.contains("<script src=\"/app.js\""), "{}", page.body);
    assert!(!page.body.contains("http://") && !page.body.contains("https://"), "the page loads nothing remote");
    let csp = page.header("content-security-policy");
    assert!(csp.contains("script-src 'self'") && csp.contains("connect-src 'self'"), "{csp}");
    let js = http(served.addr, "GET", "/app.js", &[], b"").await;
    assert_eq!(js.status, 200);
    assert!(js.header("content-type").starts_with("text/javascript"), "{js:?}");
    assert!(js.body.contains("/api/overview"));
    let css = http(served.addr, "GET", "/style.css", &[], b"").await;
    assert!(css.header("content-type").starts_with("text/css"), "{css:?}");

    let wide = http(served.addr, "GET", "/api/overview?window=900", &[], b"").await;
    assert_eq!(wide.json()["window_s"], 900, "{wide:?}");
    let bad = http(served.addr, "GET", "/api/overview?window=1h", &[], b"").await;
    assert_eq!(bad.status, 400, "{bad:?}");
    assert!(bad.json()["error"].as_str().is_some_and(|e| e.contains("from 1 to 900")), "{bad:?}");

    assert_eq!(http(served.addr, "GET", "/nope", &[], b"").await.status, 404);
    let api404 = http(served.addr, "GET", "/api/nope", &[], b"").await;
    assert_eq!(api404.status, 404);
    assert!(api404.json()["error"].as_str().is_some_and(|e| e.contains("/api/nope")), "{api404:?}");
    let post = http(served.addr, "POST", "/api/overview", &[], b"{}").await;
    assert_eq!(post.status, 405);
    assert_eq!(post.header("allow"), "GET, HEAD");
    let get = http(served.addr, "GET", "/api/services/payment/rollback", &[], b"").await;
    assert_eq!(get.status, 405);
    assert_eq!(get.header("allow"), "POST");
    assert_eq!(get.header("cache-control"), "no-store");
    assert_eq!(http(served.addr, "POST", "/api/services/payment/promote", &[], b"{}").await.status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_configured_token_the_actions_answer_403_naming_the_flag() {
    let served = serve(None).await;
    for (path, body) in [
        ("/api/services/payment/rollback", "{}"),
        ("/api/services/payment/weights", r#"{"weights": {"v1": 50, "v2": 50}}"#),
    ] {
        let reply = http(served.addr, "POST", path, &[("authorization", &bearer(TOKEN))], body.as_bytes()).await;
        assert_eq!(reply.status, 403, "{reply:?}");
        let error = reply.json()["error"].as_str().unwrap_or_default().to_string();
        assert!(error.contains("--admin-token-file"), "{error}");
    }
    assert_eq!(served.plane.store().weights("payment").get("v2"), Some(&10), "nothing changed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_or_wrong_token_is_401_and_the_right_one_acts() {
    let served = serve(Some(TOKEN)).await;
    let overview = http(served.addr, "GET", "/api/overview", &[], b"").await.json();
    assert_eq!(overview["writes_enabled"], true);

    let missing = http(served.addr, "POST", "/api/services/payment/rollback", &[], b"{}").await;
    assert_eq!(missing.status, 401, "{missing:?}");
    assert_eq!(missing.header("www-authenticate"), "Bearer");
    assert!(missing.json()["error"].as_str().is_some_and(|e| e.contains("Authorization: Bearer")), "{missing:?}");
    let wrong_token = bearer("not-the-token-0123456789");
    let wrong =
        http(served.addr, "POST", "/api/services/payment/rollback", &[("authorization", &wrong_token)], b"{}").await;
    assert_eq!(wrong.status, 401, "{wrong:?}");
    assert!(wrong.json()["error"].as_str().is_some_and(|e| e.contains("not the one")), "{wrong:?}");
    assert_eq!(served.plane.store().weights("payment").get("v2"), Some(&10), "nothing changed");

    let auth = bearer(TOKEN);
    let body = br#"{"weights": {"v1": 50, "v2": 50}}"#;
    let set = http(served.addr, "POST", "/api/services/payment/weights", &[("authorization", &auth)], body).await;
    assert_eq!(set.status, 200, "{set:?}");
    assert_eq!(set.header("cache-control"), "no-store");
    let answer = set.json();
    assert_eq!(answer["changed"], true);
    assert_eq!(answer["weights"], serde_json::json!({"v1": 50, "v2": 50}));
    assert!(answer["message"].as_str().is_some_and(|m| m.contains("v1=50 v2=50")), "{answer}");
    assert_eq!(served.plane.store().weights("payment").get("v2"), Some(&50));

    let rollback = http(served.addr, "POST", "/api/services/payment/rollback", &[("authorization", &auth)], b"").await;
    assert_eq!(rollback.status, 200, "{rollback:?}");
    let answer = rollback.json();
    assert_eq!(answer["weights"], serde_json::json!({"v1": 100, "v2": 0}));
    assert_eq!(answer["stable_subset"], "v1");
    assert_eq!(served.plane.store().weights("payment").get("v2"), Some(&0));
    let overview = http(served.addr, "GET", "/api/overview", &[], b"").await.json();
    assert_eq!(overview["services"][0]["weights"], serde_json::json!({"v1": 100, "v2": 0}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_bodies_and_unknown_services_are_refused_with_the_problem_named() {
    let served = serve(Some(TOKEN)).await;
    let auth = bearer(TOKEN);
    let post = |path: &'static str, body: &'static [u8]| {
        let auth = auth.clone();
        let addr = served.addr;
        async move {
            http(addr, "POST", path, &[("authorization", &auth), ("content-type", "application/json")], body).await
        }
    };
    let error = |reply: &Reply| reply.json()["error"].as_str().unwrap_or_default().to_string();

    let reply = post("/api/services/payment/weights", b"{\"weights\": {\"v1\": 90,").await;
    assert_eq!(reply.status, 400, "{reply:?}");
    assert!(error(&reply).starts_with("bad JSON body: EOF while parsing"), "{}", error(&reply));
    let reply = post("/api/services/payment/weights", br#"{"weights": {"v1": "ninety"}}"#).await;
    assert_eq!(reply.status, 400, "{reply:?}");
    assert!(error(&reply).contains("invalid type: string \"ninety\""), "{}", error(&reply));
    let reply = post("/api/services/payment/weights", br#"{"wieghts": {"v1": 100}}"#).await;
    assert_eq!(reply.status, 400, "{reply:?}");
    assert!(error(&reply).contains("unknown field `wieghts`"), "{}", error(&reply));
    let reply = post("/api/services/payment/rollback", br#"{"force": true}"#).await;
    assert_eq!(reply.status, 400, "{reply:?}");
    assert!(error(&reply).contains("unknown field `force`"), "{}", error(&reply));
    let reply = post("/api/services/payment/weights", br#"{"weights": {"v1": 90, "v2": 20}}"#).await;
    assert_eq!(reply.status, 400, "{reply:?}");
    assert!(error(&reply).contains("add up to 110"), "{}", error(&reply));
    let reply = post("/api/services/payment/weights", br#"{"weights": {"v1": 50, "v9": 50}}"#).await;
    assert_eq!(reply.status, 400, "{reply:?}");
    assert!(error(&reply).contains("no subset v9"), "{}", error(&reply));
    let reply = post("/api/services/ledger/rollback", b"{}").await;
    assert_eq!(reply.status, 404, "{reply:?}");
    assert!(error(&reply).contains("unknown service ledger"), "{}", error(&reply));
    let reply = post("/api/services/pay%20ment/rollback", b"{}").await;
    assert_eq!(reply.status, 400, "{reply:?}");
    assert!(error(&reply).contains("not a service name"), "{}", error(&reply));

    let big = vec![b' '; 64 * 1024];
    let reply = http(served.addr, "POST", "/api/services/payment/rollback", &[("authorization", &auth)], &big).await;
    assert_eq!(reply.status, 413, "{reply:?}");
    assert_eq!(served.plane.store().weights("payment").get("v2"), Some(&10), "nothing changed");
}

/// The real `serin control-plane`: logs the dashboard's URL and serves it, to a
/// loopback `Host` only (DNS rebinding); a bad token file stops the start with the
/// flag named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_plane_process_serves_the_dashboard_on_ui() {
    let tmp = TempDir::new("dashboard-api");
    let config = tmp.path().join("config");
    std::fs::create_dir_all(&config).expect("config dir");
    std::fs::write(config.join("payment.yaml"), PAYMENT).expect("config");
    let token_file = tmp.path().join("admin.token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).expect("token");
    let spawn = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_serin"))
            .arg("control-plane")
            .arg("--config-dir")
            .arg(&config)
            .arg("--state-dir")
            .arg(tmp.path().join("state"))
            .args(["--listen", "127.0.0.1:0", "--monitoring", "127.0.0.1:0"])
            .args(extra)
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn serin control-plane")
    };
    let token_arg = token_file.to_string_lossy().into_owned();
    let mut child = spawn(&["--ui", "127.0.0.1:0", "--admin-token-file", &token_arg]);
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(strip_ansi(&line));
        }
    });
    let deadline = Instant::now() + WAIT;
    let mut seen = Vec::new();
    let line = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.contains("dashboard on http://") => break line,
            Ok(line) => seen.push(line),
            Err(_) => {
                let _ = child.kill();
                panic!("no dashboard line within {WAIT:?}:\n{}", seen.join("\n"));
            }
        }
    };
    let addr = addr_field(&fields(&line), "ui");
    assert!(line.contains(&format!("dashboard on http://{addr}/")), "{line}");
    assert!(addr.ip().is_loopback());
    let overview = http(addr, "GET", "/api/overview", &[], b"").await;
    assert_eq!(overview.status, 200, "{overview:?}");
    assert_eq!(overview.json()["writes_enabled"], true);
    let localhost = format!("localhost:{}", addr.port());
    assert_eq!(http(addr, "GET", "/", &[("host", &localhost)], b"").await.status, 200);
    let rebound = http(addr, "GET", "/api/overview", &[("host", "evil.example:15016")], b"").await;
    assert_eq!(rebound.status, 421, "a loopback dashboard answers only to a loopback Host: {rebound:?}");
    let rollback =
        http(addr, "POST", "/api/services/payment/rollback", &[("authorization", &bearer(TOKEN))], b"{}").await;
    assert_eq!(rollback.status, 200, "{rollback:?}");
    let _ = child.kill();
    let _ = child.wait();

    std::fs::write(&token_file, "short\n").expect("token");
    let out = spawn(&["--ui", "127.0.0.1:0", "--admin-token-file", &token_arg]).wait_with_output().expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--admin-token-file") && err.contains("at least 16"), "{err}");
}
