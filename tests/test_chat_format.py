"""Chat rendering: the packaged M3 template (and any checkpoint's, through the same sandboxed
path) against the format of m3-model.md sections 5.2-5.4, spelled out here independently."""

import pytest

from m3mlx.chat_format import (
    M3_CHAT_TEMPLATE,
    TemplateError,
    render_chat,
    render_template,
)
from m3mlx.reply_parser import parse_reply
from m3mlx.tokenizer import Tokenizer

NS = "]<]minimax[>["

IDENTITY = (
    "Your model version is MiniMax-M3, developed by MiniMax. Knowledge cutoff: January 2026. "
    "Founded in early 2022, MiniMax is a global AI foundation model company committed to "
    "advancing the frontiers of AI towards AGI."
)
THINKING_HEAD = (
    "\n\n<thinking_instructions>\n"
    "You have a thinking capability that allows you to reason step by step before responding. "
    "When thinking is enabled, wrap your reasoning in <mm:think></mm:think> tags before your "
    "response. When thinking is disabled, begin your response directly after the </mm:think> "
    "prefix. When thinking is adaptive, decide on your own whether to think for the current turn.\n"
)
MODE_LINE = {
    "enabled": "Current thinking mode: enabled. You MUST think step by step before every "
    "response, including after receiving function/tool results.\n",
    "disabled": "Current thinking mode: disabled. Do not output any thinking process.\n",
    "adaptive": "Current thinking mode: adaptive. You are encouraged to think for complex "
    "decision-making, multi-step reasoning, or when analyzing function/tool results.\n",
}
PROMPT_END = {
    "enabled": "]~b]ai\n<mm:think>", "disabled": "]~b]ai\n</mm:think>", "adaptive": "]~b]ai\n"
}

WEATHER = {
    "name": "get_weather",
    "description": "Current weather <b>in</b> a city & région",
    "parameters": {
        "type": "object",
        "properties": {"location": {"type": "string"}, "units": {"type": "string"}},
        "required": ["location"],
    },
}
CLOCK = {"name": "clock", "parameters": {"type": "object", "properties": {}}}
TOOLS = [{"type": "function", "function": WEATHER}, {"type": "function", "function": CLOCK}]
TOOLS_TEXT = (
    "\n\n# Tools\nYou may call one or more tools to assist with the user query.\n"
    "Here are the tools available in JSONSchema format:\n\n<tools>\n"
    '<tool>{"name": "get_weather", "description": "Current weather <b>in</b> a city & région", '
    '"parameters": {"type": "object", "properties": {"location": {"type": "string"}, '
    '"units": {"type": "string"}}, "required": ["location"]}}</tool>\n'
    '<tool>{"name": "clock", "parameters": {"type": "object", "properties": {}}}</tool>\n'
    "</tools>\n\n"
    f"To call tools, wrap all invocations in a single {NS}<tool_call>{NS}</tool_call> block. "
    "Parameter values containing nested objects or arrays are recursively expanded into XML "
    "elements. Example:\n\n"
    f"{NS}<tool_call>\n"
    f'{NS}<invoke name="tool-name-1">{NS}<param-1>value-1{NS}</param-1>{NS}<param-2>'
    f"{NS}<item>{NS}<key-a>val-a{NS}</key-a>{NS}<key-b>val-b{NS}</key-b>{NS}</item>"
    f"{NS}</param-2>{NS}</invoke>\n"
    f'{NS}<invoke name="tool-name-2">{NS}<param-1>value-1{NS}</param-1>{NS}</invoke>\n'
    f"{NS}</tool_call>"
)

CHAT = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "What is 2+2?"},
]
CHAT_TEXT = "]~b]user\nHi[e~[\n]~b]ai\n</mm:think>Hello![e~[\n]~b]user\nWhat is 2+2?[e~[\n"

TOOL_CHAT = [
    {"role": "user", "content": "Weather in Boston, and the time?"},
    {
        "role": "assistant",
        "content": "Checking.\n",
        "reasoning_content": "Two tools.",
        "tool_calls": [
            {"type": "function",
             "function": {"name": "get_weather",
                          "arguments": {"location": "Boston", "units": "celsius", "days": None}}},
            {"type": "function", "function": {"name": "clock", "arguments": "{}"}},
        ],
    },
    {"role": "tool", "content": {"temp": 21, "sky": "clear"}},
    {"role": "tool", "content": "09:30"},
]
TOOL_CHAT_TEXT = (
    "]~b]user\nWeather in Boston, and the time?[e~[\n"
    "]~b]ai\n<mm:think>Two tools.</mm:think>Checking.\n"
    f"{NS}<tool_call>\n"
    f'{NS}<invoke name="get_weather">{NS}<location>Boston{NS}</location>'
    f"{NS}<units>celsius{NS}</units>{NS}</invoke>\n"
    f'{NS}<invoke name="clock">{NS}</invoke>\n'
    f"{NS}</tool_call>[e~[\n"
    ']~b]tool\n<response>{"temp": 21, "sky": "clear"}</response>\n<response>09:30</response>[e~[\n'
)


