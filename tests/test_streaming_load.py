"""Streaming loads: the same bits as loading the whole checkpoint first, in bounded host memory.

The reference here is the loader as it was before streaming: read every tensor
(``load_state_dict``), convert the whole state dict, ``set_value`` each parameter of an
eagerly built model (cast to the parameter's dtype) and then cast the model
(``model.to(dtype=...)``). The streamed ``create_model`` must give identical bits for every
parity fixture, every file format and every precision.
"""
import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import paddle
import pytest

import paddlemix
from paddlemix.zoo.checkpoint import (
    LazyArray,
    load_state_dict,
    release,
    save_safetensors,
    save_safetensors_sharded,
    to_bfloat16_bits,
)
from paddlemix.zoo.key_maps import convert_state_dict

ROOT = Path(__file__).resolve().parents[1]
PARITY = ROOT / "tests" / "fixtures" / "parity"
CASES = ["openai_quickgelu", "clipa_gap", "eva02_rope_swiglu", "eva01_g", "eva18b_style"]
CAST = {"fp16": "float16", "bf16": "bfloat16"}


def _model_arg(case_dir: Path) -> Path:
    return case_dir / "model_config.json" if (case_dir / "model_config.json").is_file() else case_dir


def _eager_reference(case_dir: Path, weights: Path, precision: str):
    """The pre-streaming loader: whole state dict, converted at once, set_value, then model.to."""
    model = paddlemix.create_model(_model_arg(case_dir))  # random init, eagerly built
    params = dict(model.state_dict().items())
    converted = convert_state_dict(load_state_dict(weights))
    assert set(converted) == set(params)
    for name, value in converted.items():
        param = params[name]
        value = np.asarray(value).reshape(param.shape)
        param.set_value(paddle.to_tensor(value).astype(param.dtype))
    if precision in CAST:
        model.to(dtype=CAST[precision])
    return model


def _bits(tensor: paddle.Tensor) -> np.ndarray:
    array = tensor.numpy()  # bfloat16 comes out as its uint16 bits
    return array.view(f"u{array.dtype.itemsize}") if array.dtype.kind == "f" else array


def _assert_same_bits(streamed, reference) -> None:
    ours, theirs = streamed.state_dict(), reference.state_dict()
    assert list(ours) == list(theirs)
    for name in theirs:
        assert ours[name].dtype == theirs[name].dtype, name
        assert ours[name].shape == theirs[name].shape, name
        np.testing.assert_array_equal(_bits(ours[name]), _bits(theirs[name]), err_msg=name)


def _extra_formats(case_dir: Path, tmp_path: Path):
    """The parity weights re-written as bf16 safetensors, two shards behind an index, and a
    Paddle-style pickle of numpy arrays: the formats the fixtures do not ship."""
    tensors = load_state_dict(case_dir / "model.safetensors")
    names = sorted(tensors)
    floats = [n for n in names if tensors[n].dtype == np.float32]
    save_safetensors({n: to_bfloat16_bits(tensors[n]) if n in floats else tensors[n] for n in names},
                     tmp_path / "bf16.safetensors", bfloat16=floats)
    shards = tmp_path / "sharded"
    shards.mkdir()
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in halves.items():
        save_safetensors({n: tensors[n] for n in part}, shards / file)
    index = {"weight_map": {n: file for file, part in halves.items() for n in part}}
    (shards / "model.safetensors.index.json").write_text(json.dumps(index))
    with open(tmp_path / "model.pdparams", "wb") as f:
        pickle.dump({n: np.array(v) for n, v in tensors.items()}, f, protocol=2)
    return [tmp_path / "bf16.safetensors", shards / "model.safetensors.index.json", tmp_path / "model.pdparams"]


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("case", CASES)
def test_streamed_load_matches_the_whole_state_dict_load_bit_for_bit(case, precision, tmp_path):
    case_dir = PARITY / case
    files = [case_dir / "model.safetensors", case_dir / "pytorch_model.bin"]
    if case == "openai_quickgelu":
        files += _extra_formats(case_dir, tmp_path)
    for weights in files:
        streamed = paddlemix.create_model(_model_arg(case_dir), pretrained=weights, precision=precision)
        _assert_same_bits(streamed, _eager_reference(case_dir, weights, precision))


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_hf_directory_streams_bit_for_bit(precision):
    case_dir = PARITY / "hf_clip"
    streamed = paddlemix.create_model(case_dir, precision=precision)
    _assert_same_bits(streamed, _eager_reference(case_dir, case_dir / "model.safetensors", precision))


