"""Prometheus metrics of one NIC worker (``config.metrics.port + 1 + nic_id``).

One custom collector reads the worker's live counters at scrape time (no per-packet
work): fast-path verdicts per direction (named after ``verdicts.VERDICTS``), the
builder's slow-path reasons, the agent's cloning counters, the loop's own counters and
gauges (table entries, pending fetches, clones, leases, utilisation of E_i).

    hypernat_nic_verdicts_total{nic="0",direction="in",verdict="miss_in"}  12
    hypernat_nic_router_total{nic="0",direction="out",event="icmp_time_exceeded"} 3
    hypernat_nic_slow_path_total{nic="0",reason="fetch_timeout"}            0
    hypernat_nic_agent_total{nic="0",event="clones_installed"}             37
    hypernat_nic_fragments_total{nic="0",event="frag_released"}             4
    hypernat_nic_gauge{nic="0",name="agent_clones"}                         37
    hypernat_nic_timer_runs_total{nic="0",job="agent_activity"}           412
    hypernat_nic_timer_overruns_total{nic="0",job="agent_activity"}       380  (left work for the next turn)
    hypernat_nic_timer_last_seconds{nic="0",job="sweep"}                  3.1e-05
"""
from __future__ import annotations

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import CollectorRegistry

from ..verdicts import DIRECTION_NAMES, ROUTER_EVENT_NAMES, VERDICT_NAMES


class WorkerCollector:
    def __init__(self, worker):
        self.w = worker

    def collect(self):
        w, nic = self.w, str(self.w.nic_id)
        v = CounterMetricFamily("hypernat_nic_verdicts", "frames by fast-path verdict",
                                labels=["nic", "direction", "verdict"])
        c = w.translator.counters
        for d, dname in enumerate(DIRECTION_NAMES):
            for i, name in enumerate(VERDICT_NAMES):
                v.add_metric([nic, dname, name], int(c[d, i]))
        yield v
        r = CounterMetricFamily("hypernat_nic_router", "ICMP errors, fragments and MSS clamps of the fast path",
                                labels=["nic", "direction", "event"])
        e = w.translator.router_events
        for d, dname in enumerate(DIRECTION_NAMES):
            for i, name in enumerate(ROUTER_EVENT_NAMES):
                r.add_metric([nic, dname, name], int(e[d, i]))
        yield r
        s = CounterMetricFamily("hypernat_nic_slow_path", "slow-path drops and events by reason",
                                labels=["nic", "reason"])
        for k, n in w.rules.counters_dict().items():
            s.add_metric([nic, k], int(n))
        yield s
        a = CounterMetricFamily("hypernat_nic_agent", "rule cloning events", labels=["nic", "event"])
        for k, n in sorted(w.agent.counters.items()):
            a.add_metric([nic, k], int(n))
        yield a
        fr = CounterMetricFamily("hypernat_nic_fragments", "fragment table events (verdicts.FRAG_COUNTERS)",
                                 labels=["nic", "event"])
        for k, n in w.frag.counters_dict().items():
            fr.add_metric([nic, k], int(n))
        yield fr
        lp = CounterMetricFamily("hypernat_nic_loop", "worker loop events", labels=["nic", "event"])
        for k, n in sorted(w.counters.items()):
            lp.add_metric([nic, k], int(n))
        yield lp
        g = GaugeMetricFamily("hypernat_nic_gauge", "worker gauges", labels=["nic", "name"])
        for k, n in w.gauges().items():
            g.add_metric([nic, k], float(n))
        yield g
        # the loop's periodic jobs (nic/timers.py): what ran, what left work, how long
        ts = w.timers.stats()
        for key, name, doc, fam in (
                ("runs", "hypernat_nic_timer_runs", "timer job runs", CounterMetricFamily),
                ("overruns", "hypernat_nic_timer_overruns", "turns a timer job left work for the next",
                 CounterMetricFamily),
                ("deferred", "hypernat_nic_timer_deferred", "turns a due timer job waited for the turn budget",
                 CounterMetricFamily),
                ("last_us", "hypernat_nic_timer_last_seconds", "duration of a timer job's last run",
                 GaugeMetricFamily),
                ("max_us", "hypernat_nic_timer_max_seconds", "longest run of a timer job", GaugeMetricFamily)):
            m = fam(name, doc, labels=["nic", "job"])
            scale = 1e-6 if key.endswith("_us") else 1
            for job, st in ts.items():
                m.add_metric([nic, job], st[key] * scale)
            yield m


def registry_for(worker) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=True)
    reg.register(WorkerCollector(worker))
    return reg


def serve(worker, address: str, port: int):
    """Start the HTTP endpoint in a daemon thread; returns the server (or None if the
    port is taken: metrics are never a reason for a NIC not to run)."""
    import logging

    from prometheus_client import start_http_server

    try:
        return start_http_server(port, addr=address, registry=registry_for(worker))
    except OSError as exc:
        logging.getLogger("hypernat.nic").warning("nic%d: metrics on %s:%d unavailable: %s",
                                                  worker.nic_id, address, port, exc)
        return None
