"""Post-training quantization: symmetric int-k per-row codes, the records' clip rules, GPTQ, LQER, and
fitting the compressed model to a byte target.

Rate and distortion meet in the clip. A row's scale is clip / qmax; a wider clip puts the bulk of the
weights on fewer codes (fewer bytes after entropy coding) at the cost of coarser steps. SDClip sets
clip = k * std(row) with no cap at the row's absmax, so k is a rate knob; GPTQ spends the rounding error
where the Hessian says it costs least; adaptive clip (parameter-golf PR #1962) gives each tensor its own k from
its sensitivity; LQER adds a quantized low-rank correction of the error where it cuts the loss most.
"""

import functools
import math
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import paths
from .checkpoint import load_tensors, save_tensors
from .config import QuantConfig
from .errors import PgolfError
from .registry import Registry

GROUPS = ("attn", "mlp", "embed", "other")
OFFSET_RANGE = (0.0, 2.0)  # log2 clip multiplier searched to meet a byte target: the configured clip .. 4x
RATE_OFFSET_RANGE = (-2.0, 2.0)  # where k · std(row) sets the clip, k is a rate knob: the budget is met both ways
ADAPTIVE_GROUPS = ("attn", "mlp", "other")  # PR #1962 replaces the matrix clip sigmas; embeddings keep their k
LQER_GROUP = 64  # B's quantization group (records: int4 per 64 values)


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


# ----------------------------------------------------------------------------- clip rules: W -> per-row clip

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


# ----------------------------------------------------------------------------- GPTQ

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


# ----------------------------------------------------------------------------- one model's quantization problem

@dataclass
class Tensor:
    name: str
    W: torch.Tensor  # fp32
    group: str
    bits: int
    H: torch.Tensor | None  # its input Hessian, if calibration saw its input
    hessian: PreparedHessian | None


