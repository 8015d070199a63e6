"""Score-first per-document LoRA test-time training (`eval.mode: lora_ttt`, the 1.0611 record's eval).

Each document is scored on its own, from its BOS, in chunks of `eval.ttt.chunk_tokens` targets, each with up to
`eval.seq_len` tokens of context from inside the document. After a chunk is scored, the document's own rank-r LoRA
takes `grad_steps` Adam steps on it, and the next chunk is scored by the adapted model. Its sites, as the record's
(`lora_targets`): beside q, k and v; `o`, from the attention's input to its output; `mlp`, from the MLP's input to
its output; and the head. Each pass of a looped layer has LoRAs of its own (the record's slots). `batch_docs`
documents run at once, longest first, each with its own LoRA (batched: A (docs, r, in), B (docs, out, r)); B is
zeroed before a document starts, so its LoRA starts as no change, while A stays warm across documents (the record's
TTT_WARM_START_A). The base model is frozen.

Phased global SGD (`global_lr` > 0), as the record runs it with the LoRAs: the `prefix_docs` longest documents are
scored first; each time the next of `phases` equal parts of them has been scored, the base model takes one SGD step
per `global_chunk_tokens` of all prefix documents scored so far (their tokens back to back, rows of `eval.seq_len`,
document-masked; a cosine LR inside the phase; the last chunk skipped, as the record does), and the documents after
it are scored by the updated model with fresh LoRAs.

A document ends where the next one's BOS begins: the BOS is the last target of the document before it, predicted from
that document's context, so the documents' targets cover 1..N-1 once. Before each step the Scorer's ledger says how
many of the targets about to be trained on were scored; any that were not are counted in
`val_tokens_trained_before_scored`, which the audit refuses.

With `eval.ttt.compile` the forward is compiled once with dynamic shapes (the record compiles its TTT forward with
dynamic=True too): the batch shrinks as documents end and the window grows chunk by chunk without recompiling (a
batch's last document is run beside an empty row: a dim of size 1 would compile a second graph). With
`eval.ttt.compile_mode: regional` each block, and the head with its loss, is compiled on its own instead, and the
blocks share their graphs: a looped layer's LoRAs are one stacked tensor, and the model's pass hook sets the pass
they gather, so nothing a block reads differs by pass in Python (a few graphs whatever the depth: a block's
compile, not the whole unrolled network's).

At temperature 1 a chunk's scoring forward is also its first training forward, as in the record: the NLL is tallied
before the LoRAs step, so nothing is trained on before it is scored, and a chunk costs one forward and one backward
(not two forwards).
"""

import math
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from .config import EvalConfig, TTTConfig
from .data import ValSplit
from .model import GPT, CastedLinear, autocast, define_compiled_ops
from .registry import Registry
from .runtime import all_sum, average_grads, rank_world
from .score import Score, Scorer

Site = tuple[nn.Module, int, int]  # a module with a `lora` hook (x -> a delta of its output), its fan in and out


def _linear(lin: CastedLinear) -> Site:
    return lin, lin.in_features, lin.out_features


# eval.ttt.compile_mode: torch.compile's options for the forward, the shape padding (windows to a multiple of this
# many tokens, capped at eval.seq_len, batches to a multiple of 8 documents; 0: shapes as they come), and whether each
# block is compiled on its own (regional: the blocks share their graphs, the passes of a looped layer too, so the
# compile's work is a block's, not the whole unrolled network's) rather than the whole forward
COMPILE_MODES: Registry[tuple[dict, int, bool]] = Registry("eval.ttt.compile_mode")
COMPILE_MODES.add("default", ({}, 0, False))  # dynamic shapes: one graph for every batch size and window length
COMPILE_MODES.add("regional", ({}, 0, True))
# CUDA graphs (inductor's reduce-overhead): a step replayed, not launched kernel by kernel (its steps are small: the
# launches dominate); one is recorded per shape, so the shapes are padded to a few (the scores are the same)
COMPILE_MODES.add("cuda_graphs", ({"mode": "reduce-overhead"}, 256, False))
PAD_DOCS = 8
# a compiled graph specializes a dim of size 1: a document left alone at the end of its batch (or windows of one
# token) would compile a second graph, minutes for the record's model, so compiled steps run at least 2 rows of 2
MIN_COMPILED = 2

