"""The coordinator: a ZeroMQ ROUTER that routes rule traffic between NICs.

The NICs of one gateway never talk to each other directly: each holds one DEALER
connected to the coordinator's ROUTER, and every message names its target in its
first frame (``hypernat.messages``).  The coordinator swaps that frame for the sender's
id and passes the rest on untouched:

        NIC 0 DEALER                    Coordinator ROUTER                    NIC 1 DEALER
    [b"nic1", FETCH, recs] ──► [b"nic0", b"nic1", FETCH, recs] ──► [b"nic1", b"nic0", FETCH, recs]
                                 │                                                  │
                                 ├─ sender registered (HELLO) and its socket        │
                                 │  identity is the NIC id it claimed               ▼
                                 ├─ target known and up?  no ──► UNDELIVERABLE back to NIC 0
                                 ├─ header: routed type, whole records, not too many?
                                 │                        no ──► dropped, counted, UNDELIVERABLE
                                 ├─ (--check-records / --check-partitions: every record
                                 │   read and checked too, compiled: messages.check)
                                 └─ send NOBLOCK (ROUTER_MANDATORY: a vanished peer is an
                                    error, not a silent drop)

and it answers what is addressed to itself (frame 0 = ``COORD`` = b""):

    HELLO      register: the socket identity must equal the claimed NIC id (with CURVE, the
               ZAP handler already bound the key to that identity) -> HELLO_ACK, PEERS to all
    HEARTBEAT  liveness; echoed back with the coordinator's incarnation.  A NIC silent for
               ``heartbeat_timeout`` is marked down (PEERS to all); messages to it bounce
    STATS      a NIC's counters (JSON), summed for ``hypernat ctl counters`` and /metrics
    QUERY      control: status | nics | counters | rule ADDR:PORT (the last one asks the
               NICs, which know their rules, and gathers their REPLYs)

It keeps **no rule state**.  Killed and restarted, it comes back with a new incarnation
and an empty registry; every NIC's next message bounces with ``not_registered`` (or its
next HEARTBEAT echo shows the new incarnation), and the NIC must then:

  1. send HELLO again (same incarnation: the NIC itself did not restart);
  2. resend every record still unanswered (FETCH, PUSH, REVOKE, ACTIVITY, BORROW, RETURN);
     the receivers handle repeats idempotently, so nothing acknowledged is lost and
     nothing is applied twice;
  3. treat UNDELIVERABLE ``unknown_target`` / ``target_down`` for a peer as "retry later"
     (the peer may not have said HELLO yet), up to the record's own timeout.

The NIC loop must never block on this socket (invariant 7): sends are NOBLOCK, and a
coordinator that is away only delays fetches.

Speed (DESIGN.md: ~220 µs fetch round trip over ipc, batching is what scales): one
blocking ``recv_multipart`` with a timeout only for housekeeping (no poller on the hot
path), then drain up to ``BUDGET`` more without blocking (asking ``ZMQ_EVENTS`` first:
a receive that finds nothing raises); frames are passed on as the bytes objects they
arrived in, sent and received through ``hypernat.zmqio`` (pyzmq's backend per frame: a
third of ``send_multipart``'s cost); counters are plain integers in lists, turned into
Prometheus series only when scraped (``hypernat.coord.metrics``).
"""
from __future__ import annotations

import errno
import gc
import logging
import os
import socket as pysocket
import threading
import time
from typing import Callable, Dict, Optional

import numpy as np
import zmq

from .. import messages as M
from .. import zmqio
from ..auth import AUTH_RESULTS, AuthError, ZapHandler, identity_allowed, load_authorized, requires_curve, server_curve

log = logging.getLogger("hypernat.coord")

BUDGET = 512  # messages handled per wake-up before housekeeping gets a look
DEFAULT_ENDPOINT = "ipc:///tmp/hypernat/coord.sock"

# Why the coordinator drops a message (besides messages.REASON_NAMES, which validation
# returns): routing failures, also reported to the sender as UNDELIVERABLE.
ROUTE_REASONS = (
    ("unknown_target", "target NIC never said HELLO"),
    ("target_down", "target NIC missed its heartbeats"),
    ("not_registered", "sender has not said HELLO (or restarted without it)"),
    ("unreachable", "ZeroMQ refused the send: peer disconnected"),
    ("queue_full", "the target's send queue is full (high-water mark)"),
    ("bad_query", "control query with an unknown op or bad arguments"),
)
DROP_REASONS = tuple(M.REASONS) + ROUTE_REASONS
DROP_REASON_NAMES = tuple(n for n, _ in DROP_REASONS)

_TYPE_BY_FRAME = {bytes([c]): c for c in M.TYPE_NAMES}


