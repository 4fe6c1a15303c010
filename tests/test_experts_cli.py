"""The expert cache from the command line: --expert-cache / --memory-limit on generate and chat,
`m3mlx plan` (its arithmetic against `m3mlx convert --dry-run`), `m3mlx calibrate-experts`."""

import json
import re

import mlx.core as mx
import pytest
from click.testing import CliRunner

from m3mlx.checkpoint import Checkpoint
from m3mlx.cli.main import cli
from m3mlx.convert import convert
from m3mlx.convert.converter import conversion_plan
from m3mlx.convert.plan import config_footprint, human
from m3mlx.convert.plan import footprint as planned_footprint
from m3mlx.demo import write_demo_checkpoint
from m3mlx.experts import USAGE_FILE
from m3mlx.plan import footprint
from m3mlx.plan import plan_budget


def run(*args, input=None):
    return CliRunner().invoke(cli, [str(a) for a in args], input=input)


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    return write_demo_checkpoint(tmp_path_factory.mktemp("orig") / "hf", dtype=mx.float32,
                                 num_local_experts=16, num_experts_per_tok=4)


@pytest.fixture(scope="module")
def converted(original, tmp_path_factory):
    out = tmp_path_factory.mktemp("conv") / "q4"
    convert(original, out, progress=False, log=lambda s: None)
    return out


def _text(output):
    return output.split("Prompt:")[0]


def test_generate_with_an_expert_cache_prints_the_same_text_and_the_cache(converted):
    base = ["generate", "--model", converted, "--prompt", "Hello world " * 6, "-m", "8",
            "--dtype", "float32"]
    plain = run(*base)
    assert plain.exit_code == 0, plain.output
    for flags in (["--expert-cache", "25%"], ["--expert-cache", "25%", "--expert-policy", "lfu",
                                              "--no-prefetch"]):
        r = run(*base, *flags)
        assert r.exit_code == 0, r.output
        assert "expert cache: 4 of 16 experts per layer (25%)" in r.output
        assert _text(r.output).split("policy")[-1].split("\n", 1)[-1] == _text(plain.output)
        assert re.search(r"Experts: [\d.]+% hits, .*/token read at .* syncs/token", r.output)


def test_memory_limit_that_holds_everything_loads_everything(converted):
    r = run("generate", "--model", converted, "--prompt", "Hi", "-m", "2", "--dtype", "float32",
            "--memory-limit", "4GB")
    assert r.exit_code == 0, r.output
    assert "expert cache" not in r.output and "Experts:" not in r.output


@pytest.mark.parametrize("flags, message", [
    (["--expert-cache", "1KB"], "smaller than one expert per layer"),
    (["--expert-cache", "0%"], "above 0%"),
    (["--expert-cache", "lots"], "not a size"),
    (["--memory-limit", "100KB"], "cannot hold what stays resident"),
    (["--expert-cache", "25%", "--memory-limit", "1GB"], "not both"),
])
def test_bad_memory_options_are_one_line(converted, flags, message):
    r = run("generate", "--model", converted, "--prompt", "Hi", "-m", "2", *flags)
    assert r.exit_code != 0 and message in r.output and "Traceback" not in r.output


def test_chat_status_line_shows_the_cache(converted):
    r = run("chat", "--model", converted, "--dtype", "float32", "-m", "4", "--temp", "0",
            "--expert-cache", "50%", input="Hello\n/stats\n")
    assert r.exit_code == 0, r.output
    assert "expert cache: 8 of 16" in r.output
    assert re.search(r"experts: [\d.]+% hits, .*/token read", r.output)  # /stats


def test_plan_matches_the_conversion_dry_run(original, converted):
    """The planner's split of an original checkpoint under a recipe is the dry run's, and the
    conversion it plans has that footprint once written."""
    plan = conversion_plan(original)
    planned = planned_footprint(plan)
    written = footprint(Checkpoint.open(converted))
    assert planned.total == written.total
    assert planned.expert == written.expert and planned.resident == written.resident
    dry = run("convert", original, converted.parent / "dry", "--dry-run")
    assert dry.exit_code == 0, dry.output
    experts_row = next(line for line in dry.output.splitlines() if line.startswith("experts "))
    assert human(planned.experts_total) in experts_row
    assert f"after {human(planned.total)}" in dry.output
    # The same sizes from the config alone (what `m3mlx plan` lists as the recipes that fit).
    from_config = config_footprint(plan.source.args, plan.recipe, plan.base)
    assert (from_config.resident, from_config.expert) == (planned.resident, planned.expert)


