"""The NIC worker's optional event log (hypernat.nic.events): off it keeps nothing and
changes nothing; on it records a split connection's events, in causal order, with one
system-wide clock; the ring stays bounded; Table I is built from it."""
import time

import numpy as np
import pytest

from hypernat.lab.emulated import UDP, build_frame, emulated_config, parse_frame
from hypernat.nic import events as E
from hypernat.nic.worker import spin
from hypernat.rules import DIR_BIT_IN, DIR_BIT_OUT, SESSION_DTYPE
from hypernat.verdicts import IN, OUT
from nickit import nics

pytestmark = pytest.mark.timeout(60)

I1 = 0x0A00000A  # 10.0.0.10
R1 = 0xC0000205  # 192.0.2.5


def two_nics(tmp_path, logs):
    cfg = emulated_config(2, mapping="address-and-port-dependent")
    return nics(cfg, 2, tmp_path, worker_kw=[{"events": log} for log in logs])


def split_connection(ws):
    """A UDP query out through NIC 0, its answers back through NIC 1 (passive install),
    then a second answer that hits NIC 1's clone.  Returns the external endpoint and the
    monotonic times at which each frame was handed to a NIC."""
    (w0, in0, out0), (w1, in1, out1) = ws
    t = {"query": time.monotonic_ns()}
    in0.inject([build_frame(UDP, I1, 40001, R1, 53, payload=b"query")])
    assert spin([w0, w1], lambda: len(out0._tx) == 1)
    p = parse_frame(out0.take_tx()[0])
    t["answer"] = time.monotonic_ns()
    out1.inject([build_frame(UDP, R1, 53, p.src, p.sport, payload=b"answer")])
    assert spin([w0, w1], lambda: len(in1._tx) == 1)
    in1.take_tx()
    t["again"] = time.monotonic_ns()
    out1.inject([build_frame(UDP, R1, 53, p.src, p.sport, payload=b"again")])
    assert spin([w0, w1], lambda: len(in1._tx) == 1)
    return p.src, p.sport, t


def test_off_keeps_nothing_and_wraps_nothing(tmp_path):
    with two_nics(tmp_path, [None, None]) as (_, ws):
        split_connection(ws)
        for w, _, _ in ws:
            assert w.events is None
            # no hook installed: the builder's own method, not a recording wrapper
            assert "install_clones" not in vars(w.rules)
        assert ws[1][0].agent.counters["clones_installed"] == 1  # the connection did split


def test_on_records_a_split_connection_in_causal_order(tmp_path):
    logs = [E.EventLog(1024, hits=True), E.EventLog(1024, hits=True)]
    with two_nics(tmp_path, logs) as (_, ws):
        ea, ep, t = split_connection(ws)
        for w, _, _ in ws:
            # the log is fed by the agent's declared observer: no builder method replaced
            # (main wrapped rules.install_clone_rows with an instance attribute)
            assert not [k for k in vars(w.rules) if k.startswith("install_clone")]
            assert w.rules.install_clones.__func__ is type(w.rules).install_clones
    out_key = (UDP, I1, 40001, R1, 53)
    in_key = (UDP, R1, 53, ea, ep)
    e0, e1 = logs[0].snapshot(), logs[1].snapshot()
    for e in (e0, e1):
        assert len(e) and np.all(np.diff(e["t_ns"]) >= 0)  # one clock, appended in time order
    # NIC 0, the owner: the query missed, the rule was built, the query replayed
    k0 = [(E.KIND_NAMES[x["kind"]], int(x["dir"])) for x in e0
          if (x["proto"], x["saddr"], x["sport"], x["daddr"], x["dport"]) == out_key]
    assert k0 == [("rx_miss", OUT), ("rule_built", OUT), ("replay_sent", OUT)]
    # NIC 1, the holder: the answer missed, a FETCH, the clone installed, the answer
    # replayed; the second answer hit
    k1 = [(E.KIND_NAMES[x["kind"]], int(x["dir"])) for x in e1
          if (x["proto"], x["saddr"], x["sport"], x["daddr"], x["dport"]) == in_key]
    assert k1 == [("rx_miss", IN), ("fetch_sent", IN), ("clone_installed", IN), ("replay_sent", IN),
                  ("rx_hit", IN)]
    # across processes' clock: each arrival after its injection, each NIC after the other's cause
    a0 = E.find(e0, E.RX_MISS, *out_key)
    r0 = E.find(e0, E.REPLAY_SENT, *out_key)
    a1 = E.find(e1, E.RX_MISS, *in_key)
    c1 = E.find(e1, E.CLONE_INSTALLED, *in_key)
    h1 = E.find(e1, E.RX_HIT, *in_key)
    assert t["query"] <= a0 < r0 <= t["answer"] <= a1 < c1 <= t["again"] <= h1
    assert E.find(e1, E.RX_HIT, *in_key, after_ns=h1 + 1) is None
    assert logs[0].dropped == logs[1].dropped == 0


