"""The NIC worker's timer scheduler (hypernat/nic/timers.py), the deadline queue behind
the agent's reliable-delivery engine (hypernat/deadlines.py), and the bounded slices of
periodic work: retransmissions, fetch retries and timeouts, lease ends, clone lease
drops, each at most its slice per loop turn (config ``loop:``)."""
import collections
import dataclasses

import numpy as np
import pytest

from hypernat import config as C
from hypernat import layout
from hypernat import messages as M
from hypernat.agent import AgentParams, RuleAgent
from hypernat.deadlines import DeadlineQueue
from hypernat.lab.emulated import emulated_config
from hypernat.nic import _timers
from hypernat.nic import timers as timers_py
from hypernat.nic.timers import INF

from fixtures.clones import rule_records, selected

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(params=[timers_py.Scheduler, _timers.Scheduler], ids=["py", "compiled"])
def Scheduler(request):
    """Every scheduler test runs on both: the compiled scheduler the worker uses
    (nic/_timers.pyx) and its reference (nic/timers.py)."""
    return request.param


def _plain_next_due(s):
    """What next_due means, written plainly over every job (the reference)."""
    return min((s.when(j) for j in s.jobs.values() if j.enabled and (j.period > 0 or j.due_fn is not None)),
               default=INF)


def _plain_due(s, now):
    d = [(max(t, j.last_run), j.order, j.name) for j in s.jobs.values() if j.enabled and now >= (t := s.when(j))]
    return [n for *_, n in sorted(d)]


@pytest.mark.parametrize("seed", range(8))
def test_cached_due_times_agree_with_a_plain_scan(seed, Scheduler):
    """The scheduler keeps the enabled jobs grouped and the earliest fixed time cached
    (a turn looks at few jobs); whatever the jobs return, whatever set_due / due_now /
    enable do between turns, next_due() and due() answer what a scan of every job does."""
    rng = np.random.default_rng(seed)
    s = Scheduler()
    owned = {"t": 7.0}  # a due_fn job's own timer
    results = {}

    def fn_of(name):
        def fn(now):
            r = results.get(name)
            return r(now) if callable(r) else r
        return fn

    s.add("every", fn_of("every"))
    s.add("a", fn_of("a"), 1.0)
    s.add("b", fn_of("b"), 2.5, first=0.5)
    s.add("c", fn_of("c"), 0.7, first=3.0)
    s.add("own", fn_of("own"), 0.0, due=lambda: owned["t"])
    names = list(s.jobs)
    now = 0.0
    for _ in range(300):
        now += float(rng.choice([0.0, 0.05, 0.3, 1.1]))
        op = int(rng.integers(0, 6))
        name = names[int(rng.integers(0, len(names)))]
        if op == 0:
            s.set_due(name, now + float(rng.uniform(-1, 3)))
        elif op == 1:
            s.due_now(name)
        elif op == 2:
            s.enable(name, bool(rng.integers(0, 4)))  # mostly on
        elif op == 3:
            owned["t"] = now + float(rng.uniform(-0.5, 2))
        elif op == 4:
            results[name] = rng.choice([None, True, False, "float"])
            if results[name] == "float":
                results[name] = (lambda k: (lambda t: t + k))(float(rng.uniform(0.1, 2)))
        assert s.next_due() == _plain_next_due(s)
        want = _plain_due(s, now)
        assert [j.name for j in s.due(now)] == want
        assert [n for n, _ in s.run_due(now)] == want
        assert s.next_due() == _plain_next_due(s)