class Problem:
    """A model's weights and Hessians, prepared once (Cholesky factors, H^(1/2) for LQER) so that the byte-target
    search can quantize it at many clip offsets."""

    def __init__(self, state: dict[str, torch.Tensor], hessians: dict[str, torch.Tensor], shared: dict[str, str],
                 cfg: QuantConfig):
        self.cfg = cfg
        big = [n for n, t in state.items() if t.ndim == 2 and t.numel() >= cfg.keep_float_numel]
        self.floats = {n: t.half() for n, t in state.items() if n not in big}
        prepared: dict[str, PreparedHessian] = {}
        self.tensors: list[Tensor] = []
        for name in big:
            W = state[name].float()
            H = hessian_for(name, hessians, shared, W.size(1))
            p = None
            if H is not None:
                key = shared[name]
                if key not in prepared:
                    prepared[key] = prepare_hessian(H, cfg.damp, cfg.act_order, name)
                p = prepared[key]
            group = group_of(name)
            self.tensors.append(Tensor(name, W, group, int(getattr(cfg.bits, group)), H, p))
        self._sqrt: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def group_k(self, t: Tensor) -> float:
        return float(getattr(self.cfg.sdclip_k, t.group))

    def quantize(self, offset: float = 0.0) -> QuantResult:
        """Every large 2-D tensor by the configured method with its clips widened by 2**offset, LQER and errors."""
        return self.finish(self.codes(offset))

    def codes(self, offset: float) -> QuantResult:
        """The codes alone: what a size search needs (LQER does not change them)."""
        return QuantResult(METHODS[self.cfg.method](self, offset), dict(self.floats))

    def finish(self, result: QuantResult) -> QuantResult:
        """A copy of `codes(...)`'s result with the LQER factors (quant.lqer_rank > 0) and each tensor's error."""
        quantized = {n: Quantized(q.codes, q.scale, q.bits, q.k) for n, q in result.quantized.items()}
        if self.cfg.lqer_rank:
            add_lqer(self, quantized)
        errors = {}
        for t in self.tensors:
            Wq = quantized[t.name].dequantize()
            errors[t.name] = {"group": t.group, "bits": t.bits, "error": weighted_error(t.W, Wq, t.H),
                              "norm": weighted_error(t.W, torch.zeros_like(t.W), t.H), "weighted": t.H is not None}
        return QuantResult(quantized, result.floats, errors)

    def sqrt_hessian(self, t: Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """H^(1/2) and H^(-1/2) (damped like GPTQ's), for the H-weighted low-rank fit."""
        key = id(t.hessian)
        if key not in self._sqrt:
            H = t.H.float()
            evals, evecs = torch.linalg.eigh(H + self.cfg.damp * H.diagonal().mean() * torch.eye(H.size(0), device=H.device))
            root = evals.clamp_min(1e-12).sqrt()
            self._sqrt[key] = ((evecs * root) @ evecs.T, (evecs / root) @ evecs.T)
        return self._sqrt[key]


def hessian_for(name: str, hessians: dict[str, torch.Tensor], shared: dict[str, str], cols: int) -> torch.Tensor | None:
    if name not in shared:
        return None
    H = hessians.get(shared[name])
    if H is None:
        raise PgolfError(f"Hessian '{shared[name]}' for {name} is missing from the calibration file")
    if tuple(H.shape) != (cols, cols):
        raise PgolfError(f"Hessian for {name} has shape {tuple(H.shape)}, expected ({cols}, {cols})")
    return H


def quantize_with(problem: Problem, rule: str, ks: dict[str, float], offset: float, use_gptq: bool) -> dict[str, Quantized]:
    """Clips from `rule` at each tensor's k, widened by 2**offset; GPTQ where a Hessian exists and asked for,
    round-to-nearest elsewhere."""
    cfg, scale = problem.cfg, 2.0 ** offset
    if rule == "sdclip":  # the offset moves k itself, and not below the least-error clip
        k_used = {t.name: max(ks[t.name] * scale, min(ks[t.name], least_error_k(t.bits))) for t in problem.tensors}
        clips = {t.name: clip_sdclip(t.W, t.bits, k_used[t.name], cfg) for t in problem.tensors}
    else:
        k_used = {t.name: None for t in problem.tensors}
        clips = {t.name: CLIP_RULES[rule](t.W, t.bits, ks[t.name], cfg) * scale for t in problem.tensors}
    out = {t.name: round_rows(t.W, clips[t.name], t.bits, k_used[t.name])
           for t in problem.tensors if not (use_gptq and t.hessian is not None)}
    todo = [t for t in problem.tensors if use_gptq and t.hessian is not None]
    if todo:
        done = gptq_many([t.W for t in todo], [t.hessian for t in todo], [clips[t.name] for t in todo],
                         [t.bits for t in todo], cfg.block_size, [k_used[t.name] for t in todo])
        out |= {t.name: q for t, q in zip(todo, done)}
    return out


def group_ks(problem: Problem) -> dict[str, float]:
    return {t.name: problem.group_k(t) for t in problem.tensors}


METHODS: Registry = Registry("quant.method")  # (problem, offset) -> {name: Quantized}


@METHODS.register("rtn")
def rtn(problem: Problem, offset: float) -> dict[str, Quantized]:
    """Round to nearest with the row's absmax as its clip."""
    return quantize_with(problem, "rtn", group_ks(problem), offset, use_gptq=False)


@METHODS.register("clip_search")
def clip_search_rtn(problem: Problem, offset: float) -> dict[str, Quantized]:
    return quantize_with(problem, "clip_search", group_ks(problem), offset, use_gptq=False)


@METHODS.register("sdclip")
def sdclip_rtn(problem: Problem, offset: float) -> dict[str, Quantized]:
    return quantize_with(problem, "sdclip", group_ks(problem), offset, use_gptq=False)


@METHODS.register("gptq")
def gptq_method(problem: Problem, offset: float) -> dict[str, Quantized]:
    """Full-Hessian GPTQ with per-row scales from quant.clip_rule."""
    return quantize_with(problem, problem.cfg.clip_rule, group_ks(problem), offset, use_gptq=True)


@METHODS.register("adaptive_clip")
def adaptive_clip(problem: Problem, offset: float) -> dict[str, Quantized]:
    """GPTQ with SDClip scales whose k is set per tensor from its sensitivity (PR #1962)."""
    return quantize_with(problem, "sdclip", adaptive_ks(problem), offset, use_gptq=True)


def adaptive_ks(problem: Problem) -> dict[str, float]:
    """Adaptive Hessian-sensitivity clip (PR #1962): sensitivity s_t = mean(diag H_t) · mean(row variance of W_t);
    with z_t its standardized log over the matrices that have a Hessian, k_t = k_group · 2^(−α z_t): tensors that
    need precision get a tighter clip. Embeddings keep their group's k, as PR #1962 leaves EMBED_CLIP_SIGMAS."""
    logs = {t.name: math.log(max(float(t.H.diagonal().mean()) * float(t.W.var(dim=1).mean()), 1e-30))
            for t in problem.tensors if t.H is not None and t.group in ADAPTIVE_GROUPS}
    ks = group_ks(problem)
    if len(logs) < 2:
        return ks
    vals = torch.tensor(list(logs.values()), dtype=torch.float64)
    mu, sd = float(vals.mean()), max(float(vals.std()), 1e-9)
    return {n: k * 2.0 ** (-problem.cfg.adaptive_alpha * (logs[n] - mu) / sd) if n in logs else k for n, k in ks.items()}


# ----------------------------------------------------------------------------- LQER

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


# ----------------------------------------------------------------------------- pruning and the byte target

def prune_candidates(result: QuantResult, problem: Problem) -> tuple[torch.Tensor, list[str]]:
    """Cost of zeroing each ±1 code: scale² × H_diag[col] (scale² where there is no H), cheapest first."""
    costs, refs = [], []
    hdiag = {t.name: t.H.diagonal().float() for t in problem.tensors if t.H is not None}
    for name, q in result.quantized.items():
        rows, cols = (q.codes.abs() == 1).nonzero(as_tuple=True)
        c = q.scale.float()[rows].square()
        if name in hdiag:
            c = c * hdiag[name].to(c.device)[cols]
        costs.append(c)
        refs.append((name, rows * q.codes.size(1) + cols))
    cost = torch.cat(costs) if costs else torch.zeros(0)
    owner = torch.cat([torch.full((len(r),), i, dtype=torch.long, device=r.device) for i, (_, r) in enumerate(refs)]) \
        if refs else torch.zeros(0, dtype=torch.long)
    flat = torch.cat([r for _, r in refs]) if refs else torch.zeros(0, dtype=torch.long)
    order = torch.sort(cost, stable=True).indices
    return torch.stack([owner[order], flat[order]]), [n for n, _ in refs]


def apply_pruning(result: QuantResult, candidates: torch.Tensor, names: list[str], n: int) -> QuantResult:
    """A copy of `result` with the n cheapest ±1 codes set to 0."""
    quantized = {k: Quantized(q.codes.clone(), q.scale, q.bits, q.k, q.lqer) for k, q in result.quantized.items()}
    owner, flat = candidates[:, :n]
    for i, name in enumerate(names):
        idx = flat[owner == i]
        if idx.numel():
            quantized[name].codes.view(-1)[idx] = 0
    return QuantResult(quantized, result.floats, result.errors)


def smallest_fitting(size: Callable[[float], float], target: float, lo: float, hi: float, tol: float,
                     slack: float) -> float:
    """The smallest x in [lo, hi] with size(x) <= target, for size decreasing in x, to within tol in x or slack
    in size (hi if even size(hi) is over). Regula falsi with the Illinois step: a model's bytes are close to
    linear in the clip's log, so a handful of evaluations, each a full quantization, do it."""
    over_lo = size(lo) - target
    if over_lo <= 0:
        return lo
    over_hi = size(hi) - target
    kept = 0  # which end the last step kept: -1 lo, +1 hi
    while hi - lo > tol and over_hi < -slack:
        x = min(max(hi - over_hi * (hi - lo) / (over_hi - over_lo), lo + tol / 2), hi - tol / 2)
        over = size(x) - target
        if over <= 0:
            hi, over_hi = x, over
            over_lo, kept = (over_lo / 2 if kept == -1 else over_lo), -1
        else:
            lo, over_lo = x, over
            over_hi, kept = (over_hi / 2 if kept == 1 else over_hi), 1
    return hi


VERIFY_ROUNDS = 4  # estimate-guided searches, each checked with the real codec
ESTIMATE_SLACK = 0.01  # an estimate this far under the target is checked as it is, without a search
FIT_SLACK = 2e-4  # a search may stop this far (relative) under the target: 3.2 KB of 16 MB
UNDER_SLACK = 2e-3  # a checked result further under the target than this is searched once more, re-calibrated
REFINE_SPAN = 1 / 16  # a re-calibrated search starts from the last x and looks this share of the range beyond it
CALIBRATED_MISS = 3e-4  # a calibrated estimate's miss a refinement away (relative; the full-size stand-in: 0.03 %)


def _search(make: Callable[[float], QuantResult], finish: Callable[[QuantResult], QuantResult], lo: float, hi: float,
            tol: float, target: int, sizer, result: QuantResult, size: int | None, at: float,
            report: Callable[[float, int], None]) -> tuple[float | None, QuantResult, int | None, int, float]:
    """Search x in [lo, hi] on the sizer's estimate of make(x), check finish(make(x)) with the real codecs, and
    re-calibrate there and search again (at most VERIFY_ROUNDS searches) while it is over the target, or once if
    it is more than UNDER_SLACK under (the sample-based first estimate can be pessimistic); if the searches end
    over, the last result that fit is kept. A calibrated estimate still misses a little away from its
    calibration point, so a calibrated search aims CALIBRATED_MISS below the target (a miss that small then lands
    under, not over and checked again), and one after a calibrated check that came out over aims that miss (or
    twice the last margin) below, if larger. A re-calibrated search moves little: it brackets the answer between
    the last x and a point REFINE_SPAN of the range beyond it (the whole side if that is not enough), and every
    make(x) is kept for the later searches. `result` is make(at), and `size` its exact size (None: only estimated so far).
    report(x, size) follows each check. Returns (x, result, size, codec checks, seconds searching)."""
    x, checks, searched, margin, calibrated, predicted = None, 0, 0.0, 0.0, False, 0.0
    fitting: tuple | None = None  # (x, result, size) of the last checked result that fit
    made: dict[float, QuantResult] = {at: result}
    for _ in range(VERIFY_ROUNDS):
        if size is not None:
            if size <= target:
                if fitting is not None or x is None or x == lo or size >= target * (1 - UNDER_SLACK):
                    break
                fitting = (x, result, size)
            elif x == hi:
                break
            elif calibrated:
                margin = max(2 * margin, size - predicted)  # doubled: the miss may be noise, not a trend
            sizer.calibrate(result, size)
            calibrated = True
        t0 = time.perf_counter()
        estimates: dict[float, float] = {}  # this round's, under this round's calibration

        def estimate(v: float) -> float:
            if v not in made:
                made[v] = make(v)
            if v not in estimates:
                estimates[v] = sizer.estimate(made[v])
            return estimates[v]

        slack = target * FIT_SLACK
        aim = target - (max(margin, target * CALIBRATED_MISS) if calibrated else margin)
        if x is None:
            x = smallest_fitting(estimate, aim, lo, hi, tol, slack)
        else:
            span = REFINE_SPAN * (hi - lo)
            a, b = (x, min(hi, x + span)) if size > target else (max(lo, x - span), x)
            x = smallest_fitting(estimate, aim, a, b, tol, slack)
            if x == a > lo and estimate(a) <= aim:  # the answer lies below the bracket
                x = smallest_fitting(estimate, aim, lo, a, tol, slack)
            elif x == b < hi and estimate(b) > aim:  # ... or above it
                x = smallest_fitting(estimate, aim, b, hi, tol, slack)
        searched += time.perf_counter() - t0
        predicted = estimate(x)
        result = finish(made[x])
        size, checks = sizer.exact(result), checks + 1
        report(x, size)
    if fitting is not None and not fitting[2] < size <= target:
        x, result, size = fitting
    return x, result, size, checks, searched


def clip_is_rate_knob(cfg: QuantConfig) -> bool:
    """Whether the clip is k · std(row) (SDClip, adaptive clip): then a byte target is met by widening or tightening
    it. The other clips are the row absmax or the least-error percentile: only widening them trades error for bytes."""
    return cfg.method in ("sdclip", "adaptive_clip") or (cfg.method == "gptq" and cfg.clip_rule == "sdclip")


def fit_target(problem: Problem, target: int | None, sizer,
               log: Callable[[str], None] = lambda line: None) -> tuple[QuantResult, dict]:
    """Quantize so the compressed model meets `target` bytes. The sizer estimates a result's blob from the order-0
    entropy of its codes, scaled by what its codecs achieved on samples (`prepare`) or on a whole blob
    (`calibrate`); the clip offset is searched on the estimate, the result is checked with the real codecs
    (`exact`: the blob compress will write), and the estimate re-calibrated there while it is over (or once if it
    is far under). If the widest clip is too large, the cheapest ±1 codes are pruned the same way. A k · std clip
    also spends spare bytes (tighter clip); the others stay at their clip when under the target. Each codec check
    is logged: the search runs whole quantizations and takes seconds to minutes."""
    two_sided = clip_is_rate_knob(problem.cfg)
    lo, hi = RATE_OFFSET_RANGE if two_sided else OFFSET_RANGE
    info: dict = {"clip_offset": 0.0, "pruned_codes": 0}
    if target is None:
        return problem.quantize(0.0), info
    t0 = time.perf_counter()
    result = problem.codes(0.0)
    sizer.prepare(result)
    info["unfitted_bytes_est"] = round(sizer.estimate(result))
    log(f"quantize: fitting {problem.cfg.method} to {target:,} bytes; unfitted about {info['unfitted_bytes_est']:,}")

    def report(what: str) -> Callable[[float, int], None]:
        def line(x: float, size: int) -> None:
            verdict = "fits" if size <= target else f"{size - target:,} over"
            log(f"quantize: {what} {x:.4g}: {size:,} bytes ({verdict}), {time.perf_counter() - t0:.1f} s")
        return line

    size, checks = None, 0
    if not two_sided and info["unfitted_bytes_est"] <= target * (1 - ESTIMATE_SLACK):
        result = problem.finish(result)
        size, checks = sizer.exact(result), 1
        report("clip offset")(0.0, size)
    offset, result, size, more, searched = _search(problem.codes, problem.finish, lo, hi, 1e-3, target, sizer,
                                                   result, size, 0.0, report("clip offset"))
    info |= {"clip_offset": round(offset or 0.0, 4), "search_seconds": round(searched, 3)}
    checks += more
    if size > target:
        result, size, pruned, more = _prune_to(result, problem, target, sizer, size, report("pruned codes"))
        info["pruned_codes"], checks = pruned, checks + more
    return result, info | {"fitted_bytes": size, "codec_checks": checks,
                           "fit_seconds": round(time.perf_counter() - t0, 3)}


def _prune_to(result: QuantResult, problem: Problem, target: int, sizer, size: int,
              report: Callable[[float, int], None]) -> tuple[QuantResult, int, int, int]:
    candidates, names = prune_candidates(result, problem)
    total = candidates.size(1)
    floor = sizer.exact(apply_pruning(result, candidates, names, total))
    report(total, floor)
    if floor > target:
        raise PgolfError(f"quant.target_bytes: {target:,} is unreachable: the widest clip with every ±1 code "
                         f"pruned still takes {floor:,} bytes ({floor - target:,} over); lower quant.bits or the model size")
    prune = lambda n: apply_pruning(result, candidates, names, int(n))  # noqa: E731
    n, pruned, size, checks, _ = _search(prune, lambda r: r, 0, total, 1, target, sizer, result, size, 0, report)
    if size <= target:
        return pruned, size, int(n), checks + 1
    return prune(total), floor, total, checks + 1


# ----------------------------------------------------------------------------- the quantized-tensor file

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


def error_metrics(result: QuantResult) -> dict:
    """Relative (H-weighted where H exists) error per group and in total."""
    out, total_err, total_norm = {}, 0.0, 0.0
    for g in GROUPS:
        errs = [e for e in result.errors.values() if e["group"] == g]
        if errs:
            err, norm = sum(e["error"] for e in errs), sum(e["norm"] for e in errs)
            out[f"rel_error_{g}"] = round(err / max(norm, 1e-30), 8)
            total_err, total_norm = total_err + err, total_norm + norm
    out["rel_error_total"] = round(total_err / max(total_norm, 1e-30), 8)
    return out


def load_inputs(device: torch.device) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, str], dict]:
    """The picked weights, the Hessians, which Hessian each weight uses, and the model meta the blob carries."""
    state, meta = load_tensors(paths.PICKED, device)
    broken = next((n for n, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()), None)
    if broken is not None:  # before the Hessians, which such weights make non-finite too
        raise PgolfError(f"{paths.PICKED}: weight {broken} is not finite (training diverged? lower train.*_lr and "
                         f"rerun train)")
    hessians, hmeta = load_tensors(paths.HESSIANS, device)
    return state, hessians, hmeta.get("shared", {}), {k: meta[k] for k in ("config", "passes")}


def quantize(state: dict[str, torch.Tensor], hessians: dict[str, torch.Tensor], shared: dict[str, str],
             cfg: QuantConfig, target: int | None, sizer,
             log: Callable[[str], None] = lambda line: None) -> tuple[QuantResult, dict]:
    """Quantize a model's state to meet `target` compressed bytes (None: as configured); returns the result and
    the stage's metrics: the search's outcome, the errors and each tensor's clip multiplier k."""
    t0 = time.perf_counter()
    result, info = fit_target(Problem(state, hessians, shared, cfg), target, sizer, log)
    metrics = {"seconds": round(time.perf_counter() - t0, 3), "target_bytes": target, **info, **error_metrics(result),
               "lqer_tensors": sum(q.lqer is not None for q in result.quantized.values())}
    ks = {n: round(q.k, 4) for n, q in sorted(result.quantized.items()) if q.k is not None}
    if ks:
        metrics["k"] = ks  # each tensor's clip multiplier (adaptive clip sets them per tensor)
    return result, metrics
