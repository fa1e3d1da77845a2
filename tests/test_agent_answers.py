"""Every control record is checked against what this NIC asked, of whom.

A RULE or NACK completes a fetch only if it comes from the NIC the fetch was sent to,
about the key that was asked, under the fetch's seq; an acknowledgement completes only
the message of its type sent to its sender; a LEASE, REVOKE or ACTIVITY acts only on a
clone or lease the sender is party to; a loan answer only on a BORROW asked of the
sender.  Anything else is dropped and counted under its reason (``agent.DROP_REASONS``)
and changes nothing.  The agents are wired as in ``test_agent.py`` (in-memory
coordinator running ``messages.validate`` like a receiving NIC, settable clock).
"""
import types

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hypernat import layout
from hypernat import messages as M
from hypernat.agent import DROP_REASON_NAMES, DROP_REASONS, IN, AgentParams, RuleAgent, session_key
from hypernat.lab.emulated import emulated_config
from hypernat.nic.worker import NicWorker
from hypernat.partition import Partition
from hypernat.rules import SESSION_DTYPE

from fixtures.clones import rule_records, selected
from test_agent import E, I, PROTO, R, Fabric, in_key, owner_of

OWNS3 = owner_of(3)


def _valid(src, target, mtype, recs, n=3):
    """What a receiving NIC hands its agent: the record as validated on the wire (None: dropped there)."""
    d = M.validate(src, bytes([mtype]), recs.tobytes(), receiver=target, n_nics=n,
                   owns=lambda nic, a, p: np.array([OWNS3(int(x), int(y)) == nic for x, y in zip(a, p)]))
    return d.recs if d.ok else None


def _rule(sk, seq, owner, lease_ms=10000):
    rec = M.records(M.T_RULE, 1)
    p, i, ip, e, ep, r, rp = sk
    rec["seq"], rec["proto"], rec["int_addr"], rec["int_port"] = seq, p, i, ip
    rec["ext_addr"], rec["ext_port"], rec["rem_addr"], rec["rem_port"] = e, ep, r, rp
    rec["owner"], rec["lease_ms"], rec["rule_id"] = owner, lease_ms, 1
    return rec


def _nack(pend, seq=None, reason="no_rule"):
    """A NACK as the owner sends it: the FETCH record echoed, with a reason."""
    rec = M.records(M.T_NACK, 1)
    p, ra, rp, ea, ep = pend.key
    rec["seq"] = pend.seq if seq is None else seq
    rec["proto"], rec["kind"], rec["reason"] = p, M.FETCH_BY_EXTERNAL, M.NACK[reason]
    rec["ext_addr"], rec["ext_port"], rec["rem_addr"], rec["rem_port"] = ea, ep, ra, rp
    return rec


def test_drop_reasons_declared_once_and_exported_at_zero():
    assert len(set(DROP_REASON_NAMES)) == len(DROP_REASONS)
    fab = Fabric(2)
    assert all(fab.agents[0].counters[n] == 0 and n in fab.agents[0].counters for n in DROP_REASON_NAMES)
    # the names the NIC worker counts for messages dropped before the agent are declared too
    assert {"bad_message_" + n for n in M.REASON_NAMES} | {"bad_message_handler_error"} <= set(DROP_REASON_NAMES)


# ------------------------------------------------------------------ RULE (issue item 2)
@pytest.mark.parametrize("bad", ["other_key", "claims_other_owner", "third_nic"])
def test_invalid_rule_answer_leaves_the_fetch_for_the_real_owner(bad):
    """An answer that fails validation no longer takes the fetch's seq with it: the
    real owner's answer (same seq: retries reuse it) is delivered, not counted
    rule_duplicate, and the queued frames are replayed."""
    fab = Fabric(3)
    a1 = fab.agents[1]
    sk = fab.rules[0].build(I, 4100, R, 443)
    a1.fetch(IN, in_key(sk), 0, b"x", fab.t[0])
    pend = a1.pending[(IN, session_key(sk, IN))]
    if bad == "other_key":  # the owner, a valid rule of its own, but not the key asked
        rec = _rule((PROTO, I, 4100, E, sk[4], R, 444), pend.seq, 0)
        src, reason = 0, "rule_mismatched"
    elif bad == "claims_other_owner":  # the asked key, from a NIC that does not own it
        rec = _rule(sk, pend.seq, 2)
        src, reason = 2, "bad_message"
    else:  # a third NIC, a valid rule for its own endpoint, under the fetch's seq
        rec = _rule((PROTO, I, 4100, E, 60000, R, 443), pend.seq, 2)
        assert _valid(2, 1, M.T_RULE, rec) is not None
        src, reason = 2, "rule_misdirected"
    a1.on_message(src, M.T_RULE, rec, fab.t[0])
    assert a1.counters[reason] == 1 and a1.pending and not fab.replayed[1]
    fab.pump()  # the owner answers the FETCH
    assert fab.replayed[1] == [(IN, [b"x"])]
    assert a1.counters["rule_duplicate"] == 0 and not a1.pending and sk in a1.clones


