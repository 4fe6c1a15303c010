"""The K/V tier (--kv-memory) on a sharded model: each rank tiers its own K/V (its KV heads under
the tensor plan, its layers under the pipeline plan) within its own limit, in its own directory.

Two local processes on the ring backend (mlx.launch); every path is the MLX-ops path on this
CPU (on a Mac the same pools feed the Metal attention kernel through its slot table).
"""

import json
import os
import subprocess
import time

from distributed_launch import BIN, HERE, TIMEOUT, checkpoints, free_port, launch  # noqa: F401

# Per rank, in slots of a 16-token block per lane (2 KiB of float32 K and V): 10 under the tensor
# plan (3 MSA layers x 2 KV heads), 8 or 16 under the pipeline plan (4 heads, 2 or 1 MSA layers).
# Fewer than the 20 blocks of the worker's context, so blocks go to disk; at least what a 64-token
# prefill chunk needs (its 4 blocks and a selection of 4), so the pools never grow past it.
LIMIT = 2 * 4 * 8 * 2048


def test_tiered_ranks_equal_the_untiered_single_process(checkpoints, tmp_path):
    """Tensor and pipeline plans on 2 ranks, each with a tier of LIMIT bytes: prefill in the
    sparse regime (64-token chunks over 320 tokens) and greedy decode give the logits of the
    whole model untiered in one process (<= 1e-5); each rank's tier sized for its own layers and
    heads, wrote blocks to its file and read them back, kept its pools within LIMIT (its count
    and MLX's measure), in its own subdirectory rank-R, and removed its file at the end."""
    out, kv_dir = tmp_path / "ranks.json", tmp_path / "kv"
    run = launch(2, str(HERE / "distributed_kv_worker.py"), str(checkpoints / "f32"),
                 str(LIMIT), str(kv_dir), str(out))
    assert run.returncode == 0, run.stderr[-2000:]
    ranks = json.loads(out.read_text())
    tensor, pipeline = zip(*ranks)
    assert [(r["tier_layers"], r["tier_heads"]) for r in tensor] == [(3, 2), (3, 2)]
    assert sorted(r["tier_layers"] for r in pipeline) == [1, 2]  # layer 0 is dense
    assert all(r["tier_heads"] == 4 for r in pipeline)
    for r in tensor + pipeline:
        assert r["max_abs_diff"] <= 1e-5, ranks
        assert r["written"] > 20 and r["misses"] > 20 and r["hits"] > 0, ranks
        assert 0 < r["peak_resident"] <= LIMIT, ranks
        # MLX measures the pools within the limit, give or take a few small arrays of its own
        # (up to 15.5 KiB seen on this CPU)
        assert r["measured_resident"] <= LIMIT + (64 << 10), ranks
        assert r["own_directory"] == 1
    assert sorted(p.name for p in kv_dir.iterdir()) == ["rank-0", "rank-1"]
    assert not list(kv_dir.glob("*/*.kv"))  # each rank removed its file


PROMPT = ("The K/V tier across ranks: each rank keeps its own heads' blocks within its own "
          "memory limit and reads the others back from its own disk when they are selected. " * 3)


def test_generate_with_kv_memory_on_two_ranks_prints_the_single_process_text(checkpoints,
                                                                             tmp_path):
    """`mlx.launch -n 2 ... -- m3mlx generate --kv-memory ...` (tensor plan): rank 0 prints
    exactly what one process prints without a tier; each rank used its own subdirectory."""
    common = ["generate", "--model", str(checkpoints / "f32"), "--prompt", PROMPT, "--temp", "0",
              "--max-tokens", "40", "--prefill-step-size", "64"]
    single = subprocess.run([str(BIN / "m3mlx"), *common], capture_output=True, text=True,
                            timeout=TIMEOUT)
    assert single.returncode == 0, single.stderr
    kv_dir = tmp_path / "kv"
    run = launch(2, "m3mlx", *common, "--kv-memory", str(LIMIT), "--kv-cache-dir", str(kv_dir),
                 python=False)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout == single.stdout and len(single.stdout) > 40
    assert sorted(p.name for p in kv_dir.iterdir()) == ["rank-0", "rank-1"]
    assert not list(kv_dir.glob("*/*.kv"))


