//! A small mesh of "pods" in network namespaces, with interception as in
//! Kubernetes: every pod gets the nat rules of `serin iptables` (the init step)
//! and runs its app plus `serin sidecar` as uid 1337; a control plane in its own
//! namespace serves the config. The frontend's unmodified client calls payment's
//! virtual IP in plain HTTP; its sidecar captures the call, splits it 95/5 and
//! carries it over mutual TLS to the payment pods, whose sidecars capture their
//! inbound traffic. Then: a plaintext call to a STRICT pod is refused, a rollback
//! reaches every sidecar, and removing the rules restores direct traffic.
//!
//! Needs root, iproute2, iptables, `setpriv`, `curl` and `ss`; fails saying what
//! is missing unless `SERIN_SKIP_NETNS=1` is set on purpose.

#[allow(dead_code)]
#[path = "../../tests/src/netns.rs"]
mod netns;
mod process_support;

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use netns::{Netns, Process, run_bounded};
use process_support::TempDir;

const SERIN: &str = env!("CARGO_BIN_EXE_serin");
const TOOLS: [&str; 5] = ["iptables-restore", "iptables-save", "curl", "ss", "ip6tables-restore"];
const PROXY_UID: u32 = 1337;
const APP_UID: u32 = 1000;
const SUBNET: &str = "10.77.0";
const CONTROL_PLANE_IP: &str = "10.77.0.2";
const PAYMENT_VIP: &str = "10.96.0.10";
const WAIT: Duration = Duration::from_secs(30);
/// Istio's init flags (the injection template's `istio-iptables` line).
const INIT_FLAGS: [&str; 14] =
    ["-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-b", "*", "-d", "15090,15021,15020"];

/// One pod: its namespace, address and what runs in it.
struct Pod {
    ns: Netns,
    ip: String,
    name: &'static str,
}

/// The mesh. Processes come first so that they stop before their namespaces go.
struct Mesh {
    processes: Vec<Process>,
    control_plane: Pod,
    frontend: Pod,
    payment: Vec<(Pod, &'static str)>,
    _node: Netns,
    _dir: TempDir,
}

impl Drop for Mesh {
    /// Stops the processes in reverse order of start: the control plane last.
    fn drop(&mut self) {
        while let Some(process) = self.processes.pop() {
            drop(process);
        }
    }
}

fn config(payment: &[(Pod, &'static str)]) -> String {
    let mut out = format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: payment, namespace: default}}
spec:
  hosts: [payment.default.svc.cluster.local]
  addresses: [{PAYMENT_VIP}]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 8080, name: http, protocol: HTTP}}]
  workloadSelector: {{labels: {{app: payment}}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: payment, namespace: default}}
spec:
  host: payment
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v2, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: payment, namespace: default}}
spec:
  hosts: [payment]
  http:
  - name: split
    route:
    - {{destination: {{host: payment, subset: v1}}, weight: 95}}
    - {{destination: {{host: payment, subset: v2}}, weight: 5}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: payment-strict, namespace: default}}
spec:
  selector: {{matchLabels: {{app: payment}}}}
  mtls: {{mode: STRICT}}
"
    );
    for (pod, version) in payment {
        out.push_str(&format!(
            "---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: {name}, namespace: default}}
spec:
  address: {ip}
  serviceAccount: payment
  labels: {{app: payment, version: {version}, security.istio.io/tlsMode: istio}}
",
            name = pod.name,
            ip = pod.ip
        ));
    }
    out
}

