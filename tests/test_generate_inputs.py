"""The generation API checks every option and prompt before any work: out-of-range, NaN or
mistyped values raise InputError naming the option and its range (they used to sample the
same token forever, or fail deep inside MLX), and the context length is enforced."""

import math

import pytest

import m3mlx
from m3mlx.checks import InputError
from m3mlx.checks import OPTION_RANGES
from m3mlx.generate import make_repetition_penalty, make_sampler

PROMPT = "The quick brown fox jumps over the lazy dog. " * 3
NAN = math.nan


@pytest.mark.parametrize("option,value,message", [
    ("temperature", NAN, r"temperature=nan: must be a number >= 0"),
    ("temperature", math.inf, r"temperature=inf"),
    ("temperature", -1, r"temperature=-1.0: must be a number >= 0"),
    ("top_p", NAN, r"top_p=nan: must be a number in \(0, 1\]"),
    ("top_p", 5, r"top_p=5.0: must be a number in \(0, 1\]"),
    ("min_p", NAN, r"min_p=nan: must be a number in \[0, 1\)"),
    ("top_k", -3, r"top_k=-3: must be an integer >= 0"),
    ("top_k", 2.5, r"top_k=2.5: must be an integer >= 0"),
    ("repetition_penalty", NAN, r"repetition_penalty=nan: must be a number > 0"),
    ("repetition_penalty", 0, r"repetition_penalty=0.0: must be a number > 0"),
    ("repetition_context_size", 0, r"repetition_context_size=0: must be an integer >= 1"),
    ("seed", -1, r"seed=-1: must be an integer in \[0, 18446744073709551615\]"),
    ("seed", 2**70, r"seed=1180591620717411303424"),
    ("seed", "7", r"seed='7'"),
    ("max_tokens", "a lot", r"max_tokens='a lot': must be an integer >= 0"),
    ("max_tokens", True, r"max_tokens=True"),
    ("prefill_step_size", 0, r"prefill_step_size=0: must be an integer >= 1"),
])
def test_bad_options_are_refused_at_the_call(demo_model, option, value, message):
    model, tokenizer = demo_model
    with pytest.raises(InputError, match=message):
        m3mlx.stream_generate(model, tokenizer, PROMPT, **{option: value})  # before next()


def test_the_sampler_and_penalty_check_their_options_too():
    with pytest.raises(InputError, match="temperature=nan"):
        make_sampler(temperature=NAN)
    with pytest.raises(InputError, match="top_p=nan"):
        make_sampler(temperature=1.0, top_p=NAN)
    with pytest.raises(InputError, match="min_p=nan"):
        make_sampler(temperature=1.0, min_p=NAN)
    with pytest.raises(InputError, match="repetition_penalty=nan"):
        make_repetition_penalty(NAN)
    assert set(OPTION_RANGES) >= {"temperature", "top_p", "top_k", "min_p", "seed"}


def test_extreme_but_valid_options_work(demo_model):
    model, tokenizer = demo_model
    # A prefill step far beyond the prompt is one chunk (it used to overflow MLX's slicing).
    a = m3mlx.generate(model, tokenizer, PROMPT, max_tokens=4, prefill_step_size=10**12)
    b = m3mlx.generate(model, tokenizer, PROMPT, max_tokens=4)
    assert a == b
    # The largest seed mx.random.key takes.
    m3mlx.generate(model, tokenizer, PROMPT, max_tokens=2, temperature=1.0, seed=2**64 - 1)


@pytest.mark.parametrize("stops,message", [
    ([""], "a stop string is empty"),
    ("x", "stop_strings must be a list of strings"),
    (["ok", "caf\udce9"], "a stop string is not valid UTF-8"),
])
def test_bad_stop_strings(demo_model, stops, message):
    model, tokenizer = demo_model
    with pytest.raises(InputError, match=message):
        m3mlx.stream_generate(model, tokenizer, PROMPT, stop_strings=stops)


def test_bad_prompts(demo_model):
    model, tokenizer = demo_model
    vocab = model.args.vocab_size
    with pytest.raises(InputError, match=r"the prompt is not valid UTF-8 text \(undecodable "
                                         r"byte at character 3\)"):
        m3mlx.generate(model, tokenizer, "caf\udce9 au lait")  # argv's way of holding b"\xe9"
    with pytest.raises(InputError, match=rf"token ids outside the vocabulary \[0, {vocab}\)"):
        m3mlx.generate(model, tokenizer, [1, 2, vocab])
    with pytest.raises(InputError, match="outside the vocabulary"):
        m3mlx.generate(model, tokenizer, [-1, 2])
    with pytest.raises(InputError, match="flat list of integers"):
        m3mlx.generate(model, tokenizer, [[1, 2], [3, 4]])
    with pytest.raises(InputError, match="flat list of integers"):
        m3mlx.generate(model, tokenizer, [1.5, 2])
    with pytest.raises(InputError, match="the prompt is empty"):
        m3mlx.generate(model, tokenizer, [])


def test_the_context_length_is_enforced(demo_model, monkeypatch):
    model, tokenizer = demo_model
    ids = tokenizer.encode(PROMPT)
    monkeypatch.setattr(model.args, "max_position_embeddings", len(ids) + 3)
    # Generation stops where the context ends: 4 tokens (the last one is never fed).
    out = list(m3mlx.stream_generate(model, tokenizer, ids, max_tokens=50))
    assert len(out) == 4 and out[-1].finish_reason == "length"
    cache = m3mlx.make_cache(model)
    m3mlx.generate(model, tokenizer, ids[:10], max_tokens=1, prompt_cache=cache)
    with pytest.raises(InputError, match=rf"the prompt is {len(ids)} tokens after 10 cached, "
                                         rf"beyond the model's context of {len(ids) + 3}; "
                                         "shorten it"):
        m3mlx.stream_generate(model, tokenizer, ids, prompt_cache=cache)
    assert cache[0].offset == 10  # refused before anything was prefilled


def test_prefill_progress_reports_each_chunk(demo_model):
    model, tokenizer = demo_model
    ids = tokenizer.encode(PROMPT)
    seen = []
    m3mlx.generate(model, tokenizer, ids, max_tokens=1, prefill_step_size=16,
                   prefill_progress=lambda done, total: seen.append((done, total)))
    n = len(ids)
    assert seen == [(min(n, i + 16), n) for i in range(0, n, 16)]
