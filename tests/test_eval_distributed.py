"""Real multi-process evaluation: ``paddle.distributed.launch --nproc_per_node 2`` on CPU (gloo) gives
the same results.jsonl as one process. Slow (two Paddle start-ups plus the launcher): ``-m slow``.
The in-process simulation of the split runs in the default suite (test_eval_zero_shot / _retrieval)."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from paddlemix.eval.runner import main as eval_main

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
_spec = importlib.util.spec_from_file_location("eval_synthetic", FIXTURES / "eval" / "synthetic.py")
synthetic = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(synthetic)


@pytest.mark.slow
def test_two_process_launch_matches_single_process(tmp_path):
    _, model_dir = synthetic.tiny_clip(tmp_path, seed=99)
    evalset = tmp_path / "evalset"
    synthetic.write_image_folder(evalset, [("red", "circle"), ("blue", "square"), ("green", "triangle"),
                                           ("red", "square"), ("blue", "circle")], per_class=3)
    karpathy = synthetic.write_retrieval_json(tmp_path / "coco", n_images=7)
    sts_file = synthetic.write_sts_tsv(tmp_path / "sts.tsv", header=False)
    common = ["--model", str(model_dir), "--classification_eval", str(evalset), "--retrieval_eval",
              str(karpathy), "--sts_eval", str(sts_file), "--per_device_eval_batch_size", "4",
              "--dataloader_num_workers", "0", "--disable_tqdm"]

    assert eval_main(common + ["--output_dir", str(tmp_path / "single")]) == 0
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir",
           str(tmp_path / "logs"), str(ROOT / "examples" / "clip" / "run_zero_shot_eval.py")]
    res = subprocess.run(cmd + common + ["--output_dir", str(tmp_path / "dist")], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=400)
    logs = "".join(p.read_text(errors="replace")[-3000:] for p in sorted((tmp_path / "logs").glob("workerlog.*")))
    assert res.returncode == 0, res.stderr[-3000:] + logs
    single = [json.loads(line) for line in (tmp_path / "single" / "results.jsonl").read_text().splitlines()]
    dist = [json.loads(line) for line in (tmp_path / "dist" / "results.jsonl").read_text().splitlines()]
    assert [r["task"] for r in dist] == ["zeroshot_classification", "zeroshot_retrieval", "sts"]
    for a, b in zip(single, dist):
        assert _flat(a["metrics"]) == pytest.approx(_flat(b["metrics"]), abs=1e-6), (a, b)
    assert dist[0]["metrics"]["num_samples"] == 15  # both ranks' shares, gathered
    assert dist[2]["metrics"]["sts"]["num_pairs"] == 8
    assert "rank 0 of 2 evaluates 8 of 15 images" in (tmp_path / "logs" / "workerlog.0").read_text(errors="replace")


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}/") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out
