"""Hessians H = XᵀX of the inputs of every quantizable linear map, for GPTQ.

Linear layers that read the same input tensor (q, k, v) share one H. q, k and v run as one matmul inside
Attention, so their input is taken by a pre-hook on the attention module. The output head's H comes from
the final hidden states; with tied embeddings it belongs to `tok_emb.weight`.
"""

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import CalibrateConfig
from .data import TokenStream, read_shard, shard_paths
from .errors import PgolfError
from .model import GPT, Attention, autocast
from .registry import Registry


def head_name(model: GPT) -> str:
    return "tok_emb.weight" if model.lm_head is None else "lm_head.weight"


@dataclass(frozen=True)
class Source:
    batches: Callable[[GPT, CalibrateConfig, Path, torch.device], Iterator[torch.Tensor]]
    reads_training_data: bool  # its seconds count towards the training budget


SOURCES: Registry[Source] = Registry("calibrate.source")  # where calibration sequences come from


SAMPLINGS: Registry = Registry("calibrate.sampling")  # (train shards, cfg) -> the calibration sequences


@SAMPLINGS.register("stream")
def stream_windows(shards: list[np.ndarray], cfg: CalibrateConfig) -> np.ndarray:
    """The first num_seqs * seq_len tokens of the train stream, in order."""
    return TokenStream(shards).take(cfg.num_seqs * cfg.seq_len).reshape(cfg.num_seqs, cfg.seq_len)


@SAMPLINGS.register("random")
def random_windows(shards: list[np.ndarray], cfg: CalibrateConfig) -> np.ndarray:
    """num_seqs distinct windows drawn uniformly from all train shards, reproducible by calibrate.seed: each shard
    is cut into seq_len windows from a random phase, as the record's ShuffledSequenceLoader cuts them."""
    rng = np.random.default_rng(cfg.seed)
    L = cfg.seq_len
    phases = np.array([rng.integers(max(min(L, s.size - L), 1)) for s in shards])
    counts = np.array([max((s.size - p) // L, 0) for s, p in zip(shards, phases)])
    if counts.sum() == 0:
        raise PgolfError(f"calibrate.seq_len: {L} is longer than every train shard")
    picks = rng.choice(counts.sum(), size=cfg.num_seqs, replace=cfg.num_seqs > counts.sum())
    which = np.searchsorted(np.cumsum(counts), picks, side="right")
    starts = phases[which] + (picks - np.concatenate([[0], np.cumsum(counts)])[which]) * L
    return np.stack([shards[w][s:s + L] for w, s in zip(which, starts)]).astype(np.int64)


def train_batches(model: GPT, cfg: CalibrateConfig, data_dir: Path, device: torch.device) -> Iterator[torch.Tensor]:
    shards = [read_shard(p, model.cfg.vocab_size) for p in shard_paths(data_dir, "train")]
    seqs = torch.from_numpy(SAMPLINGS[cfg.sampling](shards, cfg))
    yield from seqs.split(cfg.batch_seqs)


def self_batches(model: GPT, cfg: CalibrateConfig, data_dir: Path, device: torch.device) -> Iterator[torch.Tensor]:
    return generate(model, cfg.num_seqs, cfg.seq_len, cfg.temperature, model.cfg.bos_id, device, cfg.batch_seqs,
                    cfg.seed)


SOURCES.add("train", Source(train_batches, reads_training_data=True))
SOURCES.add("self", Source(self_batches, reads_training_data=False))


@torch.no_grad()
def generate(model: GPT, num_seqs: int, seq_len: int, temperature: float, bos: int, device: torch.device,
             batch_seqs: int, seed: int) -> Iterator[torch.Tensor]:
    """Sequences the model samples itself from BOS: calibration data that never touches training shards."""
    gen = torch.Generator(device=device).manual_seed(seed)
    for start in range(0, num_seqs, batch_seqs):
        b = min(batch_seqs, num_seqs - start)
        idx = torch.full((b, 1), bos, dtype=torch.long, device=device)
        while idx.size(1) < seq_len:
            with autocast(device):
                logits = model.logits(idx[:, -seq_len:])[:, -1].float()
            probs = torch.softmax(logits / max(temperature, 1e-5), dim=-1)
            idx = torch.cat([idx, torch.multinomial(probs, 1, generator=gen)], dim=1)
        yield idx


def _accumulate(sums: dict[str, torch.Tensor], key: str, x: torch.Tensor) -> None:
    with torch.autocast(x.device.type, enabled=False):  # fp32 sums, also under bf16 autocast
        x = x.reshape(-1, x.size(-1)).float()
        sums[key] = x.T @ x if key not in sums else sums[key].addmm_(x.T, x)


@torch.no_grad()
def collect_hessians(model: GPT, batches: Iterator[torch.Tensor],
                     progress: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str], int]:
    """Accumulate fp32 XᵀX / n per distinct linear input; returns (H by key, weight name -> key, tokens)."""
    device = next(model.parameters()).device
    fused = {f"{n}.{part}.weight": m for n, m in model.named_modules() if isinstance(m, Attention) for part in "qkv"}
    linears = {n: m for n, m in model.quantizable_linears().items() if m is not model.lm_head and n not in fused}
    sums: dict[str, torch.Tensor] = {}
    shared: dict[str, str] = {}
    seen_inputs: dict[tuple, tuple[str, torch.Tensor]] = {}  # holds the tensors so no address is reused
    first_batch = True

    def hook(name):
        def fn(module, inputs, *output):
            x = inputs[0]
            if first_batch:  # map each weight to the first linear that read the same input tensor
                key = (x.data_ptr(), tuple(x.shape), x.dtype)
                shared[name] = seen_inputs.setdefault(key, (name, x))[0]
            if shared[name] != name:
                return
            _accumulate(sums, name, x)
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in linears.items()]
    handles += [m.register_forward_pre_hook(hook(n)) for n, m in fused.items()]
    head = head_name(model)
    tokens = 0
    model.eval()
    it = batches
    if progress:
        from tqdm import tqdm

        it = tqdm(batches, desc="calibrate", unit="batch")
    try:
        for idx in it:
            idx = idx.to(device)
            with autocast(device):
                h = model.hidden(idx)
            _accumulate(sums, head, h)
            tokens += idx.numel()
            first_batch = False
            seen_inputs.clear()
    finally:
        for handle in handles:
            handle.remove()
    shared[head] = head
    return {k: v / tokens for k, v in sums.items()}, shared, tokens


@dataclass
class Calibration:
    hessians: dict[str, torch.Tensor]
    shared: dict[str, str]  # weight name -> Hessian key
    tokens: int
    seconds: float  # the time spent reading and running the calibration sequences
    reads_training_data: bool


def calibrate(model: GPT, cfg: CalibrateConfig, data_dir: Path, device: torch.device) -> Calibration:
    source = SOURCES[cfg.source]
    with torch.no_grad(), autocast(device):  # CUDA context and kernels warm on zeros: the clock counts reading data
        model.hidden(torch.zeros((1, cfg.seq_len), dtype=torch.long, device=device))
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    hessians, shared, tokens = collect_hessians(model, source.batches(model, cfg, data_dir, device), progress=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return Calibration(hessians, shared, tokens, time.perf_counter() - t0, source.reads_training_data)