def test_real_owner_answers_after_invalid_ones_over_retries():
    """The issue's reproduction: invalid answers before each of 5 retries; the owner's
    answers are lost until the last; the fetch still completes."""
    fab = Fabric(3, fetch_timeout_s=2.0)
    a1 = fab.agents[1]
    sk = fab.rules[0].build(I, 4101, R, 443)
    fab.lose.add(M.T_RULE)
    a1.fetch(IN, in_key(sk), 0, b"x", fab.t[0])
    for _ in range(5):
        pend = a1.pending[(IN, session_key(sk, IN))]
        a1.on_message(0, M.T_RULE, _rule((PROTO, I, 4101, E, sk[4], R, 1), pend.seq, 0), fab.t[0])
        fab.advance(0.2)
    fab.lose.clear()
    fab.advance(0.3)
    assert fab.replayed[1] == [(IN, [b"x"])] and a1.counters["rule_mismatched"] == 5
    assert a1.counters["fetch_timeout"] == 0


# ------------------------------------------------------------------ NACK (issue item 3)
def test_nack_flood_from_a_third_nic_cancels_nothing():
    """One message from NIC 2 carrying seqs 1..1024 (what a scan of the seq space looks
    like): no fetch of NIC 1 to NIC 0 is cancelled, no negative-cache entry planted,
    every reply is delivered."""
    fab = Fabric(3)
    a1 = fab.agents[1]
    sks = [fab.rules[0].build(I, 4200 + k, R, 443) for k in range(6)]
    for k, sk in enumerate(sks):
        a1.fetch(IN, in_key(sk), 0, b"r%d" % k, fab.t[0])
    flood = M.records(M.T_NACK, 1024)
    flood["seq"] = np.arange(1, 1025)
    flood["proto"], flood["kind"], flood["reason"] = PROTO, M.FETCH_BY_EXTERNAL, M.NACK["no_rule"]
    flood["ext_addr"], flood["ext_port"], flood["rem_addr"], flood["rem_port"] = E, 1200, R, 443
    assert _valid(2, 1, M.T_NACK, flood) is not None  # well formed: only the agent can tell
    # ... and the same with the very keys asked (only the sender is wrong)
    asked = np.concatenate([_nack(p) for p in a1.pending.values()])
    fab.queue.appendleft((2, 1, M.T_NACK, asked.tobytes()))
    fab.queue.appendleft((2, 1, M.T_NACK, flood.tobytes()))
    fab.pump()
    assert sorted(f for _, fr in fab.replayed[1] for f in fr) == sorted(b"r%d" % k for k in range(6))
    assert not a1.negative and a1.counters["fetch_nack"] == 0
    c = a1.counters
    assert c["nack_misdirected"] == 6 + 6 and c["nack_stale"] == 1024 - 6


def test_nack_from_the_owner_about_another_key_cancels_nothing():
    fab = Fabric(2)
    a1 = fab.agents[1]
    sk = fab.rules[0].build(I, 4300, R, 443)
    a1.fetch(IN, in_key(sk), 0, b"x", fab.t[0])
    pend = a1.pending[(IN, session_key(sk, IN))]
    rec = _nack(pend)
    rec["rem_port"] = 444
    a1.on_message(0, M.T_NACK, rec, fab.t[0])
    assert a1.counters["nack_mismatched"] == 1 and a1.pending and not a1.negative
    a1.on_message(0, M.T_NACK, _nack(pend), fab.t[0])  # the real refusal still works
    assert not a1.pending and a1.counters["fetch_nack"] == 1 and a1.negative


