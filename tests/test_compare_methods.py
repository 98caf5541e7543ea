"""Tests of the target mode of ``python/classification/compare_methods.py``.

Most tests work on fabricated run records (what ``run_target`` returns) or on fake
``train.py`` outputs, so the summary, the winner rule, the table, the plot and the file
names are checked exactly and in well under a second each; one slow test trains for real.
"""
from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest

import compare_methods as cm

TARGETS = [0.9, 0.99]


def dense(seed, unpruned, at):
    """A dense run record; ``at`` maps target -> (top1, measured sparsity) of its sweep."""
    rows = [{"target": 0.0, "sparsity": 0.0, "top1": unpruned, "top5": 100.0, "loss": 0.1}]
    rows += [{"target": t, "sparsity": s, "top1": a, "top5": 99.0, "loss": 1.0} for t, (a, s) in sorted(at.items())]
    return {"method": "dense", "target": None, "seed": seed, "rows": rows, "top1_unpruned": unpruned,
            "wall_s": 10.0, "final_train_acc": 99.0, "arch": "digits_cnn", "val_images": 360}


def aimed(method, target, seed, top1, reached=None, unpruned=97.0):
    return {"method": method, "target": target, "seed": seed, "top1": top1, "top1_unpruned": unpruned,
            "reached": target if reached is None else reached, "wall_s": 10.0, "final_train_acc": 98.0,
            "alpha": [0.01, 0.02], "share": [0.5, 0.02], "arch": "digits_cnn", "val_images": 360}


def fabricated():
    runs = [dense(0, 98.0, {0.9: (60.0, 0.9), 0.99: (10.0, 0.99)}),
            dense(1, 97.0, {0.9: (50.0, 0.9001), 0.99: (12.0, 0.99)}),
            dense(2, 96.5, {0.9: (55.0, 0.9), 0.99: (9.0, 0.99)})]
    # pilot clearly best at 0.9 (worst seed 96 > every other best 95.5); at 0.99 pilot
    # leads on the mean but its range overlaps spred's.
    for seed, (p9, s9, l9, p99, s99, l99) in enumerate([(96.0, 95.0, 94.0, 90.0, 91.0, 80.0),
                                                        (97.0, 95.5, 93.0, 92.0, 88.0, 82.0),
                                                        (96.5, 94.5, 94.5, 91.0, 89.0, 81.0)]):
        runs += [aimed("pilot", 0.9, seed, p9), aimed("spred", 0.9, seed, s9), aimed("l1", 0.9, seed, l9),
                 aimed("pilot", 0.99, seed, p99), aimed("spred", 0.99, seed, s99),
                 aimed("l1", 0.99, seed, l99, reached=0.97)]
    return runs


def row(summary, name, target):
    return next(r for r in summary[name]["rows"] if math.isclose(r["target"], target))


# ---------------------------------------------------------------------- summary
def test_summary_means_ranges_and_reached_per_method_and_target():
    s = cm.summarize_target(fabricated(), TARGETS)
    assert list(s) == ["pilot", "spred", "l1", "magnitude", "dense"]
    r = row(s, "pilot", 0.9)
    assert r["n"] == 3 and r["seeds"] == [0, 1, 2]
    assert r["top1"] == pytest.approx(96.5) and (r["min"], r["max"]) == (96.0, 97.0)
    assert r["reached"] == pytest.approx(0.9) and r["top1_unpruned"] == pytest.approx(97.0)
    assert r["share_end"] == pytest.approx(0.02) and row(s, "magnitude", 0.9)["share_end"] is None
    assert row(s, "l1", 0.99)["reached"] == pytest.approx(0.97)
    # magnitude pruning reads the dense sweeps at each target, measured sparsity included
    m = row(s, "magnitude", 0.9)
    assert m["top1"] == pytest.approx(55.0) and (m["min"], m["max"]) == (50.0, 60.0)
    assert m["reached"] == pytest.approx((0.9 + 0.9001 + 0.9) / 3) and m["reached_max"] == 0.9001
    assert row(s, "magnitude", 0.99)["top1"] == pytest.approx(31 / 3)
    d = s["dense"]
    assert d["top1"] == pytest.approx((98.0 + 97.0 + 96.5) / 3) and (d["min"], d["max"]) == (96.5, 98.0)
    assert d["seeds"] == [0, 1, 2]


