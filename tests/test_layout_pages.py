"""Slot arrays and their pages: the fast path's flow tables ask for huge pages, the
per-connection indexes (presized to the flow tables, mostly empty) must not get them.
A huge page is zeroed -- and, with THP defrag "madvise", compacted for -- on its first
touch: random inserts into a presized 10^6-entry index touched ~230 huge pages during
the first 200 connections after start, a 0.4 s stall of the loop (every fetch answered
after its 50 ms retry in the testbed) and the whole index resident."""
import os

import numpy as np
import pytest

from hypernat.layout import alloc_slots

THP = "/sys/kernel/mm/transparent_hugepage"
needs_thp = pytest.mark.skipif(
    not os.path.isdir(THP),
    reason=f"the kernel has no transparent huge pages ({THP} is absent): no mapping can be asked for huge "
           "pages or refused them, so the VmFlags hg / nh this test reads never appear")


def vm_flags(arr) -> set:
    """The VmFlags of the mapping that holds `arr` (/proc/self/smaps)."""
    addr = arr.ctypes.data
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= addr < hi
            elif inside and head == "VmFlags:":
                return set(line.split()[1:])
    raise AssertionError("no mapping holds the array")


@needs_thp
def test_presized_indexes_get_small_pages_and_flow_tables_huge_ones():
    n = (64 << 20) // 32  # 64 MiB of 32-byte slots
    index = alloc_slots(n, hugepages=False)
    table = alloc_slots(n, hugepages=True)
    assert index.ctypes.data % 64 == 0 and table.ctypes.data % 64 == 0
    assert "nh" in vm_flags(index) and "hg" not in vm_flags(index)  # MADV_NOHUGEPAGE
    assert "hg" in vm_flags(table)  # MADV_HUGEPAGE
    index["rule_id"][np.random.default_rng(1).integers(0, n, 1000)] = 7  # random first touches
    assert (index["rule_id"] == 7).sum() <= 1000 and not index["flags"].any()


def test_small_arrays_are_aligned_and_zeroed():
    s = alloc_slots(1000, hugepages=False)
    assert s.ctypes.data % 64 == 0 and len(s) == 1000 and not s["flags"].any()
