"""Periodic and control work of the RuleAgent against the size of its tables.

An activity report, the owner's handling of one, and one ``hypernat ctl rule`` query
must cost time proportional to what they touch, not to the clones and leases held: they
run on the packet loop (a report every activity interval), and a stall there overflows
the rings and times out the other NICs' fetches.

report   ``RuleAgent.report_activity`` with REPORTED clone entries (collected from the
         tables, as the sliced collection round hands them over), the agent holding
         SMALL and then BIG clones.  extra_info ``ms`` per report at each size and
         ``ratio`` (big / small): ~1 when the cost follows the entries reported.
owner    ``RuleAgent.on_message(ACTIVITY)`` of REPORTED records at an owner that granted
         SMALL / BIG leases (lease renewal + LEASE answer): ``ms``, ``ratio``.
query    ``NicWorker._rule_info`` of one external endpoint at a NIC holding SMALL / BIG
         clones and leases: ``us``, ``ratio``.
round    one whole activity round over HELD clones, reported in slices of SLICE entries
         as the loop does (``activity_entries``): the holder's ``report_activity``, the
         owner's ACTIVITY handling (merge, lease grant, ACTIVITY_ACK + LEASE), the holder's
         LEASE and ACTIVITY_ACK handling -- ``us_per_clone`` per side (``round`` only
         from the command line: ``bench_activity.py round [held] [slice]``).
expiry   one loop turn's ``RuleAgent.tick`` in which one clone's lease runs out (and one
         lease granted ends), at a NIC holding SMALL / BIG clones and leases whose
         ends are still far: ``us``, ``ratio``.

The two sizes run in the same process, one after the other, so the ratio compares like
with like on a shared machine.  ``pytest benchmarks --benchmark-disable`` runs each once
with small sizes (a few seconds in all); the full sizes (10^4 vs 10^6 by default:
HYPERNAT_BENCH_CLONES_SMALL / _BIG, HYPERNAT_BENCH_REPORTED) take ~1 GB and a minute:

    .venv/bin/python -m pytest benchmarks/bench_activity.py -s
    .venv/bin/python benchmarks/bench_activity.py [big] [small] [reported]
"""
import gc
import os
import sys
import time
import types

import numpy as np
import pytest

from hypernat import messages as M
from hypernat.agent import AgentParams, RuleAgent
from hypernat.nic.worker import NicWorker
from hypernat.rules import DIR_BIT_IN, SESSION_DTYPE

SMALL = int(os.environ.get("HYPERNAT_BENCH_CLONES_SMALL", "10000"))
BIG = int(os.environ.get("HYPERNAT_BENCH_CLONES_BIG", "1000000"))
REPORTED = int(os.environ.get("HYPERNAT_BENCH_REPORTED", "1000"))
QUICK = (2000, 20000, 500)  # (small, big, reported) under --benchmark-disable
REPEAT = 7  # timed repeats per size; the best one is kept

E0 = 0xC6120000  # 198.18.0.0/16: the clones' external endpoints, 4096 ports per address
I0 = 0x0A000000
R0 = 0xC0000200


def _sk(k: int) -> tuple:
    return (17, I0 + (k >> 8), 1024 + (k & 0xFF), E0 + (k >> 12), 1024 + (k & 0xFFF), R0 + (k & 0xFF), 53)


def _rules(sks, rule_id, lease_ms):
    """RULE records (as NIC 0 answers) for the session identities `sks`."""
    recs = M.records(M.T_RULE, len(sks))
    for k, f in enumerate(("proto", "int_addr", "int_port", "ext_addr", "ext_port", "rem_addr", "rem_port")):
        recs[f] = [sk[k] for sk in sks]
    recs["rule_id"], recs["lease_ms"] = rule_id, lease_ms
    return recs


class _Rules:
    """The builder surface the agent calls here: every install succeeds, nothing else kept."""

    def install_clones(self, recs, now, dirs=3, lease_until=0, idx=None, owners=None):
        return np.ones(len(recs) if idx is None else len(idx), np.int8)

    def hold_many(self, eps):
        pass

    def release_hold(self, p, e, ep):
        pass

    def release_many(self, ekeys):
        pass

    def recover_sessions(self, recs, now):
        return np.zeros(len(recs), bool)

    def merge_activity(self, recs, now=None):
        return len(recs)

    def lookup_external(self, p, e, ep):
        return None

    def remove_clone(self, recs):
        return 1

    def drain_created(self):
        return np.zeros(0, SESSION_DTYPE)

    drain_removed = drain_created


