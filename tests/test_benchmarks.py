"""Smoke tests of the benchmark scripts (tiny models, seconds)."""

import json
from pathlib import Path

import pytest
import torch.nn as nn

from helpers import benchmark

results_io = benchmark("results_io")
run = benchmark("run")


def tiny():
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def test_paired_ratio_pairs_steps_of_one_round():
    # A drift that doubles both configurations' times in round 2 cancels.
    assert run.paired_ratio([1.1, 2.2, 1.1], [1.0, 2.0, 1.0]) == pytest.approx(1.1)
    assert run.paired_ratio([1.0, 3.0], [2.0, 2.0]) == pytest.approx(1.0)


def test_run_model_rows_and_table():
    w = run.Workload("tiny", tiny, (16, 32))
    rows = run.run_model(w, ["eager", "inductor", "bittrain-eager", "bittrain@0.5"], run.torch.device("cpu"), 2, lambda m: None)
    assert [r["config"] for r in rows] == ["eager", "inductor", "bittrain-eager", "bittrain@0.5"]
    for r in rows:
        assert {"model", "config", "saved_activation_bytes", "peak_bytes", "step_ms", "compile_s"} <= set(r)
        assert r["step_ms"] > 0 and r["peak_bytes"] > 0
    saved = {r["config"]: r["saved_activation_bytes"] for r in rows}
    assert saved["bittrain-eager"] < saved["inductor"]
    for r in rows:  # every step kept, and the ratio paired by round
        assert len(r["step_times_ms"]) == 2
    ind = rows[1]["step_times_ms"]
    for r in rows:
        want = sorted(a / b for a, b in zip(r["step_times_ms"], ind))
        assert r["step_x_inductor"] == pytest.approx((want[0] + want[1]) / 2)
    assert rows[1]["step_x_inductor"] == 1.0
    text = run.table(rows)
    assert "x inductor" in text and "bittrain-eager" in text
    json.dumps(rows)


def test_run_model_times_rounds_for_min_seconds(monkeypatch):
    """``min_seconds`` adds whole rounds past ``steps``: every configuration gets as many.

    On a clock that advances 10 ms per reading: with the real one, a loaded
    host could take the whole ``min_seconds`` in the first round.
    """
    import types

    clock = iter(range(10**9))
    monkeypatch.setattr(run, "time", types.SimpleNamespace(perf_counter=lambda: next(clock) * 0.01))
    w = run.Workload("tiny", tiny, (16, 32))
    rows = run.run_model(w, ["eager", "inductor"], run.torch.device("cpu"), 1, lambda m: None, min_seconds=0.5)
    counts = {len(r["step_times_ms"]) for r in rows}
    assert len(counts) == 1
    rounds = counts.pop()
    # Each round reads the clock five times (two steps, two readings each, and
    # the loop's test): 0.5 s takes ten rounds.
    assert 5 <= rounds <= 15, rounds


def tiny_cnn():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 8 * 8, 10),
    )


def test_same_backend_configs_do_not_share_compiled_code():
    """inductor and inductor@0.5 compile the same forward in one process; the
    budget must still take effect (Dynamo does not guard on it)."""
    w = run.Workload("tiny_cnn", tiny_cnn, (4, 3, 8, 8))
    rows = run.run_model(w, ["inductor", "inductor@0.5"], run.torch.device("cpu"), 1, lambda m: None)
    saved = {r["config"]: r["saved_activation_bytes"] for r in rows}
    assert saved["inductor@0.5"] < saved["inductor"]


def test_run_rejects_unknown_model_and_config(capsys):
    with pytest.raises(SystemExit):
        run.main(["--models", "nope"])
    with pytest.raises(SystemExit):
        run.main(["--models", "relu_mlp", "--configs", "turbo"])
    assert "unknown" in capsys.readouterr().err


def test_kernels_benchmark_times_the_exponent_codec(tmp_path, capsys):
    kernel_speed = benchmark("kernel_speed")

    out = tmp_path / "k.jsonl"
    assert kernel_speed.main(["--codec", "exponent", "--sizes", "4099", "--dtypes", "bfloat16,float16", "--reps", "1",
                         "--device", "cpu", "--out", str(out)]) == 0
    rows = results_io.read_rows(out)
    assert all(r["benchmark"] == "kernels" and r["torch"] and r["machine"]["cores"] and r["command"] for r in rows)
    assert [r["dtype"] for r in rows] == ["bfloat16", "float16"]
    assert all(0 < r["stored_ratio"] < 1 and r["compress_us"] > 0 for r in rows)
    assert "exponent kernels=" in capsys.readouterr().out


