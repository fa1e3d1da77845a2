"""The fragment table in plain Python: the readable twin of ``hypernat._frag``.

Virtual reassembly (the idea, the bounds and the drop reasons are explained at the top
of ``hypernat/_frag.pyx`` and in docs/fastpath.md "Fragments"): the first fragment of a
datagram is translated by the flow tables like any packet and its translation recorded
here under ``(direction, source, destination, protocol, IP ID)``; later fragments are
rewritten with it (addresses, TTL, IP header checksum) or, when they come first, held
in fixed ``CHUNK``-byte chunks until it does; then they are released, rewritten in their
chunk and copied into the translate call's output area (the Translator's
``OutputArea``, cut again where longer than the exit link's MTU), their chunks freed.

This twin keeps the same observable state as the compiled one -- the same free lists
(last freed, first reused), the same chunk numbers -- and the tests compare verdicts,
frames, released frames and counters between the two.
"""
from __future__ import annotations

import operator

import numpy as np

from .fastpath_py import _addr_words, _be16, _be32, _csum_adjust, _put16, _put32
from .verdicts import FRAG_COUNTER_NAMES, VERDICT

CHUNK = 2048  # bytes per held frame
RANGES = 8  # disjoint received ranges per datagram
EXPIRE_PER_CALL = 64

V_TRANSLATED = VERDICT["translated"]
V_HAIRPIN = VERDICT["hairpin"]
V_FRAGMENT_HELD = VERDICT["fragment_held"]
V_DROP_FRAG_TINY = VERDICT["drop_frag_tiny"]
V_DROP_FRAG_OFFSET = VERDICT["drop_frag_offset"]
V_DROP_FRAG_MALFORMED = VERDICT["drop_frag_malformed"]
V_DROP_FRAG_OVERLAP = VERDICT["drop_frag_overlap"]
V_DROP_FRAG_TABLE_FULL = VERDICT["drop_frag_table_full"]
V_DROP_FRAG_HOLD_FULL = VERDICT["drop_frag_hold_full"]

_FC = {n: i for i, n in enumerate(FRAG_COUNTER_NAMES)}
_OK, _OVERLAP, _FULL, _MALFORMED = 0, 1, 2, 3
_RANGE_VERDICT = {_OVERLAP: V_DROP_FRAG_OVERLAP, _FULL: V_DROP_FRAG_HOLD_FULL, _MALFORMED: V_DROP_FRAG_MALFORMED}


class _Entry:
    __slots__ = ("key", "index", "nsa", "nda", "expires", "total", "known", "exitdir", "ranges", "held")

    def __init__(self, key, index, expires):
        self.key = key
        self.index = index
        self.expires = expires
        self.nsa = self.nda = 0
        self.total = 0
        self.known = False
        self.exitdir = 0
        self.ranges: list[list[int]] = []  # [[start, end), ...] sorted, coalesced
        self.held: list[int] = []  # chunk numbers, arrival order


def _expired(e: _Entry, now: int) -> bool:
    d = (now - e.expires) & 0xFFFFFFFF
    return d < 0x80000000  # (int32)(now - expires) >= 0


def _range_fit(e: _Entry, s: int, t: int, last: bool) -> int:
    r = e.ranges
    if last:
        if e.total and e.total != t:
            return _MALFORMED
        if r and r[-1][1] > t:
            return _MALFORMED
    elif e.total and t >= e.total:
        return _MALFORMED
    pos = 0
    for k, (a, z) in enumerate(r):
        if s < z and a < t:
            return _OVERLAP
        if a < s:
            pos = k + 1
    if len(r) == RANGES and not ((pos > 0 and r[pos - 1][1] == s) or (pos < len(r) and r[pos][0] == t)):
        return _FULL
    return _OK


def _range_add(e: _Entry, s: int, t: int, last: bool) -> None:
    r = e.ranges
    pos = sum(1 for a, _ in r if a < s)
    left = pos > 0 and r[pos - 1][1] == s
    right = pos < len(r) and r[pos][0] == t
    if left and right:
        r[pos - 1][1] = r[pos][1]
        del r[pos]
    elif left:
        r[pos - 1][1] = t
    elif right:
        r[pos][0] = s
    else:
        r.insert(pos, [s, t])
    if last:
        e.total = t


