//! `serin control-plane` and `serin ctl` as real processes over loopback: bound
//! addresses parsed from the "control plane ready" log line, weights set and read
//! back, bad weights refused without a change, `status` with no sidecars, weights
//! kept across a restart on the same state folder, `/metrics`, an invalid folder
//! refused at start and an invalid edit ignored while running.
//!
//! Every wait is bounded; nothing asserts timings.

mod process_support;

use process_support::{TempDir, addr_field, fields, strip_ansi};

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(20);

/// The `payment` service: two endpoints (v1, v2), their subsets, all traffic to v1.
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
  host: payment.default.svc.cluster.local
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
      weight: 100
    - destination: {host: payment.default.svc.cluster.local, subset: v2}
      weight: 0
"#;

/// A config folder holding `payment.yaml`, and a state folder beside it.
fn folders() -> (TempDir, PathBuf, PathBuf) {
    let tmp = TempDir::new("control-plane");
    let config = tmp.path().join("config");
    let state = tmp.path().join("state");
    std::fs::create_dir_all(&config).expect("config dir");
    std::fs::write(config.join("payment.yaml"), PAYMENT).expect("write config");
    (tmp, config, state)
}

/// A running `serin control-plane` whose stderr lines are collected by a thread.
struct ControlPlane {
    child: Child,
    stderr: Arc<Mutex<Vec<String>>>,
    listen: SocketAddr,
    monitoring: SocketAddr,
}

impl ControlPlane {
    /// Starts `serin control-plane` on ephemeral ports and waits for its ready line.
    fn start(config: &Path, state: &Path) -> ControlPlane {
        let mut child = spawn_control_plane(config, state);
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let sink = stderr.clone();
        let reader = child.stderr.take().expect("stderr");
        std::thread::spawn(move || {
            for line in BufReader::new(reader).lines() {
                let Ok(line) = line else { return };
                sink.lock().expect("lines").push(strip_ansi(&line));
            }
        });
        let mut cp = ControlPlane {
            child,
            stderr,
            listen: "0.0.0.0:0".parse().expect("addr"),
            monitoring: "0.0.0.0:0".parse().expect("addr"),
        };
        let line = cp.wait_stderr("control plane ready");
        let f = fields(&line);
        cp.listen = addr_field(&f, "listen");
        cp.monitoring = addr_field(&f, "monitoring");
        cp
    }

    fn stderr_text(&self) -> String {
        self.stderr.lock().expect("lines").join("\n")
    }

