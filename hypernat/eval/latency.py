"""Table I (event timestamps of a first packet and a later one) and Fig. 6 (CDF of RTT
at two offered rates), on the emulated deployment.

Both drive ``hypernat.lab.emulated.Emulation``: the coordinator and 2 NIC worker
processes, frames through shared-memory rings; this process is the sender (the VPC
side), the switch (SHA-1 over the 5-tuple) and the paper's receiver, which reverses
every packet and sends it back through whichever NIC the hash picks:

    sender ──t0──► NIC o (inside rx) ─ rule built ─► outside tx ──t_recv──► receiver
                                                                              │ t_ack
    sender ◄─t_back── NIC j (inside tx) ◄─ FETCH/clone if j != o ◄─ outside rx ┘

Table I times every event of the paper's table, each from a real timestamp.  The
sender and receiver timestamps are taken here; the events inside the NICs come from the
workers' own event logs (``hypernat.nic.events``, switched on for this experiment only:
``Emulation(events=..., event_hits=True)``), returned with each NIC's report when the
emulation closes and matched by flow key.  One clock for all: ``time.monotonic_ns()``
(CLOCK_MONOTONIC, system-wide, so the NIC processes' times and this process's compare).

    row                         first pair (SYN / SYN-ACK)          later pair (ACK / ACK)
    Start at sender             t0 (this process)                    t0
    Arrive at 1st NIC           NIC o: rx_miss, out key              NIC o: rx_hit
    Rule installed on 1st NIC   NIC o: rule_built                    = arrival (the hit)
    Receiver received packet    this process                         this process
    Receiver sent out ACK       this process                         this process
    ACK at 2nd NIC              NIC j: rx_miss (or rx_hit), in key   NIC j: rx_hit
    Rule installed on 2nd NIC   NIC j: clone_installed, in key       = arrival (the hit)
    Return to sender            this process                         this process

With passive install the SYN-ACK misses on NIC j and waits for FETCH → coordinator →
owner → RULE; with active install the owner pushed the clone when it built the rule,
so NIC j's install usually comes *before* the SYN-ACK arrives (a negative wait).  Only
connections whose two directions land on different NICs are kept (the case the table
is about); the pairs are sent one at a time, so a batch holds one connection's frame.
A batch's frames share its receive time (taken when ``recv`` returns).

Fig. 6 replays Trace 1 (``hypernat.trace``) at two offered rates, reflecting every
packet, and records each packet's RTT through the gateway (first packets of a
connection, which may wait for a fetch, and later ones).  The sender, switch and
receiver are one Python process on the same 2 vCPUs as the NICs and the coordinator, so
the rates are scaled down from the paper's 800 / 1600 Kpps to what that process can
offer; the shape (a fetch tail on first packets, queueing at the heavier rate) is what
compares.
"""
from __future__ import annotations

import os
import select
import shutil
import time

import numpy as np

from . import machine, md_table, progress, pyplot, save

PAPER_TABLE1 = [  # event, first pkt/ACK (us), other pkts/ACK (us)
    ("Start at sender", 0, 0), ("Arrive at 1st NIC", 100, 100), ("Rule installed on 1st NIC", 125, 100),
    ("Receiver received packet", 225, 207), ("Receiver sent out ACK", 325, 311), ("ACK at 2nd NIC", 427, 411),
    ("Rule installed on 2nd NIC", 2168, 411), ("Return to sender", 2269, 621)]
PAPER_FIG6 = {"800 Kpps": "98.6th percentile 3.0 ms", "1600 Kpps": "3.4% of packets above 30.3 ms"}


