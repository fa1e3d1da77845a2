"""Partial checksums (checksum offload, docs/fastpath.md "Partial checksums and
super-frames"), both twins, against scapy.

A frame handed over with ``VIRTIO_NET_HDR_F_NEEDS_CSUM`` carries, in its TCP/UDP
checksum field, the pseudo-header sum (not complemented); the device finishes it by
summing the L4 header and payload.  Translated with ``partial``, only the addresses
(what the pseudo-header covers) may move that field.  The oracle: finish the field as
the device would (``hypernat.io.base.finish_checksum``), and the result must be the
checksum scapy computes for the translated packet.
"""
import numpy as np
import pytest
from scapy.all import IP, TCP, UDP, Ether, raw

from fixtures.fastpath_oracle import E1, E2, I1, I2, R, eth, pack, standard_env
from fixtures.partial import make_partial, pseudo_sum
from hypernat.io.base import finish_checksum
from hypernat.verdicts import IN, OUT, VERDICT_NAMES


def translate_partial(fp, frames, direction, flags):
    env = standard_env(fp)
    buf, offsets, lengths, guard = pack(frames)
    before = buf.copy()
    v = np.zeros(len(frames), np.uint8)
    env.tr.translate(buf, offsets, lengths, direction, 100, v, None, np.array(flags, np.uint8))
    assert np.array_equal(buf[guard], before[guard])
    return [buf[o:o + n].tobytes() for o, n in zip(offsets.tolist(), lengths.tolist())], v


CASES = [
    (TCP, OUT, dict(src=I1, dst=R, sport=1111, dport=80), dict(src=E1, sport=40001)),
    (TCP, IN, dict(src=R, dst=E1, sport=80, dport=40001), dict(dst=I1, dport=1111)),
    (UDP, OUT, dict(src=I1, dst=R, sport=2222, dport=53), dict(src=E1, sport=40002)),
    (UDP, IN, dict(src=R, dst=E2, sport=53, dport=40004), dict(dst=I2, dport=5353)),
]


@pytest.mark.parametrize("payload", [b"", b"x", b"hello world" * 97, bytes(range(256)) * 7 + b"\xff"],
                         ids=["empty", "odd1", "1067", "1793"])
@pytest.mark.parametrize("layer,direction,form,change", CASES, ids=["tcp-out", "tcp-in", "udp-out", "udp-in"])
def test_partial_checksum_is_updated_for_the_pseudo_header_only(fp, layer, direction, form, change, payload):
    ip = IP(src=form["src"], dst=form["dst"], ttl=64, id=7)
    pkt = eth() / ip / layer(sport=form["sport"], dport=form["dport"]) / payload
    frame, l4, off = make_partial(pkt)
    (out,), v = translate_partial(fp, [frame], direction, [1])
    assert VERDICT_NAMES[v[0]] == "translated"
    # Still partial: the field holds the translated packet's pseudo-header sum.
    assert int.from_bytes(out[l4 + off:l4 + off + 2], "big") == pseudo_sum(out, l4)
    done = bytearray(out)
    finish_checksum(done, l4, off)
    want = Ether(raw(pkt))
    for k, val in change.items():
        setattr(want[IP] if k in ("src", "dst") else want[layer], k, val)
    want[IP].ttl -= 1
    del want[IP].chksum
    del want[layer].chksum
    assert bytes(done) == raw(want)


def test_partial_and_complete_frames_in_one_batch(fp):
    """The flag is per frame: a complete frame beside partial ones keeps RFC 1624's
    full update (ports included)."""
    pkt = eth() / IP(src=I1, dst=R, ttl=64) / TCP(sport=1111, dport=80) / b"abc"
    part, l4, off = make_partial(pkt)
    out, v = translate_partial(fp, [raw(pkt), part, raw(pkt)], OUT, [0, 1, 0])
    assert [VERDICT_NAMES[x] for x in v] == ["translated"] * 3
    assert out[0] == out[2]
    full = Ether(out[0])
    del full[TCP].chksum
    assert out[0] == raw(full)
    done = bytearray(out[1])
    finish_checksum(done, l4, off)
    assert bytes(done) == out[0]


def test_partial_flag_array_is_checked(fp):
    env = standard_env(fp)
    buf, offsets, lengths, _ = pack([raw(eth() / IP(src=I1, dst=R) / UDP(sport=2222, dport=53))])
    v = np.zeros(1, np.uint8)
    with pytest.raises((ValueError, TypeError)):
        env.tr.translate(buf, offsets, lengths, OUT, 100, v, None, np.zeros(0, np.uint8))


@pytest.mark.parametrize("seed", range(4))
def test_twins_agree_on_mixed_batches_with_random_partial_flags(seed):
    """Both twins, the same batches (every kind of frame, malformed ones included), a
    random partial flag per frame: the same verdicts, the same bytes, guards intact."""
    import importlib
    import random

    from fixtures.fastpath_oracle import mixed_batch, template_frames

    cy = importlib.import_module("hypernat._fastpath")
    py = importlib.import_module("hypernat.fastpath_py")
    frames, dirs = mixed_batch(seed, 800, template_frames())
    rng = random.Random(seed)
    for direction in (OUT, IN):
        fr = [f for f, d in zip(frames, dirs) if d == direction]
        flags = [rng.getrandbits(1) for _ in fr]
        (a, va), (b, vb) = (translate_partial(m, fr, direction, flags) for m in (cy, py))
        assert list(va) == list(vb)
        assert a == b
