"""A TCP ping-pong client and echo server in C, built at run time, for request/response
latency through the testbed (``benchmarks/bench_latency.py``).

Python's own socket calls cost some microseconds per exchange and their jitter would
sit on top of what is measured, so the timing loop is compiled (gcc, no dependency
beyond libc)::

    vpc: pingpong client ──TCP──► gateway ──► inet: pingpong server
         TCP_NODELAY, SIZE-byte request,         echoes SIZE bytes back, notes the
         waits for the SIZE-byte echo, checks    peer address it saw (the translated
         it byte for byte, CLOCK_MONOTONIC       source), exits after CONNS connections
         per exchange

* ``persist``: one connection, COUNT exchanges on it;
* ``conn``: a new connection per exchange (connect + request + echo + close), so
  each one is also a new session in the gateway.

Every wait is bounded: connect, send, receive and accept carry ``SO_SNDTIMEO`` /
``SO_RCVTIMEO`` (TIMEOUT_MS); a timeout or a wrong echo ends the program with a message
on stderr and exit status 1.  The client prints one line per measured exchange (its
round-trip time in nanoseconds) and ``done N`` last; the server prints ``listening``
once it listens, ``peer A.B.C.D`` whenever the peer address changes, and
``served conns=C exchanges=E`` when it is done.

    exe = pingpong.build()                                   # cached by source hash
    exe server 198.51.100.1 7001 64 1 2000                   (BIND PORT SIZE CONNS TIMEOUT_MS)
    exe client 10.77.0.1 198.51.100.1 7001 64 10000 persist 2000 100
                                     (SRC DST PORT SIZE COUNT MODE TIMEOUT_MS WARMUP)
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile

import numpy as np

from .deadline import Deadline

SOURCE = r"""
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static void die(const char *what, long i) {
    fprintf(stderr, "pingpong: %s (exchange %ld): %s\n", what, i, errno ? strerror(errno) : "-");
    exit(1);
}

static void timeouts(int fd, int ms) {
    struct timeval tv = {ms / 1000, (ms % 1000) * 1000};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
}

static int nodelay(int fd) {
    int one = 1;
    return setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

/* all of n bytes, or -1 (error, timeout) / 0 (EOF before the first byte) */
static long readn(int fd, unsigned char *b, long n) {
    long got = 0;
    while (got < n) {
        ssize_t r = recv(fd, b + got, n - got, 0);
        if (r == 0) return got == 0 ? 0 : -1;
        if (r < 0) { if (errno == EINTR) continue; return -1; }
        got += r;
    }
    return got;
}

static int writen(int fd, const unsigned char *b, long n) {
    long put = 0;
    while (put < n) {
        ssize_t r = send(fd, b + put, n - put, MSG_NOSIGNAL);
        if (r < 0) { if (errno == EINTR) continue; return -1; }
        put += r;
    }
    return 0;
}

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void addr(struct sockaddr_in *sa, const char *ip, int port) {
    memset(sa, 0, sizeof *sa);
    sa->sin_family = AF_INET;
    sa->sin_port = htons(port);
    if (inet_pton(AF_INET, ip, &sa->sin_addr) != 1) { errno = EINVAL; die("bad address", -1); }
}

static int server(const char *ip, int port, long size, long conns, int ms) {
    struct sockaddr_in sa, peer;
    unsigned char *buf = malloc(size);
    int one = 1, ls = socket(AF_INET, SOCK_STREAM, 0);
    long served = 0, exchanges = 0;
    char last[INET_ADDRSTRLEN] = "", cur[INET_ADDRSTRLEN];
    if (ls < 0 || !buf) die("socket", -1);
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    addr(&sa, ip, port);
    if (bind(ls, (struct sockaddr *)&sa, sizeof sa) < 0) die("bind", -1);
    if (listen(ls, 1024) < 0) die("listen", -1);
    timeouts(ls, ms);  /* bounds accept() too */
    printf("listening\n");
    fflush(stdout);
    while (served < conns) {
        socklen_t pl = sizeof peer;
        int fd = accept(ls, (struct sockaddr *)&peer, &pl);
        if (fd < 0) { if (errno == EINTR) continue; die("accept", exchanges); }
        timeouts(fd, ms);
        nodelay(fd);
        inet_ntop(AF_INET, &peer.sin_addr, cur, sizeof cur);
        if (strcmp(cur, last)) { printf("peer %s\n", cur); strcpy(last, cur); }
        for (;;) {
            long r = readn(fd, buf, size);
            if (r == 0) break;
            if (r < 0) die("server recv", exchanges);
            if (writen(fd, buf, size) < 0) die("server send", exchanges);
            exchanges++;
        }
        close(fd);
        served++;
    }
    printf("served conns=%ld exchanges=%ld\n", served, exchanges);
    return 0;
}

static int connect_to(const char *src, const char *dst, int port, int ms, long i) {
    struct sockaddr_in sa;
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) die("socket", i);
    timeouts(fd, ms);  /* SO_SNDTIMEO bounds connect() */
    nodelay(fd);
    addr(&sa, src, 0);
    if (bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0) die("bind", i);
    addr(&sa, dst, port);
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0) die("connect", i);
    return fd;
}

