"""The K/V memory tier: a bounded pool of resident K/V blocks per MSA layer, the rest on the SSD.

A decode step of an MSA layer reads only the blocks its KV heads selected (16 of 128 tokens
each), so the whole K/V need not be resident. A `KVTier` holds, for each MSA layer, a pool of
block slots per lane (batch row x KV head) sized so that all pools together stay within the
memory limit; the other blocks of the context live in one file per session in the cache
directory, each written once (when first evicted) as one record aligned to 16 KiB and read back
by byte range through the checkpoint reader (`checkpoint.read_ranges`). Dense-attention layers
read all of their K/V every step, so they are never tiered.

One call of a tiered layer:

1. `write`: the step's K/V rows go into slots of the pool; a block that must leave is written
   to the file first (unless it already is there: records are immutable).
2. `sparse_attention`: the selection is read back (only the index branch is computed for it),
   the selected blocks not resident are read from the file in parallel threads, and while
   they are read MLX computes the layer's projections; then the blocks land in free or evicted
   slots and the attention op reads the pool through a slot table (`slots=`). A prefill chunk
   whose blocks do not all fit runs in groups of queries that do.

The math never changes with the tier: every selected block is attended to, from the same
values, so outputs are identical to those of the untiered cache (tests hold them bit-equal).
Resident K/V stay within the limit, plus one step's selected blocks when the limit is smaller
than what one step needs (the pool never has fewer than `minimum_slots` per lane).

Which blocks stay is a `Policy`: the attention sinks (leading blocks), the most recent blocks,
and then least recently selected, least often selected or oldest position first; the partial
newest block is always resident. `simulate` replays a trace of selections through a policy to
compare miss rates (benchmarks/bench_kv.py).

On a sharded model (m3mlx.sharding) each rank's cache has a tier of its own: for the KV heads
(tensor plan) or the layers (pipeline plan) the rank holds, within that rank's limit, with its
file in a subdirectory of its own. Each KV head's selection is computed on the rank that holds
it, so the tier needs nothing from the other ranks.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import threading
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np

from .checkpoint import READ_ALIGN, ByteRange, read_ranges
from .checks import InputError
from .defaults import home_dir
from .errors import CheckpointError
from .files import create_exclusive
from .metal_kernels import QuantizedKV, sparse_attention
from .metal_kernels.kv import group_size_for, kv_row_bytes
from .units import parse_size

RECORD_ALIGN = READ_ALIGN  # records start and end on the reader's 16 KiB boundaries


class KVCacheError(RuntimeError):
    """The K/V cache directory cannot take the session's blocks: what, and what to do."""


def kv_group_size(args, kv_bits: Optional[int]) -> Optional[int]:
    """The group size of the model's compact K/V rows at kv_bits (None for float K/V);
    InputError when its head_dim cannot be stored that way."""
    if kv_bits in (None, 16):
        return None
    try:
        return group_size_for(kv_bits, args.head_dim)
    except ValueError as e:
        raise InputError(f"{e}; keep K/V in the activation dtype (kv_bits=None, --kv-bits 16) "
                         "with this model") from None


def kv_cache_dir(directory=None, rank: Optional[int] = None) -> Path:
    """Where sessions keep the K/V blocks that are not resident: $M3MLX_HOME/kv by default;
    rank R of a sharded run in its subdirectory rank-R (ranks on one machine keep apart, and
    each Mac of several uses its own disk)."""
    path = Path(directory).expanduser() if directory is not None else home_dir() / "kv"
    return path if rank is None else path / f"rank-{rank}"


# ---------------------------------------------------------------------------------------------
# Residency: which blocks hold a slot, and which one leaves next
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Policy:
    """Which resident block to evict: never one of the `sinks` first blocks or the `recent`
    last ones while another is evictable, then by `order`: "lru" (least recently selected),
    "lfu" (least often selected since it came in, then least recently) or "position"
    (the oldest position)."""

    name: str
    order: str
    sinks: int = 0
    recent: int = 0


POLICIES = {p.name: p for p in (
    Policy("lru", "lru"),
    Policy("lfu", "lfu"),
    Policy("window", "position", sinks=1, recent=2),
    Policy("sinks-lru", "lru", sinks=1),
    Policy("recent-lru", "lru", recent=2),
    Policy("sinks-recent-lru", "lru", sinks=1, recent=2),
    Policy("sinks-recent-lfu", "lfu", sinks=1, recent=2),
)}
DEFAULT_POLICY = "sinks-recent-lru"


