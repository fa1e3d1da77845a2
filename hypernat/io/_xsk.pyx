# hypernat: requires=libxdp,libbpf
# cython: language_level=3
"""AF_XDP sockets through libxdp's xsk API, for hypernat.io.af_xdp.

An XDP program on the interface decides, per frame, before the kernel's stack sees
it: IPv4 goes to our socket (``bpf_redirect_map`` into an XSKMAP at the frame's
receive queue), everything else — ARP above all — is passed to the kernel, which
keeps answering ARP for the interface's addresses and keeps its neighbour table::

     driver ──► XDP: ethertype == IPv4 ? ──yes──► XSKMAP[rx_queue] ──► RX ring ──► recv()
                                 │ no / short                         (frames in UMEM)
                                 └──────► XDP_PASS ──► kernel (ARP, IPv6, ...)

The program is 15 BPF instructions assembled here (below), so the build needs no
clang.  libxdp's default program would redirect *everything*, ARP included.

UMEM (one per socket): ``frames`` frames of ``frame_size`` bytes in an anonymous
mapping; the first half feeds the fill ring (receive), the second half is a free
stack for transmit.  Received frames stay in UMEM (the Batch views them) until
``release`` puts them back into the fill ring; transmit copies once into a free frame
and reaps the completion ring to get frames back.  The program is attached through a
BPF link owned by the socket object: closing it, or the process dying, detaches it.
Copy mode (``XDP_COPY``): veth has
no zero-copy; native attach where the driver has XDP, generic (SKB) mode otherwise.
"""
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t
from libc.string cimport memcpy, memset
from libc.errno cimport errno

