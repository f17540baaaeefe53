//! Network namespaces for tests: "pods" on one machine, joined by veth pairs
//! (directly, or through a bridge in a namespace of its own), with processes
//! run inside them as any uid (`setpriv`, no passwd entry needed).
//!
//! Everything is removed when the values are dropped, also when a test fails:
//! a [`Netns`] deletes its namespace (and with it its interfaces and iptables
//! rules), a [`Process`] kills its child. Declare processes after the namespaces
//! they run in, so they go first. The root namespace is never changed: veth pairs
//! are created inside the namespaces.
//!
//! These tests need root, `ip` (iproute2) and usually `iptables`. [`require`]
//! checks; when something is missing the test fails saying what, unless
//! `SERIN_SKIP_NETNS=1` is set on purpose, in which case it is skipped.
//!
//! Only `std` is used, so the file can also be included by the `serin`
//! package's own tests (`#[path = "../../tests/src/netns.rs"] mod netns;`), where
//! the `serin` binary is at hand as `env!("CARGO_BIN_EXE_serin")`.

use std::io::{self, Read};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Set to `1` to skip the network-namespace tests on purpose where they cannot run.
pub const SKIP_ENV: &str = "SERIN_SKIP_NETNS";

/// How long one command (`ip`, `iptables-save`, …) may take.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// Why namespace tests cannot run here: not root, or missing programs (`ip`,
/// `setpriv` and `tools`). Empty when they can.
pub fn missing(tools: &[&str]) -> Vec<String> {
    let mut missing = Vec::new();
    match effective_uid() {
        Some(0) => {}
        Some(uid) => missing.push(format!("root (running as uid {uid})")),
        None => missing.push("root (cannot read the effective uid from /proc/self/status)".into()),
    }
    for tool in ["ip", "setpriv"].iter().chain(tools) {
        if find_program(tool).is_none() {
            missing.push(format!("`{tool}` in PATH"));
        }
    }
    missing
}

/// Whether the test `test` can run: `true` when root and every tool is there.
/// Otherwise panics naming what is missing, unless `SERIN_SKIP_NETNS=1`: then it
/// prints that the test was skipped and returns `false`.
pub fn require(test: &str, tools: &[&str]) -> bool {
    let missing = missing(tools);
    if missing.is_empty() {
        return true;
    }
    let what = missing.join(", ");
    if std::env::var(SKIP_ENV).is_ok_and(|v| v == "1") {
        eprintln!("SKIPPED {test}: network-namespace test needs {what} ({SKIP_ENV}=1)");
        return false;
    }
    panic!(
        "{test}: this network-namespace test needs {what}; run it as root with iproute2 and iptables \
         installed (`.ci/run` installs them), or set {SKIP_ENV}=1 to skip it on purpose"
    );
}

fn effective_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// Looks `name` up in `PATH`.
pub fn find_program(name: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join(name)).find(|p| p.is_file())
}

/// A name no other test of this run (or another run) uses: `prefix-<pid>-<n>`.
pub fn unique_name(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!("{prefix}-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

/// Runs `cmd` to completion, killed after `timeout`; output is captured.
pub fn run_bounded(cmd: &mut Command, timeout: Duration) -> io::Result<Output> {
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut pipe) = pipe {
                drop(pipe.read_to_end(&mut bytes));
            }
            bytes
        })
    };
    let stdout = drain(child.stdout.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
    let stderr = drain(child.stderr.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
    let status = wait_bounded(&mut child, timeout)?;
    let stdout = stdout.join().unwrap_or_default();
    let stderr = stderr.join().unwrap_or_default();
    match status {
        Some(status) => Ok(Output { status, stdout, stderr }),
        None => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("{cmd:?} did not finish within {timeout:?}: killed; stderr: {}", String::from_utf8_lossy(&stderr)),
        )),
    }
}

