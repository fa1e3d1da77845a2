"""Golden packets: tests/fixtures/fastpath_golden.json replayed through both twins.

The file freezes the packet tables of the other fast-path tests (input, expected
output built by scapy, verdict, key, the expression that made each row), the table
sessions and the expected counters.  Replaying it needs no scapy; all rows of one
direction go through one batch, so it is also a batch-level check of the counters.
Regenerate with ``tools/mkfixtures.py`` when a table changes; the staleness test
below says so.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fixtures.fastpath_oracle import run_frames
from hypernat.verdicts import DIRECTION_NAMES, VERDICT, VERDICT_NAMES

HERE = os.path.dirname(os.path.abspath(__file__))
GOLDEN = os.path.join(HERE, "fixtures", "fastpath_golden.json")


@pytest.fixture(scope="module")
def golden():
    with open(GOLDEN) as f:
        return json.load(f)


def _tables(fp, golden):
    out, inn = fp.FlowTable(64, hugepages=False), fp.FlowTable(64, hugepages=False)
    for s in golden["sessions"]:
        t = out if s["table"] == "out" else inn
        assert t.insert(s["proto"], s["saddr"], s["sport"], s["daddr"], s["dport"], s["new_addr"], s["new_port"],
                        s["rule_id"])
    return fp.Translator(out, inn, pool=[tuple(p) for p in golden["pool"]])


def test_golden_rows(fp, golden):
    tr = _tables(fp, golden)
    assert len(golden["rows"]) > 150
    for d, dname in enumerate(DIRECTION_NAMES):
        rows = [r for r in golden["rows"] if r["direction"] == dname]
        frames = [bytes.fromhex(r["input"]) for r in rows]
        out, verdicts, keys = run_frames(tr, frames, d)
        for r, o, v, k in zip(rows, out, verdicts, keys):
            what = f"{dname}: {r['description']} ({r['made_by']})"
            assert VERDICT_NAMES[v] == r["verdict"], what
            assert o.hex() == r["expected"], what
            got_key = [int(k[f]) for f in ("proto", "saddr", "sport", "daddr", "dport", "kind", "tcp_flags", "icmp_type")]
            if not r["verdict"].startswith(("drop_", "not_nat", "ttl", "fragment")):
                assert got_key == r["key"], what
            else:
                assert got_key == [0] * 8, what
    want = {d: {n: golden["counters"][d].get(n, 0) for n in VERDICT_NAMES} for d in DIRECTION_NAMES}
    assert tr.counters_dict() == want
    assert want["out"]["translated"] > 0 and want["in"]["translated"] > 0 and want["out"]["hairpin"] > 0
    assert np.all(tr.counters.sum(axis=1) == [sum(c.values()) for c in golden["counters"].values()])
    assert set(VERDICT) >= {r["verdict"] for r in golden["rows"]}


def test_golden_router_rows(fp, golden):
    """Frames the gateway makes itself (ICMP errors, fragments) and MSS clamping: one
    fresh translator per row, the router settings the file names."""
    r = golden["router"]
    assert len(r["rows"]) >= 9
    for row in r["rows"]:
        tr = _tables(fp, golden)
        tr.set_router(**r["settings"])
        d = DIRECTION_NAMES.index(row["direction"])
        out, verdicts, _ = run_frames(tr, [bytes.fromhex(row["input"])], d)
        what = f"{row['direction']}: {row['description']} ({row['made_by']})"
        assert VERDICT_NAMES[verdicts[0]] == row["verdict"], what
        assert out[0].hex() == row["expected"], what
        assert [[DIRECTION_NAMES[x], g.hex()] for x, g in tr.generated()] == row["generated"], what


def test_golden_file_is_current():
    """The file matches the test tables it was made from (scapy rebuilds them)."""
    tool = os.path.join(os.path.dirname(HERE), "tools", "mkfixtures.py")
    r = subprocess.run([sys.executable, tool, "--check"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr + r.stdout
