"""MiniMax-M3 text-tower configuration.

Reads both spellings of the published config: the raw one (`sparse_attention_config`,
`moe_layer_freq`) and the transformers-native one (`layer_types`, `mlp_layer_types`,
`index_*`). Variants this runtime does not implement are refused with the field named.
"""

from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Optional

MODEL_TYPES = ("minimax_m3_vl", "minimax_m3", "minimax_m3_text")


class ConfigError(ValueError):
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
        n = self.num_hidden_layers
        if not self.sparse_layers:
            self.sparse_layers = [i >= 3 for i in range(n)]
        if not self.moe_layers:
            self.moe_layers = [i >= 3 for i in range(n)]
        for name in ("sparse_layers", "moe_layers"):
            if len(getattr(self, name)) != n:
                raise ConfigError(
                    f"{name} has {len(getattr(self, name))} entries for "
                    f"num_hidden_layers={n}; the per-layer lists must cover every layer"
                )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if any(self.sparse_layers) and self.index_n_heads != self.num_key_value_heads:
            raise ConfigError(
                f"sparse_num_index_heads={self.index_n_heads} differs from "
                f"num_key_value_heads={self.num_key_value_heads}; MSA needs one index "
                "head per KV head"
            )
        if self.rotary_dim > min(self.head_dim, self.index_head_dim) or self.rotary_dim % 2:
            raise ConfigError(
                f"rotary_dim={self.rotary_dim} must be even and fit head_dim="
                f"{self.head_dim} and sparse_index_dim={self.index_head_dim}"
            )

    @property
    def eos_token_ids(self) -> List[int]:
        eos = self.eos_token_id
        return [] if eos is None else list(eos) if isinstance(eos, list) else [eos]

    @classmethod
    def from_config(cls, config: Dict[str, Any]) -> "ModelArgs":
        """Build from a config.json dict: the VL wrapper or a bare text config."""
        model_type = config.get("model_type")
        if model_type is not None and model_type not in MODEL_TYPES:
            raise ConfigError(
                f"model_type is {model_type!r}, not a MiniMax-M3 checkpoint "
                f"(expected one of {', '.join(MODEL_TYPES)})"
            )
        text = config.get("text_config", config)
        if not isinstance(text, dict):
            raise ConfigError("text_config must be a JSON object")
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


def _expect(text: Dict[str, Any], key: str, allowed, why: str):
    if key in text and text[key] is not None and text[key] not in allowed:
        raise ConfigError(f"{key}={text[key]!r} is not supported: {why}")


def _refuse_unsupported(text: Dict[str, Any]):
    sac = text.get("sparse_attention_config") or {}
    _expect(sac, "sparse_score_type", ("max",), "only max-pooled block scores are implemented")
    _expect(sac, "sparse_init_block", (0,), "M3 has no forced sink blocks")
    _expect(sac, "sparse_local_block", (1,), "M3 forces exactly the query's own block")
    sparse = sac.get("sparse_attention_freq") or []
    disabled = sac.get("sparse_disable_index_value") or [1] * len(sparse)
    if any(s and not d for s, d in zip(sparse, disabled)):
        raise ConfigError(
            "sparse_disable_index_value is 0 on a sparse layer: index values are not "
            "implemented (M3 scores blocks with index keys only)"
        )
    _expect(text, "index_local_blocks", (1,), "M3 forces exactly the query's own block")
    _expect(text, "scoring_func", ("sigmoid",), "M3 routes with a sigmoid")
    _expect(text, "use_gemma_norm", (True,), "M3's norms scale by (1 + w)")
    _expect(text, "qk_norm_type", ("per_head",), "M3 normalizes q and k per head")
    _expect(text, "use_qk_norm", (True,), "M3 normalizes q and k per head")
    _expect(text, "attention_output_gate", (False,), "M3 has no attention output gate")
    _expect(text, "hidden_act", ("swigluoai", "silu"), "M3 uses SwiGLU-OAI experts")
    _expect(text, "n_shared_experts", (0, 1), "at most one shared expert is implemented")
    _expect(text, "swiglu_beta", (1.0, 1), "SwiGLU-OAI is implemented with beta 1")
    scaling = text.get("rope_scaling")
    rope = text.get("rope_parameters") or {}
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type")) if scaling else None
    kind = kind or rope.get("rope_type")
    if kind not in (None, "default"):
        raise ConfigError(f"rope scaling {kind!r} is not supported: M3 uses plain RoPE")


def _text_fields(text: Dict[str, Any]) -> Dict[str, Any]:
    known = {f.name for f in fields(ModelArgs)}
    out = {k: v for k, v in text.items() if k in known}
    n = text.get("num_hidden_layers", ModelArgs.num_hidden_layers)

    rope = text.get("rope_parameters") or {}
    if "rope_theta" in rope:
        out["rope_theta"] = rope["rope_theta"]
    head_dim = text.get("head_dim", ModelArgs.head_dim)
    if text.get("rotary_dim") is None:
        factor = rope.get("partial_rotary_factor", text.get("partial_rotary_factor", 0.5))
        out["rotary_dim"] = int(head_dim * factor)

    sac = text.get("sparse_attention_config") or {}
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

    if text.get("layer_types") is not None:
        out["sparse_layers"] = [t != "full_attention" for t in text["layer_types"]]
    elif sac.get("sparse_attention_freq") is not None:
        use = sac.get("use_sparse_attention", True)
        out["sparse_layers"] = [bool(f) and use for f in sac["sparse_attention_freq"]]
    elif sac and not sac.get("use_sparse_attention", True):
        out["sparse_layers"] = [False] * n

    if text.get("mlp_layer_types") is not None:
        out["moe_layers"] = [t == "sparse" for t in text["mlp_layer_types"]]
    elif text.get("moe_layer_freq") is not None:
        freq = text["moe_layer_freq"]
        out["moe_layers"] = [bool(f) for f in freq] if isinstance(freq, list) else [True] * n

    if text.get("num_nextn_predict_layers") is not None and "num_mtp_modules" not in text:
        out["num_mtp_modules"] = text["num_nextn_predict_layers"]
    return out
