"""Streaming reply parser: reasoning, tool calls, schema typing, malformed output."""

import itertools
import random
import warnings

import pytest

from m3mlx.chat_format import (
    MalformedOutputWarning,
    ParsedReply,
    ReplyParser,
    ToolCall,
    parse_reply,
    parse_tool_block,
)

NS = "]<]minimax[>["
OPEN = NS + "<tool_call>"
CLOSE = NS + "</tool_call>"


def tag(name, value):
    return f"{NS}<{name}>{value}{NS}</{name}>"


def invoke(name, *args):
    return f'{NS}<invoke name="{name}">' + "".join(args) + f"{NS}</invoke>\n"


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {
                "location": {"type": "string"},
                "days": {"type": "integer"},
                "metric": {"type": "boolean"},
                "zip": {"type": "string"},
            },
        },
    },
}
SEARCH = {
    "type": "function",
    "function": {
        "name": "search",
        "parameters": {
            "type": "object",
            "properties": {
                "query": {"type": "string"},
                "filters": {
                    "type": "object",
                    "properties": {
                        "min_score": {"type": "number"},
                        "tags": {"type": "array", "items": {"type": "string"}},
                    },
                },
                "pages": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {"n": {"type": "integer"}, "title": {"type": "string"}},
                    },
                },
                "limit": {"type": ["integer", "null"]},
            },
        },
    },
}
TOOLS = [WEATHER, SEARCH]

TOOL_BLOCK = (
    f"{OPEN}\n"
    + invoke("get_weather", tag("location", "Boston, MA"), tag("days", "3"),
             tag("metric", "true"), tag("zip", "02134"))
    + invoke(
        "search",
        tag("query", "a < b & c"),
        tag("filters", tag("min_score", "0.5") + tag("tags", tag("item", "x") + tag("item", "1"))),
        tag("pages", tag("item", tag("n", "1") + tag("title", "One"))
            + tag("item", tag("n", "2") + tag("title", "Two"))),
        tag("limit", "null"),
    )
    + CLOSE
)
TOOL_CALLS = [
    ToolCall("get_weather", {"location": "Boston, MA", "days": 3, "metric": True, "zip": "02134"}),
    ToolCall(
        "search",
        {
            "query": "a < b & c",
            "filters": {"min_score": 0.5, "tags": ["x", "1"]},
            "pages": [{"n": 1, "title": "One"}, {"n": 2, "title": "Two"}],
            "limit": None,
        },
    ),
]

# (output text, starts in reasoning, expected reply)
CASES = {
    "plain": ("Hi, 2 < 3 and a]b[c.", False, ParsedReply("Hi, 2 < 3 and a]b[c.", None, [])),
    "enabled": ("step 1, step 2</mm:think>The answer is 4.", True,
                ParsedReply("The answer is 4.", "step 1, step 2", [])),
    "enabled_unclosed": ("thinking <mm:think", True, ParsedReply("", "thinking <mm:think", [])),
    "adaptive_think": ("<mm:think>hmm</mm:think>Sure.", False, ParsedReply("Sure.", "hmm", [])),
    "stray_closer": ("</mm:think>Direct answer.", False, ParsedReply("Direct answer.", None, [])),
    "late_closer_is_content": ("Text </mm:think> more", False,
                               ParsedReply("Text </mm:think> more", None, [])),
    "late_opener_is_content": ("a <mm:think>b", False, ParsedReply("a <mm:think>b", None, [])),
    "partial_tag_text": ("ends with ]<]minimax[>[<tool_cal", False,
                         ParsedReply("ends with ]<]minimax[>[<tool_cal", None, [])),
    "namespace_not_tool": (f"x {NS}<other> y", False, ParsedReply(f"x {NS}<other> y", None, [])),
    "tools": (f"</mm:think>Checking.\n{TOOL_BLOCK}", False,
              ParsedReply("Checking.\n", None, TOOL_CALLS)),
    "think_then_tools": (f"plan</mm:think>{TOOL_BLOCK} done", True,
                         ParsedReply(" done", "plan", TOOL_CALLS)),
    "two_blocks": (f"{OPEN}{invoke('get_weather', tag('days', '1'))}{CLOSE}mid"
                   f"{OPEN}{invoke('get_weather', tag('days', '2'))}{CLOSE}", False,
                   ParsedReply("mid", None, [ToolCall("get_weather", {"days": 1}),
                                             ToolCall("get_weather", {"days": 2})])),
    "empty": ("", False, ParsedReply("", None, [])),
    "empty_enabled": ("", True, ParsedReply("", "", [])),
}


