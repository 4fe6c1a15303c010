"""Measure every conversion recipe on the tiny trained M3, and choose the low-memory recipes.

    nice -n 10 benchmarks/with_openblas.sh python tools/measure_recipes.py

For each recipe (m3, uniform, mlx-lm) at each base setting the converter offers (affine 2, 3,
4, 5, 6 and 8 bits in groups of 32, 64 and 128; mxfp4, mxfp8, nvfp4), and for the named
recipes: convert the tiny M3 that ships with m3mlx, and `m3mlx eval` it against the
unquantized model on the held-out Python text at 512 and 4096 tokens of context. Then each
role's sensitivity: the KL divergence when only that role is quantized. The low-memory
recipes are chosen from those: of every assignment of a precision to each role whose size
on the real M3 fits the budget, the ones the sensitivities rank best are measured whole, and
the least KL divergence wins.

Writes convert/measured_kld.json (what `convert --dry-run` quotes) and prints the README
tables (`--tables` prints them again from the file). Sizes are the real M3's, from its plan
(m3mlx.convert.sizing).
"""

import argparse
import itertools
import json
import time
from pathlib import Path

import mlx.core as mx

import m3mlx
from m3mlx.convert import convert
from m3mlx.convert.measured import DATA_FILE, readme_tables
from m3mlx.convert.plan import role_table
from m3mlx.convert.recipes import AFFINE_BITS, AFFINE_GROUPS, FIXED_RECIPES, parse_spec
from m3mlx.convert.sizing import plan_for
from m3mlx.demo import HELDOUT_TEXT, TINY_M3_DIR
from m3mlx.eval import evaluate

CONTEXTS = {512: 16, 4096: 2}  # context -> windows: about 8K scored tokens each
INDEX_BITS = 16  # MSA index keys unquantized in both models: the divergence is the recipe's alone
BASES = ([dict(mode="affine", bits=b, group_size=g) for b in AFFINE_BITS for g in AFFINE_GROUPS]
         + [dict(mode=m) for m in ("mxfp4", "mxfp8", "nvfp4")])
# Sensitivity: each role alone at these precisions (the search below picks from them).
EXPERT_OPTIONS = ["2g32", "2g64", "2g128", "3g32", "3g64", "3g128", "4g64"]
OTHER_OPTIONS = ["3g64", "4g32", "4g64", "5g64", "6g64", "8g64", "mxfp8"]
SEARCHED_ROLES = ("attention", "shared_expert", "dense_mlp", "embed", "lm_head")
# The Mac's memory (GiB) and how much of it the weights may take: the rest is for macOS, the
# KV cache and activations (with the GPU wired limit raised, see README).
BUDGETS = {"fit-192gb": 192, "fit-128gb": 128}
WEIGHT_SHARE = 0.9
FINALISTS = 6


def label(recipe, base):
    if base.get("mode") == "affine":
        return f"{recipe} affine {base['bits']}-bit g{base['group_size']}"
    return f"{recipe} {base.get('mode', '')}".strip()


