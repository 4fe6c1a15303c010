"""Check a converted directory against what its own config.json implies.

Independent of the plan that wrote it: the expected tensors come from `text_config` (shapes) and
the `quantization` block (which modules are packed, how), the actual ones from the shard
headers. Every expected tensor must be present with its shape and dtype, nothing else may be,
and every file must hold all the bytes its header promises.
"""

import json
from pathlib import Path
from typing import Dict, Optional

from m3mlx.config import ConfigError, ModelArgs

from .errors import ConvertError
from m3mlx.layout import text_weights
from .recipes import FP_MODES
from .safetensors_io import FLOAT_DTYPES, read_header
from .source import INDEX_FILE

CONVERSION_KEY = "m3mlx_conversion"


def expected_tensors(config: dict) -> Dict[str, tuple]:
    """name -> (allowed dtypes, shape) for the output of a conversion with this config."""
    try:
        args = ModelArgs.from_config(config)
    except ConfigError as e:
        raise ConvertError(f"config.json: {e}") from None
    mtp_layers = int((config.get(CONVERSION_KEY) or {}).get("mtp_layers", 0))
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
    if not params:
        out[f"{path}.weight"] = (FLOAT_DTYPES, lead + tuple(shape))
        return
    mode = params.get("mode", "affine")
    bits, group = params["bits"], params["group_size"]
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
        config = _json_object(file)
    index_file = output / INDEX_FILE
    if not index_file.is_file():
        raise ConvertError(f"{output} has no {INDEX_FILE}: the conversion did not finish; run it "
                           "again with --resume")
    weight_map = _json_object(index_file).get("weight_map")
    if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and Path(v).name == v and v.endswith(
                ".safetensors") for k, v in weight_map.items()):
        raise ConvertError(f"{index_file}: weight_map must map tensor names to shard file names "
                           "in the same directory; convert again with --force")
    actual = {}
    for fname in sorted(set(weight_map.values())):
        tensors, _ = read_header(output / fname)
        for name, info in tensors.items():
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


def _json_object(file: Path) -> dict:
    try:
        value = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ConvertError(f"{file} is not valid JSON ({e}); convert again with --force") from None
    if not isinstance(value, dict):
        raise ConvertError(f"{file} is not a JSON object; convert again with --force")
    return value
