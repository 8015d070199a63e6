"""compress.reorder: function-preserving orders of the MLP's hidden units, chosen so that similar units are neighbours."""

import pytest
import torch
from conftest import tiny_model
from test_record_stack import RECORD_LIKE, randomized

from pgolf import codecs, layouts, reorder
from pgolf.config import load_params


@pytest.mark.parametrize("ve_last", [0, 2])
def test_reordered_units_and_head_dims_leave_the_logits_unchanged(ve_last):
    """MLP units, the q/k dims RoPE leaves alone and v's dims (with o's columns), per KV group; with value embeddings
    (ve_last) v and o stay in place."""
    cfg = tiny_model(**{**RECORD_LIKE, "dim": 64}, ve_last=ve_last)  # lanes, loops, gates, XSA, partial RoPE, GQA
    model = randomized(cfg)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    shared = {f"{b}proj.weight": f"{b}proj" for b in reorder.mlp_blocks(state) + reorder.attention_blocks(state)}
    hessians = {key: torch.randn(128 if "mlp" in key else 64, 128 if "mlp" in key else 64) for key in shared.values()}
    moved, moved_h = reorder.REORDERS["similar"](state, hessians, shared, cfg)
    idx = torch.randint(4, 320, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model.logits(idx)
        model.load_state_dict(moved)
        after = model.logits(idx)
    assert torch.allclose(before, after, atol=1e-5)

    def order(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """new = old[order]: the rows moved as a permutation."""
        o = torch.tensor([int((old == row).all(1).nonzero()) for row in new])
        assert sorted(o.tolist()) == list(range(old.size(0)))
        return o

    fc = order(state["blocks.0.mlp.fc.weight"], moved["blocks.0.mlp.fc.weight"])
    assert not torch.equal(fc, torch.arange(fc.numel()))  # the units did move ...
    H = hessians["blocks.0.mlp.proj"]
    assert torch.equal(moved_h["blocks.0.mlp.proj"], H[fc][:, fc])  # ... and proj's input Hessian with them
    q = order(state["blocks.0.attn.q.weight"], moved["blocks.0.attn.q.weight"]).view(4, 16)  # 4 heads of 16 dims
    k = order(state["blocks.0.attn.k.weight"], moved["blocks.0.attn.k.weight"]).view(2, 16)
    assert torch.equal(q[:, :4], torch.arange(64).view(4, 16)[:, :4])  # the rotated dims stay
    assert torch.equal(q % 16, k.repeat_interleave(2, 0) % 16)  # a group's q heads take their k head's order
    assert not torch.equal(q % 16, torch.arange(16).repeat(4, 1))
    v = order(state["blocks.0.attn.v.weight"], moved["blocks.0.attn.v.weight"])
    cols = order(state["blocks.0.attn.proj.weight"].T, moved["blocks.0.attn.proj.weight"].T)
    assert torch.equal(moved_h["blocks.0.attn.proj"], hessians["blocks.0.attn.proj"][cols][:, cols])
    if ve_last:
        assert torch.equal(v, torch.arange(32)) and torch.equal(cols, torch.arange(64))
    else:  # each q head's columns of proj follow its KV group's v dims
        assert not torch.equal(v, torch.arange(32))
        assert torch.equal(cols.view(4, 16) % 16, v.view(2, 16).repeat_interleave(2, 0) % 16)


def test_similar_order_brings_alike_units_together_and_their_codes_compress_smaller():
    """Hidden units from 8 kinds, shuffled: in similarity order each kind is one run, and the column-major codes of
    fc cost a context model less."""
    g = torch.Generator().manual_seed(0)
    kinds = torch.randn(8, 64, generator=g)
    fc = kinds[torch.randint(0, 8, (512,), generator=g)] + 0.15 * torch.randn(512, 64, generator=g)
    state = {"blocks.0.mlp.fc.weight": fc, "blocks.0.mlp.proj.weight": torch.randn(64, 512, generator=g)}
    moved, _ = reorder.reorder_similar(state, {}, {}, tiny_model(dim=64))
    kind = lambda w: (torch.cdist(w, kinds).argmin(1))  # noqa: E731
    runs = lambda k: int((k[1:] != k[:-1]).sum()) + 1  # noqa: E731
    assert runs(kind(moved["blocks.0.mlp.fc.weight"])) <= 12 < runs(kind(fc))

    def col_bytes(w: torch.Tensor) -> int:
        codes = (w / w.std(dim=1, keepdim=True) * 4).round().clamp(-31, 31).to(torch.int8).numpy()
        return len(codecs.compress("zpaq_o1", layouts.LAYOUTS["col"].pack(codes, 6)))

    assert col_bytes(moved["blocks.0.mlp.fc.weight"]) < 0.9 * col_bytes(fc)


def test_a_reorder_is_checked_when_params_load(tmp_path):
    import pytest
    from pgolf.errors import PgolfError

    p = tmp_path / "params.yaml"
    text = open("params.yaml").read().replace("reorder: none", "reorder: sorted")
    p.write_text(text)
    with pytest.raises(PgolfError, match=r"compress.reorder: 'sorted'.*(none|similar)"):
        load_params(p)
