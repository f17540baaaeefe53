//! The core of `serin-push-latency`: how long a weight change takes to reach every
//! sidecar, against a real `serin control-plane` process.
//!
//! 1. Writes a config folder (the `payment` service: subsets v1/v2, a 95/5 split,
//!    four endpoints, a mesh-wide `PeerAuthentication`) and a state folder in a temp
//!    folder, and starts `serin control-plane` on loopback with ephemeral ports.
//! 2. Opens `streams` simulated sidecars in this process: each is the real sidecar
//!    client ([`serin_control_api::client::subscribe_with`]) on its **own HTTP/2
//!    connection**, subscribed to all four resource types, and ACKs every response as
//!    soon as it has it (it does not compile the config: the CPU of the two shared
//!    cores is left to the control plane). Waits until every one has received and
//!    ACKed the first state, client side and as the control plane sees it
//!    (`WaitForAck`).
//! 3. Makes `changes` weight changes through the management API (`SetWeights`,
//!    alternating v1=90/v2=10 and v1=95/v2=5), one at a time, and for each measures
//!    the time from sending `SetWeights` to the moment the **last** simulated sidecar
//!    received the new version and queued its ACK (client side), beside the RPC's own
//!    round trip (with `wait`, it returns once the control plane has every ACK, as
//!    `serin ctl set-weight --wait` does).
//! 4. Samples the control plane's memory (`VmRSS`, `VmHWM` from `/proc/<pid>/status`)
//!    and CPU (`utime + stime` from `/proc/<pid>/stat`) at start, with every stream
//!    open and idle, and after the pushes.
//!
//! Every wait is bounded; a stream that fails, reconnects, NACKs or does not ACK in
//! time fails the run with its node's name.

use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;
use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use serin_control_api::client::{self, ClientError, ManagementClient, SubscribeOptions, Subscription, Update};
use serin_control_api::{ROUTES_TYPE_URL, ResourceType, pb};
use tokio::sync::{Notify, oneshot};

/// The service whose weights the benchmark changes.
pub const SERVICE: &str = "payment";

/// The two splits the changes alternate between (the config starts at 95/5, so the
/// first change goes to 90/10 and every change changes something).
const SPLITS: [[(&str, u32); 2]; 2] = [[("v1", 90), ("v2", 10)], [("v1", 95), ("v2", 5)]];

/// Lines of the control plane's log kept for error messages.
const LOG_LINES: usize = 200;

/// The config folder's one file: the demo's canary of `payment`.
const PAYMENT_YAML: &str = r#"# serin-push-latency: the canary of `payment` (v1 stable, v2 canary), 95/5.
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: payment
  namespace: default
spec:
  hosts:
  - payment
  http:
  - name: canary-override
    match:
    - headers:
        x-canary:
          exact: always
    route:
    - destination:
        host: payment
        subset: v2
  - name: split
    timeout: 3s
    retries:
      attempts: 2
      perTryTimeout: 1s
      retryOn: connect-failure,refused-stream
    route:
    - destination:
        host: payment
        subset: v1
      weight: 95
    - destination:
        host: payment
        subset: v2
      weight: 5
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: payment
  namespace: default
spec:
  host: payment
  trafficPolicy:
    loadBalancer:
      simple: LEAST_REQUEST
  subsets:
  - name: v1
    labels:
      version: v1
  - name: v2
    labels:
      version: v2
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: payment
  namespace: default
spec:
  hosts:
  - payment.default.svc.cluster.local
  location: MESH_INTERNAL
  resolution: STATIC
  ports:
  - number: 8080
    name: http
    protocol: HTTP
  endpoints:
  - address: 127.0.0.1
    ports: {http: 18081}
    labels: {app: payment, version: v1}
  - address: 127.0.0.2
    ports: {http: 18081}
    labels: {app: payment, version: v1}
  - address: 127.0.0.3
    ports: {http: 18081}
    labels: {app: payment, version: v1}
  - address: 127.0.0.4
    ports: {http: 18082}
    labels: {app: payment, version: v2}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: default
  namespace: default
spec:
  mtls:
    mode: STRICT
"#;

/// What to run.
#[derive(Debug, Clone)]
pub struct PushConfig {
    /// The `serin` binary to start as `serin control-plane`.
    pub serin_bin: PathBuf,
    /// Simulated sidecars, one discovery stream and one HTTP/2 connection each.
    pub streams: usize,
    /// Weight changes to make and time.
    pub changes: usize,
    /// Pause between two changes (after the last ACK of one, before the next).
    pub pause: Duration,
    /// How long to sample the control plane's CPU with every stream open and idle.
    pub idle: Duration,
    /// Bound on opening every stream and getting every first ACK.
    pub setup_timeout: Duration,
    /// Bound on one change: from `SetWeights` to the last ACK.
    pub change_timeout: Duration,
    /// Call `SetWeights` with `wait` (it returns once every sidecar ACKed, like
    /// `serin ctl set-weight --wait`); without, only the client side tells.
    pub server_wait: bool,
}

