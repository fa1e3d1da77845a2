"""Fig. 4 (throughput over Traces 1-4) and Fig. 5 (CPU use, Trace 1), emulated.

The paper's sender replays a trace at 2 Mpps, hashing packets over two NICs with SHA-1;
its receiver reverses every packet and sends it back through the NICs, hashed again.  Here
the same happens in two phases, with every frame *pre-built and pre-hashed* so that the
cores measured do only the gateway's work (2 vCPUs: an emulated switch in the loop would
take the cores the NICs need):

    trace (hypernat.trace, 64-byte replay frames, time order)
      │ sha1(5-tuple) % N, once, before the run
      ▼
    OUT phase   NIC k replays its share once: hit → translated, miss → RuleBuilder
                (every flow's first packet builds its rule: the per-flow cost the paper
                sees growing with the number of flows); the translated frames are kept
      │ reverse every frame (swap addresses and ports: checksums unchanged), the paper's
      │ receiver; sha1(reply 5-tuple) % N picks the return NIC, once
      ▼
    IN phase    NIC j replays its replies once: hit → translated; a reply of a flow owned
                by another NIC misses → passive install (FETCH through the coordinator,
                clone, replay) -- the cross-NIC cost, once per split connection

    throughput = frames translated (both phases, all NICs) / (OUT time + IN time),
    each phase timed from the common start to the last NIC's last frame.

Configurations (address-and-port-dependent mapping, like the paper's per-connection rules):

    hypernat-2nic   2 NIC worker processes + the coordinator process
    hypernat-1nic   1 NIC worker + the coordinator (every reply returns to the owner)
    servernat       the whole NAT in one process: one worker, standalone (no partitions,
                    no coordinator, no agent traffic)

On this x86 machine serverNAT and a NIC worker are the same code on the same kind of core:
their difference is only the coordinator's presence (nothing crosses with 1 NIC).  The
paper's serverNAT beat 1 NIC because a server core outran a BlueField ARM core; that gap
cannot appear here.  2 NICs against 1 shows the scale-up and the cost of cloning, and is
bounded by the 2 cores this machine has for workers, coordinator and everything else.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import signal
import threading
import time

import numpy as np

from . import cpu_seconds, machine, md_table, progress, pyplot, save
from .. import trace as T
from ..io.base import Batch, Port
from ..lab.deadline import recv_within

# A worker's phase ends at the latest this long after "go" (it reports what it did by
# then); the parent waits that long plus loading time for each report.
PHASE_MAX_S = 120
PHASE_S = PHASE_MAX_S + 60

FRAME = 64
CONFIGS = ("hypernat-2nic", "hypernat-1nic", "servernat")
LABELS = {"hypernat-2nic": "HyperNAT (2 NICs)", "hypernat-1nic": "HyperNAT (1 NIC)", "servernat": "serverNAT"}
PAPER_FIG4_TRACE1 = {"hypernat-2nic": 1643.3, "servernat": 1280.4, "hypernat-1nic": 723.7}  # Kpps
PAPER_FIG4_TRACE4 = {"hypernat-2nic": 1377.9, "servernat": 859.5}
DROP_WORDS = ("drop", "full", "timeout", "nack", "exhaust", "invalid", "bad", "malformed")  # counters reported as drops
FETCH_RATE = 1_000_000  # limits.fetch_rate_per_source for the throughput runs
PAPER_FIG5 = {"nic": 70.0, "server": 2.0}  # percent


def _gather(batch, idx) -> tuple:
    """The first FRAME bytes of frames `idx` of `batch` (rows of FRAME bytes) and their lengths."""
    offs = batch.offsets[idx].astype(np.int64)
    lens = np.minimum(batch.lengths[idx], FRAME).astype(np.uint32)
    pos = np.minimum(offs[:, None] + np.arange(FRAME)[None, :], len(batch.buf) - 1)
    return batch.buf[pos], lens


class _OnceBatch(Batch):
    """A batch a PhasePort replays exactly once: nothing rewrites its bytes after the
    worker has sent them (the fast path translates a received batch in place, then sends
    it; a replay of its misses translates copies or only the frames not sent), so a
    capturing port may keep a reference and read the bytes after the timed pass.  A
    selection of it (``Batch.select``: the replay of its misses, translated in place and
    sent) is one too, so the first packets' sends are not copied inside the timed pass."""

    __slots__ = ()


