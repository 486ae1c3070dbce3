"""Weight files are read without torch and without running anything they contain.

Torch-written fixtures come from tests/fixtures/checkpoint/make_fixtures.py (run once with
torch); the tests only read them.
"""
import io
import json
import mmap
import os
import pickle
import resource
import struct
import tarfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from paddlemix.zoo.checkpoint import (
    CheckpointError,
    find_checkpoint_file,
    iter_checkpoint_shards,
    load_state_dict,
    safetensors_metadata,
    save_safetensors,
    to_bfloat16_bits,
    unwrap_state_dict,
)

FIXTURES = Path(__file__).parent / "fixtures" / "checkpoint"
PARITY = Path(__file__).parent / "fixtures" / "parity" / "openai_quickgelu"


def _assert_same(got, expected):
    assert sorted(got) == sorted(expected)
    for name, value in expected.items():
        assert got[name].dtype == value.dtype, name
        assert got[name].shape == value.shape, name
        np.testing.assert_array_equal(got[name], value, err_msg=name)


def _expected(name):
    with np.load(FIXTURES / name) as npz:
        return {k: npz[k] for k in npz.files}


def _sample_tensors():
    rng = np.random.default_rng(0)
    return {
        "f64": rng.standard_normal((2, 3)),
        "f32": rng.standard_normal((4, 5)).astype(np.float32),
        "f16": rng.standard_normal(7).astype(np.float16),
        "i64": np.arange(-6, 6, dtype=np.int64).reshape(3, 4),
        "i32": np.array([-(2**31), 2**31 - 1], dtype=np.int32),
        "i16": np.array([-5, 5], dtype=np.int16),
        "i8": np.array([-128, 127], dtype=np.int8),
        "u8": np.array([0, 255], dtype=np.uint8),
        "u16": np.array([0, 65535], dtype=np.uint16),
        "u32": np.array([7], dtype=np.uint32),
        "u64": np.array([2**64 - 1], dtype=np.uint64),
        "bool": np.array([True, False, True]),
        "scalar": np.array(2.5, dtype=np.float32),
        "empty": np.zeros((0, 4), dtype=np.float32),
        "fortran": np.asfortranarray(rng.standard_normal((3, 2)).astype(np.float32)),
        "big_endian": np.arange(4, dtype=">i4"),
    }


# ---------------------------------------------------------------------------------------
# Reference checkpoints and torch-written files
# ---------------------------------------------------------------------------------------


def test_reference_safetensors_and_bin_load_identically():
    from_safetensors = load_state_dict(PARITY / "model.safetensors")
    from_bin = load_state_dict(PARITY / "pytorch_model.bin")
    header_len = struct.unpack("<Q", (PARITY / "model.safetensors").read_bytes()[:8])[0]
    header = json.loads((PARITY / "model.safetensors").read_bytes()[8 : 8 + header_len])
    names = sorted(k for k in header if k != "__metadata__")
    assert len(names) == 62
    assert sorted(from_safetensors) == names
    _assert_same(from_bin, from_safetensors)
    assert all(v.dtype == np.float32 for v in from_bin.values())


def test_safetensors_tensors_are_read_only_views_of_the_mapped_file():
    tensors = load_state_dict(PARITY / "model.safetensors")
    for array in tensors.values():
        assert not array.flags.writeable
        base = array
        while isinstance(base, np.ndarray):
            base = base.base
        assert isinstance(base, memoryview) and isinstance(base.obj, mmap.mmap)


@pytest.mark.parametrize(
    "weights, expected",
    [
        ("torch_cases.bin", "torch_cases.npz"),
        ("torch_nested.bin", "torch_nested.npz"),
        ("torch_legacy.pt", "torch_legacy.npz"),
    ],
)
def test_torch_files_load_exactly(weights, expected):
    _assert_same(load_state_dict(FIXTURES / weights), _expected(expected))


