"""The `m3mlx` command. Every subcommand runs inside the error boundary of cli/errors.py."""

import warnings
from pathlib import Path

import click

from m3mlx.defaults import GENERATE_MAX_TOKENS, GREEDY_SAMPLING

from .errors import DEBUG_ENV, Group
from .options import PrefillMeter, generation_options, load_or_fail, read_stdin, stop_option


@click.group(cls=Group, epilog=f"Errors are one line; set {DEBUG_ENV}=1 to see tracebacks.")
@click.version_option(package_name="m3mlx")
def cli():
    """MiniMax-M3 on Apple silicon with MLX."""
    # Warnings (NaN weights, malformed model output) are messages to the user: one line each.
    warnings.formatwarning = lambda message, category, *_, **__: f"warning: {message}\n"


@cli.command()
@generation_options(max_tokens=GENERATE_MAX_TOKENS, sampling=GREEDY_SAMPLING)
@click.option("--prompt", "-p", required=True, help="Prompt text, or - to read it from stdin.")
@stop_option
def generate(model_path, prompt, max_tokens, temp, top_p, top_k, min_p, repetition_penalty,
             seed, stop, prefill_step_size, index_bits, kv_bits, kv_memory, kv_cache_dir, dtype,
             parallel, rank_timeout):
    """Continue a plain-text PROMPT, streaming to the terminal, then print statistics.

    A prompt that takes more than a few seconds to prefill shows its progress on stderr.
    Started by mlx.launch on several ranks, the model is split between them (--parallel);
    rank 0 reads stdin and prints.
    """
    from m3mlx import make_cache
    from m3mlx.distributed import Ranks
    from m3mlx.generate import format_stats, stream_generate

    ranks = Ranks.start(rank_timeout)
    if prompt == "-" and ranks.sharded:
        raise click.UsageError("with several ranks, pass the prompt as --prompt TEXT: "
                               "mlx.launch never passes the end of its stdin on, so reading "
                               "a prompt from it would never end")
    if prompt == "-":
        prompt = read_stdin("the prompt on stdin")
    if not prompt:
        raise click.UsageError("the prompt is empty")
    model, tokenizer = load_or_fail(model_path, dtype, parallel)
    cache = make_cache(model, index_bits=index_bits, kv_bits=kv_bits, kv_memory=kv_memory,
                       kv_cache_dir=kv_cache_dir)
    meter = PrefillMeter()
    last = None
    try:
        with ranks.watching("generating"):
            stream = stream_generate(model, tokenizer, prompt, max_tokens=max_tokens,
                                     temperature=temp, top_p=top_p, top_k=top_k, min_p=min_p,
                                     repetition_penalty=repetition_penalty,
                                     seed=ranks.seed(seed), stop_strings=stop,
                                     prompt_cache=cache, prefill_step_size=prefill_step_size,
                                     prefill_progress=ranks.progress(meter))
            for last in ranks.stepping(stream):
                click.echo(last.text, nl=False)
    finally:
        meter.close()
    click.echo()
    if last is not None and ranks.leads:
        click.echo(format_stats(last), err=True)


@cli.command()
@click.argument("path")
def info(path):
    """Describe the model at PATH: layer map, parameters, bytes, quantization."""
    from m3mlx.info import describe, format_info
    from m3mlx.loading import resolve

    click.echo(format_info(describe(resolve(path))))


DEMO_PROMPT = '''import os
import sys


class Config:
    """Settings read from the environment, with defaults."""

    def __init__(self, prefix="APP_"):
        self.prefix = prefix
        self.values = {}

    def get(self, name, default=None):
        key = self.prefix + name.upper()
        if key in os.environ:
            return os.environ[key]
        return self.values.get(name, default)

    def set(self, name, value):
        self.values[name] = value


def main(argv=None):
    """Print every setting given on the command line."""
    argv = sys.argv[1:] if argv is None else argv
    config = Config()
    for arg in argv:
'''


@cli.command()
@click.option("--dir", "directory", type=click.Path(file_okay=False), default=None,
              help="Where to write the demo models [default: $M3MLX_HOME/demo or "
                   "~/.cache/m3mlx/demo].")
@click.option("--max-tokens", "-m", default=64, show_default=True, type=click.IntRange(1))
def demo(directory, max_tokens):
    """Run the whole pipeline on the tiny M3 that ships with m3mlx.

    It is M3's architecture at 6M parameters (a dense layer, then MSA + 32-expert MoE layers),
    trained for an hour on the Python standard library. The demo copies it in the original
    Hugging Face layout, converts it to MLX 4-bit with the default recipe, and continues a
    Python prompt long enough to make MSA sparse (greedy, repetition penalty 1.3).
    """
    import mlx.core as mx

    from m3mlx import load
    from m3mlx.convert import convert
    from m3mlx.demo import copy_tiny_m3, default_demo_dir
    from m3mlx.generate import format_stats, stream_generate
    from m3mlx.info import describe, format_info

    root = Path(directory) if directory else default_demo_dir()
    source = copy_tiny_m3(root / "hf")
    click.echo(f"1. copied the tiny trained M3 (Hugging Face layout) to {source}")
    converted = root / "mlx-4bit"
    click.echo(f"2. m3mlx convert {source} {converted} --force")
    convert(source, converted, force=True, progress=False, log=lambda line: click.echo(f"   {line}"))
    click.echo(f"3. m3mlx info {converted}")
    click.echo(format_info(describe(converted)))
    click.echo("\n4. continuing a Python prompt (a 6M-parameter model: expect Python-shaped "
               "code, not sense):\n")
    model, tokenizer = load(converted, dtype=mx.float32)
    click.echo(DEMO_PROMPT, nl=False)
    last = None
    # Greedy, with a repetition penalty: a model this small otherwise settles into a loop.
    for last in stream_generate(model, tokenizer, DEMO_PROMPT, max_tokens=max_tokens,
                                repetition_penalty=1.3):
        click.secho(last.text, nl=False, bold=True)
    click.echo()
    click.echo(format_stats(last))
    click.echo(f"\nNext: m3mlx generate --model {converted} --prompt \"def parse(\"\n"
               f"      m3mlx eval --model {converted} --reference {source}\n"
               f"      m3mlx chat --model {converted}")


def _register_subcommands():
    from .chat import chat
    from .convert import convert
    from .eval import eval_command
    from .plan import calibrate_experts, plan
    from .serve import serve

    cli.add_command(chat)
    cli.add_command(convert)
    cli.add_command(eval_command)
    cli.add_command(serve)
    cli.add_command(plan)
    cli.add_command(calibrate_experts)


_register_subcommands()

if __name__ == "__main__":
    cli()
