"""Precision by tensor role: what each part of M3 is stored as.

Every text tensor has one role. A recipe maps roles to a `Spec` given the run's base setting
(`--mode/--bits/--group-size`); `--role ROLE=SPEC` overrides a role. Spec strings:

    none | bf16 | fp16 | fp32        unquantized (`none` = the run's --dtype)
    4, 8, affine4, 4g32, affine3g128 MLX affine with that many bits (group size after `g`,
                                     else the run's --group-size, else 64)
    mxfp4 | mxfp8 | nvfp4            MLX microscaling float formats (group 32, 32, 16)
"""

import re
from dataclasses import dataclass
from typing import Dict, Mapping, Optional

from .errors import ConvertError

ROLES = {
    "embed": "token embeddings (embed_tokens)",
    "lm_head": "output projection (lm_head)",
    "attention": "attention q/k/v/o projections",
    "index": "MSA index projections (index_q_proj, index_k_proj)",
    "router": "MoE router (block_sparse_moe.gate)",
    "shared_expert": "always-on shared expert",
    "experts": "routed experts (stacked switch_mlp)",
    "dense_mlp": "dense MLPs of the first layers",
    "mtp": "multi-token-prediction module projections and experts",
    "norm": "RMSNorm weights",
    "correction_bias": "router e_score_correction_bias",
}
FLOAT_ONLY_ROLES = ("norm", "correction_bias")

AFFINE_BITS = (2, 3, 4, 5, 6, 8)
AFFINE_GROUPS = (32, 64, 128)
FP_MODES = {"mxfp4": (4, 32), "mxfp8": (8, 32), "nvfp4": (4, 16)}
MODES = ("affine",) + tuple(FP_MODES) + ("none",)
FLOATS = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32",
          "bfloat16": "bfloat16", "float16": "float16", "float32": "float32"}
FLOAT_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


@dataclass(frozen=True)
class Spec:
    """How one tensor is stored: quantized (mode, bits, group_size) or a float dtype."""

    mode: str  # "affine", "mxfp4", "mxfp8", "nvfp4" or "float"
    bits: Optional[int] = None
    group_size: Optional[int] = None
    dtype: Optional[str] = None  # float storage dtype; None = the run's --dtype

    @property
    def quantized(self) -> bool:
        return self.mode != "float"

    def quant_params(self) -> dict:
        return {"group_size": self.group_size, "bits": self.bits, "mode": self.mode}

    def bits_per_weight(self, scale_bytes: int = 2) -> float:
        """Stored bits per weight, scales (and affine biases) included."""
        if not self.quantized:
            return 8.0 * FLOAT_BYTES[self.dtype or "bfloat16"]
        extra = 2 * scale_bytes * 8 if self.mode == "affine" else 8
        return self.bits + extra / self.group_size

    def __str__(self) -> str:
        if not self.quantized:
            return self.dtype or "float"
        if self.mode == "affine":
            return f"affine {self.bits}-bit g{self.group_size}"
        return self.mode

    def with_dtype(self, dtype: str) -> "Spec":
        return Spec("float", dtype=dtype) if not self.quantized and self.dtype is None else self


def base_spec(mode: str, bits: Optional[int], group_size: Optional[int]) -> Spec:
    """The run's base setting from --mode/--bits/--group-size, checked."""
    if mode not in MODES:
        raise ConvertError(f"--mode {mode!r} is not one of {', '.join(MODES)}")
    if mode == "none":
        if bits is not None or group_size is not None:
            raise ConvertError("--bits/--group-size make no sense with --mode none (no "
                               "quantization); drop them or pick a quantized mode")
        return Spec("float")
    if mode in FP_MODES:
        fixed_bits, fixed_group = FP_MODES[mode]
        if bits not in (None, fixed_bits) or group_size not in (None, fixed_group):
            raise ConvertError(f"{mode} always uses {fixed_bits} bits in groups of {fixed_group}; "
                               "drop --bits/--group-size or pass those values")
        return Spec(mode, fixed_bits, fixed_group)
    bits = 4 if bits is None else bits
    group_size = 64 if group_size is None else group_size
    if bits not in AFFINE_BITS:
        raise ConvertError(f"--bits {bits}: affine quantization takes "
                           f"{', '.join(map(str, AFFINE_BITS))} bits")
    if group_size not in AFFINE_GROUPS:
        raise ConvertError(f"--group-size {group_size}: affine quantization takes groups of "
                           f"{', '.join(map(str, AFFINE_GROUPS))}")
    return Spec("affine", bits, group_size)


_AFFINE_SPEC = re.compile(r"^(?:affine)?(\d+)(?:g(\d+))?$")


def parse_spec(text: str, default_group: int = 64) -> Spec:
    """A --role value (see the module docstring) -> Spec."""
    t = text.strip().lower()
    if t in ("none", "float"):
        return Spec("float")
    if t in FLOATS:
        return Spec("float", dtype=FLOATS[t])
    if t in FP_MODES:
        return Spec(t, *FP_MODES[t])
    m = _AFFINE_SPEC.match(t)
    if m:
        bits, group = int(m[1]), int(m[2]) if m[2] else default_group
        if bits not in AFFINE_BITS or group not in AFFINE_GROUPS:
            raise ConvertError(f"precision {text!r}: affine takes bits "
                               f"{'/'.join(map(str, AFFINE_BITS))} and groups "
                               f"{'/'.join(map(str, AFFINE_GROUPS))}")
        return Spec("affine", bits, group)
    raise ConvertError(f"precision {text!r} is not understood; use none, bf16, fp16, fp32, "
                       "BITS (affine, e.g. 4 or 4g32), mxfp4, mxfp8 or nvfp4")


