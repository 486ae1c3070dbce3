"""paddlemix's CPU benchmark suite: one command, one table, side by side with open_clip on torch.

    python benchmarks/run_all.py --quick                                    # a few minutes
    python benchmarks/run_all.py --peer-python /path/to/torch-venv/bin/python --json results.json

Rows: encode_image and encode_text of ViT-B-32 and EVA02-CLIP-B-16 (random weights), in
dynamic mode and exported (paddle.jit.save + Paddle Inference); a ViT-B-32 training step
(forward + CLIP loss + backward + AdamW) at batch 16; ViT-B-32 encode_image / encode_text as a
user's own program runs them (no environment variable set, the README's ``import paddlemix`` then
``import paddle``, against
open_clip run the same way); the data pipeline (JPEG decode + eval
transform, DataLoader workers); zero-shot evaluation end to end against the model alone; the
tokenizer on generated captions; the fused LayerNorm operator (residual add + LN, forward +
backward); one fp32 GEMM of ViT-B-32's MLP shape, the ceiling the model rows are bound by. Model rows also give the achieved GFLOP/s and its share of the machine's fp32 peak
(``--peak-gflops``, 157 for 2 AMD EPYC cores: 2 cores x 2 FMA units x 8 lanes x 2 x 2.45 GHz).

How each row is measured: every framework lives in its own worker process, started afresh for
each row (``_worker_paddle.py``, ``_worker_peer.py``, see ``_protocol.py``); after ``--warmup`` untimed
runs per side, the coordinator alternates one timed run of each side (ABBA order) for
``--repeats`` rounds, pausing ``--settle`` seconds between runs so OpenMP threads spinning after
one side's run do not steal the next side's CPU. Each side's number is its median; the ratio
is paddlemix / peer throughput (higher is better for paddlemix). Alternation matters on a
shared machine: both sides see the same load, so the ratio is meaningful even when absolute
numbers are not; the load average before and after each row is in the JSON.

The peer is open_clip (any version; 3.3.0 was used) on torch, run by ``--peer-python``
(default: ``$PADDLEMIX_BENCH_PEER_PYTHON``, else this interpreter if it can import both).
Without a peer, every row still runs and the peer columns say "absent". The paddlemix worker
applies paddlemix._env (MKL_DEBUG_CPU_TYPE on AMD, OMP_NUM_THREADS, freed-memory reuse) as the
example scripts do; the peer gets the same OMP_NUM_THREADS / MKL_DEBUG_CPU_TYPE and otherwise
runs as installed. Exported rows compare Paddle Inference with open_clip in eager mode.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# The environment helper alone: importing it through the package would import Paddle here.
_spec = importlib.util.spec_from_file_location("paddlemix_env", ROOT / "paddlemix" / "_env.py")
cpu_env = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cpu_env)

logger = logging.getLogger("run_all")

PEAK_GFLOPS = 157.0
USER_UNSET = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "MKL_DEBUG_CPU_TYPE", "GOMP_SPINCOUNT", "MALLOC_MMAP_THRESHOLD_",
              "MALLOC_TRIM_THRESHOLD_")
PEER_MODELS = {"ViT-B-32": "ViT-B-32", "EVA02-CLIP-B-16": "EVA02-B-16"}


# ----------------------------------------------------------------------------------------- FLOPs

def _tower_flops(tokens: int, width: int, layers: int, hidden: int, swiglu: bool) -> float:
    """Multiply-adds x 2 of ``layers`` pre-norm blocks over ``tokens`` tokens (matmuls only)."""
    attn = 2 * tokens * width * 3 * width + 2 * tokens * width * width + 4 * tokens * tokens * width
    mlp = 2 * tokens * width * (2 * hidden if swiglu else hidden) + 2 * tokens * hidden * width
    return float(layers * (attn + mlp))


def model_flops(model: str) -> Dict[str, float]:
    """Forward FLOPs per image and per 77-token text of a registered model (paddlemix/model_configs/; matmuls only)."""
    cfg = json.loads((ROOT / "paddlemix" / "model_configs" / f"{model}.json").read_text())
    v, t, embed = cfg["vision_cfg"], cfg["text_cfg"], cfg["embed_dim"]
    patch, width = v["patch_size"], v["width"]
    grid = v["image_size"] // patch
    tokens = grid * grid + 1
    image = _tower_flops(tokens, width, v["layers"], int(width * v.get("mlp_ratio", 4.0)), v.get("naiveswiglu", False))
    image += 2 * (tokens - 1) * 3 * patch * patch * width + 2 * width * embed
    tw = t["width"]
    text = _tower_flops(t["context_length"], tw, t["layers"], int(tw * t.get("mlp_ratio", 4.0)), False)
    text += 2 * tw * embed
    return {"image": image, "text": text}


# --------------------------------------------------------------------------------------- workers

class WorkerError(RuntimeError):
    pass


class Worker:
    """A benchmark worker process and its request/reply pipe."""

    def __init__(self, name: str, argv: List[str], env: Dict[str, str], log_dir: Path):
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "a")
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
                                     env=env, text=True, bufsize=1, cwd=str(ROOT))

    def request(self, message: Dict[str, Any]) -> Dict[str, Any]:
        if self.proc.poll() is not None:
            raise WorkerError(f"{self.name} worker exited ({self.proc.returncode}); see {self.log_path}")
        self.proc.stdin.write(json.dumps(message) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise WorkerError(f"{self.name} worker died; see {self.log_path}")
        reply = json.loads(line)
        if not reply.get("ok"):
            raise WorkerError(f"{self.name}: {reply.get('error')} (log: {self.log_path})")
        return reply

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "exit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
        self._log.close()


def _peer_python(arg: Optional[str]) -> Tuple[Optional[str], str]:
    """The peer interpreter and why (or why there is none)."""
    candidate = arg or os.environ.get("PADDLEMIX_BENCH_PEER_PYTHON")
    source = "--peer-python" if arg else "$PADDLEMIX_BENCH_PEER_PYTHON"
    if not candidate:
        candidate, source = sys.executable, "this interpreter"
    # open_clip itself is imported by the worker, which works around a mismatched torchvision.
    try:
        probe = subprocess.run([candidate, "-c", "import importlib.util as u, torch; assert u.find_spec('open_clip')"],
                               capture_output=True, text=True)
    except OSError as exc:
        return None, f"peer absent: {candidate} ({source}) cannot run: {exc}"
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["?"])[-1]
        return None, f"peer absent: {candidate} ({source}) lacks torch or open_clip: {last}"
    return candidate, f"{candidate} ({source})"


# ------------------------------------------------------------------------------------------ rows

@dataclass
class Side:
    worker: str  # "paddle", "paddle_b" (a second paddlemix worker) or "peer"
    case: Dict[str, Any]


@dataclass
class Row:
    name: str
    unit: str
    items: int  # work items per timed run (images, texts, captions, steps x batch ...)
    a: Side  # paddlemix
    b: Optional[Side]  # the reference, or None
    reference: str = "open_clip"
    target: Optional[float] = None
    flops_per_item: Optional[float] = None
    result: Dict[str, Any] = field(default_factory=dict)


def build_rows(args: argparse.Namespace, image_dir: Path) -> List[Row]:
    quick = args.quick
    batch = args.batch
    rows: List[Row] = []
    for model in args.models:
        flops = model_flops(model)
        eva = model.startswith("EVA")
        image_batch = (4 if quick else 8) if eva else batch
        text_batch = 8 if quick and eva else batch
        for mode, target in (("dynamic", 1.0), ("exported", 1.3)):
            if mode == "exported" and args.no_export:
                continue
            for kind, tower, n in (("encode_image", "image", image_batch), ("encode_text", "text", text_batch)):
                case = {"kind": kind, "model": model, "peer_model": PEER_MODELS.get(model, model), "mode": mode,
                        "batch": n, "seed": 0}
                rows.append(Row(f"{kind} {model} {mode} (batch {n})", "img/s" if tower == "image" else "texts/s",
                                n, Side("paddle", case), Side("peer", case), target=target,
                                flops_per_item=flops[tower]))
    # A user's program: no variable set, the README's imports, open_clip as installed. The README's
    # Use code runs the model inside paddlemix.inference_mode (open_clip: torch.inference_mode);
    # the plain paddle.no_grad() program (open_clip: torch.no_grad) is measured beside it.
    model = args.models[0]
    flops = model_flops(model)
    for mode, label, target in (("inference_mode", "", 1.0), ("dynamic", ", paddle.no_grad() only", None)):
        for kind, tower in (("encode_image", "image"), ("encode_text", "text")):
            case = {"kind": kind, "model": model, "peer_model": PEER_MODELS.get(model, model), "mode": mode,
                    "batch": batch, "seed": 0}
            rows.append(Row(f"user program, no environment set{label}: {kind} {model} (batch {batch})",
                            "img/s" if tower == "image" else "texts/s", batch, Side("paddle_user", case),
                            Side("peer_user", case), target=target, flops_per_item=flops[tower]))
    m, k, n = 800, 768, 3072
    case = {"kind": "matmul", "shape": [m, k, n]}
    rows.append(Row(f"fp32 matmul {m}x{k} @ {k}x{n} (the GEMM ceiling)", "matmuls/s", 1, Side("paddle", case),
                    Side("peer", case), reference="torch", flops_per_item=2.0 * m * k * n))
    train_model = args.models[0]
    flops = model_flops(train_model)
    case = {"kind": "train_step", "model": train_model, "peer_model": PEER_MODELS.get(train_model, train_model),
            "batch": batch, "seed": 0}
    rows.append(Row(f"train step {train_model} (batch {batch}, AdamW)", "samples/s", batch, Side("paddle", case),
                    Side("peer", case), target=1.0, flops_per_item=3 * (flops["image"] + flops["text"])))
    n_images = len(list(image_dir.glob("*/*.jpg")))
    case = {"kind": "data_pipeline", "image_dir": str(image_dir), "size": 224, "batch": 16, "workers": args.workers}
    rows.append(Row(f"data pipeline: JPEG decode + eval transform ({args.workers} workers)", "img/s", n_images,
                    Side("paddle", case), Side("peer", case)))
    zs = {"kind": "zero_shot", "model": train_model, "image_dir": str(image_dir), "batch": 16, "workers": args.workers}
    rows.append(Row(f"zero-shot eval end to end vs model only ({train_model})", "img/s", n_images,
                    Side("paddle", dict(zs, variant="e2e")), Side("paddle_b", dict(zs, variant="model")),
                    reference="paddlemix model only", target=0.8))
    case = {"kind": "tokenizer", "captions": args.captions, "seed": 0}
    rows.append(Row(f"tokenizer, {args.captions} captions, cold cache", "captions/s", args.captions,
                    Side("paddle", case), Side("peer", case), target=2.0))
    shape = [8192, 768]
    ln = {"kind": "layer_norm", "shape": shape}
    rows.append(Row(f"residual add + LayerNorm fwd+bwd {shape[0]}x{shape[1]}: fused_ln", "calls/s", 1,
                    Side("paddle", dict(ln, variant="fused")), Side("peer", ln), reference="torch add + layer_norm"))
    rows.append(Row(f"residual add + LayerNorm fwd+bwd {shape[0]}x{shape[1]}: fused_ln vs paddle", "calls/s", 1,
                    Side("paddle", dict(ln, variant="fused")), Side("paddle_b", dict(ln, variant="paddle")),
                    reference="paddle add + F.layer_norm"))
    return rows


def make_images(root: Path, count: int, classes: int = 4, seed: int = 0) -> Path:
    """``count`` 500x375 JPEGs (smooth gradients plus noise, quality 90) in ``classes`` folders."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:375, 0:500].astype(np.float32)
    for i in range(count):
        folder = root / f"class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        base = np.stack([xx / 500 * rng.uniform(100, 255), yy / 375 * rng.uniform(100, 255),
                         (xx + yy) / 875 * rng.uniform(100, 255)], axis=-1)
        pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:04d}.jpg", quality=90)
    return root


