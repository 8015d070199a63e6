"""Post-training quantization: symmetric int-k per-row codes, the seeds' clip rules and GPTQ.

A method maps (weight, bits, Hessian or None) to a `Quantized`; adding one is adding a function.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .config import QuantConfig
from .errors import PgolfError

GROUPS = ("attn", "mlp", "embed", "other")


@dataclass
class Quantized:
    codes: torch.Tensor  # int8 (rows, cols), in [-qmax, qmax]
    scale: torch.Tensor  # fp16 (rows,)
    bits: int

    def dequantize(self) -> torch.Tensor:
        return self.codes.float() * self.scale.float()[:, None]


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


def round_rows(W: torch.Tensor, clip: torch.Tensor, bits: int) -> Quantized:
    """Round each row to int-k with scale = clip / qmax (the fp16 scale is the one used)."""
    q = qmax(bits)
    scale = (clip / q).clamp_min(1e-8).half()
    codes = torch.clamp(torch.round(W / scale.float()[:, None]), -q, q).to(torch.int8)
    return Quantized(codes, scale, bits)


def weighted_error(W: torch.Tensor, Wq: torch.Tensor, H: torch.Tensor | None = None) -> float:
    """‖W − Ŵ‖² or, with a Hessian, tr((W − Ŵ) H (W − Ŵ)ᵀ)."""
    E = (W - Wq).double()
    return float(((E @ H.double()) * E).sum()) if H is not None else float(E.square().sum())


# ----------------------------------------------------------------------------- clip rules: W -> per-row clip

def clip_absmax(W: torch.Tensor, bits: int, cfg: QuantConfig, group: str) -> torch.Tensor:
    return W.abs().amax(dim=1)


def clip_search(W: torch.Tensor, bits: int, cfg: QuantConfig, group: str) -> torch.Tensor:
    """GPTQ-lite: per row, the percentile of |w| whose rounding leaves the least squared error."""
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


def clip_sdclip(W: torch.Tensor, bits: int, cfg: QuantConfig, group: str) -> torch.Tensor:
    """clip = k · std(row), k per tensor group, never beyond the row's absmax."""
    k = getattr(cfg.sdclip_k, group)
    return torch.minimum(k * W.std(dim=1), W.abs().amax(dim=1))


CLIP_RULES: dict[str, Callable] = {"rtn": clip_absmax, "clip_search": clip_search, "sdclip": clip_sdclip}


# ----------------------------------------------------------------------------- GPTQ

def gptq(W: torch.Tensor, H: torch.Tensor, bits: int, clip: torch.Tensor, damp: float = 0.01,
         block_size: int = 128, act_order: bool = True) -> Quantized:
    """Full-Hessian GPTQ with fixed per-row scales: quantize column by column, pushing each column's
    error onto the columns not yet quantized through the Cholesky factor of H⁻¹ (lazy block updates)."""
    W = W.clone().float()
    H = H.clone().float()
    cols = W.size(1)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(cols, device=W.device)
    W, H = W[:, perm], H[perm][:, perm]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(cols, device=W.device)
    try:
        L = torch.linalg.cholesky(H)
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    except torch.linalg.LinAlgError:
        raise PgolfError(f"Hessian is not positive definite even with damping {damp}; raise quant.damp") from None
    q = qmax(bits)
    scale = (clip / q).clamp_min(1e-8).half().float()
    codes = torch.zeros_like(W, dtype=torch.int8)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            w = W1[:, i]
            c = torch.clamp(torch.round(w / scale), -q, q)
            codes[:, i1 + i] = c.to(torch.int8)
            err = (w - c * scale) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    inverse = torch.argsort(perm)
    return Quantized(codes[:, inverse].contiguous(), scale.half(), bits)


# ----------------------------------------------------------------------------- whole models

@dataclass
class QuantResult:
    quantized: dict[str, Quantized]
    floats: dict[str, torch.Tensor]  # kept in fp16
    errors: dict[str, dict]  # name -> {group, error, norm, weighted}

    def dequantized(self) -> dict[str, torch.Tensor]:
        return {**{n: q.dequantize() for n, q in self.quantized.items()},
                **{n: t.float() for n, t in self.floats.items()}}


def check_bits(cfg: QuantConfig) -> dict[str, int]:
    bits = {}
    for g in GROUPS:
        b = getattr(cfg.bits, g)
        if b != int(b) or not 2 <= b <= 8:
            raise PgolfError(f"quant.bits.{g}: {b}; expected an integer from 2 to 8")
        bits[g] = int(b)
    return bits


def hessian_for(name: str, hessians: dict[str, torch.Tensor], shared: dict[str, str], cols: int) -> torch.Tensor | None:
    if name not in shared:
        return None
    H = hessians.get(shared[name])
    if H is None:
        raise PgolfError(f"Hessian '{shared[name]}' for {name} is missing from the calibration file")
    if tuple(H.shape) != (cols, cols):
        raise PgolfError(f"Hessian for {name} has shape {tuple(H.shape)}, expected ({cols}, {cols})")
    return H


def adaptive_multipliers(state: dict[str, torch.Tensor], names: list[str], hessians, shared, cfg: QuantConfig) -> dict[str, float]:
    """Seed 002: per-tensor clip multiplier k_t = k_group · (1 + α·z_t), z_t the standardized log of
    sensitivity mean(diag H) × mean(row variance); more sensitive tensors get a wider clip."""
    logs = {}
    for n in names:
        W = state[n].float()
        H = hessian_for(n, hessians, shared, W.size(1))
        hdiag = float(torch.diag(H).mean()) if H is not None else 1.0
        logs[n] = math.log(max(hdiag * float(W.var(dim=1).mean()), 1e-30))
    vals = torch.tensor(list(logs.values()), dtype=torch.float64)
    mu, sd = float(vals.mean()), float(vals.std()) if len(vals) > 1 else 1.0
    return {n: getattr(cfg.sdclip_k, group_of(n)) * max(0.25, 1 + cfg.adaptive_alpha * (v - mu) / max(sd, 1e-9))
            for n, v in logs.items()}