def test_torch_cases_cover_views_shared_storage_and_special_dtypes():
    tensors = load_state_dict(FIXTURES / "torch_cases.bin")
    assert tensors["bfloat16"].dtype == np.float32  # widened exactly from bf16
    assert tensors["bool"].dtype == np.bool_
    assert tensors["uint16"].tolist() == [0, 1, 65535]  # _rebuild_tensor_v3 over an untyped storage
    assert tensors["scalar"].shape == () and tensors["scalar"] == 3.25
    assert tensors["transposed"].flags.c_contiguous and tensors["transposed"].shape == (5, 3)
    assert tensors["shared_b"].shape == (4,) and tensors["shared_a"].shape == (2, 3)
    assert tensors["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5]]
    assert "a_dtype" not in tensors and "a_string" not in tensors


def test_big_endian_torch_file_loads_to_native_values(tmp_path):
    # torch_nested.bin holds float32 storages only, so each record swaps in 4-byte words.
    source = zipfile.ZipFile(FIXTURES / "torch_nested.bin")
    target = tmp_path / "big.bin"
    with zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as out:
        for info in source.infolist():
            data = source.read(info)
            if info.filename.endswith("/byteorder"):
                data = b"big"
            elif "/data/" in info.filename:
                data = np.frombuffer(data, dtype="<f4").astype(">f4").tobytes()
            out.writestr(info.filename, data)
    tensors = load_state_dict(target)
    _assert_same(tensors, _expected("torch_nested.npz"))
    assert all(v.dtype.isnative for v in tensors.values())


def test_deflated_torch_zip_loads(tmp_path):
    source = zipfile.ZipFile(FIXTURES / "torch_cases.bin")
    target = tmp_path / "deflated.bin"
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as out:
        for info in source.infolist():
            out.writestr(info.filename, source.read(info))
    _assert_same(load_state_dict(target), _expected("torch_cases.npz"))


def test_torchscript_archive_is_refused_with_advice():
    with pytest.raises(CheckpointError, match="TorchScript") as info:
        load_state_dict(FIXTURES / "torchscript.pt")
    assert "torchscript.pt" in str(info.value) and "safetensors" in str(info.value)


# ---------------------------------------------------------------------------------------
# Malicious pickles
# ---------------------------------------------------------------------------------------


class _Payload:
    """Pickles as a call of ``func(arg)``: what a malicious checkpoint contains."""

    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


def _payloads(marker):
    return {
        f"{os.system.__module__}.system": _Payload(os.system, f"touch {marker}"),
        "builtins.eval": _Payload(eval, f"open({str(marker)!r}, 'w').close()"),
    }


def _torch_zip(path, data_pkl, records=None):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", data_pkl)
        zf.writestr("archive/byteorder", b"little")
        for name, data in (records or {}).items():
            zf.writestr(f"archive/data/{name}", data)
        zf.writestr("archive/version", b"3\n")


@pytest.mark.parametrize("refused", ["system", "eval"])
def test_malicious_torch_zip_is_refused_and_runs_nothing(tmp_path, refused):
    marker = tmp_path / "pwned"
    name, payload = next((k, v) for k, v in _payloads(marker).items() if k.endswith(refused))
    data_pkl = pickle.dumps({"visual.proj": payload}, protocol=2)
    pickle.loads(data_pkl)  # the payload is real: plain unpickling runs it
    assert marker.exists()
    marker.unlink()

    weights = tmp_path / "pytorch_model.bin"
    _torch_zip(weights, data_pkl, {"0": b"\0" * 16})
    with pytest.raises(CheckpointError) as info:
        load_state_dict(weights)
    message = str(info.value)
    assert f"'{name}'" in message and str(weights) in message and "safetensors" in message
    assert not marker.exists()


def test_malicious_legacy_torch_file_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    weights = tmp_path / "legacy.pt"
    header = [0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True, "type_sizes": {}}]
    body = pickle.dumps({"w": _Payload(os.system, f"touch {marker}")}, protocol=2)
    weights.write_bytes(b"".join(pickle.dumps(x, protocol=2) for x in header) + body)
    with pytest.raises(CheckpointError, match=f"'{os.system.__module__}.system'"):
        load_state_dict(weights)
    assert not marker.exists()


