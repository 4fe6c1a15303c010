"""Round trips of `m3mlx convert` on tiny fixtures in every source format.

For each (source format, target) the converted directory must
  - load in m3mlx and in mlx-lm 0.32 (`mlx_lm.utils.load_model`, strict), the two agreeing;
  - hold exactly MLX's quantization of the source weights (same bytes as `mx.quantize` of the
    stacked, dequantized source), so its error is that mode's quantization error and no more;
  - give logits within the mode's bound of the BF16 reference (table below).
MXFP8 -> mxfp8 is checked bit for bit, and mlx-lm's own converter is matched byte for byte.

The fixture routes every token to every expert and stays under MSA's dense threshold (64 tokens),
so its logits are a smooth function of its weights: quantization error cannot hide behind, or be
amplified by, a flipped top-k choice.
"""

import glob
import json
import re
from collections import defaultdict
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.utils import load_model as mlx_lm_load_model

import m3mlx
from convert_fixtures import (
    QUANT_DIMS, bf16_checkpoint, dequantized_source, mxfp8_encode, to_mxfp8, to_nvfp4,
)
from m3mlx.convert import ConvertError, convert, verify
from m3mlx.weights import MTP_FILE

QUIET = dict(progress=False, log=lambda s: None)
PROJ = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}

# Relative RMS logit error vs the BF16 reference, per target (uniform recipe: every projection,
# embeddings and lm_head at the target), on this fixture. A random tiny model amplifies weight
# error ~3-5x; real checkpoints fare better. A quantized source adds its own error on top.
LOGIT_BOUND = {
    "affine2": 1.00, "affine3": 0.70, "affine4": 0.40, "affine5": 0.18, "affine6": 0.10,
    "affine8": 0.035, "mxfp4": 0.45, "mxfp8": 0.11, "nvfp4": 0.38, "bf16": 1e-6, "fp16": 2e-3,
}
SOURCE_BOUND = {"bf16": 0.0, "mxfp8": 0.10, "nvfp4": 0.20}
# Relative RMS error of the dequantized weights vs the source weights (Gaussian weights).
# Affine scales and biases are stored in bf16, which costs 8-bit most (0.0055 -> 0.0087).
WEIGHT_BOUND = {"affine2": 0.50, "affine3": 0.22, "affine4": 0.125, "affine5": 0.056,
                "affine6": 0.026, "affine8": 0.011, "mxfp4": 0.145, "mxfp8": 0.033, "nvfp4": 0.12}

TARGETS = {  # name -> convert() options
    "affine2": dict(bits=2), "affine3": dict(bits=3, group_size=32),
    "affine4": dict(bits=4, group_size=128), "affine5": dict(bits=5),
    "affine6": dict(bits=6, group_size=32), "affine8": dict(bits=8),
    "mxfp4": dict(mode="mxfp4"), "mxfp8": dict(mode="mxfp8"), "nvfp4": dict(mode="nvfp4"),
    "bf16": dict(mode="none"), "fp16": dict(mode="none", dtype="float16"),
}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    bf16 = bf16_checkpoint(root / "bf16", all_experts=True, **QUANT_DIMS,
                           extra_files={"chat_template.jinja": "{{ messages }}"})
    return {"bf16": bf16, "mxfp8": to_mxfp8(bf16, root / "mxfp8"),
            "nvfp4": to_nvfp4(bf16, root / "nvfp4")}


TOKENS = mx.array(np.random.default_rng(7).integers(0, 500, (2, 48)))


def mlx_lm_logits(path) -> mx.array:
    model, _ = mlx_lm_load_model(Path(path))
    model.set_dtype(mx.float32)
    return model(TOKENS)


@pytest.fixture(scope="module")
def reference(sources):
    return mlx_lm_logits(sources["bf16"])


def rel_err(a, b) -> float:
    return (mx.linalg.norm(a - b) / mx.linalg.norm(b)).item()


def load_dir(path) -> dict:
    out = {}
    for f in glob.glob(str(Path(path) / "*.safetensors")):
        out.update(mx.load(f))
    return out


