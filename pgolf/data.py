"""Token shards, corpora, tokenizers, loaders and the bpb byte table.

Shard format (the challenge's): 256 little-endian int32 header (magic, version, token count, zeros),
then `count` little-endian uint16 tokens.
"""

import hashlib
import importlib
import inspect
import io
import itertools
import json
import os
import random
import re
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import PgolfError
from .io import atomic_path

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4


# ----------------------------------------------------------------------------- shards

def write_shard(path: str | os.PathLike, tokens: np.ndarray) -> str:
    """Write one shard atomically; returns its sha256."""
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 1 << 16):
        raise PgolfError(f"{path}: token ids must fit in uint16")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (SHARD_MAGIC, SHARD_VERSION, tokens.size)
    data = header.tobytes() + tokens.astype("<u2").tobytes()
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def read_shard(path: str | os.PathLike, vocab_size: int | None = None) -> np.ndarray:
    """Memory-map a shard's tokens after checking header, size and (optionally) the id range."""
    path = Path(path)
    if path.is_dir():
        raise PgolfError(f"{path}: is a directory, expected a shard file")
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise PgolfError(f"{path}: shard not found") from None
    if size < HEADER_BYTES:
        raise PgolfError(f"{path}: {size} bytes is shorter than the {HEADER_BYTES}-byte shard header")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if header[0] != SHARD_MAGIC:
        raise PgolfError(f"{path}: bad shard magic {header[0]}, expected {SHARD_MAGIC}")
    if header[1] != SHARD_VERSION:
        raise PgolfError(f"{path}: unsupported shard version {header[1]}, expected {SHARD_VERSION}")
    count = int(header[2])
    expected = HEADER_BYTES + 2 * count
    if size != expected:
        raise PgolfError(f"{path}: size {size} bytes != {expected} expected from the header's {count} tokens")
    tokens = np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(count,))
    if vocab_size is not None and count:
        top = int(tokens.max())
        if top >= vocab_size:
            raise PgolfError(f"{path}: token id {top} >= vocab size {vocab_size}")
    return tokens


def shard_paths(directory: str | os.PathLike, split: str, required: bool = True) -> list[Path]:
    """`<split>_NNNNNN.bin` (this repo's names) or `fineweb_<split>_NNNNNN.bin` (the challenge's) in order;
    val_bytes_* sidecars are not val shards."""
    pattern = re.compile(rf"(fineweb_)?{split}_[0-9]+\.bin")
    paths = sorted((p for p in Path(directory).glob(f"*{split}_*.bin") if pattern.fullmatch(p.name)),
                   key=lambda p: p.name.removeprefix("fineweb_"))
    if not paths and required:
        raise PgolfError(f"{directory}: no {split}_*.bin shards found")
    return paths


# ----------------------------------------------------------------------------- corpora

CORPUS_SUFFIXES = (".jsonl", ".jsonl.zst", ".txt")


def corpus_files(paths: Iterable[str]) -> list[Path]:
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.name.endswith(CORPUS_SUFFIXES))
            if not found:
                raise PgolfError(f"{p}: folder holds no {', '.join(CORPUS_SUFFIXES)} files")
            files += found
        elif p.is_file():
            if not p.name.endswith(CORPUS_SUFFIXES):
                raise PgolfError(f"{p}: expected a {', '.join(CORPUS_SUFFIXES)} file")
            files.append(p)
        else:
            raise PgolfError(f"{p}: corpus path not found (param data.paths)")
    if not files:
        raise PgolfError("data.paths: no corpus files given for data.source=jsonl")
    return files


def _binary_lines(path: Path) -> Iterator[bytes]:
    if not path.name.endswith(".zst"):
        with open(path, "rb") as f:
            yield from f
        return
    import zstandard

    stream, rest = zstandard.ZstdDecompressor().decompressobj(), b""
    with open(path, "rb") as f:
        try:
            while chunk := f.read(1 << 20):
                *lines, rest = (rest + stream.decompress(chunk)).split(b"\n")
                yield from (line + b"\n" for line in lines)
        except zstandard.ZstdError as e:
            raise PgolfError(f"{path}: damaged zstd stream ({e})") from None
    if not stream.eof:
        raise PgolfError(f"{path}: truncated zstd stream (the file ends inside a frame)")
    if rest:
        yield rest


