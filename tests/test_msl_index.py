"""The index kernels (block scores + top-k) against the MLX-ops twin, under the harness."""

import mlx.core as mx
import numpy as np
import pytest
from msl import cases

from m3mlx.metal_kernels import msa_kernels, msa_ops, quantize_index_keys

pytestmark = pytest.mark.skipif(not cases.RUNNERS, reason="no kernel runner: harness or Metal")


def check(run, q, keys, offset, block, topk, scales=None):
    got = msa_kernels.index_topk(q, keys, offset, block, topk, scales, run=run)
    want = msa_ops.index_topk(cases.as_mx(q), cases.as_mx(keys), offset, block, topk,
                              None if scales is None else cases.as_mx(scales))
    np.testing.assert_array_equal(np.array(got), np.array(want))
    return np.array(got)


@pytest.mark.parametrize("run", cases.RUNNERS)
@pytest.mark.parametrize(
    "B,H,D,block,topk,offset,L,extra",
    [
        (1, 2, 8, 8, 4, 0, 37, 0),  # prefill from scratch, 37 not a multiple of the block
        (2, 2, 8, 8, 4, 50, 21, 11),  # chunk after a cache, buffer longer than needed
        (1, 2, 8, 8, 16, 20, 30, 0),  # fewer blocks than top-k: -1 padding
        (2, 2, 8, 8, 4, 203, 1, 5),  # decode, partial own block
        (1, 3, 40, 33, 5, 300, 1, 2),  # decode; block and head dim not multiples of 32
        (1, 1, 8, 4, 6, 1101, 1, 0),  # decode over 275 blocks: the 8-simdgroup selection
    ],
)
def test_selection_matches_twin(run, B, H, D, block, topk, offset, L, extra):
    rng = np.random.default_rng(offset + L + D)
    q = cases.normal(rng, (B, H, L, D))
    keys = cases.normal(rng, (B, offset + L + extra, D))
    check(run, q, keys, offset, block, topk)


@pytest.mark.parametrize("run", cases.RUNNERS)
def test_ties_go_to_lower_block_ids(run):
    rng = np.random.default_rng(0)
    block = 8
    base = rng.standard_normal((4, block, 8)).astype(np.float32)
    keys = np.concatenate([base[i % 4] for i in [0, 1, 2, 3, 0, 1, 2, 3, 2, 2, 1, 0]])[None]
    q = cases.normal(rng, (1, 2, 6, 8))
    got = check(run, q, mx.array(keys), 90, block, 4)
    assert (got[..., :-1] >= 0).all()


@pytest.mark.parametrize("run", cases.RUNNERS)
def test_nan_blocks_rank_last(run):
    rng = np.random.default_rng(1)
    keys = rng.standard_normal((1, 64, 8)).astype(np.float32)
    keys[0, 8:16] = np.nan
    q = cases.normal(rng, (1, 2, 1, 8))
    got = check(run, q, mx.array(keys), 63, 8, 4)
    assert 1 not in got[0, :, 0, :3] and (got[0, :, 0, 3] == 7).all()


@pytest.mark.parametrize("run", cases.RUNNERS)
@pytest.mark.parametrize("offset,L", [(95, 1), (60, 13)])
def test_int8_keys_with_row_scales(run, offset, L):
    rng = np.random.default_rng(offset)
    q = cases.normal(rng, (1, 2, L, 8))
    keys, scales = quantize_index_keys(cases.normal(rng, (1, offset + L + 3, 8)))
    check(run, q, keys, offset, 8, 4, scales)


@pytest.mark.parametrize("run", cases.RUNNERS)
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
def test_half_precision_inputs(run, dtype):
    rng = np.random.default_rng(5)
    q = cases.normal(rng, (1, 2, 3, 8), dtype)
    keys = cases.normal(rng, (1, 90, 8), dtype)
    check(run, q, keys, 85, 8, 4)


@cases.harness_only
def test_strided_views_are_read_through_their_strides():
    # q as a [B, L, H, D] projection seen as [B, H, L, D]; keys inside a longer cache buffer.
    from msl import harness

    rng = np.random.default_rng(6)
    q = cases.strided(cases.normal(rng, (2, 2, 9, 8)), (0, 2, 1, 3))
    keys = cases.strided(cases.normal(rng, (2, 80, 8)), (0, 1, 2), pad_axis=1, pad=40)
    assert keys.array.strides[0] == 120 * 8 * 4
    check(harness.run, q, keys, 70, 8, 4)


@pytest.mark.parametrize("run", cases.RUNNERS)
def test_real_geometry_decode_bf16(run):
    # M3: 4 index heads, head dim 128, blocks of 128, top-16; 20 history blocks + a partial own.
    rng = np.random.default_rng(7)
    q = cases.normal(rng, (1, 4, 1, 128), mx.bfloat16)
    keys = cases.normal(rng, (1, 2600, 128), mx.bfloat16)
    got = check(run, q, keys, 2597, 128, 16)
    assert (got >= 0).all()


@pytest.mark.parametrize("run", cases.RUNNERS)
def test_real_geometry_prefill_chunk_int8(run):
    # A chunk that crosses a block boundary, over 8-bit index keys.
    rng = np.random.default_rng(8)
    q = cases.normal(rng, (1, 4, 12, 128))
    keys, scales = quantize_index_keys(cases.normal(rng, (1, 2700, 128)))
    check(run, q, keys, 2680, 128, 16, scales)
