"""`m3mlx chat` end to end: in a pseudo-terminal, and with stdin piped."""

import os
import pty
import re
import select
import subprocess
import sys
import time

import mlx.core as mx
import pytest

import m3mlx
from m3mlx.chat import ChatSession
from m3mlx.reply_parser import ReplyDelta, ToolCall
from m3mlx.cli.chat import Console, stream_reply
from m3mlx.demo import write_demo_checkpoint

ANSI = re.compile(r"\x1b\[[0-9;?]*[a-zA-Z]")
# Greedy, and long enough that a reply is still running when Ctrl-C arrives (the greedy
# replies of the seeded demo model to this conversation do not end early).
ARGS = ["--temp", "0", "--max-tokens", "150", "--dtype", "float32"]


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    return write_demo_checkpoint(tmp_path_factory.mktemp("cli"), dtype=mx.float32)


def command(chat_dir, *extra):
    return [sys.executable, "-m", "m3mlx.cli.main", "chat", "--model", str(chat_dir), *ARGS, *extra]


class Terminal:
    """A child process on a pseudo-terminal, read with a deadline."""

    def __init__(self, argv, env):
        pid, fd = pty.fork()
        if pid == 0:  # the child: its stdin/stdout/stderr are the terminal
            try:
                os.execve(argv[0], argv, env)
            finally:
                os._exit(127)
        self.pid, self.fd = pid, fd
        self.output = ""
        self.seen = 0  # output before this index has been matched

    def read(self, timeout: float) -> str:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return ""
        try:
            data = os.read(self.fd, 4096).decode("utf-8", "replace")
        except OSError:  # the child closed the terminal
            return ""
        self.output += data
        return data

    @property
    def pending(self) -> str:
        """Output not yet matched."""
        return self.output[self.seen:]

    def shows(self, text: str, timeout: float) -> bool:
        """Wait up to `timeout` seconds for `text` after what was matched before."""
        deadline = time.monotonic() + timeout
        while text not in self.output[self.seen:]:
            if time.monotonic() > deadline:
                return False
            self.read(0.05)
        return True

    def expect(self, text: str, timeout: float = 60) -> str:
        """Wait for `text` after what was matched before; returns the output up to it."""
        if not self.shows(text, timeout):
            raise AssertionError(f"{text!r} not shown; the terminal showed:\n{self.pending}")
        end = self.output.index(text, self.seen) + len(text)
        before, self.seen = self.output[self.seen:end], end
        return before

    def wait_for_text(self, timeout: float = 60):
        """Wait for printable output (not just terminal escapes) after what was matched."""
        deadline = time.monotonic() + timeout
        while not ANSI.sub("", self.output[self.seen:]).strip():
            if time.monotonic() > deadline:
                raise AssertionError(f"nothing printed; the terminal showed:\n{self.pending}")
            self.read(0.05)

    def send(self, text: str):
        os.write(self.fd, text.encode())

    def wait(self, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.read(0.1)
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status)
        os.kill(self.pid, 9)
        raise AssertionError(f"the chat did not exit; it showed:\n{self.pending}")


def test_chat_in_a_terminal(chat_dir, tmp_path):
    env = {**os.environ, "TERM": "xterm", "M3MLX_HOME": str(tmp_path)}
    env.pop("NO_COLOR", None)
    term = Terminal(command(chat_dir, "--thinking", "enabled"), env)
    term.expect("/help for commands")
    term.expect(">>> ")

    term.send("Hello there\r")
    reply = term.expect("[context ")  # the status line closes each reply
    assert "\x1b[2m" in reply  # thinking enabled: the reply is reasoning, shown dimmed
    status = term.expect("\n")
    assert "/1,048,576 tokens | " in status and "tok/s" in status and "GB peak]" in status
    term.expect(">>> ")

    term.send("/think off\r")
    term.expect("thinking: disabled")
    term.send("What next?\r")
    reply = term.expect("[context ")
    assert "\x1b[2m" not in reply.split("What next?")[-1].rsplit("\x1b[2m[context", 1)[0]
    term.expect(">>> ")

    term.send("Tell me a long story\r")
    term.expect("Tell me a long story\r\n")
    term.wait_for_text()  # the reply has started printing
    term.send("\x03")
    term.expect("[interrupted]")
    term.expect(">>> ")  # still in the chat

    term.send('"""\r')
    term.send("line one\r")
    term.send("line two\\\r")
    term.send("line three\r")
    term.send('"""\r')
    term.expect("[context ")
    term.expect(">>> ")

    term.send("/stats\r")
    stats = term.expect(">>> ")
    assert "messages: 8, thinking: disabled" in stats
    assert "(interrupted)" not in stats and re.search(r"\((stop|length)\)", stats)

    saved = tmp_path / "chat.safetensors"
    term.send(f"/save {saved}\r")
    term.expect("saved 8 messages")
    term.send("/quit\r")
    assert term.wait() == 0

    model, tokenizer = m3mlx.load(chat_dir, dtype=mx.float32)
    session = ChatSession.load(saved, model, tokenizer)
    assert session.thinking == "disabled"
    assert [m["content"] for m in session.messages if m["role"] == "user"] == [
        "Hello there", "What next?", "Tell me a long story", "line one\nline two\\\nline three"]
    interrupted = session.messages[5]
    assert interrupted["role"] == "assistant" and interrupted["content"]
    assert (tmp_path / "chat_history").exists()


