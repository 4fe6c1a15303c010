"""Streaming reply parser: reasoning, tool calls, schema typing, and what M3 really emits.

Every case is parsed at once and streamed split at every boundary (two chunks at each split
point, and one character at a time); the results must agree and nothing shown may be taken
back. Several inputs are those public M3 parsers (sglang, vLLM) are tested on.
"""

import itertools
import random
import warnings

import pytest

from m3mlx import MalformedOutputWarning, ReplyParser, ToolCall, parse_reply
from m3mlx.chat_format import render_chat
from m3mlx.reply_parser import ParsedReply

NS = "]<]minimax[>["
OPEN = NS + "<tool_call>"
CLOSE = NS + "</tool_call>"


def tag(name, value):
    return f"{NS}<{name}>{value}{NS}</{name}>"


def invoke(name, *args):
    return f'{NS}<invoke name="{name}">' + "".join(args) + f"{NS}</invoke>\n"


def block(*invokes):
    return f"{OPEN}\n" + "".join(invokes) + CLOSE


def fn(name, properties, **extra):
    return {"type": "function", "function": {
        "name": name, "parameters": {"type": "object", "properties": properties, **extra}}}


WEATHER = fn("get_weather", {"location": {"type": "string"}, "days": {"type": "integer"},
                             "metric": {"type": "boolean"}, "zip": {"type": "string"},
                             "city": {"type": "string"}})
SEARCH = fn("search", {
    "query": {"type": "string"},
    "filters": {"type": "object", "properties": {
        "min_score": {"type": "number"}, "tags": {"type": "array", "items": {"type": "string"}}}},
    "pages": {"type": "array", "items": {"type": "object", "properties": {
        "n": {"type": "integer"}, "title": {"type": "string"}}}},
    "limit": {"type": ["integer", "null"]},
})
# The study-plan tool of sglang's M3 detector tests: every JSON type, nested.
PLAN = fn("make_plan", {
    "start_date": {"type": "string"},
    "session_minutes": {"type": "integer"},
    "score": {"type": "number"},
    "include_buffer": {"type": "boolean"},
    "priority": {"enum": [1, 2, 3]},
    "note": {"anyOf": [{"type": "string"}, {"type": "null"}]},
    "rest_days": {"type": "array", "items": {"type": "string"}},
    "preferences": {"type": "object", "properties": {
        "algorithm": {"type": "string"}, "retries": {"type": "integer"}}},
    "subjects": {"type": "array", "items": {"type": "object", "properties": {
        "name": {"type": "string"}, "hours": {"type": "number"}}}},
}, required=["start_date"])
CONFIGURE = fn("configure", {"mode": {"type": "string", "enum": ["none", "low", "high"]},
                             "optional": {"type": ["string", "null"]}})
EVENT = fn("create_event", {
    "title": {"type": "string"},
    "location": {"type": "object", "properties": {"city": {"type": "string"},
                                                  "zip": {"type": "integer"}}},
    "tags": {"type": "array", "items": {"type": "string"}},
})
NEST = fn("nest", {"tree": {"type": "object"}})  # any keys, nested as deep as it likes
TOOLS = [WEATHER, SEARCH, PLAN, CONFIGURE, EVENT, NEST]
DEEP = block(invoke("nest", f"{NS}<tree>" + f"{NS}<a>" * 300 + "x" + f"{NS}</a>" * 300
                    + f"{NS}</tree>"))

TOOL_BLOCK = block(
    invoke("get_weather", tag("location", "Boston, MA"), tag("days", "3"),
           tag("metric", "true"), tag("zip", "02134")),
    invoke("search",
           tag("query", "a < b & c"),
           tag("filters", tag("min_score", "0.5")
               + tag("tags", tag("item", "x") + tag("item", "1"))),
           tag("pages", tag("item", tag("n", "1") + tag("title", "One"))
               + tag("item", tag("n", "2") + tag("title", "Two"))),
           tag("limit", "null")),
)
TOOL_CALLS = [
    ToolCall("get_weather", {"location": "Boston, MA", "days": 3, "metric": True, "zip": "02134"}),
    ToolCall("search", {
        "query": "a < b & c",
        "filters": {"min_score": 0.5, "tags": ["x", "1"]},
        "pages": [{"n": 1, "title": "One"}, {"n": 2, "title": "Two"}],
        "limit": None,
    }),
]

