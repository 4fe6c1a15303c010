"""What the real M3 releases do that a tidy fixture would not: the MXFP8 release converted to mxfp8
must lose nothing, and the BF16 release's config counts MTP modules that no release ships."""

import json
import re

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

import m3mlx
from convert_fixtures import QUANT_DIMS, bf16_checkpoint, mxfp8_decode, to_mxfp8
from m3mlx.cli.main import cli
from m3mlx.convert import convert
from m3mlx.info import describe

QUIET = dict(progress=False, log=lambda s: None)
PROMPT = mx.array([[(7 * i + 3) % 300 for i in range(150)]])  # past the dense range (64)


def shards(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(mx.load(str(f)))
    return out


@pytest.fixture(scope="module")
def mxfp8_release(tmp_path_factory):
    root = tmp_path_factory.mktemp("mxfp8")
    return to_mxfp8(bf16_checkpoint(root / "bf16", **QUANT_DIMS), root / "mxfp8")


def test_mxfp8_to_mxfp8_with_the_default_recipe_loses_nothing(mxfp8_release, tmp_path):
    out = tmp_path / "out"
    lines = []
    convert(mxfp8_release, out, mode="mxfp8", progress=False, log=lines.append)
    src, got = shards(mxfp8_release), shards(out)
    copied = kept = 0
    for name, scale in src.items():
        if not name.endswith(".weight_scale_inv"):
            continue
        base = name[: -len(".weight_scale_inv")]
        m = re.match(r"(.+\.block_sparse_moe)\.experts\.(\d+)\.(w[123])$", base)
        if m:
            proj = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}[m[3]]
            path, e = f"{m[1]}.switch_mlp.{proj}", int(m[2])
            w, s = got[f"{path}.weight"][e], got[f"{path}.scales"][e]
        elif ".index_" in base:
            # The index projections are stored unquantized, with exactly their values.
            exact = mxfp8_decode(np.array(src[f"{base}.weight"]), np.array(scale))
            assert got[f"{base}.weight"].dtype == mx.bfloat16
            np.testing.assert_array_equal(np.array(got[f"{base}.weight"].astype(mx.float32)),
                                          exact)
            kept += 1
            continue
        else:
            w, s = got[f"{base}.weight"], got[f"{base}.scales"]
        assert mx.array_equal(w.view(mx.uint8), src[f"{base}.weight"]).item(), base
        assert mx.array_equal(s, scale).item(), base
        copied += 1
    assert copied > 20 and kept == 6
    # What the release keeps in BF16 (embeddings, lm_head, norms) or fp32 (router) is copied.
    for name, value in src.items():
        if name.startswith("language_model.") and f"{name[:-7]}.weight_scale_inv" not in src \
                and not name.endswith(".weight_scale_inv") and ".experts." not in name:
            assert got[name].dtype == value.dtype and mx.array_equal(got[name], value).item(), name
    text = "\n".join(lines)
    assert re.search(r"^embed .* bfloat16", text, re.M) and "float in the mxfp8 source" in text

    # So the conversion computes the source model's logits.
    source_logits = m3mlx.load_model(mxfp8_release, dtype=mx.float32)(PROMPT)
    converted_logits = m3mlx.load_model(out, dtype=mx.float32)(PROMPT)
    np.testing.assert_allclose(np.array(converted_logits), np.array(source_logits), atol=1e-3)

    # An explicit --role still gets what it asks for.
    forced = convert(mxfp8_release, tmp_path / "forced", mode="mxfp8", roles={"embed": "mxfp8"},
                     **QUIET)
    embed = [u for u in forced.plan.units if u.role == "embed"][0]
    assert embed.spec.mode == "mxfp8"


def test_info_reports_mxfp8_originals_as_mxfp8(mxfp8_release):
    info = describe(mxfp8_release)
    assert info["quantization"] == "mxfp8" and "MXFP8" in info["source"]
    assert info["roles"]["experts"]["precision"] == "mxfp8"
    assert info["roles"]["embed"]["precision"] == "bfloat16"
    r = CliRunner().invoke(cli, ["info", str(mxfp8_release)])
    assert r.exit_code == 0, r.output
    assert "quantization: mxfp8" in r.output and "none" not in r.output


def set_mtp_counts(path, **fields):
    cfg = json.loads((path / "config.json").read_text())
    cfg["text_config"].update(fields)
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("with_mtp", [False, True])
def test_mtp_layers_come_from_the_tensors_not_the_config_count(tmp_path, with_mtp):
    src = bf16_checkpoint(tmp_path / "src", with_mtp=with_mtp, dtype=mx.float32, **QUANT_DIMS)
    # The BF16 release's config: 7 MTP modules and 1 next-n layer, and no MTP tensors at all.
    set_mtp_counts(src, num_mtp_modules=7, num_nextn_predict_layers=1)
    model = m3mlx.load_model(src, dtype=mx.float32)
    assert model.has_mtp == with_mtp
    if with_mtp:
        assert len(model.language_model.model.mtp.layers) == 1
    out = tmp_path / "out"
    result = convert(src, out, **QUIET)
    assert result.plan.source.mtp_layers == (1 if with_mtp else 0)
    assert (out / "mtp.safetensors").exists() == with_mtp
    assert m3mlx.load_model(out, dtype=mx.float32).has_mtp == with_mtp
    assert describe(out)["mtp"] == with_mtp
