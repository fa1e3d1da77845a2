# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The per-event ring of connection setup, and the translation log's per-rule line text
(issue 11, "What to build" 2: the events Python must see leave the compiled code
through a ring that Python drains once per batch).

``EventRing`` holds fixed records (``EVENT_DTYPE``: kind, proto, I, Ip, E, Ep, R, Rp,
rule id, now) of the mappings and sessions created during one call of the owner's
setup (``RuleBuilder.decide_misses``, ``serve_fetches``, a recovery report).  The
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
string): the head with the time formatted once per batch (snprintf "%.3f", as Python's
".3f"), the addresses and ports in decimal into one buffer (snprintf per line cost
~1.3 µs a line; this ~0.1 µs).
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
# {"ts": T, "nic": N, "event": "EV", "proto": "P", "internal": "I:Ip", "external": "E:Ep"}
# (with remote: , "remote": "R:Rp" before the brace).  The head up to the protocol's
# name is the same for every line of a batch (one clock reading): written once.

cdef inline char* _put(char* b, const char* s, size_t n) noexcept nogil:
    memcpy(b, s, n)
    return b + n


cdef inline char* _dec(char* b, uint32_t v) noexcept nogil:
    """v in decimal (what %u writes)."""
    cdef char t[10]
    cdef int k = 0
    while True:
        t[k] = <char>(48 + v % 10)
        k += 1
        v //= 10
        if v == 0:
            break
    while k:
        k -= 1
        b[0] = t[k]
        b += 1
    return b


cdef inline char* _endpoint(char* b, uint32_t a, uint16_t port) noexcept nogil:
    """a.b.c.d:port"""
    b = _dec(b, a >> 24)
    b[0] = 46
    b = _dec(b + 1, a >> 16 & 255)
    b[0] = 46
    b = _dec(b + 1, a >> 8 & 255)
    b[0] = 46
    b = _dec(b + 1, a & 255)
    b[0] = 58
    return _dec(b + 1, port)


DEF LINE_MAX = 160    # a line's bytes after its head: at most 130 (4 + 3 * 21 + the fixed text)


cdef char* _line(char* b, const char* head, size_t hn, const EvRec* r, bint remote) noexcept nogil:
    """One line at b (at most hn + LINE_MAX bytes): the end of what it wrote."""
    b = _put(b, head, hn)
    if r.proto == 6:
        b = _put(b, "tcp", 3)
    elif r.proto == 17:
        b = _put(b, "udp", 3)
    elif r.proto == 1:
        b = _put(b, "icmp", 4)
    else:
        b = _dec(b, r.proto)  # another protocol: its number
    b = _put(b, '", "internal": "', 16)
    b = _endpoint(b, r.iaddr, r.iport)
    b = _put(b, '", "external": "', 16)
    b = _endpoint(b, r.eaddr, r.eport)
    if remote:
        b = _put(b, '", "remote": "', 14)
        b = _endpoint(b, r.raddr, r.rport)
    return _put(b, '"}\n', 3)


cdef str _lines(double ts, long long nic, str event, const EvRec* recs, Py_ssize_t n, bint remote):
    cdef bytes evb = event.encode("ascii")
    cdef const char* ev = evb
    cdef const char* fmt = '{"ts": %.3f, "nic": %lld, "event": "%s", "proto": "'
    cdef int hn = snprintf(NULL, 0, fmt, ts, nic, ev)
    if hn < 0:
        raise ValueError("translation log line: snprintf failed")
    cdef char* head = <char*>malloc(hn + 1)
    cdef char* b = <char*>malloc(<size_t>n * (hn + LINE_MAX) + 1)
    cdef char* e
    cdef Py_ssize_t k
    try:
        if head == NULL or b == NULL:
            raise MemoryError()
        snprintf(head, hn + 1, fmt, ts, nic, ev)
        e = b
        with nogil:
            for k in range(n):
                e = _line(e, head, hn, &recs[k], remote)
        return b[:e - b].decode("ascii")
    finally:
        free(head)
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