@pytest.mark.parametrize("seed", range(6))
def test_compiled_scheduler_decides_as_its_reference(seed):
    """nic/_timers.pyx against nic/timers.py: the same random sequence of jobs (fixed
    periods, owner-timed, every turn, unbudgeted), of job results (done, left work, a
    time), of set_due / due_now / enable, with a turn budget measured on a fake clock
    that the jobs advance: the same jobs run in the same order, the same ones are
    deferred, next_due() and the stats agree at every step."""
    rng = np.random.default_rng(100 + seed)
    scheds, clocks, logs = [], [], []
    owned = {"o1": 7.0, "o2": INF}
    results, costs = {}, {}

    def fn_of(name, clock, log):
        def fn(now):
            log.append(name)
            clock.t += costs.get(name, 0.0)
            r = results.get(name)
            return r(now) if callable(r) else r
        return fn

    for impl in (timers_py.Scheduler, _timers.Scheduler):
        clock, log = FakeTimer(), []
        s = impl(turn_budget_s=0.001, timer=clock)
        s.add("every", fn_of("every", clock, log))
        s.add("hup", fn_of("hup", clock, log), INF, first=INF, budgeted=False)
        s.add("a", fn_of("a", clock, log), 1.0)
        s.add("b", fn_of("b", clock, log), 2.5, first=0.5)
        s.add("c", fn_of("c", clock, log), 0.01, first=3.0)
        s.add("o1", fn_of("o1", clock, log), due=lambda: owned["o1"])
        s.add("o2", fn_of("o2", clock, log), due=lambda: owned["o2"], budgeted=False)
        s.add("turn", fn_of("turn", clock, log), 0.0, first=INF, budgeted=False)
        scheds.append(s), clocks.append(clock), logs.append(log)
    names = list(scheds[0].jobs)
    now = 0.0
    for step in range(1500):
        now += float(rng.choice([0.0, 0.001, 0.05, 0.3, 1.1]))
        for _ in range(int(rng.integers(0, 3))):
            op, name = int(rng.integers(0, 7)), names[int(rng.integers(0, len(names)))]
            x = float(rng.uniform(-1, 3))
            if op == 0:
                for s in scheds:
                    s.set_due(name, now + x)
            elif op == 1:
                for s in scheds:
                    s.due_now(name)
            elif op == 2:
                on = bool(rng.integers(0, 4))  # mostly on
                for s in scheds:
                    s.enable(name, on)
            elif op == 3:
                owned[str(rng.choice(["o1", "o2"]))] = float(rng.choice([now + x, -INF, INF]))
            elif op == 4:
                r = rng.choice([None, True, False, "float", "-inf", "inf"])
                k = float(rng.uniform(0.001, 2))
                results[name] = {"float": (lambda t, k=k: t + k), "-inf": -INF, "inf": INF}.get(r, r)
            elif op == 5:
                costs[name] = float(rng.choice([0.0, 0.0002, 0.0008, 0.003]))
        want_next = scheds[0].next_due()
        assert all(s.next_due() == want_next for s in scheds), step
        want_due = [j.name for j in scheds[0].due(now)]
        assert all([j.name for j in s.due(now)] == want_due for s in scheds), step
        w = int(rng.integers(0, 4))  # 0: no `waiting`; 1: nothing waits; 2: always; 3: from the 2nd ask on
        ran = []
        for s in scheds:
            asks = [0]

            def waiting(asks=asks):
                asks[0] += 1
                return w == 2 or (w == 3 and asks[0] >= 2)

            ran.append(s.run_due(now, None if w == 0 else waiting))
        assert all([n for n, _ in r] == [n for n, _ in ran[0]] for r in ran), step
        assert all(s.last_ran() == r for s, r in zip(scheds, ran)), step
        assert logs[0] == logs[1]
        st = [{n: (v["runs"], v["overruns"], v["deferred"]) for n, v in s.stats().items()} for s in scheds]
        assert st[0] == st[1], step
        assert [(j.next_due, j.last_run) for j in scheds[0].jobs.values()] == \
            [(j.next_due, j.last_run) for j in scheds[1].jobs.values()], step
    assert all(v["runs"] for v in scheds[1].stats().values())  # every kind of job ran
    assert sum(v["deferred"] for v in scheds[1].stats().values()) and sum(v["overruns"] for v in scheds[1].stats().values())


class FakeTimer:
    """A perf counter that advances only when a job says it worked."""

    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def job(log, name, timer=None, cost=0.0, result=None):
    def fn(now):
        log.append(name)
        if timer is not None:
            timer.t += cost
        return result(now) if callable(result) else result
    return fn


