"""The model with its custom ops: the MoE layer is the MoE op, and the whole model's logits are
the same with every kernel running (on the harness, standing in for Metal) as on the twins."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from msl import cases
from msl.moe_cases import FORMATS, SMALL

import m3mlx
import m3mlx.kv_tier
from m3mlx.demo import write_demo_checkpoint
from m3mlx.metal_kernels import ExpertWeights, dispatch, moe, msa_kernels


def quantized_moe(fmt, seed=0):
    from m3mlx.config import ModelArgs
    from m3mlx.model import MoE

    E, D, F, FS, K = SMALL.values()
    mx.random.seed(seed)
    layer = MoE(ModelArgs(hidden_size=D, intermediate_size=F, shared_intermediate_size=FS,
                          num_local_experts=E, num_experts_per_tok=K, num_hidden_layers=4))
    layer.gate.weight = layer.gate.weight * 8  # decisive routing
    layer.e_score_correction_bias = mx.random.normal((E,)) * 0.1
    mode, bits, gs = fmt
    nn.quantize(layer, gs, bits, mode=mode, class_predicate=lambda p, m: p != "gate")
    return layer


def routed(layer, x):
    """The layer's routing, written out: ids and weights."""
    scores = mx.sigmoid(layer.gate(x))
    ids = mx.argpartition(-(scores + layer.e_score_correction_bias), kth=3, axis=-1)[:, :4]
    w = mx.take_along_axis(scores, ids, axis=-1)
    return ids, w / (w.sum(-1, keepdims=True) + 1e-20) * 2.0


@pytest.mark.parametrize("T", [1, 3, 70])
def test_moe_layer_on_the_twin_path_is_the_op_twin(monkeypatch, T):
    """Twin path (M3MLX_KERNELS=ops, on any machine): the layer is its routing plus the op's
    gather twin, bit for bit."""
    monkeypatch.setenv(dispatch.ENV_VAR, "ops")
    layer = quantized_moe(FORMATS["affine4"])
    x = cases.normal(np.random.default_rng(T), (T, SMALL["D"]))
    ids, w = routed(layer, x)
    want = moe.moe_experts_ops(x, ids, w, ExpertWeights.of(layer.switch_mlp),
                               ExpertWeights.of(layer.shared_experts))
    np.testing.assert_array_equal(np.array(layer(x)), np.array(want))


@cases.harness_only
@pytest.mark.parametrize("T", [1, 5])
def test_moe_layer_takes_the_kernels_on_metal(monkeypatch, T):
    """Metal kernels via the harness: the layer as it runs on a Mac launches both kernels for up
    to 8 tokens and the twin for more."""
    layer = quantized_moe(FORMATS["nvfp4"], seed=T)
    x = cases.normal(np.random.default_rng(T), (1, T, SMALL["D"]))
    want = layer(x)
    launched = cases.metal_is_the_harness(monkeypatch)
    got = layer(x)
    assert launched == ["moe_decode_gate_up", "moe_decode_down"]
    cases.assert_close(got, want, atol=2e-5 * float(mx.abs(want).max()), rtol=2e-5)
    layer(cases.normal(np.random.default_rng(0), (1, moe.MAX_TOKENS + 1, SMALL["D"])))
    assert len(launched) == 2  # 9 tokens: the twin


def run_model(model, ids, prefill, steps):
    """Prefill `prefill` tokens through a cache, then decode `steps` more one by one: the
    logits of every position, [1, prefill + steps, vocab]."""
    cache = m3mlx.make_cache(model)
    out = [model(ids[:, :prefill], cache)]
    for i in range(prefill, prefill + steps):
        out.append(model(ids[:, i:i + 1], cache))
    return mx.concatenate(out, axis=1)


