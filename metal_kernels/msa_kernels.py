"""Metal kernels for MSA: their specs, launch plans and the functions composing them.

Each kernel is a `KernelSpec` (`kernel.py`) with its body in a `.metal` file next to this one and
`msa_common.metal` as its header, plus a planner returning a `Launch`. The op functions
(`index_topk`, `sparse_attention`) chain launches through a `run` callable: `metal_run` on a Mac,
the test harness's runner under `tests/msl`.

Plans, footprints, bytes moved and predicted times: KERNELS.md (its tables come from `cost.py`,
which reads the footprints defined here). A kernel needs its threadgroup memory within 32 KB and
its per-thread arrays within a register budget; `*_supported` report whether a shape fits, and
the public ops (`msa.py`) run the MLX-ops twin when it does not.
"""

from __future__ import annotations

from functools import lru_cache

import mlx.core as mx

from .kernel import (FLOATS, SIMD, Footprint, KernelSpec, Launch, Runner, ceil_div, metal_run,
                     placeholder)
from .kv import GROUP_SIZES, KV_BITS, QuantizedKV

HEADER = ("msa_common.metal",)
INDEX_SCORES = KernelSpec(
    "msa_index_scores", ("q", "keys", "scales", "offset"), ("scores",), "msa_index_scores.metal",
    HEADER)
INDEX_SCORES_MMA = KernelSpec(
    "msa_index_scores_mma", ("q", "keys", "scales", "offset"), ("scores",),
    "msa_index_scores_mma.metal", HEADER)
INDEX_SELECT = KernelSpec(
    "msa_index_select", ("scores", "offset"), ("selection",), "msa_index_select.metal", HEADER)
# The attention kernels read float or compact K/V (KV_BITS), contiguous or as a pool of blocks
# (PAGED); inputs a variant does not use are one-element placeholders (`kv_inputs`).
KV_INPUTS = ("q", "keys", "k_scales", "k_biases", "values", "v_scales", "v_biases",
             "selection", "slots", "offset", "scale")
DECODE_ATTENTION = KernelSpec(
    "msa_decode_attention", KV_INPUTS, ("o_part", "ml_part"), "msa_decode_attention.metal",
    HEADER)
DECODE_MERGE = KernelSpec(
    "msa_decode_merge", ("o_part", "ml_part"), ("out",), "msa_decode_merge.metal")
PREFILL_ATTENTION = KernelSpec(
    "msa_prefill_attention", KV_INPUTS, ("out",), "msa_prefill_attention.metal", HEADER)
SPECS = (INDEX_SCORES, INDEX_SCORES_MMA, INDEX_SELECT, DECODE_ATTENTION, DECODE_MERGE,
         PREFILL_ATTENTION)

# Threadgroup plans (see KERNELS.md).
SCORES_SIMDGROUPS = 4  # decode scores: one (query, head) row per simdgroup at M3's 4 heads
SCORES_MMA_SIMDGROUPS = 8  # prefill scores: 64 (query, head) rows of 8 per simdgroup
SCORES_BLOCKS_PER_GROUP = 4  # prefill scores: key blocks per threadgroup (query rows loaded once)
SELECT_SIMDGROUPS_SMALL, SELECT_SIMDGROUPS_LARGE, SELECT_LARGE_FROM = 1, 8, 256  # columns
DECODE_SIMDGROUPS = 4
DECODE_KEYS = 32  # keys per decode threadgroup: a selected block is split into BLOCK / 32 parts
PREFILL_SIMDGROUPS = 8
PREFILL_ROWS = 64  # (query, head) rows per prefill threadgroup: TQ = PREFILL_ROWS // G
PREFILL_KEYS = 16  # keys per staged prefill chunk (KC in the kernel)
MAX_TOPK = 64
MERGE_THREADS = 32
MATRIX_REGISTERS = 2  # a simdgroup_float8x8 holds 64 floats over 32 lanes


def _pad8(n: int) -> int:
    return ceil_div(n, 8) * 8


# Footprints, mirroring each kernel's declarations (the harness checks the threadgroup bytes).

def index_scores_footprint(H, D) -> Footprint:
    per_sg = ceil_div(H, SCORES_SIMDGROUPS)
    return Footprint(4 * (H * D + SIMD * (D + 1)), 2 * per_sg)  # best[], dot[]