impl PushConfig {
    /// 1,000 streams, 50 changes 100 ms apart, a 5 s idle window, SetWeights with wait.
    pub fn new(serin_bin: PathBuf) -> PushConfig {
        PushConfig {
            serin_bin,
            streams: 1000,
            changes: 50,
            pause: Duration::from_millis(100),
            idle: Duration::from_secs(5),
            setup_timeout: Duration::from_secs(120),
            change_timeout: Duration::from_secs(10),
            server_wait: true,
        }
    }
}

/// Why a run failed.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    /// The `serin` binary is not there.
    #[error(
        "{} not found: build it with `cargo build --release -p serin` (or pass --serin-bin PATH)",
        .0.display()
    )]
    MissingBinary(PathBuf),
    /// A file or process operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: std::io::Error,
    },
    /// The control plane did not come up, or went away.
    #[error("serin control-plane {what}; its last log lines:\n{log}")]
    ControlPlane {
        /// What happened.
        what: String,
        /// The end of its stderr.
        log: String,
    },
    /// A management call failed.
    #[error("{what}: {source}")]
    Client {
        /// The call.
        what: String,
        /// Its error.
        source: ClientError,
    },
    /// Something did not happen in time.
    #[error("{what} within {waited:?}{detail}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long.
        waited: Duration,
        /// Who was missing, when known (starts with a newline).
        detail: String,
    },
    /// Simulated sidecars failed: NACKed, reconnected, or were not counted.
    #[error("{0}")]
    Streams(String),
    /// The file-descriptor limit is too low for the streams asked for.
    #[error(
        "the open-file limit is {limit}; {streams} streams need at least {need} (one socket each here and in the \
         control plane): raise it with `ulimit -n {need}` or ask for fewer --streams"
    )]
    FileLimit {
        /// The soft limit.
        limit: u64,
        /// Streams asked for.
        streams: usize,
        /// What they need.
        need: u64,
    },
}

pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> PushError {
    let what = what.into();
    move |source| PushError::Io { what, source }
}

pub fn rpc(what: impl Into<String>) -> impl FnOnce(ClientError) -> PushError {
    let what = what.into();
    move |source| PushError::Client { what, source }
}

/// Runs `fut` for at most `limit`; on timeout, the error says `what`.
pub async fn bounded<T>(
    what: &str,
    limit: Duration,
    fut: impl Future<Output = Result<T, PushError>>,
) -> Result<T, PushError> {
    tokio::time::timeout(limit, fut)
        .await
        .unwrap_or_else(|_| Err(PushError::Timeout { what: what.to_string(), waited: limit, detail: String::new() }))
}

// ----------------------------------------------------------------------------------
// /proc sampling
// ----------------------------------------------------------------------------------

/// Memory and CPU of a process at one moment.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct ProcSample {
    /// Resident set size now (`VmRSS`), KiB.
    pub vm_rss_kib: u64,
    /// Peak resident set size so far (`VmHWM`), KiB.
    pub vm_hwm_kib: u64,
    /// User + system CPU time so far (`utime + stime`), seconds.
    pub cpu_secs: f64,
}

impl ProcSample {
    /// Reads `/proc/<pid>/status` and `/proc/<pid>/stat` (`pid` "self" for this process).
    pub fn read(pid: &str, ticks_per_sec: f64) -> std::io::Result<ProcSample> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let kib = |key: &str| -> u64 {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        // The command name (field 2) may hold spaces: count fields after its ')'.
        let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
        let fields: Vec<&str> = after.split_whitespace().collect();
        // After ')': field 3 (state) is index 0, so utime (14) is 11 and stime (15) 12.
        let tick = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        let ticks = tick(11) + tick(12);
        Ok(ProcSample { vm_rss_kib: kib("VmRSS:"), vm_hwm_kib: kib("VmHWM:"), cpu_secs: ticks as f64 / ticks_per_sec })
    }
}

/// Clock ticks per second for `/proc/*/stat` (`getconf CLK_TCK`, else Linux's 100).
pub fn ticks_per_sec() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|t| *t > 0.0)
        .unwrap_or(100.0)
}

/// The soft limit on open files of this process (`/proc/self/limits`).
pub fn open_file_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.trim_start_matches("Max open files").split_whitespace().next()?.parse().ok()
}

