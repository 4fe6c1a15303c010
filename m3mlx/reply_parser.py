"""M3's output back to messages: reasoning, content and tool calls, parsed as the text streams.

`ReplyParser.feed` takes decoded text in chunks of any size and returns what is safe to show,
holding back only text that might still become a tag. Tool calls are returned as each
`<invoke>` completes, arguments typed by the tool's JSON schema.

The parser accepts what M3 really writes, not only what its template renders (the cases public
M3 parsers are tested on): whitespace between the `]<]minimax[>[` prefix and its tag, closing
tags without the prefix, a dropped closing tag (repaired from the schema: a tag the open
element cannot hold but an ancestor declares closes the element), stray closing tags, an
`<invoke>` tag whose `name=` is garbled, a think block that opens after some text, a repeated
opening think tag, a tool call that starts before the reasoning is closed. Whatever is still
ambiguous -- an undeclared tool, an unfinished or nameless `<invoke>`, arguments nested deeper
than `MAX_ARGUMENT_DEPTH` -- is kept as plain content with a `MalformedOutputWarning`: the
parser never raises and never returns a call it had to guess.
"""

import json
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .chat_messages import MAX_ARGUMENT_DEPTH, normalize_tools
from .checks import parse_json
from .tokens import NS, THINK_BEGIN, THINK_END

TOOL_CALL = "tool_call"
_WS = " \t\r\n"
_MAX_WS = 8  # whitespace tolerated between the prefix and its tag (M3 writes one)
_MAX_TAG = 512  # characters a tag may take before it is read as text


class MalformedOutputWarning(UserWarning):
    """Model output that does not follow the M3 format; it was kept as plain text."""


def _warn(message: str):
    warnings.warn(message, MalformedOutputWarning, stacklevel=4)


