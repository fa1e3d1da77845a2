"""What the namespace-testbed tests share: a gateway brought up for a test and always
torn down (``Topology.down`` also removes the run's logs and state), and the counters
its NICs report."""
import contextlib
import time

from hypernat.lab import cli


@contextlib.contextmanager
def gateway(topo, conf):
    """``topo`` up with HyperNAT started from ``conf`` inside it; down at the end,
    whatever happened."""
    try:
        topo.up()
        cli.start_gateway(topo, conf)
        yield topo
    finally:
        topo.down()
    assert not topo.exists()


def counters(topo, settle=1.3) -> dict:
    """The gateway's counters, after the NICs' next STATS (sent every second)."""
    time.sleep(settle)
    return cli.gateway_counters(topo)


def total(c: dict, word: str):
    """The sum of the numeric counters whose name contains ``word``."""
    return sum(v for k, v in c.items() if word in k and isinstance(v, (int, float)))
