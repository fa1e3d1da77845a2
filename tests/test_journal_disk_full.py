"""A full disk under the block journal, for real: a tiny tmpfs mounted for the test.

While the journal cannot be written, no block that is not on disk already is handed
out (``journal_unavailable``, counted, logged once per interval), established flows keep
forwarding both ways, and once there is room again new hosts get blocks and a crash
restart still quarantines every block in use."""
import errno
import logging
import os
import subprocess

import pytest

from hypernat.io.memory import MemoryPort
from hypernat.lab.emulated import UDP, build_frame, emulated_config, parse_frame
from hypernat.nic import journal as J
from hypernat.nic.worker import NicWorker, spin

pytestmark = pytest.mark.timeout(60)

R1 = 0xC0000205  # 192.0.2.5


@pytest.fixture
def tiny_disk(tmp_path):
    d = tmp_path / "disk"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(d)], capture_output=True, text=True,
                       timeout=10)  # fmt: skip
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root): {r.stderr.strip()}")
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], capture_output=True, timeout=10)


def fill(d) -> str:
    """Write a file until the file system is full; its path."""
    p = os.path.join(d, "filler")
    fd = os.open(p, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        chunk = b"\0" * 4096
        while True:
            try:
                if os.write(fd, chunk) < len(chunk):
                    chunk = chunk[:1]
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                if len(chunk) == 1:
                    return p
                chunk = chunk[:1]
    finally:
        os.close(fd)


def test_full_disk_refuses_new_blocks_keeps_established_flows(tiny_disk, caplog):
    cfg = emulated_config(1)
    state = tiny_disk / "nic0"
    inside, outside = MemoryPort("in0"), MemoryPort("out0")
    w = NicWorker(cfg, 0, inside, outside, state_dir=str(state), standalone=True)
    host = 0x0A000100

    def refused():
        return w.rules.counters_dict().get("journal_unavailable", 0)

    def flow(h, sport=42000):
        """The frame translated (the parsed result), or None: refused."""
        r0 = refused()
        inside.inject([build_frame(UDP, h, sport, R1, 53, payload=b"q")])
        assert spin([w], lambda: len(outside._tx) >= 1 or refused() > r0, 3, poll_ms=0)
        got = outside.take_tx()
        return parse_frame(got[0]) if got else None

    est = flow(host)
    assert est is not None
    filler = fill(tiny_disk)
    reserved = len(w.rules.pool.reserved_ahead())
    c0 = w.counters_dict().get("rules_journal_unavailable", 0)
    with caplog.at_level(logging.ERROR, logger="hypernat.rules"):
        got = [flow(0x0A000200 + k) for k in range(reserved + 60)]
    served = [p for p in got if p is not None]
    # blocks journaled before the disk filled (and the few records the log's last page
    # still took) are used; no other: every block handed out is on disk
    assert reserved <= len(served) and len(got) - len(served) >= 10
    blocks = {w.partition.block_of(p.src, p.sport) for p in served}
    on_disk = J.Journal(str(state / "blocks.journal")).blocks()
    assert blocks <= on_disk
    c = w.counters_dict()
    assert c["rules_journal_unavailable"] - c0 == len(got) - len(served)
    assert c["rules_journal_errors"] >= 1
    lines = [r for r in caplog.records if "block journal write failed" in r.getMessage()]
    assert len(lines) == 1  # once per interval (10 s), not once per refusal
    # the established flow goes on, both ways
    for k in range(5):
        p = flow(host)
        assert (p.src, p.sport) == (est.src, est.sport)
        outside.inject([build_frame(UDP, R1, 53, est.src, est.sport, payload=b"a")])
        assert spin([w], lambda: len(inside._tx) == 1, 2, poll_ms=0)
        back = parse_frame(inside.take_tx()[0])
        assert (back.dst, back.dport) == (host, 42000)
    # room again: new hosts get blocks, journaled first
    os.unlink(filler)
    p = flow(0x0A000300)
    assert p is not None
    in_use = set(w.rules.blocks)
    w.close()  # a crash: every block in use is quarantined at the restart
    w2 = NicWorker(cfg, 0, MemoryPort("in0"), MemoryPort("out0"), state_dir=str(state), standalone=True)
    assert in_use <= set(w2.rules.pool.quarantined())
    w2.close()


def test_journal_write_on_a_full_disk_leaves_no_half_record(tiny_disk):
    p = str(tiny_disk / "blocks.journal")
    j = J.Journal(p)
    j.append({"op": "assign", "block": 1, "host": "10.0.0.1"})
    filler = fill(tiny_disk)
    size = os.path.getsize(p)
    with pytest.raises(J.JournalError):
        j.append_many([{"op": "assign", "block": g, "host": "10.0.0.2", "pad": "x" * 200} for g in range(2, 60)])
    assert os.path.getsize(p) == size  # cut back: no torn record in the middle of the log
    assert j.write_errors == 1
    os.unlink(filler)
    j.append({"op": "assign", "block": 3, "host": "10.0.0.3"})
    assert J.Journal(p).load() == {1: "10.0.0.1", 3: "10.0.0.3"}
    j.close()


def test_checkpoint_on_a_full_disk_fails_whole_and_is_retried(tiny_disk):
    """A background checkpoint that meets a full disk leaves the previous checkpoint and
    the logs, which still name every live block; the next one, with room, compacts."""
    p = str(tiny_disk / "blocks.journal")
    j = J.Journal(p, background=True, max_log_bytes=4096)
    live = {g: "10.0.0.1" for g in range(40)}
    j.append_many([{"op": "assign", "block": g, "host": h} for g, h in live.items()])
    for g in range(100, 160):
        j.append_lazy([{"op": "assign", "block": g, "host": "10.0.0.2"}, {"op": "release", "block": g}])
    assert j.due()
    filler = fill(tiny_disk)
    try:
        j.checkpoint([{"op": "assign", "block": g, "host": h} for g, h in live.items()])
    except J.JournalError:
        pass  # the new log could not even be created
    j.wait()
    assert j.checkpoint_errors == 1 and j.checkpoints == 0
    assert J.Journal(p).load() == live
    os.unlink(filler)
    j.append_many([{"op": "assign", "block": 7, "host": "10.0.0.7"}])
    j._ckpt_retry = 0  # (the retry waits CHECKPOINT_RETRY_S)
    assert j.checkpoint([{"op": "assign", "block": g, "host": h} for g, h in {**live, 7: "10.0.0.7"}.items()])
    j.wait()
    assert j.checkpoints == 1 and not os.path.exists(p + ".prev")
    assert J.Journal(p).load() == {**live, 7: "10.0.0.7"}
    j.close()
