"""Address partitions: the external space E cut into E_0 .. E_{N-1}, one per NIC.

E is the pool's addresses (the configured prefixes, in order, concatenated: address
index a = 0 .. A-1) times the port range [port_min, port_max] (P ports).  Ports are
grouped in *blocks* of B consecutive ports (the last block of an address may be short);
there are bpa = ceil(P / B) blocks per address, and a block has a global id

    g = a * bpa + j          (a: address index, j: block index inside the address)

Both strategies cut the space along block boundaries, with the same "even split"
arithmetic: item t of T items belongs to part  k(t) = floor(((t + 1) * N - 1) / T)
(equivalently, part k holds items [floor(k*T/N), floor((k+1)*T/N)) ).

  by-port      every address's blocks are split into N runs (works with ONE address):
                 address a:  |  NIC 0  |  NIC 1  |  ...  |  NIC N-1 |   (j = 0 .. bpa-1)
  by-address   whole addresses are split into N runs (T = A):
                 a = 0 .. A-1:  | NIC 0's addresses | NIC 1's | ... |

``owner(addr, port)`` is that arithmetic (O(1)), then a look-up in the small
*override table* of blocks lent for spill-over (``lend`` / ``return_block``): a NIC
whose E_i is exhausted borrows a block from a neighbour; every party that routes or
validates by owner (the NICs, the coordinator) applies the same override when the
BORROW is acknowledged.  The arithmetic and the loans are kept in C, once
(``hypernat._geometry.Geometry``, ``Partition.geometry``): the compiled readers (the
wire validator, the incoming setup of hypernat.nat) cimport it, and the methods here
answer through it.

``eim_owner(internal_addr)``: with endpoint-independent mapping all mappings of an
internal host belong to one NIC, ``crc32(addr as 4 bytes, network order) mod N`` (zlib's
CRC-32: stable across processes, machines and Python versions, unlike ``hash()``).
"""
from __future__ import annotations

import bisect
import ipaddress
import zlib

import numpy as np

from ._geometry import Geometry

BY_PORT = "by-port"
BY_ADDRESS = "by-address"


def _part_of(t: int, total: int, n: int) -> int:
    """Part (0..n-1) that item t of `total` items falls in, parts [k*T//n, (k+1)*T//n)."""
    return ((t + 1) * n - 1) // total


def _part_range(k: int, total: int, n: int) -> tuple:
    return (k * total) // n, ((k + 1) * total) // n


