"""The access switch's hash: which NIC (link) a packet lands on, reproduced bit for bit.

The switch in front of the gateway spreads packets over the N NICs with a stateless
hash of each packet's own header, independently per direction.  Two parts of HyperNAT
must compute the same number as the switch:

* the emulated deployment, which *is* the switch (``hypernat.lab.emulated``), and
* active install, where the owner of a new rule predicts the NIC the reply will land on
  and pushes the clone there (``hypernat.agent``); the namespace testbed steers the
  return side with nftables ``jhash`` so that the prediction can be right on purpose
  (``hypernat.lab.steering``).

One module, low in the import graph (it imports nothing of the project), so that all
of them share one implementation; ``predict_nics`` is ``predict_nic`` for a batch, and
``hypernat._switchhash.predict_nics`` the same in C (one nogil loop, what the owner's
active install calls for the sessions of a loop turn; tests/test_switchhash_compiled.py
checks it against this module)::

       agent.predict_nics ─┐
     lab.emulated switch ──┼──► switchhash.switch_hash / predict_nic
   lab.steering (nft jhash)┘            │
                                        ├─ sha1   first 4 bytes of SHA-1 over the packed tuple
                                        │         (the paper's testbed)
                                        ├─ crc32  zlib CRC-32 over the packed tuple (seeded)
                                        └─ jhash  Linux jhash() over nftables' register layout,
                                                  scaled like the kernel (reciprocal_scale)

nftables' ``jhash ip saddr . ip daddr . th sport . th dport mod N seed S`` concatenates
its operands in registers of 32 bits each: an address fills one, a 16-bit port is
stored in network byte order and zero-padded to a whole register.  ``nft_jhash`` builds
exactly those 16 bytes and runs Linux's ``jhash()`` (Bob Jenkins' lookup3, read as
host-order words, the tail as little-endian bytes), then ``reciprocal_scale``:
``(hash * N) >> 32`` — not ``hash % N``.  ``tests/test_lab_peer.py`` checks it against
the kernel's own choice for every connection of a run, ``tests/test_agent.py`` pins
known values.

                                        └─ toeplitz  RSS (Microsoft's Toeplitz hash) with
                                                  the port's own key and indirection table

Toeplitz is what a NIC's RSS computes when the "NICs" are the queues of one port: the
32-bit hash of saddr . daddr . sport . dport (network order) under the port's key
(40 bytes or more, ``read_rss``: ``ethtool -x``), the queue the indirection table's
entry ``hash % len(table)`` names.  Tested against Microsoft's published RSS
verification vectors (tests/test_switchhash_toeplitz.py).  Without a key and table
(veth has none) ``predict_nic`` raises ``ValueError`` and active install falls back to
passive install.
"""
from __future__ import annotations

import hashlib
import struct
import sys
import zlib

import numpy as np

_M = 0xFFFFFFFF
_TUPLE = struct.Struct("!IIHHB")  # sha1 / crc32 input: saddr daddr sport dport proto
_NFT4 = struct.Struct("!IIHxxHxx")  # nftables registers: saddr . daddr . sport . dport
_NFT_SRC = struct.Struct("!I")  # jhash ip saddr
_WORDS = "<III" if sys.byteorder == "little" else ">III"

HASHES = ("sha1", "crc32", "jhash")
# Microsoft's RSS verification key (also many drivers' default).
MS_RSS_KEY = bytes.fromhex("6d5a56da255b0ec24167253d43a38fb0d0ca2bcbae7b30b477cb2da38030f20c6a42b73bbeac01fa")
_TOEPLITZ4 = struct.Struct("!IIHH")  # saddr daddr sport dport
# nftables steers only what it can read ports from (`th sport`): TCP and UDP.
JHASH_PROTOS = frozenset((6, 17))


def _rol(x: int, k: int) -> int:
    return ((x << k) | (x >> (32 - k))) & _M


