"""A jinja sandbox that bounds what a chat template may cost, not only what it may touch.

Chat templates come with checkpoints, so they are untrusted code. jinja's immutable sandbox
already stops escapes (attribute and method access, mutation); it does not stop a template that
loops for hours (`{% for i in range(100000) %}{% for j in range(100000) %}`) or asks for
10 GB (`'a' * 10**10`). This environment adds a budget to every render:

- time: every loop step, call, attribute lookup, operator and output checks a deadline;
- size: no string, list or output may exceed a limit set from the size of the input (a
  template's output is its input plus a bounded amount of markup). Operators, `~`, filters and
  string methods that could build something larger are checked *before* they allocate, from
  the sizes of their operands;
- numbers: integers passed to calls are bounded (widths, counts), `**` may not build huge ints;
- recursion: Python's recursion limit, reported as such.

Whatever goes wrong surfaces as `TemplateError` with a one-line message naming the template.
"""

import contextvars
import json
import re
import time
import types
from dataclasses import dataclass
from functools import lru_cache, wraps
from typing import Any, Dict, Optional

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.compiler import CodeGenerator
from jinja2.sandbox import ImmutableSandboxedEnvironment

MAX_SOURCE = 1 << 20  # characters of template source
MIN_OUTPUT = 1 << 20  # output allowance on top of OUTPUT_PER_INPUT characters per input one
OUTPUT_PER_INPUT = 16
MIN_SECONDS = 2.0  # time allowance on top of SECONDS_PER_MB per megabyte of input
SECONDS_PER_MB = 1.0
MAX_INT_ARGUMENT = 100_000  # widths, counts and repeats passed to calls and filters
MAX_INT_BITS = 1 << 16  # the largest integer an operator may build
MAX_JSON_INDENT = 16
_LONG_NUMBER = re.compile(r"\d{6,}")  # a width or precision of a million or more


class TemplateError(ValueError):
    """A chat template that cannot be compiled or rendered."""


class TemplateRefusal(TemplateError):
    """The template itself refused the conversation (its `raise_exception`)."""


class _Exceeded(Exception):
    """A render went over its budget (internal: becomes a TemplateError)."""


@dataclass
class _Budget:
    deadline: float
    seconds: float
    max_chars: int
    output: int = 0

    def tick(self):
        if time.monotonic() > self.deadline:
            raise _Exceeded(f"took longer than {self.seconds:.1f} s to render; it may loop "
                            "without end")

    def check_size(self, n: int, what: str):
        if n > self.max_chars:
            raise _Exceeded(f"would build {what} of more than {self.max_chars:,} characters")

    def charge_output(self, n: int):
        self.output += n
        self.check_size(self.output, "an output")


_budget: contextvars.ContextVar[_Budget] = contextvars.ContextVar("template_budget")


def _current() -> _Budget:
    budget = _budget.get(None)
    if budget is None:  # compile-time constant folding: a small budget of its own
        budget = _Budget(time.monotonic() + MIN_SECONDS, MIN_SECONDS, MIN_OUTPUT)
        _budget.set(budget)
    budget.tick()
    return budget


def _size(value: Any, limit: int) -> int:
    """Characters `value` takes as text, counted without recursion; stops past `limit`.

    Containers count their items (and one per item), so shared references count each time
    they appear, as they would when printed.
    """
    total = 0
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, (str, bytes)):
            total += len(item) + 1
        elif isinstance(item, dict):
            total += 2 + len(item)
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            total += 2 + len(item)
            stack.extend(item)
        elif isinstance(item, int) and not isinstance(item, bool):
            total += item.bit_length() // 3 + 1
        else:
            total += 8
        if total > limit:
            break
    return total


def _check_value(value: Any, what: str = "a value") -> Any:
    budget = _current()
    budget.check_size(_size(value, budget.max_chars), what)
    return value


def _check_int_arguments(args, kwargs, what: str):
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, int) and not isinstance(value, bool) and \
                abs(value) > MAX_INT_ARGUMENT:
            raise _Exceeded(f"passes {value} to {what} (at most {MAX_INT_ARGUMENT:,})")


def _check_format_string(text: Any, what: str):
    if isinstance(text, str) and _LONG_NUMBER.search(text):
        raise _Exceeded(f"uses a format width of a million or more in {what}")


def _precheck_replace(s: Any, args, kwargs):
    old = args[0] if args else kwargs.get("old")
    new = args[1] if len(args) > 1 else kwargs.get("new")
    if isinstance(s, str) and isinstance(old, str) and isinstance(new, str):
        count = s.count(old) if old else len(s) + 1
        _current().check_size(len(s) + count * max(0, len(new) - len(old)), "a string")


