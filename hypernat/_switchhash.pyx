# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The access switch's hash in C, for a batch: which NIC each record's packet lands on.

``predict_nics`` is ``hypernat.switchhash.predict_nics`` (the readable reference, one
record at a time through ``predictable`` / ``predict_nic``) in one nogil loop: the owner's
active install predicts the return NIC of every session a loop turn built in one call.
The same hashes, bit for bit (tests/test_switchhash_compiled.py checks them against the
reference with hypothesis, every hash and field set):

    sha1      first 4 bytes (big-endian) of SHA-1 over saddr daddr sport dport proto
              (network order, 13 bytes), % n
    crc32     zlib's CRC-32 of the same 13 bytes, started from the seed, % n
    jhash     Linux jhash() over nftables' registers (saddr . daddr . sport . dport:
              16 bytes; "src": saddr alone, 4 bytes) with the seed as initval, scaled
              like the kernel (reciprocal_scale); TCP and UDP only (what nftables steers)
    toeplitz  RSS over saddr daddr (+ sport dport for TCP/UDP) under the port's key, the
              indirection table's entry at hash % its length, the NIC serving that queue

fields "src" (sha1, crc32, jhash) hashes the source address alone.  -1 where the NIC
cannot be predicted: a hash this module does not know, jhash of another protocol,
toeplitz without the port's key and table, with a key too short for the input, or onto
a queue no NIC serves.  Nothing here allocates per record or touches a Python object.
"""
import numpy as np

cimport numpy as cnp
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy

cdef enum:
    H_NONE = 0
    H_SHA1 = 1
    H_CRC32 = 2
    H_JHASH = 3
    H_TOEPLITZ = 4

cnp.import_array()

_CODES = {"sha1": H_SHA1, "crc32": H_CRC32, "jhash": H_JHASH, "toeplitz": H_TOEPLITZ}

cdef uint32_t CRC_TABLE[256]


cdef void _crc_table() noexcept:
    cdef uint32_t c, i, k
    for i in range(256):
        c = i
        for k in range(8):
            c = (c >> 1) ^ <uint32_t>0xEDB88320U if c & 1 else c >> 1
        CRC_TABLE[i] = c


_crc_table()


cdef inline uint32_t rol32(uint32_t x, int k) noexcept nogil:
    return (x << k) | (x >> (32 - k))


cdef inline uint32_t le32(const uint8_t *p, uint32_t n) noexcept nogil:
    """Up to 4 bytes read as a little-endian word (missing ones 0): jhash's tail."""
    cdef uint32_t v = 0, i
    for i in range(n if n < 4 else 4):
        v |= (<uint32_t>p[i]) << (8 * i)
    return v


cdef uint32_t jhash(const uint8_t *k, uint32_t length, uint32_t initval) noexcept nogil:
    cdef uint32_t a, b, c, x, y, z
    a = b = c = <uint32_t>0xDEADBEEFU + length + initval
    while length > 12:  # whole 12-byte groups, read as host-order words (get_unaligned_cpu32)
        memcpy(&x, k, 4)
        memcpy(&y, k + 4, 4)
        memcpy(&z, k + 8, 4)
        a += x; b += y; c += z
        a -= c; a ^= rol32(c, 4); c += b
        b -= a; b ^= rol32(a, 6); a += c
        c -= b; c ^= rol32(b, 8); b += a
        a -= c; a ^= rol32(c, 16); c += b
        b -= a; b ^= rol32(a, 19); a += c
        c -= b; c ^= rol32(b, 4); b += a
        length -= 12
        k += 12
    if length == 0:
        return c
    # the last 1..12 bytes, byte by byte: k[i] << 8 * (i % 4)
    a += le32(k, length)
    if length > 4:
        b += le32(k + 4, length - 4)
    if length > 8:
        c += le32(k + 8, length - 8)
    c ^= b; c -= rol32(b, 14)
    a ^= c; a -= rol32(c, 11)
    b ^= a; b -= rol32(a, 25)
    c ^= b; c -= rol32(b, 16)
    a ^= c; a -= rol32(c, 4)
    b ^= a; b -= rol32(a, 14)
    c ^= b; c -= rol32(b, 24)
    return c


