"""What the end-to-end benchmarks of the testbed share: one one-NIC lab per mode, its
gateway on one core, torn down afterwards (``benchmarks/bench_e2e.py``,
``bench_bulk.py``, ``bench_latency.py``, ``bench_cps.py``)::

    with one_nic_lab("lat123", "hypernat", "packet_mmap", limits={...}) as lab:
        lab.topo ...            # hn-<tag>-{vpc,gw,inet}, NIC 0 only
        lab.forwarder_pids      # the no-op forwarder / HyperNAT's NIC daemon
        lab.cpu()               # per-CPU busy / softirq since the lab came up (or `mark()`)
        lab.kernel()            # ... and where the kernel's receive work ran (NET_RX runs
                                #     per CPU, the NAPI threads' CPU time and CPU)
        lab.forwarder_stats     # after the with block: the no-op forwarder's own counters

* modes: ``linux`` (nftables NAT, nothing started), ``noop`` (the no-op forwarder on
  the I/O backend), ``hypernat`` (coordinator + one NIC daemon from
  ``conf/testbed.yaml`` cut to NIC 0 on the backend, with the caller's overrides);
  ``rx_ring`` (v2 / v3) the PACKET_MMAP receive ring of either forwarder, ``mtu`` the
  links' MTU;
* offloads on every link except for AF_XDP, which is per-frame (as ``bench_e2e`` and
  ``bench_bulk``);
* one core (``onecore.one_core``): the gateway's kernel work and its forwarder process
  (every thread of it) on ``gw_cpu``, the endpoints' on ``ends_cpu``; the forwarder at
  SCHED_FIFO ``rt`` and the gateway links' NAPI threads at ``rt - 1`` (0: normal
  scheduling), so on a shared machine neither waits behind other work on that core,
  and the forwarder is never held off by its own receive work;
* teardown: the namespaces, the processes in them, their logs and state files (kept
  with ``HN_KEEP=1``).
"""
from __future__ import annotations

import contextlib
import glob
import os
import time

import yaml

from . import netns
from .onecore import cpu_split, cpu_times, one_core, softirq_split, softirqs, thread_times
from .topology import STATE_DIR, Addressing, Topology

CONF = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "conf", "testbed.yaml")


def tag(prefix: str, mode: str, backend: str) -> str:
    """A lab tag unique per process and mode (``HYPERNAT_BENCH_TAG`` is put in front:
    parallel runs on a shared machine can name theirs)."""
    return f"{os.environ.get('HYPERNAT_BENCH_TAG', '')}{prefix}{os.getpid()}{mode[0]}{backend[0]}"


def gateway_config(run_dir: str, backend: str, conf: str = CONF, rx_ring: str | None = None, **sections) -> str:
    """``conf`` cut to NIC 0 on `backend` (its PACKET_MMAP receive ring `rx_ring` if
    given), its state in `run_dir`; each keyword a
    top-level section whose keys are set over the template's (``limits={...}``,
    ``translation_log={...}``, ``external={...}``; a translation log without a path
    writes into `run_dir`).  Written into `run_dir`."""
    with open(conf) as f:
        doc = yaml.safe_load(f)
    doc["nics"] = [dict(doc["nics"][0], io=backend, **({"rx_ring": rx_ring} if rx_ring else {}))]
    doc["state_dir"] = os.path.join(run_dir, "state")
    for key, over in sections.items():
        doc[key] = {**(doc.get(key) or {}), **over}
    if "translation_log" in sections and "path" not in sections["translation_log"]:
        doc["translation_log"]["path"] = os.path.join(run_dir, "translations.jsonl")  # the run's own
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, "gw-bench.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(doc, f)
    from ..config import load

    load(path)  # a bad override is an error naming the key, here, not a daemon that exits
    return path


def pin(pids, cpu: int, rt: int) -> None:
    """Every thread of each process onto `cpu` at SCHED_FIFO `rt` (0: as is).  Affinity
    and policy are per thread: a process's helper threads (HyperNAT's journal writer,
    its metrics server) would otherwise run on another core, at normal priority."""
    for pid in pids:
        try:
            tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        except FileNotFoundError:
            tids = [pid]
        for tid in tids:
            try:
                os.sched_setaffinity(tid, {cpu})
                if rt:
                    os.sched_setscheduler(tid, os.SCHED_FIFO, os.sched_param(rt))
            except ProcessLookupError:  # a thread that just ended
                pass


