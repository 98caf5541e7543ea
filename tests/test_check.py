"""``python -m pilot_kernels.check``: its ulp distance, its comparison against the
reference (which must catch a one-ulp difference), and a quick run on the CPU."""
from __future__ import annotations

import json
import math

import pytest
import torch

from pilot_kernels import check
from pilot_kernels.kernels import BACKENDS, reference, resolve_backend


def _next_up(x: torch.Tensor) -> torch.Tensor:
    return torch.nextafter(x, torch.full_like(x, math.inf))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_ulp_distance_counts_representable_steps(dtype):
    x = torch.tensor([1.0, -3.5, 1e-3, 0.0], dtype=dtype)
    assert check.ulp_distance(x, x).tolist() == [0, 0, 0, 0]
    assert check.ulp_distance(x, _next_up(x)).tolist() == [1, 1, 1, 1]
    assert check.ulp_distance(x, _next_up(_next_up(_next_up(x)))).tolist() == [3, 3, 3, 3]
    tiny = torch.tensor([torch.finfo(dtype).smallest_normal], dtype=dtype)
    sub = torch.nextafter(torch.zeros(1, dtype=dtype), tiny)  # the smallest subnormal
    assert check.ulp_distance(-sub, sub).item() == 2  # across zero: -s, 0, s
    assert check.ulp_distance(torch.tensor([-0.0], dtype=dtype), torch.tensor([0.0], dtype=dtype)).item() == 0


def test_ulp_distance_bfloat16_and_nan():
    a = torch.tensor([1.0, 2.0, math.nan, math.nan], dtype=torch.bfloat16)
    b = torch.tensor([1.0078125, 2.0, math.nan, 1.0], dtype=torch.bfloat16)  # 1 + 2^-7: bf16's next after 1
    assert check.ulp_distance(a, b).tolist() == [1, 0, 0, torch.iinfo(torch.int64).max]
    with pytest.raises(ValueError, match="one dtype"):
        check.ulp_distance(a, b.float())
    with pytest.raises(ValueError, match="ulp_distance takes"):
        check.ulp_distance(torch.ones(2, dtype=torch.int32), torch.ones(2, dtype=torch.int32))


SHAPES = [("w", (7, 5)), ("b", (5,)), ("c", (3, 2, 3, 3))]


def test_compare_with_reference_catches_one_ulp(monkeypatch):
    # a "backend" that is the reference, except that one element of x ends one ulp up
    import pilot_kernels.kernels.fused_cpu as fused_cpu

    def off_by_one_ulp(t, h, e, workspace):
        reference.pilot_step(t, h, e)
        t.xs[0].view(-1)[3] = _next_up(t.xs[0].view(-1)[3])

    monkeypatch.setattr(fused_cpu, "pilot_step", off_by_one_ulp)
    out = check.compare_with_reference("cpu", SHAPES, torch.float32, torch.device("cpu"), steps=2)
    assert out == {"max_ulps": 1, "worst": "w:x"}


def test_compare_with_reference_sees_a_missed_write(monkeypatch):
    # a "backend" that does not adopt what was written into x differs in x, m and w
    import pilot_kernels.kernels.fused_cpu as fused_cpu

    monkeypatch.setattr(fused_cpu, "pilot_step",
                        lambda t, h, e, workspace: reference.pilot_step(t, h._replace(adopt_writes=False), e))
    out = check.compare_with_reference("cpu", SHAPES, torch.float32, torch.device("cpu"), steps=2)
    assert out["max_ulps"] > 1000


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_against_the_reference_is_bitwise(dtype):
    # the Triton kernel (here in Triton's CPU interpreter, conftest) promises 0 ulps
    out = check.compare_with_reference("triton", SHAPES, dtype, torch.device("cpu"))
    assert out == {"max_ulps": 0, "worst": "-"}


def test_check_quick_run_on_cpu(tmp_path, capsys):
    path = tmp_path / "check.json"
    rc = check.main(["--device", "cpu", "--quick", "--dtypes", "float32", "--rounds", "2", "--json", str(path)])
    text = capsys.readouterr().out
    data = json.loads(path.read_text())
    assert rc == 0 and data["passed"] is True
    assert data["environment"]["torch"] == torch.__version__
    cpu = torch.device("cpu")
    runnable, needs_gpu = [], []
    for b in BACKENDS:
        try:
            resolve_backend(b, cpu)
            runnable.append(b)
        except ValueError:
            assert data["backends"][b]["status"].startswith("needs a GPU"), data["backends"][b]
            needs_gpu.append(b)
    if needs_gpu:
        line = next(l for l in text.splitlines() if l.startswith("needs a GPU: "))
        assert line.split(": ", 1)[1].split(" (")[0].split(", ") == needs_gpu, line
    else:
        assert "needs a GPU: " not in text
    checked = sorted(r["backend"] for r in data["correctness"])
    assert checked == sorted(b for b in runnable if b != "reference")
    for r in data["correctness"]:
        assert r["max_ulps"] == 0 and r["verdict"] == "bitwise", r
    speed = {r["provider"]: r for r in data["speed"]}
    assert {"reference", "torch_fused", "torch_foreach", "naive", "copy"} <= set(speed)
    for p, r in speed.items():
        assert r["status"] == "ok" and r["time_ms"] > 0 and r["gbps"] > 0 and r["launches"] >= 1, r
    assert speed["copy"]["pct_copy"] == pytest.approx(100.0)
