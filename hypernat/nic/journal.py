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

log = logging.getLogger("hypernat.nic.journal")


class Journal:
    """Append-only, fsync'ed JSON-lines file of block assignments."""

    def __init__(self, path: str, fsync: bool = True):
        self.path = path
        self.fsync = fsync
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self._f = None
        self.appended = 0
        self.dirty = False  # append_lazy wrote records not fsync'ed yet

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

    def append_many(self, records) -> None:
        """Persist several records with one write and one fsync (group commit: the
        RuleBuilder journals every new block of one batch of misses before any of them
        is used); returns only once all are on disk."""
        self._write(records, durable=True)

    def append_lazy(self, records) -> None:
        """Write records without waiting for the disk: they reach the kernel at once
        (a killed process loses nothing) and the disk at the next ``sync``.  Only for
        records whose block is durable already (a "reserve" record written by
        ``append_many``): losing this one in a power cut loses detail, not safety."""
        self._write(records, durable=False)

    def sync(self) -> bool:
        """fsync what ``append_lazy`` wrote; False when there was nothing to do."""
        if not self.dirty or self._f is None:
            return False
        if self.fsync:
            os.fsync(self._f.fileno())
        self.dirty = False
        return True

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
        if self._f is not None:
            self._f.close()
            self._f = None


def _plain(o):
    try:
        return int(o)
    except (TypeError, ValueError):
        return str(o)
