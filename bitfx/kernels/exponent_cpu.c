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
 * Each pass has a portable scalar version (a delta plane gathered 8 values
 * at a time with one multiply, as pack8 in bitmap_cpu.c) and, on x86-64, an
 * AVX2 one built with a target attribute, as bitmap_cpu.c's kernels: a
 * group of 32 values is 4 (fp32) or 2 (16-bit) registers, its byte planes
 * split or joined by shuffles, a delta plane written by one movemask and
 * read back by a compare.  The scalar loops ran at 3-10x a memory copy
 * (benchmarks/kernel_speed.py), bound by their per-value work, not by
 * memory.  A thread's whole range of groups runs inside one function of its
 * ISA, so that the group kernel inlines: a call per group of 32 costs as
 * much as moving the group.  Groups short of 32 (the last one) run scalar.
 * bitfx_exp_set_isa() picks the version, as bitfx_set_isa() does for the
 * bitmap (which calls it); all write the same bytes.
 */
#include <stdint.h>
#include <string.h>
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define BITFX_EXP_AVX2 1
#endif
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

/* ---- a thread's range of groups, per ISA ------------------------------- */

/* header: base[g], width[g] for g in [g0, g1); returns the sum of the widths. */
typedef int64_t (*exp_header_fn)(const void *src, int64_t k, int64_t g0, int64_t g1, uint8_t *base, uint8_t *width);
/* deltas: where group g0's delta planes go (or come from). */
typedef void (*exp_encode_fn)(const void *src, int64_t k, int64_t g0, int64_t g1, const uint8_t *base,
                              const uint8_t *width, uint8_t *stream, uint8_t *deltas);
typedef void (*exp_decode_fn)(const uint8_t *stream, int64_t k, int64_t g0, int64_t g1, const uint8_t *base,
                              const uint8_t *width, const uint8_t *deltas, void *out);

#define DEFINE_SCALAR_RANGES(ISZ)                                                                         \
    static int64_t header_scalar_##ISZ(const void *src, int64_t k, int64_t g0, int64_t g1, uint8_t *base,  \
                                       uint8_t *width) {                                                  \
        int64_t sum = 0;                                                                                  \
        for (int64_t g = g0; g < g1; g++) {                                                               \
            header_group((const char *)src + g * GROUP * ISZ, ISZ, group_len(g, k), base + g, width + g); \
            sum += width[g];                                                                              \
        }                                                                                                 \
        return sum;                                                                                       \
    }                                                                                                     \
    static void encode_scalar_##ISZ(const void *src, int64_t k, int64_t g0, int64_t g1, const uint8_t *base, \
                                    const uint8_t *width, uint8_t *stream, uint8_t *deltas) {             \
        for (int64_t g = g0; g < g1; g++) {                                                               \
            encode_group(src, ISZ, k, g, base[g], width[g], stream, deltas);                              \
            deltas += 4 * width[g];                                                                       \
        }                                                                                                 \
    }                                                                                                     \
    static void decode_scalar_##ISZ(const uint8_t *stream, int64_t k, int64_t g0, int64_t g1,             \
                                    const uint8_t *base, const uint8_t *width, const uint8_t *deltas,     \
                                    void *out) {                                                          \
        for (int64_t g = g0; g < g1; g++) {                                                               \
            decode_group(stream, ISZ, k, g, base[g], width[g], deltas, out);                              \
            deltas += 4 * width[g];                                                                       \
        }                                                                                                 \
    }
DEFINE_SCALAR_RANGES(2)
DEFINE_SCALAR_RANGES(4)

#ifdef BITFX_EXP_AVX2
#define AVX2 __attribute__((target("avx2")))

AVX2 static inline unsigned hmin_epu32(__m256i v) {
    __m128i m = _mm_min_epu32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    m = _mm_min_epu32(m, _mm_shuffle_epi32(m, 0x4E));
    m = _mm_min_epu32(m, _mm_shuffle_epi32(m, 0xB1));
    return (unsigned)_mm_cvtsi128_si32(m);
}

AVX2 static inline unsigned hmax_epu32(__m256i v) {
    __m128i m = _mm_max_epu32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    m = _mm_max_epu32(m, _mm_shuffle_epi32(m, 0x4E));
    m = _mm_max_epu32(m, _mm_shuffle_epi32(m, 0xB1));
    return (unsigned)_mm_cvtsi128_si32(m);
}

