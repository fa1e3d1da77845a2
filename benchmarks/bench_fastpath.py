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
    calibration numpy copy of the same trace bytes: the yardstick of the run

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


def _translate_bench(kit, benchmark, world, dist, direction, nframes=None, rounds=None, warmup=2):
    nframes = nframes or kit.TRACE_FRAMES
    rounds = rounds or kit.ROUNDS
    pristine = world.trace(dist, direction, nframes)
    buf = pristine.copy()
    tr = world.translator
    verdicts = np.zeros(kit.BATCH, np.uint8)
    work = kit.batches(nframes)
    translate = tr.translate

    def restore():
        np.copyto(buf, pristine)

    def one_pass():
        for offs, lens in work:
            translate(buf, offs, lens, direction, 1000, verdicts)

    tr.reset_counters()
    benchmark.pedantic(one_pass, setup=restore, rounds=rounds, warmup_rounds=warmup)
    c = tr.counters[direction]
    assert int(c.sum()) == int(c[TRANSLATED]) > 0, tr.counters_dict()
    assert int(c[TRANSLATED]) % nframes == 0
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
    world = worlds("cython", FLOWS[flows])
    _table_info(benchmark, world)
    _translate_bench(kit, benchmark, world, dist, direction)


def test_translate_twin(kit, benchmark, worlds):
    """The pure-Python reference, 10k flows, OUT, a 2048-frame trace of the same kind:
    the denominator of the 'times the twin' ratio."""
    try:
        from hypernat import fastpath_py  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"hypernat.fastpath_py (the pure-Python twin) is not available: {exc}")
    benchmark.group = "twin"
    world = worlds("python", FLOWS["10k"])
    _translate_bench(kit, benchmark, world, "uniform", OUT, nframes=2048, rounds=5, warmup=1)


def test_insert_batch(kit, benchmark):
    """New flows per second into a table of 2^20: the table holds 2^20 - 64k flows, a
    round inserts 64k fresh ones (256 per call) and fills it; they are deleted again,
    untimed, before the next round.  (Short rounds: a round longer than a scheduler
    slice would measure the neighbours too.)"""
    from hypernat import _fastpath

    benchmark.group = "insert"
    n, fresh = 1 << 20, 1 << 16
    records = kit.Flows(n, seed=3).records(OUT)
    table = _fastpath.FlowTable(n)
    assert table.insert_batch(records[:n - fresh]) == n - fresh
    new = records[n - fresh:]
    chunks = [new[i:i + kit.BATCH] for i in range(0, fresh, kit.BATCH)]
    insert_batch = table.insert_batch

    def remove_fresh():
        table.delete_batch(new)

    def fill():
        for c in chunks:
            insert_batch(c)

    benchmark.pedantic(fill, setup=remove_fresh, rounds=kit.ROUNDS, warmup_rounds=1)
    assert len(table) == n and table.full_count == 0
    assert table.lookup(int(new[-1]["proto"]), int(new[-1]["saddr"]), int(new[-1]["sport"]),
                        int(new[-1]["daddr"]), int(new[-1]["dport"])) >= 0
    benchmark.extra_info["table_bytes_per_flow_direction"] = table.nslots * layout.SLOT_DTYPE.itemsize / n
    kit.record_rate(benchmark, fresh, unit="per_s")


def test_calibration_copy(kit, benchmark, worlds):
    """The yardstick: copying the bytes of one trace (numpy, memcpy speed), counted in
    frames so its rate reads like the others'."""
    benchmark.group = "calibration"
    src = worlds("cython", FLOWS["10k"]).trace("uniform", OUT)
    dst = np.empty_like(src)
    benchmark.pedantic(np.copyto, args=(dst, src), rounds=kit.ROUNDS * 5, warmup_rounds=5)
    assert np.array_equal(dst, src)
    kit.record_rate(benchmark, kit.TRACE_FRAMES)
