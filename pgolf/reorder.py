"""Orders of a model's units that change nothing in what it computes, chosen so that similar rows of codes sit next to
each other in the blob's streams (compress.reorder).

An MLP's hidden units can be listed in any order: permuting the rows of `fc` and the same columns of `proj` leaves
the output unchanged (the activation acts on each unit alone). Inside an attention's KV group, the head dims RoPE
leaves alone can be listed in any order if q's heads of the group and their k head take the same one (the dot
product, RMS norm and gains see a sum over dims), and v's dims in any order if `proj` takes the same one on the
columns of every head of the group (attention mixes each dim alone; XSA's projection on v is a dot product too).
Value embeddings add into v's dims: with them (model.ve_last) v and o keep their order. `similar` orders each MLP's
units as a greedy chain of nearest neighbours (L1 distance between their standardized weights, the codes they
become): in the column-major layout a context model then sees each input channel's codes change slowly from unit to
unit, and in `proj`'s row-major rows neighbouring units' codes sit side by side; the head dims likewise. Nothing is
stored: the blob holds the permuted model. The Hessian of each `proj`'s input is permuted with it, so GPTQ sees the
same problem.
"""

from collections.abc import Callable

import torch

from .config import ModelConfig
from .registry import Registry

State = dict[str, torch.Tensor]


def similarity_order(x: torch.Tensor, p: float = 1.0) -> torch.Tensor:
    """A permutation of x's rows as a greedy nearest-neighbour chain from row 0 (L1 distance; p = 2: Euclidean,
    computed by matmuls, an order of magnitude faster on large matrices)."""
    n = x.size(0)
    dist = torch.cdist(x.float()[None], x.float()[None], p=p)[0]
    dist.fill_diagonal_(float("inf"))
    order = torch.empty(n, dtype=torch.long, device=x.device)
    cur = torch.zeros((), dtype=torch.long, device=x.device)
    for i in range(n):
        order[i] = cur
        dist[:, cur] = float("inf")
        cur = dist[cur].argmin()
    return order


def _standardized(w: torch.Tensor) -> torch.Tensor:
    """Each row over its own spread: what per-row scales make of it in the codes."""
    return w / w.std(dim=1, keepdim=True).clamp_min(1e-12)


def mlp_blocks(state: State) -> list[str]:
    """The prefixes (e.g. `blocks.3.mlp.`) of every MLP in a state dict."""
    return sorted(name[:-len("fc.weight")] for name in state if name.endswith(".mlp.fc.weight"))


def attention_blocks(state: State) -> list[str]:
    """The prefixes (e.g. `blocks.3.attn.`) of every attention in a state dict."""
    return sorted(name[:-len("q.weight")] for name in state if name.endswith(".attn.q.weight"))


def _permute_input_hessian(hessians: State, shared: dict[str, str], weight: str, order: torch.Tensor) -> None:
    key = shared.get(weight)
    if key is not None and key in hessians:
        hessians[key] = hessians[key][order][:, order]


def _reorder_mlp(state: State, hessians: State, shared: dict[str, str], mlp: str) -> None:
    fc, proj = state[mlp + "fc.weight"], state[mlp + "proj.weight"]
    order = similarity_order(torch.cat([_standardized(fc), _standardized(proj).T], dim=1))
    state[mlp + "fc.weight"], state[mlp + "proj.weight"] = fc[order], proj[:, order]
    _permute_input_hessian(hessians, shared, mlp + "proj.weight", order)


def _reorder_attention(state: State, hessians: State, shared: dict[str, str], attn: str, cfg: ModelConfig) -> None:
    """Per KV group: the free q/k dims in one similarity order for the group's k head and q heads; v's dims in one
    for v's head and the group's columns of proj."""
    H, KV, D = cfg.heads, cfg.kv_heads, cfg.dim // cfg.heads
    g = H // KV
    q = state[attn + "q.weight"].view(KV, g, D, -1)
    k, v = state[attn + "k.weight"].view(KV, D, -1), state[attn + "v.weight"].view(KV, D, -1)
    o = state[attn + "proj.weight"].view(-1, KV, g, D)
    free = torch.arange(cfg.rope_dims or D, D, device=q.device)  # the dims rotate() passes through
    qk_perm = torch.arange(D, device=q.device).repeat(KV, 1)
    vo_perm = qk_perm.clone()
    for j in range(KV):
        heads = torch.cat([_standardized(k[j])] + [_standardized(q[j, i]) for i in range(g)], dim=1)
        if free.numel() > 1:
            qk_perm[j, free] = free[similarity_order(heads[free])]
        if not cfg.ve_last:
            vo_perm[j] = similarity_order(torch.cat([_standardized(v[j])] + [_standardized(o[:, j, i].T)
                                                                              for i in range(g)], dim=1))
    groups = torch.arange(KV, device=q.device)[:, None]
    state[attn + "q.weight"] = q[groups, :, qk_perm].transpose(1, 2).reshape(H * D, -1)
    state[attn + "k.weight"] = k[groups, qk_perm].reshape(KV * D, -1)
    state[attn + "v.weight"] = v[groups, vo_perm].reshape(KV * D, -1)
    cols = (torch.arange(H * D, device=q.device).view(KV, g, D)
            .gather(2, vo_perm[:, None, :].expand(KV, g, D)).reshape(-1))  # proj's columns, head by head
    state[attn + "proj.weight"] = state[attn + "proj.weight"][:, cols]
    _permute_input_hessian(hessians, shared, attn + "proj.weight", cols)


def reorder_similar(state: State, hessians: State, shared: dict[str, str],
                    cfg: ModelConfig) -> tuple[State, State]:
    """Each MLP's hidden units and each attention's free head dims in similarity order, and proj's input Hessians."""
    state, hessians = dict(state), dict(hessians)
    for mlp in mlp_blocks(state):
        _reorder_mlp(state, hessians, shared, mlp)
    for attn in attention_blocks(state):
        _reorder_attention(state, hessians, shared, attn, cfg)
    return state, hessians


Reorder = Callable[[State, State, dict[str, str], ModelConfig], tuple[State, State]]
REORDERS: Registry[Reorder] = Registry("compress.reorder")
REORDERS.add("none", lambda state, hessians, shared, cfg: (state, hessians))
REORDERS.add("similar", reorder_similar)
