# cython: language_level=3
"""C interface of hypernat.nat._reuse (see there)."""
from libc.stdint cimport int64_t, uint64_t

from .._fastpath cimport FlowTable
from ._expire cimport Ended


cdef class EndpointReuse:
    cdef Ended *q                    # the reuse-delay FIFO: a ring of ENDED records, oldest at head
    cdef Py_ssize_t head             # ... its first record
    cdef Py_ssize_t n                # ... records queued
    cdef Py_ssize_t cap              # ... room
    cdef FlowTable ix                # endpoint key -> holds and the parked endpoint (the slot's fields:
                                     # see the module docstring)
    cdef readonly Py_ssize_t n_held  # endpoints parked: delay passed, holds remain
    cdef readonly int64_t n_holds    # holds over all endpoints

    cdef int _ring_room(self, Py_ssize_t more) except -1
    cdef int _ix_room(self, Py_ssize_t more) except -1
