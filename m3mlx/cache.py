"""Per-layer caches: K/V for every layer, plus index keys on MSA layers.

Buffers grow in steps that are whole MSA blocks, so the sparse ops can view them as blocks
without copying. Index keys can be stored as int8 with one scale per key (index_bits=8): at
long context the index-key scan dominates decode, and this halves (bf16) or quarters (fp32) it.
K/V can be compact (kv_bits=8 or 4): each position's row quantized along head_dim, decoded
by the attention ops only for the blocks they read (`metal_kernels/kv.py`). On MSA layers a
memory tier (`kv_tier.py`, kv_memory=...) can keep only some of the K/V blocks resident and
the rest in a file on the SSD; the outputs are the same either way.

`update` stores a step's keys and returns a `KVView`: what attention reads, with the two
attention ops (sparse over selected blocks, dense over everything) that read it.
"""

import hashlib
import json
import numbers
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional

import mlx.core as mx
import numpy as np

from .checks import InputError, parse_json
from .files import atomic_file
from .metal_kernels import (QuantizedKV, dense_attention, quantize_index_keys, quantize_kv,
                            sparse_attention)
from .metal_kernels.kv import DEFAULT_GROUP
from .shard_cache import check_part, is_sharded, load_parts, save_parts

STEP = 256  # a multiple of M3's 128-token block

# The position axis of every array a cache's `state` holds.
STATE_AXES = {"keys": 2, "values": 2, "key_scales": 2, "key_biases": 2, "value_scales": 2,
              "value_biases": 2, "index_keys": 1, "index_scales": 1}
# The state names of compact K or V (the uint32 codes keep the float name).
_COMPACT = {"keys": ("keys", "key_scales", "key_biases"),
            "values": ("values", "value_scales", "value_biases")}


@dataclass
class KVView:
    """What attention reads after a cache update: K/V [B, H, S >= offset + L, D] (float arrays
    or QuantizedKV; rows past offset + L are not read), the index keys of sparse layers, and
    `offset`, the position of the step's first query. `tiered` is the memory tier's view of a
    tiered layer's K/V, which takes the attention calls instead."""

    keys: Any
    values: Any
    index_keys: Optional[mx.array]
    index_scales: Optional[mx.array]
    offset: int
    tiered: Any = None

    def sparse_attention(self, q: mx.array, selection: mx.array, *, scale: float,
                         block_size: int) -> mx.array:
        if self.tiered is not None:
            return self.tiered.sparse_attention(q, selection, self.offset, scale, block_size)
        return sparse_attention(q, self.keys, self.values, selection, offset=self.offset,
                                scale=scale, block_size=block_size)

    def dense_attention(self, q: mx.array, *, scale: float) -> mx.array:
        keys, values = self.keys, self.values
        if self.tiered is not None:
            keys, values = self.tiered.in_order(self.offset + q.shape[2])
        return dense_attention(q, keys, values, offset=self.offset, scale=scale)


