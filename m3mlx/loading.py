"""Loading M3 weights: m3mlx or mlx-lm conversions, and original Hugging Face checkpoints.

The checkpoint is read and checked first (`m3mlx.checkpoint`: config, index, every header, the
config against the weights), so nothing is built for a directory that cannot load. An original
checkpoint (per-expert `w1/w2/w3`, `language_model.*`, vision tensors) is converted in memory:
vision tensors dropped, experts stacked, MXFP8 weights taken as MLX mxfp8 as they are. Weights are
checked for NaN and Inf as they are read, once.
"""

from pathlib import Path
from typing import Dict, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .checkpoint import Checkpoint, warn_nonfinite
from .checks import InputError
from .config import ConfigError, ModelArgs
from .errors import CheckpointError, reported_as
from .experts import DEFAULT_POLICY, POLICIES, USAGE_FILE, ExpertCache, attach, is_routed_expert
from .kv_tier import kv_group_size
from .model import Model, is_precision_sensitive
from .plan import BudgetError, cache_slots, check_fits, footprint, plan_budget
from .tokenizer import Tokenizer
from .weights import expert_slot, is_mtp, is_vision, mtp_layer_count, mxfp8_to_mlx, stack_experts

HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "merges.txt", "vocab*"]


class LoadError(CheckpointError):
    """A model directory that cannot be loaded, with what is wrong and what to do."""


def resolve(path_or_repo: str) -> Path:
    """A local directory, or a Hub repo id downloaded (weights, config, tokenizer only)."""
    path = Path(path_or_repo).expanduser()
    if path.exists():
        if not path.is_dir():
            raise LoadError(f"{path} is a file; pass the model directory that holds config.json")
        return path
    if str(path_or_repo).count("/") != 1 or str(path_or_repo).startswith((".", "/", "~")):
        raise LoadError(f"{path_or_repo}: no such directory (nor a Hub repo id like 'org/name')")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(path_or_repo), allow_patterns=HUB_PATTERNS))
    except Exception as e:  # the hub raises many types; all mean "could not fetch"
        raise LoadError(f"could not download {path_or_repo} from the Hugging Face Hub: {e}") from e


def _is_original_layout(weights: Dict[str, mx.array]) -> bool:
    return any(expert_slot(k) or k.endswith(".weight_scale_inv") for k in weights)


def _from_original(weights: Dict[str, mx.array], args: ModelArgs) -> Dict[str, mx.array]:
    if any(k.endswith(".weight_scale_2") for k in weights):
        raise LoadError("this is an NVFP4 (ModelOpt) checkpoint: convert it first with "
                        "`m3mlx convert SOURCE OUTPUT --mode nvfp4` and load the output")
    weights = {k: v for k, v in weights.items() if not is_vision(k)}
    return stack_experts(mxfp8_to_mlx(weights), args.num_local_experts)


def _quantization(ckpt: Checkpoint, weights: Dict[str, mx.array]) -> Optional[dict]:
    """The mlx-lm `quantization` block, or the one an MXFP8 original implies."""
    if "quantization" in ckpt.config:
        return ckpt.config["quantization"]
    qc = ckpt.quantization_config or {}
    if qc.get("quant_method") == "mxfp8" or any(k.endswith(".scales") for k in weights):
        return {"group_size": 32, "bits": 8, "mode": "mxfp8"}
    return None


def _quantize(model: Model, quant: dict, weights: Dict[str, mx.array], path: Path):
    defaults = {k: quant[k] for k in ("group_size", "bits", "mode") if k in quant}

    def predicate(path, module):
        if path in quant:
            return quant[path]
        if not hasattr(module, "to_quantized"):
            return False
        return defaults if f"{path}.scales" in weights else False

    try:
        nn.quantize(model, class_predicate=predicate)
    except (ValueError, TypeError) as e:  # MLX refusing a setting, e.g. group_size 48
        raise LoadError(f"{path}/config.json: its quantization block ({str(quant)[:80]}...) "
                        f"asks for a setting MLX cannot build: {e}") from None


