"""Readable reference model of the owner side's per-connection decisions (issue 11).

Plain Python, no speed concerns: what the compiled code in ``hypernat/nat/`` must decide
for the same inputs and seed.  tests/test_nat_model.py drives both with hypothesis.

Covered: the port-block allocator (``hypernat.nat._ports.PortBlocks``), the host table's
allocation (``_hosts.Hosts``), the per-host rate (``_rate.HostRate``), the mappings and
sessions (``_mappings.Mappings``) and the compiled common case of a first packet without
a session, outgoing and incoming, and of fetch serving (``_mappings.OutSetup``: ``out``,
``in_``, ``run``, ``serve``), and idle expiry's per-session work
(``hypernat.nat._expire``: ``expire_out``, ``SessionEnd``; ``ExpiryModel`` is the Python
loop it replaced, run over another builder's tables through their Python interfaces).
"""
import collections

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

    def would_take(self, host, now):
        """What ``take`` would answer, changing nothing."""
        if host not in self.b:
            return True
        e = self.b[host]
        t = e[0] + (now - e[1]) * self.rate if now > e[1] else e[0]
        return min(t, self.burst) >= 1.0


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


class MappingsModel:
    """Mappings and sessions (hypernat.nat._mappings.Mappings): a rule id per mapping
    (1-based; a freed id is reused last-freed-first), the sessions of each as a set of
    remote endpoints (R, Rp); an outgoing key finds its mapping by the internal endpoint
    (EIM) or by the whole session key (APDM: an incoming session whose key is another
    mapping's is refused before it gets here)."""

    def __init__(self, eim=True):
        self.eim = eim
        self.m = {}  # rid -> [proto, iaddr, iport, eaddr, eport, block]
        self.rem = {}  # rid -> {(raddr, rport)}
        self.free = []
        self.top = 1
        self.outk = {}  # APDM: (p, I, Ip, R, Rp) -> rid
        self.pending = []  # (p, I, Ip, R, Rp, E, Ep, rid) not yet flushed

    def by_external(self, p, ea, ep):
        return next((r for r, m in self.m.items() if (m[0], m[3], m[4]) == (p, ea, ep)), 0)

    def by_out_key(self, p, ia, ip, ra, r):
        if self.eim:
            return next((x for x, m in self.m.items() if (m[0], m[1], m[2]) == (p, ia, ip)), 0)
        return self.outk.get((p, ia, ip, ra, r), 0)

    def new(self, p, ia, ip, ea, ep, g):
        assert not self.by_external(p, ea, ep) and not (self.eim and self.by_out_key(p, ia, ip, 0, 0))
        rid = self.free.pop() if self.free else self.top
        if rid == self.top:
            self.top += 1
        self.m[rid] = [p, ia, ip, ea, ep, g]
        self.rem[rid] = set()
        return rid

    def get(self, rid):
        return tuple(self.m[rid]) if rid in self.m else None

    def has_session(self, rid, ra, r):
        return (ra, r) in self.rem.get(rid, ())

    def has_remote_address(self, rid, ra):
        return any(x == ra for x, _ in self.rem[rid])

    def add_session(self, rid, ra, r):
        if (ra, r) in self.rem[rid]:
            return False
        self.rem[rid].add((ra, r))
        p, ia, ip, ea, ep, _ = self.m[rid]
        if not self.eim:
            self.outk[(p, ia, ip, ra, r)] = rid
        self.pending.append((p, ia, ip, ra, r, ea, ep, rid))
        return True

    def end_session(self, rid, ra, r):
        if rid not in self.m or (ra, r) not in self.rem[rid]:
            return -1
        self.rem[rid].discard((ra, r))
        p, ia, ip = self.m[rid][:3]
        if not self.eim and self.outk.get((p, ia, ip, ra, r)) == rid:
            del self.outk[(p, ia, ip, ra, r)]
        return len(self.rem[rid])

    def end(self, rid):
        assert not self.rem[rid]
        del self.m[rid], self.rem[rid]
        self.free.append(rid)

    def remotes(self, rid):
        return sorted(ra << 16 | r for ra, r in self.rem[rid])

    @property
    def n_sessions(self):
        return sum(len(x) for x in self.rem.values())


# OutSetup's answers besides a refusal's reason index
OK, FETCH, NEED_PY = -1, -2, -4


