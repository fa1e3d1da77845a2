"""The holder's fast paths decide exactly what the plain paths decide.

The holder side of rule cloning (a miss that fetches, the RULE that installs a clone,
the replay) has small-batch and big-batch paths written for speed: plain tuples instead
of numpy fields, per-record work inlined, owners looked up at once.  Each test here runs
the same input through two paths and compares everything they leave behind:

* ``RuleAgent.fetch_rows`` (a batch's FETCH_ROW_DTYPE rows) against ``fetch`` record
  after record;
* ``RuleBuilder.decide_misses`` (its arrays; small and big batches) and ``handle_misses``
  against the decision loop as it stood before (a copy below: ``_reference_handle_misses``);
* ``RuleBuilder.install_clones`` (all records, a selection with owners given) against the
  install loop as it stood before (``_reference_install_clones``) and against installs
  one by one;
* ``RuleAgent._on_rule`` on one RULE batch against one RULE message per record, with and
  without an install observer (the event log's);
* ``Batch.from_frames`` / ``Batch.frames`` against a plain reference;
* ``NicWorker._translate_again`` over copies (``_replay``) and over a selection of a batch.
"""
import random

import numpy as np
import pytest

from hypernat import layout
from hypernat import messages as M
from hypernat.agent import IN, OUT, AgentParams, RuleAgent, fetch_rows_of
from hypernat.fastpath import FlowTable
from hypernat.io.base import Batch
from hypernat.io.memory import MemoryPort
from hypernat.lab.emulated import UDP, build_frame, emulated_config
from hypernat.nic.worker import NicWorker
from hypernat.partition import Partition
from hypernat.rules import (
    ACT_DROP, ACT_FETCH, ACT_REPLAY, DIR_BIT_IN, DIR_BIT_OUT, REASON, SESSION_DTYPE, Decisions, RuleBuilder,
    _lease16, in_key, out_key,
)  # fmt: skip
from hypernat.verdicts import VERDICT

TCP, UDP_P, ICMP = 6, 17, 1
V_OUT, V_IN = VERDICT["miss_out"], VERDICT["miss_in"]
V_ICMP, V_HP = VERDICT["miss_icmp_error"], VERDICT["miss_hairpin"]
V_OK = VERDICT["translated"]
INTERNAL = 0x0A000000  # 10.0.0.0/16 (emulated_config)
POOL = 0xC6120000  # 198.18.0.0/30
REMOTE = 0xC0000200


def _cfg(tmp_path, **limits):
    return emulated_config(2, mapping="address-and-port-dependent", filtering="address-dependent",
                           state_dir=str(tmp_path), limits={"flow_table_capacity": 4096, **limits})


def _rb(cfg, nic, cap=4096, seed=7):
    return RuleBuilder(cfg, nic, FlowTable(cap), FlowTable(cap), partition=Partition.from_config(cfg),
                       rng=np.random.default_rng(seed))


def _tables(rb):
    return [t.slots.copy() for t in (rb.out, rb.inn)]


def _same_tables(a, b):
    for x, y in zip(_tables(a), _tables(b)):
        np.testing.assert_array_equal(x, y)


# ------------------------------------------------------------------------ references
# The holder's loops as they were before the fast paths (commit cb386f6), kept here as
# the oracle: the new code must decide and install exactly what these did.
def _reference_handle_misses(rb, direction, verdicts, keys, now):
    from hypernat.rules import _FETCH, _OK

    verdicts = np.asarray(verdicts)
    n = len(verdicts)
    dec = Decisions.empty(n)
    idx = np.flatnonzero((verdicts >= V_OUT) & (verdicts <= V_HP))
    if len(idx) == 0:
        return dec
    now = int(now)
    k = keys[idx]
    cols = zip(verdicts[idx].tolist(), k["proto"].tolist(), k["saddr"].tolist(), k["sport"].tolist(),
               k["daddr"].tolist(), k["dport"].tolist(), k["kind"].tolist(), k["tcp_flags"].tolist())
    rb._begin()  # the call's room in the tables, which new sessions need Python
    res, fetches = [], []
    for j, (v, p, s, sp, d, dp, kind, fl) in enumerate(cols):
        if v == V_OUT:
            r = rb._out(p, s, sp, d, dp, fl, now)
            if r == _FETCH:
                fetches.append((j, rb._fetch_owner, OUT, p, s, sp, d, dp, kind, fl))
        elif v == V_HP:
            r, fkey = rb._hairpin_miss(p, s, sp, d, dp, fl, now)
            if r == _FETCH:
                fetches.append((j, rb._fetch_owner) + fkey + (fl,))
        elif v == V_ICMP and direction == OUT:
            r = rb._out(p, s, sp, d, dp, fl, now, kind == layout.KIND_ICMP_ERROR)
            if r == _FETCH:
                fetches.append((j, rb._fetch_owner, OUT, p, s, sp, d, dp, kind, fl))
        else:
            r = rb._in(p, s, sp, d, dp, fl, now, kind == layout.KIND_ICMP_ERROR)
            if r == _FETCH:
                fetches.append((j, rb._fetch_owner, IN, p, s, sp, d, dp, kind, fl))
        res.append(r)
    rb._flush(now)
    r = np.array(res, dtype=np.int16)
    dec.action[idx] = np.where(r == _OK, ACT_REPLAY, np.where(r == _FETCH, ACT_FETCH, ACT_DROP))
    dec.reason[idx] = np.where(r >= 0, r, -1)
    for j, o, fd, p, s, sp, d, dp, kind, fl in fetches:
        i = int(idx[j])
        dec.owner[i] = o
        dec.fetch_dir[i] = fd
        dec.fetch_key[i] = (s, d, sp, dp, p, kind, fl, 0)
    return dec


