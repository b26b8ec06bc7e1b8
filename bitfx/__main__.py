"""Command line: ``python -m bitfx {demo,plan,calibrate,build-kernels} ...``."""

from __future__ import annotations

import sys

USAGE = """usage: python -m bitfx {demo,plan,calibrate,build-kernels} [options]

  demo           train a small CNN and a ReLU FFN with and without bitfx;
                 print saved-activation memory and check that gradients
                 are bit-identical
  plan           predict saved-activation and peak training memory of a
                 model before running it (python -m bitfx plan --help)
  calibrate      measure this device's FLOP rate, bandwidth and codec costs
                 into the profile the cost model prices plans with
                 (python -m bitfx calibrate --help)
  build-kernels  build the C++ CPU kernels now instead of at the first CPU
                 op (into $BITFX_CACHE, else ~/.cache/bitfx)
"""


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "demo":
        from .demo import main as demo

        return demo(rest)
    if cmd == "plan":
        from .cli_plan import main as plan

        return plan(rest)
    if cmd == "calibrate":
        from .calibrate import main as calibrate

        return calibrate(rest)
    if cmd == "build-kernels":
        from .kernels import cpu_ext

        error = cpu_ext.load()
        print(f"bitfx: CPU kernels unavailable: {error}" if error else f"bitfx: CPU kernels at {cpu_ext.library()}")
        return 1 if error else 0
    print(f"python -m bitfx: unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
