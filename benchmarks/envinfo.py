"""Where a result was measured: device, driver, library versions and git commit.

Every results file (benchmarks, accuracy experiments, ``python -m pilot_kernels.check``)
records :func:`environment` next to its numbers.
"""
from __future__ import annotations

import datetime as _dt
import importlib.metadata
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Any, Optional

import torch

import pilot_kernels

# The checkout these benchmarks live in, for git_commit().
REPO_ROOT = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], cwd: Optional[Path] = None) -> Optional[str]:
    try:
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _driver_version() -> Optional[str]:
    try:
        import pynvml  # nvidia-ml-py

        pynvml.nvmlInit()
        v = pynvml.nvmlSystemGetDriverVersion()
        return v.decode() if isinstance(v, bytes) else str(v)
    except Exception:
        pass
    out = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    return out.splitlines()[0].strip() if out else None


def git_commit() -> dict[str, Any]:
    """HEAD of the repository the benchmarks live in, and whether tracked files differ
    from it (``None`` where there is no git checkout, e.g. a copied working tree)."""
    commit = _run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT)
    if commit is None:
        return {"commit": os.environ.get("PILOT_GIT_COMMIT"), "dirty": None}
    status = _run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT)
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def environment(device: torch.device | str) -> dict[str, Any]:
    """Everything needed to tell where and with what a result was measured."""
    device = torch.device(device)
    env: dict[str, Any] = {
        "timestamp_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device_type": device.type,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "hostname": platform.node(),
        "cpu": _cpu_name(),
        "cpu_count": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "torchvision": _version("torchvision"),
        "numpy": _version("numpy"),
        "pilot_kernels": pilot_kernels.__version__,  # this checkout's, installed or not
        "cuda_runtime": torch.version.cuda,
        "env_TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"),
        "env_PILOT_BACKEND": os.environ.get("PILOT_BACKEND"),
        **{f"git_{k}": v for k, v in git_commit().items()},
    }
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        env.update(
            device_name=props.name,
            driver=_driver_version(),
            compute_capability=f"{props.major}.{props.minor}",
            sm_count=props.multi_processor_count,
            device_memory_gib=round(props.total_memory / 2**30, 2),
            l2_cache_mib=round(getattr(props, "L2_cache_size", 0) / 2**20, 1) or None,
        )
    else:
        env.update(device_name=env["cpu"], driver=None)
    return env


def device_slug(env: dict[str, Any]) -> str:
    """A short file-name-safe device label: ``nvidia-h100-80gb-hbm3``, ``cpu``."""
    if env["device_type"] != "cuda":
        return env["device_type"]
    return re.sub(r"[^a-z0-9]+", "-", env["device_name"].lower()).strip("-")
