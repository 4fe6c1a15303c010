"""The sparse-attention kernels (decode split-K + merge, prefill tiles) against the MLX-ops twin,
on every kernel runner (`cases.RUNNERS`: the harness in thread order and shuffled, Metal)."""

import mlx.core as mx
import numpy as np
import pytest
from msl import cases, harness, shapes
from msl.cases import prebuilt  # noqa: F401 (the fixture)

from m3mlx.metal_kernels import msa_kernels, msa_ops, quantize_kv

pytestmark = [cases.needs_runner, pytest.mark.usefixtures("prebuilt")]


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


SHAPES = shapes.ATTENTION_SHAPES


@cases.kernel_runners
@pytest.mark.parametrize("B,H,G,D,DV,block,topk,offset,L,extra", SHAPES)
def test_twin_selection(run, B, H, G, D, DV, block, topk, offset, L, extra):
    rng, q, k, v = random_case(offset + L, B, H, G, D, DV, offset + L + extra, L)
    iq = cases.normal(rng, (B, H, L, 8))
    ik = cases.normal(rng, (B, offset + L + extra, 8))
    sel = msa_ops.index_topk(iq, ik, offset, block, topk)
    check(run, q, k, v, sel, offset, block)


@cases.kernel_runners
@pytest.mark.parametrize("B,H,G,D,DV,block,topk,offset,L,extra", SHAPES[:4])
def test_unordered_ids_and_padding_holes(run, B, H, G, D, DV, block, topk, offset, L, extra):
    rng, q, k, v = random_case(offset + 2 * L, B, H, G, D, DV, offset + L + extra, L)
    sel = mx.array(cases.edgy_selection(rng, B, H, L, offset, block, topk))
    check(run, q, k, v, sel, offset, block)


@cases.kernel_runners
@pytest.mark.parametrize("B,H,G,D,DV,block,topk,offset,L,extra", shapes.CONSTANT_SPACE_SHAPES)
def test_inputs_in_the_constant_address_space(run, B, H, G, D, DV, block, topk, offset, L,
                                              extra):
    # MLX passes arrays of fewer than 8 elements as `constant`: q [1, 2, L, 1], keys and
    # values [1, 1, 3, 1] and (decode) the selection [1, 1, 1, 2].
    rng, q, k, v = random_case(L, B, H, G, D, DV, offset + L + extra, L)
    sel = mx.array(cases.edgy_selection(rng, B, H, L, offset, block, topk))
    check(run, q, k, v, sel, offset, block)


@cases.kernel_runners
def test_scores_far_apart_rescale_the_output(run):
    # Keys whose scores jump by more than the prefill kernel's lazy-rescale threshold (e^8)
    # from one chunk to the next, in both directions.
    rng, q, k, v = random_case(13, 1, 1, 2, 8, 8, 64, 3)
    k = k * mx.array(np.repeat([1.0, 40.0, 0.1, 80.0], 16)[None, None, :, None], mx.float32)
    sel = mx.array(np.broadcast_to(np.array([0, 1, 2, 3], np.int32), (1, 1, 3, 4)))
    check(run, q, k, v, sel, 61, 16, atol=1e-4)


@cases.kernel_runners
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
    # Harness only: MLX arrays cannot carry such strides from Python.
    rng, q, k, v = random_case(10 + L, 2, 2, 2, 8, 8, 60, L)
    # A [B, S, H, D] cache longer than used, a [B, L, Hq, D] projection, [B, L, H, k] ids.
    q = cases.strided(q, (0, 2, 1, 3))
    k = cases.strided(k, (0, 2, 1, 3), pad_axis=2, pad=20)
    v = cases.strided(v, (0, 2, 1, 3), pad_axis=2, pad=20)
    sel = cases.strided(mx.array(cases.edgy_selection(rng, 2, 2, L, 53, 8, 4)), (0, 2, 1, 3))
    check(harness.run, q, k, v, sel, 53, 8)


@cases.kernel_runners
def test_real_geometry_decode_bf16(run):
    # M3: 4 KV heads x 16 query heads, head dim 128, blocks of 128, top-16, partial own block.
    rng, q, k, v = random_case(11, 1, 4, 16, 128, 128, 2600, 1, mx.bfloat16)
    iq, ik = cases.normal(rng, (1, 4, 1, 16)), cases.normal(rng, (1, 2600, 16))
    sel = msa_ops.index_topk(iq, ik, 2597, 128, 16)
    check(run, q, k, v, sel, 2597, 128, atol=3e-2)


