"""Show me the SASS: compile the fused kernels for a GPU without one, and read what the
hardware would run.

Every Triton step variant the launcher uses (parameter dtype × momentum on/off × AMP
(``grad_scale`` + ``found_inf``) × capturable (``lr``/``alpha`` read on the device)) is
compiled ahead of time with ``triton.compile(ASTSource(...), target=GPUTarget("cuda",
arch, 32))``, and ``csrc/pilot_step.cu`` with ``nvcc -cubin``; ``cuobjdump`` (shipped in
Triton's wheel) then gives each kernel's resources (``-res-usage``: registers, stack,
local and shared memory) and its SASS, from which the global memory accesses are
counted by kind and width (``LDG.E.128`` is a 128-bit load, ``STG.E.U16`` a 16-bit
store, ``REDG.E.ADD.F32…`` an atomic add).

Which accesses are the data streams.  Both kernels tag their other global accesses so
that the SASS tells them apart: the Triton kernel reads its table and scalars with an
``evict_last`` hint (``LDG.E.EL…``), and the CUDA kernel reads and writes its data with
``__ldcg``/``__stcg`` (``….STRONG.GPU``).  In the Triton kernel a full block takes an
unmasked path and only a tensor's last block is masked, so its *main path* is exactly
its unpredicated data accesses; the masked tail's are predicated (``@P0 LDG.E``).

:func:`check` states what CI holds the kernels to (``tests/test_sass.py``):

* Triton, every variant: the main path moves exactly one full block's bytes per thread
  for every stream, fp32 streams only with 128-bit accesses and 16-bit streams with at
  least 64-bit ones;
* CUDA, every instantiation: each stream has a vector access (128-bit for fp32, at least
  64-bit for 16-bit dtypes) in its vector loop;
* both: no local memory (no spills, no stack), one atomic instruction;
* Triton: no ``fma`` and no approximate division in the PTX (the kernel rounds each
  operation like the reference).

Run it with ``python benchmarks/inspect_kernels.py --out DIR`` (see ``docs/kernels.md``).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

__all__ = [
    "ARCHS",
    "TritonVariant",
    "CudaVariant",
    "KernelReport",
    "triton_variants",
    "cuda_variants",
    "inspect_triton",
    "inspect_cuda",
    "parse_sass",
    "parse_res_usage",
    "check",
    "markdown_table",
    "find_cuobjdump",
    "find_nvcc",
    "main",
]

#: Architectures inspected by default: A100 (sm_80) and H100/H200 (sm_90).
ARCHS = (80, 90)

_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
_TL = {"fp32": "fp32", "bf16": "bf16", "fp16": "fp16"}


# ----------------------------------------------------------------------- variants
@dataclass(frozen=True)
class TritonVariant:
    """One compiled specialization of the Triton kernel."""

    dtype: str                  # parameter dtype: fp32, bf16, fp16
    momentum: bool
    amp: bool                   # grad_scale and found_inf
    capturable: bool            # lr and alpha read from device memory
    grad_dtype: Optional[str] = None   # None: the parameter's dtype
    aligned: bool = True        # False: the fallback for views that are not 16-byte aligned
    adopt: bool = True          # adopt_writes: x is read (False: the 40 B/element kernel)

    @property
    def grad(self) -> str:
        return self.grad_dtype or self.dtype

    @property
    def name(self) -> str:
        parts = [self.dtype, "mom" if self.momentum else "nomom"]
        if self.grad_dtype and self.grad_dtype != self.dtype:
            parts.append(f"grad{self.grad_dtype}")
        if self.amp:
            parts.append("amp")
        if self.capturable:
            parts.append("capturable")
        if not self.aligned:
            parts.append("unaligned")
        if not self.adopt:
            parts.append("noadopt")
        return "-".join(parts)

    def streams(self) -> tuple[list[int], list[int]]:
        """Bytes per element of each stream read and each stream written."""
        state = [4, 4] + ([4, 4] if self.momentum else [])
        x_read = [_BYTES[self.dtype]] if self.adopt else []
        return x_read + [_BYTES[self.grad]] + state, state + [_BYTES[self.dtype]]


@dataclass(frozen=True)
class CudaVariant:
    """One template instantiation of ``pilot_step_kernel<T, G, kMomentum>`` (AMP,
    capturable mode and adopt_writes are runtime arguments of the same kernel; its
    vector loop has the x read of adopt_writes)."""

    dtype: str
    momentum: bool
    grad_dtype: Optional[str] = None   # None: the parameter's dtype

    @property
    def name(self) -> str:
        grad = f"-grad{self.grad_dtype}" if self.grad_dtype and self.grad_dtype != self.dtype else ""
        return f"{self.dtype}-{'mom' if self.momentum else 'nomom'}{grad}"

    def streams(self) -> tuple[list[int], list[int]]:
        state = [4, 4] + ([4, 4] if self.momentum else [])
        grad = _BYTES[self.grad_dtype or self.dtype]
        return [_BYTES[self.dtype], grad] + state, state + [_BYTES[self.dtype]]


def triton_variants(extra: bool = False) -> list[TritonVariant]:
    """The variants the launcher uses for same-dtype gradients on aligned tensors, and
    with ``extra`` the two fallbacks (an fp32 gradient on a bf16 parameter; unaligned)."""
    out = [TritonVariant(d, mom, amp, cap) for d in ("fp32", "bf16", "fp16")
           for mom in (True, False) for amp in (False, True) for cap in (False, True)]
    if extra:
        out += [TritonVariant("bf16", True, False, False, grad_dtype="fp32"),
                TritonVariant("fp32", True, False, False, aligned=False),
                TritonVariant("fp32", True, False, False, adopt=False)]
    return out


def cuda_variants() -> list[CudaVariant]:
    return [CudaVariant(d, mom, g) for d, g in (("fp32", None), ("bf16", None), ("bf16", "fp32"),
                                                ("fp16", None), ("fp16", "fp32"))
            for mom in (True, False)]


# ----------------------------------------------------------------------- tools
def find_cuobjdump() -> Optional[str]:
    """Triton's bundled cuobjdump, else one on PATH or in CUDA_HOME."""
    try:
        from triton import knobs

        return knobs.nvidia.cuobjdump.path
    except Exception:  # noqa: BLE001 - any failure means "not bundled"
        pass
    found = shutil.which("cuobjdump")
    if found:
        return found
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    path = Path(home) / "bin" / "cuobjdump"
    return str(path) if path.is_file() else None


