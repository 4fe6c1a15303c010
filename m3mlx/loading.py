"""Loading M3 weights: m3mlx or mlx-lm conversions, and original Hugging Face checkpoints.

An original checkpoint (per-expert `w1/w2/w3`, `language_model.*`, vision tensors) is converted in
memory: vision tensors dropped, experts stacked, MXFP8 weights taken as MLX mxfp8 as they are.
"""

import glob
import json
import struct
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .config import ModelArgs
from .model import Model, is_precision_sensitive
from .tokenizer import Tokenizer
from .weights import (MTP_FILE, expert_slot, is_vision, mtp_layer_count, mxfp8_to_mlx,
                      stack_experts)

HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "merges.txt", "vocab*"]


class LoadError(RuntimeError):
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


def read_config(path: Path) -> Tuple[dict, ModelArgs]:
    file = path / "config.json"
    if not file.exists():
        raise LoadError(f"{path} has no config.json; is it an M3 model directory?")
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise LoadError(f"{file} is not valid JSON: {e}") from e
    return config, ModelArgs.from_config(config)


def check_safetensors(file: Path):
    """Refuse a shard whose header is unreadable or whose data is shorter than the header says."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise LoadError(f"{file} is truncated (no safetensors header); download it again")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise LoadError(f"{file} is truncated or corrupt (header of {n} bytes in a "
                            f"{size}-byte file); download it again")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise LoadError(f"{file} has a corrupt safetensors header ({e}); download it again")
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise LoadError(f"{file} is truncated: its header needs {8 + n + end} bytes, the file has "
                        f"{size}; download it again")


def weight_files(path: Path) -> List[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [n for n in names if not (path / n).exists()]
        if missing:
            raise LoadError(f"{path} is missing shard(s) {', '.join(missing)} listed in "
                            f"{index.name}; download them again")
        files = [path / n for n in names]
    else:
        files = [Path(f) for f in sorted(glob.glob(str(path / "model*.safetensors")))]
    if (path / MTP_FILE).exists() and path / MTP_FILE not in files:
        files.append(path / MTP_FILE)
    if not files:
        raise LoadError(f"{path} has no model*.safetensors weights")
    return files


def _is_original_layout(weights: Dict[str, mx.array]) -> bool:
    return any(expert_slot(k) or k.endswith(".weight_scale_inv") for k in weights)


def _from_original(weights: Dict[str, mx.array], args: ModelArgs) -> Dict[str, mx.array]:
    if any(k.endswith(".weight_scale_2") for k in weights):
        raise LoadError("this is an NVFP4 (ModelOpt) checkpoint: convert it first with "
                        "`m3mlx convert SOURCE OUTPUT --mode nvfp4` and load the output")
    weights = {k: v for k, v in weights.items() if not is_vision(k)}
    return stack_experts(mxfp8_to_mlx(weights), args.num_local_experts)


def _quantization(config: dict, weights: Dict[str, mx.array]) -> Optional[dict]:
    """The mlx-lm `quantization` block, or the one an MXFP8 original implies."""
    if "quantization" in config:
        return config["quantization"]
    qc = config.get("quantization_config") or {}
    if qc.get("quant_method") == "mxfp8" or any(k.endswith(".scales") for k in weights):
        return {"group_size": 32, "bits": 8, "mode": "mxfp8"}
    return None


def _quantize(model: Model, quant: dict, weights: Dict[str, mx.array]):
    defaults = {k: quant[k] for k in ("group_size", "bits", "mode") if k in quant}

    def predicate(path, module):
        if path in quant:
            return quant[path]
        if not hasattr(module, "to_quantized"):
            return False
        return defaults if f"{path}.scales" in weights else False

    nn.quantize(model, class_predicate=predicate)


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
        if w.shape != expected[name].shape:
            raise LoadError(f"{path}: {name} has shape {tuple(w.shape)}, the config implies "
                            f"{tuple(expected[name].shape)}")


def load_model(path, *, lazy: bool = False, dtype: Optional[mx.Dtype] = None) -> Model:
    """Build the model from a local directory; `dtype` casts the float weights (router stays fp32)."""
    path = Path(path)
    config, args = read_config(path)
    weights: Dict[str, mx.array] = {}
    for file in weight_files(path):
        check_safetensors(file)
        weights.update(mx.load(str(file)))
    if _is_original_layout(weights):
        weights = _from_original(weights, args)
    else:
        weights = {k: v for k, v in weights.items() if not is_vision(k)}
    model = Model(args, mtp_layers=mtp_layer_count(weights))
    quant = _quantization(config, weights)
    if quant:
        _quantize(model, quant, weights)
    _check_names(model, weights, path)
    if dtype is not None:
        weights = {
            k: v.astype(dtype)
            if mx.issubdtype(v.dtype, mx.floating) and not is_precision_sensitive(k) else v
            for k, v in weights.items()
        }
    model.load_weights(list(weights.items()), strict=True)
    model.eval()
    if not lazy:
        mx.eval(model.parameters())
    return model


def load(path_or_repo, *, lazy: bool = False, dtype: Optional[mx.Dtype] = None):
    """(model, tokenizer) from a model directory or a Hub repo id."""
    path = resolve(str(path_or_repo))
    model = load_model(path, lazy=lazy, dtype=dtype)
    return model, Tokenizer.from_dir(path, eos_token_ids=model.args.eos_token_ids)

