"""Clone install: the compiled batch (``hypernat._clones``, over the compiled FlowTable's
.pxd) against its plain-Python reference (``hypernat.clones_py``, over fastpath_py's
table): the same results and the same slots for the same rows, owned entries in the way,
repeated keys, ICMP queries, tcp bits, leases and a table that fills up."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_rules import R1, R2, hosts_of, make_cfg, make_rb, miss

from hypernat import clones_py, fastpath_py, layout
from hypernat import messages as M
from hypernat.rules import SESSION_DTYPE

_clones = pytest.importorskip("hypernat._clones")
_fastpath = pytest.importorskip("hypernat._fastpath")

_WIRE = ("proto", "int_addr", "int_port", "ext_addr", "ext_port", "rem_addr", "rem_port", "rule_id")
_SES = ("proto", "iaddr", "iport", "eaddr", "eport", "raddr", "rport", "rule_id")


def _records(rows, layout_):
    """rows (proto, I, Ip, E, Ep, R, Rp, rule_id, tcp_out, tcp_in) as RULE records (the
    wire layout: no tcp fields) or SESSION_DTYPE records."""
    if layout_ == "rule":
        recs, names = M.records(M.T_RULE, len(rows)), _WIRE
    else:
        recs, names = np.zeros(len(rows), SESSION_DTYPE), _SES + ("tcp_out", "tcp_in")
    for k, name in enumerate(names):
        recs[name] = [r[k] for r in rows]
    return recs


def _rows(rng, n):
    return [(int(rng.choice([6, 17, 1, 6, 17, 47])), 0x0A000000 + int(rng.integers(0, 8)),
             int(rng.integers(1000, 1010)),
             0xC6120001, int(rng.integers(1024, 1040)), 0xCB007100 + int(rng.integers(0, 4)),
             int(rng.integers(50, 54)), int(rng.integers(1, 1 << 32)), int(rng.integers(0, 256)),
             int(rng.integers(0, 256))) for _ in range(n)]


def _tables(capacity):
    tables = {}
    for impl, mod in (("c", _fastpath), ("py", fastpath_py)):
        tables[impl] = (mod.FlowTable(capacity), mod.FlowTable(capacity))
        for t in tables[impl]:  # a few owned entries in the way
            for k in range(3):
                t.insert(6, 0x0A000000 + k, 1000 + k, 0xCB007100 + k, 50 + k, 1, 2, rule_id=7)
                t.insert(6, 0xCB007100 + k, 50 + k, 0xC6120001, 1024 + k, 3, 4, rule_id=7)
    return tables


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("capacity", [8, 4096])
@pytest.mark.parametrize("layout_", ["session", "rule"])
def test_compiled_clone_install_equals_the_reference(seed, capacity, layout_):
    rng = np.random.default_rng(seed)
    tables = _tables(capacity)
    me = int(rng.integers(0, 3))
    both = 0
    for rnd in range(4):
        recs = _records(_rows(rng, 60), layout_)
        own = rng.integers(0, 3, 60)
        dirs = rng.integers(0, 4, 60).astype(np.uint8)
        idx = None if rnd == 0 else rng.integers(0, 60, int(rng.integers(0, 80)))  # a selection, repeats too
        lease = int(rng.choice([0, 0, 700]))
        got_c = _clones.install_records(*tables["c"], recs, idx, dirs, own, me, 100 + rnd, lease)
        got_py = clones_py.install_records(*tables["py"], recs, idx, dirs, own, me, 100 + rnd, lease)
        assert got_c[0].dtype == got_py[0].dtype == np.int8
        assert got_c[0].tolist() == got_py[0].tolist() and got_c[1:] == got_py[1:]
        for tc, tp in zip(*tables.values()):
            assert len(tc) == len(tp)
            assert (tc.slots == tp.slots).all()
        both += int((got_c[0] == 2).sum())
    got, bad, full = got_c
    assert bad > 0 and (full > 0) == (capacity == 8)
    assert both or capacity == 8
    assert (tables["c"][0].slots["flags"] & layout.F_CLONE).any()


def test_install_records_refuses_a_record_array_without_the_fields():
    t = _fastpath.FlowTable(64), _fastpath.FlowTable(64)
    with pytest.raises(TypeError, match="rem_port"):
        _clones.install_records(*t, np.zeros(2, M.KEY_DTYPE[["seq", "proto", "int_addr", "ext_addr", "rem_addr",
                                                              "int_port", "ext_port", "rule_id"]]),
                                None, 3, 1, 0, 1, 0)
    with pytest.raises(IndexError):
        _clones.install_records(*t, M.records(M.T_RULE, 2), [2], 3, 1, 0, 1, 0)
    with pytest.raises(IndexError):
        clones_py.install_records(*t, M.records(M.T_RULE, 2), [-1], 3, 1, 0, 1, 0)


_row = st.tuples(st.sampled_from([1, 6, 17, 47]), st.integers(0x0A000000, 0x0A000003), st.integers(1000, 1003),
                 st.just(0xC6120001), st.integers(1024, 1027), st.integers(0xCB007100, 0xCB007102),
                 st.integers(50, 52), st.integers(0, (1 << 32) - 1), st.just(0), st.just(0))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.lists(_row, max_size=24), st.integers(0, 3), st.integers(0, 2),
                          st.booleans()), min_size=1, max_size=4),
       st.sampled_from([8, 256]))
def test_rule_batches_install_the_reference_entries(batches, capacity):
    """A RULE message's records installed as received (the compiled path, read in place)
    give the same flow-table entries and answers as the plain-Python reference, and as
    the same sessions given as SESSION_DTYPE records: batch after batch, repeated keys,
    owned entries in the way, own endpoints, full tables."""
    tables = _tables(capacity)
    ses = {"c": (_fastpath.FlowTable(capacity), _fastpath.FlowTable(capacity))}
    for t, u in zip(tables["c"], ses["c"]):  # the same owned entries
        for k in range(3):
            u.insert(6, 0x0A000000 + k, 1000 + k, 0xCB007100 + k, 50 + k, 1, 2, rule_id=7)
            u.insert(6, 0xCB007100 + k, 50 + k, 0xC6120001, 1024 + k, 3, 4, rule_id=7)
    for rnd, (rows, d, me, some) in enumerate(batches):
        rule = _records(rows, "rule")
        own = [(r[4] + me) % 3 for r in rows]
        idx = list(range(0, len(rows), 2)) if some else None
        got = [_clones.install_records(*tables["c"], rule, idx, d, own, me, 50 + rnd, 0),
               clones_py.install_records(*tables["py"], rule, idx, d, own, me, 50 + rnd, 0),
               _clones.install_records(*ses["c"], _records(rows, "session"), idx, d, own, me, 50 + rnd, 0)]
        assert got[0][0].tolist() == got[1][0].tolist() == got[2][0].tolist()
        assert got[0][1:] == got[1][1:] == got[2][1:]
        for tc, tp, ts in zip(tables["c"], tables["py"], ses["c"]):
            assert (tc.slots == tp.slots).all() and (tc.slots == ts.slots).all()


def _norm(pairs):
    return sorted(pairs)


@pytest.mark.parametrize("seed", range(4))
def test_compiled_clone_table_equals_the_reference(seed):
    """The same operations on both clone tables (installs with refusals, repeats, lease
    renewals, removals, lease ends, growth past the initial capacity): the same answers,
    the same clones, the same indexes."""
    rng = np.random.default_rng(seed)
    tabs = [_clones.CloneTable(16), clones_py.CloneTable(16)]
    pool = [(int(rng.choice([6, 17, 1])), 0x0A000000 + int(rng.integers(0, 6)), 1000 + int(rng.integers(0, 3)),
             0xC6120001, 1024 + int(rng.integers(0, 5)), 0xCB007100 + int(rng.integers(0, 3)),
             50 + int(rng.integers(0, 3))) for _ in range(120)]
    now = 10.0
    most = 0
    for step in range(60):
        now += float(rng.random())
        op = int(rng.integers(0, 5))
        if op <= 1:
            owner = int(rng.integers(0, 3))
            n = int(rng.integers(1, 30))
            recs = M.records(M.T_RULE, n)
            for x in range(n):
                sk = pool[int(rng.integers(0, len(pool)))]
                for f, v in zip(_WIRE, sk + (int(rng.integers(1, 99)),)):
                    recs[f][x] = v
            recs["lease_ms"] = rng.integers(500, 5000, n)
            dirs = rng.integers(1, 4, n).astype(np.uint8) if step % 3 else int(rng.integers(1, 4))
            idx = None if op == 0 else rng.integers(0, n, int(rng.integers(0, n + 1)))
            ok = [int(x) for x in rng.integers(-1, 3, n + 1)]
            calls = []

            def install(r, todo, d, ok=ok, calls=calls):
                calls.append((todo.tolist(), np.broadcast_to(d, (n,)).tolist()))
                return np.array(ok[:len(todo)], np.int8)
            got = [t.install(owner, recs, idx, dirs, now, 0.5, install) for t in tabs]
            assert got[0][:2] == got[1][:2] and got[0][2].tolist() == got[1][2].tolist()
            assert len(calls) in (0, 2) and (not calls or calls[0] == calls[1])
        elif op == 2 and len(tabs[1]):
            sk = list(tabs[1]._c)[int(rng.integers(0, len(tabs[1])))]
            o = int(rng.integers(0, 3))
            assert tabs[0].extend(sk, o, now + 3) == tabs[1].extend(sk, o, now + 3)
        elif op == 3 and len(tabs[1]):
            sk = list(tabs[1]._c)[int(rng.integers(0, len(tabs[1])))]
            assert tabs[0].remove(sk) == tabs[1].remove(sk)
            assert tabs[0].remove(sk) is None
        else:
            d = [sorted(t.due_now(now, 0.5)) for t in tabs]
            assert d[0] == d[1]
            for sk in d[0]:
                for t in tabs:
                    t.remove(sk)
        c, py = tabs
        assert len(c) == len(py) and _norm(c.items()) == _norm(py.items())
        assert c.owners() == py.owners()
        for o in list(py.owners()) + [3, 255]:
            assert _norm(c.of_owner(o)) == _norm(py.of_owner(o))
            # the restart report's records: the same set, one per clone of that owner
            rep = [t.owner_records(o) for t in tabs]
            assert rep[0].dtype == rep[1].dtype == M.ACTIVITY_DTYPE and len(rep[0]) == len(rep[1])
            assert sorted(r.tobytes() for r in rep[0]) == sorted(r.tobytes() for r in rep[1])
            assert sorted(zip(*(rep[0][f].tolist() for f in _WIRE))) == sorted(
                sk + (cl.rule_id,) for sk, cl in py.of_owner(o))
        for sk in py.keys():
            assert sk in c and c[sk] == py[sk] and _norm(c.at(sk[0], sk[3], sk[4])) == _norm(py.at(sk[0], sk[3], sk[4]))
        assert c.next_due == py.next_due or (not len(c) and c.next_due >= py.next_due)
        most = max(most, len(c))
    assert most > 16 or seed  # grew past its first capacity (seed 0 at least)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), eim=st.booleans(),
       filtering=st.sampled_from(["endpoint-independent", "address-dependent", "address-and-port-dependent"]))
def test_compiled_fetch_serving_equals_the_reference(seed, eim, filtering):
    """RuleBuilder.serve_fetches (compiled: OutSetup.serve over the records, the general
    path for what it leaves, the RULE records written in C) and the plain-Python
    reference (clones_py.serve_fetches: one record at a time, the RULE records built in
    Python) on twin builders: the same RULE records, refusals, tables and counters, for
    random FETCH records both ways -- existing sessions, new ones, new mappings, other
    NICs' endpoints and hosts, ICMP-error and revalidating look-ups, unknown protocols."""
    rng = np.random.default_rng(seed)
    cfg = make_cfg(2, filtering=filtering, mapping="endpoint-independent" if eim else "address-and-port-dependent")
    a, b = make_rb(cfg, 0, seed=seed & 0xFFFF), make_rb(cfg, 0, seed=seed & 0xFFFF)
    hosts = hosts_of(a, 3) + [0x0A4D0000 + int(rng.integers(1, 250))]
    rows = [(int(rng.choice([1, 6, 17])), hosts[int(rng.integers(3))], 4000 + int(rng.integers(6)),
             R1 + int(rng.integers(3)), 53) for _ in range(12)]
    for rb in (a, b):
        miss(rb, 0, rows, 5)
        for t in (rb.out, rb.inn):
            t.slots["tcp_state"][t.occupied()[::3]] = 0x12
    ext = [(int(x["proto"]), int(x["new_addr"]), int(x["new_port"])) for x in a.out.slots[a.out.occupied()]]
    for batch in range(3):
        n = int(rng.integers(1, 40))
        recs = M.records(M.T_FETCH, n)
        for x in range(n):
            flags = int(rng.choice([0, 0, 0, M.FETCH_F_ICMP_ERROR, M.FETCH_F_REVALIDATE]))
            ra, rp = R1 + int(rng.integers(3)) if rng.integers(2) else R2, 53 + int(rng.integers(2))
            if ext and rng.integers(2):
                p, ea, ep = ext[int(rng.integers(len(ext)))]
                ep ^= int(rng.integers(2)) * int(rng.integers(1, 9))
                recs[x] = (x, 0, p if rng.integers(8) else 47, M.FETCH_BY_EXTERNAL, 0, flags, 0, ea, ra, 0, ep, rp, 0)
            else:
                p = int(rng.choice([1, 6, 17, 47]))
                recs[x] = (x, 0, p, M.FETCH_BY_INTERNAL, 0, flags, hosts[int(rng.integers(4))], 0, ra,
                           4000 + int(rng.integers(8)), 0, rp, 0)
        got = a.serve_fetches(recs, 6 + batch, 777)
        ref = clones_py.serve_fetches(recs, b, 6 + batch, 777)
        assert got[0].tobytes() == ref[0].tobytes()
        assert got[1].tolist() == ref[1].tolist() and got[2].tolist() == ref[2].tolist()
        assert len(got[0]) + len(got[1]) == n
        for ta, tb in ((a.out, b.out), (a.inn, b.inn)):
            assert ta.slots.tobytes() == tb.slots.tobytes()
        assert a.counters == b.counters


