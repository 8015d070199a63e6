import dataclasses

import numpy as np
import pytest
import torch
from conftest import tiny_model, tiny_train

from pgolf import optim, weights
from pgolf.checkpoint import load_tensors, save_tensors
from pgolf.data import write_shard
from pgolf.model import GPT, CastedLinear, attention, rotate
from pgolf.optim import lr_scale, newton_schulz, warmdown
from pgolf.runtime import Runtime
from pgolf.score import score
from pgolf.train import SYNC_EVERY, Trainer, ema_decay_at, passes_at

CPU = Runtime(0, 1, torch.device("cpu"))

OPTIONS = {  # one value per option that changes the network; (option, value, the options it needs)
    "mlp_mult": (3.5, {}), "activation": ("leaky_relu2", {}), "tied_embed": (False, {}), "rope_dims": (4, {}),
    "qk_norm": (False, {}), "logit_softcap": (0.0, {}), "xsa_last": (2, {}), "ln_scale": (True, {}),
    "unet_skips": (True, {}), "skip_gates": (True, {"unet_skips": True}), "smear_gate": ("channel", {}),
    "smear_gate=bos": ("bos", {}), "bigram_buckets": (64, {}), "ve_last": (2, {}),
    "recur_start": (1, {"recur_end": 2}), "recur_loops": (2, {"recur_start": 1, "recur_end": 2}),
    "parallel_from": (2, {}), "head_gate": (True, {}), "sparse_gate": (True, {"gate_window": 8}), "kv_heads": (4, {}),
}


def option_config(option: str, **base):
    value, needs = OPTIONS[option]
    return tiny_model(**base, **needs, **{option.split("=")[0]: value})


def randomized(model: GPT, seed: int) -> GPT:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_every_option_runs_and_changes_the_output(option):
    torch.manual_seed(0)
    _, needs = OPTIONS[option]
    base = randomized(GPT(tiny_model(**needs)), 1)
    model = randomized(GPT(option_config(option)), 2)
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


def test_a_run_started_from_another_seeds_weights_is_that_seeds_run(tmp_path):
    make_shards(tmp_path)
    quiet = dict(log=lambda s: None)
    first = Trainer(tiny_model(), tiny_train(iterations=6, seed=1), tmp_path, CPU, **quiet)
    start = {n: t.clone() for n, t in first.model.state_dict().items()}
    other = Trainer(tiny_model(), tiny_train(iterations=6, seed=2), tmp_path, CPU, **quiet)
    assert any(not torch.equal(start[n], t) for n, t in other.model.state_dict().items())
    other.start_from(start)
    a, b = first.run(), other.run()
    for mine, theirs in ((a.raw, b.raw), (a.ema, b.ema)):
        for n, t in mine.items():
            torch.testing.assert_close(theirs[n], t, rtol=0, atol=0)


def test_wallclock_cap_stops_before_the_cap_less_the_calibration_reserve(tmp_path):
    make_shards(tmp_path)
    cfg = tiny_train(iterations=10**6, max_seconds=1.5, calibration_reserve_s=0.5)
    m = Trainer(tiny_model(), cfg, tmp_path, CPU, log=lambda s: None).run().metrics
    step = m["ms_per_step"] / 1000
    # stops before a step whose predicted end passes 1.5 - 0.5 s (a step may run a little over its prediction)
    assert 1.0 - 2 * step <= m["train_seconds"] <= 1.0 + step
    assert 0 < m["steps"] < 10**6


def test_host_waits_for_the_device_only_at_sync_points(tmp_path, monkeypatch):
    make_shards(tmp_path)
    trainer = Trainer(tiny_model(), tiny_train(iterations=45, log_every=25), tmp_path, CPU, log=lambda s: None)
    waits = []
    monkeypatch.setattr(trainer, "_sync", lambda: waits.append(trainer.step))
    result = trainer.run()
    # first step, one in SYNC_EVERY since the last wait, log step 25, the last step
    assert waits == [1, 1 + SYNC_EVERY, 25, 25 + SYNC_EVERY, 45]
    phased = Trainer(tiny_model(recur_start=1, recur_end=2, recur_after=0.5), tiny_train(iterations=45, log_every=25),
                     tmp_path, CPU, log=lambda s: None)
    phased_waits = []
    monkeypatch.setattr(phased, "_sync", lambda: phased_waits.append(phased.step))
    phased.run()
    assert 24 in phased_waits  # the first step run with the recurrent pass on (taken at progress 23/45) waited
    assert result.metrics["steps"] == 45 and result.metrics["train_seconds"] > 0
    # a capped run stops on a measured clock: its last step waited
    capped = Trainer(tiny_model(), tiny_train(iterations=10**6, max_seconds=0.5, log_every=10**6), tmp_path, CPU,
                     log=lambda s: None)
    capped_waits = []
    monkeypatch.setattr(capped, "_sync", lambda: capped_waits.append(capped.step))
    m = capped.run().metrics
    assert capped_waits[-1] == m["steps"] and m["train_seconds"] <= 0.5 + m["ms_per_step"] / 1000