class CoordinatorError(Exception):
    """The coordinator cannot start as configured (say why, in operator terms)."""


class NicState:
    """What the coordinator knows of one NIC: liveness and its last STATS, nothing else."""

    __slots__ = ("nic", "ident", "up", "incarnation", "last_seen", "hello_at", "hellos",
                 "msgs_from", "msgs_to", "stats", "stats_at", "down_since")

    def __init__(self, nic: int, ident: bytes):
        self.nic = nic
        self.ident = ident
        self.up = False
        self.incarnation = 0
        self.last_seen = 0.0
        self.hello_at = 0.0
        self.hellos = 0
        self.msgs_from = 0
        self.msgs_to = 0
        self.stats: dict = {}
        self.stats_at = 0.0
        self.down_since: Optional[float] = None


class _PendingRule:
    __slots__ = ("client", "client_id", "waiting", "answers", "deadline", "args")

    def __init__(self, client, client_id, waiting, deadline, args):
        self.client = client
        self.client_id = client_id
        self.waiting = set(waiting)
        self.answers: dict = {}
        self.deadline = deadline
        self.args = args


class Coordinator:
    """The broker as a library object: ``run()`` blocks until ``stop()`` (any thread, or
    a signal handler); ``start_thread()`` runs it in a thread for tests.

    endpoint            ipc://PATH (default), tcp://HOST:PORT or inproc://NAME
    heartbeat_interval  seconds between a NIC's heartbeats (told to NICs in HELLO_ACK)
    heartbeat_timeout   a NIC silent this long is marked down
    n_nics              NIC ids must be below this (None: any id)
    curve_secret_key    the coordinator's key pair file; turns CURVE on
    authorized          {public key z85: user id} (see ``hypernat.auth``) or a directory
                        of ``nic<N>.key`` / ``ctl*.key`` files
    owns, internal      partition / internal-prefix predicates (``messages.validate``);
                        None: the receiving NICs check these (the default).  With `owns`
                        the records are read and checked as with check_records
    check_records       read and check every record of a routed message (fields, the
                        sender named as owner / borrower / lender, `internal`) before
                        passing it on.  Off by default: a message is routed by its header
                        (type, target, whole records, at most MAX_RECORDS) and the
                        receiving NIC validates every record anyway
    owner_of            callable (addr, port) -> NIC, to name the owner in ``rule`` queries
    metrics_port        serve Prometheus metrics on this port (None: off)
    """

    def __init__(
        self,
        endpoint: str = DEFAULT_ENDPOINT,
        *,
        heartbeat_interval: float = 1.0,
        heartbeat_timeout: float = 5.0,
        n_nics: Optional[int] = None,
        curve_secret_key: Optional[str] = None,
        authorized=None,
        owns: Optional[M.OwnsPredicate] = None,
        internal: Optional[M.InternalPredicate] = None,
        owner_of: Optional[Callable[[int, int], int]] = None,
        check_records: bool = False,
        metrics_port: Optional[int] = None,
        metrics_addr: str = "127.0.0.1",
        query_timeout: float = 1.0,
        hwm: int = 100_000,
        ipc_mode: int = 0o660,
        ctx: Optional[zmq.Context] = None,
        partition=None,
    ):
        self.endpoint = endpoint
        self.heartbeat_interval = float(heartbeat_interval)
        self.heartbeat_timeout = float(heartbeat_timeout)
        self.n_nics = n_nics
        self.curve_secret_key = curve_secret_key
        self._authorized_arg = authorized
        self.owns = owns
        # the Partition behind `owns` (predicates_from_config attaches it): spill-over
        # loans seen in BORROW_ACK / RETURN are applied to it, so --check-partitions
        # accepts a borrower's rules for the block it borrowed
        self.partition = partition if partition is not None else getattr(owns, "partition", None)
        self.loans_applied = 0
        if self.partition is not None:  # a RETURN names a block of its lender's native space
            self._native_owns = M.Owns(self.partition.geometry, "native")
        self.internal = internal
        self.owner_of = owner_of
        self.check_records = check_records
        self.metrics_port = metrics_port
        self.metrics_addr = metrics_addr
        self.query_timeout = float(query_timeout)
        self.hwm = hwm
        self.ipc_mode = ipc_mode
        self._own_ctx = ctx is None
        self.ctx = ctx if ctx is not None else zmq.Context()

        self.incarnation = M.new_incarnation()
        self.started_at = time.time()
        self.nics: Dict[int, NicState] = {}
        self.by_ident: Dict[bytes, NicState] = {}
        # counters: plain ints, read by the metrics collector and the status query
        self.received = [0] * 256  # by type code (unknown types under their byte)
        self.routed = [0] * 256
        self.drops = {name: 0 for name in DROP_REASON_NAMES}
        self.auth = {name: 0 for name in AUTH_RESULTS}  # written by the ZAP thread only
        self.identity_mismatch = 0  # keys used under another identity (the loop's count)
        self.queries = 0
        self.draining = False  # `hypernat ctl drain`: this server takes no new hosts (hypernat.fleet)
        self._pending: Dict[int, _PendingRule] = {}
        self._next_qid = 1

        self._stop = threading.Event()
        self._ready = threading.Event()
        self._setup_error: Optional[BaseException] = None
        self._thread: Optional[threading.Thread] = None
        self.sock: Optional[zmq.Socket] = None
        self._zap: Optional[ZapHandler] = None
        self._metrics_server = None
        self.bound_endpoint: Optional[str] = None
        self._ipc_file: Optional[tuple] = None

    # ------------------------------------------------------------------ lifecycle
    def run(self) -> None:
        """Bind, serve until ``stop()``, clean up.  Raises CoordinatorError if it cannot
        start (the reason is in the message)."""
        try:
            self._setup()
        except BaseException as exc:
            self._setup_error = exc
            self._ready.set()
            self._teardown()
            raise
        # What is alive now (interpreter, modules, configuration; in the emulated
        # deployment the whole heap of the process it was forked from) is not garbage:
        # out of the collector's sight, no collection walks it while a message waits
        # (in the emulated deployment a gen-1 collection of the inherited heap took 3 ms)
        gc.freeze()
        self._ready.set()
        log.info("coordinator up on %s (incarnation %016x%s)", self.bound_endpoint, self.incarnation,
                 ", CURVE" if self.curve_secret_key else "")
        try:
            self._loop()
        finally:
            self._teardown()
            log.info("coordinator stopped")

    def stop(self) -> None:
        """Ask the loop to finish (thread- and signal-safe); it does within one tick."""
        self._stop.set()

    def start_thread(self, timeout: float = 10.0) -> "Coordinator":
        """Run in a daemon thread; return once bound (raise what setup raised)."""
        self._thread = threading.Thread(target=self._run_quietly, name="hypernat-coord", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise CoordinatorError("coordinator did not start in time")
        if self._setup_error is not None:
            raise self._setup_error
        return self

    def join(self, timeout: Optional[float] = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def _run_quietly(self):
        try:
            self.run()
        except BaseException:  # noqa: BLE001 - reported through _setup_error / the log
            if self._setup_error is None:
                log.exception("coordinator loop failed")

    def _setup(self) -> None:
        ep = self.endpoint
        if requires_curve(ep) and not self.curve_secret_key:
            raise CoordinatorError(
                f"{ep} is reachable off this host: refusing to start without CURVE "
                "(give the coordinator's secret key file and the authorized client keys)")
        sock = self.ctx.socket(zmq.ROUTER)
        self.sock = sock
        sock.linger = 0
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # A reconnecting NIC takes its id back from a stale connection (handover), except
        # under CURVE: there, an authorized key holder could take over another NIC's id
        # and receive its messages, so the live connection keeps the id (a stale TCP
        # connection is closed by ZeroMQ heartbeats within heartbeat_timeout).
        sock.setsockopt(zmq.ROUTER_HANDOVER, 0 if self.curve_secret_key else 1)
        sock.sndhwm = self.hwm
        sock.rcvhwm = self.hwm
        if ep.startswith("tcp://"):  # notice dead TCP peers without waiting for the kernel
            ivl = max(100, int(self.heartbeat_interval * 1000))
            sock.setsockopt(zmq.HEARTBEAT_IVL, ivl)
            sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, max(ivl, int(self.heartbeat_timeout * 1000)))
        if self.curve_secret_key:
            authorized = self._authorized_arg
            if authorized is None:
                raise CoordinatorError("CURVE needs the authorized client keys (none given)")
            if isinstance(authorized, (str, os.PathLike)):
                authorized = load_authorized(str(authorized))
            if not authorized:
                raise CoordinatorError("CURVE needs at least one authorized client key")
            self._zap = ZapHandler(self.ctx, authorized, on_result=self._on_auth)
            self._zap.start()  # before bind: without a handler libzmq lets every key in
            try:
                server_curve(sock, self.curve_secret_key)
            except AuthError as exc:
                raise CoordinatorError(str(exc)) from exc
            sock.setsockopt(zmq.ZAP_DOMAIN, b"hypernat")
        if ep.startswith("ipc://"):
            self._prepare_ipc(ep[len("ipc://"):])
        try:
            sock.bind(ep)
        except zmq.ZMQError as exc:
            raise CoordinatorError(f"cannot bind {ep}: {exc}") from exc
        self.bound_endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT) or ep
        if ep.startswith("ipc://") and not ep.startswith("ipc://@"):
            path = ep[len("ipc://"):]
            try:
                self._ipc_file = (path, os.stat(path).st_ino)  # ours to remove at the end
                if self.ipc_mode is not None:
                    os.chmod(path, self.ipc_mode)
            except OSError as exc:
                log.warning("cannot set mode of %s: %s", ep, exc)
        sock.rcvtimeo = self._tick_ms()
        if self.metrics_port is not None:
            from .metrics import serve

            try:
                self._metrics_server = serve(self, self.metrics_port, self.metrics_addr)
            except OSError as exc:
                where = f"{self.metrics_addr}:{self.metrics_port}"
                raise CoordinatorError(f"cannot serve metrics on {where}: {exc}") from exc

    def _prepare_ipc(self, path: str) -> None:
        """Create the socket's directory; refuse to steal the path from a live
        coordinator (libzmq would silently unlink its socket file)."""
        if path.startswith("@"):  # abstract namespace: nothing on disk
            return
        d = os.path.dirname(path)
        if d:
            os.makedirs(d, exist_ok=True)
        if os.path.exists(path):
            probe = pysocket.socket(pysocket.AF_UNIX, pysocket.SOCK_STREAM)
            try:
                probe.settimeout(0.5)
                probe.connect(path)
            except OSError:
                return  # stale file from a killed coordinator: libzmq replaces it
            finally:
                probe.close()
            raise CoordinatorError(f"another process is serving {path}: refusing to take it over")

    def _teardown(self) -> None:
        if self.sock is not None:
            self.sock.close(0)
            self.sock = None
        if self._ipc_file is not None:  # libzmq leaves the socket file behind
            path, ino = self._ipc_file
            try:
                if os.stat(path).st_ino == ino:  # still ours, not a successor's
                    os.unlink(path)
            except OSError:
                pass
            self._ipc_file = None
        if self._zap is not None:
            self._zap.stop()
            self._zap = None
        if self._metrics_server is not None:
            try:
                self._metrics_server.shutdown()
                self._metrics_server.server_close()
            except Exception:  # noqa: BLE001
                log.exception("stopping the metrics server")
            self._metrics_server = None
        if self._own_ctx:
            self.ctx.term()

    def _tick_ms(self) -> int:
        return max(10, min(100, int(self.heartbeat_interval * 250)))

    # ------------------------------------------------------------------ main loop
    def _loop(self) -> None:
        sock = self.sock
        if self._zap is not None:  # CURVE: frames with metadata, to check each User-Id
            def recv(flags=0):
                return sock.recv_multipart(flags, copy=False)

            handle = self._handle_curve
        else:
            zrecv = zmqio.recv_multipart  # the socket's recv_multipart, minus pyzmq's Python layer

            def recv(flags=0):
                return zrecv(sock, flags)

            handle = self._handle
        tick = self._tick_ms() / 1000.0
        next_tick = time.monotonic() + tick
        stop = self._stop
        readable = zmqio.readable
        while not stop.is_set():
            try:
                msg = recv()  # blocks up to one tick: the hot side wakes at once
            except zmq.Again:
                msg = None
            except zmq.ZMQError as exc:
                if exc.errno == errno.EINTR:
                    continue
                raise
            if msg is not None:
                handle(msg)
                for _ in range(BUDGET):
                    if not readable(sock):  # cheaper than the zmq.Again of a receive that finds nothing
                        break
                    try:
                        msg = recv(zmqio.NOBLOCK)
                    except zmq.Again:
                        break
                    handle(msg)
            now = time.monotonic()
            if now >= next_tick:
                self._housekeeping(now)
                next_tick = now + tick

    def _drop(self, reason: str, ident: bytes = b"", code: int = -1) -> None:
        """Count a drop; log the 1st, 2nd, 4th, 8th, ... of each reason (a flood of bad
        messages must not become a flood of log lines)."""
        n = self.drops[reason] = self.drops[reason] + 1
        if n & (n - 1) == 0:
            what = M.TYPE_NAMES.get(code, "message") if code >= 0 else "message"
            log.warning("dropped a %s from %s: %s (%d so far)", what, _who(ident), reason, n)

    def _handle_curve(self, frames) -> None:
        """CURVE: the socket identity must be one the key's user id may use (see
        ``auth.identity_allowed``); then as ``_handle``."""
        ident = frames[0].bytes
        try:
            user = frames[0].get("User-Id")
        except (zmq.ZMQError, KeyError, ValueError):
            user = None
        if not identity_allowed(user, ident):
            self.identity_mismatch += 1  # (self.auth is the ZAP thread's to write)
            n = self.identity_mismatch
            if n & (n - 1) == 0:
                log.warning("a connection authenticated as %r used the identity %s: a key may not pose as "
                            "another NIC (%d so far)", user, _who(ident), n)
            self._drop("bad_identity", ident)
            squatted = self.by_ident.get(ident)
            if squatted is not None and squatted.up:  # the id's pipe may be the impostor's now
                self._mark_down(squatted, f"a connection authenticated as {user!r} uses its identity")
            return
        self._handle([f.bytes for f in frames])

    def _handle(self, msg) -> None:
        if len(msg) != 4:
            self._drop("bad_frames", msg[0] if msg else b"")
            return
        ident, target, tframe, payload = msg
        code = _TYPE_BY_FRAME.get(tframe)
        if code is None:
            self._drop("unknown_type", ident)
            if len(tframe) == 1:
                self.received[tframe[0]] += 1
            src = self.by_ident.get(ident)
            if src is not None:
                self._undeliverable(ident, tframe[0] if len(tframe) == 1 else 0, "rejected", None, payload)
            return
        self.received[code] += 1
        if target:
            self._route(ident, target, code, tframe, payload)
        else:
            self._local(ident, code, payload)

    # ------------------------------------------------------------------ routing
    def _route(self, ident, target, code, tframe, payload) -> None:
        src = self.by_ident.get(ident)
        if src is None:
            self._drop("not_registered", ident, code)
            self._undeliverable(ident, code, "not_registered", M.parse_identity(target), payload)
            return
        src.last_seen = time.monotonic()
        src.msgs_from += 1
        if not src.up:
            self._mark_up(src, "sent a message")
        if code not in M.ROUTED_TYPES:
            self._drop("wrong_direction", ident, code)
            self._undeliverable(ident, code, "rejected", M.parse_identity(target), payload)
            return
        dst = self.by_ident.get(target)
        if dst is None or not dst.up:
            reason = "unknown_target" if dst is None else "target_down"
            self._drop(reason, ident, code)
            self._undeliverable(ident, code, reason, M.parse_identity(target), payload)
            return
        if self.check_records or self.owns is not None:
            owns = self._native_owns if code == M.T_RETURN and self.partition is not None else self.owns
            reason = M.check(src.nic, code, payload, receiver=dst.nic, owns=owns,
                             internal=self.internal, n_nics=self.n_nics)
        else:  # routed by its header: the records are the receiver's to read
            reason = M.header_reason(code, len(payload))
        if reason is not None:
            self._drop(reason, ident, code)
            self._undeliverable(ident, code, "rejected", dst.nic, payload)
            return
        try:
            zmqio.send_multipart(self.sock, (target, ident, tframe, payload), zmqio.NOBLOCK)
        except zmq.Again:
            self._drop("queue_full", ident, code)
            self._undeliverable(ident, code, "unreachable", dst.nic, payload)
            return
        except zmq.ZMQError as exc:
            if exc.errno != errno.EHOSTUNREACH:
                raise
            self._drop("unreachable", ident, code)
            self._mark_down(dst, "disconnected")
            self._undeliverable(ident, code, "unreachable", dst.nic, payload)
            return
        self.routed[code] += 1
        dst.msgs_to += 1
        if self.partition is not None and code in (M.T_BORROW_ACK, M.T_RETURN):
            self._apply_loans(src.nic, code, payload)

    def _apply_loans(self, sender: int, code: int, payload) -> None:
        """Follow spill-over in the coordinator's own partition view.  A BORROW_ACK (to
        the borrower, or a loan notice) from a block's native owner lends the block to
        its borrower (borrower == lender: taken back); a RETURN from the current borrower
        gives it back.  Anything else is ignored (the NICs validate for themselves)."""
        part = self.partition
        try:
            recs = np.frombuffer(payload, dtype=M.BLOCK_DTYPE)
        except ValueError:
            return
        for r in recs.tolist():
            _, addr, lo, _, lender, borrower, status = r[:7]
            g = part.block_of(addr, lo)
            if g < 0 or part.native_owner_of_block(g) != lender:
                continue
            if code == M.T_BORROW_ACK:
                if status != M.ST_OK or lender != sender or not 0 <= borrower < part.n:
                    continue
                if part.owner_of_block(g) != borrower:
                    part.lend(g, borrower)
                    self.loans_applied += 1
            elif borrower == sender and part.owner_of_block(g) == sender:  # RETURN
                part.return_block(g)
                self.loans_applied += 1

    def _undeliverable(self, ident, code, reason, target, payload) -> None:
        """Tell the sender its message went nowhere (best effort, never blocks)."""
        try:
            body = M.pack_undeliverable(code, reason, target, payload)
            zmqio.send_multipart(self.sock, (ident, M.COORD, M.TYPE_FRAME[M.T_UNDELIVERABLE], body), zmqio.NOBLOCK)
        except zmq.ZMQError:
            pass  # the sender vanished too: nothing to tell

    def _send(self, ident, code, payload) -> bool:
        try:
            zmqio.send_multipart(self.sock, (ident, M.COORD, M.TYPE_FRAME[code], payload), zmqio.NOBLOCK)
            return True
        except zmq.ZMQError:
            return False

    # ------------------------------------------------------------------ local types
    def _local(self, ident, code, payload) -> None:
        if code == M.T_HEARTBEAT:
            self._heartbeat(ident, payload)
        elif code == M.T_HELLO:
            self._hello(ident, payload)
        elif code == M.T_STATS:
            self._stats(ident, payload)
        elif code == M.T_QUERY:
            self._query(ident, payload)
        elif code == M.T_REPLY:
            self._reply(ident, payload)
        else:
            self._drop("wrong_direction", ident, code)
            if ident in self.by_ident:
                self._undeliverable(ident, code, "rejected", None, payload)

    def _hello(self, ident, payload) -> None:
        nic = M.parse_identity(ident)
        d = M.validate(nic, M.TYPE_FRAME[M.T_HELLO], payload, n_nics=self.n_nics)
        if d.reason is None and nic is None:
            d = d._replace(reason="bad_identity")
        if d.reason is not None:
            self._drop(d.reason, ident, M.T_HELLO)
            raw = M.decode(M.TYPE_FRAME[M.T_HELLO], payload)
            if raw.reason is None:
                log.info("the refused HELLO from %s claimed nic%d", _who(ident), int(raw.recs[0]["nic"]))
            return
        rec = d.recs[0]
        now = time.monotonic()
        st = self.nics.get(nic)
        if st is None:
            st = self.nics[nic] = NicState(nic, ident)
            self.by_ident[ident] = st
            log.info("nic%d said HELLO (incarnation %016x)", nic, int(rec["incarnation"]))
        elif st.incarnation != int(rec["incarnation"]):
            log.info("nic%d restarted (incarnation %016x -> %016x)", nic, st.incarnation, int(rec["incarnation"]))
        elif not st.up:
            log.info("nic%d is back (HELLO again)", nic)
        st.incarnation = int(rec["incarnation"])
        st.hello_at = now
        st.hellos += 1
        st.last_seen = now
        st.up = True
        st.down_since = None
        ack = M.records(M.T_HELLO_ACK, 1)
        ack["version"] = M.PROTOCOL_VERSION
        ack["nic"] = nic
        ack["n_nics"] = self.n_nics if self.n_nics is not None else 0
        ack["incarnation"] = self.incarnation
        ack["heartbeat_ms"] = int(self.heartbeat_interval * 1000)
        self._send(ident, M.T_HELLO_ACK, ack.tobytes())
        # everyone learns the table (the new NIC included); a repeated HELLO goes out
        # too, since the NIC's incarnation may have changed
        self._broadcast_peers()

    def _heartbeat(self, ident, payload) -> None:
        st = self.by_ident.get(ident)
        d = M.decode(M.TYPE_FRAME[M.T_HEARTBEAT], payload)
        if d.reason is not None:
            self._drop(d.reason, ident)
            return
        if st is None or int(d.recs[0]["incarnation"]) != st.incarnation:
            # unknown to this coordinator (it restarted) or the NIC restarted: HELLO first
            self._drop("not_registered", ident)
            self._undeliverable(ident, M.T_HEARTBEAT, "not_registered", None, payload)
            return
        st.last_seen = time.monotonic()
        if not st.up:
            self._mark_up(st, "heartbeat")
        echo = d.recs.copy()
        echo["incarnation"] = self.incarnation
        self._send(ident, M.T_HEARTBEAT, echo.tobytes())

    def _stats(self, ident, payload) -> None:
        st = self.by_ident.get(ident)
        if st is None:
            self._drop("not_registered", ident)
            self._undeliverable(ident, M.T_STATS, "not_registered", None, payload)
            return
        d = M.decode(M.TYPE_FRAME[M.T_STATS], payload)
        if d.reason is not None:
            self._drop(d.reason, ident)
            return
        obj = d.recs
        counters = obj.get("counters", {})
        gauges = obj.get("gauges", {})
        if not isinstance(counters, dict) or not isinstance(gauges, dict):
            self._drop("bad_json", ident, M.T_STATS)
            return
        st.stats = {"counters": counters, "gauges": gauges}
        st.stats_at = time.monotonic()
        st.last_seen = st.stats_at

    # ------------------------------------------------------------------ liveness
    def _mark_up(self, st: NicState, why: str) -> None:
        st.up = True
        st.down_since = None
        log.info("nic%d is up again (%s)", st.nic, why)
        self._broadcast_peers()

    def _mark_down(self, st: NicState, why: str) -> None:
        if not st.up:
            return
        st.up = False
        st.down_since = time.monotonic()
        log.warning("nic%d is down: %s", st.nic, why)
        self._broadcast_peers()

    def _housekeeping(self, now: float) -> None:
        limit = self.heartbeat_timeout
        for st in list(self.nics.values()):
            if st.up and now - st.last_seen > limit:
                self._mark_down(st, f"no message for {now - st.last_seen:.1f} s")
        for qid in [q for q, p in self._pending.items() if p.deadline <= now]:
            self._finish_rule_query(qid)

    def _broadcast_peers(self) -> None:
        if not self.nics:
            return
        recs = M.records(M.T_PEERS, len(self.nics))
        for i, st in enumerate(sorted(self.nics.values(), key=lambda s: s.nic)):
            recs[i]["nic"] = st.nic
            recs[i]["state"] = M.PEER_UP if st.up else M.PEER_DOWN
            recs[i]["incarnation"] = st.incarnation
        body = recs.tobytes()
        for st in self.nics.values():
            if st.up:
                self._send(st.ident, M.T_PEERS, body)

    # ------------------------------------------------------------------ control
    def _on_auth(self, result: str, user: bytes) -> None:
        self.auth[result] = self.auth.get(result, 0) + 1

    def auth_counts(self) -> dict:
        """ZAP decisions and per-message identity refusals, by result."""
        out = dict(self.auth)
        out["identity_mismatch"] = out.get("identity_mismatch", 0) + self.identity_mismatch
        return out

    def _query(self, ident, payload) -> None:
        d = M.decode(M.TYPE_FRAME[M.T_QUERY], payload)
        if d.reason is not None:
            self._drop(d.reason, ident)
            return
        q = d.recs
        self.queries += 1
        qid = q.get("id")
        op = q.get("op")
        args = q.get("args") or {}
        try:
            if not isinstance(args, dict):
                raise ValueError("args must be an object")
            if op == "status":
                result = self.status()
            elif op == "nics":
                result = self.nics_table()
            elif op == "counters":
                result = self.counters()
            elif op == "rule":
                self._start_rule_query(ident, qid, args)
                return
            elif op == "drain":
                # Sticky until restart: the fleet speaker (hypernat.fleet.speaker) reads it
                # from ``status`` and stops taking new hosts.
                if not self.draining:
                    log.warning("drain requested: the fleet speaker stops taking new hosts")
                self.draining = True
                result = self.status()
            else:
                raise ValueError(f"unknown op {op!r} (status, nics, counters, rule, drain)")
        except (ValueError, TypeError, KeyError) as exc:
            self._drop("bad_query", ident, M.T_QUERY)
            self._send(ident, M.T_REPLY, M.pack_json({"id": qid, "ok": False, "error": str(exc)}))
            return
        self._send(ident, M.T_REPLY, M.pack_json({"id": qid, "ok": True, "result": result}))

    def _start_rule_query(self, client, client_id, args) -> None:
        addr = M.ip_int(str(args["addr"]))
        port = int(args["port"])
        if not 0 <= port <= 65535:
            raise ValueError(f"port {port} out of range")
        proto = args.get("proto")
        if proto is not None and int(proto) not in M.VALID_PROTOS:
            raise ValueError(f"protocol {proto} is not TCP, UDP or ICMP")
        qargs = {"addr": M.ip_str(addr), "port": port}
        if proto is not None:  # absent = any protocol (NICs test "proto" in args)
            qargs["proto"] = int(proto)
        qid = self._next_qid
        self._next_qid += 1
        up = [st for st in self.nics.values() if st.up]
        p = _PendingRule(client, client_id, [st.nic for st in up], time.monotonic() + self.query_timeout, qargs)
        self._pending[qid] = p
        body = M.pack_json({"id": qid, "op": "rule", "args": qargs})
        for st in up:
            if not self._send(st.ident, M.T_QUERY, body):
                p.waiting.discard(st.nic)
                p.answers[f"nic{st.nic}"] = {"ok": False, "error": "unreachable"}
        if not p.waiting:
            self._finish_rule_query(qid)

    def _reply(self, ident, payload) -> None:
        st = self.by_ident.get(ident)
        d = M.decode(M.TYPE_FRAME[M.T_REPLY], payload)
        if st is None or d.reason is not None:
            self._drop("not_registered" if st is None else d.reason, ident, M.T_REPLY)
            return
        qid = d.recs.get("id")
        p = self._pending.get(qid) if isinstance(qid, int) else None
        if p is None or st.nic not in p.waiting:
            return  # late answer to a query that already timed out
        p.waiting.discard(st.nic)
        ans = {"ok": bool(d.recs.get("ok"))}
        if "result" in d.recs:
            ans["result"] = d.recs["result"]
        if "error" in d.recs:
            ans["error"] = d.recs["error"]
        p.answers[f"nic{st.nic}"] = ans
        if not p.waiting:
            self._finish_rule_query(qid)

    def _finish_rule_query(self, qid) -> None:
        p = self._pending.pop(qid, None)
        if p is None:
            return
        result = {"query": p.args, "answers": p.answers, "missing": sorted(f"nic{n}" for n in p.waiting)}
        if self.owner_of is not None:
            try:
                owner = int(self.owner_of(M.ip_int(p.args["addr"]), p.args["port"]))
                result["owner"] = None if owner < 0 else f"nic{owner}"
            except Exception:  # noqa: BLE001 - informative only
                result["owner"] = None
        self._send(p.client, M.T_REPLY, M.pack_json({"id": p.client_id, "ok": True, "result": result}))

    # ------------------------------------------------------------------ views
    def status(self) -> dict:
        up = sum(1 for st in self.nics.values() if st.up)
        return {
            "endpoint": self.bound_endpoint or self.endpoint,
            "incarnation": f"{self.incarnation:016x}",
            "uptime_s": round(time.time() - self.started_at, 3),
            "curve": bool(self.curve_secret_key),
            "protocol": M.PROTOCOL_VERSION,
            "nics_up": up,
            "nics_known": len(self.nics),
            "messages_received": sum(self.received),
            "messages_routed": sum(self.routed),
            "drops": sum(self.drops.values()),
            "auth_refused": sum(v for k, v in self.auth_counts().items() if k != "accepted"),
            "draining": self.draining,
        }

    def nics_table(self) -> list:
        now = time.monotonic()
        out = []
        for st in sorted(self.nics.values(), key=lambda s: s.nic):
            out.append({
                "nic": st.nic,
                "up": st.up,
                "incarnation": f"{st.incarnation:016x}",
                "last_seen_s": round(now - st.last_seen, 3),
                "hellos": st.hellos,
                "messages_from": st.msgs_from,
                "messages_to": st.msgs_to,
                "stats_age_s": round(now - st.stats_at, 3) if st.stats_at else None,
            })
        return out

    def counters(self) -> dict:
        """Sum of the NICs' last STATS, each NIC's own, and the coordinator's."""
        total: dict = {}
        per_nic = {}
        for st in sorted(self.nics.values(), key=lambda s: s.nic):
            c = st.stats.get("counters", {})
            per_nic[f"nic{st.nic}"] = c
            _sum_into(total, c)
        return {
            "total": total,
            "per_nic": per_nic,
            "gauges": {f"nic{st.nic}": st.stats.get("gauges", {}) for st in self.nics.values() if st.up},
            "coordinator": {
                "received": {M.TYPE_NAMES.get(c, f"0x{c:02x}"): n for c, n in enumerate(self.received) if n},
                "routed": {M.TYPE_NAMES[c]: n for c, n in enumerate(self.routed) if n},
                "drops": {k: v for k, v in self.drops.items() if v},
                "auth": {k: v for k, v in self.auth_counts().items() if v},
            },
        }


