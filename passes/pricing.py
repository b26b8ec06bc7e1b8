"""The price of keeping a tensor for backward: stored bytes and seconds of work.

One definition, read by every part of bitfx that prices a tensor:

* the partitioner hook (:mod:`.costmodel`), which gives PyTorch's min-cut and
  memory-budget knapsack these prices instead of dense sizes;
* the decisions of :mod:`.analysis` (``SavedTensor.stored_bytes``);
* the report, and the planner's tables and ``--sweep``.

Bytes come from :mod:`bitfx.format` (the one definition of the stored bytes)
at a density: assumed per producer kind (:data:`DEFAULT_DENSITY`), or
measured when the planner calibrates.  Seconds come from a roofline over a
:class:`Machine`: FLOPs (``torch.utils.flop_counter``'s formulas, evaluated
on shapes: nothing runs) against memory traffic.  They are estimates for
choosing between plans, not predictions of wall time.
"""

from __future__ import annotations

import enum
import functools
import logging
import operator

import torch
import torch.fx as fx

from bitfx.format import (
    BITMAP_BYTES_PER_BLOCK,
    EXP_DTYPES,
    num_blocks,
    packed_bool_bytes,
    predicted_bytes,
    use_sparse,
)

from bitfx import profiles
from bitfx.opsets import ALIAS_VIEWS
from bitfx.profiles import MACHINES, Machine  # noqa: F401 - the cost model's words for them

log = logging.getLogger("bitfx")

# Density (fraction of nonzeros) assumed before anything runs, by the kind of
# op that made a tensor sparse.  Measured on torchvision MobileNetV3-Small,
# MobileNetV3-Large and MobileNetV2 at init, train mode, batch 8 of 128x128
# random inputs, torch 2.14.1 (forward hooks on the activation modules):
# ReLU 0.4987, ReLU6 0.4996, Hardswish 0.9975 (zero only below -3),
# Hardsigmoid 1.0000.  Max-pool values are zero only where the whole window
# is: see analysis.assumed_density.
DEFAULT_DENSITY = {"relu": 0.5, "relu6": 0.5, "hardswish": 0.998, "hardsigmoid": 1.0}
KINDS = (*DEFAULT_DENSITY, "max_pool")

# Size assumed for a dimension with no hint (an unbacked size): large, so that
# tensors whose size is unknown are never skipped for being small.
NO_HINT = 1 << 20


def hint(value) -> int:
    """A concrete example value for an int or SymInt (the one compiled with)."""
    if isinstance(value, int):
        return value
    h = getattr(value.node, "hint", None)
    return int(h) if h is not None else NO_HINT


def dense_bytes(val) -> int:
    """Dense bytes of a (fake) tensor, or of a tuple of them; 0 for anything else."""
    if isinstance(val, torch.Tensor):
        return hint(val.numel()) * val.element_size()
    if isinstance(val, (list, tuple)):
        return sum(dense_bytes(v) for v in val)
    return 0


class Codec(enum.Enum):
    """How a saved tensor is stored: bitfx's one storage vocabulary.

    The same words name it in the options (``codec=``), the plan, the
    report, ``bitfx.stats``, the pricing and the docs; the ops that store
    each are named beside it.
    """

    DENSE = "dense"  # as PyTorch saves it
    BITMAP = "bitmap"  # bitfx::compress: per-block bitmap plus the nonzero values
    BITMAP_EXPONENT = "bitmap+exponent"  # bitfx::bitmap_exp_compress: bitmap, nonzeros exponent-coded
    EXPONENT = "exponent"  # bitfx::exp_compress: a dense float tensor, exponents packed
    BOOL = "bool-packed"  # bitfx::pack_bool: 1 bit per element

    @property
    def bitmap(self) -> bool:
        """Stored as a bitmap plus nonzeros (the values exponent-coded or not)."""
        return self in (Codec.BITMAP, Codec.BITMAP_EXPONENT)

    @property
    def exponent(self) -> bool:
        """Stored with the exponent codec (all values, or the nonzeros behind a bitmap)."""
        return self in (Codec.EXPONENT, Codec.BITMAP_EXPONENT)


# Stored bytes over dense bytes of a dense tensor under the exponent codec,
# assumed before anything runs (``calibrate=True`` measures each tensor's).
# Measured on the dense tensors autograd saves in torchvision ResNet-18 at
# init, batch 8, 64x64, torch 2.14.1 (benchmarks/exp_group_size.py, group
# of 32): fp32 0.903, bf16 (autocast) 0.749; fp16 0.92 on normal values
# (benchmarks/kernel_speed.py --codec exponent, 1M and 16M elements; not measured
# on a model: 3 of the 8 bits it packs are fp16 mantissa).
DEFAULT_EXP_RATIO = {torch.float32: 0.903, torch.bfloat16: 0.749, torch.float16: 0.92}
# The same for the nonzero values of ReLU outputs, behind the bitmap (same
# measurement): fp32 0.869, bf16 0.736; fp16 as for dense values.
DEFAULT_EXP_RATIO_NONZERO = {torch.float32: 0.869, torch.bfloat16: 0.736, torch.float16: 0.92}


