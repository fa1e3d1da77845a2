"""TCP MSS clamping (issue 13 item 4): SYN and SYN-ACK, both directions, in both twins.

scapy is the oracle: the expected frame is the translated one with the MSS option set
to the clamp and the TCP checksum recomputed by scapy; an option list scapy cannot
make sense of must leave the frame as plain translation leaves it.
"""
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.all import IP, TCP, Ether, raw
from scapy.layers.inet import in4_chksum

from fixtures.fastpath_oracle import E1, E2, I1, I2, R, eth, expected, run_frames, standard_env, with_mss
from hypernat.verdicts import IN, OUT, SEND_VERDICTS, VERDICT

CLAMP = 1360


def clamped_env(fp, clamp=CLAMP):
    env = standard_env(fp)
    env.tr.set_router(mss_clamp=clamp)
    return env


def mss_of(frame: bytes):
    """The first MSS option's value as scapy reads it (None: no MSS option)."""
    return next((v for k, v in Ether(frame)[TCP].options if k == "MSS"), None)


def tcp_checksum_ok(frame: bytes) -> bool:
    """scapy's checksum over the raw segment (scapy does not re-serialise the options)."""
    ip = Ether(frame)[IP]
    seg = bytearray(raw(ip)[ip.ihl * 4 : ip.len])
    stored = int.from_bytes(seg[16:18], "big")
    seg[16:18] = b"\0\0"
    return in4_chksum(6, ip, bytes(seg)) == stored


def plain_translation(fp, frame, direction=OUT):
    """The frame as translation without clamping leaves it."""
    out, _, _ = clamped_env(fp, 0).run([frame], direction)
    return out[0]


def ev(env, direction):
    return env.tr.router_events_dict()["out" if direction == OUT else "in"]


OPTS = [("MSS", 1460), ("SAckOK", b""), ("Timestamp", (1, 2)), ("NOP", None), ("WScale", 7)]


@pytest.mark.parametrize("flags,direction", [("S", OUT), ("SA", IN), ("SA", OUT), ("S", IN)])
def test_syn_and_syn_ack_clamped_both_ways(fp, flags, direction):
    env = clamped_env(fp)
    if direction == OUT:
        f = raw(eth() / IP(src=I1, dst=R) / TCP(sport=1111, dport=80, flags=flags, options=OPTS))
        want = expected(f, src=E1, sport=40001)
    else:
        f = raw(eth() / IP(src=R, dst=E1) / TCP(sport=80, dport=40001, flags=flags, options=OPTS))
        want = expected(f, dst=I1, dport=1111)
    out, v, _ = env.run([f], direction)
    assert v[0] == VERDICT["translated"]
    assert out[0] == with_mss(want, CLAMP) and mss_of(out[0]) == CLAMP
    assert ev(env, direction)["mss_clamped"] == 1


def test_hairpin_syn_clamped(fp):
    env = clamped_env(fp)
    f = raw(eth() / IP(src=I1, dst=E2) / TCP(sport=5555, dport=6666, flags="S", options=OPTS))
    out, v, _ = env.run([f], OUT)
    assert v[0] == VERDICT["hairpin"]
    assert out[0] == with_mss(expected(f, src=E1, sport=41000, dst=I2, dport=7777), CLAMP)


@pytest.mark.parametrize("lead", [[], [("NOP", None)], [("NOP", None), ("NOP", None), ("NOP", None)],
                                  [("WScale", 2)], [("Timestamp", (5, 6)), ("NOP", None)]])
def test_mss_at_any_offset(fp, lead):
    """An MSS value at an odd offset straddles two checksum words: still right."""
    env = clamped_env(fp)
    f = raw(eth() / IP(src=I1, dst=R) / TCP(sport=1111, dport=80, flags="S", options=lead + [("MSS", 9000)]))
    out, _, _ = env.run([f], OUT)
    assert out[0] == with_mss(expected(f, src=E1, sport=40001), CLAMP)


@pytest.mark.parametrize("case", ["below", "equal", "not-syn", "no-mss", "off"])
def test_left_alone(fp, case):
    env = clamped_env(fp, clamp=0 if case == "off" else CLAMP)
    mss = {"below": 536, "equal": CLAMP}.get(case, 1460)
    flags = "A" if case == "not-syn" else "S"
    opts = [("SAckOK", b"")] if case == "no-mss" else [("MSS", mss)]
    f = raw(eth() / IP(src=I1, dst=R) / TCP(sport=1111, dport=80, flags=flags, options=opts))
    out, v, _ = env.run([f], OUT)
    assert v[0] == VERDICT["translated"] and out[0] == expected(f, src=E1, sport=40001)
    assert ev(env, OUT)["mss_clamped"] == 0 and ev(env, OUT)["mss_bad_options"] == 0


