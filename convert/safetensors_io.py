"""Output safetensors files whose header is planned before the data exists.

The writer creates each output shard at full size with this header in place, then fills every
tensor at its offset as it is produced, so a stacked expert tensor is written one slice at a time.
Reading (headers, byte ranges) is the checkpoint reader's job: `m3mlx.checkpoint`.
"""

import json
import os
import struct
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from m3mlx.checkpoint import DTYPE_SIZE

# The output dtype names users type, and the safetensors dtype each one is stored as.
FLOAT_NAMES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


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