def exp_ratio(dtype: torch.dtype) -> float | None:
    """The assumed ratio of the exponent codec for ``dtype``, or None where it does not apply."""
    return DEFAULT_EXP_RATIO.get(dtype) if dtype in EXP_DTYPES else None


def stored_bytes(val: torch.Tensor, codec: Codec, density: float = 0.5, ratio: float | None = None) -> int:
    """Bytes kept for backward when ``val`` is stored with ``codec``.

    ``density``: the fraction of nonzeros (bitmap).  ``ratio``: stored over
    dense bytes under the exponent codec (default: :data:`DEFAULT_EXP_RATIO`).
    """
    numel = hint(val.numel())
    if codec is Codec.EXPONENT:
        dense = numel * val.element_size()
        r = ratio if ratio is not None else exp_ratio(val.dtype) or 1.0
        return min(dense, int(dense * r + 0.5))
    if codec is Codec.BITMAP_EXPONENT:
        # The runtime's rule (kernels.bitmap_exp_compress): the bitmap where
        # it would pay raw, then the values coded where that is shorter.
        s, nnz = val.element_size(), int(round(numel * density))
        offsets = (num_blocks(numel) + 1) * 8
        if not use_sparse(numel, nnz, s):
            return offsets + stored_bytes(val, Codec.EXPONENT, ratio=ratio)
        r = ratio if ratio is not None else DEFAULT_EXP_RATIO_NONZERO.get(val.dtype, 1.0)
        values = nnz * s
        return offsets + num_blocks(numel) * BITMAP_BYTES_PER_BLOCK + min(values, int(values * r + 0.5))
    if codec is Codec.BITMAP:
        return predicted_bytes(numel, val.element_size(), density)
    if codec is Codec.BOOL:
        return packed_bool_bytes(numel)
    return numel * val.element_size()


def machine_for(graph: fx.Graph) -> Machine:
    """The device profile in force for the graph's device (the device of its first tensor: CUDA
    if it is on CUDA, else CPU); see :mod:`bitfx.profiles`."""
    for node in graph.nodes:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            return profiles.current("cuda" if val.device.type == "cuda" else "cpu")
    return profiles.current("cpu")


def codec_seconds(val: torch.Tensor, codec: Codec, machine: Machine) -> float:
    """Encode in forward plus decode in backward, for one saved tensor."""
    if codec is Codec.DENSE:
        return 0.0
    dense = dense_bytes(val)
    if codec is Codec.BOOL:  # one pass over a byte-per-element mask each way
        return 2 * machine.seconds_moving(2 * dense) + 2 * machine.bitmap_call
    if codec is Codec.EXPONENT:
        return dense / machine.exp_encode + dense / machine.exp_decode + 2 * machine.exp_call
    bitmap = dense / machine.encode + dense / machine.decode + 2 * machine.bitmap_call
    if codec is Codec.BITMAP_EXPONENT:  # and the codec over the values (half, at the default density)
        values = dense * DEFAULT_DENSITY["relu"]
        return bitmap + values / machine.exp_encode + values / machine.exp_decode + 2 * machine.exp_call
    return bitmap


def exponent_pays(val: torch.Tensor, machine: Machine, values_only: bool = False) -> bool:
    """``codec="auto"``'s rule: code a dense tensor when its bytes saved per codec second are
    at least half the codec's best (what its throughput gives, with no per-call cost).

    That is, when the two calls cost no more than the bytes: dense bytes of at
    least ``2 * exp_call`` times the combined throughput (about 110 KB on CPU).
    ``values_only``: the nonzero values behind a bitmap, at the default density.
    """
    dense = dense_bytes(val) * (DEFAULT_DENSITY["relu"] if values_only else 1)  # behind a bitmap: the nonzeros
    best = dense / machine.exp_encode + dense / machine.exp_decode
    return best + 2 * machine.exp_call <= 2 * best


def op_seconds(node: fx.Node, machine: Machine) -> float:
    """Roofline time of one node, as Inductor would run it.

    * FLOP-counted ops (matmul, convolution, attention: extern kernels):
      max(FLOPs / flops, bytes in and out / bandwidth).
    * Fusible ops (pointwise, and the reductions Inductor fuses them into):
      free while every consumer is itself generated code; one write when an
      extern kernel or the graph's output needs the value in memory (the
      extern kernel pays for reading it).
    * Views and ``getitem``: free.  Anything else: bytes in and out.
    """
    if node.op != "call_function" or node.target is operator.getitem or node.target in ALIAS_VIEWS:
        return 0.0
    out = dense_bytes(node.meta.get("val"))
    flops = _flops(node, node.meta.get("val"))
    if not flops and _op_types().is_fusible(node):
        return machine.seconds_moving(out) if any(_needs_memory(u) for u in node.users) else 0.0
    moved = out + sum(dense_bytes(a.meta.get("val")) for a in node.all_input_nodes)
    val = node.meta.get("val")
    rate = machine.flop_rate(val.dtype) if isinstance(val, torch.Tensor) else machine.flops
    return max(flops / rate, machine.seconds_moving(moved))


