"""Atomic writes: every artifact appears under its final name only once it is complete.

A write goes to `.<name>.<pid>.<random>.tmp` beside its target and is renamed when complete. A killed
writer leaves its temporary behind; the next write of the same target removes those of dead processes.
Nothing is written through a symbolic link, and a folder is only ever replaced by a write of the same kind
(its marker file says which): pgolf never removes what it did not create.
"""

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .errors import PgolfError

MARKER = ".pgolf-output"  # in each folder atomic_dir writes: the kind of output it holds


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(path: Path) -> None:
    """Temporaries of `path` left by writers that no longer run."""
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        pid = tmp.name[len(path.name) + 2:].split(".")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink(missing_ok=True)


def refuse_links(path: str | os.PathLike) -> None:
    """One line if `path`, or a folder it lies in below the working directory (or below `artifacts/`), is a
    symbolic link: a write through it would land outside the repository or truncate the file it points to."""
    path, cwd = Path(os.path.abspath(path)), Path.cwd()
    chain = [p for p in (path, *path.parents) if p.is_relative_to(cwd) and p not in (cwd, cwd / "artifacts")]
    for p in chain if path.is_relative_to(cwd) else [path]:
        if p.is_symlink():
            raise PgolfError(f"{p}: is a symbolic link; pgolf writes no output through a link (remove the link)")


def check_replaceable(path: str | os.PathLike, kind: str) -> None:
    """One line unless `path` is missing, an empty folder, or a folder an earlier write of `kind` made."""
    path = Path(path)
    refuse_links(path)
    if not path.exists():
        return
    if Path.cwd().resolve().is_relative_to(path.resolve()):
        raise PgolfError(f"{path}: is the working directory or a folder above it; name a new folder")
    if not path.is_dir():
        raise PgolfError(f"{path}: is a file; pgolf writes its {kind} output as a folder there (name a new folder)")
    marker = path / MARKER
    if marker.is_file() and not marker.is_symlink():
        with marker.open("rb") as f:
            if f.read(256).strip() == kind.encode():
                return
    if any(path.iterdir()):
        raise PgolfError(f"{path}: a folder pgolf did not write as {kind} output (no {MARKER} marker of that kind); "
                         "pgolf replaces only its own output: name a new or empty folder")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling path; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    refuse_links(path)
    if path.is_dir():
        raise PgolfError(f"{path}: is a folder; pgolf writes a file there (remove the folder)")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        tmp.chmod(0o644)  # mkstemp makes 0600 files
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, kind: str) -> Iterator[Path]:
    """Yield a temporary sibling folder; it replaces `path` only if the block succeeds. The folder is marked as
    `kind` output, and only a missing or empty folder or an earlier `kind` output is replaced: anything else
    at `path` is refused in one line, before the block runs and again before the swap."""
    path = Path(path)
    check_replaceable(path, kind)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        (tmp / MARKER).write_text(kind + "\n")
        tmp.chmod(0o755)
        check_replaceable(path, kind)
        if path.exists():  # moved aside first: the swap never leaves a half-removed folder under the name
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent))
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: str | os.PathLike) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise PgolfError(f"{path}: file not found (run the stage that writes it first)") from None
    except json.JSONDecodeError as e:
        raise PgolfError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except UnicodeDecodeError:
        raise PgolfError(f"{path}: not valid JSON (not UTF-8 text)") from None


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()
