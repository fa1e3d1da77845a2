"""HyperNAT: a cloud NAT gateway scaled up over several packet-processing units.

See README.md for the architecture; `hypernat.fastpath` for the per-packet engine.
"""

__version__ = "0.1.0"
