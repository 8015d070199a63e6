"""Muon across ranks: the shared orthogonalization (and reduce-scatter) gives every rank the one-process update; its
state dtype."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pgolf.errors import PgolfError
from pgolf.optim import Muon

SHAPES = [(4, 6)] * 5 + [(8, 4)] * 2  # 5 matrices: one rank pads; tall ones: the sqrt(rows / cols) scale


def _run_muon(rank: int, world: int, steps: int = 3, reduce: bool = False) -> tuple[list[torch.Tensor], dict]:
    """Muon's weights after `steps` and the momentum buffers this rank holds, by matrix. Every rank draws the same
    averaged gradients (as after DDP); with `reduce`, each rank is handed its own instead, the average plus a rank's
    offset that sums to 0 over the ranks (each rank's gradient of its share of the batch), for Muon to average."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]
    opt = Muon(params, lr=0.05, weight_decay=0.1, row_norm=True, reduce_grads=reduce)
    for _ in range(steps):
        for p in params:
            mean, offset = torch.randn_like(p), torch.randn_like(p)
            p.grad = mean + (2 * rank - (world - 1)) * offset if reduce else mean
        opt.step()
    return ([p.detach().clone() for p in params],
            {i: opt.state[p]["momentum_buffer"].clone() for i, p in enumerate(params) if p in opt.state})


def _rank(rank: int, world: int, init: str, out: str, reduce: bool) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        torch.save(_run_muon(rank, world, reduce=reduce), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("reduce", [False, True], ids=["averaged", "reduce_scattered"])
def test_two_ranks_sharing_muon_end_with_the_one_process_weights_and_split_the_momentum(tmp_path, reduce):
    """Averaged gradients, or each rank's own reduce-scattered by Muon (reduce_grads): every rank ends with the
    weights one process reaches on the averages, each holding the momentum of only the matrices it owns."""
    torch.set_num_threads(1)
    alone, held = _run_muon(0, 1)
    mp.spawn(_rank, args=(2, f"file://{tmp_path / 'rendezvous'}", str(tmp_path / "out"), reduce), nprocs=2)
    ranks = [torch.load(tmp_path / f"out.{r}") for r in range(2)]
    for weights, buffers in ranks:
        assert all(torch.allclose(a, b, rtol=0, atol=1e-6) for a, b in zip(alone, weights))
        # the buffers too: Newton-Schulz would hide a sum left undivided (it normalizes), the momentum does not
        assert all(torch.allclose(held[i], buf, rtol=0, atol=1e-5) for i, buf in buffers.items())
    assert not all(torch.equal(a, p) for a, p in zip(alone, _run_muon(0, 1, steps=0)[0]))  # the steps moved them
    assert len(held) == 7 and [sorted(b) for _, b in ranks] == [[0, 2, 4, 5], [1, 3, 6]]  # each shape's r, r+2, ...


def test_a_rank_reduce_scattering_its_own_gradient_alone_steps_away_from_the_average():
    """What the reduce-scatter is for: one process stepping on a rank's own gradient (the average plus its offset)
    ends elsewhere than on the average, so the two-rank run's equality above is the averaging's doing."""
    on_the_average, on_its_own = _run_muon(0, 1)[0], _run_muon(0, 2, reduce=True)[0]  # no process group: no reduce
    assert not any(torch.allclose(a, b, rtol=0, atol=1e-3) for a, b in zip(on_the_average, on_its_own))


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
