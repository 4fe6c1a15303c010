"""The checkpoint reader (m3mlx/checkpoint.py): checked headers, exact byte ranges, parallel and
retried reads, the "changed under me" check, and NaN/Inf noticed as weights are read (once)."""

import errno
import json
import os
import shutil
import struct
import threading
import warnings
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import m3mlx
from m3mlx import checkpoint
from m3mlx.checkpoint import (Checkpoint, CheckpointError, NonFiniteWeightWarning, TensorInfo,
                              has_nonfinite, read_header, read_tensor_rows)
from m3mlx.convert import ConvertError, convert
from m3mlx.demo import write_demo_checkpoint

QUIET = dict(progress=False, log=lambda s: None)
STACKED = "language_model.model.layers.2.block_sparse_moe.switch_mlp.gate_proj"


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """Original layout, bf16 on disk (the release's dtype), widths that take 4-bit groups."""
    return write_demo_checkpoint(tmp_path_factory.mktemp("ck") / "hf", intermediate_size=64,
                                 shared_intermediate_size=64, dense_intermediate_size=128)


@pytest.fixture(scope="module")
def q4(hf, tmp_path_factory):
    """An m3mlx 4-bit conversion: stacked experts with scales and biases."""
    out = tmp_path_factory.mktemp("ck") / "q4"
    convert(hf, out, **QUIET)
    return out


def write_shard(file: Path, header: dict, data: bytes):
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    file.write_bytes(struct.pack("<Q", len(text)) + text + data)


def test_open_reads_config_index_and_every_header_once(q4):
    ckpt = Checkpoint.open(q4)
    assert ckpt.args.num_hidden_layers == 4 and ckpt.index is not None
    assert sorted(ckpt.shards) == sorted(set(ckpt.index.values()))
    assert set(ckpt.tensors) == set(ckpt.index)
    assert ckpt.disk_bytes == sum(f.stat().st_size for f in ckpt.files)
    t = ckpt.tensor(f"{STACKED}.weight")
    assert (t.dtype, t.shape, t.rows) == ("U32", (8, 64, 8), 8)
    with pytest.raises(CheckpointError, match="has no tensor nope"):
        ckpt.tensor("nope")


@pytest.mark.parametrize("first,count", [(0, None), (5, 1), (2, 3), (7, 1)])
def test_expert_rows_are_exactly_the_stacked_slice(q4, first, count):
    """One expert's (or a run of experts') weight, scales and biases, read by byte range in one
    parallel batch, equal the slice of what mx.load reads."""
    ckpt = Checkpoint.open(q4)
    names = [f"{STACKED}.{p}" for p in ("weight", "scales", "biases")]
    loaded = {}
    for f in ckpt.files:
        loaded.update(mx.load(str(f)))
    stop = 8 if count is None else first + count
    got = read_tensor_rows([(ckpt.tensor(n), first, count) for n in names], to_mlx=True)
    for name, a in zip(names, got):
        want = loaded[name][first:stop]
        assert a.dtype == want.dtype and a.shape == want.shape
        assert mx.array_equal(a, want).item(), name
    raw = ckpt.tensor(names[1]).read_array(first, count)  # numpy: bf16 as its uint16 bits
    assert raw.dtype == np.uint16
    np.testing.assert_array_equal(raw, np.array(loaded[names[1]][first:stop].view(mx.uint16)))


def test_vectors_and_float_tensors_read_as_stored(hf):
    ckpt = Checkpoint.open(hf)
    loaded = {}
    for f in ckpt.files:
        loaded.update(mx.load(str(f)))
    for name in ("language_model.model.norm.weight",  # bf16 vector
                 "language_model.model.layers.1.block_sparse_moe.gate.weight"):  # fp32 router
        a = ckpt.tensor(name).read_mlx()
        assert a.dtype == loaded[name].dtype and mx.array_equal(a, loaded[name]).item()
    assert ckpt.tensor("language_model.model.norm.weight").read_array().shape == (64,)


