"""The `m3mlx` command end to end: generate, info, demo."""

import json
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from m3mlx.cli.main import cli


def run(*args, input=None):
    return CliRunner().invoke(cli, list(args), input=input)


def test_generate_streams_text_and_ends_with_stats(demo_dir):
    r = run("generate", "--model", str(demo_dir), "--prompt", "Hello world " * 10,
            "--max-tokens", "8", "--dtype", "float32")
    assert r.exit_code == 0, r.output
    assert "Generation: 8 tokens" in r.output and "Peak memory" in r.output


def test_generate_reads_the_prompt_from_stdin_and_samples(demo_dir):
    args = ["generate", "--model", str(demo_dir), "--prompt", "-", "-m", "6", "--temp", "0.8",
            "--top-p", "0.9", "--top-k", "20", "--min-p", "0.01", "--repetition-penalty", "1.1",
            "--seed", "3", "--index-bits", "8", "--prefill-step-size", "16", "--dtype", "float32"]
    a, b = run(*args, input="Once upon a time " * 8), run(*args, input="Once upon a time " * 8)
    assert a.exit_code == 0, a.output
    assert "Generation: 6 tokens" in a.output
    assert a.output.split("Prompt:")[0] == b.output.split("Prompt:")[0]  # same seed, same text


def test_generate_reports_bad_models_without_a_traceback(tmp_path):
    r = run("generate", "--model", str(tmp_path), "--prompt", "hi")
    assert r.exit_code == 1 and "no config.json" in r.output and "Traceback" not in r.output


def test_info_describes_layers_parameters_and_bytes(demo_dir):
    r = run("info", str(demo_dir))
    assert r.exit_code == 0, r.output
    assert "0: dense attention + dense MLP" in r.output and "1-3: MSA + MoE" in r.output
    assert "active per token" in r.output and "on disk" in r.output


def test_console_script_demo_runs_end_to_end(tmp_path):
    script = Path(sys.executable).parent / "m3mlx"  # the installed console script
    r = subprocess.run([str(script), "demo", "--dir", str(tmp_path / "demo"), "-m", "4"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Generation: 4 tokens" in r.stdout
    assert (tmp_path / "demo" / "hf" / "config.json").exists()  # the Hugging Face checkpoint
    assert '"bits": 4' in (tmp_path / "demo" / "mlx-4bit" / "config.json").read_text()
    # The command the demo suggests next: the 4-bit model against the checkpoint it came from.
    r = run("eval", "--model", str(tmp_path / "demo" / "mlx-4bit"), "--reference",
            str(tmp_path / "demo" / "hf"), "--samples", "2", "--dtype", "float32", "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output.strip().splitlines()[-1])
    assert 0 < summary["kld_mean"] < 0.05 and summary["same_top"] > 0.9
