"""Toeplitz (RSS) against Microsoft's published verification vectors ("Verifying the
RSS Hash Calculation": key 6d5a…01fa, IPv4 with and without ports), and the reading
of a port's key and indirection table from ``ethtool -x``."""
import ipaddress

import pytest

from hypernat import switchhash as sh

A = lambda s: int(ipaddress.IPv4Address(s))  # noqa: E731

# (source, destination, source port, destination port, IPv4 hash, IPv4 + TCP hash)
VECTORS = [
    ("66.9.149.187", "161.142.100.80", 2794, 1766, 0x323E8FC2, 0x51CCC178),
    ("199.92.111.2", "65.69.140.83", 14230, 4739, 0xD718262A, 0xC626B0EA),
    ("24.19.198.95", "12.22.207.184", 12898, 38024, 0xD2D0A5DE, 0x5C2B394A),
    ("38.27.205.30", "209.142.163.6", 48228, 2217, 0x82989176, 0xAFC7327F),
    ("153.39.163.191", "202.188.127.2", 44251, 1303, 0x5D1809C5, 0x10E828A2),
]


@pytest.mark.parametrize("src,dst,sp,dp,h2,h4", VECTORS)
def test_microsoft_rss_verification_vectors(src, dst, sp, dp, h2, h4):
    assert sh.toeplitz_tuple(sh.MS_RSS_KEY, A(src), A(dst)) == h2
    assert sh.toeplitz_tuple(sh.MS_RSS_KEY, A(src), A(dst), sp, dp) == h4


def test_rss_queue_follows_the_indirection_table():
    table = (0, 1, 2, 3) * 32
    src, dst, sp, dp, h2, h4 = VECTORS[0]
    assert sh.rss_queue(sh.MS_RSS_KEY, table, 6, A(src), sp, A(dst), dp) == table[h4 % 128]
    assert sh.rss_queue(sh.MS_RSS_KEY, table, 1, A(src), 0, A(dst), 0) == table[h2 % 128]


def test_a_short_key_is_an_error():
    with pytest.raises(ValueError, match="too short"):
        sh.toeplitz(b"\x01" * 8, b"\x00" * 12)


ETHTOOL_X = """RX flow hash indirection table for eth0 with 4 RX ring(s):
    0:      0     1     2     3     0     1     2     3
    8:      0     1     2     3     0     1     2     3
RSS hash key:
6d:5a:56:da:25:5b:0e:c2:41:67:25:3d:43:a3:8f:b0:d0:ca:2b:cb:ae:7b:30:b4:77:cb:2d:a3:80:30:f2:0c:6a:42:b7:3b:be:ac:01:fa
RSS hash function:
    toeplitz: on
    xor: off
"""


def test_ethtool_x_is_read():
    key, table = sh.parse_ethtool_x(ETHTOOL_X)
    assert key == sh.MS_RSS_KEY and table == (0, 1, 2, 3) * 4
    assert sh.parse_ethtool_x("Cannot get RX ring count: Operation not supported") is None


def test_predict_nic_maps_the_rss_queue_to_the_nic_serving_it():
    table = (0, 1) * 64
    nic_of_queue = {0: 3, 1: 5}
    src, dst, sp, dp, h2, h4 = VECTORS[1]
    want = nic_of_queue[table[h4 % 128]]
    assert sh.predict_nic("toeplitz", 2, 6, A(src), sp, A(dst), dp, rss=(sh.MS_RSS_KEY, table, nic_of_queue)) == want
    assert sh.predictable("toeplitz", 1, rss=(sh.MS_RSS_KEY, table, nic_of_queue))
    assert not sh.predictable("toeplitz", 6)  # no key and table: passive install
    with pytest.raises(ValueError, match="RSS key"):
        sh.predict_nic("toeplitz", 2, 6, A(src), sp, A(dst), dp)
    with pytest.raises(ValueError, match="served by no NIC"):
        sh.predict_nic("toeplitz", 2, 6, A(src), sp, A(dst), dp, rss=(sh.MS_RSS_KEY, (7,) * 128, nic_of_queue))
