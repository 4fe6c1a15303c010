"""Routed experts streamed from the SSD through pools of expert slots: a memory tier.

M3's routed experts are 96% of its weights and a token uses 4 of 128 per layer. With an expert
cache everything else loads as usual, and each MoE layer keeps S of its E experts in a pool of
slots: one preallocated array [S, ...] per expert tensor (`switch_mlp.gate_proj.weight`, its
scales, ...) and a table, expert id -> slot. Once a layer's router has chosen, the tier reads the
experts the pool lacks from the converted safetensors, exactly their byte ranges (one row of
each stacked tensor), on the reader threads, straight into free slots; the MoE op then runs over
the pool through the table (`moe_experts(..., slots=table)`). Streaming changes where bytes
live, not the math: outputs are the resident model's.

Synchronisations. The router's choice has to reach the CPU before its experts can be read, so a
streamed layer costs one GPU->CPU sync: evaluating its expert ids. The same evaluation finishes
every computation built over slots since the previous sync (the "fences"), so a slot is never
overwritten while a pending computation reads it, and it also evaluates the next layer's router
on this layer's input, a prediction of what the next layer will pick: those experts are read
ahead while this layer and the next attention compute (prefetch).

Prefill. A chunk's tokens need many experts at once: each layer reads every expert the chunk
needs once. When they are more than the layer's slots, the layer runs in passes, as many
experts per pass as fit; each pass computes its rows exactly as one pass would, and the rows
are combined at the end.

Policies (which resident expert gives up its slot): `lru`, `lfu` (a frequency with a half-life
of HALF_LIFE calls, so that what a conversation uses now outweighs what it used long ago), and
`pinned`: the experts a calibration run used most (`m3mlx calibrate-experts`, USAGE_FILE next to
the model) keep PIN_SHARE of the slots for good, the rest is LRU.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np

from .checkpoint import Checkpoint, Reads, TensorInfo, read_into
from .errors import CheckpointError
from .files import atomic_write
from .metal_kernels import combine, expert_outputs, moe_experts, shared_output
from .metal_kernels.moe import SORT_THRESHOLD
from .model import PREFILL_SLOTS

POLICIES = ("lru", "lfu", "pinned")
DEFAULT_POLICY = "lru"
HALF_LIFE = 64  # lfu: calls of a layer after which a use counts half
PIN_SHARE = 0.5  # pinned: share of each layer's slots held by its most used experts
USAGE_FILE = "expert_usage.json"
USAGE_FORMAT = "m3mlx-expert-usage"

_STACKED = re.compile(r"^(?P<moe>.+\.block_sparse_moe)\.switch_mlp\.(?P<param>(?:gate|up|down)_proj"
                      r"\.(?:weight|scales|biases))$")
_MX_DTYPES = {"BF16": mx.bfloat16, "F16": mx.float16, "F32": mx.float32, "U32": mx.uint32,
              "U8": mx.uint8, "I8": mx.int8, "U16": mx.uint16, "I32": mx.int32}


# ----------------------------------------------------------------------------------------------
# Where the experts are


@dataclass(frozen=True)
class LayerExperts:
    """One MoE layer's routed experts in the checkpoint: a stacked tensor per parameter, whose
    row e is expert e."""

    module: str  # e.g. language_model.model.layers.3.block_sparse_moe
    tensors: Dict[str, TensorInfo]  # "gate_proj.weight", "gate_proj.scales", ... -> tensor

    @property
    def experts(self) -> int:
        return next(iter(self.tensors.values())).rows

    @property
    def expert_bytes(self) -> int:
        """Bytes of one expert on disk."""
        return sum(t.row_bytes for t in self.tensors.values())

    @property
    def files(self) -> List[Path]:
        return sorted({t.file for t in self.tensors.values()})


def routed_experts(ckpt: Checkpoint) -> List[LayerExperts]:
    """The stacked routed experts of a converted checkpoint, by MoE layer in model order (MTP
    layers last); [] for an original checkpoint (per-expert tensors)."""
    found: Dict[str, Dict[str, TensorInfo]] = {}
    for name, t in ckpt.tensors.items():
        m = _STACKED.match(name)
        if m:
            found.setdefault(m["moe"], {})[m["param"]] = t
    layers = [LayerExperts(module, dict(sorted(ts.items()))) for module, ts in found.items()]
    return sorted(layers, key=lambda l: (".mtp." in l.module, _layer_number(l.module)))


def _layer_number(module: str) -> int:
    m = re.search(r"\.layers\.(\d+)\.", module)
    return int(m[1]) if m else -1


def is_routed_expert(name: str) -> bool:
    return _STACKED.match(name) is not None


# ----------------------------------------------------------------------------------------------
# Statistics


@dataclass
class ExpertStats:
    """What the tier did; subtract two snapshots for a span (a prefill, a reply)."""

    tokens: int = 0  # tokens through the first streamed layer
    requests: int = 0  # experts looked up: the distinct experts of each layer call
    hits: int = 0  # of those, resident already (or read ahead and on their way)
    bytes_read: int = 0
    read_seconds: float = 0.0  # the disk's busy time: reads' first start to last end, summed
    wait_seconds: float = 0.0  # time the model waited for reads
    syncs: int = 0  # GPU->CPU synchronisations made by the tier
    prefetched: int = 0  # experts read ahead of their layer
    prefetch_used: int = 0  # of those, used before they were given up

    def copy(self) -> "ExpertStats":
        return ExpertStats(**{f.name: getattr(self, f.name) for f in fields(self)})

    def __sub__(self, other: "ExpertStats") -> "ExpertStats":
        return ExpertStats(**{f.name: getattr(self, f.name) - getattr(other, f.name)
                              for f in fields(self)})

    @property
    def hit_rate(self) -> float:
        return self.hits / self.requests if self.requests else 1.0

    @property
    def bytes_per_token(self) -> float:
        return self.bytes_read / self.tokens if self.tokens else 0.0

    @property
    def read_throughput(self) -> float:
        """Bytes per second while reading."""
        return self.bytes_read / self.read_seconds if self.read_seconds > 0 else 0.0

    @property
    def syncs_per_token(self) -> float:
        """The tier's syncs per token (generation adds one: the sampled token)."""
        return self.syncs / self.tokens if self.tokens else 0.0


