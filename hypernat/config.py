"""The gateway's configuration: one YAML file, validated into frozen, typed objects.

Every daemon (``hypernat-coord``, each ``hypernat-nic``) and every tool reads the same
file and takes the part it needs.  Loading is strict: ``yaml.safe_load``, unknown keys
rejected, every value type-checked, and the cross-checks that would otherwise surface as
a wrong translation at 3 a.m. done up front:

    YAML ──safe_load──► dict ──_Reader (per section, key paths)──► Config (frozen)
                                         │
                                         └─► ConfigError("<file>: <key.path[i]>: <problem>")

Cross-checks: internal and external space disjoint; pool prefixes disjoint; the pool
large enough for the NICs under the partition strategy; NIC ids 0..N-1, unique, and
every interface named once; the port range inside 1-65535; timeouts at or above the RFC
minima (UDP 120 s RFC 4787 REQ-5, TCP established 7440 s and transitory 240 s RFC 5382
REQ-5, ICMP 60 s RFC 5508 REQ-2) unless ``timeouts.force: true``; a ``tcp://``
coordinator endpoint off loopback only with CURVE key files.

``hypernat check CONFIG`` (``check_main``) validates a file and prints the partition
table.  The commented examples in ``conf/`` show every key.

Behaviour that is fixed, not configured (and why)
-------------------------------------------------
*Unsolicited inbound TCP SYN* (RFC 5382 REQ-4): always dropped silently and counted
(slow-path reason ``unsolicited_syn``).  The RFC's other option -- hold the SYN for at
least 6 s, drop it if an outbound SYN of the same connection was translated meanwhile
(simultaneous open), else answer ICMP port unreachable -- is not offered: the ICMP error
must quote the SYN's own IP header and first 8 TCP bytes (the remote checks the sequence
number), so every held SYN would have to keep its frame on the slow path for 6 s, a
cheap amplification target for a SYN flood toward the pool; and TCP simultaneous open
through a NAT works with a silent drop too (the remote retransmits its SYN, which meets
the session the outbound SYN created).  REQ-4a allows the silent drop "if prohibited by
policy"; this gateway's policy is that the public pool answers nothing unsolicited.

*A host whose external address has no free port block left* (``ports_per_host`` not
reached, but every block of its address is in use): its next new connection is refused
-- counted as ``ports_exhausted`` and, by cause, ``exhausted_host_address`` in
``RuleBuilder.counters_dict()``, logged at most every ``limits.exhaustion_log_interval``
-- not moved to another address.  Endpoint-independent mapping uses paired pooling (RFC
4787 REQ-2: every mapping of a host on one external address); moving one connection
would show the host's peers two addresses.  ``by-port`` partitions let spill-over borrow
a block on the same address; otherwise the host waits for its own sessions to expire.
A new host finding no address with a free block is counted as ``exhausted_pool``.
"""
from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import sys
from typing import Optional

import yaml

IO_BACKENDS = ("packet_mmap", "af_xdp", "pcap", "memory")
RX_RINGS = ("v2", "v3")  # PACKET_MMAP receive rings (hypernat.io.packet_mmap.RX_RINGS)
INSTALL_MODES = ("passive", "active")
SWITCH_HASHES = ("sha1", "jhash", "crc32", "toeplitz")
SWITCH_FIELDS = ("5-tuple", "src")
# How the switch hashes IPv4 fragments (docs/fastpath.md "Fragments"): on addresses and
# protocol only (every fragment of a datagram lands on one NIC: Linux, most switches), or
# the first fragment with its ports and the rest without (they can land on different
# NICs: refused with a 5-tuple hash and more than one NIC).
SWITCH_FRAGMENTS = ("addresses", "ports-when-present")
PARTITION_STRATEGIES = ("by-port", "by-address")
MAPPINGS = ("endpoint-independent", "address-and-port-dependent")
FILTERINGS = ("endpoint-independent", "address-dependent", "address-and-port-dependent")
TRANSLOG_MODES = ("per-rule", "per-block")

# RFC minima (seconds).
RFC_MIN_TIMEOUTS = {
    "udp": (120, "RFC 4787 REQ-5"),
    "tcp_established": (7440, "RFC 5382 REQ-5"),
    "tcp_transitory": (240, "RFC 5382 REQ-5"),
    "icmp": (60, "RFC 5508 REQ-2"),
}


class ConfigError(ValueError):
    """A configuration problem: str(e) is '<file>: <key path>: <problem>'."""

    def __init__(self, file: str, keypath: str, problem: str):
        self.file, self.keypath, self.problem = file, keypath, problem
        super().__init__(f"{file}: {keypath}: {problem}" if keypath else f"{file}: {problem}")


# ---------------------------------------------------------------------------------------
# The typed configuration


