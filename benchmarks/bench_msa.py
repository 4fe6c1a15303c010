"""m3mlx vs mlx-lm's `minimax_m3_vl` at long context: decode step, prefill throughput, peak memory.

Both run the same random M3-shaped checkpoint (real MSA geometry: block 128, top-16, head_dim 128,
16 query heads per KV head) in the same process, float32, one after the other at each context.
Prefill is the whole prompt in chunks of --prefill-step tokens (tok/s over the whole prompt, and
of its last chunk, i.e. at full depth); decode is the median of --steps single-token steps after
a warm-up step, on the cache that prefill left. These machines are
noisy: read the ratios, not the absolute times.

    python benchmarks/bench_msa.py                       # all-MSA 4-layer model, 2K..32K
    python benchmarks/bench_msa.py --dense-layers 3 --layers 20 --contexts 2048,8192
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

import m3mlx
from m3mlx.demo import write_demo_checkpoint


def build_checkpoint(directory, args):
    n, dense = args.layers, args.dense_layers
    return write_demo_checkpoint(
        directory, dtype=mx.float32, seed=0, hidden_size=args.hidden,
        num_hidden_layers=n, num_attention_heads=16 * args.kv_heads,
        num_key_value_heads=args.kv_heads, head_dim=128, rotary_dim=64,
        index_n_heads=args.kv_heads, index_head_dim=128, index_block_size=128,
        index_topk_blocks=16, intermediate_size=args.hidden, shared_intermediate_size=args.hidden,
        dense_intermediate_size=2 * args.hidden, num_local_experts=8, num_experts_per_tok=2,
        sparse_layers=[i >= dense for i in range(n)], moe_layers=[i >= dense for i in range(n)],
    )


class Runner:
    """Prefill and decode through one implementation's own model and cache."""

    def __init__(self, name, model, make_cache):
        self.name, self.model, self.make_cache = name, model, make_cache

    def prefill(self, ids, step):
        cache = self.make_cache()
        mx.eval(self.model.parameters())
        mx.clear_cache()
        mx.reset_peak_memory()
        start = time.perf_counter()
        for s in range(0, ids.shape[1], step):
            chunk_start = time.perf_counter()
            logits = self.model(ids[:, s : s + step], cache=cache)
            mx.eval(logits, cache_arrays(cache))
            last_chunk = (min(step, ids.shape[1] - s), time.perf_counter() - chunk_start)
        elapsed = time.perf_counter() - start
        at_depth = last_chunk[0] / last_chunk[1]
        return cache, ids.shape[1] / elapsed, at_depth, mx.get_peak_memory()

    def decode(self, cache, steps):
        token = mx.array([[1]])
        mx.eval(self.model(token, cache=cache))  # warm-up
        times = []
        mx.reset_peak_memory()
        for _ in range(steps):
            start = time.perf_counter()
            mx.eval(self.model(token, cache=cache))
            times.append(time.perf_counter() - start)
        return statistics.median(times), mx.get_peak_memory()


def cache_arrays(cache):
    out = []
    for c in cache:
        if isinstance(c, m3mlx.LayerCache):
            out.extend(c.state.values())
        else:  # mlx-lm CacheList
            out.extend(a for sub in c.caches for a in (sub.keys, sub.values) if a is not None)
    return out


def runners(path):
    from mlx_lm.utils import load_model

    ours = m3mlx.load_model(path, dtype=mx.float32)
    ref, _ = load_model(Path(path))
    ref.set_dtype(mx.float32)
    # Index keys as mlx-lm keeps them (the activation dtype), for a like-for-like comparison.
    return [Runner("m3mlx", ours, lambda: m3mlx.make_cache(ours, index_bits=16)),
            Runner("mlx-lm", ref, ref.make_cache)]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--contexts", default="2048,4096,8192,16384,32768")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--dense-layers", type=int, default=0, help="leading dense-attention layers")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--kv-heads", type=int, default=1)
    p.add_argument("--steps", type=int, default=5, help="decode steps per context (median)")
    p.add_argument("--prefill-step", type=int, default=2048)
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        impls = runners(build_checkpoint(tmp, args))
        vocab = impls[0].model.args.vocab_size
        print(f"model: {args.layers} layers ({args.dense_layers} dense attention), hidden "
              f"{args.hidden}, {16 * args.kv_heads} q heads / {args.kv_heads} KV heads of 128, "
              "MSA block 128 top-16, float32, CPU")
        print(f"{'context':>8} {'impl':>7} {'decode ms':>10} {'prefill tok/s':>14} "
              f"{'last chunk tok/s':>17} {'prefill peak MB':>16} {'decode peak MB':>15}")
        rows = {}
        for n in [int(c) for c in args.contexts.split(",")]:
            ids = mx.array(np.random.default_rng(n).integers(0, vocab, (1, n)))
            for impl in impls:
                cache, prefill_tps, at_depth, prefill_peak = impl.prefill(ids, args.prefill_step)
                step, decode_peak = impl.decode(cache, args.steps)
                rows[(n, impl.name)] = (step, prefill_tps, at_depth)
                print(f"{n:>8} {impl.name:>7} {step * 1e3:>10.1f} {prefill_tps:>14.1f} "
                      f"{at_depth:>17.1f} {prefill_peak / 1e6:>16.1f} {decode_peak / 1e6:>15.1f}",
                      flush=True)
                del cache
                mx.clear_cache()
            ours, ref = rows[(n, "m3mlx")], rows[(n, "mlx-lm")]
            print(f"{n:>8}   ratio  decode {ref[0] / ours[0]:.2f}x faster, "
                  f"prefill {ours[1] / ref[1]:.2f}x faster (last chunk {ours[2] / ref[2]:.2f}x)",
                  flush=True)
        sizes = sorted({n for n, _ in rows})
        if len(sizes) > 1:
            lo, hi = sizes[0], sizes[-1]
            growth = {name: rows[(hi, name)][0] - rows[(lo, name)][0] for _, name in rows}
            print(f"decode-step growth {lo}->{hi}: m3mlx {growth['m3mlx'] * 1e3:.1f} ms, "
                  f"mlx-lm {growth['mlx-lm'] * 1e3:.1f} ms "
                  f"(ratio {growth['m3mlx'] / growth['mlx-lm']:.3f})")


if __name__ == "__main__":
    main()
