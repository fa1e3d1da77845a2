"""Scale-up: the aggregate rate of 2 NIC workers against 1 on the same pre-hashed trace
(paper Fig. 4: 2 NICs 1643 Kpps, 1 NIC 724 Kpps, 2.27x; target here >= 1.8x).

    trace   FLOWS flows (paper trace 1: 10k), TRACE_FRAMES 64-byte outgoing frames,
            uniform over the flows; hashed ONCE, before the measurement, with the switch's
            SHA-1 over the 5-tuple into one sub-trace per NIC (the emulation must not
            share the cores being measured)
    worker  the real NicWorker loop (poll, translate, send, misses to the RuleBuilder,
            agent timers, sweep) in its own process, over a TracePort (replays its
            sub-trace, one memcpy per batch restores the pristine frames) and a SinkPort
            (counts), connected to a real coordinator process
    run     warm-up (every flow's rule built), then all workers measured together for
            SECONDS; rate = frames sent by all workers / SECONDS

extra_info: ``mpps`` (aggregate, the N-worker run), ``mpps_1``, ``speedup``, and
``coord_cpu_share`` (coordinator CPU seconds / wall seconds during the N-worker run;
target < 5% of a core).  Address-and-port-dependent mapping: each NIC allocates what it
sees, as in the paper, so the measurement is the loop, not the cloning (the cloning's
cost is bench_first_packet's subject).  On a 2-vCPU VM shared with other work, 2 workers
cannot show more than the cores they actually get: read the speedup together with the
machine's load.

    .venv/bin/python -m pytest benchmarks/bench_scaleup.py -s
    HYPERNAT_SCALEUP_SECONDS=5 HYPERNAT_SCALEUP_WORKERS=2 HYPERNAT_SCALEUP_ROUNDS=3 ...
"""
import multiprocessing as mp
import os
import queue
import signal
import time

import numpy as np
import pytest

from hypernat.agent import predict_nic
from hypernat.lab.deadline import must
from hypernat.lab.emulated import _coord_main, emulated_config

SECONDS = float(os.environ.get("HYPERNAT_SCALEUP_SECONDS", "2"))
WORKERS = int(os.environ.get("HYPERNAT_SCALEUP_WORKERS", "2"))
FLOWS = int(os.environ.get("HYPERNAT_SCALEUP_FLOWS", "10000"))
TRACE_FRAMES = 1 << 15
ROUNDS = int(os.environ.get("HYPERNAT_SCALEUP_ROUNDS", "3"))


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _worker(cfg, nic, frames, start, seconds, out):
    from hypernat.io.memory import SinkPort, TracePort
    from hypernat.nic.worker import NicWorker

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    inside, outside = TracePort(frames, batch_size=256, name=f"trace{nic}"), SinkPort(f"sink{nic}")
    w = NicWorker(cfg, nic, inside, outside, state_dir=os.path.join(cfg.state_dir, f"bench{nic}"), journal=False,
                  restore=False)
    w.run(duration=1.0)  # warm-up: the first pass over the trace builds every flow's rule
    if not start.wait(120):  # the parent gave up (it raises on its own deadlines)
        w.close()
        return
    n0, t0 = outside.counters["tx_packets"], time.perf_counter()
    end = t0 + seconds
    while time.perf_counter() < end:
        w.run_once(0)
    out.put((nic, outside.counters["tx_packets"] - n0, time.perf_counter() - t0))
    w.close()


def _trace(kit, n_flows):
    flows = kit.Flows(n_flows)
    flows.iaddr = (0x0A000000 + np.arange(n_flows) % 60000).astype(np.uint32)  # inside 10.0.0.0/16
    idx = kit.flow_indices(n_flows, TRACE_FRAMES, "uniform")
    buf = kit.build_trace(flows, idx, 0).reshape(-1, kit.FRAME)
    frames = [bytes(buf[i]) for i in range(len(buf))]
    nic_of = np.array([predict_nic("sha1", WORKERS, int(flows.proto[k]), int(flows.iaddr[k]), int(flows.iport[k]),
                                   int(flows.raddr[k]), int(flows.rport[k])) for k in range(n_flows)])
    return frames, nic_of[idx]


