"""LQER: a quantized low-rank correction of a matrix's quantization error, on the tensors where it cuts the
Hessian-weighted error most."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .codes import LowRank, Quantized, weighted_error

if TYPE_CHECKING:
    from .problem import Problem


LQER_GROUP = 64  # B's quantization group (records: int4 per 64 values)


def quantize_lowrank(A: torch.Tensor, B: torch.Tensor) -> LowRank:
    """Records' asymmetric packing: A int2 in [-2, 1] with one scale (max|A| / 1.5), B int4 in [-8, 7] per group
    of LQER_GROUP values (per row when the row length does not divide)."""
    a_scale = (A.abs().amax().clamp_min(1e-10) / 1.5).half()
    a_codes = torch.clamp(torch.round(A / a_scale.float()), -2, 1).to(torch.int8)
    g = LQER_GROUP if B.numel() % LQER_GROUP == 0 else B.size(1)
    Bg = B.reshape(-1, g)
    b_scale = (Bg.abs().amax(dim=1).clamp_min(1e-10) / 7.5).half()
    b_codes = torch.clamp(torch.round(Bg / b_scale.float()[:, None]), -8, 7).to(torch.int8).reshape(B.shape)
    return LowRank(a_codes, a_scale.reshape(1), b_codes, b_scale)


def add_lqer(problem: Problem, quantized: dict[str, Quantized]) -> None:
    """LQER: for each tensor with a Hessian, the rank-r A·B closest to its quantization error E in the H-weighted
    norm (SVD of E·H^(1/2), B = Vᵀ·H^(−1/2)), quantized; kept on the quant.lqer_tensors tensors whose weighted
    error it cuts most (and only where it cuts it at all)."""
    cfg, gains = problem.cfg, []
    for t in problem.tensors:
        if t.H is None:
            continue
        q = quantized[t.name]
        E = t.W - q.dequantize()
        root, inv_root = problem.sqrt_hessian(t)
        U, S, Vh = torch.linalg.svd(E @ root, full_matrices=False)
        r = min(cfg.lqer_rank, S.numel())
        low = quantize_lowrank(U[:, :r] * S[:r], Vh[:r] @ inv_root)
        before = weighted_error(t.W, q.dequantize(), t.H)
        after = weighted_error(t.W, q.dequantize() + low.matrix(), t.H)
        if after < before:
            gains.append((before - after, t.name, low))
    for _, name, low in sorted(gains, key=lambda g: -g[0])[:cfg.lqer_tensors]:
        quantized[name].lqer = low
