"""Clone install: the compiled batch (``hypernat._clones``, over the compiled FlowTable's
.pxd) against its plain-Python reference (``hypernat.clones_py``, over fastpath_py's
table): the same results and the same slots for the same rows, owned entries in the way,
repeated keys, ICMP queries, tcp bits, leases and a table that fills up."""
import numpy as np
import pytest

from hypernat import clones_py, fastpath_py, layout

_clones = pytest.importorskip("hypernat._clones")
_fastpath = pytest.importorskip("hypernat._fastpath")


def _rows(rng, n):
    rows = []
    for _ in range(n):
        p = int(rng.choice([6, 17, 1, 6, 17, 47]))
        rows.append((p, 0x0A000000 + int(rng.integers(0, 8)), int(rng.integers(1000, 1010)),
                     0xC6120001, int(rng.integers(1024, 1040)), 0xCB007100 + int(rng.integers(0, 4)),
                     int(rng.integers(50, 54)), int(rng.integers(1, 1 << 32)), int(rng.integers(0, 4)),
                     int(rng.integers(0, 256)), int(rng.integers(0, 256))))
    return rows


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("capacity", [8, 4096])
def test_compiled_clone_install_equals_the_reference(seed, capacity):
    rng = np.random.default_rng(seed)
    tables = {}
    for impl, mod in (("c", _fastpath), ("py", fastpath_py)):
        tables[impl] = (mod.FlowTable(capacity), mod.FlowTable(capacity))
        for t in tables[impl]:  # a few owned entries in the way
            for k in range(3):
                t.insert(6, 0x0A000000 + k, 1000 + k, 0xCB007100 + k, 50 + k, 1, 2, rule_id=7)
                t.insert(6, 0xCB007100 + k, 50 + k, 0xC6120001, 1024 + k, 3, 4, rule_id=7)
    me = int(rng.integers(0, 3))
    for rnd in range(4):
        rows = _rows(rng, 60)
        own = [int(rng.integers(0, 3)) for _ in rows]
        lease = int(rng.choice([0, 0, 700]))
        got_c = _clones.install_clone_rows(*tables["c"], rows, own, me, 100 + rnd, lease)
        got_py = clones_py.install_clone_rows(*tables["py"], rows, own, me, 100 + rnd, lease)
        assert got_c == got_py
        for tc, tp in zip(*tables.values()):
            assert len(tc) == len(tp)
            assert (tc.slots == tp.slots).all()
    got, bad, full = got_c
    assert bad > 0 and (full > 0) == (capacity == 8)
    assert any(g == 2 for g in got) or capacity == 8
    flags = tables["c"][0].slots["flags"]
    assert (flags & layout.F_CLONE).any()


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
    for step in range(60):
        now += float(rng.random())
        op = int(rng.integers(0, 5))
        if op <= 1:
            owner = int(rng.integers(0, 3))
            items = [(pool[int(rng.integers(0, len(pool)))], int(rng.integers(1, 99)),
                      int(rng.integers(500, 5000)), int(rng.integers(1, 4))) for _ in range(int(rng.integers(1, 30)))]
            ok = [int(x) for x in rng.integers(-1, 3, len(items))]
            calls = []

            def rows_fn(rows, tick, ok=ok, calls=calls):
                calls.append(list(rows))
                return ok[:len(rows)]
            got = [t.install(owner, items, now, 0.5, rows_fn, 7, True) for t in tabs]
            assert got[0] == got[1]
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
        for o in py.owners():
            assert _norm(c.of_owner(o)) == _norm(py.of_owner(o))
        for sk in py.keys():
            assert sk in c and c[sk] == py[sk] and _norm(c.at(sk[0], sk[3], sk[4])) == _norm(py.at(sk[0], sk[3], sk[4]))
        assert c.next_due == py.next_due or (not len(c) and c.next_due >= py.next_due)
    assert len(tabs[1]) > 16 or seed  # grew past its first capacity (seed 0 at least)


def test_compiled_fetch_serving_equals_the_reference():
    """serve_fetches, compiled and reference: the same rows asked of the builder and the
    same RULE records, identities and refusals for the same answers."""
    from hypernat import messages as M

    _serve = pytest.importorskip("hypernat._serve")
    rng = np.random.default_rng(3)
    for n in (1, 2, 40):
        recs = M.records(M.T_FETCH, n)
        for x in range(n):
            recs[x] = (1000 + x, 0, int(rng.choice([6, 17, 1])), int(rng.integers(0, 2)), 0,
                       int(rng.choice([0, 2, 4])), 0x0A000001 + x, 0xC6120001, 0xCB007101 + x,
                       2000 + x, 3000 + x, 443, 0)
        asked = []

        def serve_rows(rows, tick):
            asked.append((list(rows), tick))
            return [(0, (r[1], 0xC6120001, r[2], r[3], 3000 + i, r[4], r[5], 3, 77 + i, tick, i & 7, 8, 0, 0))
                    if i % 3 else (5, None) for i, r in enumerate(rows)]
        got_c = _serve.serve_fetches(recs, serve_rows, 9, 2, 30000)
        got_py = clones_py.serve_fetches(recs, serve_rows, 9, 2, 30000)
        assert asked[0] == asked[1]
        assert got_c[0].tobytes() == got_py[0].tobytes() and got_c[1:] == got_py[1:]
        assert len(got_c[0]) + len(got_c[2]) == n and (got_c[0]["owner"] == 2).all()
