"""The agent's per-record work alone, CPU time per record, batches of 256:

    fetch_rows   the holder's misses become fetches (PendingTable: key and seq indexes,
                 the per-source token bucket, the FETCH record)
    on_rule      a RULE message answering them: each record checked against its fetch,
                 the clone installed (CloneTable; the builder's flow tables stubbed out)
    retransmit   the retransmission turns at the fetches' first retry time, all of them
                 answered meanwhile (``step_retransmit`` until it has nothing left due):
                 what the answered fetches still cost the reliable-delivery engine
    grant        the owner's leases for a batch of served sessions (LeaseTable)

    .venv/bin/python benchmarks/bench_agent_tables.py [-n N] [--rounds R]
    .venv/bin/python -m pytest benchmarks/bench_agent_tables.py --benchmark-disable   (CI: small, checks)

No builder, no sockets: what bench_clone_throughput's profile attributes to the agent's
tables, measured on its own.  ``fetch_rows`` takes the batch's misses as
layout.FETCH_ROW_DTYPE rows (what ``RuleBuilder.decide_misses`` returns); trees before that
took one tuple per miss.  The frames queued come from a batch the way the worker hands
them over (``Batch.frames_of``: a view the table copies into its C arena; trees before
it: ``Batch.frames``, a bytes copy each), and the replay callback makes the batch the
worker would translate again (``Frames.batch``; before: ``Batch.from_frames``, a join),
so both steps count the frames' way too.  Prints the minimum of the rounds."""
import argparse
import time

import numpy as np

from hypernat import layout
from hypernat import messages as M
from hypernat.agent import IN, AgentParams, RuleAgent
from hypernat.io.base import Batch

B = 256
E, R = 0xC6120001, 0xC0000200


class Rules:
    """The builder's side of the agent, stubbed: every clone installs."""

    def install_clones(self, recs, now, dirs=3, lease_until=0, idx=None, owners=None):
        return np.ones(len(recs) if idx is None else len(idx), np.int8)

    def hold_many(self, eps):
        pass

    def release_hold(self, *a):
        pass

    def release_many(self, ekeys):
        pass


def _replay(direction, frames):
    """The worker's replay up to the batch it translates again."""
    return frames.batch() if hasattr(frames, "batch") else Batch.from_frames(frames)


def _frames_of(b: Batch, idx):
    """The frames of `idx` as the worker hands them to ``fetch_rows``."""
    return b.frames_of(idx) if hasattr(b, "frames_of") else b.frames(idx)


def agent(nic):
    return RuleAgent(nic, 2, Rules(), lambda t, m, r: None, lambda a, p: 0, _replay,
                     AgentParams(fetch_rate=1e9, fetch_burst=1e9, queue_total=10**7), clock=lambda: 0.0)


def one_round(n: int) -> dict:
    """CPU µs per record of each step, n records in batches of B."""
    a1, a0 = agent(1), agent(0)
    k = np.arange(n)
    rows = np.zeros(n, layout.FETCH_ROW_DTYPE)
    rows["fetch_dir"], rows["proto"], rows["frame"], rows["owner"] = IN, 17, k % B, 0
    rows["saddr"], rows["sport"], rows["daddr"], rows["dport"] = R + (k % 250), 53, E + (k >> 14), 1024 + (k & 0x3FFF)
    batch = Batch.from_frames([bytes([j & 0xFF]) * 74 for j in range(B)])  # a SYN's size
    t = time.process_time()
    for i in range(0, n, B):
        a1.fetch_rows(rows[i:i + B], _frames_of(batch, rows["frame"][i:i + B]), 0.0)
    tf = time.process_time() - t
    recs = M.records(M.T_RULE, n)
    recs["seq"] = np.arange(1, n + 1)
    recs["proto"] = 17
    recs["rem_addr"] = [R + (k % 250) for k in range(n)]
    recs["rem_port"] = 53
    recs["ext_addr"] = [E + (k >> 14) for k in range(n)]
    recs["ext_port"] = [1024 + (k & 0x3FFF) for k in range(n)]
    recs["int_addr"] = 0x0A000001
    recs["int_port"] = np.arange(n) % 60000 + 1
    recs["owner"] = 0
    recs["lease_ms"] = 30000
    t = time.process_time()
    for i in range(0, n, B):
        a1.on_message(0, M.T_RULE, recs[i:i + B], 0.001)
    tr = time.process_time() - t
    assert a1.counters["fetch_answered"] == n, dict(a1.counters)
    t = time.process_time()
    while a1.step_retransmit(0.06):
        pass
    tx = time.process_time() - t
    assert a1.counters["fetch_retries"] == 0
    sks = [(17, 0x0A000001, k % 60000 + 1, E + (k >> 14), 1024 + (k & 0x3FFF), R + (k % 250), 53) for k in range(n)]
    t = time.process_time()
    for i in range(0, n, B):
        a0._grant_many(sks[i:i + B], 1, 0.0)
    tg = time.process_time() - t
    assert a0.state()["leases"] == n
    return {"fetch_rows": tf / n * 1e6, "on_rule": tr / n * 1e6, "retransmit": tx / n * 1e6, "grant": tg / n * 1e6}


def test_agent_tables(benchmark):
    """Small under --benchmark-disable: every fetch answered, every lease granted."""
    benchmark.pedantic(one_round, args=(2000,), rounds=1, iterations=1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=100000, help="records per step (default 100000)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds; the minimum is printed (default 3)")
    a = ap.parse_args(argv)
    res: dict = {}
    for _ in range(a.rounds):
        for k, v in one_round(a.n).items():
            res.setdefault(k, []).append(v)
    print({k: "%.2f us/record (min of %d)" % (min(v), a.rounds) for k, v in res.items()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
