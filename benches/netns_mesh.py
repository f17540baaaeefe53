#!/usr/bin/env python3
"""Captured mesh in network namespaces: frontend -> payment through both sidecars
(iptables capture, mutual TLS) vs the same pods with the rules removed (issue 5).

Builds a small mesh of "pods" on this machine, as proxy/tests/netns_mesh.rs does:
a node namespace holding a bridge, a frontend pod and payment pods (v1 x1 or x2,
v2 x1), each a network namespace on the bridge. Every pod gets the nat rules of
`serin iptables` (Istio's init flags) and runs `serin sidecar` as uid 1337 with
its identity from `serin ca` and the routing config from a file (`--config`: a
ServiceEntry with the virtual IP 10.96.0.10, WorkloadEntries for the payment
pods, the 95/5 VirtualService and a STRICT PeerAuthentication). Each payment pod
runs `serin upstream --body-size 1024` on 0.0.0.0:8080 as uid 1000.

Then `serin-load` runs INSIDE the frontend pod as root (so its traffic is
captured like any app's), HTTP/1.1, 64 connections:

  captured mesh (mTLS): client -> http://10.96.0.10:8080/ (the virtual IP)
      -> nat OUTPUT -> frontend sidecar :15001 -> 95/5 split -> mTLS (HTTP/2)
      -> pod IP:8080 -> nat PREROUTING -> payment sidecar :15006 -> app 127.0.0.1:8080
  rules removed (direct):  `serin iptables --cleanup` in every pod, then
      client -> http://<payment-v1-a IP>:8080/ -> app (plain HTTP, one upstream)

For each: an open-loop run at --rate (latency) and a closed-loop run at max rate
(throughput), with CPU seconds per 1,000 requests of the sidecars (both hops),
the payment apps and the load generator (utime + stime, /proc/<pid>/stat and
getrusage), the sidecars' RSS (idle VmRSS, peak VmHWM) and errors. It checks that
the captured runs really went over mTLS (the payment sidecars' metrics) and that
the direct runs bypassed the sidecars, and prints a Markdown table.

Usage: sudo python3 benches/netns_mesh.py [--duration 10] [--rate 1000]
       [--v1-pods 1|2] [--rounds 1] [--quick] [--no-build] [--bin-dir DIR]
Needs root, iproute2 (`ip`), `setpriv` and iptables. Uses target/release/serin and
target/release/serin-load (built with `cargo build --release -p serin -p
serin-benches` when missing). Every process and namespace it creates is removed
at the end, also on error, Ctrl-C or SIGTERM; every wait is bounded.
"""

import argparse
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TICKS = os.sysconf("SC_CLK_TCK")
PROXY_UID = 1337
APP_UID = 1000
SUBNET = "10.78.0"
PAYMENT_VIP = "10.96.0.10"
# Istio's init flags (the injection template's `istio-iptables` line), as in the e2e test.
INIT_FLAGS = ["-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-b", "*",
              "-d", "15090,15021,15020"]
TOOLS = ["ip", "setpriv", "iptables-restore", "iptables-save"]
COMMAND_TIMEOUT = 30.0
READY_TIMEOUT = 30.0
SKIP_ENV = "SERIN_SKIP_NETNS"

# Run inside a namespace: GET a URL until it answers 200 or the deadline passes
# (no proxy from the environment); prints the body.
HTTP_GET = r"""
import sys, time, urllib.request
url, deadline = sys.argv[1], time.time() + float(sys.argv[2])
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
last = ""
while True:
    try:
        with opener.open(url, timeout=2) as r:
            sys.stdout.write(r.read().decode("utf-8", "replace"))
            sys.exit(0)
    except Exception as e:
        last = repr(e)
    if time.time() >= deadline:
        sys.stderr.write(f"{url}: {last}\n")
        sys.exit(1)
    time.sleep(0.05)
"""


class Deadline(Exception):
    pass