def format_expert_stats(s: ExpertStats) -> str:
    """One line for the statistics of generate and chat. In a sharded run each rank streams
    its own experts and rank 0 prints the line of its own, saying so (not a sum of ranks)."""
    from .distributed import rank_prefix
    from .units import format_size

    rank = rank_prefix().rstrip(": ")
    return (f"Experts: {100 * s.hit_rate:.1f}% hits, {format_size(s.bytes_per_token)}/token read"
            f" at {s.read_throughput / 1e9:.2f} GB/s, {s.syncs_per_token + 1:.1f} syncs/token"
            + (f" ({rank}'s experts)" if rank else ""))


# ----------------------------------------------------------------------------------------------
# Policies: which resident expert gives up its slot


class LRU:
    """Least recently used first."""

    def __init__(self, experts: int, slots: int):
        self.last = np.full(slots, -1, np.int64)

    def used(self, slots: np.ndarray, experts: np.ndarray, clock: int):
        self.last[slots] = clock

    def order(self, slots: np.ndarray, holds: np.ndarray, clock: int) -> np.ndarray:
        """`slots` sorted from the first to give up to the last."""
        return slots[np.argsort(self.last[slots], kind="stable")]


class LFU(LRU):
    """Least frequently used first, uses counting half after HALF_LIFE calls; ties: LRU. The
    counts are per expert, kept while it is not resident, so an expert that comes back often
    is kept the next time."""

    def __init__(self, experts: int, slots: int, half_life: float = HALF_LIFE):
        super().__init__(experts, slots)
        self.score = np.zeros(experts, np.float64)
        self.stamp = np.zeros(experts, np.int64)
        self.decay = np.log(2) / half_life

    def _now(self, experts: np.ndarray, clock: int) -> np.ndarray:
        return self.score[experts] * np.exp(-self.decay * (clock - self.stamp[experts]))

    def used(self, slots: np.ndarray, experts: np.ndarray, clock: int):
        super().used(slots, experts, clock)
        self.score[experts] = self._now(experts, clock) + 1.0
        self.stamp[experts] = clock

    def order(self, slots: np.ndarray, holds: np.ndarray, clock: int) -> np.ndarray:
        return slots[np.lexsort((self.last[slots], self._now(holds[slots], clock)))]


