"""The MoE block for decode: routed experts plus the shared expert, for 1 to 8 tokens per call.

`moe_decode(x, expert_ids, routing_weights, experts, shared)` computes, for each token t,

    sum_i routing_weights[t, i] * Expert_{expert_ids[t, i]}(x[t])  +  Shared(x[t])

with Expert(x) = down(SwiGLU-OAI(gate(x), up(x))) over MLX-quantized weights in mlx-lm's
layout (`switch_mlp.{gate,up,down}_proj` stacked [E, out, in], `shared_experts.*` [out, in]).
Two paths, chosen as for the MSA kernels (`dispatch.use_metal`):

- the Metal kernels (`moe_decode_gate_up.metal`, then `moe_decode_down.metal`, with
  `moe_quant.metal` as header), for affine 4/8-bit at group 32/64/128, mxfp4 and mxfp8;
- the twin `moe_decode_ops`: the `mx.gather_qmm` path `m3mlx.model.MoE` runs, as a pure function.

Plans, bytes per token and expected bandwidth: MOE_KERNEL.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import mlx.core as mx

from .dispatch import use_metal as _use_metal
from .msa_kernels import FLOATS, SIMD, KernelSpec, Launch, Runner, metal_run

MAX_TOKENS = 8  # tokens per call the kernels take (decode, speculative verification)
GATE_UP_SIMDGROUPS = 4  # phase 1: one (gate, up) row pair per simdgroup
DOWN_SIMDGROUPS = 4  # phase 2: DOWN_ROWS output rows per simdgroup
DOWN_ROWS = 2

# (mode, bits, group size) the kernels decode -> their MODE template value.
FORMATS = {
    **{("affine", bits, gs): 0 for bits in (4, 8) for gs in (32, 64, 128)},
    ("mxfp4", 4, 32): 1,
    ("mxfp8", 8, 32): 1,
}

GATE_UP = KernelSpec(
    "moe_decode_gate_up",
    ("x", "ids", "rw", "gate_w", "gate_s", "gate_b", "up_w", "up_s", "up_b",
     "sgate_w", "sgate_s", "sgate_b", "sup_w", "sup_s", "sup_b", "alpha", "limit"),
    ("h",),
    "moe_decode_gate_up.metal",
    header_files=("moe_quant.metal",),
    ensure_row_contiguous=True,
)
DOWN = KernelSpec(
    "moe_decode_down",
    ("h", "ids", "rw", "down_w", "down_s", "down_b", "sdown_w", "sdown_s", "sdown_b"),
    ("out",),
    "moe_decode_down.metal",
    header_files=("moe_quant.metal",),
    ensure_row_contiguous=True,
)
SPECS = (GATE_UP, DOWN)


@dataclass(frozen=True)
class QuantizedWeight:
    """One projection as `mx.quantize` returns it: weight uint32 [..., out, in * bits / 32],
    scales [..., out, in / group_size] and, in affine mode, biases like scales."""

    weight: mx.array
    scales: mx.array
    biases: Optional[mx.array]
    group_size: int
    bits: int
    mode: str = "affine"

    @classmethod
    def of(cls, layer) -> "QuantizedWeight":
        """From a quantized layer: `nn.QuantizedLinear` or m3mlx's `QuantizedExpertLinear`."""
        if "bias" in layer:
            raise ValueError("the layer has an additive bias; moe_decode takes bias-free "
                             "projections")
        return cls(layer["weight"], layer["scales"], layer.get("biases"), layer.group_size,
                   layer.bits, getattr(layer, "mode", "affine"))

    @classmethod
    def quantize(cls, w: mx.array, group_size: int, bits: int, mode: str = "affine"):
        w_q, scales, *biases = mx.quantize(w, group_size, bits, mode=mode)
        return cls(w_q, scales, biases[0] if biases else None, group_size, bits, mode)

    @property
    def format(self) -> tuple:
        return (self.mode, self.bits, self.group_size)

    @property
    def out_dims(self) -> int:
        return self.weight.shape[-2]

    @property
    def in_dims(self) -> int:
        return self.weight.shape[-1] * 32 // self.bits

    def __call__(self, x: mx.array, indices: Optional[mx.array] = None) -> mx.array:
        """x @ W^T; with indices, through the experts they name (`mx.gather_qmm`)."""
        if indices is None:
            return mx.quantized_matmul(x, self.weight, self.scales, self.biases, transpose=True,
                                       group_size=self.group_size, bits=self.bits,
                                       mode=self.mode)
        return mx.gather_qmm(x, self.weight, self.scales, self.biases, rhs_indices=indices,
                             transpose=True, group_size=self.group_size, bits=self.bits,
                             mode=self.mode)