cdef uint32_t crc32(const uint8_t *k, uint32_t length, uint32_t seed) noexcept nogil:
    cdef uint32_t c = ~seed, i
    for i in range(length):
        c = CRC_TABLE[(c ^ k[i]) & 0xFF] ^ (c >> 8)
    return ~c


cdef uint32_t sha1_head(const uint8_t *k, uint32_t length) noexcept nogil:
    """SHA-1 of one padded block (length <= 55): its first word, H0."""
    cdef uint8_t m[64]
    cdef uint32_t w[80]
    cdef uint32_t a, b, c, d, e, t, i
    for i in range(64):
        m[i] = k[i] if i < length else 0
    m[length] = 0x80
    m[62] = <uint8_t>((length * 8) >> 8)
    m[63] = <uint8_t>(length * 8)
    for i in range(16):
        w[i] = ((<uint32_t>m[4 * i]) << 24) | ((<uint32_t>m[4 * i + 1]) << 16) | ((<uint32_t>m[4 * i + 2]) << 8) \
            | m[4 * i + 3]
    for i in range(16, 80):
        w[i] = rol32(w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16], 1)
    a = 0x67452301U
    b = 0xEFCDAB89U
    c = 0x98BADCFEU
    d = 0x10325476U
    e = 0xC3D2E1F0U
    for i in range(80):  # the four rounds of 20 steps, each with its function and constant
        if i < 20:
            t = rol32(a, 5) + ((b & c) | (~b & d)) + e + 0x5A827999U + w[i]
        elif i < 40:
            t = rol32(a, 5) + (b ^ c ^ d) + e + 0x6ED9EBA1U + w[i]
        elif i < 60:
            t = rol32(a, 5) + ((b & c) | (b & d) | (c & d)) + e + 0x8F1BBCDCU + w[i]
        else:
            t = rol32(a, 5) + (b ^ c ^ d) + e + 0xCA62C1D6U + w[i]
        e = d
        d = c
        c = rol32(b, 30)
        b = a
        a = t
    return 0x67452301U + a


cdef uint32_t toeplitz(const uint8_t *key, uint32_t klen, const uint8_t *k, uint32_t length) noexcept nogil:
    cdef uint32_t h = 0, win, i, b, j
    win = ((<uint32_t>key[0]) << 24) | ((<uint32_t>key[1]) << 16) | ((<uint32_t>key[2]) << 8) | key[3]
    j = 32  # the key bit that enters the window next
    for i in range(length):
        for b in range(8):
            if k[i] & (0x80 >> b):
                h ^= win
            win = (win << 1) | ((key[j >> 3] >> (7 - (j & 7))) & 1 if j < klen * 8 else 0)
            j += 1
    return h


cdef inline void put16(uint8_t *p, uint32_t v) noexcept nogil:
    p[0] = <uint8_t>(v >> 8)
    p[1] = <uint8_t>v


cdef inline void put32(uint8_t *p, uint32_t v) noexcept nogil:
    p[0] = <uint8_t>(v >> 24)
    p[1] = <uint8_t>(v >> 16)
    p[2] = <uint8_t>(v >> 8)
    p[3] = <uint8_t>v


ctypedef struct column:      # one integer column of the batch: any stride (a record
    const char *p           # array's field), read as its own type
    Py_ssize_t stride


cdef inline uint32_t at32(const column *c, Py_ssize_t i) noexcept nogil:
    return (<const uint32_t *>(c.p + i * c.stride))[0]


cdef inline uint16_t at16(const column *c, Py_ssize_t i) noexcept nogil:
    return (<const uint16_t *>(c.p + i * c.stride))[0]


