"""Configuration loading: every rejection names the file, the key path and the problem."""
import copy
import glob
import os

import pytest
import yaml

from hypernat import config
from hypernat.config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BASE = {
    "internal": {"prefixes": ["10.77.0.0/16"]},
    "external": {"pool": ["198.18.77.0/28"], "ports": [1024, 65535]},
    "nics": [
        {"id": 0, "inside": "inside0", "outside": "outside0"},
        {"id": 1, "inside": "inside1", "outside": "outside1"},
    ],
}


def cfg_with(**changes):
    d = copy.deepcopy(BASE)
    for path, value in changes.items():
        node = d
        keys = path.split("__")
        for k in keys[:-1]:
            node = node.setdefault(k, {}) if not k.isdigit() else node[int(k)]
        last = keys[-1]
        if value is _DELETE:
            del node[last]
        elif last.isdigit():
            node[int(last)] = value
        else:
            node[last] = value
    return d


_DELETE = object()


def err(tree, path="gw.yaml") -> str:
    with pytest.raises(ConfigError) as ei:
        config.from_dict(tree, path)
    return str(ei.value)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "conf", "*.yaml"))))
def test_examples_load(path):
    cfg = config.load(path)
    assert cfg.n_nics >= 2
    assert cfg.pool_size >= 1


def test_defaults_and_types():
    cfg = config.from_dict(BASE, "gw.yaml")
    assert cfg.mapping == "endpoint-independent"
    assert cfg.filtering == "address-and-port-dependent"
    assert cfg.partition == "by-port" and cfg.install == "passive"
    assert cfg.timeouts.udp >= 120 and cfg.timeouts.tcp_established >= 7440
    assert cfg.timeouts.tcp_transitory >= 240 and cfg.timeouts.icmp >= 60 and cfg.timeouts.reuse_delay == 120
    assert [n.id for n in cfg.nics] == [0, 1]
    assert cfg.pool_size == 16 and cfg.pool_ranges == ((0xC6124D00, 28),)
    assert cfg.is_internal(0x0A4D0001) and not cfg.is_internal(0xC6124D01)
    with pytest.raises(Exception):
        cfg.mapping = "x"  # frozen


def test_nic_order_by_id():
    t = cfg_with(nics=[{"id": 1, "inside": "a", "outside": "b"}, {"id": 0, "inside": "c", "outside": "d"}])
    cfg = config.from_dict(t, "gw.yaml")
    assert [n.inside for n in cfg.nics] == ["c", "a"]


