// CPU kernels of the bitfx:: ops, in C++ so that a call runs no Python.
//
// The Python implementations in bitfx/ops.py cost 25-40 us per call before any
// data moves, and inside a compiled step their frames can make CPython map and
// unmap a frame-stack chunk on every call (the unmap interrupts the other
// cores).  These kernels do the same work: the layout bookkeeping of
// bitfx/ops.py and the C kernels of bitmap_cpu.c, which this library links.
//
// A kernel choice other than auto/cpu (bitfx.kernels.use, or BITFX_KERNELS
// read once at import) is honoured by redispatching to bitfx::_<op>_py, the
// Python implementation; Python tells this library through
// bitfx_ops_use_python().
//
// The exponent codec's ops (exp_compress, bitmap_exp_compress and their
// decompress) mirror bitfx.kernels.exp_compress / bitmap_exp_compress over the
// C kernels of exponent_cpu.c.
//
// Built with bitmap_cpu.c and exponent_cpu.c into one library by torch.utils.cpp_extension
// (bitfx/kernels/cpu_ext.py).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/EmptyTensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/zeros.h>
#include <c10/core/SymIntArrayRef.h>
#include <torch/library.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <algorithm>
#include <atomic>
#include <cstring>
#include <mutex>
#include <numeric>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

extern "C" {
int64_t bitfx_count(const void *src, int64_t n, int itemsize, int64_t *offsets, int nthreads);
int bitfx_compress(const void *src, int64_t n, int itemsize, const int64_t *offsets, uint8_t *bitmap,
                   void *values, int nthreads);
int bitfx_decompress(const int64_t *offsets, const uint8_t *bitmap, const void *values, int64_t n,
                     int itemsize, void *out, int nthreads);
void bitfx_ops_use_python(int on);
void bitfx_pack_bool(const uint8_t *src, int64_t n, uint8_t *out, int nthreads);
void bitfx_unpack_bool(const uint8_t *packed, int64_t n, uint8_t *out, int nthreads);
int64_t bitfx_exp_header(const void *src, int64_t k, int itemsize, uint8_t *header, int nthreads);
int bitfx_exp_encode(const void *src, int64_t k, int itemsize, uint8_t *stream, int nthreads);
int bitfx_exp_decode(const uint8_t *stream, int64_t k, int itemsize, void *out, int nthreads);
}

namespace {

constexpr int64_t kBlock = 1024;
constexpr int64_t kBitmapBytesPerBlock = kBlock / 8;
constexpr int64_t kGrainSize = 32768;  // as bitfx.kernels.cpu_ext.GRAIN_SIZE

int threads_for(int64_t n) {
    return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n / kGrainSize)));
}

// Runtime statistics of the compress ops, by the key the graph rewrite gives
// each saved tensor (bitfx.stats reads them): the last call's element count,
// nonzeros (-1: not a bitmap op) and stored bytes, and the number of calls.
// The nonzero count is a by-product of the compression, so this costs a map
// update per call and no pass over the data.
struct Stat {
    int64_t numel = 0, nnz = -1, stored = 0, calls = 0;
};
std::mutex g_stats_mutex;
std::unordered_map<std::string, Stat> g_stats;

void record(c10::string_view key, int64_t numel, int64_t nnz, int64_t stored) {
    if (key.empty()) return;
    std::lock_guard<std::mutex> lock(g_stats_mutex);
    Stat &s = g_stats[std::string(key)];
    s.numel = numel;
    s.nnz = nnz;
    s.stored = stored;
    s.calls++;
}

std::atomic<bool> g_use_python{false};

bool python_requested() { return g_use_python.load(std::memory_order_relaxed); }

int64_t itemsize_of(at::ScalarType dtype) {
    int64_t size = static_cast<int64_t>(c10::elementSize(dtype));
    TORCH_CHECK_TYPE(size == 1 || size == 2 || size == 4 || size == 8, "bitfx: unsupported dtype ", dtype);
    return size;
}