def test_plan_prints_the_split_and_the_macs(original, converted):
    fp = footprint(Checkpoint.open(converted))
    fixed = plan_budget(fp, 1 << 40, context=256)
    budget = fixed.resident + fixed.kv + fixed.activations + fp.experts_total // 2
    r = run("plan", converted, "--memory", f"{budget}", "--context", "256")
    assert r.exit_code == 0, r.output
    assert "expert cache" in r.output and "experts per layer" in r.output
    assert "Mac mini M4 Pro" in r.output and "tok/s" in r.output
    assert re.search(r"recipe m3 +experts (affine \d-bit g64|mxfp\d): .*`m3mlx convert SRC OUT",
                     r.output)
    # An original checkpoint is planned under a recipe, with the same numbers.
    again = run("plan", original, "--memory", f"{budget}", "--context", "256")
    assert again.exit_code == 0, again.output
    assert again.output.split("\n", 1)[1] == r.output.split("\n", 1)[1]
    bad = run("plan", converted, "--memory", "1KB")
    assert bad.exit_code == 1 and "cannot hold what stays resident" in bad.output


def test_calibrate_experts_then_pinned_policy(converted, tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(converted, model)
    r = run("calibrate-experts", model, "--tokens", "200", "--dtype", "float32")
    assert r.exit_code == 0, r.output
    doc = json.loads((model / USAGE_FILE).read_text())
    assert doc["tokens"] == 200 and len(doc["layers"]) == 3
    assert all(sum(c) == 200 * 4 for c in doc["layers"].values())  # top-4 of every token
    g = run("generate", "--model", model, "--prompt", "Hello", "-m", "4", "--dtype", "float32",
            "--expert-cache", "50%", "--expert-policy", "pinned")
    assert g.exit_code == 0 and "policy pinned" in g.output, g.output
    p = run("plan", model, "--memory", "1GB")
    assert p.exit_code == 0, p.output
    missing = run("generate", "--model", converted, "--prompt", "Hello", "-m", "2",
                  "--expert-cache", "50%", "--expert-policy", "pinned")
    assert missing.exit_code == 1 and "calibrate-experts" in missing.output


def test_info_includes_the_memory_plan(converted):
    r = run("info", converted)
    assert r.exit_code == 0, r.output
    assert re.search(r"memory: .* besides the routed experts, .* of routed experts; in this "
                     r"machine's .*: everything fits", r.output)


def test_server_timings_carry_the_expert_cache(converted):
    """`m3mlx serve --expert-cache 25%`: beside `usage`, the `timings` of a reply carry the
    expert cache while decoding (hit rate, bytes read per token), in a body and in the stream's
    usage chunk; without a cache there are none."""
    import openai
    from server_fixtures import Server

    server = Server(["--model", str(converted), "--dtype", "float32", "--temp", "0",
                     "--no-disk-cache", "--expert-cache", "25%", "--served-model-name", "m3"])
    try:
        client = openai.OpenAI(base_url=server.url, api_key="none", max_retries=0, timeout=120)
        messages = [{"role": "user", "content": "Hello world " * 6}]
        body = client.chat.completions.create(model="m3", messages=messages, max_tokens=8)
        chunks = list(client.chat.completions.create(
            model="m3", messages=messages, max_tokens=8, stream=True,
            stream_options={"include_usage": True}))
    finally:
        server.stop()
    assert "expert cache: 4 of 16 experts per layer (25%)" in server.log()
    for timings in (body.model_extra["timings"], chunks[-1].model_extra["timings"]):
        assert timings["predicted_n"] > 1
        assert 0.0 <= timings["expert_hit_rate"] < 1.0  # a quarter of the experts: misses
        assert timings["expert_bytes_per_token"] > 0
    from m3mlx.server.engine import Outcome
    from m3mlx.server.events import Reply

    reply = Reply("m3")
    reply.finish(Outcome("stop", 10, 0, 4, 0, None, 100.0, 10.0))
    assert not any(key.startswith("expert") for key in reply.timings())
