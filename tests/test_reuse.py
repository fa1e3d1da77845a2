"""The compiled reuse delay and holds (hypernat.nat._reuse.EndpointReuse) against their
readable reference (tests/reuse_model.py), and PortBlocks.release_many against one
release at a time in tests/nat_model.py's PortBlocksModel: same decisions for the same
operations."""
import numpy as np
from hypothesis import given, settings, strategies as st

from nat_model import PortBlocksModel
from reuse_model import ReuseModel

from hypernat.nat import _ports
from hypernat.nat._expire import ENDED_DTYPE
from hypernat.nat._reuse import EndpointReuse

# a few endpoints (so holds, parks and releases meet), plus keys using all 64 bits
KEYS = st.one_of(
    st.sampled_from([6 << 48 | 0xC6120001 << 16 | p for p in (1024, 1025, 65535)]
                    + [17 << 48 | 0xC6120002 << 16 | p for p in (0, 1024)] + [1 << 48 | 7 << 16]),
    st.integers(0, 2**63 - 1),
)
ENDED = st.tuples(st.integers(0, 40), KEYS, st.integers(0, 2**40), st.integers(0, 2), st.integers(0, 65535))
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("defer"), st.lists(ENDED, max_size=12), st.booleans()),
        st.tuples(st.just("due"), st.integers(0, 8), st.integers(0, 10)),
        st.tuples(st.just("hold"), st.lists(KEYS, max_size=12)),
        st.tuples(st.just("release"), st.lists(KEYS, max_size=12)),
        st.tuples(st.just("restore")),
    ),
    max_size=60,
)


def _state(r):
    return (len(r), r.stats(), r.waiting().tolist(), sorted(r.hold_counts().tolist()), sorted(r.held().tolist()))


@settings(max_examples=200, deadline=None)
@given(OPS)
def test_compiled_reuse_decides_as_the_model(ops):
    """defer / due / hold / release / snapshot-restore in any order: the same endpoints
    freed (in the same order), the same ones parked, the same counts and gauges.  The
    compiled index starts at 16 keys (it grows) and its ring at 64 records (it wraps
    and grows)."""
    c, m = EndpointReuse(capacity=16), ReuseModel()
    now = 0
    for o in ops:
        if o[0] == "defer":  # release times in order (one delay), or any order (a reload)
            recs = [(now + d if o[2] else d, k, g, pi, off) for d, k, g, pi, off in o[1]]
            if o[2]:
                recs.sort()
            a = np.array(recs, ENDED_DTYPE)
            c.defer(a[::2] if len(a) > 3 else a)  # (a strided selection too)
            m.defer(a[::2] if len(a) > 3 else a)
        elif o[0] == "due":
            now += o[1]
            (nc, fc), (nm, fm) = c.due(now, o[2]), m.due(now, o[2])
            assert nc == nm and fc.tolist() == fm.tolist() and fc.dtype == fm.dtype
        elif o[0] == "hold":
            keys = np.array(o[1], np.uint64)
            c.hold(keys)
            m.hold(keys)
        elif o[0] == "release":
            keys = np.array(o[1], np.uint64)
            assert c.release(keys).tolist() == m.release(keys).tolist()
        else:  # a snapshot read back into a fresh one
            snap = c.snapshot()
            assert [x.tolist() for x in snap[:1]] == [m.snapshot()[0].tolist()]
            c = EndpointReuse(capacity=16)
            c.restore(*snap)
        assert _state(c) == _state(m)
        for k in {int(x[1]) for x in o[1]} if o[0] == "defer" else ():
            assert c.holds(k) == m.holds(k)


