"""Every careless or hostile checkpoint input named in issue 14 (config.json, the index, shard
headers, the tokenizer files) ends the same way in `m3mlx info`, `m3mlx generate` and
`m3mlx convert --dry-run`: exactly one line saying what is wrong, where, and what to do; exit
status 1; no traceback; nothing written. These inputs once crashed deep inside or were accepted.
"""

import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from m3mlx.checkpoint import DTYPE_SIZE
from m3mlx.cli.main import cli

NORM = "language_model.model.norm.weight"
COMMANDS = ("info", "generate", "convert")
AGREE = "config.json and the weights disagree: use the config.json that came with these weights"


def run(command: str, model: Path, tmp_path: Path):
    args = {"info": ["info", str(model)],
            "generate": ["generate", "--model", str(model), "-p", "hello", "-m", "2",
                         "--dtype", "float32"],
            "convert": ["convert", str(model), str(tmp_path / "out"), "--dry-run"]}[command]
    return CliRunner().invoke(cli, args)


def assert_one_line_error(result, message: str):
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # not a crash
    assert result.output == f"Error: {message}\n"


# --- edits of a copy of the demo checkpoint -------------------------------------------------


def text_config(**fields):
    def edit(d: Path):
        config = json.loads((d / "config.json").read_text())
        for key, value in fields.items():
            node = config["text_config"]
            *parents, leaf = key.split(".")
            for p in parents:
                node = node[p]
            node[leaf] = value
        (d / "config.json").write_text(json.dumps(config))
    return edit


def top_config(**fields):
    def edit(d: Path):
        config = json.loads((d / "config.json").read_text())
        config.update(fields)
        (d / "config.json").write_text(json.dumps(config))
    return edit


def layers(n: int):
    """num_hidden_layers=n with per-layer lists of n entries: only the weights disagree."""
    flags = [0] + [1] * (n - 1)
    return text_config(num_hidden_layers=n, moe_layer_freq=flags,
                       **{"sparse_attention_config.sparse_attention_freq": flags,
                          "sparse_attention_config.sparse_disable_index_value": flags})


def file_bytes(name: str, data: bytes):
    return lambda d: (d / name).write_bytes(data)


def not_a_file(name: str, kind: str):
    """`name` replaced by a FIFO (opening it would block) or a link to /dev/zero (endless)."""
    def edit(d: Path):
        (d / name).unlink()
        if kind == "fifo":
            os.mkfifo(d / name)
        else:
            (d / name).symlink_to("/dev/zero")
    return edit


def shard_of(d: Path, tensor: str) -> Path:
    index = json.loads((d / "model.safetensors.index.json").read_text())
    return d / index["weight_map"][tensor]


def read_raw_header(f: Path):
    data = f.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def write_raw_header(f: Path, header, rest: bytes):
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    f.write_bytes(struct.pack("<Q", len(text)) + text + rest)


def header(edit):
    """Rewrite the header of the shard holding the final norm; edit(header) may return a
    replacement header."""
    def apply(d: Path):
        f = shard_of(d, NORM)
        h, rest = read_raw_header(f)
        new = edit(h)
        write_raw_header(f, h if new is None else new, rest)
    return apply


def shifted_neighbour(h):
    """The tensor stored after the norm is moved 4 bytes back, into the norm's bytes."""
    spans = sorted((v["data_offsets"], k) for k, v in h.items() if k != "__metadata__")
    (_, first), ((begin, end), second) = next(
        (a, b) for a, b in zip(spans, spans[1:]) if a[1] == NORM)
    h[second]["data_offsets"] = [begin - 4, end - 4]


