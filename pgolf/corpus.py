"""Corpora to token shards (the tokenize stage): the built-in demo text, local jsonl/txt, or FineWeb.

Every source writes into a folder: train_*/val_* shards in the challenge's format, tokenizer.model and a
manifest.json with each shard's token count and sha256; with CaseOps also val_bytes_* shards. `write_mirror`
turns a local corpus into a FineWeb mirror, so the challenge's own path (`data.source: fineweb`) runs offline.
"""

import hashlib
import itertools
import os
import platform
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from . import caseops, data, fineweb
from .config import MIN_SHARD_TOKENS, DataConfig
from .errors import PgolfError
from .io import atomic_dir, sha256_file, write_json
from .registry import Registry


class ShardWriter:
    """Stream tokens into numbered shards of `shard_tokens` tokens each."""

    def __init__(self, directory: Path, split: str, shard_tokens: int):
        self.directory, self.split, self.shard_tokens = Path(directory), split, shard_tokens
        self.buffer = np.empty(shard_tokens, dtype=np.uint16)
        self.filled = 0
        self.shards: list[dict] = []

    def add(self, tokens: np.ndarray) -> None:
        while tokens.size:
            n = min(tokens.size, self.shard_tokens - self.filled)
            self.buffer[self.filled:self.filled + n] = tokens[:n]
            self.filled += n
            tokens = tokens[n:]
            if self.filled == self.shard_tokens:
                self._flush()

    def _flush(self) -> None:
        name = f"{self.split}_{len(self.shards):06d}.bin"
        sha = data.write_shard(self.directory / name, self.buffer[:self.filled])
        self.shards.append({"file": name, "tokens": self.filled, "sha256": sha})
        self.filled = 0

    def close(self) -> list[dict]:
        if self.filled:
            self._flush()
        return self.shards


def tokenize_documents(docs: Iterable[str], sp, out_dir: Path, val_docs: int, shard_tokens: int,
                       case_ops: bool = False, batch_docs: int = 256) -> dict:
    """Encode a document stream into val_* (first `val_docs` docs) and train_* shards, each doc led by BOS.
    With `case_ops` the text is case-transformed first and val_bytes_* shards hold each val token's byte
    count in the original text (BOS: 0), which bpb then uses instead of the tokenizer's byte table."""
    writers = {s: ShardWriter(out_dir, s, shard_tokens) for s in ("val", "train")}
    if case_ops:
        writers["val_bytes"] = ShardWriter(out_dir, "val_bytes", shard_tokens)
    counts = {s: {"docs": 0, "tokens": 0, "bytes": 0} for s in ("val", "train")}
    val_hashes: set[bytes] = set()
    counts["val"]["docs_in_train"] = 0  # validation documents also in the train split: the audit refuses them
    bos = sp.bos_id()
    if bos < 0:
        raise PgolfError("tokenizer has no BOS token; documents must start with BOS")

    def flush(split: str, batch: list[str]) -> None:
        digests = [hashlib.sha1(d.encode()).digest() for d in batch]
        if split == "val":
            val_hashes.update(digests)
        else:
            counts["val"]["docs_in_train"] += sum(h in val_hashes for h in digests)
        texts = [caseops.encode(d) for d in batch] if case_ops else batch
        if case_ops and split == "val":
            encoded = []
            for text in texts:
                enc = sp.encode_as_offset_mapping(text)
                writers["val_bytes"].add(np.asarray([0, *caseops.token_bytes(text, enc["offsets"])], dtype=np.uint16))
                encoded.append(enc["ids"])
        else:
            encoded = sp.encode(texts, num_threads=os.cpu_count() or 1)
        for ids in encoded:
            arr = np.asarray([bos, *ids], dtype=np.uint16)
            writers[split].add(arr)
            counts[split]["tokens"] += arr.size
        counts[split]["docs"] += len(batch)
        counts[split]["bytes"] += sum(len(d.encode("utf-8")) for d in batch)

    batch: list[str] = []
    split = "val"
    for i, doc in enumerate(docs):
        doc_split = "val" if i < val_docs else "train"
        if doc_split != split or len(batch) == batch_docs:
            if batch:
                flush(split, batch)
            batch, split = [], doc_split
        batch.append(doc)
    if batch:
        flush(split, batch)
    for s, c in counts.items():
        if c["tokens"] == 0:
            raise PgolfError(f"corpus is empty: no {s} documents (have {sum(x['docs'] for x in counts.values())} "
                             f"docs, data.val_docs={val_docs})")
    out = {s: {**counts[s], "shards": writers[s].close()} for s in counts}
    if case_ops:
        writers["val_bytes"].close()
    return out


