"""CURVE on the coordinator channel: each key is bound to one NIC id (ZAP), an unknown key
is refused, a key posing as another NIC is refused and counted, a good key works; and
the coordinator refuses to start off loopback without keys."""
import os
import socket
import time

import pytest
import zmq
import zmq.auth

from hypernat import auth
from hypernat import messages as M
from hypernat.coord import Coordinator, CoordinatorError
from hypernat.coord import ctl
from hypernat.coord.peer import ScriptedNic

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(not zmq.has("curve"), reason="libzmq built without CURVE"),
]


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    rc = ctl.main(["keygen", str(d), "--nics", "2"])
    assert rc == 0
    # a stranger's key pair, not in authorized/
    other = tmp_path_factory.mktemp("stranger")
    zmq.auth.create_certificates(str(other), "nic0")
    return str(d), str(other)


@pytest.fixture
def curve_coord(keys):
    d, _ = keys
    c = Coordinator(f"tcp://127.0.0.1:{free_port()}", heartbeat_interval=0.1, heartbeat_timeout=2.0,
                    curve_secret_key=os.path.join(d, "server.key_secret"),
                    authorized=os.path.join(d, "authorized")).start_thread()
    yield c
    c.stop()
    c.join(5)


def peer(coord, nic, secret, d, identity=None):
    return ScriptedNic(coord.bound_endpoint, nic, heartbeat_interval=0.1, identity=identity,
                       curve=(secret, os.path.join(d, "server.key")))


def until(cond, timeout, *peers):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        for p in peers:
            p.service(10)
        if not peers:
            time.sleep(0.01)
    return cond()


def test_keygen_layout(keys):
    d, _ = keys
    names = sorted(os.listdir(d))
    for n in ("server", "nic0", "nic1", "ctl"):
        assert f"{n}.key" in names and f"{n}.key_secret" in names
    assert sorted(os.listdir(os.path.join(d, "authorized"))) == ["ctl.key", "nic0.key", "nic1.key"]
    assert os.stat(os.path.join(d, "nic0.key_secret")).st_mode & 0o077 == 0
    with pytest.raises(auth.AuthError, match="exists"):
        auth.generate(d, [0])


def test_good_keys_work_and_route(curve_coord, keys):
    d, _ = keys
    a = peer(curve_coord, 0, os.path.join(d, "nic0.key_secret"), d)
    b = peer(curve_coord, 1, os.path.join(d, "nic1.key_secret"), d)
    try:
        assert until(lambda: a.registered and b.registered, 10, a, b)
        a.fetch(1, n=3)
        assert until(lambda: len(a.answers) == 3, 5, a, b)
        assert curve_coord.auth["accepted"] >= 2
        assert curve_coord.auth["unknown_key"] == 0 and curve_coord.auth_counts()["identity_mismatch"] == 0
    finally:
        a.close()
        b.close()


def test_unknown_key_is_refused(curve_coord, keys):
    d, other = keys
    s = peer(curve_coord, 0, os.path.join(other, "nic0.key_secret"), d)
    try:
        assert not until(lambda: s.registered, 1.5, s)
        assert curve_coord.auth["unknown_key"] >= 1
        assert not curve_coord.nics and curve_coord.received[M.T_HELLO] == 0  # nothing got through
    finally:
        s.close()


def test_key_posing_as_another_nic_is_refused_and_counted(curve_coord, keys):
    d, _ = keys
    real = peer(curve_coord, 1, os.path.join(d, "nic1.key_secret"), d)
    other = peer(curve_coord, 0, os.path.join(d, "nic0.key_secret"), d)
    liar = None
    try:
        assert until(lambda: real.registered and other.registered, 10, real, other)
        liar = peer(curve_coord, 1, os.path.join(d, "nic0.key_secret"), d)  # nic0's key, identity nic1
        assert not until(lambda: liar.registered, 1.5, liar, real, other)
        assert curve_coord.nics[1].hellos == 1  # only the real nic1 said HELLO
        # the impostor did not take nic1's place: nic1 still gets (and answers) its fetches
        other.fetch(1, n=2)
        assert until(lambda: len(other.answers) == 2, 5, real, other, liar)
        assert liar.served == 0 and real.served == 2
        # the liar above never got a pipe (nic1's id was taken); a key holder that takes
        # the id of a NIC that is not connected gets one, and its messages are dropped,
        # counted, and never register it
        liar2 = peer(curve_coord, 3, os.path.join(d, "nic1.key_secret"), d, identity=b"nic3")
        until(lambda: curve_coord.auth_counts()["identity_mismatch"] >= 1, 3, liar2)
        liar2.close()
        assert curve_coord.auth_counts()["identity_mismatch"] >= 1 and curve_coord.drops["bad_identity"] >= 1
        assert 3 not in curve_coord.nics
    finally:
        real.close()
        other.close()
        if liar is not None:
            liar.close()


def test_control_key_works_but_cannot_pose_as_a_nic(curve_coord, keys):
    d, _ = keys
    with ctl.CtlClient(curve_coord.bound_endpoint, timeout=3, curve_secret_key=os.path.join(d, "ctl.key_secret"),
                       server_public_key=os.path.join(d, "server.key")) as c:
        assert c.query("status")["curve"] is True
    liar = peer(curve_coord, 0, os.path.join(d, "ctl.key_secret"), d)  # ctl key, identity nic0
    try:
        assert not until(lambda: liar.registered, 1.5, liar)
        assert curve_coord.auth_counts()["identity_mismatch"] >= 1 and 0 not in curve_coord.nics
    finally:
        liar.close()


def test_plain_client_gets_nothing(curve_coord):
    with ctl.CtlClient(curve_coord.bound_endpoint, timeout=0.5) as c:
        with pytest.raises(ctl.CtlError, match="no answer"):
            c.query("status")
    assert curve_coord.queries == 0


