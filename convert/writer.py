"""The streaming writer: output shards filled row chunk by row chunk, at precomputed offsets.

A shard's header is known from the plan, so its file is created at full size with the header in
place and every tensor's bytes land at their offset as they are produced. A stacked expert
tensor [E, out, in] is never whole in memory: each expert's rows are read, quantized and written
into that expert's slice. MLX quantizes each row's groups independently, so quantizing row
chunks gives the bytes quantizing the stack would. Shards are written as `NAME.partial` and
renamed when complete; a small state file records finished shards so `--resume` skips them.
Temporary files are created exclusively and nothing is written through a link planted in the
output directory (m3mlx/files.py).
"""

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Dict, List, Optional

import mlx.core as mx
import numpy as np

from m3mlx.checkpoint import read_header
from m3mlx.checks import parse_json
from m3mlx.errors import CheckpointError
from m3mlx.files import PARTIAL, atomic_write, create_exclusive, is_regular_file

from .plan import SHARD_METADATA, Plan, Unit
from .safetensors_io import FLOAT_NAMES, layout_header, pwrite_all
from .source import SourceWeight

STATE_FILE = ".m3mlx-convert.json"
CHUNK_BYTES = 16 << 20  # float32 bytes per row chunk: bounds the working set


def f32_to_dtype(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 -> the stored bytes of `dtype` (BF16 rounds to nearest even, like MLX)."""
    if dtype == "F32":
        return x
    if dtype == "F16":
        return x.astype(np.float16)
    u = x.view(np.uint32)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        rounded[nan] = 0x7FC0
    return rounded


def chunk_rows(cols: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    return max(1, chunk_bytes // (4 * max(cols, 1)))


def read_rows(unit: Unit, src: SourceWeight, first: int, count: int, dtype: str):
    """The source side of rows [first, first + count): raw bytes to copy, bf16 bits to quantize
    as they are, or float32 values. Runs ahead of `convert_rows` in a reader thread."""
    spec = unit.spec
    if unit.passthrough:
        if spec.quantized:  # mxfp8 -> mxfp8: e4m3 bytes become the words, exponents the scales
            return "copy", [src.data.read(first, count), src.scale.read(first, count)]
        return "copy", [src.data.read(first, count)]
    if spec.quantized and src.fmt == "float" and src.data.dtype == "BF16" and (
            spec.mode != "affine" or dtype == "bfloat16"):
        # MLX quantizes bf16 input in float32 internally: the same bytes as quantizing the
        # float32 copy (the tests check this), without the copy, and faster.
        return "bf16", src.data.read(first, count).view(np.uint16)
    return "f32", src.read_f32(first, count)


def convert_rows(unit: Unit, rows, dtype: str) -> List[np.ndarray]:
    """Output bytes for what `read_rows` returned, one array per output tensor of the unit, in
    `unit.tensors` order."""
    kind, data = rows
    spec = unit.spec
    if kind == "copy":
        return data
    if not spec.quantized:
        return [f32_to_dtype(data, FLOAT_NAMES[spec.dtype])]
    x = mx.array(data).view(mx.bfloat16) if kind == "bf16" else mx.array(data)
    parts = mx.quantize(x, spec.group_size, spec.bits, mode=spec.mode)
    mx.eval(parts)
    out = [np.array(parts[0])]
    for p in parts[1:]:
        if p.dtype == mx.bfloat16 and dtype == "bfloat16":
            out.append(np.array(p.view(mx.uint16)))
        elif spec.mode == "affine":
            out.append(f32_to_dtype(np.array(p.astype(mx.float32)), FLOAT_NAMES[dtype]))
        else:
            out.append(np.array(p))
    return out


class ShardFile:
    """One output file being written under its temporary name."""

    def __init__(self, directory: Path, name: str, tensors):
        self.final = directory / name
        self.temp = directory / (name + PARTIAL)
        header, self.offsets = layout_header(tensors, SHARD_METADATA)
        self.sizes = {t.name: t.nbytes for t in tensors}
        self.size = len(header) + sum(self.sizes.values())
        self.fd = create_exclusive(self.temp, os.O_RDWR)
        try:
            os.ftruncate(self.fd, self.size)
            pwrite_all(self.fd, np.frombuffer(header, dtype=np.uint8), 0)
        except OSError:
            self.abort()
            raise

    def write(self, tensor: str, offset: int, data: np.ndarray):
        data = np.ascontiguousarray(data)
        if offset + data.nbytes > self.sizes[tensor]:
            raise AssertionError(f"write past the end of {tensor}")
        pwrite_all(self.fd, data, self.offsets[tensor] + offset)

    def finish(self):
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = None
        os.replace(self.temp, self.final)

    def abort(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        self.temp.unlink(missing_ok=True)


def _read_ahead(unit: Unit, jobs, dtype: str, reader: Optional[ThreadPoolExecutor]):
    """Yield (job, rows) in order; with a reader thread, the next job's rows are read while the
    caller quantizes and writes this one (numpy and file reads release the GIL)."""

    def read(job):
        _, src, first, count = job
        rows = read_rows(unit, src, first, count, dtype)
        src.scan(*rows)  # NaN/Inf noted as the bytes go by: the source is read once
        return rows

    if reader is None:
        for job in jobs:
            yield job, read(job)
        return
    future = reader.submit(read, jobs[0]) if jobs else None
    for i, job in enumerate(jobs):
        rows = future.result()
        if i + 1 < len(jobs):
            future = reader.submit(read, jobs[i + 1])
        yield job, rows


def write_unit(shard: ShardFile, unit: Unit, dtype: str, on_bytes: Callable[[int], None],
               reader: Optional[ThreadPoolExecutor] = None):
    """Stream one unit into its shard: source by source (expert by expert), row chunk by chunk."""
    jobs = [(e, src, first, min(chunk_rows(src.cols), src.rows - first))
            for e, src in enumerate(unit.sources)
            for first in range(0, src.rows, chunk_rows(src.cols))]
    per_expert = [t.nbytes // len(unit.sources) for t in unit.tensors]  # one expert's slice
    for (e, src, first, count), rows in _read_ahead(unit, jobs, dtype, reader):
        parts = convert_rows(unit, rows, dtype)
        for t, data, slice_bytes in zip(unit.tensors, parts, per_expert):
            row_bytes = slice_bytes // src.rows
            if data.nbytes != count * row_bytes:
                raise AssertionError(f"{t.name}: produced {data.nbytes} bytes for {count} rows, "
                                     f"planned {count * row_bytes}")
            shard.write(t.name, e * slice_bytes + first * row_bytes, data)
        on_bytes(src.nbytes * count // src.rows)
        del rows, parts
    mx.clear_cache()


# ----------------------------------------------------------------------------------------------
# Resume state


def read_state(output: Path) -> Optional[dict]:
    """The resume state, or None when there is none (or it is a link, or not ours)."""
    f = output / STATE_FILE
    if not is_regular_file(f):
        return None
    try:
        state = parse_json(f.read_text())
    except ValueError:
        return None
    return state if isinstance(state, dict) else None


def write_state(output: Path, state: dict):
    atomic_write(output / STATE_FILE, json.dumps(state, indent=1))


def shard_is_complete(output: Path, name: str, plan: Plan) -> bool:
    """A finished shard from an earlier run: a regular file (not a link), the right size, and
    exactly the planned header."""
    f = output / name
    if not is_regular_file(f):
        return False
    header, _ = layout_header(plan.files[name], SHARD_METADATA)
    if f.stat().st_size != len(header) + sum(t.nbytes for t in plan.files[name]):
        return False
    with open(f, "rb") as fh:
        if fh.read(len(header)) != header:
            return False
    try:
        read_header(f)
    except CheckpointError:
        return False
    return True


def write_shards(plan: Plan, output: Path, *, done: List[str], state: dict,
                 on_bytes: Callable[[int], None],
                 after_shard: Optional[Callable[[str], None]] = None):
    """Write every planned file not in `done`, recording each in the state file as it lands."""
    units_by_file: Dict[str, List[Unit]] = {}
    for u in plan.units:
        units_by_file.setdefault(u.file, []).append(u)
    for name in plan.files:
        if name in done:
            continue
        shard = ShardFile(output, name, plan.files[name])
        try:
            with ThreadPoolExecutor(1, thread_name_prefix="m3mlx-read") as reader:
                for unit in units_by_file[name]:
                    write_unit(shard, unit, plan.dtype, on_bytes, reader)
            shard.finish()
        except BaseException:
            shard.abort()
            raise
        done.append(name)
        state["done"] = list(done)
        write_state(output, state)
        if after_shard is not None:
            after_shard(name)
