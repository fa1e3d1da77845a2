"""Bounded waits for the lab, the benchmarks, the evaluation and the tools.

No wait in the tree is unbounded: a loop that waits for something to happen, a join,
a receive — each has a deadline, and when it passes the error says what was awaited,
for how long, and what was seen meanwhile (a hang until pytest's 600 s timeout, a
generator spinning at 100 % CPU, says nothing)::

    d = Deadline(5.0, "the generator's transmit ring to take a chunk")
    while gen.send(batch, chunk) == 0:
        d.check(lambda: gen.stats())          # WaitTimeout: ... not after 5 s (stats)

    wait_until(lambda: up(), 10.0, "the NICs to register")
    must(ready.wait(10), "the coordinator to start", 10)     # Event.wait's False
    recv_within(pipe, 60, "nic0's result", proc)              # multiprocessing pipes

Helper processes that serve a parent (a benchmark's broker, a stub peer) leave their
loop once the parent is gone: ``orphaned(parent_pid)``.
"""
from __future__ import annotations

import os
import time


class WaitTimeout(TimeoutError):
    """A bounded wait ran out; the message names what was awaited."""


class Deadline:
    """A point in time `seconds` from now, for a wait on `what`."""

    __slots__ = ("seconds", "what", "end")

    def __init__(self, seconds: float, what: str):
        self.seconds, self.what = float(seconds), what
        self.end = time.monotonic() + self.seconds

    def left(self) -> float:
        """Seconds left (0 once passed)."""
        return max(0.0, self.end - time.monotonic())

    def left_ms(self) -> int:
        """Milliseconds left, at least 1 while any time is left (for poll() calls)."""
        s = self.end - time.monotonic()
        return max(1, int(s * 1000)) if s > 0 else 0

    @property
    def passed(self) -> bool:
        return time.monotonic() >= self.end

    def check(self, detail=None) -> None:
        """Raise WaitTimeout once the deadline passed; `detail` (text, or a callable
        returning it, called only then) is appended to the message."""
        if time.monotonic() >= self.end:
            self.fail(detail)

    def fail(self, detail=None):
        if callable(detail):
            detail = detail()
        raise WaitTimeout(f"{self.what}: not after {self.seconds:g} s" + (f" ({detail})" if detail else ""))


def wait_until(cond, timeout: float, what: str, interval: float = 0.01, detail=None):
    """Poll `cond()` every `interval` s until it returns something true (returned), or
    raise WaitTimeout after `timeout` s."""
    d = Deadline(timeout, what)
    while True:
        v = cond()
        if v:
            return v
        d.check(detail)
        time.sleep(interval)


def must(ok, what: str, timeout: float, detail=None) -> None:
    """Turn a wait's False (``Event.wait(t)``, ``Popen.poll``-style results) into WaitTimeout."""
    if not ok:
        Deadline(timeout, what).fail(detail)


def recv_within(conn, timeout: float, what: str, proc=None):
    """One object from a multiprocessing Connection within `timeout` s.  If `proc` (the
    process at the other end) exits first, say so at once instead of waiting it out."""
    d = Deadline(timeout, what)
    while not conn.poll(min(0.2, d.left())):
        if proc is not None and not proc.is_alive():
            raise WaitTimeout(f"{what}: {getattr(proc, 'name', 'the process')} exited ({proc.exitcode}) "
                              "without answering")
        d.check()
    return conn.recv()


def orphaned(parent_pid: int) -> bool:
    """True once the process that started us is gone (we were re-parented)."""
    return os.getppid() != parent_pid
