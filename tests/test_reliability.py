"""Resume after kill -9, multi-process training, signals and locks, pickle-free loaders, bad input and one-line errors."""

import dataclasses
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch
import yaml
from conftest import ROOT, read_metrics, run

from pgolf import config, pack
from pgolf.checkpoint import load_tensors
from pgolf.config import load_params
from pgolf.data import load_tokenizer, read_shard
from pgolf.errors import PgolfError
from pgolf.io import read_json
from pgolf.launch import resolve_nproc

TINY_TRAIN = {"iterations": 30, "batch_tokens": 2048, "micro_batch_tokens": 1024, "seq_len": 64,
              "warmup_steps": 2, "log_every": 5, "checkpoint_every_s": 0, "compile": False}


def stage_dir(tmp_path, name, train=None):
    """A working copy of the stages with tokenized demo data (tokenized once per test session)."""
    d = tmp_path / name
    d.mkdir()
    shutil.copytree(ROOT / "pgolf", d / "pgolf", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "stages", d / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["train"].update(TINY_TRAIN | (train or {}))
    (d / "params.yaml").write_text(yaml.safe_dump(params))
    cached = tmp_path.parent / "tokenized-demo"
    if not cached.exists():
        run([sys.executable, "-m", "stages.tokenize"], d)
        shutil.copytree(d / "artifacts" / "tokenize", cached)
    else:
        shutil.copytree(cached, d / "artifacts" / "tokenize")
    return d


def train_cmd():
    return [sys.executable, "-m", "stages.train"]


def weights(d):
    return load_tensors(d / "artifacts/train/model/raw.safetensors")[0]


def test_resume_after_kill_matches_an_uninterrupted_run(tmp_path):
    whole = stage_dir(tmp_path, "whole")
    run(train_cmd(), whole)
    killed = stage_dir(tmp_path, "killed", {"checkpoint_every_s": 0.05})
    proc = subprocess.Popen(train_cmd(), cwd=killed, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = killed / "artifacts/train/checkpoint/rank0.safetensors"
    deadline = time.time() + 120
    while time.time() < deadline:
        if ckpt.exists():
            try:
                step = load_tensors(ckpt)[1]["step"]
            except PgolfError:  # mid-rename; look again
                step = 0
            if step >= 8:
                break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # kill -9 the whole stage
    proc.wait()
    meta = load_tensors(ckpt)[1]
    assert 8 <= meta["step"] < 30
    assert not (killed / "artifacts/train/model").exists()  # nothing half-written under the final name
    run(train_cmd(), killed)
    metrics = read_json(killed / "artifacts/train/metrics.json")
    assert read_json(killed / "artifacts/train/run.json")["resumed_from_step"] >= 8 and metrics["steps"] == 30
    assert metrics["train_seconds"] > meta["train_seconds"]
    assert not (killed / "artifacts/train/checkpoint").exists()  # a finished run leaves nothing to resume
    a, b = weights(whole), weights(killed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ea = load_tensors(whole / "artifacts/train/model/ema.safetensors")[0]
    eb = load_tensors(killed / "artifacts/train/model/ema.safetensors")[0]
    assert all(torch.equal(ea[k], eb[k]) for k in ea)


def test_two_gloo_ranks_agree_and_match_one_process(tmp_path):
    """Two ranks sum the gradients of the micro-batches one process accumulates, in the same order, and the loss
    scales (1/accumulation in one process, the all-reduce's mean in two) are powers of two, exact in floating point:
    the runs agree bit for bit when each process's GEMMs reduce in the same order. That order follows the thread
    count (the ranks get one thread each on two cores, one process both; an AVX-512 host differed by 2.4e-4 after
    6 steps), so both run with one thread."""
    one = stage_dir(tmp_path, "one", {"iterations": 6})
    two = stage_dir(tmp_path, "two", {"iterations": 6, "nproc_per_node": "2", "checkpoint_every_s": 1e-9})
    run(train_cmd(), one, OMP_NUM_THREADS="1")
    run(train_cmd(), two, OMP_NUM_THREADS="1")
    assert read_json(two / "artifacts/train/run.json")["world_size"] == 2
    a, b = weights(one), weights(two)
    assert all(torch.equal(a[k], b[k]) for k in a), max((a[k] - b[k]).abs().max().item() for k in a)


def test_a_rank_scoped_clip_clips_before_the_average_and_averages_as_ddp_does(tmp_path):
    """train.grad_clip_scope: rank clips each rank's gradient and then averages them itself: with a clip that never
    bites, that average equals DDP's bit for bit (a sum of two, halved: exact either way); with one that bites every
    step, the run differs from clipping the averaged gradient."""
    runs = {}
    for name, clip, scope in (("global", 1e-3, "global"), ("rank", 1e-3, "rank"), ("loose", 1e9, "rank"),
                              ("loose_global", 1e9, "global")):
        runs[name] = stage_dir(tmp_path, name, {"iterations": 4, "nproc_per_node": "2", "grad_clip": clip,
                                                 "grad_clip_scope": scope})
        run(train_cmd(), runs[name], OMP_NUM_THREADS="1")
    w = {name: weights(d) for name, d in runs.items()}
    assert all(torch.equal(w["loose"][k], w["loose_global"][k]) for k in w["loose"])
    assert not all(torch.equal(w["rank"][k], w["global"][k]) for k in w["rank"])
    assert not all(torch.equal(w["rank"][k], w["loose"][k]) for k in w["rank"])  # the clip bit


def test_the_span_packing_trains_through_the_stage_and_differs_from_rows(tmp_path):
    """train.pack: span (a micro-batch as one row, documents cut every seq_len tokens from their start) through the
    train stage; its weights differ from rows' (contexts no longer cut at each row's start). Without
    train.doc_mask the params are refused in one line."""
    runs = {}
    for packing in ("rows", "span"):
        runs[packing] = stage_dir(tmp_path, packing, {"iterations": 4, "doc_mask": True, "pack": packing})
        run(train_cmd(), runs[packing])
    a, b = weights(runs["rows"]), weights(runs["span"])
    assert all(torch.isfinite(b[k]).all() for k in b) and not all(torch.equal(a[k], b[k]) for k in a)
    params = yaml.safe_load((runs["span"] / "params.yaml").read_text())
    params["train"]["doc_mask"] = False
    (runs["span"] / "params.yaml").write_text(yaml.safe_dump(params))
    p = run(train_cmd(), runs["span"], check=False)
    assert p.returncode == 1 and p.stderr.strip() == ("error: train: params.yaml: train.pack: span needs "
                                                      "train.doc_mask: true (one row of 1024 tokens would attend "
                                                      "across all of them)"), p.stderr


def test_a_crashing_rank_fails_the_stage_fast_with_one_line(tmp_path):
    d = stage_dir(tmp_path, "crash", {"nproc_per_node": "2"})
    (d / "artifacts/tokenize/data/train_000001.bin").write_bytes(b"\0" * 10)  # every rank trips over it
    t0 = time.time()
    p = run(train_cmd(), d, check=False)
    assert p.returncode == 1 and time.time() - t0 < 60
    assert p.stderr.strip() == ("error: train: artifacts/tokenize/data/train_000001.bin: 10 bytes is shorter than "
                                "the 1024-byte shard header"), p.stderr


def wait_for(predicate, timeout=120.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def pgolf_processes(folder):
    """Python processes running in `folder` (the stages and their ranks)."""
    found = []
    for p in psutil.process_iter(["cwd", "cmdline"]):
        try:
            if p.info["cwd"] == str(folder) and "python" in " ".join(p.info["cmdline"] or []):
                found.append(p)
        except psutil.Error:
            pass
    return found


def test_a_second_trainer_on_the_same_checkpoint_is_refused(tmp_path):
    d = stage_dir(tmp_path, "locked", {"iterations": 10**6, "nproc_per_node": "2"})
    first = subprocess.Popen(train_cmd(), cwd=d, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    try:
        lock = d / "artifacts/train/checkpoint/lock"
        assert wait_for(lambda: lock.exists() and lock.read_text().startswith("pid") and len(pgolf_processes(d)) >= 3)
        second = run(train_cmd(), d, check=False)
        assert second.returncode == 1
        assert second.stderr.strip().startswith("error: train: artifacts/train/checkpoint: a trainer, pid "), second.stderr
        assert "Traceback" not in second.stderr
    finally:
        os.killpg(first.pid, signal.SIGINT)  # Ctrl-C: every rank stops, one line
        out, err = first.communicate(timeout=60)
    assert first.returncode == 130 and err.strip().splitlines()[-1] == "error: train: interrupted", err
    assert "Traceback" not in err
    assert wait_for(lambda: not pgolf_processes(d), 30)


class Bomb:
    def __reduce__(self):
        return (os.system, (f"touch {BOMB_MARK}",))


BOMB_MARK = "/tmp/pgolf-pickle-bomb-went-off"


def test_every_loader_refuses_a_pickle_bomb(tmp_path):
    if os.path.exists(BOMB_MARK):
        os.remove(BOMB_MARK)
    bomb = tmp_path / "bomb.pt"
    bomb.write_bytes(pickle.dumps({"w": Bomb()}))
    with pytest.raises(PgolfError, match="not a valid safetensors file"):
        load_tensors(bomb)
    with pytest.raises(PgolfError, match="bad magic"):
        pack.unpack(bomb.read_bytes(), str(bomb))
    with pytest.raises(PgolfError, match="bad shard magic|shorter than"):
        read_shard(bomb)
    with pytest.raises(PgolfError, match="not a SentencePiece model"):
        load_tokenizer(bomb)
    with pytest.raises(PgolfError, match="not valid JSON"):
        read_json(bomb)
    assert not os.path.exists(BOMB_MARK)


BAD_PARAMS = [  # (params.yaml text or a change to the demo's, the one line expected)
    ("quant:\n  metod: gptq\n", r"params.yaml: unknown param 'quant.metod'; did you mean 'quant.method'\?"),
    ("trian:\n  iterations: 5\n", r"params.yaml: unknown param 'trian'; did you mean 'train'\?"),
    ("train:\n  iterations: many\n", r"params.yaml: train.iterations: expected int, got 'many'"),
    ("quant:\n  bits: {attn: 6, mpl: 6}\n", r"unknown param 'quant.bits.mpl'; did you mean 'quant.bits.mlp'\?"),
    ("data: [1, 2]\n", r"data: expected a mapping"),
    ("train:\n  iterations: 5\n   seq_len: 4\n", r"params.yaml:3:11: not valid YAML \(mapping values are not allowed here\)"),
    ({"eval": {"stride": -5}}, r"params.yaml: eval.stride: -5; expected >= 0"),
    ({"eval": {"stride": 4096}}, r"params.yaml: eval.stride: 4096 > eval.seq_len 128"),
    ({"eval": {"temperature": 0}}, r"params.yaml: eval.temperature: 0.0; expected > 0"),
    ({"data": {"shard_tokens": 0}}, r"params.yaml: data.shard_tokens: 0; expected >= 256"),
    ({"data": {"shard_tokens": 1}}, r"params.yaml: data.shard_tokens: 1; expected >= 256"),
    ({"train": {"seed": -5}}, r"params.yaml: train.seed: -5; expected >= 0"),
    ({"train": {"seed": 1e23}}, r"params.yaml: train.seed: 99999999999999991611392; expected <= 4294967295"),
    ({"calibrate": {"seed": -1}}, r"params.yaml: calibrate.seed: -1; expected >= 0"),
    ({"train": {"max_seconds": 700}}, r"train.max_seconds: 700.0 > audit.train_budget_s 600.0: the audit would fail"),
    ({"model": {"parallel_lanes": 2}}, r"model.parallel_lanes: 2 needs model.parallel_from >= 0"),
    ({"calibrate": {"sampling": "shuffled"}}, r"calibrate.sampling: 'shuffled'; expected one of stream, random"),
    ({"train": {"seq_len": 0}}, r"params.yaml: train.seq_len: 0; expected >= 1"),
    ({"eval": {"seq_len": 0}}, r"params.yaml: eval.seq_len: 0; expected >= 1"),
    ({"eval": {"batch_seqs": 0}}, r"params.yaml: eval.batch_seqs: 0; expected >= 1"),
    ({"calibrate": {"batch_seqs": 0}}, r"params.yaml: calibrate.batch_seqs: 0; expected >= 1"),
    ({"calibrate": {"num_seqs": 0}}, r"params.yaml: calibrate.num_seqs: 0; expected >= 1"),
    ({"quant": {"block_size": 0}}, r"params.yaml: quant.block_size: 0; expected >= 1"),
    ({"train": {"iterations": -5}}, r"params.yaml: train.iterations: -5; expected >= 1"),
    ({"train": {"max_seconds": 20, "calibration_reserve_s": 20}}, r"train.calibration_reserve_s: 20.0 leaves no training"),
    ({"train": {"micro_batch_tokens": 100}}, r"train.micro_batch_tokens: 100 is not a multiple of train.seq_len 128"),
    ({"model": {"heads": 3}}, r"params.yaml: model.heads: 3 does not divide model.dim 64"),
    ({"model": {"recur_start": 2, "recur_end": 9}}, r"model.recur_start/recur_end: 2..9; expected 0 <= start <= end"),
    ({"quant": {"clip_percentiles": []}}, r"quant.clip_percentiles: \[\]; expected a non-empty list"),
    ({"quant": {"bits": {"mlp": 9}}}, r"quant.bits.mlp: 9.0; expected an integer from 2 to 8"),
    ({"quant": {"target_bytes": "big"}}, r"quant.target_bytes: expected int, got 'big'"),
    ({"model": {"activation": "gelu"}}, r"model.activation: 'gelu'; expected one of relu2, leaky_relu2"),
    ({"model": {"smear_gate": True}}, r"model.smear_gate: expected str, got True"),
    ({"eval": {"ttt": {"optimizer": "adam"}}}, r"eval.ttt.optimizer: 'adam'; expected one of sgd, adamw"),
    ({"eval": {"ttt": {"params": "heads"}}}, r"eval.ttt.params: 'heads'; expected one of all, norms, mlp, last_blocks"),
    ({"eval": {"mode": "lora"}}, r"eval.mode: 'lora'; expected one of sliding, ttt, phased_ttt"),
    ({"ema": {"source": "best"}}, r"ema.source: 'best'; expected one of ema, swa, raw"),
    ({"calibrate": {"source": "val"}}, r"calibrate.source: 'val'; expected one of train, self"),
    ({"quant": {"method": "awq"}}, r"quant.method: 'awq'; expected one of rtn, clip_search, sdclip, gptq, adaptive_clip"),
    ({"quant": {"clip_rule": "mse"}}, r"quant.clip_rule: 'mse'; expected one of rtn, clip_search, sdclip"),
    ({"compress": {"codec": "gzip"}}, r"compress.codec: 'gzip'; expected one of auto, zstd, brotli, lzma, zpaq, ppmd, zpaq_o1"),
    ({"compress": {"layout": "int4"}}, r"compress.layout: 'int4'; expected one of auto, int8, bitpack"),
    ({"data": {"source": "hub"}}, r"data.source: 'hub'; expected one of fineweb, jsonl, builtin"),
    ({"train": {"nproc_per_node": "all"}}, r"train.nproc_per_node: 'all'; expected a value matching gpu\|\[1-9\]"),
]


def params_text(case) -> str:
    if isinstance(case, str):
        return case
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in case.items():
        for key, value in values.items():
            target = params.setdefault(section, {})
            if isinstance(value, dict):
                target.setdefault(key, {}).update(value)
            else:
                target[key] = value
    return yaml.safe_dump(params)


def test_bad_params_name_the_key(tmp_path):
    p = tmp_path / "params.yaml"
    for case, message in BAD_PARAMS:
        p.write_text(params_text(case))
        with pytest.raises(PgolfError, match=message):
            load_params(p)
    assert load_params(ROOT / "params.yaml").model.layers == 4
    for preset in (ROOT / "presets").glob("*.yaml"):
        assert load_params(preset).model.layers == 11


@pytest.mark.parametrize("path", ["params.yaml", *(f"presets/{p.name}" for p in (ROOT / "presets").glob("*.yaml"))])
def test_every_quantizer_knob_is_in_the_params_files(path):
    """`dvc exp run -S quant.lqer_rank=4` can only set a key the file has (DVC refuses new keys)."""
    written = yaml.safe_load((ROOT / path).read_text())
    for section, cls in (("quant", config.QuantConfig), ("compress", config.CompressConfig)):
        assert {f.name for f in dataclasses.fields(cls)} <= set(written[section]), f"{path}: {section}"


@pytest.mark.parametrize("case, message", BAD_PARAMS[:3] + BAD_PARAMS[5:9])
def test_bad_params_through_a_real_stage_are_one_line(tmp_path, case, message):
    (tmp_path / "params.yaml").write_text(params_text(case))
    shutil.copytree(ROOT / "pgolf", tmp_path / "pgolf")
    shutil.copytree(ROOT / "stages", tmp_path / "stages")
    p = run([sys.executable, "-m", "stages.check"], tmp_path, check=False)
    assert p.returncode == 1 and len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr
    assert re.search(message, p.stderr), p.stderr


def test_nproc_resolution():
    assert resolve_nproc("gpu", "train.nproc_per_node", 0) == 1
    assert resolve_nproc("gpu", "train.nproc_per_node", 8) == 8
    assert resolve_nproc("2", "train.nproc_per_node", 0) == 2  # CPU processes over gloo
    with pytest.raises(PgolfError, match=r"train.nproc_per_node: 4 processes but only 2 GPU\(s\) are visible"):
        resolve_nproc("4", "train.nproc_per_node", 2)


def test_tokenizer_vocab_must_match_the_model(tmp_path):
    d = stage_dir(tmp_path, "vocab")
    params = yaml.safe_load((d / "params.yaml").read_text())
    params["model"]["vocab_size"] = 512
    (d / "params.yaml").write_text(yaml.safe_dump(params))
    p = run(train_cmd(), d, check=False)
    assert p.returncode != 0
    assert "artifacts/tokenize/data/tokenizer.model: vocab 1024 but model.vocab_size is 512" in p.stderr
    assert not (d / "artifacts/train/model").exists()


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    """A working copy where every stage up to compress has run once (6 training steps)."""
    d = stage_dir(tmp_path_factory.mktemp("ran"), "ran", {"iterations": 6})
    for stage in ("train", "ema", "calibrate", "quantize", "compress"):
        run([sys.executable, "-m", f"stages.{stage}"], d)
    return d


def damaged_copy(src, tmp_path, damage):
    d = tmp_path / "copy"
    shutil.copytree(src, d, symlinks=True)
    damage(d)
    return d


def write_jsonl(d, text: bytes):
    (d / "corpus").mkdir(exist_ok=True)
    (d / "corpus" / "c.jsonl").write_bytes(text)
    params = yaml.safe_load((d / "params.yaml").read_text())
    params["data"] = {"source": "jsonl", "paths": ["corpus"], "val_docs": 1, "vocab_size": 300}
    (d / "params.yaml").write_text(yaml.safe_dump(params))


def nan_hessian(d):
    tensors, meta = load_tensors(d / "artifacts/calibrate/hessians.safetensors")
    tensors["tok_emb.weight"] = tensors["tok_emb.weight"] * float("nan")  # the tied head's
    from pgolf.checkpoint import save_tensors

    save_tensors(d / "artifacts/calibrate/hessians.safetensors", tensors, meta)


def wrong_shape(d):
    tensors, meta = load_tensors(d / "artifacts/train/model/ema.safetensors")
    tensors["tok_emb.weight"] = tensors["tok_emb.weight"][:, :8].contiguous()
    from pgolf.checkpoint import save_tensors

    save_tensors(d / "artifacts/train/model/ema.safetensors", tensors, meta)


def shard_dir(d):
    shard = d / "artifacts/tokenize/data/train_000001.bin"
    shard.unlink()
    shard.mkdir()


BAD_INPUTS = [  # (stage, damage, the one line expected)
    ("tokenize", lambda d: write_jsonl(d, b'{"text": "only one document"}\n'),
     r"error: tokenize: corpus has no training text: every document is in the validation split"),
    ("tokenize", lambda d: write_jsonl(d, b'{"text": "a"}\n{"text": "caf\xe9"}\n'),
     r"error: tokenize: corpus/c.jsonl:2: not UTF-8 text"),
    ("tokenize", lambda d: write_jsonl(d, b'{"text": "a"}\n{"text": 5}\n'), r"error: tokenize: corpus/c.jsonl:2: the 'text' field is not a string"),
    ("train", shard_dir, r"error: train: artifacts/tokenize/data/train_000001.bin: is a directory, expected a shard file"),
    ("ema", wrong_shape, r"error: ema: artifacts/train/model/ema.safetensors: weights do not match the model config "
                         r"\(.*tok_emb.weight.*\)"),
    ("quantize", nan_hessian, r"error: quantize: Hessian for .* is not finite \(damaged calibration file\? rerun calibrate\)"),
    ("eval", lambda d: (d / "artifacts/tokenize/data/val_000000.bin").write_bytes(
        (d / "artifacts/tokenize/data/val_000000.bin").read_bytes()[:-7]), r"error: eval: .*val_000000.bin: size"),
    ("compress", lambda d: (d / "artifacts/compress").chmod(0o555), r"error: compress: artifacts/compress: not writable"),
]


@pytest.mark.parametrize("stage, damage, message", BAD_INPUTS, ids=[f"{s}-{i}" for i, (s, _, _) in enumerate(BAD_INPUTS)])
def test_bad_inputs_through_the_real_stages_are_one_line(ran, tmp_path, stage, damage, message):
    if stage == "compress" and os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    d = damaged_copy(ran, tmp_path, damage)
    p = run([sys.executable, "-m", f"stages.{stage}"], d, check=False)
    assert p.returncode == 1, p.stdout + p.stderr
    lines = [line for line in p.stderr.splitlines() if not line.startswith(("tokenize", "eval:", "ema:", "calibrate"))
             and "it/s]" not in line and "win/s]" not in line]
    assert len(lines) == 1 and re.fullmatch(message + ".*", lines[0]), p.stderr
    assert "Traceback" not in p.stderr


def eval_with_the_record_presets(ran, tmp_path, changes: dict, ttt_changes: dict | None = None) -> tuple:
    """A copy of the demo run with presets/record.yaml's eval block (with these changes) through the real eval and
    audit stages: (the copy, its eval evidence)."""
    d = damaged_copy(ran, tmp_path, lambda d: None)
    params = yaml.safe_load((d / "params.yaml").read_text())
    params["eval"] = yaml.safe_load((ROOT / "presets" / "record.yaml").read_text())["eval"] | changes
    params["eval"]["ttt"] |= ttt_changes or {}
    (d / "params.yaml").write_text(yaml.safe_dump(params))
    run([sys.executable, "-m", "stages.eval"], d)
    run([sys.executable, "-m", "stages.audit"], d)
    return d, read_json(d / "artifacts/eval/evidence.json")


@pytest.mark.parametrize("nproc, global_lr", [("1", 0.0), ("2", 0.01), ("1", 0.01)])
def test_the_record_presets_lora_eval_runs_through_the_real_eval_and_audit_stages(ran, tmp_path, nproc, global_lr):
    """presets/record.yaml's eval block as it is (LoRA TTT with phased global SGD; with global_lr 0 the LoRAs alone),
    at the demo model's size and uncompiled here, in one process and on two gloo ranks (each its share of the
    documents, the phases at the same batch on both): the eval stage scores every target first, trains on none
    before, and the strict audit passes on its ledger."""
    d, evidence = eval_with_the_record_presets(
        ran, tmp_path, {"seq_len": 256, "nproc_per_node": nproc},
        {"compile": False, "batch_docs": 4, "lora_rank": 4, "chunk_tokens": 64, "global_lr": global_lr,
         "prefix_docs": 8, "phases": 2, "global_chunk_tokens": 2048})
    assert evidence["mode"] == "lora_ttt" and evidence["ttt_units"] > 0
    assert (evidence["ttt"], evidence["ttt_global_steps"] > 0) == (("lora+global_sgd", True) if global_lr else
                                                                    ("lora", False))
    assert evidence["val_tokens_trained_before_scored"] == 0 and evidence["targets"] == evidence["targets_expected"]
    assert read_metrics(d, "audit")["passed"] is True


def test_the_record_presets_sliding_fallback_scores_each_document_apart_through_the_real_stages(ran, tmp_path):
    """presets/record.yaml's eval block with -S eval.mode=sliding (document-masked windows) at the demo model's
    size: every target scored, none trained on, and the masks make it score differently from the same windows
    unmasked."""
    scores = {}
    for doc_mask in (True, False):
        d, evidence = eval_with_the_record_presets(
            ran, tmp_path / str(doc_mask), {"mode": "sliding", "seq_len": 256, "nproc_per_node": "1",
                                            "doc_mask": doc_mask})
        assert evidence["mode"] == "sliding" and evidence["targets"] == evidence["targets_expected"]
        assert evidence["val_tokens_trained_before_scored"] == 0 and read_metrics(d, "audit")["passed"] is True
        scores[doc_mask] = read_metrics(d, "eval")["val_bpb"]
    assert scores[True] != scores[False]


def test_a_killed_writers_temporaries_are_removed_by_the_next_write(tmp_path):
    from pgolf.io import write_bytes

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".data.{dead.pid}.abc123.tmp"
    stale.mkdir()
    (stale / "train_000000.bin").write_bytes(b"x")
    live = tmp_path / f".data.{os.getpid()}.def456.tmp"
    live.write_bytes(b"mine")
    write_bytes(tmp_path / "data", b"complete")
    assert not stale.exists() and live.exists() and (tmp_path / "data").read_bytes() == b"complete"


def rank_processes(folder):
    """The ranks: the stage processes a launcher started (they hold its error folder in their environment)."""
    from pgolf.launch import WORKER_ENV

    ranks = []
    for p in pgolf_processes(folder):
        try:
            if WORKER_ENV in p.environ():
                ranks.append(p)
        except psutil.Error:
            pass
    return ranks


@pytest.mark.parametrize("shell", ["/bin/sh", "/bin/bash"])  # dvc runs `$SHELL -c cmd`: dash forks, bash execs
def test_killing_dvc_repro_leaves_no_stage_process_behind(tmp_path, shell):
    from conftest import pipeline_repo

    repo = pipeline_repo(tmp_path, {"train": TINY_TRAIN | {"iterations": 10**6, "nproc_per_node": "2"}})
    run(["dvc", "repro", "tokenize"], repo)
    dvc = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "dvc"), "repro", "train"], cwd=repo,
                           env={**os.environ, "SHELL": shell}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    assert wait_for(lambda: len(rank_processes(repo)) == 2, 120), "the ranks never started"
    dvc.kill()  # kill -9 of dvc alone: its shell, its stage and the ranks must not outlive it
    dvc.wait()
    assert wait_for(lambda: not pgolf_processes(repo), 30), [p.info["cmdline"] for p in pgolf_processes(repo)]


def test_the_pgolf_command_helps_and_names_misspelled_keys(tmp_path):
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    pgolf = [os.path.join(os.path.dirname(sys.executable), "pgolf")]
    p = run(pgolf + ["--help"], tmp_path)
    assert "compare" in p.stdout and "export" in p.stdout and "check" in p.stdout
    assert "--format" in run(pgolf + ["compare", "--help"], tmp_path).stdout
    p = run(pgolf + ["check", "--key", "quant.metod"], tmp_path, check=False)
    assert p.returncode == 1 and p.stderr.strip() == ("error: pgolf check: unknown param 'quant.metod'; "
                                                     "did you mean 'quant.method'?")
    assert run(pgolf + ["check", "--key", "quant.bits.mlp"], tmp_path).stdout.startswith("params.yaml: valid")
    p = run(pgolf + ["compare", str(tmp_path / "missing.json")], tmp_path, check=False)
    assert p.returncode == 1 and "missing.json: file not found (save one with `dvc exp show --json >" in p.stderr
