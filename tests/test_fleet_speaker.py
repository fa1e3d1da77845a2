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
