"""The block journal's background fsync: the NIC loop never waits for the disk, and a
reserved block still reaches the disk before its first use."""
import os
import threading

from hypernat.io.memory import MemoryPort
from hypernat.lab.emulated import UDP, build_frame, emulated_config, parse_frame
from hypernat.nic import journal as J
from hypernat.nic.worker import NicWorker, spin

I1 = 0x0A00000A  # 10.0.0.10
R1 = 0xC0000205  # 192.0.2.5


class GatedFsync:
    """os.fsync that records its thread and waits for `gate` (the disk is slow)."""

    def __init__(self):
        self.gate = threading.Event()
        self.threads = []
        self.real = os.fsync

    def __call__(self, fd):
        self.threads.append(threading.get_ident())
        self.gate.wait(10)
        self.real(fd)


def test_append_many_returns_before_the_fsync_and_calls_back_after_it(tmp_path, monkeypatch):
    fs = GatedFsync()
    monkeypatch.setattr(J.os, "fsync", fs)
    j = J.Journal(str(tmp_path / "j"), background=True)
    done = []
    j.append_many([{"op": "reserve", "block": 5}], on_durable=lambda: done.append(5))
    assert j.blocks() == {5}  # written (in the kernel) at once
    assert j.poll() == 0 and done == []  # ... but not yet on disk: no callback
    j.append_lazy([{"op": "assign", "block": 5, "host": "10.0.0.1"}])
    assert j.sync() and not j.dirty  # returns while the disk is still busy
    fs.gate.set()
    j.wait()
    assert done == [5]
    assert fs.threads and threading.get_ident() not in fs.threads  # never on the caller's thread
    j.close()


def test_failed_fsync_never_calls_back(tmp_path, monkeypatch):
    def bad(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(J.os, "fsync", bad)
    j = J.Journal(str(tmp_path / "j"), background=True)
    done = []
    j.append_many([{"op": "reserve", "block": 1}], on_durable=lambda: done.append(1))
    j.wait()
    assert done == [] and j.sync_errors == 1
    j.close()


def test_synchronous_journal_unchanged(tmp_path, monkeypatch):
    calls = []
    real = os.fsync
    monkeypatch.setattr(J.os, "fsync", lambda fd: (calls.append(threading.get_ident()), real(fd)))
    j = J.Journal(str(tmp_path / "j"))
    done = []
    j.append_many([{"block": 2}], on_durable=lambda: done.append(2))
    assert done == [2] and calls == [threading.get_ident()]
    j.close()


class BackgroundGatedFsync(GatedFsync):
    """Only the journal's thread waits for the gate; the caller's thread is counted."""

    def __init__(self):
        super().__init__()
        self.main = threading.get_ident()
        self.main_calls = 0

    def __call__(self, fd):
        if threading.get_ident() == self.main:
            self.main_calls += 1
            return self.real(fd)
        return super().__call__(fd)


def test_worker_fsyncs_on_its_thread_only_for_blocks_not_reserved(tmp_path, monkeypatch):
    """New hosts keep taking blocks while the journal's disk is slow: blocks reserved
    (and fsync'ed) ahead are used with no fsync on the loop's thread; a refill whose
    fsync has not completed does not join the reserve, so the hosts beyond the reserve
    get their blocks journaled the synchronous way (an fsync on the loop's thread,
    before their first packet leaves); once the refill's fsync completes it joins."""
    cfg = emulated_config(1)
    inside, outside = MemoryPort("in0"), MemoryPort("out0")
    w = NicWorker(cfg, 0, inside, outside, state_dir=str(tmp_path / "nic0"), standalone=True)
    rb = w.rules
    fs = BackgroundGatedFsync()
    monkeypatch.setattr(J.os, "fsync", fs)
    durable = set(rb.pool.reserved_ahead())  # reserved and fsync'ed at start
    assert durable
    n = len(durable) + 8  # more new hosts than the reserve holds
    sent = []
    for i in range(n):  # one host at a time, the timers between them (refills start)
        inside.inject([build_frame(UDP, I1 + i, 42000, R1, 53)])
        assert spin([w], lambda: len(outside._tx) >= 1, 3, poll_ms=0)
        sent += outside.take_tx()
        if i == len(durable) // 2:  # half the reserve used: the next timers refill it
            w._journal_due = 0
            w.run_once(0)
            assert rb.pool.reserves_in_flight()  # a refill in flight ...
        assert not (rb.pool.reserves_in_flight() & rb.pool.reserved_ahead())  # ... held back while its fsync waits
    assert len(sent) == n
    blocks = {w.partition.block_of(f.src, f.sport) for f in map(parse_frame, sent)}
    assert len(blocks) == n
    beyond = blocks - durable
    assert beyond  # hosts past the start reserve...
    assert 1 <= fs.main_calls <= len(beyond)  # ... journaled synchronously; the reserved ones were not
    assigned = {int(r["block"]) for r in w.journal.records() if r.get("op") == "assign"}
    assert blocks <= assigned
    fs.gate.set()
    w.journal.wait()
    assert not rb.pool.reserves_in_flight() and rb.pool.reserved_ahead()  # the refill joined the reserve once on disk
    assert not (rb.pool.reserved_ahead() & set(rb.blocks))
    w.close()
