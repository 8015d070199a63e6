"""The trainer: 1..N processes (DDP, or its own gradient average after a rank-scoped clip), the challenge's
wallclock cap, EMA/SWA, late QAT, resumable.

A step: accumulate gradients over micro-batches, clip, apply the schedule, step Muon and AdamW, then
update the EMA (and SWA). The clock counts only training steps; compile warm-up, logging, validation
and checkpoints are outside it. With a cap, the loop stops before a step whose predicted end would pass
`max_seconds - calibration_reserve_s`, so training plus calibration on training data fits the budget.
"""

import contextlib
import hashlib
import json
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import optim
from .checkpoint import load_tensors, save_tensors
from .attention import document_mask
from .config import ModelConfig, TrainConfig
from .data import TrainLoader, shard_paths
from .errors import PgolfError
from .model import GPT, autocast, define_compiled_ops
from .registry import Registry
from .runtime import Runtime, all_max, average_grads, gpu_name

SYNC_EVERY = 16  # steps the host may queue between waits for the GPU (the clock is exact at each wait)

# train.compile_mode -> torch.compile's options. cuda_graphs: inductor records the compiled forward and backward as
# CUDA graphs and replays them (one launch each instead of hundreds: the record preset's step left the GPU idle 16 %
# of the time with the host blocked on launches); on a CPU inductor records nothing, so it runs as default.
COMPILE_MODES: Registry[dict] = Registry("train.compile_mode")
COMPILE_MODES.add("default", {})
COMPILE_MODES.add("cuda_graphs", {"mode": "reduce-overhead"})

# train.pack: does a rank's micro-batch meet the model as one row?
PACKINGS: Registry[bool] = Registry("train.pack")
PACKINGS.add("rows", False)  # rows of seq_len: attention also cut at each row's start
# one row, attention cut at each BOS and every seq_len tokens from a document's start (the records' packing since
# 2026-04-10): a document that crosses a row boundary keeps its context
PACKINGS.add("span", True)

# train.embed_dtype: the token embedding (tied: also the output head) as stored and stepped in training. The record's
# trainer casts its model to bf16 and back to float32 all but the embedding, so AdamW steps a bf16 embedding (its
# rounding at every step, a noise the other weights do not get); the results hold float32 either way (a resume
# checkpoint keeps the table as it trains)
EMBED_DTYPES: Registry[torch.dtype] = Registry("train.embed_dtype")
EMBED_DTYPES.add("float32", torch.float32)
EMBED_DTYPES.add("bfloat16", torch.bfloat16)

# train.grad_clip_scope: does train.grad_clip measure each rank's own gradient, before the ranks average them?
GRAD_CLIP_SCOPES: Registry[bool] = Registry("train.grad_clip_scope")
GRAD_CLIP_SCOPES.add("global", False)  # the averaged gradient (DDP averages it during the backward, overlapped)
# the records' since the parameter banks: each rank clips its own gradient, its optimizer averages them afterwards
# (on 8 GPUs a rank's gradient of 1/8 of the batch is noisier, so the clip bites more often); no overlap
GRAD_CLIP_SCOPES.add("rank", True)


def run_hash(mcfg: ModelConfig, cfg: TrainConfig, data_id: str, world: int) -> str:
    """Identifies a run for resuming: same model, schedule, data and world size."""
    keep = {k: v for k, v in asdict(cfg).items() if k not in ("log_every", "checkpoint_every_s", "val_every")}
    blob = json.dumps([asdict(mcfg), keep, data_id, world], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def ema_decay_at(step: int, decay: float) -> float:
    """EMA decay with warm-up, so short runs do not average in the random initialization."""
    return min(decay, (1 + step) / (10 + step))


def passes_at(progress: float, mcfg: ModelConfig) -> int:
    """Extra recurrent passes running at this fraction of training: the k-th from recur_after + (k-1) stagger."""
    if mcfg.recur_start < 0:
        return 0
    return sum(progress >= mcfg.recur_after + k * mcfg.recur_stagger for k in range(mcfg.recur_loops))


@dataclass
class TrainResult:
    raw: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor]
    swa: dict[str, torch.Tensor] | None
    passes: int  # recurrent passes running at the end: the network the weights belong to
    metrics: dict
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, train loss)
    vals: list[tuple[int, float]] = field(default_factory=list)  # (step, val bpb)


