/* CPU kernels for the bitfx bitmap format (see bitfx/format.py).
 *
 * Plain C that is also valid C++, no torch headers.  torch.utils.cpp_extension
 * builds it with ops_cpu.cpp into one library (bitfx/kernels/cpu_ext.py): the
 * ops call these functions directly, Python through ctypes, which releases
 * the GIL during calls.
 * Blocks of BLOCK elements are independent, so every pass is an OpenMP loop
 * over blocks; element data is moved as same-width unsigned integers.
 *
 * Each block kernel has a portable scalar version and, on x86-64, an AVX-512
 * version built with a target attribute and chosen at load time from what the
 * CPU reports (the library itself is compiled for baseline x86-64, so one
 * build runs everywhere).  Both versions write the same bytes;
 * bitfx_set_isa() lets the tests run each.
 */
#include <stdint.h>
#include <string.h>

/* Built as C++ by torch.utils.cpp_extension (see cpu_ext.py), together with
 * ops_cpu.cpp: the entry points keep C names so ctypes finds them. */
#ifdef __cplusplus
extern "C" {
#endif

#define BLOCK 1024
#define BM_BYTES (BLOCK / 8)

typedef void (*compress_block_fn)(const void *src, int64_t len, uint8_t *bm, void *dst);
typedef void (*decompress_block_fn)(const uint8_t *bm, const void *vals, int64_t len, void *out);

static inline int64_t block_len(int64_t b, int64_t n) {
    int64_t rest = n - b * BLOCK;
    return rest < BLOCK ? rest : BLOCK;
}

static inline int width_index(int itemsize) {
    switch (itemsize) {
        case 1: return 0;
        case 2: return 1;
        case 4: return 2;
        case 8: return 3;
        default: return -1;
    }
}

/* ---- scalar ------------------------------------------------------------- */

/* GATHER[m][t]: for bitmap byte m, the rank of element t among the byte's
 * set bits when bit t is set, else 0.  Decoding reads vals[k + GATHER[m][t]]
 * for every t and masks, so the 8 loads of a byte do not wait on each other
 * (no serial k += bit chain) and never leave the byte's own values. */
static uint8_t GATHER[256][8];
static uint8_t POPCOUNT[256];
static uint64_t SPREAD[256]; /* byte m -> 8 bytes, byte t = bit t of m (little-endian) */

/* Elements are handled 8 at a time, one bitmap byte each, built in a
 * register: a read-modify-write of bm[i >> 3] per element chains 8 dependent
 * stores per byte and was the bottleneck.  All-zero and all-nonzero groups,
 * common in sparse activations, move no single elements. */
#define DEFINE_SCALAR(T)                                                           \
static int64_t count_##T(const T *src, int64_t len) {                             \
    int64_t c = 0;                                                                 \
    for (int64_t i = 0; i < len; i++) c += src[i] != 0;                            \
    return c;                                                                      \
}                                                                                  \
static void compress_scalar_##T(const void *src_, int64_t len, uint8_t *bm,       \
                                void *dst) {                                       \
    const T *src = (const T *)src_;                                                \
    T local[BLOCK]; /* compaction overwrites one slot past k: stay private */      \
    int64_t k = 0, i = 0;                                                          \
    memset(bm, 0, BM_BYTES);                                                       \
    for (; i + 8 <= len; i += 8) {                                                 \
        const T *s = src + i;                                                      \
        unsigned m = 0;                                                            \
        for (int t = 0; t < 8; t++) m |= (unsigned)(s[t] != 0) << t;               \
        bm[i >> 3] = (uint8_t)m;                                                   \
        if (m == 0) continue;                                                      \
        if (m == 0xFF) {                                                           \
            memcpy(local + k, s, 8 * sizeof(T));                                   \
            k += 8;                                                                \
            continue;                                                              \
        }                                                                          \
        for (int t = 0; t < 8; t++) {                                              \
            local[k] = s[t];                                                       \
            k += (m >> t) & 1;                                                     \
        }                                                                          \
    }                                                                              \
    for (; i < len; i++) {                                                         \
        int nz = src[i] != 0;                                                      \
        bm[i >> 3] |= (uint8_t)(nz << (i & 7));                                    \
        if (nz) local[k++] = src[i];                                               \
    }                                                                              \
    memcpy(dst, local, (size_t)k * sizeof(T));                                     \
}                                                                                  \
static void decompress_scalar_##T(const uint8_t *bm, const void *vals_,           \
                                  int64_t len, void *out_) {                       \
    const T *vals = (const T *)vals_;                                              \
    T *out = (T *)out_;                                                            \
    int64_t k = 0, i = 0;                                                          \
    for (; i + 8 <= len; i += 8) {                                                 \
        unsigned m = bm[i >> 3];                                                   \
        T *o = out + i;                                                            \
        if (m == 0) {                                                              \
            memset(o, 0, 8 * sizeof(T));                                           \
            continue;                                                              \
        }                                                                          \
        const T *v = vals + k;                                                     \
        if (m == 0xFF) {                                                           \
            memcpy(o, v, 8 * sizeof(T));                                           \
        } else {                                                                   \
            const uint8_t *g = GATHER[m];                                          \
            for (int t = 0; t < 8; t++)                                            \
                o[t] = v[g[t]] & (T)((T)0 - (T)((m >> t) & 1));                    \
        }                                                                          \
        k += POPCOUNT[m];                                                          \
    }                                                                              \
    for (; i < len; i++) {                                                         \
        int bit = (bm[i >> 3] >> (i & 7)) & 1;                                     \
        out[i] = bit ? vals[k] : (T)0;                                             \
        k += bit;                                                                  \
    }                                                                              \
}

