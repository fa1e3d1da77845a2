"""The coordinator: routing, validation and drops, liveness, control queries, metrics,
the daemon's command line, and a SIGKILL + restart while two peers keep talking."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import pytest
import zmq

from hypernat import messages as M
from hypernat.coord import Coordinator, CoordinatorError
from hypernat.coord.broker import DROP_REASON_NAMES
from hypernat.coord import ctl
from hypernat.coord.peer import ScriptedNic, rule_id_for

pytestmark = pytest.mark.timeout(120)
PY = sys.executable
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_n = [0]


OPEN = []  # sockets and peers a test opened: closed after it, pass or fail (a context
# whose sockets stay open would hang the interpreter at exit)


def track(x):
    OPEN.append(x)
    return x


@pytest.fixture(autouse=True)
def _close_what_tests_opened():
    yield
    while OPEN:
        x = OPEN.pop()
        try:
            x.close(0) if isinstance(x, zmq.Socket) else x.close()
        except Exception:  # noqa: BLE001 - closing twice is fine
            pass


def ipc_endpoint():
    """A short, unique ipc path (sun_path is limited to 107 bytes)."""
    _n[0] += 1
    return f"ipc:///tmp/hnc-{os.getpid()}-{_n[0]}/coord.sock"


@pytest.fixture(scope="module", autouse=True)
def _remove_ipc_dirs():
    yield
    import glob
    import shutil

    for d in glob.glob(f"/tmp/hnc-{os.getpid()}-*"):
        shutil.rmtree(d, ignore_errors=True)


def free_port():
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture
def coord(request):
    # a NIC is down after heartbeat_timeout of silence: long enough by default that peers
    # a test does not service for a moment (a loaded machine) stay up; a liveness test
    # asks for a short one (indirect parametrization)
    timeout = getattr(request, "param", 5.0)
    c = Coordinator(ipc_endpoint(), heartbeat_interval=0.1, heartbeat_timeout=timeout).start_thread()
    yield c
    c.stop()
    c.join(5)


@pytest.fixture
def peers(coord):
    made = []

    def make(nic, **kw):
        p = ScriptedNic(coord.endpoint, nic, heartbeat_interval=0.1, **kw)
        made.append(p)
        if kw.get("hello", True):
            assert p.run_until(lambda: p.registered, 5), f"nic{nic} not registered"
        return p

    yield make
    for p in made:
        p.close()


def until(cond, timeout=5.0, *pumps):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        for p in pumps:
            p.service(5)
        if not pumps:
            time.sleep(0.01)
    return cond()


def raw_dealer(coord, identity=None):
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    if identity is not None:
        s.identity = identity
    s.linger = 0
    s.connect(coord.endpoint)
    return track(s)


def raw_nic(coord, nic):
    """A bare DEALER registered as NIC ``nic`` (HELLO sent, HELLO_ACK awaited)."""
    s = raw_dealer(coord, M.nic_identity(nic))
    h = M.records(M.T_HELLO, 1)
    h["version"], h["nic"], h["incarnation"] = M.PROTOCOL_VERSION, nic, M.new_incarnation()
    s.send_multipart(M.frames(M.COORD, M.T_HELLO, h.tobytes()))
    assert recv_type(s, M.T_HELLO_ACK) is not None
    return s


def recv_type(sock, mtype, timeout=2.0):
    """The next message of type mtype (others skipped), as (source, payload) or None."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if sock.poll(50):
            src, t, payload = sock.recv_multipart()
            if t[0] == mtype:
                return src, payload
    return None


# ------------------------------------------------------------------ routing


def test_routes_between_two_nics_rewriting_the_source(coord, peers):
    a, b = peers(0), peers(1)
    seqs = a.fetch(1, n=5, ext_port=2000)
    assert until(lambda: len(a.answers) == 5, 5, a, b)
    assert sorted(a.answers) == seqs
    for s, r in a.answers.items():
        assert int(r["owner"]) == 1 and int(r["ext_port"]) == 2000
        assert int(r["rule_id"]) == rule_id_for(2000, s)
    assert b.served == 5 and a.duplicates == 0
    assert coord.routed[M.T_FETCH] == 1 and coord.routed[M.T_RULE] == 1


def test_receiver_sees_the_sender_id_and_the_payload_unchanged(coord, peers):
    b = peers(1)
    s = raw_nic(coord, 2)
    recs = M.records(M.T_ACTIVITY, 3)
    recs["seq"] = [7, 8, 9]
    recs["proto"] = 17
    recs["ext_port"] = [1, 2, 3]
    recs["idle_ms"] = [10, 20, 30]
    s.send_multipart(M.frames(b"nic1", M.T_ACTIVITY, recs.tobytes()))
    got = recv_type(b.sock, M.T_ACTIVITY)
    assert got is not None
    src, payload = got
    assert src == b"nic2" and payload == recs.tobytes()
    s.close()


