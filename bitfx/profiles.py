"""Device profiles as data: the constants the cost model prices a device with.

A :class:`Machine` holds a device's throughputs (FLOP/s, memory bandwidth,
each codec's cost per call and per byte) and the scratch its convolution
backward allocates.  :data:`MACHINES` are the built-in ones.  The profile in
force for a device type is :func:`current`'s: the one a front end set with
:func:`use` (``bitfx.calibrate`` measures, loads and sets it before a graph
is partitioned), else the built-in one.  The passes read it here and never
measure.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

@dataclass(frozen=True)
class Machine:
    """Throughputs the time estimates divide by (bytes/s count dense bytes)."""

    name: str
    flops: float  # FLOP/s of matmul and convolution
    bandwidth: float  # bytes/s moved (read plus write) by a memory-bound op
    encode: float  # dense bytes/s bitfx::compress reads
    decode: float  # dense bytes/s bitfx::decompress writes
    bitmap_call: float  # seconds per compress/decompress (or pack_bool/unpack_bool) call beyond its bytes
    exp_encode: float  # dense bytes/s bitfx::exp_compress reads
    exp_decode: float  # dense bytes/s bitfx::exp_decompress writes
    exp_call: float  # seconds per exp_compress or exp_decompress call beyond its bytes
    # Matmul FLOP/s by dtype name ("bfloat16": ...), where measured; others use ``flops``.
    flops_by_dtype: tuple[tuple[str, float], ...] = ()
    # Scratch bytes of a weight-gradient ``convolution_backward`` beyond the
    # gradients it returns, over its weight's fp32 bytes, for a channels-last
    # and a contiguous weight (the step-peak model adds it; 0 where none is known).
    conv_scratch_channels_last: float = 0.0
    conv_scratch_contiguous: float = 0.0
    # A depthwise weight gradient with a kernel larger than 3x3 whose input
    # is neither contiguous nor channels-last takes a generic path that
    # allocates scratch per channel and kernel tap: bytes per channel per
    # tap, by dtype name (passes/peak.py says where it is counted).
    depthwise_scratch_by_dtype: tuple[tuple[str, float], ...] = ()
    # By dtype name: (channels-last, contiguous, im2col).  The first two are
    # a weight gradient's scratch in multiples of its weight's own bytes, for
    # each weight layout; the third is the fraction of an im2col buffer
    # (:func:`im2col_numel`) that a convolution and a weight gradient
    # allocate: where a CPU has no native kernel for a dtype (bf16 without
    # AVX-512 BF16), oneDNN lowers both to im2col and a GEMM.  A dtype with
    # no entry is priced with the two fields above.
    conv_scratch_by_dtype: tuple[tuple[str, float, float, float], ...] = ()
    # The copies a weight-gradient ``convolution_backward`` makes of its
    # operands when they are not laid out as it wants: by dtype name and
    # case (:data:`COPY_CASES`), (input, gradient) multiples of their bytes.
    conv_operand_copies_by_dtype: tuple[tuple[str, str, float, float], ...] = ()

    def conv_scratch(self, channels_last: bool) -> float:
        return self.conv_scratch_channels_last if channels_last else self.conv_scratch_contiguous

    def _conv_entry(self, dtype) -> tuple[float, float, float] | None:
        name = str(dtype).replace("torch.", "")
        return next((tuple(e[1:]) for e in self.conv_scratch_by_dtype if e[0] == name), None)

    def conv_weight_scratch(self, channels_last: bool, numel: int, itemsize: int, dtype=None,
                            im2col: int = 0) -> float:
        """Scratch bytes of the weight gradient of a weight of ``numel`` elements.

        ``im2col``: the elements of the call's im2col buffer
        (:func:`im2col_numel`).  Without an entry for ``dtype``, the weight's
        scratch is taken to be fp32-sized, as oneDNN's was measured on an
        AVX-512 Xeon (a bf16 weight's 4x and 5x its own bytes).
        """
        entry = self._conv_entry(dtype) if dtype is not None else None
        if entry is None:
            return self.conv_scratch(channels_last) * numel * max(itemsize, 4)
        cl, contiguous, frac = entry
        return ((cl if channels_last else contiguous) * numel + frac * im2col) * itemsize

    def conv_operand_copies(self, dtype, input_channels_last: bool, grad_channels_last: bool,
                            depthwise_grad_input: bool, input_contiguous: bool = True,
                            depthwise: bool = False) -> tuple[float, float]:
        """(input, gradient) multiples a weight gradient copies, for these layouts; (0, 0) where none is known."""
        name = str(dtype).replace("torch.", "")
        cases = {c: (x, g) for d, c, x, g in self.conv_operand_copies_by_dtype if d == name}
        if depthwise and "depthwise with input gradient" in cases:
            # a depthwise kernel of its own, which takes the operands as they are
            x, g = 0.0, 0.0
        elif input_channels_last:
            x, g = (0.0, 0.0) if grad_channels_last else cases.get("grad not channels-last", (0.0, 0.0))
        else:
            x, g = cases.get("input not channels-last, grad channels-last" if grad_channels_last
                             else "neither channels-last", (0.0, 0.0))
        extra = [c for c, on in (("depthwise with input gradient", depthwise_grad_input),
                                 ("input neither channels-last nor contiguous",
                                  not input_channels_last and not input_contiguous)) if on]
        for case in extra:
            dx, dg = cases.get(case, (0.0, 0.0))
            x, g = x + dx, g + dg
        return x, g

    def conv_im2col_scratch(self, dtype, im2col: int, itemsize: int) -> float:
        """Scratch bytes of a convolution (forward) whose im2col buffer has ``im2col`` elements."""
        entry = self._conv_entry(dtype)
        return entry[2] * im2col * itemsize if entry else 0.0

    def depthwise_scratch(self, dtype) -> float:
        name = str(dtype).replace("torch.", "")
        return next((b for d, b in self.depthwise_scratch_by_dtype if d == name), 0.0)

    def seconds_moving(self, nbytes: float) -> float:
        return nbytes / self.bandwidth

    def flop_rate(self, dtype) -> float:
        name = str(dtype).replace("torch.", "")
        return next((f for d, f in self.flops_by_dtype if d == name), self.flops)


def im2col_numel(x_shape, w_shape, out_shape) -> int:
    """Elements of the im2col buffer of a convolution from ``x_shape`` by ``w_shape`` to ``out_shape``.

    Batch x input channels x output positions x kernel taps.  None for a
    1x1 kernel that keeps the image's size (the GEMM reads the input as it
    is), nor for a grouped convolution (not measured).
    """
    if len(x_shape) < 3 or len(w_shape) != len(x_shape) or x_shape[1] != w_shape[1]:
        return 0
    kernel, out = list(w_shape[2:]), list(out_shape[2:])
    if all(k == 1 for k in kernel) and out == list(x_shape[2:]):
        return 0
    n = int(x_shape[0]) * int(x_shape[1])
    for d in (*out, *kernel):
        n *= int(d)
    return n


# CPU: measured on an AMD EPYC without AVX-512 (Zen 3), 2 cores, torch 2.14.1:
# fp32 matmul 107 and conv 110 GFLOP/s; clone of 16 MiB moves 19 GB/s (read
# plus write).  Codec constants: `python benchmarks/codec_costs.py` (and
# `--dtype bfloat16`) on that machine, which fits per-call seconds and dense
# bytes/s to the bitfx:: ops as a graph calls them (AVX2 bitmap kernels),
# 16K-1M elements, ReLU outputs at density 0.5:
#   compress 24 us + 12.8 GB/s, decompress 27 us + 15.9 GB/s (fp32);
#   17 us + 8.2 GB/s and 23 us + 11.2 GB/s (bf16);
#   exp_compress 35 us + 3.3 GB/s, exp_decompress 34 us + 5.1 GB/s (fp32);
#   19 us + 2.1 GB/s and 24 us + 3.8 GB/s (bf16).
# The constants below round these; bf16 is slower per dense byte than priced.
# A call's fixed cost is mostly dispatch from Python and allocation: clone
# fits 5 us per call the same way.
# Convolution-backward scratch on CPU: oneDNN's weight-gradient kernel
# allocates weight-sized fp32 buffers beyond what it returns (a bf16 weight's
# are fp32-sized too), 2x the weight for a channels-last weight and 3x for a
# contiguous one, for any batch above 1 and
# any thread count (Intel Xeon, AVX-512, torch 2.14.1; measured per device by
# python -m bitfx calibrate).  A depthwise one with a 5x5 or 7x7 kernel over
# an input laid out neither contiguous nor channels-last allocates per
# channel and tap about 1,028 bytes in fp32 and 1,500-2,300 in bf16 (growing
# with the image; 1,660 at 6x6), for any batch and thread count; 3x3 kernels
# allocate next to nothing (AMD EPYC, AVX2, torch 2.14.1).  Another EPYC
# (1 MiB L2) allocates 260 bytes in fp32 and about 8 in bf16: these vary by
# CPU, so `calibrate` measures them.
# MobileNetV3-small's 576-channel 5x5 layer: 22 MiB in bf16.
# On that EPYC (AVX2, no native bf16), a bf16 convolution and its weight
# gradient allocate exactly their im2col buffer (from a 1x1 stride-2 to a 7x7
# kernel, batch 2-16, 1 and 2 threads), and a bf16 weight gradient nothing
# weight-sized but a copy of a contiguous weight; fp32 allocates no im2col.
# Operand copies of a CPU weight gradient (convolution_backward), on that
# EPYC (AVX2), torch 2.14.1, 4x64x24x24 inputs, 1x1 and 3x3 kernels,
# depthwise or not, stride 1 and 2 (beside the weight-sized scratch above):
# fp32 copies a gradient that is not channels-last beside a channels-last
# input (1x the gradient), an input that is not (1x it and 1x the gradient,
# 2x the gradient where that is channels-last); bf16 copies the gradient
# where the two layouts differ, and a 3x3 depthwise one that also returns
# the input gradient allocates 1x its input in any layout, and copies no
# operand for a layout (a kernel of its own).  An input laid
# out neither channels-last nor contiguous (Inductor gives some outputs a
# permuted layout) is first made contiguous: 1x more, in both dtypes.  Inductor lays
# out recomputed convolution inputs at their FX strides where backward's
# layout optimization is off, which is what MobileNetV2's backward at
# budget 0.9 peaks on.  calibrate does not measure these: these values hold
# for any CPU profile until it does.
# CUDA: not measured (no GPU has run bitfx yet); an H100-class balance is
# assumed: 60 TFLOP/s, 3 TB/s, codecs at a third of the bandwidth, and 30 us
# per call (the bitmap encoder reads its nonzero count on the host).
COPY_CASES = ("grad not channels-last", "neither channels-last", "input not channels-last, grad channels-last",
              "depthwise with input gradient", "input neither channels-last nor contiguous")
CPU_OPERAND_COPIES = (
    ("float32", "grad not channels-last", 0.0, 1.0),
    ("float32", "neither channels-last", 1.0, 1.0),
    ("float32", "input not channels-last, grad channels-last", 1.0, 2.0),
    ("float32", "input neither channels-last nor contiguous", 1.0, 0.0),
    ("bfloat16", "grad not channels-last", 0.0, 1.0),
    ("bfloat16", "input not channels-last, grad channels-last", 0.0, 1.0),
    ("bfloat16", "depthwise with input gradient", 1.0, 0.0),
    ("bfloat16", "input neither channels-last nor contiguous", 1.0, 0.0),
)

MACHINES = {
    "cpu": Machine("cpu: built-in constants (2-core AMD EPYC Zen 3; run python -m bitfx calibrate)", flops=100e9, bandwidth=20e9, encode=12e9, decode=15e9, bitmap_call=20e-6,
                   exp_encode=3e9, exp_decode=5e9, exp_call=30e-6,
                   conv_scratch_channels_last=2.0, conv_scratch_contiguous=3.0,
                   depthwise_scratch_by_dtype=(("bfloat16", 1660.0), ("float32", 1028.0)),
                   conv_scratch_by_dtype=(("float32", 2.0, 3.0, 0.0), ("bfloat16", 0.0, 1.0, 1.0)),
                   conv_operand_copies_by_dtype=CPU_OPERAND_COPIES),
    "cuda": Machine("cuda: built-in constants (assumed, unmeasured; run python -m bitfx calibrate --device cuda)", flops=60e12, bandwidth=3e12, encode=1e12, decode=1e12, bitmap_call=30e-6,
                    exp_encode=1e12, exp_decode=1e12, exp_call=30e-6),
}

_lock = threading.Lock()
_IN_FORCE: dict[str, Machine] = {}


def use(device_type: str, machine: Machine) -> None:
    """Price graphs on ``device_type`` with ``machine`` from now on (in this process)."""
    with _lock:
        _IN_FORCE[device_type] = machine


def current(device_type: str) -> Machine:
    """The profile in force for ``device_type`` ("cpu" or "cuda"): set by :func:`use`, else built in."""
    with _lock:
        return _IN_FORCE.get(device_type) or MACHINES[device_type]