# ------------------------------------------------------------------------------------ measuring

class Suite:
    def __init__(self, args: argparse.Namespace, log_dir: Path):
        self.args = args
        self.log_dir = log_dir
        self.workers: Dict[str, Worker] = {}
        # Both sides get the thread count and MKL's AVX2 path; the paddlemix worker applies the
        # rest of paddlemix._env itself (GOMP_SPINCOUNT, freed-memory reuse), the peer runs as installed.
        recommended = cpu_env.recommended_env()
        env = dict(os.environ)
        if "MKL_DEBUG_CPU_TYPE" in recommended:
            env.setdefault("MKL_DEBUG_CPU_TYPE", recommended["MKL_DEBUG_CPU_TYPE"])
        env["OMP_NUM_THREADS"] = str(args.threads or env.get("OMP_NUM_THREADS") or recommended["OMP_NUM_THREADS"])
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
        self.env = env
        # The user-program rows: none of the variables above (nor the ones _env.py documents).
        self.user_env = {k: v for k, v in env.items() if k not in USER_UNSET}
        self.peer_python, self.peer_note = _peer_python(args.peer_python)

    def worker(self, name: str) -> Worker:
        if name not in self.workers:
            user = name.endswith("_user")
            if name.startswith("peer"):
                if self.peer_python is None:
                    raise WorkerError(self.peer_note)
                argv = [self.peer_python, str(HERE / "_worker_peer.py")]
            else:
                argv = [sys.executable, str(HERE / "_worker_paddle.py")] + (["--user-program"] if user else [])
            self.workers[name] = Worker(name, argv, self.user_env if user else self.env, self.log_dir)
        return self.workers[name]

    def close(self) -> None:
        for w in self.workers.values():
            w.close()
        self.workers.clear()

    def measure(self, row: Row) -> None:
        args = self.args
        load_before = os.getloadavg()
        sides = [("a", row.a)] + ([("b", row.b)] if row.b is not None else [])
        active, notes = [], {}
        extra: Dict[str, Any] = {}
        for key, side in sides:
            case = dict(side.case)
            if case["kind"] == "tokenizer" and side.worker == "peer":
                case["captions_list"] = extra.get("captions", [])
            try:
                info = self.worker(side.worker).request({"op": "setup", "case": case})["info"]
            except WorkerError as exc:
                notes[key] = str(exc)
                continue
            if "captions" in info:
                extra["captions"] = info.pop("captions")
            notes[key] = info
            active.append((key, side))
        times: Dict[str, List[float]] = {key: [] for key, _ in active}
        errors: Dict[str, str] = {}
        for i in range(args.warmup + args.repeats):
            order = active if i % 2 == 0 else active[::-1]
            for key, side in order:
                if key in errors:
                    continue
                try:
                    seconds = self.worker(side.worker).request({"op": "run"})["seconds"]
                except WorkerError as exc:
                    errors[key] = str(exc)
                    continue
                if i >= args.warmup:
                    times[key].append(seconds)
                if len(active) > 1:
                    time.sleep(args.settle)
        result: Dict[str, Any] = {"load_before": load_before, "load_after": os.getloadavg(), "info": notes,
                                  "seconds": times, "errors": errors}
        for key, _ in sides:
            t = times.get(key)
            if t and key not in errors:
                median = statistics.median(t)
                result[f"{key}_median_s"] = median
                result[f"{key}_rate"] = row.items / median
        if "a_rate" in result and "b_rate" in result:
            result["ratio"] = result["a_rate"] / result["b_rate"]
        if row.flops_per_item and "a_rate" in result:
            result["a_gflops"] = result["a_rate"] * row.flops_per_item / 1e9
            if "b_rate" in result:
                result["b_gflops"] = result["b_rate"] * row.flops_per_item / 1e9
        row.result = result