// Mirrors bitfx.ops._layout.
struct Layout {
    std::vector<int64_t> stored, order;
    std::vector<bool> broadcast;
    bool any_broadcast = false, dense = true, overlapping = false;

    Layout(at::IntArrayRef size, at::IntArrayRef stride) {
        const int64_t dims = static_cast<int64_t>(size.size());
        bool valid = static_cast<int64_t>(stride.size()) == dims;
        for (int64_t d = 0; valid && d < dims; d++) valid = size[d] >= 0 && stride[d] >= 0;
        TORCH_CHECK_VALUE(valid, "bitfx: size ", size, " and stride ", stride, " do not describe a layout");
        stored.resize(dims);
        broadcast.resize(dims);
        for (int64_t d = 0; d < dims; d++) {
            broadcast[d] = stride[d] == 0 && size[d] > 1;
            any_broadcast = any_broadcast || broadcast[d];
            stored[d] = broadcast[d] ? 1 : size[d];
        }
        order.resize(dims);
        std::iota(order.begin(), order.end(), 0);
        std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
            if (stride[a] != stride[b]) return stride[a] > stride[b];
            if (stored[a] != stored[b]) return stored[a] > stored[b];
            return a < b;
        });
        int64_t expected = 1, reach = 0;
        for (auto it = order.rbegin(); it != order.rend(); ++it) {
            if (stored[*it] != 1 && stride[*it] != expected) dense = false;
            expected *= stored[*it];
            if (stored[*it] == 1) continue;
            overlapping = overlapping || stride[*it] <= reach;
            reach += stride[*it] * (stored[*it] - 1);
        }
    }
};

int64_t stored_numel(const Layout &layout) {
    int64_t n = 1;
    for (int64_t s : layout.stored) n *= s;
    return n;
}

// Inside a training step these ops run right after GEMMs have evicted the
// caches, when each call's own code and bookkeeping come back from memory
// (benchmarks/op_overhead.py --cold).  So a call makes no ATen calls it does
// not need: outputs are allocated with at::detail::empty_cpu and
// empty_strided_cpu, which skip the dispatcher, and a source already in the
// kernels' order is read where it lies instead of through a view.
//
// A large output is also advised onto transparent huge pages before anything
// writes it.  glibc serves an allocation above its mmap threshold (at most
// 32 MiB) with fresh pages, so an op's first write to a 16M-element output
// faulted 4 KiB at a time: decompress ran 5.7x as long as copy_ into
// allocated memory, and as long as clone.  With 2 MiB pages the faults are
// 512x fewer.  Advice only: where THP is off (or "never"), nothing changes.
void advise_huge_pages(const at::Tensor &t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    constexpr uintptr_t kHuge = uintptr_t{2} << 20;
    const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data_ptr());
    const uintptr_t end = begin + static_cast<uintptr_t>(t.nbytes());
    const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1), last = end & ~(kHuge - 1);
    if (last > first) madvise(reinterpret_cast<void *>(first), last - first, MADV_HUGEPAGE);
#else
    (void)t;
#endif
}

at::Tensor new_cpu(int64_t numel, at::ScalarType dtype) {
    at::Tensor t = at::detail::empty_cpu({numel}, dtype);
    advise_huge_pages(t);
    return t;
}

// Whether x's memory already holds its stored elements in the memory order
// of stride, from its data pointer on: then to_flat is a view and Source
// reads x in place.
bool in_order(const Layout &layout, const at::Tensor &x, at::IntArrayRef stride) {
    return layout.dense && x.strides() == stride;
}

