"""A readable reference of the wire validation (hypernat/_wire.pyx ``check``), in numpy.

Its own copy of the documented record layouts (byte offsets written out here, not read
from the compiled structs) and the checks of hypernat.messages.validate as the protocol
states them, over whole columns.  tests/test_messages.py holds the compiled validator to
the same verdict for the same bytes and predicates.
"""
from typing import Optional

import numpy as np

PROTOCOL_VERSION = 2
MAX_RECORDS = 4096
N_NACK_REASONS = 7
FETCH_BY_EXTERNAL, FETCH_BY_INTERNAL = 0, 1
RULE_F_WILDCARD = 0x0001


def _dt(fields):
    return np.dtype([(n, t) for n, t in fields])


# the documented layouts (messages.py's docstring)
LAYOUTS = {
    "KEY": _dt([("seq", "<u4"), ("rule_id", "<u4"), ("proto", "u1"), ("kind", "u1"), ("reason", "u1"),
                ("flags", "u1"), ("int_addr", "<u4"), ("ext_addr", "<u4"), ("rem_addr", "<u4"),
                ("int_port", "<u2"), ("ext_port", "<u2"), ("rem_port", "<u2"), ("pad", "<u2")]),
    "RULE": _dt([("seq", "<u4"), ("rule_id", "<u4"), ("lease_ms", "<u4"), ("int_addr", "<u4"),
                 ("ext_addr", "<u4"), ("rem_addr", "<u4"), ("int_port", "<u2"), ("ext_port", "<u2"),
                 ("rem_port", "<u2"), ("owner", "<u2"), ("proto", "u1"), ("tcp_state", "u1"), ("flags", "<u2")]),
    "ACTIVITY": _dt([("seq", "<u4"), ("rule_id", "<u4"), ("idle_ms", "<u4"), ("int_addr", "<u4"),
                     ("ext_addr", "<u4"), ("rem_addr", "<u4"), ("int_port", "<u2"), ("ext_port", "<u2"),
                     ("rem_port", "<u2"), ("pad", "<u2"), ("proto", "u1"), ("tcp_flags", "u1"), ("tcp_out", "u1"),
                     ("tcp_in", "u1")]),
    "ACK": _dt([("seq", "<u4"), ("status", "u1"), ("reason", "u1"), ("pad", "<u2")]),
    "BLOCK": _dt([("seq", "<u4"), ("addr", "<u4"), ("port_lo", "<u2"), ("port_hi", "<u2"), ("lender", "<u2"),
                  ("borrower", "<u2"), ("status", "u1"), ("reason", "u1"), ("pad", "<u2"), ("lease_ms", "<u4")]),
    "HELLO": _dt([("version", "<u2"), ("nic", "<u2"), ("n_nics", "<u2"), ("flags", "<u2"),
                  ("incarnation", "<u8"), ("heartbeat_ms", "<u4"), ("pad", "<u4")]),
    "HEARTBEAT": _dt([("seq", "<u4"), ("pad", "<u4"), ("incarnation", "<u8"), ("time_ns", "<u8")]),
    "PEER": _dt([("nic", "<u2"), ("state", "<u2"), ("pad", "<u4"), ("incarnation", "<u8")]),
    "UNDELIVERABLE": _dt([("orig_type", "u1"), ("reason", "u1"), ("target", "<u2"), ("pad", "<u4")]),
}

T = dict(HELLO=0x01, HELLO_ACK=0x02, HEARTBEAT=0x03, PEERS=0x04, FETCH=0x10, RULE=0x11, NACK=0x12, PUSH=0x13,
         PUSH_ACK=0x14, LEASE=0x15, REVOKE=0x16, REVOKE_ACK=0x17, ACTIVITY=0x18, ACTIVITY_ACK=0x19, BORROW=0x1A,
         BORROW_ACK=0x1B, RETURN=0x1C, RETURN_ACK=0x1D)
LAYOUT_OF = {
    T["FETCH"]: "KEY", T["NACK"]: "KEY", T["REVOKE"]: "KEY",
    T["RULE"]: "RULE", T["PUSH"]: "RULE", T["LEASE"]: "RULE",
    T["ACTIVITY"]: "ACTIVITY",
    T["PUSH_ACK"]: "ACK", T["REVOKE_ACK"]: "ACK", T["ACTIVITY_ACK"]: "ACK", T["RETURN_ACK"]: "ACK",
    T["BORROW"]: "BLOCK", T["BORROW_ACK"]: "BLOCK", T["RETURN"]: "BLOCK",
    T["HELLO"]: "HELLO", T["HELLO_ACK"]: "HELLO", T["HEARTBEAT"]: "HEARTBEAT", T["PEERS"]: "PEER",
}
_PROTO_OK = np.zeros(256, dtype=bool)
_PROTO_OK[[1, 6, 17]] = True


def _all(pred, *args) -> bool:
    """The vectorised predicate holds for every record; one that raises rejects."""
    try:
        return bool(np.all(np.asarray(pred(*args), dtype=bool)))
    except Exception:  # noqa: BLE001
        return False