def _fmt(value: Optional[float], digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def render(rows: List[Row], peak: float) -> str:
    header = ("benchmark", "unit", "paddlemix", "reference", "ref", "ratio", "target", "GFLOP/s", "% peak")
    lines = []
    for row in rows:
        r = row.result
        b = r.get("b_rate")
        if row.b is not None and b is None:
            reason = r.get("errors", {}).get("b") or r.get("info", {}).get("b", "")
            b_text = "absent" if isinstance(reason, str) and "absent" in reason else "error"
        else:
            b_text = _fmt(b)
        gflops = r.get("a_gflops")
        ratio = r.get("ratio")
        verdict = "" if ratio is None or row.target is None else (" ok" if ratio >= row.target else " MISS")
        lines.append((row.name, row.unit, _fmt(r.get("a_rate")) if "a_rate" in r else "error", row.reference, b_text,
                      (_fmt(ratio) + "x" + verdict) if ratio is not None else "-",
                      f">={row.target}x" if row.target else "", _fmt(gflops, 1),
                      _fmt(None if gflops is None else 100 * gflops / peak, 0)))
    widths = [max(len(str(x[i])) for x in lines + [header]) for i in range(len(header))]
    fmt = "  ".join(f"{{:{'<' if i in (0, 1, 3) else '>'}{w}}}" for i, w in enumerate(widths))
    out = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*line) for line in lines]
    return "\n".join(out)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repeats, smaller EVA batches, fewer captions")
    parser.add_argument("--peer-python", default=None, help="Python with torch and open_clip (the peer)")
    parser.add_argument("--json", type=Path, default=Path("benchmark_results.json"), help="where to write results")
    parser.add_argument("--models", nargs="+", default=["ViT-B-32", "EVA02-CLIP-B-16"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per side (default 3 quick, 7 full)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--settle", type=float, default=0.3, help="seconds of pause between timed runs")
    parser.add_argument("--threads", type=int, default=None, help="OMP threads for both sides (default: all CPUs)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers for the data rows")
    parser.add_argument("--captions", type=int, default=None, help="captions for the tokenizer (2000 quick, 10000)")
    parser.add_argument("--images", type=int, default=None, help="JPEGs for the data rows (64 quick, 256)")
    parser.add_argument("--no-export", action="store_true", help="skip the exported (Paddle Inference) rows")
    parser.add_argument("--only", nargs="+", default=None, help="run only rows whose name contains one of these")
    parser.add_argument("--peak-gflops", type=float, default=PEAK_GFLOPS)
    args = parser.parse_args(argv)
    args.repeats = args.repeats or (3 if args.quick else 7)
    args.captions = args.captions or (2000 if args.quick else 10000)
    args.images = args.images or (64 if args.quick else 256)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    started = time.time()
    with tempfile.TemporaryDirectory(prefix="paddlemix-bench-") as tmp:
        tmp_path = Path(tmp)
        log_dir = Path(tempfile.mkdtemp(prefix="paddlemix-bench-logs-"))
        image_dir = make_images(tmp_path / "images", args.images)
        rows = build_rows(args, image_dir)
        if args.only:
            rows = [r for r in rows if any(s in r.name for s in args.only)]
        suite = Suite(args, log_dir)
        logger.info("peer: %s", suite.peer_note)
        logger.info("threads %s, MKL_DEBUG_CPU_TYPE=%s, repeats %d (+%d warm-up), load average %s; worker logs in %s",
                    suite.env["OMP_NUM_THREADS"], suite.env.get("MKL_DEBUG_CPU_TYPE", "unset"), args.repeats,
                    args.warmup, "/".join(f"{x:.1f}" for x in os.getloadavg()), log_dir)
        try:
            for row in rows:
                t0 = time.time()
                try:
                    suite.measure(row)
                finally:
                    suite.close()  # fresh processes per row: no state (threads, heap) carries over
                r = row.result
                logger.info("  %-70s %s  (%.0f s, load %.1f)", row.name,
                            f"{_fmt(r.get('a_rate'))} vs {_fmt(r.get('b_rate'))} {row.unit}", time.time() - t0,
                            r["load_after"][0])
                for key, err in r["errors"].items():
                    logger.info("    %s side failed: %s", key, err)
        finally:
            suite.close()
    table = render(rows, args.peak_gflops)
    logger.info("\n%s\n", table)
    logger.info("ratio = paddlemix / reference throughput; GFLOP/s (matmul FLOPs) of paddlemix against a %.0f GFLOP/s "
                "peak; load average now %s; %.0f s in all", args.peak_gflops,
                "/".join(f"{x:.1f}" for x in os.getloadavg()), time.time() - started)
    summary = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "peak_gflops": args.peak_gflops},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "environment": {k: suite.env.get(k) for k in ("OMP_NUM_THREADS", "MKL_DEBUG_CPU_TYPE")},
        "peer": suite.peer_note,
        "rows": [{"name": r.name, "unit": r.unit, "items_per_run": r.items, "reference": r.reference,
                  "target": r.target, "flops_per_item": r.flops_per_item, **r.result} for r in rows],
        "table": table,
    }
    args.json.write_text(json.dumps(summary, indent=2))
    logger.info("results: %s", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
