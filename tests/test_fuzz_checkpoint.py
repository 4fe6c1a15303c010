"""Seeded fuzzing of config.json and of safetensors headers.

Random type and value mutations of a valid checkpoint (the original Hugging Face layout and an
m3mlx 4-bit conversion), a few hundred cases. Each case is loaded (`m3mlx.load`, then one forward
pass when it loads) and planned for conversion (`convert --dry-run`). Every case must end in a
clean CheckpointError (ConfigError, LoadError, ConvertError) with a one-line message, or in a
working load; never another exception, a hang, or more than a bounded amount of memory.
"""

import json
import math
import random
import resource
import signal
import struct
import warnings
from pathlib import Path

import mlx.core as mx
import pytest

import m3mlx
from m3mlx.checkpoint import DTYPE_SIZE, NonFiniteWeightWarning
from m3mlx.convert import convert
from m3mlx.errors import CheckpointError

SEED = 20261214
CASE_SECONDS = 30  # a case taking longer is a hang
MEMORY_MB = 1024  # growth of the process's peak memory over all cases

VALUES = [None, True, False, 0, 1, -1, 2, 3, 7, 8, 16, 64, 2**31, 10**9, 10**12, 2**64, -2**63,
          0.5, 1.5, -0.0, 1e-300, 1e308, math.nan, math.inf, -math.inf, "", "x", "64", "max",
          "full_attention", "minimax_m3_sparse", "sparse", "affine", "mxfp8", [], [0], [1],
          [0, 1], [1, 2, 3], [[1]], ["a"], [None], {}, {"a": 1}, {"rope_type": "yarn"},
          {"group_size": 64, "bits": 4}, {"quant_method": "mxfp8"}, [1] * 300, "\u00e9\U0001f600"]


def mutate_value(rng: random.Random, value):
    """A nearby value of the same type (most of the time), or anything at all."""
    if rng.random() < 0.5:
        return rng.choice(VALUES)
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return rng.choice([value + rng.randint(-3, 3), value * rng.choice([2, 10, 1000]), -value,
                           float(value), str(value), [value]])
    if isinstance(value, float):
        return rng.choice([value * 10.0 ** rng.randint(-8, 8), -value,
                           int(value) if math.isfinite(value) else value, 0.0])
    if isinstance(value, list):
        out = list(value)
        op = rng.randrange(4)
        if op == 0 and out:
            out.pop(rng.randrange(len(out)))
        elif op == 1:
            out.append(rng.choice(out) if out else rng.choice(VALUES))
        elif op == 2 and out:
            out[rng.randrange(len(out))] = rng.choice(VALUES)
        else:
            out = out * rng.randint(0, 3)
        return out
    if isinstance(value, dict):
        return {k: v for k, v in value.items() if rng.random() < 0.7}
    if isinstance(value, str):
        return rng.choice([value.upper(), value[:-1], value + "x", ""])
    return rng.choice(VALUES)


def paths(node, prefix=()):
    """Every (path, value) inside a JSON document (lists are indexed by position)."""
    yield prefix, node
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(
        node, list) and len(node) < 64 else ()
    for k, v in items:
        yield from paths(v, prefix + (k,))


def mutate_document(rng: random.Random, doc, ops: int):
    """Apply `ops` random edits to a JSON document; returns (new document, what was done)."""
    done = []
    for _ in range(ops):
        spots = [(p, v) for p, v in paths(doc) if p]
        path, value = rng.choice(spots)
        parent = doc
        for k in path[:-1]:
            parent = parent[k]
        kind = rng.random()
        if kind < 0.15 and isinstance(parent, dict):
            del parent[path[-1]]
            done.append(("delete", path))
        elif kind < 0.25 and isinstance(parent, dict):
            key = rng.choice(["extra", "num_hidden_layers", "rope_scaling", "layer_types",
                              "quantization", "head_dim", "__metadata__", "dtype"])
            parent[key] = rng.choice(VALUES)
            done.append(("add", path[:-1] + (key,), parent[key]))
        else:
            parent[path[-1]] = mutate_value(rng, value)
            done.append(("set", path, parent[path[-1]]))
    return doc, done


def mutate_bytes(rng: random.Random, data: bytes):
    """Byte-level damage: a bad length prefix, flipped bytes, truncation."""
    kind = rng.randrange(3)
    if kind == 0:
        return struct.pack("<Q", rng.choice([0, 1, 7, len(data), 2**40, 2**64 - 1])) + data[8:], \
            "length prefix"
    if kind == 1:
        b = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(8, min(len(b), 4096))
            b[i] = rng.randrange(256)
        return bytes(b), "flipped header bytes"
    return data[: rng.randrange(len(data))], "truncated"


def header_of(data: bytes):
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def with_header(header, rest: bytes) -> bytes:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + rest


