"""Sharding plans: which part of each weight and cache a rank holds, and where the collectives go.

The model code stays one model file (`m3mlx.model`); a plan is applied to it, in place:

- tensor (`Plan.tensor`): attention is split by KV group. Each rank holds KV heads
  [r*Hkv/N, (r+1)*Hkv/N), their query heads, their MSA index heads (index head g drives KV head
  g) and the columns of o_proj they feed, so attention and its block selection need nothing
  from the other ranks; the one index-key head is shared by every group and is replicated. The
  routed experts are split across ranks (expert parallel: E/N whole experts of every layer per
  rank, each rank computing the tokens routed to its own); the shared expert and the dense MLPs
  are split by columns (gate, up) and rows (down). Each layer then ends its attention and its
  FFN with one all-reduce (`DecoderLayer.group`): routed and shared experts are summed before
  theirs, so a layer costs two, the least its residual structure allows (the FFN's router and
  norm need the whole attention output). The embedding and lm_head are split by vocabulary when
  the vocabulary divides evenly: one all-reduce per forward for the embedding, one all-gather of
  the logits (only the last position's when generating).
- pipeline (`Plan.pipeline`): contiguous layer ranges, balanced by weight bytes. Rank N-1 runs
  the first layers (and holds the embedding), rank 0 the last ones; activations go down the
  ranks with send/recv (`TextModel.stage`), between ring neighbours. Rank 0's final hidden
  states are then shared with every rank (one all-reduce of [B, 1, D] when generating) and the
  lm_head is split by vocabulary over all ranks (one all-gather of the logits), so every rank
  ends a step with the same logits and samples the same token: the ranks run the same
  generation loop, with no token to pass back.

Every rank thus runs the same program on the same inputs (rank 0 reads them and shares them,
`m3mlx.distributed`), and holds the same logits after each forward pass.

Caches follow the weights: K/V by KV head (tensor) or by layer (pipeline); index keys are
replicated under the tensor plan, where every KV group scans all of them.
"""

import re
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from .config import ModelArgs

PLANS = ("tensor", "pipeline")
HOLD = "hold"  # the whole array, on every rank that runs its layer

_LAYER = re.compile(r"^language_model\.model\.layers\.(\d+)\.(.+)$")
# Tensor plan: the modules split along their output rows (axis 0; for the stacked experts the
# expert axis) and along their input columns (the last axis).
_ROWS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.index_q_proj",
         "block_sparse_moe.switch_mlp.gate_proj", "block_sparse_moe.switch_mlp.up_proj",
         "block_sparse_moe.switch_mlp.down_proj", "block_sparse_moe.shared_experts.gate_proj",
         "block_sparse_moe.shared_experts.up_proj", "mlp.gate_proj", "mlp.up_proj")
_COLUMNS = ("self_attn.o_proj", "block_sparse_moe.shared_experts.down_proj", "mlp.down_proj")
EMBED = "language_model.model.embed_tokens."
HEAD = "language_model.lm_head."


class ShardingError(ValueError):
    """A model that cannot be split as asked: what does not divide, and what to do."""