def iter_documents(paths: Iterable[str]) -> Iterator[str]:
    """Stream documents: one per JSON line (field `text`) or one per .txt file."""
    for path in corpus_files(paths):
        if path.name.endswith(".txt"):
            try:
                yield path.read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise PgolfError(f"{path}: not UTF-8 text (byte {e.start})") from None
            continue
        lineno = 0
        for lineno, raw in enumerate(_binary_lines(path), 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise PgolfError(f"{path}:{lineno}: not UTF-8 text (byte {e.start} of the line)") from None
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise PgolfError(f"{path}:{lineno}: expected a JSON object with a 'text' field") from None
            if not isinstance(text, str):
                raise PgolfError(f"{path}:{lineno}: the 'text' field is not a string")
            yield text


BUILTIN_MODULES = (
    "argparse collections functools itertools json os pathlib re string textwrap typing unittest email "
    "logging subprocess threading asyncio decimal fractions statistics datetime calendar csv difflib inspect "
    "random shutil tarfile zipfile sqlite3 socket enum dataclasses heapq bisect contextlib abc io pickle copy "
    "pprint doctest tokenize ast dis configparser optparse gettext locale operator urllib.parse http.client "
    "xml.etree.ElementTree imaplib smtplib ftplib mailbox tempfile glob fnmatch struct codecs hashlib hmac "
    "secrets base64 gzip bz2 lzma queue sched selectors signal multiprocessing concurrent.futures weakref "
    "types traceback warnings timeit trace pdb cProfile profile pstats"
).split()


def builtin_documents() -> list[str]:
    """A demo corpus from text every CPython ships: pydoc topics and standard-library docstrings."""
    from pydoc_data.topics import topics

    docs = [topics[k] for k in sorted(topics)]
    with warnings.catch_warnings():  # getdoc touches typing.io / typing.re, deprecated aliases
        warnings.simplefilter("ignore", DeprecationWarning)
        for name in BUILTIN_MODULES:
            module = importlib.import_module(name)
            parts = [inspect.getdoc(module) or ""]
            for attr, obj in sorted(vars(module).items()):
                if attr.startswith("_") or not (inspect.isfunction(obj) or inspect.isclass(obj)):
                    continue
                if getattr(obj, "__module__", None) == module.__name__ and inspect.getdoc(obj):
                    parts.append(f"{attr}\n\n{inspect.getdoc(obj)}")
            docs.append("\n\n".join(p for p in parts if p))
    random.Random(0).shuffle(docs)
    return docs


# ----------------------------------------------------------------------------- tokenizer

def load_tokenizer(path: str | os.PathLike):
    import sentencepiece as spm

    if not Path(path).is_file():
        raise PgolfError(f"{path}: tokenizer model not found")
    try:
        return spm.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as e:
        raise PgolfError(f"{path}: not a SentencePiece model ({str(e).splitlines()[0]})") from None


def train_tokenizer(docs: Iterable[str], vocab_size: int, model_path: Path, max_chars: int,
                    reserved: Iterable[str] = ()) -> None:
    """Train a byte-fallback BPE on `docs` (the train split only), ids laid out like the challenge's;
    `reserved` symbols (CaseOps' operators) get pieces of their own."""
    import sentencepiece as spm

    counted = {"lines": 0}

    def lines() -> Iterator[str]:
        seen = 0
        for doc in docs:
            for line in doc.splitlines():
                if line.strip():
                    counted["lines"] += 1
                    yield line
                    seen += len(line)
            if seen >= max_chars:
                return

    stream = lines()
    first = next(stream, None)
    if first is None:
        raise PgolfError("corpus has no training text: every document is in the validation split (lower data.val_docs)")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=itertools.chain([first], stream), model_writer=model, model_type="bpe",
            vocab_size=vocab_size, byte_fallback=True, split_digits=True, character_coverage=0.9995,
            add_dummy_prefix=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
            pad_id=0, bos_id=1, eos_id=2, unk_id=3, max_sentence_length=16384, num_threads=os.cpu_count() or 1,
            input_sentence_size=2_000_000, shuffle_input_sentence=True, train_extremely_large_corpus=False,
            user_defined_symbols=list(reserved), minloglevel=2,
        )
    except RuntimeError as e:
        raise PgolfError(f"tokenizer training failed on {counted['lines']:,} lines of training text "
                         f"(too little text for data.vocab_size={vocab_size}?): {str(e).splitlines()[0]}") from None
    with atomic_path(model_path) as tmp:
        tmp.write_bytes(model.getvalue())


