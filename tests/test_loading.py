"""Every supported layout loads; every broken one fails with a message that says what to do."""

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import m3mlx
from m3mlx.config import ConfigError, ModelArgs
from m3mlx.demo import write_demo_checkpoint


def logits(model, n=100):
    ids = mx.array(np.random.default_rng(0).integers(0, model.args.vocab_size, (1, n)))
    return np.array(model(ids))


@pytest.fixture(scope="module")
def mlx_lm_4bit(tmp_path_factory, demo_dir_module):
    mlx_lm = pytest.importorskip("mlx_lm")
    out = tmp_path_factory.mktemp("lm") / "q4"
    mlx_lm.convert(str(demo_dir_module), str(out), quantize=True, q_group_size=32, q_bits=4)
    return out


@pytest.fixture(scope="module")
def demo_dir_module(tmp_path_factory):
    return write_demo_checkpoint(tmp_path_factory.mktemp("hf"), dtype=mx.float32)


def test_original_layout_skips_vision_and_stacks_experts(demo_dir_module):
    model = m3mlx.load_model(demo_dir_module, dtype=mx.float32)
    moe = model.layers[1].block_sparse_moe
    assert moe.switch_mlp.gate_proj.weight.shape == (8, 32, 64)
    assert moe.gate.weight.dtype == mx.float32 and not model.has_mtp


def test_bf16_original_loads_in_bf16_with_fp32_router(tmp_path):
    path = write_demo_checkpoint(tmp_path)  # bf16 on disk, like the release
    model = m3mlx.load_model(path)
    assert model.layers[1].self_attn.q_proj.weight.dtype == mx.bfloat16
    assert model.layers[1].block_sparse_moe.gate.weight.dtype == mx.float32
    assert model.layers[1].block_sparse_moe.e_score_correction_bias.dtype == mx.float32


def test_transformers_native_config_loads_the_same_model(tmp_path, demo_dir_module):
    path = write_demo_checkpoint(tmp_path, dtype=mx.float32, config_style="hf")
    a = m3mlx.load_model(path, dtype=mx.float32)
    b = m3mlx.load_model(demo_dir_module, dtype=mx.float32)
    assert a.args == b.args
    np.testing.assert_array_equal(logits(a), logits(b))


def test_mtp_tensors_load_into_the_mtp_module(tmp_path):
    path = write_demo_checkpoint(tmp_path, dtype=mx.float32, with_mtp=True)
    model = m3mlx.load_model(path, dtype=mx.float32)
    assert model.has_mtp
    mtp = model.language_model.model.mtp.layers[0]
    assert mtp.eh_proj.weight.shape == (64, 128) and mtp.transformer_layer.self_attn.sparse


def test_mlx_lm_layouts_load(tmp_path, demo_dir_module, mlx_lm_4bit):
    mlx_lm = pytest.importorskip("mlx_lm")
    full = tmp_path / "full"
    mlx_lm.convert(str(demo_dir_module), str(full))
    reference = logits(m3mlx.load_model(demo_dir_module, dtype=mx.float32))
    np.testing.assert_allclose(logits(m3mlx.load_model(full, dtype=mx.float32)), reference,
                               atol=1e-4)
    q4 = m3mlx.load_model(mlx_lm_4bit, dtype=mx.float32)
    assert q4.layers[1].block_sparse_moe.switch_mlp.gate_proj.bits == 4
    assert q4.layers[1].block_sparse_moe.gate.bits == 8  # mlx-lm's per-layer override
    assert np.isfinite(logits(q4)).all()


def test_load_returns_a_tokenizer_with_m3_special_tokens(demo_dir_module):
    _, tokenizer = m3mlx.load(demo_dir_module)
    ids = tokenizer.encode("]~b]user\nhi[e~[")
    assert ids[0] == tokenizer.token_to_id("]~b]") and ids[-1] == tokenizer.token_to_id("[e~[")
    assert tokenizer.token_to_id("[e~[") in tokenizer.eos_token_ids
    assert tokenizer.decode(ids) == "]~b]user\nhi[e~["