/// Waits for `child` up to `timeout`; kills it and returns `None` when it runs longer.
fn wait_bounded(child: &mut Child, timeout: Duration) -> io::Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            drop(child.kill());
            drop(child.wait());
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Runs `cmd` (bounded) and returns its stdout; a non-zero exit is an error
/// carrying the command and its stderr.
pub fn run_ok(cmd: &mut Command) -> io::Result<String> {
    let out = run_bounded(cmd, COMMAND_TIMEOUT)?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A network namespace (`ip netns add`), deleted on drop with everything in it.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates the namespace `name` with `lo` up (REDIRECT in OUTPUT goes to
    /// 127.0.0.1 / ::1, so loopback must work). Fails if it exists already.
    pub fn new(name: &str) -> io::Result<Netns> {
        run_ok(Command::new("ip").args(["netns", "add", name]))
            .map_err(|e| io::Error::other(format!("cannot create network namespace {name}: {e}")))?;
        let ns = Netns { name: name.to_string() };
        ns.link_up("lo")?;
        Ok(ns)
    }

    /// Creates a namespace named [`unique_name`]`(prefix)`.
    pub fn unique(prefix: &str) -> io::Result<Netns> {
        Netns::new(&unique_name(prefix))
    }

    /// The namespace's name (as `ip netns` knows it).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `program` to be run inside the namespace (`ip netns exec NAME program`), as root.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// `program` to be run inside the namespace as `uid`/`gid`, with no
    /// supplementary groups and no capabilities (`setpriv`).
    pub fn command_as(&self, uid: u32, gid: u32, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, "setpriv"])
            .arg(format!("--reuid={uid}"))
            .arg(format!("--regid={gid}"))
            .args(["--clear-groups", program]);
        cmd
    }

    /// Runs `args` (program first) inside the namespace as root, bounded by
    /// [`COMMAND_TIMEOUT`]; returns stdout, or an error with stderr on failure.
    pub fn exec(&self, args: &[&str]) -> io::Result<String> {
        let (program, rest) = args.split_first().ok_or_else(|| io::Error::other("exec: no program"))?;
        run_ok(self.command(program).args(rest))
    }

    /// Runs `ip -n NAME args…`.
    pub fn ip(&self, args: &[&str]) -> io::Result<String> {
        run_ok(Command::new("ip").args(["-n", &self.name]).args(args))
    }

    /// Sets `dev` up.
    pub fn link_up(&self, dev: &str) -> io::Result<()> {
        self.ip(&["link", "set", dev, "up"]).map(drop)
    }

    /// Adds `cidr` (e.g. `10.250.0.1/24`, `fd00:250::1/64`) to `dev`; IPv6
    /// addresses skip duplicate address detection so they work at once.
    pub fn add_addr(&self, dev: &str, cidr: &str) -> io::Result<()> {
        if cidr.contains(':') {
            self.ip(&["-6", "addr", "add", cidr, "dev", dev, "nodad"]).map(drop)
        } else {
            self.ip(&["addr", "add", cidr, "dev", dev]).map(drop)
        }
    }

    /// Adds a route, e.g. `&["default", "via", "10.250.0.254"]`.
    pub fn add_route(&self, route: &[&str]) -> io::Result<()> {
        let v6 = route.iter().any(|w| w.contains(':'));
        let mut args = if v6 { vec!["-6", "route", "add"] } else { vec!["route", "add"] };
        args.extend_from_slice(route);
        self.ip(&args).map(drop)
    }

    /// Joins this namespace and `peer` with a veth pair: `ifname` here,
    /// `peer_ifname` there, both up. Created inside the namespaces, so the
    /// names only need to be unique within each of them.
    pub fn veth(&self, ifname: &str, peer: &Netns, peer_ifname: &str) -> io::Result<()> {
        self.ip(&["link", "add", ifname, "type", "veth", "peer", "name", peer_ifname, "netns", &peer.name])?;
        self.link_up(ifname)?;
        peer.link_up(peer_ifname)
    }

    /// Creates a bridge `name` in this namespace, up (a "node" joining pods).
    pub fn bridge(&self, name: &str) -> io::Result<()> {
        self.ip(&["link", "add", name, "type", "bridge"])?;
        self.link_up(name)
    }

    /// Plugs `pod` into this namespace's bridge `bridge`: a veth pair with
    /// `port` here (enslaved to the bridge) and `pod_ifname` in `pod`, both up.
    pub fn attach(&self, bridge: &str, port: &str, pod: &Netns, pod_ifname: &str) -> io::Result<()> {
        self.veth(port, pod, pod_ifname)?;
        self.ip(&["link", "set", port, "master", bridge]).map(drop)
    }

    /// Waits until something listens on TCP `port` in this namespace (`ss`), up to `timeout`.
    pub fn wait_listening(&self, port: u16, timeout: Duration) -> io::Result<()> {
        let deadline = Instant::now() + timeout;
        let filter = format!("sport = :{port}");
        loop {
            let out = self.exec(&["ss", "-Hltn", &filter])?;
            if !out.trim().is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("nothing listens on port {port} in {} after {timeout:?}", self.name),
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace removes its interfaces (and their veth peers)
        // and its iptables rules.
        if let Err(e) = run_ok(Command::new("ip").args(["netns", "del", &self.name])) {
            eprintln!("warning: cannot delete network namespace {}: {e}", self.name);
        }
    }
}

/// A background process, killed (and reaped) on drop.
#[derive(Debug)]
pub struct Process {
    child: Child,
    what: String,
}

impl Process {
    /// Starts `cmd` with its output discarded (`stderr` inherited, so failures show in the test log).
    pub fn spawn(mut cmd: Command) -> io::Result<Process> {
        let what = format!("{cmd:?}");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .map_err(|e| io::Error::other(format!("cannot start {what}: {e}")))?;
        Ok(Process { child, what })
    }

    /// Fails when the process has exited already (it was expected to keep running).
    pub fn check_running(&mut self) -> io::Result<()> {
        match self.child.try_wait()? {
            None => Ok(()),
            Some(status) => Err(io::Error::other(format!("{} exited early: {status}", self.what))),
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        drop(self.child.kill());
        drop(wait_bounded(&mut self.child, Duration::from_secs(5)));
    }
}
