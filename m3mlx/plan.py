"""The memory planner: what a model needs in memory, what a budget leaves for an expert cache,
and what decode speed that gives on named Macs.

A model's `Footprint` splits its weights into what stays resident (attention, shared experts,
dense MLPs, router, embeddings, lm_head, norms) and the routed experts, which can stream from the
SSD through an expert cache (`m3mlx.experts`). Add the K/V cache and MSA index keys at a context
length and the activations of a prefill chunk, and a memory budget says how many experts per
layer the cache holds, or that everything fits.

Predicted decode time per token, on a Mac with memory bandwidth B and SSD read speed R:

    (resident weights read + the K active experts of each MoE layer + K/V read) / (B x eff)
    + (1 - hit rate) x K x MoE layers x expert bytes / (R x eff)  +  syncs x sync time

with the efficiencies and the sync time of `m3mlx.hardware` and the hit rate at the cache's
share of the experts from calibration counts (a fixed cache of the most used experts) or, by
default, a measured curve (LRU_CURVE).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Sequence, Tuple, Union

import mlx.core as mx
import numpy as np

from . import hardware
from .context_memory import ContextCost, context_cost
from .checks import InputError
from .config import ModelArgs
from .defaults import INDEX_BITS, PREFILL_STEP
from .units import Fraction, format_size, parse_size, parse_size_or_fraction

PLAN_CONTEXT = 32768  # tokens of K/V a memory budget reserves unless told otherwise

# The LRU expert cache (prefetch on) measured on the trained tiny M3 (32 experts, top 4; 512 tokens
# of Python source decoded one at a time: benchmarks/bench_experts.py, README "Measured"): the
# cache's share of each layer's experts -> (hit rate, experts read from disk per active expert:
# the misses and the reads ahead). The planner's curve for models without calibration counts,
# linear in between; a Mac run of the benchmark on M3 itself replaces it.
LRU_CURVE = ((0.0, 0.0, 1.0), (0.125, 0.416, 0.815), (0.25, 0.722, 0.682), (0.5, 0.855, 0.364),
             (0.75, 0.949, 0.128), (1.0, 1.0, 0.0))


class BudgetError(InputError):
    """A memory budget or expert cache that cannot work for this model, and what would."""


@dataclass
class Footprint:
    """A model's memory, by part (bytes as loaded: after any dtype cast)."""

    args: ModelArgs
    resident: int  # everything but the streamable routed experts
    expert: int  # one routed expert
    moe_layers: int  # MoE layers whose experts can stream
    experts: int  # routed experts per MoE layer
    act_bytes: int  # bytes per activation value: the K/V cache's element size
    embedding: int  # bytes of the embedding table (a token reads one row of it)
    streamable: bool = True  # experts stacked in the files (a converted model)
    what: str = ""
    active_share: float = 1.0  # of a token's K experts, the share this part waits for computing

    @property
    def experts_total(self) -> int:
        return self.expert * self.experts * self.moe_layers

    @property
    def total(self) -> int:
        return self.resident + self.experts_total

    @property
    def top_k(self) -> int:
        return self.args.num_experts_per_tok

    @property
    def active_experts(self) -> float:
        """Routed experts a token uses per layer in this part: K, or on expert-parallel ranks
        those of the busiest rank, on average (each layer waits for it)."""
        return self.top_k * self.active_share


def busiest_rank_experts(experts: int, k: int, ranks: int) -> float:
    """Of a token's k routed experts (k distinct of `experts`, uniformly), how many the busiest
    of `ranks` expert-parallel ranks (experts/ranks each) computes, on average: the exact
    expectation over the ways k experts fall into the ranks' ranges."""
    per = experts // ranks

    def splits(left: int, n: int):
        if n == 1:
            if left <= per:
                yield (left,)
            return
        for here in range(min(left, per) + 1):
            for rest in splits(left - here, n - 1):
                yield (here, *rest)

    ways = sum(max(s) * math.prod(math.comb(per, c) for c in s) for s in splits(k, ranks))
    return ways / math.comb(experts, k)