class LayerCache:
    def __init__(self, index: bool = False, index_bits: Optional[int] = None,
                 kv_bits: Optional[int] = None, kv_group_size: Optional[int] = None,
                 tier=None):
        if index_bits not in (None, 8, 16):
            raise InputError(f"index_bits={index_bits!r}: index keys are stored in 8 bits or "
                             "in the activation dtype (16, or None)")
        index_bits = None if index_bits == 16 else index_bits
        if kv_bits not in (None, 16, 8, 4):
            raise InputError(f"kv_bits={kv_bits!r}: K/V is stored in the activation dtype "
                             "(16, or None), 8 or 4 bits")
        kv_bits = None if kv_bits == 16 else kv_bits
        self.index = index
        self.index_bits = index_bits if index else None
        self.kv_bits = kv_bits
        self.kv_group_size = (kv_group_size or DEFAULT_GROUP[kv_bits]) if kv_bits else None
        self.keys = self.values = self.index_keys = self.index_scales = None
        self.offset = 0
        # A tiered layer keeps its K/V in the tier's block pool, not in keys/values.
        self.tiered = tier.layer() if tier is not None else None

    # -- storing -------------------------------------------------------------------------------

    def compact(self, x: mx.array):
        """K or V rows [B, H, L, D] as this cache stores them."""
        return quantize_kv(x, self.kv_bits, self.kv_group_size) if self.kv_bits else x

    def _reserve(self, needed: int, keys, values, index_keys):
        """Grow every buffer to hold `needed` positions, keeping what is stored."""
        capacity = -(-needed // STEP) * STEP
        used = self.offset
        if self.tiered is None:
            self.keys = _resized_rows(self.keys, used, keys, capacity)
            self.values = _resized_rows(self.values, used, values, capacity)
        if index_keys is not None:
            dtype = mx.int8 if self.index_bits == 8 else index_keys.dtype
            self.index_keys = _resized(self.index_keys, used, index_keys.shape, 1, capacity, dtype)
            if self.index_bits == 8:
                self.index_scales = _resized(
                    self.index_scales, used, index_keys.shape[:2], 1, capacity, mx.float32)

    def _capacity(self) -> int:
        buf = self.index_keys if self.index_keys is not None else self.keys
        if buf is None:
            return 0
        return buf.shape[1] if buf is self.index_keys else buf.shape[2]

    def update(self, keys: mx.array, values: mx.array,
               index_keys: Optional[mx.array] = None) -> KVView:
        """Append L positions: keys/values [B, H, L, D] (as computed; compacted here),
        index_keys [B, L, Di] on sparse layers. Returns what attention reads."""
        L = keys.shape[2]
        start, end = self.offset, self.offset + L
        keys, values = self.compact(keys), self.compact(values)
        if end > self._capacity():
            self._reserve(end, keys, values, index_keys)
        if self.tiered is not None:
            self.tiered.write(start, keys, values)
        else:
            self.keys = _store_rows(self.keys, start, keys)
            self.values = _store_rows(self.values, start, values)
        if index_keys is not None:
            if self.index_bits == 8:
                q, scale = quantize_index_keys(index_keys)
                self.index_keys[:, start:end, :] = q
                self.index_scales[:, start:end] = scale
            else:
                self.index_keys[:, start:end, :] = index_keys
        self.offset = end
        return KVView(self.keys, self.values, self.index_keys, self.index_scales, start,
                      self.tiered)

    def trim(self, n: int) -> int:
        """Forget the last n positions; returns how many were dropped."""
        n = min(self.offset, _count(n))
        self.offset -= n
        if self.tiered is not None and n:
            self.tiered.trim(self.offset)
        return n

    # -- what it holds -------------------------------------------------------------------------

    @property
    def head_shape(self) -> Optional[tuple]:
        """(KV heads, key dims, value dims) of what is stored, None while empty."""
        if self.tiered is not None:
            return self.tiered.head_shape
        if self.keys is None:
            return None
        return self.keys.shape[1], self.keys.shape[3], self.values.shape[3]

    def _index_state(self) -> Dict[str, mx.array]:
        n = self.offset
        out = {}
        if self.index_keys is not None:
            out["index_keys"] = self.index_keys[:, :n, :]
        if self.index_scales is not None:
            out["index_scales"] = self.index_scales[:, :n]
        return out

    @property
    def state(self) -> Dict[str, mx.array]:
        """Every array, cut to the positions held (names and position axes: STATE_AXES). A
        tiered layer's K/V are read back from the tier to build it."""
        n = self.offset
        out = {}
        if self.tiered is not None:
            if n:
                out.update(_named_rows(*self.tiered.in_order(n), 0, n))
        elif self.keys is not None:
            out.update(_named_rows(self.keys, self.values, 0, n))
        out.update(self._index_state())
        return out

    @property
    def arrays(self) -> List[mx.array]:
        """The arrays held in memory (what to evaluate after a step; `state` would read a
        tiered layer's blocks back)."""
        held = [self.index_keys, self.index_scales]
        if self.tiered is not None:
            held += self.tiered.pool
        else:
            held += [a for x in (self.keys, self.values) if x is not None
                     for a in (x.arrays if isinstance(x, QuantizedKV) else (x,))]
        return [a for a in held if a is not None]

    @property
    def nbytes(self) -> int:
        """Bytes of what the cache holds (its `state`), wherever it lies."""
        index = sum(a.nbytes for a in self._index_state().values())
        if self.tiered is not None:
            return index + self.tiered.nbytes(self.offset)
        if self.keys is None:
            return index
        return index + sum(a.nbytes for a in _named_rows(self.keys, self.values, 0,
                                                          self.offset).values())

    @property
    def resident_nbytes(self) -> int:
        """Bytes of the buffers held in memory (a tiered layer's block pool, not its file)."""
        index = sum(a.nbytes for a in (self.index_keys, self.index_scales) if a is not None)
        if self.tiered is not None:
            return index + self.tiered.resident_nbytes
        return index + sum(_nbytes(a) for a in (self.keys, self.values))

    def meta(self) -> dict:
        return {"index": self.index, "index_bits": self.index_bits, "kv_bits": self.kv_bits,
                "kv_group_size": self.kv_group_size, "offset": self.offset}

    @classmethod
    def from_state(cls, state: Dict[str, mx.array], meta: dict, tier=None) -> "LayerCache":
        """The cache of `state` (as `state` returns it) and `meta` (as `meta` does); the
        compact K/V are taken as they are, never quantized again."""
        cache = cls(index=meta["index"], index_bits=meta["index_bits"],
                    kv_bits=meta.get("kv_bits"), kv_group_size=meta.get("kv_group_size"),
                    tier=tier)
        if state:
            keys, values = _rows_of(state, cache.kv_bits, cache.kv_group_size)
            n = keys.shape[2]
            cache._reserve(n, keys, values, state.get("index_keys"))
            if cache.tiered is not None:
                cache.tiered.write_all(keys, values)
            else:
                cache.keys = _store_rows(cache.keys, 0, keys)
                cache.values = _store_rows(cache.values, 0, values)
            if "index_keys" in state:
                cache.index_keys[:, :n, :] = state["index_keys"]
            if "index_scales" in state:
                cache.index_scales[:, :n] = state["index_scales"]
        cache.offset = meta["offset"]
        return cache


def _named_rows(keys, values, start: int, stop: int) -> Dict[str, mx.array]:
    """The state entries of K/V rows [start, stop)."""
    out = {}
    for name, x in (("keys", keys), ("values", values)):
        if isinstance(x, QuantizedKV):
            out.update(zip(_COMPACT[name], x.rows(start, stop).arrays))
        else:
            out[name] = x[..., start:stop, :]
    return out


def _rows_of(state: Dict[str, mx.array], bits: Optional[int], group: Optional[int]):
    """The K and V rows a state holds: float arrays, or QuantizedKV when compact."""
    if not bits:
        return state["keys"], state["values"]
    return tuple(QuantizedKV(*(state[n] for n in _COMPACT[name]), bits, group)
                 for name in ("keys", "values"))


def _nbytes(x) -> int:
    return 0 if x is None else x.nbytes


def _resized(buf, used, shape, axis, capacity, dtype):
    """A zero buffer of `shape` with `capacity` positions on `axis`, holding buf's first `used`."""
    shape = list(shape)
    shape[axis] = capacity
    fresh = mx.zeros(shape, dtype)
    if buf is not None and used:
        head = (slice(None),) * axis + (slice(0, used),)
        fresh[head] = buf[head]
    return fresh


def _resized_rows(buf, used, rows, capacity):
    """K or V buffer (float or QuantizedKV) grown to `capacity` positions, like `rows`."""
    if isinstance(rows, QuantizedKV):
        old = buf.arrays if buf is not None else (None,) * 3
        return QuantizedKV(*(_resized(b, used, a.shape, 2, capacity, a.dtype)
                             for b, a in zip(old, rows.arrays)), rows.bits, rows.group_size)
    return _resized(buf, used, rows.shape, 2, capacity, rows.dtype)


def _store_rows(buf, start: int, rows):
    """buf with positions [start, start + L) replaced by rows (in place when MLX can)."""
    end = start + rows.shape[2]
    if isinstance(rows, QuantizedKV):
        for b, a in zip(buf.arrays, rows.arrays):
            b[..., start:end, :] = a
        return buf
    buf[..., start:end, :] = rows
    return buf


def _count(n: Any) -> int:
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
        raise InputError(f"cannot trim {n!r} positions: give a count >= 0")
    return int(n)


def trim_prompt_cache(cache: List[LayerCache], n: int) -> int:
    """Forget the last n positions of every layer; returns how many were dropped."""
    n = _count(n)
    return min(c.trim(n) for c in cache) if cache else 0


def model_signature(model) -> str:
    """What ties a cache to the model that filled it: the model's configuration and a digest
    of its norm weights (rounded to bfloat16, so the same model loaded in another dtype
    matches; norms are never quantized)."""
    digest = hashlib.sha256(json.dumps(asdict(model.args), sort_keys=True, default=str).encode())
    for w in (layer.input_layernorm.weight for layer in model.layers):
        digest.update(np.array(w.astype(mx.bfloat16).view(mx.uint16)).tobytes())
    return digest.hexdigest()[:32]


def save_prompt_cache(path: str, cache: List[LayerCache],
                      metadata: Optional[Dict[str, str]] = None, *, model=None):
    """Write every layer's cache (index keys included; compact K/V as they are stored) and
    string metadata to one safetensors file, atomically. With `model` (the one that filled the
    cache), the file records its signature, and loading it with another model is refused.

    With a sharded `model` (one rank's part, `m3mlx.sharding`), every rank calls this with the
    same arguments and writes its own part: rank 0 at `path`, rank r of N beside it as
    `NAME.rank{r}-of-{N}.safetensors` (`m3mlx.shard_cache`), the whole set in step."""
    if metadata is not None and not isinstance(metadata, dict):
        raise InputError(f"metadata must be a dict, got {type(metadata).__name__}")
    arrays = {f"{i}.{name}": a for i, c in enumerate(cache) for name, a in c.state.items()}
    meta = {
        "m3mlx_cache": json.dumps([c.meta() for c in cache]),
        "user": json.dumps(metadata or {}),
    }
    if model is not None:
        meta["model"] = model_signature(model)
    if is_sharded(model):
        save_parts(path, arrays, meta, model)
        return
    with atomic_file(path) as f:
        mx.save_safetensors(f, arrays, metadata=meta)


def load_prompt_cache(path: str, return_metadata: bool = False, *, model=None, tier=None):
    """The cache saved at `path` (and its metadata), checked completely before use: layer
    records, tensor names, shapes, dtypes and offsets, and with `model`, that it fits that
    model (layer count and kinds, head sizes, the signature recorded at save time).
    InputError says what does not fit. Compact K/V are loaded as they were saved. With `tier`
    (a `KVTier`), its MSA layers keep only what the tier allows in memory.

    With a sharded `model`, every rank calls this and loads its own part of a cache saved by
    the same plan on as many ranks; a part missing on any rank, or one from another save, plan
    or number of ranks, is refused on every rank."""
    if is_sharded(model):
        cache, user = load_parts(path, model, lambda part: _read(part, model, tier))
    else:
        cache, user, _ = _read(path, model, tier)
    return (cache, user) if return_metadata else cache


def _read(path, model, tier):
    """(cache, user metadata, shard record) of the cache file at `path`, checked."""
    try:
        arrays, meta = mx.load(str(path), format="safetensors", return_metadata=True)
    except (RuntimeError, ValueError) as e:
        raise InputError(f"{path} is not a safetensors file ({e})") from None
    if "m3mlx_cache" not in meta:
        raise InputError(f"{path} is not an m3mlx prompt cache (no 'm3mlx_cache' metadata)")
    try:
        layers, user = parse_json(meta["m3mlx_cache"]), parse_json(meta.get("user", "{}"))
    except ValueError as e:
        raise InputError(f"{path}: the cache metadata is not JSON ({e})") from None
    if not isinstance(user, dict):
        raise InputError(f"{path}: the user metadata is not a JSON object")
    check_part(path, meta.get("m3mlx_shard"), model)
    _check_cache_file(layers, arrays)
    if model is not None and meta.get("model") not in (None, model_signature(model)):
        raise InputError(f"{path} was saved from another model (its model signature differs); "
                         "load it with the model that made it")
    cache = []
    for i, layer_meta in enumerate(layers):
        prefix = f"{i}."
        state = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
        cache.append(LayerCache.from_state(state, layer_meta,
                                           tier if layer_meta["index"] else None))
    if model is not None:
        check_cache_fits(cache, model)
    return cache, user, meta.get("m3mlx_shard")


_FLOATS = (mx.float16, mx.bfloat16, mx.float32)
_RECORD_KEYS = {"index", "index_bits", "offset"}
_KV_KEYS = {"kv_bits", "kv_group_size"}


def _check_cache_file(layers: Any, arrays: Dict[str, mx.array]):
    """Raise InputError unless the layer records and the tensors agree exactly."""
    def bad(what):
        raise InputError(f"the prompt cache file is damaged or not m3mlx's: {what}")

    if not isinstance(layers, list) or not all(isinstance(m, dict) for m in layers):
        bad("the layer records are not a list of objects")
    expected = set()
    offsets, batch = set(), set()
    for i, m in enumerate(layers):
        if set(m) not in (_RECORD_KEYS, _RECORD_KEYS | _KV_KEYS):
            bad(f"layer {i} has the record keys {sorted(m)}")
        index, bits, offset = m["index"], m["index_bits"], m["offset"]
        kv_bits, group = m.get("kv_bits"), m.get("kv_group_size")
        if not isinstance(index, bool) or bits not in ((None, 8) if index else (None,)):
            bad(f"layer {i}: index={index!r}, index_bits={bits!r}")
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            bad(f"layer {i}: offset {offset!r} is not a count >= 0")
        if (kv_bits, group) != (None, None) and (kv_bits not in (8, 4)
                                                 or group not in (32, 64, 128)):
            bad(f"layer {i}: kv_bits={kv_bits!r}, kv_group_size={group!r}")
        offsets.add(offset)
        kv_names = [*_COMPACT["keys"], *_COMPACT["values"]] if kv_bits else ["keys", "values"]
        names = kv_names + (["index_keys"] if index else []) + (
            ["index_scales"] if bits == 8 else [])
        present = [n for n in names if f"{i}.{n}" in arrays]
        if not present and offset == 0:
            continue
        if present != names:
            bad(f"layer {i} lacks {sorted(set(names) - set(present))}")
        expected.update(f"{i}.{n}" for n in names)
        k, v = arrays[f"{i}.keys"], arrays[f"{i}.values"]
        if k.ndim != 4 or v.ndim != 4 or k.shape[:3] != v.shape[:3] or k.shape[2] != offset:
            bad(f"layer {i}: keys {k.shape} and values {v.shape} do not hold {offset} positions "
                "as [batch, heads, positions, dims]")
        if kv_bits:
            _check_compact(i, arrays, kv_bits, group, bad)
        elif k.dtype not in _FLOATS or v.dtype != k.dtype:
            bad(f"layer {i}: keys are {k.dtype} and values {v.dtype}; both must be one float type")
        batch.add(k.shape[0])
        if index:
            ik = arrays[f"{i}.index_keys"]
            if ik.ndim != 3 or ik.shape[:2] != (k.shape[0], offset):
                bad(f"layer {i}: index keys {ik.shape} do not hold {offset} positions")
            # Float index keys are in the activation dtype, that of float K/V.
            ok = ik.dtype == mx.int8 if bits == 8 else (
                ik.dtype in _FLOATS and (kv_bits or ik.dtype == k.dtype))
            if not ok:
                bad(f"layer {i}: index keys are {ik.dtype}")
            if bits == 8:
                sc = arrays[f"{i}.index_scales"]
                if sc.shape != (k.shape[0], offset) or sc.dtype != mx.float32:
                    bad(f"layer {i}: index scales are {sc.dtype} {sc.shape}")
    extra = sorted(set(arrays) - expected)
    if extra:
        bad(f"it holds tensors no layer record names, e.g. {extra[:3]}")
    if len(offsets) > 1:
        bad(f"its layers hold different numbers of positions ({sorted(offsets)})")
    if len(batch) > 1:
        bad(f"its layers have different batch sizes ({sorted(batch)})")


def _check_compact(i: int, arrays: Dict[str, mx.array], bits: int, group: int, bad):
    """The codes, scales and biases of layer i's compact K and V agree with its record."""
    for name in ("keys", "values"):
        codes, scales, biases = (arrays[f"{i}.{n}"] for n in _COMPACT[name])
        dims = codes.shape[-1] * 32 // bits
        if codes.dtype != mx.uint32 or dims % group:
            bad(f"layer {i}: compact {name} are {codes.dtype} rows of {dims} values, not "
                f"uint32 codes in groups of {group}")
        if scales.dtype not in (mx.float16, mx.float32) or biases.dtype != scales.dtype:
            bad(f"layer {i}: the {name}' scales are {scales.dtype} and biases {biases.dtype}")
        want = (*codes.shape[:3], dims // group)
        if scales.shape != want or biases.shape != want:
            bad(f"layer {i}: the {name}' scales {scales.shape} and biases {biases.shape} do "
                f"not fit codes {codes.shape}")


def check_cache_fits(cache: List[LayerCache], model):
    """Raise InputError unless `cache` has the layers and head sizes of `model`'s caches."""
    def refuse(what):
        raise InputError(f"the prompt cache was made for another model ({what}); load it with "
                         "the model that made it")

    if len(cache) != len(model.layers):
        refuse(f"{len(cache)} layers, this model has {len(model.layers)}")
    args = model.args
    kv_heads = args.num_key_value_heads  # this rank's share under the tensor plan
    if getattr(model, "sharding", None) is not None:
        start, stop = model.sharding.plan.kv_heads(args)
        kv_heads = stop - start
    for i, (c, layer) in enumerate(zip(cache, model.layers)):
        if c.index != layer.self_attn.sparse:
            refuse(f"layer {i} is {'MSA' if c.index else 'dense'} in the cache")
        shape = c.head_shape
        if shape is None:
            continue
        heads, dims, value_dims = shape
        if (heads, dims, value_dims) != (kv_heads, args.head_dim, args.head_dim):
            refuse(f"layer {i} has {heads} KV heads of {dims} dims")
        if c.index and c.index_keys.shape[2] != args.index_head_dim:
            refuse(f"layer {i} has index keys of {c.index_keys.shape[2]} dims")
    limit = getattr(args, "max_position_embeddings", None)
    if cache and limit is not None and cache[0].offset > limit:
        refuse(f"{cache[0].offset} positions, beyond this model's context of {limit}")


def prompt_cache_bytes(cache: List[LayerCache]) -> int:
    return sum(c.nbytes for c in cache)
