"""Causal self-attention over (B, T, H, D) tensors with GQA, optionally restricted to documents.

A document mask lets a token attend only to earlier tokens of its own document (a document starts at each BOS,
and at the start of a row), as the records train since 2026-04-10 (FlashAttention-3 varlen with cu_seqlens at
every BOS). Backends, picked by what the host has:
- `fa3`: FlashAttention-3 (`flash_attn_interface`), rows flattened into one packed sequence cut at cu_seqlens;
- `flex`: FlexAttention with a block mask (CUDA without FA3): blocks no query can see are skipped; its kernels in the
  tiles FLEX_KERNEL_OPTIONS names where inductor's defaults were measured slower;
- `varlen`: the packed sequence through PyTorch's own varlen attention (`torch.nn.attention.varlen`,
  FlashAttention-2's kernels), a custom op torch.compile does not trace into. Its kernel alone was 11 % faster than
  flex's in inductor's tiles; flex's in the tuned ones are 1.04x (12 rows of 2048) to 1.20x (48 rows) faster than it
  (bench/doc_attention.py, one H200). Not picked by default;
- `dense`: SDPA with a boolean (B, 1, T, T) mask (CPU).
Without a mask: FA3 if it imports, else SDPA, cuDNN first.
"""

import contextlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

try:  # FlashAttention-3 (Hopper); optional
    from flash_attn_interface import flash_attn_func as _fa3, flash_attn_varlen_func as _fa3_varlen
except ImportError:
    _fa3 = _fa3_varlen = None

# cuDNN first: 341 vs 215 TFLOP/s for the flash backend (causal, seq 1024, head dim 64, one H100)
CUDA_SDPA_ORDER = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
CU_SEQLENS_BUCKET = 64  # cu_seqlens padded to a multiple of this (with the total length): fewer shapes to compile


@dataclass
class DocMask:
    kind: str  # fa3 | varlen | flex | dense
    mask: object  # fa3, varlen: cu_seqlens (int32); flex: a BlockMask; dense: a (B, 1, T, T) bool tensor
    max_len: int | None = None  # the longest stretch attended within, where less than the row (fa3, varlen)


_preferred: str | None = None  # set by prefer()

# FlexAttention's kernel configs where inductor's defaults were measured slower (bench/doc_attention.py --flex-grid),
# by (CUDA capability major, head dim, dtype); options prefixed fwd_ / bwd_ reach only that pass's kernel.
# Hopper, head dim 64, bf16 (one H200, the record's 8 heads / 4 KV heads on the CaseOps mirror's documents): the
# forward in 128 x 64 tiles instead of 128 x 128: 1.43x (1.253 -> 0.876 ms, 48 rows of 2048), 1.37x (12 rows); the
# backward in 64 x 64 tiles with 4 warps instead of 64 x 128 / 128 x 64 with 8; forward + backward 1.19x (3.393 ->
# 2.846 ms, 48 rows), 1.11x (12 rows); the record preset's training step 1.135x (bench/NOTES.md, session 42)
FLEX_KERNEL_OPTIONS: dict[tuple[int, int, torch.dtype], dict] = {
    (9, 64, torch.bfloat16): {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 64, "fwd_num_warps": 4, "fwd_num_stages": 3,
                              "bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64, "bwd_BLOCK_N2": 64,
                              "bwd_num_warps": 4, "bwd_num_stages": 4},
}
_flex_options: dict | None = None  # set by tune_flex()


def tune_flex(options: dict | None) -> None:
    """FlexAttention's kernel options from now on (a bench's candidate; {}: inductor's own); None: FLEX_KERNEL_OPTIONS."""
    global _flex_options, _compiled_flex
    _flex_options, _compiled_flex = options, None


def flex_options(q: torch.Tensor) -> dict | None:
    """The kernel options FlexAttention gets for q: tune_flex's, else FLEX_KERNEL_OPTIONS' for q's GPU, head dim and
    dtype, else None (inductor's own)."""
    if _flex_options is not None:
        return _flex_options or None
    if not q.is_cuda:
        return None
    return FLEX_KERNEL_OPTIONS.get((torch.cuda.get_device_capability(q.device)[0], q.size(-1), q.dtype))


def prefer(backend: str | None) -> None:
    """Document masks on CUDA through `backend` (fa3, varlen or flex) from now on; None: the default (A/B benches)."""
    global _preferred
    _preferred = backend


def default_backend(device: torch.device) -> str:
    if device.type != "cuda":
        return "dense"
    if _preferred is not None:
        return _preferred
    return "fa3" if _fa3_varlen is not None else "flex"


