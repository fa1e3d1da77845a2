# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Clone install, compiled: a batch of other NICs' sessions becomes F_CLONE entries in
this NIC's flow tables, through the tables' C interface (``_fastpath.pxd``), one C
lookup and one C insert per entry, read in place from the records (a RULE / PUSH
message's, or SESSION_DTYPE), no Python object per record, the GIL released.

``hypernat.clones_py`` is the same operation in plain Python (the reference, used when
the extensions are not built); ``tests/test_clones_twins.py`` checks they agree.
``RuleBuilder.install_clones`` is the one caller (partition lookups, counters).
"""

from libc.stdint cimport int8_t, int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy

from ._fastpath cimport FlowTable, hn_slot
from ._wire cimport wire_activity, wire_rule

cimport numpy as cnp
import numpy as np

from . import layout as _layout
from . import messages as _M
from .clones_py import record_fields

cdef enum:
    P_ICMP = 1
    P_TCP = 6
    P_UDP = 17
    D_OUT = 1   # rules.DIR_BIT_OUT
    D_IN = 2    # rules.DIR_BIT_IN

cdef uint8_t F_CLONE = _layout.F_CLONE
cdef uint8_t TCP_MASK = _layout.TCP_STATE_MASK
assert _M.RULE_DTYPE.itemsize == sizeof(wire_rule)
cnp.import_array()


cdef inline int put(FlowTable t, uint8_t p, uint32_t sa, uint16_t sp, uint32_t da, uint16_t dp,
                    uint32_t na, uint16_t np_, uint32_t rid, uint32_t now, uint8_t tcp,
                    uint16_t lease) noexcept nogil:
    """One clone entry: 1 installed, 0 refused (an owned entry holds the key), -1 table
    full.  A clone entry already there is replaced (a later rule for the same key)."""
    cdef int64_t j = t.c_find(p, sa, sp, da, dp)
    cdef hn_slot *s
    if j >= 0 and not (t.c_slot(j).flags & F_CLONE):
        return 0  # never replace an owned entry
    if not t.c_insert(p, sa, sp, da, dp, na, np_, rid, now, F_CLONE):
        return -1
    if tcp or lease:
        s = t.c_slot(t.c_find(p, sa, sp, da, dp))
        s.tcp_state = tcp
        s.lease = lease
    return 1


cdef inline void _tally(int k, int *g, int *bad, int *full) noexcept nogil:
    """Count one ``put``: installed, refused as bad, or table full."""
    if k > 0:
        g[0] += 1
    elif k == 0:
        bad[0] += 1
    else:
        full[0] += 1


cdef inline uint8_t _u8o(const unsigned char *p, Py_ssize_t o) noexcept nogil:
    return p[o] if o >= 0 else 0


cdef object _last_dtype = None
cdef tuple _last_fields = None


cdef object rec_view_of(rec_view *v, recs):
    """Fill `v` for the record array `recs`; returns the array it points into (keep it
    alive while `v` is used)."""
    global _last_dtype, _last_fields
    cdef cnp.ndarray raw = cnp.PyArray_FROMANY(recs, cnp.NPY_NOTYPE, 1, 1, cnp.NPY_ARRAY_C_CONTIGUOUS) \
        if type(recs) is not np.ndarray or not cnp.PyArray_IS_C_CONTIGUOUS(recs) else recs
    dt = raw.dtype
    if dt is not _last_dtype:  # the dtype's fields, looked up once per dtype object
        _last_fields, _last_dtype = record_fields(dt), dt
    v.o_p, v.o_i, v.o_ip, v.o_e, v.o_ep, v.o_r, v.o_rp, v.o_rid, v.o_to, v.o_ti = _last_fields
    v.size = dt.itemsize
    v.b = <const unsigned char *>cnp.PyArray_DATA(raw)
    return raw


# Per-batch arguments without per-batch numpy where a scalar or None does: a selection of
# records (None: all of them) and per-record columns given as a scalar.  The arrays are
# taken as they come when already of the type (numpy's C API, no copy, no memoryview).
cdef cnp.ndarray _array(val, int typenum):
    """`val` as a C-contiguous array of `typenum` with at most one dimension (itself when
    it is one)."""
    if (type(val) is np.ndarray and cnp.PyArray_TYPE(val) == typenum and cnp.PyArray_NDIM(val) <= 1
            and cnp.PyArray_IS_C_CONTIGUOUS(val)):
        return val
    return cnp.PyArray_FROMANY(val, typenum, 0, 1, cnp.NPY_ARRAY_C_CONTIGUOUS | cnp.NPY_ARRAY_FORCECAST)


cdef object rec_selection(idx, Py_ssize_t n, Py_ssize_t *m):
    """`idx` (record indexes) as a contiguous int64 array, each checked against `n`, its
    length in *m; None stays None (every record: *m = n)."""
    if idx is None:
        m[0] = n
        return None
    cdef cnp.ndarray a = _array(idx, cnp.NPY_INT64)
    if cnp.PyArray_NDIM(a) != 1:
        a = a.reshape(-1)
    cdef const int64_t *v = <const int64_t *>cnp.PyArray_DATA(a)
    cdef Py_ssize_t k
    m[0] = a.shape[0]
    for k in range(m[0]):
        if v[k] < 0 or v[k] >= n:
            raise IndexError(f"record index {v[k]} out of range 0..{n - 1}")
    return a


cdef cnp.ndarray _column(val, Py_ssize_t n, int typenum, int64_t *scalar):
    """A per-record value: a contiguous array of `n`, or None with a scalar in *scalar."""
    if isinstance(val, int):
        scalar[0] = val
        return None
    cdef cnp.ndarray a = _array(val, typenum)
    if cnp.PyArray_NDIM(a) == 0:
        scalar[0] = int(a)
        return None
    if a.shape[0] != n:
        raise ValueError(f"a per-record column of {a.shape[0]} for {n} records")
    return a


cdef inline const void *_data(cnp.ndarray a) noexcept:
    return NULL if a is None else cnp.PyArray_DATA(a)


cdef object _EMPTY = np.zeros(0, np.int64)
_EMPTY.flags.writeable = False


def install_records(FlowTable out not None, FlowTable inn not None, recs, idx, dirs, own, int me,
                    now, lease):
    """Install clone entries for the records `recs` (a RULE / PUSH message's, or
    SESSION_DTYPE; read in place) selected by `idx` (record indexes, None: all): `dirs`
    (DIR_BIT_*, scalar or per record) the entries to install, `own` the owner NIC of
    each record's external endpoint (per record; this NIC `me` never clones its own).
    `now` the tick written as last_seen, `lease` the 16-bit lease end (0: none).  Returns
    ``(got, bad, full)``: entries installed per selected record (int8), records or
    entries refused as bad (unknown protocol, own endpoint, an owned entry in the way),
    entries refused because their table was full."""
    cdef Py_ssize_t n = len(recs), m, k, x
    cdef rec_view v
    cdef int64_t d0 = 0, o0 = 0
    keep = rec_view_of(&v, recs)
    cdef cnp.ndarray ix_a = rec_selection(idx, n, &m)
    cdef cnp.ndarray d_a = _column(dirs, n, cnp.NPY_UINT8, &d0)
    cdef cnp.ndarray own_a = _column(own, n, cnp.NPY_INT64, &o0)
    cdef cnp.ndarray got_a = np.zeros(m, np.int8)
    cdef const int64_t *ix = <const int64_t *>_data(ix_a)
    cdef const uint8_t *dv = <const uint8_t *>_data(d_a)
    cdef const int64_t *ov = <const int64_t *>_data(own_a)
    cdef int8_t *got = <int8_t *>cnp.PyArray_DATA(got_a)
    cdef uint32_t tick = <uint32_t>(int(now) & 0xFFFFFFFF)
    cdef uint16_t l16 = <uint16_t>(int(lease) & 0xFFFF)
    cdef const unsigned char *b
    cdef uint8_t p, d, to, ti
    cdef uint32_t i, e, r, rid
    cdef uint16_t ip, ep, rp
    cdef int bad = 0, full = 0, kk, g
    if m == 0:
        return got_a, 0, 0
    out._mutating()
    inn._mutating()
    with nogil:
        for k in range(m):
            x = k if ix == NULL else ix[k]
            b = v.b + x * v.size
            p = b[v.o_p]
            if (p != P_TCP and p != P_UDP and p != P_ICMP) or (o0 if ov == NULL else ov[x]) == me:
                bad += 1
                continue
            i, ip, e, ep = rec_u32(b + v.o_i), rec_u16(b + v.o_ip), rec_u32(b + v.o_e), rec_u16(b + v.o_ep)
            r, rp, rid = rec_u32(b + v.o_r), rec_u16(b + v.o_rp), rec_u32(b + v.o_rid)
            d = <uint8_t>d0 if dv == NULL else dv[x]
            g = 0
            if d & D_OUT:  # out key (I, Ip, R, Rp); ICMP query: the identifier in both ports
                to = _u8o(b, v.o_to)
                kk = put(out, p, i, ip, r, ip if p == P_ICMP else rp, e, ep, rid, tick, to & TCP_MASK, l16)
                _tally(kk, &g, &bad, &full)
            if d & D_IN:  # in key (R, Rp, E, Ep); ICMP query: the translated identifier in both
                ti = _u8o(b, v.o_ti)
                kk = put(inn, p, r, ep if p == P_ICMP else rp, e, ep, i, ip, rid, tick, ti & TCP_MASK, l16)
                _tally(kk, &g, &bad, &full)
            got[k] = g
    return got_a, bad, full


# ------------------------------------------------------------------------------------
# The holder's clone table
# ------------------------------------------------------------------------------------
from ._entries cimport (en_add, en_find, en_full, en_init, en_on_endpoint, en_realloc, en_reindex,
                        en_release, en_unlink)
from ._fastpath import FlowTable as _FlowTable
from ._heap cimport heap_free, heap_init, heap_pop, heap_push


from .nat.records import SESSION_DTYPE as _SESSION
assert _SESSION.itemsize == sizeof(sess_rec) and _SESSION.fields["rule_id"][1] == 16 \
    and _SESSION.fields["owner"][1] == 30


class Clone(tuple):
    """A clone as the table holds it (a copy): owner, rule_id, dirs, expires, due."""
    __slots__ = ()
    owner = property(lambda self: self[0])
    rule_id = property(lambda self: self[1])
    dirs = property(lambda self: self[2])
    expires = property(lambda self: self[3])
    due = property(lambda self: self[4])


cdef inline tuple _sk(const ce_entry *c):
    return (c.k.proto, c.k.iaddr, c.k.iport, c.k.eaddr, c.k.eport, c.k.raddr, c.k.rport)


cdef class CloneTable:
    """The clones this NIC holds: session identity (proto, I, Ip, E, Ep, R, Rp) ->
    (owner, rule_id, dirs, expires, due), in C.  Indexed by identity and by external
    endpoint through FlowTables (the fast path's hashing, ``_fastpath.pxd``), by owner
    (linked lists) and by lease end (a heap).  ``hypernat.clones_py.CloneTable`` is the
    plain-Python reference with the same interface."""

    def __cinit__(self):
        en_init(&self.s, sizeof(ce_entry))
        self.e = NULL
        heap_init(&self.h)
        self.walks = 0
        self.gen = 0
        for k in range(256):
            self.own_head[k] = -1
            self.own_count[k] = 0

    def __init__(self, int capacity=1024):
        self._grow(max(16, capacity))

    def __dealloc__(self):
        en_release(&self.s)
        heap_free(&self.h)

    def _grow(self, int32_t cap):
        """Room for `cap` clones: the entry array grows, the indexes are rebuilt (owner
        lists are independent of them: kept)."""
        en_realloc(&self.s, cap)
        self.e = <ce_entry *>self.s.e
        self.ids = _FlowTable(cap, hugepages=False)
        self.eps = _FlowTable(cap, hugepages=False)
        en_reindex(&self.s, self.ids, self.eps)

    cdef int32_t find(self, uint8_t p, uint32_t i, uint16_t ip, uint32_t e, uint16_t ep,
                      uint32_t r, uint16_t rp) noexcept:
        return en_find(&self.s, self.ids, p, i, ip, e, ep, r, rp)

    cdef int32_t add(self, uint8_t p, uint32_t i, uint16_t ip, uint32_t e, uint16_t ep,
                     uint32_t r, uint16_t rp) except -2:
        if en_full(&self.s):
            self._grow(self.s.cap * 2)
        return en_add(&self.s, self.ids, self.eps, p, i, ip, e, ep, r, rp)

    cdef void _set_owner(self, int32_t x, int owner) noexcept:
        cdef ce_entry *c = &self.e[x]
        c.owner = owner
        c.own_prev = -1
        c.own_next = self.own_head[owner]
        if c.own_next >= 0:
            self.e[c.own_next].own_prev = x
        self.own_head[owner] = x
        self.own_count[owner] += 1

    cdef void unlink(self, int32_t x) noexcept:
        cdef ce_entry *c = &self.e[x]
        en_unlink(&self.s, self.ids, self.eps, x)
        if c.own_prev >= 0:
            self.e[c.own_prev].own_next = c.own_next
        else:
            self.own_head[c.owner] = c.own_next
        if c.own_next >= 0:
            self.e[c.own_next].own_prev = c.own_prev
        self.own_count[c.owner] -= 1

    # -- per batch -------------------------------------------------------------------------
    def install(self, int owner, recs, idx, dirs, double now, double margin, install):
        """Install clones of `owner`'s sessions from RULE-layout records (a RULE or PUSH
        message's, ``messages.RULE_DTYPE``; read in place: key, rule_id, lease_ms)
        selected by `idx` (record indexes, None: all), `dirs` (DIR_BIT_*, scalar or per
        record) the entries each brings.  A clone already held with those entries only
        has its lease extended (an idempotent repeat); the rest go to ``install(recs,
        todo, dirs)`` in one call (the builder's ``install_clones``: flow-table entries
        per selected record, int8), and each that got entries becomes a clone here (or
        adds its directions to the one held).  Returns (installed, failed, done): `done`
        the indexes of the records installed (int64, in order)."""
        cdef Py_ssize_t n = len(recs), m, k, t = 0, x
        cdef rec_view v
        keep = rec_view_of(&v, recs)
        if n and v.size != sizeof(wire_rule):
            raise TypeError(f"clone records must have the RULE layout, not {recs.dtype}")
        cdef int64_t d0 = 0
        cdef cnp.ndarray ix_a = rec_selection(idx, n, &m)
        cdef cnp.ndarray d_a = _column(dirs, n, cnp.NPY_UINT8, &d0)
        if m == 0:
            return 0, 0, _EMPTY
        cdef const unsigned char *rb = v.b
        cdef const int64_t *ix = <const int64_t *>_data(ix_a)
        cdef const uint8_t *dv = <const uint8_t *>_data(d_a)
        cdef int64_t *todo = <int64_t *>malloc(m * (sizeof(int64_t) + sizeof(double)))
        if todo == NULL:
            raise MemoryError()
        cdef double *exp = <double *>(todo + m)
        cdef const wire_rule *r
        cdef int32_t j
        cdef ce_entry *c
        cdef double expires
        cdef uint8_t d
        cdef cnp.ndarray todo_a
        try:
            for k in range(m):
                x = k if ix == NULL else ix[k]
                r = <const wire_rule *>&rb[x * sizeof(wire_rule)]
                d = <uint8_t>d0 if dv == NULL else dv[x]
                expires = now + r.lease_ms / 1000.0
                j = self.find(r.proto, r.int_addr, r.int_port, r.ext_addr, r.ext_port, r.rem_addr, r.rem_port)
                if j >= 0:
                    c = &self.e[j]
                    if c.owner == owner and (c.dirs & d) == d:
                        if expires > c.expires:
                            c.expires = expires
                        continue
                todo[t] = x
                exp[t] = expires
                t += 1
            if t == 0:
                return 0, 0, _EMPTY
            todo_a = np.empty(t, np.int64)
            memcpy(cnp.PyArray_DATA(todo_a), todo, t * sizeof(int64_t))
            got_a = _array(install(keep, todo_a, dirs if dv == NULL else d_a), cnp.NPY_INT8)
            if cnp.PyArray_NDIM(got_a) != 1 or got_a.shape[0] != t:
                raise ValueError(f"install answered {got_a.size} entries for {t} records")
            return self._commit(owner, rb, todo, exp, t, <const int8_t *>cnp.PyArray_DATA(got_a), d0, dv, margin)
        finally:
            free(todo)

    cdef tuple _commit(self, int owner, const unsigned char *rb, const int64_t *todo, const double *exp,
                       Py_ssize_t t, const int8_t *got, int64_t d0, const uint8_t *dv, double margin):
        """The records `todo` the builder installed (got > 0) become clones here, or add
        their directions to the clone held: (installed, failed, their indexes)."""
        cdef cnp.ndarray done_a = np.empty(t, np.int64)
        cdef int64_t *done = <int64_t *>cnp.PyArray_DATA(done_a)
        cdef Py_ssize_t k, x
        cdef const wire_rule *r
        cdef int32_t j
        cdef ce_entry *c
        cdef uint8_t d
        cdef double expires
        cdef int installed = 0, failed = 0
        for k in range(t):
            if got[k] <= 0:
                failed += 1
                continue
            x = todo[k]
            done[installed] = x
            installed += 1
            r = <const wire_rule *>&rb[x * sizeof(wire_rule)]
            d = <uint8_t>d0 if dv == NULL else dv[x]
            expires = exp[k]
            j = self.find(r.proto, r.int_addr, r.int_port, r.ext_addr, r.ext_port, r.rem_addr, r.rem_port)
            if j < 0:
                j = self.add(r.proto, r.int_addr, r.int_port, r.ext_addr, r.ext_port, r.rem_addr, r.rem_port)
                c = &self.e[j]
                c.rule_id = r.rule_id
                c.dirs = d
                c.expires = expires
                c.due = expires - margin
                self._set_owner(j, owner)
                heap_push(&self.h, c.due, j)
            else:
                c = &self.e[j]
                c.dirs |= d
                if expires > c.expires:
                    c.expires = expires
        return installed, failed, done_a[:installed] if installed < t else done_a

    def due_now(self, double now, double margin, Py_ssize_t limit=-1):
        """Clones whose lease (less `margin`) ran out by `now`, exactly on time: their
        identities, to drop (at most `limit` of them, and 4 x `limit` timers looked at;
        -1: all).  A clone renewed meanwhile is queued again under its new end; nothing
        else is looked at."""
        cdef list out = []
        cdef double due, end
        cdef int32_t x
        cdef ce_entry *c
        cdef Py_ssize_t work = 4 * limit if limit >= 0 else -1
        while self.h.n and now >= self.h.d[0] and work != 0 and (limit < 0 or len(out) < limit):
            if work > 0:
                work -= 1
            due = self.h.d[0]
            x = self.h.i[0]
            heap_pop(&self.h)
            c = &self.e[x]
            if not c.k.used or c.due != due:
                continue  # dropped (or queued again) since
            end = c.expires - margin
            if now >= end:
                out.append(_sk(c))
            else:
                c.due = end
                heap_push(&self.h, end, x)
        return out

    @property
    def next_due(self):
        """The earliest time queued (inf: none)."""
        return self.h.d[0] if self.h.n else float("inf")

    def extend(self, sk, int owner, double until):
        """A lease renewal from `owner`: 1 extended, 0 not held, -1 held of another owner."""
        p, i, ip, e, ep, r, rp = sk
        cdef int32_t x = self.find(p, i, ip, e, ep, r, rp)
        if x < 0:
            return 0
        if self.e[x].owner != owner:
            return -1
        if until > self.e[x].expires:
            self.e[x].expires = until
        return 1

    def remove(self, sk):
        """Forget a clone: its Clone, or None if not held."""
        p, i, ip, e, ep, r, rp = sk
        cdef int32_t x = self.find(p, i, ip, e, ep, r, rp)
        if x < 0:
            return None
        cdef ce_entry *c = &self.e[x]
        got = Clone((c.owner, c.rule_id, c.dirs, c.expires, c.due))
        self.unlink(x)
        return got

    cdef uint32_t next_gen(self) noexcept:
        """A fresh batch generation (ce_entry.mark): at the wrap every mark is cleared."""
        cdef int32_t x
        self.gen += 1
        if self.gen == 0:
            for x in range(self.s.hw):
                self.e[x].mark = 0
            self.gen = 1
        return self.gen

    cdef int32_t of_entry(self, uint8_t p, uint32_t i, uint16_t ip, uint32_t e, uint16_t ep,
                          uint32_t r, uint16_t rp, uint8_t d) noexcept:
        """The clone a table entry of directions `d` belongs to (-1: none): the one it
        names exactly if that one holds a direction of `d` (or `d` is 0); else (an ICMP
        entry: every field but the remote identifier) the first clone on its external
        endpoint with the same (proto, I, Ip, E, Ep, R) holding one."""
        cdef int32_t x = self.find(p, i, ip, e, ep, r, rp)
        cdef ce_entry *c
        if x >= 0 and (self.e[x].dirs & d or d == 0):
            return x
        x = en_on_endpoint(self.eps, p, e, ep)
        while x >= 0:
            c = &self.e[x]
            if c.k.iaddr == i and c.k.iport == ip and c.k.raddr == r and (c.dirs & d or d == 0):
                return x
            x = c.k.ep_next
        return -1

    def activity(self, act, tick):
        """ACTIVITY records for the clone entries `act` collected from the tables
        (SESSION_DTYPE, ``RuleBuilder.collect_activity``; read in place): each entry
        to its clone (``of_entry``; entries of no clone are left out), the entries of
        one clone merged into one record (the first entry's rule_id, the latest
        last_seen as idle_ms before `tick`, the TCP flags per direction), the records
        grouped by owner (owners ascending, first-seen order within one).  Returns
        (records in the ACTIVITY layout, seq 0; [(owner, first record, records)])."""
        cdef Py_ssize_t n = len(act), k, m = 0
        cdef rec_view v
        keep = rec_view_of(&v, act)
        if n == 0:
            return np.zeros(0, _M.ACTIVITY_DTYPE), []
        fields = act.dtype.fields
        cdef Py_ssize_t o_d = fields["dirs"][1], o_ls = fields["last_seen"][1]
        cdef int64_t t = int(tick)
        cdef int32_t *hit = <int32_t *>malloc(n * (sizeof(int32_t) * 3 + 2))
        if hit == NULL:
            raise MemoryError()
        cdef uint32_t *rid = <uint32_t *>(hit + n)
        cdef uint32_t *seen = rid + n
        cdef uint8_t *to = <uint8_t *>(seen + n)
        cdef uint8_t *ti = to + n
        cdef const unsigned char *b
        cdef uint32_t g = self.next_gen(), ls
        cdef int32_t x, j
        cdef ce_entry *c
        cdef Py_ssize_t cnt[256]
        cdef Py_ssize_t at[256]
        cdef cnp.ndarray out_a
        cdef wire_activity *w
        cdef int64_t idle
        cdef list groups = []
        try:
            for k in range(n):
                b = v.b + k * v.size
                x = self.of_entry(b[v.o_p], rec_u32(b + v.o_i), rec_u16(b + v.o_ip), rec_u32(b + v.o_e),
                                  rec_u16(b + v.o_ep), rec_u32(b + v.o_r), rec_u16(b + v.o_rp), b[o_d])
                if x < 0:
                    continue
                c = &self.e[x]
                ls = rec_u32(b + o_ls)
                if c.mark == g:  # both directions held here: one record, flags kept per direction
                    j = c.out_at
                    if ls > seen[j]:
                        seen[j] = ls
                    to[j] |= _u8o(b, v.o_to)
                    ti[j] |= _u8o(b, v.o_ti)
                    continue
                c.mark, c.out_at = g, m
                hit[m], rid[m], seen[m] = x, rec_u32(b + v.o_rid), ls
                to[m], ti[m] = _u8o(b, v.o_to), _u8o(b, v.o_ti)
                m += 1
            for k in range(256):
                cnt[k] = 0
            for k in range(m):
                cnt[self.e[hit[k]].owner] += 1
            j = 0
            for k in range(256):
                at[k] = j
                if cnt[k]:
                    groups.append((k, j, cnt[k]))
                j += cnt[k]
            out_a = np.zeros(m, _M.ACTIVITY_DTYPE)
            for k in range(m):
                c = &self.e[hit[k]]
                w = <wire_activity *>cnp.PyArray_DATA(out_a) + at[c.owner]
                at[c.owner] += 1
                w.rule_id = rid[k]
                idle = (t - <int64_t>seen[k]) * 1000
                w.idle_ms = 0 if idle < 0 else (0xFFFFFFFF if idle > 0xFFFFFFFF else <uint32_t>idle)
                w.int_addr, w.ext_addr, w.rem_addr = c.k.iaddr, c.k.eaddr, c.k.raddr
                w.int_port, w.ext_port, w.rem_port = c.k.iport, c.k.eport, c.k.rport
                w.proto = c.k.proto
                w.tcp_out, w.tcp_in, w.tcp_flags = to[k], ti[k], to[k] | ti[k]
            return out_a, groups
        finally:
            free(hit)

    def extend_records(self, recs, int owner, double now):
        """A LEASE message's renewals from `owner` (RULE-layout records, read in place):
        each clone held of `owner` keeps its lease until now + the record's lease_ms (if
        later).  Returns (renewed, unknown: not held, misdirected: held of another)."""
        cdef Py_ssize_t n = len(recs), k
        cdef rec_view v
        keep = rec_view_of(&v, recs)
        if n and v.size != sizeof(wire_rule):
            raise TypeError(f"lease records must have the RULE layout, not {recs.dtype}")
        cdef const wire_rule *r
        cdef int32_t x
        cdef double until
        cdef int renewed = 0, unknown = 0, wrong = 0
        for k in range(n):
            r = <const wire_rule *>(v.b + k * sizeof(wire_rule))
            x = self.find(r.proto, r.int_addr, r.int_port, r.ext_addr, r.ext_port, r.rem_addr, r.rem_port)
            if x < 0:
                unknown += 1
            elif self.e[x].owner != owner:
                wrong += 1
            else:
                renewed += 1
                until = now + r.lease_ms / 1000.0
                if until > self.e[x].expires:
                    self.e[x].expires = until
        return renewed, unknown, wrong

    def owned_by(self, recs, int owner):
        """For each record (any layout naming a session, read in place): 1 a clone of
        `owner`'s is held, 0 none, -1 one of another owner (int8)."""
        cdef Py_ssize_t n = len(recs), k
        cdef rec_view v
        keep = rec_view_of(&v, recs)
        cdef cnp.ndarray out_a = np.zeros(n, np.int8)
        cdef int8_t *out = <int8_t *>cnp.PyArray_DATA(out_a)
        cdef const unsigned char *b
        cdef int32_t x
        for k in range(n):
            b = v.b + k * v.size
            x = self.find(b[v.o_p], rec_u32(b + v.o_i), rec_u16(b + v.o_ip), rec_u32(b + v.o_e),
                          rec_u16(b + v.o_ep), rec_u32(b + v.o_r), rec_u16(b + v.o_rp))
            if x >= 0:
                out[k] = 1 if self.e[x].owner == owner else -1
        return out_a

    def remove_records(self, recs, idx=None):
        """Forget the clones the records `recs` (any layout naming a session, read in
        place) selected by `idx` (None: all) name: the ones held, as SESSION_DTYPE
        records (identity, owner, rule_id, dirs), in order."""
        cdef Py_ssize_t n = len(recs), m, k, q = 0
        cdef rec_view v
        keep = rec_view_of(&v, recs)
        cdef cnp.ndarray ix_a = rec_selection(idx, n, &m)
        cdef const int64_t *ix = <const int64_t *>_data(ix_a)
        cdef int32_t *gone = <int32_t *>malloc(max(m, 1) * sizeof(int32_t))
        if gone == NULL:
            raise MemoryError()
        cdef const unsigned char *b
        cdef int32_t x
        cdef ce_entry *c
        cdef cnp.ndarray out_a
        cdef sess_rec *o
        try:
            for k in range(m):
                b = v.b + (k if ix == NULL else ix[k]) * v.size
                x = self.find(b[v.o_p], rec_u32(b + v.o_i), rec_u16(b + v.o_ip), rec_u32(b + v.o_e),
                              rec_u16(b + v.o_ep), rec_u32(b + v.o_r), rec_u16(b + v.o_rp))
                if x >= 0:
                    self.unlink(x)  # the entry's fields stay readable until reused
                    gone[q] = x
                    q += 1
            out_a = np.zeros(q, _SESSION)
            o = <sess_rec *>cnp.PyArray_DATA(out_a)
            for k in range(q):
                c = &self.e[gone[k]]
                o[k].proto, o[k].iaddr, o[k].iport, o[k].eaddr = c.k.proto, c.k.iaddr, c.k.iport, c.k.eaddr
                o[k].eport, o[k].raddr, o[k].rport = c.k.eport, c.k.raddr, c.k.rport
                o[k].owner, o[k].rule_id, o[k].dirs = c.owner, c.rule_id, c.dirs
            return out_a
        finally:
            free(gone)

    # -- lookups ------------------------------------------------------------------------------
    def get(self, sk, default=None):
        try:
            p, i, ip, e, ep, r, rp = sk
        except (TypeError, ValueError):
            return default
        cdef int32_t x = self.find(p, i, ip, e, ep, r, rp)
        if x < 0:
            return default
        cdef ce_entry *c = &self.e[x]
        return Clone((c.owner, c.rule_id, c.dirs, c.expires, c.due))

    def __getitem__(self, sk):
        c = self.get(sk)
        if c is None:
            raise KeyError(sk)
        return c

    def __contains__(self, sk):
        return self.get(sk) is not None

    def __len__(self):
        return self.s.n

    def __bool__(self):
        return self.s.n > 0

    def at(self, proto, eaddr, eport):
        """The clones on one external endpoint: [(sk, Clone)]."""
        cdef list out = []
        cdef int32_t x = en_on_endpoint(self.eps, proto, eaddr, eport)
        cdef ce_entry *c
        while x >= 0:
            c = &self.e[x]
            out.append((_sk(c), Clone((c.owner, c.rule_id, c.dirs, c.expires, c.due))))
            x = c.k.ep_next
        return out

    def of_owner(self, int owner):
        """The clones of one owner's sessions: [(sk, Clone)]."""
        cdef list out = []
        cdef int32_t x = self.own_head[owner]
        cdef ce_entry *c
        while x >= 0:
            c = &self.e[x]
            out.append((_sk(c), Clone((c.owner, c.rule_id, c.dirs, c.expires, c.due))))
            x = c.own_next
        return out

    def owner_records(self, int owner):
        """The clones of one owner's sessions as ACTIVITY records (identity and rule_id;
        seq, idle_ms and the TCP flags 0): a restart report, written in C."""
        if not 0 <= owner < 256:
            return np.zeros(0, _M.ACTIVITY_DTYPE)
        cdef cnp.ndarray out_a = np.zeros(self.own_count[owner], _M.ACTIVITY_DTYPE)
        cdef wire_activity *w = <wire_activity *>cnp.PyArray_DATA(out_a)
        cdef int32_t x = self.own_head[owner]
        cdef Py_ssize_t k = 0, n = len(out_a)
        cdef ce_entry *c
        while x >= 0 and k < n:
            c = &self.e[x]
            w[k].rule_id = c.rule_id
            w[k].int_addr, w[k].ext_addr, w[k].rem_addr = c.k.iaddr, c.k.eaddr, c.k.raddr
            w[k].int_port, w[k].ext_port, w[k].rem_port = c.k.iport, c.k.eport, c.k.rport
            w[k].proto = c.k.proto
            k += 1
            x = c.own_next
        return out_a[:k]

    def owners(self):
        """{owner: number of clones} (owners with any)."""
        return {k: self.own_count[k] for k in range(256) if self.own_count[k]}

    def timers(self):
        """[(due, sk)] queued (an entry whose clone is gone or moved is stale)."""
        cdef int32_t k
        return [(self.h.d[k], _sk(&self.e[self.h.i[k]])) for k in range(self.h.n) if self.e[self.h.i[k]].k.used]

    def items(self):
        """Every clone, [(sk, Clone)]: a walk over the whole table (counted in `walks`)."""
        self.walks += 1
        cdef list out = []
        cdef int32_t x
        cdef ce_entry *c
        for x in range(self.s.hw):
            c = &self.e[x]
            if c.k.used:
                out.append((_sk(c), Clone((c.owner, c.rule_id, c.dirs, c.expires, c.due))))
        return out

    def keys(self):
        return [sk for sk, _ in self.items()]

    def values(self):
        return [c for _, c in self.items()]

    def __iter__(self):
        return iter(self.keys())
