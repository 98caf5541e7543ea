"""The CUDA C++ backend without a GPU: the build description, the errors, and a compile
of every source in ``csrc/`` to object files.

torch may be a CPU build here, so the extension cannot be linked; but a syntax or type
error in ``csrc/`` is caught by compiling each ``.cu`` with nvcc (standalone: it must not
need torch) and each ``.cpp`` with the host compiler against the installed torch's
headers, and by checking that the launcher the binding calls is the one the kernel file
defines (same mangled signature).  Skipped, with the reason shown, only when nvcc is not
on PATH.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig
import time
from pathlib import Path

import pytest
import torch

from pilot_kernels.kernels import cuda_build

CSRC = Path(cuda_build.csrc_dir())
NVCC = shutil.which("nvcc")
# The architectures the backend is checked to compile for (the real build takes
# TORCH_CUDA_ARCH_LIST).
COMPILE_ARCHS = ("8.0", "9.0")


# ---------------------------------------------------------------- build description
def test_build_lists_every_source():
    on_disk = sorted(p.name for p in CSRC.iterdir() if p.suffix in (".cu", ".cpp"))
    assert sorted(cuda_build.SOURCES) == on_disk, "add new csrc/ sources to cuda_build.SOURCES"
    headers = sorted(p.name for p in CSRC.iterdir() if p.suffix in (".h", ".cuh"))
    assert sorted(cuda_build.HEADERS) == headers, "add new csrc/ headers to cuda_build.HEADERS"
    assert all(Path(p).is_file() for p in cuda_build.source_paths())


def test_gencode_flags():
    assert cuda_build.gencode_flags("8.0;9.0+PTX") == [
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_90,code=sm_90",
        "-gencode=arch=compute_90,code=compute_90",
    ]
    assert cuda_build.gencode_flags("9.0a 10.0") == [
        "-gencode=arch=compute_90a,code=sm_90a",
        "-gencode=arch=compute_100,code=sm_100",
    ]
    assert cuda_build.gencode_flags("Hopper") == cuda_build.gencode_flags("9.0+PTX")
    with pytest.raises(ValueError, match="TORCH_CUDA_ARCH_LIST"):
        cuda_build.gencode_flags("Fermi")


def test_arch_list_honours_env(monkeypatch):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.6")
    assert cuda_build.arch_list() == "8.6"
    assert "-gencode=arch=compute_86,code=sm_86" in cuda_build.nvcc_flags()
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST")
    assert cuda_build.arch_list(jit=False) == cuda_build.DEFAULT_ARCH_LIST


def test_flags_keep_exact_fp32_math():
    flags = cuda_build.nvcc_flags("9.0")
    assert "--use_fast_math" not in flags and "-use_fast_math" not in flags
    assert "--fmad=false" in flags and "-O3" in flags and "-std=c++17" in flags
    assert "-O3" in cuda_build.cxx_flags()
    assert cuda_build.cxx_std() in ("c++17", "c++20")


def test_max_jobs_validated(monkeypatch):
    monkeypatch.setenv("MAX_JOBS", "lots")
    with pytest.raises(ValueError, match="MAX_JOBS"):
        cuda_build._check_max_jobs()
    monkeypatch.setenv("MAX_JOBS", "2")
    cuda_build._check_max_jobs()


# ---------------------------------------------------------------- errors without CUDA
def test_import_never_needs_cuda():
    import pilot_kernels.kernels.fused_cuda as fused_cuda

    assert callable(fused_cuda.pilot_step)


@pytest.mark.skipif(torch.version.cuda is not None, reason="torch is a CUDA build here")
def test_call_on_cpu_torch_names_the_fix():
    from pilot_kernels.kernels import StepHparams, StepTensors, fused_cuda

    x = torch.zeros(4)
    t = StepTensors([x], [x.clone()], [x.clone()], [x.clone()], None, None, [True])
    h = StepHparams(lr=0.1, momentum=0.0, dampening=0.0, nesterov=False, alpha=0.0, beta=1.0,
                    weight_decay=0.0, maximize=False, adopt_writes=True)
    with pytest.raises(RuntimeError) as info:
        fused_cuda.pilot_step(t, h)
    msg = str(info.value)
    assert "CPU-only build" in msg and "backend='reference'" in msg and "backend='triton'" in msg


@pytest.mark.skipif(torch.version.cuda is not None, reason="torch is a CUDA build here")
def test_setup_build_on_cpu_torch_names_the_fix():
    with pytest.raises(RuntimeError, match="CUDA build of PyTorch"):
        cuda_build.extension_for_setup()


def test_toolchain_error_names_cuda_home(monkeypatch):
    from torch.utils import cpp_extension

    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", None)
    with pytest.raises(RuntimeError, match="CUDA_HOME") as info:
        cuda_build.check_toolchain()
    assert "backend='reference'" in str(info.value)


# ---------------------------------------------------------------- compile csrc/
def _cuda_include() -> Path:
    """The CUDA toolkit's include directory, as the nvcc on PATH sees it."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    out = subprocess.run([NVCC, "--dryrun", "--version"], capture_output=True, text=True)
    for line in (out.stdout + out.stderr).splitlines():
        if "_HERE_=" in line:
            candidates.append(str(Path(line.split("_HERE_=", 1)[1].strip()).parent))
    candidates += [str(Path(NVCC).resolve().parent.parent), "/usr/local/cuda"]
    for c in candidates:
        if c and (Path(c) / "include" / "cuda_runtime_api.h").is_file():
            return Path(c) / "include"
    pytest.fail(f"nvcc is at {NVCC} but no CUDA include directory was found among {candidates}")


