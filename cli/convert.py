"""`m3mlx convert SOURCE OUTPUT_DIR`: a thin click wrapper over `m3mlx.convert.convert`."""

import click

from m3mlx.convert import RECIPES, ROLES
from m3mlx.convert import convert as run_convert
from m3mlx.convert.recipes import MODES, parse_role_overrides

from .errors import Command
from .options import Size

ROLE_HELP = "; ".join(f"{name}: {what}" for name, what in ROLES.items())


@click.command("convert", cls=Command, context_settings={"help_option_names": ["-h", "--help"],
                                            "max_content_width": 100})
@click.argument("source")
@click.argument("output_dir", type=click.Path(file_okay=False))
@click.option("--mode", type=click.Choice(MODES), default="affine", show_default=True,
              help="Base quantization (the routed experts'); none keeps every tensor in --dtype.")
@click.option("--bits", type=int, default=None,
              help="Affine bits: 2, 3, 4, 5, 6 or 8 [default: 4]. Fixed by the mx/nv modes.")
@click.option("--group-size", type=int, default=None,
              help="Affine group size: 32, 64 or 128 [default: 64]. Fixed by the mx/nv modes.")
@click.option("--recipe", type=click.Choice(sorted(RECIPES)), default="m3", show_default=True,
              help="Precision by tensor role. m3: experts at the base setting, attention, shared "
                   "expert, dense MLPs, embeddings and lm_head at 8 bits, index projections and "
                   "norms unquantized, router and correction bias fp32. uniform: everything "
                   "quantizable at the base setting. mlx-lm: what `mlx_lm convert -q` does. "
                   "fit-192gb, fit-128gb: M3 for a Mac of that memory, every role's precision "
                   "chosen by measured KL divergence (take no --mode/--bits/--group-size).")
@click.option("--role", "roles", multiple=True, metavar="ROLE=PRECISION",
              help="Override one role, repeatable. PRECISION: none, bf16, fp16, fp32, affine "
                   "bits (4, 8, 4g32), mxfp4, mxfp8 or nvfp4. Roles: " + ROLE_HELP + ".")
@click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]),
              default="bfloat16", show_default=True,
              help="Float type of unquantized tensors and of affine scales and biases.")
@click.option("--max-shard-size", default="5GB", show_default=True, type=Size(),
              help="Largest output shard, e.g. 5GB or 500MB.")
@click.option("--revision", default=None, help="Branch, tag or commit of a Hub SOURCE.")
@click.option("--dry-run", is_flag=True,
              help="Print the plan (precision per role, output size, estimated time); write "
                   "nothing. A Hub SOURCE only has its config and shard headers fetched.")
@click.option("--resume", is_flag=True,
              help="Continue an interrupted conversion in OUTPUT_DIR (finished shards are kept).")
@click.option("--force", is_flag=True, help="Replace an existing OUTPUT_DIR.")
@click.option("--upload-repo", default=None, metavar="ORG/NAME",
              help="Push the finished conversion to this Hugging Face repo.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def convert(source, output_dir, mode, bits, group_size, recipe, roles, dtype, max_shard_size,
            revision, dry_run, resume, force, upload_repo, quiet):
    """Convert a MiniMax-M3 checkpoint to MLX, streaming tensor by tensor.

    SOURCE is a local checkpoint directory or a Hugging Face repo id (MiniMaxAI/MiniMax-M3,
    MiniMaxAI/MiniMax-M3-MXFP8, an NVFP4 ModelOpt export); BF16, MXFP8 and NVFP4 are read
    directly. OUTPUT_DIR gets the mlx-lm `minimax_m3_vl` layout, loadable by m3mlx and mlx-lm.
    Peak memory stays at a few row chunks, whatever the model size.

    \b
    Examples:
      m3mlx convert MiniMaxAI/MiniMax-M3-MXFP8 m3-4bit
      m3mlx convert MiniMaxAI/MiniMax-M3-MXFP8 m3-mxfp8 --mode mxfp8
      m3mlx convert ./MiniMax-M3 m3-3bit --bits 3 --role attention=6 --dry-run
    """
    run_convert(
        source, output_dir, mode=mode, bits=bits, group_size=group_size, recipe=recipe,
        roles=parse_role_overrides(roles), dtype=dtype,
        max_shard_size=max_shard_size, revision=revision, dry_run=dry_run,
        resume=resume, force=force, upload_repo=upload_repo, progress=not quiet,
        log=click.echo,
    )
