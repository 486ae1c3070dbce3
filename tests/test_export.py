"""Export for Paddle Inference (paddlemix.export / paddlemix.inference) and the CPU environment helper.

The exported encoders of the tiny openai_quickgelu parity model must give the dynamic model's
features within 1e-5 for any batch size (the batch dimension is dynamic), through the Python
API and the ``python -m paddlemix.export`` command.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import paddle
import pytest

from paddlemix._env import apply_cpu_env, recommended_env
from paddlemix.export import check_parity, export_encoders, parity_inputs
from paddlemix.factory import create_model
from paddlemix.inference import EXPORT_CONFIG, ExportedCLIP, ExportError, load_exported

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "parity" / "openai_quickgelu"
EVA_FIXTURE = ROOT / "tests" / "fixtures" / "parity" / "eva02_rope_swiglu"
AMD_CPUINFO = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx avx2 fma\n\nprocessor\t: 1\n"
INTEL_CPUINFO = "processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu sse2 avx avx2 avx512f\n"


@pytest.fixture(scope="module")
def tiny_model():
    return create_model(str(FIXTURE / "model_config.json"), pretrained=str(FIXTURE / "model.safetensors"))


@pytest.fixture(scope="module")
def tiny_export(tiny_model, tmp_path_factory):
    return export_encoders(tiny_model, tmp_path_factory.mktemp("export") / "tiny")


def _dynamic(model, inputs):
    with paddle.no_grad():
        image = model.encode_image(paddle.to_tensor(inputs["image"])).numpy()
        text = model.encode_text(paddle.to_tensor(inputs["text"])).numpy()
    return image, text


def test_exported_features_equal_dynamic_for_any_batch(tiny_model, tiny_export):
    exported = load_exported(tiny_export)
    assert exported.towers == ("image", "text")
    for batch in (1, 3, 8):
        inputs = parity_inputs(tiny_model, batch=batch, seed=batch)
        image, text = _dynamic(tiny_model, inputs)
        got_image, got_text = exported.encode_image(inputs["image"]), exported.encode_text(inputs["text"])
        assert got_image.shape == (batch, 32) and got_text.shape == (batch, 32)
        np.testing.assert_allclose(got_image, image, rtol=0, atol=1e-5)
        np.testing.assert_allclose(got_text, text, rtol=0, atol=1e-5)
        normed = exported.encode_text(paddle.to_tensor(inputs["text"]), normalize=True)
        np.testing.assert_allclose(np.linalg.norm(normed, axis=-1), np.ones(batch), rtol=0, atol=1e-6)


def test_onednn_kernels_agree(tiny_model, tiny_export):
    diffs = check_parity(tiny_model, tiny_export, batch=4, onednn=True)
    assert set(diffs) == {"image", "text"}
    assert max(diffs.values()) < 1e-5


def test_export_config_describes_the_export(tiny_model, tiny_export):
    config = json.loads((tiny_export / EXPORT_CONFIG).read_text())
    assert config["towers"]["image"]["input"] == {"name": "image", "shape": [-1, 3, 32, 32], "dtype": "float32"}
    assert config["towers"]["text"]["input"] == {"name": "text", "shape": [-1, 16], "dtype": "int64"}
    assert config["embed_dim"] == 32 and config["normalize"] is False
    assert config["model_cfg"]["vision_cfg"]["patch_size"] == 8
    assert sorted(p.name for p in tiny_export.iterdir()) == [
        EXPORT_CONFIG, "image.json", "image.pdiparams", "text.json", "text.pdiparams"]


def test_fixed_batch_and_single_tower(tiny_model, tmp_path):
    out = export_encoders(tiny_model, tmp_path / "text_b2", towers=["text"], batch_size=2, normalize=True)
    exported = ExportedCLIP(out)
    assert exported.towers == ("text",)
    inputs = parity_inputs(tiny_model, batch=2)
    with paddle.no_grad():
        ref = tiny_model.encode_text(paddle.to_tensor(inputs["text"]), normalize=True).numpy()
    np.testing.assert_allclose(exported.encode_text(inputs["text"]), ref, rtol=0, atol=1e-5)
    with pytest.raises(ExportError, match=r"shape \[3, 16\] does not fit the exported shape \[2, 16\]"):
        exported.encode_text(np.zeros([3, 16], dtype=np.int64))
    with pytest.raises(ExportError, match="no exported \\['image'\\] tower"):
        ExportedCLIP(out, towers=["image"])


def test_not_an_export_directory(tmp_path):
    with pytest.raises(ExportError, match="export_config.json is missing"):
        load_exported(tmp_path)


def test_fused_norm_model_exports_without_the_custom_op(tmp_path):
    """EVA02 (RoPE, SwiGLU, sub-LN, fusedLN) exports with plain layer_norm and matches dynamic mode."""
    model = create_model(str(EVA_FIXTURE / "model_config.json"), pretrained=str(EVA_FIXTURE / "model.safetensors"))
    out = export_encoders(model, tmp_path / "eva", towers=["image"])
    assert "fused_ln" not in (out / "image.json").read_text()
    diffs = check_parity(model, out, batch=2)
    assert diffs["image"] < 1e-5


def test_cli_exports_and_records_parity(tmp_path):
    out = tmp_path / "cli"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "paddlemix.export", "--model", str(FIXTURE / "model_config.json"),
         "--pretrained", str(FIXTURE / "model.safetensors"), "--out", str(out), "--atol", "1e-5"],
        capture_output=True, text=True, env=env, cwd=str(ROOT), timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    parity = json.loads((out / EXPORT_CONFIG).read_text())["parity"]
    assert parity["atol"] == 1e-5
    assert set(parity["max_abs_diff"]) == {"image", "text"}
    assert max(parity["max_abs_diff"].values()) <= 1e-5


def test_recommended_env_by_vendor():
    amd = recommended_env(environ={}, cpuinfo_text=AMD_CPUINFO, cpus=2)
    assert amd == {"MKL_DEBUG_CPU_TYPE": "5", "OMP_NUM_THREADS": "2", "GOMP_SPINCOUNT": "0"}
    intel = recommended_env(environ={}, cpuinfo_text=INTEL_CPUINFO, cpus=8)
    assert intel == {"OMP_NUM_THREADS": "8", "GOMP_SPINCOUNT": "0"}
    # Two processes of a distributed launch on 8 CPUs get 4 threads each.
    assert recommended_env(environ={"PADDLE_LOCAL_SIZE": "2"}, cpuinfo_text=INTEL_CPUINFO, cpus=8)[
        "OMP_NUM_THREADS"] == "4"


def test_apply_cpu_env_keeps_user_values_and_knows_what_is_read_when(caplog):
    environ = {"GOMP_SPINCOUNT": "100"}
    applied = apply_cpu_env(environ=environ, modules={"numpy"}, cpuinfo_text=AMD_CPUINFO, cpus=2)
    # The thread count is set once Paddle has loaded (configure_process): set earlier, Paddle warns.
    assert applied == {"MKL_DEBUG_CPU_TYPE": "5"}
    assert environ == {"GOMP_SPINCOUNT": "100", "MKL_DEBUG_CPU_TYPE": "5"}
    # After `import paddle`, MKL has not read its variables yet, libgomp has.
    late = {}
    assert apply_cpu_env(environ=late, modules={"paddle"}, cpuinfo_text=AMD_CPUINFO, cpus=2) == {
        "MKL_DEBUG_CPU_TYPE": "5"}
    assert late == {"MKL_DEBUG_CPU_TYPE": "5"}


def test_env_script_prints_shell_exports():
    proc = subprocess.run([sys.executable, str(ROOT / "paddlemix" / "_env.py"), "--shell"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "export GOMP_SPINCOUNT=0" in lines
    assert any(line.startswith("export OMP_NUM_THREADS=") for line in lines)


USER_ENV_KEYS = ("OMP_NUM_THREADS", "MKL_DEBUG_CPU_TYPE", "GOMP_SPINCOUNT", "MKL_NUM_THREADS")
PROBE = ("import os; from paddle.base import core; print('|'.join(str(os.environ.get(k)) for k in "
         f"{USER_ENV_KEYS!r}))")


@pytest.mark.parametrize("imports", ["import paddlemix, paddle", "import paddle, paddlemix"])
def test_import_paddlemix_sets_the_cpu_settings_in_a_users_program(imports, tmp_path):
    """A user's program with no variable set: `import paddlemix` (before or after paddle) sets the
    thread count and MKL's code path, prints none of Paddle's warnings, and leaves user values alone."""
    env = {k: v for k, v in os.environ.items() if k not in USER_ENV_KEYS}
    env["PYTHONPATH"] = str(ROOT)
    want = recommended_env(environ=env)
    proc = subprocess.run([sys.executable, "-c", f"{imports}; {PROBE}"], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    omp, mkl, gomp, _ = proc.stdout.strip().splitlines()[-1].split("|")
    assert omp == want["OMP_NUM_THREADS"]
    assert mkl == want.get("MKL_DEBUG_CPU_TYPE", "None")
    # GOMP_SPINCOUNT is read when Paddle loads: only the paddlemix-first order can set it.
    assert gomp == ("0" if imports.startswith("import paddlemix") else "None")
    if imports.startswith("import paddlemix"):  # Paddle's import-time warnings are not printed
        assert "OMP_NUM_THREADS set to" not in proc.stderr and "ccache" not in proc.stderr, proc.stderr
    assert "OMP_NUM_THREADS set to" not in proc.stderr, proc.stderr
    # A value the user exported is kept, 1 included.
    proc = subprocess.run([sys.executable, "-c", f"{imports}; {PROBE}"], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path, env=dict(env, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1].split("|")[0] == "1"

def _cpu_flags():
    try:
        return set(next(l for l in open("/proc/cpuinfo") if l.startswith("flags")).split())
    except (OSError, StopIteration):
        return set()


@pytest.mark.skipif("avx512f" not in _cpu_flags(),
                    reason="MKL's code path is told apart by forcing AVX2 on an AVX-512 CPU")
def test_mkl_reads_its_cpu_type_after_paddle_has_loaded(tmp_path):
    """Why `import paddle, paddlemix` can still pick MKL's AVX2 path on AMD CPUs: MKL reads
    MKL_DEBUG_CPU_TYPE at its first computation, not when Paddle loads."""
    program = ("import os, paddle; os.environ['MKL_VERBOSE'] = '1'; {set}"
               "a = paddle.randn([64, 64]); (a @ a).numpy()")
    lines = {}
    for name, extra in (("default", ""), ("set_late", "os.environ['MKL_DEBUG_CPU_TYPE'] = '5'; ")):
        env = {k: v for k, v in os.environ.items() if k not in ("MKL_DEBUG_CPU_TYPE", "MKL_VERBOSE")}
        proc = subprocess.run([sys.executable, "-c", program.format(set=extra)], capture_output=True, text=True,
                              timeout=120, cwd=tmp_path, env=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        lines[name] = next(line for line in proc.stdout.splitlines() if "enabled processors" in line)
    assert "AVX-512" in lines["default"] and "AVX2" in lines["set_late"], lines


def test_user_set_tells_paddles_default_thread_count_from_the_users():
    from paddlemix._env import _user_set

    # Paddle wrote 1 at its import; the process did not start with it: not the user's.
    assert "OMP_NUM_THREADS" not in _user_set({"OMP_NUM_THREADS": "1"}, True, {"PATH"})
    # Exported by the user (present at start-up), or any other value: the user's.
    assert "OMP_NUM_THREADS" in _user_set({"OMP_NUM_THREADS": "1"}, True, {"PATH", "OMP_NUM_THREADS"})
    assert "OMP_NUM_THREADS" in _user_set({"OMP_NUM_THREADS": "4"}, True, {"PATH"})
    # Before Paddle loads, whatever is set is the user's; unknown start-up environment: kept.
    assert "OMP_NUM_THREADS" in _user_set({"OMP_NUM_THREADS": "1"}, False, {"PATH"})
    assert "OMP_NUM_THREADS" in _user_set({"OMP_NUM_THREADS": "1"}, True, None)
