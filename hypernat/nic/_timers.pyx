# cython: language_level=3
"""The NIC loop's timer scheduler, compiled: ``hypernat/nic/timers.py`` is its reference
(same API, same decisions; tests/test_timers.py runs every scheduler test on both and
compares them on random sequences of operations).

The loop asks the scheduler twice per turn (``next_due`` before its wait, ``run`` after
its packets), so a turn in which no job is due must cost next to nothing: the jobs live
in C-typed objects, the earliest time of the jobs with a fixed period is cached (a job
is due when its own time comes or its owner's ``due()`` says so), the due jobs are
ordered in C arrays (no list per turn), durations read CLOCK_MONOTONIC directly when the
timer is ``time.perf_counter`` (what it reads on Linux), and what ran is kept as job
indexes, turned into ``[(name, seconds)]`` only when asked (``last_ran``)::

      next_due() ─► min(cached fixed minimum, due() of the owner-timed jobs)
      run(now)   ─► due jobs into (time, order) arrays ─► insertion sort ─► job(now) each
                    ─► None/False: next = now + period (inf for owner-timed jobs)
                    ─► True: due again next turn (overrun) ─► float t: due at t
"""
from libc.stdlib cimport free, realloc
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC

import time as _time

INF = float("inf")
cdef double _INF = INF
cdef object _perf_counter = _time.perf_counter


cdef inline double _mono() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <double>ts.tv_sec + <double>ts.tv_nsec * 1e-9


cdef class Job:
    """One periodic job (``timers.Job``): `fn(now)` returns None/False (done), True (left
    work for the next turn) or a float (the time it is due next); `due_fn`, when given,
    says when the job's owner has it due next."""

    cdef public str name
    cdef public object fn
    cdef public double period
    cdef public double next_due
    cdef public object due_fn
    cdef public long long runs
    cdef public long long overruns
    cdef public long long deferred
    cdef public double last_s
    cdef public double max_s
    cdef public long order
    cdef public bint enabled
    cdef public double last_run
    cdef public bint budgeted
    cdef bint fixed  # enabled, period > 0, no due_fn: its time is next_due alone

    def __init__(self, name, fn, period, next_due=0.0, due_fn=None, order=0, budgeted=True):
        self.name = name
        self.fn = fn
        self.period = period
        self.next_due = next_due
        self.due_fn = due_fn
        self.order = order
        self.enabled = True
        self.last_run = -_INF
        self.budgeted = budgeted

    def __repr__(self):
        return f"Job({self.name!r}, period={self.period}, next_due={self.next_due}, enabled={self.enabled})"