def test_unknown_target_is_answered_and_counted(coord, peers):
    a = peers(0)
    seqs = a.fetch(5, n=2)
    assert until(lambda: a.undeliverable.get("unknown_target", 0) >= 1, 3, a)
    assert coord.drops["unknown_target"] >= 1
    assert all(s in a.pending for s in seqs)  # still pending: the sender decides


def test_undeliverable_carries_the_original_payload(coord, peers):
    s = raw_nic(coord, 0)
    recs = M.records(M.T_REVOKE, 2)
    recs["seq"] = [41, 42]
    recs["proto"] = 6
    recs["ext_port"] = 5
    s.send_multipart(M.frames(b"nic3", M.T_REVOKE, recs.tobytes()))
    got = recv_type(s, M.T_UNDELIVERABLE)
    assert got is not None
    orig, reason, target, body = M.unpack_undeliverable(got[1])
    assert (orig, reason, target) == (M.T_REVOKE, "unknown_target", 3)
    assert np.frombuffer(body, M.KEY_DTYPE)["seq"].tolist() == [41, 42]
    s.close()


def test_sender_must_say_hello_first(coord, peers):
    peers(1)
    s = raw_dealer(coord, b"nic0")
    f = M.records(M.T_FETCH, 1)
    f["proto"], f["ext_port"] = 6, 9
    s.send_multipart(M.frames(b"nic1", M.T_FETCH, f.tobytes()))
    got = recv_type(s, M.T_UNDELIVERABLE)
    assert got is not None and M.unpack_undeliverable(got[1])[1] == "not_registered"
    assert coord.drops["not_registered"] == 1 and coord.routed[M.T_FETCH] == 0
    s.close()


# ------------------------------------------------------- malformed and forged


def test_hello_with_another_nics_id_is_refused(coord):
    s = raw_dealer(coord, b"nic0")
    h = M.records(M.T_HELLO, 1)
    h["version"], h["nic"], h["incarnation"] = M.PROTOCOL_VERSION, 1, 5
    s.send_multipart(M.frames(M.COORD, M.T_HELLO, h.tobytes()))
    assert recv_type(s, M.T_HELLO_ACK, 0.5) is None
    assert coord.drops["bad_identity"] == 1 and not coord.nics
    anon = raw_dealer(coord)  # no identity at all, claiming nic1
    anon.send_multipart(M.frames(M.COORD, M.T_HELLO, h.tobytes()))
    assert recv_type(anon, M.T_HELLO_ACK, 0.5) is None
    assert coord.drops["bad_identity"] == 2 and not coord.nics
    s.close()
    anon.close()


def test_hello_with_another_protocol_version_is_refused(coord):
    s = raw_dealer(coord, b"nic0")
    h = M.records(M.T_HELLO, 1)
    h["version"], h["nic"] = M.PROTOCOL_VERSION + 1, 0
    s.send_multipart(M.frames(M.COORD, M.T_HELLO, h.tobytes()))
    assert recv_type(s, M.T_HELLO_ACK, 0.5) is None
    assert coord.drops["bad_version"] == 1
    s.close()


def test_a_peer_of_protocol_version_1_never_gets_a_record_through(coord, peers):
    """Version 1's RULE and ACTIVITY records were 40 bytes, version 2's are 36: nine v1
    records are ten whole v2 ones, so a v1 peer must never have a record routed.  Its
    HELLO is refused (bad_version, counted), so it stays unregistered: its messages
    bounce with not_registered (counted) and never reach a NIC."""
    b = peers(1)
    s = raw_dealer(coord, b"nic0")
    h = M.records(M.T_HELLO, 1)
    h["version"], h["nic"], h["incarnation"] = 1, 0, M.new_incarnation()
    s.send_multipart(M.frames(M.COORD, M.T_HELLO, h.tobytes()))
    assert recv_type(s, M.T_HELLO_ACK, 0.5) is None
    v1_rules = bytes(40 * 9)  # nine v1 RULE records
    assert len(v1_rules) % M.RULE_DTYPE.itemsize == 0
    s.send_multipart(M.frames(b"nic1", M.T_RULE, v1_rules))
    got = recv_type(s, M.T_UNDELIVERABLE)
    assert got is not None and M.unpack_undeliverable(got[1])[1] == "not_registered"
    assert coord.drops["bad_version"] == 1 and coord.drops["not_registered"] == 1
    assert recv_type(b.sock, M.T_RULE, 0.3) is None and coord.routed[M.T_RULE] == 0