cdef extern from *:
    """
    #include <errno.h>
    #include <string.h>
    #include <stdlib.h>
    #include <unistd.h>
    #include <net/if.h>
    #include <arpa/inet.h>
    #include <sys/socket.h>
    #include <linux/bpf.h>
    #include <linux/if_link.h>
    #include <linux/if_xdp.h>
    #include <bpf/bpf.h>
    #include <bpf/libbpf.h>
    #include <xdp/xsk.h>

    /* IPv4 → XSKMAP[rx_queue_index], anything else (or a frame shorter than an
       Ethernet header) → XDP_PASS.  struct xdp_md: data 0, data_end 4, rx_queue_index 16. */
    static int hn_load_prog(int map_fd, char *log, size_t log_size) {
        struct bpf_insn p[] = {
            {BPF_LDX | BPF_W | BPF_MEM, 2, 1, 0, 0},          /* r2 = ctx->data */
            {BPF_LDX | BPF_W | BPF_MEM, 3, 1, 4, 0},          /* r3 = ctx->data_end */
            {BPF_ALU64 | BPF_MOV | BPF_X, 4, 2, 0, 0},        /* r4 = r2 */
            {BPF_ALU64 | BPF_ADD | BPF_K, 4, 0, 0, 14},       /* r4 += 14 */
            {BPF_JMP | BPF_JGT | BPF_X, 4, 3, 8, 0},          /* if r4 > r3 goto pass */
            {BPF_LDX | BPF_H | BPF_MEM, 4, 2, 12, 0},         /* r4 = ethertype (network order) */
            {BPF_JMP | BPF_JNE | BPF_K, 4, 0, 6, htons(0x0800)}, /* if not IPv4 goto pass */
            {BPF_LDX | BPF_W | BPF_MEM, 2, 1, 16, 0},         /* r2 = ctx->rx_queue_index */
            {BPF_LD | BPF_DW | BPF_IMM, 1, BPF_PSEUDO_MAP_FD, 0, map_fd}, /* r1 = &xskmap */
            {0, 0, 0, 0, 0},
            {BPF_ALU64 | BPF_MOV | BPF_K, 3, 0, 0, XDP_PASS}, /* r3 = XDP_PASS if no socket */
            {BPF_JMP | BPF_CALL, 0, 0, 0, BPF_FUNC_redirect_map},
            {BPF_JMP | BPF_EXIT, 0, 0, 0, 0},
            {BPF_ALU64 | BPF_MOV | BPF_K, 0, 0, 0, XDP_PASS}, /* pass: r0 = XDP_PASS */
            {BPF_JMP | BPF_EXIT, 0, 0, 0, 0},
        };
        LIBBPF_OPTS(bpf_prog_load_opts, opts, .log_buf = log, .log_size = (unsigned)log_size, .log_level = 1);
        int fd = bpf_prog_load(BPF_PROG_TYPE_XDP, "hn_xsk_ipv4", "GPL", p, sizeof(p) / sizeof(p[0]), &opts);
        if (fd < 0) {  /* retry without a log: some kernels refuse a too-small buffer */
            LIBBPF_OPTS(bpf_prog_load_opts, o2);
            fd = bpf_prog_load(BPF_PROG_TYPE_XDP, "hn_xsk_ipv4", "GPL", p, sizeof(p) / sizeof(p[0]), &o2);
        }
        return fd;
    }
    /* Attach through a BPF link: the program stays exactly as long as the link fd,
       so closing it (or the process dying) detaches it, whatever namespace the
       closing thread is in. */
    static int hn_attach(int prog_fd, int ifindex, unsigned flags) {
        LIBBPF_OPTS(bpf_link_create_opts, lo, .flags = flags);
        return bpf_link_create(prog_fd, ifindex, BPF_XDP, &lo);
    }
    static int hn_xskmap(void) {
        return bpf_map_create(BPF_MAP_TYPE_XSKMAP, "hn_xsks", 4, 4, 64, NULL);
    }
    static unsigned long long hn_desc_addr(const struct xdp_desc *d) { return d->addr; }
    /* Descriptors submitted to a producer ring that the kernel has not consumed yet. */
    static inline unsigned int hn_prod_waiting(const struct xsk_ring_prod *r) {
        return *r->producer - __atomic_load_n(r->consumer, __ATOMIC_ACQUIRE);
    }
    /* The kernel's drop counters of an AF_XDP socket; -errno on failure. */
    static int hn_xdp_stats(int fd, unsigned long long out[6]) {
        struct xdp_statistics st;
        socklen_t len = sizeof(st);
        memset(&st, 0, sizeof(st));
        if (getsockopt(fd, SOL_XDP, XDP_STATISTICS, &st, &len) < 0) return -errno;
        out[0] = st.rx_dropped; out[1] = st.rx_invalid_descs; out[2] = st.tx_invalid_descs;
        out[3] = st.rx_ring_full; out[4] = st.rx_fill_ring_empty_descs; out[5] = st.tx_ring_empty_descs;
        return 0;
    }
    """
    struct xsk_ring_prod:
        uint32_t cached_prod
        uint32_t cached_cons
        uint32_t *producer
        uint32_t *consumer
    struct xsk_ring_cons:
        uint32_t cached_prod
        uint32_t cached_cons
    struct xsk_umem:
        pass
    struct xsk_socket:
        pass
    struct xdp_desc:
        uint64_t addr
        uint32_t len
        uint32_t options
    struct xsk_umem_config:
        uint32_t fill_size
        uint32_t comp_size
        uint32_t frame_size
        uint32_t frame_headroom
        uint32_t flags
    struct xsk_socket_config:
        uint32_t rx_size
        uint32_t tx_size
        uint32_t libxdp_flags
        uint32_t xdp_flags
        uint16_t bind_flags
    int hn_load_prog(int map_fd, char *log, size_t log_size)
    int hn_attach(int prog_fd, int ifindex, unsigned flags)
    int hn_xskmap()
    int hn_xdp_stats(int fd, unsigned long long out[6])
    unsigned int hn_prod_waiting(const xsk_ring_prod *r) nogil
    int xsk_umem__create(xsk_umem **umem, void *area, uint64_t size, xsk_ring_prod *fill, xsk_ring_cons *comp,
                         const xsk_umem_config *config)
    int xsk_socket__create(xsk_socket **xsk, const char *ifname, uint32_t queue_id, xsk_umem *umem,
                           xsk_ring_cons *rx, xsk_ring_prod *tx, const xsk_socket_config *config)
    int xsk_umem__delete(xsk_umem *umem)
    void xsk_socket__delete(xsk_socket *xsk)
    int xsk_socket__fd(const xsk_socket *xsk) nogil
    int xsk_socket__update_xskmap(xsk_socket *xsk, int xsks_map_fd)
    uint32_t xsk_ring_prod__reserve(xsk_ring_prod *prod, uint32_t nb, uint32_t *idx) nogil
    void xsk_ring_prod__submit(xsk_ring_prod *prod, uint32_t nb) nogil
    uint64_t *xsk_ring_prod__fill_addr(xsk_ring_prod *fill, uint32_t idx) nogil
    xdp_desc *xsk_ring_prod__tx_desc(xsk_ring_prod *tx, uint32_t idx) nogil
    int xsk_ring_prod__needs_wakeup(const xsk_ring_prod *r) nogil
    uint32_t xsk_ring_cons__peek(xsk_ring_cons *cons, uint32_t nb, uint32_t *idx) nogil
    void xsk_ring_cons__release(xsk_ring_cons *cons, uint32_t nb) nogil
    const xdp_desc *xsk_ring_cons__rx_desc(const xsk_ring_cons *rx, uint32_t idx) nogil
    const uint64_t *xsk_ring_cons__comp_addr(const xsk_ring_cons *comp, uint32_t idx) nogil
    uint64_t xsk_umem__extract_addr(uint64_t addr) nogil
    uint64_t xsk_umem__add_offset_to_addr(uint64_t addr) nogil
    unsigned int if_nametoindex(const char *name)
    int close(int fd)
    ssize_t sendto(int fd, const void *buf, size_t n, int flags, const void *addr, int addrlen) nogil
    int XDP_FLAGS_SKB_MODE, XDP_FLAGS_DRV_MODE, XDP_FLAGS_UPDATE_IF_NOEXIST
    int XDP_COPY, XSK_LIBXDP_FLAGS__INHIBIT_PROG_LOAD, MSG_DONTWAIT
    int EAGAIN, EBUSY, ENOBUFS, ENETDOWN


