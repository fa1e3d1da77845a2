"""The paper's validation at 100%, on the emulated deployment (real processes).

The coordinator and N NIC workers run as processes; the switch hashes each direction
with SHA-1 independently, the Internet answers every packet.  For every configuration:
distinct internal endpoints get distinct external endpoints, every packet of every
connection, either direction, on any NIC, is translated by the same rule, checksums
verify at both ends, and a good share of connections really had their two directions on
different NICs (otherwise the test would prove nothing about cloning).
"""
import pytest

from hypernat.lab.emulated import ICMP, TCP, UDP, Emulation, emulated_config, make_conns, run_emulated

pytestmark = pytest.mark.timeout(120)


def _assert_consistent(rep, flows):
    assert rep["connections"] == flows
    assert rep["completed"] == flows, rep
    assert rep["inconsistent"] == 0 and rep["shared_external"] == 0, rep
    assert rep["stray"] == {}, rep["stray"]
    assert rep["consistent"], rep


@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("mapping", ["endpoint-independent", "address-and-port-dependent"])
@pytest.mark.parametrize("install", ["passive", "active"])
def test_two_direction_consistency(n, mapping, install):
    flows = 60
    rep = run_emulated(None, flows=flows, packets=4, n_nics=n, mapping=mapping, install=install,
                       protos=(TCP, UDP, ICMP), icmp_every=7, timeout=40)
    _assert_consistent(rep, flows)
    # cloning was exercised: about (n-1)/n of the connections return to another NIC
    assert rep["split"] >= flows * (n - 1) / n * 0.5, rep
    assert rep["clones_installed"] >= rep["split"] * 0.9, rep
    if mapping == "endpoint-independent":
        assert rep["eim_violations"] == 0
    if install == "active":
        assert rep["pushes"] > 0
    # ICMP errors about a flow, sent by a router near the remote, land on whatever NIC
    # the switch picks: every one came back translated to its internal host
    assert rep["icmp_errors"] > 0 and rep["icmp_errors_translated"] == rep["icmp_errors"]
    assert rep["drops"].get("bad_message", 0) == 0, rep["drops"]
    # No fetch may time out.  (The test once tolerated a few "on a loaded machine": that
    # hid the cause — first-touch page faults of the fresh flow tables and un-backed-off
    # retries piling onto the owner during the first burst, now fixed in the worker.)
    # A fetch gives up only after ~1.5 s without an answer here (100 ms doubling to
    # 400 ms, 4 retries); 60 flows that are answered within milliseconds when the box is
    # idle cannot legitimately take that long.
    assert rep["drops"].get("fetch_timeout", 0) == 0, rep["drops"]


def test_eim_same_internal_endpoint_same_external_endpoint():
    """Endpoint-independent mapping: one internal endpoint talking to many remotes keeps
    one external endpoint, whichever NIC sees each connection's first packet."""
    cfg = emulated_config(3, mapping="endpoint-independent")
    emu = Emulation(cfg)
    try:
        emu.start()
        conns = make_conns(cfg, 30, packets=2, protos=(UDP,), seed=3)
        for c in conns:  # one internal endpoint, 30 remotes
            c.iaddr, c.iport = conns[0].iaddr, 40000
        conns = [c for i, c in enumerate(conns) if (c.raddr, c.rport) not in
                 {(d.raddr, d.rport) for d in conns[:i]}]
        assert emu.run(conns, timeout=30)
        rep = emu.check()
    finally:
        emu.close()
    assert rep["consistent"], rep
    exts = {e for c in conns for e in c.ext}
    assert len(exts) == 1, exts
    assert len({c.out_nic for c in conns}) == 3  # the first packets landed on every NIC


def test_report_shape_for_demo():
    """What `hypernat demo` prints without root."""
    rep = run_emulated(None, flows=20, packets=3, n_nics=2)
    for key in ("connections", "split", "clones_installed", "fetches", "drops", "consistent", "nics", "mapping"):
        assert key in rep
    assert rep["consistent"]