def test_large_ranges_are_split_into_aligned_pieces_read_in_parallel(q4, monkeypatch):
    t = Checkpoint.open(q4).tensor("language_model.model.embed_tokens.weight")
    whole = t.read()
    calls = []
    real = checkpoint._pread_into

    def spy(file, offset, view):
        calls.append((offset, len(view), threading.current_thread().name))
        return real(file, offset, view)

    monkeypatch.setattr(checkpoint, "READ_PIECE", checkpoint.READ_ALIGN)
    monkeypatch.setattr(checkpoint, "_pread_into", spy)
    rows = t.rows // 2
    again = read_tensor_rows([(t, 0, rows), (t, rows, None)])
    np.testing.assert_array_equal(np.concatenate([a.reshape(-1).view(np.uint8) for a in again]),
                                  whole.reshape(-1))
    assert len(calls) >= 3
    assert all(off % checkpoint.READ_ALIGN == 0 and n <= checkpoint.READ_PIECE
               for off, n, _ in calls)
    assert all(name.startswith("m3mlx-checkpoint") for _, _, name in calls)  # the reader pool
    # The reads cover the tensor's bytes; pieces only round out to the alignment.
    assert sum(n for _, n, _ in calls) < t.nbytes + 4 * checkpoint.READ_ALIGN


def test_read_errors_are_retried_then_reported_with_file_and_offset(q4, monkeypatch):
    t = Checkpoint.open(q4).tensor(f"{STACKED}.weight")
    real, failures = checkpoint._pread_into, []

    def flaky(file, offset, view):
        if len(failures) < 2:
            failures.append(offset)
            raise OSError(errno.EIO, "Input/output error")
        return real(file, offset, view)

    monkeypatch.setattr(checkpoint, "_pread_into", flaky)
    monkeypatch.setattr(checkpoint.time, "sleep", lambda s: None)
    np.testing.assert_array_equal(t.read(3, 2), np.asarray(t.read_array(3, 2)).view(np.uint8)
                                  .reshape(2, -1))
    assert len(failures) == 2

    def broken(file, offset, view):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(checkpoint, "_pread_into", broken)
    with pytest.raises(CheckpointError) as e:
        t.read(3, 2)
    aligned = (t.start + 3 * t.row_bytes) // checkpoint.READ_ALIGN * checkpoint.READ_ALIGN
    assert str(e.value) == (f"reading {t.file} at byte {aligned} failed 3 times (Input/output "
                            "error); check the disk, or download the file again")


def test_a_file_truncated_after_opening_is_reported_not_returned_short(q4, tmp_path):
    path = Path(shutil.copytree(q4, tmp_path / "q4"))
    ckpt = Checkpoint.open(path)
    t = max(ckpt.tensors.values(), key=lambda t: t.start)  # the last tensor of its file
    with open(t.file, "r+b") as f:
        f.truncate(t.start + t.nbytes // 2)
    with pytest.raises(CheckpointError, match=f"{t.file} ends at byte .* truncated or changed"):
        t.read()


def test_files_changed_under_a_long_running_reader(q4, tmp_path):
    path = Path(shutil.copytree(q4, tmp_path / "q4"))
    ckpt = Checkpoint.open(path)
    ckpt.check_unchanged(deep=True)
    shard = ckpt.files[0]
    st = shard.stat()
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched
    with pytest.raises(CheckpointError, match=f"{shard} changed since it was opened"):
        ckpt.check_unchanged()
    ckpt = Checkpoint.open(path)
    data = bytearray(shard.read_bytes())
    tmp = shard.with_name("replacement")
    tmp.write_bytes(bytes(data))
    os.utime(tmp, ns=(st.st_atime_ns, shard.stat().st_mtime_ns))
    os.replace(tmp, shard)  # same size, same mtime, another file
    with pytest.raises(CheckpointError, match="changed since it was opened"):
        ckpt.check_unchanged()
    shard.unlink()
    with pytest.raises(CheckpointError, match="is gone since it was opened .moved or deleted"):
        ckpt.check_unchanged()


# --- headers ------------------------------------------------------------------------------


def test_overlapping_tensors_are_refused_and_gaps_and_empty_tensors_are_not(tmp_path):
    f = tmp_path / "x.safetensors"
    write_shard(f, {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                    "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, bytes(24))
    with pytest.raises(CheckpointError, match="the bytes of b overlap those of a"):
        read_header(f)
    write_shard(f, {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                    "e": {"dtype": "F32", "shape": [0, 4], "data_offsets": [8, 8]},
                    "b": {"dtype": "U8", "shape": [2], "data_offsets": [24, 26]}}, bytes(26))
    shard = read_header(f)
    assert shard.tensors["b"].start == shard.data_start + 24 and shard.tensors["e"].nbytes == 0


@pytest.mark.parametrize("header,match", [
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}, "__metadata__": [1]},
     "__metadata__ is not a map of strings"),
    ({"a": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}, "malformed"),
    ({"a": {"dtype": "F32", "shape": [4.0], "data_offsets": [0, 16]}}, "malformed"),
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16, 32]}}, "malformed"),
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [16, 0]}}, r"spans bytes \[16, 0\)"),
    ({"a": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 16]}}, "not the"),
    ({"a": {"dtype": "F32", "shape": [8], "data_offsets": [0, 32]}}, "truncated"),
    ({"a": {"dtype": 7, "shape": [4], "data_offsets": [0, 16]}}, "has dtype 7"),
    ({"a": "F32"}, "malformed"),
])
def test_bad_header_entries(tmp_path, header, match):
    f = tmp_path / "x.safetensors"
    write_shard(f, header, bytes(16))
    with pytest.raises(CheckpointError, match=match):
        read_header(f)