# ------------------------------------------------------------------------------------------
# The holder's batch operations over record arrays: activity, lease renewal, revocation
# ------------------------------------------------------------------------------------------
def _clone_rules(rng, n):
    """RULE records of `n` distinct sessions (ICMP ones distinct by (proto, I, Ip, E, Ep,
    R) too, so an ICMP entry names one clone), their owners 0..3."""
    rows, heads = [], set()
    while len(rows) < n:
        p = int(rng.choice([6, 17, 1]))
        row = (p, 0x0A000000 + int(rng.integers(0, 4)), int(rng.integers(1000, 1006)), 0xC6120001,
               int(rng.integers(1024, 1030)), 0xCB007100 + int(rng.integers(0, 3)), int(rng.integers(50, 53)))
        if row[:6] in heads:
            continue
        heads.add(row[:6])
        rows.append(row)
    recs = M.records(M.T_RULE, n)
    for k, f in enumerate(_WIRE[:7]):
        recs[f] = [r[k] for r in rows]
    recs["rule_id"] = rng.integers(1, 1 << 32, n)
    recs["lease_ms"] = rng.integers(1000, 5000, n)
    return recs


def _twin_tables(rng, n):
    """The compiled and the reference clone table holding the same clones (owners 0..3,
    directions 1, 2 or both)."""
    recs = _clone_rules(rng, n)
    owner = rng.integers(0, 4, n)
    dirs = rng.integers(1, 4, n).astype(np.uint8)
    tables = (_clones.CloneTable(16), clones_py.CloneTable())
    for t in tables:
        for o in range(4):
            t.install(o, recs, np.flatnonzero(owner == o), dirs, 10.0, 0.5,
                      lambda r, todo, d: np.ones(len(todo), np.int8))
    return tables, recs


