"""Bounded waits (hypernat.lab.deadline): they end, and say what they waited for."""
import multiprocessing as mp
import os
import time

import pytest

from hypernat.lab.deadline import Deadline, WaitTimeout, must, orphaned, recv_within, wait_until


def test_wait_until_returns_the_value_or_names_what_it_waited_for():
    seen = []
    assert wait_until(lambda: seen.append(1) or (len(seen) >= 3 and "yes"), 2.0, "three calls", 0.001) == "yes"
    t0 = time.monotonic()
    with pytest.raises(WaitTimeout, match=r"the moon: not after 0.05 s \(still dark\)"):
        wait_until(lambda: False, 0.05, "the moon", 0.01, detail=lambda: "still dark")
    assert time.monotonic() - t0 < 1.0


def test_deadline_and_must():
    d = Deadline(0.05, "x")
    assert d.left() > 0 and d.left_ms() >= 1 and not d.passed
    d.check()  # not yet
    time.sleep(0.06)
    assert d.passed and d.left() == 0 and d.left_ms() == 0
    with pytest.raises(WaitTimeout, match="x: not after 0.05 s"):
        d.check()
    must(True, "ok", 1)
    with pytest.raises(WaitTimeout, match="the coordinator to start: not after 10 s"):
        must(False, "the coordinator to start", 10)


def _silent(conn):
    time.sleep(0.05)  # exits without answering


def _answers(conn):
    conn.send("hello")
    time.sleep(0.5)


def test_recv_within_fails_at_once_when_the_other_end_died():
    ctx = mp.get_context("fork")
    a, b = ctx.Pipe()
    p = ctx.Process(target=_silent, args=(b,), name="silent")
    p.start()
    t0 = time.monotonic()
    with pytest.raises(WaitTimeout, match="silent exited"):
        recv_within(a, 30, "an answer", p)
    assert time.monotonic() - t0 < 5  # not the 30 s
    p.join(5)
    a2, b2 = ctx.Pipe()
    q = ctx.Process(target=_answers, args=(b2,))
    q.start()
    assert recv_within(a2, 10, "an answer", q) == "hello"
    with pytest.raises(WaitTimeout, match="a second answer: not after 0.1 s"):
        recv_within(a2, 0.1, "a second answer", q)
    q.join(5)


def test_orphaned():
    assert not orphaned(os.getppid())
    assert orphaned(os.getppid() + 1)
