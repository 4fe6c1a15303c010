"""Prompt caches of a model split over several ranks (m3mlx.sharding): one file per rank.

Each rank holds only its part of the cache (tensor plan: the K/V of its KV heads, and the index
keys, which every rank holds; pipeline plan: its layers' caches), so each rank writes and reads
its own file, on its own machine. Rank 0's is the path asked for; rank r of N writes its part
beside it, the same name with `.rank{r}-of-{N}` before `.safetensors`:

    doc.safetensors                 rank 0 (on the Mac that runs rank 0)
    doc.rank1-of-2.safetensors      rank 1 (on the Mac that runs rank 1)

Every part records (`m3mlx_shard`) the plan, the number of ranks, its rank and what the rank
holds, and the id of the save, which rank 0 picks. A part is loaded only by the rank of the
same plan and number of ranks that saved it, and only along with the other parts of the same
save: a saved cache is never split again (load it as it was saved, or fill a new one).

A save is made in step, so that an interrupted one never leaves a set that loads: every rank
writes its part to a temporary name; once all have, the other ranks rename theirs into place,
and rank 0 renames its own last. Until then rank 0's file is the previous save's (or none), and
its id differs from the new parts'. A failure on any rank fails the save or load on every rank,
with the same one-line InputError naming the rank (`m3mlx.distributed.together`).
"""

import json
import os
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import mlx.core as mx

from .checks import InputError, parse_json
from .distributed import gather_bytes, together
from .files import staged_file, temp_name

SUFFIX = ".safetensors"


def is_sharded(model) -> bool:
    """A model that is one rank's part of a model split over several ranks."""
    sharding = getattr(model, "sharding", None)
    return sharding is not None and sharding.plan.size > 1


def part_path(path, rank: int, size: int) -> Path:
    """Where rank `rank` of `size` keeps its part of the cache saved at `path`."""
    path = Path(path)
    if rank == 0:
        return path
    stem = path.name[:-len(SUFFIX)] if path.name.endswith(SUFFIX) else path.name
    return path.with_name(f"{stem}.rank{rank}-of-{size}{SUFFIX}")


def _holds(model) -> Dict[str, Any]:
    """What this rank's part of the cache holds: its plan, its place, its layers and heads."""
    plan = model.sharding.plan
    return {"plan": plan.kind, "world_size": plan.size, "rank": plan.rank,
            "layers": list(plan.layers), "kv_heads": list(plan.kv_heads(model.args))}


def _run(plan: str, size: int) -> str:
    return f"{size} ranks under the {plan} plan"


def check_part(path, record: Optional[str], model):
    """Raise InputError unless the cache file at `path`, whose shard record is `record`
    (None: saved by a single process), is this process's to load."""
    sharded = is_sharded(model)
    if record is None:
        if sharded:
            plan = model.sharding.plan
            raise InputError(
                f"{path} was saved by a single process; this is rank {plan.rank} of a run of "
                f"{_run(plan.kind, plan.size)}: load it in a single process (a saved cache is "
                "not split between ranks)")
        return
    try:
        saved = parse_json(record)
        plan, size, rank = saved["plan"], saved["world_size"], saved["rank"]
        save_id = saved["save_id"]
        if not (isinstance(plan, str) and isinstance(save_id, str)
                and all(type(x) is int for x in (size, rank))):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise InputError(f"{path}: its shard record is damaged or not m3mlx's") from None
    if not sharded:
        raise InputError(
            f"{path} is rank {rank}'s part of a cache saved by {_run(plan, size)}; load it "
            f"under mlx.launch -n {size} with --parallel {plan}, each rank beside its part (a "
            "saved cache is not joined into one process)")
    mine = _holds(model)
    if (plan, size) != (mine["plan"], mine["world_size"]):
        raise InputError(
            f"{path} was saved by {_run(plan, size)}; this run is "
            f"{_run(mine['plan'], mine['world_size'])}: load it under mlx.launch -n {size} "
            f"with --parallel {plan} (a saved cache is not split again)")
    for key, what in (("rank", "rank"), ("layers", "layers [start, stop)"),
                      ("kv_heads", "KV heads [start, stop)")):
        if saved.get(key) != mine[key]:
            raise InputError(f"{path} holds {what} {saved.get(key)} but this rank holds "
                             f"{mine[key]}: the file was renamed or saved with another "
                             "version of the model")


def save_parts(path, arrays: Dict[str, mx.array], metadata: Dict[str, str], model):
    """Write this rank's part of the cache saved at `path` (on every rank, in step)."""
    group, plan = model.sharding.group, model.sharding.plan
    save_id = gather_bytes(uuid.uuid4().hex.encode() if plan.rank == 0 else b"", group)[0]
    record = {**_holds(model), "save_id": save_id.decode()}
    metadata = {**metadata, "m3mlx_shard": json.dumps(record)}
    final = part_path(path, plan.rank, plan.size)
    tmp = temp_name(final)
    written = False
    try:
        with together(group):
            with staged_file(final) as f:
                mx.save_safetensors(f, arrays, metadata=metadata)
            written = True
        with together(group):  # every part is written: the others take their place...
            if plan.rank:
                os.replace(tmp, final)
        with together(group):  # ...and rank 0's last, which makes the set whole
            if not plan.rank:
                os.replace(tmp, final)
    finally:
        if written:  # and not renamed: the save failed on another rank
            tmp.unlink(missing_ok=True)


def load_parts(path, model, read: Callable[[Path], Tuple[Any, Any, Optional[str]]]):
    """(cache, metadata) of this rank's part of the cache saved at `path`, once every rank
    has read and checked its own part (`read(part)` returns cache, metadata and shard record)
    and all of the parts come from the same save."""
    group, plan = model.sharding.group, model.sharding.plan
    part = part_path(path, plan.rank, plan.size)
    save_id = ""
    with together(group):
        if not part.is_file():
            raise InputError(
                f"{part}: no such file: this rank's part of the cache is missing (each rank "
                f"keeps its part beside {Path(path).name} on its own machine; was it saved by "
                f"{_run(plan.kind, plan.size)}?)")
        cache, metadata, record = read(part)
        save_id = parse_json(record)["save_id"]
    ids = gather_bytes(save_id.encode(), group)
    for rank, other in enumerate(ids):
        if other != ids[0]:
            raise InputError(
                f"rank {rank} of {plan.size}: {part_path(path, rank, plan.size).name} is from "
                f"another save than {Path(path).name} (a save was interrupted, or a part was "
                "copied from another one): save the cache again")
    return cache, metadata