class OutSetupModel:
    """The common case of an outgoing first packet (hypernat.nat._mappings.OutSetup):
    what the compiled code decides itself, and where it leaves the packet to the
    builder's general path (NEED_PY) having changed nothing."""

    def __init__(self, maps: MappingsModel, hosts: HostsModel, internal, reasons, rate=None, cap=1 << 30,
                 preserve=False):
        self.maps, self.hosts, self.internal, self.reasons = maps, hosts, internal, reasons
        self.rate, self.cap, self.preserve = rate, cap, preserve
        self.room = 1 << 30
        self.recovering = False
        # the event ring (hypernat.nat._events.EventRing): which kinds it records, and
        # the records as (kind, proto, I, Ip, E, Ep, R, Rp, rule id, now)
        self.ev_mappings = self.ev_sessions = False
        self.events = []
        self.last = self.fetch_owner = 0
        self.nic, self.filtering, self.owner = 0, "endpoint-independent", None
        self.refused = collections.Counter()  # refusals run / serve answered (drain)

    def bind_in(self, nic, filtering, owner):
        """The incoming side: this NIC, the filtering behaviour, owner(E, Ep) -> NIC or
        -1 with the partition's loans applied (tests/wire_model.py: owner_reference)."""
        self.nic, self.filtering, self.owner = nic, filtering, owner

    def _session_event(self, rid, ra, r, now):
        if self.ev_sessions:
            p, ia, ip, ea, ep, _ = self.maps.get(rid)
            self.events.append((2, p, ia, ip, ea, ep, ra, r, rid, now))

    def in_(self, p, ra, rp, ea, ep, fl, icmp_error=False, now=0):
        """An incoming packet without a session (RuleBuilder._in's common case)."""
        if self.owner is None:
            return NEED_PY
        o = self.owner(ea, ep)
        if o < 0:
            return self.reasons["not_in_pool"]
        if o != self.nic:
            self.fetch_owner = o
            return FETCH  # another NIC's endpoint (serving: not_owner)
        rid = self.maps.by_external(p, ea, ep)
        r = 0 if p == 1 else rp
        if rid and self.maps.has_session(rid, ra, r):
            self.last = rid
            return OK
        if icmp_error:
            return self.reasons["icmp_error_no_session"]
        syn = p == 6 and fl & 0x12 == 0x02
        if not rid:
            return self.reasons["unsolicited_syn" if syn else "no_mapping"]
        f = self.filtering
        if f == "address-and-port-dependent" or (f == "address-dependent"
                                                 and not self.maps.has_remote_address(rid, ra)):
            return self.reasons["unsolicited_syn" if syn else "filtered"]
        if not self.maps.eim:  # APDM: the outgoing key already another mapping's session
            pr, ia, ip = self.maps.m[rid][:3]
            if self.maps.by_out_key(pr, ia, ip, ra, r) not in (0, rid):
                return self.reasons["unsolicited_syn" if syn else "filtered"]
        if self.room <= 0:
            return self.reasons["table_full"]
        self.maps.add_session(rid, ra, r)
        self.room -= 1
        self.last = rid
        self._session_event(rid, ra, r, now)
        return OK

    def _answered(self, r):
        """run / serve: a refusal that does not log (all but table_full) is answered and counted."""
        if r >= 0 and r != self.reasons["table_full"]:
            self.refused[r] += 1
            return True
        return r == OK

    def run(self, verdicts, keys, i, now, idx, res, fetches, inbound=False, v_out=1, v_in=2, v_icmp=3):
        """OutSetup.run: keys as (saddr, daddr, sport, dport, proto, kind, tcp_flags);
        answers appended to idx / res, inbound fetches to `fetches` as (frame, owner,
        fetch_dir, proto, saddr, sport, daddr, dport, kind, tcp_flags)."""
        while i < len(verdicts):
            v = verdicts[i]
            if not 1 <= v <= 4:
                i += 1
                continue
            s, d, sp, dp, p, kind, fl = keys[i]
            if inbound:
                if v not in (v_in, v_icmp):
                    break
                r = self.in_(p, s, sp, d, dp, fl, kind == 1, now)
                if r == FETCH:
                    idx.append(i)
                    res.append(r)
                    fetches.append((i, self.fetch_owner, 1, p, s, sp, d, dp, kind, fl))  # 1: verdicts.IN
                    i += 1
                    continue
            else:
                if v != v_out:
                    break
                r = self.out(p, s, sp, d, dp, now)
            if not self._answered(r):
                break
            idx.append(i)
            res.append(r)
            i += 1
        return i

    def serve(self, recs, i, now, status, answers):
        """OutSetup.serve: FETCH records as tuples (seq, rule_id, proto, kind, reason,
        flags, I, E, R, Ip, Ep, Rp, pad) -- kind 0 by external endpoint, flags 0x02 / 0x04
        look up only; status[i] -1 (answers[i] = (seq, rule id, R, Rp)) or the reason."""
        while i < len(recs):
            seq, _, p, kind, _, flags, ia, ea, ra, ip, ep, rp, _ = recs[i]
            if p not in (1, 6, 17):
                break
            if kind == 0:
                r = self.in_(p, ra, rp, ea, ep, 0, bool(flags & 6), now)
            else:
                r = self.out(p, ia, ip, ra, rp, now, bool(flags & 6))
            if r == FETCH:
                r = self.reasons["not_owner"]
            if not self._answered(r):
                break
            status[i] = r
            if r == OK:
                answers[i] = (seq, self.last, ra, 0 if p == 1 else rp)
            i += 1
        return i

    def out(self, p, ia, ip, ra, rp, now, icmp_error=False):
        if not any(ia & m == n for n, m in self.internal):
            return self.reasons["not_internal"]
        if p not in (1, 6, 17) or ia not in self.hosts.h:
            return NEED_PY  # a host not known here: fetch or a new host
        r = 0 if p == 1 else rp
        rid = self.maps.by_out_key(p, ia, ip, ra, r)
        if rid and self.maps.has_session(rid, ra, r):
            self.last = rid
            return OK
        if icmp_error:
            return self.reasons["icmp_error_no_session"]
        if self.room <= 0:
            return self.reasons["table_full"]
        if not rid:
            if self.recovering:
                return NEED_PY
            if self.rate is not None and not self.rate.would_take(ia, now):
                self.rate.take(ia, now)
                return self.reasons["host_rate_limited"]
            pi = {6: 0, 17: 1, 1: 2}[p]
            h = self.hosts.h[ia]
            if h["nports"][pi] >= self.cap:
                return NEED_PY
            g, off = self.hosts.allocate(ia, pi, ip, self.preserve)
            if g < 0:
                return NEED_PY  # a new block
            if self.rate is not None:
                self.rate.take(ia, now)
            h["nports"][pi] += 1
            b = self.hosts.pb.blocks[g]
            rid = self.maps.new(p, ia, ip, b.addr, b.lo + off, g)
            if self.ev_mappings:
                self.events.append((1, p, ia, ip, b.addr, b.lo + off, 0, 0, rid, now))
        elif self.rate is not None and not self.rate.take(ia, now):
            return self.reasons["host_rate_limited"]
        self.maps.add_session(rid, ra, r)
        self.room -= 1
        self.last = rid
        self._session_event(rid, ra, r, now)
        return OK