class PhasePort(Port):
    """A port that replays a loaded (frames, lengths) array once, in batches (no copy of
    pristine bytes: every frame is used once), and counts -- optionally keeps -- what is
    sent to it (the first 64 bytes of each frame).

    Keeping costs the timed pass almost nothing: a frame of a batch replayed once
    (``_OnceBatch``) is kept as a reference (the batch and the indices sent) and its
    bytes are read by ``take()``, after the clock has stopped; a frame of any other batch
    (a replay's copies, the translator's output area, which the next translate reuses) is
    read when it is sent."""

    def __init__(self, name: str, batch: int = 256):
        from ..io.memory import Notifier

        self.name = name
        self.batch = batch
        self._note = Notifier()
        self._note.signal()
        self._batches, self._i, self._left = [], 0, 0
        self.capture = False
        self.tx = 0
        self._kept: list = []

    def load(self, frames: np.ndarray, lengths: np.ndarray, rounds: int = 1) -> None:
        """Replay `frames` `rounds` times (a round after the first restores each batch's
        pristine bytes with one copy, as the fast path rewrites frames in place)."""
        self._batches = []
        kind = _OnceBatch if rounds == 1 else Batch  # a round after the first rewrites the bytes
        for i in range(0, len(frames), self.batch):
            a = np.ascontiguousarray(frames[i : i + self.batch])
            n = len(a)
            b = kind(a.reshape(-1).copy(), (np.arange(n, dtype=np.uint32) * FRAME),
                      lengths[i : i + n].astype(np.uint32), n)
            self._batches.append((b, b.buf.copy() if rounds > 1 else None))
        self._i = 0
        self._left = rounds * len(self._batches)

    @property
    def exhausted(self) -> bool:
        return self._left <= 0

    def fileno(self) -> int:
        return self._note.fd

    def recv(self, max_frames: int = 256):
        if self._left <= 0:
            return None
        self._left -= 1
        b, pristine = self._batches[self._i]
        if pristine is None:
            self._batches[self._i] = None  # used once: let it go
        elif self._i >= 0:
            np.copyto(b.buf, pristine)
        self._i = (self._i + 1) % len(self._batches)
        return b

    def send(self, batch, idx) -> int:
        idx = np.asarray(idx)
        self.tx += len(idx)
        if self.capture and len(idx):
            if isinstance(batch, _OnceBatch):  # read in take(), after the timed pass
                self._kept.append((batch, idx.copy()))  # idx may be the worker's scratch
            else:
                self._kept.append(_gather(batch, idx))
        return len(idx)

    def send_frames(self, frames) -> int:
        frames = list(frames)
        self.tx += len(frames)
        if self.capture and frames:
            a = np.zeros((len(frames), FRAME), np.uint8)
            lens = np.zeros(len(frames), np.uint32)
            for i, f in enumerate(frames):
                f = bytes(f)[:FRAME]
                a[i, : len(f)] = np.frombuffer(f, np.uint8)
                lens[i] = len(f)
            self._kept.append((a, lens))
        return len(frames)

    def take(self):
        if not self._kept:
            return np.zeros((0, FRAME), np.uint8), np.zeros(0, np.uint32)
        kept = [_gather(*k) if isinstance(k[0], Batch) else k for k in self._kept]  # in the order sent
        self._kept = []
        return np.concatenate([k[0] for k in kept]), np.concatenate([k[1] for k in kept])

    def mac(self) -> bytes:
        return bytes((2, 0, 0, 0, 0, 9))

    def stats(self) -> dict:
        return {"tx_packets": self.tx}

    def close(self) -> None:
        self._note.close()


class _Both:
    """The warm phase's source: both ports, exhausted when both are."""

    def __init__(self, a, b):
        self.a, self.b = a, b

    @property
    def exhausted(self) -> bool:
        return self.a.exhausted and self.b.exhausted


