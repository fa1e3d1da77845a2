"""A transmit ring recovers from back-pressure by itself.

    [ns hn-txring<pid>-bp]
    src ══ fin ─► loop ─► fout ══ dst       loop: the lab's no-op forwarder, or a NIC
    (generator)   (inside port)  (outside port)   (receiver)      worker (standalone NAT)

The receiver's side is held back (``dst`` down: the carrier of ``fout`` is off), so the
device refuses every frame the forwarder sends: ``tpacket_snd`` answers ENOBUFS and
leaves each frame in the ring as SEND_REQUEST (AF_XDP: ``fout`` down, ENETDOWN, the
descriptors stay in the TX ring).  The ring fills; later frames are dropped and
counted.  Then the link comes back and NO new frame is sent: the loop's normal turns alone must deliver
every frame the ring held, in order, and forward new frames again.

(Other ways a veth refuses here, looked at: the receiving CPU's backlog over
``net.core.netdev_max_backlog`` — the hang the benchmark hit, but a global sysctl a test
on a shared host must not lower, and timing-dependent otherwise; a stopped TX queue —
veth's NAPI ring, not reachable from user space; a qdisc with a tiny limit with qdisc
bypass off — refuses only while our own frames sit in it, so the ring always frees
slots and never stalls.  The carrier going off takes the same ENOBUFS path in the
kernel, deterministically.)

Before the fix the port kicked the kernel only when a send queued something: once the
ring held nothing but refused frames nothing was queued, so nothing was ever kicked.
"""
import os
import threading
import time

import numpy as np
import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from hypernat.io.base import TX_COUNTERS, Batch
from hypernat.l2 import mac_str
from hypernat.lab import netns
from hypernat.lab.emulated import emulated_config
from hypernat.lab.noop import NoopForwarder
from hypernat.nic.worker import NicWorker
from hypernat.verdicts import OUT, VERDICT
from vethkit import veth_namespace

pytestmark = pytest.mark.netns
packet_mmap = pytest.importorskip("hypernat.io.packet_mmap")
MACS = {"src": "02:00:00:00:01:01", "fin": "02:00:00:00:01:02", "fout": "02:00:00:00:01:03",
        "dst": "02:00:00:00:01:04"}
DPORT = 4789


def _xdp_available():
    try:
        import hypernat.io.af_xdp  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture
def ns():
    with veth_namespace(f"hn-txring{os.getpid()}-bp", [("src", "fin"), ("fout", "dst")], macs=MACS, offloads=False,
                        ipv6=False) as name:
        yield name


def _frames(seqs):
    return [bytes(Ether(src=MACS["src"], dst=MACS["fin"]) / IP(src="10.0.0.1", dst="198.51.100.1") /
                  UDP(sport=1000, dport=DPORT) / seq.to_bytes(4, "big")) for seq in seqs]


def _seq(frame: bytes):
    """The sequence number of one of our frames (None for anything else)."""
    if len(frame) < 46 or frame[12:14] != b"\x08\x00" or frame[23] != 17 or frame[36:38] != DPORT.to_bytes(2, "big"):
        return None
    return int.from_bytes(frame[42:46], "big")


class Receiver:
    """Collects the sequence numbers arriving at `port` (polled by the test)."""

    def __init__(self, port):
        self.port, self.got = port, []

    def collect(self, want: int, timeout: float) -> list:
        """Poll until `want` of our frames arrived in all or `timeout` passed."""
        end = time.monotonic() + timeout
        while len(self.got) < want and time.monotonic() < end:
            b = self.port.recv(256)
            if b is None:
                time.sleep(0.002)
                continue
            try:
                self.got += [s for s in map(_seq, b.frames()) if s is not None]
            finally:
                self.port.release(b)
        return self.got


def _open(ns, backend):
    """(generator, forwarder inside, forwarder outside, receiver) ports; the outside
    port's transmit ring is small so that it fills quickly."""
    opened = []
    try:
        with netns.entered(ns):
            opened.append(packet_mmap.PacketMmapPort("src", rx=False))
            if backend == "af_xdp":
                from hypernat.io.af_xdp import AfXdpPort

                opened.append(AfXdpPort("fin", frames=512, ring_size=128))
                opened.append(AfXdpPort("fout", frames=512, ring_size=64))
            else:
                opened.append(packet_mmap.PacketMmapPort("fin"))
                opened.append(packet_mmap.PacketMmapPort("fout", tx_frames=64, qdisc_bypass=True))
            opened.append(packet_mmap.PacketMmapPort("dst", tx=False))
    except BaseException:
        for p in opened:
            p.close()
        raise
    return opened


def _wait(cond, timeout: float, what: str):
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.005)


XDP = pytest.mark.skipif(not _xdp_available(), reason="hypernat.io._xsk not built")


def _mac(name):
    return bytes.fromhex(MACS[name].replace(":", ""))


class _Noop:
    """The lab's no-op forwarder as the loop."""

    def __init__(self, fin, fout, tmp_path):
        self.f = NoopForwarder(fin, fout, _mac("src"), _mac("dst"))
        self.run, self.stop = self.f.run, self.f.stop

    def out(self):
        """(frames queued toward fout, frames dropped there)"""
        return self.f.counters["out_frames"], self.f.counters["out_tx_dropped"]

    def waiting(self):
        return self.f.tx_waiting


