"""Replies to API responses and stream events: OpenAI Chat Completions, Completions and
Responses, and Anthropic Messages.

Each API gets one `Reply` subclass, fed the engine's events in order: `start` (prompt and
cached token counts), `delta` (content, reasoning, completed tool calls, token logprobs),
`finish` (the outcome). Streaming, each call returns the server-sent events to write;
otherwise `body()` gives the whole response. Tool calls stream in the APIs' incremental
shapes (a call's header, then its arguments), their arguments as JSON typed by the schema.
"""

import json
import time
import uuid
from typing import Any, Dict, List, Optional

from ..reply_parser import ToolCall
from .engine import Outcome


def sse(data: Any, event: Optional[str] = None) -> str:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {text}\n\n"


def comment(text: str) -> str:
    """An SSE comment line: official clients ignore it; a browser page may show it."""
    return f": {text}\n\n"


def new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:24]}"


def arguments_json(call: ToolCall) -> str:
    return json.dumps(call.arguments, ensure_ascii=False)


class Reply:
    """What all APIs share: the reply accumulated from the engine's events."""

    def __init__(self, model: str, decode=None):
        self.model = model
        self.decode = decode  # token id -> text, for logprobs
        self.created = int(time.time())
        self.content: List[str] = []
        self.reasoning: List[str] = []
        self.calls: List[ToolCall] = []
        self.call_ids: List[str] = []
        self.logprobs: List[tuple] = []
        self.prompt_tokens = self.cached_tokens = 0
        self.outcome: Optional[Outcome] = None

    def start(self, prompt_tokens: int, cached_tokens: int) -> List[str]:
        self.prompt_tokens, self.cached_tokens = prompt_tokens, cached_tokens
        return []

    def delta(self, content: str, reasoning: str, calls: List[ToolCall], logprobs) -> List[str]:
        self.content.append(content)
        self.reasoning.append(reasoning)
        for call in calls:
            self.calls.append(call)
            self.call_ids.append(new_id("call_"))
        if logprobs is not None:
            self.logprobs.append(logprobs)
        return []

    def finish(self, outcome: Outcome) -> List[str]:
        self.outcome = outcome
        return []

    def timings(self) -> Dict[str, Any]:
        """Speeds measured by the engine, under llama.cpp's names (an extension of the OpenAI
        API, beside `usage`): prompt tokens computed (not cached) and generated, per second.
        With streamed experts, the expert cache while decoding, as generate's stats line: its
        hit rate (0 to 1) and the bytes read from the SSD per token (of rank 0's experts when
        sharded)."""
        o = self.outcome
        timings = {"prompt_n": o.prompt_tokens - o.cached_tokens,
                   "prompt_per_second": round(o.prefill_tps, 2),
                   "predicted_n": o.completion_tokens,
                   "predicted_per_second": round(o.generation_tps, 2)}
        if o.expert_stats is not None:
            timings["expert_hit_rate"] = round(o.expert_stats.hit_rate, 4)
            timings["expert_bytes_per_token"] = round(o.expert_stats.bytes_per_token)
        return timings

    @property
    def text(self) -> str:
        return "".join(self.content)

    @property
    def thought(self) -> str:
        return "".join(self.reasoning)

    def token_logprobs(self, entries) -> List[Dict[str, Any]]:
        """OpenAI's per-token logprob entries."""
        out = []
        for token, logprob, top in entries:
            piece = self.decode(token)
            out.append({"token": piece, "logprob": logprob, "bytes": list(piece.encode()),
                        "top_logprobs": [{"token": (t := self.decode(i)), "logprob": lp,
                                          "bytes": list(t.encode())} for i, lp in top or []]})
        return out


# -- OpenAI Chat Completions ---------------------------------------------------------------------


