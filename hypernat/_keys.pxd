# cython: language_level=3
"""``layout.KEY_DTYPE`` and ``layout.FETCH_ROW_DTYPE`` (hypernat/layout.py) as C structs:
one definition for the compiled modules that read or write them in place (the setup of a
batch's misses, ``hypernat.nat._mappings``; the holder's fetch table,
``hypernat.agent._pending``).  Each checks them against the dtypes at import
(``keys_check``)."""
from libc.stdint cimport int32_t, uint8_t, uint16_t, uint32_t


cdef packed struct hn_key16:    # layout.KEY_DTYPE: one frame's lookup key
    uint32_t saddr
    uint32_t daddr
    uint16_t sport
    uint16_t dport
    uint8_t proto
    uint8_t kind
    uint8_t tcp_flags
    uint8_t icmp_type


cdef packed struct fetch_row:   # layout.FETCH_ROW_DTYPE: one fetch a batch's misses start
    uint32_t saddr              # the key, oriented like fetch_dir's table
    uint32_t daddr
    uint16_t sport
    uint16_t dport
    uint8_t proto
    uint8_t kind                # KIND_PLAIN / KIND_ICMP_ERROR
    uint8_t tcp_flags
    uint8_t fetch_dir           # verdicts.OUT / IN
    int32_t frame               # the frame's index in its batch
    int32_t owner               # the NIC asked


cdef inline int keys_check(str module) except -1:
    """ImportError unless both structs match their dtypes, field for field."""
    from hypernat import layout
    cdef list want = [(layout.KEY_DTYPE, sizeof(hn_key16), [
        ("saddr", 0), ("daddr", 4), ("sport", 8), ("dport", 10), ("proto", 12), ("kind", 13), ("tcp_flags", 14),
        ("icmp_type", 15)]), (layout.FETCH_ROW_DTYPE, sizeof(fetch_row), [
        ("saddr", 0), ("daddr", 4), ("sport", 8), ("dport", 10), ("proto", 12), ("kind", 13), ("tcp_flags", 14),
        ("fetch_dir", 15), ("frame", 16), ("owner", 20)])]
    for dt, size, fields in want:
        if dt.itemsize != size or [(f, dt.fields[f][1]) for f, _ in fields] != fields or len(dt.names) != len(fields):
            raise ImportError(f"{module} disagrees with layout ({dt}): rebuild it")
    return 0
