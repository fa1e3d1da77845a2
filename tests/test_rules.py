"""RuleBuilder: allocation, ownership, filtering, hairpinning, lifecycle, cloning hooks.

Most tests drive the builder the way the NIC loop does (verdicts + KEY_DTYPE keys in,
Decisions out) over real FlowTables; the hairpin test goes through a real Translator
with frames built and checked by scapy.
"""
import collections
import io
import ipaddress
import json

import numpy as np
import pytest

from hypernat import config, layout
from hypernat import messages as M
from hypernat.fastpath import FlowTable, Translator
from hypernat.rules import (
    ACT_DROP, ACT_FETCH, ACT_NONE, ACT_REPLAY, DIR_BIT_IN, DIR_BIT_OUT, REASON, SESSION_DTYPE, RuleBuilder,
    in_key, out_key,
)  # fmt: skip
from hypernat.translog import TransLog
from hypernat.verdicts import IN, OUT, VERDICT

TCP, UDP, ICMP = 6, 17, 1
SYN, ACK, FIN, RST = layout.TCP_SYN, layout.TCP_ACK, layout.TCP_FIN, layout.TCP_RST
T = dict(udp=30, tcp_established=100, tcp_transitory=20, icmp=10, reuse_delay=15, force=True)


def ip(s) -> int:
    return int(ipaddress.IPv4Address(s))


def make_cfg(n_nics=1, pool="198.18.77.0/30", ports=(1024, 2047), block=16, cap=4096, **top):
    tree = {
        "internal": {"prefixes": ["10.77.0.0/16"]},
        "external": {"pool": [pool] if isinstance(pool, str) else pool, "ports": list(ports)},
        "nics": [{"id": i, "inside": f"in{i}", "outside": f"out{i}"} for i in range(n_nics)],
        "timeouts": dict(T),
        "limits": {"port_block_size": block, "ports_per_host": cap, "flow_table_capacity": 4096},
    }
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(tree.get(k), dict):
            tree[k].update(v)
        else:
            tree[k] = v
    return config.from_dict(tree, "test.yaml")


def make_rb(cfg, nic=0, capacity=4096, seed=1, **kw):
    return RuleBuilder(cfg, nic, FlowTable(capacity), FlowTable(capacity), rng=np.random.default_rng(seed), **kw)


SERVED = -1  # serve_fetch's status of an answered key (else the refusal's reason index)


def fetch_records(fetch_dir, keys, seq0=1):
    """FETCH records (messages.KEY_DTYPE) of layout.KEY_DTYPE keys as the asker sends
    them: verdicts.IN keys (p, R, Rp, E, Ep) by external endpoint, OUT keys (p, I, Ip,
    R, Rp) by internal one; an ICMP-error key flagged FETCH_F_ICMP_ERROR."""
    keys = np.asarray(keys, layout.KEY_DTYPE).reshape(-1)
    fd = np.broadcast_to(np.asarray(fetch_dir, np.uint8), (len(keys),))
    recs = M.records(M.T_FETCH, len(keys))
    recs["seq"] = np.arange(seq0, seq0 + len(keys))
    recs["proto"] = keys["proto"]
    recs["flags"] = np.where(keys["kind"] == layout.KIND_ICMP_ERROR, M.FETCH_F_ICMP_ERROR, 0)
    inb = fd == IN
    recs["kind"] = np.where(inb, M.FETCH_BY_EXTERNAL, M.FETCH_BY_INTERNAL)
    recs["rem_addr"] = np.where(inb, keys["saddr"], keys["daddr"])
    recs["rem_port"] = np.where(inb, keys["sport"], keys["dport"])
    recs["ext_addr"], recs["ext_port"] = np.where(inb, keys["daddr"], 0), np.where(inb, keys["dport"], 0)
    recs["int_addr"], recs["int_port"] = np.where(inb, 0, keys["saddr"]), np.where(inb, 0, keys["sport"])
    return recs


def serve_fetch(rb, fetch_dir, keys, now):
    """The owner's answers to FETCHes (``serve_fetches`` over ``fetch_records``) one per
    key: (SESSION_DTYPE records -- the RULE record's session, tcp_out its tcp_state,
    zeros for a refused key --, int32 statuses: SERVED or the refusal's reason)."""
    recs = fetch_records(fetch_dir, keys)
    rule, bad, why = rb.serve_fetches(recs, now, 30000)
    status = np.full(len(recs), SERVED, np.int32)
    status[bad] = why
    ok = status == SERVED
    assert (rule["seq"] == recs["seq"][ok]).all() and (rule["owner"] == rb.nic).all()
    assert (rule["lease_ms"] == 30000).all() and not rule["flags"].any()
    out = np.zeros(len(recs), SESSION_DTYPE)
    sub = np.zeros(len(rule), SESSION_DTYPE)
    for a, b in (("iaddr", "int_addr"), ("eaddr", "ext_addr"), ("raddr", "rem_addr"), ("iport", "int_port"),
                 ("eport", "ext_port"), ("rport", "rem_port"), ("proto", "proto"), ("rule_id", "rule_id"),
                 ("owner", "owner"), ("tcp_out", "tcp_state")):
        sub[a] = rule[b]
    sub["dirs"] = DIR_BIT_OUT | DIR_BIT_IN
    out[ok] = sub
    return out, status


def keys_of(rows, kind=layout.KIND_PLAIN):
    k = np.zeros(len(rows), layout.KEY_DTYPE)
    for i, r in enumerate(rows):
        p, s, sp, d, dp = r[:5]
        fl = r[5] if len(r) > 5 else 0
        k[i] = (s, d, sp, dp, p, kind, fl, 0)
    return k


def miss(rb, direction, rows, now, verdict=None, kind=layout.KIND_PLAIN):
    v = verdict or ("miss_out" if direction == OUT else "miss_in")
    verd = np.full(len(rows), VERDICT[v], np.uint8)
    return rb.handle_misses(direction, verd, keys_of(rows, kind), now)


def hosts_of(rb, n, start=1):
    """n internal hosts whose EIM owner is rb's NIC."""
    out, i = [], start
    while len(out) < n:
        h = ip("10.77.0.0") + i
        if rb.part.eim_owner(h) == rb.nic:
            out.append(h)
        i += 1
    return out


def mapping_of(rb, p, i, ip_, r, rp):
    """(E, Ep) of the session (p, i, ip_) -> (r, rp) in rb's out table, or None."""
    rec = rb.out.get(*out_key(p, i, ip_, r, rp))
    return None if rec is None else (int(rec["new_addr"]), int(rec["new_port"]))


def owned_bindings(rbs):
    """{(proto, E, Ep): {(I, Ip)}} over every NIC's owned (non-clone) out entries."""
    b = collections.defaultdict(set)
    for rb in rbs:
        s = rb.out.slots[rb.out.occupied()]
        s = s[(s["flags"] & layout.F_CLONE) == 0]
        for r in s:
            b[(int(r["proto"]), int(r["new_addr"]), int(r["new_port"]))].add((int(r["saddr"]), int(r["sport"])))
    return b


def sweep_all(rb, now):
    """Sweep the whole tables with no expiry budget (tests of what expires, not of how
    the work is spread): finish the current pass, then one complete pass."""
    rb.sweep(now, max_slots=1 << 22, max_expire=1 << 22, budget_us=1e12)
    return rb.sweep(now, max_slots=1 << 22, max_expire=1 << 22, budget_us=1e12)


R1, R2, R3 = ip("8.8.8.8"), ip("8.8.4.4"), ip("1.1.1.1")


# ---------------------------------------------------------------------------------------
# Allocation and ownership


@pytest.mark.parametrize("mapping", ["endpoint-independent", "address-and-port-dependent"])
@pytest.mark.parametrize("seed", [1, 2])
def test_no_external_endpoint_held_twice(mapping, seed):
    """Invariant 1 under churn over 3 NICs: at no time do two internal endpoints hold
    the same external endpoint, and a released endpoint is not handed to another
    internal endpoint before the reuse delay."""
    cfg = make_cfg(3, pool="198.18.77.0/31", ports=(1024, 1215), block=8, cap=64, mapping=mapping)
    rbs = [make_rb(cfg, k, seed=seed * 10 + k) for k in range(3)]
    rng = np.random.default_rng(seed)
    hosts = [ip("10.77.1.0") + i for i in range(40)]
    remotes = [ip("203.0.113.0") + i for i in range(6)]
    now = 1000
    holder = {}  # (p, E, Ep) -> (I, Ip)
    released = {}  # (p, E, Ep) -> time it disappeared
    created = 0
    for step in range(120):
        for _ in range(12):
            p = [TCP, UDP][int(rng.integers(2))]
            h = hosts[int(rng.integers(len(hosts)))]
            row = (p, h, 2000 + int(rng.integers(6)), remotes[int(rng.integers(len(remotes)))], 80, SYN)
            nic = rbs[0].part.eim_owner(h) if mapping == "endpoint-independent" else int(rng.integers(3))
            d = miss(rbs[nic], OUT, [row], now)
            assert d.action[0] in (ACT_REPLAY, ACT_DROP)
            created += d.action[0] == ACT_REPLAY
        now += int(rng.integers(1, 6))
        for rb in rbs:
            sweep_all(rb, now)
        b = owned_bindings(rbs)
        for e, who in b.items():
            assert len(who) == 1, f"{e} held by {who}"
            (w,) = who
            if e in holder and holder[e] != w:
                raise AssertionError(f"{e} changed hands without being released")
            if e not in holder and e in released and released[e][1] != w:
                assert now - released[e][0] >= cfg.timeouts.reuse_delay, "reused before the reuse delay"
            holder[e] = w
        for e in list(holder):
            if e not in b:
                released[e] = (now, holder.pop(e))
        # EIM: the owner of every binding is the NIC of the host
        for k, rb in enumerate(rbs):
            s = rb.out.slots[rb.out.occupied()]
            assert ((s["flags"] & layout.F_CLONE) == 0).all()
            assert all(rb.part.owner(int(x["new_addr"]), int(x["new_port"])) == k for x in s)
            if mapping == "endpoint-independent":
                assert all(rb.part.eim_owner(int(x["saddr"])) == k for x in s)
    assert created > 200 and released  # the test exercised allocation and reuse


