"""Checkpoint loading: peak host memory and time, paddlemix side by side with open_clip.

    python benchmarks/bench_load.py --peer-python /path/to/torch-venv/bin/python \
        --workdir /tmp/load_bench --json benchmarks/results_load_cpu_2core.json [--bigg]

Rows (the same file for both libraries, loaded by ``create_model(name, pretrained=file,
precision=...)`` in a fresh process each time):

* ViT-L-14 fp16 state dict saved by open_clip with ``torch.save`` (a torch zip ``.bin``),
  loaded into an fp32 and an fp16 model;
* the same state dict as ``.safetensors``, fp32, fp16 and bf16;
* ``--bigg``: ViT-bigG-14 (2.54 B parameters, 5.1 GB in fp16) as three safetensors shards
  behind a ``model.safetensors.index.json``, random values written with numpy, loaded in
  fp16 (open_clip cannot load a sharded checkpoint, so paddlemix only).

Peak RSS is the child process's ``ru_maxrss`` over its whole life (imports included), taken
with ``os.wait4``; time is the wall time of the ``create_model`` call alone, with its CPU time
(``process_time``) next to it: on a shared machine the wall time also counts waiting for a core. The framework
baseline is a child that imports the library and runs one op. The target the issue sets:
peak <= baseline + 1.2 x the model's bytes in the target precision, below open_clip's, and a
load time no longer than open_clip's.

The ViT-L-14 files are made once by the peer's open_clip (random init, ``.half()``); they and
the bigG shards live in ``--workdir`` and are deleted at the end unless ``--keep``. Each row
runs ``--repeats`` times per library, alternating, after the file was read once into the page
cache; the JSON keeps every run, the table the median time and the largest peak.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
logger = logging.getLogger("bench.load")

# The peer side imports open_clip through _worker_peer, which works around a torchvision
# built for another torch (its transforms are pure Python; see that module).
_PEER_PRELUDE = f"""
import sys
sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
import _worker_peer
import torch, open_clip
"""

_MAKE_VITL = _PEER_PRELUDE + """
from safetensors.torch import save_file
torch.manual_seed(0)
model = open_clip.create_model("ViT-L-14").half()
state = {k: v.contiguous() for k, v in model.state_dict().items()}
torch.save(state, sys.argv[1])
save_file(state, sys.argv[2])
"""

# Names and shapes of an open_clip model without allocating it (torch's meta device).
_SHAPES = _PEER_PRELUDE + """
import json
with torch.device("meta"):
    model = open_clip.create_model(sys.argv[1], pretrained=None, device="meta")
print(json.dumps({k: list(v.shape) for k, v in model.state_dict().items()}))
"""

_PEER_LOAD = _PEER_PRELUDE + """
import json, time
start, cpu = time.perf_counter(), time.process_time()
model = open_clip.create_model(sys.argv[1], pretrained=sys.argv[2], precision=sys.argv[3])
seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
nbytes = sum(p.numel() * p.element_size() for p in model.state_dict().values())
print(json.dumps({"seconds": seconds, "cpu_seconds": cpu_seconds, "model_bytes": nbytes}))
"""

_PEER_BASELINE = _PEER_PRELUDE + """
(torch.ones(4) * 2).sum().item()
"""

_PADDLE_LOAD = """
import json, sys, time
import paddle, paddlemix
start, cpu = time.perf_counter(), time.process_time()
model = paddlemix.create_model(sys.argv[1], pretrained=sys.argv[2], precision=sys.argv[3])
seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
nbytes = sum(p.numel().item() * p.element_size() for p in model.state_dict().values())
print(json.dumps({"seconds": seconds, "cpu_seconds": cpu_seconds, "model_bytes": nbytes}))
"""

_PADDLE_BASELINE = """
import paddle, paddlemix
(paddle.ones([4]) * 2).sum().item()
"""


def _run_child(python: str, code: str, args: List[str], env: Dict[str, str]) -> Dict[str, Any]:
    """Run ``code`` in a fresh interpreter; its JSON reply plus its own peak RSS (bytes)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen([python, "-c", code, *args], stdout=out, stderr=err, env=env, cwd=str(ROOT))
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    if proc.returncode != 0:
        raise RuntimeError(f"child {python} {args} failed ({proc.returncode}):\n{stderr[-3000:]}")
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    reply = json.loads(lines[-1]) if lines else {}
    reply["peak_rss"] = usage.ru_maxrss * 1024  # Linux: KiB
    return reply