def cases():
    """(id, edit, expected message of every command (with {d}: the model directory, {f}: the
    shard holding the final norm, {span}: the norm's data offsets), commands that fail)."""
    c = "{d}/config.json: "
    cfg = "{d}/config.json says "
    yield "config.json is a list", file_bytes("config.json", b"[1, 2]"), \
        "{d}/config.json holds a JSON list, not an object; download it again", COMMANDS
    yield "config.json is not UTF-8", file_bytes("config.json", b'{"a": "\xff"}'), \
        "{d}/config.json is not UTF-8 text (byte 7); download it again", COMMANDS
    yield "config.json is not JSON", file_bytes("config.json", b'{"text_config": {'), \
        ("{d}/config.json is not valid JSON (Expecting property name enclosed in double quotes: "
         "line 1 column 18 (char 17)); download it again"), COMMANDS
    yield "config.json nested too deeply", \
        file_bytes("config.json", b"[" * 100_000 + b"]" * 100_000), \
        "{d}/config.json is not valid JSON (the JSON nests too deeply to be read); download it " \
        "again", COMMANDS
    yield "zero heads", text_config(num_attention_heads=0), \
        c + "num_attention_heads is 0; it must be an integer from 1 to 1024", COMMANDS
    yield "zero KV heads", text_config(num_key_value_heads=0), \
        c + "num_key_value_heads is 0; it must be an integer from 1 to 8", COMMANDS
    yield "negative size", text_config(hidden_size=-64), \
        c + "hidden_size is -64; it must be an integer from 1 to 262144", COMMANDS
    yield "string size", text_config(intermediate_size="32"), \
        c + "intermediate_size is '32'; it must be an integer from 1 to 262144", COMMANDS
    yield "fractional size", text_config(dense_intermediate_size=95.5), \
        c + "dense_intermediate_size is 95.5; it must be an integer from 1 to 262144", COMMANDS
    yield "head_dim not matching", text_config(head_dim=32, rotary_dim=8), \
        (cfg + "head_dim=32, but the weights' language_model.model.layers.0.self_attn.q_norm."
         f"weight has shape [16]; {AGREE}"), COMMANDS
    yield "layer_types of the wrong type", text_config(layer_types="full_attention"), \
        (c + "layer_types is 'full_attention'; it must list one of 'full_attention', "
         "'minimax_m3_sparse' per layer"), COMMANDS
    yield "rope_scaling a string", text_config(rope_scaling="yarn"), \
        c + "rope_scaling is 'yarn'; it must be a JSON object or null", COMMANDS
    yield "vocabulary of 10^12", text_config(vocab_size=10**12), \
        c + "vocab_size is 1000000000000; it must be an integer from 1 to 4194304", COMMANDS
    yield "top-k 0", text_config(**{"sparse_attention_config.sparse_topk_blocks": 0}), \
        c + "sparse_topk_blocks is 0; it must be an integer from 1 to 65536", COMMANDS
    yield "block size negative", \
        text_config(**{"sparse_attention_config.sparse_block_size": -16}), \
        c + "sparse_block_size is -16; it must be an integer from 1 to 65536", COMMANDS
    yield "more experts per token than experts", text_config(num_experts_per_tok=9), \
        c + "num_experts_per_tok is 9; it must be an integer from 1 to 8", COMMANDS
    yield "zero experts per token", text_config(num_experts_per_tok=0), \
        c + "num_experts_per_tok is 0; it must be an integer from 1 to 8", COMMANDS
    yield "rope_theta 0", text_config(rope_theta=0), \
        c + "rope_theta is 0; it must be a finite number above 0", COMMANDS
    yield "rms_norm_eps -1", text_config(rms_norm_eps=-1), \
        c + "rms_norm_eps is -1; it must be a finite number above 0", COMMANDS
    yield "quantization_config a string", top_config(quantization_config="mxfp8"), \
        c + "quantization_config is 'mxfp8'; it must be a JSON object or null", COMMANDS
    yield "hf_quant_config.json not JSON", file_bytes("hf_quant_config.json", b"NVFP4"), \
        ("{d}/hf_quant_config.json is not valid JSON (Expecting value: line 1 column 1 (char 0)); "
         "download it again"), COMMANDS
    yield "hf_quant_config.json badly shaped", \
        file_bytes("hf_quant_config.json", b'{"quantization": "NVFP4"}'), \
        ('{d}/hf_quant_config.json: quantization is \'NVFP4\'; it must be a JSON object like '
         '{{"quant_algo": "NVFP4", "group_size": 16}}'), COMMANDS
    yield "100,000 layers", text_config(num_hidden_layers=100_000), \
        c + "num_hidden_layers is 100000; it must be an integer from 1 to 1024", COMMANDS
    yield "10^9 layers", text_config(num_hidden_layers=10**9), \
        c + "num_hidden_layers is 1000000000; it must be an integer from 1 to 1024", COMMANDS
    yield "more layers than the weights", layers(6), \
        cfg + f"num_hidden_layers=6, but the weights hold 4 layers (0-3); {AGREE}", COMMANDS
    yield "more experts than the weights", text_config(num_local_experts=16), \
        cfg + f"num_local_experts=16, but the weights hold 8 experts per MoE layer; {AGREE}", \
        COMMANDS
    yield "header is a list", header(lambda h: [h]), \
        ("{f} has a bad safetensors header (the header is a JSON list, not an object); the file "
         "is corrupt: download it again"), COMMANDS
    yield "header entry lacks offsets", header(lambda h: h[NORM].pop("data_offsets") and None), \
        ('{f}: the header entry for ' + NORM + ' is malformed ({{"dtype": "F32", "shape": '
         '[64]}}); the file is corrupt: download it again'), COMMANDS
    yield "unknown dtype", header(lambda h: h[NORM].update(dtype="C64")), \
        (f"{{f}}: {NORM} has dtype C64, which is not a dtype m3mlx reads (known: "
         f"{', '.join(DTYPE_SIZE)})"), COMMANDS
    yield "shape disagrees with offsets", header(lambda h: h[NORM].update(shape=[8, 4])), \
        (f"{{f}}: {NORM} (F32 [8, 4]) spans bytes {{span}} of the data, not the 128 its shape "
         "needs; the file is corrupt: download it again"), COMMANDS
    yield "overlapping offsets", header(shifted_neighbour), \
        "{f}: the bytes of {second} overlap those of " + NORM + \
        "; the file is corrupt or hostile: download it again", COMMANDS
    yield "index not JSON", file_bytes("model.safetensors.index.json", b"{nope"), \
        ("{d}/model.safetensors.index.json is not valid JSON (Expecting property name enclosed "
         "in double quotes: line 1 column 2 (char 1)); download it again"), COMMANDS
    yield "index lacks weight_map", \
        file_bytes("model.safetensors.index.json", b'{"metadata": {}}'), \
        ("{d}/model.safetensors.index.json has no weight_map object (tensor name -> shard file); "
         "download it again"), COMMANDS
    yield "index maps to non-strings", \
        file_bytes("model.safetensors.index.json", b'{"weight_map": {"a": 1}}'), \
        ("{d}/model.safetensors.index.json maps 'a' to '1', not the name of a shard in the model "
         "directory; download it again"), COMMANDS
    not_file = "cannot be read (it is not a regular file but a FIFO, a device or a directory; " \
        "put the real file there)"
    yield "index is a FIFO", not_a_file("model.safetensors.index.json", "fifo"), \
        "{d}/model.safetensors.index.json " + not_file, COMMANDS
    # `info` describes the weights and never reads the tokenizer; the others refuse it.
    yield "tokenizer.json not a tokenizer", file_bytes("tokenizer.json", b'{"version": "1.0"}'), \
        ("{d}/tokenizer.json is not a tokenizer the `tokenizers` library can read (Model "
         "missing. at line 1 column 18); copy it from the original checkpoint"), \
        ("generate", "convert")
    yield "tokenizer.json not UTF-8", file_bytes("tokenizer.json", b"\xff\xfe{}"), \
        ("{d}/tokenizer.json is not a tokenizer the `tokenizers` library can read (stream did "
         "not contain valid UTF-8); copy it from the original checkpoint"), ("generate", "convert")
    yield "tokenizer_config.json a list", file_bytes("tokenizer_config.json", b"[]"), \
        "{d}/tokenizer_config.json holds a JSON list, not an object; download it again", \
        ("generate", "convert")
    yield "tokenizer_config.json links to /dev/zero", not_a_file("tokenizer_config.json", "dev"), \
        "{d}/tokenizer_config.json " + not_file, ("generate", "convert")
    # `convert` copies the template only when it is a regular file inside the checkpoint.
    yield "chat_template.jinja is a FIFO", not_a_file("chat_template.jinja", "fifo"), \
        "{d}/chat_template.jinja " + not_file, ("generate",)
    yield "chat_template.jinja links to /dev/zero", not_a_file("chat_template.jinja", "dev"), \
        "{d}/chat_template.jinja " + not_file, ("generate",)


