"""Quality measured for each recipe on the tiny trained M3 (`tools/measure_recipes.py`).

`measured_kld.json` holds, per measured recipe, its precision by role and what `m3mlx eval`
found converting the tiny M3 that ships with m3mlx with it: mean and 99.9th-percentile KL
divergence from the unquantized model and top-1 agreement at each context. A plan whose roles
have exactly those precisions gets its line in `convert --dry-run`. The tiny model's
sensitivities are not the full model's; the line says so.
"""

import json
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Optional

DATA_FILE = Path(__file__).parent / "measured_kld.json"


@lru_cache(maxsize=1)
def measurements() -> dict:
    return json.loads(DATA_FILE.read_text()) if DATA_FILE.is_file() else {"recipes": []}


def find(precisions: Dict[str, str]) -> Optional[dict]:
    """The measured recipe whose roles have these precisions (roles the tiny model lacks, MTP,
    left out), or None."""
    want = {r: p for r, p in precisions.items() if r != "mtp"}
    for entry in measurements()["recipes"]:
        if entry["roles"] == want:
            return entry
    return None


def describe(precisions: Dict[str, str]) -> str:
    entry = find(precisions)
    if entry is None:
        return ("measured KLD  none for this exact recipe on the tiny trained M3 (README, "
                "'Choosing a recipe', lists the measured ones)")
    parts = [f"mean {q['kld_mean']:.4f}, p99.9 {q['kld_p999']:.3f}, same top token "
             f"{100 * q['same_top']:.1f}% at {ctx} tokens" for ctx, q in entry["quality"].items()]
    return (f"measured KLD  {'; '.join(parts)} (on the tiny trained M3 that ships with m3mlx, "
            f"{entry['tiny_bpw']:.2f} bpw there: how this recipe ranks, not the full model's "
            "numbers)")


# The README's short table: the m3 recipe at each width, the float formats, the low-memory
# recipes and what mlx-lm makes at 4, 3 and 2 bits. The full table lists every measurement.
SHORT_TABLE = ({f"m3 affine {b}-bit g64" for b in (2, 3, 4, 5, 6, 8)}
               | {f"m3 {m}" for m in ("mxfp4", "mxfp8", "nvfp4")}
               | {f"mlx-lm affine {b}-bit g64" for b in (2, 3, 4)} | {"m3 affine 3-bit g128",
               "m3 affine 2-bit g128", "fit-192gb", "fit-128gb"})


def _recipe_rows(entries) -> List[str]:
    rows = ["| recipe | bits/weight (tiny) | real M3 GB | bits/weight (M3) | KLD mean 512 | "
            "KLD p99.9 512 | same top 512 | KLD mean 4096 | KLD p99.9 4096 | same top 4096 |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for e in sorted(entries, key=lambda e: -e["m3_bytes"]):
        q = e["quality"]
        name = f"**{e['name']}**" if e["name"].startswith("fit-") else e["name"]
        rows.append(f"| {name} | {e['tiny_bpw']:.2f} | {e['m3_bytes'] / 1e9:.1f} | "
                    f"{e['m3_bpw']:.2f} | " + " | ".join(
                        f"{q[c]['kld_mean']:.5f} | {q[c]['kld_p999']:.4f} | "
                        f"{100 * q[c]['same_top']:.2f}%" for c in ("512", "4096")) + " |")
    return rows


def readme_tables(data: dict) -> str:
    """The README's recipe tables (short, then every measured recipe inside a <details>) and
    role sensitivity table, from measured_kld.json's contents."""
    named = [e for e in data["recipes"] if not e["name"].endswith("candidate")]
    short = _recipe_rows([e for e in named if e["name"] in SHORT_TABLE])
    full = _recipe_rows(named)
    options = []
    for x in data["sensitivity"]:
        if x["precision"] not in options:
            options.append(x["precision"])
    options.sort(key=lambda o: (o.startswith("mx"), int(o[0]) if o[0].isdigit() else 0,
                                int(o[2:]) if o[1:2] == "g" else 0))
    by_role: Dict[str, Dict[str, float]] = {}
    for x in data["sensitivity"]:
        by_role.setdefault(x["role"], {})[x["precision"]] = x["kld_mean_512"]
    sens = ["| role alone | " + " | ".join(options) + " |", "|---|" + "---|" * len(options)]
    for role, vals in by_role.items():
        sens.append(f"| {role} | " + " | ".join(f"{vals[o]:.5f}" if o in vals else ""
                                                for o in options) + " |")
    return "\n".join(short + ["", "<details><summary>Every measured recipe ("
                              f"{len(named)})</summary>", ""] + full
                     + ["", "</details>", ""] + sens)