# -------------------------------------------------------------- acks, leases, activity
def _cloned(fab, port):
    sk = fab.rules[0].build(I, port, R, 443)
    fab.agents[1].fetch(IN, in_key(sk), 0, b"x", fab.t[0])
    fab.pump()
    assert sk in fab.agents[1].clones
    return sk


def test_an_ack_of_another_type_does_not_complete_a_revoke():
    """A PUSH_ACK under a REVOKE's seq used to end the lease, freeing the endpoint while
    the holder still translates with its clone."""
    fab = Fabric(3)
    sk = _cloned(fab, 4400)
    fab.lose.add(M.T_REVOKE)
    fab.rules[0].expire(sk)
    fab.agents[0].tick(fab.t[0])
    fab.pump()
    (seq, u), = fab.agents[0]._unacked.items()
    assert u.mtype == M.T_REVOKE and fab.rules[0].holds[(PROTO, E, sk[4])] == 1
    ack = M.records(M.T_PUSH_ACK, 1)
    ack["seq"] = seq
    fab.agents[0].on_message(1, M.T_PUSH_ACK, ack, fab.t[0])
    fab.agents[0].on_message(2, M.T_REVOKE_ACK, ack, fab.t[0])  # the right type, from a third NIC
    assert fab.rules[0].holds[(PROTO, E, sk[4])] == 1 and seq in fab.agents[0]._unacked
    c = fab.agents[0].counters
    assert c["ack_mismatched"] == 1 and c["ack_misdirected"] == 1
    fab.agents[0].on_message(1, M.T_REVOKE_ACK, ack, fab.t[0])
    assert fab.rules[0].holds[(PROTO, E, sk[4])] == 0 and not fab.agents[0]._unacked


def test_activity_from_a_nic_without_lease_is_acknowledged_not_merged():
    fab = Fabric(3)
    sk = _cloned(fab, 4500)
    rec = M.records(M.T_ACTIVITY, 1)
    p, i, ip, e, ep, r, rp = sk
    rec["seq"], rec["proto"], rec["int_addr"], rec["int_port"] = 7, p, i, ip
    rec["ext_addr"], rec["ext_port"], rec["rem_addr"], rec["rem_port"] = e, ep, r, rp
    assert _valid(2, 0, M.T_ACTIVITY, rec) is not None
    leases = {k: dict(v) for k, v in fab.agents[0].leases.items()}
    fab.agents[0].on_message(2, M.T_ACTIVITY, rec, fab.t[0])
    assert fab.rules[0].activity == [] and fab.agents[0].counters["activity_unknown"] == 1
    assert {k: dict(v) for k, v in fab.agents[0].leases.items()} == leases
    sent = [(s, t, m) for s, t, m, _ in fab.queue]
    assert sent == [(0, 2, M.T_ACTIVITY_ACK)]  # acknowledged, no LEASE
    fab.pump()
    fab.agents[0].on_message(1, M.T_ACTIVITY, rec, fab.t[0])  # the holder's report is merged
    assert fab.rules[0].activity == [sk]


def test_lease_and_revoke_from_a_nic_that_does_not_own_the_clone():
    fab = Fabric(3)
    sk = _cloned(fab, 4600)
    a1 = fab.agents[1]
    before = a1.clones[sk].expires
    rec = _rule(sk, 0, 2, lease_ms=3_600_000)
    a1.on_message(2, M.T_LEASE, rec, fab.t[0] + 1)
    rk = M.records(M.T_REVOKE, 1)
    p, i, ip, e, ep, r, rp = sk
    rk["seq"], rk["proto"], rk["kind"] = 9, p, M.FETCH_BY_EXTERNAL
    rk["int_addr"], rk["int_port"], rk["ext_addr"], rk["ext_port"], rk["rem_addr"], rk["rem_port"] = i, ip, e, ep, r, rp
    a1.on_message(2, M.T_REVOKE, rk, fab.t[0])
    assert sk in a1.clones and a1.clones[sk].expires == before
    assert a1.counters["lease_misdirected"] == 1 and a1.counters["revoke_misdirected"] == 1


