"""Resume after kill -9, multi-process training, pickle-free loaders, bad params."""

import os
import pickle
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch
import yaml

from conftest import ROOT, run
from pgolf import pack
from pgolf.checkpoint import load_tensors
from pgolf.config import load_params
from pgolf.data import load_tokenizer, read_shard
from pgolf.errors import PgolfError
from pgolf.io import read_json
from stages.launch import resolve_nproc

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
    return [sys.executable, "-m", "stages.launch", "train", "stages.train"]


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
    # kill -9 the whole stage: torchrun and its worker (which runs in a session of its own)
    victims = psutil.Process(proc.pid).children(recursive=True)
    os.killpg(proc.pid, signal.SIGKILL)
    for v in victims:
        v.kill()
    proc.wait()
    psutil.wait_procs(victims, timeout=10)
    meta = load_tensors(ckpt)[1]
    assert 8 <= meta["step"] < 30 and not meta["complete"]
    assert not (killed / "artifacts/train/model").exists()  # nothing half-written under the final name
    run(train_cmd(), killed)
    metrics = read_json(killed / "artifacts/train/metrics.json")
    assert metrics["resumed_from_step"] >= 8 and metrics["steps"] == 30
    assert metrics["train_seconds"] > meta["train_seconds"]
    a, b = weights(whole), weights(killed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ea = load_tensors(whole / "artifacts/train/model/ema.safetensors")[0]
    eb = load_tensors(killed / "artifacts/train/model/ema.safetensors")[0]
    assert all(torch.equal(ea[k], eb[k]) for k in ea)


def test_two_gloo_ranks_agree_and_match_one_process(tmp_path):
    one = stage_dir(tmp_path, "one", {"iterations": 6})
    two = stage_dir(tmp_path, "two", {"iterations": 6, "nproc_per_node": "2"})
    run(train_cmd(), one)
    run(train_cmd(), two)
    r0 = load_tensors(two / "artifacts/train/checkpoint/rank0.safetensors")[0]
    r1 = load_tensors(two / "artifacts/train/checkpoint/rank1.safetensors")[0]
    model_keys = [k for k in r0 if k.startswith("model.")]
    assert model_keys and all(torch.equal(r0[k], r1[k]) for k in model_keys)
    assert read_json(two / "artifacts/train/metrics.json")["world_size"] == 2
    a, b = weights(one), weights(two)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=2e-4)


def test_a_crashing_rank_fails_the_stage_fast(tmp_path):
    d = stage_dir(tmp_path, "crash", {"nproc_per_node": "2"})
    (d / "artifacts/tokenize/data/train_000001.bin").write_bytes(b"\0" * 10)  # every rank trips over it
    t0 = time.time()
    p = run(train_cmd(), d, check=False)
    assert p.returncode != 0 and time.time() - t0 < 60
    assert "train_000001.bin: 10 bytes is shorter than the 1024-byte shard header" in p.stderr


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


BAD_PARAMS = [
    ("quant:\n  metod: gptq\n", r"params.yaml: unknown param 'quant.metod'; did you mean 'quant.method'\?"),
    ("train:\n  iterations: many\n", r"params.yaml: train.iterations: expected int, got 'many'"),
    ("quant:\n  bits: {attn: 6, mpl: 6}\n", r"unknown param 'quant.bits.mpl'; did you mean 'quant.bits.mlp'\?"),
    ("data: [1, 2]\n", r"data: expected a mapping"),
]


def test_bad_params_name_the_key(tmp_path):
    p = tmp_path / "params.yaml"
    for text, message in BAD_PARAMS:
        p.write_text(text)
        with pytest.raises(PgolfError, match=message):
            load_params(p)
    assert load_params(ROOT / "params.yaml").model.layers == 4
    assert load_params(ROOT / "presets" / "challenge.yaml").model.layers == 11


def test_nproc_resolution():
    assert resolve_nproc("gpu", "train.nproc_per_node", 0) == 1
    assert resolve_nproc("gpu", "train.nproc_per_node", 8) == 8
    assert resolve_nproc("2", "train.nproc_per_node", 0) == 2  # CPU processes over gloo
    with pytest.raises(PgolfError, match=r"train.nproc_per_node: 4 processes but only 2 GPU\(s\) are visible"):
        resolve_nproc("4", "train.nproc_per_node", 2)
    with pytest.raises(PgolfError, match=r"eval.nproc_per_node: 'all'; expected 'gpu' or a positive number"):
        resolve_nproc("all", "eval.nproc_per_node", 2)


def test_tokenizer_vocab_must_match_the_model(tmp_path):
    d = stage_dir(tmp_path, "vocab")
    params = yaml.safe_load((d / "params.yaml").read_text())
    params["model"]["vocab_size"] = 512
    (d / "params.yaml").write_text(yaml.safe_dump(params))
    p = run(train_cmd(), d, check=False)
    assert p.returncode != 0
    assert "artifacts/tokenize/data/tokenizer.model: vocab 1024 but model.vocab_size is 512" in p.stderr
    assert not (d / "artifacts/train/model").exists()
