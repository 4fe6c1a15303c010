"""ChatSession: follow-up turns reuse the cache, match from-scratch runs, survive save/load."""

import mlx.core as mx
import pytest

import m3mlx
from m3mlx.chat import ChatSession, common_prefix_length
from m3mlx.chat_format import M3_CHAT_TEMPLATE, render_chat
from m3mlx.demo import write_demo_checkpoint
from m3mlx.generate import stream_generate
from m3mlx.reply_parser import MalformedOutputWarning

from scripted_model import Scripted

GREEDY = {"temperature": 0.0, "max_tokens": 12}
# Special tokens encode the same wherever they stand, so a reply made only of them re-encodes
# to exactly the generated tokens (random text tokens need not: BPE may merge them).
CANONICAL = ["]!d~[", "]!p~[", "]<]image[>[", "]<]video[>[", "]<]start of image[>[", "[e~["]


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    """A demo checkpoint that ships the M3 chat template."""
    return write_demo_checkpoint(tmp_path_factory.mktemp("chat"), dtype=mx.float32)


@pytest.fixture(scope="module")
def loaded(chat_dir):
    return m3mlx.load(chat_dir, dtype=mx.float32)


class Restricted:
    """The model with its output limited to `allowed` tokens (its cache and layers unchanged)."""

    def __init__(self, model, allowed):
        self.model, self.args, self.layers = model, model.args, model.layers
        mask = mx.full((model.args.vocab_size,), -1e9)
        mask[mx.array(allowed)] = 0.0
        self.mask = mask

    def __call__(self, inputs, cache=None, last_only=False):
        return self.model(inputs, cache=cache, last_only=last_only) + self.mask

    def hidden(self, inputs, cache=None):
        return self.model.hidden(inputs, cache)


@pytest.fixture(scope="module")
def canonical(loaded):
    model, tokenizer = loaded
    return Restricted(model, [tokenizer.token_to_id(t) for t in CANONICAL]), tokenizer


def from_scratch(session, model, tokenizer, **options):
    """Greedy tokens for the session's conversation (ending in a user turn), fresh cache."""
    prompt = session.tokenizer.encode(session.render())
    opts = {**GREEDY, **options}
    cache = m3mlx.make_cache(model)
    return [r.token for r in stream_generate(model, tokenizer, prompt, prompt_cache=cache, **opts)]


def send(session, message=None, **options):
    stream = session.send(message, **options)
    deltas = list(stream)
    reply = stream.reply
    assert "".join(d.content for d in deltas) == reply.content
    assert "".join(d.reasoning for d in deltas) == (reply.reasoning or "")
    return reply


def check_matches_scratch(session, model, tokenizer, message, **options):
    """Send `message`; the reply must equal a from-scratch run over the same conversation."""
    before = list(session._tokens)
    session.messages.append({"role": "user", "content": message})
    expected = from_scratch(session, model, tokenizer, **options)
    ids = tokenizer.encode(session.render())
    session.messages.pop()
    reply = send(session, message, **options)
    assert reply.tokens == expected
    assert reply.cached_tokens == min(common_prefix_length(before, ids), len(ids) - 1)
    assert reply.cached_tokens + reply.prompt_tokens == len(ids)
    return reply


def test_follow_up_prefills_only_the_new_turn(canonical):
    model, tokenizer = canonical
    session = ChatSession(model, tokenizer, thinking="disabled", **GREEDY)
    first = check_matches_scratch(session, model, tokenizer, "Hello there")
    assert first.cached_tokens == 0
    new_turn = tokenizer.encode("[e~[\n]~b]user\nAnd now?[e~[\n]~b]ai\n</mm:think>")
    # The end-of-turn token the reply ended with was sampled, never fed; at max_tokens the
    # last sampled token is likewise still to be fed.
    unfed = 0 if first.finish_reason == "stop" else 1
    second = check_matches_scratch(session, model, tokenizer, "And now?")
    assert second.prompt_tokens == len(new_turn) + unfed
    history = tokenizer.encode(session.render(add_generation_prompt=False))
    assert session.context_used == len(history) - len(tokenizer.encode("[e~[\n")) - unfed
    third = check_matches_scratch(session, model, tokenizer, "Once more")
    assert third.cached_tokens > second.cached_tokens > first.cached_tokens


