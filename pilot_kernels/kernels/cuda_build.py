"""How the CUDA C++ twin in ``csrc/`` is built: one description for both builds.

* ahead of time: ``setup.py`` calls :func:`extension_for_setup` when
  ``PILOT_BUILD_CUDA=1`` and installs the module as :data:`AOT_MODULE`;
* just in time: :func:`jit_load` builds it with ``torch.utils.cpp_extension.load``
  (ninja, cached in torch's extensions directory) on the first call of the ``cuda``
  backend when no ahead-of-time module is importable.

``pilot_step.cu`` includes only CUDA headers and our own (``pilot_step.h``,
``multi_tensor.cuh``); ``binding.cpp`` is the only file that sees torch.  So the kernel
compiles with plain ``nvcc`` in ``-std=c++17``, and the binding compiles with the host
compiler in the C++ standard that the installed torch's headers need (C++20 from torch
2.13 on, C++17 before).

No ``--use_fast_math``: the step must round like the plain-torch reference, so the
kernel keeps IEEE division, denormals and one rounding per operation (``--fmad=false``
on top of the explicit ``__f*_rn`` intrinsics in the kernel).

Importing this module needs only torch; nothing here touches CUDA until a build runs.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path
from typing import Optional

import torch

__all__ = [
    "AOT_MODULE",
    "SOURCES",
    "HEADERS",
    "DEFAULT_ARCH_LIST",
    "csrc_dir",
    "source_paths",
    "cxx_std",
    "arch_list",
    "gencode_flags",
    "nvcc_flags",
    "cxx_flags",
    "extension_for_setup",
    "check_toolchain",
    "check_max_jobs",
    "jit_name",
    "jit_load",
]

#: Import name of the ahead-of-time module (``PILOT_BUILD_CUDA=1 pip install ...``).
AOT_MODULE = "pilot_kernels._C"
#: Compiled sources, in ``csrc/``.
SOURCES = ("pilot_step.cu", "binding.cpp")
#: Headers the sources include (hashed into the JIT build's name).
HEADERS = ("pilot_step.h", "multi_tensor.cuh")
#: Architectures when ``TORCH_CUDA_ARCH_LIST`` is unset and no GPU tells us better:
#: A100 (8.x SASS runs on 8.6/8.9 too) and H100, plus PTX so newer GPUs can JIT it.
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"

_PACKAGE_DIR = Path(__file__).resolve().parents[1]  # .../pilot_kernels
_REPO_CSRC = _PACKAGE_DIR.parent / "csrc"           # a source checkout
_INSTALLED_CSRC = _PACKAGE_DIR / "_csrc"            # a wheel (setup.py package data)

_FIX_BACKEND = "or use backend='triton' or backend='reference'"


def csrc_dir() -> Path:
    """The directory holding the CUDA/C++ sources (checkout first, then the install)."""
    for d in (_REPO_CSRC, _INSTALLED_CSRC):
        if all((d / f).is_file() for f in SOURCES + HEADERS):
            return d
    raise RuntimeError(
        f"the CUDA sources of pilot_kernels ({', '.join(SOURCES + HEADERS)}) are neither in "
        f"{_REPO_CSRC} nor in {_INSTALLED_CSRC}; reinstall pilot_kernels from a full "
        f"checkout or sdist, {_FIX_BACKEND}"
    )


def source_paths() -> list[str]:
    """Absolute paths of the compiled sources."""
    d = csrc_dir()
    return [str(d / f) for f in SOURCES]


def _torch_version() -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", torch.__version__)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def cxx_std() -> str:
    """The C++ standard for ``binding.cpp``: C++20 where torch's headers need it."""
    return "c++20" if _torch_version() >= (2, 13) else "c++17"


def arch_list(jit: bool = False) -> str:
    """``TORCH_CUDA_ARCH_LIST`` if set; for a JIT build the visible GPUs' architectures;
    else :data:`DEFAULT_ARCH_LIST`."""
    env = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if env:
        return env
    if jit and torch.cuda.is_available():
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        if caps:
            archs = [f"{major}.{minor}" for major, minor in caps]
            archs[-1] += "+PTX"
            return ";".join(archs)
    return DEFAULT_ARCH_LIST


# The names torch's TORCH_CUDA_ARCH_LIST also accepts, for the GPUs nvcc 12/13 targets.
_NAMED_ARCHS = {
    "Turing": "7.5+PTX",
    "Ampere": "8.0;8.6+PTX",
    "Ada": "8.9+PTX",
    "Hopper": "9.0+PTX",
    "Blackwell": "10.0+PTX",
}


def gencode_flags(archs: str) -> list[str]:
    """nvcc ``-gencode`` flags for an arch list such as ``"8.0;9.0+PTX"``, ``"9.0a 10.0"``
    or ``"Ampere;Hopper"``."""
    flags: list[str] = []
    items = [i for i in re.split(r"[;,\s]+", archs.strip()) if i]
    items = [j for i in items for j in _NAMED_ARCHS.get(i, i).split(";")]
    for item in items:
        m = re.fullmatch(r"(\d+)\.(\d+)([af]?)(\+PTX)?", item)
        if m is None:
            raise ValueError(
                f"cannot read CUDA architecture {item!r} in {archs!r}; write numbers such as "
                f"TORCH_CUDA_ARCH_LIST='8.0;9.0+PTX' or one of {sorted(_NAMED_ARCHS)}"
            )
        num = f"{m.group(1)}{m.group(2)}{m.group(3)}"
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if m.group(4):
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    if not flags:
        raise ValueError(f"empty CUDA architecture list {archs!r}; set e.g. TORCH_CUDA_ARCH_LIST='9.0'")
    return flags


