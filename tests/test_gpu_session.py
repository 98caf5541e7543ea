"""``benchmarks/gpu_session.sh``: its ``--dry-run`` runs every step that needs no CUDA
and reports the others as skipped; a failing step does not stop the ones after it."""
from __future__ import annotations

import json
import os
import subprocess
import tarfile
from pathlib import Path


SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_session.sh"
STEPS = ("env", "install", "build", "tests_gpu", "check", "step_resnet50", "step_1e9", "training", "inspect")


def _run(out: Path, *args: str, **env: str) -> tuple[subprocess.CompletedProcess, dict[str, str]]:
    proc = subprocess.run(["bash", str(SCRIPT), *args, str(out)], capture_output=True, text=True,
                          timeout=900, env={**os.environ, **env})
    summary = {}
    for line in (out / "summary.txt").read_text().splitlines():
        name, rest = line.split(None, 1)
        summary[name] = rest.rsplit(None, 1)[0].strip()
    return proc, summary


def test_dry_run_runs_every_step_that_needs_no_cuda(tmp_path):
    proc, summary = _run(tmp_path, "--dry-run", "--skip", "inspect")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert list(summary) == list(STEPS)
    assert summary["install"].startswith("skipped: dry run")
    assert summary["build"] == summary["tests_gpu"] == "skipped: needs CUDA (dry run)"
    assert summary["inspect"] == "skipped: --skip"
    for name in ("env", "check", "step_resnet50", "step_1e9", "training"):
        assert summary[name] == "ok", (name, summary[name], (tmp_path / f"{name}.log").read_text()[-2000:])
    assert "device_type" in (tmp_path / "env.txt").read_text()
    assert json.loads((tmp_path / "check.json").read_text())["passed"] is True
    for stem in ("step-resnet50", "step-1e9", "training"):
        assert json.loads((tmp_path / f"{stem}.json").read_text())["rows"]
    with tarfile.open(tmp_path / "gpu_session.tar.gz") as tar:
        names = {Path(n).name for n in tar.getnames()}
    assert {"summary.txt", "env.txt", "check.json", "step-resnet50.json", "training.log"} <= names


def test_a_failing_step_does_not_stop_the_others(tmp_path):
    proc, summary = _run(tmp_path, "--dry-run", "--skip", "inspect,env", PYTHON="false")
    assert proc.returncode == 1
    assert list(summary) == list(STEPS)
    for name in ("check", "step_resnet50", "step_1e9", "training"):
        assert summary[name] == "failed (exit 1)", (name, summary)


def test_steps_stop_when_the_budget_is_spent(tmp_path):
    proc, summary = _run(tmp_path, "--dry-run", "--skip", "env,inspect", PYTHON="sleep 3; false",
                         GPU_SESSION_BUDGET_S="14")
    assert proc.returncode == 1
    assert summary["check"] == "failed (exit 1)"
    assert summary["training"] == "skipped: the 14s budget is spent"


def test_unknown_option_is_refused(tmp_path):
    proc = subprocess.run(["bash", str(SCRIPT), "--frobnicate", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown option --frobnicate" in proc.stderr
