"""Routed experts streamed from the SSD on a sharded model: 2 local processes on the ring backend
(mlx.launch), each rank streaming only its own experts through its own cache (m3mlx.experts
with a sharding plan; m3mlx.rank_loading).

Every path here is the MLX-ops path on this CPU (on a Mac the streamed layers run the same
slot-table op, Metal kernels for a few tokens over quantized experts).
"""

import json
import math
import subprocess
from pathlib import Path

import pytest
from distributed_launch import BIN, HERE, TIMEOUT, checkpoints, launch  # noqa: F401

from m3mlx.checkpoint import Checkpoint
from m3mlx.experts import USAGE_FILE, routed_experts, write_usage
from m3mlx.plan import footprint, plan_budget
from m3mlx.sharding import Plan as ShardPlan


def run_ranks(model: Path, kind: str, cache: str, policy: str, tmp_path: Path):
    out = tmp_path / "rank"
    run = launch(2, str(HERE / "distributed_experts_worker.py"), str(model), kind, cache, policy,
                 str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    return [json.loads(Path(f"{out}.{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("kind, model, share", [
    ("tensor", "f32", 0.25), ("pipeline", "q4", 0.25), ("tensor", "f32", 0.5)])
def test_each_rank_streams_its_share_through_a_cache_of_its_experts(checkpoints, tmp_path,
                                                                     kind, model, share):
    """--expert-cache 25% (50%) on 2 ranks: each rank's pools hold that share of the experts
    it computes (tensor: E/2 of every layer; pipeline: all E of its own layers), it reads from
    disk what it lacks (misses), and its logits stay within 1e-5 of the resident
    single-process model through a chunked prefill (layers in passes) and greedy decode. What
    the rank holds, measured over its model's arrays, is its plan's share of the other weights
    plus the pools and nothing else: the stacked experts are never resident. With room to
    spare (50%), each rank reads ahead the next layer's likely experts among its own."""
    ranks = run_ranks(checkpoints / model, kind, f"{share:.0%}", "lru", tmp_path)
    E = Checkpoint.open(checkpoints / model).args.num_local_experts
    seen = []
    for r, rank in enumerate(ranks):
        assert rank["max_abs_diff"] <= 1e-5, (r, rank["max_abs_diff"])
        assert rank["layers"], f"rank {r} streams no layer"
        for layer in rank["layers"]:
            held = E // 2 if kind == "tensor" else E
            assert layer["held"] == held
            assert layer["first"] == (r * held if kind == "tensor" else 0)
            assert layer["slots"] == math.ceil(held * share)
            assert layer["pool_bytes"] == layer["slots"] * layer["expert_bytes"]
            seen.append((layer["module"], layer["first"]))
        assert rank["resident_bytes"] == rank["planned_other_bytes"] + rank["tier_bytes"]
        assert rank["tier_bytes"] == sum(l["pool_bytes"] for l in rank["layers"])
        stats = rank["stats"]
        assert stats["hits"] < stats["requests"] and stats["bytes_read"] > 0, stats
        if share == 0.5:
            assert stats["prefetched"] > 0, stats
    # Between them the ranks stream every expert of every MoE layer, each once.
    layers = {l.module for l in routed_experts(Checkpoint.open(checkpoints / model))
              if ".mtp." not in l.module}
    assert len(seen) == len(set(seen))
    assert {m for m, _ in seen} == layers


def test_a_size_is_per_rank_and_pins_are_the_ranks_own_most_used(checkpoints, tmp_path):
    """--expert-cache SIZE is each rank's own memory for experts (each Mac its own), and
    --expert-policy pinned reads the model's usage counts for the experts the rank computes:
    it pins its own most used, not the model's (which another rank may hold)."""
    model = checkpoints / "f32"
    ckpt = Checkpoint.open(model)
    layouts = [l for l in routed_experts(ckpt) if ".mtp." not in l.module]
    E = ckpt.args.num_local_experts
    # Counts that rank experts in a different order in each half of every layer.
    usage = {l.module: [(7 * e + 3 * i) % E + 1 for e in range(E)]
             for i, l in enumerate(layouts)}
    write_usage(model, usage, tokens=100)
    try:
        one = layouts[0].expert_bytes * len(layouts)  # one expert of every layer
        size = 3 * one + one // 2  # 3 experts a layer on each rank, not a whole 4th
        ranks = run_ranks(model, "tensor", str(size), "pinned", tmp_path)
    finally:
        (model / USAGE_FILE).unlink()
    for r, rank in enumerate(ranks):
        assert rank["max_abs_diff"] <= 1e-5
        assert rank["tier_bytes"] <= size
        for layer in rank["layers"]:
            assert layer["slots"] == 3
            first, held = layer["first"], layer["held"]
            counts = usage[layer["module"]][first:first + held]
            top = sorted(range(held), key=lambda e: -counts[e])[:1]  # half of 3 slots: 1 pin
            assert layer["pinned"] == [first + e for e in top]


PROMPT = ("Several Macs as one, streaming: each rank reads from its SSD only the experts it "
          "computes, when the router picks them. " * 3)


def m3mlx_generate(model: Path, *options: str):
    return ["generate", "--model", str(model), "--prompt", PROMPT, "--temp", "0",
            "--max-tokens", "20", "--prefill-step-size", "32", *options]


@pytest.fixture(scope="module")
def single_text(checkpoints) -> str:
    """What one process holding the whole model resident prints."""
    single = subprocess.run([str(BIN / "m3mlx"), *m3mlx_generate(checkpoints / "f32")],
                            capture_output=True, text=True, timeout=TIMEOUT)
    assert single.returncode == 0, single.stderr
    assert len(single.stdout) > 20
    return single.stdout


@pytest.mark.parametrize("kind", ["tensor", "pipeline"])
def test_generate_streaming_on_two_ranks_prints_the_single_process_text(checkpoints, single_text,
                                                                         kind):
    """`mlx.launch -n 2 ... -- m3mlx generate --expert-cache 25%`: rank 0 prints exactly the
    text of one process holding the whole model resident (a chunked prefill past MSA's dense
    window, then greedy decode); every rank says what its cache holds, and the statistics line
    (rank 0's, saying so) shows the cache missing."""
    run = launch(2, "m3mlx", *m3mlx_generate(checkpoints / "f32", "--parallel", kind,
                                             "--expert-cache", "25%"), python=False)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout == single_text
    for r in range(2):
        assert f"rank {r} of 2: expert cache: " in run.stderr
    stats = [line for line in run.stderr.splitlines() if "Generation: 20 tokens" in line]
    assert len(stats) == 1 and "(rank 0 of 2's experts)" in stats[0], run.stderr[-2000:]
    hits = float(stats[0].split("Experts: ")[1].split("%")[0])
    assert hits < 100.0


def test_memory_limit_is_each_ranks_own(checkpoints, single_text):
    """--memory-limit SIZE on 2 ranks plans each rank's part in SIZE (each Mac its own memory:
    its share of the weights, the K/V of its heads, activations, then its experts): a limit
    that leaves a rank room for 2.5 of its experts per layer streams 2 of its 4."""
    model = checkpoints / "f32"
    ckpt = Checkpoint.open(model)
    fps = [footprint(ckpt, plan=ShardPlan.tensor(ckpt.args, r, 2)) for r in range(2)]
    whole = plan_budget(fps[0], 1 << 40)  # what stays resident, whatever the limit
    one = fps[0].expert * fps[0].moe_layers  # one expert of each layer
    limit = fps[0].resident + whole.kv + whole.activations + 2 * one + one // 2
    slots = [plan_budget(fp, limit).slots for fp in fps]
    assert slots[0] == 2 and all(fp.experts == 4 for fp in fps)
    run = launch(2, "m3mlx", *m3mlx_generate(model, "--parallel", "tensor", "--memory-limit",
                                             str(limit)), python=False)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout == single_text
    for r in range(2):
        assert f"rank {r} of 2: expert cache: {slots[r]} of 4 experts per layer" in run.stderr


def test_a_ranks_footprint_is_its_part(checkpoints):
    """What the planner prices for one rank (`footprint(ckpt, plan=...)`): its plan's share of
    the weights besides the routed experts (as `held_bytes` reads them), E/N experts of every
    layer (tensor) or all E of its own layers (pipeline), and the K/V of its heads or layers."""
    from m3mlx.rank_loading import held_bytes, make_plan, text_tensors
    from m3mlx.experts import is_routed_expert

    ckpt = Checkpoint.open(checkpoints / "q4")
    args = ckpt.args
    single = footprint(ckpt)
    others = {n: t for n, t in text_tensors(ckpt).items() if not is_routed_expert(n)}
    kv = plan_budget(single, 1 << 40).context_cost
    moe = 0
    for r in range(2):
        for kind in ("tensor", "pipeline"):
            plan = make_plan(kind, ckpt, r, 2)
            fp = footprint(ckpt, plan=plan)
            assert fp.resident == held_bytes(plan, others)[0]
            assert fp.expert == single.expert
            cost = plan_budget(fp, 1 << 40).context_cost
            if kind == "tensor":
                assert (fp.experts, fp.moe_layers) == (args.num_local_experts // 2,
                                                       single.moe_layers)
                assert cost.dense_kv + cost.msa_kv == (kv.dense_kv + kv.msa_kv) // 2
                assert cost.index_keys == kv.index_keys  # one index head, on every rank
            else:
                start, stop = plan.layers
                assert fp.experts == args.num_local_experts
                assert fp.moe_layers == sum(args.moe_layers[start:stop])
                moe += fp.moe_layers
    assert moe == single.moe_layers


def test_busiest_rank_experts_is_the_exact_expectation():
    """A layer on expert-parallel ranks waits for the rank with most of the token's experts:
    2 of 8 experts over 2 ranks land on one rank with probability 2 C(4,2) / C(8,2) = 12/28."""
    import numpy as np

    from m3mlx.plan import busiest_rank_experts

    assert busiest_rank_experts(8, 2, 2) == pytest.approx((2 * 12 + 1 * 16) / 28)
    assert busiest_rank_experts(128, 4, 1) == 4
    picks = np.argsort(np.random.default_rng(0).random((20000, 128)), axis=1)[:, :4] // 32
    sampled = np.mean([np.bincount(p, minlength=4).max() for p in picks])
    assert busiest_rank_experts(128, 4, 4) == pytest.approx(sampled, abs=0.02)


@pytest.mark.parametrize("model", ["q4", "src"])
def test_plan_with_ranks_prices_the_largest_ranks_part(checkpoints, model):
    """`m3mlx plan PATH --memory SIZE --ranks 2`, for a converted model and for an original
    checkpoint planned with a recipe: the plan is of the largest rank's part in SIZE (each Mac
    its own), its expert cache as --memory-limit SIZE would give each rank, and the speeds are
    of that rank's own work (its busiest share of each token's experts)."""
    from click.testing import CliRunner

    from m3mlx.cli.main import cli

    path = checkpoints / model
    q4 = Checkpoint.open(checkpoints / "q4")
    fp = footprint(q4, plan=ShardPlan.tensor(q4.args, 0, 2))
    whole = plan_budget(fp, 1 << 40)
    one = fp.expert * fp.moe_layers
    limit = fp.resident + whole.kv + whole.activations + 2 * one + one // 2
    out = CliRunner().invoke(cli, ["plan", str(path), "--memory", str(limit), "--ranks", "2"])
    assert out.exit_code == 0, out.output
    assert "(tensor parallel, rank " in out.output and "of 2)" in out.output
    assert "on every rank under mlx.launch" in out.output
    assert f"routed experts {fp.moe_layers} layers x 4 x" in out.output  # E/2 of every layer
    if model == "q4":
        assert f"({plan_budget(fp, limit).slots} of 4 experts per layer" in out.output
    else:
        assert "(planned) (tensor parallel, rank 0 of 2)" in out.output
    pipe = CliRunner().invoke(cli, ["plan", str(path), "--memory", str(limit), "--ranks", "2",
                                    "--parallel", "pipeline"])
    assert pipe.exit_code == 0 and "(pipeline, rank " in pipe.output
    bad = CliRunner().invoke(cli, ["plan", str(path), "--memory", str(limit), "--ranks", "3"])
    assert bad.exit_code != 0 and "Traceback" not in bad.output
    assert "4 KV heads, which 3 ranks cannot share evenly" in bad.output