def _precheck_join(sep: Any, items: Any):
    if isinstance(items, (list, tuple)):
        budget = _current()
        n = _size(list(items), budget.max_chars) + len(items) * len(str(sep))
        budget.check_size(n, "a string")


# String methods and filters whose integer arguments set the size of what they build.
_STR_WIDTH_METHODS = {"center", "ljust", "rjust", "zfill", "expandtabs"}
_SIZED_FILTERS = {"center", "indent", "wordwrap", "truncate", "batch", "slice", "tojson"}


class _BoundedCodeGenerator(CodeGenerator):
    """Routes `~` and every output statement through the budget."""

    def visit_Concat(self, node: nodes.Concat, frame) -> None:
        self.write("environment.bounded_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")

    def visit_Output(self, node: nodes.Output, frame) -> None:
        static = sum(len(child.data) for child in node.nodes
                     if isinstance(child, nodes.TemplateData))
        if static:
            self.writeline(f"environment.charge_output({static})")
        super().visit_Output(node, frame)


def _bounded_filter(name: str, func):
    @wraps(func)
    def bounded(*args, **kwargs):
        budget = _current()
        positional = [a for a in args if not isinstance(a, (jinja2.runtime.Context,
                                                              jinja2.Environment,
                                                              nodes.EvalContext))]
        value, rest = (positional[0], positional[1:]) if positional else (None, [])
        if name in _SIZED_FILTERS:
            _check_int_arguments(rest, kwargs, f"the {name} filter")
        if name in ("string", "tojson", "pprint", "list", "format", "join", "sum", "safe",
                    "e", "escape", "forceescape", "urlencode", "xmlattr", "wordwrap", "indent",
                    "center", "trim", "title", "capitalize", "upper", "lower", "replace"):
            budget.check_size(_size(value, budget.max_chars), f"the input of {name}")
        if name == "format":
            _check_format_string(value, "the format filter")
        elif name == "indent" and isinstance(value, str):
            width = rest[0] if rest else kwargs.get("width", 4)
            width = len(width) if isinstance(width, str) else int(width or 0)
            budget.check_size(len(value) + (value.count("\n") + 1) * width, "a string")
        elif name == "tojson":
            indent = kwargs.get("indent", rest[0] if len(rest) > 1 else None)
            if isinstance(indent, int) and indent > MAX_JSON_INDENT:
                raise _Exceeded(f"asks tojson for an indent of {indent} (at most "
                                f"{MAX_JSON_INDENT})")
        elif name == "replace":
            _precheck_replace(value, rest, kwargs)
        elif name == "join":
            sep = rest[0] if rest else kwargs.get("d", "")
            _precheck_join(sep, value)
        return _check_value(func(*args, **kwargs), f"the output of {name}")

    return bounded


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Hugging Face's filter: unlike jinja2's own, no key sorting and no HTML escaping.
    return json.dumps(value, indent=indent, separators=separators, sort_keys=sort_keys,
                      ensure_ascii=ensure_ascii)


def _raise_exception(message):
    raise TemplateRefusal(f"refused the conversation: {message}")


