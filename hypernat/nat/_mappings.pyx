# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Mappings and sessions of one NIC's owner side, in C (issue 11, step 1).

A *mapping* binds an internal endpoint (proto, I, Ip) to an external one (E, Ep) of a
port block; its handle is its *rule id* (1-based, written into the flow-table slots).
A *session* is a mapping plus a remote endpoint (R, Rp) (ICMP: Rp 0).  No Python
object per mapping or session:

    records    mapping records in one C array indexed by rule id; freed ids on a stack
               (the last freed is reused first); session records in a C array with a
               free list, linked per mapping (export, snapshot, expiry of the last one)
    indexes    FlowTables used as hash tables -- the flow table's own hashing and
               probing through ``_fastpath.pxd``, no copy of it -- grown by doubling:
                 (proto, E, Ep)              -> rule id        every mapping
                 (proto, I, Ip)              -> rule id        EIM: one per internal endpoint
                 (proto, I, Ip, R, Rp)       -> rule id        APDM: one per session
                 (rule id, R, Rp)            -> session record
                 (rule id, R)                -> sessions with remote address R
                                                (address-dependent filtering)
    pending    sessions added since the last ``flush``: their two flow-table entries
               are written in one pass at the end of a batch
    deferred   while ``OutSetup.run`` / ``serve`` runs (``defer``), the external- and
               session-index writes of its setups wait in a ring of DQ, their home
               slots prefetched when queued, and are done in order DQ writes later or
               when the call ends (``settle_c``): their cache misses overlap the next
               setups instead of stalling each; lookups read the ring first

