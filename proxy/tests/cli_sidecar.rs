//! `serin sidecar` and `serin upstream` as real processes: bound addresses parsed
//! from the log on stderr, the JSON access log on stdout, drain on SIGTERM and on
//! `POST /quitquitquit`, `--no-access-log`, two sidecars side by side.
//!
//! Every wait is bounded; nothing asserts timings.

mod process_support;

use process_support::{Proc, TempDir, addr_field, spawn_sidecar, start_upstream};

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

const WAIT: Duration = Duration::from_secs(20);

/// The listeners of a running `serin sidecar`.
#[derive(Debug, Clone, Copy)]
struct Bound {
    outbound: SocketAddr,
    inbound: SocketAddr,
    admin: SocketAddr,
    metrics: SocketAddr,
    health: SocketAddr,
}

fn start_sidecar(config: &Path, extra: &[&str]) -> (Proc, Bound) {
    let config = config.to_string_lossy().into_owned();
    let mut flags = vec!["--config", &config, "--drain-timeout", "15s"];
    flags.extend_from_slice(extra);
    let (proc, f) = spawn_sidecar(&flags);
    let bound = Bound {
        outbound: addr_field(&f, "outbound"),
        inbound: addr_field(&f, "inbound"),
        admin: addr_field(&f, "admin"),
        metrics: addr_field(&f, "metrics"),
        health: addr_field(&f, "health"),
    };
    (proc, bound)
}

/// Config for `payment` (one v1 endpoint at `v1`), `ledger` (an endpoint that
/// refuses connections, no retries) and `slow` (a 300 ms route timeout).
fn write_config(dir: &Path, v1: SocketAddr, dead: SocketAddr) {
    let mut yaml = String::new();
    for (service, addr) in [("payment", v1), ("ledger", dead), ("slow", v1)] {
        yaml.push_str(&format!(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: {service}, namespace: default}}\nspec:\n  hosts: [{service}.default.svc.cluster.local]\n  location: MESH_INTERNAL\n  resolution: STATIC\n  ports: [{{number: 8080, name: http, protocol: HTTP}}]\n  workloadSelector: {{labels: {{app: {service}}}}}\n---\napiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: {service}-v1, namespace: default}}\nspec: {{address: {}, ports: {{http: {}}}, labels: {{app: {service}, version: v1}}}}\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: {service}, namespace: default}}\nspec:\n  host: {service}\n  subsets: [{{name: v1, labels: {{version: v1}}}}]\n---\n",
            addr.ip(),
            addr.port()
        ));
    }
    yaml.push_str(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: ledger, namespace: default}\nspec:\n  hosts: [ledger]\n  http:\n  - route: [{destination: {host: ledger, subset: v1}}]\n    retries: {attempts: 0}\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: slow, namespace: default}\nspec:\n  hosts: [slow]\n  http:\n  - route: [{destination: {host: slow, subset: v1}}]\n    timeout: 300ms\n",
    );
    std::fs::write(dir.join("mesh.yaml"), yaml).expect("write config");
}

/// A loopback port that refuses connections: bound (so no one else takes it) but
/// never listening. The returned socket must be kept alive.
fn refusing_port() -> (socket2::Socket, SocketAddr) {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    socket.bind(&any.into()).expect("bind");
    let addr = socket.local_addr().expect("local addr").as_socket().expect("inet");
    (socket, addr)
}

/// A response read off the wire.
#[derive(Debug)]
struct Reply {
    status: u16,
    head: String,
    body: String,
}

/// One request with `Connection: close`, read to the end (bounded).
fn request(addr: SocketAddr, method: &str, host: &str, path: &str) -> Reply {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(WAIT)).expect("timeout");
    let req = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    stream.write_all(req.as_bytes()).expect("write request");
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).expect("read response");
    parse(&String::from_utf8_lossy(&raw))
}

fn parse(raw: &str) -> Reply {
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no response head: {raw:?}"));
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("{head}"));
    Reply { status, head: head.to_ascii_lowercase(), body: body.to_string() }
}

fn get(addr: SocketAddr, host: &str, path: &str) -> Reply {
    request(addr, "GET", host, path)
}

/// Waits until the sidecar reports `n` requests in flight (admin `/server_info`).
fn wait_in_flight(admin: SocketAddr, n: u64) {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        let info: Value = serde_json::from_str(&get(admin, "admin", "/server_info").body).expect("server_info JSON");
        if info["requests_in_flight"].as_u64() == Some(n) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("never {n} request(s) in flight");
}