@dataclass(frozen=True)
class Plan:
    """What rank `rank` of `size` holds. `layers`: the global layers it runs [start, stop)."""

    kind: str
    rank: int
    size: int
    layers: Tuple[int, int]
    vocab_split: bool = False  # tensor plan: embedding and lm_head split by vocabulary

    @classmethod
    def tensor(cls, args: ModelArgs, rank: int, size: int) -> "Plan":
        N = size
        heads = args.num_key_value_heads
        if heads % N:
            raise ShardingError(
                f"tensor parallel splits attention by KV head: this model has {heads} KV heads, "
                f"which {N} ranks cannot share evenly; run on a number of ranks that divides "
                f"{heads}, or use --parallel pipeline")
        if any(args.moe_layers) and args.num_local_experts % N:
            raise ShardingError(
                f"expert parallel gives each rank the same number of experts: "
                f"{args.num_local_experts} experts do not divide among {N} ranks; use "
                "--parallel pipeline")
        for name, width, used in (
                ("shared_intermediate_size", args.shared_intermediate_size,
                 any(args.moe_layers) and args.n_shared_experts),
                ("dense_intermediate_size", args.dense_intermediate_size,
                 not all(args.moe_layers))):
            if used and width % N:
                raise ShardingError(f"{name}={width} does not divide among {N} ranks; use "
                                    "--parallel pipeline")
        return cls("tensor", rank, size, (0, args.num_hidden_layers),
                   vocab_split=args.vocab_size % N == 0)

    @classmethod
    def pipeline(cls, args: ModelArgs, rank: int, size: int,
                 layer_bytes: Optional[Sequence[int]] = None, embed_bytes: int = 0,
                 head_bytes: int = 0) -> "Plan":
        """Contiguous layer ranges balanced by bytes (the embedding counted with the first
        stage, the lm_head with the last); equal layer counts without sizes."""
        n = args.num_hidden_layers
        if size > n:
            raise ShardingError(f"the pipeline gives each rank at least one layer: {size} ranks "
                                f"are more than the model's {n} layers")
        sizes = list(layer_bytes) if layer_bytes is not None else [1] * n
        ranges = balanced_ranges(sizes, size, embed_bytes, head_bytes)
        if args.tie_word_embeddings and size > 1:
            raise ShardingError("the pipeline plan keeps the embedding on the first stage and "
                                "splits the lm_head over all ranks, which tied embeddings do "
                                "not allow; use --parallel tensor")
        return cls("pipeline", rank, size, ranges[size - 1 - rank],
                   vocab_split=args.vocab_size % size == 0)

    @property
    def is_tensor(self) -> bool:
        return self.kind == "tensor"

    @property
    def first_stage(self) -> bool:
        """Runs layer 0 (pipeline: rank N-1) and embeds the tokens."""
        return self.layers[0] == 0

    @property
    def last_stage(self) -> bool:
        """Runs the last layer (pipeline: rank 0), whose output is the final hidden state."""
        return self.rank == 0 or self.is_tensor

    def local_layer(self, name: str) -> Optional[str]:
        """A parameter's name in this rank's model (pipeline layers count from the stage's
        first), or None when the rank holds none of it."""
        m = _LAYER.match(name)
        if m is None:
            if ".mtp." in name:
                return None  # nothing generates with MTP yet: it is not loaded when sharded
            if self.is_tensor:
                return name
            if name.startswith(EMBED):
                return name if self.first_stage else None
            return name  # the final norm (tiny) and this rank's part of the lm_head
        i = int(m[1])
        start, stop = self.layers
        if not start <= i < stop:
            return None
        return f"language_model.model.layers.{i - start}.{m[2]}"

    def split_axis(self, name: str):
        """HOLD, or the axis along which the parameter `name` (its global name) is split into
        `size` equal parts of which this rank holds part `rank`."""
        if self.size == 1:
            return HOLD
        if name.startswith(HEAD) or name.startswith(EMBED) and self.is_tensor:
            return 0 if self.vocab_split else HOLD
        if not self.is_tensor:
            return HOLD
        m = _LAYER.match(name)
        if m is None:
            return HOLD
        module = m[2].rpartition(".")[0]
        if module in _ROWS:
            return 0
        if module in _COLUMNS:
            return -1
        return HOLD

    def part(self, name: str, shape: Sequence[int]) -> Optional[Tuple[int, int, int]]:
        """(axis, start, stop) of the slice of a parameter of full `shape` this rank holds;
        None for a whole array. ShardingError when the axis does not divide evenly."""
        axis = self.split_axis(name)
        if axis == HOLD:
            return None
        n = shape[axis]
        if n % self.size:
            raise ShardingError(
                f"{name} has {n} entries along the axis tensor parallel splits, which "
                f"{self.size} ranks cannot share evenly (with quantized weights, each rank's "
                "part must also be whole quantization groups); use --parallel pipeline or "
                "another number of ranks")
        width = n // self.size
        return axis % len(shape), self.rank * width, (self.rank + 1) * width

    def replicated(self, name: str) -> bool:
        """Whether every rank holds the whole parameter `name` (its global name)."""
        if self.split_axis(name) != HOLD:
            return False
        return self.is_tensor or not (_LAYER.match(name) or name.startswith(EMBED))

    def kv_heads(self, args: ModelArgs) -> Tuple[int, int]:
        """The KV heads [start, stop) whose cache this rank holds."""
        if not self.is_tensor:
            return 0, args.num_key_value_heads
        n = args.num_key_value_heads // self.size
        return self.rank * n, (self.rank + 1) * n

    def describe(self) -> str:
        if self.is_tensor:
            return f"tensor parallel, rank {self.rank} of {self.size}"
        start, stop = self.layers
        return f"pipeline, rank {self.rank} of {self.size}: layers {start}-{stop - 1}"


