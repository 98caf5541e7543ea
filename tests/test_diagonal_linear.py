"""Smoke and sanity test of python/diagonal_linear.py (the paper's diagonal linear network).

Runs the script's ``main`` in quick mode (a few hundred steps) into a temporary
directory: every method and schedule must be in the JSON with finite numbers, the plot
must be a PNG, and the one property that holds at any horizon must hold: spred's
balanced initialization (β = 0) never lets an entry change sign within the quick run,
while PILoT's (β = 1) does.
"""
from __future__ import annotations

import json
import math

import pytest

import diagonal_linear  # python/ is on pytest's pythonpath, as it is on the script's path


@pytest.fixture(scope="module")
def dl():
    return diagonal_linear


@pytest.fixture(scope="module")
def quick_run(dl, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("diagonal_linear")
    json_path = out_dir / "result.json"
    result = dl.main(["--quick", "--no-progress", "--out-dir", str(out_dir), "--json", str(json_path)])
    return result, json.loads(json_path.read_text()), out_dir


def _all_finite(values) -> bool:
    if isinstance(values, (list, tuple)):
        return all(_all_finite(v) for v in values)
    return math.isfinite(values)


def test_json_has_every_method_and_schedule(dl, quick_run):
    result, data, _ = quick_run
    assert data["config"]["quick"] is True
    assert data["config"]["steps"] == dl.QUICK["steps"]
    got = {(r["method"], r["schedule"]) for r in data["runs"]}
    assert got == {(m, s) for m in dl.METHODS for s in dl.DEFAULT_SCHEDULES}
    assert len(data["runs"]) == len(result["runs"])
    n_seeds = data["config"]["seeds"]
    for r in data["runs"]:
        assert len(r["rel_error"]) == len(r["sign_agreement"]) == len(r["sign_flips"]) == n_seeds
        assert len(r["curve_rel_error"]) == n_seeds
        assert all(len(c) == len(data["curve_steps"]) for c in r["curve_rel_error"])
    assert data["curve_steps"][0] == 0 and data["curve_steps"][-1] == data["config"]["steps"]


def test_numbers_are_finite(quick_run):
    _, data, _ = quick_run
    keys = ("rel_error", "sign_agreement", "sign_flips", "final_loss", "curve_rel_error",
            "rel_error_mean", "rel_error_std", "alpha_integral", "error_ratio_second_half")
    for r in data["runs"]:
        for k in keys:
            assert _all_finite(r[k]), (r["method"], r["schedule"], k)
        assert all(0.0 <= a <= 1.0 for a in r["sign_agreement"])
    assert _all_finite(data["lasso_reference"]["rel_error"])


def test_plot_is_a_png(quick_run):
    result, _, out_dir = quick_run
    png = out_dir / "diagonal_linear.png"
    assert result["plot"] == str(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_spred_never_flips_pilot_does(quick_run):
    _, data, _ = quick_run
    spred = [r for r in data["runs"] if r["method"] == "spred"]
    pilot = [r for r in data["runs"] if r["method"] == "pilot"]
    # β = 0: the split is exact (m = |w| in fp32), and gradient descent multiplies m² − w²
    # by (1 − 2αη)² − η²g², so it stays 0 and x·x0 stays > 0.
    for r in spred:
        assert r["init_imbalance_max"] == 0.0, r["schedule"]
        assert r["sign_flips"] == [0] * len(r["sign_flips"]), r["schedule"]
    # PILoT's β = 1 split is within fp32 rounding of m² − w² = 1.
    assert all(0 <= r["init_imbalance_max"] < 1e-6 for r in pilot)
    # β = 1 lets entries cross zero: the constant-α PILoT runs flip some in every seed.
    const = next(r for r in pilot if r["schedule"] == "constant")
    assert min(const["sign_flips"]) > 0


def test_deterministic(dl, tmp_path):
    argv = ["--steps", "60", "--period", "5", "--seeds", "2", "--no-plot", "--no-progress"]
    a, b = dl.main(argv), dl.main(argv)
    assert [r["rel_error"] for r in a["runs"]] == [r["rel_error"] for r in b["runs"]]
    assert [r["curve_rel_error"] for r in a["runs"]] == [r["curve_rel_error"] for r in b["runs"]]
