"""Occupancy and cost of every Metal kernel at M3's geometry, from the launch plans: threadgroups,
threads, threadgroup memory, registers of the live per-thread arrays, the residency a GPU core
allows, DRAM bytes and multiply-adds, and for the M3 Ultra, M4 Max and M5 Max the predicted time
and what bounds it (bandwidth, compute or latency). A model (`m3mlx.metal_kernels.cost`, whose
docstring states every assumption), not a measurement: no Mac is needed to run it.

    python benchmarks/kernel_costs.py                  # the report, as text
    python benchmarks/kernel_costs.py --markdown       # the tables KERNELS.md carries
    python benchmarks/kernel_costs.py --contexts 8192,65536 --moe-tokens 4
"""

import argparse

from m3mlx.metal_kernels import cost
from m3mlx.metal_kernels.moe import MAX_TOKENS

LAYERS = 57  # M3's sparse MoE layers


def us(seconds: float) -> str:
    return f"{seconds * 1e6:,.1f}"


def mb(n: float) -> str:
    return f"{n / 1e6:,.2f}"


def context_label(context: int) -> str:
    return f"{context >> 20}M" if context >= 1 << 20 and context % (1 << 20) == 0 \
        else f"{context // 1024}K"


def plan_table(rows) -> list[str]:
    """One line per kernel variant: the parts of its plan that do not depend on the context."""
    seen, out = set(), []
    out.append("| kernel | variant | threads / threadgroup | threadgroup memory "
               "| registers (arrays) | resident threadgroups / core |")
    out.append("|---|---|---|---|---|---|")
    for label, c in rows:
        key = (c.kernel, c.threads, c.footprint)
        if key in seen:
            continue
        seen.add(key)
        out.append(f"| `{c.kernel}` | {label} | {c.threads} | "
                   f"{c.footprint.threadgroup_bytes / 1024:.1f} KB | {c.footprint.registers} | "
                   f"{c.resident(cost.CHIPS[0])} |")
    return out


def cost_table(rows, title_column: str) -> list[str]:
    chips = cost.CHIPS
    head = (f"| {title_column} | kernel | threadgroups | DRAM MB | GMAC | "
            + " | ".join(f"{c.name} µs (bound)" for c in chips) + " |")
    out = [head, "|" + "---|" * (5 + len(chips))]
    for label, c in rows:
        name = f"`{c.kernel}`" + (f", {c.shape}" if c.shape and c.shape not in label else "")
        times = " | ".join(f"{us(c.seconds(chip))} ({c.bound(chip)})" for chip in chips)
        out.append(f"| {label} | {name} | {c.threadgroups:,} | {mb(c.dram_bytes)} | "
                   f"{c.macs / 1e9:,.2f} | {times} |")
    return out


def totals_table(phases) -> list[str]:
    chips = cost.CHIPS
    out = ["| per sparse layer | " + " | ".join(f"{c.name}" for c in chips) + " |",
           "|" + "---|" * (1 + len(chips))]
    for label, launches in phases:
        times = [sum(c.seconds(chip) for c in launches) for chip in chips]
        out.append(f"| {label} | " + " | ".join(
            f"{us(t)} µs; {t * LAYERS * 1e3:,.2f} ms for {LAYERS} layers" for t in times) + " |")
    return out


def report(contexts, moe_formats, moe_tokens) -> dict:
    decode, prefill, phases = [], [], []
    for context in contexts:
        label = context_label(context)
        d, d8 = cost.msa_decode(context), cost.msa_decode(context, int8=True)
        compact = {bits: cost.msa_decode(context, int8=True, kv_bits=bits) for bits in (8, 4)}
        p = cost.msa_prefill(context)
        decode += [(label, c) for c in d] + [(label, d8[0])]
        decode += [(label, compact[bits][2]) for bits in compact]
        prefill += [(label, c) for c in p]
        prefill += [(label, cost.msa_prefill(context, kv_bits=8)[2])]
        phases.append((f"decode at {label}, bf16 index keys", d))
        phases.append((f"decode at {label}, int8 index keys", [d8[0], *d[1:]]))
        for bits, launches in compact.items():
            phases.append((f"decode at {label}, int8 index keys, {bits}-bit K/V", launches))
        phases.append((f"prefill chunk of {cost.M3['chunk']} at {label}", p))
    moe = [(f"{f[0]} {f[1]}-bit, T={t}", c) for f in moe_formats for t in moe_tokens
           for c in cost.moe_decode(f, t)]
    for f in moe_formats:
        for t in moe_tokens:
            phases.append((f"MoE {f[0]} {f[1]}-bit, {t} token(s)", cost.moe_decode(f, t)))
    variants = ([("decode" + (f", {c.shape}" if c.shape else ""), c) for _, c in decode]
                + [("prefill" + (f", {c.shape}" if c.shape else ""), c) for _, c in prefill]
                + moe)
    return {"plans": plan_table(variants),
            "decode": cost_table(decode, "context"),
            "prefill": cost_table(prefill, "context"),
            "moe": cost_table(moe, "format, tokens"),
            "totals": totals_table(phases)}


def chips_table() -> list[str]:
    out = ["| chip | bandwidth | GPU cores | FP32 | threadgroup memory | source |",
           "|---|---|---|---|---|---|"]
    for c in cost.CHIPS:
        out.append(f"| {c.name} | {c.bandwidth / 1e9:.0f} GB/s | {c.cores} | "
                   f"{c.fp32_flops / 1e12:.1f} TFLOPS | {c.threadgroup_memory // 1024} KB | "
                   f"{c.source} |")
    return out


FORMATS = {"affine4": ("affine", 4, 64), "affine3": ("affine", 3, 64),
           "affine2": ("affine", 2, 64), "mxfp4": ("mxfp4", 4, 32), "nvfp4": ("nvfp4", 4, 16),
           "affine8": ("affine", 8, 64), "mxfp8": ("mxfp8", 8, 32)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", default="8192,131072,1048576",
                    help="context lengths in tokens, comma-separated (default 8K, 128K, 1M)")
    ap.add_argument("--moe-formats", default="affine4,affine3,affine2,mxfp4,nvfp4,affine8",
                    help=f"MoE formats, comma-separated, of {', '.join(FORMATS)}")
    ap.add_argument("--moe-tokens", default="1", help=f"tokens per MoE call (1 to {MAX_TOKENS}), "
                    "comma-separated")
    ap.add_argument("--markdown", action="store_true", help="print KERNELS.md's tables")
    args = ap.parse_args()
    contexts = [int(c) for c in args.contexts.split(",")]
    formats = [FORMATS[f] for f in args.moe_formats.split(",")]
    tokens = [int(t) for t in args.moe_tokens.split(",")]
    if any(not 1 <= t <= MAX_TOKENS for t in tokens):
        ap.error(f"--moe-tokens: each must be 1 to {MAX_TOKENS}")
    tables = report(contexts, formats, tokens)
    sections = [("Chips", chips_table()), ("Plans", tables["plans"]),
                ("Decode, one sparse layer", tables["decode"]),
                (f"Prefill, one chunk of {cost.M3['chunk']} queries, one sparse layer",
                 tables["prefill"]),
                ("MoE, one layer", tables["moe"]), ("Per layer and per token", tables["totals"])]
    for title, lines in sections:
        print(f"### {title}\n" if args.markdown else f"== {title}")
        print("\n".join(lines))
        print()


if __name__ == "__main__":
    main()
