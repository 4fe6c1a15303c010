"""`m3mlx plan PATH --memory SIZE`: what a memory budget holds of a model and how fast it decodes,
and `m3mlx calibrate-experts PATH`: per-layer expert usage counts for the pinned policy."""

from dataclasses import dataclass
from pathlib import Path

import click

from m3mlx.defaults import INDEX_BITS, PREFILL_STEP
from m3mlx.sharding import PLANS
from m3mlx.units import format_size

from m3mlx.checks import InputError

from .errors import Command
from .options import Size, memory_options, memory_settings, option_type, read_stdin


@dataclass
class PlannedModel:
    """A conversion's planned tensors, as `m3mlx.plan.largest_rank` reads a checkpoint."""

    tensors: dict
    args: object
    path: str


def footprint_of(path: str, dtype, recipe_options: dict, ranks: int = 1,
                 parallel: str = PLANS[0]):
    """(footprint, checkpoint or None, sharding plan or None): a converted model's footprint,
    or an original checkpoint's under a planned recipe; with `ranks` > 1, the largest rank's
    part under `parallel`."""
    from m3mlx.checkpoint import Checkpoint
    from m3mlx.config import ConfigError
    from m3mlx.errors import reported_as
    from m3mlx.loading import LoadError, resolve
    from m3mlx.plan import footprint, largest_rank
    from m3mlx.sharding import ShardingError

    def per_rank(model):
        with reported_as(ShardingError):
            return largest_rank(model, ranks, parallel)

    local = Path(path).expanduser()
    if local.is_dir():
        with reported_as(LoadError, ConfigError):
            ckpt = Checkpoint.open(resolve(str(local)))
        fp = footprint(ckpt, dtype)
        if fp.streamable:
            if recipe_options:
                raise click.UsageError("--recipe, --mode, --bits, --group-size and --role plan "
                                       "the conversion of an original checkpoint; PATH is "
                                       "converted already")
            if ranks == 1:
                return fp, ckpt, None
            fp, plan = per_rank(ckpt)
            return fp, ckpt, plan
    from m3mlx.convert.converter import conversion_plan
    from m3mlx.convert.plan import footprint as planned
    from m3mlx.convert.recipes import parse_role_overrides

    options = dict(recipe_options)
    options["roles"] = parse_role_overrides(options.pop("roles", ()))
    conversion = conversion_plan(path, **options)
    if ranks == 1:
        return planned(conversion), None, None
    tensors = {t.name: t for unit in conversion.units for t in unit.tensors}
    model = PlannedModel(tensors, conversion.source.args,
                         conversion.source.repo_id or conversion.source.path)
    fp, plan = per_rank(model)
    fp.what = f"{planned(conversion).what} ({plan.describe()})"
    return fp, None, plan


@click.command("plan", cls=Command)
@click.argument("path")
@click.option("--memory", "memory", type=Size(), default=None,
              help="The memory budget, e.g. 64GB [default: this machine's].")
@click.option("--context", type=click.IntRange(1), default=None,
              help="Tokens of K/V to reserve [default: 32768, or the model's context].")
@click.option("--kv-bits", type=click.Choice(["16", "8", "4"]), default="16", show_default=True,
              help="K/V storage to plan for, as --kv-bits of generate/chat/serve.")
@click.option("--index-bits", type=click.Choice(["8", "16"]), default=str(INDEX_BITS),
              show_default=True, help="MSA index key storage to plan for, as --index-bits.")
@click.option("--kv-memory", type=Size(), default=None, metavar="SIZE",
              help="Plan with at most SIZE of the sparse-attention layers' K/V in memory, the "
                   "rest on the SSD, as --kv-memory.")
@click.option("--recipe", default=None, help="For an original checkpoint: the recipe to plan "
                                             "(as for `m3mlx convert`) [default: m3].")
@click.option("--mode", default=None, help="For an original checkpoint: --mode of the plan.")
@click.option("--bits", type=int, default=None, help="For an original checkpoint: --bits.")
@click.option("--group-size", type=int, default=None,
              help="For an original checkpoint: --group-size.")
