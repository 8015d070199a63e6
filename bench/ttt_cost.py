"""What per-document LoRA TTT costs on FineWeb's val split against this split: the tokens its steps run.

A LoRA step runs the active documents' windows, padded to the longest: chunk j of a batch (documents sorted by
length, `batch` at a time) runs rows = the documents still going, each a window of min((j + 1) * chunk, context,
longest document) tokens. The sum over steps of rows x window is the work a TTT pass does; scaling a measured time by
FineWeb's sum over this split's projects it better than scaling by targets, because the work per target grows with a
document's length (up to the context) and the docs corpus's documents are longer than FineWeb's.

FineWeb's document lengths are not here; the 1.0611 record's log (train_seed42.log) prints, for some of its 782
batches of 64 documents sorted by length, the shortest and longest length in the batch (`ttp: b<i>/782 ... dl:a-b`).
The lengths in between are interpolated (log-linear in the batch index). The log's last gap (between its two
longest batches, b754 at ~3,400 tokens and b782 at 30,339-97,114) is too wide for that: its documents follow a curve
between the two, bent so that all lengths add up to the split's tokens. All of them are longer than a LoRA window
(2048), where the work per target no longer depends on the length, so only their total matters.
"""

import re

import numpy as np

FINEWEB_VAL_TOKENS = 47_851_520 + 1  # the record's val_tokens are its targets; the stream holds one more
FINEWEB_DOCS = 50_000
BATCH_LINE = re.compile(r"ttp: b(\d+)/(\d+) .*?dl:(\d+)-(\d+)")


def fineweb_doc_lengths(log_text: str, batch: int = 64) -> np.ndarray:
    """FineWeb's val document lengths, ascending, from the record's log (see the module's docstring)."""
    seen = {}
    for m in BATCH_LINE.finditer(log_text):
        b, _, lo, hi = (int(g) for g in m.groups())
        seen[b] = (lo, hi)
    if len(seen) < 2:
        raise ValueError("the log has fewer than two `ttp: b<i>/<n> ... dl:a-b` lines")
    idx = np.array(sorted(seen), dtype=float)
    lo = np.log([seen[int(b)][0] for b in idx])
    hi = np.log([seen[int(b)][1] for b in idx])
    # document k (0-based, ascending) sits in batch k // batch + 1, at fraction (k % batch) / (its size - 1) of the
    # batch's range (the last batch, the longest documents, holds the remainder)
    k = np.arange(FINEWEB_DOCS)
    b = k // batch + 1.0
    size = np.minimum(batch, FINEWEB_DOCS - (k // batch) * batch)
    frac = (k % batch) / np.maximum(size - 1, 1)
    first, last = np.interp(b, idx, lo), np.interp(b, idx, hi)
    lengths = np.exp(first + frac * (last - first))
    gap = (b > idx[-2]) & (b < idx[-1])
    lengths[~gap] = np.maximum.accumulate(lengths[~gap])  # flat before the first logged batch
    if gap.any():  # log length a + (z - a) u^p from the batch below to the one above, p such that the total is right
        a, z = hi[-2], lo[-1]
        u = (np.arange(gap.sum()) + 1) / (gap.sum() + 1)
        want = FINEWEB_VAL_TOKENS - lengths[~gap].sum()
        p_lo, p_hi = 1e-3, 1e3
        for _ in range(100):  # the total falls as p rises
            p = (p_lo * p_hi) ** 0.5
            p_lo, p_hi = (p, p_hi) if np.exp(a + (z - a) * u ** p).sum() > want else (p_lo, p)
        lengths[gap] = np.exp(a + (z - a) * u ** p_hi)
    return np.maximum(np.round(lengths), 2).astype(np.int64)


def lora_work(lengths: np.ndarray, chunk: int, context: int, batch: int) -> int:
    """Tokens run by every LoRA step over documents of these lengths (each a BOS and its tokens; a document of n
    tokens has n - 1 targets of its own plus the next BOS, so n targets), `batch` at a time, longest first."""
    n = np.sort(np.asarray(lengths))[::-1]
    total = 0
    for i in range(0, n.size, batch):
        docs = n[i:i + batch]
        steps = -(-docs // chunk)  # a document's chunks
        j = np.arange(int(steps.max()))
        rows = (steps[None, :] > j[:, None]).sum(1)
        window = np.minimum(np.minimum((j + 1) * chunk, context), docs.max())
        total += int((rows * window).sum())
    return total
