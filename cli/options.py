"""What the `generate` and `chat` commands share: model loading and generation options."""

import click

from m3mlx.defaults import PREFILL_STEP


def generation_options(*, max_tokens: int, sampling: dict,
                       temp_help: str = "Sampling temperature; 0 is greedy."):
    """--model plus sampling and runtime options, with per-command defaults (`sampling`:
    temperature, top_p, top_k, from m3mlx.defaults)."""
    temp, top_p, top_k = sampling["temperature"], sampling["top_p"], sampling["top_k"]
    options = [
        click.option("--model", "model_path", required=True,
                     help="Model directory or Hub repo id."),
        click.option("--max-tokens", "-m", default=max_tokens, show_default=True,
                     type=click.IntRange(0), help="Most tokens to generate."),
        click.option("--temp", default=temp, show_default=True, type=click.FloatRange(0),
                     help=temp_help),
        click.option("--top-p", default=top_p, show_default=True,
                     type=click.FloatRange(0, 1, min_open=True)),
        click.option("--top-k", default=top_k, show_default=True, type=click.IntRange(0),
                     help="0 is off."),
        click.option("--min-p", default=0.0, show_default=True,
                     type=click.FloatRange(0, 1, max_open=True)),
        click.option("--repetition-penalty", default=1.0, show_default=True,
                     type=click.FloatRange(0, min_open=True), help="1.0 is off."),
        click.option("--seed", type=int, default=None, help="Seed for reproducible sampling."),
        click.option("--prefill-step-size", default=PREFILL_STEP, show_default=True,
                     type=click.IntRange(1), help="Prompt tokens per prefill chunk."),
        click.option("--index-bits", type=click.Choice(["16", "8"]), default="16",
                     show_default=True, callback=lambda ctx, param, v: 8 if v == "8" else None,
                     help="Storage of MSA index keys; 8 halves the long-context index scan."),
        click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
                     default="auto", show_default=True,
                     help="Activation dtype (float32 on CPU)."),
    ]

    def apply(command):
        for option in reversed(options):
            command = option(command)
        return command

    return apply


def load_or_fail(model_path, dtype):
    """(model, tokenizer), or a clean CLI error that says what is wrong."""
    import mlx.core as mx

    from m3mlx import CheckpointError, load

    try:
        return load(model_path, dtype=None if dtype == "auto" else getattr(mx, dtype))
    except CheckpointError as e:
        raise click.ClickException(str(e)) from e
