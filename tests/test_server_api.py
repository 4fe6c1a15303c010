"""`m3mlx serve` on the tiny demo model, driven by the official openai and anthropic clients.

One server per module (a subprocess on a free port). Greedy replies are compared with the
same conversation generated in-process, so the server's output is checked token for token.
"""

import json
import re
import threading
import time

import anthropic
import httpx
import openai
import pytest

import m3mlx
from m3mlx.chat_format import render_chat
from m3mlx.reply_parser import parse_reply

from server_fixtures import Server

KEY = "sk-test-key"
NAME = "m3-tiny"
MAX = 16


@pytest.fixture(scope="module")
def server(demo_dir):
    s = Server(["--model", str(demo_dir), "--dtype", "float32", "--temp", "0",
                "--api-key", KEY, "--no-disk-cache", "--max-body-size", "1MB",
                "--max-tokens", str(MAX), "--served-model-name", NAME])
    yield s
    s.stop()


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def claude(server):
    return anthropic.Anthropic(base_url=server.base, api_key=KEY, max_retries=0, timeout=120)


def reference(demo_model, messages, max_tokens=MAX, tools=None, thinking="adaptive"):
    """(prompt ids, reply) of the conversation generated greedily in-process."""
    model, tokenizer = demo_model
    text = render_chat(messages, tools=tools, thinking=thinking, template=tokenizer.chat_template)
    ids = tokenizer.encode(text)
    out = m3mlx.generate(model, tokenizer, ids, max_tokens=max_tokens, temperature=0.0)
    return ids, parse_reply(out, in_reasoning=text.endswith("<mm:think>"), tools=tools or [])


CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]


def test_models_and_health(server, oai, claude):
    assert [m.id for m in oai.models.list().data] == [NAME]
    assert oai.models.retrieve(NAME).id == NAME
    assert [m.id for m in claude.models.list().data] == [NAME]
    assert httpx.get(server.base + "/health").json() == {"status": "ok", "model": NAME,
                                                         "waiting": 0}


