"""The emulated deployment: the whole gateway as real processes on one machine.

The coordinator and N NIC workers run as child processes (the same ``Coordinator`` and
``NicWorker`` code that runs on real links), connected to each other over ``ipc://``
and to this process over shared-memory rings (``hypernat.io.memory``).  This process
plays the paper's testbed (Fig. 3): the *switch* that spreads outgoing packets over the
NICs with SHA-1 over the 5-tuple, and the *Internet* that answers every packet (swap the
addresses, hash the reply independently, hand it to whichever NIC that picks):

      clients (VPC)            NIC 0 … NIC N-1 (processes)             Internet
   conn c: packet i ──sha1──► inside_rx[k] ─► worker k ─► outside_tx[k] ─► check, answer
                                                                          │ swap, sha1
   check reply  ◄── inside_tx[j] ◄─ worker j ◄─ outside_rx[j] ◄───────────┘
   (dst == I:Ip?)          ▲ FETCH / RULE through the coordinator when j != k

Each connection is a ping-pong of ``packets`` outgoing packets (TCP: SYN, then ACKs;
UDP datagrams), each answered once; a packet lost on the way is sent again after
``rto`` seconds (like TCP), so drops during a fault show up as retransmissions, not
hangs (a slow original and its retransmission both answered count as ``duplicates``,
not as errors).  The report says, per run: connections, how many had their two directions on
different NICs, completed ones, clones installed, fetches, drops by reason, checksum
errors seen by either end, and whether every packet came back translated consistently:

  * every outgoing packet of a connection left with one external endpoint (E, Ep);
  * every reply reached the connection's own internal endpoint, from its remote;
  * no external endpoint was held by two internal endpoints (invariant 1).

``run_emulated(config, flows)`` is the one-call form (tests, benchmarks, ``hypernat
demo`` without root); ``Emulation`` gives the steps (faults in between) to tests.
"""
from __future__ import annotations

import collections
import ipaddress
import logging
import multiprocessing as mp
import os
import select
import signal
import struct
import tempfile
import time
from dataclasses import dataclass, field

from ..packets import inet_checksum
from ..agent import predict_nic
from ..io.memory import ShmPort, ShmRing

log = logging.getLogger("hypernat.lab.emulated")

TCP, UDP, ICMP = 6, 17, 1
SYN, ACK, FIN, RST = 0x02, 0x10, 0x01, 0x04
MAGIC = b"HNEM"
MAC_A = b"\x02\x00\x00\x00\x00\x01"
MAC_B = b"\x02\x00\x00\x00\x00\x02"

# -------------------------------------------------------------------------------- frames


def build_frame(proto: int, src: int, sport: int, dst: int, dport: int, flags: int = ACK,
                payload: bytes = b"", ttl: int = 64, seq: int = 0) -> bytes:
    """An Ethernet/IPv4 frame with a TCP, UDP or ICMP echo (request: sport = id) header
    and correct checksums."""
    if proto == TCP:
        l4 = struct.pack("!HHIIBBHHH", sport, dport, seq, 0, 5 << 4, flags, 65535, 0, 0) + payload
    elif proto == UDP:
        l4 = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    elif proto == ICMP:
        l4 = struct.pack("!BBHHH", 8 if flags != 0 else 0, 0, 0, sport, seq & 0xFFFF) + payload
    else:
        raise ValueError(proto)
    if proto in (TCP, UDP):
        pseudo = struct.pack("!IIBBH", src, dst, 0, proto, len(l4))
        c = inet_checksum(pseudo + l4)
        if proto == UDP and c == 0:
            c = 0xFFFF
        off = 16 if proto == TCP else 6
        l4 = l4[:off] + struct.pack("!H", c) + l4[off + 2 :]
    else:
        l4 = l4[:2] + struct.pack("!H", inet_checksum(l4)) + l4[4:]
    ip = struct.pack("!BBHHHBBHII", 0x45, 0, 20 + len(l4), 0, 0, ttl, proto, 0, src, dst)
    ip = ip[:10] + struct.pack("!H", inet_checksum(ip)) + ip[12:]
    return MAC_B + MAC_A + b"\x08\x00" + ip + l4


