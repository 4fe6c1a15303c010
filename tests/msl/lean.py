"""`harness.run` for launches with gigabyte-sized inputs (real-geometry MoE weights).

`harness.run` copies every input several times on its way to the kernel executable (to numpy,
to bytes, into one joined payload, into a file, into memory, into each buffer), which 128-expert
weight tensors cannot afford on a test machine. This runner streams the same input format
through a pipe straight from the arrays' own memory (mx and numpy arrays are read in place), and
the executable reads it with `lean_io.h` directly into its per-buffer allocations. Everything
else is the harness's: the generated source, the emulated grid, the sanitizers.
`test_msl_moe` checks that the stream is byte for byte the harness's input file.
"""

from __future__ import annotations

import hashlib
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


CHUNK = 1 << 26  # bytes per write


def _stream(f, inputs: list, launch) -> None:
    """The harness's input file (`harness._encode`), written piece by piece to `f`."""
    f.write(struct.pack("<3I3I", *(int(g) for g in launch.grid),
                        *(int(t) for t in launch.threadgroup)))
    for x in inputs:
        f.write(struct.pack("<iqq", x.ndim, len(x.payload), 0))
        f.write(struct.pack(f"<{x.ndim}i", *x.shape))
        f.write(struct.pack(f"<{x.ndim}q", *x.strides))
        for start in range(0, len(x.payload), CHUNK):
            f.write(x.payload[start:start + CHUNK])
    init = launch.init_value
    for shape, dtype in zip(launch.output_shapes, launch.output_dtypes):
        nbytes = int(np.prod(shape)) * np.dtype(harness.NP_STORAGE[dtype]).itemsize
        f.write(struct.pack("<qid", nbytes, init is not None, init or 0.0))


def write_inputs(path, inputs: list, launch) -> None:
    with open(path, "wb") as f:
        _stream(f, inputs, launch)


def program(spec, launch) -> tuple:
    """(kernel name, executable, inputs): the harness's program, reading through lean_io.h."""
    if len(launch.inputs) != len(spec.input_names):
        raise ValueError(f"{spec.name}: expected {len(spec.input_names)} inputs, "
                         f"got {len(launch.inputs)}")
    harness.check_metal_subset(spec)
    inputs = _inputs(spec, launch)
    template = list(launch.template or [])
    name, source = harness.mlx_source(spec, inputs, launch.output_dtypes, template)
    text = harness.harness_program(spec, name, source, inputs, launch.output_dtypes, template)
    io = (harness.HERE / "lean_io.h").read_text()
    include = '#include "harness_io.h"'
    if text.count(include) != 1:
        raise harness.HarnessError("the harness program changed shape; update tests/msl/lean.py")
    text = text.replace(include, '#include "lean_io.h"')
    text = f"// lean_io.h {hashlib.sha256(io.encode()).hexdigest()[:16]}\n" + text
    return name, harness.build(text), inputs


def run(spec, launch, timeout=600) -> list:
    """Like `harness.run`, without copies of the inputs on the way."""
    name, exe, inputs = program(spec, launch)
    with tempfile.TemporaryDirectory() as tmp:
        dst, log = Path(tmp) / "out.bin", Path(tmp) / "stderr.txt"
        with open(log, "w") as err:
            proc = subprocess.Popen([str(exe), "/dev/stdin", str(dst)], stdin=subprocess.PIPE,
                                    stderr=err, env={**os.environ, **harness.RUN_ENV})
            try:
                _stream(proc.stdin, inputs, launch)
                proc.stdin.close()
            except BrokenPipeError:  # the kernel died early; its report is in the log
                proc.stdin = None
            code = proc.wait(timeout=timeout)
        if code != 0:
            raise harness.HarnessError(
                f"{name} failed under the harness (exit {code}):\n{log.read_text()[-8000:]}")
        return harness._decode(dst.read_bytes(), launch)
