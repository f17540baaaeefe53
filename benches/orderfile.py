#!/usr/bin/env python3
"""Writes proxy/serin.order: the functions a running sidecar executes, for the linker.

The release build of `serin` lays these functions out first and side by side in
`.text` (lld's `--symbol-ordering-file`, passed by proxy/build.rs). A sidecar then
keeps the code it runs (start-up, config load, certificates, the one-hop request
path, both ends of the mutual-TLS pair, metrics and admin pages) in a few MiB of
contiguous pages, instead of touching pages spread over the whole multi-role binary,
each mapped with its neighbours by the kernel's fault-around: that was most of a
sidecar's resident memory (benches/RESULTS.md, "memory").

How: the sidecars of benches/instructions.py (one hop, on the multi-thread runtime and
on one thread, and the pair A -> mTLS -> B1/B2) and a sidecar fed by `serin
control-plane` over xDS run under callgrind from
their first instruction, with mangled names. Each path gets a short load, the admin
and metrics pages are read, the processes are stopped; every function of the serin
binary with at least one instruction is kept. The order goes by how widely the code
is used: first what every sidecar runs (the plaintext one-hop sidecar: start-up,
file config, routing, metrics, admin), then what an mTLS client adds (pair A), then
an mTLS server (B), then the xDS client; hottest first within each tier. A sidecar
that uses only the first tiers keeps only their pages.

A stale order file still links (symbols that no longer exist are ignored, new
functions are placed after the listed ones) but costs memory: a change to generic
types renames many instantiations, and their code falls out of the ordered pages
(round 7: 1,583 of 2,775 symbols left, idle RSS 7.2 -> 11.6 MiB), and the names
that matter most can go while nearly all others match (round 8: 97 % matched, but
not the request handler, the hottest function). `--check` says how much of the file
a release binary still matches and fails below 90 % or when any of the 100 hottest
names is missing; `benches/compare` reports the same. Regenerate it after changes to
the data path (a minute or two), then rebuild:

    python3 benches/orderfile.py [--no-build] [--requests 3000] [--out FILE]
                                 [--serin PATH --serin-load PATH]
    python3 benches/orderfile.py --check [--out FILE] [--serin PATH]

Loopback only; every process it starts is stopped at the end.
"""

import argparse
import collections
import glob
import os
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import (BIN, ORDER_FILE, ORDER_FILE_HOT, ORDER_FILE_MIN_SHARE, ROOT, Sidecar, config,  # noqa: E402
                      free_port, order_file_coverage, order_file_note, order_file_stale, serin_ca, stop_all,
                      wait_http, write)

OUT = ORDER_FILE
# Processes by how widely their code is used (see above); file names of callgrind's output.
TIERS = (("one-hop", "one-hop-1t"), ("pair-a",), ("pair-b1", "pair-b2"), ("xds",))
SERIN = os.path.join(BIN, "serin")  # --serin
SERIN_LOAD = os.path.join(BIN, "serin-load")  # --serin-load
START_TIMEOUT = 120  # --timeout
CALLGRIND = ("valgrind", "--tool=callgrind", "--demangle=no", "--dump-instr=no", "--collect-jumps=no")


def callgrind_prefix(outdir, name):
    return CALLGRIND + (f"--callgrind-out-file={outdir}/{name}.%p",)


def load(port, requests):
    """`requests` requests through `port` (64 connections, closed loop); fails on any error."""
    cmd = [SERIN_LOAD, "--url", f"http://127.0.0.1:{port}/", "--host", "payment", "--connections", "64",
           "--requests", str(requests), "--timeout", "120s"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=900)


def fetch(url):
    """GET `url`, ignoring the answer (the point is the code it runs)."""
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            r.read()
    except OSError as e:
        print(f"orderfile: {url}: {e}", file=sys.stderr)


def touch_admin(s):
    """The pages an operator and Prometheus read."""
    admin = s.cmd_ports["admin"]
    for path in ("/config_dump", "/clusters", "/clusters?format=json", "/ready"):
        fetch(f"http://127.0.0.1:{admin}{path}")
    fetch(f"http://127.0.0.1:{s.cmd_ports['metrics']}/stats/prometheus")
    fetch(f"http://127.0.0.1:{s.health}/healthz/ready")


