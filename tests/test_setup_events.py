"""The per-event ring of connection setup (hypernat.nat._events, issue 11).

With the per-rule translation log on (local or ``remote``) or active install with more
than one NIC, a new mapping or session on a host that has room in its blocks is set up
by the compiled code (``OutSetup``), not the builder's general path: its event goes
through the ring, drained once per call into the log's lines and ``drain_created``'s
records.  The lines and records are checked against ones built here by hand (the line
text as ``TransLog.rule`` wrote it one call at a time before the ring; a batch's lines
share one clock reading), and the general path's calls are counted.
"""
import collections
import io
import ipaddress

import numpy as np
import pytest
from test_rules import R1, R2, SYN, TCP, UDP, fetch_records, hosts_of, keys_of, make_cfg, make_rb, miss

from hypernat.nat._events import EVENT_DTYPE, MAPPING, SESSION, EventRing, rule_line, rule_lines
from hypernat.rules import SESSION_DTYPE
from hypernat.translog import TransLog
from hypernat.verdicts import IN, OUT

NAMES = {1: "icmp", 6: "tcp", 17: "udp"}


def _a(x) -> str:
    return str(ipaddress.IPv4Address(int(x)))


def line(ts, nic, p, ia, ip, ea, ep, ra=None, rp=None, event="create") -> str:
    """A per-rule line as hypernat.translog wrote it before the ring (an f-string)."""
    rem = f', "remote": "{_a(ra)}:{rp}"' if ra is not None else ""
    return (f'{{"ts": {ts:.3f}, "nic": {nic}, "event": "{event}", "proto": "{NAMES.get(p, p)}", '
            f'"internal": "{_a(ia)}:{ip}", "external": "{_a(ea)}:{ep}"{rem}}}\n')


def count_general_path(rb):
    """Count the builder's general-path calls (``_out`` / ``_in``) from now on."""
    calls = collections.Counter()
    out_, in_ = rb._out, rb._in

    def o(*a, **k):
        calls["out"] += 1
        return out_(*a, **k)

    def i(*a, **k):
        calls["in"] += 1
        return in_(*a, **k)

    rb._out, rb._in = o, i
    return calls


class Clock:
    """1.0, 2.0, ... one step per reading."""

    def __init__(self):
        self.t = 0.0

    def __call__(self):
        self.t += 1.0
        return self.t


def rows_for(hosts, ports, remote=R1, dport=80):
    """One new outgoing connection per (host, port), TCP and UDP alternating."""
    return [(TCP if k % 2 else UDP, h, 5000 + k, remote, dport, SYN if k % 2 else 0)
            for h in hosts for k in range(ports)]


def session_of(rb, p, ia, ip, ra, rp):
    rid = rb.maps.by_out_key(p, ia, ip, ra, rp)
    assert rid
    _, _, _, ea, ep, _ = rb.maps.get(rid)
    return rid, ea, ep


def new_sessions(rows, seen):
    """The rows (proto, I, Ip, R, Rp, ...) whose session is not in `seen` yet (added)."""
    out = []
    for r in rows:
        if r[:5] not in seen:
            seen.add(r[:5])
            out.append(r)
    return out


@pytest.mark.parametrize("remote", [False, True])
def test_per_rule_log_setups_stay_compiled(remote):
    cfg = make_cfg(1, block=16, filtering="endpoint-independent")
    buf = io.StringIO()
    rb = make_rb(cfg, translog=TransLog(buf, "per-rule", remote=remote, clock=Clock()))
    hosts = hosts_of(rb, 3)
    first = rows_for(hosts, 1)
    miss(rb, OUT, first, 10)  # new hosts (and their first block): the general path
    calls = count_general_path(rb)
    # new mappings on the hosts' blocks (and each host's first session again), a second
    # remote for some of them (a new session on an existing mapping), then answers from
    # new remote ports (endpoint-independent filtering admits them: incoming sessions)
    rows = rows_for(hosts, 6) + rows_for(hosts[:2], 3, R2, 53)
    assert (miss(rb, OUT, rows, 11).action == 1).all()
    inbound = []
    for p, ia, ip, _, _, _ in rows[1:5]:
        _, ea, ep = session_of(rb, p, ia, ip, R1, 80)
        inbound.append((p, R2, 7000 + ip, ea, ep))
    assert (miss(rb, IN, inbound, 12).action == 1).all()
    assert calls == {}  # every setup compiled: none through _out / _in

    seen, mappings, want = set(), set(), []
    for ts, batch in ((1.0, first), (2.0, rows)):  # one clock reading per batch
        for p, ia, ip, ra, rp, _ in new_sessions(batch, seen):
            _, ea, ep = session_of(rb, p, ia, ip, ra, rp)
            if remote:
                want.append(line(ts, 0, p, ia, ip, ea, ep, ra, rp))
            elif (p, ia, ip) not in mappings:
                want.append(line(ts, 0, p, ia, ip, ea, ep))
            mappings.add((p, ia, ip))
    if remote:  # the incoming sessions: a line each with remote logging (no new mapping: none without)
        for p, ra, rp, ea, ep in inbound:
            _, ia, ip, _, _, _ = rb.maps.get(rb.maps.by_external(p, ea, ep))
            want.append(line(3.0, 0, p, ia, ip, ea, ep, ra, rp))
    assert buf.getvalue() == "".join(want)
    assert rb.translog.lines == len(want)