DEFINE_SCALAR(uint8_t)
DEFINE_SCALAR(uint16_t)
DEFINE_SCALAR(uint32_t)
DEFINE_SCALAR(uint64_t)

static const compress_block_fn COMPRESS_SCALAR[4] = {
    compress_scalar_uint8_t, compress_scalar_uint16_t, compress_scalar_uint32_t, compress_scalar_uint64_t};
static const decompress_block_fn DECOMPRESS_SCALAR[4] = {
    decompress_scalar_uint8_t, decompress_scalar_uint16_t, decompress_scalar_uint32_t,
    decompress_scalar_uint64_t};

/* ---- AVX-512 ------------------------------------------------------------ */

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define BITFX_HAVE_AVX512 1
#include <immintrin.h>

/* A group of LANES elements is one mask register, LANES/8 bitmap bytes
 * (little-endian, so LSB first as the format wants).  Compress and expand go
 * register to register with a masked store or load for the values: the
 * memory forms of vpcompress/vpexpand are microcoded and slow on some CPUs.
 * LANES divides BLOCK, so a group never straddles blocks; the block's tail is
 * a masked load that reads zeros past len. */
#define ONES(MASK_T, n, LANES) \
    ((n) >= (LANES) ? (MASK_T)~(MASK_T)0 : (MASK_T)(((uint64_t)1 << (n)) - 1))

#define DEFINE_AVX512(T, LANES, MASK_T, SUF, TARGET)                               \
__attribute__((target(TARGET)))                                                    \
static void compress_avx512_##T(const void *src_, int64_t len, uint8_t *bm,       \
                                void *dst_) {                                      \
    const T *src = (const T *)src_;                                                \
    T *dst = (T *)dst_;                                                            \
    int64_t k = 0;                                                                 \
    memset(bm, 0, BM_BYTES);                                                       \
    for (int64_t i = 0; i < len; i += LANES) {                                     \
        MASK_T live = ONES(MASK_T, len - i, LANES);                                \
        __m512i v = _mm512_maskz_loadu_##SUF(live, src + i);                       \
        MASK_T m = _mm512_test_##SUF##_mask(v, v);                                 \
        memcpy(bm + i / 8, &m, LANES / 8);                                         \
        int pc = __builtin_popcountll((uint64_t)m);                                \
        _mm512_mask_storeu_##SUF(dst + k, ONES(MASK_T, pc, LANES),                 \
                                 _mm512_maskz_compress_##SUF(m, v));               \
        k += pc;                                                                   \
    }                                                                              \
}                                                                                  \
__attribute__((target(TARGET)))                                                    \
static void decompress_avx512_##T(const uint8_t *bm, const void *vals_,           \
                                  int64_t len, void *out_) {                       \
    const T *vals = (const T *)vals_;                                              \
    T *out = (T *)out_;                                                            \
    int64_t k = 0;                                                                 \
    for (int64_t i = 0; i < len; i += LANES) {                                     \
        MASK_T live = ONES(MASK_T, len - i, LANES), m;                             \
        memcpy(&m, bm + i / 8, LANES / 8);                                         \
        m &= live;                                                                 \
        int pc = __builtin_popcountll((uint64_t)m);                                \
        __m512i v = _mm512_maskz_loadu_##SUF(ONES(MASK_T, pc, LANES), vals + k);  \
        _mm512_mask_storeu_##SUF(out + i, live, _mm512_maskz_expand_##SUF(m, v));  \
        k += pc;                                                                   \
    }                                                                              \
}

