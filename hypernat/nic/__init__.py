"""hypernat-nic: one NIC's worker loop (``NicWorker``), its snapshot, journal and metrics."""
from .worker import NicWorker, agent_params  # noqa: F401
