"""Super-frames against the egress MTU (docs/fastpath.md "Super-frames and the MTU"),
both twins, scapy the oracle for every checksum.

A GRO-merged or TSO-built super-frame (up to 64 KB) arrives with its virtio_net_hdr
(``meta``: gso_type, gso_size); it leaves as segments of headers + gso_size bytes, cut
by the kernel after the gateway.  So it is sized by its segments, as Linux forwards
(ip_forward, skb_gso_validate_network_len):

    segments fit the exit MTU ───────────────► translated, sent whole (still partial)
    too big, DF ─────────────────────────────► frag_needed + ICMP type 3 code 4 (MTU)
    too big, DF clear, TCP ──────────────────► translated, gso_size lowered to fit
    too big, DF clear, UDP ──────────────────► drop_gso_too_big (counted, never sent)
    not a super-frame, partial, too big, DF clear ─► fragments, checksum finished first
"""
import importlib
import random

import numpy as np
import pytest
from scapy.all import ICMP, IP, TCP, UDP, Ether, IPOption_NOP, raw
from scapy.layers.inet import defragment

from fixtures.fastpath_oracle import E1, I1, R, eth, pack, standard_env
from fixtures.partial import checksums_right, partial_frame, pseudo_sum
from hypernat.io.base import GSO_NONE, GSO_TCPV4, GSO_UDP_L4, META_DTYPE, VNET_F_NEEDS_CSUM, finish_checksum
from hypernat.verdicts import OUT, ROUTER_EVENT_NAMES, VERDICT_NAMES

GW_OUT, GW_IN = "100.64.0.1", "10.0.0.254"
MTU = 1280


def super_frame(layer, payload, gso, df=True, flags="A", gso_type=None, sport=None, dport=None,
                ip_options=(), tcp_options=()):
    """(frame with a partial checksum, its META_DTYPE record)."""
    ip = IP(src=I1, dst=R, ttl=64, id=9, flags="DF" if df else 0, options=list(ip_options))
    if layer is TCP:
        l4h = TCP(sport=sport or 1111, dport=dport or 80, flags=flags, seq=1000, options=list(tcp_options))
    else:
        l4h = UDP(sport=sport or 2222, dport=dport or 53)
    return partial_frame(eth() / ip / l4h / payload, gso, gso_type)


def run(fp, frames, metas, mtu=MTU, partial=None, **router):
    env = standard_env(fp)
    env.tr.set_router(outside_mtu=mtu, inside_mtu=0, outside_address=0,
                      inside_address=int.from_bytes(bytes(map(int, GW_IN.split("."))), "big"),
                      icmp_rate=100, **router)
    buf, offsets, lengths, guard = pack(frames)
    before = buf.copy()
    meta = np.concatenate(metas)
    v = np.zeros(len(frames), np.uint8)
    flags = np.array([1] * len(frames) if partial is None else partial, np.uint8)
    env.tr.translate(buf, offsets, lengths, OUT, 100, v, None, flags, meta)
    assert np.array_equal(buf[guard], before[guard])
    out = [buf[o:o + n].tobytes() for o, n in zip(offsets.tolist(), lengths.tolist())]
    ev = {k: n for k, n in env.tr.router_events_dict()["out"].items() if n}
    return out, [VERDICT_NAMES[x] for x in v], meta, env.tr.generated(), ev


def finished(frame: bytes, layer) -> Ether:
    """The frame with its checksum finished as the device would, parsed by scapy."""
    f = bytearray(frame)
    finish_checksum(f, 34, 16 if layer is TCP else 6)
    return Ether(bytes(f))


def test_a_super_frame_whose_segments_fit_goes_whole(fp):
    """40 KB of TCP in segments of 1200: fits a 1280 link (its length does not)."""
    f, m = super_frame(TCP, bytes(range(256)) * 160, gso=1200)
    (out,), v, meta, gen, ev = run(fp, [f], [m])
    assert v == ["translated"] and gen == [] and ev == {}
    assert int(meta["gso_size"][0]) == 1200
    p = finished(out, TCP)
    assert p[IP].src == E1 and p[TCP].sport == 40001
    assert checksums_right(p)


def test_a_df_super_frame_too_big_per_segment_is_answered_frag_needed(fp):
    """Segments of 1448 (TCP, DF) toward a 1280 link: ICMP fragmentation needed with
    the MTU back to the sender, the super-frame not sent (Linux's forwarding)."""
    f, m = super_frame(TCP, b"z" * 20000, gso=1448)
    (out,), v, meta, gen, ev = run(fp, [f], [m])
    assert v == ["frag_needed"] and ev == {"icmp_frag_needed": 1}
    (exit_, g), = gen
    icmp = Ether(g)
    assert icmp[IP].src == GW_IN and icmp[IP].dst == I1
    assert icmp[ICMP].type == 3 and icmp[ICMP].code == 4 and icmp[ICMP].nexthopmtu == MTU
    assert checksums_right(icmp)
    assert out == f  # not rewritten


def test_a_non_df_tcp_super_frame_gets_smaller_segments(fp):
    """TCP without DF: the byte stream may be cut smaller, so the gso_size is lowered to
    what fits (MTU - IP - TCP headers) and the super-frame goes on, still partial."""
    f, m = super_frame(TCP, b"q" * 9000, gso=1448, df=False)
    (out,), v, meta, gen, ev = run(fp, [f], [m])
    assert v == ["translated"] and gen == [] and ev == {"gso_resegmented": 1}
    assert int(meta["gso_size"][0]) == MTU - 20 - 20
    assert checksums_right(finished(out, TCP))