def test_many_holds_grow_the_index_and_leave_it():
    """10^4 endpoints held twice, parked, 10^4 more held (the index grows), all released:
    every parked one freed once, nothing left."""
    r = EndpointReuse(capacity=16)
    keys = (17 << 48 | 0x0A000001 << 16) + np.arange(10000, dtype=np.uint64)
    r.hold(keys)
    r.hold(keys)
    ended = np.zeros(len(keys), ENDED_DTYPE)
    ended["release_at"], ended["ekey"], ended["block"], ended["offset"] = 5, keys, np.arange(len(keys)) // 64, 3
    r.defer(ended)
    assert r.due(5, 10**9)[1].size == 0 and r.stats() == {"ports_waiting_reuse": 0, "endpoints_held": 10000,
                                                          "holds": 20000}
    more = keys + np.uint64(1 << 32)  # the index grows with every endpoint parked: none lost
    r.hold(more)
    assert r.stats()["endpoints_held"] == 10000 and len(r.held()) == 10000 and r.holds(int(keys[7])) == 2
    assert r.release(more).size == 0
    assert r.release(keys).size == 0
    freed = r.release(keys[::-1])
    assert freed["block"].tolist() == (np.arange(len(keys)) // 64)[::-1].tolist()
    assert r.stats() == {"ports_waiting_reuse": 0, "endpoints_held": 0, "holds": 0} and r.hold_counts().size == 0


@settings(max_examples=80, deadline=None)
@given(
    used=st.lists(st.tuples(st.integers(0, 5), st.integers(0, 2), st.integers(0, 9)), max_size=40),
    rel=st.lists(st.tuples(st.integers(0, 7), st.integers(0, 2), st.integers(-1, 10)), max_size=40),
)
def test_release_many_frees_as_release_does(used, rel):
    """release_many over (block, pidx, offset) arrays: the ports, counts and blocks left
    empty (in the order they emptied) as one ``release`` at a time; blocks not here,
    offsets outside a block, ports not in use passed over."""
    c, m = _ports.PortBlocks(10, False, 1), PortBlocksModel(10, False, 1)
    for g in range(6):
        c.add(g, 0, 7, 1000 + 10 * g, 10 - g % 2, 100 + g)
        m.add(g, 0, 7, 1000 + 10 * g, 10 - g % 2, 100 + g)
    for g, pi, off in used:
        assert c.pick_at(g, pi, off) == m.pick_at(g, pi, off)
    a = np.array(rel, [("block", "<i8"), ("pidx", "<i4"), ("offset", "<i4")])
    emptied = [g for g, pi, off in rel if m.release(g, pi, off) == 0]
    assert c.release_many(a["block"], a["pidx"], a["offset"]).tolist() == emptied
    for g in range(6):
        assert [c.used_mask(g, pi) for pi in range(3)] == [m.used_mask(g, pi) for pi in range(3)]


def test_builder_snapshot_keeps_waiting_held_and_parked_endpoints():
    """A restart from a snapshot loses nothing of the reuse delay: the endpoints waiting,
    the holds, the endpoints parked under their holds come back (through JSON), and the
    last releases free the same ports in both builders."""
    import json

    import test_rules as rt

    cfg = rt.make_cfg(1, block=4)
    rb = rt.make_rb(cfg)
    hosts = rt.hosts_of(rb, 3)
    rt.miss(rb, rt.OUT, [(p, h, 5000 + i, rt.R1, 80) for p in (rt.TCP, rt.UDP) for h in hosts for i in range(5)], 10)
    held = [(m.proto, m.eaddr, m.eport) for m in rb.mappings() if m.proto == rt.UDP][:6]
    keys = np.array([p << 48 | e << 16 | ep for p, e, ep in held], np.uint64)
    rb.hold_many(keys)
    rb.hold_many(keys[:2])
    rt.sweep_all(rb, 50)  # UDP gone: waiting
    rt.sweep_all(rb, 50 + cfg.timeouts.reuse_delay)  # the held ones parked, the rest freed
    rt.miss(rb, rt.OUT, [(rt.UDP, hosts[0], 7000, rt.R2, 80)], 50 + cfg.timeouts.reuse_delay)
    rt.sweep_all(rb, 60 + cfg.timeouts.reuse_delay + cfg.timeouts.udp)  # one more waiting
    st = rb.pool.stats()
    assert st["endpoints_held"] == 6 and st["holds"] == 8 and st["ports_waiting_reuse"] == 1, st
    rb2 = rt.make_rb(cfg, seed=9)
    rb2.out.load_slots(rb.out.slots.copy())
    rb2.inn.load_slots(rb.inn.slots.copy())
    rb2.restore(json.loads(json.dumps(rb.snapshot())))
    for a, b in ((rb.pool.waiting(), rb2.pool.waiting()), (rb.pool.held(), rb2.pool.held()),
                 (rb.pool.hold_counts(), rb2.pool.hold_counts())):
        assert a == b and a
    for r in (rb, rb2):
        r.release_many(keys)
        assert r.pool.stats()["endpoints_held"] == 2  # still held once
        r.release_many(keys[:2])
    assert rb.pool.stats() == rb2.pool.stats() and rb.pool.stats()["endpoints_held"] == 0
    assert sorted(rb.blocks.ids()) == sorted(rb2.blocks.ids())
    for g in rb.blocks.ids():
        assert [rb.blocks.used_mask(g, pi) for pi in range(3)] == [rb2.blocks.used_mask(g, pi) for pi in range(3)]


def test_the_builders_holds_index_is_sized_for_its_flow_tables():
    """Every leased endpoint is a session of this NIC: the builder sizes the holds'
    index for its flow tables, so holding as many endpoints as they take never grows it
    (a doubling at 10^6 holds would be a stall of tens of ms on the loop).  The index
    given `capacity` takes that many held endpoints as it is."""
    import test_rules as rt

    rb = rt.make_rb(rt.make_cfg(1))
    room = min(rb.out.capacity, rb.inn.capacity)
    assert rb.pool.holds_capacity() >= room
    r = EndpointReuse(capacity=5000)
    cap = r.capacity
    r.hold((6 << 48 | 0x0A000001 << 16) + np.arange(5000, dtype=np.uint64))
    assert r.stats()["endpoints_held"] == 0 and r.hold_counts().size == 5000 and r.capacity == cap
