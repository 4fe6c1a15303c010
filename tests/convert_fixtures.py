"""Checkpoints for the converter tests: BF16 (m3mlx.demo), MXFP8 and NVFP4 derived from it, and a
multi-gigabyte multi-shard BF16 checkpoint written in a few seconds.

The MXFP8 and NVFP4 writers are deliberately independent of the converter: their own
safetensors writer, their own encoders (numpy), and `mx.load` to read the BF16 tensors. The
MXFP8 encoder picks scales the way NVIDIA/DeepSeek tooling does (the smallest power of two that
keeps the block inside e4m3's +-448), which is not MLX's rule (from the block maximum's
exponent), so a converter that re-quantized instead of copying would not be bit-exact.
"""

import json
import shutil
import struct
from pathlib import Path
from typing import Dict, Iterable, Tuple

import mlx.core as mx
import numpy as np

from m3mlx.config import ModelArgs
from m3mlx.demo import hf_config, write_demo_checkpoint, write_tokenizer
from m3mlx.layout import text_weights

# Every projection a multiple of 128 wide, so every MLX group size applies to every tensor.
QUANT_DIMS = dict(hidden_size=128, intermediate_size=128, shared_intermediate_size=128,
                  dense_intermediate_size=256)

E2M1_VALUES = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], np.float32)


def bf16_checkpoint(path, *, seed: int = 0, with_mtp: bool = False, all_experts: bool = False,
                    shards: int = 2, **overrides) -> Path:
    """The lead's demo checkpoint. `all_experts=True` routes every token to every expert, which
    makes the logits a smooth function of the weights (no top-k flips), so quantization error
    shows up as a bounded logit error rather than as chaos."""
    if all_experts:
        overrides["num_experts_per_tok"] = overrides.get("num_local_experts", 8)
    return write_demo_checkpoint(path, seed=seed, with_mtp=with_mtp, shards=shards, **overrides)


# ----------------------------------------------------------------------------------------------
# A tiny independent safetensors writer


def write_safetensors(file: Path, tensors: Dict[str, Tuple[str, tuple, bytes]], metadata=None):
    header, offset, blobs = {}, 0, []
    if metadata:
        header["__metadata__"] = metadata
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape),
                        "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for b in blobs:
            f.write(b)


def load_f32(path: Path) -> Dict[str, Tuple[str, np.ndarray]]:
    """Every tensor of a checkpoint directory as (safetensors dtype, float32 array), via mx.load."""
    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        for name, a in mx.load(str(f)).items():
            dt = {mx.bfloat16: "BF16", mx.float16: "F16", mx.float32: "F32"}[a.dtype]
            out[name] = (dt, np.array(a.astype(mx.float32)))
    return out


def _float_bytes(dtype: str, a: np.ndarray) -> bytes:
    if dtype == "F32":
        return a.astype(np.float32).tobytes()
    if dtype == "F16":
        return a.astype(np.float16).tobytes()
    return np.array(mx.array(a).astype(mx.bfloat16).view(mx.uint16)).tobytes()


def _copy_side_files(src: Path, dst: Path):
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.suffix != ".safetensors" and f.name != "model.safetensors.index.json":
            shutil.copy(f, dst / f.name)


def _write_sharded(dst: Path, tensors: Dict[str, Tuple[str, tuple, bytes]], shards: int):
    names = sorted(tensors)
    per = -(-len(names) // shards)
    weight_map = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = names[s * per:(s + 1) * per]
        write_safetensors(dst / fname, {n: tensors[n] for n in part}, {"format": "pt"})
        weight_map.update({n: fname for n in part})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def _update_config(dst: Path, **fields):
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(fields)
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))


# ----------------------------------------------------------------------------------------------
# MXFP8: e4m3 codes + UE8M0 exponents per 1x32 block


def is_mxfp8_quantized(name: str) -> bool:
    """The tensors the MXFP8 release quantizes: every projection but embeddings, lm_head and the
    router (per the M3 spec, section 4.2)."""
    if not name.startswith("language_model.") or not name.endswith(".weight"):
        return False
    if name.endswith(("norm.weight", "block_sparse_moe.gate.weight")) or "embed_tokens" in name:
        return False
    return "lm_head" not in name