@pytest.mark.parametrize("opts", [
    b"\x02\x03\x05\xb4",                      # MSS with length 3
    b"\x02\x05\x05\xb4",                      # MSS with length 5
    b"\x08\x00\x02\x04",                      # an option of length 0 before the MSS
    b"\x01\x01\x08\x0c\x02\x04\x05\xb4",      # an option running past the header
    b"\x01\x01\x01\x02",                      # MSS kind in the last byte, no length
    b"\x03\x01\x02\x04",                      # an option of length 1
], ids=["len3", "len5", "len0", "overrun", "truncated", "len1"])
def test_malformed_options_left_as_they_are(fp, opts):
    env = clamped_env(fp)
    f = raw(eth() / IP(src=I1, dst=R) / TCP(sport=1111, dport=80, flags="S", dataofs=5 + len(opts) // 4) / opts
            / b"payload-after-the-header")
    assert Ether(f)[TCP].dataofs * 4 == 20 + len(opts)
    out, v, _ = env.run([f], OUT)
    assert v[0] == VERDICT["translated"]
    assert out[0] == plain_translation(fp, f) and tcp_checksum_ok(out[0])  # options untouched
    assert ev(env, OUT)["mss_bad_options"] == 1 and ev(env, OUT)["mss_clamped"] == 0


def test_eol_ends_the_walk(fp):
    env = clamped_env(fp)
    f = raw(eth() / IP(src=I1, dst=R) / TCP(sport=1111, dport=80, flags="S", dataofs=7)
            / b"\x00\x00\x00\x00\x02\x04\x05\xb4")
    out, _, _ = env.run([f], OUT)
    assert out[0] == plain_translation(fp, f)
    assert ev(env, OUT)["mss_bad_options"] == 0 and ev(env, OUT)["mss_clamped"] == 0


_PIECE = st.one_of(st.sampled_from([b"\x01", b"\x00", b"\x03\x03\x07", b"\x04\x02", b"\x08\x0a" + bytes(8)]),
                   st.integers(0, 0xFFFF).map(lambda v: b"\x02\x04" + v.to_bytes(2, "big")), st.binary(max_size=3))
OPTION_BYTES = st.one_of(st.binary(max_size=40), st.lists(_PIECE, max_size=10).map(lambda x: b"".join(x)[:40]))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(opts=OPTION_BYTES, flags=st.sampled_from(["S", "SA", "A"]), clamp=st.integers(0, 0xFFFF))
def test_random_options(fp, opts, flags, clamp):
    """Any option bytes: no read or write outside the header (guards), a frame that
    is sent has a checksum scapy agrees with, and a clamp never raises an MSS."""
    opts = opts + b"\x00" * (-len(opts) % 4)
    env = clamped_env(fp, clamp)
    f = raw(eth() / IP(src=I1, dst=R) / TCP(sport=1111, dport=80, flags=flags, dataofs=5 + len(opts) // 4) / opts)
    out, v, _ = run_frames(env.tr, [f], OUT)
    assert v[0] in SEND_VERDICTS
    assert tcp_checksum_ok(out[0])
    plain = plain_translation(fp, f)
    diff = [i for i, (a, b) in enumerate(zip(out[0], plain)) if a != b]
    assert len(out[0]) == len(plain)
    if diff:  # only the MSS value and the TCP checksum may differ, and only downward
        tcp = 14 + 20
        assert all(i in (tcp + 16, tcp + 17) or tcp + 20 <= i < tcp + 20 + len(opts) for i in diff)
        assert flags != "A" and clamp
        opt = [i for i in diff if i >= tcp + 20]  # the MSS value: 2 bytes after kind 2, length 4
        assert len(opt) <= 2 and opt, diff
        # the value starts at the first changed byte, or one before it (high byte unchanged)
        v = next(j for j in (opt[0], opt[0] - 1) if out[0][j - 2 : j] == b"\x02\x04" and opt[-1] <= j + 1)
        assert int.from_bytes(out[0][v : v + 2], "big") == clamp
        assert int.from_bytes(plain[v : v + 2], "big") > clamp
