"""The address / port-block pool of one NIC: which blocks of E_i are free, and when.

``BlockPool`` owns everything about a block that happens once per block event, not
per connection (the blocks *in use* -- span, host, used ports -- are C records in
``hypernat.nat._ports.PortBlocks``, owned by the RuleBuilder):

    free blocks per address     [next native block, end of the native run, [freed /
                                adopted ids]]; a new block is taken from the end of the
                                freed list, then upward from the native run (``take``)
    addresses with a free block a round-robin queue: new hosts spread (``pick_address``)
    blocks journaled ahead      "reserve" records on disk (``reserve_plan`` /
                                ``reserved``), in flight (``reserving``); a block taken
                                without one is reserved at once with the next few of its
                                address (``urgent_reserve``: 1, 2, 4 ... x the reserve)
    the reuse delay             freed external endpoints wait (``defer``, ``due``)
    holds                       leases granted on an endpoint (``hold``, ``release_holds``):
                                an endpoint whose delay passed waits for its last one
                                (both in C, ``hypernat.nat._reuse.EndpointReuse``:
                                arrays in, arrays out)
    loans                       blocks lent (spill-over) or adopted (``lend``, ``adopt``,
                                ``give_up``)
    quarantine                  journaled blocks found after a crash, with the host the
                                journal named (``quarantine``, ``mature``); a recovered
                                block's unreported ports stay reserved until the
                                quarantine's end (``claim``, ``take_reserved_port``)

The pool never writes the journal, the translation log or the C tables: it answers
(the block to take, the records to journal, the endpoints to release, the blocks whose
quarantine ended) and the RuleBuilder acts.  Where it must know whether a block is
assigned to a host, it is given that container (``in_use``: anything with ``in``, the
builder's PortBlocks).  External endpoints are named by ``ekey`` = proto << 48 | E << 16
| Ep; an endpoint inside a block by (block id, protocol index, port offset).
"""
from __future__ import annotations

import collections
import ipaddress
import itertools
import typing

import numpy as np

from ._expire import ENDED_DTYPE
from ._reuse import HOLD_DTYPE, PARKED_DTYPE, EndpointReuse
from .records import ip_text as _ip


class Pool(typing.Protocol):
    """What the RuleBuilder asks of its pool (``BlockPool`` is the implementation)."""

    reserve_per_address: int
    reserve_addresses: int

    def pick_address(self) -> int: ...
    def take(self, aidx: int, in_use) -> int: ...
    def give_back(self, g: int, a: int) -> None: ...
    def is_reserved(self, g: int) -> bool: ...
    def use_reserve(self, g: int) -> None: ...
    def urgent_reserve(self, a: int, g: int, in_use) -> list: ...
    def reserve_plan(self, in_use) -> list: ...
    def reserve_records(self, blocks) -> list: ...
    def reserved(self, blocks, sync: bool = False) -> None: ...
    def reserving(self, blocks) -> None: ...
    def reserve_durable(self, blocks, in_use) -> None: ...
    def reserve_failed(self, blocks) -> None: ...
    def defer(self, ended) -> None: ...
    def due(self, now: int, budget: int) -> tuple: ...
    def hold(self, ekeys) -> None: ...
    def release_holds(self, ekeys) -> np.ndarray: ...
    def holds(self, ekey: int) -> int: ...
    def lend(self, in_use): ...
    def adopt(self, g: int) -> None: ...
    def give_up(self, g: int, in_use) -> bool: ...
    def quarantine(self, blocks, until) -> frozenset: ...
    def in_quarantine(self) -> bool: ...
    def is_quarantined(self, g: int) -> bool: ...
    def has_reserved_ports(self, g: int) -> bool: ...
    def quarantine_host(self, g: int, default: int) -> int: ...
    def claim(self, g: int, size: int) -> None: ...
    def take_reserved_port(self, g: int, pi: int, off: int) -> bool: ...
    def mature(self, now: int) -> tuple: ...
    def capacity(self, block_size: int) -> tuple: ...
    def journal_records(self, in_use) -> list: ...
    def stats(self) -> dict: ...
    def snapshot(self) -> dict: ...
    def restore(self, state) -> None: ...