    /// The first stderr line containing `needle` (bounded wait).
    fn wait_stderr(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            if let Some(line) = self.stderr.lock().expect("lines").iter().find(|l| l.contains(needle)) {
                return line.clone();
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("serin exited ({status}) before logging {needle:?}:\n{}", self.stderr_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("no {needle:?} on stderr within {WAIT:?}:\n{}", self.stderr_text());
    }

    /// Runs `serin ctl --control-plane <this> args…`.
    fn ctl(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_serin"))
            .arg("ctl")
            .arg("--control-plane")
            .arg(self.listen.to_string())
            .args(args)
            .env_remove("SERIN_CONTROL_PLANE")
            .env("NO_COLOR", "1")
            .output()
            .expect("run serin ctl")
    }

    /// Sends SIGTERM and waits for the exit (bounded).
    fn stop(&mut self) -> ExitStatus {
        let status = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().expect("run kill");
        assert!(status.success(), "kill -TERM failed");
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("serin control-plane did not exit within {WAIT:?}:\n{}", self.stderr_text());
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn spawn_control_plane(config: &Path, state: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_serin"))
        .arg("control-plane")
        .arg("--config-dir")
        .arg(config)
        .arg("--state-dir")
        .arg(state)
        .args(["--listen", "127.0.0.1:0", "--monitoring", "127.0.0.1:0"])
        .env("NO_COLOR", "1")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn serin control-plane")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The `weight:` values of `serin ctl get routes payment`, in order.
fn route_weights(cp: &ControlPlane) -> Vec<u32> {
    let out = cp.ctl(&["get", "routes", "payment"]);
    assert!(out.status.success(), "get routes failed: {}", stderr(&out));
    stdout(&out)
        .lines()
        .filter_map(|l| l.trim().strip_prefix("weight:"))
        .map(|w| w.trim().parse().expect("weight"))
        .collect()
}

#[test]
fn set_weight_changes_the_routes_and_bad_weights_change_nothing() {
    let (_tmp, config, state) = folders();
    let cp = ControlPlane::start(&config, &state);
    assert_eq!(route_weights(&cp), vec![100, 0]);

    let out = cp.ctl(&["set-weight", "payment", "v1=90", "v2=10"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("v1=90 v2=10"), "{}", stdout(&out));
    assert_eq!(route_weights(&cp), vec![90, 10]);

    let out = cp.ctl(&["set-weight", "payment", "v1=90", "v2=20"]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(stderr(&out).contains("add up to 110"), "{}", stderr(&out));
    assert_eq!(route_weights(&cp), vec![90, 10]);

    let out = cp.ctl(&["set-weight", "payment", "v1=90", "v3=10"]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(stderr(&out).contains("no subset v3"), "{}", stderr(&out));
    assert_eq!(route_weights(&cp), vec![90, 10]);

    let out = cp.ctl(&["set-weight", "payment", "v1"]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(stderr(&out).contains("SUBSET=PERCENT"), "{}", stderr(&out));

    // --wait with no sidecar connected returns at once.
    let out = cp.ctl(&["set-weight", "payment", "v1=75", "v2=25", "--wait", "--timeout", "2s"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("no connected sidecar"), "{}", stdout(&out));
    assert_eq!(route_weights(&cp), vec![75, 25]);

    let out = cp.ctl(&["rollback", "payment"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(route_weights(&cp), vec![100, 0]);

    let out = cp.ctl(&["get", "clusters", "payment"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("kind: DestinationRule"), "{}", stdout(&out));
    let out = cp.ctl(&["get", "endpoints", "payment"]);
    assert!(stdout(&out).contains("kind: ServiceEntry"), "{}", stdout(&out));
}

#[test]
fn status_runs_with_no_sidecars() {
    let (_tmp, config, state) = folders();
    let cp = ControlPlane::start(&config, &state);
    let out = cp.ctl(&["status"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.starts_with("NODE"), "{text}");
    assert!(text.contains("ROUTES"), "{text}");
    assert!(text.contains("no sidecars connected"), "{text}");
    assert!(text.contains("routes=1"), "{text}");
}

#[test]
fn ctl_without_a_control_plane_fails_clearly() {
    let out = Command::new(env!("CARGO_BIN_EXE_serin"))
        .args(["ctl", "status"])
        .env("SERIN_CONTROL_PLANE", "127.0.0.1:1")
        .output()
        .expect("run serin ctl");
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("cannot reach the control plane at 127.0.0.1:1"), "{}", stderr(&out));
}

#[test]
fn a_restart_on_the_same_state_dir_keeps_the_weights() {
    let (_tmp, config, state) = folders();
    let mut cp = ControlPlane::start(&config, &state);
    let out = cp.ctl(&["set-weight", "payment", "v1=90", "v2=10"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let status = cp.stop();
    assert!(status.success(), "{status}\n{}", cp.stderr_text());
    assert!(cp.stderr_text().contains("draining"), "{}", cp.stderr_text());

    let cp = ControlPlane::start(&config, &state);
    assert_eq!(route_weights(&cp), vec![90, 10]);
    let out = cp.ctl(&["reset-weights", "payment"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(route_weights(&cp), vec![100, 0]);
}

#[test]
fn metrics_answer_on_monitoring() {
    let (_tmp, config, state) = folders();
    let cp = ControlPlane::start(&config, &state);
    let mut stream = TcpStream::connect(cp.monitoring).expect("connect monitoring");
    stream.set_read_timeout(Some(WAIT)).expect("timeout");
    stream.write_all(b"GET /metrics HTTP/1.1\r\nhost: cp\r\nconnection: close\r\n\r\n").expect("write");
    let mut reply = String::new();
    stream.read_to_string(&mut reply).expect("read");
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    for name in [
        "serin_control_plane_connected_sidecars 0",
        "serin_control_plane_pushes_total",
        "serin_control_plane_nacks_total",
        "serin_control_plane_push_to_ack_seconds",
    ] {
        assert!(reply.contains(name), "no {name} in:\n{reply}");
    }
}

#[test]
fn an_invalid_folder_is_refused_at_start_with_every_error() {
    let (tmp, config, state) = folders();
    std::fs::write(config.join("bad.yaml"), PAYMENT.replace("kind: DestinationRule", "kind: DestinationRulez"))
        .expect("write");
    let out = spawn_control_plane(&config, &state).wait_with_output().expect("wait");
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("invalid config"), "{err}");
    assert!(err.contains("bad.yaml"), "{err}");
    drop(tmp);
}

#[test]
fn an_invalid_edit_is_logged_and_the_last_good_config_stays() {
    let (_tmp, config, state) = folders();
    let mut cp = ControlPlane::start(&config, &state);
    std::fs::write(config.join("payment.yaml"), PAYMENT.replace("weight: 0", "weight: zero")).expect("write");
    cp.wait_stderr("config rejected");
    assert_eq!(route_weights(&cp), vec![100, 0]);

    std::fs::write(
        config.join("payment.yaml"),
        PAYMENT.replace("weight: 100", "weight: 60").replace("weight: 0", "weight: 40"),
    )
    .expect("write");
    cp.wait_stderr("config reloaded");
    assert_eq!(route_weights(&cp), vec![60, 40]);
}

/// A simulated sidecar: a discovery subscription (control-api's client) in a tokio
/// runtime, whose handler rejects any routes holding `reject` (when given).
struct FakeSidecar {
    runtime: tokio::runtime::Runtime,
    subscription: Option<serin_control_api::client::Subscription>,
}

impl FakeSidecar {
    fn connect(cp: &ControlPlane, id: &str, reject: Option<&'static str>) -> FakeSidecar {
        use serin_control_api::client::{Update, subscribe};
        let runtime =
            tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
        let node = serin_control_api::pb::Node {
            id: id.to_string(),
            workload: "frontend".into(),
            namespace: "default".into(),
            ..Default::default()
        };
        let handler = move |update: Update<'_>| -> Result<(), String> {
            match reject {
                Some(text) if update.state.yaml().contains(text) => Err(format!("refusing {text:?}")),
                _ => Ok(()),
            }
        };
        let subscription = {
            let _guard = runtime.enter();
            subscribe(&cp.listen.to_string(), node, &serin_control_api::ResourceType::ALL, handler).expect("subscribe")
        };
        let status = subscription.status();
        let deadline = Instant::now() + WAIT;
        while status.borrow().applied == 0 {
            assert!(Instant::now() < deadline, "the fake sidecar never got its first config");
            std::thread::sleep(Duration::from_millis(20));
        }
        FakeSidecar { runtime, subscription: Some(subscription) }
    }
}

impl Drop for FakeSidecar {
    fn drop(&mut self) {
        if let Some(subscription) = self.subscription.take() {
            self.runtime.block_on(subscription.shutdown());
        }
    }
}

#[test]
fn wait_reports_the_acks_and_status_shows_the_sidecar() {
    let (_tmp, config, state) = folders();
    let cp = ControlPlane::start(&config, &state);
    let _sidecar = FakeSidecar::connect(&cp, "frontend-1", None);

    let out = cp.ctl(&["set-weight", "payment", "v1=90", "v2=10", "--wait"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("ACKed by 1 sidecar(s); slowest push-to-ACK"), "{}", stdout(&out));

    let out = cp.ctl(&["status"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let row = text.lines().find(|l| l.starts_with("frontend-1")).unwrap_or_else(|| panic!("no row:\n{text}"));
    assert!(row.contains("SYNCED v2"), "{text}");
    assert!(row.contains("frontend.default"), "{text}");

    let mut stream = TcpStream::connect(cp.monitoring).expect("connect monitoring");
    stream.set_read_timeout(Some(WAIT)).expect("timeout");
    stream.write_all(b"GET /metrics HTTP/1.1\r\nhost: cp\r\nconnection: close\r\n\r\n").expect("write");
    let mut reply = String::new();
    stream.read_to_string(&mut reply).expect("read");
    assert!(reply.contains("serin_control_plane_connected_sidecars 1"), "{reply}");
    assert!(reply.contains("serin_control_plane_pushes_total{type=\"routes\"} 2"), "{reply}");
}

#[test]
fn wait_fails_clearly_when_a_sidecar_nacks() {
    let (_tmp, config, state) = folders();
    let cp = ControlPlane::start(&config, &state);
    let _sidecar = FakeSidecar::connect(&cp, "picky-1", Some("weight: 50"));

    let out = cp.ctl(&["set-weight", "payment", "v1=50", "v2=50", "--wait"]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let err = stderr(&out);
    assert!(err.contains("1 of 1 sidecar(s) rejected routes version 2"), "{err}");
    assert!(err.contains("picky-1"), "{err}");

    let out = cp.ctl(&["status"]);
    let text = stdout(&out);
    assert!(text.contains("NACKED"), "{text}");
    assert!(text.contains("last NACK: picky-1 routes v2"), "{text}");
}
