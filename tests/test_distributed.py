"""Sharded runs over mx.distributed: 2 and 4 local processes on the ring backend (mlx.launch).

Every path here is the MLX-ops path on this CPU (the Metal kernels take the same sharded
arrays on a Mac: each rank's experts and heads are whole, ordinary weights).
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distributed_launch import BIN, HERE, TIMEOUT, checkpoints, free_port, launch  # noqa: F401


@pytest.mark.parametrize("kind, n, model", [
    ("tensor", 2, "f32"), ("tensor", 4, "q4"), ("pipeline", 2, "q4"), ("pipeline", 4, "f32")])
def test_sharded_logits_equal_single_process(checkpoints, tmp_path, kind, n, model):
    """Prefill past MSA's dense window (sparse block selection), chunked prefill and greedy
    decode: every rank's logits within 1e-5 of the single-process model; each rank holds at
    most 1/N of the weights plus what every rank holds (pipeline: plus one layer, the unit a
    stage holds), and its memory peak while loading (MLX's peak memory) stays near that."""
    out = tmp_path / "ranks.json"
    run = launch(n, str(HERE / "distributed_worker.py"), str(checkpoints / model), kind,
                 str(out))
    assert run.returncode == 0, run.stderr[-2000:]
    ranks = json.loads(out.read_text())
    assert len(ranks) == n
    for r in ranks:
        assert r["max_abs_diff"] <= 1e-5, ranks
        assert r["resident_bytes"] == r["planned_bytes"]
        bound = r["model_bytes"] / n + r["replicated_bytes"]
        if kind == "pipeline":
            bound += r["largest_layer_bytes"]
        assert r["resident_bytes"] <= bound, ranks
        # Loading never held the whole model: only this rank's rows, and the column-split
        # matrices (read whole, then sliced) one batch at a time.
        assert r["load_peak_bytes"] < r["model_bytes"] * (1 / n + 0.25), ranks
    assert sum(r["resident_bytes"] for r in ranks) < 1.2 * ranks[0]["single_process_bytes"]


PROMPT = ("Several Macs as one: the ranks split the attention heads, the experts and the "
          "vocabulary, and each reads only its own part of the weights from the disk. " * 2)


def m3mlx_generate(model: Path, *options: str):
    return ["generate", "--model", str(model), "--prompt", PROMPT, "--temp", "0",
            "--prefill-step-size", "32", *options]


@pytest.mark.parametrize("kind, n", [("tensor", 2), ("pipeline", 2)])
def test_generate_greedy_identical_to_single_process(checkpoints, kind, n):
    """The documented form, `mlx.launch ... -- m3mlx generate ...` (the console script):
    rank 0 prints exactly what a single process prints, for a prompt long enough for sparse
    attention and several prefill chunks."""
    options = ("--max-tokens", "24")
    single = subprocess.run([str(BIN / "m3mlx"), *m3mlx_generate(checkpoints / "f32", *options)],
                            capture_output=True, text=True, timeout=TIMEOUT)
    assert single.returncode == 0, single.stderr
    run = launch(n, "m3mlx", *m3mlx_generate(checkpoints / "f32", *options, "--parallel", kind),
                 python=False)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout == single.stdout and len(single.stdout) > 24
    assert run.stderr.count("Generation: 24 tokens") == 1  # statistics from rank 0 only


def start_ranks(n: int, command, tmp_path):
    """Start the ranks of a ring by hand, as mlx.launch does (MLX_RANK, MLX_HOSTFILE), but
    with no launcher to end the others when one dies: what the ranks do on their own."""
    port = free_port(n)
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{port + r}"] for r in range(n)]))
    return [subprocess.Popen([sys.executable, *command], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "MLX_RANK": str(r),
                                  "MLX_HOSTFILE": str(hostfile)})
            for r in range(n)]


@pytest.mark.parametrize("fault", ["killed", "hung"])
def test_rank_failing_mid_generation_ends_the_others(checkpoints, tmp_path, fault):
    """Rank 1 killed (its sockets close) or stopped (they stay open, nothing comes) once rank 0
    has printed text: rank 0 exits within seconds with one line naming itself and why."""
    ranks = start_ranks(2, ["-m", "cli.main", *m3mlx_generate(
        checkpoints / "f32", "--max-tokens", "100000", "--rank-timeout", "3")], tmp_path)
    try:
        assert ranks[0].stdout.read(8)  # generating
        os.kill(ranks[1].pid, signal.SIGKILL if fault == "killed" else signal.SIGSTOP)
        start = time.monotonic()
        _, err = ranks[0].communicate(timeout=30)
        took = time.monotonic() - start
    finally:
        for p in ranks:
            if p.poll() is None:
                p.kill()
            p.wait()
    assert ranks[0].returncode == 1
    assert took < (5 if fault == "killed" else 10)
    line = err.strip().splitlines()[-1]
    assert line.startswith("Error: rank 0 of 2: ")
    if fault == "hung":
        assert "no answer from the other ranks" in line
    else:  # the ring backend reports the closed socket, or (a step queued ahead waits on it)
        assert "lost the other ranks" in line or "no answer from the other ranks" in line


