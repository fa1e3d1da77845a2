"""Layer 2 for a gateway on real links: ARP, neighbours, MAC addresses.

A NAT on Linux interfaces is a router at layer 2 too.  Three jobs, one per class:

* **MAC helpers** — ``mac_bytes`` / ``mac_str`` and the broadcast / multicast tests.
* **ArpResponder** — answers ARP requests for the addresses the gateway owns on a link
  and learns the sender of every ARP frame it sees.  On PACKET_MMAP the kernel sees
  every frame too and answers for the addresses configured on the interface, so this
  is only needed for addresses the kernel does not hold (the external pool, if a
  neighbour ARPs for it instead of routing it to the gateway's link address) and for
  AF_XDP, where the kernel never sees the frame.
* **next_hop_mac(ifname)** — the next hop configured through an interface (a route's
  gateway, any table) resolved to its MAC: all the NIC daemon needs for
  ``Translator.set_l2``.
* **Neighbours** — next hop IPv4 address → MAC: first the kernel's neighbour table
  (``ip neigh``, read with pyroute2 in our own namespace), else a resolution the
  kernel is asked to do (a datagram to the discard port, bound to the interface),
  else an ARP request of our own, answered into the cache by ``ArpResponder.learn``.

::

      rx frame ── ethertype 0x0806 ──► ArpResponder.handle(frame)
                                          ├─ learn(sender ip, sender mac) ─► Neighbours
                                          └─ request for an owned address ─► reply frame (bytes)

Everything here is per connection or per ARP frame, never per data packet: plain
Python is the right tool.  Counters name every frame we did not answer.
"""
from __future__ import annotations

import collections
import ipaddress
import socket
import struct
import time

ETH_P_IP = 0x0800
ETH_P_ARP = 0x0806
BROADCAST = b"\xff" * 6
ZERO_MAC = b"\0" * 6
ARP_REQUEST, ARP_REPLY = 1, 2
_ARP = struct.Struct("!HHBBH6s4s6s4s")  # htype ptype hlen plen oper sha spa tha tpa


def mac_bytes(mac) -> bytes:
    """'02:00:00:00:00:01' / '0200.0000.0001' / 6 bytes → 6 bytes (ValueError otherwise)."""
    if isinstance(mac, (bytes, bytearray, memoryview)):
        b = bytes(mac)
    else:
        b = bytes.fromhex(str(mac).replace(":", "").replace("-", "").replace(".", ""))
    if len(b) != 6:
        raise ValueError(f"not a MAC address: {mac!r}")
    return b


def mac_str(mac: bytes) -> str:
    return ":".join(f"{x:02x}" for x in mac_bytes(mac))


def is_multicast(mac: bytes) -> bool:
    return bool(mac[0] & 1)  # includes broadcast


def ip_bytes(ip) -> bytes:
    return ipaddress.IPv4Address(ip).packed


def arp_frame(oper: int, src_mac: bytes, src_ip, dst_mac: bytes, dst_ip, eth_dst: bytes | None = None) -> bytes:
    """An Ethernet + ARP frame (padded to the 60-byte minimum)."""
    eth_dst = eth_dst if eth_dst is not None else (BROADCAST if oper == ARP_REQUEST else dst_mac)
    arp = _ARP.pack(1, ETH_P_IP, 6, 4, oper, mac_bytes(src_mac), ip_bytes(src_ip),
                    mac_bytes(dst_mac), ip_bytes(dst_ip))
    f = mac_bytes(eth_dst) + mac_bytes(src_mac) + struct.pack("!H", ETH_P_ARP) + arp
    return f + b"\0" * (60 - len(f))


def arp_request(src_mac: bytes, src_ip, target_ip) -> bytes:
    return arp_frame(ARP_REQUEST, src_mac, src_ip, ZERO_MAC, target_ip)


def parse_arp(frame) -> dict | None:
    """The ARP fields of an Ethernet frame, or None if it is not Ethernet/IPv4 ARP."""
    frame = bytes(frame)
    if len(frame) < 14 + _ARP.size or frame[12:14] != b"\x08\x06":
        return None
    htype, ptype, hlen, plen, oper, sha, spa, tha, tpa = _ARP.unpack_from(frame, 14)
    if htype != 1 or ptype != ETH_P_IP or hlen != 6 or plen != 4:
        return None
    return {"oper": oper, "sha": sha, "spa": socket.inet_ntoa(spa), "tha": tha, "tpa": socket.inet_ntoa(tpa),
            "eth_src": frame[6:12], "eth_dst": frame[0:6]}


