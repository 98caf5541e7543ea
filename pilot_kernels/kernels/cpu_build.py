"""How the fused CPU step in ``csrc/cpu/`` is built: just in time, once per machine type.

:func:`jit_load` compiles ``csrc/cpu/pilot_step_cpu.cpp`` with the host C++ compiler
through ``torch.utils.cpp_extension.load`` (ninja), cached in torch's extensions directory
(``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``): the first call on a
machine compiles (tens of seconds), every later process loads the cached module.

Vector width follows torch's own runtime dispatch: the kernel is compiled for
:func:`capability` (``torch.backends.cpu.get_cpu_capability()``: AVX512, AVX2 or the
portable DEFAULT; ``ATEN_CPU_CAPABILITY`` lowers it as it does for torch) with exactly the
``-m`` flags that level implies, never ``-march=native``.  The capability is part of the
module's name, so a cache directory shared by different machines holds one build per
level and never hands AVX-512 code to a CPU without it.

``-ffp-contract=off``: the step must round like the plain-torch reference, one rounding
per operation, so the compiler may not fuse a multiply and an add (x86-64 has no excess
precision to worry about beyond that).

Importing this module needs only torch; nothing is compiled until :func:`jit_load` runs,
and :func:`is_built` tells, without building, whether it would compile or only load.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Optional

import torch

from .cuda_build import check_max_jobs, cxx_std, source_digest

__all__ = ["SOURCES", "csrc_dir", "capability", "cxx_flags", "ld_flags", "check_toolchain",
           "jit_name", "is_built", "jit_load"]

#: Compiled sources, relative to ``csrc/``.
SOURCES = ("cpu/pilot_step_cpu.cpp",)

_PACKAGE_DIR = Path(__file__).resolve().parents[1]  # .../pilot_kernels
_CANDIDATES = (_PACKAGE_DIR.parent / "csrc", _PACKAGE_DIR / "_csrc")  # checkout, then wheel

_FIX = "or use backend='reference'"

# The flags torch compiles its own kernels of each capability with (cmake/Codegen.cmake).
_CAPABILITY_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
}


def csrc_dir() -> Path:
    """The directory holding ``cpu/pilot_step_cpu.cpp`` (checkout first, then the install)."""
    for d in _CANDIDATES:
        if all((d / f).is_file() for f in SOURCES):
            return d
    raise RuntimeError(
        f"the C++ sources of the cpu backend ({', '.join(SOURCES)}) are in none of "
        f"{[str(d) for d in _CANDIDATES]}; reinstall pilot_kernels from a full checkout, {_FIX}"
    )


def capability() -> str:
    """The at::vec level to compile for: torch's runtime choice where we know its flags
    (x86 AVX2/AVX512), else DEFAULT (portable; at::vec still uses NEON on arm64)."""
    cap = torch.backends.cpu.get_cpu_capability()
    return cap if cap in _CAPABILITY_FLAGS else "DEFAULT"


def cxx_flags(cap: Optional[str] = None) -> list[str]:
    """Compiler flags for ``cap`` (default :func:`capability`)."""
    cap = capability() if cap is None else cap
    flags = ["-O3", f"-std={cxx_std()}", "-ffp-contract=off"]
    flags += _CAPABILITY_FLAGS.get(cap, []) + [f"-DCPU_CAPABILITY={cap}", f"-DCPU_CAPABILITY_{cap}"]
    if torch.backends.openmp.is_available():
        # at::parallel_for is a header template: without -fopenmp it silently runs serially.
        flags.append("-fopenmp")
    return flags


def ld_flags() -> list[str]:
    """Linker flags: torch's OpenMP runtime (already loaded by torch, so it is shared)."""
    return ["-fopenmp"] if torch.backends.openmp.is_available() else []


def check_toolchain() -> None:
    """Raise a RuntimeError naming the fix when this machine cannot build the module."""
    from torch.utils import cpp_extension

    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise RuntimeError(
            f"the cpu backend is compiled on first use, but no C++ compiler {cxx!r} is on PATH: "
            f"install one (e.g. apt-get install g++) or set CXX, {_FIX}"
        )
    if not cpp_extension.is_ninja_available():
        raise RuntimeError(f"building the cpu backend needs ninja: pip install ninja, {_FIX}")


def jit_name(cap: Optional[str] = None) -> str:
    """Module name: changes with the source, flags, torch and capability, so a stale or
    foreign build is never loaded."""
    cap = capability() if cap is None else cap
    digest = source_digest(csrc_dir(), SOURCES, (cxx_flags(cap), ld_flags(), torch.__version__))
    return f"pilot_kernels_cpu_{cap.lower()}_{digest}"


def is_built(cap: Optional[str] = None) -> bool:
    """Whether this machine's extensions cache holds the module already, so that
    :func:`jit_load` only loads it (a moment) instead of compiling (tens of seconds)."""
    from torch.utils import cpp_extension

    try:
        name = jit_name(cap)
    except RuntimeError:  # no sources: jit_load will say so
        return False
    build_dir = cpp_extension._get_build_directory(name, verbose=False)
    return os.path.isfile(os.path.join(build_dir, f"{name}.so"))


def jit_load(verbose: Optional[bool] = None):
    """Build (first call on a machine) or load (cached) the module."""
    from torch.utils import cpp_extension

    check_toolchain()
    check_max_jobs()
    if verbose is None:
        verbose = os.environ.get("PILOT_CPU_VERBOSE", "0") == "1"
    cap = capability()
    d = csrc_dir()
    try:
        return cpp_extension.load(
            name=jit_name(cap),
            sources=[str(d / f) for f in SOURCES],
            extra_cflags=cxx_flags(cap),
            extra_ldflags=ld_flags(),
            verbose=verbose,
        )
    except Exception as e:  # torch raises RuntimeError / subprocess errors with the log
        raise RuntimeError(
            f"building the pilot_kernels cpu extension failed ({e}); rerun with "
            f"PILOT_CPU_VERBOSE=1 for the compiler output, {_FIX}"
        ) from e
