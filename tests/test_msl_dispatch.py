"""Every public op decides Metal-or-twin by the same rule, inside the op (`dispatch.runs_metal`).

The rule is checked on each op's real code with Metal made 'available' and the harness standing
in for it (so on Linux the wiring down to the launches runs too), and on the twin path with
Metal unavailable, as off a Mac."""

import mlx.core as mx
import numpy as np
import pytest
from msl import cases
from msl.moe_cases import FORMATS, SMALL, random_experts, routing

from m3mlx.metal_kernels import (dispatch, index_topk, moe, moe_experts, msa_ops,
                                 sparse_attention)

@pytest.fixture
def launched(monkeypatch):
    """Metal 'available', every kernel launch through the harness: the launched kernels."""
    return cases.metal_is_the_harness(monkeypatch)


def msa_case(rng, L, D=8):
    iq, ik = cases.normal(rng, (1, 2, L, D)), cases.normal(rng, (1, 70, D))
    q, k, v = (cases.normal(rng, s) for s in ((1, 4, L, D), (1, 2, 70, D), (1, 2, 70, D)))
    return iq, ik, q, k, v


@cases.harness_only
def test_msa_ops_launch_their_kernels(launched):
    rng = np.random.default_rng(0)
    iq, ik, q, k, v = msa_case(rng, 1)
    sel = index_topk(iq, ik, offset=69, block_size=8, topk=4)
    np.testing.assert_array_equal(np.array(sel), np.array(msa_ops.index_topk(iq, ik, 69, 8, 4)))
    out = sparse_attention(q, k, v, sel, offset=69, scale=0.3, block_size=8)
    cases.assert_close(out, msa_ops.sparse_attention(q, k, v, sel, 69, 0.3, 8), atol=2e-5)
    assert launched == ["msa_index_scores", "msa_index_select", "msa_decode_attention",
                        "msa_decode_merge"]


@cases.harness_only
def test_prefill_chunks_use_the_prefill_kernels(launched):
    rng = np.random.default_rng(1)
    iq, ik, q, k, v = msa_case(rng, 5)
    sel = index_topk(iq, ik, offset=65, block_size=8, topk=4)
    sparse_attention(q, k, v, sel, offset=65, scale=0.3, block_size=8)
    assert launched == ["msa_index_scores_mma", "msa_index_select", "msa_prefill_attention"]


def moe_case(rng, T, fmt="mxfp8"):
    E, D, F, FS, K = SMALL.values()
    f = FORMATS[fmt] if fmt else None
    experts, shared = random_experts(rng, f, E, D, F), random_experts(rng, f, None, D, FS)
    x = cases.normal(rng, (T, D))
    ids, rw = routing(rng, T, K, E)
    return x, ids, rw, experts, shared


@cases.harness_only
def test_moe_op_launches_its_kernels(launched):
    rng = np.random.default_rng(2)
    x, ids, rw, experts, shared = moe_case(rng, 2)
    got = moe_experts(x, ids, rw, experts, shared)
    assert launched == ["moe_decode_gate_up", "moe_decode_down"]
    want = moe.moe_experts_ops(x, ids, rw, experts, shared)
    cases.assert_close(got, want, atol=2e-5 * float(mx.abs(want).max()), rtol=2e-5)


def uncovered_calls(rng):
    """One call per op that no kernel covers, and the twin's answer."""
    iq, ik = cases.normal(rng, (1, 1, 1, 300)), cases.normal(rng, (1, 20, 300))  # > 32 KB
    q, k, v = (cases.normal(rng, s) for s in ((1, 1, 1, 300), (1, 1, 20, 300), (1, 1, 20, 300)))
    sel = msa_ops.index_topk(iq, ik, 19, 8, 4)
    x, ids, rw, experts, shared = moe_case(rng, 9)  # 9 tokens: more than the kernels take
    return [
        (lambda **kw: index_topk(iq, ik, offset=19, block_size=8, topk=4, **kw),
         msa_ops.index_topk(iq, ik, 19, 8, 4)),
        (lambda **kw: sparse_attention(q, k, v, sel, offset=19, scale=0.1, block_size=8, **kw),
         msa_ops.sparse_attention(q, k, v, sel, 19, 0.1, 8)),
        (lambda **kw: moe_experts(x, ids, rw, experts, shared, **kw),
         moe.moe_experts_ops(x, ids, rw, experts, shared)),
    ]


@cases.harness_only
def test_uncovered_calls_take_the_twin_unless_metal_is_insisted_on(launched):
    for call, want in uncovered_calls(np.random.default_rng(3)):
        np.testing.assert_array_equal(np.array(call()), np.array(want))
        with pytest.raises(ValueError, match="no Metal kernel covers"):
            call(use_metal=True)
    assert launched == []


@cases.harness_only
def test_use_metal_false_keeps_every_op_on_its_twin(launched):
    rng = np.random.default_rng(4)
    iq, ik, q, k, v = msa_case(rng, 1)
    sel = index_topk(iq, ik, offset=69, block_size=8, topk=4, use_metal=False)
    sparse_attention(q, k, v, sel, offset=69, scale=0.3, block_size=8, use_metal=False)
    x, ids, rw, experts, shared = moe_case(rng, 1)
    moe_experts(x, ids, rw, experts, shared, use_metal=False)
    assert launched == []


def test_without_metal_every_op_runs_its_twin_and_forcing_metal_is_an_error(monkeypatch):
    # As on Linux: no Metal GPU stream. auto and M3MLX_KERNELS=ops run the twins;
    # use_metal=True and M3MLX_KERNELS=metal say what is wrong.
    monkeypatch.setattr(mx.metal, "is_available", lambda: False)
    rng = np.random.default_rng(5)
    iq, ik, q, k, v = msa_case(rng, 1)
    x, ids, rw, experts, shared = moe_case(rng, 1)
    calls = [lambda **kw: index_topk(iq, ik, offset=69, block_size=8, topk=4, **kw),
             lambda **kw: moe_experts(x, ids, rw, experts, shared, **kw)]
    for call in calls:
        call()
        with pytest.raises(RuntimeError, match="no Metal GPU stream"):
            call(use_metal=True)
    monkeypatch.setenv(dispatch.ENV_VAR, "metal")
    for call in calls:
        with pytest.raises(RuntimeError, match="no Metal GPU stream"):
            call()
    monkeypatch.setenv(dispatch.ENV_VAR, "ops")
    for call in calls:
        call()
    monkeypatch.setenv(dispatch.ENV_VAR, "gpu")
    with pytest.raises(ValueError, match="expected 'auto', 'metal' or 'ops'"):
        calls[0]()
