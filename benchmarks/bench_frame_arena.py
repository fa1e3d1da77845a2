"""A first packet's frame on the holder's clone path, alone, CPU time per frame: the
worker hands the frames of a batch's fetches to the pending table (``Batch.frames_of``, a
view the table copies into its C arena; trees before it: ``Batch.frames``, a bytes copy
each), ``fetch_rows`` queues them, ``answer_rules`` answers the fetches and hands the
frames back, and the worker makes the batch it translates again (``Frames.batch``;
before: ``Batch.from_frames``, a join).  B fetches a call (1: a first packet alone).

    .venv/bin/python benchmarks/bench_frame_arena.py [B ...]      (default 1 16 256)
    .venv/bin/python -m pytest benchmarks/bench_frame_arena.py --benchmark-disable

Runs against any tree (it adapts to the interface it finds): PYTHONPATH=TREE.  Prints
the minimum of three rounds."""
import sys
import time

import numpy as np

from hypernat import layout
from hypernat import messages as M
from hypernat.io.base import Batch

try:
    from hypernat.agent._pending import FetchQueue, PendingTable
except ImportError:  # no extensions: the reference
    from hypernat.agent.pending_py import FetchQueue, PendingTable

LIMITS = (0.001, 0.01)


def one_round(b: int, n: int = 60000, rounds: int = 3) -> float:
    """CPU µs per frame, n frames in calls of b fetches (the minimum of the rounds)."""
    t = PendingTable(10 ** 6, 4, 1e9, 1e9, 1e9, 1.0, 10, capacity=1 << 16)
    fq = FetchQueue()
    batch = Batch.from_frames([bytes([j]) * 74 for j in range(64)])  # a SYN's size
    new = hasattr(batch, "frames_of")
    n = max(b, n // b * b)
    k = np.arange(n)
    rows = np.zeros(n, layout.FETCH_ROW_DTYPE)
    rows["fetch_dir"], rows["proto"], rows["frame"], rows["owner"] = 1, 17, k % 64, 0
    rows["saddr"], rows["sport"], rows["daddr"], rows["dport"] = 7 + (k % 250), 53, 9 + (k >> 14), 1024 + (k & 0x3FFF)
    recs = M.records(M.T_RULE, n)
    recs["proto"], recs["rem_port"] = 17, 53
    recs["rem_addr"], recs["ext_addr"], recs["ext_port"] = rows["saddr"], rows["daddr"], rows["dport"]
    owners = np.zeros(n, np.int64)
    best = float("inf")
    for rnd in range(rounds):
        seq = 1 + rnd * n
        recs["seq"] = np.arange(seq, seq + n)
        c0 = time.process_time()
        for i in range(0, n, b):
            r = rows[i:i + b]
            seq = t.fetch_rows(r, batch.frames_of(r["frame"]) if new else batch.frames(r["frame"]), 0.0, seq, fq)[-1]
            fq.take()
            rin = t.answer_rules(0, recs[i:i + b], owners[i:i + b], 0.0, LIMITS)[3]
            got = rin.batch() if new else Batch.from_frames(rin)
            assert got.n == b
        best = min(best, (time.process_time() - c0) / n * 1e6)
    assert len(t) == 0 and t.queued == 0
    return best


def test_frame_arena(benchmark):
    """Small under --benchmark-disable: every frame queued comes back."""
    benchmark.pedantic(one_round, args=(16, 2000, 1), rounds=1, iterations=1)


def main(argv=None) -> int:
    for b in [int(x) for x in (argv if argv is not None else sys.argv[1:])] or [1, 16, 256]:
        print(f"B={b}: {one_round(b):.2f} us a frame (fetch_rows + answer_rules + the replay batch)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
