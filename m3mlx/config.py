"""MiniMax-M3 text-tower configuration, validated before anything is built from it.

Reads both spellings of the published config: the raw one (`sparse_attention_config`,
`moe_layer_freq`) and the transformers-native one (`layer_types`, `mlp_layer_types`,
`index_*`). A config.json is input, not code: every field the runtime uses is type- and
range-checked here, so a damaged or hostile file fails with the field named instead of building a
model of absurd size or crashing inside MLX. Variants this runtime does not implement are refused
the same way.
"""

import math
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Optional

from .errors import CheckpointError

MODEL_TYPES = ("minimax_m3_vl", "minimax_m3", "minimax_m3_text")

# Plausible bounds: generous for any M3-shaped model (M3 has 60 layers, 128 experts, a vocabulary
# of 200,064, 64 heads, matrices at most 12,288 wide), tight enough that no config within them
# describes a model that cannot be laid out in memory before its weights are checked.
MAX_LAYERS = 1024
MAX_EXPERTS = 4096
MAX_VOCAB = 1 << 22
MAX_WIDTH = 1 << 18
MAX_HEADS = 1024
MAX_HEAD_DIM = 4096
MAX_CONTEXT = 1 << 26
MAX_MSA = 1 << 16  # MSA block size and top-k blocks
MAX_MTP = 64

LAYER_TYPES = {"full_attention": False, "minimax_m3_sparse": True}  # -> MSA layer
MLP_LAYER_TYPES = {"dense": False, "sparse": True}  # -> MoE layer
QUANT_MODES = ("affine", "mxfp4", "mxfp8", "nvfp4")


class ConfigError(CheckpointError, ValueError):
    """A config.json this runtime cannot run, with the field that makes it so."""


