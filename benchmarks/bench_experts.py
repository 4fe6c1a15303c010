"""Routed experts streamed from disk through the expert cache: hit rate, bytes read and syncs per
token, and decode speed, by cache size and policy; then M3 at 4 bits predicted on Macs.

1. Hit rates (--trained PATH: a trained model, original or converted; without it, the demo
   architecture with random weights, which says little about a real model). Teacher-forced
   decode, one token at a time, of Python source from this interpreter's standard library after
   a prompt of --prompt tokens; `pinned` is calibrated on other source files first.
2. Speed on a model whose routed experts total --gb GB (the demo architecture widened, random
   weights, bf16 experts), built in a temporary directory: resident; streamed with O_DIRECT reads
   (every miss reads the disk: the model larger than memory); streamed with buffered reads
   through the OS page cache, which holds the whole file after the first pass here (what an mmap
   of the weights gets while the files fit in RAM; MLX has no file-backed arrays to mmap).
3. M3 at 4 bits (recipe m3, sizes from its config) on the 128 GB and 64 GB Macs of
   m3mlx/hardware.py: the budget's cache share, the hit rate from part 1's LRU curve at that
   share, and the predicted decode tok/s.

    benchmarks/with_openblas.sh python benchmarks/bench_experts.py --trained DIR
"""

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from m3mlx import make_cache
from m3mlx.checkpoint import Checkpoint
from m3mlx.config import ModelArgs
from m3mlx.convert import convert
from m3mlx.convert.plan import config_footprint
from m3mlx.convert.recipes import base_spec
from m3mlx.demo import write_demo_checkpoint
from m3mlx.experts import USAGE_FILE, ExpertCache, routed_experts, write_usage
from m3mlx.generate import prefill
from m3mlx.hardware import MACS, usable_memory
from m3mlx.loading import model_from_checkpoint
from m3mlx.plan import LRU_CURVE, cache_slots, curve_at, footprint, plan_budget, predict
from m3mlx.tokenizer import Tokenizer
from m3mlx.units import Fraction, format_size

CALIBRATION_FILES = ("string.py", "bisect.py", "heapq.py", "functools.py")
EVAL_FILES = ("textwrap.py", "shlex.py", "fractions.py")


def stdlib_text(names) -> str:
    root = Path(os.__file__).parent
    return "".join((root / n).read_text("utf-8") for n in names if (root / n).is_file())


def converted(source: Path, out: Path, roles=None) -> Path:
    """`source` itself when converted already, else its conversion in `out`."""
    ckpt = Checkpoint.open(source)
    if routed_experts(ckpt):
        return source
    convert(source, out, roles=roles, progress=False, log=lambda s: None)
    return out


def open_streamed(path: Path, share, policy: str, *, direct=False, prefetch=True):
    ckpt = Checkpoint.open(path)
    experts = None
    if share is not None:
        slots = cache_slots(footprint(ckpt, mx.float32), share)
        usage = path / USAGE_FILE
        experts = ExpertCache(slots, policy, prefetch, direct=direct,
                              usage_file=usage if usage.is_file() else None)
    return model_from_checkpoint(ckpt, dtype=mx.float32, experts=experts)


def decode(model, ids, prompt: int):
    """Prefill ids[:prompt], then feed the rest one token at a time (the decode path); returns
    (tok/s, the tier's statistics over the decode)."""
    cache = make_cache(model)
    prefill(model, mx.array(ids[:prompt]), cache)
    tier = getattr(model, "expert_tier", None)
    before = tier.stats.copy() if tier else None
    start = time.perf_counter()
    for t in ids[prompt:]:
        mx.eval(model(mx.array([[t]]), cache=cache))
    seconds = time.perf_counter() - start
    return (len(ids) - prompt) / seconds, (tier.stats - before if tier else None)


def row(label, tps, s):
    if s is None:
        return f"  {label:<32}{tps:>8.1f}   (everything resident, 1 sync/token)"
    return (f"  {label:<32}{tps:>8.1f}{100 * s.hit_rate:>9.1f}%{format_size(s.bytes_per_token):>12}"
            f"{s.read_throughput / 1e9:>9.2f}{1e3 * s.wait_seconds / max(1, s.tokens):>8.1f}"
            f"{s.syncs_per_token + 1:>8.1f}"
            f"{s.prefetch_used / max(1, s.tokens):>9.2f}/{s.prefetched / max(1, s.tokens):.2f}")


