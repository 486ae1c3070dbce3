"""End-to-end training runs of examples/clip/run_pretrain_dist.py on the demo data (CPU).

Covers: single-process training with falling loss, exact resumption from a checkpoint,
2-process data parallel and sharding stage1 with disjoint samples per rank.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "fixtures" / "train" / "tiny_clip.json"
RECORD = ROOT / "tests" / "dist_scripts" / "pretrain_record.py"


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    from paddlemix.data.demo import make_demo_dataset

    root = tmp_path_factory.mktemp("demo")
    make_demo_dataset(root, num_train=512, num_eval_per_class=4, image_size=32)
    return root


def _flags(demo_root, out, max_steps, extra=()):
    return [
        "--model", str(TINY), "--task_name", "demo", "--data_root", str(demo_root), "--output_dir", str(out),
        "--max_steps", str(max_steps), "--per_device_train_batch_size", "16", "--learning_rate", "5e-4",
        "--warmup_steps", "2", "--logging_steps", "1", "--save_strategy", "steps", "--save_steps", "6",
        "--dataloader_num_workers", "0", "--seed", "7", "--disable_tqdm", "true", "--report_to", "none",
        "--overwrite_output_dir", "true", "--do_train", "true", *extra,
    ]


def _env(record_dir=None):
    env = dict(os.environ, MKL_DEBUG_CPU_TYPE="5", PYTHONPATH=str(ROOT))
    if record_dir is not None:
        env["PADDLEMIX_TEST_RECORD_DIR"] = str(record_dir)
    return env


def _run(cmd, env, timeout=600):
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-3000:])
    return res


def _losses(out_dir: Path):
    """Per-step training losses from the run's train_log.jsonl (later entries win on resume)."""
    lines = (out_dir / "train_log.jsonl").read_text().splitlines()
    return {e["step"]: e["loss"] for e in map(json.loads, lines) if "loss" in e}


def test_single_process_loss_falls_and_resume_is_exact(demo_root, tmp_path):
    full = tmp_path / "full"
    _run([sys.executable, str(RECORD), *_flags(demo_root, full, 12)], _env(tmp_path))
    losses = _losses(full)
    assert len(losses) == 12
    first, last = [losses[s] for s in (1, 2, 3)], [losses[s] for s in (10, 11, 12)]
    assert sum(last) < sum(first) - 0.3, losses

    # Interrupted run: the same 12-step run stopped after step 6, then resumed from its checkpoint.
    part = tmp_path / "part"
    _run([sys.executable, str(RECORD), *_flags(demo_root, part, 12)], dict(_env(tmp_path), PADDLEMIX_TEST_STOP_AT="6"))
    assert max(_losses(part)) == 6
    _run([sys.executable, str(RECORD), *_flags(demo_root, part, 12,
                                               ["--resume_from_checkpoint", str(part / "checkpoint-6")])],
         _env(tmp_path))
    resumed = _losses(part)
    for step in range(7, 13):
        assert resumed[step] == pytest.approx(losses[step], abs=1e-5), (step, resumed, losses)


@pytest.mark.parametrize("extra", [[], ["--sharding", "stage1", "--sharding_parallel_degree", "2"]],
                         ids=["data_parallel", "sharding_stage1"])
def test_two_processes_train_on_disjoint_samples(demo_root, tmp_path, extra):
    out, rec = tmp_path / "out", tmp_path / "rec"
    rec.mkdir()
    cmd = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir",
           str(tmp_path / "logs"), str(RECORD), *_flags(demo_root, out, 12, extra)]
    _run(cmd, _env(rec))
    seen = [set(map(int, (rec / f"rank{r}.txt").read_text().split())) for r in range(2)]
    assert seen[0] and seen[1]
    assert not seen[0] & seen[1], "ranks loaded the same samples"
    # each rank consumed its 12 batches (the loader may prefetch a few more)
    assert min(len(seen[0]), len(seen[1])) >= 12 * 16
    losses = _losses(out)
    assert sum(losses[s] for s in (10, 11, 12)) < sum(losses[s] for s in (1, 2, 3)), losses