/// A folder the proxy's uid can read (a temp dir is root-only).
fn shared_dir(path: &Path) {
    std::fs::create_dir_all(path).expect("create dir");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

/// Issues the workload certificate of `sa` into `out`, owned by the proxy's uid.
fn identity(ca_dir: &Path, out: &Path, sa: &str) -> PathBuf {
    let spiffe = format!("spiffe://cluster.local/ns/default/sa/{sa}");
    let out_str = out.to_str().expect("utf-8 path");
    let ca_str = ca_dir.to_str().expect("utf-8 path");
    let done = run_bounded(
        Command::new(SERIN).args(["ca", "issue", "--spiffe", &spiffe, "--dir", ca_str, "--out", out_str]),
        netns::COMMAND_TIMEOUT,
    )
    .expect("serin ca issue");
    assert!(done.status.success(), "serin ca issue: {}", String::from_utf8_lossy(&done.stderr));
    for entry in std::fs::read_dir(out).expect("read identity dir") {
        let path = entry.expect("entry").path();
        std::os::unix::fs::chown(&path, Some(PROXY_UID), Some(PROXY_UID)).expect("chown identity file");
    }
    std::os::unix::fs::chown(out, Some(PROXY_UID), Some(PROXY_UID)).expect("chown identity dir");
    out.to_path_buf()
}

fn run_in(ns: &Netns, args: &[&str]) -> std::process::Output {
    let mut cmd = ns.command(args[0]);
    cmd.args(&args[1..]);
    run_bounded(&mut cmd, netns::COMMAND_TIMEOUT).expect("run in namespace")
}

fn init_rules(pod: &Pod) {
    let mut args = vec![SERIN, "iptables"];
    args.extend(INIT_FLAGS);
    let out = run_in(&pod.ns, &args);
    assert!(out.status.success(), "serin iptables in {}: {}", pod.name, String::from_utf8_lossy(&out.stderr));
}

fn sidecar(mesh_dir: &Path, pod: &Pod, app: &str, version: &str, sa: &str) -> Process {
    let certs = identity(&mesh_dir.join("ca"), &mesh_dir.join(format!("id-{}", pod.name)), sa);
    let control_plane = format!("http://{CONTROL_PLANE_IP}:15010");
    let mut cmd = pod.ns.command_as(PROXY_UID, PROXY_UID, SERIN);
    cmd.args(["sidecar", "--control-plane", &control_plane, "--node-id", pod.name])
        .args(["--outbound", "0.0.0.0:15001", "--inbound", "0.0.0.0:15006", "--app", "127.0.0.1:8080"])
        .args(["--admin", "127.0.0.1:15000", "--metrics", "0.0.0.0:15090", "--health", "0.0.0.0:15021"])
        .args(["--workload", pod.name, "--namespace", "default", "--app-label", app, "--app-version", version])
        .arg("--cert-dir")
        .arg(&certs)
        .arg("--no-access-log")
        .env("RUST_LOG", "warn");
    Process::spawn(cmd).expect("start sidecar")
}

fn app(pod: &Pod, version: &str) -> Process {
    let mut cmd = pod.ns.command_as(APP_UID, APP_UID, SERIN);
    cmd.args(["upstream", "--listen", "[::]:8080", "--version", version, "--pod", pod.name]).env("RUST_LOG", "warn");
    Process::spawn(cmd).expect("start app")
}

/// `GET url` from inside `pod` as `uid` (`None` = root, captured like any app).
fn curl(pod: &Pod, uid: Option<u32>, args: &[&str]) -> (bool, String) {
    let mut cmd = match uid {
        Some(uid) => pod.ns.command_as(uid, uid, "curl"),
        None => pod.ns.command("curl"),
    };
    cmd.args(["-sS", "--max-time", "10"]).args(args);
    let out = run_bounded(&mut cmd, Duration::from_secs(60)).expect("curl");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// Waits until `pod`'s sidecar is ready (its first config from the control plane applied).
fn wait_ready(pod: &Pod) {
    let deadline = Instant::now() + WAIT;
    loop {
        let (ok, text) = curl(pod, None, &["-f", "http://127.0.0.1:15021/healthz/ready"]);
        if ok {
            return;
        }
        assert!(Instant::now() < deadline, "sidecar of {} not ready after {WAIT:?}: {text}", pod.name);
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn scrape(pod: &Pod) -> String {
    let (ok, text) = curl(pod, None, &[&format!("http://{}:15090/stats/prometheus", pod.ip)]);
    assert!(ok, "scrape {}: {text}", pod.name);
    text
}

/// Sum of `metric` samples whose label set contains every `labels` pair.
fn metric_sum(text: &str, metric: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(metric) && l[metric.len()..].starts_with('{'))
        .filter(|l| labels.iter().all(|(k, v)| l.contains(&format!("{k}=\"{v}\""))))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// `n` requests from the frontend's app to `http://payment:8080/` (resolved to
/// the virtual IP), on one keep-alive connection; the versions that answered.
fn call_payment(mesh: &Mesh, n: u32) -> Vec<String> {
    let url = format!("http://payment:8080/?n=[1-{n}]");
    let resolve = format!("payment:8080:{PAYMENT_VIP}");
    let (ok, text) = curl(&mesh.frontend, None, &["--resolve", &resolve, "-w", "\n", &url]);
    assert!(ok, "frontend → payment failed: {text}");
    let versions: Vec<String> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let at = l.find("\"version\":\"").unwrap_or_else(|| panic!("answer without a version: {l:?}"));
            l[at + 11..].split('"').next().unwrap_or("?").to_string()
        })
        .collect();
    assert_eq!(versions.len(), n as usize, "{text}");
    versions
}

fn start_mesh() -> Mesh {
    let dir = TempDir::new("netns-mesh");
    shared_dir(dir.path());
    let node = Netns::unique("sm-node").expect("node namespace");
    node.bridge("br0").expect("bridge");
    let pod = |name: &'static str, host: u8| {
        let ns = Netns::unique(&format!("sm-{name}")).expect("pod namespace");
        node.attach("br0", &format!("v{host}"), &ns, "eth0").expect("attach pod");
        let ip = format!("{SUBNET}.{host}");
        ns.add_addr("eth0", &format!("{ip}/24")).expect("address");
        // Any destination (the virtual IP too) leaves by eth0, so that the
        // kernel routes it and the nat OUTPUT rules can capture it.
        ns.add_route(&["default", "dev", "eth0"]).expect("default route");
        Pod { ns, ip, name }
    };
    let control_plane = pod("cp", 2);
    let frontend = pod("frontend", 10);
    let payment = vec![(pod("payment-v1-a", 11), "v1"), (pod("payment-v1-b", 12), "v1"), (pod("payment-v2", 13), "v2")];

    let ca = dir.path().join("ca");
    let done = run_bounded(
        Command::new(SERIN).args(["ca", "init", "--dir", ca.to_str().expect("utf-8 path")]),
        netns::COMMAND_TIMEOUT,
    )
    .expect("serin ca init");
    assert!(done.status.success(), "serin ca init: {}", String::from_utf8_lossy(&done.stderr));
    let config_dir = dir.path().join("config");
    std::fs::create_dir_all(&config_dir).expect("config dir");
    std::fs::write(config_dir.join("payment.yaml"), config(&payment)).expect("write config");

    let mut processes = Vec::new();
    let mut cmd = control_plane.ns.command(SERIN);
    cmd.args(["control-plane", "--config-dir"])
        .arg(&config_dir)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .args(["--listen", "0.0.0.0:15010", "--monitoring", "127.0.0.1:15014"])
        .env("RUST_LOG", "warn");
    processes.push(Process::spawn(cmd).expect("start control plane"));
    control_plane.ns.wait_listening(15010, WAIT).expect("control plane listening");

    for (pod, version) in &payment {
        init_rules(pod);
        processes.push(app(pod, version));
        processes.push(sidecar(dir.path(), pod, "payment", version, "payment"));
    }
    init_rules(&frontend);
    processes.push(sidecar(dir.path(), &frontend, "frontend", "v1", "frontend"));
    let mesh = Mesh { processes, control_plane, frontend, payment, _node: node, _dir: dir };
    for (pod, _) in &mesh.payment {
        pod.ns.wait_listening(8080, WAIT).expect("payment app listening");
        wait_ready(pod);
    }
    wait_ready(&mesh.frontend);
    mesh
}

fn ctl(mesh: &Mesh, args: &[&str]) -> String {
    let mut all = vec![SERIN, "ctl", "--control-plane", "127.0.0.1:15010"];
    all.extend(args);
    let out = run_in(&mesh.control_plane.ns, &all);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "serin ctl {args:?}: {text}");
    text
}