@pytest.mark.parametrize("refused", ["system", "eval"])
def test_malicious_pdparams_is_refused_and_runs_nothing(tmp_path, refused):
    marker = tmp_path / "pwned"
    name, payload = next((k, v) for k, v in _payloads(marker).items() if k.endswith(refused))
    weights = tmp_path / "model_state.pdparams"
    weights.write_bytes(pickle.dumps({"linear.weight": np.ones(2, np.float32), "x": payload}, protocol=4))
    with pytest.raises(CheckpointError, match=f"'{name}'") as info:
        load_state_dict(weights)
    assert str(weights) in str(info.value)
    assert not marker.exists()


def test_pdparams_cannot_smuggle_a_class_through_numpy_reconstruct(tmp_path):
    # _reconstruct(subtype, ...) with something other than ndarray as the subtype.
    data = (
        b"\x80\x02cnumpy.core.multiarray\n_reconstruct\ncnumpy\ndtype\nK\x00\x85C\x01b\x87R."
    )
    weights = tmp_path / "evil.pdparams"
    weights.write_bytes(data)
    with pytest.raises(CheckpointError, match="array subclass"):
        load_state_dict(weights)


def _handmade_tensor_zip(path, geometry, after=b""):
    """A torch zip whose pickle is {"w": _rebuild_tensor_v2(<4-float storage>, 0, *geometry)},
    with ``after`` run on the tensor before it is stored; geometry and after are pickle opcodes."""
    data_pkl = (
        b"\x80\x02}X\x01\x00\x00\x00wctorch._utils\n_rebuild_tensor_v2\n"
        b"((X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x04tQK\x00"
        + geometry
        + b"\x89ccollections\nOrderedDict\n)RtR"
        + after
        + b"s."
    )
    _torch_zip(path, data_pkl, {"0": np.arange(4, dtype="<f4").tobytes()})


def test_torch_pickle_cannot_read_outside_its_storage(tmp_path):
    # size (3, 3), stride (3, 1) reaches element 8 of a 4-element storage: refused, not read.
    weights = tmp_path / "oob.bin"
    _handmade_tensor_zip(weights, b"K\x03K\x03\x86K\x03K\x01\x86")
    with pytest.raises(CheckpointError, match="does not fit its storage"):
        load_state_dict(weights)


def test_memo_index_bomb_is_cheap(tmp_path):
    # EMPTY_LIST, LONG_BINPUT 2**28: the C unpickler allocates a 4 GB memo for these 10 bytes.
    bomb = b"\x80\x02]r\x00\x00\x00\x10."
    for name, content in (("bomb.pdparams", bomb), ("bomb.bin", None)):
        path = tmp_path / name
        if content is None:
            _torch_zip(path, bomb)
        else:
            path.write_bytes(content)
        start = time.perf_counter()
        with pytest.raises(CheckpointError, match="expected a dict of tensors"):
            load_state_dict(path)
        assert time.perf_counter() - start < 5.0


def test_forged_bytearray_length_does_not_allocate_it(tmp_path):
    # BYTEARRAY8 declaring 8 GiB with no data behind it: the stock pure-Python handler
    # zero-fills 8 GiB before noticing the data is missing.
    path = tmp_path / "bytearray.pdparams"
    path.write_bytes(b"\x80\x05\x96" + struct.pack("<Q", 8 << 30) + b".")
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(CheckpointError, match="truncated"):
        load_state_dict(path)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before < 512 * 1024  # KiB


