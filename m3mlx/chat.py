"""Multi-turn chat with one model: a session keeps its cache and prefills only what is new.

Each reply renders the whole conversation with the chat template, tokenizes it, and compares
the tokens with those the cache already holds. Only the tokens after the longest common prefix
are prefilled; if the rendering of earlier turns differs from what the cache holds (the
template re-renders a reply differently from how it was generated, the system prompt or the
thinking mode changed), the cache is trimmed back to the common prefix first. So a session
always computes exactly what a from-scratch run over the rendered conversation would.
"""

import json
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

from .cache import (
    LayerCache, check_cache_fits, load_prompt_cache, model_signature, prompt_cache_bytes,
    save_prompt_cache,
)
from .chat_format import render_chat
from .chat_messages import (check_thinking_mode, normalize_messages, normalize_tools,
                            tool_result_text)
from .checks import OPTION_RANGES, InputError, check_option, check_text, parse_json
from .defaults import CHAT_MAX_TOKENS, INDEX_BITS, RECOMMENDED_SAMPLING
from .distributed import together
from .experts import ExpertStats
from .generate import context_limit, stream_generate
from .kv_tier import tiers_of
from .model import make_cache
from .reply_parser import ParsedReply, ReplyDelta, ReplyParser, ToolCall
from .shard_cache import is_sharded
from .tokens import THINK_BEGIN

# M3's recommended sampling (model card); temperature 0 makes replies greedy.
DEFAULT_OPTIONS = {
    "max_tokens": CHAT_MAX_TOKENS,
    **RECOMMENDED_SAMPLING,
    "min_p": 0.0,
    "repetition_penalty": 1.0,
    "seed": None,
}
OPTION_NAMES = frozenset(DEFAULT_OPTIONS) | {"repetition_context_size", "prefill_step_size"}
SESSION_FORMAT = "m3mlx-chat-session/2"
SESSION_KEYS = frozenset({"format", "model", "system", "tools", "thinking", "options",
                          "messages", "tokens"})


@dataclass
class ChatReply:
    content: str
    reasoning: Optional[str]  # None when the model did not reason
    tool_calls: List[ToolCall]
    finish_reason: str  # "stop" (end of turn), "length" (max_tokens) or "interrupted"
    tokens: List[int]  # the generated token ids, the end-of-turn token included
    prompt_tokens: int  # tokens prefilled for this reply
    cached_tokens: int  # prompt tokens reused from the cache
    generation_tokens: int
    prompt_tps: float
    generation_tps: float
    peak_memory: float  # GB
    expert_stats: Optional[ExpertStats] = None  # streamed experts: the cache while replying


