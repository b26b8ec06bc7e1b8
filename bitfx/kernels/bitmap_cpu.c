/* CPU kernels for the bitfx bitmap format (see bitfx/format.py).
 *
 * Plain C that is also valid C++, no torch headers.  torch.utils.cpp_extension
 * builds it with ops_cpu.cpp into one library (bitfx/kernels/cpu_ext.py): the
 * ops call these functions directly, Python through ctypes, which releases
 * the GIL during calls.
 * Blocks of BLOCK elements are independent, so every pass is an OpenMP loop
 * over blocks; element data is moved as same-width unsigned integers.
 *
 * Each block kernel has a portable scalar version and, on x86-64, AVX-512
 * (every width) and AVX2 (2- and 4-byte elements) versions built with target
 * attributes and chosen at load time from what the CPU reports (the library
 * itself is compiled for baseline x86-64, so one build runs everywhere).  All
 * versions write the same bytes; bitfx_set_isa() lets the tests run each.
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

/* nnz: the block's nonzero count (from the count pass, or checked against
 * its bitmap before decoding), so vector kernels know how far they may store
 * or load whole registers without touching the next block's values. */
typedef int64_t (*count_block_fn)(const void *src, int64_t len);
typedef void (*compress_block_fn)(const void *src, int64_t len, int64_t nnz, uint8_t *bm, void *dst);
typedef void (*decompress_block_fn)(const uint8_t *bm, const void *vals, int64_t len, int64_t nnz, void *out);

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
static int64_t count_scalar_##T(const void *src_, int64_t len) {                  \
    const T *src = (const T *)src_;                                                \
    int64_t c = 0;                                                                 \
    for (int64_t i = 0; i < len; i++) c += src[i] != 0;                            \
    return c;                                                                      \
}                                                                                  \
static void compress_scalar_##T(const void *src_, int64_t len, int64_t nnz,      \
                                uint8_t *bm, void *dst) {                          \
    (void)nnz;                                                                     \
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
                                  int64_t len, int64_t nnz, void *out_) {          \
    (void)nnz;                                                                     \
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

static const count_block_fn COUNT_SCALAR[4] = {
    count_scalar_uint8_t, count_scalar_uint16_t, count_scalar_uint32_t, count_scalar_uint64_t};
static const compress_block_fn COMPRESS_SCALAR[4] = {
    compress_scalar_uint8_t, compress_scalar_uint16_t, compress_scalar_uint32_t, compress_scalar_uint64_t};
static const decompress_block_fn DECOMPRESS_SCALAR[4] = {
    decompress_scalar_uint8_t, decompress_scalar_uint16_t, decompress_scalar_uint32_t,
    decompress_scalar_uint64_t};

/* ---- AVX-512 ------------------------------------------------------------ */

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define BITFX_HAVE_X86_VECTOR 1
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
static void compress_avx512_##T(const void *src_, int64_t len, int64_t nnz,      \
                                uint8_t *bm, void *dst_) {                         \
    (void)nnz;                                                                     \
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
                                  int64_t len, int64_t nnz, void *out_) {          \
    (void)nnz;                                                                     \
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

/* ---- AVX2 --------------------------------------------------------------- */

/* AVX2 has no compress or expand instruction, so a group of 8 elements (one
 * bitmap byte) is moved by a shuffle looked up by the byte: vpermd for 4-byte
 * elements, pshufb over 16 bytes for 2-byte ones.  Whole registers are stored
 * (compress) or loaded (decompress) while at least 8 of the block's values
 * remain, so no write reaches the next block's values (another thread's) and
 * no read leaves the buffer; the last partial group goes through a stack
 * copy.  A block's tail of fewer than 8 elements runs the scalar loop. */

/* COMPACT[m][j]: the position of the j-th set bit of m (0 past the last). */
static uint8_t COMPACT[256][8];
/* pshufb controls for 8 two-byte lanes: COMPACT16 gathers the set lanes to the
 * front, EXPAND16 scatters the front lanes to the set ones (0x80: zero). */
static uint8_t COMPACT16[256][16];
static uint8_t EXPAND16[256][16];
/* EXPAND32[m][t]: the rank of lane t among m's set bits if bit t is set, else 7.
 * LOAD_FIRST[c]: a load mask of the first c lanes. */
static int32_t EXPAND32[256][8];
static int32_t LOAD_FIRST[9][8];

#define TAIL_COMPRESS(T)                                                           \
    for (; i < len; i++) {                                                         \
        int nz = src[i] != 0;                                                      \
        bm[i >> 3] |= (uint8_t)(nz << (i & 7));                                    \
        if (nz) dst[k++] = src[i];                                                 \
    }
#define TAIL_DECOMPRESS(T)                                                         \
    for (; i < len; i++) {                                                         \
        int bit = (bm[i >> 3] >> (i & 7)) & 1;                                     \
        out[i] = bit ? vals[k] : (T)0;                                             \
        k += bit;                                                                  \
    }

/* Zero lanes are counted by subtracting the compare's all-ones lanes; a lane
 * sees at most BLOCK / lanes of them, so 16-bit lanes cannot overflow. */
__attribute__((target("avx2,popcnt")))
static int64_t count_avx2_uint32_t(const void *src_, int64_t len) {
    const uint32_t *src = (const uint32_t *)src_;
    const __m256i zero = _mm256_setzero_si256();
    __m256i zeros = zero;
    int64_t i = 0, c = 0;
    for (; i + 8 <= len; i += 8)
        zeros = _mm256_sub_epi32(zeros, _mm256_cmpeq_epi32(_mm256_loadu_si256((const __m256i *)(src + i)), zero));
    uint32_t lanes[8];
    _mm256_storeu_si256((__m256i *)lanes, zeros);
    for (int t = 0; t < 8; t++) c -= lanes[t];
    for (; i < len; i++) c -= src[i] == 0;
    return len + c;
}

__attribute__((target("avx2,popcnt")))
static int64_t count_avx2_uint16_t(const void *src_, int64_t len) {
    const uint16_t *src = (const uint16_t *)src_;
    const __m256i zero = _mm256_setzero_si256();
    __m256i zeros = zero;
    int64_t i = 0, c = 0;
    for (; i + 16 <= len; i += 16)
        zeros = _mm256_sub_epi16(zeros, _mm256_cmpeq_epi16(_mm256_loadu_si256((const __m256i *)(src + i)), zero));
    uint16_t lanes[16];
    _mm256_storeu_si256((__m256i *)lanes, zeros);
    for (int t = 0; t < 16; t++) c -= lanes[t];
    for (; i < len; i++) c -= src[i] == 0;
    return len + c;
}

__attribute__((target("avx2,popcnt")))
static void compress_avx2_uint32_t(const void *src_, int64_t len, int64_t nnz, uint8_t *bm,
                                   void *dst_) {
    const uint32_t *src = (const uint32_t *)src_;
    uint32_t *dst = (uint32_t *)dst_;
    const __m256i zero = _mm256_setzero_si256();
    int64_t k = 0, i = 0;
    memset(bm, 0, BM_BYTES);
    for (; i + 8 <= len; i += 8) {
        __m256i v = _mm256_loadu_si256((const __m256i *)(src + i));
        unsigned m = ~(unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(v, zero))) & 0xFFu;
        bm[i >> 3] = (uint8_t)m;
        __m256i idx = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)COMPACT[m]));
        __m256i packed = _mm256_permutevar8x32_epi32(v, idx);
        int pc = __builtin_popcount(m);
        if (k + 8 <= nnz) {
            _mm256_storeu_si256((__m256i *)(dst + k), packed);
        } else {
            uint32_t tmp[8];
            _mm256_storeu_si256((__m256i *)tmp, packed);
            memcpy(dst + k, tmp, (size_t)pc * sizeof(uint32_t));
        }
        k += pc;
    }
    TAIL_COMPRESS(uint32_t)
}