def _torch_shim(tmp: Path) -> list[str]:
    """CPU wheels of torch ship c10/cuda/*.h but not the CMake-generated header they
    include; recreate it (its whole content) when it is missing."""
    rel = Path("c10/cuda/impl/cuda_cmake_macros.h")
    from torch.utils.cpp_extension import include_paths

    if any((Path(p) / rel).is_file() for p in include_paths()):
        return []
    (tmp / rel).parent.mkdir(parents=True)
    (tmp / rel).write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    return ["-isystem", str(tmp)]


def _our_warnings(output: str) -> list[str]:
    return [l for l in output.splitlines() if "warning" in l.lower() and str(CSRC) in l]


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH: the CUDA sources cannot be compile-checked")
def test_csrc_compiles(tmp_path):
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, include_paths

    cuda_inc = _cuda_include()
    jobs = []
    for src in sorted(CSRC.glob("*.cu")):
        # Standalone: CUDA headers and csrc/ only, no torch include path.  Same flags as
        # the real build (torch's common nvcc defines + ours).
        cmd = [NVCC, "-c", str(src), "-o", str(tmp_path / (src.stem + ".cu.o")), "-I", str(CSRC)]
        cmd += COMMON_NVCC_FLAGS + cuda_build.nvcc_flags(";".join(COMPILE_ARCHS))
        cmd += ["-Xcompiler", "-fPIC", "-Xcompiler", "-Wall"]
        jobs.append((src, cmd))
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    assert cxx, "no host C++ compiler (c++/g++) on PATH"
    torch_inc = [a for p in include_paths() for a in ("-isystem", p)]
    py_inc = ["-isystem", sysconfig.get_paths()["include"]]
    for src in sorted(CSRC.glob("*.cpp")):
        # As torch's BuildExtension compiles it: host compiler, torch + CUDA + Python headers.
        cmd = [cxx, "-c", str(src), "-o", str(tmp_path / (src.stem + ".o")), "-I", str(CSRC)]
        cmd += ["-fPIC", f"-std={cuda_build.cxx_std()}", "-O0", "-Wall"]
        cmd += ["-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H"]
        cmd += [f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
        cmd += torch_inc + _torch_shim(tmp_path / "shim") + ["-isystem", str(cuda_inc)] + py_inc
        jobs.append((src, cmd))

    start = time.monotonic()
    procs = [(src, cmd, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
             for src, cmd in jobs]
    failures, warnings = [], []
    for src, cmd, proc in procs:
        out, _ = proc.communicate(timeout=600)
        if proc.returncode != 0:
            failures.append(f"{src.name} failed ({proc.returncode}):\n{' '.join(cmd)}\n{out[-6000:]}")
        warnings += _our_warnings(out)
    print(f"compiled {len(jobs)} csrc files in {time.monotonic() - start:.1f}s")
    assert not failures, "\n\n".join(failures)
    assert not warnings, "compiler warnings in csrc/:\n" + "\n".join(warnings)

    # The launcher the binding calls must be the one the kernel file defines.
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm not on PATH: compiled, but the launcher's signature was not cross-checked")

    def symbols(obj: Path, flag: str) -> set[str]:
        out = subprocess.run([nm, flag, str(obj)], capture_output=True, text=True, check=True).stdout
        return {l.split()[-1] for l in out.splitlines() if l.strip()}

    wanted = {s for o in tmp_path.glob("*.o") if not o.name.endswith(".cu.o")
              for s in symbols(o, "-u") if "pilot" in s}
    defined = {s for o in tmp_path.glob("*.cu.o") for s in symbols(o, "--defined-only")}
    assert wanted, "the binding calls no pilot:: launcher?"
    assert wanted <= defined, f"declared but not defined by the .cu files: {sorted(wanted - defined)}"
