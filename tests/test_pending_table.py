"""The holder's fetches in flight: the compiled table (``hypernat.agent._pending``, C
records over the flow table's hashing) against the dict-based reference
(``hypernat.agent.pending_py``): the same answers and the same state after every
operation of a random sequence -- batches of misses (frames, bounds, the negative
cache, token buckets with an LRU bound), RULE and NACK messages whose records answer,
half-answer or miss the fetches in flight, the due passes (retries and timeouts, a
bounded number at a time, in (due, seq) order), a push completing a fetch, an owner
failing, fetches redirected to another owner, everything made due at once -- and the
FETCH records each wrote, byte for byte, and the messages they make of them per owner;
the compiled table's timer heap checked after every operation."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hypernat import layout
from hypernat import messages as M
from hypernat.agent import pending_py
from hypernat.io.base import Batch, Frames
from hypernat.rules import SESSION_DTYPE

_pending = pytest.importorskip("hypernat.agent._pending")

LIMITS = (0.001, 0.01, 0.05, 0.2)
PARAMS = dict(queue_total=12, queue_per_flow=3, retry_s=0.05, fetch_burst=2.0, fetch_rate=10.0, negative_ttl_s=0.3,
              negative_max=3, capacity=16, max_sources=4)

protos = st.sampled_from([17, 1])
keys = st.tuples(protos, st.integers(0, 5), st.just(1), st.just(10), st.integers(1, 2))
miss = st.tuples(st.integers(0, 1), keys, st.booleans(), st.integers(0, 2), st.one_of(st.none(), st.binary(min_size=1, max_size=3)),
                 st.sampled_from([0, 0, 0, 1, 3]))  # the frame's tag (hairpin decisions so far)
# a record answering the k-th fetch in flight (mod their number), spoiled by `how`
answer = st.tuples(st.integers(0, 50), st.sampled_from(["ok", "ok", "ok", "seq", "source", "owner", "key", "icmp"]),
                   st.integers(0, len(M.NACK_REASONS) - 1))
op = st.one_of(
    st.tuples(st.just("fetch"), st.lists(miss, max_size=16)),
    st.tuples(st.just("fetch"), st.lists(miss, max_size=16)),
    st.tuples(st.just("rule"), st.integers(0, 2), st.lists(answer, max_size=8)),
    st.tuples(st.just("nack"), st.integers(0, 2), st.lists(answer, max_size=8)),
    st.tuples(st.just("time"), st.floats(0.0, 0.6)),
    st.tuples(st.just("time"), st.floats(0.0, 0.3)),
    st.tuples(st.just("due"), st.integers(1, 12)),
    st.tuples(st.just("due"), st.integers(1, 12)),
    st.tuples(st.just("due"), st.integers(1, 3)),
    st.tuples(st.just("advance"),),
    st.tuples(st.just("pop"), st.integers(0, 50)),
    st.tuples(st.just("popmany"), st.lists(st.integers(0, 50), max_size=4)),
    st.tuples(st.just("fail"), st.integers(0, 2)),
    st.tuples(st.just("reseq"), st.integers(0, 2), st.integers(0, 2)),
    st.tuples(st.just("start"), keys, st.integers(0, 2)),
    st.tuples(st.just("neg"), st.integers(0, 1), keys, st.floats(-0.2, 0.5)),
    st.tuples(st.just("send")),
)


def _rows(misses):
    """Misses (fetch_dir, key, icmp, owner, frame[, tag]) as the table takes them:
    FETCH_ROW_DTYPE rows and the frames (a list of bytes / None; ``Frames`` when some
    frame is tagged)."""
    rows = np.zeros(len(misses), layout.FETCH_ROW_DTYPE)
    for j, (fd, (p, sa, sp, da, dp), icmp, owner, *_) in enumerate(misses):
        rows[j] = (sa, da, sp, dp, p, layout.KIND_ICMP_ERROR if icmp else layout.KIND_PLAIN, j & 0x13, fd, j, owner)
    frames = [m[4] for m in misses]
    tags = [m[5] if len(m) > 5 else 0 for m in misses]
    if any(tags):
        return rows, Frames.of(frames, tags)
    return rows, frames


def _queued(fq):
    owners, recs = fq.view()
    return owners.tolist(), recs.tobytes()


def _state(t):
    return (len(t), bool(t), t.queued, sorted(t.items()), sorted(t.seqs().items()), t.neg_items(),
            t.source_items(), t.neg_len())


def _plain(answer):
    """answer_rules' result with its arrays as lists, its frames as bytes and tags (to
    compare the twins': the frames' bytes, order and tags)."""
    return tuple(x.tolist() if isinstance(x, np.ndarray) else (x.tolist(), x.tag_list()) if isinstance(x, Frames)
                 else x for x in answer)


def _rule_records(pend, rng_ops, source):
    """RULE records for fetches in flight (sorted, so both tables see the same ones)."""
    recs = M.records(M.T_RULE, len(rng_ops))
    for i, (k, how, _) in enumerate(rng_ops):
        if not pend:
            recs["seq"][i] = 1000 + k
            continue
        pk, p = pend[k % len(pend)]
        fd, (proto, sa, sp, da, dp) = pk
        r = recs[i:i + 1]
        r["seq"], r["rule_id"], r["lease_ms"], r["owner"], r["proto"] = p.seq, 7 + k, 3000, source, proto
        if fd == 1:  # (p, R, Rp, E, Ep)
            r["int_addr"], r["int_port"], r["ext_addr"], r["ext_port"], r["rem_addr"], r["rem_port"] = (
                0x0A000001, 1000 + k, da, dp, sa, sp)
        else:  # (p, I, Ip, R, Rp)
            r["int_addr"], r["int_port"], r["ext_addr"], r["ext_port"], r["rem_addr"], r["rem_port"] = (
                sa, sp, 99, 2000 + k, da, dp)
        if how == "seq":
            r["seq"] = (p.seq + 99) % 0xFFFFFFFF + 1  # another seq (seqs wrap, never 0)
        elif how == "owner":
            r["owner"] = source + 1
        elif how == "key":
            r["rem_addr"] = r["rem_addr"] + 1
        elif how == "icmp":  # an ICMP query keys on the identifier: the other port may differ
            r["rem_port"] = r["rem_port"] + 1
    return recs


def _nack_records(pend, rng_ops):
    recs = M.records(M.T_NACK, len(rng_ops))
    for i, (k, how, reason) in enumerate(rng_ops):
        recs["reason"][i] = reason
        if not pend:
            recs["seq"][i] = 1000 + k
            continue
        pk, p = pend[k % len(pend)]
        rec = np.frombuffer(pending_py.fetch_record(pk[0], pk[1], p.seq, p.flags), M.KEY_DTYPE)
        recs[i] = rec[0]
        recs["reason"][i] = reason
        if how == "seq":
            recs["seq"][i] = (p.seq + 99) % 0xFFFFFFFF + 1  # another seq (seqs wrap, never 0)
        elif how == "key":
            recs["rem_addr"][i] += 1
        elif how == "icmp":
            recs["kind"][i] ^= 1
    return recs


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(op, max_size=40), st.integers(1, 0xFFFFFFFF))
def test_compiled_pending_table_answers_as_the_dict_model(ops, seq0):
    c, m = _pending.PendingTable(**PARAMS), pending_py.PendingTable(**PARAMS)
    seq = {"c": seq0, "m": seq0}
    fq = {"c": _pending.FetchQueue(), "m": pending_py.FetchQueue()}
    now = 1.0
    for o in ops:
        kind = o[0]
        pend = sorted(m.items())
        if kind == "fetch":
            rows, frames = _rows(o[1])
            if all(f is None for f in frames):
                frames = None  # (no frame at all: None)
            got = [t.fetch_rows(rows, frames, now, seq[n], fq[n]) for n, t in (("c", c), ("m", m))]
            assert got[0] == got[1]
            seq["c"] = seq["m"] = got[0][-1]
        elif kind == "rule":
            recs = _rule_records(pend, o[2], o[1])
            owners = np.where(recs["ext_addr"] == 99, o[1] + (o[1] == 0), o[1]) if len(recs) else []
            got = [_plain(t.answer_rules(o[1], recs, owners, now, LIMITS)) for t in (c, m)]
            assert got[0] == got[1]
        elif kind == "nack":
            recs = _nack_records(pend, o[2])
            assert c.answer_nacks(o[1], recs, now) == m.answer_nacks(o[1], recs, now)
        elif kind == "time":
            now += o[1]
        elif kind == "due":
            assert c.due(now, o[1], 0.2, 0.5, fq["c"]) == m.due(now, o[1], 0.2, 0.5, fq["m"])
        elif kind == "advance":
            for t in (c, m):
                t.advance_all(now)
        elif kind == "pop":
            pk = pend[o[1] % len(pend)][0] if pend else (1, (6, 0, 1, 10, 1))
            got = [t.pop(pk) for t in (c, m)]
            assert got[0] == got[1] and (got[0] is None or isinstance(got[0], Frames))
        elif kind == "popmany":
            pks = [pend[k % len(pend)][0] for k in o[1]] if pend else [(1, (6, 0, 1, 10, 1))]
            got = [t.pop_many(pks) for t in (c, m)]
            assert got[0].tolist() == got[1].tolist() and got[0].tag_list() == got[1].tag_list()
        elif kind == "fail":
            assert c.fail_owner(o[1]) == m.fail_owner(o[1])
        elif kind == "reseq":
            got = [sorted(t.of_owner(o[1], 1)) for t in (c, m)]
            assert got[0] == got[1]
            for s, _ in got[0]:
                dues = [t.reseq(s, o[2], seq[n], now, 0.5, fq[n]) for n, t in (("c", c), ("m", m))]
                assert dues[0] == dues[1]
                seq["c"] = seq["m"] = seq["m"] % 0xFFFFFFFF + 1
        elif kind == "start":
            pk = (1, o[1])
            if pk not in m:
                for n, t in (("c", c), ("m", m)):
                    t.start(1, o[1], o[2], now, M.FETCH_F_REVALIDATE, seq[n], fq[n])
                seq["c"] = seq["m"] = seq["m"] % 0xFFFFFFFF + 1
        elif kind == "neg":
            pk = (o[1], o[2])
            for t in (c, m):
                t.neg_set(pk, now + o[3])
            assert c.neg_get(pk) == m.neg_get(pk)
        elif kind == "send":
            assert len(fq["c"]) == len(fq["m"])
            got = [[(o, r.tolist()) for o, r in fq[n].take()] for n in ("c", "m")]
            assert got[0] == got[1] and not fq["c"] and not fq["m"]
        assert _state(c) == _state(m)
        assert c.next_due == m.next_due and c._timer_check() and c.timers == len(c)
        assert _queued(fq["c"]) == _queued(fq["m"])
        assert ((1, (6, 0, 1, 10, 1)) in c) == ((1, (6, 0, 1, 10, 1)) in m)
        assert c.queued <= PARAMS["queue_total"] and m.source_items().__len__() <= PARAMS["max_sources"]


def test_a_burst_of_fetches_grows_the_table_and_every_answer_finds_its_fetch():
    """10^4 fetches in flight in a table made for 16: every one answered by its RULE,
    frames back in arrival order, nothing left behind (arena and indexes)."""
    t = _pending.PendingTable(10 ** 5, 4, 0.05, 1e9, 1e9, 1.0, 10, capacity=16)
    n = 10_000
    rows, frames = _rows([(1, (17, 0xC0000200 + (k >> 8), 1000 + (k & 0xFF), 0xC6120001, 2000 + k), False, 2,
                           b"%d" % k) for k in range(n)])
    fq = _pending.FetchQueue()
    assert t.fetch_rows(rows, frames, 0.0, 0xFFFFFF00, fq)[:2] == (n, n)
    assert t.fetch_rows(rows[:5], frames[:5], 0.0, 1, fq)[:2] == (5, 0)  # a second frame each
    (owner, recs), = fq.take()
    assert owner == 2
    assert len(recs) == n and 0 not in recs["seq"].tolist()  # the wrap skips 0
    rules = M.records(M.T_RULE, n)
    for f in ("seq", "proto", "ext_addr", "ext_port", "rem_addr", "rem_port"):
        rules[f] = recs[f]
    rules["owner"] = 2
    acc, dirs, rout, rin, lats, counts, dup, wrong, bad, bad_owner = t.answer_rules(2, rules, np.full(n, 2), 0.0005,
                                                                                    LIMITS)
    assert (acc.tolist(), dup, wrong, bad, bad_owner, rout) == (list(range(n)), 0, 0, 0, [], [])
    assert (dirs == 2).all() and len(lats) == n  # every fetch was an IN fetch
    assert list(rin)[:3] == [b"0", b"0", b"1"] and len(rin) == n + 5 and counts == [n, 0, 0, 0, 0]
    assert len(t) == 0 and t.queued == 0 and t.seqs() == {}


TIMER_PARAMS = dict(queue_total=40, queue_per_flow=2, retry_s=0.05, fetch_burst=1e9, fetch_rate=1e9, negative_ttl_s=0.3,
                    negative_max=8, capacity=16)


@pytest.mark.parametrize("seed", range(12))
def test_the_fetch_timers_of_both_tables_come_up_alike(seed):
    """The timers under load, seeded: tens of fetches in flight (the table grows), most
    answered before their retry, due passes cut by small limits among equal due times,
    retries doubling to the cap, deadlines, redirects, pops, owner failures, everything
    made due at once: both tables send the same records in the same order, give up the
    same fetches, and agree on every fetch's due time; the compiled heap stays exact."""
    import random
    rng = random.Random(seed)
    c, m = _pending.PendingTable(**TIMER_PARAMS), pending_py.PendingTable(**TIMER_PARAMS)
    fq = {"c": _pending.FetchQueue(), "m": pending_py.FetchQueue()}
    tabs = (("c", c), ("m", m))
    seq, now, dues, gone, peak = rng.randrange(1, 0xFFFFFFFF), 1.0, 0, 0, 0
    for _ in range(400):
        pend = sorted(m.items())
        x = rng.random()
        if x < 0.25:
            misses = [(rng.randrange(2), (17, rng.randrange(40), 1, 10, rng.randrange(1, 4)), False, rng.randrange(3),
                       rng.choice([None, b"f"])) for _ in range(rng.randrange(1, 12))]
            rows, frames = _rows(misses)
            got = [t.fetch_rows(rows, frames, now, seq, fq[n]) for n, t in tabs]
            assert got[0] == got[1]
            seq = got[0][-1]
        elif x < 0.40 and pend:  # answers for some of them
            src = rng.randrange(3)
            ops = [(rng.randrange(len(pend)), "ok", 0) for _ in range(rng.randrange(1, 6))]
            recs = _rule_records(pend, ops, src)
            got = [_plain(t.answer_rules(src, recs, np.full(len(recs), src), now, LIMITS)) for t in (c, m)]
            assert got[0] == got[1]
        elif x < 0.45 and pend:
            recs = _nack_records(pend, [(rng.randrange(len(pend)), "ok", rng.randrange(len(M.NACK_REASONS)))])
            assert c.answer_nacks(int(pend[0][1].owner), recs, now) == m.answer_nacks(int(pend[0][1].owner), recs, now)
        elif x < 0.65:
            now += rng.choice([0.0, 0.01, 0.05, 0.05, 0.1, 0.3])
        elif x < 0.85:
            limit = rng.choice([1, 2, 3, 50])
            got = [t.due(now, limit, 0.2, 0.7, fq[n]) for n, t in tabs]
            assert got[0] == got[1] and sum(got[0][:2]) <= limit
            dues += got[0][0] + got[0][1]
            gone += got[0][1]
        elif x < 0.88 and pend:
            pk = pend[rng.randrange(len(pend))][0]
            assert c.pop(pk) == m.pop(pk)
        elif x < 0.91:
            o = rng.randrange(3)
            for s_, _ in sorted(m.of_owner(o, 1))[:3]:
                new = (o + 1) % 3
                assert c.reseq(s_, new, seq, now, 0.7, fq["c"]) == m.reseq(s_, new, seq, now, 0.7, fq["m"])
                seq = seq % 0xFFFFFFFF + 1
        elif x < 0.93:
            o = rng.randrange(3)
            assert c.fail_owner(o) == m.fail_owner(o)
        elif x < 0.95:
            for t in (c, m):
                t.advance_all(now)
        else:
            got = [[(o, r.tolist()) for o, r in fq[n].take()] for n in ("c", "m")]
            assert got[0] == got[1]
        assert _state(c) == _state(m) and _queued(fq["c"]) == _queued(fq["m"])
        assert c.next_due == m.next_due and c._timer_check() and c.timers == len(c)
        peak = max(peak, len(m))
        assert m.timers <= max(65, 2 * peak + 1)  # the reference's stale items: bounded
        assert all(p.due <= now + 0.2 + 1e-9 or p.due <= p.first + 0.7 for _, p in m.items())
    assert dues > 100 and gone > 20 and peak > 16  # the timers came up, many given up; the table grew


