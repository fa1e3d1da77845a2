"""The wire records between NICs and the coordinator: one place, one layout.

Every NIC worker holds one ZeroMQ DEALER socket connected to the coordinator's ROUTER.
A message is always three frames; the first names the *other end* of the exchange:

    NIC a (DEALER)                 coordinator (ROUTER)                 NIC b (DEALER)
    [b"nic1", FETCH, payload] ───► [b"nic0" (socket id), b"nic1", FETCH, payload]
                                   route: first frame rewritten to the source
                                   [b"nic1" (target socket), b"nic0", FETCH, payload] ───►
                                                                   [b"nic0", FETCH, payload]
    [b"nic0", RULE, payload] ◄── … the same way back ◄──────────── [b"nic0", RULE, payload]

    frame 0  target id when sent, source id when received; ``COORD`` (b"") is the
             coordinator itself (HELLO, HEARTBEAT, STATS, QUERY go there; its own
             messages arrive from it)
    frame 1  one byte: the message type (``T_*`` below)
    frame 2  the payload: a batch of fixed-size little-endian records of the type's
             dtype, back to back (as many as were waiting: batching is what makes the
             coordinator fast), or UTF-8 JSON for the few control types

NIC ids are small integers (0..N-1, the partition index); a NIC's socket identity (and,
with CURVE, the ZAP user id bound to its key) is ``nic_identity(i)`` = b"nic<i>".
Identities never start with a zero byte (ZeroMQ reserves those for anonymous peers).

Records (numpy structured dtypes, packed; byte offsets are part of the protocol)
-------------------------------------------------------------------------------
``KEY_DTYPE`` (32 B) — FETCH, NACK, REVOKE: names one rule or session::

     0 seq u4   4 rule_id u4   8 proto u1   9 kind u1   10 reason u1   11 flags u1
    12 int_addr u4   16 ext_addr u4   20 rem_addr u4
    24 int_port u2   26 ext_port u2   28 rem_port u2   30 pad u2

  FETCH kind ``FETCH_BY_EXTERNAL``: an inbound miss (or ICMP error) at a non-owner: the
  key is (proto, rem, ext); the receiver must own ext.  ``FETCH_BY_INTERNAL``: an
  outbound first packet with endpoint-independent mapping whose host is owned by
  another NIC: the key is (proto, int, rem); flag ``FETCH_F_ALLOCATE`` asks the owner to
  build the mapping if it has none.  The answer is a RULE record with the same ``seq``,
  or a NACK record (same key, ``reason`` = ``NACK_*``).  REVOKE (owner -> holder) names
  a clone by ``rule_id`` and key; answered by REVOKE_ACK (``ACK_DTYPE``, same seq).

``RULE_DTYPE`` (40 B) — RULE (answer to FETCH), PUSH (active install), LEASE (renewal)::

     0 seq u4   4 rule_id u4   8 lease_ms u4
    12 int_addr u4   16 ext_addr u4   20 rem_addr u4
    24 int_port u2   26 ext_port u2   28 rem_port u2   30 owner u2
    32 proto u1   33 tcp_state u1   34 flags u2   36 timeout_s u2   38 pad u2

  Everything a clone needs: the rule's owner NIC and id, the three endpoints (remote
  0.0.0.0:0 with ``RULE_F_WILDCARD`` for an endpoint-independent mapping), the TCP state
  bits seen by the owner (``layout.TCP_*``), the owner's idle timeout and the lease.
  ``lease_ms`` is a *duration* from the moment the record is sent, not a clock value:
  the NICs of one gateway (BlueField ARM cores and the host) do not share a clock.  The
  holder's lease ends at receive time + lease_ms, which is later than the owner's view
  by the transit time, so the owner counts a granted lease as running until send time
  + lease_ms + ``LEASE_GRACE_MS`` before it reuses the endpoint (invariant 3).

``ACTIVITY_DTYPE`` (40 B) — ACTIVITY (clone holder -> owner, batched)::

     0 seq u4   4 rule_id u4   8 idle_ms u4
    12 int_addr u4   16 ext_addr u4   20 rem_addr u4
    24 int_port u2   26 ext_port u2   28 rem_port u2   30 pad u2
    32 proto u1   33 tcp_flags u1   34 pad u2   36 packets u4

  ``idle_ms``: time since the holder last saw a packet; ``tcp_flags``: OR of FIN/SYN/RST
  seen there; ``packets``: packets since the previous report (0 if not counted).
  Answered by ACTIVITY_ACK (``ACK_DTYPE``); the owner may send LEASE renewals.

``ACK_DTYPE`` (8 B) — PUSH_ACK, REVOKE_ACK, ACTIVITY_ACK, RETURN_ACK::

     0 seq u4   4 status u1   5 reason u1   6 pad u2

``BLOCK_DTYPE`` (24 B) — BORROW (request), BORROW_ACK (grant or refusal), RETURN::

     0 seq u4   4 addr u4   8 port_lo u2   10 port_hi u2   12 lender u2   14 borrower u2
    16 status u1   17 reason u1   18 pad u2   20 lease_ms u4

  A BORROW asks the lender for ``port_hi - port_lo + 1`` ports (``addr`` 0: any
  address); the BORROW_ACK carries the block granted (status ``ST_OK``) or a refusal.
  RETURN gives a block back; RETURN_ACK confirms.

``HELLO_DTYPE`` (24 B) — HELLO (NIC -> coordinator), HELLO_ACK (coordinator -> NIC)::

     0 version u2   2 nic u2   4 n_nics u2   6 flags u2   8 incarnation u8
    16 heartbeat_ms u4   20 pad u4

  ``incarnation``: a random 64-bit number chosen at process start; a new value tells
  the others that the process restarted (its messages in flight are gone).

``HEARTBEAT_DTYPE`` (24 B) — HEARTBEAT both ways (NIC -> coordinator; echoed back)::

     0 seq u4   4 pad u4   8 incarnation u8   16 time_ns u8

``PEER_DTYPE`` (16 B) — PEERS (coordinator -> every NIC, on any change and after HELLO)::

     0 nic u2   2 state u2   4 pad u4   8 incarnation u8

``UNDELIVERABLE_DTYPE`` (8 B) — the first 8 bytes of an UNDELIVERABLE payload; the
original payload follows, so the sender can fail exactly the records it sent::

     0 orig_type u1   1 reason u1   2 target u2   4 pad u4

JSON types: STATS (NIC -> coordinator: ``{"seq", "counters": {name: int}, "gauges":
{name: number}}``), QUERY and REPLY (``{"id", "op", "args"}`` / ``{"id", "ok", "result"
| "error"}``) between ``hypernat ctl`` and the coordinator, and between the
coordinator and a NIC (op ``rule``).

Acknowledgement, retry, idempotence (invariant 6)
-------------------------------------------------
Every record that matters carries ``seq``, a per-sender 32-bit counter (wrapping).  The
sender keeps it until answered (RULE/NACK for FETCH, *_ACK for PUSH, REVOKE, ACTIVITY,
BORROW, RETURN) and resends it after a timeout; the receiver handles a repeat
idempotently (a FETCH is answered again, a PUSH re-installs the same clone, a REVOKE of
an absent clone is acknowledged, ACTIVITY takes the max/OR, a BORROW repeated with the
same (borrower, seq) gets the same grant).  The coordinator keeps no rule state: after
it restarts, NICs see an UNDELIVERABLE with reason ``not_registered`` (or a new
coordinator incarnation in a HEARTBEAT echo), HELLO again and resend what is still
unanswered.  Nothing acknowledged is lost, because only the endpoints acknowledge.

Validation
----------
``validate(sender, mtype, payload, ...)`` checks size, type, the sender's identity,
record fields and, through predicates the caller passes in (this module does not
import the partition code), that a rule's external endpoint lies in its owner's
partition (or a block it borrowed) and its internal address in the internal prefixes.
It never raises on bytes: it returns a ``Decoded`` whose ``reason`` is ``None`` or one of
``REASONS``, the names the coordinator and the NICs count drops under.  ``check(...)``
runs the same checks for a router that only needs the verdict.  Batches of up to
``SMALL_BATCH`` records are checked record by record with ``struct`` (about 1 µs for a
FETCH), larger ones with numpy (a fixed ~15 µs, then nearly free per record); the tests
hold the two paths to the same verdicts.
"""
from __future__ import annotations