# ------------------------------------------------------------------------------ Scheduler
def test_due_jobs_run_earliest_first_ties_in_registration_order(Scheduler):
    log = []
    s = Scheduler()
    s.add("c", job(log, "c"), 1.0, first=5.0)
    s.add("a", job(log, "a"), 1.0, first=3.0)
    s.add("b", job(log, "b"), 1.0, first=3.0)
    s.add("later", job(log, "later"), 1.0, first=50.0)
    assert s.next_due() == 3.0
    assert [n for n, _ in s.run_due(10.0)] == ["a", "b", "c"] == log
    assert {n: st["runs"] for n, st in s.stats().items()} == {"c": 1, "a": 1, "b": 1, "later": 0}
    assert s.next_due() == 11.0  # each again one period after it ran
    assert s.run_due(10.5) == []


def test_job_over_its_slice_continues_next_turn_and_counts_an_overrun(Scheduler):
    log, left = [], [3]

    def work(now):  # three slices of work, then done
        log.append(now)
        left[0] -= 1
        return left[0] > 0

    s = Scheduler()
    s.add("w", work, 10.0)
    for t in (1.0, 1.1, 1.2, 1.3, 1.4):
        s.run_due(t)
    assert log == [1.0, 1.1, 1.2]  # due again at once while it has work, then after its period
    st = s.stats()["w"]
    assert st["runs"] == 3 and st["overruns"] == 2
    assert s.next_due() == pytest.approx(11.2)


def test_job_sets_its_own_next_time_and_due_fn_jobs_follow_their_owner(Scheduler):
    log = []
    s = Scheduler()
    s.add("retry", job(log, "retry", result=lambda now: now + 0.25), 5.0)
    heap = [7.0]
    s.add("owner", job(log, "owner"), due=lambda: heap[0])
    s.run_due(1.0)
    assert log == ["retry"] and s.next_due() == 1.25
    heap[0] = 1.1  # the owner's timer moved (an event queued something earlier)
    assert s.next_due() == 1.1
    s.run_due(1.2)
    assert log == ["retry", "owner"]
    heap[0] = INF
    assert s.next_due() == 1.25


def test_every_turn_jobs_run_each_turn_but_never_wake_the_loop(Scheduler):
    log = []
    s = Scheduler()
    s.add("each", job(log, "each"), 0.0)
    s.add("slow", job(log, "slow"), 2.0, first=4.0)
    for t in (1.0, 1.001, 1.002):
        s.run_due(t)
    assert log == ["each"] * 3
    assert s.next_due() == 4.0  # not 1.002: an idle loop sleeps until a real timer
    s.enable("slow", False)
    assert s.next_due() == INF and [n for n, _ in s.run_due(9.0)] == ["each"]


def test_turn_budget_defers_the_rest_to_the_next_turn_first_in_line(Scheduler):
    log, timer = [], FakeTimer()
    s = Scheduler(turn_budget_s=0.001, timer=timer)
    for name in "abcd":
        s.add(name, job(log, name, timer, cost=0.0006), 1.0)
    s.run_due(1.0)
    assert log == ["a", "b"]  # the budget ran out after b
    assert s.stats()["c"]["deferred"] == 1 and s.stats()["d"]["deferred"] == 1
    s.run_due(1.01)
    assert log == ["a", "b", "c", "d"]  # the deferred ones ran first, before anything newer


def test_something_waiting_ends_the_turns_budgeted_jobs_after_one(Scheduler):
    """``run(now, waiting)``: once a budgeted job ran, `waiting` is asked before each
    budgeted job; true defers it and the budgeted jobs after it to the next turn, first
    in line (as a spent budget does), while the unbudgeted ones still run.  It is never
    asked before the turn's first budgeted job, so every turn makes progress, with or
    without a budget."""
    for budget in (None, 1.0):
        log, asked = [], []
        s = Scheduler(turn_budget_s=budget, timer=FakeTimer())
        s.add("turn", job(log, "turn"), 0.0, budgeted=False)
        for name in "abc":
            s.add(name, job(log, name), 1.0)
        s.add("hup", job(log, "hup"), 1.0, budgeted=False)

        def waiting():
            asked.append(log[-1])
            return True

        s.run_due(1.0, waiting)
        assert log == ["turn", "a", "hup"] and asked == ["a"]
        assert s.stats()["b"]["deferred"] == 1 and s.stats()["c"]["deferred"] == 1
        s.run_due(1.001, lambda: False)  # nothing waits: the deferred ones run, first in line
        assert log[3:] == ["b", "c", "turn"]
        s.run_due(3.0)  # no `waiting`: every due job, as before
        assert sorted(log[6:]) == ["a", "b", "c", "hup", "turn"]


