"""The challenge's cached FineWeb export on the Hugging Face Hub, fetched as is (never re-encoded).

Remote layout (dataset repo, default willdepueoai/parameter-golf):
    datasets/manifest.json                      lists datasets (name, tokenizer_name, stats) and tokenizers
    datasets/datasets/fineweb10B_<variant>/fineweb_{train,val}_NNNNNN.bin
    datasets/tokenizers/<model_path from the manifest>
Downloads go through `snapshot_download` (parallel, resumable) into the Hugging Face cache, or into
`data.download_dir` if set. A local mirror (`data.fineweb_mirror`) replaces the Hub for offline hosts; it
may be laid out like the Hub repo or like upstream's `data/cached_challenge_fineweb.py` leaves its `data/`
folder (manifest.json, datasets/fineweb10B_<variant>/, tokenizers/ at the top).
"""

import json
import os
import re
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


VARIANT = r"sp[0-9]+(_[a-z0-9_]+)?|byte260"  # sp8192, or a tokenizer's own name after it (the CaseOps export)
CASEOPS_SUFFIX = "_lossless_caps_caseops_v1_reserved"  # the 1.0611 record's CaseOps data and tokenizer


def dataset_dir(variant: str) -> str:
    if re.fullmatch(VARIANT, variant):
        return f"fineweb10B_{variant}"
    raise PgolfError(f"data.fineweb_variant: unknown variant {variant!r}; expected sp<VOCAB> (e.g. sp1024), "
                     f"sp<VOCAB>_<name> (e.g. sp8192{CASEOPS_SUFFIX}) or byte260")


def plan(manifest: dict, variant: str, train_shards: int, val_bytes: bool = False) -> tuple[list[RemoteFile], int]:
    """The files to fetch for `variant`: all val shards (and, for CaseOps, their val_bytes sidecars), the first
    `train_shards` train shards, the tokenizer."""
    name = dataset_dir(variant)
    if not (isinstance(manifest, dict) and all(isinstance(manifest.get(k, []), list) and
                                                all(isinstance(d, dict) for d in manifest.get(k, []))
                                                for k in ("datasets", "tokenizers"))):
        raise PgolfError("manifest.json: expected an object whose datasets and tokenizers are lists of objects")
    entry = next((d for d in manifest.get("datasets", []) if d.get("name") == name), None)
    if entry is None:
        known = sorted(d.get("name", "?").removeprefix("fineweb10B_") for d in manifest.get("datasets", []))
        raise PgolfError(f"data.fineweb_variant: {variant!r} is not in the manifest; it lists {known}")
    try:
        stats = entry.get("stats") or {}
        available, val_shards = int(stats.get("files_train", 0)), int(stats.get("files_val", 0))
    except (AttributeError, TypeError, ValueError):
        raise PgolfError(f"manifest.json: the stats of {name} are not counts of files") from None
    if not 0 < train_shards <= available:
        raise PgolfError(f"data.train_shards: {train_shards} requested, {name} has 1..{available}")
    tokenizer = next((t for t in manifest.get("tokenizers", []) if t.get("name") == entry.get("tokenizer_name")), None)
    if tokenizer is None or not tokenizer.get("model_path"):
        raise PgolfError(f"manifest: tokenizer {entry.get('tokenizer_name')!r} of {name} has no model_path")
    prefix = f"{REMOTE_ROOT}/datasets/{name}"
    files = [RemoteFile(f"{prefix}/fineweb_val_{i:06d}.bin", "val") for i in range(val_shards)]
    if val_bytes:
        files += [RemoteFile(f"{prefix}/fineweb_val_bytes_{i:06d}.bin", "val_bytes") for i in range(val_shards)]
    files += [RemoteFile(f"{prefix}/fineweb_train_{i:06d}.bin", "train") for i in range(train_shards)]
    files.append(RemoteFile(f"{REMOTE_ROOT}/{tokenizer['model_path']}", "tokenizer"))
    vocab = int(tokenizer.get("vocab_size") or entry.get("vocab_size") or 0)
    return files, vocab


DOWNLOAD_WORKERS = 8


def _mirror_path(mirror: Path, relative: str) -> Path:
    """A remote path in a mirror of either layout: the Hub's, or upstream's downloader's (no leading datasets/)."""
    for candidate in (mirror / relative, mirror / Path(relative).relative_to(REMOTE_ROOT)):
        if candidate.is_file():
            if not candidate.resolve().is_relative_to(mirror.resolve()):
                raise PgolfError(f"{candidate}: lies outside the mirror (a manifest path may not leave "
                                 f"data.fineweb_mirror {mirror})")
            return candidate
    raise PgolfError(f"{mirror / relative}: not found in the mirror (data.fineweb_mirror; neither the Hub's layout "
                     f"nor upstream's data/ layout has it)")


def _download(repo: str, files: list[str], download_dir: str | None) -> Path:
    """Fetch `files` (parallel, resumable); returns the folder they sit in, laid out like the repo."""
    from huggingface_hub import snapshot_download

    try:
        where = {"local_dir": str(Path(download_dir).expanduser())} if download_dir else {}
        return Path(snapshot_download(repo_id=repo, repo_type="dataset", allow_patterns=files,
                                      max_workers=DOWNLOAD_WORKERS, **where))
    except Exception as e:  # network, auth, missing file: all end the stage with one line
        raise PgolfError(f"{repo}: download failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def fetch(repo: str, variant: str, train_shards: int, download_dir: str | None = None,
          mirror: str | None = None, val_bytes: bool = False) -> tuple[dict[str, list[Path]], int]:
    """Fetch manifest, shards and tokenizer (with `val_bytes`, the val shards' byte sidecars); returns local paths
    by kind and the tokenizer's vocab size."""
    manifest_rel = f"{REMOTE_ROOT}/manifest.json"
    if mirror is not None:
        locate = lambda relative: _mirror_path(Path(mirror), relative)  # noqa: E731
    else:
        root = _download(repo, [manifest_rel], download_dir)
        locate = lambda relative: root / relative  # noqa: E731
    manifest_path = locate(manifest_rel)
    try:
        manifest = json.loads(Path(manifest_path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise PgolfError(f"{manifest_path}: manifest is not valid JSON") from None
    files, vocab = plan(manifest, variant, train_shards, val_bytes)
    if mirror is None:
        root = _download(repo, [f.path for f in files], download_dir)
    local: dict[str, list[Path]] = {"val": [], "val_bytes": [], "train": [], "tokenizer": []}
    for f in files:
        local[f.kind].append(locate(f.path))
    for path in local["val"] + local["val_bytes"] + local["train"]:
        read_shard(path)  # header and size check before anything is linked into the artifact
    return local, vocab


def link_or_copy(source: Path, dest: Path) -> None:
    try:
        os.link(source, dest)
    except OSError:
        shutil.copyfile(source, dest)
