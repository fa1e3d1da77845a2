"""The flow table: unit tests and a hypothesis state machine against a dict model.

Small capacities (16 or 32 slots) make home-slot collisions, long probe runs and
wrap-around from the last slot to slot 0 the common case, not the rare one.  After
every step the machine checks the model, and the structural invariant of linear
probing without tombstones:

    for every entry at slot j with home h: slots h, h+1, ..., j are all occupied
    (cyclically), so a lookup starting at h reaches j before an empty slot.
"""
import importlib

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, initialize, invariant, precondition, rule

from hypernat import layout
from hypernat.layout import F_ACTIVE, F_CLONE, F_OCCUPIED, KEY_DTYPE, SLOT_DTYPE, flow_hash


def keys_with_home(nslots, home, n, proto=6, start=0):
    """n distinct keys whose home slot is `home` in a table of nslots."""
    out = []
    sport = start
    while len(out) < n:
        k = (proto, 0x0A000001, sport, 0xC6336407, 80)
        if flow_hash(*k) & (nslots - 1) == home:
            out.append(k)
        sport += 1
    return out


def test_geometry(fp):
    for cap in (1, 10, 11, 100, 1000):
        t = fp.FlowTable(cap, hugepages=False)
        assert t.capacity == cap
        assert t.nslots == layout.slots_for(cap) == len(t.slots)
        assert t.slots.dtype == SLOT_DTYPE
        assert len(t) == 0 and t.full_count == 0
        assert not t.slots.view(np.uint8).any()
        assert cap / t.nslots <= layout.MAX_LOAD


def test_hugepages_table(fp):
    """Big enough for its own mapping (>= 2 MiB): works the same."""
    t = fp.FlowTable(100_000)
    assert t.nslots == layout.slots_for(100_000)
    assert t.insert(6, 1, 2, 3, 4, 5, 6)
    assert t.lookup(6, 1, 2, 3, 4) == flow_hash(6, 1, 2, 3, 4) & (t.nslots - 1)


def test_insert_lookup_get_delete(fp):
    t = fp.FlowTable(10, hugepages=False)
    k = (17, 0x0A000001, 5353, 0x08080808, 53)
    assert t.lookup(*k) == -1 and t.get(*k) is None
    assert t.insert(*k, 0x64400001, 40000, rule_id=77, now=1000, flags=F_CLONE)
    i = t.lookup(*k)
    assert i == flow_hash(*k) & (t.nslots - 1)  # an empty table: at home
    r = t.get(*k)
    assert r.dtype == SLOT_DTYPE
    assert (r["saddr"], r["daddr"], r["sport"], r["dport"], r["proto"]) == (0x0A000001, 0x08080808, 5353, 53, 17)
    assert (r["new_addr"], r["new_port"], r["rule_id"], r["last_seen"]) == (0x64400001, 40000, 77, 1000)
    assert r["flags"] == F_OCCUPIED | F_CLONE and r["tcp_state"] == 0
    r["new_port"] = 1  # a copy: the table does not change
    assert t.slots[i]["new_port"] == 40000
    assert len(t) == 1 and list(t.occupied()) == [i]
    # Other keys differing in one field are other entries.
    for j in range(5):
        other = list(k)
        other[j] += 1
        assert t.lookup(*other) == -1
    assert t.delete(*k) and not t.delete(*k)
    assert len(t) == 0 and t.lookup(*k) == -1
    assert not t.slots.view(np.uint8).any()  # an empty slot is all zeros


def test_update_resets_session_fields(fp):
    t = fp.FlowTable(4, hugepages=False)
    k = (6, 1, 2, 3, 4)
    t.insert(*k, 5, 6, rule_id=1, now=10, flags=F_ACTIVE)
    i = t.lookup(*k)
    t.slots[i]["tcp_state"] = 7
    t.slots[i]["user"] = 9
    t.slots[i]["lease"] = 300
    assert t.insert(*k, 50, 60, rule_id=2, now=20, flags=F_CLONE)
    assert t.lookup(*k) == i and len(t) == 1
    r = t.get(*k)
    assert (r["new_addr"], r["new_port"], r["rule_id"], r["last_seen"]) == (50, 60, 2, 20)
    assert (r["flags"], r["tcp_state"], r["user"], r["lease"]) == (F_OCCUPIED | F_CLONE, 0, 0, 0)


