"""`m3mlx serve` on the tiny model: time to first token along an agent conversation, with and
without the prefix cache and after restarts; and the server's cost per streamed token.

1. TTFT. A 10-turn agent conversation like Claude Code's: a long system prompt (instructions
   and tools, --system-tokens), then each turn a user message or tool result
   (--turn-tokens) and the assistant's reply, growing to more than 16K tokens. Each turn is a
   streamed chat completion with max_tokens=1; TTFT is the time from sending it to the chunk
   that carries the token. Three servers answer the same conversation:
     uncached  --cache-size 0 (every prompt computed in full)
     cached    the prefix cache (in memory)
     restart   the prefix cache on disk, the server restarted before every turn
   Targets (issue 9): cached TTFT <= 10% of uncached at each turn 2..10, restart <= 20%.
2. Streaming cost. Greedy decoding of the same chat prompt in-process (`stream_generate`)
   and through the server (a streamed chat completion read as it arrives); per-token time
   over the same tokens, alternating, median of --repeat runs. Target: under 5% more.

    benchmarks/with_openblas.sh python benchmarks/bench_serve.py
    python benchmarks/bench_serve.py --turns 3 --system-tokens 600 --turn-tokens 100  # quick
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import mlx.core as mx

import m3mlx
from m3mlx.chat_format import render_chat
from m3mlx.demo import write_demo_checkpoint
from m3mlx.generate import stream_generate

NAME = "m3-tiny"
WORDS = ("the repository test build function module error file change review commit branch "
         "value config server request cache token prompt reply tool call result agent step "
         "plan check run fix update add remove read write list search edit").split()


def text_of(tokenizer, n_tokens: int, seed: int) -> str:
    """Plain text of about n_tokens tokens (sentences of 12 words)."""
    sentences, count, i = [], 0, seed
    while count < n_tokens:
        sentence = " ".join(WORDS[(i * 7 + k * 13) % len(WORDS)] for k in range(12)) + ".\n"
        sentences.append(sentence)
        count += len(tokenizer.encode(sentence))
        i += 1
    return "".join(sentences)


def conversation(tokenizer, args):
    """The messages of each turn: turn k's request holds turns 1..k."""
    system = "You are a coding agent working in a repository.\n" + text_of(
        tokenizer, args.system_tokens, 0)
    history = [{"role": "system", "content": system}]
    turns = []
    for k in range(args.turns):
        history = history + [{"role": "user", "content": f"Step {k + 1}: tool output follows.\n"
                              + text_of(tokenizer, args.turn_tokens, k + 1)}]
        turns.append(history)
        history = history + [{"role": "assistant", "content": f"Done with step {k + 1}."}]
    return turns


class Server:
    def __init__(self, model_dir, *options):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "m3mlx.cli.main", "serve", "--model", str(model_dir),
             "--dtype", "float32", "--temp", "0", "--port", "0", "--served-model-name", NAME,
             *options], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        line = self.process.stdout.readline()
        match = re.search(r"at (http://[^/]+)/v1", line)
        if not match:
            self.stop()
            raise RuntimeError(f"the server did not start: {line}")
        self.url = match.group(1) + "/v1/chat/completions"

    def stop(self):
        self.process.terminate()
        self.process.wait(timeout=30)


