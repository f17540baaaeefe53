#!/usr/bin/env python3
"""Direct vs through one serin sidecar, on loopback.

Starts two demo upstreams (v1, v2: 1 KiB answers), a serin sidecar splitting
95/5 between them, and runs serin-load against the upstream directly and
through the sidecar: open loop at a fixed rate and closed loop at max rate,
HTTP/1.1 (and h2c with --http2), 64 connections. Reports latency, max rps, the
sidecar's CPU seconds per 1,000 requests (from /proc/<pid>/stat) and its RSS
(idle, and peak from VmHWM). Prints a Markdown table for benches/RESULTS.md.

Usage: python3 benches/proxy_bench.py [--duration 10] [--rate 1000] [--quick]
(builds the release binaries first; every process it starts is stopped at the end)
"""

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release")
TICKS = os.sysconf("SC_CLK_TCK")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def status_kb(pid, key):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def config(v1, v2, mesh=False):
    """The 95/5 canary over two endpoints; `mesh` marks them as sidecars (auto-mTLS)."""
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
        "spec:\n  host: payment\n  subsets:\n  - {name: v1, labels: {version: v1}}\n  - {name: v2, labels: {version: v2}}\n"
        "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: payment, namespace: default}\n"
        "spec:\n  hosts: [payment]\n  http:\n  - route:\n"
        "    - {destination: {host: payment, subset: v1}, weight: 95}\n"
        "    - {destination: {host: payment, subset: v2}, weight: 5}\n"
    )