@pytest.mark.parametrize("impl", ["compiled", "reference"])
def test_a_retry_doubles_its_wait_up_to_the_cap_and_gives_up_at_the_deadline(impl):
    mod = _pending if impl == "compiled" else pending_py
    t, fq = mod.PendingTable(**TIMER_PARAMS), mod.FetchQueue()
    rows, frames = _rows([(0, (17, 1, 1, 10, 1), False, 2, b"a"), (0, (17, 2, 1, 10, 1), False, 2, b"b")])
    t.start(1, (17, 9, 1, 10, 1), 2, 0.0, 0, 100, fq)
    t.fetch_rows(rows, frames, 0.0, 101, fq)
    t.fetch_rows(rows[:1], frames[:1], 0.0, 200, fq)  # a second frame for the first one
    fq.take()
    assert t.next_due == 0.05 and [p.due for _, p in sorted(t.items(), key=lambda i: i[1].seq)] == [0.05] * 3
    assert t.due(0.049, 10, 0.2, 1.0, fq) == (0, 0, 0) and not fq  # not yet
    assert t.due(0.05, 2, 0.2, 1.0, fq) == (2, 0, 0)  # the limit: the two lowest seqs of the due time
    assert fq.view()[1]["seq"].tolist() == [100, 101] and t.next_due == 0.05
    assert t.due(0.06, 10, 0.2, 1.0, fq) == (1, 0, 0)  # the third, late: due 0.06 + 0.1
    waits = {p.seq: (p.retry, p.due) for _, p in t.items()}
    assert waits == {100: (0.1, 0.05 + 0.1), 101: (0.1, 0.05 + 0.1), 102: (0.1, 0.06 + 0.1)}
    now, sent = 0.15, []
    while now < 1.0:  # nobody answers: 0.05, 0.1, 0.2 (the cap), 0.2, ... until the deadline
        got = t.due(now, 10, 0.2, 1.0, fq)
        sent.append((round(now, 6), got))
        now = t.next_due
    assert [(n, w) for n, (w, _, _) in sent] == [(0.15, 2), (0.16, 1), (0.35, 2), (0.36, 1), (0.55, 2), (0.56, 1),
                                                 (0.75, 2), (0.76, 1), (0.95, 2), (0.96, 1)]
    assert all(p.retry == 0.2 for _, p in t.items())
    assert t.next_due == 1.0  # the deadline, not now + 0.2
    fq.take()
    assert t.due(1.0, 10, 0.2, 1.0, fq) == (0, 3, 4) and not fq  # given up: 2 + 1 + 1 frames
    assert len(t) == 0 and t.queued == 0 and t.next_due == float("inf") and t.timers == 0


