"""compress.reorder: function-preserving orders of the MLP's hidden units, chosen so that similar units are neighbours."""

import numpy as np
import torch
from conftest import tiny_model
from test_record_stack import RECORD_LIKE, randomized

from pgolf import codecs, pack, reorder
from pgolf.config import load_params


def test_reordered_mlp_units_leave_the_logits_unchanged():
    model = randomized(tiny_model(**RECORD_LIKE))  # two lanes, loops, gates: every path through an MLP
    state = {k: v.clone() for k, v in model.state_dict().items()}
    shared = {f"{mlp}proj.weight": f"{mlp}proj" for mlp in reorder.mlp_blocks(state)}
    hessians = {key: torch.randn(64, 64) for key in shared.values()}
    moved, moved_h = reorder.REORDERS["similar"](state, hessians, shared)
    idx = torch.randint(4, 320, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model.logits(idx)
        model.load_state_dict(moved)
        after = model.logits(idx)
    assert torch.allclose(before, after, atol=1e-5)
    fc, fc2 = state["blocks.0.mlp.fc.weight"], moved["blocks.0.mlp.fc.weight"]
    assert not torch.equal(fc, fc2)  # the units did move ...
    order = torch.tensor([int((fc == row).all(1).nonzero()) for row in fc2])
    assert sorted(order.tolist()) == list(range(fc.size(0)))  # ... as a permutation
    H = hessians["blocks.0.mlp.proj"]
    assert torch.equal(moved_h["blocks.0.mlp.proj"], H[order][:, order])  # proj's input Hessian moved with them


def test_similar_order_brings_alike_units_together_and_their_codes_compress_smaller():
    """Hidden units from 8 kinds, shuffled: in similarity order each kind is one run, and the column-major codes of
    fc cost a context model less."""
    g = torch.Generator().manual_seed(0)
    kinds = torch.randn(8, 64, generator=g)
    fc = kinds[torch.randint(0, 8, (512,), generator=g)] + 0.15 * torch.randn(512, 64, generator=g)
    state = {"blocks.0.mlp.fc.weight": fc, "blocks.0.mlp.proj.weight": torch.randn(64, 512, generator=g)}
    moved, _ = reorder.reorder_similar(state, {}, {})
    kind = lambda w: (torch.cdist(w, kinds).argmin(1))  # noqa: E731
    runs = lambda k: int((k[1:] != k[:-1]).sum()) + 1  # noqa: E731
    assert runs(kind(moved["blocks.0.mlp.fc.weight"])) <= 12 < runs(kind(fc))

    def col_bytes(w: torch.Tensor) -> int:
        codes = (w / w.std(dim=1, keepdim=True) * 4).round().clamp(-31, 31).to(torch.int8).numpy()
        return len(codecs.compress("zpaq_o1", pack.LAYOUTS["col"].pack(codes, 6)))

    assert col_bytes(moved["blocks.0.mlp.fc.weight"]) < 0.9 * col_bytes(fc)


def test_a_reorder_is_checked_when_params_load(tmp_path):
    import pytest
    from pgolf.errors import PgolfError

    p = tmp_path / "params.yaml"
    text = open("params.yaml").read().replace("reorder: none", "reorder: sorted")
    p.write_text(text)
    with pytest.raises(PgolfError, match=r"compress.reorder: 'sorted'.*(none|similar)"):
        load_params(p)
