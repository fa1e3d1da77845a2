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

Records (one packed C struct per layout in hypernat/_wire.pxd; byte offsets are the protocol)
-------------------------------------------------------------------------------------------
Each layout is declared once, as a struct in ``_wire.pxd``; its numpy dtype here is read
from the compiled struct (``_wire.layouts()``: names, offsets, sizes), so the encoder
(numpy / ``*_STRUCT``), the compiled validator and the decoder share one definition.
All fields are little-endian unsigned integers.

``KEY_DTYPE`` (32 B) — FETCH, NACK, REVOKE: names one rule or session::

     0 seq u4   4 rule_id u4   8 proto u1   9 kind u1   10 reason u1   11 flags u1
    12 int_addr u4   16 ext_addr u4   20 rem_addr u4
    24 int_port u2   26 ext_port u2   28 rem_port u2   30 pad u2

  FETCH kind ``FETCH_BY_EXTERNAL``: an inbound miss (or ICMP error) at a non-owner: the
  key is (proto, rem, ext); the receiver must own ext.  ``FETCH_BY_INTERNAL``: an
  outbound first packet with endpoint-independent mapping whose host is owned by
  another NIC: the key is (proto, int, rem); the owner builds the mapping if it has
  none.  The answer is a RULE record with the same ``seq``, or a NACK record (same key,
  ``reason`` = ``NACK_*``).  REVOKE (owner -> holder) names a clone by ``rule_id`` and
  key; answered by REVOKE_ACK (``ACK_DTYPE``, same seq).  (This is the wire key; the
  fast path's lookup key is ``layout.KEY_DTYPE``, 16 bytes, another thing.)

``RULE_DTYPE`` (36 B) — RULE (answer to FETCH), PUSH (active install), LEASE (renewal)::

     0 seq u4   4 rule_id u4   8 lease_ms u4
    12 int_addr u4   16 ext_addr u4   20 rem_addr u4
    24 int_port u2   26 ext_port u2   28 rem_port u2   30 owner u2
    32 proto u1   33 tcp_state u1   34 flags u2

  Everything a clone needs: the rule's owner NIC and id, the three endpoints (remote
  0.0.0.0:0 with ``RULE_F_WILDCARD`` for an endpoint-independent mapping), the TCP state
  bits seen by the owner (``layout.TCP_*``) and the lease.
  ``lease_ms`` is a *duration* from the moment the record is sent, not a clock value:
  the NICs of one gateway (BlueField ARM cores and the host) do not share a clock.  The
  holder's lease ends at receive time + lease_ms, which is later than the owner's view
  by the transit time, so the owner counts a granted lease as running until send time
  + lease_ms + ``LEASE_GRACE_MS`` before it reuses the endpoint (invariant 3).
  A PUSH message carries every session an owner's loop turn built for one holder
  (at most MAX_RECORDS), all under ONE ``seq``, the message's: the holder answers one
  PUSH_ACK record per seq it received (``ST_REFUSED`` if any record under it was
  refused), and the owner retries the message whole until then.  (The worker's
  ``Outbox`` never cuts such a message across payloads.)  A REVOKE message likewise
  carries every session of one owner's turn for one holder under one seq; the holder
  answers one REVOKE_ACK record per seq (``ST_UNKNOWN`` if any record named no clone
  of the sender's).

``ACTIVITY_DTYPE`` (36 B) — ACTIVITY (clone holder -> owner, batched)::

     0 seq u4   4 rule_id u4   8 idle_ms u4
    12 int_addr u4   16 ext_addr u4   20 rem_addr u4
    24 int_port u2   26 ext_port u2   28 rem_port u2   30 pad u2
    32 proto u1   33 tcp_flags u1   34 tcp_out u1   35 tcp_in u1

  ``idle_ms``: time since the holder last saw a packet; ``tcp_flags``: OR of FIN/SYN/RST
  seen there, ``tcp_out`` / ``tcp_in`` the same per direction.
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

Versions
--------
``PROTOCOL_VERSION`` (2; ``_wire.pxd``) travels in HELLO and HELLO_ACK, whose layout
never changes.  Version 2 dropped RULE.timeout_s and ACTIVITY.packets (never written),
so RULE and ACTIVITY records are 36 bytes, not 40.  Peers of different versions never
exchange records: the coordinator refuses a HELLO of another version (dropped, counted
``bad_version``), so the peer stays unregistered and every message it routes bounces
with UNDELIVERABLE ``not_registered``; a NIC refuses a HELLO_ACK of another version in
the same way.  A record of the other layout is therefore never parsed as one of this.

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
The record checks run compiled, on the records in place (``_wire.check``; the readable
reference is tests/wire_model.py).  It never raises on bytes: it returns a ``Decoded``
whose ``reason`` is ``None`` or one of ``REASONS`` (declared once, in ``_wire.pyx``),
the names the coordinator and the NICs count drops under.  ``check(...)`` returns only
the reason; ``header_reason(code, nbytes)`` is what a router needs (whole records, not
too many) without reading them.
"""
from __future__ import annotations

import json
import os
import re
import struct
from typing import Callable, NamedTuple, Optional

import numpy as np

from . import _geometry, _wire
from . import wire_reasons as _wire_reasons
from ._wire import (  # the message type codes, declared once in _wire.pxd
    T_HELLO, T_HELLO_ACK, T_HEARTBEAT, T_PEERS, T_UNDELIVERABLE, T_STATS, T_QUERY, T_REPLY, T_FETCH, T_RULE,
    T_NACK, T_PUSH, T_PUSH_ACK, T_LEASE, T_REVOKE, T_REVOKE_ACK, T_ACTIVITY, T_ACTIVITY_ACK, T_BORROW,
    T_BORROW_ACK, T_RETURN, T_RETURN_ACK,
)

PROTOCOL_VERSION = _wire.PROTOCOL_VERSION_

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
# (name, code, dtype name or "json", routed?, doc).  The codes are _wire.pxd's (declared
# there once, imported above); the table says what each type carries.
_TYPES = (
    ("HELLO", T_HELLO, "HELLO", False, "NIC registers with the coordinator"),
    ("HELLO_ACK", T_HELLO_ACK, "HELLO", False, "coordinator accepts a HELLO"),
    ("HEARTBEAT", T_HEARTBEAT, "HEARTBEAT", False, "liveness, NIC -> coordinator, echoed back"),
    ("PEERS", T_PEERS, "PEER", False, "coordinator -> NICs: who is up, with incarnations"),
    ("UNDELIVERABLE", T_UNDELIVERABLE, "raw", False, "coordinator -> sender: a message could not be routed"),
    ("STATS", T_STATS, "json", False, "NIC -> coordinator: counters and gauges"),
    ("QUERY", T_QUERY, "json", False, "control query (ctl -> coordinator, coordinator -> NIC)"),
    ("REPLY", T_REPLY, "json", False, "answer to a QUERY"),
    ("FETCH", T_FETCH, "KEY", True, "ask the owner for a rule (passive install)"),
    ("RULE", T_RULE, "RULE", True, "owner's answer to FETCH: the rule to clone"),
    ("NACK", T_NACK, "KEY", True, "owner's refusal of a FETCH, with reason"),
    ("PUSH", T_PUSH, "RULE", True, "owner pushes rules to the predicted NIC (active install)"),
    ("PUSH_ACK", T_PUSH_ACK, "ACK", True, "holder installed (or refused) a PUSH message (one record per seq)"),
    ("LEASE", T_LEASE, "RULE", True, "owner renews a clone's lease"),
    ("REVOKE", T_REVOKE, "KEY", True, "owner revokes clones"),
    ("REVOKE_ACK", T_REVOKE_ACK, "ACK", True, "holder dropped the clones of a REVOKE message (one record per seq)"),
    ("ACTIVITY", T_ACTIVITY, "ACTIVITY", True, "holder reports activity / FIN / RST to the owner"),
    ("ACTIVITY_ACK", T_ACTIVITY_ACK, "ACK", True, "owner received activity"),
    ("BORROW", T_BORROW, "BLOCK", True, "ask a neighbour for a port block (spill-over)"),
    ("BORROW_ACK", T_BORROW_ACK, "BLOCK", True, "lender grants or refuses a block"),
    ("RETURN", T_RETURN, "BLOCK", True, "borrower gives a block back"),
    ("RETURN_ACK", T_RETURN_ACK, "ACK", True, "lender took the block back"),
)

if {n for n in dir(_wire) if n.startswith("T_")} != {"T_" + n for n, _, _, _, _ in _TYPES}:
    raise ImportError("hypernat.messages: _TYPES and the type codes of _wire.pxd disagree")
TYPE_NAMES = {code: name for name, code, _, _, _ in _TYPES}
TYPE_CODES = {name: code for name, code, _, _, _ in _TYPES}
ROUTED_TYPES = frozenset(code for _, code, _, routed, _ in _TYPES if routed)
JSON_TYPES = frozenset(code for _, code, kind, _, _ in _TYPES if kind == "json")
# The type byte as a ready-made frame, per type: b"\x10" for FETCH, ...
TYPE_FRAME = {code: bytes([code]) for code in TYPE_NAMES}

# ------------------------------------------------------------------------- records


def _dtype(layout: str) -> np.dtype:
    """The numpy dtype of a layout of ``_wire.pxd``, read from the compiled struct."""
    size, fields = _LAYOUTS[layout]
    fmt = {1: "u1", 2: "<u2", 4: "<u4", 8: "<u8"}
    return np.dtype({"names": [n for n, _, _ in fields], "formats": [fmt[s] for _, _, s in fields],
                     "offsets": [o for _, o, _ in fields], "itemsize": size})


def _struct(dt: np.dtype) -> struct.Struct:
    """The same record as a ``struct`` (fields in order, no holes: the structs are packed)."""
    ch = {1: "B", 2: "H", 4: "I", 8: "Q"}
    st = struct.Struct("<" + "".join(ch[dt.fields[n][0].itemsize] for n in dt.names))
    assert st.size == dt.itemsize
    return st


_LAYOUTS = _wire.layouts()
KEY_DTYPE = _dtype("KEY")
RULE_DTYPE = _dtype("RULE")
ACTIVITY_DTYPE = _dtype("ACTIVITY")
# ACTIVITY.tcp_flags is the union of the TCP flags (layout.TCP_*) seen in both directions;
# tcp_out / tcp_in say which direction saw them (``activity_tcp_dirs``: every sender of
# protocol version 2 writes them; version 1 peers are refused at HELLO).
ACK_DTYPE = _dtype("ACK")
BLOCK_DTYPE = _dtype("BLOCK")
HELLO_DTYPE = _dtype("HELLO")
HEARTBEAT_DTYPE = _dtype("HEARTBEAT")
PEER_DTYPE = _dtype("PEER")
UNDELIVERABLE_DTYPE = _dtype("UNDELIVERABLE")

_DTYPE_BY_KIND = {
    "KEY": KEY_DTYPE, "RULE": RULE_DTYPE, "ACTIVITY": ACTIVITY_DTYPE, "ACK": ACK_DTYPE,
    "BLOCK": BLOCK_DTYPE, "HELLO": HELLO_DTYPE, "HEARTBEAT": HEARTBEAT_DTYPE, "PEER": PEER_DTYPE,
}
# type code -> record dtype (None for JSON and UNDELIVERABLE)
DTYPE_OF = {code: _DTYPE_BY_KIND.get(kind) for _, code, kind, _, _ in _TYPES}

# One record of RULE_DTYPE / KEY_DTYPE / ACTIVITY_DTYPE as a struct, field by field in
# dtype order (``RULE_STRUCT.pack(seq, rule_id, lease_ms, ...)``): building a message of a
# record or two with struct costs a fraction of numpy's per-call overhead.
RULE_STRUCT = _struct(RULE_DTYPE)
KEY_STRUCT = _struct(KEY_DTYPE)
ACTIVITY_STRUCT = _struct(ACTIVITY_DTYPE)

# Largest batch in one message (records) and largest JSON payload (bytes).
MAX_RECORDS = _wire.MAX_RECORDS_
MAX_JSON = 1 << 20

# --------------------------------------------------------------------- field values
# (the values the compiled validator reads are _wire.pxd's)
FETCH_BY_EXTERNAL = _wire.FETCH_BY_EXTERNAL_  # KEY.kind: inbound miss, key = (proto, rem, ext)
FETCH_BY_INTERNAL = _wire.FETCH_BY_INTERNAL_  # KEY.kind: outbound EIM fetch, key = (proto, int, rem)
FETCH_F_ICMP_ERROR = 0x02  # KEY.flags: the miss was an ICMP error's embedded flow
FETCH_F_REVALIDATE = 0x04  # KEY.flags: a clone read back from a snapshot, revalidating
# (0x01, FETCH_F_ALLOCATE of version 1, was sent and never read: an owner always builds
# the mapping a FETCH_BY_INTERNAL asks for)

RULE_F_WILDCARD = _wire.RULE_F_WILDCARD_  # endpoint-independent mapping: remote is any (rem 0.0.0.0:0)
# (0x0002, RULE_F_PUSHED, was set on PUSH records and never read: the message type says it)

NACK_REASONS = (
    "none",  # 0: unused
    "no_rule",  # the owner has no such rule (and did not create one)
    "not_owner",  # the receiver does not own that external endpoint / host
    "exhausted",  # no free port to build the mapping (or the host's cap)
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
assert len(NACK_REASONS) == _wire.N_NACK_REASONS_

# --------------------------------------------------------------------- drop reasons
# Why a message is dropped: the names counters and metrics use (coordinator and NICs),
# declared once in hypernat/wire_reasons.py (the compiled validator returns their index
# and counts by it); DROP_COUNTERS are the NIC's counter names, by reason index.
REASONS = _wire_reasons.REASONS
REASON_NAMES = _wire_reasons.REASON_NAMES
REASON = _wire_reasons.REASON
DROP_COUNTERS = _wire_reasons.DROP_COUNTERS
DROP_COUNTER_NAMES = _wire_reasons.DROP_COUNTER_NAMES


def drop_counts() -> np.ndarray:
    """A zeroed count array for ``validate(..., counts=)``: one uint64 per reason."""
    return np.zeros(len(REASONS), dtype=np.uint64)


def drain_drops(counts: np.ndarray, count: Callable[[str, int], None]) -> None:
    """Hand the drops counted in `counts` to ``count(counter name, n)`` (DROP_COUNTERS'
    names) and zero them."""
    for i in np.flatnonzero(counts):
        count(DROP_COUNTER_NAMES[i], int(counts[i]))
    counts[:] = 0

VALID_PROTOS = (1, 6, 17)


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
    """(tcp_out, tcp_in) arrays of ACTIVITY records: the TCP flags seen per direction."""
    return recs["tcp_out"], recs["tcp_in"]


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
    r = _wire.header(code, buf.nbytes)
    if r != _OK:
        return Decoded(code, None, REASON_NAMES[r])
    try:
        arr = np.frombuffer(buf, dtype=DTYPE_OF[code])
    except (ValueError, TypeError, BufferError):
        return Decoded(code, None, "truncated")
    return Decoded(code, arr, None)


def header_reason(code: int, nbytes: int) -> Optional[str]:
    """What a router checks of a record message without reading a record: the type
    carries records and the payload is 1..MAX_RECORDS whole ones (one HELLO).  None, or
    the reason."""
    r = _wire.header(code, nbytes)
    return None if r == _OK else REASON_NAMES[r]


# A partition predicate: owns(nic, ext_addrs, ext_ports) -> bool array (vectorised over
# the records of one message).  An internal-prefix predicate: internal(addrs) -> bool
# array.  The daemons pass the compiled ones, which the validator answers in C record by
# record: ``Owns(partition.geometry, mode)`` (mode "now": loans applied; "native": the
# strategy's space, loans ignored; "now-or-native") and ``Prefixes(networks)``.  Any
# other callable of those forms is called once per message (``elementwise`` makes one
# from a scalar function).
OwnsPredicate = Callable[[int, np.ndarray, np.ndarray], np.ndarray]
InternalPredicate = Callable[[np.ndarray], np.ndarray]
Owns = _wire.Owns
Prefixes = _geometry.Prefixes


def elementwise(fn):
    """Wrap a scalar predicate (``fn(nic, addr, port) -> bool`` or ``fn(addr) -> bool``)
    into the vectorised form ``validate`` calls."""

    def vectorised(*args):
        arrays = [a for a in args if isinstance(a, np.ndarray)]
        scalars = [a for a in args if not isinstance(a, np.ndarray)]
        n = len(arrays[0]) if arrays else 0
        return np.fromiter(
            (bool(fn(*scalars, *(int(a[i]) for a in arrays))) for i in range(n)), dtype=bool, count=n
        )

    return vectorised


_OK = _wire.OK
_check = _wire.check


def validate(
    sender: Optional[int],
    mtype_frame,
    payload,
    *,
    receiver: Optional[int] = None,
    owns: Optional[OwnsPredicate] = None,
    internal: Optional[InternalPredicate] = None,
    n_nics: Optional[int] = None,
    counts: Optional[np.ndarray] = None,
) -> Decoded:
    """Decode and check one message received from NIC ``sender`` (None: the
    coordinator or a control client).  Never raises on bytes.

    The type must be known; a JSON type must be an object of at most MAX_JSON bytes;
    a record type goes through the compiled validator (``_wire.check``: whole records,
    fields in range, identities, HELLO's version, and ``owns`` / ``internal`` — see
    there for which endpoint of which type must lie in whose partition; ``receiver``
    must be given for the receiver's).  Returns ``Decoded`` (``reason`` None when valid,
    else a name from ``REASON_NAMES``, ``recs`` then a numpy view of the payload); a
    message is valid or dropped whole.  With ``counts`` (``drop_counts()``), a drop is
    also counted there under its reason's index.
    """
    code = _TYPE_BY_FRAME.get(mtype_frame) if type(mtype_frame) is bytes else type_of(mtype_frame)
    dt = DTYPE_OF.get(code) if code is not None else None
    if dt is None:  # JSON, UNDELIVERABLE, or not a type at all
        d = decode(mtype_frame, payload)
        if d.reason is not None and counts is not None:
            counts[REASON[d.reason]] += 1
        return d
    r = _check(code, payload, -1 if sender is None else sender, -1 if receiver is None else receiver,
               owns, internal, -1 if n_nics is None else n_nics, counts)
    if r != _OK:
        return Decoded(code, None, REASON_NAMES[r])
    try:
        return Decoded(code, np.frombuffer(payload, dtype=dt), None)
    except (ValueError, TypeError, BufferError):  # a buffer numpy cannot view (not contiguous)
        if counts is not None:
            counts[REASON["truncated"]] += 1
        return Decoded(code, None, "truncated")


def check(sender: Optional[int], code: int, payload: bytes, *, receiver: Optional[int] = None,
          owns: Optional[OwnsPredicate] = None, internal: Optional[InternalPredicate] = None,
          n_nics: Optional[int] = None) -> Optional[str]:
    """``validate`` for a router: the same checks on a payload of a *known* type
    ``code``, returning only the reason (None: valid), building no array."""
    if DTYPE_OF.get(code) is None:
        return validate(sender, TYPE_FRAME.get(code, b""), payload, receiver=receiver, owns=owns,
                        internal=internal, n_nics=n_nics).reason
    r = _check(code, payload, -1 if sender is None else sender, -1 if receiver is None else receiver,
               owns, internal, -1 if n_nics is None else n_nics)
    return None if r == _OK else REASON_NAMES[r]


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

    def __bool__(self) -> bool:
        """Anything added since the last drain (the loop asks every turn: no sum)."""
        return bool(self._q)

    def drain(self):
        """Yield (target, type, payload bytes); at most MAX_RECORDS records a payload, and
        every array of at most MAX_RECORDS records that was added goes out whole in one."""
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
            # as few payloads as keep every array whole that fits in one (an acknowledged
            # message of several records -- PUSH -- is answered under one seq, so it
            # must arrive whole or not at all); a longer array is cut in MAX_RECORDS
            run: list = []
            size = 0
            for part in parts:
                while len(part) > MAX_RECORDS or (run and size + len(part) > MAX_RECORDS):
                    if run:
                        yield target, mtype, b"".join(r.tobytes() for r in run)
                        run, size = [], 0
                    else:  # longer than a payload: cut
                        yield target, mtype, part[:MAX_RECORDS].tobytes()
                        part = part[MAX_RECORDS:]
                if len(part):
                    run.append(part)
                    size += len(part)
            if run:
                yield target, mtype, b"".join(r.tobytes() for r in run)
