#!/usr/bin/env python
"""Train an image classifier with PILoT (or dense SGD, spred, L1) and report sparsity.

Flags follow torchvision's classification reference (docs/trainer.md lists them all).
With no flags the script trains the small default CNN on the handwritten digits shipped
inside scikit-learn (no download) with PILoT for a model exactly 97% sparse
(``--target-sparsity 0.97``) and ends with the accuracy-vs-sparsity sweep::

    python python/classification/train.py                                      # embedded digits, PILoT, 97%
    python python/classification/train.py --target-sparsity off                # adaptive α (Algorithm 1) instead
    python python/classification/train.py --method dense                       # the dense baseline
    python python/classification/train.py --target-sparsity 0.9                # a model exactly 90% sparse
    python python/classification/train.py --dataset mnist --target-sparsity 0.98   # 5,000 MNIST digits, 98%
    python python/classification/train.py --data-path /data/imagenet --preset imagenet-pilot
    torchrun --nproc_per_node 8 python/classification/train.py --data-path /data/imagenet \\
        --preset imagenet-pilot -b 32                           # global batch 256
    torchrun --nproc_per_node 2 python/classification/train.py --device cpu    # DDP on CPU (gloo)
    torchrun --nproc_per_node 8 python/classification/train.py --data-path /data/imagenet \\
        --preset imagenet-pilot -b 32 --fsdp                    # FSDP2 instead of DDP

Every epoch logs train loss/accuracy, val top-1/top-5, α, ``Σ|x|`` and the sparsity of
the tensors PILoT splits (``metrics.jsonl``, TensorBoard) and writes a checkpoint
atomically; ``--resume`` continues bit-exactly.  At the end the weights are pruned by
global magnitude to each ``--sweep-sparsities`` point without fine-tuning (the paper's
one-shot evaluation, appendix C.2) and the chosen one is exported as ``sparse_model.pt``,
a plain state_dict with exact zeros: ``S`` of ``--target-sparsity S`` when top-1 there is
within 1 point of unpruned, else the sparsest sweep point that is (the last lines say
so).  A run that exports no model (the unpruned one is no better than chance, or keeps
no weight) says why in its last line; ``sweep.json`` then has ``"export": null``.
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import time
from typing import Any, Optional

import torch
from torch import nn

from pilot_kernels.init import splits_by_default
from pilot_kernels.schedules import TargetSparsity
from pilot_kernels.sparsity import export_state_dict, sparsity_report, sweep

import checkpoint as ckpt
import flags
from data import DEFAULT_DATASET, EMBEDDED_DATASETS, build_data
import fsdp as fsdp_utils
from dist import DistInfo, all_gather_object, barrier, broadcast_buffers_, init_distributed, shutdown
from engine import NonFiniteLossError, evaluate, train_one_epoch
from flags import MAIN_JOB_TARGET, PRESETS, TARGET_ALPHA_STEPS
from logs import Logger, epoch_line, run_line
from methods import (ALPHA_SCHEDULES, METHODS, build_alpha_scheduler, build_optimizer, current_alpha, l1_norm,
                     lr_lambda_factory, share_at, sparsities_at, sparsity_optimizer, step_alpha)
from models import DIGITS_ARCH, PARAM_DTYPES, build_model, cast_params_, model_in_channels
from pruning import Masks, snapshot, start_cycle
from report import choose_export, format_table, plot_sweeps, sweep_rows, write_json

def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data-path", default=None, help="ImageFolder root with train/ and val/ (default: the embedded sklearn digits)")
    g.add_argument("--synthetic", action="store_true", help="one random batch resident on the device (throughput only; ImageNet-sized unless --arch digits_cnn)")
    g.add_argument("--synthetic-steps", type=int, default=100, help="iterations per epoch with --synthetic")
    g.add_argument("--num-classes", type=int, default=1000, help="classes of --synthetic data for torchvision models")
    g.add_argument("--dataset", choices=sorted(EMBEDDED_DATASETS), default=None,
                   help=f"the embedded dataset, used without --data-path/--synthetic (default: {DEFAULT_DATASET}): "
                        + "; ".join(f"{n}: {d.num_images:,} {d.native_size}x{d.native_size} images, {d.num_classes} classes"
                                    for n, d in sorted(EMBEDDED_DATASETS.items())))
    g.add_argument("--image-size", type=int, default=None,
                   help="side the embedded images are resized to (default: per dataset, "
                        + ", ".join(f"{n} {d.image_size}" for n, d in sorted(EMBEDDED_DATASETS.items())) + ")")
    g.add_argument("--train-crop-size", type=int, default=224)
    g.add_argument("--val-resize-size", type=int, default=256)
    g.add_argument("--val-crop-size", type=int, default=224)
    g.add_argument("-j", "--workers", type=int, default=None, help="data loading workers (default: 0 for in-memory data, else min(8, cpus))")

    g = p.add_argument_group("model and optimization")
    g.add_argument("--preset", choices=sorted(PRESETS), default=None, help="a published recipe; explicit flags override it")
    g.add_argument("--arch", default=None, help=f"{DIGITS_ARCH!r} or a torchvision model name (default: {DIGITS_ARCH} on the embedded data, else resnet18; the preset: resnet50)")
    g.add_argument("--epochs", type=int, default=None, help="epochs (per cycle with --cycles)")
    g.add_argument("-b", "--batch-size", type=int, default=None, help="images per process and step")
    g.add_argument("--eval-batch-size", type=int, default=None)
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (the preset scales 0.256 per 256 images of global batch)")
    g.add_argument("--momentum", type=float, default=None)
    g.add_argument("--nesterov", action="store_true")
    g.add_argument("--wd", "--weight-decay", dest="wd", type=float, default=None,
                   help="weight decay: on all tensors for dense/l1 (default 1e-4); on the non-reparameterized ones for pilot/spred (default 0)")
    g.add_argument("--label-smoothing", type=float, default=None)
    g.add_argument("--lr-warmup-epochs", type=int, default=None, help="linear warmup, then cosine to 0 (per iteration)")
    g.add_argument("--amp", choices=["bf16", "fp16"], default=None, help="autocast dtype; fp16 adds a GradScaler")
    g.add_argument("--param-dtype", choices=sorted(PARAM_DTYPES, reverse=True), default="fp32",
                   help="dtype the model's parameters are stored and computed in (inputs are cast to it). bf16: "
                        "every layer except BatchNorm holds bf16 weights (BatchNorm stays fp32: its running statistics and "
                        "SGD-updated scale/shift would round in bf16); "
                        "pilot/spred keep m, w and their momenta in fp32 (the fp32 master copy; x = m*w is "
                        "rounded to bf16 after each step), while dense/l1 SGD updates the bf16 weights directly "
                        "(small updates round away). sparse_model.pt is saved in fp32 either way")
    g.add_argument("--channels-last", action="store_true")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")

    g = p.add_argument_group("sparsification")
    g.add_argument("--method", choices=METHODS, default=None, help="dense (SGD), pilot (β=1, adaptive α), spred (β=0, constant α), l1 (SGD + α·sign(x)); default pilot")
    g.add_argument("--alpha", type=float, default=None,
                   help="initial α of PILoT/spred, or the L1 strength of l1 (with --target-sparsity the starting α; "
                        "default on the embedded data 1e-3 for pilot/spred, 5e-4 for l1; with --data-path/--synthetic "
                        f"{TARGET_ALPHA_STEPS:g} / (lr x optimizer steps of the run), i.e. α0 alone would shrink a "
                        f"weight by about {TARGET_ALPHA_STEPS:g} over the run)")
    g.add_argument("--beta", type=float, default=None, help="split m² − w² = β (default 1 for pilot, 0 for spred)")
    g.add_argument("--alpha-schedule", choices=ALPHA_SCHEDULES, default=None,
                   help="default: target with --target-sparsity (pilot_kernels.schedules.TargetSparsity, the only "
                        "one it takes; also the no-flag job, see --target-sparsity), else adaptive for pilot, "
                        "constant for spred. Giving one for pilot on the embedded data turns the default target off")
    g.add_argument("--target-sparsity", type=flags.target_sparsity_arg, default=None, metavar="S",
                   help="train for a model pruned to exactly S (a fraction in (0, 1), e.g. 0.9): α of pilot/spred/l1 "
                        "is steered by TargetSparsity (grown while pruning to S would remove more than "
                        "--share-tolerance of Σ|x| and the train accuracy holds, else shrunk; decayed over the last "
                        "quarter of the epochs); dense only prunes. The run exports at S if top-1 there is within 1 "
                        "point of unpruned, else the sparsest sweep point that is, and says so last. "
                        f"Default: {MAIN_JOB_TARGET:g} for a new --method pilot run on the embedded data (the no-flag "
                        "job) unless --alpha-schedule, --delta, --l1-threshold, --export-sparsity or --cycles is given; "
                        "else none. 'off': no target (pilot: the adaptive α of Algorithm 1, the sparsest sweep point "
                        "within 1 point exported)")
    g.add_argument("--share-tolerance", type=float, default=None, metavar="TAU",
                   help="τ of --target-sparsity: the share of Σ|x| that pruning to S may remove (default 0.02)")
    g.add_argument("--alpha-p", type=float, default=0.95, help="ratio of --alpha-schedule geometric")
    g.add_argument("--delta", type=float, default=None, help="δ of the adaptive schedule (default 1.01)")
    g.add_argument("--l1-threshold", type=float, default=None, help="K of the adaptive schedule: α only grows while Σ|x| > K")
    g.add_argument("--x-weight-decay", type=float, default=None, help="L2 on m ⊙ w (PILoT's weight_decay) for pilot/spred (default 0)")
    g.add_argument("--sparsity-thresholds", default="0,1e-4,1e-3,1e-2", help="absolute |x| thresholds of the per-epoch sparsity log")

    g = p.add_argument_group("iterative pruning (paper Fig. 4)")
    g.add_argument("--cycles", type=int, default=0, help="prune-and-retrain cycles after the first training (0: none)")
    g.add_argument("--prune-rate", type=float, default=0.2, help="fraction of the remaining weights pruned per cycle")
    g.add_argument("--rewind", choices=["lr", "weight"], default="lr", help="learning-rate rewinding or weight rewinding")
    g.add_argument("--rewind-epoch", type=int, default=1, help="weight rewinding resets to the end of this epoch (0 = init)")

    g = p.add_argument_group("sweep and export")
    g.add_argument("--sweep-sparsities", default=None, help="comma-separated fractions (default: 0,0.5,…,0.999999)")
    g.add_argument("--no-sweep", action="store_true", help="skip the final sweep and export")
    g.add_argument("--export-sparsity", type=float, default=None,
                   help="sparsity of sparse_model.pt (default: the sparsest sweep point within 1 point of unpruned top-1)")

    g = p.add_argument_group("run")
    g.add_argument("--fsdp", action="store_true",
                   help="shard the model with FSDP2 (torch.distributed.fsdp.fully_shard on every block, then the root) "
                        "instead of DDP; PILoT's m, w and momenta are sharded like the parameters. Under torchrun "
                        "(NCCL on GPUs, gloo on CPU); without it, a mesh of one process. Checkpoints hold full "
                        "tensors (rank 0 gathers; they resume with or without --fsdp); the final sweep and export "
                        "run on an unsharded copy. Not with --cycles or --amp fp16")
    g.add_argument("--output-dir", default="runs/train",
                   help="checkpoint.pt, metrics.jsonl, sweep.{json,png}, sparse_model.{pt,json} ('' = write nothing). "
                        "A new run refuses a directory holding an earlier run: see --resume and --overwrite")
    g.add_argument("--resume", default=None,
                   help="checkpoint path, or 'auto' (the output dir's checkpoint if any, else a new run). The run's "
                        "defining flags come from the checkpoint (a different value is refused); --epochs and "
                        "the flags of how and where it runs may change")
    g.add_argument("--overwrite", action="store_true",
                   help="start a new run in an --output-dir that holds an earlier one, deleting its checkpoint, "
                        "metrics, sweep and export")
    g.add_argument("--stop-after", type=int, default=None, metavar="N",
                   help="end this invocation once N epochs (counted from the start of training) are done, "
                        "e.g. to fit a job's time limit; continue with --resume auto")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    g.add_argument("--print-freq", type=int, default=10, help="iterations between progress updates")
    g.add_argument("--progress", dest="progress", action="store_true", default=None,
                   help="tqdm bars on rank 0 (default: when stderr is a terminal)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm bars")
    g.add_argument("--log-iters", action=argparse.BooleanOptionalAction, default=None,
                   help="print a line every --print-freq iterations when bars are off (default: on for --data-path/--synthetic)")
    g.add_argument("--no-tensorboard", dest="tensorboard", action="store_false")
    g.add_argument("--use-deterministic-algorithms", action="store_true")
    return p


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """The command line; ``args.given`` names the flags it spells out (:func:`flags.parse_args`)."""
    return flags.parse_args(get_args_parser(), argv)


def resolve_args(args: argparse.Namespace, world_size: int) -> argparse.Namespace:
    """Every flag filled and checked (:func:`flags.resolve_args`), before anything is built."""
    return flags.resolve_args(args, world_size, get_args_parser())


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    info = init_distributed(args.device, need_group=args.fsdp)
    try:
        return run(resolve_args(args, info.world_size), info)
    finally:
        shutdown()


def run(args: argparse.Namespace, info: DistInfo) -> dict[str, Any]:
    """Train, checkpoint every epoch, then sweep and export (:func:`final_sweep`)."""
    device = info.device
    if args.use_deterministic_algorithms:
        torch.use_deterministic_algorithms(True)
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    ckpt.claim_output_dir(args, info.is_main)
    barrier()  # rank 0 has cleared the directory before anyone writes
    out_dir = args.output_dir if info.is_main else ""
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    resume_path = args.resume_path
    state = ckpt.load(resume_path) if resume_path else None

    # Same seed on every rank for the model; rank-specific streams below (dropout and the
    # like: the data augmentation seeds itself per sample, see data.py).
    ckpt.seed_everything(args.seed)
    in_channels = model_in_channels(args.arch)
    data = build_data(args, info.rank, info.world_size, device, in_channels)
    param_dtype = PARAM_DTYPES[args.param_dtype]
    model = cast_params_(build_model(args.arch, data.num_classes), param_dtype).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model_without_ddp = model
    if args.fsdp:  # the parameters become DTensors, sharded over all ranks; PILoT is built after this
        fsdp_utils.shard_model(model, device.type, info.world_size, split_batchnorm=param_dtype != torch.float32)
    elif info.distributed:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    epochs_total = args.epochs * (args.cycles + 1)
    iters = len(data.train_loader)
    alpha_rule = None
    if args.alpha is None:  # the target mode on --data-path/--synthetic without --alpha
        args.alpha = flags.steps_alpha0(args.lr, args.epochs * iters)
        alpha_rule = (f"α0 = {TARGET_ALPHA_STEPS:g} / (lr {args.lr:g} x {args.epochs} epochs x {iters} steps) = "
                      f"{args.alpha:.3g} (give --alpha to choose it)")
    optimizer = build_optimizer(model_without_ddp, args)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda_factory(args.lr_warmup_epochs * iters, args.epochs * iters))
    alpha_scheduler = build_alpha_scheduler(optimizer, args, args.epochs, chance=100.0 / data.num_classes)
    scaler = torch.amp.GradScaler(device.type) if args.amp == "fp16" else None
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    masks: Optional[Masks] = None
    rewind_snap: Optional[dict[str, Any]] = None
    cycle_done = 0  # cycles whose pruning has been applied

    start_epoch = 0
    if state is not None:
        if args.fsdp and state.get("masks"):
            raise SystemExit(f"{resume_path} is from iterative pruning (--cycles), which --fsdp does not support; "
                             "resume it without --fsdp")
        if args.fsdp:  # rank 0's full tensors, sharded onto every rank
            model_sd, optim_sd = state.pop("model"), state.pop("optimizer")
            if info.is_main:  # also a DDP checkpoint (optimizer keyed by position)
                optim_sd = fsdp_utils.optimizer_sd_to_fqns(optim_sd, model_without_ddp, optimizer)
            else:
                model_sd, optim_sd = {}, {}
            fsdp_utils.load_full_state_dicts(model_without_ddp, optimizer, model_sd, optim_sd)
            del model_sd, optim_sd
        else:
            model_without_ddp.load_state_dict(state["model"])
            # also an FSDP checkpoint (optimizer keyed by parameter name)
            optimizer.load_state_dict(fsdp_utils.optimizer_sd_to_ids(state["optimizer"], model_without_ddp, optimizer))
        if args.method == "l1":  # a checkpoint from before l1's α lived in SGD's group
            for group in optimizer.param_groups:
                group.setdefault("alpha", args.alpha)
        lr_scheduler.load_state_dict(state["lr_scheduler"])
        if alpha_scheduler is not None:
            alpha_scheduler.load_state_dict(state["alpha_scheduler"])
        saved_epochs = (state.get("args") or {}).get("epochs", args.epochs)
        if saved_epochs != args.epochs:  # --epochs changed (checked in resolve_args): the schedules span the new length
            lr_was = optimizer.param_groups[0]["lr"]
            for group, base, factor in zip(optimizer.param_groups, lr_scheduler.base_lrs, lr_scheduler.lr_lambdas):
                group["lr"] = base * factor(lr_scheduler.last_epoch)
            if alpha_scheduler is not None and hasattr(alpha_scheduler, "total_epochs"):
                alpha_scheduler.total_epochs = args.epochs
            args.resume_notes.append(f"lr at this point: {lr_was:.4g} on the {saved_epochs}-epoch schedule, "
                                     f"{optimizer.param_groups[0]['lr']:.4g} on the {args.epochs}-epoch one")
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        if state.get("masks"):
            masks = Masks(model_without_ddp, state["masks"], enforce=sparsity_optimizer(optimizer) is None)
        rewind_snap = state.get("rewind_snapshot")
        cycle_done = state.get("cycle", 0)
        start_epoch = state["epoch"] + 1
        rngs = state["rng"]
        if len(rngs) == info.world_size:
            ckpt.set_rng_state(rngs[info.rank])
        else:  # a different world size cannot continue the same streams
            ckpt.seed_everything(args.seed + 1000 * start_epoch + info.rank)
    else:
        ckpt.seed_everything(args.seed + info.rank)
        if args.cycles and args.rewind == "weight" and args.rewind_epoch == 0:
            rewind_snap = snapshot(model_without_ddp, optimizer)
    train_model = torch.compile(model) if args.compile else model
    # Evaluation runs on the plain module: ranks may hold different numbers of val
    # batches, and a DDP forward would expect matching collectives.  An FSDP2 forward
    # is itself a collective: evaluate() then runs the ranks in lockstep.
    eval_model = torch.compile(model_without_ddp) if args.compile else model_without_ddp

    log = Logger(info, out_dir, args.tensorboard, state["epoch"] if state is not None else None)
    target_mode = isinstance(alpha_scheduler, TargetSparsity)
    n_reparam = n_weights(model_without_ddp)
    n_all = sum(p.numel() for p in model_without_ddp.parameters())
    log.print(f"data: {data.description}")
    log.print(run_line(args, n_all, n_reparam, device, info.world_size, target_mode))
    if alpha_rule:
        log.print(alpha_rule)
    if resume_path:
        log.print(f"resumed from {resume_path} at epoch {start_epoch}; the run's settings come from it")
        for note in args.resume_notes:
            log.print(f"  applies from here: {note}")

    history: list[dict[str, Any]] = []
    run_start = time.perf_counter()
    end_epoch = epochs_total if args.stop_after is None else min(epochs_total, args.stop_after)
    last_saved = state["epoch"] if state is not None else None  # the epoch of the newest checkpoint
    try:
        for epoch in range(start_epoch, end_epoch):
            cycle, epoch_in_cycle = divmod(epoch, args.epochs)
            if cycle > cycle_done:
                masks, target = start_cycle(model_without_ddp, optimizer, cycle, args.prune_rate, args.rewind, rewind_snap)
                for group in optimizer.param_groups:
                    if "initial_alpha" in group:
                        group["alpha"] = group["initial_alpha"]
                alpha_scheduler = build_alpha_scheduler(optimizer, args, args.epochs, chance=100.0 / data.num_classes)
                cycle_done = cycle
                log.print(f"cycle {cycle}: pruned to {100 * target:.2f}% sparsity, {args.rewind} rewinding")
            if data.train_sampler is not None:
                data.train_sampler.set_epoch(epoch)
            t0 = time.perf_counter()
            train = train_one_epoch(train_model, model_without_ddp, criterion, optimizer, lr_scheduler, data.train_loader,
                                    args, info, scaler, masks, desc=f"epoch {epoch + 1}/{epochs_total}")
            broadcast_buffers_(model_without_ddp)
            step_alpha(alpha_scheduler, train["acc"])
            val = evaluate(eval_model, criterion, data.val_loader, args, info, lockstep=args.fsdp)
            record: dict[str, Any] = {
                "epoch": epoch, "train": train, "val": val,
                "lr": train["lr"], "alpha": current_alpha(optimizer),
                "l1": l1_norm(model_without_ddp, optimizer),
                "sparsity": sparsities_at(model_without_ddp, optimizer, args.thresholds),
                "time_s": time.perf_counter() - t0,
            }
            if args.target_sparsity is not None:  # what pruning to S would remove (read by the controller too)
                last = getattr(alpha_scheduler, "last_share", None)
                record["share"] = last if last is not None else share_at(optimizer, args.target_sparsity)
            if getattr(alpha_scheduler, "last_action", None) == "chance":
                record["alpha_action"] = "cut: train accuracy near chance"
            if args.cycles:
                record["cycle"] = cycle
            if masks is not None:
                bad = masks.violations()
                record["pruned_nonzero"] = bad
                if bad:
                    raise RuntimeError(f"{bad} pruned weights are not zero after epoch {epoch + 1}; the mask was not kept")
            if (rewind_snap is None and args.cycles and args.rewind == "weight" and cycle == 0
                    and epoch_in_cycle + 1 == args.rewind_epoch):
                rewind_snap = snapshot(model_without_ddp, optimizer)
            if not (math.isfinite(val["loss"]) and math.isfinite(record["l1"])):  # the last step broke the weights
                raise NonFiniteLossError(f"the weights are not finite after epoch {epoch + 1} (validation loss "
                                         f"{val['loss']}, L1 norm {record['l1']})")
            history.append(record)
            log.print(epoch_line(record, epochs_total, args.target_sparsity))
            log.epoch(record)
            save_checkpoint(args, info, epoch, model_without_ddp, optimizer, lr_scheduler, alpha_scheduler, scaler,
                            masks, rewind_snap, cycle_done)
            last_saved = epoch
    except NonFiniteLossError as e:
        log.close()
        kept = ("no checkpoint is written" if not args.output_dir else
                "no checkpoint was written" if last_saved is None else
                f"the checkpoint of epoch {last_saved + 1} is kept in {os.path.join(args.output_dir, ckpt.CHECKPOINT_NAME)}")
        raise NonFiniteLossError(f"{e}. The run stops; {kept}. Lower --lr or --alpha (or check the data), then start "
                                 "over with --overwrite") from None
    train_time = time.perf_counter() - run_start

    finished = end_epoch == epochs_total
    result: dict[str, Any] = {"model": model_without_ddp, "optimizer": optimizer, "history": history,
                              "train_time_s": train_time, "args": args, "masks": masks, "finished": finished,
                              "fsdp": args.fsdp}
    if not finished:
        log.print(f"stopped after epoch {end_epoch} of {epochs_total} (--stop-after); continue with --resume auto")
    elif not args.no_sweep and not args.synthetic:
        result.update(final_sweep(args, info, model_without_ddp, eval_model, optimizer, criterion, data, log))
    log.close()
    return result


def save_checkpoint(args, info, epoch, model, optimizer, lr_scheduler, alpha_scheduler, scaler, masks, rewind_snap,
                    cycle_done) -> None:
    rngs = all_gather_object(ckpt.rng_state())  # every rank's streams, in rank order
    if args.fsdp:  # a collective: full CPU tensors on rank 0; optimizer keyed by parameter name
        model_sd, optim_sd = fsdp_utils.full_state_dicts(model, optimizer) if args.output_dir else ({}, {})
    if not (info.is_main and args.output_dir):
        return
    if not args.fsdp:
        model_sd, optim_sd = model.state_dict(), optimizer.state_dict()
    ckpt.atomic_save({
        "epoch": epoch,
        "args": {k: v for k, v in vars(args).items()
                 if k not in ("resume_path", "resume_notes") and isinstance(v, (int, float, str, bool, list, type(None)))},
        "model": model_sd,
        "optimizer": optim_sd,
        "lr_scheduler": lr_scheduler.state_dict(),
        "alpha_scheduler": alpha_scheduler.state_dict() if alpha_scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": rngs,
        "world_size": info.world_size,
        "sampler_epoch": epoch + 1,
        "masks": masks.state_dict() if masks is not None else None,
        "rewind_snapshot": rewind_snap,
        "cycle": cycle_done,
    }, os.path.join(args.output_dir, ckpt.CHECKPOINT_NAME))
def final_sweep(args, info, model_without_ddp, eval_model, optimizer, criterion, data, log) -> dict[str, Any]:
    """Accuracy vs. magnitude-pruned sparsity (no fine-tuning), then the export that
    :func:`report.choose_export` picks: ``S`` of ``--target-sparsity`` where top-1 there is
    within 1 point of unpruned, else the sparsest sweep point that is; nothing for a model
    no better than chance or without weights (the last line says why).

    With ``--fsdp`` both run on a full, unsharded copy of the model that every rank
    gathers (each rank evaluates its part of the validation set, as during training);
    the pruned tensors are then those PILoT splits by default (``optimizer=None``).
    """
    opt = sparsity_optimizer(optimizer)
    out: dict[str, Any] = {}
    if args.fsdp:
        fresh = cast_params_(build_model(args.arch, data.num_classes), PARAM_DTYPES[args.param_dtype]).to(info.device)
        if args.channels_last:
            fresh = fresh.to(memory_format=torch.channels_last)
        model_without_ddp = eval_model = fsdp_utils.unsharded_copy(model_without_ddp, fresh)
        opt = None
        out["full_model"] = model_without_ddp
    results = sweep(model_without_ddp, opt, lambda: evaluate(eval_model, criterion, data.val_loader, args, info, progress=False),
                    args.sweep)
    rows = sweep_rows(results)
    unpruned = rows[0]
    choice = choose_export(rows, data.num_classes, results[0][2]["images"], args.target_sparsity, args.export_sparsity)
    pick, target, skipped, export_s = choice["pick"], choice["target"], choice["skipped"], choice["sparsity"]
    log.print(format_table(rows, f"accuracy vs sparsity — {args.method}, {args.arch}: global magnitude pruning of "
                                 "the tensors with ndim >= 2, no fine-tuning"))
    if pick is not None:
        log.print(f"sparsest within 1 point of unpruned top-1 ({unpruned['top1']:.2f}%): "
                  f"{100 * pick['sparsity']:.2f}% sparse at {pick['top1']:.2f}%")
    exported = None
    if export_s is not None:
        state_dict = export_state_dict(model_without_ddp, opt, sparsity=export_s)
        if args.param_dtype != "fp32":  # the unmodified model's dtype (an exact upcast)
            for key, value in state_dict.items():
                if isinstance(value, torch.Tensor) and value.is_floating_point():
                    state_dict[key] = value.float()
        fresh = build_model(args.arch, data.num_classes)
        fresh.load_state_dict(state_dict, strict=True)
        exported = sparsity_report(fresh).sparsity
        out["export_measured_sparsity"] = exported
        if exported >= 1.0:
            skipped = (f"--export-sparsity {export_s:g} prunes every weight of the tensors with ndim >= 2 "
                       f"({n_weights(fresh):,} of them); give a smaller one")
    if target is not None and target["met"] and exported is not None:
        target["reached"] = exported  # the exported model's measure of the same pruning
    export = None if skipped else {"sparsity": export_s, "reason": choice["reason"]}
    out.update({"sweep": rows, "export_sparsity": export_s, "export": export})
    if skipped:
        out["export_skipped"] = skipped
    if target is not None:
        out["target"] = target
    if info.is_main and args.output_dir:
        d = args.output_dir
        meta = {"method": args.method, "arch": args.arch, "num_classes": data.num_classes, "epochs": args.epochs,
                "cycles": args.cycles, "seed": args.seed, "world_size": info.world_size}
        write_json(os.path.join(d, "sweep.json"), {**meta, "rows": rows, "best_within_1pt": pick, "export": export,
                                                   "export_skipped": skipped,
                                                   **({"target": target} if target is not None else {})})
        plot_sweeps(os.path.join(d, "sweep.png"), {args.method: rows}, title=f"{args.arch}, {args.method}",
                    target=args.target_sparsity)
        if not skipped:
            ckpt.atomic_save(state_dict, os.path.join(d, "sparse_model.pt"))
            top1 = min(rows, key=lambda r: abs(r["target"] - export_s))
            write_json(os.path.join(d, "sparse_model.json"),
                       {**meta, "target_sparsity": export_s, "sparsity": exported, "reason": choice["reason"],
                        "top1_at_nearest_sweep_point": top1["top1"] if math.isclose(top1["target"], export_s) else None})
            log.print(f"exported {os.path.join(d, 'sparse_model.pt')}: {100 * exported:.2f}% of the weights in tensors "
                      f"with ndim >= 2 are exact zeros; loads with {args.arch}.load_state_dict(strict=True)")
    for line in target_lines(target, pick, skipped):
        log.print(line)
    if skipped:
        log.print(f"no sparse_model.pt: {skipped}")
    barrier()
    return out


def target_lines(target: Optional[dict[str, Any]], pick: Optional[dict[str, float]], skipped: Optional[str]) -> list[str]:
    """The run's last word on ``--target-sparsity``: top-1 at ``S`` next to unpruned and,
    where ``S`` was not reached within 1 point, what was exported instead."""
    if target is None:
        return []
    s, drop = target["sparsity"], target["top1"] - target["top1_unpruned"]
    at = (f"top-1 {target['top1']:.2f}% at {100 * target['reached']:.2f}% sparse, unpruned "
          f"{target['top1_unpruned']:.2f}% ({drop:+.2f} points")
    if target["met"]:
        return [f"target sparsity {100 * s:g}%: {at})"]
    below = ", more than 1 below unpruned" if drop < -1.0 else ""  # else not met for being at chance
    lines = [f"target sparsity {100 * s:g}% not reached: {at}{below})"]
    if not skipped:
        lines.append(f"exported instead: {100 * pick['sparsity']:.2f}% sparse at {pick['top1']:.2f}% top-1, the "
                     "sparsest sweep point within 1 point of unpruned")
    return lines


def n_weights(model: nn.Module) -> int:
    """Entries of the tensors PILoT splits by default (the ones pruned and exported sparse)."""
    return sum(p.numel() for p in model.parameters() if splits_by_default(p))


if __name__ == "__main__":
    main()
    # The returned model (FSDP/DDP) holds the process group; collect it while the interpreter
    # is alive: a gloo group freed during interpreter shutdown can abort the process.
    gc.collect()
