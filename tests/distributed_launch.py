"""Launching sharded runs in tests: free ring ports, `mlx.launch` on this machine, and the tiny
M3 checkpoints every sharded test splits (tests/test_distributed*.py)."""

import os
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


BIN = Path(sys.executable).parent


def launch(n: int, *command, python: bool = True, **run) -> subprocess.CompletedProcess:
    """`mlx.launch -n N --backend ring [--python PY] -- command` on this machine (this venv's
    scripts first on PATH, as an activated venv has them); `run`: subprocess.run's options
    (input, cwd)."""
    cmd = [str(BIN / "mlx.launch"), "-n", str(n), "--backend", "ring", "-p", str(free_port(n)),
           *(["--python", sys.executable] if python else []), "--", *command]
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=env, **run)


def splittable_checkpoint(path: Path) -> Path:
    """A tiny M3 (M3's original layout, float32) with 4 KV heads, so that 4 ranks split its
    attention, and MLP widths that split over 4 ranks."""
    from m3mlx.demo import write_demo_checkpoint

    return write_demo_checkpoint(path, dtype=mx.float32, num_key_value_heads=4, index_n_heads=4,
                                 intermediate_size=64, shared_intermediate_size=128,
                                 dense_intermediate_size=128)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny M3 with 4 KV heads (so 4 ranks split attention) in the converter's layout,
    float32 and 4-bit (float32 scales and activations), with shapes that split into whole
    quantization groups over 4 ranks."""
    root = tmp_path_factory.mktemp("sharded")
    src = splittable_checkpoint(root / "src")
    quiet = dict(progress=False, log=lambda s: None, recipe="uniform", dtype="float32")
    convert(src, root / "f32", mode="none", **quiet)
    convert(src, root / "q4", bits=4, group_size=32, **quiet)
    return root
