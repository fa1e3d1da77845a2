# cython: language_level=3
"""C interface of hypernat.nat._expire (see there)."""
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t

from ._events cimport EventRing
from ._hosts cimport Hosts
from ._mappings cimport Mappings
from ._ports cimport PortBlocks


from ._records cimport sess_rec  # SESSION_DTYPE


cdef packed struct Ended:     # ENDED_DTYPE: an endpoint into the reuse delay
    int64_t release_at
    int64_t ekey          # proto << 48 | E << 16 | Ep
    int64_t block
    int32_t pidx
    int32_t offset        # Ep - the block's first port


cdef class SessionEnd:
    cdef readonly Mappings maps
    cdef readonly Hosts hosts
    cdef readonly PortBlocks blocks
    cdef readonly EventRing events   # "remove" events: MAPPING (local mode), SESSION (remote)
    cdef public bint revoke          # record REVOKE records (RuleBuilder.track_removed)
    cdef public int64_t reuse_delay
    cdef public uint8_t nic
    cdef Ended* e                    # ended mappings' endpoints (the reuse delay)
    cdef Py_ssize_t ne, ecap
    cdef sess_rec* r                  # REVOKE records
    cdef Py_ssize_t nr, rcap
    cdef int end_c(self, uint32_t rid, uint32_t ra, uint16_t rp, int64_t now, uint32_t last, uint8_t so,
                   uint8_t si) except -2