# ---------------------------------------------------------------------- borrow / return
class _Blocks:
    """The builder's block interface, as far as lending goes."""

    def __init__(self):
        self.adopted, self.lent = [], []

    def lend_block(self):
        return None

    def adopt_block(self, g):
        self.adopted.append(g)

    def return_block(self, g):
        return True


def _lenders(tmp_path):
    cfg = emulated_config(3, state_dir=str(tmp_path))
    sent = []
    parts = [Partition.from_config(cfg) for _ in range(3)]
    rules = [_Blocks() for _ in range(3)]
    ags = [RuleAgent(k, 3, rules[k], lambda t, m, r, k=k: sent.append((k, t, m, r.copy())),
                     lambda a, q: None, lambda d, f: None, AgentParams(), clock=lambda: 0.0, partition=parts[k])
           for k in range(3)]
    return ags, parts, rules, sent


def test_borrow_answers_only_from_the_lender_asked(tmp_path):
    ags, parts, rules, sent = _lenders(tmp_path)
    a0 = ags[0]
    assert a0.want_block(0.0)
    (_, lender, mt, req), = sent
    assert mt == M.T_BORROW and lender == 1
    seq = int(req["seq"][0])
    # a refusal from NIC 2, which was not asked: the BORROW stays in flight, no pause
    ref = req.copy()
    ref["lender"], ref["borrower"], ref["status"] = 2, 0, M.ST_REFUSED
    a0.on_message(2, M.T_BORROW_ACK, ref, 0.0)
    assert a0._borrowing == seq and a0._borrow_refused == 0 and a0.counters["borrow_ack_misdirected"] == 1
    # a grant from NIC 2 of its own block, to a BORROW never asked of it: not adopted
    g2 = parts[0].nic_block_range(2)[0]
    addr, lo, hi = parts[0].block_span(g2)
    grant = ref.copy()
    grant["status"], grant["addr"], grant["port_lo"], grant["port_hi"] = M.ST_OK, addr, lo, hi
    a0.on_message(2, M.T_BORROW_ACK, grant, 0.0)
    assert not a0.borrowed and parts[0].owner_of_block(g2) == 2 and not rules[0].adopted
    # a BORROW naming NIC 1 as lender, delivered to NIC 2: not answered
    sent.clear()
    ags[2].on_message(0, M.T_BORROW, req, 0.0)
    assert sent == [] and ags[2].counters["borrow_misdirected"] == 1
    # the lender's answer still counts
    ref["lender"] = 1
    a0.on_message(1, M.T_BORROW_ACK, ref, 0.0)
    assert a0._borrowing is None and a0._borrow_refused == 1


def test_return_of_a_block_lent_to_another_nic_is_refused(tmp_path):
    ags, parts, rules, sent = _lenders(tmp_path)
    g = parts[0].nic_block_range(0)[0]
    for p in parts:
        p.lend(g, 1)  # NIC 0 lent g to NIC 1
    addr, lo, hi = parts[0].block_span(g)
    rec = M.records(M.T_RETURN, 1)
    rec["seq"], rec["addr"], rec["port_lo"], rec["port_hi"], rec["lender"], rec["borrower"] = 5, addr, lo, hi, 0, 2
    ags[0].on_message(2, M.T_RETURN, rec, 0.0)  # NIC 2 gives back what NIC 1 borrowed
    assert parts[0].owner_of_block(g) == 1 and not rules[0].adopted
    assert ags[0].counters["return_refused"] == 1
    assert sent[-1][2] == M.T_RETURN_ACK and int(sent[-1][3]["status"][0]) == M.ST_REFUSED


# ------------------------------------------------ property: misdirected records change nothing
def _state(fab):
    out = []
    for a, rb in zip(fab.agents, fab.rules):
        out.append((
            sorted((pk, p.seq, p.owner, tuple(p.frames)) for pk, p in a.pending.items()),
            dict(a._by_seq), a.queued_total,
            {sk: (c.owner, c.rule_id, c.dirs, c.expires) for sk, c in a.clones.items()},
            dict(a.negative), {sk: dict(h) for sk, h in a.leases.items()},
            {s: (u.target, u.mtype) for s, u in a._unacked.items()},
            list(rb.activity), dict(rb.holds), sorted(rb.sessions),
        ))
    return out, {k: list(v) for k, v in fab.replayed.items()}


