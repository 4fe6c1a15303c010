"""Source checkpoints: find the files, check them against config.json, read rows as float32.

Three formats, told apart by `quantization_config` (config.json or ModelOpt's
hf_quant_config.json) and checked against the tensors themselves:

- bf16:  float tensors (BF16, F16 or F32; the router and its bias are F32 in the release).
- mxfp8: `weight` F8_E4M3 [N, K] + `weight_scale_inv` UE8M0 exponents (U8) [N, K/32] on the
         projections; `W = e4m3 * 2**(s - 127)`. This is MLX's mxfp8 layout byte for byte.
- nvfp4: NVIDIA ModelOpt: `weight` U8 [N, K/2] (two E2M1 codes a byte, low nibble first),
         `weight_scale` F8_E4M3 [N, K/16], `weight_scale_2` F32 scalar, optional `input_scale`;
         `W = e2m1 * weight_scale * weight_scale_2`.
"""

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from m3mlx.checkpoint import FLOAT_DTYPES, Checkpoint, TensorInfo, has_nonfinite
from m3mlx.config import ModelArgs
from m3mlx.errors import reported_as
from m3mlx.layout import Weight, text_weights
from m3mlx.tokenizer import read_tokenizer_files
from m3mlx.weights import is_mtp, is_vision

from .decode import E4M3, e2m1_unpack, to_f32, ue8m0_to_f32
from .errors import ConvertError

FORMATS = ("bf16", "mxfp8", "nvfp4")
# Files copied next to the weights: tokenizer, chat template, generation defaults.
SIDE_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "added_tokens.json", "merges.txt", "vocab.json", "chat_template.json", "chat_template.jinja",
    "generation_config.json",
)
SIDE_GLOBS = ("*.jinja", "*.tiktoken")
_MTP_LAYER = re.compile(r"\.mtp\.layers\.(\d+)\.")


@dataclass
class SourceWeight:
    """One text weight of the source and the tensors that hold it."""

    weight: Weight
    fmt: str  # "float", "mxfp8" or "nvfp4": how this tensor is stored
    data: TensorInfo
    scale: Optional[TensorInfo] = None  # mxfp8 weight_scale_inv, nvfp4 weight_scale
    scale2: Optional[TensorInfo] = None  # nvfp4 weight_scale_2
    nonfinite: bool = False  # rows read so far held NaN or Inf
    _global: Optional[float] = field(default=None, repr=False)

    @property
    def rows(self) -> int:
        return self.weight.shape[0] if len(self.weight.shape) > 1 else 1

    @property
    def cols(self) -> int:
        return self.weight.shape[-1]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.data, self.scale, self.scale2) if t is not None)

    def read_f32(self, first: int, count: int) -> np.ndarray:
        """Rows [first, first + count) dequantized to float32 [count, cols]."""
        if self.fmt == "float":
            return to_f32(self.data.read(first, count), self.data.dtype)
        if self.fmt == "mxfp8":
            values = E4M3[self.data.read(first, count)]
            scales = ue8m0_to_f32(self.scale.read(first, count))
            blocks = values.reshape(count, -1, 32)
            blocks *= scales[..., None]
            return values
        values = e2m1_unpack(self.data.read(first, count))
        scales = E4M3[self.scale.read(first, count)] * self.global_scale()
        blocks = values.reshape(count, -1, 16)
        blocks *= scales[..., None]
        return values

    def global_scale(self) -> np.float32:
        if self._global is None:
            self._global = self.scale2.read_array().reshape(-1)[0]
        return self._global

    def scan(self, kind: str, data):
        """Note NaN or Inf in rows just read: float32 values ("f32"), bf16 bits ("bf16") or the
        stored bytes of the data and scale tensors ("copy")."""
        if kind == "f32":
            bad = not np.isfinite(data).all()
        elif kind == "bf16":
            bad = has_nonfinite(data, "BF16")
        else:
            dtypes = (self.data.dtype, _SCALE_DTYPE.get(self.fmt))
            bad = any(has_nonfinite(raw, dtype) for raw, dtype in zip(data, dtypes))
        self.nonfinite = self.nonfinite or bad


# What the bytes of each format's scale tensor are (mxfp8 stores its UE8M0 exponents as U8).
_SCALE_DTYPE = {"mxfp8": "F8_E8M0", "nvfp4": "F8_E4M3"}


