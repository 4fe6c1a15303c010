"""m3mlx: MiniMax-M3 on Apple silicon with MLX, with truly sparse MSA attention."""

from .cache import LayerCache, load_prompt_cache, save_prompt_cache, trim_prompt_cache
from .chat import ChatReply, ChatSession, ChatStream
from .chat_format import M3_CHAT_TEMPLATE, render_chat
from .checkpoint import Checkpoint, NonFiniteWeightWarning
from .checks import InputError
from .config import ConfigError, ModelArgs
from .distributed import DistributedError
from .errors import CheckpointError
from .generate import GenerationResponse, generate, make_sampler, stream_generate
from .loading import LoadError, load, load_model
from .model import Model, make_cache
from .rank_loading import load_rank
from .reply_parser import MalformedOutputWarning, ReplyParser, ToolCall, parse_reply
from .sharding import ShardingError
from .tokenizer import Tokenizer

__version__ = "0.1.0"

__all__ = [
    "ChatReply", "ChatSession", "ChatStream", "M3_CHAT_TEMPLATE", "MalformedOutputWarning",
    "ReplyParser", "ToolCall", "parse_reply", "render_chat",
    "Checkpoint", "CheckpointError", "ConfigError", "DistributedError", "GenerationResponse",
    "InputError", "ShardingError",
    "LayerCache", "LoadError", "Model", "ModelArgs", "NonFiniteWeightWarning", "Tokenizer",
    "generate", "load", "load_rank",
    "load_model", "load_prompt_cache", "make_cache", "make_sampler", "save_prompt_cache",
    "stream_generate", "trim_prompt_cache",
]
