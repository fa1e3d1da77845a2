# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The wire records' layouts (``_wire.pxd``) and the validation of a whole message, compiled.

``check(code, payload, ...)`` reads the records in place (one pass per rule, in C) and
returns ``R_OK`` (-1) or the index of the reason in ``REASONS``; with ``counts`` (a
uint64 array of ``len(REASONS)``) it also counts the drop there.  It never raises on
bytes.  The partition and internal-prefix predicates run after every field check
passed: the daemons' are compiled (``Owns`` over ``hypernat._geometry.Geometry``, the
partition's geometry with its loans; ``hypernat._geometry.Prefixes``) and answered in C
record by record; any other callable is called once per message with the records that
need it (``_ask``).  ``header_reason`` is the part a router needs: whole records, not
too many.

hypernat.messages is the Python face of this module (types, dtypes, Decoded); the
plain-Python reference of ``check`` lives in tests/wire_model.py and the tests hold the
two to the same verdicts.
"""
import sys

import numpy as np

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memset

from ._geometry cimport Geometry, Prefixes

if sys.byteorder != "little":
    raise ImportError("hypernat._wire reads the little-endian wire records in place: a little-endian host only")

# (name, help): why a message is dropped, declared once in hypernat/wire_reasons.py (the
# R_* enum is generated from it); the index is the R_* number.  messages.REASONS re-exports them.
from . import wire_reasons as _wire_reasons

REASONS = _wire_reasons.REASONS
if len(REASONS) != N_REASONS:
    raise ImportError("hypernat._wire was built from another hypernat/wire_reasons.py: rebuild it")

# Python-visible copies of the .pxd's constants (hypernat.messages re-exports them)
PROTOCOL_VERSION_ = PROTOCOL_VERSION
MAX_RECORDS_ = MAX_RECORDS
N_NACK_REASONS_ = N_NACK_REASONS
FETCH_BY_EXTERNAL_ = FETCH_BY_EXTERNAL
FETCH_BY_INTERNAL_ = FETCH_BY_INTERNAL
RULE_F_WILDCARD_ = RULE_F_WILDCARD
OK = R_OK

# ---------------------------------------------------------------------------- layouts


cdef list _fields_of(unsigned char* p, Py_ssize_t size, convert):
    """[(name, offset, size)] of a struct of `size` bytes at `p`, read from the compiled
    struct itself: poke one byte at a time and see which field (as Cython converts the
    struct to a dict, in declaration order) changed."""
    cdef Py_ssize_t b
    names = list(convert().keys())
    span = {}
    for b in range(size):
        memset(p, 0, size)
        p[b] = 1
        hit = [k for k, v in convert().items() if v]
        if len(hit) != 1:
            raise ImportError(f"hypernat._wire: byte {b} belongs to {len(hit)} fields")
        lo, hi = span.get(hit[0], (b, b))
        span[hit[0]] = (min(lo, b), max(hi, b))
    out = [(n, span[n][0], span[n][1] - span[n][0] + 1) for n in names]
    if sum(s for _, _, s in out) != size:
        raise ImportError("hypernat._wire: a struct has bytes no field covers")
    return out


cdef wire_key _k
cdef wire_rule _r
cdef wire_activity _a
cdef wire_ack _ack
cdef wire_block _b
cdef wire_hello _h
cdef wire_heartbeat _hb
cdef wire_peer _p
cdef wire_undeliverable _u


def layouts():
    """{layout name: (sizeof, [(field, offset, size), ...])}, from the compiled structs."""
    return {
        "KEY": (sizeof(wire_key), _fields_of(<unsigned char*>&_k, sizeof(wire_key), lambda: _k)),
        "RULE": (sizeof(wire_rule), _fields_of(<unsigned char*>&_r, sizeof(wire_rule), lambda: _r)),
        "ACTIVITY": (sizeof(wire_activity), _fields_of(<unsigned char*>&_a, sizeof(wire_activity), lambda: _a)),
        "ACK": (sizeof(wire_ack), _fields_of(<unsigned char*>&_ack, sizeof(wire_ack), lambda: _ack)),
        "BLOCK": (sizeof(wire_block), _fields_of(<unsigned char*>&_b, sizeof(wire_block), lambda: _b)),
        "HELLO": (sizeof(wire_hello), _fields_of(<unsigned char*>&_h, sizeof(wire_hello), lambda: _h)),
        "HEARTBEAT": (sizeof(wire_heartbeat), _fields_of(<unsigned char*>&_hb, sizeof(wire_heartbeat), lambda: _hb)),
        "PEER": (sizeof(wire_peer), _fields_of(<unsigned char*>&_p, sizeof(wire_peer), lambda: _p)),
        "UNDELIVERABLE": (sizeof(wire_undeliverable),
                          _fields_of(<unsigned char*>&_u, sizeof(wire_undeliverable), lambda: _u)),
    }


cdef Py_ssize_t record_size(int code) noexcept nogil:
    if code == T_FETCH or code == T_NACK or code == T_REVOKE:
        return sizeof(wire_key)
    if code == T_RULE or code == T_PUSH or code == T_LEASE:
        return sizeof(wire_rule)
    if code == T_ACTIVITY:
        return sizeof(wire_activity)
    if code == T_PUSH_ACK or code == T_REVOKE_ACK or code == T_ACTIVITY_ACK or code == T_RETURN_ACK:
        return sizeof(wire_ack)
    if code == T_BORROW or code == T_BORROW_ACK or code == T_RETURN:
        return sizeof(wire_block)
    if code == T_HELLO or code == T_HELLO_ACK:
        return sizeof(wire_hello)
    if code == T_HEARTBEAT:
        return sizeof(wire_heartbeat)
    if code == T_PEERS:
        return sizeof(wire_peer)
    return 0


cdef int header_reason(int code, Py_ssize_t nbytes) noexcept nogil:
    cdef Py_ssize_t size = record_size(code)
    if size == 0:
        return R_UNKNOWN_TYPE
    if nbytes <= 0 or nbytes % size:
        return R_TRUNCATED
    if nbytes // size > MAX_RECORDS:
        return R_OVERSIZE
    if (code == T_HELLO or code == T_HELLO_ACK) and nbytes != size:
        return R_TRUNCATED
    return R_OK


def header(int code, Py_ssize_t nbytes):
    """``header_reason`` for Python: R_OK (-1) or the reason's index."""
    return header_reason(code, nbytes)


