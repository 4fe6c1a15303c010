"""Tool calls and reasoning through `m3mlx serve`, with the model's replies scripted to known M3
output (tests/scripted_server.py): the server, engine, parser and API events are the real ones.
Calls are checked field by field, streaming and not, in all three APIs, and sent back."""

import itertools
import json

import anthropic
import openai
import pytest

from m3mlx.chat_format import render_chat

from server_fixtures import Server

NS = "]<]minimax[>["
NAME = "m3-tiny"


def tag(name, value):
    return f"{NS}<{name}>{value}{NS}</{name}>"


def invoke(name, *params):
    return f'{NS}<invoke name="{name}">' + "".join(params) + f"{NS}</invoke>\n"


def block(*invokes):
    return f"{NS}<tool_call>\n" + "".join(invokes) + f"{NS}</tool_call>"


WEATHER_CALL = invoke("get_weather", tag("location", "Paris"), tag("units", "celsius"),
                      tag("days", "3"))
SEARCH_CALL = invoke("search", tag("query", "café <b>"), tag("filters", tag("min_score", "0.5")
                                                            + tag("tags", tag("item", "a")
                                                                  + tag("item", "b"))))
SCRIPTS = {
    "weather": f"<mm:think>The user wants weather.</mm:think>Let me check.{block(WEATHER_CALL)}",
    "two": f"</mm:think>{block(WEATHER_CALL, SEARCH_CALL)}",
    "think": "<mm:think>Two plus two.</mm:think>4",
    "enabled": "Reasoning here.</mm:think>Answer.",
    "unknown": f"Sure. {block(invoke('launch_rockets', tag('count', '3')))}",
    # As seen live: spaced prefixes, a dropped parameter closer, a closer without its prefix.
    "sloppy": f"{NS} <tool_call>\n{NS}\n<invoke name=\"get_weather\"> {NS}<location>Paris\n"
              f"{NS} <days>3</days>\n{NS} </invoke>\n{NS}</tool_call>",
    # Issue 14: arguments nested 300 levels deep.
    "deep": block(invoke("nest", f"{NS}<tree>" + f"{NS}<a>" * 300 + "x" + f"{NS}</a>" * 300
                         + f"{NS}</tree>")),
}
WEATHER_ARGS = {"location": "Paris", "units": "celsius", "days": 3}
SEARCH_ARGS = {"query": "café <b>", "filters": {"min_score": 0.5, "tags": ["a", "b"]}}

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {
        "location": {"type": "string"}, "units": {"type": "string", "enum": ["celsius", "f"]},
        "days": {"type": "integer"}}, "required": ["location"]}}}
NEST = {"type": "function", "function": {
    "name": "nest", "parameters": {"type": "object", "properties": {"tree": {"type": "object"}}}}}
SEARCH = {"type": "function", "function": {
    "name": "search", "parameters": {"type": "object", "properties": {
        "query": {"type": "string"},
        "filters": {"type": "object", "properties": {
            "min_score": {"type": "number"},
            "tags": {"type": "array", "items": {"type": "string"}}}}}}}}
TOOLS = [WEATHER, SEARCH]
nonce = itertools.count()


def ask(script, text="What is the weather in Paris?"):
    # The nonce first: the part of a prompt the model is fed (after the cached prefix) then
    # always holds the whole marker.
    return f"#{next(nonce)} [script:{script}] {text}"


@pytest.fixture(scope="module")
def server(demo_dir, tmp_path_factory):
    scripts = tmp_path_factory.mktemp("scripts") / "scripts.json"
    scripts.write_text(json.dumps(SCRIPTS))
    s = Server(["--model", str(demo_dir), "--dtype", "float32", "--temp", "0",
                "--no-disk-cache", "--max-tokens", "4000", "--served-model-name", NAME],
               scripts=scripts)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server.url, api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def claude(server):
    return anthropic.Anthropic(base_url=server.base, api_key="none", max_retries=0, timeout=120)


def prompt_tokens(demo_model, messages, tools=None, thinking="adaptive"):
    _, tokenizer = demo_model
    return len(tokenizer.encode(render_chat(messages, tools=tools, thinking=thinking,
                                            template=tokenizer.chat_template)))