class Trainer:
    def __init__(self, mcfg: ModelConfig, cfg: TrainConfig, data_dir: Path, rt: Runtime,
                 checkpoint: Path | None = None, log: Callable[[str], None] = print,
                 val_fn: Callable[[GPT], float] | None = None):
        self.mcfg, self.cfg, self.rt, self.log, self.val_fn = mcfg, cfg, rt, log, val_fn
        self.accum = self._accumulation()
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)
        self.model = GPT(mcfg).to(rt.device)
        self.model.tok_emb.to(EMBED_DTYPES[cfg.embed_dtype])
        self.model.set_fp8(cfg.fp8)
        if cfg.compile:
            define_compiled_ops()
        self.step_model = (torch.compile(self.model, dynamic=False, **COMPILE_MODES[cfg.compile_mode]) if cfg.compile
                           else self.model)
        # with a rank-scoped clip the ranks average the gradients themselves after it: no DDP (nor the graph splits
        # at its buckets that it costs a compiled model); the ranks start from rank 0's weights as DDP would have them
        self.clip_first = rt.world > 1 and cfg.grad_clip > 0 and GRAD_CLIP_SCOPES[cfg.grad_clip_scope]
        self.span = PACKINGS[cfg.pack]
        if self.clip_first:
            for t in [*self.model.parameters(), *self.model.buffers()]:
                torch.distributed.broadcast(t.data, 0)
        elif rt.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            with warnings.catch_warnings():  # torch 2.13 renames broadcast_buffers; 2.11 (the GPU hosts') lacks the new name
                warnings.simplefilter("ignore", FutureWarning)
                self.step_model = DDP(self.step_model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None,
                                      broadcast_buffers=False)
        self.opts = optim.build_optimizers(self.model, cfg, reduce_grads=self.clip_first)
        self.params = list(self.model.parameters())
        reduced = {id(p) for opt in self.opts if getattr(opt, "reduce_grads", False)
                   for group in opt.param_groups for p in group["params"]}
        self.averaged = [p for p in self.params if id(p) not in reduced]  # by the trainer after a rank-scoped clip
        self.replayed = cfg.compile and COMPILE_MODES[cfg.compile_mode].get("mode") == "reduce-overhead"
        self.ema = [p.detach().clone().float() for p in self.params]
        self.swa: list[torch.Tensor] | None = None
        self.swa_count = 0
        self.loader = TrainLoader(shard_paths(data_dir, "train"), rt.rank, rt.world, rt.device, mcfg.vocab_size)
        self.step, self.train_seconds, self.compile_seconds = 0, 0.0, 0.0
        self.checkpoint = checkpoint
        data_id = (data_dir / "manifest.json").read_text() if (data_dir / "manifest.json").exists() else str(data_dir)
        self.run_id = run_hash(mcfg, cfg, data_id, rt.world)
        self.losses: list[tuple[int, float]] = []
        self.vals: list[tuple[int, float]] = []
        self.resumed_from = None

    def start_from(self, state: dict[str, torch.Tensor]) -> None:
        """Begin from these weights instead of the seed's draw (and the EMA with them): a parity run starts from the
        record's own initialization. Before run()."""
        self.model.load_state_dict(state)
        self.ema = [p.detach().clone().float() for p in self.params]

    def _accumulation(self) -> int:
        cfg, world = self.cfg, self.rt.world
        per_step = world * cfg.micro_batch_tokens
        if cfg.batch_tokens % per_step:
            raise PgolfError(f"train.batch_tokens: {cfg.batch_tokens} is not a multiple of the processes ({world}) x "
                             f"train.micro_batch_tokens ({cfg.micro_batch_tokens}) = {per_step}")
        return cfg.batch_tokens // per_step

    # ------------------------------------------------------------------ one optimizer step
    def train_step(self, scale: float) -> torch.Tensor:
        cfg, model = self.cfg, self.step_model
        total = torch.zeros((), device=self.rt.device)
        for micro in range(self.accum):
            x, y = self.loader.next_batch(cfg.micro_batch_tokens, cfg.seq_len)
            # the mask is built here, outside the compiled model: built inside it (FlexAttention's block mask traced
            # into the graph), training on one H200 turned NaN at the second step; passed in, it compiles once
            host = self.loader.host_inputs
            if self.span:
                x, y, host = (t.reshape(1, -1) for t in (x, y, host))
            mask = (document_mask(x, self.mcfg.bos_id, host_idx=host, max_len=cfg.seq_len if self.span else None)
                    if cfg.doc_mask else None)
            sync = micro == self.accum - 1 or self.rt.world == 1 or self.clip_first  # no DDP to hold back then
            with (contextlib.nullcontext() if sync else model.no_sync()), autocast(self.rt.device):
                loss = model(x, y, mask)
            (loss / self.accum).backward()
            total += loss.detach()
            if self.replayed and micro == 0 and self.accum > 1:
                # a replayed backward leaves each gradient in the graph's own memory, autograd takes it as p.grad,
                # and the next micro-batch's replay overwrites it ("accessing tensor output of CUDAGraphs that has
                # been overwritten", one H200, 8 micro-batches): the later micro-batches add into copies
                for p in self.params:
                    if p.grad is not None:
                        p.grad = p.grad.clone()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        if self.clip_first:
            average_grads(self.averaged)
        optim.apply_schedule(self.opts, scale, optim.muon_momentum(self.step, cfg))
        for opt in self.opts:
            opt.step()
        for opt in self.opts:
            opt.zero_grad(set_to_none=True)
        return total / self.accum

    def update_averages(self, cooldown: float) -> None:
        """EMA every step; SWA every swa_every steps once the warmdown factor is below swa_threshold."""
        cfg = self.cfg
        with torch.no_grad():
            weights = [p.detach().float() for p in self.params]
            torch._foreach_lerp_(self.ema, weights, 1 - ema_decay_at(self.step, cfg.ema_decay))
            if cfg.swa and cooldown < cfg.swa_threshold and self.step % cfg.swa_every == 0:
                if self.swa is None:
                    self.swa = [torch.zeros_like(e) for e in self.ema]
                torch._foreach_add_(self.swa, weights)
                self.swa_count += 1

    def set_phase(self, progress: float, cooldown: float) -> tuple[int, bool]:
        """Recurrent passes by training progress; late QAT once the warmdown factor is below qat_threshold.
        Returns the phase (passes, QAT on)."""
        self.model.passes = passes_at(progress, self.mcfg)
        qat = self.cfg.qat_threshold > 0 and cooldown < self.cfg.qat_threshold
        self.model.set_qat(self.cfg.qat_bits if qat else 0)
        return self.model.passes, qat

    # ------------------------------------------------------------------ compile warm-up, excluded from the clock
    def warm_up(self) -> None:
        if not self.cfg.compile or self.cfg.compile_warmup_steps <= 0:
            return
        t0 = time.perf_counter()
        saved = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        saved_opts = [opt.state_dict() for opt in self.opts]
        saved_loader = self.loader.stream.state()
        # (progress, warmdown factor) of every graph later phases switch to: each pass count, QAT on
        phases = [(self.mcfg.recur_after + k * self.mcfg.recur_stagger if k else 0.0, 1.0)
                  for k in range(self.model.max_passes + 1)]
        if self.cfg.qat_threshold > 0:
            phases.append((1.0, 0.0))
        for i in range(self.cfg.compile_warmup_steps):
            self.set_phase(*phases[i * len(phases) // self.cfg.compile_warmup_steps])
            self.train_step(0.0)  # lr 0: graphs and kernels warm, weights unchanged
        self.model.load_state_dict(saved)
        for opt, state in zip(self.opts, saved_opts):
            opt.load_state_dict(state)
        self.loader.stream.restore(saved_loader)
        self._sync()
        self.compile_seconds = time.perf_counter() - t0

    # ------------------------------------------------------------------ the clock
    def _predicted_clock(self, synced_step: int, step_seconds: float) -> float:
        """Training seconds at self.step, predicted from the last clock all ranks agreed on (at synced_step)."""
        return self.train_seconds + (self.step - synced_step) * step_seconds

    def _cap(self) -> float:
        """Seconds of training allowed: the cap less what calibration on training data will take."""
        return self.cfg.max_seconds - self.cfg.calibration_reserve_s

    def _done(self, clock: float, step_seconds: float) -> bool:
        """Stop at `iterations`, or before a step whose predicted end passes the cap."""
        return self.step >= self.cfg.iterations or (self.cfg.max_seconds > 0 and clock + step_seconds > self._cap())

    def _sync_due(self, synced_step: int, step_seconds: float, phase_changed: bool) -> bool:
        """Whether the step just taken waits for the GPU: the first after a (re)start or a phase change (recurrence
        passes or QAT change the step time), one in SYNC_EVERY, the last by iterations, and every step once the
        predicted clock is within SYNC_EVERY steps of the cap (so steps up to twice as slow as predicted since the
        last wait cannot carry training past it)."""
        predicted = self._predicted_clock(synced_step, step_seconds)
        return (step_seconds == 0 or phase_changed or self.step - synced_step >= SYNC_EVERY
                or self.step >= self.cfg.iterations
                or (self.cfg.max_seconds > 0 and predicted + SYNC_EVERY * step_seconds >= self._cap()))

    def _sync(self) -> None:
        if self.rt.device.type == "cuda":
            torch.cuda.synchronize()

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> None:
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
            opt_meta.append({"scalars": scalars, "groups": sd["param_groups"]})
        tensors["rng.cpu"] = torch.get_rng_state()
        if self.rt.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.rt.device)
        meta = {"run_id": self.run_id, "step": self.step, "train_seconds": self.train_seconds,
                "compile_seconds": self.compile_seconds, "loader": self.loader.stream.state(),
                "swa_count": self.swa_count, "optimizers": opt_meta, "losses": self.losses, "vals": self.vals}
        save_tensors(self._rank_checkpoint(), tensors, meta)

    def _rank_checkpoint(self) -> Path:
        return self.checkpoint / f"rank{self.rt.rank}.safetensors"

    def try_resume(self) -> bool:
        path = self._rank_checkpoint() if self.checkpoint else None
        if path is None or not path.exists():
            return False
        tensors, meta = load_tensors(path, self.rt.device)
        if meta.get("run_id") != self.run_id:
            self.log(f"checkpoint {path} is from another configuration; starting fresh")
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
        self.compile_seconds, self.swa_count = meta["compile_seconds"], meta["swa_count"]
        self.losses, self.vals = [tuple(x) for x in meta["losses"]], [tuple(x) for x in meta["vals"]]
        self.resumed_from = self.step
        self.log(f"resumed from {path} at step {self.step} ({self.train_seconds:.1f}s of training done)")
        return True

    # ------------------------------------------------------------------ logging and validation
    def _log_step(self, loss: torch.Tensor, scale: float, step_seconds: float) -> None:
        value = float(loss.item())
        self.losses.append((self.step, value))
        if self.rt.master:
            cfg = self.cfg
            left = (cfg.iterations - self.step) * step_seconds
            if cfg.max_seconds > 0:
                left = min(left, max(self._cap() - self.train_seconds, 0.0))
            self.log(f"step {self.step}/{cfg.iterations} loss {value:.4f} lr_scale {scale:.3f} "
                     f"{step_seconds * 1000:.1f} ms/step {cfg.batch_tokens / step_seconds / 1e6:.3f} M tok/s "
                     f"elapsed {self.train_seconds:.1f}s eta {left:.0f}s")

    def validate(self) -> None:
        """Val bpb of the weights as saved (QAT's fake quantization off), with the passes now running."""
        qat = [m.qat_bits for m in self.model.modules() if hasattr(m, "qat_bits")]
        self.model.set_qat(0)
        bpb = self.val_fn(self.model)
        for m, bits in zip((m for m in self.model.modules() if hasattr(m, "qat_bits")), qat):
            m.qat_bits = bits
        self.vals.append((self.step, bpb))
        if self.rt.master:
            self.log(f"step {self.step} val_bpb {bpb:.4f}")

    # ------------------------------------------------------------------ the loop
    def run(self) -> TrainResult:
        """Train to the cap; call try_resume() first to continue an interrupted run."""
        cfg = self.cfg
        if self.resumed_from is None:
            self.warm_up()
        last_ckpt = time.perf_counter()
        self.log(f"train: {sum(p.numel() for p in self.params):,} params, world {self.rt.world}, "
                 f"grad accum {self.accum}, {cfg.batch_tokens:,} tokens/step on {self.rt.device}")
        # The host does not wait for the GPU after every step (a per-step sync drains the queue: ~2 ms/step on
        # one H100). Between syncs every rank predicts the clock from the last agreed one, so all ranks take the
        # same lr, phase and stop decisions; near the cap every step syncs, so the stop is taken on a measured clock.
        synced_step, step_seconds, synced_phase = self.step, 0.0, None
        t_synced = time.perf_counter()
        while not self._done(self._predicted_clock(synced_step, step_seconds), step_seconds):
            elapsed = self._predicted_clock(synced_step, step_seconds)
            cooldown = optim.warmdown(self.step, elapsed, cfg)
            scale = optim.lr_scale(self.step, elapsed, cfg)
            phase = self.set_phase(optim.progress(self.step, elapsed, cfg), cooldown)
            loss = self.train_step(scale)
            self.update_averages(cooldown)
            self.step += 1
            log = self.step % cfg.log_every == 0 or self.step == 1
            val = cfg.val_every and self.step % cfg.val_every == 0 and self.val_fn is not None
            if not (log or val or self._sync_due(synced_step, step_seconds, phase != synced_phase)):
                continue
            synced_phase = phase
            self._sync()
            now = all_max(self.train_seconds + time.perf_counter() - t_synced, self.rt.device)
            step_seconds = max(now - self.train_seconds, 1e-9) / (self.step - synced_step)
            self.train_seconds, synced_step = now, self.step
            if log or self._done(self.train_seconds, step_seconds):
                self._log_step(loss, scale, step_seconds)
            if val:
                self.validate()
            if self.checkpoint and cfg.checkpoint_every_s > 0 and time.perf_counter() - last_ckpt >= cfg.checkpoint_every_s:
                self.save_checkpoint()
                last_ckpt = time.perf_counter()
            t_synced = time.perf_counter()  # logging, val and checkpoints are not training time
        if cfg.val_every and self.val_fn is not None and (not self.vals or self.vals[-1][0] != self.step):
            self.validate()
        return self._result()

    def _result(self) -> TrainResult:
        names = [n for n, _ in self.model.named_parameters()]
        raw = {n: t.detach().float().clone() for n, t in self.model.state_dict().items()}
        ema = dict(zip(names, self.ema))
        swa = dict(zip(names, [s / self.swa_count for s in self.swa])) if self.swa is not None else None
        cuda = self.rt.device.type == "cuda"
        final_loss = self.losses[-1][1] if self.losses else float("nan")
        if not math.isfinite(final_loss):
            raise PgolfError("training diverged: the final train loss is not finite (lower train.*_lr?)")
        metrics = {
            "steps": self.step,
            "tokens_seen": self.step * self.cfg.batch_tokens,
            "train_seconds": round(self.train_seconds, 3),
            "compile_seconds": round(self.compile_seconds, 3),
            "final_train_loss": final_loss,
            "tokens_per_second": round(self.step * self.cfg.batch_tokens / max(self.train_seconds, 1e-9), 1),
            "ms_per_step": round(1000 * self.train_seconds / max(self.step, 1), 2),
            "gpu": gpu_name(self.rt.device),
            "gpu_count": self.rt.world if cuda else 0,
            "world_size": self.rt.world,
            "peak_memory_gib": round(torch.cuda.max_memory_allocated(self.rt.device) / 2**30, 3) if cuda else 0.0,
            "params": sum(p.numel() for p in self.params),
            "recur_passes": self.model.passes,
            "swa_count": self.swa_count,
            "resumed_from_step": self.resumed_from,
        }
        if self.vals:
            metrics["final_val_bpb"] = round(self.vals[-1][1], 6)
        return TrainResult(raw, ema, swa, self.model.passes, metrics, self.losses, self.vals)
