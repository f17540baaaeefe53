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
import subprocess
import sys
import tempfile
import time

# Helpers shared with benches/compare (the side-by-side with nginx and haproxy).
from benchlib import (BIN, ROOT, Sidecar, config, cpu_model, cpu_seconds, free_port, serin_ca,  # noqa: F401
                      status_kb, wait_http, write)


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



if __name__ == "__main__":
    sys.exit(main())
