"""Tensor names: from a Hugging Face M3 checkpoint to the MLX (mlx-lm `minimax_m3_vl`) layout.

The MLX layout keeps every Hugging Face name except the routed experts, which are stacked per
projection: `...block_sparse_moe.experts.{e}.w1.weight` -> `...block_sparse_moe.switch_mlp.
gate_proj.weight[e]` (w1 gate, w3 up, w2 down). Vision tensors are dropped. MTP tensors keep
their names and live in their own file so that mlx-lm, which does not know them, still loads.
"""

import re
from typing import Dict, Iterable, Optional, Tuple

import mlx.core as mx

from .errors import CheckpointError

VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.", "patch_merge_mlp.")
EXPERT_PROJECTIONS = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
MTP_MARKER = ".mtp."
MTP_FILE = "mtp.safetensors"

_MTP_LAYER = re.compile(r"\.mtp\.layers\.(\d+)\.")
_EXPERT = re.compile(r"^(?P<moe>.+\.block_sparse_moe)\.experts\.(?P<e>\d+)\.(?P<w>w[123])\.(?P<part>.+)$")


def is_vision(name: str) -> bool:
    return name.startswith(VISION_PREFIXES)


def is_mtp(name: str) -> bool:
    return MTP_MARKER in name


def mtp_layer_count(names: Iterable[str]) -> int:
    """MTP modules the tensors hold (highest layer index + 1): the count a model is built
    with, whatever `num_mtp_modules` claims (the BF16 release says 7 and ships none)."""
    ids = [int(m[1]) for n in names for m in [_MTP_LAYER.search(n)] if m]
    return max(ids) + 1 if ids else 0


def expert_slot(name: str) -> Optional[Tuple[str, int]]:
    """(stacked MLX name, expert index) for a per-expert Hugging Face tensor, else None."""
    m = _EXPERT.match(name)
    if m is None:
        return None
    proj = EXPERT_PROJECTIONS[m["w"]]
    return f"{m['moe']}.switch_mlp.{proj}.{m['part']}", int(m["e"])


def mxfp8_to_mlx(weights: Dict[str, mx.array]) -> Dict[str, mx.array]:
    """MXFP8 (e4m3 bytes + one UE8M0 exponent per 32 values) is MLX's mxfp8 layout:
    the bytes become uint32 words and `weight_scale_inv` becomes `scales`."""
    out = dict(weights)
    for name in [n for n in out if n.endswith(".weight_scale_inv")]:
        base = name[: -len(".weight_scale_inv")]
        out[f"{base}.scales"] = out.pop(name)
        w = out[f"{base}.weight"]
        out[f"{base}.weight"] = w.view(mx.uint8).view(mx.uint32) if w.dtype != mx.uint32 else w
    return out


def stack_experts(weights: Dict[str, mx.array], num_experts: int) -> Dict[str, mx.array]:
    """Stack per-expert tensors into switch_mlp tensors; other names pass through."""
    out: Dict[str, mx.array] = {}
    groups: Dict[str, Dict[int, mx.array]] = {}
    for name, value in weights.items():
        slot = expert_slot(name)
        if slot is None:
            out[name] = value
        else:
            groups.setdefault(slot[0], {})[slot[1]] = value
    for name, experts in groups.items():
        missing = sorted(set(range(num_experts)) - set(experts))
        if missing:
            raise CheckpointError(
                f"{name}: experts {missing[:8]}{'...' if len(missing) > 8 else ''} are "
                f"missing from the checkpoint (config says {num_experts} experts)"
            )
        shapes = {tuple(experts[e].shape) for e in range(num_experts)}
        if len(shapes) > 1:
            raise CheckpointError(f"{name}: the experts' tensors differ in shape "
                                  f"({sorted(shapes)[:3]}); the checkpoint is damaged: download "
                                  "it again")
        out[name] = mx.stack([experts[e] for e in range(num_experts)])
    return out
