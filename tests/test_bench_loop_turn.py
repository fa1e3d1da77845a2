"""benchmarks/bench_loop_turn.py at a tiny size: it builds its worker, runs both phases at
both sizes, and prints one well-formed ``LOOP_TURN`` line (no timing is asserted)."""
import importlib.util
import json
import os

import pytest

pytestmark = pytest.mark.timeout(180)

_path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bench_loop_turn.py")
_spec = importlib.util.spec_from_file_location("bench_loop_turn", _path)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_tiny_run_reports_percentiles_per_phase_and_the_jobs_of_the_worst_turns(capsys):
    res = bench.main(["--rules", "3000", "--clones", "3000", "--baseline", "500", "--seconds", "0.8",
                      "--idle-seconds", "0.3"])
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("LOOP_TURN ")]
    assert len(lines) == 1
    assert json.loads(lines[0].split(" ", 1)[1]) == json.loads(json.dumps(res))
    for size, n in (("baseline", 500), ("big", 3000)):
        r = res[size]
        assert r["size"]["rules"] == n and r["size"]["clones"] == n and r["size"]["leases"] == n
        for phase in ("idle", "jobs"):
            p = r[phase]
            assert p["turns"] > 0 and p["frames_per_turn"] > 0
            assert 0 < p["p50_ms"] <= p["p99_ms"] <= p["p999_ms"] <= p["max_ms"]
        j = r["jobs"]
        assert j["worst_turns"] and sum(v for k, v in j["worst_blame"].items() if k.startswith("all:")) >= 1
        assert set(j["timers"]) >= {"agent_activity", "agent_retransmit", "sweep"}
        assert n // 2 <= j["clones_left"] <= n and 0 <= j["leases_left"] <= n  # (how many ended: timing)
        assert j["agent"]["retries"] > 0 and j["agent"]["activity_reported"] > 0
    assert set(res["ratios"]) == {"big_jobs_over_baseline_jobs_p999", "big_jobs_over_big_idle_p999",
                                  "big_jobs_over_baseline_jobs_p50"}
