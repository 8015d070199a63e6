"""GPTQ: rows rounded column by column, each column's error spread over the columns not yet rounded as the Hessian
of the layer's input says (its Cholesky factor, prepared once per Hessian)."""

from collections import defaultdict
from dataclasses import dataclass

import torch

from ..errors import PgolfError
from .codes import Quantized, qmax


@dataclass
class PreparedHessian:
    perm: torch.Tensor  # column order (act order: largest diag(H) first)
    dead: torch.Tensor  # columns no input ever reached
    hinv: torch.Tensor  # upper Cholesky factor of H⁻¹, permuted and damped


def prepare_hessian(H: torch.Tensor, damp: float, act_order: bool, where: str) -> PreparedHessian:
    H = H.float().clone()
    if not torch.isfinite(H).all():
        raise PgolfError(f"Hessian for {where} is not finite (damaged calibration file? rerun calibrate)")
    cols = H.size(0)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(cols, device=H.device)
    H = H[perm][:, perm]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(cols, device=H.device)
    try:
        L = torch.linalg.cholesky(H)
        hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    except torch.linalg.LinAlgError:
        raise PgolfError(f"Hessian for {where} is not positive definite even with damping {damp}; "
                         f"raise quant.damp") from None
    return PreparedHessian(perm, dead, hinv)


def gptq_batch(W: torch.Tensor, hinv: torch.Tensor, scale: torch.Tensor, qm: torch.Tensor,
               block_size: int) -> torch.Tensor:
    """GPTQ of a batch (T, rows, cols) with fixed per-row scales and code limits (T, rows): quantize column by
    column, pushing each column's error onto the columns not yet quantized through the Cholesky factor of H⁻¹
    (lazy block updates). W and hinv are already in act order; returns int8 codes in that order."""
    W = W.clone()
    cols = W.size(2)
    codes = torch.empty_like(W, dtype=torch.int8)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, :, i1:i2].clone()
        err1 = torch.zeros_like(W1)
        h1 = hinv[:, i1:i2, i1:i2]
        for i in range(i2 - i1):
            w = W1[:, :, i]
            c = torch.minimum(torch.maximum(torch.round(w / scale), -qm), qm)
            codes[:, :, i1 + i] = c.to(torch.int8)
            err = (w - c * scale) / h1[:, i, i].unsqueeze(1)
            W1[:, :, i:] -= err.unsqueeze(2) * h1[:, i, i:].unsqueeze(1)
            err1[:, :, i] = err
        W[:, :, i2:] -= torch.bmm(err1, hinv[:, i1:i2, i2:])
    return codes


def gptq(W: torch.Tensor, H: torch.Tensor, bits: int, clip: torch.Tensor, damp: float = 0.01,
         block_size: int = 128, act_order: bool = True) -> Quantized:
    """GPTQ of one matrix (the batched path with a batch of one)."""
    return gptq_many([W], [prepare_hessian(H, damp, act_order, "W")], [clip], [bits], block_size)[0]


def gptq_many(Ws: list[torch.Tensor], prepared: list[PreparedHessian], clips: list[torch.Tensor],
              bits: list[int], block_size: int, ks: list[float | None] | None = None) -> list[Quantized]:
    """GPTQ of many matrices. GPTQ treats rows independently given H, so matrices sharing a Hessian (q, k, v)
    are stacked into one; stacked matrices with the same column count then run as one batch, the shorter ones
    padded with zero rows (the column loop launches a few kernels per column: one loop for all is the saving)."""
    ks = ks or [None] * len(Ws)
    sharing: dict[int, list[int]] = defaultdict(list)
    for i, p in enumerate(prepared):
        sharing[id(p)].append(i)
    by_cols: dict[int, list] = defaultdict(list)
    for idx in sharing.values():
        p = prepared[idx[0]]
        W = torch.cat([Ws[i].float() for i in idx])[:, p.perm]
        W[:, p.dead[p.perm]] = 0
        scale = torch.cat([(clips[i] / qmax(bits[i])).clamp_min(1e-8).half().float() for i in idx])
        qm = torch.cat([torch.full((Ws[i].size(0),), float(qmax(bits[i])), device=W.device) for i in idx])
        by_cols[W.size(1)].append((idx, W, p, scale, qm))
    out: list[Quantized] = [None] * len(Ws)  # type: ignore[list-item]
    for batch in by_cols.values():
        rows = max(W.size(0) for _, W, _, _, _ in batch)

        def pad(t: torch.Tensor, value: float) -> torch.Tensor:  # to `rows` rows
            return torch.cat([t, t.new_full((rows - t.size(0), *t.shape[1:]), value)])

        codes = gptq_batch(torch.stack([pad(W, 0.0) for _, W, _, _, _ in batch]),
                           torch.stack([p.hinv for _, _, p, _, _ in batch]),
                           torch.stack([pad(s, 1.0) for _, _, _, s, _ in batch]),
                           torch.stack([pad(q, 0.0) for _, _, _, _, q in batch]), block_size)
        for c, (idx, _, p, scale, _) in zip(codes, batch):
            c = c[:, torch.argsort(p.perm)]
            start = 0
            for i in idx:
                n = Ws[i].size(0)
                out[i] = Quantized(c[start:start + n].contiguous(), scale[start:start + n].half(), bits[i], ks[i])
                start += n
    return out
