"""Crash recovery from clones (invariant 6), expiry and exhaustion counters.

Unit tests drive ``RuleBuilder.recover_sessions`` directly: a builder builds sessions
(its journal recorded in a list), "crashes" (a fresh builder over empty tables, the
journal's blocks quarantined), then reads holders' reports.  What must hold:

* a reported session comes back with its external endpoint, both entries, its
  host's block;
* nothing that was handed out before the crash and not recovered is handed out again
  before the quarantine's end -- new connections of the same hosts allocate around it;
* a report the journal contradicts (other host) or that conflicts with a binding made
  since the restart is refused and counted, never half-applied;
* after the quarantine's end everything unrecovered is free again and the bookkeeping
  adds up (the same consistency check as tests/test_rules.py, reservations included).

The end-to-end crash (SIGKILL of a NIC worker process of the emulated deployment while
its connections have clones on the other NIC) is at the bottom; it reuses the
machinery of tests/test_faults.py.
"""
import ipaddress
import json
import logging
import signal

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hypernat import config, layout
from hypernat import messages as M
from hypernat.fastpath import FlowTable
from hypernat.nic.journal import live_blocks
from hypernat.rules import ACT_DROP, ACT_REPLAY, REASON, SESSION_DTYPE, RuleBuilder, out_key
from hypernat.verdicts import OUT, VERDICT

TCP, UDP, ICMP = 6, 17, 1
SYN, ACK, FIN, RST = layout.TCP_SYN, layout.TCP_ACK, layout.TCP_FIN, layout.TCP_RST
PIDX = {TCP: 0, UDP: 1, ICMP: 2}
R1, R2 = int(ipaddress.IPv4Address("8.8.8.8")), int(ipaddress.IPv4Address("1.1.1.1"))
QUARANTINE_END = 5000


def ip(s) -> int:
    return int(ipaddress.IPv4Address(s))


def make_cfg(n_nics=2, pool="198.18.77.0/31", ports=(1024, 1087), block=8, cap=64, mapping="endpoint-independent"):
    return config.from_dict({
        "internal": {"prefixes": ["10.77.0.0/16"]},
        "external": {"pool": [pool], "ports": list(ports)},
        "nics": [{"id": i, "inside": f"in{i}", "outside": f"out{i}"} for i in range(n_nics)],
        "mapping": mapping,
        "timeouts": dict(udp=30, tcp_established=100, tcp_transitory=20, icmp=10, reuse_delay=15, force=True),
        "limits": {"port_block_size": block, "ports_per_host": cap, "flow_table_capacity": 4096},
    }, "test.yaml")  # fmt: skip


def make_rb(cfg, nic=0, seed=1, capacity=4096, **kw):
    return RuleBuilder(cfg, nic, FlowTable(capacity), FlowTable(capacity), rng=np.random.default_rng(seed), **kw)


def miss(rb, rows, now):
    k = np.zeros(len(rows), layout.KEY_DTYPE)
    for i, r in enumerate(rows):
        p, s, sp, d, dp = r[:5]
        k[i] = (s, d, sp, dp, p, layout.KIND_PLAIN, r[5] if len(r) > 5 else 0, 0)
    return rb.handle_misses(OUT, np.full(len(rows), VERDICT["miss_out"], np.uint8), k, now)


def hosts_of(rb, n, start=1):
    out, i = [], start
    while len(out) < n:
        h = ip("10.77.0.0") + i
        if rb.part.eim_owner(h) == rb.nic:
            out.append(h)
        i += 1
    return out


def sessions_of(rb) -> np.ndarray:
    """Every session of rb as SESSION_DTYPE (the owner's view, as holders report it)."""
    parts = [rb.export_rule(m.proto, m.eaddr, m.eport) for m in list(rb.mappings())]
    return np.concatenate(parts) if parts else np.zeros(0, SESSION_DTYPE)


def crash(rb, journal, seed=2):
    """A fresh builder for the same NIC, its journal's blocks quarantined as the worker does."""
    rb2 = make_rb(rb.config, rb.nic, seed=seed)
    live = live_blocks(journal)  # the journal's own replay: {block: host}
    rb2.quarantine_blocks({g: h for g, h in live.items() if h is not None}, QUARANTINE_END)
    return rb2


def ext_of(rb, rec):
    e = rb.out.get(*out_key(int(rec["proto"]), int(rec["iaddr"]), int(rec["iport"]), int(rec["raddr"]),
                            int(rec["rport"])))  # fmt: skip
    return None if e is None else (int(e["new_addr"]), int(e["new_port"]))