@dataclass
class ModelArgs:
    hidden_size: int = 6144
    num_hidden_layers: int = 60
    num_attention_heads: int = 64
    num_key_value_heads: int = 4
    head_dim: int = 128
    rotary_dim: int = 64
    rope_theta: float = 5_000_000.0
    rms_norm_eps: float = 1e-6
    vocab_size: int = 200064
    max_position_embeddings: int = 1048576
    tie_word_embeddings: bool = False
    intermediate_size: int = 3072
    shared_intermediate_size: int = 3072
    dense_intermediate_size: int = 12288
    num_local_experts: int = 128
    num_experts_per_tok: int = 4
    n_shared_experts: int = 1
    routed_scaling_factor: float = 2.0
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    sparse_layers: List[bool] = field(default_factory=list)
    moe_layers: List[bool] = field(default_factory=list)
    index_n_heads: int = 4
    index_head_dim: int = 128
    index_block_size: int = 128
    index_topk_blocks: int = 16
    num_mtp_modules: int = 0
    bos_token_id: Optional[int] = 200034
    eos_token_id: Any = 200020

    def __post_init__(self):
        # Scalars first: the per-layer lists are built from num_hidden_layers.
        for name, lo, hi in _INT_FIELDS:
            _check_int(name, getattr(self, name), lo, getattr(self, hi) if isinstance(hi, str)
                       else hi)
        for name in _POSITIVE_FLOATS:
            setattr(self, name, _check_positive(name, getattr(self, name)))
        if not 0 < self.rms_norm_eps < 1:
            raise ConfigError(f"rms_norm_eps is {self.rms_norm_eps!r}; it must be between 0 "
                              "and 1 (M3 uses 1e-6)")
        if not isinstance(self.tie_word_embeddings, bool):
            raise ConfigError(f"tie_word_embeddings is {_short(self.tie_word_embeddings)}; it "
                              "must be true or false")
        self._check_token_ids()

        n = self.num_hidden_layers
        if isinstance(self.sparse_layers, list) and not self.sparse_layers:
            self.sparse_layers = [i >= 3 for i in range(n)]
        if isinstance(self.moe_layers, list) and not self.moe_layers:
            self.moe_layers = [i >= 3 for i in range(n)]
        for name in ("sparse_layers", "moe_layers"):
            flags = getattr(self, name)
            if not isinstance(flags, list) or not all(isinstance(f, bool) for f in flags):
                raise ConfigError(f"{_shown(name)} must be a list of per-layer flags, not "
                                  f"{_short(flags)}")
            if len(flags) != n:
                raise ConfigError(
                    f"{_shown(name)} has {len(flags)} entries for num_hidden_layers={n}; the "
                    "per-layer lists must cover every layer")

        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}")
        if any(self.sparse_layers) and self.index_n_heads != self.num_key_value_heads:
            raise ConfigError(
                f"sparse_num_index_heads={self.index_n_heads} differs from "
                f"num_key_value_heads={self.num_key_value_heads}; MSA needs one index "
                "head per KV head")
        if self.rotary_dim > min(self.head_dim, self.index_head_dim) or self.rotary_dim % 2:
            raise ConfigError(
                f"rotary_dim={self.rotary_dim} must be even and fit head_dim="
                f"{self.head_dim} and sparse_index_dim={self.index_head_dim}")

    def _check_token_ids(self):
        for name in ("bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            ids = value if isinstance(value, list) and name == "eos_token_id" else [value]
            if value is not None and not all(_is_int(i) and 0 <= i < MAX_VOCAB for i in ids):
                raise ConfigError(f"{name} is {_short(value)}; it must be a token id (or, for "
                                  "eos_token_id, a list of ids)")

    @property
    def eos_token_ids(self) -> List[int]:
        eos = self.eos_token_id
        return [] if eos is None else list(eos) if isinstance(eos, list) else [eos]

    @classmethod
    def from_config(cls, config: Dict[str, Any]) -> "ModelArgs":
        """Build from a config.json dict: the VL wrapper or a bare text config."""
        if not isinstance(config, dict):
            raise ConfigError(f"the config is {_kind(config)}, not a JSON object")
        model_type = config.get("model_type")
        if model_type is not None and model_type not in MODEL_TYPES:
            raise ConfigError(
                f"model_type is {_short(model_type)}, not a MiniMax-M3 checkpoint "
                f"(expected one of {', '.join(MODEL_TYPES)})")
        text = config.get("text_config", config)
        if not isinstance(text, dict):
            raise ConfigError(f"text_config is {_kind(text)}; it must be a JSON object")
        _refuse_unsupported(text)
        return cls(**_text_fields(text))

    def to_text_config(self) -> Dict[str, Any]:
        """The raw-shape text_config this args object describes."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in ("sparse_layers", "moe_layers", "index_n_heads", "index_head_dim",
                     "index_block_size", "index_topk_blocks"):
            out.pop(name)
        out["moe_layer_freq"] = [int(m) for m in self.moe_layers]
        out["sparse_attention_config"] = {
            "use_sparse_attention": any(self.sparse_layers),
            "sparse_attention_freq": [int(s) for s in self.sparse_layers],
            "sparse_disable_index_value": [int(s) for s in self.sparse_layers],
            "sparse_num_index_heads": self.index_n_heads,
            "sparse_index_dim": self.index_head_dim,
            "sparse_block_size": self.index_block_size,
            "sparse_topk_blocks": self.index_topk_blocks,
            "sparse_init_block": 0,
            "sparse_local_block": 1,
            "sparse_score_type": "max",
        }
        out["use_gemma_norm"] = True
        out["use_qk_norm"] = True
        out["qk_norm_type"] = "per_head"
        out["hidden_act"] = "swigluoai"
        out["scoring_func"] = "sigmoid"
        out["use_routing_bias"] = True
        return out


# (field, least, most): the most is a number or the name of the field that bounds it.
_INT_FIELDS = (
    ("num_hidden_layers", 1, MAX_LAYERS),
    ("hidden_size", 1, MAX_WIDTH),
    ("num_attention_heads", 1, MAX_HEADS),
    ("num_key_value_heads", 1, "num_attention_heads"),
    ("head_dim", 1, MAX_HEAD_DIM),
    ("rotary_dim", 2, "head_dim"),
    ("vocab_size", 1, MAX_VOCAB),
    ("max_position_embeddings", 1, MAX_CONTEXT),
    ("intermediate_size", 1, MAX_WIDTH),
    ("shared_intermediate_size", 1, MAX_WIDTH),
    ("dense_intermediate_size", 1, MAX_WIDTH),
    ("num_local_experts", 1, MAX_EXPERTS),
    ("num_experts_per_tok", 1, "num_local_experts"),
    ("n_shared_experts", 0, 1),
    ("index_n_heads", 1, MAX_HEADS),
    ("index_head_dim", 1, MAX_HEAD_DIM),
    ("index_block_size", 1, MAX_MSA),
    ("index_topk_blocks", 1, MAX_MSA),
    ("num_mtp_modules", 0, MAX_MTP),
)
_POSITIVE_FLOATS = ("rope_theta", "rms_norm_eps", "routed_scaling_factor", "swiglu_alpha",
                    "swiglu_limit")

# Field name -> its spelling in the raw M3 config.json, where the two differ.
_SPELLING = {
    "index_n_heads": "sparse_num_index_heads",
    "index_head_dim": "sparse_index_dim",
    "index_block_size": "sparse_block_size",
    "index_topk_blocks": "sparse_topk_blocks",
    "sparse_layers": "the sparse layer list (sparse_attention_freq or layer_types)",
    "moe_layers": "the MoE layer list (moe_layer_freq or mlp_layer_types)",
    "rotary_dim": "rotary_dim (head_dim x partial_rotary_factor)",
}


def _shown(name: str) -> str:
    return _SPELLING.get(name, name)


def _short(value, limit: int = 60) -> str:
    """A value for a one-line message: its JSON-ish repr, cut short."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _kind(value) -> str:
    names = {list: "a list", str: "a string", int: "a number", float: "a number",
             bool: "a boolean", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(name: str, value, lo: int, hi: int):
    if not _is_int(value) or not lo <= value <= hi:
        raise ConfigError(f"{_shown(name)} is {_short(value)}; it must be an integer from {lo} "
                          f"to {hi}")


def _check_positive(name: str, value) -> float:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name} is {_short(value)}; it must be a finite number above 0")
    return float(value)


def _object(parent: Dict[str, Any], key: str, where: str = "") -> Dict[str, Any]:
    """parent[key] as a dict ({} when absent or null)."""
    value = parent.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}{key} is {_short(value)}; it must be a JSON object or null")
    return value


