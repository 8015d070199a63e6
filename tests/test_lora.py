"""eval.mode lora_ttt: each document scored from its BOS, chunk by chunk, with a LoRA of its own trained on what it
has scored; the ledger catches any training on a target not yet scored."""

import copy
from dataclasses import replace

import pytest
import torch
from conftest import ROOT, bench_module, tiny_model
from test_eval import evidence
from test_model import randomized

from pgolf import audit, lora
from pgolf.config import AuditConfig, EvalConfig, TTTConfig, load_params
from pgolf.data import ValSplit
from pgolf.errors import PgolfError
from pgolf.evaluate import evaluate
from pgolf.model import GPT

BOS = 0
CPU = torch.device("cpu")


def repeating_documents(n_docs: int = 6, period: int = 30, repeats: int = 5) -> ValSplit:
    """Documents that each repeat a random phrase of their own: what a document's LoRA can learn as it goes."""
    g = torch.Generator().manual_seed(0)
    docs = [torch.cat([torch.tensor([BOS]), torch.randint(1, 64, (period,), generator=g).repeat(repeats)])
            for _ in range(n_docs)]
    tokens = torch.cat(docs)
    return ValSplit(tokens, torch.ones_like(tokens))


def lora_cfg(**ttt) -> EvalConfig:
    t = dict(chunk_tokens=16, lora_rank=4, lora_alpha=8.0, lr=0.01, batch_docs=4, grad_steps=2) | ttt
    return EvalConfig(mode="lora_ttt", seq_len=64, doc_mask=True, ttt=TTTConfig(**t))


def test_documents_partition_the_targets_with_each_bos_closing_the_document_before_it():
    tokens = torch.tensor([0, 5, 6, 0, 7, 0, 0, 8, 9])
    assert lora.documents(tokens, 0) == [(0, 3), (3, 5), (5, 6), (6, 8)]  # targets 1-3, 4-5, 6, 7-8
    assert lora.documents(torch.tensor([4, 5, 0, 6]), 0) == [(0, 2), (2, 3)]  # a split that starts mid-document


def test_lora_ttt_learns_each_document_as_it_scores_it_and_covers_every_target_once():
    model = randomized(GPT(tiny_model(bos_id=BOS)), 6)
    val = repeating_documents()
    sliding, _ = evaluate(model, val, EvalConfig(mode="sliding", seq_len=64, doc_mask=True), CPU)
    got, record = evaluate(model, val, lora_cfg(), CPU)
    assert got.tokens == sliding.tokens == val.tokens.numel() - 1  # Scorer.finish checked each target once
    assert got.bpb < 0.8 * sliding.bpb, (got.bpb, sliding.bpb)
    assert record["ttt"] == "lora" and record["val_tokens_trained_before_scored"] == 0 and record["ttt_tokens_adapted"] > 0
    assert all(m.lora is None for b in model.blocks for m in (b.attn.q, b.attn, b.mlp)) and model.head_lora is None
    assert all(p.requires_grad for p in model.parameters())  # the base model was frozen only while it ran


def test_a_lora_score_repeats_whatever_the_global_rng_and_its_seed_draws_the_loras():
    """The LoRAs' A come from eval.ttt.seed, not the global RNG (a run's earlier draws moved the bench's LoRA rows by
    0.009 bpb on a small model): the same seed, the same score after any other draw; another seed, another A, with
    global SGD's re-draw after each phase included."""
    model = randomized(GPT(tiny_model(bos_id=BOS)), 6)
    val = repeating_documents()
    cfg = lora_cfg(global_lr=0.01, prefix_docs=4, phases=2)
    scores = []
    for seed, draws in ((0, 0), (0, 7), (1, 0)):
        torch.randn(draws)  # what ran before the eval
        s, _ = evaluate(copy.deepcopy(model), val, replace(cfg, ttt=replace(cfg.ttt, seed=seed)), CPU)
        scores.append(s.bpb)
    assert scores[0] == scores[1] != scores[2]


