"""End-to-end tests of ``python/classification/train.py`` (CPU, small: 1–2 epochs of tiny models).

Every run writes into ``tmp_path``; nothing is downloaded.  The ImageFolder tests write
real JPEG files with PIL at test time; the default data is scikit-learn's embedded
digits.
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

# python/classification is on pytest's pythonpath (pyproject.toml), as it is on a
# script's path when train.py runs.
ROOT = Path(__file__).resolve().parents[1]
PYDIR = ROOT / "python" / "classification"

import train  # noqa: E402

# Subprocesses (torchrun workers, a process killed mid-write) import the same modules.
SUBPROCESS_ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PYDIR), os.environ.get("PYTHONPATH", "")])}
import checkpoint as ckpt  # noqa: E402
from data import ImageLoadError, SyntheticLoader, pil_loader_naming_path
from engine import NonFiniteLossError
from methods import lr_lambda_factory  # noqa: E402
from models import DigitsCNN, build_model  # noqa: E402
from report import chance_top1, choose_export  # noqa: E402

from pilot_kernels import PILoT  # noqa: E402
from pilot_kernels.schedules import prunable_share  # noqa: E402
from pilot_kernels.sparsity import sparsity_report  # noqa: E402

# Short runs on the embedded digits: few epochs, a short sweep, no bars.
FAST = ["--no-progress", "--print-freq", "0", "--seed", "0"]
SHORT_SWEEP = ["--sweep-sparsities", "0,0.5,0.9"]
# A few steps of the default CNN on one random batch (no sweep): for what needs a run, not accuracy.
TINY = ["--synthetic", "--arch", "digits_cnn", "--synthetic-steps", "3", "-b", "8", "--no-progress", "--print-freq", "0"]


def fast_flags(extra) -> list[str]:
    """FAST, plus the short sweep where the run sweeps (train.py refuses flags without effect)."""
    return FAST + ([] if {"--synthetic", "--no-sweep"} & set(extra) else SHORT_SWEEP)


def run_train(tmp_path: Path, *extra: str, out: str = "run") -> dict:
    return train.main([*fast_flags(extra), "--output-dir", str(tmp_path / out), *extra])


def run_tiny(tmp_path: Path, *extra: str, out: str = "run") -> dict:
    return train.main([*TINY, "--output-dir", str(tmp_path / out), *extra])


def write_imagefolder(root: Path, classes=("cat", "dog"), per_split=(6, 3), size=40) -> Path:
    """A tiny ImageFolder of real JPEGs: class ``i`` is a bright square at a place of its own."""
    from PIL import Image
    import numpy as np

    rng = np.random.default_rng(0)
    for split, n in zip(("train", "val"), per_split):
        for ci, cls in enumerate(classes):
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for k in range(n):
                img = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
                o = 4 + 16 * ci
                img[o:o + 14, o:o + 14] = 230
                Image.fromarray(img).save(d / f"{k}.jpg", format="JPEG")
    return root


def params_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---------------------------------------------------------------------- data
def test_imagefolder_jpeg_end_to_end(tmp_path):
    """A torchvision model on real JPEGs.  One epoch on 12 images leaves it guessing (50%
    on 2 classes; 2-3 epochs, or dense, or lr 0.02, measured alike), so the run sweeps
    but exports nothing, and says why."""
    data = write_imagefolder(tmp_path / "data")
    res = run_train(tmp_path, "--data-path", str(data), "--arch", "resnet18", "--epochs", "1", "-b", "4", "-j", "0",
                    "--train-crop-size", "32", "--val-resize-size", "36", "--val-crop-size", "32")
    out = tmp_path / "run"
    assert res["history"][0]["train"]["images"] == 12  # 2 classes x 6 (three full batches of 4)
    assert res["history"][0]["val"]["images"] == 6
    for name in ("checkpoint.pt", "metrics.jsonl", "sweep.json", "sweep.png"):
        assert (out / name).is_file(), name
    assert "no better than chance" in res["export_skipped"]
    assert not (out / "sparse_model.pt").exists() and not (out / "sparse_model.json").exists()
    tv_model = build_model("resnet18", num_classes=2)  # the checkpoint's model is the unmodified torchvision one
    tv_model.load_state_dict(ckpt.load(str(out / "checkpoint.pt"))["model"], strict=True)


def test_corrupt_image_error_names_the_file(tmp_path):
    data = write_imagefolder(tmp_path / "data", per_split=(2, 1))
    bad = data / "train" / "dog" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg" + os.urandom(64))
    with pytest.raises(ImageLoadError, match="broken.jpg"):
        pil_loader_naming_path(str(bad))
    with pytest.raises(ImageLoadError, match=re.escape(str(bad))):
        run_train(tmp_path, "--data-path", str(data), "--arch", "resnet18", "--epochs", "1", "-b", "8", "-j", "0",
                  "--train-crop-size", "32", "--val-resize-size", "36", "--val-crop-size", "32")


def test_synthetic_throughput_mode(tmp_path):
    res = run_train(tmp_path, "--synthetic", "--arch", "digits_cnn", "--synthetic-steps", "3", "--epochs", "1", "-b", "16")
    assert res["history"][0]["train"]["images"] == 48
    assert "sweep" not in res  # accuracy on random data means nothing


def test_dataset_flag_picks_the_embedded_set_and_resume_keeps_it(tmp_path):
    """--dataset mnist (4,000 train / 1,000 val images); --resume auto takes it from the
    checkpoint, and its default image size (None: the dataset's) stays None."""
    flags = ["--dataset", "mnist", "--image-size", "8", "--epochs", "2", "--no-sweep", "-b", "250"]
    first = run_train(tmp_path, *flags, "--stop-after", "1")
    assert first["history"][0]["train"]["images"] == 4000 and first["history"][0]["val"]["images"] == 1000
    second = run_train(tmp_path, "--resume", "auto", "--no-sweep")
    assert second["args"].dataset == "mnist" and second["history"][-1]["val"]["images"] == 1000
    plain = train.resolve_args(train.parse_args(["--output-dir", ""]), world_size=1)
    assert (plain.dataset, plain.image_size) == ("digits", None)


# ---------------------------------------------------------------------- embedded default
def test_embedded_default_shortened_says_it_did_not_reach_its_target(tmp_path, capsys):
    """The no-flag job (embedded digits, PILoT, trained for 97% sparsity), shortened to two
    epochs: logs with the share at 97%, the sweep with 97% added.  Two epochs cannot make
    a model that keeps its accuracy at 97%, so the run says so in its last lines (target,
    top-1 there, unpruned) and exports the sparsest sweep point within 1 point instead,
    recording which and why."""
    res = run_train(tmp_path, "--epochs", "2")
    out = tmp_path / "run"
    args = res["args"]
    assert (args.method, args.arch, args.beta, args.alpha_schedule) == ("pilot", "digits_cnn", 1.0, "target")
    assert (args.target_sparsity, args.export_sparsity, args.alpha) == (0.97, 0.97, 1e-3)
    assert isinstance(res["optimizer"], PILoT)
    text = capsys.readouterr().out
    assert "target sparsity 97% (α steered, τ=0.02) [the no-flag job's default; --target-sparsity off" in text
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [0, 1]
    rec = lines[-1]
    for key in ("train", "val", "alpha", "l1", "sparsity", "lr", "share"):
        assert key in rec
    assert set(rec["sparsity"]) == {"0", "0.0001", "0.001", "0.01"}
    assert rec["train"]["acc"] > 40 and rec["val"]["top1"] > 50  # two epochs already learn
    assert abs(rec["l1"] - float(res["optimizer"].l1_norm())) < 1e-3 * rec["l1"]
    # TargetSparsity after epoch 1: a fresh model is far from prunable (share > τ) and the
    # accuracy rose from 0: α·1.5.
    assert lines[0]["alpha"] == pytest.approx(1.5 * args.alpha, rel=1e-12)

    sweep = json.loads((out / "sweep.json").read_text())
    rows = sweep["rows"]
    assert [r["target"] for r in rows] == [0.0, 0.5, 0.9, 0.97]
    target, pick = sweep["target"], sweep["best_within_1pt"]
    at = rows[-1]
    assert target == {"sparsity": 0.97, "top1": at["top1"], "top1_unpruned": rows[0]["top1"],
                      "reached": at["sparsity"], "met": False}
    assert at["top1"] < rows[0]["top1"] - 1 and pick["target"] < 0.97
    assert sweep["export"]["sparsity"] == pick["target"] and "more than 1 point below" in sweep["export"]["reason"]
    meta = json.loads((out / "sparse_model.json").read_text())
    assert (meta["target_sparsity"], meta["reason"]) == (pick["target"], sweep["export"]["reason"])
    fresh = DigitsCNN()
    fresh.load_state_dict(torch.load(out / "sparse_model.pt", weights_only=True), strict=True)
    assert sparsity_report(fresh).sparsity == pytest.approx(pick["sparsity"], abs=1e-12)  # the sweep's pruning
    assert text.strip().splitlines()[-2:] == [
        f"target sparsity 97% not reached: top-1 {at['top1']:.2f}% at {100 * at['sparsity']:.2f}% sparse, unpruned "
        f"{rows[0]['top1']:.2f}% ({at['top1'] - rows[0]['top1']:+.2f} points, more than 1 below unpruned)",
        f"exported instead: {100 * pick['sparsity']:.2f}% sparse at {pick['top1']:.2f}% top-1, the sparsest sweep "
        "point within 1 point of unpruned"]


def test_embedded_default_with_the_target_off_is_the_adaptive_run(tmp_path):
    """--target-sparsity off: the job as before, Algorithm 1's adaptive α and the export
    at the sparsest sweep point within 1 point.  Its default α needs more than two epochs
    to get above chance on the validation set (10% after two, seed 0), and nothing would
    be exported: a tenth of it does (87.5%)."""
    res = run_train(tmp_path, "--epochs", "2", "--alpha", "2e-3", "--target-sparsity", "off")
    out = tmp_path / "run"
    args = res["args"]
    assert (args.alpha_schedule, args.target_sparsity, args.export_sparsity) == ("adaptive", None, None)
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert "share" not in lines[-1]
    # Algorithm 1 after epoch 1 of T = 2: accuracy rose from a_0 = 0, L1 > K and k <= T/2: α·δ.
    assert lines[0]["alpha"] == pytest.approx(args.alpha * args.delta, rel=1e-9)
    sweep = json.loads((out / "sweep.json").read_text())
    assert [r["target"] for r in sweep["rows"]] == [0.0, 0.5, 0.9] and "target" not in sweep
    meta = json.loads((out / "sparse_model.json").read_text())
    assert meta["target_sparsity"] == sweep["best_within_1pt"]["target"]
    fresh = DigitsCNN()
    fresh.load_state_dict(torch.load(out / "sparse_model.pt", weights_only=True), strict=True)
    assert sparsity_report(fresh).sparsity == pytest.approx(res["export_measured_sparsity"], abs=1e-12)
    assert res["export_measured_sparsity"] == pytest.approx(meta["target_sparsity"], abs=1e-3)


@pytest.mark.parametrize("method", ["dense", "pilot", "spred", "l1"])
def test_each_method_end_to_end(tmp_path, method):
    # The default α of pilot and spred keeps two epochs near chance (nothing would be
    # exported): a tenth of it learns.
    alpha = {"pilot": ["--alpha", "2e-3"], "spred": ["--alpha", "1e-3"]}.get(method, [])
    res = run_train(tmp_path, "--method", method, "--epochs", "2", "--export-sparsity", "0.5", *alpha)
    rec = res["history"][-1]
    assert rec["train"]["acc"] > 40, rec
    assert uses_pilot(method) == isinstance(res["optimizer"], PILoT)
    if method == "spred":
        assert res["args"].beta == 0.0 and res["args"].alpha_schedule == "constant"
    sd = torch.load(tmp_path / "run" / "sparse_model.pt", weights_only=True)
    fresh = DigitsCNN()
    fresh.load_state_dict(sd, strict=True)
    assert sparsity_report(fresh).sparsity == pytest.approx(0.5, abs=1e-4)


def uses_pilot(method: str) -> bool:
    return method in ("pilot", "spred")


# ---------------------------------------------------------------------- --target-sparsity
# An awkward S that is not in SHORT_SWEEP: the run adds it to the sweep and, two epochs
# being enough to keep top-1 within 1 point at 40%, exports at it.
TARGET = 0.4


@pytest.mark.parametrize("method", ["pilot", "spred", "l1", "dense"])
def test_target_sparsity_exports_exactly_s_and_reports_it(tmp_path, method, capsys):
    """Two epochs with --target-sparsity 0.4: the controller multiplies α by grow = 1.5
    after epoch 1 (a fresh model is far from prunable: share > τ, and the accuracy rose
    from 0), every metrics line carries the share at S, the export is S sparse by
    measurement (dense: not reached, and said so), and sweep.json's "target" entry has
    top-1 at S next to unpruned."""
    alpha = {"pilot": ["--alpha", "2e-3"], "spred": ["--alpha", "1e-3"]}.get(method, [])
    res = run_train(tmp_path, "--method", method, "--epochs", "2", "--target-sparsity", str(TARGET), *alpha)
    args, out = res["args"], tmp_path / "run"
    assert args.export_sparsity == TARGET and TARGET in args.sweep
    assert args.alpha_schedule == ("target" if method != "dense" else "adaptive")  # dense: no α at all
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(isinstance(r["share"], float) for r in lines)
    if method == "dense":
        assert [r["alpha"] for r in lines] == [0.0, 0.0]
    else:
        assert lines[0]["alpha"] == pytest.approx(1.5 * args.alpha, rel=1e-12)
        assert res["optimizer"].param_groups[0]["alpha"] == lines[-1]["alpha"]  # l1: SGD's group holds it
    # The share logged is that of the final weights (prunable_share of the tensors with ndim >= 2).
    weights = [p for p in res["model"].parameters() if p.ndim >= 2]
    assert lines[-1]["share"] == pytest.approx(prunable_share(weights, TARGET).item(), rel=1e-12)

    sd = torch.load(out / "sparse_model.pt", weights_only=True)
    fresh = DigitsCNN()
    fresh.load_state_dict(sd, strict=True)
    measured = sparsity_report(fresh).sparsity
    target = json.loads((out / "sweep.json").read_text())["target"]
    row = next(r for r in res["sweep"] if r["target"] == TARGET)
    assert target["top1_unpruned"] > chance_top1(10, 360)[1]  # above chance: the export happened
    last = capsys.readouterr().out.strip().splitlines()
    if method == "dense":
        # Two epochs of SGD without α lose more than 1 point at 40% (and 50%): the run says
        # so and exports the unpruned model, the sparsest sweep point within 1 point.
        assert target == {"sparsity": TARGET, "top1": row["top1"], "top1_unpruned": res["sweep"][0]["top1"],
                          "reached": row["sparsity"], "met": False}
        assert res["export"]["sparsity"] == 0.0 and measured == pytest.approx(res["sweep"][0]["sparsity"], abs=1e-12)
        assert last[-2].startswith("target sparsity 40% not reached: ") and last[-1].startswith("exported instead: ")
        return
    assert abs(measured - TARGET) <= 1 / 60688  # round(S·n) of the 60,688 weights are exact zeros
    assert target == {"sparsity": TARGET, "top1": row["top1"], "top1_unpruned": res["sweep"][0]["top1"],
                      "reached": pytest.approx(measured, abs=1e-12), "met": True}
    assert last[-1].startswith(f"target sparsity 40%: top-1 {row['top1']:.2f}% at {100 * measured:.2f}% sparse, "
                               f"unpruned {res['sweep'][0]['top1']:.2f}%")


def test_synthetic_target_mode_alpha0_from_the_steps(tmp_path, capsys):
    """Off the embedded data the target mode starts at α0 = 0.1 / (lr · optimizer steps)
    (2 epochs x 3 steps here), says so, and a resumed run keeps that α0 from its
    checkpoint (steps per epoch may differ then: it is not recomputed)."""
    run_tiny(tmp_path, "--epochs", "2", "--target-sparsity", "0.5", "--stop-after", "1")
    ck = ckpt.load(str(tmp_path / "run" / "checkpoint.pt"))
    assert ck["args"]["alpha"] == pytest.approx(0.1 / (0.1 * 2 * 3), rel=1e-12)
    assert "α0 = 0.1 / (lr 0.1 x 2 epochs x 3 steps) = 0.167 (give --alpha to choose it)" in capsys.readouterr().out
    res = run_tiny(tmp_path, "--resume", "auto")
    assert res["args"].alpha == ck["args"]["alpha"] and res["args"].alpha_schedule == "target"
    assert "α0 = " not in capsys.readouterr().out


@pytest.mark.parametrize("method", ["pilot", "l1"])
def test_target_sparsity_resume_restores_the_controller(tmp_path, method):
    """Two epochs == one epoch + --resume auto + one: α, the controller's best accuracy,
    last share and step count, bit for bit (l1: SGD's group carries α and the controller's
    progress through the optimizer's state_dict)."""
    flags = ["--method", method, "--epochs", "3", "--target-sparsity", "0.9", "--no-sweep", "--image-size", "8"]
    full = run_train(tmp_path, *flags, out="full")
    run_train(tmp_path, *flags, "--stop-after", "2", out="split")
    saved = ckpt.load(str(tmp_path / "split" / "checkpoint.pt"))["alpha_scheduler"]
    assert saved["last_epoch"] == 2 and saved["best_acc"] > 0 and "_measure" not in saved
    second = run_train(tmp_path, "--resume", "auto", "--no-sweep", out="split")
    assert second["args"].target_sparsity == 0.9 and second["args"].alpha_schedule == "target"
    assert [r["epoch"] for r in second["history"]] == [2]
    assert_same_training_state(full, second)
    assert second["history"][-1]["share"] == full["history"][-1]["share"]
    a, b = (ckpt.load(str(tmp_path / d / "checkpoint.pt"))["alpha_scheduler"] for d in ("full", "split"))
    assert a == b and a["last_epoch"] == 3


def test_pilot_param_groups_and_weight_decay(tmp_path):
    res = run_train(tmp_path, "--epochs", "1", "--x-weight-decay", "1e-4", "--no-sweep")
    groups = res["optimizer"].param_groups
    assert len(groups) == 2
    assert groups[0]["weight_decay"] == 1e-4 and all(p.ndim >= 2 for p in groups[0]["params"])
    assert groups[1]["weight_decay"] == 0.0 and all(p.ndim < 2 for p in groups[1]["params"])


def test_amp_fp16_gradscaler_trains_like_fp32(tmp_path):
    """fp16 autocast with a GradScaler follows the fp32 run step for step (measured: train
    losses agree to 1e-4 relative, 2.0235 vs 2.0236 and 1.4582 vs 1.4580).  fp16
    convolutions are slow on CPU: a few synthetic steps exercise the GradScaler path."""
    flags = ["--synthetic", "--arch", "digits_cnn", "--synthetic-steps", "4", "-b", "16", "--epochs", "2",
             "--channels-last", "--alpha", "1e-3"]
    fp32 = run_train(tmp_path, *flags, out="fp32")
    fp16 = run_train(tmp_path, *flags, "--amp", "fp16", out="fp16")
    for a, b in zip(fp16["history"], fp32["history"]):
        assert a["train"]["loss"] == pytest.approx(b["train"]["loss"], rel=2e-3), (a["train"], b["train"])
        assert a["val"]["loss"] == pytest.approx(b["val"]["loss"], rel=2e-3), (a["val"], b["val"])
        assert abs(a["train"]["acc"] - b["train"]["acc"]) <= 100 / 64  # at most one of the 64 images
    assert fp16["history"][-1]["train"]["loss"] < 0.8 * fp16["history"][0]["train"]["loss"]  # and it learns
    assert ckpt.load(str(tmp_path / "fp16" / "checkpoint.pt"))["scaler"] is not None


def test_preset_and_explicit_flags():
    parser = train.get_args_parser()
    a = train.resolve_args(parser.parse_args(["--preset", "imagenet-pilot", "--data-path", "/x"]), world_size=1)
    assert (a.arch, a.epochs, a.batch_size, a.momentum, a.lr_warmup_epochs) == ("resnet50", 100, 256, 0.875, 5)
    assert (a.method, a.beta, a.alpha, a.l1_threshold, a.delta) == ("pilot", 1.0, 7e-6, 60000.0, 1.01)
    assert a.lr == pytest.approx(0.256) and a.label_smoothing == 0.1
    assert a.x_weight_decay == 0.000030517578125 / 2 and a.wd == 0.0
    b = train.resolve_args(parser.parse_args(["--preset", "imagenet-pilot", "--data-path", "/x", "-b", "64",
                                              "--alpha", "2e-5"]), world_size=8)
    assert b.lr == pytest.approx(0.256 * 64 * 8 / 256) and b.alpha == 2e-5
    with pytest.raises(SystemExit):
        train.resolve_args(parser.parse_args(["--preset", "imagenet-pilot"]), world_size=1)


# ---------------------------------------------------------------------- checkpoints
def assert_same_training_state(a: dict, b: dict) -> None:
    """Two runs ended in exactly the same place: parameters, buffers, every optimizer
    state entry, α and lr, and the last epoch's validation metrics."""
    assert params_equal(a["model"], b["model"])
    oa, ob = a["optimizer"], b["optimizer"]
    for pa, pb in zip(a["model"].parameters(), b["model"].parameters()):
        assert oa.state[pa].keys() == ob.state[pb].keys()
        for key, value in oa.state[pa].items():
            other = ob.state[pb][key]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, key
    for ga, gb in zip(oa.param_groups, ob.param_groups):
        assert ga["lr"] == gb["lr"] and ga.get("alpha") == gb.get("alpha")
    assert a["history"][-1]["val"] == b["history"][-1]["val"]


def test_two_epochs_equal_one_resume_one(tmp_path):
    full = run_train(tmp_path, "--epochs", "2", "--no-sweep", out="full")
    first = run_train(tmp_path, "--epochs", "2", "--stop-after", "1", "--no-sweep", out="split")
    assert not first["finished"] and len(first["history"]) == 1
    second = run_train(tmp_path, "--epochs", "2", "--resume", "auto", "--no-sweep", out="split")
    assert [r["epoch"] for r in second["history"]] == [1]
    assert_same_training_state(full, second)
    lines = (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(ln)["epoch"] for ln in lines] == [0, 1]


def test_resume_with_workers_is_exact_and_workers_do_not_change_the_run(tmp_path):
    """2 epochs in the main process (-j 0) == 1 epoch with 2 workers + resume with 2
    workers + 1 epoch: augmentation is seeded per sample from (seed, epoch, index)."""
    small = ["--image-size", "8", "--epochs", "2", "--no-sweep"]
    full = run_train(tmp_path, *small, "-j", "0", out="full")
    run_train(tmp_path, *small, "-j", "2", "--stop-after", "1", out="split")
    second = run_train(tmp_path, *small, "-j", "2", "--resume", "auto", out="split")
    assert [r["epoch"] for r in second["history"]] == [1]
    assert_same_training_state(full, second)


def test_imagefolder_resume_with_default_workers_is_exact(tmp_path):
    data = write_imagefolder(tmp_path / "data")
    flags = ["--data-path", str(data), "--arch", "resnet18", "--epochs", "2", "-b", "4", "--train-crop-size", "32",
             "--val-resize-size", "36", "--val-crop-size", "32", "--no-sweep"]
    full = run_train(tmp_path, *flags, out="full")
    assert full["args"].workers >= 1  # the default for an ImageFolder
    run_train(tmp_path, *flags, "--stop-after", "1", out="split")
    second = run_train(tmp_path, *flags, "--resume", "auto", out="split")
    assert_same_training_state(full, second)


def test_resume_with_more_epochs_applies_and_says_so(tmp_path, capsys):
    run_tiny(tmp_path, "--epochs", "2", "--stop-after", "1")
    res = run_tiny(tmp_path, "--epochs", "3", "--resume", "auto")
    assert "applies from here: --epochs 3 (the run had 2)" in capsys.readouterr().out
    assert [r["epoch"] for r in res["history"]] == [1, 2]
    args, iters = res["args"], 3
    schedule = lr_lambda_factory(args.lr_warmup_epochs * iters, 3 * iters)  # the cosine over 3 epochs
    assert res["history"][-1]["lr"] == pytest.approx(args.lr * schedule(3 * iters - 1), rel=1e-12)


def test_new_run_refuses_an_earlier_runs_output_dir(tmp_path):
    run_tiny(tmp_path, "--epochs", "1")
    out = tmp_path / "run"
    before = (out / "checkpoint.pt").read_bytes()
    with pytest.raises(SystemExit, match=r"holds an earlier run \(checkpoint.pt, metrics.jsonl; its checkpoint is at "
                                         r"epoch 1 of 1\). Continue it with --resume auto, start over with --overwrite"):
        run_tiny(tmp_path, "--epochs", "1", "--seed", "1")
    assert (out / "checkpoint.pt").read_bytes() == before
    (out / "sweep.json").write_text("{}")  # a result of the earlier run that the new one would not rewrite
    run_tiny(tmp_path, "--epochs", "1", "--seed", "1", "--overwrite")
    assert not (out / "sweep.json").exists()
    assert [json.loads(ln)["epoch"] for ln in (out / "metrics.jsonl").read_text().splitlines()] == [0]
    assert ckpt.load(str(out / "checkpoint.pt"))["args"]["seed"] == 1


def test_nonfinite_loss_stops_the_run(tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"the training loss became NaN or inf in epoch 1/1, iterations "
                                                 r"\d+-\d+ of 12 .*no checkpoint was written. Lower --lr"):
        run_tiny(tmp_path, "--method", "dense", "--lr", "1e30", "--synthetic-steps", "12", "--epochs", "1")
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_nonfinite_loss_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    run_tiny(tmp_path, "--epochs", "2", "--stop-after", "1")
    out = tmp_path / "run"
    before, metrics = (out / "checkpoint.pt").read_bytes(), (out / "metrics.jsonl").read_text()
    clean = SyntheticLoader.__iter__

    def poisoned(self):  # a corrupt batch
        for images, targets in clean(self):
            yield images * float("nan"), targets

    monkeypatch.setattr(SyntheticLoader, "__iter__", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"in epoch 2/2, iterations 1-3 of 3 .* the checkpoint of epoch 1 is "
                                                 r"kept in .*checkpoint.pt"):
        run_tiny(tmp_path, "--epochs", "2", "--resume", "auto")
    assert (out / "checkpoint.pt").read_bytes() == before
    assert (out / "metrics.jsonl").read_text() == metrics


def test_export_skips_a_model_without_weights(tmp_path):
    """--export-sparsity 0.999999 of 60,688 weights prunes them all: nothing is exported."""
    res = run_train(tmp_path, "--epochs", "1", "--alpha", "2e-3", "--export-sparsity", "0.999999")
    assert "prunes every weight" in res["export_skipped"]
    assert not (tmp_path / "run" / "sparse_model.pt").exists()
    assert "prunes every weight" in json.loads((tmp_path / "run" / "sweep.json").read_text())["export_skipped"]


def test_export_skips_a_model_at_chance(tmp_path):
    """A run whose unpruned model guesses exports nothing, and the sparsest-within-1-point
    rule never picks a point without weights."""
    res = run_train(tmp_path, "--image-size", "8", "--epochs", "1", "--method", "spred", "--alpha", "5",
                    "--sweep-sparsities", "0,0.5,0.999999")
    top1 = res["sweep"][0]["top1"]
    assert top1 <= chance_top1(10, 360)[1], top1
    assert "no better than chance" in res["export_skipped"] and res["export_sparsity"] is None
    assert not (tmp_path / "run" / "sparse_model.pt").exists()
    assert json.loads((tmp_path / "run" / "sweep.json").read_text())["best_within_1pt"]["sparsity"] < 1.0


def test_a_target_run_at_chance_says_so_last(tmp_path):
    """train.py as a script: a --target-sparsity run whose unpruned model guesses exports
    nothing, ends on the reason (after the target line) and keeps its checkpoint and
    sweep.json ("export": null).  It exits 0: its outputs are complete, and a comparison
    of methods (compare_methods.py) records a collapsed run as a result."""
    out = tmp_path / "run"
    cmd = [sys.executable, str(PYDIR / "train.py"), *FAST, "--image-size", "8", "--epochs", "1", "--method", "spred",
           "--alpha", "5", "--target-sparsity", "0.9", "--sweep-sparsities", "0,0.5", "--output-dir", str(out)]
    env = {**SUBPROCESS_ENV, "PYTHONPATH": os.pathsep.join([str(ROOT), SUBPROCESS_ENV["PYTHONPATH"]])}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=str(ROOT))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    last = proc.stdout.strip().splitlines()[-2:]
    assert last[0].startswith("target sparsity 90% not reached: top-1 ") and "more than 1 below" not in last[0]
    assert last[1].startswith("no sparse_model.pt: the unpruned model is no better than chance (top-1 ")
    sweep = json.loads((out / "sweep.json").read_text())
    assert sweep["export"] is None and "no better than chance" in sweep["export_skipped"]
    assert sweep["target"]["met"] is False and sweep["rows"][0]["top1"] <= chance_top1(10, 360)[1]
    assert (out / "checkpoint.pt").is_file() and not (out / "sparse_model.pt").exists()