def check_consistency(rb):
    """Every bit set in a block is a live mapping, an endpoint waiting for reuse, a held
    one, or reserved by a recovery; tables hold exactly the live sessions."""
    bits = set()
    bl = rb.blocks
    for g in bl.ids():
        size = bl.span(g)[2]
        for pi in range(3):
            used = bl.used_mask(g, pi)
            assert bin(used).count("1") == bl.n_used(g, pi)
            bits |= {(g, pi, off) for off in range(size) if used >> off & 1}
        assert sum(bl.n_used(g, pi) for pi in range(3)) > 0
    live = {(m.block, PIDX[m.proto], m.eport - bl.lo(m.block)) for m in rb.mappings()}
    waiting = {(g, pi, off) for _, _, g, pi, off in rb.pool.waiting()} | set(rb.pool.held().values())
    reserved = {(g, pi, off) for g, (_, ms) in rb.pool.reserved_ports().items() for pi in range(3)
                for off in range(rb.part.block_size) if ms[pi] >> off & 1}  # fmt: skip
    assert not live & waiting and not live & reserved and not waiting & reserved
    assert bits == live | waiting | reserved
    assert len(rb.out) == len(rb.inn) == rb.stats()["sessions"] == sum(len(m.remotes) for m in rb.mappings())
    assert not set(rb.pool.quarantined()) & set(rb.blocks)  # a quarantined block is nobody's


def build_before(cfg, n_hosts=3, per_host=5, seed=1):
    journal = []
    rb = make_rb(cfg, 0, seed=seed, journal=journal.append)
    hosts = hosts_of(rb, n_hosts)
    rows = [(p, h, 5000 + i, R1, 80 if p == TCP else 53) for h in hosts for i in range(per_host) for p in (TCP, UDP)]
    assert (miss(rb, rows, 10).action == ACT_REPLAY).all()
    return rb, journal, hosts


# ---------------------------------------------------------------------------------------
# recover_sessions


@pytest.mark.parametrize("mapping", ["endpoint-independent", "address-and-port-dependent"])
def test_reported_sessions_come_back_with_their_endpoints(mapping):
    cfg = make_cfg(mapping=mapping)
    before, journal, hosts = build_before(cfg)
    recs = sessions_of(before)
    assert len(recs) == 30
    recs["last_seen"] = 40
    rb = crash(before, journal)
    assert rb.stats()["blocks_quarantined"] == len(before.blocks)
    ok = rb.recover_sessions(recs, 50)
    assert ok.all()
    for r in recs:
        assert ext_of(rb, r) == (int(r["eaddr"]), int(r["eport"]))
        info = rb.lookup_external(int(r["proto"]), int(r["eaddr"]), int(r["eport"]))
        assert (info["iaddr"], info["iport"]) == (int(r["iaddr"]), int(r["iport"]))
    assert len(rb.out) == len(rb.inn) == 30
    c = rb.counters_dict()
    assert c["recovered_sessions"] == 30 and c["recovered_mappings"] == 30
    assert c["recovered_blocks"] == len(before.blocks)
    assert rb.stats()["blocks_quarantined"] == 0  # every journaled block had a rule reported
    check_consistency(rb)
    # the holder's last_seen was merged: the sessions expire from there, not from `now`
    slot = rb.out.get(*out_key(int(recs[0]["proto"]), int(recs[0]["iaddr"]), int(recs[0]["iport"]),
                               int(recs[0]["raddr"]), int(recs[0]["rport"])))  # fmt: skip
    assert int(slot["last_seen"]) == 40
    # a second report of the same sessions (a periodic ACTIVITY) changes nothing
    assert rb.recover_sessions(recs, 51).all()
    assert rb.counters_dict()["recovered_sessions"] == 30 and len(rb.out) == 30
    check_consistency(rb)


