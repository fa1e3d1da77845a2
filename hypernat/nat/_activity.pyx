# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The owner's side of ACTIVITY, compiled: a clone holder's reports of the sessions it
translated fold into the owner's own entries (``RuleBuilder.merge_activity``).

Per record (``records.SESSION_DTYPE``, the owner's view), for each direction in its
``dirs`` (0: both): the owner's entry of that direction, found by the session's key, if
it is the owner's (not a clone) and still translates to the reported endpoint, gets
``last_seen = max(last_seen, reported)`` and ``tcp_state |= reported bits``.  Unknown
sessions (expired here) are passed over: the agent revokes their leases.

One C lookup per direction and record over the compiled flow tables (their .pxd), no
Python object per record; over another FlowTable implementation (the plain-Python
reference, fastpath_py) the same rule through its ``lookup`` and slot arrays.
"""

cimport numpy as cnp
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t

import numpy as np

from .._fastpath cimport FlowTable, hn_slot
from ._records cimport sess_rec

from .. import layout as _layout
from .._fastpath import FlowTable as _FlowTable
from .records import DIR_BIT_IN, DIR_BIT_OUT, SESSION_DTYPE, record_keys

cnp.import_array()

cdef uint8_t F_CLONE = _layout.F_CLONE
cdef uint8_t TCP_MASK = _layout.TCP_STATE_MASK
cdef uint8_t D_OUT = DIR_BIT_OUT
cdef uint8_t D_IN = DIR_BIT_IN
cdef uint8_t P_ICMP = _layout.PROTO_ICMP


if sizeof(sess_rec) != SESSION_DTYPE.itemsize:
    raise ImportError("hypernat.nat._activity: sess_rec does not match records.SESSION_DTYPE")


cdef inline bint _fold(hn_slot *s, uint32_t ls, uint8_t tcp) noexcept nogil:
    if ls > s.last_seen:
        s.last_seen = ls
    s.tcp_state |= tcp & TCP_MASK
    return True


def merge_activity(out, inn, records):
    """Fold ACTIVITY records (SESSION_DTYPE) into the owner's entries of `out` / `inn`
    (see the module doc).  Returns the sessions updated."""
    cdef cnp.ndarray a = np.ascontiguousarray(np.asarray(records).reshape(-1))
    if a.dtype != SESSION_DTYPE:
        raise TypeError(f"activity records must be records.SESSION_DTYPE, not {a.dtype}")
    if not (type(out) is _FlowTable and type(inn) is _FlowTable):
        return _merge_reference(out, inn, a)
    cdef FlowTable o = out, i = inn
    o._mutating()
    i._mutating()
    cdef const sess_rec *r = <const sess_rec *>cnp.PyArray_DATA(a)
    cdef Py_ssize_t n = a.shape[0], x
    cdef int64_t j
    cdef hn_slot *s
    cdef uint8_t d
    cdef uint16_t ok_dp, ik_sp
    cdef bint hit
    cdef Py_ssize_t updated = 0
    with nogil:
        for x in range(n):
            d = r[x].dirs if r[x].dirs else D_OUT | D_IN
            # the session's keys (records.out_key / in_key: ICMP's identifier in both ports)
            ok_dp = r[x].iport if r[x].proto == P_ICMP else r[x].rport
            ik_sp = r[x].eport if r[x].proto == P_ICMP else r[x].rport
            hit = False
            if d & D_OUT:
                j = o.c_find(r[x].proto, r[x].iaddr, r[x].iport, r[x].raddr, ok_dp)
                if j >= 0:
                    s = o.c_slot(j)
                    if not s.flags & F_CLONE and s.new_addr == r[x].eaddr and s.new_port == r[x].eport:
                        hit = _fold(s, r[x].last_seen, r[x].tcp_out)
            if d & D_IN:
                j = i.c_find(r[x].proto, r[x].raddr, ik_sp, r[x].eaddr, r[x].eport)
                if j >= 0:
                    s = i.c_slot(j)
                    if not s.flags & F_CLONE and s.new_addr == r[x].iaddr:
                        hit = _fold(s, r[x].last_seen, r[x].tcp_in) or hit
            updated += hit
    return updated


def _merge_reference(out, inn, recs):
    """``merge_activity`` over another FlowTable implementation (lookup + slot arrays)."""
    n = 0
    so, si = out.slots, inn.slots
    for rec in recs:
        ok, ik = record_keys(rec)
        d = int(rec["dirs"]) or (DIR_BIT_OUT | DIR_BIT_IN)
        ls = int(rec["last_seen"])
        hit = False
        if d & DIR_BIT_OUT:
            j = out.lookup(*ok)
            if (j >= 0 and not so["flags"][j] & _layout.F_CLONE and so["new_addr"][j] == rec["eaddr"]
                    and so["new_port"][j] == rec["eport"]):
                if ls > so["last_seen"][j]:
                    so["last_seen"][j] = ls
                so["tcp_state"][j] |= int(rec["tcp_out"]) & _layout.TCP_STATE_MASK
                hit = True
        if d & DIR_BIT_IN:
            j = inn.lookup(*ik)
            if j >= 0 and not si["flags"][j] & _layout.F_CLONE and si["new_addr"][j] == rec["iaddr"]:
                if ls > si["last_seen"][j]:
                    si["last_seen"][j] = ls
                si["tcp_state"][j] |= int(rec["tcp_in"]) & _layout.TCP_STATE_MASK
                hit = True
        n += hit
    return n
