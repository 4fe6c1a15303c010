"""The one checkpoint reader: config.json, the safetensors index, shard headers and byte ranges.

Everything m3mlx reads from a model directory comes through here (the loader, the converter,
`m3mlx info`, readers that fetch experts by byte range while a model runs), and every file is
validated before anything is built from it: a checkpoint is input, never trusted. Problems raise
`CheckpointError` (`ConfigError` for config.json fields) saying what is wrong, in which file,
and what to do.

A safetensors file is an 8-byte little-endian header length, a JSON header
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}`, then the
data; offsets count from the end of the header.

    ckpt = Checkpoint.open(path)              # config, args, index, headers, all checked
    t = ckpt.tensor("language_model.model.layers.3.block_sparse_moe.switch_mlp.gate_proj.weight")
    rows = t.read_array(5, 1)                 # expert 5's rows [1, out, in], one positioned read
    parts = read_tensor_rows([(t, 5, 1), (s, 5, 1)], to_mlx=True)   # several, in parallel
"""

import hashlib
import json
import math
import os
import re
import struct
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np

from .checks import parse_json
from .config import ConfigError, ModelArgs, check_quantization, check_quantization_config
from .errors import CheckpointError
from .files import open_regular
from .weights import MTP_FILE, is_mtp, is_vision

INDEX_FILE = "model.safetensors.index.json"
HF_QUANT_FILE = "hf_quant_config.json"  # NVIDIA ModelOpt keeps its quantization_config here

# Bytes per element of each safetensors dtype m3mlx reads or writes.
DTYPE_SIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4,
    "U64": 8, "I64": 8, "F64": 8,
}
FLOAT_DTYPES = ("BF16", "F16", "F32")
# The numpy type of each dtype's stored elements; BF16 and the 8-bit floats stay raw bits.
_NUMPY = {
    "BOOL": np.bool_, "U8": np.uint8, "I8": np.int8, "F8_E4M3": np.uint8, "F8_E5M2": np.uint8,
    "F8_E8M0": np.uint8, "U16": np.uint16, "I16": np.int16, "F16": np.float16, "BF16": np.uint16,
    "U32": np.uint32, "I32": np.int32, "F32": np.float32, "U64": np.uint64, "I64": np.int64,
    "F64": np.float64,
}

MAX_HEADER_BYTES = 100 << 20  # the safetensors reference implementation's own limit
MAX_JSON_BYTES = 64 << 20  # config.json and the index (M3's index is about 5 MB)
READ_ALIGN = 16 << 10  # reads start and end on 16 KiB boundaries (Apple silicon's page size)
READ_PIECE = 16 << 20  # one positioned read; larger ranges are split and read in parallel
READ_THREADS = 8
READ_RETRIES = 3


class NonFiniteWeightWarning(UserWarning):
    """Weights holding NaN or Inf: the checkpoint is damaged or was saved from a diverged run."""


# ----------------------------------------------------------------------------------------------
# JSON files


def read_json(file) -> dict:
    """A UTF-8 JSON object file, parsed; CheckpointError naming the file otherwise."""
    file = Path(file)
    try:
        with open_regular(file) as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_JSON_BYTES:
                raise CheckpointError(f"{file} is {size} bytes, larger than any M3 file of its "
                                      f"kind ({MAX_JSON_BYTES >> 20} MB at most); download it "
                                      "again")
            data = f.read()
        value = parse_json(data.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{file} is not UTF-8 text (byte {e.start}); download it "
                              "again") from None
    except ValueError as e:
        raise CheckpointError(f"{file} is not valid JSON ({_first_line(e)}); download it "
                              "again") from None
    except OSError as e:
        raise CheckpointError(f"{file} cannot be read ({e.strerror or e})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{file} holds a JSON {type(value).__name__}, not an object; "
                              "download it again")
    return value


