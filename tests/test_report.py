"""`hypernat report --quick` produces every file, each with real content."""
import json
import os

import pytest

from hypernat import report

pytest.importorskip("matplotlib")

EXPECTED = [f"{name}.{ext}" for name in ("fig4", "fig5", "table1", "fig6", "availability")
            for ext in ("json", "md", "png")]


@pytest.mark.timeout(300)
def test_quick_report_writes_every_file(tmp_path):
    out = tmp_path / "results"
    assert report.main(["--quick", "--out", str(out)]) == 0
    files = sorted(os.listdir(out))
    for f in EXPECTED + ["summary.md"]:
        assert f in files, f
        assert (out / f).stat().st_size > 100, f
    for f in EXPECTED:
        if f.endswith(".png"):
            assert (out / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fig4 = json.loads((out / "fig4.json").read_text())
    configs = {(r["trace"], r["config"]) for r in fig4["rows"]}
    assert configs == {(t, c) for t in (1, 2, 3, 4) for c in ("hypernat-2nic", "hypernat-1nic", "servernat")}
    for r in fig4["rows"]:
        assert r["kpps"] > 0 and r["kpps_established"] > 0
        # every frame of the outgoing pass was translated by a single NIC: nothing crosses
        assert r["phase"]["out"]["frames_out"] <= r["phase"]["out"]["frames_in"]
        if r["config"] != "hypernat-2nic":
            assert r["clones"] == 0 and r["fetches"] == 0  # one NIC: replies return to the owner
            # the IN phase replays the OUT phase's capture, reflected: only if the capture
            # holds the translated bytes does every reply find its rule and translate back
            assert r["phase"]["in"]["frames_out"] == r["phase"]["in"]["frames_in"] == r["phase"]["out"]["frames_out"]
    two = [r for r in fig4["rows"] if r["config"] == "hypernat-2nic"]
    assert all(r["clones"] > 0 for r in two)  # two NICs: split connections are cloned
    t1 = json.loads((out / "table1.json").read_text())
    rows = [r[0] for r in t1["paper"]]
    assert len(rows) == 8 and rows[1] == "Arrive at 1st NIC" and rows[6] == "Rule installed on 2nd NIC"
    for install in ("passive", "active"):
        run = t1["runs"][install]
        assert run["connections"] > 0 and run["rows"] == rows
        for first, later in zip(run["first"], run["later"]):
            assert None not in first and None not in later  # every event measured, none estimated
            t0, arr1, inst1, recv, ack, arr2, inst2, back = first  # causal order
            assert t0 == 0 < arr1 <= inst1 <= recv <= ack <= arr2 <= back and inst2 <= back
            if install == "passive":
                assert arr2 <= inst2  # the clone is fetched after the miss
            t0, arr1, inst1, recv, ack, arr2, inst2, back = later
            assert arr1 == inst1 and arr2 == inst2 and arr1 <= recv <= ack <= arr2 <= back
        for kind in ("first", "later"):
            assert all(t1["summary"][install][kind][r][0] is not None for r in rows)
    t1md = (out / "table1.md").read_text()
    assert "est." not in t1md and "Arrive at 1st NIC" in t1md and "ACK at 2nd NIC" in t1md
    f6 = json.loads((out / "fig6.json").read_text())
    assert len(f6["summary"]) == 2
    for s in f6["summary"].values():
        assert s["answered"] > 0.9 * s["packets"]
    summary = (out / "summary.md").read_text()
    assert "1643.3 Kpps" in summary and "2269 µs" in summary and "vCPUs" in summary


def test_unknown_experiment_is_refused(capsys):
    assert report.main(["fig9"]) == 2
    assert "unknown experiment" in capsys.readouterr().err


def test_summary_of_nothing(tmp_path):
    text = report.summary(str(tmp_path))
    assert "nothing measured yet" in text


def test_refresh_docs_replaces_only_marked_tables(tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    (out / "fig4.md").write_text("| a | b |\n|---|---|\n| 1 | 2 |\n\nnotes that stay out of the page\n")
    docs = tmp_path / "results.md"
    docs.write_text("prose 1\n<!-- table:fig4 -->\n| old |\n<!-- /table:fig4 -->\nprose 2\n"
                    "<!-- table:fig6 -->\n| keep |\n<!-- /table:fig6 -->\n")
    assert report.refresh_docs(str(out), str(docs)) == ["fig4"]
    text = docs.read_text()
    assert "| 1 | 2 |" in text and "| old |" not in text and "notes that stay" not in text
    assert "| keep |" in text and text.startswith("prose 1\n") and "prose 2" in text


@pytest.mark.timeout(120)
def test_table1_quick_is_the_papers_full_table_with_no_estimated_row(tmp_path):
    from hypernat.eval.latency import PAPER_TABLE1

    out = tmp_path / "r"
    assert report.main(["table1", "--quick", "--out", str(out)]) == 0
    lines = (out / "table1.md").read_text().splitlines()
    body = [ln for ln in lines[2:] if ln.startswith("| ")]
    assert [ln.split(" | ")[0][2:] for ln in body] == [r[0] for r in PAPER_TABLE1]  # every row, in order
    for ln in body:
        cells = ln.strip("| ").split(" | ")
        assert len(cells) == 7 and "-" not in cells[1:5] and "est" not in cells[0], ln  # measured, all columns
    t1 = json.loads((out / "table1.json").read_text())
    assert t1["clock"].startswith("CLOCK_MONOTONIC")
    for install in ("passive", "active"):
        assert t1["runs"][install]["events_dropped"] == 0
        assert "missing" not in t1["summary"][install]["first"] and "missing" not in t1["summary"][install]["later"]


def test_phase_port_capture_is_what_was_sent():
    """Fig. 4's capture (the OUT phase's translated frames, reflected into the IN phase)
    keeps references to batches replayed once and reads them after the timed pass: what
    it returns is still exactly the bytes sent, in the order sent -- also when the
    sender reuses its index array, for a selection of such a batch (the replay of its
    misses: kept by reference too, not copied in the timed pass), and when a batch that is not replayed once (the
    translator's output area, a replay's copies) is rewritten right after its send."""
    import numpy as np

    from hypernat.eval.throughput import FRAME, PhasePort
    from hypernat.io.base import Batch

    rng = np.random.default_rng(7)
    frames = rng.integers(0, 256, (700, FRAME), dtype=np.uint8)
    lengths = np.full(700, FRAME, np.uint32)
    src, sink = PhasePort("src", batch=256), PhasePort("sink")
    sink.capture = True
    src.load(frames, lengths)
    scratch = np.arange(256, dtype=np.intp)  # like the worker's self._all
    want = []
    base = 0
    while (b := src.recv()) is not None:
        scratch[:] = np.arange(256)
        sel = scratch[: b.n : 3]
        sink.send(b, sel)
        want.append(frames[base + sel])
        scratch[:] = 0  # the sender reuses its index array
        miss = b.select(np.arange(1, b.n, 3))  # a replay of its misses: translated in place, then sent
        assert type(miss) is type(b)  # a frame of a batch replayed once: kept by reference
        miss.buf[miss.offsets[0]] ^= 0xFF
        frames[base + 1, 0] ^= 0xFF
        sink.send(miss, np.arange(miss.n))
        want.append(frames[base + 1 : base + b.n : 3])
        base += b.n
        reused = Batch(rng.integers(0, 256, 3 * FRAME, dtype=np.uint8),
                       np.arange(3, dtype=np.uint32) * FRAME, np.full(3, FRAME, np.uint32), 3)
        want.append(reused.buf.reshape(3, FRAME)[[0, 2]].copy())
        sink.send(reused, np.array([0, 2]))
        reused.buf[:] = 0  # the output area, reused by the next translate
    got, lens = sink.take()
    assert src.exhausted and sink.tx == sum(len(w) for w in want)
    assert np.array_equal(got, np.concatenate(want)) and (lens == FRAME).all()
    assert sink.take()[0].shape == (0, FRAME)  # taken once
