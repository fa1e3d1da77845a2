"""The replay: a frame whose miss became a session is translated again, and sent once.

The owner's own misses are translated again where they arrived (``Batch.select``: the
subset's offsets, lengths and metadata over the batch's buffer, sent from it); frames
that outlive their batch (queued behind a fetch) are copies.  Both rest on one fact,
checked first for both fast-path twins: a miss leaves the frame and its metadata as
they came (no rewrite, no MSS clamp, no gso_size lowered, no fragment made or held).
scapy is the oracle for every frame that leaves.
"""
import numpy as np
import pytest
from scapy.all import ICMP, IP, TCP, UDP, Ether, raw

from fixtures.fastpath_oracle import E1, I1, R, A, Env, eth, pack
from fixtures.partial import checksums_right, partial_frame, pseudo_sum
from hypernat.coord.broker import Coordinator
from hypernat.io.base import GSO_TCPV4, META_DTYPE, Batch, finish_checksum
from hypernat.io.memory import MemoryPort
from hypernat.lab.emulated import emulated_config
from hypernat.nic.worker import NicWorker, spin
from hypernat.verdicts import IN, MISS_VERDICTS, OUT, VERDICT_NAMES

pytestmark = pytest.mark.timeout(60)


# ------------------------------------------------------------------ a miss changes nothing


def test_a_miss_leaves_frame_and_metadata_untouched(fp):
    """Every kind of frame the router path would rewrite on a hit (a SYN to clamp, a
    datagram to fragment, a super-frame to re-cut, a first fragment, a hairpin, an ICMP
    error), as misses: verdict miss_*, bytes and metadata as they came, nothing made."""
    import importlib

    frag = importlib.import_module("hypernat._frag" if fp.__name__.endswith("_fastpath") else "hypernat.frag_py")
    env = Env(fp)
    env.tr = fp.Translator(env.out, env.inn, pool=[(A("100.64.0.0"), 24)], frag=frag.FragTable(64, 1 << 16, 30))
    env.tr.set_router(outside_mtu=576, inside_mtu=0, outside_address=A(E1), inside_address=A("10.0.0.254"),
                      icmp_rate=100, mss_clamp=1200)
    sup, sup_meta = partial_frame(eth() / IP(src=I1, dst=R, flags=0) / TCP(sport=7, dport=80, flags="A")
                                  / (b"s" * 3000), gso=1400)
    small, small_meta = partial_frame(eth() / IP(src=I1, dst=R) / UDP(sport=8, dport=53) / b"p")
    plain = [
        raw(eth() / IP(src=I1, dst=R) / UDP(sport=1, dport=53) / b"q"),
        raw(eth() / IP(src=I1, dst=R) / TCP(sport=2, dport=443, flags="S", options=[("MSS", 1460)])),
        raw(eth() / IP(src=I1, dst=R, flags=0) / UDP(sport=3, dport=53) / (b"d" * 1400)),
        raw(eth() / IP(src=I1, dst=R, flags="MF", id=77) / UDP(sport=4, dport=53, len=2008) / (b"f" * 600)),
        raw(eth() / IP(src=I1, dst="100.64.0.9") / UDP(sport=5, dport=6000) / b"h"),
    ]
    outs = {OUT: plain + [sup, small],
            IN: [raw(eth() / IP(src=R, dst=E1) / UDP(sport=53, dport=40009) / b"r"),
                 raw(eth() / IP(src="203.0.113.9", dst=E1) / ICMP(type=3, code=1)
                     / IP(src=E1, dst=R) / UDP(sport=40010, dport=53))]}
    for direction, frames in outs.items():
        buf, offsets, lengths, _ = pack(frames)
        before = buf.copy()
        n = len(frames)
        meta = np.zeros(n, META_DTYPE)
        partial = np.zeros(n, np.uint8)
        if direction == OUT:
            meta[n - 2], meta[n - 1] = sup_meta[0], small_meta[0]
            partial[n - 2:] = 1
        meta_before = meta.copy()
        v = np.zeros(n, np.uint8)
        env.tr.translate(buf, offsets, lengths, direction, 100, v, None, partial, meta)
        assert all(int(x) in MISS_VERDICTS for x in v), [VERDICT_NAMES[x] for x in v]
        assert np.array_equal(buf, before)
        assert meta.tobytes() == meta_before.tobytes()
        assert env.tr.generated() == []