#[test]
fn captured_pods_split_over_mtls_roll_back_and_uncapture() {
    if !netns::require("captured_pods_split_over_mtls_roll_back_and_uncapture", &TOOLS) {
        return;
    }
    let mut mesh = start_mesh();

    // 1. The app's plain call to the virtual IP is captured and split 95/5.
    let versions = call_payment(&mesh, 400);
    let v2 = versions.iter().filter(|v| *v == "v2").count();
    let v1 = versions.iter().filter(|v| *v == "v1").count();
    assert_eq!(v1 + v2, 400, "{versions:?}");
    assert!((8..=40).contains(&v2), "v2 answered {v2} of 400 (95/5 split expected)");

    // 2. Between the pods it is mutual TLS: the frontend's sidecar reports the
    //    calls (reporter=source), the payment sidecars report them as mTLS.
    let front = scrape(&mesh.frontend);
    let sent =
        metric_sum(&front, "istio_requests_total", &[("reporter", "source"), ("destination_service_name", "payment")]);
    assert!(sent >= 400.0, "frontend sidecar saw {sent} requests to payment:\n{front}");
    let mut received = 0.0;
    for (pod, _) in &mesh.payment {
        let text = scrape(pod);
        received += metric_sum(
            &text,
            "istio_requests_total",
            &[("reporter", "destination"), ("connection_security_policy", "mutual_tls")],
        );
        assert_eq!(
            metric_sum(
                &text,
                "istio_requests_total",
                &[("reporter", "destination"), ("connection_security_policy", "none")]
            ),
            0.0,
            "{} took plaintext requests:\n{text}",
            pod.name
        );
    }
    assert!(received >= 400.0, "payment sidecars saw {received} mTLS requests");

    // 3. A plaintext call straight to a STRICT pod (from the proxy's uid, so the
    //    frontend's rules let it out uncaptured) is refused by the pod's sidecar.
    let target = &mesh.payment[0].0;
    let direct = format!("http://{}:8080/", target.ip);
    let (ok, text) = curl(&mesh.frontend, Some(PROXY_UID), &[&direct]);
    assert!(!ok, "a plaintext call to a STRICT pod got through: {text}");
    let refused =
        metric_sum(&scrape(target), "serin_inbound_connections_refused_total", &[("reason", "plaintext_strict")]);
    assert!(refused >= 1.0, "the STRICT pod did not count the refused plaintext connection");

    // 4. Rollback reaches every sidecar (confirmed), and all traffic goes to v1.
    let out = ctl(&mesh, &["rollback", "payment", "--wait"]);
    assert!(out.contains('4'), "rollback should be ACKed by the 4 sidecars: {out}");
    let versions = call_payment(&mesh, 100);
    assert!(versions.iter().all(|v| v == "v1"), "after rollback: {versions:?}");

    // 5. Without the rules, traffic is direct again: the frontend reaches the
    //    pod's app itself (plaintext, its sidecar is bypassed), and the virtual
    //    IP, which only the sidecar knew, leads nowhere.
    for pod in std::iter::once(&mesh.frontend).chain(mesh.payment.iter().map(|(p, _)| p)) {
        let out = run_in(&pod.ns, &[SERIN, "iptables", "--cleanup"]);
        assert!(out.status.success(), "cleanup in {}: {}", pod.name, String::from_utf8_lossy(&out.stderr));
    }
    let before = metric_sum(&scrape(target), "istio_requests_total", &[("reporter", "destination")]);
    let (ok, text) = curl(&mesh.frontend, None, &["-f", &direct]);
    assert!(ok, "direct call after cleanup failed: {text}");
    assert!(text.contains(target.name), "the pod's own app should answer: {text}");
    let after = metric_sum(&scrape(target), "istio_requests_total", &[("reporter", "destination")]);
    assert_eq!(before, after, "the pod's sidecar still saw the direct call");
    let (ok, _) = curl(&mesh.frontend, None, &["--max-time", "3", &format!("http://{PAYMENT_VIP}:8080/")]);
    assert!(!ok, "the virtual IP still answers without capture");

    for p in &mut mesh.processes {
        p.check_running().expect("a mesh process died");
    }
}

