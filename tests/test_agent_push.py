"""Active install's PUSH as a batch: the sessions one loop turn built for one holder go
out as ONE PUSH message under one seq, are acknowledged by one PUSH_ACK record, are
retried whole when the message (or its ack) is lost, and are installed once at the
holder however often they arrive.  The agents run over the in-memory fabric of
tests/test_agent.py (real FlowTables, the wire validator between them)."""
import numpy as np
import pytest

from hypernat import messages as M
from hypernat.agent import IN, predict_nic, session_key
from test_agent import E, I, PROTO, R, Fabric, in_key


def _build_for(fab, target, n, port0=5000):
    """n sessions at NIC 0 whose replies the switch (sha1) hashes to NIC `target`."""
    sks = []
    r = R
    rules = fab.rules[0]
    while len(sks) < n:
        r += 1
        if predict_nic("sha1", fab.n, PROTO, r, 443, E, rules.next_port) == target:
            sks.append(rules.build(I, port0 + len(sks), r, 443))
        else:
            rules.next_port += 1  # that endpoint would be pushed elsewhere: skip it
    return sks


def _sent(fab, mtype, src=None):
    return [(s, t, np.frombuffer(p, M.DTYPE_OF[mtype])) for s, t, m, p in fab.queue
            if m == mtype and (src is None or s == src)]


def test_sessions_of_one_turn_go_to_their_holder_in_one_push_message():
    """Fails on the per-record path (one PUSH message and one tracked seq per session)."""
    fab = Fabric(2, active_install=True)
    sks = _build_for(fab, 1, 40)
    fab.agents[0].step_created(fab.t[0])
    pushes = _sent(fab, M.T_PUSH)
    assert len(pushes) == 1  # one message, not 40
    (src, target, recs), = pushes
    assert (src, target, len(recs)) == (0, 1, 40)
    assert len(set(recs["seq"].tolist())) == 1  # under one seq: the message's
    assert len(fab.agents[0]._unacked) == 1 and fab.agents[0].counters["pushes"] == 40
    fab.pump()  # PUSH delivered, PUSH_ACK back
    a0, a1 = fab.agents
    assert a1.counters["push_installed"] == 40 and all(sk in a1.clones for sk in sks)
    assert all(fab.rules[1].in_t.get(*session_key(sk, IN)) is not None for sk in sks)
    assert a1.counters["tx_push_ack"] == 1  # one ack record for the message
    assert not a0._unacked and a0.counters["ack_stale"] == 0
    assert all(fab.rules[0].holds[(PROTO, E, sk[4])] == 1 for sk in sks)  # leases granted


def test_push_message_split_at_the_wire_limit(monkeypatch):
    monkeypatch.setattr(M, "MAX_RECORDS", 16)
    fab = Fabric(2, active_install=True)
    _build_for(fab, 1, 40)
    fab.agents[0].step_created(fab.t[0])
    sizes = [len(r) for _, _, r in _sent(fab, M.T_PUSH)]
    assert sizes == [16, 16, 8]
    assert len({int(r["seq"][0]) for _, _, r in _sent(fab, M.T_PUSH)}) == 3  # a seq each
    fab.pump()
    assert fab.agents[1].counters["push_installed"] == 40 and not fab.agents[0]._unacked


@pytest.mark.parametrize("lost", [M.T_PUSH, M.T_PUSH_ACK], ids=["push_lost", "ack_lost"])
def test_lost_push_is_retried_whole_and_installed_once(lost):
    """The message or its acknowledgement is lost: the owner sends the whole message
    again; the holder installs a repeat idempotently (the same clones, one entry each)."""
    fab = Fabric(2, active_install=True)
    sks = _build_for(fab, 1, 25)
    a0, a1 = fab.agents
    a0.step_created(fab.t[0])
    fab.lose.add(lost)
    fab.pump()
    assert fab.dropped[lost] == 1 and len(a0._unacked) == 1
    fab.lose.clear()
    fab.t[0] += 0.15  # past retry_s (0.1)
    a0.step_retransmit(fab.t[0])
    again = _sent(fab, M.T_PUSH)
    assert [len(r) for _, _, r in again] == [25] and a0.counters["retries"] == 1  # whole, once
    fab.pump()
    assert not a0._unacked
    assert len(a1.clones) == 25 and all(sk in a1.clones for sk in sks)
    assert a1.counters["push_installed"] == (25 if lost == M.T_PUSH else 50)  # a repeat: installed again ...
    assert len(list(fab.rules[1].in_t.occupied())) == 25  # ... onto the same entries
    assert a0.counters["ack_stale"] == 0


