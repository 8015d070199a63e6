"""One model's quantization problem (its weights and prepared Hessians) and the methods that quantize it at a clip
offset."""

import math
from dataclasses import dataclass

import torch

from ..config import QuantConfig
from ..errors import PgolfError
from ..registry import Registry
from .clips import CLIP_RULES, clip_sdclip, least_error_k
from .codes import Quantized, QuantResult, group_of, round_rows, weighted_error
from .gptq import PreparedHessian, gptq_many, prepare_hessian
from .lqer import add_lqer


ADAPTIVE_GROUPS = ("attn", "mlp", "other")  # PR #1962 replaces the matrix clip sigmas; embeddings keep their k


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