def _vlan_list(r, node, key, path) -> tuple:
    """A NIC's ``inside_vlans`` / ``outside_vlans``: a list of 802.1Q VLAN IDs 1-4094."""
    v = node.get(key)
    if v is None:
        return ()
    if not isinstance(v, list):
        raise r.err(f"{path}.{key}", f"expected a list of VLAN IDs, got {v!r}")
    for x in v:
        if isinstance(x, bool) or not isinstance(x, int) or not 1 <= x <= 4094:
            raise r.err(f"{path}.{key}", f"VLAN ID {x!r} is not an integer in 1-4094")
    if len(v) > 1:
        raise r.err(f"{path}.{key}", f"one VLAN per port (frames sent there carry its tag), got {v}")
    return tuple(v)


@dataclasses.dataclass(frozen=True)
class NicConfig:
    id: int
    inside: str  # interface toward the VPC
    outside: str  # interface toward the Internet
    io: str = "packet_mmap"
    cpu: Optional[int] = None  # pin the worker to this CPU (None: leave it to the scheduler)
    rt_priority: int = 0  # SCHED_FIFO priority 1..99; 0 = normal scheduling (opt-in)
    curve_secret_key: Optional[str] = None  # this NIC's CURVE key pair (zmq.auth .key_secret)
    curve_public_key: Optional[str] = None  # its public half, bound to this NIC id by the coordinator
    inside_vlans: tuple = ()  # 802.1Q VLAN IDs the inside link carries (a tag not listed: dropped, counted)
    outside_vlans: tuple = ()  # the same for the outside link
    queue: Optional[int] = None  # serve only this receive queue of both links (one worker per queue)
    inside_mtu: Optional[int] = None  # largest IPv4 datagram sent inside; None: the interface's MTU, read at start
    outside_mtu: Optional[int] = None  # ... and outside (a narrower link behind the gateway: set it lower)
    rx_ring: str = "v2"  # PACKET_MMAP receive ring: "v2" (a slot a frame: ~10 us hand-over) or "v3" (blocks: ~3x less memory, ~1 ms)
    rx_block_ms: int = 1  # v3: a partly filled block is handed over after this long (kernel timer granularity)


@dataclasses.dataclass(frozen=True)
class CoordinatorConfig:
    endpoint: str = "ipc:///tmp/hypernat/coord.sock"
    curve_secret_key: Optional[str] = None  # the coordinator's key pair (.key_secret)
    curve_public_key: Optional[str] = None  # its public half, given to the NICs
    heartbeat_interval: float = 1.0  # seconds
    heartbeat_timeout: float = 5.0  # a NIC silent this long is considered down

    @property
    def curve(self) -> bool:
        return bool(self.curve_secret_key)


@dataclasses.dataclass(frozen=True)
class SwitchConfig:
    hash: str = "sha1"
    fields: str = "5-tuple"
    seed: int = 0  # jhash seed / crc32 initial value
    toeplitz_key: Optional[str] = None  # hex, 40 bytes; None = the Microsoft RSS sample key
    fragments: str = "addresses"  # SWITCH_FRAGMENTS: what the switch hashes fragments on


@dataclasses.dataclass(frozen=True)
class AllocationConfig:
    port_preservation: bool = False  # try the internal port first (RFC 4787 REQ-3 option)
    port_parity: bool = False  # keep the internal port's parity (RFC 4787 REQ-4)


@dataclasses.dataclass(frozen=True)
class Timeouts:
    udp: int = 300
    tcp_established: int = 7440
    tcp_transitory: int = 240
    icmp: int = 60
    reuse_delay: int = 120  # RFC 6888 REQ-8
    force: bool = False  # allow values below the RFC minima (tests, labs)


@dataclasses.dataclass(frozen=True)
class FragmentLimits:
    """The per-NIC fragment table (hypernat/_frag.pyx): datagrams tracked at once, bytes
    for early fragments held (2 KiB per frame), seconds a datagram waits for the rest."""

    entries: int = 4096
    bytes: int = 4 << 20
    timeout: int = 2


@dataclasses.dataclass(frozen=True)
class Limits:
    flow_table_capacity: int = 1 << 20  # entries per table (out and in) per NIC
    ports_per_host: int = 4096  # external ports one internal host may hold at once
    port_block_size: int = 64  # ports handed to a host at a time
    pending_per_flow: int = 32  # frames queued per flow while its rule is fetched (a line-rate burst of replies)
    pending_total: int = 4096  # frames queued per NIC in total
    fetch_timeout_ms: int = 50
    fetch_retries: int = 2
    negative_cache_s: float = 2.0  # a NACKed endpoint is not fetched again this long
    fetch_rate_per_source: int = 200  # NACKed fetches per second per remote source (a fetch takes a token, its RULE gives it back): scans are throttled, busy remotes are not
    lease_duration: int = 300  # seconds a clone lives without renewal (< 32000: 16-bit slot field)
    sweep_step: int = 1024  # slots of each table examined per sweep step
    sweep_max_expire: int = 64  # sessions expired per sweep step at most
    sweep_budget_us: float = 40.0  # ... and microseconds of expiry work per step
    exhaustion_log_interval: float = 10.0  # seconds between two exhaustion log lines
    fragments: FragmentLimits = FragmentLimits()
    journal_log_bytes: int = 1 << 20  # block journal log compacted into a checkpoint past this size
    # New connections per second one internal host may open (token bucket per host, in
    # hypernat/nat/_rate.pyx; 0: no limit) and the bucket's size (0: one second's worth).
    host_connection_rate: float = 0.0
    host_connection_burst: float = 0.0


