"""`convert()`: a Hugging Face M3 checkpoint -> the mlx-lm `minimax_m3_vl` layout, streamed.

Order of work, so that a bad input never leaves anything behind:
  1. check the options and the output directory (nothing is downloaded for a doomed run);
  2. open the source (local, or the Hub: only config, index, tokenizer files and text shards),
     check every header, name, shape and dtype against config.json;
  3. plan every output tensor, print the plan; stop here for --dry-run;
  4. identify the source files (convert/identity.py: a resume from another source is refused),
     check that OUTPUT_DIR is writable and that the disk has room, a reserve included; only now
     create the output directory;
  5. stream the shards (temporary names, renamed when complete, recorded for --resume; a full
     disk or another OSError keeps the finished ones for --resume);
  6. copy tokenizer and chat files, write the index, verify the result against the config it is
     about to get, then write config.json last: a directory with a config.json is complete.
"""

import copy
import errno
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Mapping, Optional, Tuple, Union

from m3mlx.checkpoint import INDEX_FILE, read_json, warn_nonfinite
from m3mlx.errors import reported_as
from m3mlx.files import atomic_copy, atomic_write

from .errors import ConvertError
from .hub import (
    download_shards, fetch_small, looks_like_repo_id, remote_headers, upload, write_model_card,
)
from .identity import difference, source_identity
from .plan import MAX_SHARD_BYTES, Plan, build_plan, describe, estimate_seconds, human
from .progress import Progress
from .recipes import DEFAULT_RECIPE, resolve
from .safetensors_io import FLOAT_NAMES
from .source import Source, open_local
from .verify import CONVERSION_KEY, REDO, verify
from .writer import (
    PARTIAL, STATE_FILE, read_state, shard_is_complete, write_shards, write_state,
)

ASSUMED_READ_RATE = 1e9  # bytes/s, for the time estimate (an internal NVMe reads faster)


