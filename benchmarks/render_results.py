"""Render ``docs/results.md`` from the rows in ``benchmarks/results/*.jsonl``.

    python benchmarks/render_results.py [--results DIR] [--out FILE] [--check]

Each benchmark's section shows its latest figures, each row with the machine,
torch version and commit it was measured at (columns of the rows, see
``results_io.py``).  Rows that do not record a commit and a machine are left
out, as are columns with no figure and sections with no table.  ``--check`` exits 1 when ``--out`` is not what the rows
render to (the test suite runs it).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import results_io  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROVENANCE = {"benchmark", "commit", "dirty", "machine", "torch", "triton", "python", "command", "date",
              "source_file"}


def _num(v, digits=3):
    if isinstance(v, bool) or v is None:
        return "" if v is None else str(v)
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _mib(v):
    return "" if v is None else f"{v / 2**20:.2f}"


def _where(r: dict) -> str:
    m = r.get("machine") or {}
    cpu = m.get("gpu") or m.get("cpu") or "not recorded"
    cores = f", {m['cores']} cores" if m.get("cores") else ""
    isa = f", {'/'.join(m['isa'])}" if m.get("isa") else ""
    return f"{cpu}{cores}{isa}"


def _stamp(r: dict) -> str:
    commit = r.get("commit") or "?"
    if r.get("dirty"):
        commit += " (uncommitted changes)"
    if r.get("measured_commit"):  # re-predicted: the measurement is an earlier commit's
        commit = f"{commit}, measured at {r['measured_commit']}"
    return f"{_where(r)}; torch {r.get('torch') or '?'}; commit {commit}"


EMPTY = ("", "not measured", None)


def _table(headers: list[str], rows: list[list]) -> list[str]:
    """A Markdown table without the columns no row has a figure in; no table at all without rows."""
    if not rows:
        return []
    keep = [i for i in range(len(headers)) if any(row[i] not in EMPTY for row in rows)]
    out = ["| " + " | ".join(headers[i] for i in keep) + " |", "|" + "---|" * len(keep)]
    out += ["| " + " | ".join(str(row[i]) for i in keep) + " |" for row in rows]
    return out


def recorded(rows: list[dict]) -> list[dict]:
    """The rows that say where they were measured: a commit and a machine (older rows may lack both)."""
    return [r for r in rows if r.get("commit") and (r.get("machine") or {}).get("cpu")]


def _is_frontier(config: str) -> bool:
    name, _, budget = config.partition("@")
    return bool(budget) and not (name == "inductor" and budget == "0.9")


def _module_kind(name: str) -> str:
    """A saved tensor's module path with its block index written ``*`` (``blocks.*.mlp``)."""
    return re.sub(r"\.\d+(?=\.|$)", ".*", name)


def train_lm(rows: list[dict]) -> list[str]:
    # The latest run of each model, and of each model the latest that measured bf16 autocast
    # where that is an older run (a machine without native bf16 measures fp32 only).
    latest: dict[tuple, list[dict]] = {}
    for run in results_io.runs(rows):
        act = run[-1].get("act")
        latest[(act, "")] = run
        if any(r.get("autocast") for r in run):
            latest[(act, "bf16")] = run
    out, shown = [], []
    for (act, _), run in sorted(latest.items(), key=lambda kv: (kv[0][0] != "sqrelu", kv[0])):
        if not any(run is r for r in shown):
            shown.append(run)
            out += _train_lm_run(run, plot=run is latest[(act, "")] and act != "opt")
    return out


