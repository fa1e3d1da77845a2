"""Whatever the bytes, lengths and offsets: no crash, no access outside a frame.

    buf:  [guard][frame 0][guard][frame 1][guard] ...      guard = random bytes
          translate(...) must leave every guard byte as it was, and every frame that
          is not sent (any verdict but translated / hairpin) exactly as it was.

Invariant 5 of DESIGN.md.  The compiled module runs without bounds checks, so the same
tests also run against a debug build (``HYPERNAT_DEBUG=1``: Cython bounds checks plus
the module's own frame-bounds assertions) built into a temporary directory by
``test_under_debug_build`` -- or by hand::

    make debug                      # rebuilds hypernat/_fastpath in place, bounds checks on
    .venv/bin/python -m pytest -q tests/test_fastpath_robustness.py tests/test_fastpath_twins.py \\
        -W error::pytest.PytestUnraisableExceptionWarning
    make build                      # back to the release build (make debug used --force;
                                    # run `make clean build` if the release .c is stale)
"""
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fixtures.fastpath_oracle import ROUTER, mixed_batch, router_frames, run_frames, standard_env, template_frames
from hypernat.layout import KEY_DTYPE
from hypernat.verdicts import IN, N_VERDICTS, OUT, REWRITTEN_VERDICTS, SEND_VERDICTS, VERDICT

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TEMPLATES = [f for f, _ in template_frames()]


