"""Small helpers for the slow path, tools and the emulation that build packets in
Python (the fast path has its own, in C; its pure-Python twin keeps its own too, so that
the reference reads on its own)."""
from __future__ import annotations

import struct


def inet_checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of `data`: the one's complement of the one's
    complement sum of its 16-bit big-endian words (an odd length is padded with a zero)."""
    if len(data) & 1:
        data = bytes(data) + b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return (~s) & 0xFFFF
