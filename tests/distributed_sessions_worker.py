"""One rank of the sharded prompt-cache tests (tests/test_distributed_sessions.py starts it with
mlx.launch).

`save DIR`: under each plan, this rank's part of MODEL prefills a prompt, saves the cache
(save_prompt_cache), loads it back (load_prompt_cache) and generates from it; the logits and
m3mlx.generate's greedy text are compared with the single-process model's doing the same
without saving. Then what must be
refused: a save loaded under the other plan, a set with a part missing or from another save,
a single process's save, and a save that fails on one rank (the previous save at that path
stays whole). Rank 0 writes
the figures and messages to DIR/report.json.

`load DIR`: load DIR/tensor.safetensors (saved by 2 ranks) on this run's ranks; rank 0 writes
the message to DIR/report-N.json.
"""

import json
import os
import shutil
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

from m3mlx.cache import LayerCache, load_prompt_cache, save_prompt_cache
from m3mlx.checks import InputError
from m3mlx.generate import generate, prefill
from m3mlx.loading import load
from m3mlx.model import make_cache
from m3mlx.rank_loading import load_rank
from m3mlx.shard_cache import part_path
from m3mlx.sharding import PLANS

PROMPT = 100  # tokens: past MSA's 4 x 16 dense window, so the sparse layers select blocks
CHUNK = 48
DECODE = 4
CONTINUATION = " and so the ranks"


def refusal(load) -> str:
    """The message of the InputError `load()` raises (every rank raises the same one)."""
    try:
        load()
    except InputError as e:
        return str(e)
    raise AssertionError("loaded what had to be refused")


def generated_logits(model, cache, token):
    """The logits of `token` and of DECODE greedy steps after it, from `cache`."""
    out = []
    for _ in range(DECODE + 1):
        logits = model(token, cache=cache)[0, -1]
        mx.eval(logits)  # a step at a time, as generation runs (the ranks meet in each)
        out.append(logits)
        token = mx.argmax(logits).reshape(1, 1)
    return mx.stack(out)


def save_and_load(model_dir: str, out: Path):
    group = mx.distributed.init(strict=True)
    ref, tokenizer = load(model_dir)
    ids = mx.array(np.random.default_rng(0).integers(0, ref.args.vocab_size, PROMPT))
    first = mx.array([[7]])
    cache_ref = make_cache(ref)
    prefill(ref, ids, cache_ref, CHUNK)
    saved_ref = [LayerCache.from_state(c.state, c.meta()) for c in cache_ref]
    expected = generated_logits(ref, cache_ref, first)

    report = {"max_abs_diff": {}, "offsets": {}, "generated": {},
              "single_process": generate(ref, tokenizer, CONTINUATION, max_tokens=8,
                                         prompt_cache=saved_ref)}
    models = {kind: load_rank(model_dir, kind, group)[0] for kind in PLANS}
    for kind, model in models.items():
        cache = make_cache(model)
        prefill(model, ids, cache, CHUNK)
        save_prompt_cache(str(out / f"{kind}.safetensors"), cache, {"plan": kind}, model=model)
        loaded, meta = load_prompt_cache(str(out / f"{kind}.safetensors"), True, model=model)
        assert meta == {"plan": kind}, meta
        logits = generated_logits(model, loaded, first)
        report["max_abs_diff"][kind] = mx.abs(logits - expected).max().item()
        report["offsets"][kind] = loaded[0].offset
        again = load_prompt_cache(str(out / f"{kind}.safetensors"), model=model)
        report["generated"][kind] = generate(model, tokenizer, CONTINUATION,
                                             max_tokens=8, prompt_cache=again)

    tensor, pipeline = models["tensor"], models["pipeline"]
    rank, size = group.rank(), group.size()
    report["other_plan"] = refusal(
        lambda: load_prompt_cache(str(out / "tensor.safetensors"), model=pipeline))

    def fresh(name: str, note: str) -> str:
        cache = make_cache(tensor)
        prefill(tensor, ids[:40], cache, CHUNK)
        save_prompt_cache(str(out / name), cache, {"note": note}, model=tensor)
        return str(out / name)

    missing = fresh("missing.safetensors", "")
    if rank == 1:
        part_path(missing, 1, size).unlink()
    report["missing_part"] = refusal(lambda: load_prompt_cache(missing, model=tensor))

    one, two = fresh("one.safetensors", "one"), fresh("two.safetensors", "two")
    if rank == 1:  # one's set, with rank 1's part from the other save
        shutil.copyfile(part_path(two, 1, size), part_path(one, 1, size))
    report["mixed_saves"] = refusal(lambda: load_prompt_cache(one, model=tensor))

    kept = fresh("kept.safetensors", "first")
    if rank == 1:  # rank 1 cannot write its part of the next save
        os.mkdir(str(part_path(kept, 1, size)) + ".partial")
    report["failed_save"] = refusal(lambda: fresh("kept.safetensors", "second"))
    _, meta = load_prompt_cache(kept, True, model=tensor)
    report["after_failed_save"] = meta["note"]
    report["leftovers"] = sorted(p.name for p in out.glob("kept*") if p.is_file())

    single = str(out / "single.safetensors")
    if rank == 0:  # rank 0 saves the single-process model's cache; every rank loads it
        save_prompt_cache(single, saved_ref, model=ref)
    mx.eval(mx.distributed.all_sum(mx.zeros((1,)), group=group))
    report["single_process_save"] = refusal(lambda: load_prompt_cache(single, model=tensor))

    if rank == 0:
        (out / "report.json").write_text(json.dumps(report))


def load_elsewhere(model_dir: str, out: Path):
    group = mx.distributed.init(strict=True)
    model, _ = load_rank(model_dir, "tensor", group)
    message = refusal(lambda: load_prompt_cache(str(out / "tensor.safetensors"), model=model))
    if group.rank() == 0:
        (out / f"report-{group.size()}.json").write_text(json.dumps(message))


if __name__ == "__main__":
    {"save": save_and_load, "load": load_elsewhere}[sys.argv[1]](sys.argv[2], Path(sys.argv[3]))
