"""Every bad input gets a ConvertError that says what is wrong and what to do, and leaves
nothing behind: no output directory, or the existing one untouched."""

import errno
import json
import re
import shutil
import struct
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from convert_fixtures import bf16_checkpoint, to_mxfp8, write_safetensors
from m3mlx.convert import ConvertError, convert
from m3mlx.convert import converter as converter_module
from m3mlx.checkpoint import TensorInfo

QUIET = dict(progress=False, log=lambda s: None)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return bf16_checkpoint(tmp_path_factory.mktemp("pristine") / "src")


@pytest.fixture
def src(pristine, tmp_path):
    return Path(shutil.copytree(pristine, tmp_path / "src"))


def shard_of(src: Path, tensor: str) -> Path:
    index = json.loads((src / "model.safetensors.index.json").read_text())
    return src / index["weight_map"][tensor]


def rewrite(file: Path, edit):
    """Rewrite a shard after `edit(tensors)` changed its {name: (dtype, shape, bytes)}."""
    tensors = {}
    for name, a in mx.load(str(file)).items():
        dt = {mx.bfloat16: "BF16", mx.float32: "F32", mx.float16: "F16"}[a.dtype]
        raw = a.view(mx.uint16) if a.dtype == mx.bfloat16 else a
        tensors[name] = (dt, tuple(a.shape), np.array(raw).tobytes())
    edit(tensors)
    write_safetensors(file, tensors)


def fails(src, tmp_path, match, **kwargs):
    out = tmp_path / "out"
    with pytest.raises(ConvertError, match=match) as info:
        convert(src, out, **{**QUIET, **kwargs})
    assert not out.exists(), "a failed conversion left an output directory behind"
    return str(info.value)


EXPERT = "language_model.model.layers.2.block_sparse_moe.experts.3.w2.weight"


def test_missing_shard(src, tmp_path):
    shard_of(src, EXPERT).unlink()
    msg = fails(src, tmp_path, "missing")
    assert "download" in msg


def test_bad_header_json(src, tmp_path):
    f = shard_of(src, EXPERT)
    data = bytearray(f.read_bytes())
    data[8:20] = b"not json at!"
    f.write_bytes(bytes(data))
    assert "download it again" in fails(src, tmp_path, "bad safetensors header")


def test_bad_header_length(src, tmp_path):
    f = shard_of(src, EXPERT)
    data = bytearray(f.read_bytes())
    data[:8] = struct.pack("<Q", 1 << 40)
    f.write_bytes(bytes(data))
    fails(src, tmp_path, "bad safetensors header")


def test_truncated_data(src, tmp_path):
    f = shard_of(src, EXPERT)
    f.write_bytes(f.read_bytes()[:-100])
    assert "download it again" in fails(src, tmp_path, "truncated")


def test_empty_file(src, tmp_path):
    shard_of(src, EXPERT).write_bytes(b"")
    fails(src, tmp_path, "truncated")


def test_unknown_tensor_name(src, tmp_path):
    rewrite(shard_of(src, EXPERT), lambda t: t.update(
        {"language_model.model.layers.1.self_attn.mystery.weight": ("BF16", (2,), b"\0" * 4)}))
    # the index must list it too, or the index check fires first
    index_file = src / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    index["weight_map"]["language_model.model.layers.1.self_attn.mystery.weight"] = \
        shard_of(src, EXPERT).name
    index_file.write_text(json.dumps(index))
    assert "mystery" in fails(src, tmp_path, "not part of a MiniMax-M3 checkpoint")


def test_missing_tensor(src, tmp_path):
    rewrite(shard_of(src, EXPERT), lambda t: t.pop(EXPERT))
    index_file = src / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    del index["weight_map"][EXPERT]
    index_file.write_text(json.dumps(index))
    assert "experts.3.w2" in fails(src, tmp_path, "missing")


def test_index_disagrees_with_shards(src, tmp_path):
    index_file = src / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    files = sorted(set(index["weight_map"].values()))
    index["weight_map"][EXPERT] = next(f for f in files if f != index["weight_map"][EXPERT])
    index_file.write_text(json.dumps(index))
    fails(src, tmp_path, "index and the shards disagree")


def test_shape_disagrees_with_config(src, tmp_path):
    config = json.loads((src / "config.json").read_text())
    config["text_config"]["intermediate_size"] = 48
    (src / "config.json").write_text(json.dumps(config))
    msg = fails(src, tmp_path, "config.json says intermediate_size=48, but the weights'")
    assert "w1.weight has shape [32, 64]" in msg and "disagree" in msg


def test_unsupported_dtype(src, tmp_path):
    name = "language_model.model.norm.weight"
    rewrite(shard_of(src, name), lambda t: t.update({name: ("I32", (64,), b"\0" * 256)}))
    assert "I32" in fails(src, tmp_path, "BF16, F16 or F32")


def test_unknown_dtype_in_header(src, tmp_path):
    name = "language_model.model.norm.weight"
    rewrite(shard_of(src, name), lambda t: t.update({name: ("C64", (64,), b"\0" * 512)}))
    fails(src, tmp_path, "C64")


def test_quantized_tensors_without_quantization_config(src, tmp_path):
    mx8 = to_mxfp8(src, tmp_path / "mx8")
    config = json.loads((mx8 / "config.json").read_text())
    del config["quantization_config"]
    (mx8 / "config.json").write_text(json.dumps(config))
    fails(mx8, tmp_path, "quantization_config missing")


