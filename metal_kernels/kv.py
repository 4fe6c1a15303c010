"""Compact K/V: cache rows quantized along head_dim, as the attention ops read them.

A K or V buffer [B, H, S, D] is kept the way `mx.quantize` packs a matrix along its last axis
(affine): `data` uint32 [B, H, S, D * bits / 32], `scales` and `biases` [B, H, S, D / group],
x ~= scale * q + bias for each group of `group` consecutive values of a row. Every position is
quantized on its own, so appending a token touches no other row, and a 128-token block of the
cache is a contiguous run of rows: the ops gather and decode only the blocks they attend to.

Scales and biases are float16 for half-precision K/V (bfloat16's 8-bit mantissa in the bias of
a group costs as much error as the 8-bit codes themselves), float32 for float32 K/V. The
format per bit width (group size, scale type) was chosen by measured error:
`benchmarks/kv_formats.py`, summarized in README.md.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import mlx.core as mx

KV_BITS = (8, 4)
GROUP_SIZES = (32, 64, 128)  # what mx.quantize takes (affine)
DEFAULT_GROUP = {8: 64, 4: 32}
_HALF_MAX = 65504.0


@dataclass(frozen=True)
class QuantizedKV:
    """K or V as packed codes with per-group scales and biases (see the module docstring)."""

    data: mx.array  # uint32 [..., S, D * bits / 32]
    scales: mx.array  # [..., S, D / group_size]
    biases: mx.array
    bits: int
    group_size: int

    @property
    def shape(self) -> tuple:
        """The shape of the float rows: [..., S, D]."""
        return (*self.data.shape[:-1], self.data.shape[-1] * 32 // self.bits)

    @property
    def ndim(self) -> int:
        return self.data.ndim

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + self.scales.nbytes + self.biases.nbytes

    @property
    def arrays(self) -> tuple:
        return (self.data, self.scales, self.biases)

    def map(self, f: Callable[[mx.array], mx.array]) -> "QuantizedKV":
        """The same rows after `f` (a slice, reshape or gather over the leading/row axes) is
        applied to each of the three arrays."""
        return replace(self, data=f(self.data), scales=f(self.scales), biases=f(self.biases))

    def rows(self, start: int, stop: int) -> "QuantizedKV":
        """Rows [start, stop) of the position axis (the second to last)."""
        return self.map(lambda a: a[..., start:stop, :])

    def dequantize(self, dtype: mx.Dtype) -> mx.array:
        out = mx.dequantize(self.data, self.scales, self.biases, self.group_size, self.bits)
        return out.astype(dtype)


def scale_dtype(dtype: mx.Dtype) -> mx.Dtype:
    """The type of the scales and biases for K/V computed in `dtype`."""
    return mx.float32 if dtype == mx.float32 else mx.float16


def kv_row_bytes(head_dim: int, bits: int | None, group_size: int | None,
                 dtype: mx.Dtype) -> int:
    """Bytes one position's K (or V) row of one head takes: `head_dim` values in `dtype`, or
    compact at `bits` with a scale and a bias per group (in `scale_dtype(dtype)`)."""
    if not bits:
        return head_dim * dtype.size
    return head_dim * bits // 8 + 2 * (head_dim // group_size) * scale_dtype(dtype).size


def group_size_for(bits: int, head_dim: int) -> int:
    """The group size K/V rows of `head_dim` values take at `bits`: DEFAULT_GROUP[bits], or
    the largest smaller one that divides head_dim. ValueError when none can be used."""
    if bits not in KV_BITS:
        raise ValueError(f"kv_bits={bits!r}: compact K/V is 8 or 4 bits (or None for the "
                         "activation dtype)")
    fits = [g for g in GROUP_SIZES if g <= DEFAULT_GROUP[bits] and head_dim % g == 0]
    if not fits:
        raise ValueError(f"kv_bits={bits} stores rows in groups of {GROUP_SIZES[0]} values or "
                         f"more; this model's head_dim is {head_dim}, not a multiple of "
                         f"{GROUP_SIZES[0]}")
    return max(fits)


def quantize_kv(x: mx.array, bits: int, group_size: int) -> QuantizedKV:
    """Rows of x [..., S, D] quantized along D."""
    dtype = scale_dtype(x.dtype)
    if dtype == mx.float16:  # bfloat16 values beyond float16's range saturate, not overflow
        x = mx.clip(x, -_HALF_MAX, _HALF_MAX).astype(mx.float16)
    data, scales, biases = mx.quantize(x, group_size, bits)
    return QuantizedKV(data, scales, biases, bits, group_size)


def block_matmul(a: mx.array, blocks, lhs: mx.array, rhs: mx.array, transpose: bool) -> mx.array:
    """a[lhs[i]] @ B[rhs[i]] (B transposed with `transpose`) for every pair i, where B are the
    rows [block, D] of `blocks` [N, block, D]: float arrays or a QuantizedKV, whose blocks are
    decoded only as they are multiplied (`mx.gather_qmm`)."""
    if isinstance(blocks, QuantizedKV):
        return mx.gather_qmm(a, *blocks.arrays, lhs_indices=lhs, rhs_indices=rhs,
                             transpose=transpose, group_size=blocks.group_size, bits=blocks.bits)
    b = blocks.swapaxes(-1, -2) if transpose else blocks
    if a.dtype == mx.float32 or mx.default_device() == mx.gpu:
        return mx.gather_mm(a, b, lhs, rhs)
    # The CPU gather_mm only takes float32: gather the blocks and upcast them.
    return (a[lhs].astype(mx.float32) @ b[rhs].astype(mx.float32)).astype(a.dtype)