def _complete(e: _Entry) -> bool:
    return e.total != 0 and len(e.ranges) == 1 and e.ranges[0] == [0, e.total]


def _ip_rewrite(b, h: int, nsa: int, nda: int) -> None:
    """A later fragment's IPv4 header at b[h:]: addresses, TTL - 1, header checksum."""
    ttl, proto = b[h + 8], b[h + 9]
    osa, oda = _be32(b, h + 12), _be32(b, h + 16)
    c = _csum_adjust(_be16(b, h + 10), _addr_words(osa) + _addr_words(oda) + (ttl << 8 | proto,),
                     _addr_words(nsa) + _addr_words(nda) + ((ttl - 1) << 8 | proto,))
    _put16(b, h + 10, c)
    b[h + 8] = ttl - 1
    _put32(b, h + 12, nsa)
    _put32(b, h + 16, nda)


class FragTable:
    """Per-NIC fragment table; same constructor, properties and methods as
    ``hypernat._frag.FragTable`` (the Translator of the same twin calls ``begin``,
    ``later``, ``first_check`` and ``first_record``)."""

    def __init__(self, entries=1024, bytes=1 << 20, timeout=2):  # noqa: A002 - the config's name
        entries, nbytes, timeout = operator.index(entries), operator.index(bytes), operator.index(timeout)
        if not 1 <= entries <= 1 << 24:
            raise ValueError(f"entries must be 1..{1 << 24}, got {entries}")
        if not CHUNK <= nbytes <= 1 << 32:
            raise ValueError(f"bytes must be {CHUNK}..{1 << 32}, got {nbytes}")
        if not 1 <= timeout <= 3600:
            raise ValueError(f"timeout must be 1..3600 ticks, got {timeout}")
        self._cap = entries
        self._nchunks = nbytes // CHUNK
        self._timeout = timeout
        self._free_e = list(range(entries - 1, -1, -1))  # a stack: pop() gives 0 first
        self._free_c = list(range(self._nchunks - 1, -1, -1))
        self._by_key: dict[tuple, _Entry] = {}  # insertion order == creation order == expiry order
        self._mem = bytearray(self._nchunks * CHUNK)  # ints per byte for the helpers
        self._clen = [0] * self._nchunks
        self._cl3 = [0] * self._nchunks
        self._counters = np.zeros(len(FRAG_COUNTER_NAMES), np.uint64)

    # -- properties (as the compiled twin) ---------------------------------------------
    capacity = property(lambda self: self._cap)
    chunks = property(lambda self: self._nchunks)
    timeout = property(lambda self: self._timeout)
    held = property(lambda self: self._nchunks - len(self._free_c))
    counters = property(lambda self: self._counters)

    def __len__(self) -> int:
        return len(self._by_key)

    def counters_dict(self) -> dict:
        return {n: int(self._counters[i]) for i, n in enumerate(FRAG_COUNTER_NAMES)}

    def expire(self, now) -> None:
        self.begin(operator.index(now) & 0xFFFFFFFF)

    # -- table ------------------------------------------------------------------------
    def _count(self, name: str, n: int = 1) -> None:
        self._counters[_FC[name]] += n

    def _free_entry(self, e: _Entry, timed_out: bool) -> None:
        del self._by_key[e.key]
        if timed_out:
            self._count("frag_expired_entries")
            self._count("frag_expired_dropped", len(e.held))
        for c in e.held:
            self._free_c.append(c)
        e.held = []
        self._free_e.append(e.index)

    def _oldest(self):
        return next(iter(self._by_key.values()), None)

    def _new_entry(self, key, now: int):
        if not self._free_e:
            o = self._oldest()
            if o is not None and _expired(o, now):
                self._free_entry(o, True)
            else:
                return None
        e = _Entry(key, self._free_e.pop(), (now + self._timeout) & 0xFFFFFFFF)
        self._by_key[key] = e
        self._count("frag_datagrams")
        return e

    # -- the calls the Translator makes ----------------------------------------------
    def begin(self, now: int) -> None:
        for _ in range(EXPIRE_PER_CALL):
            o = self._oldest()
            if o is None or not _expired(o, now):
                break
            self._free_entry(o, True)

    def later(self, b, fs: int, fe: int, h: int, direction: int, now: int) -> int:
        """A later fragment whose IPv4 header starts at b[h] (validated by the Translator):
        rewritten in place (TRANSLATED / HAIRPIN), held, or dropped by reason."""
        ihl = (b[h] & 0x0F) * 4
        plen = _be16(b, h + 2) - ihl
        fo = _be16(b, h + 6)
        proto = b[h + 9]
        s = (fo & 0x1FFF) * 8
        t = s + plen
        last = not fo & 0x2000
        if ihl + t > 65535:
            return V_DROP_FRAG_OFFSET
        if proto == 6 and fo & 0x1FFF == 1:
            return V_DROP_FRAG_TINY
        if plen == 0 or (not last and plen & 7):
            return V_DROP_FRAG_MALFORMED
        key = (direction, _be32(b, h + 12), _be32(b, h + 16), proto, _be16(b, h + 4))
        e = self._by_key.get(key)
        if e is not None:
            r = _range_fit(e, s, t, last)
            if r != _OK:
                return _RANGE_VERDICT[r]
            if e.known:
                _range_add(e, s, t, last)
                _ip_rewrite(b, h, e.nsa, e.nda)
                if _complete(e):
                    self._count("frag_completed")
                    self._free_entry(e, False)
                return V_HAIRPIN if e.exitdir != direction else V_TRANSLATED
        flen = fe - fs
        if flen > CHUNK or not self._free_c:
            return V_DROP_FRAG_HOLD_FULL
        if e is None:
            e = self._new_entry(key, now)
            if e is None:
                return V_DROP_FRAG_TABLE_FULL
        _range_add(e, s, t, last)
        c = self._free_c.pop()
        self._mem[c * CHUNK : c * CHUNK + flen] = bytes(b[fs:fe])
        self._clen[c] = flen
        self._cl3[c] = h - fs
        e.held.append(c)
        self._count("frag_held")
        return V_FRAGMENT_HELD

    def first_check(self, b, h: int, direction: int, now: int) -> int:
        """Before a first fragment is looked up: 0, or its drop verdict."""
        plen = _be16(b, h + 2) - (b[h] & 0x0F) * 4
        e = self._by_key.get((direction, _be32(b, h + 12), _be32(b, h + 16), b[h + 9], _be16(b, h + 4)))
        if e is None:
            if not self._free_e:
                o = self._oldest()
                if o is None or not _expired(o, now):
                    return V_DROP_FRAG_TABLE_FULL
            return 0
        if e.known:
            return V_DROP_FRAG_OVERLAP
        r = _range_fit(e, 0, plen, False)
        return 0 if r == _OK else _RANGE_VERDICT[r]

    def first_record(self, b, h: int, direction: int, exitdir: int, osa: int, oda: int, now: int, mac,
                     out) -> None:
        """The first fragment was translated (its header holds the new addresses): record,
        release the held fragments into ``out`` (the Translator's OutputArea; ``mac``: 12
        bytes dst+src for the exit side, or None), cut again where they no longer fit."""
        plen = _be16(b, h + 2) - (b[h] & 0x0F) * 4
        key = (direction, osa, oda, b[h + 9], _be16(b, h + 4))
        e = self._by_key.get(key)
        if e is None:
            e = self._new_entry(key, now)
            if e is None:
                return
        e.known = True
        e.nsa, e.nda = _be32(b, h + 12), _be32(b, h + 16)
        e.exitdir = exitdir
        _range_add(e, 0, plen, False)
        a = self._mem
        for c in e.held:
            base = c * CHUNK
            fh = base + self._cl3[c]
            _ip_rewrite(a, fh, e.nsa, e.nda)
            if mac is not None:
                a[base : base + 12] = mac
            ihl = (a[fh] & 0x0F) * 4
            nf = out.put(a[base : fh + _be16(a, fh + 2)], self._cl3[c], ihl, _be16(a, fh + 2) - ihl, exitdir)
            if not nf:
                self._count("frag_output_full")
            else:
                self._count("frag_released")
                if nf > 1:
                    self._count("frag_recut")
            self._free_c.append(c)
        e.held = []
        if _complete(e):
            self._count("frag_completed")
            self._free_entry(e, False)