def test_forged_numpy_dtype_state_cannot_change_the_type(tmp_path):
    genuine = pickle.dumps({"a": np.array([1.5, -2.0], np.float32)}, protocol=2)
    dtype_state_tail = b"J\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00t"  # elsize, alignment, flags=0
    assert genuine.count(dtype_state_tail) == 1
    # flags 63 marks the type as holding object pointers; numpy's own unpickling trusts that.
    forged_flags = tmp_path / "flags.pdparams"
    forged_flags.write_bytes(genuine.replace(dtype_state_tail, dtype_state_tail[:-3] + b"K?t"))
    loaded = load_state_dict(forged_flags)
    assert loaded["a"].dtype == np.float32 and loaded["a"].tolist() == [1.5, -2.0]
    # Structured fields in the state are refused rather than interpreted.
    forged_fields = tmp_path / "fields.pdparams"
    forged_fields.write_bytes(genuine.replace(b"NNNJ", b"N]NJ", 1))
    with pytest.raises(CheckpointError, match="dtype state"):
        load_state_dict(forged_fields)


def test_torch_pickle_cannot_modify_a_tensor_after_building_it(tmp_path):
    # A valid 4-element tensor, then BUILD (None, {"shape": (2, 2)}) on it: the array is out of reach.
    weights = tmp_path / "build.bin"
    _handmade_tensor_zip(weights, b"K\x04\x85K\x01\x85", after=b"N}X\x05\x00\x00\x00shapeK\x02K\x02\x86s\x86b")
    with pytest.raises(CheckpointError, match="modify a tensor"):
        load_state_dict(weights)


# ---------------------------------------------------------------------------------------
# Paddle .pdparams
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", [2, 3, 4])
def test_pdparams_written_by_paddle_save(tmp_path, protocol):
    paddle = pytest.importorskip("paddle")  # a project dependency; always installed
    paddle.seed(0)
    layer = paddle.nn.Sequential(paddle.nn.Linear(3, 4), paddle.nn.LayerNorm(4))
    path = tmp_path / "model_state.pdparams"
    paddle.save(layer.state_dict(), str(path), protocol=protocol)
    expected = {k: v.numpy() for k, v in layer.state_dict().items()}
    _assert_same(load_state_dict(path), expected)


def test_pdparams_nested_save_and_bfloat16_bits(tmp_path):
    paddle = pytest.importorskip("paddle")
    weight = paddle.to_tensor([[1.5, -2.0]], dtype="bfloat16")
    bias = paddle.to_tensor([0.25, 3.0], dtype="float32")
    path = tmp_path / "train.pdparams"
    # Not a flat state dict, so paddle.save pickles each tensor as (tuple, (name, array)).
    paddle.save({"model": {"fc.weight": weight, "fc.bias": bias}, "epoch": 3}, str(path))
    tensors = load_state_dict(path)
    assert sorted(tensors) == ["fc.bias", "fc.weight"]
    np.testing.assert_array_equal(tensors["fc.bias"], np.array([0.25, 3.0], np.float32))
    # Paddle's own convention: bfloat16 arrives as uint16 bits, which set_state_dict accepts.
    assert tensors["fc.weight"].dtype == np.uint16
    assert tensors["fc.weight"].tolist() == [[0x3FC0, 0xC000]]


def test_pdparams_split_big_parameters_are_rejoined(tmp_path):
    # paddle.save(protocol=2/3) splits arrays over 1 GiB like this; tested at toy size.
    full = np.arange(10, dtype=np.float32).reshape(2, 5)
    flat = full.reshape(-1)
    saved = {
        "small": np.ones(2, np.float32),
        "big@@.0": flat[:6],
        "big@@.1": flat[6:],
        "UnpackBigParamInfor@@": {"big": {"OriginShape": (2, 5), "slices": ["big@@.0", "big@@.1"]}},
    }
    path = tmp_path / "split.pdparams"
    path.write_bytes(pickle.dumps(saved, protocol=2))
    _assert_same(load_state_dict(path), {"small": np.ones(2, np.float32), "big": full})


# ---------------------------------------------------------------------------------------
# safetensors writing and validation
# ---------------------------------------------------------------------------------------


