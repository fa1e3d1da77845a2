"""Translation log: who held which external endpoint when (abuse reports, RFC 6888 REQ-12).

One JSON object per line, written by the RuleBuilder:

  per-rule mode     {"ts": 1764149000.125, "nic": 0, "event": "create", "proto": "tcp",
                     "internal": "10.77.0.5:40312", "external": "198.18.77.3:51234"}
                    ... and "event": "remove" when the mapping ends.  With ``remote: true``
                    (off by default) one line per *session* instead, with "remote".
  per-block mode    {"ts": ..., "nic": 0, "event": "block", "internal": "10.77.0.5",
                     "external": "198.18.77.3", "ports": [51200, 51263]}
                    ... "event": "block-free" when the host gives the block back.  One line
                    per block of B ports instead of one per connection: B times less.

Lines are buffered and flushed once per batch (``flush``), never per rule.  The lines of
the mappings and sessions a batch creates are written together (``rules``: one clock
reading, so they share their "ts"), from the records of the owner's event ring
(hypernat.nat._events); a per-rule line's text has one implementation, compiled
(``hypernat.nat._events.rule_line`` / ``rule_lines``).
"""
from __future__ import annotations

import os
import time

from .nat._events import rule_line, rule_lines


def _ip(a: int) -> str:
    return f"{a >> 24}.{a >> 16 & 255}.{a >> 8 & 255}.{a & 255}"


class TransLog:
    """Writes translation-log lines to a path or a text stream."""

    def __init__(self, target, mode: str = "per-rule", remote: bool = False, nic_id: int = 0, clock=time.time):
        if mode not in ("per-rule", "per-block"):
            raise ValueError(f"unknown translation log mode {mode!r}")
        self.mode = mode
        self.per_block = mode == "per-block"
        self.remote = remote
        self.nic_id = nic_id
        self.clock = clock
        self.lines = 0
        if isinstance(target, (str, os.PathLike)):
            d = os.path.dirname(os.fspath(target))
            if d:
                os.makedirs(d, exist_ok=True)
            self._f = open(target, "a", buffering=1 << 16)
            self._own = True
        else:
            self._f = target
            self._own = False

    @classmethod
    def from_config(cls, cfg, nic_id: int, clock=time.time):
        tl = cfg.translation_log
        if not tl.enabled:
            return None
        path = tl.path
        if cfg.n_nics > 1:  # one file per NIC process: no interleaved writes
            root, ext = os.path.splitext(path)
            path = f"{root}.nic{nic_id}{ext or '.jsonl'}"
        return cls(path, tl.mode, tl.remote, nic_id, clock)

    def _write(self, text: str) -> None:
        self._f.write(text)
        self.lines += 1

    def rule(self, event: str, proto: int, iaddr: int, iport: int, eaddr: int, eport: int, raddr=None, rport=None):
        """A mapping (or, with remote logging, a session) created or removed."""
        rem = self.remote and raddr is not None
        self._write(rule_line(self.clock(), self.nic_id, event, proto, iaddr, iport, eaddr, eport,
                              raddr if rem else 0, rport if rem else 0, rem))

    def rules(self, event: str, records) -> None:
        """``rule`` for each record of an EVENT_DTYPE array (hypernat.nat._events: proto,
        iaddr, iport, eaddr, eport, and with remote logging raddr, rport), in order, all
        with one clock reading: one write."""
        n = len(records)
        if n:
            self._f.write(rule_lines(self.clock(), self.nic_id, event, records, self.remote))
            self.lines += n

    def block(self, event: str, iaddr: int, eaddr: int, lo: int, hi: int):
        """A port block assigned to ("block") or given back by ("block-free") a host."""
        self._write(
            f'{{"ts": {self.clock():.3f}, "nic": {self.nic_id}, "event": "{event}", '
            f'"internal": "{_ip(iaddr)}", "external": "{_ip(eaddr)}", "ports": [{lo}, {hi}]}}\n'
        )

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        self.flush()
        if self._own:
            self._f.close()
