"""What a recipe makes of the real MiniMax-M3, without its files.

The plan needs only tensor names, shapes and dtypes, and `m3mlx.layout` with the default
`ModelArgs` is the real geometry (60 layers, 128 experts of 3072, vocabulary 200064): a source
made of headers alone gives the exact output size that `convert --dry-run` prints for the
release, for any recipe, on any machine.
"""

import math
from pathlib import Path
from typing import Mapping, Optional

from m3mlx.checkpoint import DTYPE_SIZE, Checkpoint, TensorInfo
from m3mlx.config import ModelArgs
from m3mlx.layout import text_weights

from .plan import Plan, build_plan
from .recipes import resolve
from .source import Source, SourceWeight

NOWHERE = Path("<headers only>")


def headers_source(args: Optional[ModelArgs] = None) -> Source:
    """The BF16 release as a source of headers (the router and its bias fp32)."""
    args = args or ModelArgs()
    weights = []
    for w in text_weights(args):
        dtype = "F32" if w.fp32 else "BF16"
        info = TensorInfo(w.name, dtype, w.shape, NOWHERE, -1,
                          math.prod(w.shape) * DTYPE_SIZE[dtype])
        weights.append(SourceWeight(w, "float", info))
    checkpoint = Checkpoint(NOWHERE, {}, args, None, None, {},
                            {s.data.name: s.data for s in weights})
    return Source(NOWHERE, {}, args, "bf16", weights, 0, [], [], checkpoint, remote=True)


def plan_for(recipe: str = "m3", *, mode: str = "affine", bits: Optional[int] = None,
             group_size: Optional[int] = None, roles: Optional[Mapping[str, object]] = None,
             dtype: str = "bfloat16", args: Optional[ModelArgs] = None) -> Plan:
    """The conversion plan of the BF16 release (or `args`' geometry) with these options."""
    base, specs = resolve(recipe, mode, bits, group_size, roles, dtype)
    return build_plan(headers_source(args), specs, base=base, dtype=dtype, recipe=recipe,
                      explicit_roles=set(roles or ()))