def test_safetensors_round_trip_all_dtypes(tmp_path):
    tensors = _sample_tensors()
    path = tmp_path / "all.safetensors"
    save_safetensors(tensors, path, metadata={"format": "np", "note": "ü"})
    loaded = load_state_dict(path)
    _assert_same(loaded, {k: v.astype(v.dtype.newbyteorder("=")) for k, v in tensors.items()})
    assert safetensors_metadata(path) == {"format": "np", "note": "ü"}
    raw = path.read_bytes()
    assert (8 + struct.unpack("<Q", raw[:8])[0]) % 8 == 0  # data region aligned
    assert os.listdir(tmp_path) == ["all.safetensors"]  # no temporary file left behind
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)


def test_safetensors_interoperate_with_the_reference_library(tmp_path):
    st_numpy = pytest.importorskip("safetensors.numpy")  # installed with paddlenlp
    tensors = {k: v for k, v in _sample_tensors().items() if k != "big_endian"}
    ours = tmp_path / "ours.safetensors"
    save_safetensors(tensors, ours)
    _assert_same(st_numpy.load_file(str(ours)), tensors)
    # safetensors 0.8.0's numpy writer stores Fortran-ordered arrays in memory order (wrong
    # values on reload), so only C-ordered arrays go through it.
    del tensors["fortran"]
    theirs = tmp_path / "theirs.safetensors"
    st_numpy.save_file(tensors, str(theirs), metadata={"format": "pt"})
    _assert_same(load_state_dict(theirs), tensors)
    assert safetensors_metadata(theirs) == {"format": "pt"}


def test_safetensors_files_are_byte_for_byte_what_the_reference_library_writes(tmp_path):
    """Same layout (widest dtype first, then by name), same header, BF16 and metadata included."""
    import safetensors  # the "test" extra

    tensors = {k: v for k, v in _sample_tensors().items() if k not in ("big_endian", "fortran")}
    tensors["bf16"] = to_bfloat16_bits(np.linspace(-1, 1, 6, dtype=np.float32)).reshape(2, 3)
    tensors["z_first_f64"] = np.ones(3)
    metadata = {"note": "ü"}  # one key: the library writes metadata from a hash map, in varying order
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    save_safetensors(tensors, ours, metadata, bfloat16=["bf16"])
    specs = {
        name: safetensors.TensorSpec(dtype="bfloat16" if name == "bf16" else a.dtype.name, shape=list(a.shape),
                                     data_ptr=a.ctypes.data, data_len=a.nbytes)
        for name, a in tensors.items()
    }
    safetensors.serialize_file(specs, str(theirs), metadata=metadata)
    assert ours.read_bytes() == theirs.read_bytes()


def test_bfloat16_rounding_matches_torch_and_round_trips(tmp_path):
    reference = _expected("bf16_rounding.npz")
    bits = to_bfloat16_bits(reference["float32"])
    np.testing.assert_array_equal(bits, reference["bits"])
    nan_bits = to_bfloat16_bits(np.array([np.nan, -np.nan], np.float32))
    assert np.isnan((nan_bits.astype(np.uint32) << 16).view(np.float32)).all()

    path = tmp_path / "bf16.safetensors"
    save_safetensors({"w": bits.reshape(-1, 1), "b": np.ones(2, np.float32)}, path, bfloat16=["w"])
    header = json.loads(path.read_bytes()[8 : 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]])
    assert header["w"]["dtype"] == "BF16"
    loaded = load_state_dict(path)
    widened = (reference["bits"].astype(np.uint32) << 16).view(np.float32).reshape(-1, 1)
    assert loaded["w"].dtype == np.float32
    np.testing.assert_array_equal(loaded["w"], widened)