def check(code: int, payload: bytes, sender: Optional[int] = None, receiver: Optional[int] = None, owns=None,
          internal=None, n_nics: Optional[int] = None) -> Optional[str]:
    """The reason a record message is dropped (None: valid)."""
    name = LAYOUT_OF.get(code)
    if name is None:
        return "unknown_type"
    dt = LAYOUTS[name]
    n, rest = divmod(len(payload), dt.itemsize)
    if n == 0 or rest:
        return "truncated"
    if n > MAX_RECORDS:
        return "oversize"
    if name == "HELLO" and n != 1:
        return "truncated"
    recs = np.frombuffer(bytes(payload), dtype=dt)
    if name == "HELLO":
        r = recs[0]
        if int(r["version"]) != PROTOCOL_VERSION:
            return "bad_version"
        if code == T["HELLO"] and sender is not None and int(r["nic"]) != sender:
            return "bad_identity"
        if n_nics is not None and int(r["nic"]) >= n_nics:
            return "bad_field"
        return None
    if "proto" in dt.names and not _PROTO_OK[recs["proto"]].all():
        return "bad_field"
    l4 = recs["proto"] != 1 if "proto" in dt.names else None  # ICMP ids may be 0; ports may not
    if name == "RULE":
        if sender is not None and (recs["owner"] != sender).any():
            return "bad_identity"
        if (((recs["ext_port"] == 0) | (recs["int_port"] == 0)) & l4).any():
            return "bad_field"
        if ((recs["rem_addr"] == 0) & ((recs["flags"] & RULE_F_WILDCARD) == 0)).any():
            return "bad_field"
        if owns is not None and sender is not None and not _all(owns, sender, recs["ext_addr"], recs["ext_port"]):
            return "foreign_endpoint"
        if internal is not None and not _all(internal, recs["int_addr"]):
            return "not_internal"
        return None
    if name == "KEY":
        kind = recs["kind"]
        if ((kind != FETCH_BY_EXTERNAL) & (kind != FETCH_BY_INTERNAL)).any():
            return "bad_field"
        if code == T["NACK"] and (recs["reason"] >= N_NACK_REASONS).any():
            return "bad_field"
        by_ext = kind == FETCH_BY_EXTERNAL
        if ((recs["ext_port"] == 0) & by_ext & l4).any() or ((recs["int_port"] == 0) & ~by_ext & l4).any():
            return "bad_field"
        if owns is not None:
            if code == T["REVOKE"] and sender is not None:
                if not _all(owns, sender, recs["ext_addr"], recs["ext_port"]):
                    return "foreign_endpoint"
            if code == T["FETCH"] and receiver is not None and by_ext.any():
                if not _all(owns, receiver, recs["ext_addr"][by_ext], recs["ext_port"][by_ext]):
                    return "foreign_endpoint"
        if internal is not None and code == T["FETCH"] and (~by_ext).any():
            if not _all(internal, recs["int_addr"][~by_ext]):
                return "not_internal"
        return None
    if name == "ACTIVITY":
        if ((recs["ext_port"] == 0) & l4).any():
            return "bad_field"
        if owns is not None and receiver is not None:
            if not _all(owns, receiver, recs["ext_addr"], recs["ext_port"]):
                return "foreign_endpoint"
        if internal is not None and not _all(internal, recs["int_addr"]):
            return "not_internal"
        return None
    if name == "BLOCK":
        if (recs["port_lo"] > recs["port_hi"]).any():
            return "bad_field"
        if n_nics is not None and ((recs["lender"] >= n_nics) | (recs["borrower"] >= n_nics)).any():
            return "bad_field"
        if sender is not None:
            who = recs["lender"] if code == T["BORROW_ACK"] else recs["borrower"]
            if (who != sender).any():
                return "bad_identity"
        if owns is not None and code == T["RETURN"] and receiver is not None:
            if (recs["addr"] == 0).any():
                return "bad_field"
            if not (_all(owns, receiver, recs["addr"], recs["port_lo"])
                    and _all(owns, receiver, recs["addr"], recs["port_hi"])):
                return "foreign_endpoint"
        return None
    if name == "PEER":
        if n_nics is not None and (recs["nic"] >= n_nics).any():
            return "bad_field"
        return None
    return None  # ACK and HEARTBEAT: any content is well formed


# ----------------------------------------------- the partition's ownership, in plain Python


def owner_reference(part, addr: int, port: int, loans: bool = True) -> int:
    """``Partition.owner`` written out from the module doc's arithmetic, from the
    partition's public description (its prefixes in pool order, port range, block size,
    strategy, loans) -- not through its compiled geometry.  -1 outside the pool."""
    a, off = -1, 0
    for net in part.nets:
        base = int(net.network_address)
        if base <= addr < base + net.num_addresses:
            a = off + addr - base
            break
        off += net.num_addresses
    if a < 0 or not part.port_min <= port <= part.port_max:
        return -1
    j = (port - part.port_min) // part.block_size
    if loans and a * part.bpa + j in part.overrides:
        return part.overrides[a * part.bpa + j]
    if part.strategy == "by-port":
        return ((j + 1) * part.n - 1) // part.bpa
    return ((a + 1) * part.n - 1) // part.n_addrs


def owns_reference(part, mode: str):
    """The vectorised reference of ``messages.Owns(part.geometry, mode)``."""

    def owns(nic, addrs, ports):
        out = []
        for x, y in zip(addrs, ports):
            now, native = owner_reference(part, int(x), int(y)), owner_reference(part, int(x), int(y), loans=False)
            out.append(now == nic if mode == "now" else native == nic if mode == "native"
                       else nic in (now, native))
        return np.array(out, dtype=bool)

    return owns