# ----------------------------------------------------------------------------------------------
# One layer's pool


class LayerSlots:
    """One MoE layer's pool of S expert slots, its table and its policy. On an expert-parallel
    rank (m3mlx.sharding) the layer's experts are the `held` it computes, global ids
    [first, first + held): the table, the policy and the usage counts speak of those only."""

    def __init__(self, index: int, layout: LayerExperts, slots: int,
                 cast: Optional[mx.Dtype], policy: str, pinned: Sequence[int] = (), *,
                 first: int = 0, held: Optional[int] = None):
        self.index, self.layout = index, layout
        self.first = first
        self.experts = layout.experts if held is None else held
        self.slots = slots
        self.table = np.full(self.experts, -1, np.int32)  # expert -> slot
        self.holds = np.full(slots, -1, np.int32)  # slot -> expert
        self.marked = np.full(slots, -1, np.int64)  # the sync epoch a computation last used it
        self.prefetched = np.zeros(slots, bool)  # read ahead, not used yet
        self.pinned = np.zeros(slots, bool)
        self.wanted_pins = np.asarray(pinned, np.int64)
        self.usage = np.zeros(self.experts, np.int64)  # (token, expert) routings seen
        self.clock = 0  # calls of this layer
        self.policy = LFU(self.experts, slots) if policy == "lfu" else LRU(self.experts, slots)
        self.reading: Optional[Tuple[Reads, np.ndarray]] = None  # reads in flight, their slots
        self.pools: Dict[str, mx.array] = {}
        self._raw: Dict[str, np.ndarray] = {}  # each pool's bytes, uint8 [S, row bytes]
        self._convert: Dict[str, mx.Dtype] = {}  # params stored in another dtype than used
        for param, t in layout.tensors.items():
            stored = _MX_DTYPES.get(t.dtype)
            if stored is None:
                raise CheckpointError(f"{t.file}: {t.name} is {t.dtype}, not a type expert "
                                      "streaming reads")
            # Float tensors take the model's dtype, as they would loading resident.
            dtype = cast if cast is not None and mx.issubdtype(stored, mx.floating) else stored
            if dtype != stored:
                self._convert[param] = dtype
            self.pools[param], self._raw[param] = _pool(slots, t.shape[1:], dtype)

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.pools.values())

    @property
    def partial(self) -> bool:
        """Other ranks compute some of the layer's experts."""
        return self.experts < self.layout.experts

    def local(self, ids: np.ndarray) -> np.ndarray:
        """Global expert ids as this layer's (-1: an expert another rank computes)."""
        if not self.partial:
            return ids
        local = ids.astype(np.int64) - self.first  # routing ids may be unsigned
        return np.where((local >= 0) & (local < self.experts), local, -1)

    def slot_table(self) -> mx.array:
        return mx.array(self.table)

    def evictable(self, keep: np.ndarray, epoch: int) -> np.ndarray:
        """Slots that may take another expert now, in the policy's order: not pinned, not
        holding an expert in `keep`, not used by a computation that has not been evaluated."""
        free = ~self.pinned & (self.marked < epoch)
        if keep.size:
            free[self.table[keep][self.table[keep] >= 0]] = False
        slots = np.flatnonzero(free)
        empty = slots[self.holds[slots] < 0]
        held = slots[self.holds[slots] >= 0]
        return np.concatenate([empty, self.policy.order(held, self.holds, self.clock)])

    def assign(self, experts: np.ndarray, slots: np.ndarray, ahead: bool = False):
        """Give `slots` to `experts` (their bytes still to be read), evicting what they held."""
        old = self.holds[slots]
        self.table[old[old >= 0]] = -1
        self.holds[slots], self.table[experts] = experts, slots
        self.prefetched[slots] = ahead

    def release(self, slots: np.ndarray):
        """Forget what `slots` hold (their reads failed)."""
        for s in slots:
            if self.holds[s] >= 0:
                self.table[self.holds[s]] = -1
            self.holds[s] = -1
            self.prefetched[s] = False

    def ranges(self, experts: np.ndarray, slots: np.ndarray):
        """(byte ranges, destination buffers, conversions) to read `experts` into `slots`."""
        ranges, buffers, later = [], [], []
        for e, s in zip(experts, slots):
            for param, t in self.layout.tensors.items():
                ranges.append(t.byte_range(self.first + int(e), 1))
                if param in self._convert:
                    staging = np.empty(t.row_bytes, np.uint8)
                    buffers.append(staging)
                    later.append((param, int(s), t, staging))
                else:
                    buffers.append(self._raw[param][s])
        return ranges, buffers, later

    def convert(self, later):
        """Cast what was read in another dtype exactly as loading would (MLX's astype)."""
        for param, s, t, staging in later:
            stored = _MX_DTYPES[t.dtype]
            raw = mx.array(staging).view(stored).reshape(t.shape[1:])
            cast = np.array(raw.astype(self._convert[param]).view(mx.uint8), copy=False)
            self._raw[param][s] = cast.reshape(-1)

    def used(self, experts: np.ndarray, epoch: int) -> int:
        """Mark `experts` (resident) as used by a computation built now; returns how many had
        been read ahead for it."""
        slots = self.table[experts]
        self.marked[slots] = epoch
        ahead = int(self.prefetched[slots].sum())
        self.prefetched[slots] = False
        self.policy.used(slots, experts, self.clock)
        return ahead


