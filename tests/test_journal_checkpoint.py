"""The block journal as a log with checkpoints (issue 10, items 1 and 4).

* A snapshot restore re-establishes the journal (every block in use, with its host, and
  every quarantine the snapshot carried) before the first new block is handed out: a
  graceful restart followed by a crash never hands a live block to a new host, and the
  other NICs' clones of those blocks are still recovered.
* The journal stays O(live blocks) on disk however many blocks cycled, and a restart
  reads the checkpoint and at most one bound of log.
* A crash at any point of a checkpoint, or in the middle of a record, leaves files that
  together name every live block.
* Files carry a format version: version 1 (today's unversioned log) is read, an unknown
  version is refused with a message naming the file and both versions.
"""
import json
import os

import pytest

from hypernat.coord.broker import Coordinator
from hypernat.io.memory import MemoryPort
from hypernat.lab.emulated import UDP, build_frame, emulated_config, parse_frame
from hypernat.nic import journal as J
from hypernat.nic.snapshot import Snapshot
from hypernat.nic.worker import NicWorker, spin

pytestmark = pytest.mark.timeout(60)

R1 = 0xC0000205  # 192.0.2.5


def make_worker(cfg, nic, state_dir, **kw):
    inside, outside = MemoryPort(f"in{nic}"), MemoryPort(f"out{nic}")
    w = NicWorker(cfg, nic, inside, outside, state_dir=str(state_dir), **kw)
    return w, inside, outside


def new_hosts(w, inside, outside, base, n):
    """One UDP flow from each of n hosts; {host: block of its external endpoint}."""
    out = {}
    for k in range(n):
        inside.inject([build_frame(UDP, base + k, 42000, R1, 53)])
        assert spin([w], lambda: len(outside._tx) >= 1, 3, poll_ms=0)
        f = parse_frame(outside.take_tx()[0])
        out[base + k] = w.partition.block_of(f.src, f.sport)
    return out


# ---------------------------------------------------------------------------------------
# item 1: graceful restart, then crash


def test_graceful_restart_then_crash_hands_no_live_block_to_a_new_host(tmp_path):
    """Fails on main (overlap 20 of 20): the snapshot restore emptied the journal."""
    cfg = emulated_config(1)
    d = tmp_path / "nic0"
    w, i, o = make_worker(cfg, 0, d, standalone=True)
    old = new_hosts(w, i, o, 0x0A000100, 20)
    w.shutdown(snapshot=True)  # SIGTERM
    w, i, o = make_worker(cfg, 0, d, standalone=True)
    assert w.recovery["snapshot"] and w.recovery["rules"] == 20
    # before any new block: the journal on disk names every block in use, with its host
    assert set(old.values()) <= J.Journal(str(d / "blocks.journal")).blocks()
    live = J.Journal(str(d / "blocks.journal")).load()
    assert {g: live.get(g) for g in old.values()} == {g: f"10.0.1.{h & 255}" for h, g in old.items()}
    w.close()  # SIGKILL: no snapshot
    w, i, o = make_worker(cfg, 0, d, standalone=True)
    assert not w.recovery["snapshot"] and w.recovery["quarantined_blocks"] >= 20
    assert {w.rules.pool.quarantine_hosts().get(g) for g in old.values()} == set(old)  # each block with its host
    w.rules.recovering = False  # the recovery window is for the old hosts; these are new
    new = new_hosts(w, i, o, 0x0A000200, 20)
    w.close()
    assert not set(old.values()) & set(new.values())


