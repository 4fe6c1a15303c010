"""m3mlx's HTTP server: OpenAI and Anthropic APIs over one model (`m3mlx serve`).

`schemas` (request bodies) -> `requests` (request to conversation) -> chat template -> `engine`
(queue, generation, caches) -> `events` (reply to API responses and stream events), with the
routes in `app` and the cross-request cache in `prefix_cache`; `page` serves the web chat at `/`
(`static/`), a client of the same API.
"""

from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from ..chat_format import render_chat
from ..distributed import Ranks
from ..model import make_cache
from ..sharding import activation_dtype
from .app import Service, create_app
from .engine import Engine
from .prefix_cache import PrefixCache, fingerprint


def build_service(model, tokenizer, *, model_dir: Path, names: List[str],
                  sampling: Dict[str, Any], max_tokens: int, thinking: str = "adaptive",
                  api_key: Optional[str] = None, max_body: int = 32 << 20,
                  cache_size: int = 16 << 30, cache_dir: Optional[Path] = None,
                  cache_disk_size: Optional[int] = None, index_bits: Optional[int] = None,
                  kv_bits: Optional[int] = None, prefill_step_size: int = 2048,
                  log: Callable[[str], None] = print, ranks: Optional[Ranks] = None,
                  shard: str = "") -> Service:
    """The engine, prefix cache and settings `create_app` serves. The chat template is tried
    once here, so a broken one stops the server before it listens. Under mlx.launch every rank
    builds one (`shard` names its part, which its persisted cache belongs to); the engines of
    ranks other than 0 then `follow` rank 0's."""
    template = tokenizer.chat_template
    name = getattr(tokenizer, "chat_template_file", None)
    probe = [{"role": "user", "content": "Hello"}]
    render_chat(probe, template=template, template_name=name, thinking=thinking)
    render_chat(probe, template=template, template_name=name, thinking=thinking,
                tools=[{"name": "probe", "parameters": {"type": "object", "properties": {}}}])
    prefix = None
    if cache_size > 0:
        meta = [c.meta() for c in make_cache(model, index_bits=index_bits, kv_bits=kv_bits)]
        directory = None
        if cache_dir is not None:
            # K/V come in the activation dtype.
            activations = activation_dtype(model)
            layout = [model.args, meta, activations] + ([shard] if shard else [])
            directory = Path(cache_dir) / fingerprint(model_dir, layout)
        prefix = PrefixCache(meta, cache_size, directory, cache_disk_size, log=log)
    engine = Engine(model, tokenizer, prefix_cache=prefix, index_bits=index_bits, kv_bits=kv_bits,
                    prefill_step_size=prefill_step_size, log=log, ranks=ranks)
    if engine.ranks.leads:
        engine.ready.wait()
    return Service(engine=engine, tokenizer=tokenizer, model_names=names, sampling=sampling,
                   max_tokens=max_tokens, thinking=thinking, api_key=api_key, max_body=max_body,
                   log=log)


__all__ = ["Engine", "PrefixCache", "Service", "build_service", "create_app"]