def quantize_state(state: dict[str, torch.Tensor], hessians: dict[str, torch.Tensor], shared: dict[str, str],
                   cfg: QuantConfig, clip_offset: float = 0.0, log: Callable[[str], None] | None = None) -> QuantResult:
    """Quantize every large 2-D tensor with `cfg.method`; small and 1-D tensors stay fp16.

    `shared` maps weight names to Hessian keys; every name in it must have its Hessian (GPTQ needs
    it); tensors outside it (embedding tables that are not the head) are quantized by the clip rule.
    """
    bits = check_bits(cfg)
    if cfg.method not in ("rtn", "clip_search", "sdclip", "gptq", "adaptive_clip"):
        raise PgolfError(f"quant.method: {cfg.method!r}; expected rtn, clip_search, sdclip, gptq or adaptive_clip")
    if cfg.clip_rule not in CLIP_RULES:
        raise PgolfError(f"quant.clip_rule: {cfg.clip_rule!r}; expected {', '.join(CLIP_RULES)}")
    if cfg.method == "gptq" and not shared:
        raise PgolfError("quant.method=gptq needs Hessians: the calibration file lists none")
    big = [n for n, t in state.items() if t.ndim == 2 and t.numel() >= cfg.keep_float_numel]
    multipliers = adaptive_multipliers(state, big, hessians, shared, cfg) if cfg.method == "adaptive_clip" else {}
    result = QuantResult({}, {n: t.half() for n, t in state.items() if n not in big}, {})
    for name in big:
        W = state[name].float()
        group = group_of(name)
        b = bits[group]
        H = hessian_for(name, hessians, shared, W.size(1))
        if cfg.method == "adaptive_clip":
            k = max(multipliers[name] + clip_offset, 0.5)
            q = round_rows(W, torch.minimum(k * W.std(dim=1), W.abs().amax(dim=1)), b)
        elif cfg.method == "gptq" and H is not None:
            clip = CLIP_RULES[cfg.clip_rule](W, b, cfg, group)
            q = gptq(W, H, b, clip, cfg.damp, cfg.block_size, cfg.act_order)
        else:
            rule = cfg.clip_rule if cfg.method == "gptq" else cfg.method  # rtn, clip_search, sdclip name their rule
            q = round_rows(W, CLIP_RULES[rule](W, b, cfg, group), b)
        result.quantized[name] = q
        Wq = q.dequantize()
        result.errors[name] = {"group": group, "bits": b, "error": weighted_error(W, Wq, H),
                               "norm": weighted_error(W, torch.zeros_like(W), H), "weighted": H is not None}
        if log:
            log(f"{name}: {cfg.method} int{b} rel err {result.errors[name]['error'] / max(result.errors[name]['norm'], 1e-30):.3e}")
    return result


def prune_candidates(result: QuantResult, hessians, shared) -> tuple[torch.Tensor, list[tuple[str, int]]]:
    """Cost of zeroing each ±1 code: scale² × H_diag[col] (scale² where there is no H), cheapest first."""
    costs, refs = [], []
    for name, q in result.quantized.items():
        mask = q.codes.abs() == 1
        rows, cols = mask.nonzero(as_tuple=True)
        c = q.scale.float()[rows].square()
        if name in shared:
            c = c * torch.diag(hessians[shared[name]]).float().to(c.device)[cols]
        costs.append(c)
        refs.append((name, rows * q.codes.size(1) + cols))
    cost = torch.cat(costs) if costs else torch.zeros(0)
    owner = torch.cat([torch.full((len(r),), i, dtype=torch.long) for i, (_, r) in enumerate(refs)]) if refs else torch.zeros(0, dtype=torch.long)
    flat = torch.cat([r for _, r in refs]) if refs else torch.zeros(0, dtype=torch.long)
    order = torch.sort(cost, stable=True).indices
    return torch.stack([owner[order], flat[order]]), [n for n, _ in refs]


def apply_pruning(result: QuantResult, candidates: torch.Tensor, names: list[str], n: int) -> QuantResult:
    """A copy of `result` with the n cheapest ±1 codes set to 0."""
    quantized = {k: Quantized(q.codes.clone(), q.scale, q.bits) for k, q in result.quantized.items()}
    owner, flat = candidates[:, :n]
    for i, name in enumerate(names):
        idx = flat[owner == i]
        if idx.numel():
            quantized[name].codes.view(-1)[idx] = 0
    return QuantResult(quantized, result.floats, result.errors)


def search_target(size_of: Callable[[int | float], int], lo: float, hi: float, target: int, integer: bool,
                  what: str) -> tuple[float, int]:
    """Binary search the smallest-change setting x in [lo, hi] with size_of(x) <= target.
    size_of must fall as x rises. Returns (x, size)."""
    size_hi = size_of(hi)
    if size_hi > target:
        raise PgolfError(f"quant.target_bytes={target:,} is unreachable by {what}: the smallest it reaches is "
                         f"{size_hi:,} bytes ({size_hi - target:,} over)")
    size_lo = size_of(lo)
    if size_lo <= target:
        return lo, size_lo
    best = (hi, size_hi)
    for _ in range(40):
        if (hi - lo) <= (1 if integer else 1e-3):
            break
        mid = (lo + hi) // 2 if integer else (lo + hi) / 2
        s = size_of(mid)
        if s <= target:
            hi, best = mid, (mid, s)
        else:
            lo = mid
    return best
