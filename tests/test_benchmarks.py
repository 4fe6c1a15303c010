"""The benchmark scripts the README shows run end to end (tiny sizes; no timing is asserted)."""

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def run(script, *args):
    r = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_msa_benchmark_compares_both_implementations():
    out = run("bench_msa.py", "--contexts", "160,300", "--layers", "1", "--hidden", "64",
              "--steps", "1", "--prefill-step", "128")
    assert "m3mlx" in out and "mlx-lm" in out and "decode-step growth 160->300" in out


def test_convert_benchmark_compares_both_converters(tmp_path):
    out = run("bench_convert.py", "--gb", "0.02", "--repeat", "1", "--dir", str(tmp_path))
    assert "m3mlx" in out and "mlx_lm" in out.replace("mlx-lm", "mlx_lm")


def test_serve_benchmark_runs_all_three_servers():
    out = run("bench_serve.py", "--turns", "2", "--system-tokens", "50", "--turn-tokens", "30",
              "--decode-tokens", "12", "--repeat", "1")
    assert "cached/uncached" in out and "restart/uncached" in out
    assert "median of paired ratios" in out


def test_kernel_cost_report_covers_every_kernel_and_chip():
    out = run("kernel_costs.py", "--contexts", "8192,65536", "--moe-formats", "affine3,nvfp4",
              "--moe-tokens", "1,8")
    for name in ("msa_index_scores", "msa_index_scores_mma", "msa_index_select",
                 "msa_decode_attention", "msa_decode_merge", "msa_prefill_attention",
                 "moe_decode_gate_up", "moe_decode_down", "M3 Ultra", "M4 Max", "M5 Max", "64K"):
        assert name in out, name
    assert "(bandwidth)" in out and "(compute)" in out and "(latency)" in out


def test_web_render_benchmark_measures_both_ways():
    from test_web_chat import chromium

    out = run("bench_web_render.py", "--sizes", "2,20", "--chromium", chromium())
    rows = [line.split() for line in out.splitlines()[1:]]
    assert [r[0] for r in rows] == ["308", "3,080"]
    assert all(float(ms) > 0 for row in rows for ms in row[1:])


def test_expert_benchmark_covers_policies_sizes_and_the_m3_prediction(tmp_path):
    out = run("bench_experts.py", "--shares", "25,100", "--policies", "lru,pinned", "--tokens",
              "8", "--calibration", "100", "--gb", "0.005", "--width", "64", "--experts", "16",
              "--speed-tokens", "2", "--dir", str(tmp_path))
    for text in ("1. hit rates", "RANDOM weights", "25% (8 slots) pinned", "2. speed", "resident",
                 "100% lru O_DIRECT", "25% lru page cache", "no prefetch", "resident (again)",
                 "3. M3 (recipe m3)", "3-bit", "MacBook Pro M5 Max, 128 GB",
                 "Mac mini M4 Pro, 64 GB"):
        assert text in out, text


def test_distributed_benchmark_measures_both_plans_and_predicts_m3():
    out = run("bench_distributed.py", "--hidden", "64", "--prompt", "32", "--prefill-step", "16",
              "--steps", "2", "--kv-memory", "64KB")
    for name in ("single", "tensor", "pipeline", "2 all_sum", "all_gather", "JACCL",
                 "4 x M3 Ultra", "tok/s", "K/V tier of 64KB per process",
                 "blocks read back per token"):
        assert name in out, name


def test_kv_benchmark_measures_every_policy_on_the_trained_model():
    from m3mlx.kv_tier import POLICIES
    out = run("bench_kv.py", "--trained", "--policy-contexts", "512", "--policy-steps", "16")
    assert "trained on 512-token windows" in out and "blocks read/step" in out
    for name in POLICIES:
        assert f"trained tiny M3, 512 tokens, {name}), SSD" in out
    assert "random index weights" not in out