def test_an_untrained_lora_changes_nothing_each_document_scored_from_its_bos():
    """lr 0: B stays zero, so the score is the base model's on each document alone (chunks, padding and context
    assembled right)."""
    model = randomized(GPT(tiny_model(bos_id=BOS)), 6)
    val = repeating_documents(n_docs=3, period=20, repeats=3)
    got, _ = evaluate(model, val, lora_cfg(lr=0.0, chunk_tokens=7), CPU)
    expected = 0.0
    with torch.no_grad():
        for s, e in lora.documents(val.tokens, BOS):
            doc = val.tokens[s:e + 1]
            expected += float(model.token_nll(doc[None, :-1], doc[None, 1:]).double().sum())
    assert got.nll_sum == pytest.approx(expected, rel=1e-6)


def test_the_fused_chunk_step_scores_and_trains_as_the_two_pass_step(monkeypatch):
    """One forward both scores a chunk and starts its training: the same score and the same trained LoRAs as a
    no-grad scoring forward followed by a training forward, at one forward fewer a chunk."""
    model = randomized(GPT(tiny_model(bos_id=BOS)), 6)
    val = repeating_documents()
    forwards = []
    real = lora.LoraTTT._forward
    monkeypatch.setattr(lora.LoraTTT, "_forward", lambda self, *a: forwards.append(1) or real(self, *a))
    runs = {}
    for fuse in (True, False):
        monkeypatch.setattr(lora.LoraTTT, "FUSE", fuse)
        forwards.clear()
        torch.manual_seed(0)  # the LoRAs' A
        s, record = evaluate(copy.deepcopy(model), val, lora_cfg(), CPU)
        runs[fuse] = (s, record, len(forwards))
    (fused, rf, nf), (two, rt, nt) = runs[True], runs[False]
    assert fused.tokens == two.tokens == val.tokens.numel() - 1
    assert fused.nll_sum == pytest.approx(two.nll_sum, rel=1e-9)
    assert rf == rt and rf["val_tokens_trained_before_scored"] == 0
    assert nf == nt - rt["ttt_units"] > 0  # one forward fewer for each chunk trained on


def test_each_pass_of_a_looped_layer_has_loras_of_its_own_and_o_and_mlp_adapt_from_their_inputs():
    """As the record's slots: layers 1-2 run three times, so each of their sites holds three LoRAs (stacked: the
    model's pass hook picks one), and one chunk step trains all three; o and mlp are adapters from the attention's
    and the MLP's inputs to their outputs."""
    model = randomized(GPT(tiny_model(bos_id=BOS, recur_start=1, recur_end=2, recur_loops=2)), 6)
    model.passes = 2
    order = model.layer_order()
    assert order == [0, 1, 2, 1, 2, 1, 2, 3]
    for p in model.parameters():
        p.requires_grad_(False)
    val = repeating_documents()
    ttt = lora.LoraTTT(model, val, lora_cfg(), CPU)
    counts = [site.A.size(0) for _, site in ttt.sites]
    assert counts == [1, 3, 3, 1] * 5  # q, k, v, o, mlp: a site per block, a LoRA per pass
    o_site = ttt.sites[3 * 4 + 1][1]  # o of block 1
    assert o_site.A.size(3) == o_site.B.size(2) == model.cfg.dim  # from the input, to the output
    ttt.attach()
    doc = lora.documents(val.tokens, BOS)[0]
    opt = torch.optim.AdamW(ttt.params, lr=0.01, betas=(0.0, 0.999))
    ttt.step([(0, doc[0] + 1, doc[0] + 16, *doc)], opt)
    ttt.attach(False)
    for _, site in ttt.sites:
        assert all(B.abs().sum() > 0 for B in site.B[:, 0])  # every pass's LoRA took its own step