def test_lazy_conversion_reads_nothing_until_asked():
    """Planning the conversion touches no tensor data; reading one computes only that one."""
    reads = []

    def source(name, shape):
        return LazyArray(lambda: reads.append(name) or np.ones(shape, np.float32), shape=shape, dtype=np.float32)

    sd = {"visual.transformer.resblocks.0.attn.in_proj_weight": source("qkv", (12, 4)),
          "visual.transformer.resblocks.0.ln_1.weight": source("ln", (4,))}
    plan = convert_state_dict(sd, "open_clip", lazy=True)
    assert reads == []
    qkv = np.asarray(plan["visual.transformer.blocks.0.attn.qkv.weight"])
    assert reads == ["qkv"] and qkv.shape == (4, 12)


def test_release_keeps_the_data_valid(tmp_path):
    data = np.arange(3 * 4096, dtype=np.float32).reshape(3, 4096)
    save_safetensors({"w": data}, tmp_path / "w.safetensors")
    view = load_state_dict(tmp_path / "w.safetensors")["w"]
    assert np.array_equal(view, data)
    release(view)  # pages dropped from this process; read again from the page cache
    assert np.array_equal(view, data)
    release(np.ones(3))  # not a mapped array: nothing happens


_MEMORY_CHILD = textwrap.dedent("""
    import json, sys
    import numpy as np
    import paddle, paddlemix

    def rss():
        with open("/proc/self/status") as f:
            return {k: int(v.split()[0]) * 1024 for k, v in (l.split(":", 1) for l in f) if k in ("VmRSS", "VmHWM")}

    config, weights = sys.argv[1], sys.argv[2]
    paddlemix.create_model(config)  # warm up Paddle's kernels and allocator with one small model
    before = rss()["VmRSS"]
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current RSS
    model = paddlemix.create_model(config, pretrained=weights, precision="fp16")
    model_bytes = sum(p.numel().item() * p.element_size() for p in model.state_dict().values())
    print(json.dumps({"before": before, "peak": rss()["VmHWM"], "model_bytes": model_bytes}))
""")


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc peak-RSS reset")
def test_loading_a_big_checkpoint_holds_a_bounded_number_of_tensors(tmp_path):
    """A 400 MB fp32 checkpoint (46 tensors of up to 16 MB) loaded into an fp16 model: the
    peak beyond the process before loading is the 200 MB model plus a few tensors in flight,
    not the checkpoint (which a whole-state-dict load holds in full on top of the model)."""
    width, layers = 1024, 4
    cfg = {"embed_dim": 256, "vision_cfg": {"image_size": 32, "patch_size": 16, "width": width, "layers": layers,
                                            "head_width": 64},
           "text_cfg": {"context_length": 8, "vocab_size": 64, "width": width, "heads": 16, "layers": layers}}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    model = paddlemix.create_model(tmp_path / "config.json")
    rng = np.random.default_rng(0)
    tensors = {name: rng.standard_normal(param.shape, dtype=np.float32) * 0.02
               for name, param in model.state_dict().items()}
    del model
    largest = max(v.nbytes for v in tensors.values())
    file_bytes = sum(v.nbytes for v in tensors.values())
    save_safetensors(tensors, tmp_path / "model.safetensors")
    del tensors
    assert file_bytes > 350e6 and file_bytes > 20 * largest

    proc = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, str(tmp_path / "config.json"),
                           str(tmp_path / "model.safetensors")], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    growth = result["peak"] - result["before"]
    assert result["model_bytes"] == file_bytes // 2
    # The model in fp16, a tensor being read, converted and cast (4 x the largest fp32 tensor),
    # and 32 MB for Paddle's and the allocator's own bookkeeping.
    bound = result["model_bytes"] + 4 * largest + 32e6
    print(f"peak growth {growth / 1e6:.0f} MB, bound {bound / 1e6:.0f} MB, model {result['model_bytes'] / 1e6:.0f} MB")
    assert growth <= bound, (growth / 1e6, bound / 1e6)