def find_nvcc() -> Optional[str]:
    found = shutil.which("nvcc")
    if found:
        return found
    path = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc"
    return str(path) if path.is_file() else None


def _run(cmd: Sequence[str]) -> str:
    proc = subprocess.run(list(cmd), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    return proc.stdout


# ----------------------------------------------------------------------- SASS parsing
# "/*0a10*/   @!P0 LDG.E.128 R44, desc[UR6][R32.64] ;"
_INSTR = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(@!?U?P[T0-9]\s+)?([A-Z][A-Z0-9_]*)((?:\.[A-Z0-9_]+)*)")
_FUNC = re.compile(r"Function\s*:\s*(\S+)")
_MEMORY_OPS = {
    "LDG": "load", "STG": "store",
    "RED": "atomic", "REDG": "atomic", "ATOM": "atomic", "ATOMG": "atomic",
    "LDL": "local", "STL": "local",
    "LD": "generic", "ST": "generic",
}


@dataclass(frozen=True)
class Access:
    kind: str         # load, store, atomic, local, generic
    width: int        # bits per thread
    modifiers: tuple[str, ...]
    predicated: bool

    @property
    def opcode(self) -> str:
        return ".".join(("LDG" if self.kind == "load" else "STG",) + self.modifiers)


def _width(mods: Sequence[str]) -> int:
    for m in mods:
        if m in ("128", "64"):
            return int(m)
        if m in ("U16", "S16"):
            return 16
        if m in ("U8", "S8"):
            return 8
    return 32


def parse_sass(text: str) -> dict[str, dict]:
    """Per function in ``cuobjdump -sass`` output: its instruction count and every
    global/local memory access (kind, width, modifiers, predicated)."""
    out: dict[str, dict] = {}
    current = None
    for line in text.splitlines():
        fm = _FUNC.search(line)
        if fm:
            current = out.setdefault(fm.group(1), {"instructions": 0, "accesses": []})
            continue
        m = _INSTR.search(line)
        if m is None or current is None:
            continue
        current["instructions"] += 1
        op = m.group(2)
        kind = _MEMORY_OPS.get(op)
        if kind is None:
            continue
        mods = tuple(x for x in m.group(3).split(".") if x)
        current["accesses"].append(Access(kind, _width(mods), mods, m.group(1) is not None))
    return out


def parse_res_usage(text: str) -> dict[str, dict[str, int]]:
    """``cuobjdump -res-usage``: per function REG, STACK, SHARED, LOCAL."""
    out: dict[str, dict[str, int]] = {}
    current = None
    for line in text.splitlines():
        fm = re.match(r"\s*Function\s+(\S+?):?\s*$", line)
        if fm:
            current = out.setdefault(fm.group(1), {})
            continue
        if current is not None and "REG:" in line:
            for key, value in re.findall(r"([A-Z]+(?:\[\d+\])?):(\d+)", line):
                current[key] = int(value)
    return out


# ----------------------------------------------------------------------- reports
@dataclass
class KernelReport:
    """What one compiled kernel does to memory, as the JSON and the table show it."""

    family: str                 # "triton" or "cuda"
    variant: str
    arch: int
    function: str
    registers: int
    stack_bytes: int
    local_bytes: int
    shared_static_bytes: int    # includes the 1 KiB sm_90 reserves per block
    shared_dynamic_bytes: int   # Triton's reduction scratch (launch metadata); 0 for CUDA
    instructions: int
    #: data-stream accesses by "load"/"store" → width (bits) → count, split into
    #: "main" (Triton: unmasked full-block path; CUDA: everything) and "masked" (Triton's tail).
    data: dict = field(default_factory=dict)
    #: table/scalar accesses (Triton: evict_last; CUDA: without .STRONG) by opcode
    other: dict = field(default_factory=dict)
    atomics: int = 0
    local_accesses: int = 0
    generic_accesses: int = 0
    cubin: str = ""
    streams: tuple = ()         # bytes per element of (read streams, written streams)
    elements_per_thread: int = 0
    #: Triton only (-1: not inspected): contracted multiply-adds and approximate
    #: divisions in the PTX, either of which rounds differently from the reference
    ptx_fma: int = -1
    ptx_approx_div: int = -1

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def _is_data(family: str, a: Access) -> bool:
    if family == "triton":
        return "EL" not in a.modifiers
    return "STRONG" in a.modifiers


def _report(family, variant, arch, function, res, sass, shared_dynamic, cubin, streams, ept) -> KernelReport:
    data = {"main": {"load": Counter(), "store": Counter()},
            "masked": {"load": Counter(), "store": Counter()}}
    other: Counter = Counter()
    atomics = local = generic = 0
    for a in sass["accesses"]:
        if a.kind == "atomic":
            atomics += 1
        elif a.kind == "local":
            local += 1
        elif a.kind == "generic":
            generic += 1
        elif _is_data(family, a):
            path = "masked" if (family == "triton" and a.predicated) else "main"
            data[path][a.kind][a.width] += 1
        else:
            other[a.opcode] += 1
    data = {p: {k: dict(sorted(c.items(), reverse=True)) for k, c in d.items()} for p, d in data.items()}
    return KernelReport(
        family=family, variant=variant, arch=arch, function=function,
        registers=res.get("REG", -1), stack_bytes=res.get("STACK", -1), local_bytes=res.get("LOCAL", -1),
        shared_static_bytes=res.get("SHARED", -1), shared_dynamic_bytes=shared_dynamic,
        instructions=sass["instructions"], data=data, other=dict(other), atomics=atomics,
        local_accesses=local, generic_accesses=generic, cubin=cubin,
        streams=tuple(tuple(s) for s in streams), elements_per_thread=ept,
    )


# ----------------------------------------------------------------------- Triton
def _load_module(path: Optional[str]):
    """The Triton backend module, or another version of it given as a file (its
    relative imports resolve inside ``pilot_kernels.kernels``)."""
    if path is None:
        from pilot_kernels.kernels import fused_triton

        return fused_triton
    name = "pilot_kernels.kernels._inspected_" + Path(path).stem
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _triton_source(module, v: TritonVariant):
    """ASTSource for ``module._pilot_step_kernel`` specialized as the launcher would
    launch ``v`` (argument types, constexprs, 16-byte alignment of pointers)."""
    import triton
    import triton.language as tl

    fn = module._pilot_step_kernel
    if not isinstance(fn, triton.runtime.jit.JITFunction):
        raise RuntimeError("the Triton kernel was built for the interpreter: unset TRITON_INTERPRET "
                           "to compile it for a GPU")
    constexprs = dict(
        LR_ON_DEVICE=v.capturable, ALPHA_ON_DEVICE=v.capturable, HAS_MOMENTUM=v.momentum,
        NESTEROV=False, MAXIMIZE=False, HAS_WEIGHT_DECAY=True, HAS_GRAD_SCALE=v.amp,
        HAS_FOUND_INF=v.amp, CLEAR_L1=not v.capturable, ADOPT_WRITES=v.adopt, BETA_ZERO=False,
        ALIGNED=v.aligned, SEARCH_STEPS=6,
        BLOCK=module.BLOCK_SIZE, ROW=getattr(module, "ROW", None),
        X_DTYPE=getattr(tl, {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[v.dtype]),
    )
    signature, attrs, const = {}, {}, {}
    streams = {"x_base": v.dtype, "g_base": v.grad}
    for i, (name, param) in enumerate(zip(fn.arg_names, fn.params)):
        if param.is_constexpr:
            if name not in constexprs:
                raise ValueError(f"no value for constexpr {name} of {fn.__name__}")
            value = constexprs[name]
            const[name] = value.value if isinstance(value, tl.constexpr) else value
            signature[name] = "constexpr"
            continue
        if name == "table_ptr":
            ty = "*i64"
        elif name in streams:
            ty = "*" + _TL[streams[name]]
        elif name.endswith(("_ptr", "_base")) or (name in ("lr", "alpha") and v.capturable):
            ty = "*fp32"
        elif name == "n_tensors":
            ty = "i32"
        else:
            ty = "fp32"
        signature[name] = ty
        # Triton specializes a pointer argument on 16-byte alignment; the data bases of
        # an unaligned launch are not.
        if ty.startswith("*") and (v.aligned or not name.endswith("_base")):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return triton.compiler.ASTSource(fn, signature, const, attrs)


def inspect_triton(variants: Iterable[TritonVariant], archs: Iterable[int], out_dir: Path,
                   module_path: Optional[str] = None, cuobjdump: Optional[str] = None) -> list[KernelReport]:
    """Compile each variant for each arch (no GPU needed), write the cubin and SASS
    under ``out_dir/triton/sm_<arch>/``, and report on each."""
    import triton
    from triton.backends.compiler import GPUTarget

    module = _load_module(module_path)
    options = dict(getattr(module, "LAUNCH_OPTIONS", {"num_warps": module.NUM_WARPS}))
    ept = module.BLOCK_SIZE // (32 * options["num_warps"])
    cuobjdump = cuobjdump or find_cuobjdump()
    reports = []
    for arch in archs:
        d = Path(out_dir) / "triton" / f"sm_{arch}"
        d.mkdir(parents=True, exist_ok=True)
        for v in variants:
            kernel = triton.compile(_triton_source(module, v), target=GPUTarget("cuda", arch, 32),
                                    options=options)
            cubin = d / f"{v.name}.cubin"
            cubin.write_bytes(kernel.asm["cubin"])
            sass_text = _run([cuobjdump, "-sass", str(cubin)])
            (d / f"{v.name}.sass").write_text(sass_text)
            (d / f"{v.name}.ptx").write_text(kernel.asm["ptx"])
            res = parse_res_usage(_run([cuobjdump, "-res-usage", str(cubin)]))
            (fname, sass), = parse_sass(sass_text).items()
            report = _report("triton", v.name, arch, fname, res.get(fname, {}), sass,
                             kernel.metadata.shared, str(cubin), v.streams(), ept)
            ptx = kernel.asm["ptx"]
            report.ptx_fma = len(re.findall(r"\bfma\.", ptx))
            report.ptx_approx_div = len(re.findall(r"\bdiv\.(?:full|approx)\.", ptx))
            reports.append(report)
    return reports


# ----------------------------------------------------------------------- CUDA
_CUDA_TYPES = {"f": "fp32", "13__nv_bfloat16": "bf16", "6__half": "fp16"}


def _cuda_variant_of(mangled: str) -> Optional[CudaVariant]:
    # A repeated class type is mangled as a back-reference (S2_): the gradient is x's dtype.
    m = re.search(r"pilot_step_kernelI(f|13__nv_bfloat16|6__half)(f|S\d*_)Lb([01])E", mangled)
    if not m:
        return None
    dtype = _CUDA_TYPES[m.group(1)]
    grad = "fp32" if m.group(2) == "f" else dtype
    return CudaVariant(dtype, m.group(3) == "1", None if grad == dtype else grad)


def inspect_cuda(archs: Iterable[int], out_dir: Path, nvcc: Optional[str] = None,
                 cuobjdump: Optional[str] = None) -> list[KernelReport]:
    """Compile ``csrc/pilot_step.cu`` with the real build's nvcc flags to one cubin per
    arch under ``out_dir/cuda/sm_<arch>/`` and report on each instantiation."""
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

    from pilot_kernels.kernels import cuda_build

    nvcc = nvcc or find_nvcc()
    cuobjdump = cuobjdump or find_cuobjdump()
    csrc = Path(cuda_build.csrc_dir())
    flags = [f for f in cuda_build.nvcc_flags("9.0") if not f.startswith("-gencode")]
    reports = []
    for arch in archs:
        d = Path(out_dir) / "cuda" / f"sm_{arch}"
        d.mkdir(parents=True, exist_ok=True)
        cubin = d / "pilot_step.cubin"
        _run([nvcc, "-cubin", f"-arch=sm_{arch}", *flags, *COMMON_NVCC_FLAGS, "-I", str(csrc),
              str(csrc / "pilot_step.cu"), "-o", str(cubin)])
        sass_text = _run([cuobjdump, "-sass", str(cubin)])
        (d / "pilot_step.sass").write_text(sass_text)
        res = parse_res_usage(_run([cuobjdump, "-res-usage", str(cubin)]))
        for fname, sass in parse_sass(sass_text).items():
            v = _cuda_variant_of(fname)
            if v is None:
                continue
            reports.append(_report("cuda", v.name, arch, fname, res.get(fname, {}), sass, 0,
                                   str(cubin), v.streams(), 4))
    order = {v.name: i for i, v in enumerate(cuda_variants())}
    return sorted(reports, key=lambda r: (r.arch, order.get(r.variant, 99)))


# ----------------------------------------------------------------------- the contract
def _bits(counter: dict) -> int:
    return sum(int(w) * n for w, n in counter.items())


def _n(counter: dict, at_least: int) -> int:
    return sum(n for w, n in counter.items() if int(w) >= at_least)


def check(r: KernelReport) -> list[str]:
    """What CI holds a kernel to; returns the violations (empty: fine)."""
    problems = []
    if r.local_bytes != 0 or r.stack_bytes != 0 or r.local_accesses:
        problems.append(f"local memory: {r.local_bytes} B local, {r.stack_bytes} B stack, "
                        f"{r.local_accesses} LDL/STL (register spills?)")
    if r.generic_accesses:
        problems.append(f"{r.generic_accesses} generic (LD/ST) accesses: a pointer the compiler "
                        "could not prove global")
    if r.atomics != 1:
        problems.append(f"{r.atomics} atomic instructions, expected exactly 1 (the block's L1 sum)")
    if r.ptx_fma > 0:
        problems.append(f"{r.ptx_fma} fma in the PTX: contracted multiply-adds round unlike the "
                        "reference (launch with enable_fp_fusion=False)")
    if r.ptx_approx_div > 0:
        problems.append(f"{r.ptx_approx_div} approximate divisions in the PTX (use tl.math.div_rn)")
    reads, writes = r.streams
    if "unaligned" in r.variant:
        return problems
    for kind, sizes in (("load", reads), ("store", writes)):
        main = r.data["main"][kind]
        state = [s for s in sizes if s == 4]
        narrow = [s for s in sizes if s < 4]
        if r.family == "triton":
            # The unmasked path moves a full block per thread: exactly its bytes, fp32
            # streams only in 128-bit accesses, 16-bit streams in >= 64-bit ones.
            want_bits = 8 * r.elements_per_thread * sum(sizes)
            if _bits(main) != want_bits:
                problems.append(f"main path {kind}s move {_bits(main)} bits per thread, a full block "
                                f"needs {want_bits}: {main}")
            want128 = r.elements_per_thread * 4 * len(state) // 16
            if _n(main, 128) < want128:
                problems.append(f"main path: {_n(main, 128)} 128-bit {kind}s, the fp32 streams alone "
                                f"need {want128}: {main}")
            if narrow and _n(main, 64) < want128 + len(narrow):
                problems.append(f"main path: 16-bit streams not in >= 64-bit {kind}s: {main}")
            if any(int(w) < 64 for w in main):
                problems.append(f"main path has {kind}s narrower than 64 bits: {main}")
            if not narrow and any(int(w) < 128 for w in main):
                problems.append(f"main path of an fp32 variant has {kind}s narrower than 128 bits: {main}")
        else:
            # The vector loop touches each stream once per iteration (or more, unrolled).
            if _n(main, 128) < len(state):
                problems.append(f"{_n(main, 128)} 128-bit {kind}s for {len(state)} fp32 streams: {main}")
            if _n(main, 64) < len(sizes):
                problems.append(f"{_n(main, 64)} >= 64-bit {kind}s for {len(sizes)} streams: {main}")
    return problems


# ----------------------------------------------------------------------- output
def _fmt(counter: dict) -> str:
    return " ".join(f"{n}×{w}" for w, n in counter.items()) or "–"


def markdown_table(reports: Sequence[KernelReport]) -> str:
    """One row per kernel: resources and data accesses (count × bits) per path."""
    head = ("| kernel | variant | sm | regs | local B | smem B (static+dyn) | main loads | main stores "
            "| masked loads | masked stores | atomics | contract |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in reports:
        problems = check(r)
        verdict = "ok" if not problems else "FAIL: " + "; ".join(problems)
        if "unaligned" in r.variant:
            verdict = "fallback (not held to the vector contract)" if not problems else verdict
        lines.append(
            f"| {r.family} | {r.variant} | {r.arch} | {r.registers} | {r.local_bytes + r.stack_bytes} "
            f"| {r.shared_static_bytes}+{r.shared_dynamic_bytes} | {_fmt(r.data['main']['load'])} "
            f"| {_fmt(r.data['main']['store'])} | {_fmt(r.data['masked']['load'])} "
            f"| {_fmt(r.data['masked']['store'])} | {r.atomics} "
            f"| {verdict} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(
        prog="inspect_kernels",
        description="Compile the fused PILoT kernels for GPUs (no GPU needed) and report registers, "
                    "local/shared memory and the global accesses by width, read from the SASS.")
    ap.add_argument("--out", required=True, help="directory for the cubins, SASS, kernels.json, kernels.md")
    ap.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), help="compute capabilities (80 90)")
    ap.add_argument("--only", choices=("triton", "cuda"), help="inspect one backend only")
    ap.add_argument("--variants", nargs="+", help="Triton variant names (default: all, plus the fallbacks)")
    ap.add_argument("--triton-module", help="inspect this file instead of pilot_kernels/kernels/fused_triton.py "
                                            "(e.g. an older version, to compare)")
    ap.add_argument("--check", action="store_true", help="exit 1 if a kernel breaks the contract")
    args = ap.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    reports: list[KernelReport] = []
    if args.only != "cuda":
        variants = triton_variants(extra=True)
        if args.variants:
            wanted = set(args.variants)
            variants = [v for v in variants if v.name in wanted]
            missing = wanted - {v.name for v in variants}
            if missing:
                ap.error(f"unknown variants {sorted(missing)}; known: {[v.name for v in triton_variants(True)]}")
        reports += inspect_triton(variants, args.arch, out, args.triton_module)
    if args.only != "triton":
        reports += inspect_cuda(args.arch, out)
    payload = [dict(r.to_json(), problems=check(r)) for r in reports]
    (out / "kernels.json").write_text(json.dumps(payload, indent=1))
    table = markdown_table(reports)
    (out / "kernels.md").write_text(table)
    print(table)
    bad = [r for r in payload if r["problems"]]
    return 1 if (args.check and bad) else 0


if __name__ == "__main__":
    sys.exit(main())