/* The byte's pc values are loaded with a masked load, which reads nothing
 * past them (so no branch for a block's last values) and zeroes the other
 * lanes; EXPAND32 sends each clear bit's lane to lane 7, which is one of
 * those zeros whenever a bit is clear (pc < 8). */
__attribute__((target("avx2,popcnt")))
static void decompress_avx2_uint32_t(const uint8_t *bm, const void *vals_, int64_t len, int64_t nnz,
                                     void *out_) {
    (void)nnz;
    const uint32_t *vals = (const uint32_t *)vals_;
    uint32_t *out = (uint32_t *)out_;
    int64_t k = 0, i = 0;
    for (; i + 8 <= len; i += 8) {
        unsigned m = bm[i >> 3];
        int pc = __builtin_popcount(m);
        __m256i v = _mm256_maskload_epi32((const int *)(vals + k), _mm256_loadu_si256((const __m256i *)LOAD_FIRST[pc]));
        _mm256_storeu_si256((__m256i *)(out + i),
                            _mm256_permutevar8x32_epi32(v, _mm256_loadu_si256((const __m256i *)EXPAND32[m])));
        k += pc;
    }
    TAIL_DECOMPRESS(uint32_t)
}

/* Sixteen elements (two bitmap bytes) per step: one 256-bit load and compare,
 * and the two bytes of the mask from one movemask (packs_epi16 works within
 * 128-bit lanes, so byte 0 of the result holds the low lane's flags and byte 2
 * the high lane's).  Each 8-lane half is compacted by pshufb into a buffer on
 * the stack, in L1, whose whole-register stores may run past the block's
 * values; the values are then copied out at their exact length, so no store
 * depends on a branch and none reaches the next block's values. */