def test_snapshot_quarantines_survive_a_later_crash(tmp_path):
    """Crash (blocks quarantined) -> graceful restart (the snapshot carries the
    quarantines) -> crash: the quarantines are still there, with their hosts."""
    cfg = emulated_config(1)
    d = tmp_path / "nic0"
    w, i, o = make_worker(cfg, 0, d, standalone=True)
    old = new_hosts(w, i, o, 0x0A000100, 5)
    w.close()  # crash
    w, i, o = make_worker(cfg, 0, d, standalone=True)
    q = dict(w.rules.pool.quarantine_hosts())
    assert set(old.values()) <= set(q)
    w.shutdown(snapshot=True)
    w, i, o = make_worker(cfg, 0, d, standalone=True)
    assert w.recovery["snapshot"] and set(old.values()) <= set(w.rules.pool.quarantined())
    w.close()  # crash again
    w, i, o = make_worker(cfg, 0, d, standalone=True)
    assert {g: w.rules.pool.quarantine_hosts().get(g) for g in old.values()} == {g: q[g] for g in old.values()}
    w.close()


def test_graceful_then_crash_other_nics_clones_are_recovered(tmp_path):
    """Split connections owned by NIC 0 (the reply comes in through NIC 1, which holds a
    clone).  NIC 0 stops gracefully, restarts, is killed, restarts: NIC 1's reports of
    those clones are recognised (their blocks were quarantined with their hosts) and the
    connections keep their endpoints.  Fails on main (nothing recovered)."""
    cfg = emulated_config(2, mapping="endpoint-independent")
    coord = Coordinator(cfg.coordinator.endpoint, n_nics=2, heartbeat_interval=0.2).start_thread()
    ws = [make_worker(cfg, k, tmp_path / f"nic{k}") for k in range(2)]
    workers = lambda: [w for w, _, _ in ws]  # noqa: E731
    try:
        assert spin(workers(), lambda: all(w.registered for w in workers()), 5)
        (w0, in0, out0), (w1, in1, out1) = ws
        hosts = [h for h in range(0x0A000100, 0x0A000200) if w0.partition.eim_owner(h) == 0][:6]
        ext = {}
        for h in hosts:
            in0.inject([build_frame(UDP, h, 40000, R1, 53, payload=b"q")])
            assert spin(workers(), lambda: len(out0._tx) == 1, 3)
            p = parse_frame(out0.take_tx()[0])
            ext[h] = (p.src, p.sport)
            out1.inject([build_frame(UDP, R1, 53, p.src, p.sport, payload=b"a")])  # via NIC 1: a clone
            assert spin(workers(), lambda: len(in1._tx) == 1, 3)
            in1.take_tx()
        assert w1.agent.counters["clones_installed"] == len(hosts)
        for restart in ("graceful", "crash"):
            if restart == "graceful":
                ws[0][0].shutdown(snapshot=True)
            else:
                ws[0][0].close()
            ws[0] = make_worker(cfg, 0, tmp_path / "nic0")
            assert spin(workers(), lambda: ws[0][0].registered, 5)
        w0, in0, out0 = ws[0]
        assert w0.recovery["quarantined_blocks"] >= len(hosts)
        ok = spin(workers(), lambda: w0.rules.counters_dict()["recovered_sessions"] >= len(hosts), 10)
        assert ok, w0.rules.counters_dict()
        for h in hosts:  # the same endpoint, both ways
            in0.inject([build_frame(UDP, h, 40000, R1, 53, payload=b"q2")])
            assert spin(workers(), lambda: len(out0._tx) == 1, 3)
            p = parse_frame(out0.take_tx()[0])
            assert (p.src, p.sport) == ext[h]
    finally:
        for w, _, _ in ws:
            w.close()
        coord.stop()
        coord.join(5)


# ---------------------------------------------------------------------------------------
# item 4: bounded size, streamed recovery


def cycle(j, first, n, host="10.0.0.1"):
    """n block cycles the way the RuleBuilder writes them: reserve, assign, release."""
    for g in range(first, first + n):
        j.append_many([{"op": "reserve", "block": g, "external": "198.18.0.1", "ports": [1024, 1087]}])
        j.append_lazy([{"op": "assign", "block": g, "host": host, "external": "198.18.0.1",
                        "ports": [1024, 1087], "t": g}])  # fmt: skip
        j.append_lazy([{"op": "release", "block": g}])


def state_records(live: dict) -> list:
    return [{"op": "assign", "block": g, "host": h} if h else {"op": "reserve", "block": g} for g, h in live.items()]