# read/token: bytes read from disk per token; GB/s: while reading; wait ms: per token, waiting
# for reads; syncs: GPU->CPU syncs per token (the tier's and the sampled token's); ahead: experts
# read ahead per token that were used / all read ahead.
HEADER = (f"  {'':<32}{'tok/s':>8}{'hits':>10}{'read/token':>12}{'GB/s':>9}{'wait ms':>8}"
          f"{'syncs':>8}"
          f"{'ahead used/read':>17}")


def calibrate(model_dir: Path, ids) -> None:
    """The pinned policy's counts (as `m3mlx calibrate-experts`), through a cache of all."""
    model = open_streamed(model_dir, Fraction(1.0), "lru")
    prefill(model, mx.array(ids), make_cache(model))
    write_usage(model_dir, model.expert_tier.usage(), len(ids))


def hit_rates(args, tmp: Path):
    if args.trained:
        model_dir = converted(Path(args.trained), tmp / "trained")
        what = f"trained model {args.trained}"
    else:
        src = write_demo_checkpoint(tmp / "random-hf", dtype=mx.float32, num_local_experts=32,
                                    num_experts_per_tok=4)
        model_dir = converted(src, tmp / "random")
        what = "demo architecture, 32 experts, RANDOM weights (no trained model given)"
    tok = Tokenizer.from_dir(model_dir)
    ids = tok.encode(stdlib_text(EVAL_FILES))[: args.prompt + args.tokens]
    calibration = tok.encode(stdlib_text(CALIBRATION_FILES))[: args.calibration]
    # Calibrate (the pinned policy's counts) on other files, through a cache of every expert.
    copy = tmp / "calibrated"
    shutil.copytree(model_dir, copy, dirs_exist_ok=True)
    calibrate(copy, calibration)
    args_ = Checkpoint.open(copy).args
    print(f"\n1. hit rates: {what}; {args_.num_local_experts} experts, top "
          f"{args_.num_experts_per_tok}, {sum(args_.moe_layers)} MoE layers; teacher-forced decode "
          f"of {len(ids) - args.prompt} tokens of {', '.join(EVAL_FILES)} after a "
          f"{args.prompt}-token prompt; pinned calibrated on {len(calibration)} tokens of "
          f"{', '.join(CALIBRATION_FILES)}")
    print(HEADER)
    curve = {}
    for share in args.shares:
        for policy in args.policies:
            model = open_streamed(copy, Fraction(share / 100), policy)
            tps, s = decode(model, ids, args.prompt)
            slots = model.expert_tier.slots
            print(row(f"{share:>3}% ({slots} slots) {policy}", tps, s))
            if policy == "lru":
                layer = model.expert_tier.layers[0]
                active = args_.num_experts_per_tok * len(model.expert_tier.layers)
                curve[layer.slots / layer.experts] = (
                    s.hit_rate, s.bytes_per_token / (active * layer.layout.expert_bytes))
    return curve


