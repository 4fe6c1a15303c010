"""Custom ops of m3mlx: each a Metal kernel with an MLX-ops twin behind one public function."""

from .attention import dense_attention
from .dispatch import use_metal
from .kv import KV_BITS, QuantizedKV, quantize_kv
from .moe import (DenseWeight, ExpertWeights, QuantizedWeight, combine, expert_outputs,
                  moe_experts, shared_output, swiglu_oai)
from .msa import index_topk, sparse_attention
from .msa_ops import quantize_index_keys

__all__ = ["index_topk", "sparse_attention", "dense_attention", "quantize_index_keys", "use_metal",
           "moe_experts", "ExpertWeights", "QuantizedWeight", "DenseWeight", "swiglu_oai",
           "expert_outputs", "shared_output", "combine", "KV_BITS", "QuantizedKV", "quantize_kv"]