TARGETS: Registry[Callable[[GPT], list[Site]]] = Registry("eval.ttt.lora_targets")  # one site per block
TARGETS.add("q", lambda m: [_linear(b.attn.q) for b in m.blocks])
TARGETS.add("k", lambda m: [_linear(b.attn.k) for b in m.blocks])
TARGETS.add("v", lambda m: [_linear(b.attn.v) for b in m.blocks])
TARGETS.add("o", lambda m: [(b.attn, b.attn.q.in_features, b.attn.proj.out_features) for b in m.blocks])
TARGETS.add("mlp", lambda m: [(b.mlp, b.mlp.fc.in_features, b.mlp.proj.out_features) for b in m.blocks])
TARGETS.add("head", lambda m: [])  # the output head is not a CastedLinear when tied: attached as model.head_lora


class BatchedLoRA(nn.Module):
    """A rank-r delta x A^T B^T (alpha / r) for each of `docs` documents and each of `passes` runs of its module in a
    forward (a looped layer runs several times, each pass with a LoRA of its own: the record's slots). `rows` picks the
    documents of a batch, `index` (a 0-d tensor the model's pass hook sets) the pass: both tensors, so a compiled
    block neither guards on nor specializes to either."""

    def __init__(self, passes: int, docs: int, fan_in: int, fan_out: int, rank: int, alpha: float,
                 device: torch.device, generator: torch.Generator, index: torch.Tensor):
        super().__init__()
        self.A = nn.Parameter(torch.empty(passes, docs, rank, fan_in, device=device))
        self.B = nn.Parameter(torch.zeros(passes, docs, fan_out, rank, device=device))
        self.draw_a(generator)
        self.scale = alpha / rank
        self.rows = torch.arange(docs, device=device)
        self.index = index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pick = self.index * self.A.size(1) + self.rows  # one gather over (pass, document): no scalar read back
        A, B = self.A.flatten(0, 1)[pick], self.B.flatten(0, 1)[pick]
        return (x @ A.transpose(1, 2).to(x.dtype)) @ B.transpose(1, 2).to(x.dtype) * self.scale

    def reset(self) -> None:
        with torch.no_grad():
            self.B.zero_()

    def draw_a(self, generator: torch.Generator) -> None:
        """A from U(±1/sqrt(fan_in)), drawn on the host from `generator`: the same on every device and run."""
        bound = 1 / math.sqrt(self.A.size(3))
        with torch.no_grad():
            self.A.copy_(torch.empty(self.A.shape).uniform_(-bound, bound, generator=generator))


def documents(tokens: torch.Tensor, bos_id: int) -> list[tuple[int, int]]:
    """(start, end) of each document: inputs start..end-1, targets start+1..end (the next BOS is the last)."""
    n = tokens.numel()
    starts = [0] + [int(s) for s in torch.nonzero(tokens == bos_id).flatten() if s > 0]
    return [(s, e) for s, e in zip(starts, starts[1:] + [n - 1]) if e > s]


