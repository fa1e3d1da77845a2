"""The wire records: layouts, pack/decode round trips, validation of malformed and
forged messages, and that no byte string can make validation raise."""
import json
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hypernat import messages as M

# ---------------------------------------------------------------- layouts


def test_record_layouts_are_the_documented_offsets():
    # a few fields per record, packed by hand with struct: the documented byte layout
    r = M.records(M.T_RULE, 1)
    r["seq"], r["rule_id"], r["lease_ms"] = 1, 2, 3
    r["int_addr"], r["ext_addr"], r["rem_addr"] = 4, 5, 6
    r["int_port"], r["ext_port"], r["rem_port"], r["owner"] = 7, 8, 9, 10
    r["proto"], r["tcp_state"], r["flags"], r["timeout_s"] = 6, 0x11, 0x0102, 300
    assert r.tobytes() == struct.pack("<IIIIIIHHHHBBHHH", 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 6, 0x11, 0x0102, 300, 0)
    k = M.records(M.T_FETCH, 1)
    k["seq"], k["rule_id"], k["proto"], k["kind"], k["reason"], k["flags"] = 1, 2, 17, 1, 3, 4
    k["int_addr"], k["ext_addr"], k["rem_addr"], k["int_port"], k["ext_port"], k["rem_port"] = 5, 6, 7, 8, 9, 10
    assert k.tobytes() == struct.pack("<IIBBBBIIIHHHH", 1, 2, 17, 1, 3, 4, 5, 6, 7, 8, 9, 10, 0)
    h = M.records(M.T_HELLO, 1)
    h["version"], h["nic"], h["n_nics"], h["flags"], h["incarnation"], h["heartbeat_ms"] = 1, 2, 3, 4, 2**63 + 5, 1000
    assert h.tobytes() == struct.pack("<HHHHQII", 1, 2, 3, 4, 2**63 + 5, 1000, 0)
    assert M.ACK_DTYPE.itemsize == 8 and M.BLOCK_DTYPE.itemsize == 24 and M.ACTIVITY_DTYPE.itemsize == 40


def test_every_type_has_a_unique_code_and_a_payload_kind():
    codes = [c for c in M.TYPE_NAMES]
    assert len(codes) == len(set(codes))
    for code, name in M.TYPE_NAMES.items():
        assert getattr(M, "T_" + name) == code
        assert (M.DTYPE_OF[code] is not None) or code in M.JSON_TYPES or code == M.T_UNDELIVERABLE
    needed = {"HELLO", "HEARTBEAT", "FETCH", "RULE", "NACK", "PUSH", "LEASE", "REVOKE", "REVOKE_ACK", "ACTIVITY",
              "STATS", "BORROW", "RETURN", "QUERY", "REPLY"}
    assert needed <= set(M.TYPE_CODES)


def test_identities():
    assert M.nic_identity(3) == b"nic3"
    assert M.parse_identity(b"nic3") == 3 and M.parse_identity("nic0") == 0
    for bad in (b"nic", b"nic03", b"nic-1", b"\x00abc", b"nic3 ", b"NIC3", b"nic99999", b"", None):
        assert M.parse_identity(bad) is None


# ------------------------------------------------------------ pack / decode


RECORD_TYPES = sorted(c for c, dt in M.DTYPE_OF.items() if dt is not None)


@settings(max_examples=60, deadline=None)
@given(code=st.sampled_from(RECORD_TYPES), n=st.integers(1, 20), data=st.data())
def test_pack_decode_round_trip(code, n, data):
    dt = M.DTYPE_OF[code]
    if code in (M.T_HELLO, M.T_HELLO_ACK):
        n = 1  # one HELLO per message
    raw = data.draw(st.binary(min_size=n * dt.itemsize, max_size=n * dt.itemsize))
    recs = np.frombuffer(raw, dtype=dt).copy()
    d = M.decode(M.TYPE_FRAME[code], M.pack(code, recs))
    assert d.reason is None and d.mtype == code
    assert d.recs.tobytes() == raw and len(d.recs) == n