/* hi of 32 values, as 32-bit lanes (fp32) */
AVX2 static void header_group_avx2_4(const void *src, uint8_t *base, uint8_t *width) {
    const __m256i *s = (const __m256i *)src, ff = _mm256_set1_epi32(0xFF);
    __m256i mn = _mm256_set1_epi32(255), mx = _mm256_setzero_si256();
    for (int q = 0; q < 4; q++) {
        __m256i h = _mm256_and_si256(_mm256_srli_epi32(_mm256_loadu_si256(s + q), 23), ff);
        mn = _mm256_min_epu32(mn, h);
        mx = _mm256_max_epu32(mx, h);
    }
    unsigned lo = hmin_epu32(mn), hi = hmax_epu32(mx);
    *base = (uint8_t)lo;
    *width = (uint8_t)bit_length(hi - lo);
}

AVX2 static void header_group_avx2_2(const void *src, uint8_t *base, uint8_t *width) {
    const __m256i *s = (const __m256i *)src, ff = _mm256_set1_epi16(0xFF);
    __m256i h0 = _mm256_and_si256(_mm256_srli_epi16(_mm256_loadu_si256(s), 7), ff);
    __m256i h1 = _mm256_and_si256(_mm256_srli_epi16(_mm256_loadu_si256(s + 1), 7), ff);
    __m256i mn = _mm256_min_epu16(h0, h1), mx = _mm256_max_epu16(h0, h1);
    /* widen to 32-bit lanes for the shared reductions */
    __m256i mn32 = _mm256_min_epu32(_mm256_and_si256(mn, _mm256_set1_epi32(0xFFFF)), _mm256_srli_epi32(mn, 16));
    __m256i mx32 = _mm256_max_epu32(_mm256_and_si256(mx, _mm256_set1_epi32(0xFFFF)), _mm256_srli_epi32(mx, 16));
    unsigned lo = hmin_epu32(mn32), hi = hmax_epu32(mx32);
    *base = (uint8_t)lo;
    *width = (uint8_t)bit_length(hi - lo);
}

/* The delta planes of 32 hi bytes: plane j's 32 bits, bit i = bit j of delta i. */
AVX2 static inline void write_planes_avx2(__m256i h, uint8_t base, int width, uint8_t *deltas) {
    __m256i d = _mm256_sub_epi8(h, _mm256_set1_epi8((char)base));
    for (int j = 0; j < width; j++) {
        uint32_t m = (uint32_t)_mm256_movemask_epi8(_mm256_sll_epi16(d, _mm_cvtsi32_si128(7 - j)));
        memcpy(deltas + 4 * j, &m, 4);
    }
}

AVX2 static inline __m256i read_planes_avx2(const uint8_t *deltas, int width, uint8_t base) {
    const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                            2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
    const __m256i bits = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    __m256i d = _mm256_setzero_si256();
    for (int j = 0; j < width; j++) {
        uint32_t m;
        memcpy(&m, deltas + 4 * j, 4);
        __m256i b = _mm256_shuffle_epi8(_mm256_set1_epi32((int)m), spread);
        __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(b, bits), bits);
        d = _mm256_or_si256(d, _mm256_and_si256(set, _mm256_set1_epi8((char)(1 << j))));
    }
    return _mm256_add_epi8(d, _mm256_set1_epi8((char)base));
}

AVX2 static void encode_group_avx2_4(const void *src, int64_t k, int64_t first, uint8_t base, int width,
                                     uint8_t *stream, uint8_t *deltas) {
    const __m256i *s = (const __m256i *)((const uint32_t *)src + first);
    const __m256i lanes = _mm256_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15,
                                           0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    const __m256i quads = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    __m256i r[4];
    for (int q = 0; q < 4; q++) {
        __m256i x = _mm256_loadu_si256(s + q);
        /* byte 2: mantissa bits 16..22 and the sign; byte 3: hi (the exponent) */
        __m256i b2 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(0x7F)),
                                     _mm256_and_si256(_mm256_srli_epi32(x, 24), _mm256_set1_epi32(0x80)));
        __m256i h = _mm256_srli_epi32(x, 23); /* 9 bits: the sign is shifted out below */
        __m256i y = _mm256_or_si256(_mm256_and_si256(x, _mm256_set1_epi32(0xFFFF)),
                                    _mm256_or_si256(_mm256_slli_epi32(b2, 16), _mm256_slli_epi32(h, 24)));
        r[q] = _mm256_permutevar8x32_epi32(_mm256_shuffle_epi8(y, lanes), quads);
    }
    __m256i a = _mm256_unpacklo_epi64(r[0], r[1]), b = _mm256_unpackhi_epi64(r[0], r[1]);
    __m256i c = _mm256_unpacklo_epi64(r[2], r[3]), d = _mm256_unpackhi_epi64(r[2], r[3]);
    _mm256_storeu_si256((__m256i *)(stream + first), _mm256_permute2x128_si256(a, c, 0x20));
    _mm256_storeu_si256((__m256i *)(stream + k + first), _mm256_permute2x128_si256(b, d, 0x20));
    _mm256_storeu_si256((__m256i *)(stream + 2 * k + first), _mm256_permute2x128_si256(a, c, 0x31));
    write_planes_avx2(_mm256_permute2x128_si256(b, d, 0x31), base, width, deltas);
}

