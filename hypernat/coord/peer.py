"""A scripted NIC peer: the coordinator protocol as a NIC must speak it, without a NIC.

Tests and ``benchmarks/bench_coord.py`` use it to drive a coordinator; the real NIC side
is ``hypernat.nic.worker`` + ``hypernat.agent``.  It does exactly what the broker's
docstring asks of a NIC, and no more:

    start ──► HELLO ──► HELLO_ACK (coordinator incarnation C)
      │         ▲                     │
      │         │ UNDELIVERABLE not_registered, or a HEARTBEAT echo with C' != C
      │         └─────────────────────┘   then: resend every FETCH still unanswered
      └── every heartbeat_interval: HEARTBEAT

It asks with ``fetch(target, n)`` (FETCH records with fresh seqs, kept until a RULE or
NACK with the same seq arrives, resent after ``retry_after``) and answers every FETCH it
receives with a RULE computed from the key alone (``rule_for``), so repeats get the same
answer: idempotent, as the real owner must be.
"""
from __future__ import annotations

import time
from typing import Dict, Optional

import numpy as np
import zmq

from .. import messages as M
from ..auth import client_curve


def rule_id_for(ext_port: int, seq: int) -> int:
    """The rule id a scripted owner gives the FETCH (ext_port, seq): checkable by the asker."""
    return (ext_port * 2654435761 + seq) & 0xFFFFFFFF