def _who(ident: bytes) -> str:
    """A socket identity for the log: nic3, or the anonymous id in hex."""
    nic = M.parse_identity(ident)
    return f"nic{nic}" if nic is not None else f"socket {bytes(ident).hex() or '(empty)'}"


def _sum_into(total: dict, add: dict) -> None:
    """total += add, recursively over nested dicts of numbers (others ignored)."""
    for k, v in add.items():
        if isinstance(v, dict):
            sub = total.setdefault(k, {})
            if isinstance(sub, dict):
                _sum_into(sub, v)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            cur = total.get(k, 0)
            if isinstance(cur, (int, float)):
                total[k] = cur + v


def predicates_from_config(cfg):
    """(owns, internal, owner_of) for a loaded Config: partition arithmetic and the
    internal prefixes, compiled (``messages.Owns``, ``messages.Prefixes``).
    ``owns.geometry`` is the Partition's: a Coordinator given this ``owns`` follows
    spill-over loans in it (BORROW_ACK / RETURN it routes), through ``owns.partition``."""
    from ..partition import Partition

    part = Partition.from_config(cfg)
    owns = _PartitionOwns(part)
    internal = M.Prefixes(cfg.internal)
    return owns, internal, part.owner


class _PartitionOwns(M.Owns):
    """``messages.Owns`` (loans applied) that remembers its Partition (``.partition``)."""

    def __init__(self, part):
        super().__init__(part.geometry, "now")
        self.partition = part

