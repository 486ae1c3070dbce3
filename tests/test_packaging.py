"""paddlemix as a library in a user's program: installed from its wheel, run from anywhere.

The slow test builds the wheel, installs it into a fresh target directory (no dependencies: the
test environment's Paddle and PaddleNLP serve), and from a directory outside the checkout runs
every registered architecture, every tokenizer and a few demo training steps.
"""
import os
import shutil
import subprocess
import sys
import textwrap
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMPILERS = ("gcc", "g++", "cc", "c++", "nvcc", "ccache", "ld")


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "OMP_NUM_THREADS", "MKL_DEBUG_CPU_TYPE")}
    env.update(extra)
    return env


def test_requirements_txt_matches_pyproject_and_constraints():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = set(project["dependencies"]) | set(project["optional-dependencies"]["test"])
    lines = [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    assert lines[0] == "-c constraints.txt"
    assert set(lines[1:]) == wanted
    pinned = {line.split("==")[0].lower() for line in (ROOT / "constraints.txt").read_text().splitlines()
              if "==" in line and not line.startswith("#")}
    assert {name.lower() for name in wanted} <= pinned


def test_first_forward_runs_no_compiler(tmp_path):
    """A fresh process with an empty extension cache and every compiler on PATH replaced by a
    tripwire: encode_image / encode_text (eval) and a training-mode forward never compile; the
    layers use Paddle's kernels after one warning naming the build command."""
    trap = tmp_path / "bin"
    trap.mkdir()
    marker = tmp_path / "compiler-ran"
    for name in COMPILERS:
        script = trap / name
        script.write_text(f"#!/bin/sh\necho \"$0 $@\" >> {marker}\nexit 1\n")
        script.chmod(0o755)
    program = textwrap.dedent("""
        import json, logging, time
        logging.basicConfig(level=logging.WARNING, format="LOG %(name)s %(message)s")
        t0 = time.perf_counter()
        import paddlemix, paddle
        model = paddlemix.create_model("CLIP-tiny-demo")
        model.eval()
        tokenizer = paddlemix.get_tokenizer("CLIP-tiny-demo")
        images, texts = paddle.randn([2, 3, 32, 32]), tokenizer(["a red circle", "a blue square"])
        t1 = time.perf_counter()
        with paddle.no_grad():
            model.encode_image(images)
        t2 = time.perf_counter()
        with paddle.no_grad():
            model.encode_text(texts)
        t3 = time.perf_counter()
        model.train()
        model(images, texts)[0].sum().backward()
        from paddlemix import kernels
        print("RESULT", json.dumps({"status": kernels.status().available, "detail": kernels.status().detail,
              "setup_s": t1 - t0, "first_encode_image_s": t2 - t1, "first_encode_text_s": t3 - t2}))
    """)
    env = _clean_env(PYTHONPATH=str(ROOT), PATH=f"{trap}:{os.environ['PATH']}",
                     PADDLEMIX_EXTENSION_DIR=str(tmp_path / "empty-cache"), HOME=str(tmp_path / "home"))
    proc = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not marker.exists(), marker.read_text()
    assert not (tmp_path / "empty-cache").exists() and not (tmp_path / "home" / ".cache").exists()
    logs = [line for line in proc.stderr.splitlines() if line.startswith("LOG paddlemix.kernels")]
    assert len(logs) == 1 and "python -m paddlemix.kernels build" in logs[0], proc.stderr
    assert "ccache" not in proc.stderr and "OMP_NUM_THREADS set to" not in proc.stderr, proc.stderr
    result = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    assert result and '"status": false' in result[0], proc.stdout


def test_kernels_built_ahead_are_loaded_not_rebuilt(tmp_path):
    """With the library in the cache (conftest builds it, as `make install` does), a fresh process
    loads it, with no compiler on PATH."""
    from paddlemix import kernels

    assert kernels.status().available, kernels.status().detail  # this test session's library
    trap = tmp_path / "bin"
    trap.mkdir()
    marker = tmp_path / "compiler-ran"
    for name in COMPILERS:
        (trap / name).write_text(f"#!/bin/sh\necho \"$0\" >> {marker}\nexit 1\n")
        (trap / name).chmod(0o755)
    program = ("import paddlemix, paddle; from paddlemix import kernels; m = paddlemix.create_model('CLIP-tiny-demo'); "
               "m.train(); m.encode_image(paddle.randn([2, 3, 32, 32])).sum().backward(); "
               "print('ORIGIN', kernels.status().origin)")
    env = _clean_env(PYTHONPATH=str(ROOT), PATH=f"{trap}:{os.environ['PATH']}")
    proc = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not marker.exists()
    assert proc.stdout.split()[-1] in ("cache", "installed")


INFERENCE_PROGRAM = textwrap.dedent("""
    import numpy as np, paddle, paddlemix
    from paddlemix.kernels import dispatch
    from paddlemix.models.layers import Attention
    assert dispatch.status().origin == "cache", dispatch.status()
    paddle.seed(0)
    model = paddlemix.create_model("CLIP-tiny-demo")
    images, texts = paddle.randn([2, 3, 32, 32]), paddle.randint(1, 400, [2, 16])
    with paddle.no_grad():
        fast = [model.encode_image(images).numpy(), model.encode_text(texts).numpy()]
        for layer in model.sublayers():
            if isinstance(layer, Attention):
                layer.attn_impl = "math"
        reference = [model.encode_image(images).numpy(), model.encode_text(texts).numpy()]
    for a, b in zip(fast, reference):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    with paddlemix.inference_mode(model):  # its second call multiplies with packed weights, where built
        for _ in range(2):
            packed = [model.encode_image(images).numpy(), model.encode_text(texts).numpy()]
    for a, b in zip(packed, reference):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    print("OPS", *sorted(dispatch.status().ops))
""")

WHEEL_PROGRAM = textwrap.dedent("""
    import logging, sys, paddle, paddlemix
    logging.basicConfig(level=logging.WARNING)
    target = sys.argv[1]
    assert paddlemix.__file__.startswith(target), paddlemix.__file__
    names = paddlemix.list_models()
    assert len(names) >= 50, names
    for name in names:
        with paddle.LazyGuard():
            model = paddlemix.create_model(name)
        tokenizer = paddlemix.get_tokenizer(name)
        ids = tokenizer(["a photo of a dog", "a diagram"])
        assert list(ids.shape) == [2, tokenizer.context_length], (name, ids.shape)
        assert int(ids[0, 0]) != 0, name
    assert len(paddlemix.list_pretrained()) > 0
    from paddlemix.train.pretrain import parse_args, run
    run(*parse_args(["--model", "CLIP-tiny-demo", "--task_name", "demo", "--output_dir", "out", "--do_train",
                     "--max_steps", "3", "--per_device_train_batch_size", "8", "--logging_steps", "1",
                     "--save_strategy", "no", "--evaluation_strategy", "no", "--report_to", "none",
                     "--disable_tqdm", "true", "--dataloader_num_workers", "0"]))
    print("WHEEL-OK", len(names))
""")


@pytest.mark.slow
def test_wheel_installs_and_works_outside_the_checkout(tmp_path):
    dist, target, work, src = tmp_path / "dist", tmp_path / "site", tmp_path / "user", tmp_path / "src"
    work.mkdir()
    # A copy of the sources: setuptools writes build/ and *.egg-info next to them, and a stale
    # build/ in the checkout would leak old files into the wheel.
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis", "output",
        "tests", "benchmarks"))
    pip = [sys.executable, "-m", "pip"]
    build = subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(src)],
                           capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = dist.glob("paddlemix-*.whl")
    files = set(zipfile.ZipFile(wheel).namelist())
    for needed in ("paddlemix/model_configs/ViT-B-32.json", "paddlemix/zoo/pretrained.json",
                   "paddlemix/data/bpe_simple_vocab_16e6.txt.gz", "paddlemix/data/bert_base_uncased_vocab.txt.gz",
                   "paddlemix/kernels/build_config.py", "paddlemix/kernels/csrc/fused_ln_op.cc",
                   "paddlemix/kernels/csrc/fused_ln_cpu_rows.inc"):
        assert needed in files, needed
    install = subprocess.run(pip + ["install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                             capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert install.returncode == 0, install.stderr[-3000:]
    (work / "program.py").write_text(WHEEL_PROGRAM)
    env = _clean_env(PYTHONPATH=str(target))
    proc = subprocess.run([sys.executable, "program.py", str(target)], capture_output=True, text=True,
                          timeout=1800, cwd=work, env=env)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    assert "WHEEL-OK" in proc.stdout
    # The installed package builds its own kernels ahead, from the sources it carries.
    cache = tmp_path / "kernel-cache"
    proc = subprocess.run([sys.executable, "-m", "paddlemix.kernels", "build"], capture_output=True, text=True,
                          timeout=900, cwd=work, env=dict(env, PADDLEMIX_EXTENSION_DIR=str(cache)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list(cache.glob("fused_ln-*/paddlemix_fused_ln/paddlemix_fused_ln.so"))
    # That library serves inference through its fused operators (the attention core where
    # Paddle bundles MKL, as its x86 wheels do), with the numbers of Paddle's own kernels.
    proc = subprocess.run([sys.executable, "-c", INFERENCE_PROGRAM], capture_output=True, text=True,
                          timeout=300, cwd=work, env=dict(env, PADDLEMIX_EXTENSION_DIR=str(cache)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    ops = set(proc.stdout.split("OPS")[-1].split())
    from paddlemix.kernels import build_config

    wanted = {"fused_ln", "cpu_gelu", "cpu_softmax", "cpu_split_heads", "cpu_bias_gelu", "cpu_bias_residual"}
    with_mkl = {"cpu_attention", "cpu_gemm_pack", "cpu_packed_gemm"}
    assert wanted | (with_mkl if build_config.has_cblas() else set()) <= ops, ops