def test_share_end_is_the_last_logged_share_averaged_over_seeds():
    runs = [aimed("pilot", 0.9, 0, 95.0), aimed("pilot", 0.9, 1, 95.0), aimed("pilot", 0.9, 2, 95.0)]
    runs[0]["share"] = [0.5, 0.1]
    runs[1]["share"] = [0.5, 0.04, None]  # a line without a share (e.g. a resumed run's first) is skipped
    runs[2]["share"] = []
    assert row(cm.summarize_target(runs, [0.9]), "pilot", 0.9)["share_end"] == pytest.approx(0.07)


def test_summary_counts_only_the_seeds_that_ran():
    runs = [r for r in fabricated() if not (r["method"] == "spred" and r["target"] == 0.99 and r["seed"] == 1)]
    s = cm.summarize_target(runs, TARGETS)
    r = row(s, "spred", 0.99)
    assert r["n"] == 2 and r["seeds"] == [0, 2] and r["top1"] == pytest.approx(90.0)
    assert row(s, "spred", 0.9)["n"] == 3


def test_a_dense_sweep_without_the_target_is_an_error_naming_it():
    runs = [dense(0, 98.0, {0.9: (60.0, 0.9)})]
    with pytest.raises(ValueError, match="no sweep row at 0.99"):
        cm.summarize_target(runs, TARGETS)


# ---------------------------------------------------------------------- winners
def test_winner_is_clear_only_when_the_ranges_do_not_overlap():
    s = cm.summarize_target(fabricated(), TARGETS)
    w9, w99 = cm.target_winners(s, TARGETS, val_images=360)
    assert w9["best"] == ["pilot"] and w9["runner_up"] == "spred" and w9["clear"] is True
    assert w9["margin"] == pytest.approx(1.5) and w9["margin_images"] == pytest.approx(5.4)
    assert w99["best"] == ["pilot"] and w99["runner_up"] == "spred" and w99["clear"] is False
    assert w99["margin"] == pytest.approx(5 / 3)


def test_a_tie_and_a_single_seed_are_never_called_clear():
    runs = [dense(0, 98.0, {0.9: (60.0, 0.9)}), aimed("pilot", 0.9, 0, 95.0), aimed("spred", 0.9, 0, 95.0),
            aimed("l1", 0.9, 0, 90.0)]
    s = cm.summarize_target(runs, [0.9])
    (w,) = cm.target_winners(s, [0.9])
    assert w["best"] == ["pilot", "spred"] and w["runner_up"] == "l1" and w["clear"] is False
    assert "margin_images" not in w  # no image count given
    runs = [dense(0, 98.0, {0.9: (60.0, 0.9)}), aimed("pilot", 0.9, 0, 95.0)]
    (w,) = cm.target_winners(cm.summarize_target(runs, [0.9]), [0.9])
    assert w["best"] == ["pilot"] and w["clear"] is False and "one seed" in cm._winner_line(w)


# ---------------------------------------------------------------------- table and plot
def data_for(runs, failures=(), dataset=None, seeds=(0, 1, 2)):
    s = cm.summarize_target(runs, TARGETS)
    return {"args": {"seeds": list(seeds), "epochs": 7, "methods": ["dense", "l1", "spred", "pilot"],
                     "dataset": dataset, "jobs": 2},
            "targets": TARGETS, "summary": s, "winners": cm.target_winners(s, TARGETS, 360), "runs": runs,
            "failures": list(failures), "wall_s": 125.0, "env_line": "CPU: test, 2 cores"}