def test_checkpoint_roundtrip_is_exact(tmp_path):
    model = randomized(GPT(tiny_model(bigram_buckets=64, ve_last=1, tied_embed=False)), 3)
    save_tensors(tmp_path / "m.safetensors", model.state_dict(), {"config": dataclasses.asdict(model.cfg)})
    tensors, meta = load_tensors(tmp_path / "m.safetensors")
    clone = GPT(tiny_model(**{k: meta["config"][k] for k in ("bigram_buckets", "ve_last", "tied_embed")}))
    clone.load_state_dict(tensors)
    idx = torch.randint(0, 320, (2, 16))
    assert torch.equal(model.logits(idx), clone.logits(idx))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), clone.state_dict().values()))


def test_ortho_init_makes_hidden_matrices_orthogonal_and_keeps_projections_zero():
    torch.manual_seed(0)
    model = GPT(tiny_model(dim=64, heads=4, kv_heads=4, ortho_init=True))
    plain = GPT(tiny_model(dim=64, heads=4, kv_heads=4))
    fc = model.blocks[0].mlp.fc.weight  # (128, 64): orthonormal columns
    torch.testing.assert_close(fc.T @ fc, torch.eye(64), atol=1e-5, rtol=0)
    q = model.blocks[0].attn.q.weight
    torch.testing.assert_close(q @ q.T, torch.eye(64), atol=1e-5, rtol=0)
    assert not torch.allclose(plain.blocks[0].mlp.fc.weight.T @ plain.blocks[0].mlp.fc.weight, torch.eye(64), atol=0.1)
    assert model.blocks[0].attn.proj.weight.abs().max() == 0 and model.blocks[0].mlp.proj.weight.abs().max() == 0


def test_bos_smear_does_not_carry_a_document_into_the_next():
    torch.manual_seed(0)
    for kind, leaks in (("bos", False), ("channel", True)):
        model = randomized(GPT(tiny_model(smear_gate=kind)), 3)
        a = torch.tensor([[5, 6, 7, 1, 8, 9]])  # a document ends at 7, the next starts with BOS (1)
        b = a.clone()
        b[0, 2] = 11  # only the previous document's last token differs
        outs = []
        model.smear.register_forward_hook(lambda m, i, out: outs.append(out))
        model.logits(a), model.logits(b)
        changed = not torch.allclose(outs[0][0, 3], outs[1][0, 3])
        assert changed == leaks, kind


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_the_network_scored_is_the_network_trained(option, tmp_path):
    """The trainer's last val bpb equals the bpb of its raw weights rebuilt from the saved artifact, as the ema,
    calibrate and eval stages rebuild them (recurrence on from the start, so passes are part of the network)."""
    make_shards(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"")  # load_val below gets its byte counts from a table instead
    mcfg = option_config(option, recur_after=0.0)
    val = load_val_split(tmp_path)
    fn = lambda m: score(m, val, 32).bpb  # noqa: E731
    result = Trainer(mcfg, tiny_train(iterations=4, val_every=1000), tmp_path, CPU, log=lambda s: None, val_fn=fn).run()
    weights.save_model(tmp_path / "raw.safetensors", result.raw, weights.model_meta(mcfg, result.passes))
    model, _ = weights.load_model(tmp_path / "raw.safetensors")
    assert model.passes == result.passes == model.max_passes
    assert score(model, val, 32).bpb == pytest.approx(result.metrics["final_val_bpb"], abs=1e-6)


def test_recurrence_left_off_by_a_short_run_stays_off(tmp_path):
    make_shards(tmp_path)
    mcfg = tiny_model(recur_start=1, recur_end=2, recur_loops=2, recur_after=0.9)
    result = Trainer(mcfg, tiny_train(iterations=3), tmp_path, CPU, log=lambda s: None).run()
    weights.save_model(tmp_path / "raw.safetensors", result.raw, weights.model_meta(mcfg, result.passes))
    model, _ = weights.load_model(tmp_path / "raw.safetensors")
    assert result.passes == model.passes == 0 and model.max_passes == 2
    assert [passes_at(p, mcfg) for p in (0.0, 0.89, 0.9, 1.0)] == [0, 0, 2, 2]
    progressive = tiny_model(recur_start=1, recur_end=2, recur_loops=2, recur_after=0.5, recur_stagger=0.15)
    assert [passes_at(p, progressive) for p in (0.49, 0.5, 0.64, 0.65)] == [0, 1, 1, 2]
    assert GPT(progressive).layer_order(2) == [0, 1, 2, 1, 2, 1, 2, 3]


