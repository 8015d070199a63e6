"""The challenge's cached FineWeb export on the Hugging Face Hub, fetched as is (never re-encoded).

Remote layout (dataset repo, default willdepueoai/parameter-golf):
    datasets/manifest.json                      lists datasets (name, tokenizer_name, stats) and tokenizers
    datasets/datasets/fineweb10B_<variant>/fineweb_{train,val}_NNNNNN.bin
    datasets/tokenizers/<model_path from the manifest>
A local mirror laid out the same way (`data.fineweb_mirror`) replaces the Hub for offline hosts.
"""

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from .data import read_shard
from .errors import PgolfError

REMOTE_ROOT = "datasets"


@dataclass(frozen=True)
class RemoteFile:
    path: str  # relative to the repo root
    kind: str  # val | train | tokenizer


def dataset_dir(variant: str) -> str:
    if variant == "byte260" or (variant.startswith("sp") and variant[2:].isdigit()):
        return f"fineweb10B_{variant}"
    raise PgolfError(f"data.fineweb_variant: unknown variant {variant!r}; expected sp<VOCAB> (e.g. sp1024) or byte260")


def plan(manifest: dict, variant: str, train_shards: int) -> tuple[list[RemoteFile], int]:
    """The files to fetch for `variant`: all val shards, the first `train_shards` train shards, the tokenizer."""
    name = dataset_dir(variant)
    entry = next((d for d in manifest.get("datasets", []) if d.get("name") == name), None)
    if entry is None:
        known = sorted(d.get("name", "?").removeprefix("fineweb10B_") for d in manifest.get("datasets", []))
        raise PgolfError(f"data.fineweb_variant: {variant!r} is not in the manifest; it lists {known}")
    stats = entry.get("stats") or {}
    available, val_shards = int(stats.get("files_train", 0)), int(stats.get("files_val", 0))
    if not 0 < train_shards <= available:
        raise PgolfError(f"data.train_shards: {train_shards} requested, {name} has 1..{available}")
    tokenizer = next((t for t in manifest.get("tokenizers", []) if t.get("name") == entry.get("tokenizer_name")), None)
    if tokenizer is None or not tokenizer.get("model_path"):
        raise PgolfError(f"manifest: tokenizer {entry.get('tokenizer_name')!r} of {name} has no model_path")
    prefix = f"{REMOTE_ROOT}/datasets/{name}"
    files = [RemoteFile(f"{prefix}/fineweb_val_{i:06d}.bin", "val") for i in range(val_shards)]
    files += [RemoteFile(f"{prefix}/fineweb_train_{i:06d}.bin", "train") for i in range(train_shards)]
    files.append(RemoteFile(f"{REMOTE_ROOT}/{tokenizer['model_path']}", "tokenizer"))
    vocab = int(tokenizer.get("vocab_size") or entry.get("vocab_size") or 0)
    return files, vocab


def _fetch_one(relative: str, repo: str, mirror: str | None, download_dir: Path) -> Path:
    """Return a local path for `relative`, downloading it (resumably) if it is not there yet."""
    if mirror is not None:
        source = Path(mirror) / relative
        if not source.is_file():
            raise PgolfError(f"{source}: not found in the mirror (data.fineweb_mirror)")
        return source
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id=repo, repo_type="dataset", filename=relative, local_dir=download_dir))
    except Exception as e:  # network, auth, missing file: all end the stage with one line
        raise PgolfError(f"{repo}/{relative}: download failed ({type(e).__name__}: {str(e).splitlines()[0]})") from None


def fetch(repo: str, variant: str, train_shards: int, download_dir: str | os.PathLike,
          mirror: str | None = None) -> tuple[dict[str, list[Path]], int]:
    """Fetch manifest, shards and tokenizer; returns local paths by kind and the tokenizer's vocab size."""
    from tqdm import tqdm

    download_dir = Path(download_dir).expanduser()
    manifest_path = _fetch_one(f"{REMOTE_ROOT}/manifest.json", repo, mirror, download_dir)
    try:
        manifest = json.loads(Path(manifest_path).read_text())
    except json.JSONDecodeError:
        raise PgolfError(f"{manifest_path}: manifest is not valid JSON") from None
    files, vocab = plan(manifest, variant, train_shards)
    local: dict[str, list[Path]] = {"val": [], "train": [], "tokenizer": []}
    for f in tqdm(files, desc=f"fineweb {variant}", unit="file"):
        local[f.kind].append(_fetch_one(f.path, repo, mirror, download_dir))
    for path in local["val"] + local["train"]:
        read_shard(path)  # header and size check before anything is linked into the artifact
    return local, vocab


def link_or_copy(source: Path, dest: Path) -> None:
    try:
        os.link(source, dest)
    except OSError:
        shutil.copyfile(source, dest)
