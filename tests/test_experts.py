"""Routed experts streamed from disk through an expert cache (m3mlx/experts.py): outputs equal to
the resident model's, the slot pool's rules, the reads, the statistics and the errors.

The MoE op runs as on this machine: the MLX-ops twin (gather_qmm / gather_mm over the pool,
rows looked up through the slot table) on Linux, the Metal kernels on a Mac."""


import mlx.core as mx
import numpy as np
import pytest

import m3mlx
from m3mlx.chat import ChatSession
from m3mlx.checkpoint import Checkpoint
from m3mlx.checks import InputError
from m3mlx.convert import convert
from m3mlx.demo import write_demo_checkpoint
from m3mlx.errors import CheckpointError
from m3mlx.experts import (LFU, LRU, USAGE_FILE, ExpertCache, LayerSlots, read_usage,
                           routed_experts, write_usage)
from m3mlx.loading import LoadError
from m3mlx.metal_kernels import ExpertWeights, moe_experts
from m3mlx.plan import BudgetError, check_fits, footprint, plan_budget

PROMPT = "def add(a, b):\n    return a + b\n\nThe quick brown fox jumps over the lazy dog. " * 3


def _converted(root, name, roles=None, **overrides):
    src = write_demo_checkpoint(root / f"{name}-hf", dtype=mx.float32, **overrides)
    out = root / name
    convert(src, out, roles=roles, progress=False, log=lambda s: None)
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two converted models: the demo (8 experts, top 2, 4-bit affine experts) and a wider one
    (16 experts, top 4, bf16 experts loaded as float32: the pool casts what it reads)."""
    root = tmp_path_factory.mktemp("experts")
    return {"demo": _converted(root, "demo"),
            "wide": _converted(root, "wide", roles={"experts": "bf16"}, num_local_experts=16,
                               num_experts_per_tok=4)}


@pytest.fixture(scope="module")
def resident(models):
    return {k: m3mlx.load(p, dtype=mx.float32) for k, p in models.items()}


def _greedy(model, tokenizer, prompt=PROMPT, **options):
    return [r.token for r in m3mlx.stream_generate(model, tokenizer, prompt, max_tokens=16,
                                                   temperature=0.0, **options)]


@pytest.mark.parametrize("name", ["demo", "wide"])
@pytest.mark.parametrize("share", ["10%", "25%", "50%"])
def test_greedy_matches_the_resident_model(models, resident, name, share):
    """Same tokens, one prefill chunk or chunks of 7 tokens, with and without reads ahead."""
    model, tokenizer = resident[name]
    expected = _greedy(model, tokenizer)
    for prefetch in (True, False):
        streamed, _ = m3mlx.load(models[name], dtype=mx.float32, expert_cache=share,
                                 expert_prefetch=prefetch)
        tier = streamed.expert_tier
        E = tier.layers[0].experts
        assert tier.slots == max(1, int(np.ceil(float(share[:-1]) / 100 * E)))
        for step in (2048, 7):
            assert _greedy(streamed, tokenizer, prefill_step_size=step) == expected
        assert tier.stats.hit_rate < 1.0 and tier.stats.bytes_read > 0  # it did stream


@pytest.mark.parametrize("name", ["demo", "wide"])
def test_logits_bit_equal_over_a_prompt(models, resident, name):
    """A whole prompt in one forward pass (many experts per layer: the layer runs in passes at
    10%), compared bit for bit."""
    model, tokenizer = resident[name]
    ids = mx.array(tokenizer.encode(PROMPT))[None]
    expected = model(ids)
    for share in ("10%", "50%"):
        streamed, _ = m3mlx.load(models[name], dtype=mx.float32, expert_cache=share)
        assert mx.array_equal(streamed(ids), expected).item()


def test_multi_turn_chat_matches_the_resident_model(models, resident):
    model, tokenizer = resident["wide"]
    streamed, _ = m3mlx.load(models["wide"], dtype=mx.float32, expert_cache="25%")
    options = dict(thinking="disabled", temperature=0.0, max_tokens=10)
    a, b = ChatSession(model, tokenizer, **options), ChatSession(streamed, tokenizer, **options)
    for message in ["Hello there", "What is MLX?", "Thanks!"]:
        ra, rb = _reply(a, message), _reply(b, message)
        assert rb.tokens == ra.tokens and rb.cached_tokens == ra.cached_tokens
        assert rb.expert_stats is not None and rb.expert_stats.tokens > 0
    assert ra.expert_stats is None


def _reply(session, message):
    stream = session.send(message)
    for _ in stream:
        pass
    return stream.reply


def test_generation_reports_the_cache(models, resident):
    _, tokenizer = resident["demo"]
    streamed, _ = m3mlx.load(models["demo"], dtype=mx.float32, expert_cache="50%")
    responses = list(m3mlx.stream_generate(streamed, tokenizer, PROMPT, max_tokens=8))
    s = responses[-1].expert_stats
    generated = responses[-1].generation_tokens
    # Decode only: the first generated token comes with the prefill.
    assert s.tokens == generated - 1
    layers = len(streamed.expert_tier.layers)
    assert s.requests >= s.tokens * layers and 0 <= s.hits <= s.requests
    assert s.syncs == s.tokens * layers  # one per streamed layer and token
    # Misses and reads ahead, each one expert's rows.
    assert s.bytes_read == (s.requests - s.hits + s.prefetched) * routed_experts(
        Checkpoint.open(models["demo"]))[0].expert_bytes
    assert 0 <= s.prefetch_used <= s.prefetched
    from m3mlx.generate import format_stats

    assert "hits" in format_stats(responses[-1]) and "syncs/token" in format_stats(responses[-1])


# ----------------------------------------------------------------------------------------------
# The slot pool


@pytest.fixture(scope="module")
def layout(models):
    return routed_experts(Checkpoint.open(models["wide"]))[0]


def test_reads_are_the_checkpoint_rows(models, layout):
    """Each slot holds exactly the bytes of its expert's row of every stacked tensor."""
    layer = LayerSlots(0, layout, 3, None, "lru")
    experts, slots = np.array([11, 0, 5]), np.array([0, 1, 2])
    layer.assign(experts, slots)
    ranges, buffers, later = layer.ranges(experts, slots)
    from m3mlx.checkpoint import read_into

    read_into(ranges, buffers).wait()
    layer.convert(later)
    for param, t in layout.tensors.items():
        stacked = mx.load(str(t.file))[t.name]
        for e, s in zip(experts, slots):
            assert mx.array_equal(layer.pools[param][int(s)], stacked[int(e)]).item(), param