@pytest.mark.parametrize("impl", ["compiled", "reference"])
def test_a_recycled_entry_keeps_only_its_own_timer(impl):
    """A fetch answered frees its entry; a new fetch in the same place is due on its own
    time, never on the old one's (the compiled table's heap: the old item left with the
    answer; the reference's: the old item goes stale)."""
    mod = _pending if impl == "compiled" else pending_py
    t, fq = mod.PendingTable(**TIMER_PARAMS), mod.FetchQueue()
    rows, frames = _rows([(0, (17, 1, 1, 10, 1), False, 2, b"a")])
    t.fetch_rows(rows, frames, 0.0, 7, fq)
    assert t.pop((0, (17, 1, 1, 10, 1))) == [b"a"]  # answered (a PUSH brought its rule)
    assert t.next_due == float("inf")
    t.fetch_rows(rows, None, 0.04, 8, fq)  # the same key again: the freed entry, due 0.09
    fq.take()
    assert t.due(0.06, 10, 0.2, 1.0, fq) == (0, 0, 0) and not fq  # the old due (0.05) is gone
    assert t.next_due == pytest.approx(0.09) and t.due(0.09, 10, 0.2, 1.0, fq) == (1, 0, 0)
    assert fq.view()[1]["seq"].tolist() == [8]
    if impl == "compiled":
        assert t.timers == 1 and t._timer_check()


