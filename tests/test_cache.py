"""Caches: chunked prefill then decode equals one full forward; trim; save/load; memory."""

import mlx.core as mx
import numpy as np
import pytest

import m3mlx
from m3mlx.demo import write_demo_checkpoint
from m3mlx.metal_kernels import dispatch, msa_ops


@pytest.fixture(scope="module")
def sparse_model(tmp_path_factory):
    path = write_demo_checkpoint(tmp_path_factory.mktemp("sparse"), seed=7, dtype=mx.float32,
                                 sparse_layers=[True] * 4, moe_layers=[False, True, True, True])
    return m3mlx.load(path, dtype=mx.float32)


def run_in_chunks(model, ids, chunks, cache):
    outs, pos = [], 0
    for n in chunks:
        outs.append(model(ids[:, pos : pos + n], cache=cache))
        pos += n
    while pos < ids.shape[1]:
        outs.append(model(ids[:, pos : pos + 1], cache=cache))
        pos += 1
    return mx.concatenate(outs, axis=1)


@pytest.mark.parametrize("chunks", [(300,), (17, 64, 100), (1, 128, 129), (10, 20, 30, 40)])
def test_chunked_prefill_and_decode_equal_full_forward(sparse_model, chunks):
    model, _ = sparse_model
    ids = mx.array(np.random.default_rng(0).integers(0, model.args.vocab_size, (1, 320)))
    full = model(ids)
    got = run_in_chunks(model, ids, chunks, m3mlx.make_cache(model))
    np.testing.assert_allclose(np.array(got), np.array(full), atol=1e-4)


def test_8bit_index_keys_select_like_the_full_keys_and_run(sparse_model):
    model, _ = sparse_model
    ids = mx.array(np.random.default_rng(1).integers(0, model.args.vocab_size, (1, 300)))
    cache8, cache32 = m3mlx.make_cache(model, index_bits=8), m3mlx.make_cache(model)
    out8 = run_in_chunks(model, ids, (200,), cache8)
    run_in_chunks(model, ids, (200,), cache32)
    assert cache8[1].index_keys.dtype == mx.int8
    index_bytes = [c[1].state["index_keys"].nbytes + c[1].state.get("index_scales", mx.zeros(0)).nbytes
                   for c in (cache8, cache32)]
    assert index_bytes[0] * 3 < index_bytes[1]  # 1 byte + a scale per key vs 4 bytes per value
    # A random tiny model flips block choices on small perturbations; the quantized scan
    # still yields finite logits that mostly agree with the full-precision ones.
    full = np.array(model(ids))
    agree = (np.array(out8).argmax(-1) == full.argmax(-1)).mean()
    assert np.isfinite(np.array(out8)).all() and agree > 0.8


def test_trim_then_redo_gives_the_same_logits(sparse_model):
    model, _ = sparse_model
    ids = mx.array(np.random.default_rng(2).integers(0, model.args.vocab_size, (1, 200)))
    cache = m3mlx.make_cache(model)
    model(ids[:, :180], cache=cache)
    first = model(ids[:, 180:], cache=cache)
    assert m3mlx.trim_prompt_cache(cache, 20) == 20 and cache[0].offset == 180
    again = model(ids[:, 180:], cache=cache)
    np.testing.assert_array_equal(np.array(first), np.array(again))


def test_prompt_cache_round_trips_exactly(sparse_model, tmp_path):
    model, tokenizer = sparse_model
    for index_bits in (None, 8):
        cache = m3mlx.make_cache(model, index_bits)
        prompt = "The quick brown fox jumps over the lazy dog. " * 8
        text = m3mlx.generate(model, tokenizer, prompt, max_tokens=6, prompt_cache=cache)
        file = tmp_path / f"cache{index_bits}.safetensors"
        m3mlx.save_prompt_cache(str(file), cache, {"prompt": prompt})
        loaded, meta = m3mlx.load_prompt_cache(str(file), return_metadata=True)
        assert meta == {"prompt": prompt}
        for a, b in zip(cache, loaded):
            assert a.offset == b.offset and a.state.keys() == b.state.keys()
            for name in a.state:
                np.testing.assert_array_equal(np.array(a.state[name]), np.array(b.state[name]))
        follow = " And then"
        cont_a = m3mlx.generate(model, tokenizer, follow, max_tokens=8, prompt_cache=cache)
        cont_b = m3mlx.generate(model, tokenizer, follow, max_tokens=8, prompt_cache=loaded)
        assert cont_a == cont_b and text is not None


def test_loading_a_file_that_is_not_a_prompt_cache_fails_clearly(tmp_path):
    file = tmp_path / "x.safetensors"
    mx.save_safetensors(str(file), {"a": mx.zeros(3)})
    with pytest.raises(ValueError, match="not an m3mlx prompt cache"):
        m3mlx.load_prompt_cache(str(file))


def decode_working_memory(model, context):
    ids = mx.array(np.random.default_rng(3).integers(0, model.args.vocab_size, (1, context)))
    cache = m3mlx.make_cache(model)
    model(ids, cache=cache)
    mx.eval([c.state for c in cache])
    step = mx.array([[1]])
    mx.eval(model(step, cache=cache))  # warm-up step: the next one appends in place
    mx.clear_cache()
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    mx.eval(model(step, cache=cache))
    return mx.get_peak_memory() - before


def test_decode_working_memory_grows_only_by_block_score_rows(sparse_model, monkeypatch):
    """Past the caches, a decode step of the MLX-ops twins (on every machine) holds only
    per-block rows (scores, masks, ranks): it never builds a per-token score row, a dense mask
    or a copy of the K/V cache."""
    monkeypatch.setenv(dispatch.ENV_VAR, "ops")
    model, _ = sparse_model
    args = model.args
    monkeypatch.setattr(msa_ops, "MAX_TILE_KEYS", 256)  # scan in small tiles at these lengths
    short, long = decode_working_memory(model, 700), decode_working_memory(model, 2900)
    per_token = (long - short) / 2200
    block_rows = 8 * args.index_n_heads * 4 / args.index_block_size * len(model.layers)
    token_score_row = args.num_attention_heads * 4 * len(model.layers)
    assert per_token <= block_rows < token_score_row / 2, (short, long)
