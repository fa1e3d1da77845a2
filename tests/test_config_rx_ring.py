"""The PACKET_MMAP receive ring of a NIC entry (``rx_ring``, ``rx_block_ms``): defaults,
accepted as written, rejected naming the file, the key and the problem."""
import pytest

from hypernat import config
from hypernat.config import ConfigError

from configkit import BASE, with_nic


def test_the_receive_ring_defaults_to_v2_and_loads_as_written():
    nc = config.from_dict(BASE, "gw.yaml").nic(0)
    assert (nc.rx_ring, nc.rx_block_ms) == ("v2", 1)
    assert config.from_dict(with_nic(rx_ring="v3"), "gw.yaml").nic(0).rx_ring == "v3"
    assert config.from_dict(with_nic(rx_ring="v3", rx_block_ms=2), "gw.yaml").nic(0).rx_block_ms == 2


@pytest.mark.parametrize("kw,key,problem", [
    ({"rx_ring": "v1"}, "rx_ring", "'v1' is not one of: v2, v3"),
    ({"rx_ring": 3}, "rx_ring", "expected a non-empty string"),
    ({"rx_block_ms": 0}, "rx_block_ms", "out of range 1..1000"),
    ({"rx_block_ms": "1ms"}, "rx_block_ms", "expected an integer"),
    ({"rx_ring": "v2", "rx_block_ms": 2}, "rx_block_ms", "needs rx_ring v3"),
    ({"io": "af_xdp", "rx_ring": "v2"}, "rx_ring", "packet_mmap backend only"),
])
def test_a_bad_receive_ring_names_file_key_and_problem(kw, key, problem):
    with pytest.raises(ConfigError) as ei:
        config.from_dict(with_nic(**kw), "gw.yaml")
    msg = str(ei.value)
    assert "gw.yaml" in msg and f"nics[0].{key}" in msg and problem in msg, msg


def test_the_config_and_the_port_know_the_same_rings():
    packet_mmap = pytest.importorskip("hypernat.io.packet_mmap")
    assert config.RX_RINGS == packet_mmap.RX_RINGS
    assert config.NicConfig(0, "a", "b").rx_block_ms == packet_mmap.RX_BLOCK_MS