def _flags(parent: Dict[str, Any], key: str, where: str = "") -> Optional[List[bool]]:
    """A per-layer 0/1 list as booleans (None when absent or null)."""
    value = parent.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or not all(v in (0, 1) and not isinstance(v, float)
                                              for v in value):
        raise ConfigError(f"{where}{key} is {_short(value)}; it must be a list of 0/1 per layer")
    return [bool(v) for v in value]


def _names(text: Dict[str, Any], key: str, allowed: Dict[str, bool]) -> Optional[List[bool]]:
    """A per-layer list of type names as booleans (None when absent or null)."""
    value = text.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) and v in allowed
                                              for v in value):
        raise ConfigError(f"{key} is {_short(value)}; it must list one of "
                          f"{', '.join(map(repr, allowed))} per layer")
    return [allowed[v] for v in value]


def _expect(text: Dict[str, Any], key: str, allowed, why: str):
    if key in text and text[key] is not None and text[key] not in allowed:
        raise ConfigError(f"{key}={_short(text[key])} is not supported: {why}")


def _refuse_unsupported(text: Dict[str, Any]):
    sac = _object(text, "sparse_attention_config")
    _expect(sac, "sparse_score_type", ("max",), "only max-pooled block scores are implemented")
    _expect(sac, "sparse_init_block", (0,), "M3 has no forced sink blocks")
    _expect(sac, "sparse_local_block", (1,), "M3 forces exactly the query's own block")
    where = "sparse_attention_config."
    sparse = _flags(sac, "sparse_attention_freq", where) or []
    disabled = _flags(sac, "sparse_disable_index_value", where) or [True] * len(sparse)
    if any(s and not d for s, d in zip(sparse, disabled)):
        raise ConfigError(
            "sparse_disable_index_value is 0 on a sparse layer: index values are not "
            "implemented (M3 scores blocks with index keys only)")
    _expect(text, "index_local_blocks", (1,), "M3 forces exactly the query's own block")
    _expect(text, "scoring_func", ("sigmoid",), "M3 routes with a sigmoid")
    _expect(text, "use_gemma_norm", (True,), "M3's norms scale by (1 + w)")
    _expect(text, "qk_norm_type", ("per_head",), "M3 normalizes q and k per head")
    _expect(text, "use_qk_norm", (True,), "M3 normalizes q and k per head")
    _expect(text, "attention_output_gate", (False,), "M3 has no attention output gate")
    _expect(text, "hidden_act", ("swigluoai", "silu"), "M3 uses SwiGLU-OAI experts")
    _expect(text, "n_shared_experts", (0, 1), "at most one shared expert is implemented")
    _expect(text, "swiglu_beta", (1.0, 1), "SwiGLU-OAI is implemented with beta 1")
    scaling = _object(text, "rope_scaling")
    rope = _object(text, "rope_parameters")
    kind = scaling.get("rope_type", scaling.get("type")) or rope.get("rope_type")
    if kind not in (None, "default"):
        raise ConfigError(f"rope scaling {_short(kind)} is not supported: M3 uses plain RoPE")