DEFINE_AVX512(uint8_t, 64, __mmask64, epi8, "avx512f,avx512bw,avx512vbmi2")
DEFINE_AVX512(uint16_t, 32, __mmask32, epi16, "avx512f,avx512bw,avx512vbmi2")
DEFINE_AVX512(uint32_t, 16, __mmask16, epi32, "avx512f")
DEFINE_AVX512(uint64_t, 8, __mmask8, epi64, "avx512f")
#endif

/* ---- dispatch ----------------------------------------------------------- */

enum { ISA_SCALAR = 0, ISA_AVX512 = 1 };

static compress_block_fn COMPRESS[4];
static decompress_block_fn DECOMPRESS[4];
static int ISA_AVAILABLE_WIDTHS; /* bit w: width index w has an AVX-512 kernel here */

/* isa ISA_SCALAR: scalar kernels everywhere; ISA_AVX512: AVX-512 for every
 * width the CPU supports, scalar for the rest.  Returns the bit set of widths
 * that now run AVX-512 kernels, or -1 for an unknown isa. */
int bitfx_set_isa(int isa) {
    if (isa != ISA_SCALAR && isa != ISA_AVX512) return -1;
    int used = 0;
    for (int w = 0; w < 4; w++) {
        COMPRESS[w] = COMPRESS_SCALAR[w];
        DECOMPRESS[w] = DECOMPRESS_SCALAR[w];
    }
#ifdef BITFX_HAVE_AVX512
    if (isa == ISA_AVX512) {
        static const compress_block_fn c[4] = {
            compress_avx512_uint8_t, compress_avx512_uint16_t, compress_avx512_uint32_t,
            compress_avx512_uint64_t};
        static const decompress_block_fn d[4] = {
            decompress_avx512_uint8_t, decompress_avx512_uint16_t, decompress_avx512_uint32_t,
            decompress_avx512_uint64_t};
        for (int w = 0; w < 4; w++) {
            if (ISA_AVAILABLE_WIDTHS & (1 << w)) {
                COMPRESS[w] = c[w];
                DECOMPRESS[w] = d[w];
                used |= 1 << w;
            }
        }
    }
#endif
    return used;
}

__attribute__((constructor)) static void init(void) {
    for (int m = 0; m < 256; m++) {
        int c = 0;
        for (int t = 0; t < 8; t++) {
            int bit = (m >> t) & 1;
            GATHER[m][t] = bit ? (uint8_t)c : 0;
            c += bit;
        }
        POPCOUNT[m] = (uint8_t)c;
        uint64_t spread = 0;
        for (int t = 0; t < 8; t++) spread |= (uint64_t)((m >> t) & 1) << (8 * t);
        SPREAD[m] = spread;
    }
#ifdef BITFX_HAVE_AVX512
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) {
        ISA_AVAILABLE_WIDTHS |= (1 << 2) | (1 << 3);
        if (__builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vbmi2"))
            ISA_AVAILABLE_WIDTHS |= (1 << 0) | (1 << 1);
    }
#endif
    bitfx_set_isa(ISA_AVX512);
}