def test_hub_repo_ids_download_only_what_loading_needs(monkeypatch, demo_dir_module):
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, allow_patterns=None, **_):
        calls.append((repo_id, allow_patterns))
        return str(demo_dir_module)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    model, _ = m3mlx.load("MiniMaxAI/MiniMax-M3-tiny", dtype=mx.float32)
    assert calls[0][0] == "MiniMaxAI/MiniMax-M3-tiny"
    assert "*.safetensors" in calls[0][1] and not any("*" == p for p in calls[0][1])


# --- errors -------------------------------------------------------------------------------

@pytest.fixture
def broken(tmp_path, demo_dir_module):
    path = tmp_path / "model"
    shutil.copytree(demo_dir_module, path)
    return path


def test_truncated_shard(broken):
    shard = sorted(broken.glob("model-*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    with pytest.raises(m3mlx.LoadError, match="truncated.*download it again"):
        m3mlx.load_model(broken)


def test_corrupt_header(broken):
    shard = sorted(broken.glob("model-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[8:12] = b"\xff\xfe{{"
    shard.write_bytes(bytes(data))
    with pytest.raises(m3mlx.LoadError, match="corrupt"):
        m3mlx.load_model(broken)


def test_missing_shard(broken):
    sorted(broken.glob("model-*.safetensors"))[1].unlink()
    with pytest.raises(m3mlx.LoadError, match="missing shard.*00002-of-00002"):
        m3mlx.load_model(broken)


def edit_config(path, edit):
    config = json.loads((path / "config.json").read_text())
    edit(config)
    (path / "config.json").write_text(json.dumps(config))


def test_wrong_model_type(broken):
    edit_config(broken, lambda c: c.update(model_type="llama"))
    with pytest.raises(ConfigError, match="model_type is 'llama'"):
        m3mlx.load_model(broken)


@pytest.mark.parametrize("edit,field", [
    (lambda t: t["sparse_attention_config"].update(sparse_score_type="mean"), "sparse_score_type"),
    (lambda t: t.update(rope_scaling={"rope_type": "yarn", "factor": 4}), "yarn"),
    (lambda t: t["sparse_attention_config"].update(sparse_num_index_heads=1),
     "sparse_num_index_heads"),
    (lambda t: t.update(attention_output_gate=True), "attention_output_gate"),
    (lambda t: t.update(scoring_func="softmax"), "scoring_func"),
])
def test_unsupported_config_names_the_field(broken, edit, field):
    edit_config(broken, lambda c: edit(c["text_config"]))
    with pytest.raises(ConfigError, match=field):
        m3mlx.load_model(broken)


def test_config_and_weights_that_disagree(broken):
    edit_config(broken, lambda c: c["text_config"].update(hidden_size=32))
    with pytest.raises(m3mlx.LoadError, match="shape"):
        m3mlx.load_model(broken)


def test_no_config_and_no_directory(tmp_path):
    with pytest.raises(m3mlx.LoadError, match="no config.json"):
        m3mlx.load_model(tmp_path)
    with pytest.raises(m3mlx.LoadError, match="no such directory"):
        m3mlx.load(str(tmp_path / "nowhere"))


def test_config_parser_reads_the_released_layer_map():
    args = ModelArgs.from_config({"model_type": "minimax_m3_vl", "text_config": {
        "moe_layer_freq": [0, 0, 0] + [1] * 57,
        "sparse_attention_config": {"sparse_attention_freq": [0, 0, 0] + [1] * 57,
                                    "sparse_disable_index_value": [0, 0, 0] + [1] * 57,
                                    "sparse_num_index_heads": 4, "sparse_index_dim": 128,
                                    "sparse_block_size": 128, "sparse_topk_blocks": 16},
        "partial_rotary_factor": 0.5}})
    assert args.sparse_layers == [False] * 3 + [True] * 57 and args.rotary_dim == 64
    assert args.moe_layers == args.sparse_layers and args.index_topk_blocks == 16
