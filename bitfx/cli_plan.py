"""``python -m bitfx plan MODULE:CALLABLE --input-shape 8,3,224,224 ...``"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import re
import sys
from dataclasses import dataclass

import torch

DESCRIPTION = """Predict saved-activation and peak training memory of a model, with and
without bitfx, before training it.

MODULE:CALLABLE is imported and called with no arguments to build the model,
e.g. torchvision.models:resnet18 or mypackage.models:make_net.  The model is
traced with fake tensors and partitioned exactly as backend="bittrain" would.
No input is allocated and nothing is computed unless --calibrate is given,
which runs one real forward on random inputs to measure the density of every
compressed tensor.

Inputs: --input-shape 8,3,224,224 gives one positional input (dtype --dtype).
--input describes one input each, positional or by keyword, for models that
take several (transformers models take input_ids=..., labels=...):

  --input [NAME:]SHAPE[:DTYPE[:LOW-HIGH]]
  --input input_ids:2x64:int64:0-50000 --input labels:2x64:int64:0-50000

SHAPE is sizes joined by x or commas; integer inputs are drawn from
[LOW, HIGH) when calibrating (default 0-100).

--memory-budget plans the backend's memory_budget option (a fraction, a
size like 1.5GiB for saved activations, or peak:2GiB for the step peak).  --sweep plans stock PyTorch and bittrain at budgets 1.0,
0.9, 0.7, 0.5, 0.3, 0.1 (and bitfx's default): the bytes each stores for
backward, its step peak, and the cost model's estimated step time against
stock's default plan; it recommends the setting with the lowest step peak
within --max-slowdown (default 1.05), and names the one that stores the
fewest bytes within it.

The step peak is the most memory a training step allocates above what is
resident before it (parameters, buffers, optimizer state, inputs), which is
shown beside it: the plan table, the peak guard's note, --sweep and --fit
quote the same figure.  "stock" is PyTorch's default plan; its plan at
budget 0.9 is named as such.

--fit 4GiB answers the largest batch whose whole training step fits that
memory (parameters, optimizer state from --optimizer, inputs and the
predicted step peak), for bittrain and for stock PyTorch (its default and
budget 0.9). The first size of every input is its batch; --batch-step
rounds the answer (default 1). Fake tensors only: nothing is allocated.

Exit codes: 0 success, 2 bad arguments or a model that cannot be planned."""

_DTYPES = {
    name: getattr(torch, name)
    for name in ("float16", "bfloat16", "float32", "float64", "int8", "uint8", "int16", "int32", "int64")
}


class _Fail(Exception):
    pass


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bitfx plan", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("spec", metavar="MODULE:CALLABLE", help="factory that returns the nn.Module")
    p.add_argument("--input-shape", help="comma-separated shape of the one positional input, e.g. 8,3,224,224")
    p.add_argument("--input", action="append", default=[], metavar="[NAME:]SHAPE[:DTYPE[:LOW-HIGH]]",
                   help="one input (repeat for several); with NAME it is passed by keyword")
    p.add_argument("--dtype", default="float32",
                   help=f"dtype of --input-shape (default float32; one of {', '.join(_DTYPES)}); "
                        "integer dtypes give token ids in [0, 100)")
    p.add_argument("--calibrate", action="store_true", help="measure densities with one real forward")
    p.add_argument("--optimizer", default="none", choices=["none", "sgd", "momentum", "adam"],
                   help="optimizer state to count (default none)")
    p.add_argument("--inner", default="inductor", choices=["inductor", "eager"],
                   help="the backend's inner compiler whose partition to plan (default inductor)")
    p.add_argument("--density", default=None,
                   help="assumed density in [0, 1] of every sparse tensor (default by kind)")
    p.add_argument("--memory-budget", default=None, metavar="B",
                   help="the backend's memory_budget: a fraction in [0, 1], a size like 1.5GiB, or a step-peak target "
                        "like peak:2GiB (default: bitfx's free default)")
    p.add_argument("--sweep", action="store_true",
                   help="plan stock and bittrain at memory budgets 1.0 ... 0.1 and recommend a setting")
    p.add_argument("--max-slowdown", type=float, default=1.05, metavar="X",
                   help="with --sweep: the largest estimated step time, relative to stock's default plan (default 1.05)")
    p.add_argument("--fit", default=None, metavar="SIZE",
                   help="the largest batch whose training step fits SIZE (e.g. 4GiB), bittrain and stock")
    p.add_argument("--batch-step", type=int, default=1, metavar="N", help="with --fit: answer multiples of N")
    p.add_argument("--json", action="store_true", help="print only JSON on stdout")
    p.add_argument("--debug", action="store_true", help="show tracebacks and torch's own log output")
    return p


def _load(spec: str):
    if ":" not in spec:
        raise _Fail(f"model spec {spec!r} must look like MODULE:CALLABLE")
    mod_name, attr = spec.split(":", 1)
    try:
        obj = importlib.import_module(mod_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise _Fail(f"cannot load {spec}: {e}") from e
    if not callable(obj):
        raise _Fail(f"{spec} is a {type(obj).__name__}, not a callable that returns a model")
    try:
        model = obj()
    except Exception as e:  # noqa: BLE001 - the user's factory: report whatever it raised
        raise _Fail(f"{spec}() raised {type(e).__name__}: {_first_line(e)} (it is called with no arguments)") from e
    if not isinstance(model, torch.nn.Module):
        raise _Fail(f"{spec}() returned {type(model).__name__}, not an nn.Module")
    return model


@dataclass
class InputSpec:
    name: str | None
    shape: list[int]
    dtype: torch.dtype
    low: int = 0
    high: int = 100

    def make(self, real: bool) -> torch.Tensor:
        if not real:
            return torch.empty(self.shape, dtype=self.dtype)  # called under a FakeTensorMode
        if self.dtype.is_floating_point:
            return torch.randn(self.shape, dtype=self.dtype)
        return torch.randint(self.low, self.high, self.shape, dtype=self.dtype)


def _shape(text: str, flag: str) -> list[int]:
    try:
        dims = [int(s) for s in text.replace("x", ",").split(",")]
        if not dims or any(d <= 0 for d in dims):
            raise ValueError
    except ValueError:
        raise _Fail(f"bad {flag} {text!r}: expected positive integers separated by commas or x") from None
    return dims


def _dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise _Fail(f"bad --dtype {name!r}: choose one of {', '.join(_DTYPES)}")
    return _DTYPES[name]


def _parse_input(text: str) -> InputSpec:
    parts = text.split(":")
    name = None
    if parts and parts[0] and not parts[0][0].isdigit():
        name = parts.pop(0)
        if not name.isidentifier():
            raise _Fail(f"bad --input {text!r}: {name!r} is not a keyword name")
    if not parts or len(parts) > 3:
        raise _Fail(f"bad --input {text!r}: expected [NAME:]SHAPE[:DTYPE[:LOW-HIGH]]")
    spec = InputSpec(name, _shape(parts[0], "--input shape"), _dtype(parts[1]) if len(parts) > 1 else torch.float32)
    if len(parts) == 3:
        try:
            low, high = (int(v) for v in parts[2].split("-"))
            if low >= high:
                raise ValueError
        except ValueError:
            raise _Fail(f"bad --input {text!r}: range {parts[2]!r} must be LOW-HIGH with LOW < HIGH") from None
        if spec.dtype.is_floating_point:
            raise _Fail(f"bad --input {text!r}: a range is for integer inputs")
        spec.low, spec.high = low, high
    return spec


def _specs(args) -> list[InputSpec]:
    specs = []
    if args.input_shape is not None:
        specs.append(InputSpec(None, _shape(args.input_shape, "--input-shape"), _dtype(args.dtype)))
    specs += [_parse_input(t) for t in args.input]
    if not specs:
        raise _Fail("give the model's input: --input-shape or --input")
    positional = [s for s in specs if s.name is None]
    if any(s.name is None for s in specs[len(positional):]):
        raise _Fail("positional inputs must come before keyword inputs")
    return specs


def _density(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        d = float(text)
    except ValueError:
        raise _Fail(f"bad --density {text!r}: expected a number in [0, 1]") from None
    if not 0.0 <= d <= 1.0:
        raise _Fail(f"bad --density {text!r}: a density is in [0, 1]")
    return d


def _budget(text: str | None):
    if text is None:
        return None
    from .options import Options

    try:
        value = text
        if text.startswith("peak:"):
            value = {"peak": text[len("peak:"):]}
        elif text.replace(".", "", 1).isdigit():  # a bare number: a fraction up to 1, else bytes
            value = float(text) if float(text) <= 1 else int(float(text))
        return Options(memory_budget=value).memory_budget
    except ValueError as e:
        raise _Fail(f"bad --memory-budget {text!r}: {e}") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


def _describe(e: BaseException) -> str:
    """What the model raised while traced, in one line.

    Dynamo wraps it: in the cause chain, or (fake-tensor errors) only as text,
    "... got RuntimeError('Expected 3D ...')".
    """
    seen = set()
    while id(e) not in seen:
        seen.add(id(e))
        inner = getattr(e, "inner_exception", None) or e.__cause__
        if inner is None:
            break
        e = inner
    wrapped = re.search(r"got (\w+)\((['\"])(.+?)\2\)", str(e))
    if wrapped:
        return f"{wrapped.group(1)}: {wrapped.group(3)}"
    return f"{type(e).__name__}: {_first_line(e)}"


@contextlib.contextmanager
def _quiet_torch(debug: bool):
    """Keep torch's own log output (fake-tensor and Dynamo tracebacks) off the terminal."""
    if debug:
        yield
        return
    logger = logging.getLogger("torch")
    level, propagate = logger.level, logger.propagate
    logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        logger.setLevel(level)
        logger.propagate = propagate


def _fit(args, model, specs, fit_bytes, density):
    """--fit: the first size of every input is the batch."""
    from .fit import fit

    if any(s.name is None for s in specs) and any(s.name is not None for s in specs):
        raise _Fail("--fit takes positional inputs or keyword inputs, not both")

    def make_inputs(batch):
        made = [InputSpec(s.name, [batch, *s.shape[1:]], s.dtype).make(real=False) for s in specs]
        keywords = {s.name: t for s, t in zip(specs, made) if s.name is not None}
        return keywords or tuple(made)

    try:
        with progress_bar(None, "fit: batches planned") as bar:
            return fit(model, make_inputs, fit_bytes, batch_step=args.batch_step, optimizer=args.optimizer,
                       inner=args.inner, density=density, progress=bar.update)
    except Exception as e:  # noqa: BLE001 - anything the model does while traced
        raise _Fail(f"{args.spec} cannot be planned: {_describe(e)}") from e


def main(argv=None) -> int:
    args = _parser().parse_args(argv)

    try:
        specs = _specs(args)
        density = _density(args.density)
        budget = _budget(args.memory_budget)
        if args.sweep and budget is not None:
            raise _Fail("--sweep plans every budget itself; drop --memory-budget")
        fit_bytes = None
        if args.fit is not None:
            if args.sweep or budget is not None or args.calibrate:
                raise _Fail("--fit plans each pipeline itself on fake inputs; drop --sweep, --memory-budget and --calibrate")
            from .options import parse_bytes

            try:
                fit_bytes = parse_bytes(args.fit)
            except ValueError as e:
                raise _Fail(f"bad --fit {args.fit!r}: {e}") from None
            if args.batch_step < 1:
                raise _Fail(f"--batch-step must be >= 1, got {args.batch_step}")
        if args.max_slowdown < 1.0:
            raise _Fail(f"--max-slowdown must be >= 1, got {args.max_slowdown:g}")
        model = _load(args.spec)
        with _quiet_torch(args.debug):
            if fit_bytes is not None:
                result = _fit(args, model, specs, fit_bytes, density)
            else:
                result = _plan_or_sweep(args, model, specs, budget, density)
    except _Fail as e:
        if args.debug:
            raise
        print(f"python -m bitfx plan: {e}", file=sys.stderr)
        return 2
    if args.json:
        json.dump(result.to_dict(), sys.stdout, indent=1)
        print()
    else:
        print(result)
    return 0


def progress_bar(total: int | None, desc: str):
    """A progress bar on stderr, shown on a terminal only (planning a large model takes minutes)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="plan", file=sys.stderr, disable=not sys.stderr.isatty(), leave=False)


def _plan_or_sweep(args, model, specs, budget, density):
    from .planner import plan, sweep

    if args.calibrate:
        made = [s.make(real=True) for s in specs]
    else:
        from torch.fx.experimental.symbolic_shapes import ShapeEnv

        from .torch_internals import FakeTensorMode

        with FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True):
            made = [s.make(real=False) for s in specs]
    positional = [t for s, t in zip(specs, made) if s.name is None]
    keywords = {s.name: t for s, t in zip(specs, made) if s.name is not None}
    common = dict(inputs_kwargs=keywords, calibrate=args.calibrate, optimizer=args.optimizer,
                  inner=args.inner, density=density)
    try:
        if args.sweep:
            from .planner import sweep_size

            with progress_bar(sweep_size(), "sweep: plans") as bar:
                return sweep(model, *positional, max_slowdown=args.max_slowdown, progress=bar.update, **common)
        return plan(model, *positional, memory_budget=budget, **common)
    except Exception as e:  # noqa: BLE001 - anything the model does while traced
        raise _Fail(f"{args.spec} cannot be planned: {_describe(e)}") from e
