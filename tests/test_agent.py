"""RuleAgent unit tests: the cloning protocol between NICs, without processes or sockets.

Agents of 2-3 NICs are wired through an in-memory "coordinator" that runs every routed
message through ``messages.validate`` exactly as a receiving NIC does, with a settable
clock.  Each agent talks to a small owner/holder double (``MiniRules``) that keeps
sessions in real flow tables, so clones really land in the fast path's tables and the
replayed frames really translate.
"""
import collections
import hashlib
import struct

import numpy as np
import pytest

from hypernat import layout
from hypernat import messages as M
from hypernat.agent import (IN, OUT, AgentParams, RuleAgent, predict_nic, session_key, skey,
                            switch_hash)
from hypernat.fastpath import FlowTable
from hypernat.rules import DIR_BIT_IN, DIR_BIT_OUT, SESSION_DTYPE
from hypernat.verdicts import SLOW_PATH_REASON_NAMES

PROTO = 6
E = 0xC6120001  # 198.18.0.1, split by port between the NICs
N_PORTS = 64512  # ports 1024..65535


def owner_of(n):
    def f(addr, port):
        if addr != E or not 1024 <= port <= 65535:
            return None
        return (port - 1024) * n // N_PORTS
    return f


class MiniRules:
    """The RuleBuilder surface the agent uses, over real FlowTables (a test double)."""

    def __init__(self, nic, n):
        self.nic, self.n = nic, n
        self.out_t, self.in_t = FlowTable(1024), FlowTable(1024)
        self.sessions = {}  # skey -> rule_id
        self.holds = collections.Counter()
        self.created, self.removed = [], []
        self.activity = []
        self.next_port = 1024 + nic * N_PORTS // n + 10
        self.refuse = set()  # in-keys to NACK

    def build(self, i, ip, r, rp, proto=PROTO):
        sk = (proto, i, ip, E, self.next_port, r, rp)
        self.next_port += 1
        self.sessions[sk] = len(self.sessions) + 1
        self.out_t.insert(proto, i, ip, r, rp, E, sk[4], rule_id=self.sessions[sk])
        self.in_t.insert(proto, r, rp, E, sk[4], i, ip, rule_id=self.sessions[sk])
        self.created.append(self._rec(sk))
        return sk

    def expire(self, sk):
        del self.sessions[sk]
        self.out_t.delete(*session_key(sk, OUT))
        self.in_t.delete(*session_key(sk, IN))
        self.removed.append(self._rec(sk))

    def _rec(self, sk):
        r = np.zeros(1, SESSION_DTYPE)
        r["proto"], r["iaddr"], r["iport"], r["eaddr"], r["eport"], r["raddr"], r["rport"] = sk
        r["owner"], r["rule_id"], r["dirs"] = self.nic, self.sessions.get(sk, 0), 3
        return r[0]

    # owner side
    def serve_fetches(self, recs, now, lease_ms=0):
        rules, bad, status = [], [], []
        for i, k in enumerate(recs):
            if k["kind"] == M.FETCH_BY_EXTERNAL:  # (p, R, Rp, E, Ep)
                d, kt = IN, (int(k["proto"]), int(k["rem_addr"]), int(k["rem_port"]), int(k["ext_addr"]),
                             int(k["ext_port"]))
            else:  # (p, I, Ip, R, Rp)
                d, kt = OUT, (int(k["proto"]), int(k["int_addr"]), int(k["int_port"]), int(k["rem_addr"]),
                              int(k["rem_port"]))
            hit = [sk for sk in self.sessions if session_key(sk, d) == kt]
            if hit and kt not in self.refuse:
                p, ia, ip, ea, ep, ra, rp = hit[0]
                rules.append((int(k["seq"]), self.sessions[hit[0]], lease_ms, ia, ea, ra, ip, ep, rp, self.nic, p, 0, 0))
            else:
                bad.append(i)
                status.append(SLOW_PATH_REASON_NAMES.index("no_mapping"))
        return np.array(rules, M.RULE_DTYPE), np.array(bad, np.int64), np.array(status, np.int32)

    def hold(self, p, e, ep):
        self.holds[(p, e, ep)] += 1

    def release_hold(self, p, e, ep):
        assert self.holds[(p, e, ep)] > 0, "release without hold"
        self.holds[(p, e, ep)] -= 1

    def hold_many(self, ekeys):  # proto << 48 | eaddr << 16 | eport
        for k in np.asarray(ekeys).tolist():
            self.hold(k >> 48, (k >> 16) & 0xFFFFFFFF, k & 0xFFFF)

    def release_many(self, ekeys):
        for k in np.asarray(ekeys).tolist():
            self.release_hold(k >> 48, (k >> 16) & 0xFFFFFFFF, k & 0xFFFF)

    def merge_activity(self, recs, now=None):
        self.activity.extend(skey(r) for r in recs)
        return len(recs)

    def recover_sessions(self, recs, now):  # no crash here: nothing to re-adopt
        return np.zeros(len(recs), bool)

    def drain_created(self):
        out, self.created = self.created, []
        return np.array(out, SESSION_DTYPE) if out else np.zeros(0, SESSION_DTYPE)

    def drain_removed(self):
        out, self.removed = self.removed, []
        return np.array(out, SESSION_DTYPE) if out else np.zeros(0, SESSION_DTYPE)

    # holder side
    def install_clones(self, recs, now, dirs=3, lease_until=0, idx=None, owners=None):
        recs = np.atleast_1d(recs)
        d = np.broadcast_to(np.asarray(dirs), (len(recs),))
        got = []
        for x in (range(len(recs)) if idx is None else np.asarray(idx).reshape(-1).tolist()):
            sk, n = skey(recs[x]), 0
            if d[x] & DIR_BIT_IN:
                n += self.in_t.insert(sk[0], sk[5], sk[6], sk[3], sk[4], sk[1], sk[2], flags=layout.F_CLONE)
            if d[x] & DIR_BIT_OUT:
                n += self.out_t.insert(sk[0], sk[1], sk[2], sk[5], sk[6], sk[3], sk[4], flags=layout.F_CLONE)
            got.append(n)
        return np.array(got, np.int8)

    def remove_clone(self, recs):
        n = 0
        for r in np.atleast_1d(recs):
            sk = skey(r)
            n += self.in_t.delete(*session_key(sk, IN)) + self.out_t.delete(*session_key(sk, OUT))
        return n

    def collect_activity(self, clear=True):
        out = []
        for t in (self.in_t, self.out_t):
            for i in t.occupied():
                s = t.slots[i]
                if s["flags"] & layout.F_CLONE and s["flags"] & layout.F_ACTIVE:
                    if t is self.in_t:
                        sk = (int(s["proto"]), int(s["new_addr"]), int(s["new_port"]), int(s["daddr"]),
                              int(s["dport"]), int(s["saddr"]), int(s["sport"]))
                    else:
                        sk = (int(s["proto"]), int(s["saddr"]), int(s["sport"]), int(s["new_addr"]),
                              int(s["new_port"]), int(s["daddr"]), int(s["dport"]))
                    r = np.zeros(1, SESSION_DTYPE)
                    r["proto"], r["iaddr"], r["iport"], r["eaddr"], r["eport"], r["raddr"], r["rport"] = sk
                    r["last_seen"] = s["last_seen"]
                    out.append(r[0])
                    if clear:
                        t.slots[i]["flags"] &= ~layout.F_ACTIVE & 0xFF
        return np.array(out, SESSION_DTYPE) if out else np.zeros(0, SESSION_DTYPE)