SOURCES: Registry[Callable[[DataConfig, Path], tuple[dict, str]]] = Registry("data.source")  # -> (splits, description)


@SOURCES.register("fineweb")
def from_fineweb(cfg: DataConfig, out: Path) -> tuple[dict, str]:
    """The challenge's own shards and tokenizer, linked as they are; with data.caseops, a CaseOps export's shards
    and the val_bytes sidecars bpb is counted from."""
    local, vocab = fineweb.fetch(cfg.fineweb_repo, cfg.fineweb_variant, cfg.train_shards, cfg.download_dir,
                                 cfg.fineweb_mirror, val_bytes=cfg.caseops)
    fineweb.link_or_copy(local["tokenizer"][0], out / "tokenizer.model")
    sp = data.load_tokenizer(out / "tokenizer.model")
    if vocab and sp.vocab_size() != vocab:
        raise PgolfError(f"{local['tokenizer'][0]}: vocab {sp.vocab_size()} but the manifest says {vocab}")
    if cfg.caseops:
        check_caseops_tokenizer(sp, local["tokenizer"][0])
    for i, src in enumerate(local["val_bytes"]):
        fineweb.link_or_copy(src, out / f"val_bytes_{i:06d}.bin")
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


def check_caseops_tokenizer(sp, path: str | Path) -> None:
    """CaseOps text needs a tokenizer with a piece of its own for each case operator (like the records'
    `..._caseops_v1_reserved`); any other spells each operator in three byte tokens."""
    missing = [f"U+{ord(op):04X}" for op in caseops.OPERATORS if sp.piece_to_id(op) == sp.unk_id()]
    if missing:
        raise PgolfError(f"{path}: no piece for the CaseOps operators {', '.join(missing)} (data.caseops: true needs "
                         "a tokenizer trained with them reserved, e.g. the record's, or none: one is trained here)")


def _tokenizer(docs: Callable, model_path: Path, tokenizer: str | None, val_docs: int, vocab_size: int,
               train_chars: int, case_ops: bool = False):
    """`tokenizer` copied to model_path, or a BPE of `vocab_size` trained there on the train documents; loaded."""
    if tokenizer:
        sp = data.load_tokenizer(tokenizer)  # clear error before copying
        if case_ops:
            check_caseops_tokenizer(sp, tokenizer)
        fineweb.link_or_copy(Path(tokenizer), model_path)
    else:
        train_docs = itertools.islice(docs(), val_docs, None)
        if case_ops:
            train_docs = map(caseops.encode, train_docs)
        data.train_tokenizer(train_docs, vocab_size, model_path, train_chars,
                             reserved=caseops.OPERATORS if case_ops else ())
    return data.load_tokenizer(model_path)


def _documents(cfg: DataConfig, docs: Callable, source: str, out: Path) -> tuple[dict, str]:
    sp = _tokenizer(docs, out / "tokenizer.model", cfg.tokenizer, cfg.val_docs, cfg.vocab_size,
                    cfg.tokenizer_train_chars, cfg.caseops)
    splits = tokenize_documents(docs(), sp, out, cfg.val_docs, cfg.shard_tokens, cfg.caseops)
    return splits, source + (", CaseOps" if cfg.caseops else "")


@SOURCES.register("jsonl")
def from_jsonl(cfg: DataConfig, out: Path) -> tuple[dict, str]:
    data.corpus_files(cfg.paths)  # every path exists and is a corpus, before any work
    return _documents(cfg, lambda: data.iter_documents(cfg.paths), f"jsonl: {', '.join(cfg.paths)}", out)