def test_choose_export_picks_s_the_sparsest_within_one_point_or_nothing():
    """The export rule on hand-made sweep rows (10 classes, 360 images: chance bound 14.7%)."""
    def rows(*points):
        return [{"target": t, "sparsity": s, "top1": a, "top5": 100.0, "loss": 0.0} for t, s, a in points]

    good = rows((0.0, 0.0, 95.0), (0.5, 0.5, 94.5), (0.9, 0.9, 94.2), (0.97, 0.97, 60.0))
    met = choose_export(good, 10, 360, target=0.9, export_sparsity=0.9)
    assert (met["sparsity"], met["skipped"], met["target"]["met"], met["target"]["reached"]) == (0.9, None, True, 0.9)
    missed = choose_export(good, 10, 360, target=0.97, export_sparsity=0.97)
    assert (missed["sparsity"], missed["pick"]["target"], missed["target"]["met"]) == (0.9, 0.9, False)
    assert missed["target"]["top1"] == 60.0 and "more than 1 point below" in missed["reason"]
    only_dense = choose_export(rows((0.0, 0.0, 95.0), (0.9, 0.9, 40.0)), 10, 360, target=0.9)
    assert (only_dense["sparsity"], only_dense["target"]["met"]) == (0.0, False)  # the unpruned model, said so
    assert choose_export(good, 10, 360)["sparsity"] == 0.9
    assert choose_export(good, 10, 360, export_sparsity=0.97)["sparsity"] == 0.97  # asked for, without a target
    guess = choose_export(rows((0.0, 0.0, 14.0), (0.9, 0.9, 13.0)), 10, 360, target=0.9)
    assert guess["sparsity"] is None and "no better than chance" in guess["skipped"] and not guess["target"]["met"]
    empty = choose_export(rows((0.0, 1.0, 50.0), (0.9, 1.0, 50.0)), 10, 360, target=0.9)
    assert empty["sparsity"] is None and "no nonzero weight" in empty["skipped"] and not empty["target"]["met"]
    assert chance_top1(10, 360) == (10.0, pytest.approx(100 * (0.1 + 3 * math.sqrt(0.09 / 360))))