_TYPES = (M.T_RULE, M.T_NACK, M.T_LEASE, M.T_REVOKE, M.T_PUSH_ACK, M.T_REVOKE_ACK, M.T_ACTIVITY_ACK,
          M.T_RETURN_ACK, M.T_ACTIVITY)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_records_from_a_third_nic_never_change_state(data):
    """NIC 1 holds clones of NIC 0's sessions, has fetches in flight to NIC 0, NIC 0 has
    a REVOKE in flight: random records from NIC 2 to either, built from what is in
    flight (its seqs, keys, sessions) and random values, pass or fail validation as on
    the wire; none may change any state (only counters and acknowledgements)."""
    fab = Fabric(3)
    held = [_cloned(fab, 4700 + k) for k in range(3)]
    fab.lose.add(M.T_REVOKE)
    fab.rules[0].expire(held[0])
    fab.agents[0].tick(fab.t[0])
    fab.pump()
    waiting = [fab.rules[0].build(I, 4800 + k, R, 443) for k in range(3)]
    for sk in waiting:
        fab.agents[1].fetch(IN, in_key(sk), 0, b"w", fab.t[0])
    fab.queue.clear()  # the FETCHes stay in flight
    seqs = [p.seq for p in fab.agents[1].pending.values()] + list(fab.agents[0]._unacked) + [0, 1, 2, 3]
    sks = held + waiting + [(PROTO, I, 4999, E, 60001, R, 443)]  # ... and one of NIC 2's endpoints
    before = _state(fab)
    for _ in range(data.draw(st.integers(1, 6))):
        mtype = data.draw(st.sampled_from(_TYPES))
        target = data.draw(st.sampled_from((0, 1)))
        n = data.draw(st.integers(1, 4))
        recs = M.records(mtype, n)
        names = recs.dtype.names
        for x in range(n):
            recs["seq"][x] = data.draw(st.sampled_from(seqs) | st.integers(0, 2**32 - 1))
            if "proto" in names:
                p, i, ip, e, ep, r, rp = data.draw(st.sampled_from(sks))
                if data.draw(st.booleans()):
                    rp = data.draw(st.integers(0, 65535))
                recs["proto"][x] = data.draw(st.sampled_from((p, p, 17, 1, 0)))
                recs["int_addr"][x], recs["int_port"][x], recs["ext_addr"][x] = i, ip, e
                recs["ext_port"][x], recs["rem_addr"][x], recs["rem_port"][x] = ep, r, rp
            if "owner" in names:
                recs["owner"][x] = data.draw(st.sampled_from((2, 2, 0, 1)))
            if "kind" in names:
                recs["kind"][x] = data.draw(st.sampled_from((M.FETCH_BY_EXTERNAL, M.FETCH_BY_INTERNAL)))
            if "lease_ms" in names:
                recs["lease_ms"][x] = data.draw(st.integers(0, 2**32 - 1))
            if "status" in names:
                recs["status"][x] = data.draw(st.integers(0, 2))
        ok = _valid(2, target, mtype, recs)
        if ok is not None:
            fab.agents[target].on_message(2, mtype, ok, fab.t[0])
    after = _state(fab)
    assert after == before


def test_a_restarted_agent_does_not_take_its_previous_incarnations_acks():
    """Seqs start at a random number in a daemon (seq_start=None): the REVOKE_ACK of the
    previous incarnation's REVOKE (seq 1) does not complete the new incarnation's."""
    fab = Fabric(2)
    sk = _cloned(fab, 4650)
    fab.lose.add(M.T_REVOKE)
    old = fab.agents[0]
    new = RuleAgent(0, 2, fab.rules[0], fab._sender(0), owner_of(2), fab._replayer(0),
                    AgentParams(**{k: getattr(old.p, k) for k in ("lease_s", "retry_s", "fetch_timeout_s")}),
                    clock=lambda: fab.t[0], seq_start=None)
    assert new._seq != RuleAgent(0, 2, fab.rules[0], None, None, None, seq_start=None)._seq
    new._grant_many([sk], 1, fab.t[0])  # what the snapshot carried
    fab.rules[0].expire(sk)
    new.tick(fab.t[0])
    (seq, u), = new._unacked.items()
    assert u.mtype == M.T_REVOKE
    stale = M.records(M.T_REVOKE_ACK, 1)
    stale["seq"] = 1
    if seq != 1:
        new.on_message(1, M.T_REVOKE_ACK, stale, fab.t[0])
        assert new._unacked and new.counters["ack_stale"] == 1