def missing_requirements():
    missing = []
    if os.geteuid() != 0:
        missing.append(f"root (running as uid {os.geteuid()})")
    for tool in TOOLS:
        if shutil.which(tool) is None:
            missing.append(f"`{tool}` in PATH")
    return missing


def cpu_split(pid):
    """(utime, stime) of `pid` in seconds, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICKS, int(fields[12]) / TICKS


def cpu_seconds(pid):
    return sum(cpu_split(pid))  # utime + stime


def status_kb(pid, key):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def children_cpu():
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def machine_cpu():
    """(busy, softirq) seconds of the whole machine so far, from /proc/stat (every process, ours or not)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (v + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / TICKS, softirq / TICKS


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def uptime():
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        with open("/proc/loadavg") as f:
            return "load average " + " ".join(f.read().split()[:3])


def metric_sum(text, metric, labels):
    """Sum of `metric` samples whose labels contain every (key, value) of `labels`."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(metric + "{"):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels):
            try:
                total += float(line.rsplit(" ", 1)[1])
            except ValueError:
                pass
    return total


def mesh_config(payment):
    out = f"""apiVersion: networking.istio.io/v1
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
"""
    for pod in payment:
        out += f"""---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: {pod.name}, namespace: default}}
spec:
  address: {pod.ip}
  serviceAccount: payment
  labels: {{app: payment, version: {pod.version}, security.istio.io/tlsMode: istio}}
