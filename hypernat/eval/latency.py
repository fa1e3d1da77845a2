"""Table I (event timestamps of a first packet and a later one) and Fig. 6 (CDF of RTT
at two offered rates), on the emulated deployment.

Both drive ``hypernat.lab.emulated.Emulation``: the coordinator and 2 NIC worker
processes, frames through shared-memory rings; this process is the sender (the VPC
side), the switch (SHA-1 over the 5-tuple) and the paper's receiver, which reverses
every packet and sends it back through whichever NIC the hash picks:

    sender ──t0──► NIC o (inside rx) ─ rule built ─► outside tx ──t_recv──► receiver
                                                                              │ t_ack
    sender ◄─t_back── NIC j (inside tx) ◄─ FETCH/clone if j != o ◄─ outside rx ┘

Table I times the events this process can see (sender, receiver: the boundaries of the
gateway), for the first packet of a TCP connection (SYN / SYN-ACK: on NIC j the reply
misses, and with passive install waits for FETCH → coordinator → owner → RULE) and for
a later pair of the same connection (ACK / ACK: both NICs hit).  Only connections whose
two directions land on different NICs are kept (the case the table is about).  The
events inside the NICs (arrival, rule installed) are not observable without a hook in
the worker; the row "rule installed on 2nd NIC" is reported from the NIC's own fetch
clock (the agent's ``fetch_latencies``: from the reply's miss to the clone's install),
added to the time the ACK was sent -- an estimate, marked as such.

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
    end = time.perf_counter() + timeout
    p = select.poll()
    p.register(poller_fd, select.POLLIN)
    while True:
        fr = ring.pop_frames(1)
        if fr:
            return time.perf_counter(), fr[0]
        left = end - time.perf_counter()
        if left <= 0:
            return None, None
        p.poll(max(1, int(left * 1000)))


def _state_dir(on_disk: bool) -> str:
    """Where the NICs keep their journal: tmpfs (/dev/shm) unless `on_disk` (the block
    journal is fsync'ed before a new port block's first use: on a disk that costs a
    millisecond or more on the first packet of each new block)."""
    import tempfile

    return tempfile.mkdtemp(prefix=f"hn-eval-{os.getpid()}-", dir=None if on_disk or not os.path.isdir("/dev/shm")
                            else "/dev/shm")


def table1_run(install: str, reps: int, gap: float = 0.002, journal_on_disk: bool = False) -> dict:
    """`reps` connections with their directions on different NICs; per connection the
    boundary timestamps of the first pair and of a later pair (µs from each send)."""
    from ..lab.emulated import ACK, SYN, TCP, Emulation, build_frame, emulated_config, parse_frame

    sd = _state_dir(journal_on_disk)
    cfg = emulated_config(2, mapping="address-and-port-dependent", install=install, state_dir=sd)
    emu = Emulation(cfg)
    rows = {"first": [], "later": []}
    ret_nic, lost, tries = [], 0, 0
    rng = np.random.default_rng(11)
    try:
        emu.start()
        base_i = int(cfg.internal[0].network_address) + 100
        while len(rows["first"]) < reps and tries < reps * 6:
            tries += 1
            iaddr, iport = base_i + int(rng.integers(0, 2000)), int(rng.integers(1024, 65535))
            raddr = 0xC0000200 + int(rng.integers(1, 250))
            o = emu.nic_for(TCP, iaddr, iport, raddr, 80)
            rec, timed_out = {}, False
            for kind, fl_out, fl_in in (("first", SYN, SYN | ACK), ("later", ACK, ACK)):
                time.sleep(gap)  # the same idle gap before each pair: both start from a cold wake-up
                f = build_frame(TCP, iaddr, iport, raddr, 80, flags=fl_out, payload=b"x" * 6)
                t0 = time.perf_counter()
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
                t_ack = time.perf_counter()
                emu.rings[j][2].push_frames([reply])
                t_back, h = _wait(emu.rings[j][1], emu.rings[j][1].note.fd)
                if h is None:
                    timed_out = True
                    break
                rec[kind] = (0.0, (t_recv - t0) * 1e6, (t_ack - t0) * 1e6, (t_back - t0) * 1e6)
                rec["j"] = j
            if "later" in rec:
                rows["first"].append(rec["first"])
                rows["later"].append(rec["later"])
                ret_nic.append(rec["j"])
            elif timed_out:
                lost += 1  # a packet did not come out of the gateway within 2 s
    finally:
        reports = emu.close()
        shutil.rmtree(sd, ignore_errors=True)
        shutil.rmtree(os.path.dirname(cfg.coordinator.endpoint[6:]), ignore_errors=True)
    lat = {k: [x * 1e6 for r in reps_ for x in r.get("latencies", [])] for k, reps_ in reports.items()}
    # the k-th connection returning on NIC j caused NIC j's k-th fetch (passive install)
    fetch_us = []
    seen = {0: 0, 1: 0}
    for j in ret_nic:
        li = lat.get(j, [])
        fetch_us.append(li[seen[j]] if seen[j] < len(li) else np.nan)
        seen[j] += 1
    return {"install": install, "connections": len(rows["first"]), "lost": lost,
            "first": np.array(rows["first"]).tolist(), "later": np.array(rows["later"]).tolist(),
            "fetch_us": fetch_us}


def table1(quick: bool = False, out: str | None = None) -> dict:
    from . import RESULTS

    out = out or RESULTS
    reps = 20 if quick else 200
    runs = {}
    for install in ("passive", "active"):
        progress(f"table1: {reps} connections, {install} install")
        runs[install] = table1_run(install, reps)
    progress(f"table1: {reps // 4} connections, passive install, journal on disk")
    disk = table1_run("passive", max(5, reps // 4), journal_on_disk=True)
    names = ["Start at sender", "Receiver received packet", "Receiver sent out ACK", "Return to sender"]
    summary = {}
    for install, r in runs.items():
        s = {}
        for kind in ("first", "later"):
            a = np.array(r[kind]) if r[kind] else np.zeros((0, 4))
            s[kind] = {n: (round(float(a[:, i].mean()), 1), round(float(a[:, i].std()), 1)) if len(a) else (None, None)
                       for i, n in enumerate(names)}
        fu = np.array([x for x in r["fetch_us"] if x == x])
        a = np.array(r["first"]) if r["first"] else np.zeros((0, 4))
        if len(fu) and len(a) == len(r["fetch_us"]):
            est = a[:, 2][~np.isnan(np.array(r["fetch_us"]))] + fu
            s["first"]["Rule installed on 2nd NIC (est.)"] = (round(float(est.mean()), 1), round(float(est.std()), 1))
            s["fetch_us"] = (round(float(fu.mean()), 1), round(float(fu.std()), 1), len(fu))
        if r["first"]:  # the first reply's return leg against a later reply's
            f_, l_ = np.array(r["first"]), np.array(r["later"])
            s["first_return_extra_us"] = round(float((f_[:, 3] - f_[:, 2]).mean() - (l_[:, 3] - l_[:, 2]).mean()), 1)
        else:
            s["first_return_extra_us"] = None
        summary[install] = s
    fmt = lambda v: "-" if v is None or v[0] is None else f"{v[0]:.0f} ± {v[1]:.0f}"  # noqa: E731
    rows = []
    for n in names[:3] + ["Rule installed on 2nd NIC (est.)"] + names[3:]:
        paper = {"Receiver received packet": (225, 207), "Receiver sent out ACK": (325, 311),
                 "Rule installed on 2nd NIC (est.)": (2168, 411), "Return to sender": (2269, 621),
                 "Start at sender": (0, 0)}[n]
        rows.append([n, fmt(summary["passive"]["first"].get(n)), fmt(summary["passive"]["later"].get(n)),
                     fmt(summary["active"]["first"].get(n)), fmt(summary["active"]["later"].get(n)),
                     paper[0], paper[1]])
    md = md_table(["event (µs from the send)", "passive: 1st pkt/ACK", "passive: later pkt/ACK",
                   "active: 1st pkt/ACK", "active: later pkt/ACK", "paper 1st", "paper later"], rows)
    md += (f"\nMean ± standard deviation over {runs['passive']['connections']} (passive) and "
           f"{runs['active']['connections']} (active) connections whose two directions landed on different NICs. "
           "Events inside the NICs are not observable here without a worker hook; the 2nd-NIC install is "
           "the ACK's send time plus the NIC's own miss→install clock (estimate).\n")
    if disk["first"]:
        a, b = np.array(disk["first"]), np.array(runs["passive"]["first"])
        summary["passive_journal_on_disk"] = {"connections": disk["connections"],
                                              "first_receiver_received_us": (round(float(a[:, 1].mean()), 1),
                                                                             round(float(a[:, 1].std()), 1)),
                                              "first_return_us": (round(float(a[:, 3].mean()), 1),
                                                                  round(float(a[:, 3].std()), 1))}
        md += (f"\nWith the NICs' block journal on disk (/tmp) instead of tmpfs, {disk['connections']} connections: "
               f"the first packet reaches the receiver after {a[:, 1].mean():.0f} ± {a[:, 1].std():.0f} µs (tmpfs: "
               f"{b[:, 1].mean():.0f} ± {b[:, 1].std():.0f} µs): a new port block is journaled and fsync'ed before its "
               "first use (invariant 6), and that fsync lands on the first packet.\n")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    for install, r in runs.items():
        for kind, ls in (("first", "-"), ("later", "--")):
            if r[kind]:
                x = np.sort(np.array(r[kind])[:, 3] - np.array(r[kind])[:, 2])
                ax.plot(x, np.arange(1, len(x) + 1) / len(x), ls, label=f"{install}, {kind} reply")
    ax.set_xscale("log")
    ax.set_xlabel("ACK sent → back at sender (µs)")
    ax.set_ylabel("CDF")
    ax.set_title("Table I: return path of the first and a later reply")
    ax.legend(fontsize=8)
    runs["passive_journal_on_disk"] = disk
    data = {"machine": machine(), "quick": quick, "paper": PAPER_TABLE1, "summary": summary, "runs": runs}
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
