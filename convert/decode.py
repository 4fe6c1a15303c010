"""Source number formats decoded to float32: BF16, F16, F32, e4m3, UE8M0 exponents, packed E2M1.

Each takes rows of raw bytes as the checkpoint reader returns them (uint8 [rows, row bytes]).
"""

import numpy as np

from .errors import ConvertError


def bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)


def _e4m3_table() -> np.ndarray:
    table = np.zeros(256, dtype=np.float32)
    for b in range(256):
        sign = -1.0 if b & 0x80 else 1.0
        exp, man = (b >> 3) & 0xF, b & 0x7
        if exp == 0xF and man == 0x7:
            table[b] = np.nan
        elif exp == 0:
            table[b] = sign * man / 8.0 * 2.0**-6
        else:
            table[b] = sign * (1.0 + man / 8.0) * 2.0 ** (exp - 7)
    return table


E4M3 = _e4m3_table()
E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], np.float32)


def to_f32(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Rows of raw bytes [r, row_bytes] of a float tensor -> float32 [r, row_elems]."""
    if dtype == "BF16":
        return bf16_to_f32(raw)
    if dtype == "F16":
        return raw.view(np.float16).astype(np.float32)
    if dtype == "F32":
        return raw.view(np.float32)
    if dtype == "F8_E4M3":
        return E4M3[raw]
    raise ConvertError(f"cannot decode {dtype} as a float tensor")


def ue8m0_to_f32(raw: np.ndarray) -> np.ndarray:
    """UE8M0 exponent bytes -> 2**(e - 127) (255 is NaN)."""
    out = np.ldexp(np.float32(1.0), raw.astype(np.int32) - 127).astype(np.float32)
    out[raw == 255] = np.nan
    return out


def e2m1_unpack(raw: np.ndarray) -> np.ndarray:
    """Packed FP4 bytes [r, k/2] (low nibble first) -> float32 [r, k]."""
    out = np.empty(raw.shape[:-1] + (raw.shape[-1] * 2,), dtype=np.float32)
    out[..., 0::2] = E2M1[raw & 0xF]
    out[..., 1::2] = E2M1[raw >> 4]
    return out