/// The access-log lines of stdout, parsed; every line must be one JSON object.
fn access_log(proc: &Proc) -> Vec<Value> {
    proc.stdout_lines()
        .iter()
        .map(|l| serde_json::from_str::<Value>(l).unwrap_or_else(|e| panic!("stdout line is not JSON ({e}): {l}")))
        .collect()
}

fn find_line<'a>(lines: &'a [Value], path: &str) -> &'a Value {
    lines.iter().find(|l| l["path"] == path).unwrap_or_else(|| panic!("no access-log line for {path}: {lines:#?}"))
}

fn is_uuid(id: &str) -> bool {
    let lens: Vec<usize> = id.split('-').map(str::len).collect();
    lens == [8, 4, 4, 4, 12] && id.chars().all(|c| c == '-' || c.is_ascii_hexdigit())
}

/// An h2c client connection (hyper) that has made one request and stays open;
/// returns its runtime and the connection task, which ends when the connection does.
fn idle_h2c_client(addr: SocketAddr) -> (tokio::runtime::Runtime, tokio::task::JoinHandle<()>) {
    use http_body_util::Empty;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
    let (mut sender, conn) = rt.block_on(async {
        let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(stream),
        )
        .await
        .expect("h2c handshake")
    });
    let task = rt.spawn(async move {
        let _ = conn.await;
    });
    rt.block_on(async {
        let req = http::Request::get("http://payment/status/204").body(Empty::<bytes::Bytes>::new()).expect("req");
        let resp = sender.send_request(req).await.expect("h2 answer");
        assert_eq!(resp.status(), 204);
    });
    // Keep the sender (and so the connection) alive until the server closes it.
    rt.spawn(async move {
        tokio::time::sleep(WAIT * 2).await;
        drop(sender);
    });
    (rt, task)
}

#[test]
fn sigterm_drains_an_in_flight_request_and_exits_0() {
    // `--concurrency 0`: one worker per core this process (and so the sidecar) may use.
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let flavor = if cores == 1 { "current_thread" } else { "multi_thread" };
    sigterm_drains(&[], (flavor, u64::try_from(cores).ok()));
}

/// The same on one thread (`--concurrency 1`: tokio's current-thread runtime).
#[test]
fn one_thread_serves_and_drains_the_same() {
    sigterm_drains(&["--concurrency", "1"], ("current_thread", Some(1)));
}