def expected_prompt(mode, with_tools, system="You are a helpful assistant.", turns=CHAT_TEXT,
                    identity=IDENTITY):
    system_turn = (
        f"]~!b[]~b]system\n{identity}{THINKING_HEAD}{MODE_LINE[mode]}</thinking_instructions>"
        "[e~[\n"
    )
    developer_turn = f"]~b]developer\n{system}" + (TOOLS_TEXT if with_tools else "") + "[e~[\n"
    return system_turn + developer_turn + turns + PROMPT_END[mode]


def both(messages, **kwargs):
    """Render with m3mlx's default path and with the packaged template passed explicitly."""
    default = render_chat(messages, **kwargs)
    assert render_template(M3_CHAT_TEMPLATE, messages, **kwargs) == default
    return default


@pytest.mark.parametrize("mode", ["enabled", "disabled", "adaptive"])
@pytest.mark.parametrize("with_tools", [False, True], ids=["no_tools", "tools"])
@pytest.mark.parametrize("with_results", [False, True], ids=["chat", "tool_results"])
def test_render_matches_format(mode, with_tools, with_results):
    messages, turns = (TOOL_CHAT, TOOL_CHAT_TEXT) if with_results else (CHAT, CHAT_TEXT)
    tools = TOOLS if with_tools else None
    text = both(messages, tools=tools, thinking=mode)
    assert text == expected_prompt(mode, with_tools, turns=turns)
    assert text.endswith(PROMPT_END[mode])
    assert MODE_LINE[mode] in text


def test_system_prompt_and_no_generation_prompt():
    messages = [{"role": "system", "content": "Be terse."}] + CHAT
    text = both(messages, thinking="adaptive")
    assert text == expected_prompt("adaptive", False, system="Be terse.")
    history = both(messages, thinking="disabled", add_generation_prompt=False)
    prompt = expected_prompt("disabled", False, system="Be terse.")
    assert history == prompt.removesuffix(PROMPT_END["disabled"])


def test_template_thinking_mode_undefined_is_adaptive():
    # A caller that does not set thinking_mode (e.g. plain Hugging Face apply_chat_template).
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    text = env.from_string(M3_CHAT_TEMPLATE).render(messages=CHAT, add_generation_prompt=True)
    assert text == expected_prompt("adaptive", False)


def test_render_chat_picks_the_template():
    assert render_chat(CHAT, thinking="enabled") == expected_prompt("enabled", False)
    custom = "{% for m in messages %}<{{ m.role }}:{{ m.content }}>{% endfor %}{{ thinking_mode }}"
    assert render_chat(CHAT[:1], thinking="disabled", template=custom) == "<user:Hi>disabled"


@pytest.mark.parametrize(
    "messages, match",
    [
        ([{"role": "robot", "content": "x"}], "role 'robot'"),
        ([{"role": "user", "content": "x"}, {"role": "system", "content": "y"}], "only allowed first"),
        ([{"role": "user", "content": "x"}, {"role": "root", "content": "y"}], "only allowed first"),
        ([{"role": "assistant", "content": "",
           "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]}], "a JSON object"),
        ([{"role": "user", "content": 3}], "must be a string"),
        ([{"role": "assistant", "content": "", "tool_calls": [{"function": {"arguments": {}}}]}],
         "function name"),
        ([{"role": "assistant", "content": "",
           "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}], "not valid JSON"),
        (["hello"], "must be a dict"),
    ],
)
def test_bad_messages_are_refused(messages, match):
    with pytest.raises(ValueError, match=match):
        render_chat(messages)
    with pytest.raises(ValueError, match=match):
        render_template("{{ messages }}", messages)


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="thinking mode must be one of"):
        render_chat(CHAT, thinking="on")
    with pytest.raises(ValueError, match="tool 0 has no function name"):
        render_chat(CHAT, tools=[{"type": "function", "function": {"description": "x"}}])
    with pytest.raises(TemplateError, match="does not compile"):
        render_template("{% if %}", CHAT)
    with pytest.raises(TemplateError, match="^the chat template refused the conversation: nope$"):
        render_template("{{ raise_exception('nope') }}", CHAT)


ROOT = {"role": "root", "content": "You are Zed, built by Acme."}


@pytest.mark.parametrize("first", ["system", "developer"])
def test_root_replaces_the_identity_and_developer_is_the_system_prompt(first):
    messages = [ROOT, {"role": first, "content": "Be terse."}] + CHAT
    text = both(messages, thinking="disabled", tools=TOOLS)
    assert text == expected_prompt("disabled", True, system="Be terse.",
                                   identity="You are Zed, built by Acme.")
    assert both([ROOT] + CHAT) == expected_prompt("adaptive", False, identity=ROOT["content"])


def test_leading_instructions_join_and_content_parts_are_text():
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Rule one."}]},
        {"role": "developer", "content": "Rule two."},
        {"role": "user", "content": [{"type": "text", "text": "H"}, {"type": "text", "text": "i"}]},
    ] + CHAT[1:]
    assert both(messages) == expected_prompt("adaptive", False, system="Rule one.\n\nRule two.")


def test_model_identity_variable_sets_the_default_system_prompt():
    text = render_template(M3_CHAT_TEMPLATE, CHAT, model_identity="You are M3.")
    assert text == expected_prompt("adaptive", False, system="You are M3.")


def test_inline_reasoning_is_split_and_reasoning_fields_are_kept():
    inline = [{"role": "user", "content": "Hi"},
              {"role": "assistant", "content": "<mm:think>\nLet me see.\n</mm:think>\n\nHello!"}]
    fields = [{"role": "user", "content": "Hi"},
              {"role": "assistant", "content": "Hello!", "reasoning": "Let me see."}]
    turn = "]~b]user\nHi[e~[\n]~b]ai\n<mm:think>Let me see.</mm:think>Hello![e~[\n"
    for messages in (inline, fields):
        assert both(messages, thinking="enabled") == expected_prompt("enabled", False, turns=turn)


def test_tool_call_arguments_as_json_strings_are_objects():
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"location": "Boston"}'}}
    as_string = [{"role": "user", "content": "?"},
                 {"role": "assistant", "content": None, "tool_calls": [call]}]
    as_object = [{"role": "user", "content": "?"},
                 {"role": "assistant", "content": "", "tool_calls": [
                     {"function": {"name": "get_weather", "arguments": {"location": "Boston"}}}]}]
    assert both(as_string, tools=TOOLS) == both(as_object, tools=TOOLS)
    assert f"{NS}<location>Boston{NS}</location>" in both(as_string, tools=TOOLS)


def test_images_are_refused_with_the_part_named():
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is it?"},
                                             {"type": "image_url", "image_url": {"url": "x"}}]}]
    with pytest.raises(ValueError, match="message 0 \\(user\\) part 1 is of type 'image_url'"):
        render_chat(messages)


