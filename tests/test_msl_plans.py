"""The kernels' plans do what their speed depends on: enough threadgroups, few barriers, the
right grid order, matrix tiles where the work is matrix work, and little per-call overhead."""

import mlx.core as mx
import numpy as np
import pytest
from msl import cases, harness, shapes, strict
from msl.moe_cases import FORMATS, SMALL, random_experts, routing

from m3mlx.metal_kernels import (dispatch, index_topk, kernel, moe, moe_experts, msa_ops,
                                 sparse_attention)
from m3mlx.metal_kernels import msa_kernels as K


@cases.harness_only
def test_selection_is_one_pass_with_two_barriers():
    # Top-16 of 275 blocks (the 8-simdgroup plan): 2 barriers, not 2 a pick.
    rng = np.random.default_rng(1)
    scores = cases.normal(rng, (1, 1, 1, 275))
    launch = K.index_select_launch(scores, 1101, 4, 16)
    _, stats = harness.run_with_stats(K.INDEX_SELECT, launch)
    assert stats.barriers == 2


@cases.harness_only
def test_decode_attention_parts_have_two_barriers_and_keep_q_on_chip():
    rng = np.random.default_rng(2)
    q = cases.normal(rng, (1, 16, 1, 128), mx.bfloat16)
    k, v = (cases.normal(rng, (1, 1, 2600, 128), mx.bfloat16) for _ in range(2))
    sel = msa_ops.index_topk(cases.normal(rng, (1, 1, 1, 8)), cases.normal(rng, (1, 2600, 8)),
                             2597, 128, 16)
    launch = K.decode_attention_launch(q, k, v, sel, 2597, 0.1, 128)
    _, stats = harness.run_with_stats(K.DECODE_ATTENTION, launch)
    assert stats.barriers == 2


def test_decode_attention_splits_each_block_over_threadgroups():
    spec, split = shapes.m3_msa_launches(131072, 1)[2]
    assert spec is K.DECODE_ATTENTION
    assert split.grid[1] * split.grid[2] == 16 * 4 * 4  # top-16 blocks x 4 parts x 4 KV heads


def test_prefill_scores_vary_query_tiles_fastest_with_large_tiles():
    spec, launch = shapes.m3_msa_launches(1 << 20, 2048)[0]
    assert spec is K.INDEX_SCORES_MMA
    template = dict(launch.template)
    assert template["TQ"] * 4 == 64  # 16 queries x 4 heads a threadgroup, was 4 x 4
    assert launch.grid[0] == (2048 // template["TQ"]) * launch.threadgroup[0]  # x: query tiles
    assert launch.grid[1] == -(-((1 << 20) - 1) // 128 // template["JB"])  # y: key blocks


@cases.strict_only
@pytest.mark.parametrize("which", [0, 2])  # the prefill scores and attention kernels
def test_prefill_kernels_multiply_with_simdgroup_matrices(which):
    spec, launch = shapes.m3_msa_launches(8192, 2048)[which]
    ir = strict.check(spec, launch)
    assert ir.count("__msl_matrix_mma") >= 16  # the unrolled 8 x 8 multiply-accumulates


def test_moe_phase_two_reads_activations_once_per_8_weight_rows():
    (_, up), (_, down) = shapes.moe_launches(FORMATS["affine4"], 1, **shapes.M3_MOE)
    assert dict(down.template)["RD"] == 8 and dict(up.template)["RG"] == 2


def test_repeated_calls_reuse_kernel_objects_and_placeholders(monkeypatch):
    """Per-call cost (no kernel runs: MLX's metal_kernel is replaced by a recorder): one kernel
    object per spec, built from comment-free source, and the same placeholder arrays each call."""
    built, calls = [], {}

    def fake_metal_kernel(**kw):
        built.append(kw)

        def call(**launch):
            calls.setdefault(kw["name"], []).append(launch)
            return [mx.zeros(s, d) for s, d in zip(launch["output_shapes"],
                                                   launch["output_dtypes"])]

        return call

    monkeypatch.setattr(mx.fast, "metal_kernel", fake_metal_kernel)
    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    monkeypatch.setattr(dispatch, "use_metal", lambda requested=None: requested is not False)
    monkeypatch.setattr(kernel, "_built", {})
    rng = np.random.default_rng(3)
    E, D, F, FS, Kk = SMALL.values()
    experts = random_experts(rng, FORMATS["mxfp4"], E, D, F)
    for offset in (300, 301, 429):  # three decode steps, the last one block further
        iq, ik = cases.normal(rng, (1, 2, 1, 8)), cases.normal(rng, (1, 500, 8))
        q, kv = cases.normal(rng, (1, 4, 1, 8)), cases.normal(rng, (1, 2, 500, 8))
        sel = index_topk(iq, ik, offset=offset, block_size=8, topk=4)
        sparse_attention(q, kv, kv, sel, offset=offset, scale=0.1, block_size=8)
        x = cases.normal(rng, (1, D))
        ids, rw = routing(rng, 1, Kk, E)
        moe_experts(x, ids, rw, experts)
    names = [b["name"] for b in built]
    assert len(names) == len(set(names)) == 6  # scores, select, split, merge, gate_up, down
    assert all("//" not in b["source"] + b["header"] for b in built)
    def placeholders(launch):
        return [id(x) for x in launch["inputs"] if isinstance(x, mx.array) and x.size == 1]

    for name in ("msa_index_scores", "moe_decode_gate_up", "moe_decode_down"):
        first, *rest = calls[name]
        assert len(rest) == 2 and placeholders(first)  # the very same arrays every call
        assert all(placeholders(c) == placeholders(first) for c in rest)
    assert moe.GATE_UP.source is moe.GATE_UP.source  # read once per spec
