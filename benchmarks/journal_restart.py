"""Crash restart cost of the block journal against the number of block cycles behind it.

A NIC cycles port blocks for as long as it runs: each block is reserved, assigned to a
host, released (the RuleBuilder's three records).  Before checkpoints the journal only
grew, and a crash restart read all of it (issue 10: 300k cycles, 62 MB, 12 s, +747 MB).
With checkpoints (hypernat/nic/journal.py) the files hold the live blocks plus at most
one bound of log, so a restart costs the same after 10^4 or 10^7 cycles.

For each cycle count the script writes the journal the way a NIC does (the same
records, through ``Journal``; a checkpoint whenever ``due()``), with ``--live`` blocks
held throughout, then restarts in a fresh child process (``Journal.load``, as
``NicWorker._restore`` does) and reports its wall time and peak RSS above the bare
interpreter's (and the peak of Python allocations during a second load, tracemalloc),
next to the bytes on disk.  ``--baseline`` adds the same cycles written
as one log (no checkpoint: what main wrote) for the smaller counts, read by the same
``load``.

    python benchmarks/journal_restart.py                      # 10^4, 10^5, 10^6 cycles (~30 s)
    python benchmarks/journal_restart.py --cycles 1e6 1e7     # minutes
    python benchmarks/journal_restart.py --baseline --cycles 1e4 1e5 3e5
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from hypernat.nic import journal as J  # noqa: E402

CHILD = r"""
import json, os, resource, sys, time, tracemalloc
sys.path.insert(0, {root!r})
from hypernat.nic import journal as J
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
live = J.Journal({path!r}).load()
dt = time.perf_counter() - t
rss = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
del live
tracemalloc.start()
live = J.Journal({path!r}).load()
peak = tracemalloc.get_traced_memory()[1] / 2**20
print(json.dumps({{"restart_s": dt, "live": len(live), "peak_rss_mb": rss, "peak_alloc_mb": peak}}))
"""


def write(path: str, cycles: int, live: int, bound: int, checkpoints: bool, batch: int = 512) -> dict:
    """`cycles` block cycles (reserve, assign, release) with `live` blocks held."""
    j = J.Journal(path, fsync=False, max_log_bytes=bound)
    held = {1_000_000 + g: f"10.0.{g >> 8 & 255}.{g & 255}" for g in range(live)}
    j.append_many([{"op": "assign", "block": g, "host": h, "external": "198.18.0.1", "ports": [1024, 1087]}
                   for g, h in held.items()])  # fmt: skip
    n_ck = 0
    done = 0
    t = time.perf_counter()
    while done < cycles:
        k = min(batch, cycles - done)
        recs = []
        for g in range(done, done + k):
            b = g % 500_000
            recs.append({"op": "reserve", "block": b, "external": "198.18.0.1", "ports": [1024, 1087]})
            recs.append({"op": "assign", "block": b, "host": "10.1.2.3", "external": "198.18.0.1",
                         "ports": [1024, 1087], "t": g})  # fmt: skip
            recs.append({"op": "release", "block": b})
        j.append_lazy(recs)
        done += k
        if checkpoints and j.due():
            j.checkpoint([{"op": "assign", "block": g, "host": h} for g, h in held.items()])
            n_ck += 1
    j.close()
    files = {f: os.path.getsize(os.path.join(os.path.dirname(path), f)) for f in os.listdir(os.path.dirname(path))}
    return {"write_s": time.perf_counter() - t, "checkpoints": n_ck, "bytes": sum(files.values()),
            "checkpoint_bytes": files.get(os.path.basename(path) + ".checkpoint", 0)}


def restart(path: str, timeout: float) -> dict:
    code = CHILD.format(root=os.path.dirname(HERE), path=path)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(r.stderr)
    return json.loads(r.stdout)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cycles", nargs="+", type=float, default=[1e4, 1e5, 1e6])
    ap.add_argument("--live", type=int, default=2000, help="blocks held throughout (default 2000)")
    ap.add_argument("--bound", type=int, default=J.DEFAULT_MAX_LOG_BYTES, help="log bound, bytes")
    ap.add_argument("--baseline", action="store_true", help="also one growing log (no checkpoint), <= 3e5 cycles")
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per restart at most")
    ap.add_argument("--json", action="store_true", help="one JSON object per row instead of the table")
    args = ap.parse_args(argv)
    rows = []
    root = args.dir or tempfile.mkdtemp(prefix="hn-journal-bench-")
    try:
        for c in args.cycles:
            modes = [True] + ([False] if args.baseline and c <= 3e5 else [])
            for ck in modes:
                d = os.path.join(root, f"{int(c)}-{'ck' if ck else 'log'}")
                shutil.rmtree(d, ignore_errors=True)
                os.makedirs(d)
                p = os.path.join(d, "blocks.journal")
                w = write(p, int(c), args.live, args.bound, ck)
                r = restart(p, args.timeout)
                assert r["live"] == args.live, r
                rows.append({"cycles": int(c), "mode": "checkpoint" if ck else "log only", "live": args.live,
                             **w, **r})
                shutil.rmtree(d, ignore_errors=True)
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return 0
    print(f"{'cycles':>10} {'mode':>10} {'live':>6} {'on disk':>10} {'checkpoint':>10} {'restart':>9} "
          f"{'peak RSS+':>9} {'peak alloc':>10}")
    for r in rows:
        print(f"{r['cycles']:>10} {r['mode']:>10} {r['live']:>6} {r['bytes'] / 1e6:>8.2f}MB "
              f"{r['checkpoint_bytes'] / 1e3:>8.1f}kB {r['restart_s'] * 1e3:>7.1f}ms {r['peak_rss_mb']:>7.1f}MB "
              f"{r['peak_alloc_mb']:>8.2f}MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
