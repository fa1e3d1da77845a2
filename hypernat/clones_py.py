"""Clone install in plain Python: the readable reference of ``hypernat/_clones.pyx``
(same arguments, same results; used when the extensions are not built, and checked
against the compiled one by ``tests/test_clones_twins.py``)."""
import heapq

import numpy as np

from . import layout
from .nat.records import WIRE_KEY_FIELDS

_P_ICMP, _P_TCP, _P_UDP = 1, 6, 17
_D_OUT, _D_IN = 1, 2  # rules.DIR_BIT_OUT, rules.DIR_BIT_IN


# The fields a clone needs, by the names of SESSION_DTYPE or of the wire RULE layout
# (messages.RULE_DTYPE: RULE, PUSH); tcp_out / tcp_in may be absent (read as 0).
_FIELDS = (("proto",), ("iaddr", "int_addr"), ("iport", "int_port"), ("eaddr", "ext_addr"),
           ("eport", "ext_port"), ("raddr", "rem_addr"), ("rport", "rem_port"), ("rule_id",),
           ("tcp_out",), ("tcp_in",))
_WIDTHS = (1, 4, 2, 4, 2, 4, 2, 4, 1, 1)
_REQUIRED = 8
_OFFSETS: dict = {}


def record_fields(dtype) -> tuple:
    """The byte offsets of proto, iaddr, iport, eaddr, eport, raddr, rport, rule_id,
    tcp_out, tcp_in in records of `dtype` (-1: absent, read as 0).  A dtype without one
    of the first eight, or with one of another width, is a TypeError."""
    got = _OFFSETS.get(dtype)
    if got is not None:
        return got
    fields = dtype.fields or {}
    offs = []
    for k, (names, width) in enumerate(zip(_FIELDS, _WIDTHS)):
        name = next((f for f in names if f in fields), None)
        if name is None:
            if k < _REQUIRED:
                raise TypeError(f"clone records need a field {' or '.join(names)}: {dtype}")
            offs.append(-1)
            continue
        ft, off = fields[name][:2]
        if ft.kind != "u" or ft.itemsize != width or (width > 1 and ft.byteorder == ">"):
            raise TypeError(f"clone record field {name} must be a {width}-byte unsigned integer: {dtype}")
        offs.append(off)
    _OFFSETS[dtype] = got = tuple(offs)
    return got


def _columns(recs) -> list:
    """The fields of ``record_fields`` as lists (absent ones: zeros)."""
    fields = recs.dtype.fields
    return [recs[next(f for f in names if f in fields)].tolist() if any(f in fields for f in names)
            else [0] * len(recs) for names in _FIELDS]


def _sessions(recs) -> list:
    """The session identities (proto, I, Ip, E, Ep, R, Rp) of records of any layout
    ``record_fields`` reads."""
    record_fields(recs.dtype)
    return list(zip(*_columns(recs)[:7]))


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


def _selection(idx, n) -> list:
    if idx is None:
        return list(range(n))
    sel = np.asarray(idx, dtype=np.int64).reshape(-1).tolist()
    if any(x < 0 or x >= n for x in sel):
        raise IndexError(f"record index out of range 0..{n - 1}")
    return sel


def _per_record(v, n, dtype) -> list:
    return np.broadcast_to(np.asarray(v, dtype=dtype), (n,)).tolist()