def test_compiled_lora_ttt_scores_as_eager_with_one_graph_for_every_shape(monkeypatch):
    """eval.ttt.compile: one dynamic graph serves every batch size (documents end, down to the last one of a batch
    alone), window length (chunks grow; a batch of one-target documents) and chunk, trained or not (a document's
    last); the scores are the eager run's."""
    from torch._dynamo.utils import counters

    model = randomized(GPT(tiny_model(bos_id=BOS, layers=2)), 6)
    g = torch.Generator().manual_seed(2)
    phrases = [torch.randint(1, 64, (n,), generator=g) for n in (150, 60, 0, 40, 0, 30)]  # 0: a BOS, then the next
    tokens = torch.cat([torch.cat([torch.tensor([BOS]), p]) for p in phrases])
    val = ValSplit(tokens, torch.ones_like(tokens))  # batches of 4: 150 ends alone; then two one-target documents
    runs = {}
    for compiled in (False, True):
        monkeypatch.setattr(lora.LoraTTT, "COMPILE_BACKEND", "aot_eager")
        torch._dynamo.reset()
        counters.clear()
        torch.manual_seed(0)
        cfg = lora_cfg(compile=compiled)  # windows of 16 to 64 tokens, batches shrinking as documents end
        runs[compiled] = evaluate(copy.deepcopy(model), val, cfg, CPU)
    (eager, re_), (comp, rc) = runs[False], runs[True]
    assert comp.nll_sum == pytest.approx(eager.nll_sum, rel=1e-6) and rc == re_
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])  # each cold inductor compile: minutes


def test_regional_compile_scores_as_eager_with_a_few_block_graphs_whatever_the_depth(monkeypatch):
    """eval.ttt.compile_mode: regional compiles each block (and the head with its loss) on its own: the blocks and the
    passes of a looped layer share their graphs, so a deeper network compiles no more graphs (the whole forward's
    compile grows with every block it unrolls); the scores are the eager run's, and the model is left uncompiled."""
    from torch._dynamo.utils import counters

    val = repeating_documents(n_docs=5)
    graphs = {}
    for layers in (3, 9):
        model = randomized(GPT(tiny_model(bos_id=BOS, layers=layers, recur_start=1, recur_end=1, recur_loops=2)), 6)
        runs = {}
        for mode in ("eager", "regional"):
            monkeypatch.setattr(lora.LoraTTT, "COMPILE_BACKEND", "aot_eager")
            torch._dynamo.reset()
            counters.clear()
            cfg = lora_cfg(compile=mode == "regional", compile_mode="regional" if mode == "regional" else "default")
            runs[mode] = evaluate(model, val, cfg, CPU)
        (eager, re_), (regional, rr) = runs["eager"], runs["regional"]
        assert regional.nll_sum == pytest.approx(eager.nll_sum, rel=1e-6) and rr == re_
        graphs[layers] = counters["stats"]["unique_graphs"]
        assert not any(vars(m).keys() & {"forward", "forward_lanes", "nll_from_hidden"} for m in model.modules())
    # a graph per kind of call (block 0's input needs no grad, a looped block's LoRAs stack 3 passes, the first batch's
    # shapes, the head): 7 here, at 3 layers (5 block runs) as at 9 (11)
    assert graphs[3] == graphs[9] < len(model.layer_order()), graphs


def test_a_spy_that_trains_before_scoring_is_counted_and_the_audit_refuses_the_run(monkeypatch):
    model = randomized(GPT(tiny_model(bos_id=BOS)), 6)
    val = repeating_documents()
    _, fair = evaluate(model, val, lora_cfg(), CPU)
    assert fair["val_tokens_trained_before_scored"] == 0

    def adapt_first(self, active, opt):  # the order broken on purpose: each chunk trained on, then scored
        self.adapt([a for a in active if a[2] < a[4]], opt)
        self.score(active)

    monkeypatch.setattr(lora.LoraTTT, "step", adapt_first)
    _, broken = evaluate(model, val, lora_cfg(), CPU)
    assert broken["val_tokens_trained_before_scored"] == broken["ttt_tokens_adapted"] > 0
    report = audit.check(evidence(val_tokens_trained_before_scored=broken["val_tokens_trained_before_scored"],
                                  ttt="lora"), AuditConfig())
    assert not report["passed"] and report["failures"][0].startswith("legality")


def shared_phrase_documents() -> ValSplit:
    """Twelve documents built from one phrase they all share and a few tokens of their own; every third is longer."""
    g = torch.Generator().manual_seed(0)
    shared = torch.randint(1, 64, (24,), generator=g)
    docs = []
    for d in range(12):
        own = torch.randint(1, 64, (8,), generator=g)
        docs.append(torch.cat([torch.tensor([BOS]), torch.cat([shared, own]).repeat(6 if d % 3 == 0 else 2)]))
    tokens = torch.cat(docs)
    return ValSplit(tokens, torch.ones_like(tokens))