def footprint(ckpt, dtype: Optional[mx.Dtype] = None, plan=None) -> Footprint:
    """The footprint of a checkpoint as `m3mlx.load(path, dtype=dtype)` would hold it; with a
    sharding `plan` (m3mlx.sharding), of the part one rank holds (`m3mlx.load_rank`): its
    layers, its share of each split tensor, its experts, the context cache of its heads and
    layers."""
    from .experts import is_routed_expert
    from .model import is_precision_sensitive
    from .weights import is_vision

    floats = {"BF16": 2, "F16": 2, "F32": 4}
    resident = embedding = experts = 0
    stacked = set()
    act = floats.get(ckpt.tensors[next(n for n in ckpt.tensors
                                       if n.endswith("model.norm.weight"))].dtype, 2)
    for name, t in ckpt.tensors.items():
        if is_vision(name) or plan is not None and plan.local_layer(name) is None:
            continue
        nbytes = t.nbytes
        if dtype is not None and t.dtype in floats and not is_precision_sensitive(name):
            nbytes = t.numel * dtype.size  # loading casts float weights
        if plan is not None and plan.part(name, t.shape) is not None:
            nbytes //= plan.size
        if ".mtp." not in name and (is_routed_expert(name)
                                    or ".block_sparse_moe.experts." in name):
            experts += nbytes
            stacked.add(is_routed_expert(name))
            continue
        if ".embed_tokens." in name:
            embedding += nbytes
        resident += nbytes
    args = ckpt.args if plan is None else rank_args(ckpt.args, plan)
    E, moe_layers = args.num_local_experts, sum(args.moe_layers)
    if plan is not None and plan.is_tensor:
        E //= plan.size  # expert parallel: each rank computes E/N of each layer's experts
    streamable = stacked == {True}
    what = f"{ckpt.path} ({'converted' if streamable else 'original layout'})"
    if plan is not None:
        what += f" ({plan.describe()})"
    return Footprint(args, resident, experts // max(1, E * moe_layers), moe_layers, E,
                     act if dtype is None else dtype.size, embedding, streamable, what,
                     busiest_rank_experts(args.num_local_experts, args.num_experts_per_tok,
                                          plan.size) / args.num_experts_per_tok
                     if plan is not None and plan.is_tensor and E else 1.0)


def largest_rank(ckpt, ranks: int, kind: str, dtype: Optional[mx.Dtype] = None):
    """(footprint, sharding plan) of the largest rank's part of `ckpt` (anything with `tensors`,
    `args` and `path`: a checkpoint, or a conversion's planned tensors) on `ranks` ranks under
    the plan `kind`: what each Mac of the run must hold at least."""
    from .rank_loading import make_plan

    parts = []
    for rank in range(ranks):
        plan = make_plan(kind, ckpt, rank, ranks)
        parts.append((footprint(ckpt, dtype, plan), plan))
    return max(parts, key=lambda part: part[0].total)


