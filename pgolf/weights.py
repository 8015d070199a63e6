"""A model from its artifacts: the trained weights (raw, EMA or SWA) or the picked weights (`pack.load_model`
rebuilds one from the blob through `build_model` too).

Every artifact carries the model config and the recurrent passes that were running when training ended,
so the model rebuilt here is the network that was trained.
"""

from dataclasses import asdict
from pathlib import Path

import torch

from .checkpoint import load_tensors, save_tensors
from .config import ModelConfig, build
from .errors import PgolfError
from .model import GPT
from .registry import Registry

SOURCES: Registry = Registry("ema.source")  # which trained weights quantization starts from -> their file
SOURCES.add("ema", "ema.safetensors")
SOURCES.add("swa", "swa.safetensors")
SOURCES.add("raw", "raw.safetensors")


def model_meta(cfg: ModelConfig, passes: int) -> dict:
    return {"config": asdict(cfg), "passes": passes}


def save_model(path: str | Path, state: dict[str, torch.Tensor], meta: dict) -> None:
    save_tensors(path, state, meta)


def build_model(meta: dict, state: dict[str, torch.Tensor], device: torch.device | str, where: str) -> GPT:
    if "config" not in meta:
        raise PgolfError(f"{where}: no model config in its metadata")
    model = GPT(build(ModelConfig, meta["config"], "model"))
    model.passes = int(meta.get("passes", model.max_passes))
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # a tensor of the wrong shape
        raise PgolfError(f"{where}: weights do not match the model config ({str(e).splitlines()[-1].strip()})") from None
    if missing or unexpected:
        raise PgolfError(f"{where}: weights do not match the model config (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    return model.to(device)


def picked_path(source: str, trained: Path) -> Path:
    path = trained / SOURCES.lookup(source, "ema.source")
    if not path.exists() and source == "swa":
        raise PgolfError(f"{path}: no SWA weights; set train.swa: true or ema.source: ema")
    return path


def load_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[GPT, dict]:
    """A GPT from a safetensors file that carries its own model meta."""
    state, meta = load_tensors(path)
    return build_model(meta, state, device, str(path)), meta