/// A sidecar started with `extra` flags answers, keeps idle connections, drains an
/// in-flight request on SIGTERM and exits 0; `/config_dump` shows the runtime
/// (flavor and, when given, the worker count).
fn sigterm_drains(extra: &[&str], runtime: (&str, Option<u64>)) {
    let (_upstream, v1) = start_upstream("v1", &[]);
    let (_dead_socket, dead) = refusing_port();
    let dir = TempDir::new("cli-sidecar");
    write_config(dir.path(), v1, dead);
    let (mut sidecar, bound) = start_sidecar(dir.path(), extra);
    let dump: Value = serde_json::from_str(&get(bound.admin, "admin", "/config_dump").body).expect("config_dump");
    assert_eq!(dump["runtime"]["flavor"], runtime.0, "{}", dump["runtime"]);
    if let Some(workers) = runtime.1 {
        assert_eq!(dump["runtime"]["workers"], workers, "{}", dump["runtime"]);
    }

    let ok = get(bound.outbound, "payment", "/");
    assert_eq!(ok.status, 200, "{ok:?}");
    let json: Value = serde_json::from_str(&ok.body).expect("JSON answer");
    assert_eq!(json["version"], "v1");

    // Idle client connections: HTTP/1.1 keep-alive after one answer, and h2c
    // (preface + SETTINGS, no stream).
    let mut idle_h1 = TcpStream::connect(bound.outbound).expect("connect");
    idle_h1.set_read_timeout(Some(WAIT)).expect("timeout");
    idle_h1.write_all(b"GET /status/204 HTTP/1.1\r\nHost: payment\r\n\r\n").expect("write");
    let mut buf = [0u8; 4096];
    let n = idle_h1.read(&mut buf).expect("204 answer");
    assert!(buf[..n].starts_with(b"HTTP/1.1 204"), "{}", String::from_utf8_lossy(&buf[..n]));
    let (rt, idle_h2) = idle_h2c_client(bound.outbound);

    // A slow request in flight on a keep-alive connection, then SIGTERM.
    let outbound = bound.outbound;
    let slow = std::thread::spawn(move || {
        let mut stream = TcpStream::connect(outbound).expect("connect");
        stream.set_read_timeout(Some(WAIT)).expect("timeout");
        stream.write_all(b"GET /delay/1500 HTTP/1.1\r\nHost: payment\r\n\r\n").expect("write");
        // The drain closes the connection after the answer, so read to the end.
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).expect("read until the proxy closes");
        parse(&String::from_utf8_lossy(&raw))
    });
    wait_in_flight(bound.admin, 1);
    sidecar.term();
    let reply = slow.join().expect("slow request thread");
    assert_eq!(reply.status, 200, "{reply:?}");
    assert!(reply.body.contains("\"version\":\"v1\""), "{reply:?}");
    let status = sidecar.wait_exit();
    assert_eq!(status.code(), Some(0), "{status}\n{}", sidecar.stderr_text());
    assert!(sidecar.stderr_text().contains("draining"), "{}", sidecar.stderr_text());
    // The idle connections were closed by the drain, not waited out.
    assert!(!sidecar.stderr_text().contains("drain deadline passed"), "{}", sidecar.stderr_text());
    let mut rest = Vec::new();
    idle_h1.read_to_end(&mut rest).expect("idle HTTP/1.1 connection closed");
    assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
    let h2_ended = rt.block_on(async { tokio::time::timeout(WAIT, idle_h2).await });
    assert!(h2_ended.is_ok(), "the idle h2c connection was not closed");

    // The JSON access log: one line per request, Envoy's fields.
    let lines = access_log(&sidecar);
    assert_eq!(lines.len(), 4, "{lines:#?}");
    let line = find_line(&lines, "/delay/1500");
    for key in [
        "start_time",
        "method",
        "path",
        "protocol",
        "response_code",
        "response_flags",
        "bytes_received",
        "bytes_sent",
        "duration",
        "upstream_host",
        "x_request_id",
        "destination_version",
    ] {
        assert!(line.get(key).is_some(), "{key} missing: {line}");
    }
    assert_eq!(line["method"], "GET");
    assert_eq!(line["protocol"], "HTTP/1.1");
    assert_eq!(line["response_code"], 200);
    assert_eq!(line["response_flags"], "-");
    assert_eq!(line["bytes_received"], 0);
    assert!(line["bytes_sent"].as_u64().is_some_and(|n| n > 0), "{line}");
    assert!(line["duration"].is_u64(), "{line}");
    assert_eq!(line["upstream_host"], v1.to_string());
    assert!(is_uuid(line["x_request_id"].as_str().unwrap_or_default()), "{line}");
    assert_eq!(line["destination_version"], "v1");
    assert_eq!(line["destination_app"], "payment");
    assert_eq!(line["authority"], "payment");
    assert!(line["start_time"].as_str().is_some_and(|t| t.ends_with('Z') && t.contains('T')), "{line}");
    // The two idle clients' requests: one HTTP/1.1, one HTTP/2.
    let mut protocols: Vec<&str> =
        lines.iter().filter(|l| l["path"] == "/status/204").filter_map(|l| l["protocol"].as_str()).collect();
    protocols.sort_unstable();
    assert_eq!(protocols, ["HTTP/1.1", "HTTP/2"], "{lines:#?}");
}

#[test]
fn quitquitquit_drains_like_sigterm() {
    let (_upstream, v1) = start_upstream("v1", &[]);
    let (_dead_socket, dead) = refusing_port();
    let dir = TempDir::new("cli-sidecar");
    write_config(dir.path(), v1, dead);
    let (mut sidecar, bound) = start_sidecar(dir.path(), &[]);

    assert_eq!(get(bound.admin, "admin", "/quitquitquit").status, 405, "GET does not drain");
    assert_eq!(get(bound.health, "health", "/healthz/ready").status, 200);

    let outbound = bound.outbound;
    let slow = std::thread::spawn(move || get(outbound, "payment", "/delay/3000"));
    wait_in_flight(bound.admin, 1);
    let reply = request(bound.admin, "POST", "admin", "/quitquitquit");
    assert_eq!(reply.status, 200, "{reply:?}");
    // While the request drains, readiness says so (the slow request keeps the
    // process up for a while yet).
    let ready = get(bound.health, "health", "/healthz/ready");
    assert_eq!((ready.status, ready.body.trim()), (503, "DRAINING"), "{ready:?}");
    let reply = slow.join().expect("slow request thread");
    assert_eq!(reply.status, 200, "{reply:?}");
    let status = sidecar.wait_exit();
    assert_eq!(status.code(), Some(0), "{status}\n{}", sidecar.stderr_text());
    let lines = access_log(&sidecar);
    assert_eq!(find_line(&lines, "/delay/3000")["response_code"], 200);
}

