"""The port-block journal: what a NIC allocated, on disk before it is used.

A NIC hands external ports to internal hosts in blocks.  If the NIC is killed (SIGKILL,
power) its tables are gone, but remote peers may still send to the external endpoints
it had handed out.  Handing those endpoints to another host too early would deliver
one host's traffic to another (invariant 1).  So every block assignment is appended
here, flushed and fsync'ed, *before* the block's first port is used:

    RuleBuilder: new block for host h ──► journal.append({"block": g, ...}) ──► fsync
                                                                                  │
                                         first port of block g handed out ◄───────┘
    restart after a crash: blocks() ──► RuleBuilder.quarantine_blocks(blocks, until)

Journaled ahead of need: the fsync (hundreds of microseconds on a disk) must not sit
between a new host's first packet and its rule.  So the worker journals the next blocks
the RuleBuilder will take as "reserve" records, off the packet path (at start, then in
its timers while no fetch waits), and a reserved block's "assign" record is written
with ``append_lazy`` (in the kernel at once, on disk at the next ``sync``):

    timers: RuleBuilder.reserve_blocks ──► append_many({"op": "reserve", ...}) ──► fsync
    packet: reserved block g for host h ──► append_lazy({"op": "assign", ...})   (no fsync)
    timers: sync() ──► fsync

Off the loop thread (``background=True``, what the NIC worker uses): an fsync here takes
300-1000 us, and the loop must not stop for it (a burst of packets waits in the ring, a
FETCH waits at its owner).  ``sync`` and ``append_many(..., on_durable=cb)`` write and
flush at once (the records are in the kernel: a killed process loses nothing) and leave
the fsync to one background thread (``os.fsync`` releases the GIL); the loop calls
``poll()`` each turn, which runs the callbacks of the fsyncs that completed — in the
loop's thread.  The RuleBuilder adds reserved blocks to its pool only from that
callback, so "on disk before first use" still holds; a block needed before its reserve
fsync completed is journaled the synchronous way (``append``).

    timers: reserve_blocks ──► append_many(recs, on_durable=cb) ──► write, flush ──► (thread) fsync
    timers: poll() ──► cb(): the blocks join the reserve

Every block is durable before its first use either way; ``blocks()`` counts a
"reserve" record as live, so a crash quarantines reserved blocks (used or not).  A power
cut before the lazy ``sync`` loses only which host a reserved block went to.

A graceful stop writes a snapshot instead (every rule survives) and the journal starts
afresh.  One JSON object per line; a torn last line (crash mid-write) is ignored.
"""
from __future__ import annotations

import json
import logging
import os
import threading

log = logging.getLogger("hypernat.nic.journal")