def journal_bytes(d) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))


def test_many_block_cycles_leave_o_live_bytes_and_restart_reads_only_that(tmp_path):
    bound = 8192
    j = J.Journal(str(tmp_path / "blocks.journal"), fsync=False, max_log_bytes=bound)
    live = {g: "10.0.0.9" for g in range(100_000, 100_050)}  # 50 blocks live throughout
    j.append_many([{"op": "assign", "block": g, "host": h} for g, h in live.items()])
    checkpoints = 0
    for k in range(200):  # 4000 block cycles
        cycle(j, 10 * k, 20)
        if j.due():
            assert j.checkpoint(state_records(live))
            checkpoints += 1
    assert checkpoints >= 10
    ck = os.path.getsize(j.checkpoint_path)
    assert journal_bytes(tmp_path) <= ck + max(bound, ck) + 256  # not the 4000 cycles' ~600 kB
    assert j.load() == live
    read = []
    real = J._File.records

    def counting(f):
        for r in real(f):
            read.append(r)
            yield r

    J._File.records = counting
    try:
        assert J.Journal(str(tmp_path / "blocks.journal")).load() == live
    finally:
        J._File.records = real
    assert len(read) <= len(live) + bound // 25  # the checkpoint + at most one bound of log
    j.close()


def test_worker_checkpoints_past_the_bound_and_restarts_from_it(tmp_path):
    """The NIC worker compacts on its own (on the journal's thread) once the log passes
    limits.journal_log_bytes; a crash restart then quarantines exactly the live blocks."""
    cfg = emulated_config(1, limits={"journal_log_bytes": 4096}, timeouts={"udp": 30, "reuse_delay": 1})
    d = tmp_path / "nic0"
    clock = [1000.0]
    w, i, o = make_worker(cfg, 0, d, standalone=True, clock=lambda: clock[0])
    for rnd in range(6):  # 6 rounds of 10 hosts, each expiring before the next round
        new_hosts(w, i, o, 0x0A000100 + 16 * rnd, 10)
        clock[0] += 40
        for _ in range(50):
            w.run_once(0)
        w.journal.wait()
        w.run_once(0)
    assert w.journal.checkpoints >= 2
    keep = new_hosts(w, i, o, 0x0A000F00, 3)
    w.journal.wait()
    in_use = set(w.rules.blocks)
    assert set(keep.values()) <= in_use
    assert journal_bytes(d) < 3 * 4096 + w.journal.checkpoint_bytes
    w.close()  # crash
    live = J.Journal(str(d / "blocks.journal")).load()
    assert in_use <= set(live) and all(live[g] for g in in_use)
    assert set(live) - in_use <= set(range(0, 1 << 20)) and len(live) <= len(in_use) + 64  # + reserves


def test_torn_last_record_is_ignored_and_the_next_one_kept(tmp_path):
    p = str(tmp_path / "blocks.journal")
    j = J.Journal(p, fsync=False)
    j.append({"op": "assign", "block": 1, "host": "10.0.0.1"})
    j.close()
    with open(p, "ab") as f:
        f.write(b'{"op":"assign","blo')  # the crash cut this one
    j = J.Journal(p, fsync=False)
    assert j.load() == {1: "10.0.0.1"}
    j.append({"op": "assign", "block": 2, "host": "10.0.0.2"})  # after a restart: a line of its own
    assert J.Journal(p).load() == {1: "10.0.0.1", 2: "10.0.0.2"}
    j.close()


class Crash(BaseException):
    """The process dies here (not an OSError: nothing catches it)."""