class Fabric:
    """N agents, an in-memory coordinator with validation, one clock."""

    def __init__(self, n=2, **params):
        self.t = [100.0]
        self.n = n
        self.queue = collections.deque()
        self.dropped = collections.Counter()
        self.lose = set()  # message types the "network" loses
        self.replayed = collections.defaultdict(list)
        p = dict(lease_s=10.0, lease_margin_s=0.5, activity_interval_s=1.0, fetch_timeout_s=1.0, retry_s=0.1,
                 retry_max_s=0.2, fetch_rate=10.0, fetch_burst=20.0)
        p.update(params)
        self.rules = [MiniRules(i, n) for i in range(n)]
        self.agents = [
            RuleAgent(i, n, self.rules[i], self._sender(i), owner_of(n), self._replayer(i), AgentParams(**p),
                      clock=lambda: self.t[0])
            for i in range(n)
        ]

    def _sender(self, src):
        def send(target, mtype, recs):
            self.queue.append((src, target, mtype, recs.tobytes()))
        return send

    def _replayer(self, nic):
        def replay(direction, frames):
            self.replayed[nic].append((direction, list(frames)))
        return replay

    def pump(self, max_msgs=10000):
        n = 0
        while self.queue and n < max_msgs:
            src, target, mtype, payload = self.queue.popleft()
            n += 1
            if mtype in self.lose:
                self.dropped[mtype] += 1
                continue
            d = M.validate(src, bytes([mtype]), payload, receiver=target, n_nics=self.n,
                           owns=lambda nic, a, p: np.array([owner_of(self.n)(int(x), int(y)) == nic
                                                            for x, y in zip(a, p)]))
            if not d.ok:
                self.dropped[d.reason] += 1
                continue
            self.agents[target].on_message(src, d.mtype, d.recs, self.t[0])
        return n

    def advance(self, dt, step=0.05):
        end = self.t[0] + dt
        while self.t[0] < end:
            self.t[0] = min(end, self.t[0] + step)
            for a in self.agents:
                a.tick(self.t[0])
            self.pump()


