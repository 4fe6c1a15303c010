"""One rank of the sharded expert-streaming tests (tests/test_distributed_experts.py starts it
with mlx.launch).

Each rank loads its part of MODEL under the plan KIND with its routed experts streamed through
an expert cache of CACHE (m3mlx.rank_loading + m3mlx.experts), and the whole model resident in
process (the reference); runs the chunked prefill generation uses and greedy decode steps
through both, and writes OUT.<rank>.json: the largest logit difference, the bytes its model
holds and those the plan gives it besides the routed experts, the tier's pools and statistics,
and each layer's pinned experts.
"""

import json
import sys
from dataclasses import asdict

import mlx.core as mx
import numpy as np

from m3mlx.checkpoint import Checkpoint
from m3mlx.experts import is_routed_expert
from m3mlx.generate import prefill
from m3mlx.loading import load_model
from m3mlx.model import make_cache
from m3mlx.rank_loading import held_bytes, load_rank, resident_bytes, text_tensors

PROMPT = 100  # tokens: past MSA's dense window, so the sparse layers select blocks
CHUNK = 48  # a prefill in chunks, each many tokens over few slots: the layers run in passes
DECODE = 6


def main(model_dir: str, kind: str, cache: str, policy: str, out: str):
    group = mx.distributed.init(strict=True)
    model, _ = load_rank(model_dir, kind, group, expert_cache=cache, expert_policy=policy)
    ref = load_model(model_dir)
    ids = mx.array(np.random.default_rng(0).integers(0, ref.args.vocab_size, PROMPT))

    cache_, cache_ref = make_cache(model), make_cache(ref)
    logits = prefill(model, ids, cache_, CHUNK)
    logits_ref = prefill(ref, ids, cache_ref, CHUNK)
    diffs = [mx.abs(logits - logits_ref).max().item()]
    for _ in range(DECODE):
        token = mx.argmax(logits_ref).reshape(1, 1)
        logits = model(token, cache=cache_)[0, -1]
        logits_ref = ref(token, cache=cache_ref)[0, -1]
        diffs.append(mx.abs(logits - logits_ref).max().item())

    tier = model.expert_tier
    plan = model.sharding.plan
    others = {n: t for n, t in text_tensors(Checkpoint.open(model_dir)).items()
              if not is_routed_expert(n)}
    layers = [{"module": layer.layout.module, "first": layer.first, "held": layer.experts,
               "slots": layer.slots, "expert_bytes": layer.layout.expert_bytes,
               "pool_bytes": layer.nbytes,
               "pinned": sorted(int(layer.first + e) for e in layer.holds[layer.pinned])}
              for layer in tier.layers]
    report = {"max_abs_diff": max(diffs), "resident_bytes": resident_bytes(model),
              "planned_other_bytes": held_bytes(plan, others)[0], "tier_bytes": tier.nbytes,
              "stats": asdict(tier.stats), "layers": layers}
    with open(f"{out}.{group.rank()}.json", "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main(*sys.argv[1:6])
