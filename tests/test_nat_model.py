"""The compiled per-connection state (hypernat/nat/) against tests/nat_model.py.

Same operations, same seed: the same decisions (ports chosen, refusals, masks)."""
import pytest
from hypothesis import given, settings, strategies as st

from nat_model import PortBlocksModel
import test_rules as rules_t  # builders for the expiry twin

from hypernat.nat import _ports as ports  # noqa: E402

OPS = st.lists(
    st.tuples(
        st.sampled_from(["add", "add_full", "remove", "pick", "pick", "pick", "pick_at", "pick_exact", "release"]),
        st.integers(0, 11),  # block id
        st.integers(0, 2),  # protocol index
        st.integers(0, 65535),  # internal port / offset source
    ),
    max_size=160,
)


@settings(max_examples=120, deadline=None)
@given(
    block_size=st.sampled_from([1, 2, 7, 63, 64, 65, 128, 200]),
    parity=st.booleans(),
    seed=st.integers(0, 2**64 - 1),
    lo_odd=st.booleans(),
    ops=OPS,
)
def test_port_blocks_match_model(block_size, parity, seed, lo_odd, ops):
    c = ports.PortBlocks(block_size, parity, seed)
    m = PortBlocksModel(block_size, parity, seed)
    for op, g, pi, x in ops:
        size = block_size - (g % 3 if block_size > 3 else 0)  # some short (last) blocks
        lo = 1024 + g * block_size + int(lo_odd)
        if op in ("add", "add_full"):
            if g in m.blocks:
                with pytest.raises(KeyError):
                    c.add(g, 0, 7, lo, size, 100 + g)
                continue
            c.add(g, 0, 7, lo, size, 100 + g, full=op == "add_full")
            m.add(g, 0, 7, lo, size, 100 + g, full=op == "add_full")
        elif g not in m.blocks:
            assert g not in c
            assert c.release(g, pi, 0) == -1
            if op != "release":
                with pytest.raises(KeyError):
                    c.pick(g, pi, x)
            continue
        elif op == "remove":
            c.remove(g)
            m.remove(g)
        elif op == "pick":
            assert c.pick(g, pi, x) == m.pick(g, pi, x)
        elif op == "pick_exact":
            port = m.blocks[g].lo + x % (block_size + 2) - 1
            assert c.pick_exact(g, pi, port) == m.pick_exact(g, pi, port)
        elif op == "pick_at":
            assert c.pick_at(g, pi, x % (block_size + 2)) == m.pick_at(g, pi, x % (block_size + 2))
        else:
            off = x % (block_size + 1)
            assert c.release(g, pi, off) == m.release(g, pi, off)
        assert len(c) == len(m.blocks) and sorted(c.ids()) == sorted(m.blocks)
    for g in m.blocks:
        assert c.span(g) == (7, m.blocks[g].lo, m.blocks[g].size) and c.host(g) == m.blocks[g].host
        for pi in range(3):
            assert c.used_mask(g, pi) == m.used_mask(g, pi) and c.n_used(g, pi) == m.n_used(g, pi)
        c.set_mask(g, 0, m.used_mask(g, 1))  # a snapshot's masks load back
        assert c.used_mask(g, 0) == m.used_mask(g, 1) and c.n_used(g, 0) == m.n_used(g, 1)


def test_many_blocks_rehash_and_delete():
    """Thousands of blocks in and out (the id table grows, deletes shift entries back)."""
    c = ports.PortBlocks(64, False, 3)
    live = set()
    for g in range(0, 30000, 3):
        c.add(g, 0, 1, 1024, 64, g)
        live.add(g)
    for g in range(0, 30000, 9):
        c.remove(g)
        live.discard(g)
    assert len(c) == len(live) and set(c.ids()) == live and all(c.host(g) == g for g in live)
    assert 9 not in c and 3 in c


@settings(max_examples=80, deadline=None)
@given(
    parity=st.booleans(),
    preserve=st.booleans(),
    seed=st.integers(0, 2**64 - 1),
    ops=st.lists(
        st.tuples(st.sampled_from(["block", "alloc", "alloc", "alloc", "release", "drop_host"]),
                  st.integers(1, 4), st.integers(0, 2), st.integers(0, 300)),
        max_size=200,
    ),
)
def test_hosts_allocate_matches_model(parity, preserve, seed, ops):
    """Hosts.allocate (C) against HostsModel: same block and port for the same inputs and seed."""
    from hypernat.nat import _hosts
    from nat_model import HostsModel

    bs = 16
    pb, mpb = ports.PortBlocks(bs, parity, seed), PortBlocksModel(bs, parity, seed)
    hs, mh = _hosts.Hosts(), HostsModel(mpb)
    next_block = 0
    for op, host, pi, x in ops:
        if host not in mh.h:
            hs.add(host, 0, 7)
            mh.add(host)
        if op == "block":
            g = next_block
            next_block += 1
            pb.add(g, 0, 7, 1000 + bs * g, bs, host)
            mpb.add(g, 0, 7, 1000 + bs * g, bs, host)
            hs.append_block(host, g)
            mh.h[host]["blocks"].append(g)
        elif op == "alloc":
            iport = 1000 + x % (bs * max(1, next_block) + 4)
            assert hs.allocate(host, pi, iport, preserve, pb) == mh.allocate(host, pi, iport, preserve)
        elif op == "release" and mh.h[host]["blocks"]:
            g = mh.h[host]["blocks"][x % len(mh.h[host]["blocks"])]
            assert pb.release(g, pi, x % bs) == mpb.release(g, pi, x % bs)
        elif op == "drop_host":
            for g in mh.h[host]["blocks"]:
                pb.remove(g)
                mpb.remove(g)
            hs.remove(host)
            del mh.h[host]
        if host in mh.h:
            assert hs.blocks(host) == mh.h[host]["blocks"] and hs.cur(host) == mh.h[host]["cur"]
    assert sorted(hs.ids()) == sorted(mh.h)


