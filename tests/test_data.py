import json
import shutil

import numpy as np
import pytest
import torch
import zstandard
from conftest import FINEWEB_TOKENIZER, make_docs

from pgolf import caseops, corpus, data, fineweb
from pgolf.errors import PgolfError


def test_shard_roundtrip(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 65535, 10_001, dtype=np.uint16)
    data.write_shard(tmp_path / "s.bin", tokens)
    raw = np.fromfile(tmp_path / "s.bin", dtype="<i4", count=3)
    assert raw.tolist() == [20240520, 1, 10_001]
    assert (tmp_path / "s.bin").stat().st_size == 1024 + 2 * 10_001
    np.testing.assert_array_equal(data.read_shard(tmp_path / "s.bin"), tokens)


def corrupt(path, offset, value):
    b = bytearray(path.read_bytes())
    b[offset:offset + 4] = np.int32(value).tobytes()
    path.write_bytes(bytes(b))


@pytest.mark.parametrize("damage, message", [
    (lambda p: corrupt(p, 0, 12345), "bad shard magic 12345, expected 20240520"),
    (lambda p: corrupt(p, 4, 2), "unsupported shard version 2, expected 1"),
    (lambda p: p.write_bytes(p.read_bytes()[:-2]), "!= 1224 expected from the header's 100 tokens"),
    (lambda p: p.write_bytes(p.read_bytes()[:100]), "shorter than the 1024-byte shard header"),
    (lambda p: corrupt(p, 8, 99), "!= 1222 expected from the header's 99 tokens"),
])
def test_shard_corruption_is_one_clear_line(tmp_path, damage, message):
    path = tmp_path / "val_000000.bin"
    data.write_shard(path, np.arange(100, dtype=np.uint16))
    damage(path)
    with pytest.raises(PgolfError) as e:
        data.read_shard(path)
    assert str(path) in str(e.value) and message in str(e.value) and "\n" not in str(e.value)


def test_token_id_out_of_vocab(tmp_path):
    data.write_shard(tmp_path / "a.bin", np.array([1, 2, 1024], dtype=np.uint16))
    with pytest.raises(PgolfError, match=r"a.bin: token id 1024 >= vocab size 1024"):
        data.read_shard(tmp_path / "a.bin", vocab_size=1024)
    assert data.read_shard(tmp_path / "a.bin", vocab_size=1025).size == 3


def byte_table_matches_decode(sp, seed):
    table = data.byte_table(sp)
    g = np.random.default_rng(seed)
    normal = [i for i in range(sp.vocab_size()) if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i))]
    texts = ["héllo wörld 東京 🙂", "  two  spaces\tand tab", "x" * 5 + " ü"]
    for trial in range(60):
        if trial % 3 == 0:  # random text with byte-fallback pieces that form valid UTF-8
            ids = sp.encode(texts[trial % len(texts)] + " " + "".join(chr(g.integers(32, 0x2FFF)) for _ in range(20)))
        else:
            ids = g.choice(normal, size=int(g.integers(1, 60))).tolist()
        seq = torch.tensor([sp.bos_id(), *ids])
        counted = int(table.count(seq[:-1], seq[1:]).sum())
        assert counted == len(sp.decode(ids).encode("utf-8")), (ids, sp.decode(ids))


def test_byte_table_equals_decoded_utf8_length(sp):
    byte_table_matches_decode(sp, 0)


@pytest.mark.skipif(not FINEWEB_TOKENIZER.exists(), reason="needs ../shared/tokenizers/fineweb_8192_bpe.model")
def test_byte_table_of_the_real_fineweb_tokenizer():
    sp = data.load_tokenizer(FINEWEB_TOKENIZER)
    assert sp.vocab_size() == 8192
    byte_table_matches_decode(sp, 1)
    table = data.byte_table(sp)
    assert table.boundary[sp.bos_id()] and table.base[sp.piece_to_id("<0x41>")] == 1