static int client(const char *src, const char *dst, int port, long size, long count, int per_conn, int ms,
                  long warmup) {
    unsigned char *req = malloc(size), *rsp = malloc(size);
    int64_t *rtt = malloc(sizeof(int64_t) * (count > 0 ? count : 1));
    long total = count + warmup;
    int fd = -1;
    if (!req || !rsp || !rtt) die("malloc", -1);
    if (!per_conn) fd = connect_to(src, dst, port, ms, -1);
    for (long i = 0; i < total; i++) {
        for (long k = 0; k < size; k++) req[k] = (unsigned char)(i * 7 + k);
        int64_t t0 = now_ns();
        if (per_conn) fd = connect_to(src, dst, port, ms, i);
        if (writen(fd, req, size) < 0) die("send", i);
        long r = readn(fd, rsp, size);
        if (r <= 0) { if (r == 0) errno = ECONNRESET; die("no echo", i); }
        int64_t t1 = now_ns();
        if (memcmp(req, rsp, size)) { errno = 0; die("echo differs from the request", i); }
        if (per_conn) { close(fd); fd = -1; }
        if (i >= warmup) rtt[i - warmup] = t1 - t0;
    }
    if (fd >= 0) close(fd);
    for (long i = 0; i < count; i++) printf("%lld\n", (long long)rtt[i]);
    printf("done %ld\n", count);
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 7 && !strcmp(argv[1], "server"))
        return server(argv[2], atoi(argv[3]), atol(argv[4]), atol(argv[5]), atoi(argv[6]));
    if (argc == 10 && !strcmp(argv[1], "client"))
        return client(argv[2], argv[3], atoi(argv[4]), atol(argv[5]), atol(argv[6]), !strcmp(argv[7], "conn"),
                      atoi(argv[8]), atol(argv[9]));
    fprintf(stderr, "usage: %s server BIND PORT SIZE CONNS TIMEOUT_MS\n"
                    "       %s client SRC DST PORT SIZE COUNT persist|conn TIMEOUT_MS WARMUP\n", argv[0], argv[0]);
    return 2;
}
"""

CACHE_DIR = os.path.join(tempfile.gettempdir(), "hypernat-pingpong")


def unavailable_reason() -> str | None:
    """Why the client cannot be built here (None: it can)."""
    if shutil.which(os.environ.get("CC", "gcc")) is None:
        return "no C compiler (gcc) to build the ping-pong client"
    return None


def build(cache_dir: str = CACHE_DIR) -> str:
    """Compile SOURCE (once per source text: the binary is cached by its hash) and
    return the executable's path."""
    digest = hashlib.sha256(SOURCE.encode()).hexdigest()[:16]
    exe = os.path.join(cache_dir, f"pingpong-{digest}")
    if os.path.exists(exe):
        return exe
    os.makedirs(cache_dir, exist_ok=True)
    src = exe + ".c"
    with open(src, "w") as f:
        f.write(SOURCE)
    tmp = f"{exe}.{os.getpid()}.tmp"
    p = subprocess.run([os.environ.get("CC", "gcc"), "-O2", "-Wall", "-o", tmp, src], capture_output=True,
                       text=True, timeout=120)
    if p.returncode != 0:
        raise RuntimeError(f"building the ping-pong client failed: {p.stderr.strip()}")
    os.replace(tmp, exe)  # atomic: a parallel build never runs a half-written file
    return exe