class TracedSidecar(Sidecar):
    """A `serin sidecar` under callgrind; remembers its admin and metrics ports."""

    def __init__(self, procs, outdir, name, config_dir, cert_dir=None, app=None, env=None, extra=()):
        super().__init__(procs, config_dir, cert_dir, app=app, serin=SERIN, prefix=callgrind_prefix(outdir, name),
                         env=env, wait=False, extra=extra)
        cmd = self.proc.args
        self.cmd_ports = {
            "admin": int(cmd[cmd.index("--admin") + 1].rsplit(":", 1)[1]),
            "metrics": int(cmd[cmd.index("--metrics") + 1].rsplit(":", 1)[1]),
        }
        wait_http(f"http://127.0.0.1:{self.health}/healthz/ready", timeout=START_TIMEOUT)


def xds_sidecar(procs, outdir, tmp, v1, v2):
    """`serin control-plane` serving the one-hop config, and a sidecar subscribed to it."""
    cfg = os.path.join(tmp, "cp-config")
    write(cfg, "payment.yaml", config(v1, v2))
    grpc = free_port()
    cp = subprocess.Popen([SERIN, "control-plane", "--config-dir", cfg, "--listen",
                           f"127.0.0.1:{grpc}", "--state-dir", os.path.join(tmp, "cp-state"),
                           "--monitoring", f"127.0.0.1:{free_port()}", "--ui", f"127.0.0.1:{free_port()}"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs.append(cp)
    return TracedSidecar(procs, outdir, "xds", None,
                         extra=("--control-plane", f"127.0.0.1:{grpc}", "--node-id", "orderfile")).outbound


def without_recursion_level(name):
    """`name` without callgrind's recursion suffix (`f'2` is `f` called from
    itself): the linker knows only `f`."""
    base, quote, level = name.rpartition("'")
    return base if quote and level.isdigit() else name


def self_costs(path, binary):
    """{mangled function name: self Ir} of `binary`'s functions in one callgrind file."""
    names = {}  # compressed id -> name, for fn/cfn
    objs = {}  # compressed id -> object path
    costs = collections.Counter()
    current, current_ob, skip_next = None, None, False

    def name_of(value, table):
        value = value.strip()
        if value.startswith("("):
            ident, _, rest = value.partition(")")
            ident = ident[1:]
            rest = rest.strip()
            if rest:
                table[ident] = without_recursion_level(rest)
            return table.get(ident, "")
        return without_recursion_level(value)

    with open(path, errors="replace") as f:
        for line in f:
            if line.startswith("ob="):
                current_ob = name_of(line[3:], objs)
            elif line.startswith("fn="):
                current = name_of(line[3:], names) if current_ob == binary else None
                if current_ob != binary:
                    name_of(line[3:], names)
            elif line.startswith("cfn="):
                name_of(line[4:], names)
            elif line.startswith("cob="):
                name_of(line[4:], objs)
            elif line.startswith("calls="):
                skip_next = True
            elif line[:1].isdigit() or line[:1] in "+-*":
                if skip_next:
                    skip_next = False
                    continue
                parts = line.split()
                if current and len(parts) >= 2 and parts[1].isdigit():
                    costs[current] += int(parts[1])
    return costs


def check(binary, order_file):
    """Exit status 0 when `binary` still defines most of `order_file`'s symbols and all of its hottest."""
    try:
        coverage = order_file_coverage(binary, order_file)
    except (OSError, RuntimeError, subprocess.TimeoutExpired) as e:
        print(f"orderfile: cannot check {order_file} against {binary}: {e}", file=sys.stderr)
        return 2
    print(f"orderfile: {order_file} against {binary}: {order_file_note(coverage)}")
    return 1 if order_file_stale(coverage) else 0


def main():
    global SERIN, SERIN_LOAD, START_TIMEOUT
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--no-build", action="store_true", help="do not run cargo build --release first")
    ap.add_argument("--requests", type=int, default=3000, help="requests per path (default 3000)")
    ap.add_argument("--out", default=OUT, help=f"order file to write (default {OUT})")
    ap.add_argument("--serin", default=SERIN, help="serin binary (default target/release/serin)")
    ap.add_argument("--serin-load", default=SERIN_LOAD, help="serin-load binary (default target/release/serin-load)")
    ap.add_argument("--timeout", type=float, default=120, help="bound on each sidecar's start under valgrind, s")
    ap.add_argument("--check", action="store_true",
                    help="only report how many of --out's symbols --serin defines; "
                    f"exit 1 below {ORDER_FILE_MIN_SHARE * 100:.0f} %% or when one of the "
                    f"{ORDER_FILE_HOT} hottest is missing")
    args = ap.parse_args()
    if args.check:
        return check(args.serin, args.out)
    if not args.no_build:
        subprocess.run(["cargo", "build", "--release", "-p", "serin", "-p", "serin-benches"], cwd=ROOT, check=True)
    SERIN, SERIN_LOAD, START_TIMEOUT = args.serin, args.serin_load, args.timeout
    binary = os.path.realpath(SERIN)
    procs = []
    with tempfile.TemporaryDirectory(prefix="serin-order-") as tmp:
        outdir = os.path.join(tmp, "callgrind")
        os.makedirs(outdir)
        try:
            v1, v2 = free_port(), free_port()
            for version, port in (("v1", v1), ("v2", v2)):
                procs.append(subprocess.Popen(
                    [SERIN, "upstream", "--version", version, "--listen", f"127.0.0.1:{port}",
                     "--body-size", "1024"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            wait_http(f"http://127.0.0.1:{v1}/")
            wait_http(f"http://127.0.0.1:{v2}/")
            write(os.path.join(tmp, "one-hop"), "payment.yaml", config(v1, v2))
            one = TracedSidecar(procs, outdir, "one-hop", os.path.join(tmp, "one-hop"))
            # The same on one thread (tokio's current-thread runtime: a sidecar with one core).
            one_1t = TracedSidecar(procs, outdir, "one-hop-1t", os.path.join(tmp, "one-hop"),
                                   env=dict(os.environ, SERIN_CONCURRENCY="1"))
            ids = serin_ca(tmp, serin=SERIN)
            b1 = TracedSidecar(procs, outdir, "pair-b1", None, ids["payment"], app=v1)
            b2 = TracedSidecar(procs, outdir, "pair-b2", None, ids["payment"], app=v2)
            write(os.path.join(tmp, "pair"), "payment.yaml", config(b1.inbound, b2.inbound, mesh=True))
            a = TracedSidecar(procs, outdir, "pair-a", os.path.join(tmp, "pair"), ids["frontend"])
            xds = xds_sidecar(procs, outdir, tmp, v1, v2)
            for port in (one.outbound, one_1t.outbound, a.outbound, xds):
                load(port, args.requests)
            for s in (one, one_1t, a, b1, b2):
                touch_admin(s)
            time.sleep(1)
        finally:
            stop_all(procs, timeout=60)
        files = glob.glob(os.path.join(outdir, "*"))
        per_process = {}  # file name prefix ("one-hop", "pair-a", ...) -> Counter
        for path in files:
            per_process.setdefault(os.path.basename(path).split(".")[0], collections.Counter()).update(
                self_costs(path, binary))
    total = collections.Counter()
    for costs in per_process.values():
        total.update(costs)
    names, listed = [], set()
    for tier in TIERS:
        used = set()
        for prefix in tier:
            used.update(per_process.get(prefix, {}))
        # Rust (mangled) and C symbols alike (mimalloc, ring's C); callgrind names
        # code without a symbol by its address, and has pseudo-functions such as
        # "(below main)".
        new = [n for n in used - listed if n and " " not in n and not n.startswith(("0x", "("))]
        new.sort(key=lambda n: (-total[n], n))
        names.extend(new)
        listed.update(new)
    if len(names) < 1000:
        raise SystemExit(f"orderfile: only {len(names)} functions found in {len(files)} callgrind files: "
                         "was the binary built with symbols?")
    with open(args.out, "w") as f:
        f.write("\n".join(names) + "\n")
    print(f"orderfile: {len(names)} functions from {len(files)} processes -> {args.out}")


if __name__ == "__main__":
    sys.exit(main())