def test_ctl_cli_with_keys(curve_coord, keys, capsys):
    d, _ = keys
    rc = ctl.main(["--endpoint", curve_coord.bound_endpoint, "--key", os.path.join(d, "ctl.key_secret"),
                   "--server-key", os.path.join(d, "server.key"), "status"])
    out = capsys.readouterr().out
    assert rc == 0 and "CURVE" in out


def test_refuses_off_loopback_without_keys():
    for ep in ("tcp://0.0.0.0:5555", "tcp://*:5555", "tcp://192.0.2.7:5555", "tcp://[2001:db8::1]:5555"):
        assert auth.requires_curve(ep), ep
        with pytest.raises(CoordinatorError, match="CURVE"):
            Coordinator(ep).start_thread()
    for ep in ("tcp://127.0.0.1:5555", "tcp://localhost:5555", "tcp://[::1]:5555", "ipc:///tmp/x", "inproc://x"):
        assert not auth.requires_curve(ep), ep


def test_curve_without_authorized_keys_refuses(keys):
    d, _ = keys
    with pytest.raises(CoordinatorError, match="authorized"):
        Coordinator(f"tcp://127.0.0.1:{free_port()}", curve_secret_key=os.path.join(d, "server.key_secret")
                    ).start_thread()
    with pytest.raises(CoordinatorError, match="no secret key"):
        Coordinator(f"tcp://127.0.0.1:{free_port()}", curve_secret_key=os.path.join(d, "server.key"),
                    authorized=os.path.join(d, "authorized")).start_thread()


def test_authorized_dir_rules(tmp_path, keys):
    d, _ = keys
    a = tmp_path / "a"
    a.mkdir()
    (a / "mallory.key").write_bytes(open(os.path.join(d, "nic0.key"), "rb").read())
    with pytest.raises(auth.AuthError, match="nic<N>.key"):
        auth.load_authorized(str(a))
    b = tmp_path / "b"
    b.mkdir()
    for name in ("nic0.key", "nic1.key"):  # one key under two names
        (b / name).write_bytes(open(os.path.join(d, "nic0.key"), "rb").read())
    with pytest.raises(auth.AuthError, match="also bound"):
        auth.load_authorized(str(b))
    got = auth.load_authorized(os.path.join(d, "authorized"))
    assert sorted(got.values()) == [b"ctl", b"nic0", b"nic1"]


def test_zap_decisions_and_identity_binding():
    h = auth.ZapHandler(None, {b"K0": b"nic0", b"KC": b"ctl"})
    assert h.decide(b"CURVE", [b"K0"]) == ("accepted", b"nic0")
    assert h.decide(b"CURVE", [b"KX"]) == ("unknown_key", b"")
    assert h.decide(b"CURVE", [b"KC"]) == ("accepted", b"ctl")
    assert h.decide(b"NULL", []) == ("bad_mechanism", b"")
    assert auth.identity_allowed("nic0", b"nic0") and auth.identity_allowed(b"nic0", b"nic0")
    assert not auth.identity_allowed("nic0", b"nic1")
    assert not auth.identity_allowed("nic0", b"\x00abcd")
    assert auth.identity_allowed("ctl", b"\x00abcd") and auth.identity_allowed("ctl-ops", b"\x00\x01")
    assert not auth.identity_allowed("ctl", b"nic3")
    assert not auth.identity_allowed(None, b"nic0") and not auth.identity_allowed("", b"\x00a")
    assert not auth.identity_allowed("mallory", b"\x00a")


def test_daemon_with_curve_from_config(tmp_path, capsys):
    """The gateway config names the key files: the coordinator binds each NIC's public
    key to its id, ctl finds its key beside the coordinator's."""
    import signal
    import subprocess
    import sys

    import yaml

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    kd = tmp_path / "keys"
    auth.generate(str(kd), [0, 1])
    doc = yaml.safe_load(open(os.path.join(root, "conf", "gw-2nic-by-port.yaml")))
    ep = f"tcp://127.0.0.1:{free_port()}"
    doc["coordinator"].update(endpoint=ep, curve_secret_key=str(kd / "server.key_secret"),
                              curve_public_key=str(kd / "server.key"))
    for nic in doc["nics"]:
        nic.update(curve_secret_key=str(kd / f"nic{nic['id']}.key_secret"),
                   curve_public_key=str(kd / f"nic{nic['id']}.key"))
    doc["metrics"]["enabled"] = False
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(yaml.safe_dump(doc))
    p = subprocess.Popen([sys.executable, "-m", "hypernat.coord", "--config", str(cfg)], cwd=root,
                         env=dict(os.environ, PYTHONPATH=root), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    nic1 = liar = None
    try:
        rc = 1
        for _ in range(100):  # until it answers
            rc = ctl.main(["--config", str(cfg), "--timeout", "0.3", "--json", "status"])
            if rc == 0:
                break
        out = capsys.readouterr().out
        assert rc == 0 and '"curve": true' in out
        nic1 = ScriptedNic(ep, 1, curve=(str(kd / "nic1.key_secret"), str(kd / "server.key")))
        assert nic1.run_until(lambda: nic1.registered, 10)
        liar = ScriptedNic(ep, 0, curve=(str(kd / "ctl.key_secret"), str(kd / "server.key")))  # ctl key as nic0
        assert not liar.run_until(lambda: liar.registered, 1.5)
        assert ctl.main(["--config", str(cfg), "--json", "counters"]) == 0
        counters = capsys.readouterr().out
        assert '"identity_mismatch"' in counters
    finally:
        for x in (nic1, liar):
            if x is not None:
                x.close()
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=20)
    assert p.returncode == 0, err
    assert "CURVE" in err
