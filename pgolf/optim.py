"""Muon for hidden matrices, AdamW for the rest, and the LR schedule keyed to wallclock or steps."""

from collections import defaultdict

import torch
import torch.distributed as dist

from .config import TrainConfig

NS_COEFFS = (3.4445, -4.7750, 2.0315)


def newton_schulz(G: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Approximately orthogonalize each matrix of a (..., m, n) batch (quintic Newton-Schulz)."""
    a, b, c = NS_COEFFS
    X = G.bfloat16() if G.is_cuda else G.float()
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return X.mT if tall else X


class Muon(torch.optim.Optimizer):
    """Momentum, then Newton-Schulz orthogonalization of the update, batched over same-shape matrices.

    Under torch.distributed, rank r orthogonalizes matrices r, r+world, ... of each shape and the
    results are all-gathered, so the work is shared rather than repeated (gradients must already be
    averaged, as DDP does). Momentum buffers live only on the rank that owns the matrix.
    """

    def __init__(self, params, lr: float, momentum: float = 0.95, ns_steps: int = 5, weight_decay: float = 0.0,
                 row_norm: bool = False, nesterov: bool = True):
        super().__init__(params, dict(lr=lr, momentum=momentum, ns_steps=ns_steps, weight_decay=weight_decay,
                                      row_norm=row_norm, nesterov=nesterov))
        distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if distributed else 0
        self.world = dist.get_world_size() if distributed else 1

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            by_shape: dict[tuple, list[torch.Tensor]] = defaultdict(list)
            for p in group["params"]:
                by_shape[tuple(p.shape)].append(p)
            for shape, params in by_shape.items():
                self._step_shape(group, shape, params)

    def _step_shape(self, group: dict, shape: tuple, params: list[torch.Tensor]) -> None:
        mine = params[self.rank::self.world]
        per_rank = -(-len(params) // self.world)
        momentum = group["momentum"]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in mine]
        bufs = [self.state[p].setdefault("momentum_buffer", torch.zeros_like(p)) for p in mine]
        if mine:  # foreach ops: a few launches per shape, not a few per matrix
            torch._foreach_mul_(bufs, momentum)
            torch._foreach_add_(bufs, grads)
        rows = list(torch._foreach_add(grads, bufs, alpha=momentum) if group["nesterov"] and mine else bufs)
        rows += [torch.zeros(shape, device=params[0].device)] * (per_rank - len(mine))
        G = torch.stack(rows)
        if group["row_norm"]:  # MuonEq-R: equalize row norms before orthogonalizing
            G = G / (G.norm(dim=-1, keepdim=True) + 1e-7)
        U = newton_schulz(G, group["ns_steps"]).to(torch.float32)
        U *= max(1.0, shape[0] / shape[1]) ** 0.5
        if self.world > 1:
            gathered = torch.empty((self.world * per_rank, *shape), device=U.device, dtype=U.dtype)
            dist.all_gather_into_tensor(gathered, U)  # rank r's block holds matrices r, r+world, ...
            updates = [gathered[(i % self.world) * per_rank + i // self.world] for i in range(len(params))]
        else:
            updates = list(U.unbind(0)[:len(params)])
        if group["weight_decay"]:
            torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
        torch._foreach_add_(params, updates, alpha=-group["lr"])


def build_optimizers(model: torch.nn.Module, cfg: TrainConfig) -> list[torch.optim.Optimizer]:
    """Muon for hidden matrices; AdamW groups for embeddings, the untied head and scalars/gates."""
    from .model import CastedLinear

    head = getattr(model, "lm_head", None)
    matrices = [m.weight for m in model.modules() if isinstance(m, CastedLinear) and m is not head]
    embeds = [m.weight for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    taken = {id(p) for p in matrices + embeds} | ({id(head.weight)} if head is not None else set())
    scalars = [p for p in model.parameters() if id(p) not in taken]
    adam_groups = [dict(params=embeds, lr=cfg.embed_lr), dict(params=scalars, lr=cfg.scalar_lr)]
    if head is not None:
        adam_groups.append(dict(params=[head.weight], lr=cfg.head_lr))
    fused = next(model.parameters()).is_cuda
    opts = [
        Muon(matrices, lr=cfg.matrix_lr, momentum=cfg.muon_momentum, ns_steps=cfg.ns_steps,
             weight_decay=cfg.muon_wd, row_norm=cfg.muon_row_norm),
        torch.optim.AdamW(adam_groups, betas=(0.9, 0.95), eps=1e-8, weight_decay=cfg.adam_wd, fused=fused),
    ]
    for opt in opts:
        for group in opt.param_groups:
            group["base_lr"] = group["lr"]
    return opts


def progress(step: int, elapsed: float, cfg: TrainConfig) -> float:
    """Fraction of the run done: by wallclock when capped (so a capped run ends cooled down), else by steps."""
    by_steps = step / cfg.iterations
    return max(by_steps, elapsed / cfg.max_seconds) if cfg.max_seconds > 0 else by_steps


def lr_scale(step: int, elapsed: float, cfg: TrainConfig) -> float:
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    left = 1.0 - progress(step, elapsed, cfg)
    if cfg.warmdown_frac <= 0 or left >= cfg.warmdown_frac:
        return warm
    return warm * (cfg.lr_floor + (1.0 - cfg.lr_floor) * max(left, 0.0) / cfg.warmdown_frac)


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
