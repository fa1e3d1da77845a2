"""What the config tests of one NIC entry share: a minimal valid configuration (as the
dict a YAML file loads to) and a copy of it with fields of its NIC entry set."""
import copy

BASE = {
    "internal": {"prefixes": ["10.77.0.0/16"]},
    "external": {"pool": ["198.18.77.0/28"], "ports": [1024, 65535]},
    "nics": [{"id": 0, "inside": "inside0", "outside": "outside0"}],
}


def config_dict() -> dict:
    """A fresh copy of BASE, to change freely."""
    return copy.deepcopy(BASE)


def with_nic(**kw) -> dict:
    """BASE with the fields `kw` set on its one NIC entry (a fresh copy)."""
    d = config_dict()
    d["nics"][0].update(kw)
    return d