// Mirrors bitfx.ops.to_flat; tests compare the two on every layout through
// bitfx::_to_flat_cpp.
at::Tensor to_flat(at::Tensor x, at::IntArrayRef stride, const Layout &layout) {
    // Broadcast dimensions count once: the view holds the stored elements.
    if (in_order(layout, x, stride)) return x.as_strided({stored_numel(layout)}, {1});
    for (int64_t d = 0; d < static_cast<int64_t>(layout.broadcast.size()); d++) {
        if (!layout.broadcast[d]) continue;
        TORCH_CHECK_VALUE(x.stride(d) == 0, "bitfx: layout ", stride, " broadcasts dim ", d,
                          ", but the tensor does not (strides ", x.strides(), ")");
        x = x.narrow(d, 0, 1);
    }
    // reshape may return a strided view (dimensions that merge); the kernels
    // read flat memory.
    return x.permute(layout.order).reshape(-1).contiguous();
}

at::Tensor to_flat(const at::Tensor &x, at::IntArrayRef stride) { return to_flat(x, stride, Layout(x.sizes(), stride)); }

// The stored elements of x in the memory order of stride, as the kernels read
// them: x's own memory where it is in that order, else to_flat's copy (kept
// alive by keep).
struct Source {
    const Layout layout;
    const at::Tensor keep;
    const void *const data;
    const int64_t numel;

    Source(const at::Tensor &x, at::IntArrayRef stride)
        : layout(x.sizes(), stride),
          keep(in_order(layout, x, stride) ? x : to_flat(x, stride, layout)),
          data(keep.data_ptr()),
          numel(stored_numel(layout)) {}
};

// Mirrors bitfx.ops._Target.
struct Target {
    Layout layout;
    std::vector<int64_t> size;
    at::Tensor flat, base, permuted;

    Target(at::IntArrayRef size_, at::IntArrayRef stride, at::ScalarType dtype)
        : layout(size_, stride), size(size_.vec()) {
        base = at::detail::empty_strided_cpu(layout.stored, stride, dtype);
        advise_huge_pages(base);
        // A dense base holds the stored elements in flat order from its data
        // pointer on (strides are nonnegative): the kernels write there, with
        // no flat tensor.
        if (layout.dense) return;
        permuted = base.permute(layout.order);
        flat = new_cpu(base.numel(), dtype);
    }

    // Where the kernels write the stored elements, in flat order.
    void *data() { return layout.dense ? base.data_ptr() : flat.data_ptr(); }

    at::Tensor finish() {
        if (layout.overlapping) {
            // As in bitfx.ops._Target.finish: copy_ refuses a self-overlapping
            // destination; shared elements held equal values, so write each by
            // its memory offset.
            const int64_t dims = static_cast<int64_t>(layout.stored.size());
            at::Tensor offset = at::zeros(layout.stored, at::kLong);
            for (int64_t d = 0; d < dims; d++) {
                std::vector<int64_t> shape(dims, 1);
                shape[d] = layout.stored[d];
                offset.add_(at::arange(layout.stored[d], at::kLong).mul(base.stride(d)).view(shape));
            }
            at::Tensor storage = base.as_strided(
                {static_cast<int64_t>(base.storage().nbytes()) / base.element_size()}, {1});
            storage.index_copy_(0, offset.permute(layout.order).reshape(-1), flat);
        } else if (!layout.dense) {
            permuted.copy_(flat.view(permuted.sizes()));
        }
        return layout.any_broadcast ? base.expand(size) : base;
    }
};

// Mirrors bitfx.format.check_encoded (tests give both the same corrupt
// inputs).  Returns true for the dense fallback.
void check_part(const char *name, const at::Tensor &t, at::ScalarType dtype) {
    TORCH_CHECK_VALUE(t.scalar_type() == dtype && t.dim() == 1 && t.is_contiguous(), "bitfx: ", name,
                      " must be a contiguous 1-D ", dtype, " tensor, got ", t.scalar_type(), " of shape ",
                      t.sizes());
    TORCH_CHECK_VALUE(t.device().is_cpu(), "bitfx: ", name, " must be on the CPU, got ", t.device());
}

