//! Helpers shared by the tests that run `serin` as a real process: a child process
//! with its log lines collected, a `serin upstream`, a temporary folder, ANSI-free log
//! lines, and `key=value` fields of the `fmt` log format.
#![allow(dead_code)] // each test file uses its own subset

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a [`Proc`] waits for a log line or for its exit.
pub const PROC_WAIT: Duration = Duration::from_secs(30);

/// A child process whose stdout and stderr lines are collected (ANSI-free) by threads;
/// killed on drop.
pub struct Proc {
    name: String,
    child: Child,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
}

fn collect(reader: impl Read + Send + 'static, sink: Arc<Mutex<Vec<String>>>) {
    std::thread::spawn(move || {
        for line in BufReader::new(reader).lines().map_while(Result::ok) {
            sink.lock().expect("lines").push(strip_ansi(&line));
        }
    });
}

impl Proc {
    /// Starts `program` with `args` (`NO_COLOR=1`, `RUST_LOG=info`); `name` is used in
    /// failure messages.
    pub fn spawn(program: &Path, args: &[&str], name: &str) -> Proc {
        let mut child = Command::new(program)
            .args(args)
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({}): {e}", program.display()));
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        collect(child.stdout.take().expect("stdout"), stdout.clone());
        collect(child.stderr.take().expect("stderr"), stderr.clone());
        Proc { name: name.to_string(), child, stdout, stderr }
    }

    /// Starts the `serin` binary under test with `args`.
    pub fn serin(args: &[&str], name: &str) -> Proc {
        Proc::spawn(Path::new(env!("CARGO_BIN_EXE_serin")), args, name)
    }

    /// Every stderr line so far.
    pub fn stderr_text(&self) -> String {
        self.stderr.lock().expect("lines").join("\n")
    }

    /// Every stdout line so far.
    pub fn stdout_lines(&self) -> Vec<String> {
        self.stdout.lock().expect("lines").clone()
    }

    /// The first stderr line containing `needle` (bounded wait: [`PROC_WAIT`]).
    pub fn wait_stderr(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + PROC_WAIT;
        while Instant::now() < deadline {
            if let Some(line) = self.stderr.lock().expect("lines").iter().find(|l| l.contains(needle)) {
                return line.clone();
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("{} exited ({status}) before logging {needle:?}:\n{}", self.name, self.stderr_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("{}: no {needle:?} on stderr within {PROC_WAIT:?}:\n{}", self.name, self.stderr_text());
    }

    /// Sends SIGTERM with the `kill` command.
    pub fn term(&self) {
        let status = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().expect("run kill");
        assert!(status.success(), "kill -TERM failed");
    }

    /// Waits for the process to exit (bounded), then for its output to be read.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + PROC_WAIT;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                // Let the reader threads see the end of both pipes.
                std::thread::sleep(Duration::from_millis(100));
                return status;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("{} did not exit within {PROC_WAIT:?}:\n{}", self.name, self.stderr_text());
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The flags that put a `serin sidecar` on free loopback ports as workload `frontend`
/// (app `frontend`, version `v1`).
pub const LOOPBACK_SIDECAR: [&str; 16] = [
    "--outbound",
    "127.0.0.1:0",
    "--inbound",
    "127.0.0.1:0",
    "--admin",
    "127.0.0.1:0",
    "--metrics",
    "127.0.0.1:0",
    "--health",
    "127.0.0.1:0",
    "--workload",
    "frontend",
    "--app-label",
    "frontend",
    "--app-version",
    "v1",
];

/// Starts `serin sidecar` with `flags` and [`LOOPBACK_SIDECAR`]; returns it once it
/// logged `sidecar ready`, with that line's fields (its listeners' addresses).
pub fn spawn_sidecar(flags: &[&str]) -> (Proc, HashMap<String, String>) {
    let mut args = vec!["sidecar"];
    args.extend_from_slice(flags);
    args.extend_from_slice(&LOOPBACK_SIDECAR);
    let mut proc = Proc::serin(&args, "sidecar");
    let ready = fields(&proc.wait_stderr("sidecar ready"));
    (proc, ready)
}

/// A running `serin upstream --version VERSION` on a free loopback port, with `extra`
/// flags, and its address.
pub fn start_upstream(version: &str, extra: &[&str]) -> (Proc, SocketAddr) {
    let mut args = vec!["upstream", "--listen", "127.0.0.1:0", "--version", version];
    args.extend_from_slice(extra);
    let mut proc = Proc::serin(&args, &format!("upstream {version}"));
    let line = proc.wait_stderr("demo upstream listening");
    let addr = addr_field(&fields(&line), "addr");
    (proc, addr)
}

/// A fresh folder under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    /// A new empty folder whose name starts with `serin-<prefix>-`.
    pub fn new(prefix: &str) -> TempDir {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("serin-{prefix}-{}-{nanos}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }

    /// The folder.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Removes ANSI escape sequences (colours), in case the log has them.
pub fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// `key=value` fields of a log line (plain fmt format).
pub fn fields(line: &str) -> HashMap<String, String> {
    line.split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
        .collect()
}

/// The socket address in field `key` (also as tracing's `Some(addr)`).
pub fn addr_field(fields: &HashMap<String, String>, key: &str) -> SocketAddr {
    let raw = fields.get(key).unwrap_or_else(|| panic!("no {key} in {fields:?}"));
    let raw = raw.strip_prefix("Some(").and_then(|r| r.strip_suffix(')')).unwrap_or(raw);
    raw.parse().unwrap_or_else(|e| panic!("{key}={raw}: {e}"))
}

/// The FQDN of the `payment` service of [`payment_mesh_yaml`].
pub const PAYMENT_FQDN: &str = "payment.default.svc.cluster.local";

/// `payment` with one v1 and one v2 endpoint, their subsets, an even split and no
/// retries (so every answer a client sees comes from the version that was picked).
pub fn payment_mesh_yaml(v1: SocketAddr, v2: SocketAddr) -> String {
    format!(
        r#"apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: payment, namespace: default}}
spec:
  hosts: [{PAYMENT_FQDN}]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 8080, name: http, protocol: HTTP}}]
  endpoints:
  - {{address: {}, ports: {{http: {}}}, labels: {{app: payment, version: v1}}}}
  - {{address: {}, ports: {{http: {}}}, labels: {{app: payment, version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: payment, namespace: default}}
spec:
  host: {PAYMENT_FQDN}
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v2, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: payment, namespace: default}}
spec:
  hosts: [{PAYMENT_FQDN}]
  http:
  - route:
    - {{destination: {{host: {PAYMENT_FQDN}, subset: v1}}, weight: 50}}
    - {{destination: {{host: {PAYMENT_FQDN}, subset: v2}}, weight: 50}}
    retries: {{attempts: 0}}
"#,
        v1.ip(),
        v1.port(),
        v2.ip(),
        v2.port()
    )
}
