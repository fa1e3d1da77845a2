"""Frames the gateway makes itself: ICMP time exceeded, ICMP fragmentation needed, and
fragments of frames longer than the egress MTU (issue 13 item 2), in both twins.

    frame ──► translate ──► verdict ttl_exceeded / frag_needed / fragmented
                    └──► output area: (exit direction, frame) ══ scapy builds the same

scapy is the oracle: an expected ICMP error is built by scapy from the frame as it was
received (scapy computes both checksums); fragments are reassembled by scapy's
``defragment`` and compared with the translated frame scapy expects.
"""
import pytest
from scapy.all import (ICMP, IP, TCP, UDP, Dot1Q, Ether, IPerror, IPOption_RR, IPOption_Router_Alert, Raw, defragment,
                       fragment, raw)

from fixtures.fastpath_oracle import (E1, E2, I1, I2, MAC_A, MAC_B, R, A, eth, expected, run_frames, standard_env,
                                     with_mss)
from hypernat.verdicts import IN, OUT, ROUTER_EVENT_NAMES, VERDICT, VERDICT_NAMES

GW_IN = "10.0.255.254"  # the gateway's inside address (ICMP toward the VPC)
GW_OUT = E2  # a pool address (ICMP toward the Internet)


def router_env(fp, rate=100, **kw):
    env = standard_env(fp)
    settings = dict(outside_mtu=1280, inside_mtu=1400, outside_address=A(GW_OUT), inside_address=A(GW_IN),
                    icmp_rate=rate)
    settings.update(kw)
    env.tr.set_router(**settings)
    return env


def events(env, direction):
    d = env.tr.router_events_dict()["out" if direction == OUT else "in"]
    return {k: v for k, v in d.items() if v}


def icmp_expected(frame: bytes, src: str, itype: int, code: int, mtu=0, ip_id=0) -> bytes:
    """scapy's ICMP error about `frame`: back to its sender with the MACs swapped,
    quoting the IP datagram up to 576 bytes in all."""
    e = Ether(frame)
    ip = e[IP]
    quote = raw(ip)[: ip.len][: 576 - 28]
    l2 = Ether(src=e.dst, dst=e.src)
    if Dot1Q in e:
        l2 = l2 / Dot1Q(vlan=e[Dot1Q].vlan, prio=e[Dot1Q].prio, dei=e[Dot1Q].dei)
    icmp = ICMP(type=itype, code=code, nexthopmtu=mtu) if itype == 3 else ICMP(type=itype, code=code)
    return raw(l2 / IP(src=src, dst=ip.src, ttl=64, tos=0xC0, id=ip_id, flags=0) / icmp / Raw(quote))


@pytest.mark.parametrize("vlan", [None, 42])
@pytest.mark.parametrize("ttl", [0, 1])
def test_time_exceeded_outgoing(fp, vlan, ttl):
    env = router_env(fp)
    f = raw(eth(vlan) / IP(src=I1, dst=R, ttl=ttl, id=4242) / TCP(sport=1111, dport=80, flags="S") / (b"p" * 30))
    before = env.out.get(6, A(I1), 1111, A(R), 80)
    out, v, k = env.run([f], OUT)
    assert v[0] == VERDICT["ttl_exceeded"] and out[0] == f
    assert env.out.get(6, A(I1), 1111, A(R), 80).tobytes() == before.tobytes()  # no refresh
    gen = env.tr.generated()
    assert gen == [(IN, icmp_expected(f, GW_IN, 11, 0))]
    assert events(env, OUT) == {"icmp_time_exceeded": 1}
    assert Ether(gen[0][1])[ICMP].type == 11 and Ether(gen[0][1])[IP].dst == I1


def test_time_exceeded_incoming_quotes_the_untranslated_packet(fp):
    """Inbound: the quote is what the remote sent (to the external endpoint), and the
    error comes from a pool address (not from an internal one)."""
    env = router_env(fp)
    f = raw(eth() / IP(src=R, dst=E1, ttl=1) / UDP(sport=53, dport=40002) / b"answer")
    out, v, _ = env.run([f], IN)
    assert v[0] == VERDICT["ttl_exceeded"] and out[0] == f
    (exit_, g), = env.tr.generated()
    assert exit_ == OUT and g == icmp_expected(f, GW_OUT, 11, 0)
    q = Ether(g)[ICMP].payload
    assert IP(raw(q)).dst == E1 and IP(raw(q)).src == R
    assert events(env, IN) == {"icmp_time_exceeded": 1}