``hypernat.rules.RuleBuilder`` owns one (``RuleBuilder.maps``) and keeps the policy
(which port, refusals, journal, logs, reuse delay) in Python; ``OutSetup`` in this
module is the compiled common case of a first packet without a session, outgoing and
incoming, and of the FETCH records the owner serves.
"""
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, realloc
from libc.string cimport memcpy, memset

cimport numpy as cnp
from cpython.ref cimport Py_INCREF
import numpy as np

cnp.import_array()

from .._fastpath cimport FlowTable, ft_prefetch, hn_slot
from .._geometry cimport Geometry, Prefixes
from .._wire cimport FETCH_BY_EXTERNAL, wire_key, wire_rule

cdef extern from *:
    """
    #if defined(__GNUC__) || defined(__clang__)
    #define hn_map_prefetch(p) __builtin_prefetch((const void *)(p), 1, 3)
    #else
    #define hn_map_prefetch(p) ((void)(p))
    #endif
    """
    void hn_map_prefetch(const void *p) noexcept nogil
from .._fastpath import FlowTable as _FlowTable

from ._events cimport EV_MAPPING, EV_SESSION, EventRing
from ._hosts cimport Host, Hosts
from ._ports cimport PortBlocks
from ._rate cimport HostRate

cdef enum:
    D_EXT = 1       # Deferred.kind
    D_SESS = 2
    K_SESS = 1      # the session index's two kinds of key (the proto byte)
    K_RADDR = 2
    P_ICMP = 1
    P_TCP = 6
    P_UDP = 17


cdef FlowTable _room(FlowTable t, uint64_t need=1):
    """`t`, or a copy with twice its capacity if `need` more keys would not fit (a hash
    table that grows; every field of each slot copied: tables that keep more than a
    rule id in their slots, ``_reuse.pyx``, grow too)."""
    if t.t.count + need <= t.t.capacity:
        return t
    cdef FlowTable n = _FlowTable(max(t.t.capacity * 2, t.t.count + need), hugepages=False)
    cdef uint64_t i
    cdef hn_slot* s
    for i in range(t.t.nslots):
        s = &t.t.s[i]
        if s.flags:
            n.c_insert(s.proto, s.saddr, s.sport, s.daddr, s.dport, s.new_addr, s.new_port, s.rule_id, 0, 0)
            memcpy(n.c_slot(n.c_find(s.proto, s.saddr, s.sport, s.daddr, s.dport)), s, sizeof(hn_slot))
    return n


cdef int _seen_state(t, bint compiled, uint8_t p, uint32_t sa, uint16_t sp, uint32_t da, uint16_t dp,
                     uint32_t* last, uint8_t* tcp) except -1:
    """(last_seen, tcp_state) of a flow-table entry into last / tcp, (0, 0) if it is not
    there: at C level on the compiled FlowTable, through lookup and slots on another
    implementation."""
    cdef FlowTable ft
    cdef int64_t j
    cdef hn_slot* s
    last[0] = 0
    tcp[0] = 0
    if compiled:
        ft = t
        j = ft.c_find(p, sa, sp, da, dp)
        if j >= 0:
            s = ft.c_slot(j)
            last[0], tcp[0] = s.last_seen, s.tcp_state
        return 0
    j = t.lookup(p, sa, sp, da, dp)
    if j >= 0:
        r = t.slots[j]
        last[0], tcp[0] = int(r["last_seen"]), int(r["tcp_state"])
    return 0


cdef inline int _pidx(uint8_t p) noexcept nogil:
    return 0 if p == P_TCP else (1 if p == P_UDP else 2)


cdef class Mappings:
    """Mappings(eim=True, capacity=1024, remote_addresses=True): the mappings and
    sessions of one owner (see the module docstring).  `capacity`: the sessions it is
    sized for -- the owner passes its flow tables' capacity (a session is an entry in
    each), so neither the indexes nor the mapping and session records grow on the
    packet path (growing one of 10^6 entries would stall a loop turn: a copy and a
    zeroing of the whole); beyond it they double.  They are calloc'ed (zeroed lazily,
    by the kernel, page by page), so the memory in use follows the entries.  With ``eim`` False
    (address-and-port-dependent mapping) an outgoing key finds its mapping by the whole
    session key, else by the internal endpoint.  ``remote_addresses``: keep the (rule
    id, R) counts (``has_remote_address``; what address-dependent filtering asks)."""

    def __cinit__(self):
        self.m = NULL
        self.s = NULL
        self.free_ids = NULL
        self.pend = NULL
        self.mcap = self.top = self.nfree = self.fcap = self.count = 0
        self.scap = self.stop = 0
        self.sfree = -1
        self.n_sessions = 0
        self.npend = self.pcap = 0
        self.defer = False
        self.dh = self.dn = self.dn_ext = 0

    def __init__(self, bint eim=True, int capacity=1024, bint remote_addresses=True):
        self.eim = eim
        self.raddr = remote_addresses
        capacity = max(16, capacity)
        self.ext = _FlowTable(capacity, hugepages=False)
        self.inl = _FlowTable(capacity if eim else 1, hugepages=False)
        self.outk = _FlowTable(1 if eim else capacity, hugepages=False)
        self.sess = _FlowTable(capacity * (2 if remote_addresses else 1), hugepages=False)
        self.top = 1
        self._grow_m(capacity + 1)  # (rule id 0 unused)
        self._grow_s(capacity)

    def __dealloc__(self):
        free(self.m)
        free(self.s)
        free(self.free_ids)
        free(self.pend)

    cdef _grow_m(self, uint32_t cap):
        """Room for rule ids < cap: calloc'ed the first time (zero pages, touched as
        used); beyond, doubled (a copy: off the packet path up to the capacity)."""
        if self.m == NULL:
            p = <MapRec*>calloc(cap, sizeof(MapRec))
        else:
            p = <MapRec*>realloc(self.m, cap * sizeof(MapRec))
            self.regrows += 1
            if p != NULL:
                memset(&p[self.mcap], 0, (cap - self.mcap) * sizeof(MapRec))
        if p == NULL:
            raise MemoryError()
        self.m = p
        self.mcap = cap

    cdef _grow_s(self, int32_t cap):
        """Room for `cap` session records, like ``_grow_m``; the records past ``stop``
        (never used) are taken in order, the freed ones from the free list first."""
        if self.s == NULL:
            p = <SessRec*>calloc(cap, sizeof(SessRec))
        else:
            p = <SessRec*>realloc(self.s, cap * sizeof(SessRec))
            self.regrows += 1
            if p != NULL:
                memset(&p[self.scap], 0, (cap - self.scap) * sizeof(SessRec))
        if p == NULL:
            raise MemoryError()
        self.s = p
        self.scap = cap

    # -- C interface -------------------------------------------------------------------
    cdef uint32_t _queued_ext(self, uint8_t p, uint32_t ea, uint16_t ep) noexcept:
        """The rule id of a queued external-index write of (p, E, Ep); 0 if none."""
        cdef int k
        cdef const Deferred* d
        if self.dn_ext:
            for k in range(self.dn):
                d = &self.dq[(self.dh + k) % DQ]
                if d.kind == D_EXT and d.addr == ea and d.port == ep and d.proto == p:
                    return d.rid
        return 0

    cdef bint _queued_sess(self, uint32_t rid, uint32_t ra, uint16_t r, bint any_port) noexcept:
        """A queued session-index write of (rid, R, Rp) (any_port: of (rid, R))."""
        cdef int k
        cdef const Deferred* d
        if self.dn > self.dn_ext:
            for k in range(self.dn):
                d = &self.dq[(self.dh + k) % DQ]
                if d.kind == D_SESS and d.rid == rid and d.addr == ra and (any_port or d.port == r):
                    return True
        return False

    cdef uint32_t find_ext(self, uint8_t p, uint32_t ea, uint16_t ep) noexcept:
        cdef uint32_t q = self._queued_ext(p, ea, ep)
        if q:
            return q
        cdef int64_t j = self.ext.c_find(p, ea, ep, 0, 0)
        return self.ext.c_slot(j).rule_id if j >= 0 else 0

    cdef uint32_t find_out(self, uint8_t p, uint32_t ia, uint16_t ip, uint32_t ra, uint16_t r) noexcept:
        cdef int64_t j
        if self.eim:
            j = self.inl.c_find(p, ia, ip, 0, 0)
            return self.inl.c_slot(j).rule_id if j >= 0 else 0
        j = self.outk.c_find(p, ia, ip, ra, r)
        return self.outk.c_slot(j).rule_id if j >= 0 else 0

    cdef void prefetch_out(self, uint8_t p, uint32_t ia, uint16_t ip, uint32_t ra, uint16_t r) noexcept:
        """Start loading the index line ``find_out`` will read first."""
        if self.eim:
            ft_prefetch(self.inl, p, ia, ip, 0, 0)
        else:
            ft_prefetch(self.outk, p, ia, ip, ra, r)

    cdef void prefetch_end(self, uint8_t p, uint32_t ia, uint16_t ip, uint32_t ea, uint16_t ep, uint32_t rid,
                           uint32_t ra, uint16_t r) noexcept:
        """Start loading what ending session (rid, R, Rp) of mapping (p, I, Ip, E, Ep)
        reads first (``end_session_c``, ``end_c``): the mapping's record, its session-
        index line (and remote-address line), its external and internal index lines."""
        if rid < self.mcap:
            hn_map_prefetch(&self.m[rid])
        ft_prefetch(self.sess, K_SESS, rid, 0, ra, r)
        if self.raddr:
            ft_prefetch(self.sess, K_RADDR, rid, 0, ra, 0)
        self.prefetch_ext(p, ea, ep)
        self.prefetch_out(p, ia, ip, ra, r)

    cdef bint has_session_c(self, uint32_t rid, uint32_t ra, uint16_t r) noexcept:
        return self._queued_sess(rid, ra, r, False) or self.sess.c_find(K_SESS, rid, 0, ra, r) >= 0

    cdef bint has_raddr_c(self, uint32_t rid, uint32_t ra) noexcept:
        return self._queued_sess(rid, ra, 0, True) or self.sess.c_find(K_RADDR, rid, 0, ra, 0) >= 0

    cdef void prefetch_ext(self, uint8_t p, uint32_t ea, uint16_t ep) noexcept:
        """Start loading the index line ``find_ext`` will read first."""
        ft_prefetch(self.ext, p, ea, ep, 0, 0)

    cdef int _put(self, uint32_t rid, uint8_t p, uint32_t ia, uint16_t ip, uint32_t ea, uint16_t ep,
                  int64_t g) except -1:
        # (deferring: the index's own check when the write is done, ``_write``)
        if self._queued_ext(p, ea, ep) if self.defer else self.find_ext(p, ea, ep):
            raise KeyError(f"external endpoint {p}/{ea}:{ep} is mapped already")
        if self.eim and self.find_out(p, ia, ip, 0, 0):
            raise KeyError(f"internal endpoint {p}/{ia}:{ip} is mapped already")
        cdef MapRec* m = &self.m[rid]
        m.iaddr, m.iport, m.eaddr, m.eport, m.proto, m.block = ia, ip, ea, ep, p, g
        m.used = 1
        m.nsess = 0
        m.shead = -1
        if self.defer:
            if self.ext.t.count + self.dn_ext + 1 > self.ext.t.capacity:
                self.settle_c()  # (the index grows with every earlier write in, as undeferred)
            self.ext = _room(self.ext)
            self._defer(D_EXT, p, ea, ep, rid, 0)
        else:
            self.ext = _room(self.ext)
            self.ext.c_insert(p, ea, ep, 0, 0, 0, 0, rid, 0, 0)
        if self.eim:
            self.inl = _room(self.inl)
            self.inl.c_insert(p, ia, ip, 0, 0, 0, 0, rid, 0, 0)
        self.count += 1
        return 0

    cdef int64_t new_c(self, uint8_t p, uint32_t ia, uint16_t ip, uint32_t ea, uint16_t ep, int64_t g) except -1:
        """A new mapping: its rule id (a freed one first)."""
        cdef uint32_t rid
        if self.nfree:
            rid = self.free_ids[self.nfree - 1]
        else:
            if self.top == 0xFFFFFFFF:
                raise OverflowError("rule ids exhausted")
            rid = self.top
            if rid >= self.mcap:
                self._grow_m(self.mcap * 2 if self.mcap * 2 > rid else rid + 1)
        self._put(rid, p, ia, ip, ea, ep, g)
        if self.nfree:
            self.nfree -= 1
        else:
            self.top += 1
        return rid

    cdef int add_session_c(self, uint32_t rid, uint32_t ra, uint16_t r) except -1:
        """Session (rid, R, Rp), not there yet (the caller checked): added, and pending
        for the flow tables."""
        cdef MapRec* m = &self.m[rid]
        if self.sfree < 0 and self.stop == self.scap:
            self._grow_s(self.scap * 2)
        if self.npend == self.pcap:
            pp = <uint32_t*>realloc(self.pend, (self.pcap * 2 + 64) * 8 * sizeof(uint32_t))
            if pp == NULL:
                raise MemoryError()
            self.pend = pp
            self.pcap = self.pcap * 2 + 64
        if self.defer and self.sess.t.count + 2 * (self.dn - self.dn_ext) + 2 > self.sess.t.capacity:
            self.settle_c()  # (the index grows with every earlier write in, as undeferred)
        self.sess = _room(self.sess, 2)
        if not self.eim:
            self.outk = _room(self.outk)
            self.outk.c_insert(m.proto, m.iaddr, m.iport, ra, r, 0, 0, rid, 0, 0)
        cdef int32_t x = self.sfree
        cdef SessRec* s
        if x >= 0:
            s = &self.s[x]
            self.sfree = s.next
        else:  # a record never used yet
            x = self.stop
            self.stop += 1
            s = &self.s[x]
        s.rid, s.raddr, s.rport = rid, ra, r
        s.prev = -1
        s.next = m.shead
        if m.shead >= 0:
            self.s[m.shead].prev = x
        m.shead = x
        m.nsess += 1
        self.n_sessions += 1
        cdef Deferred d
        if self.defer:
            self._defer(D_SESS, 0, ra, r, rid, x)
        else:
            d.kind, d.proto, d.addr, d.port, d.rid, d.x = D_SESS, 0, ra, r, rid, x
            self._write(&d)
        cdef uint32_t* w = &self.pend[self.npend * 8]
        w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7] = m.proto, m.iaddr, m.iport, ra, r, m.eaddr, m.eport, rid
        self.npend += 1
        return 1

    # -- deferred index writes ------------------------------------------------------------
    cdef int _defer(self, uint8_t kind, uint8_t p, uint32_t addr, uint16_t port, uint32_t rid, int32_t x) except -1:
        """Queue an index write (the ring full: the oldest done first) and prefetch its
        home slot(s).  The caller made room in the index for every queued write."""
        cdef Deferred* d
        if self.dn == DQ:
            self._write_oldest()
        d = &self.dq[(self.dh + self.dn) % DQ]
        d.kind, d.proto, d.addr, d.port, d.rid, d.x = kind, p, addr, port, rid, x
        self.dn += 1
        if kind == D_EXT:
            self.dn_ext += 1
            ft_prefetch(self.ext, p, addr, port, 0, 0)
        else:
            ft_prefetch(self.sess, K_SESS, rid, 0, addr, port)
            if self.raddr:
                ft_prefetch(self.sess, K_RADDR, rid, 0, addr, 0)
        return 0

    cdef int _write(self, const Deferred* d) except -1:
        """An index write: the external index's (p, E, Ep) -> rule id (a KeyError if the
        endpoint is mapped already: never, the port blocks hand each port out once), or
        a session's (rid, R, Rp) -> its record and its (rid, R) count."""
        cdef int64_t j
        if d.kind == D_EXT:
            if self.ext.c_find(d.proto, d.addr, d.port, 0, 0) >= 0:
                raise KeyError(f"external endpoint {d.proto}/{d.addr}:{d.port} is mapped already")
            self.ext.c_insert(d.proto, d.addr, d.port, 0, 0, 0, 0, d.rid, 0, 0)
            return 0
        self.sess.c_insert(K_SESS, d.rid, 0, d.addr, d.port, 0, 0, <uint32_t>d.x, 0, 0)
        if self.raddr:
            j = self.sess.c_find(K_RADDR, d.rid, 0, d.addr, 0)
            if j >= 0:
                self.sess.c_slot(j).rule_id += 1
            else:
                self.sess.c_insert(K_RADDR, d.rid, 0, d.addr, 0, 0, 0, 1, 0, 0)
        return 0

    cdef int settle_c(self) except -1:
        """Do every queued index write, oldest first (the indexes as if none had waited)."""
        while self.dn:
            self._write_oldest()
        self.dh = 0
        return 0

    cdef int _write_oldest(self) except -1:
        """The oldest queued index write out of the ring, done."""
        cdef Deferred* d = &self.dq[self.dh]
        self.dh = (self.dh + 1) % DQ
        self.dn -= 1
        if d.kind == D_EXT:
            self.dn_ext -= 1
        return self._write(d)

    cdef int64_t end_session_c(self, uint32_t rid, uint32_t ra, uint16_t r) except -2:
        """Forget session (rid, R, Rp): its mapping's sessions left, -1 if it was not there."""
        cdef int64_t j = self.sess.c_find(K_SESS, rid, 0, ra, r)
        if j < 0:
            return -1
        cdef int32_t x = <int32_t>self.sess.c_slot(j).rule_id
        cdef SessRec* s = &self.s[x]
        cdef MapRec* m = &self.m[rid]
        self.sess.c_delete(K_SESS, rid, 0, ra, r)
        j = self.sess.c_find(K_RADDR, rid, 0, ra, 0) if self.raddr else -1
        if j >= 0:
            if self.sess.c_slot(j).rule_id > 1:
                self.sess.c_slot(j).rule_id -= 1
            else:
                self.sess.c_delete(K_RADDR, rid, 0, ra, 0)
        if not self.eim:
            j = self.outk.c_find(m.proto, m.iaddr, m.iport, ra, r)
            if j >= 0 and self.outk.c_slot(j).rule_id == rid:
                self.outk.c_delete(m.proto, m.iaddr, m.iport, ra, r)
        if s.prev >= 0:
            self.s[s.prev].next = s.next
        else:
            m.shead = s.next
        if s.next >= 0:
            self.s[s.next].prev = s.prev
        s.rid = 0
        s.next = self.sfree
        self.sfree = x
        m.nsess -= 1
        self.n_sessions -= 1
        return m.nsess

    cdef int end_c(self, uint32_t rid) except -1:
        """Forget mapping `rid` (it has no session left); its id goes on the free stack."""
        cdef MapRec* m = &self.m[rid]
        if m.nsess:
            raise ValueError(f"mapping {rid} still has {m.nsess} session(s)")
        self.ext.c_delete(m.proto, m.eaddr, m.eport, 0, 0)
        if self.eim:
            self.inl.c_delete(m.proto, m.iaddr, m.iport, 0, 0)
        m.used = 0
        if self.nfree == self.fcap:
            p = <uint32_t*>realloc(self.free_ids, (self.fcap * 2 + 64) * sizeof(uint32_t))
            if p == NULL:
                raise MemoryError()
            self.free_ids = p
            self.fcap = self.fcap * 2 + 64
        self.free_ids[self.nfree] = rid
        self.nfree += 1
        self.count -= 1
        return 0

    cdef MapRec* live_c(self, uint32_t rid) noexcept nogil:
        """Mapping `rid`'s record if it is live, else NULL."""
        if rid == 0 or rid >= self.top or not self.m[rid].used:
            return NULL
        return &self.m[rid]

    cdef MapRec* _get(self, uint32_t rid) except NULL:
        if rid == 0 or rid >= self.top or not self.m[rid].used:
            raise KeyError(rid)
        return &self.m[rid]

    # -- Python interface ----------------------------------------------------------------
    def by_external(self, uint8_t p, uint32_t ea, uint16_t ep):
        """The rule id of the mapping holding (p, E, Ep); 0 if none."""
        return self.find_ext(p, ea, ep)

    def by_out_key(self, uint8_t p, uint32_t ia, uint16_t ip, uint32_t ra, uint16_t r):
        """The rule id of the mapping an outgoing session key (ICMP: r 0) uses; 0 if none
        (EIM: the internal endpoint's; APDM: this session's)."""
        return self.find_out(p, ia, ip, ra, r)

    def get(self, uint32_t rid):
        """(proto, iaddr, iport, eaddr, eport, block) of mapping `rid`, or None."""
        if rid == 0 or rid >= self.top or not self.m[rid].used:
            return None
        cdef MapRec* m = &self.m[rid]
        return (m.proto, m.iaddr, m.iport, m.eaddr, m.eport, m.block)

    def matches(self, uint32_t rid, uint32_t ia, uint16_t ip, uint32_t ea, uint16_t ep):
        """Mapping `rid` is live and binds (I, Ip) to (E, Ep)."""
        cdef MapRec* m = self.live_c(rid)
        return m != NULL and m.iaddr == ia and m.iport == ip and m.eaddr == ea and m.eport == ep

    def new(self, uint8_t p, uint32_t ia, uint16_t ip, uint32_t ea, uint16_t ep, int64_t block):
        """A new mapping of (p, I, Ip) to (E, Ep) in `block`: its rule id."""
        return self.new_c(p, ia, ip, ea, ep, block)

    def has_session(self, uint32_t rid, uint32_t ra, uint16_t r):
        return self.has_session_c(rid, ra, r)

    def has_remote_address(self, uint32_t rid, uint32_t ra):
        """Mapping `rid` has a session with remote address `ra` (address-dependent filtering)."""
        if not self.raddr:
            raise ValueError("Mappings(remote_addresses=False) keeps no remote-address counts")
        return self.has_raddr_c(rid, ra)

    def add_session(self, uint32_t rid, uint32_t ra, uint16_t r):
        """Session (rid, R, Rp) (ICMP: r 0), pending for the flow tables: True if added,
        False if it exists."""
        self._get(rid)
        if self.has_session_c(rid, ra, r):
            return False
        self.add_session_c(rid, ra, r)
        return True

    def end_session(self, uint32_t rid, uint32_t ra, uint16_t r):
        """Forget a session: the sessions its mapping has left, or -1 if it was not there."""
        if rid == 0 or rid >= self.top or not self.m[rid].used:
            return -1
        return self.end_session_c(rid, ra, r)

    def end(self, uint32_t rid):
        """Forget mapping `rid` (no session left: ValueError otherwise)."""
        self._get(rid)
        self.end_c(rid)

    def nsessions(self, uint32_t rid):
        return self._get(rid).nsess

    def remotes(self, uint32_t rid):
        """Its sessions' remote endpoints as ints (R << 16 | Rp), ascending."""
        cdef MapRec* m = self._get(rid)
        cdef list out = []
        cdef int32_t x = m.shead
        while x >= 0:
            out.append((<uint64_t>self.s[x].raddr) << 16 | self.s[x].rport)
            x = self.s[x].next
        out.sort()
        return out

    def __len__(self):
        return self.count

    @property
    def n_ids(self):
        """Rule ids ever handed out + 1 (the next new one)."""
        return self.top

    def free_id_list(self):
        """The freed rule ids, the next to be reused last."""
        return [self.free_ids[k] for k in range(self.nfree)]

    def rule_ids(self):
        """Live rule ids, ascending."""
        cdef uint32_t r
        return [r for r in range(1, self.top) if self.m[r].used]

    def load(self, uint32_t n_ids, free_ids):
        """Start over from a snapshot's id state (then ``put`` each mapping)."""
        if self.count:
            raise ValueError("load() into a table that holds mappings")
        if n_ids < 1:
            raise ValueError(f"n_ids must be >= 1, got {n_ids}")
        if n_ids > self.mcap:
            self._grow_m(n_ids)
        self.top = n_ids
        self.nfree = 0
        ids = [int(x) for x in free_ids]
        p = <uint32_t*>realloc(self.free_ids, (len(ids) + 64) * sizeof(uint32_t))
        if p == NULL:
            raise MemoryError()
        self.free_ids = p
        self.fcap = len(ids) + 64
        for x in ids:
            if not 0 < x < n_ids:
                raise ValueError(f"free rule id {x} out of range")
            self.free_ids[self.nfree] = x
            self.nfree += 1

    def put(self, uint32_t rid, uint8_t p, uint32_t ia, uint16_t ip, uint32_t ea, uint16_t ep, int64_t block):
        """Mapping `rid` as a snapshot holds it (``load`` first)."""
        if rid == 0 or rid >= self.top or self.m[rid].used:
            raise ValueError(f"rule id {rid} is not free")
        self._put(rid, p, ia, ip, ea, ep, block)

    cdef MapRec* session_c(self, uint32_t rid, uint32_t ra, uint16_t rp, out, inn, bint compiled,
                           uint32_t* last, uint8_t* tcp_out, uint8_t* tcp_in) except NULL:
        """Session (rid, R, Rp) as both answers give it: its mapping (returned), the two
        flow-table entries' state -- last_seen the later of both, tcp_out / tcp_in each
        entry's TCP flags (0 for an entry not there).  `compiled`: both tables are the
        compiled FlowTable."""
        cdef MapRec* m = self._get(rid)
        cdef uint32_t lo, li
        # the ICMP twist (rules.out_key / in_key): the identifier stands in for both ports
        _seen_state(out, compiled, m.proto, m.iaddr, m.iport, ra, m.iport if m.proto == P_ICMP else rp, &lo, tcp_out)
        _seen_state(inn, compiled, m.proto, ra, m.eport if m.proto == P_ICMP else rp, m.eaddr, m.eport, &li, tcp_in)
        last[0] = lo if lo > li else li
        return m

    def session_rows(self, list found, out, inn, int dirs, int owner):
        """The sessions found = [(index, rule id, R, Rp)] as tuples in SESSION_DTYPE
        field order (hypernat.rules): the mapping's endpoints, `dirs`, `owner`, and the
        two flow-table entries' state (``session_c``).  A list."""
        cdef list res = []
        cdef bint c = type(out) is _FlowTable and type(inn) is _FlowTable
        cdef MapRec* m
        cdef uint32_t rid, ra, last
        cdef uint16_t rp
        cdef uint8_t to, ti
        for f in found:
            rid, ra, rp = f[1], f[2], f[3]
            m = self.session_c(rid, ra, rp, out, inn, c, &last, &to, &ti)
            res.append((m.iaddr, m.eaddr, ra, m.iport, m.eport, rp, m.proto, dirs, rid, last, to, ti, owner, 0))
        return res

    def rule_records(self, cnp.ndarray rules not None, cnp.ndarray status not None, out, inn, uint16_t owner,
                     uint32_t lease_ms):
        """Fetch serving's answers (``OutSetup.serve``) as RULE records: `rules` (RULE
        records, ``OutSetup.serve_arrays``) holds for each record i with status[i] -1
        (answered) its seq, rule id and remote endpoint; each becomes the whole record
        -- the mapping's endpoints and protocol, `owner`, `lease_ms`, tcp_state both
        flow-table entries' TCP flags (``session_c``) --, moved down to the front in
        order.  Called once the batch's sessions are in the flow tables.  Returns
        (the RULE records, the refused records' indices (int64), their status: the
        reasons (int32))."""
        cdef Py_ssize_t n = _serve_len(rules, status), i, k = 0, nbad = 0
        cdef wire_rule* r = <wire_rule*>cnp.PyArray_DATA(rules)
        cdef const int32_t* st = <const int32_t*>cnp.PyArray_DATA(status)
        cdef bint c = type(out) is _FlowTable and type(inn) is _FlowTable
        cdef MapRec* m
        cdef uint32_t seq, rid, ra, last
        cdef uint16_t rp
        cdef uint8_t to, ti
        for i in range(n):
            if st[i] != OK:
                nbad += 1
                continue
            seq, rid, ra, rp = r[i].seq, r[i].rule_id, r[i].rem_addr, r[i].rem_port
            m = self.session_c(rid, ra, rp, out, inn, c, &last, &to, &ti)
            memset(&r[k], 0, sizeof(wire_rule))
            r[k].seq, r[k].rule_id, r[k].lease_ms = seq, rid, lease_ms
            r[k].int_addr, r[k].ext_addr, r[k].rem_addr = m.iaddr, m.eaddr, ra
            r[k].int_port, r[k].ext_port, r[k].rem_port = m.iport, m.eport, rp
            r[k].owner, r[k].proto, r[k].tcp_state = owner, m.proto, to | ti
            k += 1
        cdef cnp.npy_intp dim = nbad
        cdef cnp.ndarray bad = cnp.PyArray_EMPTY(1, &dim, cnp.NPY_INT64, 0)
        cdef cnp.ndarray why = cnp.PyArray_EMPTY(1, &dim, cnp.NPY_INT32, 0)
        cdef int64_t* b = <int64_t*>cnp.PyArray_DATA(bad)
        cdef int32_t* w = <int32_t*>cnp.PyArray_DATA(why)
        nbad = 0
        for i in range(n):
            if st[i] != OK:
                b[nbad], w[nbad] = i, st[i]
                nbad += 1
        return (rules if k == n else rules[:k]), bad, why

    # -- pending flow-table entries -------------------------------------------------------
    @property
    def n_pending(self):
        return self.npend

    def clear_pending(self):
        """Forget the pending entries (a restore: the tables hold them already)."""
        self.npend = 0

    def flush(self, out, inn, uint32_t now):
        """Write the pending sessions' two entries into the flow tables (out: (p, I, Ip,
        R, Rp) -> (E, Ep); in: (p, R, Rp, E, Ep) -> (I, Ip); ICMP: the identifier in both
        ports), last_seen `now`.  Returns the sessions written."""
        cdef Py_ssize_t n = self.npend, k
        cdef uint32_t* w
        cdef FlowTable o, i
        cdef uint8_t p
        cdef uint16_t rp
        if n == 0:
            return 0
        self.npend = 0
        cdef Py_ssize_t base, m
        if type(out) is _FlowTable and type(inn) is _FlowTable:
            o, i = out, inn
            o._mutating()
            i._mutating()
            base = 0
            while base < n:  # home slots prefetched a group ahead, as insert_batch does
                m = n - base if n - base < 8 else 8
                for k in range(base, base + m):
                    w = &self.pend[k * 8]
                    p = <uint8_t>w[0]
                    rp = <uint16_t>w[4]
                    ft_prefetch(o, p, w[1], <uint16_t>w[2], w[3], <uint16_t>w[2] if p == P_ICMP else rp)
                    ft_prefetch(i, p, w[3], <uint16_t>w[6] if p == P_ICMP else rp, w[5], <uint16_t>w[6])
                for k in range(base, base + m):
                    w = &self.pend[k * 8]
                    p = <uint8_t>w[0]
                    o.c_insert(p, w[1], <uint16_t>w[2], w[3], <uint16_t>(w[2] if p == P_ICMP else w[4]),
                               w[5], <uint16_t>w[6], w[7], now, 0)
                    i.c_insert(p, w[3], <uint16_t>(w[6] if p == P_ICMP else w[4]), w[5], <uint16_t>w[6],
                               w[1], <uint16_t>w[2], w[7], now, 0)
                base += m
            return n
        # another FlowTable implementation (the plain-Python reference): its batch insert
        from .. import layout
        a = np.array([self.pend[k] for k in range(n * 8)], dtype=np.int64).reshape(-1, 8)
        p_, ia, ip, ra, r, ea, ep, rid = a.T
        icmp = p_ == P_ICMP
        ro = np.zeros(n, layout.SLOT_DTYPE)
        ro["proto"], ro["saddr"], ro["sport"], ro["daddr"] = p_, ia, ip, ra
        ro["dport"] = np.where(icmp, ip, r)
        ro["new_addr"], ro["new_port"], ro["rule_id"], ro["last_seen"] = ea, ep, rid, now
        ri = np.zeros(n, layout.SLOT_DTYPE)
        ri["proto"], ri["saddr"], ri["daddr"], ri["dport"] = p_, ra, ea, ep
        ri["sport"] = np.where(icmp, ep, r)
        ri["new_addr"], ri["new_port"], ri["rule_id"], ri["last_seen"] = ia, ip, rid, now
        out.insert_batch(ro)
        inn.insert_batch(ri)
        return n