def test_many_hosts_rehash_and_delete():
    """Thousands of hosts in and out: records (and their block lists) survive the table's
    growth and the backward shifts of deletion."""
    from hypernat.nat import _hosts

    hs = _hosts.Hosts()
    live = set()
    for h in range(1, 20000, 2):
        hs.add(h, h % 5, h * 3)
        hs.append_block(h, h * 10)
        hs.append_block(h, h * 10 + 1)
        live.add(h)
    for h in range(1, 20000, 6):
        hs.remove(h)
        live.discard(h)
    assert len(hs) == len(live) and set(hs.ids()) == live
    assert all(hs.blocks(h) == [h * 10, h * 10 + 1] and hs.addr(h) == h * 3 for h in live)
    hs.remove_block(3, 31)
    assert hs.blocks(3) == [30] and not hs.idle(3)
    hs.remove_block(3, 30)
    assert hs.idle(3)


# ------------------------------------------------------------------------ mappings and sessions
MAP_OPS = st.lists(
    st.tuples(
        st.sampled_from(["new", "new", "add", "add", "add", "end_session", "end_session", "end", "look"]),
        st.integers(0, 7),  # which internal / external endpoint, or which live mapping
        st.integers(0, 3),  # remote address
        st.integers(0, 2),  # remote port
        st.sampled_from([1, 6, 17]),
    ),
    max_size=200,
)


def _same_mappings(c, m):
    """The compiled table holds what the model holds, and its indexes agree."""
    assert c.rule_ids() == sorted(m.m) and len(c) == len(m.m) and c.n_sessions == m.n_sessions
    assert c.n_ids == m.top and c.free_id_list() == m.free
    for rid, (p, ia, ip, ea, ep, g) in m.m.items():
        assert c.get(rid) == (p, ia, ip, ea, ep, g)
        assert c.by_external(p, ea, ep) == rid and c.matches(rid, ia, ip, ea, ep)
        assert c.remotes(rid) == m.remotes(rid) and c.nsessions(rid) == len(m.rem[rid])
        if m.eim:
            assert c.by_out_key(p, ia, ip, 12345, 1) == rid
        for ra, r in m.rem[rid]:
            assert c.has_session(rid, ra, r)
            assert c.by_out_key(p, ia, ip, ra, r) == m.by_out_key(p, ia, ip, ra, r)


@settings(max_examples=150, deadline=None)
@given(eim=st.booleans(), ops=MAP_OPS)
def test_mappings_match_model(eim, ops):
    """Mappings (C) against MappingsModel: the same rule ids (freed ids reused last
    first), lookups, sessions and remote-address answers for the same operations; a
    snapshot of its state (load + put + add_session) rebuilds the same table."""
    from hypernat.nat._mappings import Mappings
    from nat_model import MappingsModel

    c, m = Mappings(eim, 16, True), MappingsModel(eim)  # a small start: the indexes grow
    for op, k, ra, r, p in ops:
        ra += 7 << 24
        live = sorted(m.m)
        if op == "new":
            ia, ip, ea, ep = 10 << 24 | k % 3, 1000 + k, 198 << 24 | k % 2, 2000 + k
            if m.by_external(p, ea, ep) or (eim and m.by_out_key(p, ia, ip, 0, 0)):
                with pytest.raises(KeyError):
                    c.new(p, ia, ip, ea, ep, k)
                continue
            assert c.new(p, ia, ip, ea, ep, k) == m.new(p, ia, ip, ea, ep, k)
        elif not live:
            assert c.end_session(k + 1, ra, r) == -1 and c.get(k + 1) is None
            continue
        else:
            rid = live[k % len(live)]
            if op == "add":
                assert c.add_session(rid, ra, r) == m.add_session(rid, ra, r)
            elif op == "end_session":
                assert c.end_session(rid, ra, r) == m.end_session(rid, ra, r)
            elif op == "end":
                if m.rem[rid]:
                    with pytest.raises(ValueError):
                        c.end(rid)
                else:
                    c.end(rid)
                    m.end(rid)
            else:
                assert c.has_remote_address(rid, ra) == m.has_remote_address(rid, ra)
                assert c.by_out_key(p, 1, 2, ra, r) == m.by_out_key(p, 1, 2, ra, r)
        _same_mappings(c, m)
    assert c.n_pending == len(m.pending)
    c2 = Mappings(eim, 16, True)
    c2.load(c.n_ids, c.free_id_list())
    for rid in c.rule_ids():
        c2.put(rid, *c.get(rid))
        for x in c.remotes(rid):
            c2.add_session(rid, x >> 16, x & 0xFFFF)
    c2.clear_pending()
    assert c2.n_pending == 0
    _same_mappings(c2, m)


def test_mappings_flush_writes_both_entries():
    """The pending sessions become the two flow-table entries of each (ICMP: the
    identifier in both ports), and a session ended before the flush is still written
    (its caller deletes entries it no longer wants)."""
    from hypernat.fastpath import FlowTable
    from hypernat.nat._mappings import Mappings

    c = Mappings(True, 16)
    out, inn = FlowTable(64), FlowTable(64)
    a = c.new(17, 10, 1000, 198, 2000, 0)
    b = c.new(1, 10, 77, 198, 3000, 0)
    assert c.add_session(a, 7, 53) and not c.add_session(a, 7, 53) and c.add_session(b, 8, 0)
    assert c.flush(out, inn, 5) == 2 and c.n_pending == 0 and c.flush(out, inn, 6) == 0
    e = out.get(17, 10, 1000, 7, 53)
    assert (int(e["new_addr"]), int(e["new_port"]), int(e["rule_id"]), int(e["last_seen"])) == (198, 2000, a, 5)
    e = inn.get(17, 7, 53, 198, 2000)
    assert (int(e["new_addr"]), int(e["new_port"]), int(e["rule_id"])) == (10, 1000, a)
    assert out.get(1, 10, 77, 8, 77)["new_port"] == 3000 and inn.get(1, 8, 3000, 198, 3000)["new_port"] == 77
    assert len(out) == len(inn) == 2