def header_mutation(rng: random.Random, header, rest: bytes):
    """A mutated shard: most often a typed edit of one tensor's entry."""
    names = [k for k in header if k != "__metadata__"]
    name = rng.choice(names)
    entry = header[name]
    kind = rng.random()
    if kind < 0.2:
        entry["dtype"] = rng.choice(list(DTYPE_SIZE) + ["C64", "f32", 4, None])
        what = ("dtype", name, entry["dtype"])
    elif kind < 0.4:
        shape = list(entry["shape"])
        entry["shape"] = rng.choice([shape[::-1], shape + [1], shape[:-1], [-d for d in shape],
                                     [d * 2 for d in shape], [math.prod(shape)], [],
                                     [2**62, 2**62], mutate_value(rng, shape)])
        what = ("shape", name, entry["shape"])
    elif kind < 0.65:
        begin, end = entry["data_offsets"]
        other = header[rng.choice(names)]["data_offsets"]
        entry["data_offsets"] = rng.choice([[end, begin], [begin + 4, end + 4], [begin - 2, end],
                                            list(other), [begin], [begin, end, end], [0, 2**63],
                                            [-8, end - begin - 8], mutate_value(rng, [begin, end])])
        what = ("offsets", name, entry["data_offsets"])
    elif kind < 0.8:
        header, edits = mutate_document(rng, header, rng.randint(1, 2))
        what = ("document", edits)
    elif kind < 0.9:
        header[rng.choice(["__metadata__", name])] = rng.choice(VALUES)
        what = ("replace entry or metadata", name)
    else:
        return mutate_bytes(rng, with_header(header, rest))
    return with_header(header, rest), what


class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang()


def outcome(model_dir: Path, out_dir: Path) -> str:
    """'loaded' or the CheckpointError class name; anything else propagates."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonFiniteWeightWarning)
        results = []
        try:
            model, tokenizer = m3mlx.load(model_dir, dtype=mx.float32)
            mx.eval(model(mx.array([[1, 2, 3, 4]])))
            results.append("loaded")
        except CheckpointError as e:
            assert str(e) and "\n" not in str(e), repr(str(e))
            results.append(type(e).__name__)
        try:
            convert(model_dir, out_dir, dry_run=True, progress=False, log=lambda s: None)
        except CheckpointError as e:
            assert str(e) and "\n" not in str(e), repr(str(e))
        assert not out_dir.exists()
        return results[0]


@pytest.fixture(scope="module")
def targets(tmp_path_factory):
    from m3mlx.demo import write_demo_checkpoint

    root = tmp_path_factory.mktemp("fuzz")
    hf = write_demo_checkpoint(root / "hf", dtype=mx.float32, intermediate_size=64,
                               shared_intermediate_size=64, dense_intermediate_size=128)
    q4 = root / "q4"
    convert(hf, q4, progress=False, log=lambda s: None)
    return {"hf": hf, "q4": q4}


def run_cases(targets, make_case, count: int, tmp_path: Path):
    rng = random.Random(SEED)
    previous = signal.signal(signal.SIGALRM, _alarm)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tally = {}
    for i in range(count):
        model_dir = targets["hf" if i % 3 else "q4"]
        file, data, what = make_case(rng, model_dir)
        original = file.read_bytes()
        file.write_bytes(data)
        signal.alarm(CASE_SECONDS)
        try:
            result = outcome(model_dir, tmp_path / "out")
        except Hang:
            pytest.fail(f"case {i} ({file.name}: {what}) hung")
        except Exception as e:  # the property under test: nothing else escapes
            raise AssertionError(f"case {i} ({file.name}: {what}) raised {e!r}") from e
        finally:
            signal.alarm(0)
            file.write_bytes(original)
        tally[result] = tally.get(result, 0) + 1
    signal.signal(signal.SIGALRM, previous)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < MEMORY_MB
    return tally


def config_case(rng: random.Random, model_dir: Path):
    file = model_dir / "config.json"
    if rng.random() < 0.1:
        data, what = mutate_bytes(rng, b"\0" * 8 + file.read_bytes())
        return file, data[8:], what
    doc, what = mutate_document(rng, json.loads(file.read_text()), rng.randint(1, 3))
    return file, json.dumps(doc).encode(), what


def shard_case(rng: random.Random, model_dir: Path):
    file = rng.choice(sorted(model_dir.glob("model*.safetensors")))
    header, rest = header_of(file.read_bytes())
    data, what = header_mutation(rng, header, rest)
    return file, data, what


def test_fuzz_config_json(targets, tmp_path):
    tally = run_cases(targets, config_case, 250, tmp_path)
    # The mutations reach both outcomes: some still load, most are refused.
    assert tally.get("loaded", 0) >= 20 and sum(tally.values()) - tally.get("loaded", 0) >= 150


def test_fuzz_safetensors_headers(targets, tmp_path):
    tally = run_cases(targets, shard_case, 250, tmp_path)
    assert sum(tally.values()) - tally.get("loaded", 0) >= 200