def test_a_tcp_super_frame_whose_headers_leave_no_room_is_dropped(fp):
    """60 bytes of IP options and 60 of TCP: toward a 68-byte link no segment can carry
    8 bytes of data, so the gso_size is not lowered (it would wrap): a named drop."""
    opts = IP(options=[IPOption_NOP()] * 40)  # 40 bytes of options: a 60-byte header
    f, m = super_frame(TCP, b"o" * 4000, gso=1000, df=False, ip_options=opts.options,
                       tcp_options=[("NOP", None)] * 40)
    (out,), v, meta, gen, ev = run(fp, [f], [m], mtu=68)
    assert v == ["drop_gso_too_big"] and int(meta["gso_size"][0]) == 1000 and ev == {}


@pytest.mark.parametrize("df, verdict", [(False, "drop_gso_too_big"), (True, "frag_needed")])
def test_a_udp_super_frame_too_big_per_segment(fp, df, verdict):
    """UDP segments are the application's datagrams: never re-cut, never sent larger
    than the MTU -- dropped by name (DF clear) or answered (DF)."""
    f, m = super_frame(UDP, b"u" * 8 * 1472, gso=1472, df=df)
    (out,), v, meta, gen, ev = run(fp, [f], [m])
    assert v == [verdict]
    assert int(meta["gso_size"][0]) == 1472
    assert len(gen) == (1 if df else 0)


def test_a_partial_frame_too_big_is_fragmented_with_its_checksum_finished(fp):
    """Not a super-frame but partial (checksum offload), DF clear, 1500 > 1280: cut in
    fragments, which leave without metadata -- so the checksum is finished first and
    the reassembled datagram is scapy's own translation."""
    payload = bytes(random.Random(5).randrange(256) for _ in range(1460))
    f, m = super_frame(UDP, payload, gso=0, df=False)
    (_,), v, meta, gen, ev = run(fp, [f], [m])
    assert v == ["fragmented"] and ev == {"fragments": 2}
    assert all(len(g) - 14 <= MTU for _, g in gen)
    whole = defragment([Ether(g)[IP] for _, g in gen])
    got = IP(raw(whole[0]))
    want = IP(src=E1, dst=R, ttl=63, id=9) / UDP(sport=40002, dport=53) / payload
    assert raw(got[UDP]) == raw(IP(raw(want))[UDP])


def test_a_partial_syn_gets_its_mss_clamped_and_stays_partial(fp):
    """With offloads on, Linux's SYNs are partial: the MSS option is clamped and the
    field (the pseudo-header sum, which covers no option) left alone."""
    ip = IP(src=I1, dst=R, ttl=64, flags="DF")
    f = bytearray(raw(eth() / ip / TCP(sport=1111, dport=80, flags="S", options=[("MSS", 1460)])))
    f[34 + 16:34 + 18] = pseudo_sum(bytes(f), 34).to_bytes(2, "big")
    m = np.zeros(1, META_DTYPE)
    m[0] = (VNET_F_NEEDS_CSUM, GSO_NONE, 0, 0, 34, 16)
    (out,), v, meta, gen, ev = run(fp, [bytes(f)], [m], mss_clamp=1300)
    assert v == ["translated"] and ev == {"mss_clamped": 1}
    p = finished(out, TCP)
    assert dict(p[TCP].options)["MSS"] == 1300
    assert checksums_right(p)


def test_meta_is_checked(fp):
    f, m = super_frame(TCP, b"x" * 100, gso=0)
    env = standard_env(fp)
    buf, offsets, lengths, _ = pack([f])
    v = np.zeros(1, np.uint8)
    with pytest.raises(ValueError, match="meta"):
        env.tr.translate(buf, offsets, lengths, OUT, 100, v, None, np.ones(1, np.uint8), np.zeros(5, np.uint8))


@pytest.mark.parametrize("seed", range(3))
def test_twins_agree_on_super_frames(seed):
    """Both twins, random super-frames (TCP / UDP, DF or not, gso sizes around the MTU,
    random gso types, SYNs while clamping) and MTUs: the same verdicts, bytes, meta
    records, generated frames and router events."""
    rng = random.Random(seed)
    frames, metas = [], []
    for _ in range(60):
        layer = rng.choice((TCP, UDP))
        f, m = super_frame(layer, bytes(rng.randrange(256) for _ in range(rng.choice((40, 1300, 3000, 9000)))),
                           gso=rng.choice((0, 536, 1000, 1240, 1260, 1448, 1472)), df=rng.random() < 0.5,
                           flags=rng.choice(("A", "PA", "S")))
        if rng.random() < 0.1:
            m["gso_type"] = rng.choice((GSO_TCPV4, GSO_UDP_L4, 3))
        frames.append(f)
        metas.append(m)
    mtu = rng.choice((576, 1280, 1500))
    # a super-frame is partial (the ring drops any other); one that is not is not one
    partial = [(int(m["gso_type"][0]) != 0 and rng.random() < 0.9) or rng.getrandbits(1) for m in metas]
    res = [run(importlib.import_module(n), frames, [m.copy() for m in metas], mtu=mtu, partial=partial,
               mss_clamp=1200)
           for n in ("hypernat._fastpath", "hypernat.fastpath_py")]
    (oa, va, ma, ga, ea), (ob, vb, mb, gb, eb) = res
    assert va == vb and ea == eb
    assert oa == ob and ga == gb
    assert ma.tobytes() == mb.tobytes()
    assert set(va) >= {"translated"}


def test_gso_event_and_verdict_declared_once():
    assert "gso_resegmented" in ROUTER_EVENT_NAMES and "drop_gso_too_big" in VERDICT_NAMES
