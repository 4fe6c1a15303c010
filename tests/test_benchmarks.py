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
