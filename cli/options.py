"""What the `generate` and `chat` commands share: model loading, generation options (their
ranges are the Python API's, from m3mlx.checks.OPTION_RANGES), stdin text and the prefill
progress line."""

import math
import sys
import time
from typing import Optional

import click

from m3mlx.checks import OPTION_RANGES, InputError, check_stop_strings
from m3mlx.convert.plan import duration
from m3mlx.defaults import INDEX_BITS, PREFILL_STEP
from m3mlx.units import parse_size, parse_size_or_fraction
from m3mlx.distributed import RANK_TIMEOUT
from m3mlx.sharding import PLANS


class _FiniteFloatRange(click.FloatRange):
    """click.FloatRange lets nan through (every comparison with it is false)."""

    def convert(self, value, param, ctx):
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return rv


class Size(click.ParamType):
    """A size like 40GB or 500MB (m3mlx.units); with `fraction`, also a share like 25%."""

    name = "size"

    def __init__(self, fraction: bool = False):
        self.fraction = fraction

    def convert(self, value, param, ctx):
        if not isinstance(value, str):
            return value
        try:
            parse = parse_size_or_fraction if self.fraction else parse_size
            return parse(value, param.opts[0] if param else "the size")
        except InputError as e:
            self.fail(str(e), param, ctx)


def option_type(name: str) -> click.ParamType:
    """The click type of generation option `name`: the range the API checks."""
    r = OPTION_RANGES[name]
    kind = click.IntRange if r.kind is int else _FiniteFloatRange
    return kind(r.low, r.high, min_open=r.low_open, max_open=r.high_open)


def _stop_strings(ctx, param, value):
    try:
        return tuple(check_stop_strings(list(value)))
    except InputError as e:
        raise click.BadParameter(str(e)) from None


def generation_options(*, max_tokens: int, sampling: dict,
                       temp_help: str = "Sampling temperature; 0 is greedy.", tier: bool = True):
    """--model plus sampling and runtime options, with per-command defaults (`sampling`:
    temperature, top_p, top_k, from m3mlx.defaults). `tier=False` leaves out the K/V memory
    tier's options (--kv-memory, --kv-cache-dir), for commands that keep every cache whole."""
    temp, top_p, top_k = sampling["temperature"], sampling["top_p"], sampling["top_k"]
    options = [
        click.option("--model", "model_path", required=True,
                     help="Model directory or Hub repo id."),
        click.option("--max-tokens", "-m", default=max_tokens, show_default=True,
                     type=option_type("max_tokens"), help="Most tokens to generate."),
        click.option("--temp", default=temp, show_default=True, type=option_type("temperature"),
                     help=temp_help),
        click.option("--top-p", default=top_p, show_default=True, type=option_type("top_p")),
        click.option("--top-k", default=top_k, show_default=True, type=option_type("top_k"),
                     help="0 is off."),
        click.option("--min-p", default=0.0, show_default=True, type=option_type("min_p")),
        click.option("--repetition-penalty", default=1.0, show_default=True,
                     type=option_type("repetition_penalty"), help="1.0 is off."),
        click.option("--seed", type=option_type("seed"), default=None,
                     help="Seed for reproducible sampling."),
        click.option("--prefill-step-size", default=PREFILL_STEP, show_default=True,
                     type=option_type("prefill_step_size"),
                     help="Prompt tokens per prefill chunk."),
        click.option("--index-bits", type=click.Choice(["8", "16"]), default=str(INDEX_BITS),
                     show_default=True, callback=lambda ctx, param, v: int(v),
                     help="Storage of MSA index keys: int8 with a scale per key (half the "
                          "long-context index scan of 16), or the activation dtype."),
        click.option("--kv-bits", type=click.Choice(["16", "8", "4"]), default="16",
                     show_default=True, callback=lambda ctx, param, v: int(v),
                     help="Storage of the K/V cache: the activation dtype (16), or 8 or 4 bits "
                          "per value with a scale per group of head_dim (about 0.53x, 0.31x)."),
        click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
                     default="auto", show_default=True,
                     help="Activation dtype (float32 on CPU)."),
        click.option("--parallel", type=click.Choice(PLANS), default=PLANS[0],
                     show_default=True,
                     help="How the ranks of a run started with mlx.launch share the model: "
                          "tensor (attention by KV head, experts by rank, MLP columns, the "
                          "vocabulary; two all-reduces per layer) or pipeline (contiguous "
                          "layers per rank). Ignored in a single process."),
        click.option("--rank-timeout", type=click.FloatRange(1.0), default=RANK_TIMEOUT,
                     show_default=True,
                     help="Seconds a run started with mlx.launch waits for the other ranks "
                          "before it ends with an error naming the rank."),
    ]
    if tier:
        options[-1:-1] = [
            click.option("--kv-memory", type=Size(), default=None, metavar="SIZE",
                         help="Keep at most SIZE (e.g. 8GB) of the sparse-attention layers' K/V "
                              "in memory; the other blocks go to a file in --kv-cache-dir and "
                              "are read back when selected. Started by mlx.launch, each rank's "
                              "limit for its own K/V [default: all in memory]."),
            click.option("--kv-cache-dir", type=click.Path(file_okay=False), default=None,
                         help="Where --kv-memory puts the K/V blocks not in memory, one file "
                              "per session, removed at exit; rank R of several in its "
                              "subdirectory rank-R [default: $M3MLX_HOME/kv or "
                              "~/.cache/m3mlx/kv]."),
        ]
    options += memory_options()

    def apply(command):
        for option in reversed(options):
            command = option(command)
        return command

    return apply