def test_active_install_two_nics_setups_stay_compiled():
    cfg = make_cfg(2, block=16, install="active", filtering="endpoint-independent")
    rb = make_rb(cfg, 0)
    assert rb.track_created
    hosts = hosts_of(rb, 3)
    seen, expect = set(), []

    def created(rows, now):
        for p, ia, ip, ra, rp, *_ in new_sessions(rows, seen):
            rid, ea, ep = session_of(rb, p, ia, ip, ra, rp)
            expect.append((ia, ea, ra, ip, ep, rp, p, 3, rid, now, 0, 0, 0, 0))

    first = rows_for(hosts, 1)
    miss(rb, OUT, first, 10)  # new hosts: the general path
    created(first, 10)
    calls = count_general_path(rb)
    rows = rows_for(hosts, 5) + rows_for(hosts[:1], 2, R2, 53)
    assert (miss(rb, OUT, rows, 11).action == 1).all()
    created(rows, 11)
    inbound = []
    for p, ia, ip, _, _, _ in rows[1:4]:
        _, ea, ep = session_of(rb, p, ia, ip, R1, 80)
        inbound.append((p, R2, 9000 + ip, ea, ep))
    assert (miss(rb, IN, inbound, 12).action == 1).all()
    for p, ra, rp, ea, ep in inbound:
        rid = rb.maps.by_external(p, ea, ep)
        _, ia, ip, _, _, _ = rb.maps.get(rid)
        expect.append((ia, ea, ra, ip, ep, rp, p, 3, rid, 12, 0, 0, 0, 0))
    # a fetch served: a new session for another NIC's miss, created here
    rule, bad, _ = rb.serve_fetches(fetch_records(OUT, keys_of([(UDP, hosts[2], 6001, R2, 443)])), 13)
    assert len(rule) == 1 and not len(bad)
    created([(UDP, hosts[2], 6001, R2, 443)], 13)
    assert calls == {}  # all compiled
    c = rb.drain_created()
    assert c.dtype == SESSION_DTYPE
    assert c.tolist() == expect
    assert len(rb.drain_created()) == 0


def test_general_path_events_go_through_the_same_ring():
    """A new host's setup (the general path) and the compiled ones after it land in one
    ring in frame order: one batch's log lines in the order of its frames."""
    cfg = make_cfg(1, block=4)
    buf = io.StringIO()
    rb = make_rb(cfg, translog=TransLog(buf, "per-rule", clock=lambda: 5.0))
    h1, h2 = hosts_of(rb, 2)
    # h1 new (general), h1 again (compiled), h2 new (general), h1 past its block (a new
    # block: general), h2 again (compiled)
    rows = [(TCP, h1, 100, R1, 80), (TCP, h1, 101, R1, 80), (TCP, h2, 100, R1, 80)]
    rows += [(TCP, h1, 102 + k, R1, 80) for k in range(4)] + [(TCP, h2, 101, R1, 80)]
    calls = count_general_path(rb)
    miss(rb, OUT, rows, 10)
    assert calls["out"] == 3  # two new hosts, one new block
    want = []
    for p, ia, ip, ra, rp in rows:
        _, ea, ep = session_of(rb, p, ia, ip, ra, rp)
        want.append(line(5.0, 0, p, ia, ip, ea, ep))
    assert buf.getvalue() == "".join(want)


def test_ring_records_only_what_is_on_and_grows():
    r = EventRing()
    assert r.record(MAPPING, 6, 1, 2, 3, 4, 0, 0, 1, 9) == 0 and r.record(SESSION, 6, 1, 2, 3, 4, 5, 6, 1, 9) == 0
    assert len(r) == 0 and len(r.drain()) == 0
    r.sessions = True
    for k in range(1000):  # beyond its first allocation: grows, loses nothing
        r.record(SESSION, 17, k, 2, 3, 4, 5, 6, k, 9)
    r.record(MAPPING, 6, 1, 2, 3, 4, 0, 0, 1, 9)  # off: not recorded
    a = r.drain()
    assert a.dtype == EVENT_DTYPE and len(a) == 1000 and (a["iaddr"] == np.arange(1000)).all()
    assert (a["kind"] == SESSION).all() and len(r) == 0
    with pytest.raises(ValueError):
        r.record(7, 6, 1, 2, 3, 4, 0, 0, 1, 9)


def test_rule_line_text_is_the_f_string_s():
    """The compiled line text against the f-string, over odd values too (an unknown
    protocol, large and negative-zero timestamps, the extreme addresses and ports)."""
    rng = np.random.default_rng(3)
    recs = np.zeros(64, EVENT_DTYPE)
    for f in ("iaddr", "eaddr", "raddr"):
        recs[f] = rng.integers(0, 1 << 32, 64, dtype=np.uint64)
    for f in ("iport", "eport", "rport"):
        recs[f] = rng.integers(0, 1 << 16, 64)
    recs["proto"] = rng.choice([1, 6, 17, 0, 47, 255], 64)
    recs[0]["iaddr"], recs[0]["iport"], recs[1]["eaddr"], recs[1]["eport"] = 0, 0, 0xFFFFFFFF, 65535
    for ts in (0.0, -0.0, 1.0005, 1764149000.125, 2.0**70):
        for remote in (False, True):
            want = "".join(line(ts, 3, int(x["proto"]), x["iaddr"], int(x["iport"]), x["eaddr"], int(x["eport"]),
                                *((x["raddr"], int(x["rport"])) if remote else ()), event="remove")
                           for x in recs)
            assert rule_lines(ts, 3, "remove", recs, remote) == want
            x = recs[5]
            assert rule_line(ts, 3, "remove", x["proto"], x["iaddr"], x["iport"], x["eaddr"], x["eport"],
                             x["raddr"], x["rport"], remote) == want.splitlines(True)[5]