def _check_names(model: Model, weights: Dict[str, mx.array], path: Path):
    expected = dict(tree_flatten(model.parameters()))
    unknown = sorted(set(weights) - set(expected))
    missing = sorted(set(expected) - set(weights))
    if unknown:
        raise LoadError(f"{path}: {len(unknown)} tensor(s) this M3 config has no place for, e.g. "
                        f"{unknown[:3]}; does config.json match the weights?")
    if missing:
        raise LoadError(f"{path}: {len(missing)} tensor(s) missing, e.g. {missing[:3]}; is a shard "
                        "missing or from another model?")
    for name, w in weights.items():
        want = expected[name]
        if w.shape != want.shape:
            raise LoadError(f"{path}: {name} has shape {tuple(w.shape)}, the config implies "
                            f"{tuple(want.shape)}")
        floating = mx.issubdtype(want.dtype, mx.floating)
        stored_floating = mx.issubdtype(w.dtype, mx.floating)
        if floating != stored_floating or not floating and w.dtype != want.dtype:
            raise LoadError(f"{path}: {name} is stored as {w.dtype}, the model needs "
                            f"{'a float type' if floating else want.dtype}; the file is damaged "
                            "or from another format")


# Elements per exact finiteness reduction: bounds the temporary it allocates.
_CHECK_ELEMENTS = 1 << 26
# Weights read per evaluation while loading: bounds how much is read before it is checked.
_EVAL_BYTES = 1 << 30
# The exponent bits of each float type: all ones is Inf or NaN. Testing them as integers keeps
# the check exact whatever the float compiler assumes about NaN.
_EXPONENT = {mx.float32: (mx.uint32, 0x7F800000), mx.bfloat16: (mx.uint16, 0x7F80),
             mx.float16: (mx.uint16, 0x7C00)}


def _nonfinite(x: mx.array) -> mx.array:
    bits, mask = _EXPONENT[x.dtype]
    return (x.view(bits) & mask) == mask


