"""The training loader: data errors end the run with their own message, workers never crash.

Fast tests of paddlemix.train.loader on generated datasets, plus the training script on
all-bad and empty data sources, which must exit non-zero within 30 s with a clear error.
"""
import io
import json
import subprocess
import sys
import tarfile
import time
from multiprocessing.reduction import ForkingPickler
from pathlib import Path

import numpy as np
import paddle
import pytest

from paddlemix.data.sources import SkippedTooManyError
from paddlemix.train.loader import EmptyTrainingDataError, TrainDataLoader

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "fixtures" / "train" / "tiny_clip.json"


class _Numbers(paddle.io.Dataset):
    """Sample i is an array filled with i; index ``bad`` raises."""

    def __init__(self, n=32, bad=None):
        self.n, self.bad = n, bad

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if i == self.bad:
            raise SkippedTooManyError(f"sample {i} is bad")
        return np.full([3, 4, 4], i, dtype="float32")


class _Stream(paddle.io.IterableDataset):
    def __init__(self, n, fail_after=None):
        self.n, self.fail_after = n, fail_after

    def __iter__(self):
        for i in range(self.n):
            if i == self.fail_after:
                raise ValueError(f"record {i} broke the reader")
            yield np.full([2], i, dtype="float32")


def _tensor_collate(samples):
    """What a user's collate function typically does: tensors, not arrays."""
    return {"x": paddle.to_tensor(np.stack(samples))}


def _array_collate(samples):
    return {"x": np.stack(samples)}


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_are_tensors_in_order(workers):
    loader = TrainDataLoader(_Numbers(32), batch_size=4, collate_fn=_array_collate, num_workers=workers)
    got = [batch["x"] for batch in loader]
    assert all(isinstance(x, paddle.Tensor) for x in got)
    assert [x.numpy()[:, 0, 0, 0].tolist() for x in got] == [[4 * k + j for j in range(4)] for k in range(8)]


def test_a_worker_tensor_survives_a_late_queue_feeder(monkeypatch):
    """The root cause of the worker segfaults: a feeder thread that pickles after the next batch.

    Paddle's worker queues a collated tensor by borrowed reference; when the queue's feeder thread
    runs late (a busy CPU), the worker has already replaced the batch and freed the tensor. Here
    the feeder is made late on purpose; every batch must still arrive intact.
    """
    from paddle.incubate.multiprocessing import reductions

    def late_reduce(tensor):
        time.sleep(0.2)
        return reductions._reduce_lodtensor(tensor)

    monkeypatch.setitem(ForkingPickler._extra_reducers, paddle.base.core.DenseTensor, late_reduce)
    loader = TrainDataLoader(_Numbers(24), batch_size=4, collate_fn=_tensor_collate, num_workers=1)
    got = [batch["x"].numpy()[:, 0, 0, 0].tolist() for batch in loader]
    assert got == [[4 * k + j for j in range(4)] for k in range(6)]


@pytest.mark.parametrize("workers", [0, 2])
def test_a_dataset_error_is_raised_in_the_training_loop_with_its_message(workers):
    loader = TrainDataLoader(_Numbers(32, bad=9), batch_size=4, collate_fn=_array_collate, num_workers=workers)
    start = time.perf_counter()
    with pytest.raises(SkippedTooManyError, match="sample 9 is bad"):
        for _ in loader:
            pass
    assert time.perf_counter() - start < 20


@pytest.mark.parametrize("workers", [0, 2])
def test_a_collate_error_is_raised_in_the_training_loop(workers):
    def broken(samples):
        raise KeyError("caption column missing")

    loader = TrainDataLoader(_Numbers(8), batch_size=4, collate_fn=broken, num_workers=workers)
    with pytest.raises(KeyError, match="caption column missing"):
        next(iter(loader))


@pytest.mark.parametrize("workers", [0, 1])
def test_a_stream_error_is_raised_in_the_training_loop(workers):
    loader = TrainDataLoader(_Stream(40, fail_after=6), batch_size=4, drop_last=True, collate_fn=_array_collate,
                             num_workers=workers)
    with pytest.raises(ValueError, match="record 6 broke the reader"):
        for _ in loader:
            pass


@pytest.mark.parametrize("workers", [0, 1])
def test_an_empty_stream_names_the_source(workers):
    stream = _Stream(3)
    stream.name = "webdataset:/data/{000..009}.tar"
    loader = TrainDataLoader(stream, batch_size=4, drop_last=True, collate_fn=_array_collate, num_workers=workers)
    with pytest.raises(EmptyTrainingDataError) as info:
        for _ in loader:
            pass
    assert "webdataset:/data/{000..009}.tar produced no batch of 4 samples" in str(info.value)


# ---------------------------------------------------------------------------------------------------
# Through the training script (default --dataloader_num_workers, i.e. 0)
# ---------------------------------------------------------------------------------------------------

def _train(tmp_path, task_name, *extra, timeout=60):
    cmd = [sys.executable, str(ROOT / "examples" / "clip" / "run_pretrain_dist.py"), "--model", str(TINY),
           "--task_name", str(task_name), "--output_dir", str(tmp_path / "out"), "--max_steps", "3",
           "--per_device_train_batch_size", "4", "--report_to", "none", "--disable_tqdm", "true", *extra]
    start = time.perf_counter()
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    return res, time.perf_counter() - start


def _tar(path: Path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_all_missing_images_in_a_jsonl_end_the_run_within_30s(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"image": f"/no/such/{i}.jpg", "caption": f"picture {i}"}) + "\n"
                            for i in range(40)))
    res, seconds = _train(tmp_path, data)
    assert res.returncode != 0
    assert seconds < 30, seconds
    last = res.stderr.strip().splitlines()[-1]
    assert "SkippedTooManyError" in last and "missing_file=40" in last


def test_a_tar_of_corrupt_images_ends_the_run_within_30s(tmp_path):
    members = [m for i in range(1100) for m in ((f"{i:05d}.jpg", b"\xff\xd8\xff not a jpeg"),
                                                (f"{i:05d}.txt", b"a caption"))]
    res, seconds = _train(tmp_path, _tar(tmp_path / "00000.tar", members))
    assert res.returncode != 0
    assert seconds < 30, seconds
    last = res.stderr.strip().splitlines()[-1]
    assert "SkippedTooManyError" in last and "corrupt_image=" in last and "max_skip_fraction" in last


def test_a_stream_with_no_usable_sample_names_the_source_and_the_skips(tmp_path):
    members = [m for i in range(6) for m in ((f"../../x{i}.jpg", b"x"), (f"../../x{i}.txt", b"caption"))]
    shard = _tar(tmp_path / "unsafe.tar", members)
    res, seconds = _train(tmp_path, shard)
    assert res.returncode != 0
    assert seconds < 30, seconds
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("paddlemix.train.loader.EmptyTrainingDataError")
    assert f"webdataset:{shard}" in last and "unsafe_path=6" in last
    assert "UnboundLocalError" not in res.stderr