def test_eim_one_endpoint_per_internal_endpoint_and_one_address_per_host():
    cfg = make_cfg(1, pool="198.18.77.0/29", block=4)
    rb = make_rb(cfg)
    h1, h2 = hosts_of(rb, 2)
    rows = [(p, h, sp, r, rp) for p in (TCP, UDP) for h in (h1, h2) for sp in range(3000, 3012)
            for r in (R1, R2, R3) for rp in (53, 443)]  # fmt: skip
    d = miss(rb, OUT, rows, 100)
    assert (d.action == ACT_REPLAY).all()
    seen = {}
    addrs = collections.defaultdict(set)
    for p, h, sp, r, rp in rows:
        e = mapping_of(rb, p, h, sp, r, rp)
        assert e is not None
        assert seen.setdefault((p, h, sp), e) == e  # same external endpoint for every remote
        addrs[h].add(e[0])
        # the in entry translates back to the internal endpoint
        back = rb.inn.get(*in_key(p, r, rp, *e))
        assert (int(back["new_addr"]), int(back["new_port"])) == (h, sp)
    assert all(len(a) == 1 for a in addrs.values())  # paired pooling
    # no overloading: within a protocol, distinct internal endpoints, distinct external ones
    assert len({(k[0], e) for k, e in seen.items()}) == len(seen)
    assert rb.stats()["mappings"] == len(seen) and rb.stats()["sessions"] == len(rows)
    # blocks of 4 ports: a host with 12 TCP + 12 UDP mappings holds 3 blocks
    assert rb.stats()["blocks_in_use"] == 6


def test_apdm_new_endpoint_per_session():
    cfg = make_cfg(1, mapping="address-and-port-dependent")
    rb = make_rb(cfg)
    (h,) = hosts_of(rb, 1)
    rows = [(UDP, h, 4000, r, rp) for r in (R1, R2) for rp in (53, 54)]
    d = miss(rb, OUT, rows + rows, 100)  # duplicates in one batch: one session each
    assert (d.action == ACT_REPLAY).all()
    es = {mapping_of(rb, *r) for r in rows}
    assert len(es) == 4 and len({e[0] for e in es}) == 1
    assert len(rb.out) == 4 and len(rb.inn) == 4


def test_not_internal_and_icmp_query():
    cfg = make_cfg(1)
    rb = make_rb(cfg)
    d = miss(rb, OUT, [(UDP, ip("192.168.1.1"), 5, R1, 53)], 100)
    assert d.action[0] == ACT_DROP and d.reason[0] == REASON["not_internal"]
    (h,) = hosts_of(rb, 1)
    d = miss(rb, OUT, [(ICMP, h, 77, R1, 77)], 100)
    assert d.action[0] == ACT_REPLAY
    e = mapping_of(rb, ICMP, h, 77, R1, 77)
    # the echo reply comes back as (1, R, id', E, id')
    back = rb.inn.get(ICMP, R1, e[1], e[0], e[1])
    assert (int(back["new_addr"]), int(back["new_port"])) == (h, 77)
    assert rb.counters_dict()["not_internal"] == 1


def test_port_preservation_and_parity():
    cfg = make_cfg(1, block=64, allocation={"port_preservation": True})
    rb = make_rb(cfg)
    (h,) = hosts_of(rb, 1)
    miss(rb, OUT, [(UDP, h, 1030, R1, 53)], 1)  # first block is 1024-1087: 1030 is inside
    assert mapping_of(rb, UDP, h, 1030, R1, 53)[1] == 1030
    cfg = make_cfg(1, block=64, allocation={"port_parity": True})
    rb = make_rb(cfg, seed=5)
    (h,) = hosts_of(rb, 1)
    rows = [(UDP, h, 5000 + i, R1, 53) for i in range(40)]
    miss(rb, OUT, rows, 1)
    assert all(mapping_of(rb, *r)[1] % 2 == r[2] % 2 for r in rows)


def test_random_port_choice_is_spread():
    cfg = make_cfg(1, block=256, ports=(1024, 65535))
    starts = set()
    for seed in range(8):
        rb = make_rb(cfg, seed=seed)
        (h,) = hosts_of(rb, 1)
        miss(rb, OUT, [(UDP, h, 5000, R1, 53)], 1)
        starts.add(mapping_of(rb, UDP, h, 5000, R1, 53)[1])
    assert len(starts) >= 6  # RFC 6056: not sequential from the block's start


def test_per_host_cap():
    cfg = make_cfg(1, block=4, cap=10)
    rb = make_rb(cfg)
    h1, h2 = hosts_of(rb, 2)
    d = miss(rb, OUT, [(TCP, h1, 3000 + i, R1, 80) for i in range(11)], 1)
    assert (d.action[:10] == ACT_REPLAY).all()
    assert d.action[10] == ACT_DROP and d.reason[10] == REASON["host_port_cap"]
    # the cap is per host: another host is unaffected; more sessions of a mapping are free
    d = miss(rb, OUT, [(TCP, h2, 3000, R1, 80), (TCP, h1, 3000, R2, 80)], 1)
    assert (d.action == ACT_REPLAY).all()
    assert rb.counters_dict()["host_port_cap"] == 1


def test_exhaustion_counted_logged_and_gauge(caplog):
    cfg = make_cfg(1, pool="198.18.77.1/32", ports=(1024, 1039), block=4, cap=8)
    rb = make_rb(cfg)
    hosts = hosts_of(rb, 3)
    assert rb.utilisation() == 0.0
    rows = [(UDP, h, 3000 + i, R1, 53) for h in hosts[:2] for i in range(8)]
    d = miss(rb, OUT, rows, 1)
    assert (d.action == ACT_REPLAY).all()
    assert rb.utilisation() == 1.0
    with caplog.at_level("WARNING", logger="hypernat.rules"):
        d = miss(rb, OUT, [(UDP, hosts[2], 3000 + i, R1, 53) for i in range(5)], 2)
    assert (d.reason == REASON["ports_exhausted"]).all()
    assert rb.counters_dict()["ports_exhausted"] == 5
    assert sum("ports_exhausted" in r.message for r in caplog.records) == 1  # once per interval


def test_table_full_refused_and_counted():
    cfg = make_cfg(1)
    rb = make_rb(cfg, capacity=16)
    (h,) = hosts_of(rb, 1)
    d = miss(rb, OUT, [(UDP, h, 3000 + i, R1, 53) for i in range(20)], 1)
    assert (d.action == ACT_REPLAY).sum() == 16
    assert (d.reason == REASON["table_full"]).sum() == 4
    assert len(rb.out) == 16 and rb.stats()["mappings"] == 16  # nothing half-built


# ---------------------------------------------------------------------------------------
# Reuse delay and holds


def _one_port_builder():
    cfg = make_cfg(1, pool="198.18.77.1/32", ports=(1024, 1024), block=1, cap=1)
    return cfg, make_rb(cfg)


def test_reuse_delay():
    cfg, rb = _one_port_builder()
    h1, h2 = hosts_of(rb, 2)
    assert miss(rb, OUT, [(UDP, h1, 5000, R1, 53)], 100).action[0] == ACT_REPLAY
    assert miss(rb, OUT, [(UDP, h2, 5000, R1, 53)], 100).reason[0] == REASON["ports_exhausted"]
    t_exp = 100 + cfg.timeouts.udp
    sweep_all(rb, t_exp)
    assert len(rb.out) == 0 and rb.stats()["ports_waiting_reuse"] == 1
    sweep_all(rb, t_exp + cfg.timeouts.reuse_delay - 1)
    assert miss(rb, OUT, [(UDP, h2, 5000, R1, 53)], t_exp + 14).reason[0] == REASON["ports_exhausted"]
    sweep_all(rb, t_exp + cfg.timeouts.reuse_delay)
    assert miss(rb, OUT, [(UDP, h2, 5000, R1, 53)], t_exp + 15).action[0] == ACT_REPLAY
    assert mapping_of(rb, UDP, h2, 5000, R1, 53) == (ip("198.18.77.1"), 1024)