cdef class Scheduler:
    """Named periodic jobs, run in due order a slice per loop turn (``timers.Scheduler``).

    turn_budget_s  seconds of job work per turn; None: every due job runs each turn
    timer          what durations are measured with (time.perf_counter)
    """

    cdef public object turn_budget_s
    cdef object _timer
    cdef bint _mono_timer
    cdef public dict jobs
    cdef list _fixed   # enabled, period > 0, no due_fn (registration order)
    cdef list _live    # enabled, the others: owner-timed or every turn
    cdef list _owned   # the live jobs with due_fn
    cdef double _fixed_min
    cdef bint _fixed_stale
    cdef long _order
    cdef list _by_order  # every job, by registration (its order is its index)
    cdef int _cap
    cdef double *_key   # a turn's due jobs: time, order (insertion-sorted)
    cdef long *_ord
    cdef long *_ran     # the orders of the jobs the last run ran, in the order they ran
    cdef int _nran

    def __cinit__(self):
        self._key = NULL
        self._ord = NULL
        self._ran = NULL
        self._cap = 0

    def __dealloc__(self):
        free(self._key)
        free(self._ord)
        free(self._ran)

    def __init__(self, turn_budget_s=None, timer=_perf_counter):
        self.turn_budget_s = turn_budget_s
        self.timer = timer
        self.jobs = {}
        self._fixed, self._live, self._owned, self._by_order = [], [], [], []
        self._fixed_min = _INF
        self._fixed_stale = False
        self._order = 0
        self._nran = 0

    @property
    def timer(self):
        return self._timer

    @timer.setter
    def timer(self, t):
        self._timer = t
        self._mono_timer = t is _perf_counter

    cdef inline double _now(self) except? -1.0:
        if self._mono_timer:
            return _mono()
        return self._timer()

    def add(self, str name, fn, period=0.0, first=0.0, due=None, bint budgeted=True):
        """Register job `name` (unique): run `fn` every `period` seconds, first at
        `first`; or, with `due` (a callable), whenever ``due()`` says.  A job that is
        not `budgeted` runs whenever due, never deferred by the turn budget."""
        cdef int cap
        cdef void *p
        if name in self.jobs:
            raise ValueError(f"timer job {name!r} registered twice")
        if period < 0:
            raise ValueError(f"timer job {name!r}: period must be >= 0, got {period}")
        if self._order >= self._cap:
            cap = 16 if self._cap < 8 else self._cap * 2
            p = realloc(self._key, cap * sizeof(double))
            if p == NULL:
                raise MemoryError()
            self._key = <double *>p
            p = realloc(self._ord, cap * sizeof(long))
            if p == NULL:
                raise MemoryError()
            self._ord = <long *>p
            p = realloc(self._ran, cap * sizeof(long))
            if p == NULL:
                raise MemoryError()
            self._ran = <long *>p
            self._cap = cap
        j = Job(name, fn, float(period), INF if due is not None else float(first), due,
                order=self._order, budgeted=budgeted)
        self._order += 1
        self.jobs[name] = j
        self._by_order.append(j)
        self._regroup()
        return j

    cdef void _regroup(self):
        cdef Job j
        self._fixed, self._live, self._owned = [], [], []
        for j in self._by_order:
            j.fixed = j.enabled and j.due_fn is None and j.period > 0
            if not j.enabled:
                continue
            if j.fixed:
                self._fixed.append(j)
            else:
                self._live.append(j)
                if j.due_fn is not None:
                    self._owned.append(j)
        self._fixed_stale = True

    cdef inline void _set_next(self, Job j, double t):
        j.next_due = t
        if j.fixed:
            self._fixed_stale = True

    cdef double _earliest_fixed(self):
        cdef Job j
        cdef double m
        if self._fixed_stale:
            m = _INF
            for j in self._fixed:
                if j.next_due < m:
                    m = j.next_due
            self._fixed_min = m
            self._fixed_stale = False
        return self._fixed_min

    def job(self, name):
        return self.jobs[name]

    def due_now(self, name):
        """Make job `name` due at once (an event asks for it before its period is over)."""
        self._set_next(<Job>self.jobs[name], -_INF)

    def set_due(self, name, t):
        self._set_next(<Job>self.jobs[name], float(t))

    def enable(self, name, bint on=True):
        (<Job>self.jobs[name]).enabled = on
        self._regroup()

    @staticmethod
    def when(Job j):
        """When job `j` is due next."""
        cdef double t
        if j.due_fn is None:
            return j.next_due
        t = j.due_fn()
        return t if t < j.next_due else j.next_due

    def next_due(self):
        """The earliest time any enabled job is due (inf: none).  Jobs of every turn
        never wake the loop."""
        cdef double best = self._earliest_fixed()
        cdef double t
        cdef Job j
        for j in self._owned:
            t = j.due_fn()
            if t > j.next_due:
                t = j.next_due
            if t < best:
                best = t
        return best

    cdef int _collect(self, double now) except -1:
        """The jobs due at `now` into _key/_ord, sorted by (time, order): by the time each
        is due, never before the time it last ran, then registration order."""
        cdef int n = 0, a, b
        cdef double t, u, k
        cdef long o
        cdef Job j
        for j in self._live:
            t = j.next_due
            if j.due_fn is not None:
                u = j.due_fn()
                if u < t:
                    t = u
            if now >= t:
                self._key[n] = t if t > j.last_run else j.last_run
                self._ord[n] = j.order
                n += 1
        if now >= self._earliest_fixed():
            for j in self._fixed:
                t = j.next_due
                if now >= t:
                    self._key[n] = t if t > j.last_run else j.last_run
                    self._ord[n] = j.order
                    n += 1
        for a in range(1, n):  # insertion sort: a handful of jobs
            k, o = self._key[a], self._ord[a]
            b = a - 1
            while b >= 0 and (self._key[b] > k or (self._key[b] == k and self._ord[b] > o)):
                self._key[b + 1], self._ord[b + 1] = self._key[b], self._ord[b]
                b -= 1
            self._key[b + 1], self._ord[b + 1] = k, o
        return n

    def due(self, double now):
        """The jobs due at `now`, in the order they run (``timers.Scheduler.due``)."""
        cdef int n = self._collect(now), i
        return [self._by_order[self._ord[i]] for i in range(n)]

    def run(self, double now, waiting=None):
        """Run every due job (within the turn's budget, if any); returns how many ran
        (``last_ran()`` says which, and how long each took).  ``waiting``: as in
        ``timers.Scheduler.run`` (asked before each budgeted job once a budgeted job
        ran: true ends the turn's budgeted work)."""
        cdef int n = self._collect(now), i
        cdef int nran = 0
        cdef bint over = False, bounded = self.turn_budget_s is not None
        cdef bint did_budgeted = False, asks = waiting is not None
        cdef double budget = self.turn_budget_s if bounded else 0.0
        cdef double t_turn = self._now() if bounded else 0.0
        cdef double t0, dt, t
        cdef Job j
        self._nran = 0
        for i in range(n):
            j = <Job>self._by_order[self._ord[i]]
            if j.budgeted and nran and (over or (bounded and self._now() - t_turn >= budget)
                                        or (did_budgeted and asks and waiting())):
                over = True
                j.deferred += 1  # it keeps its due time: first in line next turn
                continue
            if j.budgeted:
                did_budgeted = True
            t0 = self._now()
            try:
                r = j.fn(now)
            finally:
                dt = self._now() - t0
                j.runs += 1
                j.last_run = now
                j.last_s = dt
                if dt > j.max_s:
                    j.max_s = dt
                self._ran[nran] = j.order
                nran += 1
                self._nran = nran
            if r is True:
                j.overruns += 1
                t = now  # the rest of its work: next turn
            elif r is None or r is False:
                t = _INF if j.due_fn is not None else now + j.period
            else:
                t = r
            if t != j.next_due:
                self._set_next(j, t)
        return nran

    def last_ran(self):
        """[(name, seconds)] of the jobs the last ``run`` ran, in the order they ran."""
        cdef int i
        cdef Job j
        out = []
        for i in range(self._nran):
            j = <Job>self._by_order[self._ran[i]]
            out.append((j.name, j.last_s))
        return out

    def run_due(self, now, waiting=None):
        """``run``, then ``last_ran``: [(name, seconds)] of the jobs run, in order."""
        self.run(now, waiting)
        return self.last_ran()

    def stats(self):
        """{job: {runs, overruns, deferred, last_us, max_us, period_s}} for metrics."""
        cdef Job j
        return {j.name: {"runs": j.runs, "overruns": j.overruns, "deferred": j.deferred,
                         "last_us": round(j.last_s * 1e6, 1), "max_us": round(j.max_s * 1e6, 1),
                         "period_s": j.period}
                for j in self._by_order}
