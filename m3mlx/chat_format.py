"""Conversations to M3 prompt text: one renderer, the checkpoint's template or m3mlx's own.

Every conversation is rendered by a jinja chat template in the bounded sandbox of
`template_sandbox`: the checkpoint's `chat_template.jinja` when it ships one, else the M3
template packaged with m3mlx (`templates/chat_template.jinja`, the format of m3-model.md
section 5). Inputs are checked and normalized first (`chat_messages`), so every template sees
the same shape. Reading a checkpoint's template (the `.jinja` file, or tokenizer_config.json's
`chat_template` in either of Hugging Face's forms) also lives here.
"""

import json
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Union

from .checks import parse_json
from .files import open_regular
from .chat_messages import check_thinking_mode, normalize_messages, normalize_tools
from .template_sandbox import TemplateError, compile_template, render
from .tokens import SPECIAL_TOKENS_MAP

# A template, or Hugging Face's named templates ({"default": ..., "tool_use": ...}).
Template = Union[str, Mapping[str, str]]


@lru_cache(maxsize=1)
def builtin_template() -> str:
    """The M3 chat template packaged with m3mlx."""
    return resources.files("m3mlx").joinpath("templates/chat_template.jinja").read_text("utf-8")


M3_CHAT_TEMPLATE = builtin_template()


def _read_bytes(file: Path) -> bytes:
    try:
        with open_regular(file) as f:
            return f.read()
    except OSError as e:
        raise TemplateError(f"{file} cannot be read ({e.strerror or e})") from None


def read_chat_template(directory) -> Optional[Template]:
    """The chat template a checkpoint directory ships, or None.

    The first found of: `chat_template.jinja`; `chat_template.json` (a processor's
    {"chat_template": ...}); tokenizer_config.json's `chat_template`, which may be a string or
    Hugging Face's list of named templates. The template is compiled here, so a broken one is
    reported when the model loads, naming its file.
    """
    directory = Path(directory)
    file = directory / "chat_template.jinja"
    if file.exists():
        try:
            text = _read_bytes(file).decode("utf-8")
        except UnicodeDecodeError as e:
            raise TemplateError(f"{file} is not UTF-8 text (byte {e.object[e.start]:#04x} at "
                                f"offset {e.start}); save it as UTF-8") from None
        compile_template(text, str(file))
        return text
    for name in ("chat_template.json", "tokenizer_config.json"):
        config = directory / name
        if config.exists():
            break
    else:
        return None
    try:
        template = parse_json(_read_bytes(config).decode("utf-8")).get("chat_template")
    except (ValueError, AttributeError) as e:
        raise TemplateError(f"{config} is not a JSON object in UTF-8 ({e})") from None
    where = f"{config} (chat_template)"
    if template is None or isinstance(template, str):
        if template is not None:
            compile_template(template, where)
        return template
    if isinstance(template, list):
        named = {}
        for i, entry in enumerate(template):
            if not (isinstance(entry, dict) and isinstance(entry.get("name"), str)
                    and isinstance(entry.get("template"), str)):
                raise TemplateError(f"{where} entry {i} must be "
                                    '{"name": "...", "template": "..."}')
            named[entry["name"]] = entry["template"]
        if "default" not in named:
            raise TemplateError(f"{where} lists templates {', '.join(sorted(named))} but none "
                                "named 'default'")
        for name, text in named.items():
            compile_template(text, f"{where}[{name}]")
        return named
    raise TemplateError(f"{where} must be a string or a list of named templates, "
                        f"not {type(template).__name__}")


def _pick(template: Optional[Template], tools, name: Optional[str]):
    """(source, name) of the template to render: Hugging Face's choice among named ones."""
    if template is None:
        return builtin_template(), "m3mlx's built-in chat template"
    label = name or "the chat template"
    if isinstance(template, str):
        return template, label
    key = "tool_use" if tools and "tool_use" in template else "default"
    return template[key], f"{label} [{key}]"


def render_template(
    template: Template,
    messages: Sequence[Dict[str, Any]],
    *,
    tools: Optional[Sequence[Dict[str, Any]]] = None,
    thinking: str = "adaptive",
    add_generation_prompt: bool = True,
    template_name: Optional[str] = None,
    **extra: Any,
) -> str:
    """Render a jinja chat template (Hugging Face conventions), bounded in time and size.

    The thinking mode reaches the template as `thinking_mode`, M3's template variable; M3's
    special tokens as `bos_token`, `eos_token`, ... as Hugging Face passes them.
    """
    check_thinking_mode(thinking)
    tools = normalize_tools(tools)
    messages = normalize_messages(messages)
    source, name = _pick(template, tools, template_name)
    size = len(json.dumps([messages, tools], ensure_ascii=False, default=str))
    variables = {**SPECIAL_TOKENS_MAP, **extra, "messages": messages, "tools": tools or None,
                 "thinking_mode": thinking, "add_generation_prompt": add_generation_prompt}
    return render(source, variables, name=name, input_size=size)


def render_chat(
    messages: Sequence[Dict[str, Any]],
    *,
    tools: Optional[Sequence[Dict[str, Any]]] = None,
    thinking: str = "adaptive",
    add_generation_prompt: bool = True,
    template: Optional[Template] = None,
    template_name: Optional[str] = None,
) -> str:
    """The prompt text for `messages`: via `template` when given, else m3mlx's M3 template."""
    return render_template(template, messages, tools=tools, thinking=thinking,
                           add_generation_prompt=add_generation_prompt,
                           template_name=template_name)

