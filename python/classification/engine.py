"""One training epoch and one evaluation pass (metrics all-reduced over ranks)."""
from __future__ import annotations

import contextlib
import time
from typing import Optional

import torch
from torch import nn

from pilot_kernels.init import splits_by_default
from pilot_kernels.sparsity import add_l1_subgradient_

from dist import DistInfo, all_reduce_max, all_reduce_sum
from models import PARAM_DTYPES

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# Steps between the checks for a non-finite loss: one host sync (and, with several
# processes, one all-reduce of a flag) each; torchvision's reference syncs every step.
NONFINITE_CHECK_EVERY = 10


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the run stops before the next checkpoint."""


def autocast(device: torch.device, amp: Optional[str]):
    if not amp:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=AMP_DTYPES[amp])


def _progress(iterable, total: int, desc: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)


def _to_device(images, targets, device, args):
    """The batch on ``device``, images in the parameters' dtype (``--param-dtype``)."""
    dtype = PARAM_DTYPES[getattr(args, "param_dtype", "fp32")]
    images = images.to(device, dtype=dtype, non_blocking=True)
    targets = targets.to(device, non_blocking=True)
    if args.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, targets


def train_one_epoch(
    model: nn.Module,
    model_without_ddp: nn.Module,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler,
    loader,
    args,
    info: DistInfo,
    scaler: Optional[torch.amp.GradScaler],
    masks=None,
    desc: str = "train",
) -> dict[str, float]:
    """Train one epoch; returns all-reduced ``loss``, ``acc`` (percent), ``images``,
    and this rank's ``time_s``, ``images_per_s`` and ``lr`` (of the epoch's last step).

    ``masks`` (:class:`~pruning.Masks`, iterative pruning of dense/l1) zeroes
    the pruned gradients before the step and the pruned weights after it.

    Raises :class:`NonFiniteLossError` (on every rank alike) once the running loss sum
    is NaN or infinite, checked every :data:`NONFINITE_CHECK_EVERY` steps and after the
    last one.
    """
    model.train()
    device = info.device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen = 0
    last_lr = float("nan")
    steps = len(loader)
    bar = _progress(loader, steps, desc, info.is_main and args.progress)
    start = time.perf_counter()
    for i, (images, targets) in enumerate(bar):
        images, targets = _to_device(images, targets, device, args)
        with autocast(device, args.amp):
            output = model(images)
            loss = criterion(output.float(), targets)  # bf16 logits (--param-dtype bf16): the loss in fp32
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
        else:
            loss.backward()
        if masks is not None:
            masks.mask_grads_()
        if args.method == "l1":
            if scaler is not None:
                scaler.unscale_(optimizer)
            # α from the group (an α schedule, e.g. --target-sparsity, may change it).
            for group in optimizer.param_groups:
                add_l1_subgradient_((p for p in group["params"] if splits_by_default(p)), float(group["alpha"]))
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        if masks is not None:
            masks.mask_weights_()
        last_lr = optimizer.param_groups[0]["lr"]
        lr_scheduler.step()

        n = targets.shape[0]
        seen += n
        loss_sum += loss.detach().double() * n
        correct += (output.detach().argmax(dim=1) == targets).sum()
        if (i + 1) % NONFINITE_CHECK_EVERY == 0 or i == steps - 1:
            # A NaN or inf loss anywhere in the epoch so far makes the sum non-finite.
            if all_reduce_max(int(not torch.isfinite(loss_sum)), device):
                first = i + 1 - i % NONFINITE_CHECK_EVERY  # the first step after the previous check
                raise NonFiniteLossError(f"the training loss became NaN or inf in {desc}, iterations {first}-{i + 1} "
                                         f"of {steps} (lr {last_lr:.4g})")
        if args.print_freq > 0 and (i % args.print_freq == 0 or i == steps - 1) and info.is_main:
            msg = dict(loss=f"{loss.item():.4f}", lr=f"{optimizer.param_groups[0]['lr']:.4g}")
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(msg, refresh=False)
            elif args.log_iters:
                print(f"  {desc} [{i + 1}/{steps}] " + " ".join(f"{k} {v}" for k, v in msg.items()), flush=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    loss_total, correct_total, n_total = all_reduce_sum([loss_sum.item(), float(correct.item()), float(seen)], device)
    return {
        "loss": loss_total / max(n_total, 1),
        "acc": 100.0 * correct_total / max(n_total, 1),
        "images": int(n_total),
        "time_s": elapsed,
        "images_per_s": n_total / elapsed if elapsed > 0 else float("nan"),
        "lr": float(last_lr),
    }


@torch.no_grad()
def evaluate(model: nn.Module, criterion: nn.Module, loader, args, info: DistInfo, desc: str = "val",
             progress: bool = True, lockstep: bool = False) -> dict[str, float]:
    """Top-1/top-5 accuracy (percent) and mean loss over the whole validation set.

    ``lockstep``: every rank runs as many forward passes as the rank with the most
    batches, the extra ones on a batch it already saw, with the outputs discarded.  An
    FSDP2 model all-gathers its parameters in every forward, a collective, so ranks
    with fewer validation images than others would otherwise hang.
    """
    model.eval()
    device = info.device
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top1, top5, n
    bar = _progress(loader, len(loader), desc, info.is_main and args.progress and progress)
    # Agreed on before the first forward: a collective between FSDP's all-gathers would deadlock.
    extra = all_reduce_max(len(loader), device) - len(loader) if lockstep else 0
    images = None
    for images, targets in bar:
        images, targets = _to_device(images, targets, device, args)
        with autocast(device, args.amp):
            output = model(images)
            loss = criterion(output.float(), targets)
        k = min(5, output.shape[1])
        top = output.float().topk(k, dim=1).indices
        hit = top == targets[:, None]
        n = targets.shape[0]
        sums += torch.stack([
            loss.double() * n,
            hit[:, 0].sum().double(),
            hit.any(dim=1).sum().double(),
            torch.tensor(float(n), dtype=torch.float64, device=device),
        ])
    if extra > 0:
        if images is None:  # no batch of its own: any sample has the right shape
            images, _ = _to_device(loader.dataset[0][0][None], torch.zeros(1), device, args)
        for _ in range(extra):
            with autocast(device, args.amp):
                model(images)
    loss_sum, top1, top5, n = all_reduce_sum(sums.tolist(), device)
    n = max(n, 1.0)
    return {"loss": loss_sum / n, "top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n, "images": int(n)}