def _reference_install_clones(rb, records, now, dirs, lease_until=0):
    from hypernat.rules import _F_CLONE, _PIDX, _R_BAD, _R_TABLE_FULL

    recs = np.asarray(records).reshape(-1)
    n = len(recs)
    got = np.zeros(n, np.int8)
    if n == 0:
        return got
    now = int(now) & 0xFFFFFFFF
    lease = _lease16(lease_until)
    if lease:
        rb.expiry.lease_clones = True
    dl = np.broadcast_to(np.asarray(dirs, dtype=np.uint8), (n,)).tolist()
    P, I, IP = recs["proto"].tolist(), recs["iaddr"].tolist(), recs["iport"].tolist()
    E, EP = recs["eaddr"].tolist(), recs["eport"].tolist()
    R, RP, RID = recs["raddr"].tolist(), recs["rport"].tolist(), recs["rule_id"].tolist()
    TO, TI = recs["tcp_out"].tolist(), recs["tcp_in"].tolist()
    own = [rb.part.owner(a, q) for a, q in zip(E, EP)]
    olook, ilook = rb.out.lookup, rb.inn.lookup
    oflags, iflags = rb.out.slots["flags"], rb.inn.slots["flags"]
    rows, who = ([], []), ([], [])
    mask = layout.TCP_STATE_MASK
    for x in range(n):
        p = P[x]
        if p not in _PIDX or own[x] == rb.nic:
            rb._refuse(_R_BAD)
            continue
        d = dl[x]
        r, rp = R[x], RP[x]
        if d & DIR_BIT_OUT:
            k = out_key(p, I[x], IP[x], r, rp)
            j = olook(*k)
            if j >= 0 and not oflags[j] & _F_CLONE:
                rb._refuse(_R_BAD)
            else:
                rows[0].append((k[1], k[3], k[2], k[4], p, _F_CLONE, EP[x], E[x], RID[x], now, 0, 0, 0))
                who[0].append((x, k, TO[x] & mask))
        if d & DIR_BIT_IN:
            k = in_key(p, r, rp, E[x], EP[x])
            j = ilook(*k)
            if j >= 0 and not iflags[j] & _F_CLONE:
                rb._refuse(_R_BAD)
            else:
                rows[1].append((k[1], k[3], k[2], k[4], p, _F_CLONE, IP[x], I[x], RID[x], now, 0, 0, 0))
                who[1].append((x, k, TI[x] & mask))
    for tbl, rw, wh in ((rb.out, rows[0], who[0]), (rb.inn, rows[1], who[1])):
        if not rw:
            continue
        done = tbl.insert_batch(np.array(rw, dtype=layout.SLOT_DTYPE))
        look = tbl.lookup
        if done != len(rw):
            keep = []
            for w in wh:
                if look(*w[1]) >= 0:
                    keep.append(w)
                else:
                    rb._refuse(_R_TABLE_FULL)
            wh = keep
        if lease or any(w[2] for w in wh):
            tcp, lse = tbl.slots["tcp_state"], tbl.slots["lease"]
            for _, k, t in wh:
                j = look(*k)
                tcp[j] = t
                lse[j] = lease
        for w in wh:
            got[w[0]] += 1
    return got


