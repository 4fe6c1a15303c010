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
from typing import Dict, Optional

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
