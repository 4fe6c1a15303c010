"""Defaults shared by the Python API, the commands and the server: one home for each."""

import os
from pathlib import Path

HOME_ENV = "M3MLX_HOME"

# Prompt tokens per prefill chunk.
PREFILL_STEP = 2048

# MSA index keys are stored as int8 with one scale per key (16: in the activation dtype). Measured
# harmless (README "Compact K/V and index keys"): 99.3% of the selected blocks and the held-out
# NLL of the trained tiny M3 unchanged, and the long-context index scan reads half as much.
INDEX_BITS = 8

# M3's recommended sampling (model card); chat, serve and ChatSession use it.
RECOMMENDED_SAMPLING = {"temperature": 1.0, "top_p": 0.95, "top_k": 40}
# Plain-text generation (`m3mlx generate`, `m3mlx.generate`) is greedy unless told otherwise.
GREEDY_SAMPLING = {"temperature": 0.0, "top_p": 1.0, "top_k": 0}
GENERATE_MAX_TOKENS = 256
CHAT_MAX_TOKENS = 8192


def home_dir() -> Path:
    """Where m3mlx keeps its files (demo models, chat history, caches): $M3MLX_HOME, else
    ~/.cache/m3mlx."""
    root = os.environ.get(HOME_ENV)
    return Path(root).expanduser() if root else Path.home() / ".cache" / "m3mlx"
