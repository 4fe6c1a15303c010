"""Sharded runs over mx.distributed: 2 ranks over the ring backend against one process.

On a small M3-shaped model (float32 on the CPU; 4 KV heads, 8 experts, top-2), for one process
and for each plan (tensor, pipeline) on --ranks local ranks started with mlx.launch:

1. prefill throughput (--prompt tokens in chunks of --prefill-step) and the median decode step
   over --steps steps;
2. the collectives per decode token and per layer, counted as the model builds its graph
   (every mx.distributed call of one decode step and of one layer), and the bytes they carry:
   the payload, and what one rank puts on the wire (a ring all-reduce sends 2(N-1)/N of its
   array, an all-gather (N-1) parts, a send its array);
3. the latency of one small all-reduce on this ring;
4. from those counts and M3's real shapes (m3mlx.layout), the predicted decode tok/s of M3 on 2
   and 4 Macs over Thunderbolt 5 (JACCL, and the ring over Thunderbolt IP), with the link
   figures assumed stated below, next to the published figures for other big MoEs.

With --kv-memory SIZE every process runs with a K/V tier of SIZE (each rank's own limit, as
the CLI's option): the decode times then include the blocks read back, and the blocks per
token and the pools' peak are shown.

    benchmarks/with_openblas.sh python benchmarks/bench_distributed.py
    benchmarks/with_openblas.sh python benchmarks/bench_distributed.py --hidden 512 --steps 64
    benchmarks/with_openblas.sh python benchmarks/bench_distributed.py --kv-memory 1MB
"""

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import mlx.core as mx
import numpy as np

# Thunderbolt 5 links, as assumed here. JACCL (RDMA): "single digit microsecond latency"
# (exo's Alex Cheema, 2026-03) and "under 50 us" against ~300 us over TCP (coverage of Apple's
# TN3205, 2026-03-19); about 7.5 GB/s per link (7.6 GB/s measured by PyTorch's TCCL over TB5
# RDMA, pytorch/pytorch#189856; 7.4 GB/s in a JACCL cluster report). The ring over Thunderbolt
# IP: ~300 us a hop (TN3205 coverage) and 3 GB/s. A collective is charged one latency per hop
# of its ring (N-1 for an all-reduce's two phases taken as one pipelined pass: 2(N-1) hops).
LINKS = {
    "JACCL, TB5 RDMA (10 us, 7.5 GB/s)": (10e-6, 7.5e9),
    "JACCL, TB5 RDMA (50 us, 7.5 GB/s)": (50e-6, 7.5e9),
    "ring, TCP over TB5 (300 us, 3 GB/s)": (300e-6, 3e9),
}
# Chips (Apple's memory bandwidth) and the share of it decode reaches: 55% is DeepSeek-R1
# Q4_K_M at 20.2 tok/s on an M3 Ultra (docs: landscape.md).
CHIPS = {"M3 Ultra 512GB": (819e9, 512e9), "M4 Max 128GB": (546e9, 128e9)}
EFFICIENCY = 0.55
BITS = 4.5  # affine 4-bit, group 64: 4 bits plus a 16-bit scale and bias per 64 weights
PUBLISHED = [
    "GLM-5 (754B), 2x M3 Ultra: 0.2-0.3 tok/s pipelined over a TCP ring, ~14 tok/s tensor "
    "parallel over JACCL",
    "GLM, 4x M3 Ultra tensor parallel: 24.6 tok/s against ~16 on one",
    "DeepSeek V4 Flash Q4, 2x M4 Max 128GB over TB5: 22.7 tok/s tensor parallel, ~20 pipelined",
    "exo tensor parallel: 48 tok/s against 98 for plain MLX",
]
OPS = ("all_sum", "all_gather", "send", "recv")


# ----------------------------------------------------------------------------------------------
# One rank (started by mlx.launch), or the single process


class Counting:
    """Counts the mx.distributed calls made while a graph is built, and their bytes."""

    def __init__(self, size: int):
        self.size, self.calls, self.payload, self.wire = size, Counter(), 0, 0
        self._saved = {}

    def __enter__(self):
        for op in OPS:
            fn = self._saved[op] = getattr(mx.distributed, op)
            setattr(mx.distributed, op, self._wrap(op, fn))
        return self

    def __exit__(self, *exc):
        for op, fn in self._saved.items():
            setattr(mx.distributed, op, fn)

    def _wrap(self, op, fn):
        def call(*args, **kwargs):
            self.calls[op] += 1
            if op != "recv":
                n, N = args[0].nbytes, self.size
                self.payload += n
                self.wire += {"all_sum": 2 * (N - 1) * n // N, "all_gather": (N - 1) * n,
                              "send": n}[op]
            return fn(*args, **kwargs)
        return call