class Sidecar:
    """A `serin sidecar` process on ephemeral loopback ports."""

    def __init__(self, procs, config_dir, cert_dir=None, app=None):
        self.outbound, self.inbound, adm, met, self.health = (free_port() for _ in range(5))
        cmd = [os.path.join(BIN, "serin"), "sidecar", "--outbound", f"127.0.0.1:{self.outbound}",
               "--inbound", f"127.0.0.1:{self.inbound}", "--admin", f"127.0.0.1:{adm}",
               "--metrics", f"127.0.0.1:{met}", "--health", f"127.0.0.1:{self.health}", "--no-access-log"]
        if config_dir:
            cmd += ["--config", config_dir]
        if cert_dir:
            cmd += ["--cert-dir", cert_dir]
        if app:
            cmd += ["--app", f"127.0.0.1:{app}"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(self.proc)
        wait_http(f"http://127.0.0.1:{self.health}/healthz/ready")

    @property
    def pid(self):
        return self.proc.pid


def write(dir_path, name, text):
    os.makedirs(dir_path, exist_ok=True)
    with open(os.path.join(dir_path, name), "w") as f:
        f.write(text)


def serin_ca(tmp):
    """A mesh CA and the identities `frontend` and `payment`, made with `serin ca`."""
    ca = os.path.join(tmp, "ca")
    subprocess.run([os.path.join(BIN, "serin"), "ca", "init", "--dir", ca], check=True, capture_output=True)
    dirs = {}
    for sa in ("frontend", "payment"):
        out = os.path.join(tmp, "id-" + sa)
        subprocess.run([os.path.join(BIN, "serin"), "ca", "issue", "--dir", ca, "--out", out,
                        "--spiffe", f"spiffe://cluster.local/ns/default/sa/{sa}"], check=True, capture_output=True)
        dirs[sa] = out
    return dirs


def load(url, rate, duration, connections, http2):
    cmd = [os.path.join(BIN, "serin-load"), "--url", url, "--host", "payment", "--connections", str(connections),
           "--duration", f"{duration}s", "--rate", str(rate), "--json"]
    if http2:
        cmd.append("--http2")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=duration + 60)
    return json.loads(out.stdout)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--rate", type=int, default=1000)
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--http2", action="store_true")
    ap.add_argument("--pairs", action="store_true",
                    help="also the sidecar pair (client -> sidecar -> sidecar -> app), plaintext and mutual TLS")
    ap.add_argument("--quick", action="store_true", help="2 s runs, for a smoke test")
    ap.add_argument("--no-build", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.duration = 2
    if not args.no_build:
        subprocess.run(["cargo", "build", "--release", "-q", "-p", "serin", "-p", "serin-benches"], cwd=ROOT, check=True)

    procs = []
    tmp = tempfile.mkdtemp(prefix="serin-bench-")
    try:
        v1, v2 = free_port(), free_port()
        for version, port in (("v1", v1), ("v2", v2)):
            procs.append(subprocess.Popen(
                [os.path.join(BIN, "serin"), "upstream", "--version", version, "--listen", f"127.0.0.1:{port}",
                 "--body-size", "1024"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_http(f"http://127.0.0.1:{v1}/")
        write(os.path.join(tmp, "one-hop"), "payment.yaml", config(v1, v2))
        one_hop = Sidecar(procs, os.path.join(tmp, "one-hop"))
        # path name -> (url, [proxy processes whose CPU counts])
        paths = [("direct", f"http://127.0.0.1:{v1}/", []),
                 ("serin one hop", f"http://127.0.0.1:{one_hop.outbound}/", [one_hop])]
        if args.pairs:
            ids = serin_ca(tmp)
            b1 = Sidecar(procs, None, ids["payment"], app=v1)
            b2 = Sidecar(procs, None, ids["payment"], app=v2)
            write(os.path.join(tmp, "pair-plain"), "payment.yaml", config(b1.inbound, b2.inbound))
            write(os.path.join(tmp, "pair-mtls"), "payment.yaml", config(b1.inbound, b2.inbound, mesh=True))
            a_plain = Sidecar(procs, os.path.join(tmp, "pair-plain"))
            a_mtls = Sidecar(procs, os.path.join(tmp, "pair-mtls"), ids["frontend"])
            paths += [("serin pair, plaintext", f"http://127.0.0.1:{a_plain.outbound}/", [a_plain, b1, b2]),
                      ("serin pair, mTLS", f"http://127.0.0.1:{a_mtls.outbound}/", [a_mtls, b1, b2])]
        time.sleep(0.5)
        idle_rss = status_kb(one_hop.pid, "VmRSS")

        rows = []
        for label, rate in ((f"{args.rate} rps", args.rate), ("max rate", "max")):
            for name, url, proxies in paths:
                cpu0 = sum(cpu_seconds(p.pid) for p in proxies)
                rep = load(url, rate, args.duration, args.connections, args.http2)
                cpu = sum(cpu_seconds(p.pid) for p in proxies) - cpu0
                rows.append((label, name, rep, cpu, bool(proxies)))
        peaks = {name: max((status_kb(p.pid, "VmHWM") for p in proxies), default=0) for name, _, proxies in paths}
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()

    proto = "h2c" if args.http2 else "HTTP/1.1"
    print(f"\n### Direct vs through serin ({proto}, {args.connections} connections, 1 KiB answers, {args.duration} s per run)\n")
    print(f"Machine: {os.cpu_count()} cores, {cpu_model()}, {platform.platform()}; date {time.strftime('%Y-%m-%d')}")
    print(f"Command: `python3 benches/proxy_bench.py --duration {args.duration} --rate {args.rate}"
          f"{' --http2' if args.http2 else ''}{' --pairs' if args.pairs else ''}`\n")
    print("| load | path | requests | rps | p50 ms | p90 ms | p99 ms | p99.9 ms | errors | v2 share | proxies' CPU s / 1k req |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    by_label = {}
    for label, name, rep, cpu, has_proxy in rows:
        lat = rep["latency_ms"]
        errors = rep["errors"]["total"]
        versions = rep.get("versions", {})
        v2 = f"{100.0 * versions['v2']['share']:.3f}%" if "v2" in versions else "-"
        per_k = f"{1000.0 * cpu / rep['requests']:.4f}" if has_proxy and rep["requests"] else "-"
        print(f"| {label} | {name} | {rep['requests']} | {rep['rps']:.0f} | {lat['p50']:.3f} | {lat['p90']:.3f} | "
              f"{lat['p99']:.3f} | {lat['p999']:.3f} | {errors} | {v2} | {per_k} |")
        by_label.setdefault(label, {})[name] = rep
    print()
    for label, reps in by_label.items():
        d = reps["direct"]
        for name, r in reps.items():
            if name != "direct":
                print(f"- {label}, {name}: added p50 {r['latency_ms']['p50'] - d['latency_ms']['p50']:+.3f} ms, "
                      f"added p99 {r['latency_ms']['p99'] - d['latency_ms']['p99']:+.3f} ms, "
                      f"rps ratio to direct {r['rps'] / max(d['rps'], 1):.2f}")
    print(f"\nserin one-hop sidecar RSS: idle {idle_rss / 1024:.1f} MiB; peak under load per path (largest proxy): "
          + ", ".join(f"{n} {kb / 1024:.1f} MiB" for n, kb in peaks.items() if kb))


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    sys.exit(main())
