# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Clone install, compiled: a batch of other NICs' sessions becomes F_CLONE entries in
this NIC's flow tables, through the tables' C interface (``_fastpath.pxd``), one C
lookup and one C insert per entry, no Python call per row.

``hypernat.clones_py`` is the same operation in plain Python (the reference, used when
the extensions are not built); ``tests/test_clones_twins.py`` checks they agree.
``RuleBuilder.install_clone_rows`` is the one caller (partition lookups, counters).
"""

from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t

from ._fastpath cimport FlowTable, hn_slot

from . import layout as _layout

cdef enum:
    P_ICMP = 1
    P_TCP = 6
    P_UDP = 17
    D_OUT = 1   # rules.DIR_BIT_OUT
    D_IN = 2    # rules.DIR_BIT_IN

cdef uint8_t F_CLONE = _layout.F_CLONE
cdef uint8_t TCP_MASK = _layout.TCP_STATE_MASK


cdef inline int put(FlowTable t, uint8_t p, uint32_t sa, uint16_t sp, uint32_t da, uint16_t dp,
                    uint32_t na, uint16_t np_, uint32_t rid, uint32_t now, uint8_t tcp,
                    uint16_t lease) noexcept:
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


def install_clone_rows(FlowTable out not None, FlowTable inn not None, rows, own, int me,
                       now, lease):
    """Install clone entries for `rows`, tuples ``(proto, iaddr, iport, eaddr, eport,
    raddr, rport, rule_id, dirs, tcp_out, tcp_in)``; `own` the owner NIC of each row's
    external endpoint (this NIC `me` never clones its own).  `now` the tick written as
    last_seen, `lease` the 16-bit lease end (0: none).  Returns ``(got, bad, full)``:
    entries installed per row (a list), rows or entries refused as bad (unknown
    protocol, own endpoint, an owned entry in the way), entries refused because their
    table was full."""
    cdef Py_ssize_t n = len(rows), x
    cdef list got = [0] * n
    cdef uint32_t tick = <uint32_t>(int(now) & 0xFFFFFFFF)
    cdef uint16_t l16 = <uint16_t>int(lease)
    cdef uint8_t p, d, to, ti
    cdef uint32_t i, e, r, rid
    cdef uint16_t ip, ep, rp
    cdef int bad = 0, full = 0, k, g
    out._mutating()
    inn._mutating()
    for x in range(n):
        p, i, ip, e, ep, r, rp, rid, d, to, ti = rows[x]
        if (p != P_TCP and p != P_UDP and p != P_ICMP) or own[x] == me:
            bad += 1
            continue
        g = 0
        if d & D_OUT:  # out key (I, Ip, R, Rp); ICMP query: the identifier in both ports
            k = put(out, p, i, ip, r, ip if p == P_ICMP else rp, e, ep, rid, tick, to & TCP_MASK, l16)
            if k > 0:
                g += 1
            elif k == 0:
                bad += 1
            else:
                full += 1
        if d & D_IN:  # in key (R, Rp, E, Ep); ICMP query: the translated identifier in both
            k = put(inn, p, r, ep if p == P_ICMP else rp, e, ep, i, ip, rid, tick, ti & TCP_MASK, l16)
            if k > 0:
                g += 1
            elif k == 0:
                bad += 1
            else:
                full += 1
        got[x] = g
    return got, bad, full