def rank_args(args: ModelArgs, plan) -> ModelArgs:
    """The model one rank of `plan` runs, as the planner prices its context cache: its layers
    and its KV heads (its experts: `footprint`)."""
    start, stop = plan.layers
    split = plan.size if plan.is_tensor else 1
    return replace(args, num_hidden_layers=stop - start,
                   sparse_layers=args.sparse_layers[start:stop],
                   moe_layers=args.moe_layers[start:stop],
                   num_attention_heads=args.num_attention_heads // split,
                   num_key_value_heads=args.num_key_value_heads // split,
                   index_n_heads=args.index_n_heads // split)


def act_dtype(fp: "Footprint") -> mx.Dtype:
    """The activation dtype a footprint's K/V cache is stored in."""
    return mx.float32 if fp.act_bytes == 4 else mx.bfloat16


def activation_bytes(args: ModelArgs, act_bytes: int, step: int = PREFILL_STEP) -> int:
    """Working memory of a prefill chunk of `step` tokens: its logits, hidden states and the
    routed rows of an MoE layer (an estimate; attention works block by block)."""
    H, K, F = args.hidden_size, args.num_experts_per_tok, args.intermediate_size
    return step * (args.vocab_size + 8 * H + 3 * K * F) * act_bytes


def decode_read_bytes(fp: Footprint, kv: ContextCost) -> float:
    """Bytes a decode step reads from memory: resident weights but the embedding table, the
    active experts, and the context cache `kv` as the attention reads it (MSA layers: every
    index key and the selected blocks' K/V; dense layers: all their K/V)."""
    a = fp.args
    selected = min(kv.tokens, a.index_topk_blocks * a.index_block_size)
    msa_read = kv.msa_kv * selected / kv.tokens if kv.tokens else 0
    return (fp.resident - fp.embedding + fp.active_experts * fp.moe_layers * fp.expert
            + kv.index_keys + kv.dense_kv + msa_read)


# ----------------------------------------------------------------------------------------------
# Budgets


@dataclass
class Budget:
    """What a memory budget holds."""

    memory: int
    context_cost: ContextCost  # the context cache at the planned length (m3mlx.context_memory)
    resident: int
    activations: int
    slots: int  # experts per MoE layer in the cache (= experts when everything is resident)
    experts: int

    @property
    def context(self) -> int:
        return self.context_cost.tokens

    @property
    def kv(self) -> int:
        """The context cache's bytes in memory (K/V beyond a --kv-memory limit is on disk)."""
        return self.context_cost.resident

    @property
    def cache(self) -> int:
        return self.memory - self.resident - self.kv - self.activations

    @property
    def share(self) -> float:
        return self.slots / self.experts if self.experts else 1.0

    @property
    def streams(self) -> bool:
        return self.slots < self.experts


def cache_slots(fp: Footprint, expert_cache: Union[int, str, Fraction]) -> int:
    """Experts per MoE layer an --expert-cache SIZE (bytes, or a share of the experts) holds."""
    size = parse_size_or_fraction(expert_cache, "the expert cache")
    if isinstance(size, Fraction):
        return min(fp.experts, max(1, math.ceil(float(size) * fp.experts)))
    one = fp.expert * fp.moe_layers
    if size < one:
        raise BudgetError(
            f"an expert cache of {format_size(size)} is smaller than one expert per layer "
            f"({fp.moe_layers} MoE layers x {format_size(fp.expert)} = {format_size(one)}); "
            f"give at least {format_size(one)}, or a share like 10%")
    return min(fp.experts, size // one)


def plan_budget(fp: Footprint, memory, context: Optional[int] = None, *,
                kv_bits: Optional[int] = None, index_bits: Optional[int] = INDEX_BITS,
                kv_memory=None) -> Budget:
    """How a memory budget splits: resident weights, the context cache at `context` tokens
    (K/V at kv_bits, index keys at index_bits, at most kv_memory of MSA K/V in memory: as
    `make_cache` would hold it), activations, and the expert cache with what is left.
    BudgetError when the budget cannot hold what must stay resident, or not even one expert
    per layer, saying what would."""
    memory = parse_size(memory, "the memory limit")
    context = min(context or PLAN_CONTEXT, fp.args.max_position_embeddings)
    cost = context_cost(fp.args, context, kv_bits=kv_bits, index_bits=index_bits,
                        kv_memory=kv_memory, dtype=act_dtype(fp))
    kv = cost.resident
    act = activation_bytes(fp.args, fp.act_bytes)
    fixed = fp.resident + kv + act
    if memory < fixed:
        raise BudgetError(
            f"a memory limit of {format_size(memory)} cannot hold what stays resident: "
            f"{format_size(fp.resident)} of weights besides the routed experts, "
            f"{format_size(kv)} of K/V at {context:,} tokens and {format_size(act)} of "
            f"activations; it needs at least {format_size(fixed + fp.expert * fp.moe_layers)} "
            f"(or a smaller conversion: `m3mlx plan PATH --memory SIZE` lists what fits)")
    if fp.total + kv + act <= memory:
        return Budget(memory, cost, fp.resident, act, fp.experts, fp.experts)
    if not fp.streamable:
        raise BudgetError(
            f"{fp.what}: the model needs {format_size(fp.total + kv + act)}, more than "
            f"{format_size(memory)}, and its experts can stream only from a converted model: "
            "run `m3mlx convert` first")
    one = fp.expert * fp.moe_layers
    slots = (memory - fixed) // one
    if slots < 1:
        raise BudgetError(
            f"a memory limit of {format_size(memory)} leaves {format_size(memory - fixed)} for "
            f"experts, less than one per layer ({format_size(one)}); give at least "
            f"{format_size(fixed + one)}")
    return Budget(memory, cost, fp.resident, act, min(slots, fp.experts), fp.experts)


def check_fits(fp: Footprint, memory: Optional[int] = None):
    """Refuse, before anything is read, a model that cannot load whole on this machine (more
    than its physical memory: loading as before whatever could work, e.g. with a raised GPU
    wired limit), saying what to run instead."""
    memory = hardware.physical_memory() if memory is None else memory
    act = activation_bytes(fp.args, fp.act_bytes)
    need = fp.total + act
    if need <= memory:
        return
    if not fp.streamable:
        raise BudgetError(
            f"{fp.what} needs {format_size(need)} of memory, this machine has "
            f"{format_size(memory)}; convert it (`m3mlx convert PATH OUT`, quantized) "
            "and load the conversion with --memory-limit to stream its experts from the SSD")
    # What the GPU may keep without paging (a Mac's working set) is the limit to stream within.
    limit = format_size(min(memory, hardware.machine_memory())).replace(" ", "")
    raise BudgetError(
        f"{fp.what} needs {format_size(need)} of memory, this machine has {format_size(memory)}"
        f": stream the routed experts from the SSD with --memory-limit {limit} (Python: "
        f"memory_limit=\"{limit}\") or --expert-cache 25%; `m3mlx plan PATH --memory {limit}` "
        "shows what that gives")


# ----------------------------------------------------------------------------------------------
# Predictions


def curve_at(share: float, curve: Sequence = LRU_CURVE) -> Tuple[float, float]:
    """(hit rate, experts read per active expert) of a cache holding `share` of the experts."""
    xs, hits, reads = zip(*curve)
    return float(np.interp(share, xs, hits)), float(np.interp(share, xs, reads))


def hit_rate_from_usage(counts: Dict[str, np.ndarray], slots: int) -> float:
    """Hit rate of a cache holding each layer's `slots` most used experts, on the traffic the
    counts describe: a floor for an adaptive policy, which also follows the conversation."""
    hits = total = 0
    for c in counts.values():
        top = np.sort(c)[::-1]
        hits += top[:slots].sum()
        total += c.sum()
    return float(hits / total) if total else 0.0


@dataclass
class Prediction:
    mac: hardware.Mac
    memory_seconds: float
    ssd_seconds: float
    sync_seconds: float
    miss_bytes: float

    @property
    def tokens_per_second(self) -> float:
        return 1.0 / (self.memory_seconds + self.ssd_seconds + self.sync_seconds)

    @property
    def overlapped(self) -> float:
        """The bound if reads hid entirely behind compute (prefetch at its best)."""
        return 1.0 / (max(self.memory_seconds, self.ssd_seconds) + self.sync_seconds)


def predict(fp: Footprint, budget: Budget, hit_rate: float, mac: hardware.Mac,
            read_share: Optional[float] = None) -> Prediction:
    """Decode time per token on `mac`. The SSD reads `read_share` of the active experts per
    token (misses and reads ahead, as measured), by default the misses: 1 - hit_rate."""
    reads = decode_read_bytes(fp, budget.context_cost)
    streams = budget.streams
    share = 1.0 - hit_rate if read_share is None else read_share
    miss = share * fp.active_experts * fp.moe_layers * fp.expert if streams else 0.0
    syncs = (fp.moe_layers if streams else 0) + 1
    return Prediction(mac, reads / (mac.bandwidth * hardware.MEMORY_EFFICIENCY),
                      miss / (mac.ssd_read * hardware.SSD_EFFICIENCY),
                      syncs * hardware.SYNC_SECONDS, miss)


# ----------------------------------------------------------------------------------------------
# The report


@dataclass
class Plan:
    footprint: Footprint
    budget: Budget
    hit_rate: float
    hit_rate_source: str
    predictions: List[Prediction]


def make_plan(fp: Footprint, memory, context: Optional[int] = None,
              usage: Optional[Dict[str, np.ndarray]] = None,
              macs: Sequence[hardware.Mac] = hardware.MACS, **context_options) -> Plan:
    """The plan of `fp` in `memory`; `context_options`: kv_bits, index_bits, kv_memory as for
    `plan_budget`."""
    budget = plan_budget(fp, memory, context, **context_options)
    if not budget.streams:
        rate, reads, source = 1.0, 0.0, "everything resident"
    elif usage:
        rate = hit_rate_from_usage(usage, budget.slots)
        reads, source = 1.0 - rate, "the calibration counts (a cache of the most used experts)"
    else:
        rate, reads = curve_at(budget.share)
        source = "the LRU curve measured on the tiny trained M3 (LRU_CURVE in m3mlx/plan.py)"
    return Plan(fp, budget, rate, source, [predict(fp, budget, rate, m, reads) for m in macs])


def _context_text(b: Budget) -> str:
    c = b.context_cost
    text = (f"K/V {format_size(c.dense_kv + c.msa_kv)}, index keys {format_size(c.index_keys)}")
    if c.on_disk:
        text += f"; {format_size(c.on_disk)} of K/V on the SSD"
    return text


def format_plan(plan: Plan) -> str:
    fp, b = plan.footprint, plan.budget
    lines = [
        f"model        {fp.what}",
        f"             {format_size(fp.resident)} resident weights; routed experts "
        f"{fp.moe_layers} layers x {fp.experts} x {format_size(fp.expert)} = "
        f"{format_size(fp.experts_total)}",
        f"budget       {format_size(b.memory)} at {b.context:,} tokens of context",
        f"  weights besides the routed experts  {format_size(b.resident):>10}",
        f"  K/V cache and MSA index keys        {format_size(b.kv):>10}  ({_context_text(b)})",
        f"  activations of a prefill chunk      {format_size(b.activations):>10}",
    ]
    if b.streams:
        cache = b.slots * fp.expert * fp.moe_layers
        lines.append(f"  expert cache                        {format_size(cache):>10}"
                     f"  ({b.slots} of {fp.experts} experts per layer, {100 * b.share:.1f}%)")
        lines.append(f"hit rate     {100 * plan.hit_rate:.1f}%, from {plan.hit_rate_source}")
        lines.append(f"run it with  --memory-limit {format_size(b.memory).replace(' ', '')}"
                     f" (or --expert-cache {cache}B)")
    else:
        lines.append(f"  routed experts                      {format_size(fp.experts_total):>10}"
                     "  (all resident: no streaming)")
    lines += ["", f"decode, predicted (memory at {100 * hardware.MEMORY_EFFICIENCY:.0f}% of "
                  f"peak, SSD at {100 * hardware.SSD_EFFICIENCY:.0f}%, "
                  f"{hardware.SYNC_SECONDS * 1e6:.0f} us a sync):",
              f"  {'Mac':<30}{'bandwidth':>11}{'SSD':>11}{'SSD/token':>12}{'tok/s':>8}"
              f"{'overlapped':>12}"]
    for p in plan.predictions:
        note = "  (has less memory than the budget)" if p.mac.memory < b.memory else ""
        lines.append(f"  {p.mac.name:<30}{p.mac.bandwidth / 1e9:>7.0f} GB/s"
                     f"{p.mac.ssd_read / 1e9:>6.1f} GB/s{format_size(p.miss_bytes):>12}"
                     f"{p.tokens_per_second:>8.2f}"
                     f"{p.overlapped:>12.2f}{note}")
    return "\n".join(lines)
