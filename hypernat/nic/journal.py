"""The port-block journal: what a NIC allocated, on disk before it is used.

A NIC hands external ports to internal hosts in blocks.  If the NIC is killed (SIGKILL,
power) its tables are gone, but remote peers may still send to the external endpoints
it had handed out.  Handing those endpoints to another host too early would deliver
one host's traffic to another (invariant 1).  So every block is journaled, written and
fsync'ed, *before* the block's first port is used:

    RuleBuilder: blocks the next hosts will take ──► append_many({"op": "reserve", ...}) ──► fsync
    packet: reserved block g for host h ──► append_lazy({"op": "assign", ...})   (no fsync)
    restart after a crash: load() ──► RuleBuilder.quarantine_blocks(live blocks, until)

Journaled ahead of need: the fsync (hundreds of microseconds on a disk) must not sit
between a new host's first packet and its rule.  So the worker journals the next blocks
the RuleBuilder will take as "reserve" records, off the packet path (at start, then in
its timers while no fetch waits), and a reserved block's "assign" record is written
with ``append_lazy`` (in the kernel at once, on disk at the next ``sync``).  A block
needed before a reserve of it is durable is reserved the synchronous way (with the
next few of its address: one fsync for a burst).

Off the loop thread (``background=True``, what the NIC worker uses): an fsync here takes
300-1000 us, and the loop must not stop for it (a burst of packets waits in the ring, a
FETCH waits at its owner).  ``sync`` and ``append_many(..., on_durable=cb)`` write at
once (the records are in the kernel: a killed process loses nothing) and leave the
fsync to one background thread (``os.fsync`` releases the GIL); the loop calls
``poll()`` each turn, which runs the callbacks of the fsyncs that completed — in the
loop's thread.  The RuleBuilder adds reserved blocks to its pool only from that
callback, so "on disk before first use" holds.

    timers: reserve_blocks ──► append_many(recs, on_durable=cb) ──► write ──► (thread) fsync
    timers: poll() ──► cb(): the blocks join the reserve

A log with checkpoints (space and restart time proportional to live blocks)
--------------------------------------------------------------------------
The log alone would only grow (10^7 block cycles: GBs, minutes to read back).  So the
live state -- every block assigned (with its host), reserved or quarantined -- is
written as a compact *checkpoint*, at start (after a snapshot restore or a crash
recovery) and whenever the log passes ``max_log_bytes`` (or the last checkpoint's size,
if larger), and the log behind it is dropped:

    files:  blocks.journal             the log being appended to (generation N+1)
            blocks.journal.prev        the log closed by a checkpoint still being written (N)
            blocks.journal.checkpoint  the live blocks after every log up to generation C

    checkpoint(records):
      loop thread:  rename log -> .prev ; new log (header: generation N+1) ; appends go there
      fsync thread: fsync .prev ; write checkpoint.tmp (header: covers N), fsync ;
                    rename -> .checkpoint ; fsync dir ; unlink .prev ; fsync dir

A crash at any point leaves an old or new checkpoint and the logs after it: ``load()``
reads the checkpoint, then every log whose generation is newer than what it covers,
in order, line by line (never the whole file at once), keeping only the live map
(block -> host): time and memory O(checkpoint + one bound of log).  Replaying a log
over a checkpoint that already holds some of its records is harmless (each block's
last record decides).  A torn last record (crash mid-write) is skipped.  Each file
starts with a header naming its format version (an unversioned file is version 1, the
format before checkpoints: one log of the same records); a version this code does not
know is refused with a ``FormatError`` naming the file and both versions.

Full disk: a write that fails (ENOSPC, EIO) is cut back (ftruncate) so that no half
record stays in the log, counted, and raised as ``JournalError``; the RuleBuilder then
refuses new blocks (counted, logged once per interval) while established flows go on.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import threading
import time

log = logging.getLogger("hypernat.nic.journal")

FORMAT_VERSION = 2  # 1: one unversioned log (before checkpoints); 2: header + checkpoint
READABLE_VERSIONS = (1, 2)
DEFAULT_MAX_LOG_BYTES = 1 << 20  # the log is compacted into a checkpoint past this size
RELEASE_OPS = ("release", "return", "free")
CHECKPOINT_RETRY_S = 1.0  # a failed checkpoint is tried again this long after


COUNTERS = ("checkpoints", "checkpoint_errors", "write_errors", "sync_errors")  # Journal.counters()


class JournalError(OSError):
    """A journal write or fsync failed (disk full, I/O error): nothing was persisted."""


class FormatError(ValueError):
    """A journal or checkpoint file of a format version this code does not read."""


def apply(live: dict, rec) -> None:
    """One record's effect on the live map {block id: host "a.b.c.d" or None}: the one
    place the meaning of a record is defined (``load`` and the tests replay through it).
    "assign" and "quarantine" name the block's host (if known), "reserve" a block not
    handed out yet, "release" frees it; a record with no op but a block is live (v1)."""
    if not isinstance(rec, dict) or "block" not in rec:
        return
    try:
        g = int(rec["block"])
    except (TypeError, ValueError):
        return
    op = rec.get("op")
    if op in RELEASE_OPS:
        live.pop(g, None)
    elif op == "reserve":
        if g not in live:
            live[g] = None
    else:
        h = rec.get("host")
        live[g] = h if isinstance(h, str) else None


def live_blocks(records) -> dict:
    """The live map after `records` (an iterable of dicts) in order."""
    live = {}
    for r in records:
        apply(live, r)
    return live


def _line(rec) -> bytes:
    return (json.dumps(rec, separators=(",", ":"), default=_plain) + "\n").encode()


class _File:
    """One journal file read line by line: ``header`` (None: version 1), ``records()``."""

    def __init__(self, path: str, kind: str):
        self.path, self.kind = path, kind
        self.header = None
        self.version = 1
        self.torn = 0
        with open(path, "rb") as f:
            first = f.readline()
        try:
            h = json.loads(first) if first.strip() else None
        except ValueError:
            h = None
        if isinstance(h, dict) and "hypernat" in h:
            v = h.get("version")
            if v not in READABLE_VERSIONS:
                raise FormatError(f"{path}: {kind} format version {v!r}; this hypernat reads versions "
                                  f"{READABLE_VERSIONS[0]} to {READABLE_VERSIONS[-1]} (writes {FORMAT_VERSION})")
            self.header, self.version = h, v

    @property
    def gen(self) -> int:
        """A log's generation (version 1: 0); a checkpoint's: the last log it covers."""
        if self.header is None:
            return 0
        return int(self.header.get("gen", self.header.get("covers", 0)))

    def records(self):
        """Every complete record, streamed; an unreadable line (a torn write) is skipped."""
        with open(self.path, "rb") as f:
            if self.header is not None:
                f.readline()
            for n, line in enumerate(f, 2 if self.header is not None else 1):
                if not line.strip():
                    continue
                try:
                    yield json.loads(line)
                except ValueError:
                    self.torn += 1
                    log.warning("%s: line %d unreadable (torn write?): skipped", self.path, n)


class Journal:
    """The block log and its checkpoint (see the module docstring)."""

    def __init__(self, path: str, fsync: bool = True, background: bool = False,
                 max_log_bytes: int = DEFAULT_MAX_LOG_BYTES):
        self.path = path
        self.prev_path = path + ".prev"
        self.checkpoint_path = path + ".checkpoint"
        self.dir = os.path.dirname(path) or "."
        self.fsync = fsync
        self.max_log_bytes = int(max_log_bytes)
        os.makedirs(self.dir, exist_ok=True)
        self._fd = -1
        self._size = 0  # bytes of complete records in the current log
        self._gen = None  # the current log's generation (None: no log yet)
        self._max_gen = 0  # the newest generation of any file seen
        self._torn = False  # a failed write could not be cut back: start the next on a new line
        self.appended = 0
        self.dirty = False  # append_lazy wrote records not fsync'ed yet
        # fsync off the caller's thread (see the module docstring): only with fsync on
        self.background = bool(background and fsync)
        self._syncer = None
        self._callbacks = []  # (request number, on_durable, on_failed) waiting for their fsync
        self.sync_errors = 0
        self.write_errors = 0
        self.checkpoints = 0
        self.checkpoint_errors = 0
        self.checkpoint_bytes = 0  # size of the last checkpoint written
        self._ckpt_req = 0  # request number of the checkpoint in flight (0: none)
        self._ckpt_retry = 0.0
        self._pending_job = None

    # -- reading ----------------------------------------------------------------------------
    def _files(self) -> list:
        """The checkpoint (if any) and the logs after it, oldest first, as _File."""
        files = []
        for p, kind in ((self.checkpoint_path, "block journal checkpoint"), (self.prev_path, "block journal"),
                        (self.path, "block journal")):
            try:
                files.append(_File(p, kind))
            except FileNotFoundError:
                continue
        return files

    def _scan(self) -> tuple:
        """(checkpoint _File or None, [the logs to replay after it, oldest first]).  A log
        is replayed if it is newer than what the checkpoint covers, or has no header (a
        version 1 log, or a new log whose header a crash cut: replaying is harmless)."""
        files = self._files()
        ck = next((f for f in files if f.path == self.checkpoint_path), None)
        covers = ck.gen if ck is not None else -1
        logs = [f for f in files if f is not ck and (f.header is None or f.gen > covers)]
        self._max_gen = max([f.gen for f in files] + [self._max_gen])
        cur = next((f for f in files if f.path == self.path), None)
        if self._fd < 0:
            self._gen = cur.gen if cur is not None else None
        return ck, logs

    def load(self) -> dict:
        """The live map {block: host or None} named by the checkpoint and the logs after
        it, read line by line: O(checkpoint + log) time, O(live blocks) memory."""
        ck, logs = self._scan()
        live = {}
        for f in ([ck] if ck is not None else []) + logs:
            for r in f.records():
                apply(live, r)
        return live

    def records(self) -> list:
        """Every complete record of the checkpoint and the logs after it, in order (tests)."""
        ck, logs = self._scan()
        return [r for f in ([ck] if ck is not None else []) + logs for r in f.records()]

    def blocks(self) -> set:
        """Block ids live (journaled, not released since)."""
        return set(self.load())

    def log_bytes(self) -> int:
        return self._size

    def counters(self) -> dict:
        """{name: count} of COUNTERS (the NIC's metrics show them as journal_<name>)."""
        return {k: int(getattr(self, k)) for k in COUNTERS}

    def gauges(self) -> dict:
        """Bytes of the current log and of the last checkpoint written."""
        return {"log_bytes": self._size, "checkpoint_bytes": self.checkpoint_bytes}

    # -- writing ----------------------------------------------------------------------------
    def _open(self) -> int:
        if self._fd < 0:
            if self._gen is None:
                self._scan()
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
            self._fd, self._size = fd, os.fstat(fd).st_size
            if self._size and os.pread(fd, 1, self._size - 1) != b"\n":
                self._torn = True  # a crash cut the last record: the next starts on a line of its own
            if self._size == 0:  # a new log: its header first, a generation newer than any file's
                self._max_gen += 1
                self._gen = self._max_gen
                try:
                    self._write_fd(_line({"hypernat": "blocks-journal", "version": FORMAT_VERSION, "gen": self._gen}))
                except JournalError:
                    os.close(fd)
                    self._fd = -1
                    raise
        return self._fd

    def _write_fd(self, data: bytes) -> None:
        """Append data to the log whole, or not at all (cut back on failure)."""
        fd = self._fd
        if self._torn:
            data = b"\n" + data
        done = 0
        try:
            while done < len(data):
                done += os.write(fd, data[done:])
        except OSError as exc:
            self.write_errors += 1
            try:
                os.ftruncate(fd, self._size)
                self._torn = False
            except OSError:
                self._torn = done > 0 or self._torn
            raise JournalError(exc.errno or errno.EIO, f"{self.path}: {exc.strerror or exc}") from exc
        self._size += len(data)
        self._torn = False

    def _write(self, records, durable: bool) -> None:
        """Write records as JSON lines; with `durable`, return only once they (and
        anything ``append_lazy`` left pending) are on disk.  JournalError if not."""
        records = list(records)
        if not records:
            return
        self._open()
        self._write_fd(b"".join(_line(r) for r in records))
        self.appended += len(records)
        if durable:
            if self.fsync:
                try:
                    os.fsync(self._fd)
                except OSError as exc:
                    self.sync_errors += 1
                    raise JournalError(exc.errno or errno.EIO, f"{self.path}: fsync: {exc.strerror}") from exc
            self.dirty = False
        else:
            self.dirty = True

    def append(self, record: dict) -> None:
        """Persist one record; returns only once it is on disk."""
        self._write((record,), durable=True)

    def append_many(self, records, on_durable=None, on_failed=None) -> None:
        """Persist several records with one write and one fsync (group commit);
        returns only once all are on disk.

        With ``background`` and an ``on_durable`` callable: returns once they are
        written (not yet on disk); ``on_durable()`` runs from a later ``poll()`` once
        their fsync completed (if it failed: counted, logged, ``on_failed()`` instead)."""
        if on_durable is None or not self.background:
            self._write(records, durable=True)
            if on_durable is not None:
                on_durable()
            return
        self._write(records, durable=False)
        if self.dirty:  # something was written
            self.dirty = False
            self._callbacks.append((self._request(("fsync", self._fd)), on_durable, on_failed))

    def append_lazy(self, records) -> None:
        """Write records without waiting for the disk: they reach the kernel at once
        (a killed process loses nothing) and the disk at the next ``sync``.  Only for
        records whose block is durable already (a "reserve" record written by
        ``append_many``): losing this one in a power cut loses detail, not safety."""
        self._write(records, durable=False)

    def sync(self) -> bool:
        """fsync what ``append_lazy`` wrote (``background``: start that fsync and
        return); False when there was nothing to do."""
        if not self.dirty or self._fd < 0:
            return False
        if self.background:
            self._request(("fsync", self._fd))
        elif self.fsync:
            try:
                os.fsync(self._fd)
            except OSError as exc:
                self.sync_errors += 1
                log.error("%s: fsync failed: %s", self.path, exc)
        self.dirty = False
        return True

    # -- checkpoints ------------------------------------------------------------------------
    def due(self) -> bool:
        """The log passed its bound (``max_log_bytes`` or the last checkpoint's size, the
        larger) and no checkpoint is being written: time for ``checkpoint``."""
        return (self._size > max(self.max_log_bytes, self.checkpoint_bytes) and not self._ckpt_req
                and time.monotonic() >= self._ckpt_retry)

    def checkpoint(self, records, wait: bool = False) -> bool:
        """Write `records` (the live state: one "assign" / "reserve" / "quarantine"
        record per live block) as the new checkpoint and drop the log behind it.  The
        log rotation happens here; the writing, fsyncs and renames on the fsync thread
        (``background``, unless `wait`) or here.  Returns False if one is in flight
        already; with `wait`, raises JournalError if it failed (the old files stay, and
        still name every live block)."""
        if self._ckpt_req:
            if not wait:
                return False
        if wait and self._syncer is not None:
            self.wait()  # nothing queued for the log's fd any more
        ck, logs = self._scan()
        old_fd = -1
        prev = next((f for f in logs if f.path == self.prev_path), None)
        if prev is not None:
            # a checkpoint failed earlier: .prev is still needed; this one covers it (the
            # records also hold part of the current log: replaying that again is harmless)
            covers = prev.gen
        else:
            covers = self._gen if self._gen is not None else self._max_gen
            if os.path.exists(self.path):
                os.replace(self.path, self.prev_path)  # the fd stays the old log's
            old_fd, self._fd = self._fd, -1
            self._size = 0
            self.dirty = False
            try:
                self._open()  # the new log, its header first
            except JournalError as exc:
                job = _CheckpointJob(self, {}, [], old_fd)
                job.error = exc
                self._ckpt_done(job)
                if old_fd >= 0:
                    os.close(old_fd)
                raise
        head = {"hypernat": "blocks-checkpoint", "version": FORMAT_VERSION, "covers": covers}
        job = _CheckpointJob(self, head, list(records), old_fd)
        if wait or not self.background:
            try:
                job()
            finally:
                self._ckpt_done(job)
            if job.error is not None:
                raise job.error
            return True
        self._ckpt_req = self._request(("call", job))
        self._callbacks.append((self._ckpt_req, None, None))
        self._pending_job = job
        return True

    def _ckpt_done(self, job) -> None:
        self._ckpt_req = 0
        if job.error is not None:
            self.checkpoint_errors += 1
            self._ckpt_retry = time.monotonic() + CHECKPOINT_RETRY_S
            log.error("%s: checkpoint not written (%s): the log and the previous checkpoint stay, and still "
                      "name every live block; retried in %.0f s", self.path, job.error, CHECKPOINT_RETRY_S)
        else:
            self.checkpoints += 1
            self.checkpoint_bytes = job.size

    # -- the background fsync --------------------------------------------------------------
    def _request(self, job) -> int:
        if self._syncer is None:
            self._syncer = _Syncer(self.path)
        return self._syncer.request(job)

    @property
    def waiting(self) -> int:
        """Callbacks waiting for their fsync (``poll`` runs them once it completed)."""
        return len(self._callbacks)

    def poll(self) -> int:
        """Run the ``on_durable`` callbacks whose fsync completed; returns how many ran."""
        if not self._callbacks or self._syncer is None:
            return 0
        done, failed = self._syncer.done, self._syncer.failed
        n = 0
        while self._callbacks and self._callbacks[0][0] <= done:
            seq, cb, on_failed = self._callbacks.pop(0)
            if seq == self._ckpt_req:
                self._ckpt_done(self._pending_job)
                self._pending_job = None
                continue
            if seq in failed:
                self.sync_errors += 1
                if on_failed is not None:
                    on_failed()
                continue
            cb()
            n += 1
        if failed and not self._callbacks:
            self._syncer.forget(done)
        return n

    def wait(self, timeout: float = 30.0) -> None:
        """Block until every fsync started has completed (at most `timeout` s), then ``poll()``."""
        if self._syncer is not None:
            self._syncer.wait(timeout)
            self.poll()

    def close(self) -> None:
        if self._syncer is not None:  # its fsyncs finish before the file descriptor closes
            self.wait()
            self._syncer.stop()
            self._syncer = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class _CheckpointJob:
    """The disk work of one checkpoint (run on the fsync thread or by ``checkpoint``)."""

    def __init__(self, j: Journal, head: dict, records: list, old_fd: int):
        self.j, self.head, self.records, self.old_fd = j, head, records, old_fd
        self.error = None
        self.size = 0

    def __call__(self) -> None:
        j = self.j
        tmp = j.checkpoint_path + ".tmp"
        try:
            if self.old_fd >= 0 and j.fsync:
                os.fsync(self.old_fd)  # the closed log, whole on disk before anything goes
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                data = _line(self.head) + b"".join(_line(r) for r in self.records)
                done = 0
                while done < len(data):
                    done += os.write(fd, data[done:])
                if j.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, j.checkpoint_path)
            _fsync_dir(j.dir, j.fsync)
            try:
                os.unlink(j.prev_path)
            except FileNotFoundError:
                pass
            _fsync_dir(j.dir, j.fsync)
            self.size = len(data)
        except OSError as exc:
            self.error = JournalError(exc.errno or errno.EIO, f"{j.checkpoint_path}: {exc.strerror or exc}")
            try:
                os.unlink(tmp)
            except OSError:
                pass
        finally:
            if self.old_fd >= 0:
                os.close(self.old_fd)
                self.old_fd = -1


