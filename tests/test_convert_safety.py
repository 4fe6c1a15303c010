"""The converter against careless and hostile situations: resuming with another source, links
planted in OUTPUT_DIR or in the source, a disk that fills up, locations that cannot be written.
Each test asserts what the user sees and what is left on disk."""

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from convert_fixtures import bf16_checkpoint
from m3mlx.cli.main import cli
from m3mlx.convert import ConvertError, convert, identity, writer
from m3mlx.convert import converter as converter_module

QUIET = dict(progress=False, log=lambda s: None)
SHARD = 60_000  # several output files to interrupt between


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Model A, and model B: the same layout (names, shapes, dtypes), other weights."""
    root = tmp_path_factory.mktemp("sources")
    return bf16_checkpoint(root / "a", seed=0), bf16_checkpoint(root / "b", seed=1)


@pytest.fixture(scope="module")
def reference(sources, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "out"
    convert(sources[0], out, max_shard_size=SHARD, **QUIET)
    return out


def interrupted(src, out, after: int = 2):
    """A conversion of src stopped (Ctrl-C) after `after` finished files."""
    seen = []

    def stop(name):
        seen.append(name)
        if len(seen) == after:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert(src, out, max_shard_size=SHARD, after_shard=stop, **QUIET)
    return seen


def snapshot(directory: Path):
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(directory.iterdir())}


def same_files(a: Path, b: Path):
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), n


def run_cli(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.output


def error_line(text: str) -> str:
    """The one error line a failed command printed last (after the plan, if any)."""
    assert "Traceback" not in text
    errors = [line for line in text.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and text.strip().splitlines()[-1] == errors[0], text
    return errors[0]


# ----------------------------------------------------------------------------------------------
# Severe 1: --resume with another source of the same layout


def test_resume_refuses_another_source_with_the_same_layout(sources, reference, tmp_path):
    a, b = sources
    out = tmp_path / "out"
    interrupted(a, out)
    before = snapshot(out)
    with pytest.raises(ConvertError) as info:
        convert(b, out, max_shard_size=SHARD, resume=True, **QUIET)
    msg = str(info.value)
    assert msg.startswith(f"{out} was converted from another source: model-00001-of-00002."
                          "safetensors has other contents")
    assert "--force" in msg
    assert snapshot(out) == before  # nothing written, nothing deleted

    # on the command line: one line, exit status 1, no traceback
    code, text = run_cli("convert", b, out, "--max-shard-size", SHARD, "--resume", "--quiet")
    assert code == 1 and "was converted from another source" in error_line(text)

    # the same checkpoint copied elsewhere (new path, new mtimes) is the same source
    moved = Path(shutil.copytree(a, tmp_path / "moved"))
    convert(moved, out, max_shard_size=SHARD, resume=True, **QUIET)
    config, expected = (json.loads((d / "config.json").read_text()) for d in (out, reference))
    for c in (config, expected):  # where the source was, and its files' mtimes, differ
        record = c["m3mlx_conversion"].pop("source_files")
        c["m3mlx_conversion"].pop("source")
    assert config == expected
    shutil.copyfile(reference / "config.json", out / "config.json")
    same_files(out, reference)  # every other file is byte-identical
    assert {"config.json", "model-00001-of-00002.safetensors", "tokenizer.json"} <= set(record)
    assert record["config.json"]["hashed"] == "all" and record["config.json"]["size"] > 0

    # a finished conversion resumed with B is not "complete" either
    with pytest.raises(ConvertError, match="was converted from another source: "
                                           "model-00001-of-00002.safetensors has other contents"):
        convert(b, out, max_shard_size=SHARD, resume=True, **QUIET)
    lines = []
    convert(a, out, max_shard_size=SHARD, resume=True, log=lines.append, progress=False)
    assert any("already complete" in line for line in lines)


def test_a_source_that_lost_or_gained_a_file_or_changed_size(sources, tmp_path):
    a, _ = sources
    src = Path(shutil.copytree(a, tmp_path / "src"))
    out = tmp_path / "out"
    interrupted(src, out)
    (src / "generation_config.json").unlink()
    with pytest.raises(ConvertError, match="generation_config.json was in the source converted "
                                           "before but is not in this one"):
        convert(src, out, max_shard_size=SHARD, resume=True, **QUIET)
    (src / "generation_config.json").write_text("{}")
    with pytest.raises(ConvertError, match=r"generation_config.json is 2 B here but was"):
        convert(src, out, max_shard_size=SHARD, resume=True, **QUIET)


def test_old_conversions_without_a_source_record_are_not_trusted(sources, tmp_path):
    a, _ = sources
    out = tmp_path / "out"
    interrupted(a, out)
    state = json.loads((out / writer.STATE_FILE).read_text())
    del state["source_files"]
    (out / writer.STATE_FILE).write_text(json.dumps(state))
    with pytest.raises(ConvertError, match="does not record which source files it was "
                                           "converted from.*--force"):
        convert(a, out, max_shard_size=SHARD, resume=True, **QUIET)


def test_a_state_file_nested_too_deeply_is_refused_and_nothing_is_deleted(sources, tmp_path):
    a, _ = sources
    out = tmp_path / "out"
    interrupted(a, out)
    (out / writer.STATE_FILE).write_text("[" * 100_000 + "]" * 100_000)
    before = snapshot(out)
    status, output = run_cli("convert", a, out, "--resume", "--max-shard-size", SHARD)
    assert status == 1
    assert error_line(output) == (f"Error: {out} does not hold an interrupted m3mlx conversion "
                                  f"(no readable {writer.STATE_FILE}); use --force to replace its "
                                  "contents or pick another directory")
    assert snapshot(out) == before


def test_big_files_are_identified_by_header_and_samples(tmp_path, monkeypatch):
    monkeypatch.setattr(identity, "WHOLE_FILE_BYTES", 1 << 16)
    f = tmp_path / "shard.safetensors"
    header = b'{"a": {"dtype": "U8", "shape": [1048576], "data_offsets": [0, 1048576]}}'
    data = bytearray(len(header).to_bytes(8, "little") + header + os.urandom(1 << 20))
    f.write_bytes(bytes(data))
    first = identity.file_identity(f)
    assert first["hashed"] == "header and 16 samples of 64 KiB"
    sample_7 = 7 * (len(data) - identity.SAMPLE_BYTES) // (identity.SAMPLES - 1)
    for where in (12, sample_7 + 100, len(data) - 1):  # the header, a middle sample, the end
        changed = bytearray(data)
        changed[where] ^= 0xFF
        f.write_bytes(bytes(changed))
        assert identity.file_identity(f)["sha256"] != first["sha256"], where
    f.write_bytes(bytes(data))
    os.utime(f, ns=(1, 1))  # a touched file is the same file
    again = identity.file_identity(f)
    assert again["sha256"] == first["sha256"] and again["mtime_ns"] != first["mtime_ns"]
    assert identity.difference({"shard.safetensors": first}, {"shard.safetensors": again}) is None


# ----------------------------------------------------------------------------------------------
# Severe 5: links planted in OUTPUT_DIR are never written through


def test_resume_never_writes_through_links_planted_in_the_output(sources, reference, tmp_path):
    a, _ = sources
    out = tmp_path / "out"
    done = interrupted(a, out)
    victims = {}
    names = [writer.STATE_FILE + ".partial", "config.json", "config.json.partial",
             "model.safetensors.index.json.partial", "tokenizer.json.partial",
             "README.md.partial", done[0]]
    pending = sorted(f for f in json.loads(
        (reference / "model.safetensors.index.json").read_text())["weight_map"].values()
        if f not in done)
    names += [pending[0], pending[0] + ".partial"]
    for name in names:
        victim = tmp_path / f"victim-{len(victims)}"
        victim.write_text("precious")
        (out / name).unlink(missing_ok=True)
        (out / name).symlink_to(victim)
        victims[name] = victim
    convert(a, out, max_shard_size=SHARD, resume=True, **QUIET)
    for name, victim in victims.items():
        assert victim.read_text() == "precious", name  # the link's target is untouched
    assert not [p for p in out.iterdir() if p.is_symlink()]
    same_files(out, reference)  # the planted finished shard was not taken as done


def test_temporary_files_are_created_exclusively(tmp_path):
    from m3mlx.files import atomic_write, create_exclusive

    victim = tmp_path / "victim"
    victim.write_text("precious")
    link = tmp_path / "file.partial"
    link.symlink_to(victim)
    atomic_write(tmp_path / "file", "new")
    assert victim.read_text() == "precious" and (tmp_path / "file").read_text() == "new"
    assert not link.exists() and not link.is_symlink()
    fd = create_exclusive(tmp_path / "x")
    os.close(fd)
    with pytest.raises(FileExistsError):  # O_EXCL: a name that appeared meanwhile is not reused
        os.close(os.open(tmp_path / "x", os.O_WRONLY | os.O_CREAT | os.O_EXCL))


# ----------------------------------------------------------------------------------------------
# Severe 6: the disk fills up during a conversion


def test_a_disk_that_fills_up_keeps_finished_shards_and_resume_continues(
        sources, reference, tmp_path, monkeypatch):
    a, _ = sources
    out = tmp_path / "out"
    real_write, real_usage = writer.pwrite_all, shutil.disk_usage
    full = []

    def fills_up(fd, data, offset):  # the disk is full once two shards are written
        if len(list(out.glob("model-*.safetensors"))) >= 2:
            full.append(1)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data, offset)

    def usage(path):  # plenty at the start; once the disk is full, 1 MB free
        return real_usage(path)._replace(free=10**6 if full else 10**12)

    monkeypatch.setattr(writer, "pwrite_all", fills_up)
    monkeypatch.setattr(converter_module.shutil, "disk_usage", usage)
    code, text = run_cli("convert", a, out, "--max-shard-size", SHARD, "--quiet")
    text = error_line(text)
    assert code == 1 and text.startswith("Error: the disk filled up: ")
    assert "2 of 8 files are written and kept in" in text and "plus a reserve of 250.00 MB" in text
    assert "1.00 MB is free: free at least 249.3" in text  # the rest + reserve - free
    assert "then run the same command with --resume" in text
    kept = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert kept and not list(out.glob("*.partial")) and not (out / "config.json").exists()
    mtimes = {n: (out / n).stat().st_mtime_ns for n in kept}

    monkeypatch.setattr(writer, "pwrite_all", real_write)  # space was freed
    monkeypatch.setattr(converter_module.shutil, "disk_usage", real_usage)
    code, text = run_cli("convert", a, out, "--max-shard-size", SHARD, "--quiet", "--resume")
    assert code == 0, text
    assert f"resuming: {len(kept)} of" in text
    assert {n: (out / n).stat().st_mtime_ns for n in kept} == mtimes  # not rewritten
    same_files(out, reference)


# ----------------------------------------------------------------------------------------------
# Read-only and permission errors


def test_read_only_or_forbidden_output_is_refused_up_front(sources, tmp_path, monkeypatch):
    a, _ = sources
    real = os.statvfs

    class ReadOnly:
        def __init__(self, path):
            self.f_flag = real(path).f_flag | os.ST_RDONLY

    monkeypatch.setattr(os, "statvfs", ReadOnly)
    code, text = run_cli("convert", a, tmp_path / "out" / "deeper", "--quiet")
    assert code == 1 and error_line(text)
    assert f"Error: cannot write OUTPUT_DIR {tmp_path / 'out' / 'deeper'}: {tmp_path} is on a " \
           "read-only file system; write the conversion somewhere else" in text
    monkeypatch.setattr(os, "statvfs", real)
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    code, text = run_cli("convert", a, tmp_path / "out", "--quiet")
    assert code == 1 and f"permission denied on {tmp_path}" in text
    assert not (tmp_path / "out").exists()


def test_permission_error_while_writing_is_one_line_and_leaves_nothing(sources, tmp_path,
                                                                        monkeypatch):
    a, _ = sources

    def forbidden(path, flags=os.O_WRONLY):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(writer, "create_exclusive", forbidden)
    code, text = run_cli("convert", a, tmp_path / "out", "--quiet")
    text = error_line(text)
    out = tmp_path / "out"
    assert code == 1 and text.startswith(f"Error: writing the conversion failed: Permission "
                                         f"denied ({out}/model")
    assert text.endswith(f"nothing was finished, and nothing is left in {out}. Fix that, then "
                         "run the command again")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------
# Links in the source: only regular files from inside the checkpoint are copied


def test_links_in_the_source_leading_outside_are_not_copied(sources, tmp_path):
    a, _ = sources
    src = Path(shutil.copytree(a, tmp_path / "src"))
    secret = tmp_path / "secret.txt"
    secret.write_text("ssh key")
    (src / "evil.jinja").symlink_to(secret)
    (src / "chat_template.jinja").rename(src / "real_template.txt")
    (src / "chat_template.jinja").symlink_to("real_template.txt")  # inside: followed
    lines = []
    out = tmp_path / "out"
    convert(src, out, log=lines.append, progress=False)
    assert not (out / "evil.jinja").exists()
    assert f"skipped evil.jinja: it links to {secret}, outside the checkpoint" in lines
    assert (out / "chat_template.jinja").read_text() == (src / "real_template.txt").read_text()
    assert not [p for p in out.iterdir() if p.is_symlink()]
    assert all("ssh key" not in p.read_text(errors="replace") for p in out.iterdir())


@pytest.mark.parametrize("index,message", [
    ("[1, 2]", "holds a JSON list, not an object; convert again with --force"),
    ("{not json", "is not valid JSON .*; convert again with --force"),
    ('{"weight_map": {"a": "../../etc/passwd"}}',
     "not the name of a shard in the model directory; convert again with --force"),
])
def test_a_damaged_finished_output_is_not_called_complete(sources, tmp_path, index, message):
    a, _ = sources
    out = tmp_path / "out"
    convert(a, out, **QUIET)
    (out / "model.safetensors.index.json").write_text(index)
    with pytest.raises(ConvertError, match=message):
        convert(a, out, resume=True, **QUIET)