def _worker(cfg, nic, standalone, conn):
    """A NIC worker driven by the parent: ('load', side, frames, lengths, capture),
    ('go',) → ('done', tx, seconds, captured, cpu seconds of the pass), ('end',) → ('counters', dict)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from ..nic.worker import NicWorker

    inside, outside = PhasePort(f"in{nic}"), PhasePort(f"out{nic}")
    w = NicWorker(cfg, nic, inside, outside, standalone=standalone, journal=False, restore=False,
                  state_dir=os.path.join(cfg.state_dir, f"eval{nic}"))
    end = time.monotonic() + 10
    while not standalone and not w.registered and time.monotonic() < end:
        w.run_once(10)
    conn.send(("ready", nic))
    src = sink = None
    loads = []
    while True:
        if not conn.poll(0.001 if src is None else 0):
            w.run_once(1)
            continue
        msg = conn.recv()
        if msg[0] == "load":  # kept until "go": a loaded port is readable, and the
            loads.append(msg[1:])  # loop would start on it before the clock does
        elif msg[0] == "go":
            for side, frames, lengths, capture, rounds in loads:
                src, sink = (inside, outside) if side == "out" else (outside, inside)
                src.load(frames, lengths, rounds)
                sink.capture = capture
                if side == "warm":  # established flows: both directions at once
                    src = _Both(inside, outside)
            loads = []
            tx0 = inside.tx + outside.tx
            t0 = t_last = time.perf_counter()
            c0 = c_last = time.process_time()  # (the frames are loaded: unpickling them is not the pass's)
            deadline = t0 + PHASE_MAX_S
            last = tx0
            while True:
                # spin while the trace lasts; then block in poll (wakes on the coordinator's
                # socket) so that waiting for fetches leaves the cores to those answering them
                w.run_once(1 if src.exhausted else 0)
                now = time.perf_counter()
                tx = inside.tx + outside.tx
                if tx != last:  # the pass ends with its last frame (its time and its CPU)
                    last, t_last, c_last = tx, now, time.process_time()
                # done: the trace is through, nothing waits in the agent, and nothing left
                # for 20 ms (replays of built or fetched rules leave a little later)
                if (src.exhausted and w.idle and now - t_last > 0.02) or now > deadline:
                    break
            dt = t_last - t0
            cpu = c_last - c0
            kept = sink.take() if sink is not None and sink.capture else None
            if isinstance(src, _Both):
                kept = None
            conn.send(("done", last - tx0, dt, kept, cpu))
            src = None
        elif msg[0] == "end":
            w.run_once(0)
            conn.send(("counters", w.counters_dict()))
            w.close()
            return


def _reflect(frames: np.ndarray) -> np.ndarray:
    """The paper's receiver: swap source and destination address and port (the IPv4 and
    TCP/UDP checksums are sums, unchanged by a swap)."""
    r = frames.copy()
    r[:, 26:30], r[:, 30:34] = frames[:, 30:34], frames[:, 26:30]
    r[:, 34:36], r[:, 36:38] = frames[:, 36:38], frames[:, 34:36]
    r[:, 0:6], r[:, 6:12] = frames[:, 6:12], frames[:, 0:6]
    return r


def _nic_of(frames: np.ndarray, n: int) -> np.ndarray:
    """SHA-1 of each frame's 5-tuple mod n (the switch), computed once per distinct tuple."""
    from ..agent import predict_nic

    if n == 1 or len(frames) == 0:
        return np.zeros(len(frames), np.int64)
    def be(a, lo, hi):  # big-endian integer of bytes lo..hi of every row
        return (a[:, lo:hi].astype(np.uint64) * (256 ** np.arange(hi - lo - 1, -1, -1, dtype=np.uint64))).sum(1)

    proto, src, sp, dst, dp = frames[:, 23].astype(np.uint64), be(frames, 26, 30), be(frames, 34, 36), \
        be(frames, 30, 34), be(frames, 36, 38)
    key = np.stack([proto, src, sp, dst, dp], axis=1)
    uniq, inv = np.unique(key, axis=0, return_inverse=True)
    nics = np.array([predict_nic("sha1", n, *map(int, u)) for u in uniq], np.int64)
    return nics[inv.reshape(-1)]


