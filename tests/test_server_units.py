"""The server's parts without HTTP: request conversion, the context budget, event merging,
the `serve` command's own option errors."""

import subprocess
import sys
from types import SimpleNamespace

import pytest

from m3mlx.server import requests, schemas
from m3mlx.server.app import Service, _merge
from m3mlx.server.requests import RequestError

BILLING = "x-anthropic-billing-header: cc_version=2.1.3.a1b; cc_entrypoint=cli; cch=4f2a1;"


def test_billing_header_is_removed_in_every_api():
    chat = schemas.ChatCompletionRequest(model="m", messages=[
        {"role": "system", "content": f"{BILLING}\nYou are Claude Code."},
        {"role": "user", "content": "hi"}])
    assert requests.from_chat_completion(chat).messages[0]["content"] == "You are Claude Code."
    claude = schemas.MessagesRequest(model="m", max_tokens=1, messages=[
        {"role": "user", "content": "hi"}], system=[{"type": "text", "text": BILLING},
                                                    {"type": "text", "text": "Rules."}])
    assert requests.from_anthropic(claude).messages[0] == {"role": "system", "content": "Rules."}
    responses = schemas.ResponsesRequest(model="m", input="hi",
                                         instructions=f"Rules.\n{BILLING}\nMore.")
    assert requests.from_responses(responses).messages[0]["content"] == "Rules.\nMore."
    # Only that line: the same words elsewhere in a user message stay.
    chat = schemas.ChatCompletionRequest(model="m", messages=[
        {"role": "user", "content": f"why is {BILLING} in my prompt?"}])
    assert BILLING in requests.from_chat_completion(chat).messages[0]["content"]


def test_anthropic_blocks_become_turns():
    body = schemas.MessagesRequest(model="m", max_tokens=1, messages=[
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "Need a tool.", "signature": "x"},
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "toolu_1", "name": "w", "input": {"city": "Paris"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": [
                {"type": "text", "text": "21 C"}]},
            {"type": "tool_result", "tool_use_id": "toolu_2", "content": "gone",
             "is_error": True},
            {"type": "text", "text": "Thanks"}]}],
        tools=[{"name": "w", "input_schema": {"type": "object"}}],
        tool_choice={"type": "any", "disable_parallel_tool_use": True},
        thinking={"type": "enabled", "budget_tokens": 100})
    convo = requests.from_anthropic(body)
    assert convo.messages == [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "Checking.", "reasoning_content": "Need a tool.",
         "tool_calls": [{"function": {"name": "w", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "21 C"},
        {"role": "tool", "content": "Error: gone"},
        {"role": "user", "content": "Thanks"}]
    assert (convo.tool_choice.mode, convo.tool_choice.parallel) == ("required", False)
    assert convo.thinking == "enabled"


def test_responses_items_become_turns():
    body = schemas.ResponsesRequest(model="m", input=[
        {"role": "user", "content": [{"type": "input_text", "text": "go"}]},
        {"type": "reasoning", "summary": [{"type": "summary_text", "text": "Plan."}]},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": '{"a": 1}'},
        {"type": "function_call", "call_id": "c2", "name": "g", "arguments": ""},
        {"type": "function_call_output", "call_id": "c1", "output": "one"},
        {"type": "function_call_output", "call_id": "c2", "output": [
            {"type": "input_text", "text": "two"}]},
    ], reasoning={"effort": "minimal"}, tools=[{"type": "function", "name": "f"},
                                               {"type": "function", "name": "g"}])
    convo = requests.from_responses(body)
    assert convo.messages == [
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": "", "reasoning_content": "Plan.", "tool_calls": [
            {"function": {"name": "f", "arguments": {"a": 1}}},
            {"function": {"name": "g", "arguments": {}}}]},
        {"role": "tool", "content": "one"}, {"role": "tool", "content": "two"}]
    assert convo.thinking == "disabled"


def test_late_instructions_become_user_turns():
    body = schemas.ChatCompletionRequest(model="m", messages=[
        {"role": "system", "content": "A"}, {"role": "developer", "content": "B"},
        {"role": "user", "content": "hi"}, {"role": "system", "content": "C"}])
    assert [m["role"] for m in requests.from_chat_completion(body).messages] == [
        "system", "developer", "user", "user"]


def service(context):
    engine = SimpleNamespace(context=context)
    return Service(engine=engine, tokenizer=None, model_names=["m3", "claude-*"], sampling={},
                   max_tokens=100)


def test_budget_is_capped_by_the_context_and_names_match_globs():
    s = service(1000)
    assert s.budget(900, None) == 100 and s.budget(990, None) == 10
    assert s.budget(10, 10 ** 12) == 990 and s.budget(10, 5) == 5
    with pytest.raises(RequestError, match="the prompt is 1,000 tokens; the model's context is "
                                           "1,000"):
        s.budget(1000, 1)
    s.check_model("m3")
    s.check_model("claude-haiku-4-5")
    with pytest.raises(RequestError, match="model 'gpt-4' not found; this server serves 'm3'"):
        s.check_model("gpt-4")


def test_consecutive_text_deltas_merge():
    batch = [("prefill", 1, 9), ("prefill", 5, 9), ("start", 9, 0),
             ("delta", "a", "", [], None), ("delta", "b", "", [], None),
             ("delta", "", "r", [], None), ("delta", "", "s", [], None),
             ("delta", "c", "", ["call"], None), ("delta", "d", "", [], (1, -0.1, None))]
    assert _merge(batch) == [("prefill", 5, 9), ("start", 9, 0), ("delta", "ab", "", [], None),
                             ("delta", "", "rs", [], None), ("delta", "c", "", ["call"], None),
                             ("delta", "d", "", [], (1, -0.1, None))]


@pytest.mark.parametrize("args, message", [
    (["--cache-size", "lots"], "is 'lots', not a size like"),
    (["--port", "70000"], "70000 is not in the range"),
    (["--thinking", "sometimes"], "'sometimes' is not one of"),
    (["--model", "/nonexistent/m3"], "no such directory"),
])
def test_serve_option_errors(args, message):
    base = ["--model", "/nonexistent/m3"] if "--model" not in args else []
    result = subprocess.run([sys.executable, "-m", "m3mlx.cli.main", "serve", *base, *args],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert message in result.stderr


def test_serve_refuses_a_broken_template(tmp_path):
    import mlx.core as mx

    from m3mlx.demo import write_demo_checkpoint

    path = write_demo_checkpoint(tmp_path / "m", dtype=mx.float32,
                                 extra_files={"chat_template.jinja": "{{ 1/0 }}"})
    result = subprocess.run([sys.executable, "-m", "m3mlx.cli.main", "serve", "--model",
                             str(path), "--port", "0", "--no-disk-cache"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"{path / 'chat_template.jinja'} failed to render (line 1): division by zero" in \
        result.stderr