# ---------------------------------------------------------------------------- checks


cdef inline bint _proto_ok(uint8_t p) noexcept nogil:
    return p == 1 or p == 6 or p == 17


# -------------------------------------------------------------- the predicates
# `owns` (is an external endpoint NIC k's?) and `internal` (is an address internal?) are
# the daemons' compiled objects below, answered in C record by record: ``Owns`` over the
# partition's geometry and its loans (hypernat._geometry, the one definition
# hypernat.nat's setup reads too), ``Prefixes`` (hypernat._geometry) for the internal
# prefixes.  Any other callable (tests, tools) is the Python form: ``owns(nic, addrs,
# ports)`` / ``internal(addrs)`` over numpy arrays -> bools, asked once per message.

cdef enum:
    OWNS_NOW = 0           # the NIC holds the endpoint's block now (loans applied)
    OWNS_NATIVE = 1        # the block is in the NIC's own space by the strategy (loans ignored)
    OWNS_NOW_OR_NATIVE = 2

_OWNS_MODES = {"now": OWNS_NOW, "native": OWNS_NATIVE, "now-or-native": OWNS_NOW_OR_NATIVE}


cdef class Owns:
    """Owns(geometry, mode="now"): the partition predicate ``check`` answers in C.
    `geometry` a ``hypernat._geometry.Geometry`` (``Partition.geometry``: it follows the
    partition's loans); `mode` "now" (the NIC holds the endpoint's block now, loans
    applied: RULE, PUSH, LEASE, REVOKE, ACTIVITY), "native" (the block is in the NIC's own
    space, whatever the loans say: RETURN), "now-or-native" (either: a FETCH may be for a
    block the receiver lent and the asker missed the loan).  Callable as the Python form
    too (``owns(nic, addrs, ports)`` -> bools)."""

    cdef readonly Geometry geometry
    cdef int mode

    def __init__(self, Geometry geometry not None, str mode="now"):
        if mode not in _OWNS_MODES:
            raise ValueError(f"unknown ownership mode {mode!r} (one of {', '.join(_OWNS_MODES)})")
        self.geometry, self.mode = geometry, _OWNS_MODES[mode]

    cdef inline bint has(self, int nic, uint32_t a, uint32_t p) noexcept nogil:
        cdef int64_t g = self.geometry.block_c(a, p)
        if g < 0:
            return False
        if self.mode == OWNS_NOW:
            return self.geometry.holder_c(g) == nic
        if self.mode == OWNS_NATIVE:
            return self.geometry.native_c(g) == nic
        return self.geometry.holder_c(g) == nic or self.geometry.native_c(g) == nic

    def __call__(self, int nic, addrs, ports):
        a = np.asarray(addrs, dtype=np.int64).ravel()
        p = np.asarray(ports, dtype=np.int64).ravel()
        out = np.zeros(a.shape[0], dtype=bool)
        for i in range(a.shape[0]):
            out[i] = 0 <= a[i] <= 0xFFFFFFFF and 0 <= p[i] <= 65535 and self.has(nic, <uint32_t>a[i], <uint32_t>p[i])
        return out


