"""Clone install in plain Python: the readable reference of ``hypernat/_clones.pyx``
(same arguments, same results; used when the extensions are not built, and checked
against the compiled one by ``tests/test_clones_twins.py``)."""
import heapq

from . import layout

_P_ICMP, _P_TCP, _P_UDP = 1, 6, 17
_D_OUT, _D_IN = 1, 2  # rules.DIR_BIT_OUT, rules.DIR_BIT_IN


def _put(t, key, na, np_, rid, now, tcp, lease) -> int:
    """One clone entry: 1 installed, 0 refused (an owned entry holds the key), -1 table
    full.  A clone entry already there is replaced."""
    j = t.lookup(*key)
    if j >= 0 and not t.slots["flags"][j] & layout.F_CLONE:
        return 0
    if not t.insert(*key, na, np_, rule_id=rid, now=now, flags=layout.F_CLONE):
        return -1
    if tcp or lease:
        j = t.lookup(*key)
        t.slots["tcp_state"][j] = tcp
        t.slots["lease"][j] = lease
    return 1


def install_clone_rows(out, inn, rows, own, me, now, lease):
    """See ``hypernat._clones.install_clone_rows``: ``(got, bad, full)``."""
    now = int(now) & 0xFFFFFFFF
    lease = int(lease) & 0xFFFF
    got = [0] * len(rows)
    bad = full = 0
    for x, (p, i, ip, e, ep, r, rp, rid, d, to, ti) in enumerate(rows):
        if p not in (_P_TCP, _P_UDP, _P_ICMP) or own[x] == me:
            bad += 1
            continue
        puts = []
        if d & _D_OUT:
            puts.append((out, (p, i, ip, r, ip if p == _P_ICMP else rp), e, ep, to))
        if d & _D_IN:
            puts.append((inn, (p, r, ep if p == _P_ICMP else rp, e, ep), i, ip, ti))
        for t, key, na, np_, tcp in puts:
            k = _put(t, key, na, np_, rid, now, tcp & layout.TCP_STATE_MASK, lease)
            if k > 0:
                got[x] += 1
            elif k == 0:
                bad += 1
            else:
                full += 1
    return got, bad, full


# ---------------------------------------------------------------------------------------
# The holder's clone table: the reference of ``hypernat._clones.CloneTable``
# ---------------------------------------------------------------------------------------
class Clone(tuple):
    """A clone as the table holds it (a copy): owner, rule_id, dirs, expires, due."""
    __slots__ = ()
    owner = property(lambda self: self[0])
    rule_id = property(lambda self: self[1])
    dirs = property(lambda self: self[2])
    expires = property(lambda self: self[3])
    due = property(lambda self: self[4])


