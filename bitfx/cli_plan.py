"""``python -m bitfx plan MODULE:CALLABLE --input-shape 8,3,224,224 ...``"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

import torch

DESCRIPTION = """Predict saved-activation and peak training memory of a model, with and
without bitfx, before training it.

MODULE:CALLABLE is imported and called with no arguments to build the model,
e.g. torchvision.models:resnet18 or mypackage.models:make_net.  The model is
traced with fake tensors and partitioned exactly as backend="bittrain" would;
nothing is computed unless --calibrate is given, which runs one real forward
on random inputs to measure the density of every compressed tensor.

Exit codes: 0 success, 2 bad arguments or a model that does not trace."""


class _Fail(Exception):
    pass


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bitfx plan", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("spec", metavar="MODULE:CALLABLE", help="factory that returns the nn.Module")
    p.add_argument("--input-shape", required=True, help="comma-separated input shape, e.g. 8,3,224,224")
    p.add_argument("--dtype", default="float32", help="input dtype (default float32); integer dtypes give token ids in [0, 100)")
    p.add_argument("--calibrate", action="store_true", help="measure densities with one real forward")
    p.add_argument("--optimizer", default="none", choices=["none", "sgd", "momentum", "adam"],
                   help="optimizer state to count (default none)")
    p.add_argument("--inner", default="inductor", choices=["inductor", "eager"],
                   help="the backend's inner compiler whose partition to plan (default inductor)")
    p.add_argument("--density", type=float, default=None, help="assumed density of every sparse tensor (default by kind)")
    p.add_argument("--json", action="store_true", help="print only JSON on stdout")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
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
    model = obj()
    if not isinstance(model, torch.nn.Module):
        raise _Fail(f"{spec}() returned {type(model).__name__}, not an nn.Module")
    return model


def _inputs(shape: str, dtype: str):
    try:
        dims = [int(s) for s in shape.split(",")]
        if not dims or any(d <= 0 for d in dims):
            raise ValueError
    except ValueError:
        raise _Fail(f"bad --input-shape {shape!r}: expected positive integers separated by commas") from None
    dt = getattr(torch, dtype, None)
    if not isinstance(dt, torch.dtype):
        raise _Fail(f"bad --dtype {dtype!r}")
    if dt.is_floating_point:
        return torch.randn(dims, dtype=dt)
    return torch.randint(0, 100, dims, dtype=dt)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from .planner import plan

    try:
        model = _load(args.spec)
        x = _inputs(args.input_shape, args.dtype)
        try:
            result = plan(model, x, calibrate=args.calibrate, optimizer=args.optimizer, inner=args.inner,
                          density=args.density)
        except _Fail:
            raise
        except Exception as e:
            raise _Fail(f"{args.spec} does not trace: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
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