class Lab:
    def __init__(self, topo: Topology, config: str | None):
        self.topo, self.config = topo, config
        self.forwarder_pids = []
        self.steered = {}
        self.forwarder_stats = {}  # the no-op forwarders' stats files, read at teardown
        self._t0 = self._s0 = self._n0 = None

    def cpu(self) -> dict:
        return cpu_split(self._t0, cpu_times())

    def kernel(self) -> dict:
        """Where the kernel's receive work ran since `mark()`: {"net_rx": {cpu: NET_RX
        softirq runs}, "napi": {"threads", "cpu_s": CPU seconds of the gateway links' NAPI
        threads, "cpus": the CPUs those that ran last ran on}, "forwarder": the same of
        every thread of the forwarder's processes, "seconds": since `mark()`}: with
        ``cpu()`` the gateway core's time split into forwarder, NAPI, softirq and the rest
        (a shared machine's other work, or idle).  (Threaded NAPI is accounted as
        those threads' system time, not as softirq time: ``cpu()`` shows it as busy.)"""
        def since(tids):
            now = thread_times(tids)
            ran = {tid: (t - self._n0.get(tid, (0, 0))[0], c) for tid, (t, c) in now.items()}
            return {"threads": len(now), "cpu_s": round(sum(t for t, _ in ran.values()), 3),
                    # of the threads that ran since: a thread that did not (a link that
                    # received nothing) still shows where it ran before it was pinned
                    "cpus": sorted({c for t, c in ran.values() if t > 0})}

        return {"net_rx": {c: v["NET_RX"] for c, v in softirq_split(self._s0, softirqs()).items()},
                "napi": since(self.steered.get("napi_threads", [])), "forwarder": since(self._forwarder_tids()),
                "seconds": round(time.monotonic() - self._m0, 3)}

    def _forwarder_tids(self) -> list:
        out = []
        for pid in self.forwarder_pids:
            try:
                out += [int(t) for t in os.listdir(f"/proc/{pid}/task")]
            except FileNotFoundError:
                pass
        return out

    def mark(self) -> None:
        """Start the per-CPU accounting of `cpu()` and `kernel()` here."""
        self._t0, self._s0, self._m0 = cpu_times(), softirqs(), time.monotonic()
        self._n0 = thread_times(self.steered.get("napi_threads", []) + self._forwarder_tids())


@contextlib.contextmanager
def one_nic_lab(tag: str, mode: str, backend: str, *, gw_cpu: int = 1, ends_cpu: int = 0, rt: int = 10,
                addr: Addressing | None = None, conf: str = CONF, mtu: int = 1500, rx_ring: str | None = None,
                **sections):
    """A one-NIC lab in `mode` with its gateway started and on one core (module
    docstring); removed on exit, whatever happened."""
    from . import cli

    topo = Topology(tag=tag, nics=1, mode=mode, addr=addr or Addressing.from_config(conf), mtu=mtu,
                    offloads=backend != "af_xdp")
    ring = rx_ring if backend == "packet_mmap" else None
    lab = None
    try:
        topo.up()
        config = None
        if mode == "hypernat":
            config = gateway_config(topo.run_dir(), backend, conf, rx_ring=ring, **sections)
        lab = Lab(topo, config)
        if mode != "linux":
            cli.start_gateway(topo, config, backend=backend, rx_ring=ring or "v2")
            # the forwarder: every no-op process; for HyperNAT the NIC daemon (the
            # coordinator, pids[0], only handles what is not per packet)
            lab.forwarder_pids = list(topo.pids if mode == "noop" else topo.pids[1:])
            pin(lab.forwarder_pids, gw_cpu, rt)
        # after the gateway started: an XDP program's NAPI exists by now
        lab.steered = one_core(topo, gw_cpu, ends_cpu)
        # the gateway's kernel threads (NAPI) just below the forwarder: at normal
        # priority on a shared core they would wait behind the neighbours' work while the
        # forwarder does not (AF_XDP's receive runs there, and Linux's NAT); at the
        # forwarder's own priority a receive thread fed faster than the forwarder drains
        # never yields to it (SCHED_FIFO peers do not preempt), and an overloaded
        # gateway spends its core receiving what it then drops (receive livelock)
        pin(lab.steered["napi_threads"], gw_cpu, max(1, rt - 1) if rt else 0)
        lab.mark()
        yield lab
    finally:
        topo.down()  # (the no-op forwarders write their stats files as they stop)
        if lab is not None and mode == "noop":
            lab.forwarder_stats = _noop_stats(topo.tag)
        if not os.environ.get("HN_KEEP"):
            for pattern in (f"{topo.tag}-*.json", f"{topo.tag}-*.log"):
                for f in glob.glob(os.path.join(STATE_DIR, pattern)):
                    os.unlink(f)


def _noop_stats(tag: str) -> dict:
    """{"noopK": counters} of the lab's no-op forwarders' stats files ({} if none)."""
    import json

    out = {}
    for f in sorted(glob.glob(os.path.join(STATE_DIR, f"{tag}-noop*.json"))):
        try:
            with open(f) as fh:
                out[os.path.basename(f)[len(tag) + 1:-5]] = json.load(fh)
        except (OSError, ValueError):
            pass
    return out


def io_counters(lab) -> dict:
    """The forwarder's I/O counters, flat: HyperNAT's NIC daemon's (``loop_batches``,
    ``port_<link>_<counter>``; ask while the lab is up) or the no-op forwarder's (its
    stats file, read at teardown: ask after the with block), {} in Linux mode."""
    if lab.topo.mode == "hypernat":
        from .cli import gateway_counters

        return {k: v for k, v in gateway_counters(lab.topo).items() if isinstance(v, (int, float))}
    out = {}
    for st in lab.forwarder_stats.values():
        out["loop_batches"] = out.get("loop_batches", 0) + st.get("forwarder", {}).get("batches", 0)
        for side in ("inside", "outside"):
            for k, v in (st.get(side) or {}).items():
                if isinstance(v, (int, float)):
                    key = f"port_{side}0_{k}"
                    out[key] = out.get(key, 0) + v
    return out


