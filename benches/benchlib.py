"""Helpers shared by the benchmark scripts in benches/ (proxy_bench.py, compare).

Loopback ports, readiness waits, CPU and memory of processes (and of a process
tree: a master and its workers) from /proc, the payment canary config for a serin
sidecar, identities from `serin ca`, a `serin sidecar` process on free
ports, and how much of the linker's order file a binary still matches.
Standard library only.
"""

import os
import platform
import random
import socket
import subprocess
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release")
TICKS = os.sysconf("SC_CLK_TCK")
ORDER_FILE = os.path.join(ROOT, "proxy", "serin.order")
# Below this share of its symbols found in the binary, the order file is stale.
ORDER_FILE_MIN_SHARE = 0.9
# The order file's first names are the request path's hottest functions: one of
# them missing (its mangled name changed) puts it outside the ordered code
# (benches/RESULTS.md, round 8), so all must be found.
ORDER_FILE_HOT = 100


_HANDED_OUT = set()


def _ephemeral_range():
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(x) for x in f.read().split())
            return low, high
    except (OSError, ValueError):
        return 32768, 60999


def free_port():
    """A loopback port that is free now, outside the kernel's ephemeral range.

    A port the kernel picked for `bind(0)` is an ephemeral one: once the probe
    socket closes, the next outgoing connection (the load generator opens
    hundreds) may take it before our proxy binds it. Ports below the ephemeral
    range are never handed to connect(), so a free one stays free until a
    listener takes it; each is handed out once per process.
    """
    low, _ = _ephemeral_range()
    top = low - 1 if low > 11000 else 65535
    for _ in range(1000):
        port = random.randint(10000, top)
        if port in _HANDED_OUT or low <= port <= _ephemeral_range()[1]:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise SystemExit("no free loopback port outside the ephemeral range")


def wait_http(url, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"not ready: {url}")


def cpu_seconds(pid):
    """utime + stime of one process (all its threads), seconds."""
    return sum(cpu_split(pid))


