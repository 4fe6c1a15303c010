"""The sparse-attention kernels (decode split + merge, prefill tiles) against the MLX-ops twin."""

import mlx.core as mx
import numpy as np
import pytest
from msl import cases

from m3mlx.metal_kernels import msa_kernels, msa_ops

pytestmark = pytest.mark.skipif(not cases.RUNNERS, reason="no kernel runner: harness or Metal")


def check(run, q, k, v, sel, offset, block, atol=2e-5):
    scale = q.shape[-1] ** -0.5
    got = msa_kernels.sparse_attention(q, k, v, sel, offset, scale, block, run=run)
    want = msa_ops.sparse_attention(*(cases.as_mx(x) for x in (q, k, v, sel)), offset, scale,
                                    block)
    assert got.dtype == want.dtype
    cases.assert_close(got, want, atol=atol, rtol=atol)


def random_case(seed, B, H, G, D, DV, S, L, dtype=mx.float32):
    rng = np.random.default_rng(seed)
    q = cases.normal(rng, (B, H * G, L, D), dtype)
    k = cases.normal(rng, (B, H, S, D), dtype)
    v = cases.normal(rng, (B, H, S, DV), dtype)
    return rng, q, k, v


SHAPES = [
    # B, H, G, D, DV, block, topk, offset, L, extra
    (1, 2, 2, 8, 8, 8, 4, 0, 37, 0),  # prefill from scratch, 37 not a multiple of the block
    (2, 2, 3, 8, 12, 8, 4, 50, 21, 11),  # chunk after a cache, padded buffer, Dv != D
    (1, 1, 2, 8, 8, 8, 16, 20, 30, 0),  # fewer blocks than top-k
    (2, 2, 4, 8, 8, 8, 4, 203, 1, 5),  # decode, partial own block
    (1, 2, 3, 40, 36, 45, 3, 100, 1, 3),  # decode; sizes not multiples of 32, two chunks a block
    (1, 1, 3, 40, 36, 45, 3, 100, 6, 3),  # prefill; the same
]


@pytest.mark.parametrize("run", cases.RUNNERS)
@pytest.mark.parametrize("B,H,G,D,DV,block,topk,offset,L,extra", SHAPES)
def test_twin_selection(run, B, H, G, D, DV, block, topk, offset, L, extra):
    rng, q, k, v = random_case(offset + L, B, H, G, D, DV, offset + L + extra, L)
    iq = cases.normal(rng, (B, H, L, 8))
    ik = cases.normal(rng, (B, offset + L + extra, 8))
    sel = msa_ops.index_topk(iq, ik, offset, block, topk)
    check(run, q, k, v, sel, offset, block)


@pytest.mark.parametrize("run", cases.RUNNERS)
@pytest.mark.parametrize("B,H,G,D,DV,block,topk,offset,L,extra", SHAPES[:4])
def test_unordered_ids_and_padding_holes(run, B, H, G, D, DV, block, topk, offset, L, extra):
    rng, q, k, v = random_case(offset + 2 * L, B, H, G, D, DV, offset + L + extra, L)
    sel = mx.array(cases.edgy_selection(rng, B, H, L, offset, block, topk))
    check(run, q, k, v, sel, offset, block)


@pytest.mark.parametrize("run", cases.RUNNERS)
@pytest.mark.parametrize("L,dtype", [(1, mx.float16), (5, mx.bfloat16)])
def test_half_precision(run, L, dtype):
    # The twin rounds q * scale, the scores and the weights to the input type; the kernels
    # keep float32 inside, so the two agree to the type's precision only.
    rng, q, k, v = random_case(9, 1, 2, 2, 8, 8, 70, L, dtype)
    sel = mx.array(cases.edgy_selection(rng, 1, 2, L, 64, 8, 4, holes=False))
    check(run, q, k, v, sel, 64, 8, atol=3e-2)


@pytest.mark.parametrize("L", [1, 7])
@cases.harness_only
def test_strided_views_are_read_through_their_strides(L):
    from msl import harness

    rng, q, k, v = random_case(10 + L, 2, 2, 2, 8, 8, 60, L)
    # A [B, S, H, D] cache longer than used, a [B, L, Hq, D] projection, [B, L, H, k] ids.
    q = cases.strided(q, (0, 2, 1, 3))
    k = cases.strided(k, (0, 2, 1, 3), pad_axis=2, pad=20)
    v = cases.strided(v, (0, 2, 1, 3), pad_axis=2, pad=20)
    sel = cases.strided(mx.array(cases.edgy_selection(rng, 2, 2, L, 53, 8, 4)), (0, 2, 1, 3))
    check(harness.run, q, k, v, sel, 53, 8)


@pytest.mark.parametrize("run", cases.RUNNERS)
def test_real_geometry_decode_bf16(run):
    # M3: 4 KV heads x 16 query heads, head dim 128, blocks of 128, top-16, partial own block.
    rng, q, k, v = random_case(11, 1, 4, 16, 128, 128, 2600, 1, mx.bfloat16)
    iq, ik = cases.normal(rng, (1, 4, 1, 16)), cases.normal(rng, (1, 2600, 16))
    sel = msa_ops.index_topk(iq, ik, 2597, 128, 16)
    check(run, q, k, v, sel, 2597, 128, atol=3e-2)


@pytest.mark.parametrize("run", cases.RUNNERS)
def test_real_geometry_prefill(run):
    # Eight queries crossing a block boundary: two query tiles, blocks shared across the tile.
    rng, q, k, v = random_case(12, 1, 4, 16, 128, 128, 2700, 8)
    iq, ik = cases.normal(rng, (1, 4, 8, 16)), cases.normal(rng, (1, 2700, 16))
    sel = msa_ops.index_topk(iq, ik, 2684, 128, 16)
    check(run, q, k, v, sel, 2684, 128)