def _text_fields(text: Dict[str, Any]) -> Dict[str, Any]:
    known = {f.name for f in fields(ModelArgs)}
    out = {k: v for k, v in text.items() if k in known}
    n = text.get("num_hidden_layers", ModelArgs.num_hidden_layers)
    _check_int("num_hidden_layers", n, 1, MAX_LAYERS)  # before any list is built from it

    rope = _object(text, "rope_parameters")
    if "rope_theta" in rope:
        out["rope_theta"] = rope["rope_theta"]
    head_dim = text.get("head_dim", ModelArgs.head_dim)
    if text.get("rotary_dim") is None:
        factor = rope.get("partial_rotary_factor", text.get("partial_rotary_factor", 0.5))
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not (
                0 < factor <= 1):
            raise ConfigError(f"partial_rotary_factor is {_short(factor)}; it must be a number "
                              "in (0, 1] (M3 uses 0.5)")
        if _is_int(head_dim):  # a bad head_dim is reported by ModelArgs, by name
            out["rotary_dim"] = int(head_dim * factor)

    sac = _object(text, "sparse_attention_config")
    for src, dst in (
        ("sparse_num_index_heads", "index_n_heads"),
        ("sparse_index_dim", "index_head_dim"),
        ("sparse_block_size", "index_block_size"),
        ("sparse_topk_blocks", "index_topk_blocks"),
    ):
        if src in sac:
            out[dst] = sac[src]
    for key in ("index_n_heads", "index_head_dim", "index_block_size", "index_topk_blocks"):
        if text.get(key) is not None:
            out[key] = text[key]

    use = sac.get("use_sparse_attention", True)
    if not isinstance(use, bool):
        raise ConfigError(f"sparse_attention_config.use_sparse_attention is {_short(use)}; it "
                          "must be true or false")
    layer_types = _names(text, "layer_types", LAYER_TYPES)
    freq = _flags(sac, "sparse_attention_freq", "sparse_attention_config.")
    if layer_types is not None:
        out["sparse_layers"] = layer_types
    elif freq is not None:
        out["sparse_layers"] = [f and use for f in freq]
    elif sac and not use:
        out["sparse_layers"] = [False] * n

    mlp_types = _names(text, "mlp_layer_types", MLP_LAYER_TYPES)
    moe_freq = text.get("moe_layer_freq")
    if mlp_types is not None:
        out["moe_layers"] = mlp_types
    elif isinstance(moe_freq, list):
        out["moe_layers"] = _flags(text, "moe_layer_freq")
    elif moe_freq is not None:
        if moe_freq != 1 or isinstance(moe_freq, float):
            raise ConfigError(f"moe_layer_freq is {_short(moe_freq)}; it must be a list of 0/1 "
                              "per layer (or 1: every layer is MoE)")
        out["moe_layers"] = [True] * n

    if text.get("num_nextn_predict_layers") is not None and "num_mtp_modules" not in text:
        out["num_mtp_modules"] = text["num_nextn_predict_layers"]
    return out