def _agent(nic: int, send=None):
    sent = []
    ag = RuleAgent(nic, 2, _Rules(), send or (lambda t, m, r: sent.append(len(r))), lambda a, p: 1 - nic,
                   lambda d, f: None, AgentParams(lease_s=30.0), clock=lambda: 0.0, tick_clock=lambda: 1000)
    return ag, sent


def holder(n: int, send=None):
    """An agent (NIC 1) holding n clones of NIC 0's sessions, installed as RULE answers are."""
    ag, _ = _agent(1, send)
    for lo in range(0, n, 4096):
        ks = range(lo, min(n, lo + 4096))
        ag._install_many(0, _rules([_sk(k) for k in ks], [k + 1 for k in ks], 30000), None, DIR_BIT_IN, 0.0)
    return ag


def owner(n: int, send=None):
    """An agent (NIC 0) that granted n leases to NIC 1."""
    ag, _ = _agent(0, send)
    for lo in range(0, n, 4096):
        ag._grant_many([_sk(k) for k in range(lo, min(n, lo + 4096))], 1, 0.0)
    return ag


def entries(n_held: int, k: int) -> np.ndarray:
    """k in-table clone entries hit since the last report (what collect_activity returns),
    spread over the clones held."""
    idx = np.linspace(0, n_held - 1, k).astype(np.int64)
    act = np.zeros(k, SESSION_DTYPE)
    for j, x in enumerate(idx.tolist()):
        p, i, ip, e, ep, r, rp = _sk(x)
        act[j] = (i, e, r, ip, ep, rp, p, DIR_BIT_IN, x + 1, 990, 0, 0, 0, 0)
    return act


def activity_records(n_held: int, k: int) -> np.ndarray:
    idx = np.linspace(0, n_held - 1, k).astype(np.int64)
    rec = M.records(M.T_ACTIVITY, k)
    for j, x in enumerate(idx.tolist()):
        p, i, ip, e, ep, r, rp = _sk(x)
        rec[j]["seq"], rec[j]["rule_id"], rec[j]["proto"] = j + 1, x + 1, p
        rec[j]["int_addr"], rec[j]["int_port"], rec[j]["ext_addr"], rec[j]["ext_port"] = i, ip, e, ep
        rec[j]["rem_addr"], rec[j]["rem_port"] = r, rp
    return rec


def _best(fn, repeat=REPEAT) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _sizes(quick: bool) -> tuple:
    return QUICK if quick else (SMALL, BIG, REPORTED)


def measure_report(n: int, k: int) -> float:
    ag = holder(n)
    act = entries(n, k)
    assert ag.report_activity(1.0, act) == k  # every entry found its clone
    t = _best(lambda: ag.report_activity(1.0, act))
    del ag
    gc.collect()
    return t


def measure_owner(n: int, k: int) -> float:
    ag = owner(n)
    recs = activity_records(n, k)
    ag.on_message(1, M.T_ACTIVITY, recs, 1.0)
    assert ag.counters["activity_unknown"] == 0
    t = _best(lambda: ag.on_message(1, M.T_ACTIVITY, recs, 1.0))
    del ag
    gc.collect()
    return t