def test_unbudgeted_jobs_run_the_turn_they_are_due_whatever_the_budget(Scheduler):
    """A SIGHUP reload, the pushes of the rules this turn built: never deferred."""
    log, timer = [], FakeTimer()
    s = Scheduler(turn_budget_s=0.001, timer=timer)
    s.add("big", job(log, "big", timer, cost=0.005, result=True), 0.0)
    s.add("other", job(log, "other", timer, cost=0.0001), 0.0)
    s.add("reload", job(log, "reload", timer), 0.0, budgeted=False)
    s.run_due(1.0)
    assert log == ["big", "reload"] and s.stats()["other"]["deferred"] == 1


def test_no_job_starves_beside_a_job_that_always_has_more_work(Scheduler):
    """A greedy job that always leaves work and spends the whole turn budget, and jobs
    with short periods: every one of them still runs, every few turns."""
    log, timer = [], FakeTimer()
    s = Scheduler(turn_budget_s=0.001, timer=timer)
    s.add("greedy", job(log, "greedy", timer, cost=0.005, result=True), 0.0)
    for k in range(5):
        s.add(f"p{k}", job(log, f"p{k}", timer, cost=0.0002), 0.002 * (k + 1))
    turns = 400
    last = {}
    for i in range(turns):
        before = len(log)
        s.run_due(i * 0.001)
        assert len(log) > before  # a turn always does something
        for name in log[before:]:
            last.setdefault(name, []).append(i)
    assert set(last) == {"greedy"} | {f"p{k}" for k in range(5)}
    for name, when in last.items():
        gaps = np.diff([-1] + when + [turns])
        assert gaps.max() <= 20, (name, gaps.max())  # nobody waits for ever


def test_no_job_starves_beside_jobs_whose_backlog_is_due_long_ago(Scheduler):
    """Jobs whose owners report a backlog due long ago (a heap of lease ends from the
    past, a round in progress: -inf) and take the whole budget each run: the periodic
    jobs beside them still run every few turns (the backlog queues behind them)."""
    log, timer = [], FakeTimer()
    s = Scheduler(turn_budget_s=0.001, timer=timer)
    s.add("backlog1", job(log, "backlog1", timer, cost=0.002, result=True), due=lambda: 0.0)
    s.add("round", job(log, "round", timer, cost=0.002, result=True), due=lambda: -INF)
    s.add("gc", job(log, "gc", timer, cost=0.00001), 1.0, first=5.0)
    s.add("each", job(log, "each", timer, cost=0.00001), 0.0)
    runs = collections.Counter()
    for i in range(2000):
        before = len(log)
        s.run_due(5.0 + i * 0.001)
        runs.update(log[before:])
    assert runs["gc"] == 2 and runs["each"] >= 2000 // 4  # every second or so; a turn in four or better
    assert runs["backlog1"] >= 2000 // 4 and runs["round"] >= 2000 // 4


def test_duplicate_or_negative_jobs_refused(Scheduler):
    s = Scheduler()
    s.add("x", lambda now: None, 1.0)
    with pytest.raises(ValueError, match="twice"):
        s.add("x", lambda now: None, 1.0)
    with pytest.raises(ValueError, match="period"):
        s.add("y", lambda now: None, -1.0)


# -------------------------------------------------------------------------- DeadlineQueue
def test_deadline_queue_pops_due_keys_in_order_within_the_limit():
    q = DeadlineQueue(resolution=0.001)
    for k, due in enumerate([5.0, 1.0, 3.0, 2.0, 4.0]):
        q.set(("k", k), due)
    assert q.next_due == 1.0 and len(q) == 5
    assert q.pop_due(0.5, 10) == []
    assert q.pop_due(3.0, 2) == [("k", 1), ("k", 3)]  # earliest first, two at most
    assert q.pop_due(3.0, 10) == [("k", 2)]
    q.set(("k", 0), 2.5)  # moved earlier
    q.discard(("k", 4))
    assert q.next_due == 2.5 and ("k", 4) not in q
    assert q.pop_due(10.0, 10) == [("k", 0)] and len(q) == 0 and q.next_due == INF
    for k in range(100):
        q.set(k, 7.0)
    assert len(q) == 100 and q.due_of(5) == pytest.approx(7.0)
    assert sorted(q.pop_due(7.0, 1000)) == list(range(100))