@pytest.mark.parametrize(
    "frames_of, reason",
    [
        (lambda p: [b"nic1", M.TYPE_FRAME[M.T_FETCH]], "bad_frames"),
        (lambda p: [b"nic1", M.TYPE_FRAME[M.T_FETCH], p, b"extra"], "bad_frames"),
        (lambda p: [b"nic1", b"\x7f", p], "unknown_type"),
        (lambda p: [b"nic1", b"\x10\x10", p], "unknown_type"),
        (lambda p: [b"nic1", M.TYPE_FRAME[M.T_FETCH], p[:-3]], "truncated"),
        (lambda p: [b"nic1", M.TYPE_FRAME[M.T_FETCH], b""], "truncated"),
        (lambda p: [b"nic1", M.TYPE_FRAME[M.T_FETCH], p * (M.MAX_RECORDS + 1)], "oversize"),
        (lambda p: [M.COORD, M.TYPE_FRAME[M.T_FETCH], p], "wrong_direction"),
        (lambda p: [b"nic1", M.TYPE_FRAME[M.T_HELLO], p[:24]], "wrong_direction"),
        (lambda p: [M.COORD, M.TYPE_FRAME[M.T_STATS], b"{not json"], "bad_json"),
    ],
)
def test_malformed_messages_are_dropped_and_counted(coord, peers, frames_of, reason):
    a, b = peers(0), peers(1)
    s = raw_nic(coord, 2)
    f = M.records(M.T_FETCH, 1)
    f["seq"], f["proto"], f["ext_port"] = 1, 6, 80
    s.send_multipart(frames_of(f.tobytes()))
    assert until(lambda: coord.drops[reason] == 1, 3)
    b.service(50)
    assert not any(t == M.T_FETCH for _, t, _ in b.received) and b.served == 0
    # the coordinator still routes afterwards
    a.fetch(1)
    assert until(lambda: len(a.answers) == 1, 5, a, b)
    s.close()


def test_default_routes_by_the_header_without_reading_records(coord, peers):
    """The records of a routed message are the receiving NIC's to check (it does, and
    counts by reason): by default the coordinator passes them on as they came, checking
    only the header (test_malformed_messages_are_dropped_and_counted)."""
    b = peers(1)
    s = raw_nic(coord, 0)
    f = M.records(M.T_FETCH, 2)
    f["seq"], f["proto"], f["ext_port"] = [1, 2], [0x63, 6], 80  # the first record's protocol is bad
    s.send_multipart(M.frames(b"nic1", M.T_FETCH, f.tobytes()))
    got = recv_type(b.sock, M.T_FETCH)
    assert got == (b"nic0", f.tobytes())
    assert until(lambda: coord.routed[M.T_FETCH] == 1, 3) and sum(coord.drops.values()) == 0


@pytest.fixture
def checking_coord():
    c = Coordinator(ipc_endpoint(), heartbeat_interval=0.1, heartbeat_timeout=5.0, check_records=True).start_thread()
    yield c
    c.stop()
    c.join(5)


def test_records_are_checked_when_asked(checking_coord):
    """check_records (hypernat-coord --check-records): every record is read, a bad field
    is dropped and counted, nothing reaches the target, routing goes on."""
    coord = checking_coord
    a = track(ScriptedNic(coord.endpoint, 0, heartbeat_interval=0.1))
    b = track(ScriptedNic(coord.endpoint, 1, heartbeat_interval=0.1))
    assert until(lambda: a.registered and b.registered, 5, a, b)
    s = raw_nic(coord, 2)
    f = M.records(M.T_FETCH, 1)
    f["seq"], f["proto"], f["ext_port"] = 1, 0x63, 80
    s.send_multipart(M.frames(b"nic1", M.T_FETCH, f.tobytes()))
    assert until(lambda: coord.drops["bad_field"] == 1, 3)
    got = recv_type(s, M.T_UNDELIVERABLE)
    assert got is not None and M.unpack_undeliverable(got[1])[1] == "rejected"
    b.service(50)
    assert not any(t == M.T_FETCH for _, t, _ in b.received) and b.served == 0
    a.fetch(1)
    assert until(lambda: len(a.answers) == 1, 5, a, b)


