"""The K/V memory tier (kv_memory=...): bounded resident K/V, the rest in a session file, and
outputs identical to the untiered cache; residency policies; errors about the cache directory.

All on the MLX-ops twins (M3MLX_KERNELS=ops); test_msl_model.py runs a tiered cache on the Metal
kernels (pooled K/V through slots).
"""

import errno
import gc
import os
from collections import namedtuple

import mlx.core as mx
import numpy as np
import pytest

import m3mlx
from m3mlx import kv_tier
from m3mlx.demo import write_demo_checkpoint
from m3mlx.generate import generate_tokens
from m3mlx.kv_tier import POLICIES, KVCacheError, Residency, simulate, tiers_of
from m3mlx.metal_kernels import dispatch


Usage = namedtuple("Usage", "total used free")


@pytest.fixture(autouse=True)
def twin_path(monkeypatch, tmp_path):
    monkeypatch.setenv(dispatch.ENV_VAR, "ops")
    monkeypatch.setenv("M3MLX_HOME", str(tmp_path / "home"))


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A tiny all-MSA model (block 16, top-4) whose K/V compact takes (head_dim 32)."""
    path = write_demo_checkpoint(tmp_path_factory.mktemp("small"), seed=3, dtype=mx.float32,
                                 head_dim=32, rotary_dim=16, sparse_layers=[True] * 4,
                                 moe_layers=[True] * 4)
    return m3mlx.load(path, dtype=mx.float32)


def run(model, ids, cache, chunks):
    """Logits of every position: prefill chunks, then one token at a time."""
    out, pos = [], 0
    for n in chunks:
        out.append(model(ids[:, pos:pos + n], cache))
        pos += n
    while pos < ids.shape[1]:
        out.append(model(ids[:, pos:pos + 1], cache))
        pos += 1
    return mx.concatenate(out, axis=1)


def kv_bytes(model, positions, kv_bits=None):
    """Bytes of the sparse layers' K/V at `positions` tokens (float32 K/V, or compact)."""
    cache = m3mlx.make_cache(model, kv_bits=kv_bits)
    model(mx.zeros((1, positions), mx.int32), cache)
    return sum(c.nbytes - sum(a.nbytes for a in c._index_state().values())
               for c in cache if c.index)


@pytest.mark.parametrize("kv_bits", [None, 8])
@pytest.mark.parametrize("chunks", [(80,) * 7, (37, 64, 80, 80, 75, 80, 80, 80)])
def test_tiered_logits_are_bit_equal(small, tmp_path, kv_bits, chunks):
    """A pool of a quarter of the context's blocks (they go to the file and come back, prefill
    chunks run in groups of queries whose blocks fit): every logit equal to the untiered
    cache's, prefill and decode."""
    model, _ = small
    ids = mx.array(np.random.default_rng(0).integers(0, model.args.vocab_size, (1, 640)))
    want = run(model, ids, m3mlx.make_cache(model, kv_bits=kv_bits), chunks)
    limit = kv_bytes(model, 640, kv_bits) // 4
    cache = m3mlx.make_cache(model, kv_bits=kv_bits, kv_memory=limit, kv_cache_dir=tmp_path)
    got = run(model, ids, cache, chunks)
    np.testing.assert_array_equal(np.array(got), np.array(want))
    tier = tiers_of(cache)[0]
    assert tier.stats.misses > 50 and tier.stats.written > 50  # the file was really used
    assert tier.stats.peak_resident <= limit


def test_trim_and_continue_with_a_tier(small, tmp_path):
    """Trimming back into an evicted region (a block cut in the middle, read back) and going on
    gives what the untiered cache gives."""
    model, _ = small
    ids = mx.array(np.random.default_rng(1).integers(0, model.args.vocab_size, (1, 560)))
    plain = m3mlx.make_cache(model, kv_bits=8)
    tiered = m3mlx.make_cache(model, kv_bits=8, kv_memory=40_000, kv_cache_dir=tmp_path)
    for cache in (plain, tiered):
        run(model, ids[:, :500], cache, (300, 200))
        m3mlx.trim_prompt_cache(cache, 500 - 203)  # 203: block 12 cut in the middle
    want = run(model, ids[:, 203:], plain, (320,))
    got = run(model, ids[:, 203:], tiered, (320,))
    np.testing.assert_array_equal(np.array(got), np.array(want))


def test_the_session_file_is_aligned_and_goes_away(small, tmp_path):
    model, _ = small
    cache = m3mlx.make_cache(model, kv_bits=4, kv_memory=30_000, kv_cache_dir=tmp_path)
    run(model, mx.array([list(range(1, 500))]), cache, (300,))
    tier = tiers_of(cache)[0]
    files = list(tmp_path.glob("*.kv"))
    assert len(files) == 1 and files[0].stat().st_size == tier.file_nbytes > 0
    assert tier.file_nbytes % kv_tier.RECORD_ALIGN == 0
    assert tier.stats.bytes_written == tier.file_nbytes  # every record written once
    del cache, tier
    gc.collect()
    assert not list(tmp_path.glob("*.kv"))