AVX2 static void encode_group_avx2_2(const void *src, int64_t k, int64_t first, uint8_t base, int width,
                                     uint8_t *stream, uint8_t *deltas) {
    (void)k;
    const __m256i *s = (const __m256i *)((const uint16_t *)src + first);
    __m256i x0 = _mm256_loadu_si256(s), x1 = _mm256_loadu_si256(s + 1);
    const __m256i m7f = _mm256_set1_epi16(0x7F), m80 = _mm256_set1_epi16(0x80), ff = _mm256_set1_epi16(0xFF);
    __m256i p0 = _mm256_or_si256(_mm256_and_si256(x0, m7f), _mm256_and_si256(_mm256_srli_epi16(x0, 8), m80));
    __m256i p1 = _mm256_or_si256(_mm256_and_si256(x1, m7f), _mm256_and_si256(_mm256_srli_epi16(x1, 8), m80));
    __m256i h0 = _mm256_and_si256(_mm256_srli_epi16(x0, 7), ff), h1 = _mm256_and_si256(_mm256_srli_epi16(x1, 7), ff);
    __m256i lo = _mm256_permute4x64_epi64(_mm256_packus_epi16(p0, p1), 0xD8);
    __m256i h = _mm256_permute4x64_epi64(_mm256_packus_epi16(h0, h1), 0xD8);
    _mm256_storeu_si256((__m256i *)(stream + first), lo);
    write_planes_avx2(h, base, width, deltas);
}

AVX2 static void decode_group_avx2_4(const uint8_t *stream, int64_t k, int64_t first, uint8_t base, int width,
                                     const uint8_t *deltas, void *out) {
    __m256i h = read_planes_avx2(deltas, width, base);
    __m256i p0 = _mm256_loadu_si256((const __m256i *)(stream + first));
    __m256i p1 = _mm256_loadu_si256((const __m256i *)(stream + k + first));
    __m256i p2 = _mm256_loadu_si256((const __m256i *)(stream + 2 * k + first));
    const __m256i m7f = _mm256_set1_epi8(0x7F), m80 = _mm256_set1_epi8((char)0x80);
    __m256i b2 = _mm256_or_si256(_mm256_and_si256(p2, m7f), _mm256_and_si256(_mm256_slli_epi16(h, 7), m80));
    __m256i b3 = _mm256_or_si256(_mm256_and_si256(p2, m80), _mm256_and_si256(_mm256_srli_epi16(h, 1), m7f));
    __m256i lo01 = _mm256_unpacklo_epi8(p0, p1), hi01 = _mm256_unpackhi_epi8(p0, p1);
    __m256i lo23 = _mm256_unpacklo_epi8(b2, b3), hi23 = _mm256_unpackhi_epi8(b2, b3);
    __m256i v0 = _mm256_unpacklo_epi16(lo01, lo23), v1 = _mm256_unpackhi_epi16(lo01, lo23);
    __m256i v2 = _mm256_unpacklo_epi16(hi01, hi23), v3 = _mm256_unpackhi_epi16(hi01, hi23);
    __m256i *o = (__m256i *)((uint32_t *)out + first);
    _mm256_storeu_si256(o, _mm256_permute2x128_si256(v0, v1, 0x20));
    _mm256_storeu_si256(o + 1, _mm256_permute2x128_si256(v2, v3, 0x20));
    _mm256_storeu_si256(o + 2, _mm256_permute2x128_si256(v0, v1, 0x31));
    _mm256_storeu_si256(o + 3, _mm256_permute2x128_si256(v2, v3, 0x31));
}

