"""The session record every per-connection module shares (export, clone, activity,
lease expiry): one definition, below ``hypernat.rules`` and ``hypernat.nat.expiry``,
re-exported by ``hypernat.rules``."""
import numpy as np

SESSION_DTYPE = np.dtype(
    [
        ("iaddr", "<u4"),  # internal endpoint
        ("eaddr", "<u4"),  # external endpoint (the owner's partition, or a block it lent)
        ("raddr", "<u4"),  # remote endpoint
        ("iport", "<u2"),  # ICMP query: iport/eport are the identifiers, rport is 0
        ("eport", "<u2"),
        ("rport", "<u2"),
        ("proto", "u1"),
        ("dirs", "u1"),  # DIR_BIT_OUT | DIR_BIT_IN: entries covered / active
        ("rule_id", "<u4"),  # the owner's handle
        ("last_seen", "<u4"),  # latest activity over the directions in `dirs`
        ("tcp_out", "u1"),  # TCP FIN|SYN|RST seen outgoing (layout.TCP_*)
        ("tcp_in", "u1"),  # ... and incoming
        ("owner", "u1"),  # owning NIC id
        ("flags", "u1"),  # reserved (0)
    ]
)
assert SESSION_DTYPE.itemsize == 32

DIR_BIT_OUT = 1
DIR_BIT_IN = 2
DIR_BITS_BOTH = DIR_BIT_OUT | DIR_BIT_IN
