"""Token generation: chunked prefill, sampling, streaming text with statistics."""

import time
from contextlib import closing, contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, Union

import mlx.core as mx
import numpy as np

from .checks import InputError, check_option, check_stop_strings, check_text
from .defaults import GENERATE_MAX_TOKENS, GREEDY_SAMPLING, PREFILL_STEP
from .experts import ExpertStats, format_expert_stats
from .kv_tier import check_cache_room
from .cache import trim_prompt_cache
from .model import Model, make_cache
from .tokenizer import Tokenizer


@dataclass
class GenerationResponse:
    text: str  # the new text of this step (may be empty while a character is incomplete)
    token: Optional[int]
    finish_reason: Optional[str]  # None while generating, then "stop" or "length"
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float  # GB
    # With top_logprobs set: the token's log-probability, and the most likely (token, logprob)s.
    logprob: Optional[float] = None
    top_logprobs: Optional[List[Tuple[int, float]]] = None
    stop_string: Optional[str] = None  # the stop string that ended generation, if one did
    # With streamed experts (load(..., expert_cache=/memory_limit=)): what the expert cache did
    # while generating (after the prefill): hit rate, bytes read per token, read throughput,
    # syncs per token.
    expert_stats: Optional[ExpertStats] = None


def context_limit(model: Model) -> Optional[int]:
    """The most positions the model was made for (max_position_embeddings)."""
    return getattr(getattr(model, "args", None), "max_position_embeddings", None)


def make_sampler(temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                 min_p: float = 0.0) -> Callable[[mx.array, mx.array], mx.array]:
    """A function (logprobs [V], key) -> token. temperature 0 is greedy."""
    temperature = check_option("temperature", temperature)
    top_p, top_k = check_option("top_p", top_p), check_option("top_k", top_k)
    min_p = check_option("min_p", min_p)
    if temperature == 0:
        return lambda logprobs, key: mx.argmax(logprobs, axis=-1)

    def sample(logprobs: mx.array, key: mx.array) -> mx.array:
        keep = mx.ones(logprobs.shape, mx.bool_)
        if top_k:
            kth = mx.topk(logprobs, min(top_k, logprobs.shape[-1]), axis=-1).min(axis=-1, keepdims=True)
            keep = keep & (logprobs >= kth)
        if min_p:
            keep = keep & (logprobs >= logprobs.max(axis=-1, keepdims=True) + mx.log(min_p))
        if top_p < 1:
            order = mx.argsort(-logprobs, axis=-1)
            sorted_p = mx.exp(mx.take_along_axis(logprobs, order, axis=-1))
            before = mx.cumsum(sorted_p, axis=-1) - sorted_p  # mass strictly above each token
            kept_sorted = before < top_p
            keep = keep & mx.put_along_axis(mx.zeros(keep.shape, mx.bool_), order, kept_sorted, axis=-1)
        logits = mx.where(keep, logprobs, -mx.inf) / temperature
        return mx.random.categorical(logits, axis=-1, key=key)

    return sample


def make_repetition_penalty(penalty: float, context: int = 64) -> Callable[[List[int], mx.array], mx.array]:
    """Divide positive (multiply negative) logits of recently seen tokens by `penalty`."""
    penalty = check_option("repetition_penalty", penalty)
    context = check_option("repetition_context_size", context)

    def apply(tokens: List[int], logits: mx.array) -> mx.array:
        recent = tokens[-context:]
        if not recent:
            return logits
        ids = mx.array(sorted(set(recent)))
        picked = logits[..., ids]
        logits[..., ids] = mx.where(picked > 0, picked / penalty, picked * penalty)
        return logits

    return apply


@contextmanager
def wired_limit():
    """On a Mac, wire up to the recommended working set so a model near the size of memory
    is not paged out between steps; restore the previous limit afterwards."""
    if not mx.metal.is_available():
        yield
        return
    previous = mx.set_wired_limit(mx.device_info()["max_recommended_working_set_size"])
    try:
        yield
    finally:
        mx.synchronize()
        mx.set_wired_limit(previous)


