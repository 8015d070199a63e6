"""Pickle-free tensor files: safetensors with a JSON metadata entry."""

import json
import os
from pathlib import Path

import torch

from .errors import PgolfError
from .io import atomic_path, refuse_links

META_KEY = "pgolf"


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict | None = None) -> None:
    from safetensors.torch import save_file

    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(flat, str(tmp), metadata={META_KEY: json.dumps(meta or {}, sort_keys=True)})


def load_tensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise PgolfError(f"{path}: not found (run the stage that writes it first)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get(META_KEY, "{}"))
        return load_file(str(path), device=str(device)), meta
    except (SafetensorError, json.JSONDecodeError, OSError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise PgolfError(f"{path}: not a valid safetensors file ({reason})") from None


_held_locks: list = []  # open lock files: a lock lives as long as the process holds its file


def lock(folder: str | os.PathLike, what: str) -> None:
    """Take the folder's lock for this process's lifetime, or fail with one line if another process has it."""
    import fcntl

    folder = Path(folder)
    refuse_links(folder / "lock")
    folder.mkdir(parents=True, exist_ok=True)
    f = open(folder / "lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise PgolfError(f"{folder}: {what} {holder} is using it; wait for it to finish or stop it") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()}")
    f.flush()
    _held_locks.append(f)
