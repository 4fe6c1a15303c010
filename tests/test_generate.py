"""Generation: sampling options, stopping, statistics."""

import importlib

import mlx.core as mx
import numpy as np
import pytest

import m3mlx
from m3mlx.generate import generate_tokens, make_repetition_penalty, make_sampler

PROMPT = "The quick brown fox jumps over the lazy dog. " * 6  # past MSA's dense range


def test_greedy_is_the_argmax_of_the_model(demo_model):
    model, tokenizer = demo_model
    ids = tokenizer.encode(PROMPT)
    tokens = [r.token for r in m3mlx.stream_generate(model, tokenizer, ids, max_tokens=5)]
    for tok in tokens:
        assert tok == int(mx.argmax(model(mx.array([ids]))[0, -1]))
        ids.append(tok)


def test_seed_makes_sampling_reproducible(demo_model):
    model, tokenizer = demo_model
    opts = dict(max_tokens=12, temperature=1.0, top_p=0.95, top_k=40, min_p=0.02)
    a = m3mlx.generate(model, tokenizer, PROMPT, seed=1, **opts)
    b = m3mlx.generate(model, tokenizer, PROMPT, seed=1, **opts)
    outs = {m3mlx.generate(model, tokenizer, PROMPT, seed=s, **opts) for s in range(2, 6)}
    assert a == b and len(outs) > 1


def test_sampler_filters():
    logprobs = mx.log(mx.array([0.5, 0.3, 0.15, 0.05]))
    keys = mx.random.split(mx.random.key(0), 200)
    def draws(**kw):
        sampler = make_sampler(temperature=1.0, **kw)
        return {int(sampler(logprobs, k)) for k in keys}
    assert draws(top_k=1) == {0}
    assert draws(top_k=2) == {0, 1}
    assert draws(top_p=0.7) == {0, 1}  # 0.5 < 0.7, 0.5 + 0.3 covers it
    assert draws(min_p=0.5) == {0, 1}  # keeps p >= 0.25
    assert draws() == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="top_p"):
        make_sampler(temperature=1.0, top_p=0)


def test_repetition_penalty_lowers_seen_tokens():
    logits = mx.array([2.0, -1.0, 0.5])
    out = make_repetition_penalty(2.0)([0, 1], logits)
    np.testing.assert_allclose(np.array(out), [1.0, -2.0, 0.5])


def test_stops_at_end_of_turn(demo_model, monkeypatch):
    model, tokenizer = demo_model
    end = tokenizer.token_to_id("[e~[")
    # Force the end-of-turn token after three tokens by biasing the logits.
    gen = importlib.import_module("m3mlx.generate")  # the package's `generate` is the function
    real = gen.make_sampler

    def biased(*a, **k):
        sample = real(*a, **k)
        count = {"n": 0}
        def step(logprobs, key):
            count["n"] += 1
            return mx.array(end) if count["n"] == 4 else sample(logprobs, key)
        return step
    monkeypatch.setattr(gen, "make_sampler", biased)
    out = list(m3mlx.stream_generate(model, tokenizer, PROMPT, max_tokens=50))
    assert out[-1].finish_reason == "stop" and out[-1].token == end and len(out) == 4
    assert "[e~[" not in "".join(r.text for r in out)


def test_stop_strings_end_generation_without_showing_the_string(demo_model):
    model, tokenizer = demo_model
    free = m3mlx.generate(model, tokenizer, PROMPT, max_tokens=20)
    stop = free[5:8]
    out = list(m3mlx.stream_generate(model, tokenizer, PROMPT, max_tokens=20, stop_strings=[stop]))
    text = "".join(r.text for r in out)
    assert out[-1].finish_reason == "stop" and text == free[: free.find(stop)]


