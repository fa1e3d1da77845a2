"""The NIC entries' link settings (VLANs): accepted as written, rejected naming the
file, the key and the problem."""
import pytest

from hypernat import config
from hypernat.config import ConfigError

from configkit import BASE, config_dict, with_nic


def test_vlans_default_to_none_and_load_as_written():
    assert config.from_dict(BASE, "gw.yaml").nic(0).inside_vlans == ()
    nc = config.from_dict(with_nic(inside_vlans=[42]), "gw.yaml").nic(0)
    assert nc.inside_vlans == (42,) and nc.outside_vlans == ()


@pytest.mark.parametrize("value,problem", [
    (42, "expected a list of VLAN IDs"),
    ([0], "not an integer in 1-4094"),
    ([4095], "not an integer in 1-4094"),
    (["7"], "not an integer in 1-4094"),
    ([True], "not an integer in 1-4094"),
    ([5, 6], "one VLAN per port"),
])
def test_bad_vlans_name_file_key_and_problem(value, problem):
    with pytest.raises(ConfigError) as ei:
        config.from_dict(with_nic(outside_vlans=value), "gw.yaml")
    msg = str(ei.value)
    assert "gw.yaml" in msg and "nics[0].outside_vlans" in msg and problem in msg, msg


def two_nics(q0, q1):
    d = config_dict()
    d["nics"] = [{"id": 0, "inside": "inside0", "outside": "outside0"},
                 {"id": 1, "inside": "inside0", "outside": "outside0"}]
    for n, q in zip(d["nics"], (q0, q1)):
        if q is not None:
            n["queue"] = q
    return d


def test_nics_share_a_port_queue_by_queue():
    cfg = config.from_dict(two_nics(0, 1), "gw.yaml")
    assert [cfg.nic(i).queue for i in (0, 1)] == [0, 1]


@pytest.mark.parametrize("q0,q1,what", [(0, 0, "queue 0 of it"), (None, 1, "already used"), (0, None, "already used")])
def test_a_shared_port_needs_a_distinct_queue_per_nic(q0, q1, what):
    with pytest.raises(ConfigError) as ei:
        config.from_dict(two_nics(q0, q1), "gw.yaml")
    msg = str(ei.value)
    assert msg.startswith("gw.yaml: nics[1].inside: interface 'inside0'") and what in msg, msg