class ChatStream:
    """The reply being generated: iterate for `ReplyDelta`s; `reply` is set when it ends.

    Stopping early (`close()`, or an exception such as KeyboardInterrupt while iterating) keeps
    what was generated so far as the reply, with finish_reason "interrupted".
    """

    def __init__(self, run: Callable[["ChatStream"], Iterator[ReplyDelta]]):
        self.reply: Optional[ChatReply] = None
        self._gen = run(self)  # a generator that sets self.reply when it ends

    def __iter__(self):
        return self

    def __next__(self) -> ReplyDelta:
        return next(self._gen)

    def close(self):
        self._gen.close()

    def result(self) -> ChatReply:
        """Generate to the end (without streaming) and return the reply."""
        for _ in self:
            pass
        return self.reply


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class ChatSession:
    """A conversation with `model`, its KV cache kept between turns.

        session = ChatSession(model, tokenizer, system="Be brief.", thinking="adaptive")
        stream = session.send("Hello")
        for delta in stream:
            print(delta.reasoning or delta.content, end="")
        reply = stream.reply  # content, reasoning, tool_calls, statistics

    `add_tool_result(...)` answers the model's tool calls, after which `send()` continues.
    `system`, `tools` and `thinking` ("enabled", "disabled", "adaptive") may be changed between
    turns; the next reply re-prefills from the first token they change. `index_bits`,
    `kv_bits`, `kv_memory`, `kv_cache_dir` and `kv_policy` set up the cache as `make_cache`
    does. Generation options (`max_tokens`, `temperature`, `top_p`, `top_k`, `min_p`,
    `repetition_penalty`, `seed`, `prefill_step_size`, ...) default to M3's recommended
    sampling.
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        system: Optional[str] = None,
        tools: Optional[Sequence[Dict[str, Any]]] = None,
        thinking: str = "adaptive",
        chat_template: Optional[str] = None,
        index_bits: Optional[int] = INDEX_BITS,
        kv_bits: Optional[int] = None,
        kv_memory=None,
        kv_cache_dir=None,
        kv_policy: Optional[str] = None,
        **options,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.system = None if system is None else check_text(system, "the system prompt")
        self.tools = tools
        self.thinking = thinking
        # The checkpoint's template when it ships one, else m3mlx's M3 template.
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None)
        self.chat_template_name = None if chat_template else \
            getattr(tokenizer, "chat_template_file", None)
        self.options = {**DEFAULT_OPTIONS, **_checked_options(options)}
        self.messages: List[Dict[str, Any]] = []
        self.last_reply: Optional[ChatReply] = None
        # How the cache is kept (a loaded session keeps its saved K/V as they were saved, in
        # this session's memory tier).
        self.cache_settings = dict(index_bits=index_bits, kv_bits=kv_bits, kv_memory=kv_memory,
                                   kv_cache_dir=kv_cache_dir, kv_policy=kv_policy)
        self._cache = make_cache(model, **self.cache_settings)
        self._tokens: List[int] = []  # exactly the tokens the cache holds
        # A template that cannot render a conversation fails now, with a message naming it.
        self._render([{"role": "user", "content": "Hello"}], add_generation_prompt=True)

    # -- settings --------------------------------------------------------------------------

    @property
    def thinking(self) -> str:
        return self._thinking

    @thinking.setter
    def thinking(self, mode: str):
        self._thinking = check_thinking_mode(mode)

    @property
    def tools(self) -> List[Dict[str, Any]]:
        return self._tools

    @tools.setter
    def tools(self, tools: Optional[Sequence[Dict[str, Any]]]):
        self._tools = normalize_tools(tools)

    @property
    def context_used(self) -> int:
        """Tokens held in the cache."""
        return len(self._tokens)

    @property
    def cache_nbytes(self) -> int:
        """Bytes the conversation's cache holds, in memory or in a memory tier's file."""
        return prompt_cache_bytes(self._cache)

    @property
    def cache_resident_nbytes(self) -> int:
        """Bytes of the cache held in memory (less than cache_nbytes with kv_memory)."""
        return sum(c.resident_nbytes for c in self._cache)

    @property
    def context_limit(self) -> Optional[int]:
        return context_limit(self.model)

    # -- conversation ----------------------------------------------------------------------

    def render(self, add_generation_prompt: bool = True) -> str:
        """The conversation as prompt text."""
        return self._render(self.messages, add_generation_prompt)

    def _render(self, messages: List[Dict[str, Any]], add_generation_prompt: bool) -> str:
        system = [] if self.system is None else [
            {"role": "system", "content": check_text(self.system, "the system prompt")}]
        return render_chat(
            system + messages,
            tools=self.tools,
            thinking=self.thinking,
            add_generation_prompt=add_generation_prompt,
            template=self.chat_template,
            template_name=self.chat_template_name,
        )

    def send(self, message: Optional[str] = None, *,
             prefill_progress: Optional[Callable[[int, int], None]] = None,
             **options) -> ChatStream:
        """Stream the reply to a user message (none: continue after tool results).

        The message and the reply join the conversation as the stream runs; a stream stopped
        before any output (Ctrl-C during a long prefill, say) leaves the conversation as it
        was, and the part of the prompt already prefilled stays cached. `options` override the
        session's generation options for this reply only; `prefill_progress(done, total)` is
        called after each prefill chunk.
        """
        if message is None:
            if not self.messages or self.messages[-1]["role"] == "assistant":
                raise InputError("nothing to reply to: pass a message, or add tool results "
                                 "with add_tool_result()")
            new = []
        elif isinstance(message, str):
            new = [{"role": "user", "content": check_text(message, "the message")}]
        else:
            raise TypeError(f"message must be a string, got {type(message).__name__}")
        options = {**self.options, **_checked_options(options),
                   "prefill_progress": prefill_progress}
        prompt = self._render(self.messages + new, add_generation_prompt=True)
        ids = self.tokenizer.encode(prompt)
        self._check_context(len(ids))
        turns = len(self.messages)
        return ChatStream(lambda stream: self._generate(stream, turns, new, prompt, ids, options))

    def add_tool_result(self, content: Any, *, name: Optional[str] = None):
        """Answer a tool call; `content` that is not a string is sent as JSON.

        Results are given in the order of the calls; call `send()` once all are added.
        """
        last = self.messages[-1] if self.messages else {}
        if last.get("role") != "tool" and not (
            last.get("role") == "assistant" and last.get("tool_calls")
        ):
            raise ValueError("no tool call to answer: the last reply made no tool calls")
        result = {"role": "tool", "content": tool_result_text(content)}
        if name is not None:
            result["name"] = name
        self.messages.append(result)

    def reset(self):
        """Forget the conversation (system prompt, tools and options stay)."""
        self.messages = []
        self.last_reply = None
        self._trim_cache(0)

    # -- generation ------------------------------------------------------------------------

    def _check_context(self, n: int):
        limit = self.context_limit
        if limit is not None and n >= limit:
            raise InputError(
                f"the conversation is {n} tokens, beyond the model's context of {limit}; "
                "reset the session or start a shorter one"
            )

    def _generate(self, stream: ChatStream, turns: int, new: List[Dict[str, Any]], prompt: str,
                  ids: List[int], options: Dict[str, Any]):
        if len(self.messages) != turns:
            raise RuntimeError("the conversation changed since this send(); call send() again")
        # At least one prompt token must be fed to get the next-token logits.
        reused = min(common_prefix_length(self._tokens, ids), len(ids) - 1)
        self._trim_cache(reused)
        parser = ReplyParser(in_reasoning=prompt.endswith(THINK_BEGIN), tools=self.tools)
        responses = stream_generate(
            self.model, self.tokenizer, ids[reused:], prompt_cache=self._cache, **options
        )
        generated: List[int] = []
        last = None
        finished = False
        try:
            for last in responses:
                generated.append(last.token)
                delta = parser.feed(last.text)
                if delta:
                    yield delta
            delta = parser.finish()
            finished = True
            if delta:
                yield delta
        finally:  # also on close() and on exceptions (KeyboardInterrupt) while streaming
            responses.close()
            if not finished:
                parser.finish()
            self._sync_cache(ids + generated)
            if generated:
                self.messages += new + [parser.reply.to_message()]
            reason = last.finish_reason if finished and last else "interrupted"
            stream.reply = self.last_reply = _reply(
                parser.reply, reason, generated, last, len(ids) - reused, reused
            )

    def _trim_cache(self, n: int):
        """Keep the first n cached tokens."""
        for c in self._cache:
            c.trim(c.offset - n)
        self._tokens = self._tokens[:n]

    def _sync_cache(self, known: List[int]):
        """Record what the cache holds after generation, known = the tokens fed or sampled.

        The last sampled token is never fed, and an interruption can leave layers at different
        offsets: everything is cut back to what all layers hold.
        """
        held = min([c.offset for c in self._cache] + [len(known)])
        self._tokens = known
        self._trim_cache(held)

    # -- persistence -----------------------------------------------------------------------

    def save(self, path) -> Path:
        """Write the conversation, settings and cache to one safetensors file; returns its path
        (`.safetensors` is appended when missing). A sharded model's ranks each write their
        part of the cache, with the conversation, beside it (`save_prompt_cache`)."""
        path = Path(path)
        if path.suffix != ".safetensors":
            path = path.with_name(path.name + ".safetensors")
        state = {
            "format": SESSION_FORMAT,
            "model": _model_identity(self.model, self.tokenizer),
            "system": self.system,
            "tools": self.tools,
            "thinking": self.thinking,
            "options": self.options,
            "messages": self.messages,
            "tokens": self._tokens,
        }
        save_prompt_cache(str(path), self._cache, {"chat_session": json.dumps(state)},
                          model=self.model)
        return path

    @classmethod
    def load(cls, path, model, tokenizer, **overrides) -> "ChatSession":
        """Restore a session saved with `save`, to continue with the same model.

        The file is checked completely before anything is used: its cache (as
        `load_prompt_cache` checks it), and every saved setting, option, message and token.
        InputError says what is wrong. `overrides` replace saved settings (system, tools,
        thinking, generation options) and set the cache up (`kv_memory`, ...: the saved K/V go
        into that memory tier as they were saved). A sharded model's ranks each load their own
        part (`load_prompt_cache`), together.
        """
        path = Path(path)
        sharded = is_sharded(model)
        # The ranks of a sharded model name their parts alike, whatever files each one sees.
        if path.suffix != ".safetensors" and (sharded or (
                not path.exists() and path.with_name(path.name + ".safetensors").exists())):
            path = path.with_name(path.name + ".safetensors")
        if not sharded and not path.is_file():
            raise FileNotFoundError(f"{path}: no such session file")
        try:
            cache, metadata = load_prompt_cache(str(path), return_metadata=True,
                                                model=model if sharded else None)
        except ValueError as e:
            if sharded and isinstance(e, InputError):  # says which rank, and what to do
                raise
            raise InputError(f"{path} is not a saved m3mlx chat session ({e})") from None
        # Every rank checks its part's copy of the session, and all go on only if all can.
        with together(model.sharding.group) if sharded else nullcontext():
            session = cls._restored(path, cache, metadata, model, tokenizer, overrides)
        return session

    @classmethod
    def _restored(cls, path: Path, cache, metadata, model, tokenizer, overrides):
        try:
            state = parse_json(metadata["chat_session"])
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(f"{path} is not a saved m3mlx chat session ({e})") from None
        try:
            settings = _checked_state(state, model, tokenizer)
        except (TypeError, ValueError) as e:
            raise InputError(f"{path} is not a usable m3mlx chat session: {e}") from None
        try:
            check_cache_fits(cache, model)
        except InputError as e:
            raise InputError(f"{path}: {e}") from None
        if any(c.offset != len(state["tokens"]) for c in cache):
            raise InputError(f"{path}: the saved cache does not match its token record")
        session = cls(model, tokenizer, **{**settings, **overrides})
        session.messages = state["messages"]
        try:
            session.render()
        except Exception as e:  # whatever the saved messages make the template do: refused
            raise InputError(f"{path}: the saved conversation does not render ({e})") from None
        tiers = tiers_of(session._cache)
        # The saved cache as saved (compact K/V are not quantized again), in the session's
        # memory tier when it has one.
        session._cache = [LayerCache.from_state(c.state, c.meta(), tiers[0] if tiers and c.index
                                                else None) for c in cache] if tiers else cache
        session._tokens = state["tokens"]
        return session


def _checked_options(options: Dict[str, Any]) -> Dict[str, Any]:
    """`options` when every name is a generation option and every value is in its range."""
    unknown = set(options) - OPTION_NAMES
    if unknown:
        raise TypeError(
            f"unknown generation option(s) {', '.join(sorted(unknown))}; "
            f"expected {', '.join(sorted(OPTION_NAMES))}"
        )
    return {name: check_option(name, value) if name in OPTION_RANGES else value
            for name, value in options.items()}


def _checked_state(state: Any, model, tokenizer) -> Dict[str, Any]:
    """The settings of a saved session state, every field checked; ValueError or TypeError
    naming the first that is wrong."""
    if not isinstance(state, dict):
        raise ValueError(f"the saved state is a {type(state).__name__}, not an object")
    if state.get("format") != SESSION_FORMAT:
        raise ValueError(f"format {state.get('format')!r}, expected {SESSION_FORMAT!r} (saved "
                         "by another version of m3mlx?)")
    missing, extra = sorted(SESSION_KEYS - set(state)), sorted(set(state) - SESSION_KEYS)
    if missing:
        raise ValueError(f"the saved state lacks {', '.join(missing)}")
    if extra:
        raise ValueError(f"the saved state has unknown fields {', '.join(extra)}")
    if state["model"] != _model_identity(model, tokenizer):
        raise ValueError("it was saved with another model; load it with that model")
    system = state["system"]
    if system is not None:
        check_text(system, "the saved system prompt")
    if not isinstance(state["tools"], list):
        raise ValueError("the saved tools are not a list")
    normalize_tools(state["tools"])
    check_thinking_mode(state["thinking"])
    if not isinstance(state["options"], dict):
        raise ValueError("the saved options are not an object")
    _checked_options(state["options"])
    messages = state["messages"]
    if not isinstance(messages, list):
        raise ValueError("the saved messages are not a list")
    normalize_messages(messages)
    if any(m["role"] == "system" for m in messages):
        raise ValueError("a saved message has the system role (the system prompt is saved "
                         "apart)")
    tokens, vocab = state["tokens"], tokenizer.vocab_size
    if not isinstance(tokens, list) or not all(
            type(t) is int and 0 <= t < vocab for t in tokens):
        raise ValueError(f"the saved tokens are not a list of token ids below {vocab}")
    return {"system": system, "tools": state["tools"], "thinking": state["thinking"],
            **state["options"]}


def _model_identity(model, tokenizer) -> Dict[str, Any]:
    return {"signature": model_signature(model), "layers": len(model.layers),
            "vocab_size": tokenizer.vocab_size}


def _reply(parsed: ParsedReply, reason: str, tokens: List[int], last, prompt_tokens: int,
           cached: int) -> ChatReply:
    return ChatReply(
        content=parsed.content,
        reasoning=parsed.reasoning,
        tool_calls=parsed.tool_calls,
        finish_reason=reason,
        tokens=tokens,
        prompt_tokens=prompt_tokens,
        cached_tokens=cached,
        generation_tokens=last.generation_tokens if last else 0,
        prompt_tps=last.prompt_tps if last else 0.0,
        generation_tps=last.generation_tps if last else 0.0,
        peak_memory=last.peak_memory if last else 0.0,
        expert_stats=last.expert_stats if last else None,
    )
