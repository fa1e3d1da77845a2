"""Per-connection state of the owner side in typed C structures (issue 11).

``_ports.PortBlocks``  the port blocks assigned to internal hosts on this NIC: per block
                       its span, its host and a bitmap of used ports per protocol; RFC
                       6056 port choice (random start, next free), parity, preservation.
                       One C record per block, no Python object per block or port.

``hypernat.rules.RuleBuilder`` owns one and keeps the policy (which host gets which
block, journal, translation log, reuse delay, quarantine) in Python.
"""
