import dataclasses

import numpy as np
import pytest
import torch

from conftest import tiny_model, tiny_train
from pgolf.checkpoint import load_tensors, save_tensors
from pgolf.data import write_shard
from pgolf.model import GPT, attention, rotate
from pgolf.optim import lr_scale, newton_schulz
from pgolf.train import SYNC_EVERY, Runtime, Trainer, ema_decay_at

CPU = Runtime(0, 1, torch.device("cpu"))

OPTIONS = {
    "mlp_mult": 3.5, "activation": "leaky_relu2", "tied_embed": False, "rope_dims": 4, "qk_norm": False,
    "logit_softcap": 0.0, "xsa_last": 2, "ln_scale": True, "unet_skips": True, "smear_gate": True,
    "bigram_buckets": 64, "ve_last": 2, "recur_start": 1, "parallel_from": 2, "head_gate": True, "kv_heads": 4,
}


def randomized(model: GPT, seed: int) -> GPT:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_every_option_runs_and_changes_the_output(option):
    value = OPTIONS[option]
    extra = {"recur_end": 2} if option == "recur_start" else {}
    torch.manual_seed(0)
    base = randomized(GPT(tiny_model()), 1)
    model = GPT(tiny_model(**{option: value}, **extra))
    model.recurrence = True
    randomized(model, 2)
    shared = {k: v for k, v in base.state_dict().items() if k in model.state_dict() and model.state_dict()[k].shape == v.shape}
    model.load_state_dict(shared, strict=False)
    idx = torch.randint(0, 320, (2, 16))
    loss = model(idx, idx.roll(-1, 1))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.parameters())
    assert not torch.allclose(model.logits(idx), base.logits(idx), atol=1e-5)


def test_residual_stream_runs_in_the_autocast_dtype():
    model = randomized(GPT(tiny_model()), 3)
    dtypes = []
    model.blocks[0].register_forward_hook(lambda m, i, out: dtypes.append((i[0].dtype, i[1].dtype, out.dtype)))
    idx = torch.randint(0, 320, (2, 16))
    model.logits(idx)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model.logits(idx)
    assert dtypes == [(torch.float32,) * 3, (torch.bfloat16,) * 3]
    assert logits.dtype == torch.float32  # loss and softcap stay fp32


def test_attention_matmuls_equal_the_plain_linears():
    """q/k/v as one matmul, and the per-channel attn_scale folded into the projection's weight."""
    model = randomized(GPT(tiny_model(qk_norm=False, rope_dims=2)), 4)
    attn = model.blocks[0].attn
    seen = {}
    attn.register_forward_pre_hook(lambda m, i: seen.update(x=i[0]))
    attn.register_forward_hook(lambda m, i, out: seen.update(out=out))
    model.logits(torch.randint(0, 320, (2, 16)))
    x, B, T = seen["x"], 2, 16
    q, k, v = (lin(x).view(B, T, -1, attn.head_dim) for lin in (attn.q, attn.k, attn.v))
    cos, sin = model._rope(T, x.device, x.dtype)
    y = attention(rotate(q, cos, sin), rotate(k, cos, sin), v)
    expected = model.blocks[0].attn_scale * attn.proj(y.reshape(B, T, -1))
    assert not torch.allclose(model.blocks[0].attn_scale, torch.ones(()))
    torch.testing.assert_close(seen["out"], expected, atol=1e-5, rtol=1e-4)
    mlp, scale, h = model.blocks[0].mlp, model.blocks[0].mlp_scale, torch.randn(B, T, model.cfg.dim)
    torch.testing.assert_close(mlp(h, scale), scale * mlp(h), atol=1e-5, rtol=1e-4)


def test_rope_tables_match_angles_computed_on_the_fly():
    model = GPT(tiny_model(rope_dims=4))
    cos, sin = model._rope(16, torch.device("cpu"), torch.float32)
    long_cos, long_sin = model._rope(model.rope_cos.size(0) + 8, torch.device("cpu"), torch.float32)
    torch.testing.assert_close(cos, long_cos[:16])
    torch.testing.assert_close(sin, long_sin[:16])
    assert not torch.allclose(cos[1:], cos[:1].expand_as(cos[1:]))


def test_newton_schulz_is_near_orthogonal():
    g = torch.Generator().manual_seed(0)
    q1, _ = torch.linalg.qr(torch.randn(64, 64, dtype=torch.float64, generator=g))
    q2, _ = torch.linalg.qr(torch.randn(64, 64, dtype=torch.float64, generator=g))
    # a square Gaussian matrix often has a singular value near 0, which five steps cannot lift: square case
    # with singular values spread over 20x instead; rectangular Gaussian ones are well conditioned
    square = q1 @ torch.diag(torch.linspace(0.05, 1, 64, dtype=torch.float64)) @ q2
    shapes = [(32, 96), (96, 32), (3, 48, 80)]
    for G in [square] + [torch.randn(shape, dtype=torch.float64, generator=g) for shape in shapes]:
        shape = tuple(G.shape)
        X = newton_schulz(G, 5)
        s = torch.linalg.svdvals(X.double())
        # the quintic iteration pushes every singular value into roughly [0.7, 1.2]
        assert s.min() > 0.6 and s.max() < 1.25, (shape, s.min(), s.max())