def read_config(path) -> Tuple[dict, ModelArgs]:
    """config.json of a model directory and the validated ModelArgs it describes."""
    path = Path(path)
    file = path / "config.json"
    if not file.is_file():
        raise CheckpointError(f"{path} has no config.json; pass a MiniMax-M3 model directory "
                              "(or a Hub repo id)")
    config = read_json(file)
    try:
        args = ModelArgs.from_config(config)
        check_quantization(config)
    except ConfigError as e:
        raise ConfigError(f"{file}: {e}") from None
    return config, args


def read_quantization_config(path, config: dict) -> Optional[dict]:
    """The checkpoint's quantization_config: config.json's (top level, else text_config's),
    else ModelOpt's hf_quant_config.json; None for an unquantized checkpoint."""
    qc = config.get("quantization_config") or (config.get("text_config") or {}).get(
        "quantization_config")
    file = Path(path) / HF_QUANT_FILE
    if qc is None and file.is_file():
        qc = read_json(file)
        try:
            check_quantization_config(qc, where="")
        except ConfigError as e:
            raise ConfigError(f"{file}: {e}") from None
    return qc or None


def read_index(path) -> Optional[Dict[str, str]]:
    """The `weight_map` (tensor name -> shard file) of model.safetensors.index.json, or None
    when the directory has no index."""
    file = Path(path) / INDEX_FILE
    if not file.exists():
        return None
    weight_map = read_json(file).get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{file} has no weight_map object (tensor name -> shard file); "
                              "download it again")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not _plain_file_name(shard):
            raise CheckpointError(f"{file} maps {name[:80]!r} to {str(shard)[:80]!r}, not the "
                                  "name of a shard in the model directory; download it again")
    return weight_map


def _plain_file_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and not any(c in name for c in "/\\\0")


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


# ----------------------------------------------------------------------------------------------
# Tensors and byte ranges