def test_hold_blocks_reuse_until_released():
    cfg, rb = _one_port_builder()
    h1, h2 = hosts_of(rb, 2)
    miss(rb, OUT, [(UDP, h1, 5000, R1, 53)], 100)
    e = (UDP, ip("198.18.77.1"), 1024)
    rb.hold(*e)
    rb.hold(*e)
    assert rb.lookup_external(*e)["holds"] == 2
    sweep_all(rb, 130)
    sweep_all(rb, 1000)  # long after the reuse delay
    assert rb.stats()["endpoints_held"] == 1
    assert miss(rb, OUT, [(UDP, h2, 5000, R1, 53)], 1000).reason[0] == REASON["ports_exhausted"]
    rb.release_hold(*e)
    assert miss(rb, OUT, [(UDP, h2, 5000, R1, 53)], 1000).reason[0] == REASON["ports_exhausted"]
    rb.release_hold(*e)
    assert miss(rb, OUT, [(UDP, h2, 5000, R1, 53)], 1000).action[0] == ACT_REPLAY


# ---------------------------------------------------------------------------------------
# Expiry at each timeout boundary (injected clock: `now` is passed in)


def _session(rb, p, t0, sp=5000, rp=80):
    (h,) = hosts_of(rb, 1)
    miss(rb, OUT, [(p, h, sp, R1, rp)], t0)
    e = mapping_of(rb, p, h, sp, R1, rp)
    return h, e


def _set_state(rb, p, h, e, out_flags=0, in_flags=0, in_seen=None):
    j = rb.out.lookup(*out_key(p, h, 5000, R1, 80))
    rb.out.slots["tcp_state"][j] = out_flags
    k = rb.inn.lookup(*in_key(p, R1, 80, *e))
    rb.inn.slots["tcp_state"][k] = in_flags
    if in_seen is not None:
        rb.inn.slots["last_seen"][k] = in_seen


@pytest.mark.parametrize(
    "proto,out_flags,in_flags,timeout",
    [
        (UDP, 0, 0, "udp"),
        (ICMP, 0, 0, "icmp"),
        (TCP, SYN, 0, "tcp_transitory"),  # partially open
        (TCP, SYN, SYN, "tcp_established"),
        (TCP, SYN, SYN | FIN, "tcp_transitory"),  # closing
        (TCP, SYN | RST, SYN, "tcp_transitory"),  # RST keeps it for the transitory timeout
        (TCP, 0, 0, "tcp_established"),  # picked up mid-stream
    ],
)
def test_expiry_boundaries(proto, out_flags, in_flags, timeout):
    cfg = make_cfg(1)
    rb = make_rb(cfg)
    t0 = 10_000
    (h,) = hosts_of(rb, 1)
    rp = 5000 if proto == ICMP else 80
    miss(rb, OUT, [(proto, h, 5000, R1, rp)], t0)
    e = mapping_of(rb, proto, h, 5000, R1, rp)
    if proto == TCP:
        _set_state(rb, proto, h, e, out_flags, in_flags)
    limit = getattr(cfg.timeouts, timeout)
    sweep_all(rb, t0 + limit - 1)
    assert len(rb.out) == 1 and len(rb.inn) == 1
    sweep_all(rb, t0 + limit)
    assert len(rb.out) == 0 and len(rb.inn) == 0
    assert rb.stats()["mappings"] == 0


def test_return_direction_activity_keeps_session():
    cfg = make_cfg(1)
    rb = make_rb(cfg)
    h, e = _session(rb, UDP, 1000)
    _set_state(rb, UDP, h, e, in_seen=1020)  # a download: only the in entry is hit
    sweep_all(rb, 1000 + 30)
    assert len(rb.out) == 1
    sweep_all(rb, 1020 + 29)
    assert len(rb.out) == 1
    sweep_all(rb, 1020 + 30)
    assert len(rb.out) == 0


def test_sweep_is_bounded_and_incremental():
    cfg = make_cfg(1, pool="198.18.77.0/28", ports=(1024, 65535), block=64)
    rb = make_rb(cfg, capacity=4000)
    hosts = hosts_of(rb, 40)
    rows = [(UDP, h, 3000 + i, R1, 53) for h in hosts for i in range(50)]
    miss(rb, OUT, rows, 1)
    assert len(rb.out) == 2000
    n_slots = len(rb.out.slots)
    steps, total = 0, 0
    while len(rb.out):
        r = rb.sweep(1000, max_slots=512, max_expire=64, budget_us=1e9)
        assert r.scanned <= 512 and r.expired <= 64
        total += r.expired
        steps += 1
        assert steps < 200
    assert total == 2000 and steps >= 2000 // 64
    assert n_slots // 512 <= steps
    # a time budget too small for even one expiry still makes progress: one per step
    miss(rb, OUT, rows[:10], 2000)
    for i in range(10):
        r = rb.sweep(5000, max_slots=1 << 20, max_expire=64, budget_us=1e-3)
        assert r.expired == 1 and len(rb.out) == 9 - i


# ---------------------------------------------------------------------------------------
# Filtering and ownership of incoming misses


@pytest.mark.parametrize(
    "filtering,same_addr_other_port,other_addr",
    [
        ("endpoint-independent", True, True),
        ("address-dependent", True, False),
        ("address-and-port-dependent", False, False),
    ],
)
def test_filtering(filtering, same_addr_other_port, other_addr):
    cfg = make_cfg(1, filtering=filtering)
    rb = make_rb(cfg)
    (h,) = hosts_of(rb, 1)
    miss(rb, OUT, [(UDP, h, 5000, R1, 53)], 10)
    ea, ep = mapping_of(rb, UDP, h, 5000, R1, 53)
    for (r, rp), admitted in (((R1, 54), same_addr_other_port), ((R2, 53), other_addr)):
        d = miss(rb, IN, [(UDP, r, rp, ea, ep)], 11)
        if admitted:
            assert d.action[0] == ACT_REPLAY
            back = rb.inn.get(UDP, r, rp, ea, ep)
            assert (int(back["new_addr"]), int(back["new_port"])) == (h, 5000)
            assert mapping_of(rb, UDP, h, 5000, r, rp) == (ea, ep)  # and the reply goes out the same way
        else:
            assert d.action[0] == ACT_DROP and d.reason[0] == REASON["filtered"]
            assert rb.inn.get(UDP, r, rp, ea, ep) is None
    # an unsolicited SYN to a TCP endpoint is dropped under its own reason (RFC 5382 REQ-4)
    d = miss(rb, IN, [(TCP, R3, 443, ea, ep, SYN)], 12)
    assert d.action[0] == ACT_DROP and d.reason[0] == REASON["unsolicited_syn"]
    d = miss(rb, IN, [(TCP, R3, 443, ea, ep, ACK)], 12)
    assert d.reason[0] == REASON["no_mapping"]
    d = miss(rb, IN, [(UDP, R1, 53, ip("203.0.113.1"), 1024)], 12)
    assert d.reason[0] == REASON["not_in_pool"]
    d = miss(rb, IN, [(UDP, R1, 53, ea, ep)], 12, verdict="miss_icmp_error", kind=layout.KIND_ICMP_ERROR)
    assert d.action[0] == ACT_REPLAY  # the session exists (pending in this NIC): replay translates it
    d = miss(rb, IN, [(UDP, R3, 9, ea, ep)], 12, verdict="miss_icmp_error", kind=layout.KIND_ICMP_ERROR)
    assert d.reason[0] == REASON["icmp_error_no_session"]


def test_misses_owned_elsewhere_come_back_as_fetch():
    cfg = make_cfg(2)
    rb0, rb1 = make_rb(cfg, 0), make_rb(cfg, 1)
    (h1,) = hosts_of(rb1, 1)
    # outgoing from a host whose mappings NIC 1 owns, seen on NIC 0
    d = miss(rb0, OUT, [(TCP, h1, 5000, R1, 80, SYN)], 10)
    assert d.action[0] == ACT_FETCH and d.owner[0] == 1 and d.fetch_dir[0] == OUT
    fk = d.fetch_key[0]
    assert (int(fk["saddr"]), int(fk["sport"]), int(fk["daddr"]), int(fk["dport"])) == (h1, 5000, R1, 80)
    # the owner serves it: allocates like a local miss
    recs, status = serve_fetch(rb1, OUT, d.fetch_key[:1], 10)
    assert status[0] == SERVED and recs[0]["iaddr"] == h1 and recs[0]["owner"] == 1
    assert rb1.part.owner(int(recs[0]["eaddr"]), int(recs[0]["eport"])) == 1
    # the asker installs a clone of the out entry and its replay now hits
    assert rb0.install_clone(recs, 10, dirs=DIR_BIT_OUT) == 1
    j = rb0.out.lookup(*out_key(TCP, h1, 5000, R1, 80))
    assert j >= 0 and rb0.out.slots["flags"][j] & layout.F_CLONE
    # the return packet lands on NIC 0 too: an incoming miss owned by NIC 1
    e = (int(recs[0]["eaddr"]), int(recs[0]["eport"]))
    d = miss(rb0, IN, [(TCP, R1, 80, *e, SYN | ACK)], 11)
    assert d.action[0] == ACT_FETCH and d.owner[0] == 1 and d.fetch_dir[0] == IN
    recs2, status = serve_fetch(rb1, IN, d.fetch_key[:1], 11)
    assert status[0] == SERVED and (recs2[["iaddr", "eaddr", "eport"]] == recs[["iaddr", "eaddr", "eport"]]).all()
    assert rb0.install_clone(recs2, 11, dirs=DIR_BIT_IN) == 1
    # a NACK: nobody has this endpoint / NIC 0 is asked for what NIC 1 owns
    bogus = keys_of([(TCP, R1, 80, e[0], e[1] ^ 1)])
    _, st = serve_fetch(rb1, IN, bogus, 11)
    assert st[0] == REASON["no_mapping"]
    _, st = serve_fetch(rb0, IN, d.fetch_key[:1], 11)
    assert st[0] == REASON["not_owner"]
    # clones are never installed over what this NIC owns
    assert rb1.install_clone(recs, 11) == 0 and rb1.counters_dict()["bad_message"] == 1