def test_ctrl_c_at_the_prompt_and_eof(chat_dir, tmp_path):
    env = {**os.environ, "TERM": "xterm", "M3MLX_HOME": str(tmp_path)}
    term = Terminal(command(chat_dir), env)
    term.expect(">>> ")
    term.send("half a line")
    term.expect("half a line")  # typed, then Ctrl-C clears it
    # readline notices a signal only while it waits for a key; one that arrives while it is
    # still busy with the last key is seen with the next: press again until it is seen.
    for _ in range(10):
        term.send("\x03")
        if term.shows(">>> ", 1):
            break
    term.expect(">>> ")
    term.send("/frobnicate\r")
    term.expect("unknown command /frobnicate")
    term.expect(">>> ")
    term.send("/help\r")
    help_text = term.expect(">>> ")
    for name in ("/think", "/system", "/reset", "/save", "/load", "/stats", "/quit", '"""'):
        assert name in help_text
    term.send("\x04")  # Ctrl-D leaves
    assert term.wait() == 0


class FakeStream:
    def __init__(self, deltas):
        self.deltas, self.reply, self.closed = iter(deltas), "the reply", False

    def __iter__(self):
        return self.deltas

    def close(self):
        self.closed = True


DELTAS = [ReplyDelta(reasoning="Think."), ReplyDelta(content="\n\nAnswer\x1b[31m"),
          ReplyDelta(tool_calls=[ToolCall("f", {"a": "é"})])]


def test_reply_display_in_a_terminal(capsys, monkeypatch):
    monkeypatch.delenv("NO_COLOR", raising=False)
    assert stream_reply(Console(interactive=True), FakeStream(DELTAS)) == "the reply"
    out = capsys.readouterr().out
    # dimmed reasoning; the answer without its leading blank lines and with the escape
    # character defused; the tool call highlighted
    assert out == ('\x1b[2mThink.\x1b[22m\nAnswer\ufffd[31m'
                   '\x1b[36m\n[tool call] f {"a": "é"}\n\x1b[39m\n')


def test_reply_display_piped(capsys):
    stream_reply(Console(interactive=False), FakeStream(DELTAS))
    captured = capsys.readouterr()
    assert captured.err == "Think.\n"
    assert captured.out == 'Answer\x1b[31m\n[tool call] f {"a": "é"}\n\n'


def test_ctrl_c_while_printing_closes_the_stream(capsys):
    def deltas():
        yield ReplyDelta(content="Once upon")
        raise KeyboardInterrupt

    stream = FakeStream([])
    stream.deltas = deltas()
    stream_reply(Console(interactive=False), stream)
    assert stream.closed and capsys.readouterr().out == "Once upon [interrupted]\n"


def run_piped(chat_dir, stdin, *extra):
    return subprocess.run(command(chat_dir, *extra), input=stdin, capture_output=True, text=True,
                          timeout=120, check=True)


def test_piped_lines_and_whole_input(chat_dir, tmp_path):
    saved = tmp_path / "piped.safetensors"
    lines = run_piped(chat_dir, f"First message\n\n/think off\nSecond\n/save {saved}\n",
                      "--max-tokens", "8")
    assert len(lines.stdout.splitlines()) >= 2  # one reply per message, nothing else on stdout
    assert "thinking: disabled" in lines.stderr and "\x1b[" not in lines.stdout
    model, tokenizer = m3mlx.load(chat_dir, dtype=mx.float32)
    session = ChatSession.load(saved, model, tokenizer)
    users = [m["content"] for m in session.messages if m["role"] == "user"]
    assert users == ["First message", "Second"]

    whole = run_piped(chat_dir, "One message\nover two lines\n", "--max-tokens", "8", "--input",
                      "whole", "--seed", "1")
    assert whole.stdout.strip()
    assert "One message" not in whole.stdout


