"""CPU forward+backward time of the fused_ln operator against Paddle's own layer_norm.

Two comparisons per shape, measured in the same process, interleaved repeat by
repeat so load changes on a shared machine hit both sides alike:

* layer norm alone:     ``F.layer_norm``                       vs ``fused_ln(x)``
* residual add + norm:  ``s = x + r; y = F.layer_norm(s)``     vs ``fused_ln(x, r)``
  (backward takes upstream gradients for both y and s, as in a pre-norm block)

Each measurement is run in a fresh worker process per allocator setting:

* ``default``: glibc malloc as shipped. Paddle's CPU allocator returns large
  blocks to the OS, so every freshly allocated output page-faults on first
  write; for these sizes that costs about as much as the arithmetic, on both sides.
* ``retain``: ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` raised so
  freed memory is reused: the kernels' own cost.

    MKL_DEBUG_CPU_TYPE=5 python benchmarks/bench_fused_ln.py            # 2 threads, both settings
    python benchmarks/bench_fused_ln.py --json results.json --repeats 15

MKL_DEBUG_CPU_TYPE=5 and OMP_NUM_THREADS (``--threads``, default 2) are set for
the workers; the fused operator must be built ahead (`python -m paddlemix.kernels build`).
"""
import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

_logger = logging.getLogger("bench_fused_ln")

SHAPES = ((8192, 768), (8192, 1408), (2048, 5120))
MALLOC_ENV = {
    "default": {},
    "retain": {
        "MALLOC_MMAP_THRESHOLD_": str(1 << 32),
        "MALLOC_TRIM_THRESHOLD_": str(1 << 32),
        "MALLOC_TOP_PAD_": str(1 << 28),
    },
}
CASES = ("paddle_ln", "fused_ln", "paddle_add_ln", "fused_add_ln")


def _worker(shapes: List[List[int]], repeats: int, warmup: int) -> Dict:
    """Runs inside a worker process: returns median ms per (shape, case, pass)."""
    import paddle
    import paddle.nn.functional as F

    from paddlemix import kernels
    from paddlemix.kernels import ops

    status = kernels.status()
    if not status.available:
        raise SystemExit(f"fused_ln operator unavailable: {status.detail}")
    paddle.seed(0)
    results = []
    for rows, cols in shapes:
        shape = [rows, cols]
        x, r, dy, ds = (paddle.randn(shape) for _ in range(4))
        w, b = paddle.rand([cols]) + 0.5, paddle.randn([cols])
        for t in (x, r, w, b):
            t.stop_gradient = False

        def run_paddle_ln():
            y = F.layer_norm(x, [cols], w, b, 1e-5)
            return paddle.grad([y], [x, w, b], [dy])

        def run_fused_ln():
            y = ops.fused_ln(x, None, w, b, 1e-5, False)[0]
            return paddle.grad([y], [x, w, b], [dy])

        def run_paddle_add_ln():
            s = x + r
            y = F.layer_norm(s, [cols], w, b, 1e-5)
            return paddle.grad([y, s], [x, r, w, b], [dy, ds])

        def run_fused_add_ln():
            y, s, _, _ = ops.fused_ln(x, r, w, b, 1e-5, False)
            return paddle.grad([y, s], [x, r, w, b], [dy, ds])

        forward_only = {
            "paddle_ln": lambda: F.layer_norm(x, [cols], w, b, 1e-5),
            "fused_ln": lambda: ops.fused_ln(x, None, w, b, 1e-5, False),
            "paddle_add_ln": lambda: F.layer_norm(x + r, [cols], w, b, 1e-5),
            "fused_add_ln": lambda: ops.fused_ln(x, r, w, b, 1e-5, False),
        }
        fwd_bwd = dict(zip(CASES, (run_paddle_ln, run_fused_ln, run_paddle_add_ln, run_fused_add_ln)))
        times: Dict[str, List[float]] = {f"{c}/{p}": [] for c in CASES for p in ("fwd", "fwd_bwd")}
        for i in range(warmup + repeats):
            for case in CASES:
                for pass_name, fn in (("fwd", forward_only[case]), ("fwd_bwd", fwd_bwd[case])):
                    start = time.perf_counter()
                    fn()
                    elapsed = time.perf_counter() - start
                    if i >= warmup:
                        times[f"{case}/{pass_name}"].append(elapsed * 1e3)
        results.append({"shape": shape, "median_ms": {k: statistics.median(v) for k, v in times.items()}})
    return {"op": status.origin, "results": results}


