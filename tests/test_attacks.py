"""The attacker's table: nothing deleted, nothing planted, nothing unbounded, nothing followed through a link."""

import os

import pytest

from pgolf.checkpoint import lock
from pgolf.errors import PgolfError
from pgolf.io import MARKER, atomic_dir, atomic_path, write_bytes


def fill(path, kind=None):
    with atomic_dir(path, kind or "export") as tmp:
        (tmp / "a.txt").write_text("new")


@pytest.fixture
def repo(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (tmp_path / "artifacts" / "train" / "model").mkdir(parents=True)
    (tmp_path / "artifacts" / "train" / "model" / "raw.safetensors").write_text("weights")
    (tmp_path / "artifacts" / "train" / "model" / MARKER).write_text("train/model\n")
    return tmp_path


@pytest.mark.parametrize("target, message", [
    (".", "is the working directory or a folder above it"),
    ("..", "is the working directory or a folder above it"),
    ("artifacts", "a folder pgolf did not write as export output"),
    ("artifacts/train", "a folder pgolf did not write as export output"),
    ("artifacts/train/model", "a folder pgolf did not write as export output"),  # another kind's output
    ("mine", "a folder pgolf did not write as export output"),
    ("notes.txt", "is a file; pgolf writes its export output as a folder there"),
])
def test_a_folder_write_never_removes_what_pgolf_did_not_write(repo, target, message):
    (repo / "mine").mkdir()
    (repo / "mine" / "thesis.tex").write_text("years of work")
    (repo / "notes.txt").write_text("notes")
    before = sorted(str(p) for p in repo.parent.rglob("*"))
    with pytest.raises(PgolfError, match=message) as e:
        fill(target)
    assert "\n" not in str(e.value)
    assert sorted(str(p) for p in repo.parent.rglob("*")) == before  # nothing removed, nothing left behind
    assert (repo / "mine" / "thesis.tex").read_text() == "years of work"
    assert (repo / "artifacts/train/model/raw.safetensors").read_text() == "weights"


def test_a_folder_write_replaces_its_own_kind_and_empty_folders(repo):
    (repo / "empty").mkdir()
    fill("empty")
    fill("empty")  # its own output now: replaced
    assert (repo / "empty" / "a.txt").read_text() == "new" and (repo / "empty" / MARKER).read_text() == "export\n"
    fill("artifacts/train/model", "train/model")
    assert sorted(p.name for p in (repo / "artifacts/train/model").iterdir()) == [MARKER, "a.txt"]
    assert not [p for p in repo.rglob("*.tmp")]  # the old folder moved aside is gone


def test_a_folder_that_appears_during_the_write_is_not_replaced(repo):
    with pytest.raises(PgolfError, match="did not write"):
        with atomic_dir("late", "export") as tmp:
            (tmp / "a.txt").write_text("new")
            (repo / "late").mkdir()
            (repo / "late" / "theirs").write_text("theirs")
    assert (repo / "late" / "theirs").read_text() == "theirs" and not list(repo.glob(".late.*"))


def test_no_write_goes_through_a_symbolic_link(repo, tmp_path_factory):
    outside = tmp_path_factory.mktemp("outside")
    (outside / "precious").write_text("keep")
    os.symlink(outside, repo / "artifacts" / "eval")
    with pytest.raises(PgolfError, match="artifacts/eval: is a symbolic link"):
        write_bytes("artifacts/eval/eval.log", b"log")
    os.symlink(outside / "precious", repo / "artifacts" / "train" / "train.log")
    with pytest.raises(PgolfError, match="train.log: is a symbolic link"):
        with atomic_path("artifacts/train/train.log"):
            pass
    os.symlink(outside, repo / "out")
    with pytest.raises(PgolfError, match="out: is a symbolic link"):
        fill("out")
    assert (outside / "precious").read_text() == "keep" and sorted(p.name for p in outside.iterdir()) == ["precious"]


def test_a_linked_checkpoint_lock_does_not_truncate_its_target(repo, tmp_path_factory):
    victim = tmp_path_factory.mktemp("outside") / "victim"
    victim.write_text("do not truncate")
    (repo / "artifacts/train/checkpoint").mkdir()
    os.symlink(victim, repo / "artifacts/train/checkpoint/lock")
    with pytest.raises(PgolfError, match="lock: is a symbolic link"):
        lock("artifacts/train/checkpoint", "a trainer,")
    assert victim.read_text() == "do not truncate"
    os.unlink(repo / "artifacts/train/checkpoint/lock")
    os.rmdir(repo / "artifacts/train/checkpoint")
    os.symlink(victim.parent, repo / "artifacts/train/checkpoint")  # a linked folder would keep checkpoints outside
    with pytest.raises(PgolfError, match="checkpoint: is a symbolic link"):
        lock("artifacts/train/checkpoint", "a trainer,")


# Each crafted blob is read by `python -c` in a child whose address space is capped at 2 GiB: it must end in one line,
# quickly, far under the cap (the blobs of the attack reached 4.48 GB and 8.3 GB of RSS).
READ_CRAFTED = """
import resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
from pgolf import codecs, pack
from pgolf.errors import PgolfError
codecs.ZPAQ_MEMORY = 48 << 20  # the o1 model fits; keeps the capped child's run short
t = time.perf_counter()
try:
    pack.unpack(open(sys.argv[1], "rb").read(), "crafted.blob")
    print("READ")
except PgolfError as e:
    print(f"ERR {time.perf_counter() - t:.1f} {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} {e}")
"""


def crafted_blob(codec: str, chunk: int, raw: int, chunks: list[bytes]) -> bytes:
    import hashlib
    import json
    import lzma

    from pgolf import codecs, pack

    header = json.dumps({"meta": {}, "chunk": chunk, "tensors": [],
                         "streams": [["codes.mlp", "int8", codecs.CODECS[codec].id, raw, [len(c) for c in chunks]]]},
                        separators=(",", ":"))
    packed = lzma.compress(header.encode())
    return (pack.HEAD.pack(pack.MAGIC, pack.VERSION, hashlib.sha256(b"x").digest(), len(packed), len(header))
            + packed + b"".join(chunks))


def read_crafted(tmp_path, blob: bytes) -> tuple[float, int, str]:
    """(seconds, peak RSS in MiB of the reader, its one-line error)."""
    import subprocess
    import sys

    (tmp_path / "crafted.blob").write_bytes(blob)
    p = subprocess.run([sys.executable, "-c", READ_CRAFTED, str(tmp_path / "crafted.blob")], capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0 and p.stdout.startswith("ERR "), p.stdout + p.stderr[-2000:]
    _, seconds, rss, message = p.stdout.strip().split(" ", 3)
    return float(seconds), int(rss), message


def test_a_zpaq_bomb_is_stopped_by_the_decoders_memory_cap(tmp_path, monkeypatch):
    import zpaq

    from pgolf import codecs

    monkeypatch.setattr(codecs, "ZPAQ_MEMORY", 48 << 20)  # the cap the reader below runs under
    legit = bytes(range(256)) * 4096
    assert codecs.decompress(6, codecs.compress("zpaq_o1", legit), len(legit), "x") == legit
    bomb = zpaq.compress(b"\0" * (1 << 20), method=codecs.ZPAQ_O1, threads=1) * 200  # ~21 KB -> 200 MiB of zeros
    seconds, rss, message = read_crafted(tmp_path, crafted_blob("zpaq_o1", 1 << 20, 1 << 20, [bomb]))
    assert message.startswith("crafted.blob: corrupted or truncated blob (zpaq_o1: ValueError: decoder stopped: ")
    assert "emory" in message and "\n" not in message  # the decoder ran out of its capped address space
    assert rss < 600, rss  # MiB: the reader never holds the output


def test_a_flood_of_tiny_chunks_is_refused_before_any_decoding(tmp_path):
    seconds, rss, message = read_crafted(tmp_path, crafted_blob("zstd", 1, 7_000_000, [b""] * 7_000_000))
    assert message == "crafted.blob: malformed blob header (chunk sizes do not match the streams)"
    assert seconds < 30 and rss < 1500, (seconds, rss)


@pytest.mark.parametrize("content, message", [
    ("null", "not the JSON `dvc exp show --json` writes (expected a list of revisions)"),
    ("[1]", "not the JSON `dvc exp show --json` writes (expected a list of revisions)"),
    (b"\xff\xfe[", "not the JSON `dvc exp show --json` writes (UnicodeDecodeError)"),
])
def test_pgolf_compare_refuses_what_is_not_an_experiment_table_in_one_line(tmp_path, content, message):
    from conftest import run

    f = tmp_path / "exps.json"
    f.write_bytes(content.encode() if isinstance(content, str) else content)
    p = run(["pgolf", "compare", str(f)], tmp_path, check=False)
    assert p.returncode == 1 and p.stderr.strip() == f"error: pgolf compare: {f}: {message}"
    p = run(["pgolf", "compare", str(tmp_path / "missing.json")], tmp_path, check=False)
    assert p.stderr.strip().endswith("missing.json: file not found (save one with `dvc exp show --json > "
                                     f"{tmp_path / 'missing.json'}`)")


def test_pgolf_compare_without_dvc_on_path_and_into_a_closed_pipe(tmp_path):
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "PATH": "/nonexistent"}
    p = subprocess.run([sys.executable, "-m", "pgolf.cli", "compare"], cwd=tmp_path, env=env, capture_output=True,
                       text=True)
    assert p.returncode == 1 and p.stderr.strip() == "error: pgolf compare: dvc is not on PATH (activate the " \
                                                     "environment pgolf is installed in)"
    show = [{"rev": "workspace", "data": {"rev": "workspace", "metrics": {"artifacts/eval/metrics.json": {"data": {
        "val_bpb": 1.5 + i / 1000}}}}} for i in range(3)]
    show[0]["experiments"] = [{"revs": [{"name": f"e{i}", "data": {"metrics": {"artifacts/eval/metrics.json": {
        "data": {"val_bpb": 1.0 + i / 1000}}}}}]} for i in range(3000)]
    (tmp_path / "show.json").write_text(json.dumps(show))
    p = subprocess.run(f"{sys.executable} -m pgolf.cli compare show.json | head -1", shell=True, cwd=tmp_path,
                       capture_output=True, text=True)
    assert p.stdout.startswith("| experiment") and p.stderr == "", p.stderr


@pytest.mark.parametrize("args, message", [
    (["--shard-tokens", "0"], "--shard-tokens: 0; expected >= 256"),
    (["--shard-tokens", "-1"], "--shard-tokens: -1; expected >= 256"),
    (["--val-docs", "-1"], "--val-docs: -1; expected >= 1"),
])
def test_pgolf_mirror_refuses_bad_numbers_in_one_line(tmp_path, args, message):
    from conftest import run

    (tmp_path / "c.txt").write_text("some text")
    p = run(["pgolf", "mirror", str(tmp_path / "c.txt"), "--out", str(tmp_path / "m"), *args], tmp_path, check=False)
    assert p.returncode == 1 and p.stderr.strip() == f"error: pgolf mirror: {message}"
    assert not (tmp_path / "m").exists()


def test_a_manifest_of_the_wrong_shape_or_a_path_out_of_the_mirror_is_one_line(tmp_path):
    import json

    import numpy as np

    from pgolf import fineweb
    from pgolf.data import write_shard

    for manifest in ([1, 2], {"datasets": {"a": 1}}, {"datasets": [{"name": "fineweb10B_sp1024", "stats": 5}]}):
        with pytest.raises(PgolfError, match=r"manifest.json: "):
            fineweb.plan(manifest, "sp1024", 1)
    (tmp_path / "mirror" / "datasets").mkdir(parents=True)
    (tmp_path / "secret.model").write_text("x")
    manifest = {"datasets": [{"name": "fineweb10B_sp1024", "tokenizer_name": "sp1024",
                              "stats": {"files_train": 0, "files_val": 0}}],
                "tokenizers": [{"name": "sp1024", "model_path": "../../secret.model"}]}
    (tmp_path / "mirror" / "datasets" / "manifest.json").write_text(json.dumps(manifest))
    manifest["datasets"][0]["stats"]["files_train"] = 1
    (tmp_path / "mirror" / "datasets" / "manifest.json").write_text(json.dumps(manifest))
    write_shard(tmp_path / "mirror/datasets/datasets/fineweb10B_sp1024/fineweb_train_000000.bin", np.arange(300))
    with pytest.raises(PgolfError, match=r"secret.model: lies outside the mirror"):
        fineweb.fetch("r", "sp1024", 1, mirror=str(tmp_path / "mirror"))


def test_quantize_names_the_real_cause_nan_weights_or_a_limit_below_the_script(tmp_path):
    import subprocess
    import sys

    import yaml
    from conftest import run
    from test_reliability import stage_dir

    from pgolf.checkpoint import load_tensors, save_tensors

    d = stage_dir(tmp_path, "q", {"iterations": 4})
    params = yaml.safe_load((d / "params.yaml").read_text())
    params["audit"]["limit_bytes"] = 16_000
    (d / "params.yaml").write_text(yaml.safe_dump(params))
    p = subprocess.run([sys.executable, "-m", "stages.check"], cwd=d, capture_output=True, text=True)
    assert p.returncode == 1 and p.stderr.strip().startswith(  # the check stage, before any training
        "error: check: audit.limit_bytes: 16,000 leaves no room for the model: train_gpt.py takes up to "), p.stderr
    params["audit"]["limit_bytes"] = 16_000_000
    (d / "params.yaml").write_text(yaml.safe_dump(params))
    for stage in ("train", "ema", "calibrate"):
        run([sys.executable, "-m", f"stages.{stage}"], d)
    params["audit"]["limit_bytes"] = 16_000
    (d / "params.yaml").write_text(yaml.safe_dump(params))
    p = subprocess.run([sys.executable, "-m", "stages.quantize"], cwd=d, capture_output=True, text=True)
    assert p.returncode == 1 and p.stderr.strip().startswith(
        "error: quantize: audit.limit_bytes: 16,000 leaves no room for the model: train_gpt.py takes up to "), p.stderr
    params["audit"]["limit_bytes"] = 16_000_000
    (d / "params.yaml").write_text(yaml.safe_dump(params))
    picked = d / "artifacts/ema/model.safetensors"
    state, meta = load_tensors(picked)
    state["blocks.1.mlp.fc.weight"][3, 5] = float("nan")
    save_tensors(picked, state, meta)
    p = subprocess.run([sys.executable, "-m", "stages.quantize"], cwd=d, capture_output=True, text=True)
    assert p.returncode == 1 and p.stderr.strip() == (
        "error: quantize: artifacts/ema/model.safetensors: weight blocks.1.mlp.fc.weight is not finite (training "
        "diverged? lower train.*_lr and rerun train)"), p.stderr


def test_an_evidence_file_missing_a_key_is_one_line(tmp_path):
    import json
    import subprocess
    import sys

    import shutil

    from conftest import ROOT

    d = tmp_path / "run"

    shutil.copytree(ROOT / "pgolf", d / "pgolf")
    shutil.copytree(ROOT / "stages", d / "stages")
    shutil.copy(ROOT / "params.yaml", d / "params.yaml")
    for stage, content in (("train", {"train_seconds": 1.0}), ("calibrate", {"seconds": 0.1, "reads_training_data": True}),
                           ("eval", {"eval_seconds": 1.0, "val_bpb": 2.0})):
        (d / "artifacts" / stage).mkdir(parents=True)
        (d / "artifacts" / stage / "metrics.json").write_text(json.dumps(content))
    (d / "artifacts/train/run.json").write_text(json.dumps({"gpu": "cpu", "gpu_count": 0}))
    (d / "artifacts/eval/evidence.json").write_text(json.dumps({"gpu": "cpu", "gpu_count": 0, "targets": 1}))
    p = subprocess.run([sys.executable, "-m", "stages.audit"], cwd=d, capture_output=True, text=True)
    assert p.returncode == 1 and p.stderr.strip() == ("error: audit: artifacts/eval/evidence.json: no 'targets_expected' "
                                                      "(written by an older or interrupted stage; rerun it)"), p.stderr


def test_a_sigterm_during_pgolf_mirror_leaves_no_temporary_and_no_traceback(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from conftest import make_docs

    (tmp_path / "corpus").mkdir()
    for i, doc in enumerate(make_docs(300, seed=2) * 20):
        (tmp_path / "corpus" / f"{i:05d}.txt").write_text(doc)
    p = subprocess.Popen([sys.executable, "-m", "pgolf.cli", "mirror", str(tmp_path / "corpus"), "--out",
                          str(tmp_path / "m"), "--vocab", "300", "--val-docs", "5"], cwd=tmp_path,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not list(tmp_path.glob(".m.*.tmp")) and time.time() < deadline:
        time.sleep(0.01)
    assert list(tmp_path.glob(".m.*.tmp")), "the mirror's temporary never appeared"
    p.send_signal(signal.SIGTERM)
    time.sleep(0.05)
    p.send_signal(signal.SIGTERM)  # a second one, during the cleanup
    _, err = p.communicate(timeout=60)
    assert p.returncode == 1 and err.strip() == "error: pgolf mirror: interrupted", err
    assert not list(tmp_path.glob(".m.*")) and not (tmp_path / "m").exists()


@pytest.fixture
def signals_restored():
    """The handlers main() and stage.run install (and the ignoring an interrupt leaves) undone after the test."""
    import signal

    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


def _extension_init_interrupted():
    """What a signal landing inside a C extension's module init (sentencepiece's, torch's) raises."""
    try:
        raise KeyboardInterrupt
    except KeyboardInterrupt as e:
        raise ImportError("initialization failed") from e


def test_an_interrupt_that_surfaces_as_an_import_error_is_still_one_line_from_pgolf(monkeypatch, signals_restored):
    import pgolf.corpus
    from pgolf import cli

    monkeypatch.setattr(pgolf.corpus, "write_mirror", lambda *a, **k: _extension_init_interrupted())
    with pytest.raises(SystemExit) as exit_:
        cli.main(["mirror", "corpus.txt", "--out", "m"])
    assert exit_.value.code == "error: pgolf mirror: interrupted"


def test_an_interrupt_that_surfaces_as_an_import_error_is_still_one_line_from_a_stage(tmp_path, monkeypatch, capsys,
                                                                                       signals_restored):
    from pgolf import paths, stage

    monkeypatch.setattr(paths, "ARTIFACTS", tmp_path / "artifacts")
    with pytest.raises(SystemExit) as exit_:
        stage.run(_extension_init_interrupted, "train")
    assert exit_.value.code == 130 and capsys.readouterr().err.strip() == "error: train: interrupted"


def test_an_unrelated_import_error_still_raises_from_a_stage(tmp_path, monkeypatch, signals_restored):
    from pgolf import paths, stage

    def broken():
        raise ImportError("no module named x")

    monkeypatch.setattr(paths, "ARTIFACTS", tmp_path / "artifacts")
    with pytest.raises(ImportError, match="no module named x"):
        stage.run(broken, "train")
