"""The web chat page at `/`, in a real headless Chromium (the distribution's, driven by
Playwright) against `m3mlx serve` on the demo model, its replies scripted to known M3 output
(tests/scripted_server.py: the server, engine, reply parser and stream are the real ones).

One server and one browser for the module; the tests run in order on one browser profile, as
one person's session would: the key is asked once, conversations pile up in local storage.
Every wait is on the DOM (a selector or a condition in the page), never a sleep.

`M3MLX_SCREENSHOT=docs/web-chat.png pytest tests/test_web_chat.py` also saves the screenshot
that the README shows (test_reply_streams_with_reasoning_code_and_status writes it).
"""

import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest
from playwright.sync_api import sync_playwright

from m3mlx.tokens import NS

from server_fixtures import Server

KEY = "sk-web-test"
FOX = "The quick brown fox jumps over the lazy dog while the cat sleeps in the sun. "
SCRIPTS = {
    "code": "<mm:think>The user wants a Python function. A short one with a docstring, and an "
            "example call to show it works.</mm:think>Here is a function that adds two "
            "numbers:\n\n```python\ndef add(a, b):\n    \"\"\"Return the sum of a and b.\"\"\"\n"
            "    return a + b  # ints, floats, anything with +\n\nprint(add(2, 3))\n```\n\n"
            "It prints **5**. The same in `bash`: `echo $((2 + 3))`.",
    "hostile": "<script>window.pwned = 1</script><img src=x onerror=\"window.pwned = 2\"> "
               "[click](javascript:window.pwned=3) `<b>bold?</b>`",
    "long": FOX * 200,
    "ponder": "<mm:think>" + FOX * 200,
    "plain": "Just the answer.",
    "weather": f"<mm:think>Weather needs the tool.</mm:think>{NS}<tool_call>\n"
               f'{NS}<invoke name="get_weather">{NS}<city>Paris{NS}</city>{NS}</invoke>\n'
               f"{NS}</tool_call>",
}
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]
MAC_CHROME = "/Applications/Google Chrome.app/Contents/MacOS/Google Chrome"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium() -> str:
    found = [os.environ.get("M3MLX_CHROMIUM"), shutil.which("chromium"),
             shutil.which("chromium-browser"), MAC_CHROME if Path(MAC_CHROME).exists() else None]
    for path in found:
        if path:
            return path
    message = "no Chromium to drive: install the distribution's (apt-get install chromium)"
    if os.environ.get("M3MLX_BROWSER_REQUIRED") == "1":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def server(demo_dir, tmp_path_factory):
    scripts = tmp_path_factory.mktemp("scripts") / "scripts.json"
    scripts.write_text(json.dumps(SCRIPTS))
    s = Server(["--model", str(demo_dir), "--dtype", "float32", "--temp", "0",
                "--api-key", KEY, "--no-disk-cache", "--max-tokens", "4096",
                "--prefill-step-size", "64", "--served-model-name", "m3-tiny"],
               scripts=scripts)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def page(server, tmp_path_factory):
    executable = chromium()
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("profile")), executable_path=executable, headless=True,
            args=FLAGS, viewport={"width": 1100, "height": 760}, color_scheme="light")
        context.set_default_timeout(60_000)
        page = context.pages[0] if context.pages else context.new_page()
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(server.base + "/")
        yield page
        context.close()
        assert not errors, errors


def send(page, text: str):
    page.fill("#input", text)
    page.press("#input", "Enter")


def last_reply(page):
    return page.locator(".message.assistant").last


def wait_done(page):
    page.wait_for_selector("body:not(.busy) #send:not([hidden])")