@dataclass
class ByteTable:
    """Per-token UTF-8 byte counts for bpb: bytes(t | prev) = base[t] + (space[t] and not boundary[prev])."""

    base: np.ndarray  # int16: bytes of the piece without its leading "▁" (1 for byte tokens)
    space: np.ndarray  # bool: piece starts with "▁"
    boundary: np.ndarray  # bool: control/unknown/unused tokens, after which a leading "▁" is not a byte

    def count(self, prev: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        base, space, boundary = (torch.as_tensor(a, device=target.device) for a in (self.base, self.space, self.boundary))
        return base[target].long() + (space[target] & ~boundary[prev]).long()


def byte_table(sp) -> ByteTable:
    n = sp.vocab_size()
    base = np.zeros(n, dtype=np.int16)
    space = np.zeros(n, dtype=bool)
    boundary = np.zeros(n, dtype=bool)
    for i in range(n):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            boundary[i] = True
            continue
        if sp.is_byte(i):
            base[i] = 1
            continue
        piece = sp.id_to_piece(i)
        if piece.startswith("▁"):
            space[i] = True
            piece = piece[1:]
        base[i] = len(piece.encode("utf-8"))
    return ByteTable(base, space, boundary)


# ----------------------------------------------------------------------------- loaders

class TokenStream:
    """Train shards read in order as one endless stream; its state is (shard index, position)."""

    def __init__(self, shards: list[np.ndarray]):
        self.shards = shards
        self.shard, self.pos = 0, 0

    def take(self, n: int) -> np.ndarray:
        out = np.empty(n, dtype=np.int64)
        filled = 0
        while filled < n:
            tokens = self.shards[self.shard]
            k = min(n - filled, tokens.size - self.pos)
            out[filled:filled + k] = tokens[self.pos:self.pos + k]
            filled += k
            self.pos += k
            if self.pos == tokens.size:
                self.shard, self.pos = (self.shard + 1) % len(self.shards), 0
        return out

    def state(self) -> dict:
        return {"shard": self.shard, "pos": self.pos}

    def restore(self, state: dict) -> None:
        self.shard, self.pos = int(state["shard"]), int(state["pos"])


class TrainLoader:
    """Each step takes one contiguous global span; rank r gets its disjoint slice of it (plus 1 target)."""

    def __init__(self, paths: list[Path], rank: int, world: int, device: torch.device,
                 vocab_size: int | None = None):
        self.stream = TokenStream([read_shard(p, vocab_size) for p in paths])
        self.rank, self.world, self.device = rank, world, device
        self.host_inputs: torch.Tensor | None = None  # the last batch's inputs on the host: document starts found there

    def next_batch(self, local_tokens: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        span = local_tokens + 1
        chunk = self.stream.take(span * self.world)
        local = torch.from_numpy(chunk[self.rank * span:(self.rank + 1) * span])
        if self.device.type == "cuda":  # a copy from pageable memory would wait for the GPU queue to drain
            local = local.pin_memory()
        self.host_inputs = local[:-1].view(-1, seq_len)
        local = local.to(self.device, non_blocking=True)
        return local[:-1].view(-1, seq_len), local[1:].view(-1, seq_len)


def load_val_tokens(directory: str | os.PathLike, vocab_size: int | None = None) -> torch.Tensor:
    """The whole validation split, concatenated."""
    return torch.from_numpy(np.concatenate([read_shard(p, vocab_size) for p in shard_paths(directory, "val")])
                            .astype(np.int64))


@dataclass
class ValSplit:
    tokens: torch.Tensor  # int64 (N,): the validation stream
    target_bytes: torch.Tensor  # int64 (N,): UTF-8 bytes token i adds as a target ([0]: 0, it is never one)

    @property
    def total_bytes(self) -> int:
        return int(self.target_bytes[1:].sum())

    def sha256(self) -> str:
        """Of the tokens as the shards hold them: what tokenize wrote and eval scored are compared by it."""
        return hashlib.sha256(self.tokens.numpy().astype("<u2").tobytes()).hexdigest()

    def head(self, n_tokens: int) -> "ValSplit":
        return ValSplit(self.tokens[:n_tokens], self.target_bytes[:n_tokens])


def load_val(directory: str | os.PathLike, vocab_size: int | None = None,
             tokenizer: str | os.PathLike | None = None) -> ValSplit:
    """Validation tokens and their byte counts: from val_bytes_* shards where tokenize wrote them (CaseOps),
    else from the tokenizer's byte table (default: tokenizer.model beside the shards)."""
    tokens = load_val_tokens(directory, vocab_size)
    sidecar = shard_paths(directory, "val_bytes", required=False)
    if sidecar:
        counts = torch.from_numpy(np.concatenate([read_shard(p) for p in sidecar]).astype(np.int64))
        if counts.numel() != tokens.numel():
            raise PgolfError(f"{sidecar[0].parent}: val_bytes shards hold {counts.numel():,} counts for "
                             f"{tokens.numel():,} val tokens")
    else:
        table = byte_table(load_tokenizer(tokenizer or Path(directory) / "tokenizer.model"))
        counts = torch.cat([torch.zeros(1, dtype=torch.long), table.count(tokens[:-1], tokens[1:])])
    return ValSplit(tokens, counts)
