"""Train the tiny M3 that ships with m3mlx, on the Python standard library's own source code.

    nice -n 10 benchmarks/with_openblas.sh python tools/train_tiny_m3.py

It is M3 at small size, through the runtime's own `m3mlx.model.Model` (so the architecture is
exactly the one that runs): a dense first layer, then MSA layers (blocks of 16 keys, top-8, so
attention is sparse past 128 tokens) with 32-expert top-4 MoE, a shared expert, SwiGLU-OAI,
Gemma norms and partial RoPE. Two things M3's own training does are done here too:

  * the router's correction bias is kept balanced without an auxiliary loss (DeepSeek-V3's
    rule): after each step every expert's bias moves by `--bias-rate` towards the mean load;
  * the MSA indexer learns from the attention it serves: its block scores (max-pooled
    index-query . index-key products, as the runtime selects with) are trained by KL towards
    the attention mass each earlier block gets from the layer's own query heads. The indexer
    sees a detached copy of the layer input, so that loss trains the indexer and nothing else;
    the block choice itself is discrete and passes no gradient.

The corpus is every UTF-8 `*.py` file of this interpreter's standard library (PSF licence),
split into training and held-out files by a hash of the file's path. Output: the checkpoint
in the original Hugging Face layout (per-expert w1/w2/w3, `language_model.*`, bf16 with the
router in fp32) with its byte-level BPE tokenizer, and the held-out text. The same seed, the
same Python version and one BLAS thread give the same model.
"""

import argparse
import hashlib
import json
import platform
import sys
import sysconfig
import time
from pathlib import Path
from typing import List, Tuple

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

from m3mlx.config import ModelArgs
from m3mlx.demo import HELDOUT_TEXT, TINY_M3_DIR, train_tokenizer, write_tokenizer, write_weights
from m3mlx.generate import generate
from m3mlx.layout import hf_tensors
from m3mlx.model import Attention, Model, MoE
from m3mlx.tokenizer import Tokenizer
from m3mlx.tokens import BOD, END_OF_TURN

# Every projection's input width is a multiple of 128, so every quantization group size
# applies to every matrix (the recipe measurements compare them all).
TINY_M3 = dict(
    hidden_size=128, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
    head_dim=32, rotary_dim=16, intermediate_size=128, shared_intermediate_size=128,
    dense_intermediate_size=384, num_local_experts=32, num_experts_per_tok=4,
    index_n_heads=2, index_head_dim=32, index_block_size=16, index_topk_blocks=8,
    sparse_layers=[False, True, True, True], moe_layers=[False, True, True, True],
    max_position_embeddings=65536,
)
VOCAB_SIZE = 4096
HELDOUT_ONE_IN = 50  # files whose path hash is 0 mod this are held out (about 2%)
MAX_FILE_CHARS = 400_000  # a few generated tables are larger; they teach nothing
INDEXER_QUERIES = 256  # positions per window that train the indexer (its loss is quadratic)


# ----------------------------------------------------------------------------------------------
# Corpus


