"""Show me the SASS: compile the fused PILoT kernels for sm_80 and sm_90 (no GPU needed)
and tabulate registers, local/shared memory and global accesses by width.

    python benchmarks/inspect_kernels.py --out results/sass            # every variant
    python benchmarks/inspect_kernels.py --out /tmp/s --arch 90 --only triton --variants fp32-mom
    python benchmarks/inspect_kernels.py --out /tmp/old --triton-module old_fused_triton.py

Writes ``kernels.json``, ``kernels.md`` and per kernel the cubin and SASS under ``--out``;
``--check`` exits 1 if a kernel breaks the contract (see ``docs/kernels.md``).  The work
is done by :mod:`sass` (beside this script).
"""
import os
import sys

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("TRITON_INTERPRET=1 builds the Triton kernel for the CPU interpreter; unset it to compile for a GPU")

from sass import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