# ------------------------------------------------------------------ partial checksums, super-frames


class MetaPort(MemoryPort):
    """A memory port that also keeps, per frame sent, its bytes as they lie in the batch
    (a partial checksum not finished) and its metadata record."""

    def __init__(self, name):
        super().__init__(name)
        self.raw = []

    def send(self, batch, idx):
        rec = batch.meta_records()
        for i in np.asarray(idx).tolist():
            o, n = int(batch.offsets[i]), int(batch.lengths[i])
            p = int(batch.partial[i]) if batch.partial is not None else 0
            self.raw.append((batch.buf[o:o + n].tobytes(), p, None if rec is None else rec[i].copy()))
        return super().send(batch, idx)


def test_first_packets_with_partial_checksums_replayed_in_place_keep_their_metadata(tmp_path):
    """First packets of three new connections in one batch read from a ring with
    PACKET_VNET_HDR: a TCP super-frame too big for the outside link (DF clear), a
    partial UDP frame, a complete one.  Replayed where they lie, they leave as a hit
    would: the super-frame whole with a lowered gso_size and its pseudo-header sum
    updated (main fragmented its finished copy), the partial frame finished by the
    port, every checksum what scapy computes."""
    import dataclasses

    cfg = emulated_config(1)
    cfg = dataclasses.replace(cfg, nics=(dataclasses.replace(cfg.nics[0], outside_mtu=1280),))
    inside, outside = MemoryPort("in0"), MetaPort("out0")
    w = NicWorker(cfg, 0, inside, outside, state_dir=str(tmp_path / "nic0"), standalone=True, journal=False)
    try:
        i1, r = "10.0.0.10", "192.0.2.5"
        sup, sup_meta = partial_frame(eth() / IP(src=i1, dst=r, flags=0, id=3)
                                      / TCP(sport=1000, dport=80, flags="A", seq=5) / (b"s" * 3000), gso=1400)
        small, small_meta = partial_frame(eth() / IP(src=i1, dst=r) / UDP(sport=1001, dport=53) / b"partial")
        whole = raw(eth() / IP(src=i1, dst=r) / UDP(sport=1002, dport=53) / b"complete")
        frames = [sup, small, whole]
        buf, offsets, lengths, _ = pack(frames)
        meta = np.concatenate([sup_meta, small_meta, np.zeros(1, META_DTYPE)]).view(np.uint8).copy()
        b = Batch(buf, offsets, lengths, 3, meta=meta, partial=np.array([1, 1, 0], np.uint8))
        w._process_batch(b, inside, OUT, outside)
        assert len(outside.raw) == 3 and w.counters["replayed"] == 3 and not w.counters["replay_miss"]
        [(f, p, m)] = [x for x in outside.raw if len(x[0]) == len(sup)]
        assert p == 1 and m["gso_type"] == GSO_TCPV4
        assert m["gso_size"] == 1280 - 40  # re-cut to fit the link, not fragmented
        l4 = 34
        assert int.from_bytes(f[l4 + 16:l4 + 18], "big") == pseudo_sum(f, l4)  # still partial, updated
        done = bytearray(f)
        finish_checksum(done, l4, 16)
        pkt = Ether(bytes(done))
        assert checksums_right(pkt) and cfg.in_pool(A(pkt[IP].src)) and pkt[IP].ttl == 63
        assert raw(pkt[TCP].payload) == b"s" * 3000
        sent = [Ether(x) for x in outside.take_tx()]
        for payload in (b"partial", b"complete"):
            [pkt] = [x for x in sent if UDP in x and raw(x[UDP].payload) == payload]
            assert checksums_right(pkt) and cfg.in_pool(A(pkt[IP].src)) and pkt[IP].dst == r
        assert w.counters_dict().get("fastpath_out_fragmented", 0) == 0
    finally:
        w.close()


# ------------------------------------------------------------------ a mixed batch, two NICs


