"""Run a worker script under ``paddle.distributed.launch`` on CPU processes, as the multi-process tests do.

One place for the command, the environment and the failure report: when the launch fails,
the report ends with the launcher's own verdict (its exit code and its last lines, where
Paddle names each worker's exit code), because a CI log is often read from its tail.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import pytest

ROOT = Path(__file__).resolve().parents[1]


def launch_workers(script: Path, out: Path, nproc: int = 2, args: Sequence[str] = (), timeout: int = 240) -> Path:
    """Run ``script --out OUT ARGS`` on ``nproc`` processes (gloo); fail the test with every log when it fails."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), MKL_DEBUG_CPU_TYPE="5")
    cmd = [
        sys.executable, "-m", "paddle.distributed.launch", "--log_dir", str(out / "log"),
        "--nproc_per_node", str(nproc), str(script), "--out", str(out), *args,
    ]
    proc = subprocess.run(cmd, cwd=out, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        logs = "\n".join(
            f"--- {p.name} ---\n{p.read_text(errors='replace')[-3000:]}" for p in sorted((out / "log").glob("workerlog.*"))
        )
        pytest.fail(
            f"{logs}\n--- launcher stderr ---\n{proc.stderr[-2000:]}\n--- launcher stdout ---\n{proc.stdout[-2000:]}\n"
            f"paddle.distributed.launch of {script.name} exited {proc.returncode} (worker logs above)"
        )
    return out