PLAN_XML = (
    tag("start_date", "2025-11-10") + tag("session_minutes", "45") + tag("score", "18.5")
    + tag("include_buffer", "true") + tag("priority", "2") + tag("note", "null")
    + tag("rest_days", tag("item", "Sun") + tag("item", "Sat"))
    + tag("preferences", tag("algorithm", "SM2") + tag("retries", "3"))
    + tag("subjects", tag("item", tag("name", "Calculus") + tag("hours", "30"))
          + tag("item", tag("name", "History") + tag("hours", "18")))
)
PLAN_ARGS = {
    "start_date": "2025-11-10", "session_minutes": 45, "score": 18.5, "include_buffer": True,
    "priority": 2, "note": None, "rest_days": ["Sun", "Sat"],
    "preferences": {"algorithm": "SM2", "retries": 3},
    "subjects": [{"name": "Calculus", "hours": 30}, {"name": "History", "hours": 18}],
}
BEIJING = [ToolCall("get_weather", {"city": "Beijing"})]


def weather(*params):
    return block(f'{NS}<invoke name="get_weather">' + "".join(params) + f"{NS}</invoke>\n")


# name: (output text, starts in reasoning, expected reply)
CASES = {
    "plain": ("Hi, 2 < 3 and a]b[c.", False, ParsedReply("Hi, 2 < 3 and a]b[c.", None, [])),
    "enabled": ("step 1, step 2</mm:think>The answer is 4.", True,
                ParsedReply("The answer is 4.", "step 1, step 2", [])),
    "enabled_unclosed": ("thinking <mm:thi", True, ParsedReply("", "thinking <mm:thi", [])),
    "adaptive_think": ("<mm:think>hmm</mm:think>Sure.", False, ParsedReply("Sure.", "hmm", [])),
    "stray_closer": ("</mm:think>Direct answer.", False, ParsedReply("Direct answer.", None, [])),
    "newline_then_closer": ("\n</mm:think>Direct.", False, ParsedReply("Direct.", None, [])),
    "late_closer_is_content": ("Text </mm:think> more", False,
                               ParsedReply("Text </mm:think> more", None, [])),
    # A think block that opens after some text: the text stays content.
    "think_after_text": ("Sure. <mm:think>plan</mm:think>Done.", False,
                         ParsedReply("Sure. Done.", "plan", [])),
    "think_after_text_unclosed": ("a <mm:think>b", False, ParsedReply("a ", "b", [])),
    "second_think_is_content": ("<mm:think>x</mm:think>y<mm:think>z", False,
                                ParsedReply("y<mm:think>z", "x", [])),
    # A repeated opening think tag is dropped.
    "repeated_opener": ("<mm:think><mm:think>r</mm:think>c", False, ParsedReply("c", "r", [])),
    "repeated_opener_enabled": ("<mm:think>r</mm:think>c", True, ParsedReply("c", "r", [])),
    "partial_tag_text": ("ends with ]<]minimax[>[<tool_cal", False,
                         ParsedReply("ends with ]<]minimax[>[<tool_cal", None, [])),
    "namespace_not_tool": (f"x {NS}<other> y", False, ParsedReply(f"x {NS}<other> y", None, [])),
    "tool_call_word": ("the <tool_call> tag", False, ParsedReply("the <tool_call> tag", None, [])),
    "tools": (f"</mm:think>Checking.\n{TOOL_BLOCK}", False,
              ParsedReply("Checking.\n", None, TOOL_CALLS)),
    "think_then_tools": (f"plan</mm:think>{TOOL_BLOCK} done", True,
                         ParsedReply(" done", "plan", TOOL_CALLS)),
    # Reasoning that runs into a tool call without its closing tag ends there.
    "tools_inside_reasoning": (f"plan{TOOL_BLOCK}", True, ParsedReply("", "plan", TOOL_CALLS)),
    "two_blocks": (f"{block(invoke('get_weather', tag('days', '1')))}mid"
                   f"{block(invoke('get_weather', tag('days', '2')))}", False,
                   ParsedReply("mid", None, [ToolCall("get_weather", {"days": 1}),
                                             ToolCall("get_weather", {"days": 2})])),
    "bracket_before_block": (f"done]{block(invoke('get_weather', tag('days', '1')))}", False,
                             ParsedReply("done]", None, [ToolCall("get_weather", {"days": 1})])),
    "nested_types": ("Here you go." + block(invoke("make_plan", PLAN_XML)), False,
                     ParsedReply("Here you go.", None, [ToolCall("make_plan", PLAN_ARGS)])),
    # Whitespace or a newline between the prefix and the tag.
    "spaced_prefix": (f"{NS} <tool_call>\n{NS}\n<invoke name=\"get_weather\"> {NS} <city> Beijing"
                      f"{NS} </city>\n{NS} </invoke>\n{NS}\n</tool_call>", False,
                      ParsedReply("", None, BEIJING)),
    # The shape seen live from one provider: bare opener, spaced prefixes, bare closers.
    "bare_opener": (f"I'll check. <tool_call>\n{NS} <invoke name=\"get_weather\"> {NS} <city> "
                    f"Beijing</city>\n{NS} </invoke>\n{NS}</tool_call>", False,
                    ParsedReply("I'll check. ", None, BEIJING)),
    # Closing tags written without the prefix.
    "bare_closers": (f"{OPEN}{NS}<invoke name=\"get_weather\">{NS}<city>Beijing</city></invoke>"
                     f"</tool_call>", False, ParsedReply("", None, BEIJING)),
    # A parameter whose closing tag was dropped.
    "dropped_param_closer": (weather(f"{NS}<city>Beijing"), False, ParsedReply("", None, BEIJING)),
    # ... before the next parameter: the newline between them is not part of the value.
    "dropped_closer_then_sibling": (weather(f"{NS}<city>Beijing\n", tag("days", "2")), False,
                                    ParsedReply("", None, [ToolCall("get_weather", {
                                        "city": "Beijing", "days": 2})])),
    "closed_value_keeps_its_newline": (weather(tag("city", "Beijing\n")), False, ParsedReply(
        "", None, [ToolCall("get_weather", {"city": "Beijing\n"})])),
    "dropped_array_closer": (block(invoke("make_plan", PLAN_XML.replace(f"{NS}</rest_days>", ""))),
                             False, ParsedReply("", None, [ToolCall("make_plan", PLAN_ARGS)])),
    "dropped_object_closer": (block(invoke("make_plan",
                                           PLAN_XML.replace(f"{NS}</preferences>", ""))),
                              False, ParsedReply("", None, [ToolCall("make_plan", PLAN_ARGS)])),
    "dropped_invoke_closer": (f"{OPEN}{NS}<invoke name=\"get_weather\">{tag('city', 'Beijing')}"
                              f"{CLOSE}", False, ParsedReply("", None, BEIJING)),
    "dropped_block_closer": (f"{OPEN}\n{invoke('get_weather', tag('city', 'Beijing'))}", False,
                             ParsedReply("", None, BEIJING)),
    # Stray unknown closing tags.
    "wrong_closer": (weather(f"{NS}<city>Beijing{NS}</wrong>"), False,
                     ParsedReply("", None, BEIJING)),
    "wrong_then_right_closer": (weather(f"{NS}<city>Beijing{NS}</wrong>{NS}</city>"), False,
                                ParsedReply("", None, BEIJING)),
    "trailing_stray_closer": (weather(tag("city", "Beijing") + f"{NS}</wrong>"), False,
                              ParsedReply("", None, BEIJING)),
    "stray_closer_between": (block(invoke("make_plan", PLAN_XML.replace(
        f"{NS}<score>", f"{NS}</bogus>{NS}<score>"))), False,
        ParsedReply("", None, [ToolCall("make_plan", PLAN_ARGS)])),
    "unclosed_sibling": (block(invoke("create_event", f"{NS}<location>" + tag("city", "Beijing")
                                      + f"{NS}<zip>10001{NS}</location>")), False,
                         ParsedReply("", None, [ToolCall("create_event", {
                             "location": {"city": "Beijing", "zip": 10001}})])),
    "enum_none_stays_string": (block(invoke("configure", tag("mode", "none"),
                                            tag("optional", "null"))), False,
                               ParsedReply("", None, [ToolCall("configure", {
                                   "mode": "none", "optional": None})])),
    "angle_brackets_in_value": (block(invoke("search", tag("query", "a < b > c </b> d"))), False,
                                ParsedReply("", None, [ToolCall("search", {
                                    "query": "a < b > c </b> d"})])),
    "special_characters": (block(invoke("search", tag("query", 'a "q" and \\ back\nslash'))),
                           False, ParsedReply("", None, [ToolCall("search", {
                               "query": 'a "q" and \\ back\nslash'})])),
    "case_folded_name": (block(invoke("Get_Weather", tag("city", "Beijing"))), False,
                         ParsedReply("", None, BEIJING)),
    "empty": ("", False, ParsedReply("", None, [])),
    "empty_enabled": ("", True, ParsedReply("", "", [])),
}