def source_modules(src) -> dict:
    """Source weights by output module path (experts stacked), dequantized, float32."""
    mods, experts = {}, defaultdict(dict)
    for name, a in dequantized_source(src).items():
        if not name.startswith("language_model."):
            continue
        m = re.match(r"(.+\.block_sparse_moe)\.experts\.(\d+)\.(w[123])\.weight$", name)
        if m:
            experts[f"{m[1]}.switch_mlp.{PROJ[m[3]]}"][int(m[2])] = a
        else:
            mods[name[: -len(".weight")] if name.endswith(".weight") else name] = a
    for path, d in experts.items():
        mods[path] = np.stack([d[e] for e in range(len(d))])
    return mods


def check_weights(out, src, passthrough=()) -> dict:
    """Every output tensor is exactly MLX's quantization (or cast) of the source weight; returns
    the relative weight error per quantization spec. Modules in `passthrough` must instead hold
    the source's MXFP8 bytes."""
    config = json.loads((Path(out) / "config.json").read_text())
    quant = config.get("quantization") or {}
    got = load_dir(out)
    errors = defaultdict(list)
    for path, w in source_modules(src).items():
        if f"{path}.scales" not in got:
            name = path if f"{path}.weight" not in got else f"{path}.weight"
            stored = got[name]
            assert mx.array_equal(stored, mx.array(w).astype(stored.dtype)).item(), name
            continue
        p = quant.get(path) or {k: quant[k] for k in ("group_size", "bits", "mode")}
        if path in passthrough:
            continue
        q = mx.quantize(mx.array(w), p["group_size"], p["bits"], mode=p["mode"])
        assert mx.array_equal(got[f"{path}.weight"], q[0]).item(), path
        scales = got[f"{path}.scales"]
        assert mx.array_equal(scales, q[1].astype(scales.dtype)).item(), path
        if p["mode"] == "affine":
            assert mx.array_equal(got[f"{path}.biases"], q[2].astype(scales.dtype)).item(), path
        deq = mx.dequantize(got[f"{path}.weight"], scales, got.get(f"{path}.biases"),
                            p["group_size"], p["bits"], mode=p["mode"], dtype=mx.float32)
        errors[p["mode"] + (str(p["bits"]) if p["mode"] == "affine" else "")].append(
            (float(mx.sum((deq - mx.array(w)) ** 2).item()),
             float(np.sum(w.astype(np.float64) ** 2))))
    return {k: (sum(a for a, _ in v) / sum(b for _, b in v)) ** 0.5 for k, v in errors.items()}


ROUND_TRIPS = [("bf16", t) for t in TARGETS] + [
    (s, t) for s in ("mxfp8", "nvfp4") for t in ("affine4", "affine8", "mxfp4", "mxfp8", "nvfp4",
                                                 "bf16")]


@pytest.mark.parametrize("source_fmt,target", ROUND_TRIPS)
def test_round_trip(sources, reference, tmp_path, source_fmt, target):
    out = tmp_path / "out"
    result = convert(sources[source_fmt], out, recipe="uniform", **TARGETS[target], **QUIET)
    assert result.written and result.verified["tensors"] > 0

    # loads in both runtimes, which agree on it
    ours = m3mlx.load_model(out, dtype=mx.float32)(TOKENS)
    theirs = mlx_lm_logits(out)
    assert mx.abs(ours - theirs).max().item() < 1e-4

    # exactly MLX's quantization of the source weights, with the mode's weight error
    copied = {u.path for u in result.plan.units if u.passthrough and u.spec.quantized}
    for spec, err in check_weights(out, sources[source_fmt], passthrough=copied).items():
        assert err < WEIGHT_BOUND[spec], (spec, err)

    # logits within the bound of the BF16 reference
    err = rel_err(theirs, reference)
    assert err <= LOGIT_BOUND[target] + SOURCE_BOUND[source_fmt], err