// ----------------------------------------------------------------------------------
// The control plane process
// ----------------------------------------------------------------------------------

/// Removes a folder tree when dropped.
#[derive(Debug)]
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Result<TempDir, PushError> {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        let path = std::env::temp_dir().join(format!("serin-push-latency-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&path).map_err(io(format!("creating {}", path.display())))?;
        Ok(TempDir(path))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running `serin control-plane`; killed when dropped.
#[derive(Debug)]
pub struct ControlPlaneProcess {
    child: Child,
    log: Arc<Mutex<VecDeque<String>>>,
    pub listen: SocketAddr,
    _dir: TempDir,
}

/// Removes ANSI colour sequences (`ESC [ … m`).
fn strip_ansi(line: &str) -> String {
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

/// The `listen=ADDR` field of the "control plane ready" log line.
fn listen_field(line: &str) -> Option<SocketAddr> {
    line.split_whitespace().find_map(|f| f.strip_prefix("listen=")).and_then(|a| a.trim_matches('"').parse().ok())
}

impl ControlPlaneProcess {
    /// Writes the config folder and starts `serin control-plane` on ephemeral loopback
    /// ports; returns once it logged that it is ready.
    pub async fn start(serin_bin: &Path, timeout: Duration) -> Result<ControlPlaneProcess, PushError> {
        if !serin_bin.is_file() {
            return Err(PushError::MissingBinary(serin_bin.to_path_buf()));
        }
        let dir = TempDir::new()?;
        let config = dir.0.join("config");
        let state = dir.0.join("state");
        std::fs::create_dir_all(&config).map_err(io(format!("creating {}", config.display())))?;
        std::fs::write(config.join("payment.yaml"), PAYMENT_YAML).map_err(io("writing the config folder"))?;

        // Listeners added to `serin control-plane` later (TLS, …) must not take the
        // machine's fixed ports either: move every one the binary knows to loopback.
        let help = Command::new(serin_bin)
            .args(["control-plane", "--help"])
            .env("NO_COLOR", "1")
            .output()
            .map_err(io(format!("running {} control-plane --help", serin_bin.display())))?;
        let help = String::from_utf8_lossy(&help.stdout);
        let mut command = Command::new(serin_bin);
        command.arg("control-plane").arg("--config-dir").arg(&config).arg("--state-dir").arg(&state).args([
            "--listen",
            "127.0.0.1:0",
            "--monitoring",
            "127.0.0.1:0",
        ]);
        if help.contains("--listen-tls") {
            command.args(["--listen-tls", "127.0.0.1:0"]);
        }
        let mut child = command
            // Plaintext only, whatever the environment says (the TLS listener needs a CA).
            .env_remove("SERIN_CA_DIR")
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(io(format!("starting {} control-plane", serin_bin.display())))?;

        let log = Arc::new(Mutex::new(VecDeque::with_capacity(LOG_LINES)));
        let (ready_tx, ready_rx) = oneshot::channel::<Option<SocketAddr>>();
        if let Some(stderr) = child.stderr.take() {
            let sink = Arc::clone(&log);
            std::thread::spawn(move || {
                let mut ready = Some(ready_tx);
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    let line = strip_ansi(&line);
                    if line.contains("control plane ready")
                        && let Some(tx) = ready.take()
                    {
                        let _ = tx.send(listen_field(&line));
                    }
                    let mut log = sink.lock().unwrap_or_else(|e| e.into_inner());
                    if log.len() == LOG_LINES {
                        log.pop_front();
                    }
                    log.push_back(line);
                }
                // End of stderr: the process is gone; `ready` (if unsent) drops.
            });
        }
        let mut process = ControlPlaneProcess { child, log, listen: SocketAddr::from(([127, 0, 0, 1], 0)), _dir: dir };
        match tokio::time::timeout(timeout, ready_rx).await {
            Ok(Ok(Some(listen))) => {
                process.listen = listen;
                Ok(process)
            }
            Ok(Ok(None)) => Err(process.failed("logged `control plane ready` without a listen=ADDR field")),
            Ok(Err(_)) => {
                let status = process.child.wait().map(|s| s.to_string()).unwrap_or_default();
                Err(process.failed(&format!("exited ({status}) before it was ready")))
            }
            Err(_) => Err(process.failed(&format!("was not ready within {timeout:?}"))),
        }
    }

    pub fn pid(&self) -> String {
        self.child.id().to_string()
    }

    fn log_tail(&self, lines: usize) -> String {
        let log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        let skip = log.len().saturating_sub(lines);
        log.iter().skip(skip).cloned().collect::<Vec<_>>().join("\n")
    }

    pub fn failed(&self, what: &str) -> PushError {
        PushError::ControlPlane { what: what.to_string(), log: self.log_tail(40) }
    }

    /// Fails when the process has exited.
    pub fn check_alive(&mut self) -> Result<(), PushError> {
        match self.child.try_wait() {
            Ok(Some(status)) => Err(self.failed(&format!("exited ({status}) during the run"))),
            _ => Ok(()),
        }
    }

    pub fn sample(&self, ticks: f64) -> Result<ProcSample, PushError> {
        ProcSample::read(&self.pid(), ticks).map_err(io(format!("reading /proc/{} of the control plane", self.pid())))
    }

    /// SIGTERM (it drains), then SIGKILL if it is still there after `grace`.
    pub async fn stop(mut self, grace: Duration) {
        let _ = Command::new("kill").args(["-TERM", &self.pid()]).stderr(Stdio::null()).status();
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Drop kills it.
    }
}

impl Drop for ControlPlaneProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

// ----------------------------------------------------------------------------------
// Simulated sidecars
// ----------------------------------------------------------------------------------

/// When each simulated sidecar received (and queued the ACK of) each routes version.
#[derive(Debug, Default)]
struct AckLog {
    /// Routes version → (sidecar index, instant) per sidecar that took it.
    by_version: Mutex<HashMap<u64, Vec<(usize, Instant)>>>,
    changed: Notify,
}

/// Who had not taken a version when a wait timed out.
struct Missing {
    /// How many had.
    got: usize,
    /// The first few that had not, one per line.
    nodes: String,
}

impl AckLog {
    fn record(&self, sidecar: usize, version: u64, at: Instant) {
        self.by_version.lock().unwrap_or_else(|e| e.into_inner()).entry(version).or_default().push((sidecar, at));
        self.changed.notify_waiters();
    }

    fn takers(&self, version: u64) -> Vec<(usize, Instant)> {
        self.by_version.lock().unwrap_or_else(|e| e.into_inner()).get(&version).cloned().unwrap_or_default()
    }

    /// Waits until `count` sidecars (indexes `0..count`) took `version`; returns when
    /// each did, or who had not on timeout.
    async fn wait(&self, version: u64, count: usize, timeout: Duration) -> Result<Vec<Instant>, Missing> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let takers = self.takers(version);
            if takers.len() >= count {
                return Ok(takers.into_iter().map(|(_, at)| at).collect());
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                let takers = self.takers(version);
                let mut took = vec![false; count];
                for (i, _) in &takers {
                    if let Some(t) = took.get_mut(*i) {
                        *t = true;
                    }
                }
                let missing: Vec<String> = (0..count).filter(|i| !took[*i]).map(node_id).collect();
                let mut nodes: String = missing.iter().take(10).map(|n| format!("\n  {n} has not")).collect();
                if missing.len() > 10 {
                    let _ = write!(nodes, "\n  … and {} more", missing.len() - 10);
                }
                return Err(Missing { got: takers.len(), nodes });
            }
        }
    }
}

/// The simulated sidecars' node ids.
pub fn node_id(i: usize) -> String {
    format!("bench-sidecar-{i:05}")
}

/// Opens `count` subscriptions to `address`, each on its own connection.
fn open_streams(address: SocketAddr, count: usize, acks: &Arc<AckLog>) -> Result<Vec<Subscription>, PushError> {
    let mut subscriptions = Vec::with_capacity(count);
    for i in 0..count {
        let endpoint = client::endpoint(&format!("http://{address}")).map_err(rpc("the control plane's address"))?;
        let node = pb::Node {
            id: node_id(i),
            workload: "frontend".to_string(),
            namespace: "default".to_string(),
            labels: [("app", "frontend"), ("version", "v1")].into_iter().map(|(k, v)| (k.into(), v.into())).collect(),
        };
        let options = SubscribeOptions {
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(10),
            ..SubscribeOptions::default()
        };
        let acks = Arc::clone(acks);
        // ACK whatever arrives, as a sidecar whose compile succeeded would, and note
        // when each routes version arrived. A push without routes is NACKed.
        let handler = move |update: Update<'_>| -> Result<(), String> {
            let at = Instant::now();
            let routes = update.state.types.get(&ResourceType::Routes).ok_or("no routes in the push")?;
            if routes.resources.is_empty() {
                return Err("the routes type holds no resource".to_string());
            }
            let version = routes.version.parse::<u64>().map_err(|_| format!("routes version {:?}", routes.version))?;
            acks.record(i, version, at);
            Ok(())
        };
        subscriptions.push(client::subscribe_with(endpoint, node, options, handler));
    }
    Ok(subscriptions)
}

