"""The server's generation worker: one request at a time, over one live cache and the prefix
cache, streaming events back to the request that asked.

Requests wait in a FIFO queue; a single thread runs them, so MLX runs in one thread and no two
requests touch a cache at once. For each request the worker reuses the longest cached prefix
of its prompt: the live cache (the conversation served last, continued in place) or the prefix
cache (any earlier conversation, restored into a fresh cache), prefills the rest, generates,
and stores the conversation back into the prefix cache. A request whose client went away is
skipped, or stopped at the next prefill chunk or token.

Events go to the request's asyncio task through a thread-safe mailbox; tokens that arrive
while the task is busy are delivered together, which keeps the per-token cost of streaming
low.

Under mlx.launch every rank runs an Engine over its part of the model: rank 0's takes the
requests and shares each job with the others (`follow` is their loop), and all of them run the
same steps in lockstep. What only rank 0 knows mid-request (the client went away) is shared at
each prefill chunk and token; the cached prefix reused is the shortest any rank holds.
"""

import asyncio
import collections
import dataclasses
import itertools
import json
import os
import sys
import queue
import threading
import time
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Dict, List, Optional

import mlx.core as mx

from ..chat import common_prefix_length
from ..distributed import DistributedError, Ranks
from ..experts import ExpertStats
from ..generate import stream_generate
from ..model import make_cache
from ..reply_parser import MalformedOutputWarning, ReplyParser, ToolCall
from ..tokens import NS
from .prefix_cache import PrefixCache
from .requests import ToolChoice


class Cancelled(Exception):
    """The client went away."""