def _train_lm_run(run: list[dict], plot: bool) -> list[str]:
    last = run[-1]
    model = "OPT (transformers, ReLU FFN)" if last.get("act") == "opt" else f"{last.get('act')} GPT"
    out = [f"### {model}, d={last.get('dim')}, {last.get('layers')} layers, seq {last.get('seq')}, "
           f"batch {last.get('batch')}", "",
           f"Command: `{last.get('command')}`; {_stamp(last)}.",
           f"Corpus: the Python standard library's sources ({last.get('corpus_bytes')} bytes, "
           f"SHA-256 {last.get('corpus_sha256')}).", ""]
    final = [r for r in run if r.get("config") == "run" and r.get("trained_steps")]
    if final:
        f = final[-1]
        out += [f"Losses bit-identical to `compress=False`: {f['identical_steps']} of {f['trained_steps']} steps; "
                f"final loss {f['loss']:.4f}.", ""]
    body = []
    for r in run:
        if "saved_activation_bytes" not in r or _is_frontier(r["config"]):
            continue
        dens = ", ".join(f"{x['density']:.2f}" for x in r.get("ffn") or [])
        body.append([r["step"], r.get("autocast") or "fp32", r["config"], _mib(r["saved_activation_bytes"]),
                     _num(r["saved_x_inductor"]), _num(r["saved_x_inductor@0.9"]), _mib(r["peak_bytes"]),
                     "ok" if r.get("peak_check") == "ok" else "no", _num(r["step_x_inductor"]), dens])
    out += _table(["step", "dtype", "config", "saved MiB", "x stock", "x stock@0.9", "step peak MiB", "peak check",
                   "step x stock", "FFN densities"], body)
    if plot:  # train_lm.py --plot draws the GPT's latest run
        out += ["", "![FFN density and saved bytes against step](../benchmarks/results/train_lm.png)"]
    out += _train_lm_frontier(run) + _train_lm_breakdown(run)
    return out + [""]


def _train_lm_frontier(run: list[dict]) -> list[str]:
    """bitfx@b against stock@b at the run's last checkpoint (``--frontier``)."""
    step = max((r["step"] for r in run if _is_frontier(r.get("config", ""))), default=None)
    if step is None:
        return []
    at = [r for r in run if r.get("step") == step and "saved_activation_bytes" in r]
    body = []
    for dtype in ("", "bf16"):
        got = {r["config"]: r for r in at if (r.get("autocast") or "") == dtype}
        budgets = sorted({c.partition("@")[2] for c in got if c.startswith("bittrain@")}, key=float, reverse=True)
        for b in ["default", *budgets]:
            stock, ours = (got.get("inductor"), got.get("bittrain")) if b == "default" else \
                (got.get(f"inductor@{b}"), got.get(f"bittrain@{b}"))
            if not (stock and ours):
                continue
            saved = ours["saved_activation_bytes"] / stock["saved_activation_bytes"]
            time = ours["step_x_inductor"] if b == "default" else ours["step_x_stock_same_budget"]
            target = ""
            if b in ("0.9", "0.7", "0.5"):
                target = "yes" if saved <= 0.85 and time <= 1.03 else "no"
            body.append([dtype or "fp32", b, _mib(stock["saved_activation_bytes"]), _mib(ours["saved_activation_bytes"]),
                         _num(saved), _mib(stock["peak_bytes"]), _mib(ours["peak_bytes"]), _num(time),
                         _num(ours["saved_x_inductor"]), _num(ours["step_x_inductor"]), target])
    tag = "opt" if run[-1].get("act") == "opt" else "gpt"
    return ["", f"Frontier at step {step}: bitfx at each memory budget against stock at the same budget, "
            "interleaved in one process (*target*: issue 39's bitfx@b <= 0.85x stock@b's saved bytes at "
            "<= 1.03x its step time, for b in 0.9, 0.7, 0.5).", "",
            *_table(["dtype", "budget", "stock saved MiB", "bitfx saved MiB", "saved x stock@b", "stock peak MiB",
                     "bitfx peak MiB", "step x stock@b", "saved x stock", "step x stock", "target"], body),
            "", f"![saved bytes against step time](../benchmarks/results/train_lm_frontier_{tag}.png)"]


def _train_lm_breakdown(run: list[dict]) -> list[str]:
    """The default plan's saved tensors at the last checkpoint, by module (block index as ``*``), op and codec."""
    out = []
    for r in run:
        if r.get("config") != "breakdown":
            continue
        groups: dict[tuple, list] = {}
        for t in r["tensors"]:
            key = (_module_kind(t["name"]), t["op"], t["dtype"], t["codec"])
            g = groups.setdefault(key, [0, 0, 0, "x".join(map(str, t["shape"]))])
            g[0] += 1
            g[1] += t["dense_bytes"]
            g[2] += t["stored_bytes"]
        total = sum(g[2] for g in groups.values()) or 1
        body = [[*k[:2], shape, k[2], k[3], n, _mib(dense), _mib(stored), f"{100 * stored / total:.1f}%"]
                for k, (n, dense, stored, shape) in sorted(groups.items(), key=lambda kv: -kv[1][2])]
        out += ["", f"What the default plan keeps at step {r['step']}, {r.get('autocast') or 'fp32'} "
                "(`bitfx.plan(calibrate=True)` at those weights; stored bytes at the densities it measured):", "",
                *_table(["module", "op", "shape", "dtype", "stored as", "tensors", "dense MiB", "stored MiB",
                         "share of stored"], body)]
    return out