def test_failed_checkpoint_write_keeps_previous(tmp_path, monkeypatch):
    """A write that dies midway (partial bytes, then an error) leaves the previous
    checkpoint in place and loadable, and no temporary file behind."""
    out = tmp_path / "run"
    run_train(tmp_path, "--epochs", "2", "--stop-after", "1", "--no-sweep")
    before = (out / "checkpoint.pt").read_bytes()
    real_save = torch.save

    def dying_save(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        f.seek(0)
        f.truncate(100)  # what a kill in the middle of the write leaves
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(ckpt.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        run_train(tmp_path, "--epochs", "2", "--resume", "auto", "--no-sweep")
    monkeypatch.setattr(ckpt.torch, "save", real_save)
    assert (out / "checkpoint.pt").read_bytes() == before
    assert ckpt.load(str(out / "checkpoint.pt"))["epoch"] == 0
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]
    res = run_train(tmp_path, "--epochs", "2", "--resume", "auto", "--no-sweep")  # and it resumes
    assert [r["epoch"] for r in res["history"]] == [1]


def test_kill_during_checkpoint_write_subprocess(tmp_path):
    """SIGKILL of a process in the middle of writing a checkpoint (it stops inside
    the write) leaves the old checkpoint intact."""
    out = tmp_path / "ck"
    out.mkdir()
    good = {"epoch": 0, "w": torch.arange(10.0)}
    ckpt.atomic_save(good, str(out / "checkpoint.pt"))
    script = textwrap.dedent(f"""
        import os, signal, sys, torch
        import checkpoint as ckpt
        real = torch.save
        def save_then_die(obj, f, *a, **k):
            real(obj, f, *a, **k)
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)   # killed before the rename
        ckpt.torch.save = save_then_die
        ckpt.atomic_save({{"epoch": 1, "w": torch.zeros(10)}}, {str(out / "checkpoint.pt")!r})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120, env=SUBPROCESS_ENV)
    assert proc.returncode == -9, proc.stderr.decode()
    loaded = ckpt.load(str(out / "checkpoint.pt"))
    assert loaded["epoch"] == 0 and torch.equal(loaded["w"], good["w"])


# ---------------------------------------------------------------------- iterative pruning
@pytest.mark.parametrize("method,rewind", [("pilot", "lr"), ("pilot", "weight"), ("dense", "lr"), ("l1", "weight")])
def test_iterative_pruning_keeps_pruned_entries_zero(tmp_path, method, rewind):
    res = run_train(tmp_path, "--method", method, "--epochs", "1", "--cycles", "2", "--prune-rate", "0.5",
                    "--rewind", rewind, *(["--rewind-epoch", "0"] if rewind == "weight" else []), "--no-sweep")
    masks, model, opt = res["masks"], res["model"], res["optimizer"]
    assert [r["cycle"] for r in res["history"]] == [0, 1, 2]
    assert all(r["pruned_nonzero"] == 0 for r in res["history"][1:])
    assert masks.sparsity() == pytest.approx(0.75, abs=1e-4)
    # PILoT keeps the zeros through its own step (m = w = 0 is a fixed point); only
    # dense/l1 mask gradients and weights.
    assert masks.enforce == (method in ("dense", "l1"))
    params = dict(model.named_parameters())
    for name, keep in masks.keep.items():
        p = params[name]
        assert torch.count_nonzero(p[~keep]) == 0, name
        if isinstance(opt, PILoT):
            for key in ("m", "w", "momentum_m", "momentum_w"):
                assert torch.count_nonzero(opt.state[p][key][~keep]) == 0, (name, key)
    assert res["history"][-1]["train"]["acc"] > 20  # it still trains after pruning
    assert sparsity_report(model, opt if isinstance(opt, PILoT) else None).sparsity >= 0.75 - 1e-4


def test_weight_rewinding_resets_survivors(tmp_path):
    """With weight rewinding to initialization, one cycle with lr = 0 leaves the model at
    the initial weights times the mask."""
    res = run_train(tmp_path, "--method", "dense", "--epochs", "1", "--cycles", "1", "--prune-rate", "0.5",
                    "--rewind", "weight", "--rewind-epoch", "0", "--lr", "0", "--wd", "0", "--no-sweep")
    torch.manual_seed(0)
    init = DigitsCNN()
    params = dict(init.named_parameters())
    for name, keep in res["masks"].keep.items():
        assert torch.equal(dict(res["model"].named_parameters())[name], params[name] * keep)


# ---------------------------------------------------------------------- DDP
def run_ddp(tmp_path, record: str, flags: list[str]) -> None:
    """``train.main(flags)`` on 2 gloo processes (torchrun); each rank saves its model to
    ``rank<r>.pt`` and ``record`` (a Python expression of ``res``) to ``rank<r>.json``."""
    helper = tmp_path / "ddp_run.py"
    helper.write_text(textwrap.dedent(f"""
        import gc, os, sys, json, torch
        import train
        res = train.main(sys.argv[1:])
        rank = os.environ["RANK"]
        torch.save(res["model"].state_dict(), os.path.join({str(tmp_path)!r}, f"rank{{rank}}.pt"))
        with open(os.path.join({str(tmp_path)!r}, f"rank{{rank}}.json"), "w") as f:
            json.dump({record}, f)
        del res  # the DDP model holds the process group: free it before interpreter shutdown
        gc.collect()
    """))
    env = {**SUBPROCESS_ENV, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(helper),
           *flags, "--output-dir", str(tmp_path / "run"), "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=str(ROOT))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.slow
def test_ddp_two_process_gloo_identical_parameters(tmp_path):
    run_ddp(tmp_path, '{"val": res["history"][-1]["val"], "train": res["history"][-1]["train"], '
                      '"alpha": res["history"][-1]["alpha"], "sweep": res.get("sweep")}',
            [*fast_flags(()), "--epochs", "1", "-b", "32"])
    a = torch.load(tmp_path / "rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ma, mb = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    for m in (ma, mb):  # local wall-clock timings differ
        del m["train"]["time_s"], m["train"]["images_per_s"]
    assert ma == mb  # all-reduced metrics and the sweep agree on both ranks
    assert ma["val"]["images"] == 360 and ma["train"]["images"] == 2 * 22 * 32
    # Only rank 0 wrote files, and they are complete.
    out = tmp_path / "run"
    assert ckpt.load(str(out / "checkpoint.pt"))["world_size"] == 2
    assert len(ckpt.load(str(out / "checkpoint.pt"))["rng"]) == 2
    assert (out / "sparse_model.pt").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["l1"])
def test_ddp_target_sparsity_ranks_take_the_same_decisions(tmp_path, method):
    """2 gloo processes, --target-sparsity: the controller reads the all-reduced train
    accuracy and the share of the replicated weights, so every rank holds the same α
    after every epoch (l1: SGD's group α, read by each rank's α·sign(x) step)."""
    run_ddp(tmp_path, '{"history": [{k: r[k] for k in ("alpha", "share", "val")} | {"acc": r["train"]["acc"]} '
                      'for r in res["history"]], "target": res.get("target")}',
            [*fast_flags(()), "--method", method, "--epochs", "3", "-b", "32", "--image-size", "8",
             "--target-sparsity", "0.9"])
    a = torch.load(tmp_path / "rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert ra == rb
    assert ra["history"][0]["alpha"] == pytest.approx(1.5 * 5e-4, rel=1e-12)  # grew after epoch 1 on both
    assert ra["target"]["sparsity"] == 0.9 and abs(ra["target"]["reached"] - 0.9) <= 1 / 60688
    assert json.loads((tmp_path / "run" / "sweep.json").read_text())["target"] == ra["target"]


# ---------------------------------------------------------------------- benchmark script
def test_compare_methods_smoke(tmp_path):
    import compare_methods

    res = compare_methods.main(["--seeds", "0", "--epochs", "1", "--methods", "dense,pilot", "--out", str(tmp_path)])
    assert set(res["summary"]) == {"dense", "magnitude", "pilot"}
    for ext in ("json", "md", "png"):
        assert (tmp_path / f"compare_methods_embedded.{ext}").is_file()
    assert "| pilot |" in (tmp_path / "compare_methods_embedded.md").read_text()


# ---------------------------------------------------------------------- FSDP2
# Runs train.run under torchrun and writes each rank's metrics; with FSDP it also
# evaluates uneven validation shards (100 vs 40 images) in lockstep while the process
# group is alive.
_DIST_HELPER = """
import gc, json, os, sys, torch
import train
from dist import init_distributed, shutdown

args = train.parse_args(sys.argv[1:])
info = init_distributed(args.device, need_group=args.fsdp)
args = train.resolve_args(args, info.world_size)
try:
    res = train.run(args, info)
    rec = {{"history": res["history"], "sweep": res.get("sweep"), "fsdp": res["fsdp"]}}
    for h in rec["history"]:  # local wall-clock timings differ
        del h["time_s"], h["train"]["time_s"], h["train"]["images_per_s"]
    if res.get("full_model") is not None:
        from torch.utils.data import DataLoader, Subset
        from data import load_digits_split
        from engine import evaluate
        _, val_set, _ = load_digits_split(16, 1)
        part = range(0, 100) if info.rank == 0 else range(100, 140)
        loader = DataLoader(Subset(val_set, list(part)), batch_size=32)
        crit = torch.nn.CrossEntropyLoss()
        rec["lockstep"] = evaluate(res["model"], crit, loader, res["args"], info, lockstep=True)
        rec["lockstep_ref"] = evaluate(res["full_model"], crit, loader, res["args"], info)
    with open(os.path.join(os.environ["HELPER_OUT"], f"rank{{info.rank}}.json"), "w") as f:
        json.dump(rec, f)
finally:
    # The FSDP model holds the process group: free both while the interpreter is alive (a
    # gloo group destroyed during interpreter shutdown can abort the process, SIGABRT).
    res = None
    gc.collect()
    shutdown()
"""


def torchrun_train(tmp_path: Path, out: str, *flags: str) -> list[dict]:
    """``train.py`` on 2 CPU processes (gloo); returns each rank's metrics."""
    helper = tmp_path / "dist_helper.py"
    if not helper.exists():
        helper.write_text(_DIST_HELPER.format())  # {{ }} unescape
    results = tmp_path / f"{out}_ranks"
    results.mkdir()
    env = {**SUBPROCESS_ENV, "OMP_NUM_THREADS": "1", "HELPER_OUT": str(results)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(helper),
           *fast_flags(flags), "--device", "cpu", "-b", "32", "--output-dir", str(tmp_path / out), *flags]
    # A collective out of step (e.g. an FSDP forward on one rank only) hangs: the timeout catches it.
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env, cwd=str(ROOT))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads((results / f"rank{r}.json").read_text()) for r in (0, 1)]


