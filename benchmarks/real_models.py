"""bitfx on real model code: ``transformers`` and ``timm`` models built from configs at random init.

    pip install -e ".[bench]"
    python benchmarks/real_models.py [--models opt,t5,...] [--no-cold | --step-only] [--json out.json]

For each model, one training step:

* exact: identical parameter gradients / all, for ``bittrain`` against
  ``enabled=False`` (the stock pipeline) under ``inner="eager"``; against
  the same plan stored dense (``compress=False``) under ``inner="inductor"``;
  and against stock under ``inner="inductor"``, next to how many of stock's
  own gradients reproduce in a second stock run (Inductor's CPU scatter-adds,
  e.g. embedding backward, are not deterministic);
* saved: saved-activation bytes against plain ``inductor``
  (``saved_tensors_hooks``; parameters and their copies excluded);
* step: step time against ``inductor`` (median of interleaved rounds);
* cold compile: compile plus first step in a fresh process with empty
  caches, ``bittrain`` and ``inductor``.

Small configurations (2 layers, width 64) keep a CPU run in minutes.  Not
needed by the tests; ``transformers`` and ``timm`` come with the ``bench``
extra.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parent))
import results_io  # noqa: E402

HERE = Path(__file__).resolve().parent


def _lm_inputs(vocab=1000, batch=2, seq=32):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


def opt():
    from transformers import OPTConfig, OPTForCausalLM

    cfg = OPTConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, ffn_dim=256, num_attention_heads=4,
                    max_position_embeddings=128, word_embed_proj_dim=64, activation_function="relu",
                    dropout=0.0, attention_dropout=0.0)
    return OPTForCausalLM(cfg), _lm_inputs()


def opt_model():
    """The OPT model alone, for ``python -m bitfx plan real_models:opt_model --input input_ids:2x32:int64:0-1000 ...``."""
    return opt()[0]


def t5():
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(vocab_size=1000, d_model=64, d_kv=16, d_ff=256, num_layers=2, num_heads=4,
                   feed_forward_proj="relu", dropout_rate=0.0, decoder_start_token_id=0)
    return T5ForConditionalGeneration(cfg), _lm_inputs()


def bert():
    from transformers import BertConfig, BertForMaskedLM

    cfg = BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=256, hidden_act="relu", hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, max_position_embeddings=128)
    return BertForMaskedLM(cfg), _lm_inputs()


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=1000, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg), _lm_inputs()


def _timm(name):
    def build():
        import timm

        model = timm.create_model(name, pretrained=False, num_classes=10, drop_rate=0.0)
        x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
        return model, {"x": x}

    return build


MODELS = {
    "opt": opt,
    "t5": t5,
    "bert": bert,
    "gpt2": gpt2,
    "resnet26d": _timm("resnet26d"),
    "regnetx_002": _timm("regnetx_002"),
    "mobilenetv3_small_100": _timm("mobilenetv3_small_100"),
    "vgg11": _timm("vgg11"),
    "convnext_atto": _timm("convnext_atto"),
}


def _loss(out):
    if hasattr(out, "loss") and out.loss is not None:
        return out.loss
    return out.float().square().mean()


def _call(model, inputs):
    return model(inputs["x"]) if set(inputs) == {"x"} else model(**inputs)


def _compiled(model, backend, **options):
    if backend == "inductor":
        return torch.compile(model)
    return torch.compile(model, backend="bittrain", options=options)


def grads(name, backend, **options):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model, inputs = MODELS[name]()
    model.train()
    compiled = _compiled(model, backend, **options)
    _loss(_call(compiled, inputs)).backward()
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


def _same(a, b) -> int:
    return sum(torch.equal(x, y) for x, y in zip(a, b))


def exact(name) -> dict:
    from torch._dynamo.utils import counters

    row = {}
    counters.clear()
    on = grads(name, "bittrain", inner="eager")
    note = "" if (counters["bitfx"]["bitmap"] + counters["bitfx"]["bitmap+exponent"]) else " (nothing compressed)"
    row["eager = stock"] = f"{_same(on, grads(name, 'bittrain', inner='eager', enabled=False))}/{len(on)}{note}"
    counters.clear()
    on = grads(name, "bittrain", inner="inductor")
    note = "" if (counters["bitfx"]["bitmap"] + counters["bitfx"]["bitmap+exponent"]) else " (nothing compressed)"
    row["inductor = dense"] = f"{_same(on, grads(name, 'bittrain', inner='inductor', compress=False))}/{len(on)}{note}"
    off = grads(name, "bittrain", inner="inductor", enabled=False)
    again = grads(name, "bittrain", inner="inductor", enabled=False)
    row["inductor = stock (stock = stock)"] = f"{_same(on, off)}/{len(on)} ({_same(off, again)}/{len(on)})"
    return row


def saved_and_step(name, steps=5):
    from bitfx.measure import model_saved_bytes

    torch.manual_seed(0)
    model, inputs = MODELS[name]()
    runs = {}
    for backend in ("inductor", "bittrain"):
        torch._dynamo.reset()
        m, _ = MODELS[name]()
        m.load_state_dict(model.state_dict())  # the same weights for both
        runs[backend] = (m, _compiled(m, backend))
    saved = {}
    for backend, (m, c) in runs.items():
        saved[backend] = model_saved_bytes(_Wrap(c, inputs), torch.zeros(()))
        _loss(_call(c, inputs)).backward()  # warm-up: backward compiles here
        m.zero_grad(set_to_none=True)
    times = {b: [] for b in runs}
    for _ in range(steps):  # interleaved rounds: drift hits both alike
        for backend, (m, c) in runs.items():
            start = time.perf_counter()
            _loss(_call(c, inputs)).backward()
            times[backend].append(time.perf_counter() - start)
            m.zero_grad(set_to_none=True)
    med = {b: statistics.median(t) for b, t in times.items()}
    return saved["bittrain"] / saved["inductor"], med["bittrain"] / med["inductor"]


class _Wrap(torch.nn.Module):
    """model_saved_bytes calls model(x); our inputs are keyword dicts."""

    def __init__(self, compiled, inputs):
        super().__init__()
        self.compiled, self.inputs = compiled, inputs

    def forward(self, _x):
        return _loss(_call(self.compiled, self.inputs)).reshape(())


COLD = """
import json, sys, time, torch
sys.path.insert(0, {here!r})
import real_models, bitfx
torch.manual_seed(0)
model, inputs = real_models.MODELS[{name!r}]()
start = time.perf_counter()
c = real_models._compiled(model, {backend!r})
real_models._loss(real_models._call(c, inputs)).backward()
print(json.dumps(time.perf_counter() - start))
"""


def cold_compile(name, backend) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": f"{tmp}/inductor", "BITFX_CACHE": f"{tmp}/bitfx"}
        code = COLD.format(here=str(HERE), name=name, backend=backend)
        return results_io.json_from_process([sys.executable, "-c", code], env)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--no-cold", action="store_true", help="skip the cold-compile processes")
    p.add_argument("--step-only", action="store_true", help="saved and step ratios only (no exactness, no cold compiles)")
    p.add_argument("--json", type=Path, default=None, help="results file (default benchmarks/results/real_models.jsonl)")
    args = p.parse_args(argv)
    names = args.models.split(",")
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        p.error(f"unknown model(s) {unknown}; choose from {list(MODELS)}")
    torch._inductor.config.fx_graph_cache = False  # every compile here runs the passes
    rows = []
    for name in names:
        row = {"model": name, **({} if args.step_only else exact(name))}
        saved, step = saved_and_step(name)
        row.update({"saved x inductor": round(saved, 3), "step x inductor": round(step, 2)})
        if not (args.no_cold or args.step_only):
            row["cold compile s (inductor)"] = round(cold_compile(name, "inductor"), 1)
            row["cold compile s (bittrain)"] = round(cold_compile(name, "bittrain"), 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(tabulate([list(r.values()) for r in rows], headers=list(rows[0]), disable_numparse=True))
    print(f"rows appended to {results_io.append_rows('real_models', rows, args.json)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
