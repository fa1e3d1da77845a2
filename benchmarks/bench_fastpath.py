"""Fast-path benchmarks (pytest-benchmark).  Every benchmark stores its rate in
``extra_info`` (``mpps`` or ``per_s``, from the best round; ``*_median`` beside it), so
``tools/bench.py`` can compare runs; rates are only meaningful as ratios to the
calibration benchmark of the same run (these machines drift +-30%).

    translate   established flows, 64-byte TCP/UDP frames, batches of 256, a 64k-frame
                trace per round (256 calls), a random flow per frame: 10k / 100k / 1M
                (2^20) flows uniform, 1M zipf-skewed; both directions
    insert      insert_batch of 64k new flows (batches of 256) into a table of 2^20 - 64k
                (capacity 2^20), which they fill
    twin        the pure-Python reference on a small version of translate (10k flows)
    calibration yardsticks of the run: "cpu" = numpy copy of the trace bytes and numpy sort
                of 64k uint32 (cache-resident); "memory" = 64k random reads from 128 MiB.
                Each benchmark names its yardstick in extra_info["yardstick"].

Each round restores the trace first (untimed), so every round translates the same
established frames; after the rounds the counters must say every frame was translated.

    make bench                                   # run, save, compare with the last run
    pytest benchmarks --benchmark-disable        # CI: each once, untimed (still checked)
"""
import numpy as np
import pytest
from hypernat import layout
from hypernat.verdicts import IN, OUT, VERDICT

TRANSLATED = VERDICT["translated"]
FLOWS = {"10k": 10_000, "100k": 100_000, "1M": 1 << 20}
# Which yardstick normalises a benchmark (tools/bench.py): "cpu" for work that lives in
# the caches, "memory" for work bound by DRAM latency (tables of 64 MiB), whose rate
# moves with the neighbours' memory traffic while the caches' does not.
YARDSTICK = {"10k": "cpu", "100k": "cpu", "1M": "memory"}


def _translate_bench(kit, benchmark, worlds, dist, direction, nframes=None, rounds=None, warmup=2):
    """Time full passes over a trace; rounds rotate over `worlds` (placements of the
    same tables), the trace is restored before each round (untimed)."""
    nframes = nframes or kit.TRACE_FRAMES
    rounds = rounds or kit.ROUNDS
    pristine = worlds[0].trace(dist, direction, nframes)
    buf = pristine.copy()
    verdicts = np.zeros(kit.BATCH, np.uint8)
    work = kit.batches(nframes)
    translators = [w.translator for w in worlds]
    turn = [0]

    def restore():
        np.copyto(buf, pristine)
        turn[0] = (turn[0] + 1) % len(translators)
        return (translators[turn[0]].translate,), {}

    def one_pass(translate):
        for offs, lens in work:
            translate(buf, offs, lens, direction, 1000, verdicts)

    for tr in translators:
        tr.reset_counters()
    benchmark.pedantic(one_pass, setup=restore, rounds=rounds, warmup_rounds=warmup)
    for tr in translators:
        c = tr.counters[direction]
        assert int(c.sum()) == int(c[TRANSLATED]), tr.counters_dict()
        assert int(c[TRANSLATED]) % nframes == 0
    assert sum(int(tr.counters[direction, TRANSLATED]) for tr in translators) > 0
    benchmark.extra_info["placements"] = len(worlds)
    return kit.record_rate(benchmark, nframes)


def _table_info(benchmark, world):
    t = world.out_table
    benchmark.extra_info["flows"] = len(t)
    benchmark.extra_info["table_bytes_per_flow_direction"] = t.nslots * t.slots.itemsize / len(t)


@pytest.mark.parametrize("direction", [OUT, IN], ids=["out", "in"])
@pytest.mark.parametrize("flows,dist", [("10k", "uniform"), ("100k", "uniform"), ("1M", "uniform"),
                                        ("1M", "zipf")], ids=["10k", "100k", "1M", "1M-zipf"])
def test_translate(kit, benchmark, worlds, flows, dist, direction):
    benchmark.group = "translate"
    placements = kit.PLACEMENTS if YARDSTICK[flows] == "memory" else 1
    ws = [worlds("cython", FLOWS[flows], k) for k in range(placements)]
    benchmark.extra_info["yardstick"] = YARDSTICK[flows]
    _table_info(benchmark, ws[0])
    _translate_bench(kit, benchmark, ws, dist, direction)


def test_translate_twin(kit, benchmark, worlds):
    """The pure-Python reference, 10k flows, OUT, a 2048-frame trace of the same kind:
    the denominator of the 'times the twin' ratio."""
    benchmark.group = "twin"
    benchmark.extra_info["yardstick"] = "cpu"
    world = worlds("python", FLOWS["10k"])
    _translate_bench(kit, benchmark, [world], "uniform", OUT, nframes=2048, rounds=5, warmup=1)