def test_unreported_endpoints_stay_reserved_until_the_quarantine_ends():
    cfg = make_cfg()
    before, journal, hosts = build_before(cfg, per_host=6)
    recs = sessions_of(before)
    handed = {(int(r["proto"]), int(r["eaddr"]), int(r["eport"])): (int(r["iaddr"]), int(r["iport"])) for r in recs}
    reported = recs[::3]  # a third had a clone somewhere; the rest went down with the NIC
    rb = crash(before, journal)
    assert rb.recover_sessions(reported, 50).all()
    # the same hosts open many new connections before the quarantine's end: none of
    # them may get an endpoint that belonged to someone before the crash
    rows = [(p, h, 7000 + i, R2, 443) for h in hosts for i in range(20) for p in (TCP, UDP)]
    d = miss(rb, rows, 60)
    assert (d.action == ACT_REPLAY).sum() > 0
    for (p, h, sp, r, rp), a in zip(rows, d.action):
        if a != ACT_REPLAY:
            continue
        e = ext_of(rb, dict(proto=p, iaddr=h, iport=sp, raddr=r, rport=rp))
        assert (p,) + e not in handed, "an endpoint of a lost session was handed out before its timeout"
    # the recovered host kept one external address (paired pooling)
    for h in hosts:
        assert len({m.eaddr for m in rb.mappings() if m.iaddr == h}) == 1
    check_consistency(rb)
    # at the quarantine's end the reservations go; the bookkeeping still adds up
    for now in (QUARANTINE_END - 1, QUARANTINE_END):
        rb.sweep(now, max_slots=1 << 20, max_expire=1 << 20, budget_us=1e12)
    assert rb.stats()["blocks_reserved"] == 0
    check_consistency(rb)


def test_journal_host_mismatch_and_conflicts_are_refused_and_counted(caplog):
    cfg = make_cfg()
    before, journal, hosts = build_before(cfg, n_hosts=2, per_host=2)
    recs = sessions_of(before)
    rb = crash(before, journal)
    # 1. a report naming another internal host for a journaled block
    forged = recs[:1].copy()
    other = [h for h in hosts_of(rb, 5) if h not in hosts][0]
    forged["iaddr"] = other
    with caplog.at_level(logging.WARNING, logger="hypernat.rules"):
        assert not rb.recover_sessions(forged, 50).any()
    assert rb.counters_dict()["recovery_lost_host_mismatch"] == 1
    assert "recovery_lost_host_mismatch" in caplog.text
    assert rb.stats()["blocks_quarantined"] == len(before.blocks) and len(rb.out) == 0
    # 2. EIM: the internal endpoint of a lost session spoke again before any report
    r0 = recs[recs["iaddr"] == hosts[0]][0]
    p, h, sp = int(r0["proto"]), int(r0["iaddr"]), int(r0["iport"])
    assert miss(rb, [(p, h, sp, R2, 443)], 50).action[0] == ACT_REPLAY
    new_e = ext_of(rb, dict(proto=p, iaddr=h, iport=sp, raddr=R2, rport=443))
    assert new_e != (int(r0["eaddr"]), int(r0["eport"]))
    ok = rb.recover_sessions(recs, 51)
    assert not ok[np.flatnonzero((recs["iaddr"] == h) & (recs["iport"] == sp) & (recs["proto"] == p))].any()
    assert rb.counters_dict()["recovery_lost_conflict"] >= 1
    assert ok.sum() == len(recs) - 1  # the others came back
    # the refused one's endpoint is not handed to anyone before the quarantine's end
    assert rb.lookup_external(p, int(r0["eaddr"]), int(r0["eport"])) is None
    g = rb.part.block_of(int(r0["eaddr"]), int(r0["eport"]))
    assert rb.blocks.is_used(g, PIDX[p], int(r0["eport"]) - rb.blocks.lo(g))
    check_consistency(rb)


def test_reports_outside_a_quarantine_are_left_alone():
    """The ordinary case: ACTIVITY for a session that expired here.  No quarantine: nothing
    happens, nothing is counted (the agent calls this on every ACTIVITY)."""
    cfg = make_cfg()
    rb, journal, hosts = build_before(cfg, per_host=2)
    recs = sessions_of(rb)
    fresh = make_rb(cfg, 0)
    c0 = fresh.counters_dict()
    assert not fresh.recover_sessions(recs, 50).any()
    assert fresh.counters_dict() == c0 and len(fresh.out) == 0
    # a builder that has a quarantine, but for other blocks: the same
    fresh.quarantine_blocks([max(rb.blocks) + 1], QUARANTINE_END)
    assert not fresh.recover_sessions(recs, 50).any() and len(fresh.out) == 0


