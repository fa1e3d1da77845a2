"""The peer: Linux's own NAT in the gateway namespace ("serverNAT" in the paper).

Same topology, same traffic, Linux doing the translation, so HyperNAT can be measured
side by side with the thing a cloud would otherwise run::

   inside_k ──► policy route (iif inside_k → table 100+k: default via outside_k) ──► outside_k
                 nftables postrouting: ip saddr I snat to <pool address>   (conntrack)
   outside_k ──► conntrack un-NATs in prerouting ──► (iif outside_k → table 200+k: I via inside_k) ──► inside_k

The policy routes make NIC k a port pair, as it is for HyperNAT: what came in on
inside_k leaves on outside_k, and a reply that came in on outside_k goes back on
inside_k.  Which NIC each direction uses is decided by the ECMP hashes in ``vpc`` and
``inet``, exactly as for HyperNAT.

The snat target is one *pool* address that ``inet`` routes over both outside links
(ECMP).  Masquerading to a link's own address would pin the return path to one link.
"""
from __future__ import annotations

from pyroute2 import IPRoute

from . import netns

TABLE = "hypernat_peer"
TABLE_OUT = 100  # + k: traffic that entered on inside_k
TABLE_IN = 200  # + k: traffic that entered on outside_k


def nft_ruleset(internal: str, snat_to: str, outside_ifnames) -> str:
    ifs = ", ".join(f'"{n}"' for n in outside_ifnames)
    return f"""
table ip {TABLE} {{
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        ip saddr {internal} oifname {{ {ifs} }} counter snat to {snat_to}
    }}
    chain forward {{
        type filter hook forward priority filter; policy accept;
        ct state invalid counter drop
    }}
}}
"""


def install_linux_nat(topo) -> None:
    a = topo.addr
    # The per-NIC tables themselves are the topology's (every mode has them: they are
    # how a NIC daemon finds its next hops); Linux's NAT only needs the rules.
    with IPRoute(netns=topo.gw) as gw:
        for k in range(topo.nics):
            ins, outs = topo.inside(k), topo.outside(k)
            gw.rule("add", iifname=ins, table=TABLE_OUT + k, priority=1000 + k)
            gw.rule("add", iifname=outs, table=TABLE_IN + k, priority=2000 + k)
    netns.run(topo.gw, ["nft", "-f", "-"], input_=nft_ruleset(a.internal, a.snat(),
                                                              [topo.outside(k) for k in range(topo.nics)]))


def nat_counters(topo) -> dict:
    """Packets counted by the peer's rules: {'snat': n, 'invalid_dropped': n}."""
    import json

    p = netns.run(topo.gw, ["nft", "-j", "list", "table", "ip", TABLE])
    out = {}
    for item in json.loads(p.stdout).get("nftables", []):
        rule = item.get("rule")
        if not rule:
            continue
        pk = next((e["counter"]["packets"] for e in rule["expr"] if "counter" in e), 0)
        out["snat" if rule["chain"] == "postrouting" else "invalid_dropped"] = pk
    return out


def conntrack_count(topo) -> int:
    try:
        return int(netns.sysctl(topo.gw, "net.netfilter.nf_conntrack_count"))
    except (OSError, ValueError):
        return -1