def test_activity_merge_lease_expiry_and_removal():
    cfg = make_cfg(2)
    rb0, rb1 = make_rb(cfg, 0), make_rb(cfg, 1)
    (h,) = hosts_of(rb1, 1)
    miss(rb1, OUT, [(UDP, h, 5000, R1, 53)], 100)
    recs = rb1.export_rule(UDP, *mapping_of(rb1, UDP, h, 5000, R1, 53))
    assert len(recs) == 1
    assert rb0.install_clone(recs, 100, dirs=DIR_BIT_IN, lease_until=160) == 1
    # the holder's clone is hit at t=125 (a download): collect and merge at the owner
    ik = in_key(UDP, R1, 53, int(recs[0]["eaddr"]), int(recs[0]["eport"]))
    j = rb0.inn.lookup(*ik)
    rb0.inn.slots["last_seen"][j] = 125
    rb0.inn.slots["flags"][j] |= layout.F_ACTIVE
    act = rb0.collect_activity()
    assert len(act) == 1 and act[0]["dirs"] == DIR_BIT_IN and act[0]["owner"] == 1 and act[0]["last_seen"] == 125
    assert len(rb0.collect_activity()) == 0  # F_ACTIVE cleared
    assert rb1.merge_activity(act) == 1
    sweep_all(rb1, 100 + 30)
    assert len(rb1.out) == 1  # kept alive by the holder's report
    sweep_all(rb1, 125 + 30)
    assert len(rb1.out) == 0
    removed = rb1.drain_removed()
    assert len(removed) == 1 and removed[0]["iaddr"] == h
    # the holder's lease: renewed, then it runs out and the sweep drops the clone
    assert rb0.renew_clones(recs, 200) == 1
    sweep_all(rb0, 199)
    assert len(rb0.inn) == 1
    sweep_all(rb0, 200)
    assert len(rb0.inn) == 0 and rb0.counters_dict()["lease_expired"] == 1
    assert len(rb0.drain_lease_expired()) == 1
    # remove_clone leaves owned entries alone
    miss(rb1, OUT, [(UDP, h, 5001, R1, 53)], 300)
    recs = rb1.export_rule(UDP, *mapping_of(rb1, UDP, h, 5001, R1, 53))
    assert rb1.remove_clone(recs) == 0 and len(rb1.out) == 1
    rb0.install_clone(recs, 300)
    assert rb0.remove_clone(recs) == 2 and len(rb0.out) == len(rb0.inn) == 0


def test_drain_created_for_active_install():
    cfg = make_cfg(2, install="active")
    rb = make_rb(cfg, 0)
    (h,) = hosts_of(rb, 1)
    miss(rb, OUT, [(TCP, h, 5000, R1, 80, SYN)], 7)
    c = rb.drain_created()
    assert len(c) == 1 and c.dtype == SESSION_DTYPE and c[0]["owner"] == 0 and c[0]["dirs"] == 3
    assert len(rb.drain_created()) == 0


def test_one_nic_active_install_tracks_nothing():
    """With one NIC there is nobody to push to: active install records no created
    sessions (recording them sent every new session through the Python path)."""
    rb = make_rb(make_cfg(1, install="active"), 0)
    miss(rb, OUT, [(TCP, h, 5000, R1, 80, SYN) for h in hosts_of(rb, 3)], 7)
    assert len(rb.maps) == 3 and len(rb.drain_created()) == 0


# ---------------------------------------------------------------------------------------
# Hairpinning through a real Translator, checked with scapy


def _frames_buf(frames):
    bufs = [bytes(f) for f in frames]
    buf = np.frombuffer(bytearray(b"".join(bufs)), np.uint8).copy()
    lengths = np.array([len(b) for b in bufs], np.uint32)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.uint32)
    return buf, offsets, lengths


def _translate(tr, frames, direction, now):
    buf, off, ln = _frames_buf(frames)
    v = np.zeros(len(frames), np.uint8)
    k = np.zeros(len(frames), layout.KEY_DTYPE)
    tr.translate(buf, off, ln, direction, now, v, k)
    return [bytes(buf[o : o + n]) for o, n in zip(off, ln)], v, k


@pytest.mark.parametrize("proto", [UDP, TCP])
@pytest.mark.parametrize("filtering", ["endpoint-independent", "address-and-port-dependent"])
def test_hairpin_through_translator(proto, filtering):
    from scapy.layers.inet import IP, TCP as sTCP, UDP as sUDP
    from scapy.layers.l2 import Ether

    cfg = make_cfg(1, filtering=filtering)
    rb = make_rb(cfg)
    tr = Translator(rb.out, rb.inn, pool=cfg.pool_ranges)
    a, b = hosts_of(rb, 2)
    L4 = sUDP if proto == UDP else sTCP

    def frame(src, sport, dst, dport, **kw):
        l4 = L4(sport=sport, dport=dport, **({"flags": "S"} if proto == TCP else {}))
        return Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IP(src=src, dst=dst, ttl=64) / l4 / b"hi"

    # B talks to the Internet first: its mapping E_b:pb exists
    fb = frame(str(ipaddress.IPv4Address(b)), 5000, "8.8.8.8", 53)
    out, v, k = _translate(tr, [fb], OUT, 10)
    assert v[0] == VERDICT["miss_out"]
    assert rb.handle_misses(OUT, v, k, 10).action[0] == ACT_REPLAY
    out, v, _ = _translate(tr, [fb], OUT, 10)
    assert v[0] == VERDICT["translated"]
    eb, pb = Ether(out[0])[IP].src, Ether(out[0])[IP].sport
    # A sends to E_b:pb: the hairpin misses, the slow path builds both halves
    fa = frame(str(ipaddress.IPv4Address(a)), 6000, eb, pb)
    _, v, k = _translate(tr, [fa], OUT, 11)
    assert v[0] == VERDICT["miss_hairpin"]
    d = rb.handle_misses(OUT, v, k, 11)
    if filtering == "address-and-port-dependent":
        # B never sent to A's external endpoint: the hairpinned packet is filtered like any
        # unsolicited one from outside (A's own session was still allocated)
        assert d.action[0] == ACT_DROP
        assert d.reason[0] == REASON["unsolicited_syn" if proto == TCP else "filtered"]
        return
    assert d.action[0] == ACT_REPLAY
    out, v, _ = _translate(tr, [fa], OUT, 11)
    assert v[0] == VERDICT["hairpin"]
    pkt = Ether(out[0])
    ea, pa = mapping_of(rb, proto, a, 6000, ip(eb), pb)
    assert pkt[IP].src == str(ipaddress.IPv4Address(ea)) and pkt[L4].sport == pa  # A seen as its external endpoint
    assert pkt[IP].dst == str(ipaddress.IPv4Address(b)) and pkt[L4].dport == 5000  # delivered to B inside
    assert pkt[IP].ttl == 63 and bytes(pkt[L4].payload) == b"hi"
    ref = pkt.copy()
    del ref[IP].chksum
    del ref[L4].chksum
    ref = Ether(bytes(ref))
    assert pkt[IP].chksum == ref[IP].chksum and pkt[L4].chksum == ref[L4].chksum
    # B's reply to A's external endpoint hairpins back without the slow path
    fr = frame(str(ipaddress.IPv4Address(b)), 5000, str(ipaddress.IPv4Address(ea)), pa)
    out, v, _ = _translate(tr, [fr], OUT, 12)
    assert v[0] == VERDICT["hairpin"]
    r = Ether(out[0])
    assert (r[IP].src, r[L4].sport) == (eb, pb)
    assert (r[IP].dst, r[L4].dport) == (str(ipaddress.IPv4Address(a)), 6000)


def test_hairpin_disabled():
    cfg = make_cfg(1, hairpinning=False)
    rb = make_rb(cfg)
    (h,) = hosts_of(rb, 1)
    d = miss(rb, OUT, [(UDP, h, 5000, ip("198.18.77.1"), 1500)], 1, verdict="miss_hairpin")
    assert d.action[0] == ACT_DROP and d.reason[0] == REASON["hairpin_disabled"]


def test_non_miss_verdicts_untouched():
    cfg = make_cfg(1)
    rb = make_rb(cfg)
    verd = np.array([VERDICT["translated"], VERDICT["drop_truncated"], VERDICT["not_nat"]], np.uint8)
    d = rb.handle_misses(OUT, verd, np.zeros(3, layout.KEY_DTYPE), 1)
    assert (d.action == ACT_NONE).all() and len(rb.out) == 0