def stream(chunks, in_reasoning):
    """Feed chunks; return the parser, the deltas, and the content/reasoning seen after each."""
    parser = ReplyParser(in_reasoning=in_reasoning, tools=TOOLS)
    seen = []
    content = reasoning = ""
    calls = []
    for chunk in chunks:
        d = parser.feed(chunk)
        content, reasoning, calls = content + d.content, reasoning + d.reasoning, calls + d.tool_calls
        seen.append((content, reasoning))
    d = parser.finish()
    content, reasoning, calls = content + d.content, reasoning + d.reasoning, calls + d.tool_calls
    return parser, (content, reasoning, calls), seen


def check_stream(chunks, in_reasoning, expected):
    parser, (content, reasoning, calls), seen = stream(chunks, in_reasoning)
    assert parser.reply == expected
    assert (content, reasoning or None, calls) == (
        expected.content, expected.reasoning or None, expected.tool_calls)
    for shown_content, shown_reasoning in seen:  # nothing shown is ever taken back
        assert expected.content.startswith(shown_content)
        assert (expected.reasoning or "").startswith(shown_reasoning)


@pytest.mark.parametrize("name", sorted(CASES))
def test_one_shot(name):
    text, in_reasoning, expected = CASES[name]
    assert parse_reply(text, in_reasoning=in_reasoning, tools=TOOLS) == expected


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_split_point(name):
    text, in_reasoning, expected = CASES[name]
    for i in range(len(text) + 1):
        check_stream([text[:i], text[i:]], in_reasoning, expected)
    check_stream(list(text), in_reasoning, expected)


@pytest.mark.parametrize("name", ["enabled", "adaptive_think", "stray_closer", "partial_tag_text",
                                  "two_blocks"])
def test_every_pair_of_split_points(name):
    text, in_reasoning, expected = CASES[name]
    for i, j in itertools.combinations(range(len(text) + 1), 2):
        check_stream([text[:i], text[i:j], text[j:]], in_reasoning, expected)


def test_partial_tags_are_held_back():
    parser = ReplyParser()
    assert parser.feed("Hi ").content == "Hi "
    assert parser.feed("]<]minimax[>[<tool").content == ""
    delta = parser.feed("_call>" + invoke("f", tag("a", "1")))
    assert not delta and parser.reply.content == "Hi "
    delta = parser.feed(CLOSE)
    assert delta.tool_calls == [ToolCall("f", {"a": 1})] and delta.content == ""

    parser = ReplyParser(in_reasoning=True)
    assert parser.feed("think </mm:th").reasoning == "think "
    assert parser.feed("ink>answer").content == "answer"

    parser = ReplyParser()
    assert parser.feed("</mm").content == ""  # could be the stray closer
    assert parser.feed("x").content == "</mmx"


@pytest.mark.parametrize(
    "schema, text, value",
    [
        ({"type": "string"}, " 42 ", " 42 "),
        ({"type": "integer"}, " 42\n", 42),
        ({"type": "integer"}, "-7", -7),
        ({"type": "integer"}, "3.0", 3),
        ({"type": "number"}, "2.5e3", 2500.0),
        ({"type": "number"}, "8", 8),
        ({"type": "boolean"}, "false", False),
        ({"type": ["string", "null"]}, "null", None),
        ({"type": ["string", "null"]}, "none", "none"),
        ({"anyOf": [{"type": "integer"}, {"type": "string"}]}, "12", 12),
        ({"anyOf": [{"type": "integer"}, {"type": "string"}]}, "twelve", "twelve"),
        ({"type": "object"}, '{"a": [1, 2]}', {"a": [1, 2]}),
        ({"type": "array"}, "[1, 2]", [1, 2]),
        ({"type": "array"}, "", []),
        ({"enum": ["a", "b"]}, "b", "b"),
        (None, "17", 17),
        (None, "true", True),
        (None, "02134", "02134"),
        (None, "Boston", "Boston"),
        (None, '"quoted"', '"quoted"'),
        (None, "NaN", "NaN"),
    ],
)
def test_values_are_typed_by_schema(schema, text, value):
    tools = None
    if schema is not None:
        params = {"type": "object", "properties": {"v": schema}}
        tools = [{"name": "f", "parameters": params}]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        calls = parse_reply(f"{OPEN}{invoke('f', tag('v', text))}{CLOSE}", tools=tools).tool_calls
    assert calls == [ToolCall("f", {"v": value})]
    assert type(calls[0].arguments["v"]) is type(value)