class ScriptedNic:
    def __init__(self, endpoint: str, nic: int, *, ctx: Optional[zmq.Context] = None,
                 heartbeat_interval: float = 0.2, retry_after: float = 0.3,
                 identity: Optional[bytes] = None, curve: Optional[tuple] = None, hello: bool = True):
        self.nic = nic
        self.endpoint = endpoint
        self._own_ctx = ctx is None
        self.ctx = ctx or zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.identity = identity if identity is not None else M.nic_identity(nic)
        self.sock.linger = 0
        self.sock.sndhwm = self.sock.rcvhwm = 100_000
        if curve is not None:
            client_curve(self.sock, *curve)
        self.sock.connect(endpoint)
        self.incarnation = M.new_incarnation()
        self.heartbeat_interval = heartbeat_interval
        self.retry_after = retry_after
        self.coord_incarnation: Optional[int] = None
        self.registered = False
        self.hellos = 0
        self._next_hb = 0.0
        self._hello_at = -1.0
        self._seq = 0
        self.pending: Dict[int, tuple] = {}  # seq -> (target, record bytes, sent_at)
        self.answers: Dict[int, np.void] = {}  # seq -> RULE record
        self.nacks: Dict[int, int] = {}
        self.duplicates = 0  # answers for seqs already answered
        self.served = 0  # FETCH records answered (repeats included)
        self.undeliverable: Dict[str, int] = {}
        self.peers: Dict[int, tuple] = {}
        self.received: list = []  # other messages: (source, type, Decoded)
        self.resends = 0
        self.rule_answer = None  # what to answer to a QUERY op "rule" (None: nothing)
        if hello:
            self.hello()

    # -- session -------------------------------------------------------------------
    def hello(self) -> None:
        rec = M.records(M.T_HELLO, 1)
        rec["version"], rec["nic"], rec["incarnation"] = M.PROTOCOL_VERSION, self.nic, self.incarnation
        rec["heartbeat_ms"] = int(self.heartbeat_interval * 1000)
        self.send(M.COORD, M.T_HELLO, rec.tobytes())
        self.hellos += 1
        self._hello_at = time.monotonic()

    def heartbeat(self) -> None:
        rec = M.records(M.T_HEARTBEAT, 1)
        rec["incarnation"], rec["time_ns"] = self.incarnation, time.monotonic_ns()
        self.send(M.COORD, M.T_HEARTBEAT, rec.tobytes())

    def send(self, target: bytes, mtype: int, payload) -> bool:
        try:
            self.sock.send_multipart((target, M.TYPE_FRAME[mtype], payload), zmq.NOBLOCK)
            return True
        except zmq.Again:
            return False

    def stats(self, counters: dict) -> None:
        self.send(M.COORD, M.T_STATS, M.pack_json({"seq": 0, "counters": counters, "gauges": {}}))

    # -- asking --------------------------------------------------------------------
    def fetch(self, target: int, n: int = 1, ext_port: int = 1024) -> list:
        """Send one FETCH message of n records to NIC ``target``; returns their seqs."""
        recs = M.records(M.T_FETCH, n)
        seqs = np.arange(self._seq + 1, self._seq + 1 + n, dtype=np.uint32)
        self._seq += n
        recs["seq"] = seqs
        recs["proto"] = 6
        recs["kind"] = M.FETCH_BY_EXTERNAL
        recs["ext_addr"] = 0xCB007101
        recs["ext_port"] = ext_port
        recs["rem_addr"] = 0xC6336401
        recs["rem_port"] = (seqs % 60000) + 1
        ident = M.nic_identity(target)
        now = time.monotonic()
        for i, s in enumerate(seqs.tolist()):
            self.pending[s] = (ident, recs[i : i + 1].tobytes(), now)
        self.send(ident, M.T_FETCH, recs.tobytes())
        return seqs.tolist()

    def resend_due(self, now: float, force: bool = False) -> int:
        """Resend unanswered FETCHes older than retry_after, batched per target."""
        batches: Dict[bytes, list] = {}
        for s, (ident, rec, sent) in self.pending.items():
            if force or now - sent >= self.retry_after:
                batches.setdefault(ident, []).append((s, rec))
        for ident, items in batches.items():
            for s, rec in items:
                self.pending[s] = (ident, rec, now)
            for i in range(0, len(items), M.MAX_RECORDS):
                self.send(ident, M.T_FETCH, b"".join(rec for _, rec in items[i : i + M.MAX_RECORDS]))
            self.resends += len(items)
        return sum(len(v) for v in batches.values())

    # -- the loop ------------------------------------------------------------------
    SERVICE_MAX = 10_000  # messages handled per service() call

    def service(self, timeout_ms: int = 10) -> int:
        """Wait up to timeout_ms for messages, handle all waiting, run timers."""
        n = 0
        if self.sock.poll(timeout_ms):
            while n < self.SERVICE_MAX:  # the timers below run even under a flood
                try:
                    msg = self.sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self._handle(msg)
                n += 1
        now = time.monotonic()
        if now >= self._next_hb:
            if self.registered:
                self.heartbeat()
            elif now - self._hello_at > 0.5:
                self.hello()
            self._next_hb = now + self.heartbeat_interval
        if self.pending:
            self.resend_due(now)
        return n

    def run_until(self, cond, timeout: float = 5.0) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if cond():
                return True
            self.service(10)
        return cond()

    def _handle(self, msg) -> None:
        if len(msg) != 3:
            return
        src, tframe, payload = msg
        if src == M.COORD:
            self._from_coord(tframe, payload)
            return
        sender = M.parse_identity(src)
        d = M.validate(sender, tframe, payload, receiver=self.nic)
        if not d.ok:
            self.received.append((sender, d.mtype, d))
            return
        if d.mtype == M.T_FETCH:
            self._answer_fetch(src, d.recs)
        elif d.mtype == M.T_RULE:
            for r in d.recs:
                s = int(r["seq"])
                if self.pending.pop(s, None) is None:
                    self.duplicates += 1
                elif s not in self.answers:
                    self.answers[s] = r.copy()
        elif d.mtype == M.T_NACK:
            for r in d.recs:
                s = int(r["seq"])
                if self.pending.pop(s, None) is not None:
                    self.nacks[s] = int(r["reason"])
        else:
            self.received.append((sender, d.mtype, d))

    def _answer_fetch(self, src: bytes, recs) -> None:
        self.served += len(recs)
        self.send(src, M.T_RULE, answer_fetches(recs, self.nic))

    def _from_coord(self, tframe, payload) -> None:
        d = M.decode(tframe, payload)
        if not d.ok:
            return
        t = d.mtype
        now = time.monotonic()
        if t == M.T_HELLO_ACK:
            inc = int(d.recs[0]["incarnation"])
            fresh = self.coord_incarnation != inc
            self.coord_incarnation = inc
            self.registered = True
            if fresh and self.pending:
                self.resend_due(now, force=True)
        elif t == M.T_HEARTBEAT:
            inc = int(d.recs[0]["incarnation"])
            if self.coord_incarnation is not None and inc != self.coord_incarnation:
                self.registered = False
                self.hello()
        elif t == M.T_UNDELIVERABLE:
            u = M.unpack_undeliverable(d.recs)
            if u is None:
                return
            reason = u[1]
            self.undeliverable[reason] = self.undeliverable.get(reason, 0) + 1
            if reason == "not_registered" and now - self._hello_at > 0.05:
                self.registered = False
                self.hello()
        elif t == M.T_PEERS:
            for r in d.recs:
                self.peers[int(r["nic"])] = (int(r["state"]), int(r["incarnation"]))
        elif t == M.T_QUERY:
            q = d.recs
            self.send(M.COORD, M.T_REPLY, M.pack_json({"id": q.get("id"), "ok": True, "result": self.rule_answer}))
        else:
            self.received.append((None, t, d))

    def close(self) -> None:
        self.sock.close(0)
        if self._own_ctx:
            self.ctx.term()


