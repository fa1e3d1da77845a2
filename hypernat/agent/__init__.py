"""The agent: how a rule built on one NIC reaches the NIC that sees the other direction.

``core.RuleAgent`` is the cloning state machine of one NIC (its docstring draws the
exchange); the holder's fetches in flight, its negative cache and the per-source fetch
token buckets are one ``PendingTable`` (``_pending.pyx``, compiled; ``pending_py`` its
plain-Python reference); the owner's leases are one ``LeaseTable`` (``_leases.pyx``;
``leases_py``).
"""
from .core import (DIR_BIT, DROP_REASON_NAMES, DROP_REASONS, IN, OUT, AgentParams, RuleAgent, fetch_key_tuple,
                   fetch_rows_of, predict_nic, session_key, session_rec, skey, switch_hash)
from .core import _LAT_LIMITS, _LAT_NAMES, _latency_bucket  # noqa: F401  (tests read the latency buckets)

__all__ = ["AgentParams", "RuleAgent", "DROP_REASONS", "DROP_REASON_NAMES", "IN", "OUT", "DIR_BIT", "predict_nic",
           "switch_hash", "session_key", "session_rec", "skey", "fetch_key_tuple",
           "fetch_rows_of"]
