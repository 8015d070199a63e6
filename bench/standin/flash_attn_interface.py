"""A stand-in for FlashAttention-3's `flash_attn_interface`, so a record's train_gpt.py runs unmodified where FA3 does
not install (bench/record_parity.py puts this folder and the repository on PYTHONPATH): `flash_attn_func` over SDPA,
`flash_attn_varlen_func` over FlexAttention with the document block mask pgolf trains with, built from cu_seqlens
per pair of blocks (traceable: the record calls it inside torch.compile(fullgraph=True))."""

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention

from pgolf.attention import block_mask


def flash_attn_func(q, k, v, causal=True, **_):
    """(B, T, H, D) q and (B, T, H_kv, D) k, v -> (B, T, H, D)."""
    rep = q.size(2) // k.size(2)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2).repeat_interleave(rep, 1), v.transpose(1, 2).repeat_interleave(rep, 1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal).transpose(1, 2)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=0, max_seqlen_k=0, causal=True,
                           window_size=(-1, -1), **_):
    """(N, H, D) q and (N, H_kv, D) k, v of sequences packed back to back (starts in cu_seqlens, padded at the end with
    N) -> (N, H, D); each token attends causally inside its own sequence."""
    assert causal and tuple(window_size) == (-1, -1), "the stand-in does causal attention only"
    n = q.size(0)
    pos = torch.arange(n, device=q.device, dtype=torch.int32)
    docs = torch.searchsorted(cu_seqlens_q.to(torch.int32), pos, right=True)[None]
    q, k, v = (t.transpose(0, 1).unsqueeze(0).contiguous() for t in (q, k, v))
    return flex_attention(q, k, v, block_mask=block_mask(docs), enable_gqa=True)[0].transpose(0, 1)