def test_duplicate_keys_and_deep_nesting_are_refused(tmp_path):
    f = tmp_path / "x.safetensors"
    entry = '{"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}'
    text = f'{{"a": {entry}, "a": {entry}}}'.encode()
    f.write_bytes(struct.pack("<Q", len(text)) + text + bytes(16))
    with pytest.raises(CheckpointError, match="key 'a' appears twice"):
        read_header(f)
    text = b"[" * 100_000 + b"]" * 100_000
    f.write_bytes(struct.pack("<Q", len(text)) + text)
    with pytest.raises(CheckpointError, match="bad safetensors header"):
        read_header(f)


def test_index_entries_must_name_shards_inside_the_directory(hf, tmp_path):
    path = Path(shutil.copytree(hf, tmp_path / "m"))
    index = json.loads((path / "model.safetensors.index.json").read_text())
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = "../outside.safetensors"
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="not the name of a shard in the model directory"):
        Checkpoint.open(path)


def test_an_absent_vision_only_shard_is_fine(hf, tmp_path):
    path = Path(shutil.copytree(hf, tmp_path / "m"))
    index_file = path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    index["weight_map"]["vision_tower.extra.weight"] = "model-vision.safetensors"  # not on disk
    index_file.write_text(json.dumps(index))
    assert "model-vision.safetensors" not in Checkpoint.open(path).shards
    index["weight_map"]["language_model.model.norm.weight"] = "model-vision.safetensors"
    index_file.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="missing shard.*model-vision.safetensors"):
        Checkpoint.open(path)


def test_every_entry_point_raises_a_checkpoint_error():
    for error in (m3mlx.ConfigError, m3mlx.LoadError, ConvertError):
        assert issubclass(error, m3mlx.CheckpointError)


def test_hub_headers_get_the_same_checks(tmp_path):
    checkpoint.tensors_from_header({"a": {"dtype": "BF16", "shape": [2], "data_offsets": [0, 4]}},
                                   tmp_path / "x", data_start=None, data_size=None)
    with pytest.raises(CheckpointError, match="overlap"):
        checkpoint.tensors_from_header(
            {"a": {"dtype": "BF16", "shape": [2], "data_offsets": [0, 4]},
             "b": {"dtype": "BF16", "shape": [2], "data_offsets": [2, 6]}},
            tmp_path / "x", data_start=None, data_size=None)
    t = TensorInfo("a", "BF16", (2,), tmp_path / "x", -1, 4)
    with pytest.raises(CheckpointError, match="only its header is known"):
        t.read()


# --- NaN and Inf ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,values,bad", [
    ("F32", np.array([1, np.inf], np.float32).view(np.uint8), True),
    ("F32", np.array([1, -2.5e38], np.float32).view(np.uint8), False),
    ("F16", np.array([1, np.nan], np.float16).view(np.uint8), True),
    ("F16", np.array([65504, -1], np.float16).view(np.uint8), False),
    ("BF16", np.array([0x3F80, 0xFF80], np.uint16).view(np.uint8), True),  # 1, -inf
    ("BF16", np.array([0x3F80, 0x7F7F], np.uint16).view(np.uint8), False),  # 1, max
    ("F8_E4M3", np.array([0x7E, 0xFE], np.uint8), False),  # +-448: e4m3 has no inf
    ("F8_E4M3", np.array([0x01, 0xFF], np.uint8), True),
    ("F8_E8M0", np.array([0, 254], np.uint8), False),
    ("F8_E8M0", np.array([127, 255], np.uint8), True),
    ("U8", np.array([255], np.uint8), False),
])
def test_nonfinite_bit_patterns(dtype, values, bad):
    assert has_nonfinite(values, dtype) is bad


