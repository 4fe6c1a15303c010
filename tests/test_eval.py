"""`m3mlx.eval` and `m3mlx eval`: perplexity and KL divergence against a reference, live or saved,
checked against a NumPy computation from whole-window logits."""

import json
import struct

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

import m3mlx
from m3mlx import eval as ev
from m3mlx.cli.main import cli
from m3mlx import demo
from m3mlx.eval import EvalError, evaluate, format_report

CONTEXT = 96  # past the demo model's dense range (4 blocks of 16): MSA runs sparse


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval") / "text.txt"
    path.write_text((open(demo.__file__).read() + open(ev.__file__).read()) * 2)
    return path


@pytest.fixture(scope="module")
def perturbed(tmp_path_factory, demo_dir):
    """The demo model with noise on its lm_head and one layer's experts (a known perturbation)."""
    model, _ = m3mlx.load(demo_dir, dtype=mx.float32)
    rng = np.random.default_rng(1)
    lm = model.language_model
    lm.lm_head.weight = lm.lm_head.weight + mx.array(
        rng.standard_normal(lm.lm_head.weight.shape).astype(np.float32) * 0.05)
    experts = model.layers[2].block_sparse_moe.switch_mlp.down_proj
    experts.weight = experts.weight * 1.1
    mx.eval(model.parameters())
    return model


def numpy_reference(model, reference, tokenizer, text, context, samples):
    """The statistics from whole-window logits (no cache, no chunks), in NumPy float64."""
    ids = np.array(tokenizer.encode(text.read_text()), np.int64)
    stats = {k: [] for k in ("nll", "ref_nll", "kld", "same", "dp")}
    for w in range(samples):
        window = ids[w * context:(w + 1) * context]
        x = mx.array(window[None, :-1])
        lp, rlp = (np.array(m(x)[0].astype(mx.float32), np.float64) for m in (model, reference))
        lp -= np.log(np.exp(lp - lp.max(-1, keepdims=True)).sum(-1, keepdims=True)) + lp.max(-1, keepdims=True)
        rlp -= np.log(np.exp(rlp - rlp.max(-1, keepdims=True)).sum(-1, keepdims=True)) + rlp.max(-1, keepdims=True)
        t = window[1:]
        rows = np.arange(len(t))
        stats["nll"].append(-lp[rows, t])
        stats["ref_nll"].append(-rlp[rows, t])
        stats["kld"].append((np.exp(rlp) * (rlp - lp)).sum(-1))
        stats["same"].append(lp.argmax(-1) == rlp.argmax(-1))
        stats["dp"].append(np.exp(lp[rows, t]) - np.exp(rlp[rows, t]))
    return {k: np.concatenate(v) for k, v in stats.items()}


def test_a_model_against_itself_has_its_perplexity_and_zero_divergence(demo_model, text):
    model, tokenizer = demo_model
    alone = evaluate(model, tokenizer, text, context=CONTEXT, samples=4)
    self_ref = evaluate(model, tokenizer, text, context=CONTEXT, samples=4, reference=model)
    assert alone.tokens == 4 * (CONTEXT - 1) and alone.windows == 4
    assert self_ref.perplexity == alone.perplexity == self_ref.ref_perplexity
    assert np.all(self_ref.kld == 0) and np.all(self_ref.dp == 0) and self_ref.same_top.all()
    summary = self_ref.summary()
    assert summary["kld_max"] == 0 and summary["same_top"] == 1 and summary["rms_dp"] == 0