def disk_reserve(nbytes: int) -> int:
    """Space left free beyond what a conversion writes: 1% of it, at least 250 MB, so that the
    system (and the conversion's own metadata) never runs on a full disk."""
    return max(250_000_000, nbytes // 100)


@dataclass
class ConvertResult:
    plan: Plan
    output: Path
    written: bool  # False for a dry run or an output that was already complete
    seconds: float = 0.0
    verified: Optional[dict] = None

    @property
    def out_bytes(self) -> int:
        return self.plan.out_bytes


def convert(
    source: Union[str, os.PathLike],
    output: Union[str, os.PathLike],
    *,
    mode: str = "affine",
    bits: Optional[int] = None,
    group_size: Optional[int] = None,
    recipe: str = DEFAULT_RECIPE,
    roles: Optional[Mapping[str, object]] = None,
    dtype: str = "bfloat16",
    max_shard_size: int = MAX_SHARD_BYTES,
    revision: Optional[str] = None,
    dry_run: bool = False,
    resume: bool = False,
    force: bool = False,
    upload_repo: Optional[str] = None,
    progress: bool = True,
    hub_api=None,
    log: Callable[[str], None] = print,
    after_shard: Optional[Callable[[str], None]] = None,
) -> ConvertResult:
    """Convert a MiniMax-M3 checkpoint (directory or Hub repo id; BF16, MXFP8 or NVFP4) to MLX.

    mode/bits/group_size set the base precision (the routed experts'); `recipe` decides the
    other roles; `roles` overrides single roles, e.g. {"experts": "3", "attention": "mxfp8"}.
    `dtype` is the float type of unquantized tensors and affine scales. Returns a
    ConvertResult; raises ConvertError on any bad input, before writing anything."""
    # 1. options and output directory
    _check_dtype(dtype)
    if resume and force:
        raise ConvertError("--resume and --force contradict each other: --resume continues the "
                           "conversion in OUTPUT_DIR, --force deletes it; pick one")
    base, specs = resolve(recipe, mode, bits, group_size, roles, dtype)
    output = Path(output).expanduser()
    state = _check_output(output, resume=resume, force=force, dry_run=dry_run)

    # 2. source (from the Hub: config and headers only, for now)
    src, pending = _open_source(source, revision=revision, api=hub_api)
    if src.path.resolve() == output.resolve() or output.resolve() in src.path.resolve().parents:
        raise ConvertError(f"OUTPUT_DIR {output} is the source directory (or holds it); write "
                           "the conversion somewhere else")

    # 3. plan
    plan = build_plan(src, specs, base=base, dtype=dtype, recipe=recipe,
                      max_shard_bytes=max_shard_size, explicit_roles=set(roles or ()))
    log(describe(plan, seconds=estimate_seconds(plan, ASSUMED_READ_RATE)))
    if dry_run:
        log("dry run: nothing written")
        return ConvertResult(plan, output, written=False)

    fingerprint = plan.fingerprint()
    side = copyable_side_files(src, log)
    identity = source_identity(_source_files(src, side))
    done = []
    if state is not None:  # --resume on an existing directory
        if state.get("complete"):
            return _already_complete(plan, output, fingerprint, identity, upload_repo, hub_api,
                                     log)
        if state.get("fingerprint") != fingerprint:
            raise ConvertError(
                f"{output} holds an interrupted conversion made with other options or another "
                "source; run it again with the same command, or use --force to start over")
        _check_same_source(output, state.get("source_files"), identity, partial=bool(pending))
        done = [f for f in state.get("done", []) if f in plan.files
                and shard_is_complete(output, f, plan)]

    # 4. disk space (what --force deletes counts as free), the download, then the first write
    needed = sum(b for f, b in plan.file_bytes.items() if f not in done) + sum(
        p.stat().st_size for p in side)
    if force and output.exists():
        needed -= sum(p.stat().st_size for p in output.rglob("*") if p.is_file())
    download = sum(w.nbytes for w in src.weights if w.data.file.name in pending)
    _check_writable(output)
    _check_disk(output, needed, src.path, download, log)
    if pending:
        download_shards(src.repo_id, pending, revision=revision, api=hub_api, log=log)
        src = open_local(src.path, repo_id=src.repo_id)  # now with the real headers
        plan = build_plan(src, specs, base=base, dtype=dtype, recipe=recipe,
                          max_shard_bytes=max_shard_size, explicit_roles=set(roles or ()))
        if plan.fingerprint() != fingerprint:
            raise ConvertError(f"the shards downloaded from {src.repo_id} do not match the "
                               "headers the Hub reported for them; run the command again")
        identity = source_identity(_source_files(src, side))
        if state is not None:
            _check_same_source(output, state.get("source_files"), identity)
    if force and output.exists():
        _clear_output(output)
    fresh, created = not done and state is None, not output.exists()
    output.mkdir(parents=True, exist_ok=True)
    state = {"fingerprint": fingerprint, "done": list(done), "source": str(src.repo_id or src.path),
             "source_files": identity}
    write_state(output, state)
    for stale in output.glob(f"*{PARTIAL}"):
        stale.unlink()

    # 5. shards; 6. side files, index, verification, config.json last
    todo = [u for u in plan.units if u.file not in done]
    bar = Progress(sum(u.source_bytes for u in todo), enabled=progress)
    if done:
        log(f"resuming: {len(done)} of {len(plan.files)} files already written")
    try:
        write_shards(plan, output, done=done, state=state, on_bytes=bar.update,
                     after_shard=after_shard)
        bar.close()
        warn_nonfinite([w.weight.name for w in src.weights if w.nonfinite], src.path)
        config = output_config(plan, fingerprint, identity)
        _finish(plan, output, config, src, side)
        verified = verify(output, config)
        atomic_write(output / "config.json", json.dumps(config, indent=4))
    except KeyboardInterrupt:
        log(f"\ninterrupted: {len(done)} of {len(plan.files)} files written to {output}; run the "
            "same command with --resume to continue")
        raise
    except OSError as e:  # the disk filled up, a disk went away: keep what is finished
        kept = bool(done) or not fresh
        if not kept:
            _remove_written(output, plan, created)
        raise ConvertError(_write_failure(e, output, plan, done, side, kept)) from None
    except BaseException:
        if fresh:  # a fresh run that failed: leave nothing behind
            _remove_written(output, plan, created)
        raise
    (output / STATE_FILE).unlink(missing_ok=True)
    seconds = bar.elapsed
    log(f"wrote {human(plan.out_bytes)} to {output} in {seconds:.1f}s "
        f"({bar.done / max(seconds, 1e-9) / 1e6:.1f} MB/s of source); "
        f"verified {verified['tensors']} tensors in {verified['files']} files")
    if upload_repo:
        upload(output, upload_repo, api=hub_api, log=log)
    return ConvertResult(plan, output, written=True, seconds=seconds, verified=verified)


def _check_dtype(dtype: str):
    if dtype not in FLOAT_NAMES:
        raise ConvertError(f"--dtype {dtype!r}: choose one of {', '.join(FLOAT_NAMES)}")


def conversion_plan(source, *, mode: str = "affine", bits: Optional[int] = None,
                    group_size: Optional[int] = None, recipe: str = DEFAULT_RECIPE,
                    roles: Optional[Mapping[str, object]] = None, dtype: str = "bfloat16",
                    revision: Optional[str] = None, hub_api=None) -> Plan:
    """What `convert(source, ..., dry_run=True)` plans, without an output (a Hub source: its
    config and shard headers only)."""
    _check_dtype(dtype)
    base, specs = resolve(recipe, mode, bits, group_size, roles, dtype)
    src, _ = _open_source(source, revision=revision, api=hub_api)
    return build_plan(src, specs, base=base, dtype=dtype, recipe=recipe)


def _source_files(src: Source, side: List[Path]) -> List[Path]:
    """The source files the output depends on that are on this machine (a Hub source's shards
    are not until they are downloaded)."""
    shards = {t.file for w in src.weights for t in (w.data, w.scale, w.scale2) if t is not None}
    files = [src.path / "config.json", src.path / "hf_quant_config.json", *shards, *side]
    return [f for f in files if f.is_file()]


def _check_same_source(output: Path, recorded: Optional[dict], identity: dict,
                       partial: bool = False):
    if not isinstance(recorded, dict):
        raise ConvertError(f"{output} does not record which source files it was converted from "
                           "(made by an older m3mlx?), so resuming it could mix two models; "
                           "use --force to convert again")
    different = difference(recorded, identity, partial=partial)
    if different:
        raise ConvertError(f"{output} was converted from another source: {different}. Resume "
                           "with the source it was made from, or use --force to start over")


def _open_source(source, *, revision, api) -> Tuple[Source, List[str]]:
    """(the checked source, shards still to download). A Hub source is checked from its
    config and the shard headers on the Hub until its shards are needed."""
    path = Path(source).expanduser()
    if path.exists():
        return open_local(path), []
    if not looks_like_repo_id(str(source)):
        raise ConvertError(f"SOURCE {source}: no such directory, and not a Hub repo id "
                           "(like MiniMaxAI/MiniMax-M3)")
    repo_id = str(source)
    local, shards = fetch_small(repo_id, revision=revision, api=api)
    pending = [s for s in shards if not (local / s).is_file()]
    if not pending:
        return open_local(local, repo_id=repo_id), []
    headers = remote_headers(repo_id, local, shards, revision=revision, api=api)
    return open_local(local, tensors=headers, repo_id=repo_id), pending


def _check_output(output: Path, *, resume: bool, force: bool, dry_run: bool) -> Optional[dict]:
    """None for a fresh start; the resume state when continuing an existing directory."""
    if output.exists() and not output.is_dir():
        raise ConvertError(f"OUTPUT_DIR {output} is a file; pass a directory")
    if not output.exists() or not any(output.iterdir()):
        return None
    if resume:
        state = read_state(output)
        if state is not None:
            return state
        if (output / "config.json").is_file() and (output / INDEX_FILE).is_file():
            return {"complete": True}
        raise ConvertError(f"{output} does not hold an interrupted m3mlx conversion (no readable "
                           f"{STATE_FILE}); use --force to replace its contents or pick another "
                           "directory")
    if force:
        _removable(output)
        return None
    if dry_run:
        return None
    raise ConvertError(f"OUTPUT_DIR {output} already exists and is not empty; pass --resume to "
                       "continue an interrupted conversion, --force to replace it, or choose "
                       "another directory")


def _removable(output: Path):
    names = {p.name for p in output.iterdir()}
    ours = (STATE_FILE in names or "config.json" in names
            or any(n.endswith(".safetensors") or n.endswith(PARTIAL) for n in names))
    if not ours:
        raise ConvertError(f"{output} holds files that are not a model conversion (e.g. "
                           f"{sorted(names)[:3]}); --force only replaces model directories: "
                           "pick another OUTPUT_DIR")


def _clear_output(output: Path):
    for p in output.iterdir():
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def _remove_written(output: Path, plan: Plan, created: bool):
    if created:
        shutil.rmtree(output, ignore_errors=True)
        return
    names = set(plan.files) | {STATE_FILE, INDEX_FILE, "config.json", "README.md"} | {
        f.name for f in plan.source.side_files}
    for p in output.iterdir():
        if p.name in names or p.name.endswith(PARTIAL):
            p.unlink(missing_ok=True)


def _nearest_existing(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


def _check_writable(output: Path):
    """Refuse up front (before any download) an OUTPUT_DIR that cannot be written."""
    probe = _nearest_existing(output)
    if os.statvfs(probe).f_flag & os.ST_RDONLY:
        raise ConvertError(f"cannot write OUTPUT_DIR {output}: {probe} is on a read-only file "
                           "system; write the conversion somewhere else")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConvertError(f"cannot write OUTPUT_DIR {output}: permission denied on {probe}; "
                           "choose a directory you may write to")


def _check_disk(output: Path, needed: int, cache: Path, download: int, log):
    """Room for the output, and for the shards still to download (on the same disk or not),
    with a reserve kept free."""
    probe = _nearest_existing(output)
    wants = {probe.stat().st_dev: [probe, needed, "the output needs"]}
    if download:
        dev = cache.stat().st_dev
        if dev in wants:
            wants[dev][1] += download
            wants[dev][2] = "the output and the download need"
        else:
            wants[dev] = [cache, download, "the download needs"]
    for where, nbytes, what in wants.values():
        free = shutil.disk_usage(where).free
        reserve = disk_reserve(nbytes)
        if nbytes + reserve > free:
            raise ConvertError(
                f"not enough disk space: {what} {human(nbytes)}, plus a reserve of "
                f"{human(reserve)} that m3mlx keeps free; {where} has {human(free)} free: free "
                f"{human(nbytes + reserve - free)} more or write elsewhere")
        log(f"disk: {what} {human(nbytes)} (+ {human(reserve)} kept free); {human(free)} free "
            f"on {where}")


def _write_failure(e: OSError, output: Path, plan: Plan, done: List[str], side: List[Path],
                   kept: bool) -> str:
    """What to tell the user when writing stopped on an OSError (the file being written is
    removed; finished ones are kept when `kept`)."""
    if kept:
        state = (f"{len(done)} of {len(plan.files)} files are written and kept in {output} "
                 "(the file being written was removed)")
        again = "run the same command with --resume"
    else:
        state = f"nothing was finished, and nothing is left in {output}"
        again = "run the command again"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        remaining = sum(b for f, b in plan.file_bytes.items() if f not in done) + sum(
            p.stat().st_size for p in side)
        free = shutil.disk_usage(_nearest_existing(output)).free
        reserve = disk_reserve(remaining)
        missing = max(remaining + reserve - free, 0)
        return (f"the disk filled up: {state}. The rest needs {human(remaining)} plus a reserve "
                f"of {human(reserve)}, and {human(free)} is free: free at least {human(missing)}, "
                f"then {again}")
    what = e.strerror or str(e)
    where = f" ({e.filename})" if e.filename else ""
    return f"writing the conversion failed: {what}{where}; {state}. Fix that, then {again}"


def output_config(plan: Plan, fingerprint: str, source_files: dict) -> dict:
    """The source config with the vision tower gone and the mlx-lm quantization block added."""
    src = plan.source
    config = copy.deepcopy(src.config)
    for key in ("vision_config", "quantization_config", "quantization", "_name_or_path"):
        config.pop(key, None)
    (config.get("text_config") or {}).pop("quantization_config", None)
    if plan.quantization:
        config["quantization"] = plan.quantization
        config["quantization_config"] = copy.deepcopy(plan.quantization)
    if "torch_dtype" in config:
        config["torch_dtype"] = plan.dtype
    mtp_files = sorted({u.file for u in plan.units if ".mtp." in u.path})
    config[CONVERSION_KEY] = {
        "converter": "m3mlx convert",
        "source": str(src.repo_id or src.path),
        "source_format": src.fmt,
        "recipe": plan.recipe,
        "base": str(plan.base),
        "dtype": plan.dtype,
        "roles": {role: str(spec) for role, spec in plan.roles.items()},
        "vision_tower": "dropped (vision_config removed; text-only conversion)",
        "mtp_layers": src.mtp_layers,
        "mtp_files": mtp_files,
        "fingerprint": fingerprint,
        "source_files": source_files,
    }
    return config


def copyable_side_files(src: Source, log) -> List[Path]:
    """The tokenizer and chat files to copy: regular files inside the source only. A link is
    followed only when it stays inside the checkpoint (for a Hub snapshot, inside its cache
    folder, where the blobs are), so nothing from elsewhere on the disk ends up in the output
    (and on the Hub, with --upload-repo)."""
    root = src.path.resolve()
    if src.repo_id:
        root = root.parent.parent  # snapshots/<revision> -> the repo's cache folder
    out = []
    for f in src.side_files:
        real = f.resolve()
        if root in real.parents and real.is_file():
            out.append(f)
        else:
            log(f"skipped {f.name}: it links to {real}, outside the checkpoint")
    return out


def _finish(plan: Plan, output: Path, config: dict, src: Source, side: List[Path]):
    for f in side:
        atomic_copy(f, output / f.name)
    weight_map = {t.name: fname for fname, ts in plan.files.items() for t in ts}
    index = {"metadata": {"total_size": plan.out_bytes, "total_parameters": plan.params,
                          "format": "mlx"},
             "weight_map": dict(sorted(weight_map.items()))}
    atomic_write(output / INDEX_FILE, json.dumps(index, indent=4))
    write_model_card(output, src.repo_id, describe_short(plan))


def describe_short(plan: Plan) -> str:
    q = plan.quantization
    what = (f"{q['mode']} {q['bits']}-bit, group {q['group_size']} for the bulk of the weights"
            if q else f"unquantized {plan.dtype}")
    return (f"Recipe `{plan.recipe}` ({what}); {human(plan.out_bytes)}, "
            f"{8 * plan.out_bytes / plan.params:.2f} bits per weight.")


def _already_complete(plan, output, fingerprint, identity, upload_repo, api, log
                      ) -> ConvertResult:
    with reported_as(ConvertError, advice=REDO):
        config = read_json(output / "config.json")
    record = config.get(CONVERSION_KEY) or {}
    if not isinstance(record, dict) or record.get("fingerprint") != fingerprint:
        raise ConvertError(f"{output} holds a finished conversion made with other options or "
                           "another source; use --force to replace it")
    # A Hub source's shards may not be downloaded: what is here is compared.
    _check_same_source(output, record.get("source_files"), identity,
                       partial=plan.source.repo_id is not None)
    verified = verify(output)
    log(f"{output} is already complete ({verified['tensors']} tensors verified)")
    if upload_repo:
        upload(output, upload_repo, api=api, log=log)
    return ConvertResult(plan, output, written=False, verified=verified)