def run_config(name: str, frames: np.ndarray, lengths: np.ndarray, cpu_trace: bool = False,
               limits: dict | None = None, install: str = "passive") -> dict:
    """One configuration over one trace (see the module doc); `limits` overrides config
    limits (e.g. ``{"pending_per_flow": 64}`` for a sensitivity run); `install` is the
    clone install mode (passive: fetched on the reply's miss; active: pushed by the owner)."""
    from ..lab.emulated import _coord_main, emulated_config

    n = 2 if name == "hypernat-2nic" else 1
    standalone = name == "servernat"
    cfg = emulated_config(n, mapping="address-and-port-dependent", pool="198.18.0.0/24", install=install,
                          limits={"flow_table_capacity": 1 << 19, "ports_per_host": 64512,
                                  "fetch_timeout_ms": 500, "fetch_retries": 6,
                                  # the anti-scan limit (200 fetches/s per remote address by
                                  # default) would throttle the trace's popular remotes: a
                                  # replay at line rate is not a scan (see docs/results.md)
                                  "fetch_rate_per_source": FETCH_RATE, **(limits or {})})
    ctx = mp.get_context("fork")
    coord = None
    if not standalone:
        os.makedirs(os.path.dirname(cfg.coordinator.endpoint[6:]), exist_ok=True)
        ready = ctx.Event()
        coord = ctx.Process(target=_coord_main, args=(cfg, cfg.coordinator.endpoint, ready), daemon=True)
        coord.start()
        if not ready.wait(10):
            raise RuntimeError("the coordinator did not start within 10 s")
    pipes, procs = [], []
    for k in range(n):
        a, b = ctx.Pipe()
        p = ctx.Process(target=_worker, args=(cfg, k, standalone, b), daemon=True)
        p.start()
        pipes.append(a)
        procs.append(p)
    for k, a in enumerate(pipes):
        recv_within(a, 60, f"nic{k} to start", procs[k])
    samples = []
    stop_sampling = threading.Event()

    def sampler():
        pids = [p.pid for p in procs] + ([coord.pid] if coord else [])
        last = [cpu_seconds(x) for x in pids]
        t_last = t_first = time.perf_counter()
        while not stop_sampling.wait(0.1):
            now = time.perf_counter()
            cur = [cpu_seconds(x) for x in pids]
            pct = [round(100 * (c - l) / (now - t_last), 1) for c, l in zip(cur, last)]
            samples.append([round(now - t_first, 3)] + pct)
            last, t_last = cur, now

    th = threading.Thread(target=sampler, daemon=True) if cpu_trace else None
    res = {"config": name, "nics": n, "install": install}
    try:
        if th:
            th.start()
        out_nic = _nic_of(frames, n)
        phase = {}
        kept = []
        for side in ("out", "in"):
            if side == "out":
                parts = [(frames[out_nic == k], lengths[out_nic == k]) for k in range(n)]
            else:
                rf = np.concatenate([k[0] for k in kept])
                rl = np.concatenate([k[1] for k in kept])
                # interleave the NICs' outputs back into (approximate) trace order
                order = np.argsort(np.concatenate([np.arange(len(k[0])) / max(1, len(k[0])) for k in kept]),
                                   kind="stable")
                rf, rl = _reflect(rf[order]), rl[order]
                in_nic = _nic_of(rf, n)
                parts = [(rf[in_nic == k], rl[in_nic == k]) for k in range(n)]
            for a, (f, l) in zip(pipes, parts):
                a.send(("load", side, f, l, side == "out", 1))
            c0 = cpu_seconds(coord.pid) if coord is not None else 0.0
            for a in pipes:
                a.send(("go",))
            done = [recv_within(a, PHASE_S, f"nic{k}'s {side} phase", procs[k]) for k, a in enumerate(pipes)]
            cpu = {f"nic{k}": round(d[4], 3) for k, d in enumerate(done)}
            if coord is not None:
                cpu["coordinator"] = round(cpu_seconds(coord.pid) - c0, 3)
            if side == "out":
                kept, out_parts = [d[3] for d in done], parts
            phase[side] = {"frames_in": int(sum(len(p[0]) for p in parts)), "frames_out": int(sum(d[1] for d in done)),
                           "seconds": max(d[2] for d in done), "cpu_s": cpu}
        # established flows: the same frames again, both directions at once, every rule in
        # place (rounds enough for ~2M frames, so the timing is not a few milliseconds)
        total = 2 * len(frames)
        rounds = max(1, int(round(2e6 / max(total, 1))))
        for a, (fo, lo), (fi, li) in zip(pipes, out_parts, parts):
            a.send(("load", "out", fo, lo, False, rounds))
            a.send(("load", "warm", fi, li, False, rounds))
        for a in pipes:
            a.send(("go",))
        done = [recv_within(a, PHASE_S, f"nic{k}'s established phase", procs[k]) for k, a in enumerate(pipes)]
        phase["established"] = {"frames_in": total * rounds, "frames_out": int(sum(d[1] for d in done)),
                                "seconds": max(d[2] for d in done), "rounds": rounds}
        for a in pipes:
            a.send(("end",))
        counters = [recv_within(a, 30, f"nic{k}'s counters", procs[k])[1] for k, a in enumerate(pipes)]
    finally:
        stop_sampling.set()
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
        if coord is not None:
            os.kill(coord.pid, signal.SIGTERM)
            coord.join(5)
        shutil.rmtree(os.path.dirname(cfg.coordinator.endpoint[6:]), ignore_errors=True)  # ipc socket, state
    tot = phase["out"]["frames_out"] + phase["in"]["frames_out"]
    secs = phase["out"]["seconds"] + phase["in"]["seconds"]
    est = phase["established"]
    res["kpps_established"] = round(est["frames_out"] / est["seconds"] / 1e3, 1)
    csum = lambda k: int(sum(c.get(k, 0) for c in counters))  # noqa: E731
    summed = {k: csum(k) for c in counters for k in c if isinstance(c[k], (int, float)) and csum(k)}
    res["drops"] = {k: v for k, v in summed.items()
                    if any(s in k for s in DROP_WORDS)}
    res["counters"] = summed
    # CPU of every process over the one pass (the workers' own, from "go" to their last
    # frame, as the pass's time; the coordinator's in the kernel's 10 ms ticks, to the end):
    # with more processes than cores, the 2-NIC pass cannot take less wall time than its
    # CPU spread over the cores -- what bounds 2 NICs / 1 NIC on a small machine
    res["one_pass_cpu_s"] = round(sum(sum(phase[s]["cpu_s"].values()) for s in ("out", "in")), 3)
    res.update(phase=phase, kpps=round(tot / secs / 1e3, 1), frames=tot, seconds=round(secs, 3),
               loss=int(phase["out"]["frames_in"] + phase["in"]["frames_in"] - tot),
               rules_built=csum("rules_built") or csum("rules_created"), clones=csum("agent_clones_installed"),
               fetches=csum("agent_fetches"), fetch_timeouts=csum("agent_fetch_timeout"))
    if cpu_trace:
        res["cpu_samples"] = samples
        res["cpu_columns"] = ["t"] + [f"NIC {k}" for k in range(n)] + (["coordinator"] if coord else [])
    return res


