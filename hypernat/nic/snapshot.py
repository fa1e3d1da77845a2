"""Snapshots: a NIC's tables and slow-path state, written on a graceful stop.

    SIGTERM ──► loop stops ──► save(out.slots, in.slots, {"rules": …, "agent": …})
                                 └─► <dir>/snapshot.npz (slots, raw bytes of SLOT_DTYPE)
                                     <dir>/snapshot.json (plain data), then renamed into
                                     place: a reader sees the old pair or the new, never half
    start ──► load() ──► tables.load_slots, clones stripped (revalidated with their owners),
                         RuleBuilder.restore, RuleAgent.restore ──► discard()

The slot layout is ``layout.SLOT_DTYPE`` (little-endian, fixed), so a snapshot written
by the Cython fast path is read by the pure-Python one and the other way round.

Format version: snapshot.json carries ``"format": FORMAT_VERSION``; one without it is
version 1 (written before versions were recorded, the same content).  A version this
code does not read is refused with a ``FormatError`` naming the file and both versions.
"""
from __future__ import annotations

import json
import os

import numpy as np

from .. import layout
from .journal import FormatError

FORMAT_VERSION = 2  # 1: no "format" key (the same content)
READABLE_VERSIONS = (1, 2)


class Snapshot:
    def __init__(self, base: str):
        self.base = base
        self.path = base + ".json"
        os.makedirs(os.path.dirname(base) or ".", exist_ok=True)

    def save(self, out_slots: np.ndarray, in_slots: np.ndarray, state: dict) -> None:
        tmp_npz = self.base + ".tmp.npz"
        np.savez(tmp_npz, out=np.asarray(out_slots), inn=np.asarray(in_slots))
        _fsync_path(tmp_npz)
        os.replace(tmp_npz, self.base + ".npz")
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"format": FORMAT_VERSION, **state}, f, default=_plain)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)  # the json is the commit record: written last

    def load(self):
        """(out_slots, in_slots, state) or None when there is no complete snapshot."""
        if not (os.path.exists(self.path) and os.path.exists(self.base + ".npz")):
            return None
        with open(self.path, encoding="utf-8") as f:
            state = json.load(f)
        v = state.get("format", 1) if isinstance(state, dict) else None
        if v not in READABLE_VERSIONS:
            raise FormatError(f"{self.path}: snapshot format version {v!r}; this hypernat reads versions "
                              f"{READABLE_VERSIONS[0]} to {READABLE_VERSIONS[-1]} (writes {FORMAT_VERSION})")
        with np.load(self.base + ".npz") as z:
            out, inn = z["out"], z["inn"]
        if out.dtype != layout.SLOT_DTYPE or inn.dtype != layout.SLOT_DTYPE:
            raise ValueError(f"{self.base}.npz: slots of dtype {out.dtype}, expected SLOT_DTYPE")
        return out, inn, state

    def discard(self) -> None:
        for p in (self.path, self.base + ".npz"):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass


def _fsync_path(p: str) -> None:
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _plain(o):
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, (bytes, bytearray)):
        return o.hex()
    raise TypeError(f"not JSON-able: {type(o).__name__}")