# ------------------------------------------------------------------------ misses
def _miss_batch(rng, cfg, n, direction, known=()):
    """n frames' verdicts and keys: misses of every kind and a few hits."""
    part = Partition.from_config(cfg)
    v = np.zeros(n, np.uint8)
    k = np.zeros(n, layout.KEY_DTYPE)
    for i in range(n):
        p = rng.choice((TCP, UDP_P, ICMP))
        fl = rng.choice((0, layout.TCP_SYN, layout.TCP_ACK)) if p == TCP else 0
        if direction == OUT:
            kind = rng.random()
            src = INTERNAL + rng.randrange(1, 20) if rng.random() < 0.9 else 0x0B000001  # some not internal
            sp = rng.randrange(1024, 1100)
            dst, dp = REMOTE + rng.randrange(1, 5), rng.choice((53, 80, 443))
            if p == ICMP:
                dp = sp
            if kind < 0.1:
                v[i] = V_OK
            elif kind < 0.2:
                v[i], dst, dp = V_HP, POOL + rng.randrange(0, 4), rng.randrange(1024, 65535)
            elif kind < 0.3:
                v[i] = V_ICMP
                k[i] = (src, dst, sp, dp, p, layout.KIND_ICMP_ERROR, 0, 3)
                continue
            else:
                v[i] = V_OUT
            k[i] = (src, dst, sp, dp, p, layout.KIND_PLAIN, fl, 0)
        else:
            if known and rng.random() < 0.4:  # a reply to a session we built
                kp, ki, kip, ke, kep, kr, krp = rng.choice(known)
                p, src, sp, dst, dp = in_key(kp, kr, krp if rng.random() < 0.7 else krp + 1, ke, kep)
            else:
                src, sp = REMOTE + rng.randrange(1, 5), rng.choice((53, 80, 443))
                dst = POOL + rng.randrange(0, 5)  # .4 is outside the pool
                dp = rng.randrange(1024, 65536)
                if p == ICMP:
                    sp = dp
            assert part.owner(dst, dp) in (-1, 0, 1)
            v[i] = V_ICMP if rng.random() < 0.15 else (V_OK if rng.random() < 0.1 else V_IN)
            kind = layout.KIND_ICMP_ERROR if v[i] == V_ICMP else layout.KIND_PLAIN
            k[i] = (src, dst, sp, dp, p, kind, fl, 0)
    return v, k


def _known_sessions(rb):
    out = []
    for m in rb.mappings():
        for rr in m.remotes:
            out.append((m.proto if hasattr(m, "proto") else TCP, 0, 0, m.eaddr, m.eport, rr >> 16, rr & 0xFFFF))
    return out


@pytest.mark.parametrize("n", [1, 3, 8, 9, 40, 200])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_decide_misses_equals_the_reference_loop_small_and_big(tmp_path, n, seed):
    cfg = _cfg(tmp_path)
    rng = random.Random(seed)
    ref, new, big = _rb(cfg, 0), _rb(cfg, 0), _rb(cfg, 0)
    for step in range(6):
        direction = OUT if step % 2 == 0 else IN
        known = _known_sessions(ref)
        v, k = _miss_batch(rng, cfg, n, direction, known)
        now = 100 + step
        d_ref = _reference_handle_misses(ref, direction, v.copy(), k.copy(), now)
        d_new = new.handle_misses(direction, v.copy(), k.copy(), now)
        replay, fetches, idx, res = big.decide_misses(direction, v.copy(), k.copy(), now)
        for f in ("action", "reason", "owner", "fetch_dir", "fetch_key"):
            np.testing.assert_array_equal(getattr(d_ref, f), getattr(d_new, f), err_msg=f)
        assert replay.dtype == np.intp and idx.dtype == res.dtype == np.int32
        assert fetches.dtype == layout.FETCH_ROW_DTYPE
        assert replay.tolist() == np.flatnonzero(d_ref.action == ACT_REPLAY).tolist()
        assert fetches["frame"].tolist() == np.flatnonzero(d_ref.action == ACT_FETCH).tolist()
        for s, d, sp, dp, p, kind, fl, fd, i, o in fetches.tolist():
            assert (o, fd) == (d_ref.owner[i], d_ref.fetch_dir[i])
            assert (s, d, sp, dp, p, kind, fl, 0) == d_ref.fetch_key[i].item()
        assert idx.tolist() == np.flatnonzero(d_ref.action != 0).tolist()
        assert [r if r >= 0 else -1 for r in res.tolist()] == d_ref.reason[idx].tolist()
        for rb in (new, big):
            assert rb.counters == ref.counters
            _same_tables(rb, ref)
    assert sum(ref.counters) > 0  # something was refused along the way


def test_decide_misses_sees_only_the_first_n_frames(tmp_path):
    cfg = _cfg(tmp_path)
    rb = _rb(cfg, 1)
    v = np.full(4, V_IN, np.uint8)
    k = np.zeros(4, layout.KEY_DTYPE)
    for i in range(4):
        k[i] = (REMOTE + 1, POOL, 53, 2000 + i, UDP_P, layout.KIND_PLAIN, 0, 0)
    replay, fetches, idx, res = rb.decide_misses(IN, v, k, 5, n=2)
    assert idx.tolist() == [0, 1] and fetches["frame"].tolist() == [0, 1] and len(replay) == 0
    assert (fetches["owner"] == 0).all() and (fetches["fetch_dir"] == IN).all()  # ports 2000+ are NIC 0's: fetched


