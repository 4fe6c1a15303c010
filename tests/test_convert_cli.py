"""`m3mlx convert` on the command line, and Hub sources and uploads against a local stand-in for
huggingface-hub's HfApi (the network is never touched)."""

import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from convert_fixtures import bf16_checkpoint, to_mxfp8, write_safetensors
from m3mlx.cli.convert import convert as convert_cmd
from m3mlx.units import parse_size
from m3mlx.convert import ConvertError, convert, hub
from m3mlx.checkpoint import read_header

QUIET = dict(progress=False, log=lambda s: None)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return bf16_checkpoint(tmp_path_factory.mktemp("cli") / "src")


def run(*args):
    result = CliRunner().invoke(convert_cmd, [str(a) for a in args])
    return result.exit_code, result.output


def test_help_lists_every_option():
    code, out = run("--help")
    assert code == 0
    for option in ("--mode", "--bits", "--group-size", "--recipe", "--role", "--dtype",
                   "--max-shard-size", "--revision", "--dry-run", "--resume", "--force",
                   "--upload-repo", "--quiet", "SOURCE", "OUTPUT_DIR"):
        assert option in out, option
    for choice in ("affine", "mxfp4", "mxfp8", "nvfp4", "none", "m3", "mlx-lm", "uniform"):
        assert choice in out
    for role in ("embed", "lm_head", "attention", "index", "router", "shared_expert", "experts",
                 "dense_mlp", "mtp"):
        assert f"{role}:" in out


def test_dry_run_prints_the_plan_and_writes_nothing(src, tmp_path):
    code, out = run(src, tmp_path / "out", "--dry-run", "--bits", "3", "--role", "attention=6",
                    "--role", "embed=mxfp8")
    assert code == 0, out
    assert not (tmp_path / "out").exists()
    assert re.search(r"^attention\s+\d+\s+[\d,]+\s+affine 6-bit g64", out, re.M)
    assert re.search(r"^embed\s+.*mxfp8", out, re.M)
    assert "resident size" in out and "bits/weight" in out and "estimated time" in out


def test_convert_resume_and_errors_on_the_command_line(src, tmp_path):
    out = tmp_path / "out"
    code, text = run(src, out, "--mode", "mxfp8", "--max-shard-size", "100KB", "--quiet")
    assert code == 0, text
    assert len(list(out.glob("model-*.safetensors"))) > 1
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["mode"] == "mxfp8"
    code, text = run(src, out)
    assert code == 1 and "Error:" in text and "--resume" in text and "Traceback" not in text
    code, text = run(src, out, "--mode", "mxfp8", "--max-shard-size", "100KB", "--resume")
    assert code == 0 and "already complete" in text
    code, text = run(src, tmp_path / "o2", "--role", "bogus")
    assert code == 1 and "ROLE=PRECISION" in text
    code, text = run(src, tmp_path / "o3", "--max-shard-size", "lots")
    assert code == 2 and "not a size" in text


def test_progress_bar_reports_bytes_rate_and_time_left(src, tmp_path):
    code, text = run(src, tmp_path / "out")
    assert code == 0
    assert re.search(r"100\.0%\s+[\d.]+ KB / [\d.]+ KB\s+[\d.]+ MB/s\s+done", text), text


def test_parse_size():
    assert parse_size("5GB") == 5 << 30
    assert parse_size("500MB") == 500 << 20
    assert parse_size("1.5g") == int(1.5 * (1 << 30))
    assert parse_size("4096") == 4096


# ----------------------------------------------------------------------------------------------
# A stand-in for huggingface_hub.HfApi, serving a local directory as "the Hub"


class FakeHub:
    def __init__(self, root: Path, cache: Path):
        self.root, self.cache = root, cache
        self.downloads, self.uploads, self.created = [], {}, []
        self.metadata_calls = 0

    def _repo(self, repo_id):
        path = self.root / repo_id
        if not path.is_dir():
            raise FileNotFoundError(f"404: {repo_id}")
        return path

    def list_repo_files(self, repo_id, *, revision=None, **_):
        base = self._repo(repo_id)
        return sorted(str(p.relative_to(base)) for p in base.rglob("*") if p.is_file())

    def hf_hub_download(self, repo_id, filename, *, revision=None, **_):
        self.downloads.append(filename)
        dst = self.cache / repo_id / (revision or "main") / filename
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self._repo(repo_id) / filename, dst)
        return str(dst)

    def get_safetensors_metadata(self, repo_id, *, revision=None, **_):
        self.metadata_calls += 1
        files = {}
        for f in self._repo(repo_id).glob("*.safetensors"):
            shard = read_header(f)
            tensors = {n: SimpleNamespace(dtype=t.dtype, shape=list(t.shape),
                                          data_offsets=(t.start - shard.data_start,
                                                        t.start - shard.data_start + t.nbytes))
                       for n, t in shard.tensors.items()}
            files[f.name] = SimpleNamespace(tensors=tensors)
        return SimpleNamespace(files_metadata=files)

    def create_repo(self, repo_id, *, exist_ok=False, **_):
        self.created.append(repo_id)

    def upload_folder(self, *, repo_id, folder_path, commit_message=None, **_):
        dst = self.root / "uploaded" / repo_id
        shutil.copytree(folder_path, dst, dirs_exist_ok=True)
        self.uploads[repo_id] = dst
        return SimpleNamespace(commit_url=f"local://{repo_id}")