@dataclass(frozen=True)
class ByteRange:
    file: Path
    offset: int
    nbytes: int


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors file: where its bytes are and what they mean. Rows are
    slices along the first axis: one expert of a stacked [E, out, in] tensor is one row; a
    vector or a scalar is a single row."""

    name: str
    dtype: str
    shape: Tuple[int, ...]
    file: Path
    start: int  # absolute offset of the first byte; -1 when only the header is known (the Hub)
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def rows(self) -> int:
        return self.shape[0] if len(self.shape) > 1 else 1

    @property
    def row_bytes(self) -> int:
        return self.nbytes // self.rows if self.rows else 0

    def byte_range(self, first: int = 0, count: Optional[int] = None) -> ByteRange:
        """Exactly the bytes of rows [first, first + count)."""
        count = self.rows - first if count is None else count
        if first < 0 or count < 0 or first + count > self.rows:
            raise IndexError(f"rows [{first}, {first + count}) of {self.name}, which has "
                             f"{self.rows}")
        if self.start < 0:
            raise CheckpointError(f"{self.name}: only its header is known, {self.file.name} is "
                                  "not downloaded")
        return ByteRange(self.file, self.start + first * self.row_bytes, count * self.row_bytes)

    def read(self, first: int = 0, count: Optional[int] = None) -> np.ndarray:
        """Raw bytes of rows [first, first + count) as uint8 [count, row bytes]."""
        r = self.byte_range(first, count)
        return read_ranges([r])[0].reshape(-1, max(self.row_bytes, 1))

    def read_array(self, first: int = 0, count: Optional[int] = None) -> np.ndarray:
        """Rows [first, first + count) as stored: shape [count, *shape[1:]] (a vector or a
        scalar keeps its shape); BF16 and 8-bit floats as their raw bits (uint16, uint8)."""
        return read_tensor_rows([(self, first, count)])[0]

    def read_mlx(self, first: int = 0, count: Optional[int] = None) -> mx.array:
        """Rows as an MLX array of the stored type (BF16 as bfloat16, 8-bit floats as uint8)."""
        return read_tensor_rows([(self, first, count)], to_mlx=True)[0]


def read_tensor_rows(requests: Sequence[Tuple[TensorInfo, int, Optional[int]]], *,
                     to_mlx: bool = False) -> list:
    """Rows [first, first + count) of each (tensor, first, count), all read in parallel, as
    typed numpy arrays or (to_mlx) MLX arrays; count None means to the last row."""
    ranges, shapes = [], []
    for t, first, count in requests:
        count = t.rows - first if count is None else count
        ranges.append(t.byte_range(first, count))
        shapes.append((count,) + t.shape[1:] if len(t.shape) > 1 else t.shape)
    out = []
    for (t, _, _), raw, shape in zip(requests, read_ranges(ranges), shapes):
        a = raw.view(_NUMPY[t.dtype]).reshape(shape)
        if to_mlx:
            a = mx.array(a)
            a = a.view(mx.bfloat16) if t.dtype == "BF16" else a
        out.append(a)
    return out


def read_ranges(ranges: Sequence[ByteRange]) -> List[np.ndarray]:
    """The bytes of each range as a uint8 array (a view into a page-aligned buffer).

    Each range is read from READ_ALIGN boundaries, in pieces of at most READ_PIECE bytes; the
    pieces of all ranges go to READ_THREADS reader threads at once (file reads release the GIL).
    A failing read is retried READ_RETRIES times, then reported with its file and offset."""
    out, pieces = [], []
    for r in ranges:
        lo = r.offset - r.offset % READ_ALIGN
        hi = r.offset + r.nbytes + (-(r.offset + r.nbytes) % READ_ALIGN)
        buf = _aligned_empty(hi - lo)
        out.append(buf[r.offset - lo : r.offset - lo + r.nbytes])
        for p in range(lo, hi if r.nbytes else lo, READ_PIECE):
            view = buf[p - lo : min(hi, p + READ_PIECE) - lo]
            pieces.append((r.file, p, view, min(len(view), r.offset + r.nbytes - p)))
    if len(pieces) == 1:
        _read_piece(*pieces[0])
    elif pieces:
        for _ in _pool().map(lambda piece: _read_piece(*piece), pieces):
            pass
    return out


def _aligned_empty(n: int) -> np.ndarray:
    raw = np.empty(n + READ_ALIGN, dtype=np.uint8)
    shift = -raw.ctypes.data % READ_ALIGN
    return raw[shift : shift + n]


_POOL: Optional[ThreadPoolExecutor] = None
_POOL_LOCK = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="m3mlx-checkpoint")
        return _POOL


def _read_piece(file: Path, offset: int, view: np.ndarray, required: int, direct: bool = False):
    """Fill `view` from `file` at `offset`; at least `required` bytes must exist there (the
    aligned tail past the end of the file may be short)."""
    for attempt in range(READ_RETRIES):
        try:
            got = _pread_into(file, offset, view, True) if direct else _pread_into(file, offset,
                                                                                  view)
            break
        except OSError as e:
            if attempt + 1 == READ_RETRIES:
                raise CheckpointError(
                    f"reading {file} at byte {offset} failed {READ_RETRIES} times "
                    f"({e.strerror or e}); check the disk, or download the file again") from e
            time.sleep(0.05 * 4**attempt)
    if got < required:
        raise CheckpointError(f"{file} ends at byte {offset + got}, before the {required} bytes "
                              f"wanted at byte {offset}; it is truncated or changed while "
                              "being read: download it again")


def _pread_into(file: Path, offset: int, view: np.ndarray, direct: bool = False) -> int:
    fd = _open(file, direct)
    done, target = 0, memoryview(view)
    while done < len(view):
        n = os.preadv(fd, [target[done:]], offset + done)
        if not n:
            break
        done += n
    return done


# Open files, by (path, direct): a reader that streams experts reads the same few shards
# thousands of times a second. A file replaced since is caught by `check_unchanged` (the open
# descriptor would still read the old one).
_FILES: Dict[Tuple[str, bool], int] = {}
_FILES_LOCK = threading.Lock()
_MAX_OPEN = 256


def _open(file: Path, direct: bool) -> int:
    key = (str(file), direct)
    with _FILES_LOCK:
        fd = _FILES.get(key)
        if fd is None:
            if len(_FILES) >= _MAX_OPEN:
                os.close(_FILES.pop(next(iter(_FILES))))
            fd = _FILES[key] = _open_uncached(file, direct)
        return fd


def _open_uncached(file: Path, direct: bool) -> int:
    """A read-only descriptor; `direct`: reads bypass the page cache (O_DIRECT on Linux,
    F_NOCACHE on macOS), so a benchmark measures the disk and not memory."""
    flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)
    if direct and hasattr(os, "O_DIRECT"):
        flags |= os.O_DIRECT
    fd = os.open(file, flags)
    if direct and not hasattr(os, "O_DIRECT"):
        import fcntl

        fcntl.fcntl(fd, getattr(fcntl, "F_NOCACHE", 48), 1)
    return fd


def forget_open_files(path=None):
    """Close the cached descriptors (of files under `path`, or all): after files are replaced
    on purpose, or to release them."""
    with _FILES_LOCK:
        for key in [k for k in _FILES if path is None or k[0].startswith(str(path))]:
            os.close(_FILES.pop(key))


class Reads:
    """Reads running on the reader threads; `wait()` returns when all have landed, raising
    the first failure (a CheckpointError naming the file and the offset) only once none is
    running any more: a buffer given up after a failure is never written to later."""

    def __init__(self, futures):
        self._futures = futures

    def done(self) -> bool:
        return all(f.done() for f in self._futures)

    def wait(self) -> float:
        """Wait for every read; returns the seconds from the first piece's start to the last
        piece's end (the time the disk worked on them, not the time waited)."""
        wait(self._futures)
        spans = [f.result() for f in self._futures]
        return max(e for _, e in spans) - min(s for s, _ in spans) if spans else 0.0