def in_key(sk):
    k = np.zeros(1, layout.KEY_DTYPE)[0]
    k["proto"], k["saddr"], k["sport"], k["daddr"], k["dport"] = session_key(sk, IN)
    return k


def out_key(sk):
    k = np.zeros(1, layout.KEY_DTYPE)[0]
    k["proto"], k["saddr"], k["sport"], k["daddr"], k["dport"] = session_key(sk, OUT)
    return k


R = 0xC0000201  # 192.0.2.1
I = 0x0A000005  # 10.0.0.5


@pytest.fixture
def fab():
    return Fabric(2)


def test_passive_fetch_installs_clone_and_replays_in_order(fab):
    sk = fab.rules[0].build(I, 4000, R, 443)
    a1 = fab.agents[1]
    for i in range(3):
        assert a1.fetch(IN, in_key(sk), 0, b"frame%d" % i, fab.t[0])
    assert len(a1.pending) == 1 and a1.queued_total == 3
    assert a1.counters["tx_fetch"] == 1  # one fetch for the flow, not one per frame
    fab.pump()
    assert fab.replayed[1] == [(IN, [b"frame0", b"frame1", b"frame2"])]
    assert a1.queued_total == 0 and not a1.pending
    slot = fab.rules[1].in_t.get(*session_key(sk, IN))
    assert slot is not None and slot["new_addr"] == I and slot["new_port"] == 4000
    assert slot["flags"] & layout.F_CLONE
    assert fab.rules[0].holds[(PROTO, E, sk[4])] == 1  # the owner holds the endpoint for the lease


def test_outbound_fetch_for_eim_host_owned_elsewhere(fab):
    sk = fab.rules[0].build(I, 4001, R, 80)
    a1 = fab.agents[1]
    assert a1.fetch(OUT, out_key(sk), 0, b"syn", fab.t[0])
    fab.pump()
    assert fab.replayed[1] == [(OUT, [b"syn"])]
    slot = fab.rules[1].out_t.get(*session_key(sk, OUT))
    assert slot is not None and (slot["new_addr"], slot["new_port"]) == (E, sk[4])
    assert fab.rules[1].in_t.get(*session_key(sk, IN)) is None  # only the direction asked for


def test_nack_drops_queue_and_negative_cache_stops_refetch(fab):
    sk = (PROTO, I, 4002, E, 1500, R, 443)  # nobody has it
    a1 = fab.agents[1]
    a1.fetch(IN, in_key(sk), 0, b"x", fab.t[0])
    a1.fetch(IN, in_key(sk), 0, b"y", fab.t[0])
    fab.pump()
    assert a1.counters["fetch_nack"] == 2 and a1.queued_total == 0 and not fab.replayed[1]
    sent = a1.counters["tx_fetch"]
    assert not a1.fetch(IN, in_key(sk), 0, b"z", fab.t[0] + 0.1)
    assert a1.counters["fetch_negative_cached"] == 1 and a1.counters["tx_fetch"] == sent
    fab.advance(2.5)  # negative_ttl (2 s) passed: fetched again
    a1.fetch(IN, in_key(sk), 0, b"w", fab.t[0])
    assert a1.counters["tx_fetch"] == sent + 1


def test_port_scan_is_rate_limited_per_source_legit_fetch_unaffected(fab):
    a1 = fab.agents[1]
    scanner = 0xCB007101
    for port in range(1024, 1024 + 500):
        a1.fetch(IN, in_key((PROTO, 0, 0, E, port, scanner, 5555)), 0, b"syn", fab.t[0])
    assert a1.counters["tx_fetch"] == 20  # the burst
    assert a1.counters["fetch_rate_limited"] == 480
    sk = fab.rules[0].build(I, 4003, R, 443)
    assert a1.fetch(IN, in_key(sk), 0, b"reply", fab.t[0])  # another source: not limited
    fab.pump()
    assert fab.replayed[1][-1] == (IN, [b"reply"])


def test_queue_bounds_per_flow_and_total():
    fab = Fabric(2, queue_per_flow=3, queue_total=5)
    a1 = fab.agents[1]
    sk = fab.rules[0].build(I, 4004, R, 443)
    ok = [a1.fetch(IN, in_key(sk), 0, b"%d" % i, fab.t[0]) for i in range(5)]
    assert ok == [True, True, True, False, False]
    sk2 = fab.rules[0].build(I, 4005, R, 443)
    ok2 = [a1.fetch(IN, in_key(sk2), 0, b"%d" % i, fab.t[0]) for i in range(3)]
    assert ok2 == [True, True, False]  # total of 5 reached
    assert a1.counters["pending_queue_full"] == 3
    fab.pump()
    assert sorted(len(f) for _, f in fab.replayed[1]) == [2, 3]


