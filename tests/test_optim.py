"""Muon across ranks: the shared orthogonalization gives every rank the one-process update."""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pgolf.optim import Muon

SHAPES = [(4, 6)] * 5 + [(8, 4)] * 2  # 5 matrices: one rank pads; tall ones: the sqrt(rows / cols) scale


def _run_muon(rank: int, world: int, steps: int = 3) -> tuple[list[torch.Tensor], int]:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]
    opt = Muon(params, lr=0.05, weight_decay=0.1, row_norm=True)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn_like(p)  # the same averaged gradients on every rank, as after DDP
        opt.step()
    return [p.detach().clone() for p in params], len(opt.state)


def _rank(rank: int, world: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        torch.save(_run_muon(rank, world), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_ranks_sharing_muon_end_with_the_one_process_weights_and_split_the_momentum(tmp_path):
    torch.set_num_threads(1)
    alone, held = _run_muon(0, 1)
    mp.spawn(_rank, args=(2, f"file://{tmp_path / 'rendezvous'}", str(tmp_path / "out")), nprocs=2)
    ranks = [torch.load(tmp_path / f"out.{r}") for r in range(2)]
    for weights, _ in ranks:
        assert all(torch.allclose(a, b, rtol=0, atol=1e-6) for a, b in zip(alone, weights))
    assert not all(torch.equal(a, p) for a, p in zip(alone, _run_muon(0, 1, steps=0)[0]))  # the steps moved them
    assert held == 7 and [n for _, n in ranks] == [4, 3]  # rank 0: matrices 0, 2, 4 and 5; rank 1: 1, 3 and 6