def test_kernels_benchmark_bitmap_exponent_rows(tmp_path):
    kernel_speed = benchmark("kernel_speed")

    out = tmp_path / "k.jsonl"
    assert kernel_speed.main(["--codec", "bitmap+exponent", "--sizes", "5000", "--densities", "0.5", "--dtypes",
                         "bfloat16", "--reps", "1", "--device", "cpu", "--out", str(out)]) == 0
    (row,) = results_io.read_rows(out)
    assert row["stored_ratio"] < row["bitmap_only_ratio"] < 1


def test_codec_costs_fits_every_op_the_pricing_charges(tmp_path, capsys):
    codec_costs = benchmark("codec_costs")

    out = tmp_path / "c.jsonl"
    assert codec_costs.main(["--sizes", "20000,400000", "--reps", "5", "--out", str(out)]) == 0
    (row,) = results_io.read_rows(out)
    fits = row["fits"]
    assert {"compress", "decompress", "exp_compress", "exp_decompress", "bitmap_exp_compress",
            "bitmap_exp_decompress", "clone"} == set(fits)
    assert all(f["GBps"] > 0 and f["per_call_us"] >= 0 for f in fits.values())
    assert "pricing: us / GB/s" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        codec_costs.main(["--sizes", "70000"])  # one size cannot fit two terms


def test_codec_in_step_times_each_call_and_restores_the_ops():
    codec_in_step = benchmark("codec_in_step")

    compress = run.torch.ops.bitfx.compress.default
    # Six ReLU outputs that outweigh backward's transients: compressing them
    # lowers the step peak, so the peak guard keeps the codec (with three,
    # stock's plan at budget 0.9 peaks lower, measured).
    def deeper():
        layers = [nn.Linear(32, 128), nn.ReLU()]
        for _ in range(5):
            layers += [nn.Linear(128, 128), nn.ReLU()]
        return nn.Sequential(*layers, nn.Linear(128, 10))

    w = run.Workload("deeper", deeper, (1024, 32))
    rows = codec_in_step.measure(w, 2)
    # ReLU outputs stored compressed (the free default packs nothing else
    # here): one compress and one decompress each per step.
    assert [r[1] for r in rows] == ["compress", "decompress"] and rows[0][2] == rows[1][2] >= 3, rows
    assert all(float(r[3]) > 0 and float(r[4]) > 0 for r in rows)
    # Per step: the calls' sum, at least the median call's time per call (rounding aside).
    assert all(float(r[5]) >= r[2] * float(r[3]) / 2 and float(r[6]) > 0 for r in rows)
    assert run.torch.ops.bitfx.compress.default is compress


def test_same_budget_ratios_and_summarize(tmp_path, capsys):
    def row(config, times):
        return {"model": "m", "label": "", "config": config, "autocast": "", "saved_activation_bytes": 1,
                "peak_bytes": 1, "step_ms": times[0], "compile_s": 0.0, "step_times_ms": times}

    rows = [row("inductor", [1.0, 2.0, 1.0]), row("inductor@0.5", [1.0, 2.0, 2.0]),
            row("bittrain@0.5", [1.1, 2.2, 2.2]), row("bittrain@0.3", [1.0, 1.0, 1.0])]
    # Paired with stock at the same budget only; no stock @0.3, no ratio.
    (((model, budget, x),)) = run.same_budget_ratios(rows)
    assert (model, budget) == ("m", "0.5") and x == pytest.approx(1.1)
    path = tmp_path / "f.jsonl"
    results_io.append_rows("run", [{"model": "old", "config": "inductor"}], path)  # an earlier run: not shown
    results_io.append_rows("run", rows, path)
    # A second run differs in its command column (results_io.runs groups by it).
    lines = path.read_text().splitlines()
    lines[0] = lines[0].replace('"command": "', '"command": "earlier ')
    path.write_text("\n".join(lines) + "\n")
    assert run.main(["--summarize", str(path)]) == 0
    out = capsys.readouterr().out
    assert "bittrain@B x inductor@B (paired)" in out and "1.100" in out


def test_op_overhead_cold_rows():
    """``op_overhead.py --cold``: every call timed hot and after evicting the caches."""
    op_overhead = benchmark("op_overhead")

    rows = op_overhead.cold_rows([[64]], 3)
    assert [r[2] for r in rows] == ["torch.empty_like", "Tensor.add", "bitfx::compress", "bitfx::decompress"]
    assert all(r[1] == 64 and float(r[3]) > 0 and float(r[4]) > 0 for r in rows)


