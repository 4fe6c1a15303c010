"""MiniMax-M3 chat format: conversations to prompt text, and model output back to messages.

Rendering follows m3-model.md section 5. A checkpoint's own `chat_template.jinja` is rendered
with jinja2 in the same environment Hugging Face uses; without one, `render_builtin` produces
the format directly. `M3_CHAT_TEMPLATE` is the jinja twin of `render_builtin` (the tests hold
the two to identical output), written into fixture checkpoints.

Parsing is incremental: `ReplyParser.feed` takes decoded text in arbitrary chunks and returns
what is safe to show, holding back any text that might be the start of a tag. Malformed output
(an unclosed or garbled tool-call block, a value that does not fit its schema) degrades to plain
content or an untyped value with a `MalformedOutputWarning`, never an exception.
"""

import json
import re
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .tokens import (BOD, END_OF_TURN, NS, ROLE, SPECIAL_TOKENS_MAP, THINK_BEGIN, THINK_END,
                     TOOL_CALL_BEGIN, TOOL_CALL_END)

THINKING_MODES = ("enabled", "disabled", "adaptive")
DEFAULT_SYSTEM = "You are a helpful assistant."

THINKING_BASE = (
    "You have a thinking capability that allows you to reason step by step before responding. "
    f"When thinking is enabled, wrap your reasoning in {THINK_BEGIN}{THINK_END} tags before your "
    f"response. When thinking is disabled, begin your response directly after the {THINK_END} "
    "prefix. When thinking is adaptive, decide on your own whether to think for the current turn."
)
THINKING_MODE_TEXT = {
    "enabled": "Current thinking mode: enabled. You MUST think step by step before every "
    "response, including after receiving function/tool results.",
    "disabled": "Current thinking mode: disabled. Do not output any thinking process.",
    "adaptive": "Current thinking mode: adaptive. You are encouraged to think for complex "
    "decision-making, multi-step reasoning, or when analyzing function/tool results.",
}
TOOLS_INTRO = (
    "# Tools\nYou may call one or more tools to assist with the user query.\n"
    "Here are the tools available in JSONSchema format:"
)
TOOLS_USAGE = (
    f"To call tools, wrap all invocations in a single {TOOL_CALL_BEGIN}{TOOL_CALL_END} block. "
    "Each argument is a tag named after its parameter; nested objects become nested tags and "
    "arrays become repeated item tags. Example:"
)
TOOLS_EXAMPLE = (
    f"{TOOL_CALL_BEGIN}\n"
    f'{NS}<invoke name="tool-name-1">{NS}<param-1>value-1{NS}</param-1>'
    f"{NS}<param-2>{NS}<item>value-a{NS}</item>{NS}<item>value-b{NS}</item>{NS}</param-2>"
    f"{NS}</invoke>\n"
    f'{NS}<invoke name="tool-name-2">{NS}<param-1>value-1{NS}</param-1>{NS}</invoke>\n'
    f"{TOOL_CALL_END}"
)

# Generation-prompt suffix after "]~b]ai\n" for each thinking mode.
PROMPT_SUFFIX = {"enabled": THINK_BEGIN, "disabled": THINK_END, "adaptive": ""}


class MalformedOutputWarning(UserWarning):
    """Model output that does not follow the M3 format; it was kept as plain text."""


# --------------------------------------------------------------------------------------------
# Input normalization (shared by both renderers)
# --------------------------------------------------------------------------------------------

ROLES = ("system", "user", "assistant", "tool")


def check_thinking_mode(mode: str) -> str:
    if mode not in THINKING_MODES:
        raise ValueError(
            f"thinking mode must be one of {', '.join(THINKING_MODES)}; got {mode!r}"
        )
    return mode