@pytest.mark.parametrize("impl", ["compiled", "reference"])
def test_a_redirected_fetch_is_due_under_its_new_seq_only(impl):
    mod = _pending if impl == "compiled" else pending_py
    t, fq = mod.PendingTable(**TIMER_PARAMS), mod.FetchQueue()
    rows, _ = _rows([(1, (17, 1, 1, 10, 1), False, 2, None), (1, (17, 2, 1, 10, 1), False, 2, None)])
    t.fetch_rows(rows, None, 0.0, 7, fq)
    fq.take()
    assert t.reseq(7, 1, 9, 0.04, 1.0, fq) == pytest.approx(0.09)  # the wait starts again
    fq.take()
    assert t.due(0.05, 10, 0.2, 1.0, fq) == (1, 0, 0) and fq.take()[0][1]["seq"].tolist() == [8]
    assert t.due(0.09, 10, 0.2, 1.0, fq) == (1, 0, 0)
    (owner, recs), = fq.take()
    assert owner == 1 and recs["seq"].tolist() == [9]  # the old seq never comes up again
    assert sorted(p.seq for p in t.values()) == [8, 9]


def test_answered_fetches_leave_no_timer_behind():
    """10^4 fetches answered by their RULEs: the compiled table's timer heap is empty at
    once (nothing to pop or skip when their first retry would have come)."""
    t = _pending.PendingTable(10 ** 5, 4, 0.05, 1e9, 1e9, 1.0, 10, capacity=16)
    n = 10_000
    rows, _ = _rows([(1, (17, 0xC0000200 + (k >> 8), 1000 + (k & 0xFF), 0xC6120001, 2000 + k), False, 2, None)
                     for k in range(n)])
    fq = _pending.FetchQueue()
    t.fetch_rows(rows, None, 0.0, 1, fq)
    assert t.timers == n and t.next_due == 0.05
    (_, recs), = fq.take()
    rules = M.records(M.T_RULE, n)
    for f in ("seq", "proto", "ext_addr", "ext_port", "rem_addr", "rem_port"):
        rules[f] = recs[f]
    rules["owner"] = 2
    keep = rules[::7]  # one in seven unanswered
    answered = np.setdiff1d(np.arange(n), np.arange(0, n, 7))
    t.answer_rules(2, rules[answered], np.full(len(answered), 2), 0.001, LIMITS)
    assert len(t) == len(keep) and t.timers == len(keep) and t._timer_check()
    assert t.due(0.05, n, 0.2, 1.0, fq) == (len(keep), 0, 0)
    assert sorted(fq.view()[1]["seq"].tolist()) == keep["seq"].tolist()


