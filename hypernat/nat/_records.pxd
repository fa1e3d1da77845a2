# cython: language_level=3
"""``records.SESSION_DTYPE`` (hypernat/nat/records.py) as a C struct: one definition for
every compiled module that reads or writes session records in place (the clone and
lease tables, the activity merge, expiry's REVOKE records).  Each checks
``sizeof(sess_rec) == SESSION_DTYPE.itemsize`` at import."""
from libc.stdint cimport uint8_t, uint16_t, uint32_t


cdef packed struct sess_rec:
    uint32_t iaddr
    uint32_t eaddr
    uint32_t raddr
    uint16_t iport
    uint16_t eport
    uint16_t rport
    uint8_t proto
    uint8_t dirs
    uint32_t rule_id
    uint32_t last_seen
    uint8_t tcp_out
    uint8_t tcp_in
    uint8_t owner
    uint8_t flags