cdef bint _ask(pred, int nic, const uint32_t* addrs, const uint16_t* ports, Py_ssize_t n) except -1:
    """The Python form of a predicate holds for every record: ``pred(nic, addrs, ports)``
    (numpy arrays) -> bools, or ``pred(addrs)`` when `ports` is NULL.  A predicate that
    raises rejects the message (a bug in it must neither crash a daemon nor let a
    message in)."""
    try:
        a = np.frombuffer(PyBytes_FromStringAndSize(<const char*>addrs, n * sizeof(uint32_t)), np.uint32)
        if ports == NULL:
            got = pred(a)
        else:
            got = pred(nic, a, np.frombuffer(PyBytes_FromStringAndSize(<const char*>ports, n * sizeof(uint16_t)),
                                             np.uint16))
        return bool(np.all(np.asarray(got, dtype=bool)))
    except Exception:  # noqa: BLE001
        return False


cdef bint _owned(owns, int nic, const uint32_t* a, const uint16_t* p, Py_ssize_t n) except -1:
    """Every endpoint (a[i], p[i]) is NIC `nic`'s by `owns`."""
    cdef Owns o
    cdef Py_ssize_t i
    if isinstance(owns, Owns):
        o = <Owns>owns
        for i in range(n):
            if not o.has(nic, a[i], p[i]):
                return False
        return True
    return _ask(owns, nic, a, p, n)


cdef bint _inside(internal, const uint32_t* a, Py_ssize_t n) except -1:
    """Every address a[i] is internal by `internal`."""
    cdef Prefixes x
    cdef Py_ssize_t i
    if isinstance(internal, Prefixes):
        x = <Prefixes>internal
        for i in range(n):
            if not x.has_c(a[i]):
                return False
        return True
    return _ask(internal, -1, a, NULL, n)


# the columns a predicate reads, gathered from the records (on the stack: at most
# MAX_RECORDS records a message)
cdef struct _Cols:
    uint32_t a[MAX_RECORDS]
    uint16_t p[MAX_RECORDS]
    uint16_t q[MAX_RECORDS]


ctypedef fused _ends_rec:
    wire_rule
    wire_activity


cdef int _check_ends(const _ends_rec* r, Py_ssize_t n, int nic, owns, internal, _Cols* c) except -2:
    """RULE / PUSH / LEASE and ACTIVITY: every record's external endpoint is NIC `nic`'s
    (when `nic` is known: the sender of a RULE, the receiver of an ACTIVITY) and its
    internal address is internal."""
    cdef Py_ssize_t i
    if owns is not None and nic >= 0:
        for i in range(n):
            c.a[i], c.p[i] = r[i].ext_addr, r[i].ext_port
        if not _owned(owns, nic, c.a, c.p, n):
            return R_FOREIGN_ENDPOINT
    if internal is not None:
        for i in range(n):
            c.a[i] = r[i].int_addr
        if not _inside(internal, c.a, n):
            return R_NOT_INTERNAL
    return R_OK