class LoraTTT:
    """The LoRAs of a batch of documents, attached to a model, and the score-then-adapt step."""

    FUSE = True  # one forward scores a chunk and starts its training (at temperature 1)
    COMPILE_BACKEND = "inductor"  # eval.ttt.compile's (tests: aot_eager, which compiles in seconds on a CPU)

    def __init__(self, model: GPT, val: ValSplit, cfg: EvalConfig, device: torch.device):
        t: TTTConfig = cfg.ttt
        self.model, self.val, self.cfg, self.t, self.device = model, val, cfg, t, device
        self.L = min(cfg.seq_len, val.tokens.numel() - 1)
        self.scorer = Scorer(val, cfg.seq_len, cfg.batch_seqs, cfg.temperature, device)
        order = model.layer_order()
        self.draws = torch.Generator().manual_seed(t.seed)  # the LoRAs' A, not the global RNG: a score repeats
        self.pass_index = torch.zeros((), dtype=torch.long, device=device)  # set by the model's pass hook
        self.sites: list[tuple[nn.Module, BatchedLoRA]] = []
        for name in t.lora_targets:
            for block, (module, fan_in, fan_out) in enumerate(TARGETS[name](model)):
                lora = BatchedLoRA(max(order.count(block), 1), t.batch_docs, fan_in, fan_out, t.lora_rank,
                                   t.lora_alpha, device, self.draws, self.pass_index)
                self.sites.append((module, lora))
        self.loras = [lora for _, lora in self.sites]
        self.head = None
        if "head" in t.lora_targets:
            vocab, dim = model.head_weight().shape
            self.head = BatchedLoRA(1, t.batch_docs, dim, vocab, t.lora_rank, t.lora_alpha, device, self.draws,
                                    torch.zeros((), dtype=torch.long, device=device))
            self.loras.append(self.head)
        self.params = [p for lora in self.loras for p in lora.parameters()]
        self.trained_early, self.adapted, self.steps, self.global_steps = 0, 0, 0, 0
        self.fused = self.FUSE and cfg.temperature == 1.0
        # one graph for every batch size and window length (dynamic), one per temperature and train/eval mode
        options, self.pad_window, regional = COMPILE_MODES[t.compile_mode]
        if t.compile:
            define_compiled_ops()
        compiled = lambda f: torch.compile(f, dynamic=True, backend=self.COMPILE_BACKEND, **options)  # noqa: E731
        self.nll = compiled(model.token_nll) if t.compile and not regional else model.token_nll
        # regional: each block, and the head with its loss; the model's loop, embeddings and pass hook stay eager
        self.compiled_parts = ([(b, {"forward": compiled(b.forward), "forward_lanes": compiled(b.forward_lanes)})
                                for b in model.blocks] + [(model, {"nll_from_hidden": compiled(model.nll_from_hidden)})]
                               if t.compile and regional else [])

    def attach(self, on: bool = True) -> None:
        """The LoRAs beside their modules (on), or none (off: the base model alone, as global SGD trains it)."""
        for module, lora in self.sites:  # its bound forward: a LoRA module assigned would join the model's state dict
            module.lora = lora.forward if on else None
        self.model.head_lora = self.head.forward if on and self.head is not None else None
        self.model.pass_hook = self._set_pass if on else None
        for module, methods in self.compiled_parts:  # the base model alone (global SGD) runs eager, as in default
            for name, f in methods.items():
                if on:
                    setattr(module, name, f)
                else:
                    vars(module).pop(name, None)

    def _set_pass(self, k: int) -> None:
        self.pass_index.fill_(k)

    def run(self, docs: list[tuple[int, int]]) -> None:
        """Every document scored, chunk by chunk, `batch_docs` at a time on each rank, longest first (rank r takes
        every world-th document); the global SGD phases between batches, at the same batch on every rank."""
        rank, world = rank_world()
        docs = sorted(docs, key=lambda d: (d[0] - d[1], d[0]))
        mine, per_batch = docs[rank::world], self.t.batch_docs * world
        prefix = min(self.t.prefix_docs, len(docs)) if self.t.global_lr > 0 else 0
        bounds = [prefix * (k + 1) // self.t.phases for k in range(self.t.phases)] if prefix else []
        for i in range(-(-len(docs) // per_batch)):
            self.batch(mine[i * self.t.batch_docs:(i + 1) * self.t.batch_docs])
            scored = min((i + 1) * per_batch, len(docs))  # on every rank, once all have done batch i
            while bounds and scored >= bounds[0]:
                end = bounds.pop(0)
                if end:  # fewer prefix documents than phases leave the first phases none
                    self.global_phase(docs[:end])

    def batch(self, batch: list[tuple[int, int]]) -> None:
        """A batch of documents, each from a zeroed B (no change), chunk by chunk."""
        if not batch:
            return
        for lora in self.loras:
            lora.reset()
        opt = torch.optim.AdamW(self.params, lr=self.t.lr, betas=tuple(self.t.betas), weight_decay=self.t.weight_decay)
        C = self.t.chunk_tokens
        for j in range(max(-(-(e - s) // C) for s, e in batch)):  # (slot, first/last target, document start/end)
            active = [(slot, s + 1 + j * C, min(s + (j + 1) * C, e), s, e) for slot, (s, e) in enumerate(batch)
                      if s + 1 + j * C <= e]
            self.step(self._padded(active), opt)

    def _padded(self, active: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
        """`active` and the rows that score and learn nothing (document 0, empty) that the compiled shapes want."""
        rows = len(active)
        if self.pad_window:
            rows = min(-(-rows // PAD_DOCS) * PAD_DOCS, self.t.batch_docs)
        if self.t.compile:
            rows = max(rows, MIN_COMPILED)
        return active + [(0, 1, 0, 0, 0)] * (rows - len(active))

    def _batch(self, active: list[tuple[int, ...]]) -> tuple[torch.Tensor, ...]:
        """Right-padded windows (causal attention keeps the padding out of every real position's context): inputs,
        targets, the weight of each scored target, and the positions of those targets in the split."""
        T = max(b - max(start, b - self.L) for _, _, b, start, _ in active)
        if self.pad_window:
            T = min(-(-T // self.pad_window) * self.pad_window, self.L)
        if self.t.compile:
            T = min(max(T, MIN_COMPILED), self.L)
        x = torch.zeros(len(active), T, dtype=torch.long)
        y, keep, pos = torch.zeros_like(x), torch.zeros(len(active), T), torch.zeros_like(x)
        for r, (_, a, b, start, _) in enumerate(active):
            ws = max(start, b - self.L)
            x[r, :b - ws] = self.val.tokens[ws:b]
            y[r, :b - ws] = self.val.tokens[ws + 1:b + 1]
            keep[r, a - ws - 1:b - ws] = 1
            pos[r, :b - ws] = torch.arange(ws + 1, b + 1)
        return tuple(t.to(self.device) for t in (x, y, keep, pos))

    def step(self, active: list[tuple[int, ...]], opt: torch.optim.Optimizer) -> None:
        """Score the active documents' chunks, then train each one's LoRA on its chunk (not on a document's last
        chunk: nothing of it is left to score). Fused (temperature 1, as the record): the scoring forward is the first
        training forward, its NLL tallied before any LoRA steps; one forward a chunk saved, and every forward runs in
        one mode (a compiled forward: one graph)."""
        learn = [a[2] < a[4] for a in active]
        if not self.fused:
            self.score(active)
            self.adapt([a for a, on in zip(active, learn) if on], opt)
            return
        x, y, keep, pos = self._batch(active)
        self.model.train()
        nll = self._forward(active, x, y, 1.0)  # with grad even where nothing trains: one compiled graph, not two
        self._tally(nll.detach(), keep, pos)
        if any(learn):
            self._train(active, x, y, keep * torch.tensor(learn, device=keep.device)[:, None], pos, opt, nll)
        else:
            self.model.eval()  # as _train leaves it

    def _forward(self, active, x, y, temperature: float) -> torch.Tensor:
        rows = torch.tensor([slot for slot, *_ in active], device=self.device)
        if self.compiled_parts:  # a block's graph takes rows as an input: its length varies, as the batch's does
            torch._dynamo.maybe_mark_dynamic(rows, 0)
        for lora in self.loras:
            lora.rows = rows
        with autocast(self.device):
            return self.nll(x, y, temperature).float()

    def _tally(self, nll: torch.Tensor, keep: torch.Tensor, pos: torch.Tensor) -> None:
        self.scorer.counts.index_add_(0, pos.reshape(-1), keep.reshape(-1).int())
        self.scorer.nll_sum += (nll.double() * keep).sum()

    def score(self, active) -> None:
        x, y, keep, pos = self._batch(active)
        self.model.eval()
        with torch.no_grad():
            nll = self._forward(active, x, y, self.cfg.temperature)
        self._tally(nll, keep, pos)

    def adapt(self, active, opt: torch.optim.Optimizer) -> None:
        if active:
            active = self._padded(active)
            x, y, keep, pos = self._batch(active)
            self.model.train()
            self._train(active, x, y, keep, pos, opt)

    def _train(self, active, x, y, keep, pos, opt: torch.optim.Optimizer, nll: torch.Tensor | None = None) -> None:
        """`grad_steps` Adam steps on the kept targets, each document's mean for its own LoRA; `nll`: the first
        step's forward, already run."""
        self.trained_early += int(((self.scorer.counts[pos] == 0) & (keep > 0)).sum())
        for i in range(self.t.grad_steps):
            if nll is None or i > 0:
                nll = self._forward(active, x, y, 1.0)
            loss = ((nll * keep).sum(1) / keep.sum(1).clamp(min=1)).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        self.adapted += int(keep.sum())
        self.steps += 1
        self.model.eval()

    def global_phase(self, docs: list[tuple[int, int]]) -> None:
        """SGD on the base model over `docs` (all scored), one step per global_chunk_tokens, cosine over the chunks;
        each rank takes its share of a chunk's rows and the gradients are averaged. Fresh LoRAs follow (A too)."""
        rank, world = rank_world()
        counts = self.scorer.counts.clone()
        if world > 1:
            dist.all_reduce(counts)  # scored anywhere: each rank scored its own documents
        docs = sorted(docs)
        xs = torch.cat([self.val.tokens[s:e] for s, e in docs])  # each document's inputs and targets, back to back
        ys = torch.cat([self.val.tokens[s + 1:e + 1] for s, e in docs])
        positions = torch.cat([torch.arange(s + 1, e + 1) for s, e in docs]).to(self.device)
        L, C = self.L, self.t.global_chunk_tokens
        chunks = -(-xs.numel() // C)
        params = list(self.model.parameters())
        for p in params:
            p.requires_grad_(True)
        self.attach(False)
        opt = torch.optim.SGD(params, lr=self.t.global_lr, momentum=self.t.momentum)
        self.model.train()
        for c in range(chunks - 1):  # the last chunk is skipped, as the record's loop does
            rows = (min((c + 1) * C, xs.numel()) - c * C) // L
            a, b = c * C + rows * rank // world * L, c * C + rows * (rank + 1) // world * L
            for g in opt.param_groups:
                g["lr"] = self.t.global_lr * 0.5 * (1 + math.cos(math.pi * c / max(chunks - 1, 1)))
            opt.zero_grad(set_to_none=True)
            if b > a:
                x, y = xs[a:b].view(-1, L).to(self.device), ys[a:b].view(-1, L).to(self.device)
                self.trained_early += int((counts[positions[a:b]] == 0).sum())
                with autocast(self.device):
                    loss = self.model.token_nll(x, y, doc_mask=True).float().mean()
                loss.backward()
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            average_grads(params)
            if self.t.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, self.t.grad_clip)
            opt.step()
            self.global_steps += 1
        for p in params:
            p.requires_grad_(False)
        self.model.eval()
        self.attach()
        for lora in self.loras:
            lora.draw_a(self.draws)

    def record(self) -> dict:
        return {"ttt": "lora" + ("+global_sgd" if self.global_steps else ""),
                "ttt_global_steps": self.global_steps, "ttt_units": int(all_sum([self.steps], self.device)[0]),
                "ttt_tokens_adapted": int(all_sum([self.adapted], self.device)[0]),
                "val_tokens_trained_before_scored": int(all_sum([self.trained_early], self.device)[0])}


def lora_ttt(model: GPT, val: ValSplit, cfg: EvalConfig, device: torch.device) -> tuple[Score, dict]:
    """Every document scored from its BOS with a LoRA of its own trained on what it has scored so far."""
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    ttt = LoraTTT(model, val, cfg, device)
    ttt.attach()
    try:
        ttt.run(documents(val.tokens, model.cfg.bos_id))
    finally:
        ttt.attach(False)
        for p in frozen:
            p.requires_grad_(True)
    return ttt.scorer.finish("eval"), ttt.record()