cdef void _predict(int code, uint32_t n, uint32_t seed, bint src, const column *cols, Py_ssize_t m,
                   const uint8_t *key, uint32_t klen, const int32_t *nic_of_entry, uint32_t ntab,
                   int32_t *out) noexcept nogil:
    """cols: proto, saddr, sport, daddr, dport."""
    cdef Py_ssize_t i
    cdef uint8_t buf[16]
    cdef uint8_t p
    cdef uint32_t h, ln, sa, da
    cdef uint16_t sp, dp
    for i in range(m):
        p = (<const uint8_t *>(cols[0].p + i * cols[0].stride))[0]
        sa, sp, da, dp = at32(&cols[1], i), at16(&cols[2], i), at32(&cols[3], i), at16(&cols[4], i)
        if code == H_JHASH:
            if p != 6 and p != 17:
                out[i] = -1
                continue
            if src:
                put32(buf, sa)
                h = jhash(buf, 4, seed)
            else:
                put32(buf, sa)
                put32(buf + 4, da)
                put16(buf + 8, sp)
                buf[10] = buf[11] = 0
                put16(buf + 12, dp)
                buf[14] = buf[15] = 0
                h = jhash(buf, 16, seed)
            out[i] = <int32_t>((<uint64_t>h * n) >> 32)
        elif code == H_TOEPLITZ:
            ln = 12 if p == 6 or p == 17 else 8
            if klen < ln + 4 or ntab == 0:
                out[i] = -1
                continue
            put32(buf, sa)
            put32(buf + 4, da)
            put16(buf + 8, sp)
            put16(buf + 10, dp)
            out[i] = nic_of_entry[toeplitz(key, klen, buf, ln) % ntab]
        else:  # sha1, crc32: saddr daddr sport dport proto, network order
            put32(buf, sa)
            if src:
                buf[4] = buf[5] = buf[6] = buf[7] = buf[8] = buf[9] = buf[10] = buf[11] = buf[12] = 0
            else:
                put32(buf + 4, da)
                put16(buf + 8, sp)
                put16(buf + 10, dp)
                buf[12] = p
            h = sha1_head(buf, 13) if code == H_SHA1 else crc32(buf, 13, seed)
            out[i] = <int32_t>(h % n)


_COL_TYPES = (np.uint8, np.uint32, np.uint16, np.uint32, np.uint16)


def predict_nics(str name, int n, proto, saddr, sport, daddr, dport, seed=0, str fields="5-tuple", rss=None):
    """``hypernat.switchhash.predict_nics`` in C: the NIC (0..n-1) of every record
    (int32 array), -1 where it cannot be predicted.  Columns: proto u1, saddr u4,
    sport u2, daddr u4, dport u2 (integer sequences of one length: a record array's
    fields are read in place, anything else converted)."""
    if n < 1:
        raise ValueError(f"n must be at least 1, not {n}")
    cdef int code = _CODES.get(name, H_NONE)
    cdef column cols[5]
    cdef list keep = []  # the arrays the columns point into
    cdef cnp.ndarray a
    cdef Py_ssize_t m = -1, k
    for k, x in enumerate((proto, saddr, sport, daddr, dport)):
        a = np.asarray(x, _COL_TYPES[k])
        if a.ndim != 1 or (m >= 0 and a.shape[0] != m):
            raise ValueError("predict_nics: columns of different lengths (or not 1-D)")
        m = a.shape[0]
        if not cnp.PyArray_ISALIGNED(a) or not cnp.PyArray_ISNOTSWAPPED(a):
            a = np.ascontiguousarray(a, a.dtype.newbyteorder("="))
        keep.append(a)
        cols[k].p = <const char *>cnp.PyArray_DATA(a)
        cols[k].stride = cnp.PyArray_STRIDE(a, 0)
    if code == H_NONE or (code == H_TOEPLITZ and rss is None) or m == 0:
        return np.full(m, -1, np.int32)
    cdef bytes key = b""
    cdef int32_t none = -1
    cdef const int32_t *noe = &none
    cdef uint32_t ntab = 0
    cdef cnp.ndarray nic_of_entry
    if code == H_TOEPLITZ:
        key, table, nic_of_queue = rss
        key = bytes(key)
        nic_of_entry = np.array([nic_of_queue.get(q, -1) for q in table] or [-1], np.int32)
        noe = <const int32_t *>cnp.PyArray_DATA(nic_of_entry)
        ntab = len(table)
    cdef const uint8_t *kp = key
    cdef uint32_t klen = len(key)
    cdef uint32_t s = <uint32_t>(int(seed) & 0xFFFFFFFF)
    cdef bint src = fields == "src"
    cdef cnp.ndarray out = np.empty(m, np.int32)  # every record written below
    cdef int32_t *o = <int32_t *>cnp.PyArray_DATA(out)
    with nogil:
        _predict(code, <uint32_t>n, s, src, cols, m, kp, klen, noe, ntab, o)
    return out
