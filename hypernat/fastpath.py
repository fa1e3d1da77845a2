"""The fast path: flow tables and batch translation.  Two implementations, one API.

* ``hypernat._fastpath`` (Cython, ``nogil`` loops) is what runs;
* ``hypernat.fastpath_py`` (plain Python) is the readable reference: the oracle the
  tests compare against and the baseline the benchmarks divide by.

Set ``HYPERNAT_NO_EXTENSIONS=1`` to run everything on the reference.  ``IMPL`` names
the one chosen.

API (both modules)
------------------
``FlowTable(capacity, hugepages=True)``
    Open addressing over ``layout.SLOT_DTYPE`` slots (``nslots = layout.slots_for(capacity)``,
    home slot ``layout.flow_hash(...) & (nslots - 1)``, linear probing, backward-shift
    delete).  Holds at most ``capacity`` entries; an insert beyond that is refused
    (returns False, ``full_count`` += 1) and never overwrites.
    ``.slots`` is the numpy array of slots (the real memory: inspect, snapshot);
    ``.capacity``, ``.nslots``, ``len(t)``, ``.full_count``;
    ``insert(proto, saddr, sport, daddr, dport, new_addr, new_port, rule_id=0, now=0,
    flags=0) -> bool`` (an existing key gets the new value, tcp_state reset; True);
    ``lookup(proto, saddr, sport, daddr, dport) -> int`` slot index or -1;
    ``get(proto, saddr, sport, daddr, dport) -> numpy record copy or None``;
    ``delete(proto, saddr, sport, daddr, dport) -> bool``;
    ``insert_batch(entries)`` (array of SLOT_DTYPE records, key and value fields used;
    flags gets F_OCCUPIED added) -> number inserted;
    ``delete_batch(keys)`` (SLOT_DTYPE or KEY_DTYPE array) -> number deleted;
    ``occupied() -> numpy array of slot indices in use``; ``clear()``;
    ``load_slots(array)`` replaces the contents from a snapshot of the same nslots.

``Translator(out_table, in_table, pool=(), frag=None)``
    ``pool``: external-pool prefixes as ``(network_int, prefix_len)``; an outgoing frame
    whose destination lies in the pool is a hairpin.  ``frag``: a ``FragTable`` of the
    same twin (virtual reassembly, docs/fastpath.md "Fragments"); None drops every
    fragment (verdict ``fragment``).
    ``translate(buf, offsets, lengths, direction, now, verdicts, keys=None, partial=None, meta=None) -> None``:
    ``buf`` a writable contiguous uint8 buffer; ``offsets``/``lengths`` uint32 arrays of
    n frames inside it; ``direction`` ``verdicts.OUT`` or ``verdicts.IN``; ``now`` uint32
    clock ticks written to ``last_seen`` on a hit; ``verdicts`` uint8[n] output; ``keys``
    optional KEY_DTYPE[n] output (the lookup key of every parsed frame).  Frames are
    rewritten in place.  Never reads or writes outside ``buf[offset:offset+length]``.
    ``partial`` optional uint8[n]: non-zero where the TCP/UDP checksum field holds the
    pseudo-header sum (checksum offload): only the addresses update it.  ``meta``
    optional: the frames' virtio_net_hdr records (``io.base.META_DTYPE``, or their
    bytes, writable): a super-frame is sized against the MTU by its segments, and a
    TCP one may leave with a smaller ``gso_size`` written there (docs/fastpath.md).
    ``set_l2(direction, src_mac: bytes, dst_mac: bytes)``: after translation, frames
    sent toward `direction`'s far side get these MACs (HAIRPIN frames use the IN
    direction's pair: they go back inside); unset = leave MACs alone.
    ``counters``: numpy uint64 array ``[2, N_VERDICTS]`` (direction, verdict), live;
    ``counters_dict() -> {"out": {verdict_name: n}, "in": {...}}``; ``reset_counters()``.
    The gateway as a router (docs/fastpath.md, "Generated frames"):
    ``Translator(..., output_bytes=1 << 20, output_frames=4096)`` sizes the output area;
    ``set_router(outside_mtu=0, inside_mtu=0, outside_address=0, inside_address=0,
    icmp_rate=0, mss_clamp=0)`` (``router`` reads them back): ICMP time exceeded and
    fragmentation needed, fragments of frames above an egress MTU, MSS clamping;
    after each translate, ``out_count`` frames the gateway made (its ICMP errors and
    fragments, and the early fragments the fragment table released) lie in the one
    output area, ``out_buf`` at
    ``out_offsets`` / ``out_lengths``, leaving toward ``out_exits`` (OUT / IN);
    ``generated() -> [(exit, bytes)]``; ``router_events`` uint64 ``[2, N_ROUTER_EVENTS]``
    and ``router_events_dict()``.

``FragTable(entries=1024, bytes=1 << 20, timeout=2)``
    Per-NIC fragment table (``hypernat._frag`` / ``hypernat.frag_py``): ``len()``
    datagrams tracked, ``.held`` chunks in use, ``.counters`` / ``counters_dict()``
    (``verdicts.FRAG_COUNTERS``), ``expire(now)``.  The early fragments a translate
    call releases land in that Translator's output area (``out_*`` above).
"""

import os

if os.environ.get("HYPERNAT_NO_EXTENSIONS", "") not in ("", "0"):
    from .fastpath_py import FlowTable, Translator  # noqa: F401
    from .frag_py import FragTable  # noqa: F401

    IMPL = "python"
else:
    try:
        from ._fastpath import FlowTable, Translator  # noqa: F401
        from ._frag import FragTable  # noqa: F401

        IMPL = "cython"
    except ImportError as exc:  # not built: say so once, run on the reference
        import logging

        logging.getLogger("hypernat").warning(
            "hypernat._fastpath is not built (%s): running on the pure-Python reference; "
            "build it with `make build` or `pip install .`",
            exc,
        )
        from .fastpath_py import FlowTable, Translator  # noqa: F401
        from .frag_py import FragTable  # noqa: F401

        IMPL = "python"
