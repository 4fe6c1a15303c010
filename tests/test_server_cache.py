"""The server's prefix cache: the radix tree itself (match, restore, split, LRU, disk), and
through `m3mlx serve`: shared prefixes, restarts from --cache-dir, Claude Code's billing header,
greedy output unchanged by a cache hit."""

import json
import struct

import anthropic
import mlx.core as mx
import numpy as np
import openai
import pytest

import m3mlx
from m3mlx.chat_format import render_chat
from m3mlx.demo import write_demo_checkpoint
from m3mlx.generate import prefill
from m3mlx.server.prefix_cache import PrefixCache

from server_fixtures import Server

NAME = "m3-tiny"


def filled(model, ids, **settings):
    cache = m3mlx.make_cache(model, **settings)
    prefill(model, mx.array(ids), cache)
    return cache


def states(cache):
    return [{k: np.array(v) for k, v in c.state.items()} for c in cache]


def same(a, b):
    return all(x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
               for x, y in zip(a, b))


def meta(model, **settings):
    return [c.meta() for c in m3mlx.make_cache(model, **settings)]


@pytest.fixture(scope="module")
def tokens(demo_model):
    rng = np.random.default_rng(0)
    vocab = demo_model[0].args.vocab_size
    return [int(t) for t in rng.integers(10, vocab, 400)]


def test_match_restore_and_split(demo_model, tokens):
    model, _ = demo_model
    a, b = tokens[:300], tokens[:150] + tokens[300:400]
    tree = PrefixCache(meta(model), 1 << 30)
    assert tree.match(a) == 0
    tree.insert(a, filled(model, a))
    assert tree.match(a) == 300 and tree.match(a + [7, 8]) == 300 and tree.match(b) == 150
    tree.insert(b, filled(model, b))  # splits the first edge at 150
    assert tree.match(b) == 250 and tree.match(a) == 300
    for ids in (a, b, a[:200]):
        restored = tree.restore(ids, len(ids))
        assert [c.offset for c in restored] == [len(ids)] * len(restored)
        assert same(states(restored), states(filled(model, ids)))


def test_greedy_output_is_the_same_with_a_restored_cache(demo_model, tokens):
    model, tokenizer = demo_model
    prompt = tokens[:300]
    tree = PrefixCache(meta(model), 1 << 30)
    tree.insert(prompt[:250], filled(model, prompt[:250]))
    fresh = m3mlx.generate(model, tokenizer, prompt, max_tokens=12, temperature=0.0)
    cache = tree.restore(prompt, 250)
    hit = m3mlx.generate(model, tokenizer, prompt[250:], prompt_cache=cache, max_tokens=12,
                         temperature=0.0)
    assert hit == fresh


def test_memory_bound_drops_the_least_recently_used(demo_model, tokens):
    model, _ = demo_model
    one = sum(a.nbytes for c in filled(model, tokens[:100]) for a in c.state.values())
    tree = PrefixCache(meta(model), int(one * 2.5))
    first, second, third = tokens[:100], tokens[100:200], tokens[200:300]
    for ids in (first, second):
        tree.insert(ids, filled(model, ids))
    tree.restore(first, 100)  # first is now the most recently used
    tree.insert(third, filled(model, third))
    assert tree.memory_bytes <= tree.max_bytes
    assert (tree.match(first), tree.match(second), tree.match(third)) == (100, 0, 100)


def test_disk_survives_a_restart(demo_model, tokens, tmp_path):
    model, _ = demo_model
    a, b = tokens[:300], tokens[:150] + tokens[300:400]
    tree = PrefixCache(meta(model), 1 << 30, tmp_path)
    tree.insert(a, filled(model, a))
    tree.insert(b, filled(model, b))
    (tmp_path / "junk.safetensors").write_bytes(b"not a cache")
    for name, value in (("deep", "[" * 100_000 + "]" * 100_000), ("list", "[1]")):
        header = json.dumps({"__metadata__": {"m3mlx_prefix": value}}).encode()
        (tmp_path / f"{name}.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    (tmp_path / ".half-written.tmp.safetensors").write_bytes(b"")
    logs = []
    again = PrefixCache(meta(model), 1 << 30, tmp_path, log=logs.append)
    assert again.memory_bytes == 0  # headers only, until a request needs the arrays
    assert again.match(a) == 300 and again.match(b) == 250
    assert same(states(again.restore(b, 250)), states(filled(model, b)))
    assert not (tmp_path / ".half-written.tmp.safetensors").exists()
    for name in ("junk", "deep", "list"):
        assert any(f"ignoring {name}.safetensors" in line for line in logs)
    # Memory bound 0: nothing stays in memory, everything is still on disk.
    lean = PrefixCache(meta(model), 1, tmp_path)
    assert same(states(lean.restore(a, 300)), states(filled(model, a)))
    assert lean.memory_bytes == 0


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory):
    """The demo model at head_dim 32, the smallest that compact K/V groups fit."""
    path = write_demo_checkpoint(tmp_path_factory.mktemp("wide"), dtype=mx.float32,
                                 head_dim=32, rotary_dim=16)
    return m3mlx.load(path, dtype=mx.float32)