def checkpoints_equal(a: dict, b: dict) -> None:
    """Two checkpoints hold the same state (all but the command line) — exactly."""
    assert a.keys() == b.keys()
    for key in a:
        if key != "args":
            _assert_tree_equal(a[key], b[key], key)


def _assert_tree_equal(x, y, where: str) -> None:
    if isinstance(x, torch.Tensor):
        assert isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y), where
    elif isinstance(x, dict):
        assert x.keys() == y.keys(), where
        for k in x:
            _assert_tree_equal(x[k], y[k], f"{where}.{k}")
    elif isinstance(x, (list, tuple)):
        assert len(x) == len(y), where
        for i, (u, v) in enumerate(zip(x, y)):
            _assert_tree_equal(u, v, f"{where}[{i}]")
    else:
        assert x == y, (where, x, y)


# Two epochs of the no-flag job (PILoT for 97%) with twice its α0: above chance, so it exports.
TWO_EPOCHS = ("--epochs", "2", "--alpha", "2e-3")


@pytest.fixture(scope="module")
def fsdp_two_process(tmp_path_factory):
    """2 epochs of PILoT with --fsdp on 2 CPU processes, with the sweep and export."""
    tmp = tmp_path_factory.mktemp("fsdp")
    return tmp, torchrun_train(tmp, "full", "--fsdp", *TWO_EPOCHS)


