"""The paper's experiments (§IV) on the emulated deployment, and what they share.

Each experiment module exposes ``run(quick: bool, out: str) -> dict`` which measures,
writes ``<name>.json`` (every number, the machine, the parameters), ``<name>.md`` (the
table the results page embeds) and ``<name>.png`` (matplotlib, Agg) under ``out``
(default ``benchmarks/results/``), and returns the JSON dict.  ``hypernat report``
(``hypernat.report``) runs them.

    throughput   Fig. 4 (HyperNAT 2 NICs / 1 NIC / serverNAT over Traces 1-4) and
                 Fig. 5 (CPU of each NIC worker and of the coordinator, Trace 1)
    latency      Table I (event timestamps, first packet and a later one, passive /
                 active install) and Fig. 6 (CDF of RTT at two offered rates)
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.normpath(os.path.join(HERE, "..", "..", "benchmarks", "results"))


def machine() -> dict:
    """Where a result was measured: CPU model, cores, load, kernel, Python."""
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "load_1m": round(os.getloadavg()[0], 2),
            "kernel": platform.release(), "python": platform.python_version(),
            "when_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (/proc/<pid>/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def progress(msg: str) -> None:
    """One line of progress on stderr (long runs say where they are)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def md_table(header, rows) -> str:
    out = ["| " + " | ".join(str(h) for h in header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out) + "\n"


def save(out: str, name: str, data: dict, md: str, fig=None) -> list[str]:
    """Write name.json, name.md and (if a figure is given) name.png under `out`."""
    os.makedirs(out, exist_ok=True)
    paths = [os.path.join(out, f"{name}.json"), os.path.join(out, f"{name}.md")]
    with open(paths[0], "w") as f:
        json.dump(data, f, indent=1, default=float)
        f.write("\n")
    with open(paths[1], "w") as f:
        f.write(md)
    if fig is not None:
        paths.append(os.path.join(out, f"{name}.png"))
        fig.savefig(paths[2], dpi=110, bbox_inches="tight")
        import matplotlib.pyplot as plt

        plt.close(fig)
    return paths


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
