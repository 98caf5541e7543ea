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


# ====================================================================== matrix mode
import matrix as mx  # noqa: E402


def test_budgets_turn_into_whole_epochs_of_each_data_set():
    digits, mnist = mx.Cell("digits", 32, "resnet18", "short"), mx.Cell("mnist", 64, "resnet18", "short")
    assert digits.train_images() == 1437 and mnist.train_images() == 4000  # the 80/20 split of train.py
    assert (digits.epochs(), digits.steps()) == (6, 264) and (mnist.epochs(), mnist.steps()) == (2, 250)
    long_d, long_m = mx.Cell("digits", 32, "resnet18", "long"), mx.Cell("mnist", 32, "resnet18", "long")
    assert (long_d.epochs(), long_d.steps()) == (35, 1540) and (long_m.epochs(), long_m.steps()) == (12, 1500)
    assert mx.Cell("digits", 32, "resnet18", "smoke").epochs() == 1
    for c in mx.cells():
        assert c.steps() <= 300 if c.budget == "short" else c.steps() >= 1500


def test_cell_flags_read_an_imagefolder_for_torchvision_models_and_the_embedded_set_for_digits_cnn(tmp_path, monkeypatch):
    flags = mx.Cell("mnist", 64, "squeezenet1_1", "long").flags(tmp_path)
    assert not list(tmp_path.iterdir())  # naming the folder renders nothing
    assert flags[flags.index("--data-path") + 1] == str(tmp_path / "mnist-64px")
    assert [flags[flags.index(f) + 1] for f in ("--train-crop-size", "--val-resize-size", "--val-crop-size")] == ["64"] * 3
    assert flags[flags.index("-b") + 1] == "32" and flags[flags.index("--lr") + 1] == "0.05"
    assert "--epochs" not in flags and "--dataset" not in flags
    flags = mx.Cell("digits", 32, "digits_cnn", "short").flags(tmp_path)
    assert flags[:4] == ["--dataset", "digits", "--image-size", "32"] and "--data-path" not in flags


def test_jobs_train_dense_once_per_cell_and_seed_and_each_method_per_target():
    plan = mx.cells(["digits"], [32], ["digits_cnn", "resnet18"], ["short"])
    jobs = mx.jobs(plan, ["dense", "pilot", "spred"], [0.9, 0.98], [0, 1])
    assert len(jobs) == 2 * 2 * (1 + 2 * 2)
    assert sorted((j[0].arch, j[3]) for j in jobs if j[1] == "dense") == [
        ("digits_cnn", 0), ("digits_cnn", 1), ("resnet18", 0), ("resnet18", 1)]
    assert {(j[1], j[2]) for j in jobs if j[1] != "dense"} == {(m, t) for m in ("pilot", "spred") for t in (0.9, 0.98)}
    with pytest.raises(ValueError, match="unknown budgets"):
        mx.cells(budgets=["medium"])
    with pytest.raises(ValueError, match="unknown embedded dataset"):
        mx.cells(datasets=["cifar"])


def test_rendered_imagefolder_holds_the_embedded_split_as_rgb_pngs(tmp_path):
    import numpy as np
    import torch
    from PIL import Image

    from data import embedded_dataset, load_embedded

    root = mx.render_imagefolder("digits", 8, tmp_path)  # 8 px: digits' native size, no resize
    assert root == tmp_path / "digits-8px"
    index = {split: sorted((int(p.stem), int(p.parent.name)) for p in root.glob(f"{split}/*/*.png"))
             for split in ("train", "val")}
    assert len(index["train"]) == 1437 and len(index["val"]) == 360
    assert not {i for i, _ in index["train"]} & {i for i, _ in index["val"]}
    raw, labels = embedded_dataset("digits").load()
    for i, label in index["val"][:20]:
        img = Image.open(root / "val" / str(label) / f"{i:05d}.png")
        assert img.mode == "RGB" and img.size == (8, 8) and label == int(labels[i])
        assert np.array_equal(np.asarray(img)[..., 1], (raw[i, 0] * 255).round().to(torch.uint8).numpy())
    # The in-memory loader's split: its val images are these, standardized with these train images.
    train_idx = torch.tensor([i for i, _ in index["train"]])
    val_idx = torch.tensor([i for i, _ in index["val"]])
    mean, std = raw[train_idx].mean().item(), raw[train_idx].std().item()
    _, emb_val, _ = load_embedded("digits", 8, 1, 0)
    assert torch.equal(emb_val.labels.sort().values, labels[val_idx].sort().values)
    ours = ((raw[val_idx] - mean) / std).flatten(1)
    theirs = emb_val.images.flatten(1)
    assert torch.allclose(torch.sort(ours.sum(1)).values, torch.sort(theirs.sum(1)).values, atol=1e-5)
    stamp = (root / "val").stat().st_mtime_ns
    assert mx.render_imagefolder("digits", 8, tmp_path) == root and (root / "val").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match=">= 8"):
        mx.render_imagefolder("digits", 4, tmp_path)