import json
import os
import re
import struct
from typing import Callable, NamedTuple, Optional

import numpy as np

PROTOCOL_VERSION = 1

# The coordinator's own id in frame 0 (target when sending to it, source when it sends).
COORD = b""


def nic_identity(nic: int) -> bytes:
    """Socket identity (and ZAP user id, as bytes) of NIC ``nic``: b"nic<nic>"."""
    return b"nic%d" % int(nic)


_IDENT_RE = re.compile(rb"nic(0|[1-9][0-9]{0,4})\Z")


def parse_identity(ident) -> Optional[int]:
    """NIC number of an identity such as b"nic3" (str accepted), None if not a NIC id."""
    if type(ident) is bytes:
        n = _IDENT_CACHE.get(ident)
        if n is not None:
            return n
    if isinstance(ident, str):
        ident = ident.encode("ascii", "replace")
    try:
        m = _IDENT_RE.match(bytes(ident))
    except TypeError:
        return None
    if m is None:
        return None
    n = int(m.group(1))
    if n > MAX_NIC:
        return None
    if type(ident) is bytes:  # at most MAX_NIC + 1 distinct valid identities
        _IDENT_CACHE[ident] = n
    return n


_IDENT_CACHE: dict = {}  # b"nic3" -> 3, for the identities seen (every message names one)


MAX_NIC = 4095  # NIC ids 0..4095 (u2 fields; far above any real gateway)

# --------------------------------------------------------------------------- types
# (name, code, dtype name or "json", routed?, doc).  Codes are part of the protocol:
# append, never renumber.
_TYPES = (
    ("HELLO", 0x01, "HELLO", False, "NIC registers with the coordinator"),
    ("HELLO_ACK", 0x02, "HELLO", False, "coordinator accepts a HELLO"),
    ("HEARTBEAT", 0x03, "HEARTBEAT", False, "liveness, NIC -> coordinator, echoed back"),
    ("PEERS", 0x04, "PEER", False, "coordinator -> NICs: who is up, with incarnations"),
    ("UNDELIVERABLE", 0x05, "raw", False, "coordinator -> sender: a message could not be routed"),
    ("STATS", 0x06, "json", False, "NIC -> coordinator: counters and gauges"),
    ("QUERY", 0x07, "json", False, "control query (ctl -> coordinator, coordinator -> NIC)"),
    ("REPLY", 0x08, "json", False, "answer to a QUERY"),
    ("FETCH", 0x10, "KEY", True, "ask the owner for a rule (passive install)"),
    ("RULE", 0x11, "RULE", True, "owner's answer to FETCH: the rule to clone"),
    ("NACK", 0x12, "KEY", True, "owner's refusal of a FETCH, with reason"),
    ("PUSH", 0x13, "RULE", True, "owner pushes a rule to the predicted NIC (active install)"),
    ("PUSH_ACK", 0x14, "ACK", True, "holder installed (or refused) a pushed rule"),
    ("LEASE", 0x15, "RULE", True, "owner renews a clone's lease"),
    ("REVOKE", 0x16, "KEY", True, "owner revokes a clone"),
    ("REVOKE_ACK", 0x17, "ACK", True, "holder dropped the clone"),
    ("ACTIVITY", 0x18, "ACTIVITY", True, "holder reports activity / FIN / RST to the owner"),
    ("ACTIVITY_ACK", 0x19, "ACK", True, "owner received activity"),
    ("BORROW", 0x1A, "BLOCK", True, "ask a neighbour for a port block (spill-over)"),
    ("BORROW_ACK", 0x1B, "BLOCK", True, "lender grants or refuses a block"),
    ("RETURN", 0x1C, "BLOCK", True, "borrower gives a block back"),
    ("RETURN_ACK", 0x1D, "ACK", True, "lender took the block back"),
)

