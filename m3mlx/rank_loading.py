"""One rank's part of a checkpoint: each rank of a sharded run reads only the bytes its plan holds.

Parameters split along their first axis (the stacked experts, the KV heads' projections, the
vocabulary) are read as byte ranges of their rows: rank r of N reads experts [r*E/N, (r+1)*E/N)
of each stacked expert tensor and nothing of the others. Parameters split along their last axis
(o_proj and the down projections of the shared expert and dense MLP, whose rows interleave the
ranks' columns) are read whole, one batch at a time, and sliced; only the slice stays resident
(their rows are 4-16 KB, the reader's aligned reads 16 KiB: reading a rank's columns alone would
read the same pages).

With an expert cache (`expert_cache`, `memory_limit`: sizes per rank) the rank's routed experts
are not read at load: `m3mlx.experts.attach` gives its MoE layers pools of slots for the experts
it computes, read by byte range from the same files when its router picks them.
"""

from typing import Dict, List, Optional, Tuple

import mlx.core as mx
from mlx.utils import tree_flatten

from .checkpoint import Checkpoint, TensorInfo, read_tensor_rows
from .config import ConfigError
from .errors import reported_as
from .kv_tier import kv_group_size
from .experts import ExpertCache, attach, is_routed_expert
from .loading import (LoadError, _check_names, _evaluate, _is_original_layout, _quantization,
                      _quantize, expert_cache_for, load_tokenizer, resolve)
from .model import Model, is_precision_sensitive
from .plan import BudgetError
from .sharding import EMBED, Plan, ShardingError, apply_plan
from .weights import is_mtp, is_vision

# Stored types as MLX reads them (8-bit floats as their raw bytes).
_MLX = {"F32": mx.float32, "F16": mx.float16, "BF16": mx.bfloat16, "U32": mx.uint32,
        "U8": mx.uint8, "I8": mx.int8, "I32": mx.int32, "U16": mx.uint16, "I16": mx.int16,
        "F8_E4M3": mx.uint8, "F8_E5M2": mx.uint8, "F8_E8M0": mx.uint8, "BOOL": mx.bool_,
        "I64": mx.int64, "U64": mx.uint64}
_READ_BYTES = 1 << 30  # read per batch: bounds what a column-split tensor holds unsliced


def text_tensors(ckpt: Checkpoint) -> Dict[str, TensorInfo]:
    """The text tower's tensors (no vision tower, no MTP: nothing generates with it yet)."""
    return {n: t for n, t in ckpt.tensors.items() if not is_vision(n) and not is_mtp(n)}


def make_plan(kind: str, ckpt: Checkpoint, rank: int, size: int) -> Plan:
    """The plan `kind` for rank `rank` of `size`; the pipeline's stages balanced by bytes."""
    args = ckpt.args
    if kind == "tensor":
        return Plan.tensor(args, rank, size)
    layer_bytes = [0] * args.num_hidden_layers
    embed = 0
    for name, t in text_tensors(ckpt).items():
        if name.startswith(EMBED):
            embed += t.nbytes
        elif name.startswith("language_model.model.layers."):
            layer_bytes[int(name.split(".")[3])] += t.nbytes
    return Plan.pipeline(args, rank, size, layer_bytes, embed_bytes=embed)


def held_bytes(plan: Plan, tensors: Dict[str, TensorInfo]) -> Tuple[int, int, int]:
    """(bytes this rank holds, bytes every rank holds whole, the whole model's bytes), from
    the checkpoint's tensors and the plan alone."""
    held = replicated = total = 0
    for name, t in tensors.items():
        total += t.nbytes
        if plan.replicated(name):
            replicated += t.nbytes
        if plan.local_layer(name) is not None:
            held += t.nbytes if plan.part(name, t.shape) is None else t.nbytes // plan.size
    return held, replicated, total


def _stand_in(t: TensorInfo) -> mx.array:
    """A lazy array of the tensor's shape and stored type, for the name and shape checks
    (never evaluated, so never allocated)."""
    return mx.zeros(t.shape, _MLX.get(t.dtype, mx.uint8))


def _hidden_dtype(tensors: Dict[str, TensorInfo], dtype: Optional[mx.Dtype]) -> mx.Dtype:
    if dtype is not None:
        return dtype
    t = tensors.get(EMBED + "scales") or tensors[EMBED + "weight"]
    return _MLX[t.dtype]