class _Nic:
    """A NIC worker (standalone: its own mappings, no coordinator) as the loop: the
    daemon's own transmit path."""

    def __init__(self, fin, fout, tmp_path):
        cfg = emulated_config(1, state_dir=str(tmp_path))
        self.w = NicWorker(cfg, 0, fin, fout, standalone=True, state_dir=str(tmp_path / "nic0"))
        self.w.set_l2(fin.mac(), _mac("src"), fout.mac(), _mac("dst"))
        self.run, self.stop = self.w.run, self.w.stop

    def out(self):
        sent = int(self.w.translator.counters[OUT, VERDICT["translated"]])
        dropped = self.w.counters["tx_drops"]
        return sent - dropped, dropped

    def waiting(self):
        return self.w._tx_waiting


# How the device is made to refuse: PACKET_MMAP, the peer `dst` down (carrier off:
# ENOBUFS, the frame put back to SEND_REQUEST); AF_XDP, `fout` itself down (ENETDOWN,
# the descriptors stay in the TX ring; with the carrier off instead the kernel
# completes each refused descriptor unsent: lost, counted, no stall possible).
@pytest.mark.parametrize("loop,backend,held", [(_Noop, "packet_mmap", "dst"),
                                               pytest.param(_Noop, "af_xdp", "fout", marks=XDP),
                                               (_Nic, "packet_mmap", "dst")], ids=["noop-packet_mmap",
                                                                                  "noop-af_xdp", "nic-packet_mmap"])
def test_forwarding_resumes_by_itself_after_the_device_refused_frames(ns, tmp_path, loop, backend, held):
    gen, fin, fout, dst = _open(ns, backend)
    fwd = loop(fin, fout, tmp_path)
    rcv = Receiver(dst)
    th = threading.Thread(target=fwd.run, args=(60.0,), daemon=True)
    th.start()
    try:
        def push(seqs):
            b = Batch.from_frames(_frames(seqs))
            for i in range(0, b.n, 32):  # batches the forwarder's rx ring takes in its stride
                assert gen.send(b, np.arange(i, min(i + 32, b.n))) == min(32, b.n - i)
                time.sleep(0.002)

        # 1. the path works
        push(range(10))
        assert rcv.collect(10, 5.0) == list(range(10))
        # 2. the receiver is held back: every frame sent toward it is refused
        netns.run(ns, ["ip", "link", "set", "dev", held, "down"])
        n_held = 400
        push(range(100, 100 + n_held))
        _wait(lambda: sum(fwd.out()) >= 10 + n_held, 10.0, "the loop to take every frame in")
        queued = fwd.out()[0] - 10  # frames the loop put in the transmit ring
        st = fout.stats()
        assert 0 < queued < n_held, f"the ring should fill: {queued} of {n_held} queued ({st})"
        assert fwd.out()[1] == n_held - queued
        assert st["tx_ring_full"] + st.get("tx_no_frame", 0) == n_held - queued
        assert st["tx_refused"] >= 1, st
        time.sleep(0.2)
        assert rcv.got == list(range(10))  # nothing got through meanwhile
        # 3. the receiver is back; nothing new is sent: the frames the ring held leave
        #    on the loop's turns alone, in order.  The loop pauses while the link comes
        #    up: `ip link set up` turns the carrier on (veth_open) before the NETDEV_UP
        #    notifier re-binds the receiver's packet socket to `dst`, and a frame the
        #    loop's retry sends in between is delivered to a device nobody listens on
        #    (one frame lost now and then, the kernel's race, not the ring's).  Both
        #    happen inside the one netlink call, so once it returned the receiver listens.
        fwd.stop()
        th.join(5.0)
        assert not th.is_alive(), "the loop did not pause"
        netns.run(ns, ["ip", "link", "set", "dev", held, "up"])
        th = threading.Thread(target=fwd.run, args=(60.0,), daemon=True)
        th.start()
        got = rcv.collect(10 + queued, 5.0)
        assert got == list(range(10)) + list(range(100, 100 + queued)), (
            f"{len(got) - 10} of the {queued} frames held in the transmit ring arrived; {fout.stats()}")
        # 4. and new frames are forwarded again
        push(range(1000, 1050))
        got = rcv.collect(10 + queued + 50, 5.0)
        assert got[10 + queued:] == list(range(1000, 1050)), fout.stats()
        _wait(lambda: fwd.waiting() == 0, 2.0, "the transmit rings to empty")
    finally:
        fwd.stop()
        th.join(5.0)
        alive = th.is_alive()
        if isinstance(fwd, _Nic) and not alive:
            fwd.w.close()
        for p in (gen, fin, fout, dst):
            p.close()
    assert not alive, "the loop did not stop"


@pytest.mark.parametrize("backend", ["packet_mmap", pytest.param("af_xdp", marks=XDP)])
def test_every_ring_backend_reports_the_declared_tx_counters(ns, backend):
    ports = _open(ns, backend)
    try:
        for p in ports[:3]:  # the ones that transmit
            assert set(TX_COUNTERS) <= set(p.stats()), f"{p.name}: {sorted(set(TX_COUNTERS) - set(p.stats()))}"
            assert p.flush() == 0  # nothing queued: nothing to kick
            assert p.stats()["tx_kicks"] == 0
    finally:
        for p in ports:
            p.close()
