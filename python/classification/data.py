"""Data: ImageNet-style ImageFolder, the embedded digits set, and a synthetic batch.

* ``--data-path DIR`` — ``DIR/train`` and ``DIR/val`` in ImageFolder layout, with the
  standard ImageNet transforms (RandomResizedCrop + horizontal flip for training,
  Resize + CenterCrop for validation, ImageNet mean/std).  A file PIL cannot read
  raises :class:`ImageLoadError` naming it.
* no ``--data-path`` — the handwritten digits shipped inside scikit-learn
  (``sklearn.datasets.load_digits``: 1,797 real 8×8 grey images, 10 classes), upscaled,
  split 80/20 with a fixed seed (stratified), augmented by random shifts.  Needs no
  download; the whole set lives in memory.
* ``--synthetic`` — one random batch resident on the device, served again and again
  (for throughput measurements; accuracy is meaningless).

Random augmentation is a function of ``(seed, epoch, sample index)`` alone: the train
sampler pairs every index with a seed drawn from ``(seed, epoch)``
(:class:`SeededSampler`), and :class:`SeededAugmentation` seeds torch's RNG with it
before it reads the sample.  So the augmented images do not depend on the number of
data-loading workers, on which rank reads a sample, or on where a run was interrupted:
a resumed run sees exactly the batches an uninterrupted one would, with any ``-j``.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

import torchvision
from models import DIGITS_ARCH

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DIGITS_SPLIT_SEED = 0
DIGITS_VAL_FRACTION = 0.2


class ImageLoadError(RuntimeError):
    """An image file could not be read; the message names the file."""


def pil_loader_naming_path(path: str):
    """torchvision's PIL loader (``RGB``), re-raising any failure with the file's path."""
    from PIL import Image

    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            return img.convert("RGB")  # forces the decode while the file is open
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ...
        raise ImageLoadError(f"cannot read image {path!r}: {type(e).__name__}: {e}") from e


# ---------------------------------------------------------------------- embedded digits
class DigitsDataset(Dataset):
    """In-memory digit images ``(N, C, S, S)`` (already normalized) and labels.

    Training samples are shifted by up to ``shift`` pixels in each direction (padding
    with the background value), drawn from torch's global RNG (seeded per sample by
    :class:`SeededAugmentation`).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, train: bool, shift: int, background: float):
        self.images, self.labels = images, labels
        self.train, self.shift, self.background = train, shift, background

    def __len__(self) -> int:
        return self.labels.numel()

    def __getitem__(self, i: int):
        img = self.images[i]
        if self.train and self.shift > 0:
            s = self.shift
            size = img.shape[-1]
            padded = F.pad(img, (s, s, s, s), value=self.background)
            dy, dx = torch.randint(0, 2 * s + 1, (2,)).tolist()
            img = padded[:, dy : dy + size, dx : dx + size]
        return img, int(self.labels[i])