# ------------------------------------------------------------------------------------
# An outgoing first packet, the common case, compiled
# ------------------------------------------------------------------------------------

from .. import layout as _layout
from .._keys cimport fetch_row, hn_key16, keys_check
keys_check("hypernat.nat._mappings")
cdef object FETCH_ROW_DTYPE = _layout.FETCH_ROW_DTYPE

cdef enum:
    LOOKAHEAD = 4     # OutSetup.run prefetches this many frames ahead
    OK = -1           # the session exists or was added (rules._OK)
    FETCH = -2        # another NIC owns it (rules._FETCH): ``fetch_owner``
    NEED_PY = -4      # nothing done: the caller's general path decides (rare events)


cdef int KIND_ICMP_ERROR = _layout.KIND_ICMP_ERROR
cdef enum:
    TCP_SYN = 0x02
    TCP_ACK = 0x10
    F_EIF = 0        # filtering: endpoint-independent
    F_ADF = 1        # address-dependent
    F_APDF = 2       # address-and-port-dependent
_FILTERS = {"endpoint-independent": F_EIF, "address-dependent": F_ADF, "address-and-port-dependent": F_APDF}
from .. import verdicts as _verdicts
cdef int D_OUT = _verdicts.OUT
cdef int D_IN = _verdicts.IN
from .. import messages as _M
if _M.KEY_DTYPE.itemsize != sizeof(wire_key) or _M.RULE_DTYPE.itemsize != sizeof(wire_rule):
    raise ImportError("hypernat.nat._mappings disagrees with hypernat/_wire.pxd: rebuild it")
