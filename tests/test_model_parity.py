"""Logits equal mlx-lm 0.32's `minimax_m3_vl` (the reference port) in float32.

Past top-k x block tokens MSA is sparse: mlx-lm realizes it as a dense mask over every key,
m3mlx by scoring blocks and attending to the selected ones only. Same numbers either way.
These run the MLX-ops twins on every machine; test_msl_model.py holds the Metal kernels to the
twins on the same fixtures.
"""

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import m3mlx
from m3mlx.demo import write_demo_checkpoint

from m3mlx.metal_kernels import dispatch

mlx_lm_utils = pytest.importorskip("mlx_lm.utils")


@pytest.fixture(autouse=True)
def twin_path(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "ops")


def both_models(path):
    ours = m3mlx.load_model(path, dtype=mx.float32)
    ref, _ = mlx_lm_utils.load_model(Path(path))
    ref.set_dtype(mx.float32)
    return ours, ref


def max_diff(a, b):
    return float(np.abs(np.array(a) - np.array(b)).max())


@pytest.mark.parametrize("seed,overrides,lengths", [
    (0, {}, (9, 64, 300)),  # dense range, at the threshold, sparse (block 16, top-4)
    (1, dict(num_attention_heads=4, num_key_value_heads=1, index_n_heads=1), (250,)),
    (2, dict(index_block_size=8, index_topk_blocks=3, num_experts_per_tok=3), (77, 190)),
    (3, dict(sparse_layers=[True] * 4, moe_layers=[True] * 4), (200,)),
])
def test_logits_match_mlx_lm(tmp_path, seed, overrides, lengths):
    path = write_demo_checkpoint(tmp_path, seed=seed, dtype=mx.float32, **overrides)
    ours, ref = both_models(path)
    rng = np.random.default_rng(seed)
    for L in lengths:
        ids = mx.array(rng.integers(0, ours.args.vocab_size, (1, L)))
        assert max_diff(ours(ids), ref(ids)) <= 1e-4, L


def test_logits_match_mlx_lm_batched(tmp_path):
    path = write_demo_checkpoint(tmp_path, seed=4, dtype=mx.float32)
    ours, ref = both_models(path)
    ids = mx.array(np.random.default_rng(4).integers(0, ours.args.vocab_size, (2, 150)))
    assert max_diff(ours(ids), ref(ids)) <= 1e-4


def test_real_msa_geometry_at_4k_tokens(tmp_path):
    """M3's block 128, top-16 and head_dim 128, far into the sparse regime (33 blocks)."""
    path = write_demo_checkpoint(
        tmp_path, seed=5, dtype=mx.float32, hidden_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=128, rotary_dim=64,
        index_n_heads=2, index_head_dim=128, index_block_size=128, index_topk_blocks=16,
        sparse_layers=[False, True], moe_layers=[False, True])
    ours, ref = both_models(path)
    ids = mx.array(np.random.default_rng(5).integers(0, ours.args.vocab_size, (1, 4200)))
    # The last positions see 33 blocks and keep 16: the sparse regime proper.
    assert max_diff(ours(ids)[:, -256:], ref(ids)[:, -256:]) <= 1e-4
