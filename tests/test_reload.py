"""SIGHUP: a NIC worker re-reads its config and applies what may change while it runs
(timeouts, per-host cap, sweep limits, translation log); anything else is refused with
a reason naming the setting, and the running config stays."""
import os
import signal

import pytest
import yaml

from hypernat import config as cfgmod
from hypernat.io.memory import MemoryPort
from hypernat.nic.worker import NicWorker

pytestmark = pytest.mark.timeout(60)

BASE = os.path.join(os.path.dirname(__file__), "..", "conf", "testbed.yaml")


def write(path, doc):
    path.write_text(yaml.safe_dump(doc))
    return str(path)


@pytest.fixture
def setup(tmp_path):
    doc = yaml.safe_load(open(BASE))
    doc["state_dir"] = str(tmp_path / "state")
    doc["metrics"] = {"enabled": False}
    path = write(tmp_path / "gw.yaml", doc)
    w = NicWorker(cfgmod.load(path), 0, MemoryPort("in0"), MemoryPort("out0"),
                  state_dir=str(tmp_path / "nic0"), standalone=True)
    yield w, doc, tmp_path
    w.close()


def test_live_settings_are_applied(setup):
    w, doc, tmp = setup
    doc["timeouts"]["udp"] = 600
    doc["limits"]["ports_per_host"] = 1024
    doc["translation_log"] = {"enabled": True, "path": str(tmp / "tl.jsonl")}
    ok, what = w.reload(write(tmp / "gw.yaml", doc))
    assert ok, what
    assert "timeouts.udp" in what and "limits.ports_per_host" in what
    assert w.rules.t_udp == 600 and w.config.timeouts.udp == 600
    assert w.rules._cap == 1024
    assert w.rules.translog is not None
    assert w.counters["reloads"] == 1 and w.counters["reloads_refused"] == 0


@pytest.mark.parametrize("change, setting", [
    (lambda d: d["external"].__setitem__("pool", ["198.18.78.0/28"]), "pool"),
    (lambda d: d.__setitem__("partition", "by-address"), "partition"),
    (lambda d: d["limits"].__setitem__("flow_table_capacity", 1024), "limits.flow_table_capacity"),
    (lambda d: d.__setitem__("mapping", "address-and-port-dependent"), "mapping"),
])
def test_structural_changes_are_refused(setup, change, setting):
    w, doc, tmp = setup
    before = w.config
    change(doc)
    doc["timeouts"]["udp"] = 600  # a live change in the same file is not applied either
    ok, reason = w.reload(write(tmp / "gw.yaml", doc))
    assert not ok
    assert setting in reason and "gw.yaml" in reason
    assert w.config is before and w.rules.t_udp == before.timeouts.udp
    assert w.counters["reloads_refused"] == 1 and w.counters["reloads"] == 0


def test_a_broken_file_is_refused_with_its_error(setup):
    w, doc, tmp = setup
    doc["timeouts"]["udp"] = 5  # below RFC 4787's 120 s without force
    ok, reason = w.reload(write(tmp / "gw.yaml", doc))
    assert not ok and "timeouts.udp" in reason
    (tmp / "gw.yaml").write_text("nics: [\n")
    ok, reason = w.reload()
    assert not ok and "gw.yaml" in reason
    assert w.counters["reloads_refused"] == 2


def test_sighup_reloads_at_the_next_turn(setup):
    w, doc, tmp = setup
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        w.install_signal_handlers()
        doc["timeouts"]["tcp_transitory"] = 300
        write(tmp / "gw.yaml", doc)
        os.kill(os.getpid(), signal.SIGHUP)
        w.run_once(1)
        assert w.rules.t_trans == 300 and w.counters["reloads"] == 1
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