@cases.kernel_runners
def test_real_geometry_prefill(run):
    # One KV group of M3 (16 query heads, head dim 128, blocks of 128, top-16): eight queries
    # crossing a block boundary, two query tiles sharing most of their blocks.
    rng, q, k, v = random_case(12, 1, 1, 16, 128, 128, 2700, 8)
    iq, ik = cases.normal(rng, (1, 1, 8, 16)), cases.normal(rng, (1, 2700, 16))
    sel = msa_ops.index_topk(iq, ik, 2684, 128, 16)
    check(run, q, k, v, sel, 2684, 128)


# ---------------------------------------------------------------------------------------------
# Compact K/V (8 or 4 bits per row) and pools of blocks (a memory tier's layout)


def kv_case(seed, B, H, G, D, DV, block, topk, offset, L, extra, bits, group, paged,
            dtype=mx.float32, holes=True):
    """q, K/V (compact when bits) and a selection; with `paged` the K/V as a shuffled pool and
    its slots. Returns (kernel inputs, contiguous twin inputs)."""
    S = offset + L + extra
    rng, q, k, v = random_case(seed, B, H, G, D, DV, S, L, dtype)
    if bits:
        k, v = quantize_kv(k, bits, group), quantize_kv(v, bits, group)
    sel = mx.array(cases.edgy_selection(rng, B, H, L, offset, block, topk, holes=holes))
    slots = None
    kk, vk = k, v
    if paged:
        kk, vk, slots = cases.pooled(k, v, sel, block, rng)
    return (q, kk, vk, sel, slots), (q, k, v, sel)


@cases.kernel_runners
@pytest.mark.parametrize("B,H,G,D,DV,block,topk,offset,L,extra,bits,group,paged",
                         shapes.KV_ATTENTION_SHAPES)
def test_compact_and_pooled_kv(run, B, H, G, D, DV, block, topk, offset, L, extra, bits, group,
                               paged):
    """The kernels decode compact K/V and read pools through slots: the twin's answer over the
    same K/V, contiguous, with unordered ids and -1 holes."""
    (q, k, v, sel, slots), twin = kv_case(offset + L + bits, B, H, G, D, DV, block, topk, offset,
                                          L, extra, bits, group, paged)
    scale = D ** -0.5
    got = msa_kernels.sparse_attention(q, k, v, sel, offset, scale, block, run=run, slots=slots)
    want = msa_ops.sparse_attention(*twin, offset, scale, block)
    assert got.dtype == want.dtype
    cases.assert_close(got, want, atol=2e-5, rtol=2e-5)


@cases.kernel_runners
def test_real_geometry_compact_pooled_decode_bf16(run):
    # M3's decode over 8-bit K/V (group 64, float16 scales, as the cache stores bf16 K/V) in a
    # shuffled pool: 4 KV heads x 16 query heads, head dim 128, blocks of 128, top-16.
    (q, k, v, sel, slots), twin = kv_case(21, 1, 4, 16, 128, 128, 128, 16, 2597, 1, 2, 8, 64,
                                          True, mx.bfloat16, holes=False)
    got = msa_kernels.sparse_attention(q, k, v, sel, 2597, 128 ** -0.5, 128, run=run,
                                       slots=slots)
    want = msa_ops.sparse_attention(*twin, 2597, 128 ** -0.5, 128)
    cases.assert_close(got, want, atol=3e-2)


@cases.kernel_runners
def test_real_geometry_compact_pooled_prefill(run):
    # One KV group of M3 over 4-bit K/V (group 32) in a shuffled pool: eight queries crossing a
    # block boundary.
    (q, k, v, sel, slots), twin = kv_case(22, 1, 1, 16, 128, 128, 128, 16, 2684, 8, 8, 4, 32,
                                          True, holes=False)
    got = msa_kernels.sparse_attention(q, k, v, sel, 2684, 128 ** -0.5, 128, run=run,
                                       slots=slots)
    want = msa_ops.sparse_attention(*twin, 2684, 128 ** -0.5, 128)
    cases.assert_close(got, want, atol=2e-5, rtol=2e-5)