class ChatCompletion(Reply):
    def __init__(self, model: str, *, include_usage: bool = False, logprobs: bool = False,
                 decode=None):
        super().__init__(model, decode)
        self.id = new_id("chatcmpl-")
        self.include_usage = include_usage
        self.want_logprobs = logprobs

    def _chunk(self, delta: Dict[str, Any], finish: Optional[str] = None, logprobs=None):
        choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return sse({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                    "model": self.model, "choices": [choice]})

    def start(self, prompt_tokens, cached_tokens):
        super().start(prompt_tokens, cached_tokens)
        return [self._chunk({"role": "assistant", "content": ""})]

    def delta(self, content, reasoning, calls, logprobs):
        first = len(self.calls)
        super().delta(content, reasoning, calls, logprobs)
        events = []
        entries = {"content": self.token_logprobs([logprobs])} \
            if self.want_logprobs and logprobs is not None else None
        if reasoning:
            events.append(self._chunk({"reasoning_content": reasoning, "reasoning": reasoning}))
        if content or entries:
            events.append(self._chunk({"content": content}, logprobs=entries))
        for index in range(first, len(self.calls)):
            call, call_id = self.calls[index], self.call_ids[index]
            events.append(self._chunk({"tool_calls": [{
                "index": index, "id": call_id, "type": "function",
                "function": {"name": call.name, "arguments": ""}}]}))
            events.append(self._chunk({"tool_calls": [{
                "index": index, "function": {"arguments": arguments_json(call)}}]}))
        return events

    def usage(self) -> Dict[str, Any]:
        o = self.outcome
        return {"prompt_tokens": o.prompt_tokens, "completion_tokens": o.completion_tokens,
                "total_tokens": o.prompt_tokens + o.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": o.cached_tokens},
                "completion_tokens_details": {"reasoning_tokens": o.reasoning_tokens}}

    def finish(self, outcome):
        super().finish(outcome)
        events = [self._chunk({}, outcome.finish_reason)]
        if self.include_usage:
            events.append(sse({"id": self.id, "object": "chat.completion.chunk",
                               "created": self.created, "model": self.model, "choices": [],
                               "usage": self.usage(), "timings": self.timings()}))
        return events + [sse("[DONE]")]

    def body(self) -> Dict[str, Any]:
        message: Dict[str, Any] = {"role": "assistant",
                                   "content": self.text if self.text or not self.calls else None}
        if self.thought:
            message["reasoning_content"] = message["reasoning"] = self.thought
        if self.calls:
            message["tool_calls"] = [
                {"id": call_id, "type": "function",
                 "function": {"name": call.name, "arguments": arguments_json(call)}}
                for call, call_id in zip(self.calls, self.call_ids)]
        logprobs = {"content": self.token_logprobs(self.logprobs)} if self.want_logprobs else None
        return {"id": self.id, "object": "chat.completion", "created": self.created,
                "model": self.model,
                "choices": [{"index": 0, "message": message, "logprobs": logprobs,
                             "finish_reason": self.outcome.finish_reason}],
                "usage": self.usage(), "timings": self.timings()}


# -- OpenAI Completions ----------------------------------------------------------------------------