@pytest.fixture
def fake_hub(src, tmp_path):
    """The fixture published as 'org/m3-mxfp8', plus a vision-only shard and files nobody needs."""
    repo = tmp_path / "hub" / "org" / "m3-mxfp8"
    to_mxfp8(src, repo)
    write_safetensors(repo / "model-vision.safetensors",
                      {"vision_tower.extra.weight": ("BF16", (4, 4), b"\0" * 32)})
    index = json.loads((repo / "model.safetensors.index.json").read_text())
    index["weight_map"]["vision_tower.extra.weight"] = "model-vision.safetensors"
    (repo / "model.safetensors.index.json").write_text(json.dumps(index))
    (repo / "figures").mkdir()
    (repo / "figures" / "bench.png").write_bytes(b"png")
    (repo / "README.md").write_text("# card")
    (repo / "consolidated.pth").write_bytes(b"x" * 1000)
    return FakeHub(tmp_path / "hub", tmp_path / "cache")


def test_hub_source_downloads_only_what_is_needed(fake_hub, tmp_path):
    out = tmp_path / "out"
    result = convert("org/m3-mxfp8", out, hub_api=fake_hub, **QUIET)
    assert result.written and result.plan.source.repo_id == "org/m3-mxfp8"
    got = set(fake_hub.downloads)
    published = set(fake_hub.list_repo_files("org/m3-mxfp8"))
    unneeded = {"README.md", "figures/bench.png", "consolidated.pth", "model-vision.safetensors"}
    assert got == published - unneeded
    assert {"model-00001-of-00002.safetensors", "tokenizer.json", "chat_template.jinja"} <= got
    assert json.loads((out / "config.json").read_text())["m3mlx_conversion"]["source"] == \
        "org/m3-mxfp8"
    assert "base_model: org/m3-mxfp8" in (out / "README.md").read_text()


def test_hub_dry_run_reads_headers_remotely(fake_hub, tmp_path):
    lines = []
    convert("org/m3-mxfp8", tmp_path / "out", hub_api=fake_hub, dry_run=True, log=lines.append,
            progress=False)
    assert not any(f.endswith(".safetensors") for f in fake_hub.downloads)
    assert fake_hub.metadata_calls == 1
    assert "dry run: nothing written" in lines[-1] and not (tmp_path / "out").exists()
    assert any("mxfp8" in line for line in lines)


def test_hub_errors(fake_hub, tmp_path):
    with pytest.raises(ConvertError, match="cannot reach the Hub repo"):
        convert("org/missing", tmp_path / "out", hub_api=fake_hub, **QUIET)

    class Broken(FakeHub):
        def hf_hub_download(self, repo_id, filename, **kw):
            if filename.endswith(".safetensors"):
                raise ConnectionError("connection reset")
            return super().hf_hub_download(repo_id, filename, **kw)

    broken = Broken(fake_hub.root, fake_hub.cache)
    with pytest.raises(ConvertError, match="run again to resume the download"):
        convert("org/m3-mxfp8", tmp_path / "out", hub_api=broken, **QUIET)
    assert not (tmp_path / "out").exists()


def test_upload_repo_pushes_the_result(fake_hub, src, tmp_path):
    out = tmp_path / "out"
    convert(src, out, upload_repo="me/m3-4bit", hub_api=fake_hub, **QUIET)
    assert fake_hub.created == ["me/m3-4bit"]
    pushed = fake_hub.uploads["me/m3-4bit"]
    assert sorted(p.name for p in pushed.iterdir()) == sorted(p.name for p in out.iterdir())
    assert (pushed / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


def test_upload_from_the_command_line(fake_hub, src, tmp_path, monkeypatch):
    monkeypatch.setattr(hub, "default_api", lambda: fake_hub)
    code, text = run(src, tmp_path / "out", "--upload-repo", "me/m3", "--quiet")
    assert code == 0, text
    assert "uploaded" in text and "me/m3" in fake_hub.uploads

    class NoUpload(FakeHub):
        def upload_folder(self, **kw):
            raise PermissionError("403 forbidden")

    monkeypatch.setattr(hub, "default_api", lambda: NoUpload(fake_hub.root, fake_hub.cache))
    code, text = run(src, tmp_path / "out", "--resume", "--upload-repo", "me/m3")
    assert code == 1 and "403" in text and "complete on disk" in text


def test_hub_disk_check_comes_before_the_download(fake_hub, tmp_path, monkeypatch):
    from m3mlx.convert import converter

    real = shutil.disk_usage
    monkeypatch.setattr(converter.shutil, "disk_usage",
                        lambda p: real(p)._replace(free=200_000))
    with pytest.raises(ConvertError, match="not enough disk space: the output and the download"):
        convert("org/m3-mxfp8", tmp_path / "out", hub_api=fake_hub, **QUIET)
    assert not any(f.endswith(".safetensors") for f in fake_hub.downloads)