def load_val_split(folder):
    from pgolf.data import ValSplit, load_val_tokens

    tokens = load_val_tokens(folder)
    return ValSplit(tokens, torch.ones_like(tokens))


def test_swa_and_qat_start_with_the_warmdown_not_during_the_warmup(tmp_path):
    make_shards(tmp_path)
    cfg = tiny_train(iterations=20, warmup_steps=100, warmdown_frac=0.3, swa=True, swa_threshold=0.5, swa_every=1,
                     qat_threshold=0.5)
    trainer = Trainer(tiny_model(), cfg, tmp_path, CPU, log=lambda s: None)
    assert lr_scale(0, 0, cfg) < 0.05 and warmdown(0, 0, cfg) == 1.0  # early: a small lr, no warmdown
    trainer.set_phase(0.0, warmdown(0, 0, cfg))
    trainer.update_averages(warmdown(0, 0, cfg))
    assert trainer.swa is None and all(m.qat_bits == 0 for m in trainer.model.modules() if isinstance(m, CastedLinear))
    result = trainer.run()
    # the warmdown factor (1 - step/20) / 0.3 is below 0.5 only after 85 % of the run: steps 18 and 19
    assert result.metrics["swa_count"] == 2
    assert all(m.qat_bits == cfg.qat_bits for m in trainer.model.modules() if isinstance(m, CastedLinear))


def test_lr_floor_bounds_the_warmdown():
    cfg = tiny_train(iterations=100, warmup_steps=0, warmdown_frac=0.5, lr_floor=0.1)
    assert [round(lr_scale(s, 0, cfg), 3) for s in (0, 49, 50, 75, 95, 99)] == [1.0, 1.0, 1.0, 0.5, 0.1, 0.1]


def test_polar_express_coefficients_orthogonalize_differently_from_the_quintic():
    g = torch.Generator().manual_seed(0)
    G = torch.randn(48, 80, dtype=torch.float64, generator=g)
    quintic, polar = newton_schulz(G, 5, "quintic"), newton_schulz(G, 5, "polar_express")
    sq, sp = torch.linalg.svdvals(quintic), torch.linalg.svdvals(polar)
    assert not torch.allclose(quintic, polar, atol=1e-3)
    # Polar Express is minimax-tuned per step: in the same 5 steps it lifts the small singular values further
    assert sp.min() > sq.min() + 0.1 and 0.8 < sp.min() and sp.max() < 1.2


def test_optimizers_carry_separate_weight_decays_and_adam_beta2():
    cfg = tiny_train(muon_wd=0.095, adam_wd=0.02, embed_wd=0.085, adam_beta2=0.99)
    muon, adam = optim.build_optimizers(GPT(tiny_model(tied_embed=False, bigram_buckets=32)), cfg)
    assert muon.param_groups[0]["weight_decay"] == 0.095
    decays = [g["weight_decay"] for g in adam.param_groups]
    assert decays == [0.085, 0.02, 0.02] and all(g["betas"] == (0.9, 0.99) for g in adam.param_groups)
    embeds = {id(p) for p in adam.param_groups[0]["params"]}
    assert len(embeds) == 2  # tok_emb and the bigram table


def test_compile_mode_reaches_torch_compile_and_an_unknown_one_is_refused(tmp_path, monkeypatch):
    """train.compile_mode: cuda_graphs asks inductor to record and replay the compiled step (reduce-overhead), the
    default asks nothing more; a name the registry lacks is one line naming the key and the valid names."""
    from pgolf import train
    from pgolf.config import check_fields
    from pgolf.errors import PgolfError

    make_shards(tmp_path)
    asked = []
    monkeypatch.setattr(train.torch, "compile", lambda model, **kw: asked.append(kw) or model)
    for mode in ("default", "cuda_graphs"):
        cfg = tiny_train(iterations=2, compile=True, compile_warmup_steps=0, compile_mode=mode)
        Trainer(tiny_model(), cfg, tmp_path, CPU, log=lambda s: None).run()
    assert asked == [{"dynamic": False}, {"dynamic": False, "mode": "reduce-overhead"}]
    with pytest.raises(PgolfError, match=r"^train.compile_mode: 'cudagraphs'; expected one of default, cuda_graphs$"):
        check_fields(tiny_train(compile_mode="cudagraphs"), "train")


