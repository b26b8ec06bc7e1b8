"""Wall time of the planner's slow commands, as a new user runs them: ``plan --fit`` and ``plan --sweep``.

    python benchmarks/cli_times.py [--which fit,sweep] [--model torchvision.models:resnet18]
                                   [--input-shape 8,3,224,224]

Each command runs in a fresh process (Dynamo's and bitfx's in-process caches
empty; Inductor's on-disk caches as they are), one at a time, and its wall
time and last lines go in a row of ``benchmarks/results/cli_times.jsonl``.
Needs torchvision for the default model (``pip install -e ".[vision]"``).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import results_io  # noqa: E402

COMMANDS = {
    "fit": ["--optimizer", "adam", "--fit", "4GiB"],
    "sweep": ["--sweep"],
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--which", default="fit,sweep")
    p.add_argument("--model", default="torchvision.models:resnet18")
    p.add_argument("--input-shape", default="8,3,224,224")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    for name in args.which.split(","):
        cmd = [sys.executable, "-m", "bitfx", "plan", args.model, "--input-shape", args.input_shape, *COMMANDS[name]]
        start = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        tail = out.stdout.strip().splitlines()[-4:]
        row = {"which": name, "model": args.model, "input_shape": args.input_shape, "seconds": round(seconds, 1),
               "returncode": out.returncode, "output_tail": tail, "timed_command": " ".join(cmd[1:])}
        path = results_io.append_rows("cli_times", [row], args.out)
        print(f"{name}: {seconds:.1f} s (exit {out.returncode})", *tail, sep="\n  ", flush=True)
    print(f"rows appended to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