@st.composite
def frame_bytes(draw):
    """Garbage, or a template frame with some bytes overwritten / cut / extended."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=120))
    f = bytearray(draw(st.sampled_from(TEMPLATES)))
    for _ in range(draw(st.integers(0, 4))):
        pos = draw(st.integers(0, len(f) - 1))
        f[pos] = draw(st.integers(0, 255))
    cut = draw(st.integers(0, len(f) + 8))
    return bytes(f[:cut]) + draw(st.binary(max_size=max(0, cut - len(f))))


HEALTH = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]


@settings(max_examples=150, deadline=None, suppress_health_check=HEALTH)
@given(frames=st.lists(frame_bytes(), min_size=1, max_size=12), direction=st.sampled_from([OUT, IN]),
       now=st.integers(0, 2**32 - 1))
def test_arbitrary_frames_guarded(fp, frames, direction, now):
    env = standard_env(fp)
    out, verdicts, _ = run_frames(env.tr, frames, direction, now=now)  # checks the guards
    assert all(v < N_VERDICTS for v in verdicts)
    for f, o, v in zip(frames, out, verdicts):
        if v not in SEND_VERDICTS:
            assert o == f
    assert int(env.tr.counters[direction].sum()) == len(frames)
    assert int(env.tr.counters[1 - direction].sum()) == 0


u32 = st.one_of(st.integers(0, 2**32 - 1), st.integers(0, 300), st.integers(2**32 - 300, 2**32 - 1))


@settings(max_examples=150, deadline=None, suppress_health_check=HEALTH)
@given(data=st.binary(min_size=1, max_size=400), spans=st.lists(st.tuples(u32, u32), min_size=1, max_size=10),
       direction=st.sampled_from([OUT, IN]), seed_frame=st.sampled_from(TEMPLATES))
def test_arbitrary_offsets_and_lengths(fp, data, spans, direction, seed_frame):
    """Frames anywhere, overlapping, beyond the end, wrapping 32 bits: bytes outside
    every in-buffer frame are never touched."""
    buf = np.frombuffer(bytearray(seed_frame + data), dtype=np.uint8)
    before = buf.copy()
    offsets = np.array([o for o, _ in spans], np.uint32)
    lengths = np.array([n for _, n in spans], np.uint32)
    verdicts = np.zeros(len(spans), np.uint8)
    keys = np.zeros(len(spans), KEY_DTYPE)
    env = standard_env(fp)
    env.tr.translate(buf, offsets, lengths, direction, 1, verdicts, keys)
    inside = np.zeros(len(buf), bool)
    for o, n in spans:
        if o + n <= len(buf):
            inside[o : o + n] = True
        else:
            assert verdicts[spans.index((o, n))] == VERDICT["drop_truncated"]
    assert np.array_equal(buf[~inside], before[~inside])
    assert int(env.tr.counters.sum()) == len(spans)


@pytest.mark.parametrize("seed", range(8))
def test_mutated_batches_guarded(fp, seed):
    """Big mixed batches (every verdict), each frame between guard bytes."""
    env = standard_env(fp)
    frames, dirs = mixed_batch(1000 + seed, 1200)
    for direction in (OUT, IN):
        fr = [f for f, d in zip(frames, dirs) if d == direction]
        out, verdicts, _ = run_frames(env.tr, fr, direction)
        for f, o, v in zip(fr, out, verdicts):
            assert len(o) == len(f)
            if v not in SEND_VERDICTS:
                assert o == f


@pytest.mark.parametrize("seed", range(4))
def test_mutated_batches_guarded_as_a_router(fp, seed):
    """The same with the router on: frames not sent (nor rewritten to be fragmented)
    are untouched, and every generated frame lies in the output area and holds an
    IPv4 header whose checksum is right."""
    env = standard_env(fp)
    env.tr.set_router(**ROUTER)
    frames, dirs = mixed_batch(2000 + seed, 1200, template_frames() + router_frames() * 3)
    for direction in (OUT, IN):
        fr = [f for f, d in zip(frames, dirs) if d == direction]
        out, verdicts, _ = run_frames(env.tr, fr, direction)
        for f, o, v in zip(fr, out, verdicts):
            assert len(o) == len(f)
            if v not in SEND_VERDICTS and v not in REWRITTEN_VERDICTS:
                assert o == f
        tr = env.tr
        n = tr.out_count
        assert n == len(tr.generated()) > 0
        ends = tr.out_offsets[:n].astype(np.int64) + tr.out_lengths[:n]
        assert ends.max() <= len(tr.out_buf) and np.all(tr.out_offsets[1:n] == ends[:-1])
        for exit_, g in tr.generated():
            l3 = 18 if g[12:14] == b"\x81\x00" else 14
            ihl = (g[l3] & 15) * 4
            hdr = g[l3 : l3 + ihl]
            s_ = sum(int.from_bytes(hdr[i : i + 2], "big") for i in range(0, ihl, 2))
            while s_ >> 16:
                s_ = (s_ & 0xFFFF) + (s_ >> 16)
            assert s_ == 0xFFFF and int.from_bytes(g[l3 + 2 : l3 + 4], "big") == len(g) - l3
            assert len(g) - l3 <= (ROUTER["outside_mtu"] if exit_ == OUT else ROUTER["inside_mtu"])


def test_same_frame_twice_in_a_batch(fp):
    """Two entries pointing at the same bytes: translated once, then seen translated."""
    env = standard_env(fp)
    frame = TEMPLATES[0]  # tcp syn out, hits
    buf = np.frombuffer(bytearray(frame), dtype=np.uint8)
    offsets = np.zeros(2, np.uint32)
    lengths = np.full(2, len(frame), np.uint32)
    v = np.zeros(2, np.uint8)
    env.tr.translate(buf, offsets, lengths, OUT, 1, v)
    # translated, then miss_out: the source is now E1:40001
    assert list(v) == [VERDICT["translated"], VERDICT["miss_out"]]


def test_zero_length_and_huge_batch_values(fp):
    env = standard_env(fp)
    buf = np.zeros(64, np.uint8)
    n = 1000
    offsets = np.random.default_rng(1).integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32)
    lengths = np.random.default_rng(2).integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32)
    lengths[::2] = 0
    v = np.zeros(n, np.uint8)
    env.tr.translate(buf, offsets, lengths, IN, 0, v)
    assert not buf.any()
    assert set(v.tolist()) == {VERDICT["drop_truncated"]}


# ---------------------------------------------------------------------------------------
# The same under the debug build (bounds checks on)
# ---------------------------------------------------------------------------------------

def _expands_to_pxi(path) -> bool:
    """A declared list setup.py expands into a Cython enum (verdicts.py, wire_reasons.py:
    each defines pxi_source())."""
    with open(path) as f:
        return "\ndef pxi_source(" in f.read()


def _debug_build_dir():
    """Build hypernat._fastpath with HYPERNAT_DEBUG=1 into a cache directory keyed by
    its sources, from a copy of them (the in-tree release build and its generated C
    are left alone).  Returns the path of the built extension."""
    pkg = os.path.join(ROOT, "hypernat")
    srcs = sorted(n for n in os.listdir(pkg) if n.endswith((".pyx", ".pxd", ".pxi")) or n == "__init__.py"
                  or (n.endswith(".py") and _expands_to_pxi(os.path.join(pkg, n))))
    h = hashlib.sha256()
    for name in ["../setup.py"] + srcs:
        with open(os.path.join(pkg, name), "rb") as f:
            h.update(name.encode() + f.read())
    d = os.path.join(tempfile.gettempdir(), f"hypernat-debug-{os.getuid()}-{h.hexdigest()[:16]}")
    if not os.path.exists(os.path.join(d, "ok")):
        tmp = d + f".tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(os.path.join(tmp, "hypernat"))
        shutil.copy(os.path.join(ROOT, "setup.py"), tmp)
        for name in srcs:
            shutil.copy(os.path.join(pkg, name), os.path.join(tmp, "hypernat"))
        env = dict(os.environ, HYPERNAT_DEBUG="1", HYPERNAT_BUILD_ONLY="hypernat._fastpath")
        r = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=tmp, env=env,
                           capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            pytest.fail(f"debug build failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
        open(os.path.join(tmp, "ok"), "w").close()
        try:
            os.rename(tmp, d)
        except OSError:  # a concurrent run won the race
            shutil.rmtree(tmp, ignore_errors=True)
    so = [n for n in os.listdir(os.path.join(d, "hypernat")) if n.startswith("_fastpath.") and n.endswith(".so")]
    assert len(so) == 1, so
    return os.path.join(d, "hypernat", so[0])


# Load the debug extension as hypernat._fastpath (the rest of the package is the tree's
# own), then run the given test files on it.
DEBUG_RUNNER = r"""
import importlib.util, sys
import hypernat
spec = importlib.util.spec_from_file_location("hypernat._fastpath", sys.argv[1])
m = importlib.util.module_from_spec(spec)
sys.modules["hypernat._fastpath"] = m
spec.loader.exec_module(m)
hypernat._fastpath = m
import importlib
assert importlib.import_module("hypernat._fastpath").__file__ == sys.argv[1]
import pytest
sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", "-W", "error::pytest.PytestUnraisableExceptionWarning",
                      "-k", "not python", *sys.argv[2:]]))
"""


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("HYPERNAT_UNDER_DEBUG_BUILD") == "1", reason="already the debug run")
def test_under_debug_build():
    """The robustness, malformed-input and twin tests against the bounds-checked build.
    An out-of-frame access there raises IndexError (or trips an assertion); in a
    ``noexcept`` function that becomes an "Exception ignored" report, which the
    -W error flag turns into a failure."""
    d = _debug_build_dir()
    env = dict(os.environ, HYPERNAT_UNDER_DEBUG_BUILD="1")
    tests = [os.path.join(HERE, n) for n in
             ("test_fastpath_robustness.py", "test_fastpath_malformed.py", "test_fastpath_twins.py",
              "test_fastpath_icmp_errors.py", "test_fastpath_partial.py", "test_fastpath_icmp_gen.py",
              "test_fastpath_mss.py")]
    r = subprocess.run([sys.executable, "-c", DEBUG_RUNNER, d, *tests], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    tail = (r.stdout[-4000:] + r.stderr[-2000:])
    assert r.returncode == 0, tail
    assert "Exception ignored" not in r.stdout + r.stderr, tail
    assert " passed" in r.stdout, tail
