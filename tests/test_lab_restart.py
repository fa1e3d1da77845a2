"""A NIC daemon restarted gracefully, then killed, on the testbed: black box.

    vpc hosts ══ECMP══ [gw: coordinator, hypernat-nic 0, hypernat-nic 1] ══ECMP══ inet: server
    long-lived TCP connections from several hosts; the server notes each one's source
    endpoint (the external endpoint the gateway gave it)

1. connections from OLD hosts (some owned by NIC 0, some by NIC 1: with
   endpoint-independent mapping a host's mappings belong to ``eim_owner(host)``), data
   both ways; sniffers on the far ends of the links note which NIC each direction took;
2. NIC 0: SIGTERM (drain + snapshot) and restart: every connection still exchanges data;
3. NIC 0: SIGKILL and restart; then, while the old connections are silent,
   connections from NEW hosts (other addresses): none may get the external endpoint —
   nor the port block — of an old connection (live ones, and lost ones whose blocks stay
   quarantined);
4. every old connection still exchanges data EXCEPT those that no other NIC knew of —
   owned by NIC 0 with both directions through NIC 0 only (no clone elsewhere to
   recover them from).  That number is derived from what the sniffers saw, counted and
   printed, and the set of broken connections must be exactly it.  (A connection of a
   host owned by NIC 1 whose packets all went through NIC 0 survives: NIC 0 only held a
   clone, and fetches the rule again from its owner.)

Before issue 10's journal fix, step 2's restart left NIC 0's block journal empty, so
after step 3 the blocks of live connections were free again: the new hosts were handed
them, and the clone reports that would have recovered NIC 0's connections were ignored.
"""
import asyncio
import ipaddress
import os
import signal
import socket

import pytest

from hypernat import config as cfgmod
from hypernat.lab import cli, netns
from hypernat.lab.deadline import wait_until
from hypernat.lab.topology import Addressing, Topology

import labkit  # noqa: E402  (tests/labkit.py)
from hypernat.lab.traffic import LinkSniffer
from hypernat.partition import Partition

pytestmark = pytest.mark.netns
CONF = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf", "testbed.yaml")
KILLED = 0  # the NIC restarted
OLD_PORT, NEW_PORT = 5301, 5302
PER_HOST = 6  # long-lived connections per old host
EXCHANGE_S = 8.0  # a surviving connection answers within this (a lost one never does)


def _hosts(addr, part, n_hosts):
    """Per NIC, the vpc host indices whose mappings it owns (endpoint-independent)."""
    owned = {0: [], 1: []}
    for i in range(n_hosts):
        owned[part.eim_owner(int(ipaddress.IPv4Address(addr.host(i))))].append(i)
    return owned


@pytest.fixture
def lab():
    addr = Addressing.from_config(CONF)
    addr.hosts = 24
    topo = Topology(tag=f"txring{os.getpid()}r", nics=2, mode="hypernat", addr=addr)
    with labkit.gateway(topo, CONF):
        yield topo


class Server:
    """Echo server in inet on `port`: each connection says ``<id>\\n`` first; the
    server notes the peer endpoint it saw under that id, then echoes lines."""

    def __init__(self):
        self.peers = {}
        self.handlers = {}  # task -> its writer

    async def start(self, topo, port):
        lsock = netns.ns_socket(topo.inet, socket.AF_INET, socket.SOCK_STREAM)
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lsock.bind((topo.addr.server(0), port))
        lsock.listen(256)
        lsock.setblocking(False)
        self.srv = await asyncio.start_server(self._serve, sock=lsock)
        return self

    async def _serve(self, r, w):
        self.handlers[asyncio.current_task()] = w
        try:
            first = await asyncio.wait_for(r.readline(), 30)
            self.peers[first.decode().strip()] = w.get_extra_info("peername")[:2]
            w.write(first)
            await w.drain()
            while True:  # ends when the client closes (the test closes every client)
                line = await r.readline()
                if not line:
                    break
                w.write(line)
                await w.drain()
        except (ConnectionError, asyncio.TimeoutError):
            pass
        finally:
            w.close()
            self.handlers.pop(asyncio.current_task(), None)

    async def close(self):
        """Stop listening; give the handlers a moment to see their clients' FIN, then
        close the rest's connections (those of lost connections never see it)."""
        self.srv.close()
        if self.handlers:
            await asyncio.wait(list(self.handlers), timeout=1.0)
        for w in list(self.handlers.values()):
            w.transport.abort()
        if self.handlers:
            await asyncio.wait(list(self.handlers), timeout=2.0)


