"""The conversion plan: every output tensor, its precision, its file and its byte size.

Everything the writer does is decided here, before a byte is written, from the source's headers
and the recipe: so the plan can be printed (`--dry-run`), its size checked against free disk,
its fingerprint compared on `--resume`, and its shard headers written up front.
"""

import hashlib
import json
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

from m3mlx.weights import MTP_FILE

from . import measured
from .errors import ConvertError
from .recipes import FLOAT_BYTES, ROLES, Spec
from .safetensors_io import FLOAT_NAMES, PlannedTensor, file_size
from .source import Source, SourceWeight

MAX_SHARD_BYTES = 5 << 30  # mlx-lm's MAX_FILE_SIZE_GB
SHARD_METADATA = {"format": "mlx"}


@dataclass
class Unit:
    """One output module (or vector): the source weights it is made of and the tensors it
    becomes. A stacked expert module has one source per expert."""

    path: str  # module path, or the tensor name for a vector
    role: str
    kind: str
    spec: Spec
    sources: List[SourceWeight]
    tensors: List[PlannedTensor] = field(default_factory=list)
    passthrough: bool = False  # source bytes copied as they are (same format on both sides)
    note: str = ""
    file: str = ""

    @property
    def stacked(self) -> bool:
        return self.kind == "expert"

    @property
    def params(self) -> int:
        return sum(int(np.prod(s.weight.shape)) for s in self.sources)

    @property
    def source_bytes(self) -> int:
        return sum(s.nbytes for s in self.sources)

    @property
    def out_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


@dataclass
class Plan:
    source: Source
    units: List[Unit]
    files: Dict[str, List[PlannedTensor]]  # output file -> tensors in write order
    base: Spec
    dtype: str
    recipe: str
    roles: Dict[str, Spec]
    quantization: Optional[dict]

    @property
    def out_bytes(self) -> int:
        return sum(u.out_bytes for u in self.units)

    @property
    def file_bytes(self) -> Dict[str, int]:
        return {f: file_size(ts, SHARD_METADATA) for f, ts in self.files.items()}

    @property
    def params(self) -> int:
        return sum(u.params for u in self.units)

    def fingerprint(self) -> str:
        """Identity of what would be written: changes with any option that changes a byte."""
        desc = {
            "source": [(s.data.name, s.data.file.name, s.data.dtype, s.data.nbytes)
                       for u in self.units for s in u.sources],
            "files": {f: [(t.name, t.dtype, list(t.shape)) for t in ts]
                      for f, ts in self.files.items()},
            "specs": [(u.path, str(u.spec), u.spec.dtype) for u in self.units],
        }
        return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()