@dataclasses.dataclass(frozen=True)
class IcmpConfig:
    """ICMP errors the gateway sends itself (time exceeded, fragmentation needed)."""

    rate_limit: int = 1000  # per second per NIC, a token bucket (RFC 1812 4.3.2.8); 0: none sent
    inside_source: Optional[str] = None  # their source toward the VPC; None: the inside interface's address
    outside_source: Optional[str] = None  # ... toward the Internet: a pool address; None: the first the NIC owns


@dataclasses.dataclass(frozen=True)
class TranslogConfig:
    enabled: bool = False
    path: str = "/var/log/hypernat/translations.jsonl"
    mode: str = "per-rule"
    remote: bool = False  # log the remote endpoint too (RFC 6888 REQ-12: off by default)


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """The NIC loop's periodic work per turn (``loop:``; hypernat/nic/timers.py): every
    periodic job does at most its slice per loop turn and continues at the next."""

    turn_budget_us: float = 200.0  # job work per turn; the jobs still due then wait a turn (0: no bound)
    retransmit_slice: int = 32  # unacknowledged messages resent or given up per turn
    lease_end_slice: int = 16  # lease ends (owner) and clone lease drops (holder) per turn, each
    activity_slots: int = 4096  # flow-table slots (each table) scanned for activity per turn
    activity_entries: int = 32  # ... and clone entries found reported per turn (a few us each)


@dataclasses.dataclass(frozen=True)
class MetricsConfig:
    enabled: bool = True
    address: str = "127.0.0.1"
    port: int = 9310  # the coordinator; NIC k serves on port + 1 + k


@dataclasses.dataclass(frozen=True)
class Config:
    path: str
    internal: tuple  # of ipaddress.IPv4Network
    pool: tuple  # of ipaddress.IPv4Network
    port_min: int
    port_max: int
    partition: str
    nics: tuple  # of NicConfig, ordered by id
    coordinator: CoordinatorConfig
    install: str = "passive"
    switch: SwitchConfig = SwitchConfig()
    mapping: str = "endpoint-independent"
    filtering: str = "address-and-port-dependent"
    hairpinning: bool = True
    allocation: AllocationConfig = AllocationConfig()
    timeouts: Timeouts = Timeouts()
    limits: Limits = Limits()
    translation_log: TranslogConfig = TranslogConfig()
    metrics: MetricsConfig = MetricsConfig()
    state_dir: str = "/var/lib/hypernat"
    fleet: Optional[object] = None  # hypernat.fleet.spec.FleetConfig: this server's place in a fleet
    tcp_mss_clamp: int = 0  # SYN / SYN-ACK MSS options lowered to this, both ways; 0: off
    icmp: IcmpConfig = IcmpConfig()
    loop: LoopConfig = LoopConfig()

    @property
    def n_nics(self) -> int:
        return len(self.nics)

    @property
    def pool_size(self) -> int:
        """Number of external addresses."""
        return sum(n.num_addresses for n in self.pool)

    @property
    def pool_ranges(self) -> tuple:
        """((network_int, prefix_len), ...) as the Translator's `pool` argument takes it."""
        return tuple((int(n.network_address), n.prefixlen) for n in self.pool)

    def is_internal(self, addr: int) -> bool:
        return any(_contains(n, addr) for n in self.internal)

    def in_pool(self, addr: int) -> bool:
        return any(_contains(n, addr) for n in self.pool)

    def nic(self, nic_id: int) -> NicConfig:
        return self.nics[nic_id]


def _contains(net: ipaddress.IPv4Network, addr: int) -> bool:
    return (addr & int(net.netmask)) == int(net.network_address)


# ---------------------------------------------------------------------------------------
# Reading



def _fragment_limits(r, node) -> "FragmentLimits":
    """``limits.fragments``: the per-NIC fragment table's bounds."""
    fr = r.mapping(node, "limits.fragments", {"entries", "bytes", "timeout"})
    d = FragmentLimits()
    return FragmentLimits(
        entries=r.integer(fr, "entries", "limits.fragments", d.entries, lo=1, hi=1 << 24),
        bytes=r.integer(fr, "bytes", "limits.fragments", d.bytes, lo=2048, hi=1 << 32),
        timeout=r.integer(fr, "timeout", "limits.fragments", d.timeout, lo=1, hi=60),
    )

