"""Scoring the validation split exactly as the challenge does: NLL in nats, bpb over UTF-8 bytes.

bpb = (sum of target-token NLL / ln 2) / (sum of the target tokens' byte counts). Every target position
1..N-1 of the validation stream must be scored exactly once: a Scorer counts how often each position was
scored (test-time training reads the same ledger to prove it adapts only on scored targets), so a score
that misses or repeats a target is an error, not a result.
"""

import math
from dataclasses import dataclass

import torch

from .data import ValSplit
from .errors import PgolfError
from .model import GPT, autocast
from .runtime import all_sum, rank_world


@dataclass
class Window:
    start: int  # first input position; inputs start..start+L-1, targets start+1..start+L
    score_from: int  # offsets [score_from, score_to) inside the window are the targets it scores
    score_to: int


def windows(n_tokens: int, seq_len: int, stride: int, first: int = 1, last: int | None = None) -> list[Window]:
    """Windows of length L = min(seq_len, n-1) that score targets first..last (default all, 1..n-1) once each,
    every window the last `stride` of its targets, so each has at least L - stride tokens of context (all
    there is near the start). stride 0 (or L): non-overlapping windows."""
    last = n_tokens - 1 if last is None else last
    L = min(seq_len, n_tokens - 1)
    stride = min(stride or L, L)
    out, end = [], first - 1  # targets up to `end` are scored
    while end < last:
        new_end = min(max(end + stride, L), last)  # a window cannot start before token 0: fill the first one
        start = max(new_end - L, 0)
        out.append(Window(start, end - start, new_end - start))
        end = new_end
    return out


@dataclass
class Score:
    nll_sum: float
    bytes: int
    tokens: int

    @property
    def loss(self) -> float:
        return self.nll_sum / max(self.tokens, 1)

    @property
    def bpb(self) -> float:
        return self.nll_sum / math.log(2) / max(self.bytes, 1)


class Scorer:
    """Scores windows of one validation split and keeps the ledger: sums, and per target position how many
    times it was scored (this rank's share; `finish` sums over ranks and checks the coverage). Everything stays
    on the device until `finish`: a host read per batch would drain the GPU's queue every batch."""

    def __init__(self, val: ValSplit, seq_len: int, batch_seqs: int, temperature: float, device: torch.device,
                 doc_mask: bool = False):
        self.val, self.batch_seqs, self.temperature, self.device = val, batch_seqs, temperature, device
        self.doc_mask = doc_mask  # a target's context is its own document's part of the window
        self.L = min(seq_len, val.tokens.numel() - 1)
        self.nll_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.counts = torch.zeros(val.tokens.numel(), dtype=torch.int32, device=device)
        self.tokens = val.tokens.to(device)
        self.bytes = val.target_bytes.to(device)

    @torch.no_grad()
    def score(self, model: GPT, wins: list[Window]) -> None:
        was_training = model.training
        model.eval()
        L = self.L
        spans = torch.tensor([(w.start, w.score_from, w.score_to) for w in wins], dtype=torch.long)
        if self.device.type == "cuda":  # a copy from pageable memory waits for the queue to drain
            spans = spans.pin_memory()
        spans = spans.to(self.device, non_blocking=True)
        offsets = torch.arange(L + 1, device=self.device)
        for i in range(0, len(wins), self.batch_seqs):
            starts, score_from, score_to = spans[i:i + self.batch_seqs].unbind(1)
            idx = self.tokens[starts[:, None] + offsets]
            with autocast(self.device):
                nll = model.token_nll(idx[:, :-1], idx[:, 1:], self.temperature, self.doc_mask).double()
            keep = (offsets[None, :L] >= score_from[:, None]) & (offsets[None, :L] < score_to[:, None])
            # masks as weights, not as indices: x[mask] has a data-dependent size, a host sync every batch
            pos = starts[:, None] + 1 + offsets[None, :L]
            self.counts.index_add_(0, pos.reshape(-1), keep.reshape(-1).int())
            self.nll_sum += torch.where(keep, nll, 0.0).sum()
        model.train(was_training)

    def finish(self, what: str) -> Score:
        """Sum over ranks; a non-finite score or a target scored other than exactly once is an error."""
        counts = self.counts.clone()
        if rank_world()[1] > 1:
            import torch.distributed as dist

            dist.all_reduce(counts)
        parts = [float(self.nll_sum), int((self.bytes * self.counts).sum()), int(self.counts.sum())]
        nll_sum, n_bytes, n_tokens = all_sum(parts, self.device)
        score = Score(nll_sum, int(n_bytes), int(n_tokens))
        check_coverage(counts, score, self.val, what)
        return score


def check_coverage(counts: torch.Tensor, score: Score, val: ValSplit, what: str) -> None:
    missing = int((counts[1:] == 0).sum())
    repeated = int((counts[1:] > 1).sum())
    if missing or repeated or counts[0]:
        raise PgolfError(f"{what}: {missing:,} validation targets unscored and {repeated:,} scored more than once "
                         f"of {val.tokens.numel() - 1:,}; every target must be scored exactly once")
    if score.bytes != val.total_bytes or score.tokens != val.tokens.numel() - 1:
        raise PgolfError(f"{what}: scored {score.tokens:,} targets / {score.bytes:,} bytes, the split has "
                         f"{val.tokens.numel() - 1:,} / {val.total_bytes:,}")
    if not math.isfinite(score.bpb):
        raise PgolfError(f"{what}: val bpb is {score.bpb} (not finite); the model or eval.temperature is broken")


def score(model: GPT, val: ValSplit, seq_len: int, stride: int = 0, batch_seqs: int = 32, temperature: float = 1.0,
          device: torch.device | str = "cpu", progress: bool = False, what: str = "eval", doc_mask: bool = False) -> Score:
    """Score every target of the split once (windows split across ranks under torch.distributed); with `doc_mask`
    each target is scored on its own document's tokens only."""
    device = torch.device(device)
    rank, world = rank_world()
    scorer = Scorer(val, seq_len, batch_seqs, temperature, device, doc_mask)
    wins = windows(val.tokens.numel(), seq_len, stride)[rank::world]
    step = batch_seqs * 64
    it = range(0, len(wins), step)
    if progress and rank == 0:
        from tqdm import tqdm

        it = tqdm(it, desc=what, unit_scale=step, unit="win")
    for i in it:
        scorer.score(model, wins[i:i + step])
    return scorer.finish(what)