@pytest.mark.parametrize("impl", ["compiled", "reference"])
def test_fetch_rows_refuses_rows_it_cannot_read_and_changes_nothing(impl):
    """Rows of another dtype (a KEY_DTYPE array, tuples) or frames that do not pair with
    the rows: a clear error, no fetch started, nothing queued."""
    mod = _pending if impl == "compiled" else pending_py
    t, fq = mod.PendingTable(**PARAMS), mod.FetchQueue()
    rows, frames = _rows([(1, (17, 1, 1, 10, 1), False, 0, b"a"), (0, (6, 2, 1, 10, 2), False, 1, b"b")])
    with pytest.raises(TypeError, match="FETCH_ROW_DTYPE"):
        t.fetch_rows(np.zeros(2, layout.KEY_DTYPE), frames, 1.0, 1, fq)
    with pytest.raises(TypeError, match="FETCH_ROW_DTYPE"):
        t.fetch_rows([(1, (17, 1, 1, 10, 1), False, 0, b"a")], frames, 1.0, 1, fq)
    with pytest.raises(ValueError, match="1 frames for 2 rows"):
        t.fetch_rows(rows, frames[:1], 1.0, 1, fq)
    assert len(t) == 0 and t.queued == 0 and not fq
    assert t.fetch_rows(rows[::-1], frames[::-1], 1.0, 1, fq) == (2, 2, 0, 0, 0, 3)  # (strided: read as given)
    assert [(o, r["seq"].tolist()) for o, r in fq.take()] == [(1, [1]), (0, [2])] and not fq