def _run_worker(mode: str, args: argparse.Namespace) -> Dict:
    env = dict(os.environ)
    env.setdefault("MKL_DEBUG_CPU_TYPE", "5")
    env["OMP_NUM_THREADS"] = str(args.threads)
    env.update(MALLOC_ENV[mode])
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--repeats", str(args.repeats),
           "--warmup", str(args.warmup), "--shapes", json.dumps([list(s) for s in SHAPES])]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark worker ({mode}) failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _report(mode: str, data: Dict) -> List[Dict]:
    rows = []
    _logger.info("\nallocator=%s  threads=%s  (median ms; ratio = paddle / fused, >1 means fused is faster)",
                 mode, os.environ.get("OMP_NUM_THREADS", "?"))
    _logger.info("%-13s %-8s %10s %10s %7s   %12s %12s %7s", "shape", "pass", "paddle_ln", "fused_ln", "ratio",
                 "paddle_add_ln", "fused_add_ln", "ratio")
    for res in data["results"]:
        m = res["median_ms"]
        for pass_name in ("fwd", "fwd_bwd"):
            ln_ratio = m[f"paddle_ln/{pass_name}"] / m[f"fused_ln/{pass_name}"]
            add_ratio = m[f"paddle_add_ln/{pass_name}"] / m[f"fused_add_ln/{pass_name}"]
            _logger.info("%-13s %-8s %10.2f %10.2f %6.2fx   %12.2f %12.2f %6.2fx", "x".join(map(str, res["shape"])),
                         pass_name, m[f"paddle_ln/{pass_name}"], m[f"fused_ln/{pass_name}"], ln_ratio,
                         m[f"paddle_add_ln/{pass_name}"], m[f"fused_add_ln/{pass_name}"], add_ratio)
            rows.append({"allocator": mode, "shape": res["shape"], "pass": pass_name,
                         "ln_speedup": round(ln_ratio, 3), "add_ln_speedup": round(add_ratio, 3),
                         **{k.split("/")[0] + "_ms": round(v, 3) for k, v in m.items() if k.endswith("/" + pass_name)}})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS for the workers")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--allocator", choices=("default", "retain", "both"), default="both")
    parser.add_argument("--json", type=Path, help="also write all medians and ratios to this file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--shapes", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        # The worker's only stdout line is its JSON result.
        sys.stdout.write(json.dumps(_worker(json.loads(args.shapes), args.repeats, args.warmup)) + "\n")
        return

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    modes = ("default", "retain") if args.allocator == "both" else (args.allocator,)
    rows = []
    for mode in modes:
        rows += _report(mode, _run_worker(mode, args))
    summary = {
        "threads": args.threads,
        "repeats": args.repeats,
        "mkl_debug_cpu_type": os.environ.get("MKL_DEBUG_CPU_TYPE", "5"),
        "target": "fused add+LN fwd_bwd >= 1.5x paddle's add + layer_norm",
        "rows": rows,
    }
    worst = min(r["add_ln_speedup"] for r in rows if r["pass"] == "fwd_bwd")
    _logger.info("\nfused add+LN forward+backward speedup over paddle add + layer_norm: worst %.2fx (target 1.5x)",
                 worst)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    _logger.info("JSON: %s", json.dumps(summary))


if __name__ == "__main__":
    main()