// Mirror bitfx.format._check_offsets_shape and _checked_total.
int64_t check_offsets_shape(const at::Tensor &offsets, const at::Tensor &payload, int64_t n) {
    check_part("offsets", offsets, at::kLong);
    check_part("payload", payload, at::kByte);
    const int64_t nblocks = (n + kBlock - 1) / kBlock;
    TORCH_CHECK_VALUE(offsets.numel() == nblocks + 1, "bitfx: offsets has ", offsets.numel(), " entries; ", n,
                      " elements need ", nblocks + 1);
    return nblocks;
}

// The nonzero total, after checking the offsets' values (with no elements:
// that offsets[0] is 0).
int64_t checked_total(const at::Tensor &offsets, int64_t n) {
    const int64_t nblocks = (n + kBlock - 1) / kBlock;
    const int64_t *o = offsets.data_ptr<int64_t>();
    bool steps_ok = o[0] == 0;
    for (int64_t b = 0; steps_ok && b < nblocks; b++) {
        const int64_t step = o[b + 1] - o[b], len = std::min(kBlock, n - b * kBlock);
        steps_ok = step >= 0 && step <= len;
    }
    TORCH_CHECK_VALUE(steps_ok, "bitfx: offsets must start at 0 and grow by at most a block's length per block");
    return o[nblocks];
}

bool check_encoded(const at::Tensor &offsets, const at::Tensor &payload, int64_t n, int64_t isz) {
    const int64_t nblocks = check_offsets_shape(offsets, payload, n);
    const int64_t length = payload.numel(), dense_bytes = n * isz, bitmap_bytes = nblocks * kBitmapBytesPerBlock;
    const bool dense = length == dense_bytes;
    TORCH_CHECK_VALUE(dense || (length >= bitmap_bytes && (length - bitmap_bytes) % isz == 0 && length <= dense_bytes),
                      "bitfx: payload of ", length, " bytes fits neither encoding of ", n, " elements of ", isz,
                      " bytes (dense: ", dense_bytes, "; sparse: ", bitmap_bytes, " bitmap bytes plus a multiple of ",
                      isz, ")");
    if (nblocks == 0) return dense;
    const int64_t nnz = checked_total(offsets, n), sparse_bytes = bitmap_bytes + nnz * isz;
    if (dense) {
        TORCH_CHECK_VALUE(!(sparse_bytes < dense_bytes), "bitfx: payload has the dense length, but offsets count ",
                          nnz, " nonzeros of ", n);
    } else {
        TORCH_CHECK_VALUE(length == sparse_bytes, "bitfx: sparse payload of ", length, " bytes; offsets count ", nnz,
                          " nonzeros, which need ", sparse_bytes);
    }
    return dense;
}

c10::OperatorHandle python_op(const char *name) {
    return c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
}

std::tuple<at::Tensor, at::Tensor> compress(const at::Tensor &x, c10::SymIntArrayRef stride_,
                                            c10::string_view key) {
    if (python_requested()) {
        static auto op = python_op("bitfx::_compress_py")
                             .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor &, c10::SymIntArrayRef,
                                                                       c10::string_view)>();
        return op.call(x, stride_, key);
    }
    at::IntArrayRef stride = C10_AS_INTARRAYREF_SLOW(stride_);
    const int64_t isz = itemsize_of(x.scalar_type());
    const Source flat(x, stride);
    const int64_t n = flat.numel, nblocks = (n + kBlock - 1) / kBlock;
    at::Tensor offsets = new_cpu(nblocks + 1, at::kLong);
    const int nthreads = threads_for(n);
    const int64_t nnz = bitfx_count(flat.data, n, static_cast<int>(isz), offsets.data_ptr<int64_t>(), nthreads);
    const int64_t bitmap_bytes = nblocks * kBitmapBytesPerBlock;
    if (!(bitmap_bytes + nnz * isz < n * isz)) {  // bitfx.format.use_sparse is false: dense fallback
        at::Tensor payload = new_cpu(n * isz, at::kByte);
        if (n) std::memcpy(payload.data_ptr(), flat.data, n * isz);
        record(key, n, nnz, payload.numel() + offsets.numel() * 8);
        return {offsets, payload};
    }
    at::Tensor payload = new_cpu(bitmap_bytes + nnz * isz, at::kByte);
    uint8_t *p = payload.data_ptr<uint8_t>();
    bitfx_compress(flat.data, n, static_cast<int>(isz), offsets.data_ptr<int64_t>(), p, p + bitmap_bytes,
                   nthreads);
    record(key, n, nnz, payload.numel() + offsets.numel() * 8);
    return {offsets, payload};
}

