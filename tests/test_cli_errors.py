"""The error boundary every `m3mlx` command runs in: bad options and inputs get one line and an
exit status, never a traceback; Ctrl-C exits with 130; a bug says where to report it."""

import errno
import os
import signal
import subprocess
import sys
import time

import click
import mlx.core as mx
import pytest
from click.testing import CliRunner

from m3mlx.cli.errors import DEBUG_ENV, EXIT_BUG, EXIT_INTERRUPTED
from m3mlx.cli.main import cli
from m3mlx.demo import write_demo_checkpoint

PROMPT = "Hello world " * 4


def run(*args, input=None, env=None):
    return CliRunner().invoke(cli, [str(a) for a in args], input=input, env=env)


def one_error(result, code=1):
    """The exit status is `code` and the output ends in one error line, with no traceback."""
    text = result.output
    assert result.exit_code == code, text
    assert "Traceback" not in text and not isinstance(result.exception, (ValueError, TypeError))
    lines = text.strip().splitlines()
    assert lines and lines[-1].startswith("Error: "), text
    return lines[-1]


@pytest.mark.parametrize("option,value,message", [
    ("--top-p", "nan", "'nan' is not a finite number"),
    ("--min-p", "nan", "'nan' is not a finite number"),
    ("--temp", "nan", "'nan' is not a finite number"),
    ("--temp", "inf", "'inf' is not a finite number"),
    ("--repetition-penalty", "nan", "'nan' is not a finite number"),
    ("--top-p", "5", "5.0 is not in the range 0<x<=1"),
    ("--seed", "-1", "-1 is not in the range 0<=x<=18446744073709551615"),
    ("--seed", str(2**70), "is not in the range 0<=x<=18446744073709551615"),
    ("--max-tokens", "-3", "-3 is not in the range x>=0"),
    ("--prefill-step-size", "0", "0 is not in the range x>=1"),
    ("--stop", "", "a stop string is empty"),
])
def test_bad_generation_options_are_usage_errors(demo_dir, option, value, message):
    for command in ("generate",) if option == "--stop" else ("generate", "chat"):
        extra = ["--prompt", PROMPT] if command == "generate" else []
        line = one_error(run(command, "--model", demo_dir, *extra, option, value), code=2)
        assert f"Invalid value for '{option}'" in line and message in line, line


def test_a_huge_prefill_step_works(demo_dir):
    r = run("generate", "--model", demo_dir, "--prompt", PROMPT, "-m", "3", "--dtype", "float32",
            "--prefill-step-size", str(10**12))
    assert r.exit_code == 0, r.output


def test_prompts_that_are_not_utf8(demo_dir):
    r = run("generate", "--model", demo_dir, "--prompt", "-", input=b"caf\xe9 au lait")
    line = one_error(r)
    assert line == ("Error: the prompt on stdin is not UTF-8 text (byte 0xe9 at offset 3); "
                    "convert it to UTF-8 first, e.g. with iconv")
    # argv: Python holds undecodable bytes as lone surrogates
    r = run("generate", "--model", demo_dir, "--prompt", "caf\udce9", "--dtype", "float32")
    assert one_error(r).startswith("Error: the prompt is not valid UTF-8 text")


def test_the_context_length_is_checked(tmp_path):
    short = write_demo_checkpoint(tmp_path / "short", dtype=mx.float32,
                                  max_position_embeddings=64)
    r = run("generate", "--model", short, "--prompt", "The quick brown fox. " * 40,
            "--dtype", "float32")
    line = one_error(r)
    assert "beyond the model's context of 64; shorten it" in line


