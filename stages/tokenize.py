"""tokenize: corpus -> artifacts/tokenize/data/{train,val}_*.bin, tokenizer.model, manifest.json."""

import itertools
import platform
from pathlib import Path

import numpy as np

from pgolf import data, fineweb, stage
from pgolf.config import DataConfig, load_params
from pgolf.errors import PgolfError
from pgolf.io import atomic_dir, sha256_file, write_json

OUT = stage.TOKENIZED


def from_fineweb(cfg: DataConfig, out: Path) -> tuple[dict, str]:
    local, vocab = fineweb.fetch(cfg.fineweb_repo, cfg.fineweb_variant, cfg.train_shards, cfg.download_dir,
                                 cfg.fineweb_mirror)
    fineweb.link_or_copy(local["tokenizer"][0], out / "tokenizer.model")
    sp = data.load_tokenizer(out / "tokenizer.model")
    if vocab and sp.vocab_size() != vocab:
        raise PgolfError(f"{local['tokenizer'][0]}: vocab {sp.vocab_size()} but the manifest says {vocab}")
    splits = {}
    for split in ("val", "train"):
        shards, docs = [], 0
        for i, src in enumerate(local[split]):
            name = f"{split}_{i:06d}.bin"
            fineweb.link_or_copy(src, out / name)
            tokens = data.read_shard(out / name, sp.vocab_size())
            docs += int(np.count_nonzero(tokens == sp.bos_id()))
            shards.append({"file": name, "tokens": int(tokens.size), "sha256": sha256_file(out / name), "source": src.name})
        splits[split] = {"docs": docs, "tokens": sum(s["tokens"] for s in shards), "shards": shards}
    return splits, f"fineweb {cfg.fineweb_repo} {fineweb.dataset_dir(cfg.fineweb_variant)}, {cfg.train_shards} train shards"


def from_documents(cfg: DataConfig, out: Path) -> tuple[dict, str]:
    if cfg.source == "builtin":
        docs = data.builtin_documents
        source = f"builtin: pydoc topics + stdlib docstrings of CPython {platform.python_version()}"
    else:
        docs = lambda: data.iter_documents(cfg.paths)  # noqa: E731 - a fresh stream per pass
        source = f"jsonl: {', '.join(cfg.paths)}"
    model_path = out / "tokenizer.model"
    if cfg.tokenizer:
        data.load_tokenizer(cfg.tokenizer)  # clear error before copying
        fineweb.link_or_copy(Path(cfg.tokenizer), model_path)
    else:
        train_docs = itertools.islice(docs(), cfg.val_docs, None)
        data.train_tokenizer(train_docs, cfg.vocab_size, model_path, cfg.tokenizer_train_chars)
    sp = data.load_tokenizer(model_path)
    splits = data.tokenize_documents(docs(), sp, out, cfg.val_docs, cfg.shard_tokens)
    return splits, source


def main() -> dict:
    cfg = load_params().data
    if cfg.source not in ("builtin", "jsonl", "fineweb"):
        raise PgolfError(f"data.source: {cfg.source!r}; expected builtin, jsonl or fineweb")
    with atomic_dir(OUT) as tmp:
        splits, source = (from_fineweb if cfg.source == "fineweb" else from_documents)(cfg, tmp)
        sp = data.load_tokenizer(tmp / "tokenizer.model")
        val = data.load_val_tokens(tmp)
        splits["val"]["bpb_bytes"] = int(data.byte_table(sp).count(val[:-1], val[1:]).sum())
        manifest = {
            "source": source,
            "tokenizer": {"sha256": sha256_file(tmp / "tokenizer.model"), "vocab_size": sp.vocab_size()},
            "splits": splits,
        }
        write_json(tmp / "manifest.json", manifest)
    return {
        "vocab_size": sp.vocab_size(),
        **{f"{s}_{k}": v[k] for s, v in splits.items() for k in ("docs", "tokens") if k in v},
        "val_bpb_bytes": splits["val"]["bpb_bytes"],
    }


if __name__ == "__main__":
    stage.run(main, "tokenize")