def test_ctrl_c_ends_every_rank_with_a_message(checkpoints):
    """Ctrl-C in a terminal signals the launcher and every rank (one process group): every rank
    exits as interrupted (130; the launcher, interrupted too, reports each rank's status but
    drops what the ranks printed last) and nothing is left running."""
    cmd = [str(BIN / "mlx.launch"), "-n", "2", "--backend", "ring", "-p", str(free_port(2)),
           "--", "m3mlx", *m3mlx_generate(checkpoints / "f32", "--max-tokens", "100000")]
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    run = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env=env, start_new_session=True)
    try:
        assert run.stdout.read(8)  # generating
        os.killpg(run.pid, signal.SIGINT)
        _, err = run.communicate(timeout=15)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    for rank in (0, 1):
        assert f"rank {rank} exited with code 130" in err, err[-1000:]
    with pytest.raises(ProcessLookupError):
        os.killpg(run.pid, 0)  # the whole group is gone


def test_chat_on_two_ranks_replies_as_one_process(checkpoints):
    """`mlx.launch ... -- m3mlx chat` with messages on stdin: rank 0 reads the lines and shares
    them, the replies equal a single process's (/save and /load: test_distributed_sessions)."""
    lines = "Hello there\nTell me more about it\n/quit\n"
    chat = ["chat", "--model", str(checkpoints / "f32"), "--temp", "0", "--max-tokens", "12"]
    single = subprocess.run([str(BIN / "m3mlx"), *chat], input=lines, capture_output=True,
                            text=True, timeout=TIMEOUT, cwd=checkpoints)
    assert single.returncode == 0, single.stderr
    cmd = [str(BIN / "mlx.launch"), "-n", "2", "--backend", "ring", "-p", str(free_port(2)),
           "--", "m3mlx", *chat]
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    run = subprocess.run(cmd, input=lines, capture_output=True, text=True, timeout=TIMEOUT,
                         env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout == single.stdout and single.stdout.count("\n") == 2


def rank_pid(launcher: int, rank: int) -> int:
    """The process mlx.launch (pid `launcher`) started as rank `rank` (MLX_RANK in its env)."""
    for entry in Path("/proc").iterdir():
        try:
            status = (entry / "status").read_text()
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if f"\nPPid:\t{launcher}\n" in status and f"MLX_RANK={rank}".encode() in environ:
            return int(entry.name)
    raise AssertionError(f"no rank {rank} under the launcher {launcher}")


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the ranks' processes in /proc")
@pytest.mark.parametrize("kind", ["tensor", "pipeline"])
def test_serve_on_two_ranks_answers_as_one_process(checkpoints, tmp_path, kind):
    """`mlx.launch -n 2 ... -- m3mlx serve --parallel KIND`: rank 0 listens, rank 1 follows each
    request (a chat completion, a streamed one, a prefix cache hit, one the client abandons) in
    lockstep; the official client gets the single process's greedy replies; stopping rank 0
    (SIGTERM) ends rank 1 cleanly, and each rank persisted its own part of the prefix cache
    (its heads, or its layers)."""
    import openai

    from server_fixtures import Server

    args = ["--model", str(checkpoints / "f32"), "--temp", "0", "--max-tokens", "16",
            "--served-model-name", "m3"]
    first = [{"role": "user", "content": "Tell me about tensor parallel decoding."}]

    def conversation(url: str):
        client = openai.OpenAI(base_url=url, api_key="none", timeout=60, max_retries=0)
        one = client.chat.completions.create(model="m3", messages=first)
        streamed = "".join(
            chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
                model="m3", messages=first, stream=True) if chunk.choices)
        again = client.chat.completions.create(model="m3", messages=first + [
            {"role": "assistant", "content": one.choices[0].message.content},
            {"role": "user", "content": "And pipeline parallel?"}])
        return (one.choices[0].message.content, streamed, again.choices[0].message.content,
                again.usage.prompt_tokens_details.cached_tokens)

    single = Server(args + ["--cache-dir", str(tmp_path / "single")])
    try:
        expected = conversation(single.url)
    finally:
        single.stop()
    assert expected[0] and expected[1] == expected[0] and expected[3] > 0

    launcher = [str(BIN / "mlx.launch"), "-n", "2", "--backend", "ring",
                "-p", str(free_port(2)), "--"]
    env = {"PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    ranks = Server(args + ["--cache-dir", str(tmp_path / "ranks"), "--rank-timeout", "20",
                           "--parallel", kind],
                   launcher=launcher, env=env, timeout=TIMEOUT)
    try:
        assert conversation(ranks.url) == expected
        client = openai.OpenAI(base_url=ranks.url, api_key="none", timeout=60, max_retries=0)
        with client.chat.completions.create(model="m3", messages=first, stream=True,
                                            max_tokens=2000) as stream:
            next(iter(stream))  # then the client goes away: every rank stops the request
        ranks.wait_for_log(r"#4: .*cancelled")
        assert client.chat.completions.create(
            model="m3", messages=first).choices[0].message.content == expected[0]
        os.kill(rank_pid(ranks.process.pid, 0), signal.SIGTERM)
        ranks.process.wait(timeout=30)
    finally:
        if ranks.process.poll() is None:
            ranks.process.kill()
    assert ranks.process.returncode == 0, ranks.log()[-2000:]
    assert "Error" not in ranks.log()
    persisted = sorted(p.parent.name for p in (tmp_path / "ranks").glob("*/*.safetensors"))
    assert len(set(persisted)) == 2  # one fingerprint per rank: each saved its own part