def prefill(model: Model, tokens: mx.array, cache, step: int = PREFILL_STEP,
            progress: Optional[Callable[[int, int], None]] = None) -> mx.array:
    """Run all tokens through the model in chunks; returns the last position's logits [V].

    `progress(done, total)` is called after each chunk."""
    n = tokens.size
    step = min(check_option("prefill_step_size", step), max(n, 1))
    for start in range(0, n, step):
        chunk = tokens[None, start : start + step]
        if start + step < n:
            # Earlier chunks only fill the cache: no vocabulary projection (and the stages of
            # a pipeline work on successive chunks at once).
            mx.eval(model.hidden(chunk, cache), [c.arrays for c in cache])
        else:
            logits = model(chunk, cache=cache, last_only=True)[0, -1]
            mx.eval(logits, [c.arrays for c in cache])
        if progress:
            progress(min(n, start + step), n)
    return logits


def sample_tokens(model: Model, prompt: Sequence[int], *, cache=None,
                  max_tokens: int = GENERATE_MAX_TOKENS,
                  sampler=None, logits_processors=(), seed: Optional[int] = None,
                  prefill_step_size: int = PREFILL_STEP,
                  on_prefilled: Optional[Callable[[], None]] = None,
                  prefill_progress: Optional[Callable[[int, int], None]] = None,
                  ) -> Iterator[Tuple[int, mx.array]]:
    """`generate_tokens` with each token's log-probabilities: (token, logprobs [V]). They are
    lazy: they cost nothing unless evaluated.

    Whichever way the loop runs, the cache holds the prompt and every token yielded but the
    last when the caller stops (a reply is continued by feeding its last token)."""
    if not len(prompt):
        raise InputError("the prompt is empty: give at least one token")
    max_tokens = check_option("max_tokens", max_tokens)
    seed = check_option("seed", seed)
    cache = cache if cache is not None else make_cache(model)
    sampler = sampler or make_sampler()
    key = mx.random.key(seed if seed is not None else int(time.time_ns() % (1 << 31)))
    logits = prefill(model, mx.array(prompt), cache, prefill_step_size, prefill_progress)
    if on_prefilled:
        on_prefilled()
    if logits_processors or not _lazy_forward(model, cache):
        yield from _sample_stepwise(model, prompt, cache, logits, key, sampler,
                                    logits_processors, max_tokens)
    else:
        yield from _sample_ahead(model, cache, logits, key, sampler, max_tokens)


def _sample(logits: mx.array, key: mx.array, sampler):
    """(token [], logprobs [V], next key), all lazy."""
    key, step_key = mx.random.split(key)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return sampler(logprobs.astype(mx.float32), step_key), logprobs, key


def _lazy_forward(model: Model, cache) -> bool:
    """Whether a forward pass is only a graph until evaluated. Streamed experts and a K/V
    tier read the router's and the indexer's choices on the host inside the pass, so it runs
    as it is built, and starting the next one early would hold the current token back."""
    return getattr(model, "expert_tier", None) is None and \
        all(getattr(c, "tiered", None) is None for c in cache)


def _sample_ahead(model, cache, logits, key, sampler, max_tokens):
    """Tokens with the next step queued before each is handed over: the device computes
    token t+1 while Python builds its graph and the caller handles token t (what keeps a
    GPU busy between tokens). A caller that stops has had one token too many fed: it is
    trimmed off again, so the cache ends as the stepwise loop leaves it."""
    token, logprobs, key = _sample(logits, key, sampler)
    mx.async_eval(token)
    for n in range(1, max_tokens + 1):
        ahead = n < max_tokens
        if ahead:
            logits = model(token.reshape(1, 1), cache=cache)[0, -1]
            next_token, next_logprobs, key = _sample(logits, key, sampler)
            mx.async_eval(next_token)
        try:
            yield token.item(), logprobs
        except GeneratorExit:
            if ahead:
                trim_prompt_cache(cache, 1)
            raise
        if ahead:
            token, logprobs = next_token, next_logprobs


def _sample_stepwise(model, prompt, cache, logits, key, sampler, logits_processors,
                     max_tokens):
    """Tokens one step at a time: logits processors see every token before the next is
    sampled (a processor may also depend on what the caller did with the last one)."""
    history = list(prompt)
    for n in range(max_tokens):
        if n:  # the previous token is fed only once another is wanted
            logits = model(mx.array([history[-1:]]), cache=cache)[0, -1]
        for process in logits_processors:
            logits = process(history, logits)
        token, logprobs, key = _sample(logits, key, sampler)
        token = token.item()
        history.append(token)
        yield token, logprobs