@dataclass
class Source:
    path: Path
    config: dict
    args: ModelArgs
    fmt: str
    weights: List[SourceWeight]
    mtp_layers: int
    dropped: List[str]  # vision tensors (and NVFP4 input scales) left behind
    side_files: List[Path]
    checkpoint: Checkpoint  # what the reader read and checked: headers, file stamps
    repo_id: Optional[str] = None
    remote: bool = False  # headers came from the Hub; the shards are not local (dry run)

    @property
    def text_bytes(self) -> int:
        return sum(w.nbytes for w in self.weights)

    @property
    def params(self) -> int:
        return sum(int(np.prod(w.weight.shape)) for w in self.weights)


def quant_format(qc: Optional[dict]) -> str:
    """The checkpoint format its quantization_config (config.json's or hf_quant_config.json's,
    as the checkpoint reader found and checked it) declares."""
    if not qc:
        return "bf16"
    method = str(qc.get("quant_method", "")).lower()
    settings = qc.get("quantization", qc)
    algo = str(settings.get("quant_algo", "")).upper()
    # The scale tensors themselves are checked later: UE8M0 bytes, one per 1x32 block.
    if method == "mxfp8" or (method == "fp8" and qc.get("weight_block_size") == [1, 32]
                             and qc.get("scale_fmt", "ue8m0") == "ue8m0"):
        return "mxfp8"
    if algo == "NVFP4" and method in ("modelopt", ""):
        group = settings.get("group_size", 16)
        if group != 16:
            raise ConvertError(f"NVFP4 with group_size {group} is not the ModelOpt layout this "
                               "converter reads (16)")
        return "nvfp4"
    raise ConvertError(
        f"quantization_config {json.dumps(qc)[:200]} is not a format this converter reads: "
        "it takes BF16, MXFP8 (e4m3 + UE8M0 1x32 blocks) and NVFP4 (ModelOpt) checkpoints")


def side_files(path: Path) -> List[Path]:
    found = {p.name: p for p in (path / n for n in SIDE_FILES) if p.is_file()}
    for pattern in SIDE_GLOBS:
        found.update({p.name: p for p in path.glob(pattern) if p.is_file()})
    return [found[n] for n in sorted(found)]


def _expect_shape(info: TensorInfo, shape, what: str, hint: str):
    if tuple(info.shape) != tuple(shape):
        raise ConvertError(f"{info.file.name}: {info.name} has shape {list(info.shape)}, but "
                           f"config.json implies {list(shape)} for {what} ({hint}); the weights "
                           "and config.json come from different models")


def _shape_hint(args: ModelArgs) -> str:
    return (f"hidden_size={args.hidden_size}, num_local_experts={args.num_local_experts}, "
            f"intermediate_size={args.intermediate_size}, vocab_size={args.vocab_size}")


