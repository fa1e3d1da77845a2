"""docs/rfc.md: every requirement row names a test, and every named test exists.

The page's tables have a ``Test`` column holding pytest node ids in backticks
(``tests/test_x.py::test_y``, optionally with a ``[param]`` part) or a
``PENDING(feature)`` marker for behaviour another branch is building.  The named tests
are collected with pytest's own collection, in-process, over just the files the page
names (so a renamed or deleted test fails here, not in a reader's hands).  A marker left
on the page fails ``test_no_pending_rows``, which names every such row: the branch that
brings a feature replaces its marker with the feature's test.
"""
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "rfc.md")
PENDING = re.compile(r"PENDING\(([^)]*)\)")
NODE = re.compile(r"`(tests/[^`:]+\.py::[^`]+)`")


def rows():
    """[(section, requirement, test cell)] of every table row whose header has a Test column."""
    out, section, col = [], "", None
    for line in open(DOC, encoding="utf-8"):
        line = line.rstrip("\n")
        if line.startswith("#"):
            section, col = line.lstrip("# ").strip(), None
            continue
        if not line.startswith("|"):
            col = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if col is None:  # the header row
            col = cells.index("Test") if "Test" in cells else -1
            continue
        if col < 0 or set("".join(cells)) <= set("-: "):
            continue
        assert len(cells) > col, f"docs/rfc.md: row with too few cells in {section}: {line}"
        out.append((section, cells[0], cells[col]))
    return out


def named_tests(cell):
    return NODE.findall(cell)


class _Collector:
    def __init__(self):
        self.ids = set()

    def pytest_collection_modifyitems(self, items):
        self.ids.update(item.nodeid for item in items)


@pytest.fixture(scope="module")
def collected():
    """Node ids pytest collects from the files the page names (in this process)."""
    files = sorted({n.split("::")[0] for _, _, cell in rows() for n in named_tests(cell)})
    missing = [f for f in files if not os.path.exists(os.path.join(ROOT, f))]
    assert not missing, f"docs/rfc.md names test files that do not exist: {missing}"
    col = _Collector()
    rc = pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", "--rootdir", ROOT,
                      "-c", os.path.join(ROOT, "pyproject.toml"), *[os.path.join(ROOT, f) for f in files]],
                     plugins=[col])  # fmt: skip
    assert rc == 0, f"collecting the tests docs/rfc.md names failed (exit code {rc})"
    return col.ids


def test_the_page_has_every_rfc():
    sections = {s for s, _, _ in rows()}
    for rfc in ("RFC 4787", "RFC 5382", "RFC 5508", "RFC 7857", "RFC 6888", "RFC 1812"):
        assert any(s.startswith(rfc) for s in sections), f"docs/rfc.md has no table for {rfc}"
    assert len(rows()) >= 60


def test_every_row_names_a_test():
    bare = [f"{s}: {req}" for s, req, cell in rows() if not named_tests(cell) and not PENDING.search(cell)]
    assert not bare, "docs/rfc.md rows without a test:\n  " + "\n  ".join(bare)


@pytest.mark.timeout(300)
def test_every_named_test_exists(collected):
    base = {n.split("[", 1)[0] for n in collected}
    absent = [f"{s}: {req}: {n}" for s, req, cell in rows() for n in named_tests(cell)
              if n not in collected and ("[" in n or n not in base)]  # fmt: skip
    assert not absent, "docs/rfc.md names tests pytest does not collect:\n  " + "\n  ".join(absent)


def test_no_pending_rows():
    """Fails while a PENDING(feature) marker is on the page (by design: the marker is
    replaced by the feature's test when the feature lands)."""
    pending = [f"{s}: {req}: {m}" for s, req, cell in rows() for m in PENDING.findall(cell)]
    assert not pending, (f"docs/rfc.md: {len(pending)} rows still PENDING (replace each marker with the "
                         "node id of the test that pins the feature):\n  " + "\n  ".join(pending))
