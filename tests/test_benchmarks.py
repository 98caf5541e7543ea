"""The measuring instruments: the analytic byte model, the shape sets, the providers, the
interleaved timer, the kernel stubs of the host-cost measurement, the peak-temporaries
probe, and the benchmark scripts in CPU quick mode.  They check the harness, not the
speed of anything."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import bench  # benchmarks/ is on pytest's pythonpath, as it is on a script's path
import bench_step
import bench_training
import bench_utils
from pilot_kernels import PILoT
from pilot_kernels.kernels import BACKENDS, resolve_backend, traffic, triton_interpreting


# --------------------------------------------------------------------- analytic bytes
def test_bytes_per_element():
    # PILoT: read x, g, m, w, b_m, b_w; write m, w, b_m, b_w, x
    assert traffic.bytes_per_element("pilot", torch.float32) == 44
    assert traffic.bytes_per_element("pilot", torch.bfloat16) == 38  # g and x follow x's dtype
    assert traffic.bytes_per_element("pilot", torch.float32, momentum=False) == 28
    assert traffic.bytes_per_element("pilot", torch.float32, adopt_writes=False) == 40  # x not read
    # SGD with momentum: read g, p, b; write p, b
    assert traffic.bytes_per_element("sgd", torch.float32) == 20
    assert traffic.bytes_per_element("sgd", torch.bfloat16) == 10
    assert traffic.bytes_per_element("sgd", torch.float32, momentum=False) == 12
    assert traffic.bytes_per_element("copy", torch.float32) == 8
    with pytest.raises(ValueError, match="algorithm must be one of"):
        traffic.bytes_per_element("adam")


def test_step_bytes_splits_like_pilot():
    shapes = [(4, 4), (3, 2, 1, 1), (4,)]  # two reparameterized tensors, one vector
    assert traffic.step_bytes(shapes, "pilot") == (16 + 6) * 44 + 4 * 20
    assert traffic.step_bytes(shapes, "sgd") == 26 * 20
    assert traffic.step_bytes(shapes, "copy") == 26 * 8
    with pytest.raises(ValueError):
        traffic.step_bytes(shapes, "adam")


# --------------------------------------------------------------------- shape sets
def test_shape_sets():
    import torchvision

    r50 = bench.resnet50_shapes()
    with torch.device("meta"):
        model = torchvision.models.resnet50()
    assert r50 == [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    assert len(r50) == 161 and bench.numel(r50) == 25_557_032
    assert sum(len(s) >= 2 for _, s in r50) == 54
    assert bench.numel(bench.gpt2_shapes()) == 124_439_808
    small = bench.small_shapes(2000)
    assert len(small) == 2000 and sum(len(s) >= 2 for _, s in small) == 1000
    assert bench.single_shapes(20) == [("x", (1024, 1024))]
    shrunk = bench.shrink_shapes(r50, 32)
    assert [len(s) for _, s in shrunk] == [len(s) for _, s in r50]
    assert bench.numel(shrunk) < bench.numel(r50) / 500


def test_summarize_interpolates_like_numpy():
    s = bench.summarize([5.0, 1.0, 4.0, 2.0, 3.0])
    assert s == {"min": 1.0, "p20": pytest.approx(1.8), "median": 3.0, "p80": pytest.approx(4.2), "n": 5}
    assert bench.summarize([7.0])["median"] == 7.0


def test_time_steps_interleaves_rounds_in_rotated_order():
    calls = []
    steps = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    out = bench.time_steps(steps, torch.device("cpu"), rounds=4, warmup=1)
    assert calls[:3] == list("abc")  # warm-up
    rounds = [calls[3 + 3 * r: 6 + 3 * r] for r in range(4)]
    assert rounds == [list("abc"), list("bca"), list("cab"), list("abc")]
    assert all(out[n]["n"] == 4 for n in "abc")


def test_naive_parametrize_is_x_equals_m_times_w():
    torch.manual_seed(0)
    lin = nn.Linear(8, 5)
    w0, b0 = lin.weight.detach().clone(), lin.bias.detach().clone()
    factors, others = bench.naive_parametrize(lin)
    assert len(factors) == 2 and all(f.dtype == torch.float32 for f in factors)
    assert [o is lin.bias for o in others] == [True]
    m, w = factors
    torch.testing.assert_close(lin.weight, m * w)
    torch.testing.assert_close(lin.weight, w0, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(m * m - w * w, torch.ones_like(m), rtol=1e-5, atol=1e-5)  # beta = 1
    assert torch.equal(lin.bias, b0)


@pytest.mark.parametrize("provider", ["reference", "torch_foreach", "torch_fused", "naive", "copy"])
def test_every_provider_steps_and_changes_its_tensors(provider):
    built = bench.build(provider, [("w", (6, 5)), ("b", (5,))], torch.float32, torch.device("cpu"))
    before = [t.detach().clone() for t in (built.params or built.keep[1:])]
    built.step()
    after = built.params or built.keep[1:]
    # (the timed steps are tiny, so an fp32 m near 1 may keep its value: any tensor)
    assert any(not torch.equal(a, b) for a, b in zip(before, after)), provider


def test_unavailable_backends_say_why():
    for b in BACKENDS:
        try:
            resolve_backend(b, torch.device("cpu"))
        except ValueError:
            with pytest.raises(bench.Unavailable, match="needs CUDA"):
                bench.build(b, [("w", (2, 2))], torch.float32, torch.device("cpu"))


# --------------------------------------------------------------------- host cost
def _sgd_and_pilot(backend="reference"):
    # Both get a split-size and a bias-like tensor: PILoT's unsplit one takes torch's
    # foreach SGD, whose ops stubbed_kernels replaces too.
    ps = [nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(3))]
    qs = [nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(3))]
    for p in ps + qs:
        p.grad = torch.randn_like(p)
    return ps, torch.optim.SGD(ps, lr=0.1, momentum=0.9, fused=True), qs, PILoT(qs, lr=0.1, backend=backend)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_stubbed_kernels_launch_nothing_and_are_restored(backend):
    if backend == "triton" and not triton_interpreting():
        pytest.skip("the Triton kernel runs on the CPU only in its interpreter")
    with bench.stubbed_kernels():
        ps, sgd, qs, pilot = _sgd_and_pilot(backend)
        before = [p.detach().clone() for p in ps + qs]
        sgd.step()
        pilot.step()
        assert all(torch.equal(b, p) for b, p in zip(before, ps + qs))
    ps, sgd, qs, pilot = _sgd_and_pilot(backend)
    before = [p.detach().clone() for p in ps + qs]
    sgd.step()
    pilot.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, ps + qs))


def test_peak_temporaries_tell_the_reference_from_fused_sgd():
    cpu = torch.device("cpu")
    ref = bench.peak_temporaries("reference", 20, torch.float32, cpu)
    sgd = bench.peak_temporaries("torch_fused", 20, torch.float32, cpu)
    assert ref["status"] == "ok" and sgd["status"] == "ok", (ref, sgd)
    assert ref["bytes_per_element"] >= 8  # d_m, d_w and the new values are tensor-sized
    assert sgd["bytes_per_element"] <= 1


# --------------------------------------------------------------------- bench_step
def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _positive(text) -> bool:
    try:
        return math.isfinite(float(text)) and float(text) > 0
    except (TypeError, ValueError):
        return False


@pytest.fixture(scope="module")
def step_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_step")
    native = bench.native_providers(torch.device("cpu"))
    runnable = native + (["triton"] if triton_interpreting() else [])
    providers = runnable + [b for b in BACKENDS if b not in runnable]  # the rest: rows marked unavailable
    result = bench_step.main(["--device", "cpu", "--quick", "--out", str(out), "--name", "smoke", "--no-temp",
                              "--shapes", "resnet50,small2000,single", "--providers", ",".join(providers)])
    return out, runnable, providers, result


def test_bench_step_writes_a_row_per_provider_and_case(step_run):
    out, runnable, providers, result = step_run
    assert result["csv"] == out / "smoke.csv" and (out / "smoke.json").exists()
    rows = _read_csv(out / "smoke.csv")
    cases = [("resnet50", "resnet50/32"), ("small2000", "small2000/32"), ("single", "2^12")]
    assert sorted((r["shape_set"], r["size"], r["provider"]) for r in rows) == \
        sorted((s, z, p) for s, z in cases for p in providers)
    for r in rows:
        if r["provider"] not in runnable:
            assert r["status"].startswith("unavailable:") and r["time_ms"] == "", r
            continue
        assert r["status"] == "ok", r
        for col in ("time_min_ms", "time_ms", "gbps", "pct_copy", "x_foreach", "bytes", "launches"):
            assert _positive(r[col]), (col, r)
        assert float(r["time_min_ms"]) <= float(r["time_p20_ms"]) <= float(r["time_ms"]) <= float(r["time_p80_ms"])
        assert r["launch_counter"] == "cpu_aten_ops"
    by = {(r["shape_set"], r["provider"]): r for r in rows}
    for s, _ in cases:
        assert float(by[(s, "torch_foreach")]["x_foreach"]) == 1.0
        assert float(by[(s, "copy")]["pct_copy"]) == pytest.approx(100.0)


def test_bench_step_charges_analytic_bytes(step_run):
    out, *_ = step_run
    rows = _read_csv(out / "smoke.csv")
    expected = {"torch_foreach": 20, "torch_fused": 20, "copy": 8}
    for r in rows:
        if r["shape_set"] == "single":
            assert float(r["bytes_per_elem"]) == expected.get(r["provider"], 44), r
            assert int(r["bytes"]) == int(float(r["bytes_per_elem"])) * int(r["numel"])
        elif r["provider"] not in expected:  # vectors at SGD's 20 B, the rest at PILoT's 44 B
            assert 20 < float(r["bytes_per_elem"]) < 44, r
        if r["shape_set"] == "resnet50":
            assert (int(r["n_tensors"]), int(r["n_reparam"])) == (161, 54)
    data = json.loads((out / "smoke.json").read_text())
    assert data["analytic_bytes_per_element"]["float32"] == {"pilot": 44, "sgd": 20, "copy": 8}


def test_bench_step_measures_host_cost_and_evaluates_targets(step_run):
    out, runnable, _, result = step_run
    host = result["host_cost_us"]
    assert host["torch_fused"]["status"] == "ok" and host["reference"]["status"] == "ok"
    assert 0 < host["reference"]["min"] <= host["reference"]["median"]
    data = json.loads((out / "smoke.json").read_text())
    assert data["host_cost_us"]["torch_fused"]["median"] == pytest.approx(host["torch_fused"]["median"])
    checks = {(c["target"], c["case"].split()[0]) for c in data["targets"]["checks"]}
    auto = resolve_backend("auto", torch.device("cpu"))
    for name in ("time <= 2.5x SGD(foreach)", "time <= 3.0x SGD(foreach)", ">= 70% of copy bandwidth",
                 "host cost <= SGD(fused)'s"):
        assert (name, auto) in checks, (name, checks)
    for c in data["targets"]["checks"]:
        assert c["pass"] == (c["value"] is not None and (c["value"] <= c["limit"] if "<=" in c["target"]
                                                          else c["value"] >= c["limit"])), c


def test_bench_step_json_records_environment(step_run):
    out, *_ = step_run
    data = json.loads((out / "smoke.json").read_text())
    env = data["environment"]
    assert env["device_type"] == "cpu" and env["torch"] == torch.__version__
    for key in ("cpu", "cpu_count", "triton", "python", "git_commit", "timestamp_utc"):
        assert key in env
    assert len(data["rows"]) == len(_read_csv(out / "smoke.csv"))


def test_cpu_quick_run_is_named_as_a_smoke_run():
    env = {"device_type": "cpu"}
    assert bench_utils.results_stem("step", env, quick=True).startswith("cpu-smoke-step-")
    assert bench_utils.results_stem("step", env, quick=False).startswith("step-cpu-")


def test_target_fails_a_missing_value():
    assert bench_utils.target("t", "c", None, 1.0, at_most=True)["pass"] is False
    assert bench_utils.target("t", "c", 1.0, 1.0, at_most=True)["pass"] is True
    assert bench_utils.target("t", "c", 0.5, 1.0, at_most=False)["pass"] is False


# --------------------------------------------------------------------- bench_training
def test_bench_training_writes_a_row_per_provider(tmp_path):
    providers = ["dense", "pilot_reference", "naive", "pilot_cuda"]
    bench_training.main(["--device", "cpu", "--quick", "--warmup", "0", "--out", str(tmp_path),
                         "--name", "smoke", "--providers", ",".join(providers)])
    rows = _read_csv(tmp_path / "smoke.csv")
    assert [r["provider"] for r in rows] == providers
    for r in rows:
        assert (r["arch"], r["batch_size"], r["image_size"]) == ("resnet18", "4", "32")
        if r["provider"] == "pilot_cuda":
            assert r["status"].startswith("unavailable:"), r
            continue
        assert r["status"] == "ok", r
        for col in ("img_per_s", "iter_ms", "step_host_us", "step_bytes", "step_gbps", "rel_dense"):
            assert _positive(r[col]), (col, r)
        assert (int(r["n_tensors"]), int(r["n_reparam"])) == (62, 21)  # resnet18
    by = {r["provider"]: r for r in rows}
    n = int(by["dense"]["n_params"])
    assert int(by["dense"]["step_bytes"]) == 20 * n
    assert 20 * n < int(by["pilot_reference"]["step_bytes"]) < 44 * n
    assert float(by["dense"]["rel_dense"]) == 1.0
