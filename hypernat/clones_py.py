"""Clone install in plain Python: the readable reference of ``hypernat/_clones.pyx``
(same arguments, same results; used when the extensions are not built, and checked
against the compiled one by ``tests/test_clones_twins.py``)."""
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