def build_icmp_error(router: int, dst: int, embedded_ip: bytes, icmp_type: int = 3, code: int = 4,
                     mtu: int = 1400) -> bytes:
    """An ICMP error (default: fragmentation needed) from `router` to `dst` quoting the
    first 28 bytes of `embedded_ip` (an IPv4 packet)."""
    quote = embedded_ip[:28]
    body = struct.pack("!BBHHH", icmp_type, code, 0, 0, mtu if icmp_type == 3 else 0) + quote
    body = body[:2] + struct.pack("!H", inet_checksum(body)) + body[4:]
    ip = struct.pack("!BBHHHBBHII", 0x45, 0, 20 + len(body), 0, 0, 64, ICMP, 0, router, dst)
    ip = ip[:10] + struct.pack("!H", inet_checksum(ip)) + ip[12:]
    return MAC_B + MAC_A + b"\x08\x00" + ip + body


@dataclass
class Parsed:
    proto: int
    src: int
    sport: int
    dst: int
    dport: int
    flags: int
    checksum_ok: bool
    icmp_type: int = -1
    inner: tuple | None = None  # ICMP error: (proto, src, sport, dst, dport) of the quote
    ip: bytes = b""


def parse_frame(f: bytes) -> Parsed | None:
    """The 5-tuple of an Ethernet/IPv4 frame and whether its checksums verify."""
    if len(f) < 34 or f[12:14] != b"\x08\x00":
        return None
    ihl = (f[14] & 15) * 4
    tot = struct.unpack_from("!H", f, 16)[0]
    ip = f[14 : 14 + tot]
    proto = ip[9]
    src, dst = struct.unpack_from("!II", ip, 12)
    ok = inet_checksum(ip[:ihl]) == 0
    l4 = ip[ihl:]
    if proto in (TCP, UDP):
        sport, dport = struct.unpack_from("!HH", l4, 0)
        flags = l4[13] if proto == TCP else 0
        if proto == TCP or struct.unpack_from("!H", l4, 6)[0] != 0:
            ok &= inet_checksum(struct.pack("!IIBBH", src, dst, 0, proto, len(l4)) + l4) == 0
        return Parsed(proto, src, sport, dst, dport, flags, ok, ip=ip)
    if proto == ICMP:
        t = l4[0]
        ok &= inet_checksum(l4) == 0
        if t in (0, 8):
            ident = struct.unpack_from("!H", l4, 4)[0]
            return Parsed(proto, src, ident, dst, ident, 1 if t == 8 else 0, ok, icmp_type=t, ip=ip)
        inner_ip = l4[8:]
        ip2 = (inner_ip[0] & 15) * 4
        ip_ok = inet_checksum(inner_ip[:ip2]) == 0
        p2 = inner_ip[9]
        s2, d2 = struct.unpack_from("!II", inner_ip, 12)
        sp2, dp2 = struct.unpack_from("!HH", inner_ip, ip2)
        if p2 == ICMP:
            sp2 = dp2 = struct.unpack_from("!H", inner_ip, ip2 + 4)[0]
        return Parsed(proto, src, 0, dst, 0, 0, ok and ip_ok, icmp_type=t, inner=(p2, s2, sp2, d2, dp2), ip=ip)
    return None


# ------------------------------------------------------------------------------ workload


def _payload(cid: int, i: int) -> bytes:
    return MAGIC + struct.pack("!IH", cid, i)


@dataclass
class Conn:
    """One connection of the workload and what was observed of it."""

    cid: int
    proto: int
    iaddr: int
    iport: int
    raddr: int
    rport: int
    packets: int = 4
    icmp_error_at: int = -1  # the Internet answers this packet with an ICMP error
    sent: int = 0  # packets sent (the current one is sent - 1)
    acked: int = 0  # replies received
    tries: int = 0
    last_tx: float = 0.0
    out_nic: int = -1
    in_nics: set = field(default_factory=set)
    ext: set = field(default_factory=set)  # (E, Ep) seen at the Internet
    bad: list = field(default_factory=list)
    done: bool = False
    icmp_ok: bool = False

    def out_tuple(self):
        return (self.proto, self.iaddr, self.iport, self.raddr, self.rport)