def test_full_table_refuses_and_counts(fp):
    t = fp.FlowTable(5, hugepages=False)
    for p in range(5):
        assert t.insert(6, 1, p, 2, 3, 9, p)
    before = t.slots.copy()
    assert not t.insert(6, 1, 99, 2, 3, 9, 99)
    assert not t.insert(17, 1, 99, 2, 3, 9, 99)
    assert t.full_count == 2 and len(t) == 5
    assert np.array_equal(before, t.slots)  # nothing overwritten
    assert t.insert(6, 1, 4, 2, 3, 8, 8)  # an existing key may still be updated
    assert t.full_count == 2 and t.get(6, 1, 4, 2, 3)["new_port"] == 8
    assert t.delete(6, 1, 0, 2, 3) and t.insert(6, 1, 99, 2, 3, 9, 99)


def test_collisions_and_backward_shift(fp):
    """Three keys with the same home: probing puts them in h, h+1, h+2; deleting the
    first shifts the others back; no tombstone is left."""
    t = fp.FlowTable(8, hugepages=False)
    n = t.nslots
    h = 5
    a, b, c = keys_with_home(n, h, 3)
    d = keys_with_home(n, h + 1, 1, start=10_000)[0]  # home h+1: displaced to h+3
    for i, k in enumerate((a, b, c, d)):
        assert t.insert(*k, 1, i)
    assert [t.lookup(*k) for k in (a, b, c, d)] == [h, h + 1, h + 2, h + 3]
    assert t.delete(*a)
    # b (home h) fills the hole at h, c (home h) moves to h+1, d (home h+1) to h+2.
    assert [t.lookup(*k) for k in (b, c, d)] == [h, h + 1, h + 2]
    assert not t.slots[h + 3:].view(np.uint8).any()
    assert t.delete(*c)
    assert [t.lookup(*k) for k in (b, d)] == [h, h + 1]


def test_backward_shift_keeps_entries_at_home(fp):
    """An entry already at its home (h in (hole, j]) does not move."""
    t = fp.FlowTable(8, hugepages=False)
    n = t.nslots
    a, b = keys_with_home(n, 3, 2)
    c = keys_with_home(n, 5, 1, start=20_000)[0]
    for k in (a, b, c):
        t.insert(*k, 1, 1)
    assert [t.lookup(*k) for k in (a, b, c)] == [3, 4, 5]
    t.delete(*a)
    assert [t.lookup(*k) for k in (b, c)] == [3, 5]


def test_wrap_around(fp):
    """Probing wraps from the last slot to slot 0, and so does the backward shift."""
    t = fp.FlowTable(8, hugepages=False)
    n = t.nslots
    last = n - 1
    ks = keys_with_home(n, last, 3)
    z = keys_with_home(n, 0, 1, start=30_000)[0]
    for k in ks + [z]:
        assert t.insert(*k, 7, 7)
    assert [t.lookup(*k) for k in ks + [z]] == [last, 0, 1, 2]
    assert t.delete(*ks[0])
    assert [t.lookup(*k) for k in ks[1:] + [z]] == [last, 0, 1]
    assert t.delete(*ks[1])
    assert [t.lookup(*k) for k in (ks[2], z)] == [last, 0]
    assert len(t) == 2