@pytest.mark.parametrize(
    "tensors, kwargs, message",
    [
        ({"x": np.array(["a"])}, {}, "cannot store"),
        ({"x": np.ones(2, np.complex64)}, {}, "cannot store"),
        ({"__metadata__": np.ones(2)}, {}, "invalid tensor name"),
        ({"x": np.ones(2)}, {"metadata": {"a": 1}}, "strings to strings"),
        ({"x": np.ones(2, np.float32)}, {"bfloat16": ["x"]}, "uint16 bits"),
        ({"x": np.ones(2, np.uint16)}, {"bfloat16": ["y"]}, "not among the tensors"),
    ],
)
def test_save_safetensors_rejects_bad_input_and_keeps_the_old_file(tmp_path, tensors, kwargs, message):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"previous contents")
    with pytest.raises(CheckpointError, match=message):
        save_safetensors(tensors, path, **kwargs)
    assert path.read_bytes() == b"previous contents"
    assert os.listdir(tmp_path) == ["model.safetensors"]


def _f32(n, start):
    return {"dtype": "F32", "shape": [n], "data_offsets": [start, start + 4 * n]}


def _write_safetensors_raw(path, header, data=b"", length=None):
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob) if length is None else length) + blob + data)


@pytest.mark.parametrize(
    "header, data, length, message",
    [
        ({"a": _f32(2, 0), "b": _f32(2, 4)}, b"\0" * 12, None, "overlap"),
        ({"a": _f32(4, 0)}, b"\0" * 8, None, "outside the data region"),
        ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, None, "needs 12 bytes"),
        ({"a": _f32(2, 0)}, b"\0" * 8, 10**6, "header length"),
        ({"a": _f32(2, 0)}, b"\0" * 8, 2**64 - 1, "header length"),
        (b"{not json", b"", None, "not valid JSON"),
        (b'{"a": "\xff\xfe"}', b"", None, "not valid JSON"),
        (b"[1, 2]", b"", None, "expected an object"),
        ({"a": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}}, b"\0" * 2, None, "unsupported dtype"),
        (b'{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, '
         b'"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}', b"\0", None, "duplicate key"),
        ({"a": {"dtype": "U8", "shape": [1], "data_offsets": [False, True]}}, b"\0", None, "pair of integers"),
        ({"a": {"dtype": "U8", "shape": [-1], "data_offsets": [0, 0]}}, b"", None, "non-negative"),
        ({"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1], "x": 1}}, b"\0", None, "exactly dtype"),
        ({"__metadata__": {"a": 1}, "b": _f32(1, 0)}, b"\0" * 4, None, "__metadata__"),
    ],
)
def test_safetensors_header_validation(tmp_path, header, data, length, message):
    path = tmp_path / "bad.safetensors"
    _write_safetensors_raw(path, header, data, length)
    with pytest.raises(CheckpointError, match=message) as info:
        load_state_dict(path)
    assert str(path) in str(info.value)


# ---------------------------------------------------------------------------------------
# Unrecognised and unsupported files
# ---------------------------------------------------------------------------------------


def _tar_bytes():
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo("storages")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    return buffer.getvalue()


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "empty"),
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 1\n", "Git LFS"),
        (b"<html>404</html>", "unrecognised weights format"),
        (_tar_bytes(), "tar-format"),
        (b"PK\x05\x06" + b"\0" * 18, "data.pkl"),
        (b"\x80\x04K\x01.", "expected a dict of tensors"),
    ],
)
def test_unusable_files_give_clear_errors(tmp_path, content, message):
    path = tmp_path / "weights.bin"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        load_state_dict(path)


def test_missing_path_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_state_dict(tmp_path / "absent.safetensors")


def test_numpy_npz_is_not_mistaken_for_a_torch_zip(tmp_path):
    path = tmp_path / "arrays.npz"
    np.savez(path, a=np.ones(2))
    with pytest.raises(CheckpointError, match="data.pkl"):
        load_state_dict(path)


# ---------------------------------------------------------------------------------------
# Unwrapping and directories
# ---------------------------------------------------------------------------------------