def test_default_recipe_keeps_sensitive_parts_precise(sources, reference, tmp_path):
    out = tmp_path / "out"
    convert(sources["bf16"], out, **QUIET)  # affine 4-bit, recipe m3
    config = json.loads((out / "config.json").read_text())
    q = config["quantization"]
    assert (q["group_size"], q["bits"], q["mode"]) == (64, 4, "affine")
    assert q["language_model.model.layers.1.block_sparse_moe.gate"] is False
    assert q["language_model.model.layers.1.self_attn.index_q_proj"] is False
    for path in ("language_model.model.layers.1.self_attn.q_proj", "language_model.lm_head",
                 "language_model.model.embed_tokens",
                 "language_model.model.layers.1.block_sparse_moe.shared_experts.down_proj",
                 "language_model.model.layers.0.mlp.up_proj"):
        assert q[path] == {"group_size": 64, "bits": 8, "mode": "affine"}, path
    assert "language_model.model.layers.1.block_sparse_moe.switch_mlp.up_proj" not in q
    assert config["quantization_config"] == q
    w = load_dir(out)
    assert w["language_model.model.layers.1.block_sparse_moe.gate.weight"].dtype == mx.float32
    bias = "language_model.model.layers.1.block_sparse_moe.e_score_correction_bias"
    assert w[bias].dtype == mx.float32
    assert w["language_model.model.layers.1.self_attn.index_k_proj.weight"].dtype == mx.bfloat16
    assert w["language_model.model.norm.weight"].dtype == mx.bfloat16
    check_weights(out, sources["bf16"])
    # 4-bit experts with 8-bit attention land between the uniform 4- and 8-bit errors
    err = rel_err(mlx_lm_logits(out), reference)
    assert err <= LOGIT_BOUND["affine4"], err


def test_mxfp8_to_mxfp8_is_bit_exact(sources, tmp_path):
    src = sources["mxfp8"]
    out = tmp_path / "out"
    result = convert(src, out, mode="mxfp8", recipe="uniform",
                     roles={"embed": "none", "lm_head": "none"}, **QUIET)
    raw = load_dir(src)
    got = load_dir(out)
    copied = set()
    for name, scale in raw.items():
        if not name.endswith(".weight_scale_inv"):
            continue
        base = name[: -len(".weight_scale_inv")]
        codes = raw[f"{base}.weight"]
        m = re.match(r"(.+\.block_sparse_moe)\.experts\.(\d+)\.(w[123])$", base)
        if m:
            path, e = f"{m[1]}.switch_mlp.{PROJ[m[3]]}", int(m[2])
            w, s = got[f"{path}.weight"][e], got[f"{path}.scales"][e]
        else:
            path, w, s = base, got[f"{base}.weight"], got[f"{base}.scales"]
        assert w.dtype == mx.uint32 and mx.array_equal(w.view(mx.uint8), codes).item(), base
        assert mx.array_equal(s, scale).item(), base
        copied.add(path)
    assert len(copied) > 20
    # the plan says so, and a converter that re-quantized would not have been exact
    assert sum(len(u.sources) for u in result.plan.units if u.passthrough and u.spec.quantized) \
        == sum(1 for n in raw if n.endswith(".weight_scale_inv"))
    deq = dequantized_source(src)
    differs = 0
    for name in [n for n in raw if n.endswith(".weight_scale_inv")][:10]:
        base = name[: -len(".weight_scale_inv")]
        q, _ = mx.quantize(mx.array(deq[f"{base}.weight"]), 32, 8, mode="mxfp8")
        differs += not mx.array_equal(q.view(mx.uint8), raw[f"{base}.weight"]).item()
    assert differs > 0
    # the same model as mlx-lm reading the MXFP8 checkpoint itself, to the last bit
    assert mx.array_equal(mlx_lm_logits(out), mlx_lm_logits(src)).item()
    check_weights(out, src, passthrough=copied)


def test_matches_mlx_lm_convert(sources, tmp_path):
    """Same tensor names, shapes, dtypes and bytes as `mlx_lm convert -q`, router aside (mlx-lm
    keeps its scales in the router's fp32, we use --dtype)."""
    from mlx_lm.convert import convert as mlx_lm_convert

    theirs_dir = tmp_path / "mlx_lm"
    mlx_lm_convert(str(sources["bf16"]), str(theirs_dir), quantize=True, q_bits=4, q_group_size=64)
    convert(sources["bf16"], tmp_path / "ours", recipe="mlx-lm", **QUIET)
    theirs, ours = load_dir(theirs_dir), load_dir(tmp_path / "ours")
    assert set(theirs) == set(ours)
    for name, a in theirs.items():
        b = ours[name]
        assert a.shape == b.shape, name
        if ".block_sparse_moe.gate." in name:
            assert mx.allclose(a.astype(mx.float32), b.astype(mx.float32), rtol=1e-2).item()
            continue
        assert a.dtype == b.dtype and mx.array_equal(a, b).item(), name