def _state(t):
    return sorted((sk, tuple(c)) for sk, c in t.items())


@pytest.mark.parametrize("seed", range(8))
def test_compiled_clone_activity_equals_the_reference(seed):
    """Collected entries (exact, ICMP without the remote identifier, both directions of
    one session, entries of no clone) become the same ACTIVITY records, grouped by owner,
    both directions of a session in one record."""
    rng = np.random.default_rng(seed)
    tables, recs = _twin_tables(rng, 40)
    m = 120
    act = np.zeros(m, SESSION_DTYPE)
    pick = rng.integers(0, len(recs), m)
    for f_s, f_w in zip(_SES[:8], _WIRE):
        act[f_s] = recs[f_w][pick]
    act["dirs"] = rng.integers(0, 4, m)
    act["last_seen"] = rng.integers(90, 110, m)
    act["tcp_out"] = rng.integers(0, 8, m) * (act["dirs"] == 1)
    act["tcp_in"] = rng.integers(0, 8, m) * (act["dirs"] == 2)
    icmp = act["proto"] == 1
    act["rport"][icmp] = 0  # an ICMP entry does not carry the remote identifier
    stray = rng.random(m) < 0.1
    act["iport"][stray] = 999  # no clone
    got = [t.activity(act, 100) for t in tables]
    assert got[0][0].dtype == got[1][0].dtype == M.ACTIVITY_DTYPE
    assert got[0][0].tobytes() == got[1][0].tobytes()
    assert got[0][1] == got[1][1]
    out, groups = got[0]
    sessions = list(zip(*(out[f].tolist() for f in _WIRE[:7])))
    assert len(set(sessions)) == len(sessions)  # one record per session
    assert sum(k for _, _, k in groups) == len(out) and len(groups) > 1
    for owner, first, k in groups:
        assert all(tables[0].get(sk).owner == owner for sk in sessions[first:first + k])
    assert (out["tcp_flags"] == out["tcp_out"] | out["tcp_in"]).all()
    assert len(out) < int(np.count_nonzero(~stray))  # merged: fewer records than entries of clones
    if (~stray & icmp).any():  # found by the table key among the clones on its endpoint
        assert (out["proto"] == 1).any()