def _read_part(plan: Plan, batch: List[Tuple[str, TensorInfo]]) -> Dict[str, mx.array]:
    """This rank's part of each tensor of `batch`, by its name in this rank's model."""
    requests, cuts = [], []
    for name, t in batch:
        part = plan.part(name, t.shape)
        if part is not None and part[0] == 0 and len(t.shape) > 1:
            requests.append((t, part[1], part[2] - part[1]))
            cuts.append(None)
        else:
            requests.append((t, 0, None))
            cuts.append(part)
    out = {}
    for (name, _), a, cut in zip(batch, read_tensor_rows(requests, to_mlx=True), cuts):
        if cut is not None:
            axis, start, stop = cut
            index = [slice(None)] * a.ndim
            index[axis] = slice(start, stop)
            a = mx.contiguous(a[tuple(index)])
            mx.eval(a)  # drop the whole tensor now, keep the slice
        out[plan.local_layer(name)] = a
    return out


def model_for_rank(ckpt: Checkpoint, plan: Plan, group, *, dtype: Optional[mx.Dtype] = None,
                   experts: Optional[ExpertCache] = None) -> Model:
    """Rank `group.rank()`'s part of the model under `plan`, reading only its bytes; with
    `experts`, its routed experts stay on disk and stream through its own expert cache
    (`m3mlx.experts`: each rank reads its experts' byte ranges when routed)."""
    tensors = text_tensors(ckpt)
    model = Model(ckpt.args)  # the MTP module is not sharded (its tensors are left unread)
    quant = _quantization(ckpt, tensors)
    if quant:
        _quantize(model, quant, tensors, ckpt.path)
    _check_names(model, {n: _stand_in(t) for n, t in tensors.items()}, ckpt.path)
    apply_plan(model, plan, group, dtype=_hidden_dtype(tensors, dtype))
    weights: Dict[str, mx.array] = {}
    batch, size = [], 0
    mine = [(n, t) for n, t in tensors.items() if plan.local_layer(n) is not None
            and (experts is None or not is_routed_expert(n))]
    for i, (name, t) in enumerate(mine):
        batch.append((name, t))
        size += t.nbytes
        if size >= _READ_BYTES or i + 1 == len(mine):
            weights.update(_read_part(plan, batch))
            batch, size = [], 0
    if dtype is not None:
        weights = {k: v.astype(dtype)
                   if mx.issubdtype(v.dtype, mx.floating) and not is_precision_sensitive(k) else v
                   for k, v in weights.items()}
    model.load_weights(list(weights.items()), strict=experts is None)
    model.eval()
    if experts is not None:
        attach(model, ckpt, experts, dtype, plan=plan)
    _evaluate(model, weights, ckpt.path)
    return model


def load_rank(path_or_repo, kind: str, group, *, dtype: Optional[mx.Dtype] = None,
              kv_bits: Optional[int] = None, **memory):
    """(model, tokenizer) for this rank of `group` under plan `kind` ("tensor" or
    "pipeline"): `m3mlx.loading.load` for one part of a sharded model. `memory`
    (expert_cache, memory_limit, expert_policy, expert_prefetch) as for `load`, each size
    this rank's own and a share of the experts this rank computes."""
    path = resolve(str(path_or_repo))
    with reported_as(LoadError, ConfigError, ShardingError, BudgetError):
        ckpt = Checkpoint.open(path)
        kv_group_size(ckpt.args, kv_bits)
        tokenizer = load_tokenizer(path, ckpt)
        if _is_original_layout(text_tensors(ckpt)):
            raise LoadError(f"{ckpt.path} is in MiniMax's original layout (one tensor per "
                            "expert); a sharded run reads the converted layout: convert it "
                            "first with `m3mlx convert` and run on the output")
        plan = make_plan(kind, ckpt, group.rank(), group.size())
        experts = expert_cache_for(ckpt, dtype, plan=plan, kv_bits=kv_bits, **memory)
        model = model_for_rank(ckpt, plan, group, dtype=dtype, experts=experts)
        model.kv_bits = kv_bits
        return model, tokenizer


def resident_bytes(model: Model) -> int:
    """The bytes of the parameters this rank's model holds."""
    return sum(a.nbytes for _, a in tree_flatten(model.parameters()))