@click.option("--role", "roles", multiple=True, metavar="ROLE=PRECISION",
              help="For an original checkpoint: --role overrides, as for `m3mlx convert`.")
@click.option("--ranks", type=click.IntRange(1), default=1, show_default=True,
              help="Plan a run on N Macs (mlx.launch): --memory is each Mac's, and the plan is "
                   "of the largest rank's part.")
@click.option("--parallel", type=click.Choice(PLANS), default=PLANS[0], show_default=True,
              help="With --ranks: the sharding plan, as --parallel of generate/chat/serve.")
def plan(path, memory, context, kv_bits, index_bits, kv_memory, recipe, mode, bits, group_size,
         roles, ranks, parallel):
    """What a memory budget holds of the model at PATH, and its decode speed on named Macs.

    PATH is a converted model, or an original checkpoint (a directory or a Hub repo id: only
    its config and shard headers are fetched) planned with a conversion recipe. Prints what
    stays resident (weights besides the routed experts, K/V cache and MSA index keys at the
    context, activations), the expert cache the rest holds, the hit rate to expect and the
    predicted tokens per second on the Macs of m3mlx's hardware table. --context with
    --kv-bits, --index-bits and --kv-memory prices a long context, e.g. M3 at 1M tokens:
    `m3mlx plan MiniMaxAI/MiniMax-M3 --memory 128GB --context 1048576 --kv-bits 4`.
    --ranks N plans one Mac of N (`m3mlx plan MODEL --memory 64GB --ranks 2`): its share of
    the weights, the K/V of its heads or layers, the experts it computes; the speeds are of
    its own work, without the time on the links between the Macs.
    """
    from m3mlx.experts import USAGE_FILE, read_usage, routed_experts
    from m3mlx.hardware import machine_memory
    from m3mlx.plan import format_plan, make_plan

    options = {k: v for k, v in dict(recipe=recipe, mode=mode, bits=bits,
                                     group_size=group_size).items() if v is not None}
    if roles:
        options["roles"] = roles
    fp, ckpt, shard = footprint_of(path, None, options, ranks, parallel)
    usage = None
    if ckpt is not None and (ckpt.path / USAGE_FILE).is_file():
        usage = read_usage(ckpt.path / USAGE_FILE, routed_experts(ckpt))
        if shard is not None:  # the counts of the rank's own experts
            first = shard.rank * fp.experts if shard.is_tensor else 0
            usage = {m: c[first:first + fp.experts] for m, c in usage.items()
                     if shard.local_layer(m) is not None}
    memory = memory if memory is not None else machine_memory()
    context_options = dict(kv_bits=None if kv_bits == "16" else int(kv_bits),
                           index_bits=int(index_bits), kv_memory=kv_memory)
    click.echo(format_plan(make_plan(fp, memory, context, usage, **context_options)))
    click.echo("")
    if shard is None:
        click.echo(recipes_that_fit(fp.args, memory, context, context_options))
    else:
        together = ("the ranks work at once: a run decodes at about the speed above, less "
                    "the time on the links" if shard.is_tensor else
                    f"the {ranks} stages work one after another: a token takes about the sum "
                    f"of their times (near 1/{ranks} of the speed above), plus the links")
        click.echo(f"on {ranks} Macs: --memory-limit {format_size(memory).replace(' ', '')} "
                   f"on every rank under mlx.launch; {together} (README: Several Macs as one)")


# Expert precisions tried for "what fits entirely", best first.
EXPERT_PRECISIONS = (("affine", 8), ("mxfp8", None), ("affine", 6), ("affine", 5),
                     ("affine", 4), ("mxfp4", None), ("affine", 3), ("affine", 2))