def test_router_settings_are_applied_live(setup):
    """tcp_mss_clamp, the ICMP keys and the per-link MTUs reach the fast path at once;
    an MTU dropped from the file falls back to the interface's, read at start."""
    w, doc, tmp = setup
    w.set_links(inside_mtu=1500, outside_mtu=9000, inside_address=0x0A4D00FE)
    before = w.translator.router
    assert before["mss_clamp"] == 0 and before["outside_mtu"] == 9000
    doc["tcp_mss_clamp"] = 1300
    doc["icmp"] = {"rate_limit": 5, "inside_source": "10.77.0.253"}
    doc["nics"][0]["outside_mtu"] = 1280
    doc["nics"][1]["inside_mtu"] = 1400  # another NIC's link: live too (its worker applies it)
    ok, what = w.reload(write(tmp / "gw.yaml", doc))
    assert ok, what
    for key in ("tcp_mss_clamp", "icmp.rate_limit", "icmp.inside_source", "nics[0].outside_mtu",
                "nics[1].inside_mtu"):
        assert key in what
    r = w.translator.router
    assert (r["mss_clamp"], r["icmp_rate"], r["outside_mtu"], r["inside_mtu"]) == (1300, 5, 1280, 1500)
    assert r["inside_address"] == 0x0A4D00FD
    assert w.counters["reloads"] == 1 and w.counters["reloads_refused"] == 0
    del doc["nics"][0]["outside_mtu"]
    ok, what = w.reload(write(tmp / "gw.yaml", doc))
    assert ok and w.translator.router["outside_mtu"] == 9000  # the interface's again


def test_other_nic_keys_are_refused_by_name(setup, caplog):
    w, doc, tmp = setup
    before = w.translator.router
    doc["nics"][1]["outside"] = "elsewhere1"
    doc["nics"][0]["outside_mtu"] = 1280  # a live key in the same file is not applied either
    with caplog.at_level("ERROR"):
        ok, reason = w.reload(write(tmp / "gw.yaml", doc))
    assert not ok and "nics[1].outside" in reason and "outside_mtu" not in reason
    assert "nics[1].outside" in caplog.text and "restart" in caplog.text
    assert w.translator.router == before


def test_loop_slices_and_turn_budget_are_applied_live(setup):
    """``loop:`` (the slices of periodic work per turn, the turn budget) changes on a
    reload: the agent and the scheduler use the new values from the next turn."""
    w, doc, tmp = setup
    assert w.agent.p.retransmit_slice == 32 and w.timers.turn_budget_s == pytest.approx(200e-6)
    doc["loop"] = {"turn_budget_us": 0, "retransmit_slice": 4, "lease_end_slice": 3, "activity_slots": 128,
                   "activity_entries": 2}
    ok, what = w.reload(write(tmp / "gw.yaml", doc))
    assert ok, what
    for key in ("loop.turn_budget_us", "loop.retransmit_slice", "loop.lease_end_slice", "loop.activity_slots",
                "loop.activity_entries"):
        assert key in what
    p = w.agent.p
    assert (p.retransmit_slice, p.lease_end_slice, p.activity_slots, p.activity_entries) == (4, 3, 128, 2)
    assert w.timers.turn_budget_s is None  # 0: no bound
    assert w.config.loop.retransmit_slice == 4
    doc["loop"]["turn_budget_us"] = 500
    ok, what = w.reload(write(tmp / "gw.yaml", doc))
    assert ok and what == "loop.turn_budget_us"
    assert w.timers.turn_budget_s == pytest.approx(500e-6)
    doc["loop"]["activity_slots"] = 8  # below the least the config takes: refused, nothing applied
    doc["loop"]["retransmit_slice"] = 9
    ok, reason = w.reload(write(tmp / "gw.yaml", doc))
    assert not ok and "loop.activity_slots" in reason
    assert w.agent.p.retransmit_slice == 4 and w.counters["reloads_refused"] == 1


def test_the_agent_refuses_a_slice_it_does_not_have(setup):
    w, _, _ = setup
    with pytest.raises(ValueError, match="not a slice"):
        w.agent.set_slices(sweep_slice=3)
    with pytest.raises(ValueError, match="at least 1"):
        w.agent.set_slices(retransmit_slice=0)
    assert w.agent.p.retransmit_slice == 32
