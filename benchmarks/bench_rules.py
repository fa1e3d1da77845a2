"""RuleBuilder benchmarks: rule setups per second, and the cost of one expiry step.

setups   N first-packet misses (distinct internal endpoints, EIM, one NIC) handed to
         ``RuleBuilder.handle_misses`` in batches of 256, as the NIC loop does: port-block
         assignment, RFC 6056 port choice, mapping bookkeeping and both flow-table inserts
         (one ``insert_batch`` per table per batch).  Translation log off, then on
         (per-rule JSON lines to a file: ``on`` a line per mapping, ``remote`` a line per
         session), then ``active2``: active install with 2 NICs (every new session
         recorded for the owner's PUSH, ``drain_created`` once per batch as the agent
         does; the hosts are NIC 0's).  Target: >= 300k setups/s on one core (log off).
         extra_info: ``per_s`` (best round), ``per_s_median``.
         ``gc=frozen``: the same with ``gc.freeze()`` after every batch -- what a NIC
         process gains if it keeps its long-lived rule objects out of the cyclic
         collector (a process policy, not the builder's: the builder's own garbage has
         no cycles and is freed by reference counting).  At 100k mappings the
         collector's passes over them were 20-35% of a setup's cost; the builder keeps
         per-session state in untracked containers (a dict of ints, flat int lists),
         so what is left is one tracked object per mapping.
sweep    one ``sweep`` step (the defaults: 1024 slots of each table; at most 64
         expirations or 40 us of expiry work) over a
         builder holding HYPERNAT_BENCH_RULES (default 1M) sessions: a step that expires
         nothing (pure scan), and steps that each expire their maximum.  Target: no step
         longer than 100 us.  extra_info: ``step_us_max`` / ``step_us_median``, ``steps``,
         ``rules``, ``us_per_million_rules_full_pass`` (the time a whole-table pass costs,
         spread over steps).

On a shared 2-core machine read these as ratios to the calibration benchmark in
bench_fastpath.py run in the same session, not as absolute numbers.
"""
import gc
import os
import time

import numpy as np
import pytest

from hypernat import config, layout
from hypernat.fastpath import FlowTable
from hypernat.rules import ACT_REPLAY, RuleBuilder
from hypernat.translog import TransLog
from hypernat.verdicts import OUT, VERDICT

BATCH = 256
N_SETUPS = int(os.environ.get("HYPERNAT_BENCH_SETUPS", "100000"))
N_RULES = int(os.environ.get("HYPERNAT_BENCH_RULES", str(1 << 20)))
ROUNDS = int(os.environ.get("HYPERNAT_BENCH_ROUNDS", "20"))


def bench_config(capacity, nics=1, install="passive"):
    return config.from_dict(
        {
            "internal": {"prefixes": ["10.0.0.0/8"]},
            "external": {"pool": ["198.18.0.0/16"], "ports": [1024, 65535]},
            "nics": [{"id": i, "inside": f"i{i}", "outside": f"o{i}"} for i in range(nics)],
            "install": install,
            "filtering": "endpoint-independent",
            "limits": {"flow_table_capacity": capacity, "ports_per_host": 4096, "port_block_size": 64},
        },
        "bench",
    )


def miss_batches(n, seed=1, hosts=None):
    """n first packets: 1 host per 64 sessions (`hosts`: their addresses, default
    10.0.0.0, 10.0.0.1, ...), distinct source ports, KEY_DTYPE batches."""
    rng = np.random.default_rng(seed)
    k = np.arange(n, dtype=np.uint64)
    keys = np.zeros(n, layout.KEY_DTYPE)
    keys["proto"] = np.where(k % 2 == 0, layout.PROTO_TCP, layout.PROTO_UDP)
    keys["saddr"] = 0x0A000000 + (k >> 6) if hosts is None else np.asarray(hosts, np.uint32)[k >> 6]
    keys["sport"] = 10000 + (k & 63)
    keys["daddr"] = rng.integers(0x01000000, 0xBF000000, n)
    keys["dport"] = 443
    keys["tcp_flags"] = np.where(keys["proto"] == layout.PROTO_TCP, layout.TCP_SYN, 0)
    verd = np.full(BATCH, VERDICT["miss_out"], np.uint8)
    return [(verd[: min(BATCH, n - i)], keys[i : i + BATCH]) for i in range(0, n, BATCH)]


def new_builder(n, translog=None, nics=1, install="passive"):
    cfg = bench_config(max(n, 16), nics, install)
    return RuleBuilder(cfg, 0, FlowTable(n), FlowTable(n), rng=np.random.default_rng(7), translog=translog)


