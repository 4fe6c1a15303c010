"""The MiniMax-M3 text tower in MLX, with MiniMax Sparse Attention computed sparsely.

Module paths match mlx-lm's `minimax_m3_vl` so either project loads the other's weights:
`language_model.model.layers.{i}.self_attn.*`, `...block_sparse_moe.switch_mlp.*`,
`language_model.lm_head`, plus `language_model.model.mtp.layers.0.*` when MTP weights exist.
"""

from typing import List, Optional

import mlx.core as mx
import mlx.nn as nn

from .cache import KVView, LayerCache
from .config import ModelArgs
from .defaults import INDEX_BITS
from .metal_kernels import ExpertWeights, index_topk, moe_experts, swiglu_oai

# From this many (token, slot) pairs an expert-parallel rank computes only the pairs routed to
# its own experts (prefill); below it, every slot, the others weighted 0 (decode: no sync).
PREFILL_SLOTS = 64


class GemmaRMSNorm(nn.Module):
    """RMSNorm scaling by (1 + w); the checkpoint stores the zero-centred w."""

    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.zeros((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, 1.0 + self.weight, self.eps)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(args.hidden_size, hidden, bias=False)
        self.up_proj = nn.Linear(args.hidden_size, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, args.hidden_size, bias=False)
        self.alpha, self.limit = args.swiglu_alpha, args.swiglu_limit

    def __call__(self, x: mx.array) -> mx.array:
        h = swiglu_oai(self.gate_proj(x), self.up_proj(x), self.alpha, self.limit)
        return self.down_proj(h)


class ExpertLinear(nn.Module):
    """One linear map per expert, weight [experts, out, in]; applied by the MoE op."""

    def __init__(self, num_experts: int, input_dims: int, output_dims: int):
        super().__init__()
        scale = input_dims**-0.5
        self.weight = mx.random.uniform(-scale, scale, (num_experts, output_dims, input_dims))

    def to_quantized(self, group_size: int = 64, bits: int = 4, mode: str = "affine"):
        return QuantizedExpertLinear.from_expert_linear(self, group_size, bits, mode)


class QuantizedExpertLinear(nn.Module):
    def __init__(self, num_experts, input_dims, output_dims, group_size=64, bits=4,
                 mode="affine"):
        super().__init__()
        self.group_size, self.bits, self.mode = group_size, bits, mode
        w = mx.zeros((num_experts, output_dims, input_dims))
        self.weight, self.scales, *biases = mx.quantize(w, group_size, bits, mode=mode)
        if biases:
            self.biases = biases[0]
        self.freeze()

    @classmethod
    def from_expert_linear(cls, layer, group_size, bits, mode):
        E, out, inp = layer.weight.shape
        q = cls(E, inp, out, group_size, bits, mode)
        q.weight, q.scales, *biases = mx.quantize(layer.weight, group_size, bits, mode=mode)
        if biases:
            q.biases = biases[0]
        return q


class Experts(nn.Module):
    """The routed experts' weights, stacked per projection (mlx-lm's `switch_mlp`)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        E, D, F = args.num_local_experts, args.hidden_size, args.intermediate_size
        self.gate_proj = ExpertLinear(E, D, F)
        self.up_proj = ExpertLinear(E, D, F)
        self.down_proj = ExpertLinear(E, F, D)
        # Expert parallel (m3mlx.sharding): this rank holds `held` of the layer's `num_experts`
        # experts, the ids [first, first + held).
        self.num_experts, self.first, self.held = E, 0, E

    @property
    def partial(self) -> bool:
        return self.held < self.num_experts

    def local_slots(self, indices: mx.array, weights: mx.array):
        """For a few tokens on an expert-parallel rank: (ids among the held experts, weights),
        a slot routed elsewhere weighted 0 and pointed at an expert the token already uses here
        (or the first held one), so that it reads no other expert's weights."""
        local = indices - self.first
        here = (local >= 0) & (local < self.held)
        some = mx.take_along_axis(local, mx.argmax(here, axis=-1, keepdims=True), axis=-1)
        fill = mx.where(here.any(axis=-1, keepdims=True), some, 0)
        return mx.where(here, local, fill).astype(indices.dtype), mx.where(here, weights, 0)

    def held_slots(self, indices: mx.array):
        """For many tokens on an expert-parallel rank: the flat (token * k + slot) numbers of
        the slots routed to held experts and their ids among them, both sorted by expert (the
        held ids are one contiguous run of the sorted ids; finding its ends waits for the
        routing)."""
        flat = indices.flatten()
        order = mx.argsort(flat)
        ids = flat[order]
        lo = mx.sum(ids < self.first).item()
        hi = mx.sum(ids < self.first + self.held).item()
        return order[lo:hi], ids[lo:hi] - self.first


class MoE(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.top_k = args.num_experts_per_tok
        self.routed_scaling_factor = args.routed_scaling_factor
        self.alpha, self.limit = args.swiglu_alpha, args.swiglu_limit
        self.gate = nn.Linear(args.hidden_size, args.num_local_experts, bias=False)
        self.e_score_correction_bias = mx.zeros((args.num_local_experts,))
        self.switch_mlp = Experts(args)
        if args.n_shared_experts:
            self.shared_experts = MLP(args, args.shared_intermediate_size)
        # Set when the routed experts stream from disk (m3mlx.experts): switch_mlp then holds a
        # pool of expert slots, and this computes the op over it through the slot table.
        self.streamed = None

    def route(self, x: mx.array):
        """x [N, D] -> (experts int32 [N, k], weights [N, k]).

        Routing is fp32: the correction bias only picks the experts, the weights are the plain
        sigmoid scores of the picked ones, renormalized and scaled."""
        scores = mx.sigmoid(self.gate(x.astype(mx.float32)).astype(mx.float32))
        biased = scores + self.e_score_correction_bias.astype(mx.float32)
        k = self.top_k
        experts = mx.stop_gradient(mx.argpartition(-biased, kth=k - 1, axis=-1)[:, :k])
        weights = mx.take_along_axis(scores, experts, axis=-1)
        weights = weights / (weights.sum(axis=-1, keepdims=True) + 1e-20)
        return experts, (weights * self.routed_scaling_factor).astype(x.dtype)

    def __call__(self, x: mx.array) -> mx.array:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        experts, weights = self.route(x)
        # The routed and shared experts in one op: Metal kernels for a few tokens over
        # quantized experts on a Mac, gather_qmm / gather_mm otherwise.
        routed = self.switch_mlp
        shared = ExpertWeights.of(self.shared_experts) if "shared_experts" in self else None
        if self.streamed is not None:
            y = self.streamed(x, experts, weights, ExpertWeights.of(routed), shared,
                              self.alpha, self.limit)
            return y.reshape(shape)
        if routed.partial and experts.size >= PREFILL_SLOTS:
            return self._held_experts(x, experts, weights).reshape(shape)
        if routed.partial:
            experts, weights = routed.local_slots(experts, weights)
        y = moe_experts(x, experts, weights, ExpertWeights.of(self.switch_mlp), shared,
                        alpha=self.alpha, limit=self.limit)
        return y.reshape(shape)

    def _held_experts(self, x: mx.array, experts: mx.array, weights: mx.array) -> mx.array:
        """Prefill on an expert-parallel rank: this rank's part of the MoE output [N, D], from
        the (token, slot) pairs routed to its experts only, plus its columns of the shared
        expert."""
        routed, k = self.switch_mlp, experts.shape[-1]
        slots, ids = routed.held_slots(experts)
        y = mx.zeros_like(x)
        if slots.size:
            rows = slots // k
            part = moe_experts(x[rows], ids[:, None], weights.flatten()[slots][:, None],
                               ExpertWeights.of(routed), None, alpha=self.alpha,
                               limit=self.limit)
            y = y.at[rows].add(part)
        if "shared_experts" in self:
            y = y + self.shared_experts(x)
        return y


class Attention(nn.Module):
    """GQA attention; on sparse layers each KV head attends only to its top-k key blocks."""

    def __init__(self, args: ModelArgs, sparse: bool):
        super().__init__()
        D = args.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = (
            args.num_attention_heads, args.num_key_value_heads, D)
        self.scale = D**-0.5
        self.rotary_dim, self.rope_theta = args.rotary_dim, args.rope_theta
        eps = args.rms_norm_eps
        self.q_proj = nn.Linear(args.hidden_size, self.n_heads * D, bias=False)
        self.k_proj = nn.Linear(args.hidden_size, self.n_kv_heads * D, bias=False)
        self.v_proj = nn.Linear(args.hidden_size, self.n_kv_heads * D, bias=False)
        self.o_proj = nn.Linear(self.n_heads * D, args.hidden_size, bias=False)
        self.q_norm = GemmaRMSNorm(D, eps)
        self.k_norm = GemmaRMSNorm(D, eps)
        self.sparse = sparse
        if sparse:
            Di = args.index_head_dim
            self.index_heads, self.index_dim = args.index_n_heads, Di
            self.block_size, self.topk = args.index_block_size, args.index_topk_blocks
            self.index_q_proj = nn.Linear(args.hidden_size, self.index_heads * Di, bias=False)
            self.index_k_proj = nn.Linear(args.hidden_size, Di, bias=False)
            self.index_q_norm = GemmaRMSNorm(Di, eps)
            self.index_k_norm = GemmaRMSNorm(Di, eps)

    def _rope(self, x: mx.array, offset: int) -> mx.array:
        return mx.fast.rope(x, self.rotary_dim, traditional=False, base=self.rope_theta,
                            scale=1.0, offset=offset)

    def _heads(self, x: mx.array, n: int) -> mx.array:
        B, L, _ = x.shape
        return x.reshape(B, L, n, -1).transpose(0, 2, 1, 3)

    # Each projection is normed, then rotated, as M3 does. x is [B, L, hidden].
    def project(self, x: mx.array, offset: int):
        """-> q [B, Hq, L, D], k and v [B, Hkv, L, D]."""
        q = self._rope(self.q_norm(self._heads(self.q_proj(x), self.n_heads)), offset)
        k = self._rope(self.k_norm(self._heads(self.k_proj(x), self.n_kv_heads)), offset)
        return q, k, self._heads(self.v_proj(x), self.n_kv_heads)

    def index_keys(self, x: mx.array, offset: int) -> mx.array:
        """-> the one index-key head [B, L, Di]."""
        return self._rope(self.index_k_norm(self.index_k_proj(x)), offset)

    def index_queries(self, x: mx.array, offset: int) -> mx.array:
        """-> index queries [B, H_index, L, Di]."""
        heads = self._heads(self.index_q_proj(x), self.index_heads)
        return self._rope(self.index_q_norm(heads), offset)

    def __call__(self, x: mx.array, cache: Optional[LayerCache] = None) -> mx.array:
        B, L, _ = x.shape
        offset = cache.offset if cache is not None else 0
        q, k, v = self.project(x, offset)
        index_k = self.index_keys(x, offset) if self.sparse else None

        # What attention reads: the cache's K/V (maybe compact, maybe partly on the SSD), or
        # this step's own.
        kv = cache.update(k, v, index_k) if cache is not None else KVView(k, v, index_k, None, 0)

        if self.sparse and offset + L > self.topk * self.block_size:
            index_q = self.index_queries(x, offset)
            # The block choice is discrete: no gradient flows through it (as with the experts).
            selection = mx.stop_gradient(index_topk(
                index_q, kv.index_keys, offset=offset, block_size=self.block_size,
                topk=self.topk, index_scales=kv.index_scales))
            out = kv.sparse_attention(q, selection, scale=self.scale, block_size=self.block_size)
        else:
            # Up to top-k x block keys MSA selects every visible block: dense attention is exact.
            out = kv.dense_attention(q, scale=self.scale)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, sparse: bool, moe: bool):
        super().__init__()
        self.self_attn = Attention(args, sparse)
        if moe:
            self.block_sparse_moe = MoE(args)
        else:
            self.mlp = MLP(args, args.dense_intermediate_size)
        self.input_layernorm = GemmaRMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = GemmaRMSNorm(args.hidden_size, args.rms_norm_eps)
        # Tensor parallel (m3mlx.sharding): each rank of `group` computes a part of the
        # attention (its KV heads) and of the FFN (its experts, its shared-expert and MLP
        # columns); one all-reduce completes each.
        self.group = None

    def __call__(self, x: mx.array, cache: Optional[LayerCache] = None) -> mx.array:
        h = x + self._sum(self.self_attn(self.input_layernorm(x), cache))
        ffn = self.block_sparse_moe if "block_sparse_moe" in self else self.mlp
        return h + self._sum(ffn(self.post_attention_layernorm(h)))

    def _sum(self, part: mx.array) -> mx.array:
        return part if self.group is None else mx.distributed.all_sum(part, group=self.group)


class MTPLayer(nn.Module):
    """One multi-token-prediction module: a full sparse MoE layer fed [embedding; hidden]."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        H, eps = args.hidden_size, args.rms_norm_eps
        self.enorm = GemmaRMSNorm(H, eps)
        self.hnorm = GemmaRMSNorm(H, eps)
        self.eh_proj = nn.Linear(2 * H, H, bias=False)
        self.transformer_layer = DecoderLayer(args, sparse=True, moe=True)
        self.final_layernorm = GemmaRMSNorm(H, eps)

    def __call__(self, embeddings: mx.array, hidden: mx.array,
                 cache: Optional[LayerCache] = None) -> mx.array:
        """Returns the pre-norm hidden state; logits = lm_head(final_layernorm(result))."""
        z = self.eh_proj(mx.concatenate([self.enorm(embeddings), self.hnorm(hidden)], axis=-1))
        return self.transformer_layer(z, cache)


class MTP(nn.Module):
    def __init__(self, args: ModelArgs, num_layers: int):
        super().__init__()
        self.layers = [MTPLayer(args) for _ in range(num_layers)]


class TextModel(nn.Module):
    def __init__(self, args: ModelArgs, mtp_layers: int):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [
            DecoderLayer(args, sparse, moe)
            for sparse, moe in zip(args.sparse_layers, args.moe_layers)
        ]
        self.norm = GemmaRMSNorm(args.hidden_size, args.rms_norm_eps)
        if mtp_layers:
            self.mtp = MTP(args, mtp_layers)
        # Pipeline parallel (m3mlx.sharding.Stage): this rank runs a contiguous range of the
        # layers; a later stage takes its input from the one before, an earlier one passes its
        # output on (and returns what its send returns).
        self.stage = None

    def __call__(self, inputs: mx.array, cache=None) -> mx.array:
        stage = self.stage
        if stage is None or stage.first:
            h = self.embed_tokens(inputs)
        else:
            h = stage.receive(inputs.shape)
        for layer, c in zip(self.layers, cache or [None] * len(self.layers)):
            h = layer(h, c)
        if stage is not None and not stage.last:
            return stage.send(h)
        return self.norm(h)


class LanguageModel(nn.Module):
    def __init__(self, args: ModelArgs, mtp_layers: int):
        super().__init__()
        self.tie = args.tie_word_embeddings
        self.model = TextModel(args, mtp_layers)
        if not self.tie:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def logits(self, h: mx.array) -> mx.array:
        return self.model.embed_tokens.as_linear(h) if self.tie else self.lm_head(h)

    def __call__(self, inputs: mx.array, cache=None, last_only: bool = False) -> mx.array:
        h = self.model(inputs, cache)
        h = h[:, -1:] if last_only else h
        if self.model.stage is not None:  # pipeline: the last stage's output, on every rank
            h = self.model.stage.share(h)
        return self.logits(h)


class Model(nn.Module):
    """`mtp_layers`: how many MTP modules to build. Loaders count the ones the checkpoint has
    tensors for, not `num_mtp_modules` (the BF16 release's config says 7 and ships none)."""

    def __init__(self, args: ModelArgs, mtp_layers: int = 0):
        super().__init__()
        self.args = args
        self.language_model = LanguageModel(args, mtp_layers)
        self.kv_bits: Optional[int] = None  # how make_cache stores K/V by default (load sets it)
        # Set when the model is one rank's part of a model sharded over several processes
        # (m3mlx.sharding.Sharding): its plan and group.
        self.sharding = None

    def __call__(self, inputs: mx.array, cache: Optional[List[LayerCache]] = None,
                 last_only: bool = False) -> mx.array:
        """inputs [B, L] token ids -> logits [B, L, vocab] ([B, 1, vocab] with last_only:
        generation needs the last position's only, and the vocabulary projection is large)."""
        return self.language_model(inputs, cache, last_only)

    def hidden(self, inputs: mx.array, cache: Optional[List[LayerCache]] = None) -> mx.array:
        """inputs [B, L] -> the final hidden states [B, L, D], for positions whose logits are
        not needed (a pipeline stage before the last returns what its send returns)."""
        return self.language_model.model(inputs, cache)

    @property
    def layers(self) -> List[DecoderLayer]:
        return self.language_model.model.layers

    @property
    def has_mtp(self) -> bool:
        return "mtp" in self.language_model.model


def make_cache(model: Model, index_bits: Optional[int] = INDEX_BITS, *,
               kv_bits: Optional[int] = None, kv_memory=None, kv_cache_dir=None,
               kv_policy: Optional[str] = None) -> List[LayerCache]:
    """Per-layer caches; sparse layers also keep index keys: int8 with a scale per key
    (index_bits=8, the default) or in the activation dtype (16, or None).

    kv_bits=8 or 4 stores K/V compact (quantized per row of head_dim), 16 in the activation
    dtype, None as the model was loaded (`load(..., kv_bits=...)`). kv_memory (bytes, or a
    size such as "8GB") keeps at most that much of the sparse layers' K/V in memory, the other
    blocks in a file in kv_cache_dir (default $M3MLX_HOME/kv); kv_policy picks which blocks
    stay (see `kv_tier.POLICIES`). InputError when the model cannot store K/V that way.

    On one rank of a sharded model (m3mlx.sharding) the cache is that rank's part: its KV
    heads (tensor) or its layers (pipeline). kv_memory is then this rank's limit, for its own
    K/V, and its blocks go to the subdirectory rank-R of kv_cache_dir.
    """
    from .kv_tier import KVTier, kv_cache_dir as tier_dir, kv_group_size

    kv_bits = getattr(model, "kv_bits", None) if kv_bits is None else kv_bits
    kv_bits = None if kv_bits == 16 else kv_bits
    group = kv_group_size(model.args, kv_bits)
    tier = None
    sparse = [layer.self_attn for layer in model.layers if layer.self_attn.sparse]
    # A pipeline stage of dense layers only has no K/V to tier.
    sharding = getattr(model, "sharding", None)
    if kv_memory is not None and (sparse or sharding is None):
        dtype = model.layers[0].input_layernorm.weight.dtype  # the activations' (never quantized)
        rank = sharding.plan.rank if sharding is not None else None
        tier = KVTier.for_model(model.args, kv_memory, kv_bits=kv_bits, dtype=dtype,
                                directory=tier_dir(kv_cache_dir, rank), policy=kv_policy,
                                layers=len(sparse), heads=sparse[0].n_kv_heads if sparse else 0)
    return [
        LayerCache(index=layer.self_attn.sparse, index_bits=index_bits, kv_bits=kv_bits,
                   kv_group_size=group, tier=tier if layer.self_attn.sparse else None)
        for layer in model.layers
    ]


def is_precision_sensitive(path: str) -> bool:
    """Parameters kept in float32 whatever the model dtype: the router and its bias."""
    return path.endswith("block_sparse_moe.gate.weight") or path.endswith(
        "e_score_correction_bias")
