"""Choosing between a Metal kernel and its MLX-ops twin.

`M3MLX_KERNELS=metal|ops|auto` (default auto) or a per-call `use_metal=` forces a path. Auto
picks Metal when MLX has a Metal back end and the default stream is on the GPU.
"""

import os

import mlx.core as mx

ENV_VAR = "M3MLX_KERNELS"


def use_metal(requested=None) -> bool:
    """True to run the Metal kernel, False for the twin; raises when Metal is forced but absent."""
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