def test_fetch_retried_then_times_out(fab):
    sk = fab.rules[0].build(I, 4006, R, 443)
    fab.lose.add(M.T_FETCH)
    a1 = fab.agents[1]
    a1.fetch(IN, in_key(sk), 0, b"x", fab.t[0])
    fab.advance(0.5)
    assert a1.counters["fetch_retries"] >= 2 and a1.pending
    fab.advance(0.6)
    assert not a1.pending and a1.counters["fetch_timeout"] == 1 and a1.queued_total == 0


def test_lost_reply_retried_idempotently(fab):
    """The first RULE is lost: the retried FETCH is answered again, one hold only."""
    sk = fab.rules[0].build(I, 4007, R, 443)
    fab.lose.add(M.T_RULE)
    a1 = fab.agents[1]
    a1.fetch(IN, in_key(sk), 0, b"x", fab.t[0])
    fab.pump()
    fab.lose.clear()
    fab.advance(0.3)
    assert fab.replayed[1] == [(IN, [b"x"])]
    assert fab.agents[0].counters["tx_rule"] >= 2
    assert fab.rules[0].holds[(PROTO, E, sk[4])] == 1


def test_forged_rule_for_foreign_endpoint_is_dropped(fab):
    a1 = fab.agents[1]
    sk = (PROTO, I, 4008, E, 1100, R, 443)  # E:1100 belongs to NIC 0
    a1.fetch(IN, in_key(sk), 0, b"x", fab.t[0])
    fab.queue.clear()
    rec = M.records(M.T_RULE, 1)
    rec["seq"] = a1.pending[(IN, session_key(sk, IN))].seq
    rec["proto"], rec["int_addr"], rec["int_port"] = PROTO, I, 4008
    rec["ext_addr"], rec["ext_port"], rec["rem_addr"], rec["rem_port"] = E, 1100, R, 443
    rec["owner"], rec["lease_ms"] = 1, 10000
    # NIC 1 poses as the owner of NIC 0's endpoint: validation refuses it on the wire ...
    d = M.validate(1, bytes([M.T_RULE]), rec.tobytes(), receiver=1,
                   owns=lambda nic, a, p: np.array([owner_of(2)(int(x), int(y)) == nic for x, y in zip(a, p)]))
    assert d.reason == "foreign_endpoint"
    # ... and the agent refuses it too when handed over directly
    a1.on_message(1, M.T_RULE, rec, fab.t[0])
    assert a1.counters["bad_message"] == 1
    assert fab.rules[1].in_t.get(*session_key(sk, IN)) is None and a1.pending


def test_lease_runs_out_without_activity_and_owner_releases_hold(fab):
    sk = fab.rules[0].build(I, 4009, R, 443)
    a1 = fab.agents[1]
    a1.fetch(IN, in_key(sk), 0, b"x", fab.t[0])
    fab.pump()
    assert sk in a1.clones
    fab.advance(9.0)
    assert sk in a1.clones  # 10 s lease, 0.5 s margin
    fab.advance(1.0)
    assert sk not in a1.clones and a1.counters["lease_expired"] == 1
    assert fab.rules[1].in_t.get(*session_key(sk, IN)) is None
    assert fab.rules[0].holds[(PROTO, E, sk[4])] == 1  # the owner waits for its own view + grace
    fab.advance(1.2)
    assert fab.rules[0].holds[(PROTO, E, sk[4])] == 0


def test_activity_renews_lease_and_reaches_owner(fab):
    """A one-way stream at the holder keeps the clone and the owner's session alive."""
    sk = fab.rules[0].build(I, 4010, R, 443)
    a1 = fab.agents[1]
    a1.fetch(IN, in_key(sk), 0, b"x", fab.t[0])
    fab.pump()
    t = fab.rules[1].in_t
    for _ in range(30):  # 30 s of traffic at the holder, lease 10 s
        i = t.lookup(*session_key(sk, IN))
        t.slots[i]["flags"] |= layout.F_ACTIVE  # what the fast path does on a hit
        fab.advance(1.0)
    assert sk in a1.clones
    assert fab.rules[0].activity.count(sk) >= 20
    assert a1.counters["leases_renewed"] >= 20
    assert fab.rules[0].holds[(PROTO, E, sk[4])] == 1


def test_revoke_before_reuse(fab):
    sk = fab.rules[0].build(I, 4011, R, 443)
    a1 = fab.agents[1]
    a1.fetch(IN, in_key(sk), 0, b"x", fab.t[0])
    fab.pump()
    fab.rules[0].expire(sk)  # the owner's idle timeout
    fab.advance(0.1)
    assert sk not in a1.clones and a1.counters["clone_revoked"] == 1
    assert fab.rules[1].in_t.get(*session_key(sk, IN)) is None
    assert fab.rules[0].holds[(PROTO, E, sk[4])] == 0  # acknowledged: free for reuse
    assert fab.agents[0].counters["revokes"] == 1