def test_chat_tool_call_round_trip(oai, demo_model):
    question = ask("weather")
    reply = oai.chat.completions.create(model=NAME, tools=TOOLS,
                                        messages=[{"role": "user", "content": question}])
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me check."
    assert choice.message.model_extra["reasoning_content"] == "The user wants weather."
    assert choice.message.model_extra["reasoning"] == "The user wants weather."
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == WEATHER_ARGS
    assert isinstance(json.loads(call.function.arguments)["days"], int)

    # Send it back with the tool's result: reasoning, call and result are in the prompt.
    history = [{"role": "user", "content": question},
               {"role": "assistant", "content": "Let me check.",
                "reasoning_content": "The user wants weather.",
                "tool_calls": [call.model_dump()]},
               {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 21}'},
               {"role": "user", "content": ask("think", "Thanks. And 2+2?")}]
    reply = oai.chat.completions.create(model=NAME, tools=TOOLS, messages=history)
    assert reply.choices[0].message.content == "4"
    assert reply.choices[0].message.model_extra["reasoning_content"] == "Two plus two."
    rendered = history[:1] + [{**history[1], "tool_calls": [
        {"function": {"name": "get_weather", "arguments": WEATHER_ARGS}}]}] + history[2:]
    assert reply.usage.prompt_tokens == prompt_tokens(demo_model, rendered, TOOLS)
    # The first request's prompt is a prefix of this one: it came from the cache.
    assert reply.usage.prompt_tokens_details.cached_tokens > 0


def test_chat_tool_calls_stream_as_incremental_deltas(oai):
    chunks = list(oai.chat.completions.create(
        model=NAME, tools=TOOLS, stream=True, messages=[{"role": "user", "content": ask("two")}]))
    calls = {}
    for chunk in chunks:
        for delta in chunk.choices[0].delta.tool_calls or []:
            entry = calls.setdefault(delta.index, {"id": None, "name": "", "arguments": ""})
            if delta.id:
                assert entry["id"] is None  # the header comes once, first
                entry["id"], entry["name"] = delta.id, delta.function.name
                assert delta.function.arguments == ""
            elif delta.function and delta.function.arguments:
                entry["arguments"] += delta.function.arguments
    assert [c["name"] for c in calls.values()] == ["get_weather", "search"]
    assert [json.loads(c["arguments"]) for c in calls.values()] == [WEATHER_ARGS, SEARCH_ARGS]
    assert len({c["id"] for c in calls.values()}) == 2
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_choice(oai):
    messages = [{"role": "user", "content": ask("two")}]
    one = oai.chat.completions.create(model=NAME, tools=TOOLS, messages=messages,
                                      parallel_tool_calls=False)
    assert [c.function.name for c in one.choices[0].message.tool_calls] == ["get_weather"]
    assert one.choices[0].finish_reason == "tool_calls"
    named = oai.chat.completions.create(
        model=NAME, tools=TOOLS, messages=[{"role": "user", "content": ask("two")}],
        tool_choice={"type": "function", "function": {"name": "search"}})
    assert [c.function.name for c in named.choices[0].message.tool_calls] == ["search"]
    assert json.loads(named.choices[0].message.tool_calls[0].function.arguments) == SEARCH_ARGS
    # "none": the model may not start a call at all (its namespace token is banned).
    none = oai.chat.completions.create(model=NAME, tools=TOOLS, tool_choice="none", max_tokens=8,
                                       messages=[{"role": "user", "content": ask("two")}])
    assert not none.choices[0].message.tool_calls
    assert NS not in (none.choices[0].message.content or "")


def test_undeclared_tool_is_content_with_a_warning(oai, server):
    reply = oai.chat.completions.create(model=NAME, tools=TOOLS,
                                        messages=[{"role": "user", "content": ask("unknown")}])
    message = reply.choices[0].message
    assert not message.tool_calls and reply.choices[0].finish_reason == "stop"
    assert message.content == SCRIPTS["unknown"]
    server.wait_for_log("'launch_rockets', which is not a declared tool")


def test_sloppy_call_is_recovered(oai):
    reply = oai.chat.completions.create(model=NAME, tools=TOOLS,
                                        messages=[{"role": "user", "content": ask("sloppy")}])
    [call] = reply.choices[0].message.tool_calls
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"location": "Paris", "days": 3}
    assert reply.choices[0].finish_reason == "tool_calls"


def test_deeply_nested_call_is_content_and_the_conversation_goes_on(oai, server):
    """Issue 14 #4: no RecursionError, no poisoned conversation, the server stays up."""
    question = ask("deep")
    reply = oai.chat.completions.create(model=NAME, tools=TOOLS + [NEST],
                                        messages=[{"role": "user", "content": question}])
    message = reply.choices[0].message
    assert not message.tool_calls and message.content == SCRIPTS["deep"]
    server.wait_for_log("nest deeper than")
    history = [{"role": "user", "content": question},
               {"role": "assistant", "content": message.content},
               {"role": "user", "content": ask("think", "And 2+2?")}]
    again = oai.chat.completions.create(model=NAME, tools=TOOLS + [NEST], messages=history)
    assert again.choices[0].message.content == "4"
    assert again.usage.prompt_tokens_details.cached_tokens > 0


@pytest.mark.parametrize("how", [{"reasoning_effort": "high"},
                                 {"extra_body": {"chat_template_kwargs":
                                                 {"thinking_mode": "enabled"}}},
                                 {"extra_body": {"chat_template_kwargs":
                                                 {"enable_thinking": True}}}])