def _warm_page_cache(paths: List[Path]) -> None:
    for path in paths:
        with open(path, "rb") as f:
            while f.read(64 << 20):
                pass


def _make_vitl(peer: str, workdir: Path, env: Dict[str, str]) -> Dict[str, Path]:
    files = {"bin": workdir / "vit_l_14_fp16.bin", "safetensors": workdir / "vit_l_14_fp16.safetensors"}
    if not all(p.is_file() for p in files.values()):
        logger.info("writing ViT-L-14 fp16 checkpoints with open_clip into %s", workdir)
        subprocess.run([peer, "-c", _MAKE_VITL, str(files["bin"]), str(files["safetensors"])], check=True, env=env)
    return files


def _make_bigg(peer: Optional[str], workdir: Path, env: Dict[str, str], shards: int = 3) -> Path:
    """ViT-bigG-14 in open_clip's names and shapes, fp16 random values, ``shards`` safetensors files."""
    import numpy as np

    sys.path.insert(0, str(ROOT))
    from paddlemix.zoo.checkpoint import save_safetensors

    directory = workdir / "vit_bigg_14_fp16"
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        return index
    if peer is None:
        raise SystemExit("--bigg needs --peer-python to list ViT-bigG-14's open_clip tensor names and shapes")
    shapes = json.loads(subprocess.run([peer, "-c", _SHAPES, "ViT-bigG-14"], check=True, env=env,
                                       capture_output=True, text=True).stdout.strip().splitlines()[-1])
    directory.mkdir(parents=True, exist_ok=True)
    total = sum(int(np.prod(s)) * 2 for s in shapes.values())
    rng = np.random.default_rng(0)
    groups: List[List[str]] = [[] for _ in range(shards)]
    done = 0
    for name, shape in shapes.items():  # in order, each tensor to the shard its first byte falls in
        groups[min(shards - 1, done * shards // total)].append(name)
        done += int(np.prod(shape)) * 2
    weight_map = {}
    for i, names in enumerate(groups):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name in names:
            values = rng.standard_normal(int(np.prod(shapes[name])), dtype=np.float32) * 0.02
            tensors[name] = values.astype(np.float16).reshape(shapes[name])
            del values
            weight_map[name] = file
        save_safetensors(tensors, directory / file)
        del tensors
        logger.info("wrote %s (%d tensors)", file, len(names))
    index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return index


def _row(name: str, model: str, weights: Path, precision: str, peer: Optional[str], repeats: int,
         env: Dict[str, str], peer_env: Dict[str, str], files: List[Path]) -> Dict[str, Any]:
    _warm_page_cache(files)
    runs: Dict[str, List[Dict[str, Any]]] = {"paddlemix": [], "open_clip": []}
    for i in range(repeats):
        order = ["paddlemix", "open_clip"] if i % 2 == 0 else ["open_clip", "paddlemix"]
        for side in order:
            if side == "paddlemix":
                runs[side].append(_run_child(sys.executable, _PADDLE_LOAD, [model, str(weights), precision], env))
            elif peer is not None:
                runs[side].append(_run_child(peer, _PEER_LOAD, [model, str(weights), precision], peer_env))
            logger.info("%s %s: %s", name, side, runs[side][-1] if runs[side] else "skipped")
    row: Dict[str, Any] = {"name": name, "model": model, "file": weights.name, "precision": precision, "runs": runs}
    for side, side_runs in runs.items():
        if side_runs:
            row[side] = {
                "seconds": statistics.median(r["seconds"] for r in side_runs),
                "cpu_seconds": statistics.median(r["cpu_seconds"] for r in side_runs),
                "peak_rss": max(r["peak_rss"] for r in side_runs),
                "model_bytes": side_runs[0]["model_bytes"],
            }
    return row


def _gb(n: Optional[float]) -> str:
    return "-" if n is None else f"{n / 1e9:.2f} GB"


def _table(result: Dict[str, Any]) -> str:
    base = result["baseline"]
    lines = [
        "| load | model bytes | paddlemix peak RSS | open_clip peak RSS | paddlemix time (CPU) "
        "| open_clip time (CPU) | target peak (baseline + 1.2x model) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        ours, peer = row["paddlemix"], row.get("open_clip")
        target = base["paddlemix"] + 1.2 * ours["model_bytes"]
        fmt = "sharded safetensors" if row["file"].endswith(".index.json") else row["file"].rsplit(".", 1)[-1]
        peer_peak = _gb(peer["peak_rss"]) if peer else "cannot load"
        peer_time = f"{peer['seconds']:.1f} s ({peer['cpu_seconds']:.1f} s)" if peer else "-"
        our_time = f"{ours['seconds']:.1f} s ({ours['cpu_seconds']:.1f} s)"
        lines.append(
            f"| {row['model']} fp16 {fmt} -> {row['precision']} | {_gb(ours['model_bytes'])} | "
            f"{_gb(ours['peak_rss'])} | {peer_peak} | {our_time} | {peer_time} | {_gb(target)} |"
        )
    lines.append(
        f"| framework baseline (import + one op) | - | {_gb(base['paddlemix'])} | {_gb(base.get('open_clip'))} | - | - | - |"
    )
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peer-python", default=os.environ.get("PADDLEMIX_BENCH_PEER_PYTHON"))
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "paddlemix_load_bench")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--bigg", action="store_true", help="also the 5.1 GB sharded ViT-bigG-14 row (needs ~8 GB RAM)")
    parser.add_argument("--only", nargs="*", help="row names to run (default: all)")
    parser.add_argument("--keep", action="store_true", help="keep the generated checkpoints in --workdir")
    parser.add_argument("--update", action="store_true",
                        help="keep the rows of an existing --json that this run does not redo")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(ROOT)  # the checkout's paddlemix in the paddlemix children
    peer_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    args.workdir.mkdir(parents=True, exist_ok=True)
    result: Dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "peer": args.peer_python or "absent",
        "baseline": {"paddlemix": _run_child(sys.executable, _PADDLE_BASELINE, [], env)["peak_rss"]},
        "rows": [],
    }
    if args.peer_python:
        result["baseline"]["open_clip"] = _run_child(args.peer_python, _PEER_BASELINE, [], peer_env)["peak_rss"]
    try:
        cases = []
        if args.peer_python:
            vitl = _make_vitl(args.peer_python, args.workdir, peer_env)
            for fmt in ("bin", "safetensors"):
                for precision in ("fp32", "fp16", "bf16") if fmt == "safetensors" else ("fp32", "fp16"):
                    cases.append((f"vit_l_14_{fmt}_{precision}", "ViT-L-14", vitl[fmt], precision, [vitl[fmt]]))
        else:
            logger.warning("no --peer-python: the ViT-L-14 files are made by open_clip, skipping those rows")
        if args.bigg:
            index = _make_bigg(args.peer_python, args.workdir, peer_env)
            shards = sorted(index.parent.glob("*.safetensors"))
            cases.append(("vit_bigg_14_sharded_fp16", "ViT-bigG-14", index, "fp16", shards))
        for name, model, weights, precision, files in cases:
            if args.only and name not in args.only:
                continue
            # open_clip reads neither an index of shards nor a directory of them.
            peer = args.peer_python if not weights.name.endswith(".index.json") else None
            result["rows"].append(_row(name, model, weights, precision, peer, args.repeats, env, peer_env, files))
    finally:
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)
    if args.update and args.json and args.json.is_file():
        redone = {row["name"] for row in result["rows"]}
        previous = json.loads(args.json.read_text())
        result["rows"] = [row for row in previous["rows"] if row["name"] not in redone] + result["rows"]
    result["table"] = _table(result)
    print(result["table"])
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