cdef int _check_rule(const wire_rule* r, Py_ssize_t n, int sender, owns, internal, _Cols* c) except -2:
    cdef Py_ssize_t i
    for i in range(n):
        if not _proto_ok(r[i].proto):
            return R_BAD_FIELD
    if sender >= 0:
        for i in range(n):
            if r[i].owner != sender:
                return R_BAD_IDENTITY
    for i in range(n):
        if r[i].proto != 1 and (r[i].ext_port == 0 or r[i].int_port == 0):
            return R_BAD_FIELD  # ICMP echo ids may be 0; TCP/UDP ports may not
        if r[i].rem_addr == 0 and not (r[i].flags & RULE_F_WILDCARD):
            return R_BAD_FIELD  # a session without a remote
    return _check_ends(r, n, sender, owns, internal, c)


cdef int _check_key(int code, const wire_key* k, Py_ssize_t n, int sender, int receiver, owns, internal,
                    _Cols* c) except -2:
    cdef Py_ssize_t i, m
    for i in range(n):
        if not _proto_ok(k[i].proto):
            return R_BAD_FIELD
    for i in range(n):
        if k[i].kind != FETCH_BY_EXTERNAL and k[i].kind != FETCH_BY_INTERNAL:
            return R_BAD_FIELD
        if code == T_NACK and k[i].reason >= N_NACK_REASONS:
            return R_BAD_FIELD
        if k[i].proto != 1:
            if (k[i].ext_port if k[i].kind == FETCH_BY_EXTERNAL else k[i].int_port) == 0:
                return R_BAD_FIELD
    if owns is not None and ((code == T_REVOKE and sender >= 0) or (code == T_FETCH and receiver >= 0)):
        m = 0
        for i in range(n):  # REVOKE: every record; FETCH: those by external endpoint
            if code == T_REVOKE or k[i].kind == FETCH_BY_EXTERNAL:
                c.a[m], c.p[m] = k[i].ext_addr, k[i].ext_port
                m += 1
        # a REVOKE names the sender's endpoints; a FETCH by external endpoint the receiver's
        if m and not _owned(owns, sender if code == T_REVOKE else receiver, c.a, c.p, m):
            return R_FOREIGN_ENDPOINT
    if internal is not None and code == T_FETCH:
        m = 0
        for i in range(n):
            if k[i].kind == FETCH_BY_INTERNAL:
                c.a[m] = k[i].int_addr
                m += 1
        if m and not _inside(internal, c.a, m):
            return R_NOT_INTERNAL
    return R_OK


cdef int _check_activity(const wire_activity* r, Py_ssize_t n, int receiver, owns, internal, _Cols* c) except -2:
    cdef Py_ssize_t i
    for i in range(n):
        if not _proto_ok(r[i].proto):
            return R_BAD_FIELD
    for i in range(n):
        if r[i].proto != 1 and r[i].ext_port == 0:
            return R_BAD_FIELD
    return _check_ends(r, n, receiver, owns, internal, c)


cdef int _check_block(int code, const wire_block* b, Py_ssize_t n, int sender, int receiver, owns,
                      int n_nics, _Cols* c) except -2:
    cdef Py_ssize_t i
    for i in range(n):
        if b[i].port_lo > b[i].port_hi:
            return R_BAD_FIELD
    if n_nics >= 0:
        for i in range(n):
            if b[i].lender >= n_nics or b[i].borrower >= n_nics:
                return R_BAD_FIELD
    if sender >= 0:  # the borrower asks and returns; the lender answers
        for i in range(n):
            if (b[i].lender if code == T_BORROW_ACK else b[i].borrower) != sender:
                return R_BAD_IDENTITY
    if owns is not None and code == T_RETURN and receiver >= 0:
        for i in range(n):
            if b[i].addr == 0:
                return R_BAD_FIELD
        # a returned block belongs to its lender's partition: both ends inside it
        for i in range(n):
            c.a[i], c.p[i], c.q[i] = b[i].addr, b[i].port_lo, b[i].port_hi
        if not (_owned(owns, receiver, c.a, c.p, n) and _owned(owns, receiver, c.a, c.q, n)):
            return R_FOREIGN_ENDPOINT
    return R_OK