MEMORY = "m3mlx.memory"  # where the memory options wait for load_or_fail, in the click context


def _remember(ctx, param, value):
    if value is not None:
        ctx.meta.setdefault(MEMORY, {})[param.name] = value
    return value


def memory_options() -> list:
    """How the model is held in memory: --expert-cache, --memory-limit, --expert-policy,
    --no-prefetch. They are not parameters of the command: `load_or_fail` reads them from the
    click context, so every command that loads a model through it takes them."""
    from m3mlx.experts import DEFAULT_POLICY, POLICIES

    keep = dict(expose_value=False, callback=_remember)
    return [
        click.option("--expert-cache", type=Size(fraction=True), default=None, **keep,
                     help="Stream the routed experts from the SSD through a cache of this "
                          "size: bytes (40GB) or a share of the experts (25%)."),
        click.option("--memory-limit", type=Size(), default=None, **keep,
                     help="Memory m3mlx may use (64GB): everything loads if it fits, else the "
                          "experts stream through the cache that fits (see `m3mlx plan`)."),
        click.option("--expert-policy", type=click.Choice(POLICIES), default=DEFAULT_POLICY,
                     show_default=True, **keep,
                     help="Which cached expert gives way: lru, lfu (frequency), pinned (the "
                          "most used in `m3mlx calibrate-experts` stay)."),
        click.option("--no-prefetch", "expert_prefetch", flag_value=False, default=None, **keep,
                     help="Do not read the next layer's likely experts ahead."),
    ]


def memory_settings() -> dict:
    """The memory options given to the running command (empty outside one)."""
    ctx = click.get_current_context(silent=True)
    return dict(ctx.meta.get(MEMORY, {})) if ctx is not None else {}


def stop_option(command):
    return click.option("--stop", multiple=True, callback=_stop_strings,
                        help="Stop string (repeatable, not empty).")(command)


def load_or_fail(model_path: str, dtype: str, parallel: str = PLANS[0]):
    """(model, tokenizer), held as the memory options say, this rank's part of it when started
    by mlx.launch; a failure is reported by the error boundary as one line."""
    import mlx.core as mx

    from m3mlx.distributed import load_for_rank, rank_prefix

    cast = None if dtype == "auto" else getattr(mx, dtype)
    settings = memory_settings()
    if not {"expert_cache", "memory_limit"} & settings.keys():
        return load_for_rank(model_path, parallel, cast)
    if "memory_limit" in settings:  # the plan prices the K/V cache as the command keeps it
        kv_bits = click.get_current_context().params.get("kv_bits")
        settings["kv_bits"] = None if kv_bits in (None, 16) else kv_bits
    # Under mlx.launch each rank streams its own experts through its own cache (sizes per rank).
    model, tokenizer = load_for_rank(model_path, parallel, cast, **settings)
    tier = getattr(model, "expert_tier", None)
    if tier is not None:
        click.echo(rank_prefix() + tier.describe(), err=True)
    return model, tokenizer


def decode_input(data: bytes, what: str) -> str:
    """Bytes read from stdin as text, or a one-line error naming the first bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{what} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset "
                         f"{e.start}); convert it to UTF-8 first, e.g. with iconv") from None


def read_stdin(what: str = "stdin") -> str:
    return decode_input(sys.stdin.buffer.read(), what)


class PrefillMeter:
    """`progress(done, total)` for a prefill: silent for the first seconds, then a line on
    stderr (redrawn in place on a terminal) with tokens done, speed and time left, cleared
    when the prefill ends."""

    DELAY = 2.0  # seconds before anything is shown: short prompts print nothing

    def __init__(self, stream=None, delay: Optional[float] = None):
        self.stream = stream or sys.stderr
        self.delay = self.DELAY if delay is None else delay
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.start = time.monotonic()
        self.shown = False
        self.last = 0.0

    def __call__(self, done: int, total: int):
        now = time.monotonic()
        elapsed = now - self.start
        if done >= total:
            self.close()
            return
        if elapsed < self.delay or now - self.last < (0.2 if self.tty else 10.0):
            return
        self.last = now
        rate = done / elapsed
        left = duration((total - done) / rate) if rate > 0 else "--"
        text = (f"prefill: {done:,}/{total:,} tokens ({100 * done / total:.0f}%), "
                f"{rate:,.0f} tok/s, {left} left; Ctrl-C stops")
        self.stream.write(f"\r\x1b[K{text}" if self.tty else text + "\n")
        self.stream.flush()
        self.shown = True

    def close(self):
        if self.shown and self.tty:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
        self.shown = False
