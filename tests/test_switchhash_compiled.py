"""The switch's hash in C (hypernat._switchhash.predict_nics) against its readable
reference (hypernat.switchhash: predictable / predict_nic, record by record): the same
NIC, or the same "cannot predict" (-1), for the same inputs, every hash and field set.
The reference itself is pinned elsewhere against outside oracles (hashlib, zlib, the
kernel's nft jhash in tests/test_lab_peer.py, Microsoft's RSS vectors)."""
import hashlib
import struct
import zlib

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from hypernat import _switchhash as C
from hypernat import switchhash as S

u32 = st.integers(0, 0xFFFFFFFF)
u16 = st.integers(0, 0xFFFF)
protos = st.sampled_from([1, 6, 17, 47, 0, 255]) | st.integers(0, 255)
tuples = st.lists(st.tuples(protos, u32, u16, u32, u16), min_size=0, max_size=40)
keys = st.sampled_from([S.MS_RSS_KEY, S.MS_RSS_KEY[:16], S.MS_RSS_KEY[:12], S.MS_RSS_KEY[:15]]) \
    | st.binary(min_size=16, max_size=52)


def _cols(recs):
    cols = list(zip(*recs)) if recs else [(), (), (), (), ()]
    dts = (np.uint8, np.uint32, np.uint16, np.uint32, np.uint16)
    return [np.array(c, dt) for c, dt in zip(cols, dts)]


@settings(max_examples=100, deadline=None)
@given(recs=tuples, name=st.sampled_from(["sha1", "crc32", "jhash", "nope"]), n=st.integers(1, 9), seed=u32,
       fields=st.sampled_from(["5-tuple", "src"]))
def test_compiled_prediction_equals_reference(recs, name, n, seed, fields):
    cols = _cols(recs)
    want = S.predict_nics(name, n, *cols, seed=seed, fields=fields)
    got = C.predict_nics(name, n, *cols, seed=seed, fields=fields)
    assert got.dtype == np.int32 and got.tolist() == want.tolist()
    for (p, *_), j in zip(recs, got.tolist()):  # -1 exactly where the reference cannot predict
        assert (j == -1) == (not S.predictable(name, p))


@settings(max_examples=100, deadline=None)
@given(recs=tuples, key=keys, table=st.lists(st.integers(0, 7), min_size=1, max_size=64),
       served=st.sets(st.integers(0, 7)), n=st.integers(1, 9))
def test_compiled_toeplitz_equals_reference(recs, key, table, served, n):
    rss = (key, tuple(table), {q: q % n for q in served})
    cols = _cols(recs)
    assert C.predict_nics("toeplitz", n, *cols, rss=rss).tolist() == \
        S.predict_nics("toeplitz", n, *cols, rss=rss).tolist()
    assert (C.predict_nics("toeplitz", n, *cols) == -1).all()  # no key and table: nothing predictable


def test_compiled_hashes_against_outside_oracles():
    """sha1 and crc32 against hashlib and zlib directly (not through the reference)."""
    rng = np.random.default_rng(7)
    m = 500
    cols = [rng.integers(0, 256, m, dtype=np.uint8), rng.integers(0, 1 << 32, m, dtype=np.uint32),
            rng.integers(0, 1 << 16, m, dtype=np.uint16), rng.integers(0, 1 << 32, m, dtype=np.uint32),
            rng.integers(0, 1 << 16, m, dtype=np.uint16)]
    sha = C.predict_nics("sha1", 1000003, *cols)
    crc = C.predict_nics("crc32", 1000003, *cols, seed=99)
    for i, (p, sa, sp, da, dp) in enumerate(zip(*(c.tolist() for c in cols))):
        data = struct.pack("!IIHHB", sa, da, sp, dp, p)
        assert sha[i] == int.from_bytes(hashlib.sha1(data).digest()[:4], "big") % 1000003
        assert crc[i] == zlib.crc32(data, 99) % 1000003


def test_compiled_jhash_pinned_values():
    """Linux jhash of known inputs (the reference's pinned values, tests/test_agent.py)
    through the batch: nft's 4-tuple layout, reciprocal_scale onto n."""
    sa, da, sp, dp = 0xC0000201, 0xC6120005, 443, 40000
    raw = S.nft_jhash_raw(sa, da, sp, dp, 7)
    for n in (2, 3, 5):
        got = C.predict_nics("jhash", n, [6, 17, 1], [sa] * 3, [sp] * 3, [da] * 3, [dp] * 3, seed=7)
        assert got.tolist() == [(raw * n) >> 32, (raw * n) >> 32, -1]


def test_compiled_prediction_rejects_bad_arguments():
    import pytest

    with pytest.raises(ValueError, match="at least 1"):
        C.predict_nics("sha1", 0, [6], [1], [2], [3], [4])
    with pytest.raises(ValueError, match="different lengths"):
        C.predict_nics("sha1", 2, [6, 6], [1], [2, 2], [3, 3], [4, 4])


def test_compiled_prediction_reads_record_fields_in_place_or_converted():
    """A record array's fields (strided), big-endian and unaligned ones (converted), plain
    lists: the same answers as contiguous native columns."""
    d = np.zeros(7, [("pad", "u1"), ("proto", "u1"), ("sa", ">u4"), ("sp", ">u2"), ("da", "<u4"), ("dp", "<u2")])
    d["proto"] = [6, 17, 1, 6, 17, 6, 6]
    d["sa"], d["sp"] = np.arange(7) * 0x01010101, np.arange(7) * 1000
    d["da"], d["dp"] = 0xC6120001, np.arange(7) + 1024
    flat = [np.ascontiguousarray(d[f]).astype(t) for f, t in
            zip(("proto", "sa", "sp", "da", "dp"), (np.uint8, np.uint32, np.uint16, np.uint32, np.uint16))]
    for name in ("sha1", "crc32", "jhash"):
        want = S.predict_nics(name, 3, *flat, seed=5)
        assert C.predict_nics(name, 3, d["proto"], d["sa"], d["sp"], d["da"], d["dp"], seed=5).tolist() == want.tolist()
        assert C.predict_nics(name, 3, *(c.tolist() for c in flat), seed=5).tolist() == want.tolist()