def test_pack_from_dicts_and_tuples():
    a = M.pack(M.T_PUSH_ACK, [{"seq": 5, "status": M.ST_REFUSED}, (6, 0, 0, 0)])
    recs = np.frombuffer(a, M.ACK_DTYPE)
    assert recs["seq"].tolist() == [5, 6] and recs["status"].tolist() == [M.ST_REFUSED, 0]
    with pytest.raises(ValueError, match="unknown fields"):
        M.pack(M.T_FETCH, [{"sequence": 1}])
    with pytest.raises(ValueError):
        M.pack(M.T_STATS, [])
    with pytest.raises(ValueError):
        M.pack(M.T_FETCH, M.records(M.T_RULE, 1))  # records of another type


def test_json_types():
    d = M.decode(M.TYPE_FRAME[M.T_QUERY], M.pack_json({"id": 1, "op": "status", "n": np.uint32(7)}))
    assert d.ok and d.recs == {"id": 1, "op": "status", "n": 7}
    assert M.decode(M.TYPE_FRAME[M.T_STATS], b"[1, 2]").reason == "bad_json"
    assert M.decode(M.TYPE_FRAME[M.T_STATS], b"\xff\xfe").reason == "bad_json"
    assert M.decode(M.TYPE_FRAME[M.T_STATS], b"{" * 100000).reason == "bad_json"
    assert M.decode(M.TYPE_FRAME[M.T_STATS], b" " * (M.MAX_JSON + 1)).reason == "oversize"


def test_undeliverable_round_trip():
    body = M.pack_undeliverable(M.T_FETCH, "target_down", 7, b"abc")
    assert M.unpack_undeliverable(body) == (M.T_FETCH, "target_down", 7, b"abc")
    assert M.unpack_undeliverable(M.pack_undeliverable(M.T_HEARTBEAT, "not_registered", None, b""))[2] is None
    assert M.unpack_undeliverable(b"\x01\x02") is None
    assert M.decode(M.TYPE_FRAME[M.T_UNDELIVERABLE], b"\x01").reason == "truncated"