class Bench:
    def __init__(self, work: Path):
        self.work = work
        self.model_args = m3mlx.load_model(TINY_M3_DIR, lazy=True).args
        self.refs = {}
        reference, tokenizer = m3mlx.load(TINY_M3_DIR, dtype=mx.float32)
        self.tokenizer = tokenizer
        for ctx, n in CONTEXTS.items():
            path = work / f"reference-{ctx}.m3ref"
            if not path.exists():
                # Every log-probability: the KL divergences below are exact.
                evaluate(reference, tokenizer, HELDOUT_TEXT, context=ctx, samples=n,
                         save_logits=path, top_k=self.model_args.vocab_size,
                         index_bits=INDEX_BITS)
            self.refs[ctx] = path

    def measure(self, recipe="m3", roles=None, contexts=tuple(CONTEXTS), **base) -> dict:
        out = self.work / "conversion"
        result = convert(TINY_M3_DIR, out, recipe=recipe, roles=roles, force=True,
                         progress=False, log=lambda line: None, **base)
        model = m3mlx.load_model(out, dtype=mx.float32)
        quality = {}
        for ctx in contexts:
            r = evaluate(model, self.tokenizer, HELDOUT_TEXT, reference=self.refs[ctx],
                         index_bits=INDEX_BITS)
            s = r.summary()
            quality[str(ctx)] = {k: round(s[k], 6) for k in (
                "perplexity", "reference_perplexity", "kld_mean", "kld_median", "kld_p99",
                "kld_p999", "kld_max", "same_top", "rms_dp", "tokens_per_second")}
        m3 = plan_for(recipe, roles=roles, **base)
        return {
            "roles": {r["role"]: r["precision"] for r in role_table(result.plan)},
            "tiny_bpw": round(8 * result.plan.out_bytes / result.plan.params, 3),
            "m3_bytes": m3.out_bytes, "m3_bpw": round(8 * m3.out_bytes / m3.params, 3),
            "quality": quality,
        }


def role_bytes(role: str, option: str) -> float:
    """Bytes of `role` on the real M3 at `option`."""
    params = REAL_PARAMS[role]
    return params * parse_spec(option).bits_per_weight() / 8


REAL_PARAMS = {r["role"]: r["params"] for r in role_table(plan_for("m3"))}


def search(sens, budget_bytes, fixed_bytes):
    """Assignments (experts option, {role: option}) under the budget, best predicted first;
    predicted KLD = the sum of the roles' own (sensitivities roughly add at small KLD)."""
    options = {role: ["bf16"] + OTHER_OPTIONS for role in SEARCHED_ROLES}
    options["experts"] = EXPERT_OPTIONS
    roles = list(options)
    found = []
    for combo in itertools.product(*(options[r] for r in roles)):
        size = fixed_bytes + sum(role_bytes(r, o) if o != "bf16" else REAL_PARAMS[r] * 2
                                 for r, o in zip(roles, combo))
        if size <= budget_bytes:
            found.append((sum(sens[r].get(o, 0.0) for r, o in zip(roles, combo)), size,
                          dict(zip(roles, combo))))
    return sorted(found, key=lambda f: f[0])


def overall_kld(entry) -> float:
    """What the low-memory recipes minimize: the mean KLD, averaged over the contexts."""
    return sum(q["kld_mean"] for q in entry["quality"].values()) / len(entry["quality"])