class Neighbours:
    """IPv4 next hop → MAC, learned from ARP or read from the kernel; entries age out."""

    def __init__(self, max_age: float = 300.0, clock=time.monotonic):
        self.max_age = max_age
        self.clock = clock
        self._table: dict[str, tuple[bytes, float]] = {}
        self.counters = collections.Counter()

    def learn(self, ip: str, mac: bytes) -> None:
        mac = mac_bytes(mac)
        if is_multicast(mac) or mac == ZERO_MAC:
            self.counters["learn_refused_bad_mac"] += 1
            return
        self._table[str(ip)] = (mac, self.clock())
        self.counters["learned"] += 1

    def get(self, ip: str) -> bytes | None:
        e = self._table.get(str(ip))
        if e is None:
            return None
        if self.clock() - e[1] > self.max_age:
            del self._table[str(ip)]
            self.counters["expired"] += 1
            return None
        return e[0]

    def __len__(self):
        return len(self._table)

    def from_kernel(self, ip: str, ifname: str | None = None) -> bytes | None:
        """The kernel's entry for `ip` (our namespace), if it is usable, learned here too."""
        from pyroute2 import IPRoute

        usable = 0x02 | 0x04 | 0x08 | 0x10 | 0x80  # REACHABLE STALE DELAY PROBE PERMANENT
        with IPRoute() as ipr:
            kw = {"dst": str(ip)}
            if ifname:
                idx = ipr.link_lookup(ifname=ifname)
                if not idx:
                    raise ValueError(f"no interface {ifname!r}")
                kw["ifindex"] = idx[0]
            for n in ipr.get_neighbours(**kw):
                mac = n.get("NDA_LLADDR")
                if mac and n["state"] & usable:
                    self.learn(str(ip), mac_bytes(mac))
                    return mac_bytes(mac)
        return None

    def resolve(self, ip: str, ifname: str, timeout: float = 2.0) -> bytes:
        """A MAC for `ip` on `ifname`: cache, kernel table, or a resolution the kernel
        does for us (a datagram to the discard port makes it ARP).  Raises TimeoutError."""
        mac = self.get(ip) or self.from_kernel(ip, ifname)
        if mac:
            return mac
        deadline = time.monotonic() + timeout
        poke = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            poke.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, ifname.encode())
            while time.monotonic() < deadline:
                try:
                    poke.sendto(b"", (str(ip), 9))
                except OSError:  # EHOSTUNREACH while the kernel's entry is FAILED; retry
                    pass
                for _ in range(20):
                    mac = self.from_kernel(ip, ifname)
                    if mac:
                        return mac
                    time.sleep(0.005)
        finally:
            poke.close()
        self.counters["resolve_timeout"] += 1
        raise TimeoutError(f"no ARP answer from {ip} on {ifname} within {timeout}s")


def gateway_via(ifname: str) -> str:
    """The next hop configured through `ifname` in this namespace: the gateway of a
    route (any table) whose output interface is `ifname`.  The testbed configures one
    per gateway link (tables 100+k and 200+k); a deployment does the same, so the NIC
    daemon needs no next-hop addresses in its own config.  ValueError if there is none
    or they disagree."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=ifname)
        if not idx:
            raise ValueError(f"no interface {ifname!r}")
        gws = set()
        for r in ipr.route("dump", family=socket.AF_INET):
            if r.get("RTA_OIF") == idx[0] and r.get("RTA_GATEWAY"):
                gws.add(r.get("RTA_GATEWAY"))
            for hop in r.get("RTA_MULTIPATH") or ():
                if hop["oif"] == idx[0] and hop.get("RTA_GATEWAY"):
                    gws.add(hop.get("RTA_GATEWAY"))
    if len(gws) != 1:
        raise ValueError(f"{ifname}: expected one next hop through it, found {sorted(gws) or 'none'}")
    return gws.pop()


def next_hop_mac(ifname: str, neighbours: "Neighbours | None" = None, timeout: float = 2.0) -> bytes:
    """MAC of the next hop through `ifname` (``gateway_via`` + ``Neighbours.resolve``):
    what the NIC daemon writes as destination MAC of every frame it sends there."""
    return (neighbours or Neighbours()).resolve(gateway_via(ifname), ifname, timeout=timeout)


class ArpResponder:
    """Answers ARP requests for `owned` addresses with `mac`; learns every sender.

    ``owned``: addresses or prefixes (the interface's own address, the pool if it must
    be answered for).  ``handle(frame)`` returns the reply frame to send, or None."""

    def __init__(self, mac: bytes, owned=(), neighbours: Neighbours | None = None):
        self.mac = mac_bytes(mac)
        self.owned = [ipaddress.ip_network(o, strict=False) for o in owned]
        self.neighbours = neighbours if neighbours is not None else Neighbours()
        self.counters = collections.Counter()

    def owns(self, ip: str) -> bool:
        a = ipaddress.IPv4Address(ip)
        return any(a in n for n in self.owned)

    def handle(self, frame) -> bytes | None:
        arp = parse_arp(frame)
        if arp is None:
            self.counters["not_arp"] += 1
            return None
        if arp["spa"] != "0.0.0.0":  # an address probe (RFC 5227) teaches nothing
            self.neighbours.learn(arp["spa"], arp["sha"])
        if arp["oper"] == ARP_REPLY:
            self.counters["replies_learned"] += 1
            return None
        if arp["oper"] != ARP_REQUEST:
            self.counters["bad_oper"] += 1
            return None
        if not self.owns(arp["tpa"]):
            self.counters["request_not_ours"] += 1
            return None
        self.counters["answered"] += 1
        return arp_frame(ARP_REPLY, self.mac, arp["tpa"], arp["sha"], arp["spa"], eth_dst=arp["sha"])

    def request(self, src_ip, target_ip) -> bytes:
        """An ARP request frame for `target_ip` (send it on the port; the answer comes
        back through ``handle``)."""
        self.counters["requests_sent"] += 1
        return arp_request(self.mac, src_ip, target_ip)
