"""Conversations as the M3 chat template expects them: checked, in one canonical shape.

Every renderer input goes through `normalize_messages` and `normalize_tools` first, so the
packaged template and a checkpoint's own template see the same, valid data: content as plain
text, tool-call arguments as objects (the real template iterates them; JSON strings make it
fail), tool results as text, reasoning under `reasoning_content`.
"""

import json
from typing import Any, Dict, List, Optional, Sequence

from .checks import parse_json

THINKING_MODES = ("enabled", "disabled", "adaptive")
ROLES = ("root", "system", "developer", "user", "assistant", "tool")
INSTRUCTION_ROLES = ("system", "developer")  # become the template's developer turn

# Tool-call arguments nest at most this deep (objects and arrays). Real schemas stay far below;
# deeper output is degraded to text by the reply parser, and deeper input is refused, so that
# no conversation can hold a value that recursive rendering cannot handle.
MAX_ARGUMENT_DEPTH = 32

# Content parts that carry text, in the shapes the OpenAI and Anthropic APIs send.
TEXT_PART_TYPES = ("text", "input_text", "output_text")


def check_thinking_mode(mode: str) -> str:
    if mode not in THINKING_MODES:
        raise ValueError(
            f"thinking mode must be one of {', '.join(THINKING_MODES)}; got {mode!r}"
        )
    return mode


def nesting_depth(value: Any) -> int:
    """How deep objects and arrays nest in `value` (0 for a scalar), without recursion."""
    deepest = 0
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, (list, tuple)):
            children = item
        else:
            deepest = max(deepest, depth)
            continue
        deepest = max(deepest, depth + 1)
        if deepest > MAX_ARGUMENT_DEPTH:
            return deepest
        stack.extend((child, depth + 1) for child in children)
    return deepest


def content_text(content: Any, where: str) -> str:
    """Text content given as a string or as a list of text parts (joined as they are)."""
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)):
        pieces = []
        for j, part in enumerate(content):
            if isinstance(part, str):
                pieces.append(part)
            elif isinstance(part, dict) and part.get("type") in TEXT_PART_TYPES:
                text = part.get("text")
                if not isinstance(text, str):
                    raise ValueError(f"{where} part {j}: a text part needs a string 'text'")
                pieces.append(text)
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ValueError(
                    f"{where} part {j} is of type {kind!r}: m3mlx runs M3's text model, which "
                    "takes text parts only"
                )
        return "".join(pieces)
    raise ValueError(f"{where} content must be a string or a list of text parts")


def normalize_tools(tools: Optional[Sequence[Dict[str, Any]]]) -> List[Dict[str, Any]]:
    """Tools in the OpenAI/Hugging Face shape {"type": "function", "function": {...}}.

    Bare function declarations ({"name": ..., "parameters": ...}) are wrapped.
    """
    out = []
    for i, tool in enumerate(tools or []):
        if not isinstance(tool, dict):
            raise ValueError(f"tool {i} must be a JSON object, got {type(tool).__name__}")
        function = tool.get("function", tool)
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) \
                or not function["name"]:
            raise ValueError(
                f"tool {i} has no function name: declare tools as "
                '{"type": "function", "function": {"name": ..., "parameters": {...}}}'
            )
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise ValueError(f"tool {i} ({function['name']}): parameters must be a JSON schema "
                             "object")
        out.append({"type": "function", "function": function})
    return out


def _normalize_tool_call(call: Any, where: str) -> Dict[str, Any]:
    if not isinstance(call, dict):
        raise ValueError(f"{where}: a tool call must be a JSON object")
    function = call.get("function", call)
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}: a tool call needs a function name")
    arguments = function.get("arguments")
    if arguments is None or arguments == "":
        arguments = {}
    if isinstance(arguments, str):
        try:
            arguments = parse_json(arguments)
        except ValueError as e:
            raise ValueError(f"{where}: tool call arguments are not valid JSON ({e})") from None
    if not isinstance(arguments, dict):
        raise ValueError(f"{where}: tool call arguments must be a JSON object")
    if nesting_depth(arguments) > MAX_ARGUMENT_DEPTH:
        raise ValueError(f"{where}: tool call arguments nest deeper than "
                         f"{MAX_ARGUMENT_DEPTH} levels")
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def tool_result_text(content: Any) -> str:
    """A tool result as sent to the model: text as it is, anything else as JSON."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(p, str) or (isinstance(p, dict) and p.get("type") in TEXT_PART_TYPES)
        for p in content
    ):
        return content_text(content, "tool result")
    return json.dumps(content, ensure_ascii=False)


def _reasoning(message: Dict[str, Any], where: str) -> Optional[str]:
    for key in ("reasoning_content", "reasoning"):
        value = message.get(key)
        if value is not None:
            if not isinstance(value, str):
                raise ValueError(f"{where} (assistant) {key} must be a string")
            return value
    return None


def normalize_messages(messages: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Checked copies of `messages` in the one shape every template gets.

    Roles: an optional `root` first (it replaces the model's identity text), then optional
    `system`/`developer` messages (joined into one: the developer turn), then `user`,
    `assistant` and `tool` turns. Content becomes text; assistant `reasoning`/`reasoning_content`
    become `reasoning_content`; tool-call arguments become objects; tool results become text.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError("messages must be a list of {'role': ..., 'content': ...} objects")
    out: List[Dict[str, Any]] = []
    for i, message in enumerate(messages):
        where = f"message {i}"
        if not isinstance(message, dict):
            raise ValueError(f"{where} must be a dict with 'role' and 'content'")
        role = message.get("role")
        if role not in ROLES:
            raise ValueError(f"{where} has role {role!r}; expected one of {', '.join(ROLES)}")
        content = message.get("content")
        if role == "root":
            if i != 0:
                raise ValueError(f"{where}: a root message is only allowed first")
            out.append({"role": role, "content": content_text(content, where)})
        elif role in INSTRUCTION_ROLES:
            if any(m["role"] not in ("root",) + INSTRUCTION_ROLES for m in out):
                raise ValueError(f"{where}: a {role} message is only allowed first (after an "
                                 "optional root message)")
            text = content_text(content, where)
            if out and out[-1]["role"] in INSTRUCTION_ROLES:
                out[-1] = {**out[-1], "content": out[-1]["content"] + "\n\n" + text}
            else:
                out.append({"role": role, "content": text})
        elif role == "tool":
            result = {"role": role, "content": tool_result_text(content)}
            if isinstance(message.get("name"), str):
                result["name"] = message["name"]
            out.append(result)
        elif role == "assistant":
            clean = {"role": role,
                     "content": "" if content is None else content_text(content, where)}
            reasoning = _reasoning(message, where)
            if reasoning is not None:
                clean["reasoning_content"] = reasoning
            calls = message.get("tool_calls") or []
            if not isinstance(calls, (list, tuple)):
                raise ValueError(f"{where}: tool_calls must be a list")
            if calls:
                clean["tool_calls"] = [_normalize_tool_call(c, f"{where} tool call {j}")
                                       for j, c in enumerate(calls)]
            out.append(clean)
        else:
            if content is None:
                raise ValueError(f"{where} ({role}) content must be a string")
            out.append({"role": role, "content": content_text(content, f"{where} ({role})")})
    return out
