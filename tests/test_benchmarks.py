"""The benchmark suite runs end to end without the torch peer and says the peer is absent."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_run_all_without_peer_writes_table_and_json(tmp_path):
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--quick", "--only", "tokenizer", "--repeats", "1",
         "--warmup", "0", "--settle", "0", "--captions", "64", "--images", "2",
         "--peer-python", str(tmp_path / "no-such-python"), "--json", str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["peer"].startswith("peer absent")
    (row,) = result["rows"]
    assert row["name"].startswith("tokenizer") and row["a_rate"] > 0 and "ratio" not in row
    assert "absent" in result["table"] and "tokenizer" in result["table"]


def test_load_benchmark_without_peer_measures_the_baseline(tmp_path):
    out = tmp_path / "load.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_load.py"), "--peer-python", "", "--workdir",
         str(tmp_path / "work"), "--json", str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["peer"] == "absent" and result["rows"] == []
    assert 100e6 < result["baseline"]["paddlemix"] < 4e9  # import paddle + paddlemix, one op
    assert "framework baseline" in result["table"]
