"""Deterministic return steering on the testbed: a hash the project can reproduce.

Linux's own multipath hash is siphash keyed per namespace: no NIC can predict which
outside link a reply will take, so *active install* (push the rule to the NIC the reply
will land on) could never be right on purpose.  With steering on, ``inet`` chooses the
return link with an nftables ``jhash`` of the reply's 4-tuple and a fixed seed::

    inet, output (type route):  ip daddr POOL  meta mark set
        jhash ip saddr . ip daddr . th sport . th dport mod N seed S offset 1
    ip rule fwmark 1+k  →  table 300+k:  POOL via outside_k's gateway address

``nft_jhash`` below computes the same number in Python, bit for bit (Linux's
``jhash()`` — Bob Jenkins' lookup3 — over the concatenation as nftables lays it out in
its registers: each field in its own 32-bit word, network byte order, zero-padded,
read as host-order words; then ``reciprocal_scale``).  The tests check it against the
kernel's choice for every connection.  ICMP (no ports) is not steered: it keeps the
kernel's ECMP choice.
"""
from __future__ import annotations

import ipaddress
import struct
import sys

from pyroute2 import IPRoute

from . import netns

TABLE = "hypernat_steer"
MARK_TABLE = 300  # + k
_M = 0xFFFFFFFF


def _rol(x: int, k: int) -> int:
    return ((x << k) | (x >> (32 - k))) & _M


def jhash(data: bytes, initval: int) -> int:
    """Linux ``jhash(key, length, initval)`` (include/linux/jhash.h)."""
    n = len(data)
    a = b = c = (0xDEADBEEF + n + initval) & _M
    k = 0
    end = "<" if sys.byteorder == "little" else ">"
    while n > 12:
        x, y, z = struct.unpack_from(end + "III", data, k)
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
    tail = data[k:k + n] + bytes(12 - n)
    # The byte-wise tail adds k[i] << 8*(i%4) into a, b, c: a little-endian read.
    x, y, z = struct.unpack("<III", tail)
    a, b, c = (a + x) & _M, (b + y) & _M, (c + z) & _M
    c ^= b; c = (c - _rol(b, 14)) & _M  # noqa: E702
    a ^= c; a = (a - _rol(c, 11)) & _M  # noqa: E702
    b ^= a; b = (b - _rol(a, 25)) & _M  # noqa: E702
    c ^= b; c = (c - _rol(b, 16)) & _M  # noqa: E702
    a ^= c; a = (a - _rol(c, 4)) & _M  # noqa: E702
    b ^= a; b = (b - _rol(a, 14)) & _M  # noqa: E702
    c ^= b; c = (c - _rol(b, 24)) & _M  # noqa: E702
    return c


def nft_jhash(saddr, daddr, sport: int, dport: int, modulus: int, seed: int) -> int:
    """nftables ``jhash ip saddr . ip daddr . th sport . th dport mod M seed S`` (no offset)."""
    data = (ipaddress.IPv4Address(saddr).packed + ipaddress.IPv4Address(daddr).packed
            + struct.pack("!H", sport) + b"\0\0" + struct.pack("!H", dport) + b"\0\0")
    return (jhash(data, seed & _M) * modulus) >> 32


def predict_return_nic(raddr, rport: int, eaddr, eport: int, nics: int, seed: int) -> int:
    """The outside link (NIC) a reply R:rport → E:eport takes on a steered testbed."""
    return nft_jhash(raddr, eaddr, rport, eport, nics, seed)


def install(topo, seed: int) -> None:
    """Steer inet's traffic toward the pool by nft_jhash (see the module docstring)."""
    a = topo.addr
    with IPRoute(netns=topo.inet) as ipr:
        for k in range(topo.nics):
            ipr.route("add", dst=a.pool, gateway=a.link("outside", k, "gw"), table=MARK_TABLE + k)
            ipr.rule("add", fwmark=1 + k, table=MARK_TABLE + k, priority=500 + k)
    rules = f"""
table ip {TABLE} {{
    chain out {{
        type route hook output priority mangle; policy accept;
        ip daddr {a.pool} meta l4proto {{ tcp, udp }} meta mark set jhash ip saddr . ip daddr . th sport . th dport mod {topo.nics} seed {seed:#x} offset 1 counter
    }}
}}
"""
    netns.run(topo.inet, ["nft", "-f", "-"], input_=rules)