def install_records(out, inn, recs, idx, dirs, own, me, now, lease):
    """See ``hypernat._clones.install_records``: ``(got, bad, full)``."""
    record_fields(recs.dtype)
    now = int(now) & 0xFFFFFFFF
    lease = int(lease) & 0xFFFF
    n = len(recs)
    sel = _selection(idx, n)
    dirs = _per_record(dirs, n, np.uint8)
    own = _per_record(own, n, np.int64)
    cols = _columns(recs)
    got = [0] * len(sel)
    bad = full = 0
    for k, x in enumerate(sel):
        p, i, ip, e, ep, r, rp, rid, to, ti = (c[x] for c in cols)
        d = dirs[x]
        if p not in (_P_TCP, _P_UDP, _P_ICMP) or own[x] == me:
            bad += 1
            continue
        puts = []
        if d & _D_OUT:
            puts.append((out, (p, i, ip, r, ip if p == _P_ICMP else rp), e, ep, to))
        if d & _D_IN:
            puts.append((inn, (p, r, ep if p == _P_ICMP else rp, e, ep), i, ip, ti))
        for t, key, na, np_, tcp in puts:
            k2 = _put(t, key, na, np_, rid, now, tcp & layout.TCP_STATE_MASK, lease)
            if k2 > 0:
                got[k] += 1
            elif k2 == 0:
                bad += 1
            else:
                full += 1
    return np.array(got, np.int8), bad, full


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

    def install(self, owner, recs, idx, dirs, now, margin, install):
        """See ``hypernat._clones.CloneTable.install``: (installed, failed, done)."""
        from . import messages as M

        n = len(recs)
        if n and recs.dtype.itemsize != M.RULE_DTYPE.itemsize:
            raise TypeError(f"clone records must have the RULE layout, not {recs.dtype}")
        sel = _selection(idx, n)
        dl = _per_record(dirs, n, np.uint8)
        cols = [recs[f].tolist() for f in WIRE_KEY_FIELDS + ("rule_id", "lease_ms")] if n else [[]] * 9
        todo, exp = [], []
        for x in sel:
            p, i, ip, e, ep, r, rp, _, lease_ms = (c[x] for c in cols)
            sk, d = (p, i, ip, e, ep, r, rp), dl[x]
            expires = now + lease_ms / 1000.0
            c = self._c.get(sk)
            if c is not None and c[0] == owner and (c[2] & d) == d:
                if expires > c[3]:
                    c[3] = expires
                continue
            todo.append(x)
            exp.append(expires)
        if not todo:
            return 0, 0, np.zeros(0, np.int64)
        d_arg = dirs if np.ndim(dirs) == 0 else np.array(dl, np.uint8)
        got = np.asarray(install(recs, np.array(todo, np.int64), d_arg)).tolist()
        if len(got) != len(todo):
            raise ValueError(f"install answered {len(got)} records of {len(todo)}")
        installed = failed = 0
        done = []
        for x, expires, ok in zip(todo, exp, got):
            if ok <= 0:
                failed += 1
                continue
            installed += 1
            done.append(x)
            p, i, ip, e, ep, r, rp, rule_id, _ = (c[x] for c in cols)
            sk, d = (p, i, ip, e, ep, r, rp), dl[x]
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
        return installed, failed, np.array(done, np.int64)

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

    def _of_entry(self, sk, d):
        """See ``hypernat._clones.CloneTable.of_entry``: the clone's identity or None."""
        c = self._c.get(sk)
        if c is not None and (c[2] & d or not d):
            return sk
        head = sk[:6]
        for k in reversed(self._at.get((sk[0], sk[3], sk[4]), {})):  # the compiled list: newest first
            c = self._c[k]
            if k[:6] == head and (c[2] & d or not d):
                return k
        return None

    def activity(self, act, tick):
        """See ``hypernat._clones.CloneTable.activity``: (ACTIVITY records, groups)."""
        from . import messages as M

        merged = {}  # clone identity -> [owner, rule_id, last_seen, tcp_out, tcp_in], first seen first
        cols = [act[f].tolist() for f in ("proto", "iaddr", "iport", "eaddr", "eport", "raddr", "rport", "dirs",
                                          "rule_id", "last_seen", "tcp_out", "tcp_in")]
        for p, i, ip, e, ep, r, rp, d, rid, ls, to, ti in zip(*cols):
            sk = self._of_entry((p, i, ip, e, ep, r, rp), d)
            if sk is None:
                continue
            m = merged.get(sk)
            if m is None:
                merged[sk] = [self._c[sk][0], rid, ls, to, ti]
            else:
                m[2], m[3], m[4] = max(m[2], ls), m[3] | to, m[4] | ti
        items = sorted(merged.items(), key=lambda kv: kv[1][0])  # stable: first seen within an owner
        out = np.zeros(len(items), M.ACTIVITY_DTYPE)
        groups = []
        for k, (sk, (owner, rid, ls, to, ti)) in enumerate(items):
            if not groups or groups[-1][0] != owner:
                groups.append([owner, k, 0])
            groups[-1][2] += 1
            for f, val in zip(WIRE_KEY_FIELDS, sk):
                out[f][k] = val
            out["rule_id"][k] = rid
            out["idle_ms"][k] = min(max((int(tick) - ls) * 1000, 0), 0xFFFFFFFF)
            out["tcp_out"][k], out["tcp_in"][k], out["tcp_flags"][k] = to, ti, to | ti
        return out, [tuple(g) for g in groups]

    def extend_records(self, recs, owner, now):
        """See ``hypernat._clones.CloneTable.extend_records``: (renewed, unknown, misdirected)."""
        from . import messages as M

        if len(recs) and recs.dtype.itemsize != M.RULE_DTYPE.itemsize:
            raise TypeError(f"lease records must have the RULE layout, not {recs.dtype}")
        got = [self.extend(sk, owner, now + lease_ms / 1000.0) for sk, lease_ms in zip(_sessions(recs),
                                                                                    recs["lease_ms"].tolist())]
        return got.count(1), got.count(0), got.count(-1)

    def owned_by(self, recs, owner):
        """See ``hypernat._clones.CloneTable.owned_by``: int8 per record."""
        out = []
        for sk in _sessions(recs):
            c = self._c.get(sk)
            out.append(0 if c is None else 1 if c[0] == owner else -1)
        return np.array(out, np.int8)

    def remove_records(self, recs, idx=None):
        """See ``hypernat._clones.CloneTable.remove_records``: SESSION_DTYPE of those held."""
        from .nat.records import SESSION_DTYPE

        sks = _sessions(recs)
        rows = []
        for x in _selection(idx, len(recs)):
            c = self.remove(sks[x])
            if c is not None:
                rows.append(sks[x] + (c.owner, c.rule_id, c.dirs))
        out = np.zeros(len(rows), SESSION_DTYPE)
        for f, col in zip(("proto", "iaddr", "iport", "eaddr", "eport", "raddr", "rport", "owner", "rule_id",
                           "dirs"), zip(*rows)):
            out[f] = col
        return out

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

    def owner_records(self, owner):
        """The clones of one owner's sessions as ACTIVITY records (identity and rule_id;
        seq, idle_ms and the TCP flags 0): a restart report."""
        from . import messages as M

        sks = list(self._of.get(owner, ()))
        out = np.zeros(len(sks), M.ACTIVITY_DTYPE)
        if sks:
            for f, col in zip(WIRE_KEY_FIELDS, zip(*sks)):
                out[f] = col
            out["rule_id"] = [self._c[sk][1] for sk in sks]
        return out

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
# Fetch serving: a plain-Python reference of ``RuleBuilder.serve_fetches``
# ---------------------------------------------------------------------------------------
def serve_fetches(recs, rules, now, lease_ms):
    """``RuleBuilder.serve_fetches`` over FETCH records `recs`, the reference (the oracle
    of the tests, no compiled loop): each record decided alone (one ``serve_fetches``
    call of `rules` each, in order), its key read back here from the record, and each
    answer's RULE record built here from the builder's public views -- the mapping
    (``maps.get``), both flow-table entries' TCP state (``out`` / ``inn``), this owner.
    Returns the same (RULE records, refused indices, their reason indices)."""
    import numpy as np

    from . import messages as M
    from .nat.records import PROTO_ICMP, in_key, out_key

    recs = np.asarray(recs, M.KEY_DTYPE)
    found, bad, bad_status = [], [], []
    for x, (seq, _, proto, kind, _, flags, ia, ea, ra, ip, ep, rp, _) in enumerate(
            M.KEY_STRUCT.iter_unpack(recs.tobytes())):
        rule, no, st = rules.serve_fetches(recs[x:x + 1], now, lease_ms)
        if len(no):
            bad.append(x)
            bad_status.append(int(st[0]))
        else:
            found.append((seq, int(rule["rule_id"][0]), ra, 0 if proto == PROTO_ICMP else rp))
    out = []
    for seq, rid, ra, rp in found:
        p, ia, ip, ea, ep, _ = rules.maps.get(rid)
        eo, ei = rules.out.get(*out_key(p, ia, ip, ra, rp)), rules.inn.get(*in_key(p, ra, rp, ea, ep))
        tcp = (0 if eo is None else int(eo["tcp_state"])) | (0 if ei is None else int(ei["tcp_state"]))
        out.append((seq, rid, lease_ms, ia, ea, ra, ip, ep, rp, rules.nic, p, tcp, 0))
    return np.array(out, M.RULE_DTYPE), np.array(bad, np.int64), np.array(bad_status, np.int32)