def test_outbox_batches_per_target_and_type_and_splits_big_batches():
    box = M.Outbox()
    r = M.records(M.T_FETCH, 1)[0]
    box.add(b"nic1", M.T_FETCH, r)
    box.add(b"nic1", M.T_FETCH, {"seq": 2, "proto": 6})
    box.add(b"nic2", M.T_FETCH, (3, 0, 6, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0))
    big = M.records(M.T_ACTIVITY, M.MAX_RECORDS + 5)
    big["seq"] = np.arange(len(big))
    box.add_many(b"nic1", M.T_ACTIVITY, big)
    assert len(box) == 3 + 1  # three single records and one array
    out = list(box.drain())
    assert len(box) == 0
    by = {}
    for target, mtype, payload in out:
        by.setdefault((target, mtype), []).append(payload)
    assert [len(p) for p in by[(b"nic1", M.T_FETCH)]] == [64]
    assert len(by[(b"nic2", M.T_FETCH)]) == 1
    acts = by[(b"nic1", M.T_ACTIVITY)]
    assert [len(p) // 40 for p in acts] == [M.MAX_RECORDS, 5]
    seqs = np.concatenate([np.frombuffer(p, M.ACTIVITY_DTYPE)["seq"] for p in acts])
    assert seqs.tolist() == list(range(M.MAX_RECORDS + 5))


# --------------------------------------------------------------- validation


def rule(**kw):
    r = M.records(M.T_RULE, 1)
    defaults = dict(seq=1, rule_id=9, proto=6, owner=1, int_addr=0x0A000001, int_port=5000,
                    ext_addr=0xCB00710A, ext_port=40001, rem_addr=0xC6336401, rem_port=443, lease_ms=1000)
    defaults.update(kw)
    for k, v in defaults.items():
        r[k] = v
    return r.tobytes()


def fetch(**kw):
    r = M.records(M.T_FETCH, 1)
    defaults = dict(seq=1, proto=6, kind=M.FETCH_BY_EXTERNAL, ext_addr=0xCB00710A, ext_port=40001,
                    rem_addr=0xC6336401, rem_port=443)
    defaults.update(kw)
    for k, v in defaults.items():
        r[k] = v
    return r.tobytes()


# partition used below: nic k owns odd ports if k == 1, even ports if k == 0
OWNS = lambda nic, addrs, ports: (np.asarray(ports) % 2) == nic  # noqa: E731
INTERNAL = lambda addrs: (np.asarray(addrs) >> 24) == 10  # noqa: E731
T = M.TYPE_FRAME


@pytest.mark.parametrize(
    "sender, tframe, payload, kw, reason",
    [
        (1, T[M.T_RULE], rule(), {}, None),
        (1, T[M.T_RULE], rule(), dict(owns=OWNS, internal=INTERNAL), None),
        (1, T[M.T_RULE], rule()[:-1], {}, "truncated"),
        (1, T[M.T_RULE], b"", {}, "truncated"),
        (1, T[M.T_RULE], rule() * (M.MAX_RECORDS + 1), {}, "oversize"),
        (1, b"\x99", rule(), {}, "unknown_type"),
        (1, b"", rule(), {}, "unknown_type"),
        (1, b"\x11\x11", rule(), {}, "unknown_type"),
        (0, T[M.T_RULE], rule(), {}, "bad_identity"),  # owner field says nic1, sender is nic0
        (1, T[M.T_RULE], rule(proto=47), {}, "bad_field"),
        (1, T[M.T_RULE], rule(ext_port=0), {}, "bad_field"),
        (1, T[M.T_RULE], rule(proto=1, ext_port=0, int_port=0), {}, None),  # ICMP id 0 is an id
        (1, T[M.T_RULE], rule(rem_addr=0), {}, "bad_field"),  # session without a remote
        (1, T[M.T_RULE], rule(rem_addr=0, rem_port=0, flags=M.RULE_F_WILDCARD), {}, None),  # EIM mapping
        (1, T[M.T_RULE], rule(ext_port=40000), dict(owns=OWNS), "foreign_endpoint"),
        (1, T[M.T_PUSH], rule(ext_port=40000), dict(owns=OWNS), "foreign_endpoint"),
        (1, T[M.T_LEASE], rule(ext_port=40000), dict(owns=OWNS), "foreign_endpoint"),
        (1, T[M.T_RULE], rule(int_addr=0xC0A80001), dict(internal=INTERNAL), "not_internal"),
        (0, T[M.T_FETCH], fetch(), dict(receiver=1, owns=OWNS), None),
        (0, T[M.T_FETCH], fetch(), dict(receiver=0, owns=OWNS), "foreign_endpoint"),  # asked the wrong owner
        (0, T[M.T_FETCH], fetch(kind=2), {}, "bad_field"),
        (0, T[M.T_FETCH], fetch(kind=M.FETCH_BY_INTERNAL, int_addr=0xC0A80001, int_port=5),
         dict(internal=INTERNAL), "not_internal"),
        (0, T[M.T_FETCH], fetch(kind=M.FETCH_BY_INTERNAL, int_addr=0x0A000001, int_port=5, ext_port=0),
         dict(internal=INTERNAL, receiver=0, owns=OWNS), None),
        (1, T[M.T_REVOKE], fetch(), dict(owns=OWNS), None),
        (0, T[M.T_REVOKE], fetch(), dict(owns=OWNS), "foreign_endpoint"),  # revoking another's rule
        (1, T[M.T_NACK], fetch(reason=len(M.NACK_REASONS)), {}, "bad_field"),
        (None, T[M.T_QUERY], b'{"id": 1}', {}, None),
        (None, T[M.T_QUERY], b"nope", {}, "bad_json"),
    ],
)
def test_validate(sender, tframe, payload, kw, reason):
    d = M.validate(sender, tframe, payload, **kw)
    assert d.reason == reason
    assert d.ok == (reason is None)
    if reason is None and d.mtype not in M.JSON_TYPES:
        assert d.recs.tobytes() == payload


def test_validate_hello():
    h = M.records(M.T_HELLO, 1)
    h["version"], h["nic"] = M.PROTOCOL_VERSION, 2
    assert M.validate(2, T[M.T_HELLO], h.tobytes()).ok
    assert M.validate(3, T[M.T_HELLO], h.tobytes()).reason == "bad_identity"
    assert M.validate(2, T[M.T_HELLO], h.tobytes(), n_nics=2).reason == "bad_field"
    assert M.validate(2, T[M.T_HELLO], h.tobytes() * 2).reason == "truncated"
    h["version"] = 9
    assert M.validate(2, T[M.T_HELLO], h.tobytes()).reason == "bad_version"


def test_validate_blocks():
    b = M.records(M.T_BORROW, 1)
    b["seq"], b["port_lo"], b["port_hi"], b["lender"], b["borrower"] = 1, 1024, 1087, 0, 1
    assert M.validate(1, T[M.T_BORROW], b.tobytes(), n_nics=2).ok
    assert M.validate(0, T[M.T_BORROW], b.tobytes()).reason == "bad_identity"  # asking for someone else
    assert M.validate(0, T[M.T_BORROW_ACK], b.tobytes()).ok  # the lender answers
    assert M.validate(1, T[M.T_BORROW_ACK], b.tobytes()).reason == "bad_identity"
    b["port_lo"] = 2000
    assert M.validate(1, T[M.T_BORROW], b.tobytes()).reason == "bad_field"


def test_a_mixed_batch_is_dropped_whole():
    good, bad = rule(seq=1), rule(seq=2, ext_port=40000)
    assert M.validate(1, T[M.T_RULE], good + good, owns=OWNS).ok
    assert M.validate(1, T[M.T_RULE], good + bad, owns=OWNS).reason == "foreign_endpoint"


def test_a_broken_predicate_rejects_instead_of_raising():
    def boom(*a):
        raise RuntimeError("bug in the partition code")

    assert M.validate(1, T[M.T_RULE], rule(), owns=boom).reason == "foreign_endpoint"


def test_elementwise_wraps_scalar_predicates():
    owns = M.elementwise(lambda nic, addr, port: port % 2 == nic)
    internal = M.elementwise(lambda addr: addr >> 24 == 10)
    assert M.validate(1, T[M.T_RULE], rule(), owns=owns, internal=internal).ok
    assert M.validate(1, T[M.T_RULE], rule(ext_port=40000), owns=owns).reason == "foreign_endpoint"
    assert M.validate(1, T[M.T_RULE], rule(int_addr=0x0B000001), internal=internal).reason == "not_internal"


@settings(max_examples=300, deadline=None)
@given(tframe=st.one_of(st.binary(max_size=3), st.sampled_from(list(M.TYPE_FRAME.values()))),
       payload=st.binary(max_size=300), sender=st.one_of(st.none(), st.integers(0, 5)))
def test_validate_never_raises_on_bytes(tframe, payload, sender):
    d = M.validate(sender, tframe, payload, receiver=0, owns=OWNS, internal=INTERNAL, n_nics=4)
    assert d.reason is None or d.reason in M.REASON_NAMES


@settings(max_examples=100, deadline=None)
@given(code=st.sampled_from(RECORD_TYPES), data=st.data())
def test_validate_never_raises_on_whole_records(code, data):
    dt = M.DTYPE_OF[code]
    n = data.draw(st.integers(1, 8))
    raw = data.draw(st.binary(min_size=n * dt.itemsize, max_size=n * dt.itemsize))
    d = M.validate(data.draw(st.integers(0, 3)), M.TYPE_FRAME[code], raw, receiver=1, owns=OWNS,
                   internal=INTERNAL, n_nics=4)
    assert d.reason is None or d.reason in M.REASON_NAMES


def test_record_dict_is_json_able():
    r = np.frombuffer(rule(), M.RULE_DTYPE)[0]
    d = M.record_dict(r)
    assert d["ext_addr"] == "203.0.113.10" and d["ext_port"] == 40001 and "pad" not in d
    json.dumps(d)
    assert M.ip_int("203.0.113.10") == 0xCB00710A
    for bad in ("1.2.3", "1.2.3.256", "a.b.c.d", "1.2.3.4.5"):
        with pytest.raises(ValueError):
            M.ip_int(bad)


SMALL_TYPES = sorted(M._SMALL)


@settings(max_examples=400, deadline=None)
@given(code=st.sampled_from(SMALL_TYPES), data=st.data())
def test_small_batch_path_agrees_with_numpy_path(code, data):
    """Messages of up to SMALL_BATCH records are checked with struct, larger ones with
    numpy: both must give the same reason for the same records."""
    dt = M.DTYPE_OF[code]
    n = data.draw(st.integers(1, M.SMALL_BATCH))
    # bias the fields toward the interesting values (valid protos, small ports, owners)
    recs = np.frombuffer(data.draw(st.binary(min_size=n * dt.itemsize, max_size=n * dt.itemsize)), dt).copy()
    for f in dt.names:
        if f == "proto":
            recs[f] = data.draw(st.lists(st.sampled_from([1, 6, 17, 6, 17, 47]), min_size=n, max_size=n))
        elif f in ("owner", "lender", "borrower", "nic", "kind"):
            recs[f] = data.draw(st.lists(st.integers(0, 3), min_size=n, max_size=n))
        elif f.endswith("port") or f in ("port_lo", "port_hi", "rem_addr", "addr"):
            recs[f] = data.draw(st.lists(st.sampled_from([0, 1, 2, 1024, 65535]), min_size=n, max_size=n))
        elif f in ("reason", "flags"):
            recs[f] = data.draw(st.lists(st.integers(0, 8), min_size=n, max_size=n))
        elif f == "int_addr":
            recs[f] = data.draw(st.lists(st.sampled_from([0x0A000001, 0xC0A80001]), min_size=n, max_size=n))
    sender = data.draw(st.one_of(st.none(), st.integers(0, 3)))
    receiver = data.draw(st.one_of(st.none(), st.integers(0, 3)))
    kw = dict(owns=data.draw(st.sampled_from([None, OWNS])), internal=data.draw(st.sampled_from([None, INTERNAL])),
              n_nics=data.draw(st.sampled_from([None, 2, 4])))
    small = M._check_small(sender, code, recs.tobytes(), receiver, kw["owns"], kw["internal"], kw["n_nics"])
    big = M._check_records(sender, code, recs, receiver, kw["owns"], kw["internal"], kw["n_nics"])
    assert small == big
    assert M.check(sender, code, recs.tobytes(), receiver=receiver, **kw) == small
    assert M.validate(sender, M.TYPE_FRAME[code], recs.tobytes(), receiver=receiver, **kw).reason == small
    # and the same records as a batch too big for the small path: the numpy verdict
    many = np.concatenate([recs] * (M.SMALL_BATCH // n + 1))
    assert M.check(sender, code, many.tobytes(), receiver=receiver, **kw) == big


def test_activity_tcp_flags_per_direction_and_from_an_old_sender():
    """ACTIVITY carries tcp_out / tcp_in (in the former pad, same 40-byte record); a
    record of an old sender (union only) reads as the union both ways."""
    from hypernat import layout

    assert M.ACTIVITY_DTYPE.itemsize == 40
    recs = M.records(M.T_ACTIVITY, 3)
    recs["tcp_out"][0], recs["tcp_flags"][0] = layout.TCP_SYN, layout.TCP_SYN  # new: SYN out only
    recs["tcp_flags"][1] = layout.TCP_FIN  # old sender: union, per-direction fields zero
    out, inn = M.activity_tcp_dirs(recs)
    assert list(out) == [layout.TCP_SYN, layout.TCP_FIN, 0]
    assert list(inn) == [0, layout.TCP_FIN, 0]


OWNS_TWIN = M.with_scalar(OWNS, lambda nic, addr, port: port % 2 == nic)
INTERNAL_TWIN = M.with_scalar(INTERNAL, lambda addr: addr >> 24 == 10)


@settings(max_examples=300, deadline=None)
@given(code=st.sampled_from(SMALL_TYPES), data=st.data())
def test_scalar_predicates_give_the_vectorised_verdicts(code, data):
    """The small-batch path calls a predicate's scalar twin (plain ints, no numpy); the
    verdict must be the one the vectorised predicates give on the same records — here
    with the real partition arithmetic (Partition.owner against Partition.owners,
    including loaned blocks), as the NIC worker and the coordinator use it."""
    from hypernat.lab.emulated import emulated_config
    from hypernat.partition import Partition

    n_nics = data.draw(st.sampled_from([2, 3]))
    cfg = emulated_config(n_nics)
    part = Partition.from_config(cfg)
    for _ in range(data.draw(st.integers(0, 3))):  # a few spill-over loans
        part.lend(data.draw(st.integers(0, part.n_addrs * part.bpa - 1)), data.draw(st.integers(0, n_nics - 1)))
    vec = lambda nic, a, p: part.owners(a, p) == nic  # noqa: E731
    twin = M.with_scalar(vec, lambda nic, a, p: part.owner(a, p) == nic)
    base = int(cfg.pool[0].network_address)
    dt = M.DTYPE_OF[code]
    n = data.draw(st.integers(1, M.SMALL_BATCH))
    recs = np.zeros(n, dt)
    for f in dt.names:
        if f == "proto":
            recs[f] = data.draw(st.lists(st.sampled_from([1, 6, 17]), min_size=n, max_size=n))
        elif f in ("ext_addr", "addr"):
            recs[f] = data.draw(st.lists(st.sampled_from([base, base + 1, base + 255, 0x08080808]),
                                         min_size=n, max_size=n))
        elif f in ("ext_port", "port_lo", "port_hi", "int_port", "rem_port"):
            recs[f] = data.draw(st.lists(st.integers(0, 65535), min_size=n, max_size=n))
        elif f in ("owner", "lender", "borrower", "nic", "kind"):
            recs[f] = data.draw(st.lists(st.integers(0, n_nics - 1 if f != "kind" else 1), min_size=n, max_size=n))
        elif f in ("int_addr", "rem_addr"):
            recs[f] = data.draw(st.lists(st.sampled_from([0x0A000001, 0xC0A80001, 0xC0000201]),
                                         min_size=n, max_size=n))
    sender = data.draw(st.integers(0, n_nics - 1))
    receiver = data.draw(st.integers(0, n_nics - 1))
    internal = data.draw(st.sampled_from([INTERNAL, INTERNAL_TWIN]))
    scalar = M._check_small(sender, code, recs.tobytes(), receiver, twin, internal, n_nics)
    vector = M._check_records(sender, code, recs, receiver, vec, INTERNAL, n_nics)
    assert scalar == vector
    assert M.validate(sender, M.TYPE_FRAME[code], recs.tobytes(), receiver=receiver, owns=twin,
                      internal=INTERNAL_TWIN, n_nics=n_nics).reason == vector
    # the hand-made twins of the module-level predicates agree as well
    assert (M._check_small(sender, code, recs.tobytes(), receiver, OWNS_TWIN, INTERNAL_TWIN, n_nics)
            == M._check_records(sender, code, recs, receiver, OWNS, INTERNAL, n_nics))


# ------------------------------------------------ one-record fast paths (owner side)


@settings(max_examples=400, deadline=None)
@given(code=st.sampled_from(sorted(M._KEY_TYPES | M._RULE_TYPES)), data=st.data())
def test_one_record_path_agrees_with_the_batch_paths(code, data):
    """A message of ONE FETCH / NACK / REVOKE / RULE / PUSH / LEASE record is checked by
    ``_check_one_key`` / ``_check_one_rule`` (no lists); the verdict must be the one the
    record-by-record loops give for the same record in a batch of two (itself twice) and
    the one the numpy path gives."""
    dt = M.DTYPE_OF[code]
    rec = np.frombuffer(data.draw(st.binary(min_size=dt.itemsize, max_size=dt.itemsize)), dt).copy()
    for f in dt.names:
        if f == "proto":
            rec[f] = data.draw(st.sampled_from([1, 6, 17, 47, 0]))
        elif f in ("owner", "kind"):
            rec[f] = data.draw(st.integers(0, 3))
        elif f.endswith("port") or f == "rem_addr":
            rec[f] = data.draw(st.sampled_from([0, 1, 1024, 65535]))
        elif f in ("reason", "flags"):
            rec[f] = data.draw(st.integers(0, 8))
        elif f == "int_addr":
            rec[f] = data.draw(st.sampled_from([0x0A000001, 0xC0A80001]))
    sender = data.draw(st.one_of(st.none(), st.integers(0, 3)))
    receiver = data.draw(st.one_of(st.none(), st.integers(0, 3)))
    owns = data.draw(st.sampled_from([None, OWNS, OWNS_TWIN]))
    internal = data.draw(st.sampled_from([None, INTERNAL, INTERNAL_TWIN]))
    one = M._check_small(sender, code, rec.tobytes(), receiver, owns, internal, 4)
    two = M._check_small(sender, code, rec.tobytes() * 2, receiver, owns, internal, 4)
    vec = M._check_records(sender, code, rec, receiver, owns, internal, 4)
    assert one == two == vec
    d = M.validate(sender, M.TYPE_FRAME[code], rec.tobytes(), receiver=receiver, owns=owns, internal=internal,
                   n_nics=4)
    assert d.reason == one
    if one is None:  # a valid message decodes to the records, read-only, as decode makes them
        assert d.recs.dtype == dt and d.recs.tobytes() == rec.tobytes() and not d.recs.flags.writeable


def test_validate_of_a_small_payload_in_any_buffer_is_the_same():
    """validate takes the bytes fast path only for a bytes payload; a bytearray or a
    memoryview of the same records goes through decode, with the same verdict."""
    r = M.records(M.T_FETCH, 2)
    r["proto"], r["ext_port"], r["kind"] = 6, 80, M.FETCH_BY_EXTERNAL
    for payload in (r.tobytes(), bytearray(r.tobytes()), memoryview(r.tobytes())):
        d = M.validate(0, M.TYPE_FRAME[M.T_FETCH], payload, receiver=1)
        assert d.ok and d.recs.tobytes() == r.tobytes()
    for payload in (b"", b"x" * 33, bytearray(b"x" * 31)):
        assert M.validate(0, M.TYPE_FRAME[M.T_FETCH], payload).reason == "truncated"
    assert M.validate(0, b"\x10\x00", r.tobytes()).reason == "unknown_type"


def test_identity_and_type_lookups_are_stable():
    """parse_identity / type_of remember what they parsed; the answers never change and
    non-identities are never remembered."""
    for _ in range(2):
        assert M.parse_identity(b"nic3") == 3 and M.parse_identity("nic3") == 3
        assert M.parse_identity(b"nic03") is None and M.parse_identity(b"nic4096") is None
        assert M.parse_identity(bytearray(b"nic7")) == 7 and M.parse_identity(b"") is None
        assert M.type_of(b"\x10") == M.T_FETCH and M.type_of(bytearray(b"\x10")) == M.T_FETCH
        assert M.type_of(b"\x7f") is None and M.type_of(b"") is None and M.type_of(b"\x10\x10") is None
    assert b"nic03" not in M._IDENT_CACHE and b"nic4096" not in M._IDENT_CACHE


def test_outbox_one_array_is_sent_as_is_and_empty_arrays_send_nothing():
    box = M.Outbox()
    r = M.records(M.T_RULE, 3)
    r["seq"] = [1, 2, 3]
    box.add_many(b"nic1", M.T_RULE, r)
    box.add_many(b"nic2", M.T_RULE, M.records(M.T_RULE, 0))
    box.add_many(b"nic3", M.T_RULE, r[::2])  # not contiguous
    out = list(box.drain())
    assert out == [(b"nic1", M.T_RULE, r.tobytes()), (b"nic3", M.T_RULE, r[::2].tobytes())]
    assert M.RULE_STRUCT.size == M.RULE_DTYPE.itemsize and M.KEY_STRUCT.size == M.KEY_DTYPE.itemsize
    assert M.RULE_STRUCT.unpack(r[:1].tobytes()) == tuple(r[0].tolist())
