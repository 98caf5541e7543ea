"""GPU-performance regressions CI can catch without a GPU: compile the kernels for sm_90
and hold their SASS to the contract of :func:`sass.check` (``benchmarks/sass.py``).

* Triton: every fp32 variant's unmasked (full-block) path reads and writes all its
  streams (x read too, unless ``adopt_writes=False``) with 128-bit accesses; bf16/fp16 variants use >= 64-bit accesses for x and its
  gradient and 128-bit ones for the fp32 state;
* CUDA twin: every stream has a vector access of those widths;
* both: no local memory, one atomic instruction per program;
* Triton: no contracted multiply-add and no approximate division in the PTX.

The kernels are compiled once per session in a subprocess (the tests' Triton runs in its
CPU interpreter, which cannot compile for a GPU), for sm_90 only and for the variants
the assertions name; ``benchmarks/inspect_kernels.py`` covers every variant and sm_80.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import sass  # benchmarks/ is on pytest's pythonpath

NVCC = sass.find_nvcc()
CUOBJDUMP = sass.find_cuobjdump()
pytestmark = pytest.mark.skipif(
    NVCC is None or CUOBJDUMP is None,
    reason=f"needs nvcc (found: {NVCC}) and cuobjdump (found: {CUOBJDUMP}) to compile and disassemble",
)

ARCH = 90
TRITON_VARIANTS = [v for v in sass.triton_variants() if v.dtype == "fp32"] + [
    sass.TritonVariant("bf16", True, True, True),
    sass.TritonVariant("bf16", False, False, False),
    sass.TritonVariant("fp16", True, True, True),
    sass.TritonVariant("fp16", False, False, False),
    sass.TritonVariant("fp32", True, False, False, adopt=False),   # adopt_writes=False: x not read
]


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> dict[tuple[str, str], dict]:
    out = tmp_path_factory.mktemp("sass")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, sass.__file__, "--out", str(out), "--arch", str(ARCH),
           "--variants", *[v.name for v in TRITON_VARIANTS]]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    rows = json.loads((out / "kernels.json").read_text())
    print(proc.stdout)  # the table, shown with pytest -s
    return {(r["family"], r["variant"]): r for r in rows}


@pytest.mark.parametrize("variant", [v.name for v in TRITON_VARIANTS])
def test_triton_variant_is_vectorized(reports, variant):
    row = reports[("triton", variant)]
    assert row["problems"] == [], f"{variant}: {row['problems']}"
    # At most 128 registers per thread keeps at least 16 warps resident per SM.
    assert row["registers"] <= 128, f"{variant} uses {row['registers']} registers"


@pytest.mark.parametrize("variant", [v.name for v in sass.cuda_variants()])
def test_cuda_twin_is_vectorized(reports, variant):
    row = reports[("cuda", variant)]
    assert row["problems"] == [], f"{variant}: {row['problems']}"


def test_every_variant_was_inspected(reports):
    assert {v for f, v in reports if f == "triton"} == {v.name for v in TRITON_VARIANTS}
    assert {v for f, v in reports if f == "cuda"} == {v.name for v in sass.cuda_variants()}


# ---------------------------------------------------------------- the parser itself
SNIPPET = """
        code for sm_90
                Function : k
        /*0000*/                   LDG.E.64.EL R2, desc[UR6][R4.64+0x38] ;
        /*0010*/                   LDG.E.128 R44, desc[UR6][R32.64] ;
        /*0020*/               @P0 LDG.E R12, desc[UR6][R32.64+0x4] ;
        /*0030*/              @!P1 LDG.E.U16 R13, desc[UR6][R6.64] ;
        /*0040*/                   STG.E.128 desc[UR6][R52.64], R20 ;
        /*0050*/                   REDG.E.ADD.F32.FTZ.RN.STRONG.GPU desc[UR6][R2.64], R5 ;
        /*0060*/                   STL [R1], R3 ;
        /*0070*/                   EXIT ;
"""


def test_parse_sass_classifies_accesses():
    (name, parsed), = sass.parse_sass(SNIPPET).items()
    assert name == "k" and parsed["instructions"] == 8
    got = [(a.kind, a.width, a.predicated) for a in parsed["accesses"]]
    assert got == [("load", 64, False), ("load", 128, False), ("load", 32, True), ("load", 16, True),
                   ("store", 128, False), ("atomic", 32, False), ("local", 32, False)]
    report = sass._report("triton", "v", 90, name, {"REG": 40, "STACK": 0, "LOCAL": 0, "SHARED": 0},
                          parsed, 0, "", ([4], [4]), 8)
    assert report.data["main"] == {"load": {128: 1}, "store": {128: 1}}
    assert report.data["masked"]["load"] == {32: 1, 16: 1}
    assert report.other == {"LDG.E.64.EL": 1} and report.atomics == 1 and report.local_accesses == 1
    problems = sass.check(report)
    assert any("local memory" in p for p in problems)
    assert any("full block needs" in p for p in problems)


def test_parse_res_usage():
    text = " Function k:\n  REG:64 STACK:0 SHARED:1024 LOCAL:8 CONSTANT[0]:664 TEXTURE:0\n"
    assert sass.parse_res_usage(text)["k"] == {"REG": 64, "STACK": 0, "SHARED": 1024, "LOCAL": 8,
                                                 "CONSTANT[0]": 664, "TEXTURE": 0}