cdef uint8_t LOOKUP_ONLY = _M.FETCH_F_ICMP_ERROR | _M.FETCH_F_REVALIDATE  # FETCH flags: look up only
_KEY = _M.KEY_DTYPE
cdef cnp.dtype _RULE = _M.RULE_DTYPE
cdef extern from "numpy/arrayobject.h":
    object _zeros "PyArray_Zeros" (int nd, cnp.npy_intp* dims, cnp.dtype descr, int fortran)


cdef class OutSetup:
    """The common case of a first packet without a session, in C, both ways.

    Outgoing (``RuleBuilder._out``): the internal prefix, the host's record, its mapping
    and session; a new session on an existing mapping; a new mapping on a port of one
    of the host's blocks.  Everything else -- a host not known here (fetch, new host), a
    new block (journal), the port cap, the crash-recovery window -- answers NEED_PY
    having changed nothing, and the caller's Python path decides it.

    Incoming (``RuleBuilder._in``, after ``bind_in``): the external endpoint's owner (the
    partition's geometry with its loans, in C), its mapping, the session, the filtering
    behaviour (endpoint-independent, address-dependent, address-and-port-dependent), an
    unsolicited SYN, the table's room, the new session.  Another NIC's endpoint (a lent
    block's included) answers FETCH: ``run`` queues the fetch itself, ``serve`` refuses
    it (not_owner).

    The mappings and sessions it creates go into ``events`` (``hypernat.nat._events``:
    the per-rule translation log's lines, active install's PUSH records), the ring the
    builder's general path writes its own into and drains once per call; it records
    only the kinds switched on (``events.mappings``, ``events.sessions``).

    ``out`` / ``in_`` answer one packet: -1 (the session exists or was added; ``last``
    is its rule id), -2 (``in_``: another NIC owns the endpoint, ``fetch_owner``), a
    refusal's reason index (the caller counts it), or -4 (NEED_PY).
    ``run`` answers a batch's misses of one direction in frame order, ``serve`` a batch
    of FETCH records (read in place; the answers written into RULE / status arrays),
    until one needs the caller; the refusals they answer themselves
    (every one that does not log: all but table_full) are counted here and added to
    the caller's counters by ``drain``.
    ``room`` is the entries both flow tables can still take in this call (the caller
    sets it per call and spends it on the sessions it adds itself)."""

    cdef Mappings mp
    cdef Hosts hs
    cdef PortBlocks bl
    cdef HostRate rate
    cdef Prefixes inside              # the internal prefixes (hypernat._geometry)
    cdef bint preserve
    cdef uint32_t cap
    cdef int r_not_internal, r_icmp, r_full, r_rate, r_not_in_pool, r_usyn, r_no_mapping, r_filtered, r_not_owner
    cdef int v_miss_out, v_miss_in, v_miss_icmp, v_miss_lo, v_miss_hi
    # incoming: this NIC, the filtering behaviour, the partition's geometry (bind_in)
    cdef bint has_in
    cdef int nic
    cdef int filt
    cdef Geometry geo                 # the partition's geometry and loans (Partition.geometry, shared)
    cdef int64_t* nref                # refusals answered in run / serve, per reason index
    cdef int nreasons
    cdef public int64_t room
    cdef public bint recovering       # no new mapping here: the caller decides (hold or not)
    cdef readonly EventRing events    # mappings / sessions created (log lines, PUSH records)
    cdef readonly uint32_t last       # rule id of the last session answered -1
    cdef readonly int fetch_owner     # the NIC of the last answer -2 (FETCH)

    def __cinit__(self):
        self.nref = NULL

    def __init__(self, Mappings maps not None, internal, reasons, verdicts):
        """`internal`: [(network, netmask)] as ints; `reasons`: {name: index} of
        not_internal, icmp_error_no_session, table_full, host_rate_limited, not_in_pool,
        unsolicited_syn, no_mapping, filtered, not_owner; `verdicts`: {name: value} of miss_out,
        miss_in, miss_icmp_error, miss_hairpin (the misses: one range of values)."""
        self.mp = maps
        self.events = EventRing()
        self.inside = Prefixes(internal)
        self.r_not_internal = reasons["not_internal"]
        self.r_icmp = reasons["icmp_error_no_session"]
        self.r_full = reasons["table_full"]
        self.r_rate = reasons["host_rate_limited"]
        self.r_not_in_pool = reasons["not_in_pool"]
        self.r_usyn = reasons["unsolicited_syn"]
        self.r_no_mapping = reasons["no_mapping"]
        self.r_filtered = reasons["filtered"]
        self.r_not_owner = reasons["not_owner"]
        self.nreasons = max(reasons.values()) + 1
        self.nref = <int64_t*>calloc(self.nreasons, sizeof(int64_t))
        if self.nref == NULL:
            raise MemoryError()
        self.v_miss_out = verdicts["miss_out"]
        self.v_miss_in = verdicts["miss_in"]
        self.v_miss_icmp = verdicts["miss_icmp_error"]
        vs = [verdicts[x] for x in ("miss_out", "miss_in", "miss_icmp_error", "miss_hairpin")]
        self.v_miss_lo, self.v_miss_hi = min(vs), max(vs)
        if self.v_miss_hi - self.v_miss_lo != 3:
            raise ValueError(f"the miss verdicts are not one range: {vs}")

    def __dealloc__(self):
        free(self.nref)

    def bind(self, Hosts hosts not None, PortBlocks blocks not None, HostRate rate, int cap, bint preserve):
        """The builder's current host table, port blocks, rate limiter (None: off), port
        cap per host and protocol, port preservation."""
        self.hs, self.bl, self.rate, self.cap, self.preserve = hosts, blocks, rate, cap, preserve

    def bind_in(self, int nic, str filtering, Geometry geometry not None):
        """The incoming side: this NIC's id, the filtering behaviour (its config name),
        and the partition's geometry (``hypernat.partition.Partition.geometry``: the
        object itself, whose loans the partition keeps current on every ``lend`` /
        ``return_block``, so the owner of an endpoint in a lent block is answered here
        like any other)."""
        if filtering not in _FILTERS:
            raise ValueError(f"unknown filtering behaviour {filtering!r}")
        self.filt = _FILTERS[filtering]
        if self.filt == F_ADF and not self.mp.raddr:
            raise ValueError("address-dependent filtering needs Mappings(remote_addresses=True)")
        self.geo = geometry
        self.nic = nic
        self.has_in = True

    def drain(self, list counters not None):
        """Add the refusals counted here since the last call to `counters` (by reason index)."""
        cdef int r
        for r in range(self.nreasons):
            if self.nref[r]:
                counters[r] += self.nref[r]
                self.nref[r] = 0

    def owner(self, uint32_t ea, uint16_t ep):
        """The NIC owning (E, Ep) now (loans applied); -1 outside the pool."""
        return self.geo.owner_c(ea, ep)

    cdef int in_c(self, uint8_t p, uint32_t ra, uint16_t rp, uint32_t ea, uint16_t ep, uint8_t fl, int64_t now,
                  bint icmp_error) except -5:
        if not self.has_in:
            return NEED_PY
        cdef int o = self.geo.owner_c(ea, ep)
        if o < 0:
            return self.r_not_in_pool
        if o != self.nic:
            self.fetch_owner = o
            return FETCH  # another NIC's endpoint: a fetch (serving: not_owner)
        cdef Mappings mp = self.mp
        cdef uint32_t rid = mp.find_ext(p, ea, ep)
        cdef uint16_t r = 0 if p == P_ICMP else rp
        if rid and mp.has_session_c(rid, ra, r):
            self.last = rid
            return OK  # pending in this batch, or a fetch of an existing session
        if icmp_error:
            return self.r_icmp
        cdef bint syn = p == P_TCP and (fl & (TCP_SYN | TCP_ACK)) == TCP_SYN
        if rid == 0:
            return self.r_usyn if syn else self.r_no_mapping
        if self.filt == F_APDF or (self.filt == F_ADF and not mp.has_raddr_c(rid, ra)):
            return self.r_usyn if syn else self.r_filtered
        cdef MapRec* m = &mp.m[rid]
        cdef uint32_t other
        if not mp.eim:
            # address-and-port-dependent mapping: the session's outgoing key may be
            # another mapping's session already (I:Ip talked to R:Rp through its own
            # mapping); admitting it here would bind one outgoing 5-tuple to two
            # external endpoints -- refused, as a filter would
            other = mp.find_out(p, m.iaddr, m.iport, ra, r)
            if other and other != rid:
                return self.r_usyn if syn else self.r_filtered
        if self.room <= 0:
            return self.r_full
        mp.add_session_c(rid, ra, r)
        self.room -= 1
        self.last = rid
        if self.events.sessions:
            self.events.record(EV_SESSION, p, m.iaddr, m.iport, ea, ep, ra, r, rid, <uint32_t>now)
        return OK

    def in_(self, uint8_t p, uint32_t ra, uint16_t rp, uint32_t ea, uint16_t ep, uint8_t fl, bint icmp_error=False,
            int64_t now=0):
        return self.in_c(p, ra, rp, ea, ep, fl, now, icmp_error)

    cdef int out_c(self, uint8_t p, uint32_t ia, uint16_t ip, uint32_t ra, uint16_t rp, int64_t now,
                   bint icmp_error) except -5:
        if not self.inside.has_c(ia):
            return self.r_not_internal
        if p != P_TCP and p != P_UDP and p != P_ICMP:
            return NEED_PY
        cdef Host* h = self.hs.find(ia)
        if h == NULL:
            return NEED_PY  # EIM: another NIC's host (fetch) or a new one; APDM: a new host
        cdef uint16_t r = 0 if p == P_ICMP else rp
        cdef Mappings mp = self.mp
        cdef uint32_t rid = mp.find_out(p, ia, ip, ra, r)
        if rid and mp.has_session_c(rid, ra, r):
            self.last = rid
            return OK  # pending in this batch, or a fetch of an existing session
        if icmp_error:
            return self.r_icmp
        if self.room <= 0:
            return self.r_full
        cdef int pi, off = -1
        cdef int64_t g
        cdef int32_t s
        cdef MapRec* m
        if rid == 0:
            if self.recovering:
                return NEED_PY
            if self.rate is not None and not self.rate.would_allow(ia, now):
                self.rate.allow(ia, now)  # its refill, as a refused take leaves it
                return self.r_rate
            pi = _pidx(p)
            if h.nports[pi] >= self.cap:
                return NEED_PY  # refused by the caller (host_port_cap)
            g = self.hs.allocate_c(h, pi, ip, self.preserve, self.bl, &off)
            if g < 0:
                return NEED_PY  # a new block: the caller (journal, log)
            if self.rate is not None:
                self.rate.allow(ia, now)
            h.nports[pi] += 1
            s = self.bl.slot_of(g)
            rid = <uint32_t>mp.new_c(p, ia, ip, self.bl.s_addr[s], <uint16_t>(self.bl.s_lo[s] + off), g)
            if self.events.mappings:
                self.events.record(EV_MAPPING, p, ia, ip, self.bl.s_addr[s], <uint16_t>(self.bl.s_lo[s] + off), 0, 0,
                                   rid, <uint32_t>now)
        elif self.rate is not None and not self.rate.allow(ia, now):
            return self.r_rate
        mp.add_session_c(rid, ra, r)
        self.room -= 1
        self.last = rid
        if self.events.sessions:
            m = &mp.m[rid]
            self.events.record(EV_SESSION, p, ia, ip, m.eaddr, m.eport, ra, r, rid, <uint32_t>now)
        return OK

    def out(self, uint8_t p, uint32_t ia, uint16_t ip, uint32_t ra, uint16_t rp, int64_t now,
            bint icmp_error=False):
        return self.out_c(p, ia, ip, ra, rp, now, icmp_error)

    cdef inline bint _answered(self, int r, Py_ssize_t i, int32_t* idx, int32_t* res, Py_ssize_t* m) noexcept:
        """Record run's answer for frame i: True if answered (replay or a counted refusal)."""
        if r == OK or (r >= 0 and r != self.r_full):  # (a refusal that does not log: counted here)
            if r != OK:
                self.nref[r] += 1
            idx[m[0]] = <int32_t>i
            res[m[0]] = r
            m[0] += 1
            return True
        return False

    def run(self, const uint8_t[::1] verdicts not None, const uint8_t[::1] keys not None, Py_ssize_t i,
            int64_t now, int32_t[::1] idx not None, int32_t[::1] res not None, fetches,
            int64_t[::1] count not None, bint inbound=False):
        """Frames i, i+1, ... of a batch (`verdicts` uint8[n], `keys` layout.KEY_DTYPE[n]
        as bytes) translated outgoing (`inbound` False: its outgoing misses, ``out``) or
        incoming (True: its incoming and ICMP-error misses, ``in_``): frames that are not
        misses are passed over.  The answers go into the caller's arrays, after what
        they hold (``count``: [answers, fetches] so far, updated): each miss answered -1
        writes its frame index to `idx` and -1 to `res`; each refusal that does not log
        (all but table_full) its index to `idx` and its reason to `res` (counted:
        ``drain``); inbound, a miss for another NIC's endpoint its index to `idx`, -2 to
        `res`, and its fetch (frame, owner, IN, the key, kind, tcp_flags) to `fetches`
        (a layout.FETCH_ROW_DTYPE array).  `idx`, `res` and `fetches` hold n entries.
        Returns the index of the first miss it did not answer (n: none left),
        untouched: the caller's general path takes it.  No Python object per frame.
        Its setups' index writes are deferred (``Mappings.defer``) and all done when
        it returns."""
        cdef Py_ssize_t n = verdicts.shape[0], a
        cdef const hn_key16* k
        cdef uint8_t v
        cdef int r
        cdef fetch_row* fr
        if keys.shape[0] < n * <Py_ssize_t>sizeof(hn_key16):
            raise ValueError("keys shorter than verdicts")
        if type(fetches) is not np.ndarray or (<cnp.ndarray>fetches).descr != FETCH_ROW_DTYPE \
                or not cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>fetches) \
                or not cnp.PyArray_ISWRITEABLE(<cnp.ndarray>fetches):
            raise TypeError("fetches must be a contiguous, writable layout.FETCH_ROW_DTYPE array")
        if idx.shape[0] < n or res.shape[0] < n or cnp.PyArray_SIZE(<cnp.ndarray>fetches) < n or count.shape[0] < 2:
            raise ValueError("idx, res and fetches need room for every frame; count two entries")
        cdef fetch_row* fet = <fetch_row*>cnp.PyArray_DATA(<cnp.ndarray>fetches)
        cdef Py_ssize_t m = <Py_ssize_t>count[0], nf = <Py_ssize_t>count[1]
        if not (0 <= m <= n and 0 <= nf <= n):
            raise ValueError(f"count {m}, {nf} outside 0..{n}")
        self.mp.defer = True  # the index writes of its setups wait a few setups (Mappings.defer)
        try:
            while i < n:
                a = i + LOOKAHEAD  # the host's and the mapping index's lines, a few misses ahead
                if a < n:
                    v = verdicts[a]
                    k = <const hn_key16*>&keys[a * sizeof(hn_key16)]
                    if inbound:
                        if v == self.v_miss_in or v == self.v_miss_icmp:
                            self.mp.prefetch_ext(k.proto, k.daddr, k.dport)
                    elif v == self.v_miss_out:
                        self.hs.prefetch(k.saddr)
                        self.mp.prefetch_out(k.proto, k.saddr, k.sport, k.daddr, 0 if k.proto == P_ICMP else k.dport)
                v = verdicts[i]
                if v < self.v_miss_lo or v > self.v_miss_hi:
                    i += 1
                    continue
                k = <const hn_key16*>&keys[i * sizeof(hn_key16)]
                if inbound:
                    if v != self.v_miss_in and v != self.v_miss_icmp:
                        break
                    r = self.in_c(k.proto, k.saddr, k.sport, k.daddr, k.dport, k.tcp_flags, now,
                                  k.kind == KIND_ICMP_ERROR)
                    if r == FETCH:
                        idx[m] = <int32_t>i
                        res[m] = FETCH
                        m += 1
                        fr = &fet[nf]
                        nf += 1
                        fr.saddr, fr.daddr, fr.sport, fr.dport = k.saddr, k.daddr, k.sport, k.dport
                        fr.proto, fr.kind, fr.tcp_flags, fr.fetch_dir = k.proto, k.kind, k.tcp_flags, <uint8_t>D_IN
                        fr.frame, fr.owner = <int32_t>i, self.fetch_owner
                        i += 1
                        continue
                else:
                    if v != self.v_miss_out:
                        break
                    r = self.out_c(k.proto, k.saddr, k.sport, k.daddr, k.dport, now, False)
                if not self._answered(r, i, &idx[0], &res[0], &m):
                    break
                i += 1
        finally:
            count[0], count[1] = m, nf
            self.mp.defer = False
            self.mp.settle_c()
        return i

    cdef int serve_c(self, const wire_key* k, int64_t now) except -5:
        """FETCH record `k` (a validated messages.KEY_DTYPE record) asked of ``in_c``
        (FETCH_BY_EXTERNAL: (p, R, Rp, E, Ep)) or ``out_c`` (by internal endpoint: (p,
        I, Ip, R, Rp)); flags FETCH_F_ICMP_ERROR / FETCH_F_REVALIDATE look up only.
        Another NIC's endpoint is refused (not_owner); NEED_PY, table_full and a protocol
        it does not know are left to the caller (-4: nothing done)."""
        cdef uint8_t p = k.proto
        cdef int r
        if p != P_TCP and p != P_UDP and p != P_ICMP:
            return NEED_PY
        if k.kind == FETCH_BY_EXTERNAL:
            r = self.in_c(p, k.rem_addr, k.rem_port, k.ext_addr, k.ext_port, 0, now, k.flags & LOOKUP_ONLY != 0)
        else:
            r = self.out_c(p, k.int_addr, k.int_port, k.rem_addr, k.rem_port, now, k.flags & LOOKUP_ONLY != 0)
        if r == FETCH:  # serving: another NIC's endpoint
            return self.r_not_owner
        if r == self.r_full:
            return NEED_PY
        return r

    def serve_arrays(self, recs):
        """The answer arrays of FETCH records `recs` (messages.KEY_DTYPE, validated; a
        TypeError otherwise): (RULE records, int32 statuses), zeroed, one per record --
        what ``serve`` and ``answer`` write and ``Mappings.rule_records`` packs."""
        if not isinstance(recs, cnp.ndarray) or recs.ndim != 1 or not (recs.dtype is _KEY or recs.dtype == _KEY) \
                or not cnp.PyArray_IS_C_CONTIGUOUS(recs):
            raise TypeError("FETCH records must be a contiguous 1-d messages.KEY_DTYPE array")
        cdef cnp.npy_intp n = recs.shape[0]
        Py_INCREF(_RULE)  # (PyArray_Zeros steals a reference to the dtype)
        return _zeros(1, &n, _RULE, 0), cnp.PyArray_ZEROS(1, &n, cnp.NPY_INT32, 0)

    def serve(self, cnp.ndarray recs not None, Py_ssize_t i, int64_t now, cnp.ndarray rules not None,
              cnp.ndarray status not None):
        """FETCH records i, i+1, ... of `recs` (messages.KEY_DTYPE, validated) served in
        order (``serve_c``) until one needs the caller (a protocol it does not know,
        NEED_PY, table_full), whose index it returns (n: none left), untouched.  Each
        answer is written by ``answer_c`` into the arrays of ``serve_arrays``: -1 into
        status[i] and the session into rules[i] (``Mappings.rule_records`` completes
        them), or a refusal's reason into status[i] (counted here: ``drain``)."""
        cdef Py_ssize_t n = _serve_len(rules, status, recs)
        cdef const wire_key* k = <const wire_key*>cnp.PyArray_DATA(recs)
        cdef wire_rule* out = <wire_rule*>cnp.PyArray_DATA(rules)
        cdef int32_t* st = <int32_t*>cnp.PyArray_DATA(status)
        cdef int r
        if i < 0:
            raise IndexError(i)
        self.mp.defer = True  # as in run
        try:
            while i < n:
                r = self.serve_c(&k[i], now)
                if r == NEED_PY:
                    break
                if r != OK:
                    self.nref[r] += 1
                answer_c(&k[i], &out[i], &st[i], r, self.last)
                i += 1
        finally:
            self.mp.defer = False
            self.mp.settle_c()
        return i

    def fetch_row(self, cnp.ndarray recs not None, Py_ssize_t i):
        """Record i of `recs` (as ``serve``) as the general path asks it: (fetch_dir,
        saddr, daddr, sport, dport, proto, icmp_error) -- verdicts.IN (p, R, Rp, E, Ep)
        or verdicts.OUT (p, I, Ip, R, Rp)."""
        if i < 0 or i >= _serve_len(None, None, recs):
            raise IndexError(i)
        cdef const wire_key* k = &(<const wire_key*>cnp.PyArray_DATA(recs))[i]
        cdef bint icmp = k.flags & LOOKUP_ONLY != 0
        if k.kind == FETCH_BY_EXTERNAL:
            return (D_IN, k.rem_addr, k.ext_addr, k.rem_port, k.ext_port, k.proto, icmp)
        return (D_OUT, k.int_addr, k.rem_addr, k.int_port, k.rem_port, k.proto, icmp)

    def answer(self, cnp.ndarray recs not None, Py_ssize_t i, cnp.ndarray rules not None,
               cnp.ndarray status not None, int r, uint32_t rid):
        """The general path's answer `r` to record i (-1: the session of mapping `rid`;
        else the refusal's reason, counted by the caller), written as ``serve`` writes
        its own (``answer_c``)."""
        if i < 0 or i >= _serve_len(rules, status, recs):
            raise IndexError(i)
        if r != OK and r < 0:
            raise ValueError(f"not an answer: {r}")
        answer_c(&(<const wire_key*>cnp.PyArray_DATA(recs))[i], &(<wire_rule*>cnp.PyArray_DATA(rules))[i],
                 &(<int32_t*>cnp.PyArray_DATA(status))[i], r, rid)


