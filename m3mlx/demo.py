"""A tiny random MiniMax-M3 checkpoint in the original Hugging Face layout.

Same tensor names, dtypes and config shape as `MiniMaxAI/MiniMax-M3` (per-expert w1/w2/w3,
`language_model.*` prefix, vision tensors to be skipped, fp32 router), shrunk so it runs on a
CPU in milliseconds. Its weights are random, so its text is gibberish: it exercises every code
path, it does not speak. `m3mlx demo` and the tests build on it.
"""

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterable, Iterator, Optional

import mlx.core as mx
import numpy as np

from .chat_format import builtin_template
from .config import ModelArgs
from .defaults import RECOMMENDED_SAMPLING, home_dir
from .layout import text_weights
from .tokens import BOD, END_OF_TURN, SPECIAL_TOKENS


DATA_DIR = Path(__file__).parent / "data"
# The tiny M3 trained on the Python standard library (tools/train_tiny_m3.py), in the original
# Hugging Face layout, and the held-out files of its corpus.
TINY_M3_DIR = DATA_DIR / "tiny-m3"
HELDOUT_TEXT = DATA_DIR / "python-heldout.txt"

# Small enough for a CPU, shaped like M3: a dense first layer, then MSA + MoE layers,
# GQA groups, partial RoPE, one index head per KV head. MSA goes sparse past 4 x 16 = 64 tokens.
DEMO_TEXT_CONFIG = dict(
    hidden_size=64, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
    head_dim=16, rotary_dim=8, intermediate_size=32, shared_intermediate_size=32,
    dense_intermediate_size=96, num_local_experts=8, num_experts_per_tok=2,
    index_n_heads=2, index_head_dim=16, index_block_size=16, index_topk_blocks=4,
    sparse_layers=[False, True, True, True], moe_layers=[False, True, True, True],
)

_CORPUS = [
    "MiniMax-M3 is a mixture of experts language model with sparse attention.",
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the sun.",
    "Apple silicon runs MLX on a unified memory that the CPU and the GPU share.",
    "Each query attends to sixteen blocks of one hundred and twenty eight keys.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "Hello! How can I help you today? Let me think about it step by step.",
    '{"name": "get_weather", "arguments": {"location": "Boston", "units": "celsius"}}',
    "1, 2, 3, 4, 5, 6, 7, 8, 9, 10. Numbers, words, and punctuation; all of it.",
]