def read_into(ranges: Sequence[ByteRange], buffers: Sequence[np.ndarray], *,
              direct: bool = False) -> Reads:
    """Start reading each range into its buffer (writable uint8, exactly `nbytes` long),
    in pieces of at most READ_PIECE bytes spread over the reader threads; returns at once.

    Plain reads go straight into the buffers, whatever their alignment. `direct` reads skip
    the page cache: the disk needs aligned offsets, lengths and memory, so each piece is read
    from READ_ALIGN boundaries into an aligned staging buffer and copied."""
    jobs = []
    for r, buf in zip(ranges, buffers, strict=True):
        if buf.dtype != np.uint8 or buf.ndim != 1 or len(buf) != r.nbytes:
            raise ValueError(f"the buffer for {r.nbytes} bytes of {r.file} is {buf.dtype} "
                             f"{buf.shape}; it must be uint8 of exactly that length")
        for p in range(0, r.nbytes, READ_PIECE):
            jobs.append((r.file, r.offset + p, buf[p : p + READ_PIECE]))
    run = _read_direct if direct else _read_plain
    return Reads([_pool().submit(run, *job) for job in jobs])


def _read_plain(file: Path, offset: int, view: np.ndarray) -> Tuple[float, float]:
    start = time.perf_counter()
    _read_piece(file, offset, view, len(view))
    return start, time.perf_counter()


def _read_direct(file: Path, offset: int, view: np.ndarray) -> Tuple[float, float]:
    start = time.perf_counter()
    lo = offset - offset % READ_ALIGN
    hi = offset + len(view) + (-(offset + len(view)) % READ_ALIGN)
    staging = _aligned_empty(hi - lo)
    _read_piece(file, lo, staging, offset - lo + len(view), direct=True)
    view[:] = staging[offset - lo : offset - lo + len(view)]
    return start, time.perf_counter()


# ----------------------------------------------------------------------------------------------
# Safetensors headers


@dataclass(frozen=True)
class FileStamp:
    """What identifies a file's state when it was opened, to notice it changing underneath."""

    size: int
    mtime_ns: int
    inode: int
    header_sha256: str


