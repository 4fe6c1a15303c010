"""The `m3mlx` command."""

import sys
from pathlib import Path

import click


@click.group()
@click.version_option(package_name="m3mlx")
def cli():
    """MiniMax-M3 on Apple silicon with MLX."""


def _dtype(name):
    import mlx.core as mx

    return None if name == "auto" else getattr(mx, name)


@cli.command()
@click.option("--model", "model_path", required=True, help="Model directory or Hub repo id.")
@click.option("--prompt", "-p", required=True, help="Prompt text, or - to read it from stdin.")
@click.option("--max-tokens", "-m", default=256, show_default=True, type=click.IntRange(0))
@click.option("--temp", default=0.0, show_default=True, type=click.FloatRange(0),
              help="Sampling temperature; 0 is greedy.")
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0, 1, min_open=True))
@click.option("--top-k", default=0, show_default=True, type=click.IntRange(0), help="0 is off.")
@click.option("--min-p", default=0.0, show_default=True, type=click.FloatRange(0, 1, max_open=True))
@click.option("--repetition-penalty", default=1.0, show_default=True,
              type=click.FloatRange(0, min_open=True), help="1.0 is off.")
@click.option("--seed", type=int, default=None, help="Seed for reproducible sampling.")
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@click.option("--prefill-step-size", default=2048, show_default=True, type=click.IntRange(1),
              help="Prompt tokens per prefill chunk.")
@click.option("--index-bits", type=click.Choice(["16", "8"]), default="16", show_default=True,
              help="Storage of MSA index keys; 8 halves the long-context index scan.")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
              default="auto", show_default=True, help="Activation dtype (float32 on CPU).")
def generate(model_path, prompt, max_tokens, temp, top_p, top_k, min_p, repetition_penalty,
             seed, stop, prefill_step_size, index_bits, dtype):
    """Continue a plain-text PROMPT, streaming to the terminal, then print statistics."""
    from m3mlx import load, make_cache
    from m3mlx.generate import format_stats, stream_generate

    if prompt == "-":
        prompt = sys.stdin.read()
    if not prompt:
        raise click.UsageError("the prompt is empty")
    model, tokenizer = load_or_fail(model_path, dtype)
    cache = make_cache(model, index_bits=8 if index_bits == "8" else None)
    last = None
    for last in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens,
                                temperature=temp, top_p=top_p, top_k=top_k, min_p=min_p,
                                repetition_penalty=repetition_penalty, seed=seed,
                                stop_strings=stop, prompt_cache=cache,
                                prefill_step_size=prefill_step_size):
        click.echo(last.text, nl=False)
    click.echo()
    if last is not None:
        click.echo(format_stats(last), err=True)


def load_or_fail(model_path, dtype):
    """(model, tokenizer), or a clean CLI error that says what is wrong."""
    from m3mlx import ConfigError, LoadError, load

    try:
        return load(model_path, dtype=_dtype(dtype))
    except (LoadError, ConfigError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from e


@cli.command()
@click.argument("path")
def info(path):
    """Describe the model at PATH: layer map, parameters, bytes, quantization."""
    from m3mlx import ConfigError, LoadError
    from m3mlx.info import describe, format_info
    from m3mlx.loading import resolve

    try:
        click.echo(format_info(describe(resolve(path))))
    except (LoadError, ConfigError) as e:
        raise click.ClickException(str(e)) from e


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

    cli.add_command(chat)
    cli.add_command(convert)


_register_subcommands()

if __name__ == "__main__":
    cli()