at::Tensor decompress(const at::Tensor &offsets_, const at::Tensor &payload_, c10::SymIntArrayRef size,
                      c10::SymIntArrayRef stride, at::ScalarType dtype) {
    if (python_requested()) {
        static auto op = python_op("bitfx::_decompress_py")
                             .typed<at::Tensor(const at::Tensor &, const at::Tensor &, c10::SymIntArrayRef,
                                               c10::SymIntArrayRef, at::ScalarType)>();
        return op.call(offsets_, payload_, size, stride, dtype);
    }
    const int64_t isz = itemsize_of(dtype);
    Layout layout(C10_AS_INTARRAYREF_SLOW(size), C10_AS_INTARRAYREF_SLOW(stride));
    const int64_t n = stored_numel(layout);
    const bool dense = check_encoded(offsets_, payload_, n, isz);
    Target target(C10_AS_INTARRAYREF_SLOW(size), C10_AS_INTARRAYREF_SLOW(stride), dtype);
    if (dense) {
        if (n) std::memcpy(target.data(), payload_.data_ptr(), n * isz);
    } else {
        const int64_t bitmap_bytes = (n + kBlock - 1) / kBlock * kBitmapBytesPerBlock;
        const uint8_t *p = payload_.data_ptr<uint8_t>();
        const int status = bitfx_decompress(offsets_.data_ptr<int64_t>(), p, p + bitmap_bytes, n,
                                            static_cast<int>(isz), target.data(), threads_for(n));
        TORCH_CHECK_VALUE(status == 0, "bitfx: the bitmap's set bits do not match the offsets");
    }
    return target.finish();
}

at::Tensor pack_bool(const at::Tensor &x, c10::SymIntArrayRef stride) {
    if (python_requested()) {
        static auto op = python_op("bitfx::_pack_bool_py").typed<at::Tensor(const at::Tensor &, c10::SymIntArrayRef)>();
        return op.call(x, stride);
    }
    TORCH_CHECK_TYPE(x.scalar_type() == at::kBool, "bitfx::pack_bool expects a bool tensor, got ", x.scalar_type());
    const Source flat(x, C10_AS_INTARRAYREF_SLOW(stride));
    const int64_t n = flat.numel;
    at::Tensor out = new_cpu((n + 7) / 8, at::kByte);
    bitfx_pack_bool(static_cast<const uint8_t *>(flat.data), n, out.data_ptr<uint8_t>(), threads_for(n));
    return out;
}

at::Tensor unpack_bool(const at::Tensor &packed_, c10::SymIntArrayRef size, c10::SymIntArrayRef stride) {
    if (python_requested()) {
        static auto op = python_op("bitfx::_unpack_bool_py")
                             .typed<at::Tensor(const at::Tensor &, c10::SymIntArrayRef, c10::SymIntArrayRef)>();
        return op.call(packed_, size, stride);
    }
    Layout layout(C10_AS_INTARRAYREF_SLOW(size), C10_AS_INTARRAYREF_SLOW(stride));
    const int64_t n = stored_numel(layout);
    check_part("packed", packed_, at::kByte);
    TORCH_CHECK_VALUE(packed_.numel() == (n + 7) / 8, "bitfx: packed mask has ", packed_.numel(), " bytes; ", n,
                      " elements need ", (n + 7) / 8);
    Target target(C10_AS_INTARRAYREF_SLOW(size), C10_AS_INTARRAYREF_SLOW(stride), at::kBool);
    bitfx_unpack_bool(packed_.data_ptr<uint8_t>(), n, static_cast<uint8_t *>(target.data()), threads_for(n));
    return target.finish();
}

