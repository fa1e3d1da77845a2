"""Per-host rate of new connections (issue 11, "Bad input"): one internal host opening
connections as fast as it can is held to limits.host_connection_rate; the others are
not affected; established sessions are not counted; a bad value names its key."""
import pytest

from hypernat import config
from hypernat.rules import ACT_DROP, ACT_REPLAY, REASON
from hypernat.verdicts import OUT
from test_rules import TCP, UDP, R1, R2, SYN, make_cfg, make_rb, hosts_of, miss

from nat_model import HostRateModel

from hypernat.nat import _rate as rate_mod  # noqa: E402


def test_runaway_host_is_held_to_its_rate_others_are_not():
    cfg = make_cfg(1, pool="198.18.77.0/28", limits={"host_connection_rate": 10, "host_connection_burst": 20})
    rb = make_rb(cfg)
    a, b = hosts_of(rb, 2)
    flood = [(TCP, a, 2000 + i, R1, 80, SYN) for i in range(50)]
    d = miss(rb, OUT, flood, 100)
    assert (d.action == ACT_REPLAY).sum() == 20  # the burst
    assert (d.reason[d.action == ACT_DROP] == REASON["host_rate_limited"]).all()
    assert rb.counters_dict()["host_rate_limited"] == 30
    # another host at the same moment: all admitted
    assert (miss(rb, OUT, [(UDP, b, 3000 + i, R2, 53) for i in range(15)], 100).action == ACT_REPLAY).all()
    # the admitted sessions' packets are no new connections (and are not refused)
    assert (miss(rb, OUT, flood[:20], 100).action == ACT_REPLAY).all()
    # one second later: `rate` more
    d = miss(rb, OUT, [(TCP, a, 4000 + i, R1, 80, SYN) for i in range(50)], 101)
    assert (d.action == ACT_REPLAY).sum() == 10
    assert rb.counters_dict()["host_rate_limited"] == 70


def test_off_by_default():
    rb = make_rb(make_cfg(1, pool="198.18.77.0/28"))
    (a,) = hosts_of(rb, 1)
    assert (miss(rb, OUT, [(UDP, a, 2000 + i, R1, 53) for i in range(300)], 100).action == ACT_REPLAY).all()
    assert rb.counters_dict()["host_rate_limited"] == 0


def test_bad_rate_names_the_key():
    with pytest.raises(config.ConfigError) as e:
        make_cfg(1, limits={"host_connection_rate": -1})
    assert "limits.host_connection_rate" in str(e.value)


def test_bucket_matches_model():
    """The compiled bucket against tests/nat_model.py (hosts fit the table: no eviction)."""
    import random

    rng = random.Random(5)
    c, m = rate_mod.HostRate(3, 7), HostRateModel(3, 7)
    now = 0
    for _ in range(3000):
        now += rng.choice([0, 0, 0, 1, 2])
        h = rng.randrange(1, 40)
        assert c.take(h, now) == m.take(h, now)


def test_rate_is_a_live_setting():
    """A reload turns the limit on (and off) without a restart: the worker takes
    RuleBuilder.LIVE_SETTINGS through apply_live."""
    from hypernat.rules import RuleBuilder

    assert {"limits.host_connection_rate", "limits.host_connection_burst"} <= set(RuleBuilder.LIVE_SETTINGS)
    rb = make_rb(make_cfg(1, pool="198.18.77.0/28"))
    (a,) = hosts_of(rb, 1)
    rb.apply_live(make_cfg(1, pool="198.18.77.0/28", limits={"host_connection_rate": 5}))
    d = miss(rb, OUT, [(UDP, a, 2000 + i, R1, 53) for i in range(12)], 100)
    assert (d.action == ACT_REPLAY).sum() == 5  # burst 0: one second's worth
    rb.apply_live(make_cfg(1, pool="198.18.77.0/28"))
    assert (miss(rb, OUT, [(UDP, a, 3000 + i, R1, 53) for i in range(12)], 100).action == ACT_REPLAY).all()


def test_inside_flood_through_a_nic_worker(tmp_path):
    """A NIC worker with real frames: a host flooding new flows gets its rate, the other
    host all its flows, and the refusals are counted and exported as metrics."""
    from prometheus_client import generate_latest

    from hypernat.io.memory import MemoryPort
    from hypernat.lab.emulated import UDP as EUDP, build_frame, emulated_config
    from hypernat.nic.metrics import registry_for
    from hypernat.nic.worker import NicWorker, spin

    cfg = emulated_config(1, limits={"host_connection_rate": 10, "host_connection_burst": 10})
    inside, outside = MemoryPort("in0"), MemoryPort("out0")
    w = NicWorker(cfg, 0, inside, outside, state_dir=str(tmp_path / "nic0"), standalone=True)
    try:
        flooder, other, r = 0x0A00000A, 0x0A00000B, 0xC0000205
        inside.inject([build_frame(EUDP, flooder, 20000 + i, r, 53) for i in range(100)])
        inside.inject([build_frame(EUDP, other, 30000 + i, r, 53) for i in range(5)])
        spin([w], lambda: w.counters_dict().get("rules_host_rate_limited", 0) >= 90 and len(outside._tx) >= 15, 5)
        assert len(outside._tx) == 15  # the flooder's burst and all of the other host's flows
        assert w.counters_dict()["rules_host_rate_limited"] == 90
        assert "host_rate_limited" in generate_latest(registry_for(w)).decode()
    finally:
        w.close()