/// Fails when a simulated sidecar reconnected, lost its stream or NACKed.
pub fn check_streams(subscriptions: &[Subscription]) -> Result<(), PushError> {
    let mut bad = Vec::new();
    for (i, sub) in subscriptions.iter().enumerate() {
        let status = sub.status().borrow().clone();
        let problem = if status.connects > 1 {
            Some(format!("reconnected ({} streams opened)", status.connects))
        } else if !status.connected {
            Some("is not connected".to_string())
        } else {
            status.last_nack.as_ref().map(|nack| format!("NACKed: {nack}"))
        };
        if let Some(problem) = problem {
            let error = status.last_error.map(|e| format!("; last error: {e}")).unwrap_or_default();
            bad.push(format!("{} {problem}{error}", node_id(i)));
        }
    }
    if bad.is_empty() {
        return Ok(());
    }
    let count = bad.len();
    bad.truncate(10);
    Err(PushError::Streams(format!(
        "{count} of {} simulated sidecars failed:\n  {}",
        subscriptions.len(),
        bad.join("\n  ")
    )))
}

/// The first few nodes of an [`pb::AckResult`] that did not ACK, one per line.
pub fn not_acked(result: &pb::AckResult) -> String {
    let mut lines: Vec<String> = result
        .nodes
        .iter()
        .filter(|n| n.state != "ACKED")
        .take(10)
        .map(|n| {
            let error = if n.error.is_empty() { String::new() } else { format!(": {}", n.error) };
            format!("\n  {} {}{error}", n.node_id, n.state)
        })
        .collect();
    lines.insert(
        0,
        format!(
            "\n  the control plane counts {} subscribed, {} ACKed, {} NACKed{}",
            result.total,
            result.acked,
            result.nacked,
            if result.timed_out { " (its wait timed out)" } else { "" }
        ),
    );
    lines.concat()
}

