"""train.py refuses bad flags before it builds anything, with a message that says what
to do; with ``--resume`` it takes the run's flags from the checkpoint and refuses
different ones.  No test here trains: each checkpoint is written by hand."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import flags
import train


@pytest.fixture
def no_training(monkeypatch):
    """Fail the test if main() gets as far as loading data."""
    def built(*a, **k):
        raise AssertionError("train.py built its data loaders although the flags are invalid")

    monkeypatch.setattr(train, "build_data", built)


def refused(argv: list[str], match: str) -> None:
    with pytest.raises(SystemExit, match=match):
        train.main(["--output-dir", "", *argv])


@pytest.mark.parametrize("argv,match", [
    (["--sweep-sparsities", "0,0.5,1"], r"--sweep-sparsities: 1 is not a sparsity; give fractions in \[0, 1\)"),
    (["--sweep-sparsities", "0,-0.1"], r"-0.1 is not a sparsity"),
    (["--sweep-sparsities", "0,half"], r"--sweep-sparsities '0,half': give comma-separated numbers"),
    (["--export-sparsity", "1"], r"--export-sparsity 1.0: give a fraction in \[0, 1\)"),
    (["--sparsity-thresholds", "0,-1e-3"], r"-0.001 is not a threshold; give \|x\| bounds >= 0"),
    (["--sparsity-thresholds", "0,nan"], r"nan is not a threshold"),
    (["--image-size", "0"], r"--image-size 0: an image side in pixels"),
    (["--resume", "auto", "--overwrite", "--output-dir", "runs/x"], r"--overwrite starts a new run and --resume "
                                                                    r"continues one: give one of them"),
    (["--synthetic", "--arch", "resnet18", "--train-crop-size", "-1"], r"--train-crop-size -1"),
    (["-b", "0"], r"--batch-size 0: give at least 1"),
    (["--epochs", "0"], r"--epochs 0: give at least 1"),
    (["--lr", "nan"], r"--lr nan: give a finite learning rate"),
    (["--momentum", "1"], r"--momentum 1.0: give a value in \[0, 1\)"),
    (["--nesterov", "--momentum", "0"], r"--nesterov needs --momentum > 0"),
    (["--delta", "0.5"], r"--delta 0.5: give δ >= 1"),
    (["--l1-threshold", "-1"], r"--l1-threshold -1.0: give K >= 0"),
    (["--label-smoothing", "1"], r"--label-smoothing 1.0"),
    (["-j", "-1"], r"--workers -1"),
    (["--data-path", "/data/imagenet", "--arch", "digits_cnn"],
     r"--arch digits_cnn takes the 1-channel embedded digits.*3-channel.*--arch resnet18"),
    (["--target-sparsity", "off", "--alpha", "0"],
     r"--alpha 0 with --alpha-schedule adaptive: .* stays 0; give --alpha > 0"),
    (["--alpha", "0"], r"--alpha 0 with --alpha-schedule target"),  # the no-flag job's target mode
    (["--alpha", "0", "--alpha-schedule", "geometric"], r"--alpha 0 with --alpha-schedule geometric"),
    # flags that would have no effect
    (["--no-sweep", "--export-sparsity", "0.5"], r"--export-sparsity has no effect with --no-sweep"),
    (["--synthetic", "--sweep-sparsities", "0,0.5"], r"--sweep-sparsities has no effect with --synthetic"),
    (["--method", "dense", "--beta", "1"], r"--beta applies to pilot/spred, not --method dense"),
    (["--method", "l1", "--delta", "1.1"], r"--delta applies to pilot/spred"),
    (["--alpha-schedule", "constant", "--delta", "1.1"], r"--delta and --l1-threshold set the adaptive schedule"),
    (["--alpha-p", "0.9"], r"--alpha-p is the ratio of --alpha-schedule geometric"),
    (["--prune-rate", "0.5"], r"--prune-rate applies to iterative pruning: give --cycles N too"),
    (["--cycles", "1", "--rewind-epoch", "0"], r"--rewind-epoch applies to --rewind weight"),
    (["--num-classes", "5"], r"describe --synthetic data; give --synthetic too"),
    (["--train-crop-size", "32"], r"--train-crop-size applies to --data-path"),
    (["--data-path", "/data/imagenet", "--image-size", "32"], r"--image-size sizes the embedded datasets' images"),
    # --dataset picks an embedded set
    (["--data-path", "/data/imagenet", "--dataset", "mnist"], r"--dataset mnist picks an embedded dataset, which "
                                                              r"--data-path replaces.*give one of them"),
    (["--synthetic", "--dataset", "digits"], r"--dataset digits picks an embedded dataset, which --synthetic replaces"),
    # --target-sparsity
    (["--target-sparsity", "1"], r"--target-sparsity 1.0: give the fraction of weights to prune, in \(0, 1\)"),
    (["--target-sparsity", "0"], r"--target-sparsity 0.0: give the fraction"),
    (["--target-sparsity", "nan"], r"--target-sparsity nan: give the fraction"),
    (["--target-sparsity", "0.9", "--alpha-schedule", "adaptive"],
     r"--alpha-schedule adaptive with --target-sparsity: the target mode steers α itself"),
    (["--method", "spred", "--target-sparsity", "0.9", "--alpha-schedule", "constant"],
     r"--alpha-schedule constant with --target-sparsity"),
    (["--alpha-schedule", "target"], r"--alpha-schedule target steers α towards a sparsity: give --target-sparsity"),
    (["--target-sparsity", "0.9", "--export-sparsity", "0.95"],
     r"--export-sparsity 0.95 with --target-sparsity 0.9: the run exports at the target sparsity"),
    (["--target-sparsity", "0.9", "--cycles", "1"], r"--target-sparsity trains one model for one sparsity, --cycles"),
    (["--method", "l1", "--target-sparsity", "0.9", "--alpha", "0"], r"--alpha 0 with --method l1 --target-sparsity"),
    (["--target-sparsity", "0.9", "--alpha", "0"], r"--alpha 0 with --alpha-schedule target"),
    (["--target-sparsity", "off", "--share-tolerance", "0.1"],
     r"--share-tolerance is τ of --target-sparsity: give --target-sparsity S too"),
    (["--alpha-schedule", "adaptive", "--share-tolerance", "0.1"], r"--share-tolerance is τ of --target-sparsity"),
    (["--data-path", "/data/x", "--arch", "resnet18", "--share-tolerance", "0.1"],
     r"--share-tolerance is τ of --target-sparsity"),  # the default S is the embedded pilot job's only
    (["--target-sparsity", "0.9", "--share-tolerance", "1.5"], r"--share-tolerance 1.5: give τ, a fraction in \(0, 1\)"),
    (["--method", "dense", "--target-sparsity", "0.9", "--share-tolerance", "0.1"],
     r"--share-tolerance steers α, which --method dense does not have"),
    (["--method", "l1", "--target-sparsity", "0.9", "--alpha-schedule", "target"],
     r"--alpha-schedule applies to pilot/spred, not --method l1"),
])
def test_invalid_flags_refused_before_training(no_training, argv, match):
    refused(argv, match)


def test_alpha_zero_is_fine_with_a_constant_schedule():
    args = train.resolve_args(train.parse_args(["--method", "spred", "--alpha", "0"]), world_size=1)
    assert args.alpha == 0.0 and args.alpha_schedule == "constant"


def test_target_sparsity_sets_the_schedule_the_export_and_the_sweep():
    args = train.resolve_args(train.parse_args(["--target-sparsity", "0.87", "--sweep-sparsities", "0,0.5"]), 1)
    assert (args.alpha_schedule, args.export_sparsity, args.sweep) == ("target", 0.87, [0.0, 0.5, 0.87])
    assert args.share_tolerance == flags.DEFAULT_SHARE_TOLERANCE
    same = train.resolve_args(train.parse_args(["--target-sparsity", "0.9", "--export-sparsity", "0.9",
                                                "--alpha-schedule", "target", "--share-tolerance", "0.1"]), 1)
    assert (same.export_sparsity, same.share_tolerance) == (0.9, 0.1)
    dense = train.resolve_args(train.parse_args(["--method", "dense", "--target-sparsity", "0.9"]), 1)
    assert dense.export_sparsity == 0.9 and 0.9 in dense.sweep
    plain = train.resolve_args(train.parse_args(["--target-sparsity", "off"]), 1)  # without S nothing changes
    assert (plain.alpha_schedule, plain.export_sparsity, plain.target_sparsity) == ("adaptive", None, None)
    assert (plain.dataset, plain.image_size, plain.alpha) == ("digits", None, 2e-2)


def resolved(*argv: str):
    return train.resolve_args(train.parse_args(["--output-dir", "", *argv]), world_size=1)


def test_the_no_flag_job_trains_for_98_percent(tmp_path):
    """A new pilot run on the embedded data: S = MAIN_JOB_TARGET with the target mode's
    α0, exported and swept at S; τ and α0 may be tuned without leaving the target mode."""
    main = resolved()
    assert flags.MAIN_JOB_TARGET == 0.97
    assert (main.method, main.target_sparsity, main.alpha_schedule, main.alpha, main.export_sparsity) == \
        ("pilot", 0.97, "target", 1e-3, 0.97)
    assert main.target_default and 0.97 in main.sweep
    for argv in (["--dataset", "mnist"], ["--method", "pilot", "--epochs", "3"], ["--share-tolerance", "0.05"],
                 ["--alpha", "5e-3"],
                 ["--resume", "auto", "--output-dir", str(tmp_path)]):  # auto without a checkpoint: a new run
        args = resolved(*argv)
        assert (args.target_sparsity, args.alpha_schedule, args.target_default) == (0.97, "target", True), argv
    assert resolved("--alpha", "5e-3").alpha == 5e-3
    given = resolved("--target-sparsity", "0.9")  # a typed S is not the default
    assert (given.target_sparsity, given.target_default) == (0.9, False)


@pytest.mark.parametrize("argv,schedule", [
    (["--target-sparsity", "off"], "adaptive"),
    (["--target-sparsity", "OFF"], "adaptive"),
    (["--target-sparsity", "none"], "adaptive"),
    (["--alpha-schedule", "adaptive"], "adaptive"),
    (["--alpha-schedule", "constant"], "constant"),
    (["--delta", "1.02"], "adaptive"),
    (["--l1-threshold", "100"], "adaptive"),
    (["--export-sparsity", "0.9"], "adaptive"),  # an export point of the adaptive run's sweep
    (["--cycles", "1"], "adaptive"),  # iterative pruning
    (["--method", "spred"], "constant"),
    (["--method", "l1"], "adaptive"),  # (no α schedule: l1's α is constant)
    (["--method", "dense"], "adaptive"),
    (["--data-path", "/data/x", "--arch", "resnet18"], "adaptive"),
    (["--synthetic"], "adaptive"),
])
def test_the_default_target_stays_off_where_the_run_asks_for_something_else(argv, schedule):
    args = resolved(*argv)
    assert (args.target_sparsity, args.alpha_schedule, args.target_default) == (None, schedule, False)
    assert args.export_sparsity == (0.9 if "--export-sparsity" in argv else None)


def test_target_sparsity_takes_off_or_a_number(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--target-sparsity", "most"])
    assert "'most': give the fraction of weights to prune, in (0, 1), e.g. 0.9, or 'off'" in capsys.readouterr().err
    text = " ".join(train.get_args_parser().format_help().split())
    assert "Default: 0.97 for a new --method pilot run on the embedded data" in text and "'off': no target" in text


def test_data_path_target_alpha0_follows_the_steps():
    """--data-path/--synthetic target mode: α0 is left to run() (None after resolve_args),
    which sets TARGET_ALPHA_STEPS / (lr · steps); an explicit --alpha wins."""
    args = resolved("--data-path", "/data/x", "--arch", "resnet18", "--target-sparsity", "0.9")
    assert args.alpha is None and args.alpha_schedule == "target"
    assert resolved("--data-path", "/data/x", "--arch", "resnet18", "--target-sparsity", "0.9",
                    "--alpha", "3e-4").alpha == 3e-4
    assert resolved("--data-path", "/data/x", "--arch", "resnet18").alpha == 1e-5  # adaptive: unchanged
    # The digits' 40 epochs x 22 steps at lr 0.1 give 1.1e-3, by the measured embedded 1e-3.
    assert flags.steps_alpha0(0.1, 40 * 22) == pytest.approx(0.1 / 88)
    assert flags.steps_alpha0(0.4, 90 * 5005) == pytest.approx(0.1 / (0.4 * 90 * 5005))


# ---------------------------------------------------------------------- --resume
# The no-flag job as it was before it trained for a target sparsity: adaptive α, no S.
ADAPTIVE_JOB = ("--target-sparsity", "off")


def fake_checkpoint(path: Path, *, pilot: bool = True, with_args: bool = True, epoch: int = 0,
                    argv: tuple = ADAPTIVE_JOB, **run_args) -> Path:
    """What train.py's checkpoint holds, as far as flag resolution reads it: the run of
    ``argv``, changed by ``run_args``."""
    state = {"m": torch.ones(2, 2), "w": torch.ones(2, 2)} if pilot else {"momentum_buffer": torch.zeros(2, 2)}
    ck = {"epoch": epoch, "model": {"w": torch.zeros(2, 2)}, "rng": [], "lr_scheduler": {},
          "optimizer": {"state": {0: state}, "param_groups": [{"params": [0]}]}}
    if with_args:
        saved = vars(train.resolve_args(train.parse_args(["--output-dir", "", *argv]), world_size=1))
        saved.update(run_args)
        ck["args"] = {k: v for k, v in saved.items() if isinstance(v, (int, float, str, bool, list, type(None)))}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ck, path)
    return path


def test_resume_from_a_plain_state_dict_is_refused(tmp_path, no_training):
    path = tmp_path / "sparse_model.pt"
    torch.save({"features.0.weight": torch.zeros(3)}, path)
    refused(["--resume", str(path)], r"has no 'model' entry: it is a plain state_dict .*checkpoint.pt")


def test_resume_from_an_incomplete_checkpoint_is_refused(tmp_path, no_training):
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": {}, "epoch": 0}, path)
    refused(["--resume", str(path)], r"lacks optimizer, lr_scheduler, rng")


def test_pilot_checkpoint_resumed_as_dense_is_refused(tmp_path, no_training):
    path = fake_checkpoint(tmp_path / "run" / "checkpoint.pt")
    refused(["--resume", str(path), "--method", "dense"],
            r"--method dense \(the run's: pilot; its optimizer holds PILoT's factors m, w\).*Drop them")
    old = fake_checkpoint(tmp_path / "old" / "checkpoint.pt", with_args=False)  # no args: read the optimizer
    refused(["--resume", str(old), "--method", "dense"], r"the checkpoint's optimizer is PILoT")
    sgd = fake_checkpoint(tmp_path / "sgd" / "checkpoint.pt", pilot=False, with_args=False)
    refused(["--resume", str(sgd)], r"--method pilot: the checkpoint's optimizer is SGD")


@pytest.mark.parametrize("argv,match", [
    (["--lr", "0.2"], r"--lr 0.2 \(the run's: 0.1\)"),
    (["--alpha", "0.05"], r"--alpha 0.05 \(the run's: 0.02\)"),
    (["--seed", "1"], r"--seed 1 \(the run's: 0\)"),
    (["-b", "32"], r"--batch-size 32 \(the run's: 64\)"),
    (["--epochs", "1"], r"--epochs 1: the run has already trained 3 epochs"),
])
def test_resume_refuses_flags_that_differ_from_the_run(tmp_path, no_training, argv, match):
    path = fake_checkpoint(tmp_path / "run" / "checkpoint.pt", epoch=2)
    refused(["--resume", str(path), *argv], match + r".*Drop them to continue the run, or start a new run")


def test_resume_takes_the_runs_flags_and_applies_the_changeable_ones(tmp_path):
    path = fake_checkpoint(tmp_path / "run" / "checkpoint.pt", method="spred", alpha=0.05, beta=0.0,
                           alpha_schedule="constant", seed=3, lr=0.2, epochs=10, stop_after=4,
                           sweep_sparsities="0,0.5")
    argv = ["--resume", str(path), "--output-dir", "", "--epochs", "12", "-j", "1", "--seed", "3"]
    args = train.resolve_args(train.parse_args(argv), world_size=1)
    assert (args.method, args.alpha, args.beta, args.alpha_schedule, args.seed, args.lr) == \
        ("spred", 0.05, 0.0, "constant", 3, 0.2)
    assert args.epochs == 12 and args.stop_after is None  # how long: this command line's
    assert args.sweep == [0.0, 0.5]  # what the end of the run sweeps: the run's, unless given
    assert any(re.match(r"--epochs 12 \(the run had 10\): the lr cosine and the adaptive α", n) for n in args.resume_notes)
    assert "--workers 1 (the run had 0)" in args.resume_notes


def test_resume_keeps_the_runs_alpha_schedule(tmp_path, no_training):
    """The no-flag job's default S applies to new runs only: an adaptive run (one from
    before the default, also one whose checkpoint predates --target-sparsity) resumes
    adaptive, a run for 97% resumes for 97%, and switching either is refused."""
    old = fake_checkpoint(tmp_path / "old" / "checkpoint.pt", alpha_schedule="adaptive")
    args = resolved("--resume", str(old))
    assert (args.target_sparsity, args.alpha_schedule, args.alpha, args.export_sparsity) == (None, "adaptive", 2e-2, None)
    assert resolved("--resume", str(old), "--target-sparsity", "off").alpha_schedule == "adaptive"
    older = tmp_path / "older" / "checkpoint.pt"
    fake_checkpoint(older)
    ck = torch.load(older, weights_only=False)
    for key in ("target_sparsity", "share_tolerance", "dataset", "target_default"):
        ck["args"].pop(key)
    torch.save(ck, older)
    args = resolved("--resume", str(older))
    assert (args.target_sparsity, args.alpha_schedule, args.alpha) == (None, "adaptive", 2e-2)
    bare = fake_checkpoint(tmp_path / "bare" / "checkpoint.pt", with_args=False)  # nothing says what it was
    assert (resolved("--resume", str(bare)).target_sparsity, resolved("--resume", str(bare)).alpha_schedule) == \
        (None, "adaptive")
    refused(["--resume", str(old), "--target-sparsity", "0.97"],
            r"--target-sparsity 0.97 \(the run's: off; a run keeps its α schedule\).*Drop them")

    new = fake_checkpoint(tmp_path / "new" / "checkpoint.pt", argv=())
    args = resolved("--resume", str(new))
    assert (args.target_sparsity, args.alpha_schedule, args.alpha, args.export_sparsity) == (0.97, "target", 1e-3, 0.97)
    assert resolved("--resume", str(new), "--target-sparsity", "0.97").target_sparsity == 0.97
    refused(["--resume", str(new), "--target-sparsity", "off"], r"--target-sparsity off \(the run's: 0.97; a run keeps")
    refused(["--resume", str(new), "--alpha-schedule", "adaptive"], r"--alpha-schedule adaptive \(the run's: target\)")


@pytest.mark.parametrize("argv", [["--target-sparsity", "0.9"], ["--target-sparsity", "off"]], ids=["target", "adaptive"])
def test_the_alpha_schedules_know_chance(argv):
    """The trainer tells the accuracy-driven schedules the accuracy of a uniform guess,
    so that they cut α instead of raising it while a model sits at chance."""
    import methods
    from pilot_kernels import PILoT

    args = resolved(*argv)
    opt = PILoT([torch.nn.Parameter(torch.randn(3, 2))], lr=0.1, alpha=1e-3)
    sched = methods.build_alpha_scheduler(opt, args, 10, chance=50.0)
    assert sched.chance == 50.0
    for _ in range(3):
        before = opt.param_groups[0]["alpha"]
        sched.step(50.0)
        assert opt.param_groups[0]["alpha"] < before and sched.last_action == "chance"
