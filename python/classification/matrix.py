"""The generalization matrix of ``compare_methods.py --matrix`` (issue 19): its data, plan and baselines.

The question: do the sparsifying methods beat dense training + magnitude pruning on data
and models nobody tuned them for?  So the matrix trains the way a new user would —
``train.py`` with the flags of the issue's report (``-b 32 --lr 0.05``, crops at the image
size) and every other flag at its default — over

* data: the embedded sets (``digits``, ``mnist``) rendered once as RGB PNG ImageFolders
  (:func:`render_imagefolder`) at 32 and 64 px and read through ``--data-path`` like a
  user's photos (ImageNet transforms: RandomResizedCrop, flips, ImageNet mean/std);
* models: torchvision ``resnet18`` (BatchNorm), torchvision ``squeezenet1_1`` (no
  normalization layer at all) and the embedded ``digits_cnn``.  ``digits_cnn`` takes
  1-channel images, which ``train.py`` refuses to combine with ``--data-path``, so its
  cells read the same images, split and size from the in-memory loader
  (``--dataset NAME --image-size S``, random shifts instead of crops and flips);
* budgets in optimizer steps: ``short`` (at most 300) and ``long`` (at least 1,500),
  turned into whole epochs of the cell's data (:func:`epochs_for`);
* targets 0.9, 0.95, 0.98: ``pilot``, ``spred`` and ``l1`` trained with
  ``--target-sparsity S`` and pruned one-shot to S; one dense training per cell and seed,
  pruned one-shot to every S by global magnitude (``train.py``'s sweep) and by layer-wise
  magnitude (:func:`layerwise_rows`: the same fraction of every weight tensor).

DataLoader workers are off (``-j 0``): the runs themselves use the cores, and the
augmentation does not depend on the worker count (``data.SeededSampler``).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from data import DIGITS_SPLIT_SEED, DIGITS_VAL_FRACTION, embedded_dataset, imagefolder_splits, load_embedded
from models import DIGITS_ARCH, build_model

DATASETS = ("digits", "mnist")
SIZES = (32, 64)
ARCHS = ("digits_cnn", "resnet18", "squeezenet1_1")
# Optimizer steps: "short" at most 300, "long" at least 1,500; "smoke" is one epoch (CI).
BUDGETS = {"short": 300, "long": 1500, "smoke": 0}
TARGETS = (0.9, 0.95, 0.98)
METHODS = ("pilot", "spred", "l1")  # trained aimed at each target; "dense" once per cell and seed
BATCH = 32
LR = 0.05
NORMALIZATION = {"digits_cnn": "BatchNorm", "resnet18": "BatchNorm", "squeezenet1_1": "none"}
DEFAULT_ROOT = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pilot_kernels" / "imagefolders"


# ---------------------------------------------------------------------- data
def _split_indices(labels: torch.Tensor) -> tuple[list[int], list[int]]:
    """The train/val split of ``data.split_embedded`` (stratified, same seed and fraction)."""
    from sklearn.model_selection import train_test_split

    idx = list(range(len(labels)))
    train, val = train_test_split(idx, test_size=DIGITS_VAL_FRACTION, random_state=DIGITS_SPLIT_SEED,
                                  stratify=labels.numpy())
    return sorted(train), sorted(val)


def imagefolder_path(name: str, size: int, root: Path = DEFAULT_ROOT) -> Path:
    """Where :func:`render_imagefolder` puts the set ``name`` at ``size`` px."""
    return Path(root) / f"{name}-{size}px"


def render_imagefolder(name: str, size: int, root: Path = DEFAULT_ROOT) -> Path:
    """The embedded set ``name`` as ``root/<name>-<size>px/{train,val}/<label>/<index>.png``.

    The grey images are resized to ``size`` (bilinear, antialiased when shrinking),
    quantized to 8 bits and repeated into RGB; the split is the in-memory loader's, so a
    ``--data-path`` cell and an embedded cell see the same images.  Rendered once into a
    temporary folder and renamed into place, so a folder that exists is complete (and is
    reused)."""
    from PIL import Image

    spec = embedded_dataset(name)
    if isinstance(size, bool) or not isinstance(size, int) or size < 8:
        raise ValueError(f"size {size!r}: give an image side in pixels >= 8")
    dest = imagefolder_path(name, size, root)
    if (dest / "train").is_dir() and (dest / "val").is_dir():
        return dest
    images, labels = spec.load()
    images = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", align_corners=False,
                                             antialias=size < images.shape[-1])
    pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8)[:, 0].numpy()
    train, val = _split_indices(labels)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        for split, indices in (("train", train), ("val", val)):
            for c in range(spec.num_classes):
                (tmp / split / str(c)).mkdir(parents=True)
            for i in indices:
                Image.fromarray(pixels[i]).convert("RGB").save(tmp / split / str(int(labels[i])) / f"{i:05d}.png")
        (tmp / "source.json").write_text(json.dumps({"dataset": name, "size": size, "train": len(train),
                                                     "val": len(val), "from": spec.description}, indent=1))
        try:
            os.replace(tmp, dest)
        except OSError:  # another process rendered it first
            if not (dest / "train").is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


# ---------------------------------------------------------------------- plan
@dataclass(frozen=True)
class Cell:
    """One (data, size, model, budget) combination of the matrix."""

    dataset: str
    size: int
    arch: str
    budget: str

    @property
    def key(self) -> str:
        return f"{self.dataset}{self.size}-{self.arch}-{self.budget}"

    def train_images(self) -> int:
        n = embedded_dataset(self.dataset).num_images
        return n - math.ceil(n * DIGITS_VAL_FRACTION)  # train_test_split's rounding of the val share

    def epochs(self) -> int:
        return epochs_for(self.budget, self.train_images())

    def steps(self) -> int:
        return self.epochs() * steps_per_epoch(self.train_images())

    def data_flags(self, root: Path) -> list[str]:
        if self.arch == DIGITS_ARCH:
            return ["--dataset", self.dataset, "--image-size", str(self.size)]
        return ["--data-path", str(imagefolder_path(self.dataset, self.size, root)),
                "--train-crop-size", str(self.size), "--val-resize-size", str(self.size),
                "--val-crop-size", str(self.size)]

    def flags(self, root: Path) -> list[str]:
        """``train.py`` flags of every training of this cell but ``--epochs`` (the method's come on top);
        the ImageFolder is rendered beforehand (:func:`render_imagefolder`)."""
        return [*self.data_flags(root), "--arch", self.arch, "-b", str(BATCH), "--lr", f"{LR:g}", "-j", "0"]


def steps_per_epoch(train_images: int) -> int:
    """``train.py`` drops a last, smaller batch."""
    return max(1, train_images // BATCH)


def epochs_for(budget: str, train_images: int) -> int:
    """Whole epochs for a budget: ``short`` at most its steps, ``long`` at least its steps."""
    steps, per = BUDGETS[budget], steps_per_epoch(train_images)
    return max(1, math.ceil(steps / per)) if budget == "long" else max(1, steps // per)


# --matrix PRESET: "full" is the whole matrix of issue 19; "slice" its first measured part;
# "smoke" the CI test (one cheap model through the ImageFolder path, one epoch).
PRESETS: dict[str, dict[str, tuple]] = {
    "full": dict(datasets=DATASETS, sizes=SIZES, archs=ARCHS, budgets=("short", "long"), targets=TARGETS,
                 methods=("dense", *METHODS), seeds=(0,)),
    "short": dict(datasets=DATASETS, sizes=SIZES, archs=ARCHS, budgets=("short",), targets=TARGETS,
                  methods=("dense", *METHODS), seeds=(0,)),
    "slice": dict(datasets=("digits",), sizes=(32,), archs=ARCHS, budgets=("short",), targets=(0.9,),
                  methods=("dense", "pilot", "spred"), seeds=(0,)),
    "smoke": dict(datasets=("digits",), sizes=(32,), archs=("squeezenet1_1",), budgets=("smoke",), targets=(0.9,),
                  methods=("dense", "pilot"), seeds=(0,)),
}


def cells(datasets: Sequence[str] = DATASETS, sizes: Sequence[int] = SIZES, archs: Sequence[str] = ARCHS,
          budgets: Sequence[str] = ("short", "long")) -> list[Cell]:
    for name in datasets:
        embedded_dataset(name)  # a clear error for an unknown name
    bad = [b for b in budgets if b not in BUDGETS]
    if bad:
        raise ValueError(f"unknown budgets {bad}: choose from {list(BUDGETS)}")
    return [Cell(d, s, a, b) for b in budgets for d in datasets for s in sizes for a in archs]


def jobs(plan: Sequence[Cell], methods: Sequence[str], targets: Sequence[float],
         seeds: Sequence[int]) -> list[tuple[Cell, str, Optional[float], int]]:
    """``(cell, method, target, seed)`` for every training: dense once per cell and seed
    (``target`` None), each other method once per target."""
    out = []
    for cell in plan:
        for seed in seeds:
            if "dense" in methods:
                out.append((cell, "dense", None, seed))
            out += [(cell, m, t, seed) for t in targets for m in methods if m != "dense"]
    return out


def seconds_per_step(arch: str, size: int, repeats: int = 3) -> float:
    """Measured here: one forward, backward and SGD step of ``arch`` on a batch of
    ``size`` px images, one thread (as each run has); the median of ``repeats`` after a
    warm-up step.  The plan's time estimate multiplies it by the steps."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = build_model(arch, 10)
        channels = 1 if arch == DIGITS_ARCH else 3
        x, y = torch.randn(BATCH, channels, size, size), torch.randint(0, 10, (BATCH,))
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        times = []
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
            times.append(time.perf_counter() - t0)
        return sorted(times[1:])[len(times[1:]) // 2]
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------- layer-wise magnitude pruning
def _val_set(cell: Cell, root: Path):
    if cell.arch == DIGITS_ARCH:
        return load_embedded(cell.dataset, cell.size, 1)[1]
    return imagefolder_splits(str(render_imagefolder(cell.dataset, cell.size, root)), cell.size, cell.size,
                              cell.size)[1]


@torch.no_grad()
def _top1(model: torch.nn.Module, loader) -> float:
    model.eval()
    hits = sum(int((model(x).argmax(1) == y).sum()) for x, y in loader)
    return 100.0 * hits / len(loader.dataset)


def layerwise_rows(cell: Cell, checkpoint: Path, targets: Sequence[float], root: Path) -> list[dict[str, float]]:
    """Top-1 of the dense model in ``checkpoint`` (``train.py``'s) pruned one-shot to each
    target by layer-wise magnitude: the same fraction of the smallest |x| removed from
    every weight tensor (``pilot_kernels.sparsity.prune_(scope="layer")``)."""
    from pilot_kernels.sparsity import sweep

    val = _val_set(cell, root)
    model = build_model(cell.arch, embedded_dataset(cell.dataset).num_classes)
    model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=False)["model"])
    loader = torch.utils.data.DataLoader(val, batch_size=256)
    return [{"target": s, "sparsity": measured, "top1": top1}
            for s, measured, top1 in sweep(model, None, lambda: _top1(model, loader), [0.0, *targets], scope="layer")]
