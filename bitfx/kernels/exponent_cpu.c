/* CPU kernels for the bitfx exponent codec (see "The exponent codec" in
 * bitfx/format.py; the torch reference is bitfx/kernels/torch_ref.py).
 *
 * Plain C that is also valid C++, built into the same library as
 * bitmap_cpu.c and reached the same way (ctypes from cpu_ext.py).
 *
 * Encoding is two passes over the values, as the format needs the sum of
 * the widths to size the stream before anything is written:
 *   1. bitfx_exp_header: each group's base and width (sizing);
 *   2. bitfx_exp_encode: the lo planes and the delta planes (writing).
 * Decoding is one pass.  Groups of 32 are independent once the prefix sum of
 * the widths places them, so each pass is an OpenMP loop over groups; the
 * prefix sum is split the same way (each thread sums its own chunk first).
 *
 * Inner loops run over a group's 32 values with no branches, written for the
 * compiler to vectorize (-O3 on baseline x86-64 gives SSE2; that suffices to
 * meet the codec's speed target, see benchmarks/kernels.py).  A delta plane
 * is gathered 8 values at a time with one multiply, as pack8 in bitmap_cpu.c.
 */
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#define BITFX_OMP_IDS(t, n) ((t) = omp_get_thread_num(), (n) = omp_get_num_threads())
#else
#define BITFX_OMP_IDS(t, n) ((void)0)
#endif

