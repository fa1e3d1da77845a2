"""`hypernat report`: regenerate the paper's evaluation (§IV) in one command.

::

    hypernat report [all] [--quick] [--out DIR]      every experiment, then the summary
    hypernat report fig4 | fig5 | table1 | fig6 | availability | summary

    experiment     module                        writes (under DIR, default benchmarks/results/)
    fig4 (+fig5)   hypernat.eval.throughput      fig4.{json,md,png}, fig5.{json,md,png}
    table1         hypernat.eval.latency         table1.{json,md,png}
    fig6           hypernat.eval.latency         fig6.{json,md,png}
    availability   benchmarks/availability.py    availability.{json,md,png}  (§III-C)
    summary        (reads the JSON above)        summary.md: ours beside the paper's numbers

``fig5`` is measured during Fig. 4's Trace 1 run with 2 NICs, so ``report fig5`` runs
Fig. 4 for Trace 1 only.  ``--quick`` shrinks every experiment to seconds (the test
suite runs it into a temporary directory); the full report takes about ten minutes on a
2-vCPU machine.  ``make report`` is ``hypernat report all``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from .eval import RESULTS, machine, md_table, progress

EXPERIMENTS = ("fig4", "fig5", "table1", "fig6", "availability", "summary")
ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
AVAILABILITY_MAX_S = 3600  # the Monte Carlo takes minutes in full


def run_availability(quick: bool, out: str) -> int:
    """§III-C: benchmarks/availability.py (Monte Carlo against the Markov bound)."""
    script = os.path.join(ROOT, "benchmarks", "availability.py")
    if not os.path.exists(script):
        print("hypernat report: benchmarks/availability.py not found (run from a source tree)", file=sys.stderr)
        return 1
    progress("availability: benchmarks/availability.py" + (" --quick" if quick else ""))
    cmd = [sys.executable, script, "--out", out] + (["--quick"] if quick else [])
    try:
        return subprocess.call(cmd, cwd=ROOT, timeout=AVAILABILITY_MAX_S)
    except subprocess.TimeoutExpired:
        print(f"hypernat report: availability.py did not finish within {AVAILABILITY_MAX_S} s; stopped",
              file=sys.stderr)
        return 124


def _load(out: str, name: str):
    try:
        with open(os.path.join(out, f"{name}.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def summary(out: str) -> str:
    """summary.md: the paper's headline numbers beside ours (whatever has been run)."""
    rows = []
    f4 = _load(out, "fig4")
    if f4:
        by = {(r["trace"], r["config"]): r for r in f4["rows"]}
        for c, label in (("hypernat-2nic", "HyperNAT (2 NICs)"), ("servernat", "serverNAT"),
                         ("hypernat-1nic", "HyperNAT (1 NIC)")):
            if (1, c) in by:
                rows.append([f"Fig. 4, Trace 1, {label}", f"{f4['paper_trace1_kpps'][c]} Kpps",
                             f"{by[(1, c)]['kpps']} Kpps"])
        for c, label in (("hypernat-2nic", "HyperNAT (2 NICs)"), ("servernat", "serverNAT")):
            if (4, c) in by:
                rows.append([f"Fig. 4, Trace 4, {label}", f"{f4['paper_trace4_kpps'][c]} Kpps",
                             f"{by[(4, c)]['kpps']} Kpps"])
        if (1, "hypernat-2nic") in by and (1, "hypernat-1nic") in by:
            rows.append(["Fig. 4, Trace 1, 2 NICs / 1 NIC", "2.27x",
                         f"{by[(1, 'hypernat-2nic')]['kpps'] / max(by[(1, 'hypernat-1nic')]['kpps'], 1e-9):.2f}x"])
    f5 = _load(out, "fig5")
    if f5:
        m = f5["mean_while_busy_pct"]
        nics = [v for k, v in m.items() if k.startswith("NIC") and v is not None]
        rows.append(["Fig. 5, NIC CPU (Trace 1)", "~70 % each", " / ".join(f"{v} %" for v in nics)])
        rows.append(["Fig. 5, coordinator / server CPU", "< 2 %", f"{m.get('coordinator')} %"])
    t1 = _load(out, "table1")
    if t1:
        s = t1["summary"]["passive"]
        first, later = s["first"].get("Return to sender"), s["later"].get("Return to sender")
        rows.append(["Table I, first pair back at sender (passive)", "2269 µs",
                     f"{first[0]:.0f} ± {first[1]:.0f} µs" if first and first[0] is not None else "-"])
        rows.append(["Table I, later pair back at sender", "621 µs",
                     f"{later[0]:.0f} ± {later[1]:.0f} µs" if later and later[0] is not None else "-"])
        rows.append(["Table I, first reply's extra wait (passive / active)", "~1741 µs (2168-427)",
                     f"{s.get('first_return_extra_us')} / {t1['summary']['active'].get('first_return_extra_us')} µs"])
    f6 = _load(out, "fig6")
    if f6 and f6["summary"]:
        rs = sorted(f6["summary"], key=float)
        lo, hi = f6["summary"][rs[0]], f6["summary"][rs[-1]]
        rows.append([f"Fig. 6, light load ({float(rs[0]) / 1e3:g} Kpps here, 800 paper): p98.6 RTT", "3.0 ms",
                     f"{lo['p986_ms']} ms"])
        rows.append([f"Fig. 6, heavy load ({float(rs[-1]) / 1e3:g} Kpps here, 1600 paper): share > 3 ms",
                     "3.4 % above 30.3 ms", f"{100 * hi['share_over_3ms']:.1f} %"])
    av = _load(out, "availability")
    if av:
        rows.append(["§III-C availability", "< 0.1 % at X = 1e5, F >= 1e9",
                     "see availability.md (Monte Carlo against the bound)"])
    m = machine()
    text = ("# Results summary\n\n"
            f"Measured on {m['cpu']}, {m['cores']} vCPUs (load {m['load_1m']} when this summary was written, "
            f"{m['when_utc']} UTC), Linux {m['kernel']}, Python {m['python']}: a shared, noisy VM -- rates move "
            "by +-30 % from run to run.  The paper: BlueField-1 ARM SmartNICs, an 8-core 3.6 GHz x86 server.\n\n")
    text += md_table(["what", "paper", "ours (emulated deployment)"], rows) if rows else "(nothing measured yet)\n"
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(text)
    return text


