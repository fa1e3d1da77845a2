"""hypernat-nic: one NIC's worker loop (``NicWorker``), its snapshot, journal and metrics.

``NicWorker`` and ``agent_params`` are imported from ``.worker`` when first asked for, so
importing one of this package's modules alone (the compiled timer scheduler ``_timers``,
the journal) needs neither ZeroMQ nor the worker's other dependencies."""


def __getattr__(name):
    if name in ("NicWorker", "agent_params"):
        from . import worker

        return getattr(worker, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