@dataclass
class Shard:
    """One safetensors file's checked header."""

    file: Path
    tensors: Dict[str, TensorInfo]
    metadata: Dict[str, str]
    data_start: int
    stamp: FileStamp

    def check_unchanged(self, deep: bool = False):
        """Raise CheckpointError if the file was replaced, resized or touched since it was
        read (`deep`: also re-read the header and compare it byte for byte)."""
        try:
            st = os.stat(self.file)
            same = (st.st_size, st.st_mtime_ns, st.st_ino) == (
                self.stamp.size, self.stamp.mtime_ns, self.stamp.inode)
            if same and deep:
                same = _header_bytes(self.file)[1] == self.stamp.header_sha256
        except FileNotFoundError:
            raise CheckpointError(f"{self.file} is gone since it was opened (moved or deleted); "
                                  "put the model back, or load it again from where it is "
                                  "now") from None
        except OSError:
            same = False
        if not same:
            raise CheckpointError(f"{self.file} changed since it was opened (size, modification "
                                  "time or header): its tensors may have moved; load the model "
                                  "again")


def read_header(file) -> Shard:
    """Parse and check one shard's header against the file."""
    file = Path(file)
    try:
        head, digest, size, st = _header_bytes(file)
    except FileNotFoundError:
        raise CheckpointError(f"{file} is missing; download it again (or pass the complete "
                              "checkpoint)") from None
    except OSError as e:
        raise CheckpointError(f"{file} cannot be read ({e.strerror or e})") from None
    try:
        header = parse_json(head.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
        if not isinstance(header, dict):
            raise ValueError(f"the header is a JSON {type(header).__name__}, not an object")
    except ValueError as e:
        raise CheckpointError(f"{file} has a bad safetensors header ({_first_line(e)[:200]}); "
                              "the file is corrupt: download it again") from None
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and all(
            isinstance(v, str) for v in metadata.values())):
        raise CheckpointError(f"{file}: the header's __metadata__ is not a map of strings; the "
                              "file is corrupt: download it again")
    tensors = tensors_from_header(header, file, data_start=8 + len(head),
                                  data_size=size - 8 - len(head))
    stamp = FileStamp(size, st.st_mtime_ns, st.st_ino, digest)
    return Shard(file, tensors, metadata or {}, 8 + len(head), stamp)


def _header_bytes(file: Path):
    """(header JSON bytes, sha256 of length + header, file size, stat) of a safetensors file."""
    with open_regular(file) as f:
        st = os.fstat(f.fileno())
        size = st.st_size
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{file} is {size} bytes, too short for a safetensors header; "
                                  "the file is truncated: download it again")
        (n,) = struct.unpack("<Q", prefix)
        if n > MAX_HEADER_BYTES or n > size - 8:
            raise CheckpointError(f"{file} has a bad safetensors header (it claims {n} header "
                                  f"bytes in a {size}-byte file); the file is corrupt or "
                                  "truncated: download it again")
        head = f.read(n)
    return head, hashlib.sha256(prefix + head).hexdigest(), size, st


