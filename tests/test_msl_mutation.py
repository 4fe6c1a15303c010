"""A harness that cannot fail is worthless: plant realistic bugs in copies of every kernel and
check that the Metal-on-CPU harness, threads shuffled between barriers, catches them.

Each mutant is one edit of one kernel's source or header (an off-by-one, a missing barrier, a
dropped mask, a wrong stride, tie-break, decode or scale). It is killed when a battery of cases
for its op (the kernel against the MLX-ops twin on the shapes with the relevant edges) gives a
different result or trips an alarm (AddressSanitizer, divergence, a matrix that differs across
lanes). The unmutated kernels pass the same batteries; at least 80% of the mutants must die.
Mutants run in parallel, one per CPU.
"""

import dataclasses
import os
from concurrent.futures import ThreadPoolExecutor

import mlx.core as mx
import numpy as np
import pytest
from msl import cases, harness
from msl.moe_cases import FORMATS, random_experts, routing

from m3mlx.metal_kernels import moe, msa_kernels, msa_ops, quantize_index_keys, quantize_kv
from m3mlx.metal_kernels.moe import ExpertWeights

pytestmark = cases.harness_only

K = msa_kernels


@dataclasses.dataclass(frozen=True)
class Mutant:
    spec: object
    old: str
    new: str
    part: str = "source"  # or "header"

    @property
    def id(self) -> str:
        return f"{self.spec.name}: {self.old.strip()[:60]!r}"

    def apply(self):
        text = getattr(self.spec, self.part)
        assert text.count(self.old) == 1, f"mutation site not unique in {self.spec.name}: " \
                                          f"{self.old!r}"
        fields = {f: getattr(self.spec, f) for f in (
            "name", "input_names", "output_names", "source", "header", "ensure_row_contiguous",
            "atomic_outputs")}
        fields[self.part] = text.replace(self.old, self.new)
        return cases.Spec(**fields)


