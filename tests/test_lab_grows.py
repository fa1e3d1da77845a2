"""The one-server testbed grows with --nics (issue 14, item 5): the daemons' config is
derived from the topology, `hypernat ctl --tag T` reaches the run's coordinator, and
`hypernat lab down` leaves none of the run's logs or state behind.

On main before this change `hypernat lab up --nics 3` waited 15 s and failed ("NIC 2 is
not in conf/testbed.yaml"), `ctl` had no --tag, and `down` left the logs."""
import json
import os

import pytest

from hypernat.config import load
from hypernat.lab import cli as lab_cli
from hypernat.lab.fleet import derived_config
from hypernat.lab.topology import STATE_DIR, Topology

CONF = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf", "testbed.yaml")


def test_derived_config_names_every_nic(tmp_path):
    path = derived_config(CONF, 3, str(tmp_path))
    cfg = load(path)
    assert [(n.id, n.inside, n.outside) for n in cfg.nics] == [(k, f"inside{k}", f"outside{k}") for k in range(3)]
    assert cfg.pool == load(CONF).pool and path.startswith(str(tmp_path))
    assert derived_config(CONF, 2, str(tmp_path)) == CONF  # the template fits: used as it is


def test_lab_backend_overrides_the_configs_io(tmp_path):
    """`hypernat lab up --backend af_xdp` runs HyperNAT's daemons on AF_XDP (it used to
    start PACKET_MMAP workers from the config and say nothing)."""
    assert load(CONF).nics[0].io == "packet_mmap"
    assert derived_config(CONF, 2, str(tmp_path), io="packet_mmap") == CONF  # nothing to change
    for nics in (2, 3):
        path = derived_config(CONF, nics, str(tmp_path / str(nics)), io="af_xdp")
        cfg = load(path)
        assert path != CONF and [n.io for n in cfg.nics] == ["af_xdp"] * nics


def test_run_logs_are_this_runs_only(tmp_path, monkeypatch):
    import hypernat.lab.topology as topology

    monkeypatch.setattr(topology, "STATE_DIR", str(tmp_path))
    for name in ("lab-coord.log", "lab-nic-0.log", "lab-noop-inside1.log", "lab-x-coord.log", "lab-x-nic-1.log",
                 "lab.json", "lab2-coord.log"):
        (tmp_path / name).write_text("")
    got = sorted(os.path.basename(p) for p in Topology(tag="lab").run_logs())
    assert got == ["lab-coord.log", "lab-nic-0.log", "lab-noop-inside1.log"]


@pytest.mark.netns
def test_three_nics_ctl_by_tag_and_down_cleans(capsys):
    from hypernat.coord import ctl

    tag = f"fleetgrow{os.getpid()}"
    try:
        assert lab_cli.main(["up", "--tag", tag, "--nics", "3"]) == 0
        capsys.readouterr()
        assert ctl.main(["--tag", tag, "--json", "nics"]) == 0
        rows = json.loads(capsys.readouterr().out)
        assert [r["nic"] for r in rows if r["up"]] == [0, 1, 2]
        assert lab_cli.main(["run", "--tag", tag, "--conns", "30", "--udp", "6", "--pings", "1"]) == 0
        logs = Topology.load(tag).run_logs()
        assert len(logs) == 4, logs  # coordinator + 3 NICs
    finally:
        lab_cli.main(["down", "--tag", tag])
    assert not Topology(tag=tag).run_logs()
    assert not os.path.exists(os.path.join(STATE_DIR, f"{tag}.json"))
    assert not os.path.exists(os.path.join(STATE_DIR, f"{tag}.d"))
    assert ctl.main(["--tag", tag, "status"]) == 1
    assert "no lab" in capsys.readouterr().err
