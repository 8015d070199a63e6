"""Legal test-time training: the model adapts on validation targets only after they have been scored.

`ttt` (records 2026-03-23 onward): the targets are cut into chunks; each chunk is scored under no_grad,
then the model takes `epochs` passes of SGD or AdamW over it (cosine LR across chunks, gradient clipping,
optionally only the last k blocks), and moves on. `phased_ttt` (records 2026-04-13/14): the first
`prefix_docs` documents are scored in `phases` equal parts; after each part the model trains on every
prefix target scored so far; then the rest of the split is scored by the adapted model.

Before each adaptation the Scorer's ledger says how many of the targets about to be trained on have been
scored; any that have not are counted in `val_tokens_trained_before_scored`, which the audit refuses.
"""

import math

import torch
import torch.distributed as dist

from .config import EvalConfig, TTTConfig
from .data import ValSplit
from .errors import PgolfError
from .model import GPT, autocast
from .registry import Registry
from .runtime import all_sum, rank_world
from .score import Score, Scorer, windows

OPTIMIZERS: Registry = Registry("eval.ttt.optimizer")  # (params, ttt cfg) -> torch optimizer
OPTIMIZERS.add("sgd", lambda params, t: torch.optim.SGD(params, lr=t.lr, momentum=t.momentum))
OPTIMIZERS.add("adamw", lambda params, t: torch.optim.AdamW(params, lr=t.lr, betas=(t.momentum, 0.999),
                                                             weight_decay=0.0))

PARAM_SETS: Registry = Registry("eval.ttt.params")  # (model, ttt cfg) -> the parameters adapted
PARAM_SETS.add("all", lambda model, t: list(model.parameters()))
PARAM_SETS.add("norms", lambda model, t: [p for p in model.parameters() if p.ndim < 2])
PARAM_SETS.add("mlp", lambda model, t: [p for n, p in model.named_parameters() if ".mlp." in n])
PARAM_SETS.add("last_blocks", lambda model, t: [p for b in model.blocks[-t.last_blocks:] for p in b.parameters()])


def cosine(lr: float, i: int, n: int, on: bool) -> float:
    return lr * 0.5 * (1 + math.cos(math.pi * i / max(n, 1))) if on else lr


class Adapter:
    """Trains a model on already-scored target spans and counts any target trained on before it was scored."""

    def __init__(self, model: GPT, val: ValSplit, seq_len: int, ttt: TTTConfig, device: torch.device):
        self.model, self.val, self.ttt, self.device = model, val, ttt, device
        self.L = min(seq_len, val.tokens.numel() - 1)
        self.params = PARAM_SETS[ttt.params](model, ttt)
        if not self.params:
            raise PgolfError(f"eval.ttt.params: {ttt.params!r} selects no parameters of this model")
        self.opt = OPTIMIZERS[ttt.optimizer](self.params, ttt)
        self.trained_early = 0
        self.adapted = 0

    def adapt(self, scorer: Scorer, first: int, last: int, lr: float) -> None:
        """`epochs` passes over targets first..last, a batch of sequences per step, gradients summed over ranks."""
        rank, world = rank_world()
        scored_here = int((scorer.counts[first:last + 1] > 0).sum())
        scored = int(all_sum([scored_here], self.device)[0])  # ranks scored disjoint windows
        self.trained_early += (last - first + 1) - scored
        starts = list(range(first - 1, last, self.L))  # sequences: inputs s..e-1, targets s+1..e
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.model.train()
        for _ in range(self.ttt.epochs):
            for i in range(0, len(starts), self.ttt.batch_seqs * world):
                batch = starts[i:i + self.ttt.batch_seqs * world]
                mine = batch[rank::world]
                self.opt.zero_grad(set_to_none=True)
                total = torch.zeros((), device=self.device)
                for s in mine:
                    e = min(s + self.L, last)
                    x = self.val.tokens[s:e][None].to(self.device)
                    y = self.val.tokens[s + 1:e + 1][None].to(self.device)
                    with autocast(self.device):
                        total = total + self.model.token_nll(x, y).sum()
                    self.adapted += e - s
                n = sum(min(s + self.L, last) - s for s in batch)
                (total / n).backward()
                for p in self.params:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    if world > 1:
                        dist.all_reduce(p.grad)
                if self.ttt.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(self.params, self.ttt.grad_clip)
                self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.model.eval()

    def record(self, mode: str, units: int) -> dict:
        return {"ttt": mode, "ttt_units": units, "ttt_tokens_adapted": int(all_sum([self.adapted], self.device)[0]),
                "val_tokens_trained_before_scored": self.trained_early}


def _score_span(scorer: Scorer, model: GPT, cfg: EvalConfig, first: int, last: int) -> None:
    rank, world = rank_world()
    scorer.score(model, windows(scorer.val.tokens.numel(), cfg.seq_len, cfg.stride, first, last)[rank::world])


def chunked_ttt(model: GPT, val: ValSplit, cfg: EvalConfig, device: torch.device) -> tuple[Score, dict]:
    n = val.tokens.numel()
    scorer = Scorer(val, cfg.seq_len, cfg.batch_seqs, cfg.temperature, device, cfg.doc_mask)
    adapter = Adapter(model, val, cfg.seq_len, cfg.ttt, device)
    bounds = list(range(1, n, cfg.ttt.chunk_tokens)) + [n]
    chunks = [(a, b - 1) for a, b in zip(bounds, bounds[1:])]
    for i, (first, last) in enumerate(chunks):
        _score_span(scorer, model, cfg, first, last)
        if i < len(chunks) - 1:  # adapting on the last chunk would score nothing more
            adapter.adapt(scorer, first, last, cosine(cfg.ttt.lr, i, len(chunks) - 1, cfg.ttt.cosine))
    return scorer.finish("eval"), adapter.record("score_first_chunks", len(chunks))


def phased_ttt(model: GPT, val: ValSplit, cfg: EvalConfig, device: torch.device) -> tuple[Score, dict]:
    n, t = val.tokens.numel(), cfg.ttt
    bos = torch.nonzero(val.tokens == model.cfg.bos_id).flatten().tolist()
    starts = [s for s in bos if s > 0] + [n]  # a document ends where the next one's BOS begins
    prefix = min(t.prefix_docs, len(starts) - 1)  # leave at least the last document to score after
    ends = [starts[max(round(prefix * (k + 1) / t.phases), 1) - 1] for k in range(t.phases)] if prefix else []
    scorer = Scorer(val, cfg.seq_len, cfg.batch_seqs, cfg.temperature, device, cfg.doc_mask)
    adapter = Adapter(model, val, cfg.seq_len, t, device)
    scored_to = 0  # targets 1..scored_to are scored
    for k, end in enumerate(ends):
        if end - 1 > scored_to:
            _score_span(scorer, model, cfg, scored_to + 1, end - 1)
            scored_to = end - 1
        adapter.adapt(scorer, 1, scored_to, cosine(t.lr, k, len(ends), t.cosine))
    if scored_to < n - 1:
        _score_span(scorer, model, cfg, scored_to + 1, n - 1)
    return scorer.finish("eval"), adapter.record("phased", len(ends))