BARRIER = "threadgroup_barrier(mem_flags::mem_threadgroup);"
MUTANTS = [
    # msa_index_scores (decode)
    Mutant(K.INDEX_SCORES, "dot[i] += qs[min(int(sg) + i * NSG, H - 1) * D + d] * kd;",
           "dot[i] += qs[d] * kd;"),
    Mutant(K.INDEX_SCORES, "if (lane < uint(n)) {\n      MLX_MTL_PRAGMA_UNROLL",
           "if (true) {\n      MLX_MTL_PRAGMA_UNROLL"),
    Mutant(K.INDEX_SCORES, "keys_strides[1], keys_strides[2], n, tid);",
           "keys_strides[2], keys_strides[1], n, tid);"),
    Mutant(K.INDEX_SCORES, "key * scales_strides[1]];", "(key + 1) * scales_strides[1]];"),
    Mutant(K.INDEX_SCORES, f"{BARRIER}\n    msa_stage_rows<32, D, D, LD, NT>(",
           "msa_stage_rows<32, D, D, LD, NT>("),
    # msa_index_scores_mma (prefill)
    Mutant(K.INDEX_SCORES_MMA, "LD, 0, true);", "LD, 0, false);"),
    Mutant(K.INDEX_SCORES_MMA, "const int t = t0 + row / H;", "const int t = t0 + row % H;"),
    Mutant(K.INDEX_SCORES_MMA,
           "  best = msa_nan_max(best, simd_shuffle_xor(best, ushort(2)));\n", ""),
    Mutant(K.INDEX_SCORES_MMA, "const bool visible = j < last_own;",
           "const bool visible = j < last_own - 1;"),
    Mutant(K.INDEX_SCORES_MMA, f"    }}\n  }}\n  {BARRIER}\n}}\n", "    }\n  }\n}\n"),
    # msa_index_select
    Mutant(K.INDEX_SELECT, "(s == os && i < oi)", "(s == os && i > oi)", "header"),
    Mutant(K.INDEX_SELECT, "const bool take = msa_ranks_before(s, i, ls[k], li[k]);",
           "const bool take = msa_ranks_before(ls[k], li[k], s, i);"),
    Mutant(K.INDEX_SELECT, "for (ushort m = 16; m > 0; m >>= 1) {",
           "for (ushort m = 16; m > 1; m >>= 1) {"),
    Mutant(K.INDEX_SELECT, "cand_id[k] < cand_id[e];", "cand_id[k] <= cand_id[e];"),
    Mutant(K.INDEX_SELECT, f"  cand_picked[e] = rank < want;\n}}\n{BARRIER}\n",
           "  cand_picked[e] = rank < want;\n}\n"),
    Mutant(K.INDEX_SELECT, "out[slot] = slot == want ? own : -1;",
           "out[slot] = slot == want + 1 ? own : -1;"),
    # msa_decode_attention
    Mutant(K.DECODE_ATTENTION, "min(offset + 1 - key0, S - krow)",
           "min(offset + 2 - key0, S - krow)"),
    Mutant(K.DECODE_ATTENTION, "const int krow = src * BLOCK + in_block;",
           "const int krow = blk * BLOCK + in_block;"),
    Mutant(K.DECODE_ATTENTION, ": KV_BITS ? ks[k * LDV + col]", ": KV_BITS ? ks[k * LD + col]"),
    Mutant(K.DECODE_ATTENTION, "  threadgroup_barrier(mem_flags::mem_threadgroup);\n}\nfloat o[G][CPT];",
           "}\nfloat o[G][CPT];"),
    Mutant(K.DECODE_ATTENTION, "exp(sc - m)", "exp(sc)"),
    Mutant(K.DECODE_ATTENTION, "(e % D) * q_strides[3]]) * scale;", "(e % D) * q_strides[3]]);"),
    Mutant(K.DECODE_ATTENTION, "o[g][c] += ps[g * 32 + k] * v;",
           "o[g][c] += ps[min(g + 1, G - 1) * 32 + k] * v;"),
    Mutant(K.DECODE_ATTENTION, f"}}\n{BARRIER}\n\n\nauto head_values", "}\nauto head_values"),
    Mutant(K.DECODE_ATTENTION, "const int n = blk < 0 ? 0 : min(", "const int n = min("),
    # msa_decode_merge
    Mutant(K.DECODE_MERGE, "  if (m == -INFINITY) {\n    continue;\n  }\n", ""),
    Mutant(K.DECODE_MERGE, "den += w * ml_part[row * 2 + 1];", "den += ml_part[row * 2 + 1];"),
    # msa_prefill_attention
    Mutant(K.PREFILL_ATTENTION, "key0 + key <= offset + t", "key0 + key < offset + t"),
    Mutant(K.PREFILL_ATTENTION, "row_ok && ((unique_mask[u] >> (row / G)) & 1u)", "row_ok"),
    Mutant(K.PREFILL_ATTENTION, "        simdgroup_multiply(of[c], diag, of[c]);\n", ""),
    Mutant(K.PREFILL_ATTENTION, "l_sum = l_sum * alpha + p_sum;", "l_sum = l_sum + p_sum;"),
    Mutant(K.PREFILL_ATTENTION, "leads = leads && k >= e;", "leads = leads && k > e;"),
    Mutant(K.PREFILL_ATTENTION, f"{BARRIER}\n    if (KV_BITS) {{", "if (KV_BITS) {"),
    Mutant(K.PREFILL_ATTENTION, "const int src = PAGED ? unique_src[u] : blk;",
           "const int src = blk;"),
    Mutant(K.PREFILL_ATTENTION, "v_scales + vat, v_biases + vat", "v_scales + vat, v_scales + vat"),
    Mutant(K.PREFILL_ATTENTION, "out[i] = s * float((word >> (i * BITS)) & MASK) + b;",
           "out[i] = s * float((word >> (i * BITS)) & (MASK >> 1)) + b;", "header"),
    Mutant(K.PREFILL_ATTENTION, "simdgroup_load(vf, vs + kt * 8 * LDV + c * 8, LDV);",
           "simdgroup_load(vf, vs + kt * 8 * LDK + c * 8, LDK);"),
    Mutant(K.PREFILL_ATTENTION, "square[r8 * 8 + quarter * 2 + i] / l_sum",
           "square[r8 * 8 + quarter * 2 + i]"),
    # MoE, phase 1 (gate, up), phase 2 (down) and their header
    Mutant(moe.DOWN, "if (!moe_first_slot(ids, j, E)) {", "if (int(ids[j]) >= E) {"),
    Mutant(moe.GATE_UP, "const int rows = is_shared ? FS : F;", "const int rows = F;"),
    Mutant(moe.GATE_UP, "    q |= words[min(word + 1, WORDS - 1)] << (32 - shift);\n", "",
           "header"),
    Mutant(moe.GATE_UP, "s == 0u ? 0x00400000u : s << 23", "s == 0u ? 0x00400000u : s << 22",
           "header"),
    Mutant(moe.DOWN, "MODE == MOE_MX ? moe_e8m0(uint(raw)) : moe_e4m3(uint(raw))",
           "moe_e8m0(uint(raw))", "header"),
    Mutant(moe.DOWN, "acc[t][r] += tw[t] * moe_row_dot", "acc[t][r] += moe_row_dot"),
    Mutant(moe.GATE_UP, "const int r = USE_SLOTS ? int(slots[e]) : e;", "const int r = e;",
           "header"),
    Mutant(moe.DOWN, "const int E = SLOTS ? slots_shape[0] : down_w_shape[0];",
           "const int E = down_w_shape[0];"),
    Mutant(moe.GATE_UP, "const float g = gate > limit ? limit : gate;",
           "const float g = gate > limit ? gate : limit;", "header"),
    Mutant(moe.GATE_UP, "scale * dot + float(biases[g]) * v_sum", "scale * dot + float(biases[g])",
           "header"),
    Mutant(moe.DOWN, "auto ht = h + size_t(t) * HW + size_t(K) * F;",
           "auto ht = h + size_t(t) * HW + size_t(K - 1) * F;"),
    Mutant(moe.GATE_UP, f"32 * NSG);\n  {BARRIER}\n}}\n\nfloat tw", "32 * NSG);\n}\n\nfloat tw"),
]