__attribute__((target("avx2,popcnt")))
static void compress_avx2_uint16_t(const void *src_, int64_t len, int64_t nnz, uint8_t *bm,
                                   void *dst_) {
    (void)nnz; /* the stack buffer takes the place of the nnz bound */
    const uint16_t *src = (const uint16_t *)src_;
    uint16_t *dst = (uint16_t *)dst_;
    uint16_t buf[BLOCK + 16];
    const __m256i zero = _mm256_setzero_si256();
    int64_t k = 0, i = 0;
    for (; i + 16 <= len; i += 16) {
        __m256i v = _mm256_loadu_si256((const __m256i *)(src + i));
        __m256i eq = _mm256_cmpeq_epi16(v, zero);
        unsigned mm = ~(unsigned)_mm256_movemask_epi8(_mm256_packs_epi16(eq, eq));
        unsigned m0 = mm & 0xFFu, m1 = (mm >> 16) & 0xFFu;
        uint16_t pair = (uint16_t)(m0 | (m1 << 8));
        memcpy(bm + (i >> 3), &pair, 2);
        __m128i p0 = _mm_shuffle_epi8(_mm256_castsi256_si128(v), _mm_loadu_si128((const __m128i *)COMPACT16[m0]));
        __m128i p1 = _mm_shuffle_epi8(_mm256_extracti128_si256(v, 1), _mm_loadu_si128((const __m128i *)COMPACT16[m1]));
        _mm_storeu_si128((__m128i *)(buf + k), p0);
        k += __builtin_popcount(m0);
        _mm_storeu_si128((__m128i *)(buf + k), p1);
        k += __builtin_popcount(m1);
    }
    memcpy(dst, buf, (size_t)k * sizeof(uint16_t));
    /* The tail ORs its bits into bytes that start clear. */
    if (i < len) memset(bm + (i >> 3), 0, (size_t)(BM_BYTES - (i >> 3)));
    TAIL_COMPRESS(uint16_t)
}

