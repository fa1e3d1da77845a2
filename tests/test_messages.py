"""The wire records: layouts, pack/decode round trips, validation of malformed and
forged messages, and that no byte string can make validation raise."""
import json
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hypernat import messages as M

import wire_model

# ---------------------------------------------------------------- layouts


def test_record_layouts_are_the_documented_offsets():
    # a few fields per record, packed by hand with struct: the documented byte layout
    r = M.records(M.T_RULE, 1)
    r["seq"], r["rule_id"], r["lease_ms"] = 1, 2, 3
    r["int_addr"], r["ext_addr"], r["rem_addr"] = 4, 5, 6
    r["int_port"], r["ext_port"], r["rem_port"], r["owner"] = 7, 8, 9, 10
    r["proto"], r["tcp_state"], r["flags"] = 6, 0x11, 0x0102
    assert r.tobytes() == struct.pack("<IIIIIIHHHHBBH", 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 6, 0x11, 0x0102)
    k = M.records(M.T_FETCH, 1)
    k["seq"], k["rule_id"], k["proto"], k["kind"], k["reason"], k["flags"] = 1, 2, 17, 1, 3, 4
    k["int_addr"], k["ext_addr"], k["rem_addr"], k["int_port"], k["ext_port"], k["rem_port"] = 5, 6, 7, 8, 9, 10
    assert k.tobytes() == struct.pack("<IIBBBBIIIHHHH", 1, 2, 17, 1, 3, 4, 5, 6, 7, 8, 9, 10, 0)
    h = M.records(M.T_HELLO, 1)
    h["version"], h["nic"], h["n_nics"], h["flags"], h["incarnation"], h["heartbeat_ms"] = 1, 2, 3, 4, 2**63 + 5, 1000
    assert h.tobytes() == struct.pack("<HHHHQII", 1, 2, 3, 4, 2**63 + 5, 1000, 0)
    a = M.records(M.T_ACTIVITY, 1)
    a["seq"], a["idle_ms"], a["ext_port"], a["proto"], a["tcp_flags"], a["tcp_out"], a["tcp_in"] = 1, 2, 3, 6, 7, 8, 9
    assert a.tobytes() == struct.pack("<IIIIIIHHHHBBBB", 1, 0, 2, 0, 0, 0, 0, 3, 0, 0, 6, 7, 8, 9)
    assert M.ACK_DTYPE.itemsize == 8 and M.BLOCK_DTYPE.itemsize == 24
    assert M.RULE_DTYPE.itemsize == 36 and M.ACTIVITY_DTYPE.itemsize == 36  # protocol version 2


