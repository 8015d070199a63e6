import copy
import json
import math

import pytest
import torch

from conftest import make_docs, tiny_model
from pgolf import audit, pack
from pgolf.config import AuditConfig, QuantConfig, TTTConfig
from pgolf.data import byte_table
from pgolf.errors import PgolfError
from pgolf.evaluate import score, score_ttt, windows
from pgolf.model import GPT
from pgolf.quant import quantize_state
from test_model import randomized


def val_stream(sp, n_docs=12):
    docs = [d.encode("ascii", "ignore").decode() for d in make_docs(n_docs, seed=9)]
    ids = []
    for d in docs:
        ids += [sp.bos_id(), *sp.encode(d)]
    return torch.tensor(ids), docs


def reference_bpb(model, tokens, sp, seq_len):
    """float64, one target at a time, context = the non-overlapping window the target falls in
    (the stream holds whole windows); bytes from decoding each document's tokens."""
    model = model.double()
    nll = 0.0
    assert (tokens.numel() - 1) % seq_len == 0
    with torch.no_grad():
        for t in range(1, tokens.numel()):
            ctx = tokens[(t - 1) // seq_len * seq_len:t][None]
            logp = torch.log_softmax(model.logits(ctx)[0, -1].double(), -1)
            nll -= float(logp[tokens[t]])
    segments, cur = [], []
    for tok in tokens.tolist()[1:]:
        if tok == sp.bos_id():
            segments.append(cur)
            cur = []
        else:
            cur.append(tok)
    segments.append(cur)
    n_bytes = sum(len(sp.decode(s).encode()) for s in segments)
    return nll / math.log(2) / n_bytes, n_bytes


def test_bpb_equals_a_float64_token_by_token_reference(sp):
    torch.manual_seed(0)
    model = randomized(GPT(tiny_model(xsa_last=2, smear_gate=True, bigram_buckets=32)), 4)
    tokens, docs = val_stream(sp, n_docs=6)
    seq_len = 32
    n = tokens.numel()
    tokens = tokens[: (n - 1) // seq_len * seq_len + 1]  # whole windows: the reference needs no tail rule
    got = score(model, tokens, byte_table(sp), seq_len, stride=0, batch_seqs=3)
    ref, ref_bytes = reference_bpb(model, tokens, sp, seq_len)
    assert got.bytes == ref_bytes and got.tokens == tokens.numel() - 1
    assert got.bpb == pytest.approx(ref, rel=1e-5)


@pytest.mark.parametrize("n, L, stride", [(1000, 64, 16), (1001, 64, 64), (65, 64, 8), (130, 64, 0), (777, 50, 7)])
def test_sliding_windows_score_every_token_exactly_once(n, L, stride):
    counts = torch.zeros(n, dtype=torch.long)
    for w in windows(n, L, stride):
        Lw = min(L, n - 1)
        assert w.start >= 0 and w.start + Lw <= n - 1
        counts[w.start + 1 + w.score_from: w.start + 1 + Lw] += 1
        if w.start > 0:  # every scored token after the first window sees at least L - stride of context
            assert w.score_from >= Lw - (stride or Lw)
    assert counts[0] == 0 and bool((counts[1:] == 1).all())


def test_sliding_with_stride_seq_len_equals_non_overlapping(sp):
    model = randomized(GPT(tiny_model()), 5)
    tokens, _ = val_stream(sp)
    table = byte_table(sp)
    a = score(model, tokens, table, 32, stride=0, batch_seqs=4)
    b = score(model, tokens, table, 32, stride=32, batch_seqs=7)
    c = score(model, tokens, table, 32, stride=8, batch_seqs=5)
    assert (a.nll_sum, a.bytes, a.tokens) == pytest.approx((b.nll_sum, b.bytes, b.tokens), rel=1e-9)
    assert c.tokens == a.tokens and c.bytes == a.bytes and c.nll_sum != pytest.approx(a.nll_sum, rel=1e-6)


def test_ttt_scores_each_chunk_before_adapting_on_it(sp):
    model = randomized(GPT(tiny_model()), 6)
    tokens = torch.arange(300)  # unique ids: a token's value is its position
    table = byte_table(sp)
    plain = score(model, tokens, table, 32, stride=16)
    fresh = copy.deepcopy(model)
    events = []
    original = model.token_nll

    def spy(x, y, temperature=1.0):
        events.append(("train" if model.training else "score", y.min().item(), y.max().item()))
        return original(x, y, temperature)

    model.token_nll = spy
    ttt = TTTConfig(enabled=True, chunk_tokens=64, epochs=2, optimizer="sgd", lr=0.5, params="all")
    got, record = score_ttt(model, tokens, table, 32, 16, 4, ttt)
    scored_max, trained_max = 0, 0
    for kind, lo, hi in events:
        if kind == "score":  # a window's last target is always one it scores
            assert hi > trained_max, "scored a window whose targets had all been trained on"
            scored_max = max(scored_max, hi)
        else:
            assert hi <= scored_max, "adapted on a token before scoring it"
            trained_max = max(trained_max, hi)
    assert record["val_tokens_trained_before_scored"] == 0 and record["ttt_chunks"] > 2
    assert got.tokens == plain.tokens and got.nll_sum != pytest.approx(plain.nll_sum, rel=1e-4)
    # one chunk covering everything: nothing is adapted before scoring, so the score is the plain one
    whole, _ = score_ttt(fresh, tokens, table, 32, 16, 4, TTTConfig(enabled=True, chunk_tokens=10_000, lr=0.5))
    assert whole.nll_sum == pytest.approx(plain.nll_sum, rel=1e-9)


def evidence(**kw):
    base = dict(code_bytes=100_000, model_bytes=15_900_000, train_seconds=590.0, calibration_seconds=5.0,
                calibration_source="train", eval_seconds=300.0, train_hardware="8x NVIDIA H100",
                eval_hardware="8x NVIDIA H100", val_tokens_trained_before_scored=0, ttt_enabled=False,
                eval_inputs=["val_000000.bin"])
    return audit.Evidence(**{**base, **kw})


def test_audit_size_limit_is_inclusive():
    cfg = AuditConfig()
    assert audit.check(evidence(), cfg)["passed"]
    assert audit.check(evidence(model_bytes=15_900_001), cfg)["failures"] == [
        "size: code 100,000 + model 15,900,001 = 16,000,001 bytes exceeds 16,000,000 by 1"]


def test_audit_counts_calibration_on_training_data():
    cfg = AuditConfig()
    over = audit.check(evidence(calibration_seconds=12.5), cfg)
    assert not over["passed"] and over["failures"] == [
        "train time: 590.0s training + 12.5s calibration on training data = 602.5s exceeds 600s by 2.5s"]
    assert audit.check(evidence(calibration_seconds=12.5, calibration_source="self"), cfg)["passed"]
    bad = audit.check(evidence(eval_seconds=601, val_tokens_trained_before_scored=3,
                               eval_inputs=["val_000000.bin", "train_000000.bin"]), cfg)
    assert len(bad["failures"]) == 3 and not bad["passed"]


def test_eval_refuses_a_blob_whose_sha_differs(tmp_path, monkeypatch):
    from stages import eval as eval_stage

    model = GPT(tiny_model())
    state = {k: v for k, v in model.state_dict().items()}
    result = quantize_state(state, {}, {}, QuantConfig(method="rtn", keep_float_numel=1000))
    blob, _ = pack.pack(result, {"config": model.cfg.__dict__}, "zstd", "int8")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "artifacts" / "compress").mkdir(parents=True)
    (tmp_path / "artifacts" / "compress" / "model.blob").write_bytes(blob)
    (tmp_path / "artifacts" / "compress" / "metrics.json").write_text(json.dumps({"blob_sha256": "0" * 64}))
    with pytest.raises(PgolfError, match=r"model.blob: sha256 .* differs from 000000000000... recorded by compress"):
        eval_stage.load_blob_model(torch.device("cpu"))
    import hashlib

    (tmp_path / "artifacts" / "compress" / "metrics.json").write_text(json.dumps({"blob_sha256": hashlib.sha256(blob).hexdigest()}))
    loaded = eval_stage.load_blob_model(torch.device("cpu"))
    idx = torch.randint(0, 320, (1, 8))
    assert torch.allclose(loaded.logits(idx), model.logits(idx), atol=0.05)


def test_eval_is_deterministic(sp):
    model = randomized(GPT(tiny_model(xsa_last=1)), 8)
    tokens, _ = val_stream(sp)
    a = score(model, tokens, byte_table(sp), 32, stride=8, batch_seqs=4)
    b = score(model, tokens, byte_table(sp), 32, stride=8, batch_seqs=4)
    assert (a.nll_sum, a.bytes, a.tokens) == (b.nll_sum, b.bytes, b.tokens)
