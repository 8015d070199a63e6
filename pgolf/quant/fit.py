"""Fitting a model to a byte target: the clip offset searched on the sizer's estimate and checked with the real
codecs, then pruning the cheapest +-1 codes if the widest clip is still too large."""

import time
from collections.abc import Callable

import torch

from ..config import QuantConfig
from ..errors import PgolfError
from .codes import GROUPS, Quantized, QuantResult
from .problem import Problem


OFFSET_RANGE = (0.0, 2.0)  # log2 clip multiplier searched to meet a byte target: the configured clip .. 4x
RATE_OFFSET_RANGE = (-2.0, 2.0)  # where k · std(row) sets the clip, k is a rate knob: the budget is met both ways


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