def test_dtypes_are_the_documented_layouts_and_the_compiled_structs():
    """messages' dtypes are read from _wire.pxd's structs; they must be the layouts the
    protocol documents (tests/wire_model.py writes them out by hand) and the structs'."""
    from hypernat import _wire

    for name, dt in wire_model.LAYOUTS.items():
        assert getattr(M, name + "_DTYPE") == dt, name
        size, fields = _wire.layouts()[name]
        assert size == dt.itemsize and [f for f, _, _ in fields] == list(dt.names)
        assert [(o, s) for _, o, s in fields] == [(dt.fields[f][1], dt.fields[f][0].itemsize) for f in dt.names]
    for code, layout in wire_model.LAYOUT_OF.items():
        assert M.DTYPE_OF[code] == wire_model.LAYOUTS[layout], M.TYPE_NAMES[code]
    assert M.RULE_STRUCT.size == M.RULE_DTYPE.itemsize and M.KEY_STRUCT.size == M.KEY_DTYPE.itemsize
    assert M.ACTIVITY_STRUCT.size == M.ACTIVITY_DTYPE.itemsize
    for gone in ("FETCH_F_ALLOCATE", "RULE_F_BORROWED", "RULE_F_CLOSING", "RULE_F_PUSHED"):
        assert not hasattr(M, gone)
    assert "timeout_s" not in M.RULE_DTYPE.names and "packets" not in M.ACTIVITY_DTYPE.names


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
    assert [len(p) // M.ACTIVITY_DTYPE.itemsize for p in acts] == [M.MAX_RECORDS, 5]
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


def test_activity_tcp_flags_per_direction():
    """ACTIVITY carries tcp_out / tcp_in beside the union: each direction reads its own
    field (the union alone says nothing of a direction)."""
    from hypernat import layout

    recs = M.records(M.T_ACTIVITY, 3)
    recs["tcp_out"][0], recs["tcp_flags"][0] = layout.TCP_SYN, layout.TCP_SYN  # SYN out only
    recs["tcp_in"][1], recs["tcp_flags"][1] = layout.TCP_FIN, layout.TCP_FIN  # FIN in only
    recs["tcp_flags"][2] = layout.TCP_RST  # the union without a direction
    out, inn = M.activity_tcp_dirs(recs)
    assert list(out) == [layout.TCP_SYN, 0, 0]
    assert list(inn) == [0, layout.TCP_FIN, 0]


# ------------------------------------- the compiled validator against the reference

INTERNAL_C = M.Prefixes([(0x0A000000, 0xFF000000)])  # INTERNAL, compiled


def _partition_owns(n_nics, data):
    """The real partition arithmetic as the NIC worker and the coordinator pass it
    (``M.Owns`` over the partition's compiled geometry, in one of its modes) after a few
    spill-over loans, and its plain-Python reference (tests/wire_model.py)."""
    from hypernat.lab.emulated import emulated_config
    from hypernat.partition import Partition

    cfg = emulated_config(n_nics)
    part = Partition.from_config(cfg)
    for _ in range(data.draw(st.integers(0, 3))):
        part.lend(data.draw(st.integers(0, part.n_addrs * part.bpa - 1)), data.draw(st.integers(0, n_nics - 1)))
    mode = data.draw(st.sampled_from(["now", "native", "now-or-native"]))
    return M.Owns(part.geometry, mode), wire_model.owns_reference(part, mode), int(cfg.pool[0].network_address)


def _records(data, code, n, n_nics, base=0xCB00710A):
    """n records of type `code` whose fields lean toward the values the checks look at."""
    dt = M.DTYPE_OF[code]
    recs = np.frombuffer(data.draw(st.binary(min_size=n * dt.itemsize, max_size=n * dt.itemsize)), dt).copy()

    def col(strategy):
        return data.draw(st.lists(strategy, min_size=n, max_size=n))

    for f in dt.names:
        if f == "proto":
            recs[f] = col(st.sampled_from([1, 6, 17, 6, 17, 6, 47, 0]))
        elif f in ("owner", "lender", "borrower", "nic"):
            recs[f] = col(st.integers(0, n_nics))
        elif f == "kind":
            recs[f] = col(st.sampled_from([0, 1, 0, 1, 2]))
        elif f == "version":
            recs[f] = col(st.sampled_from([M.PROTOCOL_VERSION] * 3 + [1, 3]))
        elif f in ("ext_addr", "addr"):
            recs[f] = col(st.sampled_from([base, base + 1, base + 255, 0x08080808, 0]))
        elif f.endswith("port") or f in ("port_lo", "port_hi"):
            recs[f] = col(st.sampled_from([0, 1, 2, 1024, 40001, 65535]) | st.integers(0, 65535))
        elif f in ("reason", "flags"):
            recs[f] = col(st.integers(0, 8))
        elif f in ("int_addr", "rem_addr"):
            recs[f] = col(st.sampled_from([0x0A000001, 0xC0A80001, 0, 0xC6336401]))
    return recs


@settings(max_examples=500, deadline=None)
@given(code=st.sampled_from(RECORD_TYPES), data=st.data())
def test_compiled_validator_gives_the_reference_verdict(code, data):
    """Every record type, 1..20 records, every kind of predicate (none, Python callables,
    the compiled ones over a real partition with loans): ``validate`` and ``check`` (the
    compiled ``_wire.check``) return the reason tests/wire_model.py returns."""
    n_nics = data.draw(st.sampled_from([2, 3, 4]))
    n = 1 if code in (M.T_HELLO, M.T_HELLO_ACK) else data.draw(st.integers(1, 20))
    preds = data.draw(st.sampled_from(["none", "plain", "partition"]))
    base = 0xCB00710A
    if preds == "partition":
        owns, ref_owns, base = _partition_owns(n_nics, data)
        internal, ref_internal = INTERNAL_C, INTERNAL
    elif preds == "plain":
        owns = ref_owns = OWNS
        internal = ref_internal = INTERNAL
    else:
        owns = ref_owns = internal = ref_internal = None
    recs = _records(data, code, n, n_nics, base)
    sender = data.draw(st.one_of(st.none(), st.integers(0, n_nics - 1)))
    receiver = data.draw(st.one_of(st.none(), st.integers(0, n_nics - 1)))
    nn = data.draw(st.sampled_from([None, n_nics]))
    want = wire_model.check(code, recs.tobytes(), sender, receiver, ref_owns, ref_internal, nn)
    kw = dict(receiver=receiver, owns=owns, internal=internal, n_nics=nn)
    assert M.check(sender, code, recs.tobytes(), **kw) == want
    d = M.validate(sender, M.TYPE_FRAME[code], recs.tobytes(), **kw)
    assert d.reason == want
    if want is None:  # a valid message decodes to the records, read-only, a view of the payload
        assert d.recs.dtype == M.DTYPE_OF[code] and d.recs.tobytes() == recs.tobytes()
        assert not d.recs.flags.writeable


def _valid(code):
    """One valid record of type `code` (sender nic1, receiver nic0 under OWNS: odd ports
    are nic1's, even nic0's)."""
    r = M.records(code, 1)
    for f, v in dict(seq=7, proto=6, owner=1, int_addr=0x0A000001, int_port=5000, ext_addr=0xCB00710A,
                     rem_addr=0xC6336401, rem_port=443, version=M.PROTOCOL_VERSION, nic=1, addr=0xCB00710A,
                     port_lo=1024, port_hi=1086, lender=0, borrower=1).items():
        if f in r.dtype.names:
            r[f] = v
    if "ext_port" in r.dtype.names:
        r["ext_port"] = 40001 if code in (M.T_RULE, M.T_PUSH, M.T_LEASE, M.T_REVOKE) else 40000
    if code == M.T_BORROW_ACK:
        r["lender"], r["borrower"] = 1, 0
    return r.tobytes()


@settings(max_examples=600, deadline=None)
@given(code=st.sampled_from(RECORD_TYPES), data=st.data())
def test_mutated_valid_messages_are_never_an_exception_and_every_drop_is_counted(code, data):
    """A valid message, then bytes flipped, cut or added: the compiled validator never
    raises, agrees with the reference, and counts each drop once under its reason."""
    payload = bytearray(_valid(code) * (1 if code in (M.T_HELLO, M.T_HELLO_ACK) else data.draw(st.integers(1, 10))))
    kw = dict(sender=1, receiver=0, owns=OWNS, internal=INTERNAL_C, n_nics=2)
    assert wire_model.check(code, bytes(payload), 1, 0, OWNS, INTERNAL, 2) is None
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "flip", "cut", "add"]))
        if op == "flip" and payload:
            payload[data.draw(st.integers(0, len(payload) - 1))] = data.draw(st.integers(0, 255))
        elif op == "cut" and payload:
            del payload[data.draw(st.integers(0, len(payload) - 1)):]
        else:
            payload += data.draw(st.binary(min_size=1, max_size=40))
    from hypernat import _wire

    counts = np.zeros(len(M.REASONS), np.uint64)
    r = _wire.check(code, bytes(payload), kw["sender"], kw["receiver"], kw["owns"], kw["internal"], kw["n_nics"],
                    counts)
    want = wire_model.check(code, bytes(payload), 1, 0, OWNS, INTERNAL, 2)
    assert (None if r == _wire.OK else M.REASON_NAMES[r]) == want
    assert counts.sum() == (want is not None) and (want is None or counts[M.REASON_NAMES.index(want)] == 1)
    # any buffer, as a bytearray or a memoryview: the same verdict
    for buf in (payload, memoryview(bytes(payload))):
        assert M.check(1, code, buf, receiver=0, owns=OWNS, internal=INTERNAL, n_nics=2) == want


