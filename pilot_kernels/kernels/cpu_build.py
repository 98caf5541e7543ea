"""How the C++ CPU kernels in ``csrc/cpu/`` are built: just in time, once per machine type.

Two modules are built this way, PILoT's step (``cpu/pilot_step_cpu.cpp``,
:mod:`.fused_cpu`) and HAM's (``cpu/ham_step_cpu.cpp``, :mod:`.ham_cpu`); each holds one
:class:`JitExtension`, which compiles its sources with the host C++ compiler through
``torch.utils.cpp_extension.load`` (ninja), cached in torch's extensions directory
(``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``): the first use on a
machine compiles (tens of seconds), every later process loads the cached module.

:meth:`JitExtension.ready` (what ``backend="auto"`` asks) never waits for that compile:
its first call loads a cached build at once, or starts the build in a background thread
and prints one line saying so; ``auto`` steps with the bitwise-equal reference meanwhile.
:meth:`JitExtension.load` (an explicit ``backend="cpu"``) waits for the build.  A failed
build is remembered, never retried in the process, and announced by one warning.

Vector width follows torch's own runtime dispatch: the kernel is compiled for
:func:`capability` (``torch.backends.cpu.get_cpu_capability()``: AVX512, AVX2 or the
portable DEFAULT; ``ATEN_CPU_CAPABILITY`` lowers it as it does for torch) with exactly the
``-m`` flags that level implies, never ``-march=native``.  The capability is part of the
module's name, so a cache directory shared by different machines holds one build per
level and never hands AVX-512 code to a CPU without it.

``-ffp-contract=off``: the step must round like the plain-torch reference, one rounding
per operation, so the compiler may not fuse a multiply and an add (x86-64 has no excess
precision to worry about beyond that).

Importing this module needs only torch; nothing is compiled until a build is asked for,
and :meth:`JitExtension.is_built` tells, without building, whether it would compile or
only load.
"""
from __future__ import annotations

import atexit
import os
import shutil
import sys
import threading
import warnings
from pathlib import Path
from typing import Optional, Sequence

import torch

from .cuda_build import check_max_jobs, cxx_std, source_digest

__all__ = ["csrc_dir", "capability", "cxx_flags", "ld_flags", "check_toolchain", "JitExtension"]

_PACKAGE_DIR = Path(__file__).resolve().parents[1]  # .../pilot_kernels
_CANDIDATES = (_PACKAGE_DIR.parent / "csrc", _PACKAGE_DIR / "_csrc")  # checkout, then wheel

_FIX = "or use backend='reference'"

# The flags torch compiles its own kernels of each capability with (cmake/Codegen.cmake).
_CAPABILITY_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
}