// -- the exponent codec (bitfx/format.py, "The exponent codec") -------------

constexpr int64_t kGroup = 32;

int64_t exp_itemsize(at::ScalarType dtype) {
    TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
                     "bitfx: the exponent codec takes torch.float32, torch.bfloat16, torch.float16, not ", dtype);
    return static_cast<int64_t>(c10::elementSize(dtype));
}

// The coded stream of k values, or their raw bytes where it would not be
// shorter (bitfx.kernels._exp_or_raw).  Two passes: header (sizing), encode.
at::Tensor exp_or_raw(const void *src, int64_t k, int64_t isz) {
    const int64_t ng = (k + kGroup - 1) / kGroup, head = k * (isz - 1);
    const int nthreads = threads_for(k);
    at::Tensor header = new_cpu(2 * ng, at::kByte);
    const int64_t width_sum = bitfx_exp_header(src, k, static_cast<int>(isz), header.data_ptr<uint8_t>(), nthreads);
    const int64_t bytes = head + 2 * ng + 4 * width_sum;
    if (bytes >= k * isz) {
        at::Tensor raw = new_cpu(k * isz, at::kByte);
        if (k) std::memcpy(raw.data_ptr(), src, k * isz);
        return raw;
    }
    at::Tensor stream = new_cpu(bytes, at::kByte);
    uint8_t *p = stream.data_ptr<uint8_t>();
    std::memcpy(p + head, header.data_ptr(), 2 * ng);
    bitfx_exp_encode(src, k, static_cast<int>(isz), p, nthreads);
    return stream;
}

// Decodes k values from `length` bytes at p: raw or a stream, checked first
// (bitfx.format.exp_payload_is_raw and check_exp_stream; the same messages).
void exp_or_raw_decode(const uint8_t *p, int64_t length, int64_t k, int64_t isz, void *out) {
    TORCH_CHECK_VALUE(length <= k * isz, "bitfx: payload of ", length, " bytes is longer than ", k, " raw elements");
    if (length == k * isz) {
        if (k) std::memcpy(out, p, k * isz);
        return;
    }
    const int64_t ng = (k + kGroup - 1) / kGroup, head = k * (isz - 1);
    TORCH_CHECK_VALUE(length >= head + 2 * ng, "bitfx: exponent stream of ", length, " bytes is shorter than ", k,
                      " values' planes and header");
    int64_t width_sum = 0, widest = 0;
    for (int64_t g = 0; g < ng; g++) {
        width_sum += p[head + ng + g];
        widest = std::max<int64_t>(widest, p[head + ng + g]);
    }
    TORCH_CHECK_VALUE(widest <= 8, "bitfx: exponent stream has a group width above 8");
    const int64_t want = head + 2 * ng + 4 * width_sum;
    TORCH_CHECK_VALUE(length == want, "bitfx: exponent stream of ", length, " bytes; its widths need ", want);
    bitfx_exp_decode(p, k, static_cast<int>(isz), out, threads_for(k));
}

at::Tensor exp_compress(const at::Tensor &x, c10::SymIntArrayRef stride, c10::string_view key) {
    if (python_requested()) {
        static auto op = python_op("bitfx::_exp_compress_py")
                             .typed<at::Tensor(const at::Tensor &, c10::SymIntArrayRef, c10::string_view)>();
        return op.call(x, stride, key);
    }
    const int64_t isz = exp_itemsize(x.scalar_type());
    const Source flat(x, C10_AS_INTARRAYREF_SLOW(stride));
    at::Tensor payload = exp_or_raw(flat.data, flat.numel, isz);
    record(key, flat.numel, -1, payload.numel());
    return payload;
}