class Journal:
    """Append-only, fsync'ed JSON-lines file of block assignments."""

    def __init__(self, path: str, fsync: bool = True, background: bool = False):
        self.path = path
        self.fsync = fsync
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self._f = None
        self.appended = 0
        self.dirty = False  # append_lazy wrote records not fsync'ed yet
        # fsync off the caller's thread (see the module docstring): only with fsync on
        self.background = bool(background and fsync)
        self._syncer = None
        self._callbacks = []  # (request number, callable) waiting for their fsync
        self.sync_errors = 0

    def _open(self):
        if self._f is None:
            self._f = open(self.path, "a", encoding="utf-8")
        return self._f

    def _write(self, records, durable: bool) -> None:
        """Write records as JSON lines; with `durable`, return only once they (and
        anything ``append_lazy`` left pending) are on disk."""
        records = list(records)
        if not records:
            return
        f = self._open()
        f.write("".join(json.dumps(r, separators=(",", ":"), default=_plain) + "\n" for r in records))
        f.flush()
        self.appended += len(records)
        if durable:
            if self.fsync:
                os.fsync(f.fileno())
            self.dirty = False
        else:
            self.dirty = True

    def append(self, record: dict) -> None:
        """Persist one record; returns only once it is on disk."""
        self._write((record,), durable=True)

    def append_many(self, records, on_durable=None) -> None:
        """Persist several records with one write and one fsync (group commit: the
        RuleBuilder journals every new block of one batch of misses before any of them
        is used); returns only once all are on disk.

        With ``background`` and an ``on_durable`` callable: returns once they are
        written (not yet on disk); ``on_durable()`` runs from a later ``poll()`` once
        their fsync completed (never, if the fsync failed: counted, logged)."""
        if on_durable is None or not self.background:
            self._write(records, durable=True)
            if on_durable is not None:
                on_durable()
            return
        self._write(records, durable=False)
        if self.dirty:  # something was written
            self.dirty = False
            self._callbacks.append((self._request(), on_durable))

    def append_lazy(self, records) -> None:
        """Write records without waiting for the disk: they reach the kernel at once
        (a killed process loses nothing) and the disk at the next ``sync``.  Only for
        records whose block is durable already (a "reserve" record written by
        ``append_many``): losing this one in a power cut loses detail, not safety."""
        self._write(records, durable=False)

    def sync(self) -> bool:
        """fsync what ``append_lazy`` wrote (``background``: start that fsync and
        return); False when there was nothing to do."""
        if not self.dirty or self._f is None:
            return False
        if self.background:
            self._request()
        elif self.fsync:
            os.fsync(self._f.fileno())
        self.dirty = False
        return True

    # -- the background fsync --------------------------------------------------------------
    def _request(self) -> int:
        if self._syncer is None:
            self._syncer = _Syncer(self.path)
        return self._syncer.request(self._f.fileno())

    def poll(self) -> int:
        """Run the ``on_durable`` callbacks whose fsync completed; returns how many ran."""
        if not self._callbacks or self._syncer is None:
            return 0
        done, failed = self._syncer.done, self._syncer.failed
        n = 0
        while self._callbacks and self._callbacks[0][0] <= done:
            seq, cb = self._callbacks.pop(0)
            if seq in failed:
                self.sync_errors += 1
                continue
            cb()
            n += 1
        return n

    def wait(self) -> None:
        """Block until every fsync started has completed, then ``poll()``."""
        if self._syncer is not None:
            self._syncer.wait()
            self.poll()

    def records(self) -> list:
        """Every complete record in the file (a torn last line is skipped and logged)."""
        try:
            with open(self.path, encoding="utf-8") as f:
                lines = f.read().split("\n")
        except FileNotFoundError:
            return []
        out = []
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except ValueError:
                log.warning("%s: line %d unreadable (torn write?): skipped", self.path, i + 1)
        return out

    def blocks(self) -> set:
        """Block ids journaled (records with a "block" field) and not released since."""
        live = set()
        for r in self.records():
            if not isinstance(r, dict) or "block" not in r:
                continue
            try:
                b = int(r["block"])
            except (TypeError, ValueError):
                continue
            if r.get("op") in ("release", "return", "free"):
                live.discard(b)
            else:
                live.add(b)
        return live

    def reset(self) -> None:
        """Start afresh (after a snapshot made the journal's content redundant)."""
        self.close()
        with open(self.path, "w", encoding="utf-8") as f:
            f.flush()
            if self.fsync:
                os.fsync(f.fileno())

    def close(self) -> None:
        if self._syncer is not None:  # its fsyncs finish before the file descriptor closes
            self.wait()
            self._syncer.stop()
            self._syncer = None
        if self._f is not None:
            self._f.close()
            self._f = None


class _Syncer:
    """One thread that fsyncs a file descriptor on request; requests made while an
    fsync runs are served together by the next one (numbered: ``done`` is the last
    request covered)."""

    def __init__(self, name: str):
        self._cv = threading.Condition()
        self._want = 0
        self.done = 0
        self.failed = set()
        self._fd = -1
        self._stop = False
        self._t = threading.Thread(target=self._run, name=f"fsync:{os.path.basename(name)}", daemon=True)
        self._t.start()

    def request(self, fd: int) -> int:
        with self._cv:
            self._want += 1
            self._fd = fd
            self._cv.notify()
            return self._want

    def _run(self) -> None:
        while True:
            with self._cv:
                while self._want == self.done and not self._stop:
                    self._cv.wait()
                if self._want == self.done:
                    return
                upto, fd = self._want, self._fd
            err = None
            try:
                os.fsync(fd)
            except OSError as exc:
                err = exc
            with self._cv:
                if err is not None:
                    log.error("journal fsync failed (%s): blocks journaled since are not taken from the reserve", err)
                    self.failed.update(range(self.done + 1, upto + 1))
                self.done = upto
                self._cv.notify_all()

    def wait(self) -> None:
        with self._cv:
            while self.done < self._want:
                self._cv.wait()

    def stop(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._t.join(5)


def _plain(o):
    try:
        return int(o)
    except (TypeError, ValueError):
        return str(o)