@pytest.fixture
def nics(tmp_path):
    cfg = emulated_config(2, filtering="endpoint-independent")  # EIM: a host of NIC 1 is a fetch
    coord = Coordinator(cfg.coordinator.endpoint, n_nics=2, heartbeat_interval=0.2).start_thread()
    ws = []
    for k in range(2):
        inside, outside = MemoryPort(f"in{k}"), MemoryPort(f"out{k}")
        ws.append((NicWorker(cfg, k, inside, outside, state_dir=str(tmp_path / f"nic{k}")), inside, outside))
    assert spin([w for w, _, _ in ws], lambda: all(w.registered for w, _, _ in ws), 5)
    yield cfg, ws
    for w, _, _ in ws:
        w.close()
    coord.stop()
    coord.join(5)


def tagged(ports):
    """{payload tag: [parsed frames]} of everything the ports sent since the last call."""
    out = {}
    for p in ports:
        for f in p.take_tx():
            pkt = Ether(f)
            l4 = pkt[TCP] if TCP in pkt else pkt[UDP]
            out.setdefault(raw(l4.payload), []).append((p.name, pkt))
    return out


def test_mixed_batch_every_frame_leaves_once_translated(nics):
    """One batch each way on NIC 0 mixing hits, misses that become sessions here
    (several frames of one new connection among them), misses fetched from NIC 1, a
    hairpin, and drops: every frame that may leave does so exactly once, out of the
    right port, translated as its session says, with the checksums scapy computes;
    nothing dropped leaves."""
    cfg, ((w0, in0, out0), (w1, in1, out1)) = nics
    ws, ports = [w0, w1], [in0, out0, in1, out1]
    part = w0.partition
    h0 = next(a for a in range(A("10.0.0.10"), A("10.0.1.0")) if part.eim_owner(a) == 0)
    h1 = next(a for a in range(A("10.0.0.10"), A("10.0.1.0")) if part.eim_owner(a) == 1)
    S = lambda a: f"{a >> 24}.{a >> 16 & 255}.{a >> 8 & 255}.{a & 255}"  # noqa: E731
    r1, r2, r3 = "192.0.2.5", "192.0.2.6", "192.0.2.7"

    def udp(src, sport, dst, dport, tag):
        return raw(eth() / IP(src=src, dst=dst) / UDP(sport=sport, dport=dport) / tag)

    in0.inject([udp(S(h0), 1000, r1, 53, b"est")])
    assert spin(ws, lambda: len(out0._tx) == 1, 3)
    est = Ether(out0.take_tx()[0])
    e0, p0 = est[IP].src, est[UDP].sport

    batch_out = [
        udp(S(h0), 1000, r1, 53, b"hit-1"),
        udp(S(h0), 1001, r1, 53, b"new-a1"),
        udp(S(h1), 2000, r1, 53, b"fetch-1"),
        b"\xff" * 60,  # not IPv4: not_nat, dropped
        udp("172.16.0.1", 3000, r1, 53, b"drop-not-internal"),
        udp(S(h0), 1001, r1, 53, b"new-a2"),
        udp(S(h0), 1000, r1, 53, b"hit-2"),
        raw(eth() / IP(src=S(h0), dst=r2) / TCP(sport=1002, dport=80, flags="S") / b"new-b"),
        udp(S(h1), 2000, r1, 53, b"fetch-2"),
        udp(S(h0), 1003, e0, p0, b"hairpin"),
        udp(S(h0), 1001, r1, 53, b"new-a3"),
    ]
    in0.inject(batch_out)
    want_out = {b"hit-1", b"hit-2", b"new-a1", b"new-a2", b"new-a3", b"new-b", b"fetch-1", b"fetch-2"}
    got = {}

    def collect(want):
        for k, v in tagged(ports).items():
            got.setdefault(k, []).extend(v)
        return want <= set(got)

    assert spin(ws, lambda: collect(want_out | {b"hairpin"}), 5), sorted(got)
    spin(ws, lambda: collect({b"never"}), 0.3)  # anything sent twice would show now
    assert set(got) == want_out | {b"hairpin"}, sorted(got)
    assert all(len(v) == 1 for v in got.values()), {k: len(v) for k, v in got.items()}
    trans = {}
    for tag, [(port, pkt)] in got.items():
        assert checksums_right(pkt), tag
        assert pkt[IP].ttl == 63, tag
        l4 = pkt[TCP] if TCP in pkt else pkt[UDP]
        if tag == b"hairpin":
            assert port == "in0" and (pkt[IP].dst, l4.dport) == (S(h0), 1000)
            assert cfg.in_pool(A(pkt[IP].src))
            continue
        assert port == "out0" and cfg.in_pool(A(pkt[IP].src)), tag
        trans[tag] = (pkt[IP].src, l4.sport)
    assert trans[b"hit-1"] == trans[b"hit-2"] == (e0, p0)
    assert trans[b"new-a1"] == trans[b"new-a2"] == trans[b"new-a3"] != (e0, p0)
    assert trans[b"fetch-1"] == trans[b"fetch-2"]
    assert part.owner(A(trans[b"new-a1"][0]), trans[b"new-a1"][1]) == 0
    assert part.owner(A(trans[b"fetch-1"][0]), trans[b"fetch-1"][1]) == 1  # NIC 1's mapping, cloned here
    c = w0.counters_dict()
    assert c["rules_not_internal"] == 1 and c["fastpath_out_not_nat"] == 1
    assert c["loop_replay_miss"] == 0 and c["loop_slow_path_errors"] == 0

    # ... and the other way: replies (hits), new remotes to mapped endpoints (sessions
    # here, endpoint-independent filtering), a new remote to NIC 1's endpoint (a fetch),
    # and an unsolicited one (no mapping: dropped)
    ef, pf = trans[b"fetch-1"]
    ea, pa = trans[b"new-a1"]
    free = next(q for q in range(65535, 1024, -1)
                if part.owner(A(e0), q) == 0 and w0.rules.lookup_external(17, A(e0), q) is None)
    batch_in = [
        udp(r1, 53, e0, p0, b"reply-1"),
        udp(r3, 99, e0, p0, b"in-new-1"),
        udp(r3, 77, ef, pf, b"in-fetch"),
        udp(r3, 99, e0, p0, b"in-new-2"),
        udp(r1, 53, ea, pa, b"reply-2"),
        udp(r3, 5, e0, free, b"drop-unsolicited"),
        udp(r3, 5, e0, 1, b"drop-not-in-pool"),  # below the pool's ports
        udp(r3, 99, e0, p0, b"in-new-3"),
    ]
    got.clear()
    out0.inject(batch_in)
    want_in = {b"reply-1", b"reply-2", b"in-new-1", b"in-new-2", b"in-new-3", b"in-fetch"}
    assert spin(ws, lambda: collect(want_in), 5), sorted(got)
    spin(ws, lambda: collect({b"never"}), 0.3)
    assert set(got) == want_in and all(len(v) == 1 for v in got.values()), {k: len(v) for k, v in got.items()}
    expect = {b"reply-1": (r1, 53, S(h0), 1000), b"reply-2": (r1, 53, S(h0), 1001),
              b"in-new-1": (r3, 99, S(h0), 1000), b"in-new-2": (r3, 99, S(h0), 1000),
              b"in-new-3": (r3, 99, S(h0), 1000), b"in-fetch": (r3, 77, S(h1), 2000)}
    for tag, [(port, pkt)] in got.items():
        assert port == "in0" and checksums_right(pkt) and pkt[IP].ttl == 63, tag
        assert (pkt[IP].src, pkt[UDP].sport, pkt[IP].dst, pkt[UDP].dport) == expect[tag], tag
    c = w0.counters_dict()
    assert c["loop_replay_miss"] == 0 and c["loop_slow_path_errors"] == 0
    assert c["rules_not_in_pool"] == 1 and c.get("rules_no_mapping", 0) == 1