#ifdef __cplusplus
extern "C" {
#endif

#define GROUP 32
#define MAX_THREADS 256

static uint64_t EXP_SPREAD[256]; /* byte m -> 8 bytes, byte t = bit t of m */

__attribute__((constructor)) static void exp_init(void) {
    for (int m = 0; m < 256; m++) {
        uint64_t spread = 0;
        for (int t = 0; t < 8; t++) spread |= (uint64_t)((m >> t) & 1) << (8 * t);
        EXP_SPREAD[m] = spread;
    }
}

static inline int bit_length(unsigned v) { return v ? 32 - __builtin_clz(v) : 0; }

static inline int64_t group_len(int64_t g, int64_t k) {
    int64_t rest = k - g * GROUP;
    return rest < GROUP ? rest : GROUP;
}

/* hi of a value: bits w-9 .. w-2 (the exponent of fp32 and bf16). */
#define HI32(x) (((x) >> 23) & 0xFFu)
#define HI16(x) (((x) >> 7) & 0xFFu)

static void header_group(const void *src, int itemsize, int64_t len, uint8_t *base, uint8_t *width) {
    unsigned mn = 255, mx = 0;
    if (itemsize == 4) {
        const uint32_t *s = (const uint32_t *)src;
        for (int64_t i = 0; i < len; i++) {
            unsigned h = HI32(s[i]);
            mn = h < mn ? h : mn;
            mx = h > mx ? h : mx;
        }
    } else {
        const uint16_t *s = (const uint16_t *)src;
        for (int64_t i = 0; i < len; i++) {
            unsigned h = HI16(s[i]);
            mn = h < mn ? h : mn;
            mx = h > mx ? h : mx;
        }
    }
    if (len == 0) mn = mx = 0;
    *base = (uint8_t)mn;
    *width = (uint8_t)bit_length(mx - mn);
}

/* Pass 1: base and width of every group into header (2 * ngroups bytes);
 * returns the sum of the widths, or -1 for an itemsize the codec does not take. */
int64_t bitfx_exp_header(const void *src, int64_t k, int itemsize, uint8_t *header, int nthreads) {
    if (itemsize != 2 && itemsize != 4) return -1;
    int64_t ng = (k + GROUP - 1) / GROUP, sum = 0;
    #pragma omp parallel for num_threads(nthreads) schedule(static) reduction(+ : sum)
    for (int64_t g = 0; g < ng; g++) {
        header_group((const char *)src + g * GROUP * itemsize, itemsize, group_len(g, k), header + g,
                     header + ng + g);
        sum += header[ng + g];
    }
    return sum;
}

/* Plane j of 32 deltas: bit i = bit j of d[i]; 8 values per multiply. */
static inline void write_plane(const uint8_t *d, int j, uint8_t *dst) {
    for (int q = 0; q < 4; q++) {
        uint64_t w;
        memcpy(&w, d + 8 * q, 8);
        dst[q] = (uint8_t)((((w >> j) & 0x0101010101010101ULL) * 0x0102040810204080ULL) >> 56);
    }
}

static void encode_group(const void *src, int itemsize, int64_t k, int64_t g, uint8_t base, int width,
                         uint8_t *stream, uint8_t *deltas) {
    int64_t len = group_len(g, k), first = g * GROUP;
    uint8_t d[GROUP];
    memset(d, 0, sizeof d); /* padding: hi = base */
    if (itemsize == 4) {
        const uint32_t *s = (const uint32_t *)src + first;
        uint8_t *p0 = stream + first, *p1 = stream + k + first, *p2 = stream + 2 * k + first;
        for (int64_t i = 0; i < len; i++) {
            uint32_t x = s[i];
            d[i] = (uint8_t)(HI32(x) - base);
            p0[i] = (uint8_t)x;
            p1[i] = (uint8_t)(x >> 8);
            p2[i] = (uint8_t)(((x >> 16) & 0x7Fu) | ((x >> 31) << 7));
        }
    } else {
        const uint16_t *s = (const uint16_t *)src + first;
        uint8_t *p0 = stream + first;
        for (int64_t i = 0; i < len; i++) {
            uint16_t x = s[i];
            d[i] = (uint8_t)(HI16(x) - base);
            p0[i] = (uint8_t)((x & 0x7Fu) | ((x >> 15) << 7));
        }
    }
    for (int j = 0; j < width; j++) write_plane(d, j, deltas + 4 * j);
}

static void decode_group(const uint8_t *stream, int itemsize, int64_t k, int64_t g, uint8_t base, int width,
                         const uint8_t *deltas, void *out) {
    int64_t len = group_len(g, k), first = g * GROUP;
    uint64_t dw[4] = {0, 0, 0, 0};
    for (int j = 0; j < width; j++)
        for (int q = 0; q < 4; q++) dw[q] |= EXP_SPREAD[deltas[4 * j + q]] << j;
    uint8_t h[GROUP];
    memcpy(h, dw, sizeof h); /* little-endian: byte i of dw is value i's delta */
    for (int i = 0; i < GROUP; i++) h[i] = (uint8_t)(h[i] + base);
    if (itemsize == 4) {
        uint32_t *o = (uint32_t *)out + first;
        const uint8_t *p0 = stream + first, *p1 = stream + k + first, *p2 = stream + 2 * k + first;
        for (int64_t i = 0; i < len; i++) {
            uint32_t lo2 = p2[i];
            o[i] = ((lo2 >> 7) << 31) | ((uint32_t)h[i] << 23) | ((lo2 & 0x7Fu) << 16) | ((uint32_t)p1[i] << 8) |
                   p0[i];
        }
    } else {
        uint16_t *o = (uint16_t *)out + first;
        const uint8_t *p0 = stream + first;
        for (int64_t i = 0; i < len; i++) {
            unsigned lo = p0[i];
            o[i] = (uint16_t)(((lo >> 7) << 15) | ((unsigned)h[i] << 7) | (lo & 0x7Fu));
        }
    }
}

/* Runs body(g, delta offset in words) for every group, threads over chunks of
 * groups, each chunk placed by a prefix sum of the widths before it. */
#define FOR_GROUPS_PLACED(width, ng, nthreads, body)                                   \
    do {                                                                               \
        int64_t partial_[MAX_THREADS + 1];                                             \
        int nt_ = (nthreads) < 1 ? 1 : (nthreads) > MAX_THREADS ? MAX_THREADS : (nthreads); \
        _Pragma("omp parallel num_threads(nt_)")                                      \
        {                                                                              \
            int t_ = 0, n_ = 1;                                                        \
            BITFX_OMP_IDS(t_, n_);                                                     \
            int64_t lo_ = (ng) * t_ / n_, hi_ = (ng) * (t_ + 1) / n_, s_ = 0;          \
            for (int64_t g = lo_; g < hi_; g++) s_ += (width)[g];                      \
            partial_[t_ + 1] = s_;                                                     \
            _Pragma("omp barrier")                                                     \
            int64_t words = 0;                                                         \
            for (int u = 0; u < t_; u++) words += partial_[u + 1];                     \
            for (int64_t g = lo_; g < hi_; g++) {                                      \
                body;                                                                  \
                words += (width)[g];                                                   \
            }                                                                          \
        }                                                                              \
    } while (0)

/* Pass 2: the stream's lo planes and delta planes; its header (pass 1's
 * output) is already in place.  Returns 0, or -1 for a bad itemsize. */
int bitfx_exp_encode(const void *src, int64_t k, int itemsize, uint8_t *stream, int nthreads) {
    if (itemsize != 2 && itemsize != 4) return -1;
    int64_t ng = (k + GROUP - 1) / GROUP;
    const uint8_t *base = stream + k * (itemsize - 1), *width = base + ng;
    uint8_t *deltas = stream + k * (itemsize - 1) + 2 * ng;
    FOR_GROUPS_PLACED(width, ng, nthreads,
                      encode_group(src, itemsize, k, g, base[g], width[g], stream, deltas + 4 * words));
    return 0;
}

/* The caller has checked the stream's length against its widths (all <= 8). */
int bitfx_exp_decode(const uint8_t *stream, int64_t k, int itemsize, void *out, int nthreads) {
    if (itemsize != 2 && itemsize != 4) return -1;
    int64_t ng = (k + GROUP - 1) / GROUP;
    const uint8_t *base = stream + k * (itemsize - 1), *width = base + ng;
    const uint8_t *deltas = stream + k * (itemsize - 1) + 2 * ng;
    FOR_GROUPS_PLACED(width, ng, nthreads,
                      decode_group(stream, itemsize, k, g, base[g], width[g], deltas + 4 * words, out));
    return 0;
}

#ifdef __cplusplus
}
#endif