/// Every one of `streams` subscribed sidecars ACKed (server side).
pub fn all_acked(result: &pb::AckResult, streams: usize) -> bool {
    result.total as usize == streams && result.acked == result.total && result.nacked == 0 && !result.timed_out
}

// ----------------------------------------------------------------------------------
// The run
// ----------------------------------------------------------------------------------

/// p50 / p99 / max (nearest rank) and mean of some durations, in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Summary {
    /// Samples.
    pub count: usize,
    /// Median (nearest rank).
    pub p50: f64,
    /// 99th percentile (nearest rank: the maximum when there are fewer than 100 samples).
    pub p99: f64,
    /// Largest.
    pub max: f64,
    /// Smallest.
    pub min: f64,
    /// Mean.
    pub mean: f64,
}

impl Summary {
    /// The summary of `values` (milliseconds).
    pub fn of(values: &[f64]) -> Summary {
        if values.is_empty() {
            return Summary::default();
        }
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        let rank = |p: f64| {
            let r = (p * sorted.len() as f64).ceil() as usize;
            sorted[r.clamp(1, sorted.len()) - 1]
        };
        Summary {
            count: sorted.len(),
            p50: rank(0.50),
            p99: rank(0.99),
            max: sorted[sorted.len() - 1],
            min: sorted[0],
            mean: sorted.iter().sum::<f64>() / sorted.len() as f64,
        }
    }
}

/// One weight change.
#[derive(Debug, Clone, Serialize)]
pub struct ChangeSample {
    /// The routes version it made.
    pub version: u64,
    /// The split set, like `v1=90 v2=10`.
    pub weights: String,
    /// SetWeights sent → the last simulated sidecar received the version and queued its ACK.
    pub last_ack_ms: f64,
    /// SetWeights sent → the first one did.
    pub first_ack_ms: f64,
    /// SetWeights round trip (with wait: until the control plane had every ACK).
    pub rpc_ms: f64,
    /// The control plane's slowest push-to-ACK for this version (`ChangeResult.ack.slowest_ms`; 0 without wait).
    pub server_slowest_ms: u64,
    /// Sidecars that ACKed (client side).
    pub acked: usize,
}

/// The control plane's memory and CPU at the stages of a run.
#[derive(Debug, Clone, Serialize)]
pub struct ControlPlaneUsage {
    /// Right after it was ready, no stream open.
    pub started: ProcSample,
    /// Every stream open and ACKed, after the idle window.
    pub streams_idle: ProcSample,
    /// After the last change.
    pub after_changes: ProcSample,
    /// CPU seconds spent accepting the streams and sending every first state.
    pub subscribe_cpu_secs: f64,
    /// CPU seconds over the idle window.
    pub idle_cpu_secs: f64,
    /// CPU seconds over the changes (pauses included).
    pub changes_cpu_secs: f64,
}