# ---------------------------------------------------------------------------------------------
# 32K tokens: identical greedy output at 10% of the K/V, bounded memory, save and reload


@pytest.fixture(scope="module")
def long_model(tmp_path_factory):
    """Two MSA layers, one KV head of 4 query heads, block 16, top-4: 2048 blocks at 32K."""
    path = write_demo_checkpoint(tmp_path_factory.mktemp("long"), seed=5, dtype=mx.float32,
                                 num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=1, index_n_heads=1, head_dim=32,
                                 rotary_dim=16, sparse_layers=[True, True],
                                 moe_layers=[True, True], max_position_embeddings=65536)
    return m3mlx.load(path, dtype=mx.float32)


def test_32k_prompt_at_a_tenth_of_the_kv(long_model, tmp_path):
    """A 32K-token prompt, 8-bit K/V with kv_memory at 10% of the context's K/V: the greedy
    output is the untiered cache's, the K/V MLX holds stays within the limit plus one step's
    selected blocks, and a saved prompt cache reloads into a tier and continues identically."""
    model, _ = long_model
    a = model.args
    n = 32768
    prompt = np.random.default_rng(0).integers(0, a.vocab_size, n).tolist()
    plain = m3mlx.make_cache(model, kv_bits=8)
    want = list(generate_tokens(model, prompt, cache=plain, max_tokens=12))
    limit = kv_bytes(model, n + 12, 8) // 10

    gc.collect()
    mx.clear_cache()
    base = mx.get_active_memory()
    tiered = m3mlx.make_cache(model, kv_bits=8, kv_memory=limit, kv_cache_dir=tmp_path / "kv")
    got = list(generate_tokens(model, prompt, cache=tiered, max_tokens=12))
    assert got == want

    tier = tiers_of(tiered)[0]
    block_bytes = tier.block_bytes  # one block of one KV head, K and V
    step = len(tiered) * a.num_key_value_heads * a.index_topk_blocks * block_bytes
    assert tier.stats.peak_resident <= limit + step
    assert tier.resident_nbytes <= limit + step
    gc.collect()
    mx.clear_cache()
    held = mx.get_active_memory() - base  # measured: what MLX holds for the tiered cache
    index = sum(arr.nbytes for c in tiered for arr in (c.index_keys, c.index_scales)
                if arr is not None)
    assert held - index <= limit + step + (1 << 20), (held, index, limit, step)
    assert tier.file_nbytes > 5 * limit  # the rest of the context is in the file

    # Save (compact K/V as stored, read back from the tier), reload into another tier, go on.
    file = tmp_path / "long.safetensors"
    m3mlx.save_prompt_cache(str(file), tiered, model=model)
    other = kv_tier.KVTier.for_model(a, limit, kv_bits=8, dtype=mx.float32,
                                     directory=tmp_path / "kv2")
    loaded = m3mlx.load_prompt_cache(str(file), model=model, tier=other)
    assert other.resident_nbytes <= limit + step and other.file_nbytes > 5 * limit
    follow = [want[-1]]
    cont_want = list(generate_tokens(model, follow, cache=plain, max_tokens=6))
    cont_got = list(generate_tokens(model, follow, cache=loaded, max_tokens=6))
    assert cont_got == cont_want


# ---------------------------------------------------------------------------------------------
# Residency policies


def test_policies_keep_sinks_and_recent_blocks_and_evict_in_their_order():
    res = Residency(1, 4, POLICIES["sinks-recent-lru"])
    res.cover(10)
    for b in range(4):  # blocks 0..3 in slots 0..3, used at clocks 1..4
        res.begin()
        res.place(0, np.array([b]), b, -1)
    res.begin()
    res.use(0, res.slot[0, [2]])  # block 2 used again: block 1 is now the least recent
    res.begin()
    slots, evicted = res.place(0, np.array([4]), 4, -1)
    assert evicted.tolist() == [1]  # block 0 is a sink, 3 and 4 recent
    res.begin()
    _, evicted = res.place(0, np.array([5]), 5, -1)
    assert evicted.tolist() == [3]  # out of the recent window (4, 5) now, used before 2
    lfu = Residency(1, 3, POLICIES["lfu"])
    lfu.cover(10)
    for b in range(3):
        lfu.begin()
        lfu.place(0, np.array([b]), b, -1)
    for _ in range(2):
        lfu.begin()
        lfu.use(0, lfu.slot[0, [0, 2]])
    lfu.begin()
    assert lfu.place(0, np.array([7]), 7, -1)[1].tolist() == [1]  # used least often
    window = Residency(1, 3, POLICIES["window"])
    window.cover(10)
    window.begin()
    window.place(0, np.array([0, 5, 6]), 6, -1)
    window.begin()
    assert window.place(0, np.array([7]), 7, -1)[1].tolist() == [5]  # oldest non-sink