def test_markdown_reports_every_method_target_reached_sparsity_and_winner():
    md = cm.markdown_target(data_for(fabricated()))
    assert "--target-sparsity 0.9,0.99 --seeds 0,1,2 --epochs 7`" in md and "--dataset" not in md
    assert "| pilot | β=1, α steered to S | 96.5 [96.0–97.0] | 91.0 [90.0–92.0] |" in md
    assert "| magnitude pruning (of dense) | dense SGD, pruned one-shot to S | 55.0 [50.0–60.0] | 10.3 [9.0–12.0] |" in md
    assert "| dense, unpruned | reference: the dense trainings, not pruned | 97.2 [96.5–98.0] | 97.2 [96.5–98.0] |" in md
    # reached sparsity table: l1 at 99% stopped at 97% and is flagged
    assert "| l1 | 90.00% / 97.0 / 0.020 | 97.00% † / 97.0 / 0.020 |" in md
    assert "| magnitude pruning (of dense) | 90.00% / 97.2 / – | 99.00% / 97.2 / – |" in md
    assert "† more than half a point less sparse than asked: l1 at 99% (lowest seed 97.00%)" in md
    assert "- 90%: **pilot** 96.5 [96.0–97.0], ahead of spred (95.0) by 1.50 points ≈ 5.4 val images; clear" in md
    assert "- 99%: **pilot** 91.0 [90.0–92.0], ahead of spred (89.3) by 1.67 points" in md
    assert "not clear: the seeds' min–max ranges overlap" in md
    assert "2.1 min (21 trainings, 2 at a time)" in md
    assert "failed" not in md


def test_markdown_marks_partial_cells_and_lists_failures():
    runs = [r for r in fabricated() if not (r["method"] == "spred" and r["target"] == 0.99 and r["seed"] == 1)]
    md = cm.markdown_target(data_for(runs, failures=["('spred', 0.99, 1): spred S=0.99 seed 1 failed (exit 1)"],
                                     dataset="mnist"))
    assert "90.0 [89.0–91.0] (n=2)" in md
    assert "1 training(s) failed" in md and "spred S=0.99 seed 1 failed" in md
    assert md.startswith("# Accuracy at a target sparsity on mnist") and "--dataset mnist`" in md