TYPE_NAMES = {code: name for name, code, _, _, _ in _TYPES}
TYPE_CODES = {name: code for name, code, _, _, _ in _TYPES}
ROUTED_TYPES = frozenset(code for _, code, _, routed, _ in _TYPES if routed)
JSON_TYPES = frozenset(code for _, code, kind, _, _ in _TYPES if kind == "json")
# The type byte as a ready-made frame, per type: b"\x10" for FETCH, ...
TYPE_FRAME = {code: bytes([code]) for code in TYPE_NAMES}

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
for _name, _code, _, _, _ in _TYPES:  # the constants above must match the table
    assert globals()["T_" + _name] == _code, _name

# ------------------------------------------------------------------------- records


def _dtype(fields):
    return np.dtype([(n, t) for n, t in fields])


KEY_DTYPE = _dtype(
    [
        ("seq", "<u4"), ("rule_id", "<u4"),
        ("proto", "u1"), ("kind", "u1"), ("reason", "u1"), ("flags", "u1"),
        ("int_addr", "<u4"), ("ext_addr", "<u4"), ("rem_addr", "<u4"),
        ("int_port", "<u2"), ("ext_port", "<u2"), ("rem_port", "<u2"), ("pad", "<u2"),
    ]
)
RULE_DTYPE = _dtype(
    [
        ("seq", "<u4"), ("rule_id", "<u4"), ("lease_ms", "<u4"),
        ("int_addr", "<u4"), ("ext_addr", "<u4"), ("rem_addr", "<u4"),
        ("int_port", "<u2"), ("ext_port", "<u2"), ("rem_port", "<u2"), ("owner", "<u2"),
        ("proto", "u1"), ("tcp_state", "u1"), ("flags", "<u2"), ("timeout_s", "<u2"), ("pad", "<u2"),
    ]
)
ACTIVITY_DTYPE = _dtype(
    [
        ("seq", "<u4"), ("rule_id", "<u4"), ("idle_ms", "<u4"),
        ("int_addr", "<u4"), ("ext_addr", "<u4"), ("rem_addr", "<u4"),
        ("int_port", "<u2"), ("ext_port", "<u2"), ("rem_port", "<u2"), ("pad", "<u2"),
        ("proto", "u1"), ("tcp_flags", "u1"), ("tcp_out", "u1"), ("tcp_in", "u1"), ("packets", "<u4"),
    ]
)
# ACTIVITY.tcp_flags is the union of the TCP flags (layout.TCP_*) seen in both directions
# (what the first protocol version sent); tcp_out / tcp_in (once a pad, zero from an old
# sender) say which direction saw them.  A record with tcp_flags set and both per-direction
# fields zero comes from an old sender: ``activity_tcp_dirs`` says how to read it.
ACK_DTYPE = _dtype([("seq", "<u4"), ("status", "u1"), ("reason", "u1"), ("pad", "<u2")])
BLOCK_DTYPE = _dtype(
    [
        ("seq", "<u4"), ("addr", "<u4"), ("port_lo", "<u2"), ("port_hi", "<u2"),
        ("lender", "<u2"), ("borrower", "<u2"), ("status", "u1"), ("reason", "u1"), ("pad", "<u2"),
        ("lease_ms", "<u4"),
    ]
)
HELLO_DTYPE = _dtype(
    [
        ("version", "<u2"), ("nic", "<u2"), ("n_nics", "<u2"), ("flags", "<u2"),
        ("incarnation", "<u8"), ("heartbeat_ms", "<u4"), ("pad", "<u4"),
    ]
)
HEARTBEAT_DTYPE = _dtype([("seq", "<u4"), ("pad", "<u4"), ("incarnation", "<u8"), ("time_ns", "<u8")])
PEER_DTYPE = _dtype([("nic", "<u2"), ("state", "<u2"), ("pad", "<u4"), ("incarnation", "<u8")])
UNDELIVERABLE_DTYPE = _dtype([("orig_type", "u1"), ("reason", "u1"), ("target", "<u2"), ("pad", "<u4")])

for _dt, _size in (
    (KEY_DTYPE, 32), (RULE_DTYPE, 40), (ACTIVITY_DTYPE, 40), (ACK_DTYPE, 8), (BLOCK_DTYPE, 24),
    (HELLO_DTYPE, 24), (HEARTBEAT_DTYPE, 24), (PEER_DTYPE, 16), (UNDELIVERABLE_DTYPE, 8),
):
    assert _dt.itemsize == _size, (_dt, _size)

_DTYPE_BY_KIND = {
    "KEY": KEY_DTYPE, "RULE": RULE_DTYPE, "ACTIVITY": ACTIVITY_DTYPE, "ACK": ACK_DTYPE,
    "BLOCK": BLOCK_DTYPE, "HELLO": HELLO_DTYPE, "HEARTBEAT": HEARTBEAT_DTYPE, "PEER": PEER_DTYPE,
}
# type code -> record dtype (None for JSON and UNDELIVERABLE)
DTYPE_OF = {code: _DTYPE_BY_KIND.get(kind) for _, code, kind, _, _ in _TYPES}

# Largest batch in one message (records) and largest JSON payload (bytes).
MAX_RECORDS = 4096
MAX_JSON = 1 << 20

# --------------------------------------------------------------------- field values
FETCH_BY_EXTERNAL = 0  # KEY.kind: inbound miss, key = (proto, rem, ext)
FETCH_BY_INTERNAL = 1  # KEY.kind: outbound EIM fetch, key = (proto, int, rem)
FETCH_F_ALLOCATE = 0x01  # KEY.flags on FETCH_BY_INTERNAL: build the mapping if absent
FETCH_F_ICMP_ERROR = 0x02  # KEY.flags: the miss was an ICMP error's embedded flow
FETCH_F_REVALIDATE = 0x04  # KEY.flags: a clone read back from a snapshot, revalidating

RULE_F_WILDCARD = 0x0001  # endpoint-independent mapping: remote is any (rem 0.0.0.0:0)
RULE_F_PUSHED = 0x0002  # sent by active install (PUSH), not in answer to a FETCH
RULE_F_BORROWED = 0x0004  # external endpoint lies in a block the owner borrowed
RULE_F_CLOSING = 0x0008  # owner saw FIN/RST: the session is closing

NACK_REASONS = (
    "none",  # 0: unused
    "no_rule",  # the owner has no such rule (and did not create one)
    "not_owner",  # the receiver does not own that external endpoint / host
    "exhausted",  # FETCH_F_ALLOCATE but no free port (or the host's cap)
    "bad_request",  # the record failed validation at the receiver
    "unavailable",  # the owner is restarting / recovering (try again later)
    "filtered",  # the owner's filtering behaviour refuses this remote
)
NACK = {name: i for i, name in enumerate(NACK_REASONS)}