def worker(model_dir: str, kind: str, out: str, prompt: int, step: int, steps: int,
           kv_memory=None):
    from m3mlx.generate import prefill
    from m3mlx.kv_tier import tiers_of
    from m3mlx.loading import load_model
    from m3mlx.model import make_cache
    from m3mlx.rank_loading import load_rank

    group = mx.distributed.init()
    model = load_model(model_dir) if kind == "single" else load_rank(model_dir, kind, group)[0]
    ids = mx.array(np.random.default_rng(0).integers(0, model.args.vocab_size, prompt))
    prefill(model, ids[:step], make_cache(model), step)  # warm-up
    mx.eval(mx.distributed.all_sum(mx.zeros(1)))
    kv_dir = tempfile.TemporaryDirectory()
    cache = make_cache(model, kv_memory=kv_memory, kv_cache_dir=kv_dir.name)
    t = time.perf_counter()
    logits = prefill(model, ids, cache, step)
    prefill_s = time.perf_counter() - t
    token = mx.argmax(logits).reshape(1, 1)
    tier = (tiers_of(cache) or [None])[0]
    read_before = tier.stats.misses if tier else 0
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        logits = model(token, cache=cache)[0, -1]
        token = mx.argmax(logits).reshape(1, 1)
        mx.eval(token)
        times.append(time.perf_counter() - t)
    tier_reads = (tier.stats.misses - read_before) / steps if tier else None
    with Counting(group.size()) as per_token:
        mx.eval(mx.argmax(model(token, cache=cache)[0, -1]))
    with Counting(group.size()) as per_layer:
        layer = model.layers[-1]
        mx.eval(layer(mx.zeros((1, 1, model.args.hidden_size)), None))
    small = []
    for _ in range(100 if group.size() > 1 else 0):
        t = time.perf_counter()
        mx.eval(mx.distributed.all_sum(mx.zeros(256)))
        small.append(time.perf_counter() - t)
    if group.rank() == 0:
        Path(out).write_text(json.dumps({
            "prefill_tok_s": prompt / prefill_s, "decode_ms": 1e3 * statistics.median(times),
            "calls_token": dict(per_token.calls), "calls_layer": dict(per_layer.calls),
            "payload_token": per_token.payload, "wire_token": per_token.wire,
            "allreduce_us": 1e6 * statistics.median(small) if small else None,
            "tier_reads": tier_reads,
            "tier_resident": tier.stats.peak_resident if tier else None}))


# ----------------------------------------------------------------------------------------------
# The driver


def build(root: Path, hidden: int) -> Path:
    from m3mlx.convert import convert
    from m3mlx.demo import write_demo_checkpoint

    src = write_demo_checkpoint(root / "src", dtype=mx.float32, hidden_size=hidden,
                                num_attention_heads=16, num_key_value_heads=4, index_n_heads=4,
                                head_dim=64, rotary_dim=16, index_head_dim=64,
                                intermediate_size=hidden,
                                shared_intermediate_size=hidden,
                                dense_intermediate_size=2 * hidden)
    convert(src, root / "model", mode="none", dtype="float32", recipe="uniform",
            progress=False, log=lambda s: None)
    return root / "model"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(model: Path, kind: str, ranks: int, args) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        command = [__file__, "--worker", str(model), kind, f.name, "--prompt", str(args.prompt),
                   "--prefill-step", str(args.prefill_step), "--steps", str(args.steps)]
        if args.kv_memory:
            command += ["--kv-memory", args.kv_memory]
        if kind == "single":
            command = [sys.executable, *command]
        else:
            command = [str(Path(sys.executable).parent / "mlx.launch"), "-n", str(ranks),
                       "--backend", "ring", "-p", str(free_port()), "--python", sys.executable,
                       *command]
        run = subprocess.run(command, capture_output=True, text=True, timeout=900)
        if run.returncode:
            sys.exit(f"{kind} failed:\n{run.stderr[-3000:]}")
        return json.loads(Path(f.name).read_text())


def m3_decode_bytes(N: int):
    """Weight bytes one M3 decode token reads (4.5 bits a weight): (on one Mac, on the busiest
    rank of the tensor plan). The routed experts' load per rank comes from uniform top-4
    routing: each layer waits for its busiest rank."""
    from m3mlx.config import ModelArgs
    from m3mlx.layout import text_weights
    from m3mlx.plan import busiest_rank_experts

    args = ModelArgs()
    E, k, layers = args.num_local_experts, args.num_experts_per_tok, sum(args.moe_layers)
    split = per_expert = 0.0
    for w in text_weights(args):
        n = float(np.prod(w.shape)) * BITS / 8
        if w.kind == "expert":
            per_expert += n / (E * layers)  # one expert of one layer, its three matrices
        elif w.role != "embedding" and w.kind != "vector":
            split += n  # attention, index, router, shared expert, dense MLPs, lm_head
    busiest = busiest_rank_experts(E, k, N)
    whole = split + layers * k * per_expert
    return whole, split / N + layers * busiest * per_expert


def collective_time(op: str, n_bytes: float, N: int, latency: float, bandwidth: float):
    """One collective over a ring of N: latency per hop, bytes at the link's bandwidth."""
    hops, wire = {"all_sum": (2 * (N - 1), 2 * (N - 1) / N * n_bytes),
                  "all_gather": (N - 1, (N - 1) * n_bytes), "send": (1, n_bytes)}[op]
    return hops * latency + wire / bandwidth


