"""Muon for hidden matrices, AdamW for the rest, and the LR schedule keyed to wallclock or steps."""

import math
from collections import defaultdict

import torch
import torch.distributed as dist

from .config import TrainConfig
from .registry import Registry
from .runtime import rank_world

_all_gather = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)  # torch 2.13 renamed them
_reduce_scatter = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)

# Newton-Schulz iterations X <- aX + (bA + cA^2)X, A = XX^T: per-step (a, b, c) for `steps` steps
NS_COEFFS: Registry = Registry("train.ns_coeffs")
NS_COEFFS.add("quintic", ((3.4445, -4.7750, 2.0315),))  # the same tuple every step
# Polar Express: a minimax-tuned tuple per step (records 2026-04-23/27); steps beyond the table are not run
NS_COEFFS.add("polar_express", (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
))


# train.muon_dtype: Muon's momentum buffers and the gradients added to them. The record keeps both in bf16 (its
# buffers are bf16 and it casts each gradient before the momentum); float32 rounds neither.
MUON_DTYPES: Registry[torch.dtype] = Registry("train.muon_dtype")
MUON_DTYPES.add("float32", torch.float32)
MUON_DTYPES.add("bfloat16", torch.bfloat16)


def ns_schedule(name: str, steps: int) -> list[tuple[float, float, float]]:
    table = NS_COEFFS[name]
    return [table[0]] * steps if len(table) == 1 else list(table[:steps])


# Newton-Schulz's precision by device type: bf16 where its matmuls are fast, float32 elsewhere (a host's bf16 matmuls
# are slow); bench/record_equivalence.py sets the host's to bf16 to round as a GPU does
NS_DTYPES: dict[str, torch.dtype] = {"cuda": torch.bfloat16}


def newton_schulz(G: torch.Tensor, steps: int = 5, coeffs: str = "quintic") -> torch.Tensor:
    """Approximately orthogonalize each matrix of a (..., m, n) batch."""
    X = G.to(NS_DTYPES.get(G.device.type, torch.float32))
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for a, b, c in ns_schedule(coeffs, steps):
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return X.mT if tall else X