# (description, changes, expected message)
CASES = [
    ("issue example", dict(external__pool=["198.18.77.0/28", "198.18.0.0/33"]),
     "gw.yaml: external.pool[1]: '198.18.0.0/33' is not an IPv4 prefix"),
    ("not a string", dict(external__pool=[17]), "gw.yaml: external.pool[0]: 17 is not an IPv4 prefix"),
    ("host bits", dict(internal__prefixes=["10.77.0.1/16"]),
     "gw.yaml: internal.prefixes[0]: '10.77.0.1/16' has host bits set (did you mean 10.77.0.0/16?)"),
    ("pool overlap", dict(external__pool=["198.18.77.0/28", "198.18.77.8/29"]),
     "gw.yaml: external.pool[1]: '198.18.77.8/29' overlaps external.pool[0] (198.18.77.0/28)"),
    ("internal/external overlap", dict(external__pool=["10.77.5.0/24"]),
     "gw.yaml: external.pool[0]: 10.77.5.0/24 overlaps internal.prefixes[0] (10.77.0.0/16)"),
    ("unknown top key", dict(filterin="x"), "gw.yaml: filterin: unknown key (allowed: "),
    ("unknown nested key", dict(timeouts={"udp_timeout": 300}), "gw.yaml: timeouts.udp_timeout: unknown key"),
    ("unknown nic key", dict(nics__0__driver="mlx5"), "gw.yaml: nics[0].driver: unknown key"),
    ("missing section", dict(internal=_DELETE), "gw.yaml: internal: required key is missing"),
    ("missing nic iface", dict(nics__1__outside=_DELETE), "gw.yaml: nics[1].outside: required key is missing"),
    ("empty nics", dict(nics=[]), "gw.yaml: nics: expected a non-empty list of NICs"),
    ("duplicate id", dict(nics__1__id=0), "gw.yaml: nics[1].id: duplicate NIC id 0"),
    ("id gap", dict(nics__1__id=5), "gw.yaml: nics[1].id: NIC ids must be 0..1 (one per NIC), got 5"),
    ("duplicate iface", dict(nics__1__inside="outside0"),
     "gw.yaml: nics[1].inside: interface 'outside0' is already used by nics[0].outside"),
    ("port zero", dict(external__ports=[0, 65535]), "gw.yaml: external.ports: [0, 65535] is outside 1-65535"),
    ("port high", dict(external__ports=[1024, 70000]), "gw.yaml: external.ports: [1024, 70000] is outside 1-65535"),
    ("ports reversed", dict(external__ports=[2000, 1000]),
     "gw.yaml: external.ports: first port 2000 is above last port 1000"),
    ("ports shape", dict(external__ports="1024-65535"), "gw.yaml: external.ports: expected [first, last]"),
    ("by-address too small", dict(partition="by-address", external__pool=["198.18.77.1/32"]),
     "gw.yaml: external.pool: 1 address(es) cannot be split by address over 2 NICs (need at least one each)"),
    ("by-port too small", dict(external__ports=[1024, 1087], limits={"port_block_size": 64}),
     "gw.yaml: external.ports: 64 ports in blocks of 64 give 1 block(s) per address, fewer than the 2 NICs"),
    ("block too big", dict(external__ports=[1024, 1030], limits={"port_block_size": 64}),
     "gw.yaml: limits.port_block_size: 64 is larger than the port range (7 ports)"),
    ("udp below RFC", dict(timeouts={"udp": 60}),
     "gw.yaml: timeouts.udp: 60 s is below the RFC 4787 REQ-5 minimum of 120 s (set timeouts.force: true to allow)"),
    ("tcp est below RFC", dict(timeouts={"tcp_established": 3600}),
     "gw.yaml: timeouts.tcp_established: 3600 s is below the RFC 5382 REQ-5 minimum of 7440 s"),
    ("tcp trans below RFC", dict(timeouts={"tcp_transitory": 60}),
     "gw.yaml: timeouts.tcp_transitory: 60 s is below the RFC 5382 REQ-5 minimum of 240 s"),
    ("icmp below RFC", dict(timeouts={"icmp": 10}),
     "gw.yaml: timeouts.icmp: 10 s is below the RFC 5508 REQ-2 minimum of 60 s"),
    ("timeout type", dict(timeouts={"udp": "5m"}), "gw.yaml: timeouts.udp: expected an integer, got '5m'"),
    ("negative reuse", dict(timeouts={"reuse_delay": -1}), "gw.yaml: timeouts.reuse_delay: -1 is out of range 0..604800"),
    ("tcp off loopback", dict(coordinator={"endpoint": "tcp://192.168.1.1:5555"}),
     "gw.yaml: coordinator.endpoint: 'tcp://192.168.1.1:5555' is off loopback: CURVE keys are required"),
    ("tcp any address", dict(coordinator={"endpoint": "tcp://*:5555"}),
     "gw.yaml: coordinator.endpoint: 'tcp://*:5555' is off loopback: CURVE keys are required"),
    ("tcp nic keys missing",
     dict(coordinator={"endpoint": "tcp://192.168.1.1:5555", "curve_secret_key": "c.key_secret",
                       "curve_public_key": "c.key"}),
     "gw.yaml: nics[0]: coordinator endpoint 'tcp://192.168.1.1:5555' is off loopback: curve_secret_key and "
     "curve_public_key are required"),
    ("half a key pair", dict(coordinator={"endpoint": "tcp://127.0.0.1:5555", "curve_secret_key": "c"}),
     "gw.yaml: coordinator: curve_secret_key and curve_public_key go together"),
    ("bad scheme", dict(coordinator={"endpoint": "udp://1.2.3.4:5"}),
     "gw.yaml: coordinator.endpoint: 'udp://1.2.3.4:5' is not an ipc://, tcp:// or inproc:// endpoint"),
    ("tcp no port", dict(coordinator={"endpoint": "tcp://127.0.0.1"}),
     "gw.yaml: coordinator.endpoint: 'tcp://127.0.0.1': expected tcp://HOST:PORT"),
    ("io backend", dict(nics__0__io="dpdk"),
     "gw.yaml: nics[0].io: 'dpdk' is not one of: packet_mmap, af_xdp, pcap, memory"),
    ("cpu type", dict(nics__0__cpu="two"), "gw.yaml: nics[0].cpu: expected an integer, got 'two'"),
    ("rt priority", dict(nics__0__rt_priority=120), "gw.yaml: nics[0].rt_priority: 120 is out of range 0..99"),
    ("hash", dict(switch={"hash": "md5"}), "gw.yaml: switch.hash: 'md5' is not one of: sha1, jhash, crc32, toeplitz"),
    ("fields", dict(switch={"fields": "dst"}), "gw.yaml: switch.fields: 'dst' is not one of: 5-tuple, src"),
    ("toeplitz key", dict(switch={"toeplitz_key": "zz"}), "gw.yaml: switch.toeplitz_key: expected hex bytes"),
    ("install", dict(install="eager"), "gw.yaml: install: 'eager' is not one of: passive, active"),
    ("mapping", dict(mapping="address-dependent"),
     "gw.yaml: mapping: 'address-dependent' is not one of: endpoint-independent, address-and-port-dependent"),
    ("filtering", dict(filtering="none"), "gw.yaml: filtering: 'none' is not one of: endpoint-independent"),
    ("partition", dict(partition="by-hash"), "gw.yaml: partition: 'by-hash' is not one of: by-port, by-address"),
    ("hairpin bool", dict(hairpinning="yes please"), "gw.yaml: hairpinning: expected true or false, got 'yes please'"),
    ("limits range", dict(limits={"ports_per_host": 0}), "gw.yaml: limits.ports_per_host: 0 is out of range 1.."),
    ("lease range", dict(limits={"lease_duration": 40000}), "gw.yaml: limits.lease_duration: 40000 is out of range"),
    ("translog mode", dict(translation_log={"mode": "per-host"}),
     "gw.yaml: translation_log.mode: 'per-host' is not one of: per-rule, per-block"),
    ("metrics port", dict(metrics={"port": 65535}), "gw.yaml: metrics.port: 65535 is out of range 1..65533"),
    ("section type", dict(limits=[1, 2]), "gw.yaml: limits: expected a mapping, got list"),
]  # fmt: skip


