"""The shapes the kernel checks cover, and the launches they make: M3's real geometry and the
shapes the kernel tests run (one home for both, so the strict compile check covers exactly
what the runtime tests run, and more).

Launches are built by the runtime's own planners on unevaluated `mx.zeros` stand-ins: only
shapes and dtypes matter for the generated source, and nothing gigabyte-sized is allocated.
"""

from __future__ import annotations

import mlx.core as mx

from m3mlx.metal_kernels import msa_kernels as K
from m3mlx.metal_kernels.kv import DEFAULT_GROUP, QuantizedKV, scale_dtype
from m3mlx.metal_kernels.moe import (DOWN, GATE_UP, ExpertWeights, QuantizedWeight, down_launch,
                                     gate_up_launch)

from .moe_cases import FORMATS, SMALL

# M3's MSA geometry: 4 KV / index heads of 16 query heads, head dim 128, blocks of 128, top-16.
M3_MSA = dict(B=1, H=4, G=16, D=128, DV=128, block=128, topk=16)
# M3's MoE geometry: hidden 6144, 128 experts of width 3072, top-4, one shared expert of 3072.
M3_MOE = dict(E=128, D=6144, F=3072, FS=3072, K=4)

# Index kernels: B, H, D, block, topk, offset, L, extra (see test_msl_index.py).
INDEX_SHAPES = [
    (1, 2, 8, 8, 4, 0, 37, 0),  # prefill from scratch, 37 not a multiple of the block
    (2, 2, 8, 8, 4, 50, 21, 11),  # chunk after a cache, buffer longer than needed
    (1, 2, 8, 8, 16, 20, 30, 0),  # fewer blocks than top-k: -1 padding
    (2, 2, 8, 8, 4, 203, 1, 5),  # decode, partial own block
    (1, 3, 40, 33, 5, 300, 1, 2),  # decode; block and head dim not multiples of 32
    (1, 3, 12, 33, 5, 300, 7, 2),  # prefill; head dim not a multiple of 8, 3 heads
    (1, 1, 8, 4, 6, 1101, 1, 0),  # decode over 275 blocks: the 8-simdgroup selection
    (1, 1, 8, 4, 40, 1101, 2, 0),  # top-40 of 275 blocks: more picks than a simdgroup has
]
# Attention kernels: B, H, G, D, DV, block, topk, offset, L, extra (see test_msl_attention.py).
ATTENTION_SHAPES = [
    (1, 2, 2, 8, 8, 8, 4, 0, 37, 0),  # prefill from scratch, 37 not a multiple of the block
    (2, 2, 3, 8, 12, 8, 4, 50, 21, 11),  # chunk after a cache, padded buffer, Dv != D
    (1, 1, 2, 8, 8, 8, 16, 20, 30, 0),  # fewer blocks than top-k
    (2, 2, 4, 8, 8, 8, 4, 203, 1, 5),  # decode, partial own block
    (1, 2, 3, 40, 36, 45, 3, 100, 1, 3),  # decode; sizes not multiples of 32, two parts a block
    (1, 1, 3, 40, 36, 45, 3, 100, 6, 3),  # prefill; the same, head dims not multiples of 8
    (1, 1, 5, 12, 20, 70, 3, 300, 9, 0),  # prefill: 5 heads, 9 queries, odd dims, block 70
]
# Inputs of fewer than 8 elements, which MLX passes in the `constant` address space.
CONSTANT_SPACE_SHAPES = [(1, 1, 2, 1, 1, 1, 2, 2, 1, 0), (1, 1, 2, 1, 1, 1, 2, 1, 2, 0)]
# Attention over compact and/or pooled K/V: the ATTENTION_SHAPES columns, then K/V bits (0:
# float), group size and paged (a pool of blocks read through slots); see test_msl_attention.py.
KV_ATTENTION_SHAPES = [
    (2, 2, 3, 32, 64, 8, 4, 203, 1, 5, 8, 32, False),  # decode, 8-bit, Dv != D, partial block
    (1, 2, 4, 64, 32, 45, 3, 100, 1, 3, 4, 32, True),  # decode, 4-bit, pooled, two parts a block
    (1, 2, 3, 40, 36, 45, 3, 100, 1, 3, 0, 32, True),  # decode, float K/V, pooled
    (2, 2, 3, 64, 64, 8, 4, 50, 21, 11, 4, 64, False),  # prefill after a cache, 4-bit g64
    (1, 1, 5, 32, 32, 70, 3, 300, 9, 0, 8, 32, True),  # prefill, 8-bit, pooled, block 70
    (1, 1, 3, 40, 36, 45, 3, 100, 6, 3, 0, 32, True),  # prefill, float K/V, pooled
]