/* ---- entry points ------------------------------------------------------- */

/* offsets[b] = nonzeros before block b; returns the total. */
int64_t bitfx_count(const void *src, int64_t n, int itemsize, int64_t *offsets, int nthreads) {
    int64_t nblocks = (n + BLOCK - 1) / BLOCK;
    if (width_index(itemsize) < 0) return -1;
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
    int w = width_index(itemsize);
    if (w < 0) return -1;
    compress_block_fn fn = COMPRESS[w];
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t b = 0; b < nblocks; b++) {
        fn((const char *)src + b * BLOCK * itemsize, block_len(b, n), bitmap + b * BM_BYTES,
           (char *)values + offsets[b] * itemsize);
    }
    return 0;
}

/* Set bits among the first len bits of a block's bitmap. */
static int64_t bitmap_count(const uint8_t *bm, int64_t len) {
    int64_t c = 0, full = len / 64;
    for (int64_t j = 0; j < full; j++) {
        uint64_t word;
        memcpy(&word, bm + 8 * j, 8);
        c += __builtin_popcountll(word);
    }
    for (int64_t i = full * 64; i < len; i++) c += (bm[i >> 3] >> (i & 7)) & 1;
    return c;
}

/* The caller has checked the offsets (0, non-decreasing, each step at most the
 * block's length, the total matching the values it passes).  What is left to
 * check is the bitmap: a block whose bitmap holds another number of set bits
 * than its offsets say would read another block's values, or past the end.
 * Each block is checked before it is decoded, at 1/64 of the decode's work;
 * such a block is not decoded and the call returns -2 (-1: bad itemsize). */
int bitfx_decompress(const int64_t *offsets, const uint8_t *bitmap, const void *values,
                     int64_t n, int itemsize, void *out, int nthreads) {
    int64_t nblocks = (n + BLOCK - 1) / BLOCK;
    int w = width_index(itemsize);
    if (w < 0) return -1;
    decompress_block_fn fn = DECOMPRESS[w];
    int corrupt = 0;
    #pragma omp parallel for num_threads(nthreads) schedule(static) reduction(|| : corrupt)
    for (int64_t b = 0; b < nblocks; b++) {
        int64_t len = block_len(b, n);
        const uint8_t *bm = bitmap + b * BM_BYTES;
        if (bitmap_count(bm, len) != offsets[b + 1] - offsets[b]) {
            corrupt = 1;
            continue;
        }
        fn(bm, (const char *)values + offsets[b] * itemsize, len, (char *)out + b * BLOCK * itemsize);
    }
    return corrupt ? -2 : 0;
}

/* Bool masks: 1 bit per element, LSB first, no blocks.  Eight bools are
 * handled as one 64-bit word: SPREAD[byte] is the 8 bools of a bitmap byte,
 * and packing gathers the word's per-byte nonzero flags with one multiply. */
static inline uint8_t pack8(const uint8_t *src) {
    uint64_t w, lo7 = 0x7F7F7F7F7F7F7F7FULL;
    memcpy(&w, src, 8);
    w = (((w & lo7) + lo7) | w) & ~lo7;          /* 0x80 in each nonzero byte */
    return (uint8_t)(((w >> 7) * 0x0102040810204080ULL) >> 56);
}

void bitfx_pack_bool(const uint8_t *src, int64_t n, uint8_t *out, int nthreads) {
    int64_t full = n / 8;
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t j = 0; j < full; j++) out[j] = pack8(src + 8 * j);
    if (n % 8) {
        uint8_t byte = 0;
        for (int64_t i = full * 8; i < n; i++) byte |= (uint8_t)((src[i] != 0) << (i & 7));
        out[full] = byte;
    }
}

void bitfx_unpack_bool(const uint8_t *packed, int64_t n, uint8_t *out, int nthreads) {
    int64_t full = n / 8;
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t j = 0; j < full; j++) memcpy(out + 8 * j, &SPREAD[packed[j]], 8);
    for (int64_t i = full * 8; i < n; i++) out[i] = (packed[i >> 3] >> (i & 7)) & 1;
}

#ifdef __cplusplus
}
#endif