def test_revoke_lost_holds_endpoint_until_lease_end(fab):
    sk = fab.rules[0].build(I, 4012, R, 443)
    a1 = fab.agents[1]
    a1.fetch(IN, in_key(sk), 0, b"x", fab.t[0])
    fab.pump()
    fab.lose.add(M.T_REVOKE)
    fab.rules[0].expire(sk)
    fab.advance(5.0)
    assert fab.rules[0].holds[(PROTO, E, sk[4])] == 1  # no ack: still held (holder may translate)
    assert fab.agents[0].counters["retries"] >= 3
    fab.advance(7.0)
    assert sk not in a1.clones  # the holder's lease ran out ...
    assert fab.rules[0].holds[(PROTO, E, sk[4])] == 0  # ... and then the owner's view of it


def _sent(fab, mtype):
    """The messages of `mtype` queued in the fabric: [(src, target, records)]."""
    return [(s, t, np.frombuffer(p, M.DTYPE_OF[mtype])) for s, t, m, p in fab.queue if m == mtype]


def test_revokes_of_one_turn_go_as_one_message_per_holder(fab):
    """N sessions ended in one turn, all cloned by NIC 1: the owner sends ONE REVOKE
    message of N records under one seq (today's main: N messages of one record), retried
    whole while lost, acknowledged by ONE REVOKE_ACK record; the holder drops all N
    clones and the owner releases every endpoint once."""
    n = 40
    a0, a1 = fab.agents
    sks = [fab.rules[0].build(I, 4300 + k, R + k, 443) for k in range(n)]  # one remote each: no rate limit
    for sk in sks:
        a1.fetch(IN, in_key(sk), 0, b"x", fab.t[0])
    fab.pump()
    assert all(sk in a1.clones for sk in sks) and len(a0.leases) == n
    for sk in sks:
        fab.rules[0].expire(sk)
    fab.lose.add(M.T_REVOKE)
    a0.step_created(fab.t[0])
    (msg,) = _sent(fab, M.T_REVOKE)
    assert msg[:2] == (0, 1) and len(msg[2]) == n and len(set(msg[2]["seq"].tolist())) == 1
    assert {skey(r) for r in msg[2]} == set(sks) and a0.counters["revokes"] == n
    fab.pump()
    assert fab.dropped[M.T_REVOKE] == 1 and all(sk in a1.clones for sk in sks)
    fab.t[0] += 0.15  # past retry_s: sent again, whole, under its seq
    a0.step_retransmit(fab.t[0])
    (again,) = _sent(fab, M.T_REVOKE)
    assert again[2].tobytes() == msg[2].tobytes()
    fab.lose.clear()
    fab.pump(max_msgs=1)  # the holder gets it
    (ack,) = _sent(fab, M.T_REVOKE_ACK)
    assert len(ack[2]) == 1 and int(ack[2]["seq"][0]) == int(msg[2]["seq"][0]) and ack[2]["status"][0] == M.ST_OK
    assert not any(sk in a1.clones for sk in sks) and a1.counters["clone_revoked"] == n
    fab.pump()
    assert not a0._unacked and not a0.leases and a0.counters["ack_stale"] == 0
    assert all(fab.rules[0].holds[(PROTO, E, sk[4])] == 0 for sk in sks)  # released once each (no underflow)
    fab.advance(1.0)
    assert not _sent(fab, M.T_REVOKE) and a0.counters["tx_revoke"] == 2 * n  # sent, retried once


def test_revoke_of_leases_already_ended_is_not_sent(fab):
    """A session removed after its lease's end passed: no REVOKE, the lease just ends."""
    sk = fab.rules[0].build(I, 4390, R, 443)
    a0, a1 = fab.agents
    a1.fetch(IN, in_key(sk), 0, b"x", fab.t[0])
    fab.pump()
    fab.rules[0].expire(sk)
    fab.t[0] += 20.0  # lease_s 10 (+ grace) passed, its timer not run yet
    a0.step_created(fab.t[0])
    assert not _sent(fab, M.T_REVOKE) and a0.counters["revokes"] == 0
    assert not a0.leases and fab.rules[0].holds[(PROTO, E, sk[4])] == 0


@pytest.mark.parametrize("n", [2, 3, 4])
def test_active_install_pushes_to_predicted_nic(n):
    fab = Fabric(n, active_install=True)
    pushed = 0
    for port in range(4100, 4140):
        sk = fab.rules[0].build(I, port, R + port, 443)
        j = predict_nic("sha1", n, PROTO, sk[5], sk[6], sk[3], sk[4])
        fab.advance(0.05)
        if j != 0:
            pushed += 1
            assert sk in fab.agents[j].clones
            assert fab.rules[j].in_t.get(*session_key(sk, IN)) is not None
        assert all(sk not in fab.agents[k].clones for k in range(1, n) if k != j)
    assert fab.agents[0].counters["pushes"] == pushed > 0
    assert not fab.agents[0]._unacked  # every push acknowledged