def test_rule_naming_another_owner_is_forged(checking_coord):
    coord = checking_coord
    b = track(ScriptedNic(coord.endpoint, 1, heartbeat_interval=0.1))
    assert until(lambda: b.registered, 5, b)
    s = raw_nic(coord, 0)
    r = M.records(M.T_PUSH, 2)
    r["seq"], r["proto"], r["int_port"], r["ext_port"], r["rem_addr"] = 1, 6, 1000, 2000, 1
    r["owner"] = [0, 1]  # the second record pretends to come from nic1
    s.send_multipart(M.frames(b"nic1", M.T_PUSH, r.tobytes()))
    got = recv_type(s, M.T_UNDELIVERABLE)
    assert got is not None and M.unpack_undeliverable(got[1])[1] == "rejected"
    assert coord.drops["bad_identity"] == 1
    assert recv_type(b.sock, M.T_PUSH, 0.3) is None
    s.close()


def test_partition_and_internal_predicates():
    # nic k owns external ports with port % 2 == k; internal is 10.0.0.0/8
    owns = lambda nic, addrs, ports: (ports % 2) == nic  # noqa: E731
    internal = lambda addrs: (addrs >> 24) == 10  # noqa: E731
    c = Coordinator(ipc_endpoint(), heartbeat_interval=0.1, heartbeat_timeout=1.0, owns=owns,
                    internal=internal).start_thread()
    try:
        a = track(ScriptedNic(c.endpoint, 0, heartbeat_interval=0.1))
        b = track(ScriptedNic(c.endpoint, 1, heartbeat_interval=0.1))
        assert until(lambda: a.registered and b.registered, 5, a, b)

        def rule(ext_port, int_addr):
            r = M.records(M.T_RULE, 1)
            r["seq"], r["proto"], r["int_port"], r["rem_addr"], r["owner"] = 1, 6, 1000, 1, 0
            r["ext_port"], r["int_addr"] = ext_port, int_addr
            return r.tobytes()

        a.send(b"nic1", M.T_RULE, rule(2001, 0x0A000001))  # odd port: nic1's, not nic0's
        assert until(lambda: c.drops["foreign_endpoint"] == 1, 3, a, b)
        a.send(b"nic1", M.T_RULE, rule(2000, 0xC0A80001))  # 192.168.0.1 is not internal
        assert until(lambda: c.drops["not_internal"] == 1, 3, a, b)
        a.send(b"nic1", M.T_RULE, rule(2000, 0x0A000001))  # fine
        assert until(lambda: any(t == M.T_RULE for _, t, _ in b.received) or c.routed[M.T_RULE] == 1, 3, a, b)
        assert c.routed[M.T_RULE] == 1
        # a FETCH by external endpoint must go to that endpoint's owner
        f = M.records(M.T_FETCH, 1)
        f["proto"], f["ext_port"] = 6, 3000  # even: nic0's, sent to nic1
        a.send(b"nic1", M.T_FETCH, f.tobytes())
        assert until(lambda: c.drops["foreign_endpoint"] == 2, 3, a, b)
        a.close()
        b.close()
    finally:
        c.stop()
        c.join(5)


# ----------------------------------------------------------------- liveness


@pytest.mark.parametrize("coord", [0.6], indirect=True)
def test_heartbeat_echo_and_liveness(coord, peers):
    a, b = peers(0), peers(1)
    assert until(lambda: a.peers.get(1, (0,))[0] == M.PEER_UP, 3, a, b)
    assert coord.nics[1].up
    # b goes silent: after heartbeat_timeout it is down, and a hears so
    assert until(lambda: not coord.nics[1].up, 3, a)
    assert until(lambda: a.peers[1][0] == M.PEER_DOWN, 3, a)
    a.fetch(1, n=1)
    assert until(lambda: a.undeliverable.get("target_down", 0) >= 1, 3, a)
    assert coord.drops["target_down"] >= 1
    # b speaks again (a heartbeat): up again, and a's pending fetch gets through on retry
    b.heartbeat()
    assert until(lambda: coord.nics[1].up, 3, a)
    assert until(lambda: len(a.answers) == 1, 5, a, b)


def test_heartbeat_from_unknown_incarnation_asks_for_hello(coord):
    s = raw_dealer(coord, b"nic0")
    hb = M.records(M.T_HEARTBEAT, 1)
    hb["seq"], hb["incarnation"] = 3, 99
    s.send_multipart(M.frames(M.COORD, M.T_HEARTBEAT, hb.tobytes()))
    got = recv_type(s, M.T_UNDELIVERABLE)
    assert got is not None and M.unpack_undeliverable(got[1])[:2] == (M.T_HEARTBEAT, "not_registered")
    s.close()


