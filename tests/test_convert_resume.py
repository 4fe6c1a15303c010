"""Interrupt a conversion (Ctrl-C, or a hard kill mid-shard) and continue it with --resume: the
result is byte-identical to an uninterrupted run, and finished shards are not written again."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from convert_fixtures import QUANT_DIMS, bf16_checkpoint, to_mxfp8
from m3mlx.convert import ConvertError, convert

QUIET = dict(progress=False, log=lambda s: None)
SHARD = 60_000  # small shards: many files to interrupt between


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    return to_mxfp8(bf16_checkpoint(root / "bf16", with_mtp=True, **QUANT_DIMS), root / "mx8")


@pytest.fixture(scope="module")
def reference(src, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "out"
    convert(src, out, max_shard_size=SHARD, **QUIET)
    return out


def same_files(a: Path, b: Path):
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), n


def test_ctrl_c_then_resume(src, reference, tmp_path):
    out = tmp_path / "out"
    seen = []

    def stop_after_two(name):
        seen.append(name)
        if len(seen) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert(src, out, max_shard_size=SHARD, after_shard=stop_after_two, **QUIET)
    assert not (out / "config.json").exists()  # an unfinished directory is not loadable
    assert (out / ".m3mlx-convert.json").exists()
    kept = {n: (out / n).stat().st_mtime_ns for n in seen}
    total = len([p for p in reference.iterdir() if p.suffix == ".safetensors"])
    assert total > 4

    # without --resume the half-done directory is refused, not overwritten
    with pytest.raises(ConvertError, match="--resume"):
        convert(src, out, max_shard_size=SHARD, **QUIET)
    # with other options it is refused too
    with pytest.raises(ConvertError, match="other options"):
        convert(src, out, bits=8, max_shard_size=SHARD, resume=True, **QUIET)

    lines = []
    written = []
    convert(src, out, max_shard_size=SHARD, resume=True, log=lines.append, progress=False,
            after_shard=written.append)
    assert any("resuming: 2 of" in line for line in lines)
    assert not set(written) & set(seen) and len(written) == total - 2
    assert {n: (out / n).stat().st_mtime_ns for n in seen} == kept
    same_files(out, reference)

    # resuming a finished conversion only verifies it
    lines.clear()
    convert(src, out, max_shard_size=SHARD, resume=True, log=lines.append, progress=False)
    assert any("already complete" in line for line in lines)


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from m3mlx.convert import convert, writer
    real, units = writer.write_unit, []

    def write_unit(shard, unit, *args):
        units.append(unit.path)
        if len(units) == int(sys.argv[3]):
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup code runs: a power cut
        real(shard, unit, *args)

    writer.write_unit = write_unit
    convert(sys.argv[1], sys.argv[2], max_shard_size=int(sys.argv[4]), progress=False)
""")


def test_hard_kill_mid_shard_then_resume(src, reference, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(src), str(out), "30",
                           str(SHARD)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    partial = list(out.glob("*.partial"))
    done = [p for p in out.glob("*.safetensors")]
    assert partial and done  # killed inside a shard, after others had finished
    # a finished shard that was damaged afterwards is detected and written again
    victim = sorted(done)[0]
    victim.write_bytes(victim.read_bytes()[:-10])
    convert(src, out, max_shard_size=SHARD, resume=True, **QUIET)
    same_files(out, reference)
