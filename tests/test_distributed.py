"""Sharded runs over mx.distributed: 2 and 4 local processes on the ring backend (mlx.launch).

Every path here is the MLX-ops path on this CPU (the Metal kernels take the same sharded
arrays on a Mac: each rank's experts and heads are whole, ordinary weights).
"""

import json
import socket
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

from m3mlx.convert import convert

HERE = Path(__file__).parent
TIMEOUT = 90  # seconds for one launch: a hang fails the test instead of stalling the suite


def free_port(span: int) -> int:
    """A port whose next `span` ports look free (mlx.launch's ring uses one per rank)."""
    for _ in range(20):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + span < 65536 and all(_free(port + i) for i in range(span)):
            return port
    raise RuntimeError("no free ports")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def launch(n: int, *command, timeout: float = TIMEOUT, env=None) -> subprocess.CompletedProcess:
    """`mlx.launch -n N --backend ring -- command` on this machine."""
    cmd = [str(Path(sys.executable).parent / "mlx.launch"), "-n", str(n), "--backend", "ring",
           "-p", str(free_port(n)), "--python", sys.executable, *command]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny M3 with 4 KV heads (so 4 ranks split attention) in the converter's layout,
    float32 and 4-bit (float32 scales and activations), with shapes that split into whole
    quantization groups over 4 ranks."""
    from m3mlx.demo import write_demo_checkpoint

    root = tmp_path_factory.mktemp("sharded")
    src = write_demo_checkpoint(root / "src", dtype=mx.float32, num_key_value_heads=4,
                                index_n_heads=4, intermediate_size=64,
                                shared_intermediate_size=128, dense_intermediate_size=128)
    quiet = dict(progress=False, log=lambda s: None, recipe="uniform", dtype="float32")
    convert(src, root / "f32", mode="none", **quiet)
    convert(src, root / "q4", bits=4, group_size=32, **quiet)
    return root


@pytest.mark.parametrize("kind, n, model", [
    ("tensor", 2, "f32"), ("tensor", 4, "q4"), ("pipeline", 2, "q4"), ("pipeline", 4, "f32")])
def test_sharded_logits_equal_single_process(checkpoints, tmp_path, kind, n, model):
    """Prefill past MSA's dense window (sparse block selection), chunked prefill and greedy
    decode: every rank's logits within 1e-5 of the single-process model, and each rank holds
    at most 1/N of the weights plus what every rank holds (pipeline: plus one layer, the
    unit a stage holds)."""
    out = tmp_path / "ranks.json"
    run = launch(n, str(HERE / "distributed_worker.py"), str(checkpoints / model), kind,
                 str(out))
    assert run.returncode == 0, run.stderr[-2000:]
    ranks = json.loads(out.read_text())
    assert len(ranks) == n
    for r in ranks:
        assert r["max_abs_diff"] <= 1e-5, ranks
        assert r["resident_bytes"] == r["planned_bytes"]
        bound = r["model_bytes"] / n + r["replicated_bytes"]
        if kind == "pipeline":
            bound += r["largest_layer_bytes"]
        assert r["resident_bytes"] <= bound, ranks
    assert sum(r["resident_bytes"] for r in ranks) < 1.2 * ranks[0]["single_process_bytes"]
