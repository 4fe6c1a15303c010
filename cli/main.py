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
             seed, stop, prefill_step_size, index_bits, kv_bits, kv_memory, kv_cache_dir, dtype):
    """Continue a plain-text PROMPT, streaming to the terminal, then print statistics.

    A prompt that takes more than a few seconds to prefill shows its progress on stderr.
    """
    from m3mlx import make_cache
    from m3mlx.generate import format_stats, stream_generate

    if prompt == "-":
        prompt = read_stdin("the prompt on stdin")
    if not prompt:
        raise click.UsageError("the prompt is empty")
    model, tokenizer = load_or_fail(model_path, dtype)
    cache = make_cache(model, index_bits=index_bits, kv_bits=kv_bits, kv_memory=kv_memory,
                       kv_cache_dir=kv_cache_dir)
    meter = PrefillMeter()
    last = None
    try:
        for last in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens,
                                    temperature=temp, top_p=top_p, top_k=top_k, min_p=min_p,
                                    repetition_penalty=repetition_penalty, seed=seed,
                                    stop_strings=stop, prompt_cache=cache,
                                    prefill_step_size=prefill_step_size,
                                    prefill_progress=meter):
            click.echo(last.text, nl=False)
    finally:
        meter.close()
    click.echo()
    if last is not None:
        click.echo(format_stats(last), err=True)


@cli.command()
@click.argument("path")
def info(path):
    """Describe the model at PATH: layer map, parameters, bytes, quantization."""
    from m3mlx.info import describe, format_info
    from m3mlx.loading import resolve

    click.echo(format_info(describe(resolve(path))))


@cli.command()
@click.option("--dir", "directory", type=click.Path(file_okay=False), default=None,
              help="Where to write the demo models [default: $M3MLX_HOME/demo or "
                   "~/.cache/m3mlx/demo].")
@click.option("--max-tokens", "-m", default=32, show_default=True, type=click.IntRange(1))
def demo(directory, max_tokens):
    """Run the whole pipeline on a tiny random M3-shaped model.

    Writes a checkpoint in the original Hugging Face layout, converts it to MLX 4-bit with the
    default recipe, and generates from a prompt long enough to make MSA sparse.
    """
    import mlx.core as mx

    from m3mlx import load
    from m3mlx.convert import convert
    from m3mlx.demo import default_demo_dir, write_demo_checkpoint
    from m3mlx.generate import format_stats, stream_generate
    from m3mlx.info import describe, format_info

    root = Path(directory) if directory else default_demo_dir()
    # Widths that are multiples of 64, so that every matrix takes the 4-bit recipe.
    source = write_demo_checkpoint(root / "hf", intermediate_size=64, shared_intermediate_size=64,
                                   dense_intermediate_size=128)
    click.echo(f"1. wrote a random M3-shaped checkpoint (Hugging Face layout) to {source}")
    converted = root / "mlx-4bit"
    click.echo(f"2. m3mlx convert {source} {converted} --force")
    convert(source, converted, force=True, progress=False, log=lambda line: click.echo(f"   {line}"))
    click.echo(f"3. m3mlx info {converted}")
    click.echo(format_info(describe(converted)))
    click.echo("\n4. generating (the weights are random: expect gibberish, with real MSA):\n")
    model, tokenizer = load(converted, dtype=mx.float32)
    prompt = "The quick brown fox jumps over the lazy dog. " * 12  # past MSA's dense range
    last = None
    for last in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens, temperature=0.8,
                                seed=0):
        click.echo(last.text, nl=False)
    click.echo()
    click.echo(format_stats(last))
    click.echo(f"\nNext: m3mlx generate --model {converted} --prompt \"Hello\"\n"
               f"      m3mlx chat --model {converted}")


def _register_subcommands():
    from .chat import chat
    from .convert import convert
    from .plan import calibrate_experts, plan

    cli.add_command(chat)
    cli.add_command(convert)
    cli.add_command(plan)
    cli.add_command(calibrate_experts)


_register_subcommands()

if __name__ == "__main__":
    cli()