def test_chat_completion_matches_in_process_generation(oai, demo_model):
    ids, expected = reference(demo_model, CHAT)
    reply = oai.chat.completions.create(model=NAME, messages=CHAT)
    choice = reply.choices[0]
    assert choice.message.content == expected.content
    assert choice.finish_reason == "length"
    assert reply.usage.prompt_tokens == len(ids)
    assert reply.usage.completion_tokens == MAX

    chunks = list(oai.chat.completions.create(model=NAME, messages=CHAT, stream=True,
                                              stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    usage = chunks[-1].usage
    assert usage.prompt_tokens == len(ids)
    # The same prompt again: all but its last token come from the cache.
    assert usage.prompt_tokens_details.cached_tokens == len(ids) - 1


def test_content_as_parts_and_developer_role(oai, demo_model):
    messages = [{"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
                {"role": "user", "content": [{"type": "text", "text": "Hello "},
                                             {"type": "text", "text": "there"}]}]
    _, expected = reference(demo_model, CHAT)
    reply = oai.chat.completions.create(model=NAME, messages=messages)
    assert reply.choices[0].message.content == expected.content


def test_completions(oai, demo_model):
    model, tokenizer = demo_model
    prompt = "The quick brown fox"
    expected = m3mlx.generate(model, tokenizer, prompt, max_tokens=8, temperature=0.0)
    reply = oai.completions.create(model=NAME, prompt=prompt, max_tokens=8)
    assert reply.choices[0].text == expected
    assert reply.usage.prompt_tokens == len(tokenizer.encode(prompt))
    streamed = "".join(c.choices[0].text for c in oai.completions.create(
        model=NAME, prompt=prompt, max_tokens=8, stream=True))
    assert streamed == expected
    echoed = oai.completions.create(model=NAME, prompt=prompt, max_tokens=8, echo=True)
    assert echoed.choices[0].text == prompt + expected


def test_responses(oai, demo_model):
    ids, expected = reference(demo_model, CHAT)
    reply = oai.responses.create(model=NAME, instructions="Be brief.", input="Hello there")
    assert reply.output_text == expected.content
    assert reply.status == "incomplete" and reply.incomplete_details.reason == "max_output_tokens"
    assert reply.usage.input_tokens == len(ids)
    kinds, text, final = [], "", None
    for event in oai.responses.create(model=NAME, instructions="Be brief.", input="Hello there",
                                      stream=True):
        kinds.append(event.type)
        if event.type == "response.output_text.delta":
            text += event.delta
        final = event
    assert text == expected.content
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert "response.output_item.added" in kinds and "response.output_item.done" in kinds
    assert final.type == "response.incomplete" and final.response.output_text == expected.content


def test_anthropic_messages(claude, demo_model):
    ids, expected = reference(demo_model, CHAT)
    message = claude.messages.create(model=NAME, max_tokens=MAX, system="Be brief.",
                                     messages=[{"role": "user", "content": "Hello there"}])
    assert message.content[0].text == expected.content
    assert message.stop_reason == "max_tokens"
    usage = message.usage
    assert usage.input_tokens + usage.cache_read_input_tokens == len(ids)
    assert usage.output_tokens == MAX
    with claude.messages.stream(model=NAME, max_tokens=MAX, system="Be brief.",
                                messages=[{"role": "user", "content": "Hello there"}]) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed == expected.content == final.content[0].text
    assert final.usage.cache_read_input_tokens == len(ids) - 1
    count = claude.messages.count_tokens(model=NAME, system="Be brief.",
                                         messages=[{"role": "user", "content": "Hello there"}])
    assert count.input_tokens == len(ids)


def test_logprobs(oai, demo_model):
    model, tokenizer = demo_model
    reply = oai.chat.completions.create(model=NAME, messages=CHAT, max_tokens=6, logprobs=True,
                                        top_logprobs=3)
    entries = reply.choices[0].logprobs.content
    assert len(entries) == reply.usage.completion_tokens == 6
    for entry in entries:
        tops = entry.top_logprobs
        assert len(tops) == 3 and [t.logprob for t in tops] == sorted(
            (t.logprob for t in tops), reverse=True)
        assert entry.logprob <= 0 and entry.logprob == pytest.approx(tops[0].logprob)  # greedy
        assert entry.token == tops[0].token
    assert "".join(e.token for e in entries) == reply.choices[0].message.content


def test_stop_strings(oai, claude, demo_model):
    _, expected = reference(demo_model, CHAT)
    stop = expected.content[4:7]
    reply = oai.chat.completions.create(model=NAME, messages=CHAT, stop=[stop])
    assert reply.choices[0].message.content == expected.content[: expected.content.index(stop)]
    assert reply.choices[0].finish_reason == "stop"
    message = claude.messages.create(model=NAME, max_tokens=MAX, system="Be brief.",
                                     stop_sequences=[stop],
                                     messages=[{"role": "user", "content": "Hello there"}])
    assert message.stop_reason == "stop_sequence" and message.stop_sequence == stop


def test_seed_makes_sampling_reproducible(oai, demo_model):
    def sample(seed):
        return oai.chat.completions.create(model=NAME, messages=CHAT, temperature=1.0,
                                           seed=seed).choices[0].message.content
    assert sample(7) == sample(7)
    # top_p 0 keeps only the most likely token: the greedy reply, whatever the temperature.
    greedy = oai.chat.completions.create(model=NAME, messages=CHAT, temperature=1.5, top_p=0)
    assert greedy.choices[0].message.content == reference(demo_model, CHAT)[1].content


def raw(server, path, body, *, key=KEY, headers=None):
    headers = {"content-type": "application/json", **(headers or {})}
    if key:
        headers["authorization"] = f"Bearer {key}"
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(server.base + path, content=data, headers=headers, timeout=60)


OK = {"model": NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
ANTHROPIC_OK = {"model": NAME, "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]}

BAD_REQUESTS = [
    # (path, body, status, text in the message, param)
    ("/v1/chat/completions", "{oops", 400, "not valid JSON", None),
    ("/v1/chat/completions", b'{"model": "\xff"}', 400, "not UTF-8", None),
    ("/v1/chat/completions", "[1, 2]", 400, "must be a JSON object", None),
    ("/v1/chat/completions", {"messages": OK["messages"]}, 400, "model: Field required", "model"),
    ("/v1/chat/completions", {**OK, "temperature": "hot"}, 400, "temperature:", "temperature"),
    ("/v1/chat/completions", '{"model": "m3-tiny", "messages": [{"role": "user", "content": "x"}'
     '], "temperature": NaN}', 400, "temperature:", "temperature"),
    ("/v1/chat/completions", {**OK, "max_tokens": -5}, 400, "max_tokens:", "max_tokens"),
    ("/v1/chat/completions", {**OK, "top_p": 7}, 400, "top_p:", "top_p"),
    ("/v1/chat/completions", {**OK, "min_p": 1}, 400, "min_p:", "min_p"),
    ("/v1/chat/completions", {**OK, "seed": -1}, 400, "seed:", "seed"),
    ("/v1/chat/completions", {**OK, "top_logprobs": 50, "logprobs": True}, 400,
     "top_logprobs:", "top_logprobs"),
    ("/v1/chat/completions", {**OK, "stream": "yes"}, 400, "stream:", "stream"),
    ("/v1/chat/completions", {**OK, "repetition_penalty": 0}, 400, "repetition_penalty:",
     "repetition_penalty"),
    ("/v1/chat/completions", {**OK, "n": 3}, 400, "n:", "n"),
    ("/v1/chat/completions", {**OK, "messages": []}, 400, "messages:", "messages"),
    ("/v1/chat/completions", {**OK, "messages": [{"role": "wizard", "content": "x"}]}, 400,
     "messages[0].role", "messages[0].role"),
    ("/v1/chat/completions", {**OK, "messages": [{"role": "user", "content": 5}]}, 400,
     "messages[0].content", "messages[0].content"),
    ("/v1/chat/completions", {**OK, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:,"}}]}]}, 400, "type 'image_url'",
     "messages[0].content"),
    ("/v1/chat/completions", {**OK, "model": "gpt-9"}, 404, "model 'gpt-9' not found", "model"),
    ("/v1/chat/completions", {**OK, "tools": [{"type": "function", "function": {}}]}, 400,
     "tools[0] needs a function name", "tools[0].function.name"),
    ("/v1/chat/completions", {**OK, "tools": [{"type": "web_search"}]}, 400,
     "only function tools", "tools[0].type"),
    ("/v1/chat/completions", {**OK, "tool_choice": {"type": "function",
                                                    "function": {"name": "nope"}}}, 400,
     "'nope', which is not among the tools", "tool_choice"),
    ("/v1/chat/completions", {**OK, "stop": [""]}, 400, "empty stop string", "stop"),
    ("/v1/chat/completions", {**OK, "messages": [{"role": "user", "content": "x"}, {
        "role": "assistant", "content": "", "tool_calls": [
            {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{bad"}}]}]},
     400, "arguments is not valid JSON", "messages[1].tool_calls[0].function.arguments"),
    ("/v1/chat/completions", {**OK, "chat_template_kwargs": {"thinking_mode": "maybe"}}, 400,
     "thinking_mode must be one of", "chat_template_kwargs.thinking_mode"),
    ("/v1/chat/completions", "[" * 100000 + "]" * 100000, 400, "", None),
    ("/v1/completions", {"model": NAME, "prompt": [10 ** 9]}, 400, "outside the vocabulary",
     "prompt"),
    ("/v1/completions", {"model": NAME, "prompt": ""}, 400, "prompt is empty", "prompt"),
    ("/v1/responses", {"model": NAME, "input": "hi", "previous_response_id": "resp_1"}, 400,
     "previous_response_id is not supported", "previous_response_id"),
    ("/v1/responses", {"model": NAME, "input": [{"type": "computer_call"}]}, 400,
     "input[0] has type 'computer_call'", "input[0].type"),
]


@pytest.mark.parametrize("path, body, status, text, param", BAD_REQUESTS)
def test_bad_openai_requests(server, path, body, status, text, param):
    response = raw(server, path, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert text in error["message"] and error["param"] == param
    assert error["type"] in ("invalid_request_error", "not_found_error")


ANTHROPIC_BAD = [
    ({"model": NAME, "messages": ANTHROPIC_OK["messages"]}, 400, "max_tokens: Field required"),
    ({**ANTHROPIC_OK, "temperature": 1.5}, 400, "temperature:"),
    ({**ANTHROPIC_OK, "model": "claude-opus-9"}, 404, "model 'claude-opus-9' not found"),
    ({**ANTHROPIC_OK, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                     "data": ""}}]}]}, 400, "messages.0.content.0 is of type"),
    ({**ANTHROPIC_OK, "tool_choice": {"type": "tool", "name": "nope"}}, 400, "not among"),
    ({**ANTHROPIC_OK, "thinking": {"type": "sometimes"}}, 400, "thinking.type:"),
]


@pytest.mark.parametrize("body, status, text", ANTHROPIC_BAD)
def test_bad_anthropic_requests(server, body, status, text):
    response = raw(server, "/v1/messages", body)
    assert response.status_code == status, response.text
    data = response.json()
    assert data["type"] == "error" and text in data["error"]["message"]
    assert data["error"]["type"] == ("not_found_error" if status == 404 else
                                     "invalid_request_error")


def test_auth_size_and_routes(server, oai):
    response = raw(server, "/v1/chat/completions", OK, key=None)
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"
    response = raw(server, "/v1/messages", ANTHROPIC_OK, key=None)
    assert response.status_code == 401 and response.json()["error"]["type"] == \
        "authentication_error"
    response = raw(server, "/v1/chat/completions", OK, key="wrong")
    assert response.status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url, api_key="wrong", max_retries=0).models.list()
    big = {**OK, "messages": [{"role": "user", "content": "x" * (2 << 20)}]}
    response = raw(server, "/v1/chat/completions", big)
    assert response.status_code == 413 and "limit" in response.json()["error"]["message"]
    response = raw(server, "/v1/nowhere", OK)
    assert response.status_code == 404 and "no route" in response.json()["error"]["message"]
    response = httpx.get(server.base + "/v1/chat/completions",
                         headers={"authorization": f"Bearer {KEY}"})
    assert response.status_code == 405 and "error" in response.json()
    assert server.alive()


def test_a_client_that_disconnects_stops_its_generation(server, oai):
    body = {**OK, "max_tokens": 100000, "stream": True, "messages": [
        {"role": "user", "content": "Write forever, please."}]}
    headers = {"authorization": f"Bearer {KEY}"}
    with httpx.stream("POST", server.url + "/chat/completions", json=body, headers=headers,
                      timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data:") and '"content"' in line:
                break
    line = server.wait_for_log(r"cancelled", timeout=30)
    assert "prompt" in line
    start = time.monotonic()
    oai.chat.completions.create(model=NAME, messages=CHAT, max_tokens=2)
    assert time.monotonic() - start < 20


def test_concurrent_clients_get_their_own_replies(oai, demo_model):
    prompts = [f"Question number {i}, please answer." for i in range(4)]
    expected = [reference(demo_model, [{"role": "user", "content": p}], 8)[1].content
                for p in prompts]
    results = [None] * len(prompts)

    def ask(i):
        messages = [{"role": "user", "content": prompts[i]}]
        if i % 2:
            reply = oai.chat.completions.create(model=NAME, max_tokens=8, messages=messages)
            results[i] = reply.choices[0].message.content
        else:
            chunks = oai.chat.completions.create(model=NAME, max_tokens=8, messages=messages,
                                                 stream=True)
            results[i] = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results == expected


PROGRESS_LINE = (r"#(\d+): prompt ([\d,]+) tokens \(([\d,]+) cached\), prefill [\d,.]+ tok/s, "
                 r"(\d+) generated at [\d,.]+ tok/s, (\w+), [\d.]+ s")


@pytest.mark.parametrize("path, anthropic_api", [("/chat/completions", False),
                                                 ("/messages", True)])
def test_long_prompts_stream_prefill_progress(server, path, anthropic_api):
    """SSE comments `: prefill DONE/TOTAL` after each prefill chunk (2048 tokens), before the
    reply; Anthropic streams also get `ping` events. The console logs the request."""
    words = f"{path} " + " ".join(f"w{i % 97}" for i in range(3000))  # > 2 chunks
    body = {"model": NAME, "max_tokens": 2, "stream": True,
            "messages": [{"role": "user", "content": words}]}
    headers = {"authorization": f"Bearer {KEY}"}
    with httpx.stream("POST", server.url + path, json=body, headers=headers,
                      timeout=120) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line]
    progress = [tuple(map(int, re.fullmatch(r": prefill (\d+)/(\d+)", line).groups()))
                for line in lines if line.startswith(": prefill")]
    data = [i for i, line in enumerate(lines) if line.startswith("data:")]
    assert progress, lines[:5]
    total = progress[0][1]
    assert total > 4096 and all(t == total for _, t in progress)
    done = [d for d, _ in progress]  # cached tokens included
    assert done == sorted(set(done)) and done[-1] == total
    marks = [i for i, line in enumerate(lines) if line.startswith(": prefill")]
    end = next(i for i, line in enumerate(lines)
               if '"finish_reason": "length"' in line or line == "event: message_delta")
    assert data[0] < marks[0] and marks[-1] < end  # after the reply's start, before its end
    if anthropic_api:
        assert "event: ping" in lines
    logged = re.search(PROGRESS_LINE, server.wait_for_log(rf"prompt {total:,} tokens"))
    assert logged and int(logged.group(4)) <= 2 and logged.group(5) == "length"