def recipes_that_fit(args, memory: int, context, context_options: dict) -> str:
    """For each conversion recipe, the most precise experts with which the whole model (and
    the context) fits in `memory`, from the config's tensor layout."""
    from m3mlx.convert.plan import config_footprint
    from m3mlx.convert.recipes import RECIPES, base_spec
    from m3mlx.plan import plan_budget
    from m3mlx.units import format_size

    lines = [f"converted to fit entirely in {format_size(memory)} (no streaming):"]
    for recipe in RECIPES:
        found = "nothing fits"
        for mode, bits in EXPERT_PRECISIONS:
            base = base_spec(mode, bits, None)
            whole = config_footprint(args, recipe, base)
            try:
                if not plan_budget(whole, memory, context, **context_options).streams:
                    found = (f"experts {base}: {format_size(whole.total)} "
                             f"(`m3mlx convert SRC OUT --recipe {recipe} --mode {mode}"
                             f"{f' --bits {bits}' if bits else ''}`)")
                    break
            except InputError:
                continue
        lines.append(f"  recipe {recipe:<8} {found}")
    return "\n".join(lines)


CALIBRATION_TEXT = (
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n"
    "    return a\n\nThe history of the city begins with a small harbour on the river. "
    "Merchants came from the south, and the market grew into a town. "
    "Question: what is 17 times 23? Answer: 391. "
    "import json\nwith open('data.json') as f:\n    records = json.load(f)\n"
    "Dear team, the meeting moves to Thursday at ten; please bring the quarterly figures. "
)


@click.command("calibrate-experts", cls=Command)
@click.argument("path")
@click.option("--text", "texts", multiple=True, type=click.Path(dir_okay=False),
              help="A UTF-8 text file to run (repeatable; - reads stdin) [default: a built-in "
                   "mix of prose and Python].")
@click.option("--tokens", type=click.IntRange(1), default=8192, show_default=True,
              help="Tokens to run at most.")
@click.option("--output", type=click.Path(dir_okay=False), default=None,
              help="Where to write the counts [default: expert_usage.json in PATH].")
@click.option("--prefill-step-size", default=PREFILL_STEP, show_default=True,
              type=option_type("prefill_step_size"))
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
              default="auto", show_default=True)
def calibrate_experts(path, texts, tokens, output, prefill_step_size, dtype):
    """Count which routed experts each layer of the model at PATH uses on some text.

    Writes expert_usage.json next to the model (per layer, how often each expert was routed
    to): `--expert-policy pinned` keeps each layer's most used experts in the cache for good,
    and `m3mlx plan` predicts the hit rate from it. The model streams its experts while it
    runs: through a cache of all of them when they fit in memory, else of what fits (or what
    --expert-cache / --memory-limit say).
    """
    import mlx.core as mx

    from m3mlx import load, make_cache
    from m3mlx.checkpoint import Checkpoint
    from m3mlx.experts import USAGE_FILE, write_usage
    from m3mlx.generate import prefill
    from m3mlx.hardware import machine_memory
    from m3mlx.loading import resolve
    from m3mlx.plan import activation_bytes, footprint

    text = "".join(read_stdin("the text on stdin") if t == "-" else Path(t).read_text("utf-8")
                   for t in texts) if texts else CALIBRATION_TEXT * 64
    where = resolve(path)
    cast = None if dtype == "auto" else getattr(mx, dtype)
    settings = memory_settings()
    if not {"expert_cache", "memory_limit"} & settings.keys():
        fp = footprint(Checkpoint.open(where), cast)
        fits = fp.total + activation_bytes(fp.args, fp.act_bytes) <= machine_memory()
        settings.update({"expert_cache": "100%"} if fits else {"memory_limit": machine_memory()})
    model, tokenizer = load(where, dtype=cast, **settings)
    tier = getattr(model, "expert_tier", None)
    if tier is None:
        raise click.UsageError("the model loads whole with these options: calibration counts "
                               "the experts it streams; pass --expert-cache (e.g. 100%)")
    ids = tokenizer.encode(text)[:tokens]
    if not ids:
        raise click.UsageError("the text is empty")
    before = tier.stats.copy()
    prefill(model, mx.array(ids), make_cache(model), prefill_step_size)
    file = write_usage(Path(output) if output else where / USAGE_FILE, tier.usage(), len(ids))
    s = tier.stats - before
    click.echo(f"wrote {file}: {len(ids):,} tokens through {len(tier.layers)} MoE layers "
               f"({100 * s.hit_rate:.1f}% cache hits while counting)")


for option in reversed(memory_options()):
    calibrate_experts = option(calibrate_experts)