def pruning(rows: list[dict]) -> list[str]:
    run = results_io.runs(rows)[-1]
    out = [f"Command: `{run[-1].get('command')}`; {_stamp(run[-1])}.",
           "BitTrain's figures: " + ", ".join(f"{100 * p['footprint_reduction']:.0f}% less footprint at "
                                              f"{100 * p['sparsity']:.0f}% sparsity" for p in run[-1]["paper"]) + ".",
           ""]
    body = [[r["step"], _num(r["weights_pruned"], 2), _num(r["relu_density"]), _num(r["test_accuracy"]), r["config"],
             _mib(r["parameter_bytes"] + r["optimizer_bytes"]), _mib(r["peak_bytes"]),
             _mib(r["saved_activation_bytes"]), _mib(r["footprint_bytes"]), _num(r["footprint_x_stock"]),
             _num(r["saved_x_stock"]), r.get("bitmap_tensors", "")] for r in run]
    return out + _table(["step", "weights pruned", "ReLU density", "test accuracy", "config",
                         "params+optimizer MiB", "step peak MiB", "saved MiB", "footprint MiB",
                         "footprint x stock", "saved x stock", "bitmap-coded tensors"], body)


def run_frontier(rows: list[dict]) -> list[str]:
    """The latest row of each (model, config, autocast), with its ratio to the inductor row of the same run."""
    latest: dict = {}
    for run in results_io.runs(rows):
        ref = {(r.get("model"), r.get("autocast")): r for r in run if r.get("config") == "inductor"}
        for r in run:
            base = ref.get((r.get("model"), r.get("autocast")))
            if base is None:
                continue
            saved_x = r["saved_activation_bytes"] / base["saved_activation_bytes"] if base["saved_activation_bytes"] else None
            # Rows without a passed peak check predate bitfx.measure.step_peak
            # and may miss the gradients' bytes: their peaks are not shown.
            peak_x = (r["peak_bytes"] / base["peak_bytes"]
                      if r.get("peak_check") == "ok" and base.get("peak_check") == "ok" else None)
            latest[(r.get("model"), r.get("config"), r.get("autocast") or "")] = (r, saved_x, peak_x)
    body = [[m, a or "fp32", c, _num(x), _num(p) if p is not None else "not measured", _num(r.get("step_x_inductor")),
             _stamp(r)]
            for (m, c, a), (r, x, p) in sorted(latest.items(), key=lambda kv: (kv[0][0], kv[0][2], _config_key(kv[0][1])))]
    return (["Per model and configuration, the latest measurement, as a ratio to `inductor` in the same run "
             "(step times paired by round; step peaks from `bitfx.measure.step_peak`).", ""]
            + _table(["model", "dtype", "config", "saved x inductor", "step peak x inductor", "step x inductor",
                      "measured on"], body))


def _config_key(config: str):
    name, _, budget = config.partition("@")
    return (budget == "", -float(budget) if budget else 0.0, name)


def generic(rows: list[dict]) -> list[str]:
    run = results_io.runs(rows)[-1]
    cols = [k for k in run[0] if k not in PROVENANCE and not isinstance(run[0][k], (dict, list))]
    body = [[_num(r.get(c)) for c in cols] for r in run]
    return [f"Command: `{run[-1].get('command')}`; {_stamp(run[-1])}.", ""] + _table(cols, body)