def test_batches_equal_single_calls(fp):
    rng = np.random.default_rng(7)
    recs = np.zeros(60, SLOT_DTYPE)
    recs["proto"] = rng.choice([1, 6, 17], 60)
    recs["saddr"] = rng.integers(0, 4, 60)
    recs["sport"] = rng.integers(0, 6, 60)
    recs["daddr"] = 9
    recs["dport"] = 80
    recs["new_addr"] = rng.integers(0, 2**32, 60)
    recs["new_port"] = rng.integers(0, 2**16, 60)
    recs["rule_id"] = np.arange(60)
    recs["last_seen"] = rng.integers(0, 2**32, 60)
    recs["flags"] = rng.choice([0, F_CLONE, F_ACTIVE], 60)
    recs["tcp_state"] = 5  # ignored: insert resets it
    a, b = fp.FlowTable(40, hugepages=False), fp.FlowTable(40, hugepages=False)
    n = a.insert_batch(recs)
    m = 0
    for r in recs:
        m += b.insert(r["proto"], r["saddr"], r["sport"], r["daddr"], r["dport"], r["new_addr"], r["new_port"],
                      r["rule_id"], r["last_seen"], r["flags"])
    assert n == m and len(a) == len(b) and a.full_count == b.full_count
    assert np.array_equal(a.slots, b.slots)
    keys = np.zeros(30, KEY_DTYPE)
    for f in ("proto", "saddr", "sport", "daddr", "dport"):
        keys[f] = recs[f][::2]
    n = a.delete_batch(keys)
    m = sum(b.delete(k["proto"], k["saddr"], k["sport"], k["daddr"], k["dport"]) for k in keys)
    assert n == m > 0
    assert np.array_equal(a.slots, b.slots)
    assert a.delete_batch(recs[1::2]) == sum(
        b.delete(r["proto"], r["saddr"], r["sport"], r["daddr"], r["dport"]) for r in recs[1::2])
    assert np.array_equal(a.slots, b.slots) and len(a) == len(b) == 0


def test_snapshot_load_and_clear(fp):
    a = fp.FlowTable(20, hugepages=False)
    for p in range(15):
        a.insert(17, 1, p, 2, 3, 4, p, now=p)
    snap = a.slots.copy()
    b = fp.FlowTable(20, hugepages=False)
    b.load_slots(snap)
    assert len(b) == 15 and np.array_equal(b.slots, snap)
    assert all(b.get(17, 1, p, 2, 3)["new_port"] == p for p in range(15))
    assert b.delete(17, 1, 3, 2, 3) and len(b) == 14
    with pytest.raises(ValueError):
        fp.FlowTable(100, hugepages=False).load_slots(snap)  # other nslots
    with pytest.raises((ValueError, TypeError)):
        b.load_slots(np.zeros(b.nslots, np.uint8))
    a.clear()
    assert len(a) == 0 and not a.slots.view(np.uint8).any() and a.lookup(17, 1, 0, 2, 3) == -1
    assert a.insert(17, 1, 0, 2, 3, 4, 0)


def test_occupied(fp):
    t = fp.FlowTable(30, hugepages=False)
    for p in range(20):
        t.insert(6, p, p, p, p, 0, 0)
    occ = t.occupied()
    assert len(occ) == 20 and list(occ) == sorted(occ)
    assert set(occ.tolist()) == {t.lookup(6, p, p, p, p) for p in range(20)}
    assert np.all(t.slots["flags"][occ] & F_OCCUPIED)


# ---------------------------------------------------------------------------------------
# The state machine
# ---------------------------------------------------------------------------------------

key_st = st.tuples(
    st.sampled_from([6, 17, 1]),
    st.sampled_from([0, 1, 0x0A000001, 0xFFFFFFFF]),
    st.integers(0, 5),
    st.sampled_from([0, 0xC6336407]),
    st.sampled_from([0, 80, 65535]),
)
value_st = st.tuples(
    st.integers(0, 2**32 - 1), st.integers(0, 65535), st.integers(0, 2**32 - 1),
    st.integers(0, 2**32 - 1), st.sampled_from([0, F_CLONE, F_ACTIVE, 0xF8]),
)


def check_probe_invariant(slots):
    nslots = len(slots)
    occ = (slots["flags"] & F_OCCUPIED) != 0
    for j in np.flatnonzero(occ).tolist():
        r = slots[j]
        h = flow_hash(int(r["proto"]), int(r["saddr"]), int(r["sport"]), int(r["daddr"]), int(r["dport"])) & (nslots - 1)
        i = h
        while i != j:
            assert occ[i], f"entry at {j} (home {h}) unreachable: slot {i} empty"
            i = (i + 1) & (nslots - 1)
    assert not slots[~occ].view(np.uint8).any(), "empty slots must be all zeros"


