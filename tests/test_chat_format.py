"""Chat rendering: the built-in renderer and the shipped jinja template, against the format of
m3-model.md sections 5.2-5.4."""

import pytest

from m3mlx.chat_format import (
    M3_CHAT_TEMPLATE,
    TemplateError,
    parse_reply,
    render_builtin,
    render_chat,
    render_template,
)
from m3mlx.tokenizer import Tokenizer

NS = "]<]minimax[>["

# The expected text is spelled out here, independently of the module's constants.
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
    "Each argument is a tag named after its parameter; nested objects become nested tags and "
    "arrays become repeated item tags. Example:\n\n"
    f"{NS}<tool_call>\n"
    f'{NS}<invoke name="tool-name-1">{NS}<param-1>value-1{NS}</param-1>{NS}<param-2>'
    f"{NS}<item>value-a{NS}</item>{NS}<item>value-b{NS}</item>{NS}</param-2>{NS}</invoke>\n"
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


def expected_prompt(mode, with_tools, system="You are a helpful assistant.", turns=CHAT_TEXT):
    system_turn = (
        f"]~!b[]~b]system\n{system}{THINKING_HEAD}{MODE_LINE[mode]}</thinking_instructions>"
        + (TOOLS_TEXT if with_tools else "")
        + "[e~[\n"
    )
    return system_turn + turns + PROMPT_END[mode]


def both(messages, **kwargs):
    """Render with the built-in renderer and the shipped template; they must agree."""
    builtin = render_builtin(messages, **kwargs)
    templated = render_template(M3_CHAT_TEMPLATE, messages, **kwargs)
    assert builtin == templated
    return builtin


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
        render_builtin(messages)
    with pytest.raises(ValueError, match=match):
        render_template(M3_CHAT_TEMPLATE, messages)


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="thinking mode must be one of"):
        render_chat(CHAT, thinking="on")
    with pytest.raises(ValueError, match="tool 0 has no function name"):
        render_chat(CHAT, tools=[{"type": "function", "function": {"description": "x"}}])
    with pytest.raises(TemplateError, match="does not compile"):
        render_template("{% if %}", CHAT)
    with pytest.raises(TemplateError, match="refused the conversation: nope"):
        render_template("{{ raise_exception('nope') }}", CHAT)


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