def traces(quick: bool):
    return {1: 300, 2: 600, 3: 1200, 4: 2400} if quick else dict(T.PAPER_TRACES)


def run(quick: bool = False, out: str | None = None, configs=CONFIGS, only_traces=None) -> dict:
    """Fig. 4 and Fig. 5: every configuration over every trace; writes fig4.* and fig5.*
    (``only_traces``: a subset, for Fig. 5 alone: then fig4.* is left as it was)."""
    from . import RESULTS

    out = out or RESULTS
    rows = []
    fig5 = None
    for t, flows in traces(quick).items():
        if only_traces and t not in only_traces:
            continue
        tr = T.generate(T.Params(flows=flows, seed=t))
        a, incl = T.headers(tr, FRAME, fixlen=True)
        f = np.zeros((len(a), FRAME), np.uint8)
        f[:, : a.shape[1]] = a[:, :FRAME]
        for c in configs:
            progress(f"fig4: trace {t} ({flows} flows, {tr.n_packets} packets), {LABELS[c]}")
            r = run_config(c, f, incl.astype(np.uint32), cpu_trace=(t == 1 and c == "hypernat-2nic"))
            r.update(trace=t, flows=flows, packets=tr.n_packets, load_1m=round(os.getloadavg()[0], 2))
            if "cpu_samples" in r:
                fig5 = {"samples": r.pop("cpu_samples"), "columns": r.pop("cpu_columns")}
            rows.append(r)
            progress(f"      {r['kpps']} Kpps ({r['frames']} frames in {r['seconds']} s, clones {r['clones']}, "
                     f"lost {r['loss']})")
    m = machine()
    data = {"machine": m, "quick": quick, "paper_trace1_kpps": PAPER_FIG4_TRACE1,
            "paper_trace4_kpps": PAPER_FIG4_TRACE4, "rows": rows}
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    ts = sorted({r["trace"] for r in rows})
    width = 0.8 / len(configs)
    ticks = [f"Trace {t}\n({traces(quick)[t] // 1000 if not quick else traces(quick)[t]}"
             f"{'k' if not quick else ''} flows)" for t in ts]
    for ax, key, title in ((axes[0], "kpps", "one pass, rules built and cloned (the paper's method)"),
                           (axes[1], "kpps_established", "established flows (every rule in place)")):
        for i, c in enumerate(configs):
            ys = [next(r[key] for r in rows if r["trace"] == t and r["config"] == c) for t in ts]
            ax.bar(np.arange(len(ts)) + (i - (len(configs) - 1) / 2) * width, ys, width, label=LABELS[c])
        ax.set_xticks(np.arange(len(ts)), ticks)
        ax.set_ylabel("throughput (Kpps)")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=8)
    fig.suptitle("Fig. 4, emulated deployment (x86, 2 shared vCPUs)", fontsize=10)
    hdr = (["trace", "flows", "packets"] + [f"{LABELS[c]} Kpps" for c in configs]
           + [f"{LABELS[c]} established Kpps" for c in configs]
           + ["clones (2 NICs)", "lost (2 NICs)", "one-pass CPU, 2 NICs / 1 NIC", "load avg"])
    table = []
    for t in ts:
        rr = {r["config"]: r for r in rows if r["trace"] == t}
        any_r = next(iter(rr.values()))
        two, one = rr.get("hypernat-2nic", {}), rr.get("hypernat-1nic", {})
        cpu_x = (f"{two['one_pass_cpu_s'] / one['one_pass_cpu_s']:.2f}x"
                 if two and one and one["one_pass_cpu_s"] > 0 else "-")
        table.append([t, any_r["flows"], any_r["packets"]] + [rr[c]["kpps"] for c in configs]
                     + [rr[c]["kpps_established"] for c in configs]
                     + [two.get("clones", "-"), two.get("loss", "-"), cpu_x, any_r.get("load_1m", "-")])
    md = md_table(hdr, table)
    md += ("\nOne-pass CPU: every process's CPU (NIC workers, coordinator) over the one pass; with more "
           "busy processes than cores, 2 NICs / 1 NIC in Kpps is at most cores / that ratio.\n")
    md += ("\nPaper, Trace 1 (BlueField ARM NICs vs an x86 server): 2 NICs 1643.3, serverNAT 1280.4, "
           "1 NIC 723.7 Kpps; Trace 4: 2 NICs 1377.9, serverNAT 859.5 Kpps.\n")
    if only_traces:
        pyplot().close(fig)
    else:
        save(out, "fig4", data, md, fig)
    if fig5:
        s = np.array(fig5["samples"]) if fig5["samples"] else np.zeros((0, len(fig5["columns"])))
        fig, ax = plt.subplots(figsize=(6.4, 3.2))
        for j, col in enumerate(fig5["columns"][1:], start=1):
            if len(s):
                ax.plot(s[:, 0], s[:, j], label=col)
        ax.set_xlabel("time (s)")
        ax.set_ylabel("CPU (% of one core)")
        ax.set_title("Fig. 5: CPU use, Trace 1, HyperNAT (2 NICs), emulated")
        ax.legend(fontsize=8)
        busy = s[s[:, 1:-1].max(axis=1) > 5] if len(s) else s
        means = {col: round(float(busy[:, j].mean()), 1) if len(busy) else None
                 for j, col in enumerate(fig5["columns"][1:], start=1)}
        d5 = {"machine": m, "quick": quick, "columns": fig5["columns"], "samples": fig5["samples"],
              "mean_while_busy_pct": means, "paper_pct": PAPER_FIG5}
        md5 = md_table(["process", "mean CPU while the trace runs (% of a core)", "paper"],
                       [[k, v, "~70 %" if k.startswith("NIC") else "< 2 % (server)"] for k, v in means.items()])
        save(out, "fig5", d5, md5, fig)
        data["fig5"] = d5
    return data