def _high(base: Spec) -> Spec:
    """8-bit in the base's family: where the recipe spends bits."""
    if not base.quantized:
        return base
    if base.mode == "affine":
        return Spec("affine", 8, base.group_size)
    return Spec("mxfp8", 8, 32)


def _m3(base: Spec) -> Dict[str, Spec]:
    """Routed experts (97% of the weights, 4 of 128 active per token) at the base setting; the
    parts every token goes through (attention, shared expert, dense MLPs, embeddings, lm_head)
    at 8 bits; the small and sensitive parts unquantized: index projections (they pick the
    attended blocks), norms, and the router with its correction bias in fp32."""
    high = _high(base)
    return {
        "experts": base, "mtp": base,
        "attention": high, "shared_expert": high, "dense_mlp": high, "embed": high,
        "lm_head": high,
        "index": Spec("float"), "norm": Spec("float"),
        "router": Spec("float", dtype="float32"), "correction_bias": Spec("float", dtype="float32"),
    }


def _uniform(base: Spec) -> Dict[str, Spec]:
    """Every quantizable tensor at the base setting; router and bias fp32, norms unquantized."""
    specs = {role: base for role in ROLES}
    specs.update(norm=Spec("float"), router=Spec("float", dtype="float32"),
                 correction_bias=Spec("float", dtype="float32"))
    return specs


def _mlx_lm(base: Spec) -> Dict[str, Spec]:
    """What `mlx_lm convert -q` makes of M3: everything at the base setting except the router
    (affine 8-bit, group 64); only the correction bias stays fp32."""
    specs = _uniform(base)
    if base.quantized:
        specs["router"] = Spec("affine", 8, 64)
    else:
        specs["router"] = Spec("float")
    return specs


# Recipes that set every role themselves, so --mode/--bits/--group-size do not apply: M3 in a
# Mac of 192 or 128 GB. Chosen by measurement (tools/measure_recipes.py): of the precisions by
# role whose size on the real M3 leaves a tenth of the memory to macOS, the KV cache and
# activations, the ones with the least KL divergence on the tiny trained M3 (README, "Choosing
# a recipe"). Roles not named stay as the release stores them (bf16; router and bias fp32).
FIXED_RECIPES = {
    "fit-192gb": {"experts": "3g128", "attention": "8g64", "shared_expert": "mxfp8"},
    "fit-128gb": {"experts": "2g128", "attention": "3g64", "shared_expert": "3g64",
                  "dense_mlp": "6g64", "embed": "6g64", "lm_head": "6g64"},
}


def _fixed(choice: Mapping[str, str]):
    def specs(base: Spec) -> Dict[str, Spec]:
        out = _uniform(Spec("float"))
        out.update({role: parse_spec(text) for role, text in choice.items()})
        out["mtp"] = out["experts"]
        return out
    return specs


RECIPES = {"m3": _m3, "uniform": _uniform, "mlx-lm": _mlx_lm,
           **{name: _fixed(choice) for name, choice in FIXED_RECIPES.items()}}
DEFAULT_RECIPE = "m3"


def check_recipe_options(recipe: str, mode: str, bits: Optional[int], group_size: Optional[int]):
    if recipe in FIXED_RECIPES and (mode != "affine" or bits is not None
                                    or group_size is not None):
        raise ConvertError(f"--recipe {recipe} sets the precision of every role itself; drop "
                           "--mode/--bits/--group-size (use --role ROLE=PRECISION to change one)")


def resolve(recipe: str, mode: str, bits: Optional[int], group_size: Optional[int],
            overrides: Optional[Mapping[str, object]] = None, dtype: str = "bfloat16"):
    """(base Spec, role -> Spec) for the options of one conversion, checked. The base is the
    routed experts' setting (a fixed recipe's own, for those)."""
    check_recipe_options(recipe, mode, bits, group_size)
    base = base_spec(mode, bits, group_size)
    specs = role_specs(recipe, base, overrides, dtype)
    return (specs["experts"] if recipe in FIXED_RECIPES else base), specs


def role_specs(recipe: str, base: Spec, overrides: Optional[Mapping[str, object]] = None,
               dtype: str = "bfloat16") -> Dict[str, Spec]:
    """Role -> Spec for a recipe at a base setting, with per-role overrides applied."""
    if recipe not in RECIPES:
        raise ConvertError(f"--recipe {recipe!r} is not known; choose one of "
                           f"{', '.join(RECIPES)}")
    specs = RECIPES[recipe](base)
    for role, value in (overrides or {}).items():
        if role not in ROLES:
            raise ConvertError(f"--role {role}=...: no such role; roles are "
                               f"{', '.join(ROLES)}")
        spec = value if isinstance(value, Spec) else parse_spec(
            str(value), base.group_size if base.mode == "affine" else 64)
        if role in FLOAT_ONLY_ROLES and spec.quantized:
            raise ConvertError(f"--role {role}={value}: {ROLES[role]} are vectors and cannot be "
                               "quantized; use none, bf16, fp16 or fp32")
        specs[role] = spec
    return {role: spec.with_dtype(dtype) for role, spec in specs.items()}


def parse_role_overrides(items) -> Dict[str, str]:
    """['experts=3', 'attention=8'] -> {'experts': '3', 'attention': '8'}."""
    out: Dict[str, str] = {}
    for item in items or ():
        role, sep, value = str(item).partition("=")
        if not sep or not role.strip() or not value.strip():
            raise ConvertError(f"--role {item!r}: write ROLE=PRECISION, e.g. --role experts=3 or "
                               "--role attention=mxfp8")
        out[role.strip()] = value.strip()
    return out
