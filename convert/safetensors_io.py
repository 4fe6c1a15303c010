"""Safetensors at the byte level: validated headers, row reads, and headers planned up front.

The converter never hands a whole file to a library. It reads the header itself (so a bad or
truncated shard is refused before anything is written), reads the rows it needs with plain
positioned reads (so memory holds only those rows), and writes output shards whose header it
computes before the data exists (so a stacked expert tensor is filled one slice at a time).
"""

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from .errors import ConvertError

# Bytes per element of each safetensors dtype this converter reads or writes.
DTYPE_SIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4,
    "U64": 8, "I64": 8, "F64": 8,
}
FLOAT_DTYPES = ("BF16", "F16", "F32")
# The output dtype names users type, and the safetensors dtype each one is stored as.
FLOAT_NAMES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}

MAX_HEADER_BYTES = 100 << 20  # the safetensors reference implementation's own limit


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors file: where its bytes are and what they mean."""

    name: str
    dtype: str
    shape: Tuple[int, ...]
    file: Path
    start: int  # absolute offset of the first byte in the file
    nbytes: int

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def read(self, first: int = 0, count: Optional[int] = None) -> np.ndarray:
        """Raw bytes of rows [first, first + count) as uint8 [count, row bytes]; a vector or a
        scalar is one row."""
        rows = self.shape[0] if len(self.shape) > 1 else 1
        count = rows - first if count is None else count
        row_bytes = self.nbytes // max(rows, 1)
        return read_bytes(self.file, self.start + first * row_bytes, count * row_bytes).reshape(
            count, row_bytes
        )


def read_bytes(file: Path, offset: int, nbytes: int) -> np.ndarray:
    buf = np.empty(nbytes, dtype=np.uint8)
    with open(file, "rb", buffering=0) as f:
        f.seek(offset)
        view = memoryview(buf)
        done = 0
        while done < nbytes:
            n = f.readinto(view[done:])
            if not n:
                raise ConvertError(
                    f"{file} ended after {offset + done} bytes while reading a tensor; the file "
                    "is truncated: download it again"
                )
            done += n
    return buf


def read_header(file: Path) -> Tuple[Dict[str, TensorInfo], Dict[str, str]]:
    """Parse and check one shard's header against the file; returns (tensors, metadata)."""
    file = Path(file)
    if not file.is_file():
        raise ConvertError(f"{file} is missing; download it again (or pass the complete "
                           "checkpoint)")
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ConvertError(f"{file} is {size} bytes, too short for a safetensors header; "
                               "the file is truncated: download it again")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or n > size - 8:
            raise ConvertError(f"{file} has a bad safetensors header (it claims {n} header bytes "
                               f"in a {size}-byte file); the file is corrupt or truncated: "
                               "download it again")
        raw = f.read(n)
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        raise ConvertError(f"{file} has a bad safetensors header ({e}); the file is corrupt: "
                           "download it again") from None
    meta = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    tensors: Dict[str, TensorInfo] = {}
    end = 0
    for name, entry in header.items():
        try:
            dtype, shape = entry["dtype"], tuple(int(d) for d in entry["shape"])
            begin, stop = (int(x) for x in entry["data_offsets"])
        except (TypeError, KeyError, ValueError):
            raise ConvertError(f"{file}: the header entry for {name} is malformed ({entry!r}); "
                               "the file is corrupt: download it again") from None
        if dtype not in DTYPE_SIZE:
            raise ConvertError(f"{file}: {name} has dtype {dtype}, which this converter does not "
                               f"read (supported: {', '.join(DTYPE_SIZE)})")
        nbytes = int(np.prod(shape, dtype=np.int64)) * DTYPE_SIZE[dtype]
        if stop - begin != nbytes or begin < 0:
            raise ConvertError(f"{file}: {name} ({dtype} {list(shape)}) spans bytes "
                               f"[{begin}, {stop}) of the data, not the {nbytes} its shape needs; "
                               "the file is corrupt: download it again")
        end = max(end, stop)
        tensors[name] = TensorInfo(name, dtype, shape, file, data_start + begin, nbytes)
    if data_start + end > size:
        raise ConvertError(f"{file} is truncated: its header needs {data_start + end} bytes, the "
                           f"file has {size}; download it again")
    return tensors, meta


# ----------------------------------------------------------------------------------------------
# Decoding source bytes into float32


def bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)


def _e4m3_table() -> np.ndarray:
    table = np.zeros(256, dtype=np.float32)
    for b in range(256):
        sign = -1.0 if b & 0x80 else 1.0
        exp, man = (b >> 3) & 0xF, b & 0x7
        if exp == 0xF and man == 0x7:
            table[b] = np.nan
        elif exp == 0:
            table[b] = sign * man / 8.0 * 2.0**-6
        else:
            table[b] = sign * (1.0 + man / 8.0) * 2.0 ** (exp - 7)
    return table


E4M3 = _e4m3_table()
E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], np.float32)


def to_f32(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Rows of raw bytes [r, row_bytes] of a float tensor -> float32 [r, row_elems]."""
    if dtype == "BF16":
        return bf16_to_f32(raw)
    if dtype == "F16":
        return raw.view(np.float16).astype(np.float32)
    if dtype == "F32":
        return raw.view(np.float32)
    if dtype == "F8_E4M3":
        return E4M3[raw]
    raise ConvertError(f"cannot decode {dtype} as a float tensor")


def ue8m0_to_f32(raw: np.ndarray) -> np.ndarray:
    """UE8M0 exponent bytes -> 2**(e - 127) (255 is NaN)."""
    out = np.ldexp(np.float32(1.0), raw.astype(np.int32) - 127).astype(np.float32)
    out[raw == 255] = np.nan
    return out


def e2m1_unpack(raw: np.ndarray) -> np.ndarray:
    """Packed FP4 bytes [r, k/2] (low nibble first) -> float32 [r, k]."""
    out = np.empty(raw.shape[:-1] + (raw.shape[-1] * 2,), dtype=np.float32)
    out[..., 0::2] = E2M1[raw & 0xF]
    out[..., 1::2] = E2M1[raw >> 4]
    return out


# ----------------------------------------------------------------------------------------------
# Output files: the header is computed before any data exists


@dataclass
class PlannedTensor:
    name: str
    dtype: str
    shape: Tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * DTYPE_SIZE[self.dtype]


def layout_header(tensors: Sequence[PlannedTensor], metadata: Optional[Dict[str, str]] = None
                  ) -> Tuple[bytes, Dict[str, int]]:
    """(the 8-byte length + JSON header, absolute data offset of each tensor) for a file holding
    `tensors` back to back in the given order."""
    header: Dict[str, dict] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset, rel = 0, {}
    for t in tensors:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape),
                          "data_offsets": [offset, offset + t.nbytes]}
        rel[t.name] = offset
        offset += t.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # data starts 8-byte aligned, as the reference writer does
    blob = struct.pack("<Q", len(text)) + text
    return blob, {name: len(blob) + off for name, off in rel.items()}


def file_size(tensors: Sequence[PlannedTensor], metadata: Optional[Dict[str, str]] = None) -> int:
    blob, _ = layout_header(tensors, metadata)
    return len(blob) + sum(t.nbytes for t in tensors)


def pwrite_all(fd: int, data, offset: int):
    view = memoryview(np.ascontiguousarray(data)).cast("B")
    while len(view):
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n