"""
    return out


class Pod:
    def __init__(self, name, ns, ip, version=None):
        self.name, self.ns, self.ip, self.version = name, ns, ip, version
        self.sidecar = None  # Popen
        self.app = None  # Popen


class Mesh:
    """Namespaces, processes and a temp folder, all removed by close()."""

    def __init__(self, serin, serin_load, verbose):
        self.verbose = verbose
        self.prefix = f"snb{os.getpid()}"
        self.namespaces = []  # created, in order
        self.procs = []  # (name, Popen, log path)
        self.tmp = tempfile.mkdtemp(prefix="serin-netns-bench-")
        os.chmod(self.tmp, 0o755)  # the proxy's uid reads its config and identity here
        self.logs = os.path.join(self.tmp, "logs")
        os.makedirs(self.logs)
        # Private copies: a build that replaces target/release/* mid-run does not mix versions.
        bins = os.path.join(self.tmp, "bin")
        os.makedirs(bins)
        os.chmod(bins, 0o755)
        self.serin = shutil.copy2(serin, os.path.join(bins, "serin"))
        self.serin_load = shutil.copy2(serin_load, os.path.join(bins, "serin-load"))

    def log(self, msg):
        if self.verbose:
            print(f"[netns_mesh] {msg}", file=sys.stderr, flush=True)

    def run(self, argv, timeout=COMMAND_TIMEOUT, check=True):
        try:
            out = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{' '.join(argv)} did not finish within {timeout:.0f} s (killed)")
        if check and out.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({out.returncode}): {out.stderr.strip()}")
        return out

    def in_ns(self, ns, argv, uid=None):
        pre = ["ip", "netns", "exec", ns]
        if uid is not None:
            pre += ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
        return pre + argv

    def netns(self, short):
        name = f"{self.prefix}-{short}"
        self.run(["ip", "netns", "add", name])
        self.namespaces.append(name)
        self.run(["ip", "-n", name, "link", "set", "lo", "up"])
        return name

    def spawn(self, name, argv, env_extra=None):
        log_path = os.path.join(self.logs, name + ".log")
        env = dict(os.environ, RUST_LOG="warn", NO_COLOR="1")
        env.update(env_extra or {})
        with open(log_path, "wb") as log:
            # Own session: a Ctrl-C in the terminal reaches this script only,
            # which then stops the processes in order.
            p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                 env=env, start_new_session=True)
        self.procs.append((name, p, log_path))
        return p

    def http_get(self, ns, url, timeout=READY_TIMEOUT):
        out = self.run(self.in_ns(ns, ["python3", "-c", HTTP_GET, url, str(timeout)]), timeout=timeout + 15,
                       check=False)
        if out.returncode != 0:
            raise RuntimeError(f"GET {url} in {ns}: {out.stderr.strip()}")
        return out.stdout

    def check_alive(self):
        for name, p, log_path in self.procs:
            if p.poll() is not None:
                raise RuntimeError(f"{name} exited ({p.returncode}):\n{tail(log_path)}")

    def close(self):
        for name, p, _ in reversed(self.procs):
            if p.poll() is None:
                try:
                    p.terminate()
                except OSError:
                    pass
        for name, p, _ in reversed(self.procs):
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                try:
                    p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    print(f"warning: {name} (pid {p.pid}) did not exit", file=sys.stderr)
        for ns in reversed(self.namespaces):
            # Anything still running in our own namespace was started by us.
            out = self.run(["ip", "netns", "pids", ns], check=False)
            for pid in out.stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (OSError, ValueError):
                    pass
        for ns in reversed(self.namespaces):
            deadline = time.time() + 10
            while True:
                out = self.run(["ip", "netns", "del", ns], check=False)
                if out.returncode == 0:
                    break
                if time.time() >= deadline:
                    print(f"warning: cannot delete network namespace {ns}: {out.stderr.strip()}", file=sys.stderr)
                    break
                time.sleep(0.1)
        left = [n for n in self.run(["ip", "netns", "list"], check=False).stdout.split()
                if n.startswith(self.prefix + "-")]
        if left:
            print(f"warning: namespaces left behind: {left}", file=sys.stderr)
        shutil.rmtree(self.tmp, ignore_errors=True)


def tail(path, lines=20):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return "(no log)"


def build_mesh(mesh, v1_pods, mtu=None):
    serin = mesh.serin
    node = mesh.netns("node")
    mesh.run(["ip", "-n", node, "link", "add", "br0", "type", "bridge"])
    mesh.run(["ip", "-n", node, "link", "set", "br0", "up"])

    def pod(name, host, version=None):
        ns = mesh.netns(name)
        port = f"v{host}"
        # The veth pair is created inside the node namespace: the root namespace is never touched.
        mesh.run(["ip", "-n", node, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns])
        mesh.run(["ip", "-n", node, "link", "set", port, "master", "br0"])
        mesh.run(["ip", "-n", node, "link", "set", port, "up"])
        mesh.run(["ip", "-n", ns, "link", "set", "eth0", "up"])
        if mtu:
            mesh.run(["ip", "-n", node, "link", "set", port, "mtu", str(mtu)])
            mesh.run(["ip", "-n", ns, "link", "set", "eth0", "mtu", str(mtu)])
        ip = f"{SUBNET}.{host}"
        mesh.run(["ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0"])
        # Any destination (the virtual IP too) leaves by eth0, so the nat OUTPUT rules see it.
        mesh.run(["ip", "-n", ns, "route", "add", "default", "dev", "eth0"])
        return Pod(name, ns, ip, version)

    frontend = pod("frontend", 10)
    payment = [pod(f"payment-v1-{chr(ord('a') + i)}", 11 + i, "v1") for i in range(v1_pods)]
    payment.append(pod("payment-v2", 20, "v2"))
    mesh.log(f"namespaces: {', '.join(mesh.namespaces)}")

    ca = os.path.join(mesh.tmp, "ca")
    mesh.run([serin, "ca", "init", "--dir", ca])
    config_dir = os.path.join(mesh.tmp, "config")
    os.makedirs(config_dir)
    os.chmod(config_dir, 0o755)
    with open(os.path.join(config_dir, "payment.yaml"), "w") as f:
        f.write(mesh_config(payment))
    os.chmod(os.path.join(config_dir, "payment.yaml"), 0o644)

    def identity(p, sa):
        out = os.path.join(mesh.tmp, f"id-{p.name}")
        mesh.run([serin, "ca", "issue", "--spiffe", f"spiffe://cluster.local/ns/default/sa/{sa}",
                  "--dir", ca, "--out", out])
        for entry in os.listdir(out):
            os.chown(os.path.join(out, entry), PROXY_UID, PROXY_UID)
        os.chown(out, PROXY_UID, PROXY_UID)
        return out

    def sidecar(p, app_label, version, sa):
        certs = identity(p, sa)
        argv = [serin, "sidecar", "--config", config_dir,
                "--outbound", "0.0.0.0:15001", "--inbound", "0.0.0.0:15006", "--app", "127.0.0.1:8080",
                "--admin", "127.0.0.1:15000", "--metrics", "0.0.0.0:15090", "--health", "0.0.0.0:15021",
                "--workload", p.name, "--namespace", "default", "--app-label", app_label,
                "--app-version", version, "--cert-dir", certs, "--no-access-log"]
        p.sidecar = mesh.spawn(f"sidecar-{p.name}", mesh.in_ns(p.ns, argv, uid=PROXY_UID))

    for p in payment:
        apply_rules(mesh, p)
        p.app = mesh.spawn(f"app-{p.name}", mesh.in_ns(p.ns, [
            serin, "upstream", "--listen", "0.0.0.0:8080", "--version", p.version, "--pod", p.name,
            "--body-size", "1024"], uid=APP_UID))
        sidecar(p, "payment", p.version, "payment")
    apply_rules(mesh, frontend)
    sidecar(frontend, "frontend", "v1", "frontend")

    for p in payment:
        mesh.http_get(p.ns, "http://127.0.0.1:8080/")
        mesh.http_get(p.ns, "http://127.0.0.1:15021/healthz/ready")
    mesh.http_get(frontend.ns, "http://127.0.0.1:15021/healthz/ready")
    mesh.check_alive()
    return frontend, payment


def apply_rules(mesh, p):
    mesh.run(mesh.in_ns(p.ns, [mesh.serin, "iptables"] + INIT_FLAGS))


def remove_rules(mesh, p):
    mesh.run(mesh.in_ns(p.ns, [mesh.serin, "iptables", "--cleanup"]))


def nat_rules(mesh, p):
    return mesh.run(mesh.in_ns(p.ns, ["iptables-save", "-t", "nat"])).stdout


def load(mesh, frontend, url, rate, duration, connections, timeout):
    argv = [mesh.serin_load, "--url", url, "--host", "payment:8080",
            "--connections", str(connections), "--duration", f"{duration}s", "--rate", str(rate), "--json"]
    # As root inside the frontend pod: captured like any app when the rules are there.
    out = mesh.run(mesh.in_ns(frontend.ns, argv), timeout=timeout, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"serin-load {url} failed ({out.returncode}): {out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout)


def scrape(mesh, p):
    return mesh.http_get(p.ns, "http://127.0.0.1:15090/stats/prometheus", timeout=10)


def mesh_counts(mesh, frontend, payment):
    """(frontend sidecar's requests to payment, payment sidecars' mTLS requests, their plaintext ones)."""
    sent = metric_sum(scrape(mesh, frontend), "istio_requests_total",
                      [("reporter", "source"), ("destination_service_name", "payment")])
    mtls = plain = 0.0
    for p in payment:
        text = scrape(mesh, p)
        mtls += metric_sum(text, "istio_requests_total",
                           [("reporter", "destination"), ("connection_security_policy", "mutual_tls")])
        plain += metric_sum(text, "istio_requests_total",
                            [("reporter", "destination"), ("connection_security_policy", "none")])
    return sent, mtls, plain


def measure(mesh, frontend, payment, path, url, rate, args):
    sidecars = [frontend.sidecar] + [p.sidecar for p in payment]
    apps = [p.app for p in payment]
    before = [cpu_split(p.pid) for p in sidecars + apps]
    client0 = children_cpu()
    busy0, soft0 = machine_cpu()
    t0 = time.time()
    rep = load(mesh, frontend, url, rate, args.duration, args.connections, args.duration + 60)
    wall = time.time() - t0
    client = children_cpu() - client0
    busy1, soft1 = machine_cpu()
    after = [cpu_split(p.pid) for p in sidecars + apps]
    delta = [sum(a) - sum(b) for a, b in zip(after, before)]
    sidecar_user = sum(a[0] - b[0] for a, b in zip(after[:len(sidecars)], before[:len(sidecars)]))
    sidecar_system = sum(a[1] - b[1] for a, b in zip(after[:len(sidecars)], before[:len(sidecars)]))
    mesh.check_alive()
    return {
        "path": path, "url": url, "rate": rate, "report": rep, "wall_secs": wall,
        "cpu_frontend_sidecar": delta[0],
        "cpu_payment_sidecars": sum(delta[1:len(sidecars)]),
        "cpu_apps": sum(delta[len(sidecars):]),
        "cpu_sidecars_user": sidecar_user,
        "cpu_sidecars_system": sidecar_system,
        "cpu_client": client,
        "machine_busy": busy1 - busy0,
        "machine_softirq": soft1 - soft0,
    }


def run_bench(args):
    mesh = Mesh(args.serin, args.serin_load, args.verbose)
    results = {"runs": [], "checks": []}
    try:
        frontend, payment = build_mesh(mesh, args.v1_pods, args.mtu)
        pods = [frontend] + payment
        target = payment[0]
        time.sleep(0.5)
        results["idle_rss_kb"] = {p.name: status_kb(p.sidecar.pid, "VmRSS") for p in pods}
        captured_url = f"http://{PAYMENT_VIP}:8080/"
        direct_url = f"http://{target.ip}:8080/"
        rates = [(args.rate, f"{args.rate} rps"), ("max", "max rate")]
        for rnd in range(args.rounds):
            if rnd > 0:
                for p in pods:
                    apply_rules(mesh, p)
            # (a) captured: client -> VIP -> frontend sidecar -> mTLS -> payment sidecar -> app.
            assert "SERIN" in nat_rules(mesh, frontend), "the frontend pod has no serin rules"
            mesh.log("captured mesh: warm-up")
            load(mesh, frontend, captured_url, "max", args.warmup, args.connections, args.warmup + 60)
            sent0, mtls0, plain0 = mesh_counts(mesh, frontend, payment)
            for rate, label in rates:
                mesh.log(f"captured mesh: {label}")
                r = measure(mesh, frontend, payment, "captured mesh (mTLS)", captured_url, rate, args)
                r["load"], r["round"] = label, rnd + 1
                results["runs"].append(r)
            sent1, mtls1, plain1 = mesh_counts(mesh, frontend, payment)
            answered = sum(r["report"]["requests"] - r["report"]["errors"]["total"]
                           for r in results["runs"] if r["round"] == rnd + 1)
            check = {"round": rnd + 1, "path": "captured", "answered": answered,
                     "frontend_sidecar_sent": sent1 - sent0, "payment_sidecars_mtls": mtls1 - mtls0,
                     "payment_sidecars_plaintext": plain1 - plain0}
            check["ok"] = (check["frontend_sidecar_sent"] >= answered and check["payment_sidecars_mtls"] >= answered
                           and check["payment_sidecars_plaintext"] == 0)
            results["checks"].append(check)
            results["peak_rss_kb"] = {p.name: status_kb(p.sidecar.pid, "VmHWM") for p in pods}

            # (b) rules removed: client -> payment-v1-a's IP:8080 -> app, plain HTTP.
            for p in pods:
                remove_rules(mesh, p)
            assert "SERIN" not in nat_rules(mesh, frontend), "serin rules left after --cleanup"
            mesh.log("rules removed: warm-up")
            load(mesh, frontend, direct_url, "max", args.warmup, args.connections, args.warmup + 60)
            sent0, mtls0, plain0 = mesh_counts(mesh, frontend, payment)
            for rate, label in rates:
                mesh.log(f"rules removed: {label}")
                r = measure(mesh, frontend, payment, "rules removed (direct)", direct_url, rate, args)
                r["load"], r["round"] = label, rnd + 1
                results["runs"].append(r)
            sent1, mtls1, plain1 = mesh_counts(mesh, frontend, payment)
            check = {"round": rnd + 1, "path": "direct", "frontend_sidecar_sent": sent1 - sent0,
                     "payment_sidecars_mtls": mtls1 - mtls0, "payment_sidecars_plaintext": plain1 - plain0}
            check["ok"] = sent1 == sent0 and mtls1 == mtls0 and plain1 == plain0
            results["checks"].append(check)
        results["pods"] = {p.name: p.ip for p in pods}
        results["direct_target"] = target.name
    except BaseException:
        for name, p, log_path in mesh.procs:
            if p.poll() is not None:
                print(f"--- {name} exited ({p.returncode}); last lines of its log:\n{tail(log_path)}",
                      file=sys.stderr)
        raise
    finally:
        signal.alarm(0)
        old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        try:
            mesh.close()
        finally:
            for s, h in old.items():
                signal.signal(s, h)
    return results


def fmt_ms(x):
    return f"{x:.3f}"


def print_report(args, results, load_before, load_after, date):
    runs = results["runs"]
    v1 = args.v1_pods
    print(f"\n### Captured mesh in network namespaces: frontend → payment (HTTP/1.1, {args.connections} connections, "
          f"1 KiB answers, {args.duration} s per run)\n")
    print(f"Machine: {os.cpu_count()} cores, {cpu_model()}, {platform.platform()}; date {date}")
    print(f"Load on the machine: before `{load_before}`; after `{load_after}`")
    print(f"Command: `{command_line(args)}`; binaries: {args.built}\n")
    print(f"Pods: frontend, payment-v1 ×{v1}, payment-v2 ×1 (each a network namespace on one bridge). "
          f"*captured mesh (mTLS)*: `serin-load` as root in the frontend pod → `{PAYMENT_VIP}:8080` (virtual IP) → "
          f"captured → frontend sidecar (95/5 split) → mTLS → payment pod → captured → payment sidecar → app. "
          f"*rules removed (direct)*: `serin iptables --cleanup` in every pod, then `serin-load` → "
          f"`{results['pods'][results['direct_target']]}:8080` ({results['direct_target']}'s app, plain HTTP).\n")
    print("| path | load | requests | rps | p50 ms | p99 ms | p99.9 ms | errors | v2 share "
          "| sidecars CPU s / 1k req (frontend + payment) | payment apps CPU s / 1k req | client CPU s / 1k req |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in runs:
        rep = r["report"]
        n = max(rep["requests"], 1)
        lat = rep["latency_ms"]
        versions = rep.get("versions", {})
        v2 = f"{100.0 * versions['v2']['share']:.2f}%" if "v2" in versions else "-"
        side = r["cpu_frontend_sidecar"] + r["cpu_payment_sidecars"]
        if r["path"].startswith("captured"):
            side_s = (f"{1000 * side / n:.4f} ({1000 * r['cpu_frontend_sidecar'] / n:.4f} + "
                      f"{1000 * r['cpu_payment_sidecars'] / n:.4f})")
        else:
            side_s = f"- (idle: {side:.2f} s in all)"
        label = r["path"] + (f", round {r['round']}" if args.rounds > 1 else "")
        print(f"| {label} | {r['load']} | {rep['requests']} | {rep['rps']:.0f} | {fmt_ms(lat['p50'])} | "
              f"{fmt_ms(lat['p99'])} | {fmt_ms(lat['p999'])} | {rep['errors']['total']} | {v2} | {side_s} | "
              f"{1000 * r['cpu_apps'] / n:.4f} | {1000 * r['cpu_client'] / n:.4f} |")
    print()
    by = {}
    for r in runs:
        by.setdefault((r["round"], r["load"]), {})[r["path"].split(" ")[0]] = r
    for (rnd, label), pair in by.items():
        a, b = pair.get("captured"), pair.get("rules")
        if not a or not b:
            continue
        la, lb = a["report"]["latency_ms"], b["report"]["latency_ms"]
        na, nb = max(a["report"]["requests"], 1), max(b["report"]["requests"], 1)
        cpu_a = (a["cpu_frontend_sidecar"] + a["cpu_payment_sidecars"] + a["cpu_apps"] + a["cpu_client"]) / na
        cpu_b = (b["cpu_apps"] + b["cpu_client"]) / nb
        print(f"- {label}{f' (round {rnd})' if args.rounds > 1 else ''}: capture + both sidecars + mTLS add "
              f"p50 {la['p50'] - lb['p50']:+.3f} ms, p99 {la['p99'] - lb['p99']:+.3f} ms; rps ratio "
              f"{a['report']['rps'] / max(b['report']['rps'], 1):.2f}; CPU of everything measured "
              f"(sidecars + apps + client) {1000 * cpu_a:.4f} vs {1000 * cpu_b:.4f} s / 1k req")
    print("- sidecars' CPU, user + system (kernel: sockets, TCP, netfilter, veth): " + "; ".join(
        f"{r['load']}: {1000 * r['cpu_sidecars_user'] / max(r['report']['requests'], 1):.4f} + "
        f"{1000 * r['cpu_sidecars_system'] / max(r['report']['requests'], 1):.4f} s / 1k req"
        for r in runs if r["path"].startswith("captured")))
    print("- whole machine during each run (/proc/stat: every process, other builds included, so only a hint): "
          + "; ".join(f"{r['path'].split(' ')[0]} {r['load']}: {r['machine_busy'] / r['wall_secs']:.2f} cores busy, "
                      f"softirq {1000 * r['machine_softirq'] / max(r['report']['requests'], 1):.4f} s / 1k req"
                      for r in runs))
    idle, peak = results["idle_rss_kb"], results.get("peak_rss_kb", {})
    print("- sidecar RSS, idle → peak (VmHWM): " + ", ".join(
        f"{name} {idle[name] / 1024:.1f} → {peak.get(name, 0) / 1024:.1f} MiB" for name in idle))
    for c in results["checks"]:
        if c["path"] == "captured":
            print(f"- check (round {c['round']}, captured): {c['answered']:.0f} answered requests; the frontend sidecar "
                  f"routed {c['frontend_sidecar_sent']:.0f} to payment; the payment sidecars took "
                  f"{c['payment_sidecars_mtls']:.0f} over mTLS and {c['payment_sidecars_plaintext']:.0f} in plaintext "
                  f"(warm-up excluded) — {'ok' if c['ok'] else 'FAILED'}")
        else:
            print(f"- check (round {c['round']}, rules removed): the sidecars saw "
                  f"{c['frontend_sidecar_sent'] + c['payment_sidecars_mtls'] + c['payment_sidecars_plaintext']:.0f} "
                  f"requests — {'ok' if c['ok'] else 'FAILED'}")


def command_line(args):
    parts = ["python3 benches/netns_mesh.py"]
    if args.quick:
        parts.append("--quick")
    else:
        parts += ["--duration", str(args.duration), "--rate", str(args.rate)]
    if args.v1_pods != 1:
        parts += ["--v1-pods", str(args.v1_pods)]
    if args.rounds != 1:
        parts += ["--rounds", str(args.rounds)]
    if args.connections != 64:
        parts += ["--connections", str(args.connections)]
    if args.mtu:
        parts += ["--mtu", str(args.mtu)]
    return " ".join(parts)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=int, default=10, help="seconds per measured run (default 10)")
    ap.add_argument("--rate", type=int, default=1000, help="open-loop rate in req/s (default 1000)")
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=2, help="seconds of unmeasured load before each path (default 2)")
    ap.add_argument("--v1-pods", type=int, choices=(1, 2), default=1, help="payment v1 pods (v2 has one)")
    ap.add_argument("--rounds", type=int, default=1, help="repeat captured/direct this many times (rules re-applied)")
    ap.add_argument("--mtu", type=int, help="MTU of the pods' veth links (default: the kernel's, 1500)")
    ap.add_argument("--quick", action="store_true", help="a tiny run (1 s per run, 200 rps), for the smoke test")
    ap.add_argument("--bin-dir", default=os.path.join(ROOT, "target", "release"),
                    help="where serin and serin-load are (default target/release)")
    ap.add_argument("--serin", help="the serin binary (default: BIN_DIR/serin)")
    ap.add_argument("--serin-load", help="the serin-load binary (default: BIN_DIR/serin-load)")
    ap.add_argument("--no-build", action="store_true", help="never run cargo (fail when the binaries are missing)")
    ap.add_argument("--build", action="store_true", help="run cargo build --release even when the binaries exist")
    ap.add_argument("--json", metavar="FILE", help="also write the raw results (serin-load reports, CPU) here")
    ap.add_argument("--fail-on-errors", action="store_true", help="exit 1 when any measured request failed")
    ap.add_argument("--deadline", type=int, default=0, help="bound on the whole run in seconds (default: computed)")
    ap.add_argument("-v", "--verbose", action="store_true", help="say what it does on stderr")
    args = ap.parse_args()
    if args.quick:
        args.duration, args.rate, args.warmup = 1, 200, 1

    missing = missing_requirements()
    if missing:
        print(f"netns_mesh.py needs {', '.join(missing)}: run it as root with iproute2 and iptables installed "
              f"(`apt-get install -y iptables iproute2`)", file=sys.stderr)
        return 2

    args.serin = os.path.abspath(args.serin or os.path.join(args.bin_dir, "serin"))
    args.serin_load = os.path.abspath(args.serin_load or os.path.join(args.bin_dir, "serin-load"))
    bins = [args.serin, args.serin_load]
    if args.build or not all(os.path.isfile(b) for b in bins):
        if args.no_build:
            print(f"missing {', '.join(b for b in bins if not os.path.isfile(b))} (and --no-build)", file=sys.stderr)
            return 2
        subprocess.run(["cargo", "build", "--release", "-q", "-p", "serin", "-p", "serin-benches"],
                       cwd=ROOT, check=True, timeout=3600)

    args.built = ", ".join(
        f"`{os.path.relpath(b, ROOT) if b.startswith(ROOT) else b}` built "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(os.path.getmtime(b)))}" for b in bins)
    deadline = args.deadline or (180 + args.rounds * (2 * (args.warmup + 60) + 4 * (args.duration + 60)))

    def on_alarm(_sig, _frame):
        raise Deadline(f"the benchmark passed its deadline of {deadline} s")

    def on_term(sig, _frame):
        raise SystemExit(128 + sig)

    signal.signal(signal.SIGALRM, on_alarm)
    # Also when started with SIGINT ignored (a background job of a script): Ctrl-C / kill -INT cleans up.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)
    signal.alarm(deadline)

    date = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    load_before = uptime()
    try:
        results = run_bench(args)
    except (RuntimeError, AssertionError, Deadline) as e:
        print(f"netns_mesh.py: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("netns_mesh.py: interrupted; every process and namespace it made is gone", file=sys.stderr)
        return 130
    load_after = uptime()
    print_report(args, results, load_before, load_after, date)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(results, date=date, load_before=load_before, load_after=load_after,
                           command=command_line(args)), f, indent=1)
    if not all(c["ok"] for c in results["checks"]):
        print("netns_mesh.py: a path check failed (see the checks above)", file=sys.stderr)
        return 1
    errors = sum(r["report"]["errors"]["total"] for r in results["runs"])
    if args.fail_on_errors and errors:
        print(f"netns_mesh.py: {errors} requests failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
