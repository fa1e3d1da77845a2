"""Fixtures of the fast-path benchmarks: flow sets, tables and traces built once per
session, in numpy (a million flows and their 64-byte frames take well under a second).

    flows  k = 0..n-1:  proto (TCP/UDP alternating),  I:i  -> R:r   (inside -> remote)
                        mapped to E:e  with  E = 198.18.0.0 + (k >> 16),  e = k & 0xffff
    out table  (proto, I, i, R, r) -> (E, e)        in table  (proto, R, r, E, e) -> (I, i)
    trace      65536 frames, 64 bytes each, back to back in one buffer; frame j belongs
               to flow idx[j] (uniform or zipf-skewed), OUT frames are I:i -> R:r,
               IN frames R:r -> E:e; every checksum valid (the fast path updates them)

Files here are named ``bench_*.py``; pyproject.toml's ``python_files`` makes pytest
collect them, so ``pytest benchmarks`` runs them (``--benchmark-disable``: once each,
untimed, as CI does).
"""
import os
import sys

import numpy as np
import pytest

from hypernat import layout

FRAME = 64                      # bytes per frame (Ethernet header included, no FCS)
TRACE_FRAMES = 1 << 16          # frames per trace
BATCH = 256                     # frames per translate() call
POOL_NET = 0xC6120000           # 198.18.0.0: the external pool of the benchmark
POOL = [(POOL_NET, 16)]
ZIPF_A = 1.1                    # zipf exponent of the skewed trace
# Rounds per timed benchmark; the rate is taken from the best round (least disturbed).
ROUNDS = int(os.environ.get("HYPERNAT_BENCH_ROUNDS", "20"))
# DRAM-bound benchmarks (64 MiB tables) rotate their rounds over this many separately
# allocated copies of their tables: where the huge pages land physically moves their
# rate by up to ~+-10% per allocation, and the best of three placements is steadier.
PLACEMENTS = 3


@pytest.fixture(scope="session")
def kit():
    """This module: the helpers and constants below, for the bench_*.py files (imported
    this way, not as `conftest`, which tests/ has too)."""
    return sys.modules[__name__]


def record_rate(benchmark, count, unit="mpps"):
    """Store the rate of `count` items per round in extra_info (best and median round).

    With --benchmark-disable there are no stats: the benchmark only ran once, untimed."""
    benchmark.extra_info["items_per_round"] = count
    stats = getattr(benchmark, "stats", None)
    if stats is None:
        return None
    best, median = stats.stats.min, stats.stats.median
    scale = 1e6 if unit == "mpps" else 1.0
    benchmark.extra_info[unit] = count / best / scale
    benchmark.extra_info[unit + "_median"] = count / median / scale
    return benchmark.extra_info[unit]


# --------------------------------------------------------------------------------------
# flows, tables, traces
# --------------------------------------------------------------------------------------


class Flows:
    def __init__(self, n, seed=1):
        rng = np.random.default_rng(seed)
        k = np.arange(n, dtype=np.uint64)
        self.n = n
        self.proto = np.where(k % 2 == 0, layout.PROTO_TCP, layout.PROTO_UDP).astype(np.uint8)
        self.iaddr = (0x0A000000 + k).astype(np.uint32)                       # 10.0.0.0/8
        self.iport = rng.integers(1024, 65536, n).astype(np.uint16)
        self.raddr = rng.integers(0x01000000, 0xBF000000, n).astype(np.uint32)  # not the pool
        self.rport = rng.choice(np.array([53, 80, 443, 8080], np.uint16), n)
        self.eaddr = (POOL_NET + (k >> 16)).astype(np.uint32)
        self.eport = (k & 0xFFFF).astype(np.uint16)

    def records(self, direction):
        """SLOT_DTYPE records of the out (0) or in (1) table."""
        r = np.zeros(self.n, layout.SLOT_DTYPE)
        r["proto"] = self.proto
        if direction == 0:
            r["saddr"], r["sport"], r["daddr"], r["dport"] = self.iaddr, self.iport, self.raddr, self.rport
            r["new_addr"], r["new_port"] = self.eaddr, self.eport
        else:
            r["saddr"], r["sport"], r["daddr"], r["dport"] = self.raddr, self.rport, self.eaddr, self.eport
            r["new_addr"], r["new_port"] = self.iaddr, self.iport
        r["rule_id"] = np.arange(self.n, dtype=np.uint32)
        return r


def _put16(f, col, v):
    f[:, col] = (v >> 8) & 0xFF
    f[:, col + 1] = v & 0xFF


def _put32(f, col, v):
    v = v.astype(np.uint64)
    for i in range(4):
        f[:, col + i] = (v >> (24 - 8 * i)) & 0xFF


def _words(f, a, b):
    w = f[:, a:b].astype(np.uint64)
    return (w[:, 0::2] << 8 | w[:, 1::2]).sum(axis=1)


def _fold(s):
    for _ in range(4):
        s = (s & 0xFFFF) + (s >> 16)
    return s