def test_thinking_mode_per_request(oai, demo_model, how):
    question = ask("enabled", "Why?")
    reply = oai.chat.completions.create(model=NAME, messages=[{"role": "user",
                                                               "content": question}], **how)
    message = reply.choices[0].message
    assert message.content == "Answer." and message.model_extra["reasoning"] == "Reasoning here."
    assert reply.usage.prompt_tokens == prompt_tokens(
        demo_model, [{"role": "user", "content": question}], thinking="enabled")


def test_responses_function_calls_round_trip(oai, demo_model):
    tools = [{"type": "function", **t["function"]} for t in TOOLS]
    question = ask("weather")
    response = oai.responses.create(model=NAME, tools=tools, input=question)
    kinds = [item.type for item in response.output]
    assert kinds == ["reasoning", "message", "function_call"]
    reasoning, message, call = response.output
    assert reasoning.content[0].text == "The user wants weather."
    assert response.output_text == "Let me check."
    assert call.name == "get_weather" and json.loads(call.arguments) == WEATHER_ARGS
    assert call.call_id.startswith("call_")

    events = list(oai.responses.create(model=NAME, tools=tools, input=ask("two"), stream=True))
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert [json.loads(e.arguments) for e in done] == [WEATHER_ARGS, SEARCH_ARGS]
    final = events[-1].response
    assert [i.name for i in final.output if i.type == "function_call"] == ["get_weather",
                                                                           "search"]
    assert [e.sequence_number for e in events] == list(range(len(events)))

    second = ask("think", "And 2+2?")
    follow_up = oai.responses.create(model=NAME, tools=tools, input=[
        {"role": "user", "content": question},
        {"type": "reasoning", "id": reasoning.id, "summary": [],
         "content": [{"type": "reasoning_text", "text": "The user wants weather."}]},
        {"type": "message", "role": "assistant",
         "content": [{"type": "output_text", "text": "Let me check."}]},
        {"type": "function_call", "call_id": call.call_id, "name": call.name,
         "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "21 C"},
        {"role": "user", "content": second},
    ])
    assert follow_up.output_text == "4"
    expected = [{"role": "user", "content": question},
                {"role": "assistant", "content": "Let me check.",
                 "reasoning_content": "The user wants weather.",
                 "tool_calls": [{"function": {"name": "get_weather",
                                              "arguments": WEATHER_ARGS}}]},
                {"role": "tool", "content": "21 C"},
                {"role": "user", "content": second}]
    assert follow_up.usage.input_tokens == prompt_tokens(demo_model, expected, TOOLS)


def anthropic_tools():
    out = []
    for tool in TOOLS:
        function = tool["function"]
        entry = {"name": function["name"], "input_schema": function["parameters"]}
        if "description" in function:
            entry["description"] = function["description"]
        out.append(entry)
    return out


def test_anthropic_tool_use_round_trip(claude, demo_model):
    question = ask("weather")
    message = claude.messages.create(model=NAME, max_tokens=4000, tools=anthropic_tools(),
                                     messages=[{"role": "user", "content": question}])
    assert [b.type for b in message.content] == ["thinking", "text", "tool_use"]
    thinking, text, use = message.content
    assert thinking.thinking == "The user wants weather." and text.text == "Let me check."
    assert use.name == "get_weather" and use.input == WEATHER_ARGS and use.id.startswith("toolu_")
    assert message.stop_reason == "tool_use"

    with claude.messages.stream(model=NAME, max_tokens=4000, tools=anthropic_tools(),
                                messages=[{"role": "user", "content": ask("two")}]) as stream:
        final = stream.get_final_message()
    assert [(b.name, b.input) for b in final.content if b.type == "tool_use"] == [
        ("get_weather", WEATHER_ARGS), ("search", SEARCH_ARGS)]
    assert final.stop_reason == "tool_use"

    history = [{"role": "user", "content": question},
               {"role": "assistant", "content": [b.model_dump() for b in message.content]},
               {"role": "user", "content": [
                   {"type": "tool_result", "tool_use_id": use.id, "content": "21 C"},
                   {"type": "text", "text": ask("think", "And 2+2?")}]}]
    reply = claude.messages.create(model=NAME, max_tokens=400, tools=anthropic_tools(),
                                   messages=history)
    assert [b.type for b in reply.content] == ["thinking", "text"]
    assert reply.content[1].text == "4"
    count = claude.messages.count_tokens(model=NAME, tools=anthropic_tools(), messages=history)
    expected = [{"role": "user", "content": question},
                {"role": "assistant", "content": "Let me check.",
                 "reasoning_content": "The user wants weather.",
                 "tool_calls": [{"function": {"name": "get_weather", "arguments": WEATHER_ARGS}}]},
                {"role": "tool", "content": "21 C"},
                {"role": "user", "content": history[2]["content"][1]["text"]}]
    assert count.input_tokens == prompt_tokens(demo_model, expected, TOOLS)
    assert reply.usage.input_tokens + reply.usage.cache_read_input_tokens == count.input_tokens