at::Tensor exp_decompress(const at::Tensor &payload, c10::SymIntArrayRef size, c10::SymIntArrayRef stride,
                          at::ScalarType dtype) {
    if (python_requested()) {
        static auto op = python_op("bitfx::_exp_decompress_py")
                             .typed<at::Tensor(const at::Tensor &, c10::SymIntArrayRef, c10::SymIntArrayRef,
                                               at::ScalarType)>();
        return op.call(payload, size, stride, dtype);
    }
    const int64_t isz = exp_itemsize(dtype);
    Layout layout(C10_AS_INTARRAYREF_SLOW(size), C10_AS_INTARRAYREF_SLOW(stride));
    check_part("payload", payload, at::kByte);
    Target target(C10_AS_INTARRAYREF_SLOW(size), C10_AS_INTARRAYREF_SLOW(stride), dtype);
    exp_or_raw_decode(payload.data_ptr<uint8_t>(), payload.numel(), stored_numel(layout), isz,
                      target.data());
    return target.finish();
}

std::tuple<at::Tensor, at::Tensor> bitmap_exp_compress(const at::Tensor &x, c10::SymIntArrayRef stride_,
                                                       c10::string_view key) {
    if (python_requested()) {
        static auto op = python_op("bitfx::_bitmap_exp_compress_py")
                             .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor &, c10::SymIntArrayRef,
                                                                       c10::string_view)>();
        return op.call(x, stride_, key);
    }
    const int64_t isz = exp_itemsize(x.scalar_type());
    const Source flat(x, C10_AS_INTARRAYREF_SLOW(stride_));
    const int64_t n = flat.numel, nblocks = (n + kBlock - 1) / kBlock;
    at::Tensor offsets = new_cpu(nblocks + 1, at::kLong);
    const int nthreads = threads_for(n);
    const int64_t nnz = bitfx_count(flat.data, n, static_cast<int>(isz), offsets.data_ptr<int64_t>(), nthreads);
    const int64_t bitmap_bytes = nblocks * kBitmapBytesPerBlock;
    if (!(bitmap_bytes + nnz * isz < n * isz)) {  // dense at run time: raw, as the bitmap codec stores it
        at::Tensor payload = new_cpu(n * isz, at::kByte);
        if (n) std::memcpy(payload.data_ptr(), flat.data, n * isz);
        record(key, n, nnz, payload.numel() + offsets.numel() * 8);
        return {offsets, payload};
    }
    at::Tensor bitmap = new_cpu(bitmap_bytes, at::kByte);
    at::Tensor values = new_cpu(nnz * isz, at::kByte);
    bitfx_compress(flat.data, n, static_cast<int>(isz), offsets.data_ptr<int64_t>(), bitmap.data_ptr<uint8_t>(),
                   values.data_ptr(), nthreads);
    at::Tensor coded = exp_or_raw(values.data_ptr(), nnz, isz);
    at::Tensor payload = new_cpu(bitmap_bytes + coded.numel(), at::kByte);
    std::memcpy(payload.data_ptr(), bitmap.data_ptr(), bitmap_bytes);
    if (coded.numel()) std::memcpy(payload.data_ptr<uint8_t>() + bitmap_bytes, coded.data_ptr(), coded.numel());
    record(key, n, nnz, payload.numel() + offsets.numel() * 8);
    return {offsets, payload};
}