@pytest.mark.parametrize("kv_bits", [8, 4])
def test_compact_kv_is_stored_as_it_is_and_survives_a_restart(wide_model, tokens, tmp_path,
                                                               kv_bits):
    """Issue 15: with --kv-bits the tree holds the compact K/V (codes, scales, biases), in
    memory and on disk, never re-quantized; a hit decodes exactly as the uncached compact run."""
    model, tokenizer = wide_model
    a, b = tokens[:300], tokens[:150] + tokens[300:400]
    settings = {"kv_bits": kv_bits}
    tree = PrefixCache(meta(model, **settings), 1 << 30, tmp_path)
    tree.insert(a, filled(model, a, **settings))
    tree.insert(b, filled(model, b, **settings))
    full = sum(v.nbytes for c in filled(model, a) for k, v in c.state.items() if k in
               ("keys", "values"))
    compact = sum(v.nbytes for c in filled(model, a, **settings) for k, v in c.state.items()
                  if not k.startswith("index"))
    assert compact < 0.6 * full
    again = PrefixCache(meta(model, **settings), 1 << 30, tmp_path)
    assert again.match(b) == 250
    restored = again.restore(b, 250)
    assert all(c.kv_bits == kv_bits for c in restored)
    assert same(states(restored), states(filled(model, b, **settings)))
    fresh = m3mlx.generate(model, tokenizer, b, max_tokens=10, temperature=0.0,
                           prompt_cache=m3mlx.make_cache(model, **settings))
    hit = m3mlx.generate(model, tokenizer, b[200:], prompt_cache=again.restore(b, 200),
                         max_tokens=10, temperature=0.0)
    assert hit == fresh


def test_disk_bound(demo_model, tokens, tmp_path):
    model, _ = demo_model
    tree = PrefixCache(meta(model), 1 << 30, tmp_path, max_disk_bytes=1)
    tree.insert(tokens[:100], filled(model, tokens[:100]))
    assert list(tmp_path.glob("*.safetensors")) == []
    assert tree.match(tokens[:100]) == 100  # still in memory


# -- through the server ----------------------------------------------------------------------------

AGENT = "You are a coding agent. " + "Follow the rules of the repository carefully. " * 30


def server_for(demo_dir, cache_dir, *extra):
    return Server(["--model", str(demo_dir), "--dtype", "float32", "--temp", "0",
                   "--max-tokens", "8", "--served-model-name", NAME,
                   "--cache-dir", str(cache_dir), *extra])


def test_shared_prefix_restart_and_billing_header(demo_dir, demo_model, tmp_path):
    model, tokenizer = demo_model
    turn1 = [{"role": "system", "content": AGENT}, {"role": "user", "content": "Fix the bug."}]
    turn2 = turn1 + [{"role": "assistant", "content": "Done."},
                     {"role": "user", "content": "Now add a test."}]
    ids1, ids2 = (tokenizer.encode(render_chat(t, template=tokenizer.chat_template))
                  for t in (turn1, turn2))
    assert ids2[:len(ids1)] == ids1  # turn 1's prompt starts turn 2's
    common = len(ids1)  # (the model's own reply differs from the "Done." sent back)
    expected = m3mlx.generate(model, tokenizer, ids2, max_tokens=8, temperature=0.0)

    server = server_for(demo_dir, tmp_path)
    try:
        client = openai.OpenAI(base_url=server.url, api_key="x", max_retries=0)
        first = client.chat.completions.create(model=NAME, messages=turn1)
        assert first.usage.prompt_tokens_details.cached_tokens == 0
        # A different conversation in between: the live cache moves on, the tree keeps turn 1.
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi"}])
        second = client.chat.completions.create(model=NAME, messages=turn2)
        assert second.usage.prompt_tokens == len(ids2)
        assert second.usage.prompt_tokens_details.cached_tokens == common
        assert second.choices[0].message.content == expected  # a cache hit changes nothing
        server.wait_for_log(rf"prompt {len(ids2):,} tokens \({common:,} cached\)")
    finally:
        server.stop()

    # Restarted: the next turn is answered from the cache on disk.
    turn3 = turn2 + [{"role": "assistant", "content": second.choices[0].message.content},
                     {"role": "user", "content": "Thanks."}]
    server = server_for(demo_dir, tmp_path)
    try:
        assert "prefix cache:" in server.wait_for_log("nodes on disk")
        client = openai.OpenAI(base_url=server.url, api_key="x", max_retries=0)
        third = client.chat.completions.create(model=NAME, messages=turn3)
        assert third.usage.prompt_tokens_details.cached_tokens >= len(ids2) - 1

        # Claude Code's per-request billing line does not break the cache.
        claude = anthropic.Anthropic(base_url=server.base, api_key="x", max_retries=0)

        def ask(checksum):
            system = [{"type": "text", "text": f"x-anthropic-billing-header: cc_version=2.1.3.a1b;"
                                               f" cc_entrypoint=cli; cch={checksum};"},
                      {"type": "text", "text": AGENT}]
            return claude.messages.create(model=NAME, max_tokens=4, system=system,
                                          messages=[{"role": "user", "content": "Fix it."}])
        one, two = ask("00001"), ask("9f3e2")
        assert two.usage.cache_read_input_tokens == \
            one.usage.input_tokens + one.usage.cache_read_input_tokens - 1
        assert one.content[0].text == two.content[0].text
    finally:
        server.stop()


def test_without_the_prefix_cache(demo_dir, tmp_path):
    server = server_for(demo_dir, tmp_path, "--cache-size", "0")
    try:
        client = openai.OpenAI(base_url=server.url, api_key="x", max_retries=0)
        messages = [{"role": "user", "content": AGENT}]
        client.chat.completions.create(model=NAME, messages=messages)
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Yo"}])
        again = client.chat.completions.create(model=NAME, messages=messages)
        assert again.usage.prompt_tokens_details.cached_tokens == 0  # everything recomputed
        assert list(tmp_path.rglob("*.safetensors")) == []
    finally:
        server.stop()
