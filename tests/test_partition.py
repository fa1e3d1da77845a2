"""Partition arithmetic against a brute-force model of the specification.

The model enumerates every external endpoint of a (small) pool and checks what the
strategy promises: each endpoint has exactly one owner; every NIC's share is made of
whole blocks; the shares are contiguous runs in NIC order (over a single address's
blocks for by-port, over addresses for by-address) whose sizes differ by at most one
block (address); and every other view of the partition (vectorised owners, per-NIC
block ranges and sizes, block ids and spans, loans) agrees with the enumeration.
"""
import collections
import ipaddress
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hypernat.partition import BY_ADDRESS, BY_PORT, Partition

import wire_model


@st.composite
def partitions(draw):
    n_prefixes = draw(st.integers(1, 3))
    nets, used = [], set()
    for _ in range(n_prefixes):
        plen = draw(st.integers(29, 32))
        base = draw(st.integers(0, 255)) << 8 | draw(st.integers(0, 7)) << 5
        net = ipaddress.IPv4Network((0xC6120000 | base, plen), strict=False)
        if any(net.overlaps(o) for o in nets):
            continue
        nets.append(net)
        used.add(net)
    port_min = draw(st.integers(1, 60000))
    n_ports = draw(st.integers(1, 300))
    port_max = min(65535, port_min + n_ports - 1)
    block = draw(st.integers(1, 40))
    strategy = draw(st.sampled_from([BY_PORT, BY_ADDRESS]))
    n_addrs = sum(n.num_addresses for n in nets)
    bpa = -(-(port_max - port_min + 1) // block)
    limit = bpa if strategy == BY_PORT else n_addrs
    n = draw(st.integers(1, min(6, limit)))
    return Partition(nets, port_min, port_max, n, strategy, block)


def endpoints(p: Partition):
    for net in p.nets:
        for a in range(int(net.network_address), int(net.broadcast_address) + 1):
            for port in range(p.port_min, p.port_max + 1):
                yield a, port


@settings(max_examples=60, deadline=None)
@given(partitions())
def test_owner_matches_brute_force(p):
    owner_of = {}
    blocks_of_nic = collections.defaultdict(set)
    per_block_owner = {}
    for a, port in endpoints(p):
        o = p.owner(a, port)
        assert 0 <= o < p.n
        assert p.contains(o, a, port) and not any(p.contains(k, a, port) for k in range(p.n) if k != o)
        owner_of[(a, port)] = o
        g = p.block_of(a, port)
        addr, lo, hi = p.block_span(g)
        assert addr == a and lo <= port <= hi and hi - lo + 1 <= p.block_size
        # whole blocks: every port of a block has the block's owner
        assert per_block_owner.setdefault(g, o) == o
        blocks_of_nic[o].add(g)
    # sizes and ranges agree with the enumeration
    counts = collections.Counter(owner_of.values())
    for k in range(p.n):
        assert counts.get(k, 0) == p.nic_size(k)
        expect = set()
        for a in p.nic_address_indices(k):
            expect.update(p.nic_blocks_on(k, a))
        assert expect == blocks_of_nic[k]
    # contiguous runs in NIC order, balanced to one block / one address
    if p.strategy == BY_PORT:
        for a in range(p.n_addrs):
            seq = [p.native_owner_of_block(a * p.bpa + j) for j in range(p.bpa)]
            assert seq == sorted(seq) and set(seq) == set(range(p.n))
            c = collections.Counter(seq).values()
            assert max(c) - min(c) <= 1
    else:
        seq = [p.native_owner_of_block(a * p.bpa) for a in range(p.n_addrs)]
        assert seq == sorted(seq) and set(seq) == set(range(p.n))
        c = collections.Counter(seq).values()
        assert max(c) - min(c) <= 1
    # vectorised owners() == owner(), including outside E
    pts = list(owner_of)
    extra = [(int(p.nets[0].network_address) - 1, p.port_min), (0x01020304, p.port_min)]
    if p.port_min > 1:
        extra.append((int(p.nets[0].network_address), p.port_min - 1))
    if p.port_max < 65535:
        extra.append((int(p.nets[0].network_address), p.port_max + 1))
    extra = [(a, port) for a, port in extra if p.address_index(a) < 0 or not p.port_min <= port <= p.port_max]
    allpts = pts + extra
    got = p.owners([a for a, _ in allpts], [q for _, q in allpts])
    assert got.tolist() == [owner_of.get(x, -1) for x in pts] + [-1] * len(extra)
    for a, port in extra:
        assert p.owner(a, port) == -1 and p.block_of(a, port) == -1


@settings(max_examples=40, deadline=None)
@given(partitions(), st.data())
def test_loans_override_one_block(p, data):
    if p.n < 2:
        return
    g = data.draw(st.integers(0, p.n_blocks - 1))
    native = p.native_owner_of_block(g)
    to = data.draw(st.integers(0, p.n - 1).filter(lambda k: k != native))
    before = {(a, port): p.owner(a, port) for a, port in endpoints(p)}
    p.lend(g, to)
    assert p.borrowed_by(to) == [g]
    for (a, port), o in before.items():
        expect = to if p.block_of(a, port) == g else o
        assert p.owner(a, port) == expect
    addr, lo, hi = p.block_span(g)
    assert p.owners([addr, addr], [lo, hi]).tolist() == [to, to]
    p.return_block(g)
    assert all(p.owner(a, port) == o for (a, port), o in before.items())
    assert p.borrowed_by(to) == []


def test_by_port_one_address_two_nics():
    p = Partition(["203.0.113.10/32"], 1024, 65535, 2, BY_PORT, 128)
    a = int(ipaddress.IPv4Address("203.0.113.10"))
    assert p.bpa == 504
    assert p.owner(a, 1024) == 0 and p.owner(a, 33279) == 0
    assert p.owner(a, 33280) == 1 and p.owner(a, 65535) == 1
    assert p.owner(a, 1023) == -1 and p.owner(a + 1, 2000) == -1
    assert p.nic_size(0) == p.nic_size(1) == 32256


def test_by_address_four_nics():
    p = Partition(["192.0.2.0/26"], 1024, 65535, 4, BY_ADDRESS, 256)
    base = int(ipaddress.IPv4Address("192.0.2.0"))
    assert [p.owner(base + i, 5000) for i in (0, 15, 16, 31, 32, 63)] == [0, 0, 1, 1, 2, 3]
    assert p.nic_address_indices(2) == range(32, 48)


def test_eim_owner_is_crc32_and_stable():
    a = int(ipaddress.IPv4Address("10.77.0.5"))
    assert zlib.crc32(bytes([10, 77, 0, 5])) == 1188156772  # pinned: must never change
    p2 = Partition(["198.18.77.0/28"], 1024, 65535, 2)
    p3 = Partition(["198.18.77.0/28"], 1024, 65535, 3)
    assert p2.eim_owner(a) == 1188156772 % 2 and p3.eim_owner(a) == 1188156772 % 3
    # spread: over a /22 of hosts every NIC gets a fair share
    hosts = np.arange(0x0A4D0000, 0x0A4D0400)
    c = collections.Counter(p3.eim_owner(int(h)) for h in hosts)
    assert set(c) == {0, 1, 2} and min(c.values()) > 0.25 * len(hosts)


def test_bad_arguments():
    with pytest.raises(ValueError):
        Partition(["198.18.77.1/32"], 1024, 65535, 2, BY_ADDRESS)
    with pytest.raises(ValueError):
        Partition(["198.18.77.1/32"], 1024, 1087, 2, BY_PORT, 64)
    with pytest.raises(ValueError):
        Partition([], 1024, 2000, 1)
    p = Partition(["198.18.77.0/30"], 1024, 2047, 2)
    with pytest.raises(ValueError):
        p.lend(10**9, 1)
    assert "NIC" in p.describe()


def test_availability_quick(tmp_path):
    """benchmarks/availability.py --quick: outputs written, and the measurements agree
    with what must hold whatever the random draws."""
    import importlib.util
    import json
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "availability.py")
    spec = importlib.util.spec_from_file_location("availability", path)
    av = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(av)
    assert av.main(["--quick", "--out", str(tmp_path), "--trials", "1000"]) == 0
    rows = json.loads((tmp_path / "availability.json").read_text())["rows"]
    assert (tmp_path / "availability.md").read_text().startswith("# Availability")
    assert (tmp_path / "availability.png").stat().st_size > 1000
    paper = [r for r in rows if r["set"] == "paper"]
    assert paper and all(r["p_any"] == 0 and r["bound_any"] < 1e-3 for r in paper)
    for r in rows:
        # spill-over never fails where the partitioned gateway succeeds, one pool fails least
        assert r["p_any_spill"] <= r["p_any"] + 1e-12
        assert r["p_single_pool"] <= r["p_any_spill"] + 0.05
        assert r["p_any"] <= r["bound_any"] + 0.05  # Markov holds (up to sampling noise)
    hot = [r for r in rows if r["set"] == "load" and r["load"] == 1.0]
    assert all(r["p_single_pool"] > 0.3 for r in hot)  # Poisson demand exceeds F about half the time
    skewed = [r for r in rows if r["dist"] == "zipf" and r["load"] == 0.9]
    assert all(r["p_any"] > 0.5 and r["p_any_spill"] < 0.05 for r in skewed)  # EIM skew: spill-over saves it