def build_trace(flows, idx, direction):
    """One buffer of len(idx) 64-byte frames (see the module doc), valid checksums."""
    n = len(idx)
    f = np.zeros((n, FRAME), np.uint8)
    f[:, 0:6] = (2, 0, 0, 0, 0, 1)
    f[:, 6:12] = (2, 0, 0, 0, 0, 2)
    f[:, 12:14] = (0x08, 0x00)
    proto = flows.proto[idx]
    if direction == 0:
        src, sp, dst, dp = flows.iaddr[idx], flows.iport[idx], flows.raddr[idx], flows.rport[idx]
    else:
        src, sp, dst, dp = flows.raddr[idx], flows.rport[idx], flows.eaddr[idx], flows.eport[idx]
    ip = 14
    f[:, ip] = 0x45
    _put16(f, ip + 2, np.full(n, FRAME - 14, np.uint64))
    _put16(f, ip + 4, np.arange(n, dtype=np.uint64) & 0xFFFF)
    f[:, ip + 6] = 0x40                                     # DF, not a fragment
    f[:, ip + 8] = 64
    f[:, ip + 9] = proto
    _put32(f, ip + 12, src)
    _put32(f, ip + 16, dst)
    _put16(f, ip + 10, ~_fold(_words(f, ip, ip + 20)) & 0xFFFF)
    l4 = ip + 20
    l4len = FRAME - l4
    _put16(f, l4, sp.astype(np.uint64))
    _put16(f, l4 + 2, dp.astype(np.uint64))
    tcp = proto == layout.PROTO_TCP
    f[tcp, l4 + 12] = 0x50                                  # data offset 5
    f[tcp, l4 + 13] = 0x10                                  # ACK
    f[tcp, l4 + 14] = 0x20                                  # window
    f[~tcp, l4 + 4] = 0
    f[~tcp, l4 + 5] = l4len                                 # UDP length
    f[:, l4 + 20:] = np.arange(FRAME - l4 - 20, dtype=np.uint8)   # payload
    pseudo = ((src.astype(np.uint64) >> 16) + (src.astype(np.uint64) & 0xFFFF)
              + (dst.astype(np.uint64) >> 16) + (dst.astype(np.uint64) & 0xFFFF)
              + proto.astype(np.uint64) + l4len)
    ck = ~_fold(pseudo + _words(f, l4, FRAME)) & 0xFFFF
    ck[(ck == 0) & ~tcp] = 0xFFFF
    f[tcp, l4 + 16] = ck[tcp] >> 8
    f[tcp, l4 + 17] = ck[tcp] & 0xFF
    f[~tcp, l4 + 6] = ck[~tcp] >> 8
    f[~tcp, l4 + 7] = ck[~tcp] & 0xFF
    return f.reshape(-1)


def flow_indices(nflows, nframes, dist, seed=2):
    rng = np.random.default_rng(seed)
    if dist == "uniform":
        return rng.integers(0, nflows, nframes)
    # zipf: rank r drawn with probability ~ 1/r^a; ranks scattered over the flows
    ranks = (rng.zipf(ZIPF_A, nframes) - 1) % nflows
    return rng.permutation(nflows)[ranks]


class World:
    """Flows, their two tables (either implementation), traces by (dist, direction)."""

    def __init__(self, fpmod, nflows):
        self.fp = fpmod
        self.flows = Flows(nflows)
        self.out_table = fpmod.FlowTable(nflows)
        self.in_table = fpmod.FlowTable(nflows)
        assert self.out_table.insert_batch(self.flows.records(0)) == nflows
        assert self.in_table.insert_batch(self.flows.records(1)) == nflows
        self.translator = fpmod.Translator(self.out_table, self.in_table, pool=POOL)
        self._traces = {}

    def trace(self, dist, direction, nframes=TRACE_FRAMES):
        key = (dist, direction, nframes)
        if key not in self._traces:
            idx = flow_indices(self.flows.n, nframes, dist)
            self._traces[key] = build_trace(self.flows, idx, direction)
        return self._traces[key]


@pytest.fixture(scope="session")
def worlds():
    """World per (implementation, number of flows, placement), built on first use;
    placements are independent allocations of the same tables (see PLACEMENTS)."""
    cache = {}

    def get(impl, nflows, placement=0):
        if (impl, nflows, placement) not in cache:
            if impl == "cython":
                from hypernat import _fastpath as mod
            else:
                from hypernat import fastpath_py as mod
            cache[impl, nflows, placement] = World(mod, nflows)
        return cache[impl, nflows, placement]

    return get


def batches(nframes, batch=BATCH):
    """(offsets, lengths) uint32 arrays per batch of a back-to-back trace."""
    out = []
    for start in range(0, nframes, batch):
        n = min(batch, nframes - start)
        offs = (np.arange(start, start + n, dtype=np.uint32) * FRAME).astype(np.uint32)
        out.append((offs, np.full(n, FRAME, np.uint32)))
    return out
