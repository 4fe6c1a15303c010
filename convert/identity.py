"""What identifies a source checkpoint, so that a resumed conversion never mixes two models.

Tensor names, shapes and dtypes (the plan's fingerprint) cannot tell a model from its finetune.
Each source file is identified by its size, its mtime and a SHA-256 of its contents: the whole
file when that is cheap, else the safetensors header and evenly spread samples of the data
(two checkpoints that differ differ almost everywhere, so the samples see it). The record goes
into the resume state and the output's config.json; a resume or a "complete" verdict against
another source is refused, naming the file that differs. A file that differs only in mtime
(copied, touched) is the same file.
"""

import hashlib
import struct
from pathlib import Path
from typing import Dict, Iterable, Optional

from .plan import human

WHOLE_FILE_BYTES = 64 << 20  # files up to this size are hashed whole
SAMPLES = 16
SAMPLE_BYTES = 64 << 10
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit on a header


def file_identity(path: Path) -> dict:
    """{"size", "mtime_ns", "sha256", "hashed"} of one file."""
    stat = path.stat()
    size = stat.st_size
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= WHOLE_FILE_BYTES:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
            hashed = "all"
        else:
            head = f.read(8)
            digest.update(head)
            header = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
            digest.update(f.read(min(header, MAX_HEADER_BYTES)))
            for i in range(SAMPLES):
                f.seek(i * (size - SAMPLE_BYTES) // (SAMPLES - 1))
                digest.update(f.read(SAMPLE_BYTES))
            hashed = f"header and {SAMPLES} samples of {SAMPLE_BYTES >> 10} KiB"
    return {"size": size, "mtime_ns": stat.st_mtime_ns, "sha256": digest.hexdigest(),
            "hashed": hashed}


def source_identity(files: Iterable[Path]) -> Dict[str, dict]:
    """file name -> identity, for the source files that shape the output."""
    return {p.name: file_identity(p) for p in sorted(set(files), key=lambda p: p.name)}


def difference(recorded: Dict[str, dict], current: Dict[str, dict],
               partial: bool = False) -> Optional[str]:
    """How `current` differs from `recorded`, naming the first file that does; None when
    they agree. `partial`: `current` covers only some files (the rest not downloaded yet)."""
    for name in sorted(set(recorded) | set(current)):
        old, new = recorded.get(name), current.get(name)
        if old is None:
            return f"{name} is in this source but was not in the one converted before"
        if new is None:
            if partial:
                continue
            return f"{name} was in the source converted before but is not in this one"
        if old.get("size") != new["size"]:
            return (f"{name} is {human(new['size'])} here but was {human(old.get('size') or 0)} "
                    "in the source converted before")
        if old.get("sha256") != new["sha256"]:
            return (f"{name} has other contents than in the source converted before (same "
                    "size, different data: another model or a finetune with the same layout?)")
    return None