def index_scores_mma_footprint(D) -> Footprint:
    nsg, d8 = SCORES_MMA_SIMDGROUPS, _pad8(D)
    tg = 4 * (SIMD * (d8 + 4) + nsg * 8 * SIMD + SIMD)
    return Footprint(tg, MATRIX_REGISTERS * (d8 // 8 + 4 + 1))  # qf[], acc[4], kf


def select_threads(n_cols: int) -> int:
    large = n_cols >= SELECT_LARGE_FROM
    return SIMD * (SELECT_SIMDGROUPS_LARGE if large else SELECT_SIMDGROUPS_SMALL)


def index_select_footprint(topk, threads) -> Footprint:
    kl = max(topk - 1, 1)
    return Footprint(3 * 4 * (threads // SIMD) * kl, 2 * kl)  # ls[], li[]


def decode_attention_footprint(G, D, DV, kv_bits=0) -> Footprint:
    threads = SIMD * DECODE_SIMDGROUPS
    rows, cpt = ceil_div(G, DECODE_SIMDGROUPS), ceil_div(DV, threads)
    tile = DECODE_KEYS * (max(D, DV) + 1 if kv_bits else D + 1)  # compact: values reuse it
    return Footprint(4 * (G * D + tile + G * DECODE_KEYS), rows + G * cpt)


def prefill_tile(G: int) -> int:
    """Queries per prefill threadgroup."""
    return max(1, min(32, PREFILL_ROWS // G))


def prefill_attention_footprint(G, D, DV, topk, paged=False) -> Footprint:
    nsg, kc, tq = PREFILL_SIMDGROUPS, PREFILL_KEYS, prefill_tile(G)
    d8, dv8 = _pad8(D), _pad8(DV)
    stage = kc * (d8 + 4 + dv8 + 4)
    ids = (6 if paged else 4) * tq * topk + (0 if paged else 2)  # + the 1-int placeholders
    tg = 4 * (stage + nsg * 8 * kc + nsg * 64 + ids)
    matrices = d8 // 8 + dv8 // 8 + kc // 8 + 3  # qf[], of[], sf[], kf / pf / vf
    return Footprint(tg, MATRIX_REGISTERS * matrices + kc // 4)  # + s[]


# ---------------------------------------------------------------------------------------------
# Block selection: index scores, then top-k
# ---------------------------------------------------------------------------------------------


def index_topk_supported(index_q, index_keys, block_size, topk, index_scales=None) -> bool:
    B, H, L, D = index_q.shape
    key_ok = index_keys.dtype in FLOATS or (
        index_keys.dtype == mx.int8 and index_scales is not None)
    if not (index_q.dtype in FLOATS and key_ok and 1 <= topk <= MAX_TOPK and block_size >= 1):
        return False
    if L == 1:
        return index_scores_footprint(H, D).fits
    return H <= 8 * SCORES_MMA_SIMDGROUPS and index_scores_mma_footprint(D).fits


def _n_cols(offset, L, block_size) -> int:
    return max((offset + L - 1) // block_size, 1)


def _scales(index_scales):
    return index_scales if index_scales is not None else placeholder(mx.float32)  # never read


@lru_cache(maxsize=None)
def _scores_template(H, D, block_size, quant) -> tuple:
    return (("H", H), ("D", D), ("BLOCK", block_size), ("NSG", SCORES_SIMDGROUPS),
            ("QUANT", quant))


def index_scores_launch(index_q, index_keys, offset, block_size, index_scales=None) -> Launch:
    """Decode (L == 1): one threadgroup per key block and batch row."""
    B, H, _, D = index_q.shape
    n_cols = _n_cols(offset, 1, block_size)
    threads = SIMD * SCORES_SIMDGROUPS
    return Launch(
        inputs=[index_q, index_keys, _scales(index_scales), offset],
        output_shapes=[(B, H, 1, n_cols)],
        output_dtypes=[mx.float32],
        grid=(n_cols * threads, 1, B),
        threadgroup=(threads, 1, 1),
        template=_scores_template(H, D, block_size, index_scales is not None),
    )


@lru_cache(maxsize=None)
def _scores_mma_template(H, D, block_size, quant) -> tuple:
    tq = 8 * SCORES_MMA_SIMDGROUPS // H
    return (("H", H), ("D", D), ("BLOCK", block_size), ("TQ", tq),
            ("NSG", SCORES_MMA_SIMDGROUPS), ("JB", SCORES_BLOCKS_PER_GROUP), ("QUANT", quant))


def index_scores_mma_launch(index_q, index_keys, offset, block_size,
                            index_scales=None) -> Launch:
    """Prefill chunks (L > 1): query tiles fastest, JB key blocks per threadgroup."""
    B, H, L, D = index_q.shape
    n_cols = _n_cols(offset, L, block_size)
    threads = SIMD * SCORES_MMA_SIMDGROUPS
    template = _scores_mma_template(H, D, block_size, index_scales is not None)
    tq = template[3][1]
    return Launch(
        inputs=[index_q, index_keys, _scales(index_scales), offset],
        output_shapes=[(B, H, L, n_cols)],
        output_dtypes=[mx.float32],
        grid=(ceil_div(L, tq) * threads, ceil_div(n_cols, SCORES_BLOCKS_PER_GROUP), B),
        threadgroup=(threads, 1, 1),
        template=template,
    )


def index_select_launch(scores, offset, block_size, topk) -> Launch:
    B, H, L, n_cols = scores.shape
    threads = select_threads(n_cols)
    return Launch(
        inputs=[scores, offset],
        output_shapes=[(B, H, L, topk)],
        output_dtypes=[mx.int32],
        grid=(threads, L, B * H),
        threadgroup=(threads, 1, 1),
        template=(("BLOCK", block_size), ("TOPK", topk), ("NSG", threads // SIMD)),
    )


def index_topk(index_q, index_keys, offset, block_size, topk, index_scales=None,
               run: Runner | None = None):
    """Block selection with the Metal kernels: int32 [B, H, L, topk], the twin's contract."""
    run = run or metal_run
    B, H, L, D = index_q.shape
    if index_keys.ndim != 3 or index_keys.shape[0] != B or index_keys.shape[2] != D:
        raise ValueError(f"index_keys {index_keys.shape} does not match index_q {index_q.shape}")
    if index_keys.shape[1] < offset + L:
        raise ValueError(f"index_keys hold {index_keys.shape[1]} positions; queries reach "
                         f"{offset + L}")
    if not index_topk_supported(index_q, index_keys, block_size, topk, index_scales):
        raise ValueError("no Metal index kernel for this geometry or dtype; use the ops path")
    if L == 1:
        spec, launch = INDEX_SCORES, index_scores_launch(
            index_q, index_keys, offset, block_size, index_scales)
    else:
        spec, launch = INDEX_SCORES_MMA, index_scores_mma_launch(
            index_q, index_keys, offset, block_size, index_scales)
    (scores,) = run(spec, launch)
    (selection,) = run(INDEX_SELECT, index_select_launch(scores, offset, block_size, topk))
    return selection


# ---------------------------------------------------------------------------------------------
# Sparse attention: decode (split over block parts, then merge) and prefill (query tiles)
# ---------------------------------------------------------------------------------------------


def compact_supported(x) -> bool:
    """A QuantizedKV the kernels decode: 8 or 4 bits, float scales, rows of whole words."""
    return (x.bits in KV_BITS and x.group_size in GROUP_SIZES and x.scales.dtype in FLOATS
            and x.biases.dtype == x.scales.dtype and x.shape[-1] % x.group_size == 0)


def _kv_format(keys, values):
    """(KV_BITS, KV_GROUP) of K/V both float (0, 32) or both compact alike; None otherwise."""
    compact = [isinstance(x, QuantizedKV) for x in (keys, values)]
    if not any(compact):
        return (0, 32) if keys.dtype in FLOATS and values.dtype in FLOATS else None
    if not all(compact) or not all(compact_supported(x) for x in (keys, values)):
        return None
    if (keys.bits, keys.group_size) != (values.bits, values.group_size):
        return None
    return keys.bits, keys.group_size


def sparse_attention_supported(q, keys, values, selection, block_size) -> bool:
    B, Hq, L, D = q.shape
    H, DV, topk = keys.shape[1], values.shape[-1], selection.shape[-1]
    fmt = _kv_format(keys, values)
    if not (q.dtype in FLOATS and fmt is not None and Hq % H == 0 and 1 <= topk <= MAX_TOPK
            and block_size >= 1):
        return False
    G = Hq // H
    if L == 1:
        return decode_attention_footprint(G, D, DV, fmt[0]).fits
    return G <= PREFILL_ROWS and prefill_attention_footprint(G, D, DV, topk, True).fits


def decode_parts(block_size: int) -> int:
    """Threadgroups (and partials) per selected block in decode."""
    return ceil_div(block_size, DECODE_KEYS)


def kv_inputs(keys, values, selection, slots) -> list:
    """The K/V inputs of the attention kernels, in KV_INPUTS order after q: codes or floats,
    scales and biases (placeholders for float K/V), the selection and the slots."""
    out = []
    for x in (keys, values):
        if isinstance(x, QuantizedKV):
            out += list(x.arrays)
        else:
            out += [x, placeholder(mx.float32), placeholder(mx.float32)]
    return out + [selection, slots if slots is not None else placeholder(mx.int32)]


def _kv_template(keys, values, slots) -> tuple:
    bits, group = _kv_format(keys, values)
    return (("KV_BITS", bits), ("KV_GROUP", group), ("PAGED", slots is not None))


def out_dtype(q, values):
    """The attention output's type: the values', or q's for compact values (as the twin)."""
    return q.dtype if isinstance(values, QuantizedKV) else values.dtype


def decode_attention_launch(q, keys, values, selection, offset, scale, block_size,
                            slots=None) -> Launch:
    B, Hq, _, D = q.shape
    H, DV, topk = keys.shape[1], values.shape[-1], selection.shape[-1]
    G = Hq // H
    parts = topk * decode_parts(block_size)
    threads = SIMD * DECODE_SIMDGROUPS
    return Launch(
        inputs=[q, *kv_inputs(keys, values, selection, slots), offset, float(scale)],
        output_shapes=[(B, H, parts, G, DV), (B, H, parts, G, 2)],
        output_dtypes=[mx.float32, mx.float32],
        grid=(threads, parts, B * H),
        threadgroup=(threads, 1, 1),
        template=(("G", G), ("D", D), ("DV", DV), ("BLOCK", block_size),
                  ("NSG", DECODE_SIMDGROUPS), *_kv_template(keys, values, slots)),
    )


def decode_merge_launch(o_part, ml_part, dtype) -> Launch:
    B, H, _, G, DV = o_part.shape
    return Launch(
        inputs=[o_part, ml_part],
        output_shapes=[(B, H * G, 1, DV)],
        output_dtypes=[dtype],
        grid=(DV, G, B * H),
        threadgroup=(MERGE_THREADS, 1, 1),
        template=(("T", dtype), ("G", G), ("DV", DV)),
    )


def prefill_attention_launch(q, keys, values, selection, offset, scale, block_size,
                             slots=None) -> Launch:
    B, Hq, L, D = q.shape
    H, DV, topk = keys.shape[1], values.shape[-1], selection.shape[-1]
    G = Hq // H
    tq = prefill_tile(G)
    threads = SIMD * PREFILL_SIMDGROUPS
    dtype = out_dtype(q, values)
    return Launch(
        inputs=[q, *kv_inputs(keys, values, selection, slots), offset, float(scale)],
        output_shapes=[(B, Hq, L, DV)],
        output_dtypes=[dtype],
        grid=(threads, ceil_div(L, tq), B * H),
        threadgroup=(threads, 1, 1),
        template=(("T", dtype), ("G", G), ("D", D), ("DV", DV), ("BLOCK", block_size),
                  ("TOPK", topk), ("TQ", tq), ("NSG", PREFILL_SIMDGROUPS),
                  *_kv_template(keys, values, slots)),
    )


def sparse_attention(q, keys, values, selection, offset, scale, block_size,
                     run: Runner | None = None, slots=None):
    """Attention over the selected blocks with the Metal kernels: [B, H*G, L, Dv]; K/V float
    or compact, contiguous or a pool of blocks read through `slots` (the twin's contract)."""
    run = run or metal_run
    B, Hq, L, D = q.shape
    if keys.ndim != 4 or keys.shape[0] != B or keys.shape[3] != D or Hq % keys.shape[1]:
        raise ValueError(f"keys {keys.shape} do not match q {q.shape}")
    if values.shape[:3] != keys.shape[:3]:
        raise ValueError(f"values {values.shape} do not match keys {keys.shape}")
    if selection.shape[:3] != (B, keys.shape[1], L):
        raise ValueError(f"selection {selection.shape} does not match q {q.shape}")
    if slots is not None and slots.shape != selection.shape:
        raise ValueError(f"slots {slots.shape} do not match the selection {selection.shape}")
    if not sparse_attention_supported(q, keys, values, selection, block_size):
        raise ValueError("no Metal attention kernel for this geometry or dtype; use the ops path")
    if selection.dtype != mx.int32:
        selection = selection.astype(mx.int32)
    if slots is not None and slots.dtype != mx.int32:
        slots = slots.astype(mx.int32)
    if L == 1:
        o_part, ml_part = run(DECODE_ATTENTION, decode_attention_launch(
            q, keys, values, selection, offset, scale, block_size, slots))
        (out,) = run(DECODE_MERGE, decode_merge_launch(o_part, ml_part, out_dtype(q, values)))
        return out
    (out,) = run(PREFILL_ATTENTION, prefill_attention_launch(
        q, keys, values, selection, offset, scale, block_size, slots))
    return out