def balanced_ranges(sizes: Sequence[int], parts: int, first_extra: int = 0,
                    last_extra: int = 0) -> List[Tuple[int, int]]:
    """Split items of `sizes` into `parts` contiguous, non-empty ranges with the smallest
    largest total (the first range also carries `first_extra`, the last `last_extra`)."""
    n = len(sizes)

    def within(limit: int) -> Optional[List[Tuple[int, int]]]:
        """Greedy: each range takes what fits, leaving an item for every later range."""
        out, start = [], 0
        for p in range(parts):
            total = (first_extra if p == 0 else 0) + (last_extra if p == parts - 1 else 0)
            end = start
            if p == parts - 1:
                end, total = n, total + sum(sizes[start:])
            while end < n - (parts - p - 1) and (end == start or total + sizes[end] <= limit):
                total += sizes[end]
                end += 1
            if total > limit:
                return None
            out.append((start, end))
            start = end
        return out

    lo, hi = 0, sum(sizes) + first_extra + last_extra
    while lo < hi:
        mid = (lo + hi) // 2
        if within(mid) is None:
            lo = mid + 1
        else:
            hi = mid
    return within(lo)


# ----------------------------------------------------------------------------------------------
# Applying a plan to a model


@dataclass
class Stage:
    """This rank's place in the pipeline: it takes its input from rank + 1 (unless it runs the
    first layers) and hands its output to rank - 1 (unless it runs the last)."""

    group: object
    rank: int
    size: int
    hidden: int
    dtype: mx.Dtype
    first: bool
    last: bool

    # On the CPU stream: a receive that waits for the earlier stages' prefill on the GPU
    # stream would run into Metal's command-buffer timeout (a few seconds).
    def receive(self, shape: Sequence[int]) -> mx.array:
        """The previous stage's output for inputs of `shape` [B, L]."""
        return mx.distributed.recv((*shape, self.hidden), self.dtype, self.rank + 1,
                                   group=self.group, stream=mx.cpu)

    def send(self, h: mx.array) -> mx.array:
        """`h`, sent to the next stage when evaluated."""
        return mx.distributed.send(h.astype(self.dtype), self.rank - 1, group=self.group,
                                   stream=mx.cpu)

    def share(self, h: mx.array) -> mx.array:
        """The last stage's output `h` [B, L, D], on every rank: the others pass the result
        of their send, and add zeros that wait for it."""
        if not self.last:
            h = mx.depends(mx.zeros(h.shape, self.dtype), h)
        return mx.distributed.all_sum(h, group=self.group)


class VocabShard(nn.Module):
    """Rows [start, start + rows) of a vocabulary-sized matrix (the embedding or the lm_head),
    float or quantized, with the parameter names of the module it replaces."""

    def __init__(self, module: nn.Module, start: int, vocab: int, group):
        super().__init__()
        self.weight = module.weight
        if "scales" in module:
            self.scales = module.scales
            if module.get("biases") is not None:
                self.biases = module.biases
            self.group_size, self.bits, self.mode = module.group_size, module.bits, module.mode
        self.start, self.vocab, self.group = start, vocab, group

    @property
    def quantized(self) -> bool:
        return "scales" in self

    @property
    def rows(self) -> int:
        return self.weight.shape[0]

    def project(self, h: mx.array) -> mx.array:
        """h [..., D] -> logits [..., vocab]: this rank's part, then all of them gathered."""
        if self.quantized:
            part = mx.quantized_matmul(h, self["weight"], self["scales"], self.get("biases"),
                                       transpose=True, group_size=self.group_size,
                                       bits=self.bits, mode=self.mode)
        else:
            part = h @ self["weight"].T
        lead = part.shape[:-1]
        # all_gather stacks along the first axis: put the vocabulary there.
        flat = part.reshape(-1, self.rows).T
        full = mx.distributed.all_gather(flat, group=self.group)  # [vocab, tokens]
        return full.T.reshape(*lead, self.vocab)

    def embed(self, ids: mx.array) -> mx.array:
        """ids [...] -> [..., D]: this rank's rows where it holds the token, summed over ranks."""
        local = ids - self.start
        held = (local >= 0) & (local < self.rows)
        local = mx.where(held, local, 0)
        if self.quantized:
            rows = mx.dequantize(self["weight"][local], self["scales"][local],
                                 self.get("biases")[local] if "biases" in self else None,
                                 group_size=self.group_size, bits=self.bits, mode=self.mode)
        else:
            rows = self["weight"][local]
        rows = mx.where(held[..., None], rows, mx.zeros((), rows.dtype))
        return mx.distributed.all_sum(rows, group=self.group)


