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


def config(v1, v2):
    eps = "".join(
        f"  - {{address: 127.0.0.1, ports: {{http: {p}}}, labels: {{app: payment, version: {v}}}}}\n"
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
        with open(os.path.join(tmp, "payment.yaml"), "w") as f:
            f.write(config(v1, v2))
        out_p, adm, met, hea = (free_port() for _ in range(4))
        sidecar = subprocess.Popen(
            [os.path.join(BIN, "serin"), "sidecar", "--config", tmp, "--outbound", f"127.0.0.1:{out_p}",
             "--admin", f"127.0.0.1:{adm}", "--metrics", f"127.0.0.1:{met}", "--health", f"127.0.0.1:{hea}",
             "--no-access-log"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(sidecar)
        wait_http(f"http://127.0.0.1:{hea}/healthz/ready")
        wait_http(f"http://127.0.0.1:{v1}/")
        time.sleep(0.5)
        idle_rss = status_kb(sidecar.pid, "VmRSS")

        rows = []
        for label, rate in ((f"{args.rate} rps", args.rate), ("max rate", "max")):
            for target, url in (("direct", f"http://127.0.0.1:{v1}/"), ("serin", f"http://127.0.0.1:{out_p}/")):
                cpu0 = cpu_seconds(sidecar.pid)
                rep = load(url, rate, args.duration, args.connections, args.http2)
                cpu = cpu_seconds(sidecar.pid) - cpu0
                rows.append((label, target, rep, cpu))
        peak_rss = status_kb(sidecar.pid, "VmHWM")
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
          f"{' --http2' if args.http2 else ''}`\n")
    print("| load | path | requests | rps | p50 ms | p90 ms | p99 ms | p99.9 ms | errors | v2 share | serin CPU s / 1k req |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    base = {}
    for label, target, rep, cpu in rows:
        lat = rep["latency_ms"]
        errors = rep["errors"]["total"]
        versions = rep.get("versions", {})
        v2 = f"{100.0 * versions['v2']['share']:.3f}%" if "v2" in versions else "-"
        per_k = f"{1000.0 * cpu / rep['requests']:.4f}" if target == "serin" and rep["requests"] else "-"
        print(f"| {label} | {target} | {rep['requests']} | {rep['rps']:.0f} | {lat['p50']:.3f} | {lat['p90']:.3f} | "
              f"{lat['p99']:.3f} | {lat['p999']:.3f} | {errors} | {v2} | {per_k} |")
        base.setdefault(label, {})[target] = rep
    for label, pair in base.items():
        if "direct" in pair and "serin" in pair:
            d, s = pair["direct"], pair["serin"]
            print(f"\n{label}: added p50 {s['latency_ms']['p50'] - d['latency_ms']['p50']:+.3f} ms, "
                  f"added p99 {s['latency_ms']['p99'] - d['latency_ms']['p99']:+.3f} ms, "
                  f"rps ratio serin/direct {s['rps'] / max(d['rps'], 1):.2f}", end="")
    print(f"\n\nserin sidecar RSS: idle {idle_rss / 1024:.1f} MiB, peak under load {peak_rss / 1024:.1f} MiB")


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