def write_corpus(folder, docs):
    folder.mkdir()
    with open(folder / "a.jsonl", "w") as f:
        for d in docs[:30]:
            f.write(json.dumps({"text": d}) + "\n")
    cctx = zstandard.ZstdCompressor()
    (folder / "b.jsonl.zst").write_bytes(cctx.compress("".join(json.dumps({"text": d}) + "\n" for d in docs[30:60]).encode()))
    (folder / "c.txt").write_text(docs[60])


def test_jsonl_source_streams_files_and_splits_val_first(tmp_path, sp):
    docs = make_docs(61, seed=5)
    write_corpus(tmp_path / "corpus", docs)
    assert list(data.iter_documents([str(tmp_path / "corpus")])) == docs
    out = tmp_path / "out"
    out.mkdir()
    splits = corpus.tokenize_documents(data.iter_documents([str(tmp_path / "corpus")]), sp, out, val_docs=7, shard_tokens=500)
    assert splits["val"]["docs"] == 7 and splits["train"]["docs"] == 54
    assert len(splits["train"]["shards"]) > 1 and all(s["tokens"] <= 500 for s in splits["train"]["shards"])
    val = data.load_val_tokens(out)
    assert int((val == sp.bos_id()).sum()) == 7 and val[0] == sp.bos_id()
    expected = [sp.bos_id()] + [t for d in docs[:7] for t in ([*sp.encode(d), sp.bos_id()])][:-1]
    assert val.tolist() == expected
    table = data.byte_table(sp)
    assert int(table.count(val[:-1], val[1:]).sum()) == sum(len(d.encode()) for d in docs[:7])