def test_sharded_save_round_trips_and_respects_the_size(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {f"t{i}": rng.standard_normal((i + 1, 100)).astype(np.float32) for i in range(8)}
    bits = to_bfloat16_bits(tensors["t7"])
    tensors["t7"] = bits
    files = save_safetensors_sharded(tensors, tmp_path, 1200, {"format": "np"}, bfloat16=["t7"])
    index = json.loads((tmp_path / files[-1]).read_text())
    assert files[-1] == "model.safetensors.index.json" and len(files) > 3
    assert sorted(index["weight_map"]) == sorted(tensors)
    for file in files[:-1]:  # a tensor bigger than the limit has a shard of its own
        names = [n for n, f in index["weight_map"].items() if f == file]
        assert len(names) == 1 or sum(tensors[n].nbytes for n in names) <= 1200
    loaded = load_state_dict(tmp_path / files[-1])
    for name in tensors:
        expected = tensors[name] if name != "t7" else (bits.astype(np.uint32) << 16).view(np.float32)
        np.testing.assert_array_equal(loaded[name], expected)
    one = tmp_path / "one"
    one.mkdir()
    assert save_safetensors_sharded(tensors, one, 10**9, bfloat16=["t7"]) == ["model.safetensors"]


def test_save_writes_lazy_tensors_one_at_a_time(tmp_path):
    reads = []

    def lazy(i):
        return LazyArray(lambda: reads.append(i) or np.full((2, 3), i, np.float16), shape=(2, 3), dtype=np.float16)

    save_safetensors({f"t{i}": lazy(i) for i in range(3)}, tmp_path / "w.safetensors")
    assert reads == [0, 1, 2]
    assert [float(v[0, 0]) for v in load_state_dict(tmp_path / "w.safetensors").values()] == [0, 1, 2]
    with pytest.raises(ValueError, match="came out as"):  # a value that breaks the header's promise
        save_safetensors({"t": LazyArray(lambda: np.zeros(4, np.float16), shape=(2, 3), dtype=np.float16)},
                         tmp_path / "bad.safetensors")
    assert not (tmp_path / "bad.safetensors").exists()


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_convert_cli_writes_shards_that_load_like_one_file(tmp_path, dtype):
    from paddlemix.convert import main

    case = PARITY / "eva02_rope_swiglu"
    common = ["--src", str(case / "pytorch_model.bin"), "--model", str(case / "model_config.json"),
              "--dtype", dtype, "--no-verify"]
    assert main(common + ["--out", str(tmp_path / "one")]) == 0
    assert main(common + ["--out", str(tmp_path / "sharded"), "--max-shard-size", "20kB"]) == 0
    manifest = json.loads((tmp_path / "sharded" / "manifest.json").read_text())
    shards = sorted(f for f in manifest["files"] if f.endswith(".safetensors"))
    assert len(shards) > 2 and "model.safetensors.index.json" in manifest["files"]
    one = paddlemix.create_model(tmp_path / "one", precision=dtype)
    sharded = paddlemix.create_model(tmp_path / "sharded", precision=dtype)
    _assert_same_bits(sharded, one)


def test_parse_size():
    from paddlemix.zoo.model_dir import parse_size

    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size("1000") == 1000
    assert parse_size("1.5 mb") == 1_500_000
    with pytest.raises(ValueError, match="5GB"):
        parse_size("lots")