ST_OK = 0  # ACK / BLOCK status
ST_REFUSED = 1
ST_UNKNOWN = 2  # acknowledged, but the thing named did not exist (idempotent repeat)

PEER_DOWN = 0  # PEER.state
PEER_UP = 1

LEASE_GRACE_MS = 1000

# UNDELIVERABLE.reason: why the coordinator could not route a message.
UNDELIVERABLE_REASONS = (
    "none",
    "unknown_target",  # no NIC with that id has ever said HELLO
    "target_down",  # the NIC missed its heartbeats
    "not_registered",  # the sender itself has not said HELLO (HELLO again, then resend)
    "unreachable",  # ZeroMQ refused the send (peer gone, queue full)
    "rejected",  # the message failed the coordinator's validation
)
UNDELIVERABLE = {name: i for i, name in enumerate(UNDELIVERABLE_REASONS)}

# --------------------------------------------------------------------- drop reasons
# Why a message is dropped: the names counters and metrics use (coordinator and NICs).
REASONS = (
    ("bad_frames", "not three frames [peer, type, payload]"),
    ("unknown_type", "type byte is not a known message type"),
    ("truncated", "payload empty or not a whole number of records"),
    ("oversize", "more records (or JSON bytes) than a message may carry"),
    ("bad_json", "JSON payload that does not parse or is not an object"),
    ("bad_version", "HELLO with another protocol version"),
    ("bad_identity", "sender identity does not match the NIC id it claims"),
    ("bad_field", "a record field out of range (protocol, kind, port 0, owner)"),
    ("foreign_endpoint", "external endpoint outside the partition of the NIC that must own it"),
    ("not_internal", "internal address outside the internal prefixes"),
    ("wrong_direction", "a type that may not travel this way (e.g. routed type to the coordinator)"),
)
REASON_NAMES = tuple(n for n, _ in REASONS)

VALID_PROTOS = (1, 6, 17)
_PROTO_OK = np.zeros(256, dtype=bool)  # lookup table: _PROTO_OK[proto array] -> valid?
_PROTO_OK[list(VALID_PROTOS)] = True


# --------------------------------------------------------------------------- encode


def new_incarnation() -> int:
    """A random 64-bit incarnation number for a process that just started (never 0)."""
    return int.from_bytes(os.urandom(8), "little") or 1


def records(mtype: int, n: int) -> np.ndarray:
    """A zeroed array of ``n`` records of the dtype of type ``mtype``, to fill and pack."""
    dt = DTYPE_OF.get(mtype)
    if dt is None:
        raise ValueError(f"type {TYPE_NAMES.get(mtype, mtype)!r} does not carry records")
    return np.zeros(n, dtype=dt)


def pack(mtype: int, recs) -> bytes:
    """Payload bytes of records ``recs``: a numpy array of the type's dtype (fast), or
    a list of dicts / tuples (convenience; missing dict fields are 0)."""
    dt = DTYPE_OF.get(mtype)
    if dt is None:
        raise ValueError(f"type {TYPE_NAMES.get(mtype, mtype)!r} does not carry records")
    if isinstance(recs, np.ndarray):
        if recs.dtype != dt:
            raise ValueError(f"records of dtype {recs.dtype} for type {TYPE_NAMES[mtype]}")
        return recs.tobytes()
    recs = list(recs)
    arr = np.zeros(len(recs), dtype=dt)
    for i, r in enumerate(recs):
        if isinstance(r, dict):
            unknown = set(r) - set(dt.names)
            if unknown:
                raise ValueError(f"unknown fields for {TYPE_NAMES[mtype]}: {sorted(unknown)}")
            for k, v in r.items():
                arr[i][k] = v
        else:
            arr[i] = tuple(r)
    return arr.tobytes()


def pack_json(obj) -> bytes:
    """Payload of a JSON type (STATS, QUERY, REPLY)."""
    return json.dumps(obj, separators=(",", ":"), default=_json_default).encode()


def _json_default(o):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (bytes, bytearray)):
        return o.decode("utf-8", "replace")
    raise TypeError(f"not JSON-able: {type(o).__name__}")


def frames(target: bytes, mtype: int, payload) -> list:
    """The three frames a DEALER sends: [target id, type, payload]."""
    return [target, TYPE_FRAME[mtype], payload]


def pack_undeliverable(orig_type: int, reason: str, target: Optional[int], payload) -> bytes:
    """UNDELIVERABLE payload: header then the original payload."""
    hdr = np.zeros(1, dtype=UNDELIVERABLE_DTYPE)
    hdr["orig_type"] = orig_type & 0xFF
    hdr["reason"] = UNDELIVERABLE[reason]
    hdr["target"] = 0xFFFF if target is None else target
    return hdr.tobytes() + bytes(payload)


def unpack_undeliverable(payload):
    """(orig_type, reason name, target NIC or None, original payload bytes) or None."""
    payload = bytes(payload)
    if len(payload) < UNDELIVERABLE_DTYPE.itemsize:
        return None
    hdr = np.frombuffer(payload, dtype=UNDELIVERABLE_DTYPE, count=1)[0]
    r = int(hdr["reason"])
    reason = UNDELIVERABLE_REASONS[r] if r < len(UNDELIVERABLE_REASONS) else "none"
    target = int(hdr["target"])
    return int(hdr["orig_type"]), reason, (None if target == 0xFFFF else target), payload[8:]


def activity_tcp_dirs(recs) -> tuple:
    """(tcp_out, tcp_in) arrays of ACTIVITY records: the per-direction flags; for a
    record from a sender that predates them (tcp_flags set, both zero) the union in both
    directions, as that sender meant it."""
    out, inn, union = recs["tcp_out"], recs["tcp_in"], recs["tcp_flags"]
    legacy = ((out | inn) == 0) & (union != 0)
    if legacy.any():
        out, inn = np.where(legacy, union, out), np.where(legacy, union, inn)
    return out, inn


# --------------------------------------------------------------------------- decode


