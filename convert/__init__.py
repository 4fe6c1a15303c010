"""m3mlx convert: MiniMax-M3 checkpoints (BF16, MXFP8, NVFP4) to MLX, streamed tensor by tensor.

    from m3mlx.convert import convert
    convert("MiniMaxAI/MiniMax-M3-MXFP8", "m3-4bit", mode="affine", bits=4)

The output is mlx-lm's `minimax_m3_vl` layout (stacked experts, `quantization` config block),
loadable by `m3mlx.load` and `mlx_lm.load`; MTP tensors, when the source has them, go to
`mtp.safetensors`, which mlx-lm does not read.
"""

from .converter import ConvertResult, convert
from .errors import ConvertError
from .recipes import DEFAULT_RECIPE, RECIPES, ROLES, Spec, parse_spec
from .verify import verify

__all__ = ["ConvertError", "ConvertResult", "DEFAULT_RECIPE", "RECIPES", "ROLES", "Spec",
           "convert", "parse_spec", "verify"]