def _flow_where(pred):
    for r in range(R, R + 1000):
        if pred(r):
            return r
    raise AssertionError("no such flow")


def test_wrong_prediction_falls_back_to_passive():
    """The owner predicts with crc32, the switch really uses sha1: the push goes to the
    wrong NIC, the reply misses at the right one and is fetched."""
    fab = Fabric(3, active_install=True, switch_hash="crc32")
    port = 1024 + 10  # MiniRules' first port on NIC 0
    r = _flow_where(lambda r: predict_nic("sha1", 3, PROTO, r, 443, E, port) not in
                    (0, predict_nic("crc32", 3, PROTO, r, 443, E, port))
                    and predict_nic("crc32", 3, PROTO, r, 443, E, port) != 0)
    sk = fab.rules[0].build(I, 4200, r, 443)
    assert sk[4] == port
    fab.advance(0.05)
    wrong = predict_nic("crc32", 3, PROTO, r, 443, E, port)
    right = predict_nic("sha1", 3, PROTO, r, 443, E, port)
    assert sk in fab.agents[wrong].clones and sk not in fab.agents[right].clones
    assert fab.agents[right].fetch(IN, in_key(sk), 0, b"reply", fab.t[0])
    fab.pump()
    assert fab.replayed[right] == [(IN, [b"reply"])]


def test_push_after_fetch_releases_queue():
    """The push loses the race with the reply: the fetch is pending when PUSH lands."""
    fab = Fabric(2)
    port = 1024 + 10
    r = _flow_where(lambda r: predict_nic("sha1", 2, PROTO, r, 443, E, port) == 1)
    sk = fab.rules[0].build(I, 4300, r, 443)
    a1 = fab.agents[1]
    a1.fetch(IN, in_key(sk), 0, b"reply", fab.t[0])
    fab.queue.clear()  # the FETCH is in flight (lost)
    fab.agents[0].p.active_install = True
    fab.agents[0]._push_created(fab.t[0])
    fab.pump()
    assert fab.replayed[1] == [(IN, [b"reply"])] and not a1.pending
    assert a1.counters["push_installed"] == 1


def test_coordinator_restart_resend(fab):
    sk = fab.rules[0].build(I, 4400, R, 443)
    a1 = fab.agents[1]
    a1.fetch(IN, in_key(sk), 0, b"x", fab.t[0])
    fab.queue.clear()  # the coordinator died with the FETCH
    a1.resend_all(fab.t[0])
    fab.pump()
    assert fab.replayed[1] == [(IN, [b"x"])]


def test_snapshot_restore_revalidates_clones_and_keeps_leases(fab):
    sk = fab.rules[0].build(I, 4500, R, 443)
    a1 = fab.agents[1]
    a1.fetch(IN, in_key(sk), 0, b"x", fab.t[0])
    fab.pump()
    snap1 = a1.snapshot(fab.t[0])
    snap0 = fab.agents[0].snapshot(fab.t[0])
    fresh = Fabric(2)
    fresh.rules[0].sessions = dict(fab.rules[0].sessions)
    fresh.agents[0].restore(snap0, fresh.t[0])
    assert fresh.rules[0].holds[(PROTO, E, sk[4])] == 1  # the lease still holds the endpoint
    fresh.agents[1].restore(snap1, fresh.t[0])
    assert fresh.rules[1].in_t.get(*session_key(sk, IN)) is None  # not used before revalidation
    fresh.pump()
    assert sk in fresh.agents[1].clones
    assert fresh.rules[1].in_t.get(*session_key(sk, IN)) is not None


def test_revalidation_refused_drops_clone(fab):
    sk = (PROTO, I, 4600, E, 1200, R, 443)  # the owner lost it
    fresh = Fabric(2)
    fresh.agents[1].restore({"clones": [[list(sk), 0, 7, DIR_BIT_IN]], "leases": []}, fresh.t[0])
    fresh.pump()
    assert sk not in fresh.agents[1].clones
    assert fresh.agents[1].counters["clones_lost_on_revalidation"] == 1


def test_bad_records_counted_not_raised(fab):
    a = fab.agents[0]
    a.on_message(1, 0x7F, np.zeros(1, M.KEY_DTYPE), fab.t[0])
    assert a.counters["bad_message"] == 1