_nkey = st.tuples(st.sampled_from([1, 6, 17]), st.integers(1, 2), st.integers(1, 3), st.integers(1, 2),
                 st.integers(1, 3), st.integers(1, 2), st.integers(1, 3))  # proto, I, Ip, E, Ep, R, Rp


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1), st.integers(0, 4)), max_size=12),
       st.lists(st.tuples(_nkey, st.integers(0, 3)), min_size=1, max_size=8), st.data())
def test_answers_end_the_negative_entries_of_their_keys_in_both_tables(negs, rules, data):
    """neg_discard_rules (RULE records read in place, the dirs of each) drops the same
    negative-cache entries in the compiled table and in the reference: the out key
    and / or in key (rules.out_key / in_key: ICMP on the identifier) of each record
    selected, nothing else."""
    from hypernat.agent.core import session_key

    sks = [sk for sk, _ in rules]
    params = dict(PARAMS, negative_max=64)  # room for every refusal
    c, m = _pending.PendingTable(**params), pending_py.PendingTable(**params)
    for d, k in negs:  # refusals for some of the answers' keys, and others
        sk = sks[k % len(sks)] if k < 4 else (6, 9, 9, 9, 9, 9, 9)
        for t in (c, m):
            t.neg_set((d, session_key(sk, d)), 5.0)
    recs = M.records(M.T_RULE, len(rules))
    for x, (sk, _) in enumerate(rules):
        for f, v in zip(("proto", "int_addr", "int_port", "ext_addr", "ext_port", "rem_addr", "rem_port"), sk):
            recs[f][x] = v
    idx = np.array(data.draw(st.lists(st.integers(0, len(rules) - 1), max_size=len(rules))), np.int64)
    dirs = data.draw(st.sampled_from([np.array([d for _, d in rules], np.uint8), 3, 1]))
    for t in (c, m):
        t.neg_discard_rules(recs, idx, dirs)
    assert c.neg_items() == m.neg_items()
    dl = np.broadcast_to(np.asarray(dirs, np.uint8), (len(rules),))
    gone = {(d, session_key(sks[x], d)) for x in idx.tolist() for d in (0, 1) if dl[x] & (1 << d)}
    assert {pk for pk, _ in m.neg_items()} == {(d, session_key(sks[k % len(sks)], d)) if k < 4
                                              else (d, session_key((6, 9, 9, 9, 9, 9, 9), d)) for d, k in negs} - gone


# ------------------------------------------------------------------------ the owner's leases
_leases = pytest.importorskip("hypernat.agent._leases")

sks = st.tuples(st.sampled_from([6, 1]), st.just(0x0A000001), st.integers(1, 2), st.just(0xC6120001),
                st.integers(1, 3), st.just(0xC0000201), st.integers(1, 2))
lease_op = st.one_of(
    st.tuples(st.just("grant"), st.lists(sks, max_size=6), st.integers(1, 3),
              st.sampled_from(["session", "activity", "rule"]), st.booleans()),
    st.tuples(st.just("end"), sks, st.integers(1, 3)),
    st.tuples(st.just("due"), st.floats(0.0, 1.0), st.integers(0, 4)),
    st.tuples(st.just("held"), st.lists(sks, max_size=5), st.integers(1, 3)),
    st.tuples(st.just("leases_of"), st.lists(sks, max_size=6), st.sampled_from(["session", "activity", "rule"])),
    st.tuples(st.just("end_records"), st.lists(sks, max_size=6), st.sampled_from(["session", "rule"]),
              st.one_of(st.integers(1, 3), st.lists(st.integers(1, 3), min_size=6, max_size=6)), st.booleans()),
)


def _session_records(sks_, layout_):
    """Session identities as records of one layout naming sessions (the grant's input)."""
    if layout_ == "session":
        recs, names = np.zeros(len(sks_), SESSION_DTYPE), ("proto", "iaddr", "iport", "eaddr", "eport", "raddr",
                                                          "rport")
    else:
        recs = M.records(M.T_ACTIVITY if layout_ == "activity" else M.T_RULE, len(sks_))
        names = ("proto", "int_addr", "int_port", "ext_addr", "ext_port", "rem_addr", "rem_port")
    for f, col in zip(names, zip(*sks_)):
        recs[f] = col
    return recs


def _lease_state(t):
    at = {(sk[0], sk[3], sk[4]) for sk in t.keys()}
    return (len(t), t.n_leases, sorted(t.items()), {k: sorted(t.at(*k)) for k in at})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(lease_op, max_size=30))
