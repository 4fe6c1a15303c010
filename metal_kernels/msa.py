"""Public MSA ops: block selection and block-sparse attention, dispatched Metal or MLX ops."""

from . import msa_kernels, msa_ops
from .dispatch import runs_metal


def index_topk(index_q, index_keys, *, offset, block_size, topk, index_scales=None,
               use_metal=None):
    """Top-k key blocks per (batch, KV head, query): int32 [B, H, L, topk], -1 padded.

    index_q [B, H, L, Di]; index_keys [B, S, Di] (float, or int8 with index_scales [B, S]).
    Query t sits at position offset + t; its own block is always selected.
    Metal or the MLX-ops twin as `dispatch` decides (`use_metal=True` insists on Metal).
    """
    if runs_metal("index_topk", use_metal, lambda: msa_kernels.index_topk_supported(
            index_q, index_keys, block_size, topk, index_scales)):
        return msa_kernels.index_topk(index_q, index_keys, offset, block_size, topk, index_scales)
    return msa_ops.index_topk(index_q, index_keys, offset, block_size, topk, index_scales)


def sparse_attention(q, keys, values, selection, *, offset, scale, block_size, slots=None,
                     use_metal=None):
    """Attention over the selected key blocks: q [B, H*G, L, D] -> [B, H*G, L, Dv].

    keys/values [B, H, S, D]: float arrays, or compact (`QuantizedKV`), decoded only where a
    selected block is read. With `slots` (int32 like selection), they are a pool of blocks and
    selected block `selection[..., i]` is stored at pool block `slots[..., i]`.
    Decode (L == 1) and prefill chunks use different Metal kernels; dispatch as index_topk.
    """
    if runs_metal("sparse_attention", use_metal, lambda: msa_kernels.sparse_attention_supported(
            q, keys, values, selection, block_size)):
        return msa_kernels.sparse_attention(q, keys, values, selection, offset, scale,
                                            block_size, slots=slots)
    return msa_ops.sparse_attention(q, keys, values, selection, offset, scale, block_size,
                                    slots)