@dataclass
class Job:
    """One generation: its prompt, options, and the mailbox its events go to."""

    ids: List[int]
    max_tokens: int
    sampling: Dict[str, Any]
    stop: List[str] = field(default_factory=list)
    chat: bool = True  # parse reasoning and tool calls (False: plain text completion)
    in_reasoning: bool = False
    tools: Optional[List[Dict[str, Any]]] = None
    tool_choice: ToolChoice = field(default_factory=ToolChoice)
    top_logprobs: Optional[int] = None
    label: str = ""
    cancelled: bool = False

    def __post_init__(self):
        self._mail: Deque[tuple] = collections.deque()
        self._lock = threading.Lock()
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._wake: Optional[asyncio.Event] = None

    def to_bytes(self) -> bytes:
        """What another rank needs to run this job in lockstep (no mailbox, no state)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        fields["tool_choice"] = dataclasses.asdict(self.tool_choice)
        return json.dumps(fields).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> "Job":
        fields = json.loads(data)
        fields["tool_choice"] = ToolChoice(**fields["tool_choice"])
        return cls(**fields)

    def bind(self, loop: asyncio.AbstractEventLoop):
        self._loop, self._wake = loop, asyncio.Event()

    def post(self, *event):
        with self._lock:
            self._mail.append(event)
            notify = len(self._mail) == 1
        if notify and self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._wake.set)
            except RuntimeError:  # the event loop is gone (server shutting down)
                self.cancelled = True

    async def events(self, timeout: Optional[float] = None, gather: float = 0.01):
        """Batches of events, as they come, until "done" or "error"; an empty batch when
        `timeout` seconds pass without any. After each batch the reader lets `gather` seconds
        of tokens collect, so a fast model costs one wake-up and one write per interval, not
        per token (the first token still goes out at once)."""
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except asyncio.TimeoutError:
                yield []
                continue
            with self._lock:
                batch = list(self._mail)
                self._mail.clear()
                self._wake.clear()
            yield batch
            if any(e[0] in ("done", "error") for e in batch):
                return
            await asyncio.sleep(gather)


@dataclass
class Outcome:
    finish_reason: str  # "stop", "length", "tool_calls", or "cancelled"
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    stop_string: Optional[str]
    prefill_tps: float
    generation_tps: float
    expert_stats: Optional[ExpertStats] = None  # streamed experts, while decoding (as generate's)


class Engine:
    def __init__(self, model, tokenizer, *, prefix_cache: Optional[PrefixCache] = None,
                 index_bits: Optional[int] = None, kv_bits: Optional[int] = None,
                 prefill_step_size: int = 2048,
                 log: Callable[[str], None] = print, max_queue: int = 64,
                 ranks: Optional[Ranks] = None):
        self.model, self.tokenizer = model, tokenizer
        self.ranks = ranks or Ranks.alone()
        self.prefix_cache = prefix_cache
        self.index_bits, self.kv_bits = index_bits, kv_bits
        self.prefill_step_size = prefill_step_size
        self.log = log
        self.context = getattr(model.args, "max_position_embeddings", None)
        self._queue: "queue.Queue[Optional[Job]]" = queue.Queue(maxsize=max_queue)
        self._live: list = []  # the cache of the conversation served last
        self._live_tokens: List[int] = []  # exactly what the live cache holds
        self._waiting = 0
        self._ids = itertools.count(1)
        self._ns = tokenizer.token_to_id(NS)
        self._eos = list(tokenizer.eos_token_ids)
        self.ready = threading.Event()  # set once the worker has warmed the model up
        self._thread = None
        if self.ranks.leads:  # the other ranks' engines run `follow` instead
            self._thread = threading.Thread(target=self._run, name="m3mlx-generation",
                                            daemon=True)
            self._thread.start()

    # -- the queue -----------------------------------------------------------------------------

    def submit(self, job: Job) -> int:
        """Queue `job`; returns how many requests are ahead of it."""
        job.label = job.label or f"#{next(self._ids)}"
        ahead = self._waiting
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise RuntimeError("the server is busy: too many requests are waiting") from None
        self._waiting += 1
        return ahead

    def close(self):
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=10)

    def new_cache(self) -> list:
        return make_cache(self.model, index_bits=self.index_bits, kv_bits=self.kv_bits)

    def _warm_up(self):
        """One short prefill and decode: the first request then pays no start-up costs."""
        ids = (self.tokenizer.encode("Hello there. " * 16) or [0])[:64]
        cache = self.new_cache()
        for _ in stream_generate(self.model, self.tokenizer, ids, prompt_cache=cache,
                                 max_tokens=2, prefill_step_size=self.prefill_step_size):
            pass

    def _run(self):
        try:
            with self.ranks.armed("warming up"):
                self._warm_up()
        finally:
            self.ready.set()
        while True:
            job = self._queue.get()
            if job is None:
                if self.ranks.sharded:
                    self.ranks.share(b"")  # the other ranks' `follow` ends
                return
            self._waiting -= 1
            if job.cancelled:
                continue
            try:
                with self.ranks.armed(f"serving request {job.label}"):
                    if self.ranks.sharded:
                        # Ranks with seeds of their own would sample different tokens.
                        if job.sampling.get("seed") is None:
                            job.sampling = {**job.sampling, "seed": time.time_ns() % (1 << 31)}
                        self.ranks.share(job.to_bytes())
                    outcome = self._serve(job)
                job.post("done", outcome)
            except DistributedError as e:  # the ranks are out of step: this server is over
                job.post("error", f"generation failed: {e}")
                sys.stderr.write(f"Error: {self.ranks.prefix()}{e}\n")
                sys.stderr.flush()
                os._exit(1)
            except Exception as e:  # a bug must not take the worker down
                self.log(f"request {job.label} failed: {e}\n{traceback.format_exc()}")
                job.post("error", f"generation failed: {e}")

    def follow(self):
        """A rank other than 0: run each job rank 0 shares, in step with it, until rank 0's
        server stops. Waiting for the next request is not watched (it may be long)."""
        with self.ranks.armed("warming up"):
            self._warm_up()
        self.ready.set()
        while True:
            data = self.ranks.share(None, waiting="waiting for the next request")
            if not data:
                return
            job = Job.from_bytes(data)
            job.post = lambda *event: None  # rank 0 answers the client
            try:
                with self.ranks.armed(f"serving request {job.label}"):
                    self._serve(job)
            except DistributedError:
                raise
            except Exception as e:  # rank 0 meets the same failure and answers the client
                sys.stderr.write(f"{self.ranks.prefix()}request {job.label} failed: {e}\n")

    # -- one request ---------------------------------------------------------------------------

    def _reuse(self, ids: List[int]) -> int:
        """Make the live cache hold the longest cached prefix of `ids`; returns its length.
        Without a prefix cache nothing is reused: every prompt is computed in full."""
        if self.prefix_cache is None or not self._live:
            self._live = self.new_cache()
            self._live_tokens = []
        if self.prefix_cache is None:
            return 0
        live = common_prefix_length(self._live_tokens, ids)
        stored = self.ranks.least(self.prefix_cache.match(ids))  # each rank caches its part
        if stored > live:
            self._live = self.prefix_cache.restore(ids, stored)
            self._live_tokens = list(ids[:stored])
            live = stored
        # At least one prompt token must be fed to get the next-token logits.
        reused = min(live, len(ids) - 1)
        self._trim(reused)
        return reused

    def _trim(self, n: int):
        for c in self._live:
            c.trim(c.offset - n)
        self._live_tokens = self._live_tokens[:n]

    def _processors(self, job: Job, state: Dict[str, Any]):
        """Logits processors for the tool choice: no calls at all, or no end before a call."""
        processors = []
        if job.chat and job.tool_choice.mode == "none" and self._ns is not None:
            ns = self._ns

            def no_tool_calls(tokens, logits):
                logits[..., ns] = -float("inf")
                return logits

            processors.append(no_tool_calls)
        if job.chat and job.tool_choice.mode == "required":
            eos = self._eos

            def call_first(tokens, logits):
                if not state["called"]:
                    logits[..., eos] = -float("inf")
                return logits

            processors.append(call_first)
        return processors

    def _serve(self, job: Job) -> Outcome:
        started = time.perf_counter()
        ids = job.ids
        reused = self._reuse(ids)
        job.post("start", len(ids), reused)
        state = {"called": False}
        tools = job.tools or []
        if job.tool_choice.mode == "none":
            tools = []  # a call is then content (the prefix token is banned anyway)
        elif job.tool_choice.name:
            tools = [t for t in tools if t["function"]["name"] == job.tool_choice.name]
        parser = ReplyParser(in_reasoning=job.in_reasoning, tools=tools) if job.chat else None
        generated: List[int] = []
        finish = "cancelled"
        last = None
        reasoning_tokens = 0
        prefill = {"done": time.perf_counter()}

        def progress(done: int, total: int):
            if self._stopping(job):
                raise Cancelled
            job.post("prefill", reused + done, len(ids))
            prefill["done"] = time.perf_counter()

        responses = stream_generate(
            self.model, self.tokenizer, ids[reused:], prompt_cache=self._live,
            max_tokens=job.max_tokens, stop_strings=job.stop,
            prefill_step_size=self.prefill_step_size, top_logprobs=job.top_logprobs,
            logits_processors=self._processors(job, state), prefill_progress=progress,
            **job.sampling)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", MalformedOutputWarning)
            try:
                for last in responses:
                    if self._stopping(job):
                        raise Cancelled
                    generated.append(last.token)
                    logprobs = None
                    if last.logprob is not None and last.token not in self._eos:
                        logprobs = (last.token, last.logprob, last.top_logprobs)
                    if parser is None:
                        job.post("delta", last.text, "", [], logprobs)
                        continue
                    delta = parser.feed(last.text)
                    reasoning_tokens += parser.in_reasoning
                    calls = self._allowed(delta.tool_calls, state, job)
                    if delta or logprobs:
                        job.post("delta", delta.content, delta.reasoning, calls, logprobs)
                    if calls and not job.tool_choice.parallel:
                        break  # one call was asked for: the reply ends with it
                finish = "stop" if last is None or last.finish_reason is None \
                    else last.finish_reason
                if parser is not None:
                    delta = parser.finish()
                    calls = self._allowed(delta.tool_calls, state, job)
                    if delta:
                        job.post("delta", delta.content, delta.reasoning, calls, None)
                    if state["called"]:
                        finish = "tool_calls"
            except Cancelled:
                finish = "cancelled"
            finally:
                responses.close()
                if self.prefix_cache is None:
                    self._live, self._live_tokens = [], []  # nothing is kept
                else:  # what was computed is kept, also for a client that went away
                    self._sync(ids + generated)
                    self.prefix_cache.insert(self._live_tokens, self._live)
        for warning in caught:
            self.log(f"request {job.label}: {warning.message}")
        elapsed = time.perf_counter() - started
        n = len(generated)
        prefill_time = max(prefill["done"] - started, 1e-9)
        decode_time = max(elapsed - prefill_time, 1e-9)
        outcome = Outcome(
            finish_reason=finish, prompt_tokens=len(ids), cached_tokens=reused,
            completion_tokens=n, reasoning_tokens=reasoning_tokens,
            stop_string=last.stop_string if last is not None else None,
            prefill_tps=(len(ids) - reused) / prefill_time,
            generation_tps=n / decode_time if n else 0.0,
            expert_stats=last.expert_stats if last is not None else None,
        )
        self.log(f"{job.label}: prompt {len(ids):,} tokens ({reused:,} cached), prefill "
                 f"{outcome.prefill_tps:,.1f} tok/s, {n:,} generated at "
                 f"{outcome.generation_tps:,.1f} tok/s, {finish}, {elapsed:.2f} s")
        return outcome

    def _stopping(self, job: Job) -> bool:
        """Whether the client went away: rank 0's answer on every rank (one step each)."""
        if not self.ranks.sharded:
            return job.cancelled
        self.ranks.step()
        return bool(self.ranks.share_int(int(job.cancelled)))

    @staticmethod
    def _allowed(calls: List[ToolCall], state, job: Job):
        """The calls to return: with parallel calls off, only the first of the reply."""
        kept = list(calls)
        if not job.tool_choice.parallel:
            kept = kept[: 0 if state["called"] else 1]
        if kept:
            state["called"] = True
        return kept

    def _sync(self, known: List[int]):
        """Record what the live cache holds: the last sampled token is never fed, and a stop
        mid-step can leave layers at different offsets, so cut back to what all hold."""
        held = min([c.offset for c in self._live] + [len(known)])
        self._live_tokens = known
        self._trim(held)
        mx.eval([c.state for c in self._live])