def io_summary(after: dict, before: dict | None = None) -> dict:
    """What the forwarder's I/O did between two ``io_counters``: frames received (both
    links), receive batches (each one a turn that found frames: frames per batch near 1
    means the forwarder woke per frame, near its batch size that it ran behind), frames
    per transmit kick (a ``sendto`` each), and the frames the kernel dropped because the
    receive ring was full."""
    before = before or {}

    def d(suffix):
        return sum(v - before.get(k, 0) for k, v in after.items() if k.startswith("port_") and k.endswith(suffix))

    rx, batches = d("_rx_frames"), after.get("loop_batches", 0) - before.get("loop_batches", 0)
    tx, kicks = d("_tx_frames"), d("_tx_kicks")
    return {"rx_frames": rx, "batches": batches, "frames_per_batch": round(rx / batches, 2) if batches else None,
            "tx_frames": tx, "tx_kicks": kicks, "frames_per_kick": round(tx / kicks, 2) if kicks else None,
            "rx_super_frames": d("_rx_super_frames"), "kernel_rx_drops": d("_kernel_rx_drops"),
            "tx_ring_full": d("_tx_ring_full")}


def nft_packets(ns: str, family: str, table: str) -> dict:
    """{chain: packets} of the counters in one nftables table (the first counter of
    each chain)."""
    import json

    p = netns.run(ns, ["nft", "-j", "list", "table", family, table])
    out = {}
    for item in json.loads(p.stdout).get("nftables", []):
        r = item.get("rule")
        if r:
            for e in r["expr"]:
                if "counter" in e:
                    out.setdefault(r["chain"], e["counter"]["packets"])
    return out


# -- where the forwarder's time goes: py-spy (optional; not a dependency) ---------------
def profile_start(pyspy: str, pid: int, out: str, cpu: int | None = None, rt: int = 0, rate: int = 250):
    """`pyspy` (py-spy's path) recording every thread of process `pid` into `out`
    (collapsed stacks) `rate` times a second, non-blocking (the process is never
    paused); None without one.
    On `cpu` at SCHED_FIFO `rt` if given: with the gateway and the load generator both
    at real-time priority a normal-priority sampler barely runs."""
    import subprocess

    if not pyspy:
        return None
    pre = (["taskset", "-c", str(cpu)] if cpu is not None else []) + (["chrt", "-f", str(rt)] if rt else [])
    return subprocess.Popen(pre + [pyspy, "record", "--pid", str(pid), "--rate", str(rate), "--nonblocking",
                                   "--format", "raw", "--output", out], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def profile_stop(p, out: str) -> dict | None:
    """Stop a `profile_start` recording (SIGINT: py-spy writes its file then), bounded;
    its ``profile_summary``, or {"error": ...}."""
    import signal
    import subprocess

    if p is None:
        return None
    try:
        os.killpg(p.pid, signal.SIGINT)
        p.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(5)
    except ProcessLookupError:
        pass
    try:
        with open(out) as f:
            return profile_summary(f.read())
    except OSError:
        return {"error": (p.stderr.read() if p.stderr else "")[-500:]}


# Leaf frames that are a thread waiting, not working (py-spy's idle detection misses
# some: a poll() that returns at once, a helper thread's select)
WAITS = ("Poller.poll", "_PollLikeSelector.select", "Condition.wait", "Event.wait", "select", "sleep")


def profile_summary(raw: str, top: int = 12) -> dict:
    """py-spy's raw (collapsed-stack) output as {"samples", "waiting": share of samples
    whose leaf is a wait (WAITS), "self": [(function, share)], "inclusive": [(function,
    share)]}, the shares over the working samples only: where the busy time went."""
    import collections

    self_n, incl_n, total, waiting = collections.Counter(), collections.Counter(), 0, 0
    for ln in raw.splitlines():
        stack, _, n = ln.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        n = int(n)
        total += n
        frames = []
        for f in stack.split(";")[1:]:  # [0]: the process / thread
            name, _, where = f.partition(" (")
            frames.append(name + (" " + where.split(":")[0].rsplit("/", 1)[-1] if where else ""))
        if not frames or frames[-1].split(" ")[0] in WAITS:
            waiting += n
            continue
        for f in set(frames):
            incl_n[f] += n
        self_n[frames[-1]] += n
    busy = total - waiting
    if not busy:
        return {"samples": total, "waiting": 1.0 if total else 0.0, "self": [], "inclusive": []}
    return {"samples": total, "waiting": round(waiting / total, 3),
            "self": [(f, round(k / busy, 3)) for f, k in self_n.most_common(top)],
            "inclusive": [(f, round(k / busy, 3)) for f, k in incl_n.most_common(top)]}
