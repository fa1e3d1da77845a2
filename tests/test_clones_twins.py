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