@pytest.mark.parametrize("seed", range(6))
def test_compiled_clone_lease_and_revoke_batches_equal_the_reference(seed):
    rng = np.random.default_rng(seed)
    tables, recs = _twin_tables(rng, 40)
    lease = recs[rng.integers(0, len(recs), 30)].copy()
    lease["int_port"][:5] = 999  # not held
    lease["lease_ms"] = rng.integers(0, 20000, 30)
    for src in range(4):
        got = [t.extend_records(lease, src, 11.0) for t in tables]
        assert got[0] == got[1] and sum(got[0]) == 30
        assert _state(tables[0]) == _state(tables[1])
    key = M.records(M.T_REVOKE, 30)
    for f in _WIRE[:7]:
        key[f] = lease[f]
    held = [t.owned_by(key, 2) for t in tables]
    assert held[0].dtype == np.int8 and held[0].tolist() == held[1].tolist()
    assert set(held[0].tolist()) >= {0, -1}
    sel = np.flatnonzero(held[0] > 0)
    gone = [t.remove_records(key, sel) for t in tables]
    assert gone[0].dtype == SESSION_DTYPE and gone[0].tobytes() == gone[1].tobytes()
    assert (gone[0]["owner"] == 2).all()
    assert len(gone[0]) == len({tuple(key[list(_WIRE[:7])][x].tolist()) for x in sel.tolist()})
    assert _state(tables[0]) == _state(tables[1])
    rest = [t.remove_records(key) for t in tables]  # every record: the other owners' clones
    assert rest[0].tobytes() == rest[1].tobytes() and len(rest[0]) and not (rest[0]["owner"] == 2).any()
    assert _state(tables[0]) == _state(tables[1])
