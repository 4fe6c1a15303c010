"""Hostile and broken chat templates (issue 14): bounded time and size, one-line errors that
name the template, Hugging Face's template forms. Templates render in m3mlx's bounded jinja
sandbox (`m3mlx.template_sandbox`); the same path serves the packaged template."""

import json
import os
import subprocess
import sys
import time

import mlx.core as mx
import pytest

import m3mlx
from m3mlx.chat import ChatSession
from m3mlx.chat_format import TemplateError, read_chat_template, render_chat
from m3mlx.demo import write_demo_checkpoint

CHAT = [{"role": "user", "content": "Hi"}]
LOOPS = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"

HOSTILE = {
    "nested loops": (LOOPS, "took longer than 2.0 s to render; it may loop without end"),
    "huge string": ("{{ 'a' * 10**10 }}", "would build a sequence of more than"),
    "huge join": ("{% set s = 'a' * 100000 %}{{ ([s] * 1000)|join }}", "more than"),
    "doubling": ("{% set ns = namespace(s='ab') %}{% for i in range(64) %}"
                 "{% set ns.s = ns.s ~ ns.s %}{% endfor %}", "would build a string of more than"),
    "nested lists": ("{% set a = ['xxxxxxxxxx'] * 10 %}{% set b = [a, a, a, a, a, a, a, a] %}"
                     "{% set c = [b, b, b, b, b, b, b, b] %}{% set d = [c, c, c, c, c, c, c, c] %}"
                     "{% set e = [d, d, d, d, d, d, d, d] %}{% set f = [e, e, e, e, e, e, e, e] %}"
                     "{{ f }}{{ f }}", "more than"),
    "huge width": ("{{ 'a'.ljust(10**10) }}", "passes 10000000000 to str.ljust"),
    "huge format": ("{{ '{:>10000000000}'.format('a') }}", "format width of a million"),
    "huge power": ("{{ 7 ** 1000000000 }}", "computes an integer of about"),
    "output in a loop": ("{% for i in range(100000) %}{{ messages }}{% endfor %}",
                         "would build an output of more than"),
    "divide by zero": ("{{ 1/0 }}", "failed to render (line 1): division by zero"),
    "recursion": ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "recursed too deeply"),
    "raise": ("{{ raise_exception('no system role') }}",
              "refused the conversation: no system role"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_templates_fail_fast_with_a_message_naming_them(name):
    source, message = HOSTILE[name]
    start = time.monotonic()
    with pytest.raises(TemplateError) as error:
        render_chat(CHAT, template=source, template_name="/ckpt/chat_template.jinja")
    assert time.monotonic() - start < 10
    text = str(error.value)
    assert text.startswith("/ckpt/chat_template.jinja ") and message in text
    assert "\n" not in text


def test_escapes_stay_closed():
    for source in ("{{ ''.__class__.__mro__[1].__subclasses__() }}",
                   "{{ cycler.__init__.__globals__ }}", "{{ lipsum(10**6) }}"):
        try:
            rendered = render_chat(CHAT, template=source)
        except TemplateError:
            continue
        assert "<class" not in rendered and "__builtins__" not in rendered
        assert len(rendered) < 100


def test_a_long_legitimate_conversation_renders():
    """The budget scales with the input: a 2 MB conversation is no problem."""
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": "word " * 2000}
                for i in range(200)]
    start = time.monotonic()
    text = render_chat(messages)
    assert len(text) > 200 * 10000 and time.monotonic() - start < 5


def write_checkpoint(tmp_path, files):
    path = write_demo_checkpoint(tmp_path / "ckpt", dtype=mx.float32)
    (path / "chat_template.jinja").unlink()
    for name, data in files.items():
        (path / name).write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def tokenizer_config(path, **fields):
    config = json.loads((path / "tokenizer_config.json").read_text())
    config.update(fields)
    (path / "tokenizer_config.json").write_text(json.dumps(config))


def test_list_of_named_templates(tmp_path):
    path = write_checkpoint(tmp_path, {})
    tokenizer_config(path, chat_template=[
        {"name": "default", "template": "plain:{{ messages[0].content }}"},
        {"name": "tool_use", "template": "tools:{{ tools[0].function.name }}"},
    ])
    assert read_chat_template(path) == {"default": "plain:{{ messages[0].content }}",
                                        "tool_use": "tools:{{ tools[0].function.name }}"}
    _, tokenizer = m3mlx.load(path, dtype=mx.float32)
    template = tokenizer.chat_template
    assert render_chat(CHAT, template=template) == "plain:Hi"
    assert render_chat(CHAT, template=template, tools=[{"name": "clock"}]) == "tools:clock"


def test_processor_chat_template_json(tmp_path):
    path = write_checkpoint(tmp_path, {"chat_template.json": json.dumps(
        {"chat_template": "json:{{ messages[0].content }}"})})
    _, tokenizer = m3mlx.load(path, dtype=mx.float32)
    assert render_chat(CHAT, template=tokenizer.chat_template) == "json:Hi"
    assert tokenizer.chat_template_file == str(path / "chat_template.json")


@pytest.mark.parametrize("value, message", [
    ([{"name": "tool_use", "template": "x"}], "none named 'default'"),
    ([{"name": "default"}], "entry 0 must be"),
    (42, "must be a string or a list of named templates, not int"),
    ("{% if %}", "(chat_template) does not compile"),
])
def test_bad_tokenizer_config_templates(tmp_path, value, message):
    path = write_checkpoint(tmp_path, {})
    tokenizer_config(path, chat_template=value)
    with pytest.raises(TemplateError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_chat_template(path)


def test_chat_template_json_nested_too_deeply(tmp_path):
    path = write_checkpoint(tmp_path, {"chat_template.json": "[" * 100_000 + "]" * 100_000})
    with pytest.raises(TemplateError, match=r"chat_template.json is not a JSON object in UTF-8 "
                                            r"\(the JSON nests too deeply to be read\)"):
        read_chat_template(path)


def test_non_utf8_template(tmp_path):
    path = write_checkpoint(tmp_path, {"chat_template.jinja": b"{{ messages }}\xff\xfe"})
    with pytest.raises(TemplateError, match=r"chat_template.jinja is not UTF-8 text \(byte 0xff "
                                            r"at offset 14\); save it as UTF-8"):
        read_chat_template(path)


def test_session_with_a_broken_template_fails_at_once(demo_model):
    model, tokenizer = demo_model
    with pytest.raises(TemplateError, match="the chat template failed to render"):
        ChatSession(model, tokenizer, chat_template="{{ 1/0 }}")


def run_cli(*args, stdin="Hi\n"):
    env = {**os.environ, "NO_COLOR": "1"}
    return subprocess.run([sys.executable, "-m", "m3mlx.cli.main", *args], input=stdin,
                          capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.parametrize("files, message", [
    ({"chat_template.jinja": LOOPS}, "took longer than 2.0 s to render"),
    ({"chat_template.jinja": "{{ 'a' * 10**10 }}"}, "would build a sequence of more than"),
    ({"chat_template.jinja": "{{ 1/0 }}"}, "failed to render (line 1): division by zero"),
    ({"chat_template.jinja": b"\xff"}, "is not UTF-8 text"),
    ({"chat_template.jinja": "{% for %}"}, "does not compile"),
])
def test_chat_command_refuses_a_hostile_template(tmp_path, files, message):
    path = write_checkpoint(tmp_path, files)
    result = run_cli("chat", "--model", str(path), "--temp", "0", "--max-tokens", "4")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ")
    assert str(path / "chat_template.jinja") in lines[0] and message in lines[0]