#[test]
fn access_log_lines_carry_the_response_flags() {
    let (_upstream, v1) = start_upstream("v1", &[]);
    let (_dead_socket, dead) = refusing_port();
    let dir = TempDir::new("cli-sidecar");
    write_config(dir.path(), v1, dead);
    let (mut sidecar, bound) = start_sidecar(dir.path(), &[]);

    assert_eq!(get(bound.outbound, "nosuch", "/nr").status, 404);
    assert_eq!(get(bound.outbound, "ledger", "/uf").status, 503);
    assert_eq!(get(bound.outbound, "slow", "/delay/5000").status, 504);
    // Client disconnect: send, wait until in flight, go away.
    {
        let mut stream = TcpStream::connect(bound.outbound).expect("connect");
        stream.write_all(b"GET /delay/20000?dc HTTP/1.1\r\nHost: payment\r\n\r\n").expect("write");
        wait_in_flight(bound.admin, 1);
    }
    wait_in_flight(bound.admin, 0);
    let raw = {
        let mut stream = TcpStream::connect(bound.outbound).expect("connect");
        stream.set_read_timeout(Some(WAIT)).expect("timeout");
        stream.write_all(b"GARBAGE\r\n\r\n").expect("write");
        let mut raw = Vec::new();
        let _ = stream.read_to_end(&mut raw);
        String::from_utf8_lossy(&raw).into_owned()
    };
    assert!(raw.starts_with("HTTP/1.1 400"), "{raw}");

    sidecar.term();
    assert_eq!(sidecar.wait_exit().code(), Some(0));
    let lines = access_log(&sidecar);
    assert_eq!(lines.len(), 5, "{lines:#?}");
    let nr = find_line(&lines, "/nr");
    assert_eq!((nr["response_code"].as_u64(), nr["response_flags"].as_str()), (Some(404), Some("NR")), "{nr}");
    assert_eq!(nr["upstream_host"], Value::Null);
    let uf = find_line(&lines, "/uf");
    assert_eq!((uf["response_code"].as_u64(), uf["response_flags"].as_str()), (Some(503), Some("UF")), "{uf}");
    assert_eq!(uf["upstream_host"], dead.to_string());
    let ut = find_line(&lines, "/delay/5000");
    assert_eq!((ut["response_code"].as_u64(), ut["response_flags"].as_str()), (Some(504), Some("UT")), "{ut}");
    let dc = find_line(&lines, "/delay/20000?dc");
    assert_eq!(dc["response_flags"], "DC", "{dc}");
    assert_eq!(dc["response_code"], 0, "{dc}");
    let dpe = lines.iter().find(|l| l["response_flags"] == "DPE").unwrap_or_else(|| panic!("{lines:#?}"));
    assert_eq!(dpe["response_code"], 400);
}

#[test]
fn no_access_log_prints_nothing() {
    let (_upstream, v1) = start_upstream("v1", &[]);
    let (_dead_socket, dead) = refusing_port();
    let dir = TempDir::new("cli-sidecar");
    write_config(dir.path(), v1, dead);
    let (mut sidecar, bound) = start_sidecar(dir.path(), &["--no-access-log"]);
    assert_eq!(get(bound.outbound, "payment", "/").status, 200);
    assert_eq!(get(bound.outbound, "nosuch", "/").status, 404);
    // Metrics are still recorded.
    let metrics = get(bound.metrics, "metrics", "/stats/prometheus");
    assert!(metrics.body.contains("istio_requests_total{"), "{}", metrics.body);
    sidecar.term();
    assert_eq!(sidecar.wait_exit().code(), Some(0));
    assert_eq!(sidecar.stdout_lines(), Vec::<String>::new());
}

