"""Pickle-free tensor files: safetensors with a JSON metadata entry."""

import json
import os
from pathlib import Path

import torch

from .errors import PgolfError
from .io import atomic_path

META_KEY = "pgolf"


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict | None = None) -> None:
    from safetensors.torch import save_file

    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(flat, str(tmp), metadata={META_KEY: json.dumps(meta or {}, sort_keys=True)})


def load_tensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise PgolfError(f"{path}: not found (run the stage that writes it first)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get(META_KEY, "{}"))
        return load_file(str(path), device=str(device)), meta
    except (SafetensorError, json.JSONDecodeError, OSError) as e:
        raise PgolfError(f"{path}: not a valid safetensors file ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