def measure_query(n: int) -> float:
    """One ctl rule query (all protocols) at a NIC holding n clones and n leases."""
    ag = holder(n)
    for lo in range(0, n, 4096):
        ag._grant_many([_sk(k)[:3] + (E0 + 0x1000 + (k >> 12), 1024 + (k & 0xFFF)) + _sk(k)[5:]
                        for k in range(lo, min(n, lo + 4096))], 0, 0.0)
    w = types.SimpleNamespace(agent=ag, rules=_Rules(), clock=lambda: 0.0)
    p, i, ip, e, ep, r, rp = _sk(n // 2)
    assert len(NicWorker._rule_info(w, e, ep)) == 1
    t = _best(lambda: NicWorker._rule_info(w, e, ep))
    del ag, w
    gc.collect()
    return t


def measure_expiry(n: int) -> float:
    """A turn in which one clone and one lease end, among n of each still running."""
    ag = holder(n)
    for lo in range(0, n, 4096):
        ag._grant_many([_sk(k) for k in range(lo, min(n, lo + 4096))], 0, 0.0)
    ag._activity_due = float("inf")
    for j in range(REPEAT):  # short ones, ending one after the other
        sk = (6,) + _sk(j)[1:]
        ag._install_many(0, _rules([sk], 1, 1500 + 100 * j), None, DIR_BIT_IN, 0.0)  # ends at 1.0 + 0.1 j (margin 0.5)
        ag._grant_many([sk], 0, 0.1 * j - 30.0)  # until = 0.1 j + grace
    ag.tick(0.0)
    times = []
    for j in range(REPEAT):
        t0 = time.perf_counter()
        ag.tick(1.05 + 0.1 * j)
        times.append(time.perf_counter() - t0)
    assert len(ag.clones) == n and sum(len(h) for h in ag.leases.values()) == n  # the short ones ended
    del ag
    gc.collect()
    return min(times)


def measure_round(n: int, k: int) -> dict:
    """One activity round over n clones (NIC 1 holds n clones of NIC 0's sessions, NIC 0
    granted NIC 1 their leases), reported k entries at a time: seconds per clone spent
    by the holder (report, LEASE, ACTIVITY_ACK) and by the owner (ACTIVITY)."""
    box = {0: [], 1: []}
    h = holder(n, lambda t, m, r: box[t].append((1, m, r)))
    o = owner(n, lambda t, m, r: box[t].append((0, m, r)))
    act = entries(n, n)
    spent = {"holder": 0.0, "owner": 0.0}
    clock = time.perf_counter
    for i in range(0, n, k):
        t0 = clock()
        h.report_activity(1.0, act[i:i + k])
        t1 = clock()
        for src, m, r in box[0]:
            o.on_message(src, m, r, 1.0)
        box[0].clear()
        t2 = clock()
        for src, m, r in box[1]:
            h.on_message(src, m, r, 1.0)
        box[1].clear()
        t3 = clock()
        spent["holder"] += (t1 - t0) + (t3 - t2)
        spent["owner"] += t2 - t1
    assert o.counters["activity_unknown"] == 0 and h.counters["leases_renewed"] == n, (o.counters, h.counters)
    return {side: t / n for side, t in spent.items()}


def _compare(benchmark, fn, args, unit=1e3, name="ms"):
    small, big, k = _sizes(bool(benchmark.disabled))
    res = {}

    def run():
        res["small"] = fn(small, *args(k)) * unit
        res["big"] = fn(big, *args(k)) * unit

    benchmark.pedantic(run, rounds=1, iterations=1)
    ratio = res["big"] / res["small"] if res["small"] > 0 else float("nan")
    benchmark.extra_info.update({f"{name}_small": res["small"], f"{name}_big": res["big"], "ratio": ratio,
                                 "held_small": small, "held_big": big, "reported": k})
    print(f"\n{fn.__name__}: held {small}: {res['small']:.3f} {name}, held {big}: {res['big']:.3f} {name}, "
          f"ratio {ratio:.2f} ({k} reported)")
    return res


@pytest.mark.timeout(600)
def test_activity_report_cost_follows_entries_reported(benchmark):
    _compare(benchmark, measure_report, lambda k: (k,))


@pytest.mark.timeout(600)
def test_owner_renewal_cost_follows_records_received(benchmark):
    _compare(benchmark, measure_owner, lambda k: (k,))


@pytest.mark.timeout(600)
def test_rule_query_cost_follows_matches(benchmark):
    _compare(benchmark, measure_query, lambda k: (), unit=1e6, name="us")


@pytest.mark.timeout(600)
def test_lease_expiry_turn_cost_follows_what_expires(benchmark):
    _compare(benchmark, measure_expiry, lambda k: (), unit=1e6, name="us")


if __name__ == "__main__":
    if sys.argv[1:2] == ["round"]:
        held = int(sys.argv[2]) if len(sys.argv) > 2 else 100000
        k = int(sys.argv[3]) if len(sys.argv) > 3 else 32
        best = None
        for _ in range(3):
            got = measure_round(held, k)
            best = got if best is None or sum(got.values()) < sum(best.values()) else best
        print(f"round over {held} clones, {k} per report: holder {best['holder'] * 1e6:.3f} us/clone, "
              f"owner {best['owner'] * 1e6:.3f} us/clone, both {sum(best.values()) * 1e6:.3f} us/clone")
        sys.exit(0)
    big = int(sys.argv[1]) if len(sys.argv) > 1 else BIG
    small = int(sys.argv[2]) if len(sys.argv) > 2 else SMALL
    k = int(sys.argv[3]) if len(sys.argv) > 3 else REPORTED
    for label, fn, a, unit in (("report (ms)", measure_report, (k,), 1e3), ("owner (ms)", measure_owner, (k,), 1e3),
                               ("query (us)", measure_query, (), 1e6), ("expiry (us)", measure_expiry, (), 1e6)):
        s, b = fn(small, *a) * unit, fn(big, *a) * unit
        print(f"{label:12s} held {small}: {s:10.3f}   held {big}: {b:10.3f}   ratio {b / s:7.2f}")