@settings(max_examples=300, deadline=None)
@given(tframe=st.one_of(st.binary(max_size=3), st.sampled_from(list(M.TYPE_FRAME.values()))),
       payload=st.one_of(st.binary(max_size=300), st.binary(min_size=1, max_size=40).map(lambda b: b * 20)),
       sender=st.one_of(st.none(), st.integers(0, 5)))
def test_random_bytes_get_the_reference_verdict(tframe, payload, sender):
    d = M.validate(sender, tframe, payload, receiver=0, owns=OWNS, internal=INTERNAL_C, n_nics=4)
    code = M.type_of(tframe)
    if code is None:
        assert d.reason == "unknown_type"
    elif M.DTYPE_OF[code] is not None:
        assert d.reason == wire_model.check(code, payload, sender, 0, OWNS, INTERNAL, 4)
    else:
        assert d.reason is None or d.reason in M.REASON_NAMES


def test_a_peer_of_protocol_version_1_is_refused_not_misparsed():
    """Version 1 had 40-byte RULE and ACTIVITY records, version 2 has 36: nine v1 RULEs
    (360 bytes) are ten whole v2 records, so only the version gate keeps them apart.
    A HELLO (or HELLO_ACK) of version 1 is refused as bad_version (its layout is the
    same in every version): a v1 peer never registers, so none of its records is routed
    (test_coord checks that end to end)."""
    assert M.PROTOCOL_VERSION == 2
    h = M.records(M.T_HELLO, 1)
    h["version"], h["nic"] = 1, 0
    assert M.validate(0, T[M.T_HELLO], h.tobytes()).reason == "bad_version"
    assert M.validate(None, T[M.T_HELLO_ACK], h.tobytes()).reason == "bad_version"
    assert len(struct.pack("<IIIIIIHHHHBBHHH", *[0] * 15)) * 9 == M.RULE_DTYPE.itemsize * 10

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