def get_policy(name: Optional[str]) -> Policy:
    name = DEFAULT_POLICY if name is None else name
    if name not in POLICIES:
        raise InputError(f"kv_policy={name!r}: choose one of {', '.join(POLICIES)}")
    return POLICIES[name]


class Residency:
    """The slot table of one layer's pool: `owner[lane, slot]` is the block a slot holds (-1:
    free) and `slot[lane, block]` the slot a block is in (-1: not resident); a clock, pins and
    use counts for the policy. Pure bookkeeping, shared by the live tier and `simulate`."""

    def __init__(self, lanes: int, capacity: int, policy: Policy):
        self.policy = policy
        self.owner = np.full((lanes, capacity), -1, np.int64)
        self.used = np.zeros((lanes, capacity), np.int64)
        self.uses = np.zeros((lanes, capacity), np.int64)
        self.pinned = np.zeros((lanes, capacity), bool)
        self.slot = np.full((lanes, 0), -1, np.int64)
        self.clock = 0

    @property
    def capacity(self) -> int:
        return self.owner.shape[1]

    def cover(self, n_blocks: int):
        """Make the block table reach n_blocks blocks."""
        have = self.slot.shape[1]
        if n_blocks > have:
            grow = max(n_blocks, 2 * have) - have
            self.slot = np.pad(self.slot, ((0, 0), (0, grow)), constant_values=-1)

    def grow(self, capacity: int):
        extra = capacity - self.capacity
        if extra > 0:
            pad = ((0, 0), (0, extra))
            self.owner = np.pad(self.owner, pad, constant_values=-1)
            self.used, self.uses = np.pad(self.used, pad), np.pad(self.uses, pad)
            self.pinned = np.pad(self.pinned, pad)

    def begin(self):
        """A new call: nothing is pinned, uses from now on are newer."""
        self.clock += 1
        self.pinned[:] = False

    def free(self, lane: int, blocks: np.ndarray):
        """Forget the residency of `blocks` of a lane (trimmed away)."""
        blocks = blocks[blocks < self.slot.shape[1]]
        slots = self.slot[lane, blocks]
        slots = slots[slots >= 0]
        self.owner[lane, slots] = -1
        self.slot[lane, blocks] = -1

    def use(self, lane: int, slots: np.ndarray):
        self.used[lane, slots] = self.clock
        self.uses[lane, slots] += 1
        self.pinned[lane, slots] = True

    def place(self, lane: int, blocks: np.ndarray, newest: int, partial: int):
        """Slots for `blocks` (none resident) of `lane`: free ones first, then the policy's
        victims in order. Returns (slots, evicted blocks with -1 for free slots), all pinned,
        or None when fewer slots than blocks can be had (the rest are pinned or hold the
        partial block)."""
        k = len(blocks)
        owner = self.owner[lane]
        free = np.flatnonzero(owner < 0)[:k]
        slots, victims = free, np.full(len(free), -1, np.int64)
        if len(free) < k:
            movable = np.flatnonzero(~self.pinned[lane] & (owner != partial) & (owner >= 0))
            if len(movable) < k - len(free):
                return None
            p = self.policy
            held = owner[movable]
            kept = (held < p.sinks) | (held > newest - p.recent)
            if p.order == "position":
                keys = (held, kept)
            elif p.order == "lfu":
                keys = (held, self.used[lane, movable], self.uses[lane, movable], kept)
            else:
                keys = (held, self.used[lane, movable], kept)
            chosen = movable[np.lexsort(keys)[:k - len(free)]]
            slots = np.concatenate([free, chosen])
            victims = np.concatenate([victims, owner[chosen]])
            self.slot[lane, owner[chosen]] = -1
        owner[slots] = blocks
        self.slot[lane, blocks] = slots
        self.used[lane, slots] = self.clock
        self.uses[lane, slots] = 1
        self.pinned[lane, slots] = True
        return slots, victims