class TextCompletion(Reply):
    def __init__(self, model: str, *, include_usage=False, logprobs=None, echo: str = "",
                 decode=None):
        super().__init__(model, decode)
        self.id = new_id("cmpl-")
        self.include_usage = include_usage
        self.want_logprobs = logprobs
        self.echo = echo
        self.offset = len(echo)

    def _legacy_logprobs(self, entries):
        tokens, values, tops, offsets = [], [], [], []
        for token, logprob, top in entries:
            piece = self.decode(token)
            tokens.append(piece)
            values.append(logprob)
            tops.append({self.decode(i): lp for i, lp in top or []})
            offsets.append(self.offset)
            self.offset += len(piece)
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops,
                "text_offset": offsets}

    def _chunk(self, text: str, finish=None, logprobs=None):
        return sse({"id": self.id, "object": "text_completion", "created": self.created,
                    "model": self.model, "choices": [{"text": text, "index": 0,
                                                      "logprobs": logprobs,
                                                      "finish_reason": finish}]})

    def start(self, prompt_tokens, cached_tokens):
        super().start(prompt_tokens, cached_tokens)
        return [self._chunk(self.echo)] if self.echo else []

    def delta(self, content, reasoning, calls, logprobs):
        super().delta(content, reasoning, calls, logprobs)
        entries = self._legacy_logprobs([logprobs]) \
            if self.want_logprobs is not None and logprobs is not None else None
        return [self._chunk(content, logprobs=entries)] if content or entries else []

    def usage(self):
        o = self.outcome
        return {"prompt_tokens": o.prompt_tokens, "completion_tokens": o.completion_tokens,
                "total_tokens": o.prompt_tokens + o.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": o.cached_tokens}}

    def finish(self, outcome):
        super().finish(outcome)
        events = [self._chunk("", outcome.finish_reason)]
        if self.include_usage:
            events.append(sse({"id": self.id, "object": "text_completion",
                               "created": self.created, "model": self.model, "choices": [],
                               "usage": self.usage(), "timings": self.timings()}))
        return events + [sse("[DONE]")]

    def body(self):
        self.offset = len(self.echo)
        logprobs = self._legacy_logprobs(self.logprobs) if self.want_logprobs is not None \
            else None
        return {"id": self.id, "object": "text_completion", "created": self.created,
                "model": self.model,
                "choices": [{"text": self.echo + self.text, "index": 0, "logprobs": logprobs,
                             "finish_reason": self.outcome.finish_reason}],
                "usage": self.usage(), "timings": self.timings()}


# -- OpenAI Responses ------------------------------------------------------------------------------


class Response(Reply):
    """The Responses API: output items (reasoning, message, function calls) and their events."""

    def __init__(self, model: str, request: Dict[str, Any], decode=None):
        super().__init__(model, decode)
        self.id = new_id("resp_")
        self.request = request  # echoed fields (instructions, tools, ...)
        self.sequence = 0
        self.items: List[Dict[str, Any]] = []
        self.open: Optional[Dict[str, Any]] = None  # the item being streamed

    def _event(self, kind: str, **fields) -> str:
        data = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return sse(data, kind)

    def _response(self, status: str) -> Dict[str, Any]:
        body = {"id": self.id, "object": "response", "created_at": self.created,
                "status": status, "model": self.model, "output": self.items,
                "parallel_tool_calls": self.request.get("parallel_tool_calls", True),
                "tool_choice": self.request.get("tool_choice") or "auto",
                "tools": self.request.get("tools") or [],
                "instructions": self.request.get("instructions"),
                "temperature": self.request.get("temperature"),
                "top_p": self.request.get("top_p"),
                "max_output_tokens": self.request.get("max_output_tokens"),
                "incomplete_details": None, "error": None, "metadata": {},
                "usage": None, "text": {"format": {"type": "text"}}}
        if self.outcome is not None:
            o = self.outcome
            body["usage"] = {"input_tokens": o.prompt_tokens,
                             "input_tokens_details": {"cached_tokens": o.cached_tokens},
                             "output_tokens": o.completion_tokens,
                             "output_tokens_details": {"reasoning_tokens": o.reasoning_tokens},
                             "total_tokens": o.prompt_tokens + o.completion_tokens}
            if o.finish_reason == "length":
                body["incomplete_details"] = {"reason": "max_output_tokens"}
        return body

    def start(self, prompt_tokens, cached_tokens):
        super().start(prompt_tokens, cached_tokens)
        return [self._event("response.created", response=self._response("in_progress")),
                self._event("response.in_progress", response=self._response("in_progress"))]

    def _close(self) -> List[str]:
        item, self.open = self.open, None
        if item is None:
            return []
        index = len(self.items)
        self.items.append(item)
        events = []
        if item["type"] == "reasoning":
            text = item["content"][0]["text"]
            events.append(self._event("response.reasoning_text.done", item_id=item["id"],
                                      output_index=index, content_index=0, text=text))
        elif item["type"] == "message":
            part = item["content"][0]
            events += [self._event("response.output_text.done", item_id=item["id"],
                                   output_index=index, content_index=0, text=part["text"],
                                   logprobs=[]),
                       self._event("response.content_part.done", item_id=item["id"],
                                   output_index=index, content_index=0, part=part)]
        item["status"] = "completed"
        events.append(self._event("response.output_item.done", output_index=index, item=item))
        return events

    def _open(self, kind: str) -> List[str]:
        if self.open is not None and self.open["type"] == kind:
            return []
        events = self._close()
        index = len(self.items)
        if kind == "reasoning":
            self.open = {"type": "reasoning", "id": new_id("rs_"), "summary": [],
                         "content": [{"type": "reasoning_text", "text": ""}],
                         "status": "in_progress"}
            events.append(self._event("response.output_item.added", output_index=index,
                                      item={**self.open, "content": []}))
        else:
            self.open = {"type": "message", "id": new_id("msg_"), "status": "in_progress",
                         "role": "assistant",
                         "content": [{"type": "output_text", "text": "", "annotations": [],
                                      "logprobs": []}]}
            events.append(self._event("response.output_item.added", output_index=index,
                                      item={**self.open, "content": []}))
            events.append(self._event("response.content_part.added", item_id=self.open["id"],
                                      output_index=index, content_index=0,
                                      part={"type": "output_text", "text": "",
                                            "annotations": [], "logprobs": []}))
        return events

    def delta(self, content, reasoning, calls, logprobs):
        first = len(self.calls)
        super().delta(content, reasoning, calls, logprobs)
        events = []
        if reasoning:
            events += self._open("reasoning")
            self.open["content"][0]["text"] += reasoning
            events.append(self._event("response.reasoning_text.delta", item_id=self.open["id"],
                                      output_index=len(self.items), content_index=0,
                                      delta=reasoning))
        if content:
            events += self._open("message")
            self.open["content"][0]["text"] += content
            events.append(self._event("response.output_text.delta", item_id=self.open["id"],
                                      output_index=len(self.items), content_index=0,
                                      delta=content, logprobs=[]))
        for index in range(first, len(self.calls)):
            events += self._close()
            call, call_id = self.calls[index], self.call_ids[index]
            item = {"type": "function_call", "id": new_id("fc_"), "call_id": call_id,
                    "name": call.name, "arguments": "", "status": "in_progress"}
            output_index = len(self.items)
            events.append(self._event("response.output_item.added", output_index=output_index,
                                      item=dict(item)))
            item["arguments"] = arguments_json(call)
            events.append(self._event("response.function_call_arguments.delta",
                                      item_id=item["id"], output_index=output_index,
                                      delta=item["arguments"]))
            events.append(self._event("response.function_call_arguments.done",
                                      item_id=item["id"], output_index=output_index,
                                      arguments=item["arguments"]))
            self.open = item
            events += self._close()
        return events

    def finish(self, outcome):
        super().finish(outcome)
        events = self._close()
        status = "incomplete" if outcome.finish_reason == "length" else "completed"
        kind = "response.incomplete" if status == "incomplete" else "response.completed"
        return events + [self._event(kind, response=self._response(status))]

    def body(self):
        if self.open is not None:
            self._close()
        status = "incomplete" if self.outcome.finish_reason == "length" else "completed"
        return self._response(status)


# -- Anthropic Messages ----------------------------------------------------------------------------

STOP_REASON = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}