@pytest.mark.parametrize("kernels_on", [
    pytest.param("harness", marks=cases.harness_only),
    pytest.param("metal", marks=pytest.mark.skipif(not mx.metal.is_available(),
                                                   reason="Metal: only on a Mac")),
])
@pytest.mark.parametrize("seed,overrides,prefill", [
    (3, dict(sparse_layers=[True] * 4, moe_layers=[True] * 4), 197),  # a parity fixture
    (2, dict(index_block_size=8, index_topk_blocks=3, num_experts_per_tok=3), 187),
])
def test_logits_with_every_kernel_match_the_twins(tmp_path, monkeypatch, seed, overrides,
                                                  prefill, kernels_on):
    """The Metal kernels (via the harness, threads shuffled, or on a Mac's GPU) against the
    MLX-ops twins, on test_model_parity's fixtures quantized to 4 bits: a prefill chunk past
    the dense range, then decode steps, so that the index, attention (prefill and decode) and
    MoE kernels all run in the sparse regime."""
    path = write_demo_checkpoint(tmp_path, seed=seed, dtype=mx.float32, **overrides)
    model = m3mlx.load_model(path, dtype=mx.float32)
    nn.quantize(model, 32, 4, class_predicate=lambda p, m: hasattr(m, "to_quantized")
                and not p.endswith("block_sparse_moe.gate"))
    ids = mx.array(np.random.default_rng(seed).integers(0, model.args.vocab_size, (1, 200)))
    monkeypatch.setenv(dispatch.ENV_VAR, "ops")
    want = run_model(model, ids, prefill, 200 - prefill)
    if kernels_on == "harness":
        launched = cases.metal_is_the_harness(monkeypatch, order="shuffled")
    monkeypatch.setenv(dispatch.ENV_VAR, "metal")
    got = run_model(model, ids, prefill, 200 - prefill)
    if kernels_on == "harness":
        assert {"msa_index_scores", "msa_index_scores_mma", "msa_index_select",
                "msa_decode_attention", "msa_decode_merge", "msa_prefill_attention",
                "moe_decode_gate_up", "moe_decode_down"} <= set(launched)
    assert float(mx.abs(got - want).max()) <= 1e-4 * max(1.0, float(mx.abs(want).max()))


@pytest.mark.parametrize("kernels_on", [
    pytest.param("harness", marks=cases.harness_only),
    pytest.param("metal", marks=pytest.mark.skipif(not mx.metal.is_available(),
                                                   reason="Metal: only on a Mac")),
])
def test_logits_over_compact_tiered_kv_match_the_twins(tmp_path, monkeypatch, kernels_on):
    """8-bit K/V in a memory tier far smaller than the context: the attention kernels decode the
    compact blocks and read the pool through slots (via the harness, threads shuffled, or on a
    Mac's GPU), giving the twins' logits through a sparse prefill chunk and decode steps."""
    path = write_demo_checkpoint(tmp_path, seed=3, dtype=mx.float32, head_dim=32, rotary_dim=16,
                                 sparse_layers=[True] * 4, moe_layers=[True] * 4)
    model = m3mlx.load_model(path, dtype=mx.float32)
    ids = mx.array(np.random.default_rng(3).integers(0, model.args.vocab_size, (1, 200)))

    def tiered_run():
        cache = m3mlx.make_cache(model, kv_bits=8, kv_memory=40_000, kv_cache_dir=tmp_path)
        out = [model(ids[:, s:s + 64], cache) for s in (0, 64, 128)]  # 64: prefill kernels
        out += [model(ids[:, i:i + 1], cache) for i in range(192, 200)]
        assert m3mlx.kv_tier.tiers_of(cache)[0].stats.misses > 0  # blocks came back from disk
        return mx.concatenate(out, axis=1)

    monkeypatch.setenv(dispatch.ENV_VAR, "ops")
    want = tiered_run()
    templates = []
    if kernels_on == "harness":
        cases.metal_is_the_harness(monkeypatch, order="shuffled")
        run = msa_kernels.metal_run

        def spying(spec, launch):
            templates.append((spec.name, dict(launch.template)))
            return run(spec, launch)

        monkeypatch.setattr(msa_kernels, "metal_run", spying)
    monkeypatch.setenv(dispatch.ENV_VAR, "metal")
    got = tiered_run()
    if kernels_on == "harness":
        variants = {(name, t["KV_BITS"], t["PAGED"]) for name, t in templates if "KV_BITS" in t}
        assert variants == {("msa_prefill_attention", 8, True), ("msa_decode_attention", 8, True)}
    assert float(mx.abs(got - want).max()) <= 1e-4 * max(1.0, float(mx.abs(want).max()))