def measure(kit, n_workers, frames, nic_of, seconds):
    cfg = emulated_config(n_workers, mapping="address-and-port-dependent", pool="198.18.0.0/24",
                          limits={"flow_table_capacity": 65536, "ports_per_host": 64512})
    ctx = mp.get_context("fork")
    os.makedirs(os.path.dirname(cfg.coordinator.endpoint[6:]), exist_ok=True)
    ready = ctx.Event()
    coord = ctx.Process(target=_coord_main, args=(cfg, cfg.coordinator.endpoint, ready), daemon=True)
    coord.start()
    must(ready.wait(10), "the coordinator to start", 10)
    start, out = ctx.Event(), ctx.Queue()
    procs = []
    for k in range(n_workers):
        sub = [frames[i] for i in np.flatnonzero(nic_of % n_workers == k)] if n_workers > 1 else frames
        p = ctx.Process(target=_worker, args=(cfg, k, sub, start, seconds, out), daemon=True)
        p.start()
        procs.append(p)
    time.sleep(1.5 + 0.5 * n_workers)  # warm-ups
    c0, t0 = _cpu_seconds(coord.pid), time.perf_counter()
    start.set()
    try:
        res = [out.get(timeout=seconds + 60) for _ in range(n_workers)]
        wall = time.perf_counter() - t0
        coord_cpu = _cpu_seconds(coord.pid) - c0
    except queue.Empty:
        raise RuntimeError(f"a worker did not report within {seconds + 60:g} s "
                           f"(alive: {[p.is_alive() for p in procs]})") from None
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join(5)
        os.kill(coord.pid, signal.SIGTERM)
        coord.join(5)
        if coord.is_alive():
            coord.kill()
            coord.join(5)
    rate = sum(n / t for _, n, t in res)
    return rate, coord_cpu / wall


@pytest.mark.timeout(300)
def test_scaleup(benchmark, kit):
    seconds = SECONDS if not benchmark.disabled else 0.3
    frames, nic_of = _trace(kit, FLOWS)
    res = {}

    def run():
        # alternate 1 and N workers ROUNDS times and keep each one's best run: the rounds a
        # neighbour's burst of CPU disturbed least (the same rule as the other benchmarks)
        r1s, rns, shares = [], [], []
        for _ in range(ROUNDS if not benchmark.disabled else 1):
            r1s.append(measure(kit, 1, frames, nic_of, seconds)[0])
            rn, share = measure(kit, WORKERS, frames, nic_of, seconds)
            rns.append(rn)
            shares.append(share)
        r1, rn = max(r1s), max(rns)
        res.update(mpps_1=r1 / 1e6, mpps=rn / 1e6, speedup=rn / r1, coord_cpu_share=max(shares), workers=WORKERS,
                   flows=FLOWS, seconds=seconds, rounds=len(r1s), mpps_1_all=[round(x / 1e6, 3) for x in r1s],
                   mpps_all=[round(x / 1e6, 3) for x in rns], load=os.getloadavg()[0], cpus=os.cpu_count())

    benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info.update(res)
    print(f"\nscale-up (best of {res['rounds']}): 1 worker {res['mpps_1']:.3f} Mpps, {WORKERS} workers {res['mpps']:.3f} Mpps, "
          f"speedup {res['speedup']:.2f}x, coordinator {100 * res['coord_cpu_share']:.1f}% of a core "
          f"(load {res['load']:.1f} on {res['cpus']} CPUs)")
    assert res["mpps"] > 0 and res["mpps_1"] > 0


# ------------------------------------------------------------------------------------------------
# Fig. 4's one pass on one NIC, in this process: what a new flow costs the loop
# ------------------------------------------------------------------------------------------------
ONE_PASS_FLOWS = int(os.environ.get("HYPERNAT_ONEPASS_FLOWS", "200000"))  # Trace 4