def make_conns(config, n: int, packets: int = 4, protos=(TCP, UDP), seed: int = 1,
               hosts: int | None = None, remote_net: str = "192.0.2.0/24", icmp_every: int = 0) -> list:
    """`n` connections from internal hosts of the config to remotes in `remote_net`.
    `hosts` internal addresses are shared by the connections (default n // 4 + 1), so
    endpoint-independent mapping sees hosts with several connections.  ``icmp_every``
    > 0: every such connection gets its second packet answered by an ICMP error."""
    import random

    rnd = random.Random(seed)
    inet = config.internal[0]
    rnet = ipaddress.ip_network(remote_net)
    hosts = hosts or max(1, n // 4 + 1)
    base = int(inet.network_address) + 10
    out, used = [], set()
    for c in range(n):
        proto = protos[c % len(protos)]
        for _ in range(10_000):  # a random pick of a distinct tuple; bounded if the space runs out
            t = (proto, base + rnd.randrange(hosts), rnd.randrange(1024, 65535),
                 int(rnet.network_address) + 1 + rnd.randrange(rnet.num_addresses - 2),
                 rnd.choice((53, 80, 443, 8080)) if proto != ICMP else 0)
            if proto == ICMP:
                t = (proto, t[1], t[2], t[3], t[2])
            if t not in used:
                used.add(t)
                break
        else:
            raise ValueError(f"cannot pick {n} distinct connections from {hosts} hosts and {remote_net}")
        conn = Conn(c, *t, packets=packets)
        if icmp_every and c % icmp_every == 0 and packets >= 3 and proto != ICMP:
            conn.icmp_error_at = 1
        out.append(conn)
    return out


_PRIVATE_DIRS: list = []


def _private_dir() -> str:
    """A temporary directory for one emulated config (coordinator socket, state),
    removed when the process that made it exits (child processes leave it alone)."""
    if not _PRIVATE_DIRS:
        import atexit
        import shutil

        owner = os.getpid()
        atexit.register(lambda: os.getpid() == owner and [shutil.rmtree(p, ignore_errors=True)
                                                           for p in _PRIVATE_DIRS])
    d = tempfile.mkdtemp(prefix=f"hn-emu-{os.getpid()}-")
    _PRIVATE_DIRS.append(d)
    return d


def emulated_config(n_nics: int = 2, *, mapping: str = "endpoint-independent", install: str = "passive",
                    filtering: str = "address-and-port-dependent", state_dir: str | None = None,
                    endpoint: str | None = None, timeouts: dict | None = None, limits: dict | None = None,
                    pool: str = "198.18.0.0/30", partition: str = "by-port", ports=(1024, 65535)):
    """A Config for the emulated deployment (memory I/O, ipc:// in a private directory)."""
    from ..config import from_dict

    d = _private_dir()
    lim = {"flow_table_capacity": 65536, "port_block_size": 64, "fetch_timeout_ms": 100, "fetch_retries": 4,
           "lease_duration": 60}
    lim.update(limits or {})
    tmo = {"udp": 300, "tcp_established": 7440, "tcp_transitory": 240, "icmp": 60, "reuse_delay": 120}
    tmo.update(timeouts or {})
    if any(tmo[k] < v for k, v in (("udp", 120), ("tcp_established", 7440), ("tcp_transitory", 240),
                                   ("icmp", 60))):
        tmo["force"] = True
    tree = {
        "internal": {"prefixes": ["10.0.0.0/16"]},
        "external": {"pool": [pool], "ports": list(ports)},
        "partition": partition,
        "nics": [{"id": i, "inside": f"emu-in{i}", "outside": f"emu-out{i}", "io": "memory"} for i in range(n_nics)],
        "coordinator": {"endpoint": endpoint or f"ipc://{d}/coord.sock", "heartbeat_interval": 0.2,
                        "heartbeat_timeout": 2.0},
        "install": install,
        "switch": {"hash": "sha1", "fields": "5-tuple", "seed": 0},
        "mapping": mapping,
        "filtering": filtering,
        "timeouts": tmo,
        "limits": lim,
        "metrics": {"enabled": False},
        "state_dir": state_dir or os.path.join(d, "state"),
    }
    return from_dict(tree, path="<emulated>")


# --------------------------------------------------------------------------- processes


def _coord_main(cfg, endpoint, ready):
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from ..coord.broker import Coordinator, predicates_from_config

    # the receiving NICs check partitions and internal prefixes (the coordinator's default);
    # the coordinator checks structure, identity and routing
    _, _, owner_of = predicates_from_config(cfg)
    c = Coordinator(endpoint, heartbeat_interval=cfg.coordinator.heartbeat_interval,
                    heartbeat_timeout=cfg.coordinator.heartbeat_timeout, n_nics=cfg.n_nics,
                    owner_of=owner_of)
    signal.signal(signal.SIGTERM, lambda *_: c.stop())
    ready.set()
    c.run()


def _nic_main(cfg, nic, rings, endpoint, state_dir, results, snapshot_on_stop, ready, params, events=None):
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.WARNING)
    from ..nic.worker import NicWorker

    inside = ShmPort(f"in{nic}", rx=rings[0], tx=rings[1])
    outside = ShmPort(f"out{nic}", rx=rings[2], tx=rings[3])
    log_ = None
    if events is not None:  # (capacity, hits): the worker's event log, returned with its report
        from ..nic.events import EventLog

        log_ = EventLog(*events)
    w = NicWorker(cfg, nic, inside, outside, endpoint=endpoint, state_dir=state_dir, params=params, events=log_)
    signal.signal(signal.SIGTERM, lambda *_: w.stop())
    ready.set()
    try:
        w.run()
    finally:
        info = w.shutdown(snapshot=snapshot_on_stop)
        results.put((nic, {"counters": w.counters_dict(), "gauges": w.gauges(), "recovery": w.recovery,
                           "shutdown": info, "latencies": list(w.agent.fetch_latencies),
                           "events": None if log_ is None else log_.snapshot(),
                           "events_dropped": 0 if log_ is None else log_.dropped}))