@pytest.mark.parametrize("at", range(14))
def test_a_crash_at_any_point_of_a_checkpoint_loses_no_block(tmp_path, monkeypatch, at):
    """The k-th file operation of a checkpoint (rename, open, write, fsync, replace,
    unlink) is where the process dies; a fresh Journal over what is on disk names every
    live block, and the next checkpoint cleans up."""
    p = str(tmp_path / "blocks.journal")
    j = J.Journal(p, fsync=True)
    cycle(j, 0, 30)
    j.append_many([{"op": "assign", "block": g, "host": "10.0.0.7"} for g in (500, 501, 502)])
    assert j.checkpoint(state_records(j.load()))
    j.append_many([{"op": "reserve", "block": 600}])
    j.append_many([{"op": "release", "block": 501}])
    live = j.load()
    assert live == {500: "10.0.0.7", 502: "10.0.0.7", 600: None}
    calls = [0]

    def dying(real):
        def f(*a, **kw):
            calls[0] += 1
            if calls[0] > at:
                raise Crash()
            return real(*a, **kw)

        return f

    for name in ("replace", "open", "write", "fsync", "unlink", "ftruncate"):
        monkeypatch.setattr(J.os, name, dying(getattr(os, name)))
    try:
        j.checkpoint(state_records(live))
        completed = True
    except Crash:
        completed = False
    monkeypatch.undo()
    if at >= 13:  # every step done
        assert completed
    j2 = J.Journal(p)
    assert j2.load() == live
    j2.append_many([{"op": "assign", "block": 700, "host": "10.0.0.8"}])
    assert j2.checkpoint(state_records(j2.load()))
    assert J.Journal(p).load() == {**live, 700: "10.0.0.8"}
    assert not os.path.exists(p + ".prev")
    j2.close()


# ---------------------------------------------------------------------------------------
# format versions


def test_version_1_journal_is_read_and_rewritten_as_version_2(tmp_path):
    """A journal as main writes it (unversioned JSON lines) is read; the restart
    quarantines its blocks with their hosts and rewrites it in the current format."""
    cfg = emulated_config(1)
    d = tmp_path / "nic0"
    d.mkdir()
    recs = [{"op": "reserve", "block": 5, "external": "198.18.0.0", "ports": [1344, 1407]},
            {"op": "assign", "block": 5, "host": "10.0.0.3", "external": "198.18.0.0", "ports": [1344, 1407], "t": 1},
            {"op": "assign", "block": 9, "host": "10.0.0.4", "external": "198.18.0.0", "ports": [1600, 1663], "t": 1},
            {"op": "release", "block": 9}]  # fmt: skip
    (d / "blocks.journal").write_text("".join(json.dumps(r) + "\n" for r in recs))
    w, _, _ = make_worker(cfg, 0, d, standalone=True)
    assert w.rules.pool.quarantine_hosts() == {5: 0x0A000003} and set(w.rules.pool.quarantined()) == {5}
    w.close()
    head = json.loads((d / "blocks.journal.checkpoint").read_text().splitlines()[0])
    assert head["version"] == J.FORMAT_VERSION == 2
    assert json.loads((d / "blocks.journal").read_text().splitlines()[0])["version"] == 2
    assert J.Journal(str(d / "blocks.journal")).load()[5] == "10.0.0.3"


@pytest.mark.parametrize("which", ["blocks.journal", "blocks.journal.checkpoint"])
def test_unknown_journal_version_is_refused_naming_file_and_versions(tmp_path, which):
    cfg = emulated_config(1)
    d = tmp_path / "nic0"
    d.mkdir()
    (d / which).write_text(json.dumps({"hypernat": "blocks-journal", "version": 7, "gen": 3}) + "\n")
    with pytest.raises(J.FormatError) as e:
        make_worker(cfg, 0, d, standalone=True)
    msg = str(e.value)
    assert str(d / which) in msg and "version 7" in msg and "1 to 2" in msg


def test_snapshot_version_1_is_read_and_unknown_refused(tmp_path):
    cfg = emulated_config(1)
    d = tmp_path / "nic0"
    w, i, o = make_worker(cfg, 0, d, standalone=True)
    new_hosts(w, i, o, 0x0A000100, 3)
    w.shutdown(snapshot=True)
    s = json.loads((d / "snapshot.json").read_text())
    assert s["format"] == 2
    del s["format"]  # as main writes it
    (d / "snapshot.json").write_text(json.dumps(s))
    w, i, o = make_worker(cfg, 0, d, standalone=True)
    assert w.recovery["snapshot"] and w.recovery["rules"] == 3
    w.shutdown(snapshot=True)
    s = json.loads((d / "snapshot.json").read_text())
    s["format"] = 9
    (d / "snapshot.json").write_text(json.dumps(s))
    with pytest.raises(J.FormatError) as e:
        Snapshot(str(d / "snapshot")).load()
    assert str(d / "snapshot.json") in str(e.value) and "version 9" in str(e.value) and "1 to 2" in str(e.value)