AVX2 static void decode_group_avx2_2(const uint8_t *stream, int64_t k, int64_t first, uint8_t base, int width,
                                     const uint8_t *deltas, void *out) {
    (void)k;
    __m256i h = read_planes_avx2(deltas, width, base);
    __m256i p = _mm256_loadu_si256((const __m256i *)(stream + first));
    __m256i *o = (__m256i *)((uint16_t *)out + first);
    const __m256i m7f = _mm256_set1_epi16(0x7F), m80 = _mm256_set1_epi16(0x80);
    for (int half = 0; half < 2; half++) {
        __m256i pw = _mm256_cvtepu8_epi16(half ? _mm256_extracti128_si256(p, 1) : _mm256_castsi256_si128(p));
        __m256i hw = _mm256_cvtepu8_epi16(half ? _mm256_extracti128_si256(h, 1) : _mm256_castsi256_si128(h));
        __m256i v = _mm256_or_si256(_mm256_or_si256(_mm256_and_si256(pw, m7f), _mm256_slli_epi16(hw, 7)),
                                    _mm256_slli_epi16(_mm256_and_si256(pw, m80), 8));
        _mm256_storeu_si256(o + half, v);
    }
}

/* Whole groups through the AVX2 kernels; a last group short of 32 scalar. */
#define DEFINE_AVX2_RANGES(ISZ)                                                                           \
    AVX2 static int64_t header_avx2_##ISZ(const void *src, int64_t k, int64_t g0, int64_t g1, uint8_t *base, \
                                          uint8_t *width) {                                               \
        int64_t sum = 0;                                                                                  \
        for (int64_t g = g0; g < g1; g++) {                                                               \
            const char *s = (const char *)src + g * GROUP * ISZ;                                          \
            if (group_len(g, k) == GROUP)                                                                 \
                header_group_avx2_##ISZ(s, base + g, width + g);                                          \
            else                                                                                          \
                header_group(s, ISZ, group_len(g, k), base + g, width + g);                               \
            sum += width[g];                                                                              \
        }                                                                                                 \
        return sum;                                                                                       \
    }                                                                                                     \
    AVX2 static void encode_avx2_##ISZ(const void *src, int64_t k, int64_t g0, int64_t g1, const uint8_t *base, \
                                       const uint8_t *width, uint8_t *stream, uint8_t *deltas) {          \
        for (int64_t g = g0; g < g1; g++) {                                                               \
            if (group_len(g, k) == GROUP)                                                                 \
                encode_group_avx2_##ISZ(src, k, g * GROUP, base[g], width[g], stream, deltas);            \
            else                                                                                          \
                encode_group(src, ISZ, k, g, base[g], width[g], stream, deltas);                          \
            deltas += 4 * width[g];                                                                       \
        }                                                                                                 \
    }                                                                                                     \
    AVX2 static void decode_avx2_##ISZ(const uint8_t *stream, int64_t k, int64_t g0, int64_t g1,          \
                                       const uint8_t *base, const uint8_t *width, const uint8_t *deltas,  \
                                       void *out) {                                                       \
        for (int64_t g = g0; g < g1; g++) {                                                               \
            if (group_len(g, k) == GROUP)                                                                 \
                decode_group_avx2_##ISZ(stream, k, g * GROUP, base[g], width[g], deltas, out);            \
            else                                                                                          \
                decode_group(stream, ISZ, k, g, base[g], width[g], deltas, out);                          \
            deltas += 4 * width[g];                                                                       \
        }                                                                                                 \
    }
DEFINE_AVX2_RANGES(2)
DEFINE_AVX2_RANGES(4)
#endif

/* By item size (0: 2 bytes, 1: 4 bytes); set by bitfx_exp_set_isa. */
static exp_header_fn EXP_HEADER[2] = {header_scalar_2, header_scalar_4};
static exp_encode_fn EXP_ENCODE[2] = {encode_scalar_2, encode_scalar_4};
static exp_decode_fn EXP_DECODE[2] = {decode_scalar_2, decode_scalar_4};

static int EXP_ISA = 0;

/* isa as bitfx_set_isa's (0 scalar, 1 AVX2, 2 AVX-512, which has no kernels
 * of its own here and runs AVX2's).  Returns the ISA now used: 0 or 1. */
int bitfx_exp_set_isa(int isa) {
    EXP_ISA = 0;
    EXP_HEADER[0] = header_scalar_2, EXP_HEADER[1] = header_scalar_4;
    EXP_ENCODE[0] = encode_scalar_2, EXP_ENCODE[1] = encode_scalar_4;
    EXP_DECODE[0] = decode_scalar_2, EXP_DECODE[1] = decode_scalar_4;
#ifdef BITFX_EXP_AVX2
    __builtin_cpu_init();
    if (isa >= 1 && __builtin_cpu_supports("avx2")) {
        EXP_ISA = 1;
        EXP_HEADER[0] = header_avx2_2, EXP_HEADER[1] = header_avx2_4;
        EXP_ENCODE[0] = encode_avx2_2, EXP_ENCODE[1] = encode_avx2_4;
        EXP_DECODE[0] = decode_avx2_2, EXP_DECODE[1] = decode_avx2_4;
    }
#endif
    (void)isa;
    return EXP_ISA;
}

