"""Faults on the emulated deployment: the coordinator killed mid-traffic, NIC restarts
(graceful and crash), a port scan while connections run, a one-way flow that outlives
the owner's idle timeout.  Real processes, real signals."""
import os
import signal
import time

import pytest

from hypernat.lab.emulated import TCP, UDP, Emulation, emulated_config, make_conns
from hypernat.partition import Partition

pytestmark = pytest.mark.timeout(120)


def _final(emu, k):
    reps = emu.nic_reports.get(k) or []
    return reps[-1]["counters"] if reps else {}


def test_coordinator_killed_and_restarted_mid_traffic():
    cfg = emulated_config(2, mapping="endpoint-independent")
    emu = Emulation(cfg, rto=0.2, max_tries=30)
    try:
        emu.start()
        old = make_conns(cfg, 40, packets=2, protos=(TCP, UDP), seed=11)
        assert emu.run(old, timeout=30)
        emu.kill_coordinator(signal.SIGKILL)
        # established connections (rules and clones in place) keep flowing without it
        emu.resume(old, 3)
        assert emu.run(timeout=20), [c.cid for c in old if not c.done]
        # new connections while it is away: fetches are retried ...
        new = make_conns(cfg, 30, packets=3, protos=(TCP, UDP), seed=12, remote_net="198.51.100.0/24")
        emu.run(new, timeout=0.5)
        emu.start_coordinator()  # ... and answered once it is back (NICs HELLO again, resend)
        assert emu.run(timeout=30), [c.cid for c in new if not c.done]
        rep = emu.check()
    finally:
        emu.close()
    assert rep["consistent"], rep
    assert rep["split"] > 20


def test_nic_graceful_restart_keeps_every_rule():
    cfg = emulated_config(2, mapping="endpoint-independent")
    emu = Emulation(cfg, rto=0.2, max_tries=30)
    try:
        emu.start()
        conns = make_conns(cfg, 40, packets=2, protos=(TCP, UDP), seed=21)
        assert emu.run(conns, timeout=30)
        rep0 = emu.stop_nic(0, signal.SIGTERM)
        assert rep0 is not None and rep0["shutdown"]["rules"] > 0
        emu.start_nic(0)
        emu.wait_registered()
        emu.resume(conns, 3)  # the same connections go on: same rules, same endpoints
        assert emu.run(timeout=30), [c.cid for c in conns if not c.done]
        more = make_conns(cfg, 20, packets=2, protos=(UDP,), seed=22, remote_net="198.51.100.0/24")
        assert emu.run(more, timeout=30)
        rep = emu.check()
        emu.close()
        recovery = emu.nic_reports[0][-1]["recovery"]
    finally:
        emu.close()
    assert recovery["snapshot"] and recovery["rules"] > 0
    assert rep["consistent"], rep  # one external endpoint per connection across the restart
    assert rep["shared_external"] == 0


def test_nic_crash_restart_never_hands_an_endpoint_out_twice():
    cfg = emulated_config(2, mapping="endpoint-independent")
    part = Partition.from_config(cfg)
    emu = Emulation(cfg, rto=0.2, max_tries=30)
    try:
        emu.start()
        before = make_conns(cfg, 60, packets=2, protos=(UDP,), seed=31, hosts=12)
        assert emu.run(before, timeout=30)
        handed = {e: (c.iaddr, c.iport) for c in before for e in c.ext}
        emu.stop_nic(0, signal.SIGKILL)  # tables gone, journal on disk
        emu.start_nic(0)
        emu.wait_registered()
        # new connections from the same hosts: NIC 0 owns half of them (EIM) and must
        # allocate around the quarantined blocks
        after = make_conns(cfg, 60, packets=2, protos=(UDP,), seed=32, hosts=12, remote_net="198.51.100.0/24")
        assert emu.run(after, timeout=30)
        rep = emu.check()
        emu.close()
        recovery = emu.nic_reports[0][-1]["recovery"]
    finally:
        emu.close()
    assert recovery["quarantined_blocks"] > 0
    nic0_after = [c for c in after if part.eim_owner(c.iaddr) == 0]
    assert nic0_after
    for c in after:
        for e in c.ext:
            assert e not in handed or handed[e] == (c.iaddr, c.iport), (e, handed[e], c)
    assert rep["shared_external"] == 0 and rep["inconsistent"] == 0


