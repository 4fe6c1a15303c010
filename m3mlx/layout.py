"""Every text tensor an M3 config implies, with its shape and role, in checkpoint order.

The demo checkpoint is generated from it, and it is the contract both sides of a conversion
are checked against: the source's tensors must
be exactly these (plus vision tensors, which are dropped, and the quantization companions of its
format), and the output holds exactly these, with the routed experts stacked.
"""

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import mlx.core as mx

from .config import ModelArgs
from .weights import EXPERT_PROJECTIONS

PREFIX = "language_model."


@dataclass(frozen=True)
class Weight:
    """One text tensor of the Hugging Face checkpoint."""

    name: str  # e.g. language_model.model.layers.3.self_attn.q_proj.weight
    shape: Tuple[int, ...]
    role: str
    kind: str  # "linear", "embedding", "expert" (one slice of a stacked tensor) or "vector"
    module: Optional[str] = None  # mlx module path that owns it (quantizable kinds)
    expert: Optional[int] = None  # expert index for kind "expert"

    @property
    def quantizable(self) -> bool:
        return self.kind != "vector"

    @property
    def fp32(self) -> bool:
        """Stored in float32 in the release (the router and its correction bias)."""
        return self.role in ("router", "correction_bias")


def _layer(prefix: str, args: ModelArgs, sparse: bool, moe: bool, mtp: bool) -> List[Weight]:
    H, D = args.hidden_size, args.head_dim
    out: List[Weight] = []

    def linear(name, shape, role):
        # Inside the MTP module its projections take the MTP precision, except the index
        # projections, which stay as precise as everywhere else.
        role = "mtp" if mtp and role != "index" else role
        out.append(Weight(f"{prefix}.{name}.weight", shape, role, "linear", f"{prefix}.{name}"))

    def vector(name, n, role):
        out.append(Weight(f"{prefix}.{name}", (n,), role, "vector"))

    vector("input_layernorm.weight", H, "norm")
    vector("post_attention_layernorm.weight", H, "norm")
    linear("self_attn.q_proj", (args.num_attention_heads * D, H), "attention")
    linear("self_attn.k_proj", (args.num_key_value_heads * D, H), "attention")
    linear("self_attn.v_proj", (args.num_key_value_heads * D, H), "attention")
    linear("self_attn.o_proj", (H, args.num_attention_heads * D), "attention")
    vector("self_attn.q_norm.weight", D, "norm")
    vector("self_attn.k_norm.weight", D, "norm")
    if sparse:
        Di = args.index_head_dim
        linear("self_attn.index_q_proj", (args.index_n_heads * Di, H), "index")
        linear("self_attn.index_k_proj", (Di, H), "index")
        vector("self_attn.index_q_norm.weight", Di, "norm")
        vector("self_attn.index_k_norm.weight", Di, "norm")
    if moe:
        E, F, Fs = args.num_local_experts, args.intermediate_size, args.shared_intermediate_size
        moe_p = f"{prefix}.block_sparse_moe"
        # The router keeps its role inside MTP too: it stays fp32 whatever the MTP precision.
        out.append(Weight(f"{moe_p}.gate.weight", (E, H), "router", "linear", f"{moe_p}.gate"))
        vector("block_sparse_moe.e_score_correction_bias", E, "correction_bias")
        role = "mtp" if mtp else "experts"
        for src, dst in EXPERT_PROJECTIONS.items():
            shape = (H, F) if dst == "down_proj" else (F, H)
            module = f"{moe_p}.switch_mlp.{dst}"
            for e in range(E):
                out.append(Weight(f"{moe_p}.experts.{e}.{src}.weight", shape, role, "expert",
                                  module, e))
        if args.n_shared_experts:
            linear("block_sparse_moe.shared_experts.gate_proj", (Fs, H), "shared_expert")
            linear("block_sparse_moe.shared_experts.up_proj", (Fs, H), "shared_expert")
            linear("block_sparse_moe.shared_experts.down_proj", (H, Fs), "shared_expert")
    else:
        Fd = args.dense_intermediate_size
        linear("mlp.gate_proj", (Fd, H), "dense_mlp")
        linear("mlp.up_proj", (Fd, H), "dense_mlp")
        linear("mlp.down_proj", (H, Fd), "dense_mlp")
    return out


def text_weights(args: ModelArgs, mtp_layers: int = 0) -> List[Weight]:
    """The text tower's tensors (Hugging Face names), MTP layers included when asked for."""
    H, V = args.hidden_size, args.vocab_size
    out = [Weight(f"{PREFIX}model.embed_tokens.weight", (V, H), "embed", "embedding",
                  f"{PREFIX}model.embed_tokens")]
    for i, (sparse, moe) in enumerate(zip(args.sparse_layers, args.moe_layers)):
        out += _layer(f"{PREFIX}model.layers.{i}", args, sparse, moe, mtp=False)
    out.append(Weight(f"{PREFIX}model.norm.weight", (H,), "norm", "vector"))
    if not args.tie_word_embeddings:
        out.append(Weight(f"{PREFIX}lm_head.weight", (V, H), "lm_head", "linear",
                          f"{PREFIX}lm_head"))
    for k in range(mtp_layers):
        p = f"{PREFIX}model.mtp.layers.{k}"
        out += [Weight(f"{p}.enorm.weight", (H,), "norm", "vector"),
                Weight(f"{p}.hnorm.weight", (H,), "norm", "vector"),
                Weight(f"{p}.eh_proj.weight", (H, 2 * H), "mtp", "linear", f"{p}.eh_proj")]
        out += _layer(f"{p}.transformer_layer", args, sparse=True, moe=True, mtp=True)
        out.append(Weight(f"{p}.final_layernorm.weight", (H,), "norm", "vector"))
    return out


def hf_tensors(params: Dict[str, mx.array], args: ModelArgs, *, mtp_layers: int = 0,
               dtype: Optional[mx.Dtype] = None) -> Dict[str, mx.array]:
    """A model's parameters (MLX names, experts stacked) under the Hugging Face checkpoint's
    names, one tensor per expert: the inverse of loading an original checkpoint. `dtype` casts
    every tensor but the fp32 ones (router and correction bias), as the release stores them."""
    out = {}
    for w in text_weights(args, mtp_layers):
        x = params[f"{w.module}.weight"][w.expert] if w.kind == "expert" else params[w.name]
        out[w.name] = x if dtype is None or w.fp32 else x.astype(dtype)
    return out
