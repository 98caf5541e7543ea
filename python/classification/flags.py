"""The trainer's presets, flag resolution, validation and resume adoption.

``train.py`` defines the command line (:func:`train.get_args_parser`); this module turns
a parsed command line into a complete, checked run: every unset flag is filled
(explicit flag > resumed checkpoint > ``--preset`` > the embedded or generic defaults
below), and every flag is validated before any data or model is built, each refusal
saying what to do.  With ``--resume`` the flags that define the run come from the
checkpoint (:func:`adopt_checkpoint_args`).  docs/trainer.md describes the flags, the
presets and how the defaults were chosen.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Any, Optional

import torch

from pilot_kernels import PILoT

import checkpoint as ckpt
from data import DEFAULT_DATASET
from methods import DEFAULT_WD, default_beta, uses_pilot
from models import DIGITS_ARCH
from report import DEFAULT_SWEEP

# Defaults for the embedded datasets (no --data-path): a quick no-flag run on two CPU
# cores that ends clearly sparse.  alpha: α of the adaptive run per method; target_alpha:
# α0 of --target-sparsity, from which the controller grows α by 1.5 per epoch; K
# (l1_threshold) is the paper's K relative to the initial L1 norm.
EMBEDDED = dict(arch=DIGITS_ARCH, epochs=40, batch_size=64, lr=0.1, momentum=0.9, lr_warmup_epochs=2,
                label_smoothing=0.0, alpha={"pilot": 2e-2, "spred": 1e-2, "l1": 5e-3, "dense": 0.0},
                target_alpha={"pilot": 1e-3, "spred": 1e-3, "l1": 5e-4, "dense": 0.0},
                l1_threshold=250.0)
# Per embedded dataset: what differs from EMBEDDED.
EMBEDDED_PER_DATASET: dict[str, dict[str, Any]] = {"digits": {}, "mnist": {"epochs": 60}}
# τ of --target-sparsity (TargetSparsity's tolerance).
DEFAULT_SHARE_TOLERANCE = 0.02
# torchvision's reference defaults, for --data-path without a preset.  target_alpha None:
# α0 = steps_alpha0(lr, optimizer steps), set once the data loader gives the steps per epoch.
GENERIC = dict(arch="resnet18", epochs=90, batch_size=32, lr=0.1, momentum=0.9, lr_warmup_epochs=0,
               label_smoothing=0.0, alpha={"pilot": 1e-5, "spred": 1e-5, "l1": 1e-5, "dense": 0.0},
               target_alpha={"pilot": None, "spred": None, "l1": None, "dense": 0.0}, l1_threshold=0.0)
# The no-flag job (embedded data, --method pilot) trains for this sparsity.
MAIN_JOB_TARGET = 0.97
# α0 of the target mode on --data-path/--synthetic data is c / (lr · optimizer steps):
# the α term alone then shrinks a weight by about c over the run, whatever the data set's
# size, the batch or the lr.
TARGET_ALPHA_STEPS = 0.1
# The paper's ResNet-50/ImageNet recipe (appendix C.2, Table 3: STR's setup plus PILoT's
# α, K, δ and the L2 term on m ⊙ w).  lr is 0.256 per 256 images of global batch.
PRESETS = {
    "imagenet-pilot": dict(arch="resnet50", epochs=100, batch_size=256, lr_per_256=0.256, momentum=0.875,
                           lr_warmup_epochs=5, label_smoothing=0.1, method="pilot", alpha=7e-6,
                           l1_threshold=60000.0, delta=1.01, x_weight_decay=0.000030517578125 / 2, wd=0.0,
                           alpha_schedule="adaptive"),
}


def target_sparsity_arg(text: str) -> Any:
    """``--target-sparsity``: a fraction (checked in :func:`validate_args`), or ``off``."""
    if text.strip().lower() in ("off", "none"):
        return "off"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give the fraction of weights to prune, in (0, 1), "
                                         "e.g. 0.9, or 'off'") from None


def steps_alpha0(lr: float, steps: int) -> float:
    """α0 of the target mode on ``--data-path``/``--synthetic`` data: ``TARGET_ALPHA_STEPS /
    (lr · steps)`` for ``steps`` optimizer steps in all (epochs x batches per epoch)."""
    return TARGET_ALPHA_STEPS / (max(lr, 1e-12) * max(steps, 1))


# With --resume, a flag the command line leaves out comes from the checkpoint's run, and
# one it gives must match it, except for these.  How and where this invocation runs:
# from its own command line only (defaults included).
SESSION_FLAGS = frozenset({
    "workers", "eval_batch_size", "channels_last", "compile", "fsdp", "output_dir", "resume", "overwrite",
    "stop_after", "no_sweep", "device", "print_freq", "progress", "log_iters", "tensorboard",
    "use_deterministic_algorithms",
})
# From the checkpoint unless given; given, they apply (where the data lies, what the end
# of the run sweeps and exports, how long it trains).
CHANGEABLE_FLAGS = frozenset({"data_path", "sparsity_thresholds", "sweep_sparsities", "export_sparsity", "epochs"})
# Changes that go without a note in the log.
QUIET_FLAGS = frozenset({"resume", "overwrite", "progress", "print_freq", "log_iters", "tensorboard"})
# What run() needs from a checkpoint.
CHECKPOINT_KEYS = ("model", "optimizer", "lr_scheduler", "epoch", "rng")


def parse_args(parser: argparse.ArgumentParser, argv: Optional[list[str]] = None) -> argparse.Namespace:
    """``argv`` parsed by ``parser``; ``args.given`` names the flags it spells out (a resumed
    run takes the others from its checkpoint, and flags without effect are refused only if
    given)."""
    args = parser.parse_args(argv)
    defaults = [(action, action.default) for action in parser._actions]
    try:  # parse again with no defaults: what is left was typed
        for action, _ in defaults:
            action.default = argparse.SUPPRESS
        args.given = frozenset(vars(parser.parse_args(argv)))
    finally:
        for action, default in defaults:
            action.default = default
    return args


def option_names(parser: argparse.ArgumentParser) -> dict[str, str]:
    """dest -> the flag's first long spelling (``lr`` -> ``--lr``)."""
    names = {}
    for action in parser._actions:
        longs = [o for o in action.option_strings if o.startswith("--")]
        if longs and action.dest not in names:
            names[action.dest] = longs[0]
    return names