class AnthropicMessage(Reply):
    def __init__(self, model: str, decode=None):
        super().__init__(model, decode)
        self.id = new_id("msg_")
        self.blocks: List[Dict[str, Any]] = []
        self.open: Optional[str] = None  # type of the block being streamed

    def _usage(self, output_tokens: int) -> Dict[str, Any]:
        return {"input_tokens": self.prompt_tokens - self.cached_tokens,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": self.cached_tokens,
                "output_tokens": output_tokens}

    def start(self, prompt_tokens, cached_tokens):
        super().start(prompt_tokens, cached_tokens)
        message = {"id": self.id, "type": "message", "role": "assistant", "model": self.model,
                   "content": [], "stop_reason": None, "stop_sequence": None,
                   "usage": self._usage(0)}
        return [sse({"type": "message_start", "message": message}, "message_start")]

    def _stop(self) -> List[str]:
        if self.open is None:
            return []
        events = []
        if self.open == "thinking":
            events.append(sse({"type": "content_block_delta", "index": len(self.blocks) - 1,
                               "delta": {"type": "signature_delta", "signature": ""}},
                              "content_block_delta"))
        self.open = None
        return events + [sse({"type": "content_block_stop", "index": len(self.blocks) - 1},
                             "content_block_stop")]

    def _begin(self, block: Dict[str, Any]) -> List[str]:
        events = self._stop()
        self.blocks.append(block)
        self.open = block["type"]
        start = dict(block)
        if block["type"] == "tool_use":
            start["input"] = {}
        events.append(sse({"type": "content_block_start", "index": len(self.blocks) - 1,
                           "content_block": start}, "content_block_start"))
        return events

    def _delta(self, delta: Dict[str, Any]) -> str:
        return sse({"type": "content_block_delta", "index": len(self.blocks) - 1,
                    "delta": delta}, "content_block_delta")

    def delta(self, content, reasoning, calls, logprobs):
        first = len(self.calls)
        super().delta(content, reasoning, calls, logprobs)
        events = []
        if reasoning:
            if self.open != "thinking":
                events += self._begin({"type": "thinking", "thinking": "", "signature": ""})
            self.blocks[-1]["thinking"] += reasoning
            events.append(self._delta({"type": "thinking_delta", "thinking": reasoning}))
        if content:
            if self.open != "text":
                events += self._begin({"type": "text", "text": ""})
            self.blocks[-1]["text"] += content
            events.append(self._delta({"type": "text_delta", "text": content}))
        for index in range(first, len(self.calls)):
            call = self.calls[index]
            block = {"type": "tool_use", "id": "toolu_" + self.call_ids[index][5:],
                     "name": call.name, "input": call.arguments}
            events += self._begin(block)
            events.append(self._delta({"type": "input_json_delta",
                                       "partial_json": arguments_json(call)}))
            events += self._stop()
        return events

    def stop_reason(self) -> str:
        o = self.outcome
        if o.stop_string is not None and o.finish_reason == "stop":
            return "stop_sequence"
        return STOP_REASON.get(o.finish_reason, "end_turn")

    def finish(self, outcome):
        super().finish(outcome)
        events = self._stop()
        usage = self._usage(outcome.completion_tokens)
        events.append(sse({"type": "message_delta",
                           "delta": {"stop_reason": self.stop_reason(),
                                     "stop_sequence": outcome.stop_string},
                           "usage": usage}, "message_delta"))
        return events + [sse({"type": "message_stop"}, "message_stop")]

    def body(self):
        # Empty text blocks are left out, as the API does; a reply always has one block.
        blocks = [b for b in self.blocks if not (b["type"] == "text" and not b["text"])]
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model,
                "content": blocks or [{"type": "text", "text": ""}],
                "stop_reason": self.stop_reason(), "stop_sequence": self.outcome.stop_string,
                "usage": self._usage(self.outcome.completion_tokens)}