def _fsync_dir(d: str, on: bool) -> None:
    if not on:
        return
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Syncer:
    """One thread that runs disk jobs in order: ("fsync", fd) (consecutive ones of the
    same fd served by one fsync) and ("call", job) (a checkpoint).  Requests are
    numbered: ``done`` is the last request completed, ``failed`` those that failed."""

    def __init__(self, name: str):
        self._cv = threading.Condition()
        self._jobs = []  # (request number, job)
        self._want = 0
        self.done = 0
        self.failed = set()
        self._stop = False
        self._t = threading.Thread(target=self._run, name=f"fsync:{os.path.basename(name)}", daemon=True)
        self._t.start()

    def request(self, job) -> int:
        with self._cv:
            self._want += 1
            self._jobs.append((self._want, job))
            self._cv.notify()
            return self._want

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._jobs and not self._stop:
                    self._cv.wait()
                if not self._jobs:
                    return
                jobs, self._jobs = self._jobs, []
            i = 0
            while i < len(jobs):
                first = i
                kind, arg = jobs[i][1]
                err = None
                if kind == "fsync":  # one fsync serves every request on this fd queued behind it
                    while i + 1 < len(jobs) and jobs[i + 1][1] == ("fsync", arg):
                        i += 1
                    try:
                        os.fsync(arg)
                    except OSError as exc:
                        err = exc
                else:
                    arg()
                    err = arg.error
                with self._cv:
                    if err is not None:
                        if kind == "fsync":
                            log.error("journal fsync failed (%s): blocks journaled since are not taken from the "
                                      "reserve", err)
                        self.failed.update(seq for seq, _ in jobs[first:i + 1])
                    self.done = jobs[i][0]
                    self._cv.notify_all()
                i += 1

    def forget(self, upto: int) -> None:
        """Drop the failures of requests up to `upto` (nobody waits for them any more)."""
        with self._cv:
            self.failed = {s for s in self.failed if s > upto}

    def wait(self, timeout: float = 30.0) -> None:
        end = time.monotonic() + timeout
        with self._cv:
            while self.done < self._want:
                left = end - time.monotonic()
                if left <= 0:
                    log.error("journal: disk jobs still running after %.0f s", timeout)
                    return
                self._cv.wait(left)

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
