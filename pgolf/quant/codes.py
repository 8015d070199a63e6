"""What quantization makes: per-row int-k codes with fp16 scales, an optional low-rank correction, and the
result of a whole model."""

from dataclasses import dataclass, field

import torch


GROUPS = ("attn", "mlp", "embed", "other")


def qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def group_of(name: str) -> str:
    if ".attn." in name:
        return "attn"
    if ".mlp." in name:
        return "mlp"
    if name.startswith(("tok_emb.", "lm_head.", "bigram.emb.", "ve_emb.")):
        return "embed"
    return "other"


@dataclass
class LowRank:
    """A quantized rank-r correction A @ B (records' asymmetric LQER): A int2 with one scale, B int4 per group."""
    a_codes: torch.Tensor  # int8 (rows, r) in [-2, 1]
    a_scale: torch.Tensor  # fp16 (1,)
    b_codes: torch.Tensor  # int8 (r, cols) in [-8, 7]
    b_scale: torch.Tensor  # fp16 (r * cols / group,)

    def matrix(self) -> torch.Tensor:
        a = self.a_codes.float() * self.a_scale.float()
        g = self.b_codes.numel() // self.b_scale.numel()
        b = (self.b_codes.float().reshape(-1, g) * self.b_scale.float()[:, None]).reshape(self.b_codes.shape)
        return a @ b


@dataclass
class Quantized:
    codes: torch.Tensor  # int8 (rows, cols), in [-qmax, qmax]
    scale: torch.Tensor  # fp16 (rows,)
    bits: int
    k: float | None = None  # the clip multiplier used, where the rule has one
    lqer: LowRank | None = None

    def dequantize(self) -> torch.Tensor:
        W = self.codes.float() * self.scale.float()[:, None]
        return W + self.lqer.matrix().to(W.device) if self.lqer is not None else W


@dataclass
class QuantResult:
    quantized: dict[str, Quantized]
    floats: dict[str, torch.Tensor]  # kept in fp16
    errors: dict[str, dict] = field(default_factory=dict)  # name -> {group, error, norm, weighted}

    def dequantized(self) -> dict[str, torch.Tensor]:
        return {**{n: q.dequantize() for n, q in self.quantized.items()},
                **{n: t.float() for n, t in self.floats.items()}}


def round_rows(W: torch.Tensor, clip: torch.Tensor, bits: int, k: float | None = None) -> Quantized:
    """Round each row to int-k with scale = clip / qmax (the fp16 scale is the one used)."""
    q = qmax(bits)
    scale = (clip / q).clamp_min(1e-8).half()
    codes = torch.clamp(torch.round(W / scale.float()[:, None]), -q, q).to(torch.int8)
    return Quantized(codes, scale, bits, k)


def weighted_error(W: torch.Tensor, Wq: torch.Tensor, H: torch.Tensor | None = None) -> float:
    """‖W − Ŵ‖² or, with a Hessian, tr((W − Ŵ) H (W − Ŵ)ᵀ)."""
    E = (W - Wq).double()
    return float(((E @ H.double()) * E).sum()) if H is not None else float(E.square().sum())