def simulate(trace: Iterable[Tuple[int, np.ndarray]], *, lanes: int, capacity: int,
             block_size: int, policy: Policy) -> dict:
    """Replay decode steps through a pool of `capacity` slots per lane under `policy`, as the
    tier runs them: each step is (its token's position, selection [lanes, topk] of block ids
    with -1 padding); the token's block is written (placed if new), then the selected blocks
    are used, each one not resident read in. Returns the selected blocks other than the own
    block, the misses among them, and the miss rate."""
    res = Residency(lanes, capacity, policy)
    selected = misses = 0
    for position, sel in trace:
        newest = position // block_size
        partial = newest if (position + 1) % block_size else -1
        res.cover(newest + 1)
        res.begin()
        for lane in range(lanes):
            if res.slot[lane, newest] >= 0:
                res.use(lane, res.slot[lane, [newest]])
            else:
                res.place(lane, np.array([newest]), newest, partial)
            wanted = np.unique(sel[lane][sel[lane] >= 0])
            wanted = wanted[wanted != newest]
            slots = res.slot[lane, wanted]
            res.use(lane, slots[slots >= 0])
            missed = wanted[slots < 0]
            selected += len(wanted)
            misses += len(missed)
            if len(missed) and res.place(lane, missed, newest, partial) is None:
                raise ValueError(f"a pool of {capacity} slots cannot hold one step's selection")
    return {"selected": selected, "misses": misses,
            "miss_rate": misses / selected if selected else 0.0}


# ---------------------------------------------------------------------------------------------
# The session's block file
# ---------------------------------------------------------------------------------------------


class BlockFile:
    """One session's file of evicted blocks: fixed-size records, each written once by a
    background thread, read by byte range; removed when the session ends."""

    def __init__(self, directory: Path, record_bytes: int):
        self.directory = directory
        self.record_bytes = record_bytes
        try:
            directory.mkdir(parents=True, exist_ok=True)
            self.path = directory / f"session-{os.getpid()}-{secrets.token_hex(6)}.kv"
            self.fd = create_exclusive(self.path, os.O_RDWR)
        except OSError as e:
            raise KVCacheError(f"cannot write K/V blocks in {directory} ({e.strerror or e}): "
                               "choose a writable directory (--kv-cache-dir)") from None
        self.size = 0
        self._pending: Dict[int, np.ndarray] = {}
        self._lock = threading.Lock()
        self._error: Optional[BaseException] = None
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="m3mlx-kv-writer")
        self._finalizer = weakref.finalize(self, _remove_file, self.fd, self.path, self._writer)

    def append(self, record: np.ndarray) -> int:
        """Queue one record (uint8, record_bytes long); returns its offset."""
        self.check()
        offset = self.size
        self.size += self.record_bytes
        with self._lock:
            self._pending[offset] = record
        self._writer.submit(self._write, offset, record)
        return offset

    def _write(self, offset: int, record: np.ndarray):
        try:
            view = memoryview(record).cast("B")
            done = 0
            while done < len(view):
                done += os.pwrite(self.fd, view[done:], offset + done)
        except OSError as e:
            self._error = e
            return
        with self._lock:
            self._pending.pop(offset, None)

    def read(self, offsets: Sequence[int]) -> List[np.ndarray]:
        """The records at `offsets` (still queued ones from memory), read in parallel."""
        self.check()
        out: List[Optional[np.ndarray]] = []
        wanted = []
        with self._lock:
            for off in offsets:
                out.append(self._pending.get(off))
                if out[-1] is None:
                    wanted.append(off)
        try:
            got = iter(read_ranges([ByteRange(self.path, off, self.record_bytes)
                                    for off in wanted]))
        except CheckpointError as e:
            raise KVCacheError(f"reading K/V blocks back from {self.path} failed: "
                               f"{str(e).split(';')[0]}; check the disk") from None
        return [rec if rec is not None else next(got) for rec in out]

    def check(self):
        """Raise the error a background write met, if one did."""
        e = self._error
        if e is None:
            return
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise KVCacheError(f"the K/V cache directory {self.directory} is full after "
                               f"{_gb(self.size)} of this session's blocks: free some space, "
                               "choose another --kv-cache-dir or raise --kv-memory") from None
        raise KVCacheError(f"writing K/V blocks to {self.path} failed "
                           f"({getattr(e, 'strerror', None) or e})") from None

    def flush(self):
        self._writer.submit(lambda: None).result()
        self.check()

    def close(self):
        self._finalizer()


