"""benchmarks/bench_ham.py in smoke mode: every provider steps, the results file holds the
environment, the rows and the target checks."""
from __future__ import annotations

import json

import torch

import bench_ham  # benchmarks/ is on pytest's pythonpath


def test_published_algorithm_is_the_mirror_step():
    """The benchmark's plain-torch rendering computes what HAM computes (zeros kept)."""
    gen = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(6, 5, generator=gen)) for _ in range(2)]
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    with torch.no_grad():
        ps[0][0] = 0
        qs[0][0] = 0
    for p, q in zip(ps, qs):
        p.grad = torch.randn(6, 5, generator=gen)
        p.grad[0] = 0                      # θ½ = 0 there: the zeros must stay
        q.grad = p.grad.clone()
    bench_ham.published_ham_step(torch.optim.SGD(ps, lr=0.1), 200.0, 1e-3)
    bench_ham.HAM(torch.optim.SGD(qs, lr=0.1), 200.0, 1e-3, backend="reference").step()
    for p, q in zip(ps, qs):
        torch.testing.assert_close(p, q, rtol=2e-6, atol=1e-7)
    assert (ps[0][0] == 0).all() and (qs[0][0] == 0).all()


def test_smoke_run_writes_results(tmp_path):
    assert bench_ham.main(["--device", "cpu", "--quick", "--out", str(tmp_path), "--name", "smoke",
                           "--providers", "torch_adamw_fused,ham_adamw,published"]) == 0
    data = json.loads((tmp_path / "smoke.json").read_text())
    assert {r["provider"] for r in data["rows"]} == {"torch_adamw_fused", "ham_adamw", "published"}
    assert data["environment"]["torch"] == torch.__version__
    assert len(data["targets"]["checks"]) == 3