class _Reader:
    """Typed access to a parsed YAML tree that knows each value's key path."""

    def __init__(self, file: str):
        self.file = file

    def err(self, path: str, problem: str) -> ConfigError:
        return ConfigError(self.file, path, problem)

    def mapping(self, node, path: str, allowed, required=()):
        if node is None:
            node = {}
        if not isinstance(node, dict):
            raise self.err(path, f"expected a mapping, got {_tname(node)}")
        for k in node:
            if not isinstance(k, str):
                raise self.err(path, f"key {k!r} is not a string")
            if k not in allowed:
                raise self.err(_join(path, k), f"unknown key (allowed: {', '.join(sorted(allowed))})")
        for k in required:
            if k not in node:
                raise self.err(_join(path, k), "required key is missing")
        return node

    def integer(self, node, key, path, default=None, lo=None, hi=None):
        p = _join(path, key)
        v = node.get(key, default)
        if isinstance(v, bool) or not isinstance(v, int):
            if v is None and default is None and key not in node:
                return None
            raise self.err(p, f"expected an integer, got {v!r}")
        if hi is None and lo is not None and v < lo:
            raise self.err(p, f"{v} is below the minimum {lo}")
        if lo is not None and v < lo or hi is not None and v > hi:
            raise self.err(p, f"{v} is out of range {lo}..{hi}")
        return v

    def number(self, node, key, path, default, lo=None):
        p = _join(path, key)
        v = node.get(key, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise self.err(p, f"expected a number, got {v!r}")
        if lo is not None and v < lo:
            raise self.err(p, f"{v} is below the minimum {lo}")
        return float(v)

    def boolean(self, node, key, path, default):
        v = node.get(key, default)
        if not isinstance(v, bool):
            raise self.err(_join(path, key), f"expected true or false, got {v!r}")
        return v

    def string(self, node, key, path, default=None, choices=None, required=False):
        p = _join(path, key)
        if key not in node:
            if required:
                raise self.err(p, "required key is missing")
            return default
        v = node[key]
        if v is None and not required and default is None:
            return None
        if not isinstance(v, str) or not v:
            raise self.err(p, f"expected a non-empty string, got {v!r}")
        if choices and v not in choices:
            raise self.err(p, f"{v!r} is not one of: {', '.join(choices)}")
        return v

    def prefixes(self, node, key, path, required=True):
        p = _join(path, key)
        v = node.get(key)
        if v is None:
            if required:
                raise self.err(p, "required key is missing")
            return ()
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, list) or not v:
            raise self.err(p, "expected a non-empty list of IPv4 prefixes")
        out = []
        for i, s in enumerate(v):
            pi = f"{p}[{i}]"
            if not isinstance(s, str):
                raise self.err(pi, f"{s!r} is not an IPv4 prefix")
            try:
                net = ipaddress.IPv4Network(s, strict=False)
            except ValueError:
                raise self.err(pi, f"{s!r} is not an IPv4 prefix") from None
            if "/" in s and ipaddress.IPv4Interface(s).ip != net.network_address:
                raise self.err(pi, f"{s!r} has host bits set (did you mean {net}?)")
            for j, prev in enumerate(out):
                if prev.overlaps(net):
                    raise self.err(pi, f"{s!r} overlaps {p}[{j}] ({prev})")
            out.append(net)
        return tuple(out)


def _join(path: str, key) -> str:
    return f"{path}.{key}" if path else str(key)


def _tname(v) -> str:
    return "nothing" if v is None else type(v).__name__


_TOP_KEYS = {
    "internal", "external", "partition", "nics", "coordinator", "install", "switch", "mapping",
    "filtering", "hairpinning", "allocation", "timeouts", "limits", "translation_log", "metrics",
    "state_dir", "fleet", "tcp_mss_clamp", "icmp", "loop",
}  # fmt: skip


def load(path: str) -> Config:
    """Read and validate a configuration file; raise ConfigError on any problem."""
    try:
        with open(path, "rb") as f:
            text = f.read()
    except OSError as exc:
        raise ConfigError(path, "", f"cannot read: {exc.strerror or exc}") from None
    return loads(text, path)