def stdlib_files() -> List[Tuple[str, str]]:
    """(path relative to the standard library, text) of every UTF-8 source file, sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root).as_posix()
        if rel.startswith(("site-packages/", "dist-packages/")) or "__pycache__" in rel:
            continue
        try:
            text = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip() and len(text) <= MAX_FILE_CHARS:
            out.append((rel, text))
    return out


def is_heldout(rel: str) -> bool:
    return int(hashlib.sha256(rel.encode()).hexdigest()[:8], 16) % HELDOUT_ONE_IN == 0


def token_stream(tok, texts: List[str]) -> np.ndarray:
    """All documents, each opened by the start-of-document token, as one int32 stream."""
    bod = tok.token_to_id(BOD)
    ids = [[bod] + e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]
    return np.concatenate([np.asarray(i, np.int32) for i in ids])


# ----------------------------------------------------------------------------------------------
# The runtime's modules, made to leave what the losses and the bias update need on a tape


class Tape:
    def __init__(self):
        self.attention, self.routing = [], []

    def clear(self):
        self.attention.clear()
        self.routing.clear()


TAPE = Tape()


class TapedAttention(Attention):
    def __call__(self, x, cache=None):
        TAPE.attention.append([self, x])
        return super().__call__(x, cache)

    def project(self, x, offset):
        q, k, v = super().project(x, offset)
        TAPE.attention[-1] += [q, k]
        return q, k, v


class TapedMoE(MoE):
    def route(self, x):
        experts, weights = super().route(x)
        TAPE.routing.append(experts)
        return experts, weights


def instrument(model: Model):
    for layer in model.layers:
        if layer.self_attn.sparse:
            layer.self_attn.__class__ = TapedAttention
        if "block_sparse_moe" in layer:
            layer.block_sparse_moe.__class__ = TapedMoE
            # Moved by the balancing rule, not by the optimizer.
            layer.block_sparse_moe.freeze(keys=["e_score_correction_bias"], recurse=False)


def indexer_loss(attn: Attention, x, q, k, queries: int = INDEXER_QUERIES) -> mx.array:
    """KL(attention mass per earlier block || softmax of the indexer's block scores), averaged
    over KV heads and the last `queries` positions of the window (the ones with the most
    blocks to choose from). The window length must be a multiple of the block."""
    B, Hq, S, D = q.shape
    H, bs = attn.n_kv_heads, attn.block_size
    L, nb = min(queries, S), S // bs
    positions = mx.arange(S - L, S)
    causal = mx.arange(S)[None, :] <= positions[:, None]  # [L, S]
    q, k = mx.stop_gradient(q[:, :, S - L:]), mx.stop_gradient(k)
    scores = (q.reshape(B, H, Hq // H, L, D) * attn.scale) @ k[:, :, None].swapaxes(-1, -2)
    probs = mx.softmax(mx.where(causal, scores, -mx.inf), axis=-1).mean(axis=2)  # [B, H, L, S]
    mass = probs.reshape(B, H, L, nb, bs).sum(axis=-1)  # [B, H, L, nb]

    x = mx.stop_gradient(x)
    iq = attn.index_queries(x, 0)[:, :, S - L:]
    ik = attn.index_keys(x, 0)
    dots = (iq @ ik[:, None].swapaxes(-1, -2)) * attn.index_dim**-0.5  # [B, H, L, S]
    block_scores = dots.reshape(B, H, L, nb, bs).max(axis=-1)

    history = mx.arange(nb)[None, :] < (positions // bs)[:, None]  # [L, nb]
    target = mx.where(history, mass, 0.0)
    target = target / mx.maximum(target.sum(axis=-1, keepdims=True), 1e-9)
    logq = mx.where(history, block_scores, -1e9)
    logq = logq - mx.logsumexp(logq, axis=-1, keepdims=True)
    kl = (target * (mx.log(mx.maximum(target, 1e-12)) - logq)).sum(axis=-1)  # [B, H, L]
    rows = (positions >= bs).astype(mx.float32)
    return (kl * rows).sum() / (B * H * mx.maximum(rows.sum(), 1))


def loss_fn(model, inputs, targets):
    TAPE.clear()
    logits = model(inputs)
    ce = nn.losses.cross_entropy(logits, targets, reduction="mean")
    idx = mx.stack([indexer_loss(*entry) for entry in TAPE.attention]).mean()
    return ce + idx, (ce, idx, list(TAPE.routing))


def balance(model: Model, routing: List[mx.array], rate: float) -> List[float]:
    """Move each correction bias towards the mean expert load; return max/mean load per layer."""
    moes = [layer.block_sparse_moe for layer in model.layers if "block_sparse_moe" in layer]
    imbalance = []
    for moe, experts in zip(moes, routing):
        E = moe.e_score_correction_bias.shape[0]
        load = np.bincount(np.array(experts).ravel(), minlength=E).astype(np.float32)
        step = rate * np.sign(load.mean() - load)
        moe.e_score_correction_bias = moe.e_score_correction_bias + mx.array(step)
        imbalance.append(float(load.max() / load.mean()))
    return imbalance


# ----------------------------------------------------------------------------------------------
# Training


def batch(stream: np.ndarray, seed: int, step: int, size: int, length: int):
    """`size` windows of length + 1 tokens at offsets drawn from (seed, step): the same batch
    for the same step, resumed or not."""
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(stream) - length - 1, size)
    rows = np.stack([stream[s:s + length + 1] for s in starts])
    return mx.array(rows[:, :-1]), mx.array(rows[:, 1:])


def schedule(args) -> optim.schedulers:
    warmup = optim.linear_schedule(args.lr / 100, args.lr, args.warmup)
    decay = optim.cosine_decay(args.lr, args.steps - args.warmup, end=args.lr / 10)
    return optim.join_schedules([warmup, decay], [args.warmup])


def sample(model, tok, prompt: str, n: int = 48) -> str:
    return generate(model, Tokenizer(tok), prompt, max_tokens=n, temperature=0.0)


def save_checkpoint(ckpt: Path, model, opt, step: int):
    ckpt.mkdir(parents=True, exist_ok=True)
    model.save_weights(str(ckpt / "weights.safetensors"))
    mx.save_safetensors(str(ckpt / "optimizer.safetensors"), dict(tree_flatten(opt.state)))
    (ckpt / "state.json").write_text(json.dumps({"step": step}))


def load_checkpoint(ckpt: Path, model, opt) -> int:
    from mlx.utils import tree_unflatten

    model.load_weights(str(ckpt / "weights.safetensors"))
    opt.state = tree_unflatten(list(mx.load(str(ckpt / "optimizer.safetensors")).items()))
    return json.loads((ckpt / "state.json").read_text())["step"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=TINY_M3_DIR, help="checkpoint directory")
    p.add_argument("--heldout", type=Path, default=HELDOUT_TEXT, help="held-out text file")
    p.add_argument("--work", type=Path, default=Path("/tmp/tiny-m3-train"),
                   help="checkpoints and the log")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--length", type=int, default=512, help="tokens per training window")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--bias-rate", type=float, default=1e-2)
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--resume", action="store_true", help="continue from --work/checkpoint")
    p.add_argument("--max-files", type=int, default=None,
                   help="train on the first N training files only (a quick run of the recipe)")
    args = p.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    log_file = open(args.work / "train.log", "a")

    def log(line):
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    t0 = time.time()
    files = stdlib_files()
    train = [t for rel, t in files if not is_heldout(rel)][:args.max_files]
    held = [t for rel, t in files if is_heldout(rel)]
    digest = hashlib.sha256("\0".join(rel for rel, _ in files).encode()).hexdigest()[:16]
    tok = train_tokenizer(VOCAB_SIZE, train)
    stream = token_stream(tok, train)
    log(f"corpus: Python {platform.python_version()} stdlib, {len(train)} training files "
        f"({stream.size:,} tokens), {len(held)} held out; files digest {digest}; "
        f"{time.time() - t0:.0f}s")

    mx.random.seed(args.seed)
    margs = ModelArgs(**TINY_M3, vocab_size=tok.get_vocab_size(),
                      bos_token_id=tok.token_to_id(BOD), eos_token_id=tok.token_to_id(END_OF_TURN))
    model = Model(margs)
    instrument(model)
    opt = optim.AdamW(learning_rate=schedule(args), weight_decay=0.1)
    step = 0
    if args.resume and (args.work / "checkpoint" / "state.json").exists():
        step = load_checkpoint(args.work / "checkpoint", model, opt)
        log(f"resumed at step {step}")
    value_and_grad = nn.value_and_grad(model, loss_fn)

    tokens_per_step = args.batch * args.length
    tic = time.time()
    while step < args.steps:
        inputs, targets = batch(stream, args.seed, step, args.batch, args.length)
        (loss, (ce, idx, routing)), grads = value_and_grad(model, inputs, targets)
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state, ce, idx, routing)
        imbalance = balance(model, routing, args.bias_rate)
        step += 1
        if step % 10 == 0:
            rate = 10 * tokens_per_step / (time.time() - tic)
            log(f"step {step} loss {ce.item():.3f} indexer {idx.item():.3f} "
                f"load max/mean {' '.join(f'{x:.2f}' for x in imbalance)} "
                f"lr {opt.learning_rate.item():.2e} {rate:.0f} tok/s "
                f"[{(time.time() - t0) / 60:.1f} min]")
            tic = time.time()
        if step % args.save_every == 0 or step == args.steps:
            save_checkpoint(args.work / "checkpoint", model, opt, step)
            log(f"sample: {sample(model, tok, 'import os' + chr(10) + chr(10) + 'def ')!r}")
            tic = time.time()

    args.out.mkdir(parents=True, exist_ok=True)
    write_tokenizer(args.out, tok)
    params = dict(tree_flatten(model.parameters()))
    write_weights(args.out, margs, hf_tensors(params, margs, dtype=mx.bfloat16), vision=False)
    (args.out / "training.json").write_text(json.dumps({
        "corpus": f"Python {platform.python_version()} standard library *.py (PSF licence)",
        "files_digest": digest, "training_files": len(train), "heldout_files": len(held),
        "training_tokens": int(stream.size), "seen_tokens": step * tokens_per_step,
        "seed": args.seed, "steps": step, "batch": args.batch, "length": args.length,
        "lr": args.lr, "warmup": args.warmup, "bias_rate": args.bias_rate,
        "final_loss": round(ce.item(), 4), "wall_minutes": round((time.time() - t0) / 60, 1),
        "command": " ".join(["tools/train_tiny_m3.py", *(argv or sys.argv[1:])]),
    }, indent=2))
    args.heldout.parent.mkdir(parents=True, exist_ok=True)
    args.heldout.write_text("".join(BOD + t for t in held))
    log(f"wrote {args.out} and {args.heldout} in {(time.time() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