def test_render_results_from_rows(tmp_path):
    """docs/results.md is rendered from rows: the latest run of each benchmark, with where it was measured."""
    render_results = benchmark("render_results")

    res = tmp_path / "results"
    for commit, saved in (("aaa", 100), ("bbb", 50)):  # two runs; only the latest counts
        rows = [{"model": "m", "config": "inductor", "autocast": "", "saved_activation_bytes": 200, "step_x_inductor": 1.0,
                 "peak_bytes": 400, "peak_check": "ok"},
                {"model": "m", "config": "bittrain", "autocast": "", "saved_activation_bytes": saved, "step_x_inductor": 1.02,
                 "peak_bytes": 300, "peak_check": "ok"},
                # a row whose peak measurement failed its check: its peak is not shown
                {"model": "m", "config": "bittrain@0.5", "autocast": "", "saved_activation_bytes": 20, "step_x_inductor": 1.1,
                 "peak_bytes": 10, "peak_check": "net allocation 0 bytes, gradients 8"}]
        results_io.append_rows("run", rows, res / "run.jsonl")
        lines = (res / "run.jsonl").read_text().splitlines()
        (res / "run.jsonl").write_text("\n".join(
            line.replace(f'"commit": "{results_io._commit()["commit"]}"', f'"commit": "{commit}"')
            if i >= len(lines) - 3 else line for i, line in enumerate(lines)) + "\n")
    results_io.append_rows("other", [{"x": 1.5, "name": "n"}], res / "other.jsonl")
    text = render_results.render(res)
    row = next(line for line in text.splitlines() if line.startswith("| m | fp32 | bittrain |"))
    assert "| 0.250 | 0.750 | 1.020 |" in row and "commit bbb" in row
    failed = next(line for line in text.splitlines() if line.startswith("| m | fp32 | bittrain@0.5 |"))
    assert "| 0.100 | not measured | 1.100 |" in failed
    assert "## `other`" in text and "| 1.500 | n |" in text
    out = tmp_path / "results.md"
    assert render_results.main(["--results", str(res), "--out", str(out)]) == 0
    assert render_results.main(["--results", str(res), "--out", str(out), "--check"]) == 0
    out.write_text("edited by hand\n")
    assert render_results.main(["--results", str(res), "--out", str(out), "--check"]) == 1


def test_committed_results_page_is_generated():
    render_results = benchmark("render_results")

    assert render_results.main(["--check"]) == 0, "run python benchmarks/render_results.py"


def test_results_directory_holds_only_rows_and_plots():
    names = [p.name for p in results_io.RESULTS.iterdir()]
    assert names and all(n.endswith((".jsonl", ".png")) for n in names), names


def test_run_model_checks_the_default_against_its_plan_stored_dense():
    w = run.Workload("tiny", tiny, (16, 32))
    rows = run.run_model(w, ["inductor", "bittrain", "bittrain-dense"], run.torch.device("cpu"), 1, lambda m: None)
    (row,) = [r for r in rows if r["config"] == "bittrain"]
    assert row["grads_bit_identical_to_dense"] is True
    assert all("grads_bit_identical_to_dense" not in r for r in rows if r["config"] != "bittrain")


def test_render_results_leaves_out_unrecorded_rows_and_empty_columns(tmp_path):
    """A row without its commit or machine is not shown; nor is a column no row has a figure in,
    nor a section whose rows are all left out."""
    render_results = benchmark("render_results")

    res = tmp_path / "results"
    res.mkdir()
    good = {"model": "m", "config": "inductor", "autocast": "", "saved_activation_bytes": 200, "step_x_inductor": 1.0,
            "peak_bytes": 400, "peak_check": "no", "commit": "abc", "machine": {"cpu": "CPU X", "cores": 2}}
    old = {**good, "model": "old", "commit": None}
    (res / "run.jsonl").write_text("\n".join(json.dumps(r) for r in (good, old)) + "\n")
    (res / "gone.jsonl").write_text(json.dumps({"x": 1, "machine": None, "commit": None}) + "\n")
    text = render_results.render(res)
    assert "| m | fp32 | inductor |" in text and "| old |" not in text
    assert "commit ?" not in text and "not recorded" not in text
    assert "step peak x inductor" not in text  # every row's peak failed its check: the column goes
    assert "gone" not in text


