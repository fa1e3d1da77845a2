"""CURVE keys for the coordinator channel, and the ZAP handler that binds each key to
one NIC id.

ZeroMQ's CURVE encrypts and authenticates a connection with long-term key pairs; the
server side asks a ZAP handler (an in-process REP socket at ``inproc://zeromq.zap.01``
in the same context) whether a client key may connect, and the handler names the
*user id* that libzmq then attaches to every message of that connection.  Two checks,
so that holding a key is not enough to pose as someone else:

    client (DEALER, identity b"nic1", key K1) ── CURVE handshake ──► coordinator ROUTER
                                                                      │ ZAP request (K1)
                       ZapHandler: K1 in authorized/? ── no ──► 400, connection refused
                                   yes ──► 200, user id "nic1" (the key's binding)
    every message: [identity b"nic1", ...] with metadata User-Id "nic1"
                       broker: identity_allowed(User-Id, identity)? ── no ──► dropped,
                                                   counted (auth identity_mismatch)

(The identity cannot be checked in the ZAP handler itself: libzmq puts the *server's*
own routing id in the ZAP request, not the client's.)

* ``authorized/<name>.key`` (public certificate files as written by
  ``zmq.auth.create_certificates``): the file name is what the key is bound to.
  ``nic<N>.key`` may only connect with socket identity b"nic<N>"; ``ctl*.key`` (control
  clients, ``hypernat ctl``) may only connect with an identity that is *not* a NIC id,
  so a control key cannot send HELLO as a NIC.
* The coordinator checks the identity of every message against its User-Id and requires
  HELLO to claim the NIC id of its identity (``hypernat.coord.broker``), which closes
  the loop: key -> user id -> socket identity -> NIC id.

Where CURVE is required: on a ``tcp://`` endpoint whose host is not a loopback address
(``requires_curve``); without keys the coordinator refuses to start there.  ``ipc://``
is protected by the file system (the socket file's mode), loopback TCP by the host.

Key layout written by ``generate`` (``hypernat ctl keygen DIR --nics N``)::

    DIR/server.key  server.key_secret          the coordinator's pair
    DIR/nic0.key    nic0.key_secret   ...      one pair per NIC (the NIC loads its secret)
    DIR/ctl.key     ctl.key_secret             for `hypernat ctl`
    DIR/authorized/nic0.key ... ctl.key        public halves the coordinator accepts
"""
from __future__ import annotations

import ipaddress
import logging
import os
import shutil
import threading
from typing import Callable, Dict, Iterable, Optional, Tuple

import zmq
import zmq.auth

from .messages import parse_identity

log = logging.getLogger("hypernat.auth")

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"

# Outcomes of a ZAP decision (counted by the coordinator's metrics).
AUTH_RESULTS = ("accepted", "unknown_key", "identity_mismatch", "bad_mechanism", "bad_request")
# (identity_mismatch is counted by the coordinator per message, see identity_allowed)


class AuthError(Exception):
    """A key file is missing, unreadable or of the wrong kind; or CURVE is required."""


# ------------------------------------------------------------------- endpoints


def endpoint_host(endpoint: str) -> Optional[str]:
    """Host part of a tcp:// endpoint ('tcp://10.0.0.1:5555' -> '10.0.0.1'), else None."""
    if not endpoint.startswith("tcp://"):
        return None
    rest = endpoint[len("tcp://"):]
    if ";" in rest:  # tcp://src;dst form: the address we bind / connect is after ';'
        rest = rest.split(";", 1)[1]
    if rest.startswith("["):
        return rest[1:rest.index("]")] if "]" in rest else rest[1:]
    return rest.rsplit(":", 1)[0]


def is_loopback_endpoint(endpoint: str) -> bool:
    """True for ipc://, inproc:// and tcp:// on a loopback address (127/8, ::1, localhost)."""
    if endpoint.startswith(("ipc://", "inproc://")):
        return True
    host = endpoint_host(endpoint)
    if host is None:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # '*', an interface name, a host name: assume it is reachable
        return False


def requires_curve(endpoint: str) -> bool:
    """Whether a coordinator on ``endpoint`` must run with CURVE (tcp:// off loopback)."""
    return endpoint.startswith("tcp://") and not is_loopback_endpoint(endpoint)


# ------------------------------------------------------------------------ keys


def generate(keys_dir: str, nics: Iterable[int], ctl: bool = True, overwrite: bool = False) -> Dict[str, str]:
    """Write a server pair, one pair per NIC id in ``nics`` (and one for ``hypernat
    ctl``), and the ``authorized/`` directory of public halves.  Returns {name: public
    key path}.  Refuses to overwrite existing secrets unless ``overwrite``."""
    os.makedirs(keys_dir, mode=0o700, exist_ok=True)
    auth_dir = os.path.join(keys_dir, "authorized")
    os.makedirs(auth_dir, mode=0o700, exist_ok=True)
    names = ["server"] + [f"nic{int(n)}" for n in nics] + (["ctl"] if ctl else [])
    out = {}
    for name in names:
        secret = os.path.join(keys_dir, name + SECRET_SUFFIX)
        if os.path.exists(secret) and not overwrite:
            raise AuthError(f"{secret} exists; pass overwrite to replace it")
        pub, sec = zmq.auth.create_certificates(keys_dir, name)
        os.chmod(sec, 0o600)
        out[name] = pub
        if name != "server":
            shutil.copyfile(pub, os.path.join(auth_dir, name + PUBLIC_SUFFIX))
    return out