# Garbled `name=` glue of the invoke tag (seen at long context): still unambiguous.
INVOKE_FORMS = ['<invoke name get_weather">', '<invoke nameget_weather">',
                '<invoke name name="get_weather">', f'<invoke name{NS}<get_weather">']
for i, form in enumerate(INVOKE_FORMS):
    CASES[f"invoke_form_{i}"] = (f"{OPEN}{NS}{form}{tag('city', 'Beijing')}{NS}</invoke>{CLOSE}",
                                 False, ParsedReply("", None, BEIJING))


def stream(chunks, in_reasoning, tools=TOOLS):
    """Feed chunks; return the parser, the totals, and the content/reasoning seen after each."""
    parser = ReplyParser(in_reasoning=in_reasoning, tools=tools)
    seen = []
    content = reasoning = ""
    calls = []
    for chunk in chunks + [None]:
        d = parser.feed(chunk) if chunk is not None else parser.finish()
        content, reasoning, calls = (content + d.content, reasoning + d.reasoning,
                                     calls + d.tool_calls)
        if chunk is not None:
            seen.append((content, reasoning))
    return parser, (content, reasoning, calls), seen


def check_stream(chunks, in_reasoning, expected, tools=TOOLS):
    parser, (content, reasoning, calls), seen = stream(chunks, in_reasoning, tools)
    assert parser.reply == expected
    assert (content, reasoning or None, calls) == (
        expected.content, expected.reasoning or None, expected.tool_calls)
    for shown_content, shown_reasoning in seen:  # nothing shown is ever taken back
        assert expected.content.startswith(shown_content)
        assert (expected.reasoning or "").startswith(shown_reasoning)