class Conn:
    def __init__(self, cid, host):
        self.cid, self.host = cid, host
        self.client = self.external = None
        self.out_link = self.in_link = None
        self.reader = self.writer = None

    async def open(self, topo, port, server):
        loop = asyncio.get_running_loop()
        s = netns.ns_socket(topo.vpc, socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.bind((topo.addr.host(self.host), 0))
        self.client = s.getsockname()[:2]
        await asyncio.wait_for(loop.sock_connect(s, (topo.addr.server(0), port)), 10)
        self.reader, self.writer = await asyncio.open_connection(sock=s)
        assert await self.say(f"{self.cid}")
        self.external = server.peers[self.cid]

    async def say(self, text, timeout=EXCHANGE_S) -> bool:
        """One line out and its echo back within `timeout`."""
        msg = f"{text}\n".encode()
        try:
            self.writer.write(msg)
            await asyncio.wait_for(self.writer.drain(), timeout)
            return await asyncio.wait_for(self.reader.readline(), timeout) == msg
        except (asyncio.TimeoutError, ConnectionError):
            return False

    def close(self):
        if self.writer is not None:
            self.writer.close()


async def _exchange(conns, tag):
    """Which of `conns` still carry data both ways (a line each, concurrently)."""
    ok = await asyncio.gather(*(c.say(f"{tag}-{c.cid}-{'x' * (7 * c.host)}") for c in conns))
    return {c.cid for c, good in zip(conns, ok) if good}


def _dead(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] == "Z"
    except FileNotFoundError:
        return True


def _restart_nic(topo, k, sig):
    pid = topo.pids[1 + k]  # [coordinator, nic0, nic1]
    os.kill(pid, sig)
    wait_until(lambda: _dead(pid), 15.0, f"nic{k} (pid {pid}) to exit after signal {sig}")
    topo.pids[1 + k] = topo.start(topo.gw, cli.nic_argv(topo, k)).pid
    cli.wait_for_nics(topo)


def test_restart_then_crash_keeps_every_endpoint_to_one_connection(lab):
    cfg = cfgmod.load(CONF)
    part = Partition.from_config(cfg)
    owned = _hosts(lab.addr, part, lab.addr.hosts)
    assert len(owned[0]) >= 5 and len(owned[1]) >= 4, owned
    # old hosts: 3 owned by the NIC that is restarted, 2 by the other; new hosts: others
    old_hosts = owned[KILLED][:3] + owned[1 - KILLED][:2]
    new_hosts = owned[KILLED][3:5] + owned[1 - KILLED][2:4]
    report = {}

    async def go():
        loop = asyncio.get_running_loop()
        old_srv = await Server().start(lab, OLD_PORT)
        new_srv = await Server().start(lab, NEW_PORT)
        far = [lab.far(k) for k in range(lab.nics)]
        out_s, in_s = LinkSniffer(lab.vpc, far, "src"), LinkSniffer(lab.inet, far, "dst")
        conns, fresh = [], []
        try:
            for s in (out_s, in_s):
                s.attach(loop)
            for h in old_hosts:
                for j in range(PER_HOST):
                    c = Conn(f"old{h}.{j}", h)
                    await c.open(lab, OLD_PORT, old_srv)
                    conns.append(c)
            everyone = {c.cid for c in conns}
            assert await _exchange(conns, "before") == everyone
            await asyncio.sleep(0.1)  # the last frames reach the sniffers
            for s in (out_s, in_s):
                s.close(loop)
            for c in conns:
                c.out_link, n_out = out_s.link_of(6, *c.client)
                c.in_link, n_in = in_s.link_of(6, *c.external)
                assert n_out == 1 and n_in == 1, f"{c.cid}: a direction changed NIC ({n_out}, {n_in})"

            # 2. graceful restart: nothing lost
            await loop.run_in_executor(None, _restart_nic, lab, KILLED, signal.SIGTERM)
            after_term = await _exchange(conns, "after-term")
            assert after_term == everyone, f"lost in a graceful restart: {sorted(everyone - after_term)}"

            # 3. crash, then new hosts while the old connections are silent
            await loop.run_in_executor(None, _restart_nic, lab, KILLED, signal.SIGKILL)
            await asyncio.sleep(1.0)  # the recovery window (clone reports) closes
            for h in new_hosts:
                for j in range(3):
                    c = Conn(f"new{h}.{j}", h)
                    await c.open(lab, NEW_PORT, new_srv)
                    fresh.append(c)
            fresh_ok = await _exchange(fresh, "fresh")

            # 4. lost: exactly the connections no other NIC knew of
            after_kill = await _exchange(conns, "after-kill")
            unknown_elsewhere = {c.cid for c in conns if c.out_link == KILLED and c.in_link == KILLED
                                 and part.eim_owner(int(ipaddress.IPv4Address(c.client[0]))) == KILLED}
            both_via_killed = sum(1 for c in conns if c.out_link == KILLED and c.in_link == KILLED)
            report.update(old_connections=len(conns), both_directions_via_killed=both_via_killed,
                          expected_lost=len(unknown_elsewhere), lost=len(everyone - after_kill),
                          survived=len(after_kill))
            final = await _exchange([c for c in conns if c.cid in after_kill], "final")
            return conns, fresh, fresh_ok, after_kill, unknown_elsewhere, final
        finally:
            for c in conns + fresh:
                c.close()
            await old_srv.close()
            await new_srv.close()

    conns, fresh, fresh_ok, after_kill, unknown_elsewhere, final = asyncio.run(go())

    def block(ext):
        return ext[0], part.block_of(int(ipaddress.IPv4Address(ext[0])), ext[1])

    old_ext = {c.external: c.cid for c in conns}
    old_blocks = {block(c.external): c.cid for c in conns}
    same_endpoint = [(c.cid, old_ext[c.external]) for c in fresh if c.external in old_ext]
    same_block = [(c.cid, old_blocks[block(c.external)]) for c in fresh if block(c.external) in old_blocks]
    report.update(new_connections=len(fresh), new_same_endpoint=len(same_endpoint), new_same_block=len(same_block))
    print(f"\nrestart then crash of nic{KILLED}: {report}")
    assert not same_endpoint, f"new connections were given live external endpoints: {same_endpoint}"
    assert not same_block, f"new hosts were given port blocks of old connections: {same_block}"
    assert {c.cid for c in conns} - after_kill == unknown_elsewhere, (
        f"lost {sorted({c.cid for c in conns} - after_kill)}, expected exactly the connections owned by "
        f"nic{KILLED} with both directions through it: {sorted(unknown_elsewhere)}")
    assert fresh_ok == {c.cid for c in fresh}
    assert final == after_kill
