"""hypernat.zmqio: multipart send / receive through pyzmq's backend, the same messages
as the socket methods (frames, order, flags, exceptions), with fallbacks."""
import itertools

import pytest
import zmq

from hypernat import zmqio

_n = itertools.count()


@pytest.fixture
def pair():
    ctx = zmq.Context()
    ep = f"inproc://zmqio-{next(_n)}"
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.ROUTER_MANDATORY, 1)
    router.bind(ep)
    dealer = ctx.socket(zmq.DEALER)
    dealer.identity = b"nic1"
    dealer.connect(ep)
    dealer.send_multipart([b"", b"\x01", b"hello"])  # the router learns the dealer's id
    assert router.poll(2000)
    assert router.recv_multipart() == [b"nic1", b"", b"\x01", b"hello"]
    yield router, dealer
    router.close(0)
    dealer.close(0)
    ctx.term()


def test_frames_arrive_as_sent_in_order(pair):
    router, dealer = pair
    assert type(router) is zmq.Socket and zmqio._Backend is not None  # the fast path runs here
    sent = [
        [b"nic1", b"nic0", b"\x10", b"x" * 32],  # the coordinator's four frames
        [b"nic1", b"", b"\x11", b""],  # empty frames too
        [b"nic1", b"\x00\xff", b"\x12", bytes(range(256)) * 40],
    ]
    for frames in sent:
        zmqio.send_multipart(router, frames, zmq.NOBLOCK)
    got = []
    for _ in sent:
        assert dealer.poll(2000)
        got.append(zmqio.recv_multipart(dealer, zmq.NOBLOCK))
    assert got == [f[1:] for f in sent]
    # the dealer's three frames, the other way
    zmqio.send_multipart(dealer, (b"nic0", b"\x10", b"payload"), zmq.NOBLOCK)
    assert router.poll(2000)
    assert zmqio.recv_multipart(router, zmq.NOBLOCK) == [b"nic1", b"nic0", b"\x10", b"payload"]


def test_other_frame_counts_and_types_go_through_the_socket_method(pair):
    router, dealer = pair
    for frames in ([b"nic1", b"a"], [b"nic1", b"a", b"b", b"c", b"d"], [b"nic1", bytearray(b"a"), memoryview(b"bc")],
                   (b"nic1", b"x", b"y")):
        zmqio.send_multipart(router, frames, zmq.NOBLOCK)
        assert dealer.poll(2000)
        assert zmqio.recv_multipart(dealer, zmq.NOBLOCK) == [bytes(f) for f in frames[1:]]
    # a frame that is not a buffer: refused before anything is sent (no half message left)
    with pytest.raises(TypeError):
        zmqio.send_multipart(router, [b"nic1", b"a", "text"], zmq.NOBLOCK)
    zmqio.send_multipart(router, [b"nic1", b"after"], zmq.NOBLOCK)
    assert dealer.poll(2000)
    assert zmqio.recv_multipart(dealer, zmq.NOBLOCK) == [b"after"]


def test_errors_are_the_socket_methods_errors(pair):
    router, dealer = pair
    with pytest.raises(zmq.Again):
        zmqio.recv_multipart(dealer, zmq.NOBLOCK)
    assert not zmqio.readable(dealer)
    with pytest.raises(zmq.ZMQError) as exc:  # ROUTER_MANDATORY: unknown peer
        zmqio.send_multipart(router, [b"nobody", b"", b"\x10", b"x"], zmq.NOBLOCK)
    assert exc.value.errno == zmq.EHOSTUNREACH
    zmqio.send_multipart(router, [b"nic1", b"", b"\x10", b"x"], zmq.NOBLOCK)
    assert dealer.poll(2000) and zmqio.readable(dealer)
    assert zmqio.recv_multipart(dealer, zmq.NOBLOCK) == [b"", b"\x10", b"x"]
    assert not zmqio.readable(dealer)


def test_a_socket_that_is_not_plain_pyzmq_gets_its_own_methods():
    class Fake:
        def __init__(self):
            self.sent, self.calls = [], []

        def send_multipart(self, frames, flags=0, **kw):
            self.sent.append((list(frames), flags))

        def recv_multipart(self, flags=0, **kw):
            self.calls.append(flags)
            return [b"a", b"b"]

        def getsockopt(self, opt):
            assert opt == zmq.EVENTS
            return zmq.POLLIN

    f = Fake()
    zmqio.send_multipart(f, (b"a", b"b", b"c"), zmq.NOBLOCK)
    assert f.sent == [([b"a", b"b", b"c"], zmq.NOBLOCK)]
    assert zmqio.recv_multipart(f, zmq.NOBLOCK) == [b"a", b"b"] and f.calls == [zmq.NOBLOCK]
    assert zmqio.readable(f)


def test_noblock_is_a_plain_int_that_sends_and_receives_as_zmq_noblock(pair):
    """``zmqio.NOBLOCK`` (what the worker and the coordinator pass) is zmq.NOBLOCK as a
    plain int -- `flags | SNDMORE` on pyzmq's enum flag runs the enum module's Python
    code on every send -- and behaves as zmq.NOBLOCK: messages go out whole, an empty
    socket raises zmq.Again."""
    router, dealer = pair
    assert type(zmqio.NOBLOCK) is int and zmqio.NOBLOCK == zmq.NOBLOCK
    zmqio.send_multipart(dealer, [b"", b"\x02", b"x" * 40], zmqio.NOBLOCK)
    zmqio.send_multipart(dealer, [b"nic2", b"", b"\x02", b"y"], zmqio.NOBLOCK)
    assert router.poll(2000)
    assert zmqio.recv_multipart(router, zmqio.NOBLOCK) == [b"nic1", b"", b"\x02", b"x" * 40]
    assert router.poll(2000)
    assert zmqio.recv_multipart(router, zmqio.NOBLOCK) == [b"nic1", b"nic2", b"", b"\x02", b"y"]
    with pytest.raises(zmq.Again):
        zmqio.recv_multipart(router, zmqio.NOBLOCK)
