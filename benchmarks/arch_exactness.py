"""The exactness matrix's models (bitfx.models.ARCHS) under Inductor: bitfx against stock, in numbers.

    python benchmarks/arch_exactness.py [mobilenet_v3,resnext,...]

Per family and dtype (fp32, bf16 autocast), one training step of each:
the default plan, the same plan stored dense (``compress=False``),
``memory_budget=1.0``, stock (``enabled=False``) and eager PyTorch in fp32
(the true gradients, for the bf16 runs too).  Prints how many parameter
gradients are bit-identical, and the largest difference of any parameter's
gradient relative to its largest magnitude: bitfx against stock, and each of
them against the true gradients.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from torch._dynamo.utils import counters  # noqa: E402

from bitfx.models import ARCHS, max_rel_diff, run, run_eager  # noqa: E402


def main() -> None:
    torch._inductor.config.fx_graph_cache = False
    print(f"torch {torch.__version__}")
    for arch in (sys.argv[1].split(",") if len(sys.argv) > 1 else ARCHS):
        make, example = ARCHS[arch]
        for autocast in (False, True):
            x = example()
            counters.clear()
            on = run(make, x, autocast)
            compressed = (counters["bitfx"]["bitmap"] + counters["bitfx"]["bitmap+exponent"])
            dense = run(make, x, autocast, compress=False)
            off = run(make, x, autocast, enabled=False)
            on1 = run(make, x, autocast, memory_budget=1.0)
            truth = run_eager(make, x, False)

            def same(a, b):
                return f"{sum(torch.equal(p, q) for (_, p), (_, q) in zip(a[1], b[1]))}/{len(a[1])}"

            print(f"{arch} {'bf16' if autocast else 'fp32'}: compressed {compressed}; default vs dense "
                  f"{same(on, dense)}, vs stock {same(on, off)}; budget 1.0 vs stock {same(on1, off)}; "
                  f"diff default-stock {max_rel_diff(on, off):.1e}, stock-true {max_rel_diff(off, truth):.1e}, "
                  f"default-true {max_rel_diff(on, truth):.1e}",
                  flush=True)


if __name__ == "__main__":
    main()
