"""Command line: ``python -m bitfx {demo,plan} ...``."""

from __future__ import annotations

import sys

USAGE = """usage: python -m bitfx {demo,plan} [options]

  demo   train a small CNN with and without bitfx; print saved-activation
         memory and check that gradients are bit-identical
  plan   predict saved-activation and peak training memory of a model
         before running it (python -m bitfx plan --help)
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
    print(f"python -m bitfx: unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