/// What a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct PushReport {
    /// Simulated sidecars (each one stream on its own HTTP/2 connection).
    pub streams: usize,
    /// Weight changes made.
    pub changes: usize,
    /// SetWeights was called with wait (like `serin ctl set-weight --wait`).
    pub server_wait: bool,
    /// Pause between changes, ms.
    pub pause_ms: f64,
    /// Idle window, seconds.
    pub idle_secs: f64,
    /// The control plane's process id and gRPC address.
    pub control_plane_pid: u32,
    /// Its gRPC listener.
    pub control_plane_addr: String,
    /// From opening the first stream to every stream ACKed (client and server side), seconds.
    pub subscribe_secs: f64,
    /// SetWeights → last sidecar ACK, over the changes.
    pub last_ack_ms: Summary,
    /// SetWeights → first sidecar ACK.
    pub first_ack_ms: Summary,
    /// SetWeights round trip.
    pub rpc_ms: Summary,
    /// The control plane's slowest push-to-ACK per change.
    pub server_slowest_ms: Summary,
    /// The control plane's memory and CPU.
    pub control_plane: ControlPlaneUsage,
    /// CPU seconds this process (every simulated sidecar) spent over the changes.
    pub client_changes_cpu_secs: f64,
    /// Every change.
    pub samples: Vec<ChangeSample>,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Runs the benchmark (see the module's documentation). Must be called inside a
/// multi-threaded tokio runtime.
pub async fn run(cfg: &PushConfig) -> Result<PushReport, PushError> {
    if cfg.streams == 0 {
        return Err(PushError::Streams("--streams must be at least 1".to_string()));
    }
    let need = cfg.streams as u64 + 256;
    if let Some(limit) = open_file_limit()
        && limit < need
    {
        return Err(PushError::FileLimit { limit, streams: cfg.streams, need });
    }
    let ticks = ticks_per_sec();
    let mut cp = ControlPlaneProcess::start(&cfg.serin_bin, Duration::from_secs(30)).await?;
    let address = format!("http://{}", cp.listen);
    let mut mgmt = bounded("connecting to the management API", Duration::from_secs(15), async {
        ManagementClient::connect(&address).await.map_err(rpc("connecting to the management API"))
    })
    .await?;
    let config = bounded("GetConfig", Duration::from_secs(15), async {
        mgmt.config(SERVICE, Some(ResourceType::Routes)).await.map_err(rpc("GetConfig payment"))
    })
    .await?;
    let initial: u64 = config
        .versions
        .get(ROUTES_TYPE_URL)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| cp.failed("GetConfig answered without a routes version"))?;
    let started = cp.sample(ticks)?;

    // Every stream, then every first ACK: client side, then as the control plane counts.
    let acks = Arc::new(AckLog::default());
    let opened = Instant::now();
    let subscriptions = open_streams(cp.listen, cfg.streams, &acks)?;
    let result = measure(cfg, &mut cp, &mut mgmt, &subscriptions, &acks, initial, opened, started, ticks).await;

    // Close the streams (bounded), then stop the control plane.
    let mut closing = tokio::task::JoinSet::new();
    for sub in subscriptions {
        closing.spawn(sub.shutdown());
    }
    let _ = tokio::time::timeout(Duration::from_secs(10), closing.join_all()).await;
    cp.stop(Duration::from_secs(5)).await;
    result
}

