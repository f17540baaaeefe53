#!/usr/bin/env python3
"""Instructions per proxied request: a noise-free cost figure (issue 6, item 3).

Starts two demo upstreams (`serin upstream --body-size 1024`, v1 and v2) and, on
loopback, (1) one `serin sidecar` splitting 95/5 between them, and (2) the mutual
TLS sidecar pair (sidecar A -> mTLS, adaptive (--mesh-h1: HTTP/1.1) -> sidecar B1/B2 ->
upstream, identities from
`serin ca`, STRICT PeerAuthentication), as benches/proxy_bench.py --pairs does.
Warms each path up, then counts the proxies' instructions over a fixed number of
requests sent by `serin-load --requests N --connections 64` (HTTP/1.1).

Counters: `perf stat -e instructions:u,instructions:k -p <pid>` when the CPU's
hardware counters are available; otherwise (KVM guests without a vPMU, like the
machine of benches/RESULTS.md) every proxy runs under `valgrind --tool=callgrind`
and the figure is callgrind's Ir (user-space instructions, all threads) per
request; kernel instructions cannot be counted then, so the kernel side is given
as system calls per request (`perf stat -e raw_syscalls:sys_enter -p <pid>`, a
software tracepoint, on a separate run without valgrind).

Usage: python3 benches/instructions.py [--requests 20000] [--no-build] [--keep DIR]
(every process it starts is stopped at the end; loopback only)
"""

import argparse
import glob
import os
import platform
import json
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import (BIN, ROOT, Sidecar, config, cpu_model, free_port, serin_ca, status_kb,  # noqa: E402
                      stop_all, wait_http, write)

CONNECTIONS = 64
MESH_H1 = False  # --mesh-h1: h2UpgradePolicy DO_NOT_UPGRADE on the pair's mTLS hop


def hw_counters():
    """True when `perf stat -e instructions:u` counts (not `<not supported>`)."""
    try:
        out = subprocess.run(["perf", "stat", "-x,", "-e", "instructions:u", "true"], capture_output=True,
                             text=True, timeout=30)
    except OSError:
        return False
    return any(line.split(",")[0].strip().isdigit() for line in out.stderr.splitlines())


