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
of them share one implementation::

        agent.predict_nic ─┐
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

Toeplitz (RSS) needs the NIC's key and is not implemented: ``predict_nic`` raises
``ValueError`` for a hash it cannot reproduce, and active install falls back to
passive install.
"""
from __future__ import annotations

import hashlib
import struct
import sys
import zlib

_M = 0xFFFFFFFF
_TUPLE = struct.Struct("!IIHHB")  # sha1 / crc32 input: saddr daddr sport dport proto
_NFT4 = struct.Struct("!IIHxxHxx")  # nftables registers: saddr . daddr . sport . dport
_NFT_SRC = struct.Struct("!I")  # jhash ip saddr
_WORDS = "<III" if sys.byteorder == "little" else ">III"

HASHES = ("sha1", "crc32", "jhash")
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
                fields: str = "5-tuple") -> int:
    """The NIC (0..n-1) a packet with this tuple lands on, for a switch using `name`.

    sha1 and crc32 take the hash modulo n; jhash scales it like nftables' ``mod n``
    (``reciprocal_scale``), so NIC k is the testbed's fwmark k + 1."""
    h = switch_hash(name, proto, saddr, sport, daddr, dport, seed, fields)
    return reciprocal_scale(h, n) if name == "jhash" else h % n


def predictable(name: str, proto: int) -> bool:
    """Can the NIC a packet of `proto` lands on be predicted with `name`?  The testbed
    steers only TCP and UDP by jhash; ICMP keeps the kernel's (unknowable) ECMP hash."""
    if name not in HASHES:
        return False
    return name != "jhash" or proto in JHASH_PROTOS
