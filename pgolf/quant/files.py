"""The quantize stage's inputs (the picked weights and the Hessians) and its output, the quantized-tensor file."""

from pathlib import Path

import torch

from .. import paths
from ..checkpoint import load_tensors, save_tensors
from ..errors import PgolfError
from .codes import LowRank, Quantized, QuantResult


def save_quantized(path: str | Path, result: QuantResult, meta: dict) -> None:
    """Codes, scales and LQER factors as safetensors (no pickle); bits and k in the metadata."""
    tensors: dict[str, torch.Tensor] = {}
    for name, q in result.quantized.items():
        tensors[f"{name}.codes"], tensors[f"{name}.scale"] = q.codes, q.scale
        if q.lqer is not None:
            low = q.lqer
            tensors |= {f"{name}.lqer_a": low.a_codes, f"{name}.lqer_a_scale": low.a_scale,
                        f"{name}.lqer_b": low.b_codes, f"{name}.lqer_b_scale": low.b_scale}
    tensors |= {f"{name}.fp16": t for name, t in result.floats.items()}
    quant = {name: {"bits": q.bits, "k": q.k} for name, q in result.quantized.items()}
    save_tensors(path, tensors, {**meta, "quantized": quant})


def load_quantized(path: str | Path) -> tuple[QuantResult, dict]:
    tensors, meta = load_tensors(path)
    quantized = {}
    try:
        for name, info in meta["quantized"].items():
            lqer = None
            if f"{name}.lqer_a" in tensors:
                lqer = LowRank(*(tensors[f"{name}.{k}"] for k in ("lqer_a", "lqer_a_scale", "lqer_b", "lqer_b_scale")))
            quantized[name] = Quantized(tensors[f"{name}.codes"], tensors[f"{name}.scale"], info["bits"], info["k"], lqer)
    except KeyError as e:
        raise PgolfError(f"{path}: incomplete quantized-tensor file (no {e.args[0]})") from None
    floats = {k.removesuffix(".fp16"): v for k, v in tensors.items() if k.endswith(".fp16")}
    return QuantResult(quantized, floats), {k: v for k, v in meta.items() if k != "quantized"}


def load_inputs(device: torch.device) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, str], dict]:
    """The picked weights, the Hessians, which Hessian each weight uses, and the model meta the blob carries."""
    state, meta = load_tensors(paths.PICKED, device)
    broken = next((n for n, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()), None)
    if broken is not None:  # before the Hessians, which such weights make non-finite too
        raise PgolfError(f"{paths.PICKED}: weight {broken} is not finite (training diverged? lower train.*_lr and "
                         f"rerun train)")
    hessians, hmeta = load_tensors(paths.HESSIANS, device)
    return state, hessians, hmeta.get("shared", {}), {k: meta[k] for k in ("config", "passes")}