def make_shards(folder, vocab=320, n_train=2, seed=0, tokens=20_000):
    g = np.random.default_rng(seed)
    # a learnable stream: a repeating pattern with noise
    pattern = g.integers(4, vocab, 37)
    for i in range(n_train):
        t = np.tile(pattern, tokens // 37 + 1)[:tokens].copy()
        noise = g.random(tokens) < 0.1
        t[noise] = g.integers(4, vocab, noise.sum())
        write_shard(folder / f"train_{i:06d}.bin", t.astype(np.uint16))
    write_shard(folder / "val_000000.bin", np.tile(pattern, 30).astype(np.uint16))
    return folder


def test_loss_falls_on_a_tiny_corpus(tmp_path):
    make_shards(tmp_path)
    result = Trainer(tiny_model(), tiny_train(iterations=40, log_every=5), tmp_path, CPU, log=lambda s: None).run()
    assert result.metrics["steps"] == 40
    assert result.metrics["final_train_loss"] < 3.0 < np.log(320)


def test_ema_math(tmp_path):
    make_shards(tmp_path)
    assert ema_decay_at(0, 0.997) == pytest.approx(0.1) and ema_decay_at(10**6, 0.997) == 0.997
    trainer = Trainer(tiny_model(), tiny_train(iterations=1, ema_decay=0.05), tmp_path, CPU, log=lambda s: None)
    p0 = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    result = trainer.run()
    assert any(not torch.equal(p0[n], p1) for n, p1 in result.raw.items())
    for n, p1 in result.raw.items():  # one update: ema = d * p0 + (1 - d) * p1
        torch.testing.assert_close(result.ema[n], 0.05 * p0[n] + 0.95 * p1, rtol=0, atol=1e-6)


def test_wallclock_cap_stops_a_run(tmp_path):
    make_shards(tmp_path)
    cfg = tiny_train(iterations=10**6, max_seconds=1.0)
    result = Trainer(tiny_model(), cfg, tmp_path, CPU, log=lambda s: None).run()
    assert 1.0 <= result.metrics["train_seconds"] < 2.0
    assert 0 < result.metrics["steps"] < 10**6
    # the schedule keyed to wallclock has cooled down by the end of a capped run
    assert lr_scale(result.metrics["steps"], result.metrics["train_seconds"], cfg) == 0.0


def test_host_waits_for_the_device_only_at_sync_points(tmp_path, monkeypatch):
    make_shards(tmp_path)
    trainer = Trainer(tiny_model(), tiny_train(iterations=45, log_every=25), tmp_path, CPU, log=lambda s: None)
    waits = []
    monkeypatch.setattr(trainer, "_sync", lambda: waits.append(trainer.step))
    result = trainer.run()
    # first step, one in SYNC_EVERY since the last wait, log step 25, the last step
    assert waits == [1, 1 + SYNC_EVERY, 25, 25 + SYNC_EVERY, 45]
    assert result.metrics["steps"] == 45 and result.metrics["train_seconds"] > 0
    # a capped run stops on a measured clock (its last step waited), about one step past the cap
    capped = Trainer(tiny_model(), tiny_train(iterations=10**6, max_seconds=0.5, log_every=10**6), tmp_path, CPU,
                     log=lambda s: None)
    capped_waits = []
    monkeypatch.setattr(capped, "_sync", lambda: capped_waits.append(capped.step))
    m = capped.run().metrics
    assert capped_waits[-1] == m["steps"]
    assert 0.5 <= m["train_seconds"] < 1.5


def test_checkpoint_roundtrip_is_exact(tmp_path):
    model = randomized(GPT(tiny_model(bigram_buckets=64, ve_last=1, tied_embed=False)), 3)
    save_tensors(tmp_path / "m.safetensors", model.state_dict(), {"config": dataclasses.asdict(model.cfg)})
    tensors, meta = load_tensors(tmp_path / "m.safetensors")
    clone = GPT(tiny_model(**{k: meta["config"][k] for k in ("bigram_buckets", "ve_last", "tied_embed")}))
    clone.load_state_dict(tensors)
    idx = torch.randint(0, 320, (2, 16))
    assert torch.equal(model.logits(idx), clone.logits(idx))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), clone.state_dict().values()))