def mxfp8_encode(w: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """float32 [N, K] -> (e4m3 codes uint8 [N, K], UE8M0 exponents uint8 [N, K/32])."""
    N, K = w.shape
    blocks = w.reshape(N, K // 32, 32)
    amax = np.abs(blocks).max(-1)
    exp = np.where(amax > 0, np.ceil(np.log2(np.maximum(amax, 1e-38) / 448.0)), -127)
    exp = np.clip(exp, -127, 127).astype(np.int32)
    scaled = blocks / np.ldexp(np.float32(1), exp)[..., None]
    codes = np.array(mx.to_fp8(mx.array(scaled.reshape(N, K).astype(np.float32))))
    return codes, (exp + 127).astype(np.uint8)


def mxfp8_decode(codes: np.ndarray, exps: np.ndarray) -> np.ndarray:
    vals = np.array(mx.from_fp8(mx.array(codes), dtype=mx.float32))
    scale = np.ldexp(np.float32(1), exps.astype(np.int32) - 127)
    return (vals.reshape(*exps.shape, 32) * scale[..., None]).reshape(codes.shape)


def to_mxfp8(src: Path, dst: Path, shards: int = 2) -> Path:
    src, dst = Path(src), Path(dst)
    _copy_side_files(src, dst)
    out = {}
    for name, (dtype, a) in load_f32(src).items():
        if is_mxfp8_quantized(name):
            codes, exps = mxfp8_encode(a)
            base = name[: -len(".weight")]
            out[name] = ("F8_E4M3", codes.shape, codes.tobytes())
            out[f"{base}.weight_scale_inv"] = ("U8", exps.shape, exps.tobytes())
        else:
            out[name] = (dtype, a.shape, _float_bytes(dtype, a))
    _write_sharded(dst, out, shards)
    _update_config(dst, quantization_config={
        "quant_method": "mxfp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
        "weight_block_size": [1, 32], "activation_scheme": "dynamic",
        "modules_to_not_convert": ["embed_tokens", "lm_head", "gate", "vision_tower"]})
    return dst


# ----------------------------------------------------------------------------------------------
# NVFP4 (ModelOpt): E2M1 codes two a byte, e4m3 block-16 scales, fp32 per-tensor scale


def is_nvfp4_quantized(name: str) -> bool:
    """Routed and shared experts, as NVIDIA's M3 NVFP4 exports do."""
    return name.startswith("language_model.") and name.endswith(".weight") and (
        ".experts." in name or ".shared_experts." in name)


def nvfp4_encode(w: np.ndarray):
    """float32 [N, K] -> (packed uint8 [N, K/2], e4m3 scales uint8 [N, K/16], fp32 scale_2)."""
    N, K = w.shape
    scale2 = np.float32(np.abs(w).max() / (6.0 * 448.0))
    blocks = w.reshape(N, K // 16, 16)
    block_max = (np.abs(blocks).max(-1) / 6.0 / scale2).astype(np.float32)
    bscale = np.array(mx.to_fp8(mx.array(block_max)))
    dec = np.array(mx.from_fp8(mx.array(bscale), dtype=mx.float32)) * scale2
    x = np.where(dec[..., None] > 0, blocks / np.where(dec > 0, dec, 1)[..., None], 0)
    mag = np.searchsorted((E2M1_VALUES[1:] + E2M1_VALUES[:-1]) / 2, np.abs(x))
    codes = (mag | np.where(x < 0, 8, 0)).astype(np.uint8).reshape(N, K)
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)
    return packed, bscale, scale2


def nvfp4_decode(packed: np.ndarray, bscale: np.ndarray, scale2: np.float32) -> np.ndarray:
    table = np.concatenate([E2M1_VALUES, -E2M1_VALUES])
    N = packed.shape[0]
    vals = np.empty((N, packed.shape[1] * 2), np.float32)
    vals[:, 0::2], vals[:, 1::2] = table[packed & 15], table[packed >> 4]
    s = np.array(mx.from_fp8(mx.array(bscale), dtype=mx.float32)) * scale2
    return (vals.reshape(N, -1, 16) * s[..., None]).reshape(N, -1)


def to_nvfp4(src: Path, dst: Path, shards: int = 2) -> Path:
    src, dst = Path(src), Path(dst)
    _copy_side_files(src, dst)
    out = {}
    for name, (dtype, a) in load_f32(src).items():
        if is_nvfp4_quantized(name):
            packed, bscale, scale2 = nvfp4_encode(a)
            base = name[: -len(".weight")]
            out[name] = ("U8", packed.shape, packed.tobytes())
            out[f"{base}.weight_scale"] = ("F8_E4M3", bscale.shape, bscale.tobytes())
            out[f"{base}.weight_scale_2"] = ("F32", (), np.float32(scale2).tobytes())
            out[f"{base}.input_scale"] = ("F32", (), np.float32(1.0).tobytes())
        else:
            out[name] = (dtype, a.shape, _float_bytes(dtype, a))
    _write_sharded(dst, out, shards)
    settings = {"quant_algo": "NVFP4", "group_size": 16, "kv_cache_quant_algo": None,
                "exclude_modules": ["lm_head", "*self_attn*", "*block_sparse_moe.gate",
                                    "vision_tower*"]}
    _update_config(dst, quantization_config={"quant_method": "modelopt", **settings})
    (dst / "hf_quant_config.json").write_text(json.dumps(
        {"producer": {"name": "modelopt", "version": "0.37.0"}, "quantization": settings}))
    return dst


def dequantized_source(path: Path) -> Dict[str, np.ndarray]:
    """Every text weight of a BF16, MXFP8 or NVFP4 fixture as float32, decoded independently."""
    raw = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        raw.update(mx.load(str(f)))
    out = {}
    for name, a in raw.items():
        if name.endswith((".weight_scale_inv", ".weight_scale", ".weight_scale_2", ".input_scale")):
            continue
        base = name[: -len(".weight")]
        if f"{base}.weight_scale_inv" in raw:
            out[name] = mxfp8_decode(np.array(a), np.array(raw[f"{base}.weight_scale_inv"]))
        elif f"{base}.weight_scale_2" in raw:
            out[name] = nvfp4_decode(np.array(a), np.array(raw[f"{base}.weight_scale"]),
                                     np.array(raw[f"{base}.weight_scale_2"]).reshape(()))
        else:
            out[name] = np.array(a.astype(mx.float32))
    return out


# ----------------------------------------------------------------------------------------------
# A big multi-shard BF16 checkpoint, written fast (random bytes from a pool, streamed to disk)

BIG_TEXT = dict(hidden_size=1024, num_attention_heads=8, num_key_value_heads=2, head_dim=128,
                rotary_dim=64, intermediate_size=1024, shared_intermediate_size=1024,
                dense_intermediate_size=4096, num_local_experts=32, num_experts_per_tok=4,
                index_n_heads=2, index_head_dim=128, index_block_size=128, index_topk_blocks=16,
                vocab_size=32768)


def big_checkpoint(path, *, num_hidden_layers: int = 11, shard_bytes: int = 400 << 20,
                   seed: int = 0) -> Path:
    """~2.2 GB of BF16 (11 layers, 32 experts of 1024x1024, 32k vocab) in ~400 MB shards.
    Largest tensor: embed_tokens / lm_head, 64 MiB."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    n = num_hidden_layers
    args = ModelArgs(**BIG_TEXT, num_hidden_layers=n, sparse_layers=[i >= 1 for i in range(n)],
                     moe_layers=[i >= 1 for i in range(n)])
    rng = np.random.default_rng(seed)
    pool = np.array(mx.array(rng.standard_normal(1 << 22).astype(np.float32) * 0.02)
                    .astype(mx.bfloat16).view(mx.uint16))
    tensors = list(hf_text_tensors(args))
    tensors += [("vision_tower.patch_embed.proj.weight", "BF16", (1024, 588))]

    def data(shape, dtype):
        count = int(np.prod(shape))
        if dtype == "F32":
            return (rng.standard_normal(count).astype(np.float32) * 0.02).tobytes()
        start = int(rng.integers(len(pool)))
        return np.resize(np.roll(pool, -start), count).tobytes()

    # Pack into shards in order, streaming each shard's tensors after its header.
    shards, size = [[]], 0
    for t in tensors:
        nbytes = int(np.prod(t[2])) * (4 if t[1] == "F32" else 2)
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        _stream_shard(path / fname, shard, data)
        weight_map.update({name: fname for name, _, _ in shard})
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    config = hf_config(args)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    write_tokenizer(path)  # mlx-lm's converter wants one
    return path


def hf_text_tensors(args: ModelArgs):
    """(name, dtype, shape) of every text tensor, in the order of the release's names."""
    for w in text_weights(args):
        yield w.name, "F32" if w.fp32 else "BF16", w.shape


def _stream_shard(file: Path, tensors: Iterable[Tuple[str, str, tuple]], data):
    header, offset = {}, 0
    for name, dtype, shape in tensors:
        nbytes = int(np.prod(shape)) * (4 if dtype == "F32" else 2)
        header[name] = {"dtype": dtype, "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for name, dtype, shape in tensors:
            f.write(data(shape, dtype))
