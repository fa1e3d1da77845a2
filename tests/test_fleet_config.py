"""The ``fleet:`` section and ``hypernat check`` on a fleet's files (no root, no FRR)."""
import copy

import pytest
import yaml

from hypernat.config import ConfigError, check_main, from_dict
from hypernat.fleet.spec import check_fleet


def server(i: int, own: str, **fleet_over) -> dict:
    fleet = {
        "server": f"gw{i}", "id": i, "pool": ["198.18.77.0/28"], "asn": 65001, "router_id": f"10.255.0.{i}",
        "bfd": {"interval_ms": 150, "multiplier": 5},
        "peers": [
            {"name": "vpc-router", "side": "vpc", "address": f"172.30.{i}.1", "asn": 65100, "local": f"172.30.{i}.2"},
            {"name": "inet-router", "side": "internet", "address": f"172.31.{i}.1", "asn": 65200, "local": f"172.31.{i}.2"},
        ],
    }
    fleet.update(fleet_over)
    return {"internal": {"prefixes": ["10.77.0.0/16"]}, "external": {"pool": [own]},
            "nics": [{"id": 0, "inside": "inside0", "outside": "outside0"}], "fleet": fleet}


def write(tmp_path, trees) -> list:
    paths = []
    for i, t in enumerate(trees):
        p = tmp_path / f"gw{i + 1}.yaml"
        p.write_text(yaml.safe_dump(t))
        paths.append(str(p))
    return paths


def test_one_server_reads():
    cfg = from_dict(server(1, "198.18.77.0/29"), "gw1.yaml")
    f = cfg.fleet
    assert f.server == "gw1" and f.asn == 65001 and f.bfd.detect_ms == 750
    assert [str(n) for n in f.announce_vpc] == ["0.0.0.0/0"]
    assert [str(n) for n in f.announce_internet] == ["198.18.77.0/29"]  # default: what it owns
    assert [p.name for p in f.peers_on("vpc")] == ["vpc-router"]
    assert from_dict({k: v for k, v in server(1, "198.18.77.0/29").items() if k != "fleet"}).fleet is None


@pytest.mark.parametrize("over,key,words", [
    ({"announce": {"internet": ["198.18.77.8/29"]}}, "fleet.announce.internet[0]", "not owned"),
    ({"pool": ["198.18.78.0/28"]}, "external.pool[0]", "not inside fleet.pool"),
    ({"bfd": {"interval_ms": 50, "multiplier": 3}}, "fleet.bfd", "below 300 ms"),
    ({"router_id": "nope"}, "fleet.router_id", "not an IPv4 address"),
    ({"peers": [{"name": "v", "side": "vpc", "address": "1.1.1.1", "asn": 1, "local": "1.1.1.2"}]}, "fleet.peers", "internet side"),
    ({"peers": [{"name": "v", "side": "left", "address": "1.1.1.1", "asn": 1, "local": "1.1.1.2"}]}, "fleet.peers[0].side", "not one of"),
    ({"colour": 1}, "fleet.colour", "unknown key"),
])
def test_bad_server_named_by_key(over, key, words):
    with pytest.raises(ConfigError) as e:
        from_dict(server(1, "198.18.77.0/29", **over), "gw1.yaml")
    assert e.value.file == "gw1.yaml" and e.value.keypath == key and words in e.value.problem


def test_fleet_sound(tmp_path, capsys):
    paths = write(tmp_path, [server(1, "198.18.77.0/29"), server(2, "198.18.77.8/29")])
    assert check_main(paths) == 0
    assert "fleet of 2 server(s): OK" in capsys.readouterr().out
    assert check_main([str(tmp_path)]) == 0  # a directory


def problems(tmp_path, trees, routers=None):
    from hypernat.config import load

    return [(e.file.rsplit("/", 1)[-1], e.keypath, e.problem) for e in
            check_fleet([load(p) for p in write(tmp_path, trees)], routers)]


def test_overlapping_pools_refused(tmp_path, capsys):
    errs = problems(tmp_path, [server(1, "198.18.77.0/29"), server(2, "198.18.77.4/30")])
    assert errs and errs[0][:2] == ("gw2.yaml", "external.pool[0]") and "gw1.yaml: external.pool[0]" in errs[0][2]
    assert check_main(write(tmp_path, [server(1, "198.18.77.0/29"), server(2, "198.18.77.4/30")])) == 1
    assert "gw2.yaml: external.pool[0]" in capsys.readouterr().err


def test_duplicate_ids_refused(tmp_path):
    b = server(2, "198.18.77.8/29", id=1, router_id="10.255.0.1", server="gw1")
    keys = {k for _, k, _ in problems(tmp_path, [server(1, "198.18.77.0/29"), b])}
    assert {"fleet.id", "fleet.router_id", "fleet.server"} <= keys


def test_peers_that_do_not_match_refused(tmp_path):
    b = server(2, "198.18.77.8/29")
    b["fleet"]["peers"][0]["asn"] = 65101  # gw1 says vpc-router is AS65100
    errs = problems(tmp_path, [server(1, "198.18.77.0/29"), b])
    assert [(f, k) for f, k, _ in errs] == [("gw2.yaml", "fleet.peers[0].asn")] and "has ASN 65100" in errs[0][2]
    # Against the routers as they are (the lab passes them): the wrong one is named alone.
    routers = {"vpc-router": ("vpc", 65100), "inet-router": ("internet", 65200)}
    errs = problems(tmp_path, [server(1, "198.18.77.0/29"), b], routers)
    assert [(f, k) for f, k, _ in errs] == [("gw2.yaml", "fleet.peers[0].asn")]
    c = copy.deepcopy(b)
    c["fleet"]["peers"][0].update(name="inet-router", asn=65200)  # names swapped: sides do not match
    c["fleet"]["peers"][1].update(name="vpc-router", asn=65100)
    assert ("gw2.yaml", "fleet.peers[0].side") in [(f, k) for f, k, _ in problems(tmp_path, [server(1, "198.18.77.0/29"), c])]


def test_other_fleet_problems(tmp_path):
    b = server(2, "198.18.77.8/29", pool=["198.18.77.0/27"], asn=65100)
    b["fleet"]["peers"][0]["local"] = "172.30.1.2"  # gw1's address
    keys = {k for _, k, _ in problems(tmp_path, [server(1, "198.18.77.0/29"), b])}
    assert {"fleet.pool", "fleet.peers[0].local", "fleet.peers[0].asn"} <= keys


def test_the_example_fleet_is_sound():
    import os

    conf = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf", "fleet")
    assert check_main([conf, "-q"]) == 0