#[test]
fn upstream_process_answers() {
    let (mut upstream, addr) = start_upstream("v2", &["--pod", "payment-v2-abc"]);
    let reply = get(addr, "payment", "/");
    assert_eq!(reply.status, 200);
    assert!(reply.head.contains("x-version: v2"), "{}", reply.head);
    let json: Value = serde_json::from_str(&reply.body).expect("JSON");
    assert_eq!((json["service"].as_str(), json["version"].as_str()), (Some("payment"), Some("v2")));
    assert_eq!(json["pod"], "payment-v2-abc");
    assert_eq!(get(addr, "payment", "/status/418").status, 418);
    let echo: Value = serde_json::from_str(&get(addr, "payment", "/echo?x=1").body).expect("echo JSON");
    assert_eq!(echo["path"], "/echo");
    assert_eq!(echo["query"], "x=1");
    upstream.term();
    assert_eq!(upstream.wait_exit().code(), Some(0));

    // A bad flag value is a usage error.
    let out = Command::new(env!("CARGO_BIN_EXE_serin"))
        .args(["upstream", "--listen", "127.0.0.1:0", "--error-rate", "2"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn two_sidecars_side_by_side() {
    let (_upstream, v1) = start_upstream("v1", &[]);
    let (_dead_socket, dead) = refusing_port();
    let dir = TempDir::new("cli-sidecar");
    write_config(dir.path(), v1, dead);
    let (mut a, bound_a) = start_sidecar(dir.path(), &[]);
    let (mut b, bound_b) = start_sidecar(dir.path(), &[]);

    let mut ports: Vec<u16> = [bound_a, bound_b]
        .iter()
        .flat_map(|b| [b.outbound.port(), b.inbound.port(), b.admin.port(), b.metrics.port(), b.health.port()])
        .collect();
    ports.sort_unstable();
    ports.dedup();
    assert_eq!(ports.len(), 10, "every listener has its own port: {bound_a:?} {bound_b:?}");

    for bound in [bound_a, bound_b] {
        for _ in 0..3 {
            assert_eq!(get(bound.outbound, "payment", "/").status, 200);
        }
        assert_eq!(get(bound.health, "health", "/healthz/ready").status, 200);
        assert_eq!(get(bound.admin, "admin", "/ready").status, 200);
        let metrics = get(bound.metrics, "metrics", "/stats/prometheus").body;
        let total: f64 = metrics
            .lines()
            .filter(|l| l.starts_with("istio_requests_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        assert_eq!(total, 3.0, "each sidecar counts its own requests:\n{metrics}");
    }
    // Stopping one leaves the other serving.
    a.term();
    assert_eq!(a.wait_exit().code(), Some(0));
    assert_eq!(get(bound_b.outbound, "payment", "/").status, 200);
    b.term();
    assert_eq!(b.wait_exit().code(), Some(0));
}

#[test]
fn a_taken_port_is_a_clear_error() {
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").to_string();
    let dir = TempDir::new("cli-sidecar");
    let out = Command::new(env!("CARGO_BIN_EXE_serin"))
        .args(["sidecar", "--config"])
        .arg(dir.path())
        .args([
            "--outbound",
            "127.0.0.1:0",
            "--inbound",
            "127.0.0.1:0",
            "--admin",
            &port,
            "--metrics",
            "127.0.0.1:0",
            "--health",
            "127.0.0.1:0",
        ])
        .env("NO_COLOR", "1")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&port) && err.contains("--admin"), "{err}");
}

/// A bad certificate written over a running sidecar's identity is logged (on
/// stderr, naming the file) and the old certificate keeps serving.
#[test]
fn a_bad_certificate_reload_is_logged_and_the_old_one_keeps_serving() {
    let dir = TempDir::new("cli-sidecar");
    let ca = serin_certs::Ca::generate("cluster.local").expect("ca");
    let id: serin_certs::SpiffeId = "spiffe://cluster.local/ns/default/sa/frontend".parse().expect("id");
    let cert_dir = dir.path().join("identity");
    serin_certs::write_workload(&cert_dir, &ca.issue(&id, Duration::from_secs(3600)).expect("issue"))
        .expect("write identity");
    let (_up, v1) = start_upstream("v1", &[]);
    let dead = TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr");
    write_config(dir.path(), v1, dead);
    let cert_arg = cert_dir.to_string_lossy().into_owned();
    let (mut proc, bound) = start_sidecar(dir.path(), &["--cert-dir", &cert_arg]);
    proc.wait_stderr("workload identity loaded");
    assert_eq!(get(bound.outbound, "payment", "/").status, 200);

    std::fs::write(cert_dir.join("cert-chain.pem"), "-----BEGIN CERTIFICATE-----\ngarbage\n").expect("garbage");
    let line = proc.wait_stderr("cert-chain.pem");
    assert!(line.contains("WARN") || line.contains("ERROR"), "the reload error is a warning or an error: {line}");
    // The old identity keeps serving; admin shows the error.
    assert_eq!(get(bound.outbound, "payment", "/").status, 200);
    let dump = get(bound.admin, "admin", "/config_dump");
    let dump: Value = serde_json::from_str(&dump.body).expect("config_dump JSON");
    let last_error = dump["identity"]["last_error"].as_str().unwrap_or_default();
    assert!(last_error.contains("cert-chain.pem"), "config_dump identity: {}", dump["identity"]);
    assert_eq!(dump["identity"]["spiffe_id"], "spiffe://cluster.local/ns/default/sa/frontend");
}