def predict(per_layer: dict):
    """M3's decode step per plan: the busiest rank's weight reads, then every collective."""
    from m3mlx.config import ModelArgs

    args = ModelArgs()
    L, D, V = args.num_hidden_layers, args.hidden_size, args.vocab_size
    act = 2  # bf16 activations
    print(f"\nPredicted M3 decode, 4-bit ({BITS} bits a weight), at {EFFICIENCY:.0%} of each "
          f"chip's memory bandwidth; tensor: {per_layer} a layer x {L} layers + the "
          "embedding's all-reduce and the logits' all-gather; pipeline: N-1 sends, one "
          "all-reduce of the last hidden state, the logits' all-gather:")
    for chip, (bw, memory) in CHIPS.items():
        for N in (2, 4):
            whole, busiest = m3_decode_bytes(N)
            weights = 428e9 * BITS / 8
            fits, one = weights < 0.85 * memory * N, weights < 0.85 * memory
            print(f"  {N} x {chip}: the weights ({weights / 1e9:.0f} GB) "
                  f"{'fit' if fits else 'do NOT fit'} in {N * memory / 1e9:.0f} GB; one Mac"
                  f"{'' if one else ', if it held them,'} decodes at "
                  f"{bw * EFFICIENCY / whole:.1f} tok/s")
            for link, (lat, lbw) in LINKS.items():
                tp = busiest / (bw * EFFICIENCY)
                tp += L * sum(n * collective_time(op, D * act, N, lat, lbw)
                              for op, n in per_layer.items())
                tp += collective_time("all_sum", D * act, N, lat, lbw)
                tp += collective_time("all_gather", V // N * act, N, lat, lbw)
                pp = whole / (bw * EFFICIENCY) + (N - 1) * collective_time(
                    "send", D * act, N, lat, lbw)
                pp += collective_time("all_sum", D * act, N, lat, lbw)
                pp += collective_time("all_gather", V // N * act, N, lat, lbw)
                print(f"    {link:38s} tensor {1 / tp:5.1f} tok/s   pipeline {1 / pp:5.1f} tok/s")
    print("Published figures (issue 12), other models:")
    for line in PUBLISHED:
        print(f"  {line}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", nargs=3, metavar=("MODEL", "KIND", "OUT"), help=argparse.SUPPRESS)
    p.add_argument("--hidden", type=int, default=256, help="hidden size of the bench model")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--prompt", type=int, default=512, help="prompt tokens")
    p.add_argument("--prefill-step", type=int, default=128)
    p.add_argument("--steps", type=int, default=32, help="decode steps timed")
    p.add_argument("--kv-memory", default=None, metavar="SIZE",
                   help="a K/V tier of SIZE in each process (each rank's own limit, as the CLI's "
                        "--kv-memory): the blocks it reads back per token are shown")
    args = p.parse_args()
    if args.worker:
        return worker(*args.worker, args.prompt, args.prefill_step, args.steps, args.kv_memory)

    with tempfile.TemporaryDirectory() as tmp:
        model = build(Path(tmp), args.hidden)
        rows = {kind: measure(model, kind, args.ranks, args)
                for kind in ("single", "tensor", "pipeline")}
    single = rows["single"]
    print(f"Bench model: hidden {args.hidden}, 4 layers (3 MSA + MoE), float32, CPU; "
          f"{args.prompt}-token prompt in chunks of {args.prefill_step}, {args.steps} decode "
          f"steps; {args.ranks} ranks over ring (localhost)")
    print(f"{'':10s} {'prefill tok/s':>14s} {'decode ms':>10s} {'vs 1 proc':>10s} "
          f"{'collectives/token':>30s} {'per layer':>22s} {'payload B/tok':>14s} "
          f"{'wire B/tok/rank':>16s}")
    for kind, r in rows.items():
        calls = ", ".join(f"{n} {op}" for op, n in sorted(r["calls_token"].items())) or "-"
        layer = ", ".join(f"{n} {op}" for op, n in sorted(r["calls_layer"].items())) or "-"
        print(f"{kind:10s} {r['prefill_tok_s']:14.0f} {r['decode_ms']:10.2f} "
              f"{r['decode_ms'] / single['decode_ms']:9.2f}x {calls:>30s} {layer:>22s} "
              f"{r['payload_token']:14,d} {r['wire_token']:16,d}")
    print(f"One all-reduce of 1 KB on this ring: {rows['tensor']['allreduce_us']:.0f} us "
          "(median of 100, back to back). Between collectives the ranks compute; where they "
          "share fewer cores than they have threads (this CI machine: 2 cores), each hand-off "
          "also waits for the scheduler, which the per-token figures above include. Counts "
          "are rank 0's.")
    if args.kv_memory:
        from m3mlx.units import format_size

        print(f"K/V tier of {args.kv_memory} per process (rank 0's): " + "; ".join(
            f"{kind} {r['tier_reads']:.1f} blocks read back per token, pools at most "
            f"{format_size(r['tier_resident'])}" for kind, r in rows.items()))
    predict(rows["tensor"]["calls_layer"])


if __name__ == "__main__":
    main()