def test_insert_batch(kit, benchmark):
    """New flows per second into a table of 2^20: the table holds 2^20 - 64k flows, a
    round inserts 64k fresh ones (256 per call) and fills it; they are deleted again,
    untimed, before that table's next round (rounds rotate over PLACEMENTS tables).  (Short rounds: a round longer than a scheduler
    slice would measure the neighbours too.)"""
    from hypernat import _fastpath

    benchmark.group = "insert"
    benchmark.extra_info["yardstick"] = "memory"
    n, fresh = 1 << 20, 1 << 16
    records = kit.Flows(n, seed=3).records(OUT)
    new = records[n - fresh:]
    chunks = [new[i:i + kit.BATCH] for i in range(0, fresh, kit.BATCH)]
    tables = []
    for _ in range(kit.PLACEMENTS):          # rounds rotate over separate allocations
        t = _fastpath.FlowTable(n)
        assert t.insert_batch(records[:n - fresh]) == n - fresh
        tables.append(t)
    turn = [0]
    used = set()

    def remove_fresh():
        turn[0] = (turn[0] + 1) % len(tables)
        used.add(turn[0])
        t = tables[turn[0]]
        t.delete_batch(new)
        assert len(t) == n - fresh
        return (t.insert_batch,), {}

    def fill(insert_batch):
        for c in chunks:
            insert_batch(c)

    benchmark.pedantic(fill, setup=remove_fresh, rounds=kit.ROUNDS, warmup_rounds=1)
    last = new[-1]
    for table in (tables[i] for i in used):
        assert len(table) == n and table.full_count == 0
        assert table.lookup(int(last["proto"]), int(last["saddr"]), int(last["sport"]),
                            int(last["daddr"]), int(last["dport"])) >= 0
    benchmark.extra_info["table_bytes_per_flow_direction"] = table.nslots * layout.SLOT_DTYPE.itemsize / n
    kit.record_rate(benchmark, fresh, unit="per_s")


def test_calibration_copy(kit, benchmark, worlds):
    """The yardstick: copying the bytes of one trace (numpy, memcpy speed), counted in
    frames so its rate reads like the others'."""
    benchmark.group = "calibration"
    benchmark.extra_info["yardstick"] = "cpu"
    src = worlds("cython", FLOWS["10k"]).trace("uniform", OUT)
    dst = np.empty_like(src)
    benchmark.pedantic(np.copyto, args=(dst, src), rounds=kit.ROUNDS * 5, warmup_rounds=5)
    assert np.array_equal(dst, src)
    kit.record_rate(benchmark, kit.TRACE_FRAMES)


def test_calibration_sort(kit, benchmark):
    """The second yardstick, compute-bound where the copy is memory-bound: numpy sorting
    64k random uint32 (L2-resident, branchy), in frames per second likewise.
    tools/bench.py normalises by the geometric mean of the calibration group."""
    benchmark.group = "calibration"
    benchmark.extra_info["yardstick"] = "cpu"
    keys = np.random.default_rng(4).integers(0, 1 << 32, kit.TRACE_FRAMES, dtype=np.uint64).astype(np.uint32)
    work = keys.copy()

    def restore():
        np.copyto(work, keys)

    benchmark.pedantic(work.sort, setup=restore, rounds=kit.ROUNDS * 2, warmup_rounds=2)
    assert (work[1:] >= work[:-1]).all()
    kit.record_rate(benchmark, kit.TRACE_FRAMES)


def test_calibration_gather(kit, benchmark):
    """The memory yardstick: 64k random 4-byte reads from 128 MiB of huge-page-backed
    memory (allocated like a flow table), in frames per second likewise: DRAM latency,
    overlapped as far as the CPU's out-of-order window allows."""
    benchmark.group = "calibration"
    benchmark.extra_info["yardstick"] = "memory"
    big = layout.alloc_slots((128 << 20) // layout.SLOT_DTYPE.itemsize).view(np.uint32)
    big[:] = 1
    idx = np.random.default_rng(5).integers(0, big.size, kit.TRACE_FRAMES)
    out = np.empty(kit.TRACE_FRAMES, np.uint32)
    benchmark.pedantic(np.take, args=(big, idx), kwargs={"out": out}, rounds=kit.ROUNDS * 2,
                       warmup_rounds=2)
    assert int(out.sum()) == kit.TRACE_FRAMES
    kit.record_rate(benchmark, kit.TRACE_FRAMES)