def _no_duplicate_keys(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise ValueError(f"the key {dup[:80]!r} appears twice")
    return dict(pairs)


def tensors_from_header(header: Mapping, file: Path, *, data_start: Optional[int],
                        data_size: Optional[int]) -> Dict[str, TensorInfo]:
    """Check header entries (without `__metadata__`) and place them in the file. `data_start`
    None: the entries came from elsewhere (the Hub), the bytes are not local."""
    tensors: Dict[str, TensorInfo] = {}
    spans = []
    for name, entry in header.items():
        dtype, shape, offsets = (entry.get(k) if isinstance(entry, dict) else None
                                 for k in ("dtype", "shape", "data_offsets"))
        if not (isinstance(shape, list) and all(_count(d) for d in shape)
                and isinstance(offsets, list) and len(offsets) == 2
                and all(_count(o) for o in offsets)):
            raise CheckpointError(f"{file}: the header entry for {name[:120]} is malformed "
                                  f"({json.dumps(entry)[:120]}); the file is corrupt: download "
                                  "it again")
        if not isinstance(dtype, str) or dtype not in DTYPE_SIZE:
            raise CheckpointError(f"{file}: {name[:120]} has dtype {str(dtype)[:40]}, which is "
                                  f"not a dtype m3mlx reads (known: {', '.join(DTYPE_SIZE)})")
        begin, end = offsets
        nbytes = math.prod(shape) * DTYPE_SIZE[dtype]
        if end - begin != nbytes:
            raise CheckpointError(f"{file}: {name[:120]} ({dtype} {shape}) spans bytes [{begin}, "
                                  f"{end}) of the data, not the {nbytes} its shape needs; the "
                                  "file is corrupt: download it again")
        spans.append((begin, end, name))
        start = -1 if data_start is None else data_start + begin
        tensors[name] = TensorInfo(name, dtype, tuple(shape), Path(file), start, nbytes)
    end = max((e for _, e, _ in spans), default=0)
    if data_size is not None and end > data_size:
        raise CheckpointError(f"{file} is truncated: its header needs {data_start + end} bytes, "
                              f"the file has {data_start + data_size}; download it again")
    spans = sorted(s for s in spans if s[1] > s[0])  # empty tensors occupy nothing
    for (_, prev_end, prev), (begin, _, name) in zip(spans, spans[1:]):
        if begin < prev_end:
            raise CheckpointError(f"{file}: the bytes of {name[:120]} overlap those of "
                                  f"{prev[:120]}; the file is corrupt or hostile: download it "
                                  "again")
    return tensors


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# ----------------------------------------------------------------------------------------------
# Content checks


# Exponent masks: all ones there is Inf or NaN. e4m3 has no Inf and one NaN code (S.1111.111);
# UE8M0 scales (F8_E8M0, or U8 where a format says so) have NaN 0xFF.
_EXPONENT = {"F64": (np.uint64, 0x7FF0000000000000), "F32": (np.uint32, 0x7F800000),
             "F16": (np.uint16, 0x7C00), "BF16": (np.uint16, 0x7F80), "F8_E5M2": (np.uint8, 0x7C),
             "F8_E4M3": (np.uint8, 0x7F), "F8_E8M0": (np.uint8, 0xFF)}


def has_nonfinite(raw: np.ndarray, dtype: str) -> bool:
    """Whether the stored bytes `raw` of a `dtype` tensor hold a NaN or an Inf."""
    if dtype not in _EXPONENT:
        return False
    kind, mask = _EXPONENT[dtype]
    bits = np.ascontiguousarray(raw).reshape(-1).view(np.uint8).view(kind)
    return bool(np.any((bits & kind(mask)) == kind(mask)))


def warn_nonfinite(names: Sequence[str], where):
    """One warning naming the tensors found to hold NaN or Inf (nothing when there are none)."""
    if names:
        more = ", ..." if len(names) > 4 else ""
        warnings.warn(NonFiniteWeightWarning(
            f"{len(names)} tensor(s) of {where} hold NaN or Inf values: "
            f"{', '.join(names[:4])}{more}; the checkpoint is damaged or was saved from a "
            "diverged run, and outputs will likely be NaN"), stacklevel=3)


# ----------------------------------------------------------------------------------------------
# The config against the weights, before anything is built

_LAYER = re.compile(r"(?:^|\.)model\.layers\.(\d+)\.")
_EXPERT = re.compile(r"\.block_sparse_moe\.experts\.(\d+)\.")


def check_weights_match(args: ModelArgs, shapes: Mapping[str, Sequence[int]], where):
    """Refuse a config whose layer count, layer kinds, expert count or sizes are not what the
    tensors (names and shapes, from the headers) hold, naming the field that disagrees."""
    layers, sparse, moe, experts, stacked = set(), set(), set(), set(), set()
    sized = _sized_by_config(args)
    misfits: Dict[str, Tuple[str, Sequence[int]]] = {}  # suffix -> a tensor that does not fit
    for name, shape in shapes.items():
        if is_vision(name) or is_mtp(name):
            continue
        suffix = next((s for s in sized if name.endswith(s)), None)
        if suffix is not None:
            axis, size, _ = sized[suffix]
            if len(shape) <= axis or shape[axis] != size:
                misfits.setdefault(suffix, (name, shape))
        m = _LAYER.search(name)
        if m is None:
            continue
        layer = int(m[1])
        layers.add(layer)
        if ".self_attn.index_q_proj." in name:
            sparse.add(layer)
        if ".block_sparse_moe." in name:
            moe.add(layer)
        e = _EXPERT.search(name)
        if e is not None:
            experts.add(int(e[1]))
        elif name.endswith(".switch_mlp.gate_proj.weight") and shape:
            stacked.add(shape[0])

    def disagree(what: str):
        raise CheckpointError(f"{where}/config.json says {what}; config.json and the weights "
                              "disagree: use the config.json that came with these weights")

    n = args.num_hidden_layers
    if not layers:
        raise CheckpointError(f"{where} holds no decoder layer tensors (model.layers.N.*); it "
                              "is not a MiniMax-M3 checkpoint")
    if layers != set(range(n)):
        if max(layers) + 1 == n:
            gaps = sorted(set(range(n)) - layers)
            raise CheckpointError(f"{where} has no tensors for layer(s) {gaps[:8]}; a shard is "
                                  "missing or incomplete: download the checkpoint again")
        disagree(f"num_hidden_layers={n}, but the weights hold {len(layers)} layers "
                 f"({min(layers)}-{max(layers)})")
    held = {max(experts) + 1} if experts else stacked  # per-expert names, or stacked shapes
    if moe and held and held != {args.num_local_experts}:
        disagree(f"num_local_experts={args.num_local_experts}, but the weights hold "
                 f"{'/'.join(map(str, sorted(held)))} experts per MoE layer")
    for flags, found, what, field in (
            (args.sparse_layers, sparse, "MSA layers (with index projections)",
             "sparse_attention_freq / layer_types"),
            (args.moe_layers, moe, "MoE layers", "moe_layer_freq / mlp_layer_types")):
        said = {i for i, f in enumerate(flags) if f}
        if said != found:
            disagree(f"{field} makes {_spans(said)} the {what}, but the weights have them at "
                     f"{_spans(found)}")
    for suffix, (axis, size, what) in sized.items():
        if suffix in misfits:
            name, shape = misfits[suffix]
            disagree(f"{what}, but the weights' {name} has shape {list(shape)}")


def _sized_by_config(args: ModelArgs) -> Dict[str, Tuple[int, int, str]]:
    """Tensor name suffix -> (axis, size, the fields that set it): the sizes config.json fixes
    in either layout, quantized or not (packing changes only the last axis of a matrix)."""
    D, Di = args.head_dim, args.index_head_dim
    return {
        "model.embed_tokens.weight": (0, args.vocab_size, f"vocab_size={args.vocab_size}"),
        "model.norm.weight": (0, args.hidden_size, f"hidden_size={args.hidden_size}"),
        ".self_attn.q_norm.weight": (0, D, f"head_dim={D}"),
        ".self_attn.q_proj.weight": (0, args.num_attention_heads * D,
                                     f"num_attention_heads={args.num_attention_heads} x "
                                     f"head_dim={D}"),
        ".self_attn.k_proj.weight": (0, args.num_key_value_heads * D,
                                     f"num_key_value_heads={args.num_key_value_heads} x "
                                     f"head_dim={D}"),
        ".self_attn.index_q_proj.weight": (0, args.index_n_heads * Di,
                                           f"sparse_num_index_heads={args.index_n_heads} x "
                                           f"sparse_index_dim={Di}"),
        ".self_attn.index_k_proj.weight": (0, Di, f"sparse_index_dim={Di}"),
        ".mlp.gate_proj.weight": (0, args.dense_intermediate_size,
                                  f"dense_intermediate_size={args.dense_intermediate_size}"),
        ".shared_experts.gate_proj.weight": (
            0, args.shared_intermediate_size,
            f"shared_intermediate_size={args.shared_intermediate_size}"),
        ".block_sparse_moe.gate.weight": (0, args.num_local_experts,
                                          f"num_local_experts={args.num_local_experts}"),
        ".w1.weight": (0, args.intermediate_size, f"intermediate_size={args.intermediate_size}"),
        ".switch_mlp.gate_proj.weight": (1, args.intermediate_size,
                                         f"intermediate_size={args.intermediate_size}"),
    }


def _spans(ids) -> str:
    """{0, 1, 2, 5} -> 'layers 0-2, 5'."""
    runs: List[List[int]] = []
    for i in sorted(ids):
        if runs and runs[-1][1] == i - 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    if not runs:
        return "no layers"
    return "layers " + ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs)