class CloneTable:
    """Session identity -> [owner, rule_id, dirs, expires, due] in a dict, indexed by
    owner and by (proto, E, Ep) in dicts and by lease end in a heap (see the compiled
    one for the interface)."""

    def __init__(self, capacity: int = 1024):
        self._c: dict = {}
        self._of: dict = {}  # owner -> {sk: None}
        self._at: dict = {}  # (proto, E, Ep) -> {sk: None}
        self._ends: list = []  # heap of (due, sk)
        self.walks = 0

    def install(self, owner, items, now, margin, install_rows, tick, want_keys=False):
        todo, rows = [], []
        for sk, rule_id, lease_ms, d in items:
            expires = now + lease_ms / 1000.0
            c = self._c.get(sk)
            if c is not None and c[0] == owner and (c[2] & d) == d:
                if expires > c[3]:
                    c[3] = expires
                continue
            todo.append((sk, rule_id, d, expires))
            rows.append(tuple(sk) + (rule_id, d, 0, 0))
        if not todo:
            return 0, 0, []
        got = install_rows(rows, tick)
        installed = failed = 0
        keys = [] if want_keys else None
        for (sk, rule_id, d, expires), ok in zip(todo, got):
            if ok <= 0:
                failed += 1
                continue
            installed += 1
            c = self._c.get(sk)
            if c is None:
                due = expires - margin
                self._c[sk] = [owner, rule_id, d, expires, due]
                heapq.heappush(self._ends, (due, sk))
                self._of.setdefault(owner, {})[sk] = None
                self._at.setdefault((sk[0], sk[3], sk[4]), {})[sk] = None
            else:
                c[2] |= d
                if expires > c[3]:
                    c[3] = expires
            if want_keys:
                keys.append((sk, d))
        return installed, failed, keys

    def due_now(self, now, margin, limit=-1):
        out = []
        ends = self._ends
        work = 4 * limit if limit >= 0 else -1
        while ends and now >= ends[0][0] and work != 0 and (limit < 0 or len(out) < limit):
            if work > 0:
                work -= 1
            due, sk = heapq.heappop(ends)
            c = self._c.get(sk)
            if c is None or c[4] != due:
                continue
            end = c[3] - margin
            if now >= end:
                out.append(sk)
            else:
                c[4] = end
                heapq.heappush(ends, (end, sk))
        return out

    @property
    def next_due(self):
        return self._ends[0][0] if self._ends else float("inf")

    def extend(self, sk, owner, until):
        c = self._c.get(sk)
        if c is None:
            return 0
        if c[0] != owner:
            return -1
        if until > c[3]:
            c[3] = until
        return 1

    def remove(self, sk):
        c = self._c.pop(sk, None)
        if c is None:
            return None
        of = self._of[c[0]]
        del of[sk]
        if not of:
            del self._of[c[0]]
        k = (sk[0], sk[3], sk[4])
        del self._at[k][sk]
        if not self._at[k]:
            del self._at[k]
        return Clone(c)

    def get(self, sk, default=None):
        c = self._c.get(sk)
        return default if c is None else Clone(c)

    def __getitem__(self, sk):
        return Clone(self._c[sk])

    def __contains__(self, sk):
        return sk in self._c

    def __len__(self):
        return len(self._c)

    def __bool__(self):
        return bool(self._c)

    def at(self, proto, eaddr, eport):
        return [(sk, Clone(self._c[sk])) for sk in self._at.get((proto, eaddr, eport), ())]

    def of_owner(self, owner):
        return [(sk, Clone(self._c[sk])) for sk in self._of.get(owner, ())]

    def owners(self):
        return {o: len(d) for o, d in self._of.items()}

    def timers(self):
        return [(d, sk) for d, sk in self._ends if sk in self._c]

    def items(self):
        self.walks += 1
        return [(sk, Clone(c)) for sk, c in self._c.items()]

    def keys(self):
        return [sk for sk, _ in self.items()]

    def values(self):
        return [c for _, c in self.items()]

    def __iter__(self):
        return iter(self.keys())


# ---------------------------------------------------------------------------------------
# Fetch serving: the reference of ``hypernat._serve.serve_fetches``
# ---------------------------------------------------------------------------------------
def serve_fetches(recs, serve_rows, tick, nic, lease_ms):
    """See ``hypernat._serve.serve_fetches``."""
    import numpy as np

    from . import messages as M

    lookup_only = M.FETCH_F_ICMP_ERROR | M.FETCH_F_REVALIDATE
    recs = np.asarray(recs, M.KEY_DTYPE)
    rows = []
    for seq, _, proto, kind, _, flags, ia, ea, ra, ip, ep, rp, _ in M.KEY_STRUCT.iter_unpack(recs.tobytes()):
        k = layout.KIND_ICMP_ERROR if flags & lookup_only else 0
        if kind == M.FETCH_BY_EXTERNAL:
            rows.append((1, ra, ea, rp, ep, proto, k, 0, 0))  # verdicts.IN: (p, R, Rp, E, Ep)
        else:
            rows.append((0, ia, ra, ip, rp, proto, k, 0, 0))  # verdicts.OUT: (p, I, Ip, R, Rp)
    res = serve_rows(rows, tick)
    out, sks, bad, bad_status = [], [], [], []
    for x, (st, s) in enumerate(res):
        if st != 0:
            bad.append(x)
            bad_status.append(st)
            continue
        ia, ea, ra, ip, ep, rp, proto, _, rid, _, t_out, t_in = s[:12]
        out.append((int(recs["seq"][x]), rid, lease_ms, ia, ea, ra, ip, ep, rp, nic, proto, t_out | t_in, 0))
        sks.append((proto, ia, ip, ea, ep, ra, rp))
    return np.array(out, M.RULE_DTYPE), sks, bad, bad_status
