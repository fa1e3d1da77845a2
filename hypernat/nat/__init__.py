"""Per-connection state of the owner side in typed C structures (issue 11).

``_ports.PortBlocks``  the port blocks assigned to internal hosts on this NIC: per block
                       its span, its host and a bitmap of used ports per protocol; RFC
                       6056 port choice (random start, next free), parity, preservation.
``_hosts.Hosts``       the internal hosts with blocks here: external address, blocks,
                       live mappings per protocol; a new mapping's port (``allocate``).
``_rate.HostRate``     new connections per internal host: a token bucket each.
``_mappings.Mappings`` mappings (by rule id, free-id stack) and sessions, indexed by
                       external endpoint, internal endpoint (EIM) or session key (APDM)
                       through FlowTables (the flow table's hashing, ``_fastpath.pxd``);
                       sessions pending for the flow tables until ``flush``.
``_mappings.OutSetup`` an outgoing first packet's common case over all of the above.
``_events.EventRing``  the mappings and sessions a call creates that Python must see
                       (per-rule log lines, PUSH records): fixed records, drained once
                       per call; the per-rule log line's text (``rule_lines``).
``_expire``            idle expiry's per-session work: a step's candidates
                       (``out_candidates``), the in entry, merged activity, timeout class
                       and deletions (``expire_out``), a session's end (``SessionEnd``:
                       mapping, host count, reuse-delay entries, "remove" events, REVOKE
                       records, drained once per step).

One C record per block, host, mapping or session: no Python object per connection.

The owner side's other concerns, one Python module each (per block event, per expired
step, per clone batch, per recovery report; compiled as they are, setup.py):

``pool.BlockPool``     free blocks per address, blocks journaled ahead, the reuse delay,
                       holds, loans, quarantine: it answers, the builder acts.
``expiry.Expiry``      the sweep: cursors, limits, timeouts, counters (per session: C).
``holder.CloneHolder`` clone entries held here: install, revoke, renew, activity.
``recovery.Recovery``  crash recovery from clones: the window, re-created sessions.
``records``            SESSION_DTYPE and the session keys, defined once.

``hypernat.rules.RuleBuilder`` owns one of each and keeps the decisions of a miss or a
fetch, the journal and translation-log writing, refusals' counters and logs and
snapshots; the components reach it only through its public methods (``SessionOwner``,
``RecoveryOwner``).  ``tests/nat_model.py`` is the readable reference of the compiled
decisions (``tests/test_nat_model.py`` checks them against it).
"""
