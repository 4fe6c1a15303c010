"""MLX-ops implementations of the MSA ops: the runtime path off Metal and the Metal kernels' oracle.

Nothing here builds a [heads, L, S] tensor over the whole context. Index scores are computed in
tiles of (query rows x key blocks) and reduced to one max per block at once; attention gathers
only the selected blocks, pair by pair, with `mx.gather_mm`.

Shapes (B batch, H index heads = KV heads, G query heads per KV head, L queries, D head dim):
  index_q      [B, H, L, Di]     index queries after norm and RoPE
  index_keys   [B, S, Di]        index-key buffer (float, or int8 with `index_scales` [B, S])
  selection    [B, H, L, topk]   int32 block ids, valid ids first (ascending), -1 padding
  q            [B, H*G, L, D];   keys/values [B, H, S, D], float or compact (`kv.QuantizedKV`)
  slots        [B, H, L, topk]   optional: where each selected block is stored (see below)
Query t sits at absolute position `offset + t`; buffers may be longer than `offset + L`.

Compact K/V is decoded block by block, only for the selected blocks, inside the products
(`mx.gather_qmm`). With `slots`, keys/values are a pool of blocks per (batch, KV head): block
`selection[..., i]` (whose id still sets the positions, hence the masks) is read from block
`slots[..., i]` of the pool. A memory tier keeps a bounded pool that way; without slots, block j
is stored at block j.
"""

import mlx.core as mx

from .kv import QuantizedKV, block_matmul

# Bounds on one scores tile, so that no temporary grows with the context: a decode step's
# scan works through the index keys MAX_TILE_KEYS at a time.
TILE_BYTES = 16 * 1024 * 1024
MAX_TILE_KEYS = 64 * 1024


def quantize_index_keys(keys: mx.array):
    """Symmetric int8 per row: keys ~= q * scale. Returns (q int8, scale float32 [...])."""
    k = keys.astype(mx.float32)
    scale = mx.maximum(mx.abs(k).max(axis=-1), 1e-12) / 127.0
    q = mx.clip(mx.round(k / scale[..., None]), -127, 127).astype(mx.int8)
    return q, scale