def test_empty_corpus_and_missing_paths(tmp_path, sp):
    with pytest.raises(PgolfError, match="corpus path not found"):
        list(data.iter_documents([str(tmp_path / "nope")]))
    (tmp_path / "empty.jsonl").write_text("")
    out = tmp_path / "o"
    out.mkdir()
    with pytest.raises(PgolfError, match="corpus is empty"):
        corpus.tokenize_documents(data.iter_documents([str(tmp_path / "empty.jsonl")]), sp, out, 2, 100)
    (tmp_path / "bad.jsonl").write_text('{"txt": 1}\n')
    with pytest.raises(PgolfError, match=r"bad.jsonl:1: expected a JSON object with a 'text' field"):
        list(data.iter_documents([str(tmp_path / "bad.jsonl")]))
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(PgolfError, match=r"latin1.jsonl:2: not UTF-8 text"):
        list(data.iter_documents([str(tmp_path / "latin1.jsonl")]))
    whole = zstandard.ZstdCompressor().compress(b"".join(b'{"text": "doc %d"}\n' % i for i in range(2000)))
    (tmp_path / "cut.jsonl.zst").write_bytes(whole[:len(whole) // 2])
    with pytest.raises(PgolfError, match=r"cut.jsonl.zst: truncated zstd stream"):
        list(data.iter_documents([str(tmp_path / "cut.jsonl.zst")]))
    with pytest.raises(PgolfError, match="corpus has no training text"):
        data.train_tokenizer(iter([]), 320, tmp_path / "t.model", 1000)
    with pytest.raises(PgolfError, match=r"tokenizer training failed on 1 lines .*data.vocab_size=320"):
        data.train_tokenizer(iter(["one short line"]), 320, tmp_path / "t.model", 1000)
    assert not (tmp_path / "t.model").exists()


def test_builtin_corpus_is_deterministic():
    a, b = data.builtin_documents(), data.builtin_documents()
    assert a == b and len(a) > 100 and sum(map(len, a)) > 500_000


def test_train_loader_gives_ranks_disjoint_spans_and_wraps(tmp_path):
    for i in range(2):
        data.write_shard(tmp_path / f"train_{i:06d}.bin", np.arange(i * 100, i * 100 + 100, dtype=np.uint16))
    paths = data.shard_paths(tmp_path, "train")
    loaders = [data.TrainLoader(paths, r, 2, torch.device("cpu")) for r in range(2)]
    seen = []
    for step in range(6):
        xs = [ld.next_batch(16, 8) for ld in loaders]
        for ld, (x, y) in zip(loaders, xs):
            assert x.shape == (2, 8) and torch.equal(x.flatten()[1:], y.flatten()[:-1])
            assert torch.equal(ld.host_inputs, x)  # where the trainer finds document starts without a GPU sync
        seen.append([x.flatten().tolist() for x, _ in xs])
    # step 0: rank 0 has tokens 0..15, rank 1 has 17..32; the spans never overlap
    assert seen[0][0] == list(range(16)) and seen[0][1] == list(range(17, 33))
    # 6 steps x 2 ranks x 17 = 204 of the 200 tokens: the stream wrapped back into shard 0
    assert loaders[0].stream.state() == {"shard": 0, "pos": 4}
    assert seen[5][1][-3:] == [0, 1, 2]  # inputs 187..199, then the wrap to token 0


def make_remote(root, variant="sp1024", n_train=3, tokenizer=None, upstream_layout=False):
    """A FineWeb mirror laid out like the Hub repo, or like upstream's data/cached_challenge_fineweb.py leaves data/."""
    top = root if upstream_layout else root / "datasets"
    d = top / "datasets" / f"fineweb10B_{variant}"
    d.mkdir(parents=True)
    for i in range(n_train):
        data.write_shard(d / f"fineweb_train_{i:06d}.bin", np.full(50, i + 5, dtype=np.uint16))
    data.write_shard(d / "fineweb_val_000000.bin", np.array([1, 7, 8, 9] * 10, dtype=np.uint16))
    (top / "tokenizers").mkdir()
    shutil.copy(tokenizer, top / "tokenizers" / "fineweb_320_bpe.model")
    manifest = {"datasets": [{"name": f"fineweb10B_{variant}", "tokenizer_name": "sp_320",
                              "stats": {"files_train": n_train, "files_val": 1}}],
                "tokenizers": [{"name": "sp_320", "model_path": "tokenizers/fineweb_320_bpe.model", "vocab_size": 320}]}
    (top / "manifest.json").write_text(json.dumps(manifest))


def test_fineweb_selection_against_a_local_mirror(tmp_path, tokenizer_path):
    make_remote(tmp_path / "remote", tokenizer=tokenizer_path)
    local, vocab = fineweb.fetch("willdepueoai/parameter-golf", "sp1024", 2, tmp_path / "dl", mirror=str(tmp_path / "remote"))
    assert vocab == 320
    assert [p.name for p in local["train"]] == ["fineweb_train_000000.bin", "fineweb_train_000001.bin"]
    assert [p.name for p in local["val"]] == ["fineweb_val_000000.bin"]
    with pytest.raises(PgolfError, match=r"data.train_shards: 4 requested, fineweb10B_sp1024 has 1..3"):
        fineweb.fetch("r", "sp1024", 4, tmp_path / "dl", mirror=str(tmp_path / "remote"))
    with pytest.raises(PgolfError, match=r"'sp4096' is not in the manifest; it lists \['sp1024'\]"):
        fineweb.fetch("r", "sp4096", 1, tmp_path / "dl", mirror=str(tmp_path / "remote"))
    corrupt(tmp_path / "remote/datasets/datasets/fineweb10B_sp1024/fineweb_train_000001.bin", 0, 7)
    with pytest.raises(PgolfError, match="fineweb_train_000001.bin: bad shard magic"):
        fineweb.fetch("r", "sp1024", 2, tmp_path / "dl", mirror=str(tmp_path / "remote"))


def test_fineweb_mirror_in_upstreams_downloader_layout(tmp_path, tokenizer_path):
    make_remote(tmp_path / "data", tokenizer=tokenizer_path, upstream_layout=True)
    assert (tmp_path / "data" / "manifest.json").exists()  # where cached_challenge_fineweb.py puts it
    local, vocab = fineweb.fetch("willdepueoai/parameter-golf", "sp1024", 3, None, mirror=str(tmp_path / "data"))
    assert vocab == 320 and len(local["train"]) == 3 and local["tokenizer"][0].name == "fineweb_320_bpe.model"
    with pytest.raises(PgolfError, match=r"fineweb_train_000002.bin: not found in the mirror"):
        (tmp_path / "data/datasets/fineweb10B_sp1024/fineweb_train_000002.bin").unlink()
        fineweb.fetch("r", "sp1024", 3, None, mirror=str(tmp_path / "data"))


def test_fineweb_downloads_the_planned_files_in_one_parallel_snapshot(tmp_path, tokenizer_path, monkeypatch):
    make_remote(tmp_path / "hub", tokenizer=tokenizer_path)
    calls = []

    def snapshot_download(repo_id, repo_type, allow_patterns, max_workers, **where):
        calls.append((repo_id, repo_type, sorted(allow_patterns), max_workers, where))
        return str(tmp_path / "hub")

    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    local, _ = fineweb.fetch("willdepueoai/parameter-golf", "sp1024", 2)
    assert calls[0][2] == ["datasets/manifest.json"] and calls[0][4] == {}  # the Hugging Face cache
    assert calls[1][2] == ["datasets/datasets/fineweb10B_sp1024/fineweb_train_000000.bin",
                           "datasets/datasets/fineweb10B_sp1024/fineweb_train_000001.bin",
                           "datasets/datasets/fineweb10B_sp1024/fineweb_val_000000.bin",
                           "datasets/tokenizers/fineweb_320_bpe.model"]
    assert calls[1][3] == fineweb.DOWNLOAD_WORKERS and len(local["train"]) == 2
    fineweb.fetch("r", "sp1024", 1, str(tmp_path / "dl"))
    assert calls[-1][4] == {"local_dir": str(tmp_path / "dl")}


CASE_TEXTS = ["The NASA launch of McDonald's iPhone, eBay and OpenAI's GPT-4o in the U.S.A.",
              "plain lowercase words", "ALLCAPS a Title x I Ab aB AbC", "escaped \ue001operators\ue004 \ue002 kept",
              "non-ASCII: Éclair ÜBER naïve 東京 🙂", "", "A", "aB1Cd_eF"]


def test_a_local_corpus_as_a_fineweb_mirror_takes_the_challenge_path_to_the_same_shards(tmp_path, tokenizer_path):
    from pgolf.cli import main
    from pgolf.config import DataConfig

    write_corpus(tmp_path / "corpus", make_docs(61, seed=5))
    paths = [str(tmp_path / "corpus")]
    main(["mirror", *paths, "--out", str(tmp_path / "mirror"), "--tokenizer", str(tokenizer_path), "--val-docs", "7",
          "--shard-tokens", "500"])
    manifest = json.loads((tmp_path / "mirror/datasets/manifest.json").read_text())
    files_train = manifest["datasets"][0]["stats"]["files_train"]
    assert manifest["tokenizers"][0]["name"] == "sp320" and files_train > 1
    outs = {}
    for source, extra in (("fineweb", {"fineweb_variant": "sp320", "fineweb_mirror": str(tmp_path / "mirror"),
                                       "train_shards": files_train}),
                          ("jsonl", {"paths": paths, "tokenizer": str(tokenizer_path)})):
        outs[source] = tmp_path / source
        outs[source].mkdir()
        corpus.tokenize(DataConfig(source=source, val_docs=7, shard_tokens=500, **extra), outs[source])
    for split in ("val", "train"):
        fw, js = data.shard_paths(outs["fineweb"], split), data.shard_paths(outs["jsonl"], split)
        assert [f.read_bytes() for f in fw] == [f.read_bytes() for f in js] and len(fw) > 0
    with pytest.raises(SystemExit, match=r"error: pgolf mirror: .*mirror: exists; a mirror is written to a new folder"):
        main(["mirror", *paths, "--out", str(tmp_path / "mirror")])


CASEOPS_TOKENIZER = FINEWEB_TOKENIZER.with_name("fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model")


@pytest.mark.skipif(not CASEOPS_TOKENIZER.exists(), reason="needs the record's CaseOps tokenizer in ../shared")
def test_a_caseops_mirror_with_the_records_tokenizer_reaches_the_challenge_path(tmp_path, tokenizer_path):
    """`pgolf mirror --caseops --tokenizer <the record's model>` writes the record's CaseOps export layout; data.source
    fineweb with data.caseops reads it and counts bpb on the original text's bytes; a tokenizer without the case
    operators is refused in one line."""
    from pgolf.cli import main
    from pgolf.config import DataConfig

    # single-spaced, no trailing newline: the record's tokenizer normalizes whitespace (bpb counts what it keeps)
    docs = [d.replace("the", "The").replace("model", "MODEL").rstrip("\n") for d in make_docs(61, seed=6)]
    write_corpus(tmp_path / "corpus", docs)
    main(["mirror", str(tmp_path / "corpus"), "--out", str(tmp_path / "mirror"), "--tokenizer", str(CASEOPS_TOKENIZER),
          "--val-docs", "6", "--caseops"])
    name = "sp8192_lossless_caps_caseops_v1_reserved"
    shards = tmp_path / "mirror/datasets/datasets" / f"fineweb10B_{name}"
    assert sorted(p.name for p in shards.iterdir()) == ["fineweb_train_000000.bin", "fineweb_val_000000.bin",
                                                        "fineweb_val_bytes_000000.bin"]
    out = tmp_path / "tok"
    out.mkdir()
    cfg = DataConfig(source="fineweb", caseops=True, vocab_size=8192, fineweb_variant=name, train_shards=1,
                     fineweb_mirror=str(tmp_path / "mirror"))
    corpus.tokenize(cfg, out)
    val = data.load_val(out)
    assert val.total_bytes == sum(len(d.encode()) for d in docs[:6])
    sp = data.load_tokenizer(out / "tokenizer.model")
    first = val.tokens[1:].tolist()
    assert caseops.decode(sp.decode(first[:first.index(sp.bos_id())])) == docs[0]
    with pytest.raises(PgolfError, match=r"tok.model: no piece for the CaseOps operators U\+E001, U\+E002"):
        corpus.tokenize(DataConfig(source="jsonl", paths=[str(tmp_path / "corpus")], caseops=True, val_docs=6,
                                   tokenizer=str(tokenizer_path)), tmp_path / "refused")


def test_caseops_is_lossless_and_counts_the_original_bytes():
    g = np.random.default_rng(0)
    alphabet = list("aAbBzZ \n1_é東\ue001\ue002\ue003\ue004")
    randoms = ["".join(g.choice(alphabet, size=int(g.integers(0, 40)))) for _ in range(300)]
    for text in CASE_TEXTS + randoms:
        encoded = caseops.encode(text)
        assert caseops.decode(encoded) == text, text
        assert int(caseops.original_bytes(encoded).sum()) == len(text.encode("utf-8")), text
    assert caseops.encode("The NASA iPhone") == "\ue001the \ue002nasa i\ue003phone"


def test_caseops_shards_count_bpb_on_original_bytes(tmp_path, sp, tokenizer_path):
    docs = [d.replace("the", "The").replace("model", "MODEL") for d in make_docs(12, seed=3)]
    plain, cased = tmp_path / "plain", tmp_path / "cased"
    for out, on in ((plain, False), (cased, True)):
        out.mkdir()
        shutil.copy(tokenizer_path, out / "tokenizer.model")
        corpus.tokenize_documents(iter(docs), sp, out, val_docs=5, shard_tokens=400, case_ops=on)
    a, b = data.load_val(plain), data.load_val(cased)
    assert data.shard_paths(cased, "val_bytes") and not data.shard_paths(plain, "val_bytes", required=False)
    assert b.tokens.numel() != a.tokens.numel()  # the transformed text tokenizes differently ...
    assert a.total_bytes == b.total_bytes == sum(len(d.encode()) for d in docs[:5])  # ... bytes are the original's


def test_byte_counts_from_offsets_equal_the_table_when_the_transform_is_identity(sp):
    """The sidecar path (bytes from each token's span of the text) and the byte-table path agree token by token
    on untransformed text, so with an identity transform bpb is unchanged."""
    table = data.byte_table(sp)
    for doc in make_docs(20, seed=4) + CASE_TEXTS[:3]:
        enc = sp.encode_as_offset_mapping(doc)
        ids = torch.tensor([sp.bos_id(), *enc["ids"]])
        from_table = table.count(ids[:-1], ids[1:]).numpy()
        np.testing.assert_array_equal(caseops.token_bytes(doc, enc["offsets"]), from_table)
