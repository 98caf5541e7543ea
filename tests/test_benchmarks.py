"""Smoke tests of the benchmark harnesses (``benchmarks/bench_step.py`` and
``benchmarks/bench_training.py``) in CPU quick mode, and of the analytic byte counts
their GB/s figures rest on.  They check the harness, not the speed of anything."""
from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

# benchmarks/ is on pytest's pythonpath (pyproject.toml), as it is on a script's path.
BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"
import _env  # noqa: E402
import bench_step  # noqa: E402
import bench_training  # noqa: E402

from pilot_kernels.kernels import triton_interpreting  # noqa: E402


# --------------------------------------------------------------------- analytic bytes
def test_analytic_bytes_per_element():
    # spec §3: read g, m, w, b_m, b_w and write m, w, b_m, b_w, x
    assert _env.bytes_per_element("pilot", torch.float32) == 40
    # fused SGD with momentum: read g, p, b and write p, b
    assert _env.bytes_per_element("sgd", torch.float32) == 20
    # g and x follow the parameter's dtype; m, w, b_m, b_w stay fp32
    assert _env.bytes_per_element("pilot", torch.bfloat16) == 36
    assert _env.bytes_per_element("sgd", torch.bfloat16) == 10
    assert _env.bytes_per_element("pilot", torch.float32, momentum=False) == 24
    assert _env.bytes_per_element("sgd", torch.float32, momentum=False) == 12
    with pytest.raises(ValueError):
        _env.bytes_per_element("adam", torch.float32)


def test_step_bytes_splits_like_pilot():
    shapes = [(4, 4), (3, 2, 1, 1), (4,)]  # two reparameterized tensors, one vector
    assert _env.step_bytes(shapes, "pilot") == (16 + 6) * 40 + 4 * 20
    assert _env.step_bytes(shapes, "sgd") == (16 + 6 + 4) * 20


def test_shape_sets():
    r50 = bench_step.resnet50_shapes()
    assert len(r50) == 161
    assert sum(math.prod(s) for _, s in r50) == 25_557_032
    assert sum(len(s) >= 2 for _, s in r50) == 54
    gpt2 = bench_step.gpt2_shapes()
    assert sum(math.prod(s) for _, s in gpt2) == 124_439_808
    assert bench_step.single_shapes(20) == [("x", (1024, 1024))]
    shrunk = bench_step.shrink_shapes(r50, 32)
    assert len(shrunk) == 161 and [len(s) for _, s in shrunk] == [len(s) for _, s in r50]


