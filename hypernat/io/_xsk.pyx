# hypernat: requires=libxdp,libbpf
# cython: language_level=3
"""AF_XDP sockets through libxdp's xsk API, for hypernat.io.af_xdp.

An XDP program on the interface decides, per frame, before the kernel's stack sees
it: IPv4 (bare or under one 802.1Q tag) goes to our socket (``bpf_redirect_map`` into
an XSKMAP at the frame's receive queue), everything else — ARP above all — is passed
to the kernel, which keeps answering ARP for the interface's addresses and keeps its
neighbour table::

     driver ──► XDP: IPv4 / 802.1Q IPv4 ? ──yes──► socket on XSKMAP[rx_queue]? ──yes──► RX ring ──► recv()
                          │ no / short                  │ no                       (frames in UMEM)
                          └──────────► XDP_PASS ◄───────┘ ──► kernel (ARP, IPv6, ...)

The program (``hn_program``) is assembled here, so the build needs no clang; libxdp's
default program would redirect *everything*, ARP included.  Natively it is
device-bound and puts back a VLAN tag the driver took off (see hypernat.io.af_xdp);
its second map counts, per queue, tags restored and tags lost.  One program per
interface, shared by the sockets of its queues (``_program``: the first attaches it
through a BPF link, the others join by holding the same link; the last close detaches).

UMEM (one per socket): ``frames`` frames of ``frame_size`` bytes in an anonymous
mapping; the first half feeds the fill ring (receive), the second half is a free
stack for transmit.  Received frames stay in UMEM (the Batch views them) until
``release`` puts them back into the fill ring; transmit copies once into a free frame
and reaps the completion ring to get frames back.  The program is attached through a
BPF link that every socket of the interface holds: closing the last, or the last
process dying, detaches it.
Copy mode (``XDP_COPY``): veth has
no zero-copy; native attach where the driver has XDP, generic (SKB) mode otherwise.
"""
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t
from libc.string cimport memcpy, memset
from libc.errno cimport errno