def own_hosts(rb, count):
    """`count` internal hosts whose EIM owner is rb's NIC (10.0.0.0 upward)."""
    out, a = [], 0x0A000000
    while len(out) < count:
        if rb.part.eim_owner(a) == rb.nic:
            out.append(a)
        a += 1
    return out


def record(benchmark, count):
    benchmark.extra_info["items_per_round"] = count
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        benchmark.extra_info["per_s"] = count / stats.stats.min
        benchmark.extra_info["per_s_median"] = count / stats.stats.median


@pytest.mark.parametrize("log,gc_policy", [("off", "default"), ("on", "default"), ("remote", "default"),
                                            ("active2", "default"), ("off", "frozen")])
def test_rule_setups(benchmark, tmp_path, log, gc_policy):
    n = N_SETUPS if not benchmark.disabled else min(N_SETUPS, 20000)
    nics, install = (2, "active") if log == "active2" else (1, "passive")
    hosts = own_hosts(new_builder(16, None, nics, install), -(-n // 64)) if nics > 1 else None
    batches = miss_batches(n, hosts=hosts)
    state = {}

    def setup():
        tl = None
        if log in ("on", "remote"):
            tl = TransLog(str(tmp_path / f"tl-{log}.jsonl"), "per-rule", remote=log == "remote")
        state["rb"] = new_builder(n, tl, nics, install)
        state["created"] = 0

    def run():
        rb = state["rb"]
        freeze = gc.freeze if gc_policy == "frozen" else None
        drain = rb.drain_created if rb.track_created else None
        try:
            for verd, keys in batches:
                rb.handle_misses(OUT, verd, keys, 1000)
                if drain is not None:
                    state["created"] += len(drain())
                if freeze is not None:
                    freeze()
        finally:
            gc.unfreeze()

    benchmark.pedantic(run, setup=setup, rounds=max(3, ROUNDS // 4), warmup_rounds=0)
    rb = state["rb"]
    assert len(rb.out) == n and len(rb.inn) == n  # every setup installed both entries
    record(benchmark, n)
    benchmark.extra_info["translation_log"] = log
    benchmark.extra_info["gc"] = gc_policy
    if rb.translog is not None:
        rb.translog.close()
        assert rb.translog.lines == n  # one line per mapping (each a session)
    if rb.track_created:
        assert state["created"] == n  # every session recorded for its PUSH


@pytest.fixture(scope="module")
def big_builder(request):
    n = N_RULES
    if request.config.getoption("benchmark_disable", False):
        n = min(n, 50000)
    rb = new_builder(n)
    for verd, keys in miss_batches(n, seed=3):
        d = rb.handle_misses(OUT, verd, keys, 1000)
        assert (d.action == ACT_REPLAY).all()
    return rb


def _steps(rb, now, count, max_expire=None):
    times = np.zeros(count)
    expired = 0
    for i in range(count):
        t0 = time.perf_counter()
        r = rb.sweep(now, max_expire=max_expire)
        times[i] = time.perf_counter() - t0
        expired += r.expired
    return times, expired


def test_sweep_step_scan(benchmark, big_builder):
    """Steps that expire nothing: a full pass over both tables, one step per batch."""
    rb = big_builder
    steps = -(-len(rb.out.slots) // rb.sweep_step)
    out = {}

    def run():
        out["t"], out["expired"] = _steps(rb, 1001, steps)

    benchmark.pedantic(run, rounds=3, warmup_rounds=0)
    assert out["expired"] == 0 and len(rb.out) > 0
    t = out["t"]
    benchmark.extra_info.update(
        rules=len(rb.out), steps=steps, step_us_max=float(t.max() * 1e6), step_us_median=float(np.median(t) * 1e6),
        step_us_p99=float(np.percentile(t, 99) * 1e6),
        us_per_million_rules_full_pass=float(t.sum() * 1e6 / (len(rb.out) / 1e6)),
    )  # fmt: skip


def test_sweep_step_expiring(benchmark, big_builder):
    """Steps where everything is idle: each expires its maximum (sweep_max_expire)."""
    rb = big_builder
    out = {}

    def run():
        out["t"], out["expired"] = _steps(rb, 1000 + 10**6, 1000)

    benchmark.pedantic(run, rounds=1, warmup_rounds=0)
    t = out["t"]
    assert out["expired"] > 0
    benchmark.extra_info.update(
        rules=len(rb.out), steps=len(t), expired=out["expired"], step_us_max=float(t.max() * 1e6),
        step_us_median=float(np.median(t) * 1e6), step_us_p99=float(np.percentile(t, 99) * 1e6),
        expired_per_s=float(out["expired"] / t.sum()),
    )  # fmt: skip
