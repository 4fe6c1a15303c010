"""What a model directory holds: layer map, parameter counts, bytes on disk and in memory."""

import math
from pathlib import Path
from typing import Dict, List

from mlx.utils import tree_flatten

from .checkpoint import Checkpoint
from .config import ConfigError, ModelArgs
from .errors import reported_as
from .layout import text_weights
from .loading import LoadError, model_from_checkpoint


def parameter_counts(args: ModelArgs) -> Dict[str, int]:
    """Total and active-per-token parameters of the text tower (embedding counted once)."""
    H, D = args.hidden_size, args.head_dim
    attn = H * D * (2 * args.num_attention_heads + 2 * args.num_key_value_heads)
    index = H * args.index_head_dim * (args.index_n_heads + 1)
    expert = 3 * H * args.intermediate_size
    shared = 3 * H * args.shared_intermediate_size * args.n_shared_experts
    dense_mlp = 3 * H * args.dense_intermediate_size
    router = H * args.num_local_experts
    head = args.vocab_size * H
    total = active = head * (1 if args.tie_word_embeddings else 2)
    active -= head  # the embedding is a lookup, not a matmul
    for sparse, moe in zip(args.sparse_layers, args.moe_layers):
        layer = attn + (index if sparse else 0)
        if moe:
            total += layer + router + shared + args.num_local_experts * expert
            active += layer + router + shared + args.num_experts_per_tok * expert
        else:
            total += layer + dense_mlp
            active += layer + dense_mlp
    return {"total": total, "active": active}


def layer_map(args: ModelArgs) -> List[str]:
    """Runs of layers with the same kind, e.g. ['0-2: dense attention + dense MLP', ...]."""
    kinds = [("MSA" if s else "dense attention") + (" + MoE" if m else " + dense MLP")
             for s, m in zip(args.sparse_layers, args.moe_layers)]
    runs, start = [], 0
    for i in range(1, len(kinds) + 1):
        if i == len(kinds) or kinds[i] != kinds[start]:
            span = f"{start}" if i - 1 == start else f"{start}-{i - 1}"
            runs.append(f"{span}: {kinds[start]}")
            start = i
    return runs


def precision(module_or_array) -> str:
    """How a module's weight (or a vector) is stored: 'affine 4-bit g64', 'mxfp8', 'bfloat16'."""
    mode = getattr(module_or_array, "mode", None)
    if mode is not None and hasattr(module_or_array, "bits"):
        if mode == "affine":
            return f"affine {module_or_array.bits}-bit g{module_or_array.group_size}"
        return mode
    array = module_or_array.weight if hasattr(module_or_array, "weight") else module_or_array
    return str(array.dtype).replace("mlx.core.", "")


def role_precisions(model, args: ModelArgs) -> Dict[str, dict]:
    """Per tensor role (layout.py's roles): its precisions, parameters and bits per weight."""
    modules = dict(model.named_modules())
    params = dict(tree_flatten(model.parameters()))
    mtp = len(model.language_model.model.mtp.layers) if model.has_mtp else 0
    roles: Dict[str, dict] = {}
    seen = set()
    for w in text_weights(args, mtp):
        key = w.module or w.name
        if key in seen:  # one stacked module holds every expert
            continue
        seen.add(key)
        count = math.prod(w.shape) * (args.num_local_experts if w.kind == "expert" else 1)
        if w.module:
            what = precision(modules[w.module])
            stored = [a for name, a in params.items() if name.startswith(w.module + ".")]
        else:
            what, stored = precision(params[w.name]), [params[w.name]]
        r = roles.setdefault(w.role, {"precisions": set(), "params": 0, "bytes": 0})
        r["precisions"].add(what)
        r["params"] += count
        r["bytes"] += sum(a.nbytes for a in stored)
    return {role: {"precision": ", ".join(sorted(r["precisions"])), "params": r["params"],
                   "bpw": 8 * r["bytes"] / max(r["params"], 1)} for role, r in roles.items()}


