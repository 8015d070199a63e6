"""Muon across ranks: the shared orthogonalization gives every rank the one-process update; its state dtype."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pgolf.errors import PgolfError
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


def test_bf16_momentum_rounds_the_gradient_and_the_buffer_as_the_record_and_survives_a_resume():
    """train.muon_dtype: bfloat16 keeps the momentum buffer in bf16 and adds each gradient to it cast to bf16 (the
    record's Muon): buf = bf16(bf16(buf * m) + bf16(g)); float32 is the exact recurrence. A resumed optimizer keeps it so (torch's load_state_dict casts
    state to the parameter's dtype)."""
    torch.manual_seed(0)
    grads = [torch.randn(4, 6) for _ in range(3)]
    ends = {}
    for dtype in (torch.float32, torch.bfloat16):
        p = torch.nn.Parameter(torch.randn(4, 6, generator=torch.Generator().manual_seed(1)))
        opt = Muon([p], lr=0.05, momentum=0.9, state_dtype=dtype)
        buf = torch.zeros(4, 6, dtype=dtype)
        for g in grads:
            p.grad = g.clone()
            opt.step()
            torch._foreach_mul_([buf], 0.9)  # foreach, as Muon: on a CPU it rounds a bf16 product its own way
            torch._foreach_add_([buf], [g.to(dtype)])
        held = opt.state[p]["momentum_buffer"]
        assert held.dtype == dtype and torch.equal(held, buf)
        ends[dtype] = p.detach().clone()
        resumed = Muon([torch.nn.Parameter(p.detach().clone())], lr=0.05, momentum=0.9, state_dtype=dtype)
        resumed.load_state_dict(opt.state_dict())
        assert next(iter(resumed.state.values()))["momentum_buffer"].dtype == dtype
    assert not torch.equal(grads[0], grads[0].bfloat16().float())  # so the rounding is there to see
    assert not torch.equal(ends[torch.float32], ends[torch.bfloat16])


def test_the_muon_dtype_param_reaches_muon_and_a_bad_one_is_one_line(tmp_path):
    from conftest import ROOT, tiny_model, tiny_train

    from pgolf.config import load_params
    from pgolf.model import GPT
    from pgolf.optim import build_optimizers

    assert build_optimizers(GPT(tiny_model()), tiny_train(muon_dtype="bfloat16"))[0].state_dtype == torch.bfloat16
    assert load_params(ROOT / "presets" / "record.yaml").train.muon_dtype == "bfloat16"  # the record's
    p = tmp_path / "params.yaml"
    p.write_text((ROOT / "params.yaml").read_text().replace("train:\n", "train:\n  muon_dtype: float16\n", 1))
    with pytest.raises(PgolfError, match=r"train.muon_dtype: 'float16'; expected one of float32, bfloat16$"):
        load_params(p)