/* The ISA the exponent codec's kernels now run: 0 scalar, 1 AVX2. */
int bitfx_exp_isa(void) { return EXP_ISA; }

__attribute__((constructor)) static void exp_pick_isa(void) { bitfx_exp_set_isa(2); }

/* ---- entry points ------------------------------------------------------- */

/* Each thread takes a contiguous range of groups, [ng * t / n, ng * (t+1) / n). */
#define THREAD_RANGE(ng, nthreads, body)                                                   \
    do {                                                                                   \
        int nt_ = (nthreads) < 1 ? 1 : (nthreads) > MAX_THREADS ? MAX_THREADS : (nthreads); \
        _Pragma("omp parallel num_threads(nt_)")                                          \
        {                                                                                  \
            int t_ = 0, n_ = 1;                                                            \
            BITFX_OMP_IDS(t_, n_);                                                         \
            int64_t g0 = (ng) * t_ / n_, g1 = (ng) * (t_ + 1) / n_;                        \
            body;                                                                          \
        }                                                                                  \
    } while (0)

/* Pass 1: base and width of every group into header (2 * ngroups bytes);
 * returns the sum of the widths, or -1 for an itemsize the codec does not take. */
int64_t bitfx_exp_header(const void *src, int64_t k, int itemsize, uint8_t *header, int nthreads) {
    if (itemsize != 2 && itemsize != 4) return -1;
    int64_t ng = (k + GROUP - 1) / GROUP, partial[MAX_THREADS] = {0}, sum = 0;
    exp_header_fn fn = EXP_HEADER[itemsize == 4];
    THREAD_RANGE(ng, nthreads, partial[t_] = fn(src, k, g0, g1, header, header + ng));
    for (int t = 0; t < MAX_THREADS; t++) sum += partial[t];
    return sum;
}

/* Where each thread's first group's delta planes start: the sum of the
 * widths before it, each thread summing its own range first. */
#define PLACED_RANGE(width, ng, nthreads, body)                                            \
    do {                                                                                   \
        int64_t partial_[MAX_THREADS + 1];                                                 \
        int nt_ = (nthreads) < 1 ? 1 : (nthreads) > MAX_THREADS ? MAX_THREADS : (nthreads); \
        _Pragma("omp parallel num_threads(nt_)")                                          \
        {                                                                                  \
            int t_ = 0, n_ = 1;                                                            \
            BITFX_OMP_IDS(t_, n_);                                                         \
            int64_t g0 = (ng) * t_ / n_, g1 = (ng) * (t_ + 1) / n_, s_ = 0;                \
            for (int64_t g = g0; g < g1; g++) s_ += (width)[g];                            \
            partial_[t_ + 1] = s_;                                                         \
            _Pragma("omp barrier")                                                         \
            int64_t words = 0;                                                             \
            for (int u = 0; u < t_; u++) words += partial_[u + 1];                         \
            body;                                                                          \
        }                                                                                  \
    } while (0)

/* Pass 2: the stream's lo planes and delta planes; its header (pass 1's
 * output) is already in place.  Returns 0, or -1 for a bad itemsize. */
int bitfx_exp_encode(const void *src, int64_t k, int itemsize, uint8_t *stream, int nthreads) {
    if (itemsize != 2 && itemsize != 4) return -1;
    int64_t ng = (k + GROUP - 1) / GROUP;
    const uint8_t *base = stream + k * (itemsize - 1), *width = base + ng;
    uint8_t *deltas = stream + k * (itemsize - 1) + 2 * ng;
    exp_encode_fn fn = EXP_ENCODE[itemsize == 4];
    PLACED_RANGE(width, ng, nthreads, fn(src, k, g0, g1, base, width, stream, deltas + 4 * words));
    return 0;
}

/* The caller has checked the stream's length against its widths (all <= 8). */
int bitfx_exp_decode(const uint8_t *stream, int64_t k, int itemsize, void *out, int nthreads) {
    if (itemsize != 2 && itemsize != 4) return -1;
    int64_t ng = (k + GROUP - 1) / GROUP;
    const uint8_t *base = stream + k * (itemsize - 1), *width = base + ng;
    const uint8_t *deltas = stream + k * (itemsize - 1) + 2 * ng;
    exp_decode_fn fn = EXP_DECODE[itemsize == 4];
    PLACED_RANGE(width, ng, nthreads, fn(stream, k, g0, g1, base, width, deltas + 4 * words, out));
    return 0;
}

#ifdef __cplusplus
}
#endif