def test_structures_without_schema():
    body = invoke(
        "f",
        tag("obj", tag("a", "1") + tag("b", tag("item", "x") + tag("item", "y"))),
        tag("tag", "p"),
        tag("tag", "q"),
        tag("mixed", "lead text" + tag("k", "v")),
        tag("empty", ""),
    )
    [call] = parse_tool_block(body)
    assert call == ToolCall(
        "f",
        {"obj": {"a": 1, "b": ["x", "y"]}, "tag": ["p", "q"], "mixed": {"k": "v", "$text": "lead text"},
         "empty": ""},
    )


@pytest.mark.parametrize(
    "block, why",
    [
        (f"{OPEN}{invoke('get_weather', tag('days', '1'))}", "ended inside"),  # never closed
        (f"{OPEN}{NS}<invoke name=\"f\">{NS}<a>1{NS}</b>{NS}</invoke>{CLOSE}", "does not match"),
        (f"{OPEN}{NS}<invoke name=\"f\">{NS}<a>1{NS}</invoke>{CLOSE}", "does not match"),
        (f"{OPEN}{NS}<invoke>{tag('a', '1')}{NS}</invoke>{CLOSE}", "expected <invoke"),
        (f"{OPEN}{NS}<invoke name=\"\">{NS}</invoke>{CLOSE}", "expected <invoke"),
        (f"{OPEN}{tag('a', '1')}{CLOSE}", "expected <invoke"),
        (f"{OPEN}chatter {invoke('f')}{CLOSE}", "outside any invoke"),
        (f"{OPEN}\n{CLOSE}", "no invoke"),
        (f"{OPEN}{NS}<invoke name=\"f\">{tag('a', '1')}{CLOSE}", "never closed"),
    ],
)
def test_malformed_blocks_degrade_to_content(block, why):
    text = "Before " + block + " after"
    for chunks in ([text], list(text)):
        with pytest.warns(MalformedOutputWarning, match=why):
            parser, (content, reasoning, calls), seen = stream(chunks, False)
        assert parser.reply == ParsedReply(text, None, [])
        assert content == text and calls == []


def test_value_against_schema_warns_and_keeps_text():
    text = f"{OPEN}{invoke('get_weather', tag('days', 'three'), tag('metric', 'yes'))}{CLOSE}"
    with pytest.warns(MalformedOutputWarning) as record:
        reply = parse_reply(text, tools=TOOLS)
    assert ["days = 'three'" in str(w.message) for w in record] == [True, False]
    assert "metric = 'yes' does not match its declared type boolean" in str(record[1].message)
    assert reply.tool_calls == [ToolCall("get_weather", {"days": "three", "metric": "yes"})]


def test_undeclared_tool_warns_and_is_kept():
    with pytest.warns(MalformedOutputWarning, match="not a declared tool"):
        reply = parse_reply(f"{OPEN}{invoke('launch', tag('n', '5'))}{CLOSE}", tools=TOOLS)
    assert reply.tool_calls == [ToolCall("launch", {"n": 5})]


def test_tool_call_message_shape():
    reply = ParsedReply("text", "why", [ToolCall("f", {"a": 1})])
    assert reply.to_message() == {
        "role": "assistant",
        "content": "text",
        "reasoning_content": "why",
        "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {"a": 1}}}],
    }
    assert ParsedReply("x", None, []).to_message() == {"role": "assistant", "content": "x"}


def test_random_garbage_never_raises_and_streams_like_one_shot():
    pieces = ["<mm:think>", "</mm:think>", NS, "<tool_call>", "</tool_call>", '<invoke name="f">',
              "</invoke>", "<a>", "</a>", "<item>", "</item>", "x", " ", "1", "<", ">", "]", "\n"]
    rng = random.Random(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MalformedOutputWarning)
        for _ in range(300):
            text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 30)))
            in_reasoning = rng.random() < 0.5
            expected = parse_reply(text, in_reasoning=in_reasoning)
            cuts = sorted(rng.sample(range(len(text) + 1), min(3, len(text) + 1)))
            chunks = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
            parser = ReplyParser(in_reasoning=in_reasoning)
            for chunk in chunks:
                parser.feed(chunk)
            parser.finish()
            assert parser.reply == expected
