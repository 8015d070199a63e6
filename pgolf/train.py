"""The trainer: DDP over 1..N processes, the challenge's wallclock cap, EMA/SWA, late QAT, resumable."""

import contextlib
import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from . import optim
from .checkpoint import load_tensors, save_tensors
from .config import ModelConfig, TrainConfig
from .data import TrainLoader, shard_paths
from .errors import PgolfError
from .model import GPT, autocast


SYNC_EVERY = 16  # steps the host may queue between waits for the GPU (the clock is exact at each wait)


@dataclass
class Runtime:
    rank: int
    world: int
    device: torch.device

    @property
    def master(self) -> bool:
        return self.rank == 0


def init_runtime() -> Runtime:
    """Join the torchrun group if there is one: NCCL on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    return Runtime(rank, world, device)


def run_hash(mcfg: ModelConfig, cfg: TrainConfig, data_id: str, world: int) -> str:
    """Identifies a run for resuming: same model, schedule, data and world size."""
    keep = {k: v for k, v in asdict(cfg).items() if k not in ("log_every", "checkpoint_every_s", "val_every")}
    blob = json.dumps([asdict(mcfg), keep, data_id, world], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def ema_decay_at(step: int, decay: float) -> float:
    """EMA decay with warm-up, so short runs do not average in the random initialization."""
    return min(decay, (1 + step) / (10 + step))


@dataclass
class TrainResult:
    raw: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor]
    swa: dict[str, torch.Tensor] | None
    metrics: dict


class Trainer:
    def __init__(self, mcfg: ModelConfig, cfg: TrainConfig, data_dir: Path, rt: Runtime,
                 checkpoint: Path | None = None, log: Callable[[str], None] = print,
                 live=None, val_fn: Callable[[GPT], float] | None = None):
        self.mcfg, self.cfg, self.rt, self.log, self.live, self.val_fn = mcfg, cfg, rt, log, live, val_fn
        self.micro_seqs, self.accum = self._batch_geometry()
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)
        self.model = GPT(mcfg).to(rt.device)
        self.step_model = torch.compile(self.model, dynamic=False) if cfg.compile else self.model
        if rt.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.step_model = DDP(self.step_model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None,
                                  broadcast_buffers=False)
        self.opts = optim.build_optimizers(self.model, cfg)
        self.params = [p for p in self.model.parameters()]
        self.ema = [p.detach().clone().float() for p in self.params]
        self.swa: list[torch.Tensor] | None = None
        self.swa_count = 0
        self.loader = TrainLoader(shard_paths(data_dir, "train"), rt.rank, rt.world, rt.device, mcfg.vocab_size)
        self.step, self.train_seconds, self.compile_seconds = 0, 0.0, 0.0
        self.checkpoint = checkpoint
        data_id = (data_dir / "manifest.json").read_text() if (data_dir / "manifest.json").exists() else str(data_dir)
        self.run_id = run_hash(mcfg, cfg, data_id, rt.world)
        self.losses: list[float] = []
        self.resumed_from = None

    def _batch_geometry(self) -> tuple[int, int]:
        cfg, world = self.cfg, self.rt.world
        if cfg.micro_batch_tokens % cfg.seq_len:
            raise PgolfError(f"train.micro_batch_tokens={cfg.micro_batch_tokens} must be a multiple of train.seq_len={cfg.seq_len}")
        per_step = world * cfg.micro_batch_tokens
        if cfg.batch_tokens % per_step:
            raise PgolfError(f"train.batch_tokens={cfg.batch_tokens} must be a multiple of world ({world}) x "
                             f"train.micro_batch_tokens ({cfg.micro_batch_tokens}) = {per_step}")
        return cfg.micro_batch_tokens // cfg.seq_len, cfg.batch_tokens // per_step

    # ------------------------------------------------------------------ one optimizer step
    def train_step(self, scale: float) -> torch.Tensor:
        cfg, model = self.cfg, self.step_model
        total = torch.zeros((), device=self.rt.device)
        for micro in range(self.accum):
            x, y = self.loader.next_batch(cfg.micro_batch_tokens, cfg.seq_len)
            sync = micro == self.accum - 1 or self.rt.world == 1
            with (contextlib.nullcontext() if sync else model.no_sync()), autocast(self.rt.device):
                loss = model(x, y)
            (loss / self.accum).backward()
            total += loss.detach()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        optim.apply_schedule(self.opts, scale, optim.muon_momentum(self.step, cfg))
        for opt in self.opts:
            opt.step()
        for opt in self.opts:
            opt.zero_grad(set_to_none=True)
        return total / self.accum

    def _set_phase(self, progress: float, scale: float) -> None:
        m, cfg = self.mcfg, self.cfg
        self.model.recurrence = m.recur_start >= 0 and progress >= m.recur_after
        qat = cfg.qat_threshold > 0 and scale < cfg.qat_threshold
        self.model.set_qat(cfg.qat_bits if qat else 0)

    # ------------------------------------------------------------------ compile warm-up, excluded from the clock
    def warm_up(self) -> None:
        if not self.cfg.compile or self.cfg.compile_warmup_steps <= 0:
            return
        t0 = time.perf_counter()
        saved = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        saved_opts = [opt.state_dict() for opt in self.opts]
        saved_loader = self.loader.stream.state()
        phases = [(0.0, 1.0)]  # (progress, lr scale): also trace the graphs later phases switch to
        if self.mcfg.recur_start >= 0:
            phases.append((1.0, 1.0))
        if self.cfg.qat_threshold > 0:
            phases.append((1.0, 0.0))
        for i in range(self.cfg.compile_warmup_steps):
            self._set_phase(*phases[i * len(phases) // self.cfg.compile_warmup_steps])
            self.train_step(0.0)  # lr 0: graphs and kernels warm, weights unchanged
        self.model.load_state_dict(saved)
        for opt, state in zip(self.opts, saved_opts):
            opt.load_state_dict(state)
        self.loader.stream.restore(saved_loader)
        self._sync()
        self.compile_seconds = time.perf_counter() - t0

    def _predicted_clock(self, synced_step: int, step_seconds: float) -> float:
        """Training seconds at self.step, predicted from the last clock all ranks agreed on (at synced_step)."""
        return self.train_seconds + (self.step - synced_step) * step_seconds

    def _sync_due(self, synced_step: int, step_seconds: float) -> bool:
        """Whether the step just taken waits for the GPU: the first after a (re)start, one in SYNC_EVERY, the
        last by iterations, and every step once the predicted clock is within two steps of the cap."""
        cfg = self.cfg
        predicted = self._predicted_clock(synced_step, step_seconds)
        return (step_seconds == 0 or self.step - synced_step >= SYNC_EVERY or self.step >= cfg.iterations
                or (cfg.max_seconds > 0 and predicted + 2 * step_seconds >= cfg.max_seconds))

    def _sync(self) -> None:
        if self.rt.device.type == "cuda":
            torch.cuda.synchronize()

    def _elapsed_all(self, elapsed: float) -> float:
        """Every rank must stop at the same step: agree on the slowest clock."""
        if self.rt.world == 1:
            return elapsed
        t = torch.tensor([elapsed], device=self.rt.device, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, complete: bool = False) -> None:
        tensors = {f"model.{n}": t for n, t in self.model.state_dict().items()}
        tensors |= {f"ema.{i}": t for i, t in enumerate(self.ema)}
        if self.swa is not None:
            tensors |= {f"swa.{i}": t for i, t in enumerate(self.swa)}
        opt_meta = []
        for k, opt in enumerate(self.opts):
            sd = opt.state_dict()
            scalars = {}
            for idx, st in sd["state"].items():
                for key, val in st.items():
                    if torch.is_tensor(val):
                        tensors[f"opt{k}.{idx}.{key}"] = val
                    else:
                        scalars[f"{idx}.{key}"] = val
            opt_meta.append({"scalars": scalars, "groups": [{g: v for g, v in grp.items()} for grp in sd["param_groups"]]})
        tensors["rng.cpu"] = torch.get_rng_state()
        if self.rt.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.rt.device)
        meta = {"run_id": self.run_id, "step": self.step, "train_seconds": self.train_seconds,
                "compile_seconds": self.compile_seconds, "loader": self.loader.stream.state(),
                "swa_count": self.swa_count, "optimizers": opt_meta, "losses": self.losses, "complete": complete}
        save_tensors(self._rank_checkpoint(), tensors, meta)

    def _rank_checkpoint(self) -> Path:
        return self.checkpoint / f"rank{self.rt.rank}.safetensors"

    def try_resume(self) -> bool:
        path = self._rank_checkpoint() if self.checkpoint else None
        if path is None or not path.exists():
            return False
        tensors, meta = load_tensors(path, self.rt.device)
        if meta.get("run_id") != self.run_id or meta.get("complete"):
            self.log(f"checkpoint {path} is from {'a finished run' if meta.get('complete') else 'another configuration'}; starting fresh")
            return False
        self.model.load_state_dict({n[6:]: t for n, t in tensors.items() if n.startswith("model.")})
        for i, t in enumerate(self.ema):
            t.copy_(tensors[f"ema.{i}"])
        if "swa.0" in tensors:
            self.swa = [tensors[f"swa.{i}"].clone() for i in range(len(self.params))]
        for k, (opt, om) in enumerate(zip(self.opts, meta["optimizers"])):
            state: dict = {}
            for name, t in tensors.items():
                if name.startswith(f"opt{k}."):
                    _, idx, key = name.split(".", 2)
                    state.setdefault(int(idx), {})[key] = t
            for name, v in om["scalars"].items():
                idx, key = name.split(".", 1)
                state.setdefault(int(idx), {})[key] = v
            opt.load_state_dict({"state": state, "param_groups": om["groups"]})
        torch.set_rng_state(tensors["rng.cpu"].cpu())
        if "rng.cuda" in tensors and self.rt.device.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng.cuda"].cpu(), self.rt.device)
        self.loader.stream.restore(meta["loader"])
        self.step, self.train_seconds = meta["step"], meta["train_seconds"]
        self.compile_seconds, self.swa_count, self.losses = meta["compile_seconds"], meta["swa_count"], meta["losses"]
        self.resumed_from = self.step
        self.log(f"resumed from {path} at step {self.step} ({self.train_seconds:.1f}s of training done)")
        return True

    # ------------------------------------------------------------------ the loop
    def run(self) -> TrainResult:
        """Train to the cap; call try_resume() first to continue an interrupted run."""
        cfg = self.cfg
        if self.resumed_from is None:
            self.warm_up()
        last_ckpt = time.perf_counter()
        tokens_per_step = cfg.batch_tokens
        self.log(f"train: {sum(p.numel() for p in self.params):,} params, world {self.rt.world}, "
                 f"grad accum {self.accum}, {tokens_per_step:,} tokens/step on {self.rt.device}")
        # The host does not wait for the GPU after every step (a per-step sync drains the queue: ~2 ms/step on
        # one H100). Between syncs every rank predicts the clock from the last agreed one, so all ranks take the
        # same lr, phase and sync decisions; near the cap every step syncs, so the cap stays exact.
        synced_step, step_seconds = self.step, 0.0
        t_synced = time.perf_counter()
        while True:
            elapsed = self._predicted_clock(synced_step, step_seconds)
            if self.step >= cfg.iterations or (cfg.max_seconds > 0 and elapsed >= cfg.max_seconds):
                break
            scale = optim.lr_scale(self.step, elapsed, cfg)
            self._set_phase(optim.progress(self.step, elapsed, cfg), scale)
            loss = self.train_step(scale)
            with torch.no_grad():
                decay = ema_decay_at(self.step, cfg.ema_decay)
                torch._foreach_lerp_(self.ema, [p.detach().float() for p in self.params], 1 - decay)
                if cfg.swa and scale < cfg.swa_threshold and self.step % cfg.swa_every == 0:
                    if self.swa is None:
                        self.swa = [torch.zeros_like(e) for e in self.ema]
                    torch._foreach_add_(self.swa, [p.detach().float() for p in self.params])
                    self.swa_count += 1
            self.step += 1
            log = self.step % cfg.log_every == 0 or self.step == 1
            val = cfg.val_every and self.step % cfg.val_every == 0 and self.val_fn is not None
            if not (log or val or self._sync_due(synced_step, step_seconds)):
                continue
            self._sync()
            now = self._elapsed_all(self.train_seconds + time.perf_counter() - t_synced)
            step_seconds = max(now - self.train_seconds, 1e-9) / (self.step - synced_step)
            self.train_seconds, synced_step = now, self.step
            last = self.step >= cfg.iterations or (cfg.max_seconds > 0 and self.train_seconds >= cfg.max_seconds)
            if log or last:
                value = float(loss.item())
                self.losses.append(value)
                if self.rt.master:
                    self.log(f"step {self.step} loss {value:.4f} lr_scale {scale:.3f} {step_seconds * 1000:.1f} ms/step "
                             f"{tokens_per_step / step_seconds / 1e6:.3f} M tok/s elapsed {self.train_seconds:.1f}s")
                    if self.live is not None:
                        self.live.step = self.step
                        self.live.log_metric("train_loss", value)
                        self.live.log_metric("lr_scale", scale)
                        self.live.next_step()
            if val:
                bpb = self.val_fn(self.model)
                if self.rt.master:
                    self.log(f"step {self.step} val_bpb {bpb:.4f}")
                    if self.live is not None:
                        self.live.log_metric("val_bpb", bpb)
            if self.checkpoint and cfg.checkpoint_every_s > 0 and time.perf_counter() - last_ckpt >= cfg.checkpoint_every_s:
                self.save_checkpoint()
                last_ckpt = time.perf_counter()
            t_synced = time.perf_counter()  # logging, val and checkpoints are not training time
        if self.checkpoint:
            self.save_checkpoint(complete=True)
        return self._result()

    def _result(self) -> TrainResult:
        names = [n for n, _ in self.model.named_parameters()]
        raw = {n: t.detach().float().clone() for n, t in self.model.state_dict().items()}
        ema = dict(zip(names, self.ema))
        swa = dict(zip(names, [s / self.swa_count for s in self.swa])) if self.swa is not None else None
        cuda = self.rt.device.type == "cuda"
        metrics = {
            "steps": self.step,
            "tokens_seen": self.step * self.cfg.batch_tokens,
            "train_seconds": round(self.train_seconds, 3),
            "compile_seconds": round(self.compile_seconds, 3),
            "final_train_loss": self.losses[-1] if self.losses else float("nan"),
            "tokens_per_second": round(self.step * self.cfg.batch_tokens / max(self.train_seconds, 1e-9), 1),
            "ms_per_step": round(1000 * self.train_seconds / max(self.step, 1), 2),
            "gpu": torch.cuda.get_device_name(self.rt.device) if cuda else "cpu",
            "gpu_count": self.rt.world if cuda else 0,
            "world_size": self.rt.world,
            "peak_memory_gib": round(torch.cuda.max_memory_allocated(self.rt.device) / 2**30, 3) if cuda else 0.0,
            "params": sum(p.numel() for p in self.params),
            "swa_count": self.swa_count,
            "resumed_from_step": self.resumed_from,
        }
        if not math.isfinite(metrics["final_train_loss"]):
            raise PgolfError("training diverged: final train loss is not finite (lower train.*_lr?)")
        return TrainResult(raw, ema, swa, metrics)