def normalize_tools(tools: Optional[Sequence[Dict[str, Any]]]) -> List[Dict[str, Any]]:
    """Tools in the OpenAI/Hugging Face shape {"type": "function", "function": {...}}.

    Bare function declarations ({"name": ..., "parameters": ...}) are wrapped.
    """
    out = []
    for i, tool in enumerate(tools or []):
        if not isinstance(tool, dict):
            raise ValueError(f"tool {i} must be a JSON object, got {type(tool).__name__}")
        function = tool.get("function", tool)
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ValueError(
                f"tool {i} has no function name: declare tools as "
                '{"type": "function", "function": {"name": ..., "parameters": {...}}}'
            )
        out.append({"type": "function", "function": function})
    return out


def _normalize_tool_call(call: Any, where: str) -> Dict[str, Any]:
    if not isinstance(call, dict):
        raise ValueError(f"{where}: a tool call must be a JSON object")
    function = call.get("function", call)
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}: a tool call needs a function name")
    arguments = function.get("arguments") or {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: tool call arguments are not valid JSON ({e})") from None
    if not isinstance(arguments, dict):
        raise ValueError(f"{where}: tool call arguments must be a JSON object")
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def tool_result_text(content: Any) -> str:
    """A tool result as sent to the model: strings as they are, anything else as JSON."""
    return content if isinstance(content, str) else json.dumps(content, ensure_ascii=False)


def normalize_messages(messages: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Validated copies of `messages` in the shape both renderers expect.

    Assistant content defaults to "", tool-call arguments become dicts, tool results that are
    not strings become JSON text.
    """
    out = []
    for i, message in enumerate(messages):
        where = f"message {i}"
        if not isinstance(message, dict):
            raise ValueError(f"{where} must be a dict with 'role' and 'content'")
        role = message.get("role")
        if role not in ROLES:
            raise ValueError(f"{where} has role {role!r}; expected one of {', '.join(ROLES)}")
        if role == "system" and i != 0:
            raise ValueError(f"{where}: a system message is only allowed first")
        content = message.get("content")
        if role == "tool":
            out.append({"role": role, "content": tool_result_text(content)})
        elif role == "assistant":
            if content is not None and not isinstance(content, str):
                raise ValueError(f"{where} (assistant) content must be a string or None")
            clean = {"role": role, "content": content or ""}
            if message.get("reasoning_content"):
                clean["reasoning_content"] = message["reasoning_content"]
            calls = message.get("tool_calls") or []
            if calls:
                clean["tool_calls"] = [_normalize_tool_call(c, where) for c in calls]
            out.append(clean)
        else:
            if not isinstance(content, str):
                raise ValueError(f"{where} ({role}) content must be a string")
            out.append({"role": role, "content": content})
    return out


# --------------------------------------------------------------------------------------------
# Built-in renderer
# --------------------------------------------------------------------------------------------


def _xml_value(value: Any) -> str:
    """An argument value as namespaced XML: objects to tags, lists to items, None omitted."""
    if isinstance(value, dict):
        return "".join(
            f"{NS}<{key}>{_xml_value(item)}{NS}</{key}>"
            for key, item in value.items()
            if item is not None
        )
    if isinstance(value, (list, tuple)):
        return "".join(f"{NS}<item>{_xml_value(item)}{NS}</item>" for item in value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)


def format_tool_calls(calls: Sequence[Dict[str, Any]]) -> str:
    invokes = "".join(
        f'{NS}<invoke name="{c["function"]["name"]}">'
        f'{_xml_value(c["function"]["arguments"])}{NS}</invoke>\n'
        for c in calls
    )
    return f"{TOOL_CALL_BEGIN}\n{invokes}{TOOL_CALL_END}"


def _system_block(system: str, thinking: str, tools: List[Dict[str, Any]]) -> str:
    text = (
        f"{system}\n\n<thinking_instructions>\n{THINKING_BASE}\n"
        f"{THINKING_MODE_TEXT[thinking]}\n</thinking_instructions>"
    )
    if tools:
        declared = "".join(
            f"<tool>{json.dumps(t['function'], ensure_ascii=False)}</tool>\n" for t in tools
        )
        text += (
            f"\n\n{TOOLS_INTRO}\n\n<tools>\n{declared}</tools>\n\n"
            f"{TOOLS_USAGE}\n\n{TOOLS_EXAMPLE}"
        )
    return text


def _assistant_body(message: Dict[str, Any]) -> str:
    reasoning = message.get("reasoning_content")
    body = f"{THINK_BEGIN}{reasoning}{THINK_END}" if reasoning else THINK_END
    body += message["content"]
    if message.get("tool_calls"):
        body += format_tool_calls(message["tool_calls"])
    return body


def render_builtin(
    messages: Sequence[Dict[str, Any]],
    *,
    tools: Optional[Sequence[Dict[str, Any]]] = None,
    thinking: str = "adaptive",
    add_generation_prompt: bool = True,
) -> str:
    """The M3 prompt for `messages`, without a jinja template."""
    check_thinking_mode(thinking)
    messages = normalize_messages(messages)
    tools = normalize_tools(tools)
    system = DEFAULT_SYSTEM
    if messages and messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    parts = [f"{BOD}{ROLE}system\n{_system_block(system, thinking, tools)}{END_OF_TURN}\n"]
    for i, message in enumerate(messages):
        role = message["role"]
        if role == "user":
            parts.append(f"{ROLE}user\n{message['content']}{END_OF_TURN}\n")
        elif role == "assistant":
            parts.append(f"{ROLE}ai\n{_assistant_body(message)}{END_OF_TURN}\n")
        else:  # consecutive tool results share one tool turn
            first = i == 0 or messages[i - 1]["role"] != "tool"
            last = i == len(messages) - 1 or messages[i + 1]["role"] != "tool"
            parts.append(f"{ROLE}tool\n" if first else "\n")
            parts.append(f"<response>{message['content']}</response>")
            if last:
                parts.append(f"{END_OF_TURN}\n")
    if add_generation_prompt:
        parts.append(f"{ROLE}ai\n{PROMPT_SUFFIX[thinking]}")
    return "".join(parts)


# --------------------------------------------------------------------------------------------
# Jinja rendering
# --------------------------------------------------------------------------------------------

M3_CHAT_TEMPLATE = r"""{#- MiniMax-M3 chat format; m3mlx.chat_format.render_builtin renders the same text. -#}
{%- set ns = ']<]minimax[>[' -%}
{%- set think_begin = '<mm:think>' -%}
{%- set think_end = '</mm:think>' -%}
{%- set mode = thinking_mode if thinking_mode is defined else 'adaptive' -%}
{%- macro to_xml(value) -%}
    {%- if value is mapping -%}
        {%- for key, item in value.items() if item is not none -%}
            {{- ns ~ '<' ~ key ~ '>' ~ to_xml(item) ~ ns ~ '</' ~ key ~ '>' -}}
        {%- endfor -%}
    {%- elif value is iterable and value is not string -%}
        {%- for item in value -%}
            {{- ns ~ '<item>' ~ to_xml(item) ~ ns ~ '</item>' -}}
        {%- endfor -%}
    {%- elif value is boolean -%}
        {{- 'true' if value else 'false' -}}
    {%- elif value is not none -%}
        {{- value -}}
    {%- endif -%}
{%- endmacro -%}
{%- if messages and messages[0].role == 'system' -%}
    {%- set system_text = messages[0].content -%}
    {%- set conversation = messages[1:] -%}
{%- else -%}
    {%- set system_text = 'You are a helpful assistant.' -%}
    {%- set conversation = messages -%}
{%- endif -%}
{{- ']~!b[]~b]system\n' ~ system_text ~ '\n\n<thinking_instructions>\n' -}}
{{- 'You have a thinking capability that allows you to reason step by step before responding. ' -}}
{{- 'When thinking is enabled, wrap your reasoning in <mm:think></mm:think> tags before your response. ' -}}
{{- 'When thinking is disabled, begin your response directly after the </mm:think> prefix. ' -}}
{{- 'When thinking is adaptive, decide on your own whether to think for the current turn.\n' -}}
{%- if mode == 'enabled' -%}
    {{- 'Current thinking mode: enabled. You MUST think step by step before every response, including after receiving function/tool results.\n' -}}
{%- elif mode == 'disabled' -%}
    {{- 'Current thinking mode: disabled. Do not output any thinking process.\n' -}}
{%- else -%}
    {{- 'Current thinking mode: adaptive. You are encouraged to think for complex decision-making, multi-step reasoning, or when analyzing function/tool results.\n' -}}
{%- endif -%}
{{- '</thinking_instructions>' -}}
{%- if tools -%}
    {{- '\n\n# Tools\nYou may call one or more tools to assist with the user query.\n' -}}
    {{- 'Here are the tools available in JSONSchema format:\n\n<tools>\n' -}}
    {%- for tool in tools -%}
        {%- set declared = tool.function if tool.function is defined else tool -%}
        {{- '<tool>' ~ (declared | tojson) ~ '</tool>\n' -}}
    {%- endfor -%}
    {{- '</tools>\n\nTo call tools, wrap all invocations in a single ' ~ ns ~ '<tool_call>' ~ ns ~ '</tool_call> block. ' -}}
    {{- 'Each argument is a tag named after its parameter; nested objects become nested tags and arrays become repeated item tags. Example:\n\n' -}}
    {{- ns ~ '<tool_call>\n' -}}
    {{- ns ~ '<invoke name="tool-name-1">' ~ ns ~ '<param-1>value-1' ~ ns ~ '</param-1>' -}}
    {{- ns ~ '<param-2>' ~ ns ~ '<item>value-a' ~ ns ~ '</item>' ~ ns ~ '<item>value-b' ~ ns ~ '</item>' ~ ns ~ '</param-2>' -}}
    {{- ns ~ '</invoke>\n' -}}
    {{- ns ~ '<invoke name="tool-name-2">' ~ ns ~ '<param-1>value-1' ~ ns ~ '</param-1>' ~ ns ~ '</invoke>\n' -}}
    {{- ns ~ '</tool_call>' -}}
{%- endif -%}
{{- '[e~[\n' -}}
{%- for message in conversation -%}
    {%- if message.role == 'user' -%}
        {{- ']~b]user\n' ~ message.content ~ '[e~[\n' -}}
    {%- elif message.role == 'assistant' -%}
        {{- ']~b]ai\n' -}}
        {%- if message.reasoning_content -%}
            {{- think_begin ~ message.reasoning_content ~ think_end -}}
        {%- else -%}
            {{- think_end -}}
        {%- endif -%}
        {%- if message.content -%}
            {{- message.content -}}
        {%- endif -%}
        {%- if message.tool_calls -%}
            {{- ns ~ '<tool_call>\n' -}}
            {%- for call in message.tool_calls -%}
                {%- set fn = call.function if call.function is defined else call -%}
                {{- ns ~ '<invoke name="' ~ fn.name ~ '">' ~ to_xml(fn.arguments) ~ ns ~ '</invoke>\n' -}}
            {%- endfor -%}
            {{- ns ~ '</tool_call>' -}}
        {%- endif -%}
        {{- '[e~[\n' -}}
    {%- elif message.role == 'tool' -%}
        {%- if loop.first or loop.previtem.role != 'tool' -%}
            {{- ']~b]tool\n' -}}
        {%- else -%}
            {{- '\n' -}}
        {%- endif -%}
        {{- '<response>' ~ message.content ~ '</response>' -}}
        {%- if loop.last or loop.nextitem.role != 'tool' -%}
            {{- '[e~[\n' -}}
        {%- endif -%}
    {%- else -%}
        {{- raise_exception('unsupported role: ' ~ message.role) -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- ']~b]ai\n' -}}
    {%- if mode == 'enabled' -%}
        {{- think_begin -}}
    {%- elif mode == 'disabled' -%}
        {{- think_end -}}
    {%- endif -%}
{%- endif -%}
"""


class TemplateError(ValueError):
    """A chat template that cannot be compiled or rendered."""


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Hugging Face's filter: unlike jinja2's own, no key sorting and no HTML escaping.
    return json.dumps(
        value, indent=indent, separators=separators, sort_keys=sort_keys, ensure_ascii=ensure_ascii
    )


def _raise_exception(message):
    raise TemplateError(f"chat template refused the conversation: {message}")


def _strftime_now(fmt):
    from datetime import datetime

    return datetime.now().strftime(fmt)


@lru_cache(maxsize=8)
def _compile(template: str):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(f"chat template does not compile: {e} (line {e.lineno})") from None


def render_template(
    template: str,
    messages: Sequence[Dict[str, Any]],
    *,
    tools: Optional[Sequence[Dict[str, Any]]] = None,
    thinking: str = "adaptive",
    add_generation_prompt: bool = True,
    **extra: Any,
) -> str:
    """Render a checkpoint's jinja chat template (Hugging Face conventions).

    The thinking mode reaches the template as `thinking_mode`, M3's template variable; M3's
    special tokens as `bos_token`, `eos_token`, ... as Hugging Face passes them.
    """
    import jinja2

    check_thinking_mode(thinking)
    tools = normalize_tools(tools)
    try:
        return _compile(template).render(
            messages=normalize_messages(messages),
            tools=tools or None,
            thinking_mode=thinking,
            add_generation_prompt=add_generation_prompt,
            **{**SPECIAL_TOKENS_MAP, **extra},
        )
    except jinja2.TemplateError as e:
        raise TemplateError(f"chat template failed to render: {e}") from None


def render_chat(
    messages: Sequence[Dict[str, Any]],
    *,
    tools: Optional[Sequence[Dict[str, Any]]] = None,
    thinking: str = "adaptive",
    add_generation_prompt: bool = True,
    template: Optional[str] = None,
) -> str:
    """The prompt text for `messages`: via `template` when given, else the built-in renderer."""
    if template is not None:
        return render_template(
            template,
            messages,
            tools=tools,
            thinking=thinking,
            add_generation_prompt=add_generation_prompt,
        )
    return render_builtin(
        messages, tools=tools, thinking=thinking, add_generation_prompt=add_generation_prompt
    )


# --------------------------------------------------------------------------------------------
# Tool-call parsing
# --------------------------------------------------------------------------------------------


@dataclass
class ToolCall:
    name: str
    arguments: Dict[str, Any]

    def to_message(self) -> Dict[str, Any]:
        """The OpenAI-style entry for an assistant message's `tool_calls`."""
        return {"type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class _Element:
    tag: str
    attrs: str = ""
    children: List["_Element"] = field(default_factory=list)
    text: List[str] = field(default_factory=list)


_TAG = re.compile(re.escape(NS) + r"<(/?)([^\s<>/]+)([^<>]*)>")
_NAME_ATTR = re.compile(r"""^\s*name\s*=\s*(?:"([^"]+)"|'([^']+)')\s*$""")


def _parse_elements(body: str) -> List[_Element]:
    """The top-level elements of a tool-call block body (namespaced tags only); ValueError
    when the tags do not nest."""
    root = _Element("")
    stack = [root]
    pos = 0
    for match in _TAG.finditer(body):
        stack[-1].text.append(body[pos : match.start()])
        pos = match.end()
        closing, tag, attrs = match.groups()
        if closing:
            if len(stack) == 1 or stack[-1].tag != tag:
                open_tag = stack[-1].tag if len(stack) > 1 else None
                raise ValueError(f"closing tag </{tag}> does not match <{open_tag}>")
            stack.pop()
        else:
            element = _Element(tag, attrs)
            stack[-1].children.append(element)
            stack.append(element)
    stack[-1].text.append(body[pos:])
    if len(stack) > 1:
        raise ValueError(f"tag <{stack[-1].tag}> is never closed")
    if "".join(root.text).strip():
        raise ValueError("text outside any invoke")
    return root.children


_JSON_NUMBER = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?")
_JSON_INTEGER = re.compile(r"-?(?:0|[1-9]\d*)")
_SCALAR_ORDER = ("null", "boolean", "integer", "number", "object", "array", "string")


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
            value = json.loads(s, parse_constant=_reject_constant)
        except ValueError:
            return False, None
        return isinstance(value, dict if kind == "object" else list), value
    return False, None


def _schema_types(schema: Any) -> List[str]:
    if not isinstance(schema, dict):
        return []
    kind = schema.get("type")
    if isinstance(kind, str):
        return [kind]
    if isinstance(kind, list):
        return [k for k in kind if isinstance(k, str)]
    types = []
    for key in ("anyOf", "oneOf"):
        for sub in schema.get(key) or []:
            types += [t for t in _schema_types(sub) if t not in types]
    if not types and "enum" in schema:
        types = ["string"]
    return types


def _sub_schema(schema: Any, kind: str) -> Dict[str, Any]:
    """The (alternative of the) schema that describes a value of type `kind`."""
    if not isinstance(schema, dict):
        return {}
    if kind in _schema_types({"type": schema.get("type")}):
        return schema
    for key in ("anyOf", "oneOf"):
        for sub in schema.get(key) or []:
            if kind in _schema_types(sub):
                return sub
    return {}


def _guess_value(text: str) -> Any:
    """An undeclared value: JSON numbers, booleans, null, objects and arrays; else the text."""
    try:
        value = json.loads(text.strip(), parse_constant=_reject_constant)
    except ValueError:
        return text
    return text if isinstance(value, str) else value


def _leaf_value(text: str, schema: Any, where: str) -> Any:
    types = _schema_types(schema)
    if not types:
        return _guess_value(text)
    for kind in sorted(types, key=lambda k: _SCALAR_ORDER.index(k) if k in _SCALAR_ORDER else 99):
        ok, value = _coerce(text, kind)
        if ok:
            return value
    warnings.warn(
        f"tool argument {where} = {text!r} does not match its declared type "
        f"{' | '.join(types)}; kept as a string",
        MalformedOutputWarning,
        stacklevel=2,
    )
    return text


def _element_value(element: _Element, schema: Any, where: str) -> Any:
    if not element.children:
        return _leaf_value("".join(element.text), schema, where)
    tags = {child.tag for child in element.children}
    if tags == {"item"}:
        items = _sub_schema(schema, "array").get("items")
        return [
            _element_value(child, items, f"{where}[{i}]")
            for i, child in enumerate(element.children)
        ]
    return _object_value(element, _sub_schema(schema, "object"), where)


def _object_value(element: _Element, schema: Dict[str, Any], where: str) -> Dict[str, Any]:
    properties = schema.get("properties") or {}
    counts: Dict[str, int] = {}
    for child in element.children:
        counts[child.tag] = counts.get(child.tag, 0) + 1
    out: Dict[str, Any] = {}
    for child in element.children:
        prop = properties.get(child.tag)
        name = f"{where}.{child.tag}" if where else child.tag
        if counts[child.tag] > 1:  # repeated tags form an array
            value = _element_value(child, _sub_schema(prop, "array").get("items"), name)
            out.setdefault(child.tag, []).append(value)
        else:
            out[child.tag] = _element_value(child, prop, name)
    stray = "".join(element.text).strip()
    if stray:  # text mixed with child tags
        out["$text"] = stray
    return out


def parse_tool_block(body: str, schemas: Optional[Dict[str, Any]] = None) -> List[ToolCall]:
    """The calls in one tool-call block (the text between its opening and closing tags).

    `schemas` maps declared tool names to their `parameters` JSON schema (see `tool_schemas`);
    values are typed by it. Raises `ValueError` when the block is not well-formed.
    """
    calls = []
    for element in _parse_elements(body):
        match = _NAME_ATTR.match(element.attrs) if element.tag == "invoke" else None
        if not match:
            raise ValueError(f'expected <invoke name="...">, got <{element.tag}{element.attrs}>')
        name = match.group(1) if match.group(1) is not None else match.group(2)
        if schemas is not None and name not in schemas:
            warnings.warn(
                f"the model called {name!r}, which is not a declared tool",
                MalformedOutputWarning,
                stacklevel=2,
            )
        schema = (schemas or {}).get(name) or {}
        calls.append(ToolCall(name, _object_value(element, schema, "")))
    if not calls:
        raise ValueError("the block holds no invoke")
    return calls


def tool_schemas(tools: Optional[Sequence[Dict[str, Any]]]) -> Optional[Dict[str, Any]]:
    """{name: parameters schema} for declared tools; None when no tools are declared."""
    if not tools:
        return None
    return {t["function"]["name"]: t["function"].get("parameters") for t in normalize_tools(tools)}


# --------------------------------------------------------------------------------------------
# Streaming reply parser
# --------------------------------------------------------------------------------------------


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


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker`."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


_START, _REASONING, _CONTENT, _TOOL_CALL = "start", "reasoning", "content", "tool_call"


class ReplyParser:
    """Splits streamed model output into content, reasoning and tool calls.

    `in_reasoning`: the prompt ended with `<mm:think>` (thinking "enabled"), so output begins
    inside the reasoning block. Otherwise a reply may open one with a leading `<mm:think>`, and
    one stray leading `</mm:think>` is dropped. Only a leading think block counts; later think
    tags stay content.
    """

    def __init__(
        self, *, in_reasoning: bool = False, tools: Optional[Sequence[Dict[str, Any]]] = None
    ):
        self._state = _REASONING if in_reasoning else _START
        self._schemas = tool_schemas(tools)
        self._buffer = ""
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
        """Flush what was held back; an unterminated tool-call block becomes content."""
        delta = ReplyDelta()
        rest, self._buffer = self._buffer, ""
        if self._state == _REASONING:
            delta.reasoning += rest
        elif self._state == _TOOL_CALL:
            warnings.warn(
                "the reply ended inside a tool-call block; it is shown as plain content",
                MalformedOutputWarning,
                stacklevel=2,
            )
            delta.content += TOOL_CALL_BEGIN + rest
        else:
            delta.content += rest
        self._state = _CONTENT
        return self._record(delta)

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
            for tag, state in ((THINK_BEGIN, _REASONING), (THINK_END, _CONTENT)):
                if buf.startswith(tag):
                    self._buffer = buf[len(tag) :]
                    self._state = state
                    if state == _REASONING:
                        self._reasoning = []
                    return True
            if THINK_BEGIN.startswith(buf) or THINK_END.startswith(buf):
                return False  # could still become a tag
            self._state = _CONTENT
            return True
        if self._state == _TOOL_CALL:
            end = buf.find(TOOL_CALL_END)
            if end < 0:
                return False
            self._buffer = buf[end + len(TOOL_CALL_END) :]
            self._state = _CONTENT
            self._close_tool_block(buf[:end], delta)
            return True
        tag = THINK_END if self._state == _REASONING else TOOL_CALL_BEGIN
        at = buf.find(tag)
        keep = len(buf) - at if at >= 0 else _partial_suffix(buf, tag)
        shown = buf[: len(buf) - keep]
        if self._state == _REASONING:
            delta.reasoning += shown
        else:
            delta.content += shown
        if at < 0:
            self._buffer = buf[len(shown) :]
            return False
        self._buffer = buf[at + len(tag) :]
        self._state = _CONTENT if self._state == _REASONING else _TOOL_CALL
        return True

    def _close_tool_block(self, body: str, delta: ReplyDelta):
        try:
            delta.tool_calls += parse_tool_block(body, self._schemas)
        except ValueError as e:
            warnings.warn(
                f"malformed tool-call block ({e}); it is shown as plain content",
                MalformedOutputWarning,
                stacklevel=3,
            )
            delta.content += TOOL_CALL_BEGIN + body + TOOL_CALL_END


def parse_reply(
    text: str, *, in_reasoning: bool = False, tools: Optional[Sequence[Dict[str, Any]]] = None
) -> ParsedReply:
    """Parse a complete reply at once."""
    parser = ReplyParser(in_reasoning=in_reasoning, tools=tools)
    parser.feed(text)
    parser.finish()
    return parser.reply