def test_usage_comes_with_the_engine_timings(server):
    """What the status line shows is in the API for every client: the model card's context
    length, and the speeds beside `usage` in the stream and in a whole body."""
    import openai

    client = openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0, timeout=120)
    card = client.models.retrieve("m3-tiny")
    assert card.model_extra["context_length"] == client.models.list().data[0].context_length
    messages = [{"role": "user", "content": "Time me, please [script:plain]"}]
    chunks = list(client.chat.completions.create(
        model="m3-tiny", messages=messages, max_tokens=8, stream=True,
        stream_options={"include_usage": True}))
    usage_chunk = chunks[-1]
    timings = usage_chunk.model_extra["timings"]
    assert timings["predicted_n"] == usage_chunk.usage.completion_tokens > 0
    assert timings["prompt_n"] == usage_chunk.usage.prompt_tokens - \
        usage_chunk.usage.prompt_tokens_details.cached_tokens
    assert timings["prompt_per_second"] > 0 and timings["predicted_per_second"] > 0
    body = client.chat.completions.create(model="m3-tiny", messages=messages, max_tokens=8)
    # The same prompt again: all but its last token (whose logits are needed) from the cache.
    assert body.model_extra["timings"]["prompt_n"] == 1
    assert body.model_extra["timings"]["predicted_n"] == body.usage.completion_tokens