at::Tensor bitmap_exp_decompress(const at::Tensor &offsets, const at::Tensor &payload, c10::SymIntArrayRef size,
                                 c10::SymIntArrayRef stride, at::ScalarType dtype) {
    if (python_requested()) {
        static auto op = python_op("bitfx::_bitmap_exp_decompress_py")
                             .typed<at::Tensor(const at::Tensor &, const at::Tensor &, c10::SymIntArrayRef,
                                               c10::SymIntArrayRef, at::ScalarType)>();
        return op.call(offsets, payload, size, stride, dtype);
    }
    const int64_t isz = exp_itemsize(dtype);
    Layout layout(C10_AS_INTARRAYREF_SLOW(size), C10_AS_INTARRAYREF_SLOW(stride));
    const int64_t n = stored_numel(layout);
    // bitfx.format.check_bitmap_exp
    const int64_t nblocks = check_offsets_shape(offsets, payload, n);
    const int64_t nnz = checked_total(offsets, n), bitmap_bytes = nblocks * kBitmapBytesPerBlock;
    Target target(C10_AS_INTARRAYREF_SLOW(size), C10_AS_INTARRAYREF_SLOW(stride), dtype);
    const int64_t *o = offsets.data_ptr<int64_t>();
    const uint8_t *p = payload.data_ptr<uint8_t>();
    if (!(bitmap_bytes + nnz * isz < n * isz)) {
        exp_or_raw_decode(p, payload.numel(), n, isz, target.data());
        return target.finish();
    }
    TORCH_CHECK_VALUE(payload.numel() >= bitmap_bytes, "bitfx: payload of ", payload.numel(), " bytes; ", nnz,
                      " nonzeros of ", n, " need ", bitmap_bytes, " to ", bitmap_bytes + nnz * isz);
    at::Tensor values = new_cpu(nnz * isz, at::kByte);
    exp_or_raw_decode(p + bitmap_bytes, payload.numel() - bitmap_bytes, nnz, isz, values.data_ptr());
    const int status = bitfx_decompress(o, p, values.data_ptr(), n, static_cast<int>(isz), target.data(),
                                        threads_for(n));
    TORCH_CHECK_VALUE(status == 0, "bitfx: the bitmap's set bits do not match the offsets");
    return target.finish();
}

at::Tensor to_flat_op(const at::Tensor &x, at::IntArrayRef stride) { return to_flat(x, stride).clone(); }

}  // namespace

extern "C" void bitfx_ops_use_python(int on) { g_use_python.store(on != 0, std::memory_order_relaxed); }

// The statistics as text, one "key numel nnz stored calls" line each, into
// buf (at most len bytes); returns the length needed.  clear != 0 empties them.
extern "C" int64_t bitfx_stats_dump(char *buf, int64_t len, int clear) {
    std::lock_guard<std::mutex> lock(g_stats_mutex);
    std::string text;
    for (const auto &kv : g_stats) {
        const Stat &s = kv.second;
        text += kv.first + " " + std::to_string(s.numel) + " " + std::to_string(s.nnz) + " " +
                std::to_string(s.stored) + " " + std::to_string(s.calls) + "\n";
    }
    if (buf && static_cast<int64_t>(text.size()) <= len) {
        std::memcpy(buf, text.data(), text.size());
        if (clear) g_stats.clear();
    }
    return static_cast<int64_t>(text.size());
}

TORCH_LIBRARY_FRAGMENT(bitfx, m) {
    // Test hook: the C++ twin of bitfx.ops.to_flat.
    m.def("_to_flat_cpp(Tensor x, int[] stride) -> Tensor");
}

TORCH_LIBRARY_IMPL(bitfx, CPU, m) {
    m.impl("_to_flat_cpp", &to_flat_op);
    m.impl("compress", &compress);
    m.impl("decompress", &decompress);
    m.impl("pack_bool", &pack_bool);
    m.impl("unpack_bool", &unpack_bool);
    m.impl("exp_compress", &exp_compress);
    m.impl("exp_decompress", &exp_decompress);
    m.impl("bitmap_exp_compress", &bitmap_exp_compress);
    m.impl("bitmap_exp_decompress", &bitmap_exp_decompress);
}
