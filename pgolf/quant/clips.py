"""Clip rules: a matrix -> each row's clip (the row's scale is clip / qmax)."""

import functools

import torch

from ..config import QuantConfig
from ..registry import Registry
from .codes import qmax, round_rows


CLIP_RULES: Registry = Registry("quant.clip_rule")  # (W, bits, k, cfg) -> per-row clip


@CLIP_RULES.register("rtn")
def clip_absmax(W: torch.Tensor, bits: int, k: float, cfg: QuantConfig) -> torch.Tensor:
    return W.abs().amax(dim=1)


@CLIP_RULES.register("clip_search")
def clip_search(W: torch.Tensor, bits: int, k: float, cfg: QuantConfig) -> torch.Tensor:
    """GPTQ-lite (parameter-golf PR #379): per row, the percentile of |w| whose rounding leaves the least squared error."""
    A = W.abs()
    best_clip, best_err = None, None
    for p in cfg.clip_percentiles:
        clip = A.amax(dim=1) if p >= 1.0 else torch.quantile(A, p, dim=1)
        err = (W - round_rows(W, clip, bits).dequantize()).square().sum(dim=1)
        if best_err is None:
            best_clip, best_err = clip, err
        else:
            better = err < best_err
            best_clip, best_err = torch.where(better, clip, best_clip), torch.where(better, err, best_err)
    return best_clip


@CLIP_RULES.register("sdclip")
def clip_sdclip(W: torch.Tensor, bits: int, k: float, cfg: QuantConfig) -> torch.Tensor:
    """SDClip: clip = k · std(row), not capped at the row's absmax; codes beyond it clamp to ±qmax."""
    return k * W.std(dim=1)


@functools.cache
def least_error_k(bits: int) -> float:
    """The k whose k · std clip leaves the least squared rounding error on Gaussian rows (int6: about 3.3).
    Trained rows have heavier tails, so their best k is larger: a k · std clip tighter than this one costs
    error and bytes both, and the rate search never goes below it."""
    x = torch.linspace(-10, 10, 1 << 14, dtype=torch.float64)
    density = torch.exp(-x.square() / 2)
    ks = torch.arange(1.0, 8.0, 0.02, dtype=torch.float64)
    step = (ks / qmax(bits))[:, None]
    err = ((x - torch.clamp(torch.round(x / step), -qmax(bits), qmax(bits)) * step).square() * density).sum(dim=1)
    return round(float(ks[err.argmin()]), 2)