def test_the_compiled_run_refuses_arrays_it_cannot_write(tmp_path):
    """OutSetup.run's output arrays: another dtype, too short, read-only: a clear error
    before any frame is decided (the builder's tables untouched)."""
    rb = _rb(_cfg(tmp_path), 0)
    v = np.full(4, V_OUT, np.uint8)
    k = np.zeros(4, layout.KEY_DTYPE)
    k["saddr"], k["sport"], k["daddr"], k["dport"], k["proto"] = INTERNAL + 1, 1000 + np.arange(4), REMOTE, 53, UDP_P
    kb = k.view(np.uint8).reshape(-1)
    i32 = lambda m: np.zeros(m, np.int32)  # noqa: E731
    run = rb._setup.run
    with pytest.raises(TypeError, match="FETCH_ROW_DTYPE"):
        run(v, kb, 0, 5, i32(4), i32(4), np.zeros(4, layout.KEY_DTYPE), np.zeros(2, np.int64))
    ro = np.zeros(4, layout.FETCH_ROW_DTYPE)
    ro.flags.writeable = False
    with pytest.raises(TypeError, match="writable"):
        run(v, kb, 0, 5, i32(4), i32(4), ro, np.zeros(2, np.int64))
    with pytest.raises(ValueError, match="room for every frame"):
        run(v, kb, 0, 5, i32(3), i32(4), np.zeros(4, layout.FETCH_ROW_DTYPE), np.zeros(2, np.int64))
    with pytest.raises(ValueError, match="outside"):
        run(v, kb, 0, 5, i32(4), i32(4), np.zeros(4, layout.FETCH_ROW_DTYPE), np.array([5, 0], np.int64))
    assert len(rb.maps) == 0 and len(rb.out) == 0
    replay, fetches, idx, res = rb.decide_misses(OUT, v, k, 5)  # the same frames, through the builder
    assert replay.tolist() == idx.tolist() == [0, 1, 2, 3] and len(fetches) == 0


# ------------------------------------------------------------------------ installs
def _clone_records(rng, cfg, n):
    part = Partition.from_config(cfg)
    recs = np.zeros(n, SESSION_DTYPE)
    for x in range(n):
        p = rng.choice((TCP, UDP_P, ICMP, 47 if rng.random() < 0.05 else TCP))
        e, ep = POOL + rng.randrange(0, 4), rng.randrange(1024, 65536)
        i, ip = INTERNAL + rng.randrange(1, 30), rng.randrange(1024, 1040)
        r, rp = REMOTE + rng.randrange(1, 4), rng.choice((53, 443))
        if p == ICMP:
            rp = 0
        to = rng.choice((0, 0, layout.TCP_FIN, layout.TCP_SYN | 0x10))
        recs[x] = (i, e, r, ip, ep, rp, p, 3, rng.randrange(1, 1 << 30), 0, to, rng.choice((0, layout.TCP_RST)),
                   part.owner(e, ep), 0)
    if n > 3:  # repeats: a later record for the same keys replaces the earlier clone entry
        recs[n - 1] = recs[0]
        recs[n - 1]["rule_id"] += 1
    return recs


