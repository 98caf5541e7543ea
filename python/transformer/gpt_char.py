"""A small character-level GPT on text that ships with Python (``pydoc_data.topics``, ~465 KB,
no download): AdamW + global magnitude pruning, AdamW + L1 and HAM-AdamW compared at
several sparsities (issue 20, item 3).

Each method trains the same model from the same seed; afterwards the weights with
``ndim >= 2`` are pruned globally by magnitude to each sparsity (no fine-tuning,
:func:`pilot_kernels.sweep`) and the validation loss is measured.

    python python/transformer/gpt_char.py --steps 300 --seeds 0,1,2 --out results.json
    python python/transformer/gpt_char.py --tiny           # seconds: a smoke run
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from pilot_kernels import HAMAdamW, add_l1_subgradient_, sweep
from pilot_kernels.init import splits_by_default

METHODS = ("adamw", "adamw_l1", "ham")


@dataclass
class Config:
    n_layer: int = 2
    n_head: int = 4
    d_model: int = 128
    ctx: int = 64
    batch: int = 32
    steps: int = 300
    lr: float = 3e-3
    weight_decay: float = 0.1
    l1: float = 1e-5              # adamw_l1: strength of the L1 subgradient on the weights
    ham_alpha: float = 200.0
    ham_beta: float = 1e-3
    eval_batches: int = 8
    sparsities: list = field(default_factory=lambda: [0.5, 0.7, 0.9])


def load_text() -> str:
    """The pydoc topics (Python's own help texts), in a fixed order."""
    from pydoc_data.topics import topics

    return "\n".join(topics[k] for k in sorted(topics))


class Data:
    def __init__(self, text: str, ctx: int):
        chars = sorted(set(text))
        self.vocab = len(chars)
        index = {c: i for i, c in enumerate(chars)}
        ids = torch.tensor([index[c] for c in text], dtype=torch.long)
        cut = int(0.9 * len(ids))
        self.train, self.val, self.ctx = ids[:cut], ids[cut:], ctx

    def batch(self, split: str, n: int, gen: torch.Generator):
        ids = self.train if split == "train" else self.val
        starts = torch.randint(len(ids) - self.ctx - 1, (n,), generator=gen)
        x = torch.stack([ids[s:s + self.ctx] for s in starts.tolist()])
        y = torch.stack([ids[s + 1:s + 1 + self.ctx] for s in starts.tolist()])
        return x, y


class Block(nn.Module):
    def __init__(self, d: int, n_head: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.n_head = n_head

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.n_head, d // self.n_head).transpose(1, 3).unbind(2)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, vocab: int, cfg: Config):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, cfg.d_model), nn.Embedding(cfg.ctx, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg.d_model, cfg.n_head) for _ in range(cfg.n_layer))
        self.ln, self.head = nn.LayerNorm(cfg.d_model), nn.Linear(cfg.d_model, vocab, bias=False)

    def forward(self, idx, targets):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        for blk in self.blocks:
            x = blk(x)
        return F.cross_entropy(self.head(self.ln(x)).flatten(0, 1), targets.flatten())


def make_optimizer(method: str, model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    if method == "ham":
        return HAMAdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                        alpha=cfg.ham_alpha, beta=cfg.ham_beta)
    if method in ("adamw", "adamw_l1"):
        return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


@torch.no_grad()
def val_loss(model: nn.Module, data: Data, cfg: Config, seed: int) -> float:
    gen = torch.Generator().manual_seed(10_000 + seed)
    model.eval()
    losses = [model(*data.batch("val", cfg.batch, gen)).item() for _ in range(cfg.eval_batches)]
    model.train()
    return sum(losses) / len(losses)


def run(method: str, cfg: Config, seed: int, data: Data) -> dict:
    """Train one method from ``seed``; the validation loss dense and at each sparsity."""
    torch.manual_seed(seed)
    model = GPT(data.vocab, cfg)
    opt = make_optimizer(method, model, cfg)
    weights = [p for p in model.parameters() if splits_by_default(p)]
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for step in range(cfg.steps):
        lr = cfg.lr * min(1.0, (step + 1) / max(1, cfg.steps // 10)) * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        for g in opt.param_groups:
            g["lr"] = lr
        loss = model(*data.batch("train", cfg.batch, gen))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if method == "adamw_l1":
            add_l1_subgradient_(weights, cfg.l1)
        opt.step()
    seconds = time.perf_counter() - t0
    dense = val_loss(model, data, cfg, seed)
    pruned = sweep(model, None, lambda: val_loss(model, data, cfg, seed), cfg.sparsities)
    return {"method": method, "seed": seed, "train_seconds": seconds, "val_loss_dense": dense,
            "pruned": [{"target": s, "sparsity": got, "val_loss": v} for s, got, v in pruned]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--steps", type=int, default=Config.steps)
    ap.add_argument("--tiny", action="store_true", help="a seconds-long smoke run")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = Config(steps=args.steps)
    if args.tiny:
        cfg = Config(n_layer=1, n_head=2, d_model=16, ctx=16, batch=4, steps=min(args.steps, 3), eval_batches=1)
    data = Data(load_text(), cfg.ctx)
    results = [run(m, cfg, int(s), data) for s in args.seeds.split(",") for m in args.methods.split(",")]
    for r in results:
        cells = "  ".join(f"{p['target']:.0%}: {p['val_loss']:.3f}" for p in r["pruned"])
        print(f"{r['method']:<9} seed {r['seed']}  dense {r['val_loss_dense']:.3f}  {cells}  ({r['train_seconds']:.0f} s)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"config": asdict(cfg), "torch": torch.__version__, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