def choose(entries, gib: int) -> dict:
    """The measured recipe (searched candidate or grid entry) with the least KLD that fits."""
    budget = WEIGHT_SHARE * gib * 2**30
    fits = [e for e in entries if e["m3_bytes"] <= budget and len(e["quality"]) == len(CONTEXTS)]
    best = min(fits, key=overall_kld)
    return {"budget_gib": gib, "weights_at_most_gb": round(budget / 1e9, 1),
            "chosen_from": best["name"], "roles": best["roles"], "m3_bytes": best["m3_bytes"]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/m3mlx-measure"))
    p.add_argument("--out", type=Path, default=DATA_FILE)
    p.add_argument("--named-only", action="store_true",
                   help="measure only the named recipes (FIXED_RECIPES) and replace their "
                        "entries in --out")
    p.add_argument("--tables", action="store_true",
                   help="print the README tables from --out and stop")
    args = p.parse_args(argv)
    if args.tables:
        print(readme_tables(json.loads(args.out.read_text())))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    bench = Bench(args.work)
    entries = []

    def record(name, command, **kw):
        entry = {"name": name, "command": command, **bench.measure(**kw)}
        entries.append(entry)
        q = entry["quality"]
        print(f"{name:<28} {entry['tiny_bpw']:5.2f} bpw tiny, {entry['m3_bytes'] / 1e9:6.1f} GB "
              f"M3 | " + " | ".join(f"{c}: KLD {v['kld_mean']:.5f} p99.9 {v['kld_p999']:.4f} "
                                     f"top1 {100 * v['same_top']:.2f}%" for c, v in q.items())
              + f"  [{(time.time() - t0) / 60:.1f} min]", flush=True)
        return entry

    if args.named_only:
        data = json.loads(args.out.read_text())
        data["recipes"] = [e for e in data["recipes"] if e["name"] not in FIXED_RECIPES]
        data["budgets"] = {name: choose(data["recipes"], gib) for name, gib in BUDGETS.items()}
        for name in FIXED_RECIPES:
            entry = record(name, f"--recipe {name}", recipe=name)
            if entry["roles"] != data["budgets"][name]["roles"]:
                raise SystemExit(f"{name} in convert/recipes.py is not the measured choice "
                                 f"{data['budgets'][name]}")
            data["recipes"].append(entry)
        args.out.write_text(json.dumps(data, indent=1))
        return

    # mlx-lm's recipe differs from uniform only in the router (affine 8-bit): one group size.
    grid = [("m3", b) for b in BASES] + [("uniform", b) for b in BASES] + [
        ("mlx-lm", b) for b in BASES if b.get("group_size", 64) == 64]
    for recipe, base in grid:
        opts = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in base.items())
        record(label(recipe, base), f"--recipe {recipe} {opts}", recipe=recipe, **base)

    # Sensitivity: only one role quantized, everything else as the release stores it.
    sens = {"experts": {}, **{r: {} for r in SEARCHED_ROLES}}
    sensitivity = []
    for role, options in [("experts", EXPERT_OPTIONS)] + [(r, OTHER_OPTIONS)
                                                          for r in SEARCHED_ROLES] + \
            [("index", ["4g64", "8g64"]), ("router", ["8g64"])]:
        for option in options:
            m = bench.measure(recipe="uniform", mode="none", roles={role: option},
                              contexts=(512,))
            kld = m["quality"]["512"]["kld_mean"]
            sens.setdefault(role, {})[option] = kld
            sensitivity.append({"role": role, "precision": option,
                                "kld_mean_512": kld,
                                "same_top_512": m["quality"]["512"]["same_top"],
                                "m3_role_gb": round(role_bytes(role, option) / 1e9, 2)})
            print(f"sensitivity {role:<14} {option:<6} KLD {kld:.5f}", flush=True)

    # Low-memory recipes: the best predicted assignments that fit, measured whole.
    fixed = sum(REAL_PARAMS[r] * (4 if r in ("router", "correction_bias") else 2)
                for r in REAL_PARAMS if r not in SEARCHED_ROLES and r != "experts")
    chosen = {}
    for name, gib in BUDGETS.items():
        for predicted, _, combo in search(sens, WEIGHT_SHARE * gib * 2**30, fixed)[:FINALISTS]:
            roles = {r: o for r, o in combo.items() if o != "bf16"}
            e = record(f"{name} candidate", "--recipe uniform --mode none " + " ".join(
                f"--role {r}={o}" for r, o in roles.items()), recipe="uniform", mode="none",
                roles=roles)
            e["predicted_kld_512"] = round(predicted, 6)
        chosen[name] = choose(entries, gib)
        print(f"{name}: {chosen[name]}", flush=True)
    for name in FIXED_RECIPES:  # the named recipes as shipped, under their names
        record(name, f"--recipe {name}", recipe=name)

    args.out.write_text(json.dumps({
        "model": "tiny M3 (m3mlx/data/tiny-m3, tools/train_tiny_m3.py), unquantized reference",
        "data": "m3mlx/data/python-heldout.txt",
        "windows": {str(c): n for c, n in CONTEXTS.items()}, "index_bits": INDEX_BITS,
        "budgets": chosen, "recipes": entries, "sensitivity": sensitivity,
        "minutes": round((time.time() - t0) / 60, 1),
    }, indent=1))
    print(readme_tables(json.loads(args.out.read_text())))
    print(f"wrote {args.out} in {(time.time() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