class Partition:
    """E split over N NICs; see the module docstring for the arithmetic."""

    def __init__(self, pool, port_min: int, port_max: int, n_nics: int, strategy: str = BY_PORT, block_size: int = 64):
        nets = [n if isinstance(n, ipaddress.IPv4Network) else _net(n) for n in pool]
        if not nets:
            raise ValueError("empty external pool")
        if not 1 <= port_min <= port_max <= 65535:
            raise ValueError(f"bad port range {port_min}-{port_max}")
        if strategy not in (BY_PORT, BY_ADDRESS):
            raise ValueError(f"unknown partition strategy {strategy!r}")
        if n_nics < 1 or block_size < 1:
            raise ValueError("need at least one NIC and a block size >= 1")
        self.nets = tuple(nets)
        self.n = n_nics
        self.strategy = strategy
        self.port_min, self.port_max = port_min, port_max
        self.n_ports = port_max - port_min + 1
        self.block_size = block_size
        self.bpa = -(-self.n_ports // block_size)  # blocks per address
        # pool index of each prefix's first address, in pool order
        offs, o = [], 0
        for net in self.nets:
            offs.append(o)
            o += net.num_addresses
        self.n_addrs = o
        self._pool_offs = offs  # for address_at
        if strategy == BY_ADDRESS and self.n_addrs < n_nics:
            raise ValueError(f"{self.n_addrs} addresses cannot be split over {n_nics} NICs by address")
        if strategy == BY_PORT and self.bpa < n_nics:
            raise ValueError(f"{self.bpa} blocks per address cannot be split over {n_nics} NICs by port")
        self.n_blocks = self.n_addrs * self.bpa
        self.overrides: dict = {}  # block id -> NIC id currently holding it (lent blocks)
        # the arithmetic and the loans in C (see the module doc); ranges in pool order
        self.geometry = Geometry([(int(net.network_address), net.num_addresses, off) for net, off in zip(self.nets, offs)],
                                 port_min, port_max, block_size, strategy == BY_PORT, n_nics, self.bpa, self.n_addrs)

    @classmethod
    def from_config(cls, cfg) -> "Partition":
        return cls(cfg.pool, cfg.port_min, cfg.port_max, cfg.n_nics, cfg.partition, cfg.limits.port_block_size)

    # -- addresses and blocks -----------------------------------------------------------
    def address_index(self, addr: int) -> int:
        """Index of an address in the pool, or -1."""
        return self.geometry.address_index(addr) if 0 <= addr <= 0xFFFFFFFF else -1

    def address_at(self, a: int) -> int:
        """The address (int) with pool index a."""
        if not 0 <= a < self.n_addrs:
            raise IndexError(a)
        i = bisect.bisect_right(self._pool_offs, a) - 1
        return int(self.nets[i].network_address) + (a - self._pool_offs[i])

    def block_of(self, addr: int, port: int) -> int:
        """Global block id holding (addr, port), or -1 outside E."""
        return self.geometry.block_of(addr, port)

    def block_span(self, block: int) -> tuple:
        """(address, first port, last port) of a block."""
        if not 0 <= block < self.n_blocks:
            raise IndexError(block)
        a, j = divmod(block, self.bpa)
        lo = self.port_min + j * self.block_size
        return self.address_at(a), lo, min(lo + self.block_size - 1, self.port_max)

    def native_owner_of_block(self, block: int) -> int:
        """The NIC whose E_i holds a block by the strategy (ignoring loans)."""
        return self.geometry.native_owner_of_block(block)

    def owner_of_block(self, block: int) -> int:
        return self.geometry.owner_of_block(block)

    # -- ownership ----------------------------------------------------------------------
    def owner(self, addr: int, port: int) -> int:
        """NIC owning external endpoint (addr, port); -1 if it is not in E.  O(1)."""
        return self.geometry.owner(addr, port)

    def contains(self, nic: int, addr: int, port: int) -> bool:
        """Does NIC `nic` own (addr, port) right now (including borrowed blocks)?"""
        return self.geometry.owner(addr, port) == nic

    def eim_owner(self, internal_addr: int) -> int:
        """NIC owning every mapping of an internal host (endpoint-independent mapping)."""
        return zlib.crc32(int(internal_addr).to_bytes(4, "big")) % self.n

    def owners(self, addrs, ports) -> np.ndarray:
        """Vectorised owner() (numpy int arrays in, int16 out; -1 outside E)."""
        return self.geometry.owners(addrs, ports)

    # -- a NIC's own space --------------------------------------------------------------
    def nic_address_indices(self, nic: int) -> range:
        """Pool indices of the addresses on which NIC `nic` has native blocks."""
        if self.strategy == BY_PORT:
            return range(self.n_addrs)
        lo, hi = _part_range(nic, self.n_addrs, self.n)
        return range(lo, hi)

    def nic_block_range(self, nic: int) -> tuple:
        """Block indices j (inside each of its addresses) natively owned by `nic`."""
        if self.strategy == BY_PORT:
            return _part_range(nic, self.bpa, self.n)
        return 0, self.bpa

    def nic_blocks_on(self, nic: int, a: int) -> range:
        """Global block ids natively owned by `nic` on address index a (empty if none)."""
        if a not in self.nic_address_indices(nic):
            return range(0)
        j0, j1 = self.nic_block_range(nic)
        return range(a * self.bpa + j0, a * self.bpa + j1)

    def block_ports(self, block: int) -> int:
        _, lo, hi = self.block_span(block)
        return hi - lo + 1

    def nic_size(self, nic: int) -> int:
        """Ports (external endpoints) natively in E_nic."""
        j0, j1 = self.nic_block_range(nic)
        per_addr = min(j1 * self.block_size, self.n_ports) - j0 * self.block_size if j1 > j0 else 0
        return len(self.nic_address_indices(nic)) * per_addr

    # -- spill-over: lending blocks -----------------------------------------------------
    def lend(self, block: int, to_nic: int) -> None:
        """Record that `block` is now held by `to_nic` (a BORROW acknowledged)."""
        if not 0 <= block < self.n_blocks or not 0 <= to_nic < self.n:
            raise ValueError(f"bad loan: block {block} to NIC {to_nic}")
        if to_nic == self.native_owner_of_block(block):
            self.overrides.pop(block, None)
        else:
            self.overrides[block] = to_nic
        self.geometry.set_loans(self.overrides)

    def return_block(self, block: int) -> None:
        """A lent block goes back to its native owner (RETURN acknowledged)."""
        if self.overrides.pop(block, None) is not None:
            self.geometry.set_loans(self.overrides)

    def borrowed_by(self, nic: int) -> list:
        return sorted(b for b, o in self.overrides.items() if o == nic)

    # -- display ------------------------------------------------------------------------
    def describe(self) -> str:
        """The partition table `hypernat check` prints."""
        lines = [
            f"partition {self.strategy}: {self.n_addrs} address(es) x ports {self.port_min}-{self.port_max} "
            f"= {self.n_addrs * self.n_ports} endpoints over {self.n} NIC(s); blocks of {self.block_size} "
            f"({self.bpa} per address)",
            f"{'NIC':>4}  {'addresses':<33} {'ports':<13} {'blocks/addr':>11} {'endpoints':>11}  share",
        ]
        total = self.n_addrs * self.n_ports
        for k in range(self.n):
            ar = self.nic_address_indices(k)
            j0, j1 = self.nic_block_range(k)
            first, last = self.address_at(ar[0]), self.address_at(ar[-1])
            addrs = (
                f"{ipaddress.IPv4Address(first)}"
                if len(ar) == 1
                else f"{ipaddress.IPv4Address(first)} .. {ipaddress.IPv4Address(last)} ({len(ar)})"
            )
            plo = self.port_min + j0 * self.block_size
            phi = min(self.port_min + j1 * self.block_size - 1, self.port_max)
            size = self.nic_size(k)
            lines.append(
                f"{k:>4}  {addrs:<33} {f'{plo}-{phi}':<13} {j1 - j0:>11} {size:>11}  {100.0 * size / total:5.1f}%"
            )
        if self.overrides:
            lines.append("lent blocks: " + ", ".join(f"{b}->NIC {o}" for b, o in sorted(self.overrides.items())))
        return "\n".join(lines)


def _net(spec) -> ipaddress.IPv4Network:
    if isinstance(spec, tuple):
        base, plen = spec
        return ipaddress.IPv4Network((base, plen))
    return ipaddress.IPv4Network(spec)
