"""Prompt caches and chat sessions of a model split over 2 ranks (m3mlx.shard_cache): each rank
saves and loads its own part, in step, on the ring backend (mlx.launch) on this machine.

Every path here is the MLX-ops path on this CPU (on a Mac the Metal kernels read the same
per-rank caches: each rank's K/V are ordinary arrays of its own heads or layers).
"""

import json
import subprocess
from pathlib import Path

import mlx.core as mx
import pytest

from distributed_launch import BIN, TIMEOUT, launch, splittable_checkpoint
from m3mlx.cache import load_prompt_cache, save_prompt_cache
from m3mlx.checks import InputError
from m3mlx.convert import convert
from m3mlx.loading import load_model
from m3mlx.model import make_cache

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("sessions")
    convert(splittable_checkpoint(root / "src"), root / "f32", mode="none", progress=False,
            log=lambda s: None, recipe="uniform", dtype="float32")
    return root / "f32"


def test_prompt_cache_across_ranks(model, tmp_path):
    """save_prompt_cache + load_prompt_cache + generation on each plan's 2 ranks: the logits
    equal the single process's, which never saved; what does not belong together is refused on
    every rank with one line naming the rank, what was saved and what to do; a save that fails
    on one rank leaves the previous save whole; a single process or 4 ranks refuse a 2-rank
    save."""
    run = launch(2, str(HERE / "distributed_sessions_worker.py"), "save", str(model),
                 str(tmp_path))
    assert "exited with code" not in run.stderr, run.stderr[-2000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["offsets"] == {"tensor": 105, "pipeline": 105}
    for kind, diff in report["max_abs_diff"].items():
        assert diff <= 1e-5, (kind, diff)
    assert report["single_process"]
    assert report["generated"] == {kind: report["single_process"] for kind in ("tensor",
                                                                                "pipeline")}
    messages = [report[k] for k in ("other_plan", "missing_part", "mixed_saves", "failed_save",
                                    "single_process_save")]
    assert all("\n" not in m for m in messages)
    assert report["other_plan"].startswith("rank 0 of 2: ")
    assert ("was saved by 2 ranks under the tensor plan; this run is 2 ranks under the pipeline "
            "plan: load it under mlx.launch -n 2 with --parallel tensor") in report["other_plan"]
    assert report["missing_part"].startswith(
        f"rank 1 of 2: {tmp_path / 'missing.rank1-of-2.safetensors'}: no such file")
    assert report["mixed_saves"].startswith(
        "rank 1 of 2: one.rank1-of-2.safetensors is from another save than one.safetensors")
    assert report["failed_save"].startswith("rank 1 of 2: ")
    assert report["after_failed_save"] == "first"  # rank 0 never replaced its part
    assert report["leftovers"] == ["kept.rank1-of-2.safetensors", "kept.safetensors"]
    assert "was saved by a single process" in report["single_process_save"]
    assert sorted(p.name for p in tmp_path.glob("tensor*")) == [
        "tensor.rank1-of-2.safetensors", "tensor.safetensors"]

    four = launch(4, str(HERE / "distributed_sessions_worker.py"), "load", str(model),
                  str(tmp_path))
    assert "exited with code" not in four.stderr, four.stderr[-2000:]
    assert json.loads((tmp_path / "report-4.json").read_text()).startswith(
        f"rank 0 of 4: {tmp_path / 'tensor.safetensors'} was saved by 2 ranks under the tensor "
        "plan; this run is 4 ranks under the tensor plan: load it under mlx.launch -n 2")

    single = load_model(str(model))
    for name, rank in (("tensor.safetensors", 0), ("tensor.rank1-of-2.safetensors", 1)):
        with pytest.raises(InputError, match=f"is rank {rank}'s part of a cache saved by 2 ranks "
                           "under the tensor plan; load it under mlx.launch -n 2 with "
                           "--parallel tensor"):
            load_prompt_cache(str(tmp_path / name), model=single)


CHAT = ["chat", "--temp", "0", "--max-tokens", "12"]
FIRST, SECOND = "Hello there", "Tell me more about it"


def m3mlx_chat(model, cwd, lines: str, *launched: str) -> subprocess.CompletedProcess:
    """`m3mlx chat` with `lines` on stdin in `cwd`: one process, or under mlx.launch -n 2
    with the options `launched`."""
    command = ["m3mlx", *CHAT, "--model", str(model)]
    if launched:
        return launch(2, *command, *launched, python=False, input=lines, cwd=cwd)
    return subprocess.run([str(BIN / command[0]), *command[1:]], input=lines,
                          capture_output=True, text=True, timeout=TIMEOUT, cwd=cwd)


@pytest.fixture(scope="module")
def single_chats(model, tmp_path_factory):
    """One process: a turn and /save, then /load and a turn; and both turns without saving."""
    cwd = tmp_path_factory.mktemp("single")
    runs = [m3mlx_chat(model, cwd, lines) for lines in (
        f"{FIRST}\n/save conv\n/quit\n", f"/load conv\n{SECOND}\n/quit\n",
        f"{FIRST}\n{SECOND}\n/quit\n")]
    for run in runs:
        assert run.returncode == 0, run.stderr
    return runs


@pytest.mark.parametrize("kind", ["tensor", "pipeline"])
def test_chat_save_and_load_across_ranks(model, single_chats, tmp_path, kind):
    """`/save` in one launch of 2 ranks, `/load` and a further turn in the next: the greedy
    replies equal the single process's doing the same (and its reply without saving); each
    rank wrote its part; a /load whose part is missing on rank 1 fails on every rank with one
    line from rank 0 naming rank 1, and the chat goes on in step."""
    saved, loaded, straight = single_chats
    assert loaded.stdout == straight.stdout.splitlines(keepends=True)[1]

    first = m3mlx_chat(model, tmp_path, f"{FIRST}\n/save conv\n/save other\n/quit\n",
                       "--parallel", kind)
    assert "exited with code" not in first.stderr, first.stderr[-2000:]
    assert first.stdout == saved.stdout
    assert first.stderr.count(
        "saved 2 messages to conv.safetensors (rank 0's part; the other ranks' beside it on "
        "their machines: conv.rank1-of-2.safetensors)\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "conv.rank1-of-2.safetensors", "conv.safetensors", "other.rank1-of-2.safetensors",
        "other.safetensors"]

    (tmp_path / "other.rank1-of-2.safetensors").unlink()
    second = m3mlx_chat(model, tmp_path, f"/load other\n/load conv\n{SECOND}\n/quit\n",
                        "--parallel", kind)
    assert "rank 0 exited with code 1" in second.stderr  # a line failed (on every rank)
    assert second.stdout == loaded.stdout
    failed = [line for line in second.stderr.splitlines() if line.startswith("could not")]
    assert failed == ["could not load other: rank 1 of 2: other.rank1-of-2.safetensors: no "
                      "such file: this rank's part of the cache is missing (each rank keeps "
                      "its part beside other.safetensors on its own machine; was it saved by 2 "
                      f"ranks under the {kind} plan?)"]
    assert second.stderr.count("loaded 2 messages") == 1


@pytest.mark.parametrize("record", ["not json", "[0, 2]", '{"plan": "tensor"}',
                                    '{"plan": "tensor", "world_size": "2", "rank": 0, '
                                    '"save_id": "x"}'])
def test_a_damaged_shard_record_is_refused(model, tmp_path, record):
    """A cache file whose shard record is not m3mlx's: one line saying so, in one process."""
    single = load_model(str(model))
    cache = make_cache(single)
    mx.eval(single(mx.array([[1, 2, 3]]), cache=cache))
    path = tmp_path / "doc.safetensors"
    save_prompt_cache(str(path), cache, model=single)
    arrays, meta = mx.load(str(path), return_metadata=True)
    mx.save_safetensors(str(path), arrays, metadata={**meta, "m3mlx_shard": record})
    with pytest.raises(InputError, match="its shard record is damaged or not m3mlx's"):
        load_prompt_cache(str(path), model=single)