def one_pass(flows: int, seed: int = 4) -> dict:
    """Fig. 4's one pass (hypernat.eval.throughput) on one standalone NIC worker driven in
    this process, CPU time (``time.thread_time``): the trace's outgoing frames (every
    flow's first packet builds its rule), then the reflected replies (all hits), then
    both again with every rule in place (the established pass, ~2M frames).  A new
    flow's cost is the one pass's CPU beyond what its frames cost established, per rule
    built; ``decide_us_per_flow`` the part spent in ``RuleBuilder.decide_misses``
    (timed per call), ``rest_us_per_flow`` the rest of the loop's.  The ports keep
    references to what they send and gather it after the pass (the harness's copies stay
    out of the CPU measured)."""
    import tempfile

    from hypernat import trace as T
    from hypernat.eval import throughput as TH
    from hypernat.nic.worker import NicWorker

    class Port(TH.PhasePort):
        def send(self, batch, idx):
            idx = np.asarray(idx)
            self.tx += len(idx)
            if self.capture and len(idx):
                self._kept.append((batch.buf, batch.offsets[idx], batch.lengths[idx]))
            return len(idx)

        def take(self):
            rows, lens = [], []
            for buf, o, ln in self._kept:
                pos = np.minimum(o.astype(np.int64)[:, None] + np.arange(TH.FRAME)[None, :], len(buf) - 1)
                rows.append(buf[pos])
                lens.append(np.minimum(ln, TH.FRAME).astype(np.uint32))
            self._kept = []
            return np.concatenate(rows), np.concatenate(lens)

    tr = T.generate(T.Params(flows=flows, seed=seed))
    a, incl = T.headers(tr, TH.FRAME, fixlen=True)
    f = np.zeros((len(a), TH.FRAME), np.uint8)
    f[:, : a.shape[1]] = a[:, : TH.FRAME]
    incl = incl.astype(np.uint32)
    cfg = emulated_config(1, mapping="address-and-port-dependent", pool="198.18.0.0/24",
                          limits={"flow_table_capacity": 1 << 19, "ports_per_host": 64512,
                                  "fetch_rate_per_source": TH.FETCH_RATE})
    inside, outside = Port("in0"), Port("out0")
    with tempfile.TemporaryDirectory() as sd:
        w = NicWorker(cfg, 0, inside, outside, standalone=True, journal=False, restore=False, state_dir=sd)
        decide = [0.0]
        inner = w.rules.decide_misses

        def timed(*args, **kw):
            t = time.thread_time()
            try:
                return inner(*args, **kw)
            finally:
                decide[0] += time.thread_time() - t

        w.rules.decide_misses = timed
        try:
            def run(src):
                c0 = time.thread_time()
                end = time.monotonic() + TH.PHASE_MAX_S
                while not src.exhausted and time.monotonic() < end:
                    w.run_once(0)
                for _ in range(5):  # what the last turn left (nothing, standalone)
                    w.run_once(0)
                return time.thread_time() - c0

            inside.load(f, incl, 1)
            outside.capture = True
            cpu = run(inside)
            rf, rl = outside.take()
            rf = TH._reflect(rf)
            outside.capture = False
            outside.load(rf, rl, 1)
            cpu += run(outside)
            frames = len(f) + len(rf)
            sent = inside.tx + outside.tx
            rules = len(w.out_table)
            decided = decide[0]
            rounds = max(1, int(round(2e6 / frames)))
            inside.load(f, incl, rounds)
            outside.load(rf, rl, rounds)
            tx0 = inside.tx + outside.tx
            est = run(TH._Both(inside, outside))
            est_frames = inside.tx + outside.tx - tx0
        finally:
            w.close()
    per_frame = est / max(est_frames, 1)
    new = (cpu - frames * per_frame) / max(rules, 1)
    return {"flows": flows, "frames": frames, "sent": sent, "rules": rules, "one_pass_cpu_s": round(cpu, 3),
            "established_ns_per_frame": round(per_frame * 1e9, 1),
            "us_per_new_flow": round(new * 1e6, 2), "decide_us_per_flow": round(decided / max(rules, 1) * 1e6, 2),
            "rest_us_per_flow": round((new - decided / max(rules, 1)) * 1e6, 2),
            "one_pass_over_established": round(frames / cpu * per_frame, 4)}


@pytest.mark.timeout(600)
def test_one_pass_cost_per_new_flow(benchmark):
    res = {}

    def run():
        res.update(one_pass(ONE_PASS_FLOWS if not benchmark.disabled else 2000))

    benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info.update(res, load=os.getloadavg()[0])
    print(f"\nFig. 4 one pass, 1 NIC, {res['flows']} flows: {res['us_per_new_flow']} us of CPU per new flow "
          f"(decide_misses {res['decide_us_per_flow']}, the rest of the loop {res['rest_us_per_flow']}); "
          f"one pass at {100 * res['one_pass_over_established']:.1f}% of the established rate")
    assert res["sent"] == res["frames"] and res["rules"] > 0