/// Everything after the streams were opened.
#[allow(clippy::too_many_arguments)]
async fn measure(
    cfg: &PushConfig,
    cp: &mut ControlPlaneProcess,
    mgmt: &mut ManagementClient,
    subscriptions: &[Subscription],
    acks: &AckLog,
    initial: u64,
    opened: Instant,
    started: ProcSample,
    ticks: f64,
) -> Result<PushReport, PushError> {
    let n = cfg.streams;
    if let Err(missing) = acks.wait(initial, n, cfg.setup_timeout).await {
        cp.check_alive()?;
        let streams = check_streams(subscriptions).err().map(|e| format!("\n{e}")).unwrap_or_default();
        return Err(PushError::Timeout {
            what: format!("only {} of {n} simulated sidecars received and ACKed the first state", missing.got),
            waited: cfg.setup_timeout,
            detail: if streams.is_empty() { missing.nodes } else { streams },
        });
    }
    let server = bounded("WaitForAck of the first state", cfg.setup_timeout + Duration::from_secs(5), async {
        mgmt.wait_for_ack(ResourceType::Routes, &initial.to_string(), SERVICE, cfg.setup_timeout)
            .await
            .map_err(rpc("WaitForAck"))
    })
    .await?;
    if !all_acked(&server, n) {
        return Err(PushError::Streams(format!(
            "the control plane does not count {n} sidecars ACKed on the first state:{}",
            not_acked(&server)
        )));
    }
    let subscribe_secs = opened.elapsed().as_secs_f64();
    check_streams(subscriptions)?;
    let subscribed = cp.sample(ticks)?;
    tokio::time::sleep(cfg.idle).await;
    let streams_idle = cp.sample(ticks)?;
    let client_before = ProcSample::read("self", ticks).map_err(io("reading /proc/self"))?;

    let mut samples = Vec::with_capacity(cfg.changes);
    for k in 0..cfg.changes {
        cp.check_alive()?;
        let split = SPLITS[k % SPLITS.len()];
        let weights = split.iter().map(|(s, w)| ((*s).to_string(), *w)).collect();
        let label = split.iter().map(|(s, w)| format!("{s}={w}")).collect::<Vec<_>>().join(" ");
        let wait = cfg.server_wait.then_some(cfg.change_timeout);
        let what = format!("change {} ({label})", k + 1);
        let sent = Instant::now();
        let result = bounded(&what, cfg.change_timeout + Duration::from_secs(5), async {
            mgmt.set_weights(SERVICE, &weights, wait).await.map_err(rpc(format!("SetWeights {label}")))
        })
        .await?;
        let rpc_time = sent.elapsed();
        if !result.changed {
            return Err(PushError::Streams(format!("{what}: the control plane says nothing changed")));
        }
        let version: u64 = result
            .version
            .parse()
            .map_err(|_| PushError::Streams(format!("{what}: SetWeights answered version {:?}", result.version)))?;
        let mut server_slowest_ms = 0;
        if let Some(ack) = &result.ack {
            if !all_acked(ack, n) {
                return Err(PushError::Streams(format!(
                    "{what}: not every sidecar ACKed version {version}:{}",
                    not_acked(ack)
                )));
            }
            server_slowest_ms = ack.slowest_ms;
        }
        let instants = match acks.wait(version, n, cfg.change_timeout.saturating_sub(sent.elapsed())).await {
            Ok(instants) => instants,
            Err(missing) => {
                let server = mgmt
                    .wait_for_ack(ResourceType::Routes, &version.to_string(), SERVICE, Duration::from_millis(1))
                    .await
                    .map(|r| not_acked(&r))
                    .unwrap_or_default();
                let streams = check_streams(subscriptions).err().map(|e| format!("\n{e}")).unwrap_or_default();
                return Err(PushError::Timeout {
                    what: format!("{what}: only {} of {n} simulated sidecars ACKed version {version}", missing.got),
                    waited: cfg.change_timeout,
                    detail: format!("{}{server}{streams}", missing.nodes),
                });
            }
        };
        if !cfg.server_wait {
            // Not timed: the control plane must count them too.
            let server = mgmt
                .wait_for_ack(ResourceType::Routes, &version.to_string(), SERVICE, cfg.change_timeout)
                .await
                .map_err(rpc("WaitForAck"))?;
            if !all_acked(&server, n) {
                return Err(PushError::Streams(format!(
                    "{what}: the control plane does not count every ACK of version {version}:{}",
                    not_acked(&server)
                )));
            }
        }
        let last = instants.iter().max().map_or(Duration::ZERO, |t| t.duration_since(sent));
        let first = instants.iter().min().map_or(Duration::ZERO, |t| t.duration_since(sent));
        samples.push(ChangeSample {
            version,
            weights: label,
            last_ack_ms: ms(last),
            first_ack_ms: ms(first),
            rpc_ms: ms(rpc_time),
            server_slowest_ms,
            acked: instants.len(),
        });
        tokio::time::sleep(cfg.pause).await;
    }
    let after_changes = cp.sample(ticks)?;
    let client_after = ProcSample::read("self", ticks).map_err(io("reading /proc/self"))?;
    check_streams(subscriptions)?;

    let summary = |f: fn(&ChangeSample) -> f64| Summary::of(&samples.iter().map(f).collect::<Vec<_>>());
    Ok(PushReport {
        streams: n,
        changes: cfg.changes,
        server_wait: cfg.server_wait,
        pause_ms: ms(cfg.pause),
        idle_secs: cfg.idle.as_secs_f64(),
        control_plane_pid: cp.child.id(),
        control_plane_addr: cp.listen.to_string(),
        subscribe_secs,
        last_ack_ms: summary(|s| s.last_ack_ms),
        first_ack_ms: summary(|s| s.first_ack_ms),
        rpc_ms: summary(|s| s.rpc_ms),
        server_slowest_ms: summary(|s| s.server_slowest_ms as f64),
        control_plane: ControlPlaneUsage {
            started,
            streams_idle,
            after_changes,
            subscribe_cpu_secs: subscribed.cpu_secs - started.cpu_secs,
            idle_cpu_secs: streams_idle.cpu_secs - subscribed.cpu_secs,
            changes_cpu_secs: after_changes.cpu_secs - streams_idle.cpu_secs,
        },
        client_changes_cpu_secs: client_after.cpu_secs - client_before.cpu_secs,
        samples,
    })
}

