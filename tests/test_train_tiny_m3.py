"""tools/train_tiny_m3.py, the recipe of the shipped tiny M3, on a few files and steps: the same
seed gives the same checkpoint byte for byte, in the layout the shipped one has."""

import json
import os
import subprocess
import sys
from pathlib import Path

import m3mlx
from m3mlx.layout import text_weights

SCRIPT = Path(__file__).resolve().parent.parent / "tools" / "train_tiny_m3.py"


def train(tmp_path, name, seed):
    out = tmp_path / name
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--heldout",
                        str(tmp_path / f"{name}.txt"), "--work", str(tmp_path / f"{name}-work"),
                        "--seed", str(seed), "--steps", "3", "--batch", "2", "--length", "64",
                        "--warmup", "1", "--max-files", "6"],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    return out


def test_the_same_seed_trains_the_same_model(tmp_path):
    a, b, c = train(tmp_path, "a", 0), train(tmp_path, "b", 0), train(tmp_path, "c", 1)
    shard = "model-00001-of-00001.safetensors"
    assert (a / shard).read_bytes() == (b / shard).read_bytes()
    assert (a / shard).read_bytes() != (c / shard).read_bytes()
    assert (a / "tokenizer.json").read_text() == (c / "tokenizer.json").read_text()
    record = json.loads((a / "training.json").read_text())
    assert record["seed"] == 0 and record["steps"] == 3 and record["training_files"] == 6
    # What the shipped model is: the original layout, loadable by the runtime.
    model, _ = m3mlx.load(a)
    names = set(json.loads((a / "model.safetensors.index.json").read_text())["weight_map"])
    assert names == {w.name for w in text_weights(model.args)}
    assert model.args.num_local_experts == 32