def test_plot_writes_a_png(tmp_path):
    path = tmp_path / "t.png"
    cm.plot_target(str(path), cm.summarize_target(fabricated(), TARGETS), TARGETS, title="t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


# ---------------------------------------------------------------------- one training: command and contract
def fake_train(tmp_path, monkeypatch, target_entry, returncode=0):
    """subprocess.run replaced by a writer of train.py's outputs; returns the commands seen."""
    seen = []

    def run(cmd, **kw):
        seen.append(cmd)
        assert kw["env"]["OMP_NUM_THREADS"] == "1"
        out = Path(cmd[cmd.index("--output-dir") + 1])
        out.mkdir(parents=True, exist_ok=True)
        sweep = {"arch": "digits_cnn", "rows": [{"target": 0.0, "sparsity": 0.0, "top1": 97.0, "top5": 100.0},
                                                {"target": 0.9, "sparsity": 0.9, "top1": 40.0, "top5": 90.0}]}
        if "--target-sparsity" in cmd and target_entry is not None:
            sweep["target"] = target_entry
        (out / "sweep.json").write_text(json.dumps(sweep))
        lines = [{"epoch": e, "train": {"acc": 90.0 + e}, "val": {"top1": 95.0, "images": 360},
                  "alpha": 0.01 * 2 ** e, "share": 0.4 / (e + 1)} for e in range(3)]
        (out / "metrics.jsonl").write_text("\n".join(map(json.dumps, lines)) + "\n")
        return subprocess.CompletedProcess(cmd, returncode, "stdout tail", "stderr tail")

    monkeypatch.setattr(cm.subprocess, "run", run)
    return seen


def test_run_target_passes_the_target_and_dataset_and_reads_the_contract(tmp_path, monkeypatch):
    seen = fake_train(tmp_path, monkeypatch, {"sparsity": 0.95, "top1": 93.5, "top1_unpruned": 96.0, "reached": 0.9502})
    rec = cm.run_target("spred", 0.95, 2, 5, tmp_path, "mnist", TARGETS)
    cmd = seen[-1]
    assert cmd[cmd.index("--method") + 1] == "spred" and cmd[cmd.index("--target-sparsity") + 1] == "0.95"
    assert cmd[cmd.index("--dataset") + 1] == "mnist" and cmd[cmd.index("--seed") + 1] == "2"
    assert cmd[cmd.index("--epochs") + 1] == "5" and "--alpha" not in cmd
    assert (rec["top1"], rec["top1_unpruned"], rec["reached"]) == (93.5, 96.0, 0.9502)
    assert rec["alpha"] == [0.01, 0.02, 0.04] and rec["share"] == pytest.approx([0.4, 0.2, 0.4 / 3])
    assert rec["val_images"] == 360 and rec["arch"] == "digits_cnn"

    rec = cm.run_target("dense", None, 0, 5, tmp_path, None, TARGETS)
    cmd = seen[-1]
    assert "--target-sparsity" not in cmd and "--dataset" not in cmd
    assert cmd[cmd.index("--sweep-sparsities") + 1] == "0,0.9,0.99"
    assert rec["top1_unpruned"] == 97.0 and len(rec["rows"]) == 2


def test_run_target_without_the_contract_entry_says_what_is_missing(tmp_path, monkeypatch):
    fake_train(tmp_path, monkeypatch, None)
    with pytest.raises(RuntimeError, match="no complete \"target\" entry"):
        cm.run_target("pilot", 0.9, 0, 1, tmp_path, None, TARGETS)
    fake_train(tmp_path, monkeypatch, {"sparsity": 0.9, "top1": None, "top1_unpruned": 10.0, "reached": 0.0})
    with pytest.raises(RuntimeError, match="no accuracy at S"):
        cm.run_target("pilot", 0.9, 0, 1, tmp_path, None, TARGETS)
    fake_train(tmp_path, monkeypatch, {}, returncode=2)
    with pytest.raises(RuntimeError, match="exit 2"):
        cm.run_target("pilot", 0.9, 0, 1, tmp_path, None, TARGETS)


# ---------------------------------------------------------------------- the command line
def fake_runs(monkeypatch, fail=()):
    """run_target answered from fabricated(); jobs in ``fail`` raise."""
    records = {(r["method"], r["target"], r["seed"]): r for r in fabricated()}
    calls = []

    def run_target(method, target, seed, epochs, workdir, dataset, targets):
        calls.append((method, target, seed, epochs, dataset, tuple(targets)))
        if (method, target, seed) in fail:
            raise RuntimeError(f"{method} S={target} seed {seed} failed (exit 1): boom")
        return records[(method, target, seed)]

    monkeypatch.setattr(cm, "run_target", run_target)
    monkeypatch.setattr(cm, "environment", lambda kind: {"cpu": "fake cpu", "cpu_count": 2})
    return calls


def test_target_mode_trains_each_method_at_each_target_and_dense_once_per_seed(tmp_path, monkeypatch, capsys):
    calls = fake_runs(monkeypatch)
    res = cm.main(["--target-sparsity", "0.99,0.9", "--epochs", "3", "--jobs", "2", "--out", str(tmp_path)])
    assert len(calls) == 3 * (3 * 2 + 1)
    assert sorted(c[:3] for c in calls if c[0] == "dense") == [("dense", None, s) for s in range(3)]
    assert {c[1] for c in calls if c[0] != "dense"} == {0.9, 0.99}  # sorted, deduplicated targets
    assert all(c[3] == 3 and c[4] is None and c[5] == (0.9, 0.99) for c in calls)
    for ext in ("json", "md", "png"):
        assert (tmp_path / f"compare_methods_target.{ext}").is_file()
    data = json.loads((tmp_path / "compare_methods_target.json").read_text())
    assert data["targets"] == [0.9, 0.99] and data["environment"]["cpu"] == "fake cpu"
    assert data["args"]["dataset"] is None and data["failures"] == [] and len(data["runs"]) == 21
    assert res["winners"][0]["best"] == ["pilot"]
    out = capsys.readouterr().out
    assert "[21/21]" in out and "min left" in out and "pilot S=0.9 seed 1: top-1 97.00% at S" in out
    # --render-only rewrites the table from the json alone
    (tmp_path / "compare_methods_target.md").unlink()
    cm.main(["--render-only", "--target-sparsity", "0.5", "--out", str(tmp_path)])
    assert "| pilot |" in (tmp_path / "compare_methods_target.md").read_text()


def test_a_failed_training_is_left_out_and_reported(tmp_path, monkeypatch):
    fake_runs(monkeypatch, fail={("spred", 0.99, 1)})
    res = cm.main(["--target-sparsity", "0.9,0.99", "--dataset", "mnist", "--out", str(tmp_path)])
    assert len(res["failures"]) == 1 and "spred S=0.99 seed 1" in res["failures"][0]
    assert not (tmp_path / "compare_methods_target.json").exists()
    md = (tmp_path / "compare_methods_target_mnist.md").read_text()
    assert "(n=2)" in md and "1 training(s) failed" in md


def test_methods_subset_without_dense_has_no_baseline_rows(tmp_path, monkeypatch):
    calls = fake_runs(monkeypatch)
    res = cm.main(["--target-sparsity", "0.9", "--methods", "pilot", "--seeds", "0", "--out", str(tmp_path)])
    assert [c[:3] for c in calls] == [("pilot", 0.9, 0)]
    assert set(res["summary"]) == {"pilot"}
    assert (tmp_path / "compare_methods_target.png").is_file()


@pytest.mark.parametrize("argv, message", [
    (["--target-sparsity", "0.9,1"], "strictly between 0 and 1"),
    (["--target-sparsity", "0.9,abc"], "comma-separated fractions"),
    (["--target-sparsity", "0.9", "--methods", "pilot_init"], "constant-α ablation"),
    (["--target-sparsity", "0.9", "--methods", "pilot,magnitude"], "unknown methods ['magnitude']"),
    (["--dataset", "../x"], "letters, digits"),
    (["--jobs", "0"], "--jobs 0"),
])
def test_bad_arguments_say_what_to_fix(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit):
        cm.main([*argv, "--out", str(tmp_path)])
    assert message in capsys.readouterr().err


def test_render_only_without_results_says_so(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cm.main(["--render-only", "--target-sparsity", "0.9", "--dataset", "mnist", "--out", str(tmp_path)])
    assert "compare_methods_target_mnist.json does not exist" in capsys.readouterr().err


def test_file_names_carry_the_dataset_unless_it_is_the_default():
    assert cm._stem(Path("o"), "target", None) == Path("o/compare_methods_target")
    assert cm._stem(Path("o"), "target", "digits") == Path("o/compare_methods_target")
    assert cm._stem(Path("o"), "embedded", "mnist") == Path("o/compare_methods_embedded_mnist")


# ---------------------------------------------------------------------- for real
@pytest.mark.slow
def test_target_mode_end_to_end(tmp_path):
    """Real trainings (1 epoch, 1 seed): train.py's --target-sparsity output reaches the table."""
    res = cm.main(["--target-sparsity", "0.9", "--seeds", "0", "--epochs", "1", "--methods", "dense,pilot",
                   "--jobs", "2", "--out", str(tmp_path)])
    assert res["failures"] == []
    assert set(res["summary"]) == {"pilot", "magnitude", "dense"}
    (pilot,) = res["summary"]["pilot"]["rows"]
    assert pilot["target"] == 0.9 and pilot["n"] == 1 and 0.0 <= pilot["top1"] <= 100.0
    assert pilot["reached"] == pytest.approx(0.9, abs=5e-3)  # the export is pruned to S
    (mag,) = res["summary"]["magnitude"]["rows"]
    assert mag["reached"] == pytest.approx(0.9, abs=5e-3)
    (run,) = [r for r in res["runs"] if r["method"] == "pilot"]
    assert len(run["alpha"]) == 1 and run["share"][0] is not None
    md = (tmp_path / "compare_methods_target.md").read_text()
    assert "| pilot |" in md and "| magnitude pruning (of dense) |" in md and "- 90%: **" in md
