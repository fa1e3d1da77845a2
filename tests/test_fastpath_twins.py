"""The twins: ``hypernat._fastpath`` (Cython) and ``hypernat.fastpath_py`` (reference)
give identical bytes, verdicts, keys, counters and table slots for the same inputs.

    same sessions ──► FlowTable (C) ══ slots ══ FlowTable (Py)
    same batches  ──► translate (C) ══ bytes, verdicts, keys, counters, slots ══ translate (Py)

The batches mix every verdict: hits and misses both ways, hairpins, ICMP echo and
errors, and mutations of those (bit flips, header fields set to edge values,
truncations, garbage) -- see ``fixtures.fastpath_oracle.mutate``.
"""
import importlib
import random

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from fixtures.fastpath_oracle import ROUTER, pack, mixed_batch, router_frames, standard_env, template_frames
from hypernat import layout
from hypernat.layout import KEY_DTYPE, SLOT_DTYPE
from hypernat.verdicts import IN, OUT, VERDICT_NAMES

PY = importlib.import_module("hypernat.fastpath_py")


@pytest.fixture(scope="module")
def cy():
    """The compiled twin; missing is a failure (as in conftest's `fp`), not a skip."""
    try:
        return importlib.import_module("hypernat._fastpath")
    except ImportError as exc:  # pragma: no cover - depends on the build
        pytest.fail(f"hypernat._fastpath is not built ({exc}): run `make build`")


@pytest.fixture(scope="module")
def templates():
    return template_frames()


def _twin_envs(cy):
    envs = [standard_env(cy, 256), standard_env(PY, 256)]
    for env in envs:
        env.tr.set_l2(OUT, bytes.fromhex("0200000000a1"), bytes.fromhex("0200000000a2"))
        env.tr.set_l2(IN, bytes.fromhex("0200000000b1"), bytes.fromhex("0200000000b2"))
    assert np.array_equal(envs[0].out.slots, envs[1].out.slots)
    assert np.array_equal(envs[0].inn.slots, envs[1].inn.slots)
    return envs


def _describe(frames, i, a, b, what):
    return f"{what} differ at frame {i} ({VERDICT_NAMES[a[1][i]]} vs {VERDICT_NAMES[b[1][i]]}): {frames[i].hex()}"


def _run(env, frames, direction, now):
    buf, offsets, lengths, _ = pack(frames)
    verdicts = np.full(len(frames), 0xEE, np.uint8)
    keys = np.frombuffer(bytearray(b"\xab" * 16 * len(frames)), dtype=KEY_DTYPE)
    env.tr.translate(buf, offsets, lengths, direction, now, verdicts, keys)
    outs = [buf[o : o + n].tobytes() for o, n in zip(offsets.tolist(), lengths.tolist())]
    return buf, verdicts, keys, outs


@pytest.mark.parametrize("seed", range(10))
def test_same_batches_same_results(cy, templates, seed):
    envs = _twin_envs(cy)
    frames, dirs = mixed_batch(seed, 2500, templates)
    for step, direction in enumerate((OUT, IN, OUT)):
        fr = [f for f, d in zip(frames, dirs) if d == direction] if step < 2 else frames[::3]
        now = 1000 + 7 * step + seed
        c, p = (_run(env, fr, direction, now) for env in envs)
        for i in range(len(fr)):
            assert c[1][i] == p[1][i], _describe(fr, i, c, p, "verdicts")
            assert c[3][i] == p[3][i], _describe(fr, i, c, p, "bytes")
            assert c[2][i].tobytes() == p[2][i].tobytes(), _describe(fr, i, c, p, "keys") + f" {c[2][i]} vs {p[2][i]}"
        assert np.array_equal(c[0], p[0])  # the whole buffer, guards included
        assert np.array_equal(envs[0].tr.counters, envs[1].tr.counters)
        assert envs[0].tr.counters_dict() == envs[1].tr.counters_dict()
        for name in ("out", "inn"):
            a, b = getattr(envs[0], name).slots, getattr(envs[1], name).slots
            diff = np.flatnonzero(a != b)
            assert not len(diff), f"{name} table slots differ at {diff[:5]}: {a[diff[:1]]} vs {b[diff[:1]]}"