def test_unwrap_state_dict():
    w = np.ones(2, np.float32)
    nested = {"epoch": 3, "model": {"state_dict": {"module.a": w, "module.b.c": w, "step": 5}}}
    assert sorted(unwrap_state_dict(nested)) == ["a", "b.c"]
    # A prefix only some names share is part of the names.
    assert sorted(unwrap_state_dict({"module.a": w, "b": w})) == ["b", "module.a"]
    assert sorted(unwrap_state_dict({"module.a": w}, strip_prefix=False)) == ["module.a"]
    # Object and string arrays are not weights.
    assert sorted(unwrap_state_dict({"a": w, "o": np.array([None]), "s": np.array(["x"])})) == ["a"]
    with pytest.raises(CheckpointError, match="no tensors found"):
        unwrap_state_dict({"epoch": 1, "optimizer": {}})
    with pytest.raises(CheckpointError, match="expected a dict"):
        unwrap_state_dict([w])


def test_directory_prefers_safetensors_and_lists_what_it_found(tmp_path):
    w = {"w": np.arange(3, dtype=np.float32)}
    save_safetensors(w, tmp_path / "open_clip_model.safetensors")
    (tmp_path / "pytorch_model.bin").write_bytes((FIXTURES / "torch_nested.bin").read_bytes())
    assert find_checkpoint_file(tmp_path) == str(tmp_path / "open_clip_model.safetensors")
    _assert_same(load_state_dict(tmp_path), w)

    only_bin = tmp_path / "only_bin"
    only_bin.mkdir()
    (only_bin / "open_clip_pytorch_model.bin").write_bytes((FIXTURES / "torch_nested.bin").read_bytes())
    _assert_same(load_state_dict(only_bin), _expected("torch_nested.npz"))

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"no weights file found.*\['config.json'\]"):
        load_state_dict(empty)


# ---------------------------------------------------------------------------------------
# Sharded checkpoints
# ---------------------------------------------------------------------------------------


def _write_index(path, weight_map):
    path.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))


def test_sharded_safetensors(tmp_path):
    tensors = load_state_dict(PARITY / "model.safetensors")
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[:30], "model-00002-of-00002.safetensors": names[30:]}
    weight_map = {}
    for shard, shard_names in halves.items():
        save_safetensors({n: tensors[n] for n in shard_names}, tmp_path / shard)
        weight_map.update({n: shard for n in shard_names})
    index = tmp_path / "model.safetensors.index.json"
    _write_index(index, weight_map)

    shards = list(iter_checkpoint_shards(index))
    assert [sorted(s) for s in shards] == [names[:30], names[30:]]
    _assert_same({k: v for s in shards for k, v in s.items()}, tensors)
    _assert_same(load_state_dict(index), tensors)
    _assert_same(load_state_dict(tmp_path), tensors)  # the directory resolves to the index


def test_sharded_torch_and_safetensors_shards_mix(tmp_path):
    torch_shard = tmp_path / "pytorch_model-00001-of-00002.bin"
    torch_shard.write_bytes((FIXTURES / "torch_cases.bin").read_bytes())
    cases = _expected("torch_cases.npz")
    extra = {"module.extra": np.arange(4, dtype=np.int64)}
    save_safetensors(extra, tmp_path / "pytorch_model-00002-of-00002.safetensors")
    weight_map = {k: torch_shard.name for k in cases}
    weight_map["module.extra"] = "pytorch_model-00002-of-00002.safetensors"
    _write_index(tmp_path / "pytorch_model.bin.index.json", weight_map)
    # Only one name has the "module." prefix, so it is part of that name.
    _assert_same(load_state_dict(tmp_path), {**cases, **extra})


def test_sharded_ddp_prefix_shared_by_every_name_is_removed(tmp_path):
    a, b = np.ones(2, np.float32), np.arange(3, dtype=np.int32)
    save_safetensors({"module.a": a}, tmp_path / "s1.safetensors")
    save_safetensors({"module.b": b}, tmp_path / "s2.safetensors")
    _write_index(tmp_path / "model.safetensors.index.json", {"module.a": "s1.safetensors", "module.b": "s2.safetensors"})
    assert [sorted(s) for s in iter_checkpoint_shards(tmp_path)] == [["a"], ["b"]]