def every_split(text):
    for i in range(len(text) + 1):
        yield [text[:i], text[i:]]
    yield list(text)


@pytest.mark.parametrize("name", sorted(CASES))
def test_one_shot(name):
    text, in_reasoning, expected = CASES[name]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every case here is read without a warning
        assert parse_reply(text, in_reasoning=in_reasoning, tools=TOOLS) == expected


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_split_point(name):
    text, in_reasoning, expected = CASES[name]
    for chunks in every_split(text):
        check_stream(chunks, in_reasoning, expected)


@pytest.mark.parametrize("name", ["enabled", "adaptive_think", "stray_closer", "partial_tag_text",
                                  "two_blocks", "spaced_prefix", "think_after_text"])
def test_every_pair_of_split_points(name):
    text, in_reasoning, expected = CASES[name]
    for i, j in itertools.combinations(range(len(text) + 1), 2):
        check_stream([text[:i], text[i:j], text[j:]], in_reasoning, expected)


def test_calls_are_returned_as_each_invoke_completes():
    parser = ReplyParser(tools=TOOLS)
    assert parser.feed("Hi ").content == "Hi "
    assert parser.feed("]<]minimax[>[<tool").content == ""
    first = invoke("get_weather", tag("days", "1"))
    delta = parser.feed("_call>\n" + first[:-12])
    assert not delta and parser.reply.content == "Hi "
    delta = parser.feed(first[-12:])
    assert delta.tool_calls == [ToolCall("get_weather", {"days": 1})]
    delta = parser.feed(invoke("get_weather", tag("days", "2")) + CLOSE + " bye")
    assert delta.tool_calls == [ToolCall("get_weather", {"days": 2})] and delta.content == " bye"

    parser = ReplyParser(in_reasoning=True)
    assert parser.feed("think </mm:th").reasoning == "think "
    assert parser.feed("ink>answer").content == "answer"

    parser = ReplyParser()
    assert parser.feed("</mm").content == ""  # could be the leading closer
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
        ({"enum": [1, 2, 3]}, "2", 2),  # an enum keeps its values' type
        ({"enum": [1.5, "x"]}, "1.5", 1.5),
        ({"enum": [True, False]}, "false", False),
        ({"type": "string", "enum": ["nil", "null"]}, "null", "null"),
        ({"const": 7}, "7", 7),
        ({"$ref": "#/$defs/Count"}, "5", 5),
        ({"$ref": "#/definitions/Flag"}, "true", True),
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
        params = {"type": "object", "properties": {"v": schema},
                  "$defs": {"Count": {"type": "integer"}},
                  "definitions": {"Flag": {"type": "boolean"}}}
        tools = [{"name": "f", "parameters": params}]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        calls = parse_reply(block(invoke("f", tag("v", text))), tools=tools).tool_calls
    assert calls == [ToolCall("f", {"v": value})]
    assert type(calls[0].arguments["v"]) is type(value)


