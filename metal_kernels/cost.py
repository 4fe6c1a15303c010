"""What each Metal kernel costs, from its launch plan: a model, not a measurement.

For one launch (the real planners' grid and threadgroup, the footprints `msa_kernels` and `moe`
define) it counts threadgroups, threads, threadgroup memory, registers of the live per-thread
arrays, the bytes it must move from DRAM and its multiply-adds, and predicts its time on a chip
as the largest of three floors (the kernel is said to be bound by that one):

- bandwidth: DRAM bytes / (peak bandwidth x BANDWIDTH_EFFICIENCY);
- compute: 2 x multiply-adds / (peak FP32 FLOP/s x the kernel's ALU efficiency: SCALAR_ALU for
  scalar FMAs fed from threadgroup memory, MATRIX_ALU for simdgroup_matrix tiles);
- latency: waves x phases x PHASE_LATENCY, where a wave is one round of threadgroups over the
  chip's cores at the occupancy the plan allows and a phase is one barrier- or dependence-
  separated step of a threadgroup (each waits on memory once), plus serial work inside a thread
  (SERIAL_STEP per dependent step: the top-k selection's scan and tournament);

plus DISPATCH per launch. The constants below are assumptions, stated so that a measurement on
a Mac can replace them; `benchmarks/kernel_costs.py` prints the report and KERNELS.md carries it.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from . import moe
from .kv import DEFAULT_GROUP, kv_row_bytes
from .kernel import SIMD, THREADGROUP_MEMORY, Footprint, ceil_div
from .msa_kernels import (DECODE_SIMDGROUPS, MERGE_THREADS, PREFILL_KEYS, PREFILL_SIMDGROUPS,
                          SCORES_BLOCKS_PER_GROUP, SCORES_MMA_SIMDGROUPS, SCORES_SIMDGROUPS,
                          decode_attention_footprint, decode_parts, index_scores_footprint,
                          index_scores_mma_footprint, index_select_footprint,
                          prefill_attention_footprint, prefill_tile, select_threads)


@dataclass(frozen=True)
class Chip:
    name: str
    bandwidth: float  # bytes/s, Apple's figure
    cores: int  # GPU cores
    fp32_flops: float  # FLOP/s
    threadgroup_memory: int  # bytes one threadgroup may allocate
    source: str


# Bandwidths and core counts are Apple's figures; FP32 rates are derived as noted.
CHIPS = (
    Chip("M3 Ultra", 819e9, 80, 28.6e12, THREADGROUP_MEMORY,
         "819 GB/s, 80 cores: Apple (Mac Studio 2025). 28.6 TFLOPS: 2 x the 40-core M3 Max's "
         "14.32 (hmc-tech.com)"),
    Chip("M4 Max", 546e9, 40, 17.2e12, THREADGROUP_MEMORY,
         "546 GB/s, 40 cores: Apple. 17.2 TFLOPS: the 32-core M4 Max's 13.74 (hmc-tech.com) "
         "x 40/32"),
    Chip("M5 Max", 614e9, 40, 20.8e12, THREADGROUP_MEMORY,
         "614 GB/s, 40 cores: Apple (MacBook Pro 2026). 20.8 TFLOPS: the M4 Max's 17.2 x 1.21, "
         "the ratio of their Geekbench 6 Metal scores (232,718 / 191,600); the per-core Neural "
         "Accelerators are not reachable from MSL kernels"),
)
# Every Apple GPU since Apple7 allows 32 KB of threadgroup memory per threadgroup (Metal
# feature set tables); what a core holds, and how many threads it keeps resident, Apple does not
# publish: assumed here.
CORE_THREADS = 1024  # resident threads per core (assumed)
CORE_THREADGROUP_MEMORY = 64 * 1024  # threadgroup memory per core (assumed)
BANDWIDTH_EFFICIENCY = 0.8  # measured sustained M3 Ultra bandwidth is ~650-690 of 819 GB/s
SCALAR_ALU = 0.35  # FMAs with their threadgroup-memory operand loads (assumed)
MATRIX_ALU = 0.6  # simdgroup_matrix multiply-accumulate with its tile loads (assumed)
PHASE_LATENCY = 1.0e-6  # a barrier-separated step waiting on memory once (assumed)
SERIAL_STEP = 10e-9  # one dependent step inside a thread (assumed)
DISPATCH = 2.0e-6  # per launch inside a command buffer (assumed)

M3 = dict(index_heads=4, index_dim=128, kv_heads=4, q_per_kv=16, head_dim=128, block=128,
          topk=16, hidden=6144, experts=128, expert_width=3072, shared_width=3072, top_k=4,
          chunk=2048)
BF16 = 2


@dataclass(frozen=True)
class Cost:
    """One launch of one kernel, from its plan."""

    kernel: str
    shape: str
    threadgroups: int
    threads: int  # per threadgroup
    footprint: Footprint
    dram_bytes: float
    macs: float
    alu: float  # the ALU efficiency its multiply-adds get
    phases: int  # barrier- or dependence-separated steps per threadgroup
    serial: int = 0  # dependent steps inside one thread

    def resident(self, chip: Chip) -> int:
        """Threadgroups a core holds at once."""
        by_threads = CORE_THREADS // self.threads
        if not self.footprint.threadgroup_bytes:
            return max(1, by_threads)
        return max(1, min(by_threads, CORE_THREADGROUP_MEMORY // self.footprint.threadgroup_bytes))

    def floors(self, chip: Chip) -> dict:
        waves = ceil_div(self.threadgroups, chip.cores * self.resident(chip))
        return {
            "bandwidth": self.dram_bytes / (chip.bandwidth * BANDWIDTH_EFFICIENCY),
            "compute": 2 * self.macs / (chip.fp32_flops * self.alu),
            "latency": waves * self.phases * PHASE_LATENCY + self.serial * SERIAL_STEP,
        }

    def bound(self, chip: Chip) -> str:
        floors = self.floors(chip)
        return max(floors, key=floors.get)

    def seconds(self, chip: Chip) -> float:
        return DISPATCH + max(self.floors(chip).values())


# ---------------------------------------------------------------------------------------------
# MSA, one sparse layer of M3, batch 1
# ---------------------------------------------------------------------------------------------


def _index_key_bytes(int8: bool) -> float:
    return M3["index_dim"] * (1 + 4 / M3["index_dim"] if int8 else BF16)  # int8: + an fp32 scale


def _kv_row_bytes(kv_bits) -> int:
    """One key (or value) row of one head as the cache stores it for bf16 activations."""
    D = M3["head_dim"]
    return kv_row_bytes(D, kv_bits, DEFAULT_GROUP.get(kv_bits), mx.bfloat16)


def _kv_name(kv_bits) -> str:
    return f"{kv_bits}-bit K/V" if kv_bits else "bf16 K/V"


def msa_decode(context: int, int8: bool = False, kv_bits=None) -> list[Cost]:
    """The four launches of one decode step: scores, top-k, split-K attention, merge. kv_bits:
    compact K/V (decoded into the key tile, the values after the scores: two more phases)."""
    g = M3
    H, Di, block, topk = g["index_heads"], g["index_dim"], g["block"], g["topk"]
    G, D = g["q_per_kv"], g["head_dim"]
    n_cols = max(context // block, 1)
    keys = "int8 keys" if int8 else "bf16 keys"
    attended = min(context, topk * block)
    parts = topk * decode_parts(block)
    partials = H * parts * G * (D + 2) * 4
    select = select_threads(n_cols)
    return [
        Cost("msa_index_scores", keys, n_cols * 1, SIMD * SCORES_SIMDGROUPS,
             index_scores_footprint(H, Di), context * _index_key_bytes(int8) + n_cols * H * 4,
             H * context * Di, SCALAR_ALU, phases=2 * ceil_div(block, 32)),
        Cost("msa_index_select", f"{select // SIMD} simdgroup(s)", H, select,
             index_select_footprint(topk, select), n_cols * H * 4, 0, SCALAR_ALU, phases=3,
             serial=ceil_div(n_cols, select) * 2 + (topk - 1) * 10),
        Cost("msa_decode_attention", _kv_name(kv_bits), H * parts, SIMD * DECODE_SIMDGROUPS,
             decode_attention_footprint(G, D, D, kv_bits or 0),
             H * attended * 2 * _kv_row_bytes(kv_bits) + partials,
             H * G * attended * 2 * D, SCALAR_ALU, phases=5 if kv_bits else 3),
        Cost("msa_decode_merge", "", ceil_div(D, MERGE_THREADS) * G * H, MERGE_THREADS,
             Footprint(0, 0), partials + H * G * D * BF16, H * G * parts * D, SCALAR_ALU,
             phases=2, serial=2 * parts),
    ]


def msa_prefill(context: int, int8: bool = False, chunk: int = M3["chunk"],
                kv_bits=None) -> list[Cost]:
    """The three launches of one prefill chunk ending at `context`: scores, top-k, attention.

    DRAM bytes assume the planned orders keep what neighbouring threadgroups share in the cache:
    the index keys are read once per chunk (query tiles vary fastest), and the attention's
    distinct blocks per KV head over the chunk are the chunk's own 16 plus 48 shared history
    blocks (neighbouring queries select mostly the same)."""
    g = M3
    H, Di, block, topk = g["index_heads"], g["index_dim"], g["block"], g["topk"]
    G, D = g["q_per_kv"], g["head_dim"]
    n_cols = max((context - 1) // block, 1)
    keys = "int8 keys" if int8 else "bf16 keys"
    tq_scores = 8 * SCORES_MMA_SIMDGROUPS // H
    scores_out = H * chunk * n_cols * 4
    select = select_threads(n_cols)
    tq = prefill_tile(G)
    attended = min(context, topk * block)
    distinct = min(n_cols + 1, chunk // block + 48)
    return [
        Cost("msa_index_scores_mma", keys,
             ceil_div(chunk, tq_scores) * ceil_div(n_cols, SCORES_BLOCKS_PER_GROUP),
             SIMD * SCORES_MMA_SIMDGROUPS, index_scores_mma_footprint(Di),
             context * _index_key_bytes(int8) + scores_out, H * chunk * context * Di,
             MATRIX_ALU, phases=2 * SCORES_BLOCKS_PER_GROUP * ceil_div(block, 32) + 4),
        Cost("msa_index_select", f"{select // SIMD} simdgroup(s)", H * chunk, select,
             index_select_footprint(topk, select), scores_out, 0, SCALAR_ALU, phases=3,
             serial=ceil_div(n_cols, select) * 2 + (topk - 1) * 10),
        Cost("msa_prefill_attention", _kv_name(kv_bits), H * ceil_div(chunk, tq),
             SIMD * PREFILL_SIMDGROUPS, prefill_attention_footprint(G, D, D, topk),
             H * distinct * block * 2 * _kv_row_bytes(kv_bits) + 2 * H * G * chunk * D * BF16,
             H * G * chunk * attended * 2 * D, MATRIX_ALU,
             phases=4 + 2 * topk * block // PREFILL_KEYS),
    ]


# ---------------------------------------------------------------------------------------------
# MoE, one layer of M3
# ---------------------------------------------------------------------------------------------

BITS_PER_WEIGHT = {  # weights plus scales (and biases), bf16 scales for affine
    ("affine", 2, 64): 2.5, ("affine", 3, 64): 3.5, ("affine", 4, 64): 4.5,
    ("affine", 5, 64): 5.5, ("affine", 6, 64): 6.5, ("affine", 8, 64): 8.5,
    ("mxfp4", 4, 32): 4.25, ("mxfp8", 8, 32): 8.25, ("nvfp4", 4, 16): 4.5,
}


def moe_decode(fmt=("affine", 4, 64), tokens: int = 1, distinct: int | None = None) -> list[Cost]:
    """The two launches for `tokens` tokens touching `distinct` routed experts (default: the
    top-k of one token, or the expected distinct count under independent routing)."""
    g = M3
    D, F, FS, K, E = g["hidden"], g["expert_width"], g["shared_width"], g["top_k"], g["experts"]
    if distinct is None:
        distinct = round(E * (1 - (1 - K / E) ** tokens))
    maxt = 1 if tokens == 1 else moe.MAX_TOKENS
    weight = BITS_PER_WEIGHT[fmt] / 8
    experts = distinct + 1  # and the shared expert
    h = tokens * (K * F + FS) * 4
    name = f"{fmt[0]} {fmt[1]}-bit, T={tokens}"
    threads = SIMD * moe.GATE_UP_SIMDGROUPS
    rows = moe.GATE_UP_SIMDGROUPS * moe.GATE_UP_ROWS
    steps_up = ceil_div(D, SIMD * moe.chunk(fmt[1]))
    down_rows = moe.DOWN_SIMDGROUPS * moe.DOWN_ROWS[maxt]
    steps_down = ceil_div(F, SIMD * moe.chunk(fmt[1]))
    return [
        Cost("moe_decode_gate_up", name, ceil_div(F, rows) * (tokens * K + 1), threads,
             moe.gate_up_footprint(maxt, (fmt[1], fmt[1])),
             experts * 2 * F * D * weight + tokens * D * 2 + h,
             tokens * K * 2 * F * D + tokens * 2 * FS * D, SCALAR_ALU, phases=steps_up + 2),
        Cost("moe_decode_down", name, ceil_div(D, down_rows), SIMD * moe.DOWN_SIMDGROUPS,
             moe.down_footprint(maxt, (fmt[1], fmt[1])), experts * D * F * weight + h,
             tokens * K * D * F + tokens * D * FS, SCALAR_ALU,
             phases=experts * steps_down + 2),
    ]


def report_rows(contexts=(8192, 131072, 1 << 20)) -> list[tuple[str, str, list[Cost]]]:
    """(phase, context label, launches) for the report."""
    rows = []
    for context in contexts:
        label = f"{context // 1024}K" if context < 1 << 20 else f"{context >> 20}M"
        rows.append(("decode", label, msa_decode(context)))
        rows.append(("decode", label, msa_decode(context, int8=True)[:1]))
        rows.append(("prefill chunk", label, msa_prefill(context)))
    return rows
