"""The session record and session keys every per-connection module shares (export,
clone, activity, lease expiry): one definition, below ``hypernat.rules`` and the other
``hypernat.nat`` modules, re-exported by ``hypernat.rules``."""
import numpy as np

from .. import layout

PROTO_ICMP = layout.PROTO_ICMP

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

# A session's identity (proto, I, Ip, E, Ep, R, Rp), field by field: in SESSION_DTYPE, and
# in the wire records that name a session (RULE, PUSH, LEASE, REVOKE, ACTIVITY)
SESSION_KEY_FIELDS = ("proto", "iaddr", "iport", "eaddr", "eport", "raddr", "rport")
WIRE_KEY_FIELDS = ("proto", "int_addr", "int_port", "ext_addr", "ext_port", "rem_addr", "rem_port")
# (wire field, SESSION_DTYPE field): a session's identity and rule id in a wire record
WIRE_OF_SESSION = tuple(zip(WIRE_KEY_FIELDS, SESSION_KEY_FIELDS)) + (("rule_id", "rule_id"),)


# Session keys (one place that knows the ICMP twist)


def out_key(proto, iaddr, iport, raddr, rport) -> tuple:
    """Out-table key of a session.  ICMP query: the identifier stands in for both ports."""
    return (proto, iaddr, iport, raddr, iport) if proto == PROTO_ICMP else (proto, iaddr, iport, raddr, rport)


def in_key(proto, raddr, rport, eaddr, eport) -> tuple:
    """In-table key of a session.  ICMP query: the translated identifier in both ports."""
    return (proto, raddr, eport, eaddr, eport) if proto == PROTO_ICMP else (proto, raddr, rport, eaddr, eport)


def record_keys(rec) -> tuple:
    """(out key, in key) of a SESSION_DTYPE record (ICMP records carry rport 0)."""
    p = int(rec["proto"])
    i, ip, e, ep = int(rec["iaddr"]), int(rec["iport"]), int(rec["eaddr"]), int(rec["eport"])
    r, rp = int(rec["raddr"]), int(rec["rport"])
    return out_key(p, i, ip, r, rp), in_key(p, r, rp, e, ep)


def slot_records(s, direction_bit: int, part, with_tcp: bool) -> np.ndarray:
    """SESSION_DTYPE records of flow-table slots `s` (a slot array; out entries for
    DIR_BIT_OUT, in entries for DIR_BIT_IN): `dirs` = that direction, `owner` the owner
    of the external endpoint (``part.owners``; 0 outside the pool), the entry's TCP
    state in tcp_out / tcp_in when `with_tcp`."""
    r = np.zeros(len(s), SESSION_DTYPE)
    icmp = s["proto"] == PROTO_ICMP
    if direction_bit == DIR_BIT_OUT:
        r["iaddr"], r["iport"], r["raddr"] = s["saddr"], s["sport"], s["daddr"]
        r["rport"] = np.where(icmp, 0, s["dport"])
        r["eaddr"], r["eport"] = s["new_addr"], s["new_port"]
        if with_tcp:
            r["tcp_out"] = s["tcp_state"]
    else:
        r["raddr"], r["eaddr"], r["eport"] = s["saddr"], s["daddr"], s["dport"]
        r["rport"] = np.where(icmp, 0, s["sport"])
        r["iaddr"], r["iport"] = s["new_addr"], s["new_port"]
        if with_tcp:
            r["tcp_in"] = s["tcp_state"]
    r["proto"], r["rule_id"], r["last_seen"], r["dirs"] = s["proto"], s["rule_id"], s["last_seen"], direction_bit
    r["owner"] = np.maximum(part.owners(r["eaddr"], r["eport"]), 0)
    return r


def ip_text(a: int) -> str:
    """Dotted quad of a host-order u32 address, as the journal's records and the log
    lines write it."""
    a = int(a)
    return f"{a >> 24 & 255}.{a >> 16 & 255}.{a >> 8 & 255}.{a & 255}"
