"""The NIC entries' link settings (VLANs): accepted as written, rejected naming the
file, the key and the problem."""
import copy

import pytest

from hypernat import config
from hypernat.config import ConfigError

BASE = {
    "internal": {"prefixes": ["10.77.0.0/16"]},
    "external": {"pool": ["198.18.77.0/28"], "ports": [1024, 65535]},
    "nics": [{"id": 0, "inside": "inside0", "outside": "outside0"}],
}


def with_nic(**kw):
    d = copy.deepcopy(BASE)
    d["nics"][0].update(kw)
    return d


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