def test_misses_only_by_default(tmp_path):
    logs = [E.EventLog(1024), E.EventLog(1024)]
    with two_nics(tmp_path, logs) as (_, ws):
        split_connection(ws)
    e = np.concatenate([logs[0].snapshot(), logs[1].snapshot()])
    assert not (e["kind"] == E.RX_HIT).any()  # hit batches record nothing without hits=True
    assert (e["kind"] == E.RX_MISS).sum() == 2


def test_ring_is_bounded_and_keeps_the_newest_oldest_first():
    log = E.EventLog(4)
    k = np.zeros(10, E.EVENT_DTYPE)
    k["sport"] = np.arange(10)
    log.add_keys(E.RX_MISS, OUT, 5, k[:3])
    log.add_keys(E.RX_MISS, OUT, 6, k[3:10])
    assert len(log) == 4 and log.dropped == 6 and log.total == 10
    s = log.snapshot()
    assert s["sport"].tolist() == [6, 7, 8, 9] and s["t_ns"].tolist() == [6, 6, 6, 6]
    log.add_keys(E.RX_MISS, OUT, 7, k[:0])  # nothing: no change
    assert log.total == 10
    with pytest.raises(ValueError):
        E.EventLog(0)


def test_clone_events_one_per_installed_direction_with_that_directions_key():
    log = E.EventLog(16)
    r = np.zeros(3, SESSION_DTYPE)
    r["proto"], r["iaddr"], r["iport"], r["eaddr"], r["eport"], r["raddr"], r["rport"] = 6, I1, 1000, 7, 2000, R1, 80
    r["iport"][1], r["iport"][2] = 1001, 1002
    dirs = np.array([DIR_BIT_IN, DIR_BIT_OUT | DIR_BIT_IN, DIR_BIT_OUT], np.uint8)
    log.add_clones(r, dirs, np.array([0, 1]), 42)  # the third was refused
    s = log.snapshot()
    got = sorted((int(x["dir"]), int(x["saddr"]), int(x["sport"]), int(x["daddr"]), int(x["dport"])) for x in s)
    assert got == sorted([(IN, R1, 80, 7, 2000), (IN, R1, 80, 7, 2000), (OUT, I1, 1001, R1, 80)])
    assert (s["kind"] == E.CLONE_INSTALLED).all() and (s["t_ns"] == 42).all()


def test_table1_run_fills_every_row_from_real_timestamps():
    from hypernat.eval import latency

    r = latency.table1_run("passive", 3)
    assert r["connections"] == 3 and r["events_dropped"] == 0
    assert r["rows"] == [row[0] for row in latency.PAPER_TABLE1]
    for first, later in zip(r["first"], r["later"]):
        assert None not in first and None not in later
        t0, arr1, inst1, recv, ack, arr2, inst2, back = first
        assert t0 == 0 < arr1 <= inst1 <= recv <= ack <= arr2 <= inst2 <= back  # passive: install after the miss
        t0, arr1, inst1, recv, ack, arr2, inst2, back = later
        assert arr1 == inst1 and arr2 == inst2  # a later pair hits: installed = arrived
        assert 0 < arr1 <= recv <= ack <= arr2 <= back


def test_rule_records_log_what_session_records_log():
    """The agent's observer hands the event log a RULE message's records as received
    (the wire layout): the same events as add_clones on the equivalent SESSION_DTYPE
    records."""
    from hypernat import messages as M
    from hypernat.rules import SESSION_DTYPE

    sks = [(17, 0x0A000001, 4000, 0xC6120001, 2000, 0xC0000201, 53),
           (6, 0x0A000002, 4001, 0xC6120001, 2001, 0xC0000202, 443),
           (17, 0x0A000003, 4002, 0xC6120001, 2002, 0xC0000203, 53)]
    dirs = np.array([3, DIR_BIT_IN, 1], np.uint8)
    rule = M.records(M.T_RULE, 3)
    ses = np.zeros(3, SESSION_DTYPE)
    for k, (w, n) in enumerate((("proto", "proto"), ("int_addr", "iaddr"), ("int_port", "iport"), ("ext_addr", "eaddr"),
                                ("ext_port", "eport"), ("rem_addr", "raddr"), ("rem_port", "rport"))):
        rule[w] = ses[n] = [sk[k] for sk in sks]
    a, b = E.EventLog(64), E.EventLog(64)
    a.add_clones(rule, dirs, np.array([0, 1]), 7)  # the third was refused
    b.add_clones(ses, dirs, [0, 1], 7)
    assert len(a.snapshot()) == 3 and a.snapshot().tobytes() == b.snapshot().tobytes()
    got_keys = sorted((int(e["dir"]), int(e["proto"]), int(e["saddr"]), int(e["sport"]), int(e["daddr"]),
                       int(e["dport"])) for e in a.snapshot())
    assert got_keys == sorted([(OUT, 17, 0x0A000001, 4000, 0xC0000201, 53), (IN, 17, 0xC0000201, 53, 0xC6120001, 2000),
                               (IN, 6, 0xC0000202, 443, 0xC6120001, 2001)])  # dirs 2 = DIR_BIT_IN