def logged_after(server, mark: int, pattern: str, timeout: float = 30) -> str:
    """The first console line of the server's, past the first `mark`, matching `pattern`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in server.lines[mark:]:
            if re.search(pattern, line):
                return line
        time.sleep(0.05)
    raise AssertionError(f"no log line matching {pattern!r}:\n{server.log()}")


def test_page_asks_for_the_key_once_and_serves_with_a_strict_policy(page, server):
    import httpx

    response = httpx.get(server.base + "/")
    policy = response.headers["content-security-policy"]
    assert response.status_code == 200 and "script-src 'self'" in policy
    assert "'unsafe-inline'" not in policy and "default-src 'none'" in policy
    assert httpx.get(server.base + "/static/app.js").headers["content-type"].startswith(
        "text/javascript")
    for escape in ("/static/%2e%2e/page.py", "/static/..%2fpage.py", "/static/%2e%2e%2fpage.py"):
        assert httpx.get(server.base + escape).status_code == 404, escape
    models = httpx.get(server.url + "/models", headers={"authorization": f"Bearer {KEY}"})
    assert models.json()["data"][0]["context_length"] > 0

    page.wait_for_selector("#key-dialog[open]")
    page.fill("#key-input", KEY)
    page.press("#key-input", "Enter")
    page.wait_for_selector("#key-dialog:not([open])", state="attached")
    page.wait_for_function("() => document.querySelector('#model-name').textContent === 'm3-tiny'")
    assert page.evaluate("localStorage.getItem('m3mlx.apiKey')") == KEY


def test_reply_streams_with_reasoning_code_and_status(page, tmp_path):
    page.evaluate("""() => {  // every state the reply's content goes through, as rendered
        window.seen = [];
        new MutationObserver(() => {
            const c = document.querySelector('.message.assistant:last-child .content');
            if (c) window.seen.push(c.textContent);
        }).observe(document.querySelector('#messages'), {childList: true, subtree: true,
                                                         characterData: true});
    }""")
    page.click("#settings-toggle")  # the script's marker, out of the picture
    page.fill("#system", "[script:code]")
    page.click("#settings-toggle")
    send(page, "Write me a Python function that adds two numbers")
    wait_done(page)
    reply = last_reply(page)
    assert "The user wants a Python function" in reply.locator("details.reasoning").text_content()
    assert reply.locator("details.reasoning").get_attribute("open") is None  # folded when done
    code = reply.locator(".code pre code.lang-python")
    assert code.inner_text().startswith("def add(a, b):")
    assert code.locator(".tok-keyword", has_text="def").count() == 1
    assert code.locator(".tok-comment").inner_text() == "# ints, floats, anything with +"
    assert code.locator(".tok-string").first.inner_text() == '"""Return the sum of a and b."""'
    assert reply.locator(".content strong").inner_text() == "5"
    assert reply.locator(".content p code").all_inner_texts() == ["bash", "echo $((2 + 3))"]
    # Streamed: the content was on the page before it was complete.
    seen = [s for s in page.evaluate("window.seen") if s]
    final = reply.locator(".content").text_content()
    assert seen[-1] == final and any(len(s) < len(final) for s in seen)
    status = page.inner_text("#status-text")
    assert re.search(r"context [\d,]+ / [\d,]+ · prompt [\d,]+ tok/s · generation [\d.]+ tok/s"
                     r" · cached [\d,]+ of [\d,]+ prompt tokens", status), status
    reply.locator("details.reasoning summary").click()  # open, for the picture
    shot = tmp_path / "web-chat.png"
    page.screenshot(path=str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("M3MLX_SCREENSHOT"):
        target = Path(os.environ["M3MLX_SCREENSHOT"])
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, target)
    reply.locator("details.reasoning summary").click()
    page.click("#settings-toggle")
    page.fill("#system", "")
    page.click("#settings-toggle")
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    reply.locator(".code button.copy").click()
    assert page.evaluate("navigator.clipboard.readText()").startswith("def add(a, b):")


def test_model_output_and_user_text_render_as_text(page):
    send(page, "<img src=x onerror=\"window.pwned = 4\"> [script:hostile]")
    wait_done(page)
    reply = last_reply(page)
    assert "<script>window.pwned = 1</script>" in reply.locator(".content").inner_text()
    assert "<img src=x" in page.locator(".message.user").last.inner_text()
    assert page.locator("#messages script, #messages img").count() == 0
    assert reply.locator("a").count() == 0  # a javascript: link stays text
    assert reply.locator("code").inner_text() == "<b>bold?</b>"
    assert page.evaluate("window.pwned") is None


def test_stop_midway_ends_the_generation_on_the_server(page, server):
    page.click("#new-chat")
    send(page, "Tell me about the fox at length [script:long]")
    page.wait_for_function(
        "() => document.querySelector('.message.assistant .content')?.textContent.length > 80")
    mark = len(server.lines)
    page.click("#stop")
    wait_done(page)
    reply = last_reply(page)
    assert reply.locator(".note").inner_text() == "stopped"
    shown = reply.locator(".content").inner_text()
    assert 80 < len(shown) < len(SCRIPTS["long"]) / 2 and SCRIPTS["long"].startswith(shown[:60])
    line = logged_after(server, mark, r"generated at .* cancelled")
    generated = int(re.search(r"([\d,]+) generated", line).group(1).replace(",", ""))
    assert generated < 2400  # of the script's 4,800 tokens
    assert reply.locator("button.regenerate").count() == 1


def test_reasoning_streams_in_an_open_dimmed_block_that_folds(page):
    page.click("#new-chat")
    send(page, "Ponder the fox [script:ponder]")
    thinking = page.wait_for_selector(".message.assistant details.reasoning[open]")
    assert thinking.query_selector("summary").inner_text() == "Thinking…"
    color = "(s) => getComputedStyle(document.querySelector(s)).color"
    assert page.evaluate(color, "details.reasoning") != page.evaluate(color, "#input")  # dimmed
    page.click("#stop")
    wait_done(page)
    assert last_reply(page).locator("details.reasoning").get_attribute("open") is None
    assert last_reply(page).locator("summary").inner_text().startswith("Reasoning (")


def test_thinking_mode_is_kept_per_conversation(page):
    page.click("#new-chat")
    page.select_option("#thinking", "enabled")
    send(page, "Answer plainly [script:plain]")
    wait_done(page)
    # Thinking enabled: the prompt opens a reasoning block, so the reply is reasoning.
    assert last_reply(page).locator(".reasoning-body").text_content() == "Just the answer."
    assert last_reply(page).locator(".content").count() == 0
    page.select_option("#thinking", "disabled")
    last_reply(page).locator("button.regenerate").click()
    wait_done(page)
    assert last_reply(page).locator(".content").inner_text() == "Just the answer."
    assert last_reply(page).locator("details.reasoning").count() == 0


def test_enter_sends_shift_enter_adds_a_line_and_edit_resends(page):
    page.click("#new-chat")
    page.fill("#input", "first line")
    page.press("#input", "Shift+Enter")
    page.type("#input", "second line [script:plain]")
    assert page.locator(".message").count() == 0  # nothing sent yet
    page.press("#input", "Enter")
    wait_done(page)
    assert page.locator(".message.user .content").inner_text() == \
        "first line\nsecond line [script:plain]"
    page.click(".message.user button.edit")
    assert page.input_value("#input") == "first line\nsecond line [script:plain]"
    assert page.locator(".message").count() == 0
    page.fill("#input", "edited [script:code]")
    page.press("#input", "Enter")
    wait_done(page)
    assert page.locator(".message.user .content").inner_text() == "edited [script:code]"
    assert last_reply(page).locator(".code").count() == 1


def test_tool_calls_show_as_calls_and_take_a_result(page):
    page.click("#new-chat")
    page.click("#settings-toggle")
    page.fill("#tools", json.dumps(TOOLS))
    page.click("#settings-toggle")
    send(page, "Weather in Paris? [script:weather]")
    wait_done(page)
    call = last_reply(page).locator(".tool-call")
    assert call.locator(".tool-name").inner_text() == "called get_weather"
    assert json.loads(call.locator(".tool-args").inner_text()) == {"city": "Paris"}
    shown = last_reply(page).inner_text()
    assert NS not in shown and "tool_call" not in shown and "invoke" not in shown
    assert page.get_attribute("#input", "placeholder").startswith("The result of get_weather")
    send(page, '{"temperature_c": 21} [script:plain]')  # the result of the pending call
    wait_done(page)
    assert page.locator(".message.tool .role-label").inner_text() == "tool result"
    assert last_reply(page).locator(".content").inner_text() == "Just the answer."


def test_long_input_shows_prefill_progress_and_errors_say_what_to_do(page):
    page.click("#new-chat")
    page.evaluate("""() => {
        window.statuses = [];
        new MutationObserver(() => window.statuses.push(
            document.querySelector('#status-text').textContent)
        ).observe(document.querySelector('#status'), {childList: true, subtree: true});
    }""")
    send(page, FOX * 120 + "[script:plain]")  # ~2,900 tokens, prefilled 64 at a time
    wait_done(page)
    steps = [s for s in page.evaluate("window.statuses") if s.startswith("reading the prompt")]
    assert len(steps) > 1 and re.fullmatch(r"reading the prompt: [\d,]+ of [\d,]+ tokens \(\d+%\)",
                                           steps[-1])
    page.click("#settings-toggle")
    page.fill("#temperature", "7")
    page.click("#settings-toggle")
    send(page, "again [script:plain]")
    wait_done(page)
    error = last_reply(page).locator(".error")
    assert "temperature" in error.locator("strong").inner_text()
    assert "check Settings" in error.locator(".what-to-do").inner_text()
    page.click("#settings-toggle")
    page.fill("#temperature", "")
    page.click("#settings-toggle")


def test_reload_finds_the_conversations_again_and_exports_them(page):
    titles = page.locator("#conversations li").all_inner_texts()
    page.reload()
    page.wait_for_selector(".message")
    assert page.locator("#key-dialog[open]").count() == 0  # the key was kept
    assert page.locator("#conversations li").all_inner_texts() == titles
    page.locator("#conversations button", has_text="Tell me about the fox").click()
    assert page.locator(".message.assistant .note").inner_text() == "stopped"
    page.locator("#conversations button", has_text="Answer plainly").click()
    assert page.input_value("#thinking") == "disabled"
    with page.expect_download() as download:
        page.click("#export")
    saved = json.loads(Path(download.value.path()).read_text())
    assert saved["thinking"] == "disabled" and saved["messages"][0]["content"].startswith(
        "Answer plainly [script:plain]")


def test_narrow_window_and_dark_scheme(page):
    page.set_viewport_size({"width": 390, "height": 760})
    page.emulate_media(color_scheme="dark")
    page.wait_for_function(  # the list slides off to the side
        "() => document.querySelector('#sidebar').getBoundingClientRect().right <= 0")
    assert page.locator("#input").bounding_box()["width"] > 250
    page.click("#menu")
    page.wait_for_function(
        "() => document.querySelector('#sidebar').getBoundingClientRect().left >= 0")
    page.click("#messages", position={"x": 370, "y": 300})  # a tap beside the list closes it
    page.wait_for_function(
        "() => document.querySelector('#sidebar').getBoundingClientRect().right <= 0")
    background = page.evaluate("getComputedStyle(document.body).backgroundColor")
    assert sum(map(int, re.findall(r"\d+", background)[:3])) < 150, background
    page.emulate_media(color_scheme="light")
    page.set_viewport_size({"width": 1100, "height": 760})


MARKDOWN = """# Title <b>bold</b>

