"""The cost model's inputs are the plans' real footprints, and KERNELS.md carries its tables."""

import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from msl import cases, harness, shapes

from m3mlx.metal_kernels import cost, moe
from m3mlx.metal_kernels import msa_kernels as K

ROOT = Path(__file__).resolve().parent.parent


def footprint(spec, launch):
    """The planner's footprint for a launch, by kernel."""
    t = dict(launch.template)
    if spec is K.INDEX_SCORES:
        return K.index_scores_footprint(t["H"], t["D"])
    if spec is K.INDEX_SCORES_MMA:
        return K.index_scores_mma_footprint(t["D"])
    if spec is K.INDEX_SELECT:
        return K.index_select_footprint(t["TOPK"], launch.threadgroup[0])
    if spec is K.DECODE_ATTENTION:
        return K.decode_attention_footprint(t["G"], t["D"], t["DV"], t["KV_BITS"])
    if spec is K.DECODE_MERGE:
        return K.Footprint(0, 0)
    if spec is K.PREFILL_ATTENTION:
        return K.prefill_attention_footprint(t["G"], t["D"], t["DV"], t["TOPK"], t["PAGED"])
    bits = (t["RBITS"], t["SBITS"])
    if spec is moe.GATE_UP:
        return moe.gate_up_footprint(t["MAXT"], bits)
    return moe.down_footprint(t["MAXT"], bits)


def real_inputs(launch, rng):
    """The launch with its stand-in inputs replaced by data (ids within range)."""
    out = []
    for x in launch.inputs:
        if not isinstance(x, mx.array):
            out.append(x)
        elif x.dtype in (mx.uint32, mx.int32, mx.uint8, mx.int8):
            out.append(mx.array(rng.integers(0, 8, x.shape).astype(harness.NP_STORAGE[x.dtype])))
        else:
            out.append(cases.normal(rng, x.shape, x.dtype))
    return K.Launch(out, launch.output_shapes, launch.output_dtypes, launch.grid,
                    launch.threadgroup, launch.template, launch.init_value)


LAUNCHES = [
    *shapes.msa_launches(1, 1, 16, 128, 128, 128, 16, 2595, 1, 2, mx.bfloat16),  # M3, decode
    *shapes.msa_launches(1, 1, 16, 128, 128, 128, 16, 2590, 6, 0, mx.float32, int8=True),
    *shapes.index_launches(1, 1, 8, 4, 6, 1101, 1, 0),  # the 8-simdgroup selection
    *shapes.moe_launches(("affine", 3, 32), 1, 8, 512, 128, 64, 2, dtype=mx.float32),
    *shapes.moe_launches(("mxfp8", 8, 32), 3, 8, 512, 128, 64, 2, dtype=mx.float32),
]


@cases.harness_only
@pytest.mark.parametrize("spec,launch", LAUNCHES, ids=lambda x: getattr(x, "name", ""))
def test_planner_footprints_are_what_the_kernels_allocate(spec, launch):
    launch = real_inputs(launch, np.random.default_rng(0))
    _, stats = harness.run_with_stats(spec, launch)
    assert stats.threadgroup_bytes == footprint(spec, launch).threadgroup_bytes


def test_the_model_counts_m3s_launches():
    """The cost model on M3's geometry (no kernel runs): the plans' threadgroup counts, and
    bytes that follow the context where they should."""
    decode = {c.kernel: c for c in cost.msa_decode(131072)}
    assert decode["msa_decode_attention"].threadgroups == 4 * 16 * 4  # KV heads x slots x parts
    assert decode["msa_index_scores"].threadgroups == 1024  # one per key block
    far = {c.kernel: c for c in cost.msa_decode(1 << 20)}
    assert far["msa_decode_attention"].dram_bytes == decode["msa_decode_attention"].dram_bytes
    assert far["msa_index_scores"].dram_bytes > 7.9 * decode["msa_index_scores"].dram_bytes
    up, down = cost.moe_decode(("affine", 4, 64), 1)
    assert up.dram_bytes + down.dram_bytes == pytest.approx(159.4e6, rel=0.01)  # MOE_KERNEL.md
    for chip in cost.CHIPS:
        assert up.bound(chip) == "bandwidth" and up.seconds(chip) > up.floors(chip)["bandwidth"]


def test_kernels_md_carries_the_current_cost_tables():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_costs.py"),
                          "--markdown"], capture_output=True, text=True, check=True).stdout
    doc = (ROOT / "metal_kernels" / "KERNELS.md").read_text()
    begin = "<!-- kernel_costs.py --markdown: begin -->\n"
    end = "<!-- kernel_costs.py --markdown: end -->"
    assert doc[doc.index(begin) + len(begin):doc.index(end)] == out, (
        "KERNELS.md's cost tables are stale: regenerate them with "
        "`python benchmarks/kernel_costs.py --markdown`")
