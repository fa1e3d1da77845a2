"""The fleet speaker's decisions without routers: what it refuses to announce, what it
does when the coordinator is gone, and that a speaker whose FRR does not start
announces nothing.  (Announcing for real, BFD and draining: tests/test_lab_fleet.py.)"""
import pytest

from hypernat.config import from_dict
from hypernat.fleet import frr, speaker
from tests.test_fleet_config import server


@pytest.fixture
def sp(tmp_path):
    cfg = from_dict(dict(server(1, "198.18.77.0/29"), state_dir=str(tmp_path)), "gw1.yaml")
    s = speaker.Speaker(cfg, endpoint=f"ipc://{tmp_path}/nobody.sock", frr_dir=str(tmp_path / "frr"))
    yield s
    s.shutdown()


def test_refuses_what_it_does_not_own(sp, caplog):
    assert sp.guard("internet", "198.18.77.0/29")
    assert sp.guard("vpc", "0.0.0.0/0")
    assert not sp.guard("internet", "198.18.77.8/29")  # the other server's
    assert not sp.guard("internet", "198.18.77.0/28")  # more than it owns
    assert not sp.guard("vpc", "10.0.0.0/8")  # not in announce.vpc
    assert sp.counters["refused_announcements"] == 3
    assert "refusing to announce 198.18.77.8/29" in caplog.text


def test_coordinator_gone_means_unhealthy_and_nothing_announced(sp):
    sp.step()
    assert sp.state == "unhealthy" and sp.announced == {}
    assert sp.health["ok"] is False and "coordinator" in sp.health["why"]
    assert sp.counters["coordinator_unreachable"] == 1 and sp.counters["health_failures"] == 1
    sp.step()
    assert sp.counters["health_failures"] == 1  # counted once per fall, not per check


def test_no_frr_no_announcement(tmp_path, monkeypatch, capsys):
    import yaml

    monkeypatch.setattr(frr, "FRR_BIN", str(tmp_path / "nowhere"))
    path = tmp_path / "gw1.yaml"
    path.write_text(yaml.safe_dump(dict(server(1, "198.18.77.0/29"), state_dir=str(tmp_path))))
    assert speaker.main(["--config", str(path), "--frr-dir", str(tmp_path / "frr")]) == 1
    import json

    st = json.loads((tmp_path / "fleet-speaker.json").read_text()) if (tmp_path / "fleet-speaker.json").exists() else {}
    assert not st.get("announced")


def test_not_a_fleet_member(tmp_path):
    t = server(1, "198.18.77.0/29")
    del t["fleet"]
    with pytest.raises(ValueError, match="no fleet: section"):
        speaker.Speaker(from_dict(t, "solo.yaml"))


class Scripted(speaker.Speaker):
    """The decisions alone: health from a script, announcements recorded (no FRR)."""

    def __init__(self, cfg, health):
        self.now = 0.0
        super().__init__(cfg, endpoint="ipc:///nonexistent", clock=lambda: self.now)
        self.script = health
        self.calls = []

    def read_health(self):
        return dict(self.script)

    def _network(self, prefix, how):
        self.calls.append((str(prefix), how))
        if how is None:
            self.announced.pop(str(prefix), None)
        else:
            self.announced[str(prefix)] = how

    def check_peers(self):
        pass


def test_drain_waits_for_fresh_reports_of_no_mapping(tmp_path):
    """A drain asked right after hosts arrived: the NICs' last report (older than the
    connections) says 0 mappings.  The speaker must not take that for "drained" (it
    did: the route was withdrawn at once and every connection there broke)."""
    cfg = from_dict(dict(server(1, "198.18.77.0/29"), state_dir=str(tmp_path)), "gw1.yaml")
    sp = Scripted(cfg, {"ok": True, "why": "", "draining": False, "mappings": 0})
    sp.step()
    assert sp.state == "serving" and sp.announced == {"0.0.0.0/0": "normal", "198.18.77.0/29": "normal"}
    sp.script.update(draining=True)  # the stale report: 0
    sp.now = 0.25
    sp.step()
    assert sp.state == "draining" and sp.announced["0.0.0.0/0"] == "gshut"
    sp.script.update(mappings=12)  # the fresh report
    for t in (1.0, 2.0, 5.0):
        sp.now = t
        sp.step()
        assert sp.state == "draining" and sp.announced["198.18.77.0/29"] == "normal"
    sp.script.update(mappings=0)  # they closed
    sp.now = 6.0
    sp.step()
    assert sp.state == "draining"
    sp.now = 6.0 + speaker.DRAIN_SETTLE_S
    sp.step()
    assert sp.state == "drained" and sp.announced == {}


def test_drain_timeout_ends_a_drain(tmp_path):
    t = server(1, "198.18.77.0/29", health={"drain_timeout": 10})
    sp = Scripted(from_dict(dict(t, state_dir=str(tmp_path)), "gw1.yaml"),
                  {"ok": True, "why": "", "draining": True, "mappings": 7})
    sp.step()
    assert sp.state == "draining"
    sp.now = 10.0
    sp.step()
    assert sp.state == "drained" and sp.announced == {}


def test_unhealthy_withdraws_the_default_and_keeps_the_pool(tmp_path):
    cfg = from_dict(dict(server(1, "198.18.77.0/29"), state_dir=str(tmp_path)), "gw1.yaml")
    sp = Scripted(cfg, {"ok": True, "why": "", "draining": False, "mappings": 3})
    sp.step()
    sp.script.update(ok=False, why="0 NIC(s) up, fewer than 1")
    sp.step()
    assert sp.state == "unhealthy" and sp.announced == {"198.18.77.0/29": "normal"}
    sp.script.update(ok=True, why="")
    sp.step()
    assert sp.state == "serving" and sp.announced["0.0.0.0/0"] == "normal"


def test_metrics_served(tmp_path):
    import socket
    import urllib.request

    cfg = from_dict(dict(server(1, "198.18.77.0/29"), state_dir=str(tmp_path)), "gw1.yaml")
    sp = Scripted(cfg, {"ok": True, "why": "", "draining": False, "mappings": 0})
    sp.step()
    assert not sp.guard("internet", "198.18.77.8/29")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    speaker._serve_metrics(sp, "127.0.0.1", port)
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert 'hypernat_fleet_events_total{event="refused_announcements"} 1.0' in text
    assert 'hypernat_fleet_announced{how="normal",prefix="0.0.0.0/0"} 1.0' in text