def test_heartbeat_is_echoed_with_the_coordinators_incarnation(coord, peers):
    a = peers(0)
    hb = M.records(M.T_HEARTBEAT, 1)
    hb["seq"], hb["incarnation"], hb["time_ns"] = 77, a.incarnation, 123456
    a.send(M.COORD, M.T_HEARTBEAT, hb.tobytes())
    echo = None
    while echo is None or int(echo["seq"]) != 77:  # skip echoes of the peer's own heartbeats
        got = recv_type(a.sock, M.T_HEARTBEAT)
        assert got is not None
        echo = np.frombuffer(got[1], M.HEARTBEAT_DTYPE)[0]
    assert int(echo["time_ns"]) == 123456
    assert int(echo["incarnation"]) == coord.incarnation


def test_restarted_nic_hello_updates_incarnation_and_peers(coord, peers):
    a, b = peers(0), peers(1)
    old = b.incarnation
    assert until(lambda: a.peers.get(1, (0, 0))[1] == old, 3, a, b)
    b.close()
    b2 = peers(1)
    assert b2.incarnation != old
    assert until(lambda: a.peers[1][1] == b2.incarnation, 3, a, b2)
    assert coord.nics[1].hellos == 2


# ----------------------------------------------------------- control queries


def run_ctl(capsys, *argv):
    rc = ctl.main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_ctl_status_nics_counters(coord, peers, capsys):
    a, b = peers(0), peers(1)
    a.stats({"in": {"translated": 5, "miss_in": 1}, "fetches": 2})
    b.stats({"in": {"translated": 7}, "fetches": 3})
    assert until(lambda: all(st.stats for st in coord.nics.values()), 3)
    rc, out, _ = run_ctl(capsys, "--endpoint", coord.endpoint, "--json", "counters")
    assert rc == 0
    c = json.loads(out)
    assert c["total"] == {"in": {"translated": 12, "miss_in": 1}, "fetches": 5}
    assert c["per_nic"]["nic1"]["fetches"] == 3
    rc, out, _ = run_ctl(capsys, "--endpoint", coord.endpoint, "--json", "status")
    st = json.loads(out)
    assert rc == 0 and st["nics_up"] == 2 and st["nics_known"] == 2 and st["incarnation"] == f"{coord.incarnation:016x}"
    rc, out, _ = run_ctl(capsys, "--endpoint", coord.endpoint, "nics")
    lines = out.strip().splitlines()
    assert rc == 0 and len(lines) == 3 and lines[1].split()[:2] == ["0", "up"]
    rc, out, _ = run_ctl(capsys, "--endpoint", coord.endpoint, "counters")
    assert rc == 0 and "in.translated" in out and "12" in out


def test_ctl_rule_asks_every_nic(coord, peers, capsys):
    a, b = peers(0), peers(1)
    b.rule_answer = {"role": "owner", "ext": "203.0.113.1:4000", "int": "10.0.0.1:5555"}
    result = {}

    def ask():
        result["rc"] = ctl.main(["--endpoint", coord.endpoint, "--json", "rule", "203.0.113.1:4000", "--proto", "tcp"])

    t = threading.Thread(target=ask)
    t.start()
    while t.is_alive():
        a.service(5)
        b.service(5)
    out = capsys.readouterr().out
    r = json.loads(out)
    assert result["rc"] == 0
    assert r["query"] == {"addr": "203.0.113.1", "port": 4000, "proto": 6}
    assert r["answers"]["nic1"]["result"]["role"] == "owner"
    assert r["answers"]["nic0"] == {"ok": True, "result": None}
    assert r["missing"] == []


def test_ctl_rule_reports_silent_nics(coord, peers, capsys):
    a = peers(0)
    b = peers(1)
    b.heartbeat()  # b is up but will not answer: nobody services it
    result = {}
    t = threading.Thread(target=lambda: result.update(rc=ctl.main(["--endpoint", coord.endpoint, "--json", "rule",
                                                                    "203.0.113.1:4000"])))
    t.start()
    while t.is_alive():
        a.service(5)
    r = json.loads(capsys.readouterr().out)
    assert result["rc"] == 0 and r["missing"] == ["nic1"] and "nic0" in r["answers"]


def test_ctl_errors(coord, capsys):
    rc, _, err = run_ctl(capsys, "--endpoint", coord.endpoint, "rule", "nonsense")
    assert rc == 2 and "ADDR:PORT" in err
    rc, _, err = run_ctl(capsys, "--endpoint", coord.endpoint, "rule", "300.1.1.1:80")
    assert rc == 1 and "300.1.1.1" in err
    with ctl.CtlClient(coord.endpoint, timeout=2) as c:
        with pytest.raises(ctl.CtlError, match="unknown op"):
            c.query("bogus")
    assert coord.drops["bad_query"] == 1
    rc, _, err = run_ctl(capsys, "--endpoint", ipc_endpoint(), "--timeout", "0.3", "status")
    assert rc == 1 and "no answer" in err


