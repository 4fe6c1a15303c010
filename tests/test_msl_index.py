"""The index kernels (block scores + top-k selection) against the MLX-ops twin, on every kernel
runner (`cases.RUNNERS`: the harness in thread order and shuffled, Metal on a Mac)."""

import mlx.core as mx
import numpy as np
import pytest
from msl import cases, harness, shapes
from msl.cases import prebuilt  # noqa: F401 (the fixture)

from m3mlx.metal_kernels import msa_kernels, msa_ops, quantize_index_keys

pytestmark = [cases.needs_runner, pytest.mark.usefixtures("prebuilt")]


def check(run, q, keys, offset, block, topk, scales=None):
    got = msa_kernels.index_topk(q, keys, offset, block, topk, scales, run=run)
    want = msa_ops.index_topk(cases.as_mx(q), cases.as_mx(keys), offset, block, topk,
                              None if scales is None else cases.as_mx(scales))
    np.testing.assert_array_equal(np.array(got), np.array(want))
    return np.array(got)


@cases.kernel_runners
@pytest.mark.parametrize("B,H,D,block,topk,offset,L,extra", shapes.INDEX_SHAPES)
def test_selection_matches_twin(run, B, H, D, block, topk, offset, L, extra):
    rng = np.random.default_rng(offset + L + D)
    q = cases.normal(rng, (B, H, L, D))
    keys = cases.normal(rng, (B, offset + L + extra, D))
    check(run, q, keys, offset, block, topk)


@cases.kernel_runners
@pytest.mark.parametrize("L", [1, 2])
def test_inputs_in_the_constant_address_space(run, L):
    # MLX passes arrays of fewer than 8 elements as `constant`: q [1, 1, L, 2], keys [1, 3, 2].
    rng = np.random.default_rng(L)
    q, keys = cases.normal(rng, (1, 1, L, 2)), cases.normal(rng, (1, 3, 2))
    check(run, q, keys, 3 - L, 1, 2)


@cases.kernel_runners
def test_ties_go_to_lower_block_ids(run):
    rng = np.random.default_rng(0)
    block = 8
    base = rng.standard_normal((4, block, 8)).astype(np.float32)
    keys = np.concatenate([base[i % 4] for i in [0, 1, 2, 3, 0, 1, 2, 3, 2, 2, 1, 0]])[None]
    q = cases.normal(rng, (1, 2, 6, 8))
    got = check(run, q, mx.array(keys), 90, block, 4)
    assert (got[..., :-1] >= 0).all()
    check(run, q[:, :, :1], mx.array(keys), 90, block, 4)  # the decode kernel's ties


@cases.kernel_runners
@pytest.mark.parametrize("L", [1, 3])
def test_nan_blocks_rank_last(run, L):
    rng = np.random.default_rng(1)
    keys = rng.standard_normal((1, 66, 8)).astype(np.float32)
    keys[0, 8:16] = np.nan
    q = cases.normal(rng, (1, 2, L, 8))
    got = check(run, q, mx.array(keys), 63, 8, 4)
    assert 1 not in got[0, :, 0, :3] and (got[0, :, 0, 3] == 7).all()


@cases.kernel_runners
@pytest.mark.parametrize("offset,L", [(95, 1), (60, 13)])
def test_int8_keys_with_row_scales(run, offset, L):
    rng = np.random.default_rng(offset)
    q = cases.normal(rng, (1, 2, L, 8))
    keys, scales = quantize_index_keys(cases.normal(rng, (1, offset + L + 3, 8)))
    check(run, q, keys, offset, 8, 4, scales)


@cases.kernel_runners
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
@pytest.mark.parametrize("L", [1, 3])
def test_half_precision_inputs(run, dtype, L):
    rng = np.random.default_rng(5)
    q = cases.normal(rng, (1, 2, L, 8), dtype)
    keys = cases.normal(rng, (1, 90, 8), dtype)
    check(run, q, keys, 85, 8, 4)


@cases.harness_only
@pytest.mark.parametrize("L", [1, 9])
def test_strided_views_are_read_through_their_strides(L):
    # q as a [B, L, H, D] projection seen as [B, H, L, D]; keys inside a longer cache buffer.
    # Harness only: MLX arrays cannot carry such strides from Python.
    rng = np.random.default_rng(6)
    q = cases.strided(cases.normal(rng, (2, 2, L, 8)), (0, 2, 1, 3))
    keys = cases.strided(cases.normal(rng, (2, 80, 8)), (0, 1, 2), pad_axis=1, pad=40)
    assert keys.array.strides[0] == 120 * 8 * 4
    check(harness.run, q, keys, 70, 8, 4)


@cases.kernel_runners
def test_real_geometry_decode_bf16(run):
    # M3: 4 index heads, head dim 128, blocks of 128, top-16; 20 history blocks + a partial own.
    rng = np.random.default_rng(7)
    q = cases.normal(rng, (1, 4, 1, 128), mx.bfloat16)
    keys = cases.normal(rng, (1, 2600, 128), mx.bfloat16)
    got = check(run, q, keys, 2597, 128, 16)
    assert (got >= 0).all()


@cases.kernel_runners
def test_real_geometry_prefill_chunk_int8(run):
    # A chunk that crosses a block boundary, over 8-bit index keys; 20 query rows of a
    # 16-query tile, the last of them past the chunk.
    rng = np.random.default_rng(8)
    q = cases.normal(rng, (1, 4, 20, 128))
    keys, scales = quantize_index_keys(cases.normal(rng, (1, 2700, 128)))
    check(run, q, keys, 2672, 128, 16, scales)