def test_batch_select_views_the_frames_and_gathers_their_metadata():
    frames = [bytes([i]) * (20 + i) for i in range(5)]
    b = Batch.from_frames(frames)
    b.partial = np.array([0, 1, 0, 1, 1], np.uint8)
    meta = np.zeros(5, META_DTYPE)
    meta["gso_size"] = [10, 11, 12, 13, 14]
    b.meta = meta.view(np.uint8).copy()
    s = b.select([3, 1])
    assert s.n == 2 and s.buf is b.buf and s.token is None
    assert [s.buf[o:o + n].tobytes() for o, n in zip(s.offsets.tolist(), s.lengths.tolist())] == [frames[3], frames[1]]
    assert s.partial.tolist() == [1, 1] and s.meta_records()["gso_size"].tolist() == [13, 11]
    s.buf[int(s.offsets[0])] = 0xEE  # the selection is the batch's own bytes
    assert b.frame(3)[0] == 0xEE
    empty = b.select([])
    assert empty.n == 0 and empty.frames() == []


@pytest.mark.parametrize("impl", ["compiled", "reference"])
def test_a_partial_checksum_queued_behind_a_fetch_is_finished_in_its_copy(impl):
    """A first packet read with PACKET_VNET_HDR whose checksum is partial, queued behind a
    fetch: ``Batch.frames_of`` hands the fetch table a copy finished the way
    ``Batch.frames`` finishes it (the batch's own bytes untouched, the other frames a view);
    the table's arena keeps it, and the answer replays it with a checksum scapy accepts."""
    from hypernat import layout
    from hypernat.agent import pending_py
    from hypernat.agent.core import fetch_rows_of
    from hypernat.io.base import Frames

    mod = pytest.importorskip("hypernat.agent._pending") if impl == "compiled" else pending_py
    small, small_meta = partial_frame(eth() / IP(src="10.0.0.10", dst="192.0.2.5") / UDP(sport=1001, dport=53)
                                      / b"partial")
    whole = raw(eth() / IP(src="10.0.0.10", dst="192.0.2.5") / UDP(sport=1002, dport=53) / b"complete")
    buf, offsets, lengths, _ = pack([whole, small])
    meta = np.concatenate([np.zeros(1, META_DTYPE), small_meta]).view(np.uint8).copy()
    b = Batch(buf, offsets, lengths, 2, meta=meta, partial=np.array([0, 1], np.uint8))
    before = b.buf.copy()
    view = b.frames_of(np.array([1, 0]))
    assert isinstance(view, Frames) and view.tolist() == b.frames([1, 0])
    assert (b.buf == before).all()  # finished in the copy only
    t = mod.PendingTable(16, 4, 0.05, 1e9, 1e9, 1.0, 10)
    fq = mod.FetchQueue()
    keys = np.zeros(2, layout.KEY_DTYPE)
    keys["proto"], keys["saddr"], keys["sport"] = 17, 7, [1, 2]
    assert t.fetch_rows(fetch_rows_of(0, keys, 1), view, 0.0, 1, fq)[:2] == (2, 2)
    b.buf[:] = 0  # the ring's frames reused
    got = t.pop_many([(0, (17, 7, 1, 0, 0)), (0, (17, 7, 2, 0, 0))])
    assert got.tolist() == [f for f in Frames.of(view.tolist()).tolist()]
    done = got.batch()
    pkt = Ether(done.frame(0))
    assert raw(pkt[UDP].payload) == b"partial" and checksums_right(pkt)
    assert done.frame(1) == whole