def test_a_bug_says_where_to_report_and_debug_shows_the_traceback(demo_dir, monkeypatch):
    import m3mlx.info

    def broken(path):
        return {}["missing key"]

    monkeypatch.setattr(m3mlx.info, "describe", broken)
    r = run("info", demo_dir)
    assert r.exit_code == EXIT_BUG and "Traceback" not in r.output
    assert r.output.strip() == (
        "Error: internal error (KeyError: 'missing key'). This is a bug in m3mlx: please report "
        "it to the m3mlx issue tracker with the command you ran; run it again with "
        f"{DEBUG_ENV}=1 to see the traceback")
    r = run("info", demo_dir, env={DEBUG_ENV: "1"})
    assert isinstance(r.exception, KeyError)  # propagated: click shows the traceback


def test_ctrl_c_inside_a_command_exits_130(demo_dir, monkeypatch):
    import m3mlx.info

    def interrupted(path):
        raise KeyboardInterrupt

    monkeypatch.setattr(m3mlx.info, "describe", interrupted)
    r = run("info", demo_dir)
    assert r.exit_code == EXIT_INTERRUPTED and r.output.strip() == "interrupted"


def test_commands_added_later_get_the_boundary_too(tmp_path):
    @cli.command("fails-for-test")
    def fails():
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / "x"))

    @click.command("plain-click-command")
    def plain():
        raise MemoryError

    cli.add_command(plain)
    try:
        assert one_error(run("fails-for-test")) == (
            f"Error: {tmp_path / 'x'}: it is on a read-only file system: write somewhere else")
        assert "out of memory" in one_error(run("plain-click-command"))
    finally:
        cli.commands.pop("fails-for-test")
        cli.commands.pop("plain-click-command")


def test_demo_write_errors_are_one_line_and_leave_nothing(tmp_path, monkeypatch):
    import m3mlx.demo

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(m3mlx.demo.shutil, "copyfile", full)  # copying the tiny trained M3
    line = one_error(run("demo", "--dir", tmp_path / "demo"))
    assert line == "Error: the disk is full: free some space and run the command again"
    assert list((tmp_path / "demo").iterdir()) == []  # no half-written checkpoint, no staging
    monkeypatch.undo()

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / "demo"))

    monkeypatch.setattr(m3mlx.demo.tempfile, "mkdtemp", read_only)
    line = one_error(run("demo", "--dir", tmp_path / "demo"))
    assert line == f"Error: {tmp_path / 'demo'}: it is on a read-only file system: write " \
                   "somewhere else"


def test_sigint_during_start_up_exits_130_without_a_traceback(tmp_path):
    """Ctrl-C while the model loads (the slow part of start-up)."""
    from test_chat_cli import Terminal

    model = write_demo_checkpoint(tmp_path / "m", dtype=mx.float32)
    argv = [sys.executable, "-m", "m3mlx.cli.main", "chat", "--model", str(model)]
    term = Terminal(argv, {**os.environ, "TERM": "xterm", "M3MLX_HOME": str(tmp_path)})
    term.expect("Loading")
    os.kill(term.pid, signal.SIGINT)
    assert term.wait() == EXIT_INTERRUPTED
    assert "interrupted" in term.output and "Traceback" not in term.output


def test_sigint_while_generating_exits_130(demo_dir):
    proc = subprocess.Popen([sys.executable, "-m", "m3mlx.cli.main", "generate", "--model",
                             str(demo_dir), "--prompt", PROMPT, "-m", "100000", "--dtype",
                             "float32"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    os.read(proc.stdout.fileno(), 1)  # it is generating
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_INTERRUPTED
    assert err.decode().strip() == "interrupted"


def test_chat_whole_input_that_is_not_utf8(demo_dir):
    r = run("chat", "--model", demo_dir, "--input", "whole", "--dtype", "float32",
            input=b"ok\n\xc3\x28 broken\n")
    assert one_error(r) == ("Error: the message on stdin is not UTF-8 text (byte 0xc3 at offset "
                            "3); convert it to UTF-8 first, e.g. with iconv")
    r = run("chat", "--model", demo_dir, "--system", "caf\udce9", "--dtype", "float32",
            input="hi\n")
    assert one_error(r).startswith("Error: the system prompt is not valid UTF-8 text")