def test_push_given_up_after_its_deadline_falls_back_to_passive():
    fab = Fabric(2, active_install=True)
    sks = _build_for(fab, 1, 5)
    a0, a1 = fab.agents
    fab.lose.add(M.T_PUSH)
    fab.advance(2.0)  # fetch_timeout_s is the push's deadline
    assert not a0._unacked and a0.counters["retries"] >= 2 and not a1.clones
    fab.lose.clear()
    assert a1.fetch(IN, in_key(sks[0]), 0, b"reply", fab.t[0])  # the reply misses: fetched
    fab.pump()
    assert fab.replayed[1] == [(IN, [b"reply"])]


def test_push_of_foreign_endpoints_refused_by_record():
    """A PUSH message with records whose endpoint is not the sender's: those are counted
    and not installed, the others are; the message's one ack says refused."""
    fab = Fabric(2)
    a1 = fab.agents[1]
    recs = M.records(M.T_PUSH, 3)
    recs["seq"], recs["owner"], recs["proto"], recs["lease_ms"] = 77, 0, PROTO, 10000
    recs["int_addr"], recs["int_port"], recs["rem_addr"], recs["rem_port"] = I, [1, 2, 3], R, 443
    recs["ext_addr"], recs["ext_port"] = E, [1030, 65000, 1031]  # 65000: NIC 1's own
    sent = []
    a1._send = lambda t, m, r: sent.append((t, m, r.copy()))
    a1.on_message(0, M.T_PUSH, recs, fab.t[0])
    assert a1.counters["push_installed"] == 2 and a1.counters["bad_message"] == 1 and len(a1.clones) == 2
    (t, m, ack), = sent
    assert (t, m, ack["seq"].tolist(), ack["status"].tolist()) == (0, M.T_PUSH_ACK, [77], [M.ST_REFUSED])


def test_push_releases_every_waiting_fetch_in_one_replay():
    """Pushes that lost the race with their replies: the queued frames of all of them
    leave in one replay, each flow's frames in arrival order."""
    fab = Fabric(2)
    sks = _build_for(fab, 1, 3)
    a1 = fab.agents[1]
    for k, sk in enumerate(sks):
        a1.fetch(IN, in_key(sk), 0, b"r%d" % k, fab.t[0])
    fab.queue.clear()  # the FETCHes are in flight
    fab.agents[0].p.active_install = True
    fab.agents[0].step_created(fab.t[0])
    fab.pump()
    assert fab.replayed[1] == [(IN, [b"r0", b"r1", b"r2"])] and not a1.pending


def test_outbox_keeps_a_message_whole():
    """An array added whole (a PUSH message: one seq) never straddles two payloads;
    fails on the Outbox that cut the concatenation at MAX_RECORDS."""
    box = M.Outbox()
    a, b = M.records(M.T_PUSH, 3000), M.records(M.T_PUSH, 3000)
    a["seq"], b["seq"] = 1, 2
    box.add_many(b"nic1", M.T_PUSH, a)
    box.add_many(b"nic1", M.T_PUSH, b)
    box.add_many(b"nic1", M.T_PUSH, M.records(M.T_PUSH, M.MAX_RECORDS * 2 + 5))  # longer: cut
    sizes = [len(p) // M.DTYPE_OF[M.T_PUSH].itemsize for _, _, p in box.drain()]
    assert sizes == [3000, 3000, M.MAX_RECORDS, M.MAX_RECORDS, 5]
    for _ in range(300):
        box.add(b"nic1", M.T_FETCH, {"seq": 1, "proto": 6})  # records one by one: packed
    assert [len(p) // 32 for _, _, p in box.drain()] == [300]