cdef Py_ssize_t _serve_len(cnp.ndarray rules, cnp.ndarray status, cnp.ndarray recs=None) except -1:
    """The records of fetch serving's arrays (their layouts and lengths checked: C reads
    them in place)."""
    cdef Py_ssize_t n = -1
    if recs is not None:
        if recs.ndim != 1 or recs.descr.itemsize != sizeof(wire_key) or not cnp.PyArray_IS_C_CONTIGUOUS(recs):
            raise TypeError("FETCH records must be a contiguous 1-d messages.KEY_DTYPE array")
        n = recs.shape[0]
    if rules is not None:
        if rules.ndim != 1 or rules.descr.itemsize != sizeof(wire_rule) or not cnp.PyArray_IS_C_CONTIGUOUS(rules) \
                or status.ndim != 1 or status.descr.type_num != cnp.NPY_INT32 \
                or not cnp.PyArray_IS_C_CONTIGUOUS(status) or not cnp.PyArray_ISWRITEABLE(rules) \
                or not cnp.PyArray_ISWRITEABLE(status):
            raise TypeError("answer arrays not as OutSetup.serve_arrays makes them")
        if status.shape[0] != rules.shape[0] or (n >= 0 and rules.shape[0] != n):
            raise ValueError("FETCH records, RULE records and statuses differ in length")
        n = rules.shape[0]
    return n


cdef inline void answer_c(const wire_key* k, wire_rule* out, int32_t* status, int r, uint32_t rid) noexcept nogil:
    """Fetch serving's one writer of an answer to FETCH record `k`: r -1 (OK) writes its
    seq, `rid` and the session's remote endpoint (R, Rp; ICMP: Rp 0) into `out`, the rest
    of which ``Mappings.rule_records`` fills once the sessions are in the flow tables;
    status = r (-1, or the refusal's reason index)."""
    status[0] = r
    if r != OK:
        return
    out.seq = k.seq
    out.rule_id = rid
    out.rem_addr = k.rem_addr
    out.rem_port = 0 if k.proto == P_ICMP else k.rem_port
