"""Metal kernels for MSA: their specs, launch plans and the functions composing them.

Each kernel is a `KernelSpec` (the arguments of `mx.fast.metal_kernel`, its body read from a
`.metal` file next to this one, `msa_common.metal` as its header) plus a planner returning a
`Launch` (the arguments of one call: inputs, template, grid in threads, threadgroup, outputs).
The op functions (`index_topk`, `sparse_attention`) chain launches through a `run` callable:
`metal_run` on a Mac builds each kernel once, lazily, and dispatches it; the test harness
(`tests/msl`) passes its own runner, which compiles the same body with the same generated
signature as C++ and runs it on an emulated grid. So the harness exercises this exact code.

Plans, bytes moved and implied times: KERNELS.md. Geometry limits: a kernel needs its
threadgroup memory to fit in 32 KB (head dims up to about 240) and top-k / tiles as asserted
below; `*_supported` report whether a shape fits, and `m3mlx.metal_kernels.msa` falls back to the
MLX-ops twin when it does not.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable

import mlx.core as mx

HERE = Path(__file__).resolve().parent
THREADGROUP_MEMORY = 32 * 1024
SIMD = 32
FLOATS = (mx.float32, mx.float16, mx.bfloat16)


@dataclass(frozen=True)
class KernelSpec:
    """What `mx.fast.metal_kernel` is built from."""

    name: str
    input_names: tuple
    output_names: tuple
    source_file: str
    header_files: tuple = ("msa_common.metal",)
    ensure_row_contiguous: bool = False  # bodies address every input through its strides
    atomic_outputs: bool = False

    @property
    def source(self) -> str:
        return _read(self.source_file)

    @property
    def header(self) -> str:
        return "".join(_read(f) for f in self.header_files)


@dataclass
class Launch:
    """One call of a kernel: `kernel(inputs=..., template=..., grid=..., ...)`."""

    inputs: list
    output_shapes: list
    output_dtypes: list
    grid: tuple
    threadgroup: tuple
    template: list = field(default_factory=list)
    init_value: float | None = None


Runner = Callable[[KernelSpec, Launch], list]


@lru_cache(maxsize=None)
def _read(name: str) -> str:
    return (HERE / name).read_text()


INDEX_SCORES = KernelSpec(
    "msa_index_scores", ("q", "keys", "scales", "offset"), ("scores",), "msa_index_scores.metal")
INDEX_SELECT = KernelSpec(
    "msa_index_select", ("scores", "offset"), ("selection",), "msa_index_select.metal")
DECODE_ATTENTION = KernelSpec(
    "msa_decode_attention",
    ("q", "keys", "values", "selection", "offset", "scale"),
    ("o_part", "ml_part"),
    "msa_decode_attention.metal",
)
DECODE_MERGE = KernelSpec(
    "msa_decode_merge", ("o_part", "ml_part"), ("out",), "msa_decode_merge.metal",
    header_files=())
PREFILL_ATTENTION = KernelSpec(
    "msa_prefill_attention",
    ("q", "keys", "values", "selection", "offset", "scale"),
    ("out",),
    "msa_prefill_attention.metal",
)
SPECS = (INDEX_SCORES, INDEX_SELECT, DECODE_ATTENTION, DECODE_MERGE, PREFILL_ATTENTION)

# Threadgroup plans (see KERNELS.md).
SCORES_SIMDGROUPS = 4
SCORES_PREFILL_TILE = 4  # queries per threadgroup in prefill chunks; decode uses 1
SELECT_SIMDGROUPS_SMALL, SELECT_SIMDGROUPS_LARGE, SELECT_LARGE_FROM = 1, 8, 256  # columns
DECODE_SIMDGROUPS = 4
PREFILL_SIMDGROUPS = 8
PREFILL_ROWS = 64  # (query, head) rows per prefill threadgroup: TQ = PREFILL_ROWS // G
MAX_TOPK = 64
MERGE_THREADS = 32


# ---------------------------------------------------------------------------------------------
# Running on Metal
# ---------------------------------------------------------------------------------------------

_built: dict[str, object] = {}


def _kernel(spec: KernelSpec):
    """The `mx.fast.metal_kernel` for `spec`, built on first use (one Metal library each)."""
    if not mx.metal.is_available():
        raise RuntimeError(f"{spec.name}: Metal is not available; use the MLX-ops path")
    kernel = _built.get(spec.name)
    if kernel is None:
        kernel = mx.fast.metal_kernel(
            name=spec.name,
            input_names=list(spec.input_names),
            output_names=list(spec.output_names),
            source=spec.source,
            header=spec.header,
            ensure_row_contiguous=spec.ensure_row_contiguous,
            atomic_outputs=spec.atomic_outputs,
        )
        _built[spec.name] = kernel
    return kernel


def metal_run(spec: KernelSpec, launch: Launch) -> list:
    return _kernel(spec)(
        inputs=launch.inputs,
        template=launch.template,
        grid=launch.grid,
        threadgroup=launch.threadgroup,
        output_shapes=launch.output_shapes,
        output_dtypes=launch.output_dtypes,
        init_value=launch.init_value,
    )


# ---------------------------------------------------------------------------------------------
# Block selection: index scores, then top-k
# ---------------------------------------------------------------------------------------------


def _tile_floats(d: int, dv: int = 0) -> int:
    """Floats of the 32-row staging tile: rows padded to D + 1 (and wide enough for DV)."""
    return SIMD * max(d + 1, dv)


def index_topk_supported(index_q, index_keys, block_size, topk, index_scales=None) -> bool:
    D = index_q.shape[-1]
    key_ok = index_keys.dtype in FLOATS or (
        index_keys.dtype == mx.int8 and index_scales is not None)
    return (index_q.dtype in FLOATS and key_ok and 1 <= topk <= MAX_TOPK
            and block_size >= 1 and _tile_floats(D) * 4 <= THREADGROUP_MEMORY)


def index_scores_launch(index_q, index_keys, offset, block_size, index_scales=None) -> Launch:
    B, H, L, D = index_q.shape
    quant = index_scales is not None
    tq = 1 if L == 1 else SCORES_PREFILL_TILE
    n_cols = max((offset + L - 1) // block_size, 1)
    threads = SIMD * SCORES_SIMDGROUPS
    scales = index_scales if quant else mx.zeros((1,), mx.float32)  # never read
    return Launch(
        inputs=[index_q, index_keys, scales, offset],
        output_shapes=[(B, H, L, n_cols)],
        output_dtypes=[mx.float32],
        grid=(n_cols * threads, -(-L // tq), B),
        threadgroup=(threads, 1, 1),
        template=[("H", H), ("D", D), ("BLOCK", block_size), ("TQ", tq),
                  ("NSG", SCORES_SIMDGROUPS), ("QUANT", quant)],
    )


def index_select_launch(scores, offset, block_size, topk) -> Launch:
    B, H, L, n_cols = scores.shape
    nsg = SELECT_SIMDGROUPS_LARGE if n_cols >= SELECT_LARGE_FROM else SELECT_SIMDGROUPS_SMALL
    threads = SIMD * nsg
    return Launch(
        inputs=[scores, offset],
        output_shapes=[(B, H, L, topk)],
        output_dtypes=[mx.int32],
        grid=(threads, L, B * H),
        threadgroup=(threads, 1, 1),
        template=[("BLOCK", block_size), ("TOPK", topk), ("NSG", nsg)],
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
    (scores,) = run(INDEX_SCORES,
                    index_scores_launch(index_q, index_keys, offset, block_size, index_scales))
    (selection,) = run(INDEX_SELECT, index_select_launch(scores, offset, block_size, topk))
    return selection


# ---------------------------------------------------------------------------------------------
# Sparse attention: decode (split over blocks, then merge) and prefill (query tiles)
# ---------------------------------------------------------------------------------------------


def _prefill_tile(G: int) -> int:
    return max(1, min(32, PREFILL_ROWS // G))


def _attention_threadgroup_bytes(G, D, DV, topk, L) -> int:
    if L == 1:
        rows = -(-G // DECODE_SIMDGROUPS)
        return 4 * (_tile_floats(D, DV) + DECODE_SIMDGROUPS * rows * SIMD)
    tq = _prefill_tile(G)
    rows = -(-(tq * G) // PREFILL_SIMDGROUPS)
    return 4 * (_tile_floats(D, DV) + PREFILL_SIMDGROUPS * rows * SIMD + 4 * tq * topk)


def sparse_attention_supported(q, keys, values, selection, block_size) -> bool:
    B, Hq, L, D = q.shape
    H, DV, topk = keys.shape[1], values.shape[-1], selection.shape[-1]
    return (q.dtype in FLOATS and keys.dtype in FLOATS and values.dtype in FLOATS
            and Hq % H == 0 and 1 <= topk <= MAX_TOPK and block_size >= 1
            and _attention_threadgroup_bytes(Hq // H, D, DV, topk, L) <= THREADGROUP_MEMORY)


def decode_attention_launch(q, keys, values, selection, offset, scale, block_size) -> Launch:
    B, Hq, _, D = q.shape
    H, DV, topk = keys.shape[1], values.shape[-1], selection.shape[-1]
    G = Hq // H
    threads = SIMD * DECODE_SIMDGROUPS
    return Launch(
        inputs=[q, keys, values, selection, offset, float(scale)],
        output_shapes=[(B, H, topk, G, DV), (B, H, topk, G, 2)],
        output_dtypes=[mx.float32, mx.float32],
        grid=(threads, topk, B * H),
        threadgroup=(threads, 1, 1),
        template=[("G", G), ("D", D), ("DV", DV), ("BLOCK", block_size),
                  ("NSG", DECODE_SIMDGROUPS)],
    )


def decode_merge_launch(o_part, ml_part, dtype) -> Launch:
    B, H, _, G, DV = o_part.shape
    return Launch(
        inputs=[o_part, ml_part],
        output_shapes=[(B, H * G, 1, DV)],
        output_dtypes=[dtype],
        grid=(DV, G, B * H),
        threadgroup=(MERGE_THREADS, 1, 1),
        template=[("T", dtype), ("G", G), ("DV", DV)],
    )


def prefill_attention_launch(q, keys, values, selection, offset, scale, block_size) -> Launch:
    B, Hq, L, D = q.shape
    H, DV, topk = keys.shape[1], values.shape[-1], selection.shape[-1]
    G = Hq // H
    tq = _prefill_tile(G)
    threads = SIMD * PREFILL_SIMDGROUPS
    return Launch(
        inputs=[q, keys, values, selection, offset, float(scale)],
        output_shapes=[(B, Hq, L, DV)],
        output_dtypes=[values.dtype],
        grid=(threads, -(-L // tq), B * H),
        threadgroup=(threads, 1, 1),
        template=[("T", values.dtype), ("G", G), ("D", D), ("DV", DV), ("BLOCK", block_size),
                  ("TOPK", topk), ("TQ", tq), ("NSG", PREFILL_SIMDGROUPS)],
    )


def sparse_attention(q, keys, values, selection, offset, scale, block_size,
                     run: Runner | None = None):
    """Attention over the selected blocks with the Metal kernels: [B, H*G, L, Dv]."""
    run = run or metal_run
    B, Hq, L, D = q.shape
    if keys.ndim != 4 or keys.shape[0] != B or keys.shape[3] != D or Hq % keys.shape[1]:
        raise ValueError(f"keys {keys.shape} do not match q {q.shape}")
    if values.shape[:3] != keys.shape[:3]:
        raise ValueError(f"values {values.shape} do not match keys {keys.shape}")
    if selection.shape[:3] != (B, keys.shape[1], L):
        raise ValueError(f"selection {selection.shape} does not match q {q.shape}")
    if not sparse_attention_supported(q, keys, values, selection, block_size):
        raise ValueError("no Metal attention kernel for this geometry or dtype; use the ops path")
    if selection.dtype != mx.int32:
        selection = selection.astype(mx.int32)
    if L == 1:
        o_part, ml_part = run(DECODE_ATTENTION, decode_attention_launch(
            q, keys, values, selection, offset, scale, block_size))
        (out,) = run(DECODE_MERGE, decode_merge_launch(o_part, ml_part, values.dtype))
        return out
    (out,) = run(PREFILL_ATTENTION, prefill_attention_launch(
        q, keys, values, selection, offset, scale, block_size))
    return out