def test_compiled_lease_table_answers_as_the_dict_model(ops):
    """The same grants, renewals, ends, timer slices and ACTIVITY checks on both lease
    tables: the same answers and state; every lease's timer no later than its end."""
    from hypernat.agent import leases_py

    c, m = _leases.LeaseTable(capacity=16), leases_py.LeaseTable()
    now = 0.0
    for o in ops:
        if o[0] == "grant":  # a lease ends a lease time after its grant or renewal, as in the agent
            recs, idx = _session_records(o[1], o[3]), None
            if o[4]:  # a selection: every other record, the first one twice
                idx = np.array([k for k in range(len(o[1])) if k % 2 == 0] + [0] * bool(o[1]), np.int64)
            assert c.grant(recs, idx, o[2], now + 1.5).tolist() == m.grant(recs, idx, o[2], now + 1.5).tolist()
        elif o[0] == "end":
            assert c.end(o[1], o[2]) == m.end(o[1], o[2])
        elif o[0] == "due":  # slices until nothing is due: equal ends may come up in another order
            now += o[1]
            ended = []
            for t in (c, m):
                got = []
                for _ in range(100):
                    k = t.due(now, o[2])  # the endpoint keys of the leases that ran out
                    assert k.dtype == np.uint64
                    got += k.tolist()
                    if not len(k) and not t.next_due <= now or o[2] == 0:
                        break
                ended.append(sorted(got))
            assert ended[0] == ended[1]
            assert all(u > now for _, hs in c.items() for u in hs.values()) or o[2] == 0
        elif o[0] == "held":
            recs = M.records(M.T_ACTIVITY, len(o[1]))
            for i, (p, ia, ip, ea, ep, ra, rp) in enumerate(o[1]):
                recs[i:i + 1][["proto", "int_addr", "int_port", "ext_addr", "ext_port", "rem_addr", "rem_port"]] = (
                    p, ia, ip, ea, ep, ra, rp)
            assert c.held(recs, o[2]).tolist() == m.held(recs, o[2]).tolist()
        elif o[0] == "leases_of":  # (record, holder, until) of every lease; holders of one record in any order
            recs = _session_records(o[1], o[2])
            got = [sorted(zip(*(a.tolist() for a in t.leases_of(recs)))) for t in (c, m)]
            assert got[0] == got[1]
            assert all(sk in c for sk in o[1]) == (len({k for k, _, _ in got[0]}) == len(o[1]))
        elif o[0] == "end_records":  # one holder for all, or one per record selected
            recs, idx = _session_records(o[1], o[2]), None
            if o[4]:  # a selection: every other record, the first one twice
                idx = np.array([k for k in range(len(o[1])) if k % 2 == 0] + [0] * bool(o[1]), np.int64)
            k = len(o[1]) if idx is None else len(idx)
            hs = o[3] if isinstance(o[3], int) else np.array(o[3][:k], np.int64)
            assert c.end_records(recs, idx, hs).tolist() == m.end_records(recs, idx, hs).tolist()
        assert _lease_state(c) == _lease_state(m)
        timers = c.timers()
        for sk, hs in c.items():
            for h, until in hs.items():
                assert min(t for t, s2, h2 in timers if (s2, h2) == (sk, h)) <= until


@pytest.mark.parametrize("seed", range(4))
def test_compiled_activity_answer_records_equal_the_reference(seed):
    """The owner's conversions of one ACTIVITY message -- its sessions as merged (idle
    seconds off the tick, clipped; both directions; TCP flags per direction) and the
    LEASE records of a selection -- the same bytes compiled and in the reference, for a
    contiguous message and a strided view."""
    from hypernat.agent import leases_py

    rng = np.random.default_rng(seed)
    recs = M.records(M.T_ACTIVITY, 50)
    for f in recs.dtype.names:
        info = np.iinfo(recs.dtype[f])
        recs[f] = rng.integers(0, int(info.max) + 1, len(recs), dtype=np.uint64).astype(recs.dtype[f])
    recs["idle_ms"][:3] = (0, 0xFFFFFFFF, 999)
    idx = rng.integers(0, len(recs), 20)
    for r in (recs, recs[::3]):
        for tick in (0, 5, 1 << 20, 0xFFFFFFFF):
            a = _leases.activity_sessions(r, tick, 3)
            b = leases_py.activity_sessions(r, tick, 3)
            assert a.dtype == b.dtype == SESSION_DTYPE and a.tobytes() == b.tobytes()
        sel = idx[idx < len(r)]
        for ix in (None, sel):
            a, b = _leases.lease_records(r, ix, 2, 30000), leases_py.lease_records(r, ix, 2, 30000)
            assert a.dtype == b.dtype == M.RULE_DTYPE and a.tobytes() == b.tobytes()
    s = _leases.activity_sessions(recs, 5, 3)
    assert s["last_seen"][:3].tolist() == [5, 0, 5] and (s["dirs"] == 3).all()
    with pytest.raises(TypeError):
        _leases.activity_sessions(np.zeros(2, SESSION_DTYPE), 5, 3)