def test_history_rendered_differently_is_trimmed(canonical):
    """Adaptive mode: the template renders a reply without reasoning after a `</mm:think>` the
    model did not generate, so the cache diverges at the reply and is trimmed there."""
    model, tokenizer = canonical
    session = ChatSession(model, tokenizer, thinking="adaptive", **GREEDY)
    send(session, "Hello there")
    first_turn = [{"role": "user", "content": "Hello there"}]
    prompt = tokenizer.encode(render_chat(first_turn, thinking="adaptive"))
    second = check_matches_scratch(session, model, tokenizer, "And now?")
    assert second.cached_tokens == len(prompt)


@pytest.mark.parametrize("change", ["system", "thinking", "tools"])
def test_changed_settings_reprefill_from_the_change(loaded, change):
    model, tokenizer = loaded
    session = ChatSession(model, tokenizer, thinking="enabled", **GREEDY)
    send(session, "Hello there")
    if change == "system":
        session.system = "You are terse."
    elif change == "thinking":
        session.thinking = "disabled"
    else:
        session.tools = [{"name": "clock", "parameters": {"type": "object", "properties": {}}}]
    reply = check_matches_scratch(session, model, tokenizer, "And now?")
    old_system_turn = tokenizer.encode(
        render_chat([], thinking="enabled", add_generation_prompt=False))
    assert 0 < reply.cached_tokens < len(old_system_turn)  # the change is in the system turn


def test_random_text_turns_match_from_scratch(loaded):
    """Unrestricted random output (byte soup that need not re-encode to the same tokens)."""
    model, tokenizer = loaded
    assert tokenizer.chat_template == M3_CHAT_TEMPLATE
    session = ChatSession(model, tokenizer, thinking="enabled", **GREEDY)
    previous_prompt = 0
    for message in ["Hello there", "What is MLX?", "Thanks!"]:
        reply = check_matches_scratch(session, model, tokenizer, message)
        assert reply.cached_tokens >= previous_prompt  # at least the last prompt is reused
        previous_prompt = reply.cached_tokens + reply.prompt_tokens


def test_interrupted_reply_is_kept_and_the_cache_stays_consistent(loaded):
    model, tokenizer = loaded
    session = ChatSession(model, tokenizer, thinking="disabled", temperature=0.0, max_tokens=40)
    stream = session.send("Tell me a long story")
    first = next(stream)
    stream.close()
    reply = stream.reply
    assert reply.finish_reason == "interrupted"
    assert reply.content.startswith(first.content) and len(reply.tokens) < 40
    assert session.messages[-1] == {"role": "assistant", "content": reply.content}
    assert session.context_used == min(c.offset for c in session._cache)
    check_matches_scratch(session, model, tokenizer, "Go on", max_tokens=40)


class InterruptedBetweenLayers:
    """The model, but its n-th call raises KeyboardInterrupt after the first layer's cache took
    the step and before the others did, as a Ctrl-C between two layers would."""

    def __init__(self, model, n):
        self.model, self.args, self.layers, self.n = model, model.args, model.layers, n

    def hidden(self, inputs, cache=None):
        return self.model.hidden(inputs, cache)

    def __call__(self, inputs, cache=None, last_only=False):
        self.n -= 1
        logits = self.model(inputs, cache=cache, last_only=last_only)
        if self.n == 0:
            for c in cache[1:]:  # these layers never wrote the step
                c.trim(inputs.shape[1])
                c.keys[..., c.offset:, :] = 0
                c.values[..., c.offset:, :] = 0
            raise KeyboardInterrupt
        return logits