def stream(url, messages, max_tokens):
    """(seconds to the first token's chunk, seconds per token from there to the final chunk,
    tokens generated, usage). Chunks may carry several tokens: the server merges what is
    ready, so tokens are counted from the usage, not from the chunks."""
    body = {"model": NAME, "messages": messages, "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first = end = None
    usage = None
    with httpx.stream("POST", url, json=body, timeout=600) as response:
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            choices = chunk.get("choices") or []
            if not choices:
                continue
            delta = choices[0]["delta"]
            if delta.get("content") or delta.get("reasoning_content") or \
                    choices[0].get("finish_reason"):
                first = first or time.perf_counter()
            if choices[0].get("finish_reason"):
                end = time.perf_counter()
    tokens = usage["completion_tokens"]
    per_token = (end - first) / (tokens - 1) if tokens > 1 else float("nan")
    return first - start, per_token, tokens, usage


def ttft_table(model_dir, turns, args):
    results = {}
    server = Server(model_dir, "--cache-size", "0", "--no-disk-cache")
    try:
        results["uncached"] = [stream(server.url, t, 1) for t in turns]
    finally:
        server.stop()
    server = Server(model_dir, "--no-disk-cache")
    try:
        results["cached"] = [stream(server.url, t, 1) for t in turns]
    finally:
        server.stop()
    cache_dir = Path(tempfile.mkdtemp(prefix="m3mlx-bench-cache-"))
    try:
        results["restart"] = []
        for t in turns:
            server = Server(model_dir, "--cache-dir", str(cache_dir))
            try:
                results["restart"].append(stream(server.url, t, 1))
            finally:
                server.stop()
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    print(f"\nTTFT per turn (tiny model, float32, CPU); prompt grows to "
          f"{results['uncached'][-1][3]['prompt_tokens']:,} tokens")
    print("| turn | prompt tokens | cached (cached / restart) | TTFT uncached | cached | "
          "restart | cached/uncached | restart/uncached |")
    print("|---|---|---|---|---|---|---|---|")
    worst_cached = worst_restart = 0.0
    for k in range(len(turns)):
        u, c, r = (results[s][k] for s in ("uncached", "cached", "restart"))
        rc, rr = c[0] / u[0], r[0] / u[0]
        if k > 0:
            worst_cached, worst_restart = max(worst_cached, rc), max(worst_restart, rr)
        print(f"| {k + 1} | {u[3]['prompt_tokens']:,} | "
              f"{c[3]['prompt_tokens_details']['cached_tokens']:,} / "
              f"{r[3]['prompt_tokens_details']['cached_tokens']:,} | {u[0] * 1000:,.0f} ms | "
              f"{c[0] * 1000:,.0f} ms | {r[0] * 1000:,.0f} ms | {rc:.1%} | {rr:.1%} |")
    print(f"turns 2..{len(turns)}: worst cached/uncached {worst_cached:.1%} (target <= 10%), "
          f"worst restart/uncached {worst_restart:.1%} (target <= 20%)")


def overhead(model_dir, args):
    model, tokenizer = m3mlx.load(model_dir, dtype=mx.float32)
    messages = [{"role": "user", "content": "Tell me a long story about the repository."}]
    ids = tokenizer.encode(render_chat(messages, template=tokenizer.chat_template))

    def in_process():
        cache = m3mlx.make_cache(model)
        times = [time.perf_counter() for _ in stream_generate(
            model, tokenizer, ids, prompt_cache=cache, max_tokens=args.decode_tokens,
            temperature=0.0)]
        return (times[-1] - times[0]) / (len(times) - 1), len(times)

    server = Server(model_dir, "--no-disk-cache", "--cache-size", "0")
    try:
        local, served = [], []
        for _ in range(args.repeat):
            local.append(in_process())
            _, per_token, n, _ = stream(server.url, messages, args.decode_tokens)
            served.append((per_token, n))
    finally:
        server.stop()
    assert {n for _, n in local} == {n for _, n in served}, "the two decoded different tokens"
    a = statistics.median(t for t, _ in local)
    b = statistics.median(t for t, _ in served)
    # Load on a shared machine drifts: compare each server run with the in-process run just
    # before it, and take the median of those ratios.
    paired = statistics.median(s / l for (s, _), (l, _) in zip(served, local))
    print(f"\nstreaming: {local[0][1]} tokens per run, {args.repeat} alternating runs")
    print(f"median: in-process stream_generate {a * 1000:.3f} ms/token, through the server "
          f"{b * 1000:.3f} ms/token; median of paired ratios: overhead {paired - 1:+.1%} "
          "(target < 5%)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--system-tokens", type=int, default=12000)
    parser.add_argument("--turn-tokens", type=int, default=500)
    parser.add_argument("--decode-tokens", type=int, default=400)
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--skip-ttft", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("M3MLX_HOME", tempfile.mkdtemp(prefix="m3mlx-bench-home-"))
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_demo_checkpoint(Path(tmp) / NAME, dtype=mx.float32)
        tokenizer = m3mlx.Tokenizer.from_dir(model_dir)
        if not args.skip_ttft:
            ttft_table(model_dir, conversation(tokenizer, args), args)
        overhead(model_dir, args)


if __name__ == "__main__":
    main()