def test_eviction_follows_the_policy_and_spares_pins_and_the_current_step(layout):
    layer = LayerSlots(0, layout, 4, None, "lru")
    layer.assign(np.array([1, 2, 3, 4]), np.arange(4))
    for clock, e in enumerate([3, 1, 4, 2]):  # use order: 3 oldest, 2 newest
        layer.clock = clock
        layer.used(np.array([e]), epoch=0)
    assert list(layer.holds[layer.evictable(np.array([], int), epoch=1)]) == [3, 1, 4, 2]
    # Experts the current call needs are not given up.
    assert list(layer.holds[layer.evictable(np.array([3, 7]), epoch=1)]) == [1, 4, 2]
    # A slot a computation of this epoch reads waits for the next sync.
    layer.used(np.array([1]), epoch=1)
    assert 1 not in layer.holds[layer.evictable(np.array([], int), epoch=1)]
    assert 1 in layer.holds[layer.evictable(np.array([], int), epoch=2)]
    # Pinned slots never leave.
    layer.pinned[layer.table[4]] = True
    assert 4 not in layer.holds[layer.evictable(np.array([], int), epoch=5)]
    # Eviction updates both directions of the table.
    slot = layer.table[3]
    layer.assign(np.array([9]), np.array([slot]))
    assert layer.table[3] == -1 and layer.table[9] == slot and layer.holds[slot] == 9
    layer.release(np.array([slot]))
    assert layer.table[9] == -1 and layer.holds[slot] == -1


def test_lfu_keeps_the_frequent_expert_lru_the_recent_one():
    lru, lfu = LRU(8, 2), LFU(8, 2, half_life=1000)
    holds = np.array([0, 1])
    for policy in (lru, lfu):
        for clock in range(5):
            policy.used(np.array([0]), np.array([0]), clock)  # expert 0: often
        policy.used(np.array([1]), np.array([1]), 5)  # expert 1: once, last
    assert list(lru.order(np.array([0, 1]), holds, 6)) == [0, 1]
    assert list(lfu.order(np.array([0, 1]), holds, 6)) == [1, 0]
    # Old uses fade: with a short half-life a burst long ago loses to a recent use.
    fading = LFU(8, 2, half_life=1)
    for clock in range(5):
        fading.used(np.array([0]), np.array([0]), clock)
    fading.used(np.array([1]), np.array([1]), 40)
    assert list(fading.order(np.array([0, 1]), holds, 41)) == [0, 1]


