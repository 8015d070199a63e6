"""The record's training-side pieces: document-masked attention, two-lane parallel residuals, the SmearGate's gate in
the scalar group, and calibration on random windows."""

import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, bench_module, tiny_model

from pgolf import attention, calibrate, optim
from pgolf.config import CalibrateConfig
from pgolf.model import GPT, rms_norm

BOS = 1
RECORD_LIKE = dict(vocab_size=320, layers=6, dim=32, heads=4, kv_heads=2, mlp_mult=2.0, rope_dims=4, xsa_last=6,
                   ln_scale=True, unet_skips=True, skip_gates=True, smear_gate="bos", sparse_gate=True,
                   activation="leaky_relu2", parallel_from=4, parallel_lanes=2, recur_start=1, recur_end=2)


def randomized(cfg) -> GPT:
    """A model whose every weight matters (the zero-initialised projections would hide attention)."""
    torch.manual_seed(0)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * (0.3 if p.ndim > 1 else 0.2))
    return model.eval()


def packed_documents(lengths: list[int], seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.cat([torch.tensor([BOS]), torch.randint(4, 320, (n - 1,), generator=g)]) for n in lengths]


def test_document_masked_attention_gives_each_token_the_loss_of_its_document_run_alone():
    model = randomized(tiny_model(**RECORD_LIKE))
    docs = packed_documents([9, 23, 5, 27])  # two rows of 32 tokens: [9, 23] and [5, 27]
    rows = torch.stack([torch.cat(docs[:2]), torch.cat(docs[2:])])
    x, y = rows[:, :-1], rows[:, 1:]
    with torch.no_grad():
        masked = model.token_nll(x, y, doc_mask=True)
        unmasked = model.token_nll(x, y)
        for r, (a, b) in enumerate([docs[:2], docs[2:]]):
            alone_a = model.token_nll(a[None, :-1], a[None, 1:])[0]
            alone_b = model.token_nll(b[None, :-1], b[None, 1:])[0]
            assert torch.allclose(masked[r, :len(a) - 1], alone_a, atol=1e-5)
            assert torch.allclose(masked[r, len(a):], alone_b, atol=1e-5)
    assert (masked[:, 10:] - unmasked[:, 10:]).abs().max() > 1e-2  # without the mask the second documents see the first


