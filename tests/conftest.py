"""Shared test setup.

Without a GPU the Triton kernel runs in Triton's CPU interpreter; TRITON_INTERPRET must
be set before triton is first imported, so it is set here, at collection time.
"""
import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# Devices the fused kernels are tested on: the interpreter on CPU, or the real GPU.
KERNEL_DEVICES = ["cuda"] if HAS_CUDA else ["cpu"]


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (GPU validation is done on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