# ------------------------------------------------------- indexes kept with the clones and leases
class _Tables:
    """The builder surface for installs and holds: everything succeeds, holds counted."""

    def __init__(self):
        self.holds = {}

    def install_clones(self, recs, now, dirs=3, lease_until=0, idx=None, owners=None):
        return np.ones(selected(recs, idx), np.int8)

    def remove_clone(self, recs):
        return 1

    def hold_many(self, ekeys):
        for k in ekeys.tolist():  # proto << 48 | eaddr << 16 | eport
            ep = (k >> 48, (k >> 16) & 0xFFFFFFFF, k & 0xFFFF)
            self.holds[ep] = self.holds.get(ep, 0) + 1

    def release_hold(self, p, e, ep):
        assert self.holds[(p, e, ep)] > 0
        self.holds[(p, e, ep)] -= 1

    def release_many(self, ekeys):
        for k in np.asarray(ekeys).tolist():
            self.release_hold(k >> 48, (k >> 16) & 0xFFFFFFFF, k & 0xFFFF)

    def drain_created(self):
        return np.zeros(0, SESSION_DTYPE)

    drain_removed = drain_created

    def collect_activity(self, clear=True):
        return np.zeros(0, SESSION_DTYPE)


# TCP sessions, and ICMP ones whose remote identifier (7) is not in their table entries
# (an entry reports rport 0): those are found through the index by endpoint
_SKS = [(p, I, 4000 + i, E, 1100 + e, R + r, rp) for p, rps in ((PROTO, (0, 7)), (1, (7,))) for i in range(2)
        for e in range(2) for r in range(2) for rp in rps]