def check_quantization(config: Dict[str, Any]):
    """Refuse a `quantization` block (mlx-lm's: defaults plus per-module overrides) or a
    `quantization_config` that is not shaped as the loaders read it."""
    for where, parent in (("", config), ("text_config.", config.get("text_config") or {})):
        if isinstance(parent, dict) and parent.get("quantization_config") is not None:
            check_quantization_config(parent["quantization_config"], f"{where}quantization_config")
    quant = config.get("quantization")
    if quant is None:
        return
    if not isinstance(quant, dict):
        raise ConfigError(f"quantization is {_short(quant)}; it must be a JSON object like "
                          '{"group_size": 64, "bits": 4}')
    defaults = {k: quant[k] for k in ("group_size", "bits", "mode") if k in quant}
    _check_quant_params("quantization", defaults, required=("group_size", "bits"))
    for path, params in quant.items():
        if path in defaults or isinstance(params, bool):
            continue
        if not isinstance(params, dict):
            raise ConfigError(f"quantization[{path!r}] is {_short(params)}; a per-module entry "
                              "must be an object like {\"group_size\": 64, \"bits\": 8} or false")
        _check_quant_params(f"quantization[{_short(path)}]", params, required=())


def check_quantization_config(qc, where: str = "quantization_config"):
    """A `quantization_config` (config.json's, or ModelOpt's hf_quant_config.json, which nests
    its settings under `quantization`; where="" names its keys bare) shaped as the readers use
    it."""
    def key(k: str) -> str:
        return f"{where}.{k}" if where else k

    if not isinstance(qc, dict):
        raise ConfigError(f"{where} is {_short(qc)}; it must be a JSON object or null")
    method = qc.get("quant_method")
    if method is not None and not isinstance(method, str):
        raise ConfigError(f"{key('quant_method')} is {_short(method)}; it must be a string")
    settings = qc.get("quantization", qc)
    if not isinstance(settings, dict):
        raise ConfigError(f"{key('quantization')} is {_short(settings)}; it must be a JSON "
                          'object like {"quant_algo": "NVFP4", "group_size": 16}')
    algo, group = settings.get("quant_algo"), settings.get("group_size")
    if algo is not None and not isinstance(algo, str):
        raise ConfigError(f"{key('quant_algo')} is {_short(algo)}; it must be a string")
    if group is not None and not (_is_int(group) and group > 0):
        raise ConfigError(f"{key('group_size')} is {_short(group)}; it must be a positive "
                          "integer")


def _check_quant_params(where: str, params: Dict[str, Any], required):
    for key in required:
        if key not in params:
            raise ConfigError(f"{where} has no {key}")
    for key, most in (("group_size", 1024), ("bits", 8)):
        if key in params and not (_is_int(params[key]) and 1 <= params[key] <= most):
            raise ConfigError(f"{where}.{key} is {_short(params[key])}; it must be an integer "
                              f"from 1 to {most}")
    mode = params.get("mode", "affine")
    if mode not in QUANT_MODES:
        raise ConfigError(f"{where}.mode is {_short(mode)}; it must be one of "
                          f"{', '.join(QUANT_MODES)}")