# ---------------------------------------------------------------------------------------
# Translation log, journal, snapshot, spill-over, crash quarantine


def test_translation_log_per_rule_and_per_block():
    cfg = make_cfg(1, block=4)
    buf = io.StringIO()
    rb = make_rb(cfg, translog=TransLog(buf, "per-rule", clock=lambda: 1.5))
    (h,) = hosts_of(rb, 1)
    miss(rb, OUT, [(TCP, h, 5000, R1, 80), (TCP, h, 5000, R2, 80)], 10)
    lines = [json.loads(x) for x in buf.getvalue().splitlines()]
    assert len(lines) == 1  # one mapping (EIM), remote not logged
    e = mapping_of(rb, TCP, h, 5000, R1, 80)
    assert lines[0] == {"ts": 1.5, "nic": 0, "event": "create", "proto": "tcp",
                        "internal": f"{ipaddress.IPv4Address(h)}:5000",
                        "external": f"{ipaddress.IPv4Address(e[0])}:{e[1]}"}  # fmt: skip
    sweep_all(rb, 10 + 100)
    lines = [json.loads(x) for x in buf.getvalue().splitlines()]
    assert [x["event"] for x in lines] == ["create", "remove"] and "remote" not in lines[1]
    # with remote logging: one line per session
    buf = io.StringIO()
    rb = make_rb(cfg, translog=TransLog(buf, "per-rule", remote=True))
    miss(rb, OUT, [(TCP, h, 5000, R1, 80), (TCP, h, 5000, R2, 80)], 10)
    lines = [json.loads(x) for x in buf.getvalue().splitlines()]
    assert sorted(x["remote"] for x in lines) == sorted([f"{ipaddress.IPv4Address(R1)}:80",
                                                         f"{ipaddress.IPv4Address(R2)}:80"])  # fmt: skip
    # per-block: 6 mappings in blocks of 4 = 2 lines
    buf = io.StringIO()
    rb = make_rb(cfg, translog=TransLog(buf, "per-block"))
    miss(rb, OUT, [(TCP, h, 5000 + i, R1, 80) for i in range(6)], 10)
    lines = [json.loads(x) for x in buf.getvalue().splitlines()]
    assert [x["event"] for x in lines] == ["block", "block"]
    assert all(x["ports"][1] - x["ports"][0] == 3 for x in lines)


def test_journal_before_first_use():
    """Every block is on the journal (a durable "reserve") before any entry of it exists;
    its host ("assign") follows, its "release" once it is free again."""
    cfg = make_cfg(1, block=4)
    events = []
    rb = make_rb(cfg, journal=lambda rec: events.append((rec, len(rb.out))))
    (h,) = hosts_of(rb, 1)
    miss(rb, OUT, [(TCP, h, 5000 + i, R1, 80) for i in range(5)], 10)
    assigned = [r for r, _ in events if r["op"] == "assign"]
    assert len(assigned) == 2
    for a in assigned:
        g = a["block"]
        res = [(r, n) for r, n in events if r["op"] == "reserve" and r["block"] == g]
        assert res and res[0][1] == 0  # written before any entry existed
        assert events.index(res[0]) < events.index(next(e for e in events if e[0] is a))
        _, lo, hi = rb.part.block_span(g)
        assert a["ports"] == res[0][0]["ports"] == [lo, hi]
    sweep_all(rb, 10 + 100)
    sweep_all(rb, 10 + 100 + 15)
    released = sorted(r["block"] for r, _ in events if r["op"] == "release")
    assert released == sorted(a["block"] for a in assigned)


def test_reserve_ahead_covers_the_next_new_hosts_on_a_large_pool():
    """With more addresses than ``reserve_addresses``, new hosts (one block each, on the
    addresses in turn) find their block journaled ahead as long as the reserve is
    refilled (``reserve_blocks``, the worker's timer) before half of it is used: no
    durable journal write (an fsync) on the packet path.  (Before: the reserve named
    ``reserve_per_address`` blocks on each of the first ``reserve_addresses`` addresses
    only, so from the 17th new host on each paid a synchronous write.)"""
    cfg = make_cfg(1, pool="198.18.64.0/26", block=64)  # 64 addresses, 16 blocks each
    writes = []
    phase = ["start"]

    class Journal:  # what RuleBuilder asks of hypernat.nic.journal.Journal (synchronous)
        def append_many(self, recs, on_durable=None, on_failed=None):
            writes.append((phase[0], [r["block"] for r in recs]))

        def append_lazy(self, recs):
            writes.append(("lazy", [r["block"] for r in recs]))

    rb = make_rb(cfg, journal=Journal())
    assert rb.reserve_blocks() == rb.reserve_per_address * rb.reserve_addresses
    hosts = hosts_of(rb, 16 * 6)
    for k in range(6):
        phase[0] = "packets"
        d = miss(rb, OUT, [(UDP, h, 5000, R1, 53) for h in hosts[16 * k : 16 * (k + 1)]], 10 + k)
        assert (d.action == ACT_REPLAY).all()
        phase[0] = "timer"
        rb.reserve_blocks()
    assert [w for w in writes if w[0] == "packets"] == []  # every new block was reserved ahead
    assert len(rb.blocks) == 96 and len({rb.blocks.span(g)[0] for g in rb.blocks}) == 64
    reserved = {g for ph, gs in writes if ph in ("start", "timer") for g in gs}
    assert set(rb.blocks) <= reserved
    assert len(reserved) <= 96 + rb.reserve_per_address * rb.reserve_addresses  # no more than the window ahead


def test_snapshot_restore_roundtrip():
    cfg = make_cfg(1, block=4)
    rb = make_rb(cfg)
    hosts = hosts_of(rb, 3)
    miss(rb, OUT, [(p, h, 5000 + i, R1, 80) for p in (TCP, UDP) for h in hosts for i in range(5)], 10)
    sweep_all(rb, 50)  # UDP gone (waiting for reuse), TCP kept
    rb.hold(TCP, *mapping_of(rb, TCP, hosts[0], 5000, R1, 80))
    state = json.loads(json.dumps(rb.snapshot()))  # plain data
    rb2 = make_rb(cfg, seed=9)
    rb2.out.load_slots(rb.out.slots.copy())
    rb2.inn.load_slots(rb.inn.slots.copy())
    rb2.restore(state)
    assert rb2.stats() == rb.stats()
    assert json.dumps(rb2.snapshot(), sort_keys=True) == json.dumps(rb.snapshot(), sort_keys=True)
    # both continue identically-safe: new allocations never collide with restored ones
    miss(rb2, OUT, [(TCP, h, 6000 + i, R2, 80) for h in hosts for i in range(5)], 60)
    b = owned_bindings([rb2])
    assert all(len(w) == 1 for w in b.values()) and len(b) == 30


def test_lend_adopt_return():
    cfg = make_cfg(2, pool="198.18.77.1/32", ports=(1024, 1039), block=4, cap=16)
    rb0, rb1 = make_rb(cfg, 0), make_rb(cfg, 1)
    (h,) = hosts_of(rb1, 1)
    d = miss(rb1, OUT, [(UDP, h, 5000 + i, R1, 53) for i in range(10)], 1)
    assert (d.action == ACT_REPLAY).sum() == 8 and (d.reason == REASON["ports_exhausted"]).sum() == 2
    g = rb0.lend_block()
    assert g is not None and rb0.part.native_owner_of_block(g) == 0
    for p in (rb0.part, rb1.part):
        p.lend(g, 1)
    rb1.adopt_block(g)
    d = miss(rb1, OUT, [(UDP, h, 5008 + i, R1, 53) for i in range(2)], 2)
    assert (d.action == ACT_REPLAY).all()
    e = mapping_of(rb1, UDP, h, 5008, R1, 53)
    assert rb1.part.block_of(*e) == g and rb1.part.owner(*e) == 1
    # incoming to the borrowed block is decided by the borrower, fetched from it by others
    assert miss(rb0, IN, [(UDP, R1, 53, *e)], 2).owner[0] == 1
    assert (miss(rb1, IN, [(UDP, R1, 53, *e)], 2).action == ACT_REPLAY).all()  # the borrower's own
    assert not rb1.return_block(g)  # in use
    sweep_all(rb1, 100)
    sweep_all(rb1, 200)
    assert rb1.return_block(g)
    rb0.adopt_block(g)  # it came home
    assert rb0.stats()["blocks_lent"] == 0


def test_quarantined_blocks_not_allocated_until_time():
    cfg = make_cfg(1, pool="198.18.77.1/32", ports=(1024, 1031), block=4, cap=8)
    rb = make_rb(cfg)
    all_blocks = list(rb.part.nic_blocks_on(0, 0))
    rb.quarantine_blocks(all_blocks[:1], until=500)
    (h,) = hosts_of(rb, 1)
    d = miss(rb, OUT, [(UDP, h, 5000 + i, R1, 53) for i in range(6)], 10)
    assert (d.action == ACT_REPLAY).sum() == 4  # only the unquarantined block
    assert all(rb.part.block_of(*mapping_of(rb, UDP, h, 5000 + i, R1, 53)) == all_blocks[1] for i in range(4))
    sweep_all(rb, 500)
    d = miss(rb, OUT, [(UDP, h, 6000, R1, 53)], 500)
    assert d.action[0] == ACT_REPLAY
    assert rb.part.block_of(*mapping_of(rb, UDP, h, 6000, R1, 53)) == all_blocks[0]