def test_hard_interrupt_leaves_a_consistent_cache(loaded):
    model, tokenizer = loaded
    # Replies re-encode exactly (the next turn reuses them) and cannot end before the interrupt.
    model = Restricted(model, [tokenizer.token_to_id(t) for t in CANONICAL if t != "[e~["])
    # The prefill, then the 2nd decode step: built while the 1st token is handed over (the
    # decode loop queues a step ahead), so one token reached the reply.
    flaky = InterruptedBetweenLayers(model, n=3)
    session = ChatSession(flaky, tokenizer, thinking="disabled", **GREEDY)
    stream = session.send("Tell me a long story")
    with pytest.raises(KeyboardInterrupt):
        for _ in stream:
            pass
    assert stream.reply.finish_reason == "interrupted" and len(stream.reply.tokens) == 1
    offsets = {c.offset for c in session._cache}
    assert offsets == {session.context_used}
    reply = check_matches_scratch(session, model, tokenizer, "Go on")
    # The reply's one token had been fed (the interrupted step was its successor's): kept.
    assert reply.cached_tokens == len(stream.reply.tokens) + len(
        tokenizer.encode(render_chat([{"role": "user", "content": "Tell me a long story"}],
                                     thinking="disabled")))


def test_unstarted_or_empty_stream_leaves_no_turn(loaded):
    model, tokenizer = loaded
    session = ChatSession(model, tokenizer, **GREEDY)
    session.send("never read").close()
    assert session.messages == [] and session.last_reply is None
    reply = send(session, "Hi", max_tokens=0)
    assert reply.tokens == [] and session.messages == []


def test_tool_results_continue_the_turn(canonical):
    model, tokenizer = canonical
    params = {"type": "object", "properties": {"tz": {"type": "string"}}}
    tools = [{"name": "clock", "parameters": params}]
    session = ChatSession(model, tokenizer, tools=tools, thinking="disabled", **GREEDY)
    with pytest.raises(ValueError, match="no tool call to answer"):
        session.add_tool_result("09:30")
    with pytest.raises(ValueError, match="nothing to reply to"):
        session.send()
    send(session, "What time is it?")
    # Stand in for a model that called the tool (the random one will not).
    session.messages[-1] = {
        "role": "assistant", "content": "",
        "tool_calls": [{"type": "function", "function": {"name": "clock", "arguments": {"tz": "UTC"}}}],
    }
    session.add_tool_result({"time": "09:30"}, name="clock")
    session.add_tool_result("second result")
    prompt = session.render()
    assert prompt.endswith(
        ']~b]tool\n<response>{"time": "09:30"}</response>\n<response>second result</response>'
        "[e~[\n]~b]ai\n</mm:think>"
    )
    expected = from_scratch(session, model, tokenizer)
    reply = send(session)
    assert reply.tokens == expected
    assert session.messages[-1]["role"] == "assistant"
    assert [m["role"] for m in session.messages] == ["user", "assistant", "tool", "tool", "assistant"]


def test_save_load_round_trip(loaded, tmp_path):
    model, tokenizer = loaded
    session = ChatSession(model, tokenizer, system="Be kind.", thinking="enabled", **GREEDY)
    send(session, "Hello there")
    send(session, "More")
    path = tmp_path / "session.safetensors"
    session.save(path)
    restored = ChatSession.load(path, model, tokenizer)
    assert restored.messages == session.messages
    for name in ("system", "thinking", "options", "tools"):
        assert getattr(restored, name) == getattr(session, name), name
    assert restored._tokens == session._tokens
    for a, b in zip(restored._cache, session._cache):
        assert a.offset == b.offset
        for name, array in a.state.items():
            assert mx.array_equal(array, b.state[name]).item(), name
    original, again = send(session, "Last one"), send(restored, "Last one")
    assert again.tokens == original.tokens
    assert (again.prompt_tokens, again.cached_tokens) == (original.prompt_tokens, original.cached_tokens)
    assert again.cached_tokens > 0


def test_load_refuses_other_files_and_models(loaded, tmp_path, chat_dir):
    model, tokenizer = loaded
    cache_only = tmp_path / "cache.safetensors"
    m3mlx.save_prompt_cache(str(cache_only), m3mlx.make_cache(model))
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_text("not safetensors")
    for path in (cache_only, garbage):
        with pytest.raises(ValueError, match="not a saved m3mlx chat session"):
            ChatSession.load(path, model, tokenizer)
    with pytest.raises(FileNotFoundError, match="no such session file"):
        ChatSession.load(tmp_path / "missing.safetensors", model, tokenizer)
    path = ChatSession(model, tokenizer).save(tmp_path / "s")
    assert path == tmp_path / "s.safetensors"
    assert ChatSession.load(tmp_path / "s", model, tokenizer).messages == []
    other_dir = write_demo_checkpoint(tmp_path / "other", dtype=mx.float32, num_hidden_layers=2,
                                      sparse_layers=[False, True], moe_layers=[False, True])
    other = m3mlx.load(other_dir, dtype=mx.float32)
    with pytest.raises(ValueError, match="saved with another model"):
        ChatSession.load(path, *other)


