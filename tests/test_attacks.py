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