def test_webdataset_shards_train_and_count_bad_samples(tmp_path):
    """A streaming source goes through the Trainer unsharded-again; a corrupt image is skipped and logged."""
    import io
    import tarfile

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for shard in range(2):
        with tarfile.open(tmp_path / f"{shard:05d}.tar", "w") as tar:
            for i in range(24):
                key = f"{shard:02d}{i:04d}"
                if i == 5:
                    payload = b"not an image"
                else:
                    buf = io.BytesIO()
                    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(buf, "PNG")
                    payload = buf.getvalue()
                for name, data in ((f"{key}.png", payload), (f"{key}.txt", f"a picture number {i}".encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    out = tmp_path / "out"
    flags = _flags(tmp_path, out, 4)
    flags[flags.index("--task_name") + 1] = str(tmp_path / "{00000..00001}.tar")
    flags += ["--logging_steps", "4"]
    _run([sys.executable, str(RECORD), *flags], _env(tmp_path))
    logs = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    step_logs = [e for e in logs if "loss" in e]
    assert step_logs and step_logs[-1]["step"] == 4
    assert step_logs[-1]["skipped_samples"] >= 1


@pytest.mark.slow
def test_demo_recipe_reaches_80_percent_zero_shot(tmp_path):
    """The README's main job: train CLIP-tiny-demo on the demo data, zero-shot top-1 >= 80% (chance 6.25%)."""
    recipe = json.loads((ROOT / "configs" / "train" / "demo.json").read_text())
    recipe.update(output_dir=str(tmp_path / "out"), data_root=str(tmp_path / "demo"))
    path = tmp_path / "demo.json"
    path.write_text(json.dumps(recipe))
    _run([sys.executable, str(ROOT / "examples" / "clip" / "run_pretrain_dist.py"), str(path)], _env(), timeout=900)
    results = json.loads((tmp_path / "out" / "train_results.json").read_text())
    assert results["eval_num_classes"] == 16
    assert results["eval_acc1"] >= 0.8, results


@pytest.mark.slow
def test_mixer_clip_trains_with_the_same_script_and_beats_chance(tmp_path):
    """Mixer towers go through the same script; 3 demo epochs reach far above chance (6.25%)."""
    recipe = json.loads((ROOT / "configs" / "train" / "demo.json").read_text())
    recipe.update(model="Mixer-tiny-demo", num_train_epochs=3, output_dir=str(tmp_path / "out"),
                  data_root=str(tmp_path / "demo"))
    path = tmp_path / "mixer.json"
    path.write_text(json.dumps(recipe))
    _run([sys.executable, str(ROOT / "examples" / "clip" / "run_pretrain_dist.py"), str(path)], _env(), timeout=900)
    results = json.loads((tmp_path / "out" / "train_results.json").read_text())
    assert results["eval_acc1"] >= 3 * 0.0625, results


RUN = ROOT / "examples" / "clip" / "run_pretrain_dist.py"


def _launch(nproc, tmp_path, name, flags):
    return [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", str(nproc), "--log_dir",
            str(tmp_path / f"logs_{name}"), str(RUN), *flags]


@pytest.mark.slow
def test_tensor_parallel_degree_two_through_the_script_equals_one_process(demo_root, tmp_path):
    """--tensor_parallel_degree 2 on 2 CPU processes (the project's TP layers in the Trainer) = 1 process."""
    one, two = tmp_path / "one", tmp_path / "two"
    _run([sys.executable, str(RUN), *_flags(demo_root, one, 5)], _env())
    _run(_launch(2, tmp_path, "two", _flags(demo_root, two, 5, ["--tensor_parallel_degree", "2"])), _env())
    reference, parallel = _losses(one), _losses(two)
    assert sorted(parallel) == [1, 2, 3, 4, 5]
    for step, loss in reference.items():
        assert parallel[step] == pytest.approx(loss, abs=1e-4), (step, reference, parallel)
    # the run saved one merged checkpoint that loads at degree 1
    from paddlemix.models.clip_model import CLIP

    assert CLIP.from_pretrained(str(two)).visual is not None


@pytest.mark.slow
@pytest.mark.xfail(reason="fleet.init's hybrid topology does not start on 4 CPU processes here: creating the "
                          "sharding comm groups fails with a gloo pair TIMEOUT / connection refused (Paddle's "
                          "topology._set_comm_group, before any paddlemix code runs; 4 processes with "
                          "--sharding stage1 --sharding_parallel_degree 4 and no tensor parallel fail the same "
                          "way; tools/repro_fleet_gloo_hybrid.py shows it with Paddle alone); open", strict=False)
def test_four_processes_tensor_parallel_times_sharding_stage1_match_two_processes(demo_root, tmp_path):
    """TP 2 x sharding stage1 degree 2 (4 processes) = sharding stage1 degree 2 alone (2 processes)."""
    extra = ["--sharding", "stage1", "--sharding_parallel_degree", "2", "--local_loss", "true",
             "--gather_with_grad", "true"]
    two, four = tmp_path / "two", tmp_path / "four"
    _run(_launch(2, tmp_path, "two", _flags(demo_root, two, 5, extra)), _env())
    _run(_launch(4, tmp_path, "four", _flags(demo_root, four, 5, [*extra, "--tensor_parallel_degree", "2"])), _env(),
         timeout=900)
    reference, parallel = _losses(two), _losses(four)
    assert sorted(parallel) == [1, 2, 3, 4, 5]
    for step, loss in reference.items():
        assert parallel[step] == pytest.approx(loss, abs=1e-4), (step, reference, parallel)


@pytest.mark.slow
def test_sharding_stage2_on_cpu_processes_is_refused_before_the_model_is_built(demo_root, tmp_path):
    out = tmp_path / "out"
    flags = _flags(demo_root, out, 5, ["--sharding", "stage2", "--sharding_parallel_degree", "2"])
    res = subprocess.run(_launch(2, tmp_path, "stage2", flags), cwd=ROOT, env=_env(), capture_output=True, text=True,
                         timeout=300)
    assert res.returncode != 0
    for rank in range(2):
        log = (tmp_path / "logs_stage2" / f"workerlog.{rank}").read_text()
        assert "error: --sharding stage2 needs a GPU" in log and "on CPU use --sharding stage1" in log
        assert "Number of trainable parameters" not in log  # no model was built
    assert not out.exists()