# ---------------------------------------------------------------------------------------------
# Batteries: does `run` give the twin's answer on every case of the op?
# ---------------------------------------------------------------------------------------------


def index_battery(run) -> bool:
    rng = np.random.default_rng(0)
    for B, H, D, block, topk, offset, L, extra in [
            (2, 2, 8, 33, 4, 203, 1, 5), (1, 3, 12, 33, 5, 300, 7, 2), (1, 1, 8, 4, 6, 1101, 1, 0)]:
        q = cases.normal(rng, (B, H, L, D))
        keys = np.array(cases.normal(rng, (B, offset + L + extra, D)))
        keys[:, block:2 * block] = np.nan  # a NaN block
        keys = mx.array(keys)
        for scales in (None, "int8"):
            k, s = (keys, None) if scales is None else quantize_index_keys(keys)
            got = msa_kernels.index_topk(q, k, offset, block, topk, s, run=run)
            if not np.array_equal(np.array(got), np.array(msa_ops.index_topk(q, k, offset, block,
                                                                             topk, s))):
                return False
    for L in (1, 5):  # every dot product negative: padding keys (dot 0) must not count
        q = mx.abs(cases.normal(rng, (1, 2, L, 8)))
        keys = -mx.abs(cases.normal(rng, (1, 200, 8)))
        got = msa_kernels.index_topk(q, keys, 200 - L, 33, 3, run=run)
        if not np.array_equal(np.array(got), np.array(msa_ops.index_topk(q, keys, 200 - L, 33,
                                                                         3))):
            return False
    base = rng.standard_normal((4, 8, 8)).astype(np.float32)  # exact ties
    pattern = [0, 1, 2, 3, 0, 1, 2, 3, 2, 2, 1, 0]
    keys = mx.array(np.concatenate([base[i % 4] for i in pattern])[None])
    for L in (1, 6):
        q = cases.normal(rng, (1, 2, L, 8))
        got = msa_kernels.index_topk(q, keys, 96 - L, 8, 4, run=run)
        if not np.array_equal(np.array(got), np.array(msa_ops.index_topk(q, keys, 96 - L, 8, 4))):
            return False
    return True


def attention_battery(run) -> bool:
    rng = np.random.default_rng(1)
    for B, H, G, D, DV, block, topk, offset, L, extra in [
            (2, 2, 4, 8, 8, 8, 4, 203, 1, 5), (1, 2, 3, 40, 36, 45, 3, 100, 1, 3),
            (1, 1, 5, 12, 20, 70, 3, 300, 9, 0), (1, 1, 3, 40, 36, 45, 3, 100, 6, 3)]:
        S = offset + L + extra
        q, k = cases.normal(rng, (B, H * G, L, D)), cases.normal(rng, (B, H, S, D))
        v = cases.normal(rng, (B, H, S, DV))
        sel = mx.array(cases.edgy_selection(rng, B, H, L, offset, block, topk))
        got = msa_kernels.sparse_attention(q, k, v, sel, offset, 0.3, block, run=run)
        if not np.allclose(np.array(got), np.array(msa_ops.sparse_attention(
                q, k, v, sel, offset, 0.3, block)), atol=2e-5, rtol=2e-5):
            return False
    for B, H, G, D, DV, block, topk, offset, L, extra, bits, group, paged in [
            (1, 2, 3, 32, 64, 8, 4, 203, 1, 5, 8, 32, True),
            (1, 1, 5, 64, 32, 70, 3, 300, 9, 0, 4, 32, True)]:
        S = offset + L + extra
        q, k = cases.normal(rng, (B, H * G, L, D)), cases.normal(rng, (B, H, S, D))
        k, v = quantize_kv(k, bits, group), quantize_kv(cases.normal(rng, (B, H, S, DV)), bits,
                                                        group)
        sel = mx.array(cases.edgy_selection(rng, B, H, L, offset, block, topk))
        pk, pv, slots = cases.pooled(k, v, sel, block, rng)
        got = msa_kernels.sparse_attention(q, pk, pv, sel, offset, 0.3, block, run=run,
                                           slots=slots)
        if not np.allclose(np.array(got), np.array(msa_ops.sparse_attention(
                q, k, v, sel, offset, 0.3, block)), atol=2e-5, rtol=2e-5):
            return False
    q, k, v = (cases.normal(rng, s) for s in ((1, 2, 3, 8), (1, 1, 64, 8), (1, 1, 64, 8)))
    k = k * mx.array(np.repeat([1.0, 40.0, 0.1, 80.0], 16)[None, None, :, None], mx.float32)
    sel = mx.array(np.broadcast_to(np.array([0, 1, 2, 3], np.int32), (1, 1, 3, 4)))
    got = msa_kernels.sparse_attention(q, k, v, sel, 61, 0.3, 16, run=run)
    return np.allclose(np.array(got), np.array(msa_ops.sparse_attention(q, k, v, sel, 61, 0.3,
                                                                        16)), atol=1e-4)


