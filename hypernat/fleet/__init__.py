"""HyperNAT past one server: a fleet of gateway servers behind BGP routers.

    spec.py      the ``fleet:`` section of a server's YAML, and the checks across a fleet's files
    frr.py       FRR (zebra + bfdd + bgpd) configuration rendered from it, and a supervised FRR instance
    speaker.py   ``hypernat-fleet`` / ``python -m hypernat.fleet``: the health-gated announcer
    resilient.py the VPC router's controller: BGP paths -> a Linux resilient nexthop group

See docs/scale-out.md for the model and the operations.
"""
