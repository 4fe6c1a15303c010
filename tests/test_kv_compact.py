"""Compact K/V (kv_bits=8 or 4): the ops read exactly the decoded K/V, decode only what they
attend to, and the model stays within stated bounds of the float cache on the parity fixtures
in the sparse regime; the format round-trips through prompt caches as it is stored.

Everything here runs the MLX-ops twins (M3MLX_KERNELS=ops); test_msl_attention.py holds the
Metal kernels to the twins on compact K/V, and test_msl_model.py does it for the whole model.
"""

import json

import mlx.core as mx
import numpy as np
import pytest

import m3mlx
from m3mlx import model as model_module
from m3mlx.cache import LayerCache
from m3mlx.demo import write_demo_checkpoint
from m3mlx.generate import generate_tokens
from m3mlx.metal_kernels import (dense_attention, dispatch, index_topk, quantize_kv,
                                 sparse_attention)
from m3mlx.metal_kernels import attention as attention_ops
from m3mlx.metal_kernels.kv import group_size_for


@pytest.fixture(autouse=True)
def twin_path(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "ops")


def normal(rng, shape):
    return mx.array(rng.standard_normal(shape).astype(np.float32))


# ---------------------------------------------------------------------------------------------
# The ops


@pytest.mark.parametrize("bits,group", [(8, 64), (8, 32), (4, 32), (4, 128)])
@pytest.mark.parametrize("L", [1, 37])
def test_sparse_attention_over_compact_kv_is_attention_over_the_decoded_kv(bits, group, L):
    rng = np.random.default_rng(bits + L)
    B, H, G, D, S, block = 2, 2, 3, 128, 700, 16
    k, v = normal(rng, (B, H, S, D)), normal(rng, (B, H, S, D))
    kq, vq = quantize_kv(k, bits, group), quantize_kv(v, bits, group)
    q = normal(rng, (B, H * G, L, D))
    sel = index_topk(normal(rng, (B, H, L, 16)), normal(rng, (B, S, 16)), offset=S - L,
                     block_size=block, topk=5)
    got = sparse_attention(q, kq, vq, sel, offset=S - L, scale=0.1, block_size=block)
    want = sparse_attention(q, kq.dequantize(mx.float32), vq.dequantize(mx.float32), sel,
                            offset=S - L, scale=0.1, block_size=block)
    assert got.dtype == mx.float32
    np.testing.assert_array_equal(np.array(got), np.array(want))


@pytest.mark.parametrize("L", [1, 9])
def test_dense_attention_over_compact_kv_by_key_tiles(monkeypatch, L):
    """Past DENSE_TILE_KEYS, compact K/V is read tile by tile (online softmax): the same as
    fused attention over the decoded K/V, to float rounding."""
    monkeypatch.setattr(attention_ops, "DENSE_TILE_KEYS", 64)
    monkeypatch.setattr(attention_ops, "TILE_BYTES", 4096)  # tiles of 128 keys
    rng = np.random.default_rng(L)
    B, H, G, D, S = 1, 2, 4, 64, 1000
    kq, vq = (quantize_kv(normal(rng, (B, H, S + 24, D)), 8, 32) for _ in range(2))
    q = normal(rng, (B, H * G, L, D))
    got = dense_attention(q, kq, vq, offset=S - L, scale=0.125)
    want = dense_attention(q, kq.dequantize(mx.float32), vq.dequantize(mx.float32),
                           offset=S - L, scale=0.125)
    np.testing.assert_allclose(np.array(got), np.array(want), atol=2e-6)


def test_pooled_blocks_read_through_slots_are_the_contiguous_blocks():
    """A memory tier hands the op a pool of blocks in any order and the slots locating the
    selection: the result is bit-equal to the contiguous K/V's."""
    from msl import cases

    rng = np.random.default_rng(3)
    B, H, G, D, S, block, L = 1, 2, 4, 32, 300, 16, 5
    k, v = (quantize_kv(normal(rng, (B, H, S, D)), 4, 32) for _ in range(2))
    q = normal(rng, (B, H * G, L, D))
    sel = mx.array(cases.edgy_selection(rng, B, H, L, S - L, block, 4))
    pk, pv, slots = cases.pooled(k, v, sel, block, rng)
    got = sparse_attention(q, pk, pv, sel, offset=S - L, scale=0.2, block_size=block,
                           slots=slots)
    want = sparse_attention(q, k, v, sel, offset=S - L, scale=0.2, block_size=block)
    np.testing.assert_array_equal(np.array(got), np.array(want))