class BlockPool:
    """The free blocks of NIC `nic`'s partition (``partition.Partition``), its reuse
    queue, holds, loans and quarantine (see the module docstring)."""

    def __init__(self, part, nic: int, holds_capacity: int = 1024):
        """`holds_capacity`: external endpoints with leases before the holds' index
        grows (the builder gives its flow tables' capacity: every leased endpoint is a
        session of this NIC, so the index never doubles -- a stall of tens of ms at 10^6
        holds -- on the loop)."""
        self._part = part
        self._bpa = part.bpa
        # Free blocks per address index: [next native block, end, [freed/adopted ids]].
        self._addr = {}
        self._avail = collections.deque()  # address indices that may have a free block
        self._avail_set = set()
        for a in part.nic_address_indices(nic):
            r = part.nic_blocks_on(nic, a)
            self._addr[a] = [r.start, r.stop, []]
            self._avail.append(a)
            self._avail_set.add(a)
        lo, hi = part.nic_block_range(nic)
        self._total_blocks = len(part.nic_address_indices(nic)) * (hi - lo)
        self._total_ports = part.nic_size(nic)
        self._adopted = set()
        self._lent = set()
        self._qblocks = {}  # block id -> quarantined until (crash recovery)
        self._qskipped = set()  # quarantined ids taken off the free lists, to give back
        self._qhosts = {}  # quarantined block id -> the host the journal assigned it to
        self._reserved = {}  # recovered block id -> [until, [mask per protocol]] (unrecovered ports)
        # the reuse-delay queue, holds per endpoint, endpoints whose delay passed while held
        self._reuse = EndpointReuse(holds_capacity)
        # Blocks journaled ahead of need ("reserve" records on disk): taking one is
        # durable already (a crash quarantines it); in flight: written, fsync not done.
        self._prejournaled = set()
        self._reserving = set()
        self.reserve_per_address = 4  # blocks kept journaled ahead, per address (0: off)
        self.reserve_addresses = 16  # ... on at most this many addresses
        self._sync_reserves = 0  # urgent reserves since reserve_plan last ran

    # -- taking and giving back -------------------------------------------------------------
    def pick_address(self) -> int:
        """Round-robin over addresses that still have a free block (new hosts spread);
        -1 if none has."""
        av = self._avail
        while av:
            a = av.popleft()
            st = self._addr[a]
            if st[0] < st[1] or st[2]:
                av.append(a)
                return a
            self._avail_set.discard(a)
        return -1

    def take(self, aidx: int, in_use) -> int:
        """A free block of address index `aidx` (off the free lists), or -1.  Blocks
        quarantined are passed over (and listed again when their quarantine ends)."""
        st = self._addr.get(aidx)
        if st is None:
            return -1
        q = self._qblocks
        free = st[2]
        while free:
            c = free.pop()
            if c in in_use:
                continue  # recovered after a crash while still listed: assigned already
            if c not in q:
                return c
            self._qskipped.add(c)
        while st[0] < st[1]:
            c = st[0]
            st[0] += 1
            if c in in_use:
                continue
            if c not in q:
                return c
            self._qskipped.add(c)
        return -1

    def give_back(self, g: int, a: int) -> None:
        """Block `g` of address index `a` is free again (the next one ``take`` hands out)."""
        st = self._addr.get(a)
        if st is None:
            st = self._addr[a] = [0, 0, []]
        st[2].append(g)
        if a not in self._avail_set:
            self._avail_set.add(a)
            self._avail.append(a)

    # -- journaled ahead ----------------------------------------------------------------------
    def is_reserved(self, g: int) -> bool:
        """A durable "reserve" record names block `g`."""
        return g in self._prejournaled

    def use_reserve(self, g: int) -> None:
        """Block `g` is taken: its reserve is used up."""
        self._prejournaled.discard(g)

    def _next_blocks(self, a: int, k: int, in_use, skip=(), journaled=False) -> list:
        """The next `k` free blocks of address index `a` in ``take``'s order (the end of
        the free list, then the native run upward), not in `skip` and, unless
        `journaled`, not journaled already."""
        st = self._addr.get(a)
        if st is None or k <= 0:
            return []
        q = self._qblocks
        res, fly = ((), ()) if journaled else (self._prejournaled, self._reserving)
        out = []
        for c in reversed(st[2]):
            if len(out) >= k:
                return out
            if c not in in_use and c not in q and c not in res and c not in fly and c not in skip:
                out.append(c)
        c = st[0]
        while len(out) < k and c < st[1]:
            if c not in in_use and c not in q and c not in res and c not in fly and c not in skip:
                out.append(c)
            c += 1
        return out

    def urgent_reserve(self, a: int, g: int, in_use) -> list:
        """Block `g` (of address index `a`) is about to be taken and no durable reserve
        names it: the blocks to journal now, `g` first.  A burst of new hosts beyond the
        reserve commits a reserve's worth (``_reserve_size``), then twice, four times as
        many ...: log2(burst) fsyncs, not one per block (until ``reserve_plan`` runs
        again), and at most about twice the burst journaled.  The run is spread over
        `a` and the addresses the round-robin hands new hosts next, as new hosts will
        take them: the doubling is one count for the burst, not one per address (with
        64 addresses a burst of 1000 new hosts journaled ~60k blocks, nearly the whole
        pool, 0.7 s on the packet path; now ~2k).  ``reserved(blocks, sync=True)`` once
        on disk."""
        k = self._reserve_size() << min(self._sync_reserves, 8)
        addrs = ([a] + [x for x in itertools.islice(self._avail, k) if x != a])[:k]
        return [g] + self._spread(addrs, k - 1, in_use, skip=(g,))

    def _spread(self, addrs, n, in_use, skip=(), journaled=False) -> list:
        """The next `n` blocks new hosts will take on `addrs` (the round-robin's next
        addresses, one block a host in turn): n / len(addrs) on each, the first ones
        one more (``_next_blocks`` on each)."""
        per, extra = divmod(n, len(addrs))
        out = []
        for i, x in enumerate(addrs):
            out += self._next_blocks(x, per + (i < extra), in_use, skip=skip, journaled=journaled)
        return out

    def _reserve_size(self) -> int:
        """Blocks a reserve holds: ``reserve_per_address`` on each of the next
        ``reserve_addresses`` addresses of the round-robin."""
        return self.reserve_per_address * min(self.reserve_addresses, max(1, len(self._avail)))

    def reserve_plan(self, in_use) -> list:
        """The blocks the next new hosts will take, to journal ahead: the next
        ``reserve_per_address`` x ``reserve_addresses`` takes of the round-robin (a new
        host takes one block, on the next address in turn), at most
        ``reserve_per_address`` on one address -- with more addresses than that, one
        block on each of the next ones (reserving several on the first few left every
        new host past them paying an fsync on the loop); those not journaled yet, []
        while more than half of them are reserved or in flight."""
        self._sync_reserves = 0
        want = self._reserve_size()
        addrs = list(itertools.islice(self._avail, want))
        if not addrs:
            return []
        upcoming = self._spread(addrs, want, in_use, journaled=True)
        res, fly = self._prejournaled, self._reserving
        blocks = [g for g in upcoming if g not in res and g not in fly]
        if (len(upcoming) - len(blocks)) * 2 > len(upcoming):
            return []
        return blocks

    def reserve_records(self, blocks) -> list:
        """The journal's "reserve" records of `blocks`."""
        recs = []
        for g in blocks:
            addr, lo, hi = self._part.block_span(g)
            recs.append({"op": "reserve", "block": g, "external": _ip(addr), "ports": [lo, hi]})
        return recs

    def reserved(self, blocks, sync: bool = False) -> None:
        """`blocks` are on disk as "reserve" records (`sync`: by ``urgent_reserve``)."""
        if sync:
            self._sync_reserves += 1
        self._prejournaled.update(blocks)

    def reserving(self, blocks) -> None:
        """`blocks`' reserve records are written, their fsync not done yet."""
        self._reserving.update(blocks)

    def reserve_durable(self, blocks, in_use) -> None:
        """The fsync of ``reserving(blocks)`` is done: those still free join the reserve."""
        self._reserving.difference_update(blocks)
        self._prejournaled.update(g for g in blocks if g not in in_use and g not in self._qblocks)

    def reserve_failed(self, blocks) -> None:
        self._reserving.difference_update(blocks)

    # -- the reuse delay and holds ------------------------------------------------------------
    def defer(self, ended) -> None:
        """The freed external endpoints of `ended` (hypernat.nat._expire.ENDED_DTYPE: the
        mappings one expiry step ended, in order, from ``SessionEnd.drain``) may be
        reused from their release_at on, once no lease holds them (invariant 3)."""
        self._reuse.defer(ended)

    def due(self, now: int, budget: int) -> tuple:
        """At most `budget` endpoints whose reuse delay has passed by `now`: (how many
        were taken off the queue, the ones free to release now as
        ``_reuse.ENDPOINT_DTYPE`` (block, pidx, offset) in queue order,
        ``in_quarantine()``).  The ones still held wait for their last release."""
        n, free = self._reuse.due(now, budget)
        return n, free, bool(self._qblocks or self._reserved)

    def hold(self, ekeys) -> None:
        """One lease granted on the endpoint of each key of `ekeys` (proto << 48 | eaddr
        << 16 | eport; an integer array, as ``LeaseTable.grant`` returns the new leases'
        endpoints)."""
        self._reuse.hold(ekeys)

    def release_holds(self, ekeys) -> np.ndarray:
        """One lease ran out or was revoked on the endpoint of each key of `ekeys` (an
        integer array: the leases one REVOKE_ACK or one turn of lease ends ran out):
        the endpoints (ENDPOINT_DTYPE) to release now, those that waited for that one,
        in order."""
        return self._reuse.release(ekeys)

    def holds(self, ekey: int) -> int:
        """Leases outstanding on one endpoint."""
        return self._reuse.holds(ekey)

    # -- loans (spill-over) -------------------------------------------------------------------
    def lend(self, in_use):
        """A free native block to lend; None if there is none."""
        for a in list(self._avail):
            st = self._addr[a]
            for k in range(len(st[2]) - 1, -1, -1):
                g = st[2][k]
                if g in in_use:  # recovered while listed: drop the stale entry
                    del st[2][k]
                    continue
                if g not in self._adopted and g not in self._qblocks:
                    del st[2][k]
                    self._lent.add(g)
                    return g
            while st[1] > st[0]:
                st[1] -= 1  # take from the end of the native run: the cursor never gets there
                g = st[1]
                if g in in_use:
                    continue
                if g not in self._qblocks:
                    self._lent.add(g)
                    return g
                self._qskipped.add(g)  # listed again when its quarantine ends
        return None

    def adopt(self, g: int) -> None:
        """Allocate from block `g`: lent by another NIC, or a loan of ours come back."""
        if g in self._lent:
            self._lent.discard(g)
        else:
            self._adopted.add(g)
        self.give_back(g, g // self._bpa)

    def give_up(self, g: int, in_use) -> bool:
        """Drop an adopted block that is free (to hand it back): True if it was."""
        if g not in self._adopted or g in in_use:
            return False
        st = self._addr.get(g // self._bpa)
        if st is None or g not in st[2]:
            return False
        st[2].remove(g)
        self._adopted.discard(g)
        return True

    # -- quarantine (crash recovery) --------------------------------------------------------
    def quarantine(self, blocks, until) -> frozenset:
        """Blocks not to hand out before `until` (ids, or {id: host "a.b.c.d" | int |
        None}); returns every host the quarantine names (unreadable hosts ignored)."""
        hosts = blocks if isinstance(blocks, dict) else {}
        for g in blocks:
            g = int(g)
            self._qblocks[g] = max(int(until), self._qblocks.get(g, 0))
            h = hosts.get(g)
            if h is None:
                continue
            try:
                self._qhosts[g] = int(h) if isinstance(h, int) else int(ipaddress.IPv4Address(h))
            except (TypeError, ValueError, ipaddress.AddressValueError):
                continue
        return frozenset(self._qhosts.values())

    def in_quarantine(self) -> bool:
        """Some block is quarantined or has reserved ports."""
        return bool(self._qblocks or self._reserved)

    def is_quarantined(self, g: int) -> bool:
        return g in self._qblocks

    def has_reserved_ports(self, g: int) -> bool:
        return g in self._reserved

    def quarantine_host(self, g: int, default: int) -> int:
        """The host the journal gave quarantined block `g` to, else `default`."""
        return self._qhosts.get(g, default)

    def claim(self, g: int, size: int) -> None:
        """Quarantined block `g` (of `size` ports) goes back to its host: all its ports
        reserved until the quarantine's end (``take_reserved_port`` per recovered one)."""
        until = self._qblocks.pop(g)
        self._qhosts.pop(g, None)
        self._qskipped.discard(g)  # never listed again: freed, it is given back
        full = (1 << size) - 1
        self._reserved[g] = [until, [full, full, full]]

    def take_reserved_port(self, g: int, pi: int, off: int) -> bool:
        """A recovered session's port leaves the reservation: False if it was not in it
        (live already or waiting for reuse)."""
        masks = self._reserved.get(g)
        if masks is None or not masks[1][pi] >> off & 1:
            return False
        masks[1][pi] &= ~(1 << off)
        return True

    def mature(self, now: int) -> tuple:
        """Quarantines whose time has come: (blocks free again -- an unrecovered block
        --, [(block, pidx, offset)] the reserved ports of recovered blocks to release:
        nobody reported them, their longest timeout has passed)."""
        expired = []
        for g, until in list(self._qblocks.items()):
            if until <= now:
                del self._qblocks[g]
                self._qhosts.pop(g, None)
                expired.append(g)
                if g in self._qskipped:  # passed over while quarantined: list it again
                    self._qskipped.discard(g)
                    self.give_back(g, g // self._bpa)
        ports = []
        for g, (until, masks) in list(self._reserved.items()):
            if until > now:
                continue
            del self._reserved[g]
            for pi in range(3):
                m = masks[pi]
                while m:
                    low = m & -m
                    m ^= low
                    ports.append((g, pi, low.bit_length() - 1))
        return expired, ports

    # -- gauges and state ---------------------------------------------------------------------
    def capacity(self, block_size: int) -> tuple:
        """(blocks, ports) this NIC allocates from: its partition, plus adopted, minus lent."""
        d = len(self._adopted) - len(self._lent)
        return self._total_blocks + d, self._total_ports + d * block_size

    def journal_records(self, in_use) -> list:
        """The pool's part of a journal checkpoint: every quarantined block (with its
        host where known), then every block journaled ahead and still free."""
        qh = self._qhosts
        recs = [{"op": "quarantine", "block": g, "host": _ip(qh[g])} if g in qh else {"op": "quarantine", "block": g}
                for g in self._qblocks]  # fmt: skip
        q = self._qblocks
        recs += [{"op": "reserve", "block": g} for g in sorted(self._prejournaled | self._reserving)
                 if g not in in_use and g not in q]  # fmt: skip
        return recs

    def stats(self) -> dict:
        return {
            **self._reuse.stats(),  # ports_waiting_reuse, endpoints_held, holds
            "blocks_quarantined": len(self._qblocks),
            "blocks_reserved": len(self._reserved),
            "blocks_borrowed": len(self._adopted),
            "blocks_lent": len(self._lent),
        }

    # read-only views, for checks and tests
    def holds_capacity(self) -> int:
        """Endpoints with leases the holds' index takes before it grows."""
        return self._reuse.capacity

    def free_addresses(self) -> tuple:
        """Address indices in the round-robin (those that may have a free block)."""
        return tuple(self._avail)

    def quarantined(self) -> dict:
        """{block: quarantined until}."""
        return dict(self._qblocks)

    def quarantine_hosts(self) -> dict:
        """{quarantined block: the host the journal named}."""
        return dict(self._qhosts)

    def reserved_ports(self) -> dict:
        """{recovered block: (until, (mask per protocol))}: ports nobody reported yet."""
        return {g: (u, tuple(ms)) for g, (u, ms) in self._reserved.items()}

    def reserved_ahead(self) -> frozenset:
        """Blocks with a durable "reserve" record, not taken yet."""
        return frozenset(self._prejournaled)

    def reserves_in_flight(self) -> frozenset:
        """Blocks whose "reserve" record waits for its fsync."""
        return frozenset(self._reserving)

    def waiting(self) -> list:
        """[(release_at, ekey, block, pidx, offset)] in the reuse delay, in order."""
        return self._reuse.waiting().tolist()

    def held(self) -> dict:
        """{ekey: (block, pidx, offset)}: past the reuse delay, waiting for holds."""
        return {k: (g, pi, off) for k, g, pi, off in self._reuse.held().tolist()}

    def hold_counts(self) -> dict:
        """{ekey: leases outstanding}."""
        return dict(self._reuse.hold_counts().tolist())

    def snapshot(self) -> dict:
        """The pool as plain data (the RuleBuilder's snapshot keys)."""
        queue, holds, held = self._reuse.snapshot()
        return {
            "addr": [[a, st[0], st[1], list(st[2])] for a, st in self._addr.items()],
            "avail": list(self._avail),
            "adopted": sorted(self._adopted),
            "lent": sorted(self._lent),
            "qblocks": [[g, u] for g, u in self._qblocks.items()],
            "qskipped": sorted(self._qskipped),
            "reuse": [list(x) for x in queue.tolist()],
            "holds": [list(x) for x in holds.tolist()],
            "held": [[k, [g, pi, off]] for k, g, pi, off in held.tolist()],
            "qhosts": [[g, h] for g, h in self._qhosts.items()],
            "reserved": [[g, u, list(ms)] for g, (u, ms) in self._reserved.items()],
        }

    def restore(self, state) -> None:
        """Load the pool's part of a snapshot (what ``snapshot`` wrote)."""
        self._addr = {int(a): [int(n), int(e), [int(x) for x in fr]] for a, n, e, fr in state["addr"]}
        self._avail = collections.deque(int(a) for a in state["avail"])
        self._avail_set = set(self._avail)
        self._adopted = set(state["adopted"])
        self._lent = set(state["lent"])
        self._qblocks = {int(g): int(u) for g, u in state["qblocks"]}
        self._qskipped = set(int(g) for g in state.get("qskipped", ()))
        self._reuse.restore(
            np.array([tuple(int(v) for v in x) for x in state["reuse"]], ENDED_DTYPE),
            np.array([(int(k), int(c)) for k, c in state["holds"]], HOLD_DTYPE),
            np.array([(int(k), *(int(x) for x in v)) for k, v in state["held"]], PARKED_DTYPE))
        self._qhosts = {int(g): int(h) for g, h in state.get("qhosts", ())}
        self._reserved = {int(g): [int(u), [int(x) for x in ms]] for g, u, ms in state.get("reserved", ())}