# ----------------------------------------------------------------------------------------------
# A model directory


def shard_files(path: Path, index: Optional[Dict[str, str]]) -> List[Path]:
    """The shards to read: those the index lists (a shard holding only vision tensors may be
    absent: m3mlx never reads them), else model*.safetensors; plus mtp.safetensors if present."""
    if index is not None:
        names = sorted(set(index.values()))
        vision_only = set(names) - {f for n, f in index.items() if not is_vision(n)}
        missing = [f for f in names if not (path / f).is_file() and f not in vision_only]
        if missing:
            raise CheckpointError(f"{path} is missing shard(s) {', '.join(missing[:4])} listed "
                                  f"in {INDEX_FILE}; download them again")
        files = [path / f for f in names if (path / f).is_file()]
    else:
        files = sorted(path.glob("model*.safetensors"))
    if (path / MTP_FILE).is_file() and path / MTP_FILE not in files:
        files.append(path / MTP_FILE)
    if not files:
        raise CheckpointError(f"{path} has no model*.safetensors weights and no {INDEX_FILE}; "
                              "download the checkpoint's weights")
    return files


@dataclass
class Checkpoint:
    """A model directory, read and checked: config, index, every shard header."""

    path: Path
    config: dict
    args: ModelArgs
    quantization_config: Optional[dict]  # as read_quantization_config finds it
    index: Optional[Dict[str, str]]  # weight_map of the index, None without one
    shards: Dict[str, Shard]  # file name -> header (empty when the headers came from the Hub)
    tensors: Dict[str, TensorInfo]

    @classmethod
    def open(cls, path, *, tensors: Optional[Dict[str, TensorInfo]] = None) -> "Checkpoint":
        """Read and check config.json, the index and every shard header, then the config
        against the tensors. `tensors` stands in for the shard headers when they were read
        elsewhere (from the Hub, before the shards are downloaded)."""
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"{path} is not a directory; pass the model directory that "
                                  "holds config.json")
        config, args = read_config(path)
        quantization_config = read_quantization_config(path, config)
        index = read_index(path)
        shards: Dict[str, Shard] = {}
        if tensors is None:
            tensors = {}
            for f in shard_files(path, index):
                shard = shards[f.name] = read_header(f)
                clash = shard.tensors.keys() & tensors.keys()
                if clash:
                    raise CheckpointError(f"{f} repeats tensor(s) of another shard, e.g. "
                                          f"{sorted(clash)[:3]}; the checkpoint is "
                                          "inconsistent: download it again")
                tensors.update(shard.tensors)
            if index is not None:
                _check_index(path, index, shards)
        check_weights_match(args, {n: t.shape for n, t in tensors.items()}, path)
        return cls(path, config, args, quantization_config, index, shards, tensors)

    @property
    def files(self) -> List[Path]:
        return [s.file for s in self.shards.values()]

    @property
    def disk_bytes(self) -> int:
        return sum(s.stamp.size for s in self.shards.values())

    def tensor(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.path} has no tensor {name}") from None

    def check_unchanged(self, deep: bool = False):
        """Raise CheckpointError if a shard changed since the checkpoint was opened: for
        long-running readers (expert streaming) before trusting the offsets they hold."""
        for shard in self.shards.values():
            shard.check_unchanged(deep)


def _check_index(path: Path, index: Dict[str, str], shards: Dict[str, Shard]):
    wrong = [n for n, f in index.items() if f in shards and n not in shards[f].tensors]
    if wrong:
        raise CheckpointError(f"{path / INDEX_FILE} places {len(wrong)} tensor(s) in shards that "
                              f"do not hold them, e.g. {wrong[:3]}; the index and the shards "
                              "disagree: download the checkpoint again")
