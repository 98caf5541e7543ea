#!/usr/bin/env bash
# The one prepared GPU run: everything a lent GPU machine should tell us, in one call
# of at most 8 minutes, written to one folder.
#
#   bash benchmarks/gpu_session.sh [--dry-run] [--skip STEP[,STEP...]] [OUT_DIR]
#
# OUT_DIR defaults to $OUT (the device tool's output folder) or, without it,
# benchmarks/results/gpu-session-<UTC time>.  Steps, each time-boxed with `timeout`
# (a failing or slow step never stops the ones after it), all output in OUT_DIR:
#
#   env             nvidia-smi, python and library versions          -> env.txt
#   install         pip install --no-index --no-deps --no-build-isolation -e .  -> install.log
#   build           the CUDA twin ahead of time for this GPU's arch (PILOT_BUILD_CUDA=1),
#                   else just in time; the cpu backend                -> build.log
#   tests_gpu       pytest -m gpu                                     -> tests_gpu.xml/.log
#   check           python -m pilot_kernels.check --json              -> check.json/.log
#   step_resnet50   bench_step.py: resnet50 and small2000 sets        -> step-resnet50.{json,csv}
#   step_1e9        bench_step.py: one tensor of 2^30 elements        -> step-1e9.{json,csv}
#   training        bench_training.py, 10 timed iterations            -> training.{json,csv}
#   inspect         benchmarks/inspect_kernels.py, sm_90 (if present) -> inspect/
#
# and summary.txt (one line per step), gpu_session.tar.gz (all of it).  The device's
# own python3 and its torch/triton are used (PYTHON overrides it); nothing is downloaded
# (pip runs with --no-index --no-deps).  Every step imports this checkout's pilot_kernels
# (PYTHONPATH), so a failed install step costs only its version in the records; the
# tools the scripts import (bench, envinfo, sass) sit beside them in benchmarks/.
# Needs: torch, triton, ninja; pytest for tests_gpu, torchvision for training.
#
# --dry-run (no GPU needed) runs every step that does not need CUDA on the CPU, in its
# quick form, and reports the CUDA-only steps as skipped: it is what CI runs.
set -u -o pipefail

DRY=0
SKIP=","
OUT_DIR=""
while (($#)); do
    case "$1" in
        --dry-run) DRY=1 ;;
        --skip) SKIP=",$2,"; shift ;;
        -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
        -*) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
        *) OUT_DIR="$1" ;;
    esac
    shift
done

cd "$(dirname "$0")/.." || exit 2
OUT_DIR="${OUT_DIR:-${OUT:-benchmarks/results/gpu-session-$(date -u +%Y%m%d-%H%M%S)}}"
mkdir -p "$OUT_DIR" || exit 2
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
PY="${PYTHON:-python3}"
BUDGET_S="${GPU_SESSION_BUDGET_S:-470}"   # the whole script, so that it ends inside 8 minutes
((DRY)) && BUDGET_S="${GPU_SESSION_BUDGET_S:-1200}"  # CI's shared CPUs: no box to fit
export PYTHONUNBUFFERED=1
# This checkout's pilot_kernels for every step, the scripts' included, installed or not.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PILOT_GIT_COMMIT="${PILOT_GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || true)}"
if ((DRY)); then export TRITON_INTERPRET=1; fi
START=$SECONDS
SUMMARY="$OUT_DIR/summary.txt"
: > "$SUMMARY"

note() {  # step name, status, seconds
    printf '%-14s %-44s %4ss\n' "$1" "$2" "$3" | tee -a "$SUMMARY"
}

# step NAME LIMIT_S COMMAND: run COMMAND (a bash string) for at most LIMIT_S seconds, or
# what is left of the budget, output in NAME.log.
step() {
    local name=$1 limit=$2 cmd=$3 left rc t0 status
    if [[ $SKIP == *",$name,"* ]]; then note "$name" "skipped: --skip" 0; return; fi
    left=$((BUDGET_S - (SECONDS - START)))
    if ((left < 10)); then note "$name" "skipped: the ${BUDGET_S}s budget is spent" 0; return; fi
    ((limit > left)) && limit=$left
    echo "== $name (at most ${limit}s): $cmd"
    t0=$SECONDS
    timeout --kill-after=10 "$limit" bash -c "$cmd" > "$OUT_DIR/$name.log" 2>&1
    rc=$?
    case $rc in
        0) status="ok" ;;
        124|137) status="timeout after ${limit}s" ;;
        *) status="failed (exit $rc)" ;;
    esac
    tail -n 5 "$OUT_DIR/$name.log" | sed 's/^/   | /'
    note "$name" "$status" $((SECONDS - t0))
}

