"""Start `m3mlx serve` in a subprocess on a free port, for the server's integration tests."""

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import List, Optional

import httpx

TESTS = Path(__file__).parent


class Server:
    """A running `m3mlx serve` (or the scripted variant); its console output is kept."""

    def __init__(self, args: List[str], *, scripts: Optional[Path] = None, env=None,
                 timeout: float = 120, launcher: Optional[List[str]] = None):
        """`launcher`: a command that runs the rest on several ranks (mlx.launch ... --)."""
        command = [sys.executable, str(TESTS / "scripted_server.py"), str(scripts)] if scripts \
            else [*launcher, "m3mlx", "serve"] if launcher \
            else [sys.executable, "-m", "m3mlx.cli.main", "serve"]
        self.process = subprocess.Popen(
            command + ["--port", "0"] + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env={**os.environ, **(env or {})})
        self.lines: List[str] = []
        threading.Thread(target=self._drain, daemon=True).start()
        deadline = time.monotonic() + timeout
        line = ""
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                break
            match = re.search(r"at (http://[^/]+)/v1", line)
            if match:
                self.base = match.group(1)
                return
        self.stop()
        raise RuntimeError(f"m3mlx serve did not start: {line}\n{self.log()}")

    def _drain(self):
        for line in self.process.stderr:
            self.lines.append(line.rstrip("\n"))

    def log(self) -> str:
        return "\n".join(self.lines)

    @property
    def url(self) -> str:
        return self.base + "/v1"

    def wait_for_log(self, pattern: str, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if re.search(pattern, line):
                    return line
            time.sleep(0.05)
        raise AssertionError(f"no log line matching {pattern!r}:\n{self.log()}")

    def alive(self) -> bool:
        return self.process.poll() is None and \
            httpx.get(self.base + "/health", timeout=10).json()["status"] == "ok"

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