def generate_tokens(model: Model, prompt: Sequence[int], **options) -> Iterator[int]:
    """Yield up to max_tokens sampled tokens after the prompt, continuing `cache` if given
    (options: those of `sample_tokens`)."""
    for token, _ in sample_tokens(model, prompt, **options):
        yield token


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of text that could begin a stop string."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best


def stream_generate(model: Model, tokenizer: Tokenizer, prompt: Union[str, Sequence[int]], *,
                    max_tokens: int = GENERATE_MAX_TOKENS,
                    temperature: float = GREEDY_SAMPLING["temperature"],
                    top_p: float = GREEDY_SAMPLING["top_p"], top_k: int = GREEDY_SAMPLING["top_k"],
                    min_p: float = 0.0, repetition_penalty: float = 1.0,
                    repetition_context_size: int = 64, seed: Optional[int] = None,
                    stop_strings: Sequence[str] = (), prompt_cache=None,
                    prefill_step_size: int = PREFILL_STEP,
                    logits_processors: Sequence[Callable[[List[int], mx.array], mx.array]] = (),
                    top_logprobs: Optional[int] = None,
                    prefill_progress: Optional[Callable[[int, int], None]] = None,
                    ) -> Iterator[GenerationResponse]:
    """Stream the continuation of `prompt` (text or token ids) as GenerationResponses.

    With `prompt_cache` the prompt continues what the cache holds: only its tokens are prefilled.
    Generation ends at an end-of-turn/EOS token ("stop"), a stop string ("stop"; the string
    is not returned), max_tokens or the end of the model's context ("length").

    `logits_processors` (tokens so far, logits [V]) -> logits run after the repetition penalty.
    `top_logprobs`: None, or k >= 0 to return each token's log-probability and the k most
    likely alternatives. `prefill_progress(done, total)` is called after each prefill chunk
    (raising from it stops generation). Every option is checked before any work (InputError
    names the one that is wrong).
    """
    # Checked here, before the generator starts: a bad call fails at the call, not at the
    # first next().
    for name, value in (("seed", seed), ("prefill_step_size", prefill_step_size),
                        ("repetition_context_size", repetition_context_size)):
        check_option(name, value)
    processors = [] if check_option("repetition_penalty", repetition_penalty) == 1.0 else [
        make_repetition_penalty(repetition_penalty, repetition_context_size)]
    processors += list(logits_processors)
    sampler = make_sampler(temperature, top_p, top_k, min_p)
    stop_strings = check_stop_strings(stop_strings)
    if top_logprobs is not None and (type(top_logprobs) is not int or top_logprobs < 0):
        raise InputError(f"top_logprobs={top_logprobs!r}: give None or a count >= 0")
    ids = _prompt_ids(model, tokenizer, prompt)
    max_tokens = _fit_context(model, prompt_cache, len(ids), check_option("max_tokens", max_tokens))
    if prompt_cache is not None:  # a memory tier must have disk room for the whole context
        held = min((c.offset for c in prompt_cache), default=0)
        check_cache_room(prompt_cache, held + len(ids) + max_tokens)
    return _stream(model, tokenizer, ids, max_tokens=max_tokens, sampler=sampler,
                   processors=processors, seed=seed, stop_strings=stop_strings,
                   prompt_cache=prompt_cache, prefill_step_size=prefill_step_size,
                   prefill_progress=prefill_progress, top_logprobs=top_logprobs)


def _prompt_ids(model: Model, tokenizer: Tokenizer, prompt) -> List[int]:
    if isinstance(prompt, str):
        ids = tokenizer.encode(check_text(prompt, "the prompt"))
    else:
        try:
            array = np.asarray(prompt)
        except ValueError:  # ragged nesting
            array = np.asarray([None])
        if array.size and (array.ndim != 1 or array.dtype.kind not in "iu"):
            raise InputError("a token-id prompt must be a flat list of integers")
        vocab = getattr(getattr(model, "args", None), "vocab_size", None)
        if array.size and vocab is not None and (array.min() < 0 or array.max() >= vocab):
            raise InputError(f"the prompt holds token ids outside the vocabulary [0, {vocab})")
        ids = array.tolist()
    if not ids:
        raise InputError("the prompt is empty: give at least one token")
    return ids