def test_pinned_and_partial_blocks_are_never_evicted():
    res = Residency(1, 2, POLICIES["lru"])
    res.cover(5)
    res.begin()
    res.place(0, np.array([0, 1]), 1, 1)  # block 1 is the partial newest
    assert res.place(0, np.array([2]), 1, 1) is None  # both pinned in this call
    res.begin()
    assert res.place(0, np.array([2]), 1, 1)[1].tolist() == [0]
    res.begin()
    assert res.place(0, np.array([3, 4]), 1, 1) is None  # only one slot is movable


def test_simulate_misses_exactly_as_the_live_tier(small, tmp_path, monkeypatch):
    """Decoding from an empty cache, one layer's selections replayed through `simulate` (the
    benchmark's policy comparison) miss exactly the blocks the live tier read."""
    model, _ = small
    trace, live = [], []
    real = kv_tier.TieredKV.sparse_attention

    def recording(self, q, selection, offset, scale, block_size):
        if self is not cache[2].tiered:
            return real(self, q, selection, offset, scale, block_size)
        before = self.tier.stats.misses
        out = real(self, q, selection, offset, scale, block_size)
        trace.append((offset, np.array(selection)[0]))
        live.append(self.tier.stats.misses - before)
        return out

    monkeypatch.setattr(kv_tier.TieredKV, "sparse_attention", recording)
    cache = m3mlx.make_cache(model, kv_bits=8, kv_memory=25_000, kv_cache_dir=tmp_path)
    ids = np.random.default_rng(2).integers(0, model.args.vocab_size, 360).tolist()
    for t in ids:
        model(mx.array([[t]]), cache)
    layer = cache[2].tiered
    dense = [(p, np.full((layer.lanes, 0), -1)) for p in range(trace[0][0])]  # no selection
    sim = simulate(dense + trace, lanes=layer.lanes, capacity=layer.capacity,
                   block_size=model.args.index_block_size, policy=layer.tier.policy)
    assert sim["misses"] == sum(live) > 0


# ---------------------------------------------------------------------------------------------
# Errors: a directory that cannot take the blocks, a context that does not fit, bad options


def test_an_unwritable_cache_directory_fails_at_once(small, tmp_path):
    model, _ = small
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(KVCacheError, match=f"cannot write K/V blocks in {blocker} .*: choose a "
                                           "writable directory \\(--kv-cache-dir\\)"):
        m3mlx.make_cache(model, kv_memory="1MB", kv_cache_dir=blocker)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("this user may write anywhere (root): no unwritable directory here")
        with pytest.raises(KVCacheError, match="cannot write K/V blocks in .*locked"):
            m3mlx.make_cache(model, kv_bits=8, kv_memory="1MB", kv_cache_dir=locked)
    finally:
        locked.chmod(0o700)


def test_a_context_the_disk_cannot_take_is_refused_before_any_work(small, tmp_path,
                                                                     monkeypatch):
    model, tokenizer = small
    cache = m3mlx.make_cache(model, kv_bits=8, kv_memory=20_000, kv_cache_dir=tmp_path)
    monkeypatch.setattr(kv_tier.shutil, "disk_usage", lambda p: Usage(1 << 40, 1 << 40, 1000))
    with pytest.raises(KVCacheError, match=r"has 0\.0 MB free; a context of [\d,]+ tokens "
                                           r"needs about .* more there"):
        m3mlx.generate(model, tokenizer, "hello " * 200, max_tokens=4000, prompt_cache=cache)
    assert cache[0].offset == 0


def test_a_full_disk_mid_session_is_one_clear_error(small, tmp_path, monkeypatch):
    model, _ = small
    cache = m3mlx.make_cache(model, kv_bits=8, kv_memory=20_000, kv_cache_dir=tmp_path)

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(kv_tier.os, "pwrite", full)
    ids = mx.array([list(range(1, 400))])
    model(ids[:, :80], cache)
    with pytest.raises(KVCacheError, match=f"the K/V cache directory {tmp_path} is full after "
                                           ".*: free some space, choose another --kv-cache-dir"):
        for i in range(80, 400):  # evicted blocks cannot be written: the next eviction says so
            model(ids[:, i:i + 1], cache)


def test_bad_tier_options(small, tmp_path):
    model, _ = small
    with pytest.raises(m3mlx.InputError, match="kv_memory is 'lots', not a size"):
        m3mlx.make_cache(model, kv_memory="lots", kv_cache_dir=tmp_path)
    with pytest.raises(m3mlx.InputError, match="kv_policy='mru': choose one of"):
        m3mlx.make_cache(model, kv_memory="1MB", kv_policy="mru", kv_cache_dir=tmp_path)
    from dataclasses import replace

    no_msa = replace(model.args, sparse_layers=[False] * 4)  # nothing to tier
    with pytest.raises(m3mlx.InputError, match="this model has none"):
        kv_tier.KVTier.for_model(no_msa, "1MB", directory=tmp_path)
