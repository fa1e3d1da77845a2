"""A VLAN-tagged VPC on the testbed: the inside links carry 802.1Q tag V.

Kernels without the 8021q module (no VLAN devices) still run tc BPF: on every VPC
end of an inside link a classifier pushes tag V on egress and pops any tag on
ingress, so the VPC's hosts stay untagged while the wire toward the gateway is
tagged::

    vpc: host ─► nicK ─[tc egress: bpf_skb_vlan_push(0x8100, V)]═══ tagged ═══► insideK (gw)
                      ◄[tc ingress: bpf_skb_vlan_pop]═══════════════ tagged ◄══

The gateway's kernel has no VLAN device either, so it answers no tagged ARP: the lab
writes both link ends' neighbour entries (permanent) instead.  The two programs are
five BPF instructions each, assembled here (no clang), loaded with the ``bpf``
system call and attached with pyroute2 (clsact, direct action).
"""
from __future__ import annotations

import ctypes
import os
import struct

from pyroute2 import IPRoute

from . import netns

_SYS_BPF = 321  # x86_64
_BPF_PROG_LOAD = 5
_PROG_SCHED_CLS = 3
_FN_VLAN_PUSH, _FN_VLAN_POP = 18, 19
_TC_ACT_OK = 0


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def _mov_imm(dst: int, imm: int) -> bytes:
    return _insn(0xB7, dst, imm=imm)  # BPF_ALU64 | BPF_MOV | BPF_K


def _call(fn: int) -> bytes:
    return _insn(0x85, imm=fn)  # BPF_JMP | BPF_CALL


_EXIT = _insn(0x95)  # BPF_JMP | BPF_EXIT


def push_program(vid: int) -> bytes:
    """r1 = skb (as entered); bpf_skb_vlan_push(skb, htons(0x8100), vid); return TC_ACT_OK."""
    proto = struct.unpack("=H", struct.pack("!H", 0x8100))[0]  # __be16 in a register
    return _mov_imm(2, proto) + _mov_imm(3, vid) + _call(_FN_VLAN_PUSH) + _mov_imm(0, _TC_ACT_OK) + _EXIT


def pop_program() -> bytes:
    return _call(_FN_VLAN_POP) + _mov_imm(0, _TC_ACT_OK) + _EXIT


def load(prog: bytes) -> int:
    """Load a SCHED_CLS program; returns its fd (raises OSError with the kernel's log)."""
    libc = ctypes.CDLL(None, use_errno=True)
    insns = ctypes.create_string_buffer(prog, len(prog))
    lic = ctypes.create_string_buffer(b"GPL")
    log = ctypes.create_string_buffer(4096)
    attr = ctypes.create_string_buffer(struct.pack(
        "=IIQQIIQI", _PROG_SCHED_CLS, len(prog) // 8, ctypes.addressof(insns), ctypes.addressof(lic),
        1, len(log), ctypes.addressof(log), 0).ljust(128, b"\0"), 128)
    fd = libc.syscall(_SYS_BPF, _BPF_PROG_LOAD, attr, 128)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"BPF_PROG_LOAD: {os.strerror(err)}: {log.value.decode(errors='replace')}")
    return fd


def tag_vpc_links(topo, vid: int) -> None:
    """Tag the VPC side of every inside link with `vid` (module docstring); static
    neighbour entries for both ends of each link."""
    push, pop = load(push_program(vid)), load(pop_program())
    try:
        with IPRoute(netns=topo.vpc) as ipr:
            for k in range(topo.nics):
                idx = ipr.link_lookup(ifname=topo.far(k))[0]
                ipr.tc("add", "clsact", index=idx)
                ipr.tc("add-filter", "bpf", index=idx, handle=":1", fd=push, name="hn_vlan_push",
                       parent="ffff:fff3", classid=1, direct_action=True)
                ipr.tc("add-filter", "bpf", index=idx, handle=":1", fd=pop, name="hn_vlan_pop",
                       parent="ffff:fff2", classid=1, direct_action=True)
    finally:
        os.close(push)
        os.close(pop)
    a = topo.addr
    for k in range(topo.nics):
        gw_mac = topo.mac(topo.gw, topo.inside(k)).hex(":")
        far_mac = topo.mac(topo.vpc, topo.far(k)).hex(":")
        netns.run(topo.vpc, ["ip", "neigh", "replace", a.link("inside", k, "gw"), "lladdr", gw_mac,
                             "dev", topo.far(k), "nud", "permanent"])
        netns.run(topo.gw, ["ip", "neigh", "replace", a.link("inside", k, "far"), "lladdr", far_mac,
                            "dev", topo.inside(k), "nud", "permanent"])