def _wait(ring, poller_fd, timeout=2.0):
    """Pop one frame from `ring`, waiting at most `timeout` s: (monotonic ns, frame) or
    (None, None)."""
    end = time.monotonic_ns() + int(timeout * 1e9)
    p = select.poll()
    p.register(poller_fd, select.POLLIN)
    while True:
        fr = ring.pop_frames(1)
        if fr:
            return time.monotonic_ns(), fr[0]
        left = end - time.monotonic_ns()
        if left <= 0:
            return None, None
        p.poll(max(1, left // 1_000_000))


def _state_dir(on_disk: bool) -> str:
    """Where the NICs keep their journal: tmpfs (/dev/shm) unless `on_disk` (the block
    journal is fsync'ed before a new port block's first use: on a disk that costs a
    millisecond or more on the first packet of each new block)."""
    import tempfile

    return tempfile.mkdtemp(prefix=f"hn-eval-{os.getpid()}-", dir=None if on_disk or not os.path.isdir("/dev/shm")
                            else "/dev/shm")


TABLE1_ROWS = [r[0] for r in PAPER_TABLE1]
EVENT_LOG_CAPACITY = 1 << 16


def _nic_events(reports: dict) -> dict:
    """NIC id -> its event log (EVENT_DTYPE, oldest first) from the emulation's reports."""
    from ..nic.events import EVENT_DTYPE

    out = {}
    for nic, reps in reports.items():
        parts = [r["events"] for r in reps if r.get("events") is not None]
        out[nic] = np.concatenate(parts) if parts else np.zeros(0, EVENT_DTYPE)
    return out


def _event_row(ev: dict, c: dict, kind: str) -> list:
    """The 8 times of Table I (µs from the pair's send) for one pair of connection `c`;
    None where an event is not in the logs."""
    from ..nic import events as E

    p = c[kind]
    t0 = p["t0"]
    out_k, in_k = c["out_key"], c["in_key"]
    none = np.zeros(0, E.EVENT_DTYPE)
    eo, ej = ev.get(c["o"], none), ev.get(c["j"], none)

    def first_of(events, kinds, key, after):
        ts = [t for t in (E.find(events, k_, *key, after_ns=after) for k_ in kinds) if t is not None]
        return min(ts) if ts else None

    if kind == "first":
        arr1 = first_of(eo, (E.RX_MISS,), out_k, t0)
        inst1 = first_of(eo, (E.RULE_BUILT,), out_k, t0)
        arr2 = first_of(ej, (E.RX_MISS, E.RX_HIT), in_k, p["t_ack"])
        inst2 = first_of(ej, (E.CLONE_INSTALLED,), in_k, t0)  # active: pushed, maybe before the ACK
    else:
        arr1 = inst1 = first_of(eo, (E.RX_HIT,), out_k, t0)
        arr2 = inst2 = first_of(ej, (E.RX_HIT,), in_k, p["t_ack"])
    ts = [t0, arr1, inst1, p["t_recv"], p["t_ack"], arr2, inst2, p["t_back"]]
    return [None if t is None else round((t - t0) / 1e3, 2) for t in ts]


def table1_run(install: str, reps: int, gap: float = 0.002, journal_on_disk: bool = False) -> dict:
    """`reps` connections with their directions on different NICs; per connection and
    pair the 8 event times of Table I (µs from each pair's send; None: not logged)."""
    from ..lab.emulated import ACK, SYN, TCP, Emulation, build_frame, emulated_config, parse_frame

    sd = _state_dir(journal_on_disk)
    cfg = emulated_config(2, mapping="address-and-port-dependent", install=install, state_dir=sd)
    emu = Emulation(cfg, events=EVENT_LOG_CAPACITY, event_hits=True)
    conns = []
    lost, tries = 0, 0
    rng = np.random.default_rng(11)
    try:
        emu.start()
        base_i = int(cfg.internal[0].network_address) + 100
        while len(conns) < reps and tries < reps * 6:
            tries += 1
            iaddr, iport = base_i + int(rng.integers(0, 2000)), int(rng.integers(1024, 65535))
            raddr = 0xC0000200 + int(rng.integers(1, 250))
            o = emu.nic_for(TCP, iaddr, iport, raddr, 80)
            rec, timed_out = {"o": o, "out_key": (TCP, iaddr, iport, raddr, 80)}, False
            for kind, fl_out, fl_in in (("first", SYN, SYN | ACK), ("later", ACK, ACK)):
                time.sleep(gap)  # the same idle gap before each pair: both start from a cold wake-up
                f = build_frame(TCP, iaddr, iport, raddr, 80, flags=fl_out, payload=b"x" * 6)
                t0 = time.monotonic_ns()
                emu.rings[o][0].push_frames([f])
                t_recv, g = _wait(emu.rings[o][3], emu.rings[o][3].note.fd)
                if g is None:
                    timed_out = True
                    break
                p = parse_frame(g)
                j = emu.nic_for(TCP, raddr, 80, p.src, p.sport)
                if j == o:
                    break  # both directions on one NIC: nothing to clone, not this table's case
                reply = build_frame(TCP, raddr, 80, p.src, p.sport, flags=fl_in, payload=b"y" * 6)
                t_ack = time.monotonic_ns()
                emu.rings[j][2].push_frames([reply])
                t_back, h = _wait(emu.rings[j][1], emu.rings[j][1].note.fd)
                if h is None:
                    timed_out = True
                    break
                rec[kind] = {"t0": t0, "t_recv": t_recv, "t_ack": t_ack, "t_back": t_back}
                rec["j"], rec["in_key"] = j, (TCP, raddr, 80, p.src, p.sport)
            if "later" in rec:
                conns.append(rec)
            elif timed_out:
                lost += 1  # a packet did not come out of the gateway within 2 s
    finally:
        reports = emu.close()
        shutil.rmtree(sd, ignore_errors=True)
        shutil.rmtree(os.path.dirname(cfg.coordinator.endpoint[6:]), ignore_errors=True)
    ev = _nic_events(reports)
    rows = {kind: [_event_row(ev, c, kind) for c in conns] for kind in ("first", "later")}
    dropped = sum(r.get("events_dropped", 0) for reps_ in reports.values() for r in reps_)
    return {"install": install, "connections": len(conns), "lost": lost, "events_dropped": int(dropped),
            "events_logged": {int(k): int(len(v)) for k, v in ev.items()},
            "rows": TABLE1_ROWS, "first": rows["first"], "later": rows["later"]}


def _stats(a: np.ndarray) -> dict:
    """Per row: (mean, sd) over the connections where the event was logged, and how many
    were not."""
    out = {}
    for i, n in enumerate(TABLE1_ROWS):
        col = a[:, i] if len(a) else np.zeros(0)
        ok = col[~np.isnan(col)]
        out[n] = (round(float(ok.mean()), 1), round(float(ok.std()), 1)) if len(ok) else (None, None)
        if len(ok) < len(col):
            out.setdefault("missing", {})[n] = int(len(col) - len(ok))
    return out


def plot_table1(arr: dict):
    """The mean ± sd of every Table I row, per install mode and pair; `arr` maps
    (install, "first" | "later") to an array of rows (connections × 8, NaN: missing)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.2, 3.6))
    y = np.arange(len(TABLE1_ROWS))
    for off, (install, kind, mk) in zip((-0.3, -0.1, 0.1, 0.3), (("passive", "first", "o"), ("passive", "later", "s"),
                                                                  ("active", "first", "^"), ("active", "later", "v"))):
        a = arr[(install, kind)]
        if len(a):
            ax.errorbar(np.nanmean(a, axis=0), y + off, xerr=np.nanstd(a, axis=0), fmt=mk, ms=4, capsize=2,
                        label=f"{install}, {kind} pair")
    ax.plot([p[1] for p in PAPER_TABLE1], y, "k|", ms=10, label="paper, first pair")
    ax.set_yticks(y)
    ax.set_yticklabels(TABLE1_ROWS, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("µs from the send (mean ± sd)")
    ax.set_title("Table I: events of a first and a later pair, 2 NICs, emulated")
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    return fig


def table1(quick: bool = False, out: str | None = None) -> dict:
    from . import RESULTS

    out = out or RESULTS
    reps = 20 if quick else 200
    runs = {}
    for install in ("passive", "active"):
        progress(f"table1: {reps} connections, {install} install")
        runs[install] = table1_run(install, reps)
    progress(f"table1: {max(5, reps // 4)} connections, passive install, journal on disk")
    disk = table1_run("passive", max(5, reps // 4), journal_on_disk=True)
    summary = {}
    arr = {}
    for install, r in runs.items():
        s = {}
        for kind in ("first", "later"):
            a = np.array(r[kind], dtype=float).reshape(-1, len(TABLE1_ROWS))
            arr[(install, kind)] = a
            s[kind] = _stats(a)
        f_, l_ = arr[(install, "first")], arr[(install, "later")]
        # the first reply's return leg against a later reply's (ACK sent -> back at sender)
        s["first_return_extra_us"] = (round(float(np.nanmean(f_[:, 7] - f_[:, 4]) - np.nanmean(l_[:, 7] - l_[:, 4])), 1)
                                      if len(f_) else None)
        # inside NIC j: the reply's arrival -> its clone installed (passive: the fetch round trip)
        w = f_[:, 6] - f_[:, 5] if len(f_) else np.zeros(0)
        w = w[~np.isnan(w)]
        s["second_nic_wait_us"] = (round(float(w.mean()), 1), round(float(w.std()), 1)) if len(w) else (None, None)
        s["events_dropped"] = r["events_dropped"]
        summary[install] = s
    fmt = lambda v: "-" if v is None or v[0] is None else f"{v[0]:.0f} ± {v[1]:.0f}"  # noqa: E731
    rows = []
    for n, p1, p2 in PAPER_TABLE1:
        rows.append([n, fmt(summary["passive"]["first"].get(n)), fmt(summary["passive"]["later"].get(n)),
                     fmt(summary["active"]["first"].get(n)), fmt(summary["active"]["later"].get(n)), p1, p2])
    md = md_table(["event (µs from the send)", "passive: 1st pkt/ACK", "passive: later pkt/ACK",
                   "active: 1st pkt/ACK", "active: later pkt/ACK", "paper 1st", "paper later"], rows)
    missing = {i: {k: summary[i][k].get("missing", {}) for k in ("first", "later")} for i in runs}
    md += (f"\nMean ± standard deviation over {runs['passive']['connections']} (passive) and "
           f"{runs['active']['connections']} (active) connections whose two directions landed on different NICs. "
           "Every row is a measured timestamp (CLOCK_MONOTONIC, `time.monotonic_ns()`, shared by all processes): "
           "sender and receiver in the driving process, the NIC rows from the NIC workers' event logs "
           "(`hypernat.nic.events`). For a later pair, \"rule installed\" is the hit, i.e. the arrival.\n")
    sp, sa = summary["passive"]["second_nic_wait_us"], summary["active"]["second_nic_wait_us"]
    fa = arr[("active", "first")]
    won = fa[:, 6] < fa[:, 5] if len(fa) else np.zeros(0, bool)
    summary["active"]["push_before_reply_share"] = round(float(won.mean()), 3) if len(won) else None
    if sp[0] is not None:
        md += (f"\nInside the 2nd NIC, from the first reply's arrival to its clone installed: {fmt(sp)} µs "
               f"with passive install (FETCH → coordinator → owner → RULE), {fmt(sa)} µs with active install, "
               f"where the owner's PUSH reached the 2nd NIC before the reply for {100 * won.mean():.0f} % of the "
               "connections (a negative wait); otherwise the reply missed and waited for whichever came first, the PUSH "
               "already on its way or the answer to its own FETCH.\n")
    if any(m for v in missing.values() for m in v.values()):
        md += f"\nEvents not found in the logs (connections, per row): {missing}.\n"
    if disk["first"]:
        a = np.array(disk["first"], dtype=float)
        b = arr[("passive", "first")]
        summary["passive_journal_on_disk"] = {"connections": disk["connections"],
                                              "first_rule_installed_1st_nic_us": (
                                                  round(float(np.nanmean(a[:, 2] - a[:, 1])), 1),
                                                  round(float(np.nanstd(a[:, 2] - a[:, 1])), 1)),
                                              "first_receiver_received_us": (round(float(np.nanmean(a[:, 3])), 1),
                                                                             round(float(np.nanstd(a[:, 3])), 1)),
                                              "first_return_us": (round(float(np.nanmean(a[:, 7])), 1),
                                                                  round(float(np.nanstd(a[:, 7])), 1))}
        md += (f"\nWith the NICs' block journal on disk (/tmp) instead of tmpfs, {disk['connections']} connections: "
               f"the 1st NIC takes {np.nanmean(a[:, 2] - a[:, 1]):.0f} ± {np.nanstd(a[:, 2] - a[:, 1]):.0f} µs from "
               f"arrival to rule installed (tmpfs: {np.nanmean(b[:, 2] - b[:, 1]):.0f} ± "
               f"{np.nanstd(b[:, 2] - b[:, 1]):.0f} µs) and the first packet reaches the receiver after "
               f"{np.nanmean(a[:, 3]):.0f} ± {np.nanstd(a[:, 3]):.0f} µs (tmpfs: {np.nanmean(b[:, 3]):.0f} ± "
               f"{np.nanstd(b[:, 3]):.0f} µs): a new port block is journaled and fsync'ed before its first use "
               "(invariant 6).\n")
    fig = plot_table1(arr)
    runs["passive_journal_on_disk"] = disk
    data = {"machine": machine(), "quick": quick, "paper": PAPER_TABLE1, "clock": "CLOCK_MONOTONIC (time.monotonic_ns)",
            "summary": summary, "runs": runs}
    save(out, "table1", data, md, fig)
    return data


# ------------------------------------------------------------------------------ Fig. 6


def _reflect(f: bytes) -> bytes:
    return f[6:12] + f[0:6] + f[12:26] + f[30:34] + f[26:30] + f[36:38] + f[34:36] + f[38:]


def rtt_run(frames: list, rate: float, seconds: float) -> dict:
    """Offer `frames` (in order) at `rate` packets/s for at most `seconds`, reflect every
    packet, and return each packet's RTT (µs) and whether it was its flow's first."""
    from ..agent import predict_nic
    from ..lab.emulated import Emulation, emulated_config

    sd = _state_dir(False)
    cfg = emulated_config(2, mapping="address-and-port-dependent", install="passive", state_dir=sd,
                          limits={"flow_table_capacity": 1 << 17, "ports_per_host": 64512})
    emu = Emulation(cfg, ring_slots=16384)
    nic_cache: dict = {}

    def nic(f: bytes) -> int:
        k = f[23:24] + f[26:38]
        v = nic_cache.get(k)
        if v is None:
            v = nic_cache[k] = predict_nic("sha1", 2, f[23], int.from_bytes(f[26:30], "big"),
                                           int.from_bytes(f[34:36], "big"), int.from_bytes(f[30:34], "big"),
                                           int.from_bytes(f[36:38], "big"))
        return v

    sent: dict = {}
    seen_flows: set = set()
    rtts, firsts = [], []
    n_total = min(len(frames), int(rate * seconds))
    out_nic = [nic(f) for f in frames[:n_total]]
    try:
        emu.start()
        t_start = time.perf_counter()
        i = 0
        while True:
            now = time.perf_counter()
            due = min(n_total, int((now - t_start) * rate) + 1)
            if i < due:
                per = ([], [])
                for k in range(i, due):
                    f = frames[k]
                    key = f[30:34] + f[26:30] + f[36:38] + f[34:36] + f[18:20] + f[23:24]
                    fk = key[:12]
                    sent[key] = (now, fk not in seen_flows)
                    seen_flows.add(fk)
                    per[out_nic[k]].append(f)
                for k in (0, 1):
                    if per[k]:
                        emu.rings[k][0].push_frames(per[k])
                i = due
            moved = 0
            for k in (0, 1):
                fr = emu.rings[k][3].pop_frames(512)
                if fr:
                    moved += len(fr)
                    back = ([], [])
                    for f in fr:
                        r = _reflect(f)
                        back[nic(r)].append(r)
                    for j in (0, 1):
                        if back[j]:
                            emu.rings[j][2].push_frames(back[j])
                fr = emu.rings[k][1].pop_frames(512)
                if fr:
                    moved += len(fr)
                    t = time.perf_counter()
                    for f in fr:
                        s = sent.pop(f[26:38] + f[18:20] + f[23:24], None)
                        if s is not None:
                            rtts.append((t - s[0]) * 1e6)
                            firsts.append(s[1])
            if i >= n_total and (not sent or time.perf_counter() - t_start > seconds + 3):
                break
        elapsed = time.perf_counter() - t_start
    finally:
        emu.close()
        shutil.rmtree(sd, ignore_errors=True)
        shutil.rmtree(os.path.dirname(cfg.coordinator.endpoint[6:]), ignore_errors=True)
    return {"offered_pps": rate, "packets": n_total, "answered": len(rtts), "lost": len(sent),
            "achieved_pps": round(n_total / min(elapsed, max(seconds, n_total / rate)), 1),
            "rtt_us": rtts, "first": firsts}


def fig6(quick: bool = False, out: str | None = None) -> dict:
    from . import RESULTS
    from .. import trace as T

    out = out or RESULTS
    tr = T.generate(T.Params(flows=1000 if quick else 10_000, seed=1))
    frames = T.replay_frames(tr, 64)
    rates = (2000, 8000) if quick else (5000, 20000)
    seconds = 1.0 if quick else 5.0
    runs = {}
    for r in rates:
        progress(f"fig6: trace 1 at {r} pps for {seconds} s")
        runs[r] = rtt_run(frames, r, seconds)
        progress(f"      answered {runs[r]['answered']} of {runs[r]['packets']}")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    rows, summ = [], {}
    for r, d in runs.items():
        a = np.sort(np.array(d["rtt_us"])) / 1e3
        if not len(a):
            continue
        ax.plot(a, np.arange(1, len(a) + 1) / len(a), label=f"{r / 1e3:g} Kpps offered")
        fa = np.array(d["rtt_us"])[np.array(d["first"], bool)] / 1e3
        q = lambda x, v: round(float(np.quantile(x, v)), 3) if len(x) else None  # noqa: E731
        s = {"p50_ms": q(a, 0.5), "p90_ms": q(a, 0.9), "p986_ms": q(a, 0.986), "p99_ms": q(a, 0.99),
             "max_ms": round(float(a.max()), 3), "first_p50_ms": q(fa, 0.5), "first_p99_ms": q(fa, 0.99),
             "share_over_3ms": round(float((a > 3).mean()), 4), "answered": d["answered"], "packets": d["packets"],
             "achieved_pps": d["achieved_pps"]}
        summ[r] = s
        rows.append([f"{r / 1e3:g}", d["achieved_pps"], f"{d['answered']}/{d['packets']}", s["p50_ms"], s["p90_ms"],
                     s["p986_ms"], s["max_ms"], s["first_p50_ms"], s["share_over_3ms"]])
    ax.set_xscale("log")
    ax.set_xlabel("RTT through the gateway (ms)")
    ax.set_ylabel("CDF")
    ax.set_title("Fig. 6: CDF of RTT, Trace 1, 2 NICs, emulated")
    ax.legend(fontsize=8)
    md = md_table(["offered Kpps", "achieved pps", "answered", "p50 ms", "p90 ms", "p98.6 ms", "max ms",
                   "first pkts p50 ms", "share > 3 ms"], rows)
    md += ("\nPaper (800 / 1600 Kpps on BlueField): 98.6th percentile 3.0 ms at 800 Kpps; at 1600 Kpps 3.4% of "
           "packets above 30.3 ms. Here the sender, switch and receiver are one Python process sharing the 2 vCPUs, "
           "so the offered rates are scaled down.\n")
    data = {"machine": machine(), "quick": quick, "paper": PAPER_FIG6, "summary": summ,
            "runs": {str(r): {k: v for k, v in d.items() if k not in ("rtt_us", "first")} for r, d in runs.items()},
            # the CDF, 200 points per rate (the raw RTTs would make a multi-megabyte file)
            "cdf_ms": {str(r): np.quantile(np.array(d["rtt_us"]) / 1e3, np.linspace(0, 1, 201)).round(4).tolist()
                       for r, d in runs.items() if d["rtt_us"]}}
    save(out, "fig6", data, md, fig)
    return data