DOCS = os.path.join(ROOT, "docs", "results.md")


def refresh_docs(out: str, docs: str = DOCS) -> list[str]:
    """Replace each ``<!-- table:NAME -->`` … ``<!-- /table:NAME -->`` block of the
    results page with NAME.md from `out`, so the page's tables never drift from the data
    (the prose around them is written by hand).  Returns the names refreshed."""
    import re

    try:
        with open(docs) as f:
            text = f.read()
    except OSError:
        return []
    done = []
    for name in ("fig4", "fig5", "table1", "fig6"):
        try:
            with open(os.path.join(out, f"{name}.md")) as f:
                table = f.read().split("\n\n")[0].strip()  # the table, not its notes
        except OSError:
            continue
        pat = re.compile(rf"(<!-- table:{name} -->\n).*?(\n<!-- /table:{name} -->)", re.S)
        text, n = pat.subn(lambda m: m.group(1) + table + m.group(2), text)
        if n:
            done.append(name)
    with open(docs, "w") as f:
        f.write(text)
    return done


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="hypernat report", description=__doc__.split("\n\n")[0])
    ap.add_argument("what", nargs="*", default=["all"], help="all (default) or any of: " + ", ".join(EXPERIMENTS))
    ap.add_argument("--quick", action="store_true", help="seconds, not minutes (smaller traces, fewer repetitions)")
    ap.add_argument("--out", default=RESULTS, help=f"output directory (default {os.path.relpath(RESULTS)})")
    a = ap.parse_args(argv)
    what = list(EXPERIMENTS) if "all" in a.what else a.what
    bad = [w for w in what if w not in EXPERIMENTS]
    if bad:
        print(f"hypernat report: unknown experiment(s) {', '.join(bad)}; choose from all, {', '.join(EXPERIMENTS)}",
              file=sys.stderr)
        return 2
    t0 = time.monotonic()
    rc = 0
    try:
        if "fig4" in what or "fig5" in what:
            from .eval import throughput

            if "fig4" in what:
                throughput.run(a.quick, a.out)
            else:  # Fig. 5 alone: Trace 1 with 2 NICs only (fig4.* untouched)
                throughput.run(a.quick, a.out, configs=("hypernat-2nic",), only_traces=(1,))
        if "table1" in what or "fig6" in what:
            from .eval import latency

            if "table1" in what:
                latency.table1(a.quick, a.out)
            if "fig6" in what:
                latency.fig6(a.quick, a.out)
        if "availability" in what:
            rc |= run_availability(a.quick, a.out)
        if "summary" in what:
            print(summary(a.out))
            if os.path.abspath(a.out) == os.path.abspath(RESULTS):
                refreshed = refresh_docs(a.out)
                if refreshed:
                    progress(f"report: tables of {os.path.relpath(DOCS, ROOT)} refreshed: {', '.join(refreshed)}")
    except KeyboardInterrupt:
        print("hypernat report: interrupted", file=sys.stderr)
        return 130
    progress(f"report: done in {time.monotonic() - t0:.0f} s, results in {a.out}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
