"""API requests to M3 conversations: messages, tools, tool choice and thinking mode.

Each API's request (OpenAI Chat Completions and Responses, Anthropic Messages) becomes the one
conversation shape `m3mlx.chat_messages` defines, so the chat template, the prefix cache and
the reply parser never see API differences. Reasoning a client sends back (OpenAI
`reasoning_content` / `reasoning`, Responses reasoning items, Anthropic `thinking` blocks) is
kept on its assistant turn: M3 is trained with interleaved thinking and loses much of its agent
skill without it.

What changes per request but does not matter is normalized here, before the prompt exists: the
`x-anthropic-billing-header: ...` line Claude Code puts at the top of its system prompt holds a
per-request checksum, so it is removed; otherwise no two Claude Code requests would share a
cached prefix.
"""

import json
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from ..chat_messages import THINKING_MODES, content_text

BILLING_HEADER = re.compile(r"^[ \t]*x-anthropic-billing-header:[^\n]*(\n|$)",
                            re.IGNORECASE | re.MULTILINE)

# OpenAI reasoning effort -> M3 thinking mode.
EFFORT_MODE = {"none": "disabled", "minimal": "disabled", "low": "adaptive",
               "medium": "enabled", "high": "enabled", "xhigh": "enabled"}


class RequestError(ValueError):
    """A request the server cannot serve: status, message and the field it is about."""

    def __init__(self, message: str, param: Optional[str] = None, status: int = 400):
        super().__init__(message)
        self.message, self.param, self.status = message, param, status


@dataclass
class ToolChoice:
    mode: str = "auto"  # "auto", "none" (no calls), "required" (at least one call)
    name: Optional[str] = None  # with "required": the one tool to call
    parallel: bool = True  # False: the reply ends after its first call


@dataclass
class Conversation:
    messages: List[Dict[str, Any]]
    tools: List[Dict[str, Any]]
    tool_choice: ToolChoice
    thinking: Optional[str]  # None: the server's default


def strip_billing_header(text: str) -> str:
    return BILLING_HEADER.sub("", text)


def _json_object(text: Any, where: str) -> Dict[str, Any]:
    if isinstance(text, dict):
        return text
    if text is None or text == "":
        return {}
    if not isinstance(text, str):
        raise RequestError(f"{where} must be a JSON object or a string holding one", where)
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise RequestError(f"{where} is not valid JSON ({e})", where) from None
    if not isinstance(value, dict):
        raise RequestError(f"{where} must hold a JSON object", where)
    return value


def _text(content: Any, where: str) -> str:
    try:
        return content_text(content if content is not None else "", where)
    except ValueError as e:
        raise RequestError(str(e), where) from None


def _function_tool(tool: Any, where: str, flat: bool) -> Dict[str, Any]:
    """An OpenAI tool (Chat: nested under "function"; Responses: flat) as a function."""
    if not isinstance(tool, dict):
        raise RequestError(f"{where} must be an object", where)
    if tool.get("type", "function") != "function":
        raise RequestError(f"{where} has type {tool.get('type')!r}; only function tools are "
                           "supported", f"{where}.type")
    function = tool if flat else tool.get("function")
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) or \
            not function["name"]:
        raise RequestError(f"{where} needs a function name", f"{where}.function.name"
                           if not flat else f"{where}.name")
    out = {"name": function["name"]}
    if isinstance(function.get("description"), str):
        out["description"] = function["description"]
    parameters = function.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise RequestError(f"{where} parameters must be a JSON schema object",
                           f"{where}.parameters")
    out["parameters"] = parameters if parameters is not None else {"type": "object",
                                                                   "properties": {}}
    return {"type": "function", "function": out}


def _openai_tool_choice(choice: Any, parallel: bool, tools, where="tool_choice") -> ToolChoice:
    if choice is None or choice == "auto":
        return ToolChoice("auto", None, parallel)
    if choice in ("none", "required"):
        return ToolChoice(choice, None, parallel)
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") if "function" in choice else \
            choice.get("name")
        if choice.get("type") in ("function", None) and isinstance(name, str):
            return ToolChoice("required", _known_tool(name, tools, where), parallel)
        if choice.get("type") in ("auto", "none", "required"):
            return ToolChoice(choice["type"], None, parallel)
    raise RequestError(f"{where} must be 'auto', 'none', 'required' or "
                       '{"type": "function", "function": {"name": ...}}', where)


