"""hypernat-coord: the ZeroMQ broker between the NIC workers (``broker``), its
Prometheus metrics (``metrics``) and the ``hypernat ctl`` client (``ctl``)."""
from .broker import DEFAULT_ENDPOINT, Coordinator, CoordinatorError  # noqa: F401
