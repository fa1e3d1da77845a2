"""Multipart send and receive for the hot path, without pyzmq's Python layer.

``sock.send_multipart(frames)`` on a plain ``zmq.Socket`` type-checks every frame and
then calls the Python ``Socket.send`` per frame, which calls the backend's ``send``:
about 4 µs for a three- or four-frame message, where the backend's own ``send`` per
frame costs well under 1 µs (pyzmq 27, measured on these machines).  ``recv_multipart``
asks ``RCVMORE`` with a ``getsockopt`` per frame (~1 µs each: the option goes through
an enum lookup); a frame received with ``copy=False`` carries its ``more`` flag.  A FETCH
round trip crosses four sends and four receives (asker, coordinator twice, owner), so
this is on every connection's first-packet latency.  ``readable`` asks whether another
message waits without the ``zmq.Again`` a failed non-blocking receive raises.

``send_multipart(sock, frames, flags)`` and ``recv_multipart(sock, flags)`` (flags: ``NOBLOCK``,
zmq.NOBLOCK as a plain int) behave as the
socket methods of the same names (the same frames in the same order with the same
flags, the same exceptions: ``zmq.Again`` under NOBLOCK, ``ZMQError``), and fall back to
them for anything but a plain ``zmq.Socket`` (subclasses such as green or asyncio
sockets, test doubles) or, for sending, anything but three or four ``bytes`` frames (the
messages of ``hypernat.messages``; the socket method checks frames before it sends any,
so a bad frame never leaves half a multipart message behind).
"""
from __future__ import annotations

import zmq

try:  # the Cython backend (CPython wheels, any architecture); absent under the CFFI one
    from zmq.backend.cython._zmq import Socket as _Backend

    _bsend = _Backend.send
    _brecv = _Backend.recv
    _bget = _Backend.get
except (ImportError, AttributeError):  # pragma: no cover - PyPy / CFFI backend
    _Backend = _bsend = _brecv = _bget = None

_PLAIN = zmq.Socket  # exactly this class: its send / recv add nothing we rely on
_SNDMORE = int(zmq.SNDMORE)
# zmq.NOBLOCK as a plain int: pyzmq's flags are enum.IntFlag members, and `flags |
# SNDMORE` on one goes through the enum module's Python code (~0.6 us warm, several us
# from a cold cache: on every send of a first packet's path); the callers pass this
NOBLOCK = int(zmq.NOBLOCK)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)


def send_multipart(sock, frames, flags: int = 0) -> None:
    """``sock.send_multipart(frames, flags)``, frame by frame through the backend."""
    if type(sock) is _PLAIN and _Backend is not None:
        n = len(frames)
        if n == 3:
            a, b, c = frames
            if type(a) is bytes and type(b) is bytes and type(c) is bytes:
                more = flags | _SNDMORE
                _bsend(sock, a, more)
                _bsend(sock, b, more)
                _bsend(sock, c, flags)
                return
        elif n == 4:
            a, b, c, d = frames
            if type(a) is bytes and type(b) is bytes and type(c) is bytes and type(d) is bytes:
                more = flags | _SNDMORE
                _bsend(sock, a, more)
                _bsend(sock, b, more)
                _bsend(sock, c, more)
                _bsend(sock, d, flags)
                return
    sock.send_multipart(frames, flags)


def recv_multipart(sock, flags: int = 0) -> list:
    """``sock.recv_multipart(flags)`` (copy=True: a list of bytes)."""
    if type(sock) is not _PLAIN or _Backend is None:
        return sock.recv_multipart(flags)
    f = _brecv(sock, flags, False)
    parts = [f.bytes]
    while f.more:
        f = _brecv(sock, flags, False)
        parts.append(f.bytes)
    return parts


def readable(sock) -> bool:
    """A whole message waits on `sock` (``ZMQ_EVENTS`` has POLLIN): a receive now
    will not raise ``zmq.Again``.  About half the cost of finding out with a receive
    that raises (the exception is built with its errno's text)."""
    if type(sock) is not _PLAIN or _bget is None:
        return bool(sock.getsockopt(zmq.EVENTS) & _POLLIN)
    return bool(_bget(sock, _EVENTS) & _POLLIN)