def source_kind(config: dict) -> str:
    """What sort of model directory this is, from its config.json."""
    conversion = config.get("m3mlx_conversion")
    if conversion:
        return f"m3mlx conversion (recipe {conversion.get('recipe')}, from {conversion.get('source_format')})"
    if "quantization" in config:
        return "MLX conversion (mlx-lm layout)"
    method = str((config.get("quantization_config") or {}).get("quant_method", "")).lower()
    if method:
        return f"original {method.upper()} checkpoint (Hugging Face layout)"
    return "original checkpoint (Hugging Face layout)"


def describe(path) -> dict:
    """What `m3mlx info` prints, from the checked checkpoint and the model built lazily (no
    weight is read)."""
    path = Path(path)
    with reported_as(LoadError, ConfigError):
        ckpt = Checkpoint.open(path)
        model = model_from_checkpoint(ckpt, lazy=True)
    config, args = ckpt.config, ckpt.args
    memory = sum(a.nbytes for _, a in tree_flatten(model.parameters()))
    roles = role_precisions(model, args)
    main = max(roles.values(), key=lambda r: r["params"])
    return {
        "path": str(path),
        "layers": layer_map(args),
        "msa": {"block_size": args.index_block_size, "topk_blocks": args.index_topk_blocks,
                "index_heads": args.index_n_heads},
        "experts": f"{args.num_local_experts} routed (top-{args.num_experts_per_tok})"
                   f" + {args.n_shared_experts} shared",
        "parameters": parameter_counts(args),
        "mtp": model.has_mtp,
        "disk_bytes": ckpt.disk_bytes,
        "memory_bytes": memory,
        "source": source_kind(config),
        "quantization": main["precision"],
        "bits_per_weight": 8 * memory / max(sum(r["params"] for r in roles.values()), 1),
        "roles": roles,
        "memory_plan": _memory_plan(ckpt),
    }


def _memory_plan(ckpt) -> str:
    """One line of `m3mlx plan` for this machine: whether the model fits, or what streams."""
    from .hardware import machine_memory
    from .plan import PLAN_CONTEXT, BudgetError, footprint, plan_budget
    from .units import format_size

    fp, memory = footprint(ckpt), machine_memory()
    head = (f"{format_size(fp.resident)} besides the routed experts, "
            f"{format_size(fp.experts_total)} of routed experts; in this machine's "
            f"{format_size(memory)} at {PLAN_CONTEXT:,} tokens: ")
    try:
        b = plan_budget(fp, memory)
    except BudgetError as e:
        return head + str(e)
    if not b.streams:
        return head + "everything fits"
    return head + (f"the experts stream through a cache of {b.slots} of {b.experts} per layer "
                   f"({100 * b.share:.0f}%): load with --memory-limit "
                   f"{format_size(memory).replace(' ', '')}")


def _human(n: float, unit: str = "") -> str:
    for scale, prefix in ((1e12, "T"), (1e9, "G" if unit else "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.2f} {prefix}{unit}"
    return f"{n:.0f} {unit}".rstrip()


def format_info(info: dict) -> str:
    p = info["parameters"]
    lines = [
        f"model: {info['path']}",
        f"kind: {info['source']}",
        "layers:", *[f"  {run}" for run in info["layers"]],
        f"MSA: blocks of {info['msa']['block_size']}, top-{info['msa']['topk_blocks']} per KV head"
        f" ({info['msa']['index_heads']} index heads)",
        f"experts: {info['experts']}",
        f"parameters: {_human(p['total'])} total, {_human(p['active'])} active per token",
        f"MTP module: {'present' if info['mtp'] else 'absent'}",
        f"on disk: {_human(info['disk_bytes'], 'B')}, in memory: {_human(info['memory_bytes'], 'B')}",
        f"quantization: {info['quantization']} for most weights, "
        f"{info['bits_per_weight']:.2f} bits per weight overall",
        f"memory: {info['memory_plan']} (`m3mlx plan PATH --memory SIZE` for other budgets)",
    ]
    for role, r in info["roles"].items():
        lines.append(f"  {role:<16}{r['precision']:<24}{_human(r['params']):>10}"
                     f"{r['bpw']:>7.2f} bpw")
    return "\n".join(lines)