@pytest.mark.parametrize("mapping", ["endpoint-independent", "address-and-port-dependent"])
def test_nic_crash_connections_with_a_clone_elsewhere_keep_their_endpoint(mapping):
    """Connections run through 2 NICs; NIC 0 is killed and restarted and the same
    connections go on at once.  Every connection owned by NIC 0 whose rule NIC 1 held a
    clone of is recovered from NIC 1's report with its external endpoint unchanged, even
    when its next outgoing packet reaches NIC 0 before the report does: that packet
    waits (recovery window) instead of getting a new mapping (recovery_lost_conflict).
    Connections with no clone anywhere (both directions on NIC 0) get a new endpoint,
    never one handed out before."""
    cfg = emulated_config(2, mapping=mapping)
    part = Partition.from_config(cfg)
    emu = Emulation(cfg, rto=0.2, max_tries=30)
    try:
        emu.start()
        conns = make_conns(cfg, 80, packets=2, protos=(UDP,), seed=31, hosts=12)
        assert emu.run(conns, timeout=30)
        first = {id(c): next(iter(c.ext)) for c in conns}
        owned0 = [c for c in conns if part.owner(*first[id(c)]) == 0]
        cloned = [c for c in owned0 if c.out_nic == 1 or 1 in c.in_nics]
        assert cloned and len(cloned) < len(owned0)  # both kinds present
        # NIC 1 is held (SIGSTOP) while NIC 0 restarts and the connections go on, so
        # their next packets reach NIC 0 before NIC 1's report can: the race the
        # recovery window is for, made certain (under load the report won every time)
        nic1 = emu.procs[1].pid
        os.kill(nic1, signal.SIGSTOP)
        try:
            emu.stop_nic(0, signal.SIGKILL)
            emu.start_nic(0)
            emu.resume(conns, 2)
            time.sleep(0.1)
        finally:
            os.kill(nic1, signal.SIGCONT)
        emu.wait_registered()
        assert emu.run(conns, timeout=30)
        rep = emu.check()
        emu.close()
    finally:
        emu.close()
    c0 = _final(emu, 0)
    assert c0["rules_recovery_lost_conflict"] == 0
    assert c0["rules_recovered_sessions"] >= len(cloned)
    assert c0["rules_recovery_held"] > 0  # some next packets did reach NIC 0 first
    changed = [c.cid for c in cloned if c.ext != {first[id(c)]}]
    assert not changed, changed
    assert rep["shared_external"] == 0


def test_port_scan_at_high_rate_while_connections_run():
    cfg = emulated_config(2, mapping="endpoint-independent", limits={"fetch_rate_per_source": 50})
    emu = Emulation(cfg, rto=0.2, max_tries=30)
    try:
        emu.start()
        conns = make_conns(cfg, 60, packets=4, protos=(TCP, UDP), seed=41)
        emu.inject_scan(0xCB007107, 6000)  # 203.0.113.7 sweeps the pool's ports
        assert emu.run(conns, timeout=40), [c.cid for c in conns if not c.done]
        emu.inject_scan(0xCB007107, 3000, seed=8)
        emu.run(timeout=1.0)
        rep = emu.check()
        emu.close()
    finally:
        emu.close()
    assert rep["consistent"], rep
    c0, c1 = _final(emu, 0), _final(emu, 1)
    limited = c0.get("agent_fetch_rate_limited", 0) + c1.get("agent_fetch_rate_limited", 0)
    fetches = c0.get("agent_fetches", 0) + c1.get("agent_fetches", 0)
    assert limited > 2000  # the scan did not become a FETCH storm ...
    assert fetches < 1000  # ... (9000 scan packets, ~half at a non-owner)
    nacked = c0.get("agent_fetch_nack", 0) + c1.get("agent_fetch_nack", 0)
    assert nacked > 0  # the scan probes that were fetched were refused by their owner


def test_one_way_flow_outlives_the_owners_idle_timeout():
    """A UDP stream whose packets arrive only at a clone holder: the holder's activity
    reports keep the owner's session (idle timeout 3 s) alive for 6 s and more."""
    cfg = emulated_config(2, mapping="endpoint-independent", timeouts={"udp": 3, "reuse_delay": 1},
                          limits={"lease_duration": 4})
    part = Partition.from_config(cfg)
    emu = Emulation(cfg, rto=0.2, max_tries=30)
    try:
        emu.start()
        conns = make_conns(cfg, 40, packets=1, protos=(UDP,), seed=51)
        assert emu.run(conns, timeout=30)
        stream = [c for c in conns
                  if emu.nic_for(UDP, c.raddr, c.rport, *next(iter(c.ext))) != part.eim_owner(c.iaddr)]
        assert stream
        c = stream[0]
        t_end = time.monotonic() + 6.0
        sent = 0
        while time.monotonic() < t_end:  # the remote streams; the client never answers
            emu.inject_incoming(c, 2)
            sent += 2
            emu.pump_for(0.25)
        emu.pump_for(0.5)
        got = emu.streamed[c.cid]
        emu.resume([c], 1)  # finally the client speaks again: same external endpoint
        assert emu.run(timeout=10)
        rep = emu.check()
        emu.close()
    finally:
        emu.close()
    assert got == sent, (got, sent)
    assert len(c.ext) == 1 and rep["consistent"], rep
    owner = part.eim_owner(c.iaddr)
    assert _final(emu, owner).get("agent_rx_activity", 0) >= 3  # the holder kept reporting