class Emulation:
    """The coordinator, N NIC workers and the switch/Internet around them.

    ``events=capacity`` gives every NIC worker an event log (``hypernat.nic.events``) of
    that many records (``event_hits=True``: hits too, not only misses); each NIC's
    report then carries ``events`` (EVENT_DTYPE, oldest first) and ``events_dropped``."""

    def __init__(self, config, *, endpoint: str | None = None, ring_slots: int = 8192, slot_size: int = 256,
                 rto: float = 0.5, max_tries: int = 30, snapshot_on_stop: bool = True, params=None,
                 switch_hash: str = "sha1", events: int | None = None, event_hits: bool = False):
        self.cfg = config
        self.n = config.n_nics
        self.endpoint = endpoint or config.coordinator.endpoint
        self.ctx = mp.get_context("fork")
        self.rings = [tuple(ShmRing(ring_slots, slot_size) for _ in range(4)) for _ in range(self.n)]
        self.results = self.ctx.Queue()
        self.procs: dict = {}
        self.coord = None
        self.rto = rto
        self.max_tries = max_tries
        self.snapshot_on_stop = snapshot_on_stop
        self.params = params
        self.hash = switch_hash
        self.events = None if events is None else (int(events), bool(event_hits))
        self.conns: list[Conn] = []
        self.by_out: dict = {}  # out 5-tuple -> conn
        self.ext_owner: dict = {}  # (proto, E, Ep) -> set of (proto, I, Ip)
        self.nic_reports: dict = {}
        self.stray = collections.Counter()
        self.streamed = collections.Counter()  # cid -> stream packets delivered inside
        self.duplicates = 0
        self.retransmissions = 0
        self._poll = select.poll()
        for k in range(self.n):
            self._poll.register(self.rings[k][1].note.fd, select.POLLIN)
            self._poll.register(self.rings[k][3].note.fd, select.POLLIN)

    # -- processes ---------------------------------------------------------------------
    def start(self) -> "Emulation":
        if self.endpoint.startswith("ipc://"):
            os.makedirs(os.path.dirname(self.endpoint[6:]), exist_ok=True)
        self.start_coordinator()
        for k in range(self.n):
            self.start_nic(k)
        self.wait_registered()
        return self

    def start_coordinator(self) -> None:
        ready = self.ctx.Event()
        self.coord = self.ctx.Process(target=_coord_main, args=(self.cfg, self.endpoint, ready), daemon=True,
                                      name="hn-coord")
        self.coord.start()
        if not ready.wait(10):
            raise RuntimeError("the coordinator did not start within 10 s")

    def kill_coordinator(self, sig=signal.SIGKILL) -> None:
        if self.coord is not None and self.coord.is_alive():
            os.kill(self.coord.pid, sig)
            self.coord.join(5)
            if self.coord.is_alive():
                log.warning("the coordinator did not stop within 5 s after signal %d: killed", sig)
                self.coord.kill()
                self.coord.join(5)
        self.coord = None

    def start_nic(self, k: int) -> None:
        ready = self.ctx.Event()
        state = os.path.join(self.cfg.state_dir, f"nic{k}")
        p = self.ctx.Process(target=_nic_main, args=(self.cfg, k, self.rings[k], self.endpoint, state, self.results,
                                                      self.snapshot_on_stop, ready, self.params, self.events),
                             daemon=True, name=f"hn-nic{k}")
        p.start()
        self.procs[k] = p
        if not ready.wait(20):
            raise RuntimeError(f"nic{k} did not start")

    def stop_nic(self, k: int, sig=signal.SIGTERM, timeout: float = 10.0) -> dict | None:
        """Stop NIC k (SIGTERM: graceful, snapshot; SIGKILL: crash).  Returns its final
        report for a graceful stop."""
        p = self.procs.pop(k)
        os.kill(p.pid, sig)
        rep = None
        if sig != signal.SIGKILL:
            rep = self._collect(k, timeout)
        p.join(timeout)
        if p.is_alive():  # did not stop in time: a crash, then
            log.warning("nic%d did not stop within %g s after signal %d: killed", k, timeout, sig)
            p.kill()
            p.join(timeout)
        return rep

    def _collect(self, k, timeout) -> dict | None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                nic, rep = self.results.get(timeout=0.2)
            except Exception:  # noqa: BLE001 - queue.Empty
                self.pump(0.0)
                continue
            self.nic_reports.setdefault(nic, []).append(rep)
            if nic == k:
                return rep
        return None

    def wait_registered(self, timeout: float = 10.0) -> None:
        """Wait until every NIC has said HELLO (the coordinator answers `status`)."""
        from ..coord.ctl import CtlClient

        end = time.monotonic() + timeout
        cl = CtlClient(self.endpoint, timeout=1.0)
        try:
            while time.monotonic() < end:
                try:
                    st = cl.query("nics")
                    up = [r for r in st if r.get("up")] if isinstance(st, list) else []
                    if len(up) >= self.n:
                        return
                except Exception:  # noqa: BLE001 - not up yet
                    pass
                time.sleep(0.05)
        finally:
            cl.close()
        raise RuntimeError("NICs did not register with the coordinator in time")

    def close(self) -> dict:
        for k in list(self.procs):
            try:
                self.stop_nic(k)
            except (OSError, KeyError):
                pass
        self.kill_coordinator(signal.SIGTERM)
        for r in self.rings:
            for ring in r:
                ring.close()
        self.results.close()
        return self.nic_reports

    # -- the switch and the Internet ----------------------------------------------------------
    def nic_for(self, proto, s, sp, d, dp) -> int:
        return predict_nic(self.hash, self.n, proto, s, sp, d, dp, self.cfg.switch.seed, self.cfg.switch.fields)

    def add(self, conns) -> None:
        for c in conns:
            c.cid = len(self.conns)
            self.conns.append(c)
            self.by_out[c.out_tuple()] = c

    def _send_out(self, c: Conn, now: float) -> None:
        i = c.acked
        if c.proto == TCP:
            flags = SYN if i == 0 else (FIN | ACK if i == c.packets - 1 and c.packets > 2 else ACK)
        else:
            flags = 1
        f = build_frame(c.proto, c.iaddr, c.iport, c.raddr, c.rport, flags=flags, payload=_payload(c.cid, i), seq=i)
        k = self.nic_for(*c.out_tuple())
        c.out_nic = k if c.out_nic < 0 else c.out_nic
        self.rings[k][0].push_frames([f])
        c.tries += 1
        c.last_tx = now
        c.sent = i + 1

    def _conn_of(self, p: Parsed):
        """The connection a frame belongs to: its payload carries the connection id
        (MAGIC + cid), which no translation touches."""
        ihl = (p.ip[0] & 15) * 4
        l4 = 20 if p.proto == TCP else 8
        pl = p.ip[ihl + l4 : ihl + l4 + 8]
        if len(pl) < 8 or pl[:4] != MAGIC:
            return None
        cid = struct.unpack_from("!I", pl, 4)[0]
        return self.conns[cid] if cid < len(self.conns) else None

    def _internet(self, frames, now) -> None:
        for f in frames:
            p = parse_frame(f)
            if p is None:
                self.stray["internet_unparsed"] += 1
                continue
            if not p.checksum_ok:
                self.stray["internet_bad_checksum"] += 1
            if p.proto == ICMP and p.icmp_type not in (0, 8):
                self.stray["internet_icmp_error"] += 1
                continue
            c = self._conn_of(p)
            if c is None:
                self.stray["internet_unknown"] += 1
                continue
            if p.dst != c.raddr or (p.proto != ICMP and p.dport != c.rport):  # ICMP: the id is translated
                c.bad.append(("out_dst", p.dst, p.dport))
            c.ext.add((p.src, p.sport))
            self.ext_owner.setdefault((p.proto, p.src, p.sport), set()).add((p.proto, c.iaddr, c.iport))
            if c.icmp_error_at == c.acked and not c.icmp_ok:
                router = (c.raddr & 0xFFFFFF00) | 254  # a router near R
                reply = build_icmp_error(router, p.src, p.ip)
                k = self.nic_for(ICMP, router, 0, p.src, 0)
            else:
                if p.proto == TCP:
                    fl = (SYN | ACK) if p.flags & SYN else (FIN | ACK if p.flags & FIN else ACK)
                else:
                    fl = 0
                reply = build_frame(p.proto, p.dst, p.dport, p.src, p.sport, flags=fl, payload=_payload(c.cid, c.acked))
                k = self.nic_for(p.proto, p.dst, p.dport, p.src, p.sport)
            c.in_nics.add(k)
            self.rings[k][2].push_frames([reply])

    def _client(self, frames, now) -> None:
        for f in frames:
            p = parse_frame(f)
            if p is None:
                self.stray["client_unparsed"] += 1
                continue
            if not p.checksum_ok:
                self.stray["client_bad_checksum"] += 1
            if p.proto == ICMP and p.icmp_type not in (0, 8):
                c = self.by_out.get(p.inner) if p.inner else None
                if c is None:
                    self.stray["client_icmp_unknown"] += 1
                    continue
                if p.dst != c.iaddr:
                    c.bad.append(("icmp_error_dst", p.dst))
                if c.acked < c.sent and not c.icmp_ok:
                    c.icmp_ok = True
                    c.acked += 1
                    self._next(c, now)
                continue
            c = self._conn_of(p)
            if c is None:
                self.stray["client_unknown"] += 1
                continue
            if (p.dst, p.dport, p.src, p.sport) != (c.iaddr, c.iport, c.raddr, c.rport):
                c.bad.append(("in_mismatch", p.dst, p.dport, p.src, p.sport))
                continue
            self.streamed[c.cid] += 1 if p.ip.find(b"stream", 20) >= 0 else 0
            if c.done or c.acked >= c.sent or p.ip.find(b"stream", 20) >= 0:
                if p.ip.find(b"stream", 20) < 0:
                    self.duplicates += 1  # the reply to a retransmission whose original was slow, not lost
                continue
            c.acked += 1
            self._next(c, now)

    def _next(self, c: Conn, now: float) -> None:
        c.tries = 0
        if c.acked >= c.packets:
            c.done = True
        else:
            self._send_out(c, now)

    def pump(self, timeout: float = 0.01) -> int:
        """Move frames once: NIC outputs to the Internet / the clients; returns frames moved."""
        now = time.monotonic()
        moved = 0
        for k in range(self.n):
            fr = self.rings[k][3].pop_frames()
            if fr:
                moved += len(fr)
                self._internet(fr, now)
            fr = self.rings[k][1].pop_frames()
            if fr:
                moved += len(fr)
                self._client(fr, now)
        if not moved and timeout > 0:
            self._poll.poll(int(timeout * 1000))
        return moved

    def pump_for(self, seconds: float) -> None:
        """Move frames (and nothing else) for `seconds`."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.pump(min(0.01, max(0.0, end - time.monotonic())))

    def run(self, conns=None, timeout: float = 30.0, stop_when=None) -> bool:
        """Start `conns` (all at once) and pump until every connection completed (or
        gave up after max_tries), `stop_when()` is true, or `timeout` passed."""
        now = time.monotonic()
        if conns:
            self.add(conns)
            for c in conns:
                self._send_out(c, now)
        end = now + timeout
        while time.monotonic() < end:
            self.pump(0.005)
            now = time.monotonic()
            busy = False
            for c in self.conns:
                if c.done or c.tries == 0:
                    continue
                busy = True
                if now - c.last_tx >= self.rto:
                    if c.tries >= self.max_tries:
                        c.tries = 0  # given up: reported as incomplete
                        continue
                    self._send_out(c, now)
                    self.retransmissions += 1
            if stop_when is not None and stop_when():
                return True
            if not busy:
                return all(c.done for c in self.conns)
        return all(c.done for c in self.conns)

    def resume(self, conns, packets: int) -> None:
        """Give finished connections `packets` more packets and start them again."""
        now = time.monotonic()
        for c in conns:
            c.packets += packets
            c.done = False
            self._send_out(c, now)

    def inject_incoming(self, c: Conn, n: int = 1) -> int:
        """The remote sends n unsolicited packets of connection c (a download / stream)
        to its external endpoint; returns the NIC they land on."""
        (e, ep), = c.ext
        k = self.nic_for(c.proto, c.raddr, c.rport, e, ep)
        fr = [build_frame(c.proto, c.raddr, c.rport, e, ep, flags=ACK if c.proto == TCP else 0,
                          payload=_payload(c.cid, 0) + b"stream")
              for _ in range(n)]
        self.rings[k][2].push_frames(fr)
        c.in_nics.add(k)
        return k

    def inject_scan(self, remote: int, count: int, proto: int = TCP, seed: int = 7) -> None:
        """A port scan from `remote` over the external pool's ports (SYNs)."""
        import random

        rnd = random.Random(seed)
        pool = self.cfg.pool[0]
        per_nic = collections.defaultdict(list)
        for _ in range(count):
            e = int(pool.network_address) + rnd.randrange(pool.num_addresses)
            ep = rnd.randrange(1024, 65536)
            sp = rnd.randrange(1024, 65536)
            f = build_frame(proto, remote, sp, e, ep, flags=SYN)
            per_nic[self.nic_for(proto, remote, sp, e, ep)].append(f)
        for k, fr in per_nic.items():
            for i in range(0, len(fr), 1024):
                self.rings[k][2].push_frames(fr[i : i + 1024])

    # -- the verdict -------------------------------------------------------------------------------
    def check(self) -> dict:
        """Consistency of everything observed so far."""
        inconsistent = [c.cid for c in self.conns if len(c.ext) > 1 or c.bad]
        shared = {k: v for k, v in self.ext_owner.items() if len(v) > 1}
        # endpoint-independent mapping: one external endpoint per internal endpoint
        by_int = collections.defaultdict(set)
        for c in self.conns:
            for e in c.ext:
                by_int[(c.proto, c.iaddr, c.iport)].add(e)
        eim_violations = sum(1 for v in by_int.values() if len(v) > 1)
        complete = sum(1 for c in self.conns if c.done)
        icmp = [c for c in self.conns if c.icmp_error_at >= 0]
        return {
            "connections": len(self.conns),
            "completed": complete,
            "split": sum(1 for c in self.conns if c.in_nics and c.in_nics != {c.out_nic}),
            "inconsistent": len(inconsistent),
            "shared_external": len(shared),
            "eim_violations": eim_violations,
            "icmp_errors": len(icmp),
            "icmp_errors_translated": sum(1 for c in icmp if c.icmp_ok),
            "stray": dict(self.stray),
            "duplicates": self.duplicates,
            "retransmissions": self.retransmissions,
            "consistent": not inconsistent and not shared and complete == len(self.conns)
            and not self.stray.get("internet_bad_checksum") and not self.stray.get("client_bad_checksum"),
        }