__attribute__((target("avx2,popcnt")))
static void decompress_avx2_uint16_t(const uint8_t *bm, const void *vals_, int64_t len, int64_t nnz,
                                     void *out_) {
    const uint16_t *vals = (const uint16_t *)vals_;
    uint16_t *out = (uint16_t *)out_;
    int64_t k = 0, i = 0;
    for (; i + 8 <= len; i += 8) {
        unsigned m = bm[i >> 3];
        int pc = __builtin_popcount(m);
        __m128i v;
        if (k + 8 <= nnz) {
            v = _mm_loadu_si128((const __m128i *)(vals + k));
        } else {
            uint16_t tmp[8] = {0};
            memcpy(tmp, vals + k, (size_t)pc * sizeof(uint16_t));
            v = _mm_loadu_si128((const __m128i *)tmp);
        }
        _mm_storeu_si128((__m128i *)(out + i),
                         _mm_shuffle_epi8(v, _mm_loadu_si128((const __m128i *)EXPAND16[m])));
        k += pc;
    }
    TAIL_DECOMPRESS(uint16_t)
}
#endif

/* Set bits among the first len bits of a block's bitmap.  The library is
 * built for baseline x86-64, where __builtin_popcountll is a libgcc call per
 * word: the popcnt version is chosen at load time where the CPU has it. */
#define DEFINE_BITMAP_COUNT(NAME, ATTR)                                            \
ATTR static int64_t NAME(const uint8_t *bm, int64_t len) {                         \
    int64_t c = 0, full = len / 64;                                                \
    for (int64_t j = 0; j < full; j++) {                                           \
        uint64_t word;                                                             \
        memcpy(&word, bm + 8 * j, 8);                                              \
        c += __builtin_popcountll(word);                                           \
    }                                                                              \
    for (int64_t i = full * 64; i < len; i++) c += (bm[i >> 3] >> (i & 7)) & 1;   \
    return c;                                                                      \
}
DEFINE_BITMAP_COUNT(bitmap_count_portable, )
#ifdef BITFX_HAVE_X86_VECTOR
DEFINE_BITMAP_COUNT(bitmap_count_popcnt, __attribute__((target("popcnt"))))
#endif

static int64_t (*bitmap_count)(const uint8_t *, int64_t) = bitmap_count_portable;

/* ---- dispatch ----------------------------------------------------------- */

enum { ISA_SCALAR = 0, ISA_AVX2 = 1, ISA_AVX512 = 2 };

static count_block_fn COUNT[4];
static compress_block_fn COMPRESS[4];
static decompress_block_fn DECOMPRESS[4];
/* RUNS[isa][w]: ISA level isa has a kernel for width index w and this CPU
 * runs it.  AVX2 has none for 1- and 8-byte elements, so a level's row can
 * have holes below a higher level's: dispatch walks down to one that runs. */
static int RUNS[3][4] = {{1, 1, 1, 1}};

#ifdef BITFX_HAVE_X86_VECTOR
/* The vector kernels, by ISA and width index; NULL where an ISA has none for
 * that width (AVX2: 1- and 8-byte elements). */
static const compress_block_fn COMPRESS_AT[3][4] = {
    {0, 0, 0, 0},
    {0, compress_avx2_uint16_t, compress_avx2_uint32_t, 0},
    {compress_avx512_uint8_t, compress_avx512_uint16_t, compress_avx512_uint32_t,
     compress_avx512_uint64_t},
};
static const decompress_block_fn DECOMPRESS_AT[3][4] = {
    {0, 0, 0, 0},
    {0, decompress_avx2_uint16_t, decompress_avx2_uint32_t, 0},
    {decompress_avx512_uint8_t, decompress_avx512_uint16_t, decompress_avx512_uint32_t,
     decompress_avx512_uint64_t},
};
/* AVX-512 levels keep the scalar count, as before: it is not the bottleneck. */
static const count_block_fn COUNT_AT[3][4] = {
    {0, 0, 0, 0},
    {0, count_avx2_uint16_t, count_avx2_uint32_t, 0},
    {0, 0, 0, 0},
};
#endif

int bitfx_exp_set_isa(int isa); /* exponent_cpu.c: the exponent codec follows the same choice */

/* Use, for each element width, the best kernel that exists and the CPU runs
 * among ISAs up to isa (ISA_SCALAR: scalar everywhere), and the same for the
 * exponent codec (bitfx_exp_set_isa).  Returns the ISA now
 * used by width index w in bits 2w..2w+1, or -1 for an unknown isa. */