gpu_only() {  # name: the dry run reports a CUDA-only step
    note "$1" "skipped: needs CUDA (dry run)" 0
}

O="$OUT_DIR"
step env 60 "{ date -u; git rev-parse HEAD; git status --short | head -20; nvidia-smi || echo 'nvidia-smi: not found'; \
    PYTHONPATH=\"benchmarks:\$PYTHONPATH\" $PY -c 'import json, torch; from envinfo import environment; \
print(json.dumps(environment(\"cuda\" if torch.cuda.is_available() else \"cpu\"), indent=1))' \
    || $PY -c 'import sys, torch; print(sys.version, torch.__version__)'; } > '$O/env.txt' 2>&1; cat '$O/env.txt'"

if ((DRY)); then
    note install "skipped: dry run (would pip install -e .)" 0
    gpu_only build
    gpu_only tests_gpu
    step check 300 "$PY -m pilot_kernels.check --device cpu --quick --backends reference,cpu,cuda --dtypes float32 \
        --rounds 2 --json '$O/check.json'"
    step step_resnet50 300 "$PY benchmarks/bench_step.py --device cpu --quick --shapes resnet50 \
        --providers reference,torch_foreach,copy --rounds 2 --host-rounds 2 --no-temp --out '$O' --name step-resnet50"
    step step_1e9 300 "$PY benchmarks/bench_step.py --device cpu --quick --shapes single --log2 12 \
        --providers torch_fused,copy --rounds 2 --host-rounds 0 --no-temp --no-profile --out '$O' --name step-1e9"
    step training 300 "$PY benchmarks/bench_training.py --device cpu --quick --warmup 0 --iters 1 --providers dense \
        --out '$O' --name training"
else
    step install 45 "$PY -m pip install --no-index --no-deps --no-build-isolation -e ."
    CC=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n1)
    # The cpu backend too: check.py tests it on this machine's CPU, and its first build
    # would otherwise fall inside check's time box.
    step build 150 "rc=0; PILOT_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST='${CC:-9.0}' MAX_JOBS=\$(nproc) \
        $PY -m pip install --no-index --no-deps --no-build-isolation -e . \
        || $PY -c 'from pilot_kernels.kernels import fused_cuda; fused_cuda.load_extension(); print(\"cuda: built just in time\")' \
        || rc=1; $PY -c 'from pilot_kernels.kernels import fused_cpu; assert fused_cpu.available(), fused_cpu.build_error()' \
        || rc=1; exit \$rc"
    step tests_gpu 70 "$PY -m pytest -m gpu -q -p no:cacheprovider --junitxml='$O/tests_gpu.xml'"
    step check 80 "$PY -m pilot_kernels.check --json '$O/check.json'"
    step step_resnet50 70 "$PY benchmarks/bench_step.py --shapes resnet50,small2000 --dtypes float32 \
        --out '$O' --name step-resnet50"
    step step_1e9 60 "$PY benchmarks/bench_step.py --shapes single --log2 30 --dtypes float32 --host-rounds 0 \
        --no-temp --out '$O' --name step-1e9"
    step training 45 "$PY benchmarks/bench_training.py --warmup 3 --iters 10 --host-iters 5 \
        --out '$O' --name training"
fi
if [[ -f benchmarks/inspect_kernels.py ]]; then
    # It compiles for the GPU without one, so it refuses the interpreter's variable.
    if ((DRY)); then
        step inspect 90 "env -u TRITON_INTERPRET $PY benchmarks/inspect_kernels.py --out '$O/inspect' --arch 90 \
            --only triton --variants fp32-mom"
    else
        step inspect 30 "$PY benchmarks/inspect_kernels.py --out '$O/inspect' --arch 90"
    fi
else
    note inspect "skipped: benchmarks/inspect_kernels.py not present" 0
fi

(cd "$OUT_DIR" && tar --exclude=gpu_session.tar.gz -czf gpu_session.tar.gz ./*) 2>/dev/null
echo "== summary ($((SECONDS - START))s in all; files in $OUT_DIR)"
cat "$SUMMARY"
# exit status: 1 when a step that ran failed or timed out
! grep -q -e ' failed (exit' -e ' timeout after' "$SUMMARY"
