"""Readable reference model of the owner side's per-connection decisions (issue 11).

Plain Python, no speed concerns: what the compiled code in ``hypernat/nat/`` must decide
for the same inputs and seed.  tests/test_nat_model.py drives both with hypothesis.

Covered so far: the port-block allocator (``hypernat.nat._ports.PortBlocks``).
"""

M64 = (1 << 64) - 1


class SplitMix64:
    """splitmix64 (Steele, Lea, Flood 2014): the allocator's random numbers."""

    def __init__(self, seed):
        self.state = seed & M64

    def next(self):
        self.state = (self.state + 0x9E3779B97F4A7C15) & M64
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
        return z ^ (z >> 31)


class Block:
    def __init__(self, addr, lo, size, host, aidx):
        self.addr, self.lo, self.size, self.host, self.aidx = addr, lo, size, host, aidx
        self.used = [set(), set(), set()]  # per protocol index: used offsets


class PortBlocksModel:
    """Blocks assigned to hosts; RFC 6056 port choice inside one block.

    pick: r = (next random & 0xFFFFFFFF) % size; the first free offset at or after r,
    else the first free one from 0 (wrapping); with parity, only offsets k whose port
    lo + k has the parity of the internal port (RFC 4787 REQ-3).  -1 if none.
    """

    def __init__(self, block_size, parity=False, seed=0):
        self.block_size, self.parity = block_size, parity
        self.rng = SplitMix64(seed)
        self.blocks = {}

    def add(self, g, aidx, addr, lo, size, host, full=False):
        assert g not in self.blocks and 1 <= size <= self.block_size
        b = self.blocks[g] = Block(addr, lo, size, host, aidx)
        if full:
            b.used = [set(range(size)) for _ in range(3)]

    def remove(self, g):
        del self.blocks[g]

    def pick(self, g, pi, iport):
        b = self.blocks[g]
        if len(b.used[pi]) >= b.size:
            return -1  # full: no random number drawn
        r = (self.rng.next() & 0xFFFFFFFF) % b.size

        def ok(k):
            return k not in b.used[pi] and (not self.parity or (b.lo + k) % 2 == iport % 2)

        for k in list(range(r, b.size)) + list(range(0, r)):
            if ok(k):
                b.used[pi].add(k)
                return k
        return -1

    def pick_at(self, g, pi, off):
        b = self.blocks[g]
        if not 0 <= off < b.size or off in b.used[pi]:
            return False
        b.used[pi].add(off)
        return True

    def pick_exact(self, g, pi, iport):
        off = iport - self.blocks[g].lo
        return off if self.pick_at(g, pi, off) else -1

    def release(self, g, pi, off):
        b = self.blocks.get(g)
        if b is None or off not in b.used[pi]:
            return -1
        b.used[pi].discard(off)
        return sum(len(u) for u in b.used)

    def used_mask(self, g, pi):
        return sum(1 << k for k in self.blocks[g].used[pi])

    def n_used(self, g, pi):
        return len(self.blocks[g].used[pi])


class HostRateModel:
    """Token bucket per internal host: `burst` tokens at most, `rate` more per second; a
    new connection takes one, none left = refused (hypernat.nat._rate without eviction)."""

    def __init__(self, rate, burst=0):
        self.rate, self.burst = float(rate), float(burst) if burst > 0 else max(1.0, float(rate))
        self.b = {}  # host -> [tokens, last]

    def take(self, host, now):
        if host not in self.b:
            self.b[host] = [self.burst - 1.0, now]
            return True
        e = self.b[host]
        if now > e[1]:
            e[0] += (now - e[1]) * self.rate
            e[1] = now
        e[0] = min(e[0], self.burst)
        if e[0] < 1.0:
            return False
        e[0] -= 1.0
        return True


class HostsModel:
    """The host table's part of a new mapping (hypernat.nat._hosts.Hosts.allocate):
    preservation over the host's blocks in order, else RFC 6056 choice (PortBlocksModel)
    from the block that last had room on, wrapping over its blocks."""

    def __init__(self, blocks: PortBlocksModel):
        self.pb = blocks
        self.h = {}  # iaddr -> {"blocks": [ids], "cur": int, "nports": [0, 0, 0]}

    def add(self, iaddr):
        self.h[iaddr] = {"blocks": [], "cur": 0, "nports": [0, 0, 0]}

    def allocate(self, iaddr, pi, iport, preserve):
        h = self.h[iaddr]
        if preserve:
            for g in h["blocks"]:
                off = self.pb.pick_exact(g, pi, iport)
                if off >= 0:
                    return g, off
        nb = len(h["blocks"])
        for t in range(nb):
            k = (h["cur"] + t) % nb
            off = self.pb.pick(h["blocks"][k], pi, iport)
            if off >= 0:
                h["cur"] = k
                return h["blocks"][k], off
        return -1, -1
