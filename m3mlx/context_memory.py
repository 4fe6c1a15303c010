"""What the context cache of a model costs at a context length: the planner's K/V accounting.

Per token, the cache holds K and V on every layer (in the activation dtype, or compact at
kv_bits) and index keys on MSA layers (int8 with a float32 scale, or the activation dtype). With
a memory limit (kv_memory) the MSA layers' K/V beyond the limit live on the SSD; index keys and
dense-attention layers' K/V always stay resident (every decode step reads all of them).

`context_cost` answers "how much memory and disk does a context of N tokens take", and
`tier_read_time` "how long does a decode step wait on the SSD" from a miss rate. Both use the
runtime's own sizes (`kv_row_bytes`, the tier's pool sizing and record alignment), so the plan is
what the cache will do.
"""

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx

from .units import parse_size
from .kv_tier import RECORD_ALIGN, kv_group_size
from .metal_kernels.kv import kv_row_bytes


@dataclass(frozen=True)
class ContextCost:
    """Bytes of one sequence's context cache. `resident` = index_keys + dense_kv + msa_resident;
    `on_disk` is what the tier's file holds (records aligned to 16 KiB)."""

    tokens: int
    index_keys: int
    dense_kv: int  # K/V of dense-attention layers: always resident
    msa_kv: int  # K/V of MSA layers, wherever it lies
    msa_resident: int
    on_disk: int

    @property
    def resident(self) -> int:
        return self.index_keys + self.dense_kv + self.msa_resident

    @property
    def total(self) -> int:
        return self.index_keys + self.dense_kv + self.msa_kv


def index_key_bytes(args, index_bits: Optional[int], dtype: mx.Dtype) -> int:
    """One token's index key on one MSA layer."""
    if index_bits == 8:
        return args.index_head_dim + 4  # int8 values and a float32 scale
    return args.index_head_dim * dtype.size


def context_cost(args, tokens: int, *, kv_bits: Optional[int] = None, index_bits: Optional[int] = 8,
                 kv_memory=None, dtype: mx.Dtype = mx.bfloat16) -> ContextCost:
    """The context cache of `tokens` tokens for the model `args` (a ModelArgs), batch 1."""
    msa = sum(bool(s) for s in args.sparse_layers)
    dense = args.num_hidden_layers - msa
    row = 2 * args.num_key_value_heads * kv_row_bytes(
        args.head_dim, kv_bits, kv_group_size(args, kv_bits), dtype)  # K and V, every head
    msa_kv = msa * tokens * row
    resident, on_disk = msa_kv, 0
    if kv_memory is not None:
        limit = parse_size(kv_memory, "kv_memory")
        block = args.index_block_size
        lane_block = block * row // args.num_key_value_heads  # one block of one head
        lanes = args.num_key_value_heads
        # The tier's sizing: the limit split evenly, at least one step's selection per lane.
        slots = max(limit // max(1, msa * lanes * lane_block), args.index_topk_blocks + 1)
        blocks = -(-tokens // block)
        held = min(blocks, slots)
        resident = msa * lanes * held * lane_block
        aligned = -(-lane_block // RECORD_ALIGN) * RECORD_ALIGN
        on_disk = msa * lanes * (blocks - held) * aligned
    return ContextCost(tokens, msa * tokens * index_key_bytes(args, index_bits, dtype),
                       dense * tokens * row, msa_kv, resident, on_disk)


def tier_read_time(args, miss_rate: float, *, kv_bits: Optional[int] = None,
                   dtype: mx.Dtype = mx.bfloat16, ssd_bandwidth: float,
                   ssd_latency: float = 100e-6, overlap: float = 0.0) -> dict:
    """A decode step's SSD reads: blocks, bytes and seconds, when `miss_rate` of the selected
    history blocks (each KV head of each MSA layer selects top-k minus its own block) are not
    resident. A layer's reads go out together (parallel), so a layer waits one latency plus
    its bytes at `ssd_bandwidth`, less `overlap` seconds of the layer's own work (the
    projections computed while its blocks are read)."""
    msa = sum(bool(s) for s in args.sparse_layers)
    heads = args.num_key_value_heads
    row = 2 * kv_row_bytes(args.head_dim, kv_bits, kv_group_size(args, kv_bits), dtype)
    record = -(-args.index_block_size * row // RECORD_ALIGN) * RECORD_ALIGN
    per_layer = miss_rate * heads * (args.index_topk_blocks - 1)
    layer_wait = ssd_latency + per_layer * record / ssd_bandwidth if per_layer else 0.0
    return {"blocks": msa * per_layer, "bytes": msa * per_layer * record,
            "seconds": msa * max(0.0, layer_wait - overlap)}
