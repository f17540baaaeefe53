//! The load generator against the real demo upstream on loopback. Counts are
//! asserted (they follow from the configuration); timings never are.

use std::time::Duration;

use serin::demo_app::{AppConfig, DemoApp};
use serin_benches::load::{LoadConfig, Protocol, Rate, run, run_until};

async fn app(cfg: AppConfig) -> DemoApp {
    DemoApp::start("127.0.0.1:0".parse().unwrap(), cfg).await.expect("demo app starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_loop_http1_counts_requests_and_versions() {
    let app = app(AppConfig::new("payment", "v1")).await;
    let mut cfg = LoadConfig::new(app.addr(), "payment");
    cfg.connections = 4;
    cfg.max_requests = Some(300);
    let r = run(cfg).await.unwrap();
    assert_eq!(r.requests, 300);
    assert_eq!(r.responses.success, 300);
    assert_eq!(r.errors.total, 0);
    assert_eq!(r.versions["v1"].requests, 300);
    assert_eq!(r.versions["v1"].share, 1.0);
    assert_eq!(r.latency_ms.count, 300);
    assert!(!r.coordinated_omission_corrected);
    assert_eq!(r.protocol, "http1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_loop_h2c_shares_connections() {
    let app = app(AppConfig::new("payment", "v2")).await;
    let mut cfg = LoadConfig::new(app.addr(), "payment");
    cfg.protocol = Protocol::Http2;
    cfg.connections = 8;
    cfg.h2_connections = Some(2);
    cfg.path = "/echo".into();
    cfg.max_requests = Some(200);
    let r = run(cfg).await.unwrap();
    assert_eq!(r.requests, 200);
    assert_eq!(r.responses.success, 200);
    assert_eq!(r.versions["v2"].requests, 200);
    assert_eq!(r.protocol, "h2c");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_loop_sends_the_scheduled_count() {
    let app = app(AppConfig::default()).await;
    let mut cfg = LoadConfig::new(app.addr(), "payment");
    cfg.connections = 4;
    // 400/s over 4 slots: one request every 10 ms per slot, slots 2.5 ms apart, none
    // scheduled at or after 500 ms: exactly 200, however slow the machine.
    cfg.rate = Rate::PerSecond(400);
    cfg.duration = Some(Duration::from_millis(500));
    let r = run(cfg).await.unwrap();
    assert_eq!(r.requests, 200);
    assert_eq!(r.responses.success, 200);
    assert!(r.coordinated_omission_corrected);
    assert_eq!(r.service_time_ms.count, 200);
    assert_eq!(r.target_rate, Some(400));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_are_counted_by_class() {
    let cfg = AppConfig { error_rate: 1.0, ..AppConfig::default() };
    let app = app(cfg).await;
    let mut cfg = LoadConfig::new(app.addr(), "payment");
    cfg.connections = 2;
    cfg.max_requests = Some(50);
    let r = run(cfg).await.unwrap();
    assert_eq!(r.requests, 50);
    assert_eq!(r.responses.server_error, 50);
    assert_eq!(r.errors.http_5xx, 50);
    assert_eq!(r.errors.total, 50);
    // The error answers still name their version.
    assert_eq!(r.versions["v1"].requests, 50);

    let ok = app_ok().await;
    let mut cfg = LoadConfig::new(ok.addr(), "payment");
    cfg.path = "/status/404".into();
    cfg.max_requests = Some(10);
    let r = run(cfg).await.unwrap();
    assert_eq!(r.responses.client_error, 10);
    assert_eq!(r.errors.http_4xx, 10);
}

async fn app_ok() -> DemoApp {
    app(AppConfig::default()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_connections_are_errors_and_the_run_ends() {
    // A port that was just free: nothing listens there.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let mut cfg = LoadConfig::new(addr, "payment");
    cfg.connections = 2;
    cfg.rate = Rate::PerSecond(100);
    cfg.duration = Some(Duration::from_millis(300));
    let r = run(cfg).await.unwrap();
    assert!(r.requests > 0);
    assert_eq!(r.errors.connect, r.requests);
    assert_eq!(r.responses.success, 0);
    assert!(r.versions.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_are_errors() {
    let app = app_ok().await;
    let mut cfg = LoadConfig::new(app.addr(), "payment");
    cfg.path = "/delay/5000".into();
    cfg.timeout = Duration::from_millis(50);
    cfg.max_requests = Some(3);
    let r = run(cfg).await.unwrap();
    assert_eq!(r.requests, 3);
    assert_eq!(r.errors.timeout, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_signal_ends_an_unbounded_run() {
    let app = app_ok().await;
    let mut cfg = LoadConfig::new(app.addr(), "payment");
    cfg.connections = 2;
    cfg.rate = Rate::PerSecond(200);
    cfg.duration = Some(Duration::from_secs(3600));
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let run = tokio::spawn(run_until(cfg, stop));
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop_tx.send_replace(true);
    let r = tokio::time::timeout(Duration::from_secs(30), run).await.expect("stops").unwrap().unwrap();
    assert!(r.requests > 0);
    assert_eq!(r.errors.total, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serin_load_binary_prints_json() {
    let app = app_ok().await;
    let url = format!("http://{}/", app.addr());
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_serin-load"))
            .args(["--url", &url, "--host", "payment", "--requests", "100", "--connections", "4", "--json"])
            .output()
            .expect("run serin-load")
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    assert_eq!(v["requests"], 100);
    assert_eq!(v["responses"]["2xx"], 100);
    assert_eq!(v["versions"]["v1"]["requests"], 100);
    assert!(v["latency_ms"]["p99"].as_f64().is_some());
}