def test_layerwise_rows_prune_the_same_fraction_of_every_weight_tensor(tmp_path, monkeypatch):
    import torch

    from data import load_embedded
    from models import build_model
    from pilot_kernels.init import splits_by_default

    torch.manual_seed(0)
    model = build_model("digits_cnn", 10)
    torch.save({"model": model.state_dict()}, tmp_path / "checkpoint.pt")
    cell = mx.Cell("digits", 8, "digits_cnn", "smoke")
    seen = []

    def top1(m, loader):
        seen.append({n: float((p == 0).float().mean()) for n, p in m.named_parameters() if splits_by_default(p)})
        return 50.0 + len(seen)

    monkeypatch.setattr(mx, "_top1", top1)
    rows = mx.layerwise_rows(cell, tmp_path / "checkpoint.pt", [0.5, 0.9], tmp_path)
    assert [r["target"] for r in rows] == [0.0, 0.5, 0.9] and [r["top1"] for r in rows] == [51.0, 52.0, 53.0]
    assert rows[2]["sparsity"] == pytest.approx(0.9, abs=1e-3)
    assert all(v == 0 for v in seen[0].values())
    for target, fractions in zip((0.5, 0.9), seen[1:]):  # every tensor, not just the large ones
        assert all(abs(f - target) < 0.02 for f in fractions.values()), fractions
    assert len(load_embedded("digits", 8, 1)[1]) == 360


def matrix_runs():
    """Two cells' run records: in the first spred wins at 0.9 and layer-wise magnitude at 0.98."""
    runs = []
    for cell, offset in (("digits32-digits_cnn-short", 0.0), ("digits32-resnet18-short", -10.0)):
        d = dense(0, 98.0 + offset, {0.9: (60.0 + offset, 0.9), 0.98: (20.0 + offset, 0.98)})
        d.update(cell=cell, layer_rows=[{"target": 0.0, "sparsity": 0.0, "top1": 98.0 + offset},
                                        {"target": 0.9, "sparsity": 0.9, "top1": 70.0 + offset},
                                        {"target": 0.98, "sparsity": 0.98, "top1": 95.0 + offset}])
        runs.append(d)
        for method, (a9, a98) in {"pilot": (80.0, 40.0), "spred": (90.0, 50.0), "l1": (85.0, 30.0)}.items():
            for t, a in ((0.9, a9), (0.98, a98)):
                r = aimed(method, t, 0, a + offset, reached=0.95 if (method, t) == ("l1", 0.98) else None)
                r["cell"] = cell
                runs.append(r)
    return runs


