"""Dense causal attention over a cache's K/V, float or compact (`kv.QuantizedKV`).

Dense-attention layers, and MSA layers up to top-k x block keys (where every visible block is
selected), attend to every cached key. Float K/V go to MLX's fused attention. Compact K/V up to
DENSE_TILE_KEYS keys are decoded and go the same way; past that they are read key tile by key
tile with an online softmax, each tile multiplied straight from its codes by MLX's quantized
matmul, so neither a decoded copy of the cache nor a score row over the whole context is ever
built. There is no Metal kernel here: MLX's own kernels do the work on a Mac.

Shapes: q [B, H*G, L, D] (queries at positions offset..offset+L-1, G query heads per KV head),
keys/values [B, H, S, D] with S >= offset + L (only the first offset + L rows are read).
"""

import mlx.core as mx

from .kv import QuantizedKV

DENSE_TILE_KEYS = 4096  # compact K/V up to this many keys is decoded at once
TILE_BYTES = 16 * 1024 * 1024  # bound on one tile's fp32 scores


def dense_attention(q, keys, values, *, offset: int, scale: float) -> mx.array:
    """Causal attention of q over the first offset + L keys: [B, H*G, L, Dv]."""
    L = q.shape[2]
    length = offset + L
    mask = "causal" if L > 1 else None
    if not isinstance(keys, QuantizedKV):
        return mx.fast.scaled_dot_product_attention(
            q, keys[..., :length, :], values[..., :length, :], scale=scale, mask=mask)
    if length <= DENSE_TILE_KEYS:
        k = keys.rows(0, length).dequantize(q.dtype)
        v = values.rows(0, length).dequantize(q.dtype)
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    return _tiled(q, keys, values, offset, scale)


def _qmm(x, w: QuantizedKV, transpose: bool) -> mx.array:
    return mx.quantized_matmul(x, *w.arrays, transpose=transpose, group_size=w.group_size,
                               bits=w.bits)


def _tiled(q, keys: QuantizedKV, values: QuantizedKV, offset, scale):
    """Flash-style: per key tile, scores from the codes, a running max and sum per row."""
    B, Hq, L, D = q.shape
    H = keys.shape[1]
    G = Hq // H
    length = offset + L
    rows = (q * scale).reshape(B, H, G * L, D)  # row g * L + t: head g, query t
    positions = offset + mx.arange(G * L, dtype=mx.int32) % L
    tile = max(128, TILE_BYTES // (B * Hq * L * 4) // 128 * 128)
    peak = mx.full((B, H, G * L, 1), -mx.inf, mx.float32)
    total = mx.zeros((B, H, G * L, 1), mx.float32)
    acc = None
    for start in range(0, length, tile):
        stop = min(length, start + tile)
        s = _qmm(rows, keys.rows(start, stop), transpose=True).astype(mx.float32)
        if stop > offset + 1:  # the causal cut falls inside this tile
            key_pos = mx.arange(start, stop, dtype=mx.int32)
            s = mx.where(key_pos <= positions[:, None], s, -mx.inf)
        new_peak = mx.maximum(peak, s.max(axis=-1, keepdims=True))  # finite: key 0 is visible
        rescale = mx.exp(peak - new_peak)
        p = mx.exp(s - new_peak)
        total = total * rescale + p.sum(axis=-1, keepdims=True)
        pv = _qmm(p.astype(q.dtype), values.rows(start, stop), transpose=False)
        acc = pv.astype(mx.float32) if acc is None else acc * rescale + pv.astype(mx.float32)
        peak = new_peak
        mx.eval(acc, total, peak)  # one tile's temporaries at a time
    out = (acc / total).astype(q.dtype)
    return out.reshape(B, H, G, L, -1).reshape(B, Hq, L, -1)
