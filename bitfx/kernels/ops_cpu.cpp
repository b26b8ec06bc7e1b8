// CPU kernels of the bitfx:: ops, in C++ so that a call runs no Python.
//
// The Python implementations in bitfx/ops.py cost 25-40 us per call before any
// data moves, and inside a compiled step their frames can make CPython map and
// unmap a frame-stack chunk on every call (the unmap interrupts the other
// cores).  These kernels do the same work: the layout bookkeeping of
// bitfx/ops.py and the C kernels of bitmap_cpu.c, which this library links.
//
// BITFX_KERNELS other than auto/cpu (torch, triton, or an invalid value) is
// honoured per call by redispatching to bitfx::_<op>_py, the Python
// implementation, which also raises for invalid values.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_strided.h>
#include <c10/core/SymIntArrayRef.h>
#include <torch/library.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <string>
#include <tuple>
#include <vector>

extern "C" {
int64_t bitfx_count(const void *src, int64_t n, int itemsize, int64_t *offsets, int nthreads);
int bitfx_compress(const void *src, int64_t n, int itemsize, const int64_t *offsets, uint8_t *bitmap,
                   void *values, int nthreads);
int bitfx_decompress(const int64_t *offsets, const uint8_t *bitmap, const void *values, int64_t n,
                     int itemsize, void *out, int nthreads);
void bitfx_pack_bool(const uint8_t *src, int64_t n, uint8_t *out, int nthreads);
void bitfx_unpack_bool(const uint8_t *packed, int64_t n, uint8_t *out, int nthreads);
}

namespace {

constexpr int64_t kBlock = 1024;
constexpr int64_t kBitmapBytesPerBlock = kBlock / 8;
constexpr int64_t kGrainSize = 32768;  // as bitfx.kernels.cpu_ext.GRAIN_SIZE

int threads_for(int64_t n) {
    return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n / kGrainSize)));
}

bool python_requested() {
    const char *env = std::getenv("BITFX_KERNELS");
    if (env == nullptr) return false;
    std::string s;
    for (const char *c = env; *c; ++c)
        if (!std::isspace(static_cast<unsigned char>(*c))) s += static_cast<char>(std::tolower(*c));
    return !(s.empty() || s == "auto" || s == "cpu");
}

int64_t itemsize_of(at::ScalarType dtype) {
    int64_t size = static_cast<int64_t>(c10::elementSize(dtype));
    TORCH_CHECK_TYPE(size == 1 || size == 2 || size == 4 || size == 8, "bitfx: unsupported dtype ", dtype);
    return size;
}

// Mirrors bitfx.ops._layout.
struct Layout {
    std::vector<int64_t> stored, order;
    std::vector<bool> broadcast;
    bool any_broadcast = false, dense = true;

    Layout(at::IntArrayRef size, at::IntArrayRef stride) {
        const int64_t dims = static_cast<int64_t>(size.size());
        TORCH_CHECK_VALUE(static_cast<int64_t>(stride.size()) == dims, "bitfx: size ", size, " and stride ",
                          stride, " differ in length");
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
        int64_t expected = 1;
        for (auto it = order.rbegin(); it != order.rend(); ++it) {
            if (stored[*it] != 1 && stride[*it] != expected) dense = false;
            expected *= stored[*it];
        }
    }
};

// Mirrors bitfx.ops.to_flat.
at::Tensor to_flat(at::Tensor x, at::IntArrayRef stride) {
    Layout layout(x.sizes(), stride);
    if (layout.dense && x.strides() == stride) return x.as_strided({x.numel()}, {1});
    for (int64_t d = 0; d < static_cast<int64_t>(layout.broadcast.size()); d++) {
        if (!layout.broadcast[d]) continue;
        TORCH_CHECK_VALUE(x.stride(d) == 0, "bitfx: layout ", stride, " broadcasts dim ", d,
                          ", but the tensor does not (strides ", x.strides(), ")");
        x = x.narrow(d, 0, 1);
    }
    return x.permute(layout.order).reshape(-1);
}

// Mirrors bitfx.ops._Target.
struct Target {
    Layout layout;
    std::vector<int64_t> size;
    at::Tensor flat, base, permuted;

    Target(at::IntArrayRef size_, at::IntArrayRef stride, at::ScalarType dtype)
        : layout(size_, stride), size(size_.vec()) {
        auto options = at::TensorOptions().dtype(dtype).device(at::kCPU);
        if (layout.dense) {
            int64_t numel = 1;
            for (int64_t s : layout.stored) numel *= s;
            flat = at::empty({numel}, options);
            base = flat.as_strided(layout.stored, stride);
            return;
        }
        base = at::empty_strided(layout.stored, stride, options);
        permuted = base.permute(layout.order);
        flat = at::empty({base.numel()}, options);
    }