def test_naive_parametrize_is_x_equals_m_times_w():
    torch.manual_seed(0)
    lin = nn.Linear(8, 5)
    w0, b0 = lin.weight.detach().clone(), lin.bias.detach().clone()
    factors, others = bench_step.naive_parametrize(lin)
    assert len(factors) == 2 and all(f.dtype == torch.float32 for f in factors)
    assert [o is lin.bias for o in others] == [True]
    m, w = factors
    torch.testing.assert_close(lin.weight, m * w)
    torch.testing.assert_close(lin.weight, w0, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(m * m - w * w, torch.ones_like(m), rtol=1e-5, atol=1e-5)  # beta = 1
    assert torch.equal(lin.bias, b0)


# --------------------------------------------------------------------- bench_step
def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _finite_positive(text: str) -> bool:
    try:
        v = float(text)
    except ValueError:
        return False
    return math.isfinite(v) and v > 0


@pytest.fixture(scope="module")
def step_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_step")
    runnable = ["naive", "reference", "torch_fused"]
    if triton_interpreting():  # conftest sets TRITON_INTERPRET=1 on CPU-only machines
        runnable.append("triton")
    providers = runnable + ["cuda"]  # cuda: must come back as a row marked unavailable
    result = bench_step.main(["--device", "cpu", "--quick", "--out", str(out), "--name", "smoke",
                              "--providers", ",".join(providers), "--cpu-reps", "2"])
    return out, runnable, providers, result


def test_bench_step_writes_a_row_per_provider_and_shape(step_run):
    out, runnable, providers, result = step_run
    csv_path, json_path, png_path = out / "smoke.csv", out / "smoke.json", out / "smoke.png"
    assert csv_path.exists() and json_path.exists() and png_path.exists()
    assert result["csv"] == csv_path
    rows = _read_csv(csv_path)
    sizes = [("single", f"2^{k}") for k in (10, 12, 14, 16)] + [("resnet50", "resnet50"), ("gpt2", "gpt2")]
    got = sorted((r["shape_set"], r["size"], r["provider"]) for r in rows)
    assert got == sorted((s, z, p) for s, z in sizes for p in providers)
    for r in rows:
        assert r["dtype"] == "float32"
        if r["provider"] in runnable:
            assert r["status"] == "ok", r
            for col in ("time_ms", "gbps", "pct_copy", "bytes"):
                assert _finite_positive(r[col]), (col, r)
            assert float(r["time_p20_ms"]) <= float(r["time_ms"]) <= float(r["time_p80_ms"])
            assert int(r["launches"]) >= 1 and r["launch_counter"] == "cpu_aten_ops"
        else:
            assert r["status"].startswith("unavailable:"), r
            assert r["time_ms"] == ""


def test_bench_step_bytes_are_40_for_pilot_and_20_for_sgd(step_run):
    out, runnable, _, _ = step_run
    rows = _read_csv(out / "smoke.csv")
    single = [r for r in rows if r["shape_set"] == "single"]
    assert single
    for r in single:
        expected = 20 if r["provider"] == "torch_fused" else 40
        assert float(r["bytes_per_elem"]) == expected, r
        assert int(r["bytes"]) == expected * int(r["numel"])
    # model sets: vectors at SGD's 20 B, everything else at PILoT's 40 B
    for r in rows:
        if r["shape_set"] == "resnet50":
            assert (int(r["n_tensors"]), int(r["n_reparam"])) == (161, 54)
        if r["shape_set"] == "gpt2":
            assert (int(r["n_tensors"]), int(r["n_reparam"])) == (148, 50)
        if r["shape_set"] != "single" and r["provider"] != "torch_fused":
            assert 20 < float(r["bytes_per_elem"]) < 40
    data = json.loads((out / "smoke.json").read_text())
    assert data["analytic_bytes_per_element"]["float32"] == {"pilot": 40, "sgd": 20}


def test_bench_step_json_records_environment(step_run):
    out, *_ = step_run
    data = json.loads((out / "smoke.json").read_text())
    env = data["environment"]
    for key in ("device_name", "driver", "torch", "triton", "python", "git_commit", "timestamp_utc"):
        assert key in env
    assert env["device_type"] == "cpu" and env["torch"] == torch.__version__
    assert data["copy_bandwidth"]["gbps"] > 0
    assert data["copy_bandwidth"]["bytes_moved"] == 2 * data["copy_bandwidth"]["buffer_bytes"]
    assert data["targets"]["status"].startswith("owed")
    assert len(data["rows"]) == len(_read_csv(out / "smoke.csv"))


def test_cpu_quick_run_is_named_as_a_smoke_run():
    env = _env.environment("cpu")
    assert _env.results_stem("step", env, quick=True).startswith("cpu-smoke-step-")


# --------------------------------------------------------------------- bench_training
@pytest.fixture(scope="module")
def training_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_training")
    providers = ["dense", "pilot_reference", "naive", "pilot_triton", "pilot_cuda"]
    # --warmup 0: the harness, not the speed, is under test (keeps the file under a minute)
    result = bench_training.main(["--device", "cpu", "--quick", "--warmup", "0", "--out", str(out),
                                  "--name", "smoke", "--providers", ",".join(providers)])
    return out, providers, result


def test_bench_training_writes_a_row_per_provider(training_run):
    out, providers, result = training_run
    assert (out / "smoke.csv").exists() and (out / "smoke.json").exists()
    rows = _read_csv(out / "smoke.csv")
    assert [r["provider"] for r in rows] == providers
    for r in rows:
        assert r["arch"] == "resnet18" and r["batch_size"] == "4" and r["image_size"] == "32"
        if r["provider"] in ("pilot_triton", "pilot_cuda"):
            assert r["status"].startswith("unavailable:"), r
            continue
        assert r["status"] == "ok", r
        for col in ("img_per_s", "iter_ms", "step_host_us", "step_bytes", "step_gbps", "rel_dense"):
            assert _finite_positive(r[col]), (col, r)
        assert (int(r["n_tensors"]), int(r["n_reparam"])) == (62, 21)  # resnet18
    by = {r["provider"]: r for r in rows}
    n = int(by["dense"]["n_params"])
    assert int(by["dense"]["step_bytes"]) == 20 * n
    assert 20 * n < int(by["pilot_reference"]["step_bytes"]) < 40 * n
    assert float(by["dense"]["rel_dense"]) == 1.0
    data = json.loads((out / "smoke.json").read_text())
    assert data["environment"]["device_type"] == "cpu"
    assert data["targets"]["status"].startswith("owed")