def test_an_expert_evicted_while_a_step_uses_it_is_not_corrupted(models, resident):
    """Two calls of a one-slot-short layer, the first result evaluated only after the second
    call has read other experts into the pool: the fence keeps the first result right."""
    model, _ = resident["wide"]
    streamed, _ = m3mlx.load(models["wide"], dtype=mx.float32, expert_cache="25%")
    tier = streamed.expert_tier
    layer_index = 0
    moe_streamed = dict(streamed.named_modules())[tier.layers[layer_index].layout.module]
    moe = dict(model.named_modules())[tier.layers[layer_index].layout.module]
    rng = np.random.default_rng(0)
    x1, x2 = (mx.array(rng.standard_normal((1, model.args.hidden_size)).astype(np.float32))
              for _ in range(2))
    K, E = model.args.num_experts_per_tok, model.args.num_local_experts
    ids1, ids2 = mx.array([[0, 1, 2, 3]]), mx.array([[4, 5, 6, 7]])  # disjoint: all evicted
    w = mx.full((1, K), 0.25)
    y1 = moe_streamed.streamed(x1, ids1, w, ExpertWeights.of(moe_streamed.switch_mlp), None,
                               moe.alpha, moe.limit)
    y2 = moe_streamed.streamed(x2, ids2, w, ExpertWeights.of(moe_streamed.switch_mlp), None,
                               moe.alpha, moe.limit)
    assert tier.layers[layer_index].slots == K == E // 4
    assert set(tier.layers[layer_index].holds) == {4, 5, 6, 7}  # expert 0-3 are gone
    want = [moe_experts(x, i, w, ExpertWeights.of(moe.switch_mlp), None, alpha=moe.alpha,
                        limit=moe.limit) for x, i in ((x1, ids1), (x2, ids2))]
    assert mx.array_equal(y1, want[0]).item() and mx.array_equal(y2, want[1]).item()


# ----------------------------------------------------------------------------------------------
# Memory


def test_peak_memory_with_a_quarter_cache(tmp_path):
    """Peak memory while loading and generating with a 25% cache stays below the weights that
    stay resident + the cache + the overhead stated here, and far below the resident model."""
    out = _converted(tmp_path, "big", roles={"experts": "fp32"}, num_local_experts=16,
                     num_experts_per_tok=2, intermediate_size=512)
    ckpt = Checkpoint.open(out)
    fp = footprint(ckpt, mx.float32)
    assert fp.experts_total > 8 * fp.resident  # the experts dominate, as in M3

    def peak(**memory):
        mx.clear_cache()
        mx.reset_peak_memory()
        model, tokenizer = m3mlx.load(out, dtype=mx.float32, **memory)
        _greedy(model, tokenizer, prompt="Hello there, how are you?")
        tier = getattr(model, "expert_tier", None)
        cache = tier.nbytes if tier else 0
        del model
        return mx.get_peak_memory(), cache

    full, _ = peak()
    streamed, cache = peak(expert_cache="25%")
    overhead = 4 << 20  # activations, K/V and temporaries of this tiny model
    assert cache == 4 * fp.expert * fp.moe_layers
    assert streamed <= fp.resident + cache + overhead, (streamed, fp.resident, cache)
    assert full >= fp.total  # the comparison: everything was resident
    assert streamed < 0.5 * full


# ----------------------------------------------------------------------------------------------
# Errors