class VocabEmbedding(VocabShard):
    def __call__(self, ids: mx.array) -> mx.array:
        return self.embed(ids)

    def as_linear(self, h: mx.array) -> mx.array:
        return self.project(h)


class VocabHead(VocabShard):
    def __call__(self, h: mx.array) -> mx.array:
        return self.project(h)


@dataclass
class Sharding:
    """What a sharded model carries (`Model.sharding`): its plan and its group."""

    plan: Plan
    group: object


def activation_dtype(model) -> mx.Dtype:
    """The dtype of the hidden states: a pipeline stage's (later stages hold no embedding),
    else the embedding's output type."""
    text = model.language_model.model
    if text.stage is not None:
        return text.stage.dtype
    embed = text.embed_tokens
    return embed.scales.dtype if "scales" in embed else embed.weight.dtype


def sliced(plan: Plan, name: str, array: mx.array) -> mx.array:
    """This rank's part of the parameter `name` (global name), lazily."""
    part = plan.part(name, array.shape)
    if part is None:
        return array
    axis, start, stop = part
    index = [slice(None)] * array.ndim
    index[axis] = slice(start, stop)
    return array[tuple(index)]


def apply_plan(model, plan: Plan, group, dtype: Optional[mx.Dtype] = None):
    """Make `model` rank `plan.rank`'s part, in place: slice the parameters it keeps (lazily:
    on a model whose weights are not loaded yet nothing is read or computed), drop what it
    does not hold, and set the head counts, expert ranges, groups and pipeline stage the
    forward pass uses. `dtype`: the hidden states' type (default: the embedding's)."""
    args: ModelArgs = model.args
    text = model.language_model.model
    hidden_dtype = dtype or activation_dtype(model)
    if "mtp" in text:
        text.pop("mtp")
    params = tree_flatten(model.parameters())
    kept = {name: sliced(plan, name, a) for name, a in params if plan.local_layer(name)}
    start, stop = plan.layers
    text.layers = text.layers[start:stop]
    if not plan.is_tensor:
        if not plan.first_stage:
            text.pop("embed_tokens")
        text.stage = Stage(group, plan.rank, plan.size, args.hidden_size, hidden_dtype,
                           first=plan.first_stage, last=plan.last_stage)
    model.update(tree_unflatten([(plan.local_layer(n), a) for n, a in kept.items()]))
    if plan.is_tensor and plan.size > 1:
        _split_modules(model, plan, group)
    if plan.vocab_split and plan.size > 1:
        _split_vocabulary(model, plan, group)
    model.sharding = Sharding(plan, group)
    return model


def _split_modules(model, plan: Plan, group):
    """The tensor plan's per-module settings for already-sliced parameters."""
    N, args = plan.size, model.args
    text = model.language_model.model
    for layer in text.layers:
        layer.group = group
        attn = layer.self_attn
        attn.n_heads //= N
        attn.n_kv_heads //= N
        if attn.sparse:
            attn.index_heads //= N
        if "block_sparse_moe" in layer:
            experts = layer.block_sparse_moe.switch_mlp
            experts.held = args.num_local_experts // N
            experts.first = plan.rank * experts.held


def _split_vocabulary(model, plan: Plan, group):
    """The embedding (tensor plan) and the lm_head hold this rank's rows of the vocabulary."""
    V = model.args.vocab_size
    start = plan.rank * V // plan.size
    text, lm = model.language_model.model, model.language_model
    if plan.is_tensor:
        text.embed_tokens = VocabEmbedding(text.embed_tokens, start, V, group)
    if "lm_head" in lm:
        lm.lm_head = VocabHead(lm.lm_head, start, V, group)