def test_icmp_errors_look_up_only_and_fetch_serving_filters():
    cfg = make_cfg(2, filtering="endpoint-independent")
    rb0, rb1 = make_rb(cfg, 0), make_rb(cfg, 1)
    (h,) = hosts_of(rb1, 1)
    # an ICMP error from inside about a flow of a host NIC 1 owns: fetched, lookup only
    d = miss(rb0, OUT, [(UDP, h, 5000, R1, 53)], 5, verdict="miss_icmp_error", kind=layout.KIND_ICMP_ERROR)
    assert d.action[0] == ACT_FETCH and d.owner[0] == 1 and d.fetch_key[0]["kind"] == layout.KIND_ICMP_ERROR
    recs, st = serve_fetch(rb1, OUT, d.fetch_key[:1], 5)
    assert st[0] == REASON["icmp_error_no_session"] and len(rb1.out) == 0  # never creates
    miss(rb1, OUT, [(UDP, h, 5000, R1, 53)], 6)
    recs, st = serve_fetch(rb1, OUT, d.fetch_key[:1], 6)
    assert st[0] == SERVED and recs[0]["iaddr"] == h and len(rb1.out) == 1
    # an incoming fetch from a new remote: EIF admits it and creates the session at the owner
    e = mapping_of(rb1, UDP, h, 5000, R1, 53)
    k = keys_of([(UDP, R2, 999, *e)])
    recs, st = serve_fetch(rb1, IN, k, 7)
    assert st[0] == SERVED and (recs[0]["raddr"], recs[0]["rport"]) == (R2, 999) and len(rb1.inn) == 2
    # ... but the same fetch as an ICMP error about an unknown session is refused
    k["kind"] = layout.KIND_ICMP_ERROR
    k["saddr"] = R3
    _, st = serve_fetch(rb1, IN, k, 7)
    assert st[0] == REASON["icmp_error_no_session"] and len(rb1.inn) == 2
    # a protocol the builder does not serve: refused and counted, never fatal
    _, st = serve_fetch(rb1, IN, keys_of([(47, R2, 1, *e)]), 7)
    assert st[0] == REASON["bad_message"]


def test_journal_group_commit():
    """A burst of new hosts with nothing reserved ahead: one durable commit for the burst
    (the block needed and a reserve's worth more, spread over the addresses new hosts
    take next), the hosts lazily, one write."""
    class J:
        def __init__(self):
            self.durable, self.lazy = [], []

        def append(self, rec):
            self.durable.append([rec])

        def append_many(self, recs):
            self.durable.append(list(recs))

        def append_lazy(self, recs):
            self.lazy.append(list(recs))

    cfg = make_cfg(1, block=4)
    j = J()
    rb = make_rb(cfg, journal=j.append)
    hosts = hosts_of(rb, 3)
    miss(rb, OUT, [(TCP, h, 5000 + i, R1, 80) for h in hosts for i in range(6)], 10)
    assert len(rb.blocks) == 6  # 3 hosts x 2 blocks ...
    assert len({rb.blocks.aidx(g) for g in rb.blocks}) > 1 and len(j.durable) == 1  # one commit, not one per address
    assert set(rb.blocks) <= {r["block"] for c in j.durable for r in c}
    assert len(j.lazy) == 1 and sorted(r["block"] for r in j.lazy[0]) == sorted(rb.blocks)


# ---------------------------------------------------------------------------------------
# The allocator's bookkeeping against its tables, under random operation sequences

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_OPS = st.lists(
    st.tuples(st.sampled_from(["out", "out", "out", "in", "tick", "hold", "release", "snapshot"]),
              st.integers(0, 7), st.integers(0, 5), st.integers(0, 3), st.sampled_from([TCP, UDP, ICMP])),
    min_size=5, max_size=80,
)  # fmt: skip


def check_consistency(rb):
    """Every bit set in a block is a live mapping, an endpoint waiting out its reuse
    delay or a held one; tables hold exactly the live sessions; counters add up."""
    bits = set()
    bl = rb.blocks
    for g in bl.ids():
        size = bl.span(g)[2]
        for pi in range(3):
            used = bl.used_mask(g, pi)
            assert bin(used).count("1") == bl.n_used(g, pi)
            bits |= {(g, pi, off) for off in range(size) if used >> off & 1}
        assert sum(bl.n_used(g, pi) for pi in range(3)) > 0
    live = {(m.block, {6: 0, 17: 1, 1: 2}[m.proto], m.eport - bl.lo(m.block)) for m in rb.mappings()}
    waiting = {(g, pi, off) for _, _, g, pi, off in rb.pool.waiting()} | set(rb.pool.held().values())
    assert not live & waiting
    assert bits == live | waiting
    assert len(rb.out) == len(rb.inn) == rb.stats()["sessions"] == sum(len(m.remotes) for m in rb.mappings())
    for r in rb.out.slots[rb.out.occupied()]:
        m = rb.mapping(int(r["rule_id"]))
        assert (m.iaddr, m.iport, m.eaddr, m.eport) == (int(r["saddr"]), int(r["sport"]), int(r["new_addr"]),
                                                        int(r["new_port"]))  # fmt: skip
    assert 0.0 <= rb.utilisation() <= 1.0


@pytest.mark.parametrize("proto", [UDP, TCP])
def test_apdm_an_incoming_session_on_another_mappings_outgoing_key_is_refused(proto):
    """Address-and-port-dependent mapping, endpoint-independent filtering: I:Ip -> R2
    has mapping A, I:Ip -> R1:80 mapping B.  A packet from R1:80 to A's endpoint would
    open a session of A whose outgoing key (I, Ip, R1, 80) is B's: one outgoing 5-tuple
    bound to two external endpoints.  It is refused as filtered; B keeps translating."""
    cfg = make_cfg(1, mapping="address-and-port-dependent", filtering="endpoint-independent")
    rb = make_rb(cfg)
    (h,) = hosts_of(rb, 1)
    flags = SYN if proto == TCP else 0
    assert miss(rb, OUT, [(proto, h, 5000, R2, 80)], 100).action[0] == ACT_REPLAY
    assert miss(rb, OUT, [(proto, h, 5000, R1, 80)], 100).action[0] == ACT_REPLAY
    ep_a = int(rb.out.get(proto, h, 5000, R2, 80)["new_port"])
    (a,) = [m for m in rb.mappings() if m.eport == ep_a]
    (b,) = [m for m in rb.mappings() if m.eport != ep_a]
    before = rb.counters_dict()["filtered"]
    d = miss(rb, IN, [(proto, R1, 80, a.eaddr, a.eport, ACK if proto == TCP else 0)], 101)
    assert d.action[0] == ACT_DROP and rb.counters_dict()["filtered"] == before + 1
    assert len(rb.out) == 2 and len(rb.inn) == 2
    e = rb.out.get(proto, h, 5000, R1, 80)
    assert (int(e["new_addr"]), int(e["new_port"])) == (b.eaddr, b.eport)
    # a remote no mapping of I:Ip talks to is admitted (endpoint-independent filtering)
    assert miss(rb, IN, [(proto, R3, 80, a.eaddr, a.eport, flags)], 102).action[0] == ACT_REPLAY
    check_consistency(rb)


@settings(max_examples=40, deadline=None)
@given(_OPS, st.sampled_from(["endpoint-independent", "address-and-port-dependent"]),
       st.sampled_from(["endpoint-independent", "address-dependent"]))  # fmt: skip
def test_bookkeeping_matches_tables(ops, mapping, filtering):
    cfg = make_cfg(1, pool="198.18.77.0/31", ports=(1024, 1047), block=4, cap=8, mapping=mapping, filtering=filtering)
    rb = make_rb(cfg)
    hosts = hosts_of(rb, 8)
    now = 100
    held = []
    for op, h, port, r, p in ops:
        remote = (R1, R2, R3, ip("203.0.113.9"))[r]
        rp = 5000 + port if p == ICMP else 80 + port
        if op == "out":
            miss(rb, OUT, [(p, hosts[h], 5000 + port, remote, rp)], now)
        elif op == "in" and rb.mappings():
            m = rb.mappings()[h % len(rb.mappings())]
            miss(rb, IN, [(m.proto, remote, 80 + port, m.eaddr, m.eport)], now)
        elif op == "tick":
            now += (1, 10, 25, 40)[r]
            rb.sweep(now, max_slots=64, max_expire=4)  # small steps: the cursor matters
        elif op == "hold" and rb.mappings():
            m = rb.mappings()[h % len(rb.mappings())]
            rb.hold(m.proto, m.eaddr, m.eport)
            held.append((m.proto, m.eaddr, m.eport))
        elif op == "release" and held:
            rb.release_hold(*held.pop(h % len(held)))
        elif op == "snapshot":
            state = json.loads(json.dumps(rb.snapshot()))
            rb2 = make_rb(cfg, seed=h)
            rb2.out.load_slots(rb.out.slots.copy())
            rb2.inn.load_slots(rb.inn.slots.copy())
            rb2.restore(state)
            rb = rb2
        check_consistency(rb)
        b = owned_bindings([rb])
        assert all(len(w) == 1 for w in b.values())
    for x in held:
        rb.release_hold(*x)
    sweep_all(rb, now + 10_000)
    sweep_all(rb, now + 20_000)
    check_consistency(rb)
    assert len(rb.out) == 0 and not rb.blocks and not rb.hosts and rb.utilisation() == 0.0