# ------------------------------------------------------------ benchmark owner


_KEY = M.KEY_STRUCT
_RULE = M.RULE_STRUCT


def answer_fetches(recs, nic: int) -> bytes:
    """RULE payload answering a batch of FETCH records (what a scripted owner sends);
    ``recs`` a KEY_DTYPE array, or the raw payload bytes.  Small batches with struct,
    large ones with numpy (numpy's fixed cost per operation would dominate a round trip)."""
    if isinstance(recs, (bytes, bytearray, memoryview)):
        if len(recs) <= 8 * _KEY.size:
            out = bytearray()
            for r in _KEY.iter_unpack(recs):
                seq, ext_port = r[0], r[10]
                out += _RULE.pack(seq, (ext_port * 2654435761 + seq) & 0xFFFFFFFF, 30_000, 0x0A000001, r[7], r[8],
                                  40000, ext_port, r[11], nic, r[2], 0, 0)
            return bytes(out)
        recs = np.frombuffer(recs, dtype=M.KEY_DTYPE)
    out = np.zeros(len(recs), dtype=M.RULE_DTYPE)
    out["seq"] = recs["seq"]
    out["rule_id"] = (recs["ext_port"].astype(np.uint64) * 2654435761 + recs["seq"]).astype(np.uint32)
    out["lease_ms"] = 30_000
    out["int_addr"] = 0x0A000001
    out["int_port"] = 40000
    for f in ("ext_addr", "ext_port", "rem_addr", "rem_port", "proto"):
        out[f] = recs[f]
    out["owner"] = nic
    return out.tobytes()


def serve_fetches(endpoint: str, nic: int, heartbeat_interval: float = 0.5) -> None:
    """A lean owner for benchmarks: HELLO, then answer every FETCH with a RULE at once
    (blocking receive, no poll timeout on the hot path), heartbeat when idle or due.
    Runs until killed."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.identity = M.nic_identity(nic)
    sock.linger = 0
    sock.sndhwm = sock.rcvhwm = 100_000
    sock.connect(endpoint)
    inc = M.new_incarnation()
    hello = M.records(M.T_HELLO, 1)
    hello["version"], hello["nic"], hello["incarnation"] = M.PROTOCOL_VERSION, nic, inc
    hb = M.records(M.T_HEARTBEAT, 1)
    hb["incarnation"] = inc
    sock.send_multipart((M.COORD, M.TYPE_FRAME[M.T_HELLO], hello.tobytes()))
    sock.rcvtimeo = int(heartbeat_interval * 1000)
    fetch_frame, rule_frame = M.TYPE_FRAME[M.T_FETCH], M.TYPE_FRAME[M.T_RULE]
    next_hb = time.monotonic() + heartbeat_interval
    while True:
        try:
            src, t, payload = sock.recv_multipart()
        except zmq.Again:
            src = None
        except ValueError:  # not three frames
            continue
        if src is not None:
            if t == fetch_frame and src:
                sock.send_multipart((src, rule_frame, answer_fetches(payload, nic)), zmq.NOBLOCK)
            elif src == M.COORD and t == M.TYPE_FRAME[M.T_UNDELIVERABLE]:
                u = M.unpack_undeliverable(payload)
                if u is not None and u[1] == "not_registered":
                    sock.send_multipart((M.COORD, M.TYPE_FRAME[M.T_HELLO], hello.tobytes()))
        now = time.monotonic()
        if now >= next_hb:
            sock.send_multipart((M.COORD, M.TYPE_FRAME[M.T_HEARTBEAT], hb.tobytes()))
            next_hb = now + heartbeat_interval


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="A scripted NIC that answers every FETCH (benchmarks).")
    ap.add_argument("--endpoint", required=True)
    ap.add_argument("--nic", type=int, required=True)
    a = ap.parse_args()
    try:
        serve_fetches(a.endpoint, a.nic)
    except KeyboardInterrupt:
        pass