def test_switch_hash_sha1_matches_hashlib_and_spreads():
    t = (6, 0x0A000001, 1234, 0xC0000201, 80)
    d = hashlib.sha1(struct.pack("!IIHHB", t[1], t[3], t[2], t[4], t[0])).digest()
    assert switch_hash("sha1", *t) == int.from_bytes(d[:4], "big")
    for name in ("sha1", "crc32", "jhash"):
        counts = collections.Counter(predict_nic(name, 4, 6, 0x0A000001 + i, 1000 + i, 0xC0000201, 80)
                                     for i in range(4000))
        assert len(counts) == 4 and min(counts.values()) > 800, (name, counts)
    assert switch_hash("sha1", *t, fields="src") == switch_hash("sha1", 17, t[1], 1, 2, 3, fields="src")
    with pytest.raises(ValueError):
        switch_hash("toeplitz", *t)


# ------------------------------------------------------------- keys, the switch's hash


def test_icmp_session_keys_use_the_identifier_and_match_the_builder():
    """ICMP query sessions carry rport 0; their table keys use the identifier in both
    port fields: out (1, I, id, R, id), in (1, R, id', E, id').  The agent's keys are
    the builder's (rules.record_keys) for every protocol."""
    from hypernat.rules import record_keys

    I_, R_, E_, ident, ident2 = 0x0A000005, 0xC0000201, 0xC6120001, 0x1234, 0x9876
    sk = (layout.PROTO_ICMP, I_, ident, E_, ident2, R_, 0)
    assert session_key(sk, OUT) == (1, I_, ident, R_, ident)
    assert session_key(sk, IN) == (1, R_, ident2, E_, ident2)
    for proto in (layout.PROTO_ICMP, layout.PROTO_TCP, layout.PROTO_UDP):
        rp = 0 if proto == layout.PROTO_ICMP else 443
        rec = np.zeros(1, SESSION_DTYPE)[0]
        rec["proto"], rec["iaddr"], rec["iport"], rec["eaddr"], rec["eport"] = proto, I_, 4000, E_, 5000
        rec["raddr"], rec["rport"] = R_, rp
        assert (session_key(skey(rec), OUT), session_key(skey(rec), IN)) == record_keys(rec)


# Known-good values: hypernat.lab.steering.predict_return_nic as it matched the kernel's
# nftables choice on 200/200 testbed connections (tests/test_lab_peer.py), before the
# computation moved to hypernat.switchhash.
_NFT_KNOWN = [
    # raddr, rport, eaddr, eport, nics, seed, raw jhash, NIC
    (0xC6336401, 5201, 0xC6124D03, 1024, 2, 0, 0xC01AC9B7, 1),
    (0xC6336401, 5201, 0xC6124D03, 40000, 2, 0x5EED1234, 0x3AD68F0F, 0),
    (0xCB007109, 443, 0xC6124D0F, 65535, 3, 0, 0x3EF8D1C7, 0),
    (0x0A000001, 1, 0x0A000002, 2, 4, 0xFFFFFFFF, 0x4F3360E0, 1),
    (0xC6336407, 80, 0xC6124D00, 2048, 2, 7, 0x617778BD, 0),
]


@pytest.mark.parametrize("r,rp,e,ep,n,seed,raw,nic", _NFT_KNOWN)
def test_jhash_reproduces_nftables_known_values(r, rp, e, ep, n, seed, raw, nic):
    from hypernat import switchhash
    from hypernat.lab import steering

    assert switchhash.nft_jhash_raw(r, e, rp, ep, seed) == raw
    assert switch_hash("jhash", PROTO, r, rp, e, ep, seed) == raw
    assert predict_nic("jhash", n, PROTO, r, rp, e, ep, seed) == nic == (raw * n) >> 32
    assert steering.predict_return_nic(r, rp, e, ep, n, seed) == nic  # one implementation


def test_jhash_lookup3_vectors_and_icmp_not_predictable():
    from hypernat import switchhash

    assert switchhash.jhash(b"", 0) == 0xDEADBEEF
    assert switchhash.jhash(b"Four score and seven years ago", 0) == 0x17770551
    assert switchhash.jhash(b"Four score and seven years ago", 1) == 0xCD628161
    assert switchhash.predictable("jhash", 6) and switchhash.predictable("jhash", 17)
    assert not switchhash.predictable("jhash", 1) and switchhash.predictable("sha1", 1)
    assert not switchhash.predictable("toeplitz", 6)