def test_bad_input_is_refused(loaded, monkeypatch):
    model, tokenizer = loaded
    with pytest.raises(ValueError, match="thinking mode must be one of"):
        ChatSession(model, tokenizer, thinking="maybe")
    with pytest.raises(TypeError, match="unknown generation option"):
        ChatSession(model, tokenizer, temprature=0.5)
    session = ChatSession(model, tokenizer, **GREEDY)
    with pytest.raises(TypeError, match="message must be a string"):
        session.send(["hi"])
    monkeypatch.setattr(model.args, "max_position_embeddings", 50)
    with pytest.raises(ValueError, match="beyond the model's context of 50"):
        session.send("hi")
    assert session.messages == []


def test_reset_forgets_the_conversation(loaded):
    model, tokenizer = loaded
    session = ChatSession(model, tokenizer, **GREEDY)
    first = send(session, "Hello there")
    session.reset()
    assert session.messages == [] and session.context_used == 0
    assert all(c.offset == 0 for c in session._cache)
    again = send(session, "Hello there")
    assert again.tokens == first.tokens and again.cached_tokens == 0


# ----------------------------------------------------------------------------------------------
# Session files are checked completely before they are accepted


@pytest.fixture(scope="module")
def saved_session(loaded, tmp_path_factory):
    model, tokenizer = loaded
    session = ChatSession(model, tokenizer, system="Be kind.", **GREEDY)
    send(session, "Hello there")
    return session.save(tmp_path_factory.mktemp("session") / "good")


def edited_session(saved, tmp_path, edit):
    """A copy of the saved session whose state JSON went through `edit(state)` (which may
    return a replacement)."""
    import json

    arrays, meta = mx.load(str(saved), return_metadata=True)
    user = json.loads(meta["user"])
    state = json.loads(user["chat_session"])
    state = edit(state) or state
    user["chat_session"] = json.dumps(state)
    meta["user"] = json.dumps(user)
    out = tmp_path / "edited.safetensors"
    mx.save_safetensors(str(out), arrays, metadata=meta)
    return out


def _options(**changes):
    return lambda state: state["options"].update(changes)


@pytest.mark.parametrize("edit,message", [
    (_options(temperature=-1), r"temperature=-1.0: must be a number >= 0"),
    (_options(top_p=5), r"top_p=5.0: must be a number in \(0, 1\]"),
    (_options(max_tokens="a lot"), r"max_tokens='a lot': must be an integer >= 0"),
    (_options(seed=-4), r"seed=-4"),
    (_options(temprature=0.5), "unknown generation option"),
    (lambda s: s.pop("messages") and None, r"the saved state lacks messages"),
    (lambda s: s.update(extra=1), r"the saved state has unknown fields extra"),
    (lambda s: [s], "the saved state is a list, not an object"),
    (lambda s: "hello", "the saved state is a str"),
    (lambda s: s.update(options=[1]), "the saved options are not an object"),
    (lambda s: s.update(messages={"role": "user"}), "the saved messages are not a list"),
    (lambda s: s["messages"].append({"role": "wizard", "content": "x"}), "role 'wizard'"),
    (lambda s: s["messages"].append({"role": "user", "content": 3}), "content must be a string"),
    (lambda s: s["messages"].insert(0, {"role": "system", "content": "x"}), "system"),
    (lambda s: s.update(thinking="maybe"), "thinking mode must be one of"),
    (lambda s: s.update(tools="all of them"), "the saved tools are not a list"),
    (lambda s: s.update(tools=[{"function": {}}]), "tool 0 has no function name"),
    (lambda s: s.update(system=7), "the saved system prompt must be a string"),
    (lambda s: s["tokens"].append(10**9), "not a list of token ids below"),
    (lambda s: s.update(tokens=s["tokens"][:-1]), "does not match its token record"),
    (lambda s: s.update(format="m3mlx-chat-session/1"), "saved by another version"),
    (lambda s: s["model"].update(signature="0" * 32), "saved with another model"),
])
def test_invalid_session_files_are_refused(loaded, saved_session, tmp_path, edit, message):
    model, tokenizer = loaded
    bad = edited_session(saved_session, tmp_path, edit)
    with pytest.raises(m3mlx.InputError, match=message) as info:
        ChatSession.load(bad, model, tokenizer)
    assert str(bad) in str(info.value)  # the message names the file