@pytest.mark.parametrize("desc,changes,expected", CASES, ids=[c[0] for c in CASES])
def test_rejections(desc, changes, expected):
    msg = err(cfg_with(**changes))
    assert msg.startswith(expected), msg


def test_force_allows_short_timeouts():
    t = cfg_with(timeouts={"udp": 5, "tcp_established": 10, "tcp_transitory": 3, "icmp": 2, "force": True})
    cfg = config.from_dict(t, "gw.yaml")
    assert (cfg.timeouts.udp, cfg.timeouts.tcp_transitory) == (5, 3)


@pytest.mark.parametrize("ep", ["tcp://127.0.0.1:5555", "tcp://localhost:5555", "ipc:///tmp/x.sock", "inproc://c"])
def test_loopback_and_ipc_need_no_keys(ep):
    cfg = config.from_dict(cfg_with(coordinator={"endpoint": ep}), "gw.yaml")
    assert cfg.coordinator.endpoint == ep and not cfg.coordinator.curve


def test_tcp_with_all_keys():
    t = cfg_with(coordinator={"endpoint": "tcp://192.168.1.1:5555", "curve_secret_key": "c.key_secret",
                              "curve_public_key": "c.key"})  # fmt: skip
    for i in range(2):
        t["nics"][i]["curve_secret_key"] = f"n{i}.key_secret"
        t["nics"][i]["curve_public_key"] = f"n{i}.key"
    assert config.from_dict(t, "gw.yaml").coordinator.curve


def test_yaml_errors_and_files(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("internal: [\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: not valid YAML at line \d+"):
        config.load(str(p))
    with pytest.raises(ConfigError, match=r"nope.yaml: cannot read"):
        config.load(str(tmp_path / "nope.yaml"))
    p.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: expected a mapping, got list"):
        config.load(str(p))
    # safe_load: no arbitrary objects
    p.write_text("internal: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load(str(p))


def test_check_main(tmp_path, capsys):
    p = tmp_path / "gw.yaml"
    p.write_text(yaml.safe_dump(BASE))
    assert config.check_main([str(p)]) == 0
    out = capsys.readouterr().out
    assert "OK" in out and "partition by-port" in out
    assert "1024-33279" in out and "33280-65535" in out  # 1008 blocks of 64 split in two
    t = cfg_with(timeouts={"udp": 10})
    p.write_text(yaml.safe_dump(t))
    assert config.check_main([str(p)]) == 1
    assert "timeouts.udp: 10 s is below" in capsys.readouterr().err


def test_cli_dispatches_check(tmp_path, capsys):
    from hypernat import cli

    assert cli.main(["check", os.path.join(ROOT, "conf", "gw-2nic-by-port.yaml")]) == 0
    assert "203.0.113.10" in capsys.readouterr().out