@pytest.mark.parametrize("which", ["number", "stringList", "numberList"])
def test_top_level_one_of_types_each_branch(which):
    """A top-level oneOf has no `properties` of its own (sglang's report case 14_07)."""
    params = {"type": "object", "oneOf": [
        {"type": "object", "properties": {"number": {"type": "number"}}},
        {"type": "object", "properties": {"stringList": {"type": "array",
                                                         "items": {"type": "string"}}}},
        {"type": "object", "properties": {"numberList": {"type": "array",
                                                         "items": {"type": "number"}}}},
    ]}
    xml = {"number": tag("number", "42"),
           "stringList": tag("stringList", tag("item", "12") + tag("item", "34")),
           "numberList": tag("numberList", tag("item", "12") + tag("item", "34"))}[which]
    expected = {"number": 42, "stringList": ["12", "34"], "numberList": [12, 34]}[which]
    [call] = parse_reply(block(invoke("f", xml)), tools=[{"name": "f", "parameters": params}]
                         ).tool_calls
    assert call.arguments == {which: expected}


def test_structure_repairs_respect_the_schema():
    # An object without declared properties keeps whatever keys it holds.
    extras = [fn("make_plan", {"extras": {"type": "object"}})]
    reply = parse_reply(block(invoke("make_plan", tag("extras", tag("whatever", "1")
                                                      + tag("other", "2")))), tools=extras)
    assert reply.tool_calls == [ToolCall("make_plan", {"extras": {"whatever": 1, "other": 2}})]
    # A key declared both at the top and inside a nested object stays nested.
    shadow = [fn("make_plan", {"name": {"type": "string"}, "inner": {
        "type": "object", "properties": {"name": {"type": "string"}}}})]
    reply = parse_reply(block(invoke("make_plan", tag("name", "outer")
                                     + tag("inner", tag("name", "nested")))), tools=shadow)
    assert reply.tool_calls == [ToolCall("make_plan", {"name": "outer",
                                                       "inner": {"name": "nested"}})]
    # Repeated tags of an array property, and a dropped </item> repaired by the schema.
    reply = parse_reply(block(invoke("create_event", tag("tags", "a"), tag("tags", "b"))),
                        tools=TOOLS)
    assert reply.tool_calls == [ToolCall("create_event", {"tags": ["a", "b"]})]
    items = PLAN_XML.replace(f"Calculus{NS}</name>{NS}<hours>30{NS}</hours>{NS}</item>",
                             f"Calculus{NS}</name>{NS}<hours>30{NS}</hours>")
    assert parse_reply(block(invoke("make_plan", items)), tools=TOOLS).tool_calls == [
        ToolCall("make_plan", PLAN_ARGS)]


def test_structures_without_schema():
    body = invoke(
        "f",
        tag("obj", tag("a", "1") + tag("b", tag("item", "x") + tag("item", "y"))),
        tag("tag", "p"),
        tag("tag", "q"),
        tag("mixed", "lead text" + tag("k", "v")),
        tag("empty", ""),
    )
    [call] = parse_reply(block(body)).tool_calls
    assert call == ToolCall(
        "f",
        {"obj": {"a": 1, "b": ["x", "y"]}, "tag": ["p", "q"],
         "mixed": {"k": "v", "$text": "lead text"}, "empty": ""},
    )


