"""One rank of the K/V tier tests across ranks (tests/test_distributed_kv.py starts it with
mlx.launch).

For each plan (tensor, then pipeline) the rank loads its part of MODEL and runs a prompt long
enough for sparse block selection through it with a K/V tier of LIMIT bytes (this rank's
limit), in chunked prefill and greedy decode steps; then the whole model in-process, untiered,
runs the same tokens (the single-process reference). Each rank reports, per plan: the largest
logit difference, its tier's counts (blocks written to the file, read back), the most its K/V
pools held (the tier's count) and what MLX measured the tiered cache to hold beyond its index
keys and dense layers' K/V; rank 0 writes every rank's rows to OUT.
"""

import gc
import json
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

from m3mlx.generate import prefill
from m3mlx.kv_tier import tiers_of
from m3mlx.loading import load_model
from m3mlx.model import make_cache
from m3mlx.rank_loading import load_rank

PROMPT = 320  # tokens: 20 blocks of 16, past the 4-block dense window, more than a pool holds
CHUNK = 64
DECODE = 4


def run(model, ids, cache) -> list:
    """The logits of the chunked prefill and of DECODE greedy steps after it (numpy)."""
    logits = prefill(model, ids, cache, CHUNK)
    out = [np.array(logits)]
    for _ in range(DECODE):
        token = mx.argmax(logits).reshape(1, 1)
        logits = model(token, cache=cache)[0, -1]
        out.append(np.array(logits))
    return out


def held() -> int:
    gc.collect()
    mx.clear_cache()
    return mx.get_active_memory()


def main(model_dir: str, limit: str, kv_dir: str, out: str):
    group = mx.distributed.init(strict=True)
    ref = load_model(model_dir)
    ids = mx.array(np.random.default_rng(0).integers(0, ref.args.vocab_size, PROMPT))
    want = run(ref, ids, make_cache(ref))
    rows = []
    for kind in ("tensor", "pipeline"):
        model, _ = load_rank(model_dir, kind, group)
        base = held()
        cache = make_cache(model, kv_memory=int(limit), kv_cache_dir=kv_dir)
        got = run(model, ids, cache)
        tier = tiers_of(cache)[0]
        # What MLX holds for the cache, less what the tier never holds (index keys, the dense
        # layers' K/V): the K/V pools, measured.
        measured = held() - base - (sum(c.resident_nbytes for c in cache)
                                    - tier.resident_nbytes)
        s = tier.stats
        diff = max(float(np.abs(g - w).max()) for g, w in zip(got, want))
        rows.append([diff, s.written, s.misses, s.hits, s.peak_resident, measured,
                     tier.layers, tier.heads,
                     tier.directory == Path(kv_dir) / f"rank-{group.rank()}"])
        del cache, tier, model
    gathered = mx.distributed.all_gather(mx.array(rows, mx.float32)[None], group=group).tolist()
    if group.rank() == 0:
        names = ("max_abs_diff", "written", "misses", "hits", "peak_resident",
                 "measured_resident", "tier_layers", "tier_heads", "own_directory")
        with open(out, "w") as f:
            json.dump([[dict(zip(names, plan)) for plan in rank] for rank in gathered], f)


if __name__ == "__main__":
    main(*sys.argv[1:5])