def _own_some(rb, recs, rng):
    """Owned (non-clone) entries in the way of a few records: never replaced."""
    for r in recs[: max(1, len(recs) // 5)]:
        p = int(r["proto"])
        ok = out_key(p, int(r["iaddr"]), int(r["iport"]), int(r["raddr"]), int(r["rport"]))
        rb.out.insert(*ok, 0x01020304, 999, rule_id=1, now=1, flags=0)


@pytest.mark.parametrize("n", [1, 2, 4, 5, 8, 9, 60])
@pytest.mark.parametrize("lease_until", [0, 70000])
def test_install_clones_equal_the_reference_and_one_by_one(tmp_path, n, lease_until):
    cfg = _cfg(tmp_path)
    rng = random.Random(n * 31 + lease_until)
    recs = _clone_records(rng, cfg, n)
    dirs = np.array([rng.choice((1, 2, 3)) for _ in range(n)], np.uint8)
    ref, new, rows, one = (_rb(cfg, 1) for _ in range(4))
    for rb in (ref, new, rows, one):
        _own_some(rb, recs, random.Random(5))
    got_ref = _reference_install_clones(ref, recs, 50, dirs, lease_until)
    got_new = new.install_clones(recs, 50, dirs, lease_until)
    # a selection of the records, their owners given (what the agent passes for a RULE message)
    owners = rows.part.owners(recs["eaddr"].astype(np.int64), recs["eport"].astype(np.int64))
    got_rows = rows.install_clones(recs, 50, dirs, lease_until, idx=np.arange(n), owners=owners).tolist()
    got_one = [one.install_clone(recs[x:x + 1], 50, int(dirs[x]), lease_until) for x in range(n)]
    assert got_new.dtype == np.int8 and got_new.tolist() == got_ref.tolist() == got_rows == got_one
    for rb in (new, rows, one):
        assert rb.counters == ref.counters
        _same_tables(rb, ref)
    if n >= 5:
        assert ref.counters[REASON["bad_message"]] > 0 and got_ref.sum() > 0


def test_install_clones_table_full_counts_like_the_reference(tmp_path):
    cfg = _cfg(tmp_path)
    recs = _clone_records(random.Random(9), cfg, 40)
    ref, new = _rb(cfg, 1, cap=16), _rb(cfg, 1, cap=16)
    got_ref = _reference_install_clones(ref, recs, 3, 3)
    got_new = new.install_clones(recs, 3, 3)
    assert got_new.tolist() == got_ref.tolist()
    assert new.counters == ref.counters and ref.counters[REASON["table_full"]] > 0
    _same_tables(new, ref)


# ------------------------------------------------------------------------ fetches
class _NoRules:
    """The agent's fetch path never asks the builder anything."""


def _agent(nic=1, sent=None, **p):
    params = dict(fetch_rate=5.0, fetch_burst=3.0, queue_per_flow=3, queue_total=25, retry_s=0.05)
    params.update(p)
    return RuleAgent(nic, 3, _NoRules(), lambda t, m, r: sent.append((t, m, r.copy())),
                     lambda a, q: 0, lambda d, f: None, AgentParams(**params), clock=lambda: 0.0)


def _holder_state(a):
    pend = {pk: (p.fetch_dir, p.key, p.owner, p.seq, p.first, p.sent, p.retry, p.flags, list(p.frames), p.charged)
            for pk, p in a.pending.items()}
    return (pend, dict(a._by_seq), a.queued_total, dict(a.counters), list(a.negative.items()),
            [(k, list(v)) for k, v in a._buckets.items()], a._seq, a._pending_due)


def _fetch_workload(rng, m):
    keys = np.zeros(m, layout.KEY_DTYPE)
    dirs, owners, frames = [], [], []
    for i in range(m):
        p = rng.choice((TCP, UDP_P, ICMP))
        kind = layout.KIND_ICMP_ERROR if rng.random() < 0.2 else layout.KIND_PLAIN
        keys[i] = (REMOTE + rng.randrange(0, 3), POOL + rng.randrange(0, 2), rng.randrange(1, 4),
                   2000 + rng.randrange(0, 6), p, kind, 0, 0)
        dirs.append(IN if rng.random() < 0.7 else OUT)
        owners.append(rng.randrange(0, 3))
        frames.append(None if rng.random() < 0.15 else b"f%d" % i)
    return dirs, keys, owners, frames


@pytest.mark.parametrize("m", [1, 2, 8, 9, 60])
@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_fetch_rows_equals_fetch_one_by_one(m, seed):
    rng = random.Random(seed)
    sent_a, sent_b = [], []
    a, b = _agent(sent=sent_a), _agent(sent=sent_b)
    a._seq = b._seq = 0xFFFFFFFE  # the sequence wraps (0 is skipped) in the middle
    for rounds in range(4):
        now = 10.0 + rounds * 0.1
        dirs, keys, owners, frames = _fetch_workload(rng, m)
        # a few NACKed keys in the negative cache, some of them expired by now
        for i in range(1, m, 4):
            pk = (dirs[i], (int(keys[i]["proto"]), int(keys[i]["saddr"]), int(keys[i]["sport"]),
                            int(keys[i]["daddr"]), int(keys[i]["dport"])))
            until = now + (1.0 if i % 8 == 1 else -1.0)
            for x in (a, b):
                x.negative[pk] = until
        got_a = [a.fetch(d, keys[i], o, f, now) for i, (d, o, f) in enumerate(zip(dirs, owners, frames))]
        got_b = b.fetch_rows(fetch_rows_of(dirs, keys, owners), frames, now)
        assert sum(got_a) == got_b
        assert _holder_state(a) == _holder_state(b)
    assert b.counters["fetches"] > 0 and b.queued_total > 0
    if m >= 60:  # every refusal was exercised
        assert b.counters["fetch_rate_limited"] and b.counters["pending_queue_full"]
        assert b.counters["fetch_negative_cached"]
    # the same FETCH records went to the same owners, in the same order
    for target in range(3):
        ra = [r for t, mt, rr in sent_a if t == target for r in rr.tolist()]
        rb = [r for t, mt, rr in sent_b if t == target for r in rr.tolist()]
        assert ra == rb
    assert all(mt == M.T_FETCH for _, mt, _ in sent_a + sent_b)


def test_fetch_rows_inside_a_batch_sends_nothing_until_the_batch_ends():
    sent = []
    a = _agent(sent=sent)
    a._batching += 1
    a.fetch_rows(_fetch_rows([(IN, (UDP_P, REMOTE, 53, POOL, 2000))], 0), [b"x"], 1.0)
    assert sent == [] and a._fetch_q
    a._batching -= 1
    a._flush_fetches()
    assert len(sent) == 1 and sent[0][2]["seq"].tolist() == [1]


def _fetch_rows(keys, owner):
    """FETCH_ROW_DTYPE rows for [(fetch_dir, (proto, saddr, sport, daddr, dport))]."""
    rows = np.zeros(len(keys), layout.FETCH_ROW_DTYPE)
    for j, (d, (p, sa, sp, da, dp)) in enumerate(keys):
        rows[j] = (sa, da, sp, dp, p, layout.KIND_PLAIN, 0, d, j, owner)
    return rows


# ------------------------------------------------------------------------ RULE answers
def _rule_pair(tmp_path, observed=None):
    """A holder (NIC 1 of 2); `observed`: a list the agent's install observer (the
    worker's event log) appends (records, indexes, dirs) of each install to."""
    cfg = _cfg(tmp_path)
    part = Partition.from_config(cfg)
    rb = _rb(cfg, 1)
    on_installed = None if observed is None else (lambda r, idx, d: observed.append((r.copy(), idx.copy(), d)))
    sent, replayed = [], []
    owner_of = lambda a, q: None if part.owner(a, q) < 0 else part.owner(a, q)  # noqa: E731
    ag = RuleAgent(1, 2, rb, lambda t, m, r: sent.append((t, m, r.copy())), owner_of,
                   lambda d, f: replayed.append((d, list(f))), AgentParams(), clock=lambda: 0.0,
                   tick_clock=lambda: 77, partition=part, on_installed=on_installed)
    return cfg, part, rb, ag, sent, replayed


def _answers(part, sent, rng):
    """RULE records answering the FETCHes sent, with a few bad ones mixed in."""
    recs = []
    for _, _, fr in sent:
        for f in fr:
            kind, p = int(f["kind"]), int(f["proto"])
            if kind == M.FETCH_BY_EXTERNAL:
                ea, ep, ra, rp = int(f["ext_addr"]), int(f["ext_port"]), int(f["rem_addr"]), int(f["rem_port"])
                ia, ip = INTERNAL + 7, 3000 + ep % 1000
            else:
                ia, ip, ra, rp = int(f["int_addr"]), int(f["int_port"]), int(f["rem_addr"]), int(f["rem_port"])
                ea, ep = POOL, 1024 + ip % 30000
            if p == ICMP:
                rp = 0
            r = np.zeros(1, M.RULE_DTYPE)
            r["seq"], r["rule_id"], r["lease_ms"] = f["seq"], 1000 + int(f["seq"]), 30000
            r["int_addr"], r["int_port"], r["ext_addr"], r["ext_port"] = ia, ip, ea, ep
            r["rem_addr"], r["rem_port"], r["owner"], r["proto"] = ra, rp, part.owner(ea, ep), p
            u = rng.random()
            if u < 0.08:
                r["rem_port"] = rp + 1  # not the key asked for
            elif u < 0.14:
                r["owner"] = 1  # claims another owner
            recs.append(r)
    recs.append(recs[0].copy())  # a duplicate answer
    return np.concatenate(recs)


@pytest.mark.parametrize("observe", [False, True])
@pytest.mark.parametrize("seed", [1, 2])
def test_one_rule_batch_equals_one_rule_message_per_record(tmp_path, observe, seed):
    rng = random.Random(seed)
    seen = ([], []) if observe else (None, None)
    sides = [_rule_pair(tmp_path / f"{s}", observed=o) for s, o in zip(("batch", "single"), seen)]
    keys = []
    for i in range(24):
        p = rng.choice((TCP, UDP_P, ICMP))
        if rng.random() < 0.75:  # a reply to NIC 0's endpoint (ports 1024..33279 are NIC 0's)
            sp = rng.randrange(1, 100)
            ep = rng.randrange(1024, 33000)
            kt = (p, REMOTE + rng.randrange(1, 4), ep if p == ICMP else sp, POOL + rng.randrange(0, 4), ep)
            keys.append((IN, kt))
        else:
            ip = rng.randrange(2000, 2100)
            kt = (p, INTERNAL + 9, ip, REMOTE + 1, ip if p == ICMP else 443)
            keys.append((OUT, kt))
    for cfg, part, rb, ag, sent, replayed in sides:
        ag.fetch_rows(_fetch_rows(keys, 0), [b"frame%d" % i for i in range(len(keys))], 5.0)
        ag.fetch_rows(_fetch_rows(keys[:5], 0), [b"again%d" % i for i in range(5)], 5.0)
    recs = _answers(sides[0][1], sides[0][4], rng)
    assert len(recs) > 20
    (_, _, rb_a, ag_a, _, rep_a), (_, _, rb_b, ag_b, _, rep_b) = sides
    ag_a.on_message(0, M.T_RULE, recs, 5.03)
    for x in range(len(recs)):
        ag_b.on_message(0, M.T_RULE, recs[x:x + 1], 5.03)
    def clones(ag):
        return {k: (c.owner, c.rule_id, c.dirs, c.expires) for k, c in ag.clones.items()}

    assert ag_a.clones and clones(ag_a) == clones(ag_b)
    assert dict(ag_a.counters) == dict(ag_b.counters)
    # records about another key than the one asked (rule_mismatched) or naming another owner
    # (bad_message) are dropped, and so is the duplicate (of a valid answer: rule_duplicate);
    # every record is either an answer or a drop under its reason
    c = ag_a.counters
    assert c["bad_message"] + c["rule_mismatched"]
    assert len(recs) == (c["fetch_answered"] + c["rule_duplicate"] + c["rule_mismatched"] + c["bad_message"]
                         + c["rule_misdirected"])
    assert ag_a.counters["fetch_answered_le_1ms"] == 0 and ag_a.counters["fetch_answered_le_10ms"] == 0
    assert ag_a.counters["fetch_answered_le_50ms"] == ag_a.counters["fetch_answered"]
    assert _holder_state(ag_a) == _holder_state(ag_b)
    assert rb_a.counters == rb_b.counters
    _same_tables(rb_a, rb_b)
    for d in (OUT, IN):  # the same frames released, each flow's frames in arrival order
        fa = [f for dd, fs in rep_a if dd == d for f in fs]
        fb = [f for dd, fs in rep_b if dd == d for f in fs]
        assert fa == fb
    assert [d for d, _ in rep_a] == sorted(d for d, _ in rep_a)  # OUT released before IN
    if observe:  # the observer was told of every clone installed, with its directions, on both sides
        for obs, ag in zip(seen, (ag_a, ag_b)):
            told = {}
            for r, idx, d in obs:
                dl = np.broadcast_to(np.asarray(d, np.uint8), (len(r),))
                for x in idx.tolist():
                    sk = tuple(int(r[f][x]) for f in ("proto", "int_addr", "int_port", "ext_addr", "ext_port",
                                                      "rem_addr", "rem_port"))
                    told[sk] = told.get(sk, 0) | int(dl[x])
            assert told == {k: c.dirs for k, c in ag.clones.items()}


def test_latency_buckets_of_a_batch_as_one_by_one():
    from hypernat.agent import _LAT_LIMITS, _LAT_NAMES, _latency_bucket
    from bisect import bisect_left

    for x in (0.0, 0.0005, 0.001, 0.0010001, 0.01, 0.03, 0.05, 0.2, 0.2000001, 5.0):
        assert _LAT_NAMES[bisect_left(_LAT_LIMITS, x)] == _latency_bucket(x)


# ------------------------------------------------------------------------ batches and replay
def _ref_frames(b, idx):
    return [b.buf[int(b.offsets[i]): int(b.offsets[i]) + int(b.lengths[i])].tobytes() for i in idx]


@pytest.mark.parametrize("n", [0, 1, 2, 17, 40])
def test_batch_from_frames_and_frames_match_a_plain_copy(n):
    frames = [bytes([i % 251]) * (1 + (i * 7) % 60) for i in range(n)]
    b = Batch.from_frames([bytearray(f) for f in frames])
    assert b.n == n and b.buf.dtype == np.uint8 and len(b.offsets) == len(b.lengths) == n
    assert b.offsets.dtype == np.uint32 and b.lengths.dtype == np.uint32
    assert b.frames() == frames == _ref_frames(b, range(n))
    idx = list(range(n))[::-2]
    assert b.frames(idx) == b.frames(np.array(idx, np.intp)) == b.frames(iter(idx)) == _ref_frames(b, idx)
    big = Batch.from_frames(frames, capacity=n + 5)
    assert big.n == n and len(big.offsets) == n + 5 and big.lengths[n:].sum() == 0 and big.offsets[n:].sum() == 0
    assert big.frames() == frames
    empty = Batch.from_frames([], capacity=1)
    assert empty.n == 0 and empty.lengths.tolist() == [0] and empty.offsets.tolist() == [0] and len(empty.buf) == 1
    if n:
        assert b.frame(n - 1) == frames[-1]
        # a view of a bigger buffer (a ring): offsets anywhere in it
        ring = Batch(np.arange(256, dtype=np.uint8), np.array([200, 3], np.uint32), np.array([5, 2], np.uint32), 2)
        assert ring.frames() == [bytes(range(200, 205)), bytes([3, 4])] == _ref_frames(ring, range(2))


def _replay_worker(tmp_path, name):
    cfg = emulated_config(2, mapping="address-and-port-dependent", state_dir=str(tmp_path / name))
    inside, outside = MemoryPort(f"in-{name}"), MemoryPort(f"out-{name}")
    w = NicWorker(cfg, 0, inside, outside, state_dir=str(tmp_path / name / "nic0"), standalone=True,
                  journal=False, restore=False, rng=np.random.default_rng(3))
    return w, inside, outside


@pytest.mark.parametrize("n", [1, 5, 16, 17, 30])
def test_replay_of_copies_equals_replay_in_place(tmp_path, n):
    """The one replay (``NicWorker._translate_again``) reached two ways: copies of the
    frames in a batch of their own (``_replay``: frames queued behind a fetch) and a
    selection of the batch they arrived in (``Batch.select``: the owner's own misses),
    with other frames around them that must not be sent."""
    runs = []
    for name in ("copies", "in_place"):
        w, inside, outside = _replay_worker(tmp_path, name)
        # rules for a few connections (NIC 0 builds them: its first packets)
        inside.inject([build_frame(UDP, INTERNAL + 10, 5000 + i, REMOTE + 1, 53, payload=b"q") for i in range(4)])
        w.run_once(0)
        firsts = outside.take_tx()
        assert len(firsts) == 4
        frames = []
        for i in range(n):
            u = i % 4
            if u == 0:  # translates out
                frames.append(build_frame(UDP, INTERNAL + 10, 5000 + i % 4, REMOTE + 1, 53, payload=b"x%d" % i))
            elif u == 1:  # misses (no rule)
                frames.append(build_frame(UDP, INTERNAL + 11, 6000 + i, REMOTE + 1, 53, payload=b"m"))
            elif u == 2:  # not NAT
                frames.append(b"\x00" * 60)
            else:  # hairpin: to a pool address
                frames.append(build_frame(UDP, INTERNAL + 10, 5000, 0xC6120001, 40000 + i, payload=b"h"))
        before = dict(w.counters)
        if name == "copies":
            w._replay(OUT, frames)
        else:  # every other frame of the batch is one of them; the rest would translate too
            other = [build_frame(UDP, INTERNAL + 10, 5001, REMOTE + 1, 53, payload=b"no%d" % i) for i in range(n)]
            b = Batch.from_frames([f for pair in zip(other, frames) for f in pair])
            w._translate_again(OUT, b.select(range(1, 2 * n, 2)))
        runs.append((dict(w.counters), before, outside.take_tx(), inside.take_tx(), w.translator.counters_dict()))
        w.close()
    (ca, ba, oa, ia, ta), (cb, bb, ob, ib, tb) = runs
    assert oa == ob and ia == ib and ta == tb
    assert {k: ca[k] - ba.get(k, 0) for k in ca} == {k: cb[k] - bb.get(k, 0) for k in cb}
    assert ca["replayed"] - ba.get("replayed", 0) == n
    if n >= 2:
        assert ca["replay_miss"] > ba.get("replay_miss", 0) and oa


def test_shm_ring_push_batch_and_frames_copy_exactly_and_refuse_what_does_not_fit():
    from hypernat.io.memory import ShmRing

    ring = ShmRing(nslots=8, slot_size=64)
    try:
        frames = [bytes([i]) * (10 + i) for i in range(6)] + [b"\x07" * 65]  # the last is too long
        b = Batch.from_frames(frames)
        assert ring.push_batch(b, np.array([5, 6, 0, 1], np.intp)) == 3 and ring.drops == 1
        assert ring.pop_frames() == [frames[5], frames[0], frames[1]]
        # wraps around the end of the ring; list indices; a full ring refuses the rest
        assert ring.push_frames([bytearray(frames[2]), frames[3], memoryview(frames[4])]) == 3
        assert ring.push_batch(b, [0, 1, 2, 3, 4, 5]) == 5 and ring.drops == 2
        assert len(ring) == 8 and ring.free() == 0
        got = ring.pop_frames(4)
        assert got == [frames[2], frames[3], frames[4], frames[0]]
        assert ring.pop_frames() == frames[1:5]
        assert ring.push_batch(b, []) == 0 and ring.pop_frames() == []
        # a batch whose buffer is a view into a bigger one (a ring's own data)
        view = Batch(np.arange(256, dtype=np.uint8), np.array([250, 3], np.uint32), np.array([6, 2], np.uint32), 2)
        assert ring.push_batch(view, np.arange(2)) == 2
        assert ring.pop_frames() == [bytes(range(250, 256)), bytes([3, 4])]
    finally:
        ring.close()


def test_memory_port_inject_keeps_what_fits_in_order_and_recv_takes_at_most_max():
    p = MemoryPort("m", capacity=5)
    try:
        assert p.inject([b"a", bytearray(b"b"), memoryview(b"c")]) == 3
        assert all(type(f) is bytes for f in p._rx)  # copies, as received from a wire
        assert p.inject([b"d", b"e", b"f", b"g"]) == 2 and p.counters["rx_drops"] == 2
        assert p.inject([b"h"]) == 0 and p.counters["rx_drops"] == 3
        assert p.recv(2).frames() == [b"a", b"b"] and p.pending() == 3
        assert p.recv(10).frames() == [b"c", b"d", b"e"] and p.pending() == 0 and p.recv() is None
        assert p.counters["rx_packets"] == 5
    finally:
        p.close()
