"""Per-layer caches: K/V for every layer, plus index keys on MSA layers.

Buffers grow in steps that are whole MSA blocks, so the sparse ops can view them as blocks
without copying. Index keys can be stored as int8 with one scale per key (index_bits=8): at
long context the index-key scan dominates decode, and this halves (bf16) or quarters (fp32) it.
"""

import hashlib
import json
import numbers
from dataclasses import asdict
from typing import Any, Dict, List, Optional

import mlx.core as mx
import numpy as np

from .checks import InputError
from .files import atomic_file
from .metal_kernels import quantize_index_keys

STEP = 256  # a multiple of M3's 128-token block


class LayerCache:
    def __init__(self, index: bool = False, index_bits: Optional[int] = None):
        if index_bits not in (None, 8):
            raise InputError(f"index_bits={index_bits}: index keys are stored full or 8-bit")
        self.index = index
        self.index_bits = index_bits if index else None
        self.keys = self.values = self.index_keys = self.index_scales = None
        self.offset = 0

    def _reserve(self, needed: int, keys, values, index_keys):
        """Grow every buffer to hold `needed` positions, keeping what is stored."""
        capacity = -(-needed // STEP) * STEP
        used = self.offset
        self.keys = _resized(self.keys, used, keys.shape, 2, capacity, keys.dtype)
        self.values = _resized(self.values, used, values.shape, 2, capacity, values.dtype)
        if index_keys is not None:
            dtype = mx.int8 if self.index_bits == 8 else index_keys.dtype
            self.index_keys = _resized(self.index_keys, used, index_keys.shape, 1, capacity, dtype)
            if self.index_bits == 8:
                self.index_scales = _resized(
                    self.index_scales, used, index_keys.shape[:2], 1, capacity, mx.float32)

    def update(self, keys: mx.array, values: mx.array, index_keys: Optional[mx.array] = None):
        """Append L positions; returns the whole buffers (valid up to the new offset).

        keys/values [B, H, L, D]; index_keys [B, L, Di] on sparse layers.
        Returns (keys, values, index_keys, index_scales) with index_scales None unless 8-bit.
        """
        L = keys.shape[2]
        start, end = self.offset, self.offset + L
        if self.keys is None or end > self.keys.shape[2]:
            self._reserve(end, keys, values, index_keys)
        self.keys[..., start:end, :] = keys
        self.values[..., start:end, :] = values
        if index_keys is not None:
            if self.index_bits == 8:
                q, scale = quantize_index_keys(index_keys)
                self.index_keys[:, start:end, :] = q
                self.index_scales[:, start:end] = scale
            else:
                self.index_keys[:, start:end, :] = index_keys
        self.offset = end
        return self.keys, self.values, self.index_keys, self.index_scales

    def trim(self, n: int) -> int:
        """Forget the last n positions; returns how many were dropped."""
        n = min(self.offset, _count(n))
        self.offset -= n
        return n

    @property
    def state(self) -> Dict[str, mx.array]:
        if self.keys is None:
            return {}
        n = self.offset
        out = {"keys": self.keys[..., :n, :], "values": self.values[..., :n, :]}
        if self.index_keys is not None:
            out["index_keys"] = self.index_keys[:, :n, :]
        if self.index_scales is not None:
            out["index_scales"] = self.index_scales[:, :n]
        return out

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.state.values())

    def meta(self) -> dict:
        return {"index": self.index, "index_bits": self.index_bits, "offset": self.offset}

    @classmethod
    def from_state(cls, state: Dict[str, mx.array], meta: dict) -> "LayerCache":
        cache = cls(index=meta["index"], index_bits=meta["index_bits"])
        if state:
            n = state["keys"].shape[2]
            cache._reserve(n, state["keys"], state["values"], state.get("index_keys"))
            cache.keys[..., :n, :] = state["keys"]
            cache.values[..., :n, :] = state["values"]
            if "index_keys" in state:
                cache.index_keys[:, :n, :] = state["index_keys"]
            if "index_scales" in state:
                cache.index_scales[:, :n] = state["index_scales"]
        cache.offset = meta["offset"]
        return cache


def _resized(buf, used, shape, axis, capacity, dtype):
    """A zero buffer of `shape` with `capacity` positions on `axis`, holding buf's first `used`."""
    shape = list(shape)
    shape[axis] = capacity
    fresh = mx.zeros(shape, dtype)
    if buf is not None and used:
        head = (slice(None),) * axis + (slice(0, used),)
        fresh[head] = buf[head]
    return fresh


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
    """Write every layer's cache (index keys included) and string metadata to one safetensors
    file, atomically. With `model` (the one that filled the cache), the file records its
    signature, and loading it with another model is refused."""
    if metadata is not None and not isinstance(metadata, dict):
        raise InputError(f"metadata must be a dict, got {type(metadata).__name__}")
    arrays = {f"{i}.{name}": a for i, c in enumerate(cache) for name, a in c.state.items()}
    meta = {
        "m3mlx_cache": json.dumps([c.meta() for c in cache]),
        "user": json.dumps(metadata or {}),
    }
    if model is not None:
        meta["model"] = model_signature(model)
    with atomic_file(path) as f:
        mx.save_safetensors(f, arrays, metadata=meta)


