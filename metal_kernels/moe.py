"""M3's MoE block: the routed experts plus the shared expert, as one op.

`moe_experts(x, expert_ids, routing_weights, experts, shared)` computes, for each token t,

    sum_i routing_weights[t, i] * Expert_{expert_ids[t, i]}(x[t])  +  Shared(x[t])

with Expert(x) = down(SwiGLU-OAI(gate(x), up(x))) over the weights in mlx-lm's layout
(`switch_mlp.{gate,up,down}_proj` stacked [E, out, in], `shared_experts.*` [out, in]), quantized
or not. Two paths, chosen by the rule every op here follows (`dispatch.runs_metal`):

- the Metal kernels (`moe_decode_gate_up.metal`, then `moe_decode_down.metal`, with
  `moe_quant.metal` as header) for 1 to 8 tokens (decode and speculative verification) over
  quantized experts: affine 1/2/3/4/5/6/8-bit at group 32/64/128, mxfp4, mxfp8, nvfp4;
- the twin `moe_experts_ops`: `mx.gather_qmm` / `mx.gather_mm`, rows sorted by expert once
  several rows share experts (prefill). This is what runs off Metal, and the kernels' oracle.

Plans, bytes per token and expected bandwidth: MOE_KERNEL.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple, Optional, Union

import mlx.core as mx

from .dispatch import runs_metal
from .kernel import (FLOATS, SIMD, Footprint, KernelSpec, Launch, Runner, ceil_div, metal_run,
                     placeholder)

MAX_TOKENS = 8  # tokens per call the kernels take (decode, speculative verification)
SORT_THRESHOLD = 64  # the twin sorts rows by expert from this many (token, slot) rows
GATE_UP_SIMDGROUPS = 4
GATE_UP_ROWS = 2  # phase 1: gate and up rows per simdgroup (x is read once per 2 x 2 rows)
DOWN_SIMDGROUPS = 4
DOWN_ROWS = {1: 8, MAX_TOKENS: 4}  # phase 2: rows per simdgroup, by MAXT (registers bound it)

# (mode, bits, group size) the kernels decode -> their MODE template value.
FORMATS = {
    **{("affine", bits, gs): 0 for bits in (1, 2, 3, 4, 5, 6, 8) for gs in (32, 64, 128)},
    ("mxfp4", 4, 32): 1,
    ("mxfp8", 8, 32): 1,
    ("nvfp4", 4, 16): 2,
}
SCALE_DTYPES = {0: FLOATS, 1: (mx.uint8,), 2: (mx.uint8,)}

GATE_UP = KernelSpec(
    "moe_decode_gate_up",
    ("x", "ids", "rw", "slots", "gate_w", "gate_s", "gate_b", "up_w", "up_s", "up_b",
     "sgate_w", "sgate_s", "sgate_b", "sup_w", "sup_s", "sup_b", "alpha", "limit"),
    ("h",),
    "moe_decode_gate_up.metal",
    header_files=("moe_quant.metal",),
    ensure_row_contiguous=True,
)
DOWN = KernelSpec(
    "moe_decode_down",
    ("h", "ids", "rw", "slots", "down_w", "down_s", "down_b", "sdown_w", "sdown_s", "sdown_b"),
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

    def __call__(self, x, indices=None, sorted_indices=False) -> mx.array:
        """x @ W^T; with indices, through the experts they name (`mx.gather_qmm`)."""
        if indices is None:
            return mx.quantized_matmul(x, self.weight, self.scales, self.biases, transpose=True,
                                       group_size=self.group_size, bits=self.bits,
                                       mode=self.mode)
        return mx.gather_qmm(x, self.weight, self.scales, self.biases, rhs_indices=indices,
                             transpose=True, group_size=self.group_size, bits=self.bits,
                             mode=self.mode, sorted_indices=sorted_indices)


@dataclass(frozen=True)
class DenseWeight:
    """One unquantized projection, weight [..., out, in]."""

    weight: mx.array

    @property
    def out_dims(self) -> int:
        return self.weight.shape[-2]

    @property
    def in_dims(self) -> int:
        return self.weight.shape[-1]

    def __call__(self, x, indices=None, sorted_indices=False) -> mx.array:
        if indices is None:
            return x @ self.weight.T
        w = self.weight.swapaxes(-1, -2)
        if x.dtype == mx.float32 and w.dtype == mx.float32 or mx.default_device() == mx.gpu:
            return mx.gather_mm(x, w, rhs_indices=indices, sorted_indices=sorted_indices)
        # The CPU gather_mm only takes float32 (bf16 weights of an original checkpoint, run at
        # --dtype auto): compute in float32, return the activation dtype.
        y = mx.gather_mm(x.astype(mx.float32), w.astype(mx.float32), rhs_indices=indices,
                         sorted_indices=sorted_indices)
        return y.astype(x.dtype)


Projection = Union[QuantizedWeight, DenseWeight]


class ExpertWeights(NamedTuple):
    """gate and up [.., F, D], down [.., D, F]: stacked [E, ...] for the routed experts, plain
    matrices for the shared expert."""

    gate: Projection
    up: Projection
    down: Projection

    @classmethod
    def of(cls, mlp) -> "ExpertWeights":
        """From a module's gate_proj, up_proj and down_proj (quantized or not, bias-free)."""
        def projection(layer) -> Projection:
            if "bias" in layer:
                raise ValueError("an expert projection has an additive bias; the MoE op takes "
                                 "bias-free projections")
            return QuantizedWeight.of(layer) if "scales" in layer else DenseWeight(layer["weight"])

        return cls(projection(mlp.gate_proj), projection(mlp.up_proj), projection(mlp.down_proj))


