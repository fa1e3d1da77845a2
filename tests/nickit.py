"""What the in-process multi-NIC tests share: N NIC workers on memory ports and a
coordinator on its own thread, all registered before the test starts (bounded wait),
and all closed at the end whatever the test did."""
import contextlib

from hypernat.coord.broker import Coordinator
from hypernat.io.memory import MemoryPort
from hypernat.nic.worker import NicWorker, spin


def make_worker(cfg, nic, state_root, **kw):
    """NIC `nic` of `cfg` on two fresh memory ports, its state under state_root/nic<k>:
    (worker, inside port, outside port)."""
    inside, outside = MemoryPort(f"in{nic}"), MemoryPort(f"out{nic}")
    w = NicWorker(cfg, nic, inside, outside, state_dir=str(state_root / f"nic{nic}"), **kw)
    return w, inside, outside


@contextlib.contextmanager
def nics(cfg, n, state_root, register_s=5.0, worker_kw=None, **coord_kw):
    """A coordinator and `n` registered workers: yields (coordinator, [(worker, inside,
    outside), ...]).  ``coord_kw`` go to the Coordinator (heartbeat_interval 0.2 s unless
    given), ``worker_kw`` (a list, one dict per NIC, or one dict for all) to the workers."""
    coord_kw.setdefault("heartbeat_interval", 0.2)
    coord = Coordinator(cfg.coordinator.endpoint, n_nics=n, **coord_kw).start_thread()
    ws = []
    try:
        for k in range(n):
            kw = worker_kw[k] if isinstance(worker_kw, list) else (worker_kw or {})
            ws.append(make_worker(cfg, k, state_root, **kw))
        workers = [w for w, _, _ in ws]
        assert spin(workers, lambda: all(w.registered for w in workers), register_s), "NICs did not register"
        yield coord, ws
    finally:
        for w, _, _ in ws:
            w.close()
        coord.stop()
        coord.join(5)