def test_deadline_queue_is_never_early_and_at_most_a_resolution_late():
    rng = np.random.default_rng(1)
    q = DeadlineQueue(resolution=0.001)
    dues = {k: float(d) for k, d in enumerate(rng.uniform(0, 1, 2000))}
    for k, d in dues.items():
        q.set(k, d)
    for step in range(0, 1100):
        now = step / 1000.0
        for k in q.pop_due(now, 10_000):
            assert dues[k] - 1e-9 <= now <= dues[k] + 0.0011, (k, dues[k], now)
            del dues[k]
    assert not dues


# ------------------------------------------------------------ the agent's bounded slices
class _NoWalk(dict):
    """A dict that fails the test when something walks all of it."""

    def _walk(self, *a):
        raise AssertionError("walked every entry")

    __iter__ = items = keys = values = _walk


class _Rules:
    """What the agent asks of a builder on these paths (holds and releases)."""

    def __init__(self):
        self.released = 0

    def hold_many(self, eps):
        pass

    def release_hold(self, p, e, ep):
        self.released += 1

    def release_many(self, ekeys):
        self.released += len(ekeys)

    def drain_created(self):
        return []

    def drain_removed(self):
        return []


def agent(sent, seqs=None, **p):
    seqs = [] if seqs is None else seqs
    params = dict(retry_s=0.05, retry_max_s=0.2, fetch_timeout_s=1.0, retransmit_slice=256, lease_end_slice=256)
    params.update(p)
    def send(t, m, r):
        sent.append((t, m, len(r)))
        seqs.extend(r["seq"].tolist())

    return RuleAgent(0, 2, _Rules(), send, lambda a, q: 1,
                     lambda d, f: None, AgentParams(**params), clock=lambda: 0.0)