def test_validate_counts_each_drop_under_its_reason_and_drains_to_the_counter_names():
    """``validate(..., counts=)`` counts every drop once under its reason's index (record
    types in the compiled check, JSON and unknown types beside it); ``drain_drops`` hands
    them to a counter under ``bad_message_<reason>`` and zeroes the array."""
    import collections

    counts = M.drop_counts()
    assert counts.shape == (len(M.REASONS),) and list(M.DROP_COUNTER_NAMES) == ["bad_message_" + n for n in
                                                                                 M.REASON_NAMES]
    got = [M.validate(1, T[M.T_RULE], rule(ext_port=40000), owns=OWNS, counts=counts).reason,
           M.validate(1, T[M.T_RULE], rule()[:-1], counts=counts).reason,
           M.validate(1, b"\x7f", b"", counts=counts).reason,
           M.validate(None, T[M.T_STATS], b"[1]", counts=counts).reason,
           M.validate(1, T[M.T_RULE], rule(), owns=OWNS, counts=counts).reason]
    assert got == ["foreign_endpoint", "truncated", "unknown_type", "bad_json", None]
    assert int(counts.sum()) == 4 and all(counts[M.REASON[r]] == 1 for r in got if r)
    seen = collections.Counter()
    M.drain_drops(counts, lambda name, n: seen.update({name: n}))
    assert seen == {"bad_message_foreign_endpoint": 1, "bad_message_truncated": 1, "bad_message_unknown_type": 1,
                    "bad_message_bad_json": 1}
    assert not counts.any()
