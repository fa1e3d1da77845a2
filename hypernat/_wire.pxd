# cython: language_level=3
"""The wire records between NICs and the coordinator, declared once (hypernat.messages).

Each record type is one packed C struct below; hypernat.messages builds its numpy dtype
from the struct (``_wire.layout(name)``: names, offsets and sizes read from the compiled
struct), so the encoder, the validator and the decoder cannot disagree on a byte.  All
fields are little-endian unsigned integers on the wire; the structs are read in place,
which needs a little-endian host (x86-64, aarch64: ``_wire`` refuses to import elsewhere).

Changing a layout changes the protocol: bump PROTOCOL_VERSION (a peer of another
version is refused at HELLO and counted as ``bad_version``, never parsed).
"""
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t

cdef enum:
    # Version 2: RULE lost timeout_s (40 -> 36 bytes) and ACTIVITY lost packets (40 -> 36):
    # neither was ever written.  HELLO's layout never changes (it carries the version).
    PROTOCOL_VERSION = 2
    MAX_RECORDS = 4096         # records in one message
    N_NACK_REASONS = 7         # messages.NACK_REASONS

# Message type codes (frame 1), declared here only: a cpdef enum, so Python sees them as
# plain ints (hypernat.messages imports them; its _TYPES table names and documents each).
# Codes are part of the protocol: append, never renumber.
cpdef enum:
    T_HELLO = 0x01
    T_HELLO_ACK = 0x02
    T_HEARTBEAT = 0x03
    T_PEERS = 0x04
    T_UNDELIVERABLE = 0x05
    T_STATS = 0x06
    T_QUERY = 0x07
    T_REPLY = 0x08
    T_FETCH = 0x10
    T_RULE = 0x11
    T_NACK = 0x12
    T_PUSH = 0x13
    T_PUSH_ACK = 0x14
    T_LEASE = 0x15
    T_REVOKE = 0x16
    T_REVOKE_ACK = 0x17
    T_ACTIVITY = 0x18
    T_ACTIVITY_ACK = 0x19
    T_BORROW = 0x1A
    T_BORROW_ACK = 0x1B
    T_RETURN = 0x1C
    T_RETURN_ACK = 0x1D

cdef enum:
    # KEY.kind, RULE.flags (the field values the validator reads)
    FETCH_BY_EXTERNAL = 0
    FETCH_BY_INTERNAL = 1
    RULE_F_WILDCARD = 0x0001

    # why a message is dropped: index into _wire.REASONS (same order; checked at import)
    R_OK = -1
    R_BAD_FRAMES = 0
    R_UNKNOWN_TYPE = 1
    R_TRUNCATED = 2
    R_OVERSIZE = 3
    R_BAD_JSON = 4
    R_BAD_VERSION = 5
    R_BAD_IDENTITY = 6
    R_BAD_FIELD = 7
    R_FOREIGN_ENDPOINT = 8
    R_NOT_INTERNAL = 9
    R_WRONG_DIRECTION = 10
    N_REASONS = 11


# FETCH, NACK, REVOKE: names one rule or session
cdef packed struct wire_key:
    uint32_t seq
    uint32_t rule_id
    uint8_t proto
    uint8_t kind
    uint8_t reason
    uint8_t flags
    uint32_t int_addr
    uint32_t ext_addr
    uint32_t rem_addr
    uint16_t int_port
    uint16_t ext_port
    uint16_t rem_port
    uint16_t pad

# RULE, PUSH, LEASE: everything a clone needs
cdef packed struct wire_rule:
    uint32_t seq
    uint32_t rule_id
    uint32_t lease_ms
    uint32_t int_addr
    uint32_t ext_addr
    uint32_t rem_addr
    uint16_t int_port
    uint16_t ext_port
    uint16_t rem_port
    uint16_t owner
    uint8_t proto
    uint8_t tcp_state
    uint16_t flags

# ACTIVITY: clone holder -> owner
cdef packed struct wire_activity:
    uint32_t seq
    uint32_t rule_id
    uint32_t idle_ms
    uint32_t int_addr
    uint32_t ext_addr
    uint32_t rem_addr
    uint16_t int_port
    uint16_t ext_port
    uint16_t rem_port
    uint16_t pad
    uint8_t proto
    uint8_t tcp_flags
    uint8_t tcp_out
    uint8_t tcp_in

# PUSH_ACK, REVOKE_ACK, ACTIVITY_ACK, RETURN_ACK
cdef packed struct wire_ack:
    uint32_t seq
    uint8_t status
    uint8_t reason
    uint16_t pad

# BORROW, BORROW_ACK, RETURN
cdef packed struct wire_block:
    uint32_t seq
    uint32_t addr
    uint16_t port_lo
    uint16_t port_hi
    uint16_t lender
    uint16_t borrower
    uint8_t status
    uint8_t reason
    uint16_t pad
    uint32_t lease_ms

# HELLO, HELLO_ACK
cdef packed struct wire_hello:
    uint16_t version
    uint16_t nic
    uint16_t n_nics
    uint16_t flags
    uint64_t incarnation
    uint32_t heartbeat_ms
    uint32_t pad

# HEARTBEAT
cdef packed struct wire_heartbeat:
    uint32_t seq
    uint32_t pad
    uint64_t incarnation
    uint64_t time_ns

# PEERS
cdef packed struct wire_peer:
    uint16_t nic
    uint16_t state
    uint32_t pad
    uint64_t incarnation

# the first 8 bytes of an UNDELIVERABLE payload (the original payload follows)
cdef packed struct wire_undeliverable:
    uint8_t orig_type
    uint8_t reason
    uint16_t target
    uint32_t pad


# The record size of type `code` (0: no records: JSON, UNDELIVERABLE, unknown).
cdef Py_ssize_t record_size(int code) noexcept nogil
# Header check of a routed or local record message: the type carries records and the
# payload is 1..MAX_RECORDS whole ones (one for HELLO / HELLO_ACK).  R_OK or a reason.
cdef int header_reason(int code, Py_ssize_t nbytes) noexcept nogil