cdef int _check_hello(int code, const wire_hello* h, int sender, int n_nics) noexcept nogil:
    if h.version != PROTOCOL_VERSION:
        return R_BAD_VERSION
    if code == T_HELLO and sender >= 0 and h.nic != sender:
        return R_BAD_IDENTITY
    if n_nics >= 0 and h.nic >= n_nics:
        return R_BAD_FIELD
    return R_OK


cdef int _check_peers(const wire_peer* p, Py_ssize_t n, int n_nics) noexcept nogil:
    cdef Py_ssize_t i
    if n_nics >= 0:
        for i in range(n):
            if p[i].nic >= n_nics:
                return R_BAD_FIELD
    return R_OK


cdef int _check(int code, const unsigned char* p, Py_ssize_t nbytes, int sender, int receiver, owns, internal,
                int n_nics) except -2:
    cdef int reason = header_reason(code, nbytes)
    cdef Py_ssize_t n
    cdef _Cols c
    if reason != R_OK:
        return reason
    n = nbytes // record_size(code)
    if code == T_RULE or code == T_PUSH or code == T_LEASE:
        return _check_rule(<const wire_rule*>p, n, sender, owns, internal, &c)
    if code == T_FETCH or code == T_NACK or code == T_REVOKE:
        return _check_key(code, <const wire_key*>p, n, sender, receiver, owns, internal, &c)
    if code == T_ACTIVITY:
        return _check_activity(<const wire_activity*>p, n, receiver, owns, internal, &c)
    if code == T_BORROW or code == T_BORROW_ACK or code == T_RETURN:
        return _check_block(code, <const wire_block*>p, n, sender, receiver, owns, n_nics, &c)
    if code == T_HELLO or code == T_HELLO_ACK:
        return _check_hello(code, <const wire_hello*>p, sender, n_nics)
    if code == T_PEERS:
        return _check_peers(<const wire_peer*>p, n, n_nics)
    return R_OK  # ACK and HEARTBEAT records: any content is well formed


def check(int code, payload, int sender=-1, int receiver=-1, owns=None, internal=None, int n_nics=-1,
          counts=None):
    """Validate the record message of type `code` (``payload``: bytes or any contiguous
    buffer) from NIC `sender` to NIC `receiver` (-1: the coordinator / not known); R_OK
    (-1) or the index of the reason in REASONS, counted in ``counts[reason]`` when
    given.  Checks, in order: the type carries records; 1..MAX_RECORDS whole records
    (one HELLO); every field in range (protocol TCP / UDP / ICMP, FETCH kind, NACK
    reason, non-zero ports, a remote unless wildcard, NIC numbers below `n_nics`); the
    NIC a record names is its sender (RULE owner, BORROW borrower, BORROW_ACK lender,
    HELLO nic); HELLO's version; then `owns` (external endpoints in the sender's
    partition for RULE / PUSH / LEASE / REVOKE, in the receiver's for FETCH by external
    endpoint, ACTIVITY and RETURN) and `internal` (internal addresses).  A message is
    valid or dropped whole.  Never raises on bytes."""
    cdef int reason
    cdef uint64_t[::1] cv
    try:
        reason = _checked(code, payload, sender, receiver, owns, internal, n_nics)
    except Exception:  # noqa: BLE001 - belt and braces: a bug here must not kill a daemon
        reason = R_BAD_FIELD
    if reason != R_OK and counts is not None:
        cv = counts
        cv[reason] += 1
    return reason


cdef int _checked(int code, payload, int sender, int receiver, owns, internal, int n_nics) except -2:
    cdef Py_buffer view
    cdef int reason
    if type(payload) is bytes:
        reason = _check(code, <const unsigned char*>PyBytes_AS_STRING(payload), PyBytes_GET_SIZE(payload),
                        sender, receiver, owns, internal, n_nics)
    else:
        try:
            PyObject_GetBuffer(payload, &view, PyBUF_SIMPLE)
        except (TypeError, BufferError, ValueError):
            reason = R_TRUNCATED
        else:
            try:
                reason = _check(code, <const unsigned char*>view.buf, view.len, sender, receiver, owns, internal,
                                n_nics)
            finally:
                PyBuffer_Release(&view)
    return reason
