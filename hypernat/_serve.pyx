# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Fetch serving, compiled: a batch of FETCH records (messages.KEY_DTYPE) becomes the
builder's lookup rows, one call of the builder's ``serve_fetch_rows`` (the owner's
sessions: find, admit or allocate), and the RULE records of the answered ones, written
in C into one RULE_DTYPE array.  One implementation for one record and for thousands.

``hypernat.clones_py.serve_fetches`` is the plain-Python reference (no extensions).
"""
cimport numpy as cnp
from libc.stdint cimport uint8_t, uint16_t, uint32_t

from ._wire cimport wire_key, wire_rule

import numpy as np

from . import layout as _layout
from . import messages as _M

cnp.import_array()

# wire_key / wire_rule: the records as _wire.pxd declares them (messages.KEY_DTYPE and
# RULE_DTYPE are read from these structs)
if _M.KEY_DTYPE.itemsize != sizeof(wire_key) or _M.RULE_DTYPE.itemsize != sizeof(wire_rule):
    raise ImportError("hypernat._serve disagrees with hypernat/_wire.pxd: rebuild it")

cdef uint8_t BY_EXT = _M.FETCH_BY_EXTERNAL
cdef uint8_t LOOKUP_ONLY = _M.FETCH_F_ICMP_ERROR | _M.FETCH_F_REVALIDATE
cdef uint8_t KIND_ICMP = _layout.KIND_ICMP_ERROR
cdef uint8_t D_OUT = 0  # verdicts.OUT
cdef uint8_t D_IN = 1   # verdicts.IN
_RULE_DTYPE = _M.RULE_DTYPE


def serve_fetches(recs, serve_rows, tick, int nic, uint32_t lease_ms):
    """Serve FETCH records `recs` (KEY_DTYPE, validated) with ``serve_rows(rows, tick)``
    (``RuleBuilder.serve_fetch_rows``).  Returns (RULE records of the answered ones in
    order, indices of the refused ones, their builder status)."""
    cdef cnp.ndarray a = np.ascontiguousarray(recs)
    if a.dtype != _M.KEY_DTYPE:
        raise TypeError("FETCH records must be messages.KEY_DTYPE")
    cdef const wire_key *k = <const wire_key *>cnp.PyArray_DATA(a)
    cdef Py_ssize_t n = a.shape[0], x, m = 0
    cdef list rows = []
    cdef uint8_t kind
    for x in range(n):
        kind = KIND_ICMP if k[x].flags & LOOKUP_ONLY else 0
        if k[x].kind == BY_EXT:  # (p, R, Rp, E, Ep)
            rows.append((D_IN, k[x].rem_addr, k[x].ext_addr, k[x].rem_port, k[x].ext_port, k[x].proto, kind, 0, 0))
        else:  # (p, I, Ip, R, Rp)
            rows.append((D_OUT, k[x].int_addr, k[x].rem_addr, k[x].int_port, k[x].rem_port, k[x].proto, kind, 0, 0))
    res = serve_rows(rows, tick)
    cdef list bad = []
    cdef list bad_status = []
    cdef cnp.ndarray out = np.zeros(n, _RULE_DTYPE)
    cdef wire_rule *r = <wire_rule *>cnp.PyArray_DATA(out)
    cdef uint32_t ia, ea, ra
    cdef uint16_t ip, ep, rp
    cdef uint8_t proto, t_out, t_in
    for x in range(n):
        st, s = res[x]
        if st != 0:
            bad.append(x)
            bad_status.append(st)
            continue
        # SESSION_DTYPE order: iaddr eaddr raddr iport eport rport proto dirs rule_id last_seen tcp_out tcp_in ...
        ia, ea, ra, ip, ep, rp, proto = s[0], s[1], s[2], s[3], s[4], s[5], s[6]
        t_out, t_in = s[10], s[11]
        r[m].seq = k[x].seq
        r[m].rule_id = s[8]
        r[m].lease_ms = lease_ms
        r[m].int_addr, r[m].ext_addr, r[m].rem_addr = ia, ea, ra
        r[m].int_port, r[m].ext_port, r[m].rem_port = ip, ep, rp
        r[m].owner = nic
        r[m].proto = proto
        r[m].tcp_state = t_out | t_in
        m += 1
    return out[:m], bad, bad_status