class XskError(OSError):
    pass


cdef class XskSocket:
    """One AF_XDP socket on (ifname, queue) with its own UMEM and our XDP program."""

    cdef xsk_umem *umem
    cdef xsk_socket *xsk
    cdef xsk_ring_prod fill
    cdef xsk_ring_cons comp
    cdef xsk_ring_cons rx
    cdef xsk_ring_prod tx
    cdef uint8_t *area
    cdef object mem
    cdef int map_fd, prog_fd, link_fd, ifindex
    cdef uint32_t xdp_flags
    cdef readonly uint32_t frame_size, frames, rx_frames, ring_size
    cdef readonly str mode, ifname
    cdef uint64_t[::1] free_tx
    cdef uint32_t n_free
    cdef uint8_t macs[12]
    cdef bint rewrite_macs
    cdef readonly uint64_t rx_count, rx_bytes, tx_count, tx_bytes, tx_no_frame, tx_ring_full, tx_too_big
    cdef readonly uint64_t tx_bad_frame, fill_failed, kicks, kick_errors, refused

    def __cinit__(self):
        self.map_fd = -1
        self.prog_fd = -1
        self.link_fd = -1

    def __init__(self, str ifname, uint8_t[::1] mem not None, uint32_t frame_size=2048, uint32_t queue=0,
                 uint32_t ring_size=2048, str mode="auto"):
        cdef xsk_umem_config ucfg
        cdef xsk_socket_config scfg
        cdef int err
        cdef char log[4096]
        cdef uint64_t size = mem.shape[0]
        cdef uint32_t i, idx
        import numpy as np
        if frame_size not in (2048, 4096) or size % frame_size or size // frame_size < 2 * ring_size:
            raise ValueError(f"UMEM of {size} bytes: need frames of 2048/4096 bytes, at least 2 x ring_size of them")
        self.mem = mem
        self.area = &mem[0]
        self.ifname = ifname
        self.frame_size = frame_size
        self.frames = <uint32_t>(size // frame_size)
        self.ring_size = ring_size
        self.ifindex = if_nametoindex(ifname.encode())
        if self.ifindex == 0:
            raise XskError(errno, f"AF_XDP on {ifname!r}: no such interface")
        self.map_fd = hn_xskmap()
        if self.map_fd < 0:
            raise XskError(-self.map_fd, f"AF_XDP on {ifname!r}: cannot create the XSKMAP (needs CAP_BPF)")
        log[0] = 0
        self.prog_fd = hn_load_prog(self.map_fd, log, sizeof(log))
        if self.prog_fd < 0:
            self._close_fds()
            raise XskError(-self.prog_fd, f"AF_XDP on {ifname!r}: the XDP program was refused: "
                                          f"{log.decode(errors='replace')}")
        modes = {"native": [XDP_FLAGS_DRV_MODE], "skb": [XDP_FLAGS_SKB_MODE],
                 "auto": [XDP_FLAGS_DRV_MODE, XDP_FLAGS_SKB_MODE]}.get(mode)
        if modes is None:
            self._close_fds()
            raise ValueError(f"mode {mode!r}: auto, native or skb")
        err = -1
        for flags in modes:
            self.link_fd = hn_attach(self.prog_fd, self.ifindex, flags)
            if self.link_fd >= 0:
                err = 0
                self.xdp_flags = flags
                self.mode = "native" if flags == XDP_FLAGS_DRV_MODE else "skb"
                break
            err = self.link_fd
        if err:
            self._close_fds()
            raise XskError(-err, f"AF_XDP on {ifname!r}: cannot attach XDP ({mode}; another program there?)")
        ucfg.fill_size = ring_size
        ucfg.comp_size = ring_size
        ucfg.frame_size = frame_size
        ucfg.frame_headroom = 0
        ucfg.flags = 0
        err = xsk_umem__create(&self.umem, self.area, size, &self.fill, &self.comp, &ucfg)
        if err:
            self.umem = NULL
            self.close()
            raise XskError(-err, f"AF_XDP on {ifname!r}: xsk_umem__create failed")
        scfg.rx_size = ring_size
        scfg.tx_size = ring_size
        scfg.libxdp_flags = XSK_LIBXDP_FLAGS__INHIBIT_PROG_LOAD
        scfg.xdp_flags = self.xdp_flags
        scfg.bind_flags = XDP_COPY
        err = xsk_socket__create(&self.xsk, ifname.encode(), queue, self.umem, &self.rx, &self.tx, &scfg)
        if err:
            self.xsk = NULL
            self.close()
            raise XskError(-err, f"AF_XDP on {ifname!r}: xsk_socket__create failed")
        err = xsk_socket__update_xskmap(self.xsk, self.map_fd)
        if err:
            self.close()
            raise XskError(-err, f"AF_XDP on {ifname!r}: cannot insert the socket into the XSKMAP")
        # Receive frames: the first `ring_size` frames go to the fill ring.
        self.rx_frames = ring_size
        if xsk_ring_prod__reserve(&self.fill, ring_size, &idx) != ring_size:
            self.close()
            raise XskError(0, f"AF_XDP on {ifname!r}: cannot fill the fill ring")
        for i in range(ring_size):
            xsk_ring_prod__fill_addr(&self.fill, idx + i)[0] = <uint64_t>i * frame_size
        xsk_ring_prod__submit(&self.fill, ring_size)
        self.free_tx = np.arange(ring_size, self.frames, dtype=np.uint64) * frame_size
        self.n_free = self.frames - ring_size

    def _close_fds(self):
        if self.link_fd >= 0:
            close(self.link_fd)  # detaches the program
            self.link_fd = -1
        if self.prog_fd >= 0:
            close(self.prog_fd)
            self.prog_fd = -1
        if self.map_fd >= 0:
            close(self.map_fd)
            self.map_fd = -1

    def fileno(self):
        if self.xsk == NULL:
            raise ValueError("closed")
        return xsk_socket__fd(self.xsk)

    def set_macs(self, src=None, dst=None):
        if src is None or dst is None:
            self.rewrite_macs = False
            return
        cdef bytes both = bytes(dst) + bytes(src)
        if len(both) != 12:
            raise ValueError("MAC addresses are 6 bytes")
        memcpy(self.macs, <const char *>both, 12)
        self.rewrite_macs = True

    def recv(self, uint32_t[::1] offsets not None, uint32_t[::1] lengths not None, uint64_t[::1] addrs not None,
             uint32_t max_frames):
        """Frames waiting in the RX ring: offsets (into UMEM) and lengths; their UMEM
        addresses in `addrs` for ``release``.  Returns the count."""
        cdef uint32_t n, idx = 0, i
        cdef const xdp_desc *d
        cdef uint64_t a
        if self.xsk == NULL:
            return 0
        max_frames = min(max_frames, <uint32_t>offsets.shape[0], <uint32_t>lengths.shape[0], <uint32_t>addrs.shape[0])
        with nogil:
            n = xsk_ring_cons__peek(&self.rx, max_frames, &idx)
            for i in range(n):
                d = xsk_ring_cons__rx_desc(&self.rx, idx + i)
                a = xsk_umem__add_offset_to_addr(d.addr)
                offsets[i] = <uint32_t>a
                lengths[i] = d.len
                addrs[i] = xsk_umem__extract_addr(d.addr)
                self.rx_bytes += d.len
            if n:
                xsk_ring_cons__release(&self.rx, n)
            self.rx_count += n
        return n

    def release(self, const uint64_t[::1] addrs not None, uint32_t n):
        """Give received frames back to the kernel (fill ring)."""
        cdef uint32_t idx = 0, i
        if self.xsk == NULL or n == 0:
            return
        with nogil:
            if xsk_ring_prod__reserve(&self.fill, n, &idx) != n:
                self.fill_failed += n  # cannot happen: the fill ring holds every rx frame
            else:
                for i in range(n):
                    xsk_ring_prod__fill_addr(&self.fill, idx + i)[0] = addrs[i] - addrs[i] % self.frame_size
                xsk_ring_prod__submit(&self.fill, n)

    cdef void _reap(self) noexcept nogil:
        cdef uint32_t idx = 0, n, i
        n = xsk_ring_cons__peek(&self.comp, self.ring_size, &idx)
        for i in range(n):
            self.free_tx[self.n_free] = xsk_ring_cons__comp_addr(&self.comp, idx + i)[0]
            self.n_free += 1
        if n:
            xsk_ring_cons__release(&self.comp, n)

    cdef uint32_t _kick(self) noexcept nogil:
        """Kick the kernel while descriptors wait in the TX ring, whether or not this
        call queued any: a frame the device refused (a stopped queue: EAGAIN; the
        carrier off: ENETDOWN) stays in the ring and only the next kick sends it.
        Returns how many still wait."""
        cdef ssize_t r
        cdef int err
        if hn_prod_waiting(&self.tx) == 0:
            return 0
        r = sendto(xsk_socket__fd(self.xsk), NULL, 0, MSG_DONTWAIT, NULL, 0)
        self.kicks += 1
        if r < 0:
            err = errno
            if err == EAGAIN or err == EBUSY or err == ENOBUFS or err == ENETDOWN:
                self.refused += 1  # not now (carrier off: the descriptors stay in the ring)
            else:
                self.kick_errors += 1
        return hn_prod_waiting(&self.tx)

    def flush(self):
        """Kick again what waits in the TX ring (see ``_kick``); reap completions.
        Returns the descriptors still waiting."""
        cdef uint32_t left
        if self.xsk == NULL:
            return 0
        with nogil:
            self._reap()
            left = self._kick()
        return left

    def send(self, const uint8_t[::1] buf not None, const uint32_t[::1] offsets not None,
             const uint32_t[::1] lengths not None, const int64_t[::1] idx not None):
        """Copy frames `idx` of a batch into free UMEM frames and queue them; kick."""
        cdef Py_ssize_t k, n = idx.shape[0], nframes = min(offsets.shape[0], lengths.shape[0])
        cdef uint64_t buflen = buf.shape[0], a
        cdef uint32_t tidx = 0, queued = 0, want, off, ln, got
        cdef int64_t i
        cdef xdp_desc *d
        if self.xsk == NULL or n == 0 or buflen == 0:
            return 0
        with nogil:
            self._reap()
            want = <uint32_t>min(<uint64_t>n, <uint64_t>self.n_free)
            got = xsk_ring_prod__reserve(&self.tx, want, &tidx) if want else 0
            if got == 0:
                if want:  # the TX ring is full: the kernel has not taken the last batch yet
                    self.tx_ring_full += n
                else:  # every UMEM transmit frame is in flight
                    self.tx_no_frame += n
            for k in range(n if got else 0):
                if queued == got:
                    self.tx_no_frame += 1
                    continue
                i = idx[k]
                if i < 0 or i >= nframes:
                    self.tx_bad_frame += 1
                    continue
                off = offsets[i]
                ln = lengths[i]
                if ln < 14 or <uint64_t>off + ln > buflen:
                    self.tx_bad_frame += 1
                    continue
                if ln > self.frame_size:
                    self.tx_too_big += 1
                    continue
                self.n_free -= 1
                a = self.free_tx[self.n_free]
                memcpy(self.area + a, &buf[0] + off, ln)
                if self.rewrite_macs:
                    memcpy(self.area + a, self.macs, 12)
                d = xsk_ring_prod__tx_desc(&self.tx, tidx + queued)
                d.addr = a
                d.len = ln
                d.options = 0
                queued += 1
                self.tx_bytes += ln
            if got > queued:
                # Reserved but unused (refused frames): never submitted, so rolling the
                # cached producer back is all it takes.
                self.tx.cached_prod -= got - queued
            if queued:
                xsk_ring_prod__submit(&self.tx, queued)
            self._kick()
            self.tx_count += queued
        return queued

    def kernel_counters(self):
        """The kernel's drops for this socket (XDP_STATISTICS): ring full, fill ring
        empty (frames we had not released yet), invalid descriptors."""
        cdef unsigned long long v[6]
        memset(v, 0, sizeof(v))
        if self.xsk == NULL or hn_xdp_stats(xsk_socket__fd(self.xsk), v) != 0:
            return {}
        return {"kernel_rx_dropped": v[0], "kernel_rx_invalid_descs": v[1], "kernel_tx_invalid_descs": v[2],
                "kernel_rx_ring_full": v[3], "kernel_rx_fill_ring_empty": v[4], "kernel_tx_ring_empty": v[5]}

    def counters(self):
        return {"rx_frames": self.rx_count, "rx_bytes": self.rx_bytes, "tx_frames": self.tx_count,
                "tx_bytes": self.tx_bytes, "tx_ring_full": self.tx_ring_full, "tx_no_frame": self.tx_no_frame,
                "tx_too_big": self.tx_too_big, "tx_bad_frame": self.tx_bad_frame, "tx_kicks": self.kicks,
                "tx_refused": self.refused, "tx_kick_errors": self.kick_errors,
                "fill_failed": self.fill_failed, "tx_free_frames": self.n_free}

    def close(self):
        if self.xsk != NULL:
            xsk_socket__delete(self.xsk)
            self.xsk = NULL
        if self.umem != NULL:
            xsk_umem__delete(self.umem)
            self.umem = NULL
        self._close_fds()
        self.area = NULL
        self.mem = None

    def __dealloc__(self):
        if self.xsk != NULL:
            xsk_socket__delete(self.xsk)
        if self.umem != NULL:
            xsk_umem__delete(self.umem)
        if self.link_fd >= 0:
            close(self.link_fd)
        if self.prog_fd >= 0:
            close(self.prog_fd)
        if self.map_fd >= 0:
            close(self.map_fd)