@pytest.mark.parametrize("mapping", ["endpoint-independent", "address-and-port-dependent"])
def test_two_nics_fetch_clone_expire_cycle(mapping):
    """Two NICs with a 5-tuple switch: every miss goes where the fast path would send it;
    fetches are served by the owner and installed as clones.  At every step the clones
    agree with their owner's entries, no clone sits on the owner, and owned bindings
    are unique across NICs; when the owner expires a session and the holder drops the
    clone (REVOKE), nothing is left behind."""
    cfg = make_cfg(2, pool="198.18.77.0/31", ports=(1024, 1279), block=8, cap=64, mapping=mapping,
                   filtering="endpoint-independent")  # fmt: skip
    rbs = [make_rb(cfg, k, seed=k + 3) for k in range(2)]
    rng = np.random.default_rng(7)
    hosts = [ip("10.77.2.0") + i for i in range(12)]
    now = 1000
    sessions = set()  # (p, I, Ip, R, Rp) created
    for step in range(150):
        p = [TCP, UDP][int(rng.integers(2))]
        h, sp = hosts[int(rng.integers(len(hosts)))], 3000 + int(rng.integers(4))
        r = ip("203.0.113.0") + int(rng.integers(4))
        nic = int(rng.integers(2))  # the switch's choice for the first packet
        d = miss(rbs[nic], OUT, [(p, h, sp, r, 80, SYN)], now)
        if d.action[0] == ACT_FETCH:
            o = int(d.owner[0])
            recs, st = serve_fetch(rbs[o], OUT, d.fetch_key[:1], now)
            assert st[0] == SERVED
            assert rbs[nic].install_clone(recs, now, dirs=DIR_BIT_OUT) == 1
        else:
            assert d.action[0] == ACT_REPLAY
        sessions.add((p, h, sp, r, 80))
        # the reply lands on a random NIC
        e = None
        for rb in rbs:
            x = rb.out.get(*out_key(p, h, sp, r, 80))
            if x is not None:
                e = (int(x["new_addr"]), int(x["new_port"]))
        assert e is not None
        back = int(rng.integers(2))
        if rbs[back].inn.get(*in_key(p, r, 80, *e)) is None:
            d = miss(rbs[back], IN, [(p, r, 80, *e, SYN | ACK)], now)
            assert d.action[0] == ACT_FETCH and d.owner[0] == 1 - back
            recs, st = serve_fetch(rbs[1 - back], IN, d.fetch_key[:1], now)
            assert st[0] == SERVED
            assert rbs[back].install_clone(recs, now, dirs=DIR_BIT_IN) == 1
        # invariants
        owned = owned_bindings(rbs)
        assert all(len(w) == 1 for w in owned.values())
        for k, rb in enumerate(rbs):
            for tbl, other in ((rb.out, rbs[1 - k].out), (rb.inn, rbs[1 - k].inn)):
                s = tbl.slots[tbl.occupied()]
                for c in s[(s["flags"] & layout.F_CLONE) != 0]:
                    assert rb.part.owner(*((int(c["new_addr"]), int(c["new_port"])) if tbl is rb.out
                                           else (int(c["daddr"]), int(c["dport"])))) == 1 - k  # fmt: skip
                    o = other.get(int(c["proto"]), int(c["saddr"]), int(c["sport"]), int(c["daddr"]), int(c["dport"]))
                    assert o is not None and not o["flags"] & layout.F_CLONE
                    assert (int(o["new_addr"]), int(o["new_port"]), int(o["rule_id"])) == (
                        int(c["new_addr"]), int(c["new_port"]), int(c["rule_id"]))  # fmt: skip
        now += int(rng.integers(0, 3))
    # the owners expire everything; the holders revoke what the owners removed
    for rb in rbs:
        sweep_all(rb, now + 10_000)
    for k, rb in enumerate(rbs):
        removed = rb.drain_removed()
        assert len(removed) > 0
        rbs[1 - k].remove_clone(removed)
    assert all(len(rb.out) == len(rb.inn) == 0 for rb in rbs)
    assert len(sessions) > 50


