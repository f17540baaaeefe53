//! `serin gateway` as a real process: ports mapped with `--listen`, the bound
//! addresses read from the `gateway ready` log line, an HTTPS request with curl,
//! drain on SIGTERM; a missing certificate file fails the start, naming it.

mod gateway_support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Instant;

use gateway_support::{Pki, TempDir, WAIT, resolve, service_entry};

fn serin() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_serin"));
    cmd.env("RUST_LOG", "info").env("NO_COLOR", "1").stdin(Stdio::null());
    cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_https_and_drains_on_sigterm() {
    serves_https_and_drains(&[]).await;
}

/// The same on one thread (`--concurrency 1`: tokio's current-thread runtime).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_thread_serves_https_and_drains() {
    serves_https_and_drains(&["--concurrency", "1"]).await;
}

/// A gateway started with `extra` flags terminates TLS for a Gateway server,
/// routes to the app, and exits 0 on SIGTERM.
async fn serves_https_and_drains(extra: &[&str]) {
    let dir = TempDir::new("cli");
    let pki = Pki::new("cli CA");
    pki.server(&["pay.example.com"], 5).write(&dir.path().join("certs"), "pay");
    let ca = gateway_support::write_atomic(&dir.path().join("ca.pem"), &pki.ca_pem);
    let app =
        serin::demo_app::DemoApp::start("127.0.0.1:0".parse().expect("addr"), Default::default()).await.expect("app");
    let mut config = service_entry("payment", "prod", "payment.prod.svc.cluster.local", app.addr(), "HTTP");
    config += "apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: edge, namespace: prod}
spec:
  servers:
  - port: {number: 443, name: https, protocol: HTTPS}
    hosts: [pay.example.com]
    tls: {mode: SIMPLE, serverCertificate: certs/pay.crt, privateKey: certs/pay.key}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: pay, namespace: prod}
spec:
  hosts: [pay.example.com]
  gateways: [edge]
  http: [{route: [{destination: {host: payment}}]}]
";
    let path = dir.write("gateway.yaml", &config);
    let mut child = serin()
        .args(["gateway", "--config"])
        .arg(&path)
        .args(["--listen", "443=127.0.0.1:0", "--admin", "127.0.0.1:0", "--metrics", "127.0.0.1:0"])
        .args(["--health", "127.0.0.1:0", "--no-access-log"])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn serin gateway");
    let (tx, rx) = mpsc::channel();
    let stderr = child.stderr.take().expect("stderr");
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + WAIT;
    let addr = loop {
        let line = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())).expect("gateway ready line");
        if let Some(rest) = line.split("ports=443=").nth(1) {
            break rest.split([' ', ',']).next().and_then(|a| a.parse().ok()).expect("address");
        }
    };
    let out = gateway_support::curl(vec![
        "--cacert".into(),
        ca.display().to_string(),
        "--resolve".into(),
        resolve("pay.example.com", addr),
        format!("https://pay.example.com:{}/", addr.port()),
    ])
    .await;
    assert!(gateway_support::stdout(&out).contains("\"service\":\"payment\""), "{out:?}");
    let pid = child.id().to_string();
    let killed = Command::new("kill").args(["-TERM", &pid]).status().expect("kill");
    assert!(killed.success());
    let status = tokio::task::spawn_blocking(move || child.wait()).await.expect("join").expect("wait");
    assert!(status.success(), "{status:?}");
}

#[test]
fn a_missing_certificate_fails_the_start() {
    let dir = TempDir::new("cli-bad");
    let path = dir.write(
        "gateway.yaml",
        "apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: edge, namespace: prod}
spec:
  servers:
  - port: {number: 443, name: https, protocol: HTTPS}
    hosts: [pay.example.com]
    tls: {mode: SIMPLE, serverCertificate: /missing/pay.crt, privateKey: /missing/pay.key}
",
    );
    let out = serin()
        .args(["gateway", "--config"])
        .arg(&path)
        .args(["--listen", "443=127.0.0.1:0", "--admin", "127.0.0.1:0", "--metrics", "127.0.0.1:0"])
        .args(["--health", "127.0.0.1:0"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("/missing/pay.crt") && stderr.contains("spec.servers[0].tls"), "{stderr}");
}