def test_chat_with_kv_memory_on_four_pipeline_ranks_replies_as_one_process(checkpoints,
                                                                           tmp_path):
    """`mlx.launch -n 4 ... -- m3mlx chat --parallel pipeline --kv-memory ...`: one layer per
    rank, so the stage of the dense layer 0 has no K/V to tier and the three others tier theirs
    (8 slots per KV head each, fewer than the conversation's blocks); the replies of a conversation that outgrows the pools equal one process's without a tier."""
    lines = f"{PROMPT}\nAnd then?\n/quit\n"
    chat = ["chat", "--model", str(checkpoints / "f32"), "--temp", "0", "--max-tokens", "24",
            "--prefill-step-size", "64"]
    single = subprocess.run([str(BIN / "m3mlx"), *chat], input=lines, capture_output=True,
                            text=True, timeout=TIMEOUT)
    assert single.returncode == 0, single.stderr
    kv_dir = tmp_path / "kv"
    run = launch(4, "m3mlx", *chat, "--parallel", "pipeline", "--kv-memory", str(LIMIT // 2),
                 "--kv-cache-dir", str(kv_dir), python=False, input=lines)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout == single.stdout and single.stdout.count("\n") == 2
    assert sorted(p.name for p in kv_dir.iterdir()) == ["rank-0", "rank-1", "rank-2"]
    assert not list(kv_dir.glob("*/*.kv"))


def test_a_rank_that_cannot_write_its_blocks_ends_the_run_naming_itself(checkpoints, tmp_path):
    """Rank 1's subdirectory cannot be made (a file is in the way, as a full or read-only disk
    on one Mac of several): rank 1 fails before any work with one line naming itself and the
    directory, and rank 0, waiting for it, ends too, instead of hanging. (mlx.launch itself
    exits 0 whatever its ranks do; it reports each rank's exit code.)"""
    kv_dir = tmp_path / "kv"
    kv_dir.mkdir()
    (kv_dir / "rank-1").write_text("in the way")
    run = launch(2, "m3mlx", "generate", "--model", str(checkpoints / "f32"), "--prompt",
                 PROMPT, "--kv-memory", str(LIMIT), "--kv-cache-dir", str(kv_dir),
                 "--rank-timeout", "5", python=False)
    assert "rank 1 exited with code 1" in run.stderr, run.stderr[-2000:]
    assert f"Error: rank 1 of 2: cannot write K/V blocks in {kv_dir / 'rank-1'}" in run.stderr
    assert "Traceback" not in run.stderr


def test_chat_ends_every_rank_when_one_rank_cannot_write_its_blocks(checkpoints, tmp_path):
    """Mid-chat, rank 1's disk fails it (its subdirectory replaced by a file once the session
    is set up, so its first eviction cannot make the block file): rank 1 ends with one line
    naming itself, not the chat's "error: ... and go on" (it would fall out of step with rank 0,
    which is waiting for it inside the reply), and rank 0 ends too."""
    kv_dir = tmp_path / "kv"
    cmd = [str(BIN / "mlx.launch"), "-n", "2", "--backend", "ring", "-p", str(free_port(2)),
           "--", "m3mlx", "chat", "--model", str(checkpoints / "f32"), "--temp", "0",
           "--max-tokens", "8", "--prefill-step-size", "64", "--kv-memory", str(LIMIT),
           "--kv-cache-dir", str(kv_dir), "--rank-timeout", "10"]
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    run = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not (kv_dir / "rank-1").is_dir():  # rank 1's session is set up
            assert run.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        (kv_dir / "rank-1").rmdir()
        (kv_dir / "rank-1").write_text("in the way")
        _, err = run.communicate(f"{PROMPT}\nAnd then?\n/quit\n", timeout=TIMEOUT)
    finally:
        if run.poll() is None:
            run.kill()
    assert f"Error: rank 1 of 2: cannot write K/V blocks in {kv_dir / 'rank-1'}" in err, err
    assert "rank 1 exited with code 1" in err
    assert "Traceback" not in err
