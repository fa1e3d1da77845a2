"""Idle expiry's compiled per-session work (hypernat/nat/_expire.pyx, through
``RuleBuilder.sweep``) against tests/nat_model.py's ``ExpiryModel`` (the Python loop it
replaced) on a twin builder: same sessions, same activity, same sweeps -> the same entries
left (and the same merged last_seen), the same sessions expired per class, the same
mappings ended, reuse-delay entries, REVOKE records and translation-log lines."""
import io

import numpy as np
from hypothesis import given, settings, strategies as st

from nat_model import ExpiryModel
from test_rules import RuleBuilder, SESSION_DTYPE, make_cfg, make_rb, hosts_of, miss  # noqa: F401

from hypernat import layout
from hypernat.nat import _expire
from hypernat.nat.expiry import EXPIRY_EVENTS
from hypernat.translog import TransLog
from hypernat.verdicts import OUT

TCP, UDP, ICMP = 6, 17, 1
R = [0xC6336401 + k for k in range(4)]  # 198.51.100.1..4


def _twin(n_nics, log, behaviour, seed):
    mapping, filtering = behaviour
    cfg = make_cfg(n_nics, pool="198.18.77.0/28", ports=(1024, 4095), block=16, mapping=mapping, filtering=filtering)
    rbs, bufs = [], []
    for _ in range(2):
        buf = io.StringIO()
        tl = None if log == "off" else TransLog(buf, "per-rule", remote=log == "remote", clock=lambda: 1.5)
        rbs.append(make_rb(cfg, capacity=2048, seed=seed, translog=tl))
        bufs.append(buf)
    return cfg, rbs, bufs


SESSIONS = st.lists(
    st.tuples(
        st.sampled_from([TCP, TCP, UDP, ICMP]),
        st.integers(0, 2),  # host
        st.integers(0, 2),  # internal port (a few: sessions share mappings)
        st.integers(0, 3),  # remote
        st.integers(0, 255),  # out last_seen back from now
        st.integers(0, 255),  # in last_seen back from now
        st.integers(0, 7),  # TCP flags out
        st.integers(0, 7),  # TCP flags in
        st.integers(0, 19),  # 0: orphan (rule id 0), 1: in entry a clone, else plain
    ),
    min_size=1,
    max_size=60,
)


@settings(max_examples=40, deadline=None)
@given(
    sessions=SESSIONS,
    n_nics=st.sampled_from([1, 2]),
    log=st.sampled_from(["off", "local", "remote"]),
    behaviour=st.sampled_from([("endpoint-independent", "address-and-port-dependent"),
                               ("endpoint-independent", "address-dependent"),
                               ("address-and-port-dependent", "endpoint-independent")]),
    seed=st.integers(0, 2**32 - 1),
    steps=st.lists(st.integers(0, 200), min_size=1, max_size=3),
)
def test_compiled_expiry_matches_model(sessions, n_nics, log, behaviour, seed, steps):
    cfg, (a, b), (buf_a, buf_b) = _twin(n_nics, log, behaviour, seed)
    hosts = hosts_of(a, 3)
    now = 1000
    rows, seen = [], set()
    for p, h, i, r, *_ in sessions:
        ip_ = 3000 + i
        row = (p, hosts[h], ip_, R[r], ip_ if p == ICMP else 80 + r)
        if row not in seen:
            seen.add(row)
            rows.append(row)
    for rb in (a, b):
        miss(rb, OUT, rows, now - 300)
    assert np.array_equal(a.out.slots, b.out.slots) and np.array_equal(a.inn.slots, b.inn.slots)
    # activity, TCP state, orphans and clone in-entries: the same on both
    for (p, h, i, r, lo, li, fo, fi, kind), row in zip(sessions, rows):
        for rb in (a, b):
            jo = rb.out.lookup(*_out_key(row))
            if jo < 0:
                continue
            o = rb.out.slots
            ji = rb.inn.lookup(*_in_key(row, int(o["new_addr"][jo]), int(o["new_port"][jo])))
            o["last_seen"][jo] = now - lo
            o["tcp_state"][jo] = fo if p == TCP else 0
            if kind == 0:
                o["rule_id"][jo] = 0
            if ji >= 0:
                s = rb.inn.slots
                s["last_seen"][ji] = now - li
                s["tcp_state"][ji] = fi if p == TCP else 0
                if kind == 1:
                    s["flags"][ji] |= layout.F_CLONE
    model = ExpiryModel(cfg.timeouts)
    big = 1 << 20
    for d in steps:
        now += d
        res = a.sweep(now, max_slots=big, max_expire=big, budget_us=1e12)
        b.release_due(now, max(big, 16))
        expired, ended = model.expire(b, model.candidates(b, now), now)
        assert (res.expired, res.mappings_removed) == (expired, ended)
        assert np.array_equal(a.out.slots, b.out.slots)
        assert np.array_equal(a.inn.slots, b.inn.slots)
        assert {k: a.events[k] for k in EXPIRY_EVENTS} == model.events
        want = np.array(model.removed, SESSION_DTYPE) if model.removed else np.zeros(0, SESSION_DTYPE)
        model.removed = []
        assert a.drain_removed().tobytes() == want.tobytes()
        assert buf_a.getvalue() == buf_b.getvalue()
    for rid in range(1, 2 * len(rows) + 2):
        assert a.maps.get(rid) == b.maps.get(rid)
    assert sorted(a.hosts.ids()) == sorted(b.hosts.ids())
    for h in a.hosts.ids():
        assert [a.hosts.nports(h, pi) for pi in range(3)] == [b.hosts.nports(h, pi) for pi in range(3)]
    assert a.pool.due(1 << 40, big) == b.pool.due(1 << 40, big)  # the reuse-delay queues


def _out_key(row):
    p, ia, ip_, ra, rp = row
    return (p, ia, ip_, ra, ip_) if p == ICMP else row


def _in_key(row, ea, ep):
    p, ia, ip_, ra, rp = row
    return (p, ra, ep, ea, ep) if p == ICMP else (p, ra, rp, ea, ep)


def test_timeout_class_is_expirys():
    """Expiry.timeout_for reads the compiled class (one classification): every TCP flag
    combination each way, and the other protocols."""
    cfg = make_cfg()
    rb = make_rb(cfg)
    m = ExpiryModel(cfg.timeouts)
    for p in (TCP, UDP, ICMP, 58):
        for fo in range(8):
            for fi in range(8):
                assert rb.timeout_for(p, fo, fi) == m.timeout_for(p, fo, fi)
                assert EXPIRY_EVENTS[_expire.timeout_class(p, fo, fi)] == m.event(p, fo, fi)