@dataclass
class ToolCall:
    name: str
    arguments: Dict[str, Any]

    def to_message(self) -> Dict[str, Any]:
        """The OpenAI-style entry for an assistant message's `tool_calls`."""
        return {"type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class ReplyDelta:
    """What one chunk of output adds: visible content, reasoning, and completed tool calls."""

    content: str = ""
    reasoning: str = ""
    tool_calls: List[ToolCall] = field(default_factory=list)

    def __bool__(self):
        return bool(self.content or self.reasoning or self.tool_calls)


@dataclass
class ParsedReply:
    content: str
    reasoning: Optional[str]  # None when the reply had no reasoning block
    tool_calls: List[ToolCall]

    def to_message(self) -> Dict[str, Any]:
        message: Dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.reasoning:
            message["reasoning_content"] = self.reasoning
        if self.tool_calls:
            message["tool_calls"] = [c.to_message() for c in self.tool_calls]
        return message


# --------------------------------------------------------------------------------------------
# JSON schemas: types, properties and items, through anyOf/oneOf/allOf and local $refs
# --------------------------------------------------------------------------------------------

_SCALAR_ORDER = ("null", "boolean", "integer", "number", "object", "array", "string")
_JSON_NUMBER = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?")
_JSON_INTEGER = re.compile(r"-?(?:0|[1-9]\d*)")


@dataclass(frozen=True)
class _Schema:
    """A (sub)schema and the tool's parameter schema its `$ref`s point into."""

    node: Any
    root: Any

    def alternatives(self) -> List[dict]:
        """The schema and its anyOf/oneOf/allOf members, $refs resolved (bounded)."""
        out, stack = [], [(self.node, 0)]
        while stack and len(out) < 64:
            node, depth = stack.pop()
            for _ in range(16):  # follow a chain of local references
                if not (isinstance(node, dict) and isinstance(node.get("$ref"), str)):
                    break
                node = self._lookup(node["$ref"])
            if not isinstance(node, dict):
                continue
            out.append(node)
            if depth < 8:
                for key in ("allOf", "anyOf", "oneOf"):
                    members = node.get(key)
                    if isinstance(members, list):
                        stack.extend((m, depth + 1) for m in reversed(members))
        return out

    def _lookup(self, ref: str) -> Any:
        if not ref.startswith("#"):
            return None
        node = self.root
        for part in ref[1:].split("/"):
            if not part:
                continue
            part = part.replace("~1", "/").replace("~0", "~")
            node = node.get(part) if isinstance(node, dict) else None
        return node

    def types(self) -> List[str]:
        types: List[str] = []
        alternatives = self.alternatives()
        for node in alternatives:
            kind = node.get("type")
            for k in [kind] if isinstance(kind, str) else kind if isinstance(kind, list) else []:
                if isinstance(k, str) and k not in types:
                    types.append(k)
        if not types:
            for value in self.enum():
                k = _json_type(value)
                if k not in types:
                    types.append(k)
        if not types and any("properties" in n for n in alternatives):
            types.append("object")
        if not types and any("items" in n for n in alternatives):
            types.append("array")
        return types

    def enum(self) -> List[Any]:
        values = []
        for node in self.alternatives():
            if isinstance(node.get("enum"), list):
                values += node["enum"]
            if "const" in node:
                values.append(node["const"])
        return values

    def properties(self) -> Dict[str, Any]:
        merged: Dict[str, Any] = {}
        for node in self.alternatives():
            props = node.get("properties")
            if isinstance(props, dict):
                for key, value in props.items():
                    merged.setdefault(key, value)
        return merged

    def child(self, tag: str) -> "_Schema":
        props = self.properties()
        if tag in props:
            return _Schema(props[tag], self.root)
        for node in self.alternatives():
            if isinstance(node.get("additionalProperties"), dict):
                return _Schema(node["additionalProperties"], self.root)
        return _Schema(None, self.root)

    def items(self) -> "_Schema":
        for node in self.alternatives():
            if isinstance(node.get("items"), dict):
                return _Schema(node["items"], self.root)
        return _Schema(None, self.root)

    @property
    def array_like(self) -> bool:
        types = self.types()
        return "array" in types and "object" not in types and "string" not in types

    def declares(self, tag: str) -> bool:
        """The schema names `tag` as a child: positive evidence for repairing the structure."""
        return tag in self.properties() or (tag == "item" and self.array_like)

    def excludes(self, tag: str) -> bool:
        """The schema cannot hold a `tag` child (a scalar, an array, a closed object)."""
        types = self.types()
        if not types:
            return False
        if "object" not in types and "array" not in types:
            return True
        if self.array_like:
            return tag != "item"
        props = self.properties()
        open_ = any(n.get("additionalProperties") not in (None, False)
                    for n in self.alternatives())
        return bool(props) and tag not in props and not open_


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return "string"


def _reject_constant(name):
    raise ValueError(f"{name} is not JSON")


def _coerce(text: str, kind: str) -> Tuple[bool, Any]:
    """(ok, value) for `text` read as JSON-schema type `kind`."""
    s = text.strip()
    if kind == "string":
        return True, text
    if kind == "null":
        return s == "null", None
    if kind == "boolean":
        return (True, s == "true") if s in ("true", "false") else (False, None)
    if kind in ("integer", "number"):
        if not _JSON_NUMBER.fullmatch(s):
            return False, None
        if _JSON_INTEGER.fullmatch(s):
            return True, int(s)
        value = float(s)
        if kind == "number":
            return True, value
        return (True, int(value)) if value.is_integer() else (False, None)
    if kind in ("object", "array"):
        if not s:
            return True, {} if kind == "object" else []
        try:
            value = parse_json(s, parse_constant=_reject_constant)
        except ValueError:
            return False, None
        return isinstance(value, dict if kind == "object" else list), value
    return False, None


def _guess_value(text: str) -> Any:
    """An undeclared value: JSON numbers, booleans, null, objects and arrays; else the text."""
    try:
        value = parse_json(text.strip(), parse_constant=_reject_constant)
    except ValueError:
        return text
    return text if isinstance(value, str) else value


def _leaf_value(text: str, schema: _Schema, where: str) -> Any:
    stripped = text.strip()
    for value in schema.enum():  # an enum value keeps its own type
        if (value if isinstance(value, str) else json.dumps(value)) == stripped:
            return value
    types = schema.types()
    if not types:
        return _guess_value(text)
    for kind in sorted(types, key=lambda k: _SCALAR_ORDER.index(k) if k in _SCALAR_ORDER else 99):
        ok, value = _coerce(text, kind)
        if ok:
            return value
    _warn(f"tool argument {where} = {text!r} does not match its declared type "
          f"{' | '.join(types)}; kept as a string")
    return text


# --------------------------------------------------------------------------------------------
# Tool-call blocks
# --------------------------------------------------------------------------------------------

_OPEN_TAG = re.compile(r"<([A-Za-z_$][\w.\-:$]*)(\s[^<>]*)?>")
_CLOSE_TAG = re.compile(r"</\s*([A-Za-z_$][\w.\-:$]*)\s*>")
_PARTIAL_OPEN = re.compile(r"<[A-Za-z_$]?[\w.\-:$]*(\s[^<>]*)?")
_PARTIAL_CLOSE = re.compile(r"</?\s*[\w.\-:$]*\s*")
_NAME_ATTR = re.compile(r"""name\s*=\s*(?:"([^"]*)"|'([^']*)')""")
_LOOSE_NAME = re.compile(r"""\s*(?:name\s*)+=?\s*["']?([^"'\s=]+)["']?\s*""")


@dataclass
class _Element:
    tag: str
    schema: _Schema
    where: str
    spaced: bool = False  # whitespace between prefix and tag: the value is trimmed too
    text: List[str] = field(default_factory=list)
    children: List[Tuple[str, Any, bool]] = field(default_factory=list)  # (tag, value, as list)

    def container(self, tag: str) -> _Schema:
        """The schema that describes a `tag` child of this element."""
        if tag == "item" or self.schema.array_like:
            return self.schema.items()  # an <item>, or one of repeated object tags
        return self.schema

    def value(self, closed: bool = True) -> Tuple[Any, bool]:
        """(value, contributes a list) from the children, typed by the schema. A value whose
        closing tag was dropped loses the whitespace that separated it from the next tag."""
        schema = self.schema
        if not self.children:
            text = "".join(self.text)
            if self.spaced:
                text = text.strip()
            elif not closed:
                text = text.rstrip(_WS)
            if schema.array_like:
                ok, value = _coerce(text, "array")
                return (value if ok else [_leaf_value(text, schema.items(), self.where)]), True
            return _leaf_value(text, schema, self.where), False
        if all(tag == "item" for tag, _, _ in self.children) and "item" not in \
                schema.properties():
            return [v for _, v, _ in self.children], schema.array_like
        obj = _assemble(self.children, "".join(self.text).strip())
        return ([obj], True) if schema.array_like else (obj, False)


def _assemble(children: List[Tuple[str, Any, bool]], stray: str) -> Dict[str, Any]:
    repeats = Counter(tag for tag, _, as_list in children if not as_list)
    out: Dict[str, Any] = {}
    for tag, value, as_list in children:
        if as_list:
            out[tag] = out[tag] + value if isinstance(out.get(tag), list) else value
        elif repeats[tag] > 1:  # repeated tags form an array
            out.setdefault(tag, []).append(value)
        else:
            out[tag] = value
    if stray:  # text mixed with child tags
        out["$text"] = stray
    return out


def _schema_for(element: _Element, tag: str) -> _Schema:
    """The schema that says whether `element` may hold a `tag` child."""
    return element.schema if tag == "item" else element.container(tag)


class _Tools:
    """The declared tools (None: accept any name) and their parameter schemas."""

    def __init__(self, tools: Optional[Sequence[Dict[str, Any]]]):
        self.schemas = None if tools is None else {
            t["function"]["name"]: t["function"].get("parameters") for t in normalize_tools(tools)
        }

    def resolve(self, name: str) -> Tuple[Optional[str], _Schema]:
        if self.schemas is None:
            return name, _Schema(None, None)
        if name not in self.schemas:
            folded = [n for n in self.schemas if n.lower() == name.lower()]
            if len(folded) != 1:
                return None, _Schema(None, None)
            name = folded[0]
        params = self.schemas[name]
        return name, _Schema(params, params)


class _ToolBlock:
    """One `<tool_call>` block being read; `feed` returns the calls that completed."""

    def __init__(self, opener: str, tools: _Tools):
        self.tools = tools
        self.raw = [opener]  # everything consumed, for falling back to text
        self.buf = ""
        self.stack: List[_Element] = []  # stack[0] is the open <invoke>
        self.invoke_start = 0  # raw offset where the open invoke began
        self.invoke_name: Optional[str] = None
        self.overflow = 0  # tags opened past the depth limit, not tracked
        self.too_deep = False
        self.accepted = 0
        self.fallback: List[str] = []  # text of what could not be read as calls
        self.problems: List[str] = []
        self.stray: List[str] = []
        self.closed = False
        self.resolved: Optional[str] = None
        self.too_deep = self.markup_in_value = False
        self._tag_text = ""  # the tag being acted on

    # -- reading -------------------------------------------------------------------------------

    def feed(self, text: str, final: bool = False) -> Tuple[List[ToolCall], str]:
        """Read what `text` completes; returns (calls, text after the block once it closed)."""
        self.buf += text
        calls: List[ToolCall] = []
        while self.buf and not self.closed:
            consumed = self._step(calls, final)
            if consumed == 0:
                break
            self.raw.append(self.buf[:consumed])
            self.buf = self.buf[consumed:]
        rest = ""
        if self.closed:
            rest, self.buf = self.buf, ""
        return calls, rest

    def _step(self, calls: List[ToolCall], final: bool) -> int:
        """Consume one piece (text or a tag) of the buffer; 0 when more text is needed."""
        buf = self.buf
        at = len(buf)
        for i, char in enumerate(buf):
            if char == "<" or (char == NS[0] and (buf.startswith(NS, i) or
                                                   NS.startswith(buf[i:]))):
                at = i
                break
        if at > 0:
            self._text(buf[:at])
            return at
        if buf.startswith(NS):
            tag_at = _skip_ws(buf, len(NS))
            if tag_at - len(NS) > _MAX_WS:
                return self._as_text(len(NS))  # a stray prefix
            if tag_at == len(buf):
                return self._as_text(len(NS)) if final else 0
            if buf[tag_at] != "<":
                return self._as_text(len(NS))
            return self._tag(tag_at, prefixed=True, spaced=tag_at > len(NS), calls=calls,
                             final=final)
        if buf[0] == "<":
            return self._tag(0, prefixed=False, spaced=False, calls=calls, final=final)
        return self._as_text(len(buf)) if final else 0  # a prefix cut short at the end

    def _as_text(self, n: int) -> int:
        self._text(self.buf[:n])
        return n

    def _tag(self, at: int, *, prefixed: bool, spaced: bool, calls, final: bool) -> int:
        buf = self.buf
        more = 0 if not final else None  # "wait for more text", unless the reply is over
        if buf.startswith("</", at) or buf[at:] == "<":
            match = _CLOSE_TAG.match(buf, at)
            if match is None:
                if _PARTIAL_CLOSE.fullmatch(buf, at) and len(buf) - at < _MAX_TAG and \
                        more is not None:
                    return more
                return self._as_text(at + 1)
            name = match.group(1)
            if not prefixed and name not in (TOOL_CALL, "invoke") and \
                    name not in (e.tag for e in self.stack):
                return self._as_text(at + 1)  # a '<' in a value
            self._tag_text = buf[: match.end()]
            self._close(name, prefixed, calls)
            return match.end()
        if not prefixed:
            return self._as_text(at + 1)
        rest = buf[at: at + len("<invoke") + 1]
        if rest.startswith("<invoke") and (len(rest) == len("<invoke") or
                                           not (rest[-1].isalnum() or rest[-1] in "_-.:$")):
            end = self._invoke_tag_end(at)
            if end is None:
                return more if more is not None else self._as_text(at + 1)
            if end < 0:
                return self._as_text(at + 1)
            self._tag_text = buf[:end]
            self._open_invoke(buf[at + len("<invoke"): end - 1], calls)
            return end
        if "<invoke".startswith(buf[at:]) and more is not None:
            return more
        match = _OPEN_TAG.match(buf, at)
        if match is None:
            if _PARTIAL_OPEN.fullmatch(buf, at) and len(buf) - at < _MAX_TAG and \
                    more is not None:
                return more
            return self._as_text(at + 1)
        self._tag_text = buf[: match.end()]
        self._open(match.group(1), spaced)
        return match.end()

    def _invoke_tag_end(self, at: int) -> Optional[int]:
        """End of an `<invoke ...>` tag whose attributes may hold stray prefixes; None if not
        yet complete, -1 if it is not a tag."""
        i = at + len("<invoke")
        while i < len(self.buf) and i - at < _MAX_TAG:
            if self.buf.startswith(NS, i):
                i += len(NS)
            elif self.buf[i] == ">":
                return i + 1
            elif NS.startswith(self.buf[i:]):
                return None
            else:
                i += 1
        return None if i - at < _MAX_TAG else -1

    def _text(self, text: str):
        if not text:
            return
        if self.overflow:
            return
        if self.stack:
            if NS in text:
                self.markup_in_value = True
            self.stack[-1].text.append(text)
        elif text.strip(_WS):
            self.stray.append(text)

    # -- structure -----------------------------------------------------------------------------

    def _open_invoke(self, attrs: str, calls: List[ToolCall]):
        if self.stack:  # the previous invoke's closing tag was dropped
            self._finish_invoke(calls)
        cleaned = attrs.replace(NS, "").replace("<", "")
        match = _NAME_ATTR.search(cleaned)
        name = (match.group(1) if match.group(1) is not None else match.group(2)) if match \
            else (m.group(1) if (m := _LOOSE_NAME.fullmatch(cleaned)) else None)
        self.invoke_start = sum(map(len, self.raw))
        self.invoke_name = name
        self.too_deep = False
        self.markup_in_value = False
        resolved, schema = self.tools.resolve(name) if name else (None, _Schema(None, None))
        self.resolved = resolved
        self.stack = [_Element("invoke", schema, "")]

    def _open(self, tag: str, spaced: bool):
        if tag == TOOL_CALL:
            return  # a repeated opener
        if not self.stack:
            self.stray.append(self._tag_text)
            return
        if self.overflow or len(self.stack) > MAX_ARGUMENT_DEPTH:
            self.too_deep = True
            self.overflow += 1
            return
        if len(self.stack) > 1 and _schema_for(self.stack[-1], tag).excludes(tag):
            # A tag the open element cannot hold: if an ancestor declares it, the open
            # element's closing tag was dropped.
            for depth in range(len(self.stack) - 2, -1, -1):
                if _schema_for(self.stack[depth], tag).declares(tag):
                    while len(self.stack) > depth + 1:
                        self._pop(closed=False)
                    break
        parent = self.stack[-1]
        if tag == "item":
            where = f"{parent.where}[{sum(1 for t, _, _ in parent.children if t == 'item')}]"
            schema = parent.container(tag)
        else:
            where = f"{parent.where}.{tag}" if parent.where else tag
            schema = parent.container(tag).child(tag)
        self.stack.append(_Element(tag, schema, where, spaced))

    def _pop(self, closed: bool = True):
        element = self.stack.pop()
        value, as_list = element.value(closed)
        self.stack[-1].children.append((element.tag, value, as_list))

    def _close(self, name: str, prefixed: bool, calls: List[ToolCall]):
        if self.overflow and name not in (TOOL_CALL, "invoke"):
            self.overflow -= 1
            return
        if name == TOOL_CALL:
            if self.stack:
                self._finish_invoke(calls)
            self.closed = True
        elif name == "invoke":
            if self.stack:
                self._finish_invoke(calls, self._tag_text)
        elif any(e.tag == name for e in self.stack[1:]):
            while self.stack[-1].tag != name:  # closing tags dropped in between
                self._pop(closed=False)
            self._pop()
        elif prefixed and len(self.stack) > 1 and not self.stack[-1].children:
            self._pop()  # a misspelt closing tag closes the open value

    def _finish_invoke(self, calls: List[ToolCall], closing_tag: str = ""):
        raw = "".join(self.raw)[self.invoke_start:] + closing_tag
        while len(self.stack) > 1:
            self._pop(closed=False)
        invoke, self.stack, self.overflow = self.stack[0], [], 0
        problem = None
        if not self.invoke_name:
            problem = 'expected <invoke name="...">'
        elif self.resolved is None:
            problem = f"the model called {self.invoke_name!r}, which is not a declared tool"
        elif self.too_deep:
            problem = f"its arguments nest deeper than {MAX_ARGUMENT_DEPTH} levels"
        elif self.markup_in_value:
            problem = "an argument holds tool-call markup that is not a tag"
        if problem:
            self.problems.append(problem)
            self.fallback.append(raw)
            return
        arguments = _assemble(invoke.children, "".join(invoke.text).strip(_WS))
        calls.append(ToolCall(self.resolved, arguments))
        self.accepted += 1

    # -- the end -------------------------------------------------------------------------------

    def finish(self) -> Tuple[List[ToolCall], str]:
        """At the end of the reply: (calls, text to show). An unfinished invoke is text."""
        calls, _ = self.feed("", final=True)
        if self.stack:  # the reply stopped inside an invoke
            self.problems.append("the reply ended inside a tool call")
            self.fallback.append("".join(self.raw)[self.invoke_start:] + self.buf)
            self.stack = []
        elif self.buf:
            self._text(self.buf)
        self.closed = True
        return calls, self.leftover()

    def leftover(self) -> str:
        """Text for the content once the block is over: all of it when nothing was a call."""
        if self.accepted == 0:
            problem = self.problems[0] if self.problems else "the block holds no invoke"
            _warn(f"malformed tool-call block ({problem}); it is shown as plain content")
            return "".join(self.raw) + self.buf
        for problem in self.problems:
            _warn(f"a tool call was not read ({problem}); it is shown as plain content")
        if any(s.strip(_WS) for s in self.stray):
            _warn("text inside a tool-call block, outside any invoke; it is shown as content")
        return "".join(self.fallback) + "".join(self.stray)


# --------------------------------------------------------------------------------------------
# The reply: reasoning, content, tool-call blocks
# --------------------------------------------------------------------------------------------


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WS:
        i += 1
    return i


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker`."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


_NO, _PARTIAL = -1, -2


def _literal(text: str, i: int, literal: str) -> int:
    """End of `literal` at text[i:], _PARTIAL if the text ends inside it, else _NO."""
    part = text[i: i + len(literal)]
    if part == literal:
        return i + len(literal)
    return _PARTIAL if literal.startswith(part) and i + len(part) == len(text) else _NO


def _spaces_then(text: str, i: int, literal: str) -> int:
    j = _skip_ws(text, i)
    if j - i > _MAX_WS:
        return _NO
    if j == len(text):
        return _PARTIAL
    return _literal(text, j, literal)


def _block_opener(text: str, i: int) -> int:
    """End of a tool-call block opener at text[i:] (`]<]minimax[>[<tool_call>`, with optional
    whitespace after the prefix; or a bare `<tool_call>` that an `<invoke>` follows)."""
    if text[i] == NS[0]:
        end = _literal(text, i, NS)
        return end if end < 0 else _spaces_then(text, end, "<tool_call>")
    end = _literal(text, i, "<tool_call>")
    if end < 0:
        return end
    after = _spaces_then(text, end, NS)
    if after < 0:
        return after
    return end if _spaces_then(text, after, "<invoke") != _NO else _NO


_START, _REASONING, _CONTENT, _TOOL_CALL = "start", "reasoning", "content", "tool_call"


class ReplyParser:
    """Splits streamed model output into content, reasoning and tool calls.

    `in_reasoning`: the prompt ended with `<mm:think>` (thinking "enabled"), so output begins
    inside the reasoning block. Otherwise a reply may open one with `<mm:think>` (at the start
    or after some text), and one leading `</mm:think>` is dropped. `tools`: the declared tools,
    which type the arguments; calls to other names are kept as content. Without `tools` (None),
    any name is a call.
    """

    def __init__(
        self, *, in_reasoning: bool = False, tools: Optional[Sequence[Dict[str, Any]]] = None
    ):
        self._state = _REASONING if in_reasoning else _START
        self._tools = _Tools(tools)
        self._buffer = ""
        self._thought = False  # a reasoning block was closed: later think tags are text
        self._block: Optional[_ToolBlock] = None
        self._content: List[str] = []
        self._reasoning: Optional[List[str]] = [] if in_reasoning else None
        self._tool_calls: List[ToolCall] = []

    def feed(self, text: str) -> ReplyDelta:
        self._buffer += text
        delta = ReplyDelta()
        while self._step(delta):
            pass
        return self._record(delta)

    def finish(self) -> ReplyDelta:
        """Flush what was held back; an unfinished tool call becomes content."""
        delta = ReplyDelta()
        while self._step(delta):
            pass
        rest, self._buffer = self._buffer, ""
        if self._state == _TOOL_CALL:
            calls, text = self._block.finish()
            delta.tool_calls += calls
            delta.content += text
        elif self._state == _REASONING:
            delta.reasoning += rest
        else:
            delta.content += rest
        self._state = _CONTENT
        return self._record(delta)

    @property
    def in_reasoning(self) -> bool:
        """The text fed last was inside the reasoning block."""
        return self._state == _REASONING

    @property
    def reply(self) -> ParsedReply:
        """Everything parsed so far (complete after `finish`)."""
        reasoning = None if self._reasoning is None else "".join(self._reasoning)
        return ParsedReply("".join(self._content), reasoning, list(self._tool_calls))

    def _record(self, delta: ReplyDelta) -> ReplyDelta:
        self._content.append(delta.content)
        if delta.reasoning:
            self._reasoning.append(delta.reasoning)
        self._tool_calls += delta.tool_calls
        return delta

    def _step(self, delta: ReplyDelta) -> bool:
        """Consume what the buffer allows in the current state; True to run again."""
        buf = self._buffer
        if not buf:
            return False
        if self._state == _START:
            head = buf.lstrip(_WS)
            for tag, state in ((THINK_BEGIN, _REASONING), (THINK_END, _CONTENT)):
                if head.startswith(tag):
                    self._buffer = head[len(tag):]
                    self._enter(state, delta)
                    self._thought = state == _CONTENT
                    return True
            if not head or THINK_BEGIN.startswith(head) or THINK_END.startswith(head):
                return False  # could still become a tag
            self._state = _CONTENT
            return True
        if self._state == _TOOL_CALL:
            calls, rest = self._block.feed(buf)
            self._buffer = ""
            delta.tool_calls += calls
            if self._block.closed:
                delta.content += self._block.leftover()
                self._block = None
                self._state = _CONTENT
                self._buffer = rest
                return True
            return False
        at, end, marker = self._next_marker(buf)
        shown = buf[:at]
        if self._state == _REASONING:
            delta.reasoning += shown
        else:
            delta.content += shown
        if end < 0:  # nothing, or a marker still incomplete
            self._buffer = buf[at:]
            return False
        self._buffer = buf[end:]
        if marker == THINK_BEGIN:
            if self._state == _CONTENT:  # a think block after some text
                self._enter(_REASONING, delta)
            # else: a repeated opener, dropped
        elif marker == THINK_END:
            self._state = _CONTENT
            self._thought = True
        else:
            self._thought = True
            self._state = _TOOL_CALL
            self._block = _ToolBlock(buf[at:end], self._tools)
        return True

    def _enter(self, state: str, delta: ReplyDelta):
        self._state = state
        if state == _REASONING and self._reasoning is None:
            self._reasoning = []

    def _next_marker(self, buf: str) -> Tuple[int, int, Optional[str]]:
        """(start, end, marker) of the first marker in `buf` for this state; end < 0 when it
        is incomplete (start is then where to hold back from), (len, -1, None) when none."""
        think = []
        if self._state == _REASONING:
            think = [THINK_END, THINK_BEGIN]
        elif not self._thought:
            think = [THINK_BEGIN]
        for i, char in enumerate(buf):
            if char == "<":
                for tag in think:
                    end = _literal(buf, i, tag)
                    if end == _PARTIAL:
                        return i, -1, None
                    if end >= 0:
                        return i, end, tag
            if char in (NS[0], "<"):
                end = _block_opener(buf, i)
                if end == _PARTIAL:
                    return i, -1, None
                if end >= 0:
                    return i, end, TOOL_CALL
        return len(buf), -1, None


def parse_reply(
    text: str, *, in_reasoning: bool = False, tools: Optional[Sequence[Dict[str, Any]]] = None
) -> ParsedReply:
    """Parse a complete reply at once."""
    parser = ReplyParser(in_reasoning=in_reasoning, tools=tools)
    parser.feed(text)
    parser.finish()
    return parser.reply
