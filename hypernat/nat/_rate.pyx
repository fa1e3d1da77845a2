# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Per-internal-host rate of new connections: a token bucket per host (issue 11, "Bad input").

One internal host opening connections as fast as it can (a SYN flood from inside, a
runaway client) must not use up the setup budget or the pool for everyone else.  Each
new session a host opens takes a token from its bucket; the bucket holds at most
``burst`` tokens and refills at ``rate`` tokens per second (the caller's clock: the
integer seconds the NIC loop gives the fast path).  A host with no token left is refused
(``host_rate_limited``, counted by the caller).

Memory is bounded: the buckets live in a fixed table of ``slots`` entries (a power of
two), probed 8 entries from the host's hash.  A host not in the table takes an empty
probe entry, else one whose bucket is full again (it forgot nothing), else the one
refilled longest ago (that host's next connection starts from a full bucket: the limit
errs toward admitting, never toward refusing a host it has lost track of).
"""
from libc.stdint cimport int64_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free

DEF PROBES = 8


cdef class HostRate:
    """HostRate(rate, burst=0, slots=65536): ``rate`` new connections per second per
    host (> 0), ``burst`` the bucket size (0: one second's worth, at least 1)."""

    def __cinit__(self, double rate, double burst=0, int slots=65536):
        if rate <= 0:
            raise ValueError(f"rate must be > 0, got {rate}")
        if slots < PROBES or slots & (slots - 1):
            raise ValueError(f"slots must be a power of two >= {PROBES}, got {slots}")
        self.rate = rate
        self.burst = burst if burst > 0 else max(1.0, rate)
        self.b = <Bucket*>calloc(slots, sizeof(Bucket))
        if self.b == NULL:
            raise MemoryError()
        self.mask = slots - 1

    def __dealloc__(self):
        free(self.b)

    cdef bint allow(self, uint32_t host, int64_t now) noexcept nogil:
        cdef uint64_t h = (<uint64_t>host * 0x9E3779B97F4A7C15ULL) >> 32
        cdef uint32_t j
        cdef int64_t pick = -1, oldest = -1
        cdef Bucket* e
        cdef double t
        cdef int i
        for i in range(PROBES):
            j = <uint32_t>(h + i) & self.mask
            e = &self.b[j]
            if e.used and e.host == host:
                t = e.tokens
                if now > e.last:
                    t += (now - e.last) * self.rate
                    e.last = now
                if t > self.burst:
                    t = self.burst
                if t < 1.0:
                    e.tokens = t
                    return False
                e.tokens = t - 1.0
                return True
            if pick < 0 and (not e.used or e.tokens + (now - e.last) * self.rate >= self.burst):
                pick = j  # empty, or full again: nothing to remember
            if oldest < 0 or e.last < self.b[oldest].last:
                oldest = j
        if pick < 0:
            pick = oldest
        e = &self.b[pick]
        e.used = 1
        e.host = host
        e.last = now
        e.tokens = self.burst - 1.0
        return True

    cdef bint would_allow(self, uint32_t host, int64_t now) noexcept nogil:
        """What ``allow`` would answer now, changing nothing (a caller that must know
        before it commits to other work)."""
        cdef uint64_t h = (<uint64_t>host * 0x9E3779B97F4A7C15ULL) >> 32
        cdef Bucket* e
        cdef double t
        cdef int i
        for i in range(PROBES):
            e = &self.b[<uint32_t>(h + i) & self.mask]
            if e.used and e.host == host:
                t = e.tokens
                if now > e.last:
                    t += (now - e.last) * self.rate
                if t > self.burst:
                    t = self.burst
                return t >= 1.0
        return True  # a host it does not track starts with a full bucket

    def take(self, uint32_t host, int64_t now):
        """One new connection of `host` at time `now`: True if admitted (a token taken)."""
        return self.allow(host, now)