def speed(args, tmp: Path):
    H = F = args.width
    E, K = args.experts, 4
    per_layer = E * 3 * H * F * 2  # bf16 experts
    moe = max(1, math.ceil(args.gb * 2**30 / per_layer))
    layers = moe + 1
    src = write_demo_checkpoint(
        tmp / "wide-hf", dtype=mx.bfloat16, hidden_size=H, intermediate_size=F,
        num_local_experts=E, num_experts_per_tok=K, num_hidden_layers=layers,
        moe_layers=[False] + [True] * moe, sparse_layers=[False] + [True] * moe)
    model_dir = converted(src, tmp / "wide", roles={"experts": "bf16"})
    shutil.rmtree(src)
    fp = footprint(Checkpoint.open(model_dir), mx.float32)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 400, args.prompt + args.speed_tokens).tolist()
    calibrate(model_dir, rng.integers(0, 400, args.calibration // 4).tolist())
    print(f"\n2. speed: {layers} layers ({moe} MoE) x {E} experts of {format_size(fp.expert)} "
          f"(hidden {H}, intermediate {F}, bf16): {format_size(fp.experts_total)} of routed "
          f"experts, {format_size(fp.resident)} else; {args.speed_tokens} decode tokens after "
          f"{args.prompt}, random ids, float32 compute")
    print(HEADER)
    tps, _ = decode(open_streamed(model_dir, None, "lru"), ids, args.prompt)
    print(row("resident", tps, None))
    for direct in (True, False):
        for share in args.shares:
            for policy in (args.policies if direct else ("lru",)):
                model = open_streamed(model_dir, Fraction(share / 100), policy, direct=direct)
                tps, s = decode(model, ids, args.prompt)
                label = f"{share:>3}% {policy} {'O_DIRECT' if direct else 'page cache'}"
                print(row(label, tps, s))
    model = open_streamed(model_dir, Fraction(0.25), "lru", direct=True, prefetch=False)
    tps, s = decode(model, ids, args.prompt)
    print(row(" 25% lru O_DIRECT, no prefetch", tps, s))
    # Again at the end: on a shared machine the load changes during the run.
    tps, _ = decode(open_streamed(model_dir, None, "lru"), ids, args.prompt)
    print(row("resident (again)", tps, None))


def m3(curve, context: int):
    if curve is None:
        points, where = LRU_CURVE, "m3mlx.plan.LRU_CURVE (measured before)"
    else:
        points = sorted({0.0: (0.0, 1.0), 1.0: (1.0, 0.0), **curve}.items())
        points = tuple((k, round(h, 3), round(r, 3)) for k, (h, r) in points)
        where = "part 1"
    print(f"\n3. M3 (recipe m3) on Macs; K/V at {context:,} tokens; hit rate and SSD reads from "
          f"the LRU curve at the budget's cache share. LRU curve from {where} (cache share, "
          f"hit rate, experts read per active expert):\n  {points}")
    print(f"  {'experts':<9}{'Mac':<30}{'budget':>10}{'cache':>8}{'hits':>7}{'SSD/token':>11}"
          f"{'tok/s':>7}{'overlapped':>12}")
    for bits in (4, 3):
        fp = config_footprint(ModelArgs(), "m3", base_spec("affine", bits, None))
        for mac in MACS:
            budget = plan_budget(fp, usable_memory(mac), context)
            rate, reads = curve_at(budget.share, points)
            p = predict(fp, budget, rate, mac, read_share=reads)
            print(f"  {f'{bits}-bit':<9}{mac.name:<30}{format_size(budget.memory):>10}"
                  f"{100 * budget.share:>7.1f}%{100 * rate:>6.1f}%{format_size(p.miss_bytes):>11}"
                  f"{p.tokens_per_second:>7.2f}{p.overlapped:>12.2f}")
        print(f"  {'':<9}({format_size(fp.total)}: {format_size(fp.resident)} resident, "
              f"{fp.moe_layers} MoE layers x {fp.experts} experts of {format_size(fp.expert)})")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trained", default=None, help="a trained model directory for part 1")
    ap.add_argument("--shares", default="10,25,50,75,100", help="cache sizes, percent")
    ap.add_argument("--policies", default="lru,lfu,pinned")
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens before the decode")
    ap.add_argument("--tokens", type=int, default=512, help="decode tokens of part 1")
    ap.add_argument("--calibration", type=int, default=4096, help="calibration tokens")
    ap.add_argument("--gb", type=float, default=1.0, help="routed experts of part 2, GiB")
    ap.add_argument("--width", type=int, default=512, help="hidden = intermediate size, part 2")
    ap.add_argument("--experts", type=int, default=64, help="experts per layer, part 2")
    ap.add_argument("--speed-tokens", type=int, default=32, help="decode tokens of part 2")
    ap.add_argument("--context", type=int, default=32768, help="context of part 3's plan")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--skip-hit-rates", action="store_true",
                    help="part 3 from m3mlx.plan.LRU_CURVE instead of part 1")
    ap.add_argument("--dir", default=None, help="where to build the models [a temp dir]")
    args = ap.parse_args()
    args.shares = [int(s) for s in args.shares.split(",")]
    args.policies = args.policies.split(",")
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench-experts-") as tmp:
        curve = None if args.skip_hit_rates else hit_rates(args, Path(tmp))
        if not args.skip_speed:
            speed(args, Path(tmp))
        m3(curve, args.context)


if __name__ == "__main__":
    sys.exit(main())