def recompute_seconds(node: fx.Node, machine: Machine) -> float:
    """Extra time of running forward ``node`` again in backward.

    Free for fusible pointwise ops, as PyTorch's partitioner assumes:
    Inductor fuses them into the backward kernels, and where the value must
    be in memory the recompute writes it where the saving plan reads it
    back.  (Measured on CPU, torch 2.14.1: PyTorch's budget-0.9 plans, which
    recompute BatchNorm+ReLU chains, step at 0.96-0.99x of the default plan
    on DenseNet-121, MobileNetV2, ResNet-18 and a squared-ReLU FFN.)  The
    same holds for ``cat``: Inductor has its inputs write into slices of the
    output.

    A fusible *reduction* (BatchNorm's ``var_mean``, LayerNorm's statistics)
    is not free: its consumers need the whole result before they start, so
    recomputing it is one more pass that reads its inputs.  Priced free,
    the free default on DenseNet-121 recomputed the batch statistics of 88
    BatchNorms that stock's budget-0.5 plan keeps (a few KiB each), and
    stepped at 1.03-1.05x ``inductor`` against that plan's 1.02-1.03x
    (machine B, 2c9816b).
    """
    if node.op != "call_function":
        return 0.0
    if node.target is torch.ops.aten.cat.default:  # Inductor's ConcatKernel: producers write into its slices
        return 0.0
    val = node.meta.get("val")
    if not _flops(node, val) and _op_types().is_fusible(node):
        return machine.seconds_moving(_inputs_bytes(node)) if _reduces(node) else 0.0
    return op_seconds(node, machine)


def _inputs_bytes(node: fx.Node) -> int:
    return sum(dense_bytes(a.meta.get("val")) for a in node.all_input_nodes)


def _reduces(node: fx.Node) -> bool:
    """Whether ``node`` has fewer output elements than some input: a reduction.

    Views (slices, selects) and ``getitem`` also have fewer, and read nothing.
    """
    if node.target is operator.getitem or node.target in ALIAS_VIEWS or _op_types().is_view(node):
        return False

    def numel(val) -> int:
        if isinstance(val, torch.Tensor):
            return hint(val.numel())
        if isinstance(val, (list, tuple)):
            return sum(numel(v) for v in val)
        return 0

    out = numel(node.meta.get("val"))
    return any(numel(a.meta.get("val")) > out for a in node.all_input_nodes)


def store_seconds(node: fx.Node, machine: Machine) -> float:
    """Extra time of saving ``node`` for backward: one write where it would stay fused.

    (Backward's read of it replaces the read of what it would be recomputed from.)
    """
    if node.op != "call_function" or node.target is operator.getitem or node.target in ALIAS_VIEWS:
        return 0.0
    if _flops(node, node.meta.get("val")) or not _op_types().is_fusible(node):
        return 0.0  # an extern or unfused kernel writes its output anyway
    if any(_needs_memory(u) for u in node.users):
        return 0.0  # materialized for an extern consumer anyway
    return machine.seconds_moving(dense_bytes(node.meta.get("val")))


def _needs_memory(user: fx.Node) -> bool:
    """Whether ``user`` reads its input from memory rather than inside a fused kernel."""
    if user.op != "call_function":
        return True  # the graph's output
    if user.target is operator.getitem or user.target in ALIAS_VIEWS:
        return any(_needs_memory(u) for u in user.users)
    return not _op_types().is_fusible(user) and bool(_flops(user, user.meta.get("val")))


@functools.cache
def _op_types():
    from bitfx.torch_internals import get_default_op_list

    return get_default_op_list()


def _flops(node: fx.Node, out) -> float:
    from torch.utils.flop_counter import flop_registry

    packet = getattr(node.target, "_overloadpacket", None)
    formula = flop_registry.get(packet) if packet is not None else None
    if formula is None:
        return 0.0
    args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda a: a.meta.get("val"))
    try:
        # The registered formulas read only shapes (shape_wrapper): nothing runs.
        return float(hint(formula(*args, **kwargs, out_val=out)))
    except Exception as e:  # e.g. a formula that cannot read symbolic shapes
        log.debug("bitfx: no FLOP count for %s (%s); priced by its bytes alone", node, e)
        return 0.0