int bitfx_set_isa(int isa) {
    if (isa < ISA_SCALAR || isa > ISA_AVX512) return -1;
    int used = 0;
    for (int w = 0; w < 4; w++) {
        int pick = isa;
        while (!RUNS[pick][w]) pick--;
        COUNT[w] = COUNT_SCALAR[w];
        COMPRESS[w] = COMPRESS_SCALAR[w];
        DECOMPRESS[w] = DECOMPRESS_SCALAR[w];
#ifdef BITFX_HAVE_X86_VECTOR
        if (pick > ISA_SCALAR) {
            COMPRESS[w] = COMPRESS_AT[pick][w];
            DECOMPRESS[w] = DECOMPRESS_AT[pick][w];
            if (COUNT_AT[pick][w]) COUNT[w] = COUNT_AT[pick][w];
        }
#endif
        used |= pick << (2 * w);
    }
    bitfx_exp_set_isa(isa);
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
#ifdef BITFX_HAVE_X86_VECTOR
    for (int c = 0; c <= 8; c++)
        for (int t = 0; t < 8; t++) LOAD_FIRST[c][t] = t < c ? -1 : 0;
    for (int m = 0; m < 256; m++) {
        int j = 0;
        for (int t = 0; t < 8; t++) EXPAND32[m][t] = 7;
        memset(COMPACT[m], 0, 8);
        memset(COMPACT16[m], 0x80, 16);
        memset(EXPAND16[m], 0x80, 16);
        for (int t = 0; t < 8; t++) {
            if (!((m >> t) & 1)) continue;
            COMPACT[m][j] = (uint8_t)t;
            COMPACT16[m][2 * j] = (uint8_t)(2 * t);
            COMPACT16[m][2 * j + 1] = (uint8_t)(2 * t + 1);
            EXPAND16[m][2 * t] = (uint8_t)(2 * j);
            EXPAND16[m][2 * t + 1] = (uint8_t)(2 * j + 1);
            EXPAND32[m][t] = j;
            j++;
        }
    }
    __builtin_cpu_init();
    if (__builtin_cpu_supports("popcnt")) bitmap_count = bitmap_count_popcnt;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt"))
        RUNS[ISA_AVX2][1] = RUNS[ISA_AVX2][2] = 1;
    if (__builtin_cpu_supports("avx512f")) {
        RUNS[ISA_AVX512][2] = RUNS[ISA_AVX512][3] = 1;
        if (__builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vbmi2"))
            RUNS[ISA_AVX512][0] = RUNS[ISA_AVX512][1] = 1;
    }
    /* Every vector level RUNS admits must have its kernels. */
    for (int i = ISA_AVX2; i <= ISA_AVX512; i++)
        for (int w = 0; w < 4; w++)
            if (!COMPRESS_AT[i][w] || !DECOMPRESS_AT[i][w]) RUNS[i][w] = 0;
#endif
    bitfx_set_isa(ISA_AVX512);
}

/* ---- entry points ------------------------------------------------------- */

/* offsets[b] = nonzeros before block b; returns the total. */
int64_t bitfx_count(const void *src, int64_t n, int itemsize, int64_t *offsets, int nthreads) {
    int64_t nblocks = (n + BLOCK - 1) / BLOCK;
    int w = width_index(itemsize);
    if (w < 0) return -1;
    count_block_fn fn = COUNT[w];
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t b = 0; b < nblocks; b++)
        offsets[b + 1] = fn((const char *)src + b * BLOCK * itemsize, block_len(b, n));
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
        fn((const char *)src + b * BLOCK * itemsize, block_len(b, n), offsets[b + 1] - offsets[b],
           bitmap + b * BM_BYTES, (char *)values + offsets[b] * itemsize);
    }
    return 0;
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
        fn(bm, (const char *)values + offsets[b] * itemsize, len, offsets[b + 1] - offsets[b],
           (char *)out + b * BLOCK * itemsize);
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
