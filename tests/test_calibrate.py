"""Device profiles (bitfx.calibrate): measured, saved, and pricing the plan."""

import dataclasses
import json

import pytest
import torch
from torch import nn

from bitfx import calibrate
from bitfx.backend import Backend, partitioner
from bitfx.options import Options
from bitfx.passes import pricing


@pytest.fixture
def profile_env(monkeypatch, tmp_path):
    """An empty profile cache, and calibrate's per-process cache cleared before and after."""
    monkeypatch.setenv("BITFX_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("BITFX_PROFILE", raising=False)
    calibrate._machine.cache_clear()
    yield monkeypatch
    calibrate._machine.cache_clear()


def _write(path, **machine):
    """A CPU profile: the built-in constants with ``machine``'s fields replaced."""
    fields = dataclasses.asdict(dataclasses.replace(pricing.MACHINES["cpu"], **machine))
    fields.pop("name")
    path.write_text(json.dumps({"device": "cpu", "device_name": "test CPU", "torch": torch.__version__,
                                "date": "2026-12-03T00:00:00Z", "quick": False, "machine": fields}))
    return path


def _heavy_cnn():
    """Convolutions heavy enough that the free default exponent-codes a conv output (built-in constants)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1),
                         nn.BatchNorm2d(64), nn.ReLU(), nn.Conv2d(64, 8, 3))


def _plan(model, x):
    got = []
    torch._dynamo.reset()
    # The saved-bytes plan: this test is about the time rule, not the peak guard.
    compiled = torch.compile(model, backend=Backend(Options(inner="eager", peak_guard=False), got.append))
    compiled(x).sum().backward()
    return got[-1]


def test_calibrate_writes_a_profile_that_prices_plans(profile_env, tmp_path, capsys):
    out = tmp_path / "p.json"
    assert calibrate.main(["--quick", "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    profile = json.loads(out.read_text())
    assert profile["device"] == "cpu" and profile["torch"] == torch.__version__ and profile["quick"]
    assert profile["device_name"] == calibrate.device_name("cpu")
    m = profile["machine"]
    assert {"float32", "bfloat16"} <= dict(m["flops_by_dtype"]).keys()
    for field in ("flops", "bandwidth", "encode", "decode", "exp_encode", "exp_decode"):
        assert m[field] > 0, field
    assert m["bitmap_call"] >= 0 and m["exp_call"] >= 0
    profile_env.setenv("BITFX_PROFILE", str(out))
    machine = calibrate.machine("cpu")
    assert machine.name.startswith(f"cpu: profile {out}") and machine.bandwidth == m["bandwidth"]
    assert machine.flop_rate(torch.bfloat16) == dict(m["flops_by_dtype"])["bfloat16"]
    assert machine.flop_rate(torch.float16) == m["flops"]  # not measured: the fp32 rate
    # The quick profile does not measure the convolution scratch: the built-in figures price it.
    assert not set(calibrate.SCRATCH_FIELDS) & m.keys()
    builtin = calibrate.MACHINES["cpu"]
    for field in calibrate.SCRATCH_FIELDS:
        assert getattr(machine, field) == getattr(builtin, field), field
    assert not set(calibrate.UNMEASURED_FIELDS) & m.keys()


@pytest.mark.parametrize("quick", [True, False])
def test_every_profile_prices_operand_copies_with_the_built_in_values(profile_env, tmp_path, quick):
    """No calibration measures a weight gradient's operand copies; profiles once saved them as an
    empty table, which priced every copy at nothing wherever a profile existed (a user's first
    compile saves one)."""
    path = _write(tmp_path / "p.json", conv_operand_copies_by_dtype=())
    profile = json.loads(path.read_text())
    profile["quick"] = quick
    path.write_text(json.dumps(profile))
    profile_env.setenv("BITFX_PROFILE", str(path))
    machine = calibrate.machine("cpu")
    assert machine.name.startswith(f"cpu: profile {path}")
    assert machine.conv_operand_copies_by_dtype == calibrate.MACHINES["cpu"].conv_operand_copies_by_dtype != ()
    assert machine.conv_operand_copies(torch.float32, False, False, False) == (1.0, 1.0)


def test_a_quick_profile_with_zero_scratch_keeps_the_built_in_scratch(profile_env, tmp_path):
    """Quick profiles once saved the unmeasured scratch fields as zeros, which priced oneDNN's
    convolution-backward scratch at nothing."""
    fields = {k: v for k, v in dataclasses.asdict(calibrate.MACHINES["cpu"]).items() if k != "name"}
    fields.update(conv_scratch_channels_last=0.0, conv_scratch_contiguous=0.0, depthwise_scratch_by_dtype=[])
    path = tmp_path / "old-quick.json"
    path.write_text(json.dumps({"device": "cpu", "device_name": "x", "torch": torch.__version__,
                                "date": "2026-12-04T00:00:00Z", "quick": True, "machine": fields}))
    profile_env.setenv("BITFX_PROFILE", str(path))
    machine = calibrate.machine("cpu")
    builtin = calibrate.MACHINES["cpu"]
    assert machine.conv_scratch_channels_last == builtin.conv_scratch_channels_last > 0
    assert machine.depthwise_scratch_by_dtype == builtin.depthwise_scratch_by_dtype != ()


def test_a_slow_codec_profile_codes_fewer_tensors(profile_env, tmp_path):
    """The free default's time rule is evaluated with the profile in force: the same
    model, exponent-coded where the codec is fast, dense where it is slow."""
    model, x = _heavy_cnn(), torch.randn(2, 64, 32, 32)
    plans = {}
    for speed, fields in {"fast": {"exp_call": 1e-7, "exp_encode": 1e12, "exp_decode": 1e12},
                          "slow": {"exp_call": 1.0}}.items():
        path = _write(tmp_path / f"{speed}.json", **fields)
        profile_env.setenv("BITFX_PROFILE", str(path))
        calibrate._machine.cache_clear()
        plans[speed] = _plan(model, x)
        assert plans[speed].machine.startswith(f"cpu: profile {path}")
    exponent = {k: [i.node.name for i in p.infos if i.codec.value == "exponent"] for k, p in plans.items()}
    assert len(exponent["fast"]) >= 2 and exponent["slow"] == []
    assert plans["slow"].estimate.codec_s < 1.0  # a 1 s codec call was priced, and refused


def test_without_a_profile_the_first_use_measures_and_saves_one(profile_env):
    path = calibrate.profile_path("cpu")
    assert not path.exists()
    first = calibrate.machine("cpu")
    assert path.exists() and first.name.startswith(f"cpu: profile {path}, quick (")
    assert json.loads(path.read_text())["quick"] is True
    calibrate._machine.cache_clear()  # a later process reads the saved profile, measuring nothing
    again = calibrate.machine("cpu")
    assert dataclasses.replace(again, name="") == dataclasses.replace(first, name="")
    assert again.name.startswith(f"cpu: profile {path} (")


def test_profile_errors_are_loud(profile_env, tmp_path):
    profile_env.setenv("BITFX_PROFILE", str(tmp_path / "missing.json"))
    with pytest.raises(FileNotFoundError, match="BITFX_PROFILE"):
        calibrate.machine("cpu")
    cuda = tmp_path / "cuda.json"
    cuda.write_text(json.dumps({"device": "cuda", "machine": {}}))
    profile_env.setenv("BITFX_PROFILE", str(cuda))
    calibrate._machine.cache_clear()
    with pytest.raises(ValueError, match="cuda profile, not cpu"):
        calibrate.machine("cpu")


def test_the_profile_is_part_of_the_partitioners_cache_key(profile_env, tmp_path):
    """Inductor's caches must not hand back a plan priced with other constants."""
    options = Options()
    profile_env.setenv("BITFX_PROFILE", "builtin")
    builtin = partitioner(options).uuid()
    profile_env.setenv("BITFX_PROFILE", str(_write(tmp_path / "a.json")))
    a = partitioner(options).uuid()
    _write(tmp_path / "a.json", bitmap_call=1.0)  # the same path, re-measured
    assert len({builtin, a, partitioner(options).uuid()}) == 3


def test_fit_recovers_a_line_and_refuses_noise():
    assert calibrate.fit([(1000, 1e-5 + 1000 / 2e9), (10**6, 1e-5 + 10**6 / 2e9)]) == pytest.approx((1e-5, 2e9))
    with pytest.raises(RuntimeError, match="too noisy"):
        calibrate.fit([(1000, 2e-5), (10**6, 1e-5)])


def test_the_first_compile_measures_outside_its_fake_tensors(profile_env):
    """The quick measurement made inside a compile times real kernels, and leaves the
    compile's ShapeEnv alone: run in the compiling thread, it timed fake kernels
    (4 ms at every size) and its unbacked payload sizes failed Inductor's compile
    of this model."""
    import bitfx

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(8 * 256, 10))
    torch.compile(model, backend=bitfx.backend(compress=False))(torch.randn(8, 1, 32, 32)).sum().backward()
    profile = json.loads(calibrate.profile_path("cpu").read_text())
    for op, ((_, small), (_, large)) in profile["timings"].items():
        assert large > 5 * small, op  # 1K against 1M elements: real work grows with size