def loads(text, path: str = "<string>") -> Config:
    """Validate YAML text (str or bytes); `path` names it in error messages."""
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(path, "", f"not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    return from_dict(tree, path)


def from_dict(tree, path: str = "<dict>") -> Config:
    """Validate an already-parsed tree (tests and tools build configs this way)."""
    r = _Reader(path)
    top = r.mapping(tree, "", _TOP_KEYS, required=("internal", "external", "nics"))

    internal_node = r.mapping(top["internal"], "internal", {"prefixes"}, required=("prefixes",))
    internal = r.prefixes(internal_node, "prefixes", "internal")

    ext = r.mapping(top["external"], "external", {"pool", "ports"}, required=("pool",))
    pool = r.prefixes(ext, "pool", "external")
    for i, net in enumerate(pool):
        for j, inet in enumerate(internal):
            if net.overlaps(inet):
                raise r.err(f"external.pool[{i}]", f"{net} overlaps internal.prefixes[{j}] ({inet})")
    ports = ext.get("ports", [1024, 65535])
    if (
        not isinstance(ports, list)
        or len(ports) != 2
        or not all(isinstance(p, int) and not isinstance(p, bool) for p in ports)
    ):
        raise r.err("external.ports", f"expected [first, last], got {ports!r}")
    port_min, port_max = ports
    if not (1 <= port_min <= 65535 and 1 <= port_max <= 65535):
        raise r.err("external.ports", f"{ports!r} is outside 1-65535")
    if port_min > port_max:
        raise r.err("external.ports", f"first port {port_min} is above last port {port_max}")

    partition = r.string(top, "partition", "", "by-port", PARTITION_STRATEGIES)

    # NICs
    nics_node = top["nics"]
    if not isinstance(nics_node, list) or not nics_node:
        raise r.err("nics", "expected a non-empty list of NICs")
    nic_keys = {"id", "inside", "outside", "io", "cpu", "rt_priority", "curve_secret_key", "curve_public_key",
                "inside_vlans", "outside_vlans", "queue", "inside_mtu", "outside_mtu", "rx_ring", "rx_block_ms"}
    nics, seen_ifaces = {}, {}
    for i, n in enumerate(nics_node):
        p = f"nics[{i}]"
        r.mapping(n, p, nic_keys, required=("id", "inside", "outside"))
        nid = r.integer(n, "id", p, lo=0, hi=255)
        if nid in nics:
            raise r.err(f"{p}.id", f"duplicate NIC id {nid}")
        nic = NicConfig(
            id=nid,
            inside=r.string(n, "inside", p, required=True),
            outside=r.string(n, "outside", p, required=True),
            io=r.string(n, "io", p, "packet_mmap", IO_BACKENDS),
            cpu=r.integer(n, "cpu", p, None, lo=0, hi=4095),
            rt_priority=r.integer(n, "rt_priority", p, 0, lo=0, hi=99),
            curve_secret_key=r.string(n, "curve_secret_key", p),
            curve_public_key=r.string(n, "curve_public_key", p),
            inside_vlans=_vlan_list(r, n, "inside_vlans", p),
            outside_vlans=_vlan_list(r, n, "outside_vlans", p),
            queue=r.integer(n, "queue", p, None, lo=0, hi=1023),
            inside_mtu=r.integer(n, "inside_mtu", p, None, lo=68, hi=65535),
            outside_mtu=r.integer(n, "outside_mtu", p, None, lo=68, hi=65535),
            rx_ring=r.string(n, "rx_ring", p, "v2", RX_RINGS),
            rx_block_ms=r.integer(n, "rx_block_ms", p, 1, lo=1, hi=1000),
        )
        for key in ("rx_ring", "rx_block_ms"):
            if key in n and nic.io != "packet_mmap":
                raise r.err(f"{p}.{key}", f"applies to the packet_mmap backend only (this NIC's io is {nic.io!r})")
        if "rx_block_ms" in n and nic.rx_ring != "v3":
            raise r.err(f"{p}.rx_block_ms", "is the TPACKET_V3 block timer: it needs rx_ring v3")
        for role in ("inside", "outside"):
            # An interface serves several NICs only queue by queue: each names its queue.
            name = getattr(nic, role)
            for (other, q), where in seen_ifaces.items():
                if other == name and (q is None or nic.queue is None or q == nic.queue):
                    what = f"queue {q} of it" if q is not None and q == nic.queue else "it"
                    raise r.err(f"{p}.{role}", f"interface {name!r} is already used by {where} ({what}); "
                                               "NICs share an interface only with a distinct `queue` each")
            seen_ifaces[(name, nic.queue)] = f"{p}.{role}"
        nics[nid] = nic
    n_nics = len(nics)
    for i, n in enumerate(nics_node):
        if n["id"] >= n_nics:
            raise r.err(f"nics[{i}].id", f"NIC ids must be 0..{n_nics - 1} (one per NIC), got {n['id']}")

    # Limits (needed for the pool-size check)
    lim = r.mapping(top.get("limits"), "limits", {f.name for f in dataclasses.fields(Limits)})
    d = Limits()
    limits = Limits(
        flow_table_capacity=r.integer(lim, "flow_table_capacity", "limits", d.flow_table_capacity, lo=16, hi=1 << 28),
        ports_per_host=r.integer(lim, "ports_per_host", "limits", d.ports_per_host, lo=1, hi=1 << 24),
        port_block_size=r.integer(lim, "port_block_size", "limits", d.port_block_size, lo=1, hi=65535),
        pending_per_flow=r.integer(lim, "pending_per_flow", "limits", d.pending_per_flow, lo=0, hi=1 << 16),
        pending_total=r.integer(lim, "pending_total", "limits", d.pending_total, lo=0, hi=1 << 24),
        fetch_timeout_ms=r.integer(lim, "fetch_timeout_ms", "limits", d.fetch_timeout_ms, lo=1, hi=60000),
        fetch_retries=r.integer(lim, "fetch_retries", "limits", d.fetch_retries, lo=0, hi=100),
        negative_cache_s=r.number(lim, "negative_cache_s", "limits", d.negative_cache_s, lo=0),
        fetch_rate_per_source=r.integer(lim, "fetch_rate_per_source", "limits", d.fetch_rate_per_source, lo=1),
        lease_duration=r.integer(lim, "lease_duration", "limits", d.lease_duration, lo=1, hi=32000),
        sweep_step=r.integer(lim, "sweep_step", "limits", d.sweep_step, lo=1, hi=1 << 24),
        sweep_max_expire=r.integer(lim, "sweep_max_expire", "limits", d.sweep_max_expire, lo=1, hi=1 << 20),
        sweep_budget_us=r.number(lim, "sweep_budget_us", "limits", d.sweep_budget_us, lo=1),
        exhaustion_log_interval=r.number(lim, "exhaustion_log_interval", "limits", d.exhaustion_log_interval, lo=0),
        fragments=_fragment_limits(r, lim.get("fragments")),
        journal_log_bytes=r.integer(lim, "journal_log_bytes", "limits", d.journal_log_bytes, lo=4096, hi=1 << 40),
        host_connection_rate=r.number(lim, "host_connection_rate", "limits", d.host_connection_rate, lo=0),
        host_connection_burst=r.number(lim, "host_connection_burst", "limits", d.host_connection_burst, lo=0),
    )
    n_ports = port_max - port_min + 1
    if limits.port_block_size > n_ports:
        raise r.err(
            "limits.port_block_size", f"{limits.port_block_size} is larger than the port range ({n_ports} ports)"
        )
    blocks_per_addr = -(-n_ports // limits.port_block_size)
    n_addrs = sum(net.num_addresses for net in pool)
    if partition == "by-address" and n_addrs < n_nics:
        raise r.err(
            "external.pool",
            f"{n_addrs} address(es) cannot be split by address over {n_nics} NICs (need at least one each)",
        )
    if partition == "by-port" and blocks_per_addr < n_nics:
        raise r.err(
            "external.ports",
            f"{n_ports} ports in blocks of {limits.port_block_size} give {blocks_per_addr} block(s) per address, "
            f"fewer than the {n_nics} NICs (by-port needs at least one block per NIC)",
        )

    # Coordinator
    cn = r.mapping(
        top.get("coordinator"),
        "coordinator",
        {"endpoint", "curve_secret_key", "curve_public_key", "heartbeat_interval", "heartbeat_timeout"},
    )
    dc = CoordinatorConfig()
    coordinator = CoordinatorConfig(
        endpoint=r.string(cn, "endpoint", "coordinator", dc.endpoint),
        curve_secret_key=r.string(cn, "curve_secret_key", "coordinator"),
        curve_public_key=r.string(cn, "curve_public_key", "coordinator"),
        heartbeat_interval=r.number(cn, "heartbeat_interval", "coordinator", dc.heartbeat_interval, lo=0.01),
        heartbeat_timeout=r.number(cn, "heartbeat_timeout", "coordinator", dc.heartbeat_timeout, lo=0.01),
    )
    _check_endpoint(r, coordinator, nics)

    # Switch
    sw = r.mapping(top.get("switch"), "switch", {"hash", "fields", "seed", "toeplitz_key", "fragments"})
    switch = SwitchConfig(
        hash=r.string(sw, "hash", "switch", "sha1", SWITCH_HASHES),
        fields=r.string(sw, "fields", "switch", "5-tuple", SWITCH_FIELDS),
        seed=r.integer(sw, "seed", "switch", 0, lo=0, hi=0xFFFFFFFF),
        toeplitz_key=r.string(sw, "toeplitz_key", "switch"),
        fragments=r.string(sw, "fragments", "switch", "addresses", SWITCH_FRAGMENTS),
    )
    if switch.fragments == "ports-when-present" and switch.fields == "5-tuple" and n_nics > 1:
        raise r.err(
            "switch.fragments",
            "a switch that hashes a first fragment with its ports and the later ones without sends the "
            "fragments of one datagram to different NICs, and only the first one's NIC can translate them: "
            "have the switch hash fragments on addresses and protocol only (fragments: addresses) or hash "
            "on the source address (fields: src)",
        )
    if switch.toeplitz_key is not None:
        try:
            key = bytes.fromhex(switch.toeplitz_key.replace(":", ""))
        except ValueError:
            raise r.err("switch.toeplitz_key", "expected hex bytes") from None
        if len(key) < 16:
            raise r.err("switch.toeplitz_key", f"{len(key)} bytes is too short (at least 16)")

    al = r.mapping(top.get("allocation"), "allocation", {"port_preservation", "port_parity"})
    allocation = AllocationConfig(
        port_preservation=r.boolean(al, "port_preservation", "allocation", False),
        port_parity=r.boolean(al, "port_parity", "allocation", False),
    )

    # Timeouts
    tn = r.mapping(top.get("timeouts"), "timeouts", {f.name for f in dataclasses.fields(Timeouts)})
    dt = Timeouts()
    force = r.boolean(tn, "force", "timeouts", False)
    vals = {}
    for name in ("udp", "tcp_established", "tcp_transitory", "icmp", "reuse_delay"):
        vals[name] = r.integer(
            tn, name, "timeouts", getattr(dt, name), lo=0 if name == "reuse_delay" else 1, hi=86400 * 7
        )
        if name in RFC_MIN_TIMEOUTS and not force:
            minimum, rfc = RFC_MIN_TIMEOUTS[name]
            if vals[name] < minimum:
                raise r.err(
                    f"timeouts.{name}",
                    f"{vals[name]} s is below the {rfc} minimum of {minimum} s (set timeouts.force: true to allow)",
                )
    timeouts = Timeouts(force=force, **vals)

    tl = r.mapping(top.get("translation_log"), "translation_log", {"enabled", "path", "mode", "remote"})
    dl = TranslogConfig()
    translog = TranslogConfig(
        enabled=r.boolean(tl, "enabled", "translation_log", False),
        path=r.string(tl, "path", "translation_log", dl.path),
        mode=r.string(tl, "mode", "translation_log", "per-rule", TRANSLOG_MODES),
        remote=r.boolean(tl, "remote", "translation_log", False),
    )

    mn = r.mapping(top.get("metrics"), "metrics", {"enabled", "address", "port"})
    dm = MetricsConfig()
    metrics = MetricsConfig(
        enabled=r.boolean(mn, "enabled", "metrics", True),
        address=r.string(mn, "address", "metrics", dm.address),
        port=r.integer(mn, "port", "metrics", dm.port, lo=1, hi=65535 - n_nics),
    )

    ic = r.mapping(top.get("icmp"), "icmp", {"rate_limit", "inside_source", "outside_source"})
    icmp = IcmpConfig(
        rate_limit=r.integer(ic, "rate_limit", "icmp", IcmpConfig.rate_limit, lo=0, hi=1 << 24),
        inside_source=_address(r, ic, "inside_source", "icmp"),
        outside_source=_address(r, ic, "outside_source", "icmp"),
    )
    if icmp.outside_source is not None and not any(
            ipaddress.IPv4Address(icmp.outside_source) in net for net in pool):
        raise r.err("icmp.outside_source", f"{icmp.outside_source} is not in external.pool (the gateway's "
                                           "outside address is one of its pool addresses)")
    mss = r.integer(top, "tcp_mss_clamp", "", 0, lo=0, hi=65535)
    if mss and mss < 88:
        raise r.err("tcp_mss_clamp", f"{mss} is below 88, the smallest MSS Linux sends (0 turns clamping off)")

    return Config(
        path=path,
        internal=internal,
        pool=pool,
        port_min=port_min,
        port_max=port_max,
        partition=partition,
        nics=tuple(nics[i] for i in range(n_nics)),
        coordinator=coordinator,
        install=r.string(top, "install", "", "passive", INSTALL_MODES),
        switch=switch,
        mapping=r.string(top, "mapping", "", "endpoint-independent", MAPPINGS),
        filtering=r.string(top, "filtering", "", "address-and-port-dependent", FILTERINGS),
        hairpinning=r.boolean(top, "hairpinning", "", True),
        allocation=allocation,
        timeouts=timeouts,
        limits=limits,
        translation_log=translog,
        metrics=metrics,
        state_dir=r.string(top, "state_dir", "", "/var/lib/hypernat"),
        fleet=_fleet(r, top.get("fleet"), pool, n_nics),
        tcp_mss_clamp=mss,
        icmp=icmp,
        loop=_loop(r, top.get("loop")),
    )


def _loop(r, node) -> LoopConfig:
    """``loop``: slices of periodic work per loop turn."""
    lp = r.mapping(node, "loop", {f.name for f in dataclasses.fields(LoopConfig)})
    d = LoopConfig()
    return LoopConfig(
        turn_budget_us=r.number(lp, "turn_budget_us", "loop", d.turn_budget_us, lo=0),
        retransmit_slice=r.integer(lp, "retransmit_slice", "loop", d.retransmit_slice, lo=1, hi=1 << 24),
        lease_end_slice=r.integer(lp, "lease_end_slice", "loop", d.lease_end_slice, lo=1, hi=1 << 24),
        activity_slots=r.integer(lp, "activity_slots", "loop", d.activity_slots, lo=64, hi=1 << 28),
        activity_entries=r.integer(lp, "activity_entries", "loop", d.activity_entries, lo=1, hi=1 << 24),
    )


def _address(r: _Reader, node, key: str, path: str):
    """An optional IPv4 address (dotted quad), returned as written."""
    v = r.string(node, key, path)
    if v is None:
        return None
    try:
        ipaddress.IPv4Address(v)
    except ValueError:
        raise r.err(_join(path, key), f"{v!r} is not an IPv4 address") from None
    return v


def _fleet(r: _Reader, node, pool, n_nics):
    """The ``fleet:`` section (hypernat.fleet.spec), None for a server on its own."""
    from .fleet import spec

    return spec.read(r, node, pool, n_nics)


def _check_endpoint(r: _Reader, c: CoordinatorConfig, nics: dict) -> None:
    ep = c.endpoint
    scheme, sep, rest = ep.partition("://")
    if not sep or scheme not in ("ipc", "tcp", "inproc"):
        raise r.err("coordinator.endpoint", f"{ep!r} is not an ipc://, tcp:// or inproc:// endpoint")
    if not rest:
        raise r.err("coordinator.endpoint", f"{ep!r} has no address")
    if scheme != "tcp":
        return
    host, colon, port = rest.rpartition(":")
    if not colon or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise r.err("coordinator.endpoint", f"{ep!r}: expected tcp://HOST:PORT")
    host = host.strip("[]")
    loopback = host in ("localhost",)
    try:
        loopback = loopback or ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass  # a name or interface: not loopback
    if bool(c.curve_secret_key) != bool(c.curve_public_key):
        raise r.err("coordinator", "curve_secret_key and curve_public_key go together")
    if loopback:
        return
    if not c.curve:
        raise r.err(
            "coordinator.endpoint",
            f"{ep!r} is off loopback: CURVE keys are required (coordinator.curve_secret_key / curve_public_key "
            "and each NIC's curve_secret_key / curve_public_key)",
        )
    for i, nic in sorted(nics.items()):
        if not nic.curve_secret_key or not nic.curve_public_key:
            raise r.err(
                f"nics[{i}]",
                f"coordinator endpoint {ep!r} is off loopback: curve_secret_key and curve_public_key are required",
            )


# ---------------------------------------------------------------------------------------
# hypernat check


def check_main(argv=None) -> int:
    """`hypernat check CONFIG`: validate, print the partition table; exit 1 on error.
    Several files or a directory: a fleet (hypernat.fleet.spec.check_fleet)."""
    ap = argparse.ArgumentParser(prog="hypernat check", description="Validate a HyperNAT configuration file "
                                 "(several files or a directory: a fleet, checked together).")
    ap.add_argument("config", nargs="+", help="YAML configuration file(s) or a fleet's directory")
    ap.add_argument("-q", "--quiet", action="store_true", help="print nothing when the file is valid")
    args = ap.parse_args(argv)
    import os

    if len(args.config) > 1 or os.path.isdir(args.config[0]):
        from .fleet.spec import check_fleet_main

        return check_fleet_main(args.config, args.quiet)
    args.config = args.config[0]
    try:
        cfg = load(args.config)
    except ConfigError as exc:
        print(f"hypernat check: {exc}", file=sys.stderr)
        return 1
    if args.quiet:
        return 0
    from .partition import Partition

    part = Partition.from_config(cfg)
    print(f"{cfg.path}: OK")
    print(f"  internal   {', '.join(map(str, cfg.internal))}")
    print(f"  external   {', '.join(map(str, cfg.pool))} ports {cfg.port_min}-{cfg.port_max}")
    print(f"  mapping    {cfg.mapping}, filtering {cfg.filtering}, hairpinning {'on' if cfg.hairpinning else 'off'}")
    print(f"  install    {cfg.install}, switch hash {cfg.switch.hash} over {cfg.switch.fields}, "
          f"fragments on {cfg.switch.fragments}")
    print(f"  coordinator {cfg.coordinator.endpoint}{' (CURVE)' if cfg.coordinator.curve else ''}")
    print()
    print(part.describe())
    return 0