def test_bare_function_tools_equal_wrapped():
    assert both(CHAT, tools=[WEATHER, CLOCK]) == both(CHAT, tools=TOOLS)


def test_nested_arguments():
    arguments = {"a": {"b": [1, {"c": True}], "d": None}, "e": 2.5, "g": [], "h": False}
    message = {"role": "assistant", "content": "", "tool_calls": [{"name": "f", "arguments": arguments}]}
    text = both([message], add_generation_prompt=False)
    block = (
        f'{NS}<invoke name="f">{NS}<a>{NS}<b>{NS}<item>1{NS}</item>{NS}<item>{NS}<c>true{NS}</c>'
        f"{NS}</item>{NS}</b>{NS}</a>{NS}<e>2.5{NS}</e>{NS}<g>{NS}</g>{NS}<h>false{NS}</h>{NS}</invoke>\n"
    )
    assert f"]~b]ai\n</mm:think>{NS}<tool_call>\n{block}{NS}</tool_call>[e~[\n" in text
    # ... and the parser reads it back (g: an empty element is "" without a schema).
    reply = parse_reply(text.split("]~b]ai\n")[-1].removesuffix("[e~[\n"))
    parsed = {"a": {"b": [1, {"c": True}]}, "e": 2.5, "g": "", "h": False}
    assert reply.tool_calls[0].arguments == parsed


# A reply as generated after the prompt's suffix, and its rendering in the next turn's history
# must continue the prompt exactly: that is what lets a session keep its cache.
ROUND_TRIPS = [
    ("enabled", "Let me add.</mm:think>4"),
    ("enabled", f"Need weather.</mm:think>{NS}<tool_call>\n"
                f'{NS}<invoke name="get_weather">{NS}<location>Boston{NS}</location>{NS}</invoke>\n'
                f"{NS}</tool_call>"),
    ("disabled", "4"),
    ("adaptive", "<mm:think>Easy.</mm:think>4"),
    ("adaptive", "</mm:think>4"),
]


@pytest.mark.parametrize("mode, generated", ROUND_TRIPS)
def test_history_continues_the_prompt(mode, generated):
    prompt = both(CHAT, thinking=mode, tools=TOOLS)
    reply = parse_reply(generated, in_reasoning=prompt.endswith("<mm:think>"), tools=TOOLS)
    history = both(CHAT + [reply.to_message()], thinking=mode, tools=TOOLS,
                   add_generation_prompt=False)
    assert history == prompt + generated + "[e~[\n"


def test_special_tokens_are_single_tokens(tmp_path):
    from m3mlx.demo import write_tokenizer

    write_tokenizer(tmp_path)
    tok = Tokenizer.from_dir(tmp_path)
    specials = ["]~!b[", "]~b]", "[e~[", "<mm:think>", "</mm:think>", NS]
    ids = {s: tok.token_to_id(s) for s in specials}
    assert None not in ids.values() and len(set(ids.values())) == len(specials)
    text = both(TOOL_CHAT, tools=TOOLS, thinking="enabled")
    encoded = tok.encode(text)
    assert tok.decode(encoded) == text
    for s, i in ids.items():
        assert encoded.count(i) == text.count(s), s
    assert tok.eos_token_ids == [ids["[e~["]]


def test_template_sees_special_tokens():
    template = "{{ bos_token }}|{{ eos_token }}|{{ messages[0].content }}"
    assert render_template(template, CHAT) == "]~!b[|[e~[|Hi"