def plan_accuracy(rows: list[dict]) -> list[str]:
    """The latest row of each (model, dtype, config): predicted against measured step peak and saved bytes."""
    latest = {(r["model"], r.get("autocast") or "fp32", r["config"]): r for r in rows}
    body = [[m, a, c, _mib(r["peak_bytes"]), r["peak_check"], _mib(r["peak_predicted"]),
             f"{100 * r['peak_error']:+.1f}%", f"{r['peak_phase']}: {r['peak_node']}", _mib(r["saved_bytes"]),
             _mib(r["saved_predicted"]), _stamp(r)]
            for (m, a, c), r in sorted(latest.items(), key=lambda kv: (kv[0][0], kv[0][1], _config_key(kv[0][2])))]
    return (["The planner's step peak (fake tensors, nothing run) against one measured step "
             "(`bitfx.measure.step_peak`, each configuration in a fresh process).", ""]
            + _table(["model", "dtype", "config", "step peak MiB", "check", "predicted MiB", "error", "predicted at",
                      "saved MiB", "predicted MiB", "measured on"], body))


# The codecs' speed targets, as ratios to copy_ into memory allocated before
# (issue 43): at 16M elements, 2 threads; at 1M, each at most 3x.
KERNEL_TARGETS = {("bitmap", "compress"): 2.0, ("bitmap", "decompress"): 2.0,
                  ("exponent", "compress"): 3.0, ("exponent", "decompress"): 2.5}


def kernels(rows: list[dict]) -> list[str]:
    """The latest CPU row of each (codec, dtype, size, density, threads), as ratios to copy_.

    ``op``: the op a compiled step calls, allocating its output; ``kernel``:
    the same kernels writing into memory allocated before, as copy_ does.
    """
    latest = {}
    for r in rows:
        if r.get("kernels") != "cpu_ext" or r.get("isa"):  # the C kernels at the ISA they load with
            continue
        latest[(r.get("codec", "bitmap"), r["dtype"], r["numel"], r["density"], r.get("threads"))] = r
    body = []
    for (codec, dtype, numel, density, threads), r in sorted(latest.items(), key=lambda kv: (
            kv[0][0], kv[0][1], kv[0][2], kv[0][3], kv[0][4] or 0)):
        cells = []
        for op in ("compress", "decompress"):
            target = None if threads != 2 else \
                KERNEL_TARGETS.get((codec, op)) if numel >= 2**24 else 3.0 if numel >= 2**20 else None
            ratio, into = r.get(f"{op}_vs_copy"), r.get(f"{op}_into_vs_copy")
            best = into if into is not None else ratio  # the kernel's own time where measured
            cells += [_num(ratio, 2), _num(into, 2),
                      "" if target is None or best is None else f"{'yes' if best <= target else 'no'} (<= {target:g})"]
        body.append([codec, dtype, f"{numel / 2**20:g}M", _num(density, 1), threads, _num(r["copy_GBps"], 1),
                     *cells, _stamp(r)])
    return (["Time of each codec as a ratio to `copy_` of the same tensor into memory allocated before, "
             "interleaved in one process (`benchmarks/kernel_speed.py`, CPU). *op*: the op a compiled step "
             "calls, which allocates its output (above glibc's 32 MiB mmap threshold that is fresh memory, "
             "and its page faults, each call); *kernel*: the same kernels into memory allocated before. "
             "*target*: issue 43's bound at 2 threads (16M elements: bitmap 2.0 each way, exponent 3.0 "
             "and 2.5; 1M: 3.0), checked on the kernel figure where there is one.", ""]
            + _table(["codec", "dtype", "size", "density", "threads", "copy GB/s", "compress op", "compress kernel",
                      "target", "decompress op", "decompress kernel", "target", "measured on"], body))