def test_unrecovered_quarantine_ends_at_its_time_and_is_counted():
    cfg = make_cfg()
    before, journal, hosts = build_before(cfg, n_hosts=1, per_host=2)
    rb = crash(before, journal)
    q = rb.stats()["blocks_quarantined"]
    assert q > 0
    rb.sweep(QUARANTINE_END - 1)
    assert rb.stats()["blocks_quarantined"] == q and rb.counters_dict()["recovery_blocks_expired"] == 0
    rb.sweep(QUARANTINE_END)
    assert rb.stats()["blocks_quarantined"] == 0 and rb.counters_dict()["recovery_blocks_expired"] == q
    # late reports are not recovered any more (the endpoints may be anyone's now)
    assert not rb.recover_sessions(sessions_of(before), QUARANTINE_END + 1).any()


def test_snapshot_keeps_the_recovery_state():
    cfg = make_cfg()
    before, journal, hosts = build_before(cfg)
    recs = sessions_of(before)
    rb = crash(before, journal)
    assert rb.recover_sessions(recs[::2], 50).all()
    state = json.loads(json.dumps(rb.snapshot()))
    rb2 = make_rb(cfg, 0, seed=5)
    rb2.out.load_slots(rb.out.slots.copy())
    rb2.inn.load_slots(rb.inn.slots.copy())
    rb2.restore(state)
    assert rb2.stats() == rb.stats() and rb2.counters_dict() == rb.counters_dict()
    check_consistency(rb2)
    assert rb2.recover_sessions(recs[1::2], 60).sum() > 0  # the rest can still come back
    check_consistency(rb2)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**32 - 1), st.lists(st.booleans(), min_size=36, max_size=36),
       st.sampled_from(["endpoint-independent", "address-and-port-dependent"]), st.integers(0, 60))
def test_property_no_endpoint_of_the_crashed_nic_is_reused_early(seed, reported, mapping, n_new):
    """Random sessions, a random subset reported, random new traffic from the same and
    other hosts before the quarantine's end: recovered sessions keep their endpoints, no
    other pre-crash endpoint is handed out, bookkeeping adds up; after the end, it
    still adds up and everything can expire."""
    cfg = make_cfg(mapping=mapping)
    before, journal, hosts = build_before(cfg, n_hosts=3, per_host=6, seed=seed % 1000 + 1)
    recs = sessions_of(before)
    handed = {(int(r["proto"]), int(r["eaddr"]), int(r["eport"])) for r in recs}
    sel = np.array(reported[: len(recs)], bool)
    rb = crash(before, journal, seed=seed % 997 + 3)
    rng = np.random.default_rng(seed)
    more_hosts = hosts + hosts_of(rb, 2, start=200)
    rows = [(int(rng.choice([TCP, UDP])), int(rng.choice(more_hosts)), int(rng.integers(5000, 5012)), R2, 443)
            for _ in range(n_new)]  # fmt: skip
    half = len(rows) // 2
    miss(rb, rows[:half], 30)  # some traffic before the reports arrive ...
    ok = rb.recover_sessions(recs[sel], 40)
    miss(rb, rows[half:], 45)  # ... and some after
    check_consistency(rb)
    for r, good in zip(recs[sel], ok):
        if good:
            assert ext_of(rb, r) == (int(r["eaddr"]), int(r["eport"]))
    recovered = {(int(r["proto"]), int(r["eaddr"]), int(r["eport"])) for r in recs[sel][ok]}
    for m in rb.mappings():
        e = (m.proto, m.eaddr, m.eport)
        assert e not in handed or e in recovered, e
    rb.sweep(QUARANTINE_END, max_slots=1 << 20, max_expire=1 << 20, budget_us=1e12)
    check_consistency(rb)
    for t in (QUARANTINE_END + 10_000, QUARANTINE_END + 20_000):
        rb.sweep(t, max_slots=1 << 20, max_expire=1 << 20, budget_us=1e12)
        rb.sweep(t, max_slots=1 << 20, max_expire=1 << 20, budget_us=1e12)
    check_consistency(rb)
    assert len(rb.out) == 0 and not rb.blocks and not rb.hosts


# ---------------------------------------------------------------------------------------
# Expiry counters and exhaustion causes