@pytest.mark.parametrize("n", [1, 3, 9])
def test_fetch_serving_answers_alike_in_one_batch_or_one_by_one(n):
    """_on_fetch (one implementation: the builder's serve_fetches) gives the same RULE and NACK records
    for the same FETCH records (found, refused, both directions) sent in one batch or
    one at a time."""
    sent = []
    for small in (True, False):
        fab = Fabric(2)
        own = fab.rules[0]
        sks = [own.build(I, 5000 + i, R, 443) for i in range(n)]
        own.refuse.add(session_key(sks[0], IN))
        keys = M.records(M.T_FETCH, n + 1)
        for i, sk in enumerate(sks):
            keys[i]["seq"], keys[i]["proto"], keys[i]["kind"] = 10 + i, PROTO, M.FETCH_BY_EXTERNAL
            keys[i]["ext_addr"], keys[i]["ext_port"], keys[i]["rem_addr"], keys[i]["rem_port"] = E, sk[4], R, 443
        keys[n]["seq"], keys[n]["proto"], keys[n]["kind"] = 99, PROTO, M.FETCH_BY_INTERNAL  # by internal endpoint
        keys[n]["int_addr"], keys[n]["int_port"], keys[n]["rem_addr"], keys[n]["rem_port"] = I, 5000 + n - 1, R, 443
        a = fab.agents[0]
        fab.queue.clear()
        for part in ([keys[i:i + 1] for i in range(n + 1)] if small else [keys]):
            a.on_message(1, M.T_FETCH, part, fab.t[0])
        # record by record (the vectorised path sends one message per direction)
        sent.append(sorted((m[2], r.tobytes()) for m in fab.queue
                           for r in np.frombuffer(m[3], M.DTYPE_OF[m[2]])))
        assert fab.rules[0].holds[(PROTO, E, sks[-1][4])] == 1  # a lease held for the answer
    assert sent[0] == sent[1]
    types = [t for t, _ in sent[0]]
    assert M.T_RULE in types and M.T_NACK in types


def test_restart_report_is_retried_until_acknowledged(fab):
    """After an owner restarts, the holder's report of its clones (the only way a crashed
    owner learns of an idle clone) is sent again until the owner acknowledges it."""
    sk = fab.rules[0].build(I, 4100, R, 443)
    a1 = fab.agents[1]
    a1.fetch(IN, in_key(sk), 0, b"x", fab.t[0])
    fab.pump()
    assert sk in a1.clones
    fab.rules[0].activity.clear()
    fab.lose.add(M.T_ACTIVITY)
    a1.peer_restarted(0, fab.t[0])
    fab.pump()
    assert fab.dropped[M.T_ACTIVITY] == 1 and not fab.rules[0].activity
    fab.advance(0.5)  # retried (retry_s 0.1, backing off to 0.2), still lost
    assert fab.dropped[M.T_ACTIVITY] >= 3
    fab.lose.clear()
    fab.advance(0.3)
    assert sk in fab.rules[0].activity  # the owner got the report
    assert not a1._unacked  # acknowledged: no more resends
    sent = a1.counters["tx_activity"]
    fab.advance(0.5)
    assert a1.counters["tx_activity"] == sent


def test_restart_report_goes_in_messages_of_at_most_max_records(fab, monkeypatch):
    """The restart report of 10 clones with MAX_RECORDS 4: messages of 4, 4 and 2
    records (seqs consecutive), each retried until acknowledged; the owner gets every
    clone.  REVOKEs split the same way."""
    monkeypatch.setattr(M, "MAX_RECORDS", 4)
    a0, a1 = fab.agents
    sks = [fab.rules[0].build(I, 4400 + k, R + k, 443) for k in range(10)]
    for sk in sks:
        a1.fetch(IN, in_key(sk), 0, b"x", fab.t[0])
    fab.pump()
    assert all(sk in a1.clones for sk in sks)
    fab.rules[0].activity.clear()
    a1.peer_restarted(0, fab.t[0])
    msgs = _sent(fab, M.T_ACTIVITY)
    assert [len(r) for _, _, r in msgs] == [4, 4, 2] and all(t == 0 for _, t, _ in msgs)
    seqs = np.concatenate([r["seq"] for _, _, r in msgs])
    assert (np.diff(seqs.astype(np.int64)) == 1).all() and len(a1._unacked) == 3
    assert {skey(r) for _, _, r in msgs for r in r} == set(sks)
    fab.queue.rotate(-1)  # the first message ...
    fab.queue.pop()  # ... lost
    fab.pump()
    assert len(a1._unacked) == 1  # the other two acknowledged
    fab.advance(0.3)
    assert not a1._unacked and set(sks) <= set(fab.rules[0].activity)
    for sk in sks:
        fab.rules[0].expire(sk)
    a0.step_created(fab.t[0])
    assert [len(r) for _, _, r in _sent(fab, M.T_REVOKE)] == [4, 4, 2]
    fab.advance(0.2)
    assert not any(sk in a1.clones for sk in sks) and not a0._unacked and not a0.leases


def test_restart_report_gives_up_when_the_leases_would_have_run_out(fab):
    sk = fab.rules[0].build(I, 4101, R, 443)
    a1 = fab.agents[1]
    a1.fetch(IN, in_key(sk), 0, b"x", fab.t[0])
    fab.pump()
    fab.lose.add(M.T_ACTIVITY)
    a1.peer_restarted(0, fab.t[0])
    fab.advance(10.5, step=0.5)  # lease_s = 10
    assert not a1._unacked