impl PushReport {
    /// The report as text.
    pub fn render_text(&self) -> String {
        let mut out = String::new();
        let line = |s: &Summary| {
            format!(
                "p50 {:8.1}   p99 {:8.1}   max {:8.1}   (min {:.1}, mean {:.1})",
                s.p50, s.p99, s.max, s.min, s.mean
            )
        };
        let _ = writeln!(
            out,
            "serin control-plane pid {} on {}; {} simulated sidecars, one gRPC stream and one HTTP/2 connection each",
            self.control_plane_pid, self.control_plane_addr, self.streams
        );
        let _ = writeln!(out, "every stream subscribed and ACKed in {:.2} s", self.subscribe_secs);
        let _ = writeln!(
            out,
            "{} weight changes of {SERVICE} (alternating v1=90 v2=10 / v1=95 v2=5), {} ms apart, SetWeights {}",
            self.changes,
            self.pause_ms,
            if self.server_wait { "with wait (like `serin ctl set-weight --wait`)" } else { "without wait" }
        );
        let _ =
            writeln!(out, "  ms, over the changes{}:", if self.changes < 100 { " (p99 = max below 100)" } else { "" });
        let _ = writeln!(out, "  SetWeights -> last sidecar ACK   {}", line(&self.last_ack_ms));
        let _ = writeln!(out, "  SetWeights -> first sidecar ACK  {}", line(&self.first_ack_ms));
        let _ = writeln!(out, "  SetWeights round trip            {}", line(&self.rpc_ms));
        if self.server_wait {
            let _ = writeln!(out, "  control plane's slowest push-ACK {}", line(&self.server_slowest_ms));
        }
        let cp = &self.control_plane;
        let sample = |s: &ProcSample| {
            format!(
                "VmRSS {:6.1} MiB  VmHWM {:6.1} MiB  CPU {:7.2} s",
                mib(s.vm_rss_kib),
                mib(s.vm_hwm_kib),
                s.cpu_secs
            )
        };
        let _ = writeln!(out, "control plane process:");
        let _ = writeln!(out, "  {:<24}{}", "started, no stream", sample(&cp.started));
        let _ = writeln!(
            out,
            "  {:<24}{}   (+{:.2} s CPU to subscribe them, +{:.3} s over {:.0} s idle)",
            format!("{} streams, idle", self.streams),
            sample(&cp.streams_idle),
            cp.subscribe_cpu_secs,
            cp.idle_cpu_secs,
            self.idle_secs
        );
        let per_change = if self.changes == 0 { 0.0 } else { 1000.0 * cp.changes_cpu_secs / self.changes as f64 };
        let _ = writeln!(
            out,
            "  {:<24}{}   (+{:.2} s CPU over the changes: {:.1} ms per change)",
            format!("after {} changes", self.changes),
            sample(&cp.after_changes),
            cp.changes_cpu_secs,
            per_change
        );
        let _ = writeln!(
            out,
            "this process ({} simulated sidecars): {:.2} s CPU over the changes",
            self.streams, self.client_changes_cpu_secs
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let values: Vec<f64> = (1..=50).map(f64::from).collect();
        let s = Summary::of(&values);
        assert_eq!((s.p50, s.p99, s.max, s.min), (25.0, 50.0, 50.0, 1.0));
        let values: Vec<f64> = (1..=1000).map(f64::from).collect();
        assert_eq!(Summary::of(&values).p99, 990.0);
        assert_eq!(Summary::of(&[]).count, 0);
    }

    #[test]
    fn ready_line_gives_the_listen_address() {
        let line = "2026-11-25T10:00:00Z  INFO serin::control_plane: control plane ready listen=127.0.0.1:40001 \
                    monitoring=127.0.0.1:40002 config=x";
        assert_eq!(listen_field(line), Some("127.0.0.1:40001".parse().expect("addr")));
        assert_eq!(strip_ansi("\u{1b}[2mlisten\u{1b}[0m=1"), "listen=1");
    }

    #[test]
    fn proc_sample_of_this_process() {
        let s = ProcSample::read("self", ticks_per_sec()).expect("/proc/self");
        assert!(s.vm_rss_kib > 0 && s.vm_hwm_kib >= s.vm_rss_kib);
    }
}