def calibrate_effect(rows: list[dict]) -> list[str]:
    """Each model's latest run: stock, and the free default priced with the codec speeds before and after."""
    latest: dict = {}
    for run in results_io.runs(rows):
        by_model: dict = {}
        for r in run:  # one command measures several models
            by_model.setdefault((r["model"], r.get("autocast", "")), []).append(r)
        latest.update(by_model)
    out = ["What the free default codes when its profile holds the codec speeds measured before and after "
           "a kernel change (the before profile with only its codec fields replaced), in one process, "
           "timed in interleaved rounds (`benchmarks/calibrate_effect.py`). *coded*: saved tensors by codec "
           "in the plan; *saved*: measured saved-activation bytes; *predicted*: the plan's.", ""]
    for (model, autocast), run in sorted(latest.items()):
        body = []
        for r in run:
            codecs = r.get("profile_codecs") or {}
            speeds = (f"bitmap {codecs['encode'] / 1e9:.1f}/{codecs['decode'] / 1e9:.1f}, exponent "
                      f"{codecs['exp_encode'] / 1e9:.1f}/{codecs['exp_decode'] / 1e9:.1f} GB/s") if codecs else ""
            coded = ", ".join(f"{k} {v}" for k, v in (r.get("tensors_by_codec") or {}).items())
            body.append([r["config"], speeds, coded, _mib(r["saved_activation_bytes"]), _num(r["saved_x_stock"]),
                         _mib(r["predicted_saved_bytes"]) if "predicted_saved_bytes" in r else "",
                         _num(r["step_ms"], 1), _num(r["step_x_stock"])])
        out += [f"{run[-1]['label']}{', bf16 autocast' if autocast else ', fp32'}; {_stamp(run[-1])}.", ""]
        out += _table(["config", "codec speeds (encode/decode)", "coded", "saved MiB", "saved x stock",
                       "predicted MiB", "step ms", "step x stock"], body)
        out.append("")
    return out


def timeline(rows: list[dict]) -> list[str]:
    """Each model's latest timeline rows, and its plot."""
    latest: dict = {}
    for run in results_io.runs(rows):
        latest[run[-1]["model"]] = run
    out = ["Live bytes over one step, stock against bitfx: the planner's model and a measured step "
           "(`benchmarks/timeline.py`).", ""]
    for model, run in sorted(latest.items()):
        body = [[r["config"], _mib(r["peak_bytes"]), r["peak_check"], _mib(r["peak_predicted"]),
                 f"{100 * (r['peak_predicted'] / r['peak_bytes'] - 1):+.1f}%", r["peak_at"]] for r in run]
        out += [f"{model}, batch {run[-1]['batch']}, size {run[-1]['size']}, fp32; {_stamp(run[-1])}.", ""]
        out += _table(["config", "step peak MiB", "check", "predicted MiB", "error", "predicted at"], body)
        out += ["", f"![{model} memory timeline](../benchmarks/results/timeline_{model}.png)", ""]
    return out


SECTIONS = {
    "train_lm": ("Transformers trained under bitfx (`benchmarks/train_lm.py`)", train_lm),
    "pruning": ("BitTrain's pruning claim (`benchmarks/pruning.py`)", pruning),
    "run": ("Held-out models: defaults and budgets (`benchmarks/run.py`)", run_frontier),
    "timeline": ("Memory timelines (`benchmarks/timeline.py`)", timeline),
    "plan_accuracy": ("The planner's step peak against measurements (`benchmarks/plan_accuracy.py`)", plan_accuracy),
    "kernels": ("CPU codecs against a copy (`benchmarks/kernel_speed.py`)", kernels),
    "calibrate_effect": ("Plans before and after faster codecs (`benchmarks/calibrate_effect.py`)", calibrate_effect),
}


def render(results: Path) -> str:
    lines = ["# bitfx results", "",
             "Generated by `python benchmarks/render_results.py` from `benchmarks/results/*.jsonl`; do not edit.",
             "Every figure was measured on the machine its row names. GPU: not measured (no GPU has run bitfx).", ""]
    files = sorted(results.glob("*.jsonl"), key=lambda p: (list(SECTIONS).index(p.stem) if p.stem in SECTIONS
                                                           else len(SECTIONS), p.stem))
    for path in files:
        rows = recorded(results_io.read_rows(path))
        if not rows:
            continue
        title, fn = SECTIONS.get(path.stem, (f"`{path.stem}`", generic))
        body = fn(rows)
        if not any(line.startswith("|") for line in body):
            continue  # nothing measured to show: no section rather than an empty table
        lines += [f"## {title}", "", *body, ""]
    return "\n".join(lines).rstrip() + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", type=Path, default=results_io.RESULTS)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "results.md")
    p.add_argument("--check", action="store_true", help="exit 1 if --out is not what the rows render to")
    args = p.parse_args(argv)
    text = render(args.results)
    if args.check:
        ok = args.out.exists() and args.out.read_text() == text
        if not ok:
            print(f"{args.out} is stale: run python benchmarks/render_results.py", file=sys.stderr)
        return 0 if ok else 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