def test_expiry_counted_by_protocol_and_state():
    cfg = make_cfg(n_nics=1)
    rb = make_rb(cfg)
    (h,) = hosts_of(rb, 1)
    rows = [(TCP, h, 5000, R1, 80, SYN), (TCP, h, 5001, R1, 80, SYN), (TCP, h, 5002, R1, 80, SYN),
            (UDP, h, 5003, R1, 53), (UDP, h, 5004, R1, 53), (ICMP, h, 77, R1, 77)]  # fmt: skip
    assert (miss(rb, rows, 10).action == ACT_REPLAY).all()
    # 5000: SYN both ways -> established; 5001: FIN -> transitory; 5002: SYN out only -> transitory
    for sp, fl_out, fl_in in ((5000, SYN, SYN), (5001, SYN, SYN | FIN), (5002, SYN, 0)):
        j = rb.out.lookup(*out_key(TCP, h, sp, R1, 80))
        rb.out.slots["tcp_state"][j] = fl_out
        e = (int(rb.out.slots["new_addr"][j]), int(rb.out.slots["new_port"][j]))
        ji = rb.inn.lookup(TCP, R1, 80, *e)
        rb.inn.slots["tcp_state"][ji] = fl_in
    big = dict(max_slots=1 << 20, max_expire=1 << 20, budget_us=1e12)
    rb.sweep(10 + 25, **big)  # > transitory 20, icmp 10; < udp 30, established 100
    c = rb.counters_dict()
    assert (c["expired_tcp_transitory"], c["expired_icmp"], c["expired_udp"], c["expired_tcp_established"]) == (
        2, 1, 0, 0)
    rb.sweep(10 + 35, **big)
    assert rb.counters_dict()["expired_udp"] == 2 and rb.counters_dict()["expired_tcp_established"] == 0
    rb.sweep(10 + 101, **big)
    assert rb.counters_dict()["expired_tcp_established"] == 1 and len(rb.out) == 0


def test_host_address_full_is_refused_counted_and_logged(caplog):
    """Paired pooling: a host whose address has no free block gets no port elsewhere."""
    cfg = make_cfg(n_nics=1, pool="198.18.77.0/31", ports=(1024, 1039), block=8, cap=64)
    rb = make_rb(cfg)
    h1, h2, h3, h4 = hosts_of(rb, 4)
    # two addresses x two blocks: h1, h3 on one address, h2, h4 on the other (round robin)
    assert (miss(rb, [(UDP, h, 5000, R1, 53) for h in (h1, h2, h3, h4)], 1).action == ACT_REPLAY).all()
    a1 = rb.lookup_external(UDP, *ext_of(rb, dict(proto=UDP, iaddr=h1, iport=5000, raddr=R1, rport=53)))
    with caplog.at_level(logging.WARNING, logger="hypernat.rules"):
        d = miss(rb, [(UDP, h1, 6000 + i, R1, 53) for i in range(12)], 2)
    assert (d.action == ACT_REPLAY).sum() == 7  # the rest of h1's only block
    assert (d.reason[d.action == ACT_DROP] == REASON["ports_exhausted"]).all()
    c = rb.counters_dict()
    assert c["exhausted_host_address"] == 5 and c["ports_exhausted"] == 5 and c["exhausted_pool"] == 0
    assert "paired pooling" in caplog.text and str(ipaddress.IPv4Address(h1)) in caplog.text
    assert {m.eaddr for m in rb.mappings() if m.iaddr == h1} == {a1["eaddr"]}
    h5 = hosts_of(rb, 5)[-1]
    assert miss(rb, [(UDP, h5, 5000, R1, 53)], 3).action[0] == ACT_DROP
    assert rb.counters_dict()["exhausted_pool"] == 1


def test_counters_dict_names_are_stable():
    rb = make_rb(make_cfg(n_nics=1))
    c = rb.counters_dict()
    for k in ("expired_tcp_established", "expired_udp", "recovered_sessions", "exhausted_host_address",
              "ports_exhausted", "unsolicited_syn"):
        assert c[k] == 0


# ---------------------------------------------------------------------------------------
# End to end: SIGKILL a NIC worker process of the emulated deployment


