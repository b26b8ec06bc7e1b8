"""Device profiles: the constants the cost model prices with, measured where bitfx runs.

``python -m bitfx calibrate`` measures, on the current device (CPU, or CUDA
with ``--device cuda``): matmul FLOP/s in fp32 and bf16, memory bandwidth
(a copy between two buffers larger than the caches, read plus write), and
for each codec op its cost per call and its throughput, fitted
(``seconds = per_call + dense bytes / throughput``) to the ``bitfx::`` ops
called as a compiled graph calls them, on ReLU outputs (bitmap) and dense
normal values (exponent) at two sizes (:data:`SIZES`).  The profile
is a JSON file, with the device's name, torch version and date, under
``$BITFX_CACHE/profiles/`` (else ``~/.cache/bitfx/profiles/``), one per
device.

The cost model prices a graph with the profile of the device it compiles
for (:func:`machine`).  Without one, the first compile on
a device measures it quickly (under a second on a CPU once the kernels are
built; the first use also builds them, or compiles the Triton kernels) and
saves that as the device's profile.  The report and ``plan`` name the
profile that priced the plan.  ``BITFX_PROFILE`` overrides: a profile's
path, or ``builtin`` for the constants of
:data:`bitfx.profiles.MACHINES` (measured on one 2-core x86 machine
for CPU; assumed for CUDA).  The test suite sets ``builtin``, so that its
plans do not depend on the machine that runs it.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime
import functools
import json
import logging
import os
import platform
import re
import time
from pathlib import Path

import torch

from . import profiles
from .profiles import MACHINES, Machine, im2col_numel

log = logging.getLogger("bitfx")

# Two sizes: the small one is almost all per-call cost (dispatch, launch,
# the host read of the nonzero count); the large one, bigger than most
# caches, is almost all throughput.  A least-squares line through sizes in
# between bends with the cache hierarchy and drives the per-call cost to 0.
SIZES = (1024, 1 << 22)
QUICK_SIZES = (1024, 1 << 20)
# Machine fields that only a full `calibrate` measures (CPU convolution-backward scratch).
SCRATCH_FIELDS = ("conv_scratch_channels_last", "conv_scratch_contiguous", "depthwise_scratch_by_dtype",
                  "conv_scratch_by_dtype")
# Machine fields no calibration measures (a weight gradient's operand
# copies): every profile prices them with the built-in values.  Profiles
# saved before this carry them empty, which was never a measurement.
UNMEASURED_FIELDS = ("conv_operand_copies_by_dtype",)


def _cache_root() -> Path:
    root = os.environ.get("BITFX_CACHE") or Path.home() / ".cache" / "bitfx"
    return Path(root) / "profiles"


def device_name(device_type: str) -> str:
    if device_type == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"


def profile_path(device_type: str) -> Path:
    return _cache_root() / (re.sub(r"[^A-Za-z0-9]+", "_", f"{device_type} {device_name(device_type)}").strip("_")
                            + ".json")


def _best_s(fn, reps: int, device_type: str) -> float:
    """The fastest of ``reps`` timed calls, after one warm-up: other work on the
    machine only ever adds time, and the profile is saved for later processes."""
    fn()
    best = float("inf")
    for _ in range(reps):
        if device_type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device_type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(seconds per call, bytes per second) of ``seconds = a + bytes / b``, by least squares."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    var = sum((x - mx) ** 2 for x, _ in points)
    slope = sum((x - mx) * (y - my) for x, y in points) / var if var else 0.0
    if slope <= 0:
        raise RuntimeError(f"bitfx calibrate: timings do not grow with size ({points}): too noisy to fit")
    return max(my - slope * mx, 0.0), 1 / slope


def _codec_seconds(n: int, dtype: torch.dtype, device_type: str, reps: int) -> dict[str, float]:
    ops = torch.ops.bitfx
    gen = torch.Generator().manual_seed(n)
    sparse = torch.randn(n, generator=gen).relu_().to(dtype).to(device_type)
    dense = torch.randn(n, generator=gen).to(dtype).to(device_type)
    size, stride = [n], [1]
    offsets, payload = ops.compress(sparse, stride)
    stream = ops.exp_compress(dense, stride)
    timed = {
        "compress": lambda: ops.compress(sparse, stride),
        "decompress": lambda: ops.decompress(offsets, payload, size, stride, dtype),
        "exp_compress": lambda: ops.exp_compress(dense, stride),
        "exp_decompress": lambda: ops.exp_decompress(stream, size, stride, dtype),
    }
    return {name: _best_s(fn, reps, device_type) for name, fn in timed.items()}


def codec_timings(device_type: str, sizes=SIZES, reps: int = 50, dtype=torch.float32) -> dict:
    """Per codec op: [(dense bytes, fastest seconds)] at each size."""
    import bitfx.ops  # noqa: F401  (defines torch.ops.bitfx)

    out: dict[str, list[tuple[float, float]]] = {}
    for n in sizes:
        nbytes = n * dtype.itemsize
        for name, seconds in _codec_seconds(n, dtype, device_type, reps).items():
            out.setdefault(name, []).append((nbytes, seconds))
    return out


def _flops(device_type: str, dtype: torch.dtype, n: int, reps: int) -> float:
    a = torch.randn(n, n, device=device_type).to(dtype)
    b = torch.randn(n, n, device=device_type).to(dtype)
    return 2 * n**3 / _best_s(lambda: a @ b, reps, device_type)


def measure(device_type: str = "cpu", quick: bool = False) -> dict:
    """A profile of this device: the :class:`Machine` fields, and what was measured."""
    reps = 10 if quick else 50
    n = 512 if device_type == "cpu" else 4096
    flops = {"float32": _flops(device_type, torch.float32, n, max(reps // 5, 3)),
             "bfloat16": _flops(device_type, torch.bfloat16, n, max(reps // 5, 3))}
    # A copy between buffers bigger than the caches, both already faulted in
    # (a step reuses its allocator's memory): read plus write.
    x = torch.ones((64 if device_type == "cpu" else 256) * 2**20 // 4, device=device_type)
    y = torch.zeros_like(x)
    bandwidth = 2 * x.nbytes / _best_s(lambda: y.copy_(x), reps, device_type)
    timings = codec_timings(device_type, QUICK_SIZES if quick else SIZES, reps)
    fits = {op: fit(points) for op, points in timings.items()}
    machine = Machine(
        name="", flops=flops["float32"], bandwidth=bandwidth,
        encode=fits["compress"][1], decode=fits["decompress"][1],
        bitmap_call=(fits["compress"][0] + fits["decompress"][0]) / 2,
        exp_encode=fits["exp_compress"][1], exp_decode=fits["exp_decompress"][1],
        exp_call=(fits["exp_compress"][0] + fits["exp_decompress"][0]) / 2,
        flops_by_dtype=tuple(sorted(flops.items())),
        **(conv_scratch() if device_type == "cpu" and not quick else {}),
    )
    # The quick profile does not measure the convolution scratch: it runs in
    # a compile's worker thread, and the profiler started off the main thread
    # prints an error line at exit.  Its fields are left out of the file, so
    # that the built-in ratios stand until `calibrate` measures them.
    unmeasured = set(UNMEASURED_FIELDS) | (set(SCRATCH_FIELDS) if quick or device_type != "cpu" else set())
    return {
        "device": device_type, "device_name": device_name(device_type), "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "quick": quick, "machine": {k: v for k, v in dataclasses.asdict(machine).items()
                                    if k != "name" and k not in unmeasured},
        "timings": {op: [[b, t] for b, t in pts] for op, pts in timings.items()},
    }


def save(profile: dict, path: Path | None = None) -> Path:
    path = path or profile_path(profile["device"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(profile, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def from_profile(profile: dict, source: str) -> Machine:
    # A field the profile lacks (one saved by an older bitfx) keeps the built-in value.
    builtin = MACHINES[profile["device"]]
    fields = {f.name: getattr(builtin, f.name) for f in dataclasses.fields(Machine) if f.name != "name"}
    # Quick profiles saved before they left their scratch fields out carry
    # zeros there, which were never measured.
    fields.update({k: v for k, v in profile["machine"].items()
                   if k not in UNMEASURED_FIELDS and not (profile.get("quick") and k in SCRATCH_FIELDS)})
    for name in ("flops_by_dtype", "depthwise_scratch_by_dtype"):  # JSON lists back to pairs
        fields[name] = tuple((str(d), float(f)) for d, f in fields.get(name, ()))
    fields["conv_scratch_by_dtype"] = tuple((str(d), *map(float, rest)) for d, *rest in fields["conv_scratch_by_dtype"])
    fields["conv_operand_copies_by_dtype"] = tuple((str(d), str(c), float(x), float(g))
                                                   for d, c, x, g in fields["conv_operand_copies_by_dtype"])
    return Machine(name=f"{profile['device']}: profile {source} ({profile['device_name']}, measured "
                        f"{profile['date'][:10]}, torch {profile['torch']})", **fields)


def _load(path: Path, device_type: str, source: str) -> Machine:
    profile = json.loads(path.read_text())
    if profile.get("device") != device_type:
        raise ValueError(f"{path} is a {profile.get('device')} profile, not {device_type}")
    return from_profile(profile, source)


@functools.cache
def _machine(device_type: str, override: str | None) -> Machine:
    if override == "builtin":
        return MACHINES[device_type]
    if override:
        path = Path(override)
        if not path.exists():
            raise FileNotFoundError(f"BITFX_PROFILE={override}: no such profile")
        return _load(path, device_type, str(path))
    if device_type == "cuda" and not torch.cuda.is_available():
        return MACHINES["cuda"]  # planning for CUDA on a machine without one
    path = profile_path(device_type)
    if path.exists():
        return _load(path, device_type, str(path))
    # No profile yet: a quick measurement, saved so that later processes (and
    # Inductor's caches, keyed on it) see the same constants.  It runs in a
    # thread of its own: the compile that asks is inside fake-tensor and
    # tracing modes, which are thread-local.  Run under them, the ops timed
    # fake kernels, and the payload sizes they made were unbacked symbols
    # left pending in the compile's ShapeEnv, which Inductor then refused.
    start = time.perf_counter()
    try:
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="bitfx-calibrate") as pool:
            profile = pool.submit(measure, device_type, True).result()
    except RuntimeError as e:
        log.warning("bitfx: quick measurement of %s failed (%s); pricing with %s", device_type, e,
                    MACHINES[device_type].name)
        return MACHINES[device_type]
    try:
        save(profile, path)
    except OSError as e:
        log.warning("bitfx: could not save the device profile to %s: %s", path, e)
    log.info("bitfx: measured %s in %.1f s (quick; python -m bitfx calibrate measures it fully) -> %s",
             profile["device_name"], time.perf_counter() - start, path)
    return from_profile(profile, f"{path}, quick")


def machine(device_type: str) -> Machine:
    """The Machine that prices graphs on ``device_type``: ``BITFX_PROFILE``, else the
    device's profile, else a quick measurement made now and saved as its profile.

    It is also put in force (:func:`bitfx.profiles.use`): the backend calls
    this before each graph is partitioned, and the passes price with it.
    """
    device_type = "cuda" if device_type == "cuda" else "cpu"
    found = _machine(device_type, os.environ.get("BITFX_PROFILE") or None)
    profiles.use(device_type, found)
    return found


@functools.cache
def conv_scratch() -> dict[str, float]:
    """The :class:`Machine` fields of CPU ``convolution_backward`` scratch, measured here.

    oneDNN's weight-gradient kernel allocates weight-sized buffers beyond the
    gradients it returns.  Measured on one small convolution (batch above 1,
    where the kernel takes its batched path), for each weight layout.
    """
    return {"conv_scratch_channels_last": _conv_scratch(True), "conv_scratch_contiguous": _conv_scratch(False),
            "depthwise_scratch_by_dtype": tuple((str(d).replace("torch.", ""), _depthwise_scratch(d))
                                                for d in (torch.bfloat16, torch.float32)),
            "conv_scratch_by_dtype": tuple((str(d).replace("torch.", ""), *_conv_scratch_of(d))
                                           for d in (torch.float32, torch.bfloat16))}


def scratch_bytes(fn) -> int:
    """CPU allocator bytes ``fn()`` allocates beyond the tensors it returns, after one warm-up call."""
    from .measure import cpu_peak_and_net

    fn()
    out = []
    peak, _, _ = cpu_peak_and_net(lambda: out.append(fn()))
    returned = sum(t.nbytes for r in out for t in (r if isinstance(r, tuple) else (r,)) if t is not None)
    return max(peak - returned, 0)


def _conv_scratch_of(dtype: torch.dtype) -> tuple[float, float, float]:
    """(channels-last, contiguous, im2col): :attr:`Machine.conv_scratch_by_dtype`'s entry for ``dtype``.

    The im2col fraction from a forward 3x3 convolution whose im2col buffer
    is 9x its input; the weight multiples from the weight gradient
    :func:`_conv_scratch` measures, less that fraction of its im2col buffer.
    oneDNN's native kernels allocate small shape-dependent buffers
    (1-45% of an im2col buffer in fp32, measured), which are not this
    path: a fraction under one half is recorded as none.
    """
    cl = torch.channels_last
    w = torch.randn(32, 32, 3, 3, dtype=dtype).contiguous(memory_format=cl)
    x = torch.randn(2, 32, 16, 16, dtype=dtype).contiguous(memory_format=cl)
    conv = lambda x, w: torch.ops.aten.convolution(x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1)  # noqa: E731
    im2col = im2col_numel(x.shape, w.shape, x.shape) * x.element_size()
    frac = scratch_bytes(lambda: conv(x, w)) / im2col
    frac = round(frac, 2) if frac >= 0.5 else 0.0
    weights = []
    for layout in (cl, torch.contiguous_format):
        w = torch.randn(32, 32, 3, 3, dtype=dtype).contiguous(memory_format=layout)
        x = torch.randn(2, 32, 8, 8, dtype=dtype).contiguous(memory_format=cl)
        grad = conv(x, w).contiguous(memory_format=cl)
        got = scratch_bytes(lambda: torch.ops.aten.convolution_backward(
            grad, x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [True, True, False]))
        got -= frac * im2col_numel(x.shape, w.shape, grad.shape) * x.element_size()
        weights.append(round(max(got, 0) / w.nbytes, 2))
    return weights[0], weights[1], frac


def _depthwise_scratch(dtype: torch.dtype) -> float:
    """Bytes per channel and kernel tap of oneDNN's generic 5x5 depthwise weight gradient.

    Measured on a channels-last input, which takes that path in isolation
    and allocates what stock's bf16 backward was measured to (240 channels at
    6x6: 9.49 MiB here, 9.55 there).
    """
    c, k = 64, 5
    cl = torch.channels_last
    w = torch.randn(c, 1, k, k, dtype=dtype).contiguous(memory_format=cl)
    x = torch.randn(2, c, 6, 6, dtype=dtype).contiguous(memory_format=cl)
    grad = torch.randn(2, c, 6, 6, dtype=dtype).contiguous(memory_format=cl)
    return scratch_bytes(lambda: torch.ops.aten.convolution_backward(
        grad, x, w, None, [1, 1], [2, 2], [1, 1], False, [0, 0], c, [True, True, False])) / (c * k * k)


def _conv_scratch(channels_last: bool) -> float:
    layout = torch.channels_last if channels_last else torch.contiguous_format
    w = torch.randn(32, 32, 3, 3).contiguous(memory_format=layout)
    x = torch.randn(2, 32, 8, 8).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(2, 32, 8, 8).contiguous(memory_format=torch.channels_last)
    return scratch_bytes(lambda: torch.ops.aten.convolution_backward(
        grad, x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [True, True, False])) / w.nbytes


def key() -> str:
    """What decides the profiles :func:`machine` would use, for cache keys; measures nothing."""
    override = os.environ.get("BITFX_PROFILE") or ""
    parts = [override]
    paths = [Path(override)] if override not in ("", "builtin") else [profile_path("cpu")] + (
        [profile_path("cuda")] if torch.cuda.is_available() else [])
    for path in paths:
        parts.append(path.read_text() if path.exists() else f"{path}: none")
    return "\n".join(parts)


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m bitfx calibrate", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help="fewer sizes and repetitions (a few seconds)")
    p.add_argument("--out", type=Path, default=None, help="where to write the profile (default: bitfx's cache)")
    args = p.parse_args(argv)
    profile = measure(args.device, args.quick)
    path = save(profile, args.out)
    m = profile["machine"]
    print(f"bitfx calibrate: {profile['device_name']} (torch {profile['torch']})\n"
          f"  matmul {dict(m['flops_by_dtype'])['float32'] / 1e9:.0f} GFLOP/s fp32, "
          f"{dict(m['flops_by_dtype'])['bfloat16'] / 1e9:.0f} bf16; bandwidth {m['bandwidth'] / 1e9:.1f} GB/s\n"
          f"  bitmap codec {1e6 * m['bitmap_call']:.0f} us per call, encode {m['encode'] / 1e9:.1f} GB/s, "
          f"decode {m['decode'] / 1e9:.1f} GB/s\n"
          f"  exponent codec {1e6 * m['exp_call']:.0f} us per call, encode {m['exp_encode'] / 1e9:.1f} GB/s, "
          f"decode {m['exp_decode'] / 1e9:.1f} GB/s\n"
          f"wrote {path}")
    return 0
