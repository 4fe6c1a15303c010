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
    full = model(ids)  # index keys as computed: the cache keeps them so (16) to match
    got = run_in_chunks(model, ids, chunks, m3mlx.make_cache(model, index_bits=16))
    np.testing.assert_allclose(np.array(got), np.array(full), atol=1e-4)


def test_8bit_index_keys_select_like_the_full_keys_and_run(sparse_model):
    model, _ = sparse_model
    ids = mx.array(np.random.default_rng(1).integers(0, model.args.vocab_size, (1, 300)))
    cache8, cache32 = m3mlx.make_cache(model, index_bits=8), m3mlx.make_cache(model, 16)
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
    for index_bits in (16, 8):
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


# ----------------------------------------------------------------------------------------------
# Hostile and careless prompt cache files: checked completely before use


def test_trim_refuses_negative_counts(sparse_model):
    model, _ = sparse_model
    cache = m3mlx.make_cache(model)
    model(mx.array([[1, 2, 3, 4]]), cache=cache)
    for bad in (-50, 2.5, True):
        with pytest.raises(m3mlx.InputError, match=f"cannot trim {bad!r} positions"):
            m3mlx.trim_prompt_cache(cache, bad)
        with pytest.raises(m3mlx.InputError, match="count >= 0"):
            cache[0].trim(bad)
    assert [c.offset for c in cache] == [4] * len(cache)  # never grown past its data
    assert m3mlx.trim_prompt_cache(cache, 50) == 4 and cache[0].offset == 0


@pytest.fixture(scope="module")
def saved_cache(sparse_model, tmp_path_factory):
    model, _ = sparse_model
    cache = m3mlx.make_cache(model, index_bits=8)
    model(mx.array([list(range(1, 41))]), cache=cache)
    file = tmp_path_factory.mktemp("cache") / "good.safetensors"
    m3mlx.save_prompt_cache(str(file), cache, {"note": "x"}, model=model)
    return file


def tampered(saved, tmp_path, edit):
    """A copy of the saved cache after `edit(arrays, layers, meta)`."""
    import json

    arrays, meta = mx.load(str(saved), return_metadata=True)
    layers = json.loads(meta["m3mlx_cache"])
    edit(arrays, layers, meta)
    meta["m3mlx_cache"] = json.dumps(layers)
    out = tmp_path / "bad.safetensors"
    mx.save_safetensors(str(out), arrays, metadata=meta)
    return out


def _set(mapping, key, value):
    mapping[key] = value


@pytest.mark.parametrize("edit,message", [
    (lambda a, l, m: _set(l[2], "offset", 39), "different numbers of positions|do not hold 39"),
    (lambda a, l, m: _set(l[0], "offset", -5), "offset -5 is not a count"),
    (lambda a, l, m: _set(l[1], "offset", "many"), "offset 'many' is not a count"),
    (lambda a, l, m: _set(a, "1.keys", a["1.keys"].astype(mx.int32)), "keys are mlx.core.int32"),
    (lambda a, l, m: _set(a, "1.index_scales", a["1.index_scales"].astype(mx.float16)),
     "index scales are mlx.core.float16"),
    (lambda a, l, m: _set(a, "1.index_keys", a["1.index_keys"].astype(mx.float32)),
     "index keys are mlx.core.float32"),
    (lambda a, l, m: _set(a, "0.values", a["0.values"][:, :, :7]), "do not hold 40 positions"),
    (lambda a, l, m: a.pop("2.values"), "layer 2 lacks \\['values'\\]"),
    (lambda a, l, m: _set(a, "7.keys", a["0.keys"]), "tensors no layer record names"),
    (lambda a, l, m: _set(l[0], "extra", 1), "layer 0 has the record keys"),
    (lambda a, l, m: _set(l[1], "index_bits", 4), "index_bits=4"),
    (lambda a, l, m: l.clear() or l.append([1]), "not a list of objects"),
    (lambda a, l, m: _set(m, "user", "[1, 2]"), "user metadata is not a JSON object"),
    (lambda a, l, m: _set(m, "user", "[" * 100_000 + "]" * 100_000),
     "the JSON nests too deeply to be read"),
])
def test_damaged_cache_files_are_refused(saved_cache, tmp_path, edit, message):
    bad = tampered(saved_cache, tmp_path, edit)
    with pytest.raises(m3mlx.InputError, match=message):
        m3mlx.load_prompt_cache(str(bad))


def test_cache_files_for_another_model_are_refused(sparse_model, saved_cache, tmp_path):
    model, _ = sparse_model
    cache, meta = m3mlx.load_prompt_cache(str(saved_cache), return_metadata=True, model=model)
    assert meta == {"note": "x"} and cache[0].offset == 40
    # an extra layer, consistent in itself
    def add_layer(a, l, m):
        l.append(dict(l[-1]))
        for name in ("keys", "values", "index_keys", "index_scales"):
            a[f"{len(l) - 1}.{name}"] = a[f"{len(l) - 2}.{name}"]
    extra = tampered(saved_cache, tmp_path, add_layer)
    m3mlx.load_prompt_cache(str(extra))  # a valid file in itself...
    with pytest.raises(m3mlx.InputError, match="made for another model \\(5 layers, this model "
                                               "has 4\\)"):
        m3mlx.load_prompt_cache(str(extra), model=model)  # ...but not this model's
    # same shapes, other weights: the signature recorded at save time tells them apart
    other_dir = write_demo_checkpoint(tmp_path / "other", seed=8, dtype=mx.float32,
                                      sparse_layers=[True] * 4,
                                      moe_layers=[False, True, True, True])
    other, _ = m3mlx.load(other_dir, dtype=mx.float32)
    with pytest.raises(m3mlx.InputError, match="saved from another model"):
        m3mlx.load_prompt_cache(str(saved_cache), model=other)
    # a dense layer where the model has MSA
    dense = tampered(saved_cache, tmp_path, lambda a, l, m: (
        l[1].update(index=False, index_bits=None), a.pop("1.index_keys"),
        a.pop("1.index_scales"), m.pop("model")))
    with pytest.raises(m3mlx.InputError, match="layer 1 is dense in the cache"):
        m3mlx.load_prompt_cache(str(dense), model=model)


def test_files_that_are_not_caches(tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\xff" * 64)
    with pytest.raises(m3mlx.InputError, match="is not a safetensors file"):
        m3mlx.load_prompt_cache(str(garbage))
    no_suffix = tmp_path / "cache"
    mx.save_safetensors(str(tmp_path / "cache.safetensors"), {"a": mx.zeros(2)})
    (tmp_path / "cache.safetensors").rename(no_suffix)
    with pytest.raises(m3mlx.InputError, match="not an m3mlx prompt cache"):
        m3mlx.load_prompt_cache(str(no_suffix))