def _pool(slots: int, row_shape: tuple, dtype: mx.Dtype) -> Tuple[mx.array, np.ndarray]:
    """A zeroed pool [slots, *row_shape] and a writable view of its bytes [slots, row bytes];
    checked to share memory with the array (MLX documents this for numpy views)."""
    pool = mx.zeros((slots, *row_shape), dtype)
    raw_mx = pool.view(mx.uint8)
    mx.eval(pool, raw_mx)
    raw = np.array(raw_mx, copy=False).reshape(slots, -1)
    raw[0, 0] = 0xA5
    seen = pool.view(mx.uint8).reshape(-1)[0].item()
    raw[0, 0] = 0
    if seen != 0xA5 or not raw.flags.writeable:
        raise RuntimeError("this MLX version copies arrays it exposes to numpy; expert "
                           "streaming needs shared memory (please report it)")
    return pool, raw


# ----------------------------------------------------------------------------------------------
# The tier


class ExpertTier:
    """Every streamed MoE layer of a model: pools, reads, prefetch, statistics."""

    def __init__(self, ckpt: Checkpoint, layers: List[LayerSlots], routers: list, *,
                 policy: str, prefetch: bool, direct: bool):
        self.ckpt, self.layers, self.routers = ckpt, layers, routers
        self.policy, self.prefetch, self.direct = policy, prefetch, direct
        self.stats = ExpertStats()
        self.epoch = 0
        self._fences: List[mx.array] = []
        self._checked: set = set()

    # The sizes -----------------------------------------------------------------------------

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)

    @property
    def slots(self) -> int:
        return min((layer.slots for layer in self.layers), default=0)

    def describe(self) -> str:
        from .units import format_size

        E = self.layers[0].experts if self.layers else 0
        share = self.slots / E if E else 1
        return (f"expert cache: {self.slots} of {E} experts per layer ({100 * share:.0f}%), "
                f"{format_size(self.nbytes)} in {len(self.layers)} layers, policy {self.policy}"
                f"{', prefetch' if self.prefetch else ''}")

    # Syncs and reads -----------------------------------------------------------------------

    def _sync(self, *arrays) -> List[np.ndarray]:
        """One GPU->CPU synchronisation: `arrays` (and every pending computation over slots)
        evaluated; returns them as numpy."""
        mx.eval(*[a for a in arrays if a is not None], *self._fences)
        self._fences.clear()
        self.epoch += 1
        self.stats.syncs += 1
        return [None if a is None else np.array(a) for a in arrays]

    def _fence(self, y: mx.array):
        self._fences.append(y)

    def check_files(self, layer: LayerSlots):
        """The layer's shards are still the files opened (size, mtime, inode): a model moved
        or replaced under a running process is an error, not garbage."""
        for f in layer.layout.files:
            self.ckpt.shards[f.name].check_unchanged()

    def _start(self, layer: LayerSlots, experts: np.ndarray, slots: np.ndarray,
               ahead: bool = False):
        """Start reading `experts` into `slots` of `layer`; returns what `_finish` waits on."""
        if not len(experts):
            return None
        self.check_files(layer)
        layer.assign(experts, slots, ahead)
        ranges, buffers, later = layer.ranges(experts, slots)
        reads = read_into(ranges, buffers, direct=self.direct)
        self.stats.bytes_read += sum(r.nbytes for r in ranges)
        self.stats.prefetched += len(experts) if ahead else 0
        return reads, slots, later

    def _finish(self, layer: LayerSlots, pending):
        if pending is None:
            return
        reads, slots, later = pending
        start = time.perf_counter()
        try:
            self.stats.read_seconds += reads.wait()
            layer.convert(later)
        except BaseException:
            layer.release(slots)
            raise
        finally:
            self.stats.wait_seconds += time.perf_counter() - start

    def _settle(self, layer: LayerSlots):
        """Wait for the layer's reads ahead, if any are in flight."""
        if layer.reading is not None:
            pending, layer.reading = layer.reading, None
            self._finish(layer, pending)

    def preload(self):
        """Read every layer's pinned experts (done once, at load)."""
        for layer in self.layers:
            if layer.wanted_pins.size:
                pins = layer.wanted_pins
                slots = np.arange(len(pins))
                pending = self._start(layer, pins, slots)
                layer.pinned[slots] = True
                self._finish(layer, pending)

    # The MoE of one layer ------------------------------------------------------------------

    def moe(self, index: int, x, expert_ids, weights, routed, shared, alpha, limit) -> mx.array:
        """What `moe_experts` computes over all the experts, with only layer `index`'s pool
        resident: x [N, D], expert_ids / weights [N, K] -> [N, D]."""
        try:
            return self._moe(index, x, expert_ids, weights, routed, shared, alpha, limit)
        except BaseException:
            self._drain()
            raise

    def _drain(self):
        """After a failure: let every read ahead land (or fail) and give up its slots, so the
        pools hold only experts read whole."""
        for layer in self.layers:
            if layer.reading is not None:
                (reads, slots, _), layer.reading = layer.reading, None
                try:
                    reads.wait()
                except Exception:
                    pass
                layer.release(slots)

    def _moe(self, index, x, expert_ids, weights, routed, shared, alpha, limit) -> mx.array:
        layer = self.layers[index]
        nxt = self.layers[index + 1] if self.prefetch and index + 1 < len(self.routers) else None
        guess = self.routers[index + 1](x)[0] if nxt is not None else None
        ids, guess = self._sync(expert_ids, guess)
        ids = layer.local(ids)
        N, K = ids.shape
        if index == 0:
            self.stats.tokens += N
        layer.clock += 1
        mine = ids[ids >= 0]
        layer.usage += np.bincount(mine, minlength=layer.experts)
        needed = np.unique(mine)
        self._settle(layer)
        self.stats.requests += needed.size
        self.stats.hits += int((layer.table[needed] >= 0).sum())
        missing = needed[layer.table[needed] < 0]
        free = layer.evictable(needed, self.epoch)
        # A prefill chunk on an expert-parallel rank computes only the rows routed here (as
        # the resident MoE does), which the passes do, in one pass when the pool holds them.
        if missing.size > free.size or layer.partial and ids.size >= PREFILL_SLOTS:
            return self._passes(layer, x, ids, weights, routed, shared, alpha, limit)
        pending = self._start(layer, missing, free[: missing.size])
        if nxt is not None:
            self._read_ahead(nxt, guess)
        self._finish(layer, pending)
        self.stats.prefetch_used += layer.used(needed, self.epoch)
        if layer.partial:
            if not needed.size:  # no token routed here: this rank's part is the shared one
                return mx.zeros_like(x) if shared is None else shared_output(x, shared, alpha,
                                                                              limit)
            # Slots routed to other ranks' experts: weight 0, pointed at a resident expert.
            here = ids >= 0
            expert_ids = mx.array(np.where(here, ids, needed[0]).astype(np.int32))
            weights = mx.where(mx.array(here), weights, 0)
        y = moe_experts(x, expert_ids, weights, routed, shared, alpha=alpha, limit=limit,
                        slots=layer.slot_table())
        self._fence(y)
        return y

    def _read_ahead(self, layer: LayerSlots, guess: np.ndarray):
        """Start reading the experts `guess` names for `layer` into at most half its free
        slots (a wrong guess then evicts at most that much)."""
        self._settle(layer)
        guess = layer.local(guess)
        guess = np.unique(guess[guess >= 0])
        wanted = guess[layer.table[guess] < 0]
        free = layer.evictable(guess, self.epoch)
        n = min(wanted.size, free.size // 2)
        if n:
            layer.reading = self._start(layer, wanted[:n], free[:n], ahead=True)

    def _passes(self, layer, x, ids, weights, routed, shared, alpha, limit) -> mx.array:
        """The layer in passes of as many experts as the pool holds: every expert read once,
        each (token, expert) row computed as in one pass, the rows combined at the end. `ids`
        [N, K] are the layer's (-1: another rank's expert, whose row is 0 here)."""
        N, K = ids.shape
        flat = ids.reshape(-1)
        sort = flat.size >= SORT_THRESHOLD  # the one-pass call's choice, for identical rows
        remaining = np.unique(flat[flat >= 0])
        rows, outputs = [], []
        while remaining.size:
            resident = remaining[layer.table[remaining] >= 0]
            missing = remaining[layer.table[remaining] < 0]
            free = layer.evictable(resident, self.epoch)
            take = missing[: free.size]
            self._finish(layer, self._start(layer, take, free[: take.size]))
            group = np.concatenate([resident, take])
            self.stats.prefetch_used += layer.used(group, self.epoch)
            sel = np.flatnonzero(np.isin(flat, group))
            slot_ids = mx.array(layer.table[flat[sel]])[:, None]
            out = expert_outputs(x[mx.array(sel // K)], slot_ids, routed, alpha, limit,
                                 sort=sort)[:, 0]
            rows.append(sel)
            outputs.append(out)
            remaining = np.setdiff1d(remaining, group)
            if remaining.size:
                self._sync(out)  # its slots take the next pass's experts
        rows = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        where = np.full(flat.size, rows.size)  # each (token, expert)'s row; rows.size: zeros
        where[rows] = np.arange(rows.size)
        zero = mx.zeros((1, x.shape[-1]), outputs[0].dtype if outputs else x.dtype)
        outputs = mx.concatenate(outputs + [zero])[mx.array(where)].reshape(N, K, -1)
        y = combine(outputs, weights,
                    None if shared is None else shared_output(x, shared, alpha, limit))
        self._fence(y)
        return y

    # Calibration ---------------------------------------------------------------------------

    def usage(self) -> Dict[str, List[int]]:
        return {layer.layout.module: layer.usage.tolist() for layer in self.layers}


# ----------------------------------------------------------------------------------------------
# Calibration files: per-layer usage counts next to the model


def write_usage(path, usage: Dict[str, List[int]], tokens: int) -> Path:
    """USAGE_FILE in the model directory `path` (or the file `path`), written atomically."""
    path = Path(path)
    file = path / USAGE_FILE if path.is_dir() else path
    doc = {"format": USAGE_FORMAT, "version": 1, "tokens": int(tokens), "layers": usage}
    atomic_write(file, (json.dumps(doc) + "\n").encode())
    return file


def read_usage(file, layouts: Sequence[LayerExperts]) -> Dict[str, np.ndarray]:
    """Per-layer usage counts from a calibration file, checked against the model's layers."""
    file = Path(file)
    try:
        doc = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{file} cannot be read as an expert usage file ({e}); run "
                              "`m3mlx calibrate-experts` again") from None
    if not isinstance(doc, dict) or doc.get("format") != USAGE_FORMAT or not isinstance(
            doc.get("layers"), dict):
        raise CheckpointError(f"{file} is not an m3mlx expert usage file; run `m3mlx "
                              "calibrate-experts` again")
    out = {}
    for layout in layouts:
        counts = doc["layers"].get(layout.module)
        if counts is None:
            continue
        if not (isinstance(counts, list) and len(counts) == layout.experts and all(
                isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts)):
            raise CheckpointError(f"{file}: the counts of {layout.module} are not "
                                  f"{layout.experts} non-negative integers; it is from another "
                                  "model: run `m3mlx calibrate-experts` again")
        out[layout.module] = np.asarray(counts, np.int64)
    unknown = set(doc["layers"]) - {l.module for l in layouts}
    if unknown:
        raise CheckpointError(f"{file} counts layers this model does not have (e.g. "
                              f"{sorted(unknown)[0]}); it is from another model: run `m3mlx "
                              "calibrate-experts` again")
    return out


# ----------------------------------------------------------------------------------------------
# Building the tier for a model


@dataclass
class ExpertCache:
    """How to stream: `slots` per MoE layer (from the budget), the policy, prefetch on or off,
    reads bypassing the page cache (benchmarks)."""

    slots: int
    policy: str = DEFAULT_POLICY
    prefetch: bool = True
    direct: bool = False
    usage_file: Optional[Path] = None  # calibration counts (policy "pinned")


def attach(model, ckpt: Checkpoint, cache: ExpertCache, cast: Optional[mx.Dtype] = None, *,
           preload: bool = True, plan=None) -> ExpertTier:
    """Give each MoE layer of `model` a pool of slots in place of its stacked experts, and the
    model the tier (`model.expert_tier`). MTP layers, which generation never runs, keep theirs.

    With a sharding `plan` (m3mlx.sharding), `model` is one rank's part: the tier streams the
    experts of the rank's own layers (pipeline), of each layer the experts the rank computes
    (tensor: `switch_mlp.first`, `held`), each pool holding at most `cache.slots` of those."""
    layouts = [l for l in routed_experts(ckpt) if ".mtp." not in l.module]
    usage = {}
    if cache.policy == "pinned":
        if cache.usage_file is None or not Path(cache.usage_file).is_file():
            raise CheckpointError(f"the pinned policy needs expert usage counts ({USAGE_FILE} "
                                  f"next to the model): run `m3mlx calibrate-experts "
                                  f"{ckpt.path}` first, or use another policy (lru, lfu)")
        usage = read_usage(cache.usage_file, layouts)
    tier = ExpertTier(ckpt, [], [], policy=cache.policy, prefetch=cache.prefetch,
                      direct=cache.direct)
    modules = dict(model.named_modules())
    # This rank's layers, by their names in its model (pipeline stages count from their first).
    mine = [(l, l.module if plan is None else plan.local_layer(l.module)) for l in layouts]
    for i, (layout, name) in enumerate((l, name) for l, name in mine if name is not None):
        moe = modules[name]
        first, held = moe.switch_mlp.first, moe.switch_mlp.held
        slots = min(held, cache.slots)
        pins = ()
        if layout.module in usage and slots > 1:
            n = min(int(slots * PIN_SHARE), slots - 1)
            counts = usage[layout.module][first:first + held]
            pins = np.argsort(-counts, kind="stable")[:n]
        layer = LayerSlots(i, layout, slots, cast, cache.policy, pins, first=first, held=held)
        for param, pool in layer.pools.items():
            proj, leaf = param.split(".")
            setattr(getattr(moe.switch_mlp, proj), leaf, pool)
        moe.streamed = _Streamed(tier, i)
        tier.layers.append(layer)
        tier.routers.append(moe.route)
    if preload:
        tier.preload()
    model.expert_tier = tier
    return tier


class _Streamed:
    """What an MoE module calls instead of the op when its experts stream."""

    def __init__(self, tier: ExpertTier, index: int):
        self.tier, self.index = tier, index

    def __call__(self, x, expert_ids, weights, routed, shared, alpha, limit) -> mx.array:
        return self.tier.moe(self.index, x, expert_ids, weights, routed, shared, alpha, limit)