def jhash(data: bytes, initval: int = 0) -> int:
    """Linux ``jhash(key, length, initval)`` (include/linux/jhash.h), 32-bit."""
    n = len(data)
    a = b = c = (0xDEADBEEF + n + initval) & _M
    k = 0
    while n > 12:
        x, y, z = struct.unpack_from(_WORDS, data, k)
        a, b, c = (a + x) & _M, (b + y) & _M, (c + z) & _M
        a = (a - c) & _M; a ^= _rol(c, 4); c = (c + b) & _M  # noqa: E702
        b = (b - a) & _M; b ^= _rol(a, 6); a = (a + c) & _M  # noqa: E702
        c = (c - b) & _M; c ^= _rol(b, 8); b = (b + a) & _M  # noqa: E702
        a = (a - c) & _M; a ^= _rol(c, 16); c = (c + b) & _M  # noqa: E702
        b = (b - a) & _M; b ^= _rol(a, 19); a = (a + c) & _M  # noqa: E702
        c = (c - b) & _M; c ^= _rol(b, 4); b = (b + a) & _M  # noqa: E702
        n -= 12
        k += 12
    if n == 0:
        return c
    # The byte-wise tail adds k[i] << 8*(i%4) into a, b, c: a little-endian read.
    x, y, z = struct.unpack("<III", data[k:k + n] + bytes(12 - n))
    a, b, c = (a + x) & _M, (b + y) & _M, (c + z) & _M
    c ^= b; c = (c - _rol(b, 14)) & _M  # noqa: E702
    a ^= c; a = (a - _rol(c, 11)) & _M  # noqa: E702
    b ^= a; b = (b - _rol(a, 25)) & _M  # noqa: E702
    c ^= b; c = (c - _rol(b, 16)) & _M  # noqa: E702
    a ^= c; a = (a - _rol(c, 4)) & _M  # noqa: E702
    b ^= a; b = (b - _rol(a, 14)) & _M  # noqa: E702
    c ^= b; c = (c - _rol(b, 24)) & _M  # noqa: E702
    return c


def toeplitz(key: bytes, data: bytes) -> int:
    """The Toeplitz hash of `data` under `key` (RSS): for every set bit i of the input
    (most significant first), XOR in the 32 key bits starting at bit i."""
    if len(key) * 8 < len(data) * 8 + 32:
        raise ValueError(f"a {len(key)}-byte key is too short for {len(data)} bytes of input")
    k = int.from_bytes(key, "big")
    top = len(key) * 8 - 32
    h = 0
    for i, byte in enumerate(data):
        for b in range(8):
            if byte & (0x80 >> b):
                h ^= (k >> (top - (i * 8 + b))) & _M
    return h


def toeplitz_tuple(key: bytes, saddr: int, daddr: int, sport: int | None = None, dport: int | None = None) -> int:
    """RSS over IPv4 addresses (and ports, for TCP/UDP), as a NIC hashes a packet."""
    if sport is None:
        return toeplitz(key, _TOEPLITZ4.pack(saddr & _M, daddr & _M, 0, 0)[:8])
    return toeplitz(key, _TOEPLITZ4.pack(saddr & _M, daddr & _M, sport & 0xFFFF, dport & 0xFFFF))


def read_rss(ifname: str, netns_name: str | None = None) -> tuple[bytes, tuple] | None:
    """The port's RSS key and indirection table (``ethtool -x``), or None where the
    device has none (veth)."""
    import subprocess

    argv = ["ethtool", "-x", ifname]
    if netns_name:
        argv = ["ip", "netns", "exec", netns_name] + argv
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return parse_ethtool_x(p.stdout) if p.returncode == 0 else None


def parse_ethtool_x(text: str) -> tuple[bytes, tuple] | None:
    """(key, indirection table) from ``ethtool -x`` output, or None if either is missing."""
    table, key, in_key = [], None, False
    for ln in text.splitlines():
        s = ln.strip()
        if in_key and s and all(c in "0123456789abcdefABCDEF:" for c in s):
            key = bytes.fromhex(s.replace(":", ""))
            in_key = False
        elif s.startswith("RSS hash key"):
            in_key = True
        elif ":" in s and s.split(":", 1)[0].isdigit():
            table += [int(x) for x in s.split(":", 1)[1].split()]
    return (key, tuple(table)) if key and table else None


def rss_queue(key: bytes, table, proto: int, saddr: int, sport: int, daddr: int, dport: int) -> int:
    """The queue a NIC with this key and indirection table puts the packet on (ports in
    the hash for TCP and UDP only, as RSS does by default)."""
    if proto in (6, 17):
        h = toeplitz_tuple(key, saddr, daddr, sport, dport)
    else:
        h = toeplitz_tuple(key, saddr, daddr)
    return table[h % len(table)]


def reciprocal_scale(h: int, n: int) -> int:
    """The kernel's ``reciprocal_scale``: a 32-bit hash onto 0..n-1 as nft_jhash does."""
    return ((h & _M) * n) >> 32


def nft_tuple_bytes(saddr: int, daddr: int, sport: int, dport: int) -> bytes:
    """``ip saddr . ip daddr . th sport . th dport`` as nftables lays it out."""
    return _NFT4.pack(saddr & _M, daddr & _M, sport & 0xFFFF, dport & 0xFFFF)