def test_mappings_sized_for_their_capacity_never_copy_their_records():
    """Up to the capacity it was made for (the flow tables': a session is an entry in
    each), no mapping or session record array is copied to a larger one -- a doubling of
    10^6 records was a 30-36 ms stall in one batch of setups; beyond it they grow."""
    from hypernat.nat._mappings import Mappings

    n = 3000
    c = Mappings(True, n, True)
    rids = [c.new(17, 10 << 24 | x, 1000, 198 << 24, 1024 + x, 0) for x in range(n)]
    for rid in rids:
        assert c.add_session(rid, 7, 53)
    assert c.regrows == 0 and len(c) == n and c.n_sessions == n
    more = c.new(17, 11 << 24, 1000, 199 << 24, 1024, 0)
    assert c.add_session(more, 7, 53) and c.add_session(more, 8, 53)
    assert c.regrows == 2  # past the capacity: both arrays doubled, nothing lost
    assert c.remotes(more) == sorted([7 << 16 | 53, 8 << 16 | 53]) and c.by_external(17, 198 << 24, 1024) == rids[0]
    assert all(c.remotes(r) == [7 << 16 | 53] for r in rids[::97])


def test_mappings_many_grow_and_shrink():
    """Tens of thousands of mappings and sessions in and out: the indexes grow, rule ids
    are reused, nothing is lost."""
    from hypernat.nat._mappings import Mappings

    c = Mappings(True, 16, True)
    rids = [c.new(6, 10 << 24 | x, 1000 + x % 7, 198 << 24, 1024 + x, x // 64) for x in range(20000)]
    for rid in rids:
        assert c.add_session(rid, 7, 80) and c.add_session(rid, 8, 80)
    assert len(c) == 20000 and c.n_sessions == 40000
    for rid in rids[::2]:
        assert c.end_session(rid, 7, 80) == 1 and c.end_session(rid, 8, 80) == 0
        c.end(rid)
    assert len(c) == 10000 and c.n_sessions == 20000 and not c.has_remote_address(rids[1], 9)
    assert c.has_remote_address(rids[1], 8) and c.by_external(6, 198 << 24, 1024 + 1) == rids[1]
    assert c.new(17, 1, 1, 2, 2, 0) == rids[-2]  # the last freed first


# ------------------------------------------------------------------------ the compiled setup
REASONS = {"not_internal": 10, "icmp_error_no_session": 11, "table_full": 12, "host_rate_limited": 13,
           "not_in_pool": 14, "unsolicited_syn": 15, "no_mapping": 16, "filtered": 17, "not_owner": 18}
VERDICTS = {"miss_out": 1, "miss_in": 2, "miss_icmp_error": 3, "miss_hairpin": 4}
INTERNAL = [(10 << 24, 0xFF000000)]


def _ev_fields(e) -> tuple:
    """A model event (kind, proto, I, Ip, E, Ep, R, Rp, rule id, now) in EVENT_DTYPE's field order."""
    kind, p, ia, ip, ea, ep, ra, rp, rid, now = e
    return (ia, ea, ra, ip, ep, rp, p, kind, rid, now)


def _end_mapping(mp, mm, x) -> None:
    """End the x-th live mapping (and its sessions) in the compiled Mappings `mp` and
    the model `mm`, checking each session's end agrees."""
    rid = sorted(mm.m)[x % len(mm.m)]
    for ra, rr in sorted(mm.rem[rid]):
        assert mp.end_session(rid, ra, rr) == mm.end_session(rid, ra, rr)
    mp.end(rid)
    mm.end(rid)


def _add_host_block(op, ia, nb, bs, hs, mh, pb, mpb) -> int:
    """A "host" op (a new internal host with a first block) or a "block" op (one more
    block of a known host), block `nb`, in both the compiled tables and the models;
    returns the next block number (an address outside 10/8 or a repeat: nothing)."""
    if ia >> 24 != 10 or (op == "host") == (ia in mh.h):
        return nb
    if op == "host":
        hs.add(ia, 0, 198 << 24)
        mh.add(ia)
    pb.add(nb, 0, 198 << 24, 1024 + bs * nb, bs, ia)
    mpb.add(nb, 0, 198 << 24, 1024 + bs * nb, bs, ia)
    hs.append_block(ia, nb)
    mh.h[ia]["blocks"].append(nb)
    return nb + 1


@settings(max_examples=120, deadline=None)
@given(
    eim=st.booleans(),
    parity=st.booleans(),
    preserve=st.booleans(),
    rate=st.sampled_from([0, 0.5, 3]),
    cap=st.integers(1, 40),
    seed=st.integers(0, 2**64 - 1),
    ops=st.lists(
        st.tuples(st.sampled_from(["out"] * 8 + ["host", "block", "tick", "flags", "end"]),
                  st.integers(0, 4), st.sampled_from([1, 6, 6, 17, 17, 47]), st.integers(0, 20), st.integers(0, 3),
                  st.integers(0, 3), st.integers(0, 15)),
        min_size=10,
        max_size=160,
    ),
)
def test_out_setup_matches_model(eim, parity, preserve, rate, cap, seed, ops):
    """OutSetup (C) against OutSetupModel over the same host table, blocks and seed: the
    same answers (session found or added, refusal, or left to the general path), the
    same rule ids and ports, the same state after."""
    from hypernat.nat import _hosts
    from hypernat.nat._mappings import Mappings, OutSetup
    from hypernat.nat._rate import HostRate
    from nat_model import HostRateModel, HostsModel, MappingsModel, OutSetupModel

    bs = 8
    pb, mpb = ports.PortBlocks(bs, parity, seed), PortBlocksModel(bs, parity, seed)
    hs, mh = _hosts.Hosts(), HostsModel(mpb)
    mp, mm = Mappings(eim, 16, False), MappingsModel(eim)
    su = OutSetup(mp, INTERNAL, REASONS, VERDICTS)
    su.bind(hs, pb, HostRate(rate, 2) if rate else None, cap, preserve)
    sm = OutSetupModel(mm, mh, INTERNAL, REASONS, HostRateModel(rate, 2) if rate else None, cap, preserve)
    su.room = sm.room = 1 << 30
    now, nb = 100, 0
    for op, h, p, port, r, x, fl in [("host", h, 0, 0, 0, 0, 0) for h in range(3)] + ops:
        ia = (10 << 24 | h) if h < 4 else (11 << 24 | 1)  # one address outside the prefix
        if op in ("host", "block"):
            nb = _add_host_block(op, ia, nb, bs, hs, mh, pb, mpb)
        elif op == "tick":
            now += x
        elif op == "flags":  # the builder's per-call settings
            su.room = sm.room = x * 4
            su.recovering = sm.recovering = bool(fl & 1)
            su.events.sessions = sm.ev_sessions = bool(fl & 2)
            su.events.mappings = sm.ev_mappings = bool(fl & 4)
        elif op == "end" and mm.m:
            _end_mapping(mp, mm, x)
        elif op == "out":
            args = (p, ia, 1000 + port, 7 << 24 | r, 80 + x, now, fl == 8)
            got = su.out(*args)
            assert got == sm.out(*args), args
            if got == -1:
                assert su.last == sm.last
        assert su.room == sm.room
    assert [tuple(e) for e in su.events.drain().tolist()] == [_ev_fields(e) for e in sm.events]
    assert mp.rule_ids() == sorted(mm.m) and mp.n_sessions == mm.n_sessions and mp.n_pending == len(mm.pending)
    for rid in mm.m:
        assert mp.get(rid) == mm.get(rid) and mp.remotes(rid) == mm.remotes(rid)
    for ia, h in mh.h.items():
        assert [hs.nports(ia, pi) for pi in range(3)] == h["nports"] and hs.cur(ia) == h["cur"]
    for g in mpb.blocks:
        assert [pb.used_mask(g, pi) for pi in range(3)] == [mpb.used_mask(g, pi) for pi in range(3)]
    assert [pb.total_used(pi) for pi in range(3)] == [sum(mpb.n_used(g, pi) for g in mpb.blocks) for pi in range(3)]


def test_out_setup_run_answers_the_common_case_and_stops_at_the_rest():
    """OutSetup.run over a batch's arrays: frames that are not misses are passed over,
    outgoing misses it can answer are answered in order, and it stops, untouched, at
    the first miss it cannot (here: a host not known, then an incoming miss)."""
    import numpy as np

    from hypernat import layout
    from hypernat.nat import _hosts
    from hypernat.nat._mappings import Mappings, OutSetup

    pb, hs, mp = ports.PortBlocks(8, False, 1), _hosts.Hosts(), Mappings(True, 16)
    hs.add(10 << 24 | 1, 0, 198 << 24)
    pb.add(0, 0, 198 << 24, 1024, 8, 10 << 24 | 1)
    hs.append_block(10 << 24 | 1, 0)
    su = OutSetup(mp, INTERNAL, REASONS, VERDICTS)
    su.bind(hs, pb, None, 100, False)
    su.room = 100
    v = np.array([0, 1, 1, 5, 1, 1, 2], np.uint8)
    k = np.zeros(7, layout.KEY_DTYPE)
    k["proto"], k["saddr"], k["sport"], k["daddr"], k["dport"] = 17, 10 << 24 | 1, 5000, 7, 53
    k["sport"][2] = 5001
    k["saddr"][5] = 10 << 24 | 2  # not known here
    idx, res = np.zeros(7, np.int32), np.zeros(7, np.int32)
    fetches, count = np.zeros(7, layout.FETCH_ROW_DTYPE), np.zeros(2, np.int64)
    kb = k.view(np.uint8).reshape(-1)
    assert su.run(v, kb, 0, 1000, idx, res, fetches, count) == 5
    # frame 4: the session of frame 1
    assert list(count) == [3, 0] and list(idx[:3]) == [1, 2, 4] and list(res[:3]) == [-1, -1, -1]
    assert len(mp) == 2 and mp.n_sessions == 2 and mp.n_pending == 2
    assert su.run(v, kb, 6, 1000, idx, res, fetches, count) == 6  # an incoming miss: not its case
    assert su.run(v[:4], kb, 3, 1000, idx, res, fetches, count) == 4 and list(count) == [3, 0]
    with pytest.raises(ValueError):
        su.run(v, kb[:32], 0, 1000, idx, res, fetches, count)


@settings(max_examples=120, deadline=None)
@given(
    eim=st.booleans(),
    raddr=st.booleans(),
    preserve=st.booleans(),
    rate=st.sampled_from([0, 3]),
    cap=st.integers(1, 40),
    seed=st.integers(0, 2**64 - 1),
    ops=st.lists(
        st.tuples(st.sampled_from(["out"] * 12 + ["other", "run", "host", "block", "flags", "end"]),
                  st.integers(0, 4), st.sampled_from([1, 6, 17, 17, 47]), st.integers(0, 12), st.integers(0, 2),
                  st.integers(0, 2), st.integers(0, 15)),
        min_size=10,
        max_size=200,
    ),
)
def test_out_setup_run_matches_model(eim, raddr, preserve, rate, cap, seed, ops):
    """OutSetup.run over batches of outgoing misses (up to 60 frames, other frames
    between them) against the model's run: while it runs, the external- and session-
    index writes of its setups wait in a ring (Mappings.defer) and are done a few
    setups later; the lookups meanwhile (a later frame of the same session, of the same
    internal endpoint, an external endpoint's check) must see them, and the indexes
    after must hold what the model holds, the indexes small enough to grow meanwhile.
    Where run stops (the general path's miss) the batch goes on from the next frame,
    as ``RuleBuilder.decide_misses`` does."""
    import numpy as np

    from hypernat import layout
    from hypernat.nat import _hosts
    from hypernat.nat._mappings import Mappings, OutSetup
    from hypernat.nat._rate import HostRate
    from nat_model import HostRateModel, HostsModel, MappingsModel, OutSetupModel

    bs = 8
    pb, mpb = ports.PortBlocks(bs, False, seed), PortBlocksModel(bs, False, seed)
    hs, mh = _hosts.Hosts(), HostsModel(mpb)
    mp, mm = Mappings(eim, 16, raddr), MappingsModel(eim)
    su = OutSetup(mp, INTERNAL, REASONS, VERDICTS)
    su.bind(hs, pb, HostRate(rate, 2) if rate else None, cap, preserve)
    sm = OutSetupModel(mm, mh, INTERNAL, REASONS, HostRateModel(rate, 2) if rate else None, cap, preserve)
    su.room = sm.room = 1 << 30
    now, nb, batch = 100, 0, []

    def run_batch():
        n = len(batch)
        v = np.array([1 if b[0] == "out" else 0 for b in batch], np.uint8)
        keys = [(ia, 7 << 24 | r, 1000 + port, 80 + x, p, 0, 0x02 if p == 6 else 0)
                for _, ia, p, port, r, x in batch]
        kb = np.zeros(n, layout.KEY_DTYPE)
        for j, k in enumerate(keys):
            kb[j] = k + (0,)
        ci, cr = np.zeros(n, np.int32), np.zeros(n, np.int32)
        cf, cn = np.zeros(n, layout.FETCH_ROW_DTYPE), np.zeros(2, np.int64)
        mi, mr = [], []
        j = 0
        while j < n:
            got = su.run(v, kb.view(np.uint8).reshape(-1), j, now, ci, cr, cf, cn)
            assert got == sm.run(v.tolist(), keys, j, now, mi, mr, [])
            assert cn[1] == 0 and ci[:cn[0]].tolist() == mi and cr[:cn[0]].tolist() == mr
            j = got + 1  # (the general path's: left untouched by both)
        batch.clear()

    for op, h, p, port, r, x, fl in [("host", h, 0, 0, 0, 0, 0) for h in range(3)] + ops:
        ia = (10 << 24 | h) if h < 4 else (11 << 24 | 1)  # one address outside the prefix
        if op in ("out", "other"):
            batch.append((op, ia, p, port, r, x))
            if len(batch) < 60:
                continue
        if batch:
            run_batch()
        if op in ("host", "block"):
            nb = _add_host_block(op, ia, nb, bs, hs, mh, pb, mpb)
        elif op == "flags":
            su.room = sm.room = x * 8 + fl
        elif op == "end" and mm.m:
            _end_mapping(mp, mm, x)
        now += 1
    if batch:
        run_batch()
    assert su.room == sm.room
    assert mp.rule_ids() == sorted(mm.m) and mp.n_sessions == mm.n_sessions and mp.n_pending == len(mm.pending)
    for rid in mm.m:
        q, ia, ip, ea, ep, _ = mm.get(rid)
        assert mp.get(rid) == mm.get(rid) and mp.remotes(rid) == mm.remotes(rid)
        assert mp.by_external(q, ea, ep) == rid
        for rem in mp.remotes(rid):
            ra, rr = rem >> 16, rem & 0xFFFF
            assert mp.has_session(rid, ra, rr) and mp.by_out_key(q, ia, ip, ra, rr) == rid
            if raddr:
                assert mp.has_remote_address(rid, ra)
        if raddr:  # the (rid, R) counts: right after the sessions end one by one too
            for rem in mp.remotes(rid):
                mp.end_session(rid, rem >> 16, rem & 0xFFFF)
                assert mp.has_remote_address(rid, rem >> 16) == any(
                    o >> 16 == rem >> 16 for o in mp.remotes(rid))


def test_out_setup_run_checks_the_external_index_of_its_deferred_writes():
    """An external endpoint mapped already (here: put in the index behind the port
    blocks' back) is a KeyError from run, as from a single setup: the deferred write
    checks the index when it is done."""
    import numpy as np

    from hypernat import layout
    from hypernat.nat import _hosts
    from hypernat.nat._mappings import Mappings, OutSetup

    pb, hs, mp = ports.PortBlocks(8, False, 1), _hosts.Hosts(), Mappings(True, 16)
    hs.add(10 << 24 | 1, 0, 198 << 24)
    pb.add(0, 0, 198 << 24, 1024, 8, 10 << 24 | 1)
    hs.append_block(10 << 24 | 1, 0)
    mp.new(17, 10 << 24 | 9, 7, 198 << 24, 1027, 0)  # (the block's port 1027, its bit not set)
    su = OutSetup(mp, INTERNAL, REASONS, VERDICTS)
    su.bind(hs, pb, None, 100, True)  # preserving: internal port 1027 takes 1027
    su.room = 100
    v = np.ones(3, np.uint8)
    k = np.zeros(3, layout.KEY_DTYPE)
    k["proto"], k["saddr"], k["sport"], k["daddr"], k["dport"] = 17, 10 << 24 | 1, [1025, 1027, 1026], 7, 53
    idx, res = np.zeros(3, np.int32), np.zeros(3, np.int32)
    fetches, count = np.zeros(3, layout.FETCH_ROW_DTYPE), np.zeros(2, np.int64)
    with pytest.raises(KeyError, match="mapped already"):
        su.run(v, k.view(np.uint8).reshape(-1), 0, 1000, idx, res, fetches, count)
    assert mp.by_external(17, 198 << 24, 1025) != 0  # the write before it was done


def _bind_in(su, sm, nic, filtering, part):
    """The incoming side of both, over one hypernat.partition.Partition: the C code gets
    its geometry (loans and all, as RuleBuilder._bind_setup does), the model the owner
    written out in plain Python from the partition's description and loans
    (tests/wire_model.py: owner_reference)."""
    from wire_model import owner_reference

    su.bind_in(nic, filtering, part.geometry)
    sm.bind_in(nic, filtering, lambda a, q: owner_reference(part, a, q))


@settings(max_examples=120, deadline=None)
@given(
    eim=st.booleans(),
    filtering=st.sampled_from(["endpoint-independent", "address-dependent", "address-and-port-dependent"]),
    strategy=st.sampled_from(["by-port", "by-address"]),
    nic=st.integers(0, 2),
    seed=st.integers(0, 2**64 - 1),
    ops=st.lists(
        st.tuples(st.sampled_from(["out"] * 4 + ["in"] * 6 + ["serve"] * 2 + ["host", "block", "flags", "end", "lend"]),
                  st.integers(0, 3), st.sampled_from([1, 6, 6, 17, 17, 47]), st.integers(0, 40), st.integers(0, 3),
                  st.integers(0, 3), st.sampled_from([0, 0x02, 0x12, 0x10, 0x11])),
        min_size=10,
        max_size=160,
    ),
)
def test_in_setup_matches_model(eim, filtering, strategy, nic, seed, ops):
    """OutSetup's incoming side (in_, run inbound, serve) against OutSetupModel: the same
    owner (C geometry against Partition.owner), the same filtering answers, unsolicited
    SYNs, room, the same sessions added, the same refusals counted, the same state;
    blocks lent to and by this NIC on the way (``Partition.lend`` / ``return_block``):
    an endpoint in a lent block is answered in C like any other."""
    import numpy as np

    from hypernat import layout
    from hypernat import messages as M
    from hypernat.nat import _hosts
    from hypernat.nat._mappings import Mappings, OutSetup
    from hypernat.partition import Partition
    from nat_model import HostsModel, MappingsModel, OutSetupModel

    bs = 8
    pb, mpb = ports.PortBlocks(bs, False, seed), PortBlocksModel(bs, False, seed)
    hs, mh = _hosts.Hosts(), HostsModel(mpb)
    mp, mm = Mappings(eim, 16, True), MappingsModel(eim)
    su = OutSetup(mp, INTERNAL, REASONS, VERDICTS)
    su.bind(hs, pb, None, 1 << 20, False)
    sm = OutSetupModel(mm, mh, INTERNAL, REASONS)
    part = Partition(["198.0.0.0/31", "197.0.0.4/32"], 1024, 1024 + 40 * bs - 1, 3, strategy, bs)
    _bind_in(su, sm, nic, filtering, part)
    su.room = sm.room = 1 << 30
    now, nb = 100, 0
    for op, h, p, port, r, x, fl in [("host", h, 0, 0, 0, 0, 0) for h in range(3)] + ops:
        ia = 10 << 24 | h
        if op in ("host", "block"):
            if (op == "host") == (ia in mh.h):
                continue
            if op == "host":
                hs.add(ia, 0, 198 << 24)
                mh.add(ia)
            ea = (198 << 24) | (nb & 1)
            pb.add(nb, 0, ea, 1024 + bs * (nb // 2), bs, ia)
            mpb.add(nb, 0, ea, 1024 + bs * (nb // 2), bs, ia)
            hs.append_block(ia, nb)
            mh.h[ia]["blocks"].append(nb)
            nb += 1
        elif op == "flags":  # the builder's per-call settings
            su.room = sm.room = x * 4
            su.events.sessions = sm.ev_sessions = bool(fl & 2)
        elif op == "lend":  # a block of a live mapping's endpoint or of any: lent, or given back
            rids = sorted(mm.m)
            if rids and port % 2:
                _, _, _, ea, ep, _ = mm.get(rids[x % len(rids)])
            else:
                ea, ep = [198 << 24, 198 << 24 | 1, 197 << 24 | 4][h % 3], 1000 + port * 8
            g = part.block_of(ea, ep)
            if g >= 0:
                if fl == 0x11:
                    part.return_block(g)
                else:
                    part.lend(g, (nic + 1 + r) % 3)  # r == 2: back to this NIC
        elif op == "end" and mm.m:
            _end_mapping(mp, mm, x)
        elif op == "out":
            args = (p, ia, 1000 + port, 7 << 24 | r, 80 + x, now)
            assert su.out(*args) == sm.out(*args), args
        else:
            # remote endpoints and external ones: a live mapping's, or any (in the pool or not)
            keys = []
            for k in range(4):
                rids = sorted(mm.m)
                if rids and (port + k) % 3:
                    q, _, _, ea, ep, _ = mm.get(rids[(x + k) % len(rids)])
                else:
                    ea = [198 << 24, 198 << 24 | 1, 197 << 24 | 4, 199 << 24][(h + k) % 4]
                    q, ep = p, 1000 + port * 8 + k
                keys.append((7 << 24 | (r + k) % 3, ea, 80 + (x + k) % 2, ep, q, int(fl == 0x11 and k == 1),
                             fl if q == 6 else 0))
            if op == "in":
                for ra, ea, rp, ep, q, kind, f in keys[:1]:
                    args = (q, ra, rp, ea, ep, f, bool(kind), now)
                    got = su.in_(*args)
                    assert got == sm.in_(*args), args
                    if got == -1:
                        assert su.last == sm.last
                    if got == -2:
                        assert su.fetch_owner == sm.fetch_owner
                v = np.array([2, 0, 3, 2], np.uint8)
                kb = np.zeros(4, layout.KEY_DTYPE)
                for j, (ra, ea, rp, ep, q, kind, f) in enumerate(keys):
                    kb[j] = (ra, ea, rp, ep, q, kind, f, 0)
                ci, cr = np.zeros(4, np.int32), np.zeros(4, np.int32)
                cf, cn = np.zeros(4, layout.FETCH_ROW_DTYPE), np.zeros(2, np.int64)
                mi, mr, mf = [], [], []
                start = x % 2
                got = su.run(v, kb.view(np.uint8).reshape(-1), start, now, ci, cr, cf, cn, True)
                assert got == sm.run(v.tolist(), keys, start, now, mi, mr, mf, True)
                m, nf = cn.tolist()
                assert ci[:m].tolist() == mi and cr[:m].tolist() == mr
                assert [tuple(f) for f in cf[:nf][["frame", "owner", "fetch_dir", "proto", "saddr", "sport", "daddr",
                                                  "dport", "kind", "tcp_flags"]].tolist()] == mf
            else:  # serve: FETCH records both ways (ICMP-error and revalidating ones look up only)
                recs = M.records(M.T_FETCH, 4)
                for k, (ra, ea, rp, ep, q, kind, f) in enumerate(keys):
                    flags = M.FETCH_F_ICMP_ERROR if kind else (M.FETCH_F_REVALIDATE if k == 2 and fl == 0x10 else 0)
                    if (k + x) % 2 and k < 3:  # by external endpoint
                        recs[k] = (k, 0, q, M.FETCH_BY_EXTERNAL, 0, flags, 0, ea, ra, 0, ep, rp, 0)
                    else:
                        recs[k] = (k, 0, q, M.FETCH_BY_INTERNAL, 0, flags, 10 << 24 | h, 0, ra, 1000 + port, 0, rp, 0)
                rules, cs = su.serve_arrays(recs)
                ms, ma = [0] * 4, {}
                got = su.serve(recs, 0, now, rules, cs)
                assert got == sm.serve(recs.tolist(), 0, now, ms, ma)
                assert cs.tolist() == ms
                assert {j: tuple(rules[j][["seq", "rule_id", "rem_addr", "rem_port"]].tolist()) for j in range(4)
                        if cs[j] == -1} == ma
        assert su.room == sm.room
        now += 1
    counted = [0] * 19
    su.drain(counted)
    assert counted == [sm.refused[k] for k in range(19)]
    assert [tuple(e) for e in su.events.drain().tolist()] == [_ev_fields(e) for e in sm.events]
    assert mp.rule_ids() == sorted(mm.m) and mp.n_sessions == mm.n_sessions and mp.n_pending == len(mm.pending)
    for rid in mm.m:
        assert mp.get(rid) == mm.get(rid) and mp.remotes(rid) == mm.remotes(rid)
        for ra in range(3):
            assert mp.has_remote_address(rid, 7 << 24 | ra) == mm.has_remote_address(rid, 7 << 24 | ra)


def test_in_setup_owner_matches_partition():
    """The compiled owner of an external endpoint is Partition.owner's and the plain
    Python arithmetic's, over several prefixes (out of order), both strategies, ports
    inside and outside the range, with blocks lent and given back."""
    from wire_model import owner_reference

    from hypernat.nat._mappings import Mappings, OutSetup
    from hypernat.partition import Partition
    from nat_model import HostsModel, MappingsModel, OutSetupModel

    for strategy in ("by-port", "by-address"):
        part = Partition(["203.0.113.0/29", "198.51.100.0/30", "192.0.2.7/32"], 2000, 2999, 3, strategy, 64)
        su = OutSetup(Mappings(True, 16), INTERNAL, REASONS, VERDICTS)
        _bind_in(su, OutSetupModel(MappingsModel(True), HostsModel(None), INTERNAL, REASONS), 0, "address-dependent",
                 part)
        bound = part.geometry
        for loans in ({}, {0: 2, 17: 0, part.n_blocks - 1: 1}, {17: 0}):  # lent, then some given back
            for g in set(part.overrides) - set(loans):
                part.return_block(g)
            for g, o in loans.items():
                part.lend(g, o)
            assert part.geometry is bound  # the same object: the loans reach OutSetup without a rebind
            for base in (203 << 24 | 113, 198 << 24 | 51 << 16 | 100 << 8, 192 << 24 | 2 << 8):
                for a in range(base - 1, base + 10):
                    for port in (1999, 2000, 2063, 2064, 2500, 2999, 3000):
                        want = owner_reference(part, a, port)
                        assert su.owner(a, port) == want == part.owner(a, port), (strategy, loans, a, port)


# -- idle expiry (hypernat/nat/_expire.pyx) ----------------------------------------------
_TCP, _UDP, _ICMP = 6, 17, 1
_R = [0xC6336401 + k for k in range(4)]  # 198.51.100.1..4


def _expiry_twin(n_nics, log, behaviour, seed, impl="c"):
    """Two builders alike (a: the flow tables of `impl`, "c" or "py": fastpath_py's)."""
    import io

    import numpy as np

    from hypernat import fastpath_py
    from hypernat.fastpath import FlowTable
    from hypernat.translog import TransLog
    mapping, filtering = behaviour
    cfg = rules_t.make_cfg(n_nics, pool="198.18.77.0/28", ports=(1024, 4095), block=16, mapping=mapping,
                           filtering=filtering)
    rbs, bufs = [], []
    for _ in range(2):
        buf = io.StringIO()
        tl = None if log == "off" else TransLog(buf, "per-rule", remote=log == "remote", clock=lambda: 1.5)
        ft = fastpath_py.FlowTable if impl == "py" and not rbs else FlowTable
        rbs.append(rules_t.RuleBuilder(cfg, 0, ft(2048), ft(2048), rng=np.random.default_rng(seed), translog=tl))
        bufs.append(buf)
    return cfg, rbs, bufs


EXPIRY_SESSIONS = st.lists(
    st.tuples(
        st.sampled_from([_TCP, _TCP, _UDP, _ICMP]),
        st.integers(0, 2),  # host
        st.integers(0, 2),  # internal port (a few: sessions share mappings)
        st.integers(0, 3),  # remote
        st.integers(0, 255),  # out last_seen back from now
        st.integers(0, 255),  # in last_seen back from now
        st.integers(0, 7),  # _TCP flags out
        st.integers(0, 7),  # _TCP flags in
        st.integers(0, 19),  # 0: orphan (rule id 0), 1: in entry a clone, else plain
    ),
    min_size=1,
    max_size=60,
)


@settings(max_examples=30, deadline=None)
@given(
    sessions=EXPIRY_SESSIONS,
    n_nics=st.sampled_from([1, 2]),
    log=st.sampled_from(["off", "local", "remote"]),
    behaviour=st.sampled_from([("endpoint-independent", "address-and-port-dependent"),
                               ("endpoint-independent", "address-dependent"),
                               ("address-and-port-dependent", "endpoint-independent")]),
    seed=st.integers(0, 2**32 - 1),
    steps=st.lists(st.integers(0, 200), min_size=1, max_size=3),
    impl=st.sampled_from(["c", "c", "py"]),
)
def test_compiled_expiry_matches_model(sessions, n_nics, log, behaviour, seed, steps, impl):
    """Idle expiry's compiled per-session work (hypernat/nat/_expire.pyx, through
    ``RuleBuilder.sweep``) against ``ExpiryModel`` (the Python loop it replaced) on a
    twin builder: same sessions, activity and sweeps -> the same entries left (and merged
    last_seen), sessions expired per class, mappings ended, reuse-delay entries, REVOKE
    records and translation-log lines; over compiled flow tables or the plain-Python
    reference's (``impl``)."""
    import numpy as np

    from hypernat import layout
    from hypernat.nat.expiry import EXPIRY_EVENTS
    from hypernat.verdicts import OUT
    from nat_model import ExpiryModel
    cfg, (a, b), (buf_a, buf_b) = _expiry_twin(n_nics, log, behaviour, seed, impl)
    hosts = rules_t.hosts_of(a, 3)
    now = 1000
    rows, seen = [], set()
    for p, h, i, r, *_ in sessions:
        ip_ = 3000 + i
        row = (p, hosts[h], ip_, _R[r], ip_ if p == _ICMP else 80 + r)
        if row not in seen:
            seen.add(row)
            rows.append(row)
    for rb in (a, b):
        rules_t.miss(rb, OUT, rows, now - 300)
    assert np.array_equal(a.out.slots, b.out.slots) and np.array_equal(a.inn.slots, b.inn.slots)
    # activity, _TCP state, orphans and clone in-entries: the same on both
    for (p, h, i, r, lo, li, fo, fi, kind), row in zip(sessions, rows):
        for rb in (a, b):
            jo = rb.out.lookup(*_exp_out_key(row))
            if jo < 0:
                continue
            o = rb.out.slots
            ji = rb.inn.lookup(*_exp_in_key(row, int(o["new_addr"][jo]), int(o["new_port"][jo])))
            o["last_seen"][jo] = now - lo
            o["tcp_state"][jo] = fo if p == _TCP else 0
            if kind == 0:
                o["rule_id"][jo] = 0
            if ji >= 0:
                s = rb.inn.slots
                s["last_seen"][ji] = now - li
                s["tcp_state"][ji] = fi if p == _TCP else 0
                if kind == 1:
                    s["flags"][ji] |= layout.F_CLONE
    model = ExpiryModel(cfg.timeouts)
    big = 1 << 20
    for d in steps:
        now += d
        res = a.sweep(now, max_slots=big, max_expire=big, budget_us=1e12)
        b.release_due(now, max(big, 16))
        expired, ended = model.expire(b, model.candidates(b, now), now)
        assert (res.expired, res.mappings_removed) == (expired, ended)
        assert np.array_equal(a.out.slots, b.out.slots)
        assert np.array_equal(a.inn.slots, b.inn.slots)
        assert {k: a.events[k] for k in EXPIRY_EVENTS} == model.events
        want = np.array(model.removed, rules_t.SESSION_DTYPE) if model.removed else np.zeros(0, rules_t.SESSION_DTYPE)
        model.removed = []
        assert a.drain_removed().tobytes() == want.tobytes()
        assert buf_a.getvalue() == buf_b.getvalue()
    for rid in range(1, 2 * len(rows) + 2):
        assert a.maps.get(rid) == b.maps.get(rid)
    assert sorted(a.hosts.ids()) == sorted(b.hosts.ids())
    for h in a.hosts.ids():
        assert [a.hosts.nports(h, pi) for pi in range(3)] == [b.hosts.nports(h, pi) for pi in range(3)]
    assert a.pool.waiting() == b.pool.waiting()  # the reuse-delay queues


def _exp_out_key(row):
    p, ia, ip_, ra, rp = row
    return (p, ia, ip_, ra, ip_) if p == _ICMP else row


def _exp_in_key(row, ea, ep):
    p, ia, ip_, ra, rp = row
    return (p, ra, ep, ea, ep) if p == _ICMP else (p, ra, rp, ea, ep)


def test_timeout_class_is_expirys():
    """Expiry.timeout_for reads the compiled class (one classification): every TCP flag
    combination each way, and the other protocols."""

    from hypernat.nat import _expire
    from hypernat.nat.expiry import EXPIRY_EVENTS
    from nat_model import ExpiryModel
    cfg = rules_t.make_cfg()
    rb = rules_t.make_rb(cfg)
    m = ExpiryModel(cfg.timeouts)
    for p in (_TCP, _UDP, _ICMP, 58):
        for fo in range(8):
            for fi in range(8):
                assert rb.timeout_for(p, fo, fi) == m.timeout_for(p, fo, fi)
                assert EXPIRY_EVENTS[_expire.timeout_class(p, fo, fi)] == m.event(p, fo, fi)


@settings(max_examples=150, deadline=None)
@given(
    rows=st.lists(
        st.tuples(
            st.sampled_from([0, 0, 1, 1, 1, 3]),  # flags: empty, occupied, occupied clone
            st.sampled_from([6, 17, 1]),
            st.integers(0, 400),  # idle for
            st.integers(0, 0xFFFF),  # lease
        ),
        min_size=24,
        max_size=96,
    ),
    lo=st.integers(0, 12),
    span=st.integers(0, 128),
    now=st.sampled_from([5, 400, 1000, 70000]),
    budget=st.integers(1, 12),
    lease_clones=st.booleans(),
)
def test_out_candidates_match_model(rows, lo, span, now, budget, lease_clones):
    """The sweep's candidate choice in C (``_expire.out_candidates``) against the numpy
    filter it replaced (``ExpiryModel.select``): the same slots, the same slice end (the
    mass-expiry and budget cuts), for owned entries, clones with leases and empty slots."""
    from hypernat.fastpath import FlowTable
    from hypernat.nat import _expire
    from nat_model import ExpiryModel

    cfg = rules_t.make_cfg()
    t = cfg.timeouts
    tab = FlowTable(64)
    s = tab.slots  # written directly: the choice reads the slot words, not the hashing
    for k, (fl, p, idle, lease) in enumerate(rows[: len(s)]):
        s["flags"][k], s["proto"][k] = fl, p if fl else 0
        s["last_seen"][k] = max(0, now - idle) if fl else 0
        s["lease"][k] = lease if fl & 2 else 0
    m = ExpiryModel(t)
    hi = min(lo + span, len(s))
    lo = min(lo, hi)
    t_tcp = min(t.tcp_transitory, t.tcp_established)
    own, clones, got_hi = _expire.out_candidates(tab, lo, hi, now, min(t_tcp, t.udp, t.icmp), t_tcp, t.udp, t.icmp,
                                                 budget, lease_clones)  # fmt: skip
    want_sel, want_hi = m.select(s, lo, hi, now, budget, lease_clones)
    assert got_hi == want_hi
    assert own.tolist() == [k for k in want_sel.tolist() if not s["flags"][k] & 2]
    assert clones.tolist() == [k for k in want_sel.tolist() if s["flags"][k] & 2]