def test_hypernat_cli_dispatches_ctl(coord):
    out = subprocess.run([PY, "-m", "hypernat.cli", "ctl", "--endpoint", coord.endpoint, "--json", "status"],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["incarnation"] == f"{coord.incarnation:016x}"


# ------------------------------------------------------------------- metrics


def test_metrics_endpoint():
    port = free_port()
    c = Coordinator(ipc_endpoint(), heartbeat_interval=0.1, metrics_port=port).start_thread()
    try:
        a = track(ScriptedNic(c.endpoint, 0, heartbeat_interval=0.1))
        b = track(ScriptedNic(c.endpoint, 1, heartbeat_interval=0.1))
        assert until(lambda: a.registered and b.registered, 5, a, b)
        a.fetch(1, n=4)
        a.fetch(9, n=1)
        a.stats({"in": {"translated": 11}})
        assert until(lambda: len(a.answers) == 4 and c.drops["unknown_target"] >= 1 and c.nics[0].stats, 5, a, b)
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        lines = dict(line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
        assert float(lines['hypernat_coord_messages_routed_total{type="FETCH"}']) == 1
        assert float(lines['hypernat_coord_messages_routed_total{type="RULE"}']) == 1
        assert float(lines['hypernat_coord_drops_total{reason="unknown_target"}']) == c.drops["unknown_target"]
        assert float(lines["hypernat_coord_nics_up"]) == 2
        assert float(lines['hypernat_coord_nic_up{nic="1"}']) == 1
        assert float(lines['hypernat_gateway_counter{name="in_translated"}']) == 11
        a.close()
        b.close()
    finally:
        c.stop()
        c.join(5)


# ------------------------------------------------------------------- the daemon


def start_daemon(endpoint, *extra):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.Popen([PY, "-m", "hypernat.coord", "--endpoint", endpoint, "--metrics-port", "0",
                             "--heartbeat-interval", "0.1", "--heartbeat-timeout", "1.0", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)


def wait_serving(endpoint, timeout=20):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with ctl.CtlClient(endpoint, timeout=0.3) as c:
                return c.query("status")
        except ctl.CtlError:
            pass
    raise AssertionError(f"coordinator at {endpoint} did not answer")


def test_daemon_help():
    out = subprocess.run([PY, "-m", "hypernat.coord", "--help"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0
    assert "--endpoint" in out.stdout and "CURVE" in out.stdout and "SIGTERM" in out.stdout


def test_check_records_is_opt_in_on_the_command_line():
    from hypernat.coord.__main__ import build_parser, options

    assert options(build_parser().parse_args(["--check-records"]))["check_records"] is True
    assert "check_records" not in options(build_parser().parse_args([]))
    assert Coordinator(ipc_endpoint(), ctx=zmq.Context.instance()).check_records is False


def test_daemon_refuses_open_tcp_without_curve():
    # refused before anything is bound: nothing listens off loopback
    out = subprocess.run([PY, "-m", "hypernat.coord", "--endpoint", f"tcp://0.0.0.0:{free_port()}",
                          "--metrics-port", "0"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 2 and "CURVE" in out.stderr
    with pytest.raises(CoordinatorError, match="CURVE"):
        Coordinator(f"tcp://192.0.2.1:{free_port()}").start_thread()


def test_refuses_to_steal_a_live_ipc_path(coord):
    with pytest.raises(CoordinatorError, match="another process"):
        Coordinator(coord.endpoint).start_thread()
    assert wait_serving(coord.endpoint)["nics_known"] == 0  # the first one is untouched


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_daemon_signal_is_a_clean_stop(sig):
    ep = ipc_endpoint()
    p = start_daemon(ep)
    try:
        wait_serving(ep)
        p.send_signal(sig)
        _, err = p.communicate(timeout=20)
        assert p.returncode == 0, err
        assert sig.name in err and "coordinator stopped" in err
        assert not os.path.exists(ep[len("ipc://"):])  # the socket file is gone
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_daemon_from_config(tmp_path):
    ep = ipc_endpoint()
    cfg = tmp_path / "gw.yaml"
    src = open(os.path.join(ROOT, "conf", "gw-2nic-by-port.yaml")).read()
    import yaml

    doc = yaml.safe_load(src)
    doc.setdefault("coordinator", {})["endpoint"] = ep
    doc.setdefault("metrics", {})["enabled"] = False
    cfg.write_text(yaml.safe_dump(doc))
    env = dict(os.environ, PYTHONPATH=ROOT)
    p = subprocess.Popen([PY, "-m", "hypernat.coord", "--config", str(cfg)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        st = wait_serving(ep)
        assert st["endpoint"] == ep
        a = track(ScriptedNic(ep, 0))
        assert a.run_until(lambda: a.registered, 5)
        bad = track(ScriptedNic(ep, 5, hello=False))  # the config has 2 NICs: nic5 cannot join
        bad.hello()
        bad.run_until(lambda: bad.registered, 1.0)
        assert not bad.registered
        with ctl.CtlClient(ep) as c:
            counters = c.query("counters")
            assert counters["coordinator"]["drops"].get("bad_field", 0) >= 1
            r = {}
            t = threading.Thread(target=lambda: r.update(c.query("rule", addr="203.0.113.10", port=40000)))
            t.start()
            while t.is_alive():  # nic0 answers the coordinator's question while ctl waits
                a.service(5)
            # by-port: 40000 is in the upper half of the ports, nic1's
            assert r["owner"] == "nic1" and r["missing"] == [] and "nic0" in r["answers"]
        a.close()
        bad.close()
    finally:
        p.send_signal(signal.SIGTERM)
        p.communicate(timeout=20)


# --------------------------------------------------- SIGKILL + restart mid-traffic


def test_coordinator_sigkill_and_restart_loses_nothing_acknowledged():
    ep = ipc_endpoint()
    proc = start_daemon(ep)
    wait_serving(ep)
    ctx = zmq.Context()
    a = ScriptedNic(ep, 0, ctx=ctx, heartbeat_interval=0.1, retry_after=0.2)
    b = ScriptedNic(ep, 1, ctx=ctx, heartbeat_interval=0.1, retry_after=0.2)
    stop = threading.Event()
    sent = []

    def owner_loop():
        while not stop.is_set():
            b.service(5)

    t = threading.Thread(target=owner_loop)
    t.start()
    try:
        assert a.run_until(lambda: a.registered and 1 in a.peers, 5)
        first_inc = a.coord_incarnation
        killed_at = time.monotonic() + 0.8
        restarted = False
        end = time.monotonic() + 3.0
        while time.monotonic() < end:
            sent += a.fetch(1, n=4, ext_port=3000)
            a.service(20)
            if not restarted and time.monotonic() >= killed_at:
                answered_before = len(a.answers)
                proc.send_signal(signal.SIGKILL)
                proc.wait(10)
                time.sleep(0.3)  # peers keep sending into the void meanwhile
                for _ in range(5):
                    sent += a.fetch(1, n=4, ext_port=3000)
                    a.service(20)
                proc = start_daemon(ep)
                restarted = True
        assert restarted and answered_before > 0
        assert a.run_until(lambda: not a.pending, 20), f"{len(a.pending)} fetches never answered"
        assert sorted(a.answers) == sorted(sent)
        for s, r in a.answers.items():  # each answer is the one for its own request
            assert int(r["rule_id"]) == rule_id_for(3000, s) and int(r["owner"]) == 1
        assert a.coord_incarnation != first_inc  # it did meet a new coordinator
        assert a.hellos >= 2 and b.hellos >= 2  # and both peers said HELLO again
        assert a.resends > 0
        assert b.served >= len(sent)
    finally:
        stop.set()
        t.join(5)
        a.close()
        b.close()
        ctx.term()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


def test_metrics_port_in_use_is_a_clear_error():
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    try:
        with pytest.raises(CoordinatorError, match="metrics"):
            Coordinator(ipc_endpoint(), metrics_port=s.getsockname()[1]).start_thread()
    finally:
        s.close()


def test_predicates_from_config():
    from hypernat.config import load
    from hypernat.coord.broker import predicates_from_config

    owns, internal, owner_of = predicates_from_config(load(os.path.join(ROOT, "conf", "gw-2nic-by-port.yaml")))
    e = M.ip_int("203.0.113.10")
    addrs = np.array([e, e, e, M.ip_int("203.0.113.11")], dtype=np.uint32)
    ports = np.array([1024, 33279, 33280, 40000], dtype=np.uint16)  # nic0 | nic0 | nic1 | outside the pool
    assert owns(0, addrs, ports).tolist() == [True, True, False, False]
    assert owns(1, addrs, ports).tolist() == [False, False, True, False]
    assert owner_of(e, 40000) == 1 and owner_of(e, 2000) == 0
    ins = np.array([M.ip_int(a) for a in ("10.0.0.1", "10.1.255.255", "10.2.0.1", "203.0.113.10")], dtype=np.uint32)
    assert internal(ins).tolist() == [True, True, False, False]


class _FakeSock:
    """Captures what the coordinator sends (for driving _handle without sockets)."""

    def __init__(self):
        self.sent = []

    def send_multipart(self, frames, flags=0, **kw):
        self.sent.append(list(frames))


def _offline_coordinator():
    from hypernat.coord.broker import NicState

    c = Coordinator(ipc_endpoint(), n_nics=4)
    c.sock = _FakeSock()
    for i in (0, 1):
        st = NicState(i, M.nic_identity(i))
        st.up = True
        c.nics[i] = st
        c.by_ident[st.ident] = st
    return c


def test_any_frames_are_handled_without_raising():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    c = _offline_coordinator()
    idents = st.sampled_from([b"nic0", b"nic1", b"nic2", b"\x00\x01\x02\x03", b"", b"nic9"])
    types = st.one_of(st.sampled_from(list(M.TYPE_FRAME.values())), st.binary(max_size=2))
    payloads = st.one_of(st.binary(max_size=200), st.sampled_from([b"{}", b'{"id": 1, "op": "rule", "args": []}',
                                                                   b'{"id": 1, "op": "status"}', b"[]"]))

    @settings(max_examples=400, deadline=None)
    @given(ident=idents, target=st.one_of(idents, st.binary(max_size=6)), tframe=types, payload=payloads,
           extra=st.lists(st.binary(max_size=4), max_size=2), short=st.booleans())
    def run(ident, target, tframe, payload, extra, short):
        msg = [ident, target, tframe, payload] + extra
        if short:
            msg = msg[:2]
        before = sum(c.drops.values()) + sum(c.routed)
        c._handle(msg)
        for frames in c.sock.sent:  # everything sent back is well formed
            assert len(frames) == 4 and len(frames[2]) == 1 and frames[2][0] in M.TYPE_NAMES
        c.sock.sent.clear()
        if len(msg) != 4:
            assert sum(c.drops.values()) + sum(c.routed) == before + 1

    try:
        run()
        # every drop was counted under a declared reason (no ad-hoc names crept in)
        assert set(c.drops) == set(DROP_REASON_NAMES) and sum(c.drops.values()) > 0
    finally:
        c.ctx.term()


def test_routed_message_is_forwarded_with_the_source_in_front():
    c = _offline_coordinator()
    try:
        f = M.records(M.T_FETCH, 2)
        f["proto"], f["ext_port"] = 6, 80
        c._handle([b"nic0", b"nic1", M.TYPE_FRAME[M.T_FETCH], f.tobytes()])
        assert c.sock.sent == [[b"nic1", b"nic0", M.TYPE_FRAME[M.T_FETCH], f.tobytes()]]
        c.sock.sent.clear()
        c.nics[1].up = False
        c._handle([b"nic0", b"nic1", M.TYPE_FRAME[M.T_FETCH], f.tobytes()])
        (frames,) = c.sock.sent
        assert frames[:3] == [b"nic0", M.COORD, M.TYPE_FRAME[M.T_UNDELIVERABLE]]
        assert M.unpack_undeliverable(frames[3]) == (M.T_FETCH, "target_down", 1, f.tobytes())
    finally:
        c.ctx.term()


def test_routes_over_loopback_tcp_without_keys():
    c = Coordinator(f"tcp://127.0.0.1:{free_port()}", heartbeat_interval=0.1).start_thread()
    try:
        a = track(ScriptedNic(c.bound_endpoint, 0, heartbeat_interval=0.1))
        b = track(ScriptedNic(c.bound_endpoint, 1, heartbeat_interval=0.1))
        assert until(lambda: a.registered and b.registered, 5, a, b)
        a.fetch(1, n=3)
        assert until(lambda: len(a.answers) == 3, 5, a, b)
        assert c.status()["curve"] is False
    finally:
        c.stop()
        c.join(5)


def test_the_objects_alive_at_start_are_frozen_out_of_the_collector():
    """When it starts serving, the coordinator moves every object alive into the GC's
    permanent generation: no collection walks the process's heap (in the emulated
    deployment, the heap of the process it was forked from) while a message waits."""
    import gc

    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    c = Coordinator(f"inproc://freeze-{os.getpid()}", n_nics=2).start_thread()
    try:
        assert gc.get_freeze_count() > 0
    finally:
        c.stop()
        c.join(5)
        gc.unfreeze()