def train_tokenizer(vocab_size: int = 512, corpus: Optional[Iterable[str]] = None):
    """A byte-level BPE with M3's special tokens, trained offline on `corpus` (default: a small
    built-in one)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_CORPUS * 20 if corpus is None else corpus, trainer)
    return tok


def demo_args(**overrides) -> ModelArgs:
    cfg = {**DEMO_TEXT_CONFIG, **overrides}
    cfg.setdefault("vocab_size", 512)
    return ModelArgs(**cfg)


def random_weights(args: ModelArgs, seed: int = 0, with_mtp: bool = False,
                   dtype=mx.bfloat16) -> Dict[str, mx.array]:
    """Random tensors under the Hugging Face names of an M3 checkpoint (vision ones included).

    Matrices are scaled by 1/sqrt(fan-in) so activations stay O(1); norms and the router bias
    get small values around zero (norms scale by 1 + w). The router and its bias are fp32, as
    in the release; everything else is `dtype`.
    """
    rng = np.random.default_rng(seed)
    out = {}
    vision = {"vision_tower.patch_embed.proj.weight": (16, 12),
              "multi_modal_projector.linear_1.weight": (args.hidden_size, 16)}
    for name, shape in vision.items():
        out[name] = rng.standard_normal(shape).astype(np.float32)
    layout = text_weights(args, mtp_layers=1 if with_mtp else 0)
    for w in layout:
        values = rng.standard_normal(w.shape).astype(np.float32)
        if w.kind in ("linear", "expert"):
            values /= np.sqrt(w.shape[-1])
        elif w.kind == "vector":
            values *= 0.1
        out[w.name] = values
    fp32 = {w.name for w in layout if w.fp32}
    return {k: mx.array(v) if k in fp32 else mx.array(v).astype(dtype) for k, v in out.items()}


def hf_config(args: ModelArgs, style: str = "raw") -> dict:
    """config.json of the released checkpoint: raw (`sparse_attention_config`) or
    transformers-native (`layer_types`, `mlp_layer_types`, `index_*`)."""
    text = args.to_text_config()
    text["model_type"] = "minimax_m3"
    if style == "hf":
        sac = text.pop("sparse_attention_config")
        text.pop("moe_layer_freq")
        text["layer_types"] = ["minimax_m3_sparse" if s else "full_attention"
                               for s in args.sparse_layers]
        text["mlp_layer_types"] = ["sparse" if m else "dense" for m in args.moe_layers]
        text["index_n_heads"] = sac["sparse_num_index_heads"]
        text["index_head_dim"] = sac["sparse_index_dim"]
        text["index_block_size"] = sac["sparse_block_size"]
        text["index_topk_blocks"] = sac["sparse_topk_blocks"]
    return {
        "architectures": ["MiniMaxM3SparseForConditionalGeneration"],
        "model_type": "minimax_m3_vl",
        "text_config": text,
        "vision_config": {"hidden_size": 16, "num_hidden_layers": 1},
        "image_token_index": 200025,
        "video_token_index": 200026,
    }


def write_tokenizer(path: Path, tokenizer=None) -> "object":
    tok = tokenizer or train_tokenizer()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": BOD, "eos_token": END_OF_TURN, "add_bos_token": False}, indent=2))
    return tok


@contextmanager
def _staged(path: Path) -> Iterator[Path]:
    """A temporary folder next to `path`, whose files move into `path` only once all are
    written: a full disk or a read-only location leaves `path` as it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    try:
        yield staging
        path.mkdir(exist_ok=True)
        for f in sorted(staging.iterdir()):
            os.replace(f, path / f.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def copy_tiny_m3(path) -> Path:
    """Copy the tiny trained M3 (Hugging Face layout) to `path`, in place of what is there."""
    path = Path(path)
    shutil.rmtree(path, ignore_errors=True)  # an older copy's files would linger
    with _staged(path) as staging:
        for f in sorted(TINY_M3_DIR.iterdir()):
            shutil.copyfile(f, staging / f.name)
    return path


def write_demo_checkpoint(path, *, seed: int = 0, with_mtp: bool = False, shards: int = 2,
                          dtype=mx.bfloat16, config_style: str = "raw",
                          extra_files: Optional[Dict[str, str]] = None, **overrides) -> Path:
    """Write a tiny random M3 checkpoint (HF layout) with a tokenizer to `path`; returns it,
    written all at once (`_staged`)."""
    path = Path(path)
    with _staged(path) as staging:
        _write_checkpoint(staging, seed=seed, with_mtp=with_mtp, shards=shards, dtype=dtype,
                          config_style=config_style, extra_files=extra_files, **overrides)
    return path


def _write_checkpoint(path: Path, *, seed, with_mtp, shards, dtype, config_style, extra_files,
                      **overrides):
    tok = write_tokenizer(path)
    overrides.setdefault("vocab_size", tok.get_vocab_size())
    overrides.setdefault("bos_token_id", tok.token_to_id(BOD))
    overrides.setdefault("eos_token_id", tok.token_to_id(END_OF_TURN))
    args = demo_args(**overrides)
    if with_mtp:
        args.num_mtp_modules = 1
    weights = random_weights(args, seed, with_mtp, dtype)
    return write_weights(path, args, weights, shards=shards, config_style=config_style,
                         extra_files=extra_files)


def write_weights(path, args: ModelArgs, weights: Dict[str, mx.array], *, shards: int = 1,
                  config_style: str = "raw", vision: bool = True,
                  extra_files: Optional[Dict[str, str]] = None) -> Path:
    """Write Hugging Face-named `weights` in `shards` safetensors files with their index,
    config.json (with a vision_config when `vision`), generation_config.json and the chat
    template next to a tokenizer already in `path`; returns `path`."""
    path = Path(path)
    names = sorted(weights)
    per_shard = -(-len(names) // shards)
    weight_map = {}
    for s in range(shards):
        part = names[s * per_shard : (s + 1) * per_shard]
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        mx.save_safetensors(str(path / fname), {n: weights[n] for n in part},
                            metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    total = sum(w.nbytes for w in weights.values())
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config = hf_config(args, config_style)
    if not vision:
        config.pop("vision_config")
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": args.bos_token_id, "eos_token_id": args.eos_token_id,
         **RECOMMENDED_SAMPLING}, indent=2))
    files = {"chat_template.jinja": builtin_template(), **(extra_files or {})}
    for name, text in files.items():
        (path / name).write_text(text)


def default_demo_dir() -> Path:
    return home_dir() / "demo"