def test_quote_is_cut_at_576_bytes(fp):
    env = router_env(fp)
    f = raw(eth() / IP(src=I1, dst=R, ttl=1) / UDP(sport=2222, dport=53) / (b"x" * 1000))
    env.run([f], OUT)
    (_, g), = env.tr.generated()
    assert len(g) - 14 == 576 and g == icmp_expected(f, GW_IN, 11, 0)


def test_quote_fits_the_link_it_leaves_by(fp):
    env = router_env(fp, inside_mtu=200)
    f = raw(eth() / IP(src=I1, dst=R, ttl=1) / UDP(sport=2222, dport=53) / (b"x" * 1000))
    env.run([f], OUT)
    (_, g), = env.tr.generated()
    assert len(g) - 14 == 200
    assert g[14 + 28 :] == raw(Ether(f)[IP])[:172]
    icmp = Ether(g)[ICMP]
    stored = icmp.chksum
    icmp.chksum = None
    assert ICMP(raw(icmp)).chksum == stored  # scapy computes the same checksum


def test_frag_needed_for_df_too_big(fp):
    env = router_env(fp)
    f = raw(eth() / IP(src=I1, dst=R, flags="DF") / TCP(sport=1111, dport=80, flags="A") / (b"d" * 1400))
    assert len(f) - 14 == 1440 > 1280
    before = env.out.get(6, A(I1), 1111, A(R), 80)
    out, v, k = env.run([f], OUT)
    assert v[0] == VERDICT["frag_needed"] and out[0] == f
    assert env.out.get(6, A(I1), 1111, A(R), 80).tobytes() == before.tobytes()
    (exit_, g), = env.tr.generated()
    assert exit_ == IN and g == icmp_expected(f, GW_IN, 3, 4, mtu=1280)
    assert Ether(g)[ICMP].nexthopmtu == 1280
    assert events(env, OUT) == {"icmp_frag_needed": 1}
    # exactly at the MTU: forwarded
    f2 = raw(eth() / IP(src=I1, dst=R, flags="DF") / TCP(sport=1111, dport=80, flags="A") / (b"d" * 1240))
    out, v, _ = env.run([f2], OUT)
    assert v[0] == VERDICT["translated"] and env.tr.generated() == []


def test_frag_needed_incoming_and_hairpin_use_the_inside_mtu(fp):
    env = router_env(fp)
    f = raw(eth() / IP(src=R, dst=E1, flags="DF") / UDP(sport=53, dport=40002) / (b"a" * 1400))  # 1428 > 1400
    _, v, _ = env.run([f], IN)
    assert v[0] == VERDICT["frag_needed"]
    assert env.tr.generated() == [(OUT, icmp_expected(f, GW_OUT, 3, 4, mtu=1400))]
    # a hairpin goes back inside: measured against the inside MTU (1400), not the
    # outside's (1280)
    h = raw(eth() / IP(src=I1, dst=E2, flags="DF") / TCP(sport=5555, dport=6666, flags="A") / (b"h" * 1260))
    _, v, _ = env.run([h], OUT)
    assert v[0] == VERDICT["hairpin"]
    h2 = raw(eth() / IP(src=I1, dst=E2, flags="DF") / TCP(sport=5555, dport=6666, flags="A") / (b"h" * 1400))
    _, v, _ = env.run([h2], OUT)
    assert v[0] == VERDICT["frag_needed"]
    assert env.tr.generated() == [(IN, icmp_expected(h2, GW_IN, 3, 4, mtu=1400, ip_id=1))]