def _fit_context(model: Model, cache, n: int, max_tokens: int) -> int:
    """max_tokens, cut to what fits in the context after an n-token prompt (the last token
    sampled is never fed, hence the + 1); InputError when the prompt itself does not fit."""
    limit = context_limit(model)
    if limit is None:
        return max_tokens
    held = min((c.offset for c in cache), default=0) if cache else 0
    if held + n > limit:
        cached = f" after {held} cached" if held else ""
        raise InputError(f"the prompt is {n} tokens{cached}, beyond the model's context of "
                         f"{limit}; shorten it")
    return min(max_tokens, limit - held - n + 1)


def _stream(model, tokenizer, ids, *, max_tokens, sampler, processors, seed, stop_strings,
            prompt_cache, prefill_step_size, prefill_progress,
            top_logprobs) -> Iterator[GenerationResponse]:
    detok = tokenizer.detokenizer()
    eos = set(tokenizer.eos_token_ids)
    mx.reset_peak_memory()
    start = time.perf_counter()
    times = {}
    tier = getattr(model, "expert_tier", None)
    at_decode = [tier.stats.copy()] if tier is not None else None

    def prefilled():
        times["prefill"] = time.perf_counter() - start
        if tier is not None:
            at_decode[0] = tier.stats.copy()

    text, emitted, n = "", 0, 0

    def response(piece, token, reason, logprobs, stop_string=None):
        prompt_time = times.get("prefill", time.perf_counter() - start)
        gen_time = time.perf_counter() - start - prompt_time
        chosen, top = None, None
        if top_logprobs is not None:
            chosen, top = _logprobs(logprobs, token, top_logprobs)
        return GenerationResponse(
            text=piece, token=token, finish_reason=reason, prompt_tokens=len(ids),
            prompt_tps=len(ids) / max(prompt_time, 1e-9), generation_tokens=n,
            generation_tps=n / gen_time if gen_time > 0 else 0.0,
            peak_memory=mx.get_peak_memory() / 1e9, logprob=chosen, top_logprobs=top,
            stop_string=stop_string,
            expert_stats=None if tier is None else tier.stats - at_decode[0],
        )

    tokens = sample_tokens(model, ids, cache=prompt_cache, max_tokens=max_tokens,
                           sampler=sampler, logits_processors=processors, seed=seed,
                           prefill_step_size=prefill_step_size, on_prefilled=prefilled,
                           prefill_progress=prefill_progress)
    with wired_limit(), closing(tokens):  # closed at once: the cache is trimmed back then
        for token, logprobs in tokens:
            n += 1
            if token in eos:
                text += detok.flush()
                yield response(text[emitted:], token, "stop", logprobs)
                return
            text += detok.add(token)
            hits = [(i, s) for s in stop_strings if (i := text.find(s)) >= 0]
            if hits:
                hit, stop = min(hits)
                yield response(text[emitted:hit], token, "stop", logprobs, stop)
                return
            if n == max_tokens:
                text += detok.flush()
                yield response(text[emitted:], token, "length", logprobs)
                return
            safe = len(text) - _held_back(text, stop_strings)
            yield response(text[emitted:safe], token, None, logprobs)
            emitted = safe


def _logprobs(logprobs: mx.array, token: int, k: int):
    """(the token's log-probability, [(token, logprob)] of the k most likely, best first)."""
    logprobs = logprobs.astype(mx.float32)
    if not k:
        return logprobs[token].item(), []
    k = min(k, logprobs.shape[-1])
    ids = mx.argpartition(-logprobs, k - 1)[:k]
    values = logprobs[ids]
    order = mx.argsort(-values)
    ids, values = ids[order].tolist(), values[order].tolist()
    return logprobs[token].item(), list(zip(ids, values))


def generate(model: Model, tokenizer: Tokenizer, prompt: Union[str, Sequence[int]],
             verbose: bool = False, **options) -> str:
    """The whole continuation as one string; `options` as for stream_generate."""
    pieces = []
    last = None
    for last in stream_generate(model, tokenizer, prompt, **options):
        pieces.append(last.text)
        if verbose:
            print(last.text, end="", flush=True)
    if verbose and last is not None:
        print()
        print(format_stats(last))
    return "".join(pieces)


def format_stats(r: GenerationResponse) -> str:
    line = (f"Prompt: {r.prompt_tokens} tokens, {r.prompt_tps:.1f} tok/s | "
            f"Generation: {r.generation_tokens} tokens, {r.generation_tps:.1f} tok/s | "
            f"Peak memory: {r.peak_memory:.3f} GB")
    if r.expert_stats is not None:
        line += " | " + format_expert_stats(r.expert_stats)
    return line