from ._vlan cimport (vlan_egress_add, vlan_egress_copy, vlan_egress_skip, vlan_set_add, vlan_set_clear,
                     vlan_set_has, vlan_tagged_vid)

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
    #include <bpf/btf.h>
    #include <bpf/libbpf.h>
    #define HN_F_XDP_DEV_BOUND_ONLY (1U << 6)  /* linux/bpf.h of 6.3+ */
    #define HN_QUEUES 64
    #define HN_PROG "hn_xsk"            /* our program's two names: without ... */
    #define HN_PROG_VLANMD "hn_xsk_vlanmd"  /* ... and with the driver's VLAN metadata (device-bound) */
    #include <xdp/xsk.h>

    /* Load an XDP program (``hn_program`` assembles it); bound to `ifindex` (a
       device-bound program may call the driver's metadata kfuncs) when `dev_bound`. */
    static int hn_load_prog(const void *insns, size_t n, int ifindex, int dev_bound, char *log, size_t log_size) {
        LIBBPF_OPTS(bpf_prog_load_opts, opts);
        if (dev_bound) { opts.prog_ifindex = ifindex; opts.prog_flags = HN_F_XDP_DEV_BOUND_ONLY; }
        const char *name = dev_bound ? HN_PROG_VLANMD : HN_PROG;
        int fd = bpf_prog_load(BPF_PROG_TYPE_XDP, name, "GPL", insns, n, &opts);
        if (fd < 0) {  /* again, for the verifier's words (a log that overflows fails a load: ENOSPC) */
            int err = fd;
            opts.log_buf = log;
            opts.log_size = (unsigned)log_size;
            opts.log_level = 1;
            fd = bpf_prog_load(BPF_PROG_TYPE_XDP, name, "GPL", insns, n, &opts);
            if (fd < 0) fd = err;
        }
        return fd;
    }
    /* The BTF id of a kernel function (a kfunc), or -1: the kernel has none by that name. */
    static int hn_kfunc_id(const char *name) {
        struct btf *b = btf__load_vmlinux_btf();
        if (!b) return -1;
        int id = btf__find_by_name_kind(b, name, BTF_KIND_FUNC);
        btf__free(b);
        return id > 0 ? id : -1;
    }
    /* Join the program another socket of ours attached to `ifindex` (another queue of
       the same port, maybe another process): out = {link fd, prog fd, xskmap fd,
       stats fd, attach mode (XDP_ATTACHED_*), 1 if it reads the driver's VLAN metadata}.  Holding the link fd keeps the program
       attached until the last socket of the port closes.  0: joined; 1: no program
       there; 2: a program that is not ours; -errno: failed. */
    static int hn_join(int ifindex, int out[6]) {
        LIBBPF_OPTS(bpf_xdp_query_opts, q);
        struct bpf_prog_info pi;
        struct bpf_link_info li;
        __u32 maps[4], len, id = 0, prog_id;
        int fd, err, i;
        out[0] = out[1] = out[2] = out[3] = -1;
        out[4] = out[5] = 0;
        err = bpf_xdp_query(ifindex, 0, &q);
        if (err) return err;
        prog_id = q.attach_mode == XDP_ATTACHED_SKB ? q.skb_prog_id : q.drv_prog_id;
        if (!prog_id) return 1;
        out[4] = q.attach_mode;
        out[1] = bpf_prog_get_fd_by_id(prog_id);
        if (out[1] < 0) return -errno;
        memset(&pi, 0, sizeof(pi));
        pi.nr_map_ids = 4;
        pi.map_ids = (unsigned long)maps;
        len = sizeof(pi);
        if (bpf_obj_get_info_by_fd(out[1], &pi, &len)) return -errno;
        out[5] = strcmp(pi.name, HN_PROG_VLANMD) == 0;
        if ((strcmp(pi.name, HN_PROG) != 0 && !out[5]) || pi.nr_map_ids != 2) return 2;
        for (i = 0; i < 2; i++) {
            struct bpf_map_info mi;
            memset(&mi, 0, sizeof(mi));
            len = sizeof(mi);
            fd = bpf_map_get_fd_by_id(maps[i]);
            if (fd < 0) return -errno;
            if (bpf_obj_get_info_by_fd(fd, &mi, &len)) { close(fd); return -errno; }
            if (mi.type == BPF_MAP_TYPE_XSKMAP) out[2] = fd; else out[3] = fd;
        }
        if (out[2] < 0 || out[3] < 0) return 2;
        while (bpf_link_get_next_id(id, &id) == 0) {
            fd = bpf_link_get_fd_by_id(id);
            if (fd < 0) continue;
            memset(&li, 0, sizeof(li));
            len = sizeof(li);
            if (bpf_obj_get_info_by_fd(fd, &li, &len) == 0 && li.type == BPF_LINK_TYPE_XDP &&
                    li.prog_id == prog_id && li.xdp.ifindex == (unsigned)ifindex) {
                out[0] = fd;
                return 0;
            }
            close(fd);
        }
        return -ENOENT;  /* attached without a link (not by us), or detached meanwhile */
    }
    static unsigned long long hn_stat(int fd, unsigned key) {
        unsigned long long v = 0;
        if (fd >= 0 && bpf_map_lookup_elem(fd, &key, &v)) v = 0;
        return v;
    }
    /* Attach through a BPF link: the program stays exactly as long as the link fd,
       so closing it (or the process dying) detaches it, whatever namespace the
       closing thread is in. */
    static int hn_attach(int prog_fd, int ifindex, unsigned flags) {
        LIBBPF_OPTS(bpf_link_create_opts, lo, .flags = flags);
        return bpf_link_create(prog_fd, ifindex, BPF_XDP, &lo);
    }
    static int hn_xskmap(void) {
        return bpf_map_create(BPF_MAP_TYPE_XSKMAP, "hn_xsks", 4, 4, HN_QUEUES, NULL);
    }
    static int hn_statmap(void) {
        return bpf_map_create(BPF_MAP_TYPE_ARRAY, "hn_xsk_stats", 4, 8, 2 * HN_QUEUES, NULL);
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
    int hn_load_prog(const void *insns, size_t n, int ifindex, int dev_bound, char *log, size_t log_size)
    int hn_kfunc_id(const char *name)
    int hn_join(int ifindex, int out[6])
    unsigned long long hn_stat(int fd, unsigned key)
    int hn_statmap()
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
    int XDP_FLAGS_SKB_MODE, XDP_FLAGS_DRV_MODE, XDP_FLAGS_UPDATE_IF_NOEXIST, XDP_ATTACHED_SKB, HN_QUEUES
    int XDP_COPY, XSK_LIBXDP_FLAGS__INHIBIT_PROG_LOAD, MSG_DONTWAIT
    int EAGAIN, EBUSY, ENOBUFS, ENETDOWN


class XskError(OSError):
    pass


# The XDP program, assembled here (the build needs no clang).  Stats map: two u64
# counters per receive queue, [2q] tags restored, [2q + 1] tagged frames dropped
# because the tag could not be put back.
STAT_VLAN_RESTORED, STAT_VLAN_LOST = 0, 1
_XDP_DROP, _XDP_PASS = 1, 2
_FN_MAP_LOOKUP, _FN_ADJUST_HEAD, _FN_REDIRECT_MAP = 1, 44, 51
_ETH_IPV4, _ETH_8021Q = 0x0008, 0x0081  # 0x0800, 0x8100 as a 16-bit load reads them (little-endian)


def _assemble(prog) -> bytes:
    """struct bpf_insn[] from (code, dst, src, off, imm) tuples and label strings; a
    jump's `off` may name a label; code 0x18 (load a 64-bit immediate) takes two slots."""
    import struct
    at, pc = {}, 0
    for ins in prog:
        if isinstance(ins, str):
            at[ins] = pc
        else:
            pc += 2 if ins[0] == 0x18 else 1
    out, pc = [], 0
    for ins in prog:
        if isinstance(ins, str):
            continue
        code, dst, src, off, imm = ins
        if isinstance(off, str):
            off = at[off] - pc - 1
        out.append(struct.pack("<BBhi", code, dst | (src << 4), off, imm))
        pc += 1
        if code == 0x18:
            out.append(bytes(8))
            pc += 1
    return b"".join(out)


def hn_program(int xskmap_fd, int stats_fd, int vlan_kfunc=-1) -> bytes:
    """The XDP program of an AF_XDP port::

        IPv4, or 802.1Q-tagged IPv4 ──► a socket on XSKMAP[rx_queue]? ──no──► XDP_PASS (untouched)
                                              │ yes
        (vlan_kfunc: the driver took a tag off ──► put it back in front: adjust_head -4;
         no headroom ──► XDP_DROP, counted [2q+1]; restored, counted [2q])
                                              └──► bpf_redirect_map ──► RX ring
        anything else (ARP, IPv6, a runt) ──► XDP_PASS: the kernel answers it

    ``vlan_kfunc``: the BTF id of ``bpf_xdp_metadata_rx_vlan_tag`` (the program is then
    device-bound), or -1: only tags left in the frame are seen."""
    def stat(k, skip):
        return [(0x61, 2, 6, 16, 0), (0x57, 2, 0, 0, 63), (0x67, 2, 0, 0, 1), (0x07, 2, 0, 0, k),
                (0x63, 10, 2, -12, 0), (0x18, 1, 1, 0, stats_fd), (0xbf, 2, 10, 0, 0), (0x07, 2, 0, 0, -12),
                (0x85, 0, 0, 0, _FN_MAP_LOOKUP), (0x15, 0, 0, skip, 0), (0xb7, 1, 0, 0, 1), (0xdb, 0, 1, 0, 0)]
    p = [
        (0xbf, 6, 1, 0, 0),                     # r6 = ctx
        (0xb7, 7, 0, 0, 0),                     # r7 = 0: no tag to restore
        (0x61, 2, 6, 0, 0),                     # r2 = ctx->data
        (0x61, 3, 6, 4, 0),                     # r3 = ctx->data_end
        (0xbf, 4, 2, 0, 0), (0x07, 4, 0, 0, 14),
        (0x2d, 4, 3, "pass", 0),                # shorter than Ethernet
        (0x69, 4, 2, 12, 0),                    # r4 = ethertype
        (0x15, 4, 0, "ipv4", _ETH_IPV4),
        (0x55, 4, 0, "pass", _ETH_8021Q),
        (0xbf, 4, 2, 0, 0), (0x07, 4, 0, 0, 18),
        (0x2d, 4, 3, "pass", 0),
        (0x69, 4, 2, 16, 0),                    # tagged: the inner ethertype
        (0x55, 4, 0, "pass", _ETH_IPV4),
        "ipv4",                                 # (a tag in the frame may sit under one taken off: QinQ)
    ]
    if vlan_kfunc > 0:
        p += [
            (0x62, 10, 0, -4, 0),               # *(u32 *)(fp - 4) = 0: proto, tci
            (0xbf, 1, 6, 0, 0),
            (0xbf, 2, 10, 0, 0), (0x07, 2, 0, 0, -4),
            (0xbf, 3, 10, 0, 0), (0x07, 3, 0, 0, -2),
            (0x85, 0, 2, 0, vlan_kfunc),        # bpf_xdp_metadata_rx_vlan_tag(ctx, &proto, &tci)
            (0x55, 0, 0, "sock", 0),            # -ENODATA: no tag (-EOPNOTSUPP: none seen)
            (0xb7, 7, 0, 0, 1),                 # r7 = 1: the driver took a tag off
        ]
    p += [
        "sock",
        (0x61, 2, 6, 16, 0),                    # r2 = ctx->rx_queue_index
        (0x63, 10, 2, -8, 0),
        (0x18, 1, 1, 0, xskmap_fd),
        (0xbf, 2, 10, 0, 0), (0x07, 2, 0, 0, -8),
        (0x85, 0, 0, 0, _FN_MAP_LOOKUP),
        (0x15, 0, 0, "pass", 0),                # no socket on this queue: the kernel's
        (0x15, 7, 0, "redirect", 0),
        (0xbf, 1, 6, 0, 0), (0xb7, 2, 0, 0, -4),
        (0x85, 0, 0, 0, _FN_ADJUST_HEAD),       # 4 bytes of headroom for the tag
        (0x55, 0, 0, "lost", 0),
        (0x61, 2, 6, 0, 0), (0x61, 3, 6, 4, 0),
        (0xbf, 4, 2, 0, 0), (0x07, 4, 0, 0, 18),
        (0x2d, 4, 3, "lost", 0),
    ]
    for i in range(6):                          # the MAC addresses 4 bytes forward
        p += [(0x69, 4, 2, 4 + 2 * i, 0), (0x6b, 2, 4, 2 * i, 0)]
    p += [
        (0x69, 4, 10, -4, 0),                   # the tag's protocol (network order) ...
        (0x55, 4, 0, 1, 0),
        (0xb7, 4, 0, 0, _ETH_8021Q),            # ... 0x8100 if the driver gave none
        (0x6b, 2, 4, 12, 0),
        (0x69, 4, 10, -2, 0),                   # the TCI (host order) ...
        (0xdc, 4, 0, 0, 16),                    # ... to network order
        (0x6b, 2, 4, 14, 0),
        *stat(STAT_VLAN_RESTORED, 2),
        "redirect",
        (0x61, 2, 6, 16, 0),
        (0x18, 1, 1, 0, xskmap_fd),
        (0xb7, 3, 0, 0, _XDP_PASS),
        (0x85, 0, 0, 0, _FN_REDIRECT_MAP),
        (0x95, 0, 0, 0, 0),
        "lost",
        *stat(STAT_VLAN_LOST, 2),
        (0xb7, 0, 0, 0, _XDP_DROP),
        (0x95, 0, 0, 0, 0),
        "pass",
        (0xb7, 0, 0, 0, _XDP_PASS),
        (0x95, 0, 0, 0, 0),
    ]
    return _assemble(p)


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
    cdef int map_fd, prog_fd, link_fd, stats_fd, ifindex
    cdef readonly uint32_t queue
    cdef readonly bint vlan_kfunc, joined
    cdef readonly str vlan_metadata_refused  # the verifier's words, where the device-bound program was refused
    cdef uint8_t vlan_ok[512]
    cdef bint vlan_port
    cdef int vlan_mode      # 0: frames leave as they are; 1: untagged; 2: tagged with tx_tci
    cdef uint16_t tx_tci
    cdef readonly uint64_t vlan_unconfigured, vlan_missing
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
        self.stats_fd = -1

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
        if queue >= HN_QUEUES:
            raise ValueError(f"AF_XDP on {ifname!r}: queue {queue}: at most {HN_QUEUES} queues")
        self.queue = queue
        modes = {"native": [XDP_FLAGS_DRV_MODE], "skb": [XDP_FLAGS_SKB_MODE],
                 "auto": [XDP_FLAGS_DRV_MODE, XDP_FLAGS_SKB_MODE]}.get(mode)
        if modes is None:
            raise ValueError(f"mode {mode!r}: auto, native or skb")
        self._program(ifname, modes, mode)
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

    def _program(self, str ifname, list modes, str mode):
        """The port's XDP program: joined where another socket of this port (another
        queue, maybe another process) attached it, else loaded and attached here.  A
        program attached by two openers at once: the loser joins."""
        cdef int out[6]
        cdef int err = 0, r, kf, dev_bound
        cdef char log[4096]
        import time
        kf = hn_kfunc_id(b"bpf_xdp_metadata_rx_vlan_tag")
        deadline = time.monotonic() + 2.0
        while True:
            r = hn_join(self.ifindex, out)
            if r == 0:
                self.link_fd, self.prog_fd, self.map_fd, self.stats_fd = out[0], out[1], out[2], out[3]
                self.xdp_flags = XDP_FLAGS_SKB_MODE if out[4] == XDP_ATTACHED_SKB else XDP_FLAGS_DRV_MODE
                self.mode = "skb" if out[4] == XDP_ATTACHED_SKB else "native"
                self.joined = True
                if self.xdp_flags not in modes:
                    self._close_fds()
                    raise XskError(16, f"AF_XDP on {ifname!r}: the port's program is attached in {self.mode} "
                                       f"mode (another queue's socket), not {mode}")
                self.vlan_kfunc = out[5]
                return
            for fd in range(4):
                if out[fd] >= 0:
                    close(out[fd])
            if r == 2:
                raise XskError(16, f"AF_XDP on {ifname!r}: another XDP program is attached there")
            if r < 0 and r != -2 and r != -EBUSY:  # -ENOENT: detached meanwhile; ask again
                raise XskError(-r, f"AF_XDP on {ifname!r}: cannot query its XDP program")
            if r == 1:
                self.map_fd = hn_xskmap()
                if self.map_fd < 0:
                    raise XskError(-self.map_fd, f"AF_XDP on {ifname!r}: cannot create the XSKMAP (needs CAP_BPF)")
                self.stats_fd = hn_statmap()
                if self.stats_fd < 0:
                    self._close_fds()
                    raise XskError(-self.stats_fd, f"AF_XDP on {ifname!r}: cannot create the stats map")
                err = -1
                for flags in modes:
                    # A device-bound program (it reads the driver's VLAN metadata) attaches
                    # natively only; generic XDP gets the program without the kfunc.
                    dev_bound = flags == XDP_FLAGS_DRV_MODE and kf > 0
                    prog = hn_program(self.map_fd, self.stats_fd, kf if dev_bound else -1)
                    log[0] = 0
                    self.prog_fd = hn_load_prog(<const char *>prog, len(prog) // 8, self.ifindex, dev_bound,
                                                log, sizeof(log))
                    if self.prog_fd < 0 and dev_bound:  # a driver without the kfunc: no metadata
                        self.vlan_metadata_refused = log.decode(errors="replace")
                        dev_bound = False
                        prog = hn_program(self.map_fd, self.stats_fd, -1)
                        self.prog_fd = hn_load_prog(<const char *>prog, len(prog) // 8, self.ifindex, 0,
                                                    log, sizeof(log))
                    if self.prog_fd < 0:
                        err = self.prog_fd
                        msg = log.decode(errors="replace")
                        self._close_fds()
                        raise XskError(-err, f"AF_XDP on {ifname!r}: the XDP program was refused: {msg}")
                    self.link_fd = hn_attach(self.prog_fd, self.ifindex, flags)
                    if self.link_fd >= 0:
                        err = 0
                        self.xdp_flags = flags
                        self.mode = "native" if flags == XDP_FLAGS_DRV_MODE else "skb"
                        self.vlan_kfunc = dev_bound
                        return
                    err = self.link_fd
                    close(self.prog_fd)
                    self.prog_fd = -1
                    if err == -EBUSY or err == -17:  # another opener attached first: join it
                        break
                self._close_fds()
                if err == -28:  # ENOSPC (veth_xdp_set)
                    raise XskError(-err, f"AF_XDP on {ifname!r}: cannot attach XDP ({mode}): a veth takes native "
                                         "XDP only with at least as many receive queues as its peer has "
                                         "transmit queues")
                if err != -EBUSY and err != -17:
                    raise XskError(-err, f"AF_XDP on {ifname!r}: cannot attach XDP ({mode}; another program there?)")
            if time.monotonic() >= deadline:
                raise XskError(EBUSY, f"AF_XDP on {ifname!r}: its XDP program came and went for 2 s")
            time.sleep(0.01)

    def set_vlans(self, vlans=(), tx_tci=None):
        """The 802.1Q VLAN IDs this port carries (a tagged frame of another VLAN, or an
        untagged frame on a VLAN port, is dropped on receive and counted), and the tag
        every frame sent carries (a router's egress: ``None`` leaves frames as they are,
        0 sends them untagged, a TCI tags them)."""
        vlan_set_clear(self.vlan_ok)
        self.vlan_port = False
        for v in vlans:
            if not 1 <= v <= 4094:
                raise ValueError(f"VLAN ID {v!r} is outside 1-4094")
            self.vlan_port = True
            vlan_set_add(self.vlan_ok, v)
        if tx_tci is None:
            self.vlan_mode = 0
        elif not 0 <= tx_tci <= 0xFFFF:
            raise ValueError(f"802.1Q TCI {tx_tci!r} out of range")
        else:
            self.vlan_mode = 2 if tx_tci else 1
            self.tx_tci = tx_tci

    def _close_fds(self):
        if self.link_fd >= 0:
            close(self.link_fd)  # detaches the program
            self.link_fd = -1
        if self.prog_fd >= 0:
            close(self.prog_fd)
            self.prog_fd = -1
        if self.map_fd >= 0:
            close(self.map_fd)
        if self.stats_fd >= 0:
            close(self.stats_fd)
            self.map_fd = -1
        if self.stats_fd >= 0:
            close(self.stats_fd)
            self.stats_fd = -1

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
        addresses in `addrs` for ``release``.  Returns the count.  A frame tagged with a
        VLAN this port does not carry, or untagged on a VLAN port, goes straight back to
        the fill ring, counted (``rx_vlan_unconfigured``, ``rx_vlan_missing``)."""
        cdef uint32_t n, idx = 0, i, m = 0, d = 0, vid
        cdef const xdp_desc *d_
        cdef const uint8_t *f
        cdef uint64_t a
        if self.xsk == NULL:
            return 0
        max_frames = min(max_frames, <uint32_t>offsets.shape[0], <uint32_t>lengths.shape[0], <uint32_t>addrs.shape[0])
        with nogil:
            n = xsk_ring_cons__peek(&self.rx, max_frames, &idx)
            for i in range(n):
                d_ = xsk_ring_cons__rx_desc(&self.rx, idx + i)
                a = xsk_umem__add_offset_to_addr(d_.addr)
                self.rx_bytes += d_.len
                f = self.area + a
                # (the program hands over only IPv4 and 802.1Q-tagged IPv4: >= 14 / 18 bytes)
                vid = vlan_tagged_vid(f, d_.len)
                if vid != 0xFFFF:
                    if not vlan_set_has(self.vlan_ok, vid):
                        self.vlan_unconfigured += 1     # never forwarded untagged, nor onto another VLAN
                        d += 1
                        addrs[max_frames - d] = xsk_umem__extract_addr(d_.addr)
                        continue
                elif self.vlan_port:
                    self.vlan_missing += 1              # untagged on a VLAN port: not this segment's
                    d += 1
                    addrs[max_frames - d] = xsk_umem__extract_addr(d_.addr)
                    continue
                offsets[m] = <uint32_t>a
                lengths[m] = d_.len
                addrs[m] = xsk_umem__extract_addr(d_.addr)
                m += 1
            if n:
                xsk_ring_cons__release(&self.rx, n)
            self.rx_count += n
        if d:
            self.release(addrs[max_frames - d:max_frames], d)
        return m

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
        cdef uint32_t tidx = 0, queued = 0, want, off, ln, got, skip, add
        cdef uint8_t *o
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
                # 802.1Q on egress (set_vlans): `skip` bytes of the frame's own tag out,
                # `add` of the port's in.
                skip = vlan_egress_skip(&buf[0] + off, ln, self.vlan_mode)
                add = vlan_egress_add(self.vlan_mode)
                if ln - skip + add > self.frame_size:
                    self.tx_too_big += 1
                    continue
                self.n_free -= 1
                a = self.free_tx[self.n_free]
                o = self.area + a
                vlan_egress_copy(o, &buf[0] + off, ln, skip, add, self.tx_tci)
                ln = ln - skip + add
                if self.rewrite_macs:
                    memcpy(o, self.macs, 12)
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
                "fill_failed": self.fill_failed, "tx_free_frames": self.n_free,
                "rx_vlan_unconfigured": self.vlan_unconfigured, "rx_vlan_missing": self.vlan_missing,
                "rx_vlan_restored": hn_stat(self.stats_fd, 2 * self.queue + STAT_VLAN_RESTORED),
                "rx_vlan_lost": hn_stat(self.stats_fd, 2 * self.queue + STAT_VLAN_LOST)}

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
        if self.stats_fd >= 0:
            close(self.stats_fd)