def test_collect_activity_incremental_scan():
    cfg = make_cfg(2)
    rb0, rb1 = make_rb(cfg, 0, capacity=512), make_rb(cfg, 1)
    hosts = hosts_of(rb1, 4)
    rows = [(UDP, h, 5000 + i, R1, 53) for h in hosts for i in range(10)]
    miss(rb1, OUT, rows, 10)
    recs = np.concatenate([rb1.export_rule(UDP, *mapping_of(rb1, *r)) for r in rows])
    assert rb0.install_clone(recs, 10) == 80
    fl = rb0.out.slots["flags"]
    fl[rb0.out.occupied()] |= layout.F_ACTIVE
    n_slots = len(rb0.out.slots)
    got = []
    for _ in range(-(-n_slots // 100)):
        got.append(rb0.collect_activity(max_slots=100))
    got = np.concatenate(got)
    assert len(got) == 40 and (got["dirs"] == DIR_BIT_OUT).all() and (got["owner"] == 1).all()
    assert sorted(zip(got["iaddr"].tolist(), got["iport"].tolist())) == sorted((r[1], r[2]) for r in rows)
    assert len(rb0.collect_activity()) == 0


def test_serve_fetches_answers_a_batch_as_the_reference_one_by_one():
    """``serve_fetches`` answers a batch of FETCH records as the plain-Python reference
    (``clones_py.serve_fetches``: each record alone, the RULE records built in Python
    from the builder's views) does: statuses, RULE records (the entries' TCP state
    included), and what they leave in the tables and counters -- answered, admitted,
    allocated, refused and malformed records mixed in one call."""
    from hypernat import clones_py

    cfg = make_cfg(1, filtering="endpoint-independent")
    a, b = make_rb(cfg, 0, seed=7), make_rb(cfg, 0, seed=7)
    h1, h2 = hosts_of(a, 2)
    rows_out = [(TCP, h1, 4000, R1, 443, SYN), (UDP, h1, 5000, R2, 53), (ICMP, h2, 77, R1, 77), (TCP, h2, 4001, R3, 80, SYN)]
    for rb in (a, b):
        miss(rb, OUT, rows_out, 5)
        for t in (rb.out, rb.inn):  # activity seen by the fast path: TCP state differs per entry
            for j in t.occupied()[::2]:
                t.slots["last_seen"][j] = 100 + int(j) % 7
                t.slots["tcp_state"][j] = SYN | (FIN if j % 3 == 0 else 0)
    e_tcp, e_udp = mapping_of(a, TCP, h1, 4000, R1, 443), mapping_of(a, UDP, h1, 5000, R2, 53)
    e_icmp = mapping_of(a, ICMP, h2, 77, R1, 77)
    assert e_tcp and e_udp and e_icmp
    k = layout.KIND_ICMP_ERROR
    cases = [  # (fetch_dir, saddr, daddr, sport, dport, proto, kind)
        (IN, R1, e_tcp[0], 443, e_tcp[1], TCP, 0),  # the existing session
        (IN, R2, e_udp[0], 53, e_udp[1], UDP, 0),
        (IN, R1, e_icmp[0], e_icmp[1], e_icmp[1], ICMP, 0),  # ICMP: identifier in both ports
        (IN, R3, e_udp[0], 999, e_udp[1], UDP, 0),  # a new remote: admitted, created
        (IN, R3, e_udp[0], 998, e_udp[1], UDP, k),  # ... but an ICMP error never creates
        (IN, R1, e_tcp[0], 443, e_tcp[1] ^ 1, TCP, 0),  # no mapping there
        (OUT, h1, R2, 4000, 8080, TCP, 0),  # the EIM mapping, a new session
        (OUT, h2, R1, 6000, 53, UDP, 0),  # a new mapping: allocated (the general path)
        (OUT, h1, R1, 4000, 443, TCP, 0),  # the existing session
        (OUT, h2, R2, 6001, 53, UDP, k),  # ICMP error about nothing
        (IN, R1, e_tcp[0], 443, e_tcp[1], 47, 0),  # not TCP / UDP / ICMP
        (OUT, h2, R1, 6002, 53, UDP, 0),  # another new mapping after the general path's
        (OUT, h2, R1, 6000, 53, UDP, 0),  # the mapping this batch allocated
    ]
    recs = fetch_records(np.array([c[0] for c in cases], np.uint8),
                         np.array([c[1:] + (0, 0) for c in cases], layout.KEY_DTYPE), seq0=50)
    revalidate = recs[:1].copy()
    revalidate["flags"] = M.FETCH_F_REVALIDATE
    revalidate["rem_port"] ^= 1  # a session that is not there: looked up only
    recs = np.concatenate([recs, revalidate])
    got = a.serve_fetches(recs, 9, 1234)
    ref = clones_py.serve_fetches(recs, b, 9, 1234)
    assert got[0].dtype == M.RULE_DTYPE and got[0].tobytes() == ref[0].tobytes()
    assert got[1].tolist() == ref[1].tolist() and got[2].tolist() == ref[2].tolist()
    assert got[1].tolist() == [4, 5, 9, 10, 13]
    assert got[2].tolist() == [REASON[x] for x in ("icmp_error_no_session", "no_mapping", "icmp_error_no_session",
                                                   "bad_message", "icmp_error_no_session")]
    rule = got[0]
    assert (rule["owner"] == 0).all() and (rule["lease_ms"] == 1234).all() and ICMP in rule["proto"]
    assert rule["seq"].tolist() == [50 + x for x in range(len(cases)) if x not in got[1]]
    assert (rule["tcp_state"] & FIN).any()
    for r in rule:  # each answer carries both its entries' TCP state
        eo = a.out.get(*out_key(int(r["proto"]), int(r["int_addr"]), int(r["int_port"]), int(r["rem_addr"]),
                                int(r["rem_port"])))
        ei = a.inn.get(*in_key(int(r["proto"]), int(r["rem_addr"]), int(r["rem_port"]), int(r["ext_addr"]),
                               int(r["ext_port"])))
        assert eo is not None and ei is not None and r["tcp_state"] == eo["tcp_state"] | ei["tcp_state"]
    for ta, tb in ((a.out, b.out), (a.inn, b.inn)):
        assert ta.slots.tobytes() == tb.slots.tobytes()
    assert a.counters == b.counters
    # all found (no refusal) the second time: the same records again
    ok = np.isin(np.arange(len(recs)), got[1], invert=True)
    again = a.serve_fetches(recs[ok], 10, 1234)
    assert again[0].tobytes() == rule.tobytes() and not len(again[1])
    # no records: empty answers; anything but FETCH records: a TypeError, nothing served
    none = a.serve_fetches(recs[:0], 10)
    assert none[0].dtype == M.RULE_DTYPE and not len(none[0]) and not len(none[1]) and not len(none[2])
    for wrong in (np.zeros(2, M.RULE_DTYPE), recs.tobytes(), np.zeros((2, 2), M.KEY_DTYPE)):
        with pytest.raises(TypeError):
            a.serve_fetches(wrong, 10)
    assert a.counters == b.counters


def test_serve_fetches_refuses_when_the_tables_are_full():
    """A FETCH that needs a new session while the flow tables are full is refused as
    table_full (a NACK, counted), the other records of the batch still answered.  (On
    the tuple path before, status 0 -- table_full's index -- read as "answered": the
    agent's serving raised TypeError on the missing session.)"""
    cfg = make_cfg(1, filtering="endpoint-independent")
    rb = make_rb(cfg, 0, capacity=4)
    (h,) = hosts_of(rb, 1)
    miss(rb, OUT, [(UDP, h, 5000 + x, R1, 53) for x in range(4)], 5)
    assert len(rb.out) == 4
    e = mapping_of(rb, UDP, h, 5000, R1, 53)
    recs = fetch_records(np.array([IN, IN, OUT], np.uint8),
                         keys_of([(UDP, R1, 53, *e), (UDP, R2, 53, *e), (UDP, h, 6000, R1, 53)]))
    full = rb.counters[REASON["table_full"]]
    rule, bad, why = rb.serve_fetches(recs, 6, 1000)
    assert rule["seq"].tolist() == [1] and rule["ext_port"][0] == e[1]
    assert bad.tolist() == [1, 2] and why.tolist() == [REASON["table_full"]] * 2
    assert rb.counters[REASON["table_full"]] == full + 2


def test_hold_many_counts_as_hold_does():
    cfg = make_cfg(1)
    a, b = make_rb(cfg), make_rb(cfg)
    eps = [(UDP, ip("198.18.77.1"), 1500), (TCP, ip("198.18.77.1"), 1500), (UDP, ip("198.18.77.1"), 1500),
           (ICMP, ip("198.18.77.2"), 7)]
    for e in eps:
        a.hold(*e)
    b.hold_many(np.array([p << 48 | e << 16 | port for p, e, port in eps], np.uint64))  # as LeaseTable.grant answers
    assert a.pool.hold_counts() == b.pool.hold_counts() and b.pool.holds(UDP << 48 | ip("198.18.77.1") << 16 | 1500) == 2
    for e in eps:  # and they are released alike
        a.release_hold(*e)
        b.release_hold(*e)
    assert a.pool.hold_counts() == b.pool.hold_counts() == {}


def test_release_many_frees_as_release_hold_does():
    """Endpoints held by leases (two on one) whose mappings ended: released one key at a
    time or in one ``release_many`` (what a REVOKE_ACK's leases run out as), the port and
    then the block come back at the same moment, the last hold of an endpoint only."""
    cfg = make_cfg(1, **{"timeouts": T})
    rbs = [make_rb(cfg), make_rb(cfg)]
    (h,) = hosts_of(rbs[0], 1)
    keys = []
    for rb in rbs:
        miss(rb, OUT, [(UDP, h, 5000, R1, 53), (UDP, h, 5001, R1, 53)], 100)
        keys = [UDP << 48 | m.eaddr << 16 | m.eport for m in sorted(rb.mappings(), key=lambda m: m.iport)]
        rb.hold_many(np.array([keys[0], keys[0], keys[1]], np.uint64))
        sweep_all(rb, 100 + 1000)  # expired ...
        sweep_all(rb, 100 + 2000)  # ... reuse delay over: only the holds keep the ports
        assert not rb.mappings() and rb.blocks
    a, b = rbs
    for k in (keys[0], keys[1]):
        a.release_hold(k >> 48, (k >> 16) & 0xFFFFFFFF, k & 0xFFFF)
    b.release_many(np.array([keys[0], keys[1]], np.uint64))
    assert a.pool.hold_counts() == b.pool.hold_counts() == {keys[0]: 1}
    assert a.blocks and b.blocks  # keys[0] still held once: its block stays
    a.release_hold(keys[0] >> 48, (keys[0] >> 16) & 0xFFFFFFFF, keys[0] & 0xFFFF)
    b.release_many(np.array([keys[0]], np.uint64))
    assert not a.blocks and not b.blocks and a.utilisation() == b.utilisation() == 0.0
    check_consistency(a)
    check_consistency(b)


def test_incoming_batch_decided_in_one_pass_refusals_counted_fetches_queued():
    """A batch of incoming misses on the owner (the compiled incoming side): the
    session's remote replays, refusals are counted by reason (filtered, unsolicited SYN,
    not in the pool, no mapping), another NIC's endpoint is a fetch to that NIC; served
    as a FETCH on the NIC that does not own it, the same endpoint is refused not_owner."""
    cfg = make_cfg(n_nics=2, filtering="address-and-port-dependent")
    rbs = [make_rb(cfg, nic=k) for k in range(2)]
    h = ip("10.77.0.9")
    o = rbs[0].part.eim_owner(h)
    rb, other = rbs[o], rbs[1 - o]
    r_ip = ip("192.0.2.1")
    assert miss(rb, OUT, [(UDP, h, 5000, r_ip, 53)], 10).action.tolist() == [ACT_REPLAY]
    (p, _, _, ea, ep, _), = [rb.maps.get(x) for x in rb.maps.rule_ids()]
    elsewhere = next((a, q) for a in range(ip("198.18.77.0"), ip("198.18.77.4")) for q in range(1024, 2048)
                     if rb.part.owner(a, q) == 1 - o)
    rows = [(UDP, r_ip, 53, ea, ep), (UDP, r_ip, 54, ea, ep), (TCP, r_ip, 80, ea, ep, SYN),
            (UDP, r_ip, 53, ip("203.0.113.1"), ep), (UDP, r_ip, 53, *elsewhere), (UDP, r_ip, 53, ea, ep + 1)]
    before = list(rb.counters)
    d = miss(rb, IN, rows, 11)
    assert d.action.tolist() == [ACT_REPLAY, ACT_DROP, ACT_DROP, ACT_DROP, ACT_FETCH, ACT_DROP]
    assert d.reason.tolist()[1:4] == [REASON["filtered"], REASON["unsolicited_syn"], REASON["not_in_pool"]]
    assert d.owner[4] == 1 - o and d.fetch_dir[4] == IN
    grew = {n: rb.counters[i] - before[i] for n, i in REASON.items() if rb.counters[i] != before[i]}
    assert grew == {"filtered": 1, "unsolicited_syn": 1, "not_in_pool": 1, "no_mapping": 1}
    _, st = serve_fetch(other, IN, keys_of([(UDP, r_ip, 53, ea, ep)]), 12)
    assert st.tolist() == [REASON["not_owner"]] and other.counters[REASON["not_owner"]] == 1
    recs, st = serve_fetch(rb, IN, keys_of([(UDP, r_ip, 53, ea, ep), (UDP, r_ip, 9, ea, ep)]), 12)
    assert st.tolist() == [SERVED, REASON["filtered"]] and recs["eport"][0] == ep and recs["iaddr"][0] == h