@pytest.mark.parametrize("seed", range(6))
def test_same_batches_same_results_as_a_router(cy, templates, seed):
    """With the router on (small MTUs, ICMP sources, a rate limit, MSS clamping): the
    same verdicts, bytes, keys, counters, router events and generated frames (bytes and
    exit directions), batch after batch (the token bucket carries over)."""
    envs = _twin_envs(cy)
    for env in envs:
        env.tr.set_router(**ROUTER)
    frames, dirs = mixed_batch(seed, 1500, templates + router_frames() * 3)
    for step, direction in enumerate((OUT, IN, OUT, IN)):
        fr = [f for f, d in zip(frames, dirs) if d == direction][step // 2::2]
        now = 2000 + step // 2 + seed
        c, p = (_run(env, fr, direction, now) for env in envs)
        for i in range(len(fr)):
            assert c[1][i] == p[1][i], _describe(fr, i, c, p, "verdicts")
            assert c[3][i] == p[3][i], _describe(fr, i, c, p, "bytes")
            assert c[2][i].tobytes() == p[2][i].tobytes(), _describe(fr, i, c, p, "keys")
        assert np.array_equal(c[0], p[0])
        ga, gb = envs[0].tr.generated(), envs[1].tr.generated()
        assert len(ga) == len(gb) and envs[0].tr.out_count == len(ga)
        for i, (a, b) in enumerate(zip(ga, gb)):
            assert a == b, f"generated frame {i} differs: {a[0]} {a[1].hex()} vs {b[0]} {b[1].hex()}"
        assert np.array_equal(envs[0].tr.counters, envs[1].tr.counters)
        assert envs[0].tr.router_events_dict() == envs[1].tr.router_events_dict()
        for name in ("out", "inn"):
            assert np.array_equal(getattr(envs[0], name).slots, getattr(envs[1], name).slots)
    ev = envs[0].tr.router_events_dict()
    seen = {k for d in ev.values() for k, n in d.items() if n}
    assert {"icmp_time_exceeded", "icmp_frag_needed", "icmp_rate_limited", "icmp_suppressed", "fragments",
            "mss_clamped", "mss_bad_options"} <= seen, seen


def test_keys_none_and_unaligned_buffer(cy, templates):
    """keys=None, and frames at odd offsets in a numpy view that starts at an odd address."""
    envs = _twin_envs(cy)
    frames, _ = mixed_batch(99, 300, templates)
    results = []
    for env in envs:
        buf, offsets, lengths, _ = pack(frames, guard=3)
        big = np.zeros(len(buf) + 1, np.uint8)
        big[1:] = buf
        view = big[1:]
        v = np.zeros(len(frames), np.uint8)
        env.tr.translate(view, offsets, lengths, OUT, 5, v)
        results.append((big.copy(), v))
    assert np.array_equal(results[0][0], results[1][0]) and np.array_equal(results[0][1], results[1][1])


def test_flow_hash_matches_layout(cy):
    assert hasattr(cy, "flow_hash"), "hypernat._fastpath must expose flow_hash (the API in fastpath.py)"
    rng = random.Random(3)
    edge = [(0, 0, 0, 0, 0), (255, 2**32 - 1, 65535, 2**32 - 1, 65535), (6, 2**31, 1, 2**31 - 1, 2**15)]
    for k in edge + [(rng.randrange(256), rng.getrandbits(32), rng.getrandbits(16), rng.getrandbits(32),
                      rng.getrandbits(16)) for _ in range(3000)]:
        assert cy.flow_hash(*k) == layout.flow_hash(*k), k


def test_same_operations_same_slots(cy):
    """Random insert / update / delete / batch sequences (tables filled to the brim and
    refused inserts included) leave every entry in the same slot."""
    rng = random.Random(11)
    for capacity in (1, 7, 11, 50, 300):
        a, b = cy.FlowTable(capacity, hugepages=False), PY.FlowTable(capacity, hugepages=False)
        pool = [(rng.choice([1, 6, 17]), rng.getrandbits(32), rng.getrandbits(16), rng.getrandbits(32),
                 rng.getrandbits(16)) for _ in range(capacity * 2 + 3)]
        for step in range(capacity * 12 + 40):
            k = rng.choice(pool)
            op = rng.random()
            if op < 0.55:
                v = (rng.getrandbits(32), rng.getrandbits(16), rng.getrandbits(32), rng.getrandbits(32), rng.choice([0, 2, 4, 6]))
                assert a.insert(*k, *v) == b.insert(*k, *v)
            elif op < 0.85:
                assert a.delete(*k) == b.delete(*k)
            elif op < 0.93:
                recs = np.zeros(rng.randint(0, 9), SLOT_DTYPE)
                for r in recs:
                    (r["proto"], r["saddr"], r["sport"], r["daddr"], r["dport"]) = rng.choice(pool)
                    r["new_port"], r["rule_id"], r["last_seen"], r["flags"] = step, step, step, rng.choice([0, 2])
                    r["user"], r["lease"], r["tcp_state"] = 9, 9, 9
                assert a.insert_batch(recs) == b.insert_batch(recs)
            else:
                recs = np.zeros(rng.randint(0, 9), KEY_DTYPE)
                for r in recs:
                    (r["proto"], r["saddr"], r["sport"], r["daddr"], r["dport"]) = rng.choice(pool)
                assert a.delete_batch(recs) == b.delete_batch(recs)
            assert len(a) == len(b) and a.full_count == b.full_count
            assert np.array_equal(a.slots, b.slots), f"capacity {capacity}, step {step}"
            assert a.lookup(*k) == b.lookup(*k)
        assert a.full_count > 0 or capacity > 100


def test_snapshots_cross_load(cy):
    """A snapshot written by one twin is read by the other."""
    rng = random.Random(5)
    for src, dst in ((cy, PY), (PY, cy)):
        a = src.FlowTable(100, hugepages=False)
        keys = [(6, rng.getrandbits(32), rng.getrandbits(16), rng.getrandbits(32), 443) for _ in range(90)]
        for i, k in enumerate(keys):
            a.insert(*k, 1, i, i, i)
        for k in keys[::3]:
            a.delete(*k)
        b = dst.FlowTable(100, hugepages=False)
        b.load_slots(a.slots.copy())
        assert len(b) == len(a)
        for i, k in enumerate(keys):
            assert b.lookup(*k) == a.lookup(*k)
            assert (b.get(*k) is None) == (i % 3 == 0)


class TwinTableMachine(RuleBasedStateMachine):
    """Both tables driven in lockstep by hypothesis: same results, same slots."""

    def __init__(self):
        super().__init__()
        self.cy = importlib.import_module("hypernat._fastpath")

    @initialize(capacity=st.sampled_from([1, 3, 10, 11]))
    def create(self, capacity):
        self.a = self.cy.FlowTable(capacity, hugepages=False)
        self.b = PY.FlowTable(capacity, hugepages=False)

    key = st.tuples(st.sampled_from([6, 17]), st.integers(0, 3), st.integers(0, 7), st.just(9), st.sampled_from([0, 65535]))

    @rule(k=key, port=st.integers(0, 65535), flags=st.integers(0, 255))
    def insert(self, k, port, flags):
        assert self.a.insert(*k, 1, port, 2, 3, flags) == self.b.insert(*k, 1, port, 2, 3, flags)

    @rule(k=key)
    def delete(self, k):
        assert self.a.delete(*k) == self.b.delete(*k)

    @rule(k=key)
    def lookup(self, k):
        assert self.a.lookup(*k) == self.b.lookup(*k)

    @rule()
    def clear(self):
        self.a.clear()
        self.b.clear()

    @invariant()
    def same(self):
        if hasattr(self, "a"):
            assert len(self.a) == len(self.b) and self.a.full_count == self.b.full_count
            assert np.array_equal(self.a.slots, self.b.slots)
            assert np.array_equal(self.a.occupied(), self.b.occupied())


TwinTableMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
TestTwinTables = TwinTableMachine.TestCase


def _compare(envs, buf_maker, offsets, lengths, direction, now=77):
    results = []
    for env in envs:
        buf = buf_maker()
        v = np.full(len(offsets), 0xEE, np.uint8)
        k = np.frombuffer(bytearray(b"\xab" * 16 * len(offsets)), dtype=KEY_DTYPE)
        env.tr.translate(buf, offsets, lengths, direction, now, v, k)
        results.append((buf, v, k))
    (b1, v1, k1), (b2, v2, k2) = results
    for i in range(len(offsets)):
        assert v1[i] == v2[i], f"frame {i}: {VERDICT_NAMES[v1[i]]} vs {VERDICT_NAMES[v2[i]]}"
        assert k1[i].tobytes() == k2[i].tobytes(), f"frame {i}: {k1[i]} vs {k2[i]}"
    assert np.array_equal(b1, b2)
    assert np.array_equal(envs[0].tr.counters, envs[1].tr.counters)
    assert np.array_equal(envs[0].out.slots, envs[1].out.slots)
    assert np.array_equal(envs[0].inn.slots, envs[1].inn.slots)
    return v1


def test_every_batch_size(cy, templates):
    """Batch sizes 0..70: the compiled loop works in groups (prefetch); the tail of a
    batch and a group boundary must not change anything."""
    envs = _twin_envs(cy)
    frames, dirs = mixed_batch(4242, 70, templates)
    for n in range(71):
        for direction in (OUT, IN):
            buf, offsets, lengths, _ = pack(frames[:n])
            _compare(envs, buf.copy, offsets, lengths, direction)


def test_repeated_and_overlapping_frames(cy, templates):
    """The same bytes referenced by several entries of one batch (and frames that
    overlap): frames are processed in order, each seeing what the earlier ones wrote --
    a compiled loop that parses a group ahead must give the same result."""
    envs = _twin_envs(cy)
    rng = random.Random(8)
    frames = [f for f, d in templates if d == OUT][:12]
    buf, offsets, lengths, _ = pack(frames)
    idx = [rng.randrange(len(frames)) for _ in range(200)]
    offs = offsets[idx].copy()
    lens = lengths[idx].copy()
    # Some frames shifted into their neighbours: overlapping windows.
    for j in range(0, 200, 7):
        offs[j] = max(0, int(offs[j]) - rng.randint(1, 30))
    v = _compare(envs, buf.copy, offs, lens, OUT)
    assert {VERDICT_NAMES[x] for x in v} >= {"translated", "miss_out", "hairpin"}


def test_jumbo_frames(cy, templates):
    """9000-byte frames (long ICMP errors summed from scratch, long TCP segments)."""
    from scapy.all import ICMP, IP, TCP, UDP, raw

    from fixtures.fastpath_oracle import E1, I1, R, X, eth, icmp_error

    big = bytes(range(256)) * 35
    frames = [
        raw(eth() / IP(src=I1, dst=R) / TCP(sport=1111, dport=80, flags="A") / big[:8900]),
        raw(eth() / IP(src=I1, dst=R) / UDP(sport=2222, dport=53) / big[:8951]),
        icmp_error(X, E1, raw(IP(src=E1, dst=R) / UDP(sport=40002, dport=53) / big[:8900]), 3, 4, nexthopmtu=9000),
        icmp_error(X, E1, raw(IP(src=E1, dst=R) / ICMP(type=8, id=40003) / big[:8901]), 11, 0),
    ]
    envs = _twin_envs(cy)
    for direction in (OUT, IN):
        buf, offsets, lengths, _ = pack(frames)
        v = _compare(envs, buf.copy, offsets, lengths, direction)
        assert v.tolist().count(0) == 2  # two translated per direction


@pytest.mark.parametrize("pool", [[(0, 0)], [(0x64400001, 32)], [(0x64400000, 24), (0xC6336400, 24)], []],
                         ids=["everything", "one-address", "two-prefixes", "none"])
def test_pool_shapes(cy, templates, pool):
    envs = []
    for m in (cy, PY):
        env = standard_env(m, 256)
        env.tr = m.Translator(env.out, env.inn, pool=pool)
        envs.append(env)
    frames, _ = mixed_batch(77, 600, templates)
    buf, offsets, lengths, _ = pack(frames)
    for direction in (OUT, IN):
        _compare(envs, buf.copy, offsets, lengths, direction)
