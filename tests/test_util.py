import logging
import multiprocessing
import os

import numpy as np
import pytest

from paddlemix._util import exclusive_lock, fsync_dir, l2_normalize, read_lines


def test_l2_normalize_keeps_dtype_and_guards_zero_rows():
    x = np.array([[3.0, 4.0], [0.0, 0.0]], dtype=np.float32)
    y = l2_normalize(x)
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, np.array([[0.6, 0.8], [0.0, 0.0]], dtype=np.float32))
    half = l2_normalize(x.astype(np.float16))
    assert half.dtype == np.float16
    np.testing.assert_array_equal(half, y.astype(np.float16))  # the zero row stays 0, not NaN


def test_read_lines_strips_and_refuses_inner_blank_lines(tmp_path):
    path = tmp_path / "labels.txt"
    path.write_text("\ufeffcat \n dog\n\n", encoding="utf-8")
    assert read_lines(path, "labels") == ["cat", "dog"]
    path.write_text("cat\n\ndog\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"labels file has blank line\(s\) \[2\]"):
        read_lines(path, "labels")
    path.write_text("\n", encoding="utf-8")
    with pytest.raises(ValueError, match="file is empty"):
        read_lines(path)


def _hold(lock_path, ready, release):
    with exclusive_lock(lock_path, "holding"):
        ready.set()
        release.wait(30)


class _ReleaseOnWait(logging.Handler):
    def __init__(self, release):
        super().__init__()
        self.event = release
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())
        self.event.set()  # the holder lets go only once we have said that we wait


def test_exclusive_lock_waits_for_another_process_and_keeps_the_file(tmp_path):
    lock_path = tmp_path / "sub" / "x.lock"
    ctx = multiprocessing.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold, args=(lock_path, ready, release))
    holder.start()
    handler = _ReleaseOnWait(release)
    logger = logging.getLogger("paddlemix._util")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        assert ready.wait(60)
        with exclusive_lock(lock_path, "testing"):
            assert release.is_set()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        release.set()
        holder.join(60)
    assert holder.exitcode == 0
    assert handler.messages == [f"Waiting for another process to finish testing (lock {lock_path})"]
    assert lock_path.exists()  # removing it would let a late process lock a fresh inode


def test_fsync_dir_tolerates_a_missing_directory(tmp_path):
    fsync_dir(tmp_path)
    fsync_dir(tmp_path / "missing")
    assert os.path.isdir(tmp_path)


END_JOB_SCRIPT = """
import logging, multiprocessing, sys, time
from paddlemix._util import end_job_process

def sleep_forever():
    time.sleep(600)

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    child = multiprocessing.Process(target=sleep_forever)
    child.start()
    print(child.pid, flush=True)
    logging.info("logged before the end")
    sys.stderr.write("unflushed stderr")
    end_job_process(3, barrier=False)
    print("not reached")
"""


def test_end_job_process_flushes_ends_loader_children_and_keeps_the_code(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "end_job.py"
    script.write_text(END_JOB_SCRIPT)
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert proc.returncode == 3, proc.stderr
    lines = proc.stdout.splitlines()
    assert "logged before the end" in proc.stdout + proc.stderr and "not reached" not in proc.stdout
    assert proc.stderr.endswith("unflushed stderr")
    child_pid = int(lines[0])
    with pytest.raises(ProcessLookupError):  # terminated and reaped, not left running
        os.kill(child_pid, 0)