def moe_battery(run) -> bool:
    rng = np.random.default_rng(2)
    E, D, F, FS, Kk = 16, 576, 192, 128, 4
    for fmt, T in (("affine3", 3), ("mxfp8", 2), ("nvfp4", 1), ("affine4", 4)):
        experts = random_experts(rng, FORMATS[fmt], E, D, F)
        shared = random_experts(rng, FORMATS[fmt], None, D, FS)
        x = cases.normal(rng, (T, D)) * 3.0  # large enough for SwiGLU's clamps
        ids, rw = routing(rng, T, Kk, E, pool=5)
        got = moe.moe_experts_kernels(x, ids, rw, experts, shared, run=run)
        want = moe.moe_experts_ops(x, ids, rw, experts, shared)
        scale = float(mx.abs(want).max())
        if not np.allclose(np.array(got), np.array(want), atol=2e-5 * scale, rtol=2e-5):
            return False
        # The same call over a pool of resident experts through a slot table (expert streaming):
        # fewer slots than experts, in shuffled order, so ids and rows differ.
        held = rng.permutation(np.union1d(np.array(ids), rng.choice(E, 3, replace=False)))
        table = np.full(E, -1, np.int32)
        table[held] = np.arange(len(held))
        rows = mx.array(held.astype(np.int32))
        pool = ExpertWeights(*(dataclasses.replace(
            q, weight=q.weight[rows], scales=q.scales[rows],
            biases=None if q.biases is None else q.biases[rows]) for q in experts))
        got = moe.moe_experts_kernels(x, ids, rw, pool, shared, run=run, slots=mx.array(table))
        if not np.allclose(np.array(got), np.array(want), atol=2e-5 * scale, rtol=2e-5):
            return False
    return True


BATTERIES = {K.INDEX_SCORES: index_battery, K.INDEX_SCORES_MMA: index_battery,
             K.INDEX_SELECT: index_battery, K.DECODE_ATTENTION: attention_battery,
             K.DECODE_MERGE: attention_battery, K.PREFILL_ATTENTION: attention_battery,
             moe.GATE_UP: moe_battery, moe.DOWN: moe_battery}


def shuffled_with(mutant=None):
    """A runner: the harness with shuffled threads, the mutant in place of its kernel."""
    replaced = mutant.apply() if mutant else None

    def run(spec, launch):
        if replaced is not None and spec.name == replaced.name:
            spec = replaced
        return harness.run_with_stats(spec, launch, "shuffled")[0]

    return run


def killed(mutant) -> bool:
    try:
        return not BATTERIES[mutant.spec](shuffled_with(mutant))
    except harness.HarnessError as e:
        if "compiling" in str(e):
            raise  # an invalid mutant, not a caught bug
        return True


@pytest.mark.parametrize("battery", sorted(set(BATTERIES.values()), key=lambda b: b.__name__))
def test_the_real_kernels_pass_every_battery(battery):
    assert battery(shuffled_with())


def test_the_harness_kills_at_least_80_percent_of_planted_bugs():
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        results = list(pool.map(killed, MUTANTS))
    survivors = [m.id for m, k in zip(MUTANTS, results) if not k]
    rate = 1 - len(survivors) / len(MUTANTS)
    print(f"killed {len(MUTANTS) - len(survivors)} of {len(MUTANTS)} mutants ({rate:.0%}); "
          f"survivors: {survivors}")
    assert rate >= 0.8, survivors
    kernels = {m.spec.name for m in MUTANTS}
    assert kernels == {s.name for s in (*msa_kernels.SPECS, *moe.SPECS)}  # every kernel