def _brute(ag):
    of = {}
    for sk, c in ag.clones.items():
        of.setdefault(c.owner, set()).add(sk)
    assert {o: {sk for sk, _ in ag.clones.of_owner(o)} for o in ag.clones.owners()} == of
    eps = {(sk[0], sk[3], sk[4]) for sk in list(ag.clones) + list(ag.leases)}
    for p, e, ep in eps | {(PROTO, E, 999)}:
        leases, clones = ag.endpoint(p, e, ep)
        assert sorted(leases) == sorted((sk, dict(h)) for sk, h in ag.leases.items() if (sk[0], sk[3], sk[4]) == (p, e, ep))
        assert sorted(clones) == sorted((sk, c.owner, c.rule_id, c.dirs, c.expires) for sk, c in ag.clones.items()
                                        if (sk[0], sk[3], sk[4]) == (p, e, ep))
    assert sum(len(ag.clones.at(*k)) for k in {(sk[0], sk[3], sk[4]) for sk in ag.clones.keys()}) == len(ag.clones)
    assert sum(len(ag.leases.at(*k)) for k in {(sk[0], sk[3], sk[4]) for sk in ag.leases.keys()}) == len(ag.leases)
    assert ag.state()["leases"] == sum(len(h) for h in ag.leases.values())
    queued = set(ag.clones.timers())
    for sk, c in ag.clones.items():  # every clone has its timer, never later than its end
        assert (c.due, sk) in queued and c.due <= c.expires - ag.p.lease_margin_s
    timers = ag.leases.timers()  # every lease has its timer, never later than its end
    for sk, hs in ag.leases.items():
        for h, until in hs.items():
            assert min(t for t, s2, h2 in timers if (s2, h2) == (sk, h)) <= until


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_indexes_and_timers_follow_clones_and_leases(data):
    t = [10.0]
    rules = _Tables()
    ag = RuleAgent(0, 3, rules, lambda tg, m, r: None, owner_of(3), lambda d, f: None,
                   AgentParams(lease_s=5.0, lease_margin_s=0.5), clock=lambda: t[0], tick_clock=lambda: int(t[0]))
    for _ in range(data.draw(st.integers(1, 40))):
        op = data.draw(st.sampled_from(("install", "drop", "grant", "end", "renew", "tick", "report")))
        sk = data.draw(st.sampled_from(_SKS))
        if op == "install":
            o = data.draw(st.sampled_from((1, 2)))
            ag._install_many(o, rule_records([sk], 5, data.draw(st.sampled_from((1000, 5000, 9000))), o), None,
                             data.draw(st.sampled_from((1, 2, 3))), t[0])
        elif op == "drop":
            ag._drop_clone(sk, "clone_revoked")
        elif op == "grant":
            ag._grant_many([sk], data.draw(st.sampled_from((1, 2))), t[0])
        elif op == "end":
            ag._end_leases(rule_records([sk]), data.draw(st.sampled_from((1, 2))))
        elif op == "renew" and sk in ag.clones:
            ag.on_message(ag.clones[sk].owner, M.T_LEASE, _rule(sk, 0, ag.clones[sk].owner, 4000), t[0])
        elif op == "tick":
            t[0] += data.draw(st.sampled_from((0.1, 1.0, 3.0, 7.0)))
            ag.tick(t[0])
            margin = ag.p.lease_margin_s
            assert all(c.expires - margin > t[0] for c in ag.clones.values())
            assert all(u > t[0] for hs in ag.leases.values() for u in hs.values())
        elif op == "report" and ag.clones:
            # table entries of held clones (an ICMP entry carries rport 0, as collect_activity's)
            held = data.draw(st.lists(st.sampled_from(sorted(ag.clones)), min_size=1, max_size=4, unique=True))
            act = np.zeros(len(held), SESSION_DTYPE)
            for j, (p, i, ip, e, ep, r, rp) in enumerate(held):
                d = 1 if ag.clones[(p, i, ip, e, ep, r, rp)].dirs & 1 else 2
                act[j] = (i, e, r, ip, ep, 0 if p == 1 else rp, p, d, 5, int(t[0]), 0, 0, 0, 0)
            assert ag.report_activity(t[0], act) == len(held)  # every entry found its clone
        _brute(ag)
    assert all(v >= 0 for v in rules.holds.values())


def test_no_loop_turn_and_no_query_walks_the_clones_or_leases():
    """Activity reports, the owner's renewals, revocation, lease ends on both sides, a
    restart report and ctl rule queries: neither the clone table nor the lease table is
    walked whole (each counts its walks; main walked them in report_activity, tick,
    state, _rule_info)."""
    fab = Fabric(3)
    walks = [(a.clones.walks, a.leases.walks) for a in fab.agents]  # the tables count their whole walks
    sks = [_cloned(fab, 4900 + k) for k in range(4)]
    t = fab.rules[1].in_t
    for step in range(15):  # traffic at the holder on two clones: reports, renewals
        for s in sks[:2]:
            t.slots[t.lookup(*session_key(s, IN))]["flags"] |= layout.F_ACTIVE
        if step == 2:
            fab.rules[0].expire(sks[2])  # a revoke
        fab.advance(1.0)
    a0, a1 = fab.agents[0], fab.agents[1]
    assert [(a.clones.walks, a.leases.walks) for a in fab.agents] == walks
    assert {sk for sk, _ in a1.clones.of_owner(0)} == set(sks[:2])  # the idle clone ran out, the revoked one went
    assert a0.state()["leases"] == 2 and fab.rules[0].holds[(PROTO, E, sks[3][4])] == 0
    a1.peer_restarted(0, fab.t[0])  # a restart report: that owner's clones only
    assert fab.queue[-1][2] == M.T_ACTIVITY and len(np.frombuffer(fab.queue[-1][3], M.ACTIVITY_DTYPE)) == 2
    w = types.SimpleNamespace(agent=a1, rules=types.SimpleNamespace(lookup_external=lambda *x: None),
                              clock=lambda: fab.t[0])
    (c,) = NicWorker._rule_info(w, E, sks[0][4], PROTO)
    assert c["role"] == "clone" and c["owner"] == "nic0" and c["internal"] == "10.0.0.5:4900"
    assert NicWorker._rule_info(w, E, sks[3][4]) == []
    assert a0.endpoint(PROTO, E, sks[1][4])[0] == [(sks[1], {1: a0.leases[sks[1]][1]})]


