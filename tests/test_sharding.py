"""Sharding plans on their own (m3mlx.sharding): what divides, the pipeline's stages, and what
a rank holds of M3's real checkpoint layout. No processes are started here."""

import itertools

import pytest

from m3mlx.config import ModelArgs
from m3mlx.demo import demo_args
from m3mlx.sharding import HOLD, Plan, ShardingError, balanced_ranges

M3 = ModelArgs()


@pytest.mark.parametrize("n", [3, 8])
def test_tensor_plan_needs_ranks_that_divide_the_kv_heads(n):
    with pytest.raises(ShardingError, match="4 KV heads.*--parallel pipeline"):
        Plan.tensor(M3, 0, n)


def test_pipeline_needs_a_layer_per_rank_and_untied_embeddings():
    with pytest.raises(ShardingError, match="more than the model's 4 layers"):
        Plan.pipeline(demo_args(), 0, 5)
    with pytest.raises(ShardingError, match="tied embeddings.*--parallel tensor"):
        Plan.pipeline(demo_args(tie_word_embeddings=True), 0, 2)


@pytest.mark.parametrize("n", [2, 4])
def test_tensor_plan_splits_m3_as_the_issue_says(n):
    plan = Plan.tensor(M3, 1, n)
    layer = "language_model.model.layers.5."
    # Attention by KV group: q/k/v/index-q rows, o_proj columns; the one index-key head whole.
    for name in ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                 "self_attn.v_proj.weight", "self_attn.index_q_proj.weight"):
        assert plan.split_axis(layer + name) == 0
    assert plan.split_axis(layer + "self_attn.o_proj.weight") == -1
    assert plan.split_axis(layer + "self_attn.index_k_proj.weight") == HOLD
    # Experts by rank (the stacked axis), the router whole, the shared expert by columns/rows.
    experts = layer + "block_sparse_moe.switch_mlp.down_proj.weight"
    assert plan.part(experts, (128, 6144, 3072)) == (0, 128 // n, 2 * 128 // n)
    assert plan.split_axis(layer + "block_sparse_moe.gate.weight") == HOLD
    assert plan.split_axis(layer + "block_sparse_moe.shared_experts.up_proj.weight") == 0
    assert plan.split_axis(layer + "block_sparse_moe.shared_experts.down_proj.weight") == -1
    assert plan.split_axis("language_model.lm_head.weight") == 0  # 200064 divides by 2 and 4
    assert plan.kv_heads(M3) == (4 // n, 2 * 4 // n)


def test_quantized_parts_must_be_whole_groups():
    plan = Plan.tensor(M3, 0, 4)
    with pytest.raises(ShardingError, match="whole quantization groups"):
        plan.part("language_model.model.layers.0.mlp.down_proj.scales", (6144, 3))


def test_pipeline_stages_are_contiguous_and_rank_0_runs_the_last():
    ranges = [Plan.pipeline(M3, r, 4).layers for r in range(4)]
    assert ranges[3][0] == 0 and ranges[0][1] == M3.num_hidden_layers
    assert all(ranges[r + 1][1] == ranges[r][0] for r in range(3))
    assert Plan.pipeline(M3, 3, 4).first_stage and Plan.pipeline(M3, 0, 4).last_stage


@pytest.mark.parametrize("sizes, parts", [([5, 1, 1, 1, 9, 2], 3), ([1] * 7, 4), ([3, 8, 2], 3),
                                          ([4, 4, 1, 7, 7, 2, 2], 2)])
def test_balanced_ranges_minimise_the_largest_stage(sizes, parts):
    got = balanced_ranges(sizes, parts, first_extra=2)
    assert got[0][0] == 0 and got[-1][1] == len(sizes)
    assert all(a < b for a, b in got) and all(got[i][1] == got[i + 1][0] for i in range(parts - 1))

    def worst(cuts):
        bounds = [0, *cuts, len(sizes)]
        return max(sum(sizes[a:b]) + (2 if i == 0 else 0)
                   for i, (a, b) in enumerate(zip(bounds, bounds[1:])))

    best = min(worst(c) for c in itertools.combinations(range(1, len(sizes)), parts - 1))
    assert worst([b for _, b in got[:-1]]) == best