def test_group_size_follows_the_head_dim():
    assert group_size_for(8, 128) == 64 and group_size_for(4, 128) == 32
    assert group_size_for(8, 96) == 32 and group_size_for(8, 32) == 32
    with pytest.raises(ValueError, match="head_dim is 16, not a multiple of 32"):
        group_size_for(8, 16)


# ---------------------------------------------------------------------------------------------
# The cache


def fixture_model(tmp_path, seed=3, **overrides):
    """A parity fixture (test_model_parity.py's configurations) with head_dim 32, the smallest
    that compact K/V takes (groups of 32 values)."""
    path = write_demo_checkpoint(tmp_path, seed=seed, dtype=mx.float32, head_dim=32,
                                 rotary_dim=16, **overrides)
    return m3mlx.load(path, dtype=mx.float32)


@pytest.fixture(scope="module")
def all_msa(tmp_path_factory):
    return fixture_model(tmp_path_factory.mktemp("all-msa"), seed=3,
                         sparse_layers=[True] * 4, moe_layers=[True] * 4)


def run(model, ids, cache, prefill):
    """Logits of every position: a prefill chunk, then one token at a time."""
    out = [model(ids[:, :prefill], cache)]
    for i in range(prefill, ids.shape[1]):
        out.append(model(ids[:, i:i + 1], cache))
    return mx.concatenate(out, axis=1)


def test_compact_cache_holds_what_it_says(all_msa):
    model, _ = all_msa
    ids = mx.array(np.random.default_rng(0).integers(0, model.args.vocab_size, (1, 300)))
    sizes = {}
    for bits in (None, 8, 4):
        cache = m3mlx.make_cache(model, kv_bits=bits)
        model(ids, cache)
        c = cache[1]
        sizes[bits] = sum(c.state[n].nbytes for n in c.state if "index" not in n)
        if bits:
            assert c.keys.data.dtype == mx.uint32 and c.keys.bits == bits
            assert c.keys.scales.dtype == mx.float32  # float32 K/V keep float32 scales
    # 32 values per row: 8-bit codes + a float32 scale and bias = 40 bytes against 128.
    assert sizes[8] / sizes[None] == pytest.approx(40 / 128)
    assert sizes[4] / sizes[None] == pytest.approx(24 / 128)


def test_decode_working_memory_does_not_decode_the_cache(all_msa, monkeypatch):
    """A decode step over compact K/V (twin path) never decodes the whole cache: its working
    memory past the caches grows by per-block rows only, not by a float copy of K/V."""
    from m3mlx.metal_kernels import msa_ops

    model, _ = all_msa
    monkeypatch.setattr(msa_ops, "MAX_TILE_KEYS", 256)

    def step_peak(context):
        ids = mx.array(np.random.default_rng(4).integers(0, model.args.vocab_size,
                                                         (1, context)))
        cache = m3mlx.make_cache(model, kv_bits=8)
        model(ids, cache)
        mx.eval([c.arrays for c in cache])
        mx.eval(model(mx.array([[1]]), cache))
        mx.clear_cache()
        before = mx.get_active_memory()
        mx.reset_peak_memory()
        mx.eval(model(mx.array([[1]]), cache))
        return mx.get_peak_memory() - before

    per_token = (step_peak(2900) - step_peak(700)) / 2200
    decoded_row = 4 * model.args.num_key_value_heads * model.args.head_dim * 2 * 4  # 4 layers
    assert per_token < decoded_row / 4, per_token