def make_machine(module_name):
    class FlowTableMachine(RuleBasedStateMachine):
        """FlowTable of `module_name` against {key: value} and a refusal counter."""

        keys = Bundle("keys")

        def __init__(self):
            super().__init__()
            self.fp = importlib.import_module(module_name)

        @initialize(capacity=st.sampled_from([1, 2, 5, 10, 11]))
        def create(self, capacity):
            self.t = self.fp.FlowTable(capacity, hugepages=False)
            self.capacity = capacity
            self.model = {}
            self.full = 0

        @rule(target=keys, k=key_st)
        def new_key(self, k):
            return k

        def _model_insert(self, k, v):
            if k in self.model or len(self.model) < self.capacity:
                self.model[k] = v
                return True
            self.full += 1
            return False

        @rule(k=keys, v=value_st)
        def insert(self, k, v):
            new_addr, new_port, rule_id, now, flags = v
            got = self.t.insert(*k, new_addr, new_port, rule_id, now, flags)
            assert got == self._model_insert(k, v)

        @rule(k=keys)
        def lookup(self, k):
            i = self.t.lookup(*k)
            assert (i >= 0) == (k in self.model)
            if k in self.model:
                new_addr, new_port, rule_id, now, flags = self.model[k]
                r = self.t.get(*k)
                assert (r["new_addr"], r["new_port"], r["rule_id"], r["last_seen"]) == (new_addr, new_port, rule_id, now)
                assert r["flags"] == flags | F_OCCUPIED
            else:
                assert self.t.get(*k) is None

        @rule(k=keys)
        def delete(self, k):
            assert self.t.delete(*k) == (k in self.model)
            self.model.pop(k, None)

        @rule(items=st.lists(st.tuples(keys, value_st), max_size=8))
        def insert_batch(self, items):
            recs = np.zeros(len(items), SLOT_DTYPE)
            for r, (k, v) in zip(recs, items):
                (r["proto"], r["saddr"], r["sport"], r["daddr"], r["dport"]) = k
                (r["new_addr"], r["new_port"], r["rule_id"], r["last_seen"], r["flags"]) = v
            want = sum(self._model_insert(k, v) for k, v in items)
            assert self.t.insert_batch(recs) == want

        @rule(ks=st.lists(keys, max_size=8), as_slots=st.booleans())
        def delete_batch(self, ks, as_slots):
            recs = np.zeros(len(ks), SLOT_DTYPE if as_slots else KEY_DTYPE)
            for r, k in zip(recs, ks):
                (r["proto"], r["saddr"], r["sport"], r["daddr"], r["dport"]) = k
            want = 0
            for k in ks:
                want += k in self.model
                self.model.pop(k, None)
            assert self.t.delete_batch(recs) == want

        @precondition(lambda self: len(self.model) > 0)
        @rule()
        def fill_up(self):
            """Insert fresh keys until refused: the full path, every time."""
            p = 0
            while len(self.model) < self.capacity:
                k = (17, 0x01020304, 1000 + p, 0x05060708, 9)
                p += 1
                if k not in self.model:
                    assert self.t.insert(*k, 1, 2, 3, 4, 0)
                    self.model[k] = (1, 2, 3, 4, 0)
            assert not self.t.insert(17, 9, 9, 9, 9, 1, 1)
            self.full += 1

        @rule()
        def snapshot_roundtrip(self):
            other = self.fp.FlowTable(self.capacity, hugepages=False)
            other.load_slots(self.t.slots.copy())
            assert len(other) == len(self.model)
            for k in self.model:
                assert other.lookup(*k) == self.t.lookup(*k)

        @invariant()
        def consistent(self):
            if not hasattr(self, "t"):
                return
            assert len(self.t) == len(self.model)
            assert self.t.full_count == self.full
            occ = self.t.occupied()
            assert len(occ) == len(self.model)
            got = {
                (int(r["proto"]), int(r["saddr"]), int(r["sport"]), int(r["daddr"]), int(r["dport"]))
                for r in self.t.slots[occ]
            }
            assert got == set(self.model)
            check_probe_invariant(self.t.slots)

    FlowTableMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=50, deadline=None)
    return FlowTableMachine


TestFlowTablePython = make_machine("hypernat.fastpath_py").TestCase
TestFlowTableCython = make_machine("hypernat._fastpath").TestCase
