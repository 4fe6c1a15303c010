"""Per-layer caches: K/V for every layer, plus index keys on MSA layers.

Buffers grow in steps that are whole MSA blocks, so the sparse ops can view them as blocks
without copying. Index keys can be stored as int8 with one scale per key (index_bits=8): at
long context the index-key scan dominates decode, and this halves (bf16) or quarters (fp32) it.
"""

import json
import os
from typing import Dict, List, Optional

import mlx.core as mx

from .metal_kernels import quantize_index_keys

STEP = 256  # a multiple of M3's 128-token block


class LayerCache:
    def __init__(self, index: bool = False, index_bits: Optional[int] = None):
        if index_bits not in (None, 8):
            raise ValueError(f"index_bits={index_bits}: index keys are stored full or 8-bit")
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
        n = min(self.offset, n)
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


def trim_prompt_cache(cache: List[LayerCache], n: int) -> int:
    return min(c.trim(n) for c in cache) if cache else 0


def save_prompt_cache(path: str, cache: List[LayerCache],
                      metadata: Optional[Dict[str, str]] = None):
    """Write every layer's cache (index keys included) and string metadata to one safetensors
    file, atomically."""
    arrays = {f"{i}.{name}": a for i, c in enumerate(cache) for name, a in c.state.items()}
    meta = {
        "m3mlx_cache": json.dumps([c.meta() for c in cache]),
        "user": json.dumps(metadata or {}),
    }
    tmp = f"{path}.tmp.safetensors"
    mx.save_safetensors(tmp, arrays, metadata=meta)
    os.replace(tmp, path)


def load_prompt_cache(path: str, return_metadata: bool = False):
    arrays, meta = mx.load(path, return_metadata=True)
    if "m3mlx_cache" not in meta:
        raise ValueError(f"{path} is not an m3mlx prompt cache (no 'm3mlx_cache' metadata)")
    layers = json.loads(meta["m3mlx_cache"])
    cache = []
    for i, layer_meta in enumerate(layers):
        prefix = f"{i}."
        state = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
        cache.append(LayerCache.from_state(state, layer_meta))
    if return_metadata:
        return cache, json.loads(meta["user"])
    return cache


def prompt_cache_bytes(cache: List[LayerCache]) -> int:
    return sum(c.nbytes for c in cache)