# -- idle expiry ------------------------------------------------------------------------
TCP, UDP, ICMP = 6, 17, 1
FIN, SYN, RST = 0x01, 0x02, 0x04
F_OCCUPIED, F_CLONE = 0x01, 0x02
EXPIRY_EVENTS = ("expired_tcp_established", "expired_tcp_transitory", "expired_udp", "expired_icmp")


class ExpiryModel:
    """One sweep step's expiry of owned out entries, as the Python code before
    ``hypernat.nat._expire`` did it, over builder `rb`'s tables and bookkeeping through
    their Python interfaces (FlowTable lookup / delete, Mappings, Hosts, PortBlocks,
    BlockPool.defer, TransLog.rule, one REVOKE tuple per session)."""

    def __init__(self, timeouts):
        t = timeouts
        self.t_udp, self.t_est, self.t_trans, self.t_icmp = t.udp, t.tcp_established, t.tcp_transitory, t.icmp
        self.events = dict.fromkeys(EXPIRY_EVENTS, 0)
        self.removed = []  # REVOKE tuples (SESSION_DTYPE field order)

    def timeout_for(self, p, tcp_out, tcp_in):
        if p == TCP:
            st = tcp_out | tcp_in
            if st & (RST | FIN):
                return self.t_trans
            if tcp_out & SYN and tcp_in & SYN:
                return self.t_est
            if st & SYN:
                return self.t_trans
            return self.t_est
        return self.t_udp if p == UDP else self.t_icmp

    @staticmethod
    def event(p, tcp_out, tcp_in):
        if p == TCP:
            st = tcp_out | tcp_in
            if st & (RST | FIN) or (st & SYN and not (tcp_out & SYN and tcp_in & SYN)):
                return "expired_tcp_transitory"
            return "expired_tcp_established"
        return "expired_udp" if p == UDP else "expired_icmp"

    def candidates(self, rb, now):
        """Slot indices of the owned out entries idle for at least their protocol's
        shortest timeout (the sweep's filter), ascending."""
        s = rb.out.slots
        t_tcp = min(self.t_trans, self.t_est)
        got = []
        for w in range(len(s)):
            fl = int(s["flags"][w])
            if not fl & F_OCCUPIED or fl & F_CLONE:
                continue
            p = int(s["proto"][w])
            thr = t_tcp if p == TCP else (self.t_udp if p == UDP else self.t_icmp)
            if now - int(s["last_seen"][w]) >= thr:
                got.append(w)
        return got

    def select(self, slots, lo, hi, now, budget, lease_clones):
        """One step's candidates in out-table slots [lo, hi) (`slots`: the SLOT_DTYPE
        array): (slot indices, where the slice ends), as the numpy filter before
        ``_expire.out_candidates`` picked them."""
        import numpy as np

        t_tcp = min(self.t_trans, self.t_est)
        t_floor = min(t_tcp, self.t_udp, self.t_icmp)
        w = slots.view(np.uint32).reshape(-1, 8)
        sel = np.zeros(0, np.intp)
        if now >= t_floor:
            word3 = w[lo:hi, 3]
            m = w[lo:hi, 6] <= now - t_floor
            m &= (word3 & (F_OCCUPIED << 8)) != 0
            sel = np.flatnonzero(m)
            if len(sel) > 4 * budget:
                sel = sel[: 4 * budget]
                hi = lo + int(sel[-1]) + 1
            if len(sel):
                w3 = word3[sel]
                pr = w3 & 0xFF
                thr = np.where(pr == TCP, t_tcp, np.where(pr == UDP, self.t_udp, self.t_icmp))
                keep = (now - w[lo:hi, 6][sel].astype(np.int64)) >= thr
                keep &= (w3 & (F_CLONE << 8)) == 0
                sel = sel[keep]
        if lease_clones:
            lease = (w[lo:hi, 7] >> 16).astype(np.int32)
            cexp = ((w[lo:hi, 3] & (F_CLONE << 8)) != 0) & (lease != 0)
            cexp &= (((now & 0xFFFF) - lease) & 0xFFFF) < 0x8000
            csel = np.flatnonzero(cexp)
            if len(csel):
                sel = np.union1d(sel, csel)
        if len(sel) > budget:
            sel = sel[:budget]
            hi = lo + int(sel[-1]) + 1
        return sel + lo, hi

    def expire(self, rb, where, now):
        """Expire the idle ones among the out entries at `where`: (expired, mappings ended)."""
        so, si = rb.out.slots, rb.inn.slots
        dead_out, dead_in = [], []
        expired = ended = 0
        for w in where:
            r = so[w]
            p, ia, ip, ra, rp = int(r["proto"]), int(r["saddr"]), int(r["sport"]), int(r["daddr"]), int(r["dport"])
            ea, ep, rid = int(r["new_addr"]), int(r["new_port"]), int(r["rule_id"])
            ls_o, st_o = int(r["last_seen"]), int(r["tcp_state"])
            rr, ik = (0, (p, ra, ep, ea, ep)) if p == ICMP else (rp, (p, ra, rp, ea, ep))
            j = rb.inn.lookup(*ik)
            ls_i, st_i = (int(si["last_seen"][j]), int(si["tcp_state"][j])) if j >= 0 else (0, 0)
            last = max(ls_o, ls_i)
            if now - last < self.timeout_for(p, st_o, st_i):
                so["last_seen"][w] = last
                continue
            dead_out.append((p, ia, ip, ra, rp))
            if j >= 0 and not int(si["flags"][j]) & F_CLONE:
                dead_in.append(ik)
            if not rb.maps.matches(rid, ia, ip, ea, ep):
                continue
            expired += 1
            self.events[self.event(p, st_o, st_i)] += 1
            ended += self.end_session(rb, rid, ra, rr, now, last, st_o, st_i)
        for k in dead_out:
            rb.out.delete(*k)
        for k in dead_in:
            rb.inn.delete(*k)
        if rb.translog is not None:
            rb.translog.flush()
        return expired, ended

    def end_session(self, rb, rid, raddr, r, now, last_seen, tcp_out, tcp_in):
        left = rb.maps.end_session(rid, raddr, r)
        if left < 0:
            return 0
        tl = rb.translog
        p, ia, ip, ea, ep, g = rb.maps.get(rid)
        if tl is not None and tl.remote and not tl.per_block:
            tl.rule("remove", p, ia, ip, ea, ep, raddr, r)
        if rb.track_removed:
            self.removed.append((ia, ea, raddr, ip, ep, r, p, 3, rid, last_seen, tcp_out, tcp_in, rb.nic, 0))
        if left:
            return 0
        rb.maps.end(rid)
        pi = {TCP: 0, UDP: 1, ICMP: 2}[p]
        rb.hosts.add_ports(ia, pi, -1)
        if tl is not None and not tl.per_block and not tl.remote:
            tl.rule("remove", p, ia, ip, ea, ep)
        import numpy as np

        from hypernat.nat._expire import ENDED_DTYPE

        rb.pool.defer(np.array([(now + rb.reuse_delay, p << 48 | ea << 16 | ep, g, pi, ep - rb.blocks.lo(g))],
                               ENDED_DTYPE))
        return 1
