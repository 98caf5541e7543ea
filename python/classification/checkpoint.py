"""Atomic writes, checkpoints, the run's claim on ``--output-dir``, and the RNG states
that make a resumed run continue exactly.

Every file the trainer writes goes through :func:`atomic_write`: a temporary file in the
same directory, flushed and fsync'ed, then moved over the old one with ``os.replace``
(atomic on POSIX), and the directory fsync'ed.  A crash or kill at any point leaves
either the previous file or the new one, never a partial file under the file's name.

Everything stored in a checkpoint is plain tensors, numbers, strings, lists and dicts,
so checkpoints load with ``torch.load(..., weights_only=True)``.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import tempfile
from typing import IO, Any, Iterator, Optional

import numpy as np
import torch

CHECKPOINT_NAME = "checkpoint.pt"


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "wb") -> Iterator[IO]:
    """``open(path, mode)`` for writing that never leaves a partial file at ``path``:
    the file appears there complete when the block ends, or not at all if it raises."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide results from the other users of a shared machine
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save(obj, path)`` that never leaves a partial file at ``path``."""
    with atomic_write(path) as f:
        torch.save(obj, f)


def load(path: str) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def load_meta(path: str) -> dict[str, Any]:
    """The checkpoint with its tensors memory-mapped rather than read: cheap when only its
    epoch, args or structure are needed."""
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def resolve_resume(resume: Optional[str], output_dir: Optional[str]) -> Optional[str]:
    """The checkpoint ``--resume`` names: a path, or ``auto`` = the output dir's latest
    checkpoint if there is one (else a fresh start)."""
    if not resume:
        return None
    if resume == "auto":
        if not output_dir:
            raise ValueError("--resume auto needs --output-dir (it looks for the checkpoint there)")
        path = os.path.join(output_dir, CHECKPOINT_NAME)
        return path if os.path.isfile(path) else None
    if not os.path.isfile(resume):
        raise FileNotFoundError(f"--resume {resume!r}: no such checkpoint file")
    return resume


def epoch_of(line: str) -> Optional[int]:
    """The epoch of a metrics.jsonl line; None for a blank or torn (partly written) line."""
    try:
        return int(json.loads(line)["epoch"])
    except (ValueError, KeyError, TypeError):
        return None


# ---------------------------------------------------------------------- the output directory
# What a run writes into --output-dir (besides TensorBoard's tb/).
RUN_FILES = (CHECKPOINT_NAME, "metrics.jsonl", "sweep.json", "sweep.png", "sparse_model.pt", "sparse_model.json")


def claim_output_dir(args: Any, is_main: bool) -> None:
    """Refuse to start a new run over an earlier run's files in ``--output-dir``; with
    ``--overwrite``, delete them (rank 0).  Continuing the run that lives there is fine."""
    d = args.output_dir
    if not d or not os.path.isdir(d):
        return
    if args.resume_path and os.path.samefile(os.path.dirname(os.path.abspath(args.resume_path)), d):
        return
    found = [f for f in RUN_FILES if os.path.isfile(os.path.join(d, f))]
    if found == ["metrics.jsonl"]:
        with open(os.path.join(d, "metrics.jsonl")) as f:
            if not any(epoch_of(ln) is not None for ln in f):
                found = []  # an empty log: that run never finished an epoch
    if not found:
        return
    if not args.overwrite:
        what = ", ".join(found)
        if CHECKPOINT_NAME in found:
            saved = load_meta(os.path.join(d, CHECKPOINT_NAME))
            run_args = saved.get("args") or {}
            total = run_args.get("epochs", 0) * (run_args.get("cycles", 0) + 1)
            what += f"; its checkpoint is at epoch {int(saved['epoch']) + 1}" + (f" of {total}" if total else "")
        raise SystemExit(f"--output-dir {d} holds an earlier run ({what}). Continue it with --resume auto, "
                         "start over with --overwrite (deletes those files), or give another --output-dir")
    if is_main:
        for f in found:
            os.remove(os.path.join(d, f))
        tb = os.path.join(d, "tb")
        if os.path.isdir(tb):
            for f in os.listdir(tb):
                if f.startswith("events.out.tfevents."):
                    os.remove(os.path.join(tb, f))


# ---------------------------------------------------------------------- RNG states
def rng_state() -> dict[str, Any]:
    """This process's torch, CUDA, numpy and python RNG states (weights_only-safe)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