def history_block_scores(index_q, index_keys, n_blocks, block_size, index_scales=None):
    """Max over each of the first `n_blocks` complete key blocks of dot(index_q, key), fp32.

    Returns [B, H, L, n_blocks]. No causal cut: callers only use blocks that lie wholly
    before the query's own block.
    """
    B, H, L, D = index_q.shape
    if n_blocks == 0:
        return mx.zeros((B, H, L, 0), mx.float32)
    q = index_q.astype(mx.float32)
    chunk = max(1, min(TILE_BYTES // (B * H * L * block_size * 4), MAX_TILE_KEYS // block_size))
    tiled = n_blocks > chunk
    parts = []
    for start in range(0, n_blocks, chunk):
        stop = min(n_blocks, start + chunk)
        keys = slice(start * block_size, stop * block_size)
        s = q @ index_keys[:, keys].astype(mx.float32)[:, None].swapaxes(-1, -2)  # [B,H,L,keys]
        if index_scales is not None:
            s = s * index_scales[:, None, None, keys]
        parts.append(_settled(s.reshape(B, H, L, stop - start, block_size).max(axis=-1), tiled))
    return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=-1)


def select_blocks(block_scores, own_block, topk):
    """Per row: the query's own block plus the top (topk - 1) earlier blocks.

    block_scores [..., L, N] fp32 over blocks 0..N-1; own_block int32 [L]. Blocks at or after
    the own block are ignored; NaN scores count as -1e30; ties go to the lower block id.
    Returns int32 [..., L, topk]: history ids ascending, then the own block, then -1.
    """
    n = block_scores.shape[-1]
    lead = block_scores.shape[:-1]
    ids = mx.arange(n, dtype=mx.int32)
    valid = ids < own_block[:, None]
    scores = mx.where(mx.isnan(block_scores), -1e30, block_scores)
    scores = mx.where(valid, scores, -mx.inf)
    kk = min(topk - 1, n)
    if kk > 0:
        threshold = mx.topk(scores, kk, axis=-1).min(axis=-1, keepdims=True)
        above = scores > threshold
        tied = (scores == threshold) & valid
        room = kk - above.astype(mx.int32).sum(axis=-1, keepdims=True)
        picked = above | (tied & (mx.cumsum(tied.astype(mx.int32), axis=-1) <= room))
    else:
        picked = mx.zeros(scores.shape, mx.bool_)
    rank = mx.cumsum(picked.astype(mx.int32), axis=-1) - 1
    slot = mx.where(picked, rank, topk)  # unpicked blocks land in a spill column
    out = mx.full((*lead, topk + 1), -1, mx.int32)
    out = mx.put_along_axis(out, slot, mx.broadcast_to(ids, slot.shape), axis=-1)
    count = picked.astype(mx.int32).sum(axis=-1, keepdims=True)
    own = mx.broadcast_to(own_block[:, None], count.shape).astype(mx.int32)
    out = mx.put_along_axis(out, count, own, axis=-1)
    return out[..., :topk]


def index_topk(index_q, index_keys, offset, block_size, topk, index_scales=None):
    """Block selection for L queries at positions offset..offset+L-1: int32 [B, H, L, topk]."""
    L = index_q.shape[2]
    positions = mx.arange(offset, offset + L, dtype=mx.int32)
    own = positions // block_size
    n_history = (offset + L - 1) // block_size
    scores = history_block_scores(index_q, index_keys, n_history, block_size, index_scales)
    return select_blocks(scores, own, topk)


def _settled(x, tiled):
    """Evaluate one tile's result now when there are several: MLX keeps a lazy graph's
    temporaries until it is evaluated, so untiled evaluation would hold every tile at once."""
    if tiled:
        mx.eval(x)
    return x


def _attend_tile(q_rows, k_blocks, v_blocks, sel, src, row_base, positions, scale, block_size,
                 dtype):
    """Sparse attention for one tile of query rows.

    q_rows [R, G, D]: one row per (batch, kv head, query) with its G query heads;
    k_blocks/v_blocks [N, block, D]: every stored block of every (batch, kv head);
    sel [R, k] block ids within the row's sequence (-1 padding), src [R, k] where they are
    stored; row_base [R] the flat index of the row's stored block 0; positions [R] the query
    positions; dtype the output's.
    """
    R, G, _ = q_rows.shape
    k = sel.shape[-1]
    valid = sel >= 0
    rhs = (row_base[:, None] + mx.maximum(src, 0)).reshape(-1).astype(mx.uint32)
    lhs = mx.repeat(mx.arange(R, dtype=mx.uint32), k)
    scores = block_matmul(q_rows * scale, k_blocks, lhs, rhs, transpose=True)
    scores = scores.astype(mx.float32).reshape(R, k, G, block_size)

    key_pos = sel[..., None] * block_size + mx.arange(block_size)
    keep = valid[..., None] & (key_pos <= positions[:, None, None])
    scores = mx.where(keep[:, :, None, :], scores, -mx.inf)
    peak = scores.max(axis=(1, 3), keepdims=True)
    weights = mx.exp(scores - peak)
    total = weights.sum(axis=(1, 3))  # [R, G]; normalizing the small output is cheaper
    pairs = mx.arange(R * k, dtype=mx.uint32)
    weights = weights.astype(dtype).reshape(R * k, G, block_size)
    out = block_matmul(weights, v_blocks, pairs, rhs, transpose=False)
    out = out.reshape(R, k, G, -1).sum(axis=1)
    return (out / total[..., None]).astype(dtype)


def _pad_blocks(x, block_size):
    """[B, H, S, W] -> [B*H*nblk, block, W], padding S up to a whole block (a view if aligned)."""
    B, H, S, W = x.shape
    pad = -S % block_size
    if pad:
        x = mx.pad(x, [(0, 0), (0, 0), (0, pad), (0, 0)])
    return x.reshape(B * H * ((S + pad) // block_size), block_size, W)


def as_blocks(x, block_size):
    """K or V [B, H, S, D] (an array or a QuantizedKV) as [B*H*nblk, block, D] blocks."""
    if isinstance(x, QuantizedKV):
        return x.map(lambda a: _pad_blocks(a, block_size))
    return _pad_blocks(x, block_size)


def sparse_attention(q, keys, values, selection, offset, scale, block_size, slots=None):
    """Attention of each query over its selected key blocks only: [B, H*G, L, Dv].

    Causal inside the query's own block; -1 slots are skipped; ids may come in any order.
    The output has the type of float values, or of q when they are compact.
    """
    B, Hq, L, D = q.shape
    H = keys.shape[1]
    G = Hq // H
    n_blocks = -(-keys.shape[2] // block_size)
    dtype = q.dtype if isinstance(values, QuantizedKV) else values.dtype
    k_blocks = as_blocks(keys, block_size)
    v_blocks = as_blocks(values, block_size)
    q_rows = q.reshape(B, H, G, L, D).transpose(0, 1, 3, 2, 4).reshape(B * H * L, G, D)
    sel = selection.reshape(B * H * L, -1)
    src = sel if slots is None else slots.reshape(B * H * L, -1)
    row_base = mx.repeat(mx.arange(B * H, dtype=mx.int32) * n_blocks, L)
    positions = mx.tile(mx.arange(offset, offset + L, dtype=mx.int32), B * H)

    rows_per_tile = max(1, TILE_BYTES // (sel.shape[-1] * G * block_size * 4))
    tiled = B * H * L > rows_per_tile
    outs = []
    for start in range(0, B * H * L, rows_per_tile):
        tile = slice(start, start + rows_per_tile)
        out = _attend_tile(q_rows[tile], k_blocks, v_blocks, sel[tile], src[tile],
                           row_base[tile], positions[tile], scale, block_size, dtype)
        outs.append(_settled(out, tiled))
    out = outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=0)
    return out.reshape(B, H, L, G, -1).transpose(0, 1, 3, 2, 4).reshape(B, Hq, L, -1)
