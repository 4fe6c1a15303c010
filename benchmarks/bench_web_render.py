"""How long the web chat takes to show one more piece of a long streamed reply, in Chromium.

    python benchmarks/bench_web_render.py [--sizes 10,100,400] [--chromium PATH]

A reply of N repeats of a Markdown unit (heading, paragraph with bold, code and a link, a list,
a highlighted code block) grows by 40 characters (about ten tokens) 50 times (fewer for a short one); each step is
rendered and laid out, as the page does once per frame while a reply streams. Two ways: the
whole text rendered again ("full"), and the page's StreamingMarkdown, which keeps the blocks
already finished ("streamed"). Mean milliseconds per step.
"""

import argparse
import functools
import http.server
import shutil
import threading
from pathlib import Path

from playwright.sync_api import sync_playwright

STATIC = Path(__file__).resolve().parent.parent / "m3mlx" / "server" / "static"
UNIT = ("## Section\n\nSome **bold** text with `code` and a [link](https://example.com).\n\n"
        "- item one\n- item two\n\n```python\ndef f(x):\n    return x * 2  # double\n```\n\n")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
MEASURE = """async ([source, step, steps]) => {
    const { renderMarkdown, StreamingMarkdown } = await import('/markdown.js');
    const full = document.body.appendChild(document.createElement('div'));
    const streamed = document.body.appendChild(document.createElement('div'));
    const view = new StreamingMarkdown(streamed);
    const start = source.length - step * steps;
    view.update(source.slice(0, start));
    let fullMs = 0, streamedMs = 0;
    for (let k = 1; k <= steps; k++) {
        const part = source.slice(0, start + k * step);
        let t = performance.now();
        renderMarkdown(full, part);
        full.getBoundingClientRect();  // laid out, as a frame would be
        fullMs += performance.now() - t;
        t = performance.now();
        view.update(part);
        streamed.getBoundingClientRect();
        streamedMs += performance.now() - t;
    }
    return [fullMs / steps, streamedMs / steps];
}"""


class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10,100,400", help="repeats of the Markdown unit")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    args = parser.parse_args()
    handler = functools.partial(Quiet, directory=str(STATIC))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, args=FLAGS)
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{server.server_address[1]}/style.css")
            print(f"{'reply chars':>12} {'full ms':>9} {'streamed ms':>12}")
            for n in (int(s) for s in args.sizes.split(",")):
                source = UNIT * n
                full, streamed = page.evaluate(MEASURE, [source, 40, min(50, len(source) // 40)])
                print(f"{len(source):>12,} {full:>9.2f} {streamed:>12.2f}")
            browser.close()
    finally:
        server.shutdown()


if __name__ == "__main__":
    main()