def _all(pred, w: mx.array) -> mx.array:
    """mx.all(pred(w)), reduced a slab of rows at a time."""
    rows = w.shape[0] if w.ndim else 1
    step = max(1, _CHECK_ELEMENTS * rows // max(w.size, 1))
    if w.ndim == 0 or step >= rows:
        return mx.all(pred(w))
    return mx.all(mx.stack([mx.all(pred(w[i : i + step])) for i in range(0, rows, step)]))


def _exactly_finite(name: str, w: mx.array, modes: Dict[str, str]) -> Optional[mx.array]:
    """A lazy flag: `w` holds no NaN or Inf (float tensors, and the fp8 bytes and exponent
    scales of MLX's microscaling formats); None for tensors that cannot hold either."""
    if w.dtype in _EXPONENT:
        return _all(lambda x: ~_nonfinite(x), w)
    if mx.issubdtype(w.dtype, mx.floating):
        return _all(mx.isfinite, w)
    module, _, leaf = name.rpartition(".")
    mode = modes.get(module)
    if leaf == "scales" and mode in ("mxfp4", "mxfp8"):  # UE8M0: 0xFF is NaN
        return _all(lambda x: x != 0xFF, w)
    if (leaf, mode) in (("scales", "nvfp4"), ("weight", "mxfp8")):  # e4m3: S.1111.111 is NaN
        return _all(lambda x: (x.view(mx.uint8) & 0x7F) != 0x7F, w)
    return None


def _finite(name: str, w: mx.array, modes: Dict[str, str]) -> Optional[mx.array]:
    """A cheap lazy flag, True when `w` surely holds no NaN or Inf: for float tensors, their
    sum is finite (one reduction, no temporary); a False is confirmed by `_exactly_finite`
    (the sum may also overflow)."""
    if w.dtype in _EXPONENT:
        return ~_nonfinite(mx.sum(w).reshape(1))[0]
    return _exactly_finite(name, w, modes)


def _evaluate(model: Model, weights: Dict[str, mx.array], path: Path):
    """Read every weight once, batch by batch, checking each for NaN and Inf as it lands."""
    modes = {p: m.mode for p, m in model.named_modules() if hasattr(m, "mode")}
    suspects, batch, size = [], [], 0
    items = list(weights.items())
    for i, (name, w) in enumerate(items):
        batch.append((name, w, _finite(name, w, modes)))
        size += w.nbytes
        if size >= _EVAL_BYTES or i + 1 == len(items):
            checked = [(n, flag) for n, _, flag in batch if flag is not None]
            flags = mx.stack([flag for _, flag in checked]) if checked else mx.array([])
            mx.eval([tensor for _, tensor, _ in batch] + [flags])
            suspects += [n for (n, _), ok in zip(checked, flags.tolist()) if not ok]
            batch, size = [], 0
    mx.eval(model.parameters())
    warn_nonfinite([n for n in suspects if not _exactly_finite(n, weights[n], modes).item()],
                   path)


def _read(file: Path) -> Dict[str, mx.array]:
    try:
        return mx.load(str(file))
    except (RuntimeError, ValueError) as e:
        raise LoadError(f"{file}: MLX cannot read it ({e}); download it again") from None


def model_from_checkpoint(ckpt: Checkpoint, *, lazy: bool = False,
                          dtype: Optional[mx.Dtype] = None,
                          experts: Optional[ExpertCache] = None) -> Model:
    """Build the model from an opened (checked) checkpoint; with `experts`, its routed experts
    stay on disk and stream through an expert cache of that many slots (`m3mlx.experts`)."""
    weights: Dict[str, mx.array] = {}
    for file in ckpt.files:
        weights.update(_read(file))
    try:
        if _is_original_layout(weights):
            weights = _from_original(weights, ckpt.args)
        else:
            weights = {k: v for k, v in weights.items() if not is_vision(k)}
    except LoadError:
        raise
    except CheckpointError as e:
        raise LoadError(f"{ckpt.path}: {e}") from None
    except (ValueError, RuntimeError) as e:  # a tensor MLX cannot reinterpret as its format says
        raise LoadError(f"{ckpt.path}: the weights do not fit their format ({e}); the checkpoint "
                        "is damaged: download it again") from None
    model = Model(ckpt.args, mtp_layers=mtp_layer_count(weights))
    quant = _quantization(ckpt, weights)
    if quant:
        _quantize(model, quant, weights, ckpt.path)
    _check_names(model, weights, ckpt.path)
    if experts is not None:
        # Checked with the rest, never read: the tier reads them by byte range.
        weights = {k: v for k, v in weights.items() if not is_routed_expert(k) or is_mtp(k)}
    if dtype is not None:
        weights = {
            k: v.astype(dtype)
            if mx.issubdtype(v.dtype, mx.floating) and not is_precision_sensitive(k) else v
            for k, v in weights.items()
        }
    model.load_weights(list(weights.items()), strict=experts is None)
    model.eval()
    if experts is not None:
        attach(model, ckpt, experts, dtype, preload=not lazy)
    if not lazy:
        _evaluate(model, weights, ckpt.path)
    return model


def load_model(path, *, lazy: bool = False, dtype: Optional[mx.Dtype] = None, **memory) -> Model:
    """Build the model from a local directory; `dtype` casts the float weights (router stays
    fp32); `memory`: expert_cache, memory_limit, expert_policy, expert_prefetch as for `load`."""
    with reported_as(LoadError, ConfigError, BudgetError):
        ckpt = Checkpoint.open(path)
        return model_from_checkpoint(ckpt, lazy=lazy, dtype=dtype,
                                     experts=expert_cache_for(ckpt, dtype, **memory))


def load_tokenizer(path: Path, ckpt: Checkpoint) -> Tokenizer:
    """The model directory's tokenizer, checked against the model's vocabulary."""
    tokenizer = Tokenizer.from_dir(path, eos_token_ids=ckpt.args.eos_token_ids)
    if tokenizer.vocab_size > ckpt.args.vocab_size:
        raise LoadError(f"{path}/tokenizer.json has {tokenizer.vocab_size} tokens, more than "
                        f"the model's vocab_size={ckpt.args.vocab_size}: use the tokenizer "
                        "that came with these weights")
    return tokenizer


def load(path_or_repo, *, lazy: bool = False, dtype: Optional[mx.Dtype] = None,
         kv_bits: Optional[int] = None, expert_cache=None, memory_limit=None,
         expert_policy: str = DEFAULT_POLICY, expert_prefetch: bool = True):
    """(model, tokenizer) from a model directory or a Hub repo id. Everything is checked, the
    tokenizer included, before the weights are read. kv_bits (8 or 4) makes the model's caches
    (`make_cache(model)`, generation without a prompt cache) store K/V compact; InputError
    before anything is read when the model cannot.

    `expert_cache` (bytes, a size like "40GB", or a share of the routed experts like "25%")
    keeps the routed experts on disk and streams them through a cache of that size;
    `memory_limit` ("64GB") lets the planner size the cache (or load everything when it fits).
    Without either, a model too large for this machine is refused before anything is read,
    with what to pass instead. `expert_policy`: lru, lfu or pinned (calibration counts, see
    `m3mlx calibrate-experts`); `expert_prefetch` reads the next layer's likely experts ahead.
    """
    path = resolve(str(path_or_repo))
    with reported_as(LoadError, ConfigError, BudgetError):
        ckpt = Checkpoint.open(path)
        kv_group_size(ckpt.args, kv_bits)
        tokenizer = load_tokenizer(path, ckpt)
        experts = expert_cache_for(ckpt, dtype, expert_cache=expert_cache,
                                   memory_limit=memory_limit, expert_policy=expert_policy,
                                   expert_prefetch=expert_prefetch, kv_bits=kv_bits)
        model = model_from_checkpoint(ckpt, lazy=lazy, dtype=dtype, experts=experts)
        model.kv_bits = kv_bits
        return model, tokenizer


def expert_cache_for(ckpt: Checkpoint, dtype: Optional[mx.Dtype] = None, *, expert_cache=None,
                     memory_limit=None, expert_policy: str = DEFAULT_POLICY,
                     expert_prefetch: bool = True, kv_bits: Optional[int] = None, plan=None
                     ) -> Optional[ExpertCache]:
    """How to hold `ckpt`'s routed experts: None for all resident (they fit, or were not asked
    to stream), else the expert cache. Decided before anything is read.

    With a sharding `plan`, for one rank's part (`load_rank`): a size (`expert_cache` bytes,
    `memory_limit`) is this rank's, a share (25%) is of the experts this rank computes."""
    if expert_policy not in POLICIES:
        raise InputError(f"expert_policy={expert_policy!r}: choose one of {', '.join(POLICIES)}")
    fp = footprint(ckpt, dtype, plan)
    if expert_cache is not None and memory_limit is not None:
        raise InputError("give an expert cache size or a memory limit, not both")
    if expert_cache is None and memory_limit is None:
        check_fits(fp)
        return None
    if not fp.moe_layers:
        return None  # a pipeline stage without MoE layers: nothing of it streams
    if not fp.streamable:
        raise LoadError(f"{ckpt.path} is an original checkpoint (one tensor per expert); "
                        "experts stream from a converted model: run `m3mlx convert "
                        f"{ckpt.path} OUTPUT` and load OUTPUT")
    if expert_cache is not None:
        slots = cache_slots(fp, expert_cache)
    else:
        budget = plan_budget(fp, memory_limit, kv_bits=kv_bits)
        if not budget.streams:
            return None
        slots = budget.slots
    usage = ckpt.path / USAGE_FILE
    return ExpertCache(slots, expert_policy, expert_prefetch,
                       usage_file=usage if usage.is_file() else None)
