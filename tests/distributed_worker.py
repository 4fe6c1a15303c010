"""One rank of the sharded-model tests (tests/test_distributed.py starts it with mlx.launch).

Each rank loads its part of MODEL under the plan KIND (m3mlx.rank_loading) and the whole model
in-process (the single-process reference), runs the same prompt through both (one forward over
the prompt, the chunked prefill generation uses, then greedy decode steps) and reports the
largest logit difference and its resident weight bytes; rank 0 writes every rank's to OUT.
"""

import json
import sys

import mlx.core as mx
import numpy as np

from m3mlx.generate import prefill
from m3mlx.loading import load_model
from m3mlx.model import make_cache
from m3mlx.rank_loading import held_bytes, load_rank, resident_bytes, text_tensors
from m3mlx.checkpoint import Checkpoint

PROMPT = 100  # tokens: past MSA's 4 x 16 dense window, so the sparse layers select blocks
CHUNK = 48
DECODE = 4


def main(model_dir: str, kind: str, out: str):
    group = mx.distributed.init(strict=True)
    mx.reset_peak_memory()
    model, _ = load_rank(model_dir, kind, group)
    load_peak = mx.get_peak_memory()
    ref = load_model(model_dir)
    ids = mx.array(np.random.default_rng(0).integers(0, ref.args.vocab_size, PROMPT))

    diffs = []
    whole, whole_ref = model(ids[None], make_cache(model)), ref(ids[None], make_cache(ref))
    diffs.append(mx.abs(whole - whole_ref).max().item())

    cache, cache_ref = make_cache(model), make_cache(ref)
    logits = prefill(model, ids, cache, CHUNK)
    logits_ref = prefill(ref, ids, cache_ref, CHUNK)
    diffs.append(mx.abs(logits - logits_ref).max().item())
    for _ in range(DECODE):
        token = mx.argmax(logits_ref).reshape(1, 1)
        logits = model(token, cache=cache)[0, -1]
        logits_ref = ref(token, cache=cache_ref)[0, -1]
        diffs.append(mx.abs(logits - logits_ref).max().item())

    ckpt = Checkpoint.open(model_dir)
    plan = model.sharding.plan
    tensors = text_tensors(ckpt)
    held, replicated, total = held_bytes(plan, tensors)
    layers = [0] * ref.args.num_hidden_layers
    for name, t in tensors.items():
        if name.startswith("language_model.model.layers."):
            layers[int(name.split(".")[3])] += t.nbytes
    row = mx.array([max(diffs), resident_bytes(model), held, replicated, total,
                    resident_bytes(ref), max(layers), load_peak], mx.float32)
    rows = mx.distributed.all_gather(row[None], group=group).tolist()
    if group.rank() == 0:
        names = ("max_abs_diff", "resident_bytes", "planned_bytes", "replicated_bytes",
                 "model_bytes", "single_process_bytes", "largest_layer_bytes",
                 "load_peak_bytes")
        with open(out, "w") as f:
            json.dump([dict(zip(names, r)) for r in rows], f)


if __name__ == "__main__":
    main(*sys.argv[1:4])
