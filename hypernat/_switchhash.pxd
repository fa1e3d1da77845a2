# cython: language_level=3
"""C interface of hypernat._switchhash (see there): the access switch's hashes over one
packet's tuple, declared once for every compiled caller."""
from libc.stdint cimport uint8_t, uint16_t, uint32_t

# Linux jhash(key, length, initval) (include/linux/jhash.h)
cdef uint32_t jhash(const uint8_t *k, uint32_t length, uint32_t initval) noexcept nogil
# zlib.crc32(data, seed)
cdef uint32_t crc32(const uint8_t *k, uint32_t length, uint32_t seed) noexcept nogil
# the first 4 bytes (big-endian) of SHA-1 over at most 55 bytes
cdef uint32_t sha1_head(const uint8_t *k, uint32_t length) noexcept nogil
# RSS: the Toeplitz hash of `length` bytes under a key of `klen` bytes (klen >= length + 4)
cdef uint32_t toeplitz(const uint8_t *key, uint32_t klen, const uint8_t *k, uint32_t length) noexcept nogil