def csrc_dir(sources: Sequence[str]) -> Path:
    """The directory holding ``sources`` (paths relative to ``csrc/``): checkout first,
    then the install."""
    for d in _CANDIDATES:
        if all((d / f).is_file() for f in sources):
            return d
    raise RuntimeError(
        f"the C++ sources of the cpu backend ({', '.join(sources)}) are in none of "
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


class JitExtension:
    """One C++ CPU module built just in time, loaded at most once per process.

    ``prefix`` starts the module's name, ``sources`` are relative to ``csrc/`` and
    ``label`` names the backend in messages ("fused cpu": "the fused cpu backend").
    """

    def __init__(self, prefix: str, sources: Sequence[str], label: str):
        self.prefix, self.sources, self.label = prefix, tuple(sources), label
        self.notice = (
            f"pilot_kernels: compiling the {label} backend in the background (first use on "
            f"this machine, cached afterwards); the reference backend, bitwise equal, steps "
            f"meanwhile"
        )
        self.error: Optional[BaseException] = None  # a failed build, kept: never retried
        self._module = None
        self._lock = threading.Lock()
        self._builder: Optional[threading.Thread] = None  # the background build, once started
        self._warned = False  # the failed-build warning is given once per process

    # ------------------------------------------------------------- the cache
    def name(self, cap: Optional[str] = None) -> str:
        """Module name: changes with the sources, flags, torch and capability, so a stale
        or foreign build is never loaded."""
        cap = capability() if cap is None else cap
        digest = source_digest(csrc_dir(self.sources), self.sources,
                               (cxx_flags(cap), ld_flags(), torch.__version__))
        return f"{self.prefix}_{cap.lower()}_{digest}"

    def is_built(self, cap: Optional[str] = None) -> bool:
        """Whether this machine's extensions cache holds the module already, so that
        :meth:`build` only loads it (a moment) instead of compiling (tens of seconds)."""
        from torch.utils import cpp_extension

        try:
            name = self.name(cap)
        except RuntimeError:  # no sources: build() will say so
            return False
        build_dir = cpp_extension._get_build_directory(name, verbose=False)
        return os.path.isfile(os.path.join(build_dir, f"{name}.so"))

    def build(self, verbose: Optional[bool] = None):
        """Compile (first call on a machine) or load (cached) the module, in this thread."""
        from torch.utils import cpp_extension

        check_toolchain()
        check_max_jobs()
        if verbose is None:
            verbose = os.environ.get("PILOT_CPU_VERBOSE", "0") == "1"
        cap = capability()
        d = csrc_dir(self.sources)
        try:
            return cpp_extension.load(
                name=self.name(cap),
                sources=[str(d / f) for f in self.sources],
                extra_cflags=cxx_flags(cap),
                extra_ldflags=ld_flags(),
                verbose=verbose,
            )
        except Exception as e:  # torch raises RuntimeError / subprocess errors with the log
            raise RuntimeError(
                f"building the pilot_kernels {self.label} extension failed ({e}); rerun with "
                f"PILOT_CPU_VERBOSE=1 for the compiler output, {_FIX}"
            ) from e

    # ------------------------------------------------------------- the module
    def _run_build(self) -> None:
        try:
            self._module = self.build()
        except Exception as e:  # no compiler, no ninja, a compile error, ...
            self.error = e

    def _finish_at_exit(self) -> None:
        # Older torch versions lock a build with a file whose mere existence blocks
        # (FileBaton): a build cut off at exit would leave it behind and every later
        # process waiting on it, so the interpreter finishes the build (then cached).
        if self._builder is not None and self._builder.is_alive():
            print(f"pilot_kernels: finishing the {self.label} build before exiting, so that "
                  f"later processes find it cached", file=sys.stderr, flush=True)
            self._builder.join()

    def ready(self) -> bool:
        """Whether the module is loaded, never waiting for a compile (``backend="auto"``).

        The first call loads a cached build at once, or starts the build in a background
        thread and prints :attr:`notice` to stderr; until the build is done (and for good
        after a failed one, announced by one warning) this returns False.
        """
        if self._module is not None:
            return True
        if self.error is None and self._builder is None:
            with self._lock:
                if self._module is None and self.error is None and self._builder is None:
                    if self.is_built():
                        self._run_build()  # only a load
                    else:
                        self._builder = threading.Thread(
                            target=self._run_build, name=f"{self.prefix}-build", daemon=True)
                        atexit.register(self._finish_at_exit)
                        print(self.notice, file=sys.stderr, flush=True)
                        self._builder.start()
        if self.error is not None and not self._warned:
            self._warned = True
            reason = (str(self.error).strip().splitlines() or ["unknown error"])[0]
            warnings.warn(
                f"pilot_kernels: the {self.label} backend is unavailable, using the "
                f"reference backend instead ({reason})",
                RuntimeWarning,
                stacklevel=3,
            )
        return self._module is not None

    def load(self):
        """The compiled module, built or loaded on the first call (waiting for a background
        build that :meth:`ready` started); raises the build's RuntimeError (the same one on
        every later call) when it cannot be built."""
        if self._module is None:
            if self._builder is not None:
                self._builder.join()
            with self._lock:
                if self._module is None and self.error is None:
                    self._run_build()
            if self._module is None:
                raise self.error
        return self._module

    def available(self) -> bool:
        """Whether the module can run here (waits for the build on the first call)."""
        try:
            self.load()
        except Exception:
            return False
        return True

    def build_error(self) -> Optional[BaseException]:
        """Why the module could not be built, or None."""
        return self.error