def segment_starts(idx: torch.Tensor, bos_id: int, max_len: int | None = None) -> torch.Tensor:
    """(B, T) bool: where a stretch attended within starts. At every BOS and each row's start, and with `max_len`
    also every max_len tokens from a document's start (the records' cu_seqlens for a packed row)."""
    starts = idx == bos_id
    starts[:, 0] = True
    if max_len:
        pos = torch.arange(idx.size(1), device=idx.device).expand_as(idx)
        doc_start = torch.cummax(torch.where(starts, pos, 0), dim=1).values
        starts |= (pos - doc_start) % max_len == 0
    return starts


def document_ids(idx: torch.Tensor, bos_id: int, max_len: int | None = None) -> torch.Tensor:
    """(B, T) ids of the stretch each token attends within, in its row: a new one at each `segment_starts`."""
    return torch.cumsum(segment_starts(idx, bos_id, max_len).int(), dim=1)


def _cu_seqlens(idx: torch.Tensor, bos_id: int, max_len: int | None = None) -> torch.Tensor:
    """Every stretch's start in the flattened rows, padded. On the GPU, nonzero's data-dependent size makes the host
    wait for the queue to drain, once per forward; on the host it costs the GPU nothing."""
    B, T = idx.shape
    bounds = segment_starts(idx, bos_id, max_len).reshape(-1).nonzero().squeeze(1).to(torch.int32)
    padded = -(-(bounds.numel() + 1) // CU_SEQLENS_BUCKET) * CU_SEQLENS_BUCKET
    cu = torch.full((padded,), B * T, dtype=torch.int32, device=idx.device)
    cu[:bounds.numel()] = bounds
    return cu


def document_mask(idx: torch.Tensor, bos_id: int, backend: str | None = None,
                  host_idx: torch.Tensor | None = None, max_len: int | None = None) -> DocMask:
    """The mask of a (B, T) batch of token ids for `backend` (default: the best the host has). `host_idx`: the same
    ids still on the host (the loader's copy), where the packed backends find the document starts without a sync.
    `max_len`: a document is also cut every max_len tokens from its start (a packed row, as the records train)."""
    backend = backend or default_backend(idx.device)
    if backend in ("fa3", "varlen"):
        if backend == "varlen" and idx.is_cuda:
            load_torch_varlen()
        cu = _cu_seqlens(idx if host_idx is None else host_idx, bos_id, max_len)
        if cu.device != idx.device:
            cu = (cu.pin_memory() if idx.is_cuda else cu).to(idx.device, non_blocking=True)
        return DocMask(backend, cu, max_len)
    docs = document_ids(idx, bos_id, max_len)
    return DocMask("flex", block_mask(docs)) if backend == "flex" else _dense_mask(docs)


def _dense_mask(docs: torch.Tensor) -> DocMask:
    """(B, 1, T, T): causal inside each document of (B, T) document ids."""
    T = docs.size(1)
    causal = torch.ones(T, T, dtype=torch.bool, device=docs.device).tril()
    return DocMask("dense", (causal & (docs[:, :, None] == docs[:, None, :]))[:, None])


def block_mask(docs: torch.Tensor, block: int = 128):
    """FlexAttention's BlockMask for causal attention inside documents, from (B, T) nondecreasing document ids.
    Built per pair of blocks from the first and last document of each block: no (T, T) mask is evaluated (the
    cost create_block_mask pays on every call, for a packed row of 100k tokens billions of evaluations)."""
    from torch.nn.attention.flex_attention import BlockMask

    B, T = docs.shape
    nb = -(-T // block)
    first = docs[:, ::block]
    last = docs[:, (torch.arange(nb, device=docs.device) * block + block - 1).clamp(max=T - 1)]
    i, j = torch.arange(nb, device=docs.device)[:, None], torch.arange(nb, device=docs.device)[None, :]
    # block (i, j) holds a visible pair if kv block j reaches the document query block i starts in
    visible = (j <= i) & (last[:, None, :] >= first[:, :, None])
    # ... and every pair is visible if both blocks lie inside one document and j is strictly earlier
    full = ((j < i) & (first == last)[:, :, None] & (first[:, None, :] == first[:, :, None])
            & (last[:, None, :] == first[:, :, None]) & (i * block + block <= T))  # a cut last block: partial
    partial = visible & ~full

    def ordered(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(count, indices) of the set blocks of each row, indices first in order: each set block j is scattered to
        slot (number of set blocks before it); the unset ones to a spare slot that is dropped. No sort."""
        slot = torch.where(dense, dense.cumsum(-1) - 1, nb)
        cols = j.expand_as(slot).to(torch.int32)
        indices = torch.zeros(B, nb, nb + 1, dtype=torch.int32, device=docs.device).scatter_(-1, slot, cols)
        return dense.sum(-1, dtype=torch.int32)[:, None], indices[..., :nb][:, None].contiguous()

    def same_doc_causal(b, h, q, k):
        return (docs[b, q] == docs[b, k]) & (q >= k)

    return BlockMask.from_kv_blocks(*ordered(partial), *ordered(full), BLOCK_SIZE=block, mask_mod=same_doc_causal,
                                    seq_lengths=(T, T))


_compiled_flex = None


def _flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask) -> torch.Tensor:
    """FlexAttention, always compiled on CUDA: eager flex materializes every score. Inside a compiled model it is
    part of the graph; outside one it runs through a compiled wrapper made on first use."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    options = flex_options(q)
    if q.device.type == "cuda" and not torch.compiler.is_compiling():
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention, dynamic=False)
        return _compiled_flex(q, k, v, block_mask=block_mask, enable_gqa=True, kernel_options=options)
    return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True, kernel_options=options)


_varlen: tuple[Callable | None, frozenset] | None = None  # PyTorch's varlen attention and its argument names


def load_torch_varlen() -> bool:
    """Import PyTorch's varlen attention (torch >= 2.9), outside any compiled region: the import brings in
    torch.compile's machinery (seconds, so not at pgolf's import), and its arguments changed between releases
    (is_causal became window_size, enable_gqa was added). True if this torch has it."""
    global _varlen
    if _varlen is None:
        try:
            from torch.nn.attention.varlen import varlen_attn
            _varlen = varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)
        except ImportError:
            _varlen = None, frozenset()
    return _varlen[0] is not None


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int) -> torch.Tensor:
    """(N, H, D) q and (N, H_kv, D) k, v of sequences packed back to back (starts in cu_seqlens, padded at the end
    with N) -> (N, H, D), each token attending causally inside its own sequence: PyTorch's varlen attention on CUDA
    (load_torch_varlen first), the dense mask elsewhere."""
    if not (q.is_cuda and load_torch_varlen()):
        pos = torch.arange(q.size(0), device=q.device, dtype=cu_seqlens.dtype)
        docs = torch.searchsorted(cu_seqlens, pos, right=True)
        return attention(q[None], k[None], v[None], _dense_mask(docs[None]))[0]
    varlen, args = _varlen
    kw = {"is_causal": True} if "is_causal" in args else {"window_size": (-1, 0)}
    if "enable_gqa" in args:
        kw["enable_gqa"] = True
    elif k.size(1) != q.size(1):
        k, v = (t.repeat_interleave(q.size(1) // k.size(1), dim=1) for t in (k, v))
    return varlen(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **kw)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: DocMask | None = None) -> torch.Tensor:
    """Causal attention, each token inside its document where `mask` is given; q (B, T, H, D), k and v
    (B, T, H_kv, D) -> (B, T, H, D)."""
    B, T, H, D = q.shape
    if mask is not None and mask.kind == "fa3":
        out = _fa3_varlen(q.reshape(B * T, H, D), k.reshape(B * T, -1, D), v.reshape(B * T, -1, D),
                          cu_seqlens_q=mask.mask, cu_seqlens_k=mask.mask, max_seqlen_q=mask.max_len or T,
                          max_seqlen_k=mask.max_len or T, causal=True)
        return (out[0] if isinstance(out, tuple) else out).view(B, T, H, D)
    if mask is not None and mask.kind == "varlen":
        out = packed_attention(q.reshape(B * T, H, D), k.reshape(B * T, -1, D), v.reshape(B * T, -1, D), mask.mask,
                               mask.max_len or T)
        return out.view(B, T, H, D)
    if mask is None and _fa3 is not None and q.is_cuda:
        out = _fa3(q, k, v, causal=True)
        return out[0] if isinstance(out, tuple) else out
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if mask is not None and mask.kind == "flex":
        return _flex(q.contiguous(), k.contiguous(), v.contiguous(), mask.mask).transpose(1, 2)
    dense = mask.mask if mask is not None else None
    with sdpa_kernel(CUDA_SDPA_ORDER) if q.is_cuda else contextlib.nullcontext():
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=dense, is_causal=dense is None, enable_gqa=True)
    return out.transpose(1, 2)