def index_launches(B, H, D, block, topk, offset, L, extra, dtype=mx.float32, int8=False):
    """(spec, launch) of index_topk's two kernels."""
    S = offset + L + extra
    q = mx.zeros((B, H, L, D), dtype)
    keys = mx.zeros((B, S, D), mx.int8 if int8 else dtype)
    scales = mx.zeros((B, S), mx.float32) if int8 else None
    if L == 1:
        scores = (K.INDEX_SCORES, K.index_scores_launch(q, keys, offset, block, scales))
    else:
        scores = (K.INDEX_SCORES_MMA, K.index_scores_mma_launch(q, keys, offset, block, scales))
    n_cols = scores[1].output_shapes[0][-1]
    select = K.index_select_launch(mx.zeros((B, H, L, n_cols), mx.float32), offset, block, topk)
    return [scores, (K.INDEX_SELECT, select)]


def compact_rows(shape, bits, group, dtype=mx.float32) -> QuantizedKV:
    """A stand-in compact K or V of float rows `shape` (scales as the cache stores them)."""
    *lead, S, D = shape
    scales = mx.zeros((*lead, S, D // group), scale_dtype(dtype))
    return QuantizedKV(mx.zeros((*lead, S, D * bits // 32), mx.uint32), scales, scales, bits,
                       group)


def attention_launches(B, H, G, D, DV, block, topk, offset, L, extra, dtype=mx.float32,
                       bits=0, group=32, paged=False):
    """(spec, launch) of sparse_attention's kernels (decode: split and merge), over float or
    compact (bits) K/V, contiguous or pooled (the pool as long as the buffer)."""
    S = offset + L + extra
    q, k = mx.zeros((B, H * G, L, D), dtype), mx.zeros((B, H, S, D), dtype)
    v, sel = mx.zeros((B, H, S, DV), dtype), mx.zeros((B, H, L, topk), mx.int32)
    if bits:
        k, v = compact_rows(k.shape, bits, group, dtype), compact_rows(v.shape, bits, group, dtype)
    slots = sel if paged else None
    if L > 1:
        return [(K.PREFILL_ATTENTION,
                 K.prefill_attention_launch(q, k, v, sel, offset, 0.1, block, slots))]
    split = K.decode_attention_launch(q, k, v, sel, offset, 0.1, block, slots)
    o_part, ml_part = (mx.zeros(s, mx.float32) for s in split.output_shapes)
    return [(K.DECODE_ATTENTION, split),
            (K.DECODE_MERGE, K.decode_merge_launch(o_part, ml_part, dtype))]


def msa_launches(B, H, G, D, DV, block, topk, offset, L, extra, dtype=mx.float32, int8=False):
    return (index_launches(B, H, D, block, topk, offset, L, extra, dtype, int8)
            + attention_launches(B, H, G, D, DV, block, topk, offset, L, extra, dtype))


def m3_msa_launches(context: int, L: int, dtype=mx.bfloat16, int8=False):
    """M3's sparse layer at `context` tokens, decode (L == 1) or a prefill chunk of L."""
    g = M3_MSA
    return msa_launches(g["B"], g["H"], g["G"], g["D"], g["DV"], g["block"], g["topk"],
                        context - L, L, 0, dtype, int8)


def m3_kv_attention_launches(context: int, L: int, bits: int, paged: bool,
                             dtype=mx.bfloat16):
    """M3's sparse attention over compact K/V at `context` tokens (the default group size)."""
    g = M3_MSA
    return attention_launches(g["B"], g["H"], g["G"], g["D"], g["DV"], g["block"], g["topk"],
                              context - L, L, 0, dtype, bits, DEFAULT_GROUP[bits], paged)


def quantized(fmt, shape, float_dtype=mx.bfloat16) -> QuantizedWeight:
    mode, bits, group = fmt
    lead, (out, inp) = shape[:-2], shape[-2:]
    biases = mx.zeros((*lead, out, inp // group), float_dtype) if mode == "affine" else None
    scale_dtype = float_dtype if mode == "affine" else mx.uint8
    return QuantizedWeight(mx.zeros((*lead, out, inp * bits // 32), mx.uint32),
                           mx.zeros((*lead, out, inp // group), scale_dtype), biases, group,
                           bits, mode)


def moe_launches(fmt, T, E, D, F, FS, K, shared_fmt=None, dtype=mx.bfloat16, slots=None):
    """(spec, launch) of the MoE op's two kernels; FS 0: no shared expert. Affine scales and
    biases are in `dtype`, as `mx.quantize` makes them from weights in it. `slots`: the
    experts stream (m3mlx.experts), a pool of that many slots behind a table of E entries."""
    rows = E if slots is None else slots
    table = None if slots is None else mx.zeros((E,), mx.int32)
    experts = ExpertWeights(*(quantized(fmt, s, dtype)
                              for s in ((rows, F, D), (rows, F, D), (rows, D, F))))
    shared = None
    if FS:
        sf = shared_fmt or fmt
        shared = ExpertWeights(*(quantized(sf, s, dtype) for s in ((FS, D), (FS, D), (D, FS))))
    x = mx.zeros((T, D), dtype)
    ids, rw = mx.zeros((T, K), mx.uint32), mx.zeros((T, K), dtype)
    gate_up = gate_up_launch(x, ids, rw, experts, shared, 1.702, 7.0, table)
    h = mx.zeros(gate_up.output_shapes[0], mx.float32)
    return [(GATE_UP, gate_up), (DOWN, down_launch(h, ids, rw, experts, shared, dtype, table))]


def runtime_launches() -> list:
    """The launches the kernel tests run most (float32, their shape tables), for
    `harness.prebuild`: building them in parallel up front is what makes a first run fast."""
    pairs = []
    for shape in INDEX_SHAPES:
        pairs += index_launches(*shape)
    for shape in ATTENTION_SHAPES + CONSTANT_SPACE_SHAPES:
        pairs += msa_launches(*shape)
    pairs += index_launches(1, 4, 128, 128, 16, 2597, 1, 2, mx.bfloat16)
    pairs += index_launches(1, 4, 128, 128, 16, 2672, 20, 8, mx.float32, int8=True)
    pairs += attention_launches(1, 4, 16, 128, 128, 128, 16, 2597, 1, 2, mx.bfloat16)
    pairs += attention_launches(1, 1, 16, 128, 128, 128, 16, 2684, 8, 8)
    for shape in KV_ATTENTION_SHAPES:
        pairs += attention_launches(*shape[:10], mx.float32, *shape[10:])
    pairs += attention_launches(1, 4, 16, 128, 128, 128, 16, 2597, 1, 2, mx.bfloat16, 8, 64, True)
    pairs += attention_launches(1, 1, 16, 128, 128, 128, 16, 2684, 8, 8, mx.float32, 4, 32, True)
    for fmt in FORMATS.values():
        for T in (1, 8):
            pairs += moe_launches(fmt, T, **SMALL, dtype=mx.float32)
    return pairs