def _remove_file(fd: int, path: Path, writer: ThreadPoolExecutor):
    # Garbage collection can drop the file's last reference on a writer thread (a finished
    # write held it). Nothing of this file is queued then, and a thread cannot wait for itself.
    on_writer = threading.current_thread().name.startswith("m3mlx-kv-writer")
    writer.shutdown(wait=not on_writer)
    try:
        os.close(fd)
    finally:
        path.unlink(missing_ok=True)


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


# ---------------------------------------------------------------------------------------------
# The tier and its layers
# ---------------------------------------------------------------------------------------------


@dataclass
class TierStats:
    """Counts since the tier was made: blocks selected while resident (hits) or not (misses,
    each one block read back), blocks written to the file, and the bytes of both."""

    hits: int = 0
    misses: int = 0
    written: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    calls: int = 0
    peak_resident: int = 0  # bytes: the most the pools held at once

    @property
    def miss_rate(self) -> float:
        total = self.hits + self.misses
        return self.misses / total if total else 0.0


@dataclass
class KVTier:
    """The memory limit shared by the MSA layers of one cache, their block file and counts.

    limit: bytes of K/V the MSA layers may keep resident, all pools together; layers: how many
    MSA layers share it; topk, block_size: the model's MSA geometry (a call needs topk blocks
    per lane); directory: where the session's file goes; policy: a POLICIES name."""

    limit: int
    layers: int
    topk: int
    block_size: int
    block_bytes: int  # one block of one lane's K and V, as stored (to plan before any write)
    heads: int  # KV heads: lanes per batch row
    directory: Path = field(default_factory=kv_cache_dir)
    policy: Policy = field(default_factory=lambda: POLICIES[DEFAULT_POLICY])
    stats: TierStats = field(default_factory=TierStats)

    def __post_init__(self):
        self._file: Optional[BlockFile] = None
        # Weak: a tier lives as long as its layers do (then its file is removed).
        self._members: "weakref.WeakSet[TieredKV]" = weakref.WeakSet()
        self.directory = kv_cache_dir(self.directory)
        _probe_writable(self.directory)

    @classmethod
    def for_model(cls, args, kv_memory, *, kv_bits: Optional[int] = None,
                  dtype: mx.Dtype = mx.bfloat16, directory=None, policy: Optional[str] = None,
                  layers: Optional[int] = None, heads: Optional[int] = None):
        """The tier for a model's MSA layers: kv_memory bytes (or a size such as "8GB") of
        their K/V, stored at kv_bits, computed in `dtype`. `layers` and `heads`: the MSA layers
        and KV heads the cache holds when it is one rank's part of a sharded model (default:
        the whole model's); the limit is then that rank's."""
        limit = parse_size(kv_memory, "kv_memory")
        if not any(args.sparse_layers):
            raise InputError("kv_memory limits the K/V of sparse-attention layers, and this "
                             "model has none")
        row = 2 * kv_row_bytes(args.head_dim, kv_bits, kv_group_size(args, kv_bits), dtype)
        return cls(limit, sum(bool(s) for s in args.sparse_layers) if layers is None else layers,
                   args.index_topk_blocks, args.index_block_size, args.index_block_size * row,
                   args.num_key_value_heads if heads is None else heads,
                   kv_cache_dir(directory), get_policy(policy))

    def layer(self) -> "TieredKV":
        """The tiered K/V of one more MSA layer."""
        member = TieredKV(self)
        self._members.add(member)
        return member

    def file(self, record_bytes: int) -> BlockFile:
        if self._file is None:
            self._file = BlockFile(self.directory, record_bytes)
        if self._file.record_bytes != record_bytes:
            raise InputError("one K/V tier serves layers of one K/V format")
        return self._file

    def minimum_slots(self) -> int:
        """The fewest slots per lane a call can work with: a step's selection and its block."""
        return self.topk + 1

    def slots_for(self, lanes: int, block_bytes: int) -> int:
        """Slots per lane for each layer's pool within the limit (at least minimum_slots)."""
        fit = self.limit // max(1, self.layers * lanes * block_bytes)
        return max(int(fit), self.minimum_slots())

    @property
    def resident_nbytes(self) -> int:
        return sum(m.resident_nbytes for m in self._members)

    def note_resident(self):
        self.stats.peak_resident = max(self.stats.peak_resident, self.resident_nbytes)

    @property
    def file_nbytes(self) -> int:
        return self._file.size if self._file is not None else 0

    def check_room(self, positions: int, batch: int = 1):
        """KVCacheError unless the cache directory can take what a context of `positions`
        tokens puts there beyond the resident pools."""
        lanes = batch * self.heads
        blocks = -(-positions // self.block_size)
        per_lane = max(0, blocks - self.slots_for(lanes, self.block_bytes))
        need = self.layers * lanes * per_lane * _aligned(self.block_bytes) - self.file_nbytes
        free = shutil.disk_usage(self.directory).free
        if need > free:
            raise KVCacheError(
                f"the K/V cache directory {self.directory} has {_gb(free)} free; a context of "
                f"{positions:,} tokens needs about {_gb(need)} more there with kv_memory="
                f"{_gb(self.limit)}: free space, choose another --kv-cache-dir or raise "
                "--kv-memory")

    def close(self):
        if self._file is not None:
            self._file.close()


def _probe_writable(directory: Path):
    """KVCacheError now, before any work, when the directory cannot take a file."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".probe-{os.getpid()}-{secrets.token_hex(4)}"
        os.close(create_exclusive(probe))
        probe.unlink()
    except OSError as e:
        raise KVCacheError(f"cannot write K/V blocks in {directory} ({e.strerror or e}): "
                           "choose a writable directory (--kv-cache-dir)") from None


def _aligned(n: int) -> int:
    return -(-n // RECORD_ALIGN) * RECORD_ALIGN


class TieredKV:
    """One MSA layer's K/V in the tier: a pool of `capacity` block slots per lane, in memory,
    and the records of evicted blocks in the session file.

    The pool is one array per stored array of K and V (codes, scales, biases when compact):
    [lanes * capacity * block, width], slot s of lane l at rows (l * capacity + s) * block; the
    ops see it as [B, H, capacity * block, width]."""

    def __init__(self, tier: KVTier):
        self.tier = tier
        self.block = tier.block_size
        self.pool: List[mx.array] = []
        self.res: Optional[Residency] = None
        self.disk = np.full((0, 0), -1, np.int64)  # record offset of each (lane, block), or -1
        self.block_bytes = 0
        self.length = 0  # positions held
        self._fresh: tuple = ()  # the last write's rows, computed while blocks are read

    # -- layout --------------------------------------------------------------------------------

    def _allocate(self, keys, values):
        """The pool, for the first rows written (their batch, heads, widths and dtypes)."""
        B, H = keys.shape[:2]
        self.B, self.H, self.lanes = B, H, B * H
        self.dims = (keys.shape[3], values.shape[3])
        self.compact = isinstance(keys, QuantizedKV)
        if self.compact:
            self.format = (keys.bits, keys.group_size)
        parts = [*_arrays(keys), *_arrays(values)]
        self.widths = [a.shape[-1] for a in parts]
        self.dtypes = [a.dtype for a in parts]
        self.block_bytes = self.block * sum(w * d.size for w, d in zip(self.widths, self.dtypes))
        self.tier.block_bytes = self.block_bytes  # as stored (the plan assumed the model's dtype)
        capacity = self.tier.slots_for(self.lanes, self.block_bytes)
        self.res = Residency(self.lanes, capacity, self.tier.policy)
        self.pool = [mx.zeros((self.lanes * capacity * self.block, w), d)
                     for w, d in zip(self.widths, self.dtypes)]
        self.tier.note_resident()

    @property
    def capacity(self) -> int:
        return self.res.capacity if self.res is not None else 0

    @property
    def head_shape(self) -> Optional[tuple]:
        return (self.H, *self.dims) if self.res is not None and self.length else None

    @property
    def resident_nbytes(self) -> int:
        return sum(a.nbytes for a in self.pool)

    def nbytes(self, positions: int) -> int:
        """Bytes of the K/V of `positions` positions, resident or not."""
        return self.lanes * positions * self.block_bytes // self.block if self.res else 0

    def _views(self):
        """The pool as the ops read it: K and V [B, H, capacity * block, width]."""
        shaped = [a.reshape(self.B, self.H, -1, a.shape[-1]) for a in self.pool]
        half = len(shaped) // 2
        if self.compact:
            bits, group = self.format
            return (QuantizedKV(*shaped[:half], bits, group),
                    QuantizedKV(*shaped[half:], bits, group))
        return shaped[0], shaped[1]

    def _grow(self, capacity: int):
        """More slots per lane (a prefill chunk that needs more than the limit allows)."""
        old = self.capacity
        self.res.grow(capacity)
        pad = (capacity - old) * self.block
        self.pool = [mx.pad(a.reshape(self.lanes, old * self.block, -1), [(0, 0), (0, pad), (0, 0)])
                     .reshape(self.lanes * capacity * self.block, -1) for a in self.pool]
        self.tier.note_resident()

    def _cover(self, n_blocks: int):
        self.res.cover(n_blocks)
        if self.disk.shape[1] < self.res.slot.shape[1]:
            self.disk = np.pad(self.disk, ((0, self.lanes - self.disk.shape[0]),
                                           (0, self.res.slot.shape[1] - self.disk.shape[1])),
                               constant_values=-1)

    def _rows(self, lane: int, slot: int) -> int:
        return (lane * self.capacity + slot) * self.block

    # -- placing blocks ------------------------------------------------------------------------

    def _newest(self) -> Tuple[int, int]:
        """(newest block, the partial block that must stay resident or -1)."""
        newest = max(self.length - 1, 0) // self.block
        return newest, newest if self.length % self.block else -1

    def _admit(self, wanted: Dict[int, np.ndarray], extra_room: int = 0):
        """Make the blocks wanted[lane] resident and pinned: returns the misses
        [(lane, block, slot)] to read and the victims [(lane, block, slot)] to write out."""
        newest, partial = self._newest()
        misses, victims = [], []
        for lane, blocks in wanted.items():
            blocks = np.asarray(blocks, np.int64)
            slots = self.res.slot[lane, blocks]
            self.res.use(lane, slots[slots >= 0])  # pinned first: no miss may evict a hit
            missed = blocks[slots < 0]
            if not len(missed):
                continue
            placed = self.res.place(lane, missed, newest, partial)
            if placed is None:  # one call needs more than the pool: it grows
                self._grow(self.capacity + max(extra_room, len(missed)))
                placed = self.res.place(lane, missed, newest, partial)
            for b, slot, victim in zip(missed.tolist(), *(x.tolist() for x in placed)):
                if victim >= 0 and self.disk[lane, victim] < 0:
                    victims.append((lane, victim, slot))
                misses.append((lane, b, slot))
        return misses, victims

    def _write_out(self, victims):
        """Copy each victim's rows out of the pool and queue them to the file, before their
        slots are overwritten."""
        if not victims:
            return
        file = self.tier.file(_aligned(self.block_bytes))
        rows = mx.array([self._rows(lane, slot) for lane, _, slot in victims])[:, None]
        rows = rows + mx.arange(self.block)[None]
        parts = [np.array(a[rows]) for a in self.pool]  # [victims, block, width] each
        for i, (lane, block, _) in enumerate(victims):
            record = np.zeros(file.record_bytes, np.uint8)
            at = 0
            for part in parts:
                raw = np.ascontiguousarray(part[i]).view(np.uint8).reshape(-1)
                record[at:at + raw.size] = raw
                at += raw.size
            self.disk[lane, block] = file.append(record)
        self.tier.stats.written += len(victims)
        self.tier.stats.bytes_written += len(victims) * file.record_bytes

    def _read(self, misses) -> Future:
        """Start reading the missed blocks' records (those of blocks never evicted: none)."""
        future: Future = Future()
        offsets = [int(self.disk[lane, b]) for lane, b, _ in misses]
        if any(off < 0 for off in offsets):
            raise RuntimeError("a tiered block is neither resident nor in the file")
        if not misses:
            future.set_result([])
            return future
        file = self.tier.file(_aligned(self.block_bytes))
        self.tier.stats.misses += len(misses)
        self.tier.stats.bytes_read += len(misses) * file.record_bytes
        return _READER.submit(file.read, offsets)

    def _fill(self, misses, records: List[np.ndarray]):
        """Scatter records into their slots."""
        if not misses:
            return
        rows = mx.array([self._rows(lane, slot) for lane, _, slot in misses])[:, None]
        rows = (rows + mx.arange(self.block)[None]).reshape(-1)
        for i, blocks in enumerate(self._unpack(records)):
            self.pool[i][rows] = blocks.reshape(-1, blocks.shape[-1])

    def _unpack(self, records: List[np.ndarray]) -> List[mx.array]:
        """Records as each stored array's blocks: [len(records), block, width] per array."""
        data = np.stack(records)
        out, at = [], 0
        for w, d in zip(self.widths, self.dtypes):
            n = self.block * w * d.size
            part = np.ascontiguousarray(data[:, at:at + n])
            out.append(mx.array(part).view(d).reshape(len(records), self.block, w))
            at += n
        return out

    # -- the cache's calls ---------------------------------------------------------------------

    def write(self, start: int, keys, values):
        """Store rows [start, start + L) of K and V (as the cache stores them)."""
        if self.res is None:
            self._allocate(keys, values)
        L = keys.shape[2]
        self.res.begin()
        first, last = start // self.block, (start + L - 1) // self.block
        self.length = max(self.length, start + L)
        self._cover(last + 1)
        blocks = np.arange(first, last + 1)
        misses, victims = self._admit({lane: blocks for lane in range(self.lanes)},
                                      extra_room=last - first + self.tier.topk)
        self._write_out(victims)
        # A block being written may only be on disk (a partial block evicted after a trim
        # left it): read it back before its new rows land.
        old = [m for m in misses if self.disk[m[0], m[1]] >= 0]
        self._fill(old, self._read(old).result())
        self.disk[:, first:last + 1] = -1  # their records, if any, are stale now
        slots = self.res.slot[:, first:last + 1]  # [lanes, blocks]
        pos = np.arange(start, start + L)
        rows = (np.arange(self.lanes)[:, None] * self.capacity + slots[:, pos // self.block - first]
                ) * self.block + pos % self.block
        rows = mx.array(rows.reshape(-1))
        self._fresh = (*_arrays(keys), *_arrays(values))
        for i, a in enumerate(self._fresh):
            self.pool[i][rows] = a.reshape(self.lanes * L, -1)

    def write_all(self, keys, values):
        """Store K and V rows from position 0 (a loaded cache), a pool's worth of blocks at a
        time, so that earlier blocks go to the file as later ones come in."""
        n = keys.shape[2]
        if self.res is None:
            self._allocate(keys, values)
        step = max(1, self.capacity - self.tier.topk) * self.block
        for start in range(0, n, step):
            stop = min(n, start + step)
            self.write(start, *(_rows(x, start, stop) for x in (keys, values)))
            mx.eval(self.pool)

    def sparse_attention(self, q, selection, offset: int, scale: float, block_size: int):
        sel = np.array(selection)  # computes the index branch only; the projections wait
        B, H, L, k = sel.shape
        lanes = sel.reshape(self.lanes, L, k)
        written = self.res.pinned.copy()  # the call's own blocks, from `write`
        outs = []
        groups = list(self._groups(lanes))
        for i, (r0, r1) in enumerate(groups):
            self.res.pinned[:] = False
            self.res.pinned[:, :written.shape[1]] = written  # (the pool may have grown)
            part = lanes[:, r0:r1]
            wanted = {lane: np.unique(g[g >= 0]) for lane, g in enumerate(part)}
            misses, victims = self._admit(wanted)
            reading = self._read(misses)
            self._write_out(victims)
            if i == 0:  # the layer's projections run while the blocks are read
                mx.async_eval(q, *self._fresh)
            self._fill(misses, reading.result())
            self.tier.stats.hits += sum(len(w) for w in wanted.values()) - len(misses)
            slots = np.take_along_axis(self.res.slot, np.maximum(part, 0).reshape(self.lanes, -1),
                                       axis=1).reshape(part.shape)
            slots = np.where(part >= 0, slots, -1)
            keys, values = self._views()
            out = sparse_attention(
                q[:, :, r0:r1], keys, values, mx.array(part.reshape(B, H, -1, k)),
                offset=offset + r0, scale=scale, block_size=block_size,
                slots=mx.array(slots.reshape(B, H, -1, k).astype(np.int32)))
            if len(groups) > 1:
                mx.eval(out)  # before the next group's blocks take these slots
            outs.append(out)
        self._fresh = ()
        self.tier.stats.calls += 1
        return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=2)

    def _groups(self, lanes: np.ndarray, align: int = 1):
        """Query ranges whose selected blocks fit the pool next to the pinned ones, cut at
        multiples of `align`; a run that does not fit on its own makes the pool grow. (A
        query's result does not depend on the others of its call, on the twin and in the
        kernels alike, so any cut gives the same bits.)"""
        L = lanes.shape[1]
        room = self.capacity - self.res.pinned.sum(axis=1)  # per lane
        pinned = [set(self.res.owner[lane][self.res.pinned[lane]].tolist())
                  for lane in range(self.lanes)]

        def needs(rows) -> list:
            return [set(np.unique(rows[lane][rows[lane] >= 0]).tolist()) - pinned[lane]
                    for lane in range(self.lanes)]

        if all(len(n) <= r for n, r in zip(needs(lanes), room)):
            yield 0, L
            return
        start, seen = 0, [set() for _ in range(self.lanes)]
        for t0 in range(0, L, align):
            unit = needs(lanes[:, t0:t0 + align])
            if t0 > start and any(len(s | u) > r for s, u, r in zip(seen, unit, room)):
                yield start, t0
                start, seen = t0, [set() for _ in range(self.lanes)]
            seen = [s | u for s, u in zip(seen, unit)]
        yield start, L

    def in_order(self, length: int):
        """K and V rows [0, length) in position order ([B, H, length, width]), gathered from
        the pool and, for blocks not resident, the file (which does not change what stays)."""
        n_blocks = -(-length // self.block)
        rows = np.zeros((self.lanes, n_blocks), np.int64)
        absent = []
        for lane in range(self.lanes):
            slots = self.res.slot[lane, :n_blocks]
            rows[lane] = np.where(slots >= 0, (lane * self.capacity + np.maximum(slots, 0))
                                  * self.block, 0)
            absent += [(lane, int(b)) for b in np.flatnonzero(slots < 0)]
        index = mx.array((rows[:, :, None] + np.arange(self.block)).reshape(-1))
        parts = [a[index].reshape(self.lanes * n_blocks, self.block, -1) for a in self.pool]
        if absent:
            records = self.tier.file(_aligned(self.block_bytes)).read(
                [int(self.disk[lane, b]) for lane, b in absent])
            where = mx.array([lane * n_blocks + b for lane, b in absent])
            for i, block in enumerate(self._unpack(records)):
                parts[i][where] = block
        parts = [p.reshape(self.B, self.H, -1, p.shape[-1])[:, :, :length] for p in parts]
        half = len(parts) // 2
        if self.compact:
            bits, group = self.format
            return QuantizedKV(*parts[:half], bits, group), QuantizedKV(*parts[half:], bits, group)
        return parts[0], parts[1]

    def trim(self, length: int):
        """Keep positions [0, length): later blocks are forgotten; a block cut in the middle
        becomes the partial newest one, resident, its record stale."""
        if self.res is None:
            return
        keep = -(-length // self.block)
        for lane in range(self.lanes):
            self.res.free(lane, np.arange(keep, self.res.slot.shape[1]))
        self.disk[:, keep:] = -1
        self.length = length
        if length % self.block:
            cut = keep - 1
            self.res.begin()
            misses, victims = self._admit({lane: np.array([cut]) for lane in range(self.lanes)})
            self._write_out(victims)
            self._fill(misses, self._read(misses).result())
            self.disk[:, cut] = -1


_READER = ThreadPoolExecutor(1, thread_name_prefix="m3mlx-kv-reader")


def _arrays(x) -> tuple:
    return x.arrays if isinstance(x, QuantizedKV) else (x,)


def _rows(x, start: int, stop: int):
    return x.rows(start, stop) if isinstance(x, QuantizedKV) else x[..., start:stop, :]


def tiers_of(cache: Sequence) -> List[KVTier]:
    """The distinct tiers a list of layer caches uses."""
    seen = []
    for c in cache:
        t = getattr(getattr(c, "tiered", None), "tier", None)
        if t is not None and all(t is not s for s in seen):
            seen.append(t)
    return seen


def check_cache_room(cache: Sequence, positions: int, batch: int = 1):
    """KVCacheError unless every tier of `cache` has disk room for `positions` tokens."""
    for tier in tiers_of(cache):
        tier.check_room(positions, batch)
