"""Scoring the validation split exactly as the challenge does: NLL in nats, bpb over UTF-8 bytes.

bpb = (sum of target-token NLL / ln 2) / (sum of the target tokens' byte counts).
Every target position 1..N-1 of the validation stream is scored exactly once.
"""

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .config import TTTConfig
from .data import ByteTable
from .model import GPT, autocast


@dataclass
class Window:
    start: int  # first input position; inputs start..start+L-1, targets start+1..start+L
    score_from: int  # offset inside the window of the first target this window scores


def windows(n_tokens: int, seq_len: int, stride: int) -> list[Window]:
    """Windows of length min(seq_len, n-1); each target once, with at least seq_len - stride context
    (all of it for the first window). stride == seq_len gives plain non-overlapping windows."""
    L = min(seq_len, n_tokens - 1)
    stride = min(stride or L, L)
    last = n_tokens - 1 - L
    out, scored_to = [], 0  # targets 1..scored_to are done
    for start in list(range(0, last + 1, stride)) + [last]:
        end = start + L
        if end > scored_to:
            out.append(Window(start, scored_to - start))
            scored_to = end
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


def _ranks() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _reduce(values: list[float], device: torch.device) -> list[float]:
    _, world = _ranks()
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


@torch.no_grad()
def _score_windows(model: GPT, tokens: torch.Tensor, table: ByteTable, wins: list[Window], seq_len: int,
                   batch_seqs: int, temperature: float, device: torch.device) -> list[float]:
    L = min(seq_len, tokens.numel() - 1)
    nll_sum, n_bytes, n_tokens = 0.0, 0, 0
    for i in range(0, len(wins), batch_seqs):
        batch = wins[i:i + batch_seqs]
        idx = torch.stack([tokens[w.start:w.start + L + 1] for w in batch]).to(device)
        x, y = idx[:, :-1], idx[:, 1:]
        with autocast(device):
            nll = model.token_nll(x, y, temperature).double()
        keep = torch.arange(L, device=device)[None, :] >= torch.tensor([w.score_from for w in batch], device=device)[:, None]
        nll_sum += float((nll * keep).sum())
        n_bytes += int((table.count(x, y) * keep).sum())
        n_tokens += int(keep.sum())
    return [nll_sum, n_bytes, n_tokens]


def score(model: GPT, tokens: torch.Tensor, table: ByteTable, seq_len: int, stride: int = 0, batch_seqs: int = 32,
          temperature: float = 1.0, device: torch.device | str = "cpu", progress: bool = False) -> Score:
    """Score every target of `tokens` (split across ranks under torch.distributed)."""
    device = torch.device(device)
    rank, world = _ranks()
    wins = windows(tokens.numel(), seq_len, stride)[rank::world]
    was_training = model.training
    model.eval()
    parts = [0.0, 0, 0]
    step = batch_seqs * 64
    it = range(0, len(wins), step)
    if progress and rank == 0:
        from tqdm import tqdm

        it = tqdm(it, desc="eval", unit_scale=step, unit="win")
    for i in it:
        got = _score_windows(model, tokens, table, wins[i:i + step], seq_len, batch_seqs, temperature, device)
        parts = [a + b for a, b in zip(parts, got)]
    model.train(was_training)
    nll_sum, n_bytes, n_tokens = _reduce(parts, device)
    return Score(nll_sum, int(n_bytes), int(n_tokens))


def ttt_parameters(model: GPT, which: str) -> list[torch.nn.Parameter]:
    if which == "all":
        return list(model.parameters())
    if which == "norms":
        return [p for p in model.parameters() if p.ndim < 2]
    if which == "mlp":
        return [p for n, p in model.named_parameters() if ".mlp." in n]
    raise ValueError(f"eval.ttt.params: {which!r}; expected all, norms or mlp")


def score_ttt(model: GPT, tokens: torch.Tensor, table: ByteTable, seq_len: int, stride: int, batch_seqs: int,
              ttt: TTTConfig, temperature: float = 1.0, device: torch.device | str = "cpu") -> tuple[Score, dict]:
    """Legal test-time training: each chunk of targets is scored under no_grad before the model adapts on it.

    Returns the score and an audit record, including how many target tokens were trained on before
    being scored (0 by construction, counted rather than assumed).
    """
    device = torch.device(device)
    rank, world = _ranks()
    params = ttt_parameters(model, ttt.params)
    opt = (torch.optim.SGD(params, lr=ttt.lr, momentum=0.9) if ttt.optimizer == "sgd"
           else torch.optim.AdamW(params, lr=ttt.lr, weight_decay=0.0))
    all_wins = windows(tokens.numel(), seq_len, stride)
    L = min(seq_len, tokens.numel() - 1)
    parts = [0.0, 0, 0]
    scored_to, trained_early, chunks, adapted = 0, 0, 0, 0
    i = 0
    while i < len(all_wins):
        chunk_end = min(all_wins[i].start + L + ttt.chunk_tokens, tokens.numel() - 1)
        j = i
        while j < len(all_wins) and all_wins[j].start + L <= chunk_end:
            j += 1
        j = max(j, i + 1)
        chunk = all_wins[i:j]
        model.eval()
        got = _score_windows(model, tokens, table, chunk[rank::world], seq_len, batch_seqs, temperature, device)
        parts = [a + b for a, b in zip(parts, got)]
        chunk_start = chunk[0].start + chunk[0].score_from
        scored_to = chunk[-1].start + L
        # adapt on the chunk just scored: targets chunk_start+1 .. scored_to
        model.train()
        seqs = [s for s in range(chunk_start, scored_to, L) if s + 1 <= scored_to]
        for _ in range(ttt.epochs):
            mine = seqs[rank::world]
            opt.zero_grad(set_to_none=True)
            total = 0
            for s in mine:
                e = min(s + L, scored_to)
                trained_early += max(0, e - scored_to)
                x, y = tokens[s:e][None].to(device), tokens[s + 1:e + 1][None].to(device)
                with autocast(device):
                    loss = model.token_nll(x, y).sum()
                (loss / max(scored_to - chunk_start, 1)).backward()
                total += e - s
            if world > 1:
                for p in params:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    dist.all_reduce(p.grad)
            opt.step()
            adapted += total
        chunks += 1
        i = j
    model.eval()
    nll_sum, n_bytes, n_tokens = _reduce(parts, device)
    record = {"ttt": "score_first", "ttt_chunks": chunks, "ttt_tokens_adapted": int(_reduce([adapted], device)[0]),
              "val_tokens_trained_before_scored": int(_reduce([trained_early], device)[0])}
    return Score(nll_sum, int(n_bytes), int(n_tokens)), record