@pytest.mark.parametrize("max_len", [None, 16])
@pytest.mark.parametrize("backend", ["flex", "fa3", "varlen"])
def test_every_attention_backend_masks_documents_alike(backend, max_len, monkeypatch):
    """FlexAttention's block mask and the packed sequence cut at cu_seqlens (FlashAttention-3's, here through
    bench/standin's stand-in of flash_attn_interface, and PyTorch's varlen attention's, whose CPU fallback rebuilds
    the documents from cu_seqlens) give the dense mask's attention; also with documents cut every max_len tokens."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 64, 4, 8), torch.randn(2, 64, 2, 8), torch.randn(2, 64, 2, 8)
    idx = torch.randint(4, 320, (2, 64))
    idx[0, [0, 17, 40]] = BOS
    idx[1, [5, 6, 63]] = BOS
    dense = attention.attention(q, k, v, attention.document_mask(idx, BOS, "dense", max_len=max_len))
    if backend == "fa3":
        monkeypatch.syspath_prepend(str(ROOT / "bench" / "standin"))
        sys.modules.pop("flash_attn_interface", None)
        from flash_attn_interface import flash_attn_varlen_func

        monkeypatch.setattr(attention, "_fa3_varlen", flash_attn_varlen_func)
    other = attention.attention(q, k, v, attention.document_mask(idx, BOS, backend, max_len=max_len))
    assert torch.allclose(other, dense, atol=1e-5)
    if backend != "flex":  # the starts found in the host's copy of the ids are the device's
        host = attention.document_mask(idx, BOS, backend, host_idx=idx.clone(), max_len=max_len)
        assert torch.equal(host.mask, attention.document_mask(idx, BOS, backend, max_len=max_len).mask)
    causal = attention.attention(q, k, v)
    assert (causal - dense).abs().max() > 1e-2
    if max_len:  # documents of 23 and 57 tokens are cut
        uncut = attention.attention(q, k, v, attention.document_mask(idx, BOS, "dense"))
        assert (uncut - dense).abs().max() > 1e-2


def test_a_packed_row_gives_each_token_the_loss_of_its_stretch_alone():
    """train.pack: span: a rank's micro-batch is one row, cut at every BOS and every seq_len tokens from a document's
    start (the records' cu_seqlens): each token's loss is that of its stretch run alone. A document crossing a
    boundary of the rows the same tokens would make keeps its context. (Without the SmearGate: it mixes in the token
    before a cut inside a document, in the records' packed rows too.)"""
    model = randomized(tiny_model(**{**RECORD_LIKE, "smear_gate": "off"}))
    docs = packed_documents([5, 19, 3, 13], seed=7)  # 40 tokens: as rows of 8, the 19-token document crosses 2 rows
    row = torch.cat(docs)[None]
    x, y = row[:, :-1], row[:, 1:]
    stretches = [(0, 5), (5, 13), (13, 21), (21, 24), (24, 27), (27, 35), (35, 39)]  # every 8 from each start
    with torch.no_grad():
        packed = model.token_nll(x, y, doc_mask=attention.document_mask(x, BOS, max_len=8))[0]
        rows = model.token_nll(x[:, :32].reshape(4, 8), y[:, :32].reshape(4, 8), doc_mask=True).reshape(-1)
        for a, b in stretches:
            alone = model.token_nll(x[:, a:b], y[:, a:b])[0]
            assert torch.allclose(packed[a:b], alone, atol=1e-5), (a, b)
    assert (packed[8:13] - rows[8:13]).abs().max() > 1e-2  # rows of 8 cut the 19-token document at 8; the span not


def test_the_fa3_stand_in_compiles_in_a_full_graph_with_the_dense_masks_values_and_gradients(monkeypatch):
    """The record compiles its model with fullgraph=True: the stand-in's varlen function must trace without a break
    and give, through the padded cu_seqlens the record builds, the dense document mask's values and gradients."""
    monkeypatch.syspath_prepend(str(ROOT / "bench" / "standin"))
    sys.modules.pop("flash_attn_interface", None)
    import flash_attn_interface as standin

    torch.manual_seed(0)
    q, k, v = torch.randn(48, 4, 8), torch.randn(48, 2, 8), torch.randn(48, 2, 8)
    cu = torch.tensor([0, 5, 20, 21, 48, 48, 48, 48], dtype=torch.int32)
    idx = torch.full((1, 48), 7)
    idx[0, [0, 5, 20, 21]] = BOS
    w = torch.randn(48, 4, 8)

    def loss(q, k, v):
        return (standin.flash_attn_varlen_func(q * 2, k, v.sin(), cu, cu, 27, 27, causal=True) * w).sum()

    def reference(q, k, v):
        return (attention.attention((q * 2)[None], k[None], v.sin()[None],
                                    attention.document_mask(idx, BOS, "dense"))[0] * w).sum()

    grads = []
    for fn in (reference, loss, torch.compile(loss, fullgraph=True, backend="aot_eager")):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        value = fn(*leaves)
        value.backward()
        grads.append([value.detach()] + [t.grad for t in leaves])
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            assert torch.allclose(a, b, atol=1e-5)


def test_the_block_mask_built_from_block_ends_equals_the_one_flex_evaluates_per_pair():
    from torch.nn.attention.flex_attention import create_block_mask

    g = torch.Generator().manual_seed(1)
    for T in (512, 700):  # whole blocks, and a partial last block
        idx = torch.randint(4, 320, (3, T), generator=g)
        idx[0, [0, 100, 101, 400]] = BOS  # short documents, one inside a block
        idx[1, 300] = BOS  # a row that starts mid-document
        idx[2, torch.randint(0, T, (40,), generator=g)] = BOS
        docs = attention.document_ids(idx, BOS)
        ours = attention.block_mask(docs)
        ref = create_block_mask(lambda b, h, q, k: (docs[b, q] == docs[b, k]) & (q >= k), 3, None, T, T, device="cpu")
        assert torch.equal(ours.to_dense(), ref.to_dense())
        assert torch.equal(ours.full_kv_num_blocks, ref.full_kv_num_blocks)


def record_hidden(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """The record's _forward_hidden (2026-04-27 train_gpt.py) written out on pgolf's modules: sequential blocks, then
    from parallel_start_layer two lanes (attention reads lane 0 mixed with x0, the MLP reads lane 1, each output
    enters each lane through parallel_post_lambdas, each lane carries itself times parallel_resid_lambdas), U-Net
    skips into lane 0, the output the mean of the lanes."""
    cfg = model.cfg
    x = F.embedding(idx, model.tok_emb.weight)
    x = rms_norm(model.smear(x, idx))
    x0 = x
    cos, sin = model._rope(idx.size(1), idx.device, x.dtype)
    order = model.layer_order()
    enc, dec = order[:len(order) // 2], order[len(order) // 2:]
    skips = []
    for i in enc:
        x = model.blocks[i](x, x0, cos, sin, None)
        skips.append(x)
    lane0 = lane1 = None
    for skip_idx, i in enumerate(dec):
        b = model.blocks[i]
        if i >= cfg.parallel_from:
            if lane0 is None:
                lane0 = lane1 = x
            if skips:
                g = torch.sigmoid(model.skip_gates[skip_idx])
                lane0 = torch.lerp(model.skip_weights[skip_idx] * skips.pop(), lane0, g)
            mix = b.resid_mix
            attn_out = b.attn(rms_norm(mix[0] * lane0 + mix[1] * x0) * b.norm_scale, cos, sin, None) * b.attn_scale
            mlp_out = b.mlp(rms_norm(lane1) * b.norm_scale) * b.mlp_scale
            attn_post, mlp_post, resid = b.lane_post[0], b.lane_post[1], b.lane_resid
            lane0 = resid[0] * lane0 + attn_post[0] * attn_out + mlp_post[0] * mlp_out
            lane1 = resid[1] * lane1 + attn_post[1] * attn_out + mlp_post[1] * mlp_out
        else:
            if skips:
                g = torch.sigmoid(model.skip_gates[skip_idx])
                x = torch.lerp(model.skip_weights[skip_idx] * skips.pop(), x, g)
            x = b(x, x0, cos, sin, None)
    return rms_norm(0.5 * (lane0 + lane1))


def test_two_lane_parallel_residuals_follow_the_records_formula():
    model = randomized(tiny_model(**RECORD_LIKE))
    assert model.layer_order() == [0, 1, 2, 1, 2, 3, 4, 5]  # the loop runs before the lanes
    idx = torch.randint(0, 320, (2, 24))
    idx[:, 0] = BOS
    with torch.no_grad():
        ours, theirs = model.hidden(idx), record_hidden(model, idx)
        one_lane = randomized(tiny_model(**RECORD_LIKE | {"parallel_lanes": 1}))
        one_lane.load_state_dict({k: v for k, v in model.state_dict().items() if "lane_" not in k})
        gptj = one_lane.hidden(idx)
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert (ours - gptj).abs().max() > 1e-2
    assert sum(p.numel() for n, p in model.named_parameters() if "lane_" in n) == 2 * 6  # layers 4 and 5: 4 + 2 each


def test_the_smear_gate_is_a_scalar_for_adamw_not_a_matrix_for_muon():
    model = GPT(tiny_model(**RECORD_LIKE))
    opts = optim.build_optimizers(model, __import__("conftest").tiny_train())
    muon = {id(p) for g in opts[0].param_groups for p in g["params"]}
    adam = {id(p) for g in opts[1].param_groups for p in g["params"]}
    assert id(model.smear.gate.weight) in adam and id(model.smear.gate.weight) not in muon
    assert id(model.blocks[0].attn.q.weight) in muon
    assert {id(model.blocks[5].lane_post), id(model.blocks[5].lane_resid)} <= adam


def test_random_calibration_windows_are_random_and_reproducible():
    shards = [np.arange(10_000, dtype=np.uint16), np.arange(50_000, 57_000, dtype=np.uint16)]
    cfg = CalibrateConfig(sampling="random", num_seqs=40, seq_len=128, seed=3)
    a, b = calibrate.random_windows(shards, cfg), calibrate.random_windows(shards, cfg)
    assert a.shape == (40, 128) and np.array_equal(a, b)
    assert (np.diff(a, axis=1) == 1).all()  # each a contiguous window of one shard
    starts = a[:, 0]
    assert len(set(starts.tolist())) == 40 and ((starts >= 50_000).any() and (starts < 10_000).any())
    assert not np.array_equal(calibrate.random_windows(shards, CalibrateConfig(sampling="random", num_seqs=40,
                                                                              seq_len=128, seed=4)), a)
    stream = calibrate.stream_windows(shards, CalibrateConfig(num_seqs=4, seq_len=128))
    assert stream[0, 0] == 0 and (stream.reshape(-1) == np.arange(512)).all()


def test_document_masked_scoring_scores_every_target_once_each_from_its_own_bos():
    """eval.doc_mask: sliding windows still score every target exactly once (the Scorer's ledger checks it), and a
    document shorter than the windows' guaranteed context is scored as if it were alone."""
    from pgolf.data import ValSplit
    from pgolf.score import score

    model = randomized(tiny_model(**RECORD_LIKE))
    docs = packed_documents([9, 14, 5, 11, 13, 7, 12, 10], seed=3)
    tokens = torch.cat(docs)
    val = ValSplit(tokens, torch.ones_like(tokens))
    masked = score(model, val, seq_len=32, stride=8, doc_mask=True)
    plain = score(model, val, seq_len=32, stride=8)
    with torch.no_grad():
        alone = sum(model.token_nll(d[None, :-1], d[None, 1:]).sum().item() for d in docs)
        # the next document's BOS as a target is predicted from this document's last token, in this document's context
        bos_targets = sum(model.token_nll(a[None], torch.cat([a[1:], b[:1]])[None])[0, -1].item()
                          for a, b in zip(docs, docs[1:]))
    assert masked.tokens == plain.tokens == tokens.numel() - 1
    assert abs(masked.nll_sum - (alone + bos_targets)) < 1e-3 and abs(plain.nll_sum - masked.nll_sum) > 1e-2


def test_a_preferred_document_mask_backend_holds_on_cuda_only_until_reset():
    cuda = torch.device("cuda")
    default = attention.default_backend(cuda)
    assert default in ("fa3", "flex")
    attention.prefer("varlen")
    try:
        assert attention.default_backend(cuda) == "varlen"
        assert attention.default_backend(torch.device("cpu")) == "dense"
    finally:
        attention.prefer(None)
    assert attention.default_backend(cuda) == default


def test_flex_gets_the_tuned_tiles_on_their_gpu_and_a_benchs_candidate_until_reset(monkeypatch):
    """FLEX_KERNEL_OPTIONS reaches FlexAttention for the GPU, head dim and dtype it was measured on, and nothing else;
    its tiles fit the block mask's 128-token blocks and the kernels' static asserts (a tile that does not divide
    a block is refused when flex compiles, on the GPU only); tune_flex's candidate replaces it until reset."""
    from types import SimpleNamespace

    from torch.nn.attention import flex_attention as flex_module

    block = 128  # block_mask's default
    for (_, head_dim, _), opts in attention.FLEX_KERNEL_OPTIONS.items():
        assert block % opts["fwd_BLOCK_M"] == 0 and block % opts["fwd_BLOCK_N"] == 0
        assert all(block % opts[f"bwd_BLOCK_{t}"] == 0 for t in ("M1", "N1", "M2", "N2"))
        assert opts["bwd_BLOCK_N1"] % opts["bwd_BLOCK_M1"] == 0 and opts["bwd_BLOCK_M2"] % opts["bwd_BLOCK_N2"] == 0
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))

    def gpu_q(head_dim, dtype):
        return SimpleNamespace(is_cuda=True, device="cuda:0", dtype=dtype, size=lambda dim: head_dim)
    tuned = attention.FLEX_KERNEL_OPTIONS[(9, 64, torch.bfloat16)]
    assert attention.flex_options(gpu_q(64, torch.bfloat16)) is tuned
    assert attention.flex_options(gpu_q(128, torch.bfloat16)) is None  # not measured: inductor's own
    assert attention.flex_options(gpu_q(64, torch.float32)) is None
    seen = []
    monkeypatch.setattr(flex_module, "flex_attention", lambda *a, **kw: seen.append(kw["kernel_options"]) or a[0])
    q = torch.randn(1, 2, 128, 8)
    mask = attention.block_mask(torch.ones(1, 128, dtype=torch.long))
    candidate = {"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 64}
    try:
        for options in (candidate, {}):
            attention.tune_flex(options)
            attention._flex(q, q, q, mask)
    finally:
        attention.tune_flex(None)
    attention._flex(q, q, q, mask)
    assert seen == [candidate, None, None]  # {}: inductor's own tiles; then the table's, none on the CPU


def test_the_parity_bench_scores_the_records_eval_contexts_each_as_if_alone(monkeypatch):
    """bench/record_parity.py's like-for-like val row scores pgolf's model in the record's eval contexts: its batches
    of 32 windows' worth of inputs, cut at every BOS, every seq_len tokens from a document's start and at each batch's
    start (its cu_seqlens). Every target it scores is scored once, with the loss of its segment run alone."""
    import math

    from pgolf.data import ValSplit

    record_parity = bench_module(monkeypatch, "record_parity")

    model = randomized(tiny_model(**RECORD_LIKE))
    docs = packed_documents([30, 5, 70, 200, 12, 300, 9, 40], seed=5)
    tokens = torch.cat(docs)
    starts = torch.cumsum(torch.tensor([0] + [d.numel() for d in docs]), 0)
    segments = record_parity.record_segments(tokens, BOS, 8)
    batch = record_parity.RECORD_VAL_SEQS * 8
    assert [s for s, _ in segments][0] == 0 and all(a[1] == b[0] for a, b in zip(segments, segments[1:]))
    assert segments[-1][1] == record_parity.record_targets(tokens.numel(), 8) == 2 * batch  # the rest dropped
    for s, e in segments:
        doc = int((starts <= s).sum()) - 1
        assert e - s <= 8 and e <= starts[doc + 1]  # inside one document
        assert (s - max(int(starts[doc]), s // batch * batch)) % 8 == 0  # every 8 from the document's (or batch's) start
    mid_document = (batch - int(starts[int((starts <= batch).sum()) - 1])) % 8  # 256 is off its document's grid
    assert mid_document and any(s == batch for s, _ in segments)  # yet a batch restarts the context there
    with torch.no_grad():
        alone = sum(model.token_nll(tokens[None, s:e], tokens[None, s + 1:e + 1]).sum().item() for s, e in segments)
    val = ValSplit(tokens, torch.ones_like(tokens))
    bpb = record_parity.score_segments(model, val, segments, 8, torch.device("cpu"))
    assert abs(bpb - alone / math.log(2) / (2 * batch)) < 1e-5
    short = ValSplit(tokens[:batch], torch.ones(batch, dtype=torch.long))  # not one whole batch of the record's eval
    with pytest.raises(SystemExit, match="holds none of the record's eval batches"):
        record_parity.score_segments(model, short, record_parity.record_segments(short.tokens, BOS, 8), 8,
                                     torch.device("cpu"))


def test_the_parity_bench_runs_pgolfs_side_with_preset_changes_checked_as_params_load(monkeypatch, tmp_path):
    """record_parity.py --set train.pack=span: an A/B under the harness; a change that is not a param, or a value the
    params refuse, stops the bench with one line before anything runs."""
    from pgolf.config import load_params

    record_parity = bench_module(monkeypatch, "record_parity")

    preset = ROOT / "presets" / "record.yaml"
    out = record_parity.preset_with(preset, ["train.pack=span", "train.grad_clip=0.25"], tmp_path)
    changed, base = load_params(out), load_params(preset)
    assert (changed.train.pack, changed.train.grad_clip) == ("span", 0.25)
    assert changed.model == base.model and changed.eval == base.eval
    for bad, says in (("train.pack=diagonal", "train.pack"), ("trian.pack=span", "trian.pack"),
                      ("train.pack", "train.pack")):
        with pytest.raises(SystemExit) as e:
            record_parity.preset_with(preset, [bad], tmp_path)
        assert says in str(e.value) and "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == [out]  # a refused change leaves no file


def test_the_parity_bench_times_each_phase_on_its_own_steps_and_means_the_loss_over_steps_both_logged(monkeypatch):
    """record_parity.py's phases: steps 10-100 and 125-300 of a 300-step run; in a 60-step run (the 8-GPU micro-batch
    at fixed device time) steps 5-20 and 25-60, neither reaching into step 1's compile nor the loop switch's. The
    train loss mean covers only the steps both sides logged (the record logs steps 1-5, pgolf 1 and 5)."""
    record_parity = bench_module(monkeypatch, "record_parity")

    def clock(steps: int) -> np.ndarray:
        # step 1 compiles (100 s); each later step a little slower than the one before (so that a phase's rate names
        # its first and last step), by 1 s more after the loop switch at 35 %
        return np.cumsum([0.0, 100.0] + [1.0 + s / 1000 + (s > 0.35 * steps) for s in range(2, steps + 1)])

    def trace(steps: int, logged: list[int], loss=lambda s: 1.0) -> list:
        return [(s, float(clock(steps)[s]), loss(s)) for s in logged]

    def rate(steps: int, a: int, b: int) -> dict:
        sec = (clock(steps)[b] - clock(steps)[a]) / (b - a)
        return {"ms_per_step": round(1000 * sec, 1), "tokens_per_s": round(1000 / sec)}

    for steps, before, after in ((300, (10, 100), (125, 300)), (60, (5, 20), (25, 60))):
        rates = record_parity.phase_rates(trace(steps, [1] + list(range(5, steps + 1, 5))), 1000, steps)
        assert rates == {"before loops": rate(steps, *before), "after loops": rate(steps, *after)}, steps
        assert rate(steps, *before) != rate(steps, before[0] + 5, before[1])  # the first step is pinned
    cut = record_parity.phase_rates(trace(300, [1] + list(range(5, 135, 5))), 1000, 300)
    assert cut["before loops"] == rate(300, 10, 100) and np.isnan(cut["after loops"]["ms_per_step"])

    record_steps, pgolf_steps = [1, 2, 3, 4] + list(range(5, 61, 5)), [1] + list(range(5, 61, 5))
    rec = {"trace": trace(60, record_steps, lambda s: 9.0 if s in (2, 3, 4) else 3.0), "peak_memory_gib": 1.0,
           "val_bpb_raw": 1.0, "val_bpb_ema": 1.0}
    pg = {**rec, "trace": trace(60, pgolf_steps, lambda s: 3.0)}
    _, result = record_parity.table(rec, pg, 1000, 60)
    assert result["loss_diff_last_100"] == 0.0  # steps 2-4, the record's alone, left out
    assert result["tokens_per_s_ratio_min"] == 1.0
