/* CPU kernels for the bitfx bitmap format (see bitfx/format.py).
 *
 * Plain C, no torch headers: it builds in about a second with the system C
 * compiler and is loaded through ctypes, which releases the GIL during calls.
 * Blocks of BLOCK elements are independent, so every pass is an OpenMP loop
 * over blocks; element data is moved as same-width unsigned integers.
 */
#include <stdint.h>
#include <string.h>

#define BLOCK 1024
#define BM_BYTES (BLOCK / 8)

static inline int64_t block_len(int64_t b, int64_t n) {
    int64_t rest = n - b * BLOCK;
    return rest < BLOCK ? rest : BLOCK;
}

#define DEFINE_KERNELS(T)                                                          \
static int64_t count_##T(const T *src, int64_t len) {                             \
    int64_t c = 0;                                                                 \
    for (int64_t i = 0; i < len; i++) c += src[i] != 0;                            \
    return c;                                                                      \
}                                                                                  \
static void compress_block_##T(const T *src, int64_t len, uint8_t *bm, T *dst) {  \
    T local[BLOCK];                                                                \
    int64_t k = 0;                                                                 \
    memset(bm, 0, BM_BYTES);                                                       \
    for (int64_t i = 0; i < len; i++) {                                            \
        T v = src[i];                                                              \
        int nz = v != 0;                                                           \
        bm[i >> 3] |= (uint8_t)(nz << (i & 7));                                    \
        local[k] = v; /* branch-free compaction into a private buffer */          \
        k += nz;                                                                   \
    }                                                                              \
    memcpy(dst, local, (size_t)k * sizeof(T));                                     \
}                                                                                  \
/* may_overread: vals[k] is readable even one past this block's last value  \
 * (true unless the block's values end the payload); then the loop reads      \
 * unconditionally and masks, with no data-dependent branch. */               \
static void decompress_block_##T(const uint8_t *bm, const T *vals, int64_t len,   \
                                 T *out, int may_overread) {                       \
    int64_t k = 0;                                                                 \
    if (may_overread) {                                                            \
        for (int64_t i = 0; i < len; i++) {                                        \
            T bit = (T)((bm[i >> 3] >> (i & 7)) & 1);                              \
            out[i] = vals[k] & (T)((T)0 - bit);                                    \
            k += bit;                                                              \
        }                                                                          \
        return;                                                                    \
    }                                                                              \
    for (int64_t i = 0; i < len; i++) {                                            \
        int bit = (bm[i >> 3] >> (i & 7)) & 1;                                     \
        out[i] = bit ? vals[k] : (T)0;                                             \
        k += bit;                                                                  \
    }                                                                              \
}

DEFINE_KERNELS(uint8_t)
DEFINE_KERNELS(uint16_t)
DEFINE_KERNELS(uint32_t)
DEFINE_KERNELS(uint64_t)

#define DISPATCH(itemsize, CALL)                      \
    switch (itemsize) {                               \
        case 1: { typedef uint8_t T; CALL; } break;  \
        case 2: { typedef uint16_t T; CALL; } break; \
        case 4: { typedef uint32_t T; CALL; } break; \
        case 8: { typedef uint64_t T; CALL; } break; \
        default: return -1;                           \
    }

/* offsets[b] = nonzeros before block b; returns the total. */
int64_t bitfx_count(const void *src, int64_t n, int itemsize, int64_t *offsets, int nthreads) {
    int64_t nblocks = (n + BLOCK - 1) / BLOCK;
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t b = 0; b < nblocks; b++) {
        int64_t len = block_len(b, n);
        int64_t c = 0;
        switch (itemsize) {
            case 1: c = count_uint8_t((const uint8_t *)src + b * BLOCK, len); break;
            case 2: c = count_uint16_t((const uint16_t *)src + b * BLOCK, len); break;
            case 4: c = count_uint32_t((const uint32_t *)src + b * BLOCK, len); break;
            case 8: c = count_uint64_t((const uint64_t *)src + b * BLOCK, len); break;
        }
        offsets[b + 1] = c;
    }
    offsets[0] = 0;
    for (int64_t b = 0; b < nblocks; b++) offsets[b + 1] += offsets[b];
    return offsets[nblocks];
}

int bitfx_compress(const void *src, int64_t n, int itemsize, const int64_t *offsets,
                   uint8_t *bitmap, void *values, int nthreads) {
    int64_t nblocks = (n + BLOCK - 1) / BLOCK;
    if (itemsize != 1 && itemsize != 2 && itemsize != 4 && itemsize != 8) return -1;
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t b = 0; b < nblocks; b++) {
        int64_t len = block_len(b, n);
        uint8_t *bm = bitmap + b * BM_BYTES;
        switch (itemsize) {
            case 1: compress_block_uint8_t((const uint8_t *)src + b * BLOCK, len, bm, (uint8_t *)values + offsets[b]); break;
            case 2: compress_block_uint16_t((const uint16_t *)src + b * BLOCK, len, bm, (uint16_t *)values + offsets[b]); break;
            case 4: compress_block_uint32_t((const uint32_t *)src + b * BLOCK, len, bm, (uint32_t *)values + offsets[b]); break;
            case 8: compress_block_uint64_t((const uint64_t *)src + b * BLOCK, len, bm, (uint64_t *)values + offsets[b]); break;
        }
    }
    return 0;
}

int bitfx_decompress(const int64_t *offsets, const uint8_t *bitmap, const void *values,
                     int64_t n, int itemsize, void *out, int nthreads) {
    int64_t nblocks = (n + BLOCK - 1) / BLOCK;
    if (itemsize != 1 && itemsize != 2 && itemsize != 4 && itemsize != 8) return -1;
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t b = 0; b < nblocks; b++) {
        int64_t len = block_len(b, n);
        const uint8_t *bm = bitmap + b * BM_BYTES;
        int over = offsets[b + 1] < offsets[nblocks];
        switch (itemsize) {
            case 1: decompress_block_uint8_t(bm, (const uint8_t *)values + offsets[b], len, (uint8_t *)out + b * BLOCK, over); break;
            case 2: decompress_block_uint16_t(bm, (const uint16_t *)values + offsets[b], len, (uint16_t *)out + b * BLOCK, over); break;
            case 4: decompress_block_uint32_t(bm, (const uint32_t *)values + offsets[b], len, (uint32_t *)out + b * BLOCK, over); break;
            case 8: decompress_block_uint64_t(bm, (const uint64_t *)values + offsets[b], len, (uint64_t *)out + b * BLOCK, over); break;
        }
    }
    return 0;
}

/* Bool masks: 1 bit per element, LSB first, no blocks. */
void bitfx_pack_bool(const uint8_t *src, int64_t n, uint8_t *out, int nthreads) {
    int64_t nbytes = (n + 7) / 8;
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t j = 0; j < nbytes; j++) {
        uint8_t byte = 0;
        int64_t base = j * 8;
        int64_t len = n - base < 8 ? n - base : 8;
        for (int64_t k = 0; k < len; k++) byte |= (uint8_t)((src[base + k] != 0) << k);
        out[j] = byte;
    }
}

void bitfx_unpack_bool(const uint8_t *packed, int64_t n, uint8_t *out, int nthreads) {
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t i = 0; i < n; i++) out[i] = (packed[i >> 3] >> (i & 7)) & 1;
}