def test_budget_errors_say_what_would_fit(models):
    ckpt = Checkpoint.open(models["demo"])
    fp = footprint(ckpt, mx.float32)
    with pytest.raises(BudgetError, match="smaller than one expert per layer"):
        m3mlx.load(models["demo"], expert_cache="1KB")
    with pytest.raises(BudgetError, match="cannot hold what stays resident"):
        m3mlx.load(models["demo"], memory_limit=fp.resident // 2)
    with pytest.raises(InputError, match="not both"):
        m3mlx.load(models["demo"], expert_cache="25%", memory_limit="1GB")
    with pytest.raises(InputError, match="choose one of lru, lfu, pinned"):
        m3mlx.load(models["demo"], expert_cache="25%", expert_policy="fifo")
    with pytest.raises(InputError, match="above 0% and at most 100%"):
        m3mlx.load(models["demo"], expert_cache="150%")
    # A budget that holds everything loads everything; one that does not, streams.
    fixed = plan_budget(fp, 1 << 40, context=64)
    fixed = fixed.resident + fixed.kv + fixed.activations
    assert not plan_budget(fp, fixed + fp.experts_total, context=64).streams
    b = plan_budget(fp, fixed + fp.experts_total // 2, context=64)
    assert b.streams and b.slots == fp.experts // 2
    # Too large for the machine without either option: refused before reading, with the fix.
    with pytest.raises(BudgetError, match="--memory-limit"):
        check_fits(fp, memory=fp.total // 2)


def test_original_checkpoint_does_not_stream(demo_dir):
    with pytest.raises(LoadError, match="m3mlx convert"):
        m3mlx.load(demo_dir, expert_cache="25%")


def test_a_file_replaced_while_running_is_an_error(tmp_path):
    out = _converted(tmp_path, "moved")
    model, tokenizer = m3mlx.load(out, dtype=mx.float32, expert_cache="25%")
    _greedy(model, tokenizer, prompt="Hello")
    shard = sorted(out.glob("model*.safetensors"))[0]
    data = shard.read_bytes()
    shard.unlink()
    shard.write_bytes(data)  # same bytes, another file: the process's view is gone
    with pytest.raises(CheckpointError, match=shard.name):
        _greedy(model, tokenizer, prompt="Something else entirely")


def test_a_read_error_names_the_file_and_offset(models, resident, monkeypatch):
    """A failing read is retried, then reported with its file and offset; the slots it was
    filling are given up, so once the disk reads again the model is right again."""
    import m3mlx.checkpoint as checkpoint

    model, tokenizer = m3mlx.load(models["demo"], dtype=mx.float32, expert_cache="25%")
    real, calls = checkpoint._pread_into, []

    def failing(file, offset, view, direct=False):
        calls.append(offset)
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(checkpoint, "_pread_into", failing)
    with pytest.raises(CheckpointError, match=r"safetensors at byte \d+ failed 3 times"):
        _greedy(model, tokenizer)
    assert len(calls) >= checkpoint.READ_RETRIES
    monkeypatch.setattr(checkpoint, "_pread_into", real)
    assert _greedy(model, tokenizer) == _greedy(*resident["demo"])


# ----------------------------------------------------------------------------------------------
# Calibration and the pinned policy


def test_usage_file_round_trip_and_pinned_policy(models, resident, tmp_path):
    ckpt = Checkpoint.open(models["wide"])
    layouts = [l for l in routed_experts(ckpt) if ".mtp." not in l.module]
    counts = {l.module: list(range(l.experts, 0, -1)) for l in layouts}  # expert 0 most used
    file = write_usage(tmp_path / USAGE_FILE, counts, tokens=100)
    assert {k: v.tolist() for k, v in read_usage(file, layouts).items()} == counts
    cache = ExpertCache(8, "pinned", usage_file=file)
    from m3mlx.loading import model_from_checkpoint

    model = model_from_checkpoint(ckpt, dtype=mx.float32, experts=cache)
    for layer in model.expert_tier.layers:
        assert sorted(layer.holds[layer.pinned]) == [0, 1, 2, 3]  # half the slots
    _, tokenizer = resident["wide"]
    assert _greedy(model, tokenizer) == _greedy(*resident["wide"])
    for layer in model.expert_tier.layers:
        assert sorted(layer.holds[layer.pinned]) == [0, 1, 2, 3]
    # A file from another model is refused with what to do.
    other = write_usage(tmp_path / "other.json", {layouts[0].module: [1, 2]}, tokens=3)
    with pytest.raises(CheckpointError, match="calibrate-experts"):
        read_usage(other, layouts)
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="calibrate-experts"):
        read_usage(tmp_path / "junk.json", layouts)
    with pytest.raises(CheckpointError, match="calibrate-experts"):
        m3mlx.load(models["demo"], expert_cache="50%", expert_policy="pinned")