class Server:
    """The echo server running in a namespace: `start()` returns once it listens."""

    def __init__(self, exe: str, ns: str | None, ip: str, port: int, size: int, conns: int,
                 timeout_ms: int = 2000, cpu: int | None = None, rt: int = 0):
        from . import netns

        pin = _sched(cpu, rt)
        self.argv = netns.exec_argv(ns, pin + [exe, "server", ip, str(port), str(size), str(conns),
                                               str(timeout_ms)])
        self.timeout_ms = timeout_ms
        self.proc = None
        self.lines = []

    def start(self, timeout: float = 10.0) -> "Server":
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     start_new_session=True)
        import select

        d = Deadline(timeout, "the ping-pong server to listen")
        while True:
            r, _, _ = select.select([self.proc.stdout], [], [], min(0.2, d.left()))
            if r:
                line = self.proc.stdout.readline()
                if line.strip() == "listening":
                    return self
                if not line:  # exited
                    self.proc.wait(5)
                    raise RuntimeError(f"ping-pong server exited ({self.proc.returncode}): "
                                       f"{self.proc.stderr.read().strip()!r}")
            d.check()

    def finish(self, timeout: float = 10.0) -> dict:
        """Wait for the server to end (it has served its connections, or its accept
        timed out), kill it at `timeout`; what it reported."""
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)
            out, err = self.proc.communicate(timeout=5)
            err = f"killed after {timeout:g} s; {err}"
        return parse_server(out, err, self.proc.returncode)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, 9)
            self.proc.wait(5)


def parse_server(out: str, err: str, rc: int) -> dict:
    """The server's report: peers seen, connections and exchanges served, error."""
    peers, conns, exchanges = [], 0, 0
    for ln in out.splitlines():
        if ln.startswith("peer "):
            peers.append(ln.split()[1])
        elif ln.startswith("served "):
            kv = dict(x.split("=") for x in ln.split()[1:])
            conns, exchanges = int(kv["conns"]), int(kv["exchanges"])
    error = None if rc == 0 else (err.strip() or f"exit {rc}")
    return {"peers": sorted(set(peers)), "conns": conns, "exchanges": exchanges, "error": error}


def parse_client(out: str, err: str, rc: int, count: int) -> dict:
    """The client's samples (µs, numpy array) and error (None if all `count` exchanges
    completed and echoed right)."""
    lines = out.split()
    done = len(lines) >= 2 and lines[-2] == "done" and lines[-1] == str(count)
    us = np.array([int(x) for x in lines[:-2]], dtype=np.int64) / 1e3 if done else np.zeros(0)
    error = None
    if rc != 0 or not done or len(us) != count:
        error = err.strip() or f"exit {rc}, {len(us)} of {count} samples"
    return {"us": us, "error": error}


def _sched(cpu: int | None, rt: int) -> list:
    """The command prefix that pins to `cpu` and runs at SCHED_FIFO `rt` (0: as is)."""
    return (["taskset", "-c", str(cpu)] if cpu is not None else []) + (["chrt", "-f", str(rt)] if rt else [])


def run_client(exe: str, ns: str | None, src: str, dst: str, port: int, size: int, count: int, mode: str,
               timeout_ms: int = 2000, warmup: int = 0, cpu: int | None = None, rt: int = 0) -> dict:
    """One client run (bounded: each exchange by `timeout_ms`, the whole by as many
    exchanges' worth of it plus a minute); on `cpu` at SCHED_FIFO `rt` if given."""
    from . import netns

    pin = _sched(cpu, rt)
    argv = netns.exec_argv(ns, pin + [exe, "client", src, dst, str(port), str(size), str(count), mode,
                                      str(timeout_ms), str(warmup)])
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=60 + (count + warmup) * 0.01)
    except subprocess.TimeoutExpired:
        return {"us": np.zeros(0), "error": "the client did not finish in time"}
    return parse_client(p.stdout, p.stderr, p.returncode, count)


def percentiles(us) -> dict:
    """p50 / p99 / p99.9 / max (µs) of a sample."""
    us = np.asarray(us, dtype=np.float64)
    if not len(us):
        return {"n": 0}
    p = np.percentile(us, [50, 99, 99.9])
    return {"n": int(len(us)), "p50_us": round(float(p[0]), 1), "p99_us": round(float(p[1]), 1),
            "p999_us": round(float(p[2]), 1), "max_us": round(float(us.max()), 1)}
