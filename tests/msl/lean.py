"""`harness.run` for launches with gigabyte-sized inputs (real-geometry MoE weights).

`harness.run` copies every input several times on its way to the kernel executable (to numpy,
to bytes, into one joined payload), which a 128-expert weight tensor cannot afford on a test
machine. This runner writes the same input file straight from the arrays' own memory (mx arrays
and numpy arrays are read in place) and otherwise reuses the harness: the same generated
source, the same executable, the same sanitizers. `test_msl_moe` checks that the file it
writes is byte for byte the harness's.
"""

from __future__ import annotations

import os
import struct
import subprocess
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np

from . import harness


def _host(value) -> tuple:
    """(numpy array in C order, MLX dtype) of a launch input, without copying when possible."""
    if isinstance(value, harness.View):
        return np.asarray(value.array, order="C"), value.dtype
    if not isinstance(value, mx.array):
        value = mx.array(value)
    dtype = value.dtype
    host = value.view(mx.uint16) if dtype == mx.bfloat16 else value
    return np.asarray(host, order="C"), dtype


def _inputs(spec, launch) -> list:
    if not spec.ensure_row_contiguous:
        raise NotImplementedError("the lean runner passes row-contiguous inputs only")
    out = []
    for name, value in zip(spec.input_names, launch.inputs):
        arr, dtype = _host(value)
        item = arr.itemsize
        strides = tuple(s // item for s in arr.strides)
        payload = memoryview(arr.reshape(-1).view(np.uint8))
        out.append(harness._Input(name, dtype, arr.shape, strides, payload))
    return out


def write_inputs(path, inputs: list, launch) -> None:
    """The harness's input file (`harness._encode`), written piece by piece."""
    with open(path, "wb") as f:
        f.write(struct.pack("<3I3I", *(int(g) for g in launch.grid),
                            *(int(t) for t in launch.threadgroup)))
        for x in inputs:
            f.write(struct.pack("<iqq", x.ndim, len(x.payload), 0))
            f.write(struct.pack(f"<{x.ndim}i", *x.shape))
            f.write(struct.pack(f"<{x.ndim}q", *x.strides))
            f.write(x.payload)
        init = launch.init_value
        for shape, dtype in zip(launch.output_shapes, launch.output_dtypes):
            nbytes = int(np.prod(shape)) * np.dtype(harness.NP_STORAGE[dtype]).itemsize
            f.write(struct.pack("<qid", nbytes, init is not None, init or 0.0))


def run(spec, launch, timeout=600) -> list:
    """Like `harness.run`, without copies of the inputs on the Python side."""
    inputs = _inputs(spec, launch)
    template = list(launch.template or [])
    name, source = harness.mlx_source(spec, inputs, launch.output_dtypes, template)
    exe = harness.build(harness.harness_program(spec, name, source, inputs,
                                                launch.output_dtypes, template))
    with tempfile.TemporaryDirectory(dir=harness.cache_dir()) as tmp:
        src, dst = Path(tmp) / "in.bin", Path(tmp) / "out.bin"
        write_inputs(src, inputs, launch)
        proc = subprocess.run([str(exe), str(src), str(dst)], capture_output=True, text=True,
                              timeout=timeout, env={**os.environ, **harness.RUN_ENV})
        if proc.returncode != 0:
            raise harness.HarnessError(
                f"{name} failed under the harness (exit {proc.returncode}):\n"
                f"{proc.stderr[-8000:]}")
        return harness._decode(dst.read_bytes(), launch)
