"""The NIC daemon's one timer scheduler: what periodic work runs when, and how much of it.

This module is the readable reference; the worker runs its compiled twin,
``hypernat/nic/_timers.pyx`` (same API, same decisions: tests/test_timers.py runs every
scheduler test on both and compares them on random sequences).

Every periodic job of a NIC worker (expiry, activity, lease ends, retransmissions,
journal, heartbeat, stats, ...) is a named ``Job`` here, with its period, the time it is
next due and its per-turn slice of work.  Once per loop turn the worker calls
``Scheduler.run(now)`` (``last_ran()`` then says what ran; ``run_due`` is both): the
jobs whose time came run in due order (earliest first, ties in registration order),
each at most once.  A job that follows an event rather than the clock is registered
with its first time at inf and made due by the event (``due_now``)::

      loop turn:  poll ─► packets ─► flush ─► Scheduler.run_due(now)
                                                 │ due jobs, earliest first
                                                 ▼
                         job(now) ─► None/False : done, next due = now + period
                                 ─► True        : left work (over its slice): due again
                                                  next turn (counted: overruns)
                                 ─► t (float)   : due at t (its own timer: a retry, a lease end)

A job never does more than its slice per turn (the slice is the job's own business:
``limits`` and ``loop`` keys of the config), so nothing on the loop costs in proportion
to a table's size.  A turn's jobs may also share a time budget (``turn_budget_s``): once
it is spent the jobs still due wait for the next turn, first in line there (they keep
their due time), so no job starves: every due job runs within a few turns whatever the
others do.  The same happens, once one budgeted job ran, when the loop says something
waits for it (``run(now, waiting)``: a coordinator message, a packet): a FETCH that
arrives while the owner runs its expiry, journal and stats jobs is answered after the
job in progress, not after all of them.  ``next_due()`` tells the loop how long it may sleep.

Per job: runs, overruns (turns it left work for the next), deferred (turns it waited
for the budget), last and longest duration -- ``stats()``, exported as metrics.

``hypernat.deadlines.DeadlineQueue`` is the timer structure the jobs use for many
entries with their own deadlines (the agent's unacknowledged messages).
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

INF = float("inf")


@dataclass(eq=False)
class Job:
    """One periodic job.  `fn(now)` returns None/False (done), True (left work for the
    next turn) or a float (the time it is due next).  A job whose timers live in its
    owner's structures (a heap of lease ends, the fetches in flight) gives `due_fn`,
    which says when it is due next; it runs then (or at once when it left work)."""

    name: str
    fn: Callable[[float], object]
    period: float
    next_due: float = 0.0
    due_fn: Optional[Callable[[], float]] = None
    runs: int = 0
    overruns: int = 0
    deferred: int = 0
    last_s: float = 0.0
    max_s: float = 0.0
    order: int = 0
    enabled: bool = True
    last_run: float = -INF  # the `now` it last ran at
    budgeted: bool = True  # False: runs whenever due, whatever the turn's budget (events of the turn)


@dataclass
class Scheduler:
    """Named periodic jobs, run in due order a slice per loop turn (module docstring).

    turn_budget_s  seconds of job work per turn; None: every due job runs each turn
    timer        what durations are measured with (time.perf_counter)
    """

    turn_budget_s: Optional[float] = None
    timer: Callable[[], float] = time.perf_counter
    jobs: dict = field(default_factory=dict)
    _order: itertools.count = field(default_factory=itertools.count)
    # The loop asks next_due() and due() every turn: the enabled jobs are kept in two
    # lists (rebuilt by add / enable), and the earliest time of the jobs whose time is
    # their own next_due (a period, no due_fn) is cached until one of those changes --
    # a turn then looks at the jobs of every turn and the due_fn jobs only.
    _fixed: list = field(default_factory=list)  # enabled, period > 0, no due_fn
    _live: list = field(default_factory=list)  # enabled, the others (due_fn, or every turn)
    _fixed_min: float = INF
    _fixed_stale: bool = False
    _ran: list = field(default_factory=list)  # the jobs the last run() ran, in order

    def add(self, name: str, fn, period: float = 0.0, first: float = 0.0, due=None, budgeted: bool = True) -> Job:
        """Register job `name` (unique): run `fn` every `period` seconds, first at
        `first`; or, with `due` (a callable), whenever ``due()`` says.  A job that is
        not `budgeted` (what the turn itself brought: a signal, the pushes of the rules
        just built) runs whenever due, never deferred by the turn budget."""
        if name in self.jobs:
            raise ValueError(f"timer job {name!r} registered twice")
        if period < 0:
            raise ValueError(f"timer job {name!r}: period must be >= 0, got {period}")
        j = Job(name, fn, float(period), INF if due is not None else float(first), due,
                order=next(self._order), budgeted=budgeted)
        self.jobs[name] = j
        self._regroup()
        return j

    def _regroup(self) -> None:
        on = sorted((j for j in self.jobs.values() if j.enabled), key=lambda j: j.order)
        self._fixed = [j for j in on if j.due_fn is None and j.period > 0]
        self._live = [j for j in on if not (j.due_fn is None and j.period > 0)]
        self._fixed_stale = True

    def _set_next(self, j: Job, t: float) -> None:
        j.next_due = t
        if j.due_fn is None and j.period > 0:
            self._fixed_stale = True

    def _earliest_fixed(self) -> float:
        if self._fixed_stale:
            self._fixed_min = min((j.next_due for j in self._fixed), default=INF)
            self._fixed_stale = False
        return self._fixed_min

    def job(self, name: str) -> Job:
        return self.jobs[name]

    def due_now(self, name: str) -> None:
        """Make job `name` due at once (an event asks for it before its period is over)."""
        self._set_next(self.jobs[name], -INF)

    def set_due(self, name: str, t: float) -> None:
        self._set_next(self.jobs[name], float(t))

    def enable(self, name: str, on: bool = True) -> None:
        self.jobs[name].enabled = on
        self._regroup()

    @staticmethod
    def when(j: Job) -> float:
        """When job `j` is due next."""
        if j.due_fn is None:
            return j.next_due
        t = j.due_fn()
        return t if t < j.next_due else j.next_due

    def next_due(self) -> float:
        """The earliest time any enabled job is due (inf: none).  Jobs of every turn
        (period 0, no `due`: they handle what the turn's packets left) never wake the loop."""
        best = self._earliest_fixed()
        for j in self._live:
            f = j.due_fn
            if f is None:
                continue  # a job of every turn
            t = f()
            if t > j.next_due:
                t = j.next_due
            if t < best:
                best = t
        return best

    def due(self, now: float) -> list:
        """The jobs due at `now`, in the order they run: by the time each is due, but
        never before the time it last ran (a job whose owner reports a backlog due long
        ago, or that left work, queues behind the jobs that waited for it), then in
        registration order."""
        d = []
        for j in self._live:
            t = j.next_due
            f = j.due_fn
            if f is not None:
                u = f()
                if u < t:
                    t = u
            if now >= t:
                d.append((t if t > j.last_run else j.last_run, j.order, j))
        if now >= self._earliest_fixed():
            for j in self._fixed:
                t = j.next_due
                if now >= t:
                    d.append((t if t > j.last_run else j.last_run, j.order, j))
        if len(d) > 1:
            d.sort()  # (time, order): orders are unique, the jobs never compared
        return [x[2] for x in d]

    def run(self, now: float, waiting: Optional[Callable[[], bool]] = None) -> int:
        """Run every due job (within the turn's budget, if any); returns how many ran
        (``last_ran()`` says which, and how long each took).

        waiting  asked before each budgeted job once a budgeted job ran this turn: true
                 (a message or a packet waits) ends the turn's budgeted work as a spent
                 budget does -- the rest wait for the next turn, first in line there --
                 so that what arrived is handled after one job, not after all of them"""
        ran = self._ran = []
        timer = self.timer
        budget = self.turn_budget_s
        t_turn = timer() if budget is not None else 0.0
        todo = self.due(now)
        over = False
        did_budgeted = False
        for j in todo:
            if j.budgeted and ran and (over or (budget is not None and timer() - t_turn >= budget)
                                       or (did_budgeted and waiting is not None and waiting())):
                over = True
                j.deferred += 1  # it keeps its due time: first in line next turn
                continue
            if j.budgeted:
                did_budgeted = True
            t0 = timer()
            try:
                r = j.fn(now)
            finally:
                dt = timer() - t0
                j.runs += 1
                j.last_run = now
                j.last_s = dt
                if dt > j.max_s:
                    j.max_s = dt
                ran.append(j)
            if r is True:
                j.overruns += 1
                t = now  # the rest of its work: next turn
            elif r is None or r is False:
                t = INF if j.due_fn is not None else now + j.period
            else:
                t = float(r)
            if t != j.next_due:
                self._set_next(j, t)
        return len(ran)

    def last_ran(self) -> list:
        """[(name, seconds)] of the jobs the last ``run`` ran, in the order they ran."""
        return [(j.name, j.last_s) for j in self._ran]

    def run_due(self, now: float, waiting: Optional[Callable[[], bool]] = None) -> list:
        """``run``, then ``last_ran``: [(name, seconds)] of the jobs run, in order."""
        self.run(now, waiting)
        return self.last_ran()

    def stats(self) -> dict:
        """{job: {runs, overruns, deferred, last_us, max_us, period_s}} for metrics."""
        return {j.name: {"runs": j.runs, "overruns": j.overruns, "deferred": j.deferred,
                         "last_us": round(j.last_s * 1e6, 1), "max_us": round(j.max_s * 1e6, 1),
                         "period_s": j.period}
                for j in sorted(self.jobs.values(), key=lambda j: j.order)}