FIXTURES = [  # test_model_parity.py's, at head_dim 32
    (0, {}),
    (1, dict(num_attention_heads=4, num_key_value_heads=1, index_n_heads=1)),
    (2, dict(index_block_size=8, index_topk_blocks=3, num_experts_per_tok=3)),
    (3, dict(sparse_layers=[True] * 4, moe_layers=[True] * 4)),
]
# Bounds on |logits - float cache's logits| over the sparse regime (every position past top-k x
# block) and on top-1 agreement (index keys in the activation dtype in both). Measured: 8-bit mean 0.009-0.021, p99 0.07-0.35, top-1
# 96.3-98.0%; 4-bit mean 0.11-0.21, top-1 59-85%; rounding the K/V to bfloat16 alone gives
# mean 0.001-0.011 and top-1 98.3-99.6%. These random models are chaotic (a discrete expert or
# block choice flips on a small change), so the maximum is a flip, not a drift: the bound is
# on the mean and the 99th percentile. README "Compact K/V and index keys" has the figures of
# the trained tiny M3, where routing is not random.
BOUNDS = {8: dict(mean=0.03, p99=0.5, top1=0.95), 4: dict(mean=0.3, p99=1.6, top1=0.55)}


@pytest.mark.parametrize("seed,overrides", FIXTURES)
def test_logits_stay_within_bounds_of_the_float_cache(tmp_path, seed, overrides):
    model, _ = fixture_model(tmp_path, seed, **overrides)
    a = model.args
    ids = mx.array(np.random.default_rng(seed).integers(0, a.vocab_size, (1, 320)))
    sparse = a.index_topk_blocks * a.index_block_size
    # Index keys as computed (16) in both, so that only the K/V storage differs.
    want = run(model, ids, m3mlx.make_cache(model, 16), 200)[0, sparse:]
    for bits, bound in BOUNDS.items():
        got = run(model, ids, m3mlx.make_cache(model, 16, kv_bits=bits), 200)[0, sparse:]
        diff = np.abs(np.array(got - want)).ravel()
        top1 = float((got.argmax(-1) == want.argmax(-1)).mean())
        assert diff.mean() <= bound["mean"], (bits, diff.mean())
        assert np.quantile(diff, 0.99) <= bound["p99"], (bits, np.quantile(diff, 0.99))
        assert top1 >= bound["top1"], (bits, top1)


def test_greedy_agreement_over_200_tokens(all_msa):
    """Teacher-forced top-1 agreement over 200 generated tokens (free-running generation of a
    random model diverges at its first near-tie; README gives both figures)."""
    model, _ = all_msa
    prompt = np.random.default_rng(13).integers(0, model.args.vocab_size, 300).tolist()
    greedy = list(generate_tokens(model, prompt, cache=m3mlx.make_cache(model, 16),
                                  max_tokens=200))
    ids = mx.array([prompt + greedy])
    want = run(model, ids, m3mlx.make_cache(model, 16), 300)[0, 299:-1].argmax(-1)
    agree = {}
    for bits in (8, 4):
        got = run(model, ids, m3mlx.make_cache(model, 16, kv_bits=bits), 300)[0, 299:-1]
        got = got.argmax(-1)
        agree[bits] = float((got == want).mean())
    assert np.array_equal(np.array(want), np.array(greedy))  # the float cache reproduces it
    assert agree[8] >= 0.94 and agree[4] >= 0.6, agree


def test_block_selection_is_unchanged_where_index_keys_are(all_msa, monkeypatch):
    """kv_bits changes K/V, never the index path: with the same input, a layer caches the same
    index keys and selects the same blocks (the first sparse layer sees the same hidden states
    whatever the K/V storage), at every prefill and decode step."""
    model, _ = all_msa
    seen = {}

    def recording(bits):
        def index_topk_spy(*args, **kwargs):
            out = index_topk(*args, **kwargs)
            seen.setdefault(bits, []).append(np.array(out))
            return out
        return index_topk_spy

    ids = mx.array(np.random.default_rng(5).integers(0, model.args.vocab_size, (1, 260)))
    caches = {}
    for bits in (None, 8, 4):
        monkeypatch.setattr(model_module, "index_topk", recording(bits))
        caches[bits] = m3mlx.make_cache(model, kv_bits=bits)
        run(model, ids, caches[bits], 200)
    layers = len(model.layers)
    for bits in (8, 4):
        # Calls go layer by layer; call i * layers is the first layer of step i.
        for i in range(0, len(seen[None]), layers):
            np.testing.assert_array_equal(seen[bits][i], seen[None][i])
        np.testing.assert_array_equal(np.array(caches[None][0].index_keys[:, :260]),
                                      np.array(caches[bits][0].index_keys[:, :260]))