CASES = list(cases())


@pytest.mark.parametrize("name,edit,message,failing", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_in_every_command(demo_dir, tmp_path, name, edit, message,
                                                failing):
    d = Path(shutil.copytree(demo_dir, tmp_path / "model"))
    shard = shard_of(d, NORM)
    spans = {k: v["data_offsets"] for k, v in read_raw_header(shard)[0].items()
             if k != "__metadata__"}
    later = sorted(spans, key=lambda k: spans[k])
    expected = message.format(d=d, f=shard, span="[{}, {})".format(*spans[NORM]),
                              second=later[later.index(NORM) + 1])
    edit(d)
    for command in COMMANDS:
        result = run(command, d, tmp_path)
        if command in failing:
            assert_one_line_error(result, expected)
        else:
            assert result.exit_code == 0, result.output
    assert not (tmp_path / "out").exists()


def test_a_huge_layer_count_fails_at_once_without_memory(demo_dir, tmp_path):
    """1,000 layers (within the plausible bound, with per-layer lists to match): the config is
    checked against the index before any model is built."""
    d = Path(shutil.copytree(demo_dir, tmp_path / "model"))
    layers(1000)(d)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for command in COMMANDS:
        start = time.perf_counter()
        result = run(command, d, tmp_path)
        assert time.perf_counter() - start < 5
        assert_one_line_error(result, f"{d}/config.json says num_hidden_layers=1000, but the "
                                      f"weights hold 4 layers (0-3); {AGREE}")
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 200


def test_the_console_script_prints_one_line_and_no_traceback(demo_dir, tmp_path):
    d = Path(shutil.copytree(demo_dir, tmp_path / "model"))
    text_config(num_hidden_layers=10**9)(d)
    script = Path(sys.executable).parent / "m3mlx"
    r = subprocess.run([str(script), "info", str(d)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr == (f"Error: {d}/config.json: num_hidden_layers is 1000000000; it must be an "
                        "integer from 1 to 1024\n")


def test_nan_weights_are_one_warning_line_and_generation_goes_on(demo_dir, tmp_path):
    import numpy as np

    from m3mlx.checkpoint import Checkpoint

    d = Path(shutil.copytree(demo_dir, tmp_path / "model"))
    name = "language_model.model.layers.1.self_attn.q_proj.weight"
    t = Checkpoint.open(d).tensor(name)
    with open(t.file, "r+b") as f:
        f.seek(t.start)
        f.write(np.array([np.nan], np.float32).tobytes())
    script = Path(sys.executable).parent / "m3mlx"  # pytest would capture the warning itself
    r = subprocess.run([str(script), "generate", "--model", str(d), "-p", "hi", "-m", "2",
                        "--dtype", "float32"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stderr.splitlines()[0] == (
        f"warning: 1 tensor(s) of {d} hold NaN or Inf values: {name}; the checkpoint is damaged "
        "or was saved from a diverged run, and outputs will likely be NaN")