class Decoded(NamedTuple):
    """What ``validate`` / ``decode`` found.  ``reason`` None means valid; then ``recs``
    is a read-only numpy array of records (a view of the payload, no copy) or, for a
    JSON type, the parsed object (a dict)."""

    mtype: int
    recs: object
    reason: Optional[str]

    @property
    def ok(self) -> bool:
        return self.reason is None

    @property
    def name(self) -> str:
        return TYPE_NAMES.get(self.mtype, f"0x{self.mtype:02x}")


# type frame (one byte) -> code, for the frames that arrive as bytes
_TYPE_BY_FRAME = {bytes([c]): c for c in TYPE_NAMES}


def type_of(frame) -> Optional[int]:
    """Type code from the type frame, None if it is not one known byte."""
    if type(frame) is bytes:
        return _TYPE_BY_FRAME.get(frame)
    try:
        b = bytes(frame)
    except TypeError:
        return None
    if len(b) != 1:
        return None
    code = b[0]
    return code if code in TYPE_NAMES else None


def decode(mtype_frame, payload) -> Decoded:
    """Structural decoding only: type, size, record count, JSON syntax.  Never raises."""
    code = type_of(mtype_frame)
    if code is None:
        try:
            raw = bytes(mtype_frame)
            code = raw[0] if len(raw) == 1 else -1
        except Exception:  # noqa: BLE001 - whatever came in, it is just unknown
            code = -1
        return Decoded(code, None, "unknown_type")
    try:
        buf = memoryview(payload)
    except TypeError:
        return Decoded(code, None, "truncated")
    if code in JSON_TYPES:
        if buf.nbytes > MAX_JSON:
            return Decoded(code, None, "oversize")
        try:
            obj = json.loads(bytes(buf).decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            return Decoded(code, None, "bad_json")
        if not isinstance(obj, dict):
            return Decoded(code, None, "bad_json")
        return Decoded(code, obj, None)
    if code == T_UNDELIVERABLE:
        if buf.nbytes < UNDELIVERABLE_DTYPE.itemsize:
            return Decoded(code, None, "truncated")
        return Decoded(code, bytes(buf), None)
    dt = DTYPE_OF[code]
    size = dt.itemsize
    n, rest = divmod(buf.nbytes, size)
    if n == 0 or rest:
        return Decoded(code, None, "truncated")
    if n > MAX_RECORDS:
        return Decoded(code, None, "oversize")
    try:
        arr = np.frombuffer(buf, dtype=dt)
    except (ValueError, TypeError, BufferError):
        return Decoded(code, None, "truncated")
    if code in (T_HELLO, T_HELLO_ACK) and n != 1:
        return Decoded(code, None, "truncated")
    return Decoded(code, arr, None)


# A partition predicate: owns(nic, ext_addrs, ext_ports) -> bool array (vectorised over
# the records of one message).  An internal-prefix predicate: internal(addrs) -> bool
# array.  ``elementwise`` makes either from a scalar function.
OwnsPredicate = Callable[[int, np.ndarray, np.ndarray], np.ndarray]
InternalPredicate = Callable[[np.ndarray], np.ndarray]


def elementwise(fn):
    """Wrap a scalar predicate (``fn(nic, addr, port) -> bool`` or ``fn(addr) -> bool``)
    into the vectorised form ``validate`` calls (carrying `fn` as its scalar twin)."""

    def vectorised(*args):
        arrays = [a for a in args if isinstance(a, np.ndarray)]
        scalars = [a for a in args if not isinstance(a, np.ndarray)]
        n = len(arrays[0]) if arrays else 0
        return np.fromiter(
            (bool(fn(*scalars, *(int(a[i]) for a in arrays))) for i in range(n)), dtype=bool, count=n
        )

    vectorised.one = fn
    return vectorised


def with_scalar(vectorised, one):
    """A predicate with both forms: ``vectorised`` (numpy arrays, for big batches) and
    ``one`` (plain ints, one record: what the small-batch path calls, because numpy
    costs microseconds per call whatever the size).  Both must agree;
    tests/test_messages.py holds them to the same verdicts."""

    def pred(*args):
        return vectorised(*args)

    pred.one = one
    return pred


def _all(pred, *args) -> bool:
    """pred(*args) holds for every record; a predicate that raises rejects the message
    (a bug in the partition code must not crash the daemon, nor let a message in)."""
    try:
        return bool(np.all(np.asarray(pred(*args), dtype=bool)))
    except Exception:  # noqa: BLE001
        return False


# Which side of a routed record must own its external endpoint.
_SENDER_OWNS = frozenset((T_RULE, T_PUSH, T_LEASE, T_REVOKE))  # owner -> holder
_RECEIVER_OWNS = frozenset((T_ACTIVITY,))  # holder -> owner (FETCH: see below)


def validate(
    sender: Optional[int],
    mtype_frame,
    payload,
    *,
    receiver: Optional[int] = None,
    owns: Optional[OwnsPredicate] = None,
    internal: Optional[InternalPredicate] = None,
    n_nics: Optional[int] = None,
) -> Decoded:
    """Decode and check one message received from NIC ``sender`` (None: the
    coordinator or a control client).  Never raises on bytes.

    Checks, in order: the type is known; the payload is a whole number of records
    (1..MAX_RECORDS) or a JSON object; record fields are in range (protocol TCP / UDP /
    ICMP, FETCH kind, non-zero ports, NIC numbers below ``n_nics`` when given); a HELLO
    claims the sender's own id; a RULE / PUSH / LEASE names the sender as owner.  With
    ``owns`` (a partition predicate, see ``OwnsPredicate``): the external endpoint of a
    RULE, PUSH, LEASE or REVOKE lies in the *sender's* partition; of a FETCH by external
    endpoint or an ACTIVITY, in the *receiver's* (``receiver`` must be given).  With
    ``internal``: every internal address of a RULE / PUSH / LEASE / FETCH by internal
    endpoint / ACTIVITY lies in the internal prefixes.  Returns ``Decoded`` (``reason``
    None when valid, else a name from ``REASON_NAMES``); a message is valid or dropped
    whole.
    """
    try:
        code = _TYPE_BY_FRAME.get(mtype_frame) if type(mtype_frame) is bytes else None
        if code in _SMALL and type(payload) is bytes:
            # the common case of a few records in a bytes payload: the checks on the
            # bytes first, the array (a view, as ``decode`` makes it) only when valid
            dt = DTYPE_OF[code]
            n, rest = divmod(len(payload), dt.itemsize)
            if n == 0 or rest:
                return Decoded(code, None, "truncated")
            if n <= SMALL_BATCH:
                reason = _check_small(sender, code, payload, receiver, owns, internal, n_nics)
                if reason is not None:
                    return Decoded(code, None, reason)
                return Decoded(code, np.frombuffer(payload, dtype=dt), None)
        d = decode(mtype_frame, payload)
        if d.reason is not None:
            return d
        if d.mtype in _SMALL and len(d.recs) <= SMALL_BATCH:
            reason = _check_small(sender, d.mtype, d.recs.tobytes(), receiver, owns, internal, n_nics)
        else:
            reason = _check_records(sender, d.mtype, d.recs, receiver, owns, internal, n_nics)
        return d if reason is None else Decoded(d.mtype, None, reason)
    except Exception:  # noqa: BLE001 - belt and braces: a bug here must not kill a daemon
        return Decoded(type_of(mtype_frame) or -1, None, "bad_field")


def check(sender: Optional[int], code: int, payload: bytes, *, receiver: Optional[int] = None,
          owns: Optional[OwnsPredicate] = None, internal: Optional[InternalPredicate] = None,
          n_nics: Optional[int] = None) -> Optional[str]:
    """``validate`` for a router: the same checks on a payload of a *known* record type
    ``code``, returning only the reason (None: valid), without building arrays for small
    batches.  This is what the coordinator runs on every routed message."""
    try:
        dt = DTYPE_OF.get(code)
        if dt is None:
            return validate(sender, TYPE_FRAME.get(code, b""), payload, receiver=receiver, owns=owns,
                            internal=internal, n_nics=n_nics).reason
        n, rest = divmod(len(payload), dt.itemsize)
        if n == 0 or rest:
            return "truncated"
        if n > MAX_RECORDS:
            return "oversize"
        if code in _SMALL and n <= SMALL_BATCH:
            return _check_small(sender, code, payload, receiver, owns, internal, n_nics)
        if code in (T_HELLO, T_HELLO_ACK) and n != 1:
            return "truncated"
        return _check_records(sender, code, np.frombuffer(payload, dtype=dt), receiver, owns, internal, n_nics)
    except Exception:  # noqa: BLE001
        return "bad_field"


# --- the same checks, record by record, for small batches --------------------------------
# numpy costs a few microseconds per operation whatever the size, so a message of one or
# a few records (the latency-critical FETCH and its RULE) is checked with struct and plain
# Python instead; tests/test_messages.py checks that both paths return the same reason.
SMALL_BATCH = 8
_ST_RULE = struct.Struct("<IIIIIIHHHHBBHHH")
_ST_KEY = struct.Struct("<IIBBBBIIIHHHH")
_ST_ACTIVITY = struct.Struct("<IIIIIIHHHHBBBBI")
_ST_BLOCK = struct.Struct("<IIHHHHBBHI")
_ST_PEER = struct.Struct("<HHIQ")
for _st, _dt in ((_ST_RULE, RULE_DTYPE), (_ST_KEY, KEY_DTYPE), (_ST_ACTIVITY, ACTIVITY_DTYPE),
                 (_ST_BLOCK, BLOCK_DTYPE), (_ST_PEER, PEER_DTYPE)):
    assert _st.size == _dt.itemsize
# Public: one record of RULE_DTYPE / KEY_DTYPE as a struct, field by field in dtype
# order (``RULE_STRUCT.pack(seq, rule_id, lease_ms, ...)``): building a message of a
# record or two with struct costs a fraction of numpy's per-call overhead.
RULE_STRUCT = _ST_RULE
KEY_STRUCT = _ST_KEY
_PROTO_SET = frozenset(VALID_PROTOS)
_KEY_TYPES = frozenset((T_FETCH, T_NACK, T_REVOKE))
_RULE_TYPES = frozenset((T_RULE, T_PUSH, T_LEASE))
_SMALL = frozenset((T_RULE, T_PUSH, T_LEASE, T_FETCH, T_NACK, T_REVOKE, T_ACTIVITY, T_BORROW, T_BORROW_ACK,
                    T_RETURN, T_PEERS, T_PUSH_ACK, T_REVOKE_ACK, T_ACTIVITY_ACK, T_RETURN_ACK, T_HEARTBEAT))


def _u32(values):
    return np.array(values, dtype=np.uint32)


def _u16(values):
    return np.array(values, dtype=np.uint16)


def _owns_all(owns, nic, addrs, ports) -> bool:
    """Every (addr, port) lies in `nic`'s partition: the predicate's scalar twin when it
    has one (no numpy for a record or two), else its vectorised form."""
    one = getattr(owns, "one", None)
    if one is None:
        return _all(owns, nic, _u32(addrs), _u16(ports))
    try:
        for a, p in zip(addrs, ports):
            if not one(nic, a, p):
                return False
        return True
    except Exception:  # noqa: BLE001 - as _all: a broken predicate rejects
        return False


def _internal_all(internal, addrs) -> bool:
    one = getattr(internal, "one", None)
    if one is None:
        return _all(internal, _u32(addrs))
    try:
        for a in addrs:
            if not one(a):
                return False
        return True
    except Exception:  # noqa: BLE001
        return False


def _check_one_key(sender, code, r, receiver, owns, internal):
    """``_check_small`` of one FETCH / NACK / REVOKE record (tuple `r`): the same checks
    in the same order, without the lists a batch needs."""
    proto, kind = r[2], r[3]
    if proto not in _PROTO_SET or (kind != FETCH_BY_EXTERNAL and kind != FETCH_BY_INTERNAL):
        return "bad_field"
    if code == T_NACK and r[4] >= len(NACK_REASONS):
        return "bad_field"
    if proto != 1 and (r[10] == 0 if kind == FETCH_BY_EXTERNAL else r[9] == 0):
        return "bad_field"
    if owns is not None:
        if code == T_REVOKE and sender is not None:
            if not _owns_all(owns, sender, (r[7],), (r[10],)):
                return "foreign_endpoint"
        if code == T_FETCH and receiver is not None and kind == FETCH_BY_EXTERNAL:
            if not _owns_all(owns, receiver, (r[7],), (r[10],)):
                return "foreign_endpoint"
    if internal is not None and code == T_FETCH and kind == FETCH_BY_INTERNAL:
        if not _internal_all(internal, (r[6],)):
            return "not_internal"
    return None


def _check_one_rule(sender, r, owns, internal):
    """``_check_small`` of one RULE / PUSH / LEASE record (tuple `r`)."""
    proto = r[10]
    if proto not in _PROTO_SET:
        return "bad_field"
    if sender is not None and r[9] != sender:
        return "bad_identity"
    if proto != 1 and (r[7] == 0 or r[6] == 0):
        return "bad_field"
    if r[5] == 0 and not r[12] & RULE_F_WILDCARD:
        return "bad_field"
    if owns is not None and sender is not None:
        if not _owns_all(owns, sender, (r[4],), (r[7],)):
            return "foreign_endpoint"
    if internal is not None and not _internal_all(internal, (r[3],)):
        return "not_internal"
    return None


def _check_small(sender, code, payload, receiver, owns, internal, n_nics):
    if len(payload) == 32 and code in _KEY_TYPES:  # one record: the latency-critical FETCH
        return _check_one_key(sender, code, _ST_KEY.unpack(payload), receiver, owns, internal)
    if len(payload) == 40 and code in _RULE_TYPES:  # ... and its RULE
        return _check_one_rule(sender, _ST_RULE.unpack(payload), owns, internal)
    if code in (T_RULE, T_PUSH, T_LEASE):
        recs = list(_ST_RULE.iter_unpack(payload))
        for r in recs:
            proto = r[10]
            if proto not in _PROTO_SET:
                return "bad_field"
        for r in recs:
            if sender is not None and r[9] != sender:
                return "bad_identity"
        for r in recs:
            if r[10] != 1 and (r[7] == 0 or r[6] == 0):
                return "bad_field"
            if r[5] == 0 and not r[12] & RULE_F_WILDCARD:
                return "bad_field"
        if owns is not None and sender is not None:
            if not _owns_all(owns, sender, [r[4] for r in recs], [r[7] for r in recs]):
                return "foreign_endpoint"
        if internal is not None and not _internal_all(internal, [r[3] for r in recs]):
            return "not_internal"
        return None
    if code in (T_FETCH, T_NACK, T_REVOKE):
        recs = list(_ST_KEY.iter_unpack(payload))
        for r in recs:
            if r[2] not in _PROTO_SET:
                return "bad_field"
        for r in recs:
            kind = r[3]
            if kind != FETCH_BY_EXTERNAL and kind != FETCH_BY_INTERNAL:
                return "bad_field"
            if code == T_NACK and r[4] >= len(NACK_REASONS):
                return "bad_field"
            if r[2] != 1 and (r[10] == 0 if kind == FETCH_BY_EXTERNAL else r[9] == 0):
                return "bad_field"
        if owns is not None:
            if code == T_REVOKE and sender is not None:
                if not _owns_all(owns, sender, [r[7] for r in recs], [r[10] for r in recs]):
                    return "foreign_endpoint"
            if code == T_FETCH and receiver is not None:
                ext = [r for r in recs if r[3] == FETCH_BY_EXTERNAL]
                if ext and not _owns_all(owns, receiver, [r[7] for r in ext], [r[10] for r in ext]):
                    return "foreign_endpoint"
        if internal is not None and code == T_FETCH:
            ins = [r[6] for r in recs if r[3] == FETCH_BY_INTERNAL]
            if ins and not _internal_all(internal, ins):
                return "not_internal"
        return None
    if code == T_ACTIVITY:
        recs = list(_ST_ACTIVITY.iter_unpack(payload))
        for r in recs:
            if r[10] not in _PROTO_SET:
                return "bad_field"
        for r in recs:
            if r[10] != 1 and r[7] == 0:
                return "bad_field"
        if owns is not None and receiver is not None:
            if not _owns_all(owns, receiver, [r[4] for r in recs], [r[7] for r in recs]):
                return "foreign_endpoint"
        if internal is not None and not _internal_all(internal, [r[3] for r in recs]):
            return "not_internal"
        return None
    if code in (T_BORROW, T_BORROW_ACK, T_RETURN):
        recs = list(_ST_BLOCK.iter_unpack(payload))
        for r in recs:
            if r[2] > r[3]:
                return "bad_field"
        if n_nics is not None:
            for r in recs:
                if r[4] >= n_nics or r[5] >= n_nics:
                    return "bad_field"
        if sender is not None:
            who = 4 if code == T_BORROW_ACK else 5
            for r in recs:
                if r[who] != sender:
                    return "bad_identity"
        if owns is not None and code == T_RETURN and receiver is not None:
            if any(r[1] == 0 for r in recs):
                return "bad_field"
            addrs = [r[1] for r in recs]
            if not (_owns_all(owns, receiver, addrs, [r[2] for r in recs])
                    and _owns_all(owns, receiver, addrs, [r[3] for r in recs])):
                return "foreign_endpoint"
        return None
    if code == T_PEERS:
        if n_nics is not None:
            for r in _ST_PEER.iter_unpack(payload):
                if r[0] >= n_nics:
                    return "bad_field"
        return None
    return None  # ACK and HEARTBEAT records: any content is well formed


def _check_records(sender, code, recs, receiver, owns, internal, n_nics):
    if code in JSON_TYPES or code == T_UNDELIVERABLE:
        return None
    if code in (T_HELLO, T_HELLO_ACK):
        r = recs[0]
        if int(r["version"]) != PROTOCOL_VERSION:
            return "bad_version"
        if code == T_HELLO and sender is not None and int(r["nic"]) != sender:
            return "bad_identity"
        if n_nics is not None and int(r["nic"]) >= n_nics:
            return "bad_field"
        return None
    dt = recs.dtype
    if "proto" in dt.names:
        if not _PROTO_OK[recs["proto"]].all():
            return "bad_field"
    if code in (T_RULE, T_PUSH, T_LEASE):
        if sender is not None and (recs["owner"] != sender).any():
            return "bad_identity"
        l4 = recs["proto"] != 1  # ICMP echo ids may be 0; TCP/UDP ports may not
        if (((recs["ext_port"] == 0) | (recs["int_port"] == 0)) & l4).any():
            return "bad_field"
        wild = (recs["flags"] & RULE_F_WILDCARD) != 0
        if ((recs["rem_addr"] == 0) & ~wild).any():
            return "bad_field"
        if owns is not None and sender is not None and not _all(owns, sender, recs["ext_addr"], recs["ext_port"]):
            return "foreign_endpoint"
        if internal is not None and not _all(internal, recs["int_addr"]):
            return "not_internal"
        return None
    if code in (T_FETCH, T_NACK, T_REVOKE):
        kind = recs["kind"]
        if ((kind != FETCH_BY_EXTERNAL) & (kind != FETCH_BY_INTERNAL)).any():
            return "bad_field"
        if code == T_NACK and (recs["reason"] >= len(NACK_REASONS)).any():
            return "bad_field"
        by_ext = kind == FETCH_BY_EXTERNAL
        l4 = recs["proto"] != 1
        if (((recs["ext_port"] == 0) & by_ext & l4).any()
                or ((recs["int_port"] == 0) & ~by_ext & l4).any()):
            return "bad_field"
        if owns is not None:
            if code == T_REVOKE and sender is not None:
                if not _all(owns, sender, recs["ext_addr"], recs["ext_port"]):
                    return "foreign_endpoint"
            if code == T_FETCH and receiver is not None and by_ext.any():
                sel = by_ext
                if not _all(owns, receiver, recs["ext_addr"][sel], recs["ext_port"][sel]):
                    return "foreign_endpoint"
        if internal is not None and code == T_FETCH and (~by_ext).any():
            if not _all(internal, recs["int_addr"][~by_ext]):
                return "not_internal"
        return None
    if code == T_ACTIVITY:
        if ((recs["ext_port"] == 0) & (recs["proto"] != 1)).any():
            return "bad_field"
        if owns is not None and receiver is not None:
            if not _all(owns, receiver, recs["ext_addr"], recs["ext_port"]):
                return "foreign_endpoint"
        if internal is not None and not _all(internal, recs["int_addr"]):
            return "not_internal"
        return None
    if code in (T_BORROW, T_BORROW_ACK, T_RETURN):
        if (recs["port_lo"] > recs["port_hi"]).any():
            return "bad_field"
        if n_nics is not None and ((recs["lender"] >= n_nics) | (recs["borrower"] >= n_nics)).any():
            return "bad_field"
        if sender is not None:
            # the borrower asks and returns; the lender answers
            who = recs["lender"] if code == T_BORROW_ACK else recs["borrower"]
            if (who != sender).any():
                return "bad_identity"
        if owns is not None and code == T_RETURN and receiver is not None:
            ok = recs["addr"] != 0
            if not ok.all():
                return "bad_field"
            # a returned block belongs to its lender's partition: both ends inside it
            if not (_all(owns, receiver, recs["addr"], recs["port_lo"])
                    and _all(owns, receiver, recs["addr"], recs["port_hi"])):
                return "foreign_endpoint"
        return None
    if code == T_PEERS:
        if n_nics is not None and (recs["nic"] >= n_nics).any():
            return "bad_field"
        return None
    return None


# ------------------------------------------------------------------------ utilities


def ip_str(addr: int) -> str:
    """Dotted quad of a host-order u32 address."""
    addr = int(addr)
    return f"{addr >> 24 & 255}.{addr >> 16 & 255}.{addr >> 8 & 255}.{addr & 255}"


def ip_int(s: str) -> int:
    """Host-order u32 of a dotted quad; ValueError if it is not one."""
    parts = s.split(".")
    if len(parts) != 4:
        raise ValueError(f"not an IPv4 address: {s!r}")
    v = 0
    for p in parts:
        if not p.isdigit() or int(p) > 255:
            raise ValueError(f"not an IPv4 address: {s!r}")
        v = v << 8 | int(p)
    return v


def record_dict(rec) -> dict:
    """A record (numpy void) as a JSON-able dict; addresses as dotted quads."""
    out = {}
    for name in rec.dtype.names:
        if name.startswith("pad"):
            continue
        v = int(rec[name])
        out[name] = ip_str(v) if name.endswith("addr") or name == "addr" else v
    return out


class Outbox:
    """Records waiting to be sent, per (target, type): append as they come, ``flush``
    once per loop turn so that one message carries everything that was waiting.

        box = Outbox()
        box.add(b"nic1", T_FETCH, rec)   # rec: one record (numpy void / tuple / dict)
        for target, mtype, payload in box.drain():
            sock.send_multipart([target, TYPE_FRAME[mtype], payload], flags=zmq.NOBLOCK)
    """

    def __init__(self):
        self._q: dict = {}

    def add(self, target: bytes, mtype: int, rec) -> None:
        self._q.setdefault((target, mtype), []).append(rec)

    def add_many(self, target: bytes, mtype: int, recs: np.ndarray) -> None:
        self._q.setdefault((target, mtype), []).append(recs)

    def __len__(self) -> int:
        return sum(len(v) for v in self._q.values())

    def drain(self):
        """Yield (target, type, payload bytes); at most MAX_RECORDS records a payload."""
        q, self._q = self._q, {}
        for (target, mtype), items in q.items():
            dt = DTYPE_OF[mtype]
            if len(items) == 1:  # one array of the type's dtype (what the agent queues)
                it = items[0]
                if isinstance(it, np.ndarray) and it.dtype == dt and it.ndim == 1:
                    if 0 < len(it) <= MAX_RECORDS:
                        yield target, mtype, it.tobytes()
                        continue
            parts = []
            for it in items:
                if isinstance(it, np.ndarray):
                    parts.append(it.astype(dt, copy=False).reshape(-1))
                elif isinstance(it, np.void):
                    parts.append(np.array([it], dtype=dt))
                else:
                    parts.append(np.frombuffer(pack(mtype, [it]), dtype=dt))
            arr = np.concatenate(parts) if len(parts) > 1 else parts[0]
            for i in range(0, len(arr), MAX_RECORDS):
                yield target, mtype, arr[i : i + MAX_RECORDS].tobytes()
