"""Recipes chosen by measurement: the shipped measurements (convert/measured_kld.json, from
tools/measure_recipes.py), the low-memory recipes they chose, and the dry run quoting them."""

from pathlib import Path

import pytest

from m3mlx.convert import ConvertError, convert
from m3mlx.convert.measured import measurements, readme_tables
from m3mlx.convert.recipes import FIXED_RECIPES, RECIPES
from m3mlx.convert.sizing import plan_for
from m3mlx.demo import TINY_M3_DIR

DATA = measurements()


def overall(entry):
    return sum(q["kld_mean"] for q in entry["quality"].values()) / len(entry["quality"])


def test_every_recipe_and_base_setting_was_measured_at_both_contexts():
    names = {e["name"] for e in DATA["recipes"]}
    for bits in (2, 3, 4, 5, 6, 8):
        for group in (32, 64, 128):
            assert f"m3 affine {bits}-bit g{group}" in names
            assert f"uniform affine {bits}-bit g{group}" in names
    for mode in ("mxfp4", "mxfp8", "nvfp4"):
        assert {f"m3 {mode}", f"uniform {mode}", f"mlx-lm {mode}"} <= names
    assert set(FIXED_RECIPES) <= names
    for e in DATA["recipes"]:
        assert set(e["quality"]) == {"512", "4096"}, e["name"]
    # More bits, less divergence: the measurements are not noise.
    kld = {e["name"]: e["quality"]["512"]["kld_mean"] for e in DATA["recipes"]}
    assert kld["m3 affine 8-bit g64"] < kld["m3 affine 4-bit g64"] < kld["m3 affine 2-bit g64"]
    roles = {s["role"] for s in DATA["sensitivity"]}
    assert {"experts", "attention", "shared_expert", "dense_mlp", "embed", "lm_head"} <= roles


@pytest.mark.parametrize("name", sorted(FIXED_RECIPES))
def test_low_memory_recipes_fit_with_the_least_measured_divergence(name):
    budget = DATA["budgets"][name]
    plan = plan_for(name)  # the real M3's geometry
    assert plan.out_bytes == budget["m3_bytes"]
    assert plan.out_bytes <= 0.9 * budget["budget_gib"] * 2**30
    fits = [e for e in DATA["recipes"] if e["m3_bytes"] <= 0.9 * budget["budget_gib"] * 2**30]
    entry = next(e for e in DATA["recipes"] if e["name"] == name)
    assert overall(entry) == pytest.approx(min(overall(e) for e in fits), rel=0.02)
    # The recipe measured under its name is the one the search chose.
    assert entry["roles"] == budget["roles"]


def test_the_dry_run_quotes_the_measured_divergence(tmp_path):
    lines = []
    convert(TINY_M3_DIR, tmp_path / "out", dry_run=True, progress=False, log=lines.append)
    entry = next(e for e in DATA["recipes"] if e["name"] == "m3 affine 4-bit g64")
    text = "\n".join(lines)
    assert f"mean {entry['quality']['512']['kld_mean']:.4f}" in text
    assert "tiny trained M3" in text and "at 4096 tokens" in text
    lines.clear()
    convert(TINY_M3_DIR, tmp_path / "out", dry_run=True, roles={"attention": "5g32"},
            progress=False, log=lines.append)
    assert "none for this exact recipe" in "\n".join(lines)


def test_fixed_recipes_refuse_base_options(tmp_path):
    name = sorted(FIXED_RECIPES)[0]
    assert name in RECIPES
    with pytest.raises(ConvertError, match="sets the precision of every role"):
        convert(TINY_M3_DIR, tmp_path / "out", recipe=name, bits=4, dry_run=True,
                progress=False, log=lambda s: None)


def test_the_readme_shows_the_shipped_measurements():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert readme_tables(DATA) in readme