def _strftime_now(fmt):
    from datetime import datetime

    return datetime.now().strftime(fmt)


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    code_generator_class = _BoundedCodeGenerator
    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self):
        super().__init__(trim_blocks=True, lstrip_blocks=True,
                         extensions=[jinja2.ext.loopcontrols], finalize=self._finalize)
        self.filters["tojson"] = _tojson
        self.filters = {name: _bounded_filter(name, f) for name, f in self.filters.items()}
        self.globals.pop("lipsum", None)  # builds text of any size in one call
        self.globals["raise_exception"] = _raise_exception
        self.globals["strftime_now"] = _strftime_now

    # -- the hooks -----------------------------------------------------------------------------

    @staticmethod
    @jinja2.pass_eval_context  # never folded at compile time: every output is charged
    def _finalize(eval_ctx, value):
        budget = _current()
        budget.charge_output(_size(value, budget.max_chars))
        return value

    @staticmethod
    def charge_output(n: int):
        _current().charge_output(n)

    @staticmethod
    def bounded_concat(parts):
        budget = _current()
        total = 0
        for part in parts:
            total += _size(part, budget.max_chars)
            budget.check_size(total, "a string")
        return "".join(map(str, parts))

    @staticmethod
    def bounded_iter(iterable):
        _current()
        for item in iterable:
            _budget.get().tick()
            yield item

    def call_binop(self, context, operator, left, right):
        budget = _current()
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int):
                    budget.check_size(_size(seq, budget.max_chars) * max(n, 0), "a sequence")
            if isinstance(left, int) and isinstance(right, int):
                self._check_bits(abs(left).bit_length() + abs(right).bit_length())
        elif operator == "**":
            if isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > 0:
                self._check_bits(abs(left).bit_length() * right)
        elif operator == "+":
            if isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
                budget.check_size(_size(left, budget.max_chars) +
                                  _size(right, budget.max_chars), "a sequence")
        elif operator == "%" and isinstance(left, str):
            _check_format_string(left, "a % format")
            _check_int_arguments(right if isinstance(right, tuple) else (right,), {},
                                 "a % format")
            budget.check_size(len(left) + _size(right, budget.max_chars), "a string")
        return super().call_binop(context, operator, left, right)

    @staticmethod
    def _check_bits(bits: int):
        if bits > MAX_INT_BITS:
            raise _Exceeded(f"computes an integer of about {bits:,} bits")

    def getattr(self, obj, attribute):
        _current()
        if isinstance(obj, str) and attribute in ("format", "format_map"):
            _check_format_string(obj, f"str.{attribute}")
        return super().getattr(obj, attribute)

    def getitem(self, obj, argument):
        _current()
        return super().getitem(obj, argument)

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's signature)
        _current()
        if isinstance(__obj, (types.BuiltinMethodType, types.MethodType)):
            owner = getattr(__obj, "__self__", None)
            name = getattr(__obj, "__name__", "")
            if isinstance(owner, str):
                if name in _STR_WIDTH_METHODS:
                    _check_int_arguments(args, kwargs, f"str.{name}")
                elif name == "replace":
                    _precheck_replace(owner, args, kwargs)
                elif name == "join" and args:
                    _precheck_join(owner, args[0])
        return _check_value(super().call(__context, __obj, *args, **kwargs),
                            "the result of a call")

    # -- every loop steps through the budget ------------------------------------------------------

    def _parse(self, source, name, filename):
        template = super()._parse(source, name, filename)
        for loop in template.find_all(nodes.For):
            loop.iter = nodes.Call(nodes.EnvironmentAttribute("bounded_iter"), [loop.iter],
                                   [], None, None, lineno=loop.lineno)
        return template


_ENVIRONMENT: Optional[_BoundedEnvironment] = None


def _environment() -> _BoundedEnvironment:
    global _ENVIRONMENT
    if _ENVIRONMENT is None:
        _ENVIRONMENT = _BoundedEnvironment()
    return _ENVIRONMENT


def _line(error: BaseException) -> Optional[int]:
    """The template line an exception was raised at (jinja rewrites tracebacks to show it)."""
    line = getattr(error, "lineno", None)
    tb = error.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


@lru_cache(maxsize=16)
def _compile(source: str, name: str):
    if len(source) > MAX_SOURCE:
        raise TemplateError(f"{name} is {len(source):,} characters; a chat template may have "
                            f"at most {MAX_SOURCE:,}")
    token = _budget.set(_Budget(time.monotonic() + MIN_SECONDS, MIN_SECONDS, MIN_OUTPUT))
    try:
        return _environment().from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(f"{name} does not compile: {e.message} (line {e.lineno})") from None
    except (_Exceeded, RecursionError, MemoryError) as e:
        raise TemplateError(f"{name} does not compile: {e}") from None
    finally:
        _budget.reset(token)


def compile_template(source: str, name: str = "the chat template"):
    """Compile (and cache) a template; raises TemplateError naming it when it does not compile."""
    if not isinstance(source, str):
        raise TemplateError(f"{name} must be text, got {type(source).__name__}")
    return _compile(source, name)


def render(source: str, variables: Dict[str, Any], *, name: str = "the chat template",
           input_size: int = 0) -> str:
    """Render `source` with `variables` inside a budget set by `input_size` (characters of
    conversation and tools). Raises TemplateError with a one-line message naming `name`."""
    template = compile_template(source, name)
    seconds = MIN_SECONDS + SECONDS_PER_MB * input_size / 1e6
    budget = _Budget(time.monotonic() + seconds, seconds,
                     MIN_OUTPUT + OUTPUT_PER_INPUT * input_size)
    token = _budget.set(budget)
    pieces = []
    try:
        for piece in template.generate(**variables):
            budget.charge_output(0)  # the deadline, between statements
            pieces.append(piece)
        return "".join(pieces)
    except TemplateError as e:
        raise type(e)(f"{name} {e}") from None
    except _Exceeded as e:
        raise TemplateError(f"{name} {e}") from None
    except RecursionError:
        raise TemplateError(f"{name} recursed too deeply") from None
    except MemoryError:
        raise TemplateError(f"{name} ran out of memory") from None
    except Exception as e:  # anything the template's own code raised: 1/0, undefined, ...
        line = _line(e)
        where = f" (line {line})" if line else ""
        message = getattr(e, "message", None) or str(e) or type(e).__name__
        raise TemplateError(f"{name} failed to render{where}: {message}") from None
    finally:
        _budget.reset(token)