@pytest.mark.parametrize("impl", ["compiled", "reference"])
def test_a_queued_frame_is_a_copy_the_batch_can_reuse(impl):
    """The frames queued behind fetches are copied out of the batch (``Batch.frames_of``
    is a view): the batch's buffer overwritten after ``fetch_rows`` (a ring reused), the
    answer still hands back the bytes queued, in arrival order, with their tags."""
    mod = _pending if impl == "compiled" else pending_py
    t, fq = mod.PendingTable(**PARAMS), mod.FetchQueue()
    frames = [b"first-%d" % k * (k + 1) for k in range(4)]
    b = Batch.from_frames([b"hit"] + frames)
    rows, _ = _rows([(1, (17, 1, 1, 10, 1), False, 2, None), (1, (17, 2, 1, 10, 1), False, 2, None),
                     (1, (17, 1, 1, 10, 1), False, 2, None), (0, (17, 3, 1, 10, 1), False, 2, None)])
    view = b.frames_of(np.arange(1, 5), np.array([0, 2, 0, 1], np.uint8))
    assert view.buf is b.buf  # nothing copied yet
    assert t.fetch_rows(rows, view, 0.0, 1, fq)[:2] == (4, 3)
    b.buf[:] = 0xEE
    assert t[(1, (17, 1, 1, 10, 1))].frames == [frames[0], frames[2]]
    (_, recs), = fq.take()
    rules = M.records(M.T_RULE, 3)
    for f in ("seq", "proto", "ext_addr", "ext_port", "rem_addr", "rem_port", "int_addr", "int_port"):
        rules[f] = recs[f]
    rules["owner"] = 2
    got = t.answer_rules(2, rules[[1, 0]], np.full(2, 2), 0.001, LIMITS)
    rout, rin = got[2], got[3]
    assert isinstance(rin, Frames) and rin.tolist() == [frames[1], frames[0], frames[2]] and not rout
    assert rin.tag_list() == [2, 0, 0]
    rb = rin.batch()
    assert [rb.frame(i) for i in range(rb.n)] == [frames[1], frames[0], frames[2]]
    popped = t.pop((0, (17, 3, 1, 10, 1)))
    assert popped.tolist() == [frames[3]] and popped.tag_list() == [1]
    assert len(t) == 0 and t.queued == 0 and t.pop((0, (17, 3, 1, 10, 1))) is None


@pytest.mark.parametrize("impl", ["compiled", "reference"])
def test_frames_outside_their_buffer_are_refused_before_anything_changes(impl):
    mod = _pending if impl == "compiled" else pending_py
    t, fq = mod.PendingTable(**PARAMS), mod.FetchQueue()
    rows, _ = _rows([(1, (17, 1, 1, 10, 1), False, 2, None), (1, (17, 2, 1, 10, 1), False, 2, None)])
    bad = Frames(np.zeros(8, np.uint8), np.array([0, 6], np.uint32), np.array([4, 4], np.uint32), None, 2)
    with pytest.raises(ValueError):
        t.fetch_rows(rows, bad, 0.0, 1, fq)
    assert len(t) == 0 and t.queued == 0 and not fq


def test_the_frame_arena_bounds_and_reuses_its_memory():
    """queue_total and queue_per_flow bound the frames held; frames of every size up to a
    64 KiB super-frame come back whole; a table answered and refilled many times keeps
    its frame slots (no growth beyond the bound)."""
    t = _pending.PendingTable(100, 3, 0.05, 1e9, 1e9, 1.0, 10, capacity=16)
    fq = _pending.FetchQueue()
    sizes = [60, 1514, 9000, 65535, 1]
    for rnd in range(50):
        misses = [(0, (17, k, 1, 10, 1 + rnd), False, 2, bytes([k & 0xFF, rnd]) * (sizes[k % 5] // 2 + 1))
                  for k in range(40) for _ in range(4)]  # four frames a flow: one over the bound
        rows, frames = _rows(misses)
        n, started, _, _, full, _ = t.fetch_rows(rows, frames, 0.0, 1 + rnd * 100, fq)
        assert started == 40 and n == 100 and full == 60 and t.queued == 100
        (_, recs), = fq.take()
        rules = M.records(M.T_RULE, len(recs))
        for f in ("seq", "proto", "int_addr", "int_port", "rem_addr", "rem_port"):
            rules[f] = recs[f]
        rules["owner"] = 2
        rout = t.answer_rules(2, rules, np.full(len(rules), 2), 0.001, LIMITS)[2]
        want = [frames[4 * k + i] for k in range(33) for i in range(3)] + [frames[4 * 33]]
        assert rout.tolist() == want and t.queued == 0 and len(t) == 0
        assert t.frame_slots == 128  # grown by doubling to the bound, then reused


@pytest.mark.parametrize("owners", [[2] * 5, [0, 1, 0, 2, 1, 1, 0], list(range(70)) + list(range(69, -1, -3))])
def test_fetch_queue_take_groups_by_owner_like_the_twin(owners):
    """``FetchQueue.take``: one array per owner, owners in the order of their first
    record, each one's records in order, whatever the number of owners -- the queue
    left empty."""
    t = _pending.PendingTable(10 ** 4, 4, 0.05, 1e9, 1e9, 1.0, 10, capacity=16)
    fq = _pending.FetchQueue()
    rows, frames = _rows([(1, (17, k, 1000, 0xC6120001, 2000 + k), False, o, None) for k, o in enumerate(owners)])
    t.fetch_rows(rows, frames, 0.0, 1, fq)
    _, queued = fq.view()
    got = fq.take()
    assert [o for o, _ in got] == list(dict.fromkeys(owners))
    for o, recs in got:
        assert recs.tobytes() == queued[[k for k, x in enumerate(owners) if x == o]].tobytes()
    assert sum(len(r) for _, r in got) == len(owners) and not fq and fq.take() == []