def test_layout_config_and_side_files(sources, tmp_path):
    out = tmp_path / "out"
    convert(sources["nvfp4"], out, **QUIET)
    config = json.loads((out / "config.json").read_text())
    src_config = json.loads((sources["nvfp4"] / "config.json").read_text())
    assert "vision_config" not in config and "vision_config" in src_config
    assert config["text_config"] == src_config["text_config"]
    meta = config["m3mlx_conversion"]
    assert meta["vision_tower"].startswith("dropped") and meta["source_format"] == "nvfp4"
    assert meta["mtp_layers"] == 0
    names = {p.name for p in out.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json",
            "chat_template.jinja", "model.safetensors.index.json", "config.json"} <= names
    assert "hf_quant_config.json" not in names  # mlx-lm would read it as a quantization config
    assert not any(n.endswith(".partial") or n.startswith(".m3mlx") for n in names)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(load_dir(out))
    assert not any(k.startswith(("vision_tower", "multi_modal", "patch_merge"))
                   for k in index["weight_map"])
    assert not any(k.endswith((".input_scale", ".weight_scale_2")) for k in index["weight_map"])


def test_mtp_tensors_go_to_their_own_file(tmp_path):
    src = bf16_checkpoint(tmp_path / "src", with_mtp=True, **QUANT_DIMS)
    out = tmp_path / "out"
    convert(src, out, **QUIET)
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    mtp = {k: f for k, f in index.items() if ".mtp." in k}
    assert mtp and set(mtp.values()) == {MTP_FILE}
    assert all(".mtp." not in k for k, f in index.items() if f.startswith("model"))
    mtp_layer = "language_model.model.mtp.layers.0.transformer_layer"
    assert f"{mtp_layer}.block_sparse_moe.switch_mlp.gate_proj.weight" in mtp
    # mlx-lm's strict loader only globs model*.safetensors: it loads the conversion
    model, _ = mlx_lm_load_model(out)
    assert m3mlx.load_model(out).has_mtp
    check_weights(out, src)
    assert json.loads((out / "config.json").read_text())["m3mlx_conversion"]["mtp_layers"] == 1


def test_shards_respect_the_size_limit(sources, tmp_path):
    out = tmp_path / "out"
    limit = 150_000
    result = convert(sources["bf16"], out, mode="none", max_shard_size=limit, **QUIET)
    files = sorted(p.name for p in out.glob("model*.safetensors"))
    assert len(files) == len(result.plan.files) > 3
    assert files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    for f in files:
        # a shard only goes past the limit when it holds a single tensor group that is larger
        size = (out / f).stat().st_size
        assert size <= limit or len({u.path for u in result.plan.units if u.file == f}) == 1
    assert verify(out)["files"] == len(files)
    model, _ = mlx_lm_load_model(out)


def test_verify_catches_a_tampered_output(sources, tmp_path):
    out = tmp_path / "out"
    convert(sources["bf16"], out, **QUIET)
    config = json.loads((out / "config.json").read_text())
    config["quantization"]["language_model.model.layers.1.self_attn.q_proj"] = {
        "group_size": 64, "bits": 4, "mode": "affine"}
    with pytest.raises(ConvertError, match="q_proj"):
        verify(out, config)


def test_plan_reports_sizes_and_bits(sources, tmp_path):
    lines = []
    result = convert(sources["bf16"], tmp_path / "out", dry_run=True, log=lines.append,
                     progress=False)
    text = "\n".join(lines)
    assert not (tmp_path / "out").exists()
    assert "bits/weight" in text and "estimated time" in text and "dry run" in text
    for role in ("experts", "attention", "router", "index", "embed", "lm_head", "norm"):
        assert re.search(rf"^{role}\s", text, re.M), role
    plan = result.plan
    assert plan.out_bytes == sum(u.out_bytes for u in plan.units)
    # the dry run's size is the real size, to the byte
    convert(sources["bf16"], tmp_path / "real", **QUIET)
    on_disk = sum((tmp_path / "real" / f).stat().st_size for f in plan.files)
    assert on_disk == sum(plan.file_bytes.values())


def test_mxfp8_encoder_matches_the_spec():
    """The fixture's own encoder: e4m3 codes times 2**(s-127) reproduce the weights closely."""
    w = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    codes, exps = mxfp8_encode(w)
    vals = np.array(mx.from_fp8(mx.array(codes), dtype=mx.float32)).reshape(4, 2, 32)
    deq = (vals * np.ldexp(1.0, exps.astype(np.int32) - 127)[..., None]).reshape(4, 64)
    assert np.abs(deq - w).max() < 0.07 * np.abs(w).max()