def nvcc_flags(archs: Optional[str] = None) -> list[str]:
    """Flags for ``pilot_step.cu`` (torch adds its own defines and ``-fPIC``)."""
    return [
        "-O3",
        "-std=c++17",
        "--fmad=false",  # no FMA contraction: same rounding as the reference's torch ops
        "-lineinfo",
    ] + gencode_flags(archs if archs is not None else arch_list())


def cxx_flags() -> list[str]:
    """Flags for ``binding.cpp``."""
    return ["-O3", f"-std={cxx_std()}"]


def check_max_jobs() -> None:
    """Raise a ValueError naming the fix when ``MAX_JOBS`` is set but not a positive integer
    (shared with the cpu backend's build, :mod:`.cpu_build`)."""
    jobs = os.environ.get("MAX_JOBS")
    if jobs is not None and not (jobs.isdigit() and int(jobs) > 0):
        raise ValueError(f"MAX_JOBS must be a positive integer, got {jobs!r}; unset it or set e.g. MAX_JOBS=4")


_check_max_jobs = check_max_jobs  # the name tests/test_cuda_build.py uses


def extension_for_setup():
    """``(CUDAExtension, BuildExtension)`` for ``setup.py`` (``PILOT_BUILD_CUDA=1``).

    ninja builds it; ``MAX_JOBS`` caps the parallel compile jobs (read by torch's
    ``BuildExtension``) and ``TORCH_CUDA_ARCH_LIST`` picks the architectures
    (default :data:`DEFAULT_ARCH_LIST`).
    """
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    check_toolchain(for_setup=True)
    check_max_jobs()
    d = csrc_dir()
    root = Path.cwd().resolve()
    try:  # setuptools prefers sources relative to setup.py's directory
        sources = [str((d / f).resolve().relative_to(root)) for f in SOURCES]
        include = str(d.resolve().relative_to(root))
    except ValueError:
        sources, include = source_paths(), str(d)
    ext = CUDAExtension(
        name=AOT_MODULE,
        sources=sources,
        include_dirs=[include],
        extra_compile_args={"cxx": cxx_flags(), "nvcc": nvcc_flags(arch_list(jit=False))},
    )
    return ext, BuildExtension.with_options(use_ninja=True)


def check_toolchain(for_setup: bool = False) -> None:
    """Raise a RuntimeError naming the fix when this machine cannot build the extension."""
    from torch.utils import cpp_extension

    aot = "" if for_setup else (
        ", build it ahead of time on a machine that can (PILOT_BUILD_CUDA=1 pip install -e . "
        "--no-build-isolation)"
    )
    if torch.version.cuda is None:
        raise RuntimeError(
            f"the cuda backend needs a CUDA build of PyTorch, but torch {torch.__version__} is a "
            f"CPU-only build: install a CUDA wheel of torch{aot}, {_FIX_BACKEND}"
        )
    cuda_home = cpp_extension.CUDA_HOME
    nvcc = None if cuda_home is None else Path(cuda_home) / "bin" / "nvcc"
    if nvcc is None or not nvcc.exists():
        raise RuntimeError(
            "the cuda backend compiles csrc/ with nvcc, but no CUDA toolkit was found "
            f"(CUDA_HOME={cuda_home!r}): install the CUDA toolkit matching torch.version.cuda="
            f"{torch.version.cuda} and set CUDA_HOME (e.g. CUDA_HOME=/usr/local/cuda){aot}, "
            f"{_FIX_BACKEND}"
        )
    if not cpp_extension.is_ninja_available():
        raise RuntimeError(
            f"building the cuda backend needs ninja: pip install ninja{aot}, {_FIX_BACKEND}"
        )


def jit_name(archs: str) -> str:
    """Extension name for the JIT build: changes with the sources, flags and torch, so a
    stale build is never loaded."""
    digest = source_digest(csrc_dir(), SOURCES + HEADERS,
                           (nvcc_flags(archs), cxx_flags(), torch.__version__, torch.version.cuda))
    return f"pilot_kernels_cuda_{digest}"


def source_digest(directory: Path, files, settings) -> str:
    """12 hex digits of SHA-256 over the files (names and bytes) and ``repr(settings)``:
    the part of a just-in-time module's name that changes whenever its build would."""
    h = hashlib.sha256()
    for f in files:
        h.update(f.encode())
        h.update((directory / f).read_bytes())
    h.update(repr(settings).encode())
    return h.hexdigest()[:12]


def jit_load(verbose: Optional[bool] = None):
    """Build (first call; minutes) or load (cached) the extension with ninja."""
    from torch.utils import cpp_extension

    check_toolchain()
    check_max_jobs()
    if verbose is None:
        verbose = os.environ.get("PILOT_CUDA_VERBOSE", "0") == "1"
    archs = arch_list(jit=True)
    try:
        return cpp_extension.load(
            name=jit_name(archs),
            sources=source_paths(),
            extra_include_paths=[str(csrc_dir())],
            extra_cflags=cxx_flags(),
            extra_cuda_cflags=nvcc_flags(archs),
            with_cuda=True,
            verbose=verbose,
        )
    except Exception as e:  # torch raises RuntimeError / subprocess errors with the log
        raise RuntimeError(
            f"building the pilot_kernels cuda extension failed ({e}); rerun with "
            "PILOT_CUDA_VERBOSE=1 for the compiler output, check that nvcc "
            f"({shutil.which('nvcc') or 'not on PATH'}) matches torch.version.cuda="
            f"{torch.version.cuda} and that TORCH_CUDA_ARCH_LIST={archs!r} suits your GPU, "
            f"{_FIX_BACKEND}"
        ) from e