def poison(path: Path, name: str, index: int, value: float):
    """Set one element of a float32/bf16 tensor in place (the file keeps its size)."""
    t = Checkpoint.open(path).tensor(name)
    size = 4 if t.dtype == "F32" else 2
    raw = np.array([value], np.float32).view(np.uint8)
    raw = raw if size == 4 else raw[2:]  # bf16 = the high half of the float32
    with open(t.file, "r+b") as f:
        f.seek(t.start + index * size)
        f.write(raw.tobytes())


def test_loading_warns_naming_tensors_with_nan_or_inf(hf, tmp_path):
    path = Path(shutil.copytree(hf, tmp_path / "m"))
    poison(path, "language_model.model.layers.1.self_attn.q_proj.weight", 5, np.nan)
    poison(path, "language_model.model.layers.2.block_sparse_moe.experts.3.w2.weight", 0, np.inf)
    with pytest.warns(NonFiniteWeightWarning) as record:
        m3mlx.load_model(path)
    assert len(record) == 1
    message = str(record[0].message)
    assert message.startswith(f"2 tensor(s) of {path} hold NaN or Inf values: ")
    assert "layers.1.self_attn.q_proj.weight" in message
    assert "layers.2.block_sparse_moe.switch_mlp.down_proj.weight" in message  # as stacked
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m3mlx.load_model(hf)  # a clean checkpoint: no warning
        m3mlx.load_model(path, lazy=True)  # nothing read, nothing checked


def test_loading_checks_mxfp8_bytes_and_exponents_of_a_conversion(hf, tmp_path):
    out = tmp_path / "mx8"
    convert(hf, out, mode="mxfp8", **QUIET)
    scales = Checkpoint.open(out).tensor(f"{STACKED}.scales")
    with open(scales.file, "r+b") as f:
        f.seek(scales.start + 3)
        f.write(b"\xff")  # a NaN exponent
    with pytest.warns(NonFiniteWeightWarning, match=f"1 tensor.*{STACKED}.scales"):
        m3mlx.load_model(out)


def test_conversion_warns_once_and_reads_the_source_once(hf, tmp_path, monkeypatch):
    path = Path(shutil.copytree(hf, tmp_path / "m"))
    poison(path, "language_model.model.layers.3.block_sparse_moe.experts.6.w1.weight", 9, -np.inf)
    read = []
    real = checkpoint._pread_into

    def counting(file, offset, view):
        n = real(file, offset, view)
        read.append(n)
        return n

    monkeypatch.setattr(checkpoint, "_pread_into", counting)
    with pytest.warns(NonFiniteWeightWarning,
                      match=r"1 tensor\(s\) .*experts\.6\.w1\.weight"):
        result = convert(path, tmp_path / "out", **QUIET)
    text = result.plan.source.text_bytes
    # Each source byte is read once; aligned pieces only add their rounding.
    assert text <= sum(read) <= text + len(read) * 2 * checkpoint.READ_ALIGN


def test_large_finite_weights_are_not_reported(hf, tmp_path):
    """Weights whose sum overflows are checked exactly before anything is said about them."""
    path = Path(shutil.copytree(hf, tmp_path / "m"))
    name = "language_model.model.layers.1.self_attn.o_proj.weight"
    for i in (0, 1):
        poison(path, name, i, 3e38)  # finite in bf16; 3e38 + 3e38 is not
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m3mlx.load_model(path)


def test_the_readme_reader_example_runs(q4):
    text = (Path(__file__).parents[1] / "README.md").read_text()
    block = text.split("Code that reads tensors itself")[1].split("```python\n")[1].split("```")[0]
    scope = {"m3mlx": m3mlx}
    exec(block.replace('"path"', repr(str(q4))), scope)
    assert scope["rows"].shape == (1, 64, 8)
    assert [p.shape for p in scope["parts"]] == [(1, 64, 8), (1, 64, 1)]