def test_one_activity_report_for_two_owners_merges_both_directions_of_a_session():
    """One report over clones of two owners: one ACTIVITY message per owner, both
    directions of a session in one record (the latest activity, the TCP flags per
    direction), an ICMP entry (rport 0) counted for its clone, an entry of no clone left
    out; the owners' LEASE answers renew exactly the clones reported.  (Holds on main as
    well: the report moved to ``CloneTable.activity`` with the same answers.)"""
    sent = []
    ag = RuleAgent(0, 3, _Tables(), lambda tg, m, r: sent.append((tg, m, r.copy())), owner_of(3),
                   lambda d, f: None, AgentParams(lease_s=5.0), clock=lambda: 10.0, tick_clock=lambda: 100)
    a, b, c = (PROTO, I, 4000, E, 1100, R, 80), (PROTO, I, 4001, E, 1101, R, 80), (1, I, 4002, E, 1102, R, 7)
    ag._install_many(1, rule_records([a, c], 5, 5000, 1), None, 3, 10.0)
    ag._install_many(2, rule_records([b], 6, 5000, 2), None, 3, 10.0)
    act = np.zeros(5, SESSION_DTYPE)
    act[0] = (I, E, R, 4000, 1100, 80, PROTO, 1, 5, 97, layout.TCP_SYN, 0, 0, 0)  # a going out
    act[1] = (I, E, R, 4001, 1101, 80, PROTO, 2, 6, 99, 0, 0, 0, 0)  # b coming in
    act[2] = (I, E, R, 4000, 1100, 80, PROTO, 2, 5, 98, 0, layout.TCP_FIN, 0, 0)  # a coming in
    act[3] = (I, E, R, 4002, 1102, 0, 1, 1, 5, 90, 0, 0, 0, 0)  # c's entry: no remote identifier
    act[4] = (I, E, R, 4009, 1109, 80, PROTO, 1, 9, 99, 0, 0, 0, 0)  # no clone
    assert ag.report_activity(10.0, act) == 3
    msgs = {tg: r for tg, m, r in sent if m == M.T_ACTIVITY}
    assert sorted(msgs) == [1, 2] and len(msgs[1]) == 2 and len(msgs[2]) == 1
    by_port = {int(r["int_port"]): r for r in msgs[1]}
    ra, rc = by_port[4000], by_port[4002]
    assert (int(ra["tcp_out"]), int(ra["tcp_in"]), int(ra["idle_ms"])) == (layout.TCP_SYN, layout.TCP_FIN, 2000)
    assert int(ra["tcp_flags"]) == layout.TCP_SYN | layout.TCP_FIN
    assert int(rc["rem_port"]) == 7 and int(rc["idle_ms"]) == 10000  # the clone's identity
    assert int(msgs[2][0]["int_port"]) == 4001 and int(msgs[2][0]["idle_ms"]) == 1000
    seqs = [int(s) for r in msgs.values() for s in r["seq"]]
    assert len(set(seqs)) == 3 and 0 not in seqs
    for owner, r in msgs.items():  # each owner renews what it was told of
        lease = M.records(M.T_LEASE, len(r))
        for f in ("proto", "int_addr", "int_port", "ext_addr", "ext_port", "rem_addr", "rem_port", "rule_id"):
            lease[f] = r[f]
        lease["owner"], lease["lease_ms"] = owner, 9000
        ag.on_message(owner, M.T_LEASE, lease, 11.0)
    assert ag.counters["leases_renewed"] == 3 and ag.counters["lease_unknown"] == 0
    assert all(ag.clones[sk].expires == 20.0 for sk in (a, b, c))
    ag.on_message(2, M.T_LEASE, lease_of := rule_records([a], 5, 9000, 2), 12.0)  # a is owner 1's
    assert ag.counters["lease_misdirected"] == 1 and ag.clones[a].expires == 20.0 and len(lease_of) == 1
