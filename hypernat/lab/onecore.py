"""One core for the gateway, kernel work included: how the end-to-end benchmarks keep
every mode (Linux's NAT, the no-op forwarder, HyperNAT; PACKET_MMAP and AF_XDP) on the
same budget, and how they check it.

On veth the receive work of a frame runs where the kernel schedules it, not where the
gateway process runs::

    sender's CPU: veth_xmit ─► netif_rx ─► backlog of CPU r (RPS: rps_cpus of the
                                            receiving veth's queue)   ─► IP / AF_PACKET
                  veth NAPI (GRO on, or XDP attached): polled in the sender's softirq,
                  unless threaded (``/sys/class/net/IF/threaded``): a kthread
                  ``napi/IF-ID`` that can be pinned like any thread

So for a fair "one core" gateway (CPU ``gw``) and endpoints on CPU ``ends``:

* RPS of the gateway's own links (inside/outside, in ``gw``) → ``gw``: what arrives at
  the gateway (Linux NAT's forwarding, the AF_PACKET copy into the ring) runs there;
* RPS of the far ends (in ``vpc`` / ``inet``) → ``ends``: the endpoints' own receive
  stack does not run in the gateway's softirq;
* threaded NAPI on the gateway's links, those threads pinned to ``gw`` (where a link
  has NAPI: XDP attached, as AF_XDP does);
* and the check: softirq time per CPU from ``/proc/stat`` over the measurement
  (``cpu_split``), so a reader sees where the kernel's share went.
"""
from __future__ import annotations

import os

from . import netns

# /proc/stat cpuN columns: user nice system idle iowait irq softirq steal
_SOFTIRQ, _IDLE, _IOWAIT = 6, 3, 4


def cpu_times() -> dict:
    """{cpu: (busy, softirq, total)} jiffies from /proc/stat."""
    out = {}
    with open("/proc/stat") as f:
        for ln in f:
            name, *vals = ln.split()
            if name.startswith("cpu") and name != "cpu":
                v = [int(x) for x in vals[:8]]
                out[int(name[3:])] = (sum(v) - v[_IDLE] - v[_IOWAIT], v[_SOFTIRQ], sum(v))
    return out


def cpu_split(before: dict, after: dict) -> dict:
    """{cpu: {"busy": fraction, "softirq": fraction}} between two ``cpu_times``
    (everyone's work: a shared machine)."""
    out = {}
    for c, (b1, s1, t1) in after.items():
        if c in before:
            b0, s0, t0 = before[c]
            dt = max(1, t1 - t0)
            out[c] = {"busy": round((b1 - b0) / dt, 3), "softirq": round((s1 - s0) / dt, 3)}
    return out


def softirqs() -> dict:
    """{cpu: {"NET_RX": n, "NET_TX": n}} from /proc/softirqs: how many times each
    CPU ran the network softirqs (counts, not time: ``cpu_split`` has the time)."""
    out = {}
    with open("/proc/softirqs") as f:
        cpus = [int(c[3:]) for c in f.readline().split()]
        for ln in f:
            name, *vals = ln.split()
            if name.rstrip(":") in ("NET_RX", "NET_TX"):
                for c, v in zip(cpus, vals):
                    out.setdefault(c, {})[name.rstrip(":")] = int(v)
    return out


def softirq_split(before: dict, after: dict) -> dict:
    """{cpu: {"NET_RX": runs, "NET_TX": runs}} between two ``softirqs``."""
    return {c: {k: v - before.get(c, {}).get(k, 0) for k, v in after[c].items()} for c in after}


def thread_times(tids) -> dict:
    """{tid: (cpu seconds so far, the CPU it last ran on)} of each thread that still
    exists (/proc/TID/schedstat: time on a CPU, in ns; /proc/TID/stat: processor).  With
    threaded NAPI a link's receive work runs in its ``napi/IF-ID`` thread, accounted as
    that thread's system time, not as softirq time: this is where it shows, and on
    which CPU."""
    out = {}
    for t in tids:
        try:
            with open(f"/proc/{t}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{t}/schedstat") as f:
                ns = int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue
        out[t] = (ns / 1e9, int(fields[36]))  # after "pid (comm)": processor is field 39
    return out


def _set_rps(ns: str, ifname: str, cpu: int | None) -> None:
    mask = "0" if cpu is None else f"{1 << cpu:x}"
    netns.run(ns, ["sh", "-c", f"for q in /sys/class/net/{ifname}/queues/rx-*; do echo {mask} > $q/rps_cpus; done"],
              check=False)


def _napi_threads(prefix: str) -> set:
    """Kernel threads whose name starts with ``prefix`` (``napi/IF-``)."""
    out = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/comm") as f:
                if f.read().strip().startswith(prefix):
                    out.add(int(pid))
        except OSError:
            continue
    return out


def one_core(topo, gw_cpu: int, ends_cpu: int) -> dict:
    """Steer the kernel's share of the gateway's work to ``gw_cpu`` and the endpoints'
    to ``ends_cpu`` (module docstring).  Call after the gateway started (XDP attached).
    Returns what was set: RPS per link, NAPI threads pinned."""
    done = {"rps": {}, "napi_threads": []}
    gw_links = [n for k in range(topo.nics) for n in (topo.inside(k), topo.outside(k))]
    for name in gw_links:
        _set_rps(topo.gw, name, gw_cpu)
        done["rps"][f"gw/{name}"] = gw_cpu
    for ns in (topo.vpc, topo.inet):
        for k in range(topo.nics):
            _set_rps(ns, topo.far(k), ends_cpu)
            done["rps"][f"{ns.rsplit('-', 1)[-1]}/{topo.far(k)}"] = ends_cpu
    for name in gw_links:
        before = _napi_threads(f"napi/{name}-")
        netns.run(topo.gw, ["sh", "-c", f"echo 1 > /sys/class/net/{name}/threaded"], check=False)
        # Threads that appeared now are this link's (a name alone could be another lab's).
        for pid in sorted(_napi_threads(f"napi/{name}-") - before):
            try:
                os.sched_setaffinity(pid, {gw_cpu})
                done["napi_threads"].append(pid)
            except OSError:
                pass
    return done