def test_nic_main_refuses_an_unknown_journal_version_with_a_message(tmp_path, capsys, monkeypatch):
    from hypernat.nic import __main__ as nic_main

    monkeypatch.setattr(nic_main, "open_port", lambda backend, ifname, *args, **kw: MemoryPort(ifname))

    cfg_path = tmp_path / "gw.yaml"
    cfg = emulated_config(1)
    import yaml

    tree = {"internal": {"prefixes": ["10.0.0.0/16"]}, "external": {"pool": ["198.18.0.0/30"]},
            "nics": [{"id": 0, "inside": "in0", "outside": "out0", "io": "pcap"}],
            "coordinator": {"endpoint": cfg.coordinator.endpoint}, "metrics": {"enabled": False}}  # fmt: skip
    cfg_path.write_text(yaml.safe_dump(tree))
    d = tmp_path / "state"
    d.mkdir()
    (d / "blocks.journal").write_text(json.dumps({"hypernat": "blocks-journal", "version": 3, "gen": 1}) + "\n")
    assert nic_main.main(["-c", str(cfg_path), "-n", "0", "--state-dir", str(d), "--no-metrics"]) == 2
    err = capsys.readouterr().err
    assert str(d / "blocks.journal") in err and "version 3" in err


@pytest.mark.parametrize("pool,n", [("198.18.0.0/30", 400), ("198.18.0.0/26", 1000)])
def test_a_burst_beyond_the_reserve_costs_log2_fsyncs_not_one_per_block(pool, n):
    """Every block is durable before its first use; a burst of new hosts with nothing
    reserved ahead commits a growing run of blocks each time (1x, 2x, 4x ...), one run
    for the burst spread over the addresses new hosts take: log2(burst) commits and at
    most about twice the burst journaled (a doubling per address journaled ~60k blocks
    of a /26 for 1000 new hosts, nearly the whole pool, ~0.7 s on the packet path)."""
    import numpy as np

    from hypernat import layout
    from hypernat.fastpath import FlowTable
    from hypernat.rules import ACT_REPLAY, RuleBuilder
    from hypernat.verdicts import OUT, VERDICT

    class Counting:
        def __init__(self):
            self.commits, self.durable, self.lazy = 0, set(), []

        def append(self, rec):
            self.append_many([rec])

        def append_many(self, recs):
            self.commits += 1
            self.durable.update(r["block"] for r in recs)

        def append_lazy(self, recs):
            assert all(r["block"] in self.durable for r in recs)  # its reserve is on disk already
            self.lazy += recs

    cfg = emulated_config(1, pool=pool, limits={"flow_table_capacity": 4096})
    j = Counting()
    rb = RuleBuilder(cfg, 0, FlowTable(4096), FlowTable(4096), rng=np.random.default_rng(1), journal=j.append)
    k = np.zeros(n, layout.KEY_DTYPE)
    for i in range(n):
        k[i] = (0x0A000100 + i, R1, 40000, 53, UDP, layout.KIND_PLAIN, 0, 0)
    d = rb.handle_misses(OUT, np.full(n, VERDICT["miss_out"], np.uint8), k, 10)
    assert (d.action == ACT_REPLAY).all() and len(rb.blocks) == n  # one block per new host
    assert set(rb.blocks) <= j.durable and len(j.lazy) == n
    reserve = rb.reserve_per_address * min(rb.reserve_addresses, rb.part.n_addrs)  # what a reserve holds
    assert j.commits <= (n // reserve).bit_length() + 1 < n // 10
    assert len(j.durable) <= 3 * n