def test_matrix_summary_markdown_and_plot(tmp_path):
    plan = mx.cells(["digits"], [32], ["digits_cnn", "resnet18"], ["short"])
    cells = cm.summarize_matrix(matrix_runs(), plan, [0.9, 0.98])
    assert list(cells) == ["digits32-digits_cnn-short", "digits32-resnet18-short"]
    s = cells["digits32-resnet18-short"]["summary"]
    assert set(s) == {"pilot", "spred", "l1", "magnitude", "magnitude_layer", "dense"}
    assert [r["top1"] for r in s["magnitude_layer"]["rows"]] == [60.0, 85.0]
    assert [r["top1"] for r in s["magnitude"]["rows"]] == [50.0, 10.0]
    assert cm.matrix_best(s, 0.9) == (["spred"], 80.0) and cm.matrix_best(s, 0.98) == (["magnitude_layer"], 85.0)
    assert cells["digits32-resnet18-short"]["steps"] == 264
    data = {"args": {"preset": "slice", "seeds": [0], "jobs": 2}, "targets": [0.9, 0.98], "cells": cells,
            "runs": matrix_runs(), "failures": ["(cell, 'l1', 0.9, 1): l1 failed (exit 1): boom"], "wall_s": 600.0,
            "command": "python python/classification/compare_methods.py --matrix slice",
            "environment": {"torch": "2.x", "torchvision": "0.x", "git_commit": "abc"}, "env_line": "CPU: t, 2 cores"}
    md = cm.markdown_matrix(data)
    assert md.startswith("# Generalization matrix: `slice` (partial)")
    assert "`python python/classification/compare_methods.py --matrix slice` — 14 trainings, 2 at a time, 10.0 min; " \
           "the trainings' own wall times sum to 2.3 min;" in md
    assert "torch 2.x, torchvision 0.x" in md and "commit abc" in md
    assert "| digits 32 px | resnet18 | short (264 steps) | pilot | 97.0 | 70.0 | 30.0 |" in md
    assert "|  |  |  | spred | 97.0 | **80.0** | 40.0 |" in md
    assert "|  |  |  | dense + layer-wise magnitude | 88.0 | 60.0 | **85.0** |" in md
    assert "|  |  |  | l1 | 97.0 | 75.0 | 20.0 † |" in md
    assert "spred 2, l1 0, dense + global magnitude 0, dense + layer-wise magnitude 2" in md and "pilot 0" in md
    assert "| digits32-resnet18-short | pilot | 90% | 0 | 98.0 | 0.01 → 0.02 | 0.020 | 70.0 |" in md
    assert "1 training(s) failed" in md and "reused" not in md
    data["runs"][0]["reused"] = data["runs"][1]["reused"] = True
    assert "(2 of them reused from the records of an earlier run under --keep-runs)" in cm.markdown_matrix(data)
    cm.plot_matrix(str(tmp_path / "m.png"), cells, [0.9, 0.98], title="t")
    assert (tmp_path / "m.png").read_bytes()[:4] == b"\x89PNG"


def test_a_matrix_job_keeps_its_record_and_reuses_it_only_for_the_same_training(tmp_path, monkeypatch):
    calls = []

    def run_target(method, target, seed, epochs, workdir, dataset, targets, extra_flags):
        calls.append((method, tuple(targets), tuple(extra_flags)))
        return {"method": method, "target": target, "seed": seed, "top1": 50.0, "output_dir": "x"}

    monkeypatch.setattr(cm, "run_target", run_target)
    monkeypatch.setattr(mx, "layerwise_rows", lambda cell, ckpt, targets, root: [{"target": t} for t in [0.0, *targets]])
    cell = mx.Cell("digits", 32, "digits_cnn", "short")
    first = cm.run_matrix_job((cell, "dense", None, 0), tmp_path, tmp_path, [0.9])
    assert first["layer_rows"] == [{"target": 0.0}, {"target": 0.9}] and first["cell"] == cell.key
    assert (tmp_path / cell.key / "dense-seed0" / "record.json").is_file()
    assert cm.run_matrix_job((cell, "dense", None, 0), tmp_path, tmp_path, [0.9]) == {**first, "reused": True}
    assert len(calls) == 1
    cm.run_matrix_job((cell, "dense", None, 0), tmp_path, tmp_path, [0.9, 0.95])  # other targets: trained again
    pilot = cm.run_matrix_job((cell, "pilot", 0.9, 0), tmp_path, tmp_path, [0.9])
    assert len(calls) == 3 and "layer_rows" not in pilot and calls[-1][2][-2:] == ("--sweep-sparsities", "0")
    assert (tmp_path / cell.key / "pilot-S0.9-seed0" / "record.json").is_file()


def fake_matrix(monkeypatch, fail=()):
    records = matrix_runs()
    calls = []

    def job(j, workdir, root, targets):
        cell, method, target, seed = j
        calls.append((cell.key, method, target, seed))
        if (method, target) in fail:
            raise RuntimeError(f"{method} S={target} seed {seed} failed (exit 1): boom")
        return next(r for r in records if r["cell"] == cell.key and r["method"] == method and r["target"] == target)

    monkeypatch.setattr(cm, "run_matrix_job", job)
    monkeypatch.setattr(mx, "seconds_per_step", lambda arch, size: 0.5 if arch == "resnet18" else 0.1)
    monkeypatch.setattr(mx, "render_imagefolder", lambda name, size, root: Path(root) / f"{name}-{size}px")
    monkeypatch.setattr(cm, "environment", lambda kind: {"cpu": "fake cpu", "cpu_count": 2, "torch": "t"})
    return calls


