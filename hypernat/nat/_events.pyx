# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The per-event ring of connection setup, and the translation log's per-rule line text
(issue 11, "What to build" 2: the events Python must see leave the compiled code
through a ring that Python drains once per batch).

``EventRing`` holds fixed records (``EVENT_DTYPE``: kind, proto, I, Ip, E, Ep, R, Rp,
rule id, now) of the mappings and sessions created during one call of the owner's
setup (``RuleBuilder.decide_misses``, ``serve_fetch_rows``, a recovery report).  The
compiled setup (``hypernat.nat._mappings.OutSetup``) and the builder's general path
write into the same ring through one method (``record``), in the order the events
happen; it records only the kinds switched on (``mappings``: the per-rule translation
log in local mode; ``sessions``: the per-rule log with ``remote``, or active install's
PUSH records), so the default configuration pays nothing.  It grows (doubling): no
event is ever dropped.  ``RuleBuilder._flush`` drains it once per call (``drain``: one
numpy array) into log lines (``hypernat.translog.TransLog.rules``) and the created
sessions (``RuleBuilder.drain_created``).

``rule_line`` / ``rule_lines`` are the one implementation of a per-rule translation-log
line (``TransLog.rule`` writes one, ``TransLog.rules`` a batch: one clock reading, one
string); snprintf into one buffer.
"""
from libc.stdint cimport uint8_t, uint16_t, uint32_t
from libc.stdio cimport snprintf
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcpy

import numpy as np

EVENT_DTYPE = np.dtype([("iaddr", "<u4"), ("eaddr", "<u4"), ("raddr", "<u4"), ("iport", "<u2"), ("eport", "<u2"),
                        ("rport", "<u2"), ("proto", "u1"), ("kind", "u1"), ("rule_id", "<u4"), ("now", "<u4")])
if EVENT_DTYPE.itemsize != sizeof(EvRec):
    raise ImportError("hypernat.nat._events: EVENT_DTYPE disagrees with EvRec: rebuild it")
MAPPING = EV_MAPPING
SESSION = EV_SESSION


cdef class EventRing:
    """EventRing(): an empty ring recording nothing until ``mappings`` / ``sessions``
    is switched on (see the module docstring)."""

    def __cinit__(self):
        self.r = NULL
        self.n = self.cap = 0

    def __dealloc__(self):
        free(self.r)

    cpdef int record(self, uint8_t kind, uint8_t p, uint32_t ia, uint16_t ip, uint32_t ea, uint16_t ep,
                     uint32_t ra, uint16_t rp, uint32_t rid, uint32_t now) except -1:
        """Record one event of `kind` (MAPPING: ra, rp 0; SESSION) if that kind is
        switched on: 1 if recorded, 0 if not."""
        if kind == EV_MAPPING:
            if not self.mappings:
                return 0
        elif kind == EV_SESSION:
            if not self.sessions:
                return 0
        else:
            raise ValueError(f"unknown event kind {kind}")
        cdef EvRec* x
        if self.n == self.cap:
            x = <EvRec*>realloc(self.r, (self.cap * 2 + 256) * sizeof(EvRec))
            if x == NULL:
                raise MemoryError()
            self.r = x
            self.cap = self.cap * 2 + 256
        x = &self.r[self.n]
        x.iaddr, x.eaddr, x.raddr, x.iport, x.eport, x.rport = ia, ea, ra, ip, ep, rp
        x.proto, x.kind, x.rule_id, x.now = p, kind, rid, now
        self.n += 1
        return 1

    def __len__(self):
        return self.n

    def drain(self):
        """The events recorded since the last drain, in order (EVENT_DTYPE array); the
        ring is empty after."""
        a = np.empty(self.n, EVENT_DTYPE)
        cdef uint8_t[::1] b
        if self.n:
            b = a.view(np.uint8)
            memcpy(&b[0], self.r, self.n * sizeof(EvRec))
        self.n = 0
        return a


# -- the translation log's per-rule line ---------------------------------------------

cdef const char* _proto_name(uint8_t p, char* buf) noexcept nogil:
    """hypernat.translog.PROTO_NAMES, else the number."""
    if p == 6:
        return "tcp"
    if p == 17:
        return "udp"
    if p == 1:
        return "icmp"
    snprintf(buf, 8, "%u", <unsigned>p)
    return buf


cdef Py_ssize_t _line(char* b, size_t room, double ts, long long nic, const char* ev, const EvRec* r,
                      bint remote) noexcept nogil:
    """One line into b (at most room bytes with its NUL): the length it needs (without
    the NUL; more than room - 1: cut, write it again with more room)."""
    cdef char pbuf[8]
    cdef const char* pn = _proto_name(r.proto, pbuf)
    cdef uint32_t i = r.iaddr, e = r.eaddr, a = r.raddr
    if remote:
        return snprintf(b, room, '{"ts": %.3f, "nic": %lld, "event": "%s", "proto": "%s", "internal": '
                        '"%u.%u.%u.%u:%u", "external": "%u.%u.%u.%u:%u", "remote": "%u.%u.%u.%u:%u"}\n',
                        ts, nic, ev, pn, i >> 24, i >> 16 & 255, i >> 8 & 255, i & 255, <unsigned>r.iport,
                        e >> 24, e >> 16 & 255, e >> 8 & 255, e & 255, <unsigned>r.eport,
                        a >> 24, a >> 16 & 255, a >> 8 & 255, a & 255, <unsigned>r.rport)
    return snprintf(b, room, '{"ts": %.3f, "nic": %lld, "event": "%s", "proto": "%s", "internal": '
                    '"%u.%u.%u.%u:%u", "external": "%u.%u.%u.%u:%u"}\n',
                    ts, nic, ev, pn, i >> 24, i >> 16 & 255, i >> 8 & 255, i & 255, <unsigned>r.iport,
                    e >> 24, e >> 16 & 255, e >> 8 & 255, e & 255, <unsigned>r.eport)


cdef str _lines(double ts, long long nic, str event, const EvRec* recs, Py_ssize_t n, bint remote):
    cdef bytes evb = event.encode("ascii")
    cdef const char* ev = evb
    cdef size_t cap = <size_t>n * 192 + 256, pos = 0
    cdef Py_ssize_t k, w
    cdef char* b = <char*>malloc(cap)
    cdef char* nb
    if b == NULL:
        raise MemoryError()
    try:
        for k in range(n):
            while True:
                w = _line(b + pos, cap - pos, ts, nic, ev, &recs[k], remote)
                if w < 0:
                    raise ValueError("translation log line: snprintf failed")
                if <size_t>w < cap - pos:
                    break
                nb = <char*>realloc(b, cap * 2 + <size_t>w)
                if nb == NULL:
                    raise MemoryError()
                b = nb
                cap = cap * 2 + <size_t>w
            pos += <size_t>w
        return b[:pos].decode("ascii")
    finally:
        free(b)


def rule_line(double ts, long long nic, str event, uint8_t proto, uint32_t iaddr, uint16_t iport, uint32_t eaddr,
              uint16_t eport, uint32_t raddr=0, uint16_t rport=0, bint remote=False):
    """One per-rule translation-log line (hypernat.translog): a mapping (or, with
    `remote`, a session) created or removed, at time `ts`."""
    cdef EvRec r
    r.iaddr, r.eaddr, r.raddr, r.iport, r.eport, r.rport = iaddr, eaddr, raddr, iport, eport, rport
    r.proto, r.kind, r.rule_id, r.now = proto, 0, 0, 0
    return _lines(ts, nic, event, &r, 1, remote)


def rule_lines(double ts, long long nic, str event, records, bint remote=False):
    """``rule_line`` for each record of an EVENT_DTYPE array (its kind, rule id and now
    are not written), all at time `ts`: one string."""
    a = np.ascontiguousarray(records)
    if a.dtype != EVENT_DTYPE:
        raise TypeError(f"records must be EVENT_DTYPE, got {a.dtype}")
    if len(a) == 0:
        return ""
    cdef const uint8_t[::1] b = a.view(np.uint8).reshape(-1)
    return _lines(ts, nic, event, <const EvRec*>&b[0], len(a), remote)
