"""Run the README's multi-process training command several times and report how many runs completed.

    python tools/stress_distributed_training.py --runs 10 --epochs 3 --out /tmp/stress

Each run is ``python -m paddle.distributed.launch --nproc_per_node 2 examples/clip/run_pretrain_dist.py
configs/train/demo.json`` with sharding stage1, ``--local_loss --gather_with_grad`` and two loader
workers per rank, on the demo data, followed by its zero-shot evaluation. A run counts as completed
when the launcher exits 0 and ``train_results.json`` was written. Every run's exit status, time,
zero-shot top-1 and the first error line of its logs are printed, one line each, then ``N/M completed``;
``--json`` also writes them to a file. Exits non-zero unless every run completed.

CPU heavy: run it on an otherwise quiet machine.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
# Lines that tell why a rank died (the first one found is reported).
_FAILURE_MARKS = ("Segmentation fault", "segmentation fault", "Aborted", "SystemError", "Error:", "TIMEOUT",
                  "Exit code -")


def _command(args: argparse.Namespace, out: Path) -> List[str]:
    return [
        sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", str(args.nproc),
        "--log_dir", str(out / "logs"),
        str(ROOT / "examples" / "clip" / "run_pretrain_dist.py"), str(ROOT / "configs" / "train" / "demo.json"),
        "--sharding", "stage1", "--sharding_parallel_degree", str(args.nproc),
        "--local_loss", "true", "--gather_with_grad", "true",
        "--dataloader_num_workers", str(args.workers), "--num_train_epochs", str(args.epochs),
        "--output_dir", str(out / "out"), *(["--data_root", args.data_root] if args.data_root else []),
    ]


def _first_failure(log_dir: Path) -> Optional[str]:
    for log in sorted(log_dir.glob("workerlog.*")) + [log_dir.parent / "launch.log"]:
        for line in log.read_text(errors="replace").splitlines():
            if any(mark in line for mark in _FAILURE_MARKS) and not line.startswith(" "):
                return f"{log.name}: {line.strip()[:200]}"
    return None


def run_once(args: argparse.Namespace, index: int) -> Dict[str, object]:
    out = Path(args.out) / f"run{index:02d}"
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        with open(out / "launch.log", "w") as log:
            proc = subprocess.run(_command(args, out), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                  timeout=args.timeout)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        code = "timeout"
    seconds = time.perf_counter() - start
    results = out / "out" / "train_results.json"
    metrics = json.loads(results.read_text()) if results.is_file() else {}
    completed = code == 0 and bool(metrics)
    return {
        "run": index, "completed": completed, "exit": code, "seconds": round(seconds, 1),
        "eval_acc1": metrics.get("eval_acc1"), "train_loss": metrics.get("train_loss"),
        "failure": None if completed else _first_failure(out / "logs"),
    }


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--epochs", type=float, default=3, help="of the demo recipe (its own value is 6)")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2, help="--dataloader_num_workers per rank")
    parser.add_argument("--data_root", default=None, help="demo data folder (default: the paddlemix cache)")
    parser.add_argument("--out", required=True, help="folder for the runs' outputs and logs")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds before a run counts as hung")
    parser.add_argument("--json", default=None, help="also write the per-run results here")
    args = parser.parse_args(argv)

    print(f"command: {' '.join(_command(args, Path(args.out) / 'runNN'))}", flush=True)
    rows = []
    for index in range(1, args.runs + 1):
        row = run_once(args, index)
        rows.append(row)
        acc = "-" if row["eval_acc1"] is None else f"{100 * row['eval_acc1']:.1f}%"
        status = "completed" if row["completed"] else "FAILED"
        detail = f"  {row['failure']}" if row["failure"] else ""
        print(f"run {index:2d}/{args.runs}: {status:9s} exit={row['exit']} {row['seconds']:6.1f}s "
              f"zero-shot top-1 {acc}{detail}", flush=True)
    done = sum(r["completed"] for r in rows)
    print(f"{done}/{args.runs} completed", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"command": _command(args, Path(args.out) / "runNN"), "runs": rows},
                                              indent=2))
    return 0 if done == args.runs else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONPATH", str(ROOT))
    sys.exit(main())