def _known_tool(name: str, tools: List[Dict[str, Any]], where: str) -> str:
    if name not in [t["function"]["name"] for t in tools]:
        raise RequestError(f"{where} names {name!r}, which is not among the tools", where)
    return name


def _template_mode(kwargs: Optional[Dict[str, Any]]) -> Optional[str]:
    if not kwargs:
        return None
    mode = kwargs.get("thinking_mode")
    if mode is not None:
        if mode not in THINKING_MODES:
            raise RequestError(f"chat_template_kwargs.thinking_mode must be one of "
                               f"{', '.join(THINKING_MODES)}", "chat_template_kwargs.thinking_mode")
        return mode
    enable = kwargs.get("enable_thinking")
    if enable is not None:
        if not isinstance(enable, bool):
            raise RequestError("chat_template_kwargs.enable_thinking must be true or false",
                               "chat_template_kwargs.enable_thinking")
        return "enabled" if enable else "disabled"
    return None


# -- OpenAI Chat Completions ---------------------------------------------------------------------


def from_chat_completion(request) -> Conversation:
    tools = [_function_tool(t, f"tools[{i}]", flat=False) for i, t in enumerate(request.tools or [])]
    messages: List[Dict[str, Any]] = []
    for i, message in enumerate(request.messages):
        where = f"messages[{i}]"
        role = message.role
        if role in ("system", "developer"):
            text = strip_billing_header(_text(message.content, f"{where}.content"))
            # Instructions after the conversation began are given as a user turn.
            leading = all(m["role"] in ("system", "developer") for m in messages)
            messages.append({"role": role if leading else "user", "content": text})
        elif role == "user":
            messages.append({"role": "user", "content": _text(message.content,
                                                             f"{where}.content")})
        elif role == "assistant":
            calls = []
            for j, call in enumerate(message.tool_calls or []):
                function = call.get("function") if isinstance(call, dict) else None
                if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                    raise RequestError(f"{where}.tool_calls[{j}] needs function.name",
                                       f"{where}.tool_calls[{j}].function.name")
                calls.append({"function": {"name": function["name"], "arguments": _json_object(
                    function.get("arguments"), f"{where}.tool_calls[{j}].function.arguments")}})
            entry = {"role": "assistant", "content": _text(message.content, f"{where}.content")}
            reasoning = message.reasoning_content if message.reasoning_content is not None \
                else message.reasoning
            if reasoning:
                entry["reasoning_content"] = reasoning
            if calls:
                entry["tool_calls"] = calls
            messages.append(entry)
        else:  # tool, or the legacy function role
            messages.append({"role": "tool", "content": _tool_output(message.content,
                                                                     f"{where}.content")})
    choice = _openai_tool_choice(request.tool_choice, request.parallel_tool_calls, tools)
    mode = _template_mode(request.chat_template_kwargs) or EFFORT_MODE.get(
        request.reasoning_effort)
    return Conversation(messages, tools, choice, mode)


def _tool_output(content: Any, where: str) -> str:
    if isinstance(content, list):
        return _text(content, where)
    if content is None:
        return ""
    return content if isinstance(content, str) else json.dumps(content, ensure_ascii=False)


# -- OpenAI Responses ------------------------------------------------------------------------------