def _owner_reference(p: Partition, addr: int, port: int) -> int:
    """owner() written out in plain Python (tests/wire_model.py), to hold the compiled
    geometry (hypernat._geometry) to it."""
    return wire_model.owner_reference(p, addr, port)


@pytest.mark.parametrize("pool,strategy", [(["198.18.0.0/30"], BY_PORT), (["198.18.0.0/28"], BY_ADDRESS),
                                           (["198.18.0.8/29", "198.18.0.0/30"], BY_PORT),
                                           (["198.18.0.8/29", "198.18.0.0/30"], BY_ADDRESS)])
def test_compiled_owner_agrees_with_the_arithmetic_at_every_edge(pool, strategy):
    """The owner of an endpoint (hypernat._geometry, in C) against the arithmetic written
    out in Python, at every edge of the pool and the port range, with loans made and
    taken back (the C loan table follows ``lend`` / ``return_block``)."""
    import numpy as np

    p = Partition(pool, 1000, 1999, 3, strategy, 64)
    p.lend(5, 2)
    p.lend(0, 1)
    p.lend(2, 1)
    p.return_block(0)
    addrs = set()
    for net in p.nets:
        lo, hi = int(net.network_address), int(net.broadcast_address)
        addrs.update((lo - 1, lo, lo + 1, hi - 1, hi, hi + 1))
    addrs.update((0, 0xFFFFFFFF))
    for a in sorted(addrs):
        for port in (0, 999, 1000, 1063, 1064, 1500, 1999, 2000, 65535):
            want = _owner_reference(p, a, port)
            assert p.owner(a, port) == want, (a, port)
            assert p.owner(np.uint32(a), np.uint16(port)) == want
            assert p.geometry.native_owner(a, port) == wire_model.owner_reference(p, a, port, loans=False)
    grid = np.array([(a, q) for a in sorted(addrs) for q in (999, 1000, 1064, 1999, 2000)], dtype=np.int64)
    assert list(p.owners(grid[:, 0], grid[:, 1])) == [_owner_reference(p, int(a), int(q)) for a, q in grid]
    assert p.geometry.loans() == p.overrides and len(p.overrides) == 2
