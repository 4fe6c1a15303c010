"""The public MSA ops route to the Metal kernels: exercised here with the harness standing in
for Metal (so the dispatch wiring is covered on Linux too)."""


import mlx.core as mx
import numpy as np
import pytest
from msl import cases

from m3mlx.metal_kernels import index_topk, msa, msa_kernels, msa_ops, sparse_attention

pytestmark = cases.harness_only


@pytest.fixture
def metal_is_the_harness(monkeypatch):
    """Pretend Metal is available, with every kernel launch going through the harness."""
    return cases.metal_is_the_harness(monkeypatch, msa, msa_kernels)


def test_public_ops_use_the_kernels(metal_is_the_harness):
    rng = np.random.default_rng(0)
    iq, ik = cases.normal(rng, (1, 2, 1, 8)), cases.normal(rng, (1, 70, 8))
    sel = index_topk(iq, ik, offset=69, block_size=8, topk=4)
    np.testing.assert_array_equal(np.array(sel), np.array(msa_ops.index_topk(iq, ik, 69, 8, 4)))
    q, k, v = (cases.normal(rng, s) for s in ((1, 4, 1, 8), (1, 2, 70, 8), (1, 2, 70, 8)))
    out = sparse_attention(q, k, v, sel, offset=69, scale=0.3, block_size=8)
    cases.assert_close(out, msa_ops.sparse_attention(q, k, v, sel, 69, 0.3, 8), atol=2e-5)
    assert metal_is_the_harness == ["msa_index_scores", "msa_index_select",
                                    "msa_decode_attention", "msa_decode_merge"]


def test_prefill_chunks_use_the_prefill_kernel(metal_is_the_harness):
    rng = np.random.default_rng(1)
    q, k, v = (cases.normal(rng, s) for s in ((1, 4, 5, 8), (1, 2, 70, 8), (1, 2, 70, 8)))
    sel = mx.array(cases.edgy_selection(rng, 1, 2, 5, 65, 8, 4))
    sparse_attention(q, k, v, sel, offset=65, scale=0.3, block_size=8)
    assert metal_is_the_harness == ["msa_prefill_attention"]


def test_shapes_without_a_kernel_fall_back_to_the_twin_unless_forced(metal_is_the_harness):
    rng = np.random.default_rng(2)
    iq, ik = cases.normal(rng, (1, 1, 1, 300)), cases.normal(rng, (1, 20, 300))  # tile > 32 KB
    sel = index_topk(iq, ik, offset=19, block_size=8, topk=4)
    np.testing.assert_array_equal(np.array(sel), np.array(msa_ops.index_topk(iq, ik, 19, 8, 4)))
    assert metal_is_the_harness == []
    with pytest.raises(ValueError, match="no Metal index kernel"):
        index_topk(iq, ik, offset=19, block_size=8, topk=4, use_metal=True)


def test_use_metal_false_keeps_the_twin(metal_is_the_harness):
    rng = np.random.default_rng(3)
    iq, ik = cases.normal(rng, (1, 1, 1, 8)), cases.normal(rng, (1, 20, 8))
    index_topk(iq, ik, offset=19, block_size=8, topk=4, use_metal=False)
    assert metal_is_the_harness == []