def from_responses(request) -> Conversation:
    if request.previous_response_id:
        raise RequestError("previous_response_id is not supported: this server keeps no "
                           "responses; send the whole conversation in input (store: false)",
                           "previous_response_id")
    tools = [_function_tool(t, f"tools[{i}]", flat=True) for i, t in enumerate(request.tools or [])]
    messages: List[Dict[str, Any]] = []
    if request.instructions:
        messages.append({"role": "system", "content": strip_billing_header(request.instructions)})
    items = [{"type": "message", "role": "user", "content": request.input}] \
        if isinstance(request.input, str) else request.input
    pending_reasoning: Optional[str] = None

    def assistant() -> Dict[str, Any]:
        nonlocal pending_reasoning
        last = messages[-1] if messages else None
        if last is None or last["role"] != "assistant" or pending_reasoning is not None:
            last = {"role": "assistant", "content": ""}
            if pending_reasoning:
                last["reasoning_content"] = pending_reasoning
            pending_reasoning = None
            messages.append(last)
        return last

    for i, item in enumerate(items):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise RequestError(f"{where} must be an object", where)
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            role = item.get("role")
            text = _text(item.get("content"), f"{where}.content")
            if role in ("system", "developer"):
                leading = all(m["role"] in ("system", "developer") for m in messages)
                messages.append({"role": role if leading else "user",
                                 "content": strip_billing_header(text)})
            elif role == "user":
                messages.append({"role": "user", "content": text})
            elif role == "assistant":
                message = assistant()
                message["content"] += text
            else:
                raise RequestError(f"{where}.role must be user, assistant, system or developer",
                                   f"{where}.role")
        elif kind == "reasoning":
            parts = [p.get("text", "") for p in (item.get("content") or [])
                     if isinstance(p, dict)] or \
                [p.get("text", "") for p in (item.get("summary") or []) if isinstance(p, dict)]
            pending_reasoning = "".join(t for t in parts if isinstance(t, str))
        elif kind == "function_call":
            name = item.get("name")
            if not isinstance(name, str) or not name:
                raise RequestError(f"{where}.name is required", f"{where}.name")
            message = assistant()
            message.setdefault("tool_calls", []).append({"function": {
                "name": name, "arguments": _json_object(item.get("arguments"),
                                                        f"{where}.arguments")}})
        elif kind == "function_call_output":
            messages.append({"role": "tool",
                             "content": _tool_output(item.get("output"), f"{where}.output")})
        else:
            raise RequestError(f"{where} has type {kind!r}; expected message, reasoning, "
                               "function_call or function_call_output", f"{where}.type")
    choice = _openai_tool_choice(request.tool_choice, request.parallel_tool_calls, tools)
    mode = EFFORT_MODE.get(request.reasoning.effort) if request.reasoning else None
    return Conversation(messages, tools, choice, mode)


# -- Anthropic Messages ----------------------------------------------------------------------------


def _anthropic_tool(tool: Any, i: int) -> Dict[str, Any]:
    where = f"tools.{i}"
    if not isinstance(tool, dict) or not isinstance(tool.get("name"), str) or not tool["name"]:
        raise RequestError(f"{where}.name: a tool needs a name", f"{where}.name")
    if tool.get("type") not in (None, "custom"):
        raise RequestError(f"{where}: server tools ({tool['type']}) are not supported; declare "
                           "client tools with name, description and input_schema", where)
    schema = tool.get("input_schema", {"type": "object", "properties": {}})
    if not isinstance(schema, dict):
        raise RequestError(f"{where}.input_schema must be a JSON schema object",
                           f"{where}.input_schema")
    function = {"name": tool["name"], "parameters": schema}
    if isinstance(tool.get("description"), str):
        function = {"name": tool["name"], "description": tool["description"], "parameters": schema}
    return {"type": "function", "function": function}


def _anthropic_tool_choice(choice: Optional[Dict[str, Any]], tools) -> ToolChoice:
    if choice is None:
        return ToolChoice()
    parallel = not choice.get("disable_parallel_tool_use", False)
    kind = choice.get("type")
    if kind == "auto":
        return ToolChoice("auto", None, parallel)
    if kind == "none":
        return ToolChoice("none", None, parallel)
    if kind == "any":
        return ToolChoice("required", None, parallel)
    if kind == "tool" and isinstance(choice.get("name"), str):
        return ToolChoice("required", _known_tool(choice["name"], tools, "tool_choice.name"),
                          parallel)
    raise RequestError("tool_choice.type must be auto, any, tool (with name) or none",
                       "tool_choice")


def _system_text(system: Any) -> Optional[str]:
    if system is None:
        return None
    if isinstance(system, str):
        return strip_billing_header(system)
    blocks = []
    for i, block in enumerate(system):
        if not isinstance(block, dict) or block.get("type") != "text" or \
                not isinstance(block.get("text"), str):
            raise RequestError(f"system.{i} must be a text block", f"system.{i}")
        text = strip_billing_header(block["text"])
        if text.strip():
            blocks.append(text)
    return "\n\n".join(blocks)


