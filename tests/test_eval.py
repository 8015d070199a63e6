import copy
import math

import pytest
import torch
from conftest import make_docs, tiny_model
from test_model import randomized

from pgolf import audit, pack, ttt
from pgolf.config import AuditConfig, EvalConfig, QuantConfig, TTTConfig
from pgolf.data import ValSplit, byte_table
from pgolf.errors import PgolfError
from pgolf.evaluate import evaluate
from pgolf.model import GPT
from pgolf.quant import Problem
from pgolf.score import Scorer, score, windows


def val_stream(sp, n_docs=12):
    docs = [d.encode("ascii", "ignore").decode() for d in make_docs(n_docs, seed=9)]
    ids = []
    for d in docs:
        ids += [sp.bos_id(), *sp.encode(d)]
    return torch.tensor(ids), docs


def split(tokens, sp) -> ValSplit:
    return ValSplit(tokens, torch.cat([torch.zeros(1, dtype=torch.long), byte_table(sp).count(tokens[:-1], tokens[1:])]))


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
    model = randomized(GPT(tiny_model(xsa_last=2, smear_gate="channel", bigram_buckets=32)), 4)
    tokens, docs = val_stream(sp, n_docs=6)
    seq_len = 32
    n = tokens.numel()
    tokens = tokens[: (n - 1) // seq_len * seq_len + 1]  # whole windows: the reference needs no tail rule
    got = score(model, split(tokens, sp), seq_len, stride=0, batch_seqs=3)
    ref, ref_bytes = reference_bpb(model, tokens, sp, seq_len)
    assert got.bytes == ref_bytes and got.tokens == tokens.numel() - 1
    assert got.bpb == pytest.approx(ref, rel=1e-5)


@pytest.mark.parametrize("n, L, stride", [(1000, 64, 16), (1001, 64, 64), (65, 64, 8), (130, 64, 0), (777, 50, 7)])
def test_sliding_windows_score_every_token_exactly_once(n, L, stride):
    for first, last in [(1, n - 1), (1, 40), (n // 3, n // 2), (n - 5, n - 1)]:
        counts = torch.zeros(n, dtype=torch.long)
        for w in windows(n, L, stride, first, last):
            Lw = min(L, n - 1)
            assert w.start >= 0 and w.start + Lw <= n - 1 and 0 <= w.score_from < w.score_to <= Lw
            counts[w.start + 1 + w.score_from: w.start + 1 + w.score_to] += 1
            if w.start > 0:  # a scored target has at least L - stride of context
                assert w.score_from >= Lw - (stride or Lw)
        assert bool((counts[first:last + 1] == 1).all()) and counts.sum() == last - first + 1


def test_sliding_with_stride_seq_len_equals_non_overlapping(sp):
    model = randomized(GPT(tiny_model()), 5)
    tokens, _ = val_stream(sp)
    val = split(tokens, sp)
    a = score(model, val, 32, stride=0, batch_seqs=4)
    b = score(model, val, 32, stride=32, batch_seqs=7)
    c = score(model, val, 32, stride=8, batch_seqs=5)
    assert (a.nll_sum, a.bytes, a.tokens) == pytest.approx((b.nll_sum, b.bytes, b.tokens), rel=1e-9)
    assert c.tokens == a.tokens and c.bytes == a.bytes and c.nll_sum != pytest.approx(a.nll_sum, rel=1e-6)


def test_a_score_that_misses_or_repeats_targets_or_is_not_finite_is_an_error(sp):
    model = randomized(GPT(tiny_model()), 5)
    tokens, _ = val_stream(sp)
    val = split(tokens, sp)
    n = tokens.numel()
    scorer = Scorer(val, 32, 4, 1.0, torch.device("cpu"))
    scorer.score(model, windows(n, 32, 0, 1, n - 40))  # the last 39 targets never scored
    with pytest.raises(PgolfError, match=r"eval: 39 validation targets unscored and 0 scored more than once"):
        scorer.finish("eval")
    twice = Scorer(val, 32, 4, 1.0, torch.device("cpu"))
    twice.score(model, windows(n, 32, 0) + windows(n, 32, 0, 1, 10))
    with pytest.raises(PgolfError, match=r"0 validation targets unscored and 10 scored more than once"):
        twice.finish("eval")
    with pytest.raises(PgolfError, match=r"val bpb is nan \(not finite\)"):
        score(model, val, 32, temperature=float("nan"))


def spy_on_training(model):
    """Record every scoring and training forward as (kind, first target, last target)."""
    events = []
    original = model.token_nll

    def spy(x, y, temperature=1.0, doc_mask=False):
        events.append(("train" if model.training else "score", y.min().item(), y.max().item()))
        return original(x, y, temperature, doc_mask)

    model.token_nll = spy
    return events


def assert_scored_before_trained(events):
    scored_max, trained_max = 0, 0
    for kind, lo, hi in events:
        if kind == "score":  # a window's last target is always one it scores
            assert hi > trained_max, "scored a window whose targets had all been trained on"
            scored_max = max(scored_max, hi)
        else:
            assert hi <= scored_max, "adapted on a token before scoring it"
            trained_max = max(trained_max, hi)


@pytest.mark.parametrize("mode", ["ttt", "phased_ttt"])
def test_ttt_scores_targets_before_adapting_on_them(sp, mode):
    model = randomized(GPT(tiny_model(bos_id=0)), 6)
    tokens = torch.arange(1, 301)  # unique ids (a token's value is its position) but for BOS (0), every 40th
    tokens[::40] = 0
    val = ValSplit(tokens, torch.ones_like(tokens))
    plain = score(model, val, 32, stride=16)
    events = spy_on_training(model)
    cfg = EvalConfig(mode=mode, seq_len=32, stride=16, batch_seqs=4,
                     ttt=TTTConfig(chunk_tokens=64, epochs=2, optimizer="sgd", lr=0.5, prefix_docs=4, phases=2))
    got, record = evaluate(model, val, cfg, torch.device("cpu"))
    assert_scored_before_trained(events)
    assert record["val_tokens_trained_before_scored"] == 0 and record["ttt_units"] >= 2 and record["ttt_tokens_adapted"] > 0
    assert got.tokens == plain.tokens and got.nll_sum != pytest.approx(plain.nll_sum, rel=1e-4)


def test_the_legality_count_catches_training_on_unscored_targets(sp):
    """The count is taken from the ledger, not assumed: adapting on a span nobody scored is counted."""
    model = randomized(GPT(tiny_model()), 6)
    val = ValSplit(torch.arange(300), torch.ones(300, dtype=torch.long))
    scorer = Scorer(val, 32, 4, 1.0, torch.device("cpu"))
    adapter = ttt.Adapter(model, val, 32, TTTConfig(lr=0.1), torch.device("cpu"))
    scorer.score(model, windows(300, 32, 0, 1, 100))
    adapter.adapt(scorer, 1, 100, 0.1)
    assert adapter.trained_early == 0
    adapter.adapt(scorer, 90, 150, 0.1)
    assert adapter.trained_early == 50


def test_ttt_options_change_what_adapts(sp):
    model = randomized(GPT(tiny_model()), 6)
    last = ttt.PARAM_SETS["last_blocks"](model, TTTConfig(last_blocks=1))
    assert {id(p) for p in last} == {id(p) for p in model.blocks[-1].parameters()}
    assert all(p.ndim < 2 for p in ttt.PARAM_SETS["norms"](model, TTTConfig()))
    assert ttt.cosine(1.0, 0, 4, True) == 1.0 and ttt.cosine(1.0, 4, 4, True) == pytest.approx(0.0)
    assert ttt.cosine(1.0, 2, 4, False) == 1.0
    tokens = torch.arange(300)
    val = ValSplit(tokens, torch.ones_like(tokens))
    results = {}
    for name, t in [("sgd", TTTConfig(chunk_tokens=64, lr=0.5)), ("adamw", TTTConfig(chunk_tokens=64, optimizer="adamw", lr=0.01)),
                    ("clip", TTTConfig(chunk_tokens=64, lr=0.5, grad_clip=1e-4)),
                    ("last", TTTConfig(chunk_tokens=64, lr=0.5, params="last_blocks", last_blocks=1))]:
        m = copy.deepcopy(model)
        results[name] = evaluate(m, val, EvalConfig(mode="ttt", seq_len=32, ttt=t), torch.device("cpu"))[0].nll_sum
    assert len({round(v, 6) for v in results.values()}) == 4


def evidence(**kw):
    base = dict(code_bytes=100_000, model_bytes=15_900_000, train_seconds=590.0, calibration_seconds=5.0,
                calibration_reads_training_data=True, eval_seconds=300.0, train_hardware="8x NVIDIA H100",
                eval_hardware="8x NVIDIA H100", val_bpb=1.1, targets=1000, targets_expected=1000, bytes=2400,
                bytes_expected=2400, val_tokens_trained_before_scored=0, ttt="off", eval_inputs=["val_000000.bin"],
                blob_sha256="ab" * 32, scored_blob_sha256="ab" * 32, split_sha256="cd" * 32, scored_split_sha256="cd" * 32,
                val_docs_in_train=0, data_source="jsonl", val_docs=50_000)
    return audit.Evidence(**{**base, **kw})


def test_audit_size_limit_is_inclusive():
    cfg = AuditConfig()
    assert audit.check(evidence(), cfg)["passed"]
    assert audit.check(evidence(model_bytes=15_900_001), cfg)["failures"] == [
        "size: code 100,000 + model 15,900,001 = 16,000,001 bytes exceeds 16,000,000 by 1"]


def test_audit_counts_calibration_on_training_data():
    cfg = AuditConfig()
    over = audit.check(evidence(calibration_seconds=12.5), cfg)
    assert not over["passed"] and over["failures"][0].startswith(
        "train time: 590.0s training + 12.5s calibration on training data = 602.5s exceeds 600s by 2.5s")
    assert audit.check(evidence(calibration_seconds=12.5, calibration_reads_training_data=False), cfg)["passed"]


def test_audit_refuses_incomplete_non_finite_and_illegal_scores():
    cfg = AuditConfig()
    cases = {"coverage": evidence(targets=128), "score": evidence(val_bpb=float("nan")),
             "legality": evidence(val_tokens_trained_before_scored=3), "eval time": evidence(eval_seconds=601)}
    for what, ev in cases.items():
        report = audit.check(ev, cfg)
        assert not report["passed"] and report["failures"][0].startswith(what), report["failures"]
    bad = audit.check(evidence(eval_inputs=["val_000000.bin", "train_000000.bin"]), cfg)
    assert bad["failures"] == ["legality: eval read non-validation data: train_000000.bin"]
    assert audit.summary(audit.check(evidence(), cfg)) == \
        "val_bpb 1.100000 | total 16,000,000 bytes (0 under 16,000,000) | audit passed"


def test_audit_passed_certifies_the_challenge_and_names_every_deviation():
    """The attacker's table: a 50 MB limit, a one-document split, validation documents in train, a blob other than the
    one scored all passed before."""
    cfg = AuditConfig()
    assert audit.check(evidence(), cfg)["challenge"]
    loose = audit.check(evidence(model_bytes=16_800_000), AuditConfig(limit_bytes=50_000_000, eval_budget_s=900))
    assert loose["passed"] and not loose["challenge"]
    assert audit.summary(loose).endswith("| audit passed (not the challenge: limit 50,000,000 bytes; budgets 600 s "
                                         "train / 900 s eval)")
    partial = audit.check(evidence(val_docs=1), cfg)
    assert partial["deviations"] == ["a validation split of 1 documents, not 50,000"] and not partial["challenge"]
    assert audit.check(evidence(data_source="builtin", val_docs=16), cfg)["deviations"] == ["the built-in demo corpus"]
    assert audit.check(evidence(data_source="fineweb", val_docs=None), cfg)["challenge"]
    for kw, failure in [({"val_docs_in_train": 3}, "legality: 3 validation documents also appear in the training split"),
                        ({"scored_blob_sha256": "ef" * 32}, "integrity: the blob sized (sha256 abababababab) is not the "
                                                            "blob eval scored (efefefefefef); rerun eval"),
                        ({"scored_split_sha256": "00" * 32}, "coverage: eval scored validation tokens (sha256 "
                                                             "000000000000) other than the split tokenize wrote")]:
        report = audit.check(evidence(**kw), cfg)
        assert not report["passed"] and not report["challenge"] and report["failures"][0].startswith(failure)


def test_eval_refuses_a_blob_whose_sha_differs(tmp_path):
    model = GPT(tiny_model())
    state = {k: v for k, v in model.state_dict().items()}
    result = Problem(state, {}, {}, QuantConfig(method="rtn", keep_float_numel=1000)).quantize()
    meta = {"config": model.cfg.__dict__, "passes": 0}
    blob, _ = pack.pack(result, meta, pack.plan_streams(result, "zstd", "int8"))
    (tmp_path / "model.blob").write_bytes(blob)
    with pytest.raises(PgolfError, match=r"model.blob: sha256 .* differs from 000000000000... recorded by compress"):
        pack.load_model(tmp_path / "model.blob", "cpu", "0" * 64)
    import hashlib

    loaded = pack.load_model(tmp_path / "model.blob", "cpu", hashlib.sha256(blob).hexdigest())
    idx = torch.randint(0, 320, (1, 8))
    assert torch.allclose(loaded.logits(idx), model.logits(idx), atol=0.05)


def test_eval_is_deterministic(sp):
    model = randomized(GPT(tiny_model(xsa_last=1)), 8)
    tokens, _ = val_stream(sp)
    a = score(model, split(tokens, sp), 32, stride=8, batch_seqs=4)
    b = score(model, split(tokens, sp), 32, stride=8, batch_seqs=4)
    assert (a.nll_sum, a.bytes, a.tokens) == (b.nll_sum, b.bytes, b.tokens)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host syncs exist only with a device queue")
def test_scoring_a_batch_never_waits_for_the_device(sp):
    model = randomized(GPT(tiny_model(xsa_last=1)), 8).cuda()
    tokens, _ = val_stream(sp)
    wins = windows(tokens.numel(), 32, 8)
    Scorer(split(tokens, sp), 32, 4, 1.0, torch.device("cuda")).score(model, wins)  # first calls: handles, kernels
    scorer = Scorer(split(tokens, sp), 32, 4, 1.0, torch.device("cuda"))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        scorer.score(model, wins)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert scorer.finish("eval").tokens == tokens.numel() - 1
