"""`m3mlx serve`: the model behind OpenAI and Anthropic HTTP APIs (`m3mlx.server`)."""

import signal
import socket
import sys
from pathlib import Path

import click

from m3mlx.defaults import CHAT_MAX_TOKENS, RECOMMENDED_SAMPLING, home_dir

from .errors import Command
from .options import Size, generation_options, load_or_fail


@click.command(cls=Command)
@generation_options(max_tokens=CHAT_MAX_TOKENS, sampling=RECOMMENDED_SAMPLING,
                    temp_help="Default sampling temperature (M3's recommended 1.0); 0 is greedy.",
                    tier=False)
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; 0.0.0.0 opens the server to the network.")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535),
              help="Port (0: any free port, printed at start).")
@click.option("--api-key", default=None, envvar="M3MLX_API_KEY",
              help="Require 'Authorization: Bearer KEY' or 'x-api-key: KEY' [env M3MLX_API_KEY].")
@click.option("--served-model-name", "names", multiple=True,
              help="Model name clients ask for (repeatable; globs like 'claude-*' accepted) "
                   "[default: the model directory's name].")
@click.option("--thinking", type=click.Choice(["enabled", "disabled", "adaptive"]),
              default="adaptive", show_default=True,
              help="Thinking mode when a request does not choose one.")
@click.option("--cache-size", type=Size(), default="16GB", show_default=True,
              help="Memory for the prefix cache (least recently used prefixes go first); "
                   "0 turns caching off: every prompt is computed in full.")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="Where the prefix cache persists across restarts [default: "
                   "$M3MLX_HOME/prompt-cache or ~/.cache/m3mlx/prompt-cache].")
@click.option("--cache-disk-size", default="64GB", show_default=True, type=Size(),
              help="Disk space the persisted prefix cache may take.")
@click.option("--no-disk-cache", is_flag=True, help="Keep the prefix cache in memory only.")
@click.option("--max-body-size", default="32MB", show_default=True, type=Size(),
              help="Largest request body accepted (larger ones get 413).")
def serve(model_path, max_tokens, temp, top_p, top_k, min_p, repetition_penalty, seed,
          prefill_step_size, index_bits, kv_bits, dtype, host, port, api_key, names, thinking,
          cache_size, cache_dir, cache_disk_size, no_disk_cache, max_body_size, parallel,
          rank_timeout):
    """Serve a model over HTTP: OpenAI (/v1/chat/completions, /v1/completions,
    /v1/responses, /v1/models) and Anthropic (/v1/messages, /v1/messages/count_tokens) APIs,
    and a web chat page at / built on them.

    Requests are served one at a time, in order; a prefix cache reuses the longest cached
    start of each prompt across requests, clients and restarts. The generation options are
    the defaults for requests that do not set them; --max-tokens is capped by the context.

    Started by mlx.launch on several ranks, the model is split between them (--parallel):
    rank 0 listens and answers the clients, the others compute their part of each request in
    step with it and end when it stops.
    """
    import uvicorn

    from m3mlx.distributed import Ranks
    from m3mlx.loading import resolve
    from m3mlx.server import build_service, create_app

    ranks = Ranks.start(rank_timeout)

    def log(line: str):
        if ranks.leads:  # rank 0 speaks for the server
            click.echo(line, err=True)

    if api_key is not None and not api_key.strip():
        raise click.BadParameter("the API key is empty", param_hint="'--api-key'")
    model_dir = resolve(model_path)
    model, tokenizer = load_or_fail(model_path, dtype, parallel)
    sampling = {"temperature": temp, "top_p": top_p, "top_k": top_k, "min_p": min_p,
                "repetition_penalty": repetition_penalty, "seed": seed}
    cache_root = None if no_disk_cache else Path(cache_dir or home_dir() / "prompt-cache")
    service = build_service(
        model, tokenizer, model_dir=model_dir, names=list(names) or [model_dir.name],
        sampling=sampling, max_tokens=max_tokens, thinking=thinking, api_key=api_key,
        max_body=max_body_size, cache_size=cache_size, cache_dir=cache_root,
        cache_disk_size=cache_disk_size, index_bits=index_bits, kv_bits=kv_bits,
        prefill_step_size=prefill_step_size, log=log, ranks=ranks,
        shard=f"{parallel} parallel, rank {ranks.group.rank()} of {ranks.group.size()}"
        if ranks.sharded else "")
    if not ranks.leads:  # rank 0 owns the port; this rank computes its part of each request
        service.engine.follow()
        return
    try:
        sock = listen(host, port)
        bound = sock.getsockname()[1]
        shown = f"[{host}]" if ":" in host else host
        click.echo(f"m3mlx serve: {service.model_names[0]} at http://{shown}:{bound}/v1 "
                   f"(OpenAI and Anthropic APIs{'; API key required' if api_key else ''}); "
                   f"web chat at http://{shown}:{bound}/")
        sys.stdout.flush()
        config = uvicorn.Config(create_app(service), log_level="warning", access_log=False,
                                timeout_graceful_shutdown=1)
        # uvicorn raises the signal that stopped it again once it has shut down. SIGTERM's
        # default action would then end the process before the engine is closed (and, on
        # several ranks, before the others are told to stop): make it a normal exit instead.
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        service.engine.close()  # with several ranks, the others' engines stop too


def listen(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        raise click.ClickException(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(128)
    return sock
