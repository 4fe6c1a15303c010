"""The one rule every op follows to choose between its Metal kernel and its MLX-ops twin.

`M3MLX_KERNELS=metal|ops|auto` (default auto) sets the path for the whole process; a per-call
`use_metal=` overrides it:

- auto: Metal when MLX has a Metal GPU stream and a kernel covers the call; the twin otherwise.
- metal (or `use_metal=None` under it): the same, but a missing Metal back end is an error.
- `use_metal=True`: the kernel must run: an error without Metal or when no kernel covers the call.
- ops, `use_metal=False`: the twin.
"""

import os
from typing import Callable

import mlx.core as mx

ENV_VAR = "M3MLX_KERNELS"


def use_metal(requested=None) -> bool:
    """True to run Metal kernels, False for the twins; raises when Metal is forced but absent."""
    if requested is None:
        mode = os.environ.get(ENV_VAR, "auto").lower()
        if mode not in ("auto", "metal", "ops"):
            raise ValueError(f"{ENV_VAR}={mode!r}: expected 'auto', 'metal' or 'ops'")
        requested = None if mode == "auto" else mode == "metal"
    available = mx.metal.is_available() and mx.default_device() == mx.gpu
    if requested is None:
        return available
    if requested and not available:
        raise RuntimeError(
            "Metal kernels were requested but MLX has no Metal GPU stream here; "
            f"unset {ENV_VAR} (or pass use_metal=None) to use the MLX-ops path"
        )
    return bool(requested)


def runs_metal(op: str, requested, supported: Callable[[], bool]) -> bool:
    """Whether `op` runs its Metal kernel for this call; `supported()` says if one covers it."""
    if not use_metal(requested):
        return False
    if supported():
        return True
    if requested:
        raise ValueError(f"{op}: no Metal kernel covers these shapes, dtypes or formats; "
                         "pass use_metal=None to use the MLX-ops path")
    return False