def load_digits_split(image_size: int = 16, channels: int = 1, shift: int = 2):
    """The embedded default: sklearn's digits, upscaled to ``image_size`` and split 80/20.

    Returns ``(train_set, val_set, num_classes)``.  ``channels=3`` repeats the grey
    channel (for torchvision models).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N,1,8,8) in [0,1]
    labels = torch.tensor(digits.target, dtype=torch.int64)
    if image_size != images.shape[-1]:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    idx = torch.arange(len(labels)).numpy()
    train_idx, val_idx = train_test_split(
        idx, test_size=DIGITS_VAL_FRACTION, random_state=DIGITS_SPLIT_SEED, stratify=labels.numpy()
    )
    train_idx, val_idx = torch.as_tensor(train_idx), torch.as_tensor(val_idx)
    mean, std = images[train_idx].mean().item(), images[train_idx].std().item()
    images = (images - mean) / std
    if channels != 1:
        images = images.expand(-1, channels, -1, -1).contiguous()
    background = (0.0 - mean) / std
    train = DigitsDataset(images[train_idx], labels[train_idx], True, shift, background)
    val = DigitsDataset(images[val_idx], labels[val_idx], False, 0, background)
    return train, val, 10


# ---------------------------------------------------------------------- ImageFolder
def imagefolder_splits(root: str, train_crop: int = 224, val_resize: int = 256, val_crop: int = 224):
    """``root/train`` and ``root/val`` as ImageFolders with the ImageNet transforms."""
    T = torchvision.transforms
    normalize = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train_tf = T.Compose([T.RandomResizedCrop(train_crop), T.RandomHorizontalFlip(), T.ToTensor(), normalize])
    val_tf = T.Compose([T.Resize(val_resize), T.CenterCrop(val_crop), T.ToTensor(), normalize])
    sets = []
    for split, tf in (("train", train_tf), ("val", val_tf)):
        path = os.path.join(root, split)
        if not os.path.isdir(path):
            raise FileNotFoundError(
                f"--data-path {root!r} has no {split}/ folder; expected {root}/train/<class>/<image> "
                f"and {root}/val/<class>/<image> (ImageFolder layout)"
            )
        sets.append(torchvision.datasets.ImageFolder(path, transform=tf, loader=pil_loader_naming_path))
    train, val = sets
    if train.classes != val.classes:
        raise ValueError(
            f"train/ and val/ under {root!r} have different class folders "
            f"({len(train.classes)} vs {len(val.classes)}); they must match"
        )
    return train, val, len(train.classes)


# ---------------------------------------------------------------------- synthetic
class SyntheticLoader:
    """Serves one random batch, resident on ``device``, ``steps`` times per epoch."""

    def __init__(self, batch_size: int, shape: tuple[int, ...], num_classes: int, device, steps: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randn(batch_size, *shape, generator=g).to(device)
        self.targets = torch.randint(0, num_classes, (batch_size,), generator=g).to(device)
        self.steps = steps
        self.sampler = None

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for _ in range(self.steps):
            yield self.images, self.targets


# ---------------------------------------------------------------------- samplers
class SeededSampler(Sampler[tuple[int, int]]):
    """``(index, seed)`` for every index of ``sampler``; the seed of sample ``i`` in epoch
    ``e`` is entry ``i`` of a stream drawn from ``(seed, e)``, whatever the rank."""

    def __init__(self, sampler: DistributedSampler, num_samples: int, seed: int):
        self.sampler, self.num_samples, self.seed, self.epoch = sampler, num_samples, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        # One 8-byte seed per sample and epoch: 10 MB for ImageNet's 1.28 M images.
        seeds = np.random.default_rng([self.seed, self.epoch]).integers(0, 2**62, size=self.num_samples)
        return ((i, int(seeds[i])) for i in self.sampler)


class SeededAugmentation(Dataset):
    """``dataset[i]`` read with torch's CPU RNG seeded with ``seed``, for a key ``(i, seed)``.

    torchvision's transforms draw from torch's global RNG; ``fork_rng`` restores it
    afterwards, so reading in the main process (``-j 0``) leaves the training stream as
    it was.
    """

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)  # the CPU stream; torch.manual_seed also seeds GPUs: 0.4 ms
            return self.dataset[index]


class ShardSampler(Sampler[int]):
    """Rank ``r`` of ``world`` gets indices ``r, r + world, …`` in order, without the
    padding of :class:`DistributedSampler`, so all-reduced eval metrics are exact."""

    def __init__(self, n: int, rank: int, world_size: int):
        self.indices = list(range(rank, n, world_size))

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self):
        return iter(self.indices)


@dataclass
class Data:
    train_loader: Any
    val_loader: Any
    train_sampler: Optional[SeededSampler]
    num_classes: int
    description: str


def build_data(args, rank: int, world_size: int, device: torch.device, in_channels: int) -> Data:
    """The loaders for ``args`` (see the module docstring)."""
    if args.synthetic:
        if args.data_path:
            raise ValueError("--synthetic and --data-path exclude each other")
        embedded = args.arch == DIGITS_ARCH
        size = args.image_size if embedded else args.train_crop_size
        num_classes = 10 if embedded else args.num_classes
        shape = (in_channels, size, size)
        train = SyntheticLoader(args.batch_size, shape, num_classes, device, args.synthetic_steps, args.seed + rank)
        val = SyntheticLoader(args.batch_size, shape, num_classes, device, max(1, args.synthetic_steps // 10), args.seed + 10_000 + rank)
        return Data(train, val, None, num_classes, f"synthetic batch {tuple(train.images.shape)} on {device}")

    if args.data_path:
        train_set, val_set, num_classes = imagefolder_splits(
            args.data_path, args.train_crop_size, args.val_resize_size, args.val_crop_size
        )
        what = f"ImageFolder {args.data_path} ({len(train_set)} train / {len(val_set)} val images, {num_classes} classes)"
    else:
        train_set, val_set, num_classes = load_digits_split(args.image_size, in_channels)
        what = (f"embedded sklearn digits, {args.image_size}x{args.image_size} "
                f"({len(train_set)} train / {len(val_set)} val images, 10 classes)")

    # Shuffling and augmentation are functions of (seed, epoch) everywhere, also on one
    # process, so a resumed run sees the same batches.
    shuffle = DistributedSampler(train_set, num_replicas=world_size, rank=rank, shuffle=True, seed=args.seed)
    train_sampler = SeededSampler(shuffle, len(train_set), args.seed)
    val_sampler = ShardSampler(len(val_set), rank, world_size)
    workers = args.workers
    pin = device.type == "cuda"
    per_rank = math.ceil(len(train_set) / world_size)
    # Each loader draws its workers' base seeds from a generator of its own, not from the
    # global RNG (which a persistent loader would consume differently after a resume).
    common = dict(num_workers=workers, pin_memory=pin, persistent_workers=workers > 0)
    train_loader = DataLoader(
        SeededAugmentation(train_set), batch_size=args.batch_size, sampler=train_sampler,
        # Drop a last, smaller batch (BatchNorm cannot train on a batch of one).
        drop_last=per_rank > args.batch_size, generator=torch.Generator().manual_seed(args.seed), **common,
    )
    val_loader = DataLoader(val_set, batch_size=args.eval_batch_size or args.batch_size, sampler=val_sampler,
                            generator=torch.Generator().manual_seed(args.seed), **common)
    return Data(train_loader, val_loader, train_sampler, num_classes, what)