def test_replayed_gradients_accumulate_over_micro_batches_as_eager_ones(tmp_path, monkeypatch):
    """A CUDA-graph replay leaves each gradient in the graph's own memory and the next replay overwrites it; autograd
    takes the first micro-batch's as p.grad. Simulated here by hooks that hand each gradient back in one fixed storage
    per weight: without the copy cuda_graphs makes, two micro-batches give different weights; with it, the eager
    ones."""
    from pgolf import train

    make_shards(tmp_path)
    monkeypatch.setattr(train.torch, "compile", lambda model, **kw: model)

    def run(mode: str, replay_memory: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        cfg = tiny_train(iterations=3, compile=mode != "eager", compile_warmup_steps=0,
                         compile_mode="default" if mode == "eager" else mode)
        trainer = Trainer(tiny_model(), cfg, tmp_path, CPU, log=lambda s: None)
        assert trainer.accum == 2
        if replay_memory:
            for p in trainer.params:
                storage = torch.empty_like(p).untyped_storage()  # the graph's output, written by every replay

                def replay(g, storage=storage):
                    out = torch.empty(0, dtype=g.dtype).set_(storage, 0, g.shape, g.stride())
                    return out.copy_(g)
                p.register_hook(replay)
        return trainer.run().raw

    eager = run("eager", replay_memory=False)
    overwritten = run("default", replay_memory=True)
    replayed = run("cuda_graphs", replay_memory=True)
    assert any(not torch.equal(eager[k], overwritten[k]) for k in eager)
    assert all(torch.equal(eager[k], replayed[k]) for k in eager)


def test_a_bf16_embedding_is_stored_and_stepped_in_bf16_and_handed_on_in_float32(tmp_path):
    """train.embed_dtype: bfloat16 (the record's trainer): the token embedding alone is kept in bf16 while training,
    so each AdamW step rounds it; the results hold float32 tensors (bf16's values), the other weights train as
    before in float32."""
    from pgolf.train import EMBED_DTYPES

    make_shards(tmp_path)
    runs = {}
    for dtype in ("float32", "bfloat16"):
        torch.manual_seed(0)
        trainer = Trainer(tiny_model(), tiny_train(iterations=8, embed_dtype=dtype, grad_clip=0.3), tmp_path, CPU,
                          log=lambda s: None)  # clipped as the record: the norm over mixed dtypes
        runs[dtype] = trainer.run()
        dtypes = {n: p.dtype for n, p in trainer.model.named_parameters()}
        assert dtypes.pop("tok_emb.weight") == EMBED_DTYPES[dtype] and set(dtypes.values()) == {torch.float32}
    bf16, fp32 = (runs[d].raw["tok_emb.weight"] for d in ("bfloat16", "float32"))
    assert bf16.dtype == fp32.dtype == runs["bfloat16"].ema["tok_emb.weight"].dtype == torch.float32
    assert torch.equal(bf16, bf16.bfloat16().float()) and not torch.equal(fp32, fp32.bfloat16().float())
    assert not torch.equal(bf16, fp32)
    losses = [runs[d].metrics["final_train_loss"] for d in ("bfloat16", "float32")]
    assert abs(losses[0] - losses[1]) < 0.05 * losses[1]  # the same training, rounded


def test_bf16_rope_frequencies_are_the_records_rounded_ones():
    """model.rope_freq_dtype: bfloat16 takes the angles from frequencies rounded to bf16, as the record's model (cast
    to bf16 and back) has them in training and eval: 0.031738 for 10000^(-3/8) = 0.031623 (partial RoPE, 16 of 64
    dims); the function changes with the positions."""
    from dataclasses import replace

    cfg = tiny_model(dim=64, heads=1, kv_heads=1, rope_dims=16)
    exact, rounded = (randomized(GPT(replace(cfg, rope_freq_dtype=d)), 3) for d in ("float32", "bfloat16"))
    freqs = [m._rope_angles(2)[1] for m in (exact, rounded)]
    assert freqs[0][3].item() == pytest.approx(10000 ** -0.375) and freqs[1][3].item() == 0.03173828125
    assert torch.equal(freqs[1], freqs[0].bfloat16().float()) and not torch.equal(freqs[0], freqs[1])
    rounded.load_state_dict(exact.state_dict())
    idx = torch.randint(0, 320, (1, 256))
    with torch.no_grad():
        a, b = exact.logits(idx), rounded.logits(idx)
    assert torch.equal(a[:, :1], b[:, :1]) and not torch.allclose(a, b, atol=1e-4)  # position 0 has no angle