class Muon(torch.optim.Optimizer):
    """Momentum, then Newton-Schulz orthogonalization of the update, batched over same-shape matrices.

    Under torch.distributed, rank r orthogonalizes matrices r, r+world, ... of each shape and the results are
    all-gathered, so the work is shared rather than repeated. Each shape's all-gather is asynchronous and moves
    Newton-Schulz's own output (bf16 on a GPU: half the bytes of float32, and lossless), so it runs while the
    next shape is orthogonalized; the largest shapes go first. Momentum buffers live only on the rank that owns
    the matrix. The gradients come averaged (by DDP during the backward), or with `reduce_grads` as each rank's own
    (after a rank-scoped clip): then each shape's are reduce-scattered, every rank receiving the mean of only the
    matrices it owns, in the momentum's dtype (half an all-reduce's bytes; bf16 halves them again, the record's
    bank reduce-scatter); all shapes' start at once and each is waited for just before its Newton-Schulz.
    """

    def __init__(self, params, lr: float, momentum: float = 0.95, ns_steps: int = 5, weight_decay: float = 0.0,
                 row_norm: bool = False, nesterov: bool = True, ns_coeffs: str = "quintic",
                 state_dtype: torch.dtype = torch.float32, reduce_grads: bool = False):
        super().__init__(params, dict(lr=lr, momentum=momentum, ns_steps=ns_steps, weight_decay=weight_decay,
                                      row_norm=row_norm, nesterov=nesterov, ns_coeffs=ns_coeffs))
        self.state_dtype = state_dtype
        self.rank, self.world = rank_world()
        self.reduce_grads = reduce_grads and self.world > 1

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)  # which casts each buffer to its parameter's dtype: back to state_dtype
        for state in self.state.values():
            state["momentum_buffer"] = state["momentum_buffer"].to(self.state_dtype)

    @torch.no_grad()
    def step(self) -> None:
        plan = []  # (group, shape, its matrices), the largest shapes first
        for group in self.param_groups:
            by_shape: dict[tuple, list[torch.Tensor]] = defaultdict(list)
            for p in group["params"]:
                by_shape[tuple(p.shape)].append(p)
            plan += [(group, shape, by_shape[shape]) for shape in sorted(by_shape, key=lambda s: -math.prod(s))]
        reduced = [self._reduce(shape, params) if self.reduce_grads else None for _, shape, params in plan]
        launched = [(group, shape, params, *self._orthogonalize(group, shape, params, summed))
                    for (group, shape, params), summed in zip(plan, reduced)]
        for group, shape, params, U, gather in launched:
            if gather is not None:
                gather.wait()
                U = U[self._slots(len(params), U.size(0) // self.world)]
            updates = U[:len(params)].to(torch.float32) * max(1.0, shape[0] / shape[1]) ** 0.5
            if group["weight_decay"]:
                torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
            torch._foreach_add_(params, list(updates.unbind(0)), alpha=-group["lr"])

    def _slots(self, n: int, per_rank: int) -> list[int]:
        """Where each of a shape's n matrices sits in a buffer of world blocks of per_rank (what the ranks gather and
        reduce-scatter): rank r's block holds matrices r, r+world, ..., the ones it orthogonalizes."""
        return [(i % self.world) * per_rank + i // self.world for i in range(n)]

    def _grad(self, p: torch.Tensor) -> torch.Tensor:
        return p.grad.to(self.state_dtype) if p.grad is not None else torch.zeros_like(p, dtype=self.state_dtype)

    def _reduce(self, shape: tuple, params: list[torch.Tensor]) -> tuple[torch.Tensor, object]:
        """The started reduce-scatter of one shape's gradients: (the buffer that receives the sum over ranks of this
        rank's matrices, padded to the per-rank count; its handle)."""
        per_rank = -(-len(params) // self.world)
        grads = torch.zeros((self.world * per_rank, *shape), device=params[0].device, dtype=self.state_dtype)
        grads[self._slots(len(params), per_rank)] = torch.stack([self._grad(p) for p in params])
        summed = torch.empty((per_rank, *shape), device=grads.device, dtype=grads.dtype)
        return summed, _reduce_scatter(summed, grads, async_op=True)

    def _orthogonalize(self, group: dict, shape: tuple, params: list[torch.Tensor], summed: tuple | None) -> tuple:
        """This rank's matrices of one shape orthogonalized, and (distributed) the started all-gather of every
        rank's: (the updates, or the buffer the gather fills; its handle or None). `summed`: _reduce's (buffer,
        handle) for this shape, or None when the gradients come averaged."""
        mine = params[self.rank::self.world]
        per_rank = -(-len(params) // self.world)
        momentum = group["momentum"]
        dtype = self.state_dtype
        if summed is None:
            grads = [self._grad(p) for p in mine]
        else:
            total, handle = summed
            handle.wait()
            grads = list(total.div_(self.world)[:len(mine)].unbind(0))  # the sum divided, as average_grads does
        bufs = [self.state[p].setdefault("momentum_buffer", torch.zeros_like(p, dtype=dtype)) for p in mine]
        if mine:  # foreach ops: a few launches per shape, not a few per matrix
            torch._foreach_mul_(bufs, momentum)
            torch._foreach_add_(bufs, grads)
        rows = list(torch._foreach_add(grads, bufs, alpha=momentum) if group["nesterov"] and mine else bufs)
        rows += [torch.zeros(shape, device=params[0].device, dtype=dtype)] * (per_rank - len(mine))
        G = torch.stack(rows)
        if group["row_norm"]:  # MuonEq-R: equalize row norms before orthogonalizing
            G = G / (G.norm(dim=-1, keepdim=True) + 1e-7)
        U = newton_schulz(G, group["ns_steps"], group["ns_coeffs"])
        if self.world == 1:
            return U, None
        gathered = torch.empty((self.world * per_rank, *shape), device=U.device, dtype=U.dtype)
        return gathered, _all_gather(gathered, U.contiguous(), async_op=True)


def build_optimizers(model: torch.nn.Module, cfg: TrainConfig,
                     reduce_grads: bool = False) -> list[torch.optim.Optimizer]:
    """Muon for hidden matrices; AdamW groups for embeddings, the untied head and scalars/gates (a linear map to or
    from one unit, like the SmearGate's gate, is a vector: Newton-Schulz would only normalize it). `reduce_grads`:
    Muon averages its matrices' gradients over the ranks itself (Muon.reduce_grads); the caller averages the rest."""
    from .model import CastedLinear

    head = getattr(model, "lm_head", None)
    matrices = [m.weight for m in model.modules()
                if isinstance(m, CastedLinear) and m is not head and min(m.weight.shape) > 1]
    embeds = [m.weight for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    taken = {id(p) for p in matrices + embeds} | ({id(head.weight)} if head is not None else set())
    scalars = [p for p in model.parameters() if id(p) not in taken]
    adam_groups = [dict(params=embeds, lr=cfg.embed_lr, weight_decay=cfg.embed_wd),
                   dict(params=scalars, lr=cfg.scalar_lr, weight_decay=cfg.adam_wd)]
    if head is not None:
        adam_groups.append(dict(params=[head.weight], lr=cfg.head_lr, weight_decay=cfg.adam_wd))
    fused = next(model.parameters()).is_cuda
    opts = [
        Muon(matrices, lr=cfg.matrix_lr, momentum=cfg.muon_momentum, ns_steps=cfg.ns_steps,
             weight_decay=cfg.muon_wd, row_norm=cfg.muon_row_norm, ns_coeffs=cfg.ns_coeffs,
             state_dtype=MUON_DTYPES[cfg.muon_dtype], reduce_grads=reduce_grads),
        torch.optim.AdamW(adam_groups, betas=(0.9, cfg.adam_beta2), eps=1e-8, fused=fused),
    ]
    for opt in opts:
        for group in opt.param_groups:
            group["base_lr"] = group["lr"]
    return opts


def progress(step: int, elapsed: float, cfg: TrainConfig) -> float:
    """Fraction of the run done: by wallclock when capped (so a capped run ends cooled down), else by steps."""
    by_steps = step / cfg.iterations
    return max(by_steps, elapsed / cfg.max_seconds) if cfg.max_seconds > 0 else by_steps


def warmdown(step: int, elapsed: float, cfg: TrainConfig) -> float:
    """The cool-down factor: 1 until the last warmdown_frac of the run, then linear towards 0, never below
    lr_floor. SWA and late QAT key off it (the warm-up is not part of it)."""
    left = 1.0 - progress(step, elapsed, cfg)
    if cfg.warmdown_frac <= 0 or left >= cfg.warmdown_frac:
        return 1.0
    return max(max(left, 0.0) / cfg.warmdown_frac, cfg.lr_floor)


def lr_scale(step: int, elapsed: float, cfg: TrainConfig) -> float:
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    return warm * warmdown(step, elapsed, cfg)


def muon_momentum(step: int, cfg: TrainConfig) -> float:
    if cfg.muon_momentum_warmup_steps <= 0:
        return cfg.muon_momentum
    t = min(1.0, step / cfg.muon_momentum_warmup_steps)
    return (1 - t) * cfg.muon_momentum_start + t * cfg.muon_momentum


def apply_schedule(opts: list[torch.optim.Optimizer], scale: float, momentum: float) -> None:
    for opt in opts:
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * scale
            if isinstance(opt, Muon):
                group["momentum"] = momentum