@pytest.mark.slow
def test_fsdp_two_process_gloo(fsdp_two_process):
    tmp, ranks = fsdp_two_process
    r0, r1 = ranks
    assert r0["fsdp"] and r1["fsdp"]
    assert r0["history"] == r1["history"] and r0["sweep"] == r1["sweep"]  # metrics, l1, α and sparsity agree
    assert r0["history"][-1]["val"]["images"] == 360 and r0["history"][-1]["train"]["images"] == 2 * 22 * 32
    assert [row["target"] for row in r0["sweep"]] == [0.0, 0.5, 0.9, 0.97]  # the no-flag job's S added
    # Uneven validation shards (4 vs 2 batches) in lockstep: no hang, exact sums.
    for r in ranks:
        assert r["lockstep"] == r0["lockstep"] and r["lockstep"]["images"] == 140
        assert r["lockstep"]["top1"] == r["lockstep_ref"]["top1"]
        assert r["lockstep"]["loss"] == pytest.approx(r["lockstep_ref"]["loss"], rel=1e-6)

    out = tmp / "full"
    state = ckpt.load(str(out / "checkpoint.pt"))
    assert state["world_size"] == 2 and len(state["rng"]) == 2 and state["epoch"] == 1
    assert set(state["model"]) == set(DigitsCNN().state_dict())  # full, plain tensors
    assert state["optimizer"]["param_groups"][0]["params"][0] == "features.0.weight"  # keyed by name
    m = state["optimizer"]["state"]["features.0.weight"]["m"]
    assert type(m) is torch.Tensor and m.shape == (16, 1, 3, 3) and m.dtype == torch.float32
    for name in ("metrics.jsonl", "sweep.json", "sweep.png", "sparse_model.json"):
        assert (out / name).is_file(), name
    fresh = DigitsCNN()
    fresh.load_state_dict(torch.load(out / "sparse_model.pt", weights_only=True), strict=True)
    meta = json.loads((out / "sparse_model.json").read_text())
    assert sparsity_report(fresh).sparsity == pytest.approx(meta["sparsity"], abs=1e-12)
    assert meta["world_size"] == 2

    # The same run with DDP: the same weights (same reduction of the gradients, an
    # elementwise step, the same α from the share at 97%, all-reduced over the shards).
    ddp = torchrun_train(tmp, "ddp", *TWO_EPOCHS, "--no-sweep")
    ddp_state = ckpt.load(str(tmp / "ddp" / "checkpoint.pt"))
    for key, value in ddp_state["model"].items():
        torch.testing.assert_close(state["model"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    for h_ddp, h_fsdp in zip(ddp[0]["history"], r0["history"]):
        assert h_ddp["alpha"] == pytest.approx(h_fsdp["alpha"], rel=1e-12)
        assert h_ddp["l1"] == pytest.approx(h_fsdp["l1"], rel=1e-5)
        assert h_ddp["val"]["top1"] == pytest.approx(h_fsdp["val"]["top1"], abs=0.3)


@pytest.mark.slow
def test_fsdp_two_process_resume_is_exact(fsdp_two_process):
    """2 epochs == 1 epoch + resume + 1 epoch, under FSDP2 on 2 processes."""
    tmp, ranks = fsdp_two_process
    torchrun_train(tmp, "split", "--fsdp", *TWO_EPOCHS, "--stop-after", "1", "--no-sweep")
    assert ckpt.load(str(tmp / "split" / "checkpoint.pt"))["epoch"] == 0
    resumed = torchrun_train(tmp, "split2", "--fsdp", *TWO_EPOCHS, "--resume", str(tmp / "split" / "checkpoint.pt"),
                             "--no-sweep")
    assert [h["epoch"] for h in resumed[0]["history"]] == [1]
    assert resumed[0]["history"][0] == resumed[1]["history"][0] == ranks[0]["history"][1]
    checkpoints_equal(ckpt.load(str(tmp / "full" / "checkpoint.pt")), ckpt.load(str(tmp / "split2" / "checkpoint.pt")))


def test_fsdp_one_process_and_checkpoints_interchange_with_plain(tmp_path):
    """--fsdp without torchrun is a mesh of one process; it trains exactly like the plain
    run, and checkpoints of either kind resume under the other."""
    plain = run_train(tmp_path, *TWO_EPOCHS, "--no-sweep", out="plain")
    run_train(tmp_path, "--fsdp", *TWO_EPOCHS, "--stop-after", "1", "--no-sweep", out="f2p")
    run_train(tmp_path, "--resume", "auto", "--no-sweep", out="f2p")  # plain from FSDP
    run_train(tmp_path, *TWO_EPOCHS, "--stop-after", "1", "--no-sweep", out="p2f")
    res = run_train(tmp_path, "--fsdp", "--resume", "auto", out="p2f")  # with the sweep and export
    from torch.distributed.tensor import DTensor

    from torch.distributed.fsdp import FSDPModule

    model = res["model"]
    assert res["fsdp"] and isinstance(next(model.parameters()), DTensor)
    # One FSDP unit per conv/linear layer of the default CNN, then the root.
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    assert units == [model, *(m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))]
    assert isinstance(res["optimizer"].state[next(model.parameters())]["m"], DTensor)
    for key in ("epoch", "val", "alpha", "l1", "sparsity", "lr"):
        assert res["history"][0][key] == plain["history"][1][key], key
    ref = ckpt.load(str(tmp_path / "plain" / "checkpoint.pt"))
    checkpoints_equal(ref, ckpt.load(str(tmp_path / "f2p" / "checkpoint.pt")))
    from_plain = ckpt.load(str(tmp_path / "p2f" / "checkpoint.pt"))
    from fsdp import optimizer_sd_to_ids

    from_plain["optimizer"] = optimizer_sd_to_ids(from_plain["optimizer"], plain["model"], plain["optimizer"])
    checkpoints_equal(ref, from_plain)
    assert params_equal(res["full_model"], plain["model"])  # the sweep's unsharded copy
    fresh = DigitsCNN()
    fresh.load_state_dict(torch.load(tmp_path / "p2f" / "sparse_model.pt", weights_only=True), strict=True)
    assert sparsity_report(fresh).sparsity == pytest.approx(res["export_measured_sparsity"], abs=1e-12)
    assert res["export"]["sparsity"] == choose_export(res["sweep"], 10, 360, target=0.97)["sparsity"]  # the run's rule


def test_fsdp_bf16_resnet_blocks_smoke(tmp_path):
    """A torchvision ResNet sharded per block, with bf16 parameters (BatchNorm fp32, in
    units of its own: FSDP2 needs one dtype per unit)."""
    from torch.distributed.tensor import DTensor

    res = run_train(tmp_path, "--synthetic", "--arch", "resnet18", "--synthetic-steps", "2", "-b", "4",
                    "--train-crop-size", "32", "--num-classes", "10", "--epochs", "1", "--fsdp", "--param-dtype", "bf16")
    model, opt = res["model"], res["optimizer"]
    assert math.isfinite(res["history"][0]["train"]["loss"])
    assert model.layer1[0].conv1.weight.dtype == torch.bfloat16 and model.bn1.weight.dtype == torch.float32
    assert isinstance(model.layer1[0].conv1.weight, DTensor)
    assert opt.state[model.layer1[0].conv1.weight]["m"].dtype == torch.float32


def test_fsdp_rejects_what_it_does_not_support():
    parser = train.get_args_parser()
    with pytest.raises(SystemExit, match="--cycles >= 1 .* not supported with --fsdp yet; use DDP"):
        train.resolve_args(parser.parse_args(["--fsdp", "--cycles", "1"]), world_size=2)
    with pytest.raises(SystemExit, match="--amp fp16 is not supported with --fsdp"):
        train.resolve_args(parser.parse_args(["--fsdp", "--amp", "fp16"]), world_size=2)
    with pytest.raises(SystemExit, match="does not combine with --param-dtype bf16"):
        train.resolve_args(parser.parse_args(["--param-dtype", "bf16", "--amp", "fp16"]), world_size=1)
    assert "--fsdp" in parser.format_help() and "--param-dtype" in parser.format_help()


# ---------------------------------------------------------------------- bf16 parameters
BF16_EPOCHS = "10"
BF16_FLOOR = 95.0  # what 10 epochs reach: fp32 99.2%, bf16 98.6% (seed 0); an untrained model gets 10%
# (measured with the adaptive α, which these runs keep: --target-sparsity off)


def test_bf16_parameters_train_as_well_as_fp32(tmp_path):
    """PILoT with bf16 parameters (fp32 m, w and momenta) on the embedded digits: the
    same seed and shortened schedule as an fp32 run, and as accurate."""
    runs = {dt: run_train(tmp_path, "--epochs", BF16_EPOCHS, "--param-dtype", dt, "--no-sweep", "--target-sparsity",
                          "off", out=dt)
            for dt in ("fp32", "bf16")}
    model, opt = runs["bf16"]["model"], runs["bf16"]["optimizer"]
    conv, bn = model.features[0].weight, model.features[1].weight
    assert conv.dtype == torch.bfloat16 and model.classifier.weight.dtype == torch.bfloat16
    assert bn.dtype == torch.float32 and model.features[1].running_var.dtype == torch.float32
    assert all(opt.state[conv][k].dtype == torch.float32 for k in ("m", "w", "momentum_m", "momentum_w"))
    assert torch.equal(conv, (opt.state[conv]["m"] * opt.state[conv]["w"]).to(torch.bfloat16))
    top1 = {dt: r["history"][-1]["val"]["top1"] for dt, r in runs.items()}
    assert min(top1.values()) > BF16_FLOOR, top1
    assert abs(top1["bf16"] - top1["fp32"]) <= 2.0, top1


def test_bf16_parameters_dense_exports_fp32(tmp_path):
    res = run_train(tmp_path, "--method", "dense", "--epochs", "1", "--param-dtype", "bf16", "--export-sparsity", "0.5")
    assert res["model"].features[0].weight.dtype == torch.bfloat16
    assert res["history"][0]["train"]["acc"] > 30
    sd = torch.load(tmp_path / "run" / "sparse_model.pt", weights_only=True)
    assert sd["features.0.weight"].dtype == torch.float32
    fresh = DigitsCNN()
    fresh.load_state_dict(sd, strict=True)
    assert sparsity_report(fresh).sparsity == pytest.approx(0.5, abs=1e-4)
