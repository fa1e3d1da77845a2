#!/usr/bin/env python3
"""Soak: the testbed under a steady stream of new and closing connections.

    vpc: hosts h0..hN-1 ══ECMP══ [gw: hypernat-coord, hypernat-nic 0, hypernat-nic 1] ══ECMP══ inet
         `rate` new connections a second (TCP: connect, a line echoed, close;       TCP + UDP echo
         UDP: a datagram echoed), from the ACTIVE hosts: a window of `active`      servers: note the
         hosts that moves on every `slot` seconds, so every host goes idle, its    source endpoint
         mappings expire, its port block is released, waits out the reuse delay
         and is handed to another host: the pool cycles

The gateway runs conf/testbed.yaml cut down so that it cycles within minutes: one
external address, `blocks` port blocks of 64 ports (half per NIC), at most four blocks a
host, UDP and transitory-TCP timeouts of 2 s, a reuse delay of 5 s, the block journal
compacted into a checkpoint past 16 kB (where the journal has checkpoints).  Every `interval`
seconds one line: connections/s (and failures), RSS and open fds of each daemon,
journal bytes of each NIC, flow-table occupancy, and the drops of the interval by
reason (fast-path drop verdicts, slow-path reasons, loop and port drops).  At the end
a summary: each figure's growth per hour (least-squares slope over the samples after
the first full rotation of hosts), drops per hour by reason, and how many port blocks
served more than one host (the pool cycled).

    make soak SOAK_DURATION=900 SOAK_RATE=40 SOAK_HOSTS=24       (as root; not in CI)
    python tools/soak.py --duration 900 --rate 40 --hosts 24 [--json out.json]
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import glob
import ipaddress
import json
import os
import socket
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import yaml  # noqa: E402

from hypernat import config as cfgmod  # noqa: E402
from hypernat.io.base import TX_COUNTERS  # noqa: E402
from hypernat.lab import cli, netns  # noqa: E402
from hypernat.lab.topology import Addressing, Topology  # noqa: E402
from hypernat.nic.worker import LOOP_COUNTERS  # noqa: E402
from hypernat.partition import Partition  # noqa: E402
from hypernat.verdicts import DIRECTION_NAMES, SLOW_PATH_REASON_NAMES, VERDICT_NAMES  # noqa: E402

CONF = os.path.join(ROOT, "conf", "testbed.yaml")
TCP_PORT, UDP_PORT = 5401, 5402
CONN_TIMEOUT = 2.0  # a connection answered later than this counts as late, not ok
LATE_TIMEOUT = 6.0  # ... and one not answered by this, as failed (its whole life, at most)
BLOCK = 64
JOURNAL_LOG_BYTES = 16384

# Drops by reason, from the names the components declare (verdicts.py, the loop's and the
# ports' counters): the fast path's malformed/unforwardable verdicts, every slow-path
# reason, the loop's drops, the ports' refusals and losses.
FAST_DROPS = [f"fastpath_{d}_{v}" for d in DIRECTION_NAMES for v in VERDICT_NAMES
              if v.startswith("drop_") or v in ("fragment", "ttl_exceeded")]
SLOW_DROPS = [f"rules_{r}" for r in SLOW_PATH_REASON_NAMES]
LOOP_DROPS = [f"loop_{k}" for k in LOOP_COUNTERS if "drop" in k or k.endswith("errors")]
PORT_DROPS = [k for k in TX_COUNTERS if k not in ("tx_frames", "tx_bytes", "tx_kicks")] + \
             ["rx_truncated", "rx_csum_partial", "kernel_rx_drops"]


def soak_config(path_out: str, blocks: int) -> str:
    """conf/testbed.yaml with a pool that cycles in minutes (see the module doc)."""
    with open(CONF) as f:
        doc = yaml.safe_load(f)
    first = str(ipaddress.ip_network(doc["external"]["pool"][0])[0])
    doc["external"] = {"pool": [f"{first}/32"], "ports": [1024, 1024 + BLOCK * blocks - 1]}
    doc["timeouts"] = {"udp": 2, "tcp_established": 60, "tcp_transitory": 2, "icmp": 2, "reuse_delay": 5,
                       "force": True}
    doc["limits"] = dict(doc.get("limits") or {}, ports_per_host=4 * BLOCK, port_block_size=BLOCK)
    if "journal_log_bytes" in {f.name for f in dataclasses.fields(cfgmod.Limits)}:
        # compacted into a checkpoint every few minutes here, so a soak shows the bound
        doc["limits"]["journal_log_bytes"] = JOURNAL_LOG_BYTES
    with open(path_out, "w") as f:
        yaml.safe_dump(doc, f)
    cfgmod.load(path_out)  # refused here, naming the key, if the cut-down config is wrong
    return path_out


# -- the daemons, seen from outside -------------------------------------------------------
def proc_figures(pid: int) -> tuple:
    """(RSS in MB, open fds) of a process; (nan, nan) once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            rss = next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS:")) / 1024
        return rss, len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, StopIteration):
        return float("nan"), float("nan")