def test_unsupported_quantization_format(src, tmp_path):
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4}
    (src / "config.json").write_text(json.dumps(config))
    fails(src, tmp_path, "not a format this converter reads")


def test_bad_config(src, tmp_path):
    config = json.loads((src / "config.json").read_text())
    config["text_config"]["scoring_func"] = "softmax"
    (src / "config.json").write_text(json.dumps(config))
    fails(src, tmp_path, "scoring_func")
    (src / "config.json").write_text("{not json")
    fails(src, tmp_path, "not valid JSON")


def test_source_not_found(tmp_path):
    fails(tmp_path / "nowhere", tmp_path, "no such directory")
    fails("./not/a repo", tmp_path, "not a Hub repo id")


def test_not_enough_disk(src, tmp_path, monkeypatch):
    real = shutil.disk_usage

    def tiny(path):
        return real(path)._replace(free=100_000)

    monkeypatch.setattr(converter_module.shutil, "disk_usage", tiny)
    msg = fails(src, tmp_path, "not enough disk space: the output needs")
    # the reserve kept free is said, and how big; and how much to free
    assert "plus a reserve of 250.00 MB that m3mlx keeps free" in msg
    assert "has 100.00 KB free: free 250.3" in msg and "more or write elsewhere" in msg


def test_existing_output_needs_resume_or_force(src, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConvertError, match="--resume.*--force"):
        convert(src, out, **QUIET)
    with pytest.raises(ConvertError, match="not a model conversion"):
        convert(src, out, force=True, **QUIET)
    with pytest.raises(ConvertError, match="interrupted m3mlx conversion"):
        convert(src, out, resume=True, **QUIET)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    with pytest.raises(ConvertError, match="contradict"):
        convert(src, out, resume=True, force=True, **QUIET)
    file = tmp_path / "file"
    file.write_text("x")
    with pytest.raises(ConvertError, match="is a file"):
        convert(src, file, **QUIET)


def test_force_replaces_a_previous_conversion_only_after_checks(src, tmp_path):
    out = tmp_path / "out"
    convert(src, out, **QUIET)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    # a bad option: the old output is left alone
    with pytest.raises(ConvertError):
        convert(src, out, force=True, bits=7, **QUIET)
    # a bad source: the old output is left alone too
    with pytest.raises(ConvertError):
        convert(tmp_path / "nowhere", out, force=True, **QUIET)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    convert(src, out, force=True, mode="none", **QUIET)
    assert "quantization" not in json.loads((out / "config.json").read_text())
    assert not list(out.glob("*.partial"))


def test_output_is_the_source(src):
    before = sorted(p.name for p in src.iterdir())
    with pytest.raises(ConvertError, match="source directory"):
        convert(src, src, force=True, **QUIET)
    assert sorted(p.name for p in src.iterdir()) == before


@pytest.mark.parametrize("kwargs,match", [
    (dict(bits=7), "takes 2, 3, 4, 5, 6, 8 bits"),
    (dict(group_size=48), "groups of 32, 64, 128"),
    (dict(mode="mxfp4", bits=8), "always uses 4 bits"),
    (dict(mode="nvfp4", group_size=32), "groups of 16"),
    (dict(mode="none", bits=4), "make no sense"),
    (dict(mode="int4"), "not one of"),
    (dict(recipe="fancy"), "recipe 'fancy' is not known"),
    (dict(roles={"attn": "8"}), "no such role"),
    (dict(roles={"norm": "4"}), "cannot be quantized"),
    (dict(roles={"experts": "7bit"}), "not understood"),
    (dict(roles={"experts": "4g48"}), "affine takes"),
    (dict(dtype="float64"), "--dtype"),
    (dict(max_shard_size=0), "must be positive"),
])
def test_bad_options(src, tmp_path, kwargs, match):
    fails(src, tmp_path, match, **kwargs)


def failing_reads(monkeypatch, at: int) -> list:
    """Source reads fail with EIO from the `at`-th on; returns the list of calls."""
    real = TensorInfo.read
    calls = []

    def flaky(self, first=0, count=None):
        calls.append(1)
        if len(calls) == at:
            raise OSError(errno.EIO, "Input/output error")
        return real(self, first, count)

    monkeypatch.setattr(TensorInfo, "read", flaky)
    return calls


def test_read_error_before_any_shard_is_finished_leaves_nothing(src, tmp_path, monkeypatch):
    calls = failing_reads(monkeypatch, 3)
    out = tmp_path / "out"
    with pytest.raises(ConvertError, match=r"writing the conversion failed: Input/output error; "
                                           "nothing was finished, and nothing is left in"):
        convert(src, out, **QUIET)
    assert len(calls) == 3 and not out.exists()


def test_read_error_mid_conversion_keeps_finished_shards_for_resume(src, tmp_path, monkeypatch):
    """Hours of work are not thrown away for one I/O error: the finished shards stay, the
    message says how many and what to do, and --resume finishes the job."""
    failing_reads(monkeypatch, 40)
    out = tmp_path / "out"
    with pytest.raises(ConvertError) as info:
        convert(src, out, max_shard_size=50_000, **QUIET)
    msg = str(info.value)
    assert re.search(r"Input/output error; \d+ of \d+ files are written and kept", msg), msg
    assert "run the same command with --resume" in msg
    assert not list(out.glob("*.partial")) and not (out / "config.json").exists()
    kept = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert kept
    monkeypatch.undo()
    lines = []
    convert(src, out, max_shard_size=50_000, resume=True, log=lines.append, progress=False)
    assert any(f"resuming: {len(kept)} of" in line for line in lines)
    assert (out / "config.json").exists()