def load_prompt_cache(path: str, return_metadata: bool = False, *, model=None):
    """The cache saved at `path` (and its metadata), checked completely before use: layer
    records, tensor names, shapes, dtypes and offsets, and with `model`, that it fits that
    model (layer count and kinds, head sizes, the signature recorded at save time).
    InputError says what does not fit."""
    try:
        arrays, meta = mx.load(str(path), format="safetensors", return_metadata=True)
    except (RuntimeError, ValueError) as e:
        raise InputError(f"{path} is not a safetensors file ({e})") from None
    if "m3mlx_cache" not in meta:
        raise InputError(f"{path} is not an m3mlx prompt cache (no 'm3mlx_cache' metadata)")
    try:
        layers, user = json.loads(meta["m3mlx_cache"]), json.loads(meta.get("user", "{}"))
    except ValueError as e:
        raise InputError(f"{path}: the cache metadata is not JSON ({e})") from None
    if not isinstance(user, dict):
        raise InputError(f"{path}: the user metadata is not a JSON object")
    _check_cache_file(layers, arrays)
    if model is not None and meta.get("model") not in (None, model_signature(model)):
        raise InputError(f"{path} was saved from another model (its model signature differs); "
                         "load it with the model that made it")
    cache = []
    for i, layer_meta in enumerate(layers):
        prefix = f"{i}."
        state = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
        cache.append(LayerCache.from_state(state, layer_meta))
    if model is not None:
        check_cache_fits(cache, model)
    return (cache, user) if return_metadata else cache


_FLOATS = (mx.float16, mx.bfloat16, mx.float32)


def _check_cache_file(layers: Any, arrays: Dict[str, mx.array]):
    """Raise InputError unless the layer records and the tensors agree exactly."""
    def bad(what):
        raise InputError(f"the prompt cache file is damaged or not m3mlx's: {what}")

    if not isinstance(layers, list) or not all(isinstance(m, dict) for m in layers):
        bad("the layer records are not a list of objects")
    expected = set()
    offsets, batch = set(), set()
    for i, m in enumerate(layers):
        if set(m) != {"index", "index_bits", "offset"}:
            bad(f"layer {i} has the record keys {sorted(m)}")
        index, bits, offset = m["index"], m["index_bits"], m["offset"]
        if not isinstance(index, bool) or bits not in ((None, 8) if index else (None,)):
            bad(f"layer {i}: index={index!r}, index_bits={bits!r}")
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            bad(f"layer {i}: offset {offset!r} is not a count >= 0")
        offsets.add(offset)
        names = ["keys", "values"] + (["index_keys"] if index else []) + (
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
        if k.dtype not in _FLOATS or v.dtype != k.dtype:
            bad(f"layer {i}: keys are {k.dtype} and values {v.dtype}; both must be one float type")
        batch.add(k.shape[0])
        if index:
            ik = arrays[f"{i}.index_keys"]
            if ik.ndim != 3 or ik.shape[:2] != (k.shape[0], offset):
                bad(f"layer {i}: index keys {ik.shape} do not hold {offset} positions")
            if ik.dtype != (mx.int8 if bits == 8 else k.dtype):
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


def check_cache_fits(cache: List[LayerCache], model):
    """Raise InputError unless `cache` has the layers and head sizes of `model`'s caches."""
    def refuse(what):
        raise InputError(f"the prompt cache was made for another model ({what}); load it with "
                         "the model that made it")

    if len(cache) != len(model.layers):
        refuse(f"{len(cache)} layers, this model has {len(model.layers)}")
    args = model.args
    for i, (c, layer) in enumerate(zip(cache, model.layers)):
        if c.index != layer.self_attn.sparse:
            refuse(f"layer {i} is {'MSA' if c.index else 'dense'} in the cache")
        if c.keys is None:
            continue
        heads, dims = c.keys.shape[1], c.keys.shape[3]
        if (heads, dims, c.values.shape[3]) != (args.num_key_value_heads, args.head_dim,
                                                 args.head_dim):
            refuse(f"layer {i} has {heads} KV heads of {dims} dims")
        if c.index and c.index_keys.shape[2] != args.index_head_dim:
            refuse(f"layer {i} has index keys of {c.index_keys.shape[2]} dims")
    limit = getattr(args, "max_position_embeddings", None)
    if cache and limit is not None and cache[0].offset > limit:
        refuse(f"{cache[0].offset} positions, beyond this model's context of {limit}")


def prompt_cache_bytes(cache: List[LayerCache]) -> int:
    return sum(c.nbytes for c in cache)