def load_secret(path: str) -> Tuple[bytes, bytes]:
    """(public, secret) z85 keys from a ``*.key_secret`` file; AuthError if unusable."""
    try:
        pub, sec = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise AuthError(f"cannot read secret key file {path}: {exc}") from exc
    if not sec:
        raise AuthError(f"{path} holds no secret key (is it the public .key file?)")
    return pub, sec


def load_public(path: str) -> bytes:
    """The z85 public key from a ``*.key`` (or ``*.key_secret``) file."""
    try:
        pub, _ = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise AuthError(f"cannot read public key file {path}: {exc}") from exc
    return pub


def load_authorized(auth_dir: str) -> Dict[bytes, bytes]:
    """{public key (z85): bound user id} from ``authorized/*.key``.  The file name is the
    binding: ``nic<N>.key`` -> b"nic<N>", ``ctl*.key`` -> b"ctl*"; any other name, or the
    same key under two names, is an error (one key, one identity)."""
    if not os.path.isdir(auth_dir):
        raise AuthError(f"authorized keys directory {auth_dir} does not exist")
    keys: Dict[bytes, bytes] = {}
    for fname in sorted(os.listdir(auth_dir)):
        if not fname.endswith(PUBLIC_SUFFIX):
            continue
        name = fname[: -len(PUBLIC_SUFFIX)]
        if parse_identity(name) is None and not name.startswith("ctl"):
            raise AuthError(f"{auth_dir}/{fname}: name a key nic<N>.key or ctl*.key (it binds the key)")
        pub = load_public(os.path.join(auth_dir, fname))
        if pub in keys:
            raise AuthError(f"{auth_dir}/{fname}: the same key is also bound to {keys[pub].decode()}")
        keys[pub] = name.encode()
    if not keys:
        raise AuthError(f"no authorized client keys (*.key) in {auth_dir}")
    return keys


def server_curve(sock: zmq.Socket, secret_path: str) -> bytes:
    """Make ``sock`` a CURVE server with the key pair in ``secret_path``; returns the
    public key.  Call before bind(), after a ZapHandler has started."""
    pub, sec = load_secret(secret_path)
    sock.curve_secretkey = sec
    sock.curve_publickey = pub
    sock.curve_server = True
    return pub


def client_curve(sock: zmq.Socket, secret_path: str, server_public_path: str) -> None:
    """Make ``sock`` a CURVE client (its pair in ``secret_path``, the coordinator's
    public key in ``server_public_path``).  Call before connect()."""
    pub, sec = load_secret(secret_path)
    sock.curve_secretkey = sec
    sock.curve_publickey = pub
    sock.curve_serverkey = load_public(server_public_path)


# ----------------------------------------------------------------- ZAP handler


def identity_allowed(user_id, identity: bytes) -> bool:
    """May a connection authenticated as ``user_id`` (str or bytes) use socket identity
    ``identity``?  A NIC key only its own NIC id; a control key only a non-NIC identity."""
    if isinstance(user_id, str):
        user_id = user_id.encode()
    if not user_id:
        return False
    if parse_identity(user_id) is not None:
        return identity == user_id
    return user_id.startswith(b"ctl") and parse_identity(identity) is None


class ZapHandler:
    """ZAP handler thread binding keys to identities (see module docstring).

    ``authorized``: {public z85: user id}.  ``on_result(result, user_id)`` is called for
    every decision (result in ``AUTH_RESULTS``), from the handler's thread.
    Start it *before* the CURVE server socket binds: without a handler, libzmq would
    let every key in.
    """

    def __init__(self, ctx: zmq.Context, authorized: Dict[bytes, bytes],
                 on_result: Optional[Callable[[str, bytes], None]] = None):
        self.ctx = ctx
        self.authorized = dict(authorized)
        self.on_result = on_result
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: Optional[BaseException] = None
        self._thread: Optional[threading.Thread] = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="hypernat-zap", daemon=True)
        self._thread.start()
        self._ready.wait(5)
        if self._error is not None:
            raise AuthError(f"cannot start the ZAP handler: {self._error}")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def decide(self, mechanism: bytes, credentials) -> Tuple[str, bytes]:
        """(result, user id) for one request; pure, so tests can call it directly."""
        if mechanism != b"CURVE" or len(credentials) != 1:
            return "bad_mechanism", b""
        key = credentials[0]
        if len(key) == 32:
            key = zmq.utils.z85.encode(key)
        user = self.authorized.get(key)
        if user is None:
            return "unknown_key", b""
        return "accepted", user

    def _run(self) -> None:
        try:
            sock = self.ctx.socket(zmq.REP)
            sock.linger = 0
            sock.bind(ZAP_ENDPOINT)
        except zmq.ZMQError as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            while not self._stop.is_set():
                if not sock.poll(100):
                    continue
                msg = sock.recv_multipart()
                if len(msg) < 6:
                    result, user = "bad_request", b""
                    req_id = msg[1] if len(msg) > 1 else b""
                else:
                    version, req_id, _domain, _address, _server_id, mechanism = msg[:6]
                    result, user = self.decide(mechanism, msg[6:])
                    if version != b"1.0":
                        result = "bad_request"
                if result == "accepted":
                    sock.send_multipart([b"1.0", req_id, b"200", b"OK", user, b""])
                else:
                    sock.send_multipart([b"1.0", req_id, b"400", result.encode(), b"", b""])
                    log.warning("CURVE: refused a connection (%s%s)", result,
                                f", key bound to {user.decode()}" if user else "")
                if self.on_result is not None:
                    try:
                        self.on_result(result, user)
                    except Exception:  # noqa: BLE001 - a metrics hook must not kill auth
                        log.exception("ZAP result hook failed")
        finally:
            sock.close(0)