@pytest.mark.parametrize(
    "weight_map, message",
    [
        ({"a": "missing.safetensors"}, "does not exist"),
        ({"a": "s1.safetensors", "nope": "s1.safetensors"}, "does not contain"),
        ({"a": "../s1.safetensors"}, "outside the index"),
        ({"a": "/etc/passwd"}, "outside the index"),
        ({"a": "s1.safetensors", "b": "s2.safetensors"}, "more than one shard"),
        ({}, "weight_map"),
        ({"a": 3}, "not a file name"),
        ({"a": "model.safetensors.index.json"}, "must be a weights file"),
    ],
)
def test_bad_index_files(tmp_path, weight_map, message):
    save_safetensors({"a": np.ones(1, np.float32)}, tmp_path / "s1.safetensors")
    save_safetensors({"a": np.ones(1, np.float32), "b": np.ones(1, np.float32)}, tmp_path / "s2.safetensors")
    index = tmp_path / "model.safetensors.index.json"
    _write_index(index, weight_map)
    with pytest.raises(CheckpointError, match=message):
        load_state_dict(index)


def test_index_that_is_not_json(tmp_path):
    index = tmp_path / "model.safetensors.index.json"
    index.write_text('{"weight_map": {"a": ')
    with pytest.raises(CheckpointError, match="index JSON"):
        load_state_dict(index)


# ---------------------------------------------------------------------------------------
# Fuzzing: damaged files load or raise CheckpointError, nothing else
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_sources(tmp_path_factory):
    directory = tmp_path_factory.mktemp("fuzz")
    small = {k: v for k, v in _sample_tensors().items() if k != "big_endian"}
    save_safetensors(small, directory / "small.safetensors", metadata={"format": "np"})
    pdparams = {k: v for k, v in small.items() if k in ("f32", "i64", "f16", "scalar")}
    (directory / "model.pdparams").write_bytes(pickle.dumps(pdparams, protocol=4))
    (directory / "model_p2.pdparams").write_bytes(pickle.dumps(pdparams, protocol=2))
    return {
        "safetensors": (directory / "small.safetensors").read_bytes(),
        "torch_zip": (FIXTURES / "torch_cases.bin").read_bytes(),
        "torch_legacy": (FIXTURES / "torch_legacy.pt").read_bytes(),
        "pdparams_p4": (directory / "model.pdparams").read_bytes(),
        "pdparams_p2": (directory / "model_p2.pdparams").read_bytes(),
    }


def _load_or_checkpoint_error(path):
    try:
        tensors = load_state_dict(path)
    except CheckpointError:
        return "error"
    for value in tensors.values():  # touch every byte: a bad view would crash here
        np.asarray(value, dtype=np.float64).sum()
    return "loaded"


@pytest.mark.parametrize("kind", ["safetensors", "torch_zip", "torch_legacy", "pdparams_p4", "pdparams_p2"])
def test_fuzz_truncated_and_corrupted_files(tmp_path, fuzz_sources, kind):
    original = fuzz_sources[kind]
    suffix = {"safetensors": ".safetensors", "torch_zip": ".bin", "torch_legacy": ".pt"}.get(kind, ".pdparams")
    rng = np.random.default_rng(1234)
    lengths = sorted(set(range(0, 24)) | set(rng.integers(0, len(original), 40).tolist()))
    outcomes = {"loaded": 0, "error": 0}
    path = tmp_path / f"fuzz{suffix}"
    for length in lengths:
        path.write_bytes(original[:length])
        outcomes[_load_or_checkpoint_error(path)] += 1
    for _ in range(60):
        damaged = bytearray(original)
        for position in rng.integers(0, len(original), int(rng.integers(1, 5))):
            damaged[position] ^= int(rng.integers(1, 256))
        path.write_bytes(bytes(damaged))
        outcomes[_load_or_checkpoint_error(path)] += 1
    assert sum(outcomes.values()) == len(lengths) + 60
    assert outcomes["error"] >= len(lengths)  # every truncation is detected
