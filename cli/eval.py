"""`m3mlx eval`: a thin click wrapper over `m3mlx.eval.evaluate`."""

import json
import sys
import time
from pathlib import Path

import click

from m3mlx.defaults import INDEX_BITS, PREFILL_STEP
from m3mlx.eval import DEFAULT_CONTEXT, DEFAULT_TOP_K

from .options import load_or_fail


class ProgressLine:
    """Windows done (of how many), tokens/s and time left, redrawn in place on a terminal and
    printed every few seconds otherwise."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.start = self.last = time.monotonic()

    def __call__(self, done, total, tokens):
        now = time.monotonic()
        final = total is not None and done == total
        if not final and now - self.last < (0.2 if self.tty else 5.0):
            return
        self.last = now
        rate = tokens / max(now - self.start, 1e-9)
        if total:
            left = (total - done) * (now - self.start) / done
            width = 30
            bar = "#" * (width * done // total) + "-" * (width - width * done // total)
            text = (f"eval [{bar}] {done}/{total} windows  {rate:,.0f} tok/s  "
                    f"{int(left // 60)}m{int(left % 60):02d}s left")
        else:
            text = f"eval {done} windows  {tokens:,} tokens  {rate:,.0f} tok/s"
        self.stream.write(("\r" + text + ("\n" if final else "")) if self.tty else text + "\n")
        self.stream.flush()


@click.command("eval", context_settings={"help_option_names": ["-h", "--help"],
                                         "max_content_width": 100})
@click.option("--model", "model_path", required=True, help="Model directory or Hub repo id.")
@click.option("--reference", default=None, metavar="PATH",
              help="Reference to compare with: a model (directory or Hub repo id), or a file of "
                   "its logits saved by `--save-logits`. Adds KL divergence, top-1 agreement "
                   "and the change in the right token's probability.")
@click.option("--data", default=None, metavar="FILE|-",
              help="Text to evaluate on, or - for stdin [default: the held-out Python text that "
                   "ships with m3mlx].")
@click.option("--context", type=click.IntRange(2), default=None,
              help=f"Tokens per window [default: {DEFAULT_CONTEXT}, or the saved reference's].")
@click.option("--samples", type=click.IntRange(1), default=None,
              help="Windows to evaluate at most [default: all the data holds].")
@click.option("--save-logits", type=click.Path(dir_okay=False), default=None,
              help="Save this model's logits (top-k per token) to FILE, for later runs to use "
                   "as --reference, so a large reference runs once.")
@click.option("--top-k", type=click.IntRange(1), default=DEFAULT_TOP_K, show_default=True,
              help="Log-probabilities kept per token by --save-logits (KLD from the file is exact "
                   "when this covers the vocabulary, a close lower bound otherwise).")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
              default="auto", show_default=True, help="Activation dtype (float32 on CPU).")
@click.option("--prefill-step-size", default=PREFILL_STEP, show_default=True,
              type=click.IntRange(1), help="Tokens per prefill chunk within a window.")
@click.option("--index-bits", type=click.Choice(["8", "16"]), default=str(INDEX_BITS),
              show_default=True, callback=lambda ctx, param, v: int(v),
              help="Storage of MSA index keys, as in generate: int8 with a scale per key, or "
                   "the activation dtype.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def eval_command(model_path, reference, data, context, samples, save_logits, top_k, dtype,
                 prefill_step_size, index_bits, as_json, quiet):
    """Perplexity of a model over a text, and its KL divergence from a reference.

    The text is cut into windows of --context tokens; every position predicts the next token
    from the ones before it in its window. With --reference the report adds llama.cpp's
    statistics: mean, median, 99th and 99.9th percentile and maximum KL divergence, how often
    the model's most likely token is the reference's, and the RMS change in the probability of
    the right token.

    \b
    Examples:
      m3mlx eval --model m3-4bit --reference MiniMax-M3 --context 4096 --samples 32
      m3mlx eval --model MiniMax-M3 --save-logits m3-bf16.ref --samples 64
      m3mlx eval --model m3-3bit --reference m3-bf16.ref
    """
    from m3mlx.eval import EvalError, ReferenceReader, evaluate, format_report

    model, tokenizer = load_or_fail(model_path, dtype)
    ref = None
    if reference is not None:
        if Path(reference).is_file():
            ref = reference
        else:
            ref, _ = load_or_fail(reference, dtype)
    try:
        if isinstance(ref, str):
            ReferenceReader(ref).close()  # a bad file fails before any work
        result = evaluate(model, tokenizer, data, context=context, samples=samples,
                          reference=ref, save_logits=save_logits, top_k=top_k,
                          prefill_step=prefill_step_size, index_bits=index_bits,
                          progress=None if quiet else ProgressLine())
    except EvalError as e:
        raise click.ClickException(str(e)) from None
    if as_json:
        click.echo(json.dumps(result.summary()))
        return
    click.echo(format_report(result, Path(model_path).name or "model",
                             Path(reference).name if reference else "reference"))
    if save_logits:
        click.echo(f"saved the logits of {result.windows} windows (top-{top_k}) to {save_logits}")