def test_a_session_state_nested_too_deeply_is_refused(loaded, saved_session, tmp_path):
    import json

    model, tokenizer = loaded
    arrays, meta = mx.load(str(saved_session), return_metadata=True)
    meta["user"] = json.dumps({"chat_session": "[" * 100_000 + "]" * 100_000})
    bad = tmp_path / "deep.safetensors"
    mx.save_safetensors(str(bad), arrays, metadata=meta)
    with pytest.raises(m3mlx.InputError, match=f"{bad} is not a saved m3mlx chat session "
                                               r"\(the JSON nests too deeply to be read\)"):
        ChatSession.load(bad, model, tokenizer)


def test_a_valid_session_file_still_loads(loaded, saved_session, tmp_path):
    model, tokenizer = loaded
    same = edited_session(saved_session, tmp_path, lambda s: None)
    session = ChatSession.load(same, model, tokenizer)
    assert session.system == "Be kind." and len(session.messages) == 2
    assert send(session, "And then?").finish_reason in ("stop", "length")


def test_ctrl_c_during_a_long_prefill_keeps_the_session_usable(loaded):
    """Interrupting the prefill of a long message leaves the conversation as it was, keeps
    what was prefilled in the cache, and the next reply is what a fresh session would say."""
    model, tokenizer = loaded
    session = ChatSession(model, tokenizer, **GREEDY)
    first = send(session, "Hello there")
    long_message = "The quick brown fox jumps over the lazy dog. " * 30
    chunks = []

    def progress(done, total):
        chunks.append(done)
        if len(chunks) == 2:
            raise KeyboardInterrupt

    stream = session.send(long_message, prefill_progress=progress, prefill_step_size=32)
    with pytest.raises(KeyboardInterrupt):
        list(stream)
    assert stream.reply.finish_reason == "interrupted" and stream.reply.tokens == []
    assert len(session.messages) == 2  # the long message did not join the conversation
    assert session.context_used >= chunks[-1] > len(first.tokens)
    assert all(c.offset == session.context_used for c in session._cache)
    fresh = ChatSession(model, tokenizer, **GREEDY)
    fresh.messages = session.messages + [{"role": "user", "content": long_message}]
    expected = from_scratch(fresh, model, tokenizer)
    reply = send(session, long_message)
    assert reply.cached_tokens >= chunks[-1]  # the interrupted prefill was not wasted
    assert reply.tokens == expected


def test_a_deeply_nested_reply_leaves_the_session_usable(loaded):
    """Issue 14 #4: a tool call nested deeper than the parser follows (32 levels; 300 in the
    parser's and the server's tests) is content with a warning; the next turn renders,
    reuses the cache and replies."""
    model, tokenizer = loaded
    ns = "]<]minimax[>["
    deep = (f'{ns}<tool_call>\n{ns}<invoke name="nest">{ns}<tree>' + f"{ns}<a>" * 60 + "x"
            + f"{ns}</a>" * 60 + f"{ns}</tree>{ns}</invoke>\n{ns}</tool_call>")
    nest = {"type": "function", "function": {"name": "nest", "parameters": {
        "type": "object", "properties": {"tree": {"type": "object"}}}}}
    session = ChatSession(Scripted(model, tokenizer, {"deep": deep}), tokenizer, tools=[nest],
                          temperature=0.0, max_tokens=4000)
    with pytest.warns(MalformedOutputWarning, match="nest deeper than"):
        reply = send(session, "[script:deep] Go.")
    assert reply.tool_calls == [] and reply.content == deep
    after = send(session, "And now?", max_tokens=3)
    assert after.cached_tokens > 0 and len(after.tokens) == 3
