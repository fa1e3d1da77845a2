"""The testbed: real kernels and real sockets in network namespaces (topology, peer,
traffic, cli), and the emulated deployment (emulated.py) where namespaces cannot be had."""