def _anthropic_blocks(content: Any, where: str) -> List[Dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    for j, block in enumerate(content):
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            raise RequestError(f"{where}.content.{j} must be a content block",
                               f"{where}.content.{j}")
    return content


def _tool_result_text(block: Dict[str, Any], where: str) -> str:
    content = block.get("content", "")
    if isinstance(content, list):
        pieces = []
        for k, part in enumerate(content):
            if isinstance(part, dict) and part.get("type") == "text":
                pieces.append(str(part.get("text", "")))
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise RequestError(f"{where}.content.{k} is of type {kind!r}: only text tool "
                                   "results are supported", f"{where}.content.{k}")
        text = "".join(pieces)
    elif isinstance(content, str):
        text = content
    else:
        text = json.dumps(content, ensure_ascii=False)
    return f"Error: {text}" if block.get("is_error") else text


def from_anthropic(request) -> Conversation:
    tools = [_anthropic_tool(t, i) for i, t in enumerate(request.tools or [])]
    messages: List[Dict[str, Any]] = []
    system = _system_text(request.system)
    if system:
        messages.append({"role": "system", "content": system})
    for i, message in enumerate(request.messages):
        where = f"messages.{i}"
        blocks = _anthropic_blocks(message.content, where)
        if message.role == "system":
            text = strip_billing_header("".join(
                str(b.get("text", "")) for b in blocks if b.get("type") == "text"))
            leading = all(m["role"] == "system" for m in messages)
            # Instructions after the conversation began are given as a user turn.
            messages.append({"role": "system" if leading else "user", "content": text})
        elif message.role == "user":
            text: List[str] = []
            for j, block in enumerate(blocks):
                kind = block["type"]
                if kind == "tool_result":
                    if text:
                        messages.append({"role": "user", "content": "".join(text)})
                        text = []
                    messages.append({"role": "tool", "content": _tool_result_text(
                        block, f"{where}.content.{j}")})
                elif kind == "text":
                    text.append(str(block.get("text", "")))
                else:
                    raise RequestError(f"{where}.content.{j} is of type {kind!r}: m3mlx runs "
                                       "M3's text model, which takes text and tool results only",
                                       f"{where}.content.{j}")
            if text:
                messages.append({"role": "user", "content": "".join(text)})
        else:
            entry: Dict[str, Any] = {"role": "assistant", "content": ""}
            reasoning: List[str] = []
            for j, block in enumerate(blocks):
                kind = block["type"]
                if kind == "text":
                    entry["content"] += str(block.get("text", ""))
                elif kind == "thinking":
                    reasoning.append(str(block.get("thinking", "")))
                elif kind == "redacted_thinking":
                    continue
                elif kind == "tool_use":
                    if not isinstance(block.get("name"), str):
                        raise RequestError(f"{where}.content.{j}.name is required",
                                           f"{where}.content.{j}.name")
                    entry.setdefault("tool_calls", []).append({"function": {
                        "name": block["name"],
                        "arguments": _json_object(block.get("input"),
                                                  f"{where}.content.{j}.input")}})
                else:
                    raise RequestError(f"{where}.content.{j} is of type {kind!r}, which an "
                                       "assistant turn cannot hold here", f"{where}.content.{j}")
            if reasoning:
                entry["reasoning_content"] = "".join(reasoning)
            messages.append(entry)
    choice = _anthropic_tool_choice(request.tool_choice, tools)
    mode = request.thinking.type if request.thinking else None
    return Conversation(messages, tools, choice, mode)


def stop_list(stop: Any, where: str = "stop") -> List[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if any(not s for s in stops):
        raise RequestError(f"{where}: an empty stop string would end every reply at once", where)
    if len(stops) > 16:
        raise RequestError(f"{where}: at most 16 stop strings", where)
    return stops


def prompt_of(prompt: Any) -> Tuple[Optional[str], Optional[List[int]]]:
    """An OpenAI completions prompt as (text, None) or (None, token ids)."""
    if isinstance(prompt, str):
        return prompt, None
    if prompt and all(isinstance(p, int) for p in prompt):
        return None, list(prompt)
    if len(prompt) == 1 and isinstance(prompt[0], str):
        return prompt[0], None
    raise RequestError("prompt must be a string, one string in a list, or token ids; batches "
                       "of prompts are not supported", "prompt")
