"""Starting sharded runs in tests: `mlx.launch` on the ring backend, on this machine's ports."""

import os
import socket
import subprocess
import sys
from pathlib import Path

TIMEOUT = 90  # seconds for one launch: a hang fails the test instead of stalling the suite
BIN = Path(sys.executable).parent


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
    import mlx.core as mx

    from m3mlx.demo import write_demo_checkpoint

    return write_demo_checkpoint(path, dtype=mx.float32, num_key_value_heads=4, index_n_heads=4,
                                 intermediate_size=64, shared_intermediate_size=128,
                                 dense_intermediate_size=128)