def inventory(path: Path, config: dict, args: ModelArgs, tensors: Dict[str, TensorInfo],
              fmt: str) -> Tuple[List[SourceWeight], int, List[str]]:
    """Check the source's tensors against the config and its format; returns
    (text weights in layout order, MTP layers found, names dropped)."""
    mtp_ids = sorted({int(m[1]) for n in tensors if is_mtp(n) for m in [_MTP_LAYER.search(n)] if m})
    if mtp_ids and mtp_ids != list(range(len(mtp_ids))):
        raise ConvertError(f"MTP layers {mtp_ids} are not numbered 0..{len(mtp_ids) - 1}; the "
                           "checkpoint is incomplete")
    layout = text_weights(args, len(mtp_ids))
    by_name = {w.name: w for w in layout}
    hint = _shape_hint(args)

    companions = {"mxfp8": (".weight_scale_inv",),
                  "nvfp4": (".weight_scale", ".weight_scale_2", ".input_scale", ".k_scale",
                            ".v_scale")}.get(fmt, ())
    # Activation and KV-cache scales: a weight-only conversion has no use for them.
    unused = (".input_scale", ".k_scale", ".v_scale")
    dropped, unknown = [], []
    for name in tensors:
        if is_vision(name):
            dropped.append(name)
        elif name in by_name:
            continue
        else:
            base = next((name[: -len(c)] for c in companions if name.endswith(c)), None)
            if base is not None and f"{base}.weight" in by_name:
                if name.endswith(unused):
                    dropped.append(name)
                continue
            unknown.append(name)
    if unknown:
        hint_fmt = ""
        if any(n.endswith((".weight_scale_inv", ".weight_scale", ".weight_scale_2"))
               for n in unknown):
            hint_fmt = (f" Quantization scales were found but config.json declares a {fmt} "
                        "checkpoint: is its quantization_config missing?")
        raise ConvertError(
            f"{len(unknown)} tensor name(s) in {path} are not part of a MiniMax-M3 checkpoint "
            f"with this config, e.g. {unknown[:4]}.{hint_fmt} Check that config.json matches "
            "the weights (layer count, dense/MoE layers, sparse layers, MTP).")

    missing = [w.name for w in layout if w.name not in tensors]
    if missing:
        raise ConvertError(
            f"{len(missing)} tensor(s) that config.json implies are missing from {path}, e.g. "
            f"{missing[:4]}; a shard is missing or incomplete: download the checkpoint again")

    out: List[SourceWeight] = []
    for w in layout:
        info = tensors[w.name]
        base = w.name[: -len(".weight")] if w.name.endswith(".weight") else None
        if fmt == "mxfp8" and base and f"{base}.weight_scale_inv" in tensors:
            scale = tensors[f"{base}.weight_scale_inv"]
            N, K = w.shape
            if info.dtype != "F8_E4M3":
                raise ConvertError(f"{info.file.name}: {w.name} has a weight_scale_inv but dtype "
                                   f"{info.dtype}; MXFP8 weights are F8_E4M3")
            if scale.dtype not in ("U8", "F8_E8M0") or K % 32:
                raise ConvertError(f"{scale.file.name}: {scale.name} has dtype {scale.dtype}; "
                                   "MXFP8 scales are UE8M0 exponent bytes (U8)")
            _expect_shape(info, w.shape, w.name, hint)
            _expect_shape(scale, (N, K // 32), "its 1x32-block scales", hint)
            out.append(SourceWeight(w, "mxfp8", info, scale))
        elif fmt == "nvfp4" and base and f"{base}.weight_scale" in tensors:
            scale, scale2 = tensors[f"{base}.weight_scale"], tensors.get(f"{base}.weight_scale_2")
            N, K = w.shape
            if scale2 is None:
                raise ConvertError(f"{info.file.name}: {base}.weight_scale_2 is missing; NVFP4 "
                                   "weights need their per-tensor scale")
            if info.dtype != "U8" or scale.dtype != "F8_E4M3" or scale2.dtype != "F32":
                raise ConvertError(
                    f"{info.file.name}: {base} is stored as {info.dtype}/{scale.dtype}/"
                    f"{scale2.dtype}; ModelOpt NVFP4 is weight U8, weight_scale F8_E4M3, "
                    "weight_scale_2 F32")
            if K % 16:
                raise ConvertError(f"{w.name}: {K} columns do not split into NVFP4 blocks of 16")
            _expect_shape(info, (N, K // 2), f"{w.name} (two FP4 codes a byte)", hint)
            _expect_shape(scale, (N, K // 16), "its 16-value block scales", hint)
            if scale2.numel != 1:
                raise ConvertError(f"{scale2.file.name}: {scale2.name} has shape "
                                   f"{list(scale2.shape)}; it must be a single float32")
            out.append(SourceWeight(w, "nvfp4", info, scale, scale2))
        else:
            if info.dtype not in FLOAT_DTYPES:
                extra = (" It looks quantized: is the checkpoint's quantization_config missing "
                         "from config.json?" if info.dtype in ("F8_E4M3", "U8") else "")
                raise ConvertError(f"{info.file.name}: {w.name} has dtype {info.dtype}; this "
                                   f"converter reads float weights as BF16, F16 or F32.{extra}")
            _expect_shape(info, w.shape, w.name, hint)
            out.append(SourceWeight(w, "float", info))
    return out, len(mtp_ids), dropped


def open_local(path: Path, *, tensors: Optional[Dict[str, TensorInfo]] = None,
               repo_id: Optional[str] = None) -> Source:
    """Read and check a checkpoint directory. `tensors` stands in for the shard headers when
    they come from the Hub and the shards are not downloaded (a dry run)."""
    path = Path(path)
    with reported_as(ConvertError):
        ckpt = Checkpoint.open(path, tensors=tensors)
        if (path / "tokenizer.json").is_file():  # copied to the output: refuse a broken one now
            read_tokenizer_files(path)
    fmt = quant_format(ckpt.quantization_config)
    weights, mtp_layers, dropped = inventory(path, ckpt.config, ckpt.args, ckpt.tensors, fmt)
    if fmt != "bf16" and not any(w.fmt != "float" for w in weights):
        raise ConvertError(f"config.json declares a {fmt} checkpoint but no tensor carries "
                           f"{fmt} scales; the config and the weights disagree")
    return Source(path, ckpt.config, ckpt.args, fmt, weights, mtp_layers, dropped,
                  side_files(path), ckpt, repo_id=repo_id, remote=tensors is not None)
