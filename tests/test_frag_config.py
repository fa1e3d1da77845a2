"""Fragment settings: ``limits.fragments`` (the table's bounds) and ``switch.fragments``
(what the access switch hashes fragments on), and ``hypernat check`` refusing a switch
that can send the fragments of one datagram to different NICs."""
import copy
import subprocess
import sys

import pytest
import yaml

from hypernat import config
from hypernat.config import ConfigError

BASE = {
    "internal": {"prefixes": ["10.77.0.0/16"]},
    "external": {"pool": ["198.18.77.0/28"], "ports": [1024, 65535]},
    "nics": [
        {"id": 0, "inside": "inside0", "outside": "outside0"},
        {"id": 1, "inside": "inside1", "outside": "outside1"},
    ],
}


def tree(**top):
    d = copy.deepcopy(BASE)
    d.update(top)
    return d


def test_defaults():
    cfg = config.from_dict(BASE, "gw.yaml")
    assert cfg.switch.fragments == "addresses"
    f = cfg.limits.fragments
    assert (f.entries, f.bytes, f.timeout) == (4096, 4 << 20, 2)


def test_limits_read():
    cfg = config.from_dict(tree(limits={"fragments": {"entries": 100, "bytes": 65536, "timeout": 5}}), "gw.yaml")
    f = cfg.limits.fragments
    assert (f.entries, f.bytes, f.timeout) == (100, 65536, 5)


@pytest.mark.parametrize("frag, where", [
    ({"entries": 0}, "limits.fragments.entries"),
    ({"bytes": 100}, "limits.fragments.bytes"),
    ({"timeout": 0}, "limits.fragments.timeout"),
    ({"timeout": "2s"}, "limits.fragments.timeout"),
    ({"size": 1}, "limits.fragments"),
])
def test_bad_limits_name_file_and_key(frag, where):
    with pytest.raises(ConfigError) as ei:
        config.from_dict(tree(limits={"fragments": frag}), "gw.yaml")
    assert str(ei.value).startswith(f"gw.yaml: {where}")


def test_switch_splitting_fragments_refused_with_5_tuple_and_two_nics():
    with pytest.raises(ConfigError) as ei:
        config.from_dict(tree(switch={"fragments": "ports-when-present"}), "gw.yaml")
    e = ei.value
    assert (e.file, e.keypath) == ("gw.yaml", "switch.fragments")
    assert "different NICs" in e.problem


@pytest.mark.parametrize("sw, nics", [
    ({"fragments": "ports-when-present", "fields": "src"}, 2),  # every fragment by its source
    ({"fragments": "ports-when-present"}, 1),  # one NIC: nowhere else to go
    ({"fragments": "addresses"}, 2),
])
def test_switch_settings_that_keep_a_datagram_on_one_nic_accepted(sw, nics):
    t = tree(switch=sw)
    t["nics"] = t["nics"][:nics]
    assert config.from_dict(t, "gw.yaml").switch.fragments == sw["fragments"]


def test_hypernat_check_refuses(tmp_path):
    p = tmp_path / "gw.yaml"
    p.write_text(yaml.safe_dump(tree(switch={"fragments": "ports-when-present"})))
    r = subprocess.run([sys.executable, "-m", "hypernat", "check", str(p)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 1
    assert f"{p}: switch.fragments:" in r.stderr
