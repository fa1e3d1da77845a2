"""Deterministic return steering on the testbed: a hash the project can reproduce.

Linux's own multipath hash is siphash keyed per namespace: no NIC can predict which
outside link a reply will take, so *active install* (push the rule to the NIC the reply
will land on) could never be right on purpose.  With steering on, ``inet`` chooses the
return link with an nftables ``jhash`` of the reply's 4-tuple and a fixed seed::

    inet, output (type route):  ip daddr POOL  meta mark set
        jhash ip saddr . ip daddr . th sport . th dport mod N seed S offset 1
    ip rule fwmark 1+k  →  table 300+k:  POOL via outside_k's gateway address

``hypernat.switchhash.nft_jhash`` computes the same number in Python, bit for bit (Linux's
``jhash()`` — Bob Jenkins' lookup3 — over the concatenation as nftables lays it out in
its registers: each field in its own 32-bit word, network byte order, zero-padded,
read as host-order words; then ``reciprocal_scale``).  The tests check it against the
kernel's choice for every connection.  ICMP (no ports) is not steered: it keeps the
kernel's ECMP choice.
"""
from __future__ import annotations

import ipaddress

from pyroute2 import IPRoute

from .. import switchhash as _sh
from ..switchhash import jhash  # noqa: F401 - re-exported (tests pin its values)
from . import netns

TABLE = "hypernat_steer"
MARK_TABLE = 300  # + k


def nft_jhash(saddr, daddr, sport: int, dport: int, modulus: int, seed: int) -> int:
    """nftables ``jhash ip saddr . ip daddr . th sport . th dport mod M seed S`` (no offset);
    addresses as strings or ints (the computation lives in hypernat.switchhash)."""
    return _sh.nft_jhash(int(ipaddress.IPv4Address(saddr)), int(ipaddress.IPv4Address(daddr)), sport, dport,
                         modulus, seed)


def predict_return_nic(raddr, rport: int, eaddr, eport: int, nics: int, seed: int) -> int:
    """The outside link (NIC) a reply R:rport → E:eport takes on a steered testbed."""
    return nft_jhash(raddr, eaddr, rport, eport, nics, seed)


def install(topo, seed: int) -> None:
    """Steer inet's traffic toward the pool by nft_jhash (see the module docstring)."""
    a = topo.addr
    with IPRoute(netns=topo.inet) as ipr:
        for k in range(topo.nics):
            ipr.route("add", dst=a.pool, gateway=a.link("outside", k, "gw"), table=MARK_TABLE + k)
            ipr.rule("add", fwmark=1 + k, table=MARK_TABLE + k, priority=500 + k)
    rules = f"""
table ip {TABLE} {{
    chain out {{
        type route hook output priority mangle; policy accept;
        ip daddr {a.pool} meta l4proto {{ tcp, udp }} meta mark set jhash ip saddr . ip daddr . th sport . th dport mod {topo.nics} seed {seed:#x} offset 1 counter
    }}
}}
"""
    netns.run(topo.inet, ["nft", "-f", "-"], input_=rules)
