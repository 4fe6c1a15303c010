"""Compact K/V and the K/V memory tier at long context: memory, decode step, SSD reads, policies.

On the all-MSA bench model of bench_msa.py (4 layers, M3's attention geometry: 16 query heads per
KV head, head_dim 128, block 128, top-16; float32 on the CPU), at each context:

1. the prompt is prefilled once into a float cache (the activation dtype: float32 here, bf16 on a
   Mac); the 8-bit and 4-bit caches hold the same K/V quantized as the cache quantizes them, and
   the tiered cache is the 8-bit one loaded into a tier of 10% of the K/V (as a saved prompt
   cache loads), so the decode measurements do not pay four prefills;
2. per setting: resident bytes of the context cache (index keys + K/V held in memory, from the
   arrays' sizes and from MLX's active memory), the median decode step over --steps steps, and
   the blocks read from the SSD per step;
3. the selections of --trace-steps decode steps are replayed through every residency policy at
   the same 10% capacity (after a warm-up of a quarter of the steps): miss rates. This model's
   index weights are random, so its selections are too; --policy-model (default: the trained
   tiny M3 in m3mlx/data, when present) replays a trained model's selections over held-out text
   at each of --policy-contexts (its tier at 10% of its K/V; it was trained on 512-token
   windows, so longer contexts lie beyond its training range), per policy: miss rate and blocks
   read per step; --trained runs only this and step 4, with every policy's miss rate;
4. M3 itself at 1M tokens (its real geometry): the context cache per setting, and the decode
   slowdown the tier's SSD reads predict on an M3 Ultra at a stated SSD speed, from the miss rate.

    benchmarks/with_openblas.sh python benchmarks/bench_kv.py                  # 32K and 128K
    benchmarks/with_openblas.sh python benchmarks/bench_kv.py --contexts 32768 --steps 8
    benchmarks/with_openblas.sh python benchmarks/bench_kv.py --trained    # real selections
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

import m3mlx
from m3mlx.cache import LayerCache
from m3mlx.config import ModelArgs
from m3mlx.context_memory import context_cost, tier_read_time
from m3mlx.generate import prefill
from m3mlx.kv_tier import POLICIES, KVTier, TieredKV, simulate, tiers_of
from m3mlx.metal_kernels import cost, quantize_kv

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_msa import build_checkpoint  # noqa: E402 (the same model as bench_msa.py)

# Apple publishes "up to 7.4 GB/s" of SSD read for its MacBook Pro SSDs (2021) and no figure
# for the M3 Ultra Mac Studio; measured reads of recent Macs are about 5.4-5.8 GB/s (Blackmagic,
# an M2 Pro and an M1 Pro MacBook Pro). Both are shown; 100 µs a read is assumed for latency.
SSD = {"Apple's 7.4 GB/s": 7.4e9, "measured 5.4 GB/s": 5.4e9}
SSD_LATENCY = 100e-6
GB = 1e9


def compact_copy(cache, bits):
    """The same K/V as `cache` (float), stored as a kv_bits cache stores them."""
    out = []
    for c in cache:
        state, meta = c.state, c.meta()
        group = 64 if bits == 8 else 32
        k, v = (quantize_kv(state[n], bits, group) for n in ("keys", "values"))
        state = {**{n: a for n, a in state.items() if "index" in n},
                 "keys": k.data, "key_scales": k.scales, "key_biases": k.biases,
                 "values": v.data, "value_scales": v.scales, "value_biases": v.biases}
        out.append(LayerCache.from_state(state, {**meta, "kv_bits": bits,
                                                 "kv_group_size": group}))
    mx.eval([c.arrays for c in out])
    return out


def tiered_copy(cache, model, limit, directory):
    tier = KVTier.for_model(model.args, limit, kv_bits=cache[0].kv_bits, dtype=mx.float32,
                            directory=directory)
    out = [LayerCache.from_state(c.state, c.meta(), tier) for c in cache]
    mx.eval([c.arrays for c in out])
    return out


def resident_bytes(cache) -> int:
    return sum(c.resident_nbytes for c in cache)


def decode(model, cache, steps, rng):
    """Median seconds per decode step, and SSD blocks read per step."""
    tiers = tiers_of(cache)
    vocab = model.args.vocab_size
    mx.eval(model(mx.array([[int(rng.integers(vocab))]]), cache))  # warm-up
    misses = sum(t.stats.misses for t in tiers)
    times = []
    for _ in range(steps):
        token = mx.array([[int(rng.integers(vocab))]])
        start = time.perf_counter()
        mx.eval(model(token, cache))
        times.append(time.perf_counter() - start)
    read = (sum(t.stats.misses for t in tiers) - misses) / steps
    return statistics.median(times), read


def record_traces(model, cache, tokens):
    """Each MSA layer's decode selections ((position, selection [lanes, topk]) per step) while
    `tokens` are decoded one by one into `cache` (a tiered cache)."""
    traces = {}
    real = TieredKV.sparse_attention

    def recording(self, q, selection, offset, scale, block_size):
        if q.shape[2] == 1:
            traces.setdefault(id(self), []).append((offset, np.array(selection)[0]))
        return real(self, q, selection, offset, scale, block_size)

    TieredKV.sparse_attention = recording
    try:
        for t in tokens:
            mx.eval(model(mx.array([[t]]), cache))
    finally:
        TieredKV.sparse_attention = real
    return list(traces.values())


def policy_rates(traces, lanes, capacity, block_size, warmup):
    """Per policy, after the warm-up: the miss rate over the selected history blocks, and the
    blocks read from the SSD per decode step (summed over the traced MSA layers)."""
    rates, reads = {}, {}
    steps = max(len(traces[0]) - warmup, 1) if traces else 1
    for name, policy in POLICIES.items():
        selected = misses = 0
        for trace in traces:
            warm = simulate(trace[:warmup], lanes=lanes, capacity=capacity,
                            block_size=block_size, policy=policy)
            full = simulate(trace, lanes=lanes, capacity=capacity, block_size=block_size,
                            policy=policy)
            selected += full["selected"] - warm["selected"]
            misses += full["misses"] - warm["misses"]
        rates[name] = misses / max(selected, 1)
        reads[name] = misses / steps
    return rates, reads


def bench_context(model, n, args, tmp):
    rng = np.random.default_rng(n)
    ids = mx.array(rng.integers(0, model.args.vocab_size, n))
    base = m3mlx.make_cache(model, index_bits=8)
    start = time.perf_counter()
    prefill(model, ids, base, args.prefill_step)
    print(f"\n{n:,} tokens: prefilled in {time.perf_counter() - start:.0f} s "
          f"({n / (time.perf_counter() - start):.0f} tok/s, float K/V, int8 index keys)",
          flush=True)
    caches = {"float": base, "8-bit": compact_copy(base, 8), "4-bit": compact_copy(base, 4)}
    kv = sum(c.nbytes - sum(a.nbytes for a in c._index_state().values()) for c in caches["8-bit"])
    caches["8-bit, 10% limit"] = tiered_copy(caches["8-bit"], model, kv // 10, tmp)
    index = sum(a.nbytes for c in base for a in c._index_state().values())
    print(f"{'setting':>17} {'context cache MB':>17} {'K/V MB':>8} {'index MB':>9} "
          f"{'decode ms':>10} {'blocks read/step':>17}")
    rows = {}
    for name, cache in caches.items():
        step, read = decode(model, cache, args.steps, rng)
        resident = resident_bytes(cache)
        rows[name] = (resident, step, read)
        print(f"{name:>17} {resident / 1e6:>17.1f} {(resident - index) / 1e6:>8.1f} "
              f"{index / 1e6:>9.1f} {step * 1e3:>10.1f} {read:>17.1f}", flush=True)
    tiered = caches["8-bit, 10% limit"]
    layer = tiered[0].tiered
    tokens = rng.integers(0, model.args.vocab_size, args.trace_steps).tolist()
    traces = record_traces(model, tiered, tokens)
    rates, _ = policy_rates(traces, layer.lanes, layer.capacity, model.args.index_block_size,
                            args.trace_steps // 4)
    print(f"miss rate per policy at 10% ({layer.capacity} blocks per KV head), "
          f"{args.trace_steps} decode steps, random index weights:")
    print("  " + ", ".join(f"{k} {v:.1%}" for k, v in sorted(rates.items(), key=lambda kv: kv[1])))
    return rows, rates


def trained_policy_rates(path, context, steps):
    """Policy miss rates and SSD reads per step over a trained model's decode of held-out text
    (`context` tokens prefilled, then `steps` decoded teacher-forced), the tier at 10% of the
    MSA layers' K/V."""
    model, tokenizer = m3mlx.load(path, dtype=mx.float32)
    text = (Path(path).parent / "python-heldout.txt")
    words = tokenizer.encode(text.read_text() if text.exists() else "def f(x):\n    return x\n"
                             * 20000)[:context + steps]
    cache = m3mlx.make_cache(model, kv_bits=8 if model.args.head_dim % 32 == 0 else None)
    prefill(model, mx.array(words[:context]), cache)
    kv = sum(c.nbytes - sum(a.nbytes for a in c._index_state().values()) for c in cache
             if c.index)
    with tempfile.TemporaryDirectory() as tmp:
        tiered = tiered_copy(cache, model, kv // 10, tmp)
        layer = next(c.tiered for c in tiered if c.tiered is not None)
        traces = record_traces(model, tiered, words[context:context + steps])
        rates, reads = policy_rates(traces, layer.lanes, layer.capacity,
                                    model.args.index_block_size, steps // 4)
    blocks = (context + steps) // model.args.index_block_size
    info = Path(path) / "training.json"
    window = json.loads(info.read_text()).get("length", "?") if info.exists() else "?"
    print(f"\ntrained model {path} (trained on {window}-token windows, so these selections lie "
          f"beyond its training range): {context:,} "
          f"tokens of held-out text, then {steps} decode steps; {len(traces)} MSA layers, "
          f"{layer.lanes} KV heads, ~{blocks} blocks of {model.args.index_block_size} per KV "
          f"head, top-{model.args.index_topk_blocks}; tier at 10% ({layer.capacity} blocks per KV head); "
          f"after a warm-up of {steps // 4} steps:")
    bs = model.args.index_block_size
    distinct, near = [], []
    for trace in traces:
        for lane in range(layer.lanes):
            sel = [(offset, s[lane][s[lane] >= 0]) for offset, s in trace]
            distinct.append(len(np.unique(np.concatenate([s for _, s in sel]))))
            near.append(np.mean(np.concatenate(
                [offset // bs - s < window // bs if window != "?" else s < 0 for offset, s in sel])))
    print(f"  selections: {min(distinct)}-{max(distinct)} distinct blocks per KV head over "
          f"{steps} steps, {min(near):.0%}-{max(near):.0%} of them within the last {window} tokens")
    print(f"  {'policy':>20} {'miss rate':>10} {'blocks read/step':>17}")
    for name, rate in sorted(rates.items(), key=lambda kv: kv[1]):
        print(f"  {name:>20} {rate:>10.1%} {reads[name]:>17.2f}")
    return rates


def format_errors(model_path=None):
    """Relative RMS error of K, V and of attention outputs per storage format: rows quantized
    along head_dim (affine, a scale and bias per group, in bf16 or float16) and the float8/4
    microscaling formats, on M3-shaped synthetic K/V (head_dim 128, channels scaled log-normally,
    as keys with outlier channels are) and, with a model, on its own K/V over text."""
    rng = np.random.default_rng(0)
    chan = np.exp(rng.normal(0, 0.7, 128)).astype(np.float32)
    sets = {"synthetic, head_dim 128": (
        mx.array(rng.standard_normal((4, 4096, 128)).astype(np.float32) * chan),
        mx.array(rng.standard_normal((4, 4096, 128)).astype(np.float32)),
        mx.array(rng.standard_normal((4, 16, 128)).astype(np.float32) * chan))}
    if model_path:
        model, tokenizer = m3mlx.load(model_path, dtype=mx.float32)
        text = Path(model_path).parent / "python-heldout.txt"
        ids = tokenizer.encode(text.read_text()[:40000] if text.exists() else "x = 1\n" * 999)
        cache = m3mlx.make_cache(model, 16)
        model(mx.array([ids[:2048]]), cache)
        c = cache[1]
        k, v = c.keys[0, :, :2048], c.values[0, :, :2048]
        q = mx.array(rng.standard_normal((k.shape[0], 16, k.shape[-1])).astype(np.float32))
        sets[f"{Path(model_path).name} layer 1, 2,048 tokens"] = (k, v, q * k.std())

    def rel(a, b):
        return float(mx.sqrt(((a - b) ** 2).mean() / (b ** 2).mean()))

    def attend(q, k, v):
        return mx.softmax((q @ k.swapaxes(-1, -2)) * k.shape[-1] ** -0.5, axis=-1) @ v

    formats = [("affine", 8, 32, mx.float16), ("affine", 8, 64, mx.float16),
               ("affine", 8, 64, mx.bfloat16), ("affine", 8, 128, mx.float16),
               ("mxfp8", 8, 32, None), ("affine", 4, 32, mx.float16),
               ("affine", 4, 64, mx.float16), ("affine", 4, 128, mx.float16),
               ("mxfp4", 4, 32, None)]
    for name, (k, v, q) in sets.items():
        print(f"\nK/V storage formats, {name} (relative RMS error):")
        ref = attend(q, k, v)
        for mode, bits, group, scale in formats:
            if k.shape[-1] % group:
                continue
            def rt(x):
                x = x.astype(scale or mx.bfloat16)
                parts = mx.quantize(x, group, bits, mode=mode)
                if mode != "affine":
                    parts = (parts[0], parts[1], None)
                return mx.dequantize(*parts, group, bits, mode=mode).astype(mx.float32)
            kd, vd = rt(k), rt(v)
            per_value = bits + (16 * 2 / group if mode == "affine" else 8 / group)
            label = f"{mode} {bits}-bit g{group}" + (
                f", {str(scale).split('.')[-1]} scales" if scale else "")
            print(f"  {label:>36} {per_value:5.2f} bits/value: K {rel(kd, k):.2e} "
                  f"V {rel(vd, v):.2e} attention {rel(attend(q, kd, vd), ref):.2e}")
        bf = attend(q, k.astype(mx.bfloat16).astype(mx.float32),
                    v.astype(mx.bfloat16).astype(mx.float32))
        print(f"  {'bf16 K/V':>36} 16.00 bits/value: attention {rel(bf, ref):.2e}")


def m3_decode_seconds(kv_bits):
    """A decode step of M3 at 1M tokens on an M3 Ultra, from the kernel cost model (MSA with
    int8 index keys, MoE at 4 bits) plus the other bytes a step reads at 80% of 819 GB/s:
    attention projections and dense MLPs at 8 bits (convert's m3 recipe), lm_head at 8 bits,
    and the three dense-attention layers' whole K/V."""
    chip = cost.CHIPS[0]
    args = ModelArgs()
    msa = sum(args.sparse_layers)
    kernels = msa * sum(c.seconds(chip) for c in cost.msa_decode(1 << 20, True, kv_bits))
    kernels += msa * sum(c.seconds(chip) for c in cost.moe_decode(("affine", 4, 64), 1))
    D, Hq, Hk, hd = args.hidden_size, args.num_attention_heads, args.num_key_value_heads, 128
    projections = args.num_hidden_layers * (2 * D * Hq * hd + 2 * D * Hk * hd) * 8.5 / 8
    dense_mlp = (args.num_hidden_layers - msa) * 3 * D * args.dense_intermediate_size * 8.5 / 8
    lm_head = D * args.vocab_size * 8.5 / 8
    dense_kv = context_cost(args, 1 << 20, kv_bits=kv_bits).dense_kv
    other = (projections + dense_mlp + lm_head + dense_kv) / (chip.bandwidth * cost.BANDWIDTH_EFFICIENCY)
    per_layer_projections = (2 * D * Hq * hd + 2 * D * Hk * hd) * 8.5 / 8 / (
        chip.bandwidth * cost.BANDWIDTH_EFFICIENCY)
    return kernels + other, per_layer_projections


def m3_report(miss_rates):
    args = ModelArgs()
    n = 1 << 20
    print(f"\nM3 (60 layers: 3 dense + 57 MSA, 4 KV heads of 128, index keys 128) at {n:,} "
          "tokens, one sequence, bf16 activations:")
    settings = [
        ("bf16 K/V, bf16 index keys", dict(kv_bits=None, index_bits=None)),
        ("bf16 K/V, int8 index keys", dict(kv_bits=None)),
        ("8-bit K/V", dict(kv_bits=8)),
        ("4-bit K/V", dict(kv_bits=4)),
    ]
    kv8 = context_cost(args, n, kv_bits=8).msa_kv
    settings += [("8-bit K/V, 10% limit", dict(kv_bits=8, kv_memory=kv8 // 10)),
                 ("8-bit K/V, kv-memory 4GB", dict(kv_bits=8, kv_memory=4 << 30)),
                 ("4-bit K/V, kv-memory 4GB", dict(kv_bits=4, kv_memory=4 << 30))]
    print(f"{'setting':>27} {'resident GB':>12} {'index GB':>9} {'dense K/V GB':>13} "
          f"{'MSA K/V in memory GB':>21} {'on SSD GB':>10}")
    for name, kw in settings:
        c = context_cost(args, n, **kw)
        print(f"{name:>27} {c.resident / GB:>12.2f} {c.index_keys / GB:>9.2f} "
              f"{c.dense_kv / GB:>13.2f} {c.msa_resident / GB:>21.2f} {c.on_disk / GB:>10.2f}")
    print("\nPredicted decode slowdown from the tier's SSD reads on an M3 Ultra (8-bit K/V; a "
          "layer's reads overlap its projections):")
    step, overlap = m3_decode_seconds(8)
    print(f"  decode step without reads (cost model, 1M tokens): {step * 1e3:.1f} ms; "
          f"a layer's projections: {overlap * 1e6:.0f} µs")
    for source, rate in miss_rates.items():
        for ssd, bandwidth in SSD.items():
            r = tier_read_time(args, rate, kv_bits=8, ssd_bandwidth=bandwidth,
                               ssd_latency=SSD_LATENCY, overlap=overlap)
            print(f"  miss rate {rate:.1%} ({source}), SSD {ssd}: {r['blocks']:.0f} blocks, "
                  f"{r['bytes'] / 1e6:.1f} MB a step, {r['seconds'] * 1e3:.2f} ms: "
                  f"{r['seconds'] / step:+.1%}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--contexts", default="32768,131072")
    p.add_argument("--steps", type=int, default=8, help="decode steps timed per setting")
    p.add_argument("--trace-steps", type=int, default=128,
                   help="decode steps whose selections are replayed through the policies")
    p.add_argument("--prefill-step", type=int, default=2048)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--kv-heads", type=int, default=1)
    default_policy_model = Path(m3mlx.__file__).parent / "data" / "tiny-m3"
    p.add_argument("--policy-model", default=str(default_policy_model),
                   help="a trained model for policy miss rates over real text (skipped when "
                        "absent)")
    p.add_argument("--policy-contexts", default="4096,16384",
                   help="held-out tokens prefilled before the trained model's traced decode")
    p.add_argument("--policy-steps", type=int, default=512)
    p.add_argument("--formats", action="store_true",
                   help="only measure the error of each K/V storage format, and exit")
    p.add_argument("--trained", action="store_true",
                   help="only the policies on the trained model's selections (--policy-model), "
                        "and M3's predicted slowdown from each policy's miss rate")
    args = p.parse_args()
    if args.formats:
        format_errors(args.policy_model if Path(args.policy_model).is_dir() else None)
        return
    args.dense_layers = 0
    rates = {}
    if not args.trained:
        with tempfile.TemporaryDirectory() as tmp:
            model = m3mlx.load_model(build_checkpoint(tmp, args), dtype=mx.float32)
            print(f"model: {args.layers} MSA layers, hidden {args.hidden}, {16 * args.kv_heads} "
                  f"q heads / {args.kv_heads} KV heads of 128, block 128 top-16, float32, CPU")
            for n in [int(c) for c in args.contexts.split(",")]:
                _, random_rates = bench_context(model, n, args, tmp)
                rates[f"random index weights, {n // 1024}K, sinks-recent-lru"] = random_rates[
                    "sinks-recent-lru"]
    if Path(args.policy_model).is_dir():
        for n in [int(c) for c in args.policy_contexts.split(",")]:
            trained = trained_policy_rates(args.policy_model, n, args.policy_steps)
            for name, rate in (trained.items() if args.trained
                               else [("sinks-recent-lru", trained["sinks-recent-lru"])]):
                rates[f"trained tiny M3, {n:,} tokens, {name}"] = rate
    elif args.trained:
        sys.exit(f"--trained: no model at {args.policy_model}")
    m3_report(rates)


if __name__ == "__main__":
    main()
