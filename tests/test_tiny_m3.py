"""The tiny M3 that ships with m3mlx (tools/train_tiny_m3.py): M3's layout, it writes Python,
the same way every time, and its experts are balanced."""

import json

import mlx.core as mx
import numpy as np
import pytest

import m3mlx
from m3mlx.chat_format import builtin_template
from m3mlx.demo import HELDOUT_TEXT, TINY_M3_DIR
from m3mlx.eval import evaluate, open_text, windows
from m3mlx.layout import text_weights

# Far below the vocabulary (4096): a model that learned nothing scores about 4096 (uniform),
# one that learned only token frequencies about 690 (the training text's unigram entropy,
# 6.5 nats). The shipped model scores 91 at 512 tokens of context.
PERPLEXITY_BOUND = 150
PROMPT = "import os\n\n\ndef read_config(path):\n    \"\"\"Return the settings in path.\"\"\"\n"


@pytest.fixture(scope="module")
def tiny():
    return m3mlx.load(TINY_M3_DIR, dtype=mx.float32)


def test_it_is_shipped_in_the_original_layout():
    config = json.loads((TINY_M3_DIR / "config.json").read_text())
    args = m3mlx.ModelArgs.from_config(config)
    names = set(json.loads((TINY_M3_DIR / "model.safetensors.index.json").read_text())
                ["weight_map"])
    assert names == {w.name for w in text_weights(args)}  # per-expert w1/w2/w3, language_model.*
    assert args.num_local_experts >= 16 and args.n_shared_experts == 1
    assert not args.sparse_layers[0] and all(args.sparse_layers[1:])
    assert args.rotary_dim < args.head_dim  # partial RoPE
    assert HELDOUT_TEXT.stat().st_size > 100_000
    # The chat template the tools write (m3mlx's own), not an older copy.
    assert (TINY_M3_DIR / "chat_template.jinja").read_text() == builtin_template()


def test_heldout_perplexity_is_far_below_the_vocabulary(tiny):
    model, tokenizer = tiny
    r = evaluate(model, tokenizer, context=512, samples=8)
    assert r.perplexity < PERPLEXITY_BOUND, r.perplexity


def test_greedy_generation_writes_the_same_python_every_time(tiny):
    model, tokenizer = tiny
    a = m3mlx.generate(model, tokenizer, PROMPT, max_tokens=40, repetition_penalty=1.3)
    b = m3mlx.generate(model, tokenizer, PROMPT, max_tokens=40, repetition_penalty=1.3)
    assert a == b
    assert any(word in a for word in ("self", "return", "path", "if ", "=")), a


def test_experts_are_balanced(tiny):
    """The correction bias kept the load even while training: every expert is used, none takes
    more than three times its share."""
    model, tokenizer = tiny
    with open_text(None) as f:
        tokens = next(windows(tokenizer, f, 2048))
    loads = []
    h = model.language_model.model.embed_tokens(mx.array(tokens)[None])
    for layer in model.layers:
        h = h + layer.self_attn(layer.input_layernorm(h))
        x = layer.post_attention_layernorm(h)
        if "block_sparse_moe" in layer:
            experts, _ = layer.block_sparse_moe.route(x.reshape(-1, x.shape[-1]))
            loads.append(np.bincount(np.array(experts).ravel(),
                                     minlength=model.args.num_local_experts))
            h = h + layer.block_sparse_moe(x)
        else:
            h = h + layer.mlp(x)
    for load in loads:
        assert load.min() > 0 and load.max() < 3 * load.mean(), load


def test_it_runs_in_the_bfloat16_it_ships_in(tiny):
    """At --dtype auto the activations stay bfloat16 and the unquantized experts go through
    gather_mm (float32 only on a CPU: the twin computes there in float32)."""
    model32, tokenizer = tiny
    model16, _ = m3mlx.load(TINY_M3_DIR)
    assert model16.layers[1].block_sparse_moe.switch_mlp.gate_proj.weight.dtype == mx.bfloat16
    r16 = evaluate(model16, tokenizer, context=512, samples=2)
    r32 = evaluate(model32, tokenizer, context=512, samples=2)
    assert r16.perplexity == pytest.approx(r32.perplexity, rel=0.03)