def summarize(nic_reports: dict) -> dict:
    """Sum the NICs' final counters: clones, fetches, drops by reason."""
    tot = collections.Counter()
    for reps in nic_reports.values():
        if reps:
            tot.update(reps[-1]["counters"])
    drops = {k.split("_", 1)[1]: v for k, v in tot.items()
             if v and (k.startswith("rules_") or k in ("agent_fetch_timeout", "agent_fetch_nack",
                                                       "agent_fetch_negative_cached", "agent_fetch_rate_limited",
                                                       "agent_pending_queue_full", "agent_bad_message",
                                                       "agent_lease_expired", "loop_tx_drops", "loop_replay_miss"))}
    return {
        "clones_installed": tot.get("agent_clones_installed", 0),
        "fetches": tot.get("agent_fetches", 0),
        "fetch_retries": tot.get("agent_fetch_retries", 0),
        "pushes": tot.get("agent_pushes", 0),
        "push_installed": tot.get("agent_push_installed", 0),
        "drops": drops,
        "counters": dict(tot),
    }


def run_emulated(config=None, flows: int = 200, *, packets: int = 4, n_nics: int | None = None,
                 timeout: float = 60.0, protos=(TCP, UDP), icmp_every: int = 0, seed: int = 1,
                 detail: bool = False, **cfg_kw) -> dict:
    """Run `flows` connections through an emulated deployment of `config` (default: a
    2-NIC emulated config) and return the report dict (see the module docstring);
    ``detail`` adds every NIC counter, summed (``counters``)."""
    if config is None or any(n.io != "memory" for n in config.nics):
        base = config
        kw = dict(cfg_kw)
        if base is not None:
            kw.setdefault("mapping", base.mapping)
            kw.setdefault("install", base.install)
            kw.setdefault("filtering", base.filtering)
        config = emulated_config(n_nics or (base.n_nics if base is not None else 2), **kw)
    emu = Emulation(config)
    t0 = time.monotonic()
    try:
        emu.start()
        conns = make_conns(config, flows, packets=packets, protos=protos, seed=seed, icmp_every=icmp_every)
        emu.run(conns, timeout=timeout)
        elapsed = time.monotonic() - t0
        rep = emu.check()
    finally:
        reports = emu.close()
    rep.update(summarize(reports))
    if not detail:
        rep.pop("counters")
    rep.update(nics=config.n_nics, mapping=config.mapping, install=config.install, seconds=round(elapsed, 3))
    lat = sorted(x for reps in reports.values() for r in reps for x in r.get("latencies", []))
    if lat:
        rep["fetch_latency_us"] = {"median": round(lat[len(lat) // 2] * 1e6, 1),
                                   "p99": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e6, 1)}
    return rep