class ExpertWeights(NamedTuple):
    """gate and up [.., F, D], down [.., D, F]: stacked [E, ...] for the routed experts, plain
    matrices for the shared expert."""

    gate: QuantizedWeight
    up: QuantizedWeight
    down: QuantizedWeight

    @classmethod
    def of(cls, mlp) -> Optional["ExpertWeights"]:
        """From a module's gate_proj, up_proj and down_proj; None unless all are quantized."""
        layers = (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        if not all("scales" in layer for layer in layers):
            return None
        return cls(*(QuantizedWeight.of(layer) for layer in layers))


# ---------------------------------------------------------------------------------------------
# The twin: mx.gather_qmm, as m3mlx.model.MoE computes decode
# ---------------------------------------------------------------------------------------------


def swiglu_oai(gate: mx.array, up: mx.array, alpha: float, limit: float) -> mx.array:
    gate = mx.minimum(gate, limit)
    up = mx.clip(up, -limit, limit)
    return (up + 1.0) * gate * mx.sigmoid(alpha * gate)


def moe_decode_ops(x, expert_ids, routing_weights, experts: ExpertWeights,
                   shared: Optional[ExpertWeights] = None, alpha=1.702, limit=7.0) -> mx.array:
    """x [T, D], expert_ids / routing_weights [T, K] -> [T, D]."""
    rows = x[:, None, None]  # [T, 1, 1, D]: one routed row per (token, slot)
    h = swiglu_oai(experts.gate(rows, expert_ids), experts.up(rows, expert_ids), alpha, limit)
    y = experts.down(h, expert_ids).squeeze(-2)  # [T, K, D]
    y = (y * routing_weights[..., None]).sum(axis=1)
    if shared is not None:
        y = y + shared.down(swiglu_oai(shared.gate(x), shared.up(x), alpha, limit))
    return y


# ---------------------------------------------------------------------------------------------
# The Metal kernels
# ---------------------------------------------------------------------------------------------


def _format_ok(q: QuantizedWeight, stacked: bool) -> bool:
    if q.format not in FORMATS or q.weight.dtype != mx.uint32:
        return False
    if q.weight.ndim != (3 if stacked else 2) or q.scales.shape != (
            *q.weight.shape[:-1], q.in_dims // q.group_size):
        return False
    if q.mode == "affine":
        return (q.scales.dtype in FLOATS and q.biases is not None
                and q.biases.shape == q.scales.shape and q.biases.dtype in FLOATS)
    return q.scales.dtype == mx.uint8


def _mlp_ok(m: ExpertWeights, stacked: bool, D: int) -> bool:
    gate, up, down = m
    if not all(_format_ok(q, stacked) for q in m) or gate.format != up.format:
        return False
    if gate.scales.dtype != up.scales.dtype or (
            gate.biases is not None and gate.biases.dtype != up.biases.dtype):
        return False  # one pass reads both: the kernel takes them as one type
    lead = gate.weight.shape[:-2]
    F = gate.out_dims
    return (gate.weight.shape == up.weight.shape and gate.in_dims == D
            and down.weight.shape[:-2] == lead and down.out_dims == D and down.in_dims == F)


def moe_decode_supported(x, expert_ids, routing_weights, experts: ExpertWeights,
                         shared: Optional[ExpertWeights] = None) -> bool:
    """Whether the Metal kernels take this call (else `moe_decode` runs the twin)."""
    if x.ndim != 2 or x.dtype not in FLOATS or not 1 <= x.shape[0] <= MAX_TOKENS:
        return False
    T, D = x.shape
    if (expert_ids.ndim != 2 or expert_ids.shape[0] != T or expert_ids.shape[1] < 1
            or routing_weights.shape != expert_ids.shape or routing_weights.dtype != x.dtype
            or expert_ids.dtype not in (mx.int32, mx.uint32)):
        return False
    return (_mlp_ok(experts, True, D) and D % DOWN_ROWS == 0
            and (shared is None or _mlp_ok(shared, False, D)))


def _buffers(q: Optional[QuantizedWeight]) -> list:
    """weight, scales, biases; one-element dummies (never read) for what is absent."""
    if q is None:
        return [mx.zeros((1,), mx.uint32), mx.zeros((1,), mx.uint8), mx.zeros((1,), mx.float32)]
    biases = q.biases if q.biases is not None else mx.zeros((1,), mx.float32)
    return [q.weight, q.scales, biases]


def _format_template(prefix: str, q: QuantizedWeight) -> list:
    return [(prefix + "MODE", FORMATS[q.format]), (prefix + "BITS", q.bits),
            (prefix + "GS", q.group_size)]


def _max_tokens(T: int) -> int:
    """MAXT, the tokens a kernel instance is compiled for: 1 (plain decode) or MAX_TOKENS."""
    return 1 if T == 1 else MAX_TOKENS


def gate_up_launch(x, expert_ids, routing_weights, experts: ExpertWeights,
                   shared: Optional[ExpertWeights], alpha: float, limit: float) -> Launch:
    T, _ = x.shape
    K = expert_ids.shape[1]
    F = experts.gate.out_dims
    FS = shared.gate.out_dims if shared is not None else 0
    threads = SIMD * GATE_UP_SIMDGROUPS
    tiles = -(-max(F, FS) // GATE_UP_SIMDGROUPS)
    s = shared or experts  # formats of the (absent) shared expert: any compiled instance
    return Launch(
        inputs=[x, expert_ids, routing_weights, *_buffers(experts.gate), *_buffers(experts.up),
                *_buffers(shared and shared.gate), *_buffers(shared and shared.up),
                float(alpha), float(limit)],
        output_shapes=[(T, K * F + FS)],
        output_dtypes=[mx.float32],
        grid=(tiles * threads, T * K + (shared is not None), 1),
        threadgroup=(threads, 1, 1),
        template=[("MAXT", _max_tokens(T)), *_format_template("R", experts.gate),
                  *_format_template("S", s.gate), ("HAS_SHARED", shared is not None),
                  ("NSG", GATE_UP_SIMDGROUPS)],
    )


def down_launch(h, expert_ids, routing_weights, experts: ExpertWeights,
                shared: Optional[ExpertWeights], dtype) -> Launch:
    T = expert_ids.shape[0]
    D = experts.down.out_dims
    threads = SIMD * DOWN_SIMDGROUPS
    tiles = -(-D // (DOWN_SIMDGROUPS * DOWN_ROWS))
    s = shared or experts
    return Launch(
        inputs=[h, expert_ids, routing_weights, *_buffers(experts.down),
                *_buffers(shared and shared.down)],
        output_shapes=[(T, D)],
        output_dtypes=[dtype],
        grid=(tiles * threads, 1, 1),
        threadgroup=(threads, 1, 1),
        template=[("OutT", dtype), ("MAXT", _max_tokens(T)),
                  *_format_template("R", experts.down), *_format_template("S", s.down),
                  ("HAS_SHARED", shared is not None), ("NSG", DOWN_SIMDGROUPS),
                  ("ROWS", DOWN_ROWS)],
    )


def moe_decode_kernels(x, expert_ids, routing_weights, experts: ExpertWeights,
                       shared: Optional[ExpertWeights] = None, alpha=1.702, limit=7.0,
                       run: Optional[Runner] = None) -> mx.array:
    """The MoE block with the Metal kernels, launched through `run` (default `metal_run`; the
    test harness passes its own): [T, D] in x's dtype."""
    if not moe_decode_supported(x, expert_ids, routing_weights, experts, shared):
        raise ValueError("no Metal MoE kernel for these shapes, dtypes or quantization; use "
                         "the ops path")
    run = run or metal_run
    (h,) = run(GATE_UP, gate_up_launch(x, expert_ids, routing_weights, experts, shared, alpha,
                                       limit))
    (out,) = run(DOWN, down_launch(h, expert_ids, routing_weights, experts, shared, x.dtype))
    return out


def moe_decode(x, expert_ids, routing_weights, experts: ExpertWeights,
               shared: Optional[ExpertWeights] = None, *, alpha=1.702, limit=7.0,
               use_metal=None) -> mx.array:
    """Routed plus shared experts for a few tokens: x [T, D] -> [T, D].

    expert_ids [T, K] (int32 or uint32, ids in [0, E)), routing_weights [T, K] in x's dtype
    (already normalized and scaled), experts / shared: the quantized gate, up and down
    projections. The Metal kernels run when `use_metal` resolves to Metal and
    `moe_decode_supported` holds; otherwise the gather_qmm twin.
    """
    if x.ndim != 2:
        raise ValueError(f"x must be [tokens, hidden]; got shape {x.shape}")
    if _use_metal(use_metal) and moe_decode_supported(x, expert_ids, routing_weights, experts,
                                                      shared):
        return moe_decode_kernels(x, expert_ids, routing_weights, experts, shared, alpha, limit)
    return moe_decode_ops(x, expert_ids, routing_weights, experts, shared, alpha, limit)