def test_committed_results_page_has_no_unrecorded_rows_or_empty_tables():
    page = (Path(__file__).resolve().parents[1] / "docs" / "results.md").read_text()
    assert "commit ?" not in page and "not recorded" not in page
    lines = page.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("|---"):  # a table's separator: at least one row follows
            assert i + 1 < len(lines) and lines[i + 1].startswith("|"), lines[i - 1]


def test_train_lm_frontier_and_breakdown_render_from_rows(tmp_path):
    """train_lm.py --frontier rows: bitfx@b against stock@b, judged at 0.85x bytes and 1.03x time,
    and the default plan's tensors grouped by module with the block index as ``*``."""
    render_results = benchmark("render_results")
    train_lm = benchmark("train_lm")
    assert train_lm.frontier_configs([0.9, 0.5]) == ["bittrain@0.9", "inductor@0.5", "bittrain@0.5"]

    def row(config, saved, step, **extra):
        return {"act": "sqrelu", "dim": 8, "layers": 2, "seq": 4, "batch": 1, "step": 10, "autocast": "",
                "config": config, "saved_activation_bytes": saved * 2**20, "saved_x_inductor": saved / 100,
                "saved_x_inductor@0.9": saved / 80, "peak_bytes": 2**20, "peak_check": "ok",
                "step_x_inductor": step, **extra}

    rows = [row("inductor", 100, 1.0), row("inductor@0.9", 80, 1.0), row("bittrain", 40, 1.01),
            row("bittrain@0.9", 60, 1.02, step_x_stock_same_budget=1.02),  # 0.75x at 1.02x: meets the bar
            row("inductor@0.5", 50, 1.1), row("bittrain@0.5", 45, 1.1, step_x_stock_same_budget=1.0),  # 0.9x: misses
            {"act": "sqrelu", "step": 10, "autocast": "", "config": "breakdown", "tensors": [
                {"name": f"blocks.{i}.mlp", "op": "relu", "shape": [4, 8], "dtype": "float32", "dense_bytes": 2**20,
                 "stored_bytes": 2**19, "codec": "bitmap", "density": 0.4, "reason": ""} for i in range(2)]}]
    results_io.append_rows("train_lm", rows, tmp_path / "train_lm.jsonl")
    text = render_results.render(tmp_path)
    lines = text.splitlines()
    assert next(x for x in lines if x.startswith("| fp32 | 0.9 |")).endswith("| yes |")
    assert next(x for x in lines if x.startswith("| fp32 | 0.5 |")).endswith("| no |")
    assert "| 0.750 |" in next(x for x in lines if x.startswith("| fp32 | 0.9 |"))
    grouped = next(x for x in lines if x.startswith("| blocks.*.mlp | relu |"))
    assert "| bitmap | 2 | 2.00 | 1.00 | 100.0% |" in grouped


def test_plan_accuracy_repredicts_stock_rows_measured_here_and_keeps_their_measurement(tmp_path):
    """--repredict re-plans the latest stock rows of this machine and torch only (a stock plan's step
    is the same whatever bitfx predicts); bitfx's default and other machines' rows are left alone."""
    import torch

    pytest.importorskip("torchvision")  # the benchmark's models
    plan_accuracy = benchmark("plan_accuracy")
    out = tmp_path / "plan_accuracy.jsonl"
    here = {"machine": results_io.machine(), "torch": torch.__version__, "commit": "abc", "date": "2026-01-01"}
    base = {"model": "mobilenet_v3_small", "autocast": "", "inner": "inductor", "batch": 2, "size": 32,
            "saved_bytes": 1000, "peak_bytes": 5_000_000, "peak_check": "ok", "peak_predicted": 1, "peak_error": 0}
    rows = [{**base, **here, "config": "inductor"},
            {**base, **here, "config": "bittrain"},
            {**base, **here, "config": "inductor@0.9", "machine": {"cpu": "elsewhere"}}]
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert plan_accuracy.main(["--repredict", "--out", str(out)]) == 0
    new = results_io.read_rows(out)[len(rows):]
    assert [(r["config"], r["measured_commit"], r["peak_bytes"], r["saved_bytes"]) for r in new] == [
        ("inductor", "abc", 5_000_000, 1000)]
    assert new[0]["peak_predicted"] > 1_000_000
    assert new[0]["peak_error"] == pytest.approx(new[0]["peak_predicted"] / 5_000_000 - 1)