    at::Tensor finish() {
        if (!layout.dense) permuted.copy_(flat.view(permuted.sizes()));
        return layout.any_broadcast ? base.expand(size) : base;
    }
};

c10::OperatorHandle python_op(const char *name) {
    return c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
}

std::tuple<at::Tensor, at::Tensor> compress(const at::Tensor &x, c10::SymIntArrayRef stride_) {
    if (python_requested()) {
        static auto op = python_op("bitfx::_compress_py")
                             .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor &, c10::SymIntArrayRef)>();
        return op.call(x, stride_);
    }
    at::IntArrayRef stride = C10_AS_INTARRAYREF_SLOW(stride_);
    const int64_t isz = itemsize_of(x.scalar_type());
    at::Tensor flat = to_flat(x, stride);
    const int64_t n = flat.numel(), nblocks = (n + kBlock - 1) / kBlock;
    at::Tensor offsets = at::empty({nblocks + 1}, at::kLong);
    const int nthreads = threads_for(n);
    const int64_t nnz = bitfx_count(flat.data_ptr(), n, static_cast<int>(isz), offsets.data_ptr<int64_t>(), nthreads);
    const int64_t bitmap_bytes = nblocks * kBitmapBytesPerBlock;
    if (!(bitmap_bytes + nnz * isz < n * isz)) {  // bitfx.format.use_sparse is false: dense fallback
        at::Tensor payload = at::empty({n * isz}, at::kByte);
        if (n) std::memcpy(payload.data_ptr(), flat.data_ptr(), n * isz);
        return {offsets, payload};
    }
    at::Tensor payload = at::empty({bitmap_bytes + nnz * isz}, at::kByte);
    uint8_t *p = payload.data_ptr<uint8_t>();
    bitfx_compress(flat.data_ptr(), n, static_cast<int>(isz), offsets.data_ptr<int64_t>(), p, p + bitmap_bytes,
                   nthreads);
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
    Target target(C10_AS_INTARRAYREF_SLOW(size), C10_AS_INTARRAYREF_SLOW(stride), dtype);
    at::Tensor payload = payload_.contiguous(), offsets = offsets_.contiguous();
    const int64_t n = target.flat.numel();
    if (payload.numel() == n * isz) {  // dense fallback
        if (n) std::memcpy(target.flat.data_ptr(), payload.data_ptr(), n * isz);
    } else {
        const int64_t bitmap_bytes = (n + kBlock - 1) / kBlock * kBitmapBytesPerBlock;
        const uint8_t *p = payload.data_ptr<uint8_t>();
        bitfx_decompress(offsets.data_ptr<int64_t>(), p, p + bitmap_bytes, n, static_cast<int>(isz),
                         target.flat.data_ptr(), threads_for(n));
    }
    return target.finish();
}

at::Tensor pack_bool(const at::Tensor &x, c10::SymIntArrayRef stride) {
    if (python_requested()) {
        static auto op = python_op("bitfx::_pack_bool_py").typed<at::Tensor(const at::Tensor &, c10::SymIntArrayRef)>();
        return op.call(x, stride);
    }
    TORCH_CHECK_TYPE(x.scalar_type() == at::kBool, "bitfx::pack_bool expects a bool tensor, got ", x.scalar_type());
    at::Tensor flat = to_flat(x, C10_AS_INTARRAYREF_SLOW(stride));
    const int64_t n = flat.numel();
    at::Tensor out = at::empty({(n + 7) / 8}, at::kByte);
    bitfx_pack_bool(static_cast<const uint8_t *>(flat.data_ptr()), n, out.data_ptr<uint8_t>(), threads_for(n));
    return out;
}

at::Tensor unpack_bool(const at::Tensor &packed_, c10::SymIntArrayRef size, c10::SymIntArrayRef stride) {
    if (python_requested()) {
        static auto op = python_op("bitfx::_unpack_bool_py")
                             .typed<at::Tensor(const at::Tensor &, c10::SymIntArrayRef, c10::SymIntArrayRef)>();
        return op.call(packed_, size, stride);
    }
    Target target(C10_AS_INTARRAYREF_SLOW(size), C10_AS_INTARRAYREF_SLOW(stride), at::kBool);
    at::Tensor packed = packed_.contiguous();
    const int64_t n = target.flat.numel();
    bitfx_unpack_bool(packed.data_ptr<uint8_t>(), n, static_cast<uint8_t *>(target.flat.data_ptr()), threads_for(n));
    return target.finish();
}

}  // namespace

TORCH_LIBRARY_IMPL(bitfx, CPU, m) {
    m.impl("compress", &compress);
    m.impl("decompress", &decompress);
    m.impl("pack_bool", &pack_bool);
    m.impl("unpack_bool", &unpack_bool);
}