def test_a_turn_with_100k_unacked_messages_touches_at_most_the_slice():
    sent, seqs = [], []
    a = agent(sent, seqs=seqs)
    n = 100_000
    recs = M.records(M.T_PUSH, n)
    recs["seq"] = np.arange(1, n + 1)
    for i in range(n):
        a._track(1, M.T_PUSH, recs[i:i + 1], 0.0, 10.0)
    a._unacked = _NoWalk(a._unacked)  # a turn that walks them all fails here
    assert a._pending_due == pytest.approx(0.05)
    sent.clear()
    assert a.step_retransmit(0.06) is True  # all due; one slice resent, the rest left
    assert sent == [(1, M.T_PUSH, 256)] and a.counters["retries"] == 256  # one message
    assert len(set(seqs)) == 256 and set(seqs) <= set(range(1, n + 1))  # the records themselves
    turns = 1
    while a.step_retransmit(0.06):
        turns += 1
        assert sum(k for _, _, k in sent) == 256 * turns
    assert a.counters["retries"] == n and turns + 1 == -(-n // 256)  # the last turn had the rest
    # acknowledged ones leave the queue at once: the next round touches only the rest
    for seq in range(1, n // 2 + 1):
        a._acked(seq)
    sent.clear()
    while a.step_retransmit(0.2):
        pass
    assert sum(k for _, _, k in sent) == n // 2 and len(a._retx) == n // 2
    assert set(seqs[-(n // 2):]) == set(range(n // 2 + 1, n + 1))  # only the unacknowledged ones


def test_fetch_retries_and_timeouts_of_a_burst_a_slice_per_turn():
    """10^4 fetches in flight, nobody answers: retried and then given up a slice per
    turn, through the same engine as the acknowledged messages."""
    sent = []
    a = agent(sent, retransmit_slice=500, fetch_rate=1e9, fetch_burst=1e9)
    n = 10_000
    rows = np.zeros(n, layout.FETCH_ROW_DTYPE)
    k = np.arange(n)
    rows["fetch_dir"], rows["proto"], rows["owner"], rows["frame"] = 1, 17, 1, k
    rows["saddr"], rows["sport"] = 0xC0000200 + (k >> 12), 1000 + (k & 0xFFF)
    rows["daddr"], rows["dport"] = 0xC6120001, 2000 + k % 60000
    a.fetch_rows(rows, [b"f"] * n, 0.0)
    assert len(a.pending) == n and a.counters["fetches"] == n
    walks = a.pending.walks  # a turn that walks every fetch counts one here
    sent.clear()
    turns = 0
    while a.step_retransmit(0.06):
        turns += 1
        assert sum(k for _, _, k in sent) == 500 * turns  # one FETCH per owner, a slice's records
    assert a.counters["fetch_retries"] == n
    while a.step_retransmit(1.0):
        pass
    assert a.counters["fetch_timeout"] == n and a.queued_total == 0 and len(a.pending) == 0
    assert a.pending.walks == walks


def _burst_rows(n, owner=1):
    rows = np.zeros(n, layout.FETCH_ROW_DTYPE)
    k = np.arange(n)
    rows["fetch_dir"], rows["proto"], rows["owner"], rows["frame"] = 1, 17, owner, k
    rows["saddr"], rows["sport"] = 0xC0000200 + (k >> 12), 1000 + (k & 0xFFF)
    rows["daddr"], rows["dport"] = 0xC6120001, 2000 + k % 60000
    return rows


def test_fetches_answered_leave_no_work_for_the_retransmission_turn():
    """10^4 fetches answered before their first retry: nothing of them is left for the
    reliable-delivery engine -- no timer item (the fetch's timer left with its answer),
    nothing due for the scheduler to wake on, a retransmission turn at the first retry
    time that finds nothing to look at.  (Before, each answered fetch's seq stayed queued
    until its retry time, to be popped and looked up for nothing.)"""
    recs_sent = []
    a = RuleAgent(0, 2, _Rules(), lambda t, m, r: recs_sent.append((t, m, r.copy())), lambda a_, q: 1,
                  lambda d, f: None, AgentParams(retry_s=0.05, fetch_rate=1e9, fetch_burst=1e9), clock=lambda: 0.0)
    n = 10_000
    a.fetch_rows(_burst_rows(n), None, 0.0)
    (owner, mtype, recs), = recs_sent
    assert (owner, mtype, len(recs), len(a.pending)) == (1, M.T_FETCH, n, n)
    assert a._pending_due == pytest.approx(0.05)
    nack = recs.copy()
    nack["reason"] = M.NACK["unavailable"]
    a.on_message(1, M.T_NACK, nack, 0.001)
    assert len(a.pending) == 0 and a.counters["fetch_nack"] == n
    assert a._pending_due == INF and len(a._retx) == 0 and a.pending.timers == 0
    recs_sent.clear()
    assert a.step_retransmit(0.06) is False and not recs_sent and a.counters["fetch_retries"] == 0


def test_a_turn_takes_kept_messages_and_fetches_earliest_first_within_one_slice():
    """The two timer structures (messages kept until acknowledged, fetches in flight)
    share the turn's slice, earliest due first."""
    sent = []
    a = agent(sent, retransmit_slice=10, fetch_rate=1e9, fetch_burst=1e9)
    recs = M.records(M.T_PUSH, 8)
    recs["seq"] = np.arange(1, 9)
    for i in range(8):  # due at 0.05
        a._track(1, M.T_PUSH, recs[i:i + 1], 0.0, 10.0)
    a._seq = 100
    a.fetch_rows(_burst_rows(8), None, 0.01)  # due at 0.06
    sent.clear()
    assert a.step_retransmit(0.2) is True  # the 8 messages, then 2 fetches: the slice
    assert a.counters["retries"] == 8 and a.counters["fetch_retries"] == 2
    assert sent == [(1, M.T_FETCH, 2), (1, M.T_PUSH, 8)]  # (the fetches gathered, sent first)
    assert a.step_retransmit(0.2) is False and a.counters["fetch_retries"] == 8  # the other 6
    assert a.counters["tx_fetch"] == 16 and a._pending_due == pytest.approx(0.2 + 0.1)


def test_lease_ends_en_masse_a_slice_per_turn():
    sent = []
    a = agent(sent, lease_end_slice=100, lease_s=10.0)
    sks = [(6, 0x0A000001, 1000 + k, 0xC6120001, 2000 + k, 0xC0000205, 80) for k in range(5000)]
    a._grant_many(sks, 1, 0.0)
    assert a.state()["leases"] == 5000
    end = 10.0 + M.LEASE_GRACE_MS / 1000.0 + 0.01
    turns = 0
    while a.step_lease_ends(end):
        turns += 1
        assert a.state()["leases"] == 5000 - 100 * turns
    assert a.state()["leases"] == 0 and a.rules.released == 5000 and turns == 49


class _ActRules(_Rules):
    """A builder whose tables hold `n` active clone entries (one big slice)."""

    def __init__(self, recs):
        super().__init__()
        self.recs = recs
        self.calls = 0

    def install_clones(self, recs, now, dirs=3, lease_until=0, idx=None, owners=None):
        return np.ones(selected(recs, idx), np.int8)

    def collect_activity(self, clear=True, max_slots=None):
        self.calls += 1
        out, self.recs = self.recs, self.recs[:0]
        return out


def test_activity_entries_reported_a_bounded_number_per_turn():
    from hypernat.rules import DIR_BIT_IN, SESSION_DTYPE

    n = 1000
    sks = [(17, 0x0A000001, 1000 + k, 0xC6120001, 3000 + k, 0xC0000205, 53) for k in range(n)]
    recs = np.zeros(n, SESSION_DTYPE)
    for f, col in zip(("proto", "iaddr", "iport", "eaddr", "eport", "raddr", "rport"), zip(*sks)):
        recs[f] = col
    recs["dirs"], recs["rule_id"], recs["owner"] = DIR_BIT_IN, 1, 1
    sent = []
    a = agent(sent, activity_entries=128)
    a.rules = _ActRules(recs)
    a._install_many(1, rule_records(sks, lease_ms=60_000, owner=1), None, DIR_BIT_IN, 0.0)
    turns = 0
    while a.step_activity(1.0):
        turns += 1
        assert sum(k for _, m, k in sent if m == M.T_ACTIVITY) == 128 * turns
    assert turns + 1 == -(-n // 128) and a.rules.calls == 1
    assert sum(k for _, m, k in sent if m == M.T_ACTIVITY) == n == a.counters["activity_reported"]
    assert a.step_activity(1.5) is False  # the round is over; the next one after the interval


@pytest.mark.parametrize("impl", ["compiled", "python"])
def test_clone_lease_drops_bounded_per_call(impl):
    from hypernat import clones_py

    if impl == "compiled":
        cl = pytest.importorskip("hypernat._clones")
        t = cl.CloneTable()
    else:
        t = clones_py.CloneTable()
    recs = rule_records([(17, 0x0A000001, 1000 + k, 0xC6120001, 3000 + k, 0xC0000205, 53) for k in range(1000)],
                        rule_id=np.arange(1, 1001), lease_ms=1000, owner=1)
    t.install(1, recs, None, 2, 0.0, 0.5, lambda r, todo, d: np.ones(len(todo), np.int8))
    got = t.due_now(5.0, 0.5, 64)
    assert len(got) == 64 and t.next_due <= 5.0
    rest = t.due_now(5.0, 0.5)  # no limit: the rest at once (the old call)
    assert len(rest) == 1000 - 64 and t.next_due == INF


# ----------------------------------------------------------------------- config, worker
BASE = {
    "internal": {"prefixes": ["10.77.0.0/16"]},
    "external": {"pool": ["198.18.77.0/28"], "ports": [1024, 65535]},
    "nics": [{"id": 0, "inside": "inside0", "outside": "outside0"}],
}


def test_loop_keys_are_validated_naming_file_and_key():
    assert C.from_dict(BASE).loop == C.LoopConfig()
    ok = C.from_dict({**BASE, "loop": {"retransmit_slice": 32, "activity_slots": 1024, "turn_budget_us": 0}})
    assert ok.loop.retransmit_slice == 32 and ok.loop.activity_slots == 1024 and ok.loop.turn_budget_us == 0
    for bad, key in (({"retransmit_slice": 0}, "loop.retransmit_slice"),
                     ({"lease_end_slice": "many"}, "loop.lease_end_slice"),
                     ({"turn_budget_us": -1}, "loop.turn_budget_us"),
                     ({"activity_slots": 10}, "loop.activity_slots"),
                     ({"activity_slot": 4}, "loop.activity_slot")):
        with pytest.raises(C.ConfigError) as e:
            C.loads(__import__("yaml").safe_dump({**BASE, "loop": bad}), "gw.yaml")
        assert str(e.value).startswith("gw.yaml") and key in str(e.value), str(e.value)


def test_worker_runs_every_periodic_job_from_its_scheduler_and_exports_them(tmp_path):
    from hypernat.io.memory import MemoryPort
    from hypernat.nic.metrics import registry_for
    from hypernat.nic.worker import NicWorker

    cfg = dataclasses.replace(emulated_config(1), loop=C.LoopConfig(activity_slots=2048, retransmit_slice=7))
    w = NicWorker(cfg, 0, MemoryPort("in0"), MemoryPort("out0"), state_dir=str(tmp_path / "nic0"), standalone=True)
    try:
        names = set(w.timers.jobs)
        assert {"agent_retransmit", "agent_activity", "agent_lease_ends", "agent_clone_leases", "sweep",
                "journal", "gc_freeze"} <= names
        assert not {"hello", "heartbeat", "stats"} & names  # standalone: no coordinator
        assert w.agent.p.activity_slots == 2048 and w.agent.p.retransmit_slice == 7  # loop: reaches the agent
        for _ in range(20):
            w.run_once(1)
        st = w.status()["timers"]
        assert st["sweep"]["runs"] >= 1 and st["agent_activity"]["runs"] >= 1
        reg = registry_for(w)
        assert reg.get_sample_value("hypernat_nic_timer_runs_total", {"nic": "0", "job": "sweep"}) >= 1
        assert reg.get_sample_value("hypernat_nic_timer_last_seconds", {"nic": "0", "job": "sweep"}) is not None
    finally:
        w.close()


def test_resend_all_makes_everything_due_and_sends_it_a_slice_per_turn():
    """A coordinator restart: every unanswered message and fetch is sent again from this
    turn on, a slice per turn (not all in the turn that learnt of the restart)."""
    sent, seqs = [], []
    a = agent(sent, seqs=seqs, retransmit_slice=100, retry_s=5.0, retry_max_s=5.0, fetch_timeout_s=30.0,
              fetch_rate=1e9, fetch_burst=1e9)
    n = 1000
    recs = M.records(M.T_PUSH, n)
    recs["seq"] = np.arange(1, n + 1)
    for i in range(n):
        a._track(1, M.T_PUSH, recs[i:i + 1], 0.0, 100.0)
    a._seq = n + 1
    rows = np.zeros(50, layout.FETCH_ROW_DTYPE)
    k = np.arange(50)
    rows["fetch_dir"], rows["proto"], rows["owner"], rows["frame"] = 1, 17, 1, k
    rows["saddr"], rows["sport"], rows["daddr"], rows["dport"] = 0xC0000200, 1000 + k, 0xC6120001, 2000 + k
    a.fetch_rows(rows, None, 0.0)
    assert not a.step_retransmit(1.0)  # nothing due before the retry wait (5 s)
    sent.clear()
    seqs.clear()
    a.resend_all(1.0)
    assert sum(k for _, _, k in sent) == 100  # the first slice at once, not everything
    turns = 1
    while a.step_retransmit(1.0):
        turns += 1
    assert turns + 1 == -(-(n + 50) // 100) and sorted(seqs) == list(range(1, n + 51))
    assert a.counters["fetch_retries"] == 50 and a.counters["retries"] == n
    q = DeadlineQueue()
    q.set("a", 5.0), q.set("b", 1.0), q.set("c", 9.0)
    q.advance_all(2.0)
    assert q.pop_due(1.0, 10) == ["b"] and sorted(q.pop_due(2.0, 10)) == ["a", "c"] and len(q) == 0