# ---------------------------------------------------------------------------------------------
# The twin: gather_qmm / gather_mm
# ---------------------------------------------------------------------------------------------


def swiglu_oai(gate: mx.array, up: mx.array, alpha: float, limit: float) -> mx.array:
    """M3's activation (GPT-OSS style): (clip(up) + 1) * min(gate, limit) * sigmoid(alpha gate)."""
    gate = mx.minimum(gate, limit)
    up = mx.clip(up, -limit, limit)
    return (up + 1.0) * gate * mx.sigmoid(alpha * gate)


def _expert_ffn(x, indices, experts: ExpertWeights, alpha, limit, sorted_indices):
    gate = experts.gate(x, indices, sorted_indices)
    up = experts.up(x, indices, sorted_indices)
    return experts.down(swiglu_oai(gate, up, alpha, limit), indices, sorted_indices)


def expert_outputs(x, expert_ids, experts: ExpertWeights, alpha=1.702, limit=7.0,
                   sort: Optional[bool] = None) -> mx.array:
    """Each routed expert's output on its token, before the routing weight: x [N, D],
    expert_ids [N, K] (rows of the stacked experts) -> [N, K, D]. `sort` (default: from
    SORT_THRESHOLD rows) gathers the rows by expert first. A row's result does not depend on
    the other rows, so outputs computed a few rows at a time (with the same `sort`) are the
    same."""
    N, K = expert_ids.shape
    if expert_ids.size >= SORT_THRESHOLD if sort is None else sort:
        # Sorting rows by expert pays off once several rows share an expert (prefill).
        order = mx.argsort(expert_ids.flatten())
        # Index after adding the row axis: gather_mm is several times slower on the strides
        # that `x[order // K][:, None]` would give.
        rows = x[:, None][order // K]
        y = _expert_ffn(rows, expert_ids.flatten()[order], experts, alpha, limit, True)
        return y[mx.argsort(order)].reshape(N, K, -1)
    return _expert_ffn(x[:, None, None], expert_ids, experts, alpha, limit, False).squeeze(-2)


def shared_output(x, shared: ExpertWeights, alpha=1.702, limit=7.0) -> mx.array:
    """The shared expert on every token: x [N, D] -> [N, D]."""
    return shared.down(swiglu_oai(shared.gate(x), shared.up(x), alpha, limit))


def combine(outputs, routing_weights, shared_out=None) -> mx.array:
    """The MoE block's result from the expert outputs [N, K, D], the routing weights [N, K]
    and the shared expert's output [N, D]."""
    y = (outputs * routing_weights[..., None]).sum(axis=1)
    return y if shared_out is None else y + shared_out


def moe_experts_ops(x, expert_ids, routing_weights, experts: ExpertWeights,
                    shared: Optional[ExpertWeights] = None, alpha=1.702, limit=7.0,
                    slots: Optional[mx.array] = None) -> mx.array:
    """x [N, D], expert_ids / routing_weights [N, K] -> [N, D]; `slots` [E] maps expert ids to
    rows of the stacked `experts` (a pool of expert slots)."""
    rows = expert_ids if slots is None else slots[expert_ids]
    outputs = expert_outputs(x, rows, experts, alpha, limit)
    return combine(outputs, routing_weights,
                   None if shared is None else shared_output(x, shared, alpha, limit))


# ---------------------------------------------------------------------------------------------
# The Metal kernels
# ---------------------------------------------------------------------------------------------


def _format_ok(q: Projection, stacked: bool) -> bool:
    if not isinstance(q, QuantizedWeight) or q.format not in FORMATS:
        return False
    if q.weight.dtype != mx.uint32 or q.weight.ndim != (3 if stacked else 2):
        return False
    if q.scales.shape != (*q.weight.shape[:-1], q.in_dims // q.group_size):
        return False
    if q.scales.dtype not in SCALE_DTYPES[FORMATS[q.format]]:
        return False
    if q.mode == "affine":
        return (q.biases is not None and q.biases.shape == q.scales.shape
                and q.biases.dtype in FLOATS)
    return True


def _mlp_ok(m: ExpertWeights, stacked: bool, D: int) -> bool:
    gate, up, down = m
    if not all(_format_ok(q, stacked) for q in m) or gate.format != up.format:
        return False
    if gate.scales.dtype != up.scales.dtype or (
            gate.biases is not None and gate.biases.dtype != up.biases.dtype):
        return False  # one pass reads both: the kernel takes them as one type
    return (gate.weight.shape == up.weight.shape and gate.in_dims == D
            and down.weight.shape[:-2] == gate.weight.shape[:-2] and down.out_dims == D
            and down.in_dims == gate.out_dims)


def moe_kernels_supported(x, expert_ids, routing_weights, experts: ExpertWeights,
                          shared: Optional[ExpertWeights] = None,
                          slots: Optional[mx.array] = None) -> bool:
    """Whether the Metal kernels take this call (else `moe_experts` runs the twin)."""
    if slots is not None and (slots.ndim != 1 or slots.dtype != mx.int32 or slots.size < 1):
        return False
    if x.ndim != 2 or x.dtype not in FLOATS or not 1 <= x.shape[0] <= MAX_TOKENS:
        return False
    T, D = x.shape
    if (expert_ids.ndim != 2 or expert_ids.shape[0] != T or expert_ids.shape[1] < 1
            or routing_weights.shape != expert_ids.shape or routing_weights.dtype != x.dtype
            or expert_ids.dtype not in (mx.int32, mx.uint32)):
        return False
    return _mlp_ok(experts, True, D) and (shared is None or _mlp_ok(shared, False, D))


def chunk(bits: int) -> int:
    """Inputs a lane takes per step (moe_quant.metal's moe_chunk): its codes fill whole words."""
    return 16 if (16 * bits) % 32 == 0 else 32


TABLES_BYTES = 4 * (16 + 256)  # the E2M1 and E4M3 code tables, declared by both kernels


def gate_up_footprint(maxt: int, bits: tuple) -> Footprint:
    """bits: the routed and shared formats' bits. v[], g_acc / u_acc, tw / first, words[]."""
    v = max(chunk(b) for b in bits)
    words = max(chunk(b) * b // 32 for b in bits)
    return Footprint(TABLES_BYTES, v + 2 * maxt * GATE_UP_ROWS + 2 * maxt + words)


def down_footprint(maxt: int, bits: tuple) -> Footprint:
    v = max(chunk(b) for b in bits)
    words = max(chunk(b) * b // 32 for b in bits)
    return Footprint(TABLES_BYTES, v + maxt * DOWN_ROWS[maxt] + 2 * maxt + words)


def _buffers(q: Optional[QuantizedWeight]) -> list:
    """weight, scales, biases; placeholders (never read) for what is absent."""
    if q is None:
        return [placeholder(mx.uint32), placeholder(mx.uint8), placeholder(mx.float32)]
    return [q.weight, q.scales, q.biases if q.biases is not None else placeholder(mx.float32)]


def _slot_table(slots: Optional[mx.array]) -> mx.array:
    return placeholder(mx.int32) if slots is None else slots


def _max_tokens(T: int) -> int:
    """MAXT, the tokens a kernel instance is compiled for: 1 (plain decode) or MAX_TOKENS."""
    return 1 if T == 1 else MAX_TOKENS


@lru_cache(maxsize=None)
def _format_template(prefix: str, fmt: tuple) -> tuple:
    return ((prefix + "MODE", FORMATS[fmt]), (prefix + "BITS", fmt[1]), (prefix + "GS", fmt[2]))


@lru_cache(maxsize=None)
def _gate_up_template(maxt: int, routed: tuple, shared: Optional[tuple], slots: bool) -> list:
    return [("MAXT", maxt), *_format_template("R", routed),
            *_format_template("S", shared or routed), ("HAS_SHARED", shared is not None),
            ("NSG", GATE_UP_SIMDGROUPS), ("RG", GATE_UP_ROWS), ("SLOTS", slots)]


@lru_cache(maxsize=None)
def _down_template(dtype: mx.Dtype, maxt: int, routed: tuple, shared: Optional[tuple],
                   slots: bool) -> list:
    return [("OutT", dtype), ("MAXT", maxt), *_format_template("R", routed),
            *_format_template("S", shared or routed), ("HAS_SHARED", shared is not None),
            ("NSG", DOWN_SIMDGROUPS), ("RD", DOWN_ROWS[maxt]), ("SLOTS", slots)]


def gate_up_launch(x, expert_ids, routing_weights, experts: ExpertWeights,
                   shared: Optional[ExpertWeights], alpha: float, limit: float,
                   slots: Optional[mx.array] = None) -> Launch:
    T, _ = x.shape
    K = expert_ids.shape[1]
    F = experts.gate.out_dims
    FS = shared.gate.out_dims if shared is not None else 0
    threads = SIMD * GATE_UP_SIMDGROUPS
    return Launch(
        inputs=[x, expert_ids, routing_weights, _slot_table(slots), *_buffers(experts.gate),
                *_buffers(experts.up),
                *_buffers(shared and shared.gate), *_buffers(shared and shared.up),
                float(alpha), float(limit)],
        output_shapes=[(T, K * F + FS)],
        output_dtypes=[mx.float32],
        grid=(ceil_div(max(F, FS), GATE_UP_SIMDGROUPS * GATE_UP_ROWS) * threads,
              T * K + (shared is not None), 1),
        threadgroup=(threads, 1, 1),
        template=_gate_up_template(_max_tokens(T), experts.gate.format,
                                   shared.gate.format if shared is not None else None,
                                   slots is not None),
    )


def down_launch(h, expert_ids, routing_weights, experts: ExpertWeights,
                shared: Optional[ExpertWeights], dtype,
                slots: Optional[mx.array] = None) -> Launch:
    T = expert_ids.shape[0]
    D = experts.down.out_dims
    maxt = _max_tokens(T)
    threads = SIMD * DOWN_SIMDGROUPS
    return Launch(
        inputs=[h, expert_ids, routing_weights, _slot_table(slots), *_buffers(experts.down),
                *_buffers(shared and shared.down)],
        output_shapes=[(T, D)],
        output_dtypes=[dtype],
        grid=(ceil_div(D, DOWN_SIMDGROUPS * DOWN_ROWS[maxt]) * threads, 1, 1),
        threadgroup=(threads, 1, 1),
        template=_down_template(dtype, maxt, experts.down.format,
                                shared.down.format if shared is not None else None,
                                slots is not None),
    )


def moe_experts_kernels(x, expert_ids, routing_weights, experts: ExpertWeights,
                        shared: Optional[ExpertWeights] = None, alpha=1.702, limit=7.0,
                        run: Optional[Runner] = None, *,
                        slots: Optional[mx.array] = None) -> mx.array:
    """The MoE block with the Metal kernels, launched through `run` (default `metal_run`; the
    test harness passes its own): [T, D] in x's dtype. With `slots`, the kernels look each
    expert's row up in the table themselves: no gathered copy of the ids or of the weights."""
    if not moe_kernels_supported(x, expert_ids, routing_weights, experts, shared, slots):
        raise ValueError("no Metal MoE kernel for these shapes, dtypes or quantization; use "
                         "the ops path")
    run = run or metal_run
    (h,) = run(GATE_UP, gate_up_launch(x, expert_ids, routing_weights, experts, shared, alpha,
                                       limit, slots))
    (out,) = run(DOWN, down_launch(h, expert_ids, routing_weights, experts, shared, x.dtype,
                                   slots))
    return out


def moe_experts(x, expert_ids, routing_weights, experts: ExpertWeights,
                shared: Optional[ExpertWeights] = None, *, alpha=1.702, limit=7.0,
                slots: Optional[mx.array] = None, use_metal=None) -> mx.array:
    """Routed plus shared experts: x [N, D] -> [N, D].

    expert_ids [N, K] (int32 or uint32, ids in [0, E)), routing_weights [N, K] in x's dtype
    (already normalized and scaled), experts / shared: the gate, up and down projections.
    `slots` (int32 [E]), when only some experts are resident: expert id -> its row in the
    stacked `experts` (a pool of expert slots, `m3mlx.experts`); every routed id must have one.
    The Metal kernels run for calls they cover (see `moe_kernels_supported`) when Metal is
    chosen (`use_metal`, `M3MLX_KERNELS`: see `dispatch`); otherwise the twin.
    """
    if x.ndim != 2:
        raise ValueError(f"x must be [tokens, hidden]; got shape {x.shape}")
    if runs_metal("moe_experts", use_metal, lambda: moe_kernels_supported(
            x, expert_ids, routing_weights, experts, shared, slots)):
        return moe_experts_kernels(x, expert_ids, routing_weights, experts, shared, alpha,
                                   limit, slots=slots)
    return moe_experts_ops(x, expert_ids, routing_weights, experts, shared, alpha, limit, slots)
