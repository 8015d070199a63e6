"""Orders of a model's units that change nothing in what it computes, chosen so that similar rows of codes sit next to
each other in the blob's streams (compress.reorder).

An MLP's hidden units can be listed in any order: permuting the rows of `fc` and the same columns of `proj` leaves
the output unchanged (the activation acts on each unit alone). `similar` orders each MLP's units as a greedy chain of
nearest neighbours (L1 distance between their standardized weights, the codes they become): in the column-major
layout a context model then sees each input channel's codes change slowly from unit to unit, and in `proj`'s
row-major rows neighbouring units' codes sit side by side. Nothing is stored: the blob holds the permuted model. The
Hessian of `proj`'s input (the hidden units) is permuted with it, so GPTQ sees the same problem.
"""

from collections.abc import Callable

import torch

from .registry import Registry

State = dict[str, torch.Tensor]


def similarity_order(x: torch.Tensor) -> torch.Tensor:
    """A permutation of x's rows as a greedy nearest-neighbour chain from row 0 (L1 distance)."""
    n = x.size(0)
    dist = torch.cdist(x.float()[None], x.float()[None], p=1)[0]
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


def reorder_similar(state: State, hessians: State, shared: dict[str, str]) -> tuple[State, State]:
    """Each MLP's hidden units in similarity order: fc's rows and proj's columns, and proj's input Hessian."""
    state, hessians = dict(state), dict(hessians)
    for mlp in mlp_blocks(state):
        fc, proj = state[mlp + "fc.weight"], state[mlp + "proj.weight"]
        order = similarity_order(torch.cat([_standardized(fc), _standardized(proj).T], dim=1))
        state[mlp + "fc.weight"], state[mlp + "proj.weight"] = fc[order], proj[:, order]
        key = shared.get(mlp + "proj.weight")
        if key is not None and key in hessians:
            hessians[key] = hessians[key][order][:, order]
    return state, hessians


REORDERS: Registry[Callable[[State, State, dict[str, str]], tuple[State, State]]] = Registry("compress.reorder")
REORDERS.add("none", lambda state, hessians, shared: (state, hessians))
REORDERS.add("similar", reorder_similar)