def journal_bytes(topo, k: int) -> int:
    return sum(os.path.getsize(p) for p in glob.glob(os.path.join(topo.run_dir(), f"nic{k}", "blocks.journal*"))
               if os.path.isfile(p))


def nic_gauges(topo, k: int, cfg) -> dict:
    """NIC k's gauges from its metrics endpoint (on gw's loopback)."""
    from prometheus_client.parser import text_string_to_metric_families

    host = cfg.metrics.address if cfg.metrics.address not in ("0.0.0.0", "") else "127.0.0.1"
    s = netns.ns_socket(topo.gw, socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.settimeout(2.0)
        s.connect((host, cfg.metrics.port + 1 + k))
        s.sendall(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        data = b""
        while len(data) < (8 << 20):  # bounded: the socket times out, the size is capped
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    except OSError:
        return {}
    finally:
        s.close()
    body = data.split(b"\r\n\r\n", 1)[-1].decode(errors="replace")
    out = {}
    for fam in text_string_to_metric_families(body):
        if fam.name == "hypernat_nic_gauge":
            for smp in fam.samples:
                out[smp.labels["name"]] = smp.value
    return out


def drops_of(counters: dict) -> dict:
    """{reason: count} of one NIC's counters (names as in NicWorker.counters_dict)."""
    out = {}
    for k in FAST_DROPS + SLOW_DROPS + LOOP_DROPS:
        if counters.get(k):
            out[k] = counters[k]
    for k, v in counters.items():
        if k.startswith("port_") and v and any(k.endswith("_" + d) for d in PORT_DROPS):
            out[k] = v
    return out


def sample(topo, cfg) -> dict:
    """Every figure at one instant (run in a thread: it blocks for a few ms)."""
    from hypernat.coord.ctl import CtlClient, CtlError

    names = ["coord"] + [f"nic{k}" for k in range(topo.nics)]
    s = {"t": time.monotonic(), "rss_mb": {}, "fds": {}, "journal_bytes": {}, "table": {}, "drops": {},
         "slow_turns": {}}
    for name, pid in zip(names, topo.pids):
        s["rss_mb"][name], s["fds"][name] = proc_figures(pid)
    try:
        with CtlClient(topo.endpoint, timeout=2.0) as c:
            per_nic = (c.query("counters") or {}).get("per_nic", {})
    except CtlError:
        per_nic = {}
    for k in range(topo.nics):
        s["journal_bytes"][f"nic{k}"] = journal_bytes(topo, k)
        g = nic_gauges(topo, k, cfg)
        s["table"][f"nic{k}"] = g.get("out_entries", float("nan")) + g.get("in_entries", float("nan"))
        s["slow_turns"][f"nic{k}"] = per_nic.get(f"nic{k}", {}).get("loop_slow_turns", 0)
        for r, v in drops_of(per_nic.get(f"nic{k}", {})).items():
            s["drops"][f"nic{k}:{r}"] = v
    return s


# -- the traffic ---------------------------------------------------------------------------
class Servers:
    """TCP and UDP echo in inet; each notes the endpoint it saw for each host."""

    def __init__(self, topo, part):
        self.topo, self.part = topo, part
        self.blocks = collections.defaultdict(set)  # (ext address, block) -> hosts seen on it

    def _note(self, first: bytes, peer) -> None:
        try:
            host = int(first.split(b" ", 1)[0][1:])
        except ValueError:
            return
        self.blocks[self.part.block_of(int(ipaddress.IPv4Address(peer[0])), peer[1])].add(host)

    async def start(self):
        t = self.topo
        ls = netns.ns_socket(t.inet, socket.AF_INET, socket.SOCK_STREAM)
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind((t.addr.server(0), TCP_PORT))
        ls.listen(1024)
        ls.setblocking(False)
        self.tcp = await asyncio.start_server(self._tcp, sock=ls)
        self.udp = netns.ns_socket(t.inet, socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind((t.addr.server(0), UDP_PORT))
        self.udp.setblocking(False)
        asyncio.get_running_loop().add_reader(self.udp.fileno(), self._udp)
        return self

    async def _tcp(self, r, w):
        try:
            line = await asyncio.wait_for(r.readline(), CONN_TIMEOUT)
            self._note(line, w.get_extra_info("peername"))
            w.write(line)
            await w.drain()
            await asyncio.wait_for(r.read(), CONN_TIMEOUT)  # the client's FIN
        except (ConnectionError, asyncio.TimeoutError):
            pass
        finally:
            w.close()

    def _udp(self):
        for _ in range(1024):  # per wake-up
            try:
                data, peer = self.udp.recvfrom(2048)
            except BlockingIOError:
                return
            self._note(data, peer)
            self.udp.sendto(data, peer)

    def close(self):
        asyncio.get_running_loop().remove_reader(self.udp.fileno())
        self.udp.close()
        self.tcp.close()


async def one_tcp(topo, host: int, i: int) -> None:
    loop = asyncio.get_running_loop()
    s = netns.ns_socket(topo.vpc, socket.AF_INET, socket.SOCK_STREAM)
    s.setblocking(False)
    w = None
    try:
        s.bind((topo.addr.host(host), 0))
        await loop.sock_connect(s, (topo.addr.server(0), TCP_PORT))
        r, w = await asyncio.open_connection(sock=s)
        msg = f"h{host} c{i} tcp\n".encode()
        w.write(msg)
        await w.drain()
        if await r.readline() != msg:
            raise ConnectionError("echo differs")
    finally:
        if w is not None:
            w.close()
        else:
            s.close()


async def one_udp(topo, host: int, i: int) -> None:
    loop = asyncio.get_running_loop()
    s = netns.ns_socket(topo.vpc, socket.AF_INET, socket.SOCK_DGRAM)
    s.setblocking(False)
    try:
        s.bind((topo.addr.host(host), 0))
        msg = f"h{host} c{i} udp".encode()
        await loop.sock_sendto(s, msg, (topo.addr.server(0), UDP_PORT))
        if await loop.sock_recv(s, 2048) != msg:
            raise ConnectionError("echo differs")
    finally:
        s.close()


class Stream:
    """`rate` connections a second from the active window of hosts."""

    def __init__(self, topo, args):
        self.topo, self.a = topo, args
        self.ok = collections.Counter()
        self.late = collections.Counter()  # answered, but after CONN_TIMEOUT (a stall somewhere)
        self.failed = collections.Counter()
        self.tasks = set()
        self.skipped = 0

    def active(self, t: float) -> list:
        slot = int(t // self.a.slot)
        return [(slot * self.a.active + j) % self.a.hosts for j in range(self.a.active)]

    async def _one(self, kind, host, i):
        t0 = time.monotonic()
        try:
            await asyncio.wait_for((one_tcp if kind == "tcp" else one_udp)(self.topo, host, i), LATE_TIMEOUT)
        except (OSError, asyncio.TimeoutError) as exc:
            self.failed[f"{kind}_{type(exc).__name__}"] += 1
            return
        (self.ok if time.monotonic() - t0 <= CONN_TIMEOUT else self.late)[kind] += 1

    async def run(self, end: float) -> None:
        t0 = time.monotonic()
        period = 1.0 / self.a.rate
        due, i = t0, 0
        while time.monotonic() < end:
            now = time.monotonic()
            if due > now:
                await asyncio.sleep(due - now)
            elif now - due > 1.0:  # fell behind (a loaded host): no burst to catch up
                due = now
            due += period
            hosts = self.active(time.monotonic() - t0)
            kind = "udp" if int((i + 1) * self.a.udp_share) > int(i * self.a.udp_share) else "tcp"
            if len(self.tasks) >= self.a.rate * LATE_TIMEOUT * 2:  # bounded: never pile up
                self.skipped += 1
            else:
                t = asyncio.ensure_future(self._one(kind, hosts[i % len(hosts)], i))
                self.tasks.add(t)
                t.add_done_callback(self.tasks.discard)
            i += 1
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=LATE_TIMEOUT + 1)


# -- report --------------------------------------------------------------------------------
def per_hour(ts, ys) -> float:
    """Least-squares slope of ys over ts (seconds), per hour; nan with < 2 finite points."""
    ts, ys = np.asarray(ts, float), np.asarray(ys, float)
    ok = np.isfinite(ys)
    if ok.sum() < 2 or np.ptp(ts[ok]) == 0:
        return float("nan")
    return float(np.polyfit(ts[ok], ys[ok], 1)[0] * 3600)


def line(s, prev, cps, late, failed) -> str:
    def fmt(d, f="{:.1f}"):
        return " ".join(f"{k} " + f.format(v) for k, v in d.items())

    drops = {k: v - prev["drops"].get(k, 0) for k, v in s["drops"].items() if v - prev["drops"].get(k, 0)}
    slow = sum(s["slow_turns"].values()) - sum(prev["slow_turns"].values())
    return (f"{s['t_rel']:6.0f}s  conn/s {cps:5.1f} (late {late}, failed {failed})  RSS MB {fmt(s['rss_mb'])}  "
            f"fds {fmt(s['fds'], '{:.0f}')}  journal B {fmt(s['journal_bytes'], '{:.0f}')}  "
            f"table {fmt(s['table'], '{:.0f}')}  slow turns {slow}  drops {json.dumps(drops) if drops else '-'}")


def summary(samples, warm: float, servers, stream, args) -> dict:
    after = [s for s in samples if s["t_rel"] >= warm] or samples
    ts = [s["t_rel"] for s in after]
    out = {"duration_s": round(samples[-1]["t_rel"], 1) if samples else 0, "warmup_s": warm,
           "rate_asked": args.rate, "hosts": args.hosts, "active": args.active, "slot_s": args.slot,
           "connections_ok": dict(stream.ok), "connections_late": dict(stream.late),
           "connections_failed": dict(stream.failed),
           "skipped_not_started": stream.skipped}
    elapsed = max(1e-9, samples[-1]["t_rel"]) if samples else 1
    out["connections_per_s"] = round(sum(stream.ok.values()) / elapsed, 1)
    out["slow_turns"] = {k: v for k, v in samples[-1]["slow_turns"].items()} if samples else {}
    growth = {}
    third = max(1, len(after) // 3)
    span = (ts[-1] - ts[0]) * 2 / 3 if len(ts) > 1 else 0
    for fig in ("rss_mb", "fds", "journal_bytes", "table"):
        for name in after[0][fig] if after else ():
            ys = [s[fig][name] for s in after]
            # a sawtooth (the journal compacted into checkpoints) has a meaningless slope:
            # the peaks of the first and last thirds tell whether it grows
            peak_growth = (np.nanmax(ys[-third:]) - np.nanmax(ys[:third])) * 3600 / span if span else float("nan")
            growth[f"{fig}.{name}"] = {"first": round(ys[0], 1), "last": round(ys[-1], 1),
                                       "max": round(float(np.nanmax(ys)), 1),
                                       "per_hour": round(per_hour(ts, ys), 2),
                                       "peak_per_hour": round(float(peak_growth), 2)}
    out["growth"] = growth
    cps = [s["cps"] for s in after]
    out["growth"]["connections_per_s"] = {"mean": round(float(np.mean(cps)), 1) if cps else None,
                                          "per_hour": round(per_hour(ts, cps), 2)}
    last = samples[-1]["drops"] if samples else {}
    first = samples[0]["drops"] if samples else {}
    out["drops_total"] = {k: v for k, v in last.items() if v}
    out["drops_per_hour"] = {k: round((v - first.get(k, 0)) * 3600 / elapsed, 1) for k, v in last.items()
                             if v - first.get(k, 0)}
    reused = [b for b, hosts in servers.blocks.items() if len(hosts) > 1]
    out["pool"] = {"blocks_seen": len(servers.blocks), "blocks_used_by_several_hosts": len(reused),
                   "blocks_in_pool": args.blocks}
    return out


async def soak(topo, cfg, args) -> dict:
    loop = asyncio.get_running_loop()
    servers = await Servers(topo, Partition.from_config(cfg)).start()
    stream = Stream(topo, args)
    t0 = time.monotonic()
    end = t0 + args.duration
    gen = asyncio.ensure_future(stream.run(end))
    samples = []
    prev = await loop.run_in_executor(None, sample, topo, cfg)
    prev.update(t_rel=0.0, cps=0.0)
    samples.append(prev)
    ok_prev = late_prev = failed_prev = 0
    print(f"soak: {args.duration:g} s, {args.rate:g} connections/s ({args.udp_share:.0%} UDP) from {args.active} "
          f"of {args.hosts} hosts, window moving every {args.slot:g} s; pool {args.blocks} blocks of {BLOCK} ports",
          flush=True)
    try:
        k = 1
        while t0 + k * args.interval <= end + 0.5:
            await asyncio.sleep(max(0.0, t0 + k * args.interval - time.monotonic()))
            k += 1
            if gen.done():
                gen.result()  # the stream failed: say why
            s = await loop.run_in_executor(None, sample, topo, cfg)
            ok, failed = sum(stream.ok.values()), sum(stream.failed.values())
            late = sum(stream.late.values())
            s.update(t_rel=s["t"] - t0, cps=(ok - ok_prev) / max(1e-9, s["t"] - prev["t"]))
            print(line(s, prev, s["cps"], late - late_prev, failed - failed_prev), flush=True)
            samples.append(s)
            prev, ok_prev, late_prev, failed_prev = s, ok, late, failed
        await asyncio.wait_for(gen, LATE_TIMEOUT + 10)
    finally:
        gen.cancel()
        servers.close()
    warm = min(args.duration / 2, args.hosts / args.active * args.slot + 10)  # one rotation + expiry + reuse
    res = summary(samples, warm, servers, stream, args)
    res["samples"] = [{k: v for k, v in s.items() if k != "t"} for s in samples]
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--duration", type=float, default=300, help="seconds (default 300)")
    ap.add_argument("--rate", type=float, default=40, help="new connections a second (default 40)")
    ap.add_argument("--hosts", type=int, default=24, help="vpc hosts taking turns (default 24)")
    ap.add_argument("--active", type=int, default=4, help="hosts active at a time (default 4)")
    ap.add_argument("--slot", type=float, default=10, help="seconds before the window moves on (default 10)")
    ap.add_argument("--udp-share", type=float, default=0.5, help="share of UDP connections (default 0.5)")
    ap.add_argument("--blocks", type=int, default=32, help="port blocks in the pool, half per NIC (default 32)")
    ap.add_argument("--interval", type=float, default=10, help="seconds between report lines (default 10)")
    ap.add_argument("--tag", default=f"soak{os.getpid()}", help="testbed tag (namespaces hn-<tag>-*)")
    ap.add_argument("--json", help="write the summary and every sample here")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        ap.error("needs root (network namespaces)")
    if not (0 < args.active <= args.hosts and args.rate > 0 and 0 <= args.udp_share <= 1 and args.blocks >= 2):
        ap.error("need 0 < active <= hosts, rate > 0, 0 <= udp-share <= 1, blocks >= 2")
    addr = Addressing.from_config(CONF)
    addr.hosts = args.hosts
    topo = Topology(tag=args.tag, nics=2, mode="hypernat", addr=addr)
    try:
        topo.up()
        os.makedirs(topo.run_dir(), exist_ok=True)
        path = soak_config(os.path.join(topo.run_dir(), "soak.yaml"), args.blocks)
        cli.start_gateway(topo, path)
        res = asyncio.run(soak(topo, cfgmod.load(path), args))
    finally:
        topo.down()
    print(json.dumps({k: v for k, v in res.items() if k != "samples"}, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