def _out_tensors(path: str, kind: str, spec: Spec, shape, lead: tuple, dtype: str
                 ) -> List[PlannedTensor]:
    if not spec.quantized:
        return [PlannedTensor(path if kind == "vector" else f"{path}.weight",
                              FLOAT_NAMES[spec.dtype], lead + tuple(shape))]
    rows, cols = shape
    out = [PlannedTensor(f"{path}.weight", "U32", lead + (rows, cols * spec.bits // 32))]
    groups = lead + (rows, cols // spec.group_size)
    if spec.mode == "affine":
        out += [PlannedTensor(f"{path}.scales", FLOAT_NAMES[dtype], groups),
                PlannedTensor(f"{path}.biases", FLOAT_NAMES[dtype], groups)]
    else:
        out.append(PlannedTensor(f"{path}.scales", "U8", groups))
    return out


def _effective(spec: Spec, cols: int, dtype: str) -> Tuple[Spec, str]:
    """The role's spec, or the float fallback when the tensor's width does not fit its groups."""
    if spec.quantized and cols % spec.group_size:
        return Spec("float", dtype=dtype), (f"kept {dtype}: {cols} columns are not a multiple "
                                            f"of the group size {spec.group_size}")
    return spec, ""


def _keep_source_float(spec: Spec, sw: SourceWeight, source: Source, dtype: str):
    """A float tensor of a quantized source stays float when its role asks for the source's
    own format: MXFP8 -> mxfp8 copies what the release quantized and keeps what it did not
    (embeddings, lm_head), rather than quantizing those too."""
    if spec.quantized and spec.mode == source.fmt and sw.fmt == "float":
        return Spec("float", dtype=dtype), (f"kept {dtype}: float in the {source.fmt} source, "
                                            f"which {spec.mode} would only round")
    return spec, ""


def build_plan(source: Source, roles: Dict[str, Spec], *, base: Spec, dtype: str, recipe: str,
               max_shard_bytes: int = MAX_SHARD_BYTES, explicit_roles=()) -> Plan:
    """`explicit_roles`: roles the user set with --role; they get exactly what was asked."""
    if max_shard_bytes <= 0:
        raise ConvertError("--max-shard-size must be positive")
    # Group the source weights into output units (experts of one projection stack together).
    units: List[Unit] = []
    by_module: Dict[str, Unit] = {}
    for sw in source.weights:
        w = sw.weight
        if w.kind == "expert" and w.module in by_module:
            by_module[w.module].sources.append(sw)
            continue
        spec, note = roles[w.role], ""
        if w.role not in explicit_roles:
            spec, note = _keep_source_float(spec, sw, source, dtype)
        if w.quantizable and not note:
            spec, note = _effective(spec, w.shape[-1], dtype)
        unit = Unit(w.module or w.name, w.role, w.kind, spec, [sw], note=note)
        units.append(unit)
        if w.module:
            by_module[w.module] = unit

    for u in units:
        first = u.sources[0]
        lead = (len(u.sources),) if u.stacked else ()
        u.tensors = _out_tensors(u.path, u.kind, u.spec, first.weight.shape, lead, dtype)
        if u.spec.quantized:
            u.passthrough = all(s.fmt == u.spec.mode for s in u.sources) and u.spec.mode == "mxfp8"
        else:
            u.passthrough = all(s.fmt == "float" and s.data.dtype == FLOAT_NAMES[u.spec.dtype]
                                for s in u.sources)

    files = _assign_files(units, max_shard_bytes)
    quantization = quantization_block(units)
    return Plan(source, units, files, base, dtype, recipe, roles, quantization)


def _assign_files(units: List[Unit], limit: int) -> Dict[str, List[PlannedTensor]]:
    """Pack units, in order, into shards of at most `limit` bytes (a unit never straddles two
    shards; one larger than the limit gets a shard of its own). MTP units go to their own
    file(s), which mlx-lm's `model*.safetensors` glob does not pick up."""
    groups: Dict[str, List[List[Unit]]] = {"model": [], "mtp": []}
    sizes: Dict[str, int] = {"model": 0, "mtp": 0}
    for u in units:
        key = "mtp" if ".mtp." in u.path else "model"
        shards = groups[key]
        if not shards or (sizes[key] + u.out_bytes > limit and shards[-1]):
            shards.append([])
            sizes[key] = 0
        shards[-1].append(u)
        sizes[key] += u.out_bytes
    files: Dict[str, List[PlannedTensor]] = {}
    for key, shards in groups.items():
        n = len(shards)
        for i, shard in enumerate(shards):
            if key == "model":
                name = ("model.safetensors" if n == 1
                        else f"model-{i + 1:05d}-of-{n:05d}.safetensors")
            else:
                name = MTP_FILE if n == 1 else f"mtp-{i + 1:05d}-of-{n:05d}.safetensors"
            files[name] = []
            for u in shard:
                u.file = name
                files[name] += u.tensors
    return files


def quantization_block(units: List[Unit]) -> Optional[dict]:
    """mlx-lm's `quantization` config: the global setting is the one holding the most weights;
    every module that differs gets its own entry (a dict, or false when left unquantized)."""
    weight_by_spec: Dict[Spec, int] = defaultdict(int)
    for u in units:
        if u.kind != "vector" and u.spec.quantized:
            weight_by_spec[u.spec] += u.params
    if not weight_by_spec:
        return None
    main = max(weight_by_spec, key=weight_by_spec.get)
    block = dict(main.quant_params())
    for u in units:
        if u.kind == "vector":
            continue
        if not u.spec.quantized:
            block[u.path] = False
        elif u.spec != main:
            block[u.path] = u.spec.quant_params()
    return block


# ----------------------------------------------------------------------------------------------
# Reporting


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)


def role_table(plan: Plan) -> List[dict]:
    rows = []
    for role in ROLES:
        us = [u for u in plan.units if u.role == role]
        if not us:
            continue
        params = sum(u.params for u in us)
        specs = sorted({str(u.spec) for u in us})
        rows.append({
            "role": role, "tensors": sum(len(u.sources) for u in us), "params": params,
            "precision": ", ".join(specs), "bytes": sum(u.out_bytes for u in us),
            "bpw": 8 * sum(u.out_bytes for u in us) / max(params, 1),
            "notes": sorted({u.note for u in us if u.note}),
        })
    return rows


def estimate_seconds(plan: Plan, read_rate: float) -> float:
    """Reading at `read_rate` bytes/s plus quantizing at this machine's measured speed."""
    import mlx.core as mx

    speed: Dict[Spec, float] = {}
    total = plan.source.text_bytes / read_rate
    for u in plan.units:
        if not u.spec.quantized or u.passthrough:
            continue
        if u.spec not in speed:
            x = mx.random.normal((256, 4096))
            mx.eval(x)
            t = time.perf_counter()
            mx.eval(mx.quantize(x, u.spec.group_size, u.spec.bits, mode=u.spec.mode))
            speed[u.spec] = x.size / max(time.perf_counter() - t, 1e-6)
        total += u.params / speed[u.spec]
    return total


def describe(plan: Plan, *, seconds: Optional[float] = None) -> str:
    src = plan.source
    lines = [
        f"source  {src.repo_id or src.path}  ({src.fmt}, {_count(src.params)} text "
        f"parameters{', MTP layers: ' + str(src.mtp_layers) if src.mtp_layers else ', no MTP'}"
        f", {len(src.dropped)} vision/unused tensors dropped)",
        f"recipe  {plan.recipe}, base {plan.base}, float dtype {plan.dtype}",
        "",
        f"{'role':<16}{'tensors':>8}{'params':>17}  {'precision':<28}{'size':>12}{'bpw':>7}",
    ]
    for r in role_table(plan):
        lines.append(f"{r['role']:<16}{r['tensors']:>8} {r['params']:>16,}  {r['precision']:<28}"
                     f"{human(r['bytes']):>12}{r['bpw']:>7.2f}")
        lines += [f"{'':<16}note: {n}" for n in r["notes"]]
    n_passthrough = sum(len(u.sources) for u in plan.units if u.passthrough and u.spec.quantized)
    if n_passthrough:
        lines.append(f"{n_passthrough} tensors are copied bit-exact from the source "
                     f"({src.fmt} -> {src.fmt}), not requantized")
    before, after = src.text_bytes, plan.out_bytes
    lines += [
        "",
        f"resident size  before {human(before)} ({8 * before / src.params:.2f} bits/weight)"
        f"  ->  after {human(after)} ({8 * after / plan.params:.2f} bits/weight)",
        f"output files   {len(plan.files)} ({', '.join(_file_summary(plan))}), "
        f"{human(sum(plan.file_bytes.values()))} on disk",
    ]
    if seconds is not None:
        lines.append(f"estimated time {duration(seconds)} on this machine")
    lines.append(measured.describe({r["role"]: r["precision"] for r in role_table(plan)}))
    return "\n".join(lines)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def _file_summary(plan: Plan) -> List[str]:
    names = list(plan.files)
    model = [n for n in names if n.startswith("model")]
    mtp = [n for n in names if not n.startswith("model")]
    out = [f"{len(model)} model shard{'s' if len(model) != 1 else ''} of at most "
           f"{human(max(plan.file_bytes[n] for n in model))}"] if model else []
    if mtp:
        out.append(f"MTP in {', '.join(mtp)}")
    return out


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def footprint(plan: Plan):
    """The memory the conversion `plan` would take loaded (`m3mlx.plan.Footprint`): what
    `m3mlx plan` shows for an original checkpoint and a recipe."""
    from m3mlx.plan import Footprint

    args = plan.source.args
    experts = sum(u.out_bytes for u in plan.units if u.role == "experts")
    embedding = sum(u.out_bytes for u in plan.units if u.role == "embed")
    moe_layers = sum(args.moe_layers)
    E = args.num_local_experts
    what = (f"{plan.source.repo_id or plan.source.path} converted with recipe {plan.recipe}, "
            f"experts {plan.base} (planned)")
    return Footprint(args, plan.out_bytes - experts, experts // max(1, E * moe_layers),
                     moe_layers, E, FLOAT_BYTES[plan.dtype], embedding, True, what)


def config_footprint(args, recipe: str, base: Spec, dtype: str = "bfloat16"):
    """The footprint (`m3mlx.plan.Footprint`) a conversion of a model with config `args` would
    have, from the tensor layout alone (no checkpoint needed): what `m3mlx plan` lists as the
    recipes that would fit, and M3's own sizes for the benchmark's predictions. The same
    tensors and sizes as `build_plan` (the test compares it with a dry run)."""
    from m3mlx.layout import text_weights
    from m3mlx.plan import Footprint

    from .recipes import role_specs

    specs = role_specs(recipe, base, None, dtype)
    resident = embedding = experts = 0
    for w in text_weights(args):
        spec = specs[w.role]
        if w.fp32:
            spec = Spec("float", dtype="float32")
        elif w.kind == "vector" or not spec.quantized:
            spec = Spec("float", dtype=spec.dtype or dtype)
        else:
            spec, _ = _effective(spec, w.shape[-1], dtype)
            spec = spec if spec.quantized else Spec("float", dtype=spec.dtype or dtype)
        nbytes = sum(t.nbytes for t in _out_tensors(w.name, w.kind, spec, w.shape, (), dtype))
        if w.kind == "expert":
            experts += nbytes
            continue
        if w.role == "embed":
            embedding += nbytes
        resident += nbytes
    E, moe_layers = args.num_local_experts, sum(args.moe_layers)
    return Footprint(args, resident, experts // max(1, E * moe_layers), moe_layers, E,
                     FLOAT_BYTES[dtype], embedding, True, f"converted with recipe {recipe}, "
                     f"experts {base}")