def cpu_split(pid):
    """(utime, stime) of one process (all its threads): user-space and kernel seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICKS, int(fields[12]) / TICKS


def status_kb(pid, key):
    """A `kB` field of /proc/<pid>/status (VmRSS, VmHWM, ...); 0 when absent."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def tree_pids(pid):
    """`pid` and every live descendant (e.g. an nginx master and its workers)."""
    children = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
        children.setdefault(ppid, []).append(int(name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def tree_cpu_seconds(pid):
    """CPU seconds (utime + stime) summed over `pid`'s process tree."""
    total = 0.0
    for p in tree_pids(pid):
        try:
            total += cpu_seconds(p)
        except OSError:
            pass  # exited meanwhile
    return total


def tree_cpu_split(pid):
    """(utime, stime) seconds summed over `pid`'s process tree."""
    user = system = 0.0
    for p in tree_pids(pid):
        try:
            u, s = cpu_split(p)
        except OSError:
            continue  # exited meanwhile
        user, system = user + u, system + s
    return user, system


def tree_status_kb(pid, key):
    """`status_kb` summed over `pid`'s process tree, and the largest single process."""
    values = []
    for p in tree_pids(pid):
        try:
            values.append(status_kb(p, key))
        except OSError:
            pass
    return sum(values), max(values, default=0)


def tree_pss_kb(pid):
    """Proportional set size (Pss, /proc/<pid>/smaps_rollup) summed over `pid`'s process
    tree, kB: pages shared between a master and its workers are counted once."""
    total = 0
    for p in tree_pids(pid):
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            pass
    return total


def config(v1, v2, mesh=False, h1=False):
    """The 95/5 canary over two endpoints; `mesh` marks them as sidecars (auto-mTLS);
    `h1` keeps HTTP/1.1 on the hop between sidecars (`h2UpgradePolicy: DO_NOT_UPGRADE`)."""
    policy = "  trafficPolicy: {connectionPool: {http: {h2UpgradePolicy: DO_NOT_UPGRADE}}}\n" if h1 else ""
    extra = ", serviceAccount: payment" if mesh else ""
    label = ", security.istio.io/tlsMode: istio" if mesh else ""
    eps = "".join(
        f"  - {{address: 127.0.0.1, ports: {{http: {p}}}{extra}, labels: {{app: payment, version: {v}{label}}}}}\n"
        for v, p in (("v1", v1), ("v2", v2))
    )
    return (
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: payment, namespace: default}\n"
        "spec:\n  hosts: [payment.default.svc.cluster.local]\n  resolution: STATIC\n"
        "  ports: [{number: 8080, name: http, protocol: HTTP}]\n  endpoints:\n" + eps +
        "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: payment, namespace: default}\n"
        "spec:\n  host: payment\n" + policy + "  subsets:\n  - {name: v1, labels: {version: v1}}\n"
        "  - {name: v2, labels: {version: v2}}\n"
        "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: payment, namespace: default}\n"
        "spec:\n  hosts: [payment]\n  http:\n  - route:\n"
        "    - {destination: {host: payment, subset: v1}, weight: 95}\n"
        "    - {destination: {host: payment, subset: v2}, weight: 5}\n"
    )


class Sidecar:
    """A `serin sidecar` process on ephemeral loopback ports.

    `prefix` goes before the command (e.g. `["taskset", "-c", "0"]`), `env` is the
    process environment (default: ours), `serin` the binary (default
    target/release/serin), `extra` more flags. With `wait`, returns once `/healthz/ready`
    answers 200.
    """

    def __init__(self, procs, config_dir, cert_dir=None, app=None, serin=None, prefix=(), env=None,
                 wait=True, extra=()):
        self.outbound, self.inbound, adm, met, self.health = (free_port() for _ in range(5))
        cmd = list(prefix) + [
            serin or os.path.join(BIN, "serin"), "sidecar", "--outbound", f"127.0.0.1:{self.outbound}",
            "--inbound", f"127.0.0.1:{self.inbound}", "--admin", f"127.0.0.1:{adm}",
            "--metrics", f"127.0.0.1:{met}", "--health", f"127.0.0.1:{self.health}", "--no-access-log"]
        if config_dir:
            cmd += ["--config", config_dir]
        if cert_dir:
            cmd += ["--cert-dir", cert_dir]
        if app:
            cmd += ["--app", f"127.0.0.1:{app}"]
        cmd += list(extra)
        self.started = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        procs.append(self.proc)
        if wait:
            wait_http(f"http://127.0.0.1:{self.health}/healthz/ready")

    @property
    def pid(self):
        return self.proc.pid


def write(dir_path, name, text):
    os.makedirs(dir_path, exist_ok=True)
    path = os.path.join(dir_path, name)
    with open(path, "w") as f:
        f.write(text)
    return path


def serin_ca(tmp, serin=None, accounts=("frontend", "payment")):
    """A mesh CA and one identity per service account, made with `serin ca`.

    Returns {account: folder holding key.pem, cert-chain.pem, root-cert.pem}."""
    serin = serin or os.path.join(BIN, "serin")
    ca = os.path.join(tmp, "ca")
    subprocess.run([serin, "ca", "init", "--dir", ca], check=True, capture_output=True, timeout=60)
    dirs = {}
    for sa in accounts:
        out = os.path.join(tmp, "id-" + sa)
        subprocess.run([serin, "ca", "issue", "--dir", ca, "--out", out,
                        "--spiffe", f"spiffe://cluster.local/ns/default/sa/{sa}"],
                       check=True, capture_output=True, timeout=60)
        dirs[sa] = out
    return dirs


def stop_all(procs, timeout=10):
    """SIGTERM every process, then SIGKILL what has not exited after `timeout`."""
    for p in procs:
        if p.poll() is None:
            try:
                p.terminate()
            except OSError:
                pass
    for p in procs:
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=timeout)


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def order_file_coverage(binary, order_file=ORDER_FILE):
    """(listed symbols defined in `binary`, symbols listed in `order_file`, of its
    first ORDER_FILE_HOT the number defined, that number of hottest listed).

    The linker ignores listed names the binary no longer has: after a change to
    generic types many instantiations get new mangled names, their code is placed
    unordered, and an idle sidecar touches megabytes more of the binary
    (benches/RESULTS.md, round 7); the hottest functions can be renamed while
    nearly all names still match (round 8). Needs `nm` (binutils).
    """
    with open(order_file) as f:
        listed = f.read().split()
    out = subprocess.run(["nm", "--defined-only", "--format=just-symbols", binary],
                         capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise RuntimeError(f"nm {binary} failed ({out.returncode}): {out.stderr.strip()}")
    defined = set(out.stdout.split())
    hot = listed[:ORDER_FILE_HOT]
    return (sum(1 for name in listed if name in defined), len(listed),
            sum(1 for name in hot if name in defined), len(hot))


def order_file_stale(coverage):
    """True when `coverage` (from order_file_coverage, or None: unchecked) has fewer
    than ORDER_FILE_MIN_SHARE of its names, or not all of its hottest, in the binary."""
    if coverage is None:
        return False
    found, listed, hot_found, hot_listed = coverage
    return found < ORDER_FILE_MIN_SHARE * listed or hot_found < hot_listed


def order_file_note(coverage):
    """One line on `coverage` for a report: the count, and current or stale (what to do then)."""
    if coverage is None:
        return "not checked"
    found, listed, hot_found, hot_listed = coverage
    return (f"{found:,} of {listed:,} symbols in the binary (the hottest {hot_listed:,}: {hot_found:,}), "
            + ("stale: regenerate it (python3 benches/orderfile.py) and rebuild" if order_file_stale(coverage)
               else "current"))