def given_flags(args: argparse.Namespace, parser: argparse.ArgumentParser) -> frozenset:
    """The flags typed on the command line (without :func:`parse_args`: the ones that
    differ from their defaults)."""
    if getattr(args, "given", None) is not None:
        return args.given
    defaults = vars(parser.parse_args([]))
    return frozenset(k for k, v in defaults.items() if getattr(args, k, v) != v)


def _shown(value: Any) -> str:
    return "unset" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def load_resume_meta(path: str) -> dict[str, Any]:
    """The checkpoint at ``path``, memory-mapped (its tensors are not read), checked for
    what ``--resume`` needs."""
    try:
        state = ckpt.load_meta(path)
    except Exception as e:
        raise SystemExit(f"--resume {path}: cannot read it as a checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or "model" not in state:
        what = ("a plain state_dict (as sparse_model.pt is)" if isinstance(state, dict) and state
                and all(isinstance(v, torch.Tensor) for v in state.values()) else f"a {type(state).__name__}")
        raise SystemExit(f"--resume {path} has no 'model' entry: it is {what}, not a checkpoint of train.py. "
                         f"Resume from the checkpoint.pt that a run writes into its --output-dir")
    missing = [k for k in CHECKPOINT_KEYS if k not in state]
    if missing:
        raise SystemExit(f"--resume {path} lacks {', '.join(missing)}: it is not a complete checkpoint of train.py; "
                         "resume from the checkpoint.pt that a run writes into its --output-dir")
    return state


def _holds_pilot_state(optimizer_sd: dict[str, Any]) -> bool:
    return any(isinstance(s, dict) and PILoT.FACTOR_KEYS[0] in s for s in optimizer_sd.get("state", {}).values())


def adopt_checkpoint_args(args: argparse.Namespace, state: dict[str, Any], path: str,
                          parser: argparse.ArgumentParser) -> list[str]:
    """Take the run-defining flags from the checkpoint's run; refuse a typed one that
    differs.  Returns what the log should say about the flags that change and apply."""
    saved = state.get("args") or {}
    given, names = given_flags(args, parser), option_names(parser)
    done = int(state["epoch"]) + 1
    pilot_ckpt = _holds_pilot_state(state["optimizer"])
    conflicts, notes = [], []
    for dest, flag in names.items():
        if dest not in saved or not hasattr(args, dest):
            continue
        old, new = saved[dest], getattr(args, dest)
        if dest == "target_sparsity" and new == "off":  # no target: what a run without one saved (None)
            new = None
        if dest not in given:
            if dest not in SESSION_FLAGS:
                setattr(args, dest, old)
        elif new != old:
            if dest == "epochs" and not saved.get("cycles") and new >= done:
                notes.append(f"--epochs {new} (the run had {old}): the lr cosine and the adaptive α schedule "
                             f"now span {new} epochs")
            elif dest == "epochs":
                conflicts.append(f"--epochs {new}: " + (f"the run has already trained {done} epochs"
                                 if new < done else "with --cycles, the epochs of a cycle cannot change"))
            elif dest in SESSION_FLAGS or dest in CHANGEABLE_FLAGS:
                if dest not in QUIET_FLAGS:
                    notes.append(f"{flag} {_shown(new)} (the run had {_shown(old)})")
            elif dest == "method":
                conflicts.append(f"--method {new} (the run's: {old}; its optimizer "
                                 + ("holds PILoT's factors m, w)" if pilot_ckpt else "is SGD, without factors m, w)"))
            elif dest == "target_sparsity":
                conflicts.append(f"{flag} {_shown(new) if new is not None else 'off'} (the run's: "
                                 f"{_shown(old) if old is not None else 'off'}; a run keeps its α schedule)")
            else:
                conflicts.append(f"{flag} {_shown(new)} (the run's: {_shown(old)})")
    method = args.method or "pilot"  # what resolve_args makes of it (a checkpoint without args)
    if method is not None and pilot_ckpt != uses_pilot(method) and not any(c.startswith("--method") for c in conflicts):
        conflicts.append(f"--method {method}: the checkpoint's optimizer is "
                         + ("PILoT (it holds the factors m, w), which --method pilot or spred continues"
                            if pilot_ckpt else "SGD (no factors m, w), which --method dense or l1 continues"))
    if conflicts:
        raise SystemExit(f"--resume {path} continues that run with its own settings, and these flags differ from "
                         f"them: {'; '.join(conflicts)}. Drop them to continue the run, or start a new run "
                         "(in another --output-dir, or with --overwrite)")
    return notes


def _floats(flag: str, text: str) -> list[float]:
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise SystemExit(f"{flag} {text!r}: give comma-separated numbers, e.g. {flag} 0,0.5,0.9") from None


def resolve_args(args: argparse.Namespace, world_size: int, parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Fill the unset flags (explicit flag > resumed checkpoint > --preset > embedded/generic
    defaults) and validate all of them, before anything is built."""
    args.resume_path = ckpt.resolve_resume(args.resume, args.output_dir)
    args.resume_notes = []
    if args.resume_path:
        args.resume_notes = adopt_checkpoint_args(args, load_resume_meta(args.resume_path), args.resume_path, parser)
    given = given_flags(args, parser)
    preset = dict(PRESETS[args.preset]) if args.preset else {}
    embedded = not (args.data_path or args.synthetic)
    if embedded:
        args.dataset = args.dataset or DEFAULT_DATASET
    base = {**EMBEDDED, **EMBEDDED_PER_DATASET.get(args.dataset, {})} if embedded else GENERIC
    # The no-flag job trains for MAIN_JOB_TARGET.  Not where the command line asks for
    # something of the adaptive run (its schedule or knobs, an export point of the sweep,
    # iterative pruning), and not on --resume: a run keeps the schedule it started with
    # (its checkpoint's target_sparsity and alpha_schedule, adopted above).
    off = args.target_sparsity == "off"
    if off:
        args.target_sparsity = None
    args.target_default = (not off and args.target_sparsity is None and not args.resume_path and embedded
                           and (args.method or "pilot") == "pilot" and args.alpha_schedule is None
                           and args.delta is None and args.l1_threshold is None and args.export_sparsity is None
                           and not args.cycles)
    if args.target_default:
        args.target_sparsity = MAIN_JOB_TARGET

    def pick(name: str, fallback: Any) -> Any:
        if getattr(args, name) is not None:
            return getattr(args, name)
        return preset.get(name, fallback)

    args.method = pick("method", "pilot")
    args.arch = pick("arch", base["arch"])
    args.epochs = pick("epochs", base["epochs"])
    args.batch_size = pick("batch_size", base["batch_size"])
    if args.lr is None and "lr_per_256" in preset:
        args.lr = preset["lr_per_256"] * args.batch_size * world_size / 256
    args.lr = pick("lr", base["lr"])
    args.momentum = pick("momentum", base["momentum"])
    explicit_warmup = args.lr_warmup_epochs is not None
    args.lr_warmup_epochs = pick("lr_warmup_epochs", base["lr_warmup_epochs"])
    if not explicit_warmup:  # a default warmup shrinks for short runs
        args.lr_warmup_epochs = min(args.lr_warmup_epochs, args.epochs - 1)
    args.label_smoothing = pick("label_smoothing", base["label_smoothing"])
    args.alpha = pick("alpha", base["target_alpha" if args.target_sparsity is not None else "alpha"][args.method])
    args.beta = pick("beta", default_beta(args.method))
    args.delta = pick("delta", 1.01)
    args.l1_threshold = pick("l1_threshold", base["l1_threshold"])
    args.x_weight_decay = pick("x_weight_decay", 0.0)
    args.wd = pick("wd", DEFAULT_WD[args.method])
    target = args.target_sparsity
    args.alpha_schedule = pick("alpha_schedule", "target" if target is not None and args.method != "dense" else
                               "constant" if args.method == "spred" else "adaptive")
    args.share_tolerance = pick("share_tolerance", DEFAULT_SHARE_TOLERANCE)
    if target is not None and args.export_sparsity is None:
        args.export_sparsity = target  # the run is for a model at S
    if args.progress is None:
        args.progress = sys.stderr.isatty()
    if args.log_iters is None:
        args.log_iters = bool(args.data_path or args.synthetic)
    if args.workers is None:  # in-memory data needs none; ImageFolder shares the cores among local ranks
        per_rank = (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        args.workers = max(1, min(8, per_rank)) if args.data_path else 0
    args.thresholds = _floats("--sparsity-thresholds", args.sparsity_thresholds)
    args.sweep = _floats("--sweep-sparsities", args.sweep_sparsities) if args.sweep_sparsities else list(DEFAULT_SWEEP)
    validate_args(args, given, option_names(parser))
    # The unpruned model is the reference row; S is the row the run is for.
    args.sweep = sorted(set(args.sweep) | {0.0} | ({target} if target is not None else set()))
    return args


def validate_args(args: argparse.Namespace, given: frozenset, names: dict[str, str]) -> None:
    """Every flag, checked before any data or model is built; each message says what to do.
    ``given``: the flags typed; ``names``: :func:`option_names`."""
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise SystemExit(message)

    def finite(x: float) -> bool:
        return isinstance(x, (int, float)) and math.isfinite(x)

    pilot, embedded = uses_pilot(args.method), not (args.data_path or args.synthetic)
    # Ranges.
    need(args.epochs >= 1, f"--epochs {args.epochs}: give at least 1")
    need(args.batch_size >= 1, f"-b/--batch-size {args.batch_size}: give at least 1")
    need(args.eval_batch_size is None or args.eval_batch_size >= 1,
         f"--eval-batch-size {args.eval_batch_size}: give at least 1 (or leave it out: -b)")
    need(args.workers >= 0, f"-j/--workers {args.workers}: give 0 (load in the main process) or more")
    for flag, value in (("--image-size", args.image_size), ("--train-crop-size", args.train_crop_size),
                        ("--val-resize-size", args.val_resize_size), ("--val-crop-size", args.val_crop_size)):
        need(value is None or value >= 1, f"{flag} {value}: an image side in pixels, at least 1")
    need(args.synthetic_steps >= 1, f"--synthetic-steps {args.synthetic_steps}: give at least 1")
    need(args.num_classes >= 2, f"--num-classes {args.num_classes}: give at least 2")
    need(args.stop_after is None or args.stop_after >= 1, f"--stop-after {args.stop_after}: give at least 1 epoch")
    need(args.print_freq >= 0, f"--print-freq {args.print_freq}: give 0 (no progress lines) or more")
    need(finite(args.lr) and args.lr >= 0, f"--lr {args.lr}: give a finite learning rate >= 0")
    need(finite(args.momentum) and 0 <= args.momentum < 1, f"--momentum {args.momentum}: give a value in [0, 1)")
    need(not args.nesterov or args.momentum > 0, "--nesterov needs --momentum > 0")
    need(finite(args.wd) and args.wd >= 0, f"--wd {args.wd}: give a finite weight decay >= 0")
    need(finite(args.label_smoothing) and 0 <= args.label_smoothing < 1,
         f"--label-smoothing {args.label_smoothing}: give a value in [0, 1)")
    need(args.lr_warmup_epochs >= 0, f"--lr-warmup-epochs {args.lr_warmup_epochs}: give 0 or more")
    need(args.lr_warmup_epochs < args.epochs,
         f"--lr-warmup-epochs ({args.lr_warmup_epochs}) must be smaller than --epochs ({args.epochs})")
    # None: the target mode's α0 on --data-path/--synthetic, set from the steps per epoch (run()).
    need(args.alpha is None or (finite(args.alpha) and args.alpha >= 0), f"--alpha {args.alpha}: give a finite value >= 0")
    need(finite(args.beta) and args.beta >= 0, f"--beta {args.beta}: give a finite value >= 0 (1: PILoT, 0: spred)")
    need(finite(args.delta) and args.delta >= 1, f"--delta {args.delta}: give δ >= 1 (α grows by ·δ, decays by /δ)")
    need(finite(args.l1_threshold) and args.l1_threshold >= 0, f"--l1-threshold {args.l1_threshold}: give K >= 0")
    need(finite(args.x_weight_decay) and args.x_weight_decay >= 0,
         f"--x-weight-decay {args.x_weight_decay}: give a finite value >= 0")
    need(finite(args.alpha_p) and 0 < args.alpha_p <= 1, f"--alpha-p {args.alpha_p}: give a ratio in (0, 1]")
    need(args.cycles >= 0 and 0.0 < args.prune_rate < 1.0, "--cycles must be >= 0 and --prune-rate in (0, 1)")
    if args.cycles and args.rewind == "weight":
        need(0 <= args.rewind_epoch < args.epochs, f"--rewind-epoch must be in [0, --epochs) = [0, {args.epochs})")
    for t in args.thresholds:
        need(math.isfinite(t) and t >= 0, f"--sparsity-thresholds: {t:g} is not a threshold; give |x| bounds >= 0, "
                                          "e.g. 0,1e-4,1e-3")
    for sp in args.sweep:
        need(0 <= sp < 1, f"--sweep-sparsities: {sp:g} is not a sparsity; give fractions in [0, 1), e.g. 0,0.5,0.9")
    need(args.target_sparsity is None or (finite(args.target_sparsity) and 0 < args.target_sparsity < 1),
         f"--target-sparsity {args.target_sparsity}: give the fraction of weights to prune, in (0, 1), e.g. 0.9")
    need(args.export_sparsity is None or 0 <= args.export_sparsity < 1,
         f"--export-sparsity {args.export_sparsity}: give a fraction in [0, 1) (1 would zero every weight)")
    # α = 0 can never grow: Algorithm 1 multiplies it by δ, the decaying schedules scale α0.
    need(not (pilot and args.alpha == 0 and args.alpha_schedule != "constant"),
         f"--alpha 0 with --alpha-schedule {args.alpha_schedule}: every step of that schedule multiplies α, so it "
         "stays 0; give --alpha > 0, or --alpha-schedule constant for training without the α term")
    need(not (args.resume and args.overwrite), "--overwrite starts a new run and --resume continues one: give one of "
                                               "them")
    # Target sparsity.
    target = args.target_sparsity
    if target is None:
        need(args.alpha_schedule != "target", "--alpha-schedule target steers α towards a sparsity: give "
                                              "--target-sparsity S too (e.g. 0.9)")
        need("share_tolerance" not in given, "--share-tolerance is τ of --target-sparsity: give --target-sparsity S too")
    else:
        need(not (pilot and args.alpha_schedule != "target"),
             f"--alpha-schedule {args.alpha_schedule} with --target-sparsity: the target mode steers α itself "
             "(--alpha-schedule target, its default); leave out --alpha-schedule, or --target-sparsity")
        need(args.export_sparsity is None or math.isclose(args.export_sparsity, target, rel_tol=0, abs_tol=1e-12),
             f"--export-sparsity {args.export_sparsity:g} with --target-sparsity {target:g}: the run exports at "
             "the target sparsity; leave out --export-sparsity (or give the same value)")
        need(not args.cycles, "--target-sparsity trains one model for one sparsity, --cycles prunes iteratively: "
                              "give one of them")
        need(not (args.method == "dense" and "share_tolerance" in given),
             "--share-tolerance steers α, which --method dense does not have (it is only pruned to "
             "--target-sparsity at the end); leave it out")
        need(not (args.method == "l1" and args.alpha == 0),
             "--alpha 0 with --method l1 --target-sparsity: the controller multiplies α, so it stays 0; give "
             "--alpha > 0 (the starting α)")
    need(finite(args.share_tolerance) and 0 < args.share_tolerance < 1,
         f"--share-tolerance {args.share_tolerance}: give τ, a fraction in (0, 1), e.g. 0.02")
    # Data and model.
    need(not (args.synthetic and args.data_path), "--synthetic and --data-path exclude each other; give one")
    need(not (args.preset and embedded), f"--preset {args.preset} trains on ImageNet: give --data-path (or --synthetic)")
    need(not (args.data_path and args.arch == DIGITS_ARCH),
         f"--arch {DIGITS_ARCH} takes the 1-channel embedded digits, but --data-path {args.data_path} is an "
         "ImageFolder of 3-channel images: give a torchvision model (e.g. --arch resnet18), or leave out --data-path")
    # Combinations.
    if args.method in ("dense", "l1"):
        need(not args.x_weight_decay, "--x-weight-decay applies to pilot/spred (the L2 on m ⊙ w); use --wd for dense/l1")
        for dest in ("beta", "alpha_schedule", "delta", "l1_threshold", "alpha_p"):
            need(dest not in given, f"{names[dest]} applies to pilot/spred, not --method {args.method}")
    need(not (args.method == "dense" and args.alpha), "--alpha has no effect with --method dense")
    if pilot:
        need(args.alpha_schedule == "adaptive" or not {"delta", "l1_threshold"} & given,
             f"--delta and --l1-threshold set the adaptive schedule, not --alpha-schedule {args.alpha_schedule}")
        need(args.alpha_schedule == "geometric" or "alpha_p" not in given,
             f"--alpha-p is the ratio of --alpha-schedule geometric, not {args.alpha_schedule}")
    if not args.cycles:
        for dest in ("prune_rate", "rewind", "rewind_epoch"):
            need(dest not in given, f"{names[dest]} applies to iterative pruning: give --cycles N too")
    elif args.rewind == "lr":
        need("rewind_epoch" not in given, "--rewind-epoch applies to --rewind weight")
    if args.no_sweep or args.synthetic:
        why = "--no-sweep" if args.no_sweep else "--synthetic (random data: no sweep, no export)"
        for dest in ("sweep_sparsities", "export_sparsity"):
            need(dest not in given, f"{names[dest]} has no effect with {why}")
    if not args.synthetic:
        need("synthetic_steps" not in given and "num_classes" not in given,
             "--synthetic-steps and --num-classes describe --synthetic data; give --synthetic too")
    need(not (args.data_path and "image_size" in given),
         "--image-size sizes the embedded datasets' images; for --data-path use --train-crop-size/--val-crop-size")
    need(embedded or "dataset" not in given,
         f"--dataset {args.dataset} picks an embedded dataset, which "
         + ("--data-path replaces (its ImageFolder is the data)" if args.data_path else
            "--synthetic replaces (one random batch)") + ": give one of them")
    if embedded or (args.synthetic and args.arch == DIGITS_ARCH):
        for dest in ("train_crop_size", "val_resize_size", "val_crop_size"):
            need(dest not in given, f"{names[dest]} applies to --data-path (or --synthetic with a torchvision "
                                    "model); the embedded digits use --image-size")
    # Distributed and precision.
    need(not (args.fsdp and args.cycles), "--cycles >= 1 (iterative pruning) is not supported with --fsdp yet; use DDP "
                                          "(torchrun without --fsdp), or train with --fsdp and prune from its checkpoint "
                                          "with DDP")
    need(not (args.fsdp and args.amp == "fp16"), "--amp fp16 is not supported with --fsdp (its GradScaler would skip "
                                                 "steps per rank); use --amp bf16 or --param-dtype bf16")
    need(not (args.param_dtype != "fp32" and args.amp == "fp16"),
         f"--amp fp16 does not combine with --param-dtype {args.param_dtype}; use --amp bf16 or neither")