@SOURCES.register("builtin")
def from_builtin(cfg: DataConfig, out: Path) -> tuple[dict, str]:
    source = f"builtin: pydoc topics + stdlib docstrings of CPython {platform.python_version()}"
    return _documents(cfg, data.builtin_documents, source, out)


def tokenize(cfg: DataConfig, out: Path) -> dict:
    """Fill `out` from the configured source; returns the stage's metrics."""
    splits, source = SOURCES[cfg.source](cfg, out)
    sp = data.load_tokenizer(out / "tokenizer.model")
    val = data.load_val(out)
    splits["val"]["bpb_bytes"] = val.total_bytes
    splits["val"]["sha256_tokens"] = val.sha256()
    manifest = {
        "source": source,
        "tokenizer": {"sha256": sha256_file(out / "tokenizer.model"), "vocab_size": sp.vocab_size(),
                      "bos_id": sp.bos_id()},
        "caseops": cfg.caseops,
        "splits": splits,
    }
    write_json(out / "manifest.json", manifest)
    return {"vocab_size": sp.vocab_size(),
            **{f"{s}_{k}": v[k] for s, v in splits.items() for k in ("docs", "tokens") if k in v},
            "val_bpb_bytes": val.total_bytes}


def write_mirror(paths: list[str], out: Path, val_docs: int, shard_tokens: int, tokenizer: str | None = None,
                 vocab_size: int = 1024, tokenizer_chars: int = 20_000_000, case_ops: bool = False) -> dict:
    """A local corpus as a FineWeb mirror in the Hub's layout, what `data.fineweb_mirror` reads: the first
    `val_docs` documents as fineweb_val_* shards, the rest as fineweb_train_*, each document led by BOS,
    tokenized by `tokenizer` or by a BPE of `vocab_size` trained on the train documents. With `case_ops`, the
    CaseOps export's layout (the record's prepare_caseops_data.py): transformed text, variant
    sp<VOCAB>_lossless_caps_caseops_v1_reserved, and fineweb_val_bytes_* sidecars of each val token's original
    bytes. Returns the manifest."""
    for option, value, low in (("--shard-tokens", shard_tokens, MIN_SHARD_TOKENS), ("--val-docs", val_docs, 1),
                               ("--vocab", vocab_size, 260)):
        if value < low:
            raise PgolfError(f"{option}: {value}; expected >= {low}")
    data.corpus_files(paths)
    if out.exists():
        raise PgolfError(f"{out}: exists; a mirror is written to a new folder")
    docs = lambda: data.iter_documents(paths)  # noqa: E731
    with atomic_dir(out, "mirror") as tmp:
        top = tmp / fineweb.REMOTE_ROOT
        (top / "tokenizers").mkdir(parents=True)
        model = top / "tokenizers" / "tokenizer.model"
        sp = _tokenizer(docs, model, tokenizer, val_docs, vocab_size, tokenizer_chars, case_ops)
        suffix = fineweb.CASEOPS_SUFFIX if case_ops else ""
        variant = f"sp{sp.vocab_size()}{suffix}"
        model = model.rename(model.with_name(f"fineweb_{sp.vocab_size()}_bpe{suffix}.model"))
        shards = top / "datasets" / fineweb.dataset_dir(variant)
        shards.mkdir(parents=True)
        splits = tokenize_documents(docs(), sp, shards, val_docs, shard_tokens, case_ops)
        for shard in sorted(shards.glob("*.bin")):
            shard.rename(shards / f"fineweb_{shard.name}")
        manifest = {"datasets": [{"name": shards.name, "tokenizer_name": variant,
                                  "stats": {"files_train": len(splits["train"]["shards"]),
                                            "files_val": len(splits["val"]["shards"]),
                                            "tokens_train": splits["train"]["tokens"], "tokens_val": splits["val"]["tokens"]}}],
                    "tokenizers": [{"name": variant, "model_path": f"tokenizers/{model.name}", "vocab_size": sp.vocab_size()}]}
        write_json(top / "manifest.json", manifest)
    return manifest
