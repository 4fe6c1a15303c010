"""--kv-bits, --kv-memory and --kv-cache-dir on `m3mlx generate` and `m3mlx chat`."""

import mlx.core as mx
import pytest
from click.testing import CliRunner

from m3mlx.cli.main import cli
from m3mlx.demo import write_demo_checkpoint

PROMPT = "The quick brown fox jumps over the lazy dog. " * 12  # past MSA's dense range


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The demo checkpoint with head_dim 32, the smallest compact K/V takes."""
    return write_demo_checkpoint(tmp_path_factory.mktemp("kv-cli"), dtype=mx.float32,
                                 head_dim=32, rotary_dim=16)


def run(*args, input=None):
    return CliRunner().invoke(cli, [str(a) for a in args], input=input)


def text_of(result) -> str:
    assert result.exit_code == 0, result.output
    return result.output.split("Prompt:")[0]


def test_generate_with_compact_and_tiered_kv(model_dir, tmp_path):
    base = ["generate", "--model", model_dir, "--prompt", PROMPT, "-m", "12", "--dtype",
            "float32", "--prefill-step-size", "48"]
    compact = text_of(run(*base, "--kv-bits", "8"))
    kv_dir = tmp_path / "kv"
    tiered = text_of(run(*base, "--kv-bits", "8", "--kv-memory", "24KB", "--kv-cache-dir",
                         kv_dir))
    assert tiered == compact  # the tier never changes the output
    assert kv_dir.is_dir() and not list(kv_dir.glob("*.kv"))  # the session file is gone
    assert text_of(run(*base, "--kv-bits", "4", "--index-bits", "16"))


def test_chat_with_tiered_kv(model_dir, tmp_path):
    args = ["chat", "--model", model_dir, "--temp", "0", "-m", "8", "--dtype", "float32",
            "--kv-bits", "4", "--kv-memory", "40KB", "--kv-cache-dir", tmp_path]
    r = run(*args, input="Hello there\nAnd again, a longer message this time\n")
    assert r.exit_code == 0, r.output


def error_line(result, code):
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    return result.output.strip().splitlines()[-1]


def test_kv_options_that_cannot_work_are_one_line(model_dir, demo_dir, tmp_path):
    line = error_line(run("generate", "--model", demo_dir, "--prompt", PROMPT, "--kv-bits", "8"),
                      1)
    assert "head_dim is 16, not a multiple of 32" in line and "--kv-bits 16" in line
    line = error_line(run("generate", "--model", model_dir, "--prompt", PROMPT, "--kv-memory",
                          "plenty"), 2)
    assert "Invalid value for '--kv-memory'" in line and "not a size" in line
    line = error_line(run("generate", "--model", model_dir, "--prompt", PROMPT, "--kv-bits", "5"),
                      2)
    assert "Invalid value for '--kv-bits'" in line
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    line = error_line(run("chat", "--model", model_dir, "--kv-memory", "1MB", "--kv-cache-dir",
                          blocker, input="hi\n"), 2)
    assert "Invalid value for '--kv-cache-dir'" in line and "is a file" in line
    line = error_line(run("chat", "--model", model_dir, "--kv-memory", "1MB", "--kv-cache-dir",
                          blocker / "kv", input="hi\n"), 1)
    assert f"cannot write K/V blocks in {blocker / 'kv'}" in line and "--kv-cache-dir" in line


def test_help_lists_the_kv_options():
    for command in ("generate", "chat"):
        r = run(command, "--help")
        for option in ("--kv-bits", "--kv-memory", "--kv-cache-dir", "--index-bits"):
            assert option in r.output, (command, option)