def test_matrix_dry_run_prints_the_plan_and_trains_nothing(tmp_path, monkeypatch, capsys):
    calls = fake_matrix(monkeypatch)
    res = cm.main(["--matrix", "slice", "--archs", "digits_cnn,resnet18", "--jobs", "2", "--dry-run",
                   "--out", str(tmp_path)])
    assert calls == [] and res["jobs"] == 2 * 3 and not list(tmp_path.iterdir())
    out = capsys.readouterr().out
    assert "digits32-resnet18-short" in out and "6 trainings, 2 at a time" in out
    assert f"{3 * 264 * (0.5 + 0.1) / 2 / 3600:.1f} h" in out


def test_matrix_mode_writes_json_md_png_with_the_environment(tmp_path, monkeypatch, capsys):
    calls = fake_matrix(monkeypatch, fail={("l1", 0.98)})
    res = cm.main(["--matrix", "slice", "--archs", "digits_cnn,resnet18", "--methods", "dense,pilot,spred,l1",
                   "--target-sparsity", "0.9,0.98", "--jobs", "2", "--out", str(tmp_path), "--data-root", str(tmp_path)])
    assert len(calls) == 2 * (1 + 3 * 2) and {c[1] for c in calls if c[2] is None} == {"dense"}
    data = json.loads((tmp_path / "compare_methods_matrix_slice.json").read_text())
    assert data["environment"]["cpu"] == "fake cpu" and data["args"]["archs"] == ["digits_cnn", "resnet18"]
    assert len(data["runs"]) == 12 and len(data["failures"]) == 2
    assert "--data-path" in data["train_flags"]["digits32-resnet18-short"]
    assert (tmp_path / "compare_methods_matrix_slice.png").stat().st_size > 10_000
    md = (tmp_path / "compare_methods_matrix_slice.md").read_text()
    assert "2 training(s) failed" in md and "| digits 32 px | digits_cnn |" in md
    assert set(res["cells"]) == {"digits32-digits_cnn-short", "digits32-resnet18-short"}
    assert "[14/14]" in capsys.readouterr().out
    (tmp_path / "compare_methods_matrix_slice.md").unlink()
    cm.main(["--matrix", "slice", "--render-only", "--out", str(tmp_path)])
    assert (tmp_path / "compare_methods_matrix_slice.md").read_text() == md


@pytest.mark.parametrize("argv, message", [
    (["--matrix", "--epochs", "3"], "leave out --epochs"),
    (["--matrix", "--dataset", "mnist"], "leave out --epochs and --dataset"),
    (["--matrix", "--datasets", "cifar"], "--datasets: unknown ['cifar']"),
    (["--matrix", "--budgets", "medium"], "--budgets: unknown ['medium']"),
    (["--matrix", "--methods", "magnitude"], "--methods: unknown ['magnitude']"),
    (["--matrix", "--sizes", "4"], "at least 8 pixels"),
    (["--matrix", "nope"], "invalid choice"),
    (["--dry-run"], "--dry-run: only with --matrix"),
    (["--archs", "resnet18", "--target-sparsity", "0.9"], "--archs: only with --matrix"),
    (["--matrix", "smoke", "--render-only"], "compare_methods_matrix_smoke.json does not exist"),
])
def test_bad_matrix_arguments_say_what_to_fix(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit):
        cm.main([*argv, "--out", str(tmp_path)])
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_matrix_smoke_end_to_end(tmp_path):
    """The CI subset for real: squeezenet1_1 reads the rendered digits ImageFolder for one
    epoch, dense (both magnitude baselines) and pilot at 90%."""
    res = cm.main(["--matrix", "smoke", "--jobs", "2", "--out", str(tmp_path), "--data-root", str(tmp_path / "data")])
    assert res["failures"] == []
    (cell,) = res["cells"].values()
    s = cell["summary"]
    assert set(s) == {"pilot", "magnitude", "magnitude_layer", "dense"}
    for name in ("pilot", "magnitude", "magnitude_layer"):
        (row,) = s[name]["rows"]
        assert row["target"] == 0.9 and 0.0 <= row["top1"] <= 100.0
        assert row["reached"] == pytest.approx(0.9, abs=5e-3)
    assert (tmp_path / "data" / "digits-32px" / "val" / "9").is_dir()
    assert "| digits 32 px | squeezenet1_1 | smoke (44 steps) |" in (tmp_path / "compare_methods_matrix_smoke.md").read_text()