def test_replay_sends_tagged_frames_to_the_hairpin_replay_and_the_rest_as_one_batch():
    """The replay callback's frames (``Frames``): those tagged (hairpinned, the tag their
    decisions so far) go to ``_replay_hairpins`` with their tags, the others to one
    translation over the frames' buffer, each side in arrival order."""
    from hypernat.io.base import Frames

    class Stub:
        def __init__(self):
            self.calls = []

        def _replay_hairpins(self, frames):
            self.calls.append(("hairpin", frames.tolist(), frames.tag_list()))

        def _translate_again(self, direction, b):
            self.calls.append(("again", direction, [b.frame(i) for i in range(b.n)]))

    w = Stub()
    NicWorker._replay(w, IN, Frames.of([b"a", b"hp1", b"b", b"hp2"], [0, 2, 0, 1]))
    assert w.calls == [("hairpin", [b"hp1", b"hp2"], [2, 1]), ("again", IN, [b"a", b"b"])]
    w.calls.clear()
    NicWorker._replay(w, OUT, Frames.of([b"hp"], [3]))
    assert w.calls == [("hairpin", [b"hp"], [3])]
    w.calls.clear()
    NicWorker._replay(w, OUT, Frames.of([b"x", b"y"]))
    assert w.calls == [("again", OUT, [b"x", b"y"])]