- one
- two
  - nested **deep**

3. three
4. four

| name | n |
|------|--:|
| `a\\|b` | 1 |

> quoted *text*

[bad](javascript:alert(1)) [good](https://example.com/x) <img src=x onerror=alert(2)>

```js
const s = "</code></pre><script>alert(3)</script>"; // streaming: the fence is still open"""


def test_markdown_renderer_builds_the_structure_and_nothing_else(page):
    structure = page.evaluate("""async (source) => {
        const { renderMarkdown } = await import('/static/markdown.js');
        const box = document.createElement('div');  // detached: nothing in it could run
        renderMarkdown(box, source);
        const texts = (s) => [...box.querySelectorAll(s)].map(e => e.textContent);
        return { h1: texts('h1'), items: texts(':scope > ul > li').length, nested: texts('li li'),
                 deep: texts('li li strong'), ordered: box.querySelector('ol').start,
                 th: texts('th'), td: texts('td'),
                 align: box.querySelector('td:last-child').style.textAlign,
                 quote: texts('blockquote em'),
                 links: [...box.querySelectorAll('a')].map(a => [a.textContent, a.href, a.rel]),
                 code: texts('pre code'), string: texts('pre .tok-string'),
                 comment: texts('pre .tok-comment'),
                 unsafe: box.querySelectorAll('script, img, b, [onerror]').length };
    }""", MARKDOWN)
    assert structure["h1"] == ["Title <b>bold</b>"] and structure["unsafe"] == 0
    assert structure["items"] == 2 and structure["nested"] == ["nested deep"]
    assert structure["deep"] == ["deep"] and structure["ordered"] == 3
    assert structure["th"] == ["name", "n"] and structure["td"] == ["a|b", "1"]
    assert structure["align"] == "right" and structure["quote"] == ["text"]
    assert structure["links"] == [["good", "https://example.com/x", "noopener noreferrer"]]
    assert structure["code"] == ['const s = "</code></pre><script>alert(3)</script>"; '
                                 "// streaming: the fence is still open"]
    assert structure["string"] == ['"</code></pre><script>alert(3)</script>"']
    assert structure["comment"] == ["// streaming: the fence is still open"]


def test_storage_from_elsewhere_is_read_safely(page):
    stored = [1, None, "x", {"id": 7, "messages": []},
              {"id": "odd", "title": "<b>odd</b>", "thinking": "sometimes", "sampling": [],
               "messages": [{"role": "user", "content": {"not": "text"}}, {"role": "evil"},
                            {"role": "assistant", "content": "<i>kept as text</i>",
                             "tool_calls": "no"}]}]
    page.evaluate("(s) => { localStorage.setItem('m3mlx.conversations', s); "
                  "localStorage.setItem('m3mlx.current', 'odd'); }", json.dumps(stored))
    page.reload()
    page.wait_for_selector(".message.assistant")
    assert page.locator("#conversations li").all_inner_texts() == ["<b>odd</b>"]
    assert page.input_value("#thinking") == "adaptive"
    assert last_reply(page).locator(".content").inner_text() == "<i>kept as text</i>"
    assert page.locator("#messages i, #conversations b").count() == 0


def test_streamed_markdown_renders_as_the_whole_text_does_at_every_step(page):
    """The stream renders again only past its last finished block: at every length, what it
    shows is what rendering that much of the text in one go shows."""
    source = SCRIPTS["code"] + "\n\n" + MARKDOWN + "\n\n1. one\n\n2. two\n\n   more\n\nend"
    mismatches = page.evaluate("""async (source) => {
        const { renderMarkdown, StreamingMarkdown } = await import('/static/markdown.js');
        const flat = (box) => {
            const copy = box.cloneNode(true);
            copy.querySelectorAll('.md-part').forEach(p => p.replaceWith(...p.childNodes));
            return copy.innerHTML;
        };
        const streamed = document.createElement('div');
        const stream = new StreamingMarkdown(streamed);
        const bad = [];
        for (let n = 1; n <= source.length; n += 3) {
            const whole = document.createElement('div');
            renderMarkdown(whole, source.slice(0, n));
            stream.update(source.slice(0, n));
            if (flat(streamed) !== whole.innerHTML) bad.push(n);
        }
        return [bad.length, bad.slice(0, 5), stream.finished.length];
    }""", source)
    count, first, finished = mismatches
    assert count == 0, first
    assert finished > len(source) / 2  # most of it was kept, not rendered again
