"""The Hugging Face Hub side: fetch only what a conversion reads, push what it wrote.

Every call goes through one `HfApi`-like object, so tests pass a local stand-in and never touch
the network. Downloads go to the huggingface-hub cache and resume where they stopped.
"""

import fnmatch
import re
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from m3mlx.checkpoint import INDEX_FILE, TensorInfo, read_index, tensors_from_header
from m3mlx.errors import reported_as
from m3mlx.files import atomic_write
from m3mlx.weights import is_vision

from .errors import ConvertError
from .source import SIDE_FILES, SIDE_GLOBS

SMALL_FILES = ("config.json", INDEX_FILE, "hf_quant_config.json") + SIDE_FILES
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def looks_like_repo_id(text: str) -> bool:
    return bool(REPO_ID.match(text)) and not text.startswith((".", "/", "~"))


def default_api():
    from huggingface_hub import HfApi

    return HfApi()


def _needed_shards(local: Path, files: List[str]) -> List[str]:
    """Shards holding at least one text tensor (vision-only shards are never fetched)."""
    with reported_as(ConvertError):
        weight_map = read_index(local)
    if weight_map is not None:
        return sorted({f for name, f in weight_map.items() if not is_vision(name)
                       and f.endswith(".safetensors")})
    return sorted(f for f in files if f.endswith(".safetensors"))


def fetch_small(repo_id: str, *, revision: Optional[str] = None, api=None
                ) -> Tuple[Path, List[str]]:
    """Download config, index, tokenizer and chat files. Returns (local snapshot directory, the
    shards that hold text tensors: vision-only shards are never fetched)."""
    api = api or default_api()
    try:
        files = api.list_repo_files(repo_id, revision=revision)
    except Exception as e:  # the hub raises many kinds; all mean "cannot list that repo"
        raise ConvertError(f"cannot reach the Hub repo {repo_id!r} ({type(e).__name__}: {e}); "
                           "check the name, your network and `hf auth login`") from None
    if "config.json" not in files:
        raise ConvertError(f"Hub repo {repo_id} has no config.json; is it a model repo?")
    small = [f for f in files if f in SMALL_FILES
             or any(fnmatch.fnmatch(f, g) for g in SIDE_GLOBS)]
    local = None
    for f in small:
        local = Path(_download(api, repo_id, f, revision)).parent
    shards = _needed_shards(local, files)
    missing = [s for s in shards if s not in files]
    if missing:
        raise ConvertError(f"{INDEX_FILE} of {repo_id} lists shard(s) the repo does not have, "
                           f"e.g. {missing[:3]}")
    return local, shards


def download_shards(repo_id: str, shards: List[str], *, revision: Optional[str] = None, api=None,
                    log=print):
    """Fetch the shards into the huggingface-hub cache; an interrupted download resumes."""
    api = api or default_api()
    for i, s in enumerate(shards):
        log(f"downloading {s} ({i + 1}/{len(shards)}) from {repo_id}")
        _download(api, repo_id, s, revision)


def _download(api, repo_id: str, filename: str, revision: Optional[str]) -> str:
    try:
        return api.hf_hub_download(repo_id, filename, revision=revision)
    except Exception as e:
        raise ConvertError(f"downloading {filename} from {repo_id} failed ({type(e).__name__}: "
                           f"{e}); run again to resume the download") from None


def remote_headers(repo_id: str, local: Path, shards: List[str], *,
                   revision: Optional[str] = None, api=None) -> Dict[str, TensorInfo]:
    """Tensor dtypes and shapes read from the shard headers on the Hub (HTTP range reads), so
    a conversion is planned and checked before hundreds of gigabytes are downloaded."""
    api = api or default_api()
    try:
        meta = api.get_safetensors_metadata(repo_id, revision=revision)
    except Exception as e:
        raise ConvertError(f"reading the safetensors headers of {repo_id} failed "
                           f"({type(e).__name__}: {e})") from None
    out: Dict[str, TensorInfo] = {}
    for fname, file_meta in meta.files_metadata.items():
        if fname not in shards:
            continue
        header = {name: {"dtype": t.dtype, "shape": list(t.shape),
                         "data_offsets": list(t.data_offsets)}
                  for name, t in file_meta.tensors.items()}
        with reported_as(ConvertError):  # the same checks as a local header, bar the file size
            out.update(tensors_from_header(header, local / fname, data_start=None,
                                           data_size=None))
    return out


def write_model_card(output: Path, base_model: Optional[str], summary: str):
    lines = ["---", "library_name: mlx", "pipeline_tag: text-generation",
             "tags:", "- mlx", "- m3mlx", "- minimax_m3"]
    if base_model:
        lines.append(f"base_model: {base_model}")
    lines += ["---", "", f"# {output.name}", "",
              f"MiniMax-M3 converted to MLX with `m3mlx convert`"
              + (f" from [{base_model}](https://huggingface.co/{base_model})" if base_model else "")
              + ".", "", summary, "",
              "Loads with `m3mlx.load(path)` and with mlx-lm (`mlx_lm.load(path)`); the vision "
              "tower is not included.", ""]
    atomic_write(output / "README.md", "\n".join(lines))


def upload(output: Path, repo_id: str, *, api=None, log=print) -> str:
    """Create (or reuse) the model repo and push the converted directory in one commit."""
    api = api or default_api()
    try:
        api.create_repo(repo_id, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=str(output),
                                 commit_message="Upload MiniMax-M3 converted with m3mlx")
    except Exception as e:
        raise ConvertError(f"uploading {output} to {repo_id} failed ({type(e).__name__}: {e}); "
                           "the converted model is complete on disk: upload it again with "
                           f"`m3mlx convert ... --resume --upload-repo {repo_id}`") from None
    log(f"uploaded {output} to https://huggingface.co/{repo_id}")
    return str(getattr(info, "commit_url", repo_id))