MALFORMED = {
    "unfinished": (f"{OPEN}{NS}<invoke name=\"get_weather\">{NS}<days>1", "ended inside"),
    "no_name": (f"{OPEN}{NS}<invoke>{tag('days', '1')}{NS}</invoke>{CLOSE}", "expected <invoke"),
    "empty_name": (f"{OPEN}{NS}<invoke name=\"\">{NS}</invoke>{CLOSE}", "expected <invoke"),
    "no_invoke": (f"{OPEN}{tag('days', '1')}{CLOSE}", "holds no invoke"),
    "empty_block": (f"{OPEN}\n{CLOSE}", "holds no invoke"),
    "undeclared": (block(invoke("launch_missiles", tag("n", "5"))), "not a declared tool"),
    "too_deep": (DEEP, "deeper than 32 levels"),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_blocks_are_content_with_a_warning(name):
    block_text, why = MALFORMED[name]
    text = "Before " + block_text + " after"
    expected = ParsedReply(text, None, [])
    for chunks in ([text], list(text), [text[:40], text[40:]]):
        with pytest.warns(MalformedOutputWarning, match=why):
            parser, (content, reasoning, calls), seen = stream(chunks, False)
        assert parser.reply == expected
        assert content == text and calls == []


def test_an_unreadable_call_beside_good_ones_is_content():
    text = block(invoke("get_weather", tag("city", "Beijing")), invoke("launch", tag("n", "1")))
    with pytest.warns(MalformedOutputWarning, match="'launch', which is not a declared tool"):
        reply = parse_reply(text, tools=TOOLS)
    assert reply.tool_calls == BEIJING
    assert reply.content == invoke("launch", tag("n", "1")).strip()


def test_never_a_call_holding_raw_xml():
    """Whatever the garbling, no argument value carries the tool-call markup."""
    tags = ['<invoke name="get_weather">', '<invoke name="search">', "</invoke>", "<city>",
            "</city>", "<filters>", "</filters>", "<item>", "</item>", "<tags>", "</tags>"]
    pieces = [OPEN, CLOSE, NS, "x", " ", "1", "\n"] + [NS + t for t in tags] + [
        NS + " " + t for t in tags] + ["</city>", "</invoke>", "</tags>"]
    rng = random.Random(1)

    def values(v):
        if isinstance(v, dict):
            for x in v.values():
                yield from values(x)
        elif isinstance(v, list):
            for x in v:
                yield from values(x)
        else:
            yield v

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MalformedOutputWarning)
        for _ in range(500):
            text = OPEN + "".join(rng.choice(pieces) for _ in range(rng.randint(1, 40)))
            for call in parse_reply(text, tools=TOOLS).tool_calls:
                assert call.name in ("get_weather", "search")
                for value in values(call.arguments):
                    assert not (isinstance(value, str) and (NS in value or "<invoke" in value))


def test_value_against_schema_warns_and_keeps_text():
    text = block(invoke("get_weather", tag("days", "three"), tag("metric", "yes")))
    with pytest.warns(MalformedOutputWarning) as record:
        reply = parse_reply(text, tools=TOOLS)
    assert ["days = 'three'" in str(w.message) for w in record] == [True, False]
    assert "metric = 'yes' does not match its declared type boolean" in str(record[1].message)
    assert reply.tool_calls == [ToolCall("get_weather", {"days": "three", "metric": "yes"})]


def test_without_declared_tools_any_name_is_a_call_and_with_none_it_is_content():
    text = block(invoke("launch", tag("n", "5")))
    assert parse_reply(text).tool_calls == [ToolCall("launch", {"n": 5})]
    with pytest.warns(MalformedOutputWarning, match="not a declared tool"):
        assert parse_reply(text, tools=[]) == ParsedReply(text, None, [])


def test_deeply_nested_output_keeps_the_conversation_renderable():
    """Issue 14 #4: 300 levels neither raise nor poison later turns."""
    with pytest.warns(MalformedOutputWarning):
        reply = parse_reply(DEEP, tools=TOOLS)
    assert reply.tool_calls == [] and reply.content == DEEP
    history = [{"role": "user", "content": "go"}, reply.to_message(),
               {"role": "user", "content": "and now?"}]
    assert render_chat(history, tools=TOOLS).endswith("]~b]user\nand now?[e~[\n]~b]ai\n")
    nested = {"a": 1}
    for _ in range(300):
        nested = {"a": nested}
    call = {"function": {"name": "search", "arguments": nested}}
    with pytest.raises(ValueError, match="nest deeper than 32 levels"):
        render_chat([{"role": "assistant", "content": "", "tool_calls": [call]}])


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
