"""Packet I/O backends behind one interface (see base.py)."""
