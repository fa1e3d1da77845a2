"""Active install's PUSH alone, CPU time per pushed session:

    owner    the sessions a loop turn built (``rules.drain_created``: a SESSION array of
             B records) → the switch's hash predicts each return NIC → PUSH records, one
             lease grant and one tracked message per target NIC; then the holder's
             PUSH_ACKs completing them (``_on_ack``)
    holder   the PUSH messages: each record checked (the endpoint the sender's), the
             clones installed (CloneTable; the builder's flow tables stubbed out), acked

    .venv/bin/python benchmarks/bench_push.py [-n N] [-b B] [--rounds R] [--hash sha1]
    .venv/bin/python -m pytest benchmarks/bench_push.py --benchmark-disable   (CI: small, checks)

Two agents of 2 NICs, no builder, no sockets (the records the agents send are handed
to the other agent's ``on_message`` as the worker would after validation).  The same
script runs against a tree of main, whose agent has the same interface.  Prints the
minimum of the rounds."""
import argparse
import time

import numpy as np

from hypernat import messages as M
from hypernat.agent import AgentParams, RuleAgent
from hypernat.rules import SESSION_DTYPE

E, R, I = 0xC6120001, 0xC0000200, 0x0A000001


class Rules:
    """The builder's side of the agents, stubbed: sessions handed in, every clone installs."""

    def __init__(self):
        self.created = np.zeros(0, SESSION_DTYPE)

    def drain_created(self):
        out, self.created = self.created, np.zeros(0, SESSION_DTYPE)
        return out

    def drain_removed(self):
        return np.zeros(0, SESSION_DTYPE)

    def install_clones(self, recs, now, dirs=3, lease_until=0, idx=None, owners=None):
        return np.ones(len(recs) if idx is None else len(idx), np.int8)

    def hold_many(self, eps):
        pass

    def release_hold(self, *a):
        pass

    def release_many(self, ekeys):
        pass


def sessions(n: int, k0: int = 0) -> np.ndarray:
    s = np.zeros(n, SESSION_DTYPE)
    k = np.arange(k0, k0 + n)
    s["proto"] = 17
    s["iaddr"], s["iport"] = I + (k >> 16), k % 60000 + 1
    s["eaddr"], s["eport"] = E + (k >> 14), 1024 + (k & 0x3FFF)
    s["raddr"], s["rport"] = R + (k % 250), 53
    s["rule_id"] = k + 1
    s["owner"] = 0
    return s


def one_round(n: int, b: int = 256, switch_hash: str = "sha1") -> dict:
    """CPU µs per pushed session, owner and holder, n sessions built b per loop turn."""
    sent = {0: [], 1: []}
    rules = [Rules(), Rules()]
    p = dict(active_install=True, switch_hash=switch_hash, lease_s=30.0)
    a0, a1 = (RuleAgent(k, 2, rules[k], lambda t, m, r, k=k: sent[k].append((t, m, r)), lambda a, q: 0,
                        lambda d, f: None, AgentParams(**p), clock=lambda: 0.0) for k in (0, 1))
    batches = [sessions(min(b, n - i), i) for i in range(0, n, b)]
    to_owner = 0.0
    to_holder = 0.0
    for batch in batches:
        rules[0].created = batch
        t = time.process_time()
        a0.step_created(0.0)
        to_owner += time.process_time() - t
        msgs, sent[0][:] = list(sent[0]), []
        t = time.process_time()
        for target, mtype, recs in msgs:
            a1.on_message(0, mtype, recs, 0.001)
        to_holder += time.process_time() - t
        acks, sent[1][:] = list(sent[1]), []
        t = time.process_time()
        for target, mtype, recs in acks:
            a0.on_message(1, mtype, recs, 0.002)
        to_owner += time.process_time() - t
    pushed = a0.counters["pushes"]
    assert pushed > n // 3, dict(a0.counters)
    assert a1.counters["push_installed"] == pushed and len(a1.clones) == pushed
    assert not a0._unacked and a0.counters["ack_stale"] == 0  # every push acknowledged once
    return {"owner": to_owner / pushed * 1e6, "holder": to_holder / pushed * 1e6, "pushed": pushed}


def test_push(benchmark):
    """Small under --benchmark-disable: every push installed and acknowledged."""
    benchmark.pedantic(one_round, args=(2000,), rounds=1, iterations=1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=10000, help="sessions per round (default 10000)")
    ap.add_argument("-b", type=int, default=256, help="sessions built per loop turn (default 256)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds; the minimum is printed (default 3)")
    ap.add_argument("--hash", default="sha1", help="the switch's hash (default sha1)")
    a = ap.parse_args(argv)
    res: dict = {}
    for _ in range(a.rounds):
        for k, v in one_round(a.n, a.b, a.hash).items():
            if k in ("owner", "holder"):
                res.setdefault(k, []).append(v)
    print({k: "%.2f us/pushed session (min of %d)" % (min(v), a.rounds) for k, v in res.items()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
