"""Check a converted directory against what its own config.json implies.

Independent of the plan that wrote it: the expected tensors come from `text_config` (shapes) and
the `quantization` block (which modules are packed, how), the actual ones from the shard
headers. Every expected tensor must be present with its shape and dtype, nothing else may be,
and every file must hold all the bytes its header promises.
"""

from pathlib import Path
from typing import Dict, Optional

from m3mlx.checkpoint import FLOAT_DTYPES, INDEX_FILE, read_header, read_index, read_json
from m3mlx.config import ModelArgs, check_quantization
from m3mlx.errors import reported_as
from m3mlx.layout import text_weights

from .errors import ConvertError
from .recipes import FP_MODES

CONVERSION_KEY = "m3mlx_conversion"
REDO = "convert again with --force"  # the advice for a damaged output


def expected_tensors(config: dict) -> Dict[str, tuple]:
    """name -> (allowed dtypes, shape) for the output of a conversion with this config."""
    with reported_as(ConvertError):
        args = ModelArgs.from_config(config)
        check_quantization(config)
    mtp_layers = (config.get(CONVERSION_KEY) or {}).get("mtp_layers", 0)
    if not isinstance(mtp_layers, int) or not 0 <= mtp_layers <= 64:
        raise ConvertError(f"config.json: {CONVERSION_KEY}.mtp_layers is {str(mtp_layers)[:20]}; "
                           "it must be a small non-negative integer")
    quant = config.get("quantization")
    out: Dict[str, tuple] = {}
    stacked: Dict[str, list] = {}
    for w in text_weights(args, mtp_layers):
        if w.kind == "expert":
            stacked.setdefault(w.module, []).append(w)
            continue
        _expect(out, w.module or w.name, w.kind, w.shape, (), quant)
    for module, ws in stacked.items():
        _expect(out, module, "expert", ws[0].shape, (len(ws),), quant)
    return out


def _expect(out, path, kind, shape, lead, quant):
    if kind == "vector":
        out[path] = (FLOAT_DTYPES, lead + tuple(shape))
        return
    params = None
    if quant is not None:
        default = {k: quant[k] for k in ("group_size", "bits", "mode") if k in quant}
        params = quant.get(path, default)
        params = default if params is True else params
    if not params:
        out[f"{path}.weight"] = (FLOAT_DTYPES, lead + tuple(shape))
        return
    mode = params.get("mode", "affine")
    bits, group = params.get("bits", quant.get("bits")), params.get("group_size",
                                                                     quant.get("group_size"))
    rows, cols = shape
    out[f"{path}.weight"] = (("U32",), lead + (rows, cols * bits // 32))
    if mode == "affine":
        out[f"{path}.scales"] = (FLOAT_DTYPES, lead + (rows, cols // group))
        out[f"{path}.biases"] = (FLOAT_DTYPES, lead + (rows, cols // group))
    elif mode in FP_MODES:
        out[f"{path}.scales"] = (("U8",), lead + (rows, cols // group))
    else:
        raise ConvertError(f"config.json: quantization mode {mode!r} of {path} is unknown")


def verify(output, config: Optional[dict] = None) -> dict:
    """Raise ConvertError unless `output` holds exactly the tensors `config` (default: its
    config.json) implies. Returns {"tensors": n, "bytes": total tensor bytes, "files": n}."""
    output = Path(output)
    if config is None:
        file = output / "config.json"
        if not file.is_file():
            raise ConvertError(f"{output} has no config.json: the conversion did not finish; "
                               "run it again with --resume")
        with reported_as(ConvertError, advice=REDO):
            config = read_json(file)
    if not (output / INDEX_FILE).is_file():
        raise ConvertError(f"{output} has no {INDEX_FILE}: the conversion did not finish; run it "
                           "again with --resume")
    with reported_as(ConvertError, advice=REDO):
        weight_map = read_index(output)
        shards = {f: read_header(output / f) for f in sorted(set(weight_map.values()))}
    actual = {}
    for fname, shard in shards.items():
        for name, info in shard.tensors.items():
            if weight_map.get(name) != fname:
                raise ConvertError(f"{fname} holds {name}, which {INDEX_FILE} places elsewhere")
            actual[name] = info
    unlisted = set(weight_map) - set(actual)
    if unlisted:
        raise ConvertError(f"{INDEX_FILE} lists {len(unlisted)} tensor(s) no shard holds, e.g. "
                           f"{sorted(unlisted)[:3]}")
    expected = expected_tensors(config)
    missing = sorted(set(expected) - set(actual))
    extra = sorted(set(actual) - set(expected))
    if missing or extra:
        raise ConvertError(f"{output} does not match its config: missing {missing[:4]}, "
                           f"unexpected {extra[:4]}")
    for name, (dtypes, shape) in expected.items():
        info = actual[name]
        if info.dtype not in dtypes or tuple(info.shape) != tuple(shape):
            raise ConvertError(f"{name} is {info.dtype} {list(info.shape)}; the config implies "
                               f"{'/'.join(dtypes)} {list(shape)}")
    return {"tensors": len(actual), "bytes": sum(t.nbytes for t in actual.values()),
            "files": len(set(weight_map.values()))}

