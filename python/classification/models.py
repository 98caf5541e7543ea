"""Models: the small default CNN for the embedded digits data, or any torchvision model."""
from __future__ import annotations

import torch
from torch import nn

import torchvision

DIGITS_ARCH = "digits_cnn"
PARAM_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class DigitsCNN(nn.Module):
    """A small VGG-style CNN for grey digit images (61 k parameters), 16×16 by default.

    Four 3×3 conv + BatchNorm + ReLU blocks (max-pooling after the second and third),
    global average pooling and a linear classifier.  The global pooling makes it take
    any image side >= 4 (two 2×2 poolings leave at least one pixel), e.g. MNIST's 28×28.  Convolutions have no bias (the
    BatchNorm that follows has one), so every weight tensor with ``ndim >= 2`` — the
    tensors PILoT reparameterizes — is a conv kernel or the classifier matrix.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, widths: tuple[int, ...] = (16, 32, 64, 64)):
        super().__init__()
        a, b, c, d = widths

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *block(in_channels, a),
            *block(a, b),
            nn.MaxPool2d(2),
            *block(b, c),
            nn.MaxPool2d(2),
            *block(c, d),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(d, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        return self.classifier(self.features(x))


def model_in_channels(arch: str) -> int:
    """Image channels the model built for ``arch`` expects."""
    return 1 if arch == DIGITS_ARCH else 3


def build_model(arch: str, num_classes: int) -> nn.Module:
    """``digits_cnn`` or any ``torchvision.models`` architecture name (random init)."""
    if arch == DIGITS_ARCH:
        return DigitsCNN(num_classes=num_classes)
    models = torchvision.models
    try:
        return models.get_model(arch, weights=None, num_classes=num_classes)
    except ValueError as e:
        raise ValueError(
            f"unknown --arch {arch!r}: use {DIGITS_ARCH!r} or a torchvision model name "
            f"such as resnet18 or resnet50 ({e})"
        ) from None


def cast_params_(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Store ``model``'s parameters and floating buffers in ``dtype`` — except the
    BatchNorm layers, which stay fp32 (their statistics and SGD-updated affine
    parameters lose too much in bf16; torch's BatchNorm takes a bf16 input with fp32
    parameters and returns bf16).  In place; returns ``model``."""
    if dtype == torch.float32:
        return model
    model.to(dtype)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.float()
    return model
