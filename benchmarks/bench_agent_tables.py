"""The agent's per-record work alone, CPU time per record, batches of 256:

    fetch_rows   the holder's misses become fetches (PendingTable: key and seq indexes,
                 the per-source token bucket, the FETCH record)
    on_rule      a RULE message answering them: each record checked against its fetch,
                 the clone installed (CloneTable; the builder's flow tables stubbed out)
    grant        the owner's leases for a batch of served sessions (LeaseTable)

    PYTHONPATH=. .venv/bin/python benchmarks/bench_agent_tables.py [N]

No builder, no sockets: what bench_clone_throughput's profile attributes to the agent's
tables, measured on its own (the same script runs against a tree of main, whose agent
has the same interface).  Prints the minimum of 3 rounds."""
import sys, time
import numpy as np
from hypernat import messages as M
from hypernat.agent import AgentParams, RuleAgent, IN

class Rules:
    def install_clone_rows(self, rows, tick, lease_until=0):
        return [1] * len(rows)
    def hold_many(self, eps):
        pass
    def release_hold(self, *a):
        pass

N, B = int(sys.argv[1]) if len(sys.argv) > 1 else 100000, 256
E, R = 0xC6120001, 0xC0000200
def agent(nic):
    return RuleAgent(nic, 2, Rules(), lambda t, m, r: None, lambda a, p: 0, lambda d, f: None,
                     AgentParams(fetch_rate=1e9, fetch_burst=1e9, queue_total=10**7), clock=lambda: 0.0)
res = {}
for rnd in range(3):
    a1, a0 = agent(1), agent(0)
    rows = [(IN, (17, R + (k % 250), 53, E + (k >> 14), 1024 + (k & 0x3FFF)), False, 0, b"f") for k in range(N)]
    seqs = []
    t = time.process_time()
    for i in range(0, N, B):
        a1.fetch_rows(rows[i:i + B], 0.0)
    tf = time.process_time() - t
    recs = M.records(M.T_RULE, N)
    recs["seq"] = np.arange(1, N + 1)
    recs["proto"] = 17
    recs["rem_addr"] = [R + (k % 250) for k in range(N)]
    recs["rem_port"] = 53
    recs["ext_addr"] = [E + (k >> 14) for k in range(N)]
    recs["ext_port"] = [1024 + (k & 0x3FFF) for k in range(N)]
    recs["int_addr"] = 0x0A000001
    recs["int_port"] = np.arange(N) % 60000 + 1
    recs["owner"] = 0
    recs["lease_ms"] = 30000
    t = time.process_time()
    for i in range(0, N, B):
        a1.on_message(0, M.T_RULE, recs[i:i + B], 0.001)
    tr = time.process_time() - t
    assert a1.counters["fetch_answered"] == N, dict(a1.counters)
    sks = [(17, 0x0A000001, k % 60000 + 1, E + (k >> 14), 1024 + (k & 0x3FFF), R + (k % 250), 53) for k in range(N)]
    t = time.process_time()
    for i in range(0, N, B):
        a0._grant_many(sks[i:i + B], 1, 0.0)
    tg = time.process_time() - t
    assert a0.state()["leases"] == N
    for k, v in (("fetch_rows", tf), ("on_rule", tr), ("grant", tg)):
        res.setdefault(k, []).append(v / N * 1e6)
print({k: "%.2f us/record (min of 3)" % min(v) for k, v in res.items()})
