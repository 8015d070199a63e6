import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pgolf.config import ModelConfig, TrainConfig
from pgolf.data import load_tokenizer, train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
FINEWEB_TOKENIZER = ROOT.parent / "shared" / "tokenizers" / "fineweb_8192_bpe.model"

# Small but varied documents: words, digits, punctuation, non-ASCII (forces byte fallback).
WORDS = ("the model trains quickly while quantization keeps bits small; tokens count bytes, "
         "Überprüfung naïve café 東京 emoji 🙂 and numbers 12345 67.89 (parentheses) [brackets]").split()


def make_docs(n: int, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    docs = []
    for _ in range(n):
        k = int(torch.randint(20, 80, (1,), generator=g))
        idx = torch.randint(0, len(WORDS), (k,), generator=g).tolist()
        docs.append(" ".join(WORDS[i] for i in idx) + "\n")
    return docs


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tok.model"
    train_tokenizer(make_docs(400, seed=1), 320, path, 10_000_000)
    return path


@pytest.fixture(scope="session")
def sp(tokenizer_path):
    return load_tokenizer(tokenizer_path)


def tiny_model(**overrides) -> ModelConfig:
    base = dict(vocab_size=320, layers=4, dim=32, heads=4, kv_heads=2, mlp_mult=2.0, rope_dims=0)
    return ModelConfig(**{**base, **overrides})


def tiny_train(**overrides) -> TrainConfig:
    base = dict(seq_len=32, batch_tokens=512, micro_batch_tokens=256, iterations=30, max_seconds=0,
                warmup_steps=2, warmdown_frac=0.3, compile=False, log_every=10, checkpoint_every_s=0,
                muon_momentum_warmup_steps=5, ema_decay=0.9)
    return TrainConfig(**{**base, **overrides})


def pipeline_repo(tmp: Path, params_patch: dict) -> Path:
    """A fresh git + DVC repo holding this project's pipeline, with params.yaml overridden."""
    import yaml

    repo = tmp / "repo"
    repo.mkdir()
    for name in ("dvc.yaml", "params.yaml", "pyproject.toml"):
        shutil.copy(ROOT / name, repo / name)
    for folder in ("pgolf", "stages", "data"):
        shutil.copytree(ROOT / folder, repo / folder, ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for section, values in params_patch.items():
        params.setdefault(section, {}).update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (repo / ".gitignore").write_text((ROOT / ".gitignore").read_text())
    run(["git", "init", "-q"], repo)
    run(["dvc", "init", "-q"], repo)
    shutil.copy(ROOT / ".dvc" / "config", repo / ".dvc" / "config")
    shutil.copytree(ROOT / ".dvc" / "plots", repo / ".dvc" / "plots")
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "pipeline"], repo)
    return repo


def run(cmd: list[str], cwd: Path, check: bool = True, **env_extra: str) -> subprocess.CompletedProcess:
    bindir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bindir + os.pathsep + os.environ.get("PATH", ""), "PYTHONUNBUFFERED": "1", **env_extra}
    env.pop("PYTHONPATH", None)
    if cmd[0] == "dvc":
        cmd = [os.path.join(bindir, "dvc"), *cmd[1:]]
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if check and p.returncode:
        raise AssertionError(f"{cmd} failed ({p.returncode}):\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}")
    return p


def bench_module(monkeypatch: pytest.MonkeyPatch, name: str):
    """A bench/ script imported as a module, fresh (with bench/ on the path for its own imports of its neighbours)."""
    import importlib

    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    sys.modules.pop(name, None)
    return importlib.import_module(name)


def read_metrics(repo: Path, stage: str) -> dict:
    return json.loads((repo / "artifacts" / stage / "metrics.json").read_text())


# Demo-pipeline settings small enough for a test: a few seconds of training.
FAST_PIPELINE = {
    "train": {"iterations": 12, "batch_tokens": 4096, "micro_batch_tokens": 4096, "log_every": 4,
              "warmup_steps": 2, "checkpoint_every_s": 0, "val_every": 6},
    "calibrate": {"num_seqs": 16},
}


class LaunchRecorder:
    """Stands in for `torch.library.wrap_triton` (a fused kernel launcher's `wrap`): records each launch as (kernel,
    grid, positional arguments, keyword arguments) instead of running it."""

    def __init__(self):
        self.launches = []

    def __call__(self, kernel):
        self.kernel = kernel
        return self

    def __getitem__(self, grid):
        kernel = self.kernel
        return lambda *args, **kwargs: self.launches.append((kernel, grid, args, kwargs))


def in_triton_interpreter(script: str) -> str:
    """Run `script` in a new interpreter with TRITON_INTERPRET=1 (Triton reads it once, when it is imported), the
    Triton kernels on the CPU; returns its output, failing the test with its end where it fails."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    p = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout


def fused_against_eager(model, module, scale: float, atol: float) -> list[torch.Tensor]:
    """The model's training loss and every gradient with `module`'s fused kernels on and off, on perturbed weights
    (scale) and random tokens; asserts they agree (loss to 1e-5, gradients to atol) and returns the fused gradients."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    idx = torch.randint(0, model.cfg.vocab_size, (2, 24))
    results = []
    for enabled in (True, False):
        module.enabled = enabled
        model.zero_grad()
        loss = model(idx, idx.roll(-1, 1))
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-5, rtol=1e-5)
    for g_fused, g_eager in zip(*(r[1] for r in results)):
        torch.testing.assert_close(g_fused, g_eager, atol=atol, rtol=1e-4)
    return results[0][1]
