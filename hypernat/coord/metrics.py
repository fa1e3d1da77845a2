"""Prometheus metrics of the coordinator, read from its plain counters at scrape time.

The broker counts with Python integers in lists and dicts (an ``inc()`` on a
prometheus_client Counter takes a lock: too dear per routed message).  This collector
turns them into series only when /metrics is scraped:

    hypernat_coord_messages_received_total{type}   every message, by type
    hypernat_coord_messages_routed_total{type}     passed on to their target NIC
    hypernat_coord_drops_total{reason}             dropped, by reason (broker.DROP_REASONS)
    hypernat_coord_auth_total{result}              CURVE/ZAP decisions (auth.AUTH_RESULTS)
    hypernat_coord_queries_total                   control queries answered
    hypernat_coord_nics_up / _nics_known           registry
    hypernat_coord_nic_up{nic}, hypernat_coord_nic_last_seen_seconds{nic}
    hypernat_gateway_counter{name}                 the NICs' STATS counters, summed
                                                   (a gauge: a restarted NIC starts at 0)
    hypernat_coord_uptime_seconds

Each coordinator has its own registry, so tests can run several in one process.
"""
from __future__ import annotations

import re
import time

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .. import messages as M

_NAME_RE = re.compile(r"[^a-zA-Z0-9_]")


def _flatten(d: dict, prefix: str = ""):
    for k, v in d.items():
        name = f"{prefix}_{k}" if prefix else str(k)
        if isinstance(v, dict):
            yield from _flatten(v, name)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            yield _NAME_RE.sub("_", name), v


class CoordinatorCollector:
    """A prometheus_client collector over a live ``Coordinator``."""

    def __init__(self, coord):
        self.coord = coord

    def collect(self):
        c = self.coord
        received = list(c.received)
        routed = list(c.routed)
        m = CounterMetricFamily("hypernat_coord_messages_received", "Messages received, by type", labels=["type"])
        for code, n in enumerate(received):
            if n or code in M.TYPE_NAMES:
                m.add_metric([M.TYPE_NAMES.get(code, f"0x{code:02x}")], n)
        yield m
        m = CounterMetricFamily("hypernat_coord_messages_routed", "Messages routed to their target NIC, by type",
                                labels=["type"])
        for code in sorted(M.ROUTED_TYPES):
            m.add_metric([M.TYPE_NAMES[code]], routed[code])
        yield m
        m = CounterMetricFamily("hypernat_coord_drops", "Messages dropped, by reason", labels=["reason"])
        for reason, n in list(c.drops.items()):
            m.add_metric([reason], n)
        yield m
        m = CounterMetricFamily("hypernat_coord_auth", "CURVE connection decisions, by result", labels=["result"])
        for result, n in c.auth_counts().items():
            m.add_metric([result], n)
        yield m
        yield CounterMetricFamily("hypernat_coord_queries", "Control queries received", value=c.queries)
        nics = list(c.nics.values())
        yield GaugeMetricFamily("hypernat_coord_nics_up", "NICs up (heartbeating)", value=sum(1 for s in nics if s.up))
        yield GaugeMetricFamily("hypernat_coord_nics_known", "NICs that ever said HELLO", value=len(nics))
        up = GaugeMetricFamily("hypernat_coord_nic_up", "1 if the NIC is up", labels=["nic"])
        seen = GaugeMetricFamily("hypernat_coord_nic_last_seen_seconds", "Seconds since the NIC's last message",
                                 labels=["nic"])
        now = time.monotonic()
        for s in nics:
            up.add_metric([str(s.nic)], 1 if s.up else 0)
            seen.add_metric([str(s.nic)], now - s.last_seen)
        yield up
        yield seen
        g = GaugeMetricFamily("hypernat_gateway_counter", "The NICs' counters (from STATS), summed", labels=["name"])
        try:
            total = c.counters()["total"]
        except RuntimeError:  # a dict changed under us while the loop ran: skip this scrape
            total = {}
        for name, v in _flatten(total):
            g.add_metric([name], v)
        yield g
        yield GaugeMetricFamily("hypernat_coord_uptime_seconds", "Seconds since start",
                                value=time.time() - c.started_at)


def registry_for(coord) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(CoordinatorCollector(coord))
    return reg


def serve(coord, port: int, addr: str = "127.0.0.1"):
    """Start the /metrics HTTP server in a thread; returns the server (``shutdown()``)."""
    server, _thread = start_http_server(port, addr=addr, registry=registry_for(coord))
    return server