def test_a_known_perturbation_matches_numpy(demo_model, perturbed, text, monkeypatch):
    model, tokenizer = demo_model
    # Small logit chunks and prefill steps: the cached, chunked path must equal whole windows
    # (which keep MSA index keys unquantized: index_bits=16).
    monkeypatch.setattr(ev, "LOGIT_BYTES", 4 * model.args.vocab_size * 7)
    r = evaluate(perturbed, tokenizer, text, context=CONTEXT, samples=3, reference=model,
                 prefill_step=40, index_bits=16)
    ref = numpy_reference(perturbed, model, tokenizer, text, CONTEXT, 3)
    assert r.kld.mean() > 1e-3  # the perturbation is visible
    np.testing.assert_allclose(r.nll, ref["nll"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(r.ref_nll, ref["ref_nll"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(r.kld, ref["kld"], rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(r.dp, ref["dp"], atol=1e-5)
    assert (r.same_top == ref["same"]).mean() > 0.99  # argmax ties may fall either way
    s = r.summary()
    assert s["perplexity"] == pytest.approx(np.exp(ref["nll"].mean()), rel=1e-5)
    assert s["kld_p999"] == pytest.approx(np.quantile(ref["kld"], 0.999), rel=1e-3)
    assert s["kld_median"] == pytest.approx(np.median(ref["kld"]), rel=1e-3, abs=1e-6)
    assert s["rms_dp"] == pytest.approx(np.sqrt(np.mean(ref["dp"] ** 2)), rel=1e-4)
    report = format_report(r)
    for line in ("PPL(model)", "PPL(reference)", "99.9%", "median", "RMS Δp", "same top token"):
        assert line in report


def test_saved_reference_logits_give_what_the_live_reference_gives(demo_model, perturbed, text,
                                                                   tmp_path):
    model, tokenizer = demo_model
    saved = tmp_path / "ref.m3ref"
    own = evaluate(model, tokenizer, text, context=CONTEXT, samples=3,
                   save_logits=saved, top_k=model.args.vocab_size)
    assert saved.is_file() and not (tmp_path / "ref.m3ref.partial").exists()
    live = evaluate(perturbed, tokenizer, text, context=CONTEXT, samples=3, reference=model)
    from_file = evaluate(perturbed, tokenizer, text, reference=saved)  # context from the file
    assert from_file.context == CONTEXT and from_file.windows == 3
    assert from_file.ref_perplexity == pytest.approx(own.perplexity, rel=1e-6)
    np.testing.assert_allclose(from_file.nll, live.nll, rtol=1e-6)
    np.testing.assert_allclose(from_file.kld, live.kld, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(from_file.same_top, live.same_top)
    np.testing.assert_allclose(from_file.dp, live.dp, atol=1e-6)

    # Files with the top 8 and top 64 of each distribution: lower bounds that tighten with k
    # (this random model spreads its mass thin: a trained one's tail is far smaller).
    bounds = {}
    for k in (8, 64):
        small = tmp_path / f"top{k}.m3ref"
        evaluate(model, tokenizer, text, context=CONTEXT, samples=3, save_logits=small, top_k=k)
        bounds[k] = evaluate(perturbed, tokenizer, text, reference=small)
        assert np.all(bounds[k].kld <= live.kld + 1e-5)
        np.testing.assert_array_equal(bounds[k].same_top, live.same_top)
        np.testing.assert_allclose(bounds[k].dp, live.dp, atol=1e-6)
        assert f"top-{k} saved" in format_report(bounds[k])
    assert np.all(bounds[8].kld <= bounds[64].kld + 1e-6)
    assert bounds[64].kld.mean() > bounds[8].kld.mean()
    assert (tmp_path / "top8.m3ref").stat().st_size < saved.stat().st_size / 30


def test_bad_references_and_data_are_refused_clearly(demo_model, text, tmp_path):
    model, tokenizer = demo_model
    saved = tmp_path / "ref.m3ref"
    evaluate(model, tokenizer, text, context=CONTEXT, samples=2, save_logits=saved, top_k=4)
    with pytest.raises(EvalError, match="windows of 96 tokens"):
        evaluate(model, tokenizer, text, context=64, reference=saved)
    other = tmp_path / "other.txt"
    other.write_text("completely different text, " * 400)
    with pytest.raises(EvalError, match="same --data"):
        evaluate(model, tokenizer, other, reference=saved)
    truncated = tmp_path / "truncated.m3ref"
    truncated.write_bytes(saved.read_bytes()[:-10])
    with pytest.raises(EvalError, match="truncated"):
        evaluate(model, tokenizer, text, reference=truncated)
    junk = tmp_path / "junk.m3ref"
    junk.write_bytes(b"not a reference at all")
    with pytest.raises(EvalError, match="not an m3mlx reference"):
        evaluate(model, tokenizer, text, reference=junk)
    bad_header = tmp_path / "header.m3ref"
    meta = json.dumps({"version": 1, "context": 96, "top_k": 0, "vocab": 512}).encode()
    bad_header.write_bytes(ev.MAGIC + struct.pack("<I", len(meta)) + meta)
    with pytest.raises(EvalError, match="corrupt header"):
        evaluate(model, tokenizer, text, reference=bad_header)
    meta = b"[" * 100_000 + b"]" * 100_000
    bad_header.write_bytes(ev.MAGIC + struct.pack("<I", len(meta)) + meta)
    with pytest.raises(EvalError, match="corrupt header \\(the JSON nests too deeply"):
        evaluate(model, tokenizer, text, reference=bad_header)
    short = tmp_path / "short.txt"
    short.write_text("x = 1\n")
    with pytest.raises(EvalError, match="fewer than"):
        evaluate(model, tokenizer, short, context=CONTEXT)
    with pytest.raises(EvalError, match="no such file"):
        evaluate(model, tokenizer, tmp_path / "missing.txt")


def test_an_interrupted_save_leaves_no_file(demo_model, text, tmp_path):
    model, tokenizer = demo_model
    saved = tmp_path / "ref.m3ref"

    def stop(done, total, tokens):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        evaluate(model, tokenizer, text, context=CONTEXT, save_logits=saved, progress=stop)
    assert list(tmp_path.iterdir()) == []


def test_eval_command_reports_and_saves(demo_dir, text, tmp_path):
    run = CliRunner().invoke
    saved = tmp_path / "ref.m3ref"
    r = run(cli, ["eval", "--model", str(demo_dir), "--data", str(text), "--context", "64",
                  "--samples", "2", "--save-logits", str(saved), "--dtype", "float32"])
    assert r.exit_code == 0, r.output
    assert "PPL(" in r.output and "saved the logits of 2 windows" in r.output and saved.is_file()
    r = run(cli, ["eval", "--model", str(demo_dir), "--reference", str(saved), "--data",
                  str(text), "--dtype", "float32", "--json", "--quiet"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output.strip().splitlines()[-1])
    assert summary["windows"] == 2 and summary["kld_mean"] < 1e-6 and summary["same_top"] == 1
    r = run(cli, ["eval", "--model", str(demo_dir), "--reference", str(demo_dir), "--dtype",
                  "float32", "--context", "64", "--samples", "1", "--data", "-"],
            input=text.read_text())
    assert r.exit_code == 0, r.output
    assert "KL divergence" in r.output and "same top token" in r.output
    r = run(cli, ["eval", "--model", str(demo_dir), "--reference", str(text)])
    assert r.exit_code == 1 and "not an m3mlx reference" in r.output
    assert "Traceback" not in r.output


def test_index_bits_set_how_both_caches_store_index_keys(demo_dir, demo_model, text):
    """--index-bits as in generate: 8 (the default) stores MSA index keys as int8, 16 keeps
    them; past the dense range (CONTEXT) the choice reaches the logits, and the command gives
    what the API gives."""
    model, tokenizer = demo_model
    api = {bits: evaluate(model, tokenizer, text, context=CONTEXT, samples=2,
                          index_bits=bits).perplexity for bits in (8, 16)}
    assert api[8] != api[16] and api[8] == pytest.approx(api[16], rel=0.02)
    for bits in ("8", "16"):
        r = CliRunner().invoke(cli, ["eval", "--model", str(demo_dir), "--data", str(text),
                                     "--context", str(CONTEXT), "--samples", "2", "--dtype",
                                     "float32", "--index-bits", bits, "--json", "--quiet"])
        assert r.exit_code == 0, r.output
        summary = json.loads(r.output.strip().splitlines()[-1])
        assert summary["perplexity"] == pytest.approx(api[int(bits)], rel=1e-6)
