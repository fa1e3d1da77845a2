"""The owner's ACTIVITY merge (``hypernat.nat._activity.merge_activity``): over the
compiled flow tables (one C lookup per record and direction) against the same rule over
fastpath_py's tables (the reference) -- the same sessions updated, the same slots after,
for owned entries, clones, entries that translate elsewhere, ICMP queries, TCP bits,
older and newer last_seen, one direction or both."""
import numpy as np
import pytest

from hypernat import fastpath_py, layout
from hypernat.nat._activity import merge_activity
from hypernat.nat.records import DIR_BIT_IN, DIR_BIT_OUT, SESSION_DTYPE, in_key, out_key

_fastpath = pytest.importorskip("hypernat._fastpath")

E = 0xC6120001


def _sessions(rng, n):
    s = np.zeros(n, SESSION_DTYPE)
    s["proto"] = rng.choice([6, 17, 1], n)
    s["iaddr"] = 0x0A000000 + rng.integers(0, 50, n)
    s["iport"] = rng.integers(1000, 1100, n)
    s["eaddr"] = E
    s["eport"] = rng.integers(1024, 60000, n)
    s["raddr"] = 0xCB007100 + rng.integers(0, 50, n)
    s["rport"] = np.where(s["proto"] == layout.PROTO_ICMP, 0, rng.integers(1, 2000, n))
    s["rule_id"] = rng.integers(1, 1 << 20, n)
    return s


def _install(tables, sess, rng):
    """Each session's two entries: owned, or a clone (F_CLONE), at last_seen 100."""
    out, inn = tables
    clone = rng.random(len(sess)) < 0.2
    for r, c in zip(sess, clone):
        fl = layout.F_CLONE if c else 0
        p = int(r["proto"])
        ok = out_key(p, int(r["iaddr"]), int(r["iport"]), int(r["raddr"]), int(r["rport"]))
        ik = in_key(p, int(r["raddr"]), int(r["rport"]), int(r["eaddr"]), int(r["eport"]))
        out.insert(*ok, int(r["eaddr"]), int(r["eport"]), rule_id=int(r["rule_id"]), now=100, flags=fl)
        inn.insert(*ik, int(r["iaddr"]), int(r["iport"]), rule_id=int(r["rule_id"]), now=100, flags=fl)


@pytest.mark.parametrize("seed", range(5))
def test_compiled_activity_merge_equals_the_reference(seed):
    rng = np.random.default_rng(seed)
    sess = _sessions(rng, 300)
    tables = {"c": (_fastpath.FlowTable(1024), _fastpath.FlowTable(1024)),
              "py": (fastpath_py.FlowTable(1024), fastpath_py.FlowTable(1024))}
    for impl in tables:
        _install(tables[impl], sess, np.random.default_rng(seed + 100))
    for rnd in range(3):
        rep = sess[rng.integers(0, len(sess), 400)].copy()  # reports: known, repeated, ...
        unknown = _sessions(rng, 40)  # ... and sessions not here
        rep = np.concatenate([rep, unknown])
        rep["last_seen"] = rng.integers(50, 200, len(rep))  # older or newer than the entries'
        rep["dirs"] = rng.choice([0, DIR_BIT_OUT, DIR_BIT_IN, DIR_BIT_OUT | DIR_BIT_IN], len(rep))
        rep["tcp_out"] = rng.integers(0, 256, len(rep))
        rep["tcp_in"] = rng.integers(0, 256, len(rep))
        moved = rng.random(len(rep)) < 0.1  # the endpoint translates elsewhere now
        rep["eport"][moved] ^= 1
        rep["iaddr"][moved] ^= 1
        got = {impl: merge_activity(*tables[impl], rep) for impl in tables}
        assert got["c"] == got["py"]
        assert 0 < got["c"] < len(rep)
        for tc, tp in zip(*tables.values()):
            assert (tc.slots == tp.slots).all()
    out = tables["c"][0].slots
    owned = (out["flags"] & layout.F_OCCUPIED).astype(bool) & ~(out["flags"] & layout.F_CLONE).astype(bool)
    assert (out["last_seen"][owned] > 100).any()  # newer reports moved last_seen
    clones = (out["flags"] & layout.F_CLONE).astype(bool)
    assert (out["last_seen"][clones] == 100).all() and (out["tcp_state"][clones] == 0).all()  # clones untouched


def test_records_of_another_dtype_are_refused():
    out, inn = _fastpath.FlowTable(64), _fastpath.FlowTable(64)
    with pytest.raises(TypeError, match="SESSION_DTYPE"):
        merge_activity(out, inn, np.zeros(3, layout.KEY_DTYPE))
    assert merge_activity(out, inn, np.zeros(0, SESSION_DTYPE)) == 0
