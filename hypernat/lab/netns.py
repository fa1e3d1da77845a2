"""Entering network namespaces from inside one Python process.

A network namespace is a property of a *thread* (``setns(2)`` with ``CLONE_NEWNET``
changes only the caller), and a socket belongs for life to the namespace it was
created in.  So the testbed never needs ``ip netns exec`` for its own traffic: it
steps into ``vpc`` for a moment, opens its client sockets, steps back, and drives
every socket from one event loop in the root namespace::

      thread ──setns(vpc)──► socket() ──setns(back)──► loop.sock_connect(...)
                              │
                              └── lives in vpc forever, whatever the thread does next

Processes (daemons, ``nft``, ``ethtool``) are started with ``ip netns exec`` so that
their whole life is inside the namespace.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import socket
import subprocess

CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = "/var/run/netns"

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def ns_path(name: str) -> str:
    return os.path.join(NETNS_RUN_DIR, name)


@contextlib.contextmanager
def entered(name: str | None):
    """Run the body with this thread inside namespace `name` (None: stay where we are)."""
    if name is None:
        yield
        return
    own = os.open(f"/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(ns_path(name), os.O_RDONLY)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(own)


def ns_socket(name: str | None, family=socket.AF_INET, type_=socket.SOCK_STREAM, proto=0) -> socket.socket:
    """A socket created inside namespace `name`."""
    with entered(name):
        return socket.socket(family, type_, proto)


def sysctl(name: str | None, key: str, value=None) -> str:
    """Read (and first write, if `value` is given) a sysctl inside namespace `name`.

    /proc/sys/net resolves against the opening thread's namespace, so this needs no
    subprocess."""
    path = "/proc/sys/" + key.replace(".", "/")
    with entered(name):
        if value is not None:
            with open(path, "w") as f:
                f.write(str(value))
        with open(path) as f:
            return f.read().strip()


def exec_argv(name: str | None, argv: list[str]) -> list[str]:
    return (["ip", "netns", "exec", name] if name else []) + list(argv)


def run(name: str | None, argv: list[str], check=True, input_=None, timeout=30) -> subprocess.CompletedProcess:
    """Run a command inside namespace `name`; a failure raises with its stderr."""
    p = subprocess.run(exec_argv(name, argv), input=input_, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(exec_argv(name, argv))} failed ({p.returncode}): {p.stderr.strip()}")
    return p


def pids_in(name: str) -> list[int]:
    """Processes living in namespace `name` (``ip netns pids``)."""
    p = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True, timeout=30)
    if p.returncode != 0:
        return []
    return [int(x) for x in p.stdout.split() if x.isdigit()]