@pytest.mark.parametrize("opts", [[], [IPOption_Router_Alert()], [IPOption_RR(routers=["1.2.3.4"])]])
@pytest.mark.parametrize("size", [1281, 1500, 4000])
def test_fragmented_non_df(fp, opts, size):
    env = router_env(fp)
    pkt = eth() / IP(src=I1, dst=R, id=999, options=opts) / UDP(sport=2222, dport=53)
    f = raw(pkt / (bytes(range(256)) * 20)[: size - len(raw(pkt)) + 14])
    assert len(f) - 14 == size
    out, v, _ = env.run([f], OUT)
    assert v[0] == VERDICT["fragmented"]
    want = expected(f, src=E1, sport=40002)
    assert out[0] == want  # translated in place first
    gen = env.tr.generated()
    assert {x for x, _ in gen} == {OUT}
    frags = [Ether(g) for _, g in gen]
    ihl = Ether(f)[IP].ihl * 4
    for i, fr in enumerate(frags):
        assert len(raw(fr[IP])) <= 1280 and fr[IP].len == len(raw(fr[IP]))
        assert fr[IP].chksum == IP(raw(fr[IP].copy().__class__(raw(fr[IP])))).chksum
        re = fr[IP].copy()
        del re.chksum
        assert raw(IP(raw(re)))[:ihl] == raw(fr[IP])[:ihl], "header checksum as scapy computes it"
        assert fr[IP].flags.MF == (i < len(frags) - 1) and fr.dst == Ether(want).dst
        assert fr[IP].ihl * 4 == ihl
        if opts and isinstance(opts[0], IPOption_RR) and i:
            n = len(raw(opts[0]))
            assert raw(fr[IP])[20:ihl] == b"\x01" * n + b"\x00" * (ihl - 20 - n), "record route: not copied"
        elif opts:
            assert raw(fr[IP])[20:ihl] == raw(Ether(want)[IP])[20:ihl]
    assert len(frags) == -(-(size - ihl) // ((1280 - ihl) // 8 * 8))
    if not opts:  # scapy cuts the same fragments
        e = Ether(want)
        assert [g for _, g in gen] == [raw(Ether(src=e.src, dst=e.dst) / x) for x in fragment(e[IP], 1280 - 20)]
    whole = defragment([fr[IP] for fr in frags])
    assert len(whole) == 1
    w = Ether(want)[IP]
    assert raw(whole[0])[ihl:] == raw(w)[ihl:]
    assert events(env, OUT) == {"fragments": len(frags)}


def test_fragmented_icmp_error_and_translated_twice(fp):
    """An ICMP error that is translated and too long is fragmented like any frame."""
    env = router_env(fp, inside_mtu=576)
    inner = raw(IP(src=E1, dst=R) / UDP(sport=40002, dport=53) / (b"q" * 800))
    f = raw(eth() / IP(src=R, dst=E1) / ICMP(type=3, code=3) / Raw(inner))
    out, v, _ = env.run([f], IN)
    assert v[0] == VERDICT["fragmented"]
    whole = defragment([Ether(g)[IP] for _, g in env.tr.generated()])
    e = Ether(out[0])[IP]
    assert raw(whole[0])[20:] == raw(e)[20:]
    assert IP(raw(whole[0]))[IPerror].src == I1


def test_rate_limit_token_bucket(fp):
    env = router_env(fp, rate=2)
    frames = [raw(eth() / IP(src=I1, dst=R, ttl=1, id=i) / UDP(sport=2222, dport=53)) for i in range(5)]
    _, v, _ = env.run(frames, OUT, now=100)
    assert list(v) == [VERDICT["ttl_exceeded"]] * 5
    gen = env.tr.generated()
    assert len(gen) == 2 and [Ether(g)[IP].id for _, g in gen] == [0, 1]
    assert events(env, OUT) == {"icmp_time_exceeded": 2, "icmp_rate_limited": 3}
    env.run(frames, OUT, now=100)
    assert env.tr.generated() == []
    env.run(frames, OUT, now=101)
    assert len(env.tr.generated()) == 2
    env.run(frames, OUT, now=105)  # refilled to the bucket's size, not beyond
    assert len(env.tr.generated()) == 2
    assert events(env, OUT) == {"icmp_time_exceeded": 6, "icmp_rate_limited": 14}


def test_rate_limit_bucket_survives_a_reload_unless_its_rate_changes(fp):
    """A live reload sets the router again (NicWorker.reload -> set_links -> set_router):
    with the same icmp_rate the bucket keeps its tokens (a reload, or a SIGHUP loop, must
    not let a burst of ICMP errors out); a new rate starts a full bucket of the new size.
    Failed before: set_router always refilled the bucket."""
    env = router_env(fp, rate=2)
    frames = [raw(eth() / IP(src=I1, dst=R, ttl=1, id=i) / UDP(sport=2222, dport=53)) for i in range(3)]
    env.run(frames, OUT, now=100)
    assert len(env.tr.generated()) == 2  # the bucket is empty now
    settings = env.tr.router
    env.tr.set_router(**settings)  # a reload that changes nothing here
    env.run(frames, OUT, now=100)
    assert env.tr.generated() == []
    env.tr.set_router(**dict(settings, outside_mtu=1400))  # another setting changes, not the rate
    env.run(frames, OUT, now=100)
    assert env.tr.generated() == []
    env.tr.set_router(**dict(settings, icmp_rate=3))  # a new rate: a full bucket of its size
    env.run(frames, OUT, now=100)
    assert len(env.tr.generated()) == 3
    assert events(env, OUT) == {"icmp_time_exceeded": 5, "icmp_rate_limited": 7}


def test_rate_zero_and_no_address_send_nothing(fp):
    f = raw(eth() / IP(src=I1, dst=R, ttl=1) / UDP(sport=2222, dport=53))
    env = router_env(fp, rate=0)
    env.run([f], OUT)
    assert env.tr.generated() == [] and events(env, OUT) == {"icmp_rate_limited": 1}
    env = router_env(fp, inside_address=0)
    env.run([f], OUT)
    assert env.tr.generated() == [] and events(env, OUT) == {"icmp_suppressed": 1}
    env = standard_env(fp)  # never configured: the old behaviour, counted
    _, v, _ = env.run([f], OUT)
    assert v[0] == VERDICT["ttl_exceeded"] and env.tr.generated() == []


@pytest.mark.parametrize("make", [
    lambda: eth() / IP(src=I1, dst=R, ttl=1) / ICMP(type=3, code=1) / raw(IP(src=R, dst=I1) / UDP()),
    lambda: eth() / IP(src=I1, dst=R, ttl=1) / ICMP(type=11) / raw(IP(src=R, dst=I1) / UDP()),
    lambda: eth() / IP(src="0.0.0.0", dst=R, ttl=1) / UDP(sport=2222, dport=53),
    lambda: eth() / IP(src="127.0.0.1", dst=R, ttl=1) / UDP(sport=2222, dport=53),
    lambda: eth() / IP(src="224.0.0.5", dst=R, ttl=1) / UDP(sport=2222, dport=53),
    lambda: eth() / IP(src=I1, dst="239.1.1.1", ttl=1) / UDP(sport=2222, dport=53),
    lambda: eth() / IP(src=I1, dst="255.255.255.255", ttl=1) / UDP(sport=2222, dport=53),
    lambda: Ether(src=MAC_A, dst="ff:ff:ff:ff:ff:ff") / IP(src=I1, dst=R, ttl=1) / UDP(sport=2222, dport=53),
    lambda: eth() / IP(src=I1, dst=R, flags="DF") / ICMP(type=3, code=3) / raw(IP(src=R, dst=I1) / UDP() / (b"z" * 1400)),
], ids=["icmp-unreach", "icmp-timex", "src-zero", "src-loopback", "src-multicast", "dst-multicast",
        "dst-broadcast", "mac-broadcast", "df-icmp-error"])
def test_no_icmp_error_about(fp, make):
    """RFC 1812 4.3.2.7: none about ICMP errors, broadcasts, multicasts, bad sources."""
    env = router_env(fp)
    f = raw(make())
    out, v, _ = env.run([f], OUT)
    assert v[0] in (VERDICT["ttl_exceeded"], VERDICT["frag_needed"]) and out[0] == f
    assert env.tr.generated() == [] and events(env, OUT) == {"icmp_suppressed": 1}


def test_echo_request_with_ttl_one_is_answered(fp):
    env = router_env(fp)
    f = raw(eth() / IP(src=I1, dst=R, ttl=1) / ICMP(type=8, id=7, seq=3) / b"tracert")
    env.run([f], OUT)
    assert env.tr.generated() == [(IN, icmp_expected(f, GW_IN, 11, 0))]


def test_output_area_full(fp):
    out_t, in_t = fp.FlowTable(64, hugepages=False), fp.FlowTable(64, hugepages=False)
    tr = fp.Translator(out_t, in_t, output_bytes=8192, output_frames=64)
    tr.set_router(outside_mtu=576, inside_mtu=576, inside_address=A(GW_IN), outside_address=A(GW_OUT), icmp_rate=1000)
    out_t.insert(17, A(I1), 2222, A(R), 53, A(E1), 40002)
    big = raw(eth() / IP(src=I1, dst=R) / UDP(sport=2222, dport=53) / (b"b" * 6000))
    ttl = raw(eth() / IP(src=I1, dst=R, ttl=1) / UDP(sport=2222, dport=53) / (b"t" * 500))
    frames, verdicts, _ = run_frames(tr, [ttl] * 7 + [big], OUT)
    ev = tr.router_events_dict()["out"]
    assert ev["icmp_time_exceeded"] == 7 and ev["output_full"] == 1
    assert verdicts[-1] == VERDICT["output_full"]
    assert tr.out_count == 7 and sum(len(g) for _, g in tr.generated()) == 7 * 570
    frames, verdicts, _ = run_frames(tr, [big], OUT)  # alone: room again (emptied per call)
    assert verdicts[0] == VERDICT["fragmented"] and tr.out_count == 11


def test_set_router_validates(fp):
    env = standard_env(fp)
    for bad in (dict(outside_mtu=67), dict(inside_mtu=70000), dict(inside_address=-1), dict(icmp_rate=-1),
                dict(mss_clamp=70000)):
        with pytest.raises(ValueError):
            env.tr.set_router(**bad)
    with pytest.raises(TypeError):
        env.tr.set_router(mtu=1500)
    env.tr.set_router(outside_mtu=68, mss_clamp=536)
    assert env.tr.router["outside_mtu"] == 68 and env.tr.router["inside_mtu"] == 0
    with pytest.raises(ValueError):
        fp.Translator(env.out, env.inn, output_bytes=10)
    assert set(env.tr.router_events_dict()["out"]) == set(ROUTER_EVENT_NAMES)


# ---------------------------------------------------------------------------------------
# The table frozen into tests/fixtures/fastpath_golden.json (tools/mkfixtures.py): one
# translator per row, with ROUTER_SETTINGS; everything expected is built by scapy.
# ---------------------------------------------------------------------------------------

ROUTER_SETTINGS = dict(outside_mtu=1280, inside_mtu=1400, outside_address=A(GW_OUT), inside_address=A(GW_IN),
                       icmp_rate=100, mss_clamp=1360)


def router_cases():
    """[(description, made_by, frame, direction, verdict, expected frame, [(exit, generated frame)])]."""
    mss = [("NOP", None), ("MSS", 1460), ("WScale", 7)]
    big = bytes(range(256)) * 6
    rows = []

    def icmp(desc, pkt, direction, verdict, itype, code, mtu=0):
        f = raw(pkt)
        back, src = (IN, GW_IN) if direction == OUT else (OUT, GW_OUT)
        rows.append((desc, f"scapy: icmp_expected(frame, {itype}, {code}, mtu={mtu})", f, direction, verdict, f,
                     [(back, icmp_expected(f, src, itype, code, mtu=mtu))]))

    icmp("ttl 1 out udp", eth() / IP(src=I1, dst=R, ttl=1) / UDP(sport=2222, dport=53) / b"q", OUT, "ttl_exceeded", 11, 0)
    icmp("ttl 0 out echo, vlan", eth(5) / IP(src=I1, dst=R, ttl=0) / ICMP(type=8, id=7) / b"p", OUT, "ttl_exceeded",
         11, 0)
    icmp("ttl 1 in tcp", eth() / IP(src=R, dst=E1, ttl=1) / TCP(sport=80, dport=40001, flags="A") / b"d", IN,
         "ttl_exceeded", 11, 0)
    icmp("ttl 1 out, 1000 bytes: quote cut", eth() / IP(src=I1, dst=R, ttl=1) / UDP(sport=2222, dport=53) / big[:1000],
         OUT, "ttl_exceeded", 11, 0)
    icmp("df over the outside mtu", eth() / IP(src=I1, dst=R, flags="DF") / TCP(sport=1111, dport=80, flags="A")
         / big[:1300], OUT, "frag_needed", 3, 4, 1280)
    icmp("df over the inside mtu", eth() / IP(src=R, dst=E1, flags="DF") / UDP(sport=53, dport=40002) / big[:1400],
         IN, "frag_needed", 3, 4, 1400)
    for desc, pkt, direction, rewrite in (
            ("syn out, mss 1460", eth() / IP(src=I1, dst=R) / TCP(sport=1111, dport=80, flags="S", options=mss), OUT,
             dict(src=E1, sport=40001)),
            ("syn-ack in, mss 1460", eth() / IP(src=R, dst=E1) / TCP(sport=80, dport=40001, flags="SA", options=mss),
             IN, dict(dst=I1, dport=1111))):
        f = raw(pkt)
        rows.append((desc, f"scapy: with_mss(expected(frame, **{rewrite}), 1360)", f, direction, "translated",
                     with_mss(expected(f, **rewrite), 1360), []))
    f = raw(eth() / IP(src=I1, dst=R, id=999) / UDP(sport=2222, dport=53) / big)
    e = Ether(expected(f, src=E1, sport=40002))
    rows.append(("over the outside mtu, no df: fragments", "scapy: fragment(expected(frame), 1260)", f, OUT,
                 "fragmented", raw(e), [(OUT, raw(Ether(src=e.src, dst=e.dst) / x)) for x in fragment(e[IP], 1260)]))
    return rows


def test_router_cases(fp):
    for desc, _, frame, direction, verdict, exp, gen in router_cases():
        env = standard_env(fp)
        env.tr.set_router(**ROUTER_SETTINGS)
        out, v, _ = env.run([frame], direction)
        assert VERDICT_NAMES[v[0]] == verdict, desc
        assert out[0] == exp, desc
        assert env.tr.generated() == gen, desc