def test_compact_prompt_caches_round_trip_as_stored(all_msa, tmp_path):
    model, tokenizer = all_msa
    prompt = "The quick brown fox jumps over the lazy dog. " * 8
    for bits in (8, 4):
        cache = m3mlx.make_cache(model, kv_bits=bits)
        m3mlx.generate(model, tokenizer, prompt, max_tokens=4, prompt_cache=cache)
        file = tmp_path / f"kv{bits}.safetensors"
        m3mlx.save_prompt_cache(str(file), cache, model=model)
        loaded = m3mlx.load_prompt_cache(str(file), model=model)
        for a, b in zip(cache, loaded):
            assert (b.kv_bits, b.kv_group_size) == (bits, 32)
            for name in a.state:  # the codes, scales and biases as saved: never re-quantized
                np.testing.assert_array_equal(np.array(a.state[name]), np.array(b.state[name]))
        follow = " And then"
        assert (m3mlx.generate(model, tokenizer, follow, max_tokens=8, prompt_cache=cache)
                == m3mlx.generate(model, tokenizer, follow, max_tokens=8, prompt_cache=loaded))


def tampered(saved, tmp_path, edit):
    arrays, meta = mx.load(str(saved), return_metadata=True)
    layers = json.loads(meta["m3mlx_cache"])
    edit(arrays, layers)
    meta["m3mlx_cache"] = json.dumps(layers)
    out = tmp_path / "bad.safetensors"
    mx.save_safetensors(str(out), arrays, metadata=meta)
    return out


@pytest.mark.parametrize("edit,message", [
    (lambda a, l: a.update({"1.keys": a["1.keys"].astype(mx.float32)}), "compact keys are"),
    (lambda a, l: a.update({"0.value_scales": a["0.value_scales"][..., :1, :]}),
     "values' scales"),
    (lambda a, l: a.update({"2.key_biases": a["2.key_biases"].astype(mx.float16)}),
     "keys' scales are mlx.core.float32 and biases mlx.core.float16"),
    (lambda a, l: a.pop("3.value_biases"), "layer 3 lacks \\['value_biases'\\]"),
    (lambda a, l: l[1].update(kv_bits=3), "kv_bits=3"),
    (lambda a, l: l[1].update(kv_group_size=48), "kv_group_size=48"),
])
def test_damaged_compact_caches_are_refused(all_msa, tmp_path, edit, message):
    model, _ = all_msa
    cache = m3mlx.make_cache(model, kv_bits=8)
    model(mx.array([list(range(1, 41))]), cache)
    good = tmp_path / "good.safetensors"
    m3mlx.save_prompt_cache(str(good), cache)
    with pytest.raises(m3mlx.InputError, match=message):
        m3mlx.load_prompt_cache(str(tampered(good, tmp_path, edit)))


def test_kv_bits_the_model_cannot_use_are_refused(demo_model):
    model, _ = demo_model  # head_dim 16: no group size fits
    with pytest.raises(m3mlx.InputError, match="head_dim is 16, not a multiple of 32"):
        m3mlx.make_cache(model, kv_bits=8)
    with pytest.raises(m3mlx.InputError, match="8 or 4 bits"):
        m3mlx.make_cache(model, kv_bits=6)
    with pytest.raises(m3mlx.InputError, match="kv_bits=2"):
        LayerCache(kv_bits=2)


def test_load_with_kv_bits_sets_the_models_caches(tmp_path, demo_dir):
    path = write_demo_checkpoint(tmp_path, seed=1, dtype=mx.float32, head_dim=32, rotary_dim=16)
    model, tokenizer = m3mlx.load(path, dtype=mx.float32, kv_bits=4)
    assert [c.kv_bits for c in m3mlx.make_cache(model)] == [4] * len(model.layers)
    assert m3mlx.make_cache(model, kv_bits=16)[0].kv_bits is None  # asked for: float
    assert m3mlx.generate(model, tokenizer, "Hello " * 30, max_tokens=3) is not None
    with pytest.raises(m3mlx.InputError, match="head_dim is 16"):
        m3mlx.load(demo_dir, kv_bits=8)  # refused before any weight is read
