"""The README's client examples for `m3mlx serve` (OpenAI SDK, Anthropic SDK, curl) run as
written against a server on the tiny model, with only the address changed."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from server_fixtures import Server

README = (Path(__file__).parent.parent / "README.md").read_text()


def section(title: str, language: str) -> str:
    body = README.split(f"### {title}\n", 1)[1].split("\n### ", 1)[0].split("\n## ", 1)[0]
    return re.search(rf"```{language}\n(.*?)```", body, re.DOTALL).group(1)


@pytest.fixture(scope="module")
def server(demo_dir):
    s = Server(["--model", str(demo_dir), "--dtype", "float32", "--api-key", "sk-local",
                "--served-model-name", "m3", "--no-disk-cache", "--max-tokens", "64"])
    yield s
    s.stop()


@pytest.mark.parametrize("title", ["OpenAI SDK (Python)", "Anthropic SDK (Python)"])
def test_python_examples(server, title):
    code = section(title, "python").replace("http://127.0.0.1:8080", server.base)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr


def test_curl_examples(server):
    script = section("curl", "bash").replace("http://127.0.0.1:8080", server.base)
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "data: [DONE]" in result.stdout and '"type":"message"' in result.stdout