def test_length_finish_and_statistics(demo_model):
    model, tokenizer = demo_model
    out = list(m3mlx.stream_generate(model, tokenizer, PROMPT, max_tokens=7))
    last = out[-1]
    assert last.finish_reason == "length" and last.generation_tokens == 7
    assert last.prompt_tokens == len(tokenizer.encode(PROMPT))
    assert last.prompt_tps > 0 and last.generation_tps > 0 and last.peak_memory > 0
    assert [r.finish_reason for r in out[:-1]] == [None] * 6


def test_prefill_chunk_size_does_not_change_the_output(demo_model):
    model, tokenizer = demo_model
    outs = {m3mlx.generate(model, tokenizer, PROMPT, max_tokens=10, prefill_step_size=s)
            for s in (7, 64, 2048)}
    assert len(outs) == 1


def test_empty_prompt_is_refused(demo_model):
    model, tokenizer = demo_model
    with pytest.raises(ValueError, match="prompt is empty"):
        m3mlx.generate(model, tokenizer, "", max_tokens=3)


# The decode loop queues step t+1 before handing token t over (`_sample_ahead`); with logits
# processors (which may depend on what the caller did with token t) it runs step by step. Both
# run the MLX-ops twin here, as on a Mac without Metal; the loops must agree token for token
# and leave the cache holding the prompt and every token but the last.

def _stepwise(tokens, logits):  # a processor that changes nothing forces the stepwise loop
    return logits


@pytest.mark.parametrize("sampling", [dict(), dict(temperature=0.9, top_p=0.9, seed=3)],
                         ids=["greedy", "sampled"])
def test_the_queued_loop_samples_what_the_stepwise_loop_does(demo_model, sampling):
    model, tokenizer = demo_model
    ahead = [r.token for r in m3mlx.stream_generate(model, tokenizer, PROMPT, max_tokens=24,
                                                     **sampling)]
    stepwise = [r.token for r in m3mlx.stream_generate(
        model, tokenizer, PROMPT, max_tokens=24, logits_processors=[_stepwise], **sampling)]
    assert ahead == stepwise and len(ahead) == 24


@pytest.mark.parametrize("processors", [[], [_stepwise]], ids=["queued", "stepwise"])
@pytest.mark.parametrize("stop_after", [1, 5, None], ids=["first", "break", "length"])
def test_the_cache_holds_all_but_the_last_token_when_generation_ends(demo_model, processors,
                                                                     stop_after):
    model, tokenizer = demo_model
    ids = tokenizer.encode(PROMPT)
    cache = m3mlx.make_cache(model)
    stream = m3mlx.stream_generate(model, tokenizer, ids, prompt_cache=cache, max_tokens=9,
                                   logits_processors=processors)
    got = []
    for r in stream:
        got.append(r.token)
        if len(got) == stop_after:
            break
    stream.close()
    assert len(got) == (stop_after or 9)
    assert {c.offset for c in cache} == {len(ids) + len(got) - 1}
    # Feeding the last token continues exactly as one uninterrupted run does.
    more = [r.token for r in m3mlx.stream_generate(model, tokenizer, got[-1:], prompt_cache=cache,
                                                    max_tokens=3)]
    whole = [r.token for r in m3mlx.stream_generate(model, tokenizer, ids,
                                                     max_tokens=len(got) + 3)]
    assert got + more == whole


@pytest.mark.parametrize("processors", [[], [_stepwise]], ids=["queued", "stepwise"])
def test_a_generator_run_to_its_end_leaves_the_last_token_unfed(demo_model, processors):
    model, tokenizer = demo_model
    ids = tokenizer.encode(PROMPT)
    cache = m3mlx.make_cache(model)
    got = list(generate_tokens(model, ids, cache=cache, max_tokens=6,
                               logits_processors=processors))
    assert {c.offset for c in cache} == {len(ids) + 5}
    more = list(generate_tokens(model, got[-1:], cache=cache, max_tokens=3))
    assert got + more == list(generate_tokens(model, ids, max_tokens=9))