/// A TCP echo server (not HTTP: it answers `echo:` + the first bytes it gets).
const ECHO_SERVER: &str = "import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('0.0.0.0', 9000))
s.listen()
s.settimeout(60)
while True:
    c, _ = s.accept()
    c.sendall(b'echo:' + c.recv(100))
    c.close()
";

/// Sends binary bytes to `argv[1]:9000` and prints the answer.
const ECHO_CLIENT: &str = "import socket, sys
c = socket.create_connection((sys.argv[1], 9000), timeout=5)
c.sendall(b'\\x00\\x01opaque')
print(c.recv(100))
";

/// The frontend's own config: `payment` is a registry service at the external
/// pod's address (no virtual IP), so only its `Host` header can name it.
fn registry_config(ip: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: payment, namespace: default}}
spec:
  hosts: [payment.default.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 8080, name: http, protocol: HTTP}}]
  endpoints: [{{address: {ip}}}]
"
    )
}

#[test]
fn captured_traffic_to_unknown_destinations_follows_the_outbound_policy() {
    if !netns::require("captured_traffic_to_unknown_destinations_follows_the_outbound_policy", &TOOLS) {
        return;
    }
    if netns::find_program("python3").is_none() {
        panic!("this test needs python3 (a TCP echo server and client)");
    }
    let dir = TempDir::new("netns-policy");
    shared_dir(dir.path());
    let node = Netns::unique("sp-node").expect("node namespace");
    node.bridge("br0").expect("bridge");
    let pod = |name: &'static str, host: u8| {
        let ns = Netns::unique(&format!("sp-{name}")).expect("pod namespace");
        node.attach("br0", &format!("v{host}"), &ns, "eth0").expect("attach pod");
        let ip = format!("{SUBNET}.{host}");
        ns.add_addr("eth0", &format!("{ip}/24")).expect("address");
        ns.add_route(&["default", "dev", "eth0"]).expect("default route");
        ns.add_addr("eth0", &format!("fd00:77::{host}/64")).expect("IPv6 address");
        ns.ip(&["-6", "route", "add", "default", "dev", "eth0"]).expect("IPv6 default route");
        Pod { ns, ip, name }
    };
    let external = pod("external", 20);
    let allow = pod("allow-any", 21);
    let registry_only = pod("registry-only", 22);
    let config = dir.path().join("frontend.yaml");
    std::fs::write(&config, registry_config(&external.ip)).expect("write config");

    let mut processes = Vec::new();
    processes.push(app(&external, "v1"));
    let mut echo = external.ns.command("python3");
    echo.args(["-c", ECHO_SERVER]);
    processes.push(Process::spawn(echo).expect("echo server"));
    // The external pod has a sidecar too (PERMISSIVE): its inbound capture
    // passes HTTP and opaque TCP to its apps.
    for (pod, policy) in [(&allow, "ALLOW_ANY"), (&registry_only, "REGISTRY_ONLY"), (&external, "ALLOW_ANY")] {
        init_rules(pod);
        let mut cmd = pod.ns.command_as(PROXY_UID, PROXY_UID, SERIN);
        cmd.args(["sidecar", "--config"])
            .arg(&config)
            // Dual-stack listeners: IPv6 is captured too (redirected to ::1).
            .args(["--outbound", "[::]:15001", "--inbound", "[::]:15006"])
            .args(["--admin", "127.0.0.1:15000", "--metrics", "0.0.0.0:15090", "--health", "0.0.0.0:15021"])
            .args(["--workload", pod.name, "--app-label", "frontend", "--outbound-traffic-policy", policy])
            .arg("--no-access-log")
            .env("RUST_LOG", "warn");
        processes.push(Process::spawn(cmd).expect("start sidecar"));
    }
    external.ns.wait_listening(8080, WAIT).expect("external app");
    external.ns.wait_listening(9000, WAIT).expect("echo server");
    wait_ready(&allow);
    wait_ready(&registry_only);
    wait_ready(&external);
    let unknown = format!("http://{}:8080/", external.ip);

    // ALLOW_ANY: HTTP to an address the registry does not know goes on to it
    // (PassthroughCluster); the Host header names a registry service → routed
    // as that service; opaque TCP passes through unchanged.
    let (ok, text) = curl(&allow, None, &["-f", &unknown]);
    assert!(ok && text.contains("external"), "ALLOW_ANY HTTP passthrough: {text}");
    let (ok, text) = curl(&allow, None, &["-f", "-H", "Host: payment", &unknown]);
    assert!(ok && text.contains("external"), "Host fallback: {text}");
    let unknown_v6 = format!("http://[fd00:77::{}]:8080/", external.ip.rsplit('.').next().unwrap_or("0"));
    let (ok, text) = curl(&allow, None, &["-f", &unknown_v6]);
    assert!(ok && text.contains("external"), "IPv6 passthrough: {text}");
    let mut client = allow.ns.command("python3");
    client.args(["-c", ECHO_CLIENT, &external.ip]);
    let out = run_bounded(&mut client, netns::COMMAND_TIMEOUT).expect("echo client");
    let echoed = String::from_utf8_lossy(&out.stdout);
    assert!(
        echoed.contains("echo:\\x00\\x01opaque"),
        "TCP passthrough: {echoed} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let metrics = scrape(&allow);
    let passthrough = [("reporter", "source"), ("destination_service_name", "PassthroughCluster")];
    assert!(metric_sum(&metrics, "istio_requests_total", &passthrough) >= 1.0, "{metrics}");
    assert!(
        metric_sum(&metrics, "istio_requests_total", &[("destination_service_name", "payment")]) >= 1.0,
        "{metrics}"
    );
    assert!(metric_sum(&metrics, "istio_tcp_connections_opened_total", &passthrough) >= 1.0, "{metrics}");
    let inbound = scrape(&external);
    let destination = [("reporter", "destination")];
    assert!(metric_sum(&inbound, "istio_requests_total", &destination) >= 2.0, "{inbound}");
    assert!(metric_sum(&inbound, "istio_tcp_connections_opened_total", &destination) >= 1.0, "{inbound}");

    // REGISTRY_ONLY: the same calls are refused (HTTP 502, TCP closed), except
    // the one whose Host header names a registry service.
    let (_, text) = curl(&registry_only, None, &["-o", "/dev/null", "-w", "%{http_code}", &unknown]);
    assert!(text.starts_with("502"), "REGISTRY_ONLY HTTP: {text}");
    let (ok, text) = curl(&registry_only, None, &["-f", "-H", "Host: payment", &unknown]);
    assert!(ok && text.contains("external"), "Host fallback under REGISTRY_ONLY: {text}");
    let mut client = registry_only.ns.command("python3");
    client.args(["-c", ECHO_CLIENT, &external.ip]);
    let out = run_bounded(&mut client, netns::COMMAND_TIMEOUT).expect("echo client");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("echo:"), "REGISTRY_ONLY let TCP through");
    let metrics = scrape(&registry_only);
    let black_hole = [("destination_service_name", "BlackHoleCluster")];
    assert!(metric_sum(&metrics, "istio_requests_total", &black_hole) >= 1.0, "{metrics}");
    assert!(metric_sum(&metrics, "istio_tcp_connections_opened_total", &black_hole) >= 1.0, "{metrics}");

    for p in &mut processes {
        p.check_running().expect("a process died");
    }
    while let Some(p) = processes.pop() {
        drop(p);
    }
}
