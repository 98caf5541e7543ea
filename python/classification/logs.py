"""The run's log: console lines (rank 0), ``metrics.jsonl`` and TensorBoard (when importable)."""
from __future__ import annotations

import argparse
import json
import os
from typing import Any, Optional

import checkpoint as ckpt
from dist import DistInfo
from methods import uses_pilot


class Logger:
    """Console (rank 0), ``metrics.jsonl`` and TensorBoard (if importable)."""

    def __init__(self, info: DistInfo, output_dir: str, tensorboard: bool, resume_epoch: Optional[int]):
        self.on = info.is_main
        self.jsonl = os.path.join(output_dir, "metrics.jsonl") if (output_dir and self.on) else None
        self.tb = None
        if self.jsonl:
            kept = []
            if resume_epoch is not None and os.path.exists(self.jsonl):
                with open(self.jsonl) as f:
                    kept = [ln for ln in f if ckpt.epoch_of(ln) is not None and ckpt.epoch_of(ln) <= resume_epoch]
            with open(self.jsonl, "w") as f:
                f.writelines(kept)
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    self.tb = SummaryWriter(os.path.join(output_dir, "tb"))
                except Exception:  # tensorboard not installed
                    self.tb = None

    def print(self, *a, **k) -> None:
        if self.on:
            print(*a, **k, flush=True)

    def epoch(self, record: dict[str, Any]) -> None:
        if not self.on:
            return
        if self.jsonl:
            with open(self.jsonl, "a") as f:
                f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            step = record["epoch"]
            for key, value in _flatten(record).items():
                if isinstance(value, (int, float)) and key != "epoch":
                    self.tb.add_scalar(key, value, step)
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def epoch_line(r: dict[str, Any], total: int, target: Optional[float] = None) -> str:
    sp = " ".join(f"{t}:{100 * s:.1f}%" for t, s in r["sparsity"].items())
    cyc = f" cycle {r['cycle']}" if "cycle" in r else ""
    share = f" share@{100 * target:g}% {r['share']:.4f}" if "share" in r and target is not None else ""
    return (f"epoch {r['epoch'] + 1:>3}/{total}{cyc} | train loss {r['train']['loss']:.4f} acc {r['train']['acc']:6.2f}% "
            f"| val top1 {r['val']['top1']:6.2f}% top5 {r['val']['top5']:6.2f}% | lr {r['lr']:.4g} | "
            f"α {r['alpha']:.3g}{' (' + r['alpha_action'] + ')' if 'alpha_action' in r else ''}{share} | L1 {r['l1']:.4g} | sparsity |x|<=t {sp} | {r['time_s']:.1f}s")


def run_line(args: argparse.Namespace, n_params: int, n_reparam: int, device: Any, world_size: int,
             target_mode: bool) -> str:
    """The log's model line: architecture, size, device and the method's settings."""
    parts = [f"model: {args.arch}, {n_params:,} parameters ({n_reparam:,} in tensors with ndim >= 2)",
             f"device {device} x {world_size}" + (" (FSDP2)" if args.fsdp else "")]
    if args.param_dtype != "fp32":
        parts.append(f"params {args.param_dtype}")
    parts.append(f"method {args.method} ({', '.join(method_settings(args, target_mode))})")
    if args.target_sparsity is not None:
        how = f"α steered, τ={args.share_tolerance:g}" if target_mode else "pruned at the end"
        default = (" [the no-flag job's default; --target-sparsity off: adaptive α, as before]"
                   if getattr(args, "target_default", False) else "")
        parts.append(f"target sparsity {100 * args.target_sparsity:g}% ({how}){default}")
    cycles = (f" ({args.cycles + 1} cycles, prune rate {args.prune_rate:g}, {args.rewind} rewinding)"
              if args.cycles else "")
    parts.append(f"lr {args.lr:g}, batch {args.batch_size}x{world_size}, {args.epochs * (args.cycles + 1)} epochs"
                 + cycles)
    return " | ".join(parts)


def method_settings(args: argparse.Namespace, target_mode: bool) -> list[str]:
    """The method's hyperparameters, as the model line lists them."""
    if uses_pilot(args.method):
        adaptive = [f"δ={args.delta:g}", f"K={args.l1_threshold:g}"] if args.alpha_schedule == "adaptive" else []
        return [f"β={args.beta:g}", f"α0={args.alpha:g}", f"schedule {args.alpha_schedule}", *adaptive,
                f"x-wd={args.x_weight_decay:g}", f"wd(rest)={args.wd:g}"]
    l1 = [f"L1 α={args.alpha:g}" + (" (α0)" if target_mode else "")] if args.method == "l1" else []
    return [f"wd={args.wd:g}", *l1]