def load(port, requests):
    cmd = [os.path.join(BIN, "serin-load"), "--url", f"http://127.0.0.1:{port}/", "--host", "payment",
           "--connections", str(CONNECTIONS), "--requests", str(requests), "--timeout", "60s", "--json"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
    rep = json.loads(out.stdout)
    if rep["errors"]["total"]:
        raise SystemExit(f"load had errors: {rep['errors']}")
    return rep


def perf_counts(pids, events, port, requests):
    """Run the load while `perf stat` counts `events` on every pid; {event: total}."""
    perfs = []
    for pid in pids:
        perfs.append(subprocess.Popen(["perf", "stat", "-x,", "-e", ",".join(events), "-p", str(pid)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    time.sleep(0.3)  # perf attached
    rep = load(port, requests)
    totals = dict.fromkeys(events, 0)
    for p in perfs:
        p.send_signal(2)  # SIGINT: perf prints its counts and exits
        _, err = p.communicate(timeout=30)
        for line in err.splitlines():
            f = line.split(",")
            if len(f) > 2 and f[2] in totals and f[0].strip().isdigit():
                totals[f[2]] += int(f[0])
    return totals, rep


def callgrind_ctl(pid, arg):
    subprocess.run(["callgrind_control", arg, str(pid)], check=True, capture_output=True, timeout=120)


def callgrind_ir(pids, outs, port, requests):
    """Zero callgrind's counters in every proxy, run the load, dump; total Ir."""
    for pid in pids:
        callgrind_ctl(pid, "--zero")
    rep = load(port, requests)
    total = 0
    for pid, out in zip(pids, outs):
        before = set(glob.glob(out + "*"))
        callgrind_ctl(pid, "--dump=measured")
        deadline = time.time() + 60
        new = set()
        while time.time() < deadline and not new:
            new = set(glob.glob(out + "*")) - before
            time.sleep(0.1)
        for path in new:
            with open(path) as f:
                for line in f:
                    if line.startswith("totals:") or line.startswith("summary:"):
                        total += int(line.split()[1])
                        break
    return total, rep


def start_paths(tmp, procs, v1, v2, valgrind, outdir):
    """The one-hop sidecar and the mTLS pair (A, B1, B2); {name: (port, [Sidecar])}."""
    def sidecar(name, config_dir, cert_dir=None, app=None):
        prefix = ()
        if valgrind:
            prefix = ("valgrind", "--tool=callgrind", f"--callgrind-out-file={outdir}/{name}.%p",
                      "--dump-instr=no", "--collect-jumps=no")
        s = Sidecar(procs, config_dir, cert_dir, app=app, prefix=prefix, wait=False)
        wait_http(f"http://127.0.0.1:{s.health}/healthz/ready", timeout=120 if valgrind else 10)
        s.name, s.out = name, f"{outdir}/{name}.{s.pid}"
        return s

    write(os.path.join(tmp, "one-hop"), "payment.yaml", config(v1, v2))
    one = sidecar("one-hop", os.path.join(tmp, "one-hop"))
    ids = serin_ca(tmp)
    b1 = sidecar("pair-b1", None, ids["payment"], app=v1)
    b2 = sidecar("pair-b2", None, ids["payment"], app=v2)
    write(os.path.join(tmp, "pair-mtls"), "payment.yaml", config(b1.inbound, b2.inbound, mesh=True, h1=MESH_H1))
    a = sidecar("pair-a", os.path.join(tmp, "pair-mtls"), ids["frontend"])
    return {"one hop": (one.outbound, [one]), "mTLS pair": (a.outbound, [a, b1, b2])}


def run(tmp, requests, warmup, mode):
    """mode: 'perf-hw' | 'callgrind' | 'syscalls'. Returns {path: {figure: per request}}."""
    procs = []
    outdir = os.path.join(tmp, "callgrind-out")
    tmp = os.path.join(tmp, mode)  # a fresh CA and config folder per run
    os.makedirs(outdir, exist_ok=True)
    os.makedirs(tmp, exist_ok=True)
    try:
        v1, v2 = free_port(), free_port()
        for version, port in (("v1", v1), ("v2", v2)):
            procs.append(subprocess.Popen(
                [os.path.join(BIN, "serin"), "upstream", "--version", version, "--listen", f"127.0.0.1:{port}",
                 "--body-size", "1024"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_http(f"http://127.0.0.1:{v1}/")
        wait_http(f"http://127.0.0.1:{v2}/")
        paths = start_paths(tmp, procs, v1, v2, mode == "callgrind", outdir)
        res = {}
        for name, (port, sidecars) in paths.items():
            load(port, warmup)  # connections pooled, buffers grown, lazy state built
            pids = [s.pid for s in sidecars]
            if mode == "callgrind":
                ir, rep = callgrind_ir(pids, [s.out for s in sidecars], port, requests)
                res[name] = {"user instructions": ir / rep["requests"]}
            elif mode == "perf-hw":
                t, rep = perf_counts(pids, ["instructions:u", "instructions:k"], port, requests)
                res[name] = {"user instructions": t["instructions:u"] / rep["requests"],
                             "kernel instructions": t["instructions:k"] / rep["requests"]}
            else:
                t, rep = perf_counts(pids, ["raw_syscalls:sys_enter", "context-switches"], port, requests)
                res[name] = {"syscalls": t["raw_syscalls:sys_enter"] / rep["requests"],
                             "context switches": t["context-switches"] / rep["requests"]}
            share = rep.get("versions", {}).get("v2", {}).get("share")
            res[name]["requests"] = rep["requests"]
            res[name]["v2 share"] = share
        return res
    finally:
        stop_all(procs)


def memory(tmp, rounds=5, duration=5):
    """Start-to-ready time, idle RSS and peak RSS (VmHWM) of the one-hop sidecar.

    Start to ready: from spawning `serin sidecar` to its first 200 on
    /healthz/ready (polled every 2 ms); the median of `rounds` starts. Idle RSS:
    1 s after ready. Peak: VmHWM after warm-up plus `duration` s at max rate."""
    import urllib.request
    procs = []
    try:
        v1, v2 = free_port(), free_port()
        for version, port in (("v1", v1), ("v2", v2)):
            procs.append(subprocess.Popen(
                [os.path.join(BIN, "serin"), "upstream", "--version", version, "--listen", f"127.0.0.1:{port}",
                 "--body-size", "1024"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_http(f"http://127.0.0.1:{v1}/")
        cfg = os.path.join(tmp, "memory")
        write(cfg, "payment.yaml", config(v1, v2))
        starts, idles = [], []
        for i in range(rounds):
            s = Sidecar(procs, cfg, wait=False)
            url = f"http://127.0.0.1:{s.health}/healthz/ready"
            while True:
                try:
                    with urllib.request.urlopen(url, timeout=1) as r:
                        if r.status == 200:
                            break
                except OSError:
                    if time.monotonic() - s.started > 10:
                        raise SystemExit("sidecar not ready after 10 s")
                    time.sleep(0.002)
            starts.append(1000 * (time.monotonic() - s.started))
            time.sleep(1)
            idles.append(status_kb(s.pid, "VmRSS"))
            if i < rounds - 1:
                stop_all([s.proc])
        load(s.outbound, 2000)
        cmd = [os.path.join(BIN, "serin-load"), "--url", f"http://127.0.0.1:{s.outbound}/", "--host", "payment",
               "--connections", str(CONNECTIONS), "--duration", f"{duration}s", "--json"]
        rep = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=duration + 60).stdout)
        peak = status_kb(s.pid, "VmHWM")
        threads = len(os.listdir(f"/proc/{s.pid}/task"))
        starts.sort()
        idles.sort()
        return {"start to ready ms (median, min-max)": (starts[len(starts) // 2], starts[0], starts[-1]),
                "idle RSS MiB (median)": idles[len(idles) // 2] / 1024, "peak RSS MiB": peak / 1024,
                "max-rate rps": rep["rps"], "threads": threads}
    finally:
        stop_all(procs)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=0,
                    help="measured requests per path [default: 200000 with perf, 20000 under callgrind]")
    ap.add_argument("--warmup", type=int, default=2000)
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--callgrind", action="store_true", help="use callgrind even if hardware counters work")
    ap.add_argument("--memory", action="store_true",
                    help="only the one-hop sidecar's start-to-ready time, idle and peak RSS (no instruction counts)")
    ap.add_argument("--keep", help="keep the callgrind output files in this folder (for callgrind_annotate)")
    ap.add_argument("--mesh-h1", action="store_true",
                    help="the pair keeps HTTP/1.1 on the mTLS hop (h2UpgradePolicy: DO_NOT_UPGRADE)")
    args = ap.parse_args()
    global MESH_H1
    MESH_H1 = args.mesh_h1
    if not args.no_build:
        subprocess.run(["cargo", "build", "--release", "-q", "-p", "serin", "-p", "serin-benches"], cwd=ROOT,
                       check=True)
    if args.memory:
        tmp = tempfile.mkdtemp(prefix="serin-mem-")
        try:
            m = memory(tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        st = m["start to ready ms (median, min-max)"]
        print(f"one-hop sidecar: start to ready {st[0]:.1f} ms (min {st[1]:.1f}, max {st[2]:.1f}, 5 starts); "
              f"idle RSS {m['idle RSS MiB (median)']:.1f} MiB; peak RSS (VmHWM, 5 s at max rate, "
              f"{m['max-rate rps']:.0f} rps) {m['peak RSS MiB']:.1f} MiB; {m['threads']} threads; "
              f"load {os.getloadavg()[0]:.2f}")
        return 0
    hw = hw_counters() and not args.callgrind
    if not hw and not shutil.which("valgrind"):
        raise SystemExit("no hardware counters and no valgrind: nothing to count with")
    requests = args.requests or (200000 if hw else 20000)
    tmp = tempfile.mkdtemp(prefix="serin-instr-")
    try:
        results = {}
        modes = ["perf-hw"] if hw else ["callgrind"]
        modes.append("syscalls")
        for mode in modes:
            for name, figs in run(tmp, requests, args.warmup, mode).items():
                results.setdefault(name, {}).update(figs)
        if args.keep:
            os.makedirs(args.keep, exist_ok=True)
            for f in glob.glob(os.path.join(tmp, "callgrind-out", "*")):
                shutil.copy(f, args.keep)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    counter = "perf stat instructions:u / instructions:k" if hw else "callgrind Ir (user space, all threads)"
    print(f"\n### Instructions per proxied request ({counter}; HTTP/1.1, {CONNECTIONS} connections, "
          f"1 KiB answers, {requests} requests per path after {args.warmup} warm-up)\n")
    print(f"Machine: {os.cpu_count()} cores, {cpu_model()}, {platform.platform()}; "
          f"date {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC; load {os.getloadavg()[0]:.2f}")
    print(f"Command: `python3 benches/instructions.py{' --requests %d' % args.requests if args.requests else ''}`\n")
    print("| path | user instructions / req | kernel instructions / req | syscalls / req | context switches / req "
          "| v2 share |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, r in results.items():
        kern = f"{r['kernel instructions']:,.0f}" if "kernel instructions" in r else "n/a (no PMU)"
        share = f"{100 * r['v2 share']:.2f}%" if r.get("v2 share") is not None else "-"
        print(f"| {name} | {r['user instructions']:,.0f} | {kern} | {r['syscalls']:.2f} | "
              f"{r['context switches']:.2f} | {share} |")
    print("\n(the mTLS pair counts all three proxies: A + B1 + B2)")


if __name__ == "__main__":
    sys.exit(main())
