"""The compiled per-connection state (hypernat/nat/) against tests/nat_model.py.

Same operations, same seed: the same decisions (ports chosen, refusals, masks)."""
import pytest
from hypothesis import given, settings, strategies as st

from nat_model import PortBlocksModel

from hypernat.nat import _ports as ports  # noqa: E402

OPS = st.lists(
    st.tuples(
        st.sampled_from(["add", "add_full", "remove", "pick", "pick", "pick", "pick_at", "pick_exact", "release"]),
        st.integers(0, 11),  # block id
        st.integers(0, 2),  # protocol index
        st.integers(0, 65535),  # internal port / offset source
    ),
    max_size=160,
)


@settings(max_examples=120, deadline=None)
@given(
    block_size=st.sampled_from([1, 2, 7, 63, 64, 65, 128, 200]),
    parity=st.booleans(),
    seed=st.integers(0, 2**64 - 1),
    lo_odd=st.booleans(),
    ops=OPS,
)
def test_port_blocks_match_model(block_size, parity, seed, lo_odd, ops):
    c = ports.PortBlocks(block_size, parity, seed)
    m = PortBlocksModel(block_size, parity, seed)
    for op, g, pi, x in ops:
        size = block_size - (g % 3 if block_size > 3 else 0)  # some short (last) blocks
        lo = 1024 + g * block_size + int(lo_odd)
        if op in ("add", "add_full"):
            if g in m.blocks:
                with pytest.raises(KeyError):
                    c.add(g, 0, 7, lo, size, 100 + g)
                continue
            c.add(g, 0, 7, lo, size, 100 + g, full=op == "add_full")
            m.add(g, 0, 7, lo, size, 100 + g, full=op == "add_full")
        elif g not in m.blocks:
            assert g not in c
            assert c.release(g, pi, 0) == -1
            if op != "release":
                with pytest.raises(KeyError):
                    c.pick(g, pi, x)
            continue
        elif op == "remove":
            c.remove(g)
            m.remove(g)
        elif op == "pick":
            assert c.pick(g, pi, x) == m.pick(g, pi, x)
        elif op == "pick_exact":
            port = m.blocks[g].lo + x % (block_size + 2) - 1
            assert c.pick_exact(g, pi, port) == m.pick_exact(g, pi, port)
        elif op == "pick_at":
            assert c.pick_at(g, pi, x % (block_size + 2)) == m.pick_at(g, pi, x % (block_size + 2))
        else:
            off = x % (block_size + 1)
            assert c.release(g, pi, off) == m.release(g, pi, off)
        assert len(c) == len(m.blocks) and sorted(c.ids()) == sorted(m.blocks)
    for g in m.blocks:
        assert c.span(g) == (7, m.blocks[g].lo, m.blocks[g].size) and c.host(g) == m.blocks[g].host
        for pi in range(3):
            assert c.used_mask(g, pi) == m.used_mask(g, pi) and c.n_used(g, pi) == m.n_used(g, pi)
        c.set_mask(g, 0, m.used_mask(g, 1))  # a snapshot's masks load back
        assert c.used_mask(g, 0) == m.used_mask(g, 1) and c.n_used(g, 0) == m.n_used(g, 1)


def test_many_blocks_rehash_and_delete():
    """Thousands of blocks in and out (the id table grows, deletes shift entries back)."""
    c = ports.PortBlocks(64, False, 3)
    live = set()
    for g in range(0, 30000, 3):
        c.add(g, 0, 1, 1024, 64, g)
        live.add(g)
    for g in range(0, 30000, 9):
        c.remove(g)
        live.discard(g)
    assert len(c) == len(live) and set(c.ids()) == live and all(c.host(g) == g for g in live)
    assert 9 not in c and 3 in c


@settings(max_examples=80, deadline=None)
@given(
    parity=st.booleans(),
    preserve=st.booleans(),
    seed=st.integers(0, 2**64 - 1),
    ops=st.lists(
        st.tuples(st.sampled_from(["block", "alloc", "alloc", "alloc", "release", "drop_host"]),
                  st.integers(1, 4), st.integers(0, 2), st.integers(0, 300)),
        max_size=200,
    ),
)
def test_hosts_allocate_matches_model(parity, preserve, seed, ops):
    """Hosts.allocate (C) against HostsModel: same block and port for the same inputs and seed."""
    from hypernat.nat import _hosts
    from nat_model import HostsModel

    bs = 16
    pb, mpb = ports.PortBlocks(bs, parity, seed), PortBlocksModel(bs, parity, seed)
    hs, mh = _hosts.Hosts(), HostsModel(mpb)
    next_block = 0
    for op, host, pi, x in ops:
        if host not in mh.h:
            hs.add(host, 0, 7)
            mh.add(host)
        if op == "block":
            g = next_block
            next_block += 1
            pb.add(g, 0, 7, 1000 + bs * g, bs, host)
            mpb.add(g, 0, 7, 1000 + bs * g, bs, host)
            hs.append_block(host, g)
            mh.h[host]["blocks"].append(g)
        elif op == "alloc":
            iport = 1000 + x % (bs * max(1, next_block) + 4)
            assert hs.allocate(host, pi, iport, preserve, pb) == mh.allocate(host, pi, iport, preserve)
        elif op == "release" and mh.h[host]["blocks"]:
            g = mh.h[host]["blocks"][x % len(mh.h[host]["blocks"])]
            assert pb.release(g, pi, x % bs) == mpb.release(g, pi, x % bs)
        elif op == "drop_host":
            for g in mh.h[host]["blocks"]:
                pb.remove(g)
                mpb.remove(g)
            hs.remove(host)
            del mh.h[host]
        if host in mh.h:
            assert hs.blocks(host) == mh.h[host]["blocks"] and hs.cur(host) == mh.h[host]["cur"]
    assert sorted(hs.ids()) == sorted(mh.h)


def test_many_hosts_rehash_and_delete():
    """Thousands of hosts in and out: records (and their block lists) survive the table's
    growth and the backward shifts of deletion."""
    from hypernat.nat import _hosts

    hs = _hosts.Hosts()
    live = set()
    for h in range(1, 20000, 2):
        hs.add(h, h % 5, h * 3)
        hs.append_block(h, h * 10)
        hs.append_block(h, h * 10 + 1)
        live.add(h)
    for h in range(1, 20000, 6):
        hs.remove(h)
        live.discard(h)
    assert len(hs) == len(live) and set(hs.ids()) == live
    assert all(hs.blocks(h) == [h * 10, h * 10 + 1] and hs.addr(h) == h * 3 for h in live)
    hs.remove_block(3, 31)
    assert hs.blocks(3) == [30] and not hs.idle(3)
    hs.remove_block(3, 30)
    assert hs.idle(3)
