//! Per-version load reports end to end, with real processes over loopback: `serin
//! upstream` v1 (healthy) and v2 (20% injected 503s), `serin control-plane` serving a
//! 50/50 split, `serin sidecar --control-plane` reporting its load every 200 ms. After N
//! requests through the sidecar, `serin ctl load payment` and `GetLoad` show N requests
//! split by version as the client saw them, with the 5xx the client saw, and the
//! control plane's `/metrics` shows the gauges.
//!
//! Every wait is bounded; nothing asserts timings.

mod process_support;

use process_support::{
    PAYMENT_FQDN, Proc, TempDir, addr_field, fields, payment_mesh_yaml, spawn_sidecar, start_upstream,
};

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(20);
const N: usize = 200;

/// One HTTP/1.1 request with `Connection: close`: the status and the lower-cased head.
fn get(addr: SocketAddr, host: &str, path: &str) -> (u16, String, String) {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(WAIT)).expect("timeout");
    let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    stream.write_all(req.as_bytes()).expect("write request");
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).expect("read response");
    let raw = String::from_utf8_lossy(&raw);
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no response head: {raw:?}"));
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("{head}"));
    (status, head.to_ascii_lowercase(), body.to_string())
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(':')).map(str::trim)
}

fn ctl(listen: SocketAddr, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_serin"))
        .arg("ctl")
        .arg("--control-plane")
        .arg(listen.to_string())
        .args(args)
        .env_remove("SERIN_CONTROL_PLANE")
        .env("NO_COLOR", "1")
        .output()
        .expect("run serin ctl")
}

/// `(version, requests, reporters)` of each row of `serin ctl load`'s table.
fn table_rows(table: &str) -> Vec<(String, u64, u64)> {
    table
        .lines()
        .filter(|l| l.starts_with(PAYMENT_FQDN))
        .map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            assert_eq!(cols.len(), 9, "{l}");
            (cols[1].to_string(), cols[7].parse().expect("requests"), cols[8].parse().expect("reporters"))
        })
        .collect()
}

fn write_folder(dir: &Path, yaml: &str) {
    std::fs::create_dir_all(dir).expect("config dir");
    std::fs::write(dir.join("payment.yaml"), yaml).expect("write config");
}

#[test]
fn a_sidecars_load_reports_reach_ctl_load_and_get_load_by_version() {
    let tmp = TempDir::new("load-report");
    let (_v1, v1) = start_upstream("v1", &[]);
    let (_v2, v2) = start_upstream("v2", &["--error-rate", "0.2"]);
    let config = tmp.path().join("config");
    write_folder(&config, &payment_mesh_yaml(v1, v2));
    let state = tmp.path().join("state");
    let (config, state) = (config.to_string_lossy().into_owned(), state.to_string_lossy().into_owned());
    let mut cp = Proc::serin(
        &[
            "control-plane",
            "--config-dir",
            &config,
            "--state-dir",
            &state,
            "--listen",
            "127.0.0.1:0",
            "--monitoring",
            "127.0.0.1:0",
        ],
        "control plane",
    );
    let ready = fields(&cp.wait_stderr("control plane ready"));
    let (listen, monitoring) = (addr_field(&ready, "listen"), addr_field(&ready, "monitoring"));
    let listen_arg = listen.to_string();
    let (sidecar, bound) =
        spawn_sidecar(&["--control-plane", &listen_arg, "--node-id", "frontend-1", "--load-report-interval", "200ms"]);
    let (outbound, health) = (addr_field(&bound, "outbound"), addr_field(&bound, "health"));
    let admin = addr_field(&bound, "admin");
    // Ready = the first config from the control plane is applied.
    let deadline = Instant::now() + WAIT;
    while get(health, "health", "/healthz/ready").0 != 200 {
        assert!(Instant::now() < deadline, "the sidecar never became ready:\n{}", sidecar.stderr_text());
        std::thread::sleep(Duration::from_millis(50));
    }

    // N requests; what the client saw, per version: (requests, 5xx).
    let mut seen: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for _ in 0..N {
        let (status, head, body) = get(outbound, PAYMENT_FQDN, "/");
        let version = header(&head, "x-version").unwrap_or_else(|| panic!("no x-version: {status} {head} {body}"));
        let entry = seen.entry(version.to_string()).or_default();
        entry.0 += 1;
        entry.1 += u64::from(status >= 500);
        assert!(status == 200 || status == 503, "{status} {body}");
    }
    assert_eq!(seen.keys().collect::<Vec<_>>(), ["v1", "v2"], "{seen:?}");
    assert_eq!(seen["v1"].1, 0, "v1 is healthy");

    // `serin ctl load payment` shows them once the reports arrived.
    let deadline = Instant::now() + WAIT;
    let table = loop {
        let out = ctl(listen, &["load", "payment", "--window", "5m"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "ctl load failed: {}", String::from_utf8_lossy(&out.stderr));
        if table_rows(&text).iter().map(|r| r.1).sum::<u64>() == N as u64 {
            break text;
        }
        assert!(Instant::now() < deadline, "the figures never added up to {N}:\n{text}\n{}", cp.stderr_text());
        std::thread::sleep(Duration::from_millis(100));
    };
    let rows = table_rows(&table);
    let expected: Vec<(String, u64, u64)> = seen.iter().map(|(v, (n, _))| (v.clone(), *n, 1)).collect();
    assert_eq!(rows, expected, "{table}");
    assert!(table.starts_with("SERVICE"), "{table}");

    // GetLoad has the 5xx too.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let figures = rt.block_on(async {
        let mut client = serin_control_api::client::LoadClient::connect(&listen_arg).await.expect("load client");
        client.load("payment", Some(Duration::from_secs(300)), true).await.expect("GetLoad")
    });
    for v in &figures.versions {
        let (requests, errors) = seen[&v.version];
        assert_eq!((v.service.as_str(), v.requests, v.status_5xx), (PAYMENT_FQDN, requests, errors), "{v:?}");
        assert_eq!(v.status_2xx, requests - errors, "{v:?}");
        assert!(v.p99_ms.is_some(), "{v:?}");
        assert_eq!(v.series.iter().map(|p| p.requests).sum::<u64>(), requests);
    }

    // The monitoring port shows the gauges and the reports.
    let (status, _, metrics) = get(monitoring, "monitoring", "/metrics");
    assert_eq!(status, 200);
    let gauge = format!("serin_load_requests_per_second{{service=\"{PAYMENT_FQDN}\",version=\"v2\"}}");
    assert!(metrics.contains(&gauge), "{metrics}");
    assert!(metrics.contains("serin_load_success_ratio{"), "{metrics}");
    let reports = metrics
        .lines()
        .find_map(|l| l.strip_prefix("serin_load_reports_total "))
        .and_then(|n| n.trim().parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no serin_load_reports_total:\n{metrics}"));
    assert!(reports >= 1, "{metrics}");

    // The sidecar's `/config_dump` counts the reports it sent, none dropped or left out.
    let (status, _, dump) = get(admin, "admin", "/config_dump");
    assert_eq!(status, 200);
    let dump: serde_json::Value = serde_json::from_str(&dump).expect("config_dump is JSON");
    let counts = &dump["control_plane"]["load_reports"];
    assert!(counts["sent"].as_u64().is_some_and(|n| n >= 1), "{counts}");
    assert_eq!(counts["requests_not_reported"].as_u64(), Some(0), "{counts}");
}