@pytest.mark.timeout(150)
def test_nic_crash_connections_keep_their_endpoints_through_clones():
    """NIC 0 is killed while its connections run; NIC 1 holds clones of those whose
    other direction it sees.  After the restart NIC 1 reports them, NIC 0 re-adopts
    them: they go on with the same external endpoints in both directions.  New
    connections afterwards never get an endpoint another host had."""
    from hypernat.lab.emulated import TCP as E_TCP, UDP as E_UDP, Emulation, emulated_config, make_conns
    from hypernat.partition import Partition

    cfg = emulated_config(2, mapping="endpoint-independent")
    part = Partition.from_config(cfg)
    emu = Emulation(cfg, rto=0.2, max_tries=40)
    try:
        emu.start()
        conns = make_conns(cfg, 80, packets=2, protos=(E_TCP, E_UDP), seed=61, hosts=12)
        assert emu.run(conns, timeout=40), [c.cid for c in conns if not c.done]
        handed = {(c.proto, *e): (c.iaddr, c.iport) for c in conns for e in c.ext}
        # split connections owned by NIC 0: one direction through NIC 0, the other through
        # NIC 1's clone.  Without recovery their NIC 0 side would miss after the crash.
        split = [c for c in conns if part.eim_owner(c.iaddr) == 0 and len({c.out_nic} | c.in_nics) == 2]
        assert len(split) >= 5, len(split)
        ext_before = {c.cid: set(c.ext) for c in split}
        emu.stop_nic(0, signal.SIGKILL)  # tables gone; journal on disk; NIC 1 keeps its clones
        emu.start_nic(0)
        emu.wait_registered()
        emu.pump_for(1.0)  # NIC 1 sees the new incarnation and reports every clone of NIC 0
        emu.resume(split, 3)
        assert emu.run(timeout=40), [c.cid for c in split if not c.done]
        after = make_conns(cfg, 60, packets=2, protos=(E_TCP, E_UDP), seed=62, hosts=12,
                           remote_net="198.51.100.0/24")
        assert emu.run(after, timeout=40), [c.cid for c in after if not c.done]
        rep = emu.check()
        emu.close()
        final0 = emu.nic_reports[0][-1]
    finally:
        emu.close()
    for c in split:
        assert c.ext == ext_before[c.cid], (c.cid, c.ext, ext_before[c.cid])
    assert not any(c.bad for c in split)
    for c in after:
        for e in c.ext:
            assert handed.get((c.proto, *e), (c.iaddr, c.iport)) == (c.iaddr, c.iport), (e, c)
    assert rep["shared_external"] == 0 and rep["eim_violations"] == 0
    counters = final0["counters"]
    assert final0["recovery"]["quarantined_blocks"] > 0
    assert counters["rules_recovered_sessions"] >= len(split)
    assert counters["rules_recovery_lost_host_mismatch"] == 0 and counters["rules_recovery_lost_invalid"] == 0


# ---------------------------------------------------------------------------------------
# the recovery window (the worker opens it after a crash restart)


def test_recovery_window_holds_new_mappings_of_journaled_hosts_only():
    """While ``recovering``: a host the journal names gets no new mapping (ACT_HOLD, not
    a drop; a FETCH asking this NIC to allocate for it is refused as "recovering"); a
    host the journal does not name allocates as usual; a reported session is found
    (replay); once the window closes the held host allocates around its quarantine."""
    from hypernat.rules import ACT_HOLD

    cfg = make_cfg()
    before, journal, hosts = build_before(cfg)
    recs = sessions_of(before)
    rb = crash(before, journal)
    assert set(hosts) <= rb.recovery_hosts
    rb.recovering = True
    h = hosts[0]
    stranger = next(x for x in range(ip("10.77.200.1"), ip("10.77.201.0")) if rb.part.eim_owner(x) == 0)
    d = miss(rb, [(UDP, h, 9999, R1, 53), (UDP, stranger, 9999, R1, 53)], 20)
    assert d.action[0] == ACT_HOLD and d.action[1] == ACT_REPLAY
    assert rb.counters_dict()["recovery_held"] == 1 and len(rb.out) == 1
    fetch = M.records(M.T_FETCH, 1)
    fetch[0] = (1, 0, UDP, M.FETCH_BY_INTERNAL, 0, 0, h, 0, R1, 9998, 0, 53, 0)
    rule, bad, status = rb.serve_fetches(fetch, 20)
    assert not len(rule) and bad.tolist() == [0] and status.tolist() == [REASON["recovering"]]
    mine = recs[recs["iaddr"] == h][:1]
    assert rb.recover_sessions(mine, 21).all()
    row = (int(mine["proto"][0]), h, int(mine["iport"][0]), int(mine["raddr"][0]), int(mine["rport"][0]))
    assert miss(rb, [row], 22).action[0] == ACT_REPLAY  # its session is back: found
    rb.recovering = False
    d = miss(rb, [(UDP, h, 9999, R1, 53)], 23)
    assert d.action[0] == ACT_REPLAY
    check_consistency(rb)