def global_cfg(global_lr: float) -> EvalConfig:
    return EvalConfig(mode="lora_ttt", seq_len=32, ttt=TTTConfig(
        chunk_tokens=16, lora_rank=4, lora_alpha=8.0, lr=0.003, batch_docs=2, global_lr=global_lr, prefix_docs=4,
        phases=2, global_chunk_tokens=64, momentum=0.9))


def test_phased_global_sgd_learns_what_the_longest_documents_share_for_the_documents_after_them():
    val = shared_phrase_documents()
    base = randomized(GPT(tiny_model(bos_id=BOS)), 6)
    lora_only, _ = evaluate(copy.deepcopy(base), val, global_cfg(0.0), CPU)
    both, record = evaluate(copy.deepcopy(base), val, global_cfg(1.0), CPU)
    assert both.tokens == lora_only.tokens and both.bpb < 0.8 * lora_only.bpb, (both.bpb, lora_only.bpb)
    assert record["ttt"] == "lora+global_sgd" and record["val_tokens_trained_before_scored"] == 0
    # the prefix: the 4 longest documents, in 2 phases of all prefix documents scored so far; one step per 64
    # tokens of them, the last chunk of each phase skipped
    longest = sorted(lora.documents(val.tokens, BOS), key=lambda d: (d[0] - d[1], d[0]))[:4]
    tokens = [sum(e - s for s, e in longest[:2]), sum(e - s for s, e in longest)]
    assert record["ttt_global_steps"] == sum(-(-n // 64) - 1 for n in tokens)


def test_phases_with_no_prefix_document_of_their_own_take_no_step():
    """Fewer prefix documents than phases (a small split): the phases whose share of the prefix is empty are skipped,
    the others run as the record's boundaries put them."""
    val = shared_phrase_documents()
    cfg = global_cfg(1.0)
    cfg = replace(cfg, ttt=replace(cfg.ttt, prefix_docs=1, phases=3))  # boundaries 0, 0, 1
    _, record = evaluate(randomized(GPT(tiny_model(bos_id=BOS)), 6), val, cfg, CPU)
    s, e = sorted(lora.documents(val.tokens, BOS), key=lambda d: (d[0] - d[1], d[0]))[0]
    assert record["ttt_global_steps"] == -(-(e - s) // 64) - 1 > 0
    assert record["val_tokens_trained_before_scored"] == 0


def test_global_sgd_on_documents_not_yet_scored_is_counted():
    val = shared_phrase_documents()
    model = randomized(GPT(tiny_model(bos_id=BOS)), 6)
    ttt = lora.LoraTTT(model, val, global_cfg(1.0), CPU)
    docs = lora.documents(val.tokens, BOS)[:3]
    ttt.global_phase(docs)  # nothing scored: every target of every chunk trained on counts
    trained = sum(e - s for s, e in docs)
    assert ttt.trained_early == (-(-trained // 64) - 1) * 64 > 0


@pytest.mark.parametrize("yaml_text, message", [
    ("lora_targets: [q, attn]", r"eval.ttt.lora_targets\[1\]: 'attn'; expected one of q, k, v, o, mlp, head"),
    ("lora_targets: []", r"eval.ttt.lora_targets: empty; lora_ttt needs at least one of"),
    ("betas: [0.9]", r"eval.ttt.betas: \[0.9\]; expected two numbers"),
    ("betas: [0.9, 1.5]", r"eval.ttt.betas\[1\]: 1.5; expected <= 1"),
])
def test_a_bad_lora_setting_is_one_line(tmp_path, yaml_text, message):
    text = open("params.yaml").read().replace("eval:\n", f"eval:\n  mode: lora_ttt\n  ttt:\n    {yaml_text}\n", 1)
    p = tmp_path / "params.yaml"
    p.write_text(text)
    with pytest.raises(PgolfError, match=message):
        load_params(p)


def test_the_benchs_lora_work_counts_the_tokens_the_lora_steps_run(monkeypatch):
    """bench/ttt_cost.py projects a LoRA row to FineWeb by the tokens its steps run (rows x padded window, summed over
    steps): the count it makes from document lengths is what lora_ttt's steps actually run."""
    ttt_cost = bench_module(monkeypatch, "ttt_cost")

    g = torch.Generator().manual_seed(3)
    lengths = [int(n) for n in torch.randint(2, 140, (11,), generator=g)]
    tokens = torch.cat([torch.cat([torch.tensor([BOS]), torch.randint(1, 64, (n - 1,), generator=g)]) for n in lengths])
    val = ValSplit(torch.cat([tokens, torch.tensor([BOS])]), torch.ones(tokens.numel() + 1, dtype=torch.long))
    ran = []
    batch = lora.LoraTTT._batch
    monkeypatch.setattr(lora.LoraTTT, "_batch", lambda self, active: ran.append(batch(self, active)[0].numel()) or
                        batch(self, active))
    evaluate(randomized(GPT(tiny_model(bos_id=BOS)), 6), val, lora_cfg(lr=0.0, chunk_tokens=16, batch_docs=4), CPU)
    assert sum(ran) == ttt_cost.lora_work(lengths, chunk=16, context=64, batch=4) > 0


def test_fineweb_lengths_from_the_records_log_keep_its_batches_and_add_up_to_the_split(monkeypatch):
    import numpy as np

    ttt_cost = bench_module(monkeypatch, "ttt_cost")

    logged = [(782, 30339, 97114), (9, 105, 107), (94, 193, 194), (200, 296, 297), (305, 429, 430), (400, 582, 584),
              (505, 809, 812), (603, 1146, 1150), (682, 1638, 1646), (716, 2054, 2069), (741, 2686, 2730),
              (754, 3345, 3397)]  # some of the 1.0611 record's train_seed42.log lines
    log = "\n".join(f"ttp: b{b}/782 bl:2.3 bb:1.04 rl:2.3 rb:1.04 dl:{lo}-{hi} gd:1" for b, lo, hi in logged)
    n = ttt_cost.fineweb_doc_lengths(log)
    assert n.size == ttt_cost.FINEWEB_DOCS and abs(int(n.sum()) - ttt_cost.FINEWEB_VAL_TOKENS) < n.size
    assert (np.diff(n) >= 0).all()  # ascending, as the batches
    for b, lo, hi in logged[1:]:
        batch = n[(b - 1) * 64:b * 64]
        assert lo - 1 <= batch.min() and batch.max() <= hi + 1
    assert n[-16:].min() >= 30338 and n[-1] == 97114  # the last batch: the 16 longest documents


def test_cuda_graph_shapes_pad_windows_and_batches_to_a_few_and_score_the_same(monkeypatch):
    """eval.ttt.compile_mode: cuda_graphs records a graph per shape, so each step's batch is padded to a multiple of 8
    documents (rows that score and learn nothing) and its window to a multiple of 256 tokens (capped at eval.seq_len):
    the scores, the ledger and what the LoRAs learn are those of the unpadded steps."""
    model = randomized(GPT(tiny_model(bos_id=BOS)), 6)
    g = torch.Generator().manual_seed(1)
    docs = [torch.cat([torch.tensor([BOS]), torch.randint(1, 64, (int(n),), generator=g)])
            for n in torch.randint(5, 90, (11,), generator=g)]
    val = ValSplit(torch.cat(docs), torch.ones(sum(d.numel() for d in docs), dtype=torch.long))
    shapes = []
    batch = lora.LoraTTT._batch
    monkeypatch.setattr(lora.LoraTTT, "_batch", lambda self, active: shapes.append(batch(self, active)[0].shape) or
                        batch(self, active))
    torch.manual_seed(0)  # the LoRAs' A: the same draw both times
    plain, plain_record = evaluate(model, val, lora_cfg(batch_docs=16), CPU)
    plain_shapes, shapes[:] = set(shapes), []
    torch.manual_seed(0)
    padded, padded_record = evaluate(model, val, lora_cfg(batch_docs=16, compile_mode="cuda_graphs"), CPU)
    assert len(plain_shapes) == 5 and set(shapes) == {(16, 64), (8, 64)}  # windows up to seq_len 64
    assert padded.tokens == plain.tokens and abs(padded.nll_sum - plain.nll_sum) < 1e-6 * plain.nll_sum
    assert padded_record == plain_record and padded_record["val_tokens_trained_before_scored"] == 0


def test_the_cuda_graphs_mode_reaches_torch_compile(monkeypatch):
    seen = {}

    def fake_compile(fn, **kwargs):
        seen.update(kwargs)
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    model = randomized(GPT(tiny_model(bos_id=BOS)), 6)
    evaluate(model, repeating_documents(n_docs=2), lora_cfg(compile=True, compile_mode="cuda_graphs"), CPU)
    assert seen["mode"] == "reduce-overhead" and seen["dynamic"] is True


def test_the_record_preset_evaluates_with_the_row_the_eval_bench_picked(monkeypatch):
    """presets/record.yaml takes `LoRA + phased SGD, 192 x 1024, regional` of bench/eval_modes.py (the best row
    projected under 540 s, bench/NOTES.md call 59) as that row runs it at FineWeb's 50,000 documents, and
    `-S eval.mode=sliding -S eval.seq_len=2048` is its `document-masked` row; the bench's other rows stay the record's
    (windows of 2048, phased SGD at lr 0.001, LoRA chunks of 48, the whole model compiled) whatever the preset takes."""
    eval_modes = bench_module(monkeypatch, "eval_modes")

    preset = load_params(ROOT / "presets" / "record.yaml").eval
    rows = eval_modes.variants(preset, 50_000, eager=False, cheaper=[(192, 1024)], regional=True)
    assert rows["LoRA + phased SGD, 192 x 1024, regional"] == preset
    assert rows["document-masked"] == replace(preset, mode="sliding", seq_len=2048)
    assert {rows[r].seq_len for r in ("sliding", "document-masked", "phased SGD", "LoRA")} == {2048}
    assert (rows["phased SGD"].ttt.lr, rows["LoRA"].ttt.chunk_tokens) == (0.001, 48)
    assert (rows["LoRA"].ttt.compile_mode, rows["LoRA"].ttt.global_lr) == ("default", 0.0)


def test_the_eval_bench_runs_the_compiled_lora_rows_in_one_process_and_every_other_row_alone(monkeypatch):
    """bench/eval_modes.py: the compiled LoRA rows of one compile mode share one process (one compile, as an eval
    pays it), in the place of the first; the regional twins another; the CUDA-graphs and eager rows and the rows
    without LoRA each run alone."""
    eval_modes = bench_module(monkeypatch, "eval_modes")

    rows = eval_modes.variants(load_params(ROOT / "presets" / "record.yaml").eval, 150, eager=True,
                               cheaper=[(96, 1024)], graphs=True, regional=True)
    shared = ["LoRA", "LoRA + phased SGD", "LoRA, 96 x 1024", "LoRA + phased SGD, 96 x 1024"]
    assert eval_modes.units(rows) == [["sliding"], ["document-masked"], ["phased SGD"], shared,
                                      ["LoRA, CUDA graphs"], [f"{n}, regional" for n in shared], ["LoRA, eager"]]
    assert all(rows[f"{n}, regional"] == replace(rows[n], ttt=replace(rows[n].ttt, compile_mode="regional"))
               for n in shared)


def test_the_eval_bench_runs_the_rows_asked_for_in_the_order_asked_and_refuses_an_unknown_one(monkeypatch):
    """--only names rows in the order they run (their processes follow it), and a name no row has is refused with
    the rows there are, before anything runs."""
    eval_modes = bench_module(monkeypatch, "eval_modes")

    rows = eval_modes.variants(load_params(ROOT / "presets" / "record.yaml").eval, 150, eager=False,
                               cheaper=[(96, 1024)], regional=True)
    asked = ["LoRA, 96 x 1024, regional", "sliding", "LoRA, 96 x 1024"]
    picked = eval_modes.chosen(rows, asked)
    assert list(picked) == asked and eval_modes.units(picked) == [[n] for n in asked]
    assert list(eval_modes.chosen(rows, None)) == list(rows)
    with pytest.raises(KeyError, match=r"--only 'LoRA, 96 x 2048': no such row with these flags; the rows: sliding, "):
        eval_modes.chosen(rows, ["sliding", "LoRA, 96 x 2048"])