def nft_jhash_raw(saddr: int, daddr: int, sport: int, dport: int, seed: int = 0) -> int:
    """The 32-bit jhash nftables computes over the 4-tuple (before ``mod``)."""
    return jhash(nft_tuple_bytes(saddr, daddr, sport, dport), seed & _M)


def nft_jhash(saddr: int, daddr: int, sport: int, dport: int, modulus: int, seed: int = 0) -> int:
    """nftables ``jhash ip saddr . ip daddr . th sport . th dport mod M seed S`` (no offset)."""
    return reciprocal_scale(nft_jhash_raw(saddr, daddr, sport, dport, seed), modulus)


def switch_hash(name: str, proto: int, saddr: int, sport: int, daddr: int, dport: int, seed: int = 0,
                fields: str = "5-tuple") -> int:
    """The switch's 32-bit hash of one packet's tuple (one direction).

    ``fields`` "src" hashes the source address only (a switch configured for source
    hashing; nftables ``jhash ip saddr``)."""
    if name == "jhash":
        if fields == "src":
            return jhash(_NFT_SRC.pack(saddr & _M), seed & _M)
        return nft_jhash_raw(saddr, daddr, sport, dport, seed)
    if fields == "src":
        proto, sport, daddr, dport = 0, 0, 0, 0
    if name == "sha1":
        d = hashlib.sha1(_TUPLE.pack(saddr, daddr, sport, dport, proto)).digest()
        return int.from_bytes(d[:4], "big")
    if name == "crc32":
        return zlib.crc32(_TUPLE.pack(saddr, daddr, sport, dport, proto), seed) & _M
    raise ValueError(f"unknown switch hash {name!r} ({', '.join(HASHES)})")


def predict_nic(name: str, n: int, proto: int, saddr: int, sport: int, daddr: int, dport: int, seed: int = 0,
                fields: str = "5-tuple", rss=None) -> int:
    """The NIC (0..n-1) a packet with this tuple lands on, for a switch using `name`.

    sha1 and crc32 take the hash modulo n; jhash scales it like nftables' ``mod n``
    (``reciprocal_scale``), so NIC k is the testbed's fwmark k + 1.  toeplitz needs
    ``rss`` = (key, indirection table, {queue: NIC id}) of the port the packet arrives
    on (one worker per queue); without it, or for a queue no NIC serves: ValueError."""
    if name == "toeplitz":
        if rss is None:
            raise ValueError("toeplitz needs the port's RSS key and indirection table")
        key, table, nic_of_queue = rss
        q = rss_queue(key, table, proto, saddr, sport, daddr, dport)
        if q not in nic_of_queue:
            raise ValueError(f"RSS queue {q} is served by no NIC")
        return nic_of_queue[q]
    h = switch_hash(name, proto, saddr, sport, daddr, dport, seed, fields)
    return reciprocal_scale(h, n) if name == "jhash" else h % n


def predictable(name: str, proto: int, rss=None) -> bool:
    """Can the NIC a packet of `proto` lands on be predicted with `name`?  The testbed
    steers only TCP and UDP by jhash; ICMP keeps the kernel's (unknowable) ECMP hash."""
    if name == "toeplitz":
        return rss is not None  # the port's key and table: RSS hashes every IPv4 packet
    if name not in HASHES:
        return False
    return name != "jhash" or proto in JHASH_PROTOS


def predict_nics(name: str, n: int, proto, saddr, sport, daddr, dport, seed: int = 0, fields: str = "5-tuple",
                 rss=None):
    """``predict_nic`` for a batch: the NIC (0..n-1) of every record of the columns
    proto, saddr, sport, daddr, dport (sequences of equal length), -1 where it cannot be
    predicted (``predictable`` says no, or ``predict_nic`` raises ValueError).  The
    readable reference of ``hypernat._switchhash.predict_nics`` (the owner's active
    install calls the compiled one; tests check the two agree)."""
    if n < 1:
        raise ValueError(f"n must be at least 1, not {n}")
    out = np.full(len(proto), -1, np.int32)
    for i, (p, sa, sp, da, dp) in enumerate(zip(*(np.asarray(c).tolist() for c in (proto, saddr, sport, daddr,
                                                                                    dport)))):
        if not predictable(name, p, rss):
            continue
        try:
            out[i] = predict_nic(name, n, p, sa, sp, da, dp, seed, fields, rss=rss)
        except ValueError:  # toeplitz: a key too short, a queue no NIC serves
            pass
    return out