def test_bad_model_path_is_a_clear_error(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "m3mlx.cli.main", "chat", "--model", str(tmp_path / "missing")],
        input="", capture_output=True, text=True, timeout=60,
    )
    assert result.returncode != 0 and "no such directory" in result.stderr


# ----------------------------------------------------------------------------------------------
# Careless input never ends a chat


def bad_session_file(chat_dir, tmp_path):
    """A session file whose saved options are out of range (temperature -1)."""
    import json

    model, tokenizer = m3mlx.load(chat_dir, dtype=mx.float32)
    path = ChatSession(model, tokenizer).save(tmp_path / "good")
    arrays, meta = mx.load(str(path), return_metadata=True)
    user = json.loads(meta["user"])
    state = json.loads(user["chat_session"])
    state["options"]["temperature"] = -1
    user["chat_session"] = json.dumps(state)
    meta["user"] = json.dumps(user)
    bad = tmp_path / "bad.safetensors"
    mx.save_safetensors(str(bad), arrays, metadata=meta)
    return bad


def test_piped_chat_survives_bad_lines_and_commands(chat_dir, tmp_path):
    bad = bad_session_file(chat_dir, tmp_path)
    stdin = (b"First message\n\xff\xfe broken\n/save ~nosuchuser/x\n/load " + str(bad).encode()
             + b"\n/load /nonexistent/file\nSecond message\n")
    result = subprocess.run(command(chat_dir, "--max-tokens", "4"), input=stdin,
                            capture_output=True, timeout=120)
    err = result.stderr.decode()
    assert result.returncode == 1 and "Traceback" not in err  # lines failed: status 1 at the end
    assert ("line 2 of stdin is not UTF-8 text (byte 0xff at offset 0); convert it to UTF-8 "
            "first, e.g. with iconv; skipped") in err
    assert "could not save ~nosuchuser/x: ~nosuchuser is not a user with a home directory" in err
    assert f"could not load {bad}: {bad} is not a usable m3mlx chat session: temperature=-1.0: " \
           "must be a number >= 0" in err
    assert "could not load /nonexistent/file: /nonexistent/file: no such session file" in err
    assert len(result.stdout.decode().strip().splitlines()) >= 2  # both messages were answered


def test_terminal_chat_survives_bad_commands_and_a_long_prefill(chat_dir, tmp_path):
    env = {**os.environ, "TERM": "xterm", "M3MLX_HOME": str(tmp_path)}
    bad = bad_session_file(chat_dir, tmp_path)
    # Many small prefill chunks make a 4,000-token message slow to prefill on any machine.
    term = Terminal(command(chat_dir, "--prefill-step-size", "8"), env)
    term.expect(">>> ")
    term.send("/save ~nosuchuser/x\r")
    term.expect("could not save ~nosuchuser/x: ~nosuchuser is not a user with a home directory")
    term.expect(">>> ")
    term.send(f"/load {bad}\r")
    term.expect("temperature=-1.0: must be a number >= 0")
    term.expect(">>> ")
    # A message long enough to prefill for a while: progress appears, Ctrl-C stops it.
    term.send("The quick brown fox jumps over the lazy dog. " * 400 + "\r")
    term.expect("prefill: ", timeout=120)
    term.expect(" tokens (")
    term.send("\x03")
    term.expect("[interrupted]", timeout=60)
    term.expect(">>> ")
    term.send("/stats\r")
    stats = term.expect(">>> ")
    assert "messages: 0" in stats  # the interrupted message did not join the conversation
    term.send("Hello\r")
    term.expect("[context ")  # and the chat still answers
    term.expect(">>> ")
    term.send("/quit\r")
    assert term.wait() == 0
    assert "Traceback" not in term.output


def test_prefill_meter_is_silent_at_first_then_shows_and_clears(monkeypatch):
    import io

    from m3mlx.cli import options

    class Tty(io.StringIO):
        def isatty(self):
            return True

    clock = [100.0]
    monkeypatch.setattr(options.time, "monotonic", lambda: clock[0])
    out = Tty()
    meter = options.PrefillMeter(out)
    meter(2048, 100_000)
    assert out.getvalue() == ""  # a prefill that ends within the delay prints nothing
    clock[0] += 4.0
    meter(8192, 100_000)
    assert out.getvalue() == ("\r\x1b[Kprefill: 8,192/100,000 tokens (8%), 2,048 tok/s, "
                              "45s left; Ctrl-C stops")
    meter(100_000, 100_000)
    assert out.getvalue().endswith("\r\x1b[K")  # the line is gone when the reply starts
